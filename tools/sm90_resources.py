"""Registers, spills and shared memory of every kernel variant and tile candidate, compiled
for a GPU target (default sm_90) on a machine without a GPU or driver.

    python tools/sm90_resources.py --quick                   # first two candidates, bf16
    python tools/sm90_resources.py --jobs 2 --time-limit 5400
    python tools/sm90_resources.py --list                    # the launches, no compile
    python tools/sm90_resources.py --quick --tma             # forward with TMA loads
    python tools/sm90_resources.py --kernels decode          # the KV-cache decode kernels
    python tools/sm90_resources.py --extra tools/sm90_extra_candidates.json \
        --extra-only --csv benchmarks/results/sm90-resources-triton3.6-extra.csv

How the launches are found: the real launchers run on small CPU tensors with every kernel
replaced by a recorder (``kernels_replaced`` of ``kernels/launch.py``), whose
``kernel[grid](...)`` keeps the arguments, and with the tile choice forced to each candidate in
turn (``forced_tiles`` of ``kernels/tuning.py``), so every compile gets exactly the arguments
a real launch of that candidate passes. Each recorded launch goes through the kernel's own
argument binder (``triton.runtime.jit.create_function_from_signature``, the function Triton's
launcher specialises a call with: pointer dtypes, 16-byte alignment, integers equal to 1 or
divisible by 16, 32- or 64-bit) and becomes a ``triton.compile`` source (``ASTSource``) for
the target. Nothing is launched and no interpreter is involved: ``TRITON_INTERPRET`` must not
be set. While recording, tiles are chosen as on a GPU with no tuned table entry
(``untuned_tile_choice``).

Kernels (``--kernels``): ``attention`` (the default: the forward, the backward's row kernel and
main kernel), ``decode`` (the KV-cache decode kernel and its split-K combine kernel) or
``all``.

Attention variants (``VARIANTS``): V1 with a key pair per group, value width 2d and the RMSNorm
epilogue (lambda a 0-dim tensor as DiffMultiheadAttention passes it; or lambda's four
vectors), V1 plain (0-dim lambda, no epilogue), V2 (one key head per group, value width d,
lambda per token); full, causal and local-window attention, with and without a key padding
mask; training (forward saving for backward, then the backward's row kernel and main kernel)
and inference (forward only). Each forward and backward main kernel is compiled with every
candidate of its group (``kernels/config.py``: narrow, wide, fp32), the row kernel with the
configuration the launcher gives it.

Decode variants (``DECODE_VARIANTS``): V1 (a key pair per group, value width 2d, RMSNorm
epilogue, lambda per head or from the four vectors) and V2 (one key per group, value width d,
lambda per token), on a contiguous or a paged cache, in one pass or split-K (the decode kernel
writes partial results and the combine kernel merges them), one query per sequence or 16. Both
kernels are compiled with the configuration the launcher gives them.

``CASE_GRID`` lists the (variant, dtype, head dim) combinations. ``--quick``: bf16, head dims
64 and 128, the first two candidates of each group. ``--extra FILE`` adds candidates to the
groups (``tools/sm90_extra_candidates.json``); ``--extra-only`` compiles those alone. ``--tma``
records the forward as ``DIFFATTN_TMA=1`` runs it on Hopper: key and value tiles through
tensor descriptors (``kernels/tma.py``).

Per compile: registers per thread (REG), stack and local bytes (STACK/LOCAL > 0: spills to
local memory), from ``cuobjdump --dump-resource-usage`` of the cubin, and the dynamic shared
memory of the launch (``metadata.shared``) plus static shared memory. The estimate of resident
blocks per SM uses the sm_90 limits (65,536 registers, 228 KiB shared memory of which 227 KiB
per block, 64 warps, 32 blocks).

Outputs: a CSV (``CSV_COLUMNS``, one row per compile) and a markdown summary (failures,
spilling candidates, shared memory over the limit, a per-candidate table per kernel), by
default ``benchmarks/results/<target>-[decode-|all-]resources-triton<major.minor>[-quick][-tma]
.csv|.md``.

Exit status: 0; 1 when some compile failed; 2 for bad arguments.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import importlib
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from arguments import CliParser  # noqa: E402

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

RESULTS_DIR = ROOT / "benchmarks" / "results"
# Short name -> kernel name (a key of kernels/launch.py's registered_launchers()) of every
# kernel the launchers launch, per --kernels choice.
KERNELS = {"fwd": "diff_attn_fwd_kernel", "bwd_rows": "diff_attn_bwd_rows_kernel",
           "bwd": "diff_attn_bwd_kernel", "decode": "diff_attn_decode_kernel",
           "decode_combine": "diff_attn_decode_combine_kernel"}
KERNEL_ORDER = {name: i for i, name in enumerate(("fwd", "bwd", "bwd_rows", "decode",
                                                  "decode_combine"))}
KERNEL_CHOICES = ("attention", "decode", "all")
# A GPU architecture name with no entry in the tuned table: tile choice as on an untuned GPU.
RECORD_ARCH = "sm_resources"

# sm_90 limits for the shared-memory check and the residency estimate.
MAX_SHARED_PER_BLOCK = 232448          # 227 KiB, the opt-in maximum of one block
SHARED_PER_SM = 233472                 # 228 KiB
SHARED_RESERVED_PER_BLOCK = 1024
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256                   # registers per warp are allocated in units of 256
MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM = 64, 32

CSV_COLUMNS = ("target", "triton", "kernel", "variant", "dtype", "head_dim", "group",
               "candidate", "config", "num_warps", "num_stages", "regs", "stack", "local",
               "shared", "static_shared", "spills", "over_shared", "blocks_per_sm",
               "compile_s", "error")

_RESOURCE_LINE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


# ------------------------------------------------------------------ variants and cases
@dataclass(frozen=True)
class Variant:
    """One way the library calls the attention kernels.

    key_pair: V1 (two key heads per group, value width 2d) or V2 (one, value width d).
    lam: "scalar" (a 0-dim fp32 tensor), "vectors" (the (4, d) lambda vectors with
    ``lam_vectors=True`` and lam_value = lambda_init) or "per_token" ((B, N, H)).
    norm: the RMSNorm epilogue (with out_scale = 1 - lambda_init). training: the forward
    saves for backward and the backward runs; else inference (forward only). window: the
    local window (left, right), (-1, -1) for none. varlen: packed variable-length sequences
    (the tensors packed as (total, heads, dim) with cumulative offsets; lambda per token is
    then (total_q, H)).
    """
    name: str
    key_pair: bool
    lam: str
    norm: bool
    causal: bool = False
    kpm: bool = False
    training: bool = True
    window: Tuple[int, int] = (-1, -1)
    kind = "attention"
    varlen: bool = False

    def describe(self) -> str:
        parts = ["V1 key pair, value 2d" if self.key_pair else "V2 one key, value d",
                 {"scalar": "lambda 0-dim tensor", "vectors": "lambda from vectors",
                  "per_token": "lambda per token"}[self.lam],
                 "RMSNorm" if self.norm else "no norm",
                 "causal" if self.causal else "full",
                 *([f"window {self.window}"] if self.window != (-1, -1) else []),
                 "key padding" if self.kpm else "no padding",
                 *(["packed sequences"] if self.varlen else []),
                 "training" if self.training else "inference"]
        return ", ".join(parts)


@dataclass(frozen=True)
class DecodeVariant:
    """One way the library calls the KV-cache decode kernels.

    v2: one key per group, value width d, lambda per token; else V1 (a key pair, value width
    2d, RMSNorm epilogue). lam: "heads" ((H,)), "vectors" (the four vectors) or "tokens"
    ((B, queries, H)). paged: a paged cache (pages of DECODE_PAGE). splits: key splits (1: one
    pass, no combine kernel). queries: query tokens per sequence.
    """
    name: str
    v2: bool
    lam: str
    paged: bool = False
    splits: int = 1
    queries: int = 1
    kind = "decode"

    def describe(self) -> str:
        return ", ".join([
            "V2 one key, value d" if self.v2 else "V1 key pair, value 2d, RMSNorm",
            {"heads": "lambda per head", "vectors": "lambda from vectors",
             "tokens": "lambda per token"}[self.lam],
            "paged cache" if self.paged else "contiguous cache",
            f"split-K {self.splits}" if self.splits > 1 else "one pass",
            f"{self.queries} quer{'y' if self.queries == 1 else 'ies'} per sequence"])


VARIANTS = (
    Variant("v1_norm", True, "scalar", True),
    Variant("v1_norm_causal", True, "scalar", True, causal=True),
    Variant("v1_norm_kpm", True, "scalar", True, kpm=True),
    Variant("v1_norm_infer", True, "scalar", True, training=False),
    Variant("v1_vec", True, "vectors", True),
    Variant("v1_vec_causal_kpm", True, "vectors", True, causal=True, kpm=True),
    Variant("v1_plain", True, "scalar", False),
    Variant("v2", False, "per_token", False),
    Variant("v2_causal", False, "per_token", False, causal=True),
    Variant("v2_kpm", False, "per_token", False, kpm=True),
    Variant("v2_infer", False, "per_token", False, training=False),
    Variant("v1_norm_window", True, "scalar", True, window=(8, 8)),
    Variant("v2_window_causal", False, "per_token", False, causal=True, window=(16, -1)),
    Variant("v1_norm_varlen", True, "scalar", True, varlen=True),
    Variant("v1_norm_causal_varlen", True, "scalar", True, causal=True, varlen=True),
    Variant("v2_causal_varlen", False, "per_token", False, causal=True, varlen=True),
)
DECODE_VARIANTS = (
    DecodeVariant("v1", False, "heads"),
    DecodeVariant("v1_vec", False, "vectors"),
    DecodeVariant("v1_split", False, "heads", splits=8),
    DecodeVariant("v1_paged_split", False, "heads", paged=True, splits=8),
    DecodeVariant("v1_q16", False, "heads", queries=16),
    DecodeVariant("v2", True, "tokens"),
    DecodeVariant("v2_split", True, "tokens", splits=8),
    DecodeVariant("v2_paged_split", True, "tokens", paged=True, splits=8),
    DecodeVariant("v2_q16", True, "tokens", queries=16),
)
# Variants by (kind, name): the two kinds share some names (v1, v2 ...).
VARIANT_BY_KEY: Dict[Tuple[str, str], Union[Variant, DecodeVariant]] = {
    (v.kind, v.name): v for v in VARIANTS + DECODE_VARIANTS}
ALL_VARIANTS = tuple(v.name for v in VARIANTS)
ALL_DECODE_VARIANTS = tuple(v.name for v in DECODE_VARIANTS)
# (kind, variants, dtypes, head dims): the full run's cases, in priority order (a run cut
# short by its time limit has the earlier entries). bf16 covers every variant at d = 64 and
# 128, the main V1 and V2 paths first; d = 32, fp16 and fp32 (its own candidate group) those
# two; the decode kernels in bf16 at d = 64 and 128.
CASE_GRID = (
    ("attention", ("v1_norm", "v2"), ("bf16",), (64, 128)),
    ("attention", ALL_VARIANTS, ("bf16",), (64, 128)),
    ("attention", ("v1_norm", "v2"), ("bf16",), (32,)),
    ("attention", ("v1_norm",), ("fp16",), (64,)),
    ("attention", ("v1_norm", "v2"), ("fp32",), (64, 128)),
    ("decode", ALL_DECODE_VARIANTS, ("bf16",), (64, 128)),
)
QUICK_DTYPES, QUICK_HEAD_DIMS, QUICK_CANDIDATES = ("bf16",), (64, 128), 2
LAMBDA_INIT = 0.8
# Recording shapes: batch, query and key lengths, differential heads, key/value groups.
B, N, M, H, HK = 2, 40, 48, 2, 1
# Decode recording shapes: differential heads, key/value groups, cache length, page size.
DECODE_H, DECODE_HK, DECODE_M, DECODE_PAGE = 4, 2, 1024, 64
DECODE_NOTE = (f"Decode variants are recorded with {DECODE_H} differential heads in "
               f"{DECODE_HK} key/value groups (rows = {DECODE_H // DECODE_HK} heads x queries), "
               f"caches of {DECODE_M} tokens, pages of {DECODE_PAGE}.")


@dataclass(frozen=True)
class Case:
    variant: str
    dtype: str
    head_dim: int
    tier: int = field(default=0, compare=False)  # its CASE_GRID entry: compile order
    kind: str = "attention"

    @property
    def spec(self) -> Union[Variant, DecodeVariant]:
        return VARIANT_BY_KEY[(self.kind, self.variant)]


def cases(quick: bool, variants: Optional[Sequence[str]] = None,
          dtypes: Optional[Sequence[str]] = None,
          head_dims: Optional[Sequence[int]] = None,
          kernels: str = "attention") -> List[Case]:
    """The (variant, dtype, head dim) cases of a run, in CASE_GRID order, filtered;
    ``kernels``: "attention", "decode" or "all"."""
    found: List[Case] = []
    for tier, (kind, names, grid_dtypes, grid_dims) in enumerate(CASE_GRID):
        if kernels not in ("all", kind):
            continue
        for dtype in grid_dtypes:
            if quick and dtype not in QUICK_DTYPES:
                continue
            for d in grid_dims:
                if quick and d not in QUICK_HEAD_DIMS:
                    continue
                for name in names:
                    case = Case(name, dtype, d, tier, kind)
                    if case in found or (variants and name not in variants) or \
                            (dtypes and dtype not in dtypes) or (head_dims and d not in head_dims):
                        continue
                    found.append(case)
    return found


# ------------------------------------------------------------------ recording the launches
@dataclass
class Launch:
    """One recorded ``kernel[grid](*args, **kwargs)``; ``kernel`` is its short name."""
    kernel: str
    grid: tuple
    args: tuple
    kwargs: dict


class Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)``
    appends a Launch to ``launches`` and runs nothing."""

    def __init__(self, kernel: str, launches: List[Launch]):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(Launch(self.kernel, tuple(grid), args, dict(kwargs)))
        return launch


