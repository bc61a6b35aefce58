"""diff_attention (V1) and diff_attention_v2 (both backends) against their float64 references,
forward and every gradient, from one harness.

V1: q (B, N, 2H, d), k (B, M, 2Hk, d), v (B, M, Hk, 2d), lambda a float, () or (H,), an optional
RMSNorm epilogue; output (B, N, H, 2d). V2 (Differential Transformer V2): one key and one value
head per group, k, v (B, M, Hk, d), lambda also per token (B, N, H); output (B, N, H, d).
The Triton kernels run on CPU through the interpreter (tests/conftest.py sets
TRITON_INTERPRET=1). Shapes are small but cover the edges: a single token, CLIP's 77 and 197,
ragged tiles, M != N, causal with N < M and N > M, padding with fully padded rows, grouped
keys/values, every lambda layout, head dims 16 to 128 (and odd ones), the RMSNorm epilogue.
The case table, input builder, reference comparison, gradcheck, fully-masked rows and bad-input
tables are shared; what only one variant has keeps its own test below.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from diffattn import diff_attention, diff_attention_ref, diff_attention_v2, diff_attention_v2_ref
from helpers import REL_TOL, assert_close_rel, poison_empty, requires_interpreter  # noqa: F401

FUNCTIONS = {"v1": (diff_attention, diff_attention_ref),
             "v2": (diff_attention_v2, diff_attention_v2_ref)}


@dataclass
class Case:
    variant: str = "v1"  # "v1": diff_attention, "v2": diff_attention_v2
    B: int = 1
    N: int = 77
    M: int = 77
    H: int = 2
    Hk: int = 2
    d: int = 16
    causal: bool = False
    padding: bool = False
    # "heads" (H,) tensor, "scalar" 0-dim tensor, "float", "tokens" (B, N, H) (V2 only)
    lam: str = "heads"
    norm: bool = False  # the RMSNorm epilogue (V1 only)
    strided: bool = False  # q/k/v as views of one packed projection output
    dtype: torch.dtype = torch.float32
    extra: dict = field(default_factory=dict)

    def __str__(self):
        flags = [f for f in ("causal", "padding", "norm", "strided") if getattr(self, f)]
        return (f"{self.variant}-B{self.B}-N{self.N}-M{self.M}-H{self.H}-Hk{self.Hk}-d{self.d}-"
                f"{self.lam}-{str(self.dtype)[6:]}-{'-'.join(flags)}")

    @property
    def k_heads(self):  # V1: two key heads per group (one per map); V2: one shared by both
        return 2 * self.Hk if self.variant == "v1" else self.Hk

    @property
    def v_width(self):  # V1 values (and outputs) are 2d wide, V2's d
        return 2 * self.d if self.variant == "v1" else self.d


def V2(**kwargs):
    kwargs.setdefault("lam", "tokens")
    return Case(variant="v2", **kwargs)


CASES = [
    Case(N=1, M=1, H=1, Hk=1, d=16),
    Case(N=1, M=77, d=32, causal=True, padding=True),
    Case(B=2, N=77, M=77, d=64, causal=True, lam="scalar"),
    Case(B=2, N=197, M=197, H=2, Hk=1, d=32, padding=True, strided=True),
    Case(N=45, M=70, d=128, causal=True, padding=True),
    Case(N=70, M=45, d=16, causal=True),  # bottom-right: the first 25 queries see no key
    Case(B=2, N=33, M=100, H=4, Hk=2, d=48, padding=True, lam="float"),
    Case(B=2, N=77, M=77, d=64, causal=True, padding=True, norm=True, strided=True),
    Case(B=2, N=50, M=61, H=4, Hk=1, d=24, padding=True, norm=True, lam="scalar"),
    Case(N=77, M=77, d=32, causal=True, norm=True, dtype=torch.float16),
    Case(B=2, N=40, M=40, H=2, Hk=1, d=16, padding=True, dtype=torch.float16),
    Case(N=37, M=29, d=16, causal=True, padding=True, norm=True, dtype=torch.float64),
    Case(N=197, M=197, H=1, Hk=1, d=128, causal=True, norm=True, dtype=torch.float16),
    Case(B=2, N=77, M=197, H=4, Hk=1, d=64, causal=True, padding=True),
    # bf16: under the interpreter the kernels compute it in fp32 (its bf16 math is wrong)
    Case(N=50, M=50, d=32, causal=True, norm=True, dtype=torch.bfloat16),

    V2(N=1, M=1, H=1, Hk=1, d=16),
    V2(N=1, M=77, d=32, causal=True, padding=True),
    V2(B=2, N=77, M=77, H=4, Hk=1, d=64, causal=True, strided=True),
    V2(B=2, N=197, M=197, H=2, Hk=1, d=32, padding=True, lam="heads"),
    V2(N=45, M=70, H=2, Hk=2, d=128, causal=True, padding=True, lam="scalar"),
    V2(N=70, M=45, d=16, causal=True),  # bottom-right: the first 25 queries see no key
    V2(B=2, N=33, M=100, H=4, Hk=2, d=48, padding=True, lam="float"),
    V2(B=2, N=50, M=61, H=4, Hk=1, d=24, padding=True, dtype=torch.float16),
    V2(N=37, M=29, d=16, causal=True, padding=True, dtype=torch.float64),
    V2(N=64, M=64, H=2, Hk=1, d=64, causal=True, strided=True, dtype=torch.float16),
    # bf16: under the interpreter the kernels compute it in fp32 (its bf16 math is wrong)
    V2(N=50, M=50, d=32, causal=True, lam="heads", dtype=torch.bfloat16),
]


def split_packed(packed, c: Case):
    """q, k, v as views of one projection output (B, L, 2H*d + k_heads*d + Hk*v_width)."""
    q, k, v = packed.split([2 * c.H * c.d, c.k_heads * c.d, c.Hk * c.v_width], dim=-1)
    return (q.unflatten(-1, (2 * c.H, c.d)), k.unflatten(-1, (c.k_heads, c.d)),
            v.unflatten(-1, (c.Hk, c.v_width)))


def make_inputs(c: Case, seed: int = 0):
    """Random inputs for a case (never zeros); returns tensors in c.dtype, requiring grad."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, dtype=c.dtype):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    if c.strided:  # one projection output, sliced: no copies
        assert c.N == c.M
        width = 2 * c.H * c.d + c.k_heads * c.d + c.Hk * c.v_width
        packed = rnd(c.B, c.N, width).requires_grad_()
        q, k, v = split_packed(packed, c)
        leaves = [packed]
    else:
        q = rnd(c.B, c.N, 2 * c.H, c.d).requires_grad_()
        k = rnd(c.B, c.M, c.k_heads, c.d).requires_grad_()
        v = rnd(c.B, c.M, c.Hk, c.v_width).requires_grad_()
        leaves = [q, k, v]
    acc = torch.float64 if c.dtype == torch.float64 else torch.float32
    if c.lam == "heads":
        lam = (0.2 + 0.6 * torch.rand(c.H, generator=g, dtype=torch.float64)).to(acc)
        lam.requires_grad_()
    elif c.lam == "scalar":
        lam = torch.tensor(0.37, dtype=acc, requires_grad=True)
    elif c.lam == "tokens":
        lam = torch.rand(c.B, c.N, c.H, generator=g, dtype=torch.float64).to(acc)
        lam.requires_grad_()
    else:
        lam = 0.42
    mask = None
    if c.padding:
        mask = torch.rand(c.B, c.M, generator=g) < 0.3
        mask[0] = True  # batch 0: every key ignored -> fully masked rows
    weight = None
    if c.norm:
        weight = (1.0 + 0.5 * rnd(2 * c.d, dtype=torch.float64)).to(acc).requires_grad_()
    return q, k, v, lam, mask, weight, leaves


