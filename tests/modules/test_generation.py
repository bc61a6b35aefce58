"""Greedy generation with a KV cache equals recomputing the whole prefix every step.

A small causal language model (embedding, learned positions, blocks of pre-norm attention and
MLP, tied-free lm head, random weights) is built from DiffMultiheadAttention or
DiffMultiheadAttentionV2. With ``DiffKVCache`` each step feeds only the new token
(``layer(x, kv_cache=cache)``); without, each step runs the whole sequence with
``is_causal=True``. Tokens must agree and logits match within tolerance, for both layers and
both backends (the fused kernels through the Triton interpreter).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from diffattn import DiffKVCache, DiffMultiheadAttention, DiffMultiheadAttentionV2
from helpers import requires_interpreter


class Block(nn.Module):
    def __init__(self, dim, variant, backend, depth):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        if variant == "v1":
            self.attn = DiffMultiheadAttention(dim, 4, batch_first=True, num_kv_heads=2,
                                               lambda_init=0.2 + 0.1 * depth, backend=backend)
        else:
            self.attn = DiffMultiheadAttentionV2(dim, 2, batch_first=True, num_kv_heads=1,
                                                 backend=backend)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, cache=None):
        h = self.norm1(x)
        if cache is None:
            a, _ = self.attn(h, is_causal=True)
        else:
            a, _ = self.attn(h, kv_cache=cache)
        x = x + a
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, variant, backend, vocab=40, dim=64, layers=2, max_len=32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, variant, backend, i) for i in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens, caches=None):
        """Logits (B, N, vocab) of tokens (B, N); with caches, tokens continue the cached
        sequences (positions from the caches' lengths)."""
        start = 0 if caches is None else caches[0].seqlens.long()[:, None]
        pos = start + torch.arange(tokens.shape[1])
        x = self.embed(tokens) + self.pos(pos)
        for i, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[i])
        return self.head(x)


def generate(model, prompt, steps, cached):
    tokens, all_logits = prompt, []
    caches = ([DiffKVCache.empty(prompt.shape[0], 16, b.attn) for b in model.blocks]
              if cached else None)
    feed = prompt
    for _ in range(steps):
        logits = model(feed, caches)[:, -1] if cached else model(tokens)[:, -1]
        nxt = logits.argmax(-1, keepdim=True)
        all_logits.append(logits)
        tokens = torch.cat([tokens, nxt], 1)
        feed = nxt
    return tokens, torch.stack(all_logits, 1)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=requires_interpreter),
                                     "torch"])
@pytest.mark.parametrize("variant, dtype", [("v1", torch.float32), ("v2", torch.float32),
                                            ("v1", torch.float64), ("v2", torch.float64)])
def test_cached_generation_matches_recompute(variant, dtype, backend):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the interpreter is slow; float64 runs on the torch backend")
    torch.manual_seed(0)
    model = TinyLM(variant, backend).to(dtype).eval()
    prompt = torch.randint(0, 40, (2, 4))
    with torch.no_grad():
        want_tokens, want_logits = generate(model, prompt, 3, cached=False)
        got_tokens, got_logits = generate(model, prompt, 3, cached=True)
    assert torch.equal(got_tokens, want_tokens)
    tol = 1e-6 if dtype == torch.float64 else 2e-4  # V2 computes lambda in fp32
    torch.testing.assert_close(got_logits, want_logits, atol=tol, rtol=tol)
    assert model.blocks[0].attn.last_backend == backend


