"""Tests of ``python -m diffattn.train`` and ``diffattn.training`` on the CPU (gloo).

- a short 2-process torchrun run writes metrics.jsonl and a checkpoint that create_model loads;
- a run stopped after epoch 1 and resumed ends in the same state as an uninterrupted one;
- DiffCLIPv2-Tiny (V2 attention) trains through the same loop in one process;
- the loss and gradients of 2 gloo ranks (gather with gradients + DDP) equal the
  single-process loss and gradients on the same global batch;
- csv and WebDataset inputs; clear errors for bad inputs; the optimizer's parameter groups, the
  schedule and the logit-scale clamp; RNG states survive a weights_only round trip.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from safetensors.torch import load_file

from diffattn.models import create_model
from diffattn.train import main
from diffattn.training.checkpointing import (MODEL_FILE, STATE_FILE, capture_rng_state,
                                             find_checkpoint, restore_rng_state)
from diffattn.training.loss import ClipLoss
from diffattn.training.metrics import read_metrics
from diffattn.training.optim import (MAX_LOGIT_SCALE, clamp_logit_scale, cosine_multiplier,
                                     exclude_from_weight_decay, parameter_groups)

MODEL = "DiffCLIP-Tiny"
# Digits, 64 training samples, global batch 16: 4 steps per epoch.
SHORT_RUN = ["--data", "digits", "--model", MODEL, "--backend", "torch", "--epochs", "2",
             "--train-subset", "64", "--batch-size", "16", "--seed", "3"]


def torchrun(args: list, nproc: int = 2, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run ``torchrun --standalone --nproc_per_node nproc -m diffattn.train *args``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "diffattn.train", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (f"torchrun failed:\n{result.stdout[-3000:]}\n"
                                    f"{result.stderr[-5000:]}")
    return result


def _saved_state(out) -> dict:
    """The training state of the run directory's current checkpoint."""
    return torch.load(os.path.join(find_checkpoint(str(out)).folder, STATE_FILE),
                      weights_only=True)


@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory):
    """An uninterrupted 2-process, 2-epoch digits run: its directory."""
    out = tmp_path_factory.mktemp("uninterrupted")
    torchrun([*SHORT_RUN, "--out", str(out)])
    return out


# ------------------------------------------------------------------------ distributed runs
@pytest.mark.slow
def test_two_process_run_writes_metrics_and_checkpoint(two_epoch_run):
    records = read_metrics(two_epoch_run)
    assert [record["epoch"] for record in records] == [1, 2]
    assert [record["step"] for record in records] == [4, 8]
    for record in records:
        assert set(record) >= {"epoch", "step", "loss", "lr", "samples_per_s", "zero_shot_top1"}
        assert math.isfinite(record["loss"]) and record["samples_per_s"] > 0
        assert 0.0 <= record["zero_shot_top1"] <= 1.0
        assert 1.0 <= record["logit_scale"] <= MAX_LOGIT_SCALE
    model = create_model(MODEL, pretrained=two_epoch_run / MODEL_FILE, backend="torch")
    saved = load_file(two_epoch_run / MODEL_FILE)
    assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())
    state = _saved_state(two_epoch_run)
    assert (state["epoch"], state["step"], len(state["rng"])) == (2, 8, 2)
    assert not any(name.endswith(".tmp") for name in os.listdir(two_epoch_run))
    # The last checkpoint, and the best one by zero-shot accuracy (which may be the same).
    best_epoch = max(records, key=lambda record: record["zero_shot_top1"])["epoch"]
    assert set(os.listdir(two_epoch_run)) == {
        "best_model.safetensors", "checkpoint.json", "epoch-0002", f"epoch-{best_epoch:04d}",
        MODEL_FILE, "metrics.jsonl", "training_curve.png", "train.lock"}


