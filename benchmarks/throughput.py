"""Speed and memory of fused differential attention against plain and unfused attention, from
one tiny call to whole training steps.

    python benchmarks/throughput.py                 # full suite (GPU) / small CPU suite
    python benchmarks/throughput.py --quick         # the targets' measurements and a bit more
    python benchmarks/throughput.py --levels op --providers diffattn,sdpa_x2 --dtype bf16

Levels and providers (benchmarks/providers.py, host.py, model_providers.py):
    host   one tiny call (batch 1, seq_len 16, 1 head, head_dim 64): diffattn, sdpa_x2,
           diffattn_v2, flash_v2, and diffattn_no_launch / diffattn_v2_no_launch, the fused
           ops with every kernel launch a no-op, on CPU tensors (device
           "cpu (kernels not launched)"): the library's host cost, measurable anywhere.
    op     the attention core: diffattn, sdpa_x2 (two SDPA calls on views of the same tensors,
           one addcmul: the fair unfused baseline), torch_path (the library's PyTorch path),
           naive, sdpa_plain (plain attention of the same width), diffattn_v2, flash_v2
           (V2: one SDPA call over 2H heads with GQA, then the subtraction), torch_path_v2.
    layer  DiffMultiheadAttention-shaped layers: diffattn, sdpa_x2, torch_path, naive,
           sdpa_plain.
    decode one decoding step's attention (one query per sequence, forward) against a full
           KV cache of seq_len tokens (benchmarks/decode_providers.py): diffattn and
           diffattn_v2 (diff_attention[_v2]_with_kvcache, split-K chosen from the shape),
           their _paged variants (pages of 64 tokens), sdpa_x2 (V1 as two SDPA calls on the
           cache), flash_v2 (V2 as one SDPA call over 2H heads on the cache: plain
           attention's decode), torch_path, torch_path_v2. GPU: B in {1, 8, 64} x cache in
           {1k, 8k, 64k} (up to 512k cached tokens), H=8 d=64; CPU: tiny caches (and the
           fused paths through the interpreter as *_interpreter with TRITON_INTERPRET=1).
    varlen sequences of different lengths, packed (diff_attention[_v2]_varlen: diffattn_packed,
           diffattn_v2_packed) against padded to the longest with a key padding mask
           (diffattn_padded, diffattn_v2_padded), and the same through the torch path
           (torch_path[_v2]_packed / _padded) (benchmarks/varlen_providers.py). GPU: 16
           sequences of 1024 tokens (equal lengths) and of up to 2048 (varied lengths), H=8
           d=64, causal (without --quick also not causal, and 64 sequences of up to 1024 at
           d=128); CPU: 4 short sequences (the fused ones through the interpreter as
           *_interpreter with TRITON_INTERPRET=1). FLOPs count the real tokens only.
    transformers  Hugging Face transformers' DiffLlama (random weights) generating greedily
           from one prompt (benchmarks/transformers_providers.py): hf_eager and hf_sdpa
           (transformers' own attention implementations) against the same model fused by
           diffattn.integrations.transformers, diffattn (fused kernels, GPU) and torch_path
           (the PyTorch path); modes prefill (ms to the first token) and decode (ms per
           further token, the median step). GPU: a 1B-shaped model at prompts 128 and 1024; CPU: the
           tiny model at prompt 128 (--quick), also prompt 1024 and a small model. Needs the
           optional extra diffattn[transformers] (skipped without it).
    cpu    (only when named in --levels) the library's PyTorch path against plain attention
           on the CPU, as throughput ratios measured in one process, interleaved, minimum of
           --cpu-rounds rounds, at each of --cpu-threads: DiffCLIP-ViT-B-16's image and text
           towers against open_clip's plain ViT-B-16 (or, where open_clip does not import, a
           plain ViT-B-16 computing what open_clip's towers compute), one decoding step's
           attention against two SDPA calls on the same cache (benchmarks/cpu_compare.py);
           written to cpu_compare.csv / cpu_compare.md and appended to summary.md.
           --cpu-tiny: tiny shapes (a smoke run).
    model  training and inference steps of one tower: train_image (diffattn = DiffCLIP,
           torch_path, sdpa_plain = plain CLIP, timm, timm_diff, timm_diff_fused),
           train_text and infer_text (diffattn, torch_path, sdpa_plain) at seq_len 77 and 20;
           the same with ``_compiled`` (torch.compile, default mode) and
           ``_compiled_cudagraphs`` (mode="reduce-overhead") appended to the mode.

Shapes (``heads`` = differential heads H, i.e. 2H softmax maps of width d):
    GPU op   clip_vision  B=256 N=197 H=6 d=64          (CLIP ViT-B/16 image tower)
             clip_text    B=256 N=77  H=4 d=64 causal   (CLIP text tower)
             vit_l_336    B=64  N=577 H=8 d=128
             long         N in {1024, 4096, 16384}, B = 16384 // N, H=8, d=64, causal and not;
                          N=4096 d=128 B=4 H=8
             without --quick also the long sweep N = 512 .. 16384 at d in {64, 128}, causal
             and not. Layer level: clip_vision, clip_text (without --quick also vit_l_336 and
             long N=4096 d=64). Model level: ViT-B/16 towers (DiffCLIP-ViT-B-16, ViT-B-16,
             timm vit_base_patch16_224), image batch 128, text batch 256.
    CPU      the same kinds at small sizes: batch 1, long N in {128, 512} over 512 tokens with
             H=2 (without --quick: N = 128 .. 1024 over 1024 tokens, causal and not, and
             vit_l_336); model level the tiny configs (DiffCLIP-Tiny, CLIP-Tiny, a timm ViT of
             the same size) at image batch 4, text batch 8; no compiled modes unless
             --compile is given. The fused kernels cannot run: diffattn, diffattn_v2 and
             timm_diff_fused are left out, torch_path and torch_path_v2 measure the library.
             With TRITON_INTERPRET=1 the kernels also run through the Triton interpreter at
             one tiny shape (B=1 N=77 H=2 d=64, fp32) as diffattn_interpreter and
             diffattn_v2_interpreter, beside torch_path and torch_path_v2 at that shape (a
             smoke run: interpreter timings say nothing about the kernels' speed).

Method:
    op, layer  modes fwd (forward with autograd on, as in training), fwd_bwd (forward and
        backward of a fixed random output gradient) and, on request, bwd (the backward alone
        through one retained graph). Gradients reset to None between calls. CUDA:
        ``triton.testing.do_bench`` (L2 cleared before each call), ms_p50 / ms_p20 / ms_p80
        its median and 20th / 80th percentiles; Triton compilation and tile choice happen in
        its first, untimed call. CPU: perf_counter around each of a few calls after one
        warm-up call.
    host  fwd (under no_grad) and fwd_bwd (forward, then torch.autograd.grad into every
        input): ms = wall time per call of a loop of --host-calls back-to-back calls with no
        synchronisation inside it (one before, one after), after warm-up; percentiles over
        --host-loops loops.
    model  one step = forward under autocast (bf16, or the first selected low-precision dtype;
        none for fp32), loss, backward, AdamW step (fused where available, else foreach) for
        train_*; forward under no_grad for infer_*. The first step is timed apart (for compiled
        modes: compilation) and listed in the summary; then --model-warmup steps, then
        --model-steps steps back to back, each timed by CUDA events between steps with no
        synchronisation until the last (perf_counter on CPU).
    peak_mem_mb (CUDA only, NaN on CPU): one more call between
        ``torch.cuda.reset_peak_memory_stats()`` and ``torch.cuda.max_memory_allocated()``,
        minus ``torch.cuda.memory_allocated()`` just before it: the MiB the call needs on top of
        what already exists (inputs, parameters, optimizer state, a retained graph for bwd).
    FLOPs per differential head: V1 = 2 maps x (2 N M d for Q K^T + 2 N M 2d for P V)
        = 12 N M d; V2 and plain attention of the same width (2 heads of d) = 8 N M d; halved
        when causal; backward x2.5, fwd_bwd x3.5. Layer level adds the four E x E projections
        (8 B N E^2 forward, twice that backward). Model rows have tflops NaN.
    The SDPA backend of each SDPA provider per op-level shape and dtype is in the log and
    summary.md; the tile configuration the fused kernels used per call class and length
    bucket, and where it came from, is in summary.md.
    naive is skipped where its N x M maps would exceed a memory budget (16 bytes per map
    element against 60% of free GPU memory, 2 GiB on CPU); out-of-memory is recorded as a skip.
    --time-limit-s: cases run in priority order (the targets' measurements first: host level,
    the target op shapes, the eager model steps, the other op shapes, the compiled image
    step, ...) and no case starts that would not end before the limit by its rough expected
    duration; the rest is listed as not run.

Outputs under --out (default benchmarks/out/):
    throughput.csv   one row per measurement, columns exactly COLUMNS. ``heads`` counts
                     differential heads (plain attention: half its heads, so widths match).
                     Model rows: seq_len / heads / head_dim of the tower's attention, ms per
                     step, samples/s = batch * 1000 / ms_p50 (in summary.md).
    speed_vs_seqlen.png, memory_vs_seqlen.png   the op-level long sweep (needs matplotlib).
    summary.md       the targets (benchmarks/targets.json) as PASS / FAIL / not measured,
                     then host, op, layer and model tables, first-step (compile) times, tile
                     configurations, SDPA backends, skips and failures. Printed last.

Exit status: 0; 1 when a measurement failed with an error (skips are not failures); 2 for bad
arguments.
"""
from __future__ import annotations

