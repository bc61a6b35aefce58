"""The CPU level of benchmarks/throughput.py: the library's PyTorch path against plain
attention on the same CPU, as throughput ratios measured in one process.

    python benchmarks/throughput.py --levels cpu            # ViT-B-16 towers, decode steps
    python benchmarks/cpu_compare.py --threads 1,2 --rounds 5 --out benchmarks/out

Groups (each a baseline and the providers compared with it):
    image  DiffCLIP-ViT-B-16's image tower (``diffattn.models``: diffclip, and diffattn's own
           plain ViT-B-16: diffattn_plain) against open_clip's plain ViT-B-16
           (``open_clip.create_model("ViT-B-16")``) where open_clip imports, else against
           ``PlainCLIP``, a plain ViT-B-16 that computes what open_clip's VisionTransformer and
           TextTransformer compute (nn.MultiheadAttention batch first, need_weights=False, the
           text tower's additive causal mask, LayerNorm, GELU, class-token and argmax pooling;
           the row's baseline names which ran). Eval mode, no_grad, fp32, random weights;
           batch 8 images of 224 px.
    text   the same for the text towers: batch 64 texts of 77 tokens.
    decode one decoding step's attention, one query per sequence against a full cache
           (batch 1, 8 differential heads of d = 64, cache 128 and 1024, kv heads 8 and 2):
           the torch path of diff_attention_with_kvcache (kvcache) and of diff_attention with
           the one query (functional) against two SDPA calls on views of the same cache and
           one addcmul (sdpa_x2, the unfused V1 decode); V2 (kvcache_v2, functional_v2)
           against two SDPA calls, one per map, on the same grouped cache (sdpa_x2_v2) and
           against one SDPA call over the 2H heads (flash_v2, plain attention's decode).

Method: per thread count, ``rounds`` rounds (three times as many for the decode groups); each
round runs every member of a group once in turn (interleaved, after one untimed warm-up call each), each member's time being the
fastest of ``calls`` back-to-back calls; a member's result is its minimum over the rounds
(wall clock, ``time.perf_counter``). ratio = baseline time / member time: the member's
throughput relative to the baseline (>= 1: as fast or faster). Peak memory, after all
timings, one thread: glibc is told to map each allocation of 64 KiB or more on its own and
to unmap it when freed (mallopt M_MMAP_THRESHOLD), so that the resident set follows the live
tensors; then per member, after one untimed call, the rise of the process's peak resident
set (``VmHWM`` in /proc/self/status, reset through /proc/self/clear_refs) during one call
over the resident set before it, in MiB; NaN where glibc or /proc do not offer this.

Outputs under --out: cpu_compare.csv (one row per member and thread count, columns
``CPU_COLUMNS``) and cpu_compare.md (the tables, the machine, threads and library versions).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import re
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from providers import LAMBDA, flash_v2_attention, sdpa_x2_attention  # noqa: E402

CPU_COLUMNS = ("group", "case", "member", "baseline", "threads", "ms", "ratio",
               "peak_mem_mib", "baseline_peak_mem_mib")
CSV_NAME, MD_NAME = "cpu_compare.csv", "cpu_compare.md"


# ------------------------------------------------------------------------------ plain CLIP
class _PlainBlock(nn.Module):
    """open_clip's ResidualAttentionBlock: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)),
                                              ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


@dataclass(frozen=True)
class PlainSize:
    """A plain CLIP's size (defaults: ViT-B-16)."""
    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    context_length: int = 77
    vocab_size: int = 49408
    embed_dim: int = 512


