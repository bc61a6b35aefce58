"""CPU tests of tools/sm90_resources.py: the recorded launches match the kernels'
arguments, cuobjdump output parsing, the residency estimate, the cases of each kernel family,
bad arguments, and one real compile for sm_90 (skipped without ptxas).

The tool needs compiled-mode kernels, while tests/conftest.py turns on the interpreter on
machines without a GPU, so recording and compiling run in a subprocess without
TRITON_INTERPRET.
"""
from __future__ import annotations

import csv
import importlib
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "sm90_resources.py"
sys.path.insert(0, str(ROOT / "tools"))

import sm90_resources  # noqa: E402
from diffattn.kernels.config import BWD_CANDIDATES, FWD_CANDIDATES  # noqa: E402


def _tool(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=timeout)


def _params(kernel) -> list:
    """(name, is constexpr) of a kernel's parameters, compiled or interpreted."""
    fn = getattr(kernel, "fn", kernel)
    return [(name, "constexpr" in str(p.annotation))
            for name, p in inspect.signature(fn).parameters.items()]


def _ptxas() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


def test_recorded_signatures_match_the_kernels_arguments():
    proc = _tool("--list", "--variants", "v1_norm", "--dtypes", "bf16", "--head-dims", "64",
                 "--candidates", "1")
    assert proc.returncode == 0, proc.stderr
    launches = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    by_kernel = {x["kernel"]: x for x in launches}
    assert sorted(by_kernel) == ["bwd", "bwd_rows", "fwd"]
    fwd_mod = importlib.import_module("diffattn.kernels.diff_attn_fwd")
    bwd_mod = importlib.import_module("diffattn.kernels.diff_attn_bwd")
    kernels = {"fwd": fwd_mod.diff_attn_fwd_kernel,
               "bwd_rows": bwd_mod.diff_attn_bwd_rows_kernel,
               "bwd": bwd_mod.diff_attn_bwd_kernel}
    for name, kernel in kernels.items():
        launch = by_kernel[name]
        params = _params(kernel)
        assert list(launch["signature"]) == [p for p, _ in params]
        for i, (param, is_constexpr) in enumerate(params):
            if is_constexpr:
                assert launch["signature"][param] == "constexpr"
                assert str(i) in launch["constexprs"]
    fwd, bwd = by_kernel["fwd"], by_kernel["bwd"]
    names = list(fwd["signature"])

    def const(launch, param):
        return launch["constexprs"][str(list(launch["signature"]).index(param))]

    # bf16 tensors, fp32 lambda and statistics, sizes kept unspecialised, fp32 scalars.
    assert fwd["signature"]["Q"] == "*bf16" and fwd["signature"]["LAM"] == "*fp32"
    assert fwd["signature"]["LSE"] == "*fp32" and fwd["signature"]["N"] == "i32"
    assert fwd["signature"]["eps"] == "fp32"
    assert set(fwd["signature"]["SCORE"]) == {"fp32"}  # the score hook's run-time values
    assert fwd["attrs"][str(names.index("Q"))] == "D"
    assert str(names.index("N")) not in fwd["attrs"]
    # V1 d=64 with the epilogue: value width 128, the narrow group's first candidate.
    assert (const(fwd, "HEAD_DIM"), const(fwd, "HEAD_DIM_V")) == (64, 128)
    assert const(fwd, "KEY_PAIR") is True and const(fwd, "HAS_NORM") is True
    first = FWD_CANDIDATES["narrow"][0]
    assert fwd["config"] == list(first)
    assert (const(fwd, "BLOCK_M"), const(fwd, "BLOCK_N")) == first[:2]
    assert (fwd["options"]["num_warps"], fwd["options"]["num_stages"]) == first[2:]
    first = BWD_CANDIDATES["narrow"][0]
    assert bwd["config"] == list(first)
    assert tuple(const(bwd, f) for f in ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")) == \
        first[:4]
    assert (bwd["options"]["num_warps"], bwd["options"]["num_stages"]) == first[4:]


def test_resource_usage_parsing_and_residency():
    text = ("\nResource usage:\n Common:\n  GLOBAL:0\n Function other:\n  REG:10 STACK:0 "
            "SHARED:0 LOCAL:0 CONSTANT[0]:1\n Function diff_attn_fwd_kernel:\n  REG:255 "
            "STACK:1232 SHARED:1024 LOCAL:16 CONSTANT[0]:664 TEXTURE:0\n")
    usage = sm90_resources.parse_resource_usage(text, "diff_attn_fwd_kernel")
    assert usage == {"regs": 255, "stack": 1232, "static_shared": 1024, "local": 16}
    # 255 registers x 256 threads fill the register file once; 4 warps of 128 fit twice.
    assert sm90_resources.blocks_per_sm(255, 81920, 1024, 8) == 1
    assert sm90_resources.blocks_per_sm(128, 32768, 1024, 4) == 4
    assert sm90_resources.blocks_per_sm(64, 200000, 1024, 4) == 1


def test_cases_cover_the_variants():
    quick = sm90_resources.cases(quick=True)
    assert {c.dtype for c in quick} == {"bf16"} and {c.head_dim for c in quick} == {64, 128}
    assert {c.variant for c in quick} == set(sm90_resources.ALL_VARIANTS)
    full = sm90_resources.cases(quick=False)
    assert {c.dtype for c in full} == {"bf16", "fp16", "fp32"}
    assert {c.head_dim for c in full} == {32, 64, 128}
    assert len(full) == len(set(full))
    decode = sm90_resources.cases(quick=True, kernels="decode")
    assert {c.variant for c in decode} == set(sm90_resources.ALL_DECODE_VARIANTS)
    assert {c.kind for c in decode} == {"decode"}
    both = sm90_resources.cases(quick=True, kernels="all")
    assert len(both) == len(quick) + len(decode)


@pytest.mark.parametrize("args, message", [
    (["--jobs", "0"], "--jobs"),
    (["--variants", "v3"], "unknown v3"),
    (["--target", "hopper"], "sm_90"),
])
def test_bad_arguments_print_one_error_line(args, message):
    proc = _tool(*args, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]


@pytest.mark.skipif(not _ptxas(), reason="needs triton's bundled ptxas (NVIDIA backend)")
def test_one_real_compile_for_sm90(tmp_path):
    """The V2 inference forward at d=64 with the narrow group's first candidate: a few
    seconds of compiling (about 15 s with the subprocess's imports on two cores)."""
    out = tmp_path / "r.csv"
    proc = _tool("--variants", "v2_infer", "--dtypes", "bf16", "--head-dims", "64",
                 "--candidates", "1", "--jobs", "1", "--csv", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 1
    row = rows[0]
    assert (row["kernel"], row["target"], row["error"]) == ("fwd", "sm_90", "")
    assert 0 < int(row["regs"]) <= 255 and int(row["shared"]) > 0
    assert row["config"] == ",".join(map(str, FWD_CANDIDATES["narrow"][0]))
    summary = out.with_suffix(".md").read_text()
    assert "## Failed compiles\n\nNone." in summary


def test_tma_flag_records_the_forward_with_tensor_descriptors():
    """--tma records the forward as DIFFATTN_TMA=1 runs it on Hopper (kernels/tma.py's
    recording hook), without it the pointer loads."""
    if not hasattr(pytest.importorskip("triton.language"), "make_tensor_descriptor"):
        pytest.skip("this triton has no tensor descriptors")
    flags = []
    for extra in ([], ["--tma"]):
        proc = _tool("--list", "--variants", "v2_infer", "--dtypes", "bf16", "--head-dims", "64",
                     "--candidates", "1", *extra)
        assert proc.returncode == 0, proc.stderr
        fwd = json.loads(next(line for line in proc.stdout.splitlines()
                              if line.startswith("{")))
        flags.append(fwd["constexprs"][str(list(fwd["signature"]).index("USE_TMA"))])
    assert flags == [False, True]
