"""CPU tests of the throughput benchmark (benchmarks/throughput.py, benchmarks/providers.py).

The end-to-end test runs ``--quick`` as a user would on a machine without CUDA; the others
check the pieces a CPU run cannot show: the FLOP formulas, that every provider computes
differential attention, and that the summary and plots come out right when GPU numbers
(the diffattn rows and peak memory) are there.
"""
from __future__ import annotations

import copy
import csv
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import providers  # noqa: E402
import throughput  # noqa: E402
from diffattn import DiffMultiheadAttention, diff_attention_ref  # noqa: E402
from diffattn.kernels import INTERPRET  # noqa: E402

TORCH_PROVIDERS = ("sdpa_x2", "naive", "sdpa_plain")


# ------------------------------------------------------------------------------ end to end
def test_quick_run_without_cuda(tmp_path):
    """--quick with CUDA hidden and no interpreter (about 11 s on an idle 2-core machine; the
    timeout leaves room for a loaded one): exits 0, writes the CSV with
    exactly the issue's columns and rows from every torch provider, says the fused kernels
    need a GPU, and prints the summary last."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"),
                           "--quick", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    with open(out / "throughput.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert tuple(reader.fieldnames) == throughput.COLUMNS
    assert throughput.COLUMNS == (
        "device", "torch", "triton", "level", "provider", "mode", "dtype", "batch", "seq_len",
        "heads", "head_dim", "causal", "ms_p50", "ms_p20", "ms_p80", "tflops", "peak_mem_mb")
    found = {r["provider"] for r in rows}
    assert set(TORCH_PROVIDERS) <= found
    assert "diffattn" not in found
    assert {r["level"] for r in rows} >= {"op", "layer"}
    for r in rows:
        assert r["device"] == "cpu"
        assert float(r["ms_p50"]) > 0 and math.isfinite(float(r["ms_p50"]))
        assert r["peak_mem_mb"] == "nan"
        if r["level"] == "model":
            assert r["tflops"] == "nan"
        else:
            assert float(r["tflops"]) > 0

    summary = (out / "summary.md").read_text()
    assert throughput.CPU_NO_KERNELS in summary
    assert "CUDA not available: the fused Triton kernels need a GPU" in summary
    assert "not measured" in summary and "PASS" not in summary and "FAIL" not in summary
    assert proc.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / throughput.SPEED_PLOT).exists()


# ------------------------------------------------------------------------------ FLOPs
def test_attention_flops_formula():
    B, H, N, M, d = 2, 3, 5, 7, 4
    fwd = throughput.attention_flops("diff", B, H, N, M, d, False, "fwd")
    assert fwd == B * H * 2 * (2 * N * M * d + 2 * N * M * 2 * d) == B * H * 12 * N * M * d
    assert throughput.attention_flops("diff", B, H, N, M, d, True, "fwd") == fwd / 2
    assert throughput.attention_flops("diff", B, H, N, M, d, False, "bwd") == 2.5 * fwd
    assert throughput.attention_flops("diff", B, H, N, M, d, False, "fwd_bwd") == 3.5 * fwd
    plain = throughput.attention_flops("plain", B, H, N, M, d, False, "fwd")
    assert plain == B * 2 * H * (2 * N * M * d + 2 * N * M * d)  # 2H heads of width d
    assert plain / fwd == pytest.approx(2 / 3)


def test_case_flops_by_level():
    shape = providers.Shape("s", 2, 16, 3, 8, False)
    core = throughput.attention_flops("diff", 2, 3, 16, 16, 8, False, "fwd")
    assert throughput.case_flops("op", "sdpa_x2", shape, "fwd") == core
    assert throughput.case_flops("layer", "naive", shape, "fwd") == \
        core + 8 * 2 * 16 * shape.width ** 2
    assert throughput.case_flops("layer", "naive", shape, "bwd") == \
        2.5 * core + 16 * 2 * 16 * shape.width ** 2
    assert throughput.case_flops("op", "sdpa_plain", shape, "fwd") == \
        throughput.attention_flops("plain", 2, 3, 16, 16, 8, False, "fwd")
    assert math.isnan(throughput.case_flops("model", "diffattn", shape, "train_step"))


# ------------------------------------------------------------------------------ providers
def _qkv(B=2, N=9, M=None, H=2, Hk=None, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    M, Hk = M or N, Hk or H
    return (torch.randn(B, N, 2 * H, d, generator=g, dtype=dtype),
            torch.randn(B, M, 2 * Hk, d, generator=g, dtype=dtype),
            torch.randn(B, M, Hk, 2 * d, generator=g, dtype=dtype))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("geometry", [dict(), dict(M=12, Hk=1), dict(N=12, M=9)],
                         ids=["self", "gqa_cross", "more_queries"])
def test_naive_matches_reference(causal, geometry):
    if causal and geometry.get("N", 9) > geometry.get("M", 9):
        pytest.skip("rows with no key give NaN in the release's math (documented)")
    q, k, v = _qkv(**geometry)
    lam = torch.tensor([0.3, 0.7], dtype=torch.float64)
    got = providers.naive_diff_attention(q, k, v, lam, causal)
    ref = diff_attention_ref(q, k, v, lam, causal=causal)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)  # fp32 softmax, as released


@pytest.mark.parametrize("causal", [False, True])
def test_plain_attention_matches_softmax(causal):
    q, k, _ = _qkv(d=8)
    v = torch.randn(2, 9, 4, 8, dtype=torch.float64)  # plain: 2H value heads of width d
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) * 8 ** -0.5
    if causal:
        scores = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), -math.inf)
    ref = torch.einsum("bhnm,bmhd->bnhd", scores.softmax(-1), v)
    torch.testing.assert_close(providers.plain_attention(q, k, v, causal), ref)


@pytest.mark.parametrize("call", ["module", "mha_style_mask"])
def test_naive_layer_matches_module(call):
    """NaiveDiffAttention on a layer's parameters equals the layer (torch backend), called
    either way CLIP's blocks call attention."""
    torch.manual_seed(0)
    layer = DiffMultiheadAttention(64, 8, batch_first=True, backend="torch").double()
    naive = providers.NaiveDiffAttention(layer)
    x = torch.randn(2, 10, 64, dtype=torch.float64)
    ref = layer(x, is_causal=True)[0]
    if call == "module":
        got = naive(x, is_causal=True)[0]
    else:
        mask = torch.ones(10, 10, dtype=torch.bool).triu(1)
        got = naive(x, x, x, need_weights=False, attn_mask=mask, is_causal=True)[0]
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


