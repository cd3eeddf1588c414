"""Shared test configuration: hypothesis runs without deadlines (k x k LAPACK calls vary in time on
a loaded 2-core machine) and, under CI, with a fixed seed so that a failure reproduces."""

import os

import torch
from hypothesis import settings

settings.register_profile("dev", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

# one thread: small tensors dominate the suite, and OpenMP threads spin badly when the
# machine is oversubscribed (measured: a tiny GPT step 375 ms with 2 threads under load, 3 ms with 1)
torch.set_num_threads(1)
