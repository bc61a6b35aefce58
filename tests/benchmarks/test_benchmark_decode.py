"""The decode level of benchmarks/throughput.py: every provider runs on CPU (the fused ones
through the interpreter) and computes the same step's attention; the plan has the decode rows
(fused ones on a GPU only) and a quick CPU run writes them."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import decode_providers  # noqa: E402
import providers  # noqa: E402
import throughput  # noqa: E402
from helpers import INTERPRET  # noqa: E402

SHAPE = providers.Shape("decode", 2, 128, 2, 16, False)
TORCH_PROVIDERS = ("sdpa_x2", "torch_path", "flash_v2", "torch_path_v2")


def _out(provider, shape=SHAPE):
    bench = decode_providers.decode_bench(provider, shape, torch.float32, torch.device("cpu"))
    assert set(bench.makers) == {"fwd"}
    return bench.makers["fwd"]()()


@pytest.mark.parametrize("v2", [False, True])
def test_torch_providers_agree(v2):
    names = ("flash_v2", "torch_path_v2") if v2 else ("sdpa_x2", "torch_path")
    a, b = (_out(p) for p in names)
    assert a.shape == (2, 1, 2, 16 if v2 else 32)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not INTERPRET, reason="the fused kernels on CPU need TRITON_INTERPRET=1")
@pytest.mark.parametrize("provider, baseline", [("diffattn_interpreter", "sdpa_x2"),
                                                ("diffattn_paged_interpreter", "sdpa_x2"),
                                                ("diffattn_v2_interpreter", "flash_v2")])
def test_fused_providers_match_baselines(provider, baseline):
    torch.testing.assert_close(_out(provider), _out(baseline), atol=1e-5, rtol=1e-5)


def test_unknown_provider_and_bad_length():
    with pytest.raises(ValueError, match="decode-level provider"):
        decode_providers.decode_bench("naive", SHAPE, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="multiple"):
        _out("torch_path", providers.Shape("decode", 1, 100, 2, 16, False))


def _args(argv):
    args = throughput.parse_args(argv)
    throughput.apply_defaults(args, on_cuda="--cuda" in argv)
    return args


def test_plan_has_decode_rows():
    gpu = throughput.build_plan(_args(["--quick", "--levels", "decode"]), on_cuda=True,
                                interpret=False, model_available=False)
    assert {c.provider for c in gpu} == set(decode_providers.DECODE_PROVIDERS)
    assert {(c.shape.batch, c.shape.seq_len) for c in gpu} == {(1, 65536), (8, 8192),
                                                               (64, 1024)}
    assert all(c.modes == ("fwd",) and c.level == "decode" for c in gpu)
    cpu = throughput.build_plan(_args(["--quick", "--levels", "decode"]), on_cuda=False,
                                interpret=True, model_available=False)
    names = {c.provider for c in cpu}
    assert names == set(TORCH_PROVIDERS) | set(decode_providers.DECODE_INTERPRETER_PROVIDERS)
    flops = throughput.case_flops("decode", "diffattn", providers.Shape("decode", 2, 1024, 8,
                                                                         64, False), "fwd")
    assert flops == 2 * 8 * 12 * 1024 * 64


def test_quick_decode_run_on_cpu(tmp_path):
    out = tmp_path / "out"
    code = throughput.main(["--quick", "--levels", "decode", "--providers",
                            "sdpa_x2,torch_path,flash_v2,torch_path_v2", "--out", str(out)])
    assert code == 0
    rows = (out / "throughput.csv").read_text().splitlines()
    decode_rows = [r for r in rows[1:] if ",decode," in r]
    assert len(decode_rows) == 2 * len(TORCH_PROVIDERS)
    assert "## Decode level" in (out / "summary.md").read_text()


def test_sm90_decode_launches_are_recorded():
    """The sm_90 resource tool records the decode kernels' launches as the launcher makes
    them (in a process without the interpreter: it needs compiled-mode kernels)."""
    import json
    import os
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "sm90_resources.py"),
                           "--kernels", "decode", "--list", "--head-dims", "64"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    launches = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    kernels = {(x["variant"], x["kernel"]) for x in launches}
    assert ("v1_split", "decode_combine") in kernels and ("v1", "decode") in kernels
    assert ("v1", "decode_combine") not in kernels  # one pass: no combine launch
    paged = next(x for x in launches if x["variant"] == "v2_paged_split"
                 and x["kernel"] == "decode")
    assert paged["signature"]["BT"] == "*i32" and paged["signature"]["PAGED"] == "constexpr"


def test_decode_targets_are_evaluated_per_shape():
    import summary
    _, _, targets = summary.load_targets()
    decode = [t for t in targets if t.level == "decode"]
    assert len(decode) == 2

    def row(provider, batch, ms):
        return dict(level="decode", mode="fwd", dtype="bf16", provider=provider, shape="decode",
                    batch=batch, seq_len=8192, heads=8, head_dim=64, causal=False, ms_p50=ms)

    rows = [row("flash_v2", 1, 1.0), row("diffattn_v2", 1, 1.05), row("flash_v2", 8, 1.0),
            row("diffattn_v2", 8, 1.2), row("sdpa_x2", 1, 2.0), row("diffattn", 1, 1.5)]
    v2 = next(t for t in decode if t.numerator[0] == "diffattn_v2")
    v1 = next(t for t in decode if t.numerator[0] == "diffattn")
    measured, verdict, _ = summary.evaluate_target(v2, rows)
    assert verdict == "FAIL" and measured == pytest.approx(1.2)
    measured, verdict, _ = summary.evaluate_target(v1, rows)
    assert verdict == "PASS" and measured == pytest.approx(0.75)
