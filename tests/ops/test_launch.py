"""The launch shortcut (kernels/launch.py) against Triton's own launch path.

For every launch the shortcut takes, Triton's ``kernel[grid](...)`` with the same arguments
must pick the same compiled kernel and hand its launcher the same arguments. This needs
compiled-mode kernels, while tests/conftest.py turns on the interpreter on machines without a
GPU, so the check runs in a subprocess without TRITON_INTERPRET, against a stand-in driver
(target sm_90, device 0, stream 0) and a stand-in compiler: each specialisation Triton asks
to compile becomes a recorder object, so nothing is compiled or launched and no GPU is needed.

Covered: the real launchers of every variant (V1 with the norm, V1 plain, V2 per-token lambda,
key padding mask, causal, inference and training) on fp16/bf16/fp32/fp64 tensors, aligned and
misaligned pointers, lengths 1, 16 and 17; then recorded launches again with one argument
changed at a time: each integer through 0, 1, multiples of 16 or not, 32- and 64-bit values,
each pointer through every byte offset its dtype allows within 16 bytes.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_shortcut_launches_what_triton_would():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "shortcut launches checked:" in proc.stdout, proc.stdout
    checked = int(proc.stdout.split("shortcut launches checked:")[1].split()[0])
    assert checked >= 100, proc.stdout


def test_the_interpreter_always_takes_tritons_path():
    from diffattn.kernels import AttentionCall, diff_attn_bwd, diff_attn_fwd
    from diffattn.kernels.config import INTERPRET
    if not INTERPRET:
        pytest.skip("kernels are compiled here")
    fwd = sys.modules[diff_attn_fwd.__module__].diff_attn_fwd_launch
    bwd = sys.modules[diff_attn_bwd.__module__]
    assert not fwd.fast and not bwd.diff_attn_bwd_launch.fast
    assert not bwd.diff_attn_bwd_rows_launch.fast


def test_replaced_restores_the_launcher():
    from diffattn.kernels import diff_attn_fwd
    launcher = sys.modules[diff_attn_fwd.__module__].diff_attn_fwd_launch
    before = (launcher.kernel, launcher.fast, launcher.compiled, launcher._device)
    calls = []

    class Stand:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((grid, args, kwargs))
    x = torch.zeros(1)
    with pytest.raises(KeyError):
        with launcher.replaced(Stand(), fast=False):
            for _ in range(2):
                launcher((2, 1), X=x, n=3, scale=0.5, A=1)
            assert len(calls) == 2 and calls[1][0] == (2, 1) and calls[1][1] == ()
            assert calls[1][2]["X"] is x
            assert {k: v for k, v in calls[1][2].items() if k != "X"} == \
                {"n": 3, "scale": 0.5, "A": 1}
            raise KeyError("leave the block with an error")
    assert (launcher.kernel, launcher.fast, launcher.compiled, launcher._device) == before


def test_launch_path_says_which_path_and_why(monkeypatch):
    import diffattn.kernels.launch as launch
    path = launch.launch_path()
    reason = launch.shortcut_unavailable_reason()
    assert (path == "shortcut") == (reason is None)
    if reason is not None:
        assert reason in path
    monkeypatch.setattr(launch, "TESTED_TRITON", ((1, 0), (1, 1)))
    monkeypatch.setattr(launch, "ENABLED", True)
    monkeypatch.setattr(launch, "INTERPRET", False)
    assert "outside the versions the shortcut was tested with" in launch.launch_path()
    assert not launch.Launcher(lambda X: None).fast
    monkeypatch.setattr(launch, "ENABLED", False)
    assert "DIFFATTN_FAST_LAUNCH=0" in launch.launch_path()


def test_kernels_replaced_reaches_every_launcher_by_name():
    from diffattn.kernels.launch import LAUNCHERS, kernels_replaced
    names = {"diff_attn_fwd_kernel", "diff_attn_bwd_rows_kernel", "diff_attn_bwd_kernel"}
    stand_ins = {name: object() for name in names}
    with kernels_replaced(stand_ins, fast=False):
        assert all(LAUNCHERS[n].kernel is stand_ins[n] for n in names)
    assert all(LAUNCHERS[n].kernel is not stand_ins[n] for n in names)
    with pytest.raises(KeyError, match="known kernels"):
        with kernels_replaced({"no_such_kernel": object()}, fast=False):
            pass


def test_the_remembered_keys_are_bounded(monkeypatch):
    """A length that changes on every call must not grow the dictionary without bound."""
    import diffattn.kernels.launch as launch
    import triton.language as tl

    def kernel(X, n, scale, BLOCK: tl.constexpr):
        pass
    launcher = launch.Launcher(kernel)
    assert launcher.constexpr_names == ["BLOCK"]
    monkeypatch.setattr(launch, "MAX_REMEMBERED", 8)
    launched = []

    class Compiled:
        function = packed_metadata = None

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(args) or self

        def run(self, *args):
            launched.append(args)

        def launch_metadata(self, grid, stream, *args):
            return None
    x = torch.zeros(4)
    with launcher.replaced(Compiled(), fast=True):
        if not launcher.fast:
            pytest.skip("this triton has no launch shortcut")
        for n in range(20):
            for _ in range(2):
                launcher((1,), X=x, n=n, scale=0.5, BLOCK=16)
            assert len(launcher.compiled) <= 8
    assert len(launched) == 40


# ------------------------------------------------------------------ the subprocess
def _main() -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class StandInDriver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_device_interface(self):
            return torch.cuda

    driver.set_active(StandInDriver())
    log = []

    class Compiled:
        """One specialisation Triton asked to compile; its launcher records the launch."""
        function, packed_metadata = "function", "packed_metadata"

        def __init__(self, key):
            self.key = key

        def launch_metadata(self, grid, stream, *args):
            return None

        def run(self, *args):
            log.append((self, args))

    def stand_in_compile(self, key, signature, device, constexprs, options, attrs, warmup):
        compiled = Compiled(key)
        self.device_caches[device][0][key] = compiled
        return compiled
    JITFunction._do_compile = stand_in_compile

    from diffattn.kernels import AttentionCall, diff_attn_bwd, diff_attn_fwd
    from diffattn.kernels.launch import Launcher
    from diffattn.kernels.tuning import untuned_tile_choice
    untuned = untuned_tile_choice("sm_stand_in")  # for the rest of this process
    untuned.__enter__()
    fwd_module = sys.modules[diff_attn_fwd.__module__]
    bwd_module = sys.modules[diff_attn_bwd.__module__]
    launchers = (fwd_module.diff_attn_fwd_launch, bwd_module.diff_attn_bwd_rows_launch,
                 bwd_module.diff_attn_bwd_launch)
    assert all(x.fast for x in launchers), "the shortcut is off"

    recorded = []  # (launcher, grid, arguments by name)
    stats = {"launches": 0, "through_triton": 0}
    real_call, real_remember = Launcher.__call__, Launcher._launch_and_remember

    def counted_remember(self, *args):
        stats["through_triton"] += 1
        real_remember(self, *args)

    def checked_call(self, grid, wrap=None, **arguments):
        recorded.append((self, grid, arguments))
        real_call(self, grid, wrap, **arguments)
        stats["launches"] += 1
        launched = log[-1]
        self.kernel[grid](**arguments)  # Triton's own path
        expected = log[-1]
        if launched[0] is not expected[0]:
            raise AssertionError(f"{self.kernel.__name__}: compiled for {launched[0].key}, "
                                 f"Triton picks {expected[0].key}")
        if len(launched[1]) != len(expected[1]) or \
                any(a is not b and a != b for a, b in zip(launched[1], expected[1])):
            raise AssertionError(f"{self.kernel.__name__}: launch arguments {launched[1]} "
                                 f"differ from Triton's {expected[1]}")
    Launcher._launch_and_remember = counted_remember
    Launcher.__call__ = checked_call

    def tensors(*shape, dtype, misaligned=False):
        n = 1
        for s in shape:
            n *= s
        base = torch.zeros(n + 1, dtype=dtype)
        return (base[1:] if misaligned else base[:n]).view(shape)

    cases = 0
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for N in (1, 16, 17):
            for misaligned in (False, True):
                for variant in ("v1_norm", "v1", "v2"):
                    for causal, kpm, window in ((False, False, None), (True, False, None),
                                                (False, True, None), (True, True, (3, -1)),
                                                (False, False, (2, 5))):
                        B, H, d = 2, 2, 16
                        q = tensors(B, N, 2 * H, d, dtype=dtype, misaligned=misaligned)
                        pair = variant != "v2"
                        k = tensors(B, N, 2 * H if pair else H, d, dtype=dtype)
                        v = tensors(B, N, H, 2 * d if pair else d, dtype=dtype,
                                    misaligned=misaligned)
                        lam = torch.rand(B, N, H, dtype=acc) if variant == "v2" else \
                            torch.tensor(0.3, dtype=acc)
                        w = torch.ones(2 * d) if variant == "v1_norm" else None
                        mask = torch.zeros(B, N, dtype=torch.bool) if kpm else None
                        call = AttentionCall.create(
                            0.25, causal=causal, window_size=window, eps=1e-5,
                            out_scale=0.8 if w is not None else 1.0)
                        for save in (False, True):
                            for _ in range(2):  # the second call takes the shortcut
                                out = diff_attn_fwd(q, k, v, lam, mask, w, call,
                                                    save_for_backward=save)
                        _, x, o2, lse, rstd = out
                        dout = torch.randn_like(x)
                        for _ in range(2):
                            diff_attn_bwd(dout, q, k, v, lam, mask, w, (x, o2, lse, rstd),
                                          call)
                        cases += 1
    # recorded launches again, one argument changed at a time: each integer through values
    # that specialise differently, each pointer through byte offsets 0..15
    rng = random.Random(0)
    values = [0, 1, 2, 15, 16, 17, 31, 32, 48, 2**31 - 1, 2**31, 2**31 + 16, 2**32, 2**40 + 3]
    for launcher, grid, arguments in rng.sample(recorded, 24):
        runtime = set(launcher.runtime_names)
        for name, arg in arguments.items():
            if name not in runtime:
                continue
            if isinstance(arg, torch.Tensor):  # each byte offset its dtype allows
                storage = torch.zeros(64, dtype=torch.uint8)
                for offset in range(0, 16, arg.element_size()):
                    changed = {**arguments,
                               name: storage[offset:offset + 16].view(arg.dtype)}
                    for _ in range(2):
                        launcher(grid, **changed)
            elif isinstance(arg, int):
                for value in values:
                    for _ in range(2):
                        launcher(grid, **{**arguments, name: value})
    remembered = sum(len(x.compiled) for x in launchers)
    print(f"cases: {cases}; remembered specialisations: {remembered}; launches: "
          f"{stats['launches']}; shortcut launches checked: "
          f"{stats['launches'] - stats['through_triton']}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(_main())
