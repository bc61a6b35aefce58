"""The README's digits results, regenerated: train CLIP-Tiny and DiffCLIP-Tiny on scikit-learn's
digits with ``python -m diffattn.train``, write the digits to disk (``export-digits``), evaluate
each run's model with ``python -m diffattn.eval`` (zero-shot classification, retrieval, linear
probe) and print the ``--compare`` table.

    python tools/digits_tables.py --out runs/digits_tables              # the README's table
    python tools/digits_tables.py --out /tmp/small --epochs 1 --train-subset 128 \\
        --check tools/digits_tables_small.json                          # the reproducibility check

Everything runs in this process on ``--threads`` CPU threads (OMP_NUM_THREADS and
``torch.set_num_threads``), on the CPU, with the PyTorch attention path (``--backend torch``,
which ``--backend auto`` picks on a CPU unless TRITON_INTERPRET=1 is set). The commands are the
README's, plus ``--train-subset`` when given. Writes in ``--out``: ``digits/`` (the export),
``runs/<model>/`` (the training runs), ``res/<model>_<task>.json`` (the result files),
``table.txt`` (the comparison) and ``numbers.json``::

    {"conditions": {"seed", "epochs", "train_subset", "threads", "torch", "cpu_capability"},
     "results": {"<model> <task> <metric>": value, ...}}

A run is bitwise reproducible for the same conditions: the numbers depend on the seed, the
epochs and subset, the thread count (the CPU matmul kernels split their sums by thread), the
torch version and the CPU's vector instruction set (``cpu_capability``). ``--check FILE``
compares ``numbers.json`` with a recorded one: exit status 1 and the differing numbers when
the conditions are the same and a number differs, 3 when the conditions differ (nothing to
compare).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

MODELS = ("CLIP-Tiny", "DiffCLIP-Tiny")
RUN_NAMES = {"CLIP-Tiny": "clip", "DiffCLIP-Tiny": "diffclip"}


def conditions(args) -> dict:
    import torch

    return {"seed": args.seed, "epochs": args.epochs, "train_subset": args.train_subset,
            "threads": args.threads, "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _call(main, argv: list) -> None:
    print("+ python -m", "diffattn.train" if "--data" in argv else "diffattn.eval",
          " ".join(argv), flush=True)
    status = main(argv)
    if status != 0:
        raise SystemExit(f"the command above ended with exit status {status}")


def run_model(model: str, out: str, args) -> None:
    """Train ``model`` (unless its run exists) and write its three result files."""
    from diffattn.eval import main as evaluate
    from diffattn.train import main as train

    name = RUN_NAMES[model]
    run = os.path.join(out, "runs", name)
    if not os.path.isfile(os.path.join(run, "model.safetensors")):
        subset = [] if args.train_subset is None else ["--train-subset", str(args.train_subset)]
        _call(train, ["--data", "digits", "--model", model, "--epochs", str(args.epochs),
                      "--seed", str(args.seed), "--device", "cpu", "--backend", "torch",
                      *subset, "--out", run])
    weights = os.path.join(run, "model.safetensors")
    digits = os.path.join(out, "digits")
    common = ["--pretrained", weights, "--dataset", "digits", "--device", "cpu", "--backend",
              "torch", "--no-progress"]
    result = os.path.join(out, "res", f"{name}_{{}}.json")
    _call(evaluate, ["classify", "--images", os.path.join(digits, "test"), "--classnames",
                     os.path.join(digits, "classnames.txt"), "--templates",
                     os.path.join(digits, "templates.txt"), *common,
                     "--out", result.format("classify")])
    _call(evaluate, ["retrieve", "--csv", os.path.join(digits, "test_captions.csv"), *common,
                     "--out", result.format("retrieve")])
    _call(evaluate, ["linear-probe", "--train", os.path.join(digits, "train"), "--test",
                     os.path.join(digits, "test"), *common, "--out", result.format("probe")])


def collect(out: str, args) -> dict:
    """numbers.json's content from the result files in ``out/res``."""
    from diffattn.evaluation.results import read_result

    numbers = {}
    folder = os.path.join(out, "res")
    for file in sorted(os.listdir(folder)):
        result = read_result(os.path.join(folder, file))
        for metric, value in result["metrics"].items():
            numbers[f"{result['model']} {result['task']} {metric}"] = value
    return {"conditions": conditions(args), "results": numbers}


def check(numbers: dict, recorded_path: str) -> int:
    with open(recorded_path, encoding="utf-8") as file:
        recorded = json.load(file)
    if recorded["conditions"] != numbers["conditions"]:
        print(f"not comparable with {recorded_path}: recorded under {recorded['conditions']}, "
              f"this run under {numbers['conditions']}")
        return 3
    differing = {key: (value, numbers["results"].get(key))
                 for key, value in recorded["results"].items()
                 if numbers["results"].get(key) != value}
    for key, (expected, got) in differing.items():
        print(f"differs: {key}: recorded {expected}, now {got}")
    if not differing and set(numbers["results"]) == set(recorded["results"]):
        print(f"all {len(recorded['results'])} numbers equal those of {recorded_path}")
        return 0
    return 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", required=True, help="a new folder, or one this script wrote "
                        "(finished training runs in it are reused)")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-subset", type=int, default=None,
                        help="train on the first N training digits only (all 1,437 if not given)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads")
    parser.add_argument("--check", metavar="FILE", help="compare numbers.json with this "
                        "recorded one")
    args = parser.parse_args(argv)

    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # training then keeps torch's count
    os.environ.pop("TRITON_INTERPRET", None)
    import torch

    torch.set_num_threads(args.threads)
    from diffattn.eval import main as evaluate
    from diffattn.evaluation.results import compare_table, read_result

    digits = os.path.join(args.out, "digits")
    if not os.path.isdir(digits):
        _call(evaluate, ["export-digits", digits])
    for model in args.models:
        run_model(model, args.out, args)
    folder = os.path.join(args.out, "res")
    files = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    results = [read_result(os.path.join(folder, file)) for file in files
               if file.startswith("clip_")] + \
              [read_result(os.path.join(folder, file)) for file in files
               if file.startswith("diffclip_")]
    if not results:
        return 0
    table = compare_table(results)
    with open(os.path.join(args.out, "table.txt"), "w", encoding="utf-8") as file:
        file.write(table + "\n")
    numbers = collect(args.out, args)
    with open(os.path.join(args.out, "numbers.json"), "w", encoding="utf-8") as file:
        json.dump(numbers, file, indent=1, sort_keys=True)
        file.write("\n")
    print(table)
    return check(numbers, args.check) if args.check else 0


if __name__ == "__main__":
    sys.exit(main())