def grad_leaves(leaves, lam, weight):
    out = list(leaves)
    if isinstance(lam, torch.Tensor):
        out.append(lam)
    if weight is not None:
        out.append(weight)
    return out


def run_case(c: Case, backend: str):
    """Output and gradients of every input from `backend`, and the same from the float64
    reference on identical values."""
    fn, reference = FUNCTIONS[c.variant]
    q, k, v, lam, mask, weight, leaves = make_inputs(c)
    epilogue = dict(norm_weight=weight, out_scale=0.2) if c.norm else {}
    out = fn(q, k, v, lambda_=lam, causal=c.causal, key_padding_mask=mask, backend=backend, **epilogue)
    assert out.dtype == c.dtype and out.shape == (c.B, c.N, c.H, c.v_width)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1),
                           dtype=torch.float64)
    inputs = grad_leaves(leaves, lam, weight)
    grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))

    ref_leaves = [t.detach().double().requires_grad_() for t in inputs]
    r = iter(ref_leaves)
    if c.strided:
        rq, rk, rv = split_packed(next(r), c)
    else:
        rq, rk, rv = next(r), next(r), next(r)
    rlam = next(r) if isinstance(lam, torch.Tensor) else lam
    if c.norm:
        epilogue = dict(norm_weight=next(r), out_scale=0.2)
    ref = reference(rq, rk, rv, rlam, causal=c.causal, key_padding_mask=mask, **epilogue)
    ref_grads = torch.autograd.grad(ref, ref_leaves, grad_out)
    return out, grads, ref, ref_grads


