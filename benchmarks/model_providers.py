"""What benchmarks/throughput.py runs at model level: whole training and inference steps of
one tower, eager or through ``torch.compile``.

Modes (each may carry a suffix, see :data:`COMPILE_SUFFIXES`):
    train_image   image tower forward under autocast, a cross-entropy loss on its output
                  (random labels over the output width), backward, one AdamW step (fused
                  where the installed torch has it, else foreach) over the tower's parameters,
                  gradients set to None.
    train_text    the same for the text tower (causal, tokens of ``seq_len`` columns whose
                  end-of-text token, the largest id, sits at a random position of each row).
    infer_text    the text tower's forward under ``torch.no_grad`` in eval mode.
    suffix ``_compiled``: the tower's forward through ``torch.compile`` (default mode);
    ``_compiled_cudagraphs``: ``torch.compile(mode="reduce-overhead")`` (CUDA graphs). The
    loss, backward and optimizer step stay eager. The first step (compilation included) is
    timed apart and reported, not counted in the step times.

Providers:
    diffattn         DiffCLIP (``diffattn.models``), attention on the fused kernels.
    torch_path       the same DiffCLIP on the library's PyTorch path (backend "torch").
    sdpa_plain       plain CLIP of the same size (nn.MultiheadAttention, SDPA).
    timm             timm's ViT (``timm.create_model``), plain attention.      (image only)
    timm_diff        timm's ViT with ``attn_layer='diff'`` (two SDPA calls).  (image only)
    timm_diff_fused  timm's ViT with ``diffattn.integrations.timm.FusedDiffAttention``.
                     (image only; skipped with the reason when that module or timm is
                     missing)

Model sizes per device are a :class:`ModelSpec`: ViT-B/16 towers at batch 128 (image) and 256
(text) on a GPU, tiny ones on CPU.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from providers import NaiveDiffAttention, ProviderUnavailable, UnfusedDiffLayer

MODEL_MODES = ("train_image", "train_text", "infer_text")
COMPILE_SUFFIXES = {"": None, "_compiled": "default", "_compiled_cudagraphs": "reduce-overhead"}
CLIP_PROVIDERS = ("diffattn", "torch_path", "sdpa_plain")
TIMM_PROVIDERS = ("timm", "timm_diff", "timm_diff_fused")
MODEL_PROVIDERS = CLIP_PROVIDERS + TIMM_PROVIDERS
TEXT_PROVIDERS = CLIP_PROVIDERS
LEARNING_RATE = 1e-5


@dataclass(frozen=True)
class ModelSpec:
    """The models and batches of the model level on one kind of device."""
    diff: str                 # DiffCLIP config (diffattn.models)
    plain: str                # plain CLIP config of the same size
    timm: str                 # timm model name
    timm_kwargs: tuple        # ((key, value), ...) passed to timm.create_model
    image_batch: int
    text_batch: int
    text_lengths: Tuple[int, ...]


GPU_SPEC = ModelSpec("DiffCLIP-ViT-B-16", "ViT-B-16", "vit_base_patch16_224", (), 128, 256,
                     (77, 20))
# CPU: the tiny configs, and a timm ViT of CLIP-Tiny's image tower (width 64, 2 layers,
# 4 heads, patch 8, 32 px).
CPU_SPEC = ModelSpec("DiffCLIP-Tiny", "CLIP-Tiny", "vit_base_patch16_224",
                     (("img_size", 32), ("patch_size", 8), ("embed_dim", 64), ("depth", 2),
                      ("num_heads", 4)), 4, 8, (77, 20))


def base_mode(mode: str) -> Tuple[str, Optional[str]]:
    """("train_image" | "train_text" | "infer_text", compile mode or None) of a mode name."""
    for suffix, compile_mode in sorted(COMPILE_SUFFIXES.items(), key=lambda kv: -len(kv[0])):
        base = mode[: len(mode) - len(suffix)] if suffix else mode
        if mode.endswith(suffix) and base in MODEL_MODES:
            return base, compile_mode
    raise ValueError(f"unknown model mode {mode!r}; expected one of {MODEL_MODES}, each "
                     f"optionally with a suffix of {tuple(s for s in COMPILE_SUFFIXES if s)}")


@dataclass
class ModelStep:
    """One model-level measurement ready to run.

    step: one training or inference step. geometry: (batch, seq_len, heads, head_dim,
    causal) of the tower's attention, heads counted as differential heads (a plain layer of
    2H heads counts H). notes: what ran (optimizer kind, compile mode).
    """
    step: Callable[[], None]
    geometry: tuple
    notes: List[str] = field(default_factory=list)


# ------------------------------------------------------------------------------ models
def build_clip(provider: str, spec: ModelSpec, device: torch.device, create_model: Callable):
    """The CLIP model of a provider, fp32 parameters (autocast does the rest)."""
    if provider == "sdpa_plain":
        return create_model(spec.plain, device=device)
    backend = {"diffattn": "triton", "torch_path": "torch"}.get(provider)
    if backend is None:
        raise ValueError(f"unknown CLIP provider {provider!r}; expected one of {CLIP_PROVIDERS}")
    return create_model(spec.diff, device=device, backend=backend)


def build_timm(provider: str, spec: ModelSpec, device: torch.device) -> nn.Module:
    """timm's ViT for a timm provider; ProviderUnavailable when timm, its differential
    attention or diffattn's timm integration is missing."""
    try:
        import timm
    except Exception as exc:  # ImportError, or a broken torchvision under it
        raise ProviderUnavailable(f"timm cannot be imported ({type(exc).__name__}: {exc})")
    kwargs = dict(spec.timm_kwargs)
    if provider == "timm_diff":
        kwargs["attn_layer"] = "diff"
    elif provider == "timm_diff_fused":
        try:
            from diffattn.integrations.timm import FusedDiffAttention
        except ImportError as exc:
            raise ProviderUnavailable(f"diffattn.integrations.timm.FusedDiffAttention is not "
                                      f"available in this diffattn ({exc})")
        kwargs["attn_layer"] = FusedDiffAttention
    elif provider != "timm":
        raise ValueError(f"unknown timm provider {provider!r}; expected one of {TIMM_PROVIDERS}")
    try:
        model = timm.create_model(spec.timm, pretrained=False, **kwargs)
    except (TypeError, AssertionError, KeyError, ValueError, RuntimeError) as exc:
        raise ProviderUnavailable(f"timm {timm.__version__} cannot build {spec.timm} with "
                                  f"{kwargs}: {type(exc).__name__}: {exc}")
    return model.to(device)


