"""Config-driven CLIP: a vision transformer and a text transformer with projections and a logit scale.

The attention layers are ``diffattn.DiffMultiheadAttention`` (``attention="diff"``, DiffCLIP),
``diffattn.DiffMultiheadAttentionV2`` (``attention="diff2"``, the Differential Transformer V2)
or plain attention (``attention="plain"``, CLIP: ``diffattn.models.attention.MultiheadAttention``,
nn.MultiheadAttention with a lean self-attention forward). The module tree, and so the
state-dict key names, follows one of two published layouts (``layout``):

- ``"diffclip"``: the DiffCLIP release (a timm-style vision transformer)::

      visual.patch_embed.proj   conv with bias          visual.cls_token (1, 1, W)
      visual.pos_embed (1, 1 + grid^2, W)               visual.blocks.{i}.norm1/attn/norm2/mlp.fc1/mlp.fc2
      visual.norm               final LayerNorm         image_projection (W, E)

- ``"open_clip"``: open_clip's VisionTransformer::

      visual.conv1 (bias optional)  visual.class_embedding (W)  visual.positional_embedding (1 + grid^2, W)
      visual.ln_pre  visual.transformer.resblocks.{i}.ln_1/attn/ln_2/mlp.c_fc/mlp.c_proj
      visual.ln_post  visual.proj (W, E)

Both share OpenAI CLIP's text tower: ``token_embedding``, ``positional_embedding``,
``transformer.resblocks.{i}.ln_1/attn/ln_2/mlp.c_fc/mlp.c_proj``, ``ln_final``,
``text_projection`` and ``logit_scale``. Plain attention layers hold ``in_proj_weight``,
``in_proj_bias`` and ``out_proj``; differential ones ``q_proj``, ``k_proj``, ``v_proj``,
``out_proj``, ``lambda_q1/k1/q2/k2`` and ``diff_norm.weight``; V2 ones ``q_proj``,
``lambda_proj``, ``k_proj``, ``v_proj`` and ``out_proj``.

No step of a forward or backward waits for the device: token ids on the CPU are range-checked
on the host, token ids on a GPU with an asynchronous device-side assertion.
"""
from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from diffattn import (BACKENDS, DiffMultiheadAttention, DiffMultiheadAttentionV2,
                      check_lambda_init, lambda_init_for_depth)

from .attention import MultiheadAttention
from .preprocess import RESIZE_MODES, make_transform
from .tokenizer import tokenize

LAYOUTS = ("diffclip", "open_clip")
ATTENTIONS = ("diff", "diff2", "plain")
ACTIVATIONS = ("gelu", "quick_gelu")
LAMBDA_SCHEDULES = ("constant", "depth")
VISION_POOLS = ("cls",)

DIFF_LAYERS = (DiffMultiheadAttention, DiffMultiheadAttentionV2)

# Submodule names of a residual block: (attention norm, MLP norm, MLP input, MLP output).
_BLOCK_NAMES = {
    "timm": ("norm1", "norm2", "fc1", "fc2"),
    "openai": ("ln_1", "ln_2", "c_fc", "c_proj"),
}


# --------------------------------------------------------------------------- configuration
def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_finite_number(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")


def _check_positive_number(name: str, value) -> None:
    _check_finite_number(name, value)
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}")


def _check_tower(prefix: str, width: int, layers: int, heads: int, mlp_ratio: float,
                 ln_eps: float, act: str) -> None:
    for name, value in (("width", width), ("layers", layers), ("heads", heads)):
        _check_positive_int(f"{prefix}.{name}", value)
    if width % heads:
        raise ValueError(f"{prefix}.width ({width}) must be divisible by {prefix}.heads ({heads})")
    _check_positive_number(f"{prefix}.mlp_ratio", mlp_ratio)
    if int(width * mlp_ratio) < 1:
        raise ValueError(f"{prefix}.mlp_ratio must give an MLP width >= 1, got {mlp_ratio!r}")
    _check_positive_number(f"{prefix}.ln_eps", ln_eps)
    _check_choice(f"{prefix}.act", act, ACTIVATIONS)


