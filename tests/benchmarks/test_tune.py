"""CPU tests of the tile-tuning sweep (tools/tune.py): the problem list, candidates, the
table merge and its format (read back by the kernels' own reader), the sweep with a fake timer
and clock, arguments, and a dry run of the whole CLI through the Triton interpreter."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import tune  # noqa: E402
from diffattn.kernels import INTERPRET, tuning  # noqa: E402
from diffattn.kernels.config import BWD_CANDIDATES, FWD_CANDIDATES  # noqa: E402

CPU = torch.device("cpu")
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="runs the launchers on CPU "
                                                             "through TRITON_INTERPRET=1")


def test_problems_cover_the_op_shapes_grouped_by_class():
    found = tune.problems(["bf16", "fp16"], ["v1", "v2"], dry_run=False)
    assert len(found) == 2 * 2 * len(tune.OP_SHAPES)
    shapes = {(p.batch, p.seq_len, p.heads, p.head_dim, p.causal) for p in found}
    assert shapes == set(tune.OP_SHAPES)
    assert {(p.seq_len, p.head_dim) for p in found} >= {(197, 64), (77, 64), (577, 128),
                                                        (1024, 64), (4096, 64), (16384, 64),
                                                        (4096, 128)}
    order = [(p.dtype, p.variant) for p in found]
    assert order == sorted(order, key=[("bf16", "v1"), ("bf16", "v2"), ("fp16", "v1"),
                                       ("fp16", "v2")].index)
    first_class = [p for p in found if (p.dtype, p.variant, p.head_dim, p.causal) ==
                   ("bf16", "v1", 64, False)]
    assert found[:len(first_class)] == first_class
    assert [p.seq_len for p in first_class] == [197, 1024, 4096, 16384]
    assert all(p.value_dim == (2 * p.head_dim if p.variant == "v1" else p.head_dim)
               for p in found)


def test_candidates_start_with_the_kernels_default():
    fwd = tune.candidates("fwd", torch.bfloat16, 128, extra=False, limit=None)
    assert fwd == [tuple(c) for c in FWD_CANDIDATES["narrow"]]
    wide = tune.candidates("bwd", torch.float16, 256, extra=False, limit=2)
    assert wide == [tuple(c) for c in BWD_CANDIDATES["wide"][:2]]
    extra = tune.candidates("bwd", torch.bfloat16, 128, extra=True, limit=None)
    assert extra[0] == tuple(BWD_CANDIDATES["narrow"][0])
    assert len(extra) == len(set(extra)) > len(BWD_CANDIDATES["narrow"])


def test_merge_keeps_other_entries_and_the_kernels_read_it(tmp_path):
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"format": 1, "arch": {"sm_80": {"fwd": {"c": {"64x64":
                                                                              [1, 2, 3, 4]}}}}}))
    data = tune.read_table_file(path)
    tune.merge_winner(data, "sm_90", "fwd", "bf16/d64/dv128/pair/full", "256x256",
                      (128, 64, 8, 3))
    tune.merge_winner(data, "sm_90", "bwd", "bf16/d64/dv128/pair/full", "256x256",
                      (32, 64, 64, 64, 4, 2))
    tune.merge_winner(data, "sm_90", "fwd", "bf16/d64/dv128/pair/full", "4096x4096",
                      (64, 64, 4, 2))
    tune.write_table(path, data)
    text = path.read_text()
    assert '"256x256": [128, 64, 8, 3]' in text            # one configuration per line
    table = tuning.read_table(path)
    assert table["sm_80"] == {"fwd": {"c": {"64x64": [1, 2, 3, 4]}}}
    entries = table["sm_90"]["fwd"]["bf16/d64/dv128/pair/full"]
    assert tuning.nearest_entry(entries, 256, 256) == (128, 64, 8, 3)
    assert tuning.nearest_entry(entries, 8192, 8192) == (64, 64, 4, 2)
    with pytest.raises(ValueError, match="kernel must be one of"):
        tune.merge_winner(data, "sm_90", "dq", "c", "1x1", (1,))


def test_bad_or_missing_table(tmp_path):
    assert tune.read_table_file(tmp_path / "absent.json") == {"format": 1, "arch": {}}
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": 2, "arch": {}}')
    with pytest.raises(ValueError, match="format 2"):
        tune.read_table_file(bad)


def test_committed_table_is_readable():
    data = tune.read_table_file(tuning.TABLE_PATH)
    assert data["format"] == tuning.TABLE_FORMAT
    assert tune.format_table(data) == tuning.TABLE_PATH.read_text() or data["arch"] == {}


class FakeClock:
    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


@needs_interpreter
def test_sweep_picks_the_fastest_and_writes_table_and_rows(tmp_path):
    """With a fake timer (the second candidate is fastest, the third fails) the winners are
    the second candidates, written under the problem's class and bucket."""
    problem = tune.Problem("v1", "fp16", 1, 40, 1, 64, False)

    calls = []

    def time_ms(fn):  # called once per candidate, in order
        n = len(calls) % 3
        calls.append(fn)
        if n == 2:
            raise RuntimeError("out of resources: shared memory")
        return [2.0, 1.0][n]
    table = tmp_path / "t.json"
    rows = []
    result = tune.sweep([problem], CPU, "sm_test", time_ms, table_path=table, max_candidates=3,
                        log=lambda line: None, on_row=rows.append)
    cls = "fp16/d64/dv128/pair/full"
    assert result.winners == {("fwd", cls, "64x64"): tuple(FWD_CANDIDATES["narrow"][1]),
                              ("bwd", cls, "64x64"): tuple(BWD_CANDIDATES["narrow"][1])}
    assert not result.failed and not result.skipped
    written = tuning.read_table(table)["sm_test"]
    assert written["fwd"][cls]["64x64"] == list(FWD_CANDIDATES["narrow"][1])
    assert len(rows) == 6 and sum(r["winner"] for r in rows) == 2
    assert [r["error"].startswith("RuntimeError") for r in rows] == [False, False, True] * 2


