"""timm's differential attention on diffattn's fused kernels.

    import timm
    from diffattn.integrations.timm import FusedDiffAttention, fuse_diff_attention

    model = timm.create_model("vit_base_patch16_224", attn_layer=FusedDiffAttention)
    # the backend of the layers timm builds:
    model = timm.create_model("vit_base_patch16_224",
                              attn_layer=FusedDiffAttention.with_backend("torch"))
    # or swap the layers of a model built with attn_layer="diff" (weights loaded or not):
    swapped = fuse_diff_attention(model)

``FusedDiffAttention`` is a subclass of ``timm.layers.DiffAttention`` with the same
constructor (plus ``backend=``), the same parameters and so the same state dict. Only the
attention core changes: timm's two ``scaled_dot_product_attention`` calls, the subtraction,
``sub_norm`` and the ``(1 - lambda_init)`` scale become one ``diffattn.diff_attention`` call on
views of the ``qkv`` projection's output (no copies).

How timm's layer maps onto diff_attention's layout (timm.layers.diff_attention, timm 1.0):

- ``num_heads`` counts differential heads H (two softmax maps each);
  ``head_dim`` d = dim // num_heads // 2. ``qkv`` is Linear(dim, 3 * dim): q, k, v are its
  three chunks of width dim = 2 H d.
- q and k are reshaped to (B, N, 2H, d) and timm pairs heads 2h and 2h+1 into differential
  head h (its (B, 2H, N, d) -> (B, H, 2, N, d) reshape): diff_attention's q and k layouts, one
  key/value group per head (Hk = H).
- v is reshaped to (B, N, H, 2d): one value head of width 2d per differential head, read by
  both maps: diff_attention's v.
- softmax scale d ** -0.5 (timm's ``scale``, SDPA's default): diff_attention's default.
- lambda is one scalar per layer, exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init: the four
  vectors go to the kernels stacked, which compute lambda (in fp32; timm casts it to q's
  dtype) and the vectors' gradients. With ``dual_lambda``, exp(lambda_a) - exp(lambda_b) +
  lambda_init is computed as timm does and passed as a 0-dim tensor.
- ``sub_norm`` is RmsNorm(2d, eps=1e-5) over each head's 2d features, then the output is
  scaled by (1 - lambda_init): ``norm_weight=sub_norm.weight``, ``eps=sub_norm.eps``,
  ``out_scale=1 - lambda_init``, fused into the kernel's epilogue (computed in fp32; timm
  computes it in the activation dtype, so half-precision results differ by rounding only).
- ``is_causal=True``: ``causal=True`` (self-attention, N == M: query i sees keys j <= i, as
  in SDPA). ``q_norm``/``k_norm`` (``qk_norm=True``) are applied to the q/k views first.
- diff_attention returns (B, N, H, 2d); flattened, it is timm's
  ``x.transpose(1, 2).reshape(B, N, C)``. ``norm``, ``proj`` and ``proj_drop`` are timm's.

What the fused op lacks, the layer hands to timm's own forward, with one
``BackendFallbackWarning`` per reason: an ``attn_mask``, and attention dropout while training.
``last_backend`` records what ran: "triton", "torch" (diffattn's backend choice, see
diffattn.backend) or "timm".

timm's plain ViTs (``timm.layers.Attention``, fused qkv) become differential with
``diffattn.replace_attention(model, variant="v2")`` (equal to the plain model at the start) or
``variant="v1"`` (a warm start in timm's DiffAttention head layout); see
``diffattn.self_attention``.
"""
from __future__ import annotations

from typing import Optional

import torch
from timm.layers import DiffAttention, RmsNorm
from torch import Tensor, nn

from ..backend import check_backend_name, resolve_layer_backend, warn_once
from ..functional import run_diff_attention
from ..lambdas import LambdaVectors
from ..self_attention import is_qkv_attention
from ..user_warnings import warn_at_user_code
from .class_swap import layers_to_swap

__all__ = ["FusedDiffAttention", "fuse_diff_attention"]

_BACKEND_CLASSES: dict = {}


