"""The text encoder: a directional-derivative check of the whole backward pass in float64
(relative error <= 1e-6, over all parameters at once and each one alone), the masked-mean pooling,
padding invariance, the empty caption, config round trips and input errors; the phrase tokens
against means taken word by word, and their gradient."""

import json

import numpy as np
import pytest

from npdiff.nn.gradcheck import directional_check
from npdiff.nn.text_encoder import (TextEncoderConfig, add_phrase_tokens, add_phrase_tokens_backward,
                                    init_text_encoder, text_encoder_backward, text_encoder_forward)

TINY = TextEncoderConfig(vocab_size=11, max_length=6, width=4, num_layers=2, num_heads=2, mlp_ratio=2)
TINY_REL = TextEncoderConfig(**{**TINY.to_dict(), "rel_pos": 2})  # offsets beyond +-2 share a column


def batch(rng, N=3, L=5, V=11):
    ids = rng.integers(1, V, size=(N, L))
    ids[:, 0] = 1  # BOS
    lengths = rng.integers(1, L + 1, size=N)
    lengths[0] = 1  # the empty caption: BOS only
    mask = np.arange(L)[None, :] < lengths[:, None]
    ids[~mask] = 0  # padding id
    return ids, mask


def perturbed(config, rng):
    p = init_text_encoder(config, rng, np.float64)
    return {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in p.items()}


@pytest.mark.parametrize("config", [TINY, TINY_REL], ids=["absolute", "relative-bias"])
def test_text_encoder_directional_derivative(config):
    rng = np.random.default_rng(0)
    p = perturbed(config, rng)
    ids, mask = batch(rng)
    tokens, pooled, cache = text_encoder_forward(p, config, ids, mask)
    Rt, Rp = rng.standard_normal(tokens.shape), rng.standard_normal(pooled.shape)
    grads = text_encoder_backward(p, config, Rt, Rp, cache)
    assert set(grads) == set(p)

    def loss():
        tok, pool, _ = text_encoder_forward(p, config, ids, mask)
        return float(np.sum(tok * Rt) + np.sum(pool * Rp))

    names = sorted(p)
    err = directional_check(loss, [p[k] for k in names], [grads[k] for k in names], rng)
    assert err <= 1e-6, err
    # token rows never looked up have exactly zero gradient; check the rest one parameter at a time
    worst = max((directional_check(loss, [p[k]], [grads[k]], rng, along_gradient=True), k) for k in names)
    assert worst[0] <= 1e-6, worst


def test_pooled_is_masked_mean_and_padding_is_ignored():
    rng = np.random.default_rng(1)
    p = init_text_encoder(TINY, rng, np.float64)
    ids, mask = batch(rng, N=4)
    tokens, pooled, _ = text_encoder_forward(p, TINY, ids, mask)
    for n in range(4):
        np.testing.assert_allclose(pooled[n], tokens[n, mask[n]].mean(axis=0), rtol=1e-12)
    # other ids at padding positions, or no padding at all, change nothing for real tokens
    ids2 = ids.copy()
    ids2[~mask] = rng.integers(1, 11, size=(~mask).sum())
    tokens2, pooled2, _ = text_encoder_forward(p, TINY, ids2, mask)
    np.testing.assert_allclose(pooled2, pooled, rtol=1e-12)
    np.testing.assert_allclose(tokens2[mask], tokens[mask], rtol=1e-12)
    n = int(np.argmax(mask.sum(1) < 5))  # a padded row, alone and unpadded
    k = mask[n].sum()
    tok1, pool1, _ = text_encoder_forward(p, TINY, ids[n:n + 1, :k], mask[n:n + 1, :k])
    np.testing.assert_allclose(pool1[0], pooled[n], rtol=1e-10)


