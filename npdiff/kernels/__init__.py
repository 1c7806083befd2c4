"""Kernel backends: the hot array operations behind the layers in `npdiff.nn`.

A backend is a module exposing the functions of `npdiff.kernels.reference` with the same
signatures (conv2d_forward, conv2d_backward, group_norm_forward, ...). Three names exist:

  "reference"  plain vectorized NumPy, float64-capable; the oracle the others are tested against
  "cpu"        Numba (`@njit(cache=True)`); until that module exists, "cpu" means "reference"
  "cuda"       numba.cuda, imported only when asked for; needs a GPU or NUMBA_ENABLE_CUDASIM=1
               (its module's check_available() raises RuntimeError otherwise)

The active backend is chosen by `set_backend(name)`, else by the NPDIFF_BACKEND environment
variable (read once, the first time a backend is needed), else "cpu". Layers fetch it with
`get_backend()` on every call, so switching takes effect immediately.
"""

import importlib
import os

BACKEND_NAMES = ("reference", "cpu", "cuda")

# every backend module defines all of these, with reference.py's signatures
KERNEL_NAMES = (
    "conv2d_forward", "conv2d_backward",
    "group_norm_forward", "group_norm_backward",
    "group_norm_silu_forward", "group_norm_silu_backward",
    "layer_norm_forward", "layer_norm_backward",
    "silu_forward", "silu_backward",
    "gelu_forward", "gelu_backward",
    "linear_forward", "linear_backward",
    "attention_forward", "attention_backward",
)

_loaded = {}  # name -> module
_active = None  # name chosen by set_backend or the environment


def _check_name(name):
    if name not in BACKEND_NAMES:
        raise ValueError(
            f"unknown kernel backend {name!r}; valid names are {', '.join(BACKEND_NAMES)} "
            "(set by --backend or the NPDIFF_BACKEND environment variable)")


def _load(name):
    if name in _loaded:
        return _loaded[name]
    if name == "reference":
        from npdiff.kernels import reference as module
    else:
        try:
            module = importlib.import_module(f"npdiff.kernels.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"npdiff.kernels.{name}":
                raise  # the backend exists but something it needs is missing
            if name != "cpu":
                raise RuntimeError(f"kernel backend {name!r} is not available in this install; "
                                   "use 'reference' or 'cpu'") from err
            from npdiff.kernels import reference as module  # no compiled CPU kernels yet
    check = getattr(module, "check_available", None)  # e.g. "cuda" without a GPU: a RuntimeError saying so
    if check is not None:
        check()
    missing = [k for k in KERNEL_NAMES if not callable(getattr(module, k, None))]
    if missing:
        raise RuntimeError(f"kernel backend {name!r} lacks {', '.join(missing)}; a backend may "
                           "re-export reference kernels it does not accelerate")
    _loaded[name] = module
    return module


def get_backend(name=None):
    """The kernel module for `name`, else the active backend (set_backend, else NPDIFF_BACKEND,
    else "cpu"). Raises ValueError for an unknown name."""
    global _active
    if name is None:
        if _active is None:
            env = os.environ.get("NPDIFF_BACKEND", "").strip()
            _active = env or "cpu"
            try:
                _check_name(_active)
            except ValueError:
                bad, _active = _active, None
                raise ValueError(f"NPDIFF_BACKEND={bad!r} is not a kernel backend; valid names "
                                 f"are {', '.join(BACKEND_NAMES)}") from None
        name = _active
    _check_name(name)
    return _load(name)


def set_backend(name):
    """Make `name` the active backend for all layers; returns its module."""
    global _active
    _check_name(name)
    module = _load(name)
    _active = name
    return module


def backend_name():
    """Name of the active backend (resolving the environment if not yet done)."""
    get_backend()
    return _active
