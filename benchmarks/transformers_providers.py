"""What benchmarks/throughput.py runs at the transformers level: Hugging Face transformers'
DiffLlama (random weights, no download) generating greedily from one prompt, with its own
attention implementations against the same model fused by diffattn.integrations.transformers.

Providers (the same weights for all):
    hf_eager     transformers' eager implementation (attn_implementation="eager").
    hf_sdpa      transformers' SDPA implementation ("sdpa", its default).
    diffattn     fuse_diff_attention(model, backend="triton"): the fused kernels (prefill) and
                 the KV-cache kernel (each decoding step) through a DiffAttnCache (GPU).
    torch_path   fuse_diff_attention(model, backend="torch"): diffattn's PyTorch path.

Modes, per prompt of ``seq_len`` tokens (batch ``batch``):
    prefill      ms from the ``generate`` call to the first token's logits: the prompt's
                 forward, cache included.
    decode       ms per further token: the median, over DECODE_TOKENS steps, of the time
                 between two tokens' logits (a logits processor records when generate reaches
                 it), one step's forward and generate's own work per token.
Each round is one ``generate``; the rows' ms_p50 / p20 / p80 are over rounds.
``compare`` (and ``python benchmarks/transformers_providers.py``) runs the providers in
interleaved rounds in one process and reports each one's minimum and its ratio to hf_sdpa.

Models (``SPECS``): "tiny" (2 layers, hidden 64, 4 heads of 16, 2 key/value heads, vocab 128:
the tests' model), "small" (4 layers, hidden 512, 8 heads of 64, 4 key/value heads, vocab
8192), "1b" (16 layers, hidden 2048, 16 heads of 128, 8 key/value heads, vocab 32000; GPU).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch

from providers import ProviderUnavailable

TRANSFORMERS_PROVIDERS = ("hf_eager", "hf_sdpa", "diffattn", "torch_path")
TRANSFORMERS_FUSED = ("diffattn",)
TRANSFORMERS_MODES = ("prefill", "decode")
DECODE_TOKENS = 16


@dataclass(frozen=True)
class ModelSpec:
    name: str
    layers: int
    hidden: int
    heads: int          # transformers' num_attention_heads (softmax maps)
    kv_heads: int
    intermediate: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


SPECS = {"tiny": ModelSpec("tiny", 2, 64, 4, 2, 128, 128),
         "small": ModelSpec("small", 4, 512, 8, 4, 1408, 8192),
         "1b": ModelSpec("1b", 16, 2048, 16, 8, 5632, 32000)}


@dataclass(frozen=True)
class GenerateShape:
    """One measurement: a model spec, a prompt of ``seq_len`` tokens, ``batch`` prompts."""
    spec: str
    batch: int
    seq_len: int

    def label(self) -> str:
        return f"{self.spec} B={self.batch} prompt={self.seq_len}"


def transformers_shapes(on_cuda: bool, quick: bool) -> List[GenerateShape]:
    """GPU: the 1b model at prompts 128 and 1024 (and batch 8 without --quick); CPU: the tiny
    model at prompt 128 (quick), then the small one and prompt 1024."""
    if on_cuda:
        shapes = [GenerateShape("1b", 1, 128), GenerateShape("1b", 1, 1024)]
        return shapes if quick else shapes + [GenerateShape("1b", 8, 1024)]
    shapes = [GenerateShape("tiny", 1, 128)]
    return shapes if quick else shapes + [GenerateShape("tiny", 1, 1024),
                                          GenerateShape("small", 1, 128),
                                          GenerateShape("small", 1, 1024)]


def _transformers():
    try:
        import diffattn.integrations.transformers as integration  # imports transformers
        from transformers import DiffLlamaConfig, DiffLlamaForCausalLM
    except ImportError as exc:
        raise ProviderUnavailable(f"transformers cannot be imported ({exc}): pip install "
                          f"'diffattn[transformers]'") from None
    return integration, DiffLlamaConfig, DiffLlamaForCausalLM


def build_model(provider: str, spec: ModelSpec, dtype: torch.dtype, device: torch.device,
                seed: int = 0):
    """The spec's DiffLlamaForCausalLM with random weights (the same for every provider of a
    seed), eval mode, set up as ``provider`` says; no end-of-sequence token, so generate
    always makes the tokens asked for."""
    if provider not in TRANSFORMERS_PROVIDERS:
        raise ValueError(f"unknown transformers-level provider {provider!r}; expected one of "
                         f"{TRANSFORMERS_PROVIDERS}")
    integration, DiffLlamaConfig, DiffLlamaForCausalLM = _transformers()
    config = DiffLlamaConfig(vocab_size=spec.vocab, hidden_size=spec.hidden,
                             intermediate_size=spec.intermediate,
                             num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
                             num_key_value_heads=spec.kv_heads, max_position_embeddings=8192,
                             pad_token_id=0, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)
    with torch.device(device):  # random weights made where they are used
        model = DiffLlamaForCausalLM(config)
    model = model.eval().to(dtype=dtype)
    model.config._attn_implementation = "eager" if provider == "hf_eager" else "sdpa"
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    if provider in ("diffattn", "torch_path"):
        backend = "torch" if provider == "torch_path" else "triton"
        integration.fuse_diff_attention(model, backend=backend)
    return model


def prompt(batch: int, seq_len: int, vocab: int, device: torch.device) -> torch.Tensor:
    """Random token ids (batch, seq_len), the same for every provider."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(1, vocab, (batch, seq_len), generator=generator).to(device)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """A logits processor that only records when ``generate`` reaches it: once per generated
    token, right after that token's forward."""

    def __init__(self):
        self.times: List[float] = []

    def __call__(self, input_ids, scores):
        _synchronize(scores.device)
        self.times.append(time.perf_counter())
        return scores