def _check(c: Case, backend: str):
    out, grads, ref, ref_grads = run_case(c, backend)
    assert_close_rel("out", out, ref, c.dtype)
    names = ["packed_qkv"] if c.strided else ["q", "k", "v"]
    names += ["lambda"] * (c.lam != "float") + ["norm_weight"] * c.norm
    for name, g, rg in zip(names, grads, ref_grads):
        # lambda (unless per token) and the norm weight are reductions over every row: allow
        # for the sum in fp16.
        reduced = name == "norm_weight" or (name == "lambda" and c.lam != "tokens")
        dtype = torch.bfloat16 if reduced and c.dtype == torch.float16 else c.dtype
        assert_close_rel(f"d{name}", g, rg, dtype)


@requires_interpreter
@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_matches_float64_reference(case, poison_empty):
    _check(case, "triton")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_torch_backend_matches_float64_reference(case):
    _check(case, "torch")


@requires_interpreter
@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_fully_masked_rows_are_zero_in_forward_and_backward(variant):
    """Batch 0 sees no key: its output and the gradients of its rows (q, k, v and a per-token
    lambda) are zeros, every gradient finite."""
    c = Case(B=2, N=20, M=30, H=2, Hk=1, d=16, padding=True, norm=True) if variant == "v1" \
        else V2(B=2, N=20, M=30, H=2, Hk=1, d=16, padding=True)
    q, k, v, lam, mask, weight, _ = make_inputs(c)
    fn, _ = FUNCTIONS[variant]
    epilogue = dict(norm_weight=weight) if c.norm else {}
    out = fn(q, k, v, lambda_=lam, key_padding_mask=mask, backend="triton", **epilogue)
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # batch 0 has no visible key
    out.sum().backward()
    per_row = [q, k, v] + ([lam] if c.lam == "tokens" else [])
    for t in per_row:
        assert torch.equal(t.grad[0], torch.zeros_like(t.grad[0]))
    leaves = per_row + ([lam] if c.lam != "tokens" else []) + ([weight] if c.norm else [])
    assert all(torch.isfinite(t.grad).all() for t in leaves)


@requires_interpreter
def test_inference_writes_only_the_output(poison_empty):
    """Without autograd the forward stores the output alone (no O2, X, LSE, rstd) and gives
    the same values."""
    from diffattn import autograd
    from diffattn.kernels import AttentionCall
    c = Case(B=2, N=40, M=40, H=2, Hk=1, d=16, causal=True, padding=True, norm=True)
    q, k, v, lam, mask, weight, _ = make_inputs(c)
    with_grad = diff_attention(q, k, v, lambda_=lam, causal=True, key_padding_mask=mask,
                               norm_weight=weight, out_scale=0.2, backend="triton")
    with torch.no_grad():
        inference = diff_attention(q, k, v, lambda_=lam, causal=True, key_padding_mask=mask,
                                   norm_weight=weight, out_scale=0.2, backend="triton")
        call = AttentionCall.create(0.25, causal=True, out_scale=0.2)
        saved = autograd.fused_fwd(q, k, v, lam, mask, weight, None, None, False,
                              *call.as_schema_args())
    assert torch.equal(inference, with_grad.detach())
    assert torch.equal(saved[0], inference)
    assert all(t.numel() == 0 for t in saved[1:])


