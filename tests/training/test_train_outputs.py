"""What a training run leaves and says: training_curve.png, the best checkpoint by the
validation metric (kept with the same atomic switch), a closing summary line, and warnings
for a warm-up as long as the run and for samples that drop_last leaves out."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from diffattn.models import create_model
from diffattn.train import main
from diffattn.training.checkpointing import (BEST_MODEL_FILE, MODEL_FILE, find_checkpoint,
                                             save_checkpoint)
from diffattn.training.optim import create_optimizer
from diffattn.training.plots import CURVE_FILE, save_training_curve

from _training_data import one_thread  # noqa: F401 (autouse)
from _training_data import csv_run, write_csv_dataset



def test_run_outputs_curve_best_checkpoint_summary_and_warnings(tmp_path, capsys):
    # 16 rows, 2 held out: 14 training samples in batches of 4 leave 2 out of every epoch.
    csv_path = write_csv_dataset(tmp_path / "data")
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(csv_run(csv_path, out, 2, "--val-fraction", "0.125", "--warmup", "20")) == 0
    captured = capsys.readouterr()
    assert ("warning: --warmup 20 is not below the run's 6 optimizer steps (2 epochs of 3): "
            "the learning rate never reaches --lr 0.0005") in captured.err
    assert ("warning: 2 of 14 samples are left out of every epoch: 14 is not a multiple of the "
            "global batch 4") in captured.err
    summary = captured.out.strip().splitlines()[-1]
    assert summary.startswith("finished epochs 1-2 of 2 in ")
    assert "val_loss" in summary and "best val_loss" in summary
    assert summary.endswith(f"in {out}: {MODEL_FILE}, {BEST_MODEL_FILE}, metrics.jsonl, "
                            f"{CURVE_FILE}")
    with Image.open(out / CURVE_FILE) as curve:
        assert curve.format == "PNG" and curve.width > 2 * curve.height
    checkpoint = find_checkpoint(str(out))
    best_folder = out / f"epoch-{checkpoint.best['epoch']:04d}"
    assert checkpoint.best["metric"] == "val_loss"
    assert os.path.samefile(out / BEST_MODEL_FILE, best_folder / MODEL_FILE)
    create_model(None, pretrained=out / BEST_MODEL_FILE, backend="torch")


def test_best_checkpoint_follows_the_metric_and_old_folders_go(tmp_path):
    model = create_model("DiffCLIP-Tiny", backend="torch")
    optimizer = create_optimizer(model, 1e-3, 0.1)
    became_best = []
    for epoch, accuracy in enumerate([0.5, 0.7, 0.6, float("nan")], start=1):
        with torch.no_grad():
            model.logit_scale.fill_(epoch)  # tells the epochs' weights apart
        became_best.append(save_checkpoint(
            str(tmp_path), model, optimizer, epoch=epoch, step=epoch, rng_states=[], args={},
            metric=("zero_shot_top1", accuracy, True)))
    assert became_best == [True, True, False, False]
    assert sorted(name for name in os.listdir(tmp_path) if name.startswith("epoch-")) == [
        "epoch-0002", "epoch-0004"]
    assert load_file(tmp_path / BEST_MODEL_FILE)["logit_scale"].item() == 2
    assert load_file(tmp_path / MODEL_FILE)["logit_scale"].item() == 4
    assert find_checkpoint(str(tmp_path)).best == {
        "folder": "epoch-0002", "epoch": 2, "metric": "zero_shot_top1", "value": 0.7}


def test_without_matplotlib_the_curve_is_skipped_with_a_message(tmp_path, capsys, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails
    assert not save_training_curve([{"epoch": 1, "loss": 1.0}], str(tmp_path / "curve.png"))
    csv_path = write_csv_dataset(tmp_path / "data", count=8)
    assert main(csv_run(csv_path, tmp_path / "run", 2)) == 0
    out = capsys.readouterr().out
    assert out.count(f"matplotlib is not installed: no {CURVE_FILE} is drawn") == 1
    assert not (tmp_path / "run" / CURVE_FILE).exists()
    assert out.strip().splitlines()[-1].endswith(f"{MODEL_FILE}, metrics.jsonl")
