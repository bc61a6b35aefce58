"""diffattn.integrations.transformers against transformers' own DiffLlama: a tiny random
DiffLlamaForCausalLM (no download), fused, compared with the unfused model in float32: prefill
logits, greedy generate (one prompt, a left-padded batch; with the DiffAttnCache generate makes
and with transformers' DynamicCache), one training step's gradients, unfuse and the state dict,
save_pretrained/from_pretrained. Skipped where transformers is not installed (it is an optional
extra)."""
import copy
import warnings

import pytest
import torch

pytest.importorskip("transformers")

from diffattn.integrations.transformers import (  # noqa: E402
    DiffAttnCache, FusedDiffLlamaAttention, fuse_diff_attention, unfuse_diff_attention)
from transformers import DiffLlamaConfig, DiffLlamaForCausalLM  # noqa: E402
from transformers.models.diffllama.modeling_diffllama import DiffLlamaAttention  # noqa: E402

from helpers import INTERPRET  # noqa: E402

IMPLEMENTATIONS = ["eager", "sdpa"]  # transformers' masks differ: additive float / bool or None


def _config(**overrides) -> DiffLlamaConfig:
    settings = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    lambda_std_dev=0.3, initializer_range=0.2, pad_token_id=0, eos_token_id=None,
                    bos_token_id=None)
    settings.update(overrides)
    return DiffLlamaConfig(**settings)


def _models(implementation="sdpa", backend="torch", seed=0, **overrides):
    """(transformers' model, the same weights fused), eval mode, float32."""
    torch.manual_seed(seed)
    reference = DiffLlamaForCausalLM(_config(**overrides)).eval()
    reference.config._attn_implementation = implementation
    fused = copy.deepcopy(reference)
    assert fuse_diff_attention(fused, backend=backend) == fused.config.num_hidden_layers
    return reference, fused


