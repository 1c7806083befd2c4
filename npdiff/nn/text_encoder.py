"""The text encoder: a small bidirectional transformer, forward and backward by hand.

    h      = token_embed[ids] + pos_embed[0:L]                           (N, L, D)
    repeat num_layers times (pre-LN, Radford et al. 2019; Xiong et al. 2020):
        h  = h + proj(SelfAttention(LN1(h), key padding mask [, relative position bias]))
        h  = h + fc2(GELU(fc1(LN2(h))))
    tokens = LN_final(h)                                                 (N, L, D)
    pooled = sum_l mask[l] tokens[l] / sum_l mask[l]                     (N, D)

The pooled vector is the masked mean over real tokens (padding excluded). Every row of the mask
needs at least one True: the caller's ids must already carry a BOS/CLS token at position 0 (so
the empty caption "" becomes [BOS] and still has one real token); id 0 is padding, by the
tokenizer's convention, but nothing here treats any id specially. Token features at padding
positions are computed (they attend to the real tokens) but take part in nothing downstream: the
pooled mean and the U-Net's cross-attention both mask them out.

With rel_pos = K > 0, each block's attention also adds a learned bias per head and per key-query
offset, clipped to [-K, K] (attention.py). Absolute positions say where a word is; the offset bias
lets a head learn where to look from any word ("the place words a few tokens after me"), which is
what can bind "red" to the "left" of its own phrase and not to the other object's "right".

With phrase_tokens = C > 0, the encoder also returns one feature per phrase: the caption is cut at
its separator tokens (the id of "and"), and phrase c's feature is the mean of the final token
features of its words, separators and padding left out (a caption with more than C phrases folds
the rest into the last one). They join the context as C more tokens, masked where a phrase is
empty. A phrase feature holds its object's color, shape and place words at once, so a U-Net query
on the left that looks for "left" reads "red circle" with it: the binding a plain token sequence
leaves the network to learn. Feng et al. 2023 (StructureDiffusion) feed noun phrases to
cross-attention one at a time for the same reason.

    phrase[n, c] = sum_l P[n, c, l] tokens[n, l],  P[n, c, l] = [phrase(l) = c] / #{l: phrase(l) = c}

Parameter names: token_embed.weight (V, D), pos_embed.weight (Lmax, D),
blocks.{i}.{ln1,attn.qkv,attn.proj,ln2,mlp.fc1,mlp.fc2}.{weight,bias}, ln_final.{weight,bias},
and with rel_pos > 0 blocks.{i}.attn.rel_bias (E, 2K+1).

Dimension legend: N batch, L tokens, D width, V vocabulary size, Lmax longest sequence.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from npdiff.nn import layers as F
from npdiff.nn.attention import check_key_mask, self_attention_backward, self_attention_forward


@dataclass
class TextEncoderConfig:
    vocab_size: int = 1024          # must cover every id the tokenizer produces (0 = padding)
    max_length: int = 32            # longest token sequence (BOS included); sets pos_embed's rows
    width: int = 128                # token feature width D (the U-Net's context_dim)
    num_layers: int = 4             # transformer blocks
    num_heads: int = 4              # attention heads (head width = width / heads)
    mlp_ratio: int = 4              # hidden width of the MLP = width * mlp_ratio
    norm_eps: float = 1e-5          # layer-norm epsilon (PyTorch's default)
    rel_pos: int = 0                # K: learned attention bias per offset in [-K, K]; 0 = none
    phrase_tokens: int = 0          # C: phrase features appended to the tokens; 0 = none
    phrase_separators: tuple[int, ...] = ()   # token ids that end a phrase (the tokenizer's "and")

    def __post_init__(self):
        self.phrase_separators = tuple(self.phrase_separators)   # JSON gives a list

    def validate(self) -> None:
        if self.width % self.num_heads:
            raise ValueError(f"TextEncoderConfig: width {self.width} does not split into "
                             f"num_heads={self.num_heads}")
        if not (isinstance(self.rel_pos, int) and self.rel_pos >= 0):
            raise ValueError(f"TextEncoderConfig: rel_pos must be a whole number >= 0, got {self.rel_pos!r}")
        if not (isinstance(self.phrase_tokens, int) and self.phrase_tokens >= 0):
            raise ValueError(f"TextEncoderConfig: phrase_tokens must be a whole number >= 0, "
                             f"got {self.phrase_tokens!r}")
        bad = [i for i in self.phrase_separators if not (isinstance(i, int) and 0 <= i < self.vocab_size)]
        if bad:
            raise ValueError(f"TextEncoderConfig: phrase_separators {bad} are not token ids in "
                             f"[0, {self.vocab_size})")

    def to_dict(self) -> dict:
        """The JSON form (lists for tuples), as config.json stores it."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "TextEncoderConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"TextEncoderConfig: unknown fields {unknown}; known fields are {sorted(names)}")
        return cls(**d)


