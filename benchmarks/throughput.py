"""Speed and memory of fused differential attention against plain and unfused attention.

    python benchmarks/throughput.py                 # full suite (GPU) / small CPU suite
    python benchmarks/throughput.py --quick         # short subset
    python benchmarks/throughput.py --levels op --providers diffattn,sdpa_x2 --dtype bf16

Providers (see benchmarks/providers.py): ``diffattn`` (fused Triton kernels), ``sdpa_x2`` (two
SDPA calls and the subtraction, plus a separate RMSNorm at layer level), ``naive`` (explicit
maps, the DiffCLIP release's way), ``sdpa_plain`` (plain attention of the same width).
Levels: ``op`` (the attention core), ``layer`` (DiffMultiheadAttention with projections and
norm; nn.MultiheadAttention for sdpa_plain), ``model`` (DiffCLIP-ViT-B-16 against plain CLIP
ViT-B-16, through ``diffattn.models.create_model``).

Shapes (``heads`` = differential heads, i.e. 2 * heads softmax maps of width d):
    GPU  clip_vision  B=256 N=197  H=6 d=64            (CLIP ViT-B/16 image tower)
         clip_text    B=256 N=77   H=4 d=64 causal     (CLIP text tower)
         vit_l14_336  B=64  N=577  H=8 d=64            (ViT-L/14 at 336 px)
         long         N = 512 .. 16384 (powers of two), B = 16384 // N (16k tokens), H=8,
                      d in {64, 128}, causal and not
         --quick: clip_vision, clip_text, long N in {1024, 4096, 16384} at d=64, not causal.
         Layer level: clip_vision, clip_text, vit_l14_336, long N=4096 d=64 (quick: the
         first two). Model level: batch 256 (quick 64).
    CPU  the same kinds at small sizes: batch 1, long sweep N = 128 .. 1024 over 1024 tokens
         with H=2 (--quick: N in {128, 512} over 512 tokens); model level DiffCLIP-Tiny
         against CLIP-Tiny at batch 4 (quick 2); the torch providers only.
``--causal`` keeps only causal or non-causal shapes.

Method:
    Modes: ``fwd`` (forward with autograd on, as in training), ``bwd`` (the backward alone,
    timed directly by re-running ``out.backward(grad, retain_graph=True)`` through one retained
    forward graph; not fwd_bwd minus fwd), ``fwd_bwd`` (forward + backward of a fixed random
    output gradient). Gradients of the inputs and parameters are reset to None between calls.
    Timing on CUDA: ``triton.testing.do_bench(fn, warmup, rep, quantiles=[0.5, 0.2, 0.8])``
    (L2 cleared before each call), so ms_p50 / ms_p20 / ms_p80 are its median and 20th / 80th
    percentiles; Triton autotuning and compilation happen in its first, untimed call. On CPU:
    ``time.perf_counter`` around each of a few calls after one warm-up call, same percentiles.
    peak_mem_mb (CUDA only, NaN on CPU): after the timing, one more call between
    ``torch.cuda.reset_peak_memory_stats()`` and ``torch.cuda.max_memory_allocated()``, minus
    ``torch.cuda.memory_allocated()`` just before it: the MiB the call needs on top of what
    already exists (inputs, parameters and, for bwd, the retained forward graph).
    FLOPs per differential head = 2 maps x (2 N M d for Q K^T + 2 N M 2d for P V) = 12 N M d;
    plain attention of the same width (2 heads of d) = 8 N M d, counted for sdpa_plain (so its
    TFLOPS is its own, and differential attention does 1.5x its work); halved when causal;
    backward x2.5, fwd_bwd x3.5. Layer level adds the four E x E projections (8 B N E^2
    forward, twice that backward). Model rows have tflops NaN.
    The SDPA backend that sdpa_x2 and sdpa_plain dispatch to (FLASH_ATTENTION,
    EFFICIENT_ATTENTION, CUDNN_ATTENTION or MATH) is recorded per op-level shape and dtype in
    the log and summary.md, not in the CSV.
    naive is skipped where its N x M maps would exceed a memory budget (16 bytes per map
    element against 60% of free GPU memory, 2 GiB on CPU); out-of-memory is recorded as a
    skip; both are listed in summary.md.

Outputs under --out (default benchmarks/out/):
    throughput.csv   one row per measurement, columns exactly COLUMNS. ``heads`` counts
                     differential heads (plain rows: half their heads, so widths match).
                     Model rows: level "model", mode infer_image / infer_text / train_step,
                     seq_len and heads/head_dim of the image tower (text tower for
                     infer_text), ms_* per batch, tflops NaN; samples/s = batch * 1000 / ms_p50
                     (shown in summary.md). Model rows run under autocast to the first selected
                     of bf16/fp16 (fp32 parameters; no autocast for fp32).
    speed_vs_seqlen.png, memory_vs_seqlen.png
                     the long sweep at op level, ms and MiB against seq_len per provider
                     (needs matplotlib; skipped with a message without it).
    summary.md       speed-up of diffattn over sdpa_x2 and its time relative to sdpa_plain per
                     shape, mode and dtype; model samples/s; the issue's targets as PASS / FAIL
                     / not measured; skips and failures. Printed last.

Without CUDA the fused kernels cannot run: the torch providers run at CPU sizes and the
diffattn provider is skipped, said plainly. With TRITON_INTERPRET=1 the kernels also run
through the Triton interpreter at one tiny op-level shape, as provider ``diffattn_interpreter``
(a correctness smoke run; its timings say nothing about the kernels' speed).

Exit status: 0, or 1 when a measurement failed with an error (out-of-memory and budget skips
are not failures).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from providers import (INTERPRETER_PROVIDER, MODEL_MODES, OP_MODES, PROVIDERS,  # noqa: E402
                       CPU_MODELS, GPU_MODELS, Bench, ModelNames, ProviderUnavailable, Shape,
                       attention_geometry, build_model, layer_bench, model_bench, op_bench)

COLUMNS = ("device", "torch", "triton", "level", "provider", "mode", "dtype", "batch",
           "seq_len", "heads", "head_dim", "causal", "ms_p50", "ms_p20", "ms_p80", "tflops",
           "peak_mem_mb")
LEVELS = ("op", "layer", "model")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANTILES = (0.5, 0.2, 0.8)
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
GPU_NAIVE_BUDGET_FRACTION = 0.6
CPU_NAIVE_BUDGET_BYTES = 2 * 2 ** 30
NAIVE_BYTES_PER_MAP_ELEMENT = 16
CPU_REPEATS = 5        # timed calls per measurement on CPU (3 with --quick)
CPU_NO_KERNELS = ("CUDA not available: the fused Triton kernels need a GPU; diffattn provider "
                  "skipped")
CSV_NAME, SUMMARY_NAME = "throughput.csv", "summary.md"
SPEED_PLOT, MEMORY_PLOT = "speed_vs_seqlen.png", "memory_vs_seqlen.png"


# ------------------------------------------------------------------------------ FLOPs
def attention_flops(kind: str, batch: int, heads: int, seq_q: int, seq_k: int, head_dim: int,
                    causal: bool, mode: str) -> float:
    """FLOPs of one call of the attention core.

    kind "diff": per differential head 2 maps x (2 N M d + 2 N M 2d) = 12 N M d.
    kind "plain": plain attention of the same width, 2 heads of d per differential head:
    2 x (2 N M d + 2 N M d) = 8 N M d. Halved when causal; mode scales by 1 (fwd),
    2.5 (bwd) or 3.5 (fwd_bwd).
    """
    per_head = {"diff": 12, "plain": 8}[kind] * seq_q * seq_k * head_dim
    return batch * heads * per_head * (0.5 if causal else 1.0) * MODE_FLOP_FACTOR[mode]


def projection_flops(batch: int, seq_len: int, width: int, mode: str) -> float:
    """FLOPs of the q, k, v and output projections (E x E each): 8 B N E^2 forward, twice that
    backward."""
    fwd = 8.0 * batch * seq_len * width * width
    return {"fwd": fwd, "bwd": 2 * fwd, "fwd_bwd": 3 * fwd}[mode]


def case_flops(level: str, provider: str, shape: Shape, mode: str) -> float:
    """FLOPs of one timed call at op or layer level (NaN at model level)."""
    if level == "model":
        return math.nan
    kind = "plain" if provider == "sdpa_plain" else "diff"
    flops = attention_flops(kind, shape.batch, shape.heads, shape.seq_len, shape.seq_len,
                            shape.head_dim, shape.causal, mode)
    if level == "layer":
        flops += projection_flops(shape.batch, shape.seq_len, shape.width, mode)
    return flops


# ------------------------------------------------------------------------------ shapes
def long_sweep(seq_lens: Sequence[int], tokens: int, heads: int, head_dims: Sequence[int],
               causals: Sequence[bool]) -> List[Shape]:
    return [Shape("long", tokens // n, n, heads, d, c)
            for c in causals for d in head_dims for n in seq_lens]


def op_shapes(on_cuda: bool, quick: bool) -> List[Shape]:
    if on_cuda:
        head = [Shape("clip_vision", 256, 197, 6, 64, False),
                Shape("clip_text", 256, 77, 4, 64, True)]
        if quick:
            return head + long_sweep((1024, 4096, 16384), 16384, 8, (64,), (False,))
        return head + [Shape("vit_l14_336", 64, 577, 8, 64, False)] + long_sweep(
            (512, 1024, 2048, 4096, 8192, 16384), 16384, 8, (64, 128), (False, True))
    head = [Shape("clip_vision", 1, 197, 6, 64, False), Shape("clip_text", 1, 77, 4, 64, True)]
    if quick:
        return head + long_sweep((128, 512), 512, 2, (64,), (False,))
    return head + [Shape("vit_l14_336", 1, 577, 8, 64, False)] + long_sweep(
        (128, 256, 512, 1024), 1024, 2, (64,), (False, True))


def layer_shapes(on_cuda: bool, quick: bool) -> List[Shape]:
    shapes = op_shapes(on_cuda, quick=True)[:2]
    if on_cuda and not quick:
        shapes += [Shape("vit_l14_336", 64, 577, 8, 64, False),
                   Shape("long", 4, 4096, 8, 64, False)]
    return shapes


INTERPRETER_SHAPE = Shape("interpreter_tiny", 1, 77, 2, 64, False)


def model_batch(on_cuda: bool, quick: bool) -> int:
    if on_cuda:
        return 64 if quick else 256
    return 2 if quick else 4


# ------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class Case:
    """One provider at one level on one problem and dtype; measured in each of ``modes``."""
    level: str
    provider: str
    shape: Shape
    dtype: str
    modes: tuple

    def label(self) -> str:
        what = f"batch={self.shape.batch}" if self.level == "model" else self.shape.label()
        return f"{self.level} {self.provider} {self.dtype} {what}"


def is_target_shape(shape: Shape) -> bool:
    """The shapes the issue's op-level targets are stated at (d=64, not causal)."""
    return (shape.head_dim == 64 and not shape.causal
            and (shape.name, shape.seq_len) in (("clip_vision", 197), ("long", 4096)))


