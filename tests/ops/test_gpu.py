"""GPU-only tests of the fused kernels: the compiled Triton code on a CUDA device.

Run by benchmarks/gpu_check.sh; skipped on machines without CUDA and under TRITON_INTERPRET=1
(the CPU suite tests the same kernels through the interpreter). They cover what the
interpreter cannot: bf16/fp16 arithmetic of the real hardware, bitwise-deterministic backward,
element offsets past 2^31, torch.compile(fullgraph=True) and torch.library.opcheck of the
custom ops, and the fp32 path with exact ("ieee") products.

Accuracy is judged against the float64 reference (diff_attention_ref) on the same
low-precision inputs, relative to what the PyTorch path (backend "torch", two SDPA calls)
achieves in the same dtype: error <= 2x (output) or 3x (gradients) torch's error (the
flash-attn tests' rule) + FLOOR[dtype] x max(max|ref|, 1), the interpreter suite's tolerance
(tests/helpers.py REL_TOL).
The floor matters where the exact value is small or 0 and the kernels' results are rounding
noise of O(1) terms: dq with a single key (dP - D with D from the stored, rounded O), and
dlambda with a single key and the norm (O1 = O2, so the RMSNorm's scale invariance makes it
0 up to eps; with the norm the kernels keep X and O2 in fp32 for it, the torch path forms X in
fp32 from its rounded map outputs; tests/ops/test_lambda_gradient_precision.py).

The large-offset test comes last on purpose: an out-of-bounds access there would poison the
CUDA context for any test after it.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA device and the compiled (not interpreted) Triton kernels")

from diffattn import (DiffMultiheadAttention, diff_attention, diff_attention_ref,  # noqa: E402
                      diff_attention_v2, diff_attention_v2_ref)

DEVICE = torch.device("cuda")
# Error floor relative to max(max|ref|, 1), per dtype: tests/helpers.py REL_TOL's values.
FLOOR = {torch.bfloat16: 3e-2, torch.float16: 4e-3, torch.float32: 2e-5}
OUT_FACTOR, GRAD_FACTOR = 2.0, 3.0
LOW_PRECISION = (torch.bfloat16, torch.float16)
DTYPE_IDS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


# ------------------------------------------------------------------------------ helpers
def make_problem(*, batch=2, seq_q=197, seq_k=None, heads=4, kv_heads=None, head_dim=64,
                 dtype=torch.bfloat16, padding=False, norm=False, per_head_lambda=False,
                 seed=0):
    """Random inputs of diff_attention (plus the output gradient) on the GPU.

    padding: batch 0 ignores every third key (key 0 included, so under causal masking its
    first query sees no key); with batch > 1 the last batch element ignores every key (all
    its rows see no key: zeros, never NaN).
    """
    seq_k = seq_q if seq_k is None else seq_k
    kv_heads = heads if kv_heads is None else kv_heads
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(*shape, dtype=dtype):
        return torch.randn(*shape, generator=gen, device=DEVICE, dtype=dtype)

    problem = {
        "q": randn(batch, seq_q, 2 * heads, head_dim),
        "k": randn(batch, seq_k, 2 * kv_heads, head_dim),
        "v": randn(batch, seq_k, kv_heads, 2 * head_dim),
        "lambda_": (0.2 + 0.7 * torch.rand(heads, generator=gen, device=DEVICE))
        if per_head_lambda else torch.tensor(0.6, device=DEVICE),
        "dout": randn(batch, seq_q, heads, 2 * head_dim),
        "kwargs": {},
    }
    if padding:
        mask = torch.zeros(batch, seq_k, dtype=torch.bool, device=DEVICE)
        mask[0, 0::3] = True
        if batch > 1:
            mask[-1] = True
        problem["kwargs"]["key_padding_mask"] = mask
    if norm:
        problem["norm_weight"] = 1.0 + 0.1 * randn(2 * head_dim)
        problem["kwargs"]["out_scale"] = 0.2
    return problem


def run(problem: dict, backend: str, **extra):
    """Output and gradients of diff_attention (backend "triton"/"torch") or of the float64
    reference (backend "ref")."""
    names = ["q", "k", "v", "lambda_"] + (["norm_weight"] if "norm_weight" in problem else [])
    leaves = {}
    for name in names:
        t = problem[name].detach().clone()
        if backend == "ref":
            t = t.double()
        leaves[name] = t.requires_grad_()
    kwargs = {**problem["kwargs"], **extra}
    if "norm_weight" in leaves:
        kwargs["norm_weight"] = leaves["norm_weight"]
    q, k, v, lam = (leaves[n] for n in ("q", "k", "v", "lambda_"))
    if backend == "ref":
        out = diff_attention_ref(q, k, v, lam, **kwargs)
    else:
        out = diff_attention(q, k, v, lambda_=lam, backend=backend, **kwargs)
    out.backward(problem["dout"].to(out.dtype))
    return out.detach(), {name: t.grad for name, t in leaves.items()}


def max_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return (got.double() - ref).abs().max().item()


def assert_accurate(name: str, got, base, ref, dtype, factor: float) -> None:
    """got's error against ref within factor x base's error + FLOOR[dtype] x
    max(max|ref|, 1)."""
    assert got is not None, f"{name}: no gradient"
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(ref.shape)}"
    assert got.dtype == base.dtype, f"{name}: dtype {got.dtype}, torch path gives {base.dtype}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err, base_err = max_err(got, ref), max_err(base, ref)
    bound = factor * base_err + FLOOR[dtype] * max(ref.abs().max().item(), 1.0)
    assert err <= bound, (f"{name}: error {err:.3e} > {bound:.3e} (torch path's error "
                          f"{base_err:.3e}, max|ref| {ref.abs().max().item():.3e})")


def check_against_reference(problem: dict, dtype: torch.dtype, **extra) -> None:
    out, grads = run(problem, "triton", **extra)
    base_out, base_grads = run(problem, "torch", **extra)
    ref_out, ref_grads = run(problem, "ref", **extra)
    assert out.dtype == dtype
    assert_accurate("out", out, base_out, ref_out, dtype, OUT_FACTOR)
    for name in ref_grads:
        assert_accurate(f"grad {name}", grads[name], base_grads[name], ref_grads[name], dtype,
                        GRAD_FACTOR)


# Feature sets: each is its own compiled kernel variant (CAUSAL, HAS_KPM, HAS_NORM are
# constexprs); the first four are also what benchmarks/throughput.py runs (op level: plain and
# causal; layer and model level: with the norm), so the GPU check compiles them once.
_NORM = dict(kv_heads=2, norm=True, per_head_lambda=True)
VARIANTS = {
    "plain": dict(causal=False, problem={}),
    "causal": dict(causal=True, problem={}),
    "gqa_norm": dict(causal=False, problem=_NORM),
    "causal_gqa_norm": dict(causal=True, problem=_NORM),
    "causal_padding_gqa_norm": dict(causal=True, problem=dict(_NORM, padding=True)),
}


# ------------------------------------------------------------------------------ determinism
def test_backward_is_bitwise_deterministic():
    """Same inputs, same gradients, to the bit: no atomics in the backward (several query
    tiles per key tile, two heads per key/value group, the norm and padding)."""
    problem = make_problem(seq_q=1000, **VARIANTS["causal_padding_gqa_norm"]["problem"])
    run(problem, "triton", causal=True)  # autotuning happens here, not between the runs
    out1, grads1 = run(problem, "triton", causal=True)
    out2, grads2 = run(problem, "triton", causal=True)
    assert torch.equal(out1, out2), "forward differs between runs"
    for name in grads1:
        assert torch.equal(grads1[name], grads2[name]), f"grad {name} differs between runs"


def test_launch_shortcut_matches_tritons_launch_bitwise():
    """The launch shortcut (kernels/launch.py) runs exactly what kernel[grid] runs: outputs and
    gradients to the bit, on aligned inputs and on inputs whose pointers are 2 bytes off 16
    (another specialisation), each launched twice so the second call takes the shortcut."""
    import sys
    from diffattn.kernels import diff_attn_bwd, diff_attn_fwd
    bwd = sys.modules[diff_attn_bwd.__module__]
    launchers = (sys.modules[diff_attn_fwd.__module__].diff_attn_fwd_launch,
                 bwd.diff_attn_bwd_rows_launch, bwd.diff_attn_bwd_launch)
    if not all(x.fast for x in launchers):
        pytest.skip("the launch shortcut is off (DIFFATTN_FAST_LAUNCH=0 or triton < 3.4)")
    problem = make_problem(seq_q=77, **VARIANTS["causal_padding_gqa_norm"]["problem"])

    def leaves(shift: int) -> dict:
        out = {}
        for name in ("q", "k", "v", "norm_weight"):
            t = problem[name]
            flat = torch.empty(t.numel() + shift, device=DEVICE, dtype=t.dtype)
            out[name] = flat[shift:].view(t.shape).copy_(t).requires_grad_()
        out["lambda_"] = problem["lambda_"].clone().requires_grad_()
        return out

    def fused(inputs: dict):
        out = diff_attention(inputs["q"], inputs["k"], inputs["v"], lambda_=inputs["lambda_"],
                             norm_weight=inputs["norm_weight"], causal=True, backend="triton",
                             **problem["kwargs"])
        return [out.detach()] + list(torch.autograd.grad(out, list(inputs.values()),
                                                         problem["dout"]))
    try:
        for shift in (0, 1):
            inputs = leaves(shift)
            assert (inputs["q"].data_ptr() % 16 == 0) == (shift == 0)
            results = []
            for fast in (False, True, True):
                for launcher in launchers:
                    launcher.fast = fast
                results.append(fused(inputs))
            for other in results[1:]:
                for got, want in zip(other, results[0]):
                    assert torch.equal(got, want), f"shift {shift}: results differ"
    finally:
        for launcher in launchers:
            launcher.fast = True


# ------------------------------------------------------------------------------ compile
class _Block(nn.Module):
    """A pre-norm residual attention block on DiffMultiheadAttention (fused backend)."""

    def __init__(self, width: int = 512, heads: int = 8):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attn = DiffMultiheadAttention(width, heads, batch_first=True, backend="triton")
        self.fc = nn.Linear(width, width)

    def forward(self, x, causal: bool = False):
        h = self.attn(self.norm(x), need_weights=False, is_causal=causal)[0]
        return self.fc(x + h)


def test_torch_compile_fullgraph_matches_eager():
    """fp32, causal, head dim 64 with the norm: the kernel variant test_fp32_matches_reference
    compiles anyway (fp32 compiles are the slow ones). bf16 is no good here: parameter
    gradients summed in bf16 differ between eager and inductor by bf16 rounding."""
    causal = True
    torch.manual_seed(0)
    model = _Block().to(DEVICE)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 197, 512, device=DEVICE)
    grad = torch.randn_like(x)

    def step(fn):
        model.zero_grad(set_to_none=True)
        inp = x.clone().requires_grad_()
        out = fn(inp, causal)
        out.backward(grad)
        return out.detach(), inp.grad, {n: p.grad.clone() for n, p in model.named_parameters()}

    out_e, dx_e, grads_e = step(model)
    out_c, dx_c, grads_c = step(compiled)
    torch.testing.assert_close(out_c, out_e, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dx_c, dx_e, atol=1e-4, rtol=1e-4)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], atol=1e-4, rtol=1e-4,
                                   msg=lambda m, n=name: f"grad {n}: {m}")


# ------------------------------------------------------------------------------ compile: models
def _clip_step(model, images, tokens, train: bool):
    """Image and text features (and, training, every parameter gradient) of one step."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.set_grad_enabled(train):
        image_features, text_features, _ = model(images, tokens)
        loss = (image_features.float().square().mean() + text_features.float().square().mean())
    if not train:
        return image_features.float(), text_features.float(), {}
    loss.backward()
    return (image_features.detach().float(), text_features.detach().float(),
            {n: p.grad.float().clone() for n, p in model.named_parameters()
             if p.grad is not None})


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("name", ["DiffCLIP-Tiny", "DiffCLIPv2-Tiny"])
def test_compiled_clip_towers_match_eager(name, mode):
    """Both towers, forward and training step, under torch.compile with and without CUDA
    graphs, against eager: bf16 autocast, so within bf16 rounding of the eager step."""
    from diffattn.models import create_model
    torch.manual_seed(0)
    model = create_model(name, backend="triton", device=DEVICE)
    compiled = torch.compile(model, mode=mode)
    images = torch.randn(8, 3, 32, 32, device=DEVICE)
    tokens = model.tokenize(["a photo of a cat", "a dog", "three birds"] * 3)[:8].to(DEVICE)
    for train in (False, True):
        model.train(train)
        want = _clip_step(model, images, tokens, train)
        for _ in range(3):  # warm-up, CUDA graph recording, replay
            if mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()
            got = _clip_step(compiled, images, tokens, train)
        for a, b in zip(got[:2], want[:2]):
            torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)
        for n, g in want[2].items():
            scale = max(g.abs().max().item(), 1e-3)
            assert (got[2][n] - g).abs().max().item() <= 5e-2 * scale, n