def local_attention_prior(num_heads: int, max_offset: int, slope: float) -> np.ndarray:
    """A relative position bias table (E, 2K+1) that starts head 0 reading forward and head 1 backward.

    Head 0 gets -slope k at offsets k >= 0 and -2 slope K behind; head 1 is its mirror image; the
    other heads start at 0 (global). It is a linear distance penalty as in ALiBi (Press et al. 2022),
    made one-sided so that a word's feature starts as a mix of itself and the next (or previous) few
    words: at slope 0.5 "red" in "a red circle on the left and a blue square on the right" weighs its
    own "left" (4 ahead) by e^-2 and the other object's "right" (11 ahead, clipped to 8) by e^-4.
    slope 0 gives all zeros. The table stays learnable; this is only where it starts."""
    table = np.zeros((num_heads, 2 * max_offset + 1))
    if slope:
        k = np.arange(-max_offset, max_offset + 1)
        forward = np.where(k >= 0, -slope * k, -2.0 * slope * max_offset)
        for e, row in zip(range(num_heads), (forward, forward[::-1])):
            table[e] = row
    return table


def init_text_encoder(config: TextEncoderConfig, rng: np.random.Generator, dtype=np.float32,
                      embed_std: float = 0.02, rel_slope: float = 0.0):
    """Fresh parameters: embeddings N(0, embed_std^2) (0.02 as in GPT-2; 1 is PyTorch's nn.Embedding
    default), linear maps U(+-1/sqrt(fan_in)) (PyTorch's default), layer norms weight 1 and bias 0,
    relative position biases local_attention_prior(E, K, rel_slope) in every block (at rel_slope 0,
    all zeros: attention then starts as it would without them).

    The embedding scale decides what a token's feature is at the start. Each block adds an output of
    norm about 4 at width 128 whatever the input's scale (its input is layer-normed), so embeddings of
    norm 0.02 sqrt(D) = 0.23 are drowned: every token's feature is then nearly the caption's mean, and
    swapping "left" for "right" moves all tokens a little. At norm sqrt(D) = 11 the residual stream
    keeps each token itself, and the blocks add context to it.
    """
    config.validate()
    if not 0 < embed_std < np.inf:
        raise ValueError(f"text encoder: embed_std must be positive and finite, got {embed_std}")
    if not 0 <= rel_slope < np.inf:
        raise ValueError(f"text encoder: rel_slope must be finite and >= 0, got {rel_slope}")
    D, H = config.width, config.width * config.mlp_ratio
    p = {"token_embed.weight": embed_std * rng.standard_normal((config.vocab_size, D)),
         "pos_embed.weight": embed_std * rng.standard_normal((config.max_length, D))}

    def linear(name, J, I):
        bound = 1.0 / np.sqrt(I)
        p[f"{name}.weight"] = rng.uniform(-bound, bound, (J, I))
        p[f"{name}.bias"] = rng.uniform(-bound, bound, J)

    def norm(name):
        p[f"{name}.weight"], p[f"{name}.bias"] = np.ones(D), np.zeros(D)

    for i in range(config.num_layers):
        b = f"blocks.{i}"
        norm(f"{b}.ln1")
        linear(f"{b}.attn.qkv", 3 * D, D)
        linear(f"{b}.attn.proj", D, D)
        if config.rel_pos:
            p[f"{b}.attn.rel_bias"] = local_attention_prior(config.num_heads, config.rel_pos, rel_slope)
        norm(f"{b}.ln2")
        linear(f"{b}.mlp.fc1", H, D)
        linear(f"{b}.mlp.fc2", D, H)
    norm("ln_final")
    return {k: v.astype(dtype) for k, v in p.items()}