def test_naive_model_matches_torch_backend():
    """Swapping every differential layer of a CLIP model for the naive provider keeps its
    embeddings (the model-level naive provider computes the same model)."""
    from diffattn.models import create_model
    torch.manual_seed(0)
    model = create_model("DiffCLIP-Tiny", backend="torch").eval()
    naive = copy.deepcopy(model)
    assert providers.use_naive_attention(naive) == len(model.attention_layers())
    assert all(isinstance(m, providers.NaiveDiffAttention) for m in naive.attention_layers())
    images, tokens = providers.make_model_batch(model, 2, torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(naive.encode_image(images), model.encode_image(images),
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(naive.encode_text(tokens), model.encode_text(tokens),
                                   atol=1e-4, rtol=1e-4)
    assert providers.attention_geometry(naive, "vision") == \
        providers.attention_geometry(model, "vision") == (2, 16)


def test_model_bench_train_step_reaches_every_parameter():
    from diffattn.models import create_model
    model = create_model("CLIP-Tiny")
    bench = providers.model_bench(model, 2, torch.float32, torch.device("cpu"),
                                  providers.MODEL_MODES)
    for mode in ("infer_image", "infer_text"):
        bench.makers[mode]()()
    assert not model.training
    bench.makers["train_step"]()()
    assert model.training
    assert all(p.grad is not None for p in bench.leaves)


def _check_modes(bench):
    """fwd runs; fwd_bwd and bwd give the same gradients."""
    assert bench.makers["fwd"]()() is not None
    bench.makers["fwd_bwd"]()()
    grads = [t.grad.clone() for t in bench.leaves]
    throughput.clear_grads(bench.leaves)
    bench.makers["bwd"]()()
    for before, t in zip(grads, bench.leaves):
        torch.testing.assert_close(t.grad, before)


@pytest.mark.parametrize("level", ["op", "layer"])
@pytest.mark.parametrize("provider", TORCH_PROVIDERS)
def test_torch_providers_run_every_mode(level, provider):
    shape = providers.Shape("tiny", 2, 33, 2, 16, True)
    build = providers.op_bench if level == "op" else providers.layer_bench
    _check_modes(build(provider, shape, torch.float32, torch.device("cpu"),
                       providers.OP_MODES))


@pytest.mark.skipif(not INTERPRET, reason="the fused kernels on CPU need TRITON_INTERPRET=1")
@pytest.mark.parametrize("level", ["op", "layer"])
def test_fused_provider_runs_through_interpreter(level):
    shape = providers.Shape("tiny", 1, 40, 2, 16, False)
    build = providers.op_bench if level == "op" else providers.layer_bench
    _check_modes(build(providers.INTERPRETER_PROVIDER, shape, torch.float32,
                       torch.device("cpu"), providers.OP_MODES))


def test_sdpa_backend_is_named():
    bench = providers.op_bench("sdpa_x2", providers.Shape("s", 1, 16, 2, 16, False),
                               torch.float32, torch.device("cpu"), ("fwd",))
    names = {"FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"}
    assert bench.sdpa_backend().split(" ")[0] in names


# ------------------------------------------------------------------------------ plan
def _env(device: str) -> throughput.Environment:
    return throughput.Environment(torch.device(device), "NVIDIA H100 80GB HBM3"
                                  if device == "cuda" else "cpu", "2.x", "3.x", False)


def test_gpu_plan_runs_target_shapes_first():
    args = throughput.parse_args([])
    args.dtype = ["bf16", "fp16"]
    plan = throughput.build_plan(args, _env("cuda"), model_available=True)
    first = plan[:8]
    assert all(c.level == "op" and c.dtype == "bf16" and throughput.is_target_shape(c.shape)
               for c in first)
    assert {c.shape.seq_len for c in first} == {197, 4096}
    assert plan[8].level == "model"
    assert {c.provider for c in plan} == set(providers.PROVIDERS)
    long = [c.shape for c in plan if c.shape.name == "long"]
    assert {s.seq_len for s in long} == {512, 1024, 2048, 4096, 8192, 16384}
    assert all(s.batch * s.seq_len == 16384 for s in long)
    assert {(s.head_dim, s.causal) for s in long} == {(64, False), (64, True), (128, False),
                                                      (128, True)}


def test_cpu_plan_has_no_fused_provider():
    args = throughput.parse_args(["--quick"])
    args.dtype = ["fp32"]
    plan = throughput.build_plan(args, _env("cpu"), model_available=True)
    assert {c.provider for c in plan} == set(TORCH_PROVIDERS)


def test_naive_over_budget_is_skipped_with_reason():
    report = throughput.Report([], [], [], {})
    runner = throughput.Runner(_env("cpu"), None, None, None, report, None,
                               providers.CPU_MODELS, naive_budget=1.0)
    case = throughput.Case("op", "naive", providers.Shape("long", 1, 16384, 8, 64, False),
                           "bf16", ("fwd",))
    runner.run(case)
    assert not runner.rows and not report.failed
    (what, why), = report.skipped
    assert "naive" in what and "GiB" in why


def test_comma_lists_reject_unknown_names():
    with pytest.raises(SystemExit):
        throughput.parse_args(["--providers", "diffattn,flash"])
    assert throughput.parse_args(["--levels", "op,model"]).levels == ["op", "model"]


# ------------------------------------------------------------------------------ summary
def _row(level, provider, mode, ms, shape="clip_vision", seq_len=197, mem=100.0, batch=256,
         dtype="bf16"):
    return {"device": "NVIDIA H100 80GB HBM3", "torch": "2.x", "triton": "3.x",
            "level": level, "provider": provider, "mode": mode, "dtype": dtype,
            "batch": batch, "seq_len": seq_len, "heads": 6, "head_dim": 64, "causal": False,
            "ms_p50": ms, "ms_p20": ms, "ms_p80": ms, "tflops": 1.0, "peak_mem_mb": mem,
            "shape": shape}


def _gpu_rows():
    rows = []
    for mode, scale in (("fwd", 1.0), ("fwd_bwd", 3.0)):
        for provider, ms, mem in (("diffattn", 1.0, 50.0), ("sdpa_x2", 2.0, 80.0),
                                  ("naive", 5.0, 900.0), ("sdpa_plain", 0.8, 40.0)):
            rows.append(_row("op", provider, mode, ms * scale, mem=mem))
            rows.append(_row("op", provider, mode, ms * scale * (0.5 if provider == "diffattn"
                                                                 else 1.0),
                             shape="long", seq_len=4096, batch=4,
                             mem=mem * (3.0 if provider == "diffattn" else 1.0)))
    for provider, ms in (("diffattn", 100.0), ("sdpa_x2", 120.0), ("naive", 140.0),
                         ("sdpa_plain", 96.0)):
        rows.append(_row("model", provider, "train_step", ms, shape="clip"))
    return rows


def test_targets_pass_fail_and_not_measured():
    rows = _gpu_rows()
    results = {t.text: throughput.evaluate_target(t, rows) for t in throughput.TARGETS}
    by_start = lambda prefix: [v for k, v in results.items() if k.startswith(prefix)]
    (speed_197, status_197), (speed_4096, status_4096) = by_start("op fwd, speed-up")
    assert (speed_197, status_197) == (2.0, "PASS") and (speed_4096, status_4096) == (4.0, "PASS")
    assert by_start("op fwd, diffattn time / sdpa_plain")[0] == (1.25, "PASS")
    assert by_start("op fwd_bwd, peak memory")[0] == (150.0 / 80.0, "FAIL")
    plain, naive = by_start("model train_step")
    assert plain == (0.96, "PASS") and naive == (1.4, "FAIL")
    assert throughput.evaluate_target(throughput.TARGETS[0], [])[1].startswith("not measured")


def test_summary_with_gpu_rows(tmp_path):
    rows = _gpu_rows()
    report = throughput.Report(["a note"], [("op naive bf16 x", "budget")], [], {
        ("clip_vision B=256 N=197 H=6 d=64", "bf16", "sdpa_x2"): "EFFICIENT_ATTENTION"})
    text = throughput.summary_markdown(rows, _env("cuda"), report, ["--quick"], 12.0)
    assert "| clip_vision B=256 N=197 H=6 d=64 | bf16 | fwd | 1 | 2 | 5 | 0.8 | 2.00x | 1.25x |" \
        in text
    assert "EFFICIENT_ATTENTION" in text and "- a note" in text and "budget" in text
    assert "| train_step | bf16 | 256 | 2560.0 | 2133.3 | 1828.6 | 2666.7 | 0.96x | 1.40x |" \
        in text
    assert "targets are stated for an H100" not in text


def test_plots_written_with_memory(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [_row("op", p, m, ms * n / 512, shape="long", seq_len=n, batch=16384 // n)
            for p, ms in (("diffattn", 1.0), ("sdpa_x2", 2.0)) for m in ("fwd", "bwd")
            for n in (512, 1024, 2048)]
    messages = throughput.write_plots(rows, tmp_path)
    assert (tmp_path / throughput.SPEED_PLOT).stat().st_size > 0
    assert (tmp_path / throughput.MEMORY_PLOT).stat().st_size > 0, messages


def test_plots_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rows = [_row("op", "sdpa_x2", "fwd", 1.0, shape="long", seq_len=512, batch=32)]
    assert throughput.write_plots(rows, tmp_path) == [
        "plots skipped: matplotlib is not installed"]
    assert not list(tmp_path.iterdir())
