"""A grounding loss on cross-attention: each object's pixels should look at their own object's words.

The denoising loss alone lets a U-Net read a two-object caption as a bag of words: it learns that
"red", "blue", "circle" and "square" are present, not which color goes with which shape or where.
The shapes dataset knows more than the caption: where every object it names was drawn. This loss
uses that, as TokenCompose (Wang et al. 2024) grounds each noun token in its segmentation mask: for
every cross-attention layer, a pixel of object k should put more of its attention on the words of
object k's phrase than on the other object's phrase or the background phrase.

A caption of the grammar names up to three things (shapes.phrase_spans): the first object, the second
and the background. For a layer with weights P (N, E, HW, M) over the context's M tokens, the share
of attention pixel l gives thing g is the head mean

    a[n, g, l] = (1 / E) sum_e sum_{m in g} P[n, e, l, m]

and the loss is a cross-entropy between things, weighted by how much of the pixel each thing covers
(its region r: an object's coverage, the background's 1 - coverage, pooled to the layer's size):

    loss = sum_{n,g,l} r[n,g,l] (log sum_{g' named} a[n,g',l] - log a[n,g,l]) / sum_{n,g,l} r[n,g,l]

over the things a caption names, for images whose caption names at least two (one thing alone has
nothing to be told apart from). Tokens that belong to no thing ([BOS], [EOS], "and") can take any
share: the loss only compares named things with each other. The layers' losses are averaged.
With phrase tokens (text_encoder.py), phrase c belongs to object c.

Dimension letters: N batch, E heads, HW pixels of a layer, M context tokens, G = 3 things.
"""

from __future__ import annotations

import numpy as np

from npdiff.data.shapes import phrase_spans

THINGS = 3          # the first object, the second object, the background
EPS = 1e-6          # keeps log a finite where a thing gets no attention at all


def token_groups(tokenizer, captions: list[str], max_length: int, phrase_tokens: int = 0) -> np.ndarray:
    """Which thing each context token names -> int64 (N, max_length + phrase_tokens): 0 or 1 for the
    first or second object's phrase, 2 for the background phrase, -1 for none."""
    spans = tokenizer.char_spans(captions, max_length)                       # (N, L, 2)
    groups = np.full((len(captions), max_length + phrase_tokens), -1, dtype=np.int64)
    for n, caption in enumerate(captions):
        for g, span in enumerate(phrase_spans(caption)):
            if span is not None:
                inside = (spans[n, :, 0] >= span[0]) & (spans[n, :, 1] <= span[1]) & (spans[n, :, 0] >= 0)
                groups[n, :max_length][inside] = g
        for c in range(min(phrase_tokens, 2)):                                # phrase c is object c's
            if (groups[n, :max_length] == c).any():
                groups[n, max_length + c] = c
    return groups


def regions(masks: np.ndarray) -> np.ndarray:
    """Object coverage (N, 2, H, W) -> the three things' regions (N, 3, H, W): the two objects and
    the background, 1 minus their coverage."""
    background = np.clip(1.0 - masks.sum(axis=1, keepdims=True), 0.0, 1.0)
    return np.concatenate([masks, background], axis=1)


def _pool(region: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(N, G, H, W) -> (N, G, h*w), averaged over blocks (H and W multiples of h and w)."""
    N, G, H, W = region.shape
    h, w = hw
    return region.reshape(N, G, h, H // h, w, W // w).mean(axis=(3, 5)).reshape(N, G, h * w)


def grounding_loss(maps: dict, groups: np.ndarray, region: np.ndarray):
    """maps {layer: (P (N, E, HW, M), (h, w))} as unet.cross_attention_maps gives them, groups (N, M)
    from token_groups, region (N, 3, H, W) from regions -> (loss, {layer: dloss/dP}). No image whose
    caption names two things: loss 0 and no gradients."""
    onehot = (groups[:, None, :] == np.arange(THINGS)[None, :, None]).astype(np.float64)  # (N, G, M)
    named = onehot.any(axis=2)                                                # (N, G)
    active = named.sum(axis=1) >= 2                                           # (N,)
    if not active.any() or not maps:
        return 0.0, {}
    total, dprobs = 0.0, {}
    for name, (P, hw) in maps.items():
        E = P.shape[1]
        a = np.einsum("nelm,ngm->ngl", P, onehot, dtype=np.float64) / E       # (N, G, HW)
        r = _pool(region, hw) * (named & active[:, None])[:, :, None]         # (N, G, HW)
        Z = r.sum()
        S = (a * named[:, :, None]).sum(axis=1)                               # (N, HW)
        total += float((r * (np.log(S + EPS)[:, None] - np.log(a + EPS))).sum() / Z)
        # d/da[g] = named[g] sum_g' r[g'] / (S + eps) - r[g] / (a[g] + eps), then 1/(Z * layers)
        da = (named[:, :, None] * (r.sum(axis=1) / (S + EPS))[:, None] - r / (a + EPS)) / (Z * len(maps))
        dprobs[name] = (np.einsum("ngl,ngm->nlm", da, onehot) / E)[:, None].repeat(E, axis=1).astype(P.dtype)
    return total / len(maps), dprobs