def _check_inputs(config, ids, mask):
    ids, mask = np.asarray(ids), np.asarray(mask)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"text encoder: ids must be an integer array (N, L), got {ids.dtype} {ids.shape}")
    N, L = ids.shape
    if L > config.max_length:
        raise ValueError(f"text encoder: {L} tokens exceed max_length={config.max_length}; "
                         "truncate in the tokenizer")
    return ids, check_key_mask(mask, N, L, "text mask")


def text_encoder_forward(params, config, ids, mask):
    """ids (N, L) int token ids (BOS included), mask (N, L) bool, True for real tokens and at least
    one per row. Returns (tokens (N, L, D), pooled (N, D), cache), in the parameters' dtype."""
    ids, mask = _check_inputs(config, ids, mask)
    L = ids.shape[1]
    D = config.width
    eps = config.norm_eps
    h, c_tok = F.embedding_forward(ids, params["token_embed.weight"])  # (N, L, D)
    h = h + params["pos_embed.weight"][:L]
    blocks = []
    for i in range(config.num_layers):
        b = f"blocks.{i}."
        a, c_ln1 = F.layer_norm_forward(h, params[b + "ln1.weight"], params[b + "ln1.bias"], eps)
        a, c_att = self_attention_forward(a, params[b + "attn.qkv.weight"], params[b + "attn.qkv.bias"],
                                          params[b + "attn.proj.weight"], params[b + "attn.proj.bias"],
                                          config.num_heads, key_mask=mask,
                                          rel_bias=params[b + "attn.rel_bias"] if config.rel_pos else None)
        h = h + a
        m, c_ln2 = F.layer_norm_forward(h, params[b + "ln2.weight"], params[b + "ln2.bias"], eps)
        m, c_fc1 = F.linear_forward(m, params[b + "mlp.fc1.weight"], params[b + "mlp.fc1.bias"])  # (N, L, 4D)
        m, c_gelu = F.gelu_forward(m)
        m, c_fc2 = F.linear_forward(m, params[b + "mlp.fc2.weight"], params[b + "mlp.fc2.bias"])  # (N, L, D)
        h = h + m
        blocks.append((c_ln1, c_att, c_ln2, c_fc1, c_gelu, c_fc2))
    tokens, c_lnf = F.layer_norm_forward(h, params["ln_final.weight"], params["ln_final.bias"], eps)
    w = (mask / mask.sum(axis=1, keepdims=True)).astype(tokens.dtype)  # (N, L) mean weights
    pooled = np.einsum("nl,nld->nd", w, tokens)  # (N, D)
    assert pooled.shape[1] == D
    return tokens, pooled, (c_tok, L, blocks, c_lnf, w)


def phrase_weights(config, ids, mask) -> tuple[np.ndarray, np.ndarray]:
    """The phrase means as weights: P (N, C, L), each row a mean over one phrase's tokens (all zeros
    for an empty phrase), and the phrase mask (N, C), True where a phrase has a token. Token l belongs
    to phrase min(number of separators at positions <= l, C - 1); separators and padding to none."""
    ids, mask = np.asarray(ids), np.asarray(mask, dtype=bool)
    C = config.phrase_tokens
    sep = np.isin(ids, config.phrase_separators) & mask                    # (N, L)
    phrase = np.minimum(np.cumsum(sep, axis=1), C - 1)                      # (N, L)
    member = (phrase[:, None, :] == np.arange(C)[None, :, None]) & (mask & ~sep)[:, None, :]  # (N, C, L)
    count = member.sum(axis=2)                                              # (N, C)
    return member / np.maximum(count, 1)[:, :, None], count > 0


