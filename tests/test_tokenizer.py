"""The tokenizer: special ids, whole-word tokens for the caption language, padding and
truncation, unknown input never fatal, and a JSON that round-trips exactly."""

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npdiff.data.shapes import caption_corpus
from npdiff.text.tokenizer import Tokenizer, TokenizerError, load_tokenizer, train_tokenizer

# every word the shapes captions use, written out here rather than taken from the grammar
CAPTION_WORDS = ["a", "an", "and", "on", "the", "in", "background", "shape", "small", "large",
                 "circle", "square", "triangle", "left", "right", "top", "bottom", "center",
                 "red", "green", "blue", "yellow", "purple", "orange", "white", "black"]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(caption_corpus(3000, seed=1), vocab_size=256)


def test_special_token_ids(tok):
    assert [tok.tokens("")[0], tok.tokens("")[-1]] == ["[BOS]", "[EOS]"]
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.encode("") == [2, 3]
    assert tok.encode("\N{SNOWMAN}") == [2, 1, 3]       # a character outside the alphabet is [UNK]


def test_every_caption_word_is_one_token(tok):
    for word in CAPTION_WORDS:
        assert tok.tokens(word) == ["[BOS]", word, "[EOS]"], word
    assert len(set(tok.encode(" ".join(CAPTION_WORDS)))) == len(CAPTION_WORDS) + 2
    assert tok.vocab_size <= 256


def test_word_id_names_single_pieces_only(tok):
    assert tok.word_id("and") == tok.encode("and")[1] and tok.word_id("AND") == tok.word_id("and")
    assert tok.word_id("circles") is None       # two pieces, "circle" "##s"
    assert tok.word_id("\N{SNOWMAN}") is None   # [UNK]
    assert tok.word_id("") is None


def test_normalization_and_unseen_words(tok):
    assert tok.encode("A RED Circle") == tok.encode("a red circle")
    assert tok.encode("Café") == tok.encode("cafe")
    assert tok.tokens("circles!") == ["[BOS]", "circle", "##s", "!", "[EOS]"]
    assert tok.decode(tok.encode("Crimson circles!")) == "crimson circles!"


def test_encode_batch_pads_masks_and_truncates(tok):
    texts = ["a red circle", "", "a small red circle on the left and a large blue square on the right"]
    ids, mask = tok.encode_batch(texts, 8)
    assert ids.dtype == np.int64 and mask.dtype == bool and ids.shape == mask.shape == (3, 8)
    assert ids[0, :5].tolist() == tok.encode("a red circle") and ids[0, 5:].tolist() == [0, 0, 0]
    assert mask[0].tolist() == [True] * 5 + [False] * 3
    assert ids[1].tolist() == [2, 3, 0, 0, 0, 0, 0, 0] and mask[1].sum() == 2
    full = tok.encode(texts[2])
    assert len(full) > 8 and ids[2].tolist() == full[:7] + [3] and mask[2].all()
    with pytest.raises(ValueError, match="max_length"):
        tok.encode_batch(texts, 1)
    with pytest.raises(TypeError, match="list"):
        tok.encode_batch("a red circle", 8)


def test_without_eos():
    tok = train_tokenizer(["a red circle", "a blue square"], vocab_size=128, add_eos=False)
    assert tok.encode("") == [2] and not tok.adds_eos
    ids, mask = tok.encode_batch(["a red circle", ""], 3)
    assert ids.tolist() == [tok.encode("a red circle")[:3], [2, 0, 0]]
    assert mask.tolist() == [[True] * 3, [True, False, False]]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=40), min_size=1, max_size=5), st.integers(2, 30))
def test_any_text_encodes(tok, texts, max_length):
    ids, mask = tok.encode_batch(texts, max_length)
    assert ids.shape == (len(texts), max_length)
    assert (ids[:, 0] == 2).all() and mask[:, 0].all()                 # [BOS] first, always real
    assert ((ids >= 0) & (ids < tok.vocab_size)).all()
    lengths = mask.sum(1)
    assert (mask == (np.arange(max_length) < lengths[:, None])).all()   # real tokens, then padding
    assert (ids[~mask] == 0).all()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(CAPTION_WORDS) | st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=12),
                max_size=12))
def test_decode_inverts_encode_on_lowercase_words(tok, words):
    text = " ".join(words)
    assert tok.decode(tok.encode(text)) == text


def test_json_round_trips_exactly(tok, tmp_path):
    text = tok.to_str()
    again = Tokenizer.from_str(text)
    assert again.to_str() == text
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    assert path.read_text(encoding="utf-8") == text
    loaded = load_tokenizer(path)
    assert loaded.to_str() == text
    sample = caption_corpus(50, seed=9) + ["zebra circles!", ""]
    for a, b in zip(tok.encode_batch(sample, 24), loaded.encode_batch(sample, 24)):
        assert np.array_equal(a, b)
    assert json.loads(text)["model"]["type"] == "WordPiece"


def test_save_replaces_atomically(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text("old", encoding="utf-8")
    tok.save(path)
    assert path.read_text(encoding="utf-8") == tok.to_str()
    assert os.listdir(tmp_path) == ["tokenizer.json"]              # no temporary file left behind


def test_training_is_deterministic():
    """The trainer breaks ties in no fixed order (this failed before the vocabulary was made canonical)."""
    corpus = caption_corpus(2000, seed=3)
    first = train_tokenizer(corpus).to_str()
    assert all(train_tokenizer(corpus).to_str() == first for _ in range(4))


def test_bad_files_give_clear_errors(tmp_path, tok):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match="bad.json is not a valid tokenizer.json"):
        load_tokenizer(bad)
    # a valid Hugging Face tokenizer whose specials sit at other ids
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    vocab["[PAD]"], vocab["[UNK]"] = vocab["[UNK]"], vocab["[PAD]"]
    for added in data["added_tokens"]:
        added["id"] = vocab[added["content"]]
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"\[PAD\] at id 1"):
        load_tokenizer(other)


def test_vocab_size_too_small_is_refused():
    with pytest.raises(ValueError, match="at least 128"):
        train_tokenizer(["a red circle"], vocab_size=64)


def test_char_spans_point_at_each_piece(tok):
    texts = caption_corpus(50, seed=5) + ["", "a purplish circle"]
    ids, mask = tok.encode_batch(texts, 24)
    spans = tok.char_spans(texts, 24)
    assert spans.shape == (len(texts), 24, 2)
    for text, row, m, sp in zip(texts, ids, mask, spans):
        pieces = [tok._hf.id_to_token(int(i)) for i in row]
        for piece, real, (a, b) in zip(pieces, m, sp):
            if not real or piece in ("[BOS]", "[EOS]"):
                assert (a, b) == (-1, -1)
            else:
                assert text[a:b] == piece.removeprefix("##")
    long = tok.char_spans(["a red circle " * 10], 8)                  # truncated as encode_batch truncates
    assert long[0, 7].tolist() == [-1, -1] and long[0, 6].tolist() != [-1, -1]
