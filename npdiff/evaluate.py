"""Evaluation: does the model draw what the prompt says?

For each prompt of a fixed set, sample N images, read each back with the judge
(npdiff/data/judge.py) and count, per attribute the prompt names, how often the
image agrees. Three groups of prompts:

    single    one object, every color-shape pair seen in training
    two       two objects at different positions
    held_out  the color-shape pairs never drawn in training (compositional generalization)

Reported at guidance scale 1 (no guidance) and at the default scale.

place_probe asks the network directly, without sampling, whether it reads place words: clean images
of a prompt are noised to x_t, and the network's x0 error is measured with the prompt, with the
prompt's place words exchanged (left <-> right, top <-> bottom) and with the empty prompt. For one
object the exchanged prompt describes another image; for two objects it describes the same two
places with the objects bound the other way round, so a network that reads only which colors,
shapes and places a caption names, and not which goes with which, has the same error with both.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from npdiff.data import judge
from npdiff.data.shapes import COLORS, HELD_OUT_PAIRS, SHAPES, Scene, SceneObject, describe, render_prompt
from npdiff.diffusion.forward import predict_x0_eps, q_sample
from npdiff.imaging import from_uint8
from npdiff.nn.mode import inference
from npdiff.pipeline import DEFAULT_CFG, Pipeline


def _caption(*objects) -> str:
    """The dataset's own wording ("an orange circle on the left and ..."): (color, shape, position)s."""
    return describe(Scene(tuple(SceneObject(c, s, None, p) for c, s, p in objects)))


def prompt_sets() -> dict[str, list[str]]:
    held = {tuple(p) for p in HELD_OUT_PAIRS}
    single = [_caption((c, s, None)) for c in COLORS for s in SHAPES if (c, s) not in held]
    held_out = [_caption((c, s, None)) for c, s in sorted(held)]
    positions = [("left", "right"), ("top", "bottom"), ("right", "left")]
    pairs = [(c1, s1, c2, s2) for c1 in COLORS for s1 in SHAPES for c2 in COLORS for s2 in SHAPES
             if c1 != c2 and s1 != s2 and (c1, s1) not in held and (c2, s2) not in held]
    rng = np.random.default_rng(1234)                      # a fixed, reproducible subset of pairs
    chosen = [pairs[i] for i in rng.choice(len(pairs), size=12, replace=False)]
    two = [_caption((c1, s1, p1), (c2, s2, p2))
           for k, (c1, s1, c2, s2) in enumerate(chosen) for p1, p2 in [positions[k % len(positions)]]]
    return {"single": single, "two": two, "held_out": held_out}


def read_back(image) -> Scene:
    """The judge's reading of a sample; an image the judge cannot read as a shapes scene at all (no
    background color at its border) shows nothing, so every attribute a prompt names counts as wrong."""
    try:
        return judge.judge_image(image)
    except ValueError:
        return Scene((), None)


def evaluate(pipe: Pipeline, n_per_prompt: int = 8, guidance_scales=(1.0, DEFAULT_CFG), steps: int = 25,
             seed: int = 0, progress: bool = True) -> dict:
    """-> {scale: {group: {attribute: accuracy, "all": fraction entirely right, "n": images}}}."""
    results = {}
    sets = prompt_sets()
    for scale in guidance_scales:
        results[str(scale)] = {}
        for group, prompts in sets.items():
            hits, totals, whole, count = defaultdict(int), defaultdict(int), 0, 0
            for k, prompt in enumerate(prompts):
                images = pipe.generate([prompt] * n_per_prompt, seed=seed + 1000 * k, steps=steps,
                                       guidance_scale=scale, progress=False)
                for img in images:
                    scores = judge.score(read_back(img), prompt)
                    for key, ok in scores.items():
                        attr = key.partition(".")[0]          # "color.0", "color.1" -> "color"
                        hits[attr] += bool(ok)
                        totals[attr] += 1
                    whole += all(scores.values())
                    count += 1
                if progress:
                    print(f"  cfg {scale:g} {group:8s} {k + 1}/{len(prompts)}", end="\r", flush=True)
            row = {a: hits[a] / totals[a] for a in sorted(totals)}
            row["all"] = whole / count
            row["n"] = count
            results[str(scale)][group] = row
    if progress:
        print(" " * 60, end="\r")
    return results


