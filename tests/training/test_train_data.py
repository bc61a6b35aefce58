"""Training data that is partly bad: unreadable images are skipped with one warning per file
and counted per epoch, a run with too many stops naming them, ``--check-data`` lists them
before training; CSV captions are UTF-8 (a byte-order mark allowed), other encodings are
refused with the line; ``--val-fraction`` holds out CSV rows and WebDataset shards."""
from __future__ import annotations

import re

import pytest

from diffattn.models import create_model
from diffattn.train import main
from diffattn.training.checkpointing import find_checkpoint
from diffattn.training.data import (DataConfig, DataError, MAX_READ_ATTEMPTS, WebDatasetCaptions,
                                    build_train_data, read_csv_rows)
from diffattn.training.distributed import DistInfo
from diffattn.training.metrics import METRICS_FILE, read_metrics

from _training_data import one_thread  # noqa: F401 (autouse)
from _training_data import csv_run, png_bytes, write_csv_dataset

DAMAGED = {3: "missing", 7: "random", 11: "truncated", 13: "text"}



@pytest.fixture(scope="module")
def tiny():
    return create_model("DiffCLIP-Tiny", backend="torch")


def _warnings(err: str) -> list:
    return [line for line in err.splitlines() if line.startswith("warning: skipped unreadable")]


def test_unreadable_images_are_skipped_with_one_warning_each_and_counted(tmp_path, capsys):
    csv_path = write_csv_dataset(tmp_path / "data", damaged=DAMAGED)
    out = tmp_path / "run"
    assert main(csv_run(csv_path, out, 2, "--max-unreadable-fraction", "0.5")) == 0
    warned = _warnings(capsys.readouterr().err)
    assert len(warned) == len(DAMAGED), warned  # two epochs, one warning per file
    for index, damage in DAMAGED.items():
        (line,) = [line for line in warned if f"images/{index}.png:" in line]
        if damage == "missing":
            assert line.endswith("file not found")
    records = read_metrics(out)
    assert [record["epoch"] for record in records] == [1, 2]
    assert all(record["unreadable_images"] >= len(DAMAGED) for record in records)


def test_too_many_unreadable_images_stop_the_run_naming_them(tmp_path, capsys):
    csv_path = write_csv_dataset(tmp_path / "data", damaged=DAMAGED)
    out = tmp_path / "run"
    assert main(csv_run(csv_path, out, 2)) == 1  # the default limit: 1%
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "could not be read" in errors[0] and "--max-unreadable-fraction 0.01" in errors[0]
    assert re.search(r"images/(3|7|11|13)\.png \(", errors[0]), errors[0]
    assert find_checkpoint(str(out)) is None


def test_data_that_is_all_unreadable_gives_up(tmp_path, capsys):
    csv_path = write_csv_dataset(tmp_path / "data", count=8,
                                 damaged={index: "missing" for index in range(8)})
    assert main(csv_run(csv_path, tmp_path / "run", 1, "--max-unreadable-fraction", "0.99")) == 1
    err = capsys.readouterr().err
    assert f"{MAX_READ_ATTEMPTS} image files in a row could not be read" in err


def test_check_data_lists_unreadable_images_before_training(tmp_path, capsys):
    csv_path = write_csv_dataset(tmp_path / "data", damaged={2: "random"})
    assert main(csv_run(csv_path, tmp_path / "a", 1, "--check-data")) == 1  # 1/16 > 1%
    captured = capsys.readouterr()
    assert "warning: unreadable image" in captured.err and "images/2.png" in captured.err
    assert "--check-data: 1 of 16 images (6.25%) cannot be read" in captured.err
    assert not (tmp_path / "a" / METRICS_FILE).exists()

    assert main(csv_run(csv_path, tmp_path / "b", 1, "--check-data",
                        "--max-unreadable-fraction", "0.1")) == 0
    captured = capsys.readouterr()
    assert "--check-data: 1 of 16 images cannot be read" in captured.out
    assert not _warnings(captured.err)  # already named by the check


def _csv_config(**changes) -> DataConfig:
    return DataConfig(**{"spec": "csv:unused", "global_batch_size": 4, **changes})


