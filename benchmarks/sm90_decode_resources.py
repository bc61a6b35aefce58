"""Registers, spills and shared memory of the KV-cache decode kernels
(``kernels/diff_attn_decode.py``), compiled for sm_90 on a machine without a GPU, with the
machinery of benchmarks/sm90_resources.py (recorded launches, Triton's own specialisation,
cuobjdump).

    python benchmarks/sm90_decode_resources.py              # every variant, bf16, d 64 and 128
    python benchmarks/sm90_decode_resources.py --list       # the launches, no compile
    python benchmarks/sm90_decode_resources.py --out benchmarks/results/sm90-decode-resources

Variants: V1 (a key pair per group, value width 2d, RMSNorm epilogue, lambda per head or from
the layer's four vectors) and V2 (one key per group, value width d, lambda per token), each on
a contiguous and a paged cache (pages of 64), one pass and split-K (the decode kernel then
writes partial results and the combine kernel runs); one query per sequence (decoding) and 16
(a prompt chunk or speculative tokens). The launcher runs on small CPU tensors with its two
kernels replaced by recorders, so each compile gets the arguments a real launch passes.

Outputs: ``<out>.csv`` (sm90_resources.CSV_COLUMNS) and ``<out>.md`` (a table per kernel).
Exit status 0; 1 when a compile failed.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import json
import sys
from pathlib import Path
from typing import List

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sm90_resources as res  # noqa: E402

DECODE_MODULE = "diffattn.kernels.diff_attn_decode"
DECODE_KERNELS = ((DECODE_MODULE, "diff_attn_decode_kernel", "decode"),
                  (DECODE_MODULE, "diff_attn_decode_combine_kernel", "decode_combine"))
# (name, v2, lambda, paged, splits, queries)
VARIANTS = (
    ("v1", False, "heads", False, 1, 1),
    ("v1_vec", False, "vectors", False, 1, 1),
    ("v1_split", False, "heads", False, 8, 1),
    ("v1_paged_split", False, "heads", True, 8, 1),
    ("v1_q16", False, "heads", False, 1, 16),
    ("v2", True, "tokens", False, 1, 1),
    ("v2_split", True, "tokens", False, 8, 1),
    ("v2_paged_split", True, "tokens", True, 8, 1),
    ("v2_q16", True, "tokens", False, 1, 16),
)
DEFAULT_OUT = res.RESULTS_DIR / "sm90-decode-resources"


def record(variant: tuple, dtype_name: str, d: int) -> List[res.Launch]:
    """The launches of one decode call of the variant (no kernel runs)."""
    import torch
    mod = importlib.import_module(DECODE_MODULE)
    name, v2, lam_kind, paged, splits, nq = variant
    dtype = res._torch_dtype(dtype_name)
    B, H, Hk, M, page = 2, 4, 2, 1024, 64
    g = torch.Generator().manual_seed(0)
    dv = d if v2 else 2 * d
    q = torch.randn(B, nq, 2 * H, d, generator=g).to(dtype)
    rows = (B * M // page, page) if paged else (B, M)
    k_cache = torch.randn(*rows, Hk if v2 else 2 * Hk, d, generator=g).to(dtype)
    v_cache = torch.randn(*rows, Hk, dv, generator=g).to(dtype)
    block_table = torch.arange(B * M // page, dtype=torch.int32).view(B, -1) if paged else None
    seqlens = torch.full((B,), M, dtype=torch.int32)
    lam_value, vectors = 0.0, False
    if lam_kind == "heads":
        lam = torch.rand(H)
    elif lam_kind == "vectors":
        lam, lam_value, vectors = torch.randn(4, d) * 0.1, 0.8, True
    else:
        lam = torch.rand(B, nq, H)
    norm = None if v2 else torch.ones(dv)
    launches: List[res.Launch] = []
    recorders = [(getattr(mod, k.replace("_kernel", "_launch")), res.Recorder(short, launches))
                 for _, k, short in DECODE_KERNELS]
    res.check_environment()
    with contextlib.ExitStack() as stack:
        for launcher, recorder in recorders:
            stack.enter_context(launcher.replaced(recorder, fast=False))
        mod.diff_attn_decode(q, k_cache, v_cache, seqlens, block_table, lam, lam_value, norm,
                             d ** -0.5, True, 1e-5, 0.2 if norm is not None else 1.0, splits,
                             lam_vectors=vectors)
    return launches


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list", action="store_true", help="print the launches, compile nothing")
    parser.add_argument("--dtypes", default="bf16", help="comma list of bf16, fp16, fp32")
    parser.add_argument("--head-dims", default="64,128", help="comma list of head dims")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="output path without suffix (.csv and .md are written)")
    args = parser.parse_args(argv)
    res.KERNELS = res.KERNELS + DECODE_KERNELS  # launch_spec finds the decode kernels too
    import triton
    rows, failed = [], 0
    for dtype in args.dtypes.split(","):
        for d in (int(x) for x in args.head_dims.split(",")):
            for variant in VARIANTS:
                for launch in record(variant, dtype, d):
                    spec = res.launch_spec(launch)
                    if args.list:
                        print(json.dumps({"kernel": spec.kernel, "variant": variant[0],
                                          "dtype": dtype, "head_dim": d,
                                          "signature": spec.signature,
                                          "options": spec.options}, default=str))
                        continue
                    config = spec.tiles(("BLOCK_M",)) + (spec.options.get("num_warps"),
                                                        spec.options.get("num_stages"))
                    task = res.run_task(res.Task(spec, variant[0], dtype, d, "decode",
                                                 "launcher", config, 90))
                    rows.append(task.row)
                    failed += bool(task.row.get("error"))
                    print(f"{spec.kernel:15s} {variant[0]:15s} {dtype} d={d}: "
                          f"regs {task.row.get('regs')} stack {task.row.get('stack')} local "
                          f"{task.row.get('local')} shared {task.row.get('shared')} "
                          f"{task.row.get('error', '')[:200]}", flush=True)
    if args.list:
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(Path(f"{args.out}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=res.CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# Decode kernels compiled for sm_90 (triton {triton.__version__})", "",
             "Launch configuration as the launcher gives it (BLOCK_M, num_warps, num_stages); "
             "registers per thread, spill bytes (stack/local), dynamic shared memory. Recorded "
             "with 4 differential heads in 2 key/value groups (rows = 2 heads x queries), "
             "caches of 1024 tokens, split-K variants with 8 splits, pages of 64.", "",
             "| kernel | variant | dtype | d | config | regs | stack | local | shared | "
             "blocks/SM | error |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['variant']} | {r['dtype']} | {r['head_dim']} | "
                     f"{r['config']} | {r.get('regs', '')} | {r.get('stack', '')} | "
                     f"{r.get('local', '')} | {r.get('shared', '')} | "
                     f"{r.get('blocks_per_sm', '')} | {r.get('error', '')[:80]} |")
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}.csv and {args.out}.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
