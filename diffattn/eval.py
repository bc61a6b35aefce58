"""``python -m diffattn.eval``: the evaluation command line, ``diffattn.evaluation.cli``.

    python -m diffattn.eval classify --pretrained runs/digits/model.safetensors --images ROOT
    python -m diffattn.eval retrieve --pretrained runs/digits/model.safetensors --csv FILE
    python -m diffattn.eval --compare A.json B.json
"""
import sys

from .evaluation.cli import build_parser, main

__all__ = ["build_parser", "main"]

if __name__ == "__main__":
    sys.exit(main())
