"""Test setup: run the Triton kernels through the interpreter on machines without a GPU.

TRITON_INTERPRET must be set before triton (and so diffattn) is imported, which is why it is
set here, at the top of the first file pytest loads. On a CUDA machine it is left alone, so the
GPU-only tests (tests/ops/test_gpu.py) run on the real kernels; the interpreter tests then skip.

The tests live in folders that mirror the code (ops, modules, models, training, evaluation,
benchmarks); this folder is put on sys.path so that every test file imports the shared helpers
(`helpers`) the same way wherever it sits.
"""
import os
import sys
from pathlib import Path

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
