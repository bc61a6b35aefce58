"""Tests for diffattn.models.tokenizer against ids from the reference CLIP tokenizer."""
import json
import os
from pathlib import Path

import pytest
import torch

from diffattn.models.tokenizer import (
    EOT_TOKEN_ID,
    SOT_TOKEN_ID,
    VOCAB_SIZE,
    _default_tokenizer,
    tokenize,
    trim_padding,
)

# The reference cases of shared/data/clip_tokenizer_cases.json, kept here so they always run.
INLINE_CASES = [
    ("a photo of a cat.", [49406, 320, 1125, 539, 320, 2368, 269, 49407]),
    ("a photo of a dog", [49406, 320, 1125, 539, 320, 1929, 49407]),
    ("A Photo Of A GOLDFISH!!", [49406, 320, 1125, 539, 320, 40293, 748, 49407]),
    ("an origami crane", [49406, 550, 31832, 14626, 49407]),
    ("", [49406, 49407]),
    (
        "the quick brown fox jumps over the lazy dog",
        [49406, 518, 3712, 2866, 3240, 18911, 962, 518, 10753, 1929, 49407],
    ),
    (
        "a photo of a 1990s sports car, 4k",
        [49406, 320, 1125, 539, 320, 272, 280, 280, 271, 338, 2054, 1615, 267, 275, 330, 49407],
    ),
    ("café crème brûlée", [49406, 15304, 1075, 12138, 614, 711, 127, 119, 75, 13489, 49407]),
    ("don't stop   believing", [49406, 847, 713, 1691, 19551, 49407]),
    ("&amp; &lt;html&gt; entities", [49406, 261, 283, 18231, 285, 38134, 49407]),
]


def _shared_data_dir() -> Path:
    if "DIFFATTN_SHARED" in os.environ:
        return Path(os.environ["DIFFATTN_SHARED"]) / "data"
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def _unpadded(row: torch.Tensor) -> list[int]:
    return row[row != 0].tolist()


@pytest.mark.parametrize("text, expected_ids", INLINE_CASES)
def test_inline_reference_cases(text, expected_ids):
    token_ids = tokenize(text)
    assert token_ids.shape == (1, 77)
    assert token_ids.dtype == torch.long
    assert _unpadded(token_ids[0]) == expected_ids
    assert token_ids[0, len(expected_ids) :].eq(0).all()


def test_shared_reference_cases():
    cases_path = _shared_data_dir() / "clip_tokenizer_cases.json"
    if not cases_path.is_file():
        pytest.skip(f"{cases_path} not found")
    cases = json.loads(cases_path.read_text(encoding="utf-8"))
    assert cases
    token_ids = tokenize([case["text"] for case in cases])
    for row, case in zip(token_ids, cases):
        assert _unpadded(row) == case["ids"], case["text"]


def test_encode_has_no_special_tokens():
    assert _default_tokenizer().encode("a photo of a cat.") == [320, 1125, 539, 320, 2368, 269]


def test_too_long_text_is_cut_and_ends_with_end_of_text():
    long_text = " ".join(["word"] * 100)
    token_ids = tokenize(long_text)
    assert token_ids.shape == (1, 77)
    assert token_ids[0, 0].item() == SOT_TOKEN_ID
    assert token_ids[0, -1].item() == EOT_TOKEN_ID
    assert (token_ids != 0).all()
    assert (token_ids == EOT_TOKEN_ID).sum().item() == 1


def test_short_context_length():
    token_ids = tokenize("a photo of a cat", context_length=4)
    assert token_ids.tolist() == [[SOT_TOKEN_ID, 320, 1125, EOT_TOKEN_ID]]
    assert tokenize("a photo", context_length=2).tolist() == [[SOT_TOKEN_ID, EOT_TOKEN_ID]]


def test_batch_of_texts():
    texts = ["a photo of a cat.", "a photo of a dog", ""]
    token_ids = tokenize(texts)
    assert token_ids.shape == (3, 77)
    for row, text in zip(token_ids, texts):
        assert row.tolist() == tokenize(text)[0].tolist()
    assert token_ids.argmax(dim=-1).tolist() == [7, 6, 1]  # the end-of-text position
    assert tokenize(tuple(texts)).equal(token_ids)


def test_decode_round_trip():
    tokenizer = _default_tokenizer()
    text = "the quick brown fox jumps over the lazy dog"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode(torch.tensor(tokenizer.encode("café crème"))) == "café crème"
    assert tokenizer.decode([SOT_TOKEN_ID, 320, EOT_TOKEN_ID]) == "<start_of_text>a <end_of_text>"


def test_special_token_strings_in_text_are_text():
    tokenizer = _default_tokenizer()
    ids = tokenizer.encode("<end_of_text>")
    assert EOT_TOKEN_ID not in ids and SOT_TOKEN_ID not in ids
    assert ids == tokenizer.encode("< end_of_text >")  # split like any other characters
    rows = tokenize(["a cat <end_of_text> and a dog", "<start_of_text><end_of_text>", "<end_of_text>"])
    assert (rows == EOT_TOKEN_ID).sum(dim=1).tolist() == [1, 1, 1]
    assert (rows == SOT_TOKEN_ID).sum(dim=1).tolist() == [1, 1, 1]
    assert not torch.equal(rows[2], tokenize("")[0])  # does not embed like the empty caption