@requires_interpreter
@pytest.mark.parametrize("N,M", [(5, 9), (9, 5)])
def test_causal_rule_is_bottom_right(N, M):
    """Query i sees key j iff j <= i + (M - N): changing a key it must not see changes nothing."""
    c = Case(N=N, M=M, H=1, Hk=1, d=16)
    q, k, v, *_ = make_inputs(c)
    out = diff_attention(q, k, v, lambda_=0.5, causal=True, backend="triton")
    i = N - 2  # sees keys 0 .. i + M - N
    v2 = v.detach().clone()
    v2[:, i + M - N + 1:] += 10.0
    out2 = diff_attention(q, k, v2, lambda_=0.5, causal=True, backend="triton")
    torch.testing.assert_close(out[:, : i + 1], out2[:, : i + 1])
    assert not torch.allclose(out[:, -1], out2[:, -1])


@requires_interpreter
@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_gradcheck_triton_float64(variant):
    """torch.autograd.gradcheck through the kernels (fp64 tl.dot is exact in the interpreter).
    Head dim 4 is padded to a 16-wide tile inside the kernel; causal, padding (one batch
    element fully padded) and GQA take part, with V1's per-head lambda and norm epilogue and
    V2's per-token lambda. fast_mode checks random projections of the Jacobian (the
    interpreter is slow); the full Jacobian is checked on a tiny shape below."""
    g = torch.Generator().manual_seed(3)
    B, N, M, H, Hk, d = 2, 6, 9, 2, 1, 4
    c = Case(variant=variant, B=B, N=N, M=M, H=H, Hk=Hk, d=d)
    q = torch.randn(B, N, 2 * H, d, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, M, c.k_heads, d, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, M, Hk, c.v_width, generator=g, dtype=torch.float64, requires_grad=True)
    if variant == "v1":
        lam = torch.tensor([0.3, 0.7], dtype=torch.float64, requires_grad=True)
        w = torch.rand(2 * d, generator=g, dtype=torch.float64).add(0.5).requires_grad_()
        inputs, epilogue = (q, k, v, lam, w), dict(out_scale=0.4)
    else:
        lam = torch.rand(B, N, H, generator=g, dtype=torch.float64, requires_grad=True)
        inputs, epilogue = (q, k, v, lam), {}
    mask = torch.zeros(B, M, dtype=torch.bool)
    mask[0, 6:] = True
    mask[1, :] = True
    attention, _ = FUNCTIONS[variant]

    def fn(q, k, v, lam, w=None):
        if w is not None:
            epilogue["norm_weight"] = w
        return attention(q, k, v, lambda_=lam, causal=True, key_padding_mask=mask, backend="triton",
                         **epilogue)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