import argparse
import csv
import functools
import gc
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from arguments import (CliParser, add_do_bench_arguments, comma_list,  # noqa: E402
                       positive_float, positive_int)
from decode_providers import (DECODE_FUSED, DECODE_INTERPRETER_PROVIDERS,  # noqa: E402
                              DECODE_INTERPRETER_SHAPE, DECODE_PROVIDERS, decode_bench,
                              decode_flop_kind, decode_shapes)
from varlen_providers import (VARLEN_FUSED, VARLEN_INTERPRETER_PROVIDERS,  # noqa: E402
                              VARLEN_INTERPRETER_SHAPE, VARLEN_PROVIDERS, sequence_lengths,
                              varlen_bench, varlen_flop_kind, varlen_shapes)
from transformers_providers import (SPECS, TRANSFORMERS_FUSED,  # noqa: E402
                                     TRANSFORMERS_MODES, TRANSFORMERS_PROVIDERS, build_model,
                                     prompt, time_round, transformers_shapes)
from host import (HOST_MODES, HOST_PROVIDERS, HOST_SHAPE, NO_LAUNCH_PROVIDERS,  # noqa: E402
                  host_device_label, run_host_case)
from model_providers import (CPU_SPEC, GPU_SPEC, MODEL_PROVIDERS, TEXT_PROVIDERS,  # noqa: E402
                             ModelSpec, base_mode, model_step)
from plots import write_plots  # noqa: E402
from providers import (FUSED_PROVIDERS, INTERPRETER_PROVIDERS, LAYER_PROVIDERS,  # noqa: E402
                       OP_MODES, OP_PROVIDERS, V2_PROVIDERS, Bench, ProviderUnavailable, Shape,
                       layer_bench, op_bench)
