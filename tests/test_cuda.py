"""The CUDA backend: its parity tests (tests/cuda_cases.py) under numba's CUDA simulator, a type check
of every kernel the simulator launched by the real CUDA compiler, and the error without a GPU.

pytest has imported numba by the time this file runs, too late to switch the simulator on
(NUMBA_ENABLE_CUDASIM=1 is read at numba's import), so the parity cases run in a subprocess with
the simulator on. On a machine with a GPU they are also imported here and run on the device.

The simulator executes kernels as Python, so it accepts code that numba.cuda cannot compile (and
computes in whatever precision Python picks). The subprocess therefore records the argument types of
every launch, and test_every_launched_kernel_compiles_to_ptx compiles each kernel with exactly those
types to PTX (needs the CUDA toolkit's NVVM, not a GPU; skipped without it), and checks that float32
kernels contain no float64 arithmetic, which runs at a small fraction of float32 speed on most GPUs.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).parent
HANG_GUARD_S = 900  # the simulator run needs under 10 s of CPU; this only stops a hang
FLOAT64_BY_DESIGN = {"_timestep_embedding_kernel"}  # t * f reaches 1e3 rad: the phase needs float64
PTX_CC = (7, 5)  # a compute capability every CUDA toolkit from 11 to 13 compiles for


def _gpu_here() -> bool:
    try:
        from numba import cuda
        return bool(cuda.is_available())
    except Exception:  # numba without its CUDA target
        return False


if _gpu_here():  # a real GPU (or a session started with the simulator on): run the cases here too
    sys.path.insert(0, str(TESTS))
    from cuda_cases import *  # noqa: F401,F403,E402


@pytest.fixture(scope="module")
def simulator_run(tmp_path_factory):
    """Run tests/cuda_cases.py under the simulator once: (return code, output, recorded launches)."""
    log = tmp_path_factory.mktemp("cuda") / "launches.json"
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", NPDIFF_CUDA_LAUNCH_LOG=str(log),
               OPENBLAS_NUM_THREADS="1")  # idle BLAS threads spinning would only slow the simulator's threads
    env.pop("NPDIFF_BACKEND", None)
    cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-s", "-p", "no:cacheprovider",
           str(TESTS / "cuda_cases.py")]
    proc = subprocess.run(cmd, env=env, cwd=TESTS.parent, capture_output=True, text=True,
                          timeout=HANG_GUARD_S)
    launches = json.loads(log.read_text()) if log.exists() else []
    return proc.returncode, proc.stdout + proc.stderr, launches


def test_parity_cases_pass_under_the_simulator(simulator_run):
    code, output, _ = simulator_run
    for line in output.splitlines():  # the measured errors, for `pytest -s`
        if line.lstrip(".").startswith("cuda parity"):
            print(line.lstrip("."))
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    assert code == 0, output[-4000:]
    assert re.search(r"\d+ passed", summary) and "skipped" not in summary and "failed" not in summary, summary
    assert int(re.search(r"(\d+) passed", summary).group(1)) >= 49, summary  # every case ran


def _nvvm_or_skip():
    from numba import cuda

    def probe(a):
        a[0] = 1.0
    try:
        from numba import float32
        cuda.compile_ptx(probe, (float32[:],), cc=PTX_CC)
    except Exception as e:  # no CUDA toolkit / NVVM on this machine
        pytest.skip(f"cannot compile PTX here (the CUDA toolkit's NVVM is needed): {type(e).__name__}: {e}")


def _numba_type(desc):
    import numba
    if desc[0] == "array":
        _, dtype, ndim, layout = desc
        return numba.types.Array(numba.from_dtype(np.dtype(dtype)), ndim, layout)
    return getattr(numba.types, desc[1])


def test_every_launched_kernel_compiles_to_ptx(simulator_run, monkeypatch):
    _, output, launches = simulator_run
    assert launches, "the simulator run recorded no kernel launches:\n" + output[-2000:]
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        pytest.skip("this process runs the simulator: compile_ptx needs the real CUDA target")
    _nvvm_or_skip()
    from types import SimpleNamespace

    import numba.cuda.dispatcher
    from numba import cuda
    if not _gpu_here() and hasattr(numba.cuda.dispatcher, "get_current_device"):
        # device functions (_sigmoid, _block_sum) are compiled for "the current device"; with no GPU,
        # name the compute capability the kernels are compiled for
        monkeypatch.setattr(numba.cuda.dispatcher, "get_current_device",
                            lambda: SimpleNamespace(compute_capability=PTX_CC))

    from npdiff.kernels import cuda as K
    names = {name for name, _ in launches}
    kernels_defined = {n for n in dir(K) if n.endswith("_kernel")}
    assert names == kernels_defined, ("kernels never launched by the parity cases", kernels_defined - names)
    slow = []
    for name, args in launches:
        sig = tuple(_numba_type(a) for a in args)
        try:
            ptx, _ = cuda.compile_ptx(getattr(K, name).py_func, sig, cc=PTX_CC)
        except Exception as e:
            raise AssertionError(f"{name}{tuple(str(s) for s in sig)} does not compile: {e}") from e
        floats = {a[1] for a in args if a[0] == "array" and a[1].startswith("float")}
        if floats == {"float32"} and name not in FLOAT64_BY_DESIGN and re.search(r"\.f64\b", ptx):
            slow.append((name, [str(s) for s in sig]))
    assert not slow, f"float32 kernels with float64 arithmetic: {slow}"
    print(f"compiled {len(launches)} kernel signatures ({len(names)} kernels) to PTX for sm_{PTX_CC[0]}{PTX_CC[1]}")


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_cuda_backend_without_a_gpu_is_one_clear_line(tmp_path, how):
    """`npdiff sample --backend cuda` (or NPDIFF_BACKEND=cuda) with no GPU and no simulator: exit
    code 2, one line, no traceback, nothing written."""
    if _gpu_here():
        pytest.skip("a GPU (or the simulator) is available here")
    env = dict(os.environ)
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    env.pop("NPDIFF_BACKEND", None)
    cmd = [sys.executable, "-m", "npdiff", "sample", "a red circle", "--outdir", str(tmp_path / "out"), "--quiet"]
    if how == "flag":
        cmd += ["--backend", "cuda"]
    else:
        env["NPDIFF_BACKEND"] = "cuda"
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("npdiff: error: "), proc.stderr
    assert "NUMBA_ENABLE_CUDASIM" in lines[0] and "--backend cpu" in lines[0]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
