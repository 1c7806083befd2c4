"""A reader of A1111's "infotext" (the `parameters` PNG chunk), written from the format that Stable
Diffusion web UI's PNG Info tab reads, and independent of npdiff's writer:

    prompt line(s)
    Negative prompt: negative line(s)
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b

The last line holds the settings if it has at least 3 "Key: value" pairs (else it is more prompt).
Every line before the one starting "Negative prompt:" is the prompt, the lines from there on the
negative prompt. A value "AxB" (as in "Size: WxH") becomes two entries, "Size-1" and "Size-2".
"""

import json
import re

_KEY = re.compile(r"\s*(\w[\w /-]+):\s*")      # a word character, then at least one more key character


def settings_pairs(line: str) -> list[tuple[str, str]]:
    """The "Key: value, Key: value" pairs of an infotext's last line: a value is a JSON string when it
    starts with a double quote, else it runs to the next comma."""
    pairs, i = [], 0
    while i < len(line):
        m = _KEY.match(line, i)
        if m is None:
            break
        key, i = m.group(1), m.end()
        if line.startswith('"', i):
            j = i + 1
            while line[j] != '"':
                j += 2 if line[j] == "\\" else 1
            value, i = json.loads(line[i:j + 1]), j + 1
        else:
            j = line.find(",", i)
            j = len(line) if j < 0 else j
            value, i = line[i:j].strip(), j
        pairs.append((key, value))
        i += line.startswith(",", i)
    return pairs


def a1111_read(text: str) -> dict:
    """Infotext -> {"Prompt": .., "Negative prompt": .., "Steps": .., "Size-1": .., "Size-2": .., ...}."""
    *lines, last = text.strip().split("\n")
    if len(settings_pairs(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in settings_pairs(last):
        size = re.fullmatch(r"(\d+)x(\d+)", value)
        if size:
            out[f"{key}-1"], out[f"{key}-2"] = size.groups()
        else:
            out[key] = value
    return out
