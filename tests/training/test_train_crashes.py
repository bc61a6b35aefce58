"""Crash tests of ``python -m diffattn.train``: a training process killed with SIGKILL at any
moment -- inside the checkpoint-saving window (widened with DIFFATTN_CHECKPOINT_PAUSE) or at
random -- leaves a run directory with one complete checkpoint (or none), from which
``--resume`` continues (or starts afresh) and ends with the weights of an uninterrupted run.
Damaged run files give one ``error:`` line naming them."""
from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file

from diffattn.models import create_model
from diffattn.train import main
from diffattn.training.checkpointing import (MODEL_FILE, PAUSE_VARIABLE, SAVE_STAGES, STATE_FILE,
                                             find_checkpoint, load_training_state)
from diffattn.training.metrics import METRICS_FILE, append_metrics, read_metrics

from _training_data import one_thread  # noqa: F401 (autouse)
from _training_data import (ONE_THREAD, csv_run, one_error_line, one_training_thread,
                            write_csv_dataset)

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork and SIGKILL")

# Starts training processes quickly: it imports torch and diffattn once, then forks one child
# per request that runs diffattn.train.main(argv) -- the code of `python -m diffattn.train` --
# with its output on the launcher's stderr. It reaps each child and reports how it ended;
# with kill_after it kills the child itself after that many seconds.
LAUNCHER = r"""
import json, os, signal, sys, time
import torch
import torch._dynamo  # imported by the optimizer: once here, not in every child
import diffattn.train
sys.modules["matplotlib"] = None  # no training curve: not what these runs test, and slow
torch.set_num_threads(1)  # no thread pool exists at fork time: each child starts its own
for line in sys.stdin:
    argv, env, kill_after = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.dup2(2, 1)
        os.environ.update(env)
        code = 70
        try:
            code = diffattn.train.main(argv)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(f"\nLAUNCHED {pid}", file=sys.stderr, flush=True)
    deadline = None if kill_after is None else time.monotonic() + kill_after
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if deadline is not None and time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            deadline = None
        time.sleep(0.01)
    print(f"\nEXITED {status}", file=sys.stderr, flush=True)
"""
TIMEOUT_S = 300


def _lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _killed(status: int) -> bool:
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


class Launcher:
    """A LAUNCHER process; ``run`` trains in a fresh child and returns (wait status, output)."""

    def __init__(self):
        self.process = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdin=subprocess.PIPE,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True, env={**os.environ, **ONE_THREAD})
        self.lines = queue.Queue()
        threading.Thread(target=_lines, args=(self.process.stderr, self.lines),
                         daemon=True).start()

    def run(self, argv: list, stop_at: str = None, kill_after: float = None) -> tuple:
        """Train with ``argv``; SIGKILL the child when it reaches save stage ``stop_at`` (it
        pauses there) or after ``kill_after`` seconds."""
        env = {PAUSE_VARIABLE: f"{stop_at}=600" if stop_at else ""}
        self.process.stdin.write(json.dumps([argv, env, kill_after]) + "\n")
        self.process.stdin.flush()
        output, pid = [], None
        while True:
            line = self.lines.get(timeout=TIMEOUT_S)
            assert line is not None, "the launcher died:\n" + "".join(output[-50:])
            output.append(line)
            if line.startswith("LAUNCHED "):
                pid = int(line.split()[1])
            elif stop_at and f"checkpoint stage: {stop_at}" in line:
                os.kill(pid, signal.SIGKILL)
            elif line.startswith("EXITED "):
                return int(line.split()[1]), "".join(output)

    def close(self) -> None:
        self.process.kill()  # idle between requests: no child is running
        self.process.wait(timeout=60)



@pytest.fixture(scope="module")
def launcher():
    started = Launcher()
    yield started
    started.close()


def _check_run_directory(out, possible_epochs) -> int:
    """Assert that ``out`` holds the checkpoint of one of ``possible_epochs`` (0: none),
    complete and consistent; return its epoch."""
    checkpoint = find_checkpoint(str(out))
    epoch = 0 if checkpoint is None else checkpoint.epoch
    assert epoch in possible_epochs, (epoch, possible_epochs)
    if checkpoint is not None:
        assert load_training_state(checkpoint.folder)["epoch"] == epoch
        create_model(None, pretrained=checkpoint.model_path, backend="torch")
    if (out / MODEL_FILE).exists():  # the previous or the new weights, whole
        create_model(None, pretrained=out / MODEL_FILE, backend="torch")
    return epoch


@pytest.mark.slow
def test_sigkill_at_every_save_stage_and_at_random_moments_loses_nothing(launcher, tmp_path):
    csv_path = write_csv_dataset(tmp_path / "data", count=8)  # 2 steps per epoch
    epochs = 5
    status, output = launcher.run(csv_run(csv_path, tmp_path / "uninterrupted", epochs))
    assert status == 0, output

    out = tmp_path / "killed"
    resume = csv_run(csv_path, out, epochs, "--resume")
    epoch = 0
    # Each child trains one epoch past the checkpoint it starts from and dies while saving it:
    # before the switch (the checkpoint stays), at it and after it (the checkpoint advances).
    for stage in SAVE_STAGES:
        status, output = launcher.run(resume, stop_at=stage)
        assert _killed(status), output
        epoch = _check_run_directory(out, (epoch, epoch + 1))
    assert epoch == 3  # switched in the 3 children stopped at or after "switched"
    # Kills at random moments: start-up, cleanup, training, saving.
    rng = random.Random(0)
    for _ in range(3):
        if epoch == epochs:
            break
        status, output = launcher.run(resume, kill_after=rng.uniform(0.05, 1.5))
        assert _killed(status) or status == 0, output
        epoch = _check_run_directory(out, range(epoch, epochs + 1) if _killed(status)
                                     else (epochs,))

    if epoch < epochs:
        status, output = launcher.run(resume)
        assert status == 0, output
    records = read_metrics(out)
    assert [record["epoch"] for record in records] == list(range(1, epochs + 1))
    assert [record["step"] for record in records] == [2 * e for e in range(1, epochs + 1)]
    expected = load_file(tmp_path / "uninterrupted" / MODEL_FILE)
    got = load_file(out / MODEL_FILE)
    assert not [key for key in expected if not torch.equal(expected[key], got[key])]
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]


