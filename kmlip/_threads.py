"""Resolves the thread count a kernel should use."""
from __future__ import annotations

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