class PlainCLIP(nn.Module):
    """open_clip's plain CLIP towers (VisionTransformer, TextTransformer) as they compute:
    encode_image (B, 3, S, S) -> (B, embed_dim), encode_text (B, L) -> (B, embed_dim)."""

    def __init__(self, size: PlainSize = PlainSize()):
        super().__init__()
        grid = size.image_size // size.patch_size
        w, tw = size.vision_width, size.text_width
        self.conv1 = nn.Conv2d(3, w, size.patch_size, stride=size.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(w) * w ** -0.5)
        self.positional_embedding_visual = nn.Parameter(torch.randn(grid ** 2 + 1, w) * 0.02)
        self.ln_pre, self.ln_post = nn.LayerNorm(w), nn.LayerNorm(w)
        self.visual_blocks = nn.ModuleList(_PlainBlock(w, size.vision_heads)
                                           for _ in range(size.vision_layers))
        self.proj = nn.Parameter(torch.randn(w, size.embed_dim) * w ** -0.5)
        self.token_embedding = nn.Embedding(size.vocab_size, tw)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.positional_embedding = nn.Parameter(torch.randn(size.context_length, tw) * 0.01)
        self.text_blocks = nn.ModuleList(_PlainBlock(tw, size.text_heads)
                                         for _ in range(size.text_layers))
        self.ln_final = nn.LayerNorm(tw)
        self.text_projection = nn.Parameter(torch.randn(tw, size.embed_dim) * tw ** -0.5)
        mask = torch.empty(size.context_length, size.context_length).fill_(float("-inf"))
        self.register_buffer("attn_mask", mask.triu_(1), persistent=False)

    def encode_image(self, images: Tensor) -> Tensor:
        x = self.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding_visual.to(x.dtype)
        x = self.ln_pre(x)
        for block in self.visual_blocks:
            x = block(x)
        x = self.ln_post(x)
        return x[:, 0] @ self.proj

    def encode_text(self, text: Tensor) -> Tensor:
        seq = text.shape[1]
        x = self.token_embedding(text) + self.positional_embedding[:seq]
        mask = self.attn_mask[:seq, :seq].to(x.dtype)
        for block in self.text_blocks:
            x = block(x, attn_mask=mask)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0]), text.argmax(dim=-1)]
        return x @ self.text_projection


def plain_baseline(size: PlainSize, use_open_clip: bool = True):
    """(name, model with encode_image / encode_text): open_clip's ViT-B-16 where it imports
    (and ``size`` is ViT-B-16's), else PlainCLIP."""
    if use_open_clip and size == PlainSize():
        try:
            import open_clip
        except Exception:  # open_clip missing, or missing what it imports (torchvision)
            pass
        else:
            model = open_clip.create_model("ViT-B-16", pretrained=None)
            return f"open_clip {open_clip.__version__}", model.eval()
    return "PlainCLIP (open_clip's computation)", PlainCLIP(size).eval()


# ------------------------------------------------------------------------------ groups
@dataclass
class Group:
    """A baseline and the members compared with it, on one problem."""
    name: str
    case: str
    baseline: str
    members: Dict[str, Callable[[], object]]   # baseline first


def tower_groups(tiny: bool, use_open_clip: bool = True) -> List[Group]:
    """The image and text tower groups: ViT-B-16 at image batch 8 and text batch 64, or
    (tiny) DiffCLIP-Tiny against a plain CLIP of CLIP-Tiny's size at batch 2."""
    from diffattn.models import create_model, get_config
    torch.manual_seed(0)
    if tiny:
        diff_name, plain_name = "DiffCLIP-Tiny", "CLIP-Tiny"
        config = get_config(plain_name)
        v, t = config.vision, config.text
        size = PlainSize(v.image_size, v.patch_size, v.width, v.layers, v.heads, t.width,
                         t.layers, t.heads, t.context_length, t.vocab_size, config.embed_dim)
        image_batch = text_batch = 2
    else:
        diff_name, plain_name, size = "DiffCLIP-ViT-B-16", "ViT-B-16", PlainSize()
        image_batch, text_batch = 8, 64
    base_name, base = plain_baseline(size, use_open_clip)
    diff = create_model(diff_name, backend="torch").eval()
    plain = create_model(plain_name).eval()
    images = torch.randn(image_batch, 3, size.image_size, size.image_size)
    tokens = torch.randint(1, size.vocab_size - 1, (text_batch, size.context_length))
    tokens[:, -1] = size.vocab_size - 1  # the end-of-text token: the largest id
    groups = []
    models = [(base_name, base), (diff_name.lower(), diff),
              (f"diffattn {plain_name} (plain)", plain)]
    if not base_name.startswith("PlainCLIP"):  # open_clip itself: PlainCLIP measured beside
        models.append(("PlainCLIP (open_clip's computation)", PlainCLIP(size).eval()))
    for tower, batch, inputs in (("image", image_batch, images), ("text", text_batch, tokens)):
        encode = "encode_image" if tower == "image" else "encode_text"
        members = OrderedDict()
        for name, model in models:
            members[name] = (lambda fn=getattr(model, encode), x=inputs: fn(x))
        groups.append(Group(tower, f"{diff_name} {tower} tower, batch {batch}", base_name,
                            members))
    return groups