def test_empty_caption_is_finite_and_all_padding_is_an_error():
    rng = np.random.default_rng(2)
    p = init_text_encoder(TINY, rng, np.float32)
    ids = np.array([[1, 0, 0], [1, 5, 0]])
    mask = ids != 0
    tokens, pooled, cache = text_encoder_forward(p, TINY, ids, mask)
    assert tokens.dtype == np.float32 and np.all(np.isfinite(tokens)) and np.all(np.isfinite(pooled))
    grads = text_encoder_backward(p, TINY, None, np.ones_like(pooled), cache)
    assert all(np.all(np.isfinite(g)) and g.dtype == np.float32 for g in grads.values())
    with pytest.raises(ValueError, match="BOS"):
        text_encoder_forward(p, TINY, np.zeros((1, 3), np.int64), np.zeros((1, 3), bool))


def test_input_errors_and_config_round_trip():
    rng = np.random.default_rng(3)
    p = init_text_encoder(TINY, rng)
    with pytest.raises(ValueError, match="max_length=6"):
        text_encoder_forward(p, TINY, np.ones((1, 7), np.int64), np.ones((1, 7), bool))
    with pytest.raises(ValueError, match="vocab_size"):
        text_encoder_forward(p, TINY, np.array([[1, 40]]), np.ones((1, 2), bool))
    back = TextEncoderConfig.from_dict(json.loads(json.dumps(TINY.to_dict())))
    assert back == TINY
    with pytest.raises(ValueError, match="unknown fields"):
        TextEncoderConfig.from_dict({"dim": 3})
    with pytest.raises(ValueError, match="num_heads"):
        init_text_encoder(TextEncoderConfig(width=6, num_heads=4), rng)


def test_embedding_scale_decides_whether_a_token_keeps_its_identity():
    """With width 128 and the default 2 blocks, swap one token of a 12-token caption. At embedding std
    0.02 the blocks' outputs swamp the embeddings: every token's feature moves by a similar amount. At
    std 1 the swapped token moves far more than any other (each token stays itself)."""
    config = TextEncoderConfig(vocab_size=40, max_length=16, width=128, num_layers=2)
    ids = np.array([[1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]] * 2)
    ids[1, 6] = 30                                                  # one word swapped
    mask = np.ones(ids.shape, bool)

    def moves(std):
        p = init_text_encoder(config, np.random.default_rng(0), np.float64, embed_std=std)
        assert abs(p["token_embed.weight"].std() / std - 1) < 0.05
        tokens, _, _ = text_encoder_forward(p, config, ids, mask)
        d = np.linalg.norm(tokens[0] - tokens[1], axis=-1)
        return d[6], np.delete(d, 6).max()

    swapped, others = moves(0.02)
    assert swapped < 3 * others
    swapped, others = moves(1.0)
    assert swapped > 10 * others
    with pytest.raises(ValueError, match="embed_std"):
        init_text_encoder(config, np.random.default_rng(0), embed_std=0.0)


def test_local_attention_prior_reads_forward_and_backward_from_distance_penalties():
    from npdiff.nn.attention import relative_bias
    from npdiff.nn.text_encoder import local_attention_prior
    table = local_attention_prior(num_heads=4, max_offset=3, slope=0.5)  # columns: offsets -3 ... 3
    np.testing.assert_array_equal(table[0], [-3, -3, -3, 0, -0.5, -1, -1.5])
    np.testing.assert_array_equal(table[1], table[0][::-1])
    assert not table[2:].any()                     # the other heads start global
    assert not local_attention_prior(4, 3, 0.0).any()
    # with content-free scores, head 0's attention from word i falls off with distance ahead and
    # all but vanishes behind: word 1 of 6 weighs word 2 over word 4, and word 0 at e^-3 of itself
    p = np.exp(relative_bias(table, 6))
    p /= p.sum(axis=-1, keepdims=True)
    assert p[0, 1, 1] > p[0, 1, 2] > p[0, 1, 4] > p[0, 1, 0] and p[0, 1, 0] / p[0, 1, 1] < 0.06
    assert p[1, 4, 4] > p[1, 4, 3] > p[1, 4, 1] > p[1, 4, 5]
    with pytest.raises(ValueError, match="rel_slope"):
        init_text_encoder(TINY_REL, np.random.default_rng(0), rel_slope=-1.0)


@pytest.mark.parametrize("std", [0.0, -1.0, np.inf, np.nan])
def test_embedding_scale_must_be_positive_and_finite(std):
    with pytest.raises(ValueError, match="embed_std must be positive and finite"):
        init_text_encoder(TINY, np.random.default_rng(0), embed_std=std)