@pytest.mark.slow
def test_python_m_diffattn_train_killed_while_saving_resumes_from_the_last_epoch(tmp_path):
    csv_path = write_csv_dataset(tmp_path / "data", count=8)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "diffattn.train", *csv_run(csv_path, out, 2, "--resume")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, env={**os.environ, **ONE_THREAD, PAUSE_VARIABLE: "switched=600"})
    lines = queue.Queue()
    threading.Thread(target=_lines, args=(process.stderr, lines), daemon=True).start()
    while True:
        line = lines.get(timeout=TIMEOUT_S)
        assert line is not None, f"the run ended before saving (status {process.wait()})"
        if "checkpoint stage: switched" in line:
            process.send_signal(signal.SIGKILL)
            break
    assert process.wait(timeout=60) == -signal.SIGKILL
    assert find_checkpoint(str(out)).epoch == 1
    assert not (out / MODEL_FILE).exists()  # killed before the first link was made

    assert main(csv_run(csv_path, out, 2, "--resume")) == 0  # the same command, again
    assert [record["epoch"] for record in read_metrics(out)] == [1, 2]
    assert find_checkpoint(str(out)).epoch == 2
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]
    create_model(None, pretrained=out / MODEL_FILE, backend="torch")


# ------------------------------------------------------------------------ damaged run files
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 1-epoch CSV run (in-process): (csv path, run directory)."""
    folder = tmp_path_factory.mktemp("finished")
    csv_path = write_csv_dataset(folder / "data", count=8)
    with one_training_thread():
        assert main(csv_run(csv_path, folder / "run", 1)) == 0
    return csv_path, folder / "run"


def _copy_run(run, destination):
    import shutil

    shutil.copytree(run, destination)
    return destination


@pytest.mark.parametrize("damage", ["empty", "truncated", "random"])
def test_damaged_train_state_is_one_error_line_naming_it(finished_run, tmp_path, capsys, damage):
    csv_path, run = finished_run
    out = _copy_run(run, tmp_path / "run")
    state_path = out / "epoch-0001" / STATE_FILE
    data = state_path.read_bytes()
    state_path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2],
                            "random": os.urandom(len(data))}[damage])
    capsys.readouterr()
    assert main(csv_run(csv_path, out, 2, "--resume")) == 1
    assert str(state_path) in one_error_line(capsys)


def test_damaged_manifest_and_model_are_one_error_line(finished_run, tmp_path, capsys):
    csv_path, run = finished_run
    out = _copy_run(run, tmp_path / "manifest")
    (out / "checkpoint.json").write_text("{not json")
    assert main(csv_run(csv_path, out, 2, "--resume")) == 1
    assert "checkpoint.json" in one_error_line(capsys)

    out = _copy_run(run, tmp_path / "model")
    (out / "epoch-0001" / MODEL_FILE).write_bytes(b"")
    assert main(csv_run(csv_path, out, 2, "--resume")) == 1
    assert "epoch-0001/model.safetensors" in one_error_line(capsys)


def test_partial_last_metrics_line_does_not_block_resume(finished_run, tmp_path, capsys):
    csv_path, run = finished_run
    out = _copy_run(run, tmp_path / "run")
    append_metrics(str(out), {"epoch": 2, "step": 8, "loss": 1.0})  # an epoch never saved
    with open(out / METRICS_FILE, "a") as file:
        file.write('{"epoch": 3, "st')  # and a write cut short
    assert [record["epoch"] for record in read_metrics(out)] == [1, 2]
    assert main(csv_run(csv_path, out, 2, "--resume")) == 0
    assert [record["epoch"] for record in read_metrics(out)] == [1, 2]
    assert (out / METRICS_FILE).read_text().endswith("}\n")


def test_corrupt_metrics_line_is_named(finished_run, tmp_path, capsys):
    csv_path, run = finished_run
    out = _copy_run(run, tmp_path / "run")
    (out / METRICS_FILE).write_text("garbage\n" + (run / METRICS_FILE).read_text())
    assert main(csv_run(csv_path, out, 2, "--resume")) == 1
    assert "metrics.jsonl' line 1 is not valid JSON" in one_error_line(capsys)


def test_run_files_have_the_same_permissions(finished_run):
    _, run = finished_run
    modes = {name: oct(os.stat(run / name).st_mode & 0o777)
             for name in (MODEL_FILE, METRICS_FILE, "checkpoint.json", "training_curve.png",
                          f"epoch-0001/{MODEL_FILE}", f"epoch-0001/{STATE_FILE}")}
    assert len(set(modes.values())) == 1, modes