@requires_interpreter
def test_gradcheck_triton_float64_full_jacobian():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(1, 3, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 4, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 4, 1, 4, generator=g, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, lam):
        return diff_attention(q, k, v, lambda_=lam, causal=True, backend="triton")

    assert torch.autograd.gradcheck(fn, (q, k, v, lam), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradcheck_torch_backend_float64():
    g = torch.Generator().manual_seed(4)
    # Full Jacobian: causal with N < M, two query heads per key/value group, the norm epilogue.
    q = torch.randn(1, 5, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 7, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 7, 1, 8, generator=g, dtype=torch.float64, requires_grad=True)
    lam = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    w = torch.rand(8, generator=g, dtype=torch.float64).add(0.5).requires_grad_()

    def fn(q, k, v, lam, w):
        return diff_attention(q, k, v, lambda_=lam, causal=True, norm_weight=w, backend="torch")

    assert torch.autograd.gradcheck(fn, (q, k, v, lam, w), eps=1e-6, atol=1e-5, rtol=1e-4)


@requires_interpreter
def test_stride_zero_and_noncontiguous_output_gradients():
    c = Case(B=2, N=30, M=30, d=16)
    q, k, v, lam, *_ = make_inputs(c)
    out = diff_attention(q, k, v, lambda_=lam, backend="triton")
    out.sum().backward()  # gradient with stride 0 everywhere
    ref = [t.grad.clone() for t in (q, k, v, lam)]
    for t in (q, k, v, lam):
        t.grad = None
    out = diff_attention(q, k, v, lambda_=lam, backend="triton")
    ones = torch.ones(out.shape[::-1]).permute(3, 2, 1, 0)  # last dim not contiguous
    out.backward(ones)
    for r, t in zip(ref, (q, k, v, lam)):
        torch.testing.assert_close(t.grad, r)


@requires_interpreter
def test_last_dim_noncontiguous_inputs_are_accepted():
    c = Case(N=20, M=20, d=16)
    q, k, v, lam, *_ = make_inputs(c)
    qt = q.detach().transpose(-1, -2).contiguous().transpose(-1, -2)  # stride(-1) != 1
    assert qt.stride(-1) != 1
    torch.testing.assert_close(diff_attention(qt, k, v, lambda_=lam, backend="triton"),
                               diff_attention(q, k, v, lambda_=lam, backend="triton"))


@requires_interpreter
def test_backward_is_deterministic():
    c = Case(B=2, N=50, M=50, H=4, Hk=1, d=16, padding=True, norm=True)
    results = []
    for _ in range(2):
        q, k, v, lam, mask, w, leaves = make_inputs(c)
        out = diff_attention(q, k, v, lambda_=lam, key_padding_mask=mask, norm_weight=w,
                             backend="triton")
        results.append(torch.autograd.grad(out.square().sum(), [q, k, v, lam, w]))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@requires_interpreter
def test_autocast_casts_inputs_and_returns_input_dtype_gradients():
    c = Case(N=20, M=20, d=16)
    q, k, v, lam, *_ = make_inputs(c)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = diff_attention(q, k, v, lambda_=lam, backend="triton")
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert q.grad.dtype == k.grad.dtype == v.grad.dtype == torch.float32
    ref = diff_attention_ref(q.detach().double(), k.detach().double(), v.detach().double(),
                             lam.detach().double())
    assert (out.double() - ref).abs().max() / ref.abs().max() < 3e-2


@requires_interpreter
def test_auto_backend_uses_triton_under_interpreter_and_torch_beyond_head_dim_128():
    c = Case(N=8, M=8, d=16)
    q, k, v, lam, *_ = make_inputs(c)
    torch.testing.assert_close(diff_attention(q, k, v, lambda_=lam),
                               diff_attention(q, k, v, lambda_=lam, backend="triton"))
    big = Case(N=8, M=8, H=1, Hk=1, d=160)
    q, k, v, lam, *_ = make_inputs(big)
    with pytest.warns(UserWarning, match="head_dim 160"):
        diff_attention(q, k, v, lambda_=lam)
    with pytest.raises(RuntimeError, match="head_dim 160"):
        diff_attention(q, k, v, lambda_=lam, backend="triton")


def test_triton_without_a_device_is_an_error_not_a_fallback(monkeypatch):
    import diffattn.backend as backend
    monkeypatch.setattr(backend, "INTERPRET", False)
    c = Case(N=4, M=4, d=16)
    q, k, v, lam, *_ = make_inputs(c)
    with pytest.raises(RuntimeError, match="backend='triton' cannot run here"):
        diff_attention(q, k, v, lambda_=lam, backend="triton")
    monkeypatch.setattr(backend, "_warned", set())
    with pytest.warns(UserWarning, match="using the torch backend"):
        diff_attention(q, k, v, lambda_=lam, backend="auto")


def test_dropout_and_attn_mask_run_on_the_torch_path():
    c = Case(N=10, M=12, d=16)
    q, k, v, lam, *_ = make_inputs(c)
    bias = torch.randn(10, 12)
    bias[3] = float("-inf")  # one query row fully masked -> zeros
    out = diff_attention(q, k, v, lambda_=lam, attn_mask=bias, backend="torch")
    ref = diff_attention_ref(q.double(), k.double(), v.double(), lam.double(),
                             attn_bias=bias.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)
    assert torch.equal(out[:, 3], torch.zeros_like(out[:, 3]))
    with pytest.raises(RuntimeError, match="attn_mask"):
        diff_attention(q, k, v, lambda_=lam, attn_mask=bias, backend="triton")
    with pytest.raises(RuntimeError, match="dropout"):
        diff_attention(q, k, v, lambda_=lam, dropout_p=0.1, backend="triton")
    torch.manual_seed(0)
    dropped = diff_attention(q, k, v, lambda_=lam, dropout_p=0.5, backend="torch")
    assert not torch.allclose(dropped, diff_attention(q, k, v, lambda_=lam, backend="torch"))


def _bad_inputs_v1():
    q = torch.randn(2, 5, 4, 16)
    k = torch.randn(2, 6, 2, 16)
    v = torch.randn(2, 6, 1, 32)
    ok = dict(q=q, k=k, v=v, lambda_=0.5)
    yield "q rank", dict(ok, q=q[0]), ValueError, "q must have shape"
    yield "q odd heads", dict(ok, q=torch.randn(2, 5, 3, 16)), ValueError, "even number of heads"
    yield "q no heads", dict(ok, q=torch.randn(2, 5, 0, 16)), ValueError, "positive even number"
    yield "k odd heads", dict(ok, k=torch.randn(2, 6, 3, 16)), ValueError, "k must have a pos"
    yield "k no heads", dict(ok, k=torch.randn(2, 6, 0, 16)), ValueError, "k must have a pos"
    yield "k head dim", dict(ok, k=torch.randn(2, 6, 2, 8)), ValueError, "k must have shape"
    yield "v width", dict(ok, v=torch.randn(2, 6, 1, 16)), ValueError, "v must have shape"
    yield "v length", dict(ok, v=torch.randn(2, 7, 1, 32)), ValueError, "v must have shape"
    yield "batch", dict(ok, k=torch.randn(3, 6, 2, 16)), ValueError, "k must have shape"
    yield ("H % Hk", dict(ok, q=torch.randn(2, 5, 6, 16), k=torch.randn(2, 6, 4, 16),
                          v=torch.randn(2, 6, 2, 32)), ValueError, "multiple of the number")
    yield "mixed dtypes", dict(ok, k=k.double()), TypeError, "k must have q's dtype"
    yield "int dtype", dict(ok, q=q.long()), TypeError, "q must be float16"
    yield "not a tensor", dict(ok, v=[1.0]), TypeError, "v must be a torch.Tensor"
    yield "lambda shape", dict(ok, lambda_=torch.ones(3)), ValueError, "lambda_ must be"
    yield "lambda type", dict(ok, lambda_="0.5"), TypeError, "lambda_ must be a float"
    yield "lambda int tensor", dict(ok, lambda_=torch.tensor(1)), TypeError, "lambda_ must be"
    yield ("mask dtype", dict(ok, key_padding_mask=torch.zeros(2, 6)), TypeError,
           "key_padding_mask must be a bool")
    yield ("mask shape", dict(ok, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)),
           ValueError, "key_padding_mask must have shape")
    yield ("norm weight", dict(ok, norm_weight=torch.ones(16)), ValueError,
           "norm_weight must have shape")
    yield "scale", dict(ok, scale=-1.0), ValueError, "scale must be"
    yield "scale nan", dict(ok, scale=float("nan")), ValueError, "scale must be"
    yield "causal not bool", dict(ok, causal="yes"), TypeError, "causal must be a bool"
    yield "eps negative", dict(ok, eps=-1.0), ValueError, "eps must be a positive finite"
    yield "eps inf", dict(ok, eps=float("inf")), ValueError, "eps must be a positive finite"
    yield "out_scale nan", dict(ok, out_scale=float("nan")), ValueError, "out_scale must be"
    yield "lambda bool", dict(ok, lambda_=True), TypeError, "lambda_ must be a float"
    yield "lambda nan", dict(ok, lambda_=float("nan")), ValueError, "lambda_ must be a finite"
    yield "lambda inf", dict(ok, lambda_=float("-inf")), ValueError, "lambda_ must be a finite"
    yield ("lambda tensor nan", dict(ok, lambda_=torch.tensor([0.5, float("nan")])), ValueError,
           "lambda_ must be finite")
    yield ("lambda tensor inf", dict(ok, lambda_=torch.tensor(float("inf"))), ValueError,
           "lambda_ must be finite")
    yield "backend", dict(ok, backend="cuda"), ValueError, "backend must be one of"
    yield ("attn_mask shape", dict(ok, attn_mask=torch.zeros(5, 5)), ValueError,
           "attn_mask must have shape")
    yield "dropout", dict(ok, dropout_p=1.5), ValueError, "dropout_p"