def _from_flat_dict(cls, data: dict, what: str):
    """Build dataclass ``cls`` from ``data``, naming unknown and missing fields."""
    if not isinstance(data, dict):
        raise TypeError(f"{what} must be a dict, got {type(data).__name__}")
    fields = {field.name: field for field in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown {what} fields {unknown}; known: {sorted(fields)}")
    missing = sorted(name for name, field in fields.items() if name not in data
                     and field.default is dataclasses.MISSING)
    if missing:
        raise ValueError(f"{what} is missing the required fields {missing}")
    return cls(**data)


@dataclasses.dataclass
class VisionConfig:
    """The image tower.

    Attributes:
        width, layers, heads: transformer width W, depth and heads (nn.MultiheadAttention's
            count: a "diff" layer has heads // 2 differential heads of width 2 W / heads, a
            "diff2" layer heads differential heads of width W / heads).
        patch_size, image_size: square patches and images; image_size % patch_size == 0.
        mlp_ratio: MLP hidden width = int(W * mlp_ratio).
        patch_bias: bias on the patch-embedding conv (DiffCLIP: True, open_clip: False).
        ln_pre: LayerNorm before the blocks (open_clip: True, DiffCLIP: False); named
            ``visual.ln_pre`` (open_clip layout) or ``visual.norm_pre`` (DiffCLIP layout).
        ln_eps: eps of every LayerNorm of the tower.
        ln_fp32: compute the LayerNorms in (at least) float32 whatever the activation dtype.
        act: MLP activation, "gelu" (exact) or "quick_gelu" (x * sigmoid(1.702 x)).
        pool: image feature; "cls" = the class token after the final norm.
    """

    width: int
    layers: int
    heads: int
    patch_size: int
    image_size: int
    mlp_ratio: float = 4.0
    patch_bias: bool = True
    ln_pre: bool = False
    ln_eps: float = 1e-5
    ln_fp32: bool = False
    act: str = "gelu"
    pool: str = "cls"

    def __post_init__(self):
        _check_tower("vision", self.width, self.layers, self.heads, self.mlp_ratio,
                     self.ln_eps, self.act)
        _check_positive_int("vision.patch_size", self.patch_size)
        _check_positive_int("vision.image_size", self.image_size)
        if self.image_size % self.patch_size:
            raise ValueError(f"vision.image_size ({self.image_size}) must be a multiple of "
                             f"vision.patch_size ({self.patch_size})")
        _check_choice("vision.pool", self.pool, VISION_POOLS)

    @property
    def grid_size(self) -> int:
        """Patches per image side."""
        return self.image_size // self.patch_size


@dataclasses.dataclass
class TextConfig:
    """The text tower (OpenAI CLIP's): causal transformer, feature at the largest token id.

    Attributes:
        width, layers, heads: transformer width, depth and heads (nn.MultiheadAttention's count).
        context_length: longest token sequence (77 for CLIP's tokenizer).
        vocab_size: token ids are in [0, vocab_size).
        mlp_ratio, ln_eps, ln_fp32, act: as in VisionConfig (DiffCLIP's text tower:
            QuickGELU and float32 LayerNorms).
    """

    width: int
    layers: int
    heads: int
    context_length: int = 77
    vocab_size: int = 49408
    mlp_ratio: float = 4.0
    act: str = "quick_gelu"
    ln_eps: float = 1e-5
    ln_fp32: bool = False

    def __post_init__(self):
        _check_tower("text", self.width, self.layers, self.heads, self.mlp_ratio,
                     self.ln_eps, self.act)
        _check_positive_int("text.context_length", self.context_length)
        _check_positive_int("text.vocab_size", self.vocab_size)


@dataclasses.dataclass
class CLIPConfig:
    """A whole CLIP model.

    Attributes:
        embed_dim: joint embedding width E.
        vision, text: the towers.
        layout: state-dict key layout, "diffclip" (DiffCLIP release) or "open_clip".
        attention: "diff" (DiffMultiheadAttention), "diff2" (DiffMultiheadAttentionV2) or
            "plain" (nn.MultiheadAttention's parameters).
        lambda_init: lambda_init of every "diff" layer when lambda_schedule is
            "constant" (DiffCLIP: 0.8), in (0, 1) (see diffattn.check_lambda_init). V2 layers learn lambda per token and ignore it.
        lambda_schedule: "constant", or "depth" for the Differential Transformer's
            0.8 - 0.6 * exp(-0.3 * i) at layer i of each tower (DiffCLIP*).
        preprocess: image preprocessing recipe, "squash" (DiffCLIP release) or "shortest"
            (open_clip); see diffattn.models.preprocess.
    """

    embed_dim: int
    vision: VisionConfig
    text: TextConfig
    layout: str = "diffclip"
    attention: str = "diff"
    lambda_init: float = 0.8
    lambda_schedule: str = "constant"
    preprocess: str = "squash"

    def __post_init__(self):
        _check_positive_int("embed_dim", self.embed_dim)
        if not isinstance(self.vision, VisionConfig):
            raise TypeError(f"vision must be a VisionConfig, got {type(self.vision).__name__}")
        if not isinstance(self.text, TextConfig):
            raise TypeError(f"text must be a TextConfig, got {type(self.text).__name__}")
        _check_choice("layout", self.layout, LAYOUTS)
        _check_choice("attention", self.attention, ATTENTIONS)
        _check_choice("lambda_schedule", self.lambda_schedule, LAMBDA_SCHEDULES)
        _check_choice("preprocess", self.preprocess, RESIZE_MODES)
        _check_finite_number("lambda_init", self.lambda_init)
        check_lambda_init(self.lambda_init)
        if self.attention == "diff":  # V2 layers take any head count
            for tower, heads in (("vision", self.vision.heads), ("text", self.text.heads)):
                if heads % 2:
                    raise ValueError(f"{tower}.heads must be even for differential attention "
                                     f"(two softmax maps per differential head), got {heads}")

    def layer_lambda_init(self, layer_index: int) -> float:
        """lambda_init of layer ``layer_index`` (from 0) of either tower."""
        if self.lambda_schedule == "depth":
            return lambda_init_for_depth(layer_index)
        return float(self.lambda_init)

    @classmethod
    def from_dict(cls, data: dict) -> "CLIPConfig":
        """Inverse of to_dict; unknown or missing fields raise ValueError naming them."""
        if not isinstance(data, dict):
            raise TypeError(f"config must be a dict, got {type(data).__name__}")
        flat = dict(data)
        flat["vision"] = _from_flat_dict(VisionConfig, data.get("vision", {}), "vision config")
        flat["text"] = _from_flat_dict(TextConfig, data.get("text", {}), "text config")
        return _from_flat_dict(cls, flat, "config")

    def to_dict(self) -> dict:
        """JSON-serialisable nested dict."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- building blocks
class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), OpenAI CLIP's GELU approximation, computed as
    silu(1.702 x) / 1.702 (PyTorch's fused SiLU, a third of the passes over x)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(x * 1.702) * (1 / 1.702)

    @staticmethod
    def forward_(x: Tensor) -> Tensor:
        """The same in place (x is overwritten and returned); not for tensors that need a
        gradient."""
        return F.silu(x.mul_(1.702), inplace=True).mul_(1 / 1.702)


class LayerNormFp32(nn.LayerNorm):
    """LayerNorm computed in at least float32 (float64 stays float64), cast back to the input dtype."""

    def forward(self, x: Tensor) -> Tensor:
        compute = torch.promote_types(x.dtype, torch.float32)
        weight = None if self.weight is None else self.weight.to(compute)
        bias = None if self.bias is None else self.bias.to(compute)
        out = F.layer_norm(x.to(compute), self.normalized_shape, weight, bias, self.eps)
        return out.to(x.dtype)


def _layer_norm(width: int, eps: float, fp32: bool, factory: dict) -> nn.LayerNorm:
    return (LayerNormFp32 if fp32 else nn.LayerNorm)(width, eps=eps, **factory)


def _activation(name: str) -> nn.Module:
    return QuickGELU() if name == "quick_gelu" else nn.GELU()


class Mlp(nn.Sequential):
    """The blocks' MLP: input Linear, activation, output Linear (an nn.Sequential, so its
    children keep their names and indices). x (..., W) -> (..., W). When nothing needs a
    gradient, QuickGELU runs in place on the hidden activations (a temporary of this
    forward), so it allocates nothing."""

    def forward(self, x: Tensor) -> Tensor:
        fc_in, act, fc_out = self
        hidden = fc_in(x)
        if isinstance(act, QuickGELU) and not (torch.is_grad_enabled() and
                                               hidden.requires_grad):
            return fc_out(act.forward_(hidden))
        return fc_out(act(hidden))


class ResidualBlock(nn.Module):
    """Pre-norm transformer block: x = x + attn(norm_a(x)); x = x + mlp(norm_m(x)).

    ``naming`` "timm" gives norm1/attn/norm2/mlp.fc1/mlp.fc2 (the DiffCLIP vision blocks),
    "openai" gives ln_1/attn/ln_2/mlp.c_fc/mlp.c_proj. Input and output (B, N, W).
    """

    def __init__(self, width: int, heads: int, *, mlp_ratio: float, act: str, ln_eps: float,
                 ln_fp32: bool, attention: str, lambda_init: float, backend: str, naming: str,
                 factory: dict):
        super().__init__()
        norm_attn, norm_mlp, mlp_in, mlp_out = _BLOCK_NAMES[naming]
        self._norm_names = (norm_attn, norm_mlp)
        self.add_module(norm_attn, _layer_norm(width, ln_eps, ln_fp32, factory))
        if attention == "diff":
            self.attn = DiffMultiheadAttention(width, heads, batch_first=True,
                                               lambda_init=lambda_init, backend=backend,
                                               **factory)
        elif attention == "diff2":
            self.attn = DiffMultiheadAttentionV2(width, heads, batch_first=True,
                                                 backend=backend, **factory)
        else:
            self.attn = MultiheadAttention(width, heads, batch_first=True, **factory)
        self.add_module(norm_mlp, _layer_norm(width, ln_eps, ln_fp32, factory))
        hidden = int(width * mlp_ratio)
        self.mlp = Mlp(OrderedDict([
            (mlp_in, nn.Linear(width, hidden, **factory)),
            ("act", _activation(act)),
            (mlp_out, nn.Linear(hidden, width, **factory)),
        ]))

    def forward(self, x: Tensor, causal: bool = False) -> Tensor:
        """x (B, N, W); ``causal`` masks keys after each query (text tower)."""
        norm_attn, norm_mlp = (getattr(self, name) for name in self._norm_names)
        x = x + self.attn(norm_attn(x), need_weights=False, is_causal=causal)[0]
        return x + self.mlp(norm_mlp(x))


def _build_blocks(config: CLIPConfig, tower, naming: str, backend: str,
                  factory: dict) -> nn.ModuleList:
    return nn.ModuleList(
        ResidualBlock(tower.width, tower.heads, mlp_ratio=tower.mlp_ratio, act=tower.act,
                      ln_eps=tower.ln_eps, ln_fp32=tower.ln_fp32, attention=config.attention,
                      lambda_init=config.layer_lambda_init(i), backend=backend, naming=naming,
                      factory=factory)
        for i in range(tower.layers))


def _run_blocks(blocks: nn.ModuleList, x: Tensor, causal: bool, grad_checkpointing: bool) -> Tensor:
    """Apply ``blocks`` in order; with ``grad_checkpointing`` (and grad enabled) each block
    recomputes its activations in the backward pass."""
    for block in blocks:
        if grad_checkpointing and torch.is_grad_enabled():
            x = checkpoint(block, x, causal, use_reentrant=False)
        else:
            x = block(x, causal)
    return x


class Transformer(nn.Module):
    """``resblocks``: a stack of OpenAI-named ResidualBlocks. forward (B, N, W) -> (B, N, W)."""

    def __init__(self, config: CLIPConfig, tower, backend: str, factory: dict):
        super().__init__()
        self.resblocks = _build_blocks(config, tower, "openai", backend, factory)
        self.grad_checkpointing = False

    def forward(self, x: Tensor, causal: bool = False) -> Tensor:
        return _run_blocks(self.resblocks, x, causal, self.grad_checkpointing)


class PatchEmbed(nn.Module):
    """timm's patch embedding: ``proj`` conv, (B, 3, S, S) -> (B, grid^2, W)."""

    def __init__(self, config: VisionConfig, factory: dict):
        super().__init__()
        self.proj = nn.Conv2d(3, config.width, config.patch_size, stride=config.patch_size,
                              bias=config.patch_bias, **factory)

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class DiffCLIPVisionTransformer(nn.Module):
    """Vision tower in the DiffCLIP release layout. forward (B, 3, S, S) -> cls feature (B, W),
    before ``image_projection`` (held by CLIP)."""

    def __init__(self, config: CLIPConfig, backend: str, factory: dict):
        super().__init__()
        vision = config.vision
        self.patch_embed = PatchEmbed(vision, factory)
        self.cls_token = nn.Parameter(torch.empty(1, 1, vision.width, **factory))
        self.pos_embed = nn.Parameter(torch.empty(1, 1 + vision.grid_size ** 2, vision.width,
                                                  **factory))
        self.norm_pre = (_layer_norm(vision.width, vision.ln_eps, vision.ln_fp32, factory)
                         if vision.ln_pre else None)
        self.blocks = _build_blocks(config, vision, "timm", backend, factory)
        self.norm = _layer_norm(vision.width, vision.ln_eps, vision.ln_fp32, factory)
        self.grad_checkpointing = False

    def init_parameters(self) -> None:
        nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.normal_(self.pos_embed, std=0.02)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + self.pos_embed.to(x.dtype)
        if self.norm_pre is not None:
            x = self.norm_pre(x)
        x = _run_blocks(self.blocks, x, False, self.grad_checkpointing)
        return self.norm(x)[:, 0]


