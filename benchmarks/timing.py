"""How benchmarks/throughput.py times things: three clocks for three kinds of work.

- :class:`Timer` (op and layer level): ``triton.testing.do_bench`` on CUDA (L2 cleared before
  each call; median, 20th and 80th percentile), ``time.perf_counter`` around each of a few
  calls on CPU. Also the peak memory of one call.
- :func:`time_back_to_back` (host level): the wall time per call of a loop of many calls with
  no synchronisation inside it (one synchronisation before the loop and one after), repeated
  for percentiles. When the device is fast and the call tiny, this is what the host costs.
- :func:`time_steps` (model level): whole training or inference steps run back to back, the
  time of each step from CUDA events recorded between steps on the stream (one
  synchronisation at the end, so a host-bound step shows as the GPU waiting), or
  ``time.perf_counter`` on CPU.

All return [p50, p20, p80] in milliseconds.
"""
from __future__ import annotations

import math
import time
from typing import Callable, List, Sequence

import torch

QUANTILES = (0.5, 0.2, 0.8)


def quantiles_ms(times_ms: Sequence[float]) -> List[float]:
    """[p50, p20, p80] of a list of milliseconds (linear interpolation)."""
    return torch.tensor(list(times_ms), dtype=torch.float64).quantile(
        torch.tensor(QUANTILES, dtype=torch.float64)).tolist()


def clear_grads(tensors: Sequence[torch.Tensor]) -> None:
    for t in tensors:
        t.grad = None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Times one call of the op or layer level: do_bench on CUDA, perf_counter on CPU."""

    def __init__(self, on_cuda: bool, warmup_ms: int, rep_ms: int, cpu_repeats: int):
        self.on_cuda = on_cuda
        self.warmup_ms, self.rep_ms, self.cpu_repeats = warmup_ms, rep_ms, cpu_repeats

    def time_ms(self, fn: Callable, leaves: Sequence[torch.Tensor]) -> List[float]:
        """[p50, p20, p80] in milliseconds; ``leaves``' grads are reset before each call."""
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
        return quantiles_ms(times)

    def peak_mem_mb(self, fn: Callable, leaves: Sequence[torch.Tensor]) -> float:
        """MiB allocated at the peak of one call above what was allocated before it (NaN on
        CPU)."""
        return peak_mem_mb(fn, leaves) if self.on_cuda else math.nan


def peak_mem_mb(fn: Callable, leaves: Sequence[torch.Tensor] = ()) -> float:
    """MiB allocated on the current CUDA device at the peak of one call of ``fn`` above what
    was allocated just before it."""
    clear_grads(leaves)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2 ** 20


def time_back_to_back(call: Callable[[], object], device: torch.device, *, calls: int,
                      loops: int, warmup_calls: int) -> List[float]:
    """Wall time per call of ``calls`` back-to-back calls, no synchronisation inside the loop.

    ``warmup_calls`` calls first (compilation, tile choice, caches), then ``loops`` timed
    loops, each between one synchronisation before and one after. Returns the [p50, p20, p80]
    over the loops of (loop time / calls), in milliseconds.
    """
    if calls < 1 or loops < 1:
        raise ValueError(f"calls and loops must be >= 1, got calls={calls}, loops={loops}")
    for _ in range(warmup_calls):
        call()
    per_call = []
    for _ in range(loops):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            call()
        synchronize(device)
        per_call.append((time.perf_counter() - start) * 1e3 / calls)
    return quantiles_ms(per_call)


def time_steps(step: Callable[[], object], device: torch.device, *, steps: int,
               warmup_steps: int) -> List[float]:
    """[p50, p20, p80] of the time of one step, in milliseconds, over ``steps`` steps run back
    to back after ``warmup_steps`` untimed ones.

    On CUDA an event is recorded on the current stream before the first timed step and after
    each one, with no synchronisation until the last: step i's time is the GPU-side interval
    between its two events, which includes any time the GPU waited for the host to launch.
    On CPU, perf_counter around each step.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    for _ in range(warmup_steps):
        step()
    if device.type != "cuda":
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        return quantiles_ms(times)
    synchronize(device)
    events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    events[0].record()
    for i in range(steps):
        step()
        events[i + 1].record()
    synchronize(device)
    return quantiles_ms([events[i].elapsed_time(events[i + 1]) for i in range(steps)])