def priority(case: Case, first_dtype: str) -> int:
    """Run order under a time limit: the targets' measurements first."""
    if case.dtype != first_dtype:
        return 3
    if case.level == "op" and is_target_shape(case.shape):
        return 0
    return 1 if case.level == "model" else 2


def naive_bytes(shape: Shape) -> int:
    """Estimated memory of the naive provider: both maps materialised, with the fp32 softmax,
    its cast and the backward's gradients (NAIVE_BYTES_PER_MAP_ELEMENT per map element)."""
    return (NAIVE_BYTES_PER_MAP_ELEMENT * shape.batch * 2 * shape.heads * shape.seq_len
            * shape.seq_len)


# ------------------------------------------------------------------------------ timing
class Timer:
    """Times a callable: triton.testing.do_bench on CUDA, perf_counter repeats on CPU."""

    def __init__(self, on_cuda: bool, warmup_ms: int, rep_ms: int, cpu_repeats: int):
        self.on_cuda = on_cuda
        self.warmup_ms, self.rep_ms, self.cpu_repeats = warmup_ms, rep_ms, cpu_repeats

    def time_ms(self, fn: Callable, leaves: Sequence[torch.Tensor]) -> List[float]:
        """[p50, p20, p80] in milliseconds."""
        if self.on_cuda:
            from triton.testing import do_bench
            return list(do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms,
                                 grad_to_none=list(leaves), quantiles=list(QUANTILES)))
        fn()
        times = []
        for _ in range(self.cpu_repeats):
            clear_grads(leaves)
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return torch.tensor(times, dtype=torch.float64).quantile(
            torch.tensor(QUANTILES, dtype=torch.float64)).tolist()

    def peak_mem_mb(self, fn: Callable, leaves: Sequence[torch.Tensor]) -> float:
        """MiB allocated at the peak of one call above what was allocated before it."""
        if not self.on_cuda:
            return math.nan
        clear_grads(leaves)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2 ** 20


