"""Independent reference forwards of the DiffCLIP release and open_clip, for the model tests.

Written from ../shared/reference/diffclip.md as plain functions over a state dict (no modules
from diffattn), with explicit matmuls and softmax:

- ``diffclip_encode_image`` / ``diffclip_encode_text``: the DiffCLIP release (timm-style
  vision blocks, OpenAI-style text tower with float32 LayerNorms, differential attention with
  the lambda formula, per-head RMSNorm and the (1 - lambda_init) scale).
- ``open_clip_encode_image`` / ``open_clip_encode_text``: open_clip's plain CLIP (packed
  in_proj, ln_pre, ln_post, proj); ``attention="diff"`` puts differential layers in place of
  its attention (diffattn's ``attention="diff"`` override of an open_clip config).

Layer counts, widths and patch sizes are read off the tensor shapes; head counts and
activations are arguments.
"""
import math

import torch

RMS_EPS = 1e-5


def gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": gelu, "quick_gelu": quick_gelu}


def layer_norm(x, weight, bias, eps=1e-5, fp32=False):
    """LayerNorm over the last dim; ``fp32`` computes in at least float32 and casts back."""
    dtype = x.dtype
    if fp32:
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        x, weight, bias = x.to(compute), weight.to(compute), bias.to(compute)
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return ((x - mean) / torch.sqrt(var + eps) * weight + bias).to(dtype)


def linear(x, sd, prefix):
    return x @ sd[prefix + ".weight"].T + sd[prefix + ".bias"]


def causal_bias(n, dtype):
    """(n, n) additive mask: -inf above the diagonal."""
    return torch.full((n, n), float("-inf"), dtype=dtype).triu(1)


