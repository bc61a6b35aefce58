"""Tests for diffattn.models.zero_shot and the ImageNet names/templates."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from diffattn.models import (IMAGENET_CLASSNAMES, IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES,
                             build_zero_shot_classifier, create_model, save_pretrained,
                             zero_shot_predict)
from diffattn.models.zero_shot import main


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("DiffCLIP-Tiny", backend="torch").eval()


def test_imagenet_metadata():
    assert len(IMAGENET_CLASSNAMES) == 1000
    assert (IMAGENET_CLASSNAMES[0], IMAGENET_CLASSNAMES[151], IMAGENET_CLASSNAMES[999]) == \
        ("tench", "Chihuahua", "toilet paper")
    assert len(IMAGENET_TEMPLATES) == 80 == len(set(IMAGENET_TEMPLATES))
    assert len(SIMPLE_IMAGENET_TEMPLATES) == 7
    assert set(SIMPLE_IMAGENET_TEMPLATES) <= set(IMAGENET_TEMPLATES)
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)


def test_classifier_is_renormalised_mean_of_prompt_embeddings(model):
    classnames, templates = ["cat", "dog", "car"], ["a photo of a {}.", "art of the {}."]
    classifier = build_zero_shot_classifier(model, classnames, templates)
    assert classifier.shape == (64, 3)
    torch.testing.assert_close(classifier.norm(dim=0), torch.ones(3))
    with torch.no_grad():
        dog = model.encode_text(model.tokenize(["a photo of a dog.", "art of the dog."]), normalize=True)
    torch.testing.assert_close(classifier[:, 1], torch.nn.functional.normalize(dog.mean(0), dim=0))
    batched = build_zero_shot_classifier(model, classnames, templates, batch_size=1)
    torch.testing.assert_close(batched, classifier)


@pytest.mark.parametrize("classnames, templates, message", [
    ([], ["a {}."], "classnames is empty"),
    (["cat"], [], "templates is empty"),
    (["cat"], ["a photo"], "placeholder"),
])
def test_classifier_bad_arguments(model, classnames, templates, message):
    with pytest.raises(ValueError, match=message):
        build_zero_shot_classifier(model, classnames, templates)


def test_zero_shot_predict(model):
    classifier = build_zero_shot_classifier(model, ["cat", "dog", "car", "tree"], ["a photo of a {}."])
    images = torch.randn(2, 3, 32, 32)
    probs, indices = zero_shot_predict(model, images, classifier, top_k=3)
    assert probs.shape == indices.shape == (2, 3)
    assert (probs[:, :-1] >= probs[:, 1:]).all() and (probs.sum(-1) <= 1 + 1e-6).all()
    with torch.no_grad():
        logits = model.logit_scale.exp() * model.encode_image(images, normalize=True) @ classifier
    torch.testing.assert_close(probs, logits.softmax(-1).topk(3).values)
    with pytest.raises(ValueError, match="top_k must be in \\[1, 4\\]"):
        zero_shot_predict(model, images, classifier, top_k=5)


@pytest.fixture
def cli_files(tmp_path, model):
    weights = tmp_path / "tiny.safetensors"
    save_pretrained(model, weights)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (40, 30)), ("b.png", (32, 32))):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(images / name)
    (images / "notes.txt").write_text("not an image")
    return weights, images


def test_cli_prints_top_k_per_image(cli_files, capsys):
    weights, images = cli_files
    status = main(["--model", "DiffCLIP-Tiny", "--pretrained", str(weights), "--images", str(images),
                   "--classes", "cat, dog,car", "--top-k", "2", "--templates", "simple",
                   "--backend", "torch", "--device", "cpu"])
    assert status == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if not line.startswith(" ")] == [str(images / "a.png"),
                                                                    str(images / "b.png")]
    scored = [line.split() for line in lines if line.startswith(" ")]
    assert len(scored) == 4
    assert all(label in {"cat", "dog", "car"} and 0 <= float(prob) <= 1 for prob, label in scored)


def test_cli_without_model_name_uses_saved_config(cli_files, capsys):
    weights, images = cli_files
    assert main(["--pretrained", str(weights), "--images", str(images), "--classes", "cat,dog",
                 "--top-k", "1", "--templates", "photo", "--device", "cpu", "--backend", "torch"]) == 0
    assert "a.png" in capsys.readouterr().out


@pytest.mark.parametrize("overrides, message", [
    ({"--images": "{tmp}/missing"}, "no such image file or folder: '.*missing'"),
    ({"--images": "{tmp}/empty"}, "no image files"),
    ({"--pretrained": "{tmp}/damaged.safetensors"}, "damaged.safetensors.*not a readable"),
    ({"--top-k": "3"}, r"--top-k must be between 1 and the number of classes \(2\)"),
    ({"--classes": " , "}, "--classes holds no class names"),
    ({"--pretrained": "{tmp}/nope.pt"}, "checkpoint file not found"),
    ({"--model": "CLIP-Tiny"}, "saved for another config"),
    ({"--model": "ViT-Q-99"}, "unknown model name"),
])
def test_cli_errors_exit_2(cli_files, tmp_path, capsys, overrides, message):
    weights, images = cli_files
    (tmp_path / "empty").mkdir()
    (tmp_path / "damaged.safetensors").write_bytes(weights.read_bytes()[:100])
    args = {"--model": "DiffCLIP-Tiny", "--pretrained": str(weights), "--images": str(images),
            "--classes": "cat,dog", "--device": "cpu", "--backend": "torch"}
    args.update({key: value.replace("{tmp}", str(tmp_path)) for key, value in overrides.items()})
    assert main([item for pair in args.items() for item in pair]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert re.search(message, err), err


CLI = ["--classes", "cat,dog", "--top-k", "1", "--templates", "photo", "--device", "cpu",
       "--backend", "torch"]


def test_cli_takes_files_and_folders_and_reports_unreadable_files(cli_files, tmp_path, capsys):
    weights, images = cli_files
    (images / "broken.png").write_bytes(b"\x89PNG\r\n not an image")
    single = tmp_path / "single.jpg"
    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(single)
    capsys.readouterr()
    status = main(["--pretrained", str(weights), "--images", str(single), str(images), *CLI])
    assert status == 1
    captured = capsys.readouterr()
    named = [line for line in captured.out.splitlines() if not line.startswith(" ")]
    assert named == [str(single), str(images / "a.png"), str(images / "b.png")]
    (error,) = captured.err.splitlines()
    assert error.startswith(f"error: {images / 'broken.png'}: cannot read image: ")


def test_cli_json_output(cli_files, capsys):
    weights, images = cli_files
    (images / "empty.png").write_bytes(b"")
    capsys.readouterr()
    assert main(["--pretrained", str(weights), "--images", str(images), "--json", *CLI]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["classes"] == ["cat", "dog"] and report["pretrained"] == str(weights)
    assert [result["file"] for result in report["results"]] == [
        str(images / name) for name in ("a.png", "b.png", "empty.png")]
    for result in report["results"][:2]:
        (best,) = result["top_k"]
        assert best["label"] in ("cat", "dog") and 0 <= best["probability"] <= 1
    assert report["results"][2]["error"].startswith("cannot read image")


def test_cli_without_pretrained_uses_random_weights_with_a_warning(cli_files, capsys):
    _, images = cli_files
    assert main(["--model", "DiffCLIP-Tiny", "--images", str(images / "a.png"), *CLI]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith("warning: no --pretrained: DiffCLIP-Tiny has random weights")
    assert captured.out.splitlines()[0] == str(images / "a.png")
    assert main(["--images", str(images), *CLI]) == 2
    assert "--model is required without --pretrained" in capsys.readouterr().err
