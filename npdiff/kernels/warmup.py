"""The first run's compilation, shared between two processes.

Numba compiles a kernel at its first call and keeps the machine code on disk (`cache=True`), so
only the first run after an install, or after the kernels' source changes, compiles anything.
For the CPU backend that is about 50 s of one core's work, most of it in LLVM, and threads cannot
share it: compiling holds the GIL and Numba's compiler lock. A second process can.

So when the disk cache is cold, `compile_in_two_processes(model, model_dir)` starts
`python -m npdiff.kernels.warmup MODEL_DIR` beside this process, and both run one tiny forward of
the network (one sampler step at 16x16) with the other process's kernels replaced by a stub that
does nothing. Each compiles its half and writes it to the disk cache; once the helper has exited,
this process loads the helper's half from the cache at its first call instead of compiling it.
The halves are split by measured compile time (see SECOND_HALF). The numbers the stubbed
forward computes are garbage and thrown away; only the compiled kernels are kept.

tests/test_warmup.py checks that the two halves together cover every kernel a forward calls.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from npdiff.kernels import cpu

# Kernels the helper process compiles: about half of the compile time, measured on the 2-core
# machine of the README (the Winograd convolution alone takes 20 s of it). FIRST_HALF is every other
# kernel a forward calls from Python; kernels called only from compiled code compile with their callers.
SECOND_HALF = ("_conv3x3_winograd", "_winograd_weights_gemm", "_conv2d_forward")
FIRST_HALF = ("_conv2d_forward_rows", "_group_norm_forward", "_group_norm_silu_forward", "_layer_norm_forward",
              "_silu_forward", "_gelu_forward", "_linear_forward", "_attention_forward_no_probs")

WARMUP_SIZE = 16  # pixels a side of the tiny forward


def _stub(*args):
    return None


@contextlib.contextmanager
def _stubbed(names):
    """The named cpu kernels do nothing inside the block."""
    saved = {name: getattr(cpu, name) for name in names}
    try:
        for name in names:
            setattr(cpu, name, _stub)
        yield
    finally:
        for name, kernel in saved.items():
            setattr(cpu, name, kernel)


def cache_is_cold() -> bool:
    """True when the disk cache lacks the kernels of npdiff/kernels/cpu.py (they are all kept or
    all dropped together, as the cache follows the file's modification time)."""
    cpu._cache_probe(1)
    return bool(cpu._cache_probe.stats.cache_misses)


def tiny_forward(model, skip=()) -> None:
    """One guided sampler step at WARMUP_SIZE x WARMUP_SIZE with the kernels in `skip` stubbed out."""
    from npdiff.pipeline import Pipeline

    with _stubbed(skip), np.errstate(all="ignore"):
        Pipeline(model).generate(["a red circle"], steps=1, width=WARMUP_SIZE, height=WARMUP_SIZE,
                                 progress=False, return_float=True)


def compile_in_two_processes(model, model_dir: Path) -> bool:
    """If the kernel cache is cold, compile the kernels of `model`'s forward in this process and a
    helper at once (see the module doc) -> True; else do nothing -> False."""
    if not cache_is_cold():
        return False
    package_parent = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")])))
    try:
        helper = subprocess.Popen([sys.executable, "-m", "npdiff.kernels.warmup", str(model_dir)], env=env,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        return False                       # no second process: the first call of each kernel compiles it
    try:
        tiny_forward(model, skip=SECOND_HALF)
    finally:
        helper.wait()                      # a helper that failed leaves its kernels to compile here
    return True


def main(argv=None) -> int:
    from npdiff.model import Model

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m npdiff.kernels.warmup MODEL_DIR", file=sys.stderr)
        return 2
    tiny_forward(Model.load(Path(argv[0])), skip=FIRST_HALF)
    return 0


if __name__ == "__main__":
    sys.exit(main())