def time_round(model, ids: torch.Tensor, tokens: int = None) -> tuple:
    """(prefill ms, decode ms per token, fastest step ms) of one greedy ``generate`` of
    1 + tokens tokens (tokens: DECODE_TOKENS by default): prefill from the call to the first
    token's logits, decode the median time between consecutive tokens' logits (one step
    each), and the shortest of those steps."""
    from transformers import LogitsProcessorList
    tokens = DECODE_TOKENS if tokens is None else tokens
    clock = StepClock()
    _synchronize(ids.device)
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1 + tokens,
                       min_new_tokens=1 + tokens, do_sample=False,
                       logits_processor=LogitsProcessorList([clock]))
    steps = [(b - a) * 1e3 for a, b in zip(clock.times, clock.times[1:])]
    return (clock.times[0] - start) * 1e3, float(torch.tensor(steps).median()), min(steps)


def compare(providers: Sequence[str], shape: GenerateShape, dtype: torch.dtype,
            device: torch.device, rounds: int) -> Dict[str, List[tuple]]:
    """Every provider's time_round per round, the providers interleaved within each round
    after one untimed warm-up round each."""
    spec = SPECS[shape.spec]
    models = {p: build_model(p, spec, dtype, device) for p in providers}
    ids = prompt(shape.batch, shape.seq_len, spec.vocab, device)
    for model in models.values():
        time_round(model, ids, tokens=2)
    times: Dict[str, List[tuple]] = {p: [] for p in providers}
    for _ in range(rounds):
        for p, model in models.items():
            times[p].append(time_round(model, ids))
    return times


def main(argv: Sequence[str] = None) -> int:
    parser = argparse.ArgumentParser(
        description="DiffLlama greedy decoding: interleaved rounds, minimum per provider "
                    "(of the rounds' prefill and median step, and the fastest step), ratio to "
                    "transformers' SDPA implementation")
    parser.add_argument("--specs", default="tiny,small")
    parser.add_argument("--prompts", default="128,1024")
    parser.add_argument("--providers", default="hf_sdpa,hf_eager,torch_path")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    providers = args.providers.split(",")
    if "hf_sdpa" not in providers:
        providers.insert(0, "hf_sdpa")
    print(f"device {device}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{args.rounds} interleaved rounds, minimum; decode = ms per token over "
          f"{DECODE_TOKENS} tokens")
    for spec in args.specs.split(","):
        for length in (int(n) for n in args.prompts.split(",")):
            shape = GenerateShape(spec, 1, length)
            times = compare(providers, shape, torch.float32, device, args.rounds)
            base = [min(t[i] for t in times["hf_sdpa"]) for i in (0, 1, 2)]
            for p in providers:
                best = [min(t[i] for t in times[p]) for i in (0, 1, 2)]
                print(f"{shape.label():28s} {p:10s} prefill {best[0]:9.2f} ms "
                      f"({best[0] / base[0]:.2f}x)  decode {best[1]:7.3f} ms/token "
                      f"({best[1] / base[1]:.2f}x), fastest step {best[2]:7.3f} ms "
                      f"({best[2] / base[2]:.2f}x)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
