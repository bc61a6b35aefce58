"""Sweep the fused kernels' tile candidates on this GPU and write the winners into the tuned
table (kernels/tuned_configs.json), which the kernels read before anything else.

    python tools/tune.py                                # every problem, 420 s at most
    python tools/tune.py --time-limit-s 300 --csv out/tune.csv --extra-candidates
    TRITON_INTERPRET=1 python tools/tune.py --dry-run --table /tmp/t.json   # CPU check

Problems: the op-level shapes of benchmarks/throughput.py (CLIP vision N=197 d=64, CLIP text
N=77 d=64 causal, ViT-L N=577 d=128, N in {1024, 4096, 16384} at 16k tokens d=64 causal and
not, N=4096 d=128), for each dtype (bf16, fp16) and variant: V1 (DiffCLIP: a key pair per
group, value width 2d, per-head RMSNorm epilogue, lambda a 0-dim tensor, as
DiffMultiheadAttention calls it) and V2 (one key per group, value width d, lambda per token,
no epilogue). They are grouped by call class (``kernels.tuning.call_class``), so each class's
candidates compile once; classes run bf16 before fp16 and V1 before V2.

Per problem and kernel (forward, then backward), every candidate of the class's group
(``kernels/config.py``; with --extra-candidates also a wider grid) is forced through the
launchers' tile choice (``kernels.tuning.forced_tiles``) and the launcher
``diff_attn_fwd`` / ``diff_attn_bwd`` is timed with ``triton.testing.do_bench`` (median).
Candidates that fail to compile or launch are recorded and left out. The fastest one is
written for the current architecture (``kernels.tuning.gpu_arch``, e.g. sm_90) under its
class and length bucket (``bucket_name(length_bucket(N), length_bucket(M))``), merged into
the table: other architectures, classes and buckets are kept. The table is rewritten after
every winner, so an interrupted sweep keeps what it finished. With the time limit reached,
the remaining problems are listed as skipped; a sweep cut short keeps the best of the
candidates it timed (the first candidate, the kernels' default, is always timed first).

Outputs: the table; --csv: one row per candidate timing (CSV_COLUMNS).

Without CUDA the sweep runs only through the Triton interpreter (TRITON_INTERPRET=1) and only
with --dry-run: tiny shapes, two candidates per kernel, perf_counter timing, architecture
"interpreter", written only to a --table other than the committed one. It checks the sweep
and the table writing, not the kernels' speed.

Exit status: 0; 1 when no candidate of some problem could run; 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from arguments import (CliParser, add_do_bench_arguments, comma_list,  # noqa: E402
                       positive_float, positive_int)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
VARIANTS = ("v1", "v2")
KERNELS = ("fwd", "bwd")
CSV_COLUMNS = ("arch", "kernel", "class", "bucket", "variant", "dtype", "batch", "seq_len",
               "heads", "head_dim", "causal", "config", "ms", "winner", "error")
DRY_RUN_ARCH = "interpreter"
DRY_RUN_CANDIDATES = 2
LAMBDA_INIT = 0.8


@dataclass(frozen=True)
class Problem:
    """One tuning problem: ``heads`` differential heads H (q has 2H heads of head_dim);
    self-attention (seq_k == seq_len)."""
    variant: str
    dtype: str
    batch: int
    seq_len: int
    heads: int
    head_dim: int
    causal: bool

    @property
    def value_dim(self) -> int:
        return 2 * self.head_dim if self.variant == "v1" else self.head_dim

    def label(self) -> str:
        return (f"{self.variant} {self.dtype} B={self.batch} N={self.seq_len} H={self.heads} "
                f"d={self.head_dim}{' causal' if self.causal else ''}")


# (batch, seq_len, heads, head_dim, causal): the op-level shapes of throughput.py.
OP_SHAPES = ((256, 197, 6, 64, False), (256, 77, 4, 64, True), (64, 577, 8, 128, False),
             (16, 1024, 8, 64, False), (4, 4096, 8, 64, False), (1, 16384, 8, 64, False),
             (16, 1024, 8, 64, True), (4, 4096, 8, 64, True), (1, 16384, 8, 64, True),
             (4, 4096, 8, 128, False))
DRY_RUN_SHAPES = ((1, 40, 1, 64, False), (1, 40, 1, 64, True), (1, 24, 1, 128, False))


def problems(dtypes: Sequence[str], variants: Sequence[str], dry_run: bool) -> List[Problem]:
    """Every problem, grouped by call class (dtype, variant, head_dim, causal) in run order:
    dtypes and variants as given, then d=64 non-causal, d=64 causal, d=128; seq_len ascending
    within a class."""
    shapes = DRY_RUN_SHAPES if dry_run else OP_SHAPES
    found = [Problem(v, t, *shape) for t in dtypes for v in variants for shape in shapes]
    order = {(t, v): i for i, (t, v) in enumerate(itertools.product(dtypes, variants))}
    return sorted(found, key=lambda p: (order[(p.dtype, p.variant)], p.head_dim, p.causal,
                                        p.seq_len))


# ------------------------------------------------------------------------------ candidates
# A wider grid than kernels/config.py's lists, for --extra-candidates.
EXTRA_FWD = [(m, n, w, s) for m in (64, 128) for n in (32, 64, 128) for w in (4, 8)
             for s in (2, 3, 4)]
EXTRA_BWD = [(m1, n1, m2, n2, w, s) for m1, n1 in ((32, 64), (64, 64), (32, 128), (64, 128))
             for m2, n2 in ((64, 32), (64, 64), (128, 32)) for w in (4, 8) for s in (2, 3)]


def candidates(kernel: str, dtype: torch.dtype, block_dv: int, extra: bool,
               limit: Optional[int]) -> List[tuple]:
    """The candidates of a kernel for a call (the group's list first, the kernels' default
    first of all), with the extra grid appended and duplicates dropped; at most ``limit``."""
    from diffattn.kernels.config import BWD_CANDIDATES, FWD_CANDIDATES, candidate_group
    group = candidate_group(dtype, block_dv)
    found = list((FWD_CANDIDATES if kernel == "fwd" else BWD_CANDIDATES)[group])
    if extra:
        found += EXTRA_FWD if kernel == "fwd" else EXTRA_BWD
    found = list(dict.fromkeys(tuple(c) for c in found))
    return found[:limit] if limit else found


# ------------------------------------------------------------------------------ table
def read_table_file(path: Path) -> dict:
    """The whole table file ({"format": 1, "arch": {...}}), or an empty one if absent."""
    from diffattn.kernels.tuning import TABLE_FORMAT
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {"format": TABLE_FORMAT, "arch": {}}
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable tile table ({exc})") from exc
    if data.get("format") != TABLE_FORMAT or not isinstance(data.get("arch"), dict):
        raise ValueError(f"{path}: tile table format {data.get('format')!r}, expected "
                         f"{TABLE_FORMAT} with an 'arch' object")
    return data


def merge_winner(data: dict, arch: str, kernel: str, cls: str, bucket: str,
                 config: Sequence[int]) -> dict:
    """Set table[arch][kernel][cls][bucket] = config in ``data`` (in place, returned); every
    other entry is kept."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    entry = data["arch"].setdefault(arch, {}).setdefault(kernel, {}).setdefault(cls, {})
    entry[bucket] = [int(x) for x in config]
    return data


