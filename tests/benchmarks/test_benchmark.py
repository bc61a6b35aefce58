"""CPU tests of the throughput benchmark (benchmarks/throughput.py, providers.py, summary.py,
plots.py).

The end-to-end test runs ``--quick`` as a user would on a machine without CUDA; the others
check the pieces a CPU run cannot show: the FLOP formulas, that every provider computes
differential attention, the run order under a time limit, and that the summary and plots come
out right when GPU numbers (the fused rows and peak memory) are there. Host level:
tests/benchmarks/test_benchmark_host.py; model level: tests/benchmarks/test_benchmark_models.py.
"""
from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import plots  # noqa: E402
import providers  # noqa: E402
import summary  # noqa: E402
import throughput  # noqa: E402
from diffattn import DiffMultiheadAttention, diff_attention_ref, diff_attention_v2_ref  # noqa: E402
from diffattn.kernels import INTERPRET  # noqa: E402

OP_TORCH_PROVIDERS = ("sdpa_x2", "torch_path", "naive", "sdpa_plain", "flash_v2",
                      "torch_path_v2")
LAYER_TORCH_PROVIDERS = ("sdpa_x2", "torch_path", "naive", "sdpa_plain")


# ------------------------------------------------------------------------------ end to end
def _read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return tuple(reader.fieldnames), list(reader)


