"""``python -m diffattn.train``: the training command line, ``diffattn.training.cli``.

    python -m diffattn.train --data digits --model DiffCLIP-Tiny --epochs 8 --out runs/digits
    torchrun --standalone --nproc_per_node 2 -m diffattn.train \\
        --data digits --model DiffCLIP-Tiny --epochs 8 --out runs/digits
"""
import sys

from .training.cli import build_parser, main, train

__all__ = ["build_parser", "main", "train"]

if __name__ == "__main__":
    sys.exit(main())