def format_table(data: dict) -> str:
    """The table as JSON with sorted keys, one configuration per line."""
    text = json.dumps(data, indent=2, sort_keys=True)
    return re.sub(r"\[\s+([\d,\s]+?)\s+\]",
                  lambda m: "[" + ", ".join(m.group(1).split()).replace(",,", ",") + "]",
                  text) + "\n"


def write_table(path: Path, data: dict) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(format_table(data))
    tmp.replace(path)


# ------------------------------------------------------------------------------ launching
class Launch:
    """The inputs of one problem and the two launchers, run with a forced tile config."""

    def __init__(self, problem: Problem, device: torch.device):
        from diffattn.kernels.config import head_block
        p = problem
        dtype = DTYPES[p.dtype]
        B, N, H, d, DV = p.batch, p.seq_len, p.heads, p.head_dim, p.value_dim
        key_heads = 2 * H if p.variant == "v1" else H
        self.q = torch.randn(B, N, 2 * H, d, device=device, dtype=dtype)
        self.k = torch.randn(B, N, key_heads, d, device=device, dtype=dtype)
        self.v = torch.randn(B, N, H, DV, device=device, dtype=dtype)
        if p.variant == "v1":  # DiffMultiheadAttention's call: one lambda, RMSNorm epilogue
            self.lam = torch.tensor(0.3, device=device)
            self.norm_weight = torch.ones(DV, device=device)
            self.out_scale = 1.0 - LAMBDA_INIT
        else:                  # V2: lambda per token, no epilogue
            self.lam = torch.rand(B, N, H, device=device)
            self.norm_weight = None
            self.out_scale = 1.0
        from diffattn.kernels import AttentionCall
        self.call = AttentionCall.create(d ** -0.5, causal=p.causal, out_scale=self.out_scale)
        self.block_d, self.block_dv = head_block(d), head_block(DV)
        self.problem, self.dtype = p, dtype
        self.saved = None
        self.dout = None

    def forward(self):
        from diffattn.kernels import diff_attn_fwd
        return diff_attn_fwd(self.q, self.k, self.v, self.lam, None, self.norm_weight, self.call)

    def backward(self):
        from diffattn.kernels import diff_attn_bwd
        out, x, o2, lse, rstd = self.saved
        return diff_attn_bwd(self.dout, self.q, self.k, self.v, self.lam, None, self.norm_weight,
                             (x, o2, lse, rstd), self.call, need_dlam=True,
                             need_dw=self.norm_weight is not None)

    def runner(self, kernel: str, config: tuple) -> Callable[[], object]:
        """A callable that launches ``kernel`` with ``config`` forced."""
        from diffattn.kernels.tuning import forced_tiles
        if kernel == "bwd" and self.saved is None:
            self.saved = self.forward()
            self.dout = torch.randn_like(self.saved[0])
        forced = {kernel: config}

        def run():
            with forced_tiles(**forced):
                return self.forward() if kernel == "fwd" else self.backward()
        return run

    def class_and_bucket(self) -> tuple:
        from diffattn.kernels.tuning import bucket_name, call_class, length_bucket
        p = self.problem
        return (call_class(self.dtype, self.block_d, self.block_dv, p.variant == "v1", p.causal),
                bucket_name(length_bucket(p.seq_len), length_bucket(p.seq_len)))