class FusedDiffAttention(DiffAttention):
    """timm's ``DiffAttention`` whose attention core is ``diffattn.diff_attention``.

    Args: those of ``timm.layers.DiffAttention`` (dim, num_heads = differential heads,
    qkv_bias, qk_norm, scale_norm, proj_bias, attn_drop, proj_drop, norm_layer, depth,
    dual_lambda, device, dtype), and
        backend: "auto" | "triton" | "torch", diff_attention's backend.
    Attributes:
        last_backend: "triton", "torch" or "timm" (timm's own forward), what the last forward
            ran.
    forward(x (B, N, dim), attn_mask=None, is_causal=False) -> (B, N, dim), as timm's.
    """

    # The backend of layers built without one (see with_backend).
    default_backend = "auto"

    def __init__(self, *args, backend: Optional[str] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_fused(self.default_backend if backend is None else backend)

    @classmethod
    def with_backend(cls, backend: str) -> type:
        """A subclass whose layers use ``backend`` when timm builds them (timm passes its own
        arguments only and needs a class, not a partial):
        ``timm.create_model(name, attn_layer=FusedDiffAttention.with_backend("torch"))``.
        The same class is returned for the same backend."""
        check_backend_name(backend)
        if backend not in _BACKEND_CLASSES:
            _BACKEND_CLASSES[backend] = type(f"FusedDiffAttention_{backend}", (FusedDiffAttention,),
                                             {"default_backend": backend,
                                              "__module__": __name__,
                                              "__doc__": f"FusedDiffAttention, backend {backend!r}."})
        return _BACKEND_CLASSES[backend]

    def _init_fused(self, backend: str) -> None:
        check_backend_name(backend)
        self.backend = backend
        self.last_backend: Optional[str] = None

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads} (differential), head_dim={self.head_dim}, "
                f"lambda_init={self.lambda_init:.4g}, backend={self.backend!r}")

    def _timm_forward_reason(self, attn_mask: Optional[Tensor]) -> Optional[str]:
        """Why this call must run timm's own forward, or None when the fused op covers it."""
        if attn_mask is not None:
            return "an attn_mask was given (the fused op takes causal and key-padding masks only)"
        if self.training and self.attn_drop_p > 0:
            return f"attention dropout ({self.attn_drop_p}) is active in training"
        if not isinstance(self.sub_norm, RmsNorm):
            return f"sub_norm is a {type(self.sub_norm).__name__}, not timm's RmsNorm"
        return None

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        reason = self._timm_forward_reason(attn_mask)
        if reason is not None:
            warn_once(f"timm DiffAttention: {reason}",
                      f"diffattn: FusedDiffAttention runs timm's own DiffAttention forward "
                      f"because {reason}.")
            self.last_backend = "timm"
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)

        B, N, C = x.shape
        H, d = self.num_heads, self.head_dim
        # Views of the projection's output: (B, N, 3C) -> q, k (B, N, 2H, d), v (B, N, H, 2d).
        q, k, v = self.qkv(x).split(C, dim=-1)
        q = self.q_norm(q.unflatten(-1, (2 * H, d)))
        k = self.k_norm(k.unflatten(-1, (2 * H, d)))
        v = v.unflatten(-1, (H, 2 * d))
        if self.dual_lambda:
            lambda_ = self._compute_lambda().to(q.dtype)  # timm's type_as(q)
        else:  # the kernels compute lambda (and its vectors' gradients) themselves
            lambda_ = LambdaVectors(torch.stack([self.lambda_q1, self.lambda_k1,
                                                 self.lambda_q2, self.lambda_k2]),
                                    self.lambda_init)
        weight = self.sub_norm.weight
        if weight is None:  # RmsNorm(affine=False)
            weight = torch.ones(2 * d, device=q.device, dtype=torch.float32)

        backend = resolve_layer_backend(self, q.device, q.dtype, d)
        out = run_diff_attention(q, k, v, lambda_, backend, causal=is_causal,
                                 scale=self.scale, norm_weight=weight, eps=self.sub_norm.eps,
                                 out_scale=1.0 - self.lambda_init)
        x = self.norm(out.flatten(2))
        return self.proj_drop(self.proj(x))


def fuse_diff_attention(model: nn.Module, *, backend: str = "auto") -> int:
    """Turn every timm ``DiffAttention`` layer of ``model`` into a ``FusedDiffAttention``, in
    place, and return how many were turned.

    The layer object is kept and only its class changes (as torch.nn.utils.parametrize does),
    so its parameters, buffers, hooks, device, dtype and training mode stay as they are;
    ``FusedDiffAttention`` adds no parameter. Layers that are already fused are left alone (and
    not counted). When nothing is swapped a UserWarning says what the model holds instead
    (already fused layers; plain timm ``Attention`` layers, which ``diffattn.replace_attention``
    converts) and 0 is returned. A subclass of DiffAttention other than FusedDiffAttention raises a TypeError
    naming it, before any layer is changed: its own forward would be lost.

    Args:
        model: any nn.Module (a timm model, or one that holds timm blocks).
        backend: "auto" | "triton" | "torch" for the swapped layers.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_backend_name(backend)
    layers = layers_to_swap(model, DiffAttention, FusedDiffAttention,
                            "subclass of timm's DiffAttention with its own code: swap it yourself "
                            "(fuse_diff_attention only swaps DiffAttention itself)")
    if not layers:
        already = sum(isinstance(module, FusedDiffAttention) for module in model.modules())
        plain = sum(is_qkv_attention(module) for module in model.modules())
        message = (f"fuse_diff_attention swapped nothing: {type(model).__name__} holds no timm "
                   f"DiffAttention layer")
        if already:
            message += f" that is not fused already ({already} are FusedDiffAttention)"
        if plain:
            message += (f"; it holds {plain} plain attention layers (timm's Attention): make "
                        f"them differential with diffattn.replace_attention(model, "
                        f"variant=\"v1\" or \"v2\")")
        warn_at_user_code(message)
        return 0
    for module in layers:
        module.__class__ = FusedDiffAttention
        module._init_fused(backend)
    return len(layers)