AND = 9   # the separator id of the phrase tests
TINY_PHRASES = TextEncoderConfig(**{**TINY_REL.to_dict(), "max_length": 10, "phrase_tokens": 2,
                                    "phrase_separators": (AND,)})
PHRASE_IDS = np.array([[1, 4, 5, AND, 6, 7, 3, 0, 0, 0],          # two phrases
                       [1, 4, AND, 5, AND, 6, 7, 3, 0, 0],        # three: the third folds into the second
                       [1, 3, 0, 0, 0, 0, 0, 0, 0, 0],            # the empty caption: one phrase
                       [1, 4, 5, AND, 0, 0, 0, 0, 0, 0]])         # a trailing "and": the second is empty
PHRASES = [([0, 1, 2], [4, 5, 6]), ([0, 1], [3, 5, 6, 7]), ([0, 1], []), ([0, 1, 2], [])]
PHRASE_MASK = PHRASE_IDS != 0


def encode_phrases(p):
    """PHRASE_IDS through the encoder and the phrase tokens -> (tokens, pooled, cache, context,
    context mask, P)."""
    tokens, pooled, cache = text_encoder_forward(p, TINY_PHRASES, PHRASE_IDS, PHRASE_MASK)
    return (tokens, pooled, cache) + add_phrase_tokens(TINY_PHRASES, tokens, PHRASE_IDS, PHRASE_MASK)


def test_phrase_tokens_are_the_means_of_their_words():
    rng = np.random.default_rng(5)
    tokens, _, _, context, context_mask, _ = encode_phrases(perturbed(TINY_PHRASES, rng))
    mask = PHRASE_MASK
    assert context.shape == (4, 12, 4) and context_mask.shape == (4, 12)
    np.testing.assert_array_equal(context[:, :10], tokens)
    np.testing.assert_array_equal(context_mask[:, :10], mask)
    for n, phrases in enumerate(PHRASES):
        for c, positions in enumerate(phrases):
            assert context_mask[n, 10 + c] == bool(positions)
            if positions:
                np.testing.assert_allclose(context[n, 10 + c], tokens[n, positions].mean(axis=0), rtol=1e-12)
    # without phrase tokens the context is the tokens themselves
    plain = TextEncoderConfig(**{**TINY_PHRASES.to_dict(), "phrase_tokens": 0})
    same, same_mask, P = add_phrase_tokens(plain, tokens, PHRASE_IDS, mask)
    assert same is tokens and P is None and np.array_equal(same_mask, mask)


def test_phrase_tokens_directional_derivative():
    rng = np.random.default_rng(6)
    p = perturbed(TINY_PHRASES, rng)
    tokens, pooled, cache, context, context_mask, P = encode_phrases(p)
    Rc = rng.standard_normal(context.shape) * context_mask[..., None]   # the U-Net reads real keys only
    Rp = rng.standard_normal(pooled.shape)
    grads = text_encoder_backward(p, TINY_PHRASES, add_phrase_tokens_backward(Rc, P), Rp, cache)

    def loss():
        _, pool, _, ctx, _, _ = encode_phrases(p)
        return float(np.sum(ctx * Rc) + np.sum(pool * Rp))

    names = sorted(p)
    err = directional_check(loss, [p[k] for k in names], [grads[k] for k in names], rng, along_gradient=True)
    assert err <= 1e-6, err


def test_phrase_config_is_checked_and_round_trips():
    back = TextEncoderConfig.from_dict(json.loads(json.dumps(TINY_PHRASES.to_dict())))
    assert back == TINY_PHRASES and back.phrase_separators == (AND,)
    with pytest.raises(ValueError, match=r"phrase_separators \[11\] are not token ids in \[0, 11\)"):
        TextEncoderConfig(**{**TINY_PHRASES.to_dict(), "phrase_separators": (11,)}).validate()
    with pytest.raises(ValueError, match="phrase_tokens must be a whole number >= 0"):
        TextEncoderConfig(phrase_tokens=-1).validate()