@pytest.mark.slow
def test_quick_run_without_cuda(tmp_path):
    """--quick with CUDA hidden and no interpreter, as a user would run it (about 25 s on a
    2-core machine with one thread per op): exits 0, writes
    the CSV with exactly COLUMNS and rows of the library's own code at every level (torch
    path, host cost with the kernels not launched), says the fused kernels need a GPU, marks
    every target not measured and prints the summary last."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["OMP_NUM_THREADS"] = "1"  # on a loaded small machine, 2 threads per op oversubscribe
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "throughput.py"),
                           "--quick", "--out", str(out), "--host-calls", "20"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    fieldnames, rows = _read_csv(out / "throughput.csv")
    assert fieldnames == throughput.COLUMNS
    assert throughput.COLUMNS == (
        "device", "torch", "triton", "level", "provider", "mode", "dtype", "batch", "seq_len",
        "heads", "head_dim", "causal", "ms_p50", "ms_p20", "ms_p80", "tflops", "peak_mem_mb")
    found = {(r["level"], r["provider"]) for r in rows}
    assert {("op", p) for p in OP_TORCH_PROVIDERS} <= found
    assert {("layer", p) for p in LAYER_TORCH_PROVIDERS} <= found
    assert {("host", "diffattn_no_launch"), ("host", "diffattn_v2_no_launch"),
            ("host", "sdpa_x2")} <= found
    assert {("model", "torch_path"), ("model", "sdpa_plain")} <= found
    assert not {p for _, p in found} & {"diffattn", "diffattn_v2", "timm_diff_fused"}
    assert {r["mode"] for r in rows if r["level"] == "model"} == {
        "train_image", "train_text", "infer_text"}
    for r in rows:
        assert float(r["ms_p50"]) > 0 and math.isfinite(float(r["ms_p50"]))
        assert r["peak_mem_mb"] == "nan"
        expected_device = "cpu (kernels not launched)" if r["provider"].endswith("_no_launch") \
            else "cpu"
        assert r["device"] == expected_device
        if r["level"] in ("model", "transformers"):  # whole models: no FLOP count
            assert r["tflops"] == "nan"
        else:
            assert float(r["tflops"]) > 0

    text = (out / "summary.md").read_text()
    assert throughput.CPU_NO_KERNELS in text
    assert "not measured (CPU run)" in text and "PASS" not in text and "FAIL" not in text
    assert "kernels not launched" in text
    assert proc.stdout.rstrip().endswith(text.rstrip().splitlines()[-1])


def test_bad_arguments_are_one_error_line(capsys):
    for argv in (["--providers", "diffattn,flash"], ["--levels", "kernel"],
                 ["--host-calls", "0"], ["--compile", "none,default"]):
        with pytest.raises(SystemExit) as exc:
            throughput.parse_args(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
    assert throughput.parse_args(["--levels", "op,model"]).levels == ["op", "model"]


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
    assert throughput.attention_flops("v2", B, H, N, M, d, False, "fwd") == plain


def test_case_flops_by_level_and_variant():
    shape = providers.Shape("s", 2, 16, 3, 8, False)
    core = throughput.attention_flops("diff", 2, 3, 16, 16, 8, False, "fwd")
    assert throughput.case_flops("op", "sdpa_x2", shape, "fwd") == core
    assert throughput.case_flops("host", "diffattn_no_launch", shape, "fwd") == core
    assert throughput.case_flops("layer", "naive", shape, "fwd") == \
        core + 8 * 2 * 16 * shape.width ** 2
    assert throughput.case_flops("layer", "naive", shape, "bwd") == \
        2.5 * core + 16 * 2 * 16 * shape.width ** 2
    v2 = throughput.attention_flops("v2", 2, 3, 16, 16, 8, False, "fwd")
    for provider in ("sdpa_plain", "flash_v2", "diffattn_v2", "diffattn_v2_no_launch",
                     "torch_path_v2"):
        assert throughput.case_flops("op", provider, shape, "fwd") == v2
    assert math.isnan(throughput.case_flops("model", "diffattn", shape, "train_image"))


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
@pytest.mark.parametrize("geometry", [dict(), dict(H=4, Hk=2)], ids=["self", "gqa"])
def test_sdpa_x2_matches_reference_without_copies(causal, geometry):
    """The fair baseline computes V1 on views: SDPA sees strided views of q and k, and
    nothing of the inputs' size is copied before it."""
    q, k, v = _qkv(**geometry)
    H = q.shape[2] // 2
    lam = torch.linspace(0.2, 0.8, H, dtype=torch.float64)
    got = providers.sdpa_x2_attention(q, k, v, lam, causal)
    torch.testing.assert_close(got, diff_attention_ref(q, k, v, lam, causal=causal))
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(qq, kk, vv, **kwargs):
        seen.append((qq, kk, vv))
        return real(qq, kk, vv, **kwargs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(providers.F, "scaled_dot_product_attention", spy)
        providers.sdpa_x2_attention(q, k, v, lam, causal)
    assert len(seen) == 2
    for qq, kk, vv in seen:
        assert qq.untyped_storage().data_ptr() == q.untyped_storage().data_ptr()
        assert kk.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
        assert vv.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()


@pytest.mark.parametrize("causal", [False, True])
def test_flash_v2_matches_reference(causal):
    g = torch.Generator().manual_seed(1)
    B, N, H, Hk, d = 2, 11, 4, 2, 8
    q = torch.randn(B, N, 2 * H, d, generator=g, dtype=torch.float64)
    k = torch.randn(B, N, Hk, d, generator=g, dtype=torch.float64)
    v = torch.randn(B, N, Hk, d, generator=g, dtype=torch.float64)
    lam = torch.rand(B, N, H, generator=g, dtype=torch.float64)
    torch.testing.assert_close(providers.flash_v2_attention(q, k, v, lam, causal),
                               diff_attention_v2_ref(q, k, v, lam, causal=causal))


@pytest.mark.parametrize("causal", [False, True])
def test_plain_attention_matches_softmax(causal):
    q, k, _ = _qkv(d=8)
    v = torch.randn(2, 9, 4, 8, dtype=torch.float64)  # plain: 2H value heads of width d
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) * 8 ** -0.5
    if causal:
        scores = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), -math.inf)
    ref = torch.einsum("bhnm,bmhd->bnhd", scores.softmax(-1), v)
    torch.testing.assert_close(providers.plain_attention(q, k, v, causal), ref)


