"""No forward or backward of the attention ops, modules or CLIP models waits for the device.

A host synchronisation shows up as an operator that reads a tensor's value on the host
(``item``, ``bool(tensor)``, ``torch.equal``). The tests run under a dispatch mode that fails
on those, and run the models on the ``meta`` device, where any such read is an error.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffattn import (DiffMultiheadAttention, DiffMultiheadAttentionV2, attention_inputs,
                      diff_attention, diff_attention_v2)
from diffattn.models import create_model
from helpers import INTERPRET

BACKENDS = ["torch"] + (["triton"] if INTERPRET else [])


class NoHostReads(TorchDispatchMode):
    """Fails on every operator that copies a tensor value to the host."""

    BANNED = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.equal.default,
              torch.ops.aten.is_nonzero.default, torch.ops.aten.item.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.BANNED:
            raise AssertionError(f"host read of a tensor value: {func}")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_ops_read_no_values(backend):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 20, 4, 16, generator=g, requires_grad=True)
    k = torch.randn(2, 24, 4, 16, generator=g, requires_grad=True)
    v = torch.randn(2, 24, 2, 32, generator=g, requires_grad=True)
    k2 = torch.randn(2, 24, 1, 16, generator=g, requires_grad=True)
    v2 = torch.randn(2, 24, 1, 16, generator=g, requires_grad=True)
    lam = torch.tensor(0.5, requires_grad=True)
    lam_tokens = torch.rand(2, 20, 2, generator=g, requires_grad=True)
    mask = torch.rand(2, 24, generator=g) < 0.3
    with NoHostReads():
        for causal in (False, True):
            out = diff_attention(q, k, v, lambda_=lam, causal=causal, key_padding_mask=mask,
                                 norm_weight=torch.ones(32), backend=backend)
            out.sum().backward()
            out = diff_attention_v2(q, k2, v2, lambda_=lam_tokens, causal=causal, key_padding_mask=mask,
                                    backend=backend)
            out.sum().backward()
        with torch.no_grad():
            diff_attention(q, k, v, lambda_=0.3, causal=True, backend=backend)


@pytest.mark.parametrize("layer", [DiffMultiheadAttention, DiffMultiheadAttentionV2])
def test_modules_on_the_meta_device(layer):
    m = layer(64, 4, batch_first=True, backend="torch", device="meta")
    x = torch.randn(2, 9, 64, device="meta", requires_grad=True)
    padding = torch.zeros(2, 9, dtype=torch.bool, device="meta")
    with NoHostReads():
        for kwargs in ({"is_causal": True}, {"key_padding_mask": padding}, {}):
            m(x, **kwargs)[0].sum().backward()


@pytest.mark.parametrize("name", ["DiffCLIP-Tiny", "DiffCLIPv2-Tiny", "CLIP-Tiny"])
def test_clip_training_step_on_the_meta_device(name):
    model = create_model(name, backend="torch").to("meta")
    images = torch.randn(2, 3, 32, 32, device="meta")
    tokens = torch.randint(0, 49408, (2, 7), device="meta")
    with NoHostReads():
        image_features, text_features, scale = model(images, tokens)
        (image_features.sum() + text_features.sum() + scale).backward()


def test_causal_mask_values_are_read_once_per_mask(monkeypatch):
    """A device mask's values are read on its first use only (then remembered while the tensor
    lives unmodified); a mask on the CPU is checked on the host every time."""
    reads = []

    def fake_read(mask):
        reads.append(tuple(mask.shape))
        return True

    monkeypatch.setattr(attention_inputs, "_values_are_causal", fake_read)
    mask = torch.empty(5, 5, device="meta")
    assert attention_inputs.is_causal_mask(mask, 5, 5)
    assert attention_inputs.is_causal_mask(mask, 5, 5)
    assert len(reads) == 1
    mask.fill_(0.0)  # modified in place: read again
    assert attention_inputs.is_causal_mask(mask, 5, 5)
    assert len(reads) == 2
    other = torch.empty(5, 5, device="meta")
    attention_inputs.is_causal_mask(other, 5, 5)
    assert len(reads) == 3
    answers = attention_inputs._CAUSAL_ANSWERS._answers
    count = len(answers)
    del other
    assert len(answers) == count - 1  # forgotten with the tensor
    assert not attention_inputs.is_causal_mask(mask, 5, 6)  # not square: no read
    assert len(reads) == 3


def test_causal_mask_detection_on_the_cpu():
    above = torch.ones(4, 4, dtype=torch.bool).triu(1)
    assert attention_inputs.is_causal_mask(above, 4, 4)
    assert attention_inputs.is_causal_mask(torch.zeros(4, 4).masked_fill(above, float("-inf")),
                                           4, 4)
    assert not attention_inputs.is_causal_mask(above.T, 4, 4)
    assert not attention_inputs.is_causal_mask(torch.zeros(4, 4), 4, 4)
