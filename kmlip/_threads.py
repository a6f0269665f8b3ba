"""Resolves the thread count a kernel should use, and limits BLAS to it."""
from __future__ import annotations

import contextlib
import threading

from kmlip._ext.openmp import max_threads


def resolve_threads(n_threads: int | None) -> int:
    """Returns the number of OpenMP threads to use.

    Parameters
    ----------
    n_threads : int or None
        Explicit count; ``None`` follows ``OMP_NUM_THREADS`` (OpenMP's default).
    """
    if n_threads is None:
        return max(1, max_threads())
    if isinstance(n_threads, bool) or not isinstance(n_threads, int):
        raise TypeError(f"n_threads must be an int or None, got {type(n_threads).__name__}")
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1, got {n_threads}")
    return n_threads


_controller = None
_lock = threading.Lock()


@contextlib.contextmanager
def blas_limited(n_threads: int | None):
    """Context in which BLAS uses at most ``resolve_threads(n_threads)`` threads.

    The threadpoolctl controller is built once (inspecting the loaded libraries is slow) and
    reused, so entering the context costs microseconds.
    """
    global _controller
    n = resolve_threads(n_threads)
    if _controller is None:
        with _lock:
            if _controller is None:
                from threadpoolctl import ThreadpoolController

                _controller = ThreadpoolController()
    with _controller.limit(limits=n, user_api="blas"):
        yield
