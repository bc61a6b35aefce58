"""CLIP byte-level BPE tokenizer (the text side of CLIP, open_clip and DiffCLIP).

Text is cleaned (ftfy, HTML entities unescaped twice, whitespace collapsed, lower-cased),
split into words by the CLIP regular expression, each word is mapped byte by byte onto
printable unicode characters, and the characters are merged by byte-pair encoding with the
48,894 ranked merges of ``bpe_simple_vocab_16e6.txt.gz`` (OpenAI CLIP, MIT licence, see
``BPE_LICENSE.txt``). The vocabulary has 49,408 entries:

- ids 0..255: the 256 byte characters,
- ids 256..511: the same characters with the end-of-word marker ``</w>``,
- ids 512..49405: the merges, in rank order,
- 49406 ``<start_of_text>`` and 49407 ``<end_of_text>``.

``tokenize`` builds the model input: ``[49406] + ids + [49407]``, zero-padded to the
context length (77), a too-long text cut with its last kept token replaced by 49407; with
``trim=True`` the padding columns no row needs are left out (the text tower's embeddings do not
change: it is causal and pools at the end-of-text token).

Special-token strings in the text are text. ``<start_of_text>`` or ``<end_of_text>`` written in a
caption is split and encoded like any other characters, so every row holds exactly one start and
one end token, the ones ``tokenize`` adds (a caption cannot end itself early or pool like the
empty caption). open_clip's tokenizer differs: it turns these strings into the special ids. For
every text without them the ids are CLIP's.

The work is linear in the length of the text: ``tokenize`` needs only the first
``context_length - 2`` ids of a text, every word gives at least one id and no token is longer
than ``SimpleTokenizer.max_token_chars`` bytes (32 for CLIP's merges), so words past that budget are never encoded and a word too long
to fit is cut before byte-pair encoding. Texts whose row fits get exactly CLIP's ids; a text
that is cut anyway may differ from CLIP's only in its last kept ids, where a word was cut.

Text cleaning needs the packages ftfy and regex (``pip install "diffattn[models]"``); they are
imported on first use, so the rest of diffattn.models works without them.
"""
import functools
import gzip
import html
import numbers
import os

import torch

SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407
VOCAB_SIZE = 49408
DEFAULT_CONTEXT_LENGTH = 77

SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
END_OF_WORD = "</w>"
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48,894

MERGES_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")



@functools.lru_cache(maxsize=1)
def _text_tools():
    """(ftfy.fix_text, the CLIP word pattern, the whitespace-run pattern), imported and
    compiled on first use."""
    try:
        import ftfy
        import regex
    except ImportError as exc:
        raise ImportError(f"the CLIP tokenizer needs the packages ftfy and regex ({exc}); "
                          f"install them with: pip install \"diffattn[models]\"") from exc
    # CLIP's word pattern without its special-token alternatives: special-token strings in
    # user text are split into words like any other text (see the module docstring).
    word_pattern = regex.compile(
        r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )
    return ftfy.fix_text, word_pattern, regex.compile(r"\s+")


