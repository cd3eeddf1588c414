"""The ``quotientopt`` command line.

* ``quotientopt compare``: train the reference GPT with SGD-momentum, AdamW, QuotientSGD,
  QuotientHamiltonian and paper 003's symmetry-breaking SGD, and compare them in TensorBoard;
* ``quotientopt audit``: the symmetry audit of a model (redundant dimensions per head and sector);
* ``quotientopt demo``: a one-minute fit of a real low-rank problem with the quotient geometry.

Bad input gives a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from quotientopt import __version__


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _condition(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text!r}") from None
    if not 1.0 <= value <= 1e8:
        raise argparse.ArgumentTypeError(f"expected a condition number in [1, 1e8], got {value:g}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quotientopt", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"quotientopt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="best rank-k approximation of a text's bigram statistics: quotient vs Euclidean",
        description="Fit the best rank-k approximation of a text's character-bigram matrix with "
        "geoopt's RiemannianSGD on FactorQuotient and with torch.optim.SGD, from one start "
        "and from a re-factorized copy of it, and print the gap to the optimum.",
    )
    demo.add_argument(
        "--data",
        metavar="PATH",
        help="a UTF-8 text file (default: the Python standard library's sources)",
    )
    demo.add_argument(
        "--rank", type=_positive_int, default=8, help="rank k of the fit (default 8, at most 95)"
    )
    demo.add_argument(
        "--steps", type=_positive_int, default=300, help="optimizer steps (default 300)"
    )
    demo.add_argument(
        "--condition",
        type=_condition,
        default=100.0,
        help="condition number of the re-factorization G (default 100)",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed of the start (default 0)")
    compare = commands.add_parser(
        "compare",
        help="train the reference GPT with several optimizers and compare them in TensorBoard",
        description="Train the reference GPT (byte-level) on a text with several optimizers from the "
        "same initialization and batches; write one TensorBoard run per optimizer, a results table "
        "(markdown and JSON) and PNG plots under --logdir.",
    )
    compare.add_argument(
        "--data",
        metavar="PATH",
        help="a UTF-8 text file (default: the Python standard library's sources)",
    )
    compare.add_argument(
        "--logdir", metavar="DIR", help="output folder (default: runs/compare-<date>-<time>)"
    )
    compare.add_argument(
        "--optimizers",
        default=",".join(_contenders()),
        help=f"comma-separated, from: {', '.join(_contenders())}",
    )
    compare.add_argument(
        "--lr",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="learning rate of one optimizer (repeatable)",
    )
    for name, default, text in (
        ("steps", 1000, "training steps per optimizer"),
        ("batch-size", 16, "sequences per batch"),
        ("block-size", 64, "context length in bytes"),
        ("n-layer", 2, "transformer layers"),
        ("n-head", 4, "attention heads"),
        ("n-embd", 64, "model width"),
        ("every", 25, "log the symmetry diagnostics every this many steps"),
    ):
        compare.add_argument(
            f"--{name}", type=_positive_int, default=default, help=f"{text} (default {default})"
        )
    compare.add_argument(
        "--seed", type=int, default=0, help="seed of the initialization and the batches (default 0)"
    )
    compare.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    audit = commands.add_parser(
        "audit",
        help="count a model's redundant (symmetry) dimensions per head and sector",
        description="Audit the reference GPT built from the given sizes, or a Hugging Face model from a local folder (--hf PATH).",
    )
    audit.add_argument(
        "--hf", metavar="PATH", help="a local Hugging Face model folder (config and weights)"
    )
    for name, default in (("n-layer", 4), ("n-head", 4), ("n-embd", 128), ("block-size", 128)):
        audit.add_argument(
            f"--{name}",
            type=_positive_int,
            default=default,
            help=f"reference GPT (default {default})",
        )
    audit.add_argument(
        "--n-kv-head", type=_positive_int, help="grouped-query attention: key/value heads"
    )
    audit.add_argument("--rope", action="store_true", help="rotary position embedding")
    audit.add_argument("--qk-norm", action="store_true", help="RMS-normalize q and k")
    audit.add_argument("--no-bias", action="store_true", help="no biases")
    return parser


def _contenders() -> list[str]:
    from quotientopt.compare import CONTENDERS

    return list(CONTENDERS)


def _learning_rates(items: list[str], parser: argparse.ArgumentParser) -> dict[str, float]:
    rates = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            rates[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            parser.error(f"--lr expects NAME=VALUE (e.g. --lr adamw=1e-3), got {item!r}")
    return rates


def _prepare_logdir(path: str | None, parser: argparse.ArgumentParser) -> Path:
    logdir = Path(path) if path else Path("runs") / time.strftime("compare-%Y%m%d-%H%M%S")
    if logdir.exists() and (not logdir.is_dir() or any(logdir.iterdir())):
        parser.exit(
            2,
            f"quotientopt compare: error: --logdir {logdir} exists and is not an empty folder; pass a new one\n",
        )
    try:
        logdir.mkdir(parents=True, exist_ok=True)
        probe = logdir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        parser.exit(
            2,
            f"quotientopt compare: error: cannot write to --logdir {logdir} ({error.strerror}); choose a writable folder\n",
        )
    return logdir


def _compare(args, parser) -> int:
    from quotientopt.compare import Settings, run
    from quotientopt.data import read_text_file, stdlib_text

    settings = Settings(
        optimizers=tuple(name.strip() for name in args.optimizers.split(",") if name.strip()),
        steps=args.steps,
        batch_size=args.batch_size,
        block_size=args.block_size,
        n_layer=args.n_layer,
        n_head=args.n_head,
        n_embd=args.n_embd,
        every=args.every,
        seed=args.seed,
        learning_rates=_learning_rates(args.lr, parser),
    )
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(
            2, "quotientopt compare: error: --device cuda but no CUDA device is available\n"
        )
    try:
        settings.validate()
        text = read_text_file(args.data) if args.data else stdlib_text(settings.max_bytes)
        from quotientopt.compare import split_corpus

        split_corpus(text, settings.block_size, settings.batch_size)
    except ValueError as error:
        parser.exit(2, f"quotientopt compare: error: {error}\n")
    source = args.data or "the Python standard library's sources"
    logdir = _prepare_logdir(args.logdir, parser)
    results = run(text, source, settings, logdir, device=args.device)
    print((logdir / "results.md").read_text())
    print(
        f"Wrote {len(results)} TensorBoard runs, results.md, results.json, losses.png and charges.png to {logdir}"
    )
    print(f"Open TensorBoard with:  tensorboard --logdir {logdir}")
    return 0


def _audit(args, parser) -> int:
    from quotientopt.symmetry.audit import audit

    if args.hf:
        try:
            from transformers import AutoModel
        except ImportError:
            parser.exit(
                2,
                "quotientopt audit: error: --hf needs transformers; pip install 'quotientopt[hf]'\n",
            )
        try:
            model = AutoModel.from_pretrained(args.hf, local_files_only=True)
        except (OSError, ValueError) as error:
            first = (
                str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            )
            parser.exit(
                2,
                f"quotientopt audit: error: cannot load a Hugging Face model from {args.hf}: {first}\n",
            )
    else:
        from quotientopt.models import GPT, GPTConfig

        try:
            config = GPTConfig(
                n_layer=args.n_layer,
                n_head=args.n_head,
                n_embd=args.n_embd,
                block_size=args.block_size,
                n_kv_head=args.n_kv_head,
                rope=args.rope,
                qk_norm=args.qk_norm,
                bias=not args.no_bias,
            )
        except ValueError as error:
            parser.exit(2, f"quotientopt audit: error: {error}\n")
        model = GPT(config)
    print(audit(model).to_markdown())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "compare":
        return _compare(args, parser)
    if args.command == "audit":
        return _audit(args, parser)
    if args.command == "demo":
        from quotientopt.data import read_text_file, stdlib_text
        from quotientopt.demo import ALPHABET, run_demo

        if args.rank >= len(ALPHABET):
            parser.error(
                f"--rank must be below {len(ALPHABET)} (the bigram matrix is {len(ALPHABET)} x {len(ALPHABET)})"
            )
        try:
            text = read_text_file(args.data) if args.data else stdlib_text()
        except ValueError as error:
            parser.exit(2, f"quotientopt demo: error: {error}\n")
        print(
            run_demo(
                text, rank=args.rank, steps=args.steps, condition=args.condition, seed=args.seed
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
