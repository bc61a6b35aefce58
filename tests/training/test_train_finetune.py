"""Fine-tuning from the command line: ``--pretrained`` with ``--attention`` (a plain CLIP file
warm-starting DiffCLIP), the checkpoint evaluated and resumed without repeating them;
``--data folder:ROOT`` (class names and caption files); per-epoch validation retrieval
recall and ``--val-zeroshot`` accuracy against independent computations on the saved
checkpoint; the ``--workers`` default."""
from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

from diffattn.eval import main as eval_main
from diffattn.models import create_model
from diffattn.train import main
from diffattn.training.checkpointing import MODEL_FILE, load_training_state
from diffattn.training.cli import default_workers
from diffattn.training.data import DataError, read_folder_captions
from diffattn.training.metrics import read_metrics

from _training_data import one_thread  # noqa: F401 (autouse)
from _training_data import csv_run, error_lines, one_training_thread, png_bytes, write_csv_dataset

CLASSES = ("cat", "dog")


def _class_tree(root, per_class: int = 3):
    for offset, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i}.png").write_bytes(png_bytes(10 * offset + i))
    return root


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A plain CLIP-Tiny file fine-tuned into DiffCLIP for 1 epoch of a 2-epoch schedule on 16
    CSV rows (4 held out), with --val-zeroshot on two class folders: (folder, csv path, run,
    plain file, zero-shot root)."""
    folder = tmp_path_factory.mktemp("finetune")
    csv_path = write_csv_dataset(folder / "data", count=16)
    plain = folder / "clip_tiny_plain.pt"
    torch.manual_seed(0)
    torch.save(create_model("CLIP-Tiny").state_dict(), plain)
    zero_shot = _class_tree(folder / "zero_shot")
    with one_training_thread():
        assert main(csv_run(csv_path, folder / "run", 2, "--model", "CLIP-Tiny",
                            "--pretrained", str(plain), "--attention", "diff",
                            "--val-fraction", "0.25", "--val-zeroshot", str(zero_shot),
                            "--stop-after-epoch", "1")) == 0
    return folder, csv_path, folder / "run", plain, zero_shot


def test_a_plain_file_fine_tuned_with_attention_diff_is_evaluated_without_flags(
        finetuned, capsys):
    folder, _, run, plain, zero_shot = finetuned
    model = create_model(None, str(run / MODEL_FILE))
    assert model.config.attention == "diff" and len(model.attention_layers()) == 4
    # the projections started from the plain file: fine-tuning moved them only a little
    start = torch.load(plain, weights_only=True)["visual.blocks.0.attn.in_proj_weight"]
    tuned = model.visual.blocks[0].attn.in_proj_weight.detach()
    assert (tuned - start).abs().max() < 0.1 * start.abs().max()
    saved = load_training_state(str(run / "epoch-0001"))["args"]
    assert (saved["model"], saved["pretrained"], saved["attention"]) == \
        ("CLIP-Tiny", str(plain), "diff")
    out = folder / "classify.json"
    assert eval_main(["classify", "--pretrained", str(run / MODEL_FILE), "--images",
                      str(zero_shot), "--templates", "simple", "--no-progress",
                      "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["attention"] == "diff"
    record = read_metrics(run)[-1]
    # --val-zeroshot recorded what the evaluation command computes on the same checkpoint
    for key, value in result["metrics"].items():
        assert record[f"val_zeroshot_{key}"] == value, key
    capsys.readouterr()


def test_resume_needs_no_model_flags_and_refuses_a_changed_attention(finetuned, tmp_path,
                                                                      capsys):
    _, csv_path, run, plain, zero_shot = finetuned
    out = shutil.copytree(run, tmp_path / "run")
    common = ("--val-fraction", "0.25", "--val-zeroshot", str(zero_shot))
    capsys.readouterr()
    for extra in (("--attention", "diff2"), ("--attention", "diff2", "--allow-changed-args"),
                  ("--pretrained", str(tmp_path / "other.pt"))):
        assert main(csv_run(csv_path, out, 2, "--resume", *common, *extra)) == 1
        (error,) = error_lines(capsys)
        assert (f"--{extra[0][2:]} '{extra[1]}' (the run was saved with "
                f"'{'diff' if extra[0] == '--attention' else plain}')") in error, error
    assert [record["epoch"] for record in read_metrics(out)] == [1]
    assert main(csv_run(csv_path, out, 2, "--resume", *common)) == 0
    assert [record["epoch"] for record in read_metrics(out)] == [1, 2]
    assert create_model(None, str(out / MODEL_FILE)).config.attention == "diff"


def _numpy_recall(image_features, text_features, k: int) -> tuple:
    """(image, text) retrieval recall@k of pairs i <-> i: stable ranking by cosine score."""
    scores = text_features @ image_features.T                        # (captions, images)
    image_hits = [i in np.argsort(-row, kind="stable")[:k] for i, row in enumerate(scores)]
    text_hits = [i in np.argsort(-row, kind="stable")[:k] for i, row in enumerate(scores.T)]
    return float(np.mean(image_hits)), float(np.mean(text_hits))


def test_validation_retrieval_equals_an_independent_computation(finetuned):
    folder, csv_path, run, _, _ = finetuned
    record = read_metrics(run)[0]
    rows = [line.split(",", 1) for line in csv_path.read_text().splitlines()[1:]]
    held_out = sorted(random.Random(0).sample(range(len(rows)), 4))  # the fixed split
    model = create_model(None, str(run / MODEL_FILE), backend="torch").eval()
    with torch.no_grad():
        images = torch.stack([model.preprocess(str(csv_path.parent / rows[i][0]))
                              for i in held_out])
        image_features = model.encode_image(images, normalize=True).numpy()
        text_features = model.encode_text(model.tokenize([rows[i][1] for i in held_out]),
                                          normalize=True).numpy()
    for k in (1, 5, 10):
        image_recall, text_recall = _numpy_recall(image_features, text_features, k)
        assert record[f"val_image_retrieval_recall@{k}"] == pytest.approx(image_recall)
        assert record[f"val_text_retrieval_recall@{k}"] == pytest.approx(text_recall)
    assert {"val_loss", "val_zeroshot_acc1", "val_zeroshot_acc5",
            "val_zeroshot_mean_per_class_recall"} <= set(record)
    assert (run / "training_curve.png").is_file()


def test_folder_data_captions_from_class_names_or_caption_files(tmp_path, capsys):
    root = _class_tree(tmp_path / "images", per_class=4)
    (root / "dog" / "1.txt").write_text("a dog on a sofa\nthe dog sleeps\n", encoding="utf-8")
    (root / "dog" / "notes.md").write_text("not an image")
    paths, captions = read_folder_captions(str(root), ("a photo of a {}.", "a {}."))
    assert paths == [str(root / name / f"{i}.png") for name in CLASSES for i in range(4)]
    assert captions[0] == ("a photo of a cat.", "a cat.")
    assert captions[5] == ("a dog on a sofa", "the dog sleeps")  # the caption file wins
    assert captions[6] == ("a photo of a dog.", "a dog.")
    # images directly in the root need caption files
    (root / "loose.png").write_bytes(png_bytes(3))
    with pytest.raises(DataError, match="loose.png.*has no caption file 'loose.txt'"):
        read_folder_captions(str(root), ("{}",))
    (root / "loose.txt").write_text("a loose grey square\n", encoding="utf-8")
    paths, captions = read_folder_captions(str(root), ("{}",))
    assert paths[0] == str(root / "loose.png") and captions[0] == ("a loose grey square",)
    for bad, message in ((tmp_path / "missing", "no such folder"),
                         (tmp_path / "empty", "holds no image files")):
        (tmp_path / "empty").mkdir(exist_ok=True)
        with pytest.raises(DataError, match=message):
            read_folder_captions(str(bad), ("{}",))
    # a short run on it: training, validation pairs and a best checkpoint
    assert main(["--data", f"folder:{root}", "--backend", "torch", "--batch-size", "4",
                 "--warmup", "1", "--epochs", "1", "--val-fraction", "0.3", "--templates",
                 "imagenet", "--out", str(tmp_path / "run")]) == 0
    (record,) = read_metrics(tmp_path / "run")
    assert record["val_image_retrieval_recall@1"] is not None and record["val_loss"] > 0
    assert main(["--data", f"folder:{tmp_path / 'missing'}", "--out",
                 str(tmp_path / "run2")]) == 1
    assert "no such folder" in error_lines(capsys)[0]


def test_folder_readers_of_training_and_evaluation_follow_the_same_links(tmp_path, capsys):
    from diffattn.evaluation.datasets import read_image_folder

    root = _class_tree(tmp_path / "images", per_class=2)
    outside = _class_tree(tmp_path / "elsewhere", per_class=1)
    (root / "bird").symlink_to(outside / "cat", target_is_directory=True)  # a linked class
    (root / "dog" / "more").symlink_to(outside / "dog", target_is_directory=True)
    (root / "cat" / "0.png").unlink()
    (root / "cat" / "0.png").symlink_to(outside / "cat" / "0.png")  # a linked file
    paths, captions = read_folder_captions(str(root), ("{}",))
    evaluated = read_image_folder(str(root))
    assert sorted(paths) == evaluated.paths
    assert evaluated.classnames == ["bird", "cat", "dog"]
    assert sorted({choices[0] for choices in captions}) == ["bird", "cat", "dog"]
    assert str(root / "dog" / "more" / "0.png") in paths
    # a link to a folder above it is refused by name in both, not walked forever
    (root / "dog" / "loop").symlink_to(root, target_is_directory=True)
    for read in (lambda: read_folder_captions(str(root), ("{}",)),
                 lambda: read_image_folder(str(root))):
        with pytest.raises(ValueError, match=f"'{root / 'dog' / 'loop'}' is a symbolic link "
                                             f"to '{root}', a folder that holds it"):
            read()
    (root / "dog" / "loop").unlink()
    assert main(["--data", f"folder:{root}", "--backend", "torch", "--batch-size", "4",
                 "--warmup", "1", "--epochs", "1", "--templates", str(_templates(tmp_path)),
                 "--out", str(tmp_path / "run")]) == 0
    capsys.readouterr()


def _templates(folder):
    path = folder / "templates.txt"
    path.write_text("a photo of a {c}.\n")
    return path


def test_workers_default_is_zero_on_the_cpu():
    assert default_workers(torch.device("cpu"), "csv:x.csv") == 0
    assert default_workers(torch.device("cuda"), "digits") == 0
    assert 0 <= default_workers(torch.device("cuda"), "csv:x.csv") <= 4


def test_evaluation_does_not_import_training():
    """The dependency is one-way: training uses diffattn.evaluation, never the reverse."""
    import subprocess
    import sys

    code = ("import sys, diffattn.eval, diffattn.evaluation.features, "
            "diffattn.evaluation.digits_export; "
            "print(sorted(m for m in sys.modules if m.startswith('diffattn.training')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


def test_a_file_without_config_needs_model(finetuned, tmp_path, capsys):
    _, csv_path, _, plain, _ = finetuned
    capsys.readouterr()
    assert main(csv_run(csv_path, tmp_path / "run", 1, "--pretrained", str(plain),
                        "--attention", "diff")) == 1
    (error,) = error_lines(capsys)
    assert "holds no config" in error and "--model NAME" in error
