"""``--resume`` and the run's saved arguments: changed optimisation arguments are refused,
naming each, unless ``--allow-changed-args`` (then the schedule is recomputed for them);
``--epochs`` may grow; nothing left to train is an error; without a checkpoint a run starts
afresh."""
from __future__ import annotations

import shutil

import pytest

from diffattn.train import main
from diffattn.training.checkpointing import find_checkpoint
from diffattn.training.metrics import METRICS_FILE, read_metrics
from diffattn.training.optim import cosine_multiplier

from _training_data import one_thread  # noqa: F401 (autouse)
from _training_data import csv_run, error_lines, one_training_thread, write_csv_dataset



@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run of 2 epochs stopped after the first (8 rows, batch 4: 2 steps per epoch):
    (csv path, run directory)."""
    folder = tmp_path_factory.mktemp("stopped")
    csv_path = write_csv_dataset(folder / "data", count=8)
    with one_training_thread():
        assert main(csv_run(csv_path, folder / "run", 2, "--stop-after-epoch", "1")) == 0
    return csv_path, folder / "run"


def _copy(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run")


def test_changed_optimisation_arguments_are_refused_naming_each(stopped_run, tmp_path, capsys):
    csv_path, run = stopped_run
    out = _copy(run, tmp_path)
    capsys.readouterr()
    assert main(csv_run(csv_path, out, 3, "--resume", "--lr", "0.1", "--batch-size", "2",
                        "--wd", "0.2", "--warmup", "5", "--model", "CLIP-Tiny")) == 1
    (error,) = error_lines(capsys)
    for change in ("--lr 0.1 (the run was saved with 0.0005)",
                   "--batch-size 2 (the run was saved with 4)",
                   "--wd 0.2 (the run was saved with 0.1)",
                   "--warmup 5 (the run was saved with 2)",
                   "--model 'CLIP-Tiny' (the run was saved with 'DiffCLIP-Tiny')",
                   "--allow-changed-args"):
        assert change in error, error
    assert "--epochs" not in error  # 2 -> 3: growing is allowed
    assert [record["epoch"] for record in read_metrics(out)] == [1]
    other_data = write_csv_dataset(tmp_path / "other", count=8)
    assert main(csv_run(other_data, out, 2, "--resume")) == 1
    assert f"--data 'csv:{other_data}' (the run was saved with 'csv:{csv_path}')" in \
        error_lines(capsys)[0]


def test_allowed_changes_recompute_the_schedule_for_the_new_lr(stopped_run, tmp_path, capsys):
    csv_path, run = stopped_run
    out = _copy(run, tmp_path)
    capsys.readouterr()
    assert main(csv_run(csv_path, out, 3, "--resume", "--lr", "0.01", "--warmup", "0",
                        "--allow-changed-args")) == 0
    captured = capsys.readouterr()
    assert "warning: resuming with changed arguments: --lr 0.01" in captured.err
    records = read_metrics(out)
    assert [record["epoch"] for record in records] == [1, 2, 3]
    # Epoch 3 ends at optimizer step 5 of the 6 of a 3-epoch run: the lr of the new schedule.
    assert records[-1]["lr"] == pytest.approx(0.01 * cosine_multiplier(5, 0, 6), rel=1e-12)
    assert records[1]["lr"] == pytest.approx(0.01 * cosine_multiplier(3, 0, 6), rel=1e-12)
    assert "finished epochs 2-3 of 3" in captured.out


def test_epochs_may_grow(stopped_run, tmp_path, capsys):
    csv_path, run = stopped_run
    out = _copy(run, tmp_path)
    assert main(csv_run(csv_path, out, 3, "--resume")) == 0
    assert "resuming with changed arguments" not in capsys.readouterr().err
    assert [record["step"] for record in read_metrics(out)] == [2, 4, 6]


def test_nothing_left_to_train_is_an_error(stopped_run, tmp_path, capsys):
    csv_path, run = stopped_run
    out = _copy(run, tmp_path)
    capsys.readouterr()
    assert main(csv_run(csv_path, out, 1, "--resume")) == 1
    (error,) = error_lines(capsys)
    assert "has completed 1 epoch(s) and --epochs is 1: nothing is left to train" in error


def test_resume_without_a_checkpoint_starts_afresh(tmp_path, capsys):
    csv_path = write_csv_dataset(tmp_path / "data", count=8)
    out = tmp_path / "run"
    assert main(csv_run(csv_path, out, 1, "--resume")) == 0  # a new directory
    assert "no complete checkpoint" in capsys.readouterr().out
    assert find_checkpoint(str(out)).epoch == 1
    assert [record["epoch"] for record in read_metrics(out)] == [1]
