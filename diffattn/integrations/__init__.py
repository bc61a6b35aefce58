"""Integrations of diffattn's fused differential attention into other libraries.

- ``diffattn.integrations.timm``: ``FusedDiffAttention`` (timm's ``DiffAttention`` on the fused
  kernels) and ``fuse_diff_attention(model)``. Needs the optional extra ``diffattn[timm]``;
  timm is imported only by that module.
"""