def check_environment() -> None:
    """Recording needs compiled-mode kernels: TRITON_INTERPRET makes @triton.jit build
    interpreter functions and changes the launchers' configurations."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("TRITON_INTERPRET must not be set: the kernels must be compiled "
                           "kernels, not interpreter functions")


@contextlib.contextmanager
def recording(launches: List[Launch], fwd: Optional[tuple] = None, bwd: Optional[tuple] = None,
              tma: bool = False) -> Iterator[None]:
    """Inside the block every kernel's launcher appends its launch to ``launches`` instead of
    launching, with tiles as on an untuned GPU or forced to ``fwd`` / ``bwd`` (configurations
    in the order of kernels/config.py's FWD_FIELDS / BWD_FIELDS), and with TMA loads wherever
    they fit when ``tma``; all through the kernels' hooks, restored on exit."""
    check_environment()
    from diffattn.kernels.launch import kernels_replaced
    from diffattn.kernels.tuning import forced_tiles, untuned_tile_choice
    stand_ins = {name: Recorder(short, launches) for short, name in KERNELS.items()}
    with contextlib.ExitStack() as stack:
        stack.enter_context(kernels_replaced(stand_ins, fast=False))
        stack.enter_context(untuned_tile_choice(RECORD_ARCH))
        stack.enter_context(forced_tiles(fwd, bwd))
        if tma:
            from diffattn.kernels.tma import tma_loads_wherever_they_fit
            stack.enter_context(tma_loads_wherever_they_fit())
        yield


def _torch_dtype(name: str):
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
            "fp64": torch.float64}[name]


