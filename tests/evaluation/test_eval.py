"""python -m diffattn.eval and diffattn.evaluation: each metric against an independent numpy /
scikit-learn computation, the commands end to end on a few generated images with random-init
CLIP-Tiny / DiffCLIP-Tiny (their JSON against the same metrics computed through the public
API), the result files, the comparison table and every ``error:`` path."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import balanced_accuracy_score

from diffattn.eval import main
from diffattn.evaluation import classification_metrics, linear_probe, retrieval_recall
from diffattn.evaluation.datasets import (EvalDataError, imagenet_classes, read_imagenet_folder,
                                         read_templates)
from diffattn.evaluation.results import compare_table, read_result, write_result
from diffattn.models import build_zero_shot_classifier, create_model, save_pretrained
from diffattn.models.imagenet_classes import IMAGENET_CLASSNAMES

CLASSES = ("cat", "dog", "fish")
ARGS = ["--device", "cpu", "--backend", "torch", "--no-progress"]


# ---------------------------------------------------------------- metrics against numpy
def _numpy_topk_accuracy(logits, labels, k):
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float(np.mean([label in row for row, label in zip(order, labels)]))


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("num_classes", [3, 7])
def test_classification_metrics_match_numpy_and_sklearn(num_classes):
    rng = np.random.default_rng(num_classes)
    logits = rng.normal(size=(41, num_classes))
    labels = rng.integers(0, num_classes - 1, size=41)  # the last class has no sample
    metrics = classification_metrics(torch.from_numpy(logits), torch.from_numpy(labels))
    assert metrics["acc1"] == pytest.approx(_numpy_topk_accuracy(logits, labels, 1))
    if num_classes >= 5:
        assert metrics["acc5"] == pytest.approx(_numpy_topk_accuracy(logits, labels, 5))
    else:
        assert metrics["acc5"] is None
    assert metrics["mean_per_class_recall"] == pytest.approx(
        balanced_accuracy_score(labels, logits.argmax(axis=1)))
    with pytest.raises(ValueError, match="labels"):
        classification_metrics(torch.from_numpy(logits), torch.full((41,), num_classes))


def _numpy_recall(image_features, text_features, text_image, k):
    """clip_benchmark's definitions with numpy's stable sort."""
    image_features = image_features / np.linalg.norm(image_features, axis=1, keepdims=True)
    text_features = text_features / np.linalg.norm(text_features, axis=1, keepdims=True)
    scores = text_features @ image_features.T                               # (T, I)
    top_images = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    image_recall = np.mean([image in row for image, row in zip(text_image, top_images)])
    top_texts = np.argsort(-scores.T, axis=1, kind="stable")[:, :k]
    text_recall = np.mean([np.any(text_image[row] == image) for image, row in enumerate(top_texts)])
    return image_recall, text_recall


@pytest.mark.parametrize("duplicates", [False, True])
def test_retrieval_recall_matches_numpy(duplicates):
    rng = np.random.default_rng(1)
    images = rng.normal(size=(13, 8)).astype(np.float32)
    text_image = np.concatenate([np.arange(13), rng.integers(0, 13, size=12)])
    texts = (images[text_image] + rng.normal(size=(25, 8)) * 1.5).astype(np.float32)
    if duplicates:  # equal captions (equal features): ties, ranked in index order
        texts[13:20] = texts[0]
        images[5] = images[2]
    for chunk_size in (4, 1024):
        metrics = retrieval_recall(torch.from_numpy(images), torch.from_numpy(texts),
                                   torch.from_numpy(text_image), (1, 2, 5, 30),
                                   chunk_size=chunk_size)
        for k in (1, 2, 5, 30):
            image_recall, text_recall = _numpy_recall(images, texts, text_image, k)
            assert metrics[f"image_retrieval_recall@{k}"] == pytest.approx(image_recall)
            assert metrics[f"text_retrieval_recall@{k}"] == pytest.approx(text_recall)
    assert metrics["image_retrieval_recall@30"] == metrics["text_retrieval_recall@30"] == 1.0
    with pytest.raises(ValueError, match="images \\[3\\] have none"):
        retrieval_recall(torch.from_numpy(images[:4]), torch.from_numpy(texts[:3]),
                         torch.arange(3))


def test_linear_probe_matches_sklearn_with_the_chosen_c():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(2)
    centres = rng.normal(size=(4, 6)) * 2
    train_y, test_y = rng.integers(0, 4, size=80), rng.integers(0, 4, size=30)
    train_x = centres[train_y] + rng.normal(size=(80, 6))
    test_x = centres[test_y] + rng.normal(size=(30, 6))
    probe = linear_probe(torch.from_numpy(train_x), torch.from_numpy(train_y),
                         torch.from_numpy(test_x), torch.from_numpy(test_y))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    predictions = LogisticRegression(C=probe["C"], max_iter=1000).fit(
        unit(train_x), train_y).predict(unit(test_x))
    assert probe["metrics"]["acc1"] == pytest.approx(np.mean(predictions == test_y))
    assert probe["metrics"]["mean_per_class_recall"] == pytest.approx(
        balanced_accuracy_score(test_y, predictions))
    assert probe["metrics"]["acc1"] > 0.6 and probe["metrics"]["acc5"] is None
    with pytest.raises(ValueError, match="without training samples"):
        no_class_1 = np.where(train_y == 1, 0, train_y)
        linear_probe(torch.from_numpy(train_x), torch.from_numpy(no_class_1),
                     torch.from_numpy(test_x), torch.from_numpy(test_y))


def test_imagenet_variants_have_clip_benchmarks_classes(tmp_path):
    for dataset, count in [("imagenet", 1000), ("imagenet-v2", 1000), ("imagenet-sketch", 1000),
                           ("imagenet-a", 200), ("imagenet-r", 200)]:
        folders, names = imagenet_classes(dataset)
        assert len(folders) == len(names) == count
    folders, names = imagenet_classes("imagenet-a")
    assert (folders[0], names[0]) == ("n01498041", "stingray")
    assert names[-1] == IMAGENET_CLASSNAMES[988] and folders[-1] == "n12267677"
    assert imagenet_classes("imagenet-r")[1][:2] == ["goldfish", "great white shark"]
    for wnid in ("n01498041", "n12267677"):
        _write_png(tmp_path / "a" / wnid / "x.png", 0)
    data = read_imagenet_folder(str(tmp_path / "a"), "imagenet-a")
    assert data.labels == [0, 199] and len(data.classnames) == 200
    _write_png(tmp_path / "v2" / "999" / "x.png", 0)
    assert read_imagenet_folder(str(tmp_path / "v2"), "imagenet-v2").labels == [999]
    with pytest.raises(EvalDataError, match="n01440764.*is not a class of imagenet-a"):
        _write_png(tmp_path / "a" / "n01440764" / "x.png", 0)  # tench: not in ImageNet-A
        read_imagenet_folder(str(tmp_path / "a"), "imagenet-a")


# ---------------------------------------------------------------- the commands end to end
def _write_png(path, seed, size=(12, 10)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _class_tree(root, per_class=2, seed=0):
    for c, name in enumerate(CLASSES):
        for i in range(per_class):
            _write_png(root / name / f"{i}.png", seed + 10 * c + i)
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random-init CLIP-Tiny saved as a diffattn file, and the model itself."""
    torch.manual_seed(0)
    model = create_model("CLIP-Tiny", backend="torch").eval()
    path = tmp_path_factory.mktemp("weights") / "clip_tiny.safetensors"
    save_pretrained(model, path)
    return str(path), model


