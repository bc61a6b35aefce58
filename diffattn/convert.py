"""``replace_attention``: turn the ``nn.MultiheadAttention`` layers of a model into
``DiffMultiheadAttention`` layers that carry their weights (a warm start for fine-tuning).

    import diffattn
    replaced = diffattn.replace_attention(model)        # in place; how many layers

Each ``nn.MultiheadAttention(E, heads, dropout, bias, batch_first=..., kdim=..., vdim=...)``
becomes ``DiffMultiheadAttention`` with the same arguments (plus ``lambda_init`` and
``backend``) on the same device and in the same dtype, in training or eval mode like the layer
it replaces. ``heads`` keeps nn.MultiheadAttention's meaning (softmax maps), so the
projections keep their shapes and the weights are copied through the public state-dict path:
``DiffMultiheadAttention.load_state_dict`` takes nn.MultiheadAttention's layouts (packed
``in_proj_weight``, or ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight`` with
kdim/vdim; ``in_proj_bias``; ``out_proj.*``). In the new layer, plain heads 2h and 2h+1 are
the two softmax maps of differential head h, and their two value heads, side by side, are its
value head of width 2 * E // heads.

What plain attention does not have is initialised as DiffMultiheadAttention documents it: the
lambda vectors ``lambda_q1/k1/q2/k2`` ~ N(0, 0.1) and ``diff_norm.weight`` = 1, with
``lambda_init`` either the Differential Transformer's depth schedule
(``lambda_init_for_depth(i)``, i the layer's index among the replaced layers in module order,
from 0) or one float for every layer. The converted model computes differential attention, a
different function from the one it was trained with: it is a starting point for training, not
an equivalent model.

torch's ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` have inference fast paths
that compute plain attention straight from ``self_attn``'s packed weights; for the layers
replaced here they are switched off, so those modules always call the new attention layer.
"""
from __future__ import annotations

from typing import Union

from torch import nn

from .backend import check_backend_name
from .module import DiffMultiheadAttention, lambda_init_for_depth

__all__ = ["replace_attention"]


def _check_convertible(name: str, layer: nn.MultiheadAttention) -> None:
    """Raise a ValueError naming the layer when it has something DiffMultiheadAttention lacks."""
    if layer.num_heads % 2:
        raise ValueError(f"layer {name!r} has num_heads={layer.num_heads}: differential "
                         f"attention needs an even number of heads (two softmax maps per "
                         f"differential head)")
    if layer.bias_k is not None or layer.add_zero_attn:
        raise ValueError(f"layer {name!r} uses add_bias_kv or add_zero_attn, which "
                         f"DiffMultiheadAttention does not have")


def _layer_lambda_init(lambda_init, index: int) -> float:
    if lambda_init == "depth":
        return lambda_init_for_depth(index)
    return float(lambda_init)


def _check_lambda_init(lambda_init) -> None:
    if lambda_init == "depth":
        return
    if isinstance(lambda_init, bool) or not isinstance(lambda_init, (int, float)):
        raise TypeError(f"lambda_init must be \"depth\" or a float, got {lambda_init!r}")


def _converted(layer: nn.MultiheadAttention, lambda_init: float,
               backend: str) -> DiffMultiheadAttention:
    """A DiffMultiheadAttention with ``layer``'s configuration and projection weights."""
    weight = layer.out_proj.weight
    new = DiffMultiheadAttention(
        layer.embed_dim, layer.num_heads, dropout=layer.dropout,
        bias=layer.in_proj_bias is not None, batch_first=layer.batch_first, kdim=layer.kdim,
        vdim=layer.vdim, lambda_init=lambda_init, backend=backend, device=weight.device,
        dtype=weight.dtype)
    new.load_state_dict(layer.state_dict(), strict=True)
    return new.train(layer.training)


def _keep_off_torch_fast_paths(root: nn.Module, replaced: set) -> None:
    """Make torch's transformer modules call the new layers instead of their fused plain
    attention. In eval mode TransformerEncoderLayer reads ``self_attn.in_proj_bias`` and then
    nn.MultiheadAttention's private ``_qkv_same_embed_dim`` to choose its fast path, which
    computes plain attention from ``in_proj_weight``: False sends it to its general path,
    which calls ``self_attn``. A TransformerEncoder would pack its input into nested tensors
    for that fast path."""
    for module in root.modules():
        if isinstance(module, nn.TransformerEncoderLayer) and id(module.self_attn) in replaced:
            if not hasattr(module.self_attn, "_qkv_same_embed_dim"):
                module.self_attn._qkv_same_embed_dim = False
        elif isinstance(module, nn.TransformerEncoder) and any(
                id(layer.self_attn) in replaced for layer in module.layers):
            module.use_nested_tensor = False


def replace_attention(module: nn.Module, *, lambda_init: Union[str, float] = "depth",
                      backend: str = "auto") -> int:
    """Replace every ``nn.MultiheadAttention`` inside ``module`` with a DiffMultiheadAttention
    that carries its projection weights, in place; return how many were replaced.

    Args:
        module: the model (the root itself cannot be replaced in place: pass its parent).
        lambda_init: "depth" for lambda_init_for_depth(i), i the index among the replaced
            layers in ``module.named_modules()`` order, or one float for all of them.
        backend: "auto" | "triton" | "torch" for the new layers.
    Raises:
        ValueError naming the layer, before anything is changed, for a layer with an odd
        num_heads, add_bias_kv or add_zero_attn.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if isinstance(module, nn.MultiheadAttention):
        raise TypeError("module is itself an nn.MultiheadAttention, which cannot be replaced in "
                        "place: pass the module that holds it, or build DiffMultiheadAttention("
                        "embed_dim, num_heads, ...) and load_state_dict(layer.state_dict())")
    _check_lambda_init(lambda_init)
    check_backend_name(backend)
    targets = [(name, layer) for name, layer in module.named_modules()
               if isinstance(layer, nn.MultiheadAttention)]
    for name, layer in targets:
        _check_convertible(name, layer)

    replaced = set()
    for index, (name, layer) in enumerate(targets):
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        new = _converted(layer, _layer_lambda_init(lambda_init, index), backend)
        setattr(parent, child, new)
        replaced.add(id(new))
    _keep_off_torch_fast_paths(module, replaced)
    return len(targets)