def record_case(case: Case, fwd_config: Optional[tuple] = None,
                bwd_config: Optional[tuple] = None, tma: bool = False) -> List[Launch]:
    """Run the variant's launchers on small CPU tensors and return their launches: the
    forward's, then (training) the backward's row and main kernels; for a decode variant the
    decode kernel's, then (split-K) the combine kernel's. fwd_config / bwd_config force the
    tile configurations (None: the first candidate, as on an untuned GPU)."""
    if case.kind == "decode":
        return record_decode(case)
    import torch
    from diffattn.kernels import AttentionCall, diff_attn_bwd, diff_attn_fwd
    variant = case.spec
    dtype, d = _torch_dtype(case.dtype), case.head_dim
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(0)
    dv = 2 * d if variant.key_pair else d
    q = torch.randn(B, N, 2 * H, d, generator=g).to(dtype)
    k = torch.randn(B, M, (2 if variant.key_pair else 1) * HK, d, generator=g).to(dtype)
    v = torch.randn(B, M, HK, dv, generator=g).to(dtype)
    lam_value = 0.0
    if variant.lam == "scalar":
        lam = torch.tensor(0.5, dtype=acc)
    elif variant.lam == "vectors":
        lam = torch.randn(4, d, generator=g).to(acc) * 0.1
        lam_value = LAMBDA_INIT
    else:
        lam = torch.rand(B, N, H, generator=g).to(acc)
    kpm = (torch.rand(B, M, generator=g) < 0.2) if variant.kpm else None
    norm_weight = torch.ones(dv, dtype=acc) if variant.norm else None
    out_scale = 1.0 - LAMBDA_INIT if variant.norm else 1.0
    eps = 1e-5 if variant.norm else 1.0
    packed = {}
    if variant.varlen:  # B sequences of lengths N and M packed (uniform offsets)
        q, k, v = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)
        if lam.dim() == 3:
            lam = lam.flatten(0, 1)
        packed = dict(cu_seqlens_q=torch.arange(0, (B + 1) * N, N, dtype=torch.int32),
                      cu_seqlens_k=torch.arange(0, (B + 1) * M, M, dtype=torch.int32))
    call = AttentionCall.create(d ** -0.5, causal=variant.causal, window_size=variant.window,
                                lam_value=lam_value, lam_vectors=variant.lam == "vectors",
                                eps=eps, out_scale=out_scale,
                                **(dict(max_seqlens=(N, M)) if variant.varlen else {}))
    launches: List[Launch] = []
    with recording(launches, fwd_config, bwd_config, tma):
        out, x, o2, lse, rstd = diff_attn_fwd(
            q, k, v, lam, kpm, norm_weight, call, save_for_backward=variant.training, **packed)
        if variant.training:
            dout = torch.randn(out.shape, generator=g).to(dtype)
            diff_attn_bwd(dout, q, k, v, lam, kpm, norm_weight, (x, o2, lse, rstd),
                          call, need_dlam=True, need_dw=True, **packed)
    return launches