@pytest.mark.parametrize("wrapper", ["naive", "unfused"])
@pytest.mark.parametrize("call", ["module", "mha_style_mask"])
def test_layer_providers_match_module(wrapper, call):
    """NaiveDiffAttention and UnfusedDiffLayer on a layer's parameters equal the layer (torch
    backend), called either way CLIP's blocks call attention (the unfused layer takes
    is_causal only)."""
    torch.manual_seed(0)
    layer = DiffMultiheadAttention(64, 8, num_kv_heads=4, batch_first=True,
                                   backend="torch").double()
    run = (providers.NaiveDiffAttention if wrapper == "naive" else providers.UnfusedDiffLayer)(
        layer)
    x = torch.randn(2, 10, 64, dtype=torch.float64)
    ref = layer(x, is_causal=True)[0]
    if call == "module":
        got = run(x, is_causal=True)[0]
    elif wrapper == "naive":
        mask = torch.ones(10, 10, dtype=torch.bool).triu(1)
        got = run(x, x, x, need_weights=False, attn_mask=mask, is_causal=True)[0]
    else:
        got = run(x, x, x, need_weights=False, is_causal=True)[0]
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


def test_unfused_layer_uses_one_gemm_where_projections_are_packed():
    torch.manual_seed(0)
    layer = DiffMultiheadAttention(64, 8, num_kv_heads=4, batch_first=True,
                                   backend="torch").double()
    x = torch.randn(2, 10, 64, dtype=torch.float64)
    ref = layer(x, is_causal=True)[0]
    with torch.no_grad():
        weight = torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight])
        bias = torch.cat([layer.q_proj.bias, layer.k_proj.bias, layer.v_proj.bias])
    layer.in_proj_weight, layer.in_proj_bias = torch.nn.Parameter(weight), torch.nn.Parameter(bias)
    gemms = []
    real = torch.nn.functional.linear
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(providers.F, "linear", lambda *a: gemms.append(a[1].shape) or real(*a))
        got = providers.UnfusedDiffLayer(layer)(x, is_causal=True)[0]
    assert gemms == [(64 + 2 * 32, 64), (64, 64)]   # packed q, k, v; out_proj
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)


def test_clip_attention_geometry():
    from diffattn.models import create_model
    from model_providers import clip_attention_geometry
    model = create_model("DiffCLIP-Tiny", backend="torch")
    assert clip_attention_geometry(model, "vision") == (2, 16)


def _check_modes(bench):
    """fwd runs; fwd_bwd and bwd give the same gradients."""
    assert bench.makers["fwd"]()() is not None
    bench.makers["fwd_bwd"]()()
    grads = [t.grad.clone() for t in bench.leaves]
    for t in bench.leaves:
        t.grad = None
    bench.makers["bwd"]()()
    for before, t in zip(grads, bench.leaves):
        torch.testing.assert_close(t.grad, before)


@pytest.mark.parametrize("provider", OP_TORCH_PROVIDERS)
def test_op_providers_run_every_mode(provider):
    shape = providers.Shape("tiny", 2, 33, 2, 16, True)
    _check_modes(providers.op_bench(provider, shape, torch.float32, torch.device("cpu"),
                                    providers.OP_MODES))


@pytest.mark.parametrize("provider", LAYER_TORCH_PROVIDERS)
def test_layer_providers_run_every_mode(provider):
    shape = providers.Shape("tiny", 2, 33, 2, 16, True)
    _check_modes(providers.layer_bench(provider, shape, torch.float32, torch.device("cpu"),
                                       providers.OP_MODES))


@pytest.mark.skipif(not INTERPRET, reason="the fused kernels on CPU need TRITON_INTERPRET=1")
@pytest.mark.parametrize("level,provider", [("op", "diffattn_interpreter"),
                                            ("op", "diffattn_v2_interpreter"),
                                            ("layer", "diffattn_interpreter")])
