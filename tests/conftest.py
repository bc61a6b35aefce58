"""Test setup: run the Triton kernels through the interpreter on machines without a GPU.

TRITON_INTERPRET must be set before triton (and so diffattn) is imported, which is why it is
set here, at the top of the first file pytest loads. On a CUDA machine it is left alone, so the
GPU-only tests (tests/test_gpu.py) run on the real kernels; the interpreter tests then skip.
"""
import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