def cuda_timer(warmup_ms: int, rep_ms: int) -> Callable[[Callable], float]:
    """Median ms of a callable by triton.testing.do_bench."""
    def time_ms(fn: Callable) -> float:
        from triton.testing import do_bench
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    return time_ms


def wall_timer(repeats: int = 2) -> Callable[[Callable], float]:
    """Median ms of ``repeats`` perf_counter-timed calls after one warm-up call (CPU)."""
    def time_ms(fn: Callable) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return sorted(times)[len(times) // 2]
    return time_ms


# ------------------------------------------------------------------------------ sweep
@dataclass
class SweepResult:
    rows: List[dict]
    winners: Dict[tuple, tuple]    # (kernel, class, bucket) -> config
    skipped: List[str]
    failed: List[str]


def sweep(problem_list: Sequence[Problem], device: torch.device, arch: str,
          time_ms: Callable[[Callable], float], *, table_path: Optional[Path],
          extra: bool = False, max_candidates: Optional[int] = None,
          time_limit_s: float = math.inf, log: Callable[[str], None] = print,
          on_row: Optional[Callable[[dict], None]] = None,
          clock: Callable[[], float] = time.perf_counter) -> SweepResult:
    """Time every candidate of every problem's kernels and write each winner into the table
    at ``table_path`` (None: write nothing). Returns the rows (CSV_COLUMNS), winners, what was
    skipped for time and what could not run at all."""
    started = clock()
    result = SweepResult([], {}, [], [])
    for index, problem in enumerate(problem_list):
        if clock() - started >= time_limit_s:
            result.skipped += [f"{p.label()}: the time limit of {time_limit_s:g} s was reached"
                               for p in problem_list[index:]]
            break
        launch = Launch(problem, device)
        cls, bucket = launch.class_and_bucket()
        for kernel in KERNELS:
            if (kernel, cls, bucket) in result.winners:
                log(f"{kernel} {cls} {bucket}: already tuned in this sweep")
                continue
            configs = candidates(kernel, DTYPES[problem.dtype], launch.block_dv, extra,
                                 max_candidates)
            times: Dict[tuple, float] = {}
            group_rows: List[dict] = []
            for n, config in enumerate(configs):
                if clock() - started >= time_limit_s:
                    result.skipped.append(f"{problem.label()} {kernel}: {len(configs) - n} of "
                                          f"{len(configs)} candidates (time limit)")
                    break
                row = {"arch": arch, "kernel": kernel, "class": cls, "bucket": bucket,
                       "variant": problem.variant, "dtype": problem.dtype,
                       "batch": problem.batch, "seq_len": problem.seq_len,
                       "heads": problem.heads, "head_dim": problem.head_dim,
                       "causal": problem.causal, "config": "-".join(map(str, config)),
                       "ms": "", "winner": False, "error": ""}
                try:
                    times[config] = ms = time_ms(launch.runner(kernel, config))
                    row["ms"] = f"{ms:.6g}"
                    log(f"[{kernel} {cls} {bucket}] {config}: {ms:.4f} ms")
                except Exception as exc:  # a candidate the device cannot run
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    log(f"[{kernel} {cls} {bucket}] {config}: failed ({row['error']})")
                group_rows.append(row)
            if times:
                best = min(times, key=times.get)
                result.winners[(kernel, cls, bucket)] = best
                best_name = "-".join(map(str, best))
                next(r for r in group_rows if r["config"] == best_name)["winner"] = True
                partial = "" if len(times) == len(configs) else \
                    f" (best of the {len(times)} of {len(configs)} candidates timed)"
                log(f"winner {kernel} {cls} {bucket}: {best} at {times[best]:.4f} ms{partial}")
                if table_path is not None:
                    write_table(table_path, merge_winner(read_table_file(table_path), arch,
                                                         kernel, cls, bucket, best))
            elif len(group_rows) == len(configs):  # every candidate ran and failed
                result.failed.append(f"{problem.label()} {kernel}: no candidate could run")
            result.rows += group_rows
            if on_row is not None:
                for row in group_rows:
                    on_row(row)
    return result


# ------------------------------------------------------------------------------ CLI
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = CliParser(description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", type=comma_list(tuple(DTYPES)), default=list(DTYPES),
                        help="comma list of bf16, fp16 (default both, in that order)")
    parser.add_argument("--variants", type=comma_list(VARIANTS), default=list(VARIANTS),
                        help="comma list of v1, v2 (default both)")
    parser.add_argument("--time-limit-s", type=positive_float, default=420.0,
                        help="start no candidate after this many seconds (default 420)")
    parser.add_argument("--table", type=Path, default=None,
                        help="table to merge the winners into (default the committed "
                             "kernels/tuned_configs.json)")
    parser.add_argument("--csv", type=Path, default=None,
                        help="write every candidate's time to this CSV")
    parser.add_argument("--extra-candidates", action="store_true",
                        help="also sweep a wider grid than kernels/config.py's candidates")
    parser.add_argument("--max-candidates", type=positive_int, default=None,
                        help="at most this many candidates per kernel and problem")
    add_do_bench_arguments(parser, warmup_ms=10, rep_ms=40, per="per candidate")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes and two candidates per kernel through the Triton "
                             "interpreter (TRITON_INTERPRET=1): checks the sweep, not the speed")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    from diffattn.kernels.config import INTERPRET
    from diffattn.kernels.tuning import TABLE_PATH, gpu_arch
    table = args.table
    if args.dry_run or not torch.cuda.is_available() or INTERPRET:
        if not INTERPRET:
            print("error: no CUDA device: tune.py needs a GPU, or TRITON_INTERPRET=1 with "
                  "--dry-run", file=sys.stderr)
            return 2
        if not args.dry_run:
            print("error: under TRITON_INTERPRET=1 only --dry-run is possible (interpreter "
                  "timings are not the kernels' speed)", file=sys.stderr)
            return 2
        if table is None or Path(table).resolve() == TABLE_PATH.resolve():
            print("error: --dry-run writes only to a --table other than the committed "
                  f"{TABLE_PATH.name}", file=sys.stderr)
            return 2
        device, arch, time_ms = torch.device("cpu"), DRY_RUN_ARCH, wall_timer()
        limit = args.max_candidates or DRY_RUN_CANDIDATES
    else:
        device = torch.device("cuda")
        arch, time_ms = gpu_arch(device), cuda_timer(args.warmup_ms, args.rep_ms)
        limit = args.max_candidates
        table = TABLE_PATH if table is None else table
    try:
        read_table_file(table)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    todo = problems(args.dtype, args.variants, args.dry_run)
    print(f"tuning {len(todo)} problems for {arch} on "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu (interpreter)'}"
          f", time limit {args.time_limit_s:g} s; table {table}", flush=True)
    stream = writer = None
    if args.csv is not None:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        stream = open(args.csv, "w", newline="")
        writer = csv.DictWriter(stream, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()

    def on_row(row: dict) -> None:
        writer.writerow(row)
        stream.flush()

    try:
        result = sweep(todo, device, arch, time_ms, table_path=table,
                       extra=args.extra_candidates, max_candidates=limit,
                       time_limit_s=args.time_limit_s,
                       log=lambda line: print(line, flush=True),
                       on_row=on_row if writer is not None else None)
    finally:
        if stream is not None:
            stream.close()
    print(f"\n{len(result.winners)} winners written to {table} for {arch}")
    for (kernel, cls, bucket), config in sorted(result.winners.items()):
        print(f"  {kernel} {cls} {bucket}: {list(config)}")
    if result.skipped:
        print(f"skipped ({len(result.skipped)}):")
        for line in result.skipped:
            print(f"  {line}")
    if result.failed:
        print(f"failed ({len(result.failed)}):")
        for line in result.failed:
            print(f"  {line}")
    return 1 if result.failed else 0


if __name__ == "__main__":
    sys.exit(main())
