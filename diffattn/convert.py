"""Plain attention into differential attention: whole models in place, or one layer's weights.

    import diffattn
    replaced = diffattn.replace_attention(model)                 # DiffMultiheadAttention (V1)
    replaced = diffattn.replace_attention(model, variant="v2")   # DiffMultiheadAttentionV2
    v2_weights = diffattn.plain_to_v2_state_dict(mha.state_dict(), mha.num_heads)

``replace_attention(module, variant=...)`` replaces every ``nn.MultiheadAttention`` inside
``module``, in place, by a layer that carries its weights, on the same device, in the same dtype
and in training or eval mode like the layer it replaces (a warm start for fine-tuning):

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

``plain_to_v2_state_dict`` is that V2 mapping on tensors alone: one nn.MultiheadAttention state
dict in, one DiffMultiheadAttentionV2 state dict out. ``DiffMultiheadAttentionV2.from_plain``
and ``diffattn.models.create_model`` (an open_clip file loaded into ``attention="diff2"``) use
it.

torch's ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` have inference fast paths
that compute plain attention straight from ``self_attn``'s packed weights; for the layers
replaced here they are switched off, so those modules always call the new attention layer.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Union

import torch
from torch import Tensor, nn

from .backend import check_backend_name
from .module import DiffMultiheadAttention, check_lambda_init, lambda_init_for_depth
from .module_v2 import INITIAL_LAMBDA, DiffMultiheadAttentionV2

__all__ = ["check_plain_for_v2", "plain_to_v2_state_dict", "replace_attention"]

VARIANTS = ("v1", "v2")
# One nn.MultiheadAttention state dict with biases and kdim = vdim = embed_dim.
PLAIN_KEYS = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")


# --------------------------------------------------------------------------- V2: one layer
def _check_initial_lambda(initial_lambda) -> float:
    if isinstance(initial_lambda, bool) or not isinstance(initial_lambda, (int, float)):
        raise TypeError(f"initial_lambda must be a float in (0, 1), got {initial_lambda!r}")
    if not 0.0 < initial_lambda < 1.0:
        raise ValueError(f"initial_lambda must be in (0, 1), got {initial_lambda!r}")
    return float(initial_lambda)


def check_plain_for_v2(layer: nn.MultiheadAttention, name: Optional[str] = None) -> None:
    """Raise if ``layer`` cannot become a DiffMultiheadAttentionV2 that starts out equal to it.

    Raises:
        TypeError: ``layer`` is not an nn.MultiheadAttention.
        ValueError (naming the layer when ``name`` is given): no biases (lambda starts small
            through its bias), kdim or vdim other than embed_dim, add_bias_kv or add_zero_attn.
    """
    if not isinstance(layer, nn.MultiheadAttention):
        raise TypeError(f"mha must be an nn.MultiheadAttention, got {type(layer).__name__}")
    what = "from_plain" if name is None else f"layer {name!r}: V2 conversion"
    if not layer._qkv_same_embed_dim or layer.in_proj_bias is None:
        raise ValueError(f"{what} needs an nn.MultiheadAttention with biases and "
                         "kdim = vdim = embed_dim (lambda starts small through its bias)")
    if layer.bias_k is not None or layer.add_zero_attn:
        raise ValueError(f"{what} does not support add_bias_kv or add_zero_attn")


def plain_to_v2_state_dict(state_dict: Mapping[str, Tensor], num_heads: int, *,
                           initial_lambda: float = INITIAL_LAMBDA) -> dict:
    """The DiffMultiheadAttentionV2 weights that start out computing what a plain layer does.

    Args:
        state_dict: one nn.MultiheadAttention's state dict, exactly ``in_proj_weight`` (3E, E)
            (q, k, v rows stacked), ``in_proj_bias`` (3E,), ``out_proj.weight`` (E, E) and
            ``out_proj.bias`` (E,): a layer with biases and kdim = vdim = E.
        num_heads: the plain layer's head count h (head width d = E // h): the V2 layer's
            ``num_heads``, with 2h query heads and num_kv_heads = h.
        initial_lambda: every token's lambda at the start, in (0, 1).
    Returns:
        A new dict in DiffMultiheadAttentionV2's names, in the input's dtype and device:
        ``q_proj.weight`` (2E, E) and ``q_proj.bias`` (2E,) (query heads 2i: plain head i,
        query heads 2i + 1: zeros), ``lambda_proj.weight`` (h, E) zeros and
        ``lambda_proj.bias`` (h,) = logit(initial_lambda), ``k_proj.*`` / ``v_proj.*`` (E, E) /
        (E,) and ``out_proj.*``: copies of the plain layer's. The second maps then attend
        uniformly and contribute initial_lambda times the mean value row: outputs equal the
        plain layer's within about initial_lambda relative.
    Raises:
        TypeError: num_heads not an int, initial_lambda not a float, a value not a tensor.
        ValueError: missing or unexpected keys (named), shapes that do not fit (named),
            num_heads not dividing E, initial_lambda outside (0, 1).
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, int):
        raise TypeError(f"num_heads must be an int, got {type(num_heads).__name__}")
    initial_lambda = _check_initial_lambda(initial_lambda)
    missing = [key for key in PLAIN_KEYS if key not in state_dict]
    unexpected = sorted(set(state_dict) - set(PLAIN_KEYS))
    if missing or unexpected:
        raise ValueError(f"state_dict must hold exactly {list(PLAIN_KEYS)} (an "
                         f"nn.MultiheadAttention with biases and kdim = vdim = embed_dim); "
                         f"missing {missing}, unexpected {unexpected}")
    for key in PLAIN_KEYS:
        if not isinstance(state_dict[key], Tensor):
            raise TypeError(f"state_dict[{key!r}] must be a tensor, got "
                            f"{type(state_dict[key]).__name__}")
    weight, bias = state_dict["in_proj_weight"], state_dict["in_proj_bias"]
    if weight.dim() != 2:
        raise ValueError(f"state_dict['in_proj_weight'] must be 2-D (3E, E), got shape "
                         f"{tuple(weight.shape)}")
    E = weight.shape[1]
    shapes = {"in_proj_weight": (3 * E, E), "in_proj_bias": (3 * E,),
              "out_proj.weight": (E, E), "out_proj.bias": (E,)}
    wrong = [f"{key}: expected {shape}, got {tuple(state_dict[key].shape)}"
             for key, shape in shapes.items() if tuple(state_dict[key].shape) != shape]
    if wrong:
        raise ValueError("state_dict has shapes that do not fit an nn.MultiheadAttention of "
                         f"embed_dim {E}: " + "; ".join(wrong))
    if num_heads <= 0 or E % num_heads:
        raise ValueError(f"num_heads must be a positive divisor of embed_dim ({E}), got "
                         f"{num_heads}")
    h, d = num_heads, E // num_heads
    factory = {"dtype": weight.dtype, "device": weight.device}
    wq, wk, wv = weight.split(E)
    bq, bk, bv = bias.split(E)
    with torch.no_grad():
        q_weight = torch.zeros(h, 2, d, E, **factory)
        q_bias = torch.zeros(h, 2, d, **factory)
        q_weight[:, 0] = wq.reshape(h, d, E)  # the first map of pair i is plain head i
        q_bias[:, 0] = bq.reshape(h, d)
        logit = math.log(initial_lambda / (1.0 - initial_lambda))
        return {
            "q_proj.weight": q_weight.reshape(2 * E, E),
            "q_proj.bias": q_bias.reshape(2 * E),
            "lambda_proj.weight": torch.zeros(h, E, **factory),
            "lambda_proj.bias": torch.full((h,), logit, **factory),
            "k_proj.weight": wk.clone(), "k_proj.bias": bk.clone(),
            "v_proj.weight": wv.clone(), "v_proj.bias": bv.clone(),
            "out_proj.weight": state_dict["out_proj.weight"].clone(),
            "out_proj.bias": state_dict["out_proj.bias"].clone(),
        }


