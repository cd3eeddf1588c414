"""The ``quotientopt`` command line.

* ``quotientopt compare``: train the reference GPT with SGD-momentum, AdamW, QuotientSGD,
  QuotientHamiltonian and paper 003's symmetry-breaking SGD, and compare them in TensorBoard;
* ``quotientopt audit``: the symmetry audit of a model (redundant dimensions per head and sector);
* ``quotientopt demo``: a one-minute fit of a real low-rank problem with the quotient geometry.

Bad input gives a one-line error, ``quotientopt: error: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from quotientopt import __version__
from quotientopt.contenders import SPECS, TUNE_FACTORS

DESCRIPTION = (
    "Train transformer attention heads on the quotient of their factor space by GL(k). "
    "'quotientopt COMMAND --help' describes each command."
)


class _Parser(argparse.ArgumentParser):
    """One error prefix for every (sub)command: usage, then ``quotientopt: error: ...``."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        fail(message)


def tensorboard_command(logdir: Path) -> str:
    """A command that starts TensorBoard on ``logdir`` as printed: ``tensorboard`` when it is on
    PATH, else the one next to this Python (a venv that is not activated), else
    ``python -m tensorboard.main``."""
    import shlex
    import shutil

    beside = Path(sys.executable).parent / "tensorboard"
    if shutil.which("tensorboard"):
        program = "tensorboard"
    elif beside.is_file():
        program = shlex.quote(str(beside))
    else:
        program = f"{shlex.quote(sys.executable)} -m tensorboard.main"
    return f"{program} --logdir {shlex.quote(str(logdir))}"