def clip_attention_geometry(model: nn.Module, tower: str) -> tuple:
    """(differential heads, head_dim) of the first attention layer of a CLIP tower ("vision" or
    "text"); a plain layer of 2H heads counts as H."""
    from diffattn import DiffMultiheadAttention
    layer = model.attention_layers(tower)[0]
    if isinstance(layer, (NaiveDiffAttention, UnfusedDiffLayer)):
        layer = layer.layer
    if isinstance(layer, DiffMultiheadAttention):
        return layer.num_heads // 2, layer.head_dim
    return layer.num_heads // 2, layer.embed_dim // layer.num_heads


def timm_attention_geometry(model: nn.Module) -> tuple:
    """(differential heads, head_dim) of a timm ViT's first block: timm's DiffAttention has
    num_heads differential heads of two maps each of width head_dim; a plain Attention of 2H
    heads counts as H."""
    attn = model.blocks[0].attn
    heads, head_dim = attn.num_heads, attn.head_dim
    is_diff = hasattr(attn, "sub_norm") and hasattr(attn, "lambda_init")
    return (heads, head_dim) if is_diff else (heads // 2, head_dim)


def clip_tower_parameters(model: nn.Module, tower: str) -> List[nn.Parameter]:
    """The parameters a CLIP tower's features depend on: "vision" = the visual module (and
    the image projection where it lies outside it); "text" = everything else but logit_scale."""
    vision = {id(p) for p in model.visual.parameters()}
    if isinstance(getattr(model, "image_projection", None), nn.Parameter):
        vision.add(id(model.image_projection))
    if tower == "vision":
        return [p for p in model.parameters() if id(p) in vision]
    return [p for name, p in model.named_parameters()
            if id(p) not in vision and name != "logit_scale"]


def text_tokens(batch: int, seq_len: int, vocab_size: int, device: torch.device) -> Tensor:
    """(batch, seq_len) random token ids with the end-of-text token (the largest id, which
    CLIP's pooling picks) at a random position of each row."""
    tokens = torch.randint(1, vocab_size - 1, (batch, seq_len), device=device)
    eot = torch.randint(0, seq_len, (batch,), device=device)
    tokens[torch.arange(batch, device=device), eot] = vocab_size - 1
    return tokens


# ------------------------------------------------------------------------------ steps
def make_optimizer(params: Sequence[nn.Parameter]) -> Tuple[torch.optim.Optimizer, str]:
    """(AdamW over ``params``, "fused" or "foreach"): fused where the installed torch supports
    it for these parameters, else the multi-tensor (foreach) implementation."""
    try:
        return torch.optim.AdamW(params, lr=LEARNING_RATE, fused=True), "fused"
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, lr=LEARNING_RATE, foreach=True), "foreach"


