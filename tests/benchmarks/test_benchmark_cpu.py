"""The cpu level of benchmarks/throughput.py (benchmarks/cpu_compare.py) at tiny shapes: the
plain baseline computes what the library's plain CLIP computes, every member of a group
computes its baseline's result, and a run writes its rows, tables and summary section."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import cpu_compare  # noqa: E402
import throughput  # noqa: E402


def test_plain_baseline_matches_the_library_plain_clip():
    """PlainCLIP with a plain diffattn CLIP's weights gives its embeddings (open_clip's
    computation: the same towers under other names)."""
    import dataclasses
    from diffattn.models import create_model, get_config
    torch.manual_seed(0)
    tiny = get_config("CLIP-Tiny")
    c = dataclasses.replace(
        tiny, layout="open_clip", attention="plain",
        vision=dataclasses.replace(tiny.vision, ln_pre=True, patch_bias=False, act="gelu",
                                   mlp_ratio=4.0, ln_fp32=False),
        text=dataclasses.replace(tiny.text, act="gelu", mlp_ratio=4.0, ln_fp32=False))
    model = create_model(c).eval()
    size = cpu_compare.PlainSize(c.vision.image_size, c.vision.patch_size, c.vision.width,
                                 c.vision.layers, c.vision.heads, c.text.width, c.text.layers,
                                 c.text.heads, c.text.context_length, c.text.vocab_size,
                                 c.embed_dim)
    plain = cpu_compare.PlainCLIP(size).eval()
    state = model.state_dict()
    mapped = {"conv1.weight": state["visual.conv1.weight"],
              "class_embedding": state["visual.class_embedding"],
              "positional_embedding_visual": state["visual.positional_embedding"],
              "proj": state["visual.proj"], "token_embedding.weight":
              state["token_embedding.weight"],
              "positional_embedding": state["positional_embedding"],
              "text_projection": state["text_projection"]}
    for ours, theirs in (("ln_pre", "visual.ln_pre"), ("ln_post", "visual.ln_post"),
                         ("ln_final", "ln_final")):
        for p in ("weight", "bias"):
            mapped[f"{ours}.{p}"] = state[f"{theirs}.{p}"]
    for ours, theirs in (("visual_blocks", "visual.transformer.resblocks"),
                         ("text_blocks", "transformer.resblocks")):
        for key, value in state.items():
            if key.startswith(theirs + "."):
                mapped[ours + key[len(theirs):]] = value
    plain.load_state_dict(mapped, strict=True)
    images = torch.randn(2, 3, c.vision.image_size, c.vision.image_size)
    tokens = torch.randint(1, c.text.vocab_size - 1, (2, c.text.context_length))
    tokens[:, 5] = c.text.vocab_size - 1
    with torch.no_grad():
        torch.testing.assert_close(plain.encode_image(images), model.encode_image(images),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(plain.encode_text(tokens), model.encode_text(tokens),
                                   atol=1e-5, rtol=1e-5)


def test_decode_members_compute_their_baseline():
    for group in cpu_compare.decode_groups((64,), heads=2, head_dim=16, kv_heads=(2, 1)):
        with torch.no_grad():
            outs = {name: fn() for name, fn in group.members.items()}
        want = outs[group.baseline]
        want = want.transpose(1, 2) if want.shape[1] != 1 else want  # (B, H, 1, .) views
        for name, got in outs.items():
            torch.testing.assert_close(got.reshape(want.shape), want.reshape(want.shape),
                                       atol=1e-5, rtol=1e-5, msg=f"{group.case} {name}")


def test_cpu_level_runs(tmp_path):
    out = tmp_path / "out"
    code = throughput.main(["--levels", "cpu", "--cpu-tiny", "--cpu-threads", "1",
                            "--cpu-rounds", "1", "--out", str(out)])
    assert code == 0
    with open(out / cpu_compare.CSV_NAME) as stream:
        rows = list(csv.DictReader(stream))
    groups = {r["group"] for r in rows}
    assert groups == {"image", "text", "decode V1", "decode V2"}
    assert all(float(r["ms"]) > 0 and float(r["ratio"]) > 0 for r in rows)
    assert {r["member"] for r in rows if r["group"] == "text"} >= {"diffclip-tiny"}
    assert "## CPU level" in (out / "summary.md").read_text()
    assert "torch" in (out / cpu_compare.MD_NAME).read_text()


def test_cpu_threads_argument():
    assert throughput.parse_args(["--cpu-threads", "1,4"]).cpu_threads == [1, 4]
    assert "cpu" not in throughput.parse_args([]).levels
    with pytest.raises(SystemExit):
        throughput.parse_args(["--cpu-threads", "0"])
