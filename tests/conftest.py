"""Test setup: run the Triton kernels through the interpreter on machines without a GPU.

TRITON_INTERPRET must be set before triton (and so diffattn) is imported, which is why it is
set here, at the top of the first file pytest loads. On a CUDA machine it is left alone, so the
GPU-only tests (tests/ops/test_gpu.py) run on the real kernels; the interpreter tests then skip.

The tests live in folders that mirror the code (ops, modules, models, training, evaluation,
benchmarks); this folder is put on sys.path so that every test file imports the shared helpers
(`helpers`) the same way wherever it sits.

Under pytest-xdist with `--dist loadgroup` (README's command), the tests of one file that share
a module-scoped fixture (a training run, a generated data set) go to one worker, so that the
fixture is built once rather than once per worker.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

TESTS = str(Path(__file__).resolve().parent)
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        fixtures = getattr(item, "_fixtureinfo", None)
        if fixtures is None:
            continue
        if any(defs and defs[-1].scope == "module" for defs in fixtures.name2fixturedefs.values()):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
