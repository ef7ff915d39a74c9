"""Character-level text for the language-modelling task: one UTF-8 file, three contiguous parts.

The file (``text/warpeace_input.txt`` in the shared data: *War and Peace*, the text of
A. Karpathy's char-rnn experiments) is read as UTF-8, a leading byte-order mark dropped and line
ends normalized to ``\\n`` (the file has CRLF). Tokens are characters (Unicode code points), not
bytes: the vocabulary is every character that occurs in the file, sorted by code point, so each
token is a letter a reader sees, no multi-byte character is split across tokens, and the table is
small (148 characters for this file, against 256 byte values).

The text is cut into a training part (the first ``1 - val_fraction - test_fraction``), then a
validation tail, then a test tail: hyperparameters are chosen on the validation tail and the
final figure is reported on the test tail, text no choice has seen. The vocabulary comes from
the whole file (as char-rnn does), so every part encodes; characters that occur only in the
tails keep their initial embedding.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import DataError
from .paths import resolve_file

__all__ = ["TEXT_FILE", "Text", "encode", "load_text"]

TEXT_FILE = "warpeace_input.txt"
VAL_FRACTION = 0.05
TEST_FRACTION = 0.05
#: The shortest part accepted, in characters: a window of the tiny task needs a few dozen.
MIN_PART = 64


@dataclass
class Text:
    """A tokenized text in three parts (int64 token ids) and its vocabulary.

    Attributes:
        train, val, test: 1-d int64 tensors of token ids, contiguous parts of the text in order.
        vocabulary: the characters, token id ``i`` being ``vocabulary[i]``.
    """

    train: Tensor
    val: Tensor
    test: Tensor
    vocabulary: str

    @property
    def vocab_size(self) -> int:
        """Number of distinct tokens."""
        return len(self.vocabulary)


def encode(text: str, vocabulary: str) -> Tensor:
    """The token ids (int64) of ``text`` under ``vocabulary`` (sorted characters).

    Raises:
        ValueError: a character of ``text`` is not in ``vocabulary`` (names the first one).
    """
    table = np.frombuffer(vocabulary.encode("utf-32-le"), dtype=np.uint32)
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    ids = np.searchsorted(table, points)
    ids_clipped = np.minimum(ids, len(table) - 1)
    unknown = table[ids_clipped] != points
    if unknown.any():
        where = int(np.argmax(unknown))
        raise ValueError(f"character {text[where]!r} at {where} is not in the vocabulary")
    return torch.from_numpy(ids.astype(np.int64))


def _read(file: Path) -> str:
    """The file's text: UTF-8 (BOM dropped), line ends normalized; DataError when it is not."""
    try:
        raw = file.read_bytes()
    except OSError as error:
        raise DataError(f"{file}: cannot read it ({error.strerror or error})") from None
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        text = raw[bom:].decode("utf-8")
    except UnicodeDecodeError as error:
        where = bom + error.start
        raise DataError(
            f"{file}: not UTF-8 text (byte {where} is {raw[where]:#04x}); the file is damaged "
            "or of another format: replace it with the original text file."
        ) from None
    if "\x00" in text:
        raise DataError(
            f"{file}: holds NUL characters at {text.index(chr(0))}, which no text file does; "
            "replace it with the original text file."
        )
    return text.replace("\r\n", "\n").replace("\r", "\n")


def load_text(
    path: str | Path, val_fraction: float = VAL_FRACTION, test_fraction: float = TEST_FRACTION
) -> Text:
    """Read ``path`` (the text file, or a folder holding it or a ``text/`` subfolder) and split it.

    Args:
        path: ``warpeace_input.txt`` or any UTF-8 text file, or a folder searched for the former.
        val_fraction, test_fraction: the lengths of the validation and test tails, as fractions
            of the text (the validation tail before the test tail, both after the training part).

    Raises:
        DataError: the file is missing, not UTF-8 text, or too short for three parts of at least
            :data:`MIN_PART` characters (the message names the file).
        ValueError: fractions outside (0, 1) or leaving no training part.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"load_text: {name} must be in (0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError("load_text: val_fraction + test_fraction leaves no training text")
    file = resolve_file(path, [TEXT_FILE], ["text"], "text")
    text = _read(file)
    n_val, n_test = round(len(text) * val_fraction), round(len(text) * test_fraction)
    n_train = len(text) - n_val - n_test
    if min(n_train, n_val, n_test) < MIN_PART:
        raise DataError(
            f"{file}: {len(text)} characters are too few to cut into training, validation and "
            f"test parts of at least {MIN_PART} each; the file is truncated or not the text "
            "asked for."
        )
    vocabulary = "".join(sorted(set(text)))
    ids = encode(text, vocabulary)
    return Text(
        train=ids[:n_train],
        val=ids[n_train : n_train + n_val],
        test=ids[n_train + n_val :],
        vocabulary=vocabulary,
    )
