"""Plain attention into differential attention: whole models in place, or one layer's weights.

    import diffattn
    replaced = diffattn.replace_attention(model)                 # DiffMultiheadAttention (V1)
    replaced = diffattn.replace_attention(model, variant="v2")   # DiffMultiheadAttentionV2
    v2_weights = diffattn.plain_to_v2_state_dict(mha.state_dict(), mha.num_heads)

``replace_attention(module, variant=...)`` replaces every ``nn.MultiheadAttention`` inside
``module``, and every fused-qkv self-attention layer of timm's ``Attention`` form (timm's plain
ViTs; see ``diffattn.self_attention``: they become ``DiffSelfAttention`` /
``DiffSelfAttentionV2``, which keep timm's call), in place, by a layer that carries its weights,
on the same device, in the same dtype and in training or eval mode like the layer it replaces
(a warm start for fine-tuning). A model with no such layer gets a UserWarning saying so (and
0 is returned), never a silent 0:

- ``variant="v1"`` (the default): ``DiffMultiheadAttention``. Each ``nn.MultiheadAttention(E,
  heads, dropout, bias, batch_first=..., kdim=..., vdim=...)`` becomes
  ``DiffMultiheadAttention`` with the same arguments (plus ``lambda_init`` and ``backend``).
  ``heads`` keeps nn.MultiheadAttention's meaning (softmax maps), so the projections keep their
  shapes and the weights are copied through the public state-dict path:
  ``DiffMultiheadAttention.load_state_dict`` takes nn.MultiheadAttention's layouts (packed
  ``in_proj_weight``, or ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight`` with
  kdim/vdim; ``in_proj_bias``; ``out_proj.*``). In the new layer, plain heads 2h and 2h+1 are
  the two softmax maps of differential head h, and their two value heads, side by side, are its
  value head of width 2 * E // heads. What plain attention does not have is initialised as
  DiffMultiheadAttention documents it: the lambda vectors ``lambda_q1/k1/q2/k2`` ~ N(0, 0.1)
  and ``diff_norm.weight`` = 1, with ``lambda_init`` either the Differential Transformer's
  depth schedule (``lambda_init_for_depth(i)``, i the layer's index among the replaced layers
  in module order, from 0) or one float for every layer. The converted model computes
  differential attention, a different function from the one it was trained with: it is a
  starting point for training, not an equivalent model.
- ``variant="v2"``: ``DiffMultiheadAttentionV2.from_plain`` (Differential Transformer V2).
  Plain head i becomes differential head i: its q projection is the first map of the pair,
  k, v and out_proj are copied, the second map's q projection is zero and lambda_proj has
  weight 0 and bias logit(``initial_lambda``), so every token's lambda is ``initial_lambda``
  and the converted model computes what the plain one computes, within about
  ``initial_lambda`` relative: fine-tuning starts without a jump in the loss. Needs layers
  with biases and kdim = vdim = E; any head count.

Each layer owns its one-layer conversion, beside it (as flash-attn keeps ``remap_state_dict_*``
with each model): ``DiffMultiheadAttention.from_plain`` (module.py) and
``DiffMultiheadAttentionV2.from_plain`` with ``plain_to_v2_state_dict`` (module_v2.py), that V2
mapping on tensors alone: one nn.MultiheadAttention state dict in, one
DiffMultiheadAttentionV2 state dict out. Both layers' ``plain_state_dict_shapes`` and
``state_dict_from_plain`` are what ``diffattn.models.create_model`` uses to warm-start a whole
model from a plain checkpoint. This module converts whole models; ``plain_to_v2_state_dict``,
``check_plain_for_v2`` and ``PLAIN_KEYS`` are importable from here too.

torch's ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` have inference fast paths
that compute plain attention straight from ``self_attn``'s packed weights; for the layers
replaced here they are switched off, so those modules always call the new attention layer.
"""
from __future__ import annotations

from typing import Optional, Union

from torch import nn

from .backend import check_backend_name
from .module import (DiffMultiheadAttention, check_lambda_init, check_plain_for_v1,
                     lambda_init_for_depth)
# The one-layer conversions live beside their layers; these names are importable from here too.
from .module_v2 import (INITIAL_LAMBDA, PLAIN_KEYS, DiffMultiheadAttentionV2,
                        check_initial_lambda, check_plain_for_v2, plain_to_v2_state_dict)
from .self_attention import (DiffSelfAttention, DiffSelfAttentionV2, check_qkv_attention,
                             is_qkv_attention)
from .user_warnings import warn_at_user_code

__all__ = ["PLAIN_KEYS", "check_plain_for_v2", "plain_to_v2_state_dict", "replace_attention"]

VARIANTS = ("v1", "v2")


# --------------------------------------------------------------------------- whole models
def _check_convertible(name: str, layer: nn.MultiheadAttention, variant: str) -> None:
    """Raise a ValueError naming the layer when it has something the new layer lacks."""
    (check_plain_for_v2 if variant == "v2" else check_plain_for_v1)(layer, name)


def _layer_lambda_init(lambda_init, index: int) -> float:
    if lambda_init == "depth":
        return lambda_init_for_depth(index)
    return float(lambda_init)