def add_phrase_tokens(config, tokens, ids, mask):
    """tokens (N, L, D) -> (context (N, L + C, D), context mask (N, L + C), P (N, C, L)): the token
    features followed by the phrase features. With phrase_tokens 0, the tokens and mask as they are."""
    mask = np.asarray(mask, dtype=bool)
    if not config.phrase_tokens:
        return tokens, mask, None
    P, phrase_mask = phrase_weights(config, ids, mask)
    P = P.astype(tokens.dtype)
    phrases = np.einsum("ncl,nld->ncd", P, tokens)                          # (N, C, D)
    return np.concatenate([tokens, phrases], axis=1), np.concatenate([mask, phrase_mask], axis=1), P


def add_phrase_tokens_backward(dcontext, P):
    """d context (N, L + C, D) -> d tokens (N, L, D)."""
    if P is None or np.ndim(dcontext) == 0:    # no phrases, or no cross-attention read the context
        return dcontext
    L = P.shape[2]
    return dcontext[:, :L] + np.einsum("ncd,ncl->nld", dcontext[:, L:], P)


def text_encoder_backward(params, config, dtokens, dpooled, cache):
    """Gradients of sum(tokens * dtokens) + sum(pooled * dpooled); either may be None.
    Returns a dict with one gradient per parameter name."""
    c_tok, L, blocks, c_lnf, w = cache
    grads = {}
    dtype = w.dtype
    dh = np.zeros(c_lnf[0].shape, dtype=dtype) if dtokens is None else dtokens.astype(dtype)
    if dpooled is not None:
        dh = dh + w[:, :, None] * dpooled.astype(dtype)[:, None, :]  # pooled = sum_l w[l] tokens[l]
    dh, grads["ln_final.weight"], grads["ln_final.bias"] = F.layer_norm_backward(dh, c_lnf)
    for i in reversed(range(config.num_layers)):
        b = f"blocks.{i}."
        c_ln1, c_att, c_ln2, c_fc1, c_gelu, c_fc2 = blocks[i]
        # h = h + fc2(GELU(fc1(LN2(h))))
        dm, grads[b + "mlp.fc2.weight"], grads[b + "mlp.fc2.bias"] = F.linear_backward(dh, c_fc2)
        (dm,) = F.gelu_backward(dm, c_gelu)
        dm, grads[b + "mlp.fc1.weight"], grads[b + "mlp.fc1.bias"] = F.linear_backward(dm, c_fc1)
        dm, grads[b + "ln2.weight"], grads[b + "ln2.bias"] = F.layer_norm_backward(dm, c_ln2)
        dh = dh + dm
        # h = h + proj(SelfAttention(LN1(h)))
        da, grads[b + "attn.qkv.weight"], grads[b + "attn.qkv.bias"], \
            grads[b + "attn.proj.weight"], grads[b + "attn.proj.bias"], *rel = self_attention_backward(dh, c_att)
        if rel:
            grads[b + "attn.rel_bias"] = rel[0]
        da, grads[b + "ln1.weight"], grads[b + "ln1.bias"] = F.layer_norm_backward(da, c_ln1)
        dh = dh + da
    # h = token_embed[ids] + pos_embed[:L]
    dpos = np.zeros_like(params["pos_embed.weight"])
    dpos[:L] = dh.sum(axis=0)
    grads["pos_embed.weight"] = dpos
    _, grads["token_embed.weight"] = F.embedding_backward(dh, c_tok)
    return grads
