"""The tokenizer: caption text -> token ids, trained with Hugging Face `tokenizers` on the training captions.

    "A red circle!"  --normalize-->  "a red circle!"  --pre-tokenize-->  a | red | circle | !
                     --WordPiece-->  [BOS] a red circle ! [EOS]  --pad-->  ids (N, L), mask (N, L)

Why WordPiece. The shapes captions use about thirty words; WordPiece trained on them
learns every one as a single whole-word token (tests/test_tokenizer.py checks this), so
on the training language it is exactly a word-level vocabulary. It differs off the
training language: after training, every letter and digit is also given a
word-continuing piece ("##s"), so any word of ASCII letters splits into known pieces
("circles" -> circle ##s) instead of collapsing into [UNK], and on a user's own
captions (an open vocabulary, capped by vocab_size) rare words share pieces with
common ones. Characters outside ASCII letters, digits and punctuation, after accents
are stripped, become [UNK]; nothing is ever fatal.

Normalization: Unicode NFD, lowercase, accents stripped ("Café" -> "cafe").
Pre-tokenization: split on whitespace and on every punctuation character (BERT's rule).

Special tokens and ids: [PAD]=0 (padding; mask False), [UNK]=1, [BOS]=2, always
first, so an empty caption is one real token ([BOS]) and never an all-padding row,
[EOS]=3, appended unless the tokenizer was trained with add_eos=False. Whether [EOS] is
appended is part of the JSON (its post-processor), so it ships with the model.

The JSON written by save()/to_str() is Hugging Face's own format; from_str(to_str())
gives back a tokenizer whose to_str() is identical, byte for byte.

Dimension letters: N texts, L tokens per text (max_length).
"""

from __future__ import annotations

import os
import string
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)          # ids 0, 1, 2, 3 in this order
WORD_CHARS = string.ascii_lowercase + string.digits
# pieces every tokenizer has, whatever its captions: each letter, digit and punctuation
# mark starting a word, and each letter and digit continuing one
GUARANTEED_PIECES = list(WORD_CHARS + string.punctuation) + ["##" + c for c in WORD_CHARS]
MIN_VOCAB_SIZE = 128
DEFAULT_VOCAB_SIZE = 256
MAX_WORD_CHARS = 64                            # longer "words" (a pasted URL) become one [UNK]


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used: missing, not JSON, or without npdiff's special tokens."""


class Tokenizer:
    """A trained Hugging Face tokenizer with npdiff's conventions (see the module docstring)."""

    def __init__(self, hf: HFTokenizer, source: str = "tokenizer"):
        for i, tok in enumerate(SPECIAL_TOKENS):
            if hf.token_to_id(tok) != i:
                raise TokenizerError(f"{source} has {tok} at id {hf.token_to_id(tok)}, npdiff needs it at id {i}; "
                                     f"train a new one with npdiff.text.tokenizer.train_tokenizer")
        self._hf = hf
        empty = hf.encode("").ids
        if empty[:1] != [self.bos_id]:
            raise TokenizerError(f"{source} does not start every text with {BOS}; "
                                 f"train a new one with npdiff.text.tokenizer.train_tokenizer")
        self.adds_eos = empty[-1] == self.eos_id

    pad_id, unk_id, bos_id, eos_id = 0, 1, 2, 3

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size()

    # -- serialization -------------------------------------------------------

    @classmethod
    def from_str(cls, text: str, source: str = "tokenizer JSON") -> "Tokenizer":
        try:
            hf = HFTokenizer.from_str(text)
        except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
            raise TokenizerError(f"{source} is not a valid tokenizer.json ({str(e).splitlines()[0]}); "
                                 f"replace it with the tokenizer.json saved beside the model") from None
        return cls(hf, source)

    def to_str(self) -> str:
        return self._hf.to_str()

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json atomically: a temporary file in the same folder, then a rename."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.to_str())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # -- encoding ------------------------------------------------------------

    def tokens(self, text: str) -> list[str]:
        """The pieces a text becomes, specials included (for reading, not for the model)."""
        return self._hf.encode(text).tokens

    def encode(self, text: str) -> list[int]:
        """One text -> ids with [BOS] (and [EOS]), not truncated, not padded."""
        return self._hf.encode(text).ids

    def word_id(self, word: str) -> int | None:
        """The id of a word that is a single piece of the vocabulary, else None."""
        ids = self._hf.encode(word, add_special_tokens=False).ids
        return ids[0] if len(ids) == 1 and ids[0] != self.unk_id else None

    def encode_batch(self, texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """texts -> (ids int64 (N, L), mask bool (N, L)), L = max_length.

        Every row starts with [BOS]; with [EOS], a text too long for max_length keeps
        its first max_length - 2 pieces and still ends in [EOS]. Padding is [PAD] = 0
        with mask False.
        """
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of texts; wrap a single text in a list")
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"encode_batch takes texts (str), got {type(t).__name__}: {t!r}")
        least = 2 if self.adds_eos else 1
        if max_length < least:
            specials = "[BOS] and [EOS]" if self.adds_eos else "[BOS]"
            raise ValueError(f"max_length {max_length} leaves no room for {specials}; use at least {least}")
        ids = np.full((len(texts), max_length), self.pad_id, dtype=np.int64)  # (N, L)
        mask = np.zeros((len(texts), max_length), dtype=bool)               # (N, L)
        for i, enc in enumerate(self._hf.encode_batch(texts)):
            row = enc.ids
            if len(row) > max_length:
                row = row[:max_length - 1] + [self.eos_id] if self.adds_eos else row[:max_length]
            ids[i, :len(row)] = row
            mask[i, :len(row)] = True
        return ids, mask

    def char_spans(self, texts: list[str], max_length: int) -> np.ndarray:
        """Where each piece of encode_batch(texts, max_length) comes from -> int64 (N, L, 2): row i,
        position j holds the (start, end) characters of texts[i] that piece spells, and (-1, -1)
        for [BOS], [EOS] and padding. Truncated as encode_batch truncates."""
        ids, _ = self.encode_batch(texts, max_length)
        spans = np.full(ids.shape + (2,), -1, dtype=np.int64)               # (N, L, 2)
        specials = (self.bos_id, self.eos_id, self.pad_id)
        for i, enc in enumerate(self._hf.encode_batch(list(texts))):
            for j, (piece, offset) in enumerate(zip(ids[i], enc.offsets[:max_length])):
                if piece not in specials:
                    spans[i, j] = offset
        return spans

    def decode(self, ids: Iterable[int]) -> str:
        """ids -> text, special tokens and padding dropped, pieces ("circle", "##s") joined."""
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=True)