from summary import Report, summary_markdown  # noqa: E402
from timing import (Timer, peak_mem_mb, quantiles_ms, time_back_to_back,  # noqa: E402
                    time_steps)

COLUMNS = ("device", "torch", "triton", "level", "provider", "mode", "dtype", "batch",
           "seq_len", "heads", "head_dim", "causal", "ms_p50", "ms_p20", "ms_p80", "tflops",
           "peak_mem_mb")
LEVELS = ("host", "op", "layer", "decode", "varlen", "model", "transformers", "cpu")
DEFAULT_LEVELS = LEVELS[:-1]   # "cpu" runs only when asked for
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ALL_PROVIDERS = tuple(dict.fromkeys(
    HOST_PROVIDERS + tuple(NO_LAUNCH_PROVIDERS) + OP_PROVIDERS + tuple(INTERPRETER_PROVIDERS)
    + LAYER_PROVIDERS + DECODE_PROVIDERS + tuple(DECODE_INTERPRETER_PROVIDERS)
    + VARLEN_PROVIDERS + tuple(VARLEN_INTERPRETER_PROVIDERS) + MODEL_PROVIDERS
    + TRANSFORMERS_PROVIDERS))
COMPILE_CHOICES = {"default": "_compiled", "cudagraphs": "_compiled_cudagraphs"}
MODE_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
GPU_NAIVE_BUDGET_FRACTION = 0.6
CPU_NAIVE_BUDGET_BYTES = 2 * 2 ** 30
NAIVE_BYTES_PER_MAP_ELEMENT = 16
CPU_REPEATS = 5        # timed calls per op/layer measurement on CPU (3 with --quick)
CPU_NO_KERNELS = ("CUDA not available: the fused Triton kernels need a GPU; diffattn, "
                  "diffattn_v2 and timm_diff_fused skipped (torch_path and torch_path_v2 "
                  "measure the library's own code; diffattn_no_launch its host cost)")
CSV_NAME, SUMMARY_NAME = "throughput.csv", "summary.md"
INTERPRETER_SHAPE = Shape("interpreter_tiny", 1, 77, 2, 64, False)
# Rough seconds a case takes on a GPU, compilation included, for --time-limit-s.
EXPECTED_S = {"host": 10.0, "op": 4.0, "layer": 5.0, "decode": 3.0, "varlen": 4.0,
              "model": 15.0, "transformers": 20.0,
              "model_compiled": 100.0}


# ------------------------------------------------------------------------------ FLOPs
def attention_flops(kind: str, batch: int, heads: int, seq_q: int, seq_k: int, head_dim: int,
                    causal: bool, mode: str) -> float:
    """FLOPs of one call of the attention core.

    kind "diff" (V1): per differential head 2 maps x (2 N M d + 2 N M 2d) = 12 N M d.
    kind "plain" (plain attention of the same width, 2 heads of d per differential head) and
    "v2" (two maps of width d): 2 x (2 N M d + 2 N M d) = 8 N M d. Halved when causal; mode
    scales by 1 (fwd), 2.5 (bwd) or 3.5 (fwd_bwd).
    """
    per_head = {"diff": 12, "plain": 8, "v2": 8}[kind] * seq_q * seq_k * head_dim
    return batch * heads * per_head * (0.5 if causal else 1.0) * MODE_FLOP_FACTOR[mode]


def projection_flops(batch: int, seq_len: int, width: int, mode: str) -> float:
    """FLOPs of the q, k, v and output projections (E x E each): 8 B N E^2 forward, twice that
    backward."""
    fwd = 8.0 * batch * seq_len * width * width
    return {"fwd": fwd, "bwd": 2 * fwd, "fwd_bwd": 3 * fwd}[mode]


def flop_kind(provider: str) -> str:
    if provider == "sdpa_plain":
        return "plain"
    return "v2" if NO_LAUNCH_PROVIDERS.get(provider, provider) in V2_PROVIDERS else "diff"


def case_flops(level: str, provider: str, shape: Shape, mode: str) -> float:
    """FLOPs of one timed call at host, op or layer level (NaN at model level)."""
    if level == "model":
        return math.nan
    if level == "decode":  # one query per sequence against seq_len cached keys
        return attention_flops(decode_flop_kind(provider), shape.batch, shape.heads, 1,
                               shape.seq_len, shape.head_dim, False, mode)
    if level == "varlen":  # the real tokens' work: sequence b costs as one of N_b tokens
        return sum(attention_flops(varlen_flop_kind(provider), 1, shape.heads, n, n,
                                   shape.head_dim, shape.causal, mode)
                   for n in sequence_lengths(shape))
    flops = attention_flops(flop_kind(provider), shape.batch, shape.heads, shape.seq_len,
                            shape.seq_len, shape.head_dim, shape.causal, mode)
    if level == "layer":
        flops += projection_flops(shape.batch, shape.seq_len, shape.width, mode)
    return flops


