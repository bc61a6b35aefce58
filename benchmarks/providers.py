"""What benchmarks/throughput.py runs: the providers of differential attention, at op, layer and
model level, each ready to time.

Providers (issue 5):
    diffattn     the fused Triton kernels: ``diff_attention(..., backend="triton")``, the
                 DiffMultiheadAttention module with backend "triton", DiffCLIP with it.
    sdpa_x2      two ``F.scaled_dot_product_attention`` calls and the subtraction: backend
                 "torch" (the layer adds its RMSNorm as separate ops), as timm and Microsoft's
                 flashdiff compose it.
    naive        explicit matmul and softmax, materialising both N x M maps, as the DiffCLIP
                 release computes it: scores in the input dtype, softmax in fp32 cast back,
                 A1 - lambda * A2, then (A V); at layer level an fp32 RMSNorm; memory O(N^2).
    sdpa_plain   plain attention of the same width, the cost of not being differential: 2H heads
                 of d in one SDPA call at op level, ``nn.MultiheadAttention(E, 2H)`` at layer
                 level, plain CLIP (open_clip's ViT-B-16) at model level.

A problem is a :class:`Shape`: ``heads`` counts differential heads (2 * heads softmax maps of
width ``head_dim``, value width 2 * head_dim); self-attention, so seq_k == seq_len.

Every builder returns a :class:`Bench`: for each mode a factory that prepares and returns the
callable to time, plus the leaf tensors whose ``.grad`` is reset between timed calls.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from diffattn import DiffMultiheadAttention, diff_attention

PROVIDERS = ("diffattn", "sdpa_x2", "naive", "sdpa_plain")
# The fused kernels run through the Triton interpreter on CPU: correct, but its timings say
# nothing about the kernels' speed, so they carry their own provider name.
INTERPRETER_PROVIDER = "diffattn_interpreter"
OP_MODES = ("fwd", "bwd", "fwd_bwd")
MODEL_MODES = ("infer_image", "infer_text", "train_step")
LAMBDA = 0.8  # a typical lambda (DiffCLIP's lambda_init); any value costs the same


class ProviderUnavailable(RuntimeError):
    """A provider cannot run this problem here (e.g. a model config that does not exist yet)."""


@dataclass(frozen=True)
class Shape:
    """One attention problem. ``heads`` = differential heads; seq_k == seq_len."""
    name: str
    batch: int
    seq_len: int
    heads: int
    head_dim: int
    causal: bool

    @property
    def width(self) -> int:
        """Model width E = 2 * heads * head_dim (nn.MultiheadAttention(E, 2 * heads))."""
        return 2 * self.heads * self.head_dim

    def label(self) -> str:
        causal = " causal" if self.causal else ""
        return (f"{self.name} B={self.batch} N={self.seq_len} H={self.heads} "
                f"d={self.head_dim}{causal}")


@dataclass
class Bench:
    """The timed work of one provider on one problem.

    makers: mode -> a factory that does any preparation (e.g. the forward whose graph a
        ``bwd`` timing walks back through) and returns the callable to time.
    leaves: tensors whose ``.grad`` is set to None before every timed call.
    sdpa_backend: for the SDPA providers, a function naming the SDPA backend that runs.
    """
    makers: Dict[str, Callable[[], Callable[[], object]]]
    leaves: List[Tensor] = field(default_factory=list)
    sdpa_backend: Optional[Callable[[], str]] = None


# ------------------------------------------------------------------------------ math
def naive_diff_attention(q: Tensor, k: Tensor, v: Tensor, lam: Tensor, causal: bool = False,
                         scale: Optional[float] = None) -> Tensor:
    """Differential attention the DiffCLIP release's way: both (N x M) maps in memory.

    q (B, N, 2H, d), k (B, M, 2Hk, d), v (B, M, Hk, 2d), lam (H,) or 0-dim -> (B, N, H, 2d).
    Scores in the input dtype, softmax in fp32 cast back, lambda in the maps' dtype. Causal
    masking is bottom-right aligned like diff_attention; unlike it, a query row that sees no key
    gives NaN (the release never has one).
    """
    B, N, H2, d = q.shape
    M, Hk = k.shape[1], v.shape[2]
    H = H2 // 2
    scale = d ** -0.5 if scale is None else scale
    qh = q.transpose(1, 2) * scale                       # (B, 2H, N, d)
    kh = k.transpose(1, 2)                               # (B, 2Hk, M, d)
    vh = v.transpose(1, 2)                               # (B, Hk, M, 2d)
    if Hk != H:  # grouped-query attention: group g serves H // Hk consecutive heads
        kh = kh.unflatten(1, (Hk, 2)).repeat_interleave(H // Hk, dim=1).flatten(1, 2)
        vh = vh.repeat_interleave(H // Hk, dim=1)
    scores = qh @ kh.transpose(-1, -2)                   # (B, 2H, N, M)
    if causal:
        hidden = torch.ones(N, M, dtype=torch.bool, device=q.device).triu(M - N + 1)
        scores = scores.masked_fill(hidden, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).type_as(scores)
    probs = probs.unflatten(1, (H, 2))                   # (B, H, 2, N, M)
    lam = lam.to(probs.dtype).reshape(-1, 1, 1).expand(H, 1, 1)
    diff = probs[:, :, 0] - lam * probs[:, :, 1]         # (B, H, N, M)
    return (diff @ vh).transpose(1, 2)                   # (B, N, H, 2d)


def plain_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False) -> Tensor:
    """One SDPA call over (B, N, heads, d) inputs -> (B, N, heads, d)."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                          v.transpose(1, 2), is_causal=causal).transpose(1, 2)