def test_fused_providers_run_through_interpreter(level, provider):
    shape = providers.Shape("tiny", 1, 40, 2, 16, False)
    build = providers.op_bench if level == "op" else providers.layer_bench
    _check_modes(build(provider, shape, torch.float32, torch.device("cpu"), providers.OP_MODES))


def test_unknown_provider_is_a_value_error():
    with pytest.raises(ValueError, match="unknown op-level provider 'flash'"):
        providers.op_bench("flash", providers.Shape("s", 1, 8, 1, 8, False), torch.float32,
                           torch.device("cpu"), ("fwd",))


def test_sdpa_backend_is_named():
    names = {"FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"}
    for provider in ("sdpa_x2", "flash_v2", "sdpa_plain"):
        bench = providers.op_bench(provider, providers.Shape("s", 1, 16, 2, 16, False),
                                   torch.float32, torch.device("cpu"), ("fwd",))
        assert bench.sdpa_backend().split(" ")[0] in names


# ------------------------------------------------------------------------------ plan
def _args(argv=(), on_cuda=True):
    args = throughput.parse_args(list(argv))
    throughput.apply_defaults(args, on_cuda)
    return args


def test_gpu_plan_runs_targets_first():
    """Host level first, then the target op shapes, then the eager model steps the targets
    compare, then the other op shapes; compiled and cudagraph modes come later."""
    plan = throughput.build_plan(_args(["--quick"]), on_cuda=True, interpret=False,
                                 model_available=True)
    labels = [c.label() for c in plan]
    assert [c.level for c in plan[:2]] == ["host", "host"]
    assert {c.provider for c in plan[:2]} == {"diffattn", "sdpa_x2"}
    ranks = [throughput.priority(c, "bf16") for c in plan]
    assert ranks == sorted(ranks), labels
    first_ops = [c for c in plan if throughput.priority(c, "bf16") == 1]
    assert {c.shape.seq_len for c in first_ops} == {197, 4096}
    assert {c.provider for c in first_ops} == {"diffattn", "sdpa_x2", "sdpa_plain",
                                               "diffattn_v2", "flash_v2"}
    eager = [c for c in plan if throughput.priority(c, "bf16") == 2]
    assert {(c.modes[0], c.provider) for c in eager} == {
        ("train_image", p) for p in ("diffattn", "sdpa_plain", "timm", "timm_diff",
                                     "timm_diff_fused")} | {
        ("train_text", p) for p in ("diffattn", "sdpa_plain")}
    assert {c.shape.seq_len for c in eager if c.modes[0] == "train_text"} == {77, 20}
    assert {(c.modes[0], c.provider) for c in plan if throughput.priority(c, "bf16") == 4} == {
        ("train_image_compiled", "diffattn"), ("train_image_compiled", "timm")}
    modes = {c.modes[0] for c in plan if c.level == "model"}
    assert {"infer_text", "train_text_compiled", "train_image_compiled_cudagraphs"} <= modes
    ops = {(c.shape.seq_len, c.shape.head_dim, c.shape.causal, c.shape.batch, c.shape.heads)
           for c in plan if c.level == "op"}
    assert ops == {(197, 64, False, 256, 6), (77, 64, True, 256, 4), (577, 128, False, 64, 8),
                   (1024, 64, False, 16, 8), (4096, 64, False, 4, 8), (16384, 64, False, 1, 8),
                   (1024, 64, True, 16, 8), (4096, 64, True, 4, 8), (16384, 64, True, 1, 8),
                   (4096, 128, False, 4, 8)}
    assert all(c.dtype == "bf16" for c in plan)
    assert all(c.modes == ("fwd", "fwd_bwd") for c in plan if c.level == "op")


