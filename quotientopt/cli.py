"""The ``quotientopt`` command line.

``quotientopt demo`` fits a real problem with the quotient geometry and prints what it did.
Bad input gives a one-line error and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