class NaiveDiffAttention(nn.Module):
    """A DiffMultiheadAttention layer computed the DiffCLIP release's way (explicit maps).

    Uses the wrapped layer's parameters (projections, lambda vectors, norm weight) and
    nn.MultiheadAttention's call contract, so it can replace the layer inside a model.
    """

    def __init__(self, layer: DiffMultiheadAttention):
        super().__init__()
        self.layer = layer

    def forward(self, query: Tensor, key: Optional[Tensor] = None,
                value: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = False, attn_mask: Optional[Tensor] = None,
                average_attn_weights: bool = True, is_causal: bool = False):
        m = self.layer
        if need_weights:
            raise NotImplementedError("NaiveDiffAttention is a benchmark provider: "
                                      "need_weights=True is not supported")
        key = query if key is None else key
        value = key if value is None else value
        if not m.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        B, N, _ = query.shape
        M = key.shape[1]
        d, H2, Hk2 = m.head_dim, m.num_heads, m.num_kv_heads
        H, Hk = H2 // 2, Hk2 // 2
        q = m.q_proj(query).view(B, N, H2, d).transpose(1, 2) * d ** -0.5
        k = m.k_proj(key).view(B, M, Hk2, d).transpose(1, 2)
        v = m.v_proj(value).view(B, M, Hk, 2 * d).transpose(1, 2)
        if Hk != H:
            k = k.unflatten(1, (Hk, 2)).repeat_interleave(H // Hk, dim=1).flatten(1, 2)
            v = v.repeat_interleave(H // Hk, dim=1)
        scores = q @ k.transpose(-1, -2)                 # (B, 2H, N, M)
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(N, M, dtype=torch.bool, device=q.device).triu(1)
        if attn_mask is not None:
            if attn_mask.dim() == 3:
                attn_mask = attn_mask.view(B, H2, N, M)
            if attn_mask.dtype == torch.bool:
                scores = scores.masked_fill(attn_mask, float("-inf"))
            else:
                scores = scores + attn_mask.to(scores.dtype)
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask.bool()[:, None, None, :],
                                        float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).type_as(scores)
        probs = probs.view(B, H, 2, N, M)
        lam = m.compute_lambda().to(probs.dtype)
        x = (probs[:, :, 0] - lam * probs[:, :, 1]) @ v  # (B, H, N, 2d)
        xf = x.float()
        x = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + m.diff_norm.eps)
             * m.diff_norm.weight.float()).type_as(x) * (1.0 - m.lambda_init)
        out = m.out_proj(x.transpose(1, 2).reshape(B, N, H2 * d))
        if not m.batch_first:
            out = out.transpose(0, 1)
        return out, None


def use_naive_attention(model: nn.Module) -> int:
    """Replace every DiffMultiheadAttention inside ``model`` by a NaiveDiffAttention on the same
    parameters; return how many were replaced."""
    targets = [(name, mod) for name, mod in model.named_modules()
               if isinstance(mod, DiffMultiheadAttention)]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, NaiveDiffAttention(mod))
    if not targets:
        raise ProviderUnavailable("the model has no DiffMultiheadAttention layer to replace")
    return len(targets)


# ------------------------------------------------------------------------------ SDPA backend
_SDPA_NAMES = {int(value): name for name, value in
               torch.nn.attention.SDPBackend.__members__.items()}