def record_decode(case: Case) -> List[Launch]:
    """The launches of one decode call of the case's variant (no kernel runs)."""
    import torch
    from diffattn.kernels import AttentionCall
    from diffattn.kernels.diff_attn_decode import diff_attn_decode
    variant, dtype, d = case.spec, _torch_dtype(case.dtype), case.head_dim
    batch, heads, groups, length, page = 2, DECODE_H, DECODE_HK, DECODE_M, DECODE_PAGE
    g = torch.Generator().manual_seed(0)
    dv = d if variant.v2 else 2 * d
    q = torch.randn(batch, variant.queries, 2 * heads, d, generator=g).to(dtype)
    rows = (batch * length // page, page) if variant.paged else (batch, length)
    k_cache = torch.randn(*rows, groups if variant.v2 else 2 * groups, d, generator=g).to(dtype)
    v_cache = torch.randn(*rows, groups, dv, generator=g).to(dtype)
    block_table = torch.arange(batch * length // page, dtype=torch.int32).view(batch, -1) \
        if variant.paged else None
    seqlens = torch.full((batch,), length, dtype=torch.int32)
    lam_value = 0.0
    if variant.lam == "heads":
        lam = torch.rand(heads, generator=g)
    elif variant.lam == "vectors":
        lam, lam_value = torch.randn(4, d, generator=g) * 0.1, LAMBDA_INIT
    else:
        lam = torch.rand(batch, variant.queries, heads, generator=g)
    norm = None if variant.v2 else torch.ones(dv)
    launches: List[Launch] = []
    with recording(launches):
        call = AttentionCall.create(d ** -0.5, causal=True, lam_value=lam_value,
                                    lam_vectors=variant.lam == "vectors",
                                    out_scale=1.0 - LAMBDA_INIT if norm is not None else 1.0)
        diff_attn_decode(q, k_cache, v_cache, seqlens, block_table, lam, norm, call,
                         variant.splits)
    return launches


# ------------------------------------------------------------------ compile sources
def jit_kernel(short: str):
    """The ``@triton.jit`` kernel of a short kernel name (a key of KERNELS)."""
    from diffattn.kernels.launch import registered_launchers
    return registered_launchers()[KERNELS[short]].kernel


@dataclass
class Spec:
    """A compile source of one launch: ``signature`` {arg name: type}, ``constexprs``
    {arg index: value}, ``attrs`` {arg index: "D"}, ``options`` (num_warps, ...)."""
    kernel: str
    signature: Dict[str, str]
    constexprs: Dict[int, object]
    attrs: Dict[int, str]
    options: Dict[str, object]

    def tiles(self, fields: Sequence[str]) -> tuple:
        """The configuration tuple of the launch, in the order of ``fields``."""
        names = list(self.signature)
        values = {names[i]: v for i, v in self.constexprs.items()}
        values.update(self.options)
        return tuple(values[f] for f in fields)


def launch_spec(launch: Launch, arch: int = 90) -> Spec:
    """The compile source of a recorded launch, specialised by Triton's own argument binder
    for the target (``create_function_from_signature``, Triton 3.3 and newer): the type of
    every argument ("*bf16", "i32", "fp32", "constexpr" ...), its specialisation ("D": a
    pointer or integer divisible by 16) and the launch options."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    fn = jit_kernel(launch.kernel)
    binder = create_function_from_signature(fn.signature, fn.params,
                                            make_backend(GPUTarget("cuda", arch, 32)))
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, (ty, spec)) in enumerate(zip(bound, specialization)):
        signature[name] = ty
        if ty == "constexpr":
            constexprs[i] = bound[name]
        elif spec == "D":
            attrs[i] = "D"
    return Spec(launch.kernel, signature, constexprs, attrs, dict(options))


# ------------------------------------------------------------------ compile tasks
@dataclass
class Task:
    """One compile: a Spec and where its row goes."""
    spec: Spec
    variant: str
    dtype: str
    head_dim: int
    group: str
    candidate: str
    config: tuple
    arch: int
    index: int = 0
    row: dict = field(default_factory=dict)


def candidate_lists(extra: Optional[dict] = None) -> Dict[str, Dict[str, List[tuple]]]:
    """{"fwd"|"bwd": {group: [configuration, ...]}} from kernels/config.py, with ``extra``
    candidates ({"fwd": {group: [[...], ...]}, ...}) appended where not already present."""
    config = importlib.import_module("diffattn.kernels.config")
    lists = {"fwd": {g: [tuple(c) for c in cs] for g, cs in config.FWD_CANDIDATES.items()},
             "bwd": {g: [tuple(c) for c in cs] for g, cs in config.BWD_CANDIDATES.items()}}
    for kernel, groups in (extra or {}).items():
        if kernel not in lists:
            raise ValueError(f"extra candidates: unknown kernel {kernel!r} (fwd or bwd)")
        fields = len(config.FWD_FIELDS if kernel == "fwd" else config.BWD_FIELDS)
        for group, configs in groups.items():
            if group not in lists[kernel]:
                raise ValueError(f"extra candidates: unknown group {group!r}")
            for c in configs:
                if len(c) != fields or not all(isinstance(x, int) and x > 0 for x in c):
                    raise ValueError(f"extra candidates: {kernel} configuration {c!r} must be "
                                     f"{fields} positive integers")
                if tuple(c) not in lists[kernel][group]:
                    lists[kernel][group].append(tuple(c))
    return lists


def candidate_label(kernel: str, group: str, config: tuple) -> str:
    """"<group>#<index in kernels/config.py>", or "<group>+extra" for an added candidate."""
    config_mod = importlib.import_module("diffattn.kernels.config")
    base = config_mod.FWD_CANDIDATES if kernel == "fwd" else config_mod.BWD_CANDIDATES
    known = [tuple(c) for c in base[group]]
    return f"{group}#{known.index(config)}" if config in known else f"{group}+extra"


def launch_config(spec: Spec) -> tuple:
    """(BLOCK_M, num_warps, num_stages) of a kernel whose launcher picks its own
    configuration (the backward's row kernel, the decode kernels)."""
    return spec.tiles(("BLOCK_M",)) + (spec.options.get("num_warps", 4),
                                      spec.options.get("num_stages", 3))


def case_tasks(case: Case, lists: dict, limit: Optional[int], arch: int,
               extra_only: bool = False, tma: bool = False) -> List[Task]:
    """Every compile of one case: the forward with each candidate of its group, and for
    training the backward row kernel (its own configuration) and main kernel with each
    candidate; for a decode case each launch of the call. extra_only: the added (not
    kernels/config.py) candidates alone (no decode compiles)."""
    if case.kind == "decode":
        if extra_only:
            return []
        specs = [launch_spec(launch, arch) for launch in record_case(case)]
        return [Task(s, case.variant, case.dtype, case.head_dim, "decode", "launch",
                     launch_config(s), arch) for s in specs]
    config = importlib.import_module("diffattn.kernels.config")
    variant = case.spec
    dv = 2 * case.head_dim if variant.key_pair else case.head_dim
    group = config.candidate_group(_torch_dtype(case.dtype), config.head_block(dv))
    fwd_list = lists["fwd"][group][:limit]
    bwd_list = lists["bwd"][group][:limit] if variant.training else []
    if extra_only:
        fwd_list = [c for c in fwd_list if candidate_label("fwd", group, c).endswith("extra")]
        bwd_list = [c for c in bwd_list if candidate_label("bwd", group, c).endswith("extra")]
        if not fwd_list and not bwd_list:
            return []
    first_fwd = fwd_list[0] if fwd_list else lists["fwd"][group][0]
    tasks = []

    def add(launch: Launch, fields, label, cfg):
        spec = launch_spec(launch, arch)
        if spec.tiles(fields) != cfg:
            raise RuntimeError(f"{case}: the launch ran {spec.tiles(fields)}, not the forced "
                               f"{cfg}")
        tasks.append(Task(spec, case.variant, case.dtype, case.head_dim, group, label, cfg,
                          arch))

    for i in range(max(len(fwd_list), len(bwd_list))):
        fcfg = fwd_list[i] if i < len(fwd_list) else first_fwd
        bcfg = bwd_list[i] if i < len(bwd_list) else None
        launches = record_case(case, fcfg, bcfg, tma)
        by_kernel = {}
        for launch in launches:
            by_kernel.setdefault(launch.kernel, []).append(launch)
        expected = {"fwd": 1, "bwd_rows": 1, "bwd": 1} if variant.training else {"fwd": 1}
        counts = {k: len(v) for k, v in by_kernel.items()}
        if counts != expected:
            raise RuntimeError(f"{case}: expected launches {expected}, recorded {counts}")
        if i < len(fwd_list):
            add(by_kernel["fwd"][0], config.FWD_FIELDS, candidate_label("fwd", group, fcfg),
                fcfg)
        if bcfg is not None:
            add(by_kernel["bwd"][0], config.BWD_FIELDS, candidate_label("bwd", group, bcfg),
                bcfg)
        if i == 0 and variant.training and not extra_only:
            rows = launch_spec(by_kernel["bwd_rows"][0], arch)
            tasks.append(Task(rows, case.variant, case.dtype, case.head_dim, "rows", "launch",
                              launch_config(rows), arch))
    return tasks


def all_tasks(run_cases: Sequence[Case], lists: dict, limit: Optional[int], arch: int,
              extra_only: bool = False, tma: bool = False) -> List[Task]:
    """The tasks of every case, by case tier, then the slow backward first within a tier."""
    tasks = []
    for case in run_cases:
        tasks.extend((case.tier, t) for t in case_tasks(case, lists, limit, arch, extra_only,
                                                        tma))
    order = {"bwd": 0, "fwd": 1, "bwd_rows": 2, "decode": 3, "decode_combine": 4}
    tasks = [t for _, t in sorted(tasks, key=lambda x: (x[0], order[x[1].spec.kernel]))]
    for i, task in enumerate(tasks):
        task.index = i
    return tasks


# ------------------------------------------------------------------ compiling
def cuobjdump_path() -> str:
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if path.exists():
        return str(path)
    found = shutil.which("cuobjdump")
    if not found:
        raise RuntimeError("no cuobjdump: neither in triton's nvidia backend nor on PATH")
    return found


def parse_resource_usage(text: str, function: str) -> Dict[str, int]:
    """REG, STACK, SHARED and LOCAL of ``function`` in ``cuobjdump --dump-resource-usage``
    output (the first function listed when ``function`` is not found)."""
    blocks = re.split(r"\n\s*Function ", "\n" + text)
    chosen = None
    for block in blocks[1:]:
        head = block.split(":", 1)[0].strip()
        match = _RESOURCE_LINE.search(block)
        if match and (chosen is None or head == function):
            chosen = match
            if head == function:
                break
    if chosen is None:
        raise RuntimeError(f"no resource usage in cuobjdump output: {text[:200]!r}")
    reg, stack, shared, local = (int(x) for x in chosen.groups())
    return {"regs": reg, "stack": stack, "static_shared": shared, "local": local}


def blocks_per_sm(regs: int, shared: int, static_shared: int, num_warps: int) -> int:
    """Resident blocks per SM on sm_90 (registers, shared memory, warps, blocks). ``shared``
    is the launch's dynamic shared memory, ``static_shared`` cuobjdump's SHARED (on sm_90 it
    holds the 1 KiB each block reserves)."""
    per_warp = -(-regs * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = REGS_PER_SM // max(per_warp * num_warps, 1)
    by_shared = SHARED_PER_SM // (shared + max(static_shared, SHARED_RESERVED_PER_BLOCK))
    return max(0, min(by_regs, by_shared, MAX_WARPS_PER_SM // num_warps, MAX_BLOCKS_PER_SM))


def compile_spec(spec: Spec, arch: int) -> dict:
    """Compile a Spec for ``cuda:arch`` and measure it: regs, stack, local, static_shared,
    shared (dynamic), compile_s."""
    check_environment()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    fn = jit_kernel(spec.kernel)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    attrs = {(i,): backend.parse_attr(desc) for i, desc in spec.attrs.items()}
    constexprs = {(i,): v for i, v in spec.constexprs.items()}
    src = ASTSource(fn=fn, signature=dict(spec.signature), constexprs=constexprs, attrs=attrs)
    start = time.perf_counter()
    compiled = triton.compile(src, target=target, options=dict(spec.options))
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        out = subprocess.run([cuobjdump_path(), "--dump-resource-usage", str(cubin)],
                             capture_output=True, text=True, check=True).stdout
    usage = parse_resource_usage(out, compiled.metadata.name)
    usage.update(shared=int(compiled.metadata.shared), compile_s=round(seconds, 2))
    return usage


def task_row(task: Task, **values) -> dict:
    """The CSV row of a task: what was compiled, then ``values``."""
    import triton
    return {"target": f"sm_{task.arch}", "triton": triton.__version__,
            "kernel": task.spec.kernel, "variant": task.variant, "dtype": task.dtype,
            "head_dim": task.head_dim, "group": task.group, "candidate": task.candidate,
            "config": ",".join(str(x) for x in task.config),
            "num_warps": task.spec.options.get("num_warps", 4),
            "num_stages": task.spec.options.get("num_stages", 3), **values}


def run_task(task: Task) -> Task:
    """Compile one task and fill its row (errors are recorded in the row, not raised)."""
    row = task_row(task)
    start = time.perf_counter()
    try:
        usage = compile_spec(task.spec, task.arch)
    except Exception as exc:  # a failed compile is a result
        row.update(error=error_text(exc)[:2000], compile_s=round(time.perf_counter() - start, 2))
    else:
        row.update(usage)
        row.update(spills=int(usage["stack"] > 0 or usage["local"] > 0),
                   over_shared=int(usage["shared"] > MAX_SHARED_PER_BLOCK),
                   blocks_per_sm=blocks_per_sm(usage["regs"], usage["shared"],
                                               usage["static_shared"], row["num_warps"]),
                   error="")
    task.row = row
    return task


def error_text(exc: BaseException) -> str:
    """One line for a failed compile: for a Triton CompilationError the innermost error and
    where it arose (function, line:column of its source), else the exception itself."""
    chain = [exc]
    while chain[-1].__cause__ is not None and len(chain) < 20:
        chain.append(chain[-1].__cause__)
    located = [e for e in chain if hasattr(e, "src") and hasattr(e, "node")]
    inner = chain[-1]
    if not located:
        return " ".join(f"{type(inner).__name__}: {inner}".split())
    where = located[-1]
    message = getattr(where, "error_message", None)
    if inner is not where:
        message = f"{type(inner).__name__}: {inner}"
    match = re.search(r"def\s+(\w+)", str(where.src or ""))
    text = (f"{type(exc).__name__} in {match.group(1) if match else '?'} at "
            f"{getattr(where.node, 'lineno', '?')}:{getattr(where.node, 'col_offset', '?')}: "
            f"{message or str(where).splitlines()[0]}")
    return " ".join(text.split())


def _init_worker() -> None:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def run_tasks(tasks: Sequence[Task], jobs: int, deadline: Optional[float],
              progress=print) -> List[dict]:
    """Compile the tasks (``jobs`` processes); tasks not started by ``deadline`` (a
    time.monotonic() value) and those still compiling then get the error "not compiled:
    time limit". Returns the rows in task order."""
    done: Dict[int, dict] = {}
    total = len(tasks)

    def report(task: Task):
        done[task.index] = task.row
        r = task.row
        what = (f"{r['kernel']} {r['variant']} {r['dtype']} d{r['head_dim']} {r['candidate']} "
                f"({r['config']})")
        if r.get("error"):
            status = f"FAILED {r['error'][:160]}"
        else:
            status = (f"REG {r['regs']} STACK {r['stack']} LOCAL {r['local']} shared "
                      f"{r['shared']}")
        progress(f"[{len(done)}/{total}] {what}: {status} ({r['compile_s']} s)")

    if jobs <= 1:
        for task in tasks:
            if deadline is not None and time.monotonic() > deadline:
                break
            report(run_task(task))
    else:
        ctx = multiprocessing.get_context("spawn")
        pool = ctx.Pool(jobs, initializer=_init_worker)
        try:
            results = pool.imap_unordered(run_task, tasks)
            while len(done) < total:
                timeout = None if deadline is None else max(deadline - time.monotonic(), 0)
                try:
                    report(results.next(timeout=timeout))
                except multiprocessing.TimeoutError:
                    break
                except StopIteration:
                    break
        finally:
            pool.terminate()
            pool.join()
    rows = []
    for task in tasks:
        row = done.get(task.index)
        rows.append(task_row(task, error="not compiled: time limit") if row is None else row)
    return rows


# ------------------------------------------------------------------ outputs
def write_csv(rows: Sequence[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in CSV_COLUMNS})


def _kib(n) -> str:
    return f"{int(n) / 1024:.0f}"


def _ok(row: dict) -> bool:
    return not row.get("error")


def _is_time_limit(row: dict) -> bool:
    return str(row.get("error", "")).startswith("not compiled")


def summary_markdown(rows: Sequence[dict], title: str, command: str,
                     provenance: str = "") -> str:
    """The markdown summary of a run's rows (see the module docstring)."""
    lines = [f"# {title}", "",
             f"Written by `{command}`: every kernel the launchers run, compiled for the target "
             "without a GPU. REG: registers per thread (255 at most); STACK / LOCAL: bytes per "
             "thread of stack frame / local memory (> 0: spills); shared: the launch's dynamic "
             f"shared memory per block, KiB (at most {MAX_SHARED_PER_BLOCK} B = 227 KiB; each "
             "block also reserves 1 KiB); blocks/SM: resident blocks per SM estimated from "
             "registers, shared memory and warps. Cells: REG/STACK/shared KiB. A compile of "
             "0 s is a kernel identical to an earlier one (Triton's cache).", ""]
    if provenance:
        lines += [provenance, ""]
    compiled = [r for r in rows if _ok(r)]
    failed = [r for r in rows if not _ok(r) and not _is_time_limit(r)]
    not_run = [r for r in rows if _is_time_limit(r)]
    spilling = [r for r in compiled if int(r["spills"])]
    over = [r for r in compiled if int(r["over_shared"])]
    lines += [f"{len(rows)} compiles: {len(compiled)} compiled ({len(spilling)} spill, "
              f"{len(over)} over the shared-memory limit), {len(failed)} failed, "
              f"{len(not_run)} not run (time limit).", ""]

    lines += ["## Failed compiles", ""]
    if failed:
        errors: Dict[str, List[dict]] = {}
        for r in failed:
            errors.setdefault(r["error"], []).append(r)
        for error, group in errors.items():
            where = "; ".join(f"{r['kernel']} {r['variant']} {r['dtype']} d{r['head_dim']} "
                              f"{r['candidate']} ({r['config']})" for r in group)
            lines += [f"- {where}:", f"  `{error[:600]}`"]
    else:
        lines.append("None.")
    lines.append("")

    lines += ["## Shared memory over the limit", ""]
    if over:
        for r in over:
            lines.append(f"- {r['kernel']} {r['variant']} {r['dtype']} d{r['head_dim']} "
                         f"{r['candidate']} ({r['config']}): {_kib(int(r['shared']))} KiB")
    else:
        lines.append("None.")
    lines.append("")

    # Per candidate, over its variants.
    lines += ["## Per candidate (worst over variants)", "",
              "| kernel | dtype | d | candidate | config | variants | REG max | spill in | "
              "STACK max | shared KiB max | blocks/SM min |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    keyed: Dict[tuple, List[dict]] = {}
    for r in rows:
        key = (r["kernel"], r["dtype"], int(r["head_dim"]), r["candidate"], r["config"])
        keyed.setdefault(key, []).append(r)
    order = KERNEL_ORDER
    for key in sorted(keyed, key=lambda k: (order[k[0]], k[1], k[2], k[3])):
        group = keyed[key]
        ok = [r for r in group if _ok(r)]
        bad = len([r for r in group if not _ok(r) and not _is_time_limit(r)])
        if not ok:
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {key[4]} | "
                         f"{len(group)} | - | - | - | - | - |" + (f" {bad} failed" if bad else ""))
            continue
        spill = [r for r in ok if int(r["spills"])]
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {key[4]} | {len(ok)}"
            f"{f' ({bad} failed)' if bad else ''} | {max(int(r['regs']) for r in ok)} | "
            f"{len(spill)}/{len(ok)} | {max(int(r['stack']) for r in ok)} | "
            f"{_kib(max(int(r['shared']) for r in ok))} | "
            f"{min(int(r['blocks_per_sm']) for r in ok)} |")
    lines.append("")

    # Candidate x variant tables.
    lines += ["## Per candidate and variant", ""]
    tables: Dict[tuple, List[dict]] = {}
    for r in rows:
        tables.setdefault((r["kernel"], r["dtype"], int(r["head_dim"])), []).append(r)
    for key in sorted(tables, key=lambda k: (order[k[0]], k[1], k[2])):
        group = tables[key]
        names = ALL_DECODE_VARIANTS if key[0].startswith("decode") else ALL_VARIANTS
        variants = [v for v in names if any(r["variant"] == v for r in group)]
        configs = []
        for r in group:
            c = (r["candidate"], r["config"])
            if c not in configs:
                configs.append(c)
        lines += [f"### {key[0]} {key[1]} d={key[2]}", "",
                  "| candidate | config | " + " | ".join(variants) + " |",
                  "|---|---|" + "---|" * len(variants)]
        cells = {(r["candidate"], r["config"], r["variant"]): r for r in group}
        for cand, cfg in configs:
            out = []
            for v in variants:
                r = cells.get((cand, cfg, v))
                if r is None:
                    out.append("")
                elif _is_time_limit(r):
                    out.append("not run")
                elif not _ok(r):
                    out.append("FAILED")
                else:
                    mark = " **spill**" if int(r["spills"]) else ""
                    out.append(f"{r['regs']}/{r['stack']}/"
                               f"{_kib(int(r['shared']))}{mark}")
            lines.append(f"| {cand} | {cfg} | " + " | ".join(out) + " |")
        lines.append("")
    lines += ["## Variants", ""]
    decode = any(r["kernel"].startswith("decode") for r in rows)
    attention = not decode or any(not r["kernel"].startswith("decode") for r in rows)
    for v in (VARIANTS if attention else ()) + (DECODE_VARIANTS if decode else ()):
        lines.append(f"- {v.name}{' (decode)' if v.kind == 'decode' and attention else ''}: "
                     f"{v.describe()}")
    if decode:
        lines += ["", DECODE_NOTE]
    lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------ command line
def parse_target(text: str) -> int:
    match = re.fullmatch(r"sm_?(\d{2,3})", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a target like sm_90, got {text!r}")
    return int(match.group(1))


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = CliParser(description=__doc__.split("\n\n")[0],
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", type=parse_target, default=90, help="GPU target, e.g. sm_90")
    p.add_argument("--quick", action="store_true",
                   help="bf16, head dims 64 and 128, the first two candidates of each group")
    p.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="seconds; compiles not finished by then are listed as not run")
    p.add_argument("--kernels", choices=KERNEL_CHOICES, default="attention",
                   help="attention (forward and backward, the default), decode (KV-cache "
                        "decode and combine) or all")
    p.add_argument("--variants", type=lambda s: s.split(","), default=None,
                   help=f"comma-separated subset of {','.join(ALL_VARIANTS)} (attention) or "
                        f"{','.join(ALL_DECODE_VARIANTS)} (decode)")
    p.add_argument("--dtypes", type=lambda s: s.split(","), default=None,
                   help="comma-separated subset of bf16,fp16,fp32")
    p.add_argument("--head-dims", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="comma-separated subset of 32,64,128")
    p.add_argument("--candidates", type=int, default=None,
                   help="the first N candidates of each group only")
    p.add_argument("--extra", type=Path, default=None,
                   help='JSON {"fwd"|"bwd": {group: [[config], ...]}}: candidates to add')
    p.add_argument("--extra-only", action="store_true",
                   help="compile the --extra candidates alone")
    p.add_argument("--csv", type=Path, default=None, help="CSV path (default under results/)")
    p.add_argument("--md", type=Path, default=None, help="summary path (default beside CSV)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="Triton cache to use and keep (default: a fresh one per run, so compile "
                        "seconds are real compiles)")
    p.add_argument("--tma", action="store_true",
                   help="the forward with tensor-descriptor (TMA) loads, as DIFFATTN_TMA=1 runs "
                        "it on Hopper")
    p.add_argument("--list", action="store_true",
                   help="print the recorded launches as JSON lines and compile nothing")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.time_limit is not None and args.time_limit <= 0:
        p.error(f"--time-limit must be positive, got {args.time_limit}")
    if args.extra_only and args.extra is None:
        p.error("--extra-only needs --extra")
    if args.candidates is not None and args.candidates < 1:
        p.error(f"--candidates must be at least 1, got {args.candidates}")
    known_variants = {"attention": ALL_VARIANTS, "decode": ALL_DECODE_VARIANTS,
                      "all": ALL_VARIANTS + ALL_DECODE_VARIANTS}[args.kernels]
    for name, given, allowed in (("--variants", args.variants, tuple(dict.fromkeys(
                                     known_variants))),
                                 ("--dtypes", args.dtypes, ("bf16", "fp16", "fp32")),
                                 ("--head-dims", args.head_dims, (32, 64, 128))):
        unknown = [x for x in (given or []) if x not in allowed]
        if unknown:
            p.error(f"{name}: unknown {', '.join(map(str, unknown))}; expected some of "
                    f"{', '.join(map(str, allowed))}")
    return args


def spec_json(task: Task) -> str:
    """A task as one JSON line (for --list)."""
    spec = task.spec
    return json.dumps({"kernel": spec.kernel, "variant": task.variant, "dtype": task.dtype,
                       "head_dim": task.head_dim, "candidate": task.candidate,
                       "config": list(task.config), "signature": spec.signature,
                       "constexprs": {str(k): v for k, v in spec.constexprs.items()},
                       "attrs": {str(k): v for k, v in spec.attrs.items()},
                       "options": spec.options})


def command_args(argv: Sequence[str]) -> List[str]:
    """The arguments of a run without its output paths (for the summary)."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--csv", "--md"):
            skip = True
        elif not a.startswith(("--csv=", "--md=")):
            kept.append(a)
    return kept


def kernels_revision() -> str:
    """Which kernels were compiled: the git commit of the kernels' source, with a note when
    kernels/ has uncommitted changes ("" outside git)."""
    kernels_dir = Path(importlib.import_module("diffattn.kernels").__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(kernels_dir), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(kernels_dir), "status", "--porcelain", "."],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return f"Kernels: commit {rev}" + (" with uncommitted changes in kernels/." if dirty else ".")


def default_paths(arch: int, quick: bool, tma: bool = False,
                  kernels: str = "attention") -> Tuple[Path, Path]:
    import triton
    version = ".".join(triton.__version__.split(".")[:2])
    kind = {"attention": "", "decode": "decode-", "all": "all-"}[kernels]
    stem = (f"sm{arch}-{kind}resources-triton{version}{'-quick' if quick else ''}"
            f"{'-tma' if tma else ''}")
    return RESULTS_DIR / f"{stem}.csv", RESULTS_DIR / f"{stem}.md"


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    # A fresh Triton cache (unless --cache-dir): compile seconds are real compiles.
    cache = tempfile.TemporaryDirectory(prefix="triton-resources-") if args.cache_dir is None \
        else None
    os.environ["TRITON_CACHE_DIR"] = str(args.cache_dir) if cache is None else cache.name
    try:
        return _run(args, argv)
    finally:
        if cache is not None:
            cache.cleanup()


def _run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    try:
        check_environment()
        extra = json.loads(args.extra.read_text()) if args.extra else None
        lists = candidate_lists(extra)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    limit = QUICK_CANDIDATES if args.quick else args.candidates
    run_cases = cases(args.quick, args.variants, args.dtypes, args.head_dims, args.kernels)
    if not run_cases:
        print("error: no case matches the given variants, dtypes and head dims",
              file=sys.stderr)
        return 2
    start = time.monotonic()
    tasks = all_tasks(run_cases, lists, limit, args.target, args.extra_only, args.tma)
    if args.list:
        for task in tasks:
            print(spec_json(task))
        return 0
    import triton
    csv_path, md_path = default_paths(args.target, args.quick, args.tma, args.kernels)
    csv_path = args.csv or csv_path
    md_path = args.md or (csv_path.with_suffix(".md") if args.csv else md_path)
    print(f"{len(tasks)} compiles for sm_{args.target} with triton {triton.__version__}, "
          f"{args.jobs} jobs, {len(run_cases)} cases", flush=True)
    deadline = None if args.time_limit is None else start + args.time_limit
    rows = run_tasks(tasks, args.jobs, deadline, progress=lambda s: print(s, flush=True))
    write_csv(rows, csv_path)
    command = " ".join(["python tools/sm90_resources.py"] + command_args(argv))
    title = f"Kernel resources for sm_{args.target}, triton {triton.__version__}" + \
        {"attention": "", "decode": ", KV-cache decode kernels",
         "all": ", attention and KV-cache decode kernels"}[args.kernels] + \
        (" (quick subset)" if args.quick else "") + \
        (", forward with tensor-descriptor (TMA) loads" if args.tma else "")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text(summary_markdown(rows, title, command, kernels_revision()))
    failed = [r for r in rows if r.get("error") and not _is_time_limit(r)]
    print(f"wrote {csv_path} and {md_path}: {len(rows)} compiles, {len(failed)} failed, "
          f"{time.monotonic() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