def diff_attention(x, sd, prefix, num_heads, lambda_init, causal=False):
    """DiffCLIP's differential attention layer. x (B, N, E) -> (B, N, E)."""
    B, N, E = x.shape
    d = E // num_heads
    q = linear(x, sd, prefix + ".q_proj").view(B, N, num_heads, d).transpose(1, 2)
    k = linear(x, sd, prefix + ".k_proj").view(B, N, num_heads, d).transpose(1, 2)
    v = linear(x, sd, prefix + ".v_proj").view(B, N, num_heads // 2, 2 * d).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) * d ** -0.5          # (B, h, N, N)
    if causal:
        scores = scores + causal_bias(N, scores.dtype)
    maps = torch.softmax(scores, dim=-1)
    a1, a2 = maps[:, 0::2], maps[:, 1::2]                  # heads 2i and 2i+1
    lam = (torch.exp(torch.sum(sd[prefix + ".lambda_q1"] * sd[prefix + ".lambda_k1"]))
           - torch.exp(torch.sum(sd[prefix + ".lambda_q2"] * sd[prefix + ".lambda_k2"]))
           + lambda_init)
    o = (a1 - lam * a2) @ v                                # (B, h/2, N, 2d)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + RMS_EPS) * sd[prefix + ".diff_norm.weight"]
    o = o * (1 - lambda_init)
    o = o.transpose(1, 2).reshape(B, N, E)
    return linear(o, sd, prefix + ".out_proj")


def packed_attention(x, sd, prefix, num_heads, causal=False):
    """nn.MultiheadAttention with a packed in_proj. x (B, N, E) -> (B, N, E)."""
    B, N, E = x.shape
    d = E // num_heads
    qkv = x @ sd[prefix + ".in_proj_weight"].T + sd[prefix + ".in_proj_bias"]
    q, k, v = (t.reshape(B, N, num_heads, d).transpose(1, 2) for t in qkv.split(E, dim=-1))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if causal:
        scores = scores + causal_bias(N, scores.dtype)
    o = torch.softmax(scores, dim=-1) @ v
    return linear(o.transpose(1, 2).reshape(B, N, E), sd, prefix + ".out_proj")


def _layers(sd, prefix):
    count = 0
    while any(key.startswith(f"{prefix}{count}.") for key in sd):
        count += 1
    return count


def _ln(x, sd, prefix, fp32=False):
    return layer_norm(x, sd[prefix + ".weight"], sd[prefix + ".bias"], 1e-5, fp32)


def _text_tower(sd, tokens, attend, act, ln_fp32):
    x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"][: tokens.shape[1]]
    for i in range(_layers(sd, "transformer.resblocks.")):
        p = f"transformer.resblocks.{i}"
        x = x + attend(_ln(x, sd, p + ".ln_1", ln_fp32), p + ".attn")
        h = act(linear(_ln(x, sd, p + ".ln_2", ln_fp32), sd, p + ".mlp.c_fc"))
        x = x + linear(h, sd, p + ".mlp.c_proj")
    x = _ln(x, sd, "ln_final", ln_fp32)
    return x[torch.arange(x.shape[0]), tokens.argmax(-1)] @ sd["text_projection"]


def _patches(images, weight, bias):
    """Non-overlapping patch embedding as a matmul. -> (B, grid^2, W)."""
    B, C, S, _ = images.shape
    width, _, p, _ = weight.shape
    g = S // p
    patches = images.reshape(B, C, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(B, g * g, C * p * p)
    x = patches @ weight.reshape(width, -1).T
    return x if bias is None else x + bias


def diffclip_encode_image(sd, images, num_heads, lambda_init=0.8):
    """DiffCLIP release vision tower + image_projection. images (B, 3, S, S) -> (B, E)."""
    x = _patches(images, sd["visual.patch_embed.proj.weight"], sd["visual.patch_embed.proj.bias"])
    cls = sd["visual.cls_token"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["visual.pos_embed"]
    for i in range(_layers(sd, "visual.blocks.")):
        p = f"visual.blocks.{i}"
        x = x + diff_attention(_ln(x, sd, p + ".norm1"), sd, p + ".attn", num_heads, lambda_init)
        x = x + linear(gelu(linear(_ln(x, sd, p + ".norm2"), sd, p + ".mlp.fc1")), sd, p + ".mlp.fc2")
    x = _ln(x, sd, "visual.norm")
    return x[:, 0] @ sd["image_projection"]


def diffclip_encode_text(sd, tokens, num_heads, lambda_init=0.8):
    """DiffCLIP release text tower. tokens (B, L) -> (B, E)."""
    def attend(x, prefix):
        return diff_attention(x, sd, prefix, num_heads, lambda_init, causal=True)
    return _text_tower(sd, tokens, attend, quick_gelu, ln_fp32=True)


def _open_clip_attend(sd, num_heads, attention, lambda_init, causal):
    """open_clip's packed attention, or (attention="diff") a differential layer in its place."""
    def attend(x, prefix):
        if attention == "diff":
            return diff_attention(x, sd, prefix, num_heads, lambda_init, causal=causal)
        return packed_attention(x, sd, prefix, num_heads, causal=causal)
    return attend


def open_clip_encode_image(sd, images, num_heads, act="gelu", attention="plain", lambda_init=0.8):
    """open_clip VisionTransformer (cls pooling). images (B, 3, S, S) -> (B, E)."""
    attend = _open_clip_attend(sd, num_heads, attention, lambda_init, causal=False)
    x = _patches(images, sd["visual.conv1.weight"], None)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = _ln(x, sd, "visual.ln_pre")
    for i in range(_layers(sd, "visual.transformer.resblocks.")):
        p = f"visual.transformer.resblocks.{i}"
        x = x + attend(_ln(x, sd, p + ".ln_1"), p + ".attn")
        h = ACTIVATIONS[act](linear(_ln(x, sd, p + ".ln_2"), sd, p + ".mlp.c_fc"))
        x = x + linear(h, sd, p + ".mlp.c_proj")
    return _ln(x[:, 0], sd, "visual.ln_post") @ sd["visual.proj"]


def open_clip_encode_text(sd, tokens, num_heads, act="gelu", attention="plain", lambda_init=0.8):
    """open_clip text tower (argmax pooling). tokens (B, L) -> (B, E)."""
    attend = _open_clip_attend(sd, num_heads, attention, lambda_init, causal=True)
    return _text_tower(sd, tokens, attend, ACTIVATIONS[act], ln_fp32=False)
