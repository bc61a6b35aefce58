"""Tile configurations: the candidates per class of call, length buckets, the committed table of
tuned winners and the once-per-bucket choice (kernels/config.py, kernels/tuning.py).

The choice logic runs on GPU only (the interpreter takes one configuration), so it is tested
here with the interpreter switch off and the GPU queries replaced.
"""
import json

import pytest
import torch

from diffattn.kernels import config, tuning


def test_every_candidate_fits_tl_dot_and_wide_heads_use_eight_warps():
    for candidates, fields in ((config.FWD_CANDIDATES, config.FWD_FIELDS),
                               (config.BWD_CANDIDATES, config.BWD_FIELDS)):
        assert set(candidates) == {"narrow", "wide", "fp32"}
        for group in candidates.values():
            assert len(group) == len(set(group))  # each candidate once
            for c in group:
                assert len(c) == len(fields)
                *blocks, warps, stages = c
                assert all(b >= 16 and b & (b - 1) == 0 for b in blocks)
                assert warps in (4, 8) and stages >= 1
        assert candidates["wide"][0][-2] == 8
    assert config.head_block(1) == 16 and config.head_block(48) == 64
    assert config.rows_warps(256) == 8 and config.rows_warps(128) == 4


@pytest.mark.parametrize("dtype,block_dv,group", [
    (torch.bfloat16, 128, "narrow"), (torch.float16, 64, "narrow"),
    (torch.bfloat16, 256, "wide"), (torch.float32, 128, "fp32"), (torch.float64, 32, "fp32"),
])
def test_candidate_group(dtype, block_dv, group):
    assert config.candidate_group(dtype, block_dv) == group


def test_length_buckets_are_powers_of_two_from_16():
    assert [tuning.length_bucket(n) for n in (1, 16, 17, 20, 77, 197, 4096, 4097)] == \
        [16, 16, 32, 32, 128, 256, 4096, 8192]


def test_nearest_entry_by_log_distance():
    entries = {"256x256": (1,), "4096x4096": (2,), "1024x1024": (3,)}
    assert tuning.nearest_entry(entries, 256, 256) == (1,)
    assert tuning.nearest_entry(entries, 128, 128) == (1,)
    assert tuning.nearest_entry(entries, 2048, 2048) == (3,)  # tie 1024/4096: the smaller
    assert tuning.nearest_entry(entries, 16384, 16384) == (2,)
    assert tuning.nearest_entry({}, 128, 128) is None


@pytest.fixture
def gpu_chooser(monkeypatch, tmp_path):
    """A forward TileChooser that behaves as on a GPU of architecture sm_90, reading its
    table from a temporary file; the candidate timings are faked."""
    monkeypatch.setattr(tuning, "INTERPRET", False)
    monkeypatch.setattr(tuning, "gpu_arch", lambda device: "sm_90")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    table = tmp_path / "tuned.json"
    table.write_text(json.dumps({"format": 1, "arch": {}}))
    monkeypatch.setattr(tuning, "TABLE_PATH", table)
    timed = []

    def fake_time(run, candidates):
        timed.append(list(candidates))
        times = {c: 1.0 + i for i, c in enumerate(candidates)}
        times[candidates[-1]] = 0.5  # the last candidate wins
        return min(times, key=times.get), times

    monkeypatch.setattr(tuning, "time_candidates", fake_time)
    chooser = tuning.TileChooser("fwd", config.FWD_CANDIDATES, config.FWD_FIELDS,
                                 config.INTERPRET_FWD)
    chooser.timed = timed
    chooser.table_file = table
    return chooser


def key(chooser, n=197, m=197, causal=False):
    return chooser.key(torch.device("cuda", 0), torch.bfloat16, 64, 128, True, causal, n, m)


