"""Hugging Face transformers' DiffLlama on diffattn's differential attention.

    from transformers import AutoModelForCausalLM
    from diffattn.integrations.transformers import fuse_diff_attention, unfuse_diff_attention

    model = AutoModelForCausalLM.from_pretrained(path)   # a DiffLlamaForCausalLM
    fuse_diff_attention(model)                            # -> number of attention layers fused
    out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=32)
    unfuse_diff_attention(model)                          # transformers' own attention again

``fuse_diff_attention`` turns every ``DiffLlamaAttention`` into a ``FusedDiffLlamaAttention``
in place (only the class changes, as in diffattn.integrations.timm): parameters, buffers,
state dict, hooks, device and dtype stay as they are, so ``save_pretrained`` and
``from_pretrained`` work unchanged. ``unfuse_diff_attention`` puts the original class back.
The layers' ``last_backend`` says what the last forward ran ("triton" or "torch", diffattn's
backend choice, see diffattn.backend).

How DiffLlama maps onto diffattn's layout (transformers 5, models/diffllama):

- HF's ``num_attention_heads`` Hq counts softmax maps: differential head h (H = Hq / 2 of them)
  subtracts q head h + H's map from q head h's; key heads g and g + Hk (Hk = Hkv / 2) are its
  two key heads, and the value heads g and g + Hk, concatenated, its 2d-wide value. diffattn
  pairs q heads 2h, 2h + 1 and key heads 2g, 2g + 1 and takes v (B, M, Hk, 2d): the rotated
  q, k and the values are re-laid out inside (one copy of each, views otherwise). Group g of
  head h is h // (H / Hk) in both.
- lambda = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init, one scalar
  per layer: the fused kernels take the four vectors and compute lambda (and the vectors'
  gradients) themselves; the torch path takes its float32 value.
- ``groupnorm`` is a weightless RMSNorm(2d) and the output is scaled by 1 - lambda_init:
  diffattn's RMSNorm epilogue with a weight of ones (a non-persistent buffer, outside the
  state dict), ``eps=groupnorm.eps``, ``out_scale=1 - lambda_init``.
- RoPE: transformers' ``apply_rotary_pos_emb`` on q and k before the op, with the model's
  cos/sin (so every rope type the model supports works).
- Masks, as transformers builds them for the model's ``attn_implementation``: None is causal
  (SDPA's reading: a prefill of N queries against M > N cache slots is aligned top-left), a
  2-D (B, M) mask is a key padding mask plus causal, a 4-D mask (B, 1, N, M) (bool, True =
  attend, or additive float) goes to the torch backend as it is; the fused kernels take it as
  a key padding mask (its last row) plus causal, which a device assertion checks it is.
  Outputs at padding positions are not defined (they differ between transformers' own eager
  and SDPA implementations too); every other output is.

Decoding: with the layers fused, ``generate`` uses a ``DiffAttnCache`` (unless a cache or a
``cache_implementation`` is given), which keeps each layer's keys and values in diffattn's
layout and runs every one-token step through ``diff_attention_with_kvcache``; left-padded
prompts are stored without their padding (``seqlens`` per sequence). transformers' own caches
(``DynamicCache``, the default of a plain forward) work too: their keys and values stay in
transformers' layout and are re-laid out at each call. A ``DiffAttnCache`` serves fused layers
only.

Attention weights are not returned (``output_attentions`` gives None for these layers, as with
transformers' SDPA and flash implementations).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor, nn


def _import_kernels_distribution() -> None:
    """transformers imports the ``kernels`` distribution (Hugging Face's kernel hub). When
    Python runs from the root of a diffattn source checkout (``python -m pytest``, ``python
    -c``), the checkout's own ``kernels/`` folder (installed as ``diffattn.kernels``) is first
    on sys.path under that name; import the distribution past it, once."""
    if "kernels" in sys.modules:
        return
    spec = importlib.util.find_spec("kernels")
    ours = Path(__file__).resolve().parents[2] / "kernels"
    if spec is None or spec.origin is None or Path(spec.origin).resolve().parent != ours:
        return
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ours.parent]
    try:
        importlib.import_module("kernels")
    except ImportError:  # not installed: transformers then finds no usable version either
        sys.modules.pop("kernels", None)
    finally:
        sys.path[:] = saved


_import_kernels_distribution()

from transformers.cache_utils import Cache, CacheLayerMixin  # noqa: E402
from transformers.generation import GenerationMixin  # noqa: E402
from transformers.models.diffllama import modeling_diffllama  # noqa: E402
from transformers.models.diffllama.modeling_diffllama import DiffLlamaAttention  # noqa: E402

from ..backend import check_backend_name, resolve_layer_backend  # noqa: E402
from ..checks import check_values  # noqa: E402
from ..functional import run_diff_attention  # noqa: E402
from ..kvcache import append_to_cache, run_with_kvcache  # noqa: E402
from ..lambdas import LambdaVectors, lambda_from_vectors  # noqa: E402
from ..masks import causal_keep_mask  # noqa: E402
from ..user_warnings import warn_at_user_code  # noqa: E402
from .class_swap import layers_to_swap  # noqa: E402

__all__ = ["DiffAttnCache", "DiffAttnCacheLayer", "FusedDiffLlamaAttention",
           "fuse_diff_attention", "unfuse_diff_attention"]

_NORM_WEIGHT = "_diffattn_norm_weight"
_FUSED_ATTRIBUTES = ("backend", "last_backend")


# ------------------------------------------------------------------ head layouts
def pair_heads(t: Tensor) -> Tensor:
    """(B, N, 2P, d) in transformers' order (head i pairs with head i + P) -> (B, N, 2P, d) in
    diffattn's (heads 2i, 2i + 1). A copy; t may be any strided view."""
    B, N, P2, d = t.shape
    return t.unflatten(2, (2, P2 // 2)).transpose(2, 3).reshape(B, N, P2, d)


def pair_values(t: Tensor) -> Tensor:
    """Values (B, M, 2Hk, d) in transformers' order -> (B, M, Hk, 2d): value heads g and
    g + Hk side by side, diffattn's value of group g. A copy."""
    B, M, P2, d = t.shape
    return t.unflatten(2, (2, P2 // 2)).transpose(2, 3).reshape(B, M, P2 // 2, 2 * d)


def pair_mask_heads(mask: Tensor) -> Tensor:
    """A 4-D mask (B|1, 1|Hq, N, M) with per-q-head masks in transformers' order -> diffattn's
    q-head order (a mask shared by the heads is returned as it is)."""
    if mask.shape[1] == 1:
        return mask
    return mask.unflatten(1, (2, mask.shape[1] // 2)).transpose(1, 2).flatten(1, 2)


# ------------------------------------------------------------------ masks
_MASK_NOT_CAUSAL_PADDING = ("a 4-D attention mask must be causal plus key padding for the fused "
                            "kernels (use backend='torch' for other masks)")


def _keep_from_mask(mask: Tensor) -> Tensor:
    """transformers' 4-D mask as bool, True = attend (bool masks are that already; additive
    float masks keep where they add 0)."""
    return mask if mask.dtype == torch.bool else mask == 0


def new_key_validity(mask: Optional[Tensor], batch: int, n_new: int) -> Optional[Tensor]:
    """(B, n_new) bool, True for the step's new tokens that are not padding, from the mask a
    layer receives (None: all of them)."""
    if mask is None:
        return None
    if mask.dim() == 2:
        return mask[:, mask.shape[1] - n_new:].bool().expand(batch, n_new)
    # the last query sees every new key that is not padding (causal)
    return _keep_from_mask(mask[:, 0, -1, mask.shape[3] - n_new:]).expand(batch, n_new)


# ------------------------------------------------------------------ the cache
class DiffAttnCacheLayer(CacheLayerMixin):
    """One layer of a ``DiffAttnCache``.

    Attributes:
        keys: (B, capacity, 2Hk, d), diffattn's key-pair layout (RoPE applied).
        values: (B, capacity, Hk, 2d).
        seqlens: (B,) int32, the valid (non-padding) tokens of each sequence, stored from row
            0 on without gaps.
        length: int, the positions processed so far, padding included (what transformers
            sizes its masks and positions with).
    """

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, max_cache_len: Optional[int] = None, **kwargs):
        super().__init__()
        self.max_cache_len = max_cache_len
        self.seqlens: Optional[Tensor] = None
        self.length = 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        """Allocate for a first step's key pairs (B, N, 2Hk, d) and values (B, N, Hk, 2d)."""
        B, N = key_states.shape[:2]
        capacity = max(N, self.max_cache_len or 0)
        self.keys = key_states.new_zeros(B, capacity, *key_states.shape[2:])
        self.values = value_states.new_zeros(B, capacity, *value_states.shape[2:])
        self.seqlens = torch.zeros(B, dtype=torch.int32, device=key_states.device)
        self.device = key_states.device
        self.is_initialized = True

    def reserve(self, key_states: Tensor, value_states: Tensor) -> None:
        """Make room for the step's new tokens (allocating or growing the buffers)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        needed = self.length + key_states.shape[1]
        capacity = self.keys.shape[1]
        if needed > capacity:
            grown = max(needed, 2 * capacity)
            keys = self.keys.new_zeros(self.keys.shape[0], grown, *self.keys.shape[2:])
            values = self.values.new_zeros(self.values.shape[0], grown, *self.values.shape[2:])
            keys[:, :capacity] = self.keys
            values[:, :capacity] = self.values
            self.keys, self.values = keys, values

    def append(self, key_states: Tensor, value_states: Tensor,
               valid: Optional[Tensor]) -> None:
        """Store the step's key pairs and values after each sequence's valid tokens, padding
        tokens (valid False) left out; ``length`` advances by the step's N."""
        self.reserve(key_states, value_states)
        N = key_states.shape[1]
        if valid is None:
            if self.length == 0:
                self.keys[:, :N] = key_states
                self.values[:, :N] = value_states
            else:
                append_to_cache(self.keys, self.values, key_states, value_states, self.seqlens)
            self.seqlens += N
        else:
            # valid tokens first, in order; the padding ones land past seqlens (never read)
            order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices
            keys = key_states.gather(1, order[:, :, None, None].expand_as(key_states))
            values = value_states.gather(1, order[:, :, None, None].expand_as(value_states))
            append_to_cache(self.keys, self.values, keys, values, self.seqlens)
            self.seqlens += valid.sum(1, dtype=torch.int32)
        self.length += N

    def update(self, key_states, value_states, *args, **kwargs):
        raise TypeError("a DiffAttnCache holds diffattn's key/value layout and serves fused "
                        "DiffLlama attention only (fuse_diff_attention); unfused layers need "
                        "one of transformers' caches, e.g. DynamicCache")

    def get_mask_sizes(self, query_length: int) -> tuple:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        if self.is_initialized:
            self.seqlens.zero_()
        self.length = 0

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last -tokens_to_remove tokens of every sequence (a negative int, as
        transformers' layers take it); the forgotten tokens are taken to be valid ones."""
        if tokens_to_remove > 0:
            raise ValueError(f"tokens_to_remove must be a negative int (tokens to drop), got "
                             f"{tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self.seqlens.sub_(-tokens_to_remove).clamp_(min=0)
        self.length = max(self.length + tokens_to_remove, 0)

    def _select(self, index: Tensor) -> None:
        if self.is_initialized:
            index = index.to(self.keys.device)
            self.keys, self.values = self.keys[index], self.values[index]
            self.seqlens = self.seqlens[index]

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self._select(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)
            self.seqlens = self.seqlens.repeat_interleave(repeats, dim=0)


class DiffAttnCache(Cache):
    """A transformers ``Cache`` whose layers keep keys and values in diffattn's layout, for
    fused DiffLlama attention: one-token decoding steps run ``diff_attention_with_kvcache``
    on it. ``generate`` makes one by itself on a fused model; pass one explicitly as
    ``model(..., cache=DiffAttnCache(model.config), use_cache=True)`` (``past_key_values=``
    in transformers versions before the rename).

    Args:
        config: the model's config (its number of layers), or None to add layers as they
            come.
        max_cache_len: tokens to allocate per sequence at the first step (the buffers grow
            by doubling past it).
    """

    def __init__(self, config=None, *, max_cache_len: Optional[int] = None):
        if max_cache_len is not None and (isinstance(max_cache_len, bool) or
                                          not isinstance(max_cache_len, int) or
                                          max_cache_len < 1):
            raise ValueError(f"max_cache_len must be a positive int or None, got "
                             f"{max_cache_len!r}")
        self.max_cache_len = max_cache_len
        if config is None:
            super().__init__(layer_class_to_replicate=functools.partial(
                DiffAttnCacheLayer, max_cache_len=max_cache_len))
        else:
            layers = config.get_text_config(decoder=True).num_hidden_layers
            super().__init__(layers=[DiffAttnCacheLayer(max_cache_len) for _ in range(layers)])

    def diffattn_layer(self, layer_idx: int) -> DiffAttnCacheLayer:
        while len(self.layers) <= layer_idx:
            self.layers.append(DiffAttnCacheLayer(self.max_cache_len))
        return self.layers[layer_idx]


# ------------------------------------------------------------------ the layer
class FusedDiffLlamaAttention(DiffLlamaAttention):
    """transformers' ``DiffLlamaAttention`` whose attention runs on diffattn (same
    constructor, parameters and state dict; see the module docstring for the mapping).

    Attributes:
        backend: "auto" | "triton" | "torch", asked for.
        last_backend: "triton" or "torch", what the last forward ran.
    forward(hidden_states (B, N, hidden), position_embeddings (cos, sin), attention_mask,
    cache) -> (output (B, N, hidden), None), as transformers' layer (no attention weights).
    """

    def __init__(self, config, layer_idx: Optional[int] = None, *, backend: str = "auto"):
        super().__init__(config, layer_idx)
        self._init_fused(backend)

    def _init_fused(self, backend: str) -> None:
        check_backend_name(backend)
        self.backend = backend
        self.last_backend: Optional[str] = None
        weight = self.groupnorm.weight
        if weight is None:  # DiffLlama's groupnorm has no weight: RMSNorm times ones
            weight = torch.ones(2 * self.head_dim, device=self.q_proj.weight.device)
            self.register_buffer(_NORM_WEIGHT, weight, persistent=False)

    def _unfuse(self) -> None:
        if _NORM_WEIGHT in self._buffers:
            delattr(self, _NORM_WEIGHT)
        for name in _FUSED_ATTRIBUTES:
            self.__dict__.pop(name, None)
        self.__class__ = DiffLlamaAttention

    def extra_repr(self) -> str:
        return (f"differential heads={self.config.num_attention_heads // 2}, "
                f"head_dim={self.head_dim}, lambda_init={self.lambda_init:.4g}, "
                f"backend={self.backend!r}")

    # -- the pieces of diffattn's call
    def diff_lambda(self, backend: str):
        """lambda as diffattn takes it: for the fused kernels the four vectors and lambda_init
        (the kernels compute lambda and the vectors' gradients), for the torch path its
        float32 value (a 0-dim tensor, differentiable)."""
        vectors = (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2)
        if backend == "torch":
            return lambda_from_vectors(*(t.float() for t in vectors), self.lambda_init)
        return LambdaVectors(torch.stack(vectors).float(), self.lambda_init)

    def _epilogue(self) -> dict:
        weight = self.groupnorm.weight
        eps = self.groupnorm.eps
        return dict(norm_weight=getattr(self, _NORM_WEIGHT) if weight is None else weight,
                    eps=torch.finfo(torch.float32).eps if eps is None else eps,
                    out_scale=1.0 - self.lambda_init)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
                backend: str) -> Tensor:
        """Dense diffattn over paired q (B, N, 2H, d), k (B, M, 2Hk, d), v (B, M, Hk, 2d),
        with transformers' mask read as the module docstring says. -> (B, N, H, 2d)."""
        B, N, M = q.shape[0], q.shape[1], k.shape[1]
        causal, key_padding_mask, attn_mask = N > 1, None, None
        if mask is None:
            if 1 < N < M:  # SDPA's is_causal is aligned top-left: the first N slots
                k, v = k[:, :N], v[:, :N]
        elif mask.dim() == 2:
            if tuple(mask.shape) != (B, M):
                raise ValueError(f"a 2-D attention mask must have shape (batch, keys) = "
                                 f"{(B, M)}, got {tuple(mask.shape)}")
            key_padding_mask = ~mask.bool()
            causal = True
        elif mask.dim() == 4:
            if backend == "torch":
                attn_mask = pair_mask_heads(~mask if mask.dtype == torch.bool else mask)
                causal = False
            else:
                keep = _keep_from_mask(mask[:, 0])                           # (B|1, N, M)
                key_padding_mask = ~keep[:, -1].expand(B, M)
                expected = causal_keep_mask(N, M, q.device)[None] & ~key_padding_mask[:, None]
                check_values((keep == expected).all(), _MASK_NOT_CAUSAL_PADDING)
                causal = True
        else:
            raise ValueError(f"attention_mask must be None, 2-D or 4-D, got shape "
                             f"{tuple(mask.shape)}")
        return run_diff_attention(q, k, v, self.diff_lambda(backend), backend, causal=causal,
                                  key_padding_mask=key_padding_mask, scale=self.scaling,
                                  attn_mask=attn_mask, **self._epilogue())

    def _attend_with_cache(self, cache: DiffAttnCache, q: Tensor, k: Tensor, v: Tensor,
                           mask: Optional[Tensor], backend: str) -> Tensor:
        layer = cache.diffattn_layer(self.layer_idx)
        B, N = q.shape[:2]
        past = layer.length
        valid = new_key_validity(mask, B, N)
        if past == 0:  # prefill: the dense op, then the cache
            out = self._attend(q, k, v, mask, backend)
            layer.append(k, v, valid)
            return out
        layer.reserve(k, v)
        if N == 1:  # a decoding step: the KV-cache op appends and attends
            out = run_with_kvcache(q, layer.keys[:, :past + 1], layer.values[:, :past + 1],
                                   self.diff_lambda(backend), backend, k=k, v=v,
                                   cache_seqlens=layer.seqlens, causal=False,
                                   scale=self.scaling, **self._epilogue())
            if valid is None:
                layer.seqlens += 1
            else:  # a padding token is overwritten by the next step
                layer.seqlens += valid[:, 0].to(torch.int32)
            layer.length += 1
            return out
        # N new tokens against a filled cache: the cached keys, then the new ones
        cached = torch.arange(past, device=q.device)[None, :] >= layer.seqlens[:, None]
        new_padding = torch.zeros(B, N, dtype=torch.bool, device=q.device) if valid is None \
            else ~valid
        keys = torch.cat([layer.keys[:, :past], k], 1)
        values = torch.cat([layer.values[:, :past], v], 1)
        out = run_diff_attention(q, keys, values, self.diff_lambda(backend), backend,
                                 causal=True, key_padding_mask=torch.cat([cached, new_padding], 1),
                                 scale=self.scaling, **self._epilogue())
        layer.append(k, v, valid)
        return out

    def forward(self, hidden_states: Tensor, position_embeddings: tuple,
                attention_mask: Optional[Tensor] = None, cache: Optional[Cache] = None,
                **kwargs):
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        B, N = hidden_states.shape[:2]
        d = self.head_dim
        q = self.q_proj(hidden_states).view(B, N, -1, d)
        k = self.k_proj(hidden_states).view(B, N, -1, d)
        v = self.v_proj(hidden_states).view(B, N, -1, d)
        cos, sin = position_embeddings
        q, k = modeling_diffllama.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=2)
        backend = resolve_layer_backend(self, q.device, q.dtype, d)
        if isinstance(cache, DiffAttnCache):
            out = self._attend_with_cache(cache, pair_heads(q), pair_heads(k), pair_values(v),
                                          attention_mask, backend)
        else:
            if cache is not None:  # transformers' layout in transformers' caches
                k, v = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx,
                                    kwargs=kwargs)
                k, v = k.transpose(1, 2), v.transpose(1, 2)
            out = self._attend(pair_heads(q), pair_heads(k), pair_values(v), attention_mask,
                               backend)
        return self.o_proj(out.reshape(B, N, -1)), None


# ------------------------------------------------------------------ generate's cache
def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
    """GenerationMixin._prepare_cache_for_generation of a fused model: a DiffAttnCache where
    transformers would make its default dynamic cache."""
    if (model_kwargs.get("cache") is None and model_kwargs.get("past_key_values") is None
            and generation_config.use_cache is not False
            and generation_config.cache_implementation is None
            and not getattr(generation_config, "is_assistant", False)
            and not getattr(self.config, "is_encoder_decoder", False)
            and any(isinstance(m, FusedDiffLlamaAttention) for m in self.modules())):
        max_cache_length = kwargs.get("max_cache_length", args[-1] if args else None)
        if not isinstance(max_cache_length, int) or max_cache_length < 1:
            max_cache_length = None
        model_kwargs["cache"] = DiffAttnCache(self.config, max_cache_len=max_cache_length)
        return None
    return type(self)._prepare_cache_for_generation(self, generation_config, model_kwargs,
                                                    *args, **kwargs)


def _is_our_generation_patch(module: nn.Module) -> bool:
    method = module.__dict__.get("_prepare_cache_for_generation")
    return getattr(method, "__func__", None) is _prepare_cache_for_generation


# ------------------------------------------------------------------ fuse / unfuse
def fuse_diff_attention(model: nn.Module, *, backend: str = "auto") -> int:
    """Put every transformers ``DiffLlamaAttention`` of ``model`` on diffattn, in place, and
    return how many layers were fused.

    Each layer object is kept and only its class changes (to FusedDiffLlamaAttention), so
    parameters, state dict, hooks, device, dtype and training mode stay as they are; a
    weightless ``groupnorm`` gets a non-persistent buffer of ones (outside the state dict).
    The model's ``generate`` (every GenerationMixin inside ``model``) then makes a
    ``DiffAttnCache`` where transformers would make its default cache. Layers already fused
    are left alone and not counted; when nothing is fused a UserWarning says so and 0 is
    returned. A subclass of DiffLlamaAttention with its own code raises a TypeError naming
    it, before any layer is changed.

    Args:
        model: any nn.Module holding DiffLlama attention layers (DiffLlamaForCausalLM, ...).
        backend: "auto" | "triton" | "torch" for the fused layers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_backend_name(backend)
    layers = layers_to_swap(model, DiffLlamaAttention, FusedDiffLlamaAttention,
                            "subclass of transformers' DiffLlamaAttention with its own code: "
                            "fuse_diff_attention only fuses DiffLlamaAttention itself")
    if not layers:
        already = sum(isinstance(m, FusedDiffLlamaAttention) for m in model.modules())
        message = (f"fuse_diff_attention fused nothing: {type(model).__name__} holds no "
                   f"transformers DiffLlamaAttention layer")
        if already:
            message += f" that is not fused already ({already} are FusedDiffLlamaAttention)"
        warn_at_user_code(message)
        return 0
    for module in layers:
        module.__class__ = FusedDiffLlamaAttention
        module._init_fused(backend)
    for module in model.modules():
        if isinstance(module, GenerationMixin) and \
                "_prepare_cache_for_generation" not in module.__dict__:
            module._prepare_cache_for_generation = types.MethodType(
                _prepare_cache_for_generation, module)
    return len(layers)


def unfuse_diff_attention(model: nn.Module) -> int:
    """Undo fuse_diff_attention: every FusedDiffLlamaAttention of ``model`` is a
    transformers ``DiffLlamaAttention`` again (its class, attributes and buffers as before
    fusing) and ``generate`` makes transformers' own caches. Returns how many layers were
    restored."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    restored = 0
    for module in model.modules():
        if isinstance(module, FusedDiffLlamaAttention):
            module._unfuse()
            restored += 1
        if _is_our_generation_patch(module):
            del module._prepare_cache_for_generation
    return restored