def test_cache_object_and_layer_errors():
    layer = DiffMultiheadAttention(64, 4, batch_first=True, num_kv_heads=2, backend="torch")
    cache = DiffKVCache.empty(3, 8, layer)
    assert cache.k_cache.shape == (3, 8, 2, 16) and cache.v_cache.shape == (3, 8, 1, 32)
    assert cache.seqlens.dtype == torch.int32 and cache.capacity == 8
    layer2 = DiffMultiheadAttentionV2(64, 2, batch_first=True, num_kv_heads=1, backend="torch")
    cache2 = DiffKVCache.empty(3, 8, layer2, dtype=torch.float64)
    assert cache2.k_cache.shape == (3, 8, 1, 32) and cache2.v_cache.dtype == torch.float64
    with torch.no_grad():
        layer(torch.randn(3, 5, 64), kv_cache=cache)
        assert cache.seqlens.tolist() == [5, 5, 5]
        with pytest.raises(ValueError, match="capacity"):
            layer(torch.randn(3, 4, 64), kv_cache=cache)
        with pytest.raises(ValueError, match="self-attention"):
            layer(torch.randn(3, 1, 64), torch.randn(3, 1, 64), kv_cache=cache)
        with pytest.raises(TypeError, match="dtype"):
            layer(torch.randn(3, 1, 64), kv_cache=DiffKVCache.empty(3, 8, layer,
                                                                   dtype=torch.float64))
        with pytest.raises(ValueError, match="k_cache"):
            layer(torch.randn(3, 1, 64), kv_cache=cache2)
        with pytest.raises(TypeError, match="DiffKVCache"):
            layer(torch.randn(3, 1, 64), kv_cache=(cache.k_cache, cache.v_cache))
    cache.reset()
    assert cache.seqlens.tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="capacity"):
        DiffKVCache.empty(3, 0, layer)
    with pytest.raises(TypeError, match="layer"):
        DiffKVCache.empty(3, 8, nn.Linear(2, 2))


@pytest.mark.parametrize("layer_cls, heads", [(DiffMultiheadAttention, 4),
                                              (DiffMultiheadAttentionV2, 2)])
def test_sequence_first_layer_decodes_like_batch_first(layer_cls, heads):
    """batch_first=False takes (N, B, E) with a cache and gives what the batch-first layer
    gives on the transposed input; the prompt step equals the layer's causal forward."""
    torch.manual_seed(0)
    first = layer_cls(64, heads, batch_first=True, backend="torch").double()
    second = layer_cls(64, heads, batch_first=False, backend="torch").double()
    second.load_state_dict(first.state_dict())
    x = torch.randn(2, 6, 64, dtype=torch.float64)
    c1, c2 = DiffKVCache.empty(2, 8, first), DiffKVCache.empty(2, 8, second)
    with torch.no_grad():
        y1, _ = first(x[:, :5], kv_cache=c1)
        y2, _ = second(x[:, :5].transpose(0, 1), kv_cache=c2)
        torch.testing.assert_close(y2.transpose(0, 1), y1)
        torch.testing.assert_close(y1, first(x[:, :5], is_causal=True)[0])
        z1, _ = first(x[:, 5:], kv_cache=c1)
        z2, _ = second(x[:, 5:].transpose(0, 1), kv_cache=c2)
        torch.testing.assert_close(z2.transpose(0, 1), z1)
        torch.testing.assert_close(z1, first(x, is_causal=True)[0][:, 5:])


@pytest.mark.parametrize("layer_cls", [DiffMultiheadAttention, DiffMultiheadAttentionV2])
def test_a_decoding_step_refuses_what_it_does_not_take(layer_cls):
    layer = layer_cls(16, 4, batch_first=True)
    cache = DiffKVCache.empty(1, 8, layer)
    x = torch.randn(1, 2, 16)
    with torch.no_grad():
        layer(x, x, x, kv_cache=cache)  # key and value may be the query itself
    for extra, name in ((dict(key_padding_mask=torch.zeros(1, 2, dtype=torch.bool)),
                         "key_padding_mask"), (dict(window_size=(4, 0)), "window_size"),
                        (dict(need_weights=True), "need_weights"),
                        (dict(key=torch.randn(1, 2, 16)), "key")):
        with pytest.raises(ValueError, match=f"got {name}"):
            layer(x, **extra, kv_cache=cache)