def decode_groups(caches: Sequence[int], heads: int = 8, head_dim: int = 64,
                  kv_heads: Sequence[int] = (8, 2)) -> List[Group]:
    """One decoding step's attention (batch 1, one query) per cache length and kv heads."""
    g = torch.Generator().manual_seed(0)
    return [group for M in caches for Hk in kv_heads
            for group in _decode_case(M, heads, Hk, head_dim, g)]


def _decode_case(M: int, H: int, Hk: int, d: int, g: torch.Generator) -> List[Group]:
    from diffattn import (diff_attention, diff_attention_v2, diff_attention_v2_with_kvcache,
                          diff_attention_with_kvcache)
    rnd = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    q = rnd(1, 1, 2 * H, d)
    k1, v1 = rnd(1, M, 2 * Hk, d), rnd(1, M, Hk, 2 * d)
    k2, v2 = rnd(1, M, Hk, d), rnd(1, M, Hk, d)
    lam1, lam2 = torch.full((H,), LAMBDA), torch.rand(1, 1, H, generator=g)
    lengths = torch.full((1,), M, dtype=torch.int32)
    case = f"cache {M}, {H} heads, {Hk} kv heads, d {d}"

    def sdpa_x2_v2():
        qh, kh, vh = q.transpose(1, 2), k2.transpose(1, 2), v2.transpose(1, 2)
        o1 = F.scaled_dot_product_attention(qh[:, 0::2], kh, vh, enable_gqa=Hk != H)
        o2 = F.scaled_dot_product_attention(qh[:, 1::2], kh, vh, enable_gqa=Hk != H)
        return torch.addcmul(o1, lam2.transpose(1, 2)[..., None], o2, value=-1.0)

    v2_members = OrderedDict([
        ("kvcache_v2", lambda: diff_attention_v2_with_kvcache(
            q, k2, v2, cache_seqlens=lengths, lambda_=lam2, backend="torch")),
        ("functional_v2", lambda: diff_attention_v2(q, k2, v2, lambda_=lam2, backend="torch"))])
    return [Group("decode V1", case, "sdpa_x2", OrderedDict([
                ("sdpa_x2", lambda: sdpa_x2_attention(q, k1, v1, lam1)),
                ("kvcache", lambda: diff_attention_with_kvcache(
                    q, k1, v1, cache_seqlens=lengths, lambda_=lam1, backend="torch")),
                ("functional", lambda: diff_attention(q, k1, v1, lambda_=lam1, backend="torch"))])),
            Group("decode V2", case, "sdpa_x2_v2",
                  OrderedDict([("sdpa_x2_v2", sdpa_x2_v2), *v2_members.items()])),
            Group("decode V2", case, "flash_v2",
                  OrderedDict([("flash_v2", lambda: flash_v2_attention(q, k2, v2, lam2)),
                               *v2_members.items()]))]


# ------------------------------------------------------------------------------ measuring
def _proc_kib(field: str) -> Optional[int]:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"{field}:\s+(\d+)", text)
    return int(found.group(1)) if found else None


def peak_mem_mib(fn: Callable[[], object]) -> float:
    """The rise of the peak resident set during one call of fn, in MiB (NaN without /proc)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return math.nan
    before = _proc_kib("VmRSS")
    fn()
    peak = _proc_kib("VmHWM")
    return math.nan if before is None or peak is None else max(peak - before, 0) / 1024


def measure(group: Group, threads: int, rounds: int, calls: int) -> List[dict]:
    """Rows for the group's members at ``threads``: interleaved rounds, minimum per member."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            for fn in group.members.values():
                fn()
            best = {name: math.inf for name in group.members}
            for _ in range(rounds):
                for name, fn in group.members.items():
                    start = time.perf_counter()
                    for _ in range(calls):
                        fn()
                    best[name] = min(best[name], (time.perf_counter() - start) / calls)
    finally:
        torch.set_num_threads(previous)
    base = best[group.baseline]
    return [{"group": group.name, "case": group.case, "member": name,
             "baseline": group.baseline, "threads": threads, "ms": t * 1e3,
             "ratio": base / t, "peak_mem_mib": math.nan, "baseline_peak_mem_mib": math.nan}
            for name, t in best.items()]


