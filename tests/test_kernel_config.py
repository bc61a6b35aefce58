"""The GPU autotuning space: which tile configurations each class of call may use.

The pruner runs only on GPU (the interpreter takes one configuration), so it is tested here by
building the GPU space directly.
"""
import pytest
import torch

from diffattn.kernels import config


@pytest.fixture
def gpu_space(monkeypatch):
    monkeypatch.setattr(config, "INTERPRET", False)

    def build(candidates, autotune=True):
        monkeypatch.setattr(config, "AUTOTUNE", autotune)
        return config.autotune_space(candidates)
    return build


def shapes(configs):
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
            for c in configs]


@pytest.mark.parametrize("candidates", [config.FWD_CANDIDATES, config.BWD_CANDIDATES],
                         ids=["fwd", "bwd"])
@pytest.mark.parametrize("dtype,head_dim,group", [
    (torch.bfloat16, 64, "narrow"), (torch.float16, 32, "narrow"),
    (torch.bfloat16, 128, "wide"), (torch.float16, 96, "wide"), (torch.float32, 64, "fp32"),
])
def test_pruner_keeps_the_candidates_of_the_call_class(gpu_space, candidates, dtype,
                                                       head_dim, group):
    configs, prune_by = gpu_space(candidates)
    assert len(shapes(configs)) == len(set(shapes(configs)))  # each candidate once
    q = torch.empty(0, dtype=dtype)
    kept = prune_by["early_config_prune"](configs, {"Q": q}, HEAD_DIM=head_dim)
    assert sorted(shapes(kept)) == sorted(candidates[group])

    configs, prune_by = gpu_space(candidates, autotune=False)
    kept = prune_by["early_config_prune"](configs, {"Q": q}, HEAD_DIM=head_dim)
    assert shapes(kept) == candidates[group][:1]


def test_interpreter_uses_a_single_configuration(monkeypatch):
    monkeypatch.setattr(config, "INTERPRET", True)
    configs, prune_by = config.autotune_space(config.FWD_CANDIDATES)
    assert len(configs) == 1 and prune_by is None


def test_every_tile_fits_tl_dot_and_wide_heads_use_eight_warps():
    for candidates in (config.FWD_CANDIDATES, config.BWD_CANDIDATES):
        for bm, bn, warps, stages in (s for group in candidates.values() for s in group):
            assert bm >= 16 and bn >= 16 and warps in (4, 8) and stages >= 1
        assert candidates["wide"][0][2] == 8
    assert config.head_block(1) == 16 and config.head_block(48) == 64
    assert config.preprocess_warps(256) == 8 and config.preprocess_warps(128) == 4