def test_csv_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_text("filepath,caption\nimages/0.png,un caf\u00e9\n", encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    assert read_csv_rows(str(path), _csv_config()) == [
        (str(tmp_path / "images" / "0.png"), "un caf\u00e9")]


def test_csv_in_another_encoding_is_refused_with_the_line(tmp_path, capsys):
    path = tmp_path / "latin1.csv"
    path.write_bytes("filepath,caption\na.png,a cat\nb.png,un caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.csv' is not UTF-8 text: line 3 holds the bytes"):
        read_csv_rows(str(path), _csv_config())
    assert main(["--data", f"csv:{path}", "--out", str(tmp_path / "run")]) == 1
    assert "is not UTF-8 text: line 3" in capsys.readouterr().err


@pytest.mark.parametrize("text, message", [
    ("filepath,caption\na.png\n", "line 2 has fewer fields than the header"),
    ("filepath,caption\n,a cat\n", "line 2 has an empty 'filepath'"),
])
def test_malformed_csv_rows_are_named(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        read_csv_rows(str(path), _csv_config())


def test_val_fraction_holds_out_csv_rows(tmp_path, tiny):
    csv_path = write_csv_dataset(tmp_path / "data", count=16)
    data = build_train_data(_csv_config(spec=f"csv:{csv_path}", val_fraction=0.25), DistInfo(),
                            tiny.preprocess, tiny.config.text.context_length)
    assert (data.validation_size, data.steps_per_epoch, data.unused_per_epoch) == (4, 3, 0)
    batches = list(data.validation)
    assert [batch.images.shape[0] for batch in batches] == [4]
    with pytest.raises(DataError, match="applies to csv, folder and wds data"):
        build_train_data(DataConfig(spec="digits", global_batch_size=4, val_fraction=0.1),
                         DistInfo(), tiny.preprocess, 77)


def _write_shards(folder, shards: int, per_shard: int, bad: dict = None) -> str:
    import webdataset as wds

    bad = bad or {}
    for shard in range(shards):
        with wds.TarWriter(str(folder / f"shard-{shard}.tar")) as writer:
            for index in range(per_shard):
                sample = {"__key__": f"s{shard}_{index:03d}", "png": png_bytes(index),
                          "txt": f"a grey square number {index}"}
                kind = bad.get((shard, index))
                if kind == "random":
                    sample["png"] = b"\x89PNG not really"
                elif kind == "no caption":
                    del sample["txt"]
                writer.write(sample)
    return f"{folder}/shard-{{0..{shards - 1}}}.tar"


def test_webdataset_skips_unreadable_samples_naming_them(tmp_path, tiny):
    pattern = _write_shards(tmp_path, 1, 6, bad={(0, 1): "random", (0, 4): "no caption"})
    import webdataset as wds

    dataset = WebDatasetCaptions(wds.shardlists.expand_urls(pattern), tiny.preprocess, 77,
                                 local_batch_size=4, seed=0, shuffle_buffer=1)
    first = next(iter(dataset))  # the first pass over the shard: 4 readable samples of 6
    unreadable = first.unreadable
    assert sorted(name.rsplit(":", 1)[1] for name, _ in unreadable) == ["s0_001", "s0_004"]
    assert any("no txt caption" in reason for _, reason in unreadable)
    assert first.images.shape == (4, 3, 32, 32) and not first.gave_up


def test_val_fraction_holds_out_webdataset_shards(tmp_path, capsys):
    pattern = _write_shards(tmp_path, 3, 4)
    out = tmp_path / "run"
    assert main(["--data", f"wds:{pattern}", "--backend", "torch", "--batch-size", "4",
                 "--train-num-samples", "8", "--workers", "0", "--epochs", "1", "--warmup", "0",
                 "--val-fraction", "0.3", "--out", str(out)]) == 0
    (record,) = read_metrics(out)
    assert record["val_loss"] > 0
    assert "best val_loss" in capsys.readouterr().out
    with pytest.raises(DataError, match="at least 2 shards"):
        build_train_data(DataConfig(spec=f"wds:{tmp_path}/shard-0.tar", global_batch_size=4,
                                    train_num_samples=8, val_fraction=0.5),
                         DistInfo(), None, 77)
