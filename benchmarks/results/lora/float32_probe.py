"""Float32 invariance probe of QuotientMuon on tests/test_lora.py's tiny model (issue 25, step 1).

Both adapters from PEFT's B = 0 start, one copy re-factorized by a cond-1000 G, both cast to
float32, 30 steps (lr 2e-3); prints the products' largest relative difference and the time.
Run: PYTHONPATH=. nice -n 19 python benchmarks/results/lora/float32_probe.py
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "tests"))
import test_lora as T

from quotientopt.optim import QuotientMuon

for extra in [{}, {"polar": "eigh"}, {"head_norm": "per-head"}]:
    ps, seconds = [], 0.0
    for refactor in (False, True):
        model = T.lora_model(init=True, second=True)
        if refactor:
            T.refactorize(model)
        model.to(torch.float32)
        opt = T.create_quotient_optimizer(model, QuotientMuon, lr=2e-3, **extra)
        start = time.perf_counter()
        T.train(model, opt, T.batches(30))
        seconds += time.perf_counter() - start
        ps.append([x.double() for x in T.products(model)])
    gap = T.largest_difference(ps[1], ps[0])
    print(f"{extra or 'defaults'}: float32 gap {gap:.2e}, {seconds:.1f} s for 2 x 30 steps")
