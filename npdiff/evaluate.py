"""Evaluation: does the model draw what the prompt says?

For each prompt of a fixed set, sample N images, read each back with the judge
(npdiff/data/judge.py) and count, per attribute the prompt names, how often the
image agrees. Three groups of prompts:

    single    one object, every color-shape pair seen in training
    two       two objects at different positions
    held_out  the color-shape pairs never drawn in training (compositional generalization)

Reported at guidance scale 1 (no guidance) and at the default scale.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from npdiff.data import judge
from npdiff.data.shapes import COLORS, HELD_OUT_PAIRS, SHAPES, Scene, SceneObject, describe
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
                    scores = judge.score(judge.judge_image(img), prompt)
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