class OpenCLIPVisionTransformer(nn.Module):
    """Vision tower in open_clip's layout, projection included.
    forward (B, 3, S, S) -> (B, E) = ln_post(cls token) @ proj."""

    def __init__(self, config: CLIPConfig, backend: str, factory: dict):
        super().__init__()
        vision = config.vision
        self.conv1 = nn.Conv2d(3, vision.width, vision.patch_size, stride=vision.patch_size,
                               bias=vision.patch_bias, **factory)
        self.class_embedding = nn.Parameter(torch.empty(vision.width, **factory))
        self.positional_embedding = nn.Parameter(torch.empty(1 + vision.grid_size ** 2,
                                                             vision.width, **factory))
        self.ln_pre = (_layer_norm(vision.width, vision.ln_eps, vision.ln_fp32, factory)
                       if vision.ln_pre else None)
        self.transformer = Transformer(config, vision, backend, factory)
        self.ln_post = _layer_norm(vision.width, vision.ln_eps, vision.ln_fp32, factory)
        self.proj = nn.Parameter(torch.empty(vision.width, config.embed_dim, **factory))

    def init_parameters(self) -> None:
        scale = self.class_embedding.shape[0] ** -0.5
        nn.init.normal_(self.class_embedding, std=scale)
        nn.init.normal_(self.positional_embedding, std=scale)
        nn.init.normal_(self.proj, std=scale)

    def forward(self, images: Tensor) -> Tensor:
        x = self.conv1(images).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        if self.ln_pre is not None:
            x = self.ln_pre(x)
        x = self.transformer(x)
        return self.ln_post(x[:, 0]) @ self.proj


