"""CPU tests of the benchmark's model level (benchmarks/model_providers.py): every mode runs a
real step on the tiny configs, compiled modes go through torch.compile (the cheap "eager"
backend here; inductor on a GPU run), and the timm providers build what they claim (with a
stand-in timm, since timm needs torchvision)."""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import model_providers as mp  # noqa: E402
import summary  # noqa: E402
import throughput  # noqa: E402
from providers import ProviderUnavailable  # noqa: E402

CPU = torch.device("cpu")
SPEC = mp.ModelSpec("DiffCLIP-Tiny", "CLIP-Tiny", "vit_base_patch16_224", (), 2, 3, (77, 20))


def _create_model():
    from diffattn.models import create_model
    return create_model


def test_base_mode():
    assert mp.base_mode("train_image") == ("train_image", None)
    assert mp.base_mode("train_text_compiled") == ("train_text", "default")
    assert mp.base_mode("infer_text_compiled_cudagraphs") == ("infer_text", "reduce-overhead")
    with pytest.raises(ValueError, match="unknown model mode 'train_step'"):
        mp.base_mode("train_step")


@pytest.mark.parametrize("provider", ["torch_path", "sdpa_plain"])
@pytest.mark.parametrize("mode,seq_len", [("train_image", 0), ("train_text", 20),
                                          ("infer_text", 77)])
def test_clip_steps_run_and_train_their_tower(provider, mode, seq_len):
    torch.manual_seed(0)
    measured, model = mp.model_step(provider, mode, seq_len, SPEC, torch.float32, CPU,
                                    _create_model())
    tower = "vision" if mode == "train_image" else "text"
    before = [p.detach().clone() for p in mp.clip_tower_parameters(model, tower)]
    other = [p.detach().clone() for p in
             mp.clip_tower_parameters(model, "text" if tower == "vision" else "vision")]
    measured.step()
    after = mp.clip_tower_parameters(model, tower)
    changed = any(not torch.equal(a, b) for a, b in zip(after, before))
    assert changed == mode.startswith("train")
    assert all(torch.equal(a, b) for a, b in zip(
        mp.clip_tower_parameters(model, "text" if tower == "vision" else "vision"), other))
    assert all(p.grad is None for p in model.parameters())
    batch, n, heads, head_dim, causal = measured.geometry
    if tower == "vision":
        assert (batch, n, heads, head_dim, causal) == (2, 17, 2, 16, False)
    else:
        assert (batch, n, heads, head_dim, causal) == (3, seq_len, 2, 16, True)
    assert model.training == mode.startswith("train")
    assert measured.notes[0] in ("AdamW (fused)", "AdamW (foreach)", "no optimizer")


def test_tower_parameters_split_the_model():
    model = _create_model()("CLIP-Tiny")
    vision = {id(p) for p in mp.clip_tower_parameters(model, "vision")}
    text = {id(p) for p in mp.clip_tower_parameters(model, "text")}
    assert not vision & text
    assert vision | text | {id(model.logit_scale)} == {id(p) for p in model.parameters()}


@pytest.mark.slow
def test_compiled_mode_runs_through_torch_compile():
    measured, model = mp.model_step("sdpa_plain", "train_text_compiled", 20, SPEC,
                                    torch.float32, CPU, _create_model(), compile_backend="eager")
    measured.step()
    measured.step()
    assert "torch.compile mode=default, backend=eager" in measured.notes
    with pytest.raises(ProviderUnavailable, match="CUDA graphs"):
        mp.model_step("sdpa_plain", "train_image_compiled_cudagraphs", 0, SPEC, torch.float32,
                      CPU, _create_model(), model=model)


def test_model_is_reused_when_given():
    measured, model = mp.model_step("sdpa_plain", "infer_text", 77, SPEC, torch.float32, CPU,
                                    _create_model())
    again, same = mp.model_step("sdpa_plain", "train_text", 20, SPEC, torch.float32, CPU, None,
                                model=model)
    assert same is model


