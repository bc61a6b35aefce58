"""Integrations of diffattn's fused differential attention into other libraries.

- ``diffattn.integrations.timm``: ``FusedDiffAttention`` (timm's ``DiffAttention`` on the fused
  kernels) and ``fuse_diff_attention(model)``. Needs the optional extra ``diffattn[timm]``;
  timm is imported only by that module.
- ``diffattn.integrations.transformers``: ``fuse_diff_attention(model)`` /
  ``unfuse_diff_attention(model)``, Hugging Face transformers' DiffLlama on diffattn, and
  ``DiffAttnCache`` for decoding (``diffattn[transformers]``).
- ``diffattn.integrations.clip_benchmark``: ``load_diffattn`` and ``register()``, diffattn as a
  model type of LAION's CLIP_benchmark (``diffattn[clip_benchmark]``).
"""