def test_compiled_module_with_cuda_graphs_matches_eager():
    torch.manual_seed(0)
    model = _Block().to(DEVICE)
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(4, 77, 512, device=DEVICE)
    want = model(x, True)
    for _ in range(3):
        torch.compiler.cudagraph_mark_step_begin()
        got = compiled(x, True)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ opcheck
def _op_inputs(norm: bool, requires_grad: bool, save_for_backward: bool = True):
    """Arguments of torch.ops.diffattn.fwd (causal; with the norm also key padding)."""
    problem = make_problem(batch=1, seq_q=77, heads=2, padding=norm, norm=norm,
                           per_head_lambda=True)
    q, k, v = (problem[n].clone().requires_grad_(requires_grad) for n in ("q", "k", "v"))
    lam = problem["lambda_"].clone().requires_grad_(requires_grad)
    weight = problem["norm_weight"].float() if norm else None
    from diffattn.kernels import AttentionCall
    call = AttentionCall.create(64 ** -0.5, causal=True, out_scale=0.2 if norm else 1.0)
    return (q, k, v, lam, problem["kwargs"].get("key_padding_mask"), weight, None, None,
            save_for_backward, *call.as_schema_args()), problem["dout"]


@pytest.mark.parametrize("norm,save", [(False, True), (True, True), (True, False)],
                         ids=["plain", "norm", "norm-inference"])
