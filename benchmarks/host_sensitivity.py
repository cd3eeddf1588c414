"""Why one `quotientopt compare` row moves with the host: a 1-ulp perturbation of the start.

Trains the README's compare setting (reference GPT, 2 layers, width 64, 1000 steps, the default
corpus and learning rates, seed 0, no monitor) for each optimizer twice: from the usual start, and
from the start with every weight moved by one ulp (``torch.nextafter`` towards +inf). What a host
changes is the rounding of the products; a 1-ulp change of the start is a rounding difference of
the same size, so the val loss's move under it shows how far rounding alone carries each row.

    python benchmarks/host_sensitivity.py --optimizers sgd,breaking-sgd,quotient-sgd,adamw
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from quotientopt.compare import CONTENDERS, Settings, _model, _train, evaluate, split_corpus
from quotientopt.data import stdlib_text


def run(name: str, settings: Settings, train, val, perturb: bool) -> float:
    contender = CONTENDERS[name]
    model = _model(contender, settings, "cpu")
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.nextafter(p, torch.full_like(p, float("inf"))))
    optimizer = contender.build(model, contender.default_lr)
    out = _train(model, optimizer, train, settings, settings.steps, "cpu")
    if out["diverged_at"] is not None or out["error"] is not None:
        return float("nan")
    return evaluate(model, val, settings, "cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", default="sgd,breaking-sgd,quotient-sgd,adamw")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results/host_sensitivity"))
    args = parser.parse_args()
    settings = Settings(steps=args.steps)
    train, val = split_corpus(
        stdlib_text(settings.max_bytes), settings.block_size, settings.batch_size
    )
    rows = {}
    for name in args.optimizers.split(","):
        base, moved = (run(name, settings, train, val, perturb) for perturb in (False, True))
        rows[name] = {"val_loss": base, "val_loss_1ulp": moved, "change": moved - base}
        print(
            f"{name}: val loss {base:.4f}, from the 1-ulp start {moved:.4f} ({moved - base:+.4f})"
        )
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    record = {"args": vars(args), "threads": torch.get_num_threads(), "rows": rows}
    (folder / "host_sensitivity.json").write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