def test_full_gpu_plan_adds_the_sweep_and_fp16_last():
    plan = throughput.build_plan(_args(), on_cuda=True, interpret=False, model_available=True)
    long = {(c.shape.seq_len, c.shape.head_dim, c.shape.causal) for c in plan
            if c.shape.name == "long"}
    assert {n for n, _, _ in long} == {512, 1024, 2048, 4096, 8192, 16384}
    assert all(c.shape.batch * c.shape.seq_len == 16384 for c in plan if c.shape.name == "long")
    fp16 = [i for i, c in enumerate(plan) if c.dtype == "fp16"]
    assert fp16 and fp16 == list(range(len(plan) - len(fp16), len(plan)))


def test_cpu_plan_has_no_fused_provider():
    plan = throughput.build_plan(_args(["--quick"], on_cuda=False), on_cuda=False,
                                 interpret=False, model_available=True)
    found = {c.provider for c in plan}
    assert not found & {"diffattn", "diffattn_v2", "timm_diff_fused"}
    assert {"torch_path", "torch_path_v2", "diffattn_no_launch", "sdpa_x2"} <= found
    assert not any(c.compiled for c in plan)
    interp = throughput.build_plan(_args(["--quick"], on_cuda=False), on_cuda=False,
                                   interpret=True, model_available=True)
    tiny = {c.provider for c in interp if c.shape == throughput.INTERPRETER_SHAPE}
    assert tiny == {"diffattn_interpreter", "diffattn_v2_interpreter", "torch_path",
                    "torch_path_v2"}


def test_provider_filter_keeps_variants_of_a_selected_provider():
    plan = throughput.build_plan(_args(["--quick", "--providers", "diffattn", "--levels",
                                        "host,op"], on_cuda=False),
                                 on_cuda=False, interpret=True, model_available=False)
    assert {c.provider for c in plan} == {"diffattn_no_launch", "diffattn_interpreter"}


def test_naive_over_budget_is_skipped_with_reason():
    report = summary.Report()
    runner = throughput.Runner(_env("cpu"), _args(on_cuda=False), None, None, report, None,
                               naive_budget=1.0)
    case = throughput.Case("op", "naive", providers.Shape("long", 1, 16384, 8, 64, False),
                           "bf16", ("fwd",))
    runner.run(case)
    assert not runner.rows and not report.failed
    (what, why), = report.skipped
    assert "naive" in what and "GiB" in why


def test_runner_records_failures_and_keeps_going():
    report = summary.Report()
    runner = throughput.Runner(_env("cpu"), _args(on_cuda=False), None, None, report, None, 1e12)
    runner.run(throughput.Case("op", "flash", providers.Shape("s", 1, 8, 1, 8, False), "fp32",
                               ("fwd",)))
    (what, error), = report.failed
    assert "flash" in what and "ValueError" in error


# ------------------------------------------------------------------------------ summary
def _env(device: str) -> throughput.Environment:
    return throughput.Environment(torch.device(device), "NVIDIA H100 80GB HBM3"
                                  if device == "cuda" else "cpu", "2.x", "3.x", False)


H100 = "NVIDIA H100 80GB HBM3"


def _row(level, provider, mode, ms, shape="clip_vision", seq_len=197, mem=100.0, batch=256,
         dtype="bf16", device=H100, heads=6, head_dim=64, causal=False):
    return {"device": device, "torch": "2.x", "triton": "3.x", "level": level,
            "provider": provider, "mode": mode, "dtype": dtype, "batch": batch,
            "seq_len": seq_len, "heads": heads, "head_dim": head_dim, "causal": causal,
            "ms_p50": ms, "ms_p20": ms, "ms_p80": ms, "tflops": 1.0, "peak_mem_mb": mem,
            "shape": shape}


