"""The varlen level of benchmarks/throughput.py: packed and padded providers compute the same
sequences' attention (the fused ones through the interpreter), the plan has the varlen rows
(fused ones on a GPU only), FLOPs count real tokens, and a quick CPU run writes the rows."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import providers  # noqa: E402
import throughput  # noqa: E402
import varlen_providers  # noqa: E402
from helpers import INTERPRET  # noqa: E402

SHAPE = providers.Shape("varlen_varied", 3, 24, 2, 16, True)
TORCH_PROVIDERS = ("torch_path_packed", "torch_path_padded", "torch_path_v2_packed",
                   "torch_path_v2_padded")


def _packed_and_padded(packed: str, padded: str, shape=SHAPE):
    """Both providers' outputs on the real tokens, (total, H, dv) each."""
    outs = []
    for name in (packed, padded):
        bench = varlen_providers.varlen_bench(name, shape, torch.float32, torch.device("cpu"),
                                              ("fwd",))
        outs.append(bench.makers["fwd"]()().detach())
    lengths = varlen_providers.sequence_lengths(shape)
    keep = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    return outs[0], outs[1][keep]


def test_lengths():
    assert varlen_providers.sequence_lengths(SHAPE) == [8, 16, 24]
    equal = providers.Shape("varlen_equal", 3, 24, 2, 16, True)
    assert varlen_providers.sequence_lengths(equal) == [24, 24, 24]


@pytest.mark.parametrize("v2", [False, True])
def test_torch_providers_run_on_the_same_sequences(v2):
    """Same random draws, different layouts: only shapes and finiteness are comparable; the
    fused-against-torch agreement is test_varlen's."""
    tag = "_v2" if v2 else ""
    packed, padded = _packed_and_padded(f"torch_path{tag}_packed", f"torch_path{tag}_padded")
    assert packed.shape == padded.shape == (48, 2, 16 if v2 else 32)
    assert torch.isfinite(packed).all() and torch.isfinite(padded).all()


@pytest.mark.skipif(not INTERPRET, reason="the fused kernels on CPU need TRITON_INTERPRET=1")
@pytest.mark.parametrize("provider", ["diffattn_packed_interpreter",
                                      "diffattn_v2_padded_interpreter"])
def test_fused_providers_match_the_torch_path(provider):
    base = varlen_providers.VARLEN_INTERPRETER_PROVIDERS[provider]
    torch_name = base.replace("diffattn", "torch_path")
    for name in (provider, torch_name):
        bench = varlen_providers.varlen_bench(name, SHAPE, torch.float32, torch.device("cpu"),
                                              ("fwd",))
        out = bench.makers["fwd"]()().detach()
        if name == provider:
            fused = out
    torch.testing.assert_close(fused, out, atol=1e-5, rtol=1e-5)


def test_unknown_provider():
    with pytest.raises(ValueError, match="varlen-level provider"):
        varlen_providers.varlen_bench("naive", SHAPE, torch.float32, torch.device("cpu"))


def _args(argv):
    args = throughput.parse_args(argv)
    throughput.apply_defaults(args, on_cuda="--cuda" in argv)
    return args


def test_plan_has_varlen_rows_and_flops_count_real_tokens():
    gpu = throughput.build_plan(_args(["--quick", "--levels", "varlen"]), on_cuda=True,
                                interpret=False, model_available=False)
    assert {c.provider for c in gpu} == set(varlen_providers.VARLEN_PROVIDERS)
    assert {c.shape.name for c in gpu} == {"varlen_equal", "varlen_varied"}
    cpu = throughput.build_plan(_args(["--quick", "--levels", "varlen"]), on_cuda=False,
                                interpret=True, model_available=False)
    names = {c.provider for c in cpu}
    assert names == set(TORCH_PROVIDERS) | set(varlen_providers.VARLEN_INTERPRETER_PROVIDERS)
    flops = throughput.case_flops("varlen", "diffattn_padded", SHAPE, "fwd")
    assert flops == sum(2 * 12 * n * n * 16 * 0.5 for n in (8, 16, 24))


def test_quick_varlen_run_on_cpu(tmp_path):
    out = tmp_path / "out"
    shape = providers.Shape("varlen_varied", 2, 16, 1, 16, True)
    import unittest.mock as mock
    with mock.patch.object(throughput, "varlen_shapes", lambda on_cuda, quick: [shape]):
        code = throughput.main(["--quick", "--levels", "varlen", "--modes", "fwd,fwd_bwd",
                                "--providers", ",".join(TORCH_PROVIDERS), "--out", str(out)])
    assert code == 0
    rows = (out / "throughput.csv").read_text().splitlines()
    varlen_rows = [r for r in rows[1:] if ",varlen," in r]
    assert len(varlen_rows) == 2 * len(TORCH_PROVIDERS)
    summary = (out / "summary.md").read_text()
    assert "## Varlen level" in summary and "torch path packed speed-up vs padded" in summary
