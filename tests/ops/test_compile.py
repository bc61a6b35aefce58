"""torch.compile and the registered operators, on CPU.

On a GPU the ops are ``torch.library.triton_op``s that Inductor traces through (tested in
test_gpu.py with CUDA graphs). Under the Triton interpreter they are opaque custom ops with
fake implementations, which is enough to check here that the attention compiles as one graph
(fullgraph=True), that compiled forward and backward equal eager, and that opcheck passes. The
eager autograd path and the registered ops give bitwise the same results.
"""
from __future__ import annotations

import pytest
import torch

from diffattn import DiffMultiheadAttention, DiffMultiheadAttentionV2, autograd
from diffattn.kernels import AttentionCall
from helpers import INTERPRET, requires_interpreter

pytestmark = pytest.mark.slow  # torch.compile and opcheck: tens of seconds on a small CPU

BACKENDS = ["torch"] + (["triton"] if INTERPRET else [])


def _grads(module, x, **kwargs):
    out = module(x, **kwargs)[0]
    return (out, *torch.autograd.grad(out.square().sum(), [x, *module.parameters()]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer", [DiffMultiheadAttention, DiffMultiheadAttentionV2])
def test_module_compiles_as_one_graph_and_matches_eager(layer, backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = layer(64, 4, batch_first=True, backend=backend)
    x = torch.randn(2, 37, 64, requires_grad=True)
    mask = torch.rand(2, 37) < 0.2
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
    for kwargs in ({"is_causal": True}, {"key_padding_mask": mask}):
        for got, want in zip(_grads(compiled, x, **kwargs), _grads(m, x, **kwargs)):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert m.last_backend == backend


def test_inductor_compiles_the_torch_path():
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = DiffMultiheadAttentionV2(32, 2, batch_first=True, backend="torch")
    x = torch.randn(2, 9, 32, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True)
    for got, want in zip(_grads(compiled, x, is_causal=True), _grads(m, x, is_causal=True)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _op_inputs(requires_grad: bool):
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).requires_grad_(requires_grad)

    q, k, v = rnd(2, 20, 4, 16), rnd(2, 20, 4, 16), rnd(2, 20, 2, 32)
    lam = torch.tensor(0.5).requires_grad_(requires_grad)
    weight = (torch.rand(32, generator=g) + 0.5).requires_grad_(requires_grad)
    mask = torch.rand(2, 20, generator=g) < 0.2
    return q, k, v, lam, mask, weight


@requires_interpreter
@pytest.mark.parametrize("save", [True, False])
@pytest.mark.parametrize("vectors", [False, True], ids=["lambda", "lambda-vectors"])
def test_opcheck_forward(save, vectors):
    q, k, v, lam, mask, weight = _op_inputs(requires_grad=save)
    if vectors:  # lambda from the (4, L) vectors lq1, lk1, lq2, lk2, lambda_init 0.8
        lam = (0.1 * torch.randn(4, 16)).requires_grad_(save)
    call = AttentionCall.create(0.25, causal=True, lam_value=0.8 if vectors else 0.0,
                                lam_vectors=vectors, out_scale=0.2)
    torch.library.opcheck(torch.ops.diffattn.fwd.default,
                          (q, k, v, lam, mask, weight, None, None, save, *call.as_schema_args()))


@requires_interpreter
def test_opcheck_backward():
    q, k, v, lam, mask, weight = _op_inputs(requires_grad=False)
    call = AttentionCall.create(0.25, causal=True, out_scale=0.2)
    saved = autograd.fused_fwd(q, k, v, lam, mask, weight, None, None, True,
                          *call.as_schema_args())[1:]
    dout = torch.randn(2, 20, 2, 32)
    torch.library.opcheck(torch.ops.diffattn.bwd.default,
                          (dout, q, k, v, lam, mask, weight, *saved, None, None, True, True,
                           *call.as_schema_args()))


def test_registered_schemas_end_with_the_calls_fields():
    """The ops' schemas take AttentionCall's fields last, in field order, and the call
    survives the trip through them."""
    import dataclasses
    from diffattn import kvcache
    names = [f.name for f in dataclasses.fields(AttentionCall)]
    for op in (torch.ops.diffattn.fwd.default, torch.ops.diffattn.bwd.default,
               torch.ops.diffattn.kvcache_fwd.default):
        assert kvcache.diff_attn_decode is not None
        arguments = [a.name for a in op._schema.arguments]
        assert arguments[-len(names):] == names, op
    call = AttentionCall.create(0.5, causal=True, window_size=(3, 4), lam_value=0.8,
                                lam_vectors=True, out_scale=0.2, max_seqlens=(5, 6))
    assert call.window == (3, 0)
    assert AttentionCall.from_schema_args(*call.as_schema_args()) == call
    assert AttentionCall.from_schema_args(
        *[list(a) if isinstance(a, tuple) else a for a in call.as_schema_args()]) == call
    with pytest.raises(TypeError, match="unknown options"):
        AttentionCall.create(0.5, windw=(1, 1))


@requires_interpreter
def test_eager_path_and_registered_ops_agree_bitwise():
    q, k, v, lam, mask, weight = _op_inputs(requires_grad=True)
    call = AttentionCall.create(0.25, causal=True, out_scale=0.2)
    eager = autograd.DiffAttentionFunction.apply(q, k, v, lam, mask, weight, call)
    traced = autograd.fused_fwd(q, k, v, lam, mask, weight, None, None, True,
                           *call.as_schema_args())[0]
    assert torch.equal(eager, traced)
    dout = torch.randn(eager.shape)
    inputs = (q, k, v, lam, weight)
    for a, b in zip(torch.autograd.grad(eager, inputs, dout),
                    torch.autograd.grad(traced, inputs, dout)):
        assert torch.equal(a, b)


@requires_interpreter
def test_backward_of_an_unsaved_forward_is_a_clear_error():
    q, k, v, lam, mask, weight = _op_inputs(requires_grad=True)
    call = AttentionCall.create(0.25, causal=True, out_scale=0.2)
    out = autograd.fused_fwd(q, k, v, lam, mask, weight, None, None, False,
                        *call.as_schema_args())[0]
    with pytest.raises(RuntimeError, match="save_for_backward=False"):
        out.sum().backward()