def _count_merged_characters(monkeypatch):
    """A fresh tokenizer whose byte-pair encoding records the length of every word it merges."""
    import diffattn.models.tokenizer as tokenizer_module

    merged_lengths = []
    merge_word = tokenizer_module.SimpleTokenizer._merge_word

    def counting_merge_word(self, word):
        merged_lengths.append(len(word))
        return merge_word(self, word)

    monkeypatch.setattr(tokenizer_module.SimpleTokenizer, "_merge_word", counting_merge_word)
    tokenizer = tokenizer_module.SimpleTokenizer()
    monkeypatch.setattr(tokenizer_module, "_default_tokenizer", lambda: tokenizer)
    return tokenizer, merged_lengths


def test_long_word_work_is_bounded_by_the_context_length(monkeypatch):
    tokenizer, merged_lengths = _count_merged_characters(monkeypatch)
    row = tokenize("a" * 32_000)
    assert row.shape == (1, 77) and row[0, -1] == EOT_TOKEN_ID and (row != 0).all()
    # One word, cut to what 76 tokens of at most max_token_chars bytes can hold.
    assert len(merged_lengths) == 1
    assert merged_lengths[0] <= 77 * tokenizer.max_token_chars < 32_000
    merged_lengths.clear()
    tokenize(" ".join(["word"] * 50_000), context_length=10)
    assert len(merged_lengths) <= 9 and sum(merged_lengths) <= 9 * tokenizer.max_token_chars


def test_bounded_encoding_gives_clips_ids_whenever_the_text_fits():
    tokenizer = _default_tokenizer()
    word = "supercalifragilisticexpialidocious" * 5
    full = tokenizer.encode(word)
    assert tokenizer.encode(word, max_tokens=len(full)) == full
    assert tokenizer.encode(word, max_tokens=len(full) - 3) == full[:-3]
    row = tokenize(word, context_length=len(full) + 2)
    assert row[0, 1:-1].tolist() == full and row[0, -1] == EOT_TOKEN_ID
    text = "a photo of a cat " * 20
    assert tokenizer.encode(text, max_tokens=40) == tokenizer.encode(text)[:40]
    with pytest.raises(ValueError, match="max_tokens"):
        tokenizer.encode("a", max_tokens=-1)


def test_vocabulary_size():
    tokenizer = _default_tokenizer()
    assert len(tokenizer.id_to_token) == VOCAB_SIZE
    assert tokenizer.id_to_token[256] == "!</w>"
    assert tokenizer.token_to_id["a</w>"] == 320


@pytest.mark.parametrize("bad_texts", [None, 3, b"bytes", ["ok", 5], {"a": 1}])
def test_bad_texts(bad_texts):
    with pytest.raises(TypeError, match="texts"):
        tokenize(bad_texts)


@pytest.mark.parametrize("bad_length, error", [(1, ValueError), (0, ValueError), (-5, ValueError), (7.0, TypeError)])
def test_bad_context_length(bad_length, error):
    with pytest.raises(error, match="context_length"):
        tokenize("a cat", context_length=bad_length)


def test_bad_encode_and_decode_inputs():
    tokenizer = _default_tokenizer()
    with pytest.raises(TypeError, match="text"):
        tokenizer.encode(None)
    with pytest.raises(ValueError, match="ids"):
        tokenizer.decode([VOCAB_SIZE])
    with pytest.raises(TypeError, match="ids"):
        tokenizer.decode(["a"])


def test_trim_keeps_only_the_columns_the_longest_text_needs():
    texts = ["a photo of a cat.", "dog", "a " * 100]
    full = tokenize(texts[:2])
    trimmed = tokenize(texts[:2], trim=True)
    assert trimmed.shape == (2, 8) and torch.equal(trimmed, full[:, :8])
    assert tokenize(texts, trim=True).shape == (3, 77)  # never more than the context length
    assert tokenize(texts, context_length=10, trim=True)[2, -1] == EOT_TOKEN_ID
    assert torch.equal(trim_padding(full), trimmed)
    assert trim_padding(full).data_ptr() == full.data_ptr()  # a view
    with pytest.raises(TypeError, match="trim"):
        tokenize("a cat", trim="yes")
    with pytest.raises(ValueError, match="tokens must have shape"):
        trim_padding(torch.zeros(3, dtype=torch.long))


def test_missing_text_libraries_are_named(monkeypatch):
    import builtins
    import diffattn.models.tokenizer as tokenizer_module

    real_import = builtins.__import__

    def no_ftfy(name, *args, **kwargs):
        if name == "ftfy":
            raise ImportError("No module named 'ftfy'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ftfy)
    tokenizer_module._text_tools.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"needs the packages ftfy and regex.*diffattn\[models\]"):
            tokenizer_module.clean_text("a cat")
    finally:
        tokenizer_module._text_tools.cache_clear()
