"""Inference mode: forward passes that no backward pass will follow.

Inside `with inference():` layers may drop what only the backward pass needs: attention keeps no
(N, E, L, M) probability tensor, which at batch 16 and 16x16 tokens is 17 MB per layer written to
memory and never read. Outputs are the same bits as outside the block; a backward pass through a
cache made inside it is an error. The sampling pipeline runs its network calls in this mode.
"""

import contextlib
import threading

_state = threading.local()


def inference_active() -> bool:
    """True inside `with inference():` (in this thread)."""
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def inference():
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