def clear_grads(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


# ------------------------------------------------------------------------------ progress
class Progress:
    """A tqdm bar on an interactive terminal; one line per step otherwise (logs), so a run
    without tqdm or without a terminal still shows where it is."""

    def __init__(self, total: int):
        self.total, self.done = total, 0
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, desc="throughput", unit="case", file=sys.stderr)

    def step(self, label: str, seconds: float) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(label[:60])
            self.bar.update(1)
        else:
            print(f"[{self.done}/{self.total}] {label} ({seconds:.1f} s)", file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ------------------------------------------------------------------------------ running
@dataclass
class Environment:
    device: torch.device
    device_name: str
    torch_version: str
    triton_version: str
    interpret: bool

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"


def detect_environment() -> Environment:
    from diffattn.backend import INTERPRET
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    if torch.cuda.is_available() and not INTERPRET:
        device = torch.device("cuda")
        name = torch.cuda.get_device_name(device)
    else:
        device, name = torch.device("cpu"), "cpu"
    return Environment(device, name, torch.__version__, triton_version, INTERPRET)


@dataclass
class Report:
    """Everything a run learnt besides the CSV rows."""
    notes: List[str]
    skipped: List[tuple]      # (what, why)
    failed: List[tuple]       # (what, error)
    sdpa_backends: Dict[tuple, str]  # (shape label, dtype, provider) -> backend
    not_run: List[str] = field(default_factory=list)  # cases after a time limit or interrupt


class Runner:
    """Runs the plan, appending each measurement to the CSV as it comes."""

    def __init__(self, env: Environment, timer: Timer, writer: csv.DictWriter, stream,
                 report: Report, create_model: Optional[Callable], model_names: ModelNames,
                 naive_budget: float):
        self.env, self.timer, self.writer, self.stream = env, timer, writer, stream
        self.report = report
        self.create_model, self.model_names = create_model, model_names
        self.naive_budget = naive_budget
        self.rows: List[dict] = []

    def run(self, case: Case) -> None:
        if (case.provider == "naive" and case.level != "model"
                and naive_bytes(case.shape) > self.naive_budget):
            self.report.skipped.append((case.label(), (
                f"naive would need about {naive_bytes(case.shape) / 2 ** 30:.1f} GiB for its "
                f"N x N maps ({NAIVE_BYTES_PER_MAP_ELEMENT} bytes per map element), over the "
                f"budget of {self.naive_budget / 2 ** 30:.1f} GiB")))
            return
        try:
            self._measure(case)
        except ProviderUnavailable as exc:
            self.report.skipped.append((case.label(), f"unavailable: {exc}"))
        except torch.cuda.OutOfMemoryError:
            self.report.skipped.append((case.label(), "out of memory"))
        except Exception as exc:  # a broken provider must not stop the others: reported
            self.report.failed.append((case.label(), f"{type(exc).__name__}: {exc}"))
        finally:
            gc.collect()
            if self.env.on_cuda:
                torch.cuda.empty_cache()

    def _bench(self, case: Case) -> tuple:
        """(Bench, {mode: (batch, seq_len, heads, head_dim, causal)}) for the case."""
        dtype = DTYPES[case.dtype]
        if case.level == "model":
            return self._model_bench(case, dtype)
        build = op_bench if case.level == "op" else layer_bench
        bench = build(case.provider, case.shape, dtype, self.env.device, case.modes)
        s = case.shape
        geometry = {mode: (s.batch, s.seq_len, s.heads, s.head_dim, s.causal)
                    for mode in case.modes}
        return bench, geometry

    def _model_bench(self, case: Case, dtype: torch.dtype) -> tuple:
        try:
            model = build_model(case.provider, self.create_model, self.model_names,
                                self.env.device)
        except ValueError as exc:  # e.g. a config name this version of the models lacks
            raise ProviderUnavailable(str(exc)) from exc
        batch = case.shape.batch
        config = model.config
        image = (batch, 1 + config.vision.grid_size ** 2, *attention_geometry(model, "vision"),
                 False)
        text = (batch, config.text.context_length, *attention_geometry(model, "text"), True)
        geometry = {"infer_image": image, "infer_text": text, "train_step": image}
        return model_bench(model, batch, dtype, self.env.device, case.modes), geometry

    def _measure(self, case: Case) -> None:
        bench, geometry = self._bench(case)
        self._record_sdpa_backend(case, bench)
        for mode in case.modes:
            fn = bench.makers[mode]()
            p50, p20, p80 = self.timer.time_ms(fn, bench.leaves)
            peak = self.timer.peak_mem_mb(fn, bench.leaves)
            del fn
            batch, seq_len, heads, head_dim, causal = geometry[mode]
            flops = case_flops(case.level, case.provider, case.shape, mode)
            self._write({
                "device": self.env.device_name, "torch": self.env.torch_version,
                "triton": self.env.triton_version, "level": case.level,
                "provider": case.provider, "mode": mode, "dtype": case.dtype,
                "batch": batch, "seq_len": seq_len, "heads": heads, "head_dim": head_dim,
                "causal": causal, "ms_p50": p50, "ms_p20": p20, "ms_p80": p80,
                "tflops": flops / (p50 * 1e-3) / 1e12, "peak_mem_mb": peak,
                "shape": case.shape.name})  # "shape" is for the summary, not the CSV

    def _record_sdpa_backend(self, case: Case, bench: Bench) -> None:
        if bench.sdpa_backend is None or case.level != "op":
            return
        name = bench.sdpa_backend()
        self.report.sdpa_backends[(case.shape.label(), case.dtype, case.provider)] = name
        print(f"SDPA backend: {case.provider} {case.dtype} {case.shape.label()}: {name}",
              flush=True)

    def _write(self, row: dict) -> None:
        self.rows.append(row)
        self.writer.writerow({key: format_value(value) for key, value in row.items()})
        self.stream.flush()


def format_value(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


# ------------------------------------------------------------------------------ plan building
def build_plan(args, env: Environment, model_available: bool) -> List[Case]:
    on_cuda = env.on_cuda
    providers = [p for p in args.providers if on_cuda or p != "diffattn"]
    causal_ok = {"both": (False, True), "causal": (True,), "noncausal": (False,)}[args.causal]
    plan: List[Case] = []
    for dtype in args.dtype:
        for level in args.levels:
            if level == "model":
                continue
            shapes = op_shapes(on_cuda, args.quick) if level == "op" else \
                layer_shapes(on_cuda, args.quick)
            for shape in shapes:
                if shape.causal not in causal_ok:
                    continue
                plan += [Case(level, p, shape, dtype, tuple(args.modes)) for p in providers]
    if "model" in args.levels and model_available:
        dtype = next((d for d in args.dtype if d != "fp32"), args.dtype[0])
        batch = args.model_batch or model_batch(on_cuda, args.quick)
        shape = Shape("clip", batch, 0, 0, 0, False)
        plan += [Case("model", p, shape, dtype, MODEL_MODES) for p in providers]
    if env.interpret and "op" in args.levels and "diffattn" in args.providers:
        plan += [Case("op", INTERPRETER_PROVIDER, INTERPRETER_SHAPE, "fp32", tuple(args.modes))]
    order = {case: i for i, case in enumerate(plan)}
    return sorted(plan, key=lambda c: (priority(c, args.dtype[0]), order[c]))


def load_create_model(report: Report) -> Optional[Callable]:
    try:
        from diffattn.models import create_model
    except ImportError as exc:
        report.notes.append(f"model level unavailable: diffattn.models.create_model cannot be "
                            f"imported ({exc})")
        return None
    return create_model


# ------------------------------------------------------------------------------ plots
def write_plots(rows: List[dict], out: Path) -> List[str]:
    """Speed and memory against seq_len for the op-level long sweep; returns messages."""
    sweep = [r for r in rows if r["level"] == "op" and r["shape"] == "long"
             and r["provider"] in PROVIDERS]
    if not sweep:
        return ["plots: no long-sweep measurements, no plots written"]
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["plots skipped: matplotlib is not installed"]
    messages = []
    for metric, name, ylabel in (("ms_p50", SPEED_PLOT, "time per call, ms (median)"),
                                 ("peak_mem_mb", MEMORY_PLOT, "peak memory above inputs, MiB")):
        data = [r for r in sweep if not math.isnan(r[metric])]
        if not data:
            messages.append(f"plots: no {metric} numbers (none on CPU), {name} not written")
            continue
        modes = [m for m in OP_MODES if any(r["mode"] == m for r in data)]
        panels = sorted({(r["dtype"], r["head_dim"], r["causal"]) for r in data})
        fig, axes = plt.subplots(len(modes), len(panels), squeeze=False,
                                 figsize=(4.2 * len(panels), 3.4 * len(modes)))
        for i, mode in enumerate(modes):
            for j, (dtype, head_dim, causal) in enumerate(panels):
                ax = axes[i][j]
                for provider in PROVIDERS:
                    pts = sorted((r["seq_len"], r[metric]) for r in data
                                 if (r["mode"], r["dtype"], r["head_dim"], r["causal"],
                                     r["provider"]) == (mode, dtype, head_dim, causal, provider))
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=provider)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_title(f"{mode} {dtype} d={head_dim}{' causal' if causal else ''}",
                             fontsize=9)
                ax.set_xlabel("seq_len (batch x seq_len fixed)")
                ax.set_ylabel(ylabel, fontsize=8)
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=7)
        fig.suptitle(f"op level, long sweep: {data[0]['device']}")
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        messages.append(f"wrote {out / name}")
    return messages