def test_opcheck_fwd(norm, save):
    from diffattn import autograd  # noqa: F401  (registers torch.ops.diffattn)
    args, _ = _op_inputs(norm, requires_grad=save, save_for_backward=save)
    torch.library.opcheck(torch.ops.diffattn.fwd.default, args)


def test_opcheck_bwd():
    from diffattn import autograd  # noqa: F401
    args, dout = _op_inputs(norm=True, requires_grad=False)
    q, k, v, lam, kpm, weight, cu_q, cu_k, _, *call_args = args
    out, x, o2, lse, rstd = torch.ops.diffattn.fwd(*args)
    torch.library.opcheck(torch.ops.diffattn.bwd.default,
                          (dout, q, k, v, lam, kpm, weight, x, o2, lse, rstd, cu_q, cu_k, True,
                           True, *call_args))


# ------------------------------------------------------------------------------ accuracy
# Every variant in bf16 at N = 197; the sequence-length edges and fp16 on the variant with
# every feature. (Each variant and dtype is a separate compile: the GPU check's time budget.)
ACCURACY_CASES = (
    [(torch.bfloat16, 197, variant) for variant in VARIANTS]
    + [(torch.bfloat16, n, "causal_padding_gqa_norm") for n in (1, 77, 1000)]
    + [(torch.float16, n, "causal_padding_gqa_norm") for n in (1, 197)]
    + [(torch.float16, 197, "plain")]
)


