"""Inline prompt parameters: what each one parses to, the errors, and format/parse round trips."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from npdiff.text.prompt import PromptError, format_prompt, parse_prompt


@pytest.mark.parametrize("text, prompt, params", [
    ("a red circle", "a red circle", {}),
    ("  a red circle  ", "a red circle", {}),
    ("a red circle --ar 16:9", "a red circle", {"ar": (16, 9)}),
    ("a red circle --seed 3 --steps 20 --sampler DPMPP-2M", "a red circle",
     {"seed": 3, "steps": 20, "sampler": "dpmpp-2m"}),
    ("a blue square --cfg 7.5 --chaos 40 --n 2", "a blue square", {"cfg": 7.5, "chaos": 40, "n": 2}),
    ("a blue square --guidance-scale 3", "a blue square", {"cfg": 3.0}),
    ("a cat --no red,  blue ,green --seed -1", "a cat", {"negative_prompt": "red, blue, green", "seed": -1}),
    ("a cat --no dark   background", "a cat", {"negative_prompt": "dark background"}),
    ("a cat --seed=5 --AR=3:2", "a cat", {"seed": 5, "ar": (3, 2)}),
    ("a cat --backend Reference", "a cat", {"backend": "reference"}),
    ("a cat \u2014ar 2:3 \u2014seed 1", "a cat", {"ar": (2, 3), "seed": 1}),     # em dashes from autocorrect
    ("--seed 9", "", {"seed": 9}),
    ("a red-blue circle -- not a parameter", "a red-blue circle -- not a parameter", {}),
    ("a x--y circle", "a x--y circle", {}),
])
def test_parses(text, prompt, params):
    assert parse_prompt(text) == (prompt, params)


@pytest.mark.parametrize("text, message", [
    ("a cat --foo 1", r"unknown inline parameter --foo; the known ones are --ar, --seed"),
    ("a cat --ar 16x9", r"--ar '16x9' is not a width:height ratio .* --ar 16:9"),
    ("a cat --ar 16:0", r"--ar '16:0' is not a width:height ratio"),
    ("a cat --seed abc", r"--seed 'abc' is not a whole number; write it like --seed 42"),
    ("a cat --steps 2.5", r"--steps '2.5' is not a whole number"),
    ("a cat --cfg high", r"--cfg 'high' is not a number; write it like --cfg 7.5"),
    ("a cat --cfg nan", r"--cfg 'nan' is not a number"),
    ("a cat --chaos", r"--chaos needs a value, e.g. --chaos 50"),
    ("a cat --sampler 2m", r"--sampler '2m' is not a name"),
    ("a cat --no red,,blue", r"--no 'red,,blue' has an empty item"),
    ("a cat --seed 1 --seed 2", r"--seed is given twice; keep one"),
    ("a cat --cfg 1 --guidance-scale 2", r"--guidance-scale is given twice \(--cfg and --guidance-scale"),
    ("a cat --seed 1 on a mat", r"--seed takes one value, got '1 on a mat'; parameters go after the prompt"),
])
def test_errors_name_the_parameter_and_the_form(text, message):
    with pytest.raises(PromptError, match=message):
        parse_prompt(text)
    assert issubclass(PromptError, ValueError)


words = st.text("abcdefghijklmnopqrstuvwxyz-,.!'", min_size=1, max_size=8).filter(lambda w: not w.startswith("--"))
prompts = st.lists(words, max_size=6).map(" ".join)
negative = st.lists(st.lists(st.text("abcxyz", min_size=1, max_size=5), min_size=1, max_size=3).map(" ".join),
                    min_size=1, max_size=3).map(", ".join)
params = st.fixed_dictionaries({}, optional={
    "ar": st.tuples(st.integers(1, 64), st.integers(1, 64)),
    "seed": st.integers(-2**40, 2**40),
    "steps": st.integers(0, 2000),
    "sampler": st.sampled_from(["ddpm", "ddim", "dpmpp-2m", "euler", "heun", "euler-a"]),
    "cfg": st.floats(-100, 100, allow_nan=False),
    "negative_prompt": negative,
    "chaos": st.integers(0, 100),
    "n": st.integers(1, 16),
    "backend": st.sampled_from(["cpu", "reference", "cuda"]),
})


@settings(max_examples=300, deadline=None)
@given(prompts, params)
def test_format_then_parse_round_trips(prompt, params):
    assert parse_prompt(format_prompt(prompt, params)) == (prompt, params)


def test_format_refuses_unknown_keys():
    with pytest.raises(KeyError, match="guidance_scale"):
        format_prompt("a cat", {"guidance_scale": 3})