# ------------------------------------------------------------------------------ shapes
def long_sweep(seq_lens: Sequence[int], tokens: int, heads: int, head_dims: Sequence[int],
               causals: Sequence[bool]) -> List[Shape]:
    return [Shape("long", tokens // n, n, heads, d, c)
            for c in causals for d in head_dims for n in seq_lens]


def op_shapes(on_cuda: bool, quick: bool) -> List[Shape]:
    """Op-level shapes; on a GPU the first ones are the targets' shapes."""
    if on_cuda:
        shapes = [Shape("clip_vision", 256, 197, 6, 64, False),
                  Shape("clip_text", 256, 77, 4, 64, True),
                  Shape("vit_l_336", 64, 577, 8, 128, False)]
        shapes += long_sweep((1024, 4096, 16384), 16384, 8, (64,), (False, True))
        shapes += [Shape("long", 4, 4096, 8, 128, False)]
        if not quick:
            shapes += long_sweep((512, 1024, 2048, 4096, 8192, 16384), 16384, 8, (64, 128),
                                 (False, True))
        return list(dict.fromkeys(shapes))
    shapes = [Shape("clip_vision", 1, 197, 6, 64, False), Shape("clip_text", 1, 77, 4, 64, True)]
    if quick:
        return shapes + long_sweep((128, 512), 512, 2, (64,), (False,))
    return shapes + [Shape("vit_l_336", 1, 577, 8, 128, False)] + long_sweep(
        (128, 256, 512, 1024), 1024, 2, (64,), (False, True))


def layer_shapes(on_cuda: bool, quick: bool) -> List[Shape]:
    shapes = op_shapes(on_cuda, quick=True)[:2]
    if on_cuda and not quick:
        shapes += [Shape("vit_l_336", 64, 577, 8, 128, False),
                   Shape("long", 4, 4096, 8, 64, False)]
    return shapes


def is_target_shape(shape: Shape) -> bool:
    """The op shapes the speed targets are stated at (d=64, not causal, N=197 or 4096)."""
    return (shape.head_dim == 64 and not shape.causal
            and (shape.name, shape.seq_len) in (("clip_vision", 197), ("long", 4096)))


def transformers_shape(shape) -> Shape:
    """A transformers-level measurement as a Shape: name = the model spec, seq_len = the
    prompt, heads = differential heads, causal."""
    spec = SPECS[shape.spec]
    return Shape(shape.spec, shape.batch, shape.seq_len, spec.heads // 2, spec.head_dim, True)


# ------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class Case:
    """One provider at one level on one problem and dtype; measured in each of ``modes``.
    Model level: ``shape.seq_len`` is the text length (text modes) and ``modes`` one mode."""
    level: str
    provider: str
    shape: Shape
    dtype: str
    modes: tuple

    def label(self) -> str:
        if self.level == "model":
            what = f"{self.modes[0]} batch={self.shape.batch}"
            if "text" in self.modes[0]:
                what += f" seq_len={self.shape.seq_len}"
        else:
            what = self.shape.label()
        return f"{self.level} {self.provider} {self.dtype} {what}"

    @property
    def compiled(self) -> bool:
        return self.level == "model" and "_compiled" in self.modes[0]

    def expected_s(self) -> float:
        return EXPECTED_S["model_compiled" if self.compiled else self.level]


TARGET_OP_PROVIDERS = ("diffattn", "sdpa_x2", "sdpa_plain", "diffattn_v2", "flash_v2")
TARGET_MODEL_PROVIDERS = ("diffattn", "sdpa_plain", "timm", "timm_diff", "timm_diff_fused")


def priority(case: Case, first_dtype: str) -> int:
    """Run order under a time limit, the targets' measurements first."""
    if case.dtype != first_dtype:
        return 9
    mode = case.modes[0]
    if case.level == "host":
        return 0 if case.provider in ("diffattn", "sdpa_x2") else 5
    if case.level == "op":
        if is_target_shape(case.shape) and case.provider in TARGET_OP_PROVIDERS:
            return 1
        return 3 if case.provider in FUSED_PROVIDERS + ("sdpa_x2", "flash_v2") else 5
    if case.level == "model":
        if mode == "train_image":
            return 2 if case.provider in TARGET_MODEL_PROVIDERS else 5
        if mode == "train_text":
            return 2 if case.provider in ("diffattn", "sdpa_plain") else 5
        if mode == "train_image_compiled":
            return 4 if case.provider in ("diffattn", "timm") else 6
        if mode.endswith("_cudagraphs"):
            return 8
        return 6 if case.compiled else 5
    if case.level == "decode":
        return 3 if case.provider in DECODE_FUSED + ("sdpa_x2", "flash_v2") else 5
    if case.level == "varlen":
        return 3 if case.provider in VARLEN_FUSED else 5
    if case.level == "transformers":
        return 5 if case.provider in TRANSFORMERS_FUSED + ("hf_sdpa", "torch_path") else 6
    return 7  # layer level


def naive_bytes(shape: Shape) -> int:
    """Estimated memory of the naive provider: both maps materialised, with the fp32 softmax,
    its cast and the backward's gradients (NAIVE_BYTES_PER_MAP_ELEMENT per map element)."""
    return (NAIVE_BYTES_PER_MAP_ELEMENT * shape.batch * 2 * shape.heads * shape.seq_len
            * shape.seq_len)


def selected(provider: str, chosen: Sequence[str]) -> bool:
    """Whether a provider is in the --providers list; the no-launch and interpreter variants
    of a fused provider come with it."""
    base = NO_LAUNCH_PROVIDERS.get(provider, INTERPRETER_PROVIDERS.get(
        provider, DECODE_INTERPRETER_PROVIDERS.get(
            provider, VARLEN_INTERPRETER_PROVIDERS.get(provider, provider))))
    return provider in chosen or base in chosen


def model_cases(args, spec: ModelSpec, on_cuda: bool, dtype: str) -> List[Case]:
    suffixes = [""] + [COMPILE_CHOICES[c] for c in args.compile]
    cases = []
    for suffix in suffixes:
        for provider in MODEL_PROVIDERS:
            if not on_cuda and provider in ("diffattn", "timm_diff_fused"):
                continue
            if not on_cuda and suffix == "_compiled_cudagraphs":
                continue
            cases.append(Case("model", provider,
                              Shape("vision", spec.image_batch, 0, 0, 0, False), dtype,
                              ("train_image" + suffix,)))
        for mode in ("train_text", "infer_text"):
            for seq_len in spec.text_lengths:
                for provider in TEXT_PROVIDERS:
                    if not on_cuda and provider == "diffattn":
                        continue
                    cases.append(Case("model", provider,
                                      Shape("text", spec.text_batch, seq_len, 0, 0, True), dtype,
                                      (mode + suffix,)))
    return cases


def build_plan(args, on_cuda: bool, interpret: bool, model_available: bool) -> List[Case]:
    """Every case of this run, in priority order (see priority)."""
    causal_ok = {"both": (False, True), "causal": (True,), "noncausal": (False,)}[args.causal]
    plan: List[Case] = []
    low_precision = [d for d in args.dtype if d != "fp32"]
    if "host" in args.levels:
        host_dtype = low_precision[0] if low_precision else "bf16"
        providers = list(HOST_PROVIDERS if on_cuda else ("sdpa_x2", "flash_v2"))
        providers += list(NO_LAUNCH_PROVIDERS)
        plan += [Case("host", p, HOST_SHAPE, host_dtype, HOST_MODES) for p in providers]
    for dtype in args.dtype:
        for level, names in (("op", OP_PROVIDERS), ("layer", LAYER_PROVIDERS)):
            if level not in args.levels:
                continue
            names = [p for p in names if on_cuda or p not in FUSED_PROVIDERS]
            shapes = op_shapes(on_cuda, args.quick) if level == "op" else \
                layer_shapes(on_cuda, args.quick)
            for shape in shapes:
                if shape.causal in causal_ok:
                    plan += [Case(level, p, shape, dtype, tuple(args.modes)) for p in names]
    if "decode" in args.levels:
        for dtype in args.dtype:
            plan += [Case("decode", p, shape, dtype, ("fwd",))
                     for shape in decode_shapes(on_cuda, args.quick) for p in DECODE_PROVIDERS
                     if on_cuda or p not in DECODE_FUSED]
        if interpret:
            plan += [Case("decode", p, DECODE_INTERPRETER_SHAPE, "fp32", ("fwd",))
                     for p in DECODE_INTERPRETER_PROVIDERS]
    if "varlen" in args.levels:
        for dtype in args.dtype:
            plan += [Case("varlen", p, shape, dtype, tuple(args.modes))
                     for shape in varlen_shapes(on_cuda, args.quick) for p in VARLEN_PROVIDERS
                     if shape.causal in causal_ok and (on_cuda or p not in VARLEN_FUSED)]
        if interpret:
            plan += [Case("varlen", p, VARLEN_INTERPRETER_SHAPE, "fp32", tuple(args.modes))
                     for p in VARLEN_INTERPRETER_PROVIDERS]
    if "model" in args.levels and model_available:
        dtype = low_precision[0] if low_precision else args.dtype[0]
        spec = GPU_SPEC if on_cuda else CPU_SPEC
        spec = ModelSpec(spec.diff, spec.plain, spec.timm, spec.timm_kwargs,
                         args.image_batch or spec.image_batch, args.text_batch or spec.text_batch,
                         spec.text_lengths)
        plan += model_cases(args, spec, on_cuda, dtype)
    if "transformers" in args.levels:
        for dtype in args.dtype:
            plan += [Case("transformers", p, transformers_shape(shape), dtype,
                          TRANSFORMERS_MODES)
                     for shape in transformers_shapes(on_cuda, args.quick)
                     for p in TRANSFORMERS_PROVIDERS if on_cuda or p not in TRANSFORMERS_FUSED]
    if interpret and "op" in args.levels:
        names = list(INTERPRETER_PROVIDERS) + ["torch_path", "torch_path_v2"]
        plan += [Case("op", p, INTERPRETER_SHAPE, "fp32", tuple(args.modes)) for p in names]
    plan = [c for c in plan if selected(c.provider, args.providers)]
    order = {case: i for i, case in enumerate(plan)}
    return sorted(plan, key=lambda c: (priority(c, args.dtype[0] if c.level != "host"
                                                else c.dtype), order[c]))


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


class Runner:
    """Runs the plan, appending each measurement to the CSV as it comes."""

    def __init__(self, env: Environment, args, writer: Optional[csv.DictWriter], stream,
                 report: Report, create_model: Optional[Callable], naive_budget: float):
        self.env, self.args, self.writer, self.stream = env, args, writer, stream
        self.report = report
        self.create_model = create_model
        self.naive_budget = naive_budget
        self.rows: List[dict] = []
        self.models: dict = {}  # provider -> model, reused across model cases
        quick = getattr(args, "quick", False)
        self.timer = Timer(env.on_cuda, getattr(args, "warmup_ms", 25),
                           getattr(args, "rep_ms", 100), 3 if quick else CPU_REPEATS)

    def run(self, case: Case) -> None:
        if (case.provider == "naive" and case.level != "model"
                and naive_bytes(case.shape) > self.naive_budget):
            self.report.skipped.append((case.label(), (
                f"naive would need about {naive_bytes(case.shape) / 2 ** 30:.1f} GiB for its "
                f"N x N maps ({NAIVE_BYTES_PER_MAP_ELEMENT} bytes per map element), over the "
                f"budget of {self.naive_budget / 2 ** 30:.1f} GiB")))
            return
        try:
            if case.level == "host":
                self._measure_host(case)
            elif case.level == "model":
                self._measure_model(case)
            elif case.level == "transformers":
                self._measure_transformers(case)
            else:
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

    def _row(self, case: Case, mode: str, geometry: tuple, times: Sequence[float], flops: float,
             peak: float, device: Optional[str] = None) -> None:
        batch, seq_len, heads, head_dim, causal = geometry
        p50, p20, p80 = times
        self._write({
            "device": device or self.env.device_name, "torch": self.env.torch_version,
            "triton": self.env.triton_version, "level": case.level, "provider": case.provider,
            "mode": mode, "dtype": case.dtype, "batch": batch, "seq_len": seq_len,
            "heads": heads, "head_dim": head_dim, "causal": causal, "ms_p50": p50,
            "ms_p20": p20, "ms_p80": p80, "tflops": flops / (p50 * 1e-3) / 1e12,
            "peak_mem_mb": peak, "shape": case.shape.name})  # "shape": summary only

    def _geometry(self, shape: Shape) -> tuple:
        return shape.batch, shape.seq_len, shape.heads, shape.head_dim, shape.causal

    def _measure_host(self, case: Case) -> None:
        quick = getattr(self.args, "quick", False)
        timer = functools.partial(time_back_to_back, calls=self.args.host_calls,
                                  loops=self.args.host_loops, warmup_calls=20 if quick else 50)
        for mode in case.modes:
            times, peak = run_host_case(case.provider, mode, DTYPES[case.dtype],
                                        self.env.device, timer, peak=peak_mem_mb)
            self._row(case, mode, self._geometry(case.shape), times,
                      case_flops("host", case.provider, case.shape, mode), peak,
                      host_device_label(case.provider, self.env.device_name))

    def _measure(self, case: Case) -> None:
        if case.level == "decode":
            bench = decode_bench(case.provider, case.shape, DTYPES[case.dtype], self.env.device)
        elif case.level == "varlen":
            bench = varlen_bench(case.provider, case.shape, DTYPES[case.dtype], self.env.device,
                                 case.modes)
        else:
            build = op_bench if case.level == "op" else layer_bench
            bench = build(case.provider, case.shape, DTYPES[case.dtype], self.env.device,
                          case.modes)
        self._record_sdpa_backend(case, bench)
        for mode in case.modes:
            fn = bench.makers[mode]()
            times = self.timer.time_ms(fn, bench.leaves)
            peak = self.timer.peak_mem_mb(fn, bench.leaves)
            del fn
            self._row(case, mode, self._geometry(case.shape), times,
                      case_flops(case.level, case.provider, case.shape, mode), peak)

    def _measure_model(self, case: Case) -> None:
        mode = case.modes[0]
        _, compile_mode = base_mode(mode)
        if compile_mode is not None:
            torch._dynamo.reset()
        spec = GPU_SPEC if self.env.on_cuda else CPU_SPEC
        spec = ModelSpec(spec.diff, spec.plain, spec.timm, spec.timm_kwargs,
                         case.shape.batch if case.shape.name == "vision" else spec.image_batch,
                         case.shape.batch if case.shape.name == "text" else spec.text_batch,
                         spec.text_lengths)
        measured, model = model_step(case.provider, mode, case.shape.seq_len, spec,
                                     DTYPES[case.dtype], self.env.device, self.create_model,
                                     self.args.compile_backend,
                                     model=self.models.get(case.provider))
        self.models[case.provider] = model
        start = time.perf_counter()
        measured.step()
        if self.env.on_cuda:
            torch.cuda.synchronize()
        self.report.compile_s[case.label()] = time.perf_counter() - start
        for note in measured.notes:
            text = f"model {mode}: {note}"
            if text not in self.report.notes:
                self.report.notes.append(text)
        times = time_steps(measured.step, self.env.device, steps=self.args.model_steps,
                           warmup_steps=self.args.model_warmup)
        peak = peak_mem_mb(measured.step) if self.env.on_cuda else math.nan
        self._row(case, mode, measured.geometry, times, math.nan, peak)

    def _measure_transformers(self, case: Case) -> None:
        """prefill and decode (ms per token) of greedy generate, quantiles over rounds."""
        spec = SPECS[case.shape.name]
        model = build_model(case.provider, spec, DTYPES[case.dtype], self.env.device)
        ids = prompt(case.shape.batch, case.shape.seq_len, spec.vocab, self.env.device)
        time_round(model, ids, tokens=2)  # warm-up (kernel compilation on a GPU)
        rounds = [time_round(model, ids) for _ in range(self.timer.cpu_repeats)]
        for index, mode in enumerate(TRANSFORMERS_MODES):  # time_round's first two
            times = quantiles_ms([r[index] for r in rounds])
            self._row(case, mode, self._geometry(case.shape), times, math.nan, math.nan)

    def _record_sdpa_backend(self, case: Case, bench: Bench) -> None:
        if bench.sdpa_backend is None or case.level != "op":
            return
        name = bench.sdpa_backend()
        self.report.sdpa_backends[(case.shape.label(), case.dtype, case.provider)] = name
        print(f"SDPA backend: {case.provider} {case.dtype} {case.shape.label()}: {name}",
              flush=True)

    def _write(self, row: dict) -> None:
        self.rows.append(row)
        if self.writer is not None:
            self.writer.writerow({key: format_value(value) for key, value in row.items()})
            self.stream.flush()


def format_value(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def tile_choices(env: Environment) -> List[tuple]:
    """(kernel, class, bucket, config, source) for every tile choice the fused kernels made in
    this process; source: "tuned table", "timed on first call", "first candidate" or
    "interpreter"."""
    try:
        from diffattn.kernels import tuning
    except ImportError:
        return []
    table = tuning.read_table()
    arch = tuning.gpu_arch(env.device) if env.on_cuda else None
    found = []
    for chooser in (tuning.FWD_TILES, tuning.BWD_TILES):
        for key, config in chooser.chosen.items():
            _, dtype, block_d, block_dv, key_pair, causal, n_bucket, m_bucket = key
            cls = tuning.call_class(dtype, block_d, block_dv, key_pair, causal)
            if env.interpret:
                source = "interpreter"
            elif cls in table.get(arch, {}).get(chooser.kernel, {}):
                source = f"tuned table ({arch})"
            else:
                source = "timed on first call" if tuning.AUTOTUNE else "first candidate"
            found.append((chooser.kernel, cls, tuning.bucket_name(n_bucket, m_bucket), config,
                          source))
    return found


def load_create_model(report: Report) -> Optional[Callable]:
    try:
        from diffattn.models import create_model
    except ImportError as exc:
        report.notes.append(f"CLIP models unavailable: diffattn.models.create_model cannot be "
                            f"imported ({exc})")
        return None
    return create_model


# ------------------------------------------------------------------------------ CLI
def positive_int_list(text: str) -> List[int]:
    """An argparse type: a comma-separated list of integers >= 1."""
    return [positive_int(t.strip()) for t in text.split(",") if t.strip()] or \
        [positive_int("")]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = CliParser(description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="the targets' shapes only (GPU) / a short subset (CPU)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out",
                        help="output folder (default benchmarks/out/ of this repository)")
    parser.add_argument("--providers", type=comma_list(ALL_PROVIDERS), default=list(ALL_PROVIDERS),
                        help=f"comma list of {', '.join(ALL_PROVIDERS)}")
    parser.add_argument("--levels", type=comma_list(LEVELS), default=list(DEFAULT_LEVELS),
                        help="comma list of host, op, layer, decode, varlen, model, transformers, "
                             "cpu "
                             "(default all but cpu)")
    parser.add_argument("--cpu-threads", type=positive_int_list, default=[1, 2],
                        help="cpu level: comma list of thread counts (default 1,2)")
    parser.add_argument("--cpu-rounds", type=positive_int, default=5,
                        help="cpu level: interleaved rounds (default 5)")
    parser.add_argument("--cpu-tiny", action="store_true",
                        help="cpu level: tiny shapes (a smoke run)")
    parser.add_argument("--dtype", type=comma_list(tuple(DTYPES)), default=None,
                        help="comma list of bf16, fp16, fp32 (default bf16,fp16 on CUDA, bf16 "
                             "with --quick; fp32 on CPU); host level and the model level's "
                             "autocast use the first low-precision one (bf16 if none)")
    parser.add_argument("--modes", type=comma_list(OP_MODES), default=["fwd", "fwd_bwd"],
                        help="op/layer modes: comma list of fwd, bwd, fwd_bwd (default "
                             "fwd,fwd_bwd)")
    parser.add_argument("--causal", choices=("both", "causal", "noncausal"), default="both",
                        help="keep only causal or non-causal op/layer shapes")
    parser.add_argument("--compile", type=comma_list(tuple(COMPILE_CHOICES) + ("none",)),
                        default=None,
                        help="model-level torch.compile variants: comma list of default "
                             "(mode _compiled), cudagraphs (mode _compiled_cudagraphs, "
                             "reduce-overhead), or none (default: default,cudagraphs on CUDA, "
                             "none on CPU)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the compiled modes (default inductor)")
    add_do_bench_arguments(parser, warmup_ms=25, rep_ms=100, per="per case on CUDA")
    # Counts whose defaults depend on the device or on --quick (filled in by apply_defaults).
    for flag, help_text in (
            ("--host-calls", "calls per back-to-back loop at host level (default 200, 100 with "
                             "--quick)"),
            ("--host-loops", "timed loops at host level (default 7, 5 with --quick)"),
            ("--image-batch", "train_image batch (default 128 on CUDA, 4 on CPU)"),
            ("--text-batch", "train_text / infer_text batch (default 256 on CUDA, 8 on CPU)"),
            ("--model-steps", "timed steps per model case (default 10 on CUDA, 3 on CPU)")):
        parser.add_argument(flag, type=positive_int, default=None, help=help_text)
    parser.add_argument("--model-warmup", type=int, default=None,
                        help="untimed steps after the first one (default 2 on CUDA, 1 on CPU)")
    parser.add_argument("--time-limit-s", type=positive_float, default=None,
                        help="start no case that would not end before this many seconds "
                             "(rough estimates); the rest is listed as not run")
    args = parser.parse_args(argv)
    if args.compile is not None and "none" in args.compile:
        if len(args.compile) > 1:
            parser.error("--compile: none cannot be combined with other choices")
        args.compile = []
    if args.model_warmup is not None and args.model_warmup < 0:
        parser.error(f"--model-warmup must be >= 0, got {args.model_warmup}")
    return args


def apply_defaults(args: argparse.Namespace, on_cuda: bool) -> None:
    """Fill the device-dependent defaults in place."""
    if args.dtype is None:
        args.dtype = (["bf16"] if args.quick else ["bf16", "fp16"]) if on_cuda else ["fp32"]
    if args.compile is None:
        args.compile = list(COMPILE_CHOICES) if on_cuda else []
    if args.host_calls is None:
        args.host_calls = 100 if args.quick else 200
    if args.host_loops is None:
        args.host_loops = 5 if args.quick else 7
    if args.model_steps is None:
        args.model_steps = 10 if on_cuda else 3
    if args.model_warmup is None:
        args.model_warmup = 2 if on_cuda else 1


def run_notes(args, env: Environment, plan: List[Case], report: Report) -> None:
    if not env.on_cuda:
        reason = CPU_NO_KERNELS if not torch.cuda.is_available() else (
            "TRITON_INTERPRET=1 is set, so the fused kernels cannot run compiled: running on "
            "CPU; diffattn, diffattn_v2 and timm_diff_fused skipped")
        report.notes += [reason, f"CPU timings ({torch.get_num_threads()} threads per op) "
                                 f"check that the harness and the library's torch path run; "
                                 f"they say nothing about GPU performance"]
        print(reason, flush=True)
        if env.interpret:
            report.notes.append(f"TRITON_INTERPRET=1: the fused kernels ran through the Triton "
                                f"interpreter at {INTERPRETER_SHAPE.label()} fp32 as providers "
                                f"{', '.join(INTERPRETER_PROVIDERS)} (a smoke run, not a speed "
                                f"measurement)")
    if any(c.provider in NO_LAUNCH_PROVIDERS for c in plan):
        report.notes.append("host level: rows on the device \"cpu (kernels not launched)\" "
                            "(providers diffattn_no_launch, diffattn_v2_no_launch) ran the "
                            "fused ops on CPU tensors with every kernel launch replaced by a "
                            "no-op: the library's host cost without the kernels and without "
                            "the Triton launcher's own cost")
    models = [c for c in plan if c.level == "model"]
    if models:
        spec = GPU_SPEC if env.on_cuda else CPU_SPEC
        autocast = "no autocast" if models[0].dtype == "fp32" else \
            f"autocast to {models[0].dtype}"
        compiled = ", ".join(f"{s} = torch.compile(mode={m!r})" for s, m in
                             (("_compiled", "default"), ("_compiled_cudagraphs", "reduce-overhead"))
                             if any(c.modes[0].endswith(s) for c in models)) or "none"
        report.notes.append(f"model level: {spec.diff} (diffattn, torch_path), {spec.plain} "
                            f"(sdpa_plain), timm {spec.timm} {dict(spec.timm_kwargs) or ''} "
                            f"(timm providers); fp32 parameters, {autocast}; compiled modes: "
                            f"{compiled}")
    try:
        from diffattn.kernels import tuning
        if env.on_cuda:
            then = ("timing of the candidates on the first call" if tuning.AUTOTUNE
                    else "the first candidate (DIFFATTN_AUTOTUNE=0)")
            report.notes.append(f"tile choice: tuned table {tuning.TABLE_PATH.name} first, "
                                f"then {then}")
            from diffattn.kernels import launch, tma
            report.notes.append(
                "forward key/value loads: " + ("tensor descriptors (TMA) where they apply, "
                                               "DIFFATTN_TMA=1" if tma.ENABLED else "pointers")
                + "; launches: " + ("the launch shortcut" if launch.ENABLED
                                    else "Triton's own (DIFFATTN_FAST_LAUNCH=0)"))
    except ImportError:
        pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    started = time.perf_counter()
    env = detect_environment()
    apply_defaults(args, env.on_cuda)
    report = Report()
    create_model = load_create_model(report) if "model" in args.levels else None
    plan = build_plan(args, env.on_cuda, env.interpret, create_model is not None)
    run_notes(args, env, plan, report)
    budget = (torch.cuda.mem_get_info()[0] * GPU_NAIVE_BUDGET_FRACTION if env.on_cuda
              else CPU_NAIVE_BUDGET_BYTES)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{len(plan)} cases on {env.device_name} (torch {env.torch_version}, triton "
          f"{env.triton_version}); writing to {args.out}", flush=True)

    not_run: List[tuple] = []
    with open(args.out / CSV_NAME, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        runner = Runner(env, args, writer, stream, report, create_model, budget)
        progress = Progress(len(plan))
        for index, case in enumerate(plan):
            elapsed = time.perf_counter() - started
            if args.time_limit_s is not None and \
                    elapsed + (case.expected_s() if env.on_cuda else 0.0) > args.time_limit_s:
                not_run.append((case, f"it would not end within the time limit of "
                                      f"{args.time_limit_s:g} s"))
                continue
            case_start = time.perf_counter()
            try:
                runner.run(case)
            except KeyboardInterrupt:  # e.g. gpu_check.sh's timeout: keep what was measured
                not_run += [(c, "the run was interrupted") for c in plan[index:]]
                break
            progress.step(case.label(), time.perf_counter() - case_start)
        progress.close()
    report.not_run = [f"{case.label()} ({why})" for case, why in not_run]
    if not_run:
        report.notes.append(f"{len(not_run)} of {len(plan)} cases not run (listed under "
                            f"'Not run')")
    report.tiles = tile_choices(env)
    for message in write_plots(runner.rows, args.out):
        print(message, flush=True)
    cpu_md = ""
    if "cpu" in args.levels:
        import cpu_compare
        cpu_compare.run(args.out, args.cpu_threads, args.cpu_rounds, tiny=args.cpu_tiny)
        cpu_md = (args.out / cpu_compare.MD_NAME).read_text()
    summary = summary_markdown(runner.rows, env.device_name, env.on_cuda,
                               (env.torch_version, env.triton_version), report, argv,
                               time.perf_counter() - started)
    if cpu_md:
        summary += "\n\n" + cpu_md.replace("# CPU comparison", "## CPU level", 1).rstrip()
    (args.out / SUMMARY_NAME).write_text(summary + "\n")
    print(f"wrote {args.out / CSV_NAME} ({len(runner.rows)} rows) and "
          f"{args.out / SUMMARY_NAME}\n", flush=True)
    print(summary, flush=True)
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