def fail(message: str):
    """Print the one-line error ``quotientopt: error: <message>`` and exit with status 2."""
    sys.stderr.write(f"quotientopt: error: {message}\n")
    raise SystemExit(2)


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
    parser = _Parser(prog="quotientopt", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"quotientopt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="best rank-k approximation of a text's bigram statistics: quotient vs Euclidean",
        description="Fit the best rank-k approximation of a text's character-bigram matrix (over its "
        "96 most frequent characters, any script) with "
        "geoopt's RiemannianSGD on FactorQuotient and with torch.optim.SGD, from one start "
        "and from a re-factorized copy of it, and print the gap to the optimum.",
    )
    demo.add_argument(
        "--data",
        metavar="PATH",
        help="a UTF-8 text file (default: the Python standard library's sources)",
    )
    demo.add_argument(
        "--rank",
        type=_positive_int,
        help="rank k of the fit, below the rank of the text's bigram matrix (default 8, or less "
        "when that rank is lower)",
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
        help="learning rate of one optimizer (repeatable); defaults, tuned on the default corpus "
        "(not on --data): " + ", ".join(f"{name}={c.default_lr:g}" for name, c in SPECS.items()),
    )
    compare.add_argument(
        "--tune",
        action="store_true",
        help="before the runs, pick each optimizer's lr on this text: "
        f"{len(TUNE_FACTORS)} lrs (the default or --lr times "
        f"{', '.join(f'{f:g}' for f in TUNE_FACTORS)}), --tune-steps steps each, lowest final "
        f"training loss; costs {len(TUNE_FACTORS)} x --tune-steps extra steps per optimizer",
    )
    for name, default, text in (
        ("steps", 1000, "training steps per optimizer"),
        ("batch-size", 16, "sequences per batch"),
        ("block-size", 64, "context length in bytes"),
        ("n-layer", 2, "transformer layers"),
        ("n-head", 4, "attention heads"),
        ("n-embd", 64, "model width"),
        ("every", 25, "log the symmetry diagnostics every this many steps"),
        ("tune-steps", 100, "--tune: steps per tried lr (at most --steps)"),
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
    return list(SPECS)


def _learning_rates(items: list[str], parser: argparse.ArgumentParser) -> dict[str, float]:
    rates = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            rates[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            fail(f"--lr expects NAME=VALUE (e.g. --lr adamw=1e-3), got {item!r}")
    return rates


def _prepare_logdir(path: str | None, parser: argparse.ArgumentParser) -> Path:
    logdir = Path(path) if path else Path("runs") / time.strftime("compare-%Y%m%d-%H%M%S")
    if logdir.exists() and (not logdir.is_dir() or any(logdir.iterdir())):
        fail(f"--logdir {logdir} exists and is not an empty folder; pass a new one")
    try:
        logdir.mkdir(parents=True, exist_ok=True)
        probe = logdir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        fail(f"cannot write to --logdir {logdir} ({error.strerror}); choose a writable folder")
    return logdir


def _compare(args, parser) -> int:
    from quotientopt.compare import DEFAULT_SOURCE, Settings, run
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
        tune=args.tune,
        tune_steps=args.tune_steps,
    )
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        fail("--device cuda but no CUDA device is available; pass --device cpu")
    try:
        settings.validate()
        text = read_text_file(args.data) if args.data else stdlib_text(settings.max_bytes)
        from quotientopt.compare import split_corpus

        split_corpus(text, settings.block_size, settings.batch_size)
    except ValueError as error:
        fail(str(error))
    source = args.data or DEFAULT_SOURCE
    logdir = _prepare_logdir(args.logdir, parser)
    results = run(text, source, settings, logdir, device=args.device)
    print((logdir / "results.md").read_text())
    files = ["results.md", "results.json"] + [
        name for name in ("losses.png", "charges.png") if (logdir / name).is_file()
    ]
    print(f"Wrote {len(results)} TensorBoard runs, {', '.join(files)} to {logdir}")
    print(f"Open TensorBoard with:  {tensorboard_command(logdir)}")
    return 0


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _load_hf(path_text: str):
    """A local Hugging Face model folder, or a one-line error naming the file and the problem."""
    path = Path(path_text)
    if not path.exists():
        fail(
            f"--hf {path} does not exist; pass a local Hugging Face model folder "
            "(config.json and model.safetensors; models are not downloaded)"
        )
    if path.is_file():
        fail(
            f"--hf {path} is a file; pass the folder that holds config.json and the weights "
            f"(here: --hf {path.parent})"
        )
    config = path / "config.json"
    if not config.is_file():
        fail(f"--hf {path} holds no config.json; pass a Hugging Face model folder")
    try:
        json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        fail(f"{config} is not a readable JSON file ({error}); restore it from the model's source")
    try:
        from transformers import AutoModel
    except ImportError:
        fail("--hf needs transformers; pip install 'quotientopt[hf]'")
    shards = sorted(path.glob("*.safetensors"))
    if not shards and not any(path.glob("*.bin")):
        fail(
            f"--hf {path} holds config.json but no weights ({' or '.join(WEIGHT_FILES)}); "
            "copy them next to config.json"
        )
    try:
        from safetensors import safe_open

        for shard in shards:
            with safe_open(str(shard), framework="pt") as handle:
                for key in handle.keys():
                    handle.get_slice(key)
    except ImportError:
        pass
    except Exception as error:  # safetensors raises its own SafetensorError
        fail(
            f"{shard} is not a complete safetensors file ({_first_line(error)}); "
            "download or copy it again"
        )
    try:
        return AutoModel.from_pretrained(str(path), local_files_only=True)
    except Exception as error:  # transformers raises many types; name the folder, one line
        fail(f"cannot load a Hugging Face model from {path}: {_first_line(error)}")


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _audit(args, parser) -> int:
    from quotientopt.symmetry.audit import audit

    if args.hf:
        model = _load_hf(args.hf)
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
            fail(str(error))
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
        from quotientopt.demo import run_demo

        try:
            text = read_text_file(args.data) if args.data else stdlib_text()
            report = run_demo(
                text, rank=args.rank, steps=args.steps, condition=args.condition, seed=args.seed
            )
        except ValueError as error:
            fail(str(error))
        print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
