"""Shared test setup: the repo root on sys.path, one thread per test process, and a derandomized Hypothesis
profile for CI."""

import os
import sys
from pathlib import Path

# One thread: the tests' tensors are tiny, and a second thread spins waiting for the first, which on a busy
# machine costs several times the CPU (CHANGELOG). Set before torch is imported, and inherited by subprocesses.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # should a plugin have imported torch first
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