# --------------------------------------------------------------------------- the model
class CLIP(nn.Module):
    """CLIP image and text encoders built from a CLIPConfig.

    Args:
        config: the architecture (see CLIPConfig).
        backend: "auto" | "triton" | "torch", for every DiffMultiheadAttention.
        device, dtype: where and in which dtype the parameters are created (the lambda
            vectors of differential layers stay float32, as in the reference code).

    Attributes:
        config: the CLIPConfig.
        preprocess: ImageTransform turning one image (PIL, path, uint8 tensor) into the
            (3, S, S) float tensor this model expects.
        visual: the vision tower (DiffCLIPVisionTransformer or OpenCLIPVisionTransformer).
    """

    def __init__(self, config: CLIPConfig, *, backend: str = "auto", device=None, dtype=None):
        super().__init__()
        if not isinstance(config, CLIPConfig):
            raise TypeError(f"config must be a CLIPConfig, got {type(config).__name__}")
        _check_choice("backend", backend, BACKENDS)
        factory = {"device": device, "dtype": dtype}
        self.config = config
        self.preprocess = make_transform(config.vision.image_size, config.preprocess)
        text = config.text
        if config.layout == "diffclip":
            self.visual = DiffCLIPVisionTransformer(config, backend, factory)
            self.image_projection = nn.Parameter(torch.empty(config.vision.width,
                                                             config.embed_dim, **factory))
        else:
            self.visual = OpenCLIPVisionTransformer(config, backend, factory)
        self.token_embedding = nn.Embedding(text.vocab_size, text.width, **factory)
        self.positional_embedding = nn.Parameter(torch.empty(text.context_length, text.width,
                                                             **factory))
        self.transformer = Transformer(config, text, backend, factory)
        self.ln_final = _layer_norm(text.width, text.ln_eps, text.ln_fp32, factory)
        self.text_projection = nn.Parameter(torch.empty(text.width, config.embed_dim, **factory))
        self.logit_scale = nn.Parameter(torch.empty((), **factory))
        self.init_parameters()

    # ------------------------------------------------------------------ setup
    def init_parameters(self) -> None:
        """Random initialisation in OpenAI CLIP's scheme: embeddings N(0, 0.02) / N(0, 0.01),
        attention inputs N(0, W^-0.5), residual outputs N(0, W^-0.5 (2 L)^-0.5), MLP inputs
        N(0, (2 W)^-0.5), projections N(0, W^-0.5), logit_scale ln(1 / 0.07). Biases, norms
        and lambda vectors keep their modules' initialisation."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.visual.init_parameters()
        if self.config.layout == "diffclip":
            nn.init.normal_(self.image_projection, std=self.config.vision.width ** -0.5)
        nn.init.normal_(self.text_projection, std=self.config.text.width ** -0.5)
        nn.init.constant_(self.logit_scale, math.log(1 / 0.07))
        for tower, blocks in (("vision", self._blocks("vision")), ("text", self._blocks("text"))):
            width = getattr(self.config, tower).width
            attn_std, fc_std = width ** -0.5, (2 * width) ** -0.5
            out_std = attn_std * (2 * len(blocks)) ** -0.5
            for block in blocks:
                attn = block.attn
                if isinstance(attn, DIFF_LAYERS):
                    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                        nn.init.normal_(proj.weight, std=attn_std)
                else:
                    nn.init.normal_(attn.in_proj_weight, std=attn_std)
                nn.init.normal_(attn.out_proj.weight, std=out_std)
                nn.init.normal_(block.mlp[0].weight, std=fc_std)
                nn.init.normal_(block.mlp[2].weight, std=out_std)

    def _blocks(self, tower: str) -> nn.ModuleList:
        if tower == "text":
            return self.transformer.resblocks
        if self.config.layout == "diffclip":
            return self.visual.blocks
        return self.visual.transformer.resblocks

    def attention_layers(self, tower: str = "all") -> list:
        """The attention modules, in depth order: ``tower`` "vision", "text" or "all"
        (vision first)."""
        _check_choice("tower", tower, ("all", "vision", "text"))
        towers = ("vision", "text") if tower == "all" else (tower,)
        return [block.attn for name in towers for block in self._blocks(name)]

    def set_backend(self, backend: str) -> None:
        """Set ``backend`` ("auto" | "triton" | "torch") on every differential attention layer."""
        _check_choice("backend", backend, BACKENDS)
        for layer in self.attention_layers():
            if isinstance(layer, DIFF_LAYERS):
                layer.backend = backend

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (torch.utils.checkpoint,
        use_reentrant=False) instead of storing them, in both towers."""
        self.transformer.grad_checkpointing = bool(enable)
        tower = self.visual if self.config.layout == "diffclip" else self.visual.transformer
        tower.grad_checkpointing = bool(enable)

    def tokenize(self, texts, trim: bool = False) -> Tensor:
        """CLIP token ids (n, context_length) for a string or a list of strings; with ``trim``
        only the columns the longest text needs (the embeddings are the same)."""
        return tokenize(texts, context_length=self.config.text.context_length, trim=trim)

    # ------------------------------------------------------------------ inputs
    def _check_images(self, images) -> None:
        size = self.config.vision.image_size
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a tensor (B, 3, {size}, {size}), got "
                            f"{type(images).__name__}")
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"images must have shape (B, 3, {size}, {size}) for this model "
                             f"(image size {size}), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be a float tensor (preprocessed, see "
                             f"model.preprocess), got dtype {images.dtype}")

    def _check_tokens(self, tokens) -> None:
        text = self.config.text
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens must be a tensor (B, L), got {type(tokens).__name__}")
        if tokens.dim() != 2 or not 1 <= tokens.shape[1] <= text.context_length:
            raise ValueError(f"tokens must have shape (B, L) with 1 <= L <= context length "
                             f"{text.context_length}, got {tuple(tokens.shape)}")
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise ValueError(f"tokens must be an integer tensor of token ids, got dtype "
                             f"{tokens.dtype}")
        if tokens.numel() == 0 or torch.compiler.is_compiling():
            return  # compiled code checks its indices on the device itself
        if tokens.device.type == "cpu":  # the values are on the host: check them there
            low, high = int(tokens.min()), int(tokens.max())
            if low < 0 or high >= text.vocab_size:
                raise ValueError(f"tokens must hold ids in [0, {text.vocab_size}), got values "
                                 f"in [{low}, {high}]")
        else:  # no host synchronisation: the device raises if the ids are out of range
            torch._assert_async(((tokens >= 0) & (tokens < text.vocab_size)).all(),
                                f"tokens must hold ids in [0, {text.vocab_size})")

    # ------------------------------------------------------------------ encoders
    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        """images (B, 3, S, S) float, preprocessed -> (B, embed_dim) image embeddings
        (unit length with ``normalize``)."""
        self._check_images(images)
        dtype = (self.visual.patch_embed.proj if self.config.layout == "diffclip"
                 else self.visual.conv1).weight.dtype
        features = self.visual(images.to(dtype))
        if self.config.layout == "diffclip":
            features = features @ self.image_projection
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: Tensor, normalize: bool = False) -> Tensor:
        """tokens (B, L <= context_length) integer ids -> (B, embed_dim) text embeddings: the
        causal transformer's feature at each row's largest id (the end-of-text token)
        after ln_final, times text_projection (unit length with ``normalize``)."""
        self._check_tokens(tokens)
        x = self.token_embedding(tokens)
        x = x + self.positional_embedding[: tokens.shape[1]].to(x.dtype)
        x = self.ln_final(self.transformer(x, causal=True))
        features = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        features = features @ self.text_projection
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, images: Tensor, tokens: Tensor, normalize: bool = False):
        """Returns (image features (B, E), text features (B', E), logit_scale.exp() 0-dim),
        the features unnormalised unless ``normalize`` (as the DiffCLIP release)."""
        return (self.encode_image(images, normalize), self.encode_text(tokens, normalize),
                self.logit_scale.exp())