def test_text_modes_reject_image_only_providers_and_bad_lengths():
    with pytest.raises(ValueError, match="has no text tower"):
        mp.model_step("timm", "train_text", 77, SPEC, torch.float32, CPU, _create_model())
    with pytest.raises(ValueError, match="seq_len must be in"):
        mp.model_step("sdpa_plain", "infer_text", 78, SPEC, torch.float32, CPU, _create_model())


class _Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads


class _DiffAttention(_Attention):
    def __init__(self, dim, num_heads):
        super().__init__(dim, num_heads)
        self.head_dim = dim // num_heads // 2
        self.lambda_init, self.sub_norm = 0.8, nn.Identity()


class _TinyViT(nn.Module):
    """Enough of a timm ViT for the providers: patch_embed, blocks[i].attn, a head."""

    def __init__(self, attn_layer=None, img_size=16, embed_dim=8, num_heads=2):
        super().__init__()
        attn = _DiffAttention if attn_layer is not None else _Attention
        self.patch_embed = types.SimpleNamespace(img_size=(img_size, img_size), num_patches=16)
        self.num_prefix_tokens = 1
        self.blocks = nn.ModuleList([nn.Module()])
        self.blocks[0].attn = attn(embed_dim, num_heads)
        self.attn_layer = attn_layer
        self.head = nn.Linear(3 * img_size * img_size, 5)

    def forward(self, x):
        return self.head(x.flatten(1))


@pytest.fixture
def fake_timm(monkeypatch):
    made = []
    module = types.ModuleType("timm")
    module.__version__ = "0.test"

    def create_model(name, pretrained=False, **kwargs):
        made.append((name, kwargs))
        return _TinyViT(kwargs.get("attn_layer"))
    module.create_model = create_model
    monkeypatch.setitem(sys.modules, "timm", module)
    return made


def test_timm_providers_build_timm_models(fake_timm, monkeypatch):
    measured, model = mp.model_step("timm", "train_image", 0, SPEC, torch.float32, CPU, None)
    measured.step()
    assert measured.geometry == (2, 17, 1, 4, False)       # 2 plain heads of 4 = 1 diff head
    measured, _ = mp.model_step("timm_diff", "train_image", 0, SPEC, torch.float32, CPU, None)
    assert measured.geometry == (2, 17, 2, 2, False)       # timm's DiffAttention: 2 heads
    assert fake_timm[-1] == ("vit_base_patch16_224", {"attn_layer": "diff"})

    monkeypatch.setitem(sys.modules, "diffattn.integrations.timm", None)
    with pytest.raises(ProviderUnavailable, match="FusedDiffAttention is not available"):
        mp.model_step("timm_diff_fused", "train_image", 0, SPEC, torch.float32, CPU, None)

    fused = type("FusedDiffAttention", (), {})
    integration = types.ModuleType("diffattn.integrations.timm")
    integration.FusedDiffAttention = fused
    monkeypatch.setitem(sys.modules, "diffattn.integrations.timm", integration)
    mp.model_step("timm_diff_fused", "train_image", 0, SPEC, torch.float32, CPU, None)
    assert fake_timm[-1] == ("vit_base_patch16_224", {"attn_layer": fused})


def test_missing_timm_is_a_skip_with_its_reason(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ProviderUnavailable, match="timm cannot be imported"):
        mp.build_timm("timm", SPEC, CPU)


def test_runner_model_case_records_first_step_and_row():
    args = throughput.parse_args(["--levels", "model", "--image-batch", "2", "--text-batch",
                                  "2", "--model-steps", "2", "--model-warmup", "0"])
    throughput.apply_defaults(args, on_cuda=False)
    env = throughput.Environment(CPU, "cpu", "2.x", "3.x", False)
    report = summary.Report()
    runner = throughput.Runner(env, args, None, None, report, _create_model(), 1e12)
    case = throughput.Case("model", "torch_path", throughput.Shape("text", 2, 20, 0, 0, True),
                           "fp32", ("train_text",))
    runner.run(case)
    assert not report.failed, report.failed
    (row,) = runner.rows
    assert (row["level"], row["mode"], row["batch"], row["seq_len"], row["causal"]) == (
        "model", "train_text", 2, 20, True)
    assert row["ms_p50"] > 0 and case.label() in report.compile_s