def _bad_inputs_v2():
    q = torch.randn(2, 5, 4, 16)
    k = torch.randn(2, 6, 1, 16)
    v = torch.randn(2, 6, 1, 16)
    ok = dict(q=q, k=k, v=v, lambda_=0.5)
    yield "q odd heads", dict(ok, q=torch.randn(2, 5, 3, 16)), ValueError, "even number of heads"
    yield ("pair split across groups", dict(ok, q=torch.randn(2, 5, 6, 16), k=torch.randn(2, 6, 2, 16),
                                            v=torch.randn(2, 6, 2, 16)),
           ValueError, "both maps of a head pair read the same group")
    yield "k no heads", dict(ok, k=torch.randn(2, 6, 0, 16)), ValueError, "k must have shape"
    yield "k head dim", dict(ok, k=torch.randn(2, 6, 1, 8)), ValueError, "k must have shape"
    yield "v width", dict(ok, v=torch.randn(2, 6, 1, 32)), ValueError, "v must have k's shape"
    yield "lambda shape", dict(ok, lambda_=torch.ones(2, 5, 3)), ValueError, "lambda_ must be"
    yield "lambda heads", dict(ok, lambda_=torch.ones(4)), ValueError, r"\(2,\) or \(2, 5, 2\)"
    yield "lambda type", dict(ok, lambda_="0.5"), TypeError, "lambda_ must be a float"
    yield "mixed dtypes", dict(ok, v=v.double()), TypeError, "v must have q's dtype"
    yield ("mask shape", dict(ok, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)),
           ValueError, "key_padding_mask must have shape")
    yield "causal", dict(ok, causal=1), TypeError, "causal must be a bool"
    yield "backend", dict(ok, backend="flash"), ValueError, "backend must be one of"