def compiled(forward: Callable, compile_mode: Optional[str], backend: str) -> Callable:
    """``forward`` itself, or through torch.compile (static shapes) in ``compile_mode``
    ("default" or "reduce-overhead") with ``backend`` ("inductor" on a GPU run)."""
    if compile_mode is None:
        return forward
    mode = None if compile_mode == "default" else compile_mode
    return torch.compile(forward, mode=mode, backend=backend, dynamic=False)


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def make_step(forward: Callable[[Tensor], Tensor], inputs: Tensor, params, train: bool,
              device: torch.device, dtype: torch.dtype, cudagraphs: bool) -> Tuple[Callable, str]:
    """(one step, optimizer kind or "no optimizer"). Training: forward under autocast, the
    cross-entropy of the output against fixed random labels over its width, backward, AdamW
    step, gradients to None. Inference: forward under no_grad and autocast."""
    mark_step = getattr(torch.compiler, "cudagraph_mark_step_begin", None) if cudagraphs else None
    if not train:
        def infer():
            if mark_step is not None:
                mark_step()
            with torch.no_grad(), _autocast(device, dtype):
                forward(inputs)
        return infer, "no optimizer"
    optimizer, kind = make_optimizer(list(params))
    labels: List[Tensor] = []

    def train_step():
        if mark_step is not None:
            mark_step()
        with _autocast(device, dtype):
            out = forward(inputs)
        if not labels:
            labels.append(torch.randint(0, out.shape[-1], (out.shape[0],), device=device))
        F.cross_entropy(out.float(), labels[0]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return train_step, f"AdamW ({kind})"


def model_step(provider: str, mode: str, seq_len: int, spec: ModelSpec, dtype: torch.dtype,
               device: torch.device, create_model: Optional[Callable],
               compile_backend: str = "inductor",
               model: Optional[nn.Module] = None) -> Tuple[ModelStep, nn.Module]:
    """(the ModelStep of ``provider`` in ``mode`` at ``seq_len`` text columns, the model).

    ``model``: a model this provider built before, reused (CLIP towers share one model
    across modes). Raises ProviderUnavailable when the provider cannot run here.
    """
    base, compile_mode = base_mode(mode)
    tower = "vision" if base == "train_image" else "text"
    if tower == "text" and provider not in TEXT_PROVIDERS:
        raise ValueError(f"{provider!r} has no text tower; text modes run {TEXT_PROVIDERS}")
    if compile_mode == "reduce-overhead" and device.type != "cuda":
        raise ProviderUnavailable("CUDA graphs need a CUDA device")
    train = base.startswith("train")
    if provider in TIMM_PROVIDERS:
        model = model if model is not None else build_timm(provider, spec, device)
        size = model.patch_embed.img_size[0]
        batch = spec.image_batch
        inputs = torch.randn(batch, 3, size, size, device=device)
        forward: Callable = model
        heads, head_dim = timm_attention_geometry(model)
        seq = model.patch_embed.num_patches + getattr(model, "num_prefix_tokens", 1)
        geometry = (batch, seq, heads, head_dim, False)
        params = list(model.parameters())
    else:
        if model is None:
            if create_model is None:
                raise ProviderUnavailable("diffattn.models cannot be imported")
            model = build_clip(provider, spec, device, create_model)
        heads, head_dim = clip_attention_geometry(model, tower)
        if tower == "vision":
            vision = model.config.vision
            batch = spec.image_batch
            inputs = torch.randn(batch, 3, vision.image_size, vision.image_size, device=device)
            forward = model.encode_image
            geometry = (batch, 1 + vision.grid_size ** 2, heads, head_dim, False)
        else:
            text = model.config.text
            if not 1 <= seq_len <= text.context_length:
                raise ValueError(f"seq_len must be in [1, {text.context_length}] for "
                                 f"{spec.diff}'s text tower, got {seq_len}")
            batch = spec.text_batch
            inputs = text_tokens(batch, seq_len, text.vocab_size, device)
            forward = model.encode_text
            geometry = (batch, seq_len, heads, head_dim, True)
        params = clip_tower_parameters(model, tower)
    model.train(train)
    step, optimizer = make_step(compiled(forward, compile_mode, compile_backend), inputs,
                                params, train, device, dtype, compile_mode == "reduce-overhead")
    notes = [optimizer] + ([f"torch.compile mode={compile_mode}, backend={compile_backend}"]
                           if compile_mode else [])
    return ModelStep(step, geometry, notes), model