def return_freed_memory() -> bool:
    """Make glibc map every allocation of 64 KiB or more on its own and unmap it when freed,
    so that the resident set follows the live tensors (for peak_mem_mib). Slows later
    allocations: call it after the timings. False where glibc's mallopt is not there."""
    try:
        import ctypes
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def peaks(group: Group) -> Dict[str, float]:
    """peak_mem_mib of each member (one thread, no_grad, after one untimed call)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for fn in group.members.values():
                fn()
            return {name: peak_mem_mib(fn) for name, fn in group.members.items()}
    finally:
        torch.set_num_threads(previous)


def environment() -> Dict[str, str]:
    try:
        import open_clip
        open_clip_version = open_clip.__version__
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        open_clip_version = f"not importable ({type(exc).__name__}: {exc})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": str(os.cpu_count()), "python": platform.python_version(),
            "torch": torch.__version__, "open_clip": open_clip_version,
            "load average": " ".join(f"{x:.2f}" for x in os.getloadavg())
            if hasattr(os, "getloadavg") else "unknown"}


def markdown(rows: Sequence[dict], env: Dict[str, str], rounds: int) -> str:
    lines = ["# CPU comparison: the PyTorch path against plain attention", "",
             "| " + " | ".join(env) + " |", "|" + "---|" * len(env),
             "| " + " | ".join(env.values()) + " |", "",
             f"Interleaved rounds ({rounds}) in one process, minimum per member; ratio = "
             f"baseline time / member time (>= 1: as fast as the baseline or faster). Peak "
             f"memory: rise of the process's peak resident set during one call (MiB), "
             f"with freed allocations of 64 KiB or more returned at once (after the "
             f"timings, one thread).", "",
             "| group | case | threads | member | baseline | ms | ratio | peak MiB | "
             "baseline peak MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["member"] == r["baseline"]:
            continue
        lines.append(f"| {r['group']} | {r['case']} | {r['threads']} | {r['member']} | "
                     f"{r['baseline']} | {r['ms']:.4g} | {r['ratio']:.3f} | "
                     f"{r['peak_mem_mib']:.1f} | {r['baseline_peak_mem_mib']:.1f} |")
    return "\n".join(lines)


def run(out: Path, threads: Sequence[int] = (1, 2), rounds: int = 5, tiny: bool = False,
        groups: Sequence[str] = ("image", "text", "decode"),
        use_open_clip: bool = True) -> List[dict]:
    """Measure, write cpu_compare.csv and cpu_compare.md under ``out``, return the rows."""
    plan: List[tuple] = []  # (group, calls)
    if "image" in groups or "text" in groups:
        plan += [(g, 1) for g in tower_groups(tiny, use_open_clip) if g.name in groups]
    if "decode" in groups:
        caches = (64,) if tiny else (128, 1024)
        kv = (2, 1) if tiny else (8, 2)
        plan += [(g, 20 if tiny else 50) for g in decode_groups(
            caches, heads=2 if tiny else 8, head_dim=16 if tiny else 64, kv_heads=kv)]
    rows: List[dict] = []
    for n in threads:
        for group, calls in plan:
            rows += measure(group, n, rounds * (3 if group.name.startswith("decode") else 1),
                            calls)
            print(f"cpu {group.name} {group.case} threads {n}: " + ", ".join(
                f"{r['member']} {r['ms']:.3g} ms ({r['ratio']:.3f})" for r in rows[-len(
                    group.members):]), flush=True)
    if not tiny and return_freed_memory():  # not in a smoke run: it outlives the call
        for group, _ in plan:
            found = peaks(group)
            for r in rows:
                if (r["group"], r["case"], r["baseline"]) == (group.name, group.case,
                                                              group.baseline):
                    r["peak_mem_mib"] = found[r["member"]]
                    r["baseline_peak_mem_mib"] = found[group.baseline]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / CSV_NAME, "w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=CPU_COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v)
                             for k, v in r.items()})
    (out / MD_NAME).write_text(markdown(rows, environment(), rounds) + "\n")
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    parser.add_argument("--threads", default="1,2", help="comma list of thread counts")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--groups", default="image,text,decode")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke run)")
    args = parser.parse_args(argv)
    run(args.out, [int(x) for x in args.threads.split(",")], args.rounds, args.tiny,
        args.groups.split(","))
    return 0


if __name__ == "__main__":
    sys.exit(main())