def _batch(batch=3, length=10, seed=1):
    """Random ids and a left-padded attention mask (row b has 2 * b padding tokens)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(batch):
        mask[b, :2 * b] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _attention_layers(model):
    return [m for m in model.modules() if isinstance(m, DiffLlamaAttention)]


# ------------------------------------------------------------------ fuse / unfuse
def test_fuse_counts_and_unfuse_restores_bitwise():
    torch.manual_seed(0)
    model = DiffLlamaForCausalLM(_config(num_hidden_layers=3))
    layers = _attention_layers(model)
    before = [dict(vars(m)) for m in layers]
    state = {k: v.clone() for k, v in model.state_dict().items()}

    assert fuse_diff_attention(model, backend="torch") == 3
    assert all(type(m) is FusedDiffLlamaAttention and m.backend == "torch" for m in layers)
    assert model.state_dict().keys() == state.keys()  # no new parameter or buffer
    with pytest.warns(UserWarning, match="3 are FusedDiffLlamaAttention"):
        assert fuse_diff_attention(model) == 0

    assert unfuse_diff_attention(model) == 3
    assert unfuse_diff_attention(model) == 0
    for m, attributes in zip(layers, before):
        assert type(m) is DiffLlamaAttention
        assert type(m).forward is DiffLlamaAttention.forward
        assert vars(m).keys() == attributes.keys()
        assert all(vars(m)[k] is v for k, v in attributes.items() if not isinstance(v, dict))
    assert "_prepare_cache_for_generation" not in vars(model)
    after = model.state_dict()
    assert after.keys() == state.keys()
    assert all(torch.equal(after[k], v) for k, v in state.items())


def test_fuse_refuses_bad_input():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fuse_diff_attention("model")
    torch.manual_seed(0)
    model = DiffLlamaForCausalLM(_config())
    with pytest.raises(ValueError, match="backend"):
        fuse_diff_attention(model, backend="cuda")
    with pytest.warns(UserWarning, match="holds no transformers DiffLlamaAttention"):
        assert fuse_diff_attention(torch.nn.Linear(2, 2)) == 0

    class OwnAttention(DiffLlamaAttention):
        pass

    model.model.layers[1].self_attn.__class__ = OwnAttention
    with pytest.raises(TypeError, match="OwnAttention"):
        fuse_diff_attention(model)
    assert not any(isinstance(m, FusedDiffLlamaAttention) for m in model.modules())


# ------------------------------------------------------------------ prefill
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_prefill_logits_equal_transformers(implementation):
    reference, fused = _models(implementation)
    ids, mask = _batch()
    with torch.no_grad():
        for attention_mask in (mask, None):
            want = reference(ids, attention_mask=attention_mask).logits
            got = fused(ids, attention_mask=attention_mask).logits
            valid = torch.ones_like(mask, dtype=torch.bool) if attention_mask is None \
                else mask.bool()
            assert (got - want)[valid].abs().max() < 1e-5
    assert {m.last_backend for m in _attention_layers(fused)} == {"torch"}


@pytest.mark.skipif(not INTERPRET, reason="the fused kernels on CPU need TRITON_INTERPRET=1")
def test_prefill_and_generate_on_fused_kernels():
    reference, fused = _models("sdpa", backend="triton")
    ids, mask = _batch(batch=2, length=6)
    with torch.no_grad():
        want = reference(ids, attention_mask=mask).logits
        got = fused(ids, attention_mask=mask).logits
        assert (got - want)[mask.bool()].abs().max() < 1e-4
        assert {m.last_backend for m in _attention_layers(fused)} == {"triton"}
        settings = dict(attention_mask=mask, max_new_tokens=3, do_sample=False)
        assert torch.equal(fused.generate(ids, **settings), reference.generate(ids, **settings))


# ------------------------------------------------------------------ decoding
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_generate_equals_transformers(implementation):
    reference, fused = _models(implementation)
    ids, mask = _batch()
    settings = dict(max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        for prompt, prompt_mask in ((ids[:1], None), (ids, mask)):
            want = reference.generate(prompt, attention_mask=prompt_mask, **settings)
            out = fused.generate(prompt, attention_mask=prompt_mask,
                                 return_dict_in_generate=True, **settings)
            assert torch.equal(out.sequences, want)
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            assert isinstance(cache, DiffAttnCache)
        # transformers' own dynamic cache with the fused layers
        dynamic = fused.generate(ids, attention_mask=mask, cache_implementation="dynamic",
                                 **settings)
        assert torch.equal(dynamic, want)
        # padding is left out of the cache: seqlens count each row's own tokens
        valid = mask.sum(1) + settings["max_new_tokens"] - 1
        assert torch.equal(cache.layers[0].seqlens.long(), valid)


def test_generate_with_static_cache_and_beams():
    reference, fused = _models()
    ids, mask = _batch(batch=2, length=6)
    with torch.no_grad():
        for settings in (dict(cache_implementation="static"), dict(num_beams=2)):
            settings.update(attention_mask=mask, max_new_tokens=4, do_sample=False)
            assert torch.equal(fused.generate(ids, **settings),
                               reference.generate(ids, **settings)), settings


def test_cache_continues_across_calls_and_refuses_unfused_layers():
    reference, fused = _models()
    ids, mask = _batch(batch=2, length=12)
    with torch.no_grad():
        want = reference(ids, attention_mask=mask).logits
        cache = DiffAttnCache(fused.config)
        first = fused(ids[:, :7], attention_mask=mask[:, :7], cache=cache, use_cache=True)
        step = fused(ids[:, 7:8], attention_mask=mask[:, :8], cache=cache, use_cache=True)
        rest = fused(ids[:, 8:], attention_mask=mask, cache=cache, use_cache=True)
        got = torch.cat([first.logits, step.logits, rest.logits], 1)
        assert (got - want)[mask.bool()].abs().max() < 1e-5
        assert cache.get_seq_length() == 12
        with pytest.raises(TypeError, match="fused DiffLlama attention only"):
            reference(ids, cache=DiffAttnCache(reference.config), use_cache=True)


def test_decoding_steps_of_one_length_equal_transformers():
    """One-token steps of sequences of one length (lengths on the host: the step writes into
    the cache and attends over its views): each step's logits are transformers' own."""
    reference, fused = _models()
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = reference(ids).logits
        cache = DiffAttnCache(fused.config)
        got = [fused(ids[:, :5], cache=cache, use_cache=True).logits]
        for i in range(5, 9):
            got.append(fused(ids[:, i:i + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(got, 1), want, atol=2e-5, rtol=1e-5)
    assert cache.layers[0].seqlens.tolist() == [9, 9] and cache.get_seq_length() == 9


# ------------------------------------------------------------------ training
def test_training_step_gradients_equal_transformers():
    reference, fused = _models("eager")
    reference.train()
    fused.train()
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    for model in (reference, fused):
        model(ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
    for (name, p), q in zip(reference.named_parameters(), fused.parameters()):
        assert q.grad is not None, name
        scale = p.grad.abs().max().clamp_min(1e-6)
        assert ((q.grad - p.grad).abs().max() / scale) < 1e-4, name


# ------------------------------------------------------------------ checkpoints
def test_save_pretrained_round_trip(tmp_path):
    reference, fused = _models()
    fused.save_pretrained(tmp_path)
    loaded = DiffLlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert not any(isinstance(m, FusedDiffLlamaAttention) for m in loaded.modules())
    state, original = loaded.state_dict(), reference.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], v) for k, v in original.items())
    assert fuse_diff_attention(loaded, backend="torch") == 2
    ids, _ = _batch(batch=1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert torch.equal(loaded(ids).logits, fused(ids).logits)