def test_autotune_once_per_bucket(gpu_chooser, monkeypatch):
    monkeypatch.setattr(tuning, "AUTOTUNE", True)
    narrow = config.FWD_CANDIDATES["narrow"]
    device = torch.device("cuda", 0)
    assert gpu_chooser.choose(key(gpu_chooser, 197), device, run=lambda c: None) == narrow[-1]
    assert gpu_chooser.choose(key(gpu_chooser, 200), device, run=lambda c: None) == narrow[-1]
    assert len(gpu_chooser.timed) == 1  # 200 is in 197's bucket (256): no second tuning
    gpu_chooser.choose(key(gpu_chooser, 1000), device, run=lambda c: None)
    assert len(gpu_chooser.timed) == 2


def test_without_autotune_or_while_tracing_the_first_candidate(gpu_chooser, monkeypatch):
    narrow = config.FWD_CANDIDATES["narrow"]
    device = torch.device("cuda", 0)
    monkeypatch.setattr(tuning, "AUTOTUNE", True)
    # A traced call (no run callback) takes the first candidate and does not remember it ...
    assert gpu_chooser.choose(key(gpu_chooser), device, run=None) == narrow[0]
    assert not gpu_chooser.chosen
    # ... so the next eager call still tunes.
    assert gpu_chooser.choose(key(gpu_chooser), device, run=lambda c: None) == narrow[-1]
    monkeypatch.setattr(tuning, "AUTOTUNE", False)
    assert gpu_chooser.choose(key(gpu_chooser, 4096), device, run=lambda c: None) == narrow[0]
    assert len(gpu_chooser.timed) == 1


def test_the_committed_table_comes_first(gpu_chooser, monkeypatch):
    monkeypatch.setattr(tuning, "AUTOTUNE", True)
    cls = tuning.call_class(torch.bfloat16, 64, 128, True, False)
    assert cls == "bf16/d64/dv128/pair/full"
    gpu_chooser.table_file.write_text(json.dumps({"format": 1, "arch": {"sm_90": {"fwd": {
        cls: {"256x256": [64, 32, 4, 3], "4096x4096": [128, 64, 8, 3]}}}}}))
    device = torch.device("cuda", 0)
    assert gpu_chooser.choose(key(gpu_chooser, 197), device, lambda c: None) == (64, 32, 4, 3)
    assert gpu_chooser.choose(key(gpu_chooser, 3000, 3000), device, lambda c: None) == \
        (128, 64, 8, 3)
    assert not gpu_chooser.timed
    # Another class (causal) has no entry: tuned.
    gpu_chooser.choose(key(gpu_chooser, 197, causal=True), device, lambda c: None)
    assert len(gpu_chooser.timed) == 1


def test_unreadable_table_names_the_file(tmp_path):
    bad = tmp_path / "tuned.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="tuned.json"):
        tuning.read_table(bad)
    bad.write_text(json.dumps({"format": 99}))
    with pytest.raises(ValueError, match="format 99"):
        tuning.read_table(bad)
    assert tuning.read_table(tmp_path / "missing.json") == {}


def test_committed_table_is_well_formed():
    fields = {"fwd": config.FWD_FIELDS, "bwd": config.BWD_FIELDS}
    for arch, kernels in tuning.read_table().items():
        assert arch.startswith("sm_")
        for kernel, classes in kernels.items():
            for cls, entries in classes.items():
                assert len(cls.split("/")) == 5
                for bucket, cfg in entries.items():
                    n, m = (int(x) for x in bucket.split("x"))
                    assert n & (n - 1) == 0 and m & (m - 1) == 0
                    assert len(cfg) == len(fields[kernel])


def test_interpreter_uses_a_single_configuration(monkeypatch):
    monkeypatch.setattr(tuning, "INTERPRET", True)
    assert tuning.FWD_TILES.choose(key(tuning.FWD_TILES), torch.device("cpu")) == \
        config.INTERPRET_FWD
    assert tuning.BWD_TILES.choose(key(tuning.BWD_TILES), torch.device("cpu")) == \
        config.INTERPRET_BWD