def _run(argv, capsys):
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def _error_lines(err):
    return [line for line in err.splitlines() if line.startswith("error:")]


@torch.no_grad()
def _features(model, paths):
    return model.encode_image(torch.stack([model.preprocess(p) for p in paths]), normalize=True)


def test_classify_json_matches_the_public_api(tmp_path, weights, capsys):
    path, model = weights
    root = _class_tree(tmp_path / "images", per_class=3)
    out = tmp_path / "result.json"
    status, stdout, _ = _run(["classify", "--pretrained", path, "--images", str(root),
                              "--templates", "simple", "--out", str(out), *ARGS], capsys)
    assert status == 0 and "acc1" in stdout
    result = json.loads(out.read_text())
    assert set(result) >= {"task", "model", "pretrained", "dataset", "metrics", "num_samples"}
    assert (result["task"], result["model"], result["dataset"], result["num_samples"]) == \
        ("zeroshot_classification", "CLIP-Tiny", "images", 9)
    assert set(result["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert result["metrics"]["acc5"] is None  # 3 classes
    paths = [str(root / name / f"{i}.png") for name in CLASSES for i in range(3)]
    labels = np.repeat(np.arange(3), 3)
    from diffattn.models.imagenet_classes import SIMPLE_IMAGENET_TEMPLATES
    classifier = build_zero_shot_classifier(model, CLASSES, SIMPLE_IMAGENET_TEMPLATES)
    predictions = (_features(model, paths) @ classifier).argmax(dim=1).numpy()
    assert result["metrics"]["acc1"] == pytest.approx(np.mean(predictions == labels))
    assert result["metrics"]["mean_per_class_recall"] == pytest.approx(
        balanced_accuracy_score(labels, predictions))

    # the same set as a CSV with class indices, and class names and templates from files
    table = tmp_path / "labels.csv"
    table.write_text("filepath,label\n" + "".join(
        f"{p},{label}\n" for p, label in zip(paths, labels)))
    (tmp_path / "names.txt").write_text("kitten\npuppy\ngoldfish\n")
    (tmp_path / "templates.txt").write_text("a photo of a {}.\n")
    status, _, _ = _run(["classify", "--pretrained", path, "--csv", str(table),
                         "--classnames", str(tmp_path / "names.txt"),
                         "--templates", str(tmp_path / "templates.txt"), "--out", str(out),
                         *ARGS], capsys)
    assert status == 0  # replaces its own result file
    classifier = build_zero_shot_classifier(model, ["kitten", "puppy", "goldfish"],
                                            ["a photo of a {}."])
    predictions = (_features(model, paths) @ classifier).argmax(dim=1).numpy()
    assert read_result(str(out))["metrics"]["acc1"] == pytest.approx(np.mean(predictions == labels))


def test_retrieve_json_matches_numpy_on_public_api_features(tmp_path, weights, capsys):
    path, model = weights
    paths = []
    for i in range(5):
        _write_png(tmp_path / "img" / f"{i}.png", 100 + i)
        paths.append(str(tmp_path / "img" / f"{i}.png"))
    rows = [(f"img/{i}.png", caption) for i in range(5)
            for caption in (f"a photo of thing {i}", f"picture number {i * 7}")]
    with open(tmp_path / "captions.csv", "w", newline="") as file:
        csv.writer(file).writerows([("filepath", "caption"), *rows])
    out = tmp_path / "retrieval.json"
    status, _, _ = _run(["retrieve", "--pretrained", path, "--csv", str(tmp_path / "captions.csv"),
                         "--recall-k", "1", "2", "--out", str(out), *ARGS], capsys)
    assert status == 0
    result = read_result(str(out))
    assert (result["task"], result["num_samples"], result["num_captions"]) == \
        ("zeroshot_retrieval", 5, 10)
    assert set(result["metrics"]) == {f"{kind}_retrieval_recall@{k}"
                                      for kind in ("image", "text") for k in (1, 2)}
    with torch.no_grad():
        texts = model.encode_text(model.tokenize([c for _, c in rows]), normalize=True).numpy()
    text_image = np.repeat(np.arange(5), 2)
    for k in (1, 2):
        image_recall, text_recall = _numpy_recall(_features(model, paths).numpy(), texts,
                                                  text_image, k)
        assert result["metrics"][f"image_retrieval_recall@{k}"] == pytest.approx(image_recall)
        assert result["metrics"][f"text_retrieval_recall@{k}"] == pytest.approx(text_recall)


def test_linear_probe_command_and_compare_table(tmp_path, weights, capsys):
    path, _ = weights
    train = _class_tree(tmp_path / "train", per_class=4)
    test = _class_tree(tmp_path / "test", per_class=2, seed=50)
    status, _, _ = _run(["linear-probe", "--pretrained", path, "--train", str(train), "--test",
                         str(test), "--dataset", "tiny", "--out", str(tmp_path / "a.json"),
                         *ARGS], capsys)
    assert status == 0
    result = read_result(str(tmp_path / "a.json"))
    assert (result["task"], result["num_samples"], result["num_train_samples"]) == \
        ("linear_probe", 6, 12)
    assert set(result["metrics"]) == {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall"}
    assert 0 <= result["metrics"]["lp_acc1"] <= 1 and result["C"] > 0

    other = dict(result, model="DiffCLIP-Tiny", metrics={"lp_acc1": 0.75, "lp_acc5": None,
                                                         "lp_mean_per_class_recall": 0.5})
    write_result(str(tmp_path / "b.json"), other)
    status, table, _ = _run(["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")],
                            capsys)
    assert status == 0
    lines = table.splitlines()
    assert "CLIP-Tiny (clip_tiny.safetensors)" in lines[0] and "DiffCLIP-Tiny" in lines[0]
    assert "difference" in lines[0]
    acc1 = next(line for line in lines if " lp_acc1 " in line)
    assert acc1.split()[:3] == ["tiny", "linear_probe", "lp_acc1"]
    assert acc1.split()[-2] == "75.00"
    assert acc1.split()[-1] == f"{100 * (0.75 - result['metrics']['lp_acc1']):+.2f}"
    assert next(line for line in lines if " lp_acc5 " in line).split()[-1] == "-"
    assert compare_table([result]).splitlines()[0].split()[-1] == "(clip_tiny.safetensors)"


def test_random_weights_warn_and_diffclip_tiny_runs(tmp_path, capsys):
    root = _class_tree(tmp_path / "images", per_class=1)
    status, out, err = _run(["classify", "--model", "DiffCLIP-Tiny", "--images", str(root),
                             "--templates", "simple", *ARGS], capsys)
    assert status == 0 and "warning: no --pretrained" in err and "DiffCLIP-Tiny" in out


def test_attention_makes_a_plain_file_differential(tmp_path, weights, capsys):
    path, _ = weights  # plain CLIP-Tiny
    root = _class_tree(tmp_path / "images", per_class=1)
    for attention in ("diff", "diff2"):
        out = tmp_path / f"{attention}.json"
        status, _, err = _run(["classify", "--pretrained", path, "--attention", attention,
                               "--images", str(root), "--templates", "simple", "--out", str(out),
                               *ARGS], capsys)
        assert status == 0, err
        assert "warning:" in err and "Traceback" not in err  # the warm start's list of new tensors
        assert read_result(str(out))["attention"] == attention


def test_unreadable_images_are_skipped_up_to_the_limit(tmp_path, weights, capsys):
    path, _ = weights
    root = _class_tree(tmp_path / "images", per_class=3)
    (root / "dog" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "r.json"
    status, _, err = _run(["classify", "--pretrained", path, "--images", str(root), "--out",
                           str(out), "--max-unreadable-fraction", "0.2", *ARGS], capsys)
    assert status == 0 and f"skipped unreadable image {root / 'dog' / 'broken.png'}" in err
    result = read_result(str(out))
    assert (result["num_samples"], result["num_unreadable"]) == (9, 1)
    status, _, err = _run(["classify", "--pretrained", path, "--images", str(root), *ARGS],
                          capsys)
    assert status == 2 and len(_error_lines(err)) == 1
    assert "1 of 10 image files could not be read" in _error_lines(err)[0]
    assert "broken.png" in _error_lines(err)[0]

    # retrieval: the captions of an unreadable (here: missing) image are left out with it
    (tmp_path / "captions.csv").write_text(
        "filepath,caption\nimages/cat/0.png,a\nimages/cat/0.png,b\nimages/gone.png,c\n"
        "images/dog/1.png,d\n")
    status, _, err = _run(["retrieve", "--pretrained", path, "--csv",
                           str(tmp_path / "captions.csv"), "--max-unreadable-fraction", "0.5",
                           "--out", str(out), *ARGS], capsys)
    assert status == 0 and "gone.png: file not found" in err
    result = read_result(str(out))
    assert (result["num_samples"], result["num_captions"], result["num_unreadable"]) == (2, 3, 1)


# ---------------------------------------------------------------- errors: one line each
def _bad_inputs(tmp_path):
    images = _class_tree(tmp_path / "images", per_class=1)
    empty = _class_tree(tmp_path / "with_empty", per_class=1)
    (empty / "zebra").mkdir()
    (tmp_path / "no_caption.csv").write_text("filepath,text\nimages/cat/0.png,a cat\n")
    (tmp_path / "no_label.csv").write_text("filepath,class\nimages/cat/0.png,cat\n")
    (tmp_path / "bad_label.csv").write_text("filepath,label\nimages/cat/0.png,cow\n")
    (tmp_path / "templates.txt").write_text("a photo of a cat\n")
    (tmp_path / "other_field.txt").write_text("a {} photo\na {x} photo of {}\n")
    (tmp_path / "two_fields.txt").write_text("a {c} photo of {}\n")
    (tmp_path / "two_names.txt").write_text("a\nb\n")
    (tmp_path / "notes.json").write_text('{"my": "notes"}')
    (tmp_path / "imagenet").mkdir()
    _write_png(tmp_path / "imagenet" / "n99999999" / "x.png", 0)
    return images


BAD = [
    (["classify", "--images", "{tmp}/missing"], "no such folder: '{tmp}/missing'"),
    (["classify", "--images", "{tmp}/with_empty"], "empty class folder: '{tmp}/with_empty/zebra'"),
    (["classify", "--csv", "{tmp}/no_label.csv"], "'{tmp}/no_label.csv' has no column 'label'"),
    (["classify", "--csv", "{tmp}/bad_label.csv", "--classnames", "{tmp}/two_names.txt"],
     "'{tmp}/bad_label.csv' line 2: label 'cow' is not a class name or index (0..1)"),
    (["classify", "--csv", "{tmp}/missing.csv"], "file not found: '{tmp}/missing.csv'"),
    (["classify", "--images", "{tmp}/images", "--templates", "{tmp}/templates.txt"],
     "'{tmp}/templates.txt': every line needs exactly one '{{}}'"),
    (["classify", "--images", "{tmp}/images", "--templates", "{tmp}/other_field.txt"],
     "not so: 'a {{x}} photo of {{}}'"),
    (["classify", "--images", "{tmp}/images", "--templates", "{tmp}/two_fields.txt"],
     "not so: 'a {{c}} photo of {{}}'"),
    (["classify", "--images", "{tmp}/images", "--device", "nonsense"],
     "--device 'nonsense' is not a device: expected cpu, cuda or cuda:N"),
    (["classify", "--images", "{tmp}/images", "--out", ""], "--out must name a file, got ''"),
    (["retrieve", "--csv", "{tmp}/no_caption.csv", "--out", " "],
     "--out must name a file, got ' '"),
    (["classify", "--images", "{tmp}/images", "--classnames", "{tmp}/two_names.txt"],
     "'{tmp}/two_names.txt' has 2 names for 3 classes"),
    (["classify", "--images", "{tmp}/imagenet", "--dataset", "imagenet-r"],
     "folder '{tmp}/imagenet/n99999999' is not a class of imagenet-r"),
    (["retrieve", "--csv", "{tmp}/no_caption.csv"],
     "'{tmp}/no_caption.csv' has no column 'caption'"),
    (["retrieve", "--csv", "{tmp}/no_caption.csv", "--csv-caption-key", "text", "--out",
      "{tmp}/notes.json"], "--out '{tmp}/notes.json' exists and is not a result file"),
    (["retrieve", "--csv", "{tmp}/no_caption.csv", "--out", "{tmp}/notes.json/a/r.json"],
     "--out '{tmp}/notes.json/a/r.json': '{tmp}/notes.json' is a file, not a folder"),
    (["linear-probe", "--train", "{tmp}/images", "--test", "{tmp}/with_empty"],
     "empty class folder: '{tmp}/with_empty/zebra'"),
    (["linear-probe", "--train", "{tmp}/missing", "--test", "{tmp}/images"],
     "--train: no such folder: '{tmp}/missing'"),
    (["classify", "--images", "{tmp}/images", "--pretrained", "{tmp}/notes.json"], "notes.json"),
    (["classify", "--images", "{tmp}/images", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["--compare", "{tmp}/notes.json"], "'{tmp}/notes.json' is not a result file"),
    (["export-digits", "{tmp}/images"], "'{tmp}/images' exists and is not an empty folder"),
    (["classify", "--images", "{tmp}/images", "--templates"], "expected one argument"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a[:2]) + m[:20] for a, m in BAD])
def test_bad_input_is_one_error_line_naming_it(tmp_path, argv, message, capsys):
    _bad_inputs(tmp_path)
    tmp = str(tmp_path)
    argv = [arg.format(tmp=tmp) for arg in argv]
    if argv[0] in ("classify", "retrieve", "linear-probe") and argv[-1] != "--templates":
        device = argv[argv.index("--device"):][:2] if "--device" in argv else []
        argv += ["--model", "CLIP-Tiny", *ARGS, *device]
    try:
        status = main(argv)
    except SystemExit as exit:  # argparse's own errors
        status = exit.code
    _, err = capsys.readouterr()
    assert status == 2
    errors = _error_lines(err)
    assert len(errors) == 1 and message.format(tmp=tmp) in errors[0], err
    assert "Traceback" not in err
    assert (tmp_path / "notes.json").read_text() == '{"my": "notes"}'


def test_write_result_is_atomic_and_refuses_foreign_files(tmp_path):
    result = {"task": "linear_probe", "model": "m", "pretrained": "", "dataset": "d",
              "metrics": {"acc1": 0.5}, "num_samples": 3}
    path = tmp_path / "r.json"
    write_result(str(path), result)
    write_result(str(path), dict(result, num_samples=4))
    assert read_result(str(path))["num_samples"] == 4
    assert os.listdir(tmp_path) == ["r.json"]  # no temporary file left
    write_result(str(tmp_path / "new" / "folder" / "r.json"), result)
    assert read_result(str(tmp_path / "new" / "folder" / "r.json")) == result
    (tmp_path / "x.txt").write_text("keep")
    with pytest.raises(ValueError, match="refusing to overwrite"):
        write_result(str(tmp_path / "x.txt"), result)
    assert (tmp_path / "x.txt").read_text() == "keep"


def test_export_digits_gives_the_held_out_images_training_evaluates(tmp_path):
    from diffattn.digits import load_digits_data

    counts = main(["export-digits", str(tmp_path / "digits")])
    assert counts == 0
    root = tmp_path / "digits"
    assert sorted(os.listdir(root / "test")) == [str(d) for d in range(10)]
    assert (root / "classnames.txt").read_text().split() == \
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    with open(root / "test_captions.csv") as file:
        rows = list(csv.DictReader(file))
    assert (root / "templates.txt").read_text().splitlines()[0] == "a photo of the number {c}."
    assert read_templates(str(root / "templates.txt"))[0] == "a photo of the number {}."
    assert len(rows) == 720 and rows[0]["filepath"] == rows[1]["filepath"]
    assert rows[0]["caption"] != rows[1]["caption"]
    model = create_model("DiffCLIP-Tiny", backend="torch")
    _, task = load_digits_data(model.preprocess, model.tokenize)
    files = [rows[2 * i]["filepath"] for i in range(3)]
    for i, name in enumerate(files):  # the CSV lists the held-out images in split order
        assert torch.equal(model.preprocess(str(root / name)), task.images[i])
        assert int(name.split("/")[1]) == int(task.labels[i])


def test_command_line_in_a_subprocess(tmp_path, weights):
    path, _ = weights
    root = _class_tree(tmp_path / "images", per_class=1)
    command = [sys.executable, "-m", "diffattn.eval", "classify", "--pretrained", path,
               "--images", str(root), "--templates", "simple", "--out",
               str(tmp_path / "r.json"), *ARGS]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert read_result(str(tmp_path / "r.json"))["num_samples"] == 3
    assert "acc1" in done.stdout and "Traceback" not in done.stderr


def test_captions_csv_from_a_karpathy_file(tmp_path, capsys):
    annotations = {"images": [
        {"filepath": "val2014", "filename": "a.png", "split": "test",
         "sentences": [{"raw": "A dog."}, {"raw": "A brown dog, running."}]},
        {"filepath": "val2014", "filename": "b.png", "split": "train",
         "sentences": [{"raw": "A cat."}]}]}
    (tmp_path / "coco.json").write_text(json.dumps(annotations))
    _write_png(tmp_path / "coco" / "val2014" / "a.png", 0)
    out = tmp_path / "test.csv"
    status, stdout, _ = _run(["captions-csv", str(tmp_path / "coco.json"), str(tmp_path / "coco"),
                              str(out)], capsys)
    assert status == 0 and "wrote 2 captions of 1 images" in stdout
    image = str(tmp_path / "coco" / "val2014" / "a.png")  # an absolute root stays absolute
    with open(out, newline="") as file:
        assert list(csv.reader(file)) == [["filepath", "caption"], [image, "A dog."],
                                          [image, "A brown dog, running."]]
    status, _, err = _run(["captions-csv", str(tmp_path / "coco.json"), str(tmp_path / "coco"),
                           str(out)], capsys)
    assert status == 2 and _error_lines(err) == \
        [f"error: captions-csv: '{out}' exists; refusing to overwrite it"]
    status, _, err = _run(["captions-csv", str(tmp_path / "missing.json"), str(tmp_path / "coco"),
                           str(tmp_path / "new.csv")], capsys)
    assert status == 2 and _error_lines(err) == \
        [f"error: captions-csv: file not found: '{tmp_path / 'missing.json'}'"]
    status, _, err = _run(["captions-csv", str(tmp_path / "coco.json"), str(tmp_path),
                           str(tmp_path / "new.csv")], capsys)
    assert status == 2 and _error_lines(err) == [
        f"error: captions-csv: none of the 2 images of split 'test' is in '{tmp_path}': the "
        f"first was looked for at '{tmp_path / 'val2014' / 'a.png'}' (IMAGE_ROOT is the folder "
        "of the images; for COCO the one holding val2014/)"]
    assert not (tmp_path / "new.csv").exists()


def test_the_readme_flickr_flow_runs_as_written(tmp_path, weights, monkeypatch, capsys):
    """captions-csv with paths relative to the working folder, then retrieve on its CSV."""
    path, _ = weights
    monkeypatch.chdir(tmp_path)
    images = [{"filename": f"{i}.jpg", "split": "test",
               "sentences": [{"raw": f"photo {i}"}, {"raw": f"picture {i}"}]} for i in range(3)]
    os.makedirs("data/flickr30k-images")
    for i in range(3):
        Image.fromarray(np.full((9, 9, 3), 40 * i, np.uint8)).save(
            f"data/flickr30k-images/{i}.jpg")
    (tmp_path / "data" / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
    status, _, err = _run(["captions-csv", "data/dataset_flickr30k.json", "data/flickr30k-images",
                           "data/flickr30k_test.csv"], capsys)
    assert status == 0, err
    with open("data/flickr30k_test.csv", newline="") as file:
        assert next(iter(list(csv.reader(file))[1:]))[0] == "flickr30k-images/0.jpg"
    status, _, err = _run(["retrieve", "--csv", "data/flickr30k_test.csv", "--dataset",
                           "flickr30k", "--pretrained", path, "--out", "res/r.json", *ARGS],
                          capsys)
    assert status == 0, err
    assert read_result("res/r.json")["num_samples"] == 3
    # a CSV whose paths were written for another folder: the error says where it looked
    (tmp_path / "data" / "old.csv").write_text(
        "filepath,caption\ndata/flickr30k-images/0.jpg,photo 0\n")
    status, _, err = _run(["retrieve", "--csv", "data/old.csv", "--pretrained", path, *ARGS],
                          capsys)
    assert status == 2 and len(_error_lines(err)) == 1
    assert ("none of the 1 image files 'data/old.csv' lists exists; line 2's "
            "'data/flickr30k-images/0.jpg' was looked for at "
            f"'{tmp_path / 'data' / 'data' / 'flickr30k-images' / '0.jpg'}'") in err
    assert "relative to the CSV file's folder" in err and "max-unreadable" not in err
    (tmp_path / "data" / "some.csv").write_text(
        "filepath,caption\nflickr30k-images/0.jpg,a\nflickr30k-images/7.jpg,b\n"
        "flickr30k-images/8.jpg,c\n")
    status, _, err = _run(["retrieve", "--csv", "data/some.csv", "--pretrained", path, *ARGS],
                          capsys)
    assert status == 2 and "2 of 3 image files were not found" in _error_lines(err)[0]
    assert "Check that these paths exist" in err and "raise --max-unreadable" not in err


def test_a_checkpoint_with_nan_weights_is_an_error_and_writes_nothing(tmp_path, capsys):
    torch.manual_seed(0)
    model = create_model("CLIP-Tiny", backend="torch")
    with torch.no_grad():
        model.logit_scale.fill_(float("nan"))
        model.text_projection[1, 2] = float("inf")
    path = tmp_path / "nan.safetensors"
    save_pretrained(model, path)
    root = _class_tree(tmp_path / "images", per_class=1)
    out = tmp_path / "r.json"
    for command in (["classify", "--images", str(root)], ["retrieve", "--csv", str(
            tmp_path / "c.csv")], ["linear-probe", "--train", str(root), "--test", str(root)]):
        (tmp_path / "c.csv").write_text("filepath,caption\nimages/cat/0.png,a cat\n")
        status, _, err = _run([*command, "--pretrained", str(path), "--out", str(out), *ARGS],
                              capsys)
        assert status == 2 and "Traceback" not in err
        assert _error_lines(err) == [_error_lines(err)[0]] and str(path) in err
        assert "'logit_scale' has 1 of 1" in err and "2 tensors in all" in err
        assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it_is_one_error_line(tmp_path, capsys):
    root = _class_tree(tmp_path / "images", per_class=1)
    status, _, err = _run(["classify", "--model", "CLIP-Tiny", "--images", str(root),
                           "--out", str(tmp_path / "r.json"), *ARGS, "--device", "cuda"], capsys)
    assert status == 2 and "Traceback" not in err and not (tmp_path / "r.json").exists()
    assert _error_lines(err) == [_error_lines(err)[0]]
    assert "--device cuda: CUDA is not available on this machine" in err


def test_templates_with_c_placeholder_are_those_with_braces(tmp_path, weights, capsys):
    path, _ = weights
    root = _class_tree(tmp_path / "images", per_class=1)
    (tmp_path / "c.txt").write_text("a photo of a {c}.\n{c}, {{literally}}\n")
    (tmp_path / "braces.txt").write_text("a photo of a {}.\n{}, {{literally}}\n")
    assert read_templates(str(tmp_path / "c.txt")) == read_templates(str(tmp_path / "braces.txt"))
    assert read_templates(str(tmp_path / "c.txt"))[1].format("cat") == "cat, {literally}"
    results = []
    for name in ("c.txt", "braces.txt"):
        out = tmp_path / f"{name}.json"
        status, _, err = _run(["classify", "--pretrained", path, "--images", str(root),
                               "--templates", str(tmp_path / name), "--out", str(out), *ARGS],
                              capsys)
        assert status == 0, err
        results.append(read_result(str(out))["metrics"])
    assert results[0] == results[1]


def test_classify_on_a_root_of_splits_warns(tmp_path, weights, capsys):
    path, _ = weights
    _class_tree(tmp_path / "data" / "train", per_class=1)
    _class_tree(tmp_path / "data" / "test", per_class=1)
    status, _, err = _run(["classify", "--pretrained", path, "--images", str(tmp_path / "data"),
                           "--templates", "simple", *ARGS], capsys)
    assert status == 0
    warning = [line for line in err.splitlines() if "look like dataset splits" in line]
    assert warning == [f"warning: --images '{tmp_path / 'data'}': the class folder(s) test, "
                       "train look like dataset splits, not classes: --images takes one "
                       f"split's folder of class folders (e.g. '{tmp_path / 'data' / 'test'}')"]
    status, _, err = _run(["classify", "--pretrained", path, "--images",
                           str(tmp_path / "data" / "test"), "--templates", "simple", *ARGS],
                          capsys)
    assert status == 0 and "dataset splits" not in err


def test_compare_reads_clip_benchmark_result_files(tmp_path, capsys):
    """Files as CLIP_benchmark 1.6's cli.py dumps them: no num_samples, NaN acc5 below 5
    classes, its linear-probe settings among the metrics."""
    theirs = {"dataset": "digits", "model": "DiffCLIP-Tiny", "pretrained": "model.safetensors",
              "task": "zeroshot_classification", "language": "en",
              "metrics": {"acc1": 0.9, "acc5": float("nan"), "mean_per_class_recall": 0.89}}
    probe = dict(theirs, task="linear_probe", metrics={
        "lp_acc1": 0.8, "lp_acc5": float("nan"), "lp_mean_per_class_recall": 0.79,
        "weight_decay": 0.01, "epochs": 10, "seed": 0, "fewshot_k": -1, "normalized": True})
    for name, data in (("theirs.json", theirs), ("probe.json", probe)):
        with open(tmp_path / name, "w") as file:
            json.dump(data, file)  # as CLIP_benchmark writes it: NaN, not null
    assert "NaN" in (tmp_path / "theirs.json").read_text()
    ours = dict(theirs, model="CLIP-Tiny", num_samples=360,
                metrics={"acc1": 0.8, "acc5": None, "mean_per_class_recall": 0.79})
    write_result(str(tmp_path / "ours.json"), ours)
    status, table, err = _run(["compare", str(tmp_path / "ours.json"),
                               str(tmp_path / "theirs.json"), str(tmp_path / "probe.json")],
                              capsys)
    assert status == 0, err
    rows = {tuple(line.split()[:3]): line.split()[3:] for line in table.splitlines()[2:]}
    assert rows[("digits", "zeroshot_classification", "acc1")] == ["80.00", "90.00", "+10.00"]
    assert rows[("digits", "zeroshot_classification", "acc5")] == ["-", "-", "-"]
    assert rows[("digits", "linear_probe", "lp_acc1")] == ["-", "80.00", "-"]
    assert not any(row[2] in ("weight_decay", "epochs", "seed", "fewshot_k", "normalized")
                   for row in rows)


def test_a_warning_during_a_progress_bar_gets_its_own_line(tmp_path, weights, monkeypatch,
                                                            capsys):
    """The backend's fallback warning arrives while the first batch is encoded, under the
    progress bar: the bar is cleared first, so the warning starts a line of its own."""
    import warnings as python_warnings

    from diffattn.backend import BackendFallbackWarning
    from diffattn.evaluation import features

    path, model = weights
    real = model.encode_image

    def encode_and_warn(*args, **kwargs):
        python_warnings.warn("diffattn: using the torch backend because of a test",
                             BackendFallbackWarning)
        return real(*args, **kwargs)

    monkeypatch.setattr(features, "encode_image_files", _with_model_hook(
        features.encode_image_files, encode_and_warn))
    monkeypatch.setattr("diffattn.evaluation.cli.encode_image_files",
                        features.encode_image_files)
    root = _class_tree(tmp_path / "images", per_class=2)
    status, _, err = _run(["classify", "--pretrained", path, "--images", str(root),
                           "--templates", "simple", "--device", "cpu", "--backend", "torch",
                           "--batch-size", "2"], capsys)
    assert status == 0
    pieces = [piece for line in err.split("\n") for piece in line.split("\r")]
    warned = [piece for piece in pieces if "using the torch backend" in piece]
    assert warned == ["warning: diffattn: using the torch backend because of a test"], err
    assert any("classify:" in piece for piece in pieces)  # a progress bar was drawn


def _with_model_hook(encode_image_files, encode_image):
    def hooked(model, *args, **kwargs):
        model.encode_image = encode_image
        try:
            return encode_image_files(model, *args, **kwargs)
        finally:
            del model.encode_image
    return hooked


def test_linear_probe_shows_its_fits(capsys):
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(40, 4)), np.arange(40) % 2
    linear_probe(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(x[:6]),
                 torch.from_numpy(y[:6]), c_values=(0.1, 1.0), progress=True)
    err = capsys.readouterr().err
    assert "linear probe fits" in err and "final=all training samples" in err
    linear_probe(torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(x[:6]),
                 torch.from_numpy(y[:6]), c_values=(0.1, 1.0))
    assert capsys.readouterr().err == ""