# ------------------------------------------------------------------------------ summary
def fmt(x: Optional[float], spec: str = ".4g", suffix: str = "") -> str:
    return "—" if x is None or math.isnan(x) else format(x, spec) + suffix


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return None
    return a / b


def shape_key(row: dict) -> tuple:
    """What rows of different providers are compared on (at model level: mode, dtype, batch;
    the plain model's geometry is its own)."""
    if row["level"] == "model":
        return (row["level"], row["shape"], row["batch"], row["dtype"], row["mode"])
    return (row["level"], row["shape"], row["batch"], row["seq_len"], row["heads"],
            row["head_dim"], row["causal"], row["dtype"], row["mode"])


def grouped(rows: List[dict], level: str) -> Dict[tuple, Dict[str, dict]]:
    groups: Dict[tuple, Dict[str, dict]] = {}
    for row in rows:
        if row["level"] == level and row["provider"] in PROVIDERS:
            groups.setdefault(shape_key(row), {})[row["provider"]] = row
    return groups


def value(group: Dict[str, dict], provider: str, metric: str = "ms_p50") -> Optional[float]:
    row = group.get(provider)
    return None if row is None else row[metric]


def comparison_table(rows: List[dict], level: str) -> List[str]:
    groups = grouped(rows, level)
    if not groups:
        return []
    lines = [f"## {level.capitalize()} level",
             "",
             "ms = median per call; speed-up = sdpa_x2 time / diffattn time; diffattn / "
             "sdpa_plain = time ratio (1.5 = equal efficiency per FLOP); mem = peak MiB above "
             "the inputs.",
             "",
             "| shape | dtype | mode | diffattn ms | sdpa_x2 ms | naive ms | sdpa_plain ms | "
             "speed-up vs sdpa_x2 | diffattn / sdpa_plain | diffattn TFLOPS | "
             "mem diffattn / sdpa_x2 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, group in groups.items():
        _, name, batch, n, heads, d, causal, dtype, mode = key
        shape = f"{name} B={batch} N={n} H={heads} d={d}{' causal' if causal else ''}"
        mem = (f"{fmt(value(group, 'diffattn', 'peak_mem_mb'), '.0f')} / "
               f"{fmt(value(group, 'sdpa_x2', 'peak_mem_mb'), '.0f')}")
        lines.append(
            f"| {shape} | {dtype} | {mode} | {fmt(value(group, 'diffattn'))} | "
            f"{fmt(value(group, 'sdpa_x2'))} | {fmt(value(group, 'naive'))} | "
            f"{fmt(value(group, 'sdpa_plain'))} | "
            f"{fmt(ratio(value(group, 'sdpa_x2'), value(group, 'diffattn')), '.2f', 'x')} | "
            f"{fmt(ratio(value(group, 'diffattn'), value(group, 'sdpa_plain')), '.2f', 'x')} | "
            f"{fmt(value(group, 'diffattn', 'tflops'), '.1f')} | {mem} |")
    return lines + [""]


def samples_per_s(row: Optional[dict]) -> Optional[float]:
    return None if row is None else row["batch"] * 1e3 / row["ms_p50"]


def model_table(rows: List[dict]) -> List[str]:
    groups = grouped(rows, "model")
    if not groups:
        return []
    lines = ["## Model level (samples/s)", "",
             "| mode | dtype | batch | diffattn | sdpa_x2 | naive | sdpa_plain | "
             "diffattn / sdpa_plain | diffattn / naive |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, group in groups.items():
        _, _, batch, dtype, mode = key
        rate = {p: samples_per_s(group.get(p)) for p in PROVIDERS}
        lines.append(
            f"| {mode} | {dtype} | {batch} | "
            + " | ".join(fmt(rate[p], ".1f") for p in PROVIDERS)
            + f" | {fmt(ratio(rate['diffattn'], rate['sdpa_plain']), '.2f', 'x')}"
            f" | {fmt(ratio(rate['diffattn'], rate['naive']), '.2f', 'x')} |")
    return lines + [""]


@dataclass(frozen=True)
class Target:
    """One of the issue's targets (H100, bf16, d=64, non-causal)."""
    text: str
    level: str
    mode: str
    shape: Optional[tuple]          # (shape name, seq_len) or None at model level
    numerator: tuple                # (provider, metric)
    denominator: tuple
    op: str                         # ">=" or "<="
    bound: float


TARGETS = (
    Target("op fwd, speed-up over sdpa_x2 at N=197", "op", "fwd", ("clip_vision", 197),
           ("sdpa_x2", "ms_p50"), ("diffattn", "ms_p50"), ">=", 1.5),
    Target("op fwd, speed-up over sdpa_x2 at N=4096", "op", "fwd", ("long", 4096),
           ("sdpa_x2", "ms_p50"), ("diffattn", "ms_p50"), ">=", 1.15),
    Target("op fwd_bwd, speed-up over sdpa_x2 at N=197", "op", "fwd_bwd", ("clip_vision", 197),
           ("sdpa_x2", "ms_p50"), ("diffattn", "ms_p50"), ">=", 1.3),
    Target("op fwd_bwd, speed-up over sdpa_x2 at N=4096", "op", "fwd_bwd", ("long", 4096),
           ("sdpa_x2", "ms_p50"), ("diffattn", "ms_p50"), ">=", 1.1),
    Target("op fwd, diffattn time / sdpa_plain time at N=197", "op", "fwd",
           ("clip_vision", 197), ("diffattn", "ms_p50"), ("sdpa_plain", "ms_p50"), "<=", 1.5),
    Target("op fwd_bwd, peak memory diffattn / sdpa_x2 at N=4096", "op", "fwd_bwd",
           ("long", 4096), ("diffattn", "peak_mem_mb"), ("sdpa_x2", "peak_mem_mb"), "<=", 1.0),
    Target("model train_step, diffattn samples/s / plain CLIP's", "model", "train_step", None,
           ("sdpa_plain", "ms_p50"), ("diffattn", "ms_p50"), ">=", 0.95),
    Target("model train_step, diffattn samples/s / naive's", "model", "train_step", None,
           ("naive", "ms_p50"), ("diffattn", "ms_p50"), ">=", 1.5),
)


def evaluate_target(target: Target, rows: List[dict]) -> tuple:
    """(measured ratio or None, 'PASS' | 'FAIL' | 'not measured (...)')."""
    def find(provider: str) -> Optional[dict]:
        for r in rows:
            if (r["level"], r["mode"], r["provider"], r["dtype"]) != \
                    (target.level, target.mode, provider, "bf16"):
                continue
            if target.shape is None or ((r["shape"], r["seq_len"]) == target.shape
                                        and r["head_dim"] == 64 and not r["causal"]):
                return r
        return None
    num, den = find(target.numerator[0]), find(target.denominator[0])
    missing = [p for p, r in ((target.numerator[0], num), (target.denominator[0], den))
               if r is None]
    if missing:
        return None, f"not measured (no bf16 {' / '.join(missing)} row)"
    measured = ratio(num[target.numerator[1]], den[target.denominator[1]])
    if measured is None:
        return None, "not measured (no number on this device)"
    ok = measured >= target.bound if target.op == ">=" else measured <= target.bound
    return measured, "PASS" if ok else "FAIL"


def targets_table(rows: List[dict], env: Environment) -> List[str]:
    lines = ["## Targets (issue 5: H100, bf16, d=64, non-causal)", ""]
    if "H100" not in env.device_name and "H200" not in env.device_name:
        lines += [f"The targets are stated for an H100; this run is on {env.device_name}.", ""]
    lines += ["| target | measured | bound | result |", "|---|---|---|---|"]
    for target in TARGETS:
        measured, result = evaluate_target(target, rows)
        lines.append(f"| {target.text} | {fmt(measured, '.3f')} | {target.op} {target.bound} | "
                     f"{result} |")
    return lines + [""]


def backends_table(report: Report) -> List[str]:
    if not report.sdpa_backends:
        return []
    shapes: Dict[tuple, Dict[str, str]] = {}
    for (label, dtype, provider), name in report.sdpa_backends.items():
        shapes.setdefault((label, dtype), {})[provider] = name
    lines = ["## SDPA backends (op level)", "", "| shape | dtype | sdpa_x2 | sdpa_plain |",
             "|---|---|---|---|"]
    for (label, dtype), names in shapes.items():
        lines.append(f"| {label} | {dtype} | {names.get('sdpa_x2', '—')} | "
                     f"{names.get('sdpa_plain', '—')} |")
    return lines + [""]


def summary_markdown(rows: List[dict], env: Environment, report: Report, argv: List[str],
                     seconds: float) -> str:
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [f"# diffattn throughput: {env.device_name}", "",
             f"torch {env.torch_version}, triton {env.triton_version}, {date}, "
             f"{seconds:.0f} s, {len(rows)} measurements.",
             f"Command: `python benchmarks/throughput.py {' '.join(argv)}`", ""]
    if report.notes:
        lines += [f"- {note}" for note in report.notes] + [""]
    lines += targets_table(rows, env)
    lines += comparison_table(rows, "op") + comparison_table(rows, "layer") + model_table(rows)
    lines += backends_table(report)
    for title, items in (("Skipped", report.skipped), ("Failed", report.failed)):
        if items:
            lines += [f"## {title}", ""] + [f"- {what}: {why}" for what, why in items] + [""]
    if report.not_run:
        lines += ["## Not run", ""] + [f"- {label}" for label in report.not_run] + [""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ CLI
def comma_list(choices: Sequence[str]) -> Callable[[str], List[str]]:
    def parse(text: str) -> List[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        unknown = [t for t in items if t not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"unknown {unknown or 'empty list'}; choose from "
                                             f"{', '.join(choices)}")
        return items
    return parse


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short subset")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out",
                        help="output folder (default benchmarks/out/ of this repository)")
    parser.add_argument("--providers", type=comma_list(PROVIDERS), default=list(PROVIDERS),
                        help=f"comma list of {', '.join(PROVIDERS)}")
    parser.add_argument("--levels", type=comma_list(LEVELS), default=list(LEVELS),
                        help="comma list of op, layer, model")
    parser.add_argument("--dtype", type=comma_list(tuple(DTYPES)), default=None,
                        help="comma list of bf16, fp16, fp32 (default bf16,fp16 on CUDA, bf16 "
                             "with --quick; fp32 on CPU)")
    parser.add_argument("--modes", type=comma_list(OP_MODES), default=list(OP_MODES),
                        help="op/layer modes: comma list of fwd, bwd, fwd_bwd (model level "
                             "always measures infer_image, infer_text, train_step)")
    parser.add_argument("--causal", choices=("both", "causal", "noncausal"), default="both",
                        help="keep only causal or non-causal shapes")
    parser.add_argument("--warmup-ms", type=int, default=25, help="do_bench warm-up (CUDA)")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition (CUDA)")
    parser.add_argument("--model-batch", type=int, default=None,
                        help="model-level batch (default 256 on CUDA, 64 with --quick)")
    parser.add_argument("--time-limit-s", type=float, default=None,
                        help="start no new case after this many seconds; the rest is listed "
                             "as not run (the targets' cases run first)")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    started = time.perf_counter()
    env = detect_environment()
    if args.dtype is None:
        args.dtype = (["bf16"] if args.quick else ["bf16", "fp16"]) if env.on_cuda else ["fp32"]
    report = Report([], [], [], {})
    if not env.on_cuda:
        reason = CPU_NO_KERNELS if not torch.cuda.is_available() else (
            "TRITON_INTERPRET=1 is set, so the fused kernels cannot run compiled: running on "
            "CPU; diffattn provider skipped")
        report.notes += [reason, "CPU timings check that the harness and the torch "
                                 "providers run; they say nothing about GPU performance"]
        print(reason, flush=True)
        if env.interpret:
            report.notes.append(f"TRITON_INTERPRET=1: the fused kernels ran through the Triton "
                                f"interpreter at {INTERPRETER_SHAPE.label()} as provider "
                                f"{INTERPRETER_PROVIDER} (a smoke run, not a speed "
                                f"measurement)")
    create_model = load_create_model(report) if "model" in args.levels else None
    plan = build_plan(args, env, create_model is not None)
    names = GPU_MODELS if env.on_cuda else CPU_MODELS
    model_cases = [c for c in plan if c.level == "model"]
    if model_cases:
        autocast = "no autocast" if model_cases[0].dtype == "fp32" else \
            f"autocast to {model_cases[0].dtype}"
        report.notes.append(f"model level: {names.diff} (providers diffattn, sdpa_x2, naive) "
                            f"against {names.plain} (sdpa_plain), batch "
                            f"{model_cases[0].shape.batch}, fp32 parameters, {autocast}")
    timer = Timer(env.on_cuda, args.warmup_ms, args.rep_ms, 3 if args.quick else CPU_REPEATS)
    budget = (torch.cuda.mem_get_info()[0] * GPU_NAIVE_BUDGET_FRACTION if env.on_cuda
              else CPU_NAIVE_BUDGET_BYTES)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{len(plan)} cases on {env.device_name} (torch {env.torch_version}, triton "
          f"{env.triton_version}); writing to {args.out}", flush=True)

    not_run = []
    with open(args.out / CSV_NAME, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        runner = Runner(env, timer, writer, stream, report, create_model, names, budget)
        progress = Progress(len(plan))
        for index, case in enumerate(plan):
            if args.time_limit_s is not None and \
                    time.perf_counter() - started > args.time_limit_s:
                not_run = [(c, f"the time limit of {args.time_limit_s} s was reached")
                           for c in plan[index:]]
                break
            case_start = time.perf_counter()
            try:
                runner.run(case)
            except KeyboardInterrupt:  # e.g. gpu_check.sh's timeout: keep what was measured
                not_run = [(c, "the run was interrupted") for c in plan[index:]]
                break
            progress.step(case.label(), time.perf_counter() - case_start)
        progress.close()
    report.not_run = [case.label() for case, _ in not_run]
    if not_run:
        report.notes.append(f"{len(not_run)} of {len(plan)} cases not run: {not_run[0][1]} "
                            f"(listed under 'Not run')")
    for message in write_plots(runner.rows, args.out):
        print(message, flush=True)
    summary = summary_markdown(runner.rows, env, report, argv, time.perf_counter() - started)
    (args.out / SUMMARY_NAME).write_text(summary + "\n")
    print(f"wrote {args.out / CSV_NAME} ({len(runner.rows)} rows) and "
          f"{args.out / SUMMARY_NAME}\n", flush=True)
    print(summary, flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