def _gpu_rows():
    rows = []
    for mode, scale in (("fwd", 1.0), ("fwd_bwd", 3.0)):
        for provider, ms, mem in (("diffattn", 1.0, 50.0), ("sdpa_x2", 2.0, 80.0),
                                  ("naive", 5.0, 900.0), ("sdpa_plain", 0.8, 40.0),
                                  ("diffattn_v2", 0.5, 30.0), ("flash_v2", 0.7, 60.0)):
            rows.append(_row("op", provider, mode, ms * scale, mem=mem))
            rows.append(_row("op", provider, mode, ms * scale * (0.5 if provider == "diffattn"
                                                                 else 1.0),
                             shape="long", seq_len=4096, batch=4,
                             mem=mem * (3.0 if provider == "diffattn" else 1.0)))
        rows.append(_row("op", "diffattn", mode, 3.0 * scale, shape="long", seq_len=16384,
                         batch=1, causal=True))
        rows.append(_row("op", "sdpa_x2", mode, 2.0 * scale, shape="long", seq_len=16384,
                         batch=1, causal=True))
        rows.append(_row("host", "diffattn", mode, 0.03 * scale, shape="host_tiny", seq_len=16,
                         batch=1))
        rows.append(_row("host", "diffattn_no_launch", mode, 0.01, shape="host_tiny",
                         seq_len=16, batch=1, device="cpu (kernels not launched)"))
    for provider, ms in (("diffattn", 100.0), ("sdpa_plain", 96.0), ("timm", 98.0),
                         ("timm_diff", 150.0), ("timm_diff_fused", 110.0)):
        rows.append(_row("model", provider, "train_image", ms, shape="vision", batch=128))
    for seq_len, plain, diff in ((77, 40.0, 42.0), (20, 20.0, 30.0)):
        rows.append(_row("model", "sdpa_plain", "train_text", plain, shape="text",
                         seq_len=seq_len, heads=4))
        rows.append(_row("model", "diffattn", "train_text", diff, shape="text",
                         seq_len=seq_len, heads=4))
    return rows


def _results(rows):
    _, _, targets = summary.load_targets()
    return {t.text: summary.evaluate_target(t, rows) for t in targets}


def test_targets_file_is_valid():
    dtype, devices, targets = summary.load_targets()
    assert dtype == "bf16" and "H100" in devices and len(targets) >= 15


def test_targets_pass_fail_and_not_measured():
    got = _results(_gpu_rows())
    assert got["host fwd: diffattn ms per call"][:2] == (pytest.approx(0.03), "PASS")
    assert got["host fwd_bwd: diffattn ms per call"][:2] == (pytest.approx(0.09), "PASS")
    never = got["op, every shape: diffattn time / sdpa_x2 time (never slower)"]
    assert never[0] == pytest.approx(1.5) and never[1] == "FAIL" and "N=16384" in never[2]
    assert got["op fwd N=4096 d=64: speed-up over sdpa_x2"][:2] == (4.0, "PASS")
    assert got["op fwd N=197 d=64: diffattn time / sdpa_plain time (1.5 = equal cost per "
               "FLOP)"][:2] == (1.25, "PASS")
    assert got["op fwd_bwd N=4096 d=64: peak memory diffattn / sdpa_x2"][:2] == (
        pytest.approx(150 / 80), "FAIL")
    assert got["op V2 fwd N=197 d=64: speed-up over flash_v2"][:2] == (pytest.approx(1.4),
                                                                       "PASS")
    assert got["op V2 fwd_bwd N=4096 d=64: peak memory diffattn_v2 / flash_v2 (below)"][:2] \
        == (0.5, "PASS")
    assert got["train_image: diffattn samples/s / timm's"][:2] == (0.98, "PASS")
    assert got["train_image: sdpa_plain samples/s / timm's"][:2] == (
        pytest.approx(98 / 96), "PASS")
    assert got["train_text seq_len 77: diffattn time / sdpa_plain time"][:2] == (1.05, "PASS")
    assert got["train_text seq_len 20: diffattn time / sdpa_plain time"][:2] == (1.5, "FAIL")
    assert got["train_image: timm_diff_fused samples/s / timm_diff's"][1] == "PASS"
    assert got["train_image: timm_diff_fused samples/s / timm's"][1] == "FAIL"
    compiled = got["train_image_compiled: diffattn samples/s / timm's (both compiled)"]
    assert compiled[0] is None and compiled[1].startswith("not measured")


