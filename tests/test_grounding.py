"""The cross-attention grounding loss (npdiff/grounding.py): which tokens name which object, its
value on attention that follows the masks and on attention that does not, and its gradient."""

import numpy as np
import pytest

from npdiff import grounding
from npdiff.data import shapes
from npdiff.nn.gradcheck import directional_check
from npdiff.text.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(shapes.caption_corpus(2000), vocab_size=256)


def test_token_groups_follow_the_caption_phrases(tokenizer):
    captions = ["a red circle on the left and a blue square on the right on a black background",
                "a green triangle", ""]
    groups = grounding.token_groups(tokenizer, captions, 24, phrase_tokens=2)
    words = tokenizer.tokens(captions[0])                  # [BOS] a red circle on the left and ... [EOS]
    cut, bg = words.index("and"), len(words) - 5           # "on a black background [EOS]"
    expected = [-1] + [0] * (cut - 1) + [-1] + [1] * (bg - cut - 1) + [2] * 4 + [-1] * (24 - len(words) + 1)
    assert groups[0, :24].tolist() == expected and groups[0, 24:].tolist() == [0, 1]
    n = len(tokenizer.tokens(captions[1]))
    assert groups[1].tolist() == [-1] + [0] * (n - 2) + [-1] * (24 - n + 1) + [0, -1]
    assert (groups[2] == -1).all()


def attention(groups, regions, follow, rng, E=2, hw=(4, 4)):
    """Weights (N, E, HW, M) in which each pixel puts 0.8 of its attention on the tokens of the thing
    that covers it most (follow=True) or on another named thing's (False), the rest spread evenly."""
    N, M = groups.shape
    cover = grounding._pool(regions, hw)                                        # (N, 3, HW)
    P = np.full((N, E, hw[0] * hw[1], M), 0.2 / M)
    for n in range(N):
        named = [g for g in range(3) if (groups[n] == g).any()]
        for l in range(hw[0] * hw[1]):
            best = max(named, key=lambda g: cover[n, g, l])
            target = best if follow else named[(named.index(best) + 1) % len(named)]
            P[n, :, l, groups[n] == target] += 0.8 / (groups[n] == target).sum()
    return P


def test_loss_is_low_when_attention_follows_the_masks(tokenizer):
    rng = np.random.default_rng(0)
    images, captions, _, masks = shapes.sample_batch(rng, 12, resolution=16, return_masks=True)
    captions[0] = "a red circle on the left and a blue square on the right"        # at least one pair
    groups = grounding.token_groups(tokenizer, captions, 24)
    region = grounding.regions(masks)
    np.testing.assert_allclose(region.sum(axis=1), 1.0, atol=1e-6)
    right = grounding.grounding_loss({"a": (attention(groups, region, True, rng), (4, 4))}, groups, region)[0]
    wrong = grounding.grounding_loss({"a": (attention(groups, region, False, rng), (4, 4))}, groups, region)[0]
    assert 0 < right < 0.5 < 1.5 < wrong
    # nothing to tell apart: one named thing per caption (or none) gives no loss and no gradient
    lone = grounding.token_groups(tokenizer, ["a red circle", "", "a shape"], 24)
    P = rng.random((3, 2, 16, 24))
    assert grounding.grounding_loss({"a": (P, (4, 4))}, lone, region[:3]) == (0.0, {})


def test_gradient_matches_finite_differences(tokenizer):
    rng = np.random.default_rng(1)
    captions = ["a red circle on the left and a blue square on the right on a black background",
                "a small yellow triangle on a white background", "a circle", "a square and a triangle"]
    groups = grounding.token_groups(tokenizer, captions, 24)
    region = grounding.regions(rng.random((4, 2, 8, 8)) * 0.5)
    maps = {"a": (rng.random((4, 2, 16, 24)) + 0.05, (4, 4)), "b": (rng.random((4, 2, 4, 24)) + 0.05, (2, 2))}
    loss, dprobs = grounding.grounding_loss(maps, groups, region)
    assert np.isfinite(loss) and loss > 0 and sorted(dprobs) == ["a", "b"]
    assert not dprobs["a"][2].any()                       # one named thing: no gradient for that image
    f = lambda: grounding.grounding_loss(maps, groups, region)[0]  # noqa: E731
    arrays = [maps["a"][0], maps["b"][0]]
    for along_gradient in (False, True):
        assert directional_check(f, arrays, [dprobs["a"], dprobs["b"]], rng, along_gradient=along_gradient) <= 1e-6