@pytest.mark.parametrize("dtype,seq_len,variant", ACCURACY_CASES,
                         ids=[f"{DTYPE_IDS[d]}-N{n}-{v}" for d, n, v in ACCURACY_CASES])
def test_low_precision_matches_reference(dtype, seq_len, variant):
    spec = VARIANTS[variant]
    problem = make_problem(seq_q=seq_len, dtype=dtype, **spec["problem"])
    check_against_reference(problem, dtype, causal=spec["causal"])


@pytest.mark.parametrize("head_dim", [16, 128])
def test_other_head_dims_bf16(head_dim):
    """The smallest and largest head dims (32 is covered by the interpreter suite)."""
    problem = make_problem(seq_q=197, head_dim=head_dim, norm=True)
    check_against_reference(problem, torch.bfloat16, causal=False)


@pytest.mark.parametrize("seq_q,seq_k", [(77, 197), (197, 77)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_cross_attention_bf16(seq_q, seq_k, causal):
    """N != M; causal is aligned to the bottom-right corner (for N > M the first N - M
    queries see no key)."""
    problem = make_problem(seq_q=seq_q, seq_k=seq_k, per_head_lambda=True)
    check_against_reference(problem, torch.bfloat16, causal=causal)


@pytest.mark.parametrize("seq_len", [77, 197])
def test_fp32_matches_reference(seq_len):
    """fp32 with exact ("ieee") products: one variant (these compile slowly)."""
    problem = make_problem(seq_q=seq_len, dtype=torch.float32, norm=True, per_head_lambda=True)
    check_against_reference(problem, torch.float32, causal=True)


@pytest.mark.parametrize("variant", ["causal", "causal_padding_gqa_norm"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_tma_loads_match_reference_bf16(variant, head_dim, monkeypatch):
    """The forward with tensor-descriptor loads (DIFFATTN_TMA=1) on Hopper and newer, bf16,
    against the float64 reference and the torch path like the pointer loads."""
    from diffattn.kernels import tma
    if not tma.AVAILABLE or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA loads need triton >= 3.4 and a GPU of compute capability >= 9.0")
    monkeypatch.setattr(tma, "ENABLED", True)
    answers = []
    real = tma.tma_loads
    monkeypatch.setattr(tma, "tma_loads", lambda k, v: answers.append(real(k, v)) or answers[-1])
    spec = VARIANTS[variant]
    problem = make_problem(seq_q=197, head_dim=head_dim, **spec["problem"])
    check_against_reference(problem, torch.bfloat16, causal=spec["causal"])
    assert answers and all(answers), "the forward did not take the TMA path"


def test_v2_bf16_matches_reference():
    """Differential Transformer V2: one key head per group, per-token lambda, no norm; bf16,
    causal, padding, grouped keys, against the float64 reference and the torch path."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    B, N, H, Hk, d = 2, 197, 4, 2, 64

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=gen, device=DEVICE, dtype=dtype)

    inputs = {"q": randn(B, N, 2 * H, d), "k": randn(B, N, Hk, d), "v": randn(B, N, Hk, d),
              "lambda_": torch.rand(B, N, H, generator=gen, device=DEVICE)}
    mask = torch.zeros(B, N, dtype=torch.bool, device=DEVICE)
    mask[0, 0::3] = True
    dout = randn(B, N, H, d)

    def run_v2(backend):
        leaves = {n: (t.double() if backend == "ref" else t).detach().clone().requires_grad_()
                  for n, t in inputs.items()}
        if backend == "ref":
            out = diff_attention_v2_ref(**leaves, causal=True, key_padding_mask=mask)
        else:
            out = diff_attention_v2(**leaves, causal=True, key_padding_mask=mask,
                                    backend=backend)
        out.backward(dout.to(out.dtype))
        return out.detach(), {n: t.grad for n, t in leaves.items()}

    (out, grads), (base, base_grads), (ref, ref_grads) = (run_v2(b) for b in
                                                          ("triton", "torch", "ref"))
    assert_accurate("out", out, base, ref, torch.bfloat16, OUT_FACTOR)
    for name in ref_grads:
        assert_accurate(f"grad {name}", grads[name], base_grads[name], ref_grads[name],
                        torch.bfloat16, GRAD_FACTOR)


def test_autocast_bf16_returns_bf16():
    problem = make_problem(seq_q=77, dtype=torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = diff_attention(problem["q"], problem["k"], problem["v"], lambda_=0.5, backend="triton")
    assert out.dtype == torch.bfloat16


# ------------------------------------------------------------------------------ 2^31 offsets
def test_forward_element_offsets_past_2_31():
    """q and the output of one batch element hold more than 2^31 elements (N = 2^24 + 1024
    queries x 128 per row), so element offsets inside a batch element overflow int32. Cross
    attention to 64 keys keeps it fast; rows on both sides of the 2^31 boundary are checked
    against the reference."""
    heads, head_dim, seq_k = 1, 64, 64
    row_elems = 2 * heads * head_dim
    boundary = 2 ** 31 // row_elems           # first query row whose q offset reaches 2^31
    seq_q = boundary + 1024
    needed = 3 * seq_q * row_elems * 2 + 2 ** 30  # q, out, o2 in bf16, plus slack
    free = torch.cuda.mem_get_info()[0]
    if free < needed:
        pytest.skip(f"needs {needed / 2 ** 30:.1f} GiB of free GPU memory, "
                    f"{free / 2 ** 30:.1f} GiB free")
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(1, seq_q, 2 * heads, head_dim, generator=gen, device=DEVICE,
                    dtype=torch.bfloat16)
    k = torch.randn(1, seq_k, 2 * heads, head_dim, generator=gen, device=DEVICE,
                    dtype=torch.bfloat16)
    v = torch.randn(1, seq_k, heads, 2 * head_dim, generator=gen, device=DEVICE,
                    dtype=torch.bfloat16)
    assert q.numel() > 2 ** 31
    with torch.no_grad():
        out = diff_attention(q, k, v, lambda_=0.6, backend="triton")
    assert out.numel() > 2 ** 31
    rows = torch.tensor([0, 1, seq_q // 2, boundary - 1, boundary, boundary + 1, seq_q - 2,
                         seq_q - 1], device=DEVICE)
    got = out[:, rows].double()
    ref = diff_attention_ref(q[:, rows].double(), k.double(), v.double(), 0.6)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)
    tail = out[:, -4096:]
    assert torch.isfinite(tail).all() and tail.abs().sum() > 0, "the last rows were not written"
