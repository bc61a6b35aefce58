"""The transformers level of benchmarks/throughput.py: every provider builds the same
DiffLlama and generates the same greedy tokens, the plan has the level's rows (the fused
provider on a GPU only) and a quick CPU run writes them. Skipped where transformers is not
installed (an optional extra)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import throughput  # noqa: E402
import transformers_providers as tp  # noqa: E402

CPU = torch.device("cpu")


def test_providers_generate_the_same_tokens():
    providers = ["hf_eager", "hf_sdpa", "torch_path"]
    spec = tp.SPECS["tiny"]
    ids = tp.prompt(2, 8, spec.vocab, CPU)
    outs = []
    for provider in providers:
        model = tp.build_model(provider, spec, torch.float32, CPU)
        with torch.no_grad():
            outs.append(model.generate(ids, attention_mask=torch.ones_like(ids),
                                       max_new_tokens=3, min_new_tokens=3, do_sample=False))
    assert outs[0].shape == (2, 11)
    assert all(torch.equal(out, outs[0]) for out in outs[1:])
    with pytest.raises(ValueError, match="transformers-level provider"):
        tp.build_model("sdpa_x2", spec, torch.float32, CPU)


def _args(argv):
    args = throughput.parse_args(argv)
    throughput.apply_defaults(args, on_cuda="--cuda" in argv)
    return args


def test_plan_has_transformers_rows():
    gpu = throughput.build_plan(_args(["--quick", "--levels", "transformers"]), on_cuda=True,
                                interpret=False, model_available=False)
    assert {c.provider for c in gpu} == set(tp.TRANSFORMERS_PROVIDERS)
    assert {(c.shape.name, c.shape.seq_len) for c in gpu} == {("1b", 128), ("1b", 1024)}
    assert all(c.modes == ("prefill", "decode") for c in gpu)
    cpu = throughput.build_plan(_args(["--levels", "transformers"]), on_cuda=False,
                                interpret=False, model_available=False)
    assert {c.provider for c in cpu} == {"hf_eager", "hf_sdpa", "torch_path"}
    assert {(c.shape.name, c.shape.seq_len) for c in cpu} == {
        ("tiny", 128), ("tiny", 1024), ("small", 128), ("small", 1024)}
    tiny = next(c.shape for c in cpu if c.shape.name == "tiny")
    assert (tiny.heads, tiny.head_dim, tiny.causal) == (2, 16, True)


def test_quick_transformers_run_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(throughput, "transformers_shapes",
                        lambda on_cuda, quick: [tp.GenerateShape("tiny", 1, 16)])
    monkeypatch.setattr(tp, "DECODE_TOKENS", 2)
    out = tmp_path / "out"
    code = throughput.main(["--quick", "--levels", "transformers", "--out", str(out)])
    assert code == 0
    rows = [r for r in (out / "throughput.csv").read_text().splitlines()[1:]
            if ",transformers," in r]
    assert len(rows) == 3 * len(tp.TRANSFORMERS_MODES)
    summary = (out / "summary.md").read_text()
    assert "## Transformers level" in summary and "torch_path / hf_sdpa time" in summary