BAD_INPUTS = [(variant, *bad) for variant, table in (("v1", _bad_inputs_v1), ("v2", _bad_inputs_v2))
              for bad in table()]


@pytest.mark.parametrize("variant,name,kwargs,exc,match", BAD_INPUTS,
                         ids=[f"{b[0]}-{b[1]}" for b in BAD_INPUTS])
def test_bad_inputs_raise_named_errors(variant, name, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        FUNCTIONS[variant][0](**kwargs)


def test_device_mismatch_is_named():
    q = torch.randn(1, 3, 2, 16)
    k = torch.randn(1, 3, 2, 16, device="meta")
    v = torch.randn(1, 3, 1, 32)
    with pytest.raises(ValueError, match="k must be on q's device"):
        diff_attention(q, k, v, lambda_=0.5)


def test_tolerances_cover_every_supported_dtype():
    assert set(REL_TOL) == {torch.float16, torch.bfloat16, torch.float32, torch.float64}


# V2 only

def test_v2_is_v1_with_each_key_head_shared_by_both_maps():
    """With lambda per head, V2 equals V1 on keys repeated per pair and values of width d."""
    c = V2(B=2, N=9, M=11, H=4, Hk=2, d=16, lam="heads")
    q, k, v, lam, *_ = make_inputs(c)
    v2 = diff_attention_v2(q, k, v, lambda_=lam, causal=True, backend="torch")
    # V1 value heads have width 2d: put V2's values in the first half, zeros in the second.
    v1_values = torch.cat([v, torch.zeros_like(v)], dim=-1)
    v1 = diff_attention(q, k.repeat_interleave(2, dim=2), v1_values, lambda_=lam, causal=True,
                        backend="torch")
    torch.testing.assert_close(v2, v1[..., :c.d])