def _check_lambda_init(lambda_init) -> None:
    if lambda_init == "depth":
        return
    if isinstance(lambda_init, bool) or not isinstance(lambda_init, (int, float)):
        raise TypeError(f"lambda_init must be \"depth\" or a float, got {lambda_init!r}")
    check_lambda_init(lambda_init)


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


def replace_attention(module: nn.Module, *, variant: str = "v1",
                      lambda_init: Union[str, float, None] = None,
                      initial_lambda: Optional[float] = None, backend: str = "auto") -> int:
    """Replace every ``nn.MultiheadAttention`` inside ``module`` with a differential layer
    that carries its weights, in place; return how many were replaced.

    Args:
        module: the model (the root itself cannot be replaced in place: pass its parent).
        variant: "v1" for DiffMultiheadAttention (DiffCLIP, the Differential Transformer),
            "v2" for DiffMultiheadAttentionV2 through ``from_plain`` (starts out equal to the
            plain model); see the module docstring.
        lambda_init: "v1" only: "depth" (the default) for lambda_init_for_depth(i), i the
            index among the replaced layers in ``module.named_modules()`` order, or one float
            for all of them.
        initial_lambda: "v2" only: every token's lambda at the start, in (0, 1) (default
            1e-5, as from_plain).
        backend: "auto" | "triton" | "torch" for the new layers.
    Warns:
        UserWarning when ``module`` holds no layer to replace (0 is returned), saying what it
        holds instead (layers already differential, timm DiffAttention layers).
    Raises:
        ValueError naming the layer, before anything is changed, for a layer the variant
        cannot convert (nn.MultiheadAttention: v1 an odd num_heads, v2 no biases or
        kdim/vdim other than embed_dim, both add_bias_kv or add_zero_attn; timm-style layers:
        qk_norm, scale_norm, a gate, v1 an odd head width). ValueError for an unknown variant or
        an argument of the other variant; TypeError for arguments of the wrong type.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if isinstance(module, nn.MultiheadAttention):
        raise TypeError("module is itself an nn.MultiheadAttention, which cannot be replaced in "
                        "place: pass the module that holds it, or build DiffMultiheadAttention("
                        "embed_dim, num_heads, ...) and load_state_dict(layer.state_dict()), "
                        "or DiffMultiheadAttentionV2.from_plain(layer)")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "v1":
        if initial_lambda is not None:
            raise ValueError("initial_lambda is an argument of variant=\"v2\" (per-token "
                             "lambda); variant \"v1\" takes lambda_init")
        lambda_init = "depth" if lambda_init is None else lambda_init
        _check_lambda_init(lambda_init)
    else:
        if lambda_init is not None:
            raise ValueError("lambda_init is an argument of variant=\"v1\"; variant \"v2\" "
                             "learns lambda per token and starts it at initial_lambda")
        initial_lambda = check_initial_lambda(
            INITIAL_LAMBDA if initial_lambda is None else initial_lambda)
    check_backend_name(backend)
    targets = [(name, layer) for name, layer in module.named_modules()
               if isinstance(layer, nn.MultiheadAttention) or is_qkv_attention(layer)]
    for name, layer in targets:
        if isinstance(layer, nn.MultiheadAttention):
            _check_convertible(name, layer, variant)
        else:
            check_qkv_attention(layer, name or "<model>", variant=variant)
    if not targets:
        warn_at_user_code(_nothing_replaced_message(module))
        return 0

    replaced = set()
    for index, (name, layer) in enumerate(targets):
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        plain = isinstance(layer, nn.MultiheadAttention)
        if variant == "v1":
            convert = (DiffMultiheadAttention.from_plain if plain
                       else DiffSelfAttention.from_qkv_attention)
            new = convert(layer, lambda_init=_layer_lambda_init(lambda_init, index),
                          backend=backend)
        else:
            convert = (DiffMultiheadAttentionV2.from_plain if plain
                       else DiffSelfAttentionV2.from_qkv_attention)
            new = convert(layer, initial_lambda=initial_lambda, backend=backend)
        setattr(parent, child, new)
        replaced.add(id(new))
    _keep_off_torch_fast_paths(module, replaced)
    return len(targets)


def _nothing_replaced_message(module: nn.Module) -> str:
    """Why replace_attention found nothing to replace in ``module``, and what to do."""
    differential = sum(isinstance(layer, (DiffMultiheadAttention, DiffMultiheadAttentionV2))
                       for layer in module.modules())
    timm_diff = sum(hasattr(layer, "lambda_init") and hasattr(layer, "qkv")
                    for layer in module.modules())
    notes = {  # note: the count of layers it is about (the note is left out at 0)
        f"it already holds {differential} differential attention layers": differential,
        f"it holds {timm_diff} timm DiffAttention layers: run them on the fused kernels with "
        f"diffattn.integrations.timm.fuse_diff_attention": timm_diff,
    }
    return "; ".join([f"replace_attention replaced nothing: {type(module).__name__} holds no "
                      f"nn.MultiheadAttention and no fused-qkv self-attention layer (timm's "
                      f"Attention)"] + [note for note, count in notes.items() if count])
