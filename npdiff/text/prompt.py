"""Inline prompt parameters, Midjourney style: "a red circle --ar 3:2 --seed 7 --no blue, green".

Parameters follow the prompt text. The first "--name" that starts a word begins them,
and every word after it must belong to a "--name value" pair (also "--name=value"); an
em dash, which phones and word processors put in place of "--", counts as "--". The
parser checks types and forms; ranges (how wide an aspect ratio may be, how many
steps) are the caller's to check, where the command-line flags are checked too.

    parameter                    key in the dict     value
    --ar W:H                     "ar"                (W, H) positive ints
    --seed N                     "seed"              int
    --steps N                    "steps"             int
    --sampler NAME               "sampler"           str, lowercase
    --cfg X, --guidance-scale X  "cfg"               float
    --no a, b                    "negative_prompt"   str "a, b" (words of the comma list, joined)
    --chaos N                    "chaos"             int (0-100 by convention)
    --n N                        "n"                 int
    --backend NAME               "backend"           str, lowercase (cpu, reference, cuda)

The keys are the command line's argument names (argparse dests), so a caller can
merge the two. format_prompt() writes a (prompt, params) pair back as text;
parse_prompt(format_prompt(p, d)) == (p, d).
"""

from __future__ import annotations

import math
import re

EM_DASH = "\u2014"


class PromptError(ValueError):
    """An inline parameter that is unknown, repeated, or has a malformed value."""


def _int(name: str, raw: str) -> int:
    if not re.fullmatch(r"[+-]?\d+", raw):
        raise PromptError(f"--{name} {raw!r} is not a whole number; write it like --{name} 42")
    return int(raw)


def _float(name: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise PromptError(f"--{name} {raw!r} is not a number; write it like --{name} 7.5")
    return value


def _ratio(name: str, raw: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+):(\d+)", raw)
    if not m or int(m.group(1)) == 0 or int(m.group(2)) == 0:
        raise PromptError(f"--{name} {raw!r} is not a width:height ratio of positive whole numbers; "
                          f"write it like --{name} 16:9")
    return int(m.group(1)), int(m.group(2))


def _name(name: str, raw: str) -> str:
    if not re.fullmatch(r"[A-Za-z][\w+-]*", raw):
        raise PromptError(f"--{name} {raw!r} is not a name; write it like --{name} dpmpp-2m")
    return raw.lower()


def _word_list(name: str, raw: str) -> str:
    words = [w.strip() for w in raw.split(",")]
    if not all(words):
        raise PromptError(f"--{name} {raw!r} has an empty item; write it like --{name} red, blue")
    return ", ".join(" ".join(w.split()) for w in words)


# inline name -> (key, parse, takes several words?)
PARAMETERS = {
    "ar": ("ar", _ratio, False),
    "seed": ("seed", _int, False),
    "steps": ("steps", _int, False),
    "sampler": ("sampler", _name, False),
    "cfg": ("cfg", _float, False),
    "guidance-scale": ("cfg", _float, False),
    "no": ("negative_prompt", _word_list, True),
    "chaos": ("chaos", _int, False),
    "n": ("n", _int, False),
    "backend": ("backend", _name, False),
}

# a parameter starts where "--name" starts a word: at the beginning or after whitespace
_PARAM_START = re.compile(r"(?:^|(?<=\s))--(?=\S)")


def parse_prompt(text: str) -> tuple[str, dict]:
    """"PROMPT --name value ..." -> (PROMPT with surrounding space removed, {key: value})."""
    text = text.replace(EM_DASH, "--")
    m = _PARAM_START.search(text)
    if m is None:
        return text.strip(), {}
    clean, tail = text[:m.start()].strip(), text[m.start():]
    params: dict = {}
    given: dict[str, str] = {}
    for chunk in _PARAM_START.split(tail)[1:]:
        head, _, rest = chunk.partition("=") if re.match(r"[\w-]+=", chunk) else chunk.partition(" ")
        name, raw = head.strip().lower(), rest.strip()
        if name not in PARAMETERS:
            known = ", ".join("--" + n for n in PARAMETERS)
            raise PromptError(f"unknown inline parameter --{name}; the known ones are {known}")
        key, parse, several = PARAMETERS[name]
        if key in params:
            also = "" if given[key] == name else f" (--{given[key]} and --{name} are the same parameter)"
            raise PromptError(f"--{name} is given twice{also}; keep one")
        if not raw:
            raise PromptError(f"--{name} needs a value, e.g. {format_prompt('', {key: EXAMPLES[key]}).strip()}")
        if not several and len(raw.split()) > 1:
            raise PromptError(f"--{name} takes one value, got {raw!r}; parameters go after the prompt text, "
                              f"e.g. {format_prompt('a red circle', {key: EXAMPLES[key]})}")
        params[key] = parse(name, raw)
        given[key] = name
    return clean, params


EXAMPLES = {"ar": (16, 9), "seed": 42, "steps": 25, "sampler": "dpmpp-2m", "cfg": 7.5,
            "negative_prompt": "red, blue", "chaos": 50, "n": 4, "backend": "cpu"}
_INLINE_NAME = {"ar": "ar", "seed": "seed", "steps": "steps", "sampler": "sampler", "cfg": "cfg",
                "negative_prompt": "no", "chaos": "chaos", "n": "n", "backend": "backend"}


def format_prompt(prompt: str, params: dict) -> str:
    """(prompt, {key: value}) -> "prompt --name value ..." that parse_prompt reads back."""
    parts = [prompt] if prompt else []
    for key, value in params.items():
        if key not in _INLINE_NAME:
            raise KeyError(f"no inline parameter has the key {key!r}; the keys are {', '.join(_INLINE_NAME)}")
        if key == "ar":
            value = f"{value[0]}:{value[1]}"
        parts.append(f"--{_INLINE_NAME[key]} {value}")
    return " ".join(parts)