def _empty_wordpiece() -> HFTokenizer:
    hf = HFTokenizer(models.WordPiece(unk_token=UNK, max_input_chars_per_word=MAX_WORD_CHARS))
    hf.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()])
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return hf


def train_tokenizer(captions: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, add_eos: bool = True) -> Tokenizer:
    """Train a WordPiece tokenizer on captions -> Tokenizer with at most vocab_size pieces.

    The trainer learns whole words and frequent pieces within vocab_size minus room for
    the word-continuing letters and digits added after it (GUARANTEED_PIECES). The
    trainer breaks ties between equally frequent merges in no fixed order, so the
    vocabulary is then made canonical: only the pieces that the captions' own
    tokenization uses are kept (a longest-match-first tokenizer encodes every caption
    the same without the others), ordered by falling frequency, then alphabetically,
    then the guaranteed pieces. The same captions always give the same JSON.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        fixed = len(SPECIAL_TOKENS) + len(GUARANTEED_PIECES)
        raise ValueError(f"vocab_size {vocab_size} is too small; use at least {MIN_VOCAB_SIZE} "
                         f"(special tokens, letters, digits and punctuation alone take {fixed})")
    captions = [str(c) for c in captions]
    hf = _empty_wordpiece()
    reserve = sum(p.startswith("##") for p in GUARANTEED_PIECES)
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size - reserve, special_tokens=list(SPECIAL_TOKENS),
                                        initial_alphabet=list(WORD_CHARS + string.punctuation), show_progress=False)
    hf.train_from_iterator(captions, trainer)
    learned = dict(hf.get_vocab())                             # piece -> id, in the trainer's order
    for piece in GUARANTEED_PIECES:
        learned.setdefault(piece, len(learned))
    hf.model = models.WordPiece(learned, unk_token=UNK, max_input_chars_per_word=MAX_WORD_CHARS)
    counts = Counter(piece for enc in hf.encode_batch(captions, add_special_tokens=False) for piece in enc.tokens)
    used = sorted((p for p in counts if p not in SPECIAL_TOKENS), key=lambda p: (-counts[p], p))
    pieces = list(SPECIAL_TOKENS) + used + [p for p in GUARANTEED_PIECES if p not in counts]
    hf.model = models.WordPiece({p: i for i, p in enumerate(pieces)}, unk_token=UNK,
                                max_input_chars_per_word=MAX_WORD_CHARS)
    hf.decoder = decoders.WordPiece(prefix="##")
    template = f"{BOS} $A {EOS}" if add_eos else f"{BOS} $A"
    hf.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(BOS, SPECIAL_TOKENS.index(BOS)), (EOS, SPECIAL_TOKENS.index(EOS))])
    return Tokenizer(hf, "trained tokenizer")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Read a tokenizer.json written by Tokenizer.save."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenizerError(f"tokenizer file {path} does not exist; a model folder needs its tokenizer.json") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"cannot read tokenizer file {path} ({e}); "
                             f"replace it with the one saved beside the model") from None
    return Tokenizer.from_str(text, source=str(path))
