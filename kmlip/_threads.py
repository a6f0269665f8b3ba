"""Thread counts of the compiled kernels, and BLAS kept out of their way.

Why BLAS runs single-threaded around kmlip's kernels: OpenBLAS (NumPy's and SciPy's, two
separate pthread pools) keeps its worker threads busy-waiting for a while after every call,
and libgomp's workers do the same after every OpenMP region. On a machine with as many cores as
threads, a BLAS call between two OpenMP regions (or the reverse) leaves spinning threads on the
cores the next region needs: on 2 cores a 512-atom prediction took 32 ms with 2 threads and
16 ms with 1. kmlip therefore does its large products itself, inside its own OpenMP loops
(``kmlip._ext.contract.gemm``: one single-threaded BLAS call per fixed block, so results do not
depend on the thread count), and runs with BLAS limited to one thread (:func:`serial_blas`).
"""
from __future__ import annotations

import contextlib
import os
import threading

#: Wait policy kmlip asks of the OpenMP runtime unless the user chose one
#: (``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` set): idle threads sleep instead of spinning.
#: A spinning thread burns a core between regions; on a loaded machine (other processes, a
#: BLAS pool) it also delays the thread the next region waits for, by up to a scheduler time
#: slice per region: a 512-atom prediction took 70-95 ms with 2 spinning threads and
#: 28-44 ms with 2 sleeping ones (1 thread: 43 ms) while other jobs ran.
DEFAULT_WAIT_POLICY = "PASSIVE"


def _default_wait_policy() -> None:
    """Sets ``OMP_WAIT_POLICY`` before the OpenMP runtime starts (it reads the variable once,
    when the first kmlip extension loads), unless the user set a policy."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = DEFAULT_WAIT_POLICY


_default_wait_policy()

from kmlip._ext.openmp import max_threads  # noqa: E402 - after the wait policy is set

#: Below this many "work units" (roughly floating-point operations / 100, or SOAP centres × 100)
#: a parallel region costs more than it saves: one thread is used.
MIN_PARALLEL_WORK = 200_000


#: Largest explicit thread count accepted (as the descriptors' validation).
MAX_THREADS = 4096


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
    if not 1 <= n_threads <= MAX_THREADS:
        raise ValueError(f"n_threads must be in [1, {MAX_THREADS}], got {n_threads}")
    return n_threads


def threads_for(n_threads: int | None, work: float, min_work: float = MIN_PARALLEL_WORK) -> int:
    """Thread count for one call: ``resolve_threads(n_threads)``, or 1 when ``work`` is too
    small for a parallel region to pay for its start-up.

    Parameters
    ----------
    n_threads : int or None
        Upper bound (None: OMP_NUM_THREADS).
    work : float
        Size of the call in the units of ``min_work``.
    min_work : float
        Work below which one thread is used.
    """
    n = resolve_threads(n_threads)
    return 1 if work < min_work else n


_controller = None
_lock = threading.Lock()


def _get_controller():
    global _controller
    if _controller is None:
        with _lock:
            if _controller is None:
                from threadpoolctl import ThreadpoolController

                _controller = ThreadpoolController()
    return _controller


@contextlib.contextmanager
def blas_limited(n_threads: int | None):
    """Context in which BLAS uses at most ``resolve_threads(n_threads)`` threads.

    The threadpoolctl controller is built once (inspecting the loaded libraries is slow) and
    reused, so entering the context costs microseconds.
    """
    n = resolve_threads(n_threads)
    with _get_controller().limit(limits=n, user_api="blas"):
        yield


_serial = threading.local()


@contextlib.contextmanager
def serial_blas():
    """Context in which BLAS runs on the calling thread only (see the module docstring).

    Use it around anything that mixes kmlip's OpenMP kernels with NumPy/SciPy products:
    prediction, the data pass of a fit. kmlip's own parallel products keep using every thread.
    Nested contexts cost nothing (only the outermost one talks to threadpoolctl, ~50 µs).
    """
    depth = getattr(_serial, "depth", 0)
    _serial.depth = depth + 1
    try:
        if depth:
            yield
        else:
            with blas_limited(1):
                yield
    finally:
        _serial.depth = depth
