"""Training rows: the kernel rows of every label of a structure, streamed into the per-class QR.

For each structure: one descriptor pass (features and pair gradients), then the unit kernel rows
of its total energy (sum of local rows), force components and virial components against the
sparse points (:class:`kmlip.kernels.SparseBasis`), each divided by its relative noise and folded
into the streaming QR of its label class (:class:`kmlip.gp.sparse.StreamingQR`). Memory stays
O(M^2 + one structure) for any number of structures.

Label classes and their noise (GAP's convention, sigma per atom for extensive labels): a total
energy ``sigma_energy * sqrt(n_atoms)``, a force component ``sigma_force``, a virial component
``sigma_stress * sqrt(n_atoms)``; labels with a per-structure override go to the ``*_fixed``
classes with their absolute sigma (not rescaled by hyperparameter optimisation).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from kmlip import kernels
from kmlip.gp.sparse import StreamingQR
from kmlip.gp.terms import KernelSum
from kmlip.labels import FrameLabels, voigt

#: With several threads, compute whole structures side by side (see :func:`_rows_in_parallel`)
#: rather than one structure at a time with parallel regions inside it.
FRAME_PARALLEL = True

#: A baseline's contribution to one structure: (energy eV, forces (n, 3), stress Voigt (6,)).
BaselineValues = tuple[float, np.ndarray, np.ndarray]


def located(exc: Exception, where: str) -> Exception:
    """``exc`` with ``where`` ("frame 3", "structure 14 (Dask worker ...)") prepended to its
    message, of the same type when its constructor takes a message (else RuntimeError)."""
    msg = f"{where}: {exc}"
    try:
        new = type(exc)(msg)
        if str(new) != msg:
            raise TypeError
    except Exception:  # noqa: BLE001 - exception types with other constructors
        new = RuntimeError(f"{type(exc).__name__}: {msg}")
    return new


def in_frame(fn, k: int, name_frames: bool, what: str = "frame"):
    """``fn()``; its ValueError/TypeError names ``what`` ``k`` ("frame 3: ...") when
    ``name_frames``."""
    if not name_frames:
        return fn()
    try:
        return fn()
    except (ValueError, TypeError) as exc:
        raise located(exc, f"{what} {k}") from exc


def frame_rows(kernel: KernelSum, atoms, labels: FrameLabels,
               e0_total: float, base: BaselineValues, n_threads: int, precision: str,
               grad_buffers=None):
    """(class, unit kernel rows, targets, relative noise) of every label of one structure.

    Parameters
    ----------
    kernel : KernelSum
        The model's kernel terms (descriptors and sparse bases).
    atoms : ase.Atoms
    labels : FrameLabels
    e0_total : float
        Sum of the atoms' e0, eV (subtracted from the energy label).
    base : (float, ndarray, ndarray)
        Baseline energy, forces and Voigt stress (subtracted from the labels).
    n_threads : int
    precision : {"auto", "double", "mixed"}
    grad_buffers : list, optional
        Reused storage for each term's pair gradients (:meth:`KernelSum.grad_buffers`); the
        rows returned do not refer to it.

    Returns
    -------
    list of (str, ndarray (k, M), ndarray (k,), ndarray (k,))
    """
    n = len(atoms)
    need_grad = labels.forces is not None or labels.stress is not None
    envs = kernel.environments(atoms, need_grad, n_threads, grad_buffers)
    out = []
    E_b, F_b, S_b = base
    if labels.energy is not None:
        y = np.array([labels.energy - e0_total - E_b])
        row = kernel.energy_row(envs)[None, :]
        if labels.energy_sigma is not None:
            out.append(("energy_fixed", row, y, np.array([labels.energy_sigma])))
        else:
            out.append(("energy", row, y, np.array([math.sqrt(n)])))
    if need_grad:
        Fr, W9 = kernel.derivative_rows(envs, n, n_threads, precision)
        if labels.forces is not None:
            y = (labels.forces - F_b).reshape(-1)
            if labels.force_atom_sigma is not None:
                out.append(("forces_fixed", Fr, y, np.repeat(labels.force_atom_sigma, 3)))
            elif labels.force_sigma is not None:
                out.append(("forces_fixed", Fr, y, np.full(3 * n, labels.force_sigma)))
            else:
                out.append(("forces", Fr, y, np.ones(3 * n)))
        if labels.stress is not None:
            y = atoms.get_volume() * (labels.stress - S_b)
            rows = kernels.virial_voigt(W9)
            if labels.virial_sigma is not None:
                out.append(("virial_fixed", rows, y, np.full(6, labels.virial_sigma)))
            else:
                out.append(("virial", rows, y, np.full(6, math.sqrt(n))))
    return out


def accumulate(kernel: KernelSum, frames: Sequence,
               labels: Sequence[FrameLabels], e0_totals: Sequence[float],
               baselines: Sequence[BaselineValues], n_threads: int, precision: str,
               block_rows: int, factors: dict | None = None,
               on_frame: Callable[[], None] | None = None,
               name_frames: bool = True) -> tuple[dict, float]:
    """Streams every structure's label rows into per-class QR factors.

    Parameters
    ----------
    kernel : KernelSum
    frames, labels, e0_totals, baselines : sequences, one entry per structure
    n_threads : int
    precision : {"auto", "double", "mixed"}
    block_rows : int
        Rows per streaming-QR update (:func:`block_rows_for`).
    factors : dict, optional
        Existing ``{class: ClassFactor}`` to extend (online update); copied, never modified.
    on_frame : callable, optional
        Called after each structure (progress bars).
    name_frames : bool
        Prefix a structure's ValueError/TypeError (e.g. from its descriptor) with "frame k: "
        (its index in ``frames``); off where the caller names structures itself.

    Returns
    -------
    factors : dict
        ``{class: ClassFactor}``.
    seconds_rows : float
        Wall time spent computing kernel rows (the rest is QR).
    """
    import copy
    import time

    parallel_frames = n_threads > 1 and len(frames) > 1 and FRAME_PARALLEL
    # folding runs beside the row threads then: one thread (its split does not depend on it)
    qr = StreamingQR(kernel.n_sparse, block_rows, n_threads=1 if parallel_frames else n_threads)
    if factors:
        qr.factors = {c: copy.deepcopy(f) for c, f in factors.items()}
    t_rows = 0.0
    # one gradient array for all structures: no fresh pages to fault in per structure
    grad_buffers = kernel.grad_buffers()
    try:
        if parallel_frames:
            rows_in_order = _rows_in_parallel(kernel, frames, labels, e0_totals, baselines,
                                              n_threads, precision, name_frames)
        else:
            rows_in_order = (in_frame(lambda k=k: frame_rows(
                kernel, frames[k], labels[k], e0_totals[k], baselines[k], n_threads, precision,
                grad_buffers), k, name_frames) for k in range(len(frames)))
        t1 = time.perf_counter()
        for rows in rows_in_order:
            t_rows += time.perf_counter() - t1
            for cls, K_rows, yv, sc in rows:
                qr.add(cls, K_rows, yv, sc)
            if on_frame is not None:
                on_frame()
            t1 = time.perf_counter()
        return qr.finalize(), t_rows
    finally:
        kernel.release_scratch()


def _rows_in_parallel(kernel: KernelSum, frames, labels, e0_totals, baselines, n_threads: int,
                      precision: str, name_frames: bool = True):
    """Every structure's rows, in order, computed by ``n_threads`` Python threads, one
    structure each on one OpenMP thread (the kernels release the GIL).

    Most training structures are small (tens to a few hundred atoms): one structure's
    parallel regions are too short to keep two threads busy, and the Python between them is
    serial, whereas whole structures side by side keep every core in compiled code. A row does
    not depend on the thread count, and the rows are folded in their order, so the factors have
    the same bits as a serial pass. At most two structures per thread are in flight.
    """
    import threading
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    local = threading.local()

    def rows_of(k):
        bufs = getattr(local, "bufs", None)
        if bufs is None:
            bufs = local.bufs = kernel.grad_buffers()
        return in_frame(lambda: frame_rows(kernel, frames[k], labels[k], e0_totals[k],
                                         baselines[k], 1, precision, bufs), k, name_frames)

    with ThreadPoolExecutor(n_threads, thread_name_prefix="kmlip-rows") as pool:
        window: deque = deque()
        nxt = 0
        try:
            while nxt < len(frames) and len(window) < 2 * n_threads:
                window.append(pool.submit(rows_of, nxt))
                nxt += 1
            while window:
                rows = window.popleft().result()
                if nxt < len(frames):
                    window.append(pool.submit(rows_of, nxt))
                    nxt += 1
                yield rows
        finally:
            for f in window:
                f.cancel()


def block_rows_for(M: int, block_size: int | None) -> int:
    """Label rows per streaming-QR update: ``block_size`` or ``clip(8 M, 4096, 256 MB row cap)``."""
    if block_size is not None:
        return int(block_size)
    cap = max(1024, (256 << 20) // (8 * (M + 1)))
    return int(min(max(8 * M, 4096), cap))


def baseline_values(baseline, atoms) -> BaselineValues:
    """Baseline energy, forces and Voigt stress of a structure (zeros without a baseline)."""
    if baseline is None:
        return 0.0, np.zeros((len(atoms), 3)), np.zeros(6)
    E, F, S = baseline.compute(atoms)
    F = np.zeros((len(atoms), 3)) if F is None else np.asarray(F, dtype=np.float64)
    S = np.zeros(6) if S is None else voigt(S, "baseline stress")
    return float(E), F, S


def baselines_of(baseline, frames: Sequence) -> list[BaselineValues]:
    """:func:`baseline_values` of every structure; an error names its frame."""
    return [in_frame(lambda a=a: baseline_values(baseline, a), k, True)
            for k, a in enumerate(frames)]


__all__ = ["BaselineValues", "accumulate", "baseline_values", "baselines_of", "block_rows_for",
           "frame_rows", "in_frame", "located"]
