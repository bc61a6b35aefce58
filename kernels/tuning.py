"""Which tile configuration a kernel call runs: decided once per call class and length bucket,
then a dictionary lookup on every later call.

A call is keyed by its class (dtype, padded head and value widths, key layout, causal) and by
its sequence lengths rounded up to powers of two, so a new length in the same bucket reuses the
choice instead of tuning again. On the first call of a key the configuration comes from, in
order:

1. the committed table of tuned winners, ``tuned_configs.json`` beside this file, for this
   GPU architecture (``sm_90`` for an H100): the entry of the same class at the nearest
   length bucket. ``tools/tune.py`` writes it from a sweep on the GPU, so the choices can
   be read and reviewed without one;
2. with autotuning on (the default; ``DIFFATTN_AUTOTUNE=0`` switches it off), a timing of every
   candidate of the class on this first call, keeping the fastest. Never while a CUDA graph is
   being captured or torch.compile is tracing (the table or the first candidate is used then);
3. the first candidate of the class (``kernels/config.py``).
Under ``TRITON_INTERPRET=1`` a single fixed configuration is used.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Sequence

import torch

from .config import (BWD_CANDIDATES, BWD_FIELDS, FWD_CANDIDATES, FWD_FIELDS, INTERPRET,
                     INTERPRET_BWD, INTERPRET_FWD, candidate_group)

AUTOTUNE = os.environ.get("DIFFATTN_AUTOTUNE", "1") != "0"
TABLE_PATH = Path(__file__).with_name("tuned_configs.json")
TABLE_FORMAT = 1
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                torch.float64: "fp64"}


def length_bucket(n) -> int:
    """The power of two >= n (at least 16) that keys a sequence length. Symbolic lengths (while
    torch.compile traces) use their example value, so no guard is added on them."""
    if not isinstance(n, int):
        n = _size_hint(n)
    return 16 if n <= 16 else 1 << (n - 1).bit_length()


def _size_hint(n) -> int:
    try:
        from torch.fx.experimental.symbolic_shapes import hint_int
        return hint_int(n)
    except Exception:  # no hint available: any bucket gives correct results
        return 1024


def call_class(dtype: torch.dtype, block_d: int, block_dv: int, key_pair: bool,
               causal: bool) -> str:
    """The class part of a key, as written in the table: e.g. "bf16/d64/dv128/pair/causal"."""
    return (f"{_DTYPE_NAMES[dtype]}/d{block_d}/dv{block_dv}/{'pair' if key_pair else 'shared'}"
            f"/{'causal' if causal else 'full'}")


def bucket_name(n_bucket: int, m_bucket: int) -> str:
    return f"{n_bucket}x{m_bucket}"


def gpu_arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def read_table(path: Optional[Path] = None) -> dict:
    """The tuned-winners table: {arch: {kernel: {class: {"NxM": config}}}} (empty if absent)."""
    path = TABLE_PATH if path is None else path
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable tile table ({exc})") from exc
    if data.get("format") != TABLE_FORMAT:
        raise ValueError(f"{path}: tile table format {data.get('format')!r}, expected "
                         f"{TABLE_FORMAT}")
    return data.get("arch", {})


def nearest_entry(entries: Dict[str, Sequence[int]], n_bucket: int,
                  m_bucket: int) -> Optional[tuple]:
    """The configuration of the bucket closest to (n_bucket, m_bucket) in log2 distance
    (ties: the smaller bucket), or None."""
    best, best_dist = None, None
    for name, config in sorted(entries.items()):
        n, m = (int(x) for x in name.split("x"))
        dist = (abs(math.log2(n) - math.log2(n_bucket)) + abs(math.log2(m) - math.log2(m_bucket)),
                n * m)
        if best_dist is None or dist < best_dist:
            best, best_dist = tuple(config), dist
    return best


def time_candidates(run: Callable[[tuple], None], candidates: Sequence[tuple]) -> tuple:
    """(fastest configuration, {configuration: ms}) by triton.testing.do_bench of ``run(c)``
    for each candidate; candidates that fail to compile or launch (e.g. out of shared memory)
    are left out."""
    from triton.testing import do_bench
    times, first_error = {}, None
    for config in candidates:
        try:
            times[config] = do_bench(lambda: run(config), warmup=5, rep=20)
        except Exception as exc:  # a candidate the device cannot run
            first_error = first_error or exc
    if not times:
        raise RuntimeError(f"no tile configuration could run: {first_error}") from first_error
    return min(times, key=times.get), times


class TileChooser:
    """The tile configuration of one kernel ("fwd" or "bwd"), chosen per key and remembered."""

    def __init__(self, kernel: str, candidates: dict, fields: tuple, interpret_config: tuple):
        self.kernel, self.candidates, self.fields = kernel, candidates, fields
        self.interpret_config = interpret_config
        self.chosen: Dict[tuple, tuple] = {}
        self._table: Optional[dict] = None

    def key(self, device: torch.device, dtype: torch.dtype, block_d: int, block_dv: int,
            key_pair: bool, causal: bool, n, m) -> tuple:
        return (device.index, dtype, block_d, block_dv, key_pair, causal, length_bucket(n),
                length_bucket(m))

    def table(self) -> dict:
        if self._table is None:
            self._table = read_table()
        return self._table

    def choose(self, key: tuple, device: torch.device,
               run: Optional[Callable[[tuple], None]] = None) -> tuple:
        """The configuration for ``key`` (see the module docstring). ``run(config)`` launches
        the call with a configuration; it is timed per candidate when autotuning applies
        (None: never tune, e.g. while tracing)."""
        config = self.chosen.get(key)
        if config is not None:
            return config
        if INTERPRET:
            return self.interpret_config
        _, dtype, block_d, block_dv, key_pair, causal, n_bucket, m_bucket = key
        candidates = self.candidates[candidate_group(dtype, block_dv)]
        cls = call_class(dtype, block_d, block_dv, key_pair, causal)
        entries = self.table().get(gpu_arch(device), {}).get(self.kernel, {}).get(cls)
        config = nearest_entry(entries, n_bucket, m_bucket) if entries else None
        remember = True
        if config is None:
            if AUTOTUNE and run is not None and not torch.cuda.is_current_stream_capturing():
                config, _ = time_candidates(run, candidates)
            else:
                config = candidates[0]
                remember = run is not None  # a traced call leaves eager calls free to tune
        if remember:
            self.chosen[key] = config
        return config

    def launch_kwargs(self, config: tuple) -> dict:
        return dict(zip(self.fields, config))


FWD_TILES = TileChooser("fwd", FWD_CANDIDATES, FWD_FIELDS, INTERPRET_FWD)
BWD_TILES = TileChooser("bwd", BWD_CANDIDATES, BWD_FIELDS, INTERPRET_BWD)


@contextlib.contextmanager
def untuned_tile_choice(arch: str = "sm_untuned") -> Iterator[None]:
    """Inside the block, tiles are chosen as on a GPU named ``arch`` that has no entry in the
    tuned table, with autotuning off: the first candidate of each class. The choices made
    inside are forgotten on exit. For tools that record or count launches without a GPU."""
    global gpu_arch, AUTOTUNE
    saved = (gpu_arch, AUTOTUNE, [dict(c.chosen) for c in (FWD_TILES, BWD_TILES)])
    gpu_arch, AUTOTUNE = (lambda device: arch), False
    try:
        yield
    finally:
        gpu_arch, AUTOTUNE = saved[0], saved[1]
        for chooser, before in zip((FWD_TILES, BWD_TILES), saved[2]):
            chooser.chosen.clear()
            chooser.chosen.update(before)


@contextlib.contextmanager
def forced_tiles(fwd: Optional[tuple] = None, bwd: Optional[tuple] = None) -> Iterator[None]:
    """Inside the block the forward / backward run the given tile configurations (in the
    order of config.FWD_FIELDS / BWD_FIELDS; None keeps the normal choice). For tools that
    time or compile one configuration at a time (tools/tune.py, tools/sm90_resources.py);
    blocks may nest."""
    forced = [(c, tuple(cfg)) for c, cfg in ((FWD_TILES, fwd), (BWD_TILES, bwd))
              if cfg is not None]
    saved = [(chooser, chooser.__dict__.get("choose")) for chooser, _ in forced]
    try:
        for chooser, config in forced:
            chooser.choose = lambda key, device, run=None, _config=config: _config
        yield
    finally:
        for chooser, before in reversed(saved):
            if before is None:
                chooser.__dict__.pop("choose", None)
            else:
                chooser.choose = before