@needs_interpreter
def test_sweep_stops_at_the_time_limit_and_lists_the_rest():
    problems = [tune.Problem("v2", "fp16", 1, 40, 1, 64, False),
                tune.Problem("v2", "fp16", 1, 40, 1, 64, True)]
    result = tune.sweep(problems, CPU, "sm_test", lambda fn: 1.0, table_path=None,
                        max_candidates=2, time_limit_s=4.5, log=lambda line: None,
                        clock=FakeClock(1.0))
    # clock: problem 1 at 1 s; fwd candidates at 2, 3 s; bwd's first at 4 s, its second at 5 s
    # is past the limit: bwd keeps the best of what it timed (the default came first).
    assert set(k for k, _, _ in result.winners) == {"fwd", "bwd"}
    assert any("bwd: 1 of 2 candidates (time limit)" in s for s in result.skipped)
    assert any("causal" in s and "time limit" in s for s in result.skipped)


@needs_interpreter
def test_dry_run_cli_through_the_interpreter(tmp_path, capsys):
    table, rows = tmp_path / "t.json", tmp_path / "tune.csv"
    assert tune.main(["--dry-run", "--table", str(table), "--csv", str(rows), "--dtype", "fp16",
                      "--variants", "v2", "--max-candidates", "1"]) == 0
    out = capsys.readouterr().out
    assert "6 winners written" in out
    data = tuning.read_table(table)[tune.DRY_RUN_ARCH]
    assert set(data) == {"fwd", "bwd"} and len(data["fwd"]) == 3
    with open(rows, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == tune.CSV_COLUMNS
        assert len(list(reader)) == 6


def test_arguments_and_refusals(capsys, tmp_path):
    for argv in (["--dtype", "fp8"], ["--variants", "v3"], ["--time-limit-s", "0"],
                 ["--max-candidates", "-1"]):
        with pytest.raises(SystemExit) as exc:
            tune.parse_args(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ")
    if INTERPRET:
        assert tune.main(["--dry-run"]) == 2                     # never the committed table
        assert tune.main(["--table", str(tmp_path / "t.json")]) == 2   # interpreter: dry only
        err = capsys.readouterr().err.strip().splitlines()
        assert all(line.startswith("error: ") for line in err) and len(err) == 2


def test_forced_tiles_nest_and_restore():
    """The sweep forces one candidate at a time through tuning.forced_tiles; blocks nest."""
    first, second = tuple(FWD_CANDIDATES["narrow"][0]), tuple(FWD_CANDIDATES["narrow"][1])
    with tuning.forced_tiles(fwd=first):
        with tuning.forced_tiles(fwd=second, bwd=tuple(BWD_CANDIDATES["narrow"][0])):
            assert tuning.FWD_TILES.choose(None, CPU) == second
        assert tuning.FWD_TILES.choose(None, CPU) == first
        assert "choose" not in vars(tuning.BWD_TILES)
    assert "choose" not in vars(tuning.FWD_TILES)
