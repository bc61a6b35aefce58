"""diffattn.integrations.clip_benchmark: the loader's (model, transform, tokenizer) used the way
CLIP_benchmark uses them, registration into a stand-in of ``clip_benchmark.models`` (its
TYPE2FUNC / MODEL_TYPES / load_clip, as in CLIP_benchmark 1.6), and, where CLIP_benchmark is
installed (``diffattn[clip_benchmark]``), its own retrieval metric on a diffattn model against
``diffattn.evaluation.retrieval_recall``."""
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffattn.evaluation import retrieval_recall
from diffattn.integrations.clip_benchmark import MODEL_TYPE, load_diffattn, register
from diffattn.models import create_model, save_pretrained


def _images(count):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
            for _ in range(count)]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_pretrained(create_model("DiffCLIP-Tiny", backend="torch"), path)
    return str(path)


def test_loader_gives_what_clip_benchmark_calls(weights):
    model, transform, tokenizer = load_diffattn("", weights, cache_dir="/unused", device="cpu")
    assert not model.training
    images = torch.stack([transform(image) for image in _images(3)])
    tokens = tokenizer(["a photo of a dog", "a cat"])
    assert tokens.shape == (2, 77) and tokens.dtype == torch.int64
    with torch.no_grad(), torch.autocast("cpu", enabled=False):  # as its metrics call them
        image_features = F.normalize(model.encode_image(images), dim=-1)
        text_features = F.normalize(model.encode_text(tokens), dim=-1)
    assert image_features.shape == (3, 64) and text_features.shape == (2, 64)
    named, _, _ = load_diffattn("DiffCLIP-Tiny", weights)
    assert named.config == model.config
    random_init, _, _ = load_diffattn("CLIP-Tiny", "none")
    assert random_init.config.attention == "plain"


def _stand_in_clip_benchmark(monkeypatch):
    """clip_benchmark.models as CLIP_benchmark 1.6 defines it (without open_clip)."""
    package = types.ModuleType("clip_benchmark")
    models = types.ModuleType("clip_benchmark.models")
    models.TYPE2FUNC = {"open_clip": lambda **kwargs: None}
    models.MODEL_TYPES = list(models.TYPE2FUNC)

    def load_clip(model_type, model_name, pretrained, cache_dir, device="cuda"):
        assert model_type in models.MODEL_TYPES, f"model_type={model_type} is invalid!"
        return models.TYPE2FUNC[model_type](model_name=model_name, pretrained=pretrained,
                                            cache_dir=cache_dir, device=device)

    models.load_clip = load_clip
    package.models = models
    monkeypatch.setitem(sys.modules, "clip_benchmark", package)
    monkeypatch.setitem(sys.modules, "clip_benchmark.models", models)
    return models


def test_register_adds_the_model_type(monkeypatch, weights):
    models = _stand_in_clip_benchmark(monkeypatch)
    choices = models.MODEL_TYPES  # the list CLIP_benchmark's CLI passes as --model_type choices
    register()
    register()
    assert choices == ["open_clip", MODEL_TYPE] and models.TYPE2FUNC[MODEL_TYPE] is load_diffattn
    model, transform, tokenizer = models.load_clip(MODEL_TYPE, "", weights, None, "cpu")
    assert model.config.embed_dim == 64 and transform.image_size == 32


def test_clip_benchmark_retrieval_agrees(weights):
    pytest.importorskip("clip_benchmark.models")
    from clip_benchmark.metrics import zeroshot_retrieval
    from clip_benchmark.models import load_clip

    register()
    model, transform, tokenizer = load_clip(MODEL_TYPE, "", weights, None, "cpu")
    images = _images(4)
    captions = [[f"image {i}", f"a picture with {i} things"] for i in range(4)]
    batches = [(torch.stack([transform(image) for image in images[:3]]), captions[:3]),
               (transform(images[3])[None], captions[3:])]
    theirs = zeroshot_retrieval.evaluate(model, batches, tokenizer, "cpu", amp=False,
                                         recall_k_list=[1, 2])
    with torch.no_grad():
        image_features = model.encode_image(torch.stack([transform(i) for i in images]))
        text_features = model.encode_text(tokenizer([c for pair in captions for c in pair]))
    ours = retrieval_recall(image_features, text_features, torch.arange(4).repeat_interleave(2),
                            (1, 2))
    assert set(theirs) == set(ours)
    for name, value in ours.items():
        assert theirs[name] == pytest.approx(value, abs=1e-6)