@pytest.mark.slow
def test_resumed_run_matches_uninterrupted_run(two_epoch_run, tmp_path):
    torchrun([*SHORT_RUN, "--out", str(tmp_path), "--stop-after-epoch", "1"])
    assert [record["epoch"] for record in read_metrics(tmp_path)] == [1]
    torchrun([*SHORT_RUN, "--out", str(tmp_path), "--resume"])
    expected, got = load_file(two_epoch_run / MODEL_FILE), load_file(tmp_path / MODEL_FILE)
    assert expected.keys() == got.keys()
    different = [key for key in expected if not torch.equal(expected[key], got[key])]
    assert not different, f"weights differ after resuming: {different[:5]}"
    expected_state, got_state = _saved_state(two_epoch_run), _saved_state(tmp_path)
    assert got_state["step"] == expected_state["step"]
    for index, moments in expected_state["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(moments[name], got_state["optimizer"]["state"][index][name])
    expected_records, got_records = read_metrics(two_epoch_run), read_metrics(tmp_path)
    for key in ("epoch", "step", "loss", "lr", "zero_shot_top1"):
        assert [r[key] for r in got_records] == [r[key] for r in expected_records], key


def _tiny_batch(global_batch: int):
    """A float64 DiffCLIP-Tiny model (seeded) and a global batch of random images with distinct
    captions (float64, so that only the reduction order differs between the runs)."""
    torch.manual_seed(0)
    model = create_model(MODEL, backend="torch", dtype=torch.float64)
    images = torch.randn(global_batch, 3, 32, 32, dtype=torch.float64)
    captions = [f"a photo of {count} cats and a dog number {count % 3}"
                for count in range(global_batch)]
    return model, images, model.tokenize(captions)[:, :16]


def _loss_worker(rank: int, world_size: int, store: str, out: str, global_batch: int) -> None:
    """One gloo rank: the DDP-wrapped model's loss on its slice; rank 0 saves the mean loss
    over ranks and the (DDP-averaged) gradients."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world_size)
    model, images, tokens = _tiny_batch(global_batch)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    rows = slice(rank * global_batch // world_size, (rank + 1) * global_batch // world_size)
    loss = ClipLoss()(*ddp(images[rows], tokens[rows], normalize=True))
    loss.backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    if rank == 0:
        torch.save({"loss": total / world_size,
                    "grads": {name: p.grad for name, p in model.named_parameters()}}, out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_gathered_loss_and_gradients_equal_single_process(tmp_path):
    global_batch, world_size = 8, 2
    out = tmp_path / "ranks.pt"
    mp.spawn(_loss_worker, args=(world_size, str(tmp_path / "store"), str(out), global_batch),
             nprocs=world_size)
    distributed = torch.load(out, weights_only=True)

    model, images, tokens = _tiny_batch(global_batch)
    loss = ClipLoss()(*model(images, tokens, normalize=True))
    loss.backward()
    torch.testing.assert_close(distributed["loss"], loss.detach(), rtol=1e-12, atol=0)
    for name, param in model.named_parameters():
        # The lambda vectors stay float32 in a float64 model: float32 tolerances for them.
        # atol: k_proj.bias has an exactly-zero gradient (softmax ignores a key bias), which
        # both runs give as rounding noise.
        rtol, atol = (1e-5, 1e-9) if param.dtype == torch.float32 else (1e-9, 1e-14)
        torch.testing.assert_close(distributed["grads"][name], param.grad, rtol=rtol, atol=atol,
                                   msg=lambda text, name=name: f"{name}: {text}")


# ------------------------------------------------------------------------ csv and wds data
def _digit_png(value: int) -> bytes:
    pixels = np.full((12, 12, 3), 20 * value, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_csv_data(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    lines = ["filepath,caption"]
    for index in range(8):
        (images / f"{index}.png").write_bytes(_digit_png(index))
        lines.append(f"images/{index}.png,a grey square number {index}")
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    assert main(["--data", f"csv:{tmp_path / 'train.csv'}", "--backend", "torch", "--epochs", "1",
                 "--batch-size", "4", "--workers", "0", "--out", str(out)]) == 0
    (record,) = read_metrics(out)
    assert record["step"] == 2 and "zero_shot_top1" not in record
    create_model(MODEL, pretrained=out / MODEL_FILE, backend="torch")


def test_webdataset_data(tmp_path):
    import webdataset as wds

    for shard in range(2):
        with wds.TarWriter(str(tmp_path / f"shard-{shard}.tar")) as writer:
            for index in range(6):
                writer.write({"__key__": f"s{shard}_{index:03d}", "png": _digit_png(index),
                              "txt": f"a grey square number {index}"})
    out = tmp_path / "run"
    assert main(["--data", f"wds:{tmp_path}/shard-{{0..1}}.tar", "--backend", "torch",
                 "--epochs", "2", "--batch-size", "4", "--train-num-samples", "12",
                 "--workers", "2", "--out", str(out)]) == 0
    assert [(record["epoch"], record["step"]) for record in read_metrics(out)] == [(1, 3), (2, 6)]


def test_v2_model_trains_and_its_checkpoint_loads(tmp_path):
    """DiffCLIPv2-Tiny (Differential Transformer V2 attention) through the same loop: one
    step in one process, a finite loss, and a model file create_model reads back."""
    out = tmp_path / "run"
    assert main(["--data", "digits", "--model", "DiffCLIPv2-Tiny", "--backend", "torch",
                 "--epochs", "1", "--train-subset", "16", "--batch-size", "16",
                 "--out", str(out)]) == 0
    (record,) = read_metrics(out)
    assert record["step"] == 1 and math.isfinite(record["loss"])
    assert 0.0 <= record["zero_shot_top1"] <= 1.0
    model = create_model("DiffCLIPv2-Tiny", pretrained=out / MODEL_FILE, backend="torch")
    saved = load_file(out / MODEL_FILE)
    assert "transformer.resblocks.0.attn.lambda_proj.weight" in saved
    assert all(torch.equal(value, saved[key]) for key, value in model.state_dict().items())


def test_compile_wraps_the_model_with_the_mode_and_batches_are_trimmed(tmp_path, monkeypatch):
    """--compile hands the model to torch.compile with --compile-mode (recorded here instead
    of compiling, which the GPU tests do); each batch's tokens keep only the columns its
    longest caption needs."""
    import diffattn.training.cli as train_module
    compiled, widths = [], []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: compiled.append(mode) or model)
    step = train_module._train_step

    def recording_step(model, unwrapped, loss_fn, optimizer, scheduler, images, tokens, *rest):
        widths.append(tokens.shape[1])
        return step(model, unwrapped, loss_fn, optimizer, scheduler, images, tokens, *rest)

    monkeypatch.setattr(train_module, "_train_step", recording_step)
    assert main(["--data", "digits", "--backend", "torch", "--epochs", "1", "--train-subset",
                 "16", "--batch-size", "16", "--compile", "--compile-mode", "max-autotune",
                 "--out", str(tmp_path / "run")]) == 0
    assert compiled == ["max-autotune"]
    assert widths and all(4 <= width < 77 for width in widths)


def test_compile_mode_arguments_are_checked(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        main(["--data", "digits", "--compile-mode", "reduce-overhead", "--out", str(tmp_path)])
    assert "--compile-mode reduce-overhead needs --compile" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        main(["--data", "digits", "--compile", "--compile-mode", "reduce-overhead", "--out",
              str(tmp_path)])
    assert "runs in one process only" in capsys.readouterr().err


# ------------------------------------------------------------------------ bad inputs
def _fails(argv: list, match: str, capsys) -> str:
    """Run the command line, expecting exit status 1 and one ``error:`` line holding
    ``match``; returns that line."""
    capsys.readouterr()
    assert main(argv) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and match in errors[0], errors
    return errors[0]


def test_global_batch_not_divisible_by_world_size(tmp_path, monkeypatch, capsys):
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0"),
                        ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    _fails(["--data", "digits", "--backend", "torch", "--batch-size", "15", "--out",
            str(tmp_path)],
           "--batch-size 15 (the global batch) is not divisible by the world size 2", capsys)


@pytest.mark.parametrize("data, match", [
    ("imagenet:/data", "unknown --data scheme 'imagenet'"),
    ("csv:/no/such/file.csv", "file not found: '/no/such/file.csv'"),
    ("wds:/no/such/shard-{0..1}.tar", "2 of 2 shard file(s) not found"),
])
def test_bad_data(tmp_path, data, match, capsys):
    _fails(["--data", data, "--backend", "torch", "--train-num-samples", "8", "--out",
            str(tmp_path)] if data.startswith("wds") else
           ["--data", data, "--backend", "torch", "--out", str(tmp_path)], match, capsys)


def test_empty_and_too_small_datasets(tmp_path, capsys):
    (tmp_path / "empty.csv").write_text("filepath,caption\n")
    _fails(["--data", f"csv:{tmp_path / 'empty.csv'}", "--out", str(tmp_path / "a")],
           "lists no images (empty dataset)", capsys)
    (tmp_path / "other.csv").write_text("path,text\nx.png,a\n")
    _fails(["--data", f"csv:{tmp_path / 'other.csv'}", "--out", str(tmp_path / "b")],
           "has no column(s) ['filepath', 'caption']", capsys)
    _fails(["--data", "digits", "--train-subset", "8", "--batch-size", "16", "--out",
            str(tmp_path / "c")], "fewer than one global batch of 16", capsys)
    import webdataset as wds

    wds.TarWriter(str(tmp_path / "empty.tar")).close()
    _fails(["--data", f"wds:{tmp_path / 'empty.tar'}", "--train-num-samples", "8",
            "--batch-size", "4", "--workers", "0", "--out", str(tmp_path / "d")],
           "gave no samples (empty dataset?)", capsys)


def test_a_folder_of_other_files_is_refused(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text("")
    _fails(["--data", "digits", "--out", str(tmp_path)],
           "holds files that no training run wrote (metrics.jsonl)", capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_an_error(tmp_path, capsys):
    _fails(["--data", "digits", "--device", "cuda", "--out", str(tmp_path)],
           "--device cuda: CUDA is not available on this machine", capsys)


def test_argument_errors_are_one_error_line(tmp_path, capsys):
    (tmp_path / "templates.txt").write_text("a {} photo\na {x} photo of {}\n")
    for argv, message in (
            (["--templates", str(tmp_path / "templates.txt")], "not so: 'a {x} photo of {}'"),
            (["--epochs", "0"], "--epochs must be >= 1, got 0"),
            (["--out", ""], "--out must name the run's directory, got ''")):
        argv = ["--data", "digits", "--out", str(tmp_path / "run"), *argv]
        with pytest.raises(SystemExit) as exit:
            main(argv)
        err = capsys.readouterr().err
        assert exit.value.code == 2 and "Traceback" not in err and "usage:" not in err
        assert err.splitlines() == [line for line in err.splitlines()
                                    if line.startswith("error:")] and len(err.splitlines()) == 1
        assert message in err and "(see python -m diffattn.train --help)" in err
    assert not (tmp_path / "run").exists()


def test_pretrained_weights_that_are_not_finite_are_an_error(tmp_path, capsys):
    from diffattn.models import save_pretrained

    model = create_model("CLIP-Tiny")
    with torch.no_grad():
        model.visual.blocks[0].mlp.fc1.weight[0, 0] = float("nan")
    save_pretrained(model, tmp_path / "nan.safetensors")
    _fails(["--data", "digits", "--pretrained", str(tmp_path / "nan.safetensors"), "--out",
            str(tmp_path / "run")], "'visual.blocks.0.mlp.fc1.weight' has 1 of", capsys)


def test_a_device_that_is_no_device_is_an_error_and_creates_nothing(tmp_path, capsys):
    _fails(["--data", "digits", "--device", "nonsense", "--out", str(tmp_path / "run")],
           "--device 'nonsense' is not a device: expected cpu, cuda or cuda:N", capsys)
    assert not (tmp_path / "run").exists()


def test_out_naming_a_file_is_an_error(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    _fails(["--data", "digits", "--out", str(tmp_path / "file")],
           f"--out {str(tmp_path / 'file')!r} is a file", capsys)


# ------------------------------------------------------------------------ pieces
def test_weight_decay_groups():
    model = create_model(MODEL, backend="torch")
    decayed, exempt = (group["params"] for group in parameter_groups(model, 0.1))
    names = {id(param): name for name, param in model.named_parameters()}
    exempt_names = {names[id(param)] for param in exempt}
    decayed_names = {names[id(param)] for param in decayed}
    for name in ("logit_scale", "token_embedding.weight", "positional_embedding",
                 "visual.pos_embed", "visual.cls_token", "visual.blocks.0.attn.lambda_vectors",
                 "visual.blocks.0.attn.diff_norm.weight", "visual.blocks.0.norm1.bias",
                 "visual.blocks.0.attn.in_proj_bias",
                 "transformer.resblocks.1.mlp.c_fc.bias", "ln_final.weight"):
        assert name in exempt_names, name
    for name in ("visual.patch_embed.proj.weight", "visual.blocks.0.attn.in_proj_weight",
                 "transformer.resblocks.0.mlp.c_proj.weight", "text_projection",
                 "image_projection"):
        assert name in decayed_names, name
    assert exclude_from_weight_decay("visual.class_embedding", torch.empty(4, 4))


def test_cosine_schedule_and_logit_clamp():
    assert cosine_multiplier(0, 10, 100) == pytest.approx(0.1)
    assert cosine_multiplier(9, 10, 100) == pytest.approx(1.0)
    assert cosine_multiplier(55, 10, 100) == pytest.approx(0.5)
    assert cosine_multiplier(100, 10, 100) == pytest.approx(0.0)
    model = create_model(MODEL, backend="torch")
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    clamp_logit_scale(model)
    assert model.logit_scale.exp().item() == pytest.approx(MAX_LOGIT_SCALE)


def test_rng_state_round_trip_is_weights_only(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    torch.save([capture_rng_state(torch.device("cpu"))], tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(()).item())
    (state,) = torch.load(tmp_path / "rng.pt", weights_only=True)
    restore_rng_state(state, torch.device("cpu"))
    assert (random.random(), np.random.rand(), torch.rand(()).item()) == expected


def test_unknown_model_name_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--data", "digits", "--model", "NoSuchModel", "--out", str(tmp_path)])
    assert "invalid choice: 'NoSuchModel'" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_refuses_another_model_or_a_foreign_model_file(two_epoch_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(two_epoch_run, run)
    resume = [*SHORT_RUN, "--epochs", "3", "--resume", "--out", str(run)]
    _fails([*resume, "--model", "CLIP-Tiny"],
           "--model 'CLIP-Tiny' (the run was saved with 'DiffCLIP-Tiny')", capsys)
    _fails([*resume, "--model", "CLIP-Tiny", "--allow-changed-args"],
           "--resume continues the model of the checkpoint, which cannot be changed", capsys)
    folder_model = run / "epoch-0002" / MODEL_FILE
    folder_model.write_bytes(folder_model.read_bytes()[:-4] + b"\0\0\0\0")
    _fails(resume, "is not the model file", capsys)


def test_help_gives_every_default():
    from diffattn.training.cli import build_parser

    parser = build_parser()
    formatter = parser._get_formatter()
    for action in parser._actions:
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS):
            text = formatter._expand_help(action)
            assert "default" in text, f"{action.option_strings[0]}: {text!r}"
    assert "(default: 0.0005)" in parser.format_help()