def bytes_to_unicode() -> dict[int, str]:
    """Map every byte 0..255 to a printable unicode character, in CLIP's vocabulary order.

    Bytes that are printable Latin-1 characters (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``)
    map to themselves and come first; the remaining 68 bytes (control characters, space,
    soft hyphen, ...) map, in increasing byte order, to ``chr(256)``, ``chr(257)``, ...
    The dict's insertion order is the order of vocabulary ids 0..255.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    byte_to_char = {byte: chr(byte) for byte in printable}
    next_codepoint = 256
    for byte in range(256):
        if byte not in byte_to_char:
            byte_to_char[byte] = chr(next_codepoint)
            next_codepoint += 1
    return byte_to_char


def clean_text(text: str) -> str:
    """Normalise text as CLIP does before splitting it into words.

    ftfy repair, HTML entities unescaped twice (``&amp;lt;`` -> ``<``), runs of whitespace
    collapsed to one space, leading/trailing whitespace removed, lower-cased.
    """
    fix_text, _, whitespace_run = _text_tools()
    text = fix_text(text)
    text = html.unescape(html.unescape(text))
    text = whitespace_run.sub(" ", text).strip()
    return text.lower()


def _read_merges(merges_path: str) -> list[tuple[str, str]]:
    """The first NUM_MERGES merges of a CLIP merges file (the header line is skipped)."""
    with gzip.open(merges_path, "rt", encoding="utf-8") as merges_file:
        lines = merges_file.read().split("\n")
    merge_lines = lines[1 : NUM_MERGES + 1]
    if len(merge_lines) != NUM_MERGES:
        raise ValueError(
            f"merges file {merges_path!r} holds {len(merge_lines)} merges after its header, "
            f"expected at least {NUM_MERGES}"
        )
    merges = []
    for line in merge_lines:
        left, right = line.split()
        merges.append((left, right))
    return merges


class SimpleTokenizer:
    """CLIP byte-level BPE tokenizer: ``encode`` text to ids, ``decode`` ids to text.

    Args:
        merges_path: gzip-compressed merges file; defaults to the copy shipped next to this
            module (``bpe_simple_vocab_16e6.txt.gz``).
        cache_size: how many distinct words the BPE result cache keeps.
    """

    def __init__(self, merges_path: str = MERGES_PATH, cache_size: int = 65536):
        self.byte_to_char = bytes_to_unicode()
        self.char_to_byte = {char: byte for byte, char in self.byte_to_char.items()}
        merges = _read_merges(merges_path)
        self.merge_ranks = {pair: rank for rank, pair in enumerate(merges)}

        byte_chars = list(self.byte_to_char.values())
        vocab = byte_chars + [char + END_OF_WORD for char in byte_chars]
        vocab += [left + right for left, right in merges]
        vocab += [SOT_TOKEN, EOT_TOKEN]
        self.token_to_id = {token: token_id for token_id, token in enumerate(vocab)}
        self.id_to_token = vocab
        # The longest token, in byte characters without the end-of-word marker: a word of n
        # bytes gives at least ceil(n / max_token_chars) tokens.
        self.max_token_chars = max(len(token.removesuffix(END_OF_WORD)) for token in vocab[:-2])
        self._word_to_tokens = functools.lru_cache(maxsize=cache_size)(self._merge_word)

    def _merge_word(self, word: str) -> tuple[str, ...]:
        """Split one word (already in byte characters) into BPE tokens.

        The word starts as single characters, the last one carrying ``</w>``; the adjacent
        pair with the lowest merge rank is merged everywhere (left to right, without
        overlap) until no adjacent pair is a known merge.
        """
        symbols = list(word[:-1]) + [word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            pairs = set(zip(symbols, symbols[1:]))
            best_pair = min(pairs, key=lambda pair: self.merge_ranks.get(pair, NUM_MERGES))
            if best_pair not in self.merge_ranks:
                break
            merged = []
            index = 0
            while index < len(symbols):
                if index + 1 < len(symbols) and (symbols[index], symbols[index + 1]) == best_pair:
                    merged.append(symbols[index] + symbols[index + 1])
                    index += 2
                else:
                    merged.append(symbols[index])
                    index += 1
            symbols = merged
        return tuple(symbols)

    def encode(self, text: str, max_tokens: int | None = None) -> list[int]:
        """Token ids of ``text``, without start/end-of-text tokens or padding.

        Args:
            text: any string; it is cleaned (see ``clean_text``) first. Special-token strings
                (``<end_of_text>``) in it are text: they are encoded like other characters.
            max_tokens: if given, at most this many ids are returned and the work is bounded
                by it: words after the budget is spent are not encoded, and a word longer than
                ``(remaining budget + 1) * max_token_chars`` bytes (more tokens than remain)
                is cut to that length before byte-pair encoding. When the whole text's ids
                number at most ``max_tokens`` they are exactly those of ``encode(text)``; else
                the first ``max_tokens`` ids, of which the ones from a cut word may differ.

        Returns:
            list of ints in ``[0, VOCAB_SIZE)``, one per BPE token (length >= 0).
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if max_tokens is not None:
            if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
                raise TypeError(f"max_tokens must be an int or None, got {type(max_tokens).__name__}")
            if max_tokens < 0:
                raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        token_ids = []
        for match in _text_tools()[1].finditer(clean_text(text)):
            if max_tokens is not None:
                remaining = max_tokens - len(token_ids)
                if remaining <= 0:
                    break
            word_bytes = match.group().encode("utf-8")
            if max_tokens is not None:
                # More bytes than this make more tokens than remain; one spare token's worth
                # keeps the cut's false end of word out of the ids that are kept.
                word_bytes = word_bytes[: (remaining + 1) * self.max_token_chars]
            byte_chars = "".join(self.byte_to_char[byte] for byte in word_bytes)
            token_ids.extend(self.token_to_id[token] for token in self._word_to_tokens(byte_chars))
        if max_tokens is not None:
            del token_ids[max_tokens:]
        return token_ids

    def decode(self, ids) -> str:
        """Text of a sequence of token ids.

        Args:
            ids: ints in ``[0, VOCAB_SIZE)`` (a list, or a 1-D tensor). Padding zeros are
                not skipped (id 0 is the token ``!``): cut them off first.

        Returns:
            the text, words separated by one space, no trailing space; special tokens are
            written as ``<start_of_text>`` / ``<end_of_text>``; byte sequences that are not
            valid UTF-8 become U+FFFD.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"ids must be 1-D, got a tensor of shape {tuple(ids.shape)}")
            ids = ids.tolist()
        text_bytes = bytearray()
        for token_id in ids:
            if isinstance(token_id, bool) or not isinstance(token_id, numbers.Integral):
                raise TypeError(f"ids must hold ints, got {type(token_id).__name__}")
            token_id = int(token_id)
            if not 0 <= token_id < VOCAB_SIZE:
                raise ValueError(f"ids must lie in [0, {VOCAB_SIZE}), got {token_id}")
            token = self.id_to_token[token_id]
            ends_word = token.endswith(END_OF_WORD)
            if ends_word:
                token = token[: -len(END_OF_WORD)]
            text_bytes.extend(self.char_to_byte[char] for char in token)
            if ends_word:
                text_bytes.extend(b" ")
        return text_bytes.decode("utf-8", errors="replace").rstrip(" ")


@functools.lru_cache(maxsize=1)
def _default_tokenizer() -> SimpleTokenizer:
    """The shared tokenizer over the packaged merges file, built on first use."""
    return SimpleTokenizer()


def tokenize(texts, context_length: int = DEFAULT_CONTEXT_LENGTH, *,
             trim: bool = False) -> torch.Tensor:
    """Model input ids for one text or a list of texts.

    Each row is ``[SOT_TOKEN_ID] + encode(text) + [EOT_TOKEN_ID]`` followed by zeros. A text
    whose row would be longer than ``context_length`` is cut to ``context_length`` tokens
    and its last kept token is replaced by ``EOT_TOKEN_ID``, so every row holds exactly one
    end-of-text token (the largest id in the row, which the text tower pools on).

    Args:
        texts: a str, or a list/tuple of str.
        context_length: tokens per row, >= 2 (CLIP: 77).
        trim: keep only as many columns as the longest row needs (through its end-of-text
            token), never more than context_length. The text tower is causal and pools at the
            end-of-text token, so its embeddings are the same; it runs on fewer tokens.

    Returns:
        LongTensor of shape (n, context_length), or (n, longest row) with trim; n = 1 for a
        single str.
    """
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"texts must be a str or a list of str, got {type(texts).__name__}")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts must be a str or a list of str, texts[{index}] is {type(text).__name__}")
    if isinstance(context_length, bool) or not isinstance(context_length, int):
        raise TypeError(f"context_length must be an int, got {type(context_length).__name__}")
    if context_length < 2:
        raise ValueError(f"context_length must be >= 2 (room for start and end tokens), got {context_length}")

    if not isinstance(trim, bool):
        raise TypeError(f"trim must be a bool, got {type(trim).__name__}")

    tokenizer = _default_tokenizer()
    rows = []
    for text in texts:
        # One id more than fits tells a cut text from one that fits exactly.
        row_ids = [SOT_TOKEN_ID] + tokenizer.encode(text, max_tokens=context_length - 1) + [EOT_TOKEN_ID]
        if len(row_ids) > context_length:
            row_ids = row_ids[:context_length]
            row_ids[-1] = EOT_TOKEN_ID
        rows.append(row_ids)
    width = max((len(r) for r in rows), default=2) if trim else context_length
    token_ids = torch.zeros(len(rows), width, dtype=torch.long)
    for index, row_ids in enumerate(rows):
        token_ids[index, : len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
    return token_ids


def trim_padding(tokens: torch.Tensor) -> torch.Tensor:
    """Drop the trailing columns of a (n, L) batch of token ids that no row needs: keep through
    the last end-of-text token (each row's largest id) of any row. A view, no copy. For token
    batches formed per text (e.g. in a data loader, on the CPU: it reads the values), equal to
    tokenizing them with ``trim=True``."""
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must have shape (n, L) with L >= 1, got {tuple(tokens.shape)}")
    if tokens.shape[0] == 0:
        return tokens
    width = int(tokens.argmax(dim=1).max()) + 1
    return tokens[:, :width]