# --------------------------------------------------------------------------- whole models
def _check_convertible(name: str, layer: nn.MultiheadAttention, variant: str) -> None:
    """Raise a ValueError naming the layer when it has something the new layer lacks."""
    if variant == "v2":
        check_plain_for_v2(layer, name)
        return
    if layer.num_heads % 2:
        raise ValueError(f"layer {name!r} has num_heads={layer.num_heads}: differential "
                         f"attention needs an even number of heads (two softmax maps per "
                         f"differential head); variant=\"v2\" takes any head count")
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
    check_lambda_init(lambda_init)


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
    Raises:
        ValueError naming the layer, before anything is changed, for a layer the variant
        cannot convert (v1: an odd num_heads; v2: no biases, or kdim/vdim other than
        embed_dim; both: add_bias_kv or add_zero_attn). ValueError for an unknown variant or
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
        initial_lambda = _check_initial_lambda(
            INITIAL_LAMBDA if initial_lambda is None else initial_lambda)
    check_backend_name(backend)
    targets = [(name, layer) for name, layer in module.named_modules()
               if isinstance(layer, nn.MultiheadAttention)]
    for name, layer in targets:
        _check_convertible(name, layer, variant)

    replaced = set()
    for index, (name, layer) in enumerate(targets):
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        if variant == "v1":
            new = _converted(layer, _layer_lambda_init(lambda_init, index), backend)
        else:
            new = DiffMultiheadAttentionV2.from_plain(layer, initial_lambda=initial_lambda,
                                                      backend=backend)
        setattr(parent, child, new)
        replaced.add(id(new))
    _keep_off_torch_fast_paths(module, replaced)
    return len(targets)
