"""CPU tests of the benchmark's host level (benchmarks/host.py, benchmarks/timing.py).

The host-only run (kernel launches replaced by no-ops) is exercised as a benchmark: its rows
must exist and be finite; no test asserts how fast anything is.
"""
from __future__ import annotations

import functools
import importlib
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import host  # noqa: E402
import summary  # noqa: E402
import throughput  # noqa: E402
import timing  # noqa: E402
from diffattn import diff_attention, diff_attention_v2  # noqa: E402

CPU = torch.device("cpu")
FWD_MODULE = importlib.import_module("diffattn.kernels.diff_attn_fwd")
BWD_MODULE = importlib.import_module("diffattn.kernels.diff_attn_bwd")
TUNING = importlib.import_module("diffattn.kernels.tuning")
BACKEND = importlib.import_module("diffattn.backend")
OPS = importlib.import_module("diffattn.autograd")


def _v1_inputs(dtype=torch.bfloat16, requires_grad=True):
    q = torch.randn(1, 16, 2, 64, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(1, 16, 2, 64, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(1, 16, 1, 128, dtype=dtype, requires_grad=requires_grad)
    lam = torch.full((1,), 0.5, requires_grad=requires_grad)
    return q, k, v, lam


def _real_state():
    launchers = (FWD_MODULE.diff_attn_fwd_launch, BWD_MODULE.diff_attn_bwd_rows_launch,
                 BWD_MODULE.diff_attn_bwd_launch)
    return (*[(x.kernel, x.fast, dict(x.compiled)) for x in launchers],
            BACKEND.triton_unavailable_reason,
            TUNING.gpu_arch, TUNING.AUTOTUNE, TUNING.INTERPRET, OPS.INTERPRET,
            dict(TUNING.FWD_TILES.chosen), dict(TUNING.BWD_TILES.chosen))


def test_kernels_not_launched_runs_the_library_on_cpu_and_restores_everything():
    before = _real_state()
    with host.kernels_not_launched() as stubs:
        q, k, v, lam = _v1_inputs()
        out = diff_attention(q, k, v, lambda_=lam, backend="triton")
        assert out.shape == (1, 16, 1, 128) and out.dtype == torch.bfloat16
        torch.autograd.grad(out, (q, k, v, lam), torch.ones_like(out))
        assert {name: s.launches for name, s in stubs.items()} == {
            "diff_attn_fwd_kernel": 1, "diff_attn_bwd_rows_kernel": 1,
            "diff_attn_bwd_kernel": 1}
        with torch.no_grad():
            out2 = diff_attention_v2(q, k[:, :, :1], v[..., :64], lambda_=torch.rand(1, 16, 1),
                                     backend="triton")
        assert out2.shape == (1, 16, 1, 64)
        assert stubs["diff_attn_fwd_kernel"].launches == 2
        # a second call of the same key takes the launch shortcut, which launches too
        torch.autograd.grad(diff_attention(q, k, v, lambda_=lam, backend="triton"), (q, k, v, lam),
                            torch.ones_like(out))
        assert [s.launches for s in stubs.values()] == [3, 2, 2]
        assert len(FWD_MODULE.diff_attn_fwd_launch.compiled) == 2  # V1 and V2
    assert _real_state() == before


def test_tile_choice_takes_the_untuned_gpu_path_once_per_key(monkeypatch):
    """Inside the host-only run the first call of a key picks the first candidate (no table
    entry, autotuning off) and later calls find it in the dictionary."""
    calls = []
    real_choose = TUNING.TileChooser.choose

    def counting_choose(self, key, device, run=None):
        calls.append((self.kernel, key in self.chosen))
        return real_choose(self, key, device, run)
    monkeypatch.setattr(TUNING.TileChooser, "choose", counting_choose)
    monkeypatch.setattr(TUNING, "time_candidates",
                        lambda *a: pytest.fail("no candidate timing in the host-only run"))
    with host.kernels_not_launched():
        q, k, v, lam = _v1_inputs(requires_grad=False)
        for _ in range(3):
            diff_attention(q, k, v, lambda_=lam, backend="triton")
        (key, config), = [(k_, c) for k_, c in TUNING.FWD_TILES.chosen.items()
                          if k_[1] == torch.bfloat16 and k_[-2:] == (16, 16)]
        from diffattn.kernels.config import FWD_CANDIDATES
        assert config == FWD_CANDIDATES["narrow"][0]
    assert calls == [("fwd", False), ("fwd", True), ("fwd", True)]


def test_stub_kernel_counts_and_ignores_arguments():
    stub = host.NoLaunchKernel("k")
    compiled = stub[(1, 2)](1, 2, BLOCK_M=64)
    assert stub.launches == 1
    compiled.run(1, 2, 1, 0, compiled.function, compiled.packed_metadata,
                 compiled.launch_metadata((1, 2), 0, 1, 2), None, None, 1, 2, 64)
    assert stub.launches == 2


@pytest.mark.parametrize("provider", ["diffattn_no_launch", "diffattn_v2_no_launch", "sdpa_x2",
                                      "flash_v2"])
def test_host_cases_give_finite_times(provider):
    timer = functools.partial(timing.time_back_to_back, calls=5, loops=3, warmup_calls=2)
    for mode in host.HOST_MODES:
        times, peak = host.run_host_case(provider, mode, torch.bfloat16, CPU, timer)
        assert len(times) == 3 and all(t > 0 and math.isfinite(t) for t in times)
        assert math.isnan(peak)


def test_host_call_checks_its_arguments():
    with pytest.raises(ValueError, match="mode must be one of"):
        host.host_call("diffattn", "bwd", torch.bfloat16, CPU)
    with pytest.raises(ValueError, match="unknown host-level provider 'naive'"):
        host.host_call("naive", "fwd", torch.bfloat16, CPU)


def test_back_to_back_loop_counts_and_checks():
    count = []
    times = timing.time_back_to_back(lambda: count.append(1), CPU, calls=7, loops=3,
                                     warmup_calls=4)
    assert len(count) == 4 + 3 * 7 and len(times) == 3
    with pytest.raises(ValueError, match="calls and loops"):
        timing.time_back_to_back(lambda: None, CPU, calls=0, loops=1, warmup_calls=0)


def test_time_steps_on_cpu():
    count = []
    times = timing.time_steps(lambda: count.append(1), CPU, steps=4, warmup_steps=2)
    assert len(count) == 6 and len(times) == 3 and times[1] <= times[0] <= times[2]
    with pytest.raises(ValueError, match="steps must be >= 1"):
        timing.time_steps(lambda: None, CPU, steps=0, warmup_steps=0)


def test_runner_writes_host_only_rows():
    """The host level through the runner, as throughput.py --levels host runs it: rows exist,
    carry the host-only device label and are finite."""
    args = throughput.parse_args(["--quick", "--levels", "host", "--host-calls", "5",
                                  "--host-loops", "3"])
    throughput.apply_defaults(args, on_cuda=False)
    env = throughput.Environment(CPU, "cpu", "2.x", "3.x", False)
    plan = throughput.build_plan(args, on_cuda=False, interpret=False, model_available=False)
    assert {c.provider for c in plan} == {"sdpa_x2", "flash_v2", "diffattn_no_launch",
                                          "diffattn_v2_no_launch"}
    report = summary.Report()
    runner = throughput.Runner(env, args, None, None, report, None, 1e12)
    for case in plan:
        runner.run(case)
    assert not report.failed and not report.skipped
    rows = {(r["provider"], r["mode"]): r for r in runner.rows}
    assert len(rows) == 8
    for (provider, mode), r in rows.items():
        assert r["device"] == (host.NO_LAUNCH_DEVICE if provider.endswith("_no_launch")
                               else "cpu")
        assert (r["batch"], r["seq_len"], r["heads"], r["head_dim"]) == (1, 16, 1, 64)
        assert r["dtype"] == "bf16" and math.isfinite(r["ms_p50"]) and r["ms_p50"] > 0
    text = "\n".join(summary.host_table(runner.rows))
    assert "cpu (kernels not launched)" in text


def test_an_unknown_kernel_name_is_an_error_not_a_real_launch(monkeypatch):
    monkeypatch.setattr(host, "KERNEL_NAMES", host.KERNEL_NAMES + ("renamed_kernel",))
    with pytest.raises(KeyError, match="known kernels"):
        with host.kernels_not_launched():
            pass
    assert FWD_MODULE.diff_attn_fwd_launch.kernel is FWD_MODULE.diff_attn_fwd_kernel