def test_host_only_rows_never_meet_a_target():
    rows = [r for r in _gpu_rows() if r["provider"] == "diffattn_no_launch"]
    text = summary.targets_table(rows, H100, on_gpu=True)
    assert "PASS" not in "\n".join(text) and "FAIL" not in "\n".join(text)


def test_bad_targets_file_is_named(tmp_path):
    bad = tmp_path / "targets.json"
    bad.write_text('{"targets": [{"text": "x", "level": "op", "mode": "fwd", "op": "==", '
                   '"bound": 1, "value": ["diffattn", "ms_p50"]}]}')
    with pytest.raises(ValueError, match="op '=='"):
        summary.load_targets(bad)
    bad.write_text('{"targets": [{"text": "x", "level": "op", "mode": "fwd", "op": "<=", '
                   '"bound": 1}]}')
    with pytest.raises(ValueError, match="either 'value' or both"):
        summary.load_targets(bad)


def test_summary_with_gpu_rows():
    rows = _gpu_rows()
    report = summary.Report(["a note"], [("op naive bf16 x", "budget")], [], {
        ("clip_vision B=256 N=197 H=6 d=64", "bf16", "sdpa_x2"): "EFFICIENT_ATTENTION"},
        compile_s={"model diffattn bf16 train_image_compiled batch=128": 61.2},
        tiles=[("fwd", "bf16/d64/dv128/pair/full", "256x256", (64, 64, 4, 2),
                "first candidate")])
    text = summary.summary_markdown(rows, H100, True, ("2.x", "3.x"), report, ["--quick"], 12.0)
    assert ("| clip_vision B=256 N=197 H=6 d=64 | bf16 | fwd | 1 | 2 | 5 | 0.8 | 0.5 | 0.7 | "
            "2.00x | 1.25x | 1.40x | 0.62x | 0.50x | 1.0 |") in text
    assert "| diffattn | NVIDIA H100 80GB HBM3 | bf16 | fwd | 30.0 |" in text
    assert "| diffattn_no_launch | cpu (kernels not launched) | bf16 | fwd | 10.0 |" in text
    assert "| train_image | bf16 | 128 | 197 | 1280.0 | 1333.3 | 1306.1 | 853.3 | 1163.6 |" \
        in text
    assert "EFFICIENT_ATTENTION" in text and "- a note" in text and "budget" in text
    assert "61.2" in text and "(64, 64, 4, 2)" in text
    assert "targets are stated for" not in text


def test_summary_on_another_gpu_says_so():
    text = "\n".join(summary.targets_table(_gpu_rows(), "NVIDIA A100", on_gpu=True))
    assert "The targets are stated for H100 or H200; this run is on NVIDIA A100." in text


def test_plots_written_with_memory(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [_row("op", p, m, ms * n / 512, shape="long", seq_len=n, batch=16384 // n)
            for p, ms in (("diffattn", 1.0), ("sdpa_x2", 2.0)) for m in ("fwd", "bwd")
            for n in (512, 1024, 2048)]
    messages = plots.write_plots(rows, tmp_path)
    assert (tmp_path / plots.SPEED_PLOT).stat().st_size > 0
    assert (tmp_path / plots.MEMORY_PLOT).stat().st_size > 0, messages


def test_plots_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rows = [_row("op", "sdpa_x2", "fwd", 1.0, shape="long", seq_len=512, batch=32)]
    assert plots.write_plots(rows, tmp_path) == ["plots skipped: matplotlib is not installed"]
    assert not list(tmp_path.iterdir())


def test_gpu_check_script_parses():
    script = ROOT / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    assert "TUNE" in text and "tune.py" in text and "test_gpu.py" in text