def format_table(results: dict) -> str:
    attrs = sorted({a for by_group in results.values() for row in by_group.values() for a in row
                    if a not in ("all", "n")})
    head = "| cfg | prompts | images | " + " | ".join(attrs) + " | entirely right |"
    lines = [head, "|" + "---|" * (len(attrs) + 4)]
    for scale, by_group in results.items():
        for group, row in by_group.items():
            cells = [f"{100 * row[a]:.0f}%" if a in row else "-" for a in attrs]
            lines.append(f"| {float(scale):g} | {group} | {row['n']} | " + " | ".join(cells)
                         + f" | {100 * row['all']:.0f}% |")
    return "\n".join(lines)


PLACE_SWAP = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
PROBE_TIMESTEPS = (500, 700, 800, 900, 950, 990)


def swap_places(prompt: str) -> str:
    """"a red circle on the left and a blue square on the right" -> "... on the right ... on the left"."""
    return " ".join(PLACE_SWAP.get(word, word) for word in prompt.split(" "))


def place_probe_prompts() -> dict[str, list[str]]:
    """One object at each named place, and the two-object prompts of prompt_sets()."""
    single = [_caption((c, s, p)) for c, s in [("red", "circle"), ("blue", "square"), ("yellow", "triangle"),
                                              ("white", "circle")] for p in ("left", "right", "top", "bottom")]
    return {"single_placed": single, "two": prompt_sets()["two"]}


def place_probe(model, timesteps=PROBE_TIMESTEPS, n_per_prompt: int = 4, seed: int = 0) -> dict:
    """-> {group: {t: {"prompt": mse, "swapped": mse, "empty": mse}}}: the mean squared error of the
    network's x0 prediction from x_t (images in [-1, 1]) under each caption, on the same images and
    noise. swapped > prompt means the network reads the places (and, for two objects, which object
    stands at which)."""
    schedule = model.config.schedule()
    C = model.config.unet.in_channels
    results = {}
    for group, prompts in place_probe_prompts().items():
        rng = np.random.default_rng(seed)
        captions = [p for p in prompts for _ in range(n_per_prompt)]
        x0 = from_uint8(np.stack([render_prompt(p, rng)[0] for p in captions]))
        variants = {"prompt": captions, "swapped": [swap_places(p) for p in captions], "empty": [""] * len(captions)}
        with inference():
            encoded = {k: model.encode_text(v)[:3] for k, v in variants.items()}
            results[group] = {}
            for t in timesteps:
                t_idx = np.full(len(x0), int(t))
                noise = np.random.default_rng([seed, int(t)]).standard_normal(x0.shape).astype(x0.dtype)
                x_t = q_sample(schedule, x0, t_idx, noise).astype(x0.dtype)
                row = {}
                for name, (context, mask, pooled) in encoded.items():
                    out, _ = model.unet(x_t, t_idx, context, mask, pooled)
                    x0_pred, _ = predict_x0_eps(schedule, x_t, t_idx, out[:, :C], model.config.prediction_type)
                    row[name] = float(np.mean((x0_pred - x0) ** 2))
                results[group][str(int(t))] = row
    return results


def format_place_probe(results: dict) -> str:
    lines = ["| prompts | t | x0 error: prompt | places swapped | empty prompt | swapped / prompt |",
             "|---|---|---|---|---|---|"]
    for group, by_t in results.items():
        for t, row in by_t.items():
            lines.append(f"| {group} | {t} | {row['prompt']:.4f} | {row['swapped']:.4f} | {row['empty']:.4f} "
                         f"| {row['swapped'] / row['prompt']:.2f} |")
    return "\n".join(lines)
