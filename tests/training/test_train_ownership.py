"""``python -m diffattn.train`` owns its run directory, stops on divergence and reports every
failed write:

- a directory holding files that no run wrote is refused, untouched; a cleanup deletes only
  what the run's manifest records that it wrote;
- a second run or resume in a locked directory fails at once naming the PID; a killed holder
  leaves no stale lock;
- a non-finite loss (or non-finite weights) ends the run with an error naming the step; the
  last finite checkpoint stays current and best; metrics.jsonl is strict JSON;
- a write beyond a file-size limit, a full disk, a read-only directory: one error line
  naming the file and the cause, the previous checkpoint intact;
- a stalled rank ends a 2-process gloo job with an error naming --dist-timeout.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import diffattn.training.cli as train_cli
from diffattn.train import main
from diffattn.training import checkpointing
from diffattn.training.checkpointing import (MODEL_FILE, STATE_FILE,
                                             find_checkpoint, load_training_state)
from diffattn.training.metrics import METRICS_FILE, append_metrics, read_metrics
from diffattn.training.run_directory import (LOCK_FILE, RunLock, RunWriteError,
                                             write_failure_cause, writing)

from _training_data import one_thread  # noqa: F401 (autouse)
from _training_data import (ONE_THREAD, csv_run, error_lines, one_error_line,
                            one_training_thread, write_csv_dataset)

# A few lr-1e6 steps without clipping or warm-up make the loss NaN.
DIVERGING = ("--lr", "1e6", "--warmup", "0", "--grad-clip", "0", "--allow-changed-args")


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory):
    """A run of 1 epoch (8 rows, batch 4: 2 steps), validation held out so that it has a best
    checkpoint: (csv path, run directory)."""
    folder = tmp_path_factory.mktemp("one_epoch")
    csv_path = write_csv_dataset(folder / "data", count=10)
    with one_training_thread():
        assert main(csv_run(csv_path, folder / "run", 1, "--val-fraction", "0.2")) == 0
    return csv_path, folder / "run"


def _copy(run, tmp_path):
    return shutil.copytree(run, tmp_path / "run")


def _resume(csv_path, out, epochs, *extra):
    return csv_run(csv_path, out, epochs, "--val-fraction", "0.2", "--resume", *extra)


def _user_files(folder) -> dict:
    """Write files a user might keep where a run would write its own; return their texts."""
    files = {"epoch-1/thesis.txt": "chapter one", "important.tmp/notes.txt": "notes",
             "draft.tmp": "draft", "epoch-0009/mine.txt": "mine", "epoch-0002.tmp": "tmp"}
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return files


def _assert_intact(folder, files: dict) -> None:
    assert {name: (folder / name).read_text() for name in files} == files


# ------------------------------------------------------------------------ ownership
@pytest.mark.parametrize("resume", [False, True])
def test_folder_of_user_files_is_refused_untouched(tmp_path, capsys, resume):
    csv_path = write_csv_dataset(tmp_path / "data", count=8)
    out = tmp_path / "mine"
    out.mkdir()
    files = {**_user_files(out), MODEL_FILE: "my own model"}
    (out / MODEL_FILE).write_text("my own model")
    before = sorted(os.listdir(out))
    assert main(csv_run(csv_path, out, 1, *(["--resume"] if resume else []))) == 1
    error = one_error_line(capsys)
    assert "holds files that no training run wrote" in error and "draft.tmp" in error
    _assert_intact(out, files)
    assert sorted(os.listdir(out)) == before  # not even a lock file


def test_cleanup_deletes_only_what_the_run_wrote(one_epoch_run, tmp_path, capsys):
    csv_path, run = one_epoch_run
    out = _copy(run, tmp_path)
    files = _user_files(out)
    capsys.readouterr()
    assert main(_resume(csv_path, out, 2)) == 1  # epoch-0002.tmp is in the way, not deleted
    assert "epoch-0002.tmp" in one_error_line(capsys)
    _assert_intact(out, files)
    (out / "epoch-0002.tmp").unlink()
    del files["epoch-0002.tmp"]
    assert main(_resume(csv_path, out, 2)) == 0
    _assert_intact(out, files)
    assert find_checkpoint(str(out)).epoch == 2
    assert not (out / "epoch-0001").exists()  # the run's own old folder is gone


def test_a_first_save_cut_short_is_cleaned_up_by_resume(tmp_path, monkeypatch, capsys):
    csv_path = write_csv_dataset(tmp_path / "data", count=8)
    out = tmp_path / "run"

    class Killed(BaseException):
        pass

    def die(stage):
        if stage == "model written":
            raise Killed

    monkeypatch.setattr(checkpointing, "_pause_for_crash_tests", die)
    with pytest.raises(Killed):
        main(csv_run(csv_path, out, 1))
    monkeypatch.undo()
    assert (out / "epoch-0001.tmp" / MODEL_FILE).exists() and (out / METRICS_FILE).exists()
    (out / "notes.txt").write_text("kept")  # added by the user to the run's directory
    capsys.readouterr()
    assert main(csv_run(csv_path, out, 1)) == 1  # a new run: the directory holds one
    assert "already holds a run" in one_error_line(capsys)
    assert main(csv_run(csv_path, out, 1, "--resume")) == 0
    assert "no complete checkpoint" in capsys.readouterr().out
    assert not (out / "epoch-0001.tmp").exists()
    assert find_checkpoint(str(out)).epoch == 1
    assert [record["epoch"] for record in read_metrics(out)] == [1]
    assert (out / "notes.txt").read_text() == "kept"


# ------------------------------------------------------------------------ the lock
@pytest.mark.skipif(not hasattr(os, "fork"), reason="fcntl locks")
def test_a_locked_directory_is_refused_naming_the_pid(one_epoch_run, tmp_path, capsys):
    csv_path, run = one_epoch_run
    out = _copy(run, tmp_path)
    with RunLock(str(out)):
        for argv in (_resume(csv_path, out, 2), csv_run(csv_path, out, 1)):
            assert main(argv) == 1
            error = one_error_line(capsys)
            assert f"in use by another training run (PID {os.getpid()})" in error, error
    assert find_checkpoint(str(out)).epoch == 1

    # A holder killed with SIGKILL leaves no stale lock.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(out / LOCK_FILE)!r}, os.O_RDWR)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(Exception, match="in use by another training run"):
            RunLock(str(out)).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert main(_resume(csv_path, out, 2)) == 0


# ------------------------------------------------------------------------ divergence
def test_a_diverging_first_epoch_saves_nothing(tmp_path, capsys):
    csv_path = write_csv_dataset(tmp_path / "data", count=8)
    out = tmp_path / "run"
    assert main(csv_run(csv_path, out, 2, *DIVERGING)) == 1
    error = one_error_line(capsys)
    assert re.search(r"the loss stopped being finite at step \d+ \(epoch 1, its step \d+\)",
                     error), error
    assert "no checkpoint had been saved" in error
    assert find_checkpoint(str(out)) is None and not (out / MODEL_FILE).exists()
    assert read_metrics(out) == []


def test_divergence_keeps_the_last_finite_checkpoint_as_checkpoint_and_best(
        one_epoch_run, tmp_path, capsys):
    csv_path, run = one_epoch_run
    out = _copy(run, tmp_path)
    before = load_file(out / MODEL_FILE)
    capsys.readouterr()
    assert main(_resume(csv_path, out, 3, *DIVERGING)) == 1
    error = one_error_line(capsys)
    assert re.search(r"at step \d+ \(epoch 2, its step \d+\)", error), error
    assert "the checkpoint of epoch 1, the last with finite weights, is kept" in error
    checkpoint = find_checkpoint(str(out))
    assert checkpoint.epoch == 1 and checkpoint.best["epoch"] == 1
    for name in (MODEL_FILE, "best_model.safetensors"):
        after = load_file(out / name)
        assert all(torch.equal(before[key], after[key]) for key in before)
    assert [record["epoch"] for record in read_metrics(out)] == [1]
    assert load_training_state(checkpoint.folder)["epoch"] == 1


def test_non_finite_weights_after_the_last_step_of_an_epoch_stop_the_run(
        tmp_path, capsys, monkeypatch):
    csv_path = write_csv_dataset(tmp_path / "data", count=8)
    clamp, steps = train_cli.clamp_logit_scale, []

    def clamp_then_poison(model):  # after the epoch's last step: the loss never saw it
        clamp(model)
        steps.append(1)
        if len(steps) == 4:
            with torch.no_grad():
                model.logit_scale.fill_(float("inf"))

    monkeypatch.setattr(train_cli, "clamp_logit_scale", clamp_then_poison)
    out = tmp_path / "run"
    assert main(csv_run(csv_path, out, 3)) == 1
    error = one_error_line(capsys)
    assert "the weights stopped being finite after step 4 (the last of epoch 2)" in error, error
    assert find_checkpoint(str(out)).epoch == 1


def test_metrics_are_strict_json_and_a_nan_metric_is_never_best(tmp_path):
    append_metrics(str(tmp_path), {"epoch": 1, "loss": float("nan"), "val_loss": float("inf"),
                                   "lr": 0.5})

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    line = (tmp_path / METRICS_FILE).read_text()
    assert json.loads(line, parse_constant=refuse) == {"epoch": 1, "loss": None,
                                                       "val_loss": None, "lr": 0.5}
    assert read_metrics(tmp_path)[0]["loss"] is None
    assert not checkpointing._is_better(float("nan"), None, "val_loss", False)
    assert not checkpointing._is_better(float("-inf"), None, "val_loss", False)


# ------------------------------------------------------------------------ failed writes
def test_write_failure_causes_are_named():
    assert "no space left" in write_failure_cause(OSError(errno.ENOSPC, "x"))
    safetensors_error = RuntimeError("Error while serializing: I/O error: File too large "
                                     "(os error 27)")
    assert "(EFBIG)" in write_failure_cause(safetensors_error)
    try:  # torch.save's RuntimeError raised while handling the file object's OSError
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")
    except RuntimeError as error:
        assert "(ENOSPC)" in write_failure_cause(error)
    with pytest.raises(RunWriteError, match=r"cannot write '/x/y': read-only file system"):
        with writing("/x/y"):
            raise OSError(errno.EROFS, "Read-only file system")


@pytest.mark.skipif(not hasattr(os, "fork"), reason="RLIMIT_FSIZE and SIGXFSZ")
@pytest.mark.parametrize("limit_mb, file", [(4, MODEL_FILE), (20, STATE_FILE)])
def test_a_file_size_limit_is_one_error_line_and_the_checkpoint_stays(
        one_epoch_run, tmp_path, capsys, limit_mb, file):
    import resource

    csv_path, run = one_epoch_run
    out = _copy(run, tmp_path)
    assert os.path.getsize(out / "epoch-0001" / MODEL_FILE) < 20 << 20  # the model file fits
    capsys.readouterr()
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_mb << 20, hard))
    try:
        assert main(_resume(csv_path, out, 2)) == 1
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    error = one_error_line(capsys)
    assert f"cannot write {str(out / 'epoch-0002.tmp' / file)!r}: file too large" in error, error
    assert "the checkpoint of epoch 1 (epoch-0001) is kept" in error
    assert find_checkpoint(str(out)).epoch == 1
    assert not (out / "epoch-0002.tmp").exists()
    assert main(_resume(csv_path, out, 2)) == 0  # without the limit the run goes on


def test_an_unwritable_out_fails_before_training(tmp_path, capsys, monkeypatch):
    csv_path = write_csv_dataset(tmp_path / "data", count=8)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("diffattn.training.run_directory.tempfile.TemporaryFile", read_only)
    assert main(csv_run(csv_path, tmp_path / "run", 1)) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: cannot write {str(tmp_path / 'run')!r}: read-only file system "
                      "(EROFS)"]
    assert "epoch" not in captured.out


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes into read-only directories")
def test_a_read_only_out_fails_before_training(tmp_path, capsys):
    csv_path = write_csv_dataset(tmp_path / "data", count=8)
    out = tmp_path / "run"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert main(csv_run(csv_path, out, 1)) == 1
    finally:
        out.chmod(0o755)
    assert "cannot write" in one_error_line(capsys)


# ------------------------------------------------------------------------ distributed
def test_dist_timeout_must_be_positive(tmp_path):
    with pytest.raises(SystemExit):
        main(["--data", "digits", "--out", str(tmp_path), "--dist-timeout", "0"])


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP")
def test_a_stalled_rank_ends_the_job_naming_the_timeout(tmp_path):
    csv_path = write_csv_dataset(tmp_path / "data", count=8)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = csv_run(csv_path, tmp_path / "run", 100, "--dist-timeout", "4")
    ranks = []
    for rank in range(2):
        env = {**os.environ, **ONE_THREAD, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": "2"}
        ranks.append(subprocess.Popen([sys.executable, "-m", "diffattn.train", *argv], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    try:
        for line in ranks[0].stdout:
            if line.startswith("epoch 1 "):  # both ranks are training
                break
        ranks[1].send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        rest = ranks[0].stdout.read()
        assert ranks[0].wait(timeout=120) == 1
        assert time.monotonic() - stopped < 60
    finally:
        for process in ranks:
            process.kill()
            process.wait(timeout=30)
    errors = [line for line in rest.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, rest[-3000:]
    assert "did not respond within --dist-timeout 4 s" in errors[0]
    assert "Traceback" not in rest


def _tree(folder) -> dict:
    """{relative path: (size, mtime_ns)} of everything under folder."""
    return {os.path.relpath(os.path.join(root, name), folder):
            (os.lstat(os.path.join(root, name)).st_size,
             os.lstat(os.path.join(root, name)).st_mtime_ns)
            for root, dirs, names in os.walk(folder) for name in dirs + names}


def test_a_refused_new_run_over_a_run_changes_nothing(one_epoch_run, tmp_path, capsys):
    csv_path, run = one_epoch_run
    out = _copy(run, tmp_path)
    (out / "epoch-0002.tmp").mkdir()  # what an interrupted save leaves; cleanup would remove it
    before = _tree(out)
    capsys.readouterr()
    assert main(csv_run(csv_path, out, 2, "--val-fraction", "0.2")) == 1
    assert "already holds a run" in one_error_line(capsys)
    after = _tree(out)
    # the lock file is taken (and gets this process's PID) before the directory is read
    assert after.pop(LOCK_FILE)[0] > 0 and before.pop(LOCK_FILE)
    assert after == before


def test_the_lock_file_is_never_written_through_a_link(tmp_path, capsys):
    csv_path = write_csv_dataset(tmp_path / "data", count=8)
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    out = tmp_path / "run"
    out.mkdir()
    os.symlink(target, out / LOCK_FILE)
    assert main(csv_run(csv_path, out, 1)) == 1
    assert "not a regular file" in one_error_line(capsys)
    assert target.read_text() == "keep me"