def sdpa_backend_name(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> str:
    """The SDPA backend PyTorch dispatches to for (B, heads, N, d) inputs: FLASH_ATTENTION,
    EFFICIENT_ATTENTION, CUDNN_ATTENTION or MATH (as torch._fused_sdp_choice reports it;
    where that private helper is missing, the first backend that accepts the call, probed in
    PyTorch's default priority order)."""
    choose = getattr(torch, "_fused_sdp_choice", None)
    if choose is not None:
        try:
            index = int(choose(q, k, v, None, 0.0, causal))
        except (RuntimeError, TypeError):
            pass
        else:
            return _SDPA_NAMES.get(index, f"backend #{index}")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH):
        try:
            with torch.no_grad(), sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        except RuntimeError:
            continue
        return f"{backend.name} (probed)"
    return "none found"


def _sdpa_x2_backend(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> Callable[[], str]:
    """Probe with the exact views diffattn's torch path hands to SDPA."""
    def probe() -> str:
        q1 = rearrange(q, "b n (h two) d -> two b h n d", two=2)[0]
        k1 = rearrange(k, "b m (g two) d -> two b g m d", two=2)[0]
        return sdpa_backend_name(q1, k1, rearrange(v, "b m g e -> b g m e"), causal)
    return probe


# ------------------------------------------------------------------------------ modes
def forward_modes(forward: Callable[[], Tensor], modes: Sequence[str]) -> Dict[str, Callable]:
    """Mode factories for a differentiable forward.

    fwd: the forward alone (autograd on, as in training). fwd_bwd: forward, then backward of a
    fixed random output gradient. bwd: the backward alone, walking back through one retained
    forward graph (``retain_graph=True``), timed directly rather than as fwd_bwd minus fwd.
    """
    grad: List[Tensor] = []

    def output_grad(out: Tensor) -> Tensor:
        if not grad:
            grad.append(torch.randn_like(out))
        return grad[0]

    def make_fwd():
        return forward

    def make_fwd_bwd():
        def step():
            out = forward()
            out.backward(output_grad(out))
        return step

    def make_bwd():
        out = forward()
        g = output_grad(out)
        return lambda: out.backward(g, retain_graph=True)

    makers = {"fwd": make_fwd, "bwd": make_bwd, "fwd_bwd": make_fwd_bwd}
    return {mode: makers[mode] for mode in modes}


def _randn(shape, dtype, device, requires_grad=True) -> Tensor:
    return torch.randn(shape, dtype=dtype, device=device).requires_grad_(requires_grad)


# ------------------------------------------------------------------------------ op level
def op_bench(provider: str, shape: Shape, dtype: torch.dtype, device: torch.device,
             modes: Sequence[str]) -> Bench:
    """The attention core alone on (B, N, heads, d) tensors, no norm, no projections."""
    B, N, H, d, causal = shape.batch, shape.seq_len, shape.heads, shape.head_dim, shape.causal
    if provider == "sdpa_plain":
        q, k, v = (_randn((B, N, 2 * H, d), dtype, device) for _ in range(3))
        probe = lambda: sdpa_backend_name(*(t.transpose(1, 2) for t in (q, k, v)), causal)
        return Bench(forward_modes(lambda: plain_attention(q, k, v, causal), modes),
                     [q, k, v], probe)
    q = _randn((B, N, 2 * H, d), dtype, device)
    k = _randn((B, N, 2 * H, d), dtype, device)
    v = _randn((B, N, H, 2 * d), dtype, device)
    lam = torch.full((H,), LAMBDA, device=device, requires_grad=True)
    leaves = [q, k, v, lam]
    if provider == "naive":
        return Bench(forward_modes(lambda: naive_diff_attention(q, k, v, lam, causal), modes),
                     leaves)
    if provider == "sdpa_x2":
        forward = lambda: diff_attention(q, k, v, lam, causal=causal, backend="torch")
        return Bench(forward_modes(forward, modes), leaves, _sdpa_x2_backend(q, k, v, causal))
    if provider in ("diffattn", INTERPRETER_PROVIDER):
        forward = lambda: diff_attention(q, k, v, lam, causal=causal, backend="triton")
        return Bench(forward_modes(forward, modes), leaves)
    raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")


# ------------------------------------------------------------------------------ layer level
def layer_bench(provider: str, shape: Shape, dtype: torch.dtype, device: torch.device,
                modes: Sequence[str]) -> Bench:
    """A whole attention layer on (B, N, E) input: projections, core, norm, output projection."""
    B, N, E, causal = shape.batch, shape.seq_len, shape.width, shape.causal
    factory = {"device": device, "dtype": dtype}
    x = _randn((B, N, E), dtype, device)
    if provider == "sdpa_plain":
        mha = nn.MultiheadAttention(E, 2 * shape.heads, batch_first=True, **factory)
        mask = torch.ones(N, N, dtype=torch.bool, device=device).triu(1) if causal else None
        forward = lambda: mha(x, x, x, need_weights=False, attn_mask=mask, is_causal=causal)[0]
        return Bench(forward_modes(forward, modes), [x, *mha.parameters()])
    backends = {"diffattn": "triton", INTERPRETER_PROVIDER: "triton", "sdpa_x2": "torch",
                "naive": "torch"}
    if provider not in backends:
        raise ValueError(f"unknown provider {provider!r}; expected one of {PROVIDERS}")
    layer = DiffMultiheadAttention(E, 2 * shape.heads, batch_first=True,
                                   backend=backends[provider], **factory)
    run = NaiveDiffAttention(layer) if provider == "naive" else layer
    forward = lambda: run(x, is_causal=causal)[0]
    return Bench(forward_modes(forward, modes), [x, *layer.parameters()])


# ------------------------------------------------------------------------------ model level
@dataclass(frozen=True)
class ModelNames:
    """The model configs compared at model level: the differential one and its plain twin."""
    diff: str
    plain: str


GPU_MODELS = ModelNames("DiffCLIP-ViT-B-16", "ViT-B-16")
CPU_MODELS = ModelNames("DiffCLIP-Tiny", "CLIP-Tiny")


def build_model(provider: str, create_model: Callable, names: ModelNames,
                device: torch.device) -> nn.Module:
    """The model a provider runs: DiffCLIP with the fused or torch backend, DiffCLIP with every
    attention layer computed naively, or plain CLIP. Parameters in fp32 (autocast does the
    rest)."""
    if provider == "sdpa_plain":
        return create_model(names.plain, device=device)
    backend = {"diffattn": "triton", "sdpa_x2": "torch", "naive": "torch"}.get(provider)
    if backend is None:
        raise ValueError(f"unknown model-level provider {provider!r}")
    model = create_model(names.diff, device=device, backend=backend)
    if provider == "naive":
        use_naive_attention(model)
    return model


def attention_geometry(model: nn.Module, tower: str) -> tuple:
    """(differential heads, head_dim) of the first attention layer of a CLIP tower ("vision" or
    "text"); a plain layer of 2H heads counts as H, so plain and differential models of one
    width agree."""
    layer = model.attention_layers(tower)[0]
    if isinstance(layer, NaiveDiffAttention):
        layer = layer.layer
    if isinstance(layer, DiffMultiheadAttention):
        return layer.num_heads // 2, layer.head_dim
    return layer.num_heads // 2, layer.embed_dim // layer.num_heads


def make_model_batch(model: nn.Module, batch: int, device: torch.device):
    """Random images and token ids for a diffattn.models CLIP, with the end-of-text token (the
    largest id, which CLIP's pooling picks) at a random position of each row."""
    vision, text = model.config.vision, model.config.text
    images = torch.randn(batch, 3, vision.image_size, vision.image_size, device=device)
    L, V = text.context_length, text.vocab_size
    tokens = torch.randint(1, V - 1, (batch, L), device=device)
    eot = torch.randint(1, L, (batch,), device=device)
    tokens[torch.arange(batch, device=device), eot] = V - 1
    return images, tokens


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
    """The symmetric contrastive (InfoNCE) loss of CLIP, in fp32."""
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    logits = logit_scale.float() * img @ txt.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def model_bench(model: nn.Module, batch: int, dtype: torch.dtype, device: torch.device,
                modes: Sequence[str]) -> Bench:
    """Inference of each tower (no_grad, eval mode) and a training step (train mode, forward of
    both towers, contrastive loss, backward; no optimizer step), all under autocast to
    ``dtype`` (no autocast for fp32)."""
    images, tokens = make_model_batch(model, batch, device)

    def autocast():
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    def infer(encode):
        def make():
            model.eval()

            def run():
                with torch.no_grad(), autocast():
                    return encode()
            return run
        return make

    def make_train():
        model.train()

        def step():
            with autocast():
                loss = clip_loss(*model(images, tokens))
            loss.backward()
        return step

    makers = {"infer_image": infer(lambda: model.encode_image(images)),
              "infer_text": infer(lambda: model.encode_text(tokens)),
              "train_step": make_train}
    return Bench({mode: makers[mode] for mode in modes}, list(model.parameters()))
