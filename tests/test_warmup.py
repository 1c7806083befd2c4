"""The first run's compilation split over two processes (npdiff/kernels/warmup.py).

Each check runs in a fresh Python process: which kernels a process has compiled is exactly what
is tested, and the pytest process has compiled everything by the time it gets here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from npdiff.kernels import warmup

ROOT = Path(__file__).resolve().parents[1]


def run_python(code: str, **env) -> dict:
    environment = dict(os.environ, PYTHONPATH=str(ROOT), **env)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


COVERAGE = """
import json
from numba.core.registry import CPUDispatcher
from npdiff.kernels import cpu, warmup
from npdiff.model import DEFAULT_MODEL_DIR, Model
from npdiff.pipeline import Pipeline

def compiled():
    return {name: len(k.signatures) for name, k in vars(cpu).items() if isinstance(k, CPUDispatcher)}

model = Model.load(DEFAULT_MODEL_DIR)
warmup.tiny_forward(model, skip=warmup.SECOND_HALF)
first = compiled()
warmup.tiny_forward(model, skip=warmup.FIRST_HALF)
both = compiled()
called = set()                                   # kernels called from Python, seen through proxies
for name, kernel in list(vars(cpu).items()):
    if isinstance(kernel, CPUDispatcher):
        def proxy(*args, _name=name, _kernel=kernel):
            called.add(_name)
            return _kernel(*args)
        setattr(cpu, name, proxy)
Pipeline(model).generate(["a small blue square on the left"], steps=2, progress=False)
print(json.dumps([first, both, compiled(), sorted(called)]))
"""


def test_the_two_halves_compile_every_kernel_a_forward_needs():
    first, both, after_sampling, called = run_python(COVERAGE)
    assert not set(warmup.FIRST_HALF) & set(warmup.SECOND_HALF)
    assert set(called) == set(warmup.FIRST_HALF) | set(warmup.SECOND_HALF)   # every kernel in one half
    assert all(first[name] == 0 for name in warmup.SECOND_HALF), first        # stubbed: not compiled
    assert all(first[name] >= 1 for name in warmup.FIRST_HALF), first         # each listed kernel is used
    assert all(both[name] >= 1 for name in warmup.SECOND_HALF), both
    new = {name: n for name, n in after_sampling.items() if n != both[name]}
    assert not new, f"a 32x32 sampling run compiled kernels neither half did: {new}"


COLD = """
import json
import numpy as np
from npdiff.kernels import cpu, warmup
from npdiff.model import DEFAULT_MODEL_DIR, Model

started = warmup.compile_in_two_processes(Model.load(DEFAULT_MODEL_DIR), DEFAULT_MODEL_DIR)
x, w = np.ones((1, 8, 8, 8), np.float32), np.ones((8, 8, 3, 3), np.float32)
y = cpu.conv2d_forward(x, w, None, 1, 1)                      # the Winograd path: the helper's half
stats = cpu._conv3x3_winograd.stats
print(json.dumps([started, len(stats.cache_hits), len(stats.cache_misses), float(y[0, 0, 3, 3])]))
"""


def test_a_cold_cache_is_filled_by_the_helper_process(tmp_path):
    """With an empty cache the helper compiles the Winograd kernel, and this process loads it from
    disk instead of compiling it; with the cache filled, no helper starts."""
    started, hits, misses, y = run_python(COLD, NUMBA_CACHE_DIR=str(tmp_path))
    assert started
    assert (hits, misses) == (1, 0)
    assert y == 72.0                                            # 8 channels x 9 taps of ones
    assert run_python(COLD, NUMBA_CACHE_DIR=str(tmp_path))[:3] == [False, 1, 0]
