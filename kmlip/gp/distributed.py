"""Fits distributed on Dask: descriptors and kernel rows on the workers, the O(M^3) solve on
the client.

A fit has two passes over the training structures, and both run here on a
:class:`dask.distributed.Client` with the return values of their serial counterparts, so the
estimator swaps one for the other:

* :func:`choose` (for :func:`kmlip.gp.sparse_points.choose`): every worker computes the features
  of its blocks of structures (:func:`~kmlip.gp.sparse_points.collect_environments` with the
  blocks' frame offsets, so environment ids are global) and returns them, or a uniform sample
  of them when there are many (below); the client runs CUR / FPS / random selection
  (:func:`~kmlip.gp.sparse_points.choose_from`) on what came back.
* :func:`accumulate` (for :func:`kmlip.gp.training.accumulate`): every worker streams the
  kernel rows of its blocks into per-label-class triangular factors (the streaming QR of
  :mod:`kmlip.gp.sparse`, exactly the serial code on its part of the data); the factors are
  merged pairwise in a tree (TSQR: the R of a QR of two stacked factors) and the client receives
  one ``(M+1) x (M+1)`` factor per class.

What travels: the structures (positions, numbers, cell; no calculators), once, in contiguous
blocks balanced by atom count, from the client to the worker that processes them; their labels
(with e0 totals and baselines) to the same worker; the kernel (descriptors and sparse points)
to every worker. Back to the client come only the selection sample, and one factor per class.
Descriptors, pair gradients and kernel rows never leave the worker that computed them. The
blocks scattered by :func:`choose` stay on their workers for the :func:`accumulate` of the same
structures (recognised by a digest of numbers, positions and cells; the choice of every term of
a sum of kernels reuses them too), so a fit sends each structure once.

Threads: each task runs with as many OpenMP threads as its worker has Dask threads
(``threads_per_worker``), and serial BLAS, as a serial fit does; the ``n_threads`` argument of
the serial functions is not used on the workers.

Numerics: the merged factor ``T`` of a class satisfies ``T^T T = sum_w T_w^T T_w`` over the
workers' factors, which is the ``T^T T`` of the serial factor up to rounding; the two differ by
an orthogonal transformation (row signs, rotation). The solve (:func:`kmlip.gp.sparse.solve_stack`)
and the log marginal likelihood and its gradient depend only on ``T^T T`` (through a QR of the
stacked factors and norms ``|T v|``), on ``n_rows`` and on ``log_scale_sum`` (sums over rows,
so sums over workers), so a distributed fit gives the serial model to rounding. The partition
(and hence the bits) depends only on the structures and the list of workers, not on timing:
each worker's blocks run one after another on that worker, and the merge tree is fixed.

Selection sample: CUR / FPS / random need the features of candidate environments on the
client. Per kernel key ``k`` at most about ``C_k = max(20 * n_sparse_k, 5000)`` environments
(``sample``) reach the client in total, whatever the number of workers: each block of
structures returns at most ``ceil(C_k * n_k(block) / n_k(all))`` of its environments, drawn
uniformly without replacement with a generator spawned from ``random_state`` for that block
(reproducible for a given partition, i.e. list of workers). ``n_k`` counts the key's
environments (atoms of that species) for atom-centred descriptors, atoms for others. So the
client's memory (``C_k * n_features * 8`` bytes per key) and the cost of the selection do not
grow with the cluster, and a worker's share of the sample shrinks as workers are added. When a
key has no more than ``C_k`` environments (atom-centred descriptors), all of them are returned
and the choice is exactly the serial one. A uniform sample keeps CUR's leverage-score choice
representative; FPS on a sample can miss rare outliers of the full set: pass ``sample="all"``
to select among every environment. Sparse points given as indices need the exact
environments, so such requests always return every environment of the keys requested.

Online updates: :meth:`kmlip.model.KernelPotential.partial_fit` with a client calls
:func:`accumulate` with the model's factors: the workers fold only the new structures, and their
merged factor is merged with the stored one on the client (one more TSQR step).

Errors: an exception raised while a worker processes structure ``i`` reaches the caller with
its own type and the message ``"structure i (Dask worker ADDRESS): <message>"``. A worker that
dies (e.g. killed for memory) loses the structures scattered to it, which Dask cannot recompute,
so the pass stops with :class:`RuntimeError` naming the worker and every structure it held
(the tasks still running are cancelled); the caller's model is unchanged. A worker retired
gracefully hands its data to the others first, and Dask reruns its tasks there (tasks prefer
their block's worker but may run elsewhere): the pass completes with the same result.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from kmlip.gp import sparse_points, training
from kmlip.gp.sparse import ClassFactor

#: Default sample of the selection: about max(SAMPLE_FACTOR * n_sparse_k, SAMPLE_MIN)
#: environments per kernel key in total (see the module notes).
SAMPLE_FACTOR = 20
SAMPLE_MIN = 5000
#: Blocks per worker: the structures are scattered and processed in this many pieces per worker
#: (progress reports and transfers overlapping the work), all folded into one factor per class.
BLOCKS_PER_WORKER = 4
#: Atoms per piece of a block whose features are computed at once during selection (bounds
#: the features a worker holds before sampling: about this many x n_features x 8 bytes).
SELECT_PIECE_ATOMS = 20000


# -- placement of the structures on the workers -------------------------------------------------
@dataclass(frozen=True)
class _Block:
    """A contiguous block of training structures ``start:stop`` assigned to ``worker``."""

    worker: str
    start: int
    stop: int


def _workers(client) -> dict[str, int]:
    """``{address: threads}`` of the cluster's workers, sorted by address (waits up to 60 s
    for a first worker); TypeError when ``client`` is not a Dask client."""
    if not all(callable(getattr(client, m, None)) for m in ("nthreads", "scatter", "submit")):
        hint = f" (connect with dask.distributed.Client({client!r}))" \
            if isinstance(client, str) else ""
        raise TypeError("client must be a dask.distributed.Client, got "
                        f"{type(client).__name__}{hint}")
    nthreads = dict(client.nthreads())
    if not nthreads:
        try:
            client.wait_for_workers(1, timeout=60)
        except Exception as exc:  # noqa: BLE001 - dask raises TimeoutError or its own
            raise RuntimeError("the Dask cluster has no workers (waited 60 s)") from exc
        nthreads = dict(client.nthreads())
    return {w: max(1, int(nthreads[w])) for w in sorted(nthreads)}


def _partition(n_atoms: np.ndarray, workers: Sequence[str],
               blocks_per_worker: int = BLOCKS_PER_WORKER) -> list[_Block]:
    """Contiguous blocks of about equal atom counts: one run of blocks per worker.

    Parameters
    ----------
    n_atoms : ndarray of int, shape (n_frames,)
    workers : sequence of str
    blocks_per_worker : int

    Returns
    -------
    list of _Block, in frame order
    """
    n = len(n_atoms)
    cum = np.concatenate([[0], np.cumsum(n_atoms, dtype=np.int64)])
    total = int(cum[-1])
    P = len(workers)
    blocks = []

    def cut(lo: int, hi: int, parts: int) -> list[int]:
        # frame boundaries splitting lo:hi into `parts` pieces of about equal atom counts
        if hi <= lo:
            return [lo] * (parts + 1)
        targets = cum[lo] + (cum[hi] - cum[lo]) * np.arange(parts + 1) / parts
        b = np.searchsorted(cum, targets, side="left").clip(lo + 1, hi)
        # the boundary nearest the target, below or above it
        b -= (targets - cum[b - 1] < cum[b] - targets).astype(np.int64)
        b = b.clip(lo, hi)
        b[0], b[-1] = lo, hi
        return np.maximum.accumulate(b).tolist()

    bounds = cut(0, n, P) if total else [0] * P + [n]
    for w, worker in enumerate(workers):
        lo, hi = bounds[w], bounds[w + 1]
        inner = cut(lo, hi, max(1, min(blocks_per_worker, hi - lo)))
        for s, e in zip(inner[:-1], inner[1:], strict=True):
            if e > s:
                blocks.append(_Block(worker, int(s), int(e)))
    return blocks


def _fingerprint(frames: Sequence) -> bytes:
    """Digest of what a worker sees of the structures (numbers, positions, cell, pbc)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(len(frames).to_bytes(8, "little"))
    for a in frames:
        h.update(np.ascontiguousarray(a.numbers, dtype=np.int64).tobytes())
        h.update(np.ascontiguousarray(a.positions, dtype=np.float64).tobytes())
        h.update(np.ascontiguousarray(a.cell.array, dtype=np.float64).tobytes())
        h.update(np.asarray(a.pbc, dtype=bool).tobytes())
    return h.digest()


def _bare(atoms):
    """The structure without its calculator (labels travel separately, once)."""
    b = atoms.copy()
    b.calc = None
    return b


@dataclass
class _Placement:
    blocks: list
    futures: list
    workers: dict
    key: tuple


#: Structures scattered by :func:`choose`, kept for the :func:`accumulate` of the same fit
#: (so they travel once): ``{client id: _Placement}``.
_scattered: dict = {}
_scattered_lock = threading.Lock()


def _place_frames(client, frames: Sequence, reuse: bool) -> _Placement:
    workers = _workers(client)
    key = (_fingerprint(frames), tuple(workers))
    with _scattered_lock:
        old = _scattered.pop(client.id, None)
    if reuse and old is not None and old.key == key:
        return old
    n_atoms = np.array([len(a) for a in frames], dtype=np.int64)
    blocks = _partition(n_atoms, list(workers))
    futures = [None] * len(blocks)
    for w in workers:
        mine = [i for i, b in enumerate(blocks) if b.worker == w]
        if not mine:
            continue
        data = [[_bare(a) for a in frames[blocks[i].start:blocks[i].stop]] for i in mine]
        for i, f in zip(mine, client.scatter(data, workers=[w], hash=False), strict=True):
            futures[i] = f
    return _Placement(blocks, futures, workers, key)


def _keep_for_accumulate(client, placement: _Placement) -> None:
    with _scattered_lock:
        _scattered[client.id] = placement


def release(client) -> None:
    """Drops the structures :func:`choose` left on the workers for the data pass (a fit that
    fails between the two passes calls this, so they do not wait for the next fit)."""
    with _scattered_lock:
        _scattered.pop(getattr(client, "id", None), None)


# -- errors -------------------------------------------------------------------------------------
def _worker_address() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except Exception:  # noqa: BLE001 - outside a worker (tests calling the task directly)
        return "local"


def _located(exc: Exception, index: int) -> Exception:
    """``exc`` with the structure and worker prepended to its message, same type if possible."""
    return training.located(exc, f"structure {index} (Dask worker {_worker_address()})")


def _wait(client, futures: dict, blocks: list, on_done: Callable | None = None,
          fetch: bool = False, merging: bool = False) -> dict:
    """Waits for ``{block number: future}`` (the dict is emptied, so that finished results
    nobody else needs are released on the workers). The first error is raised as it came from
    the worker (it names its structure), a lost worker as RuntimeError naming it and the
    structures it held (:func:`_lost_worker_error`); the remaining futures are then cancelled.

    Parameters
    ----------
    client : dask.distributed.Client
    futures : dict
        ``{block number: Future}``; emptied.
    blocks : list of _Block
        The placement of the structures (every block, also when ``futures`` holds a few).
    on_done : callable, optional
        ``on_done(block number)`` as each future finishes.
    fetch : bool
        Return the results.
    merging : bool
        The futures are merges of the blocks' factors, not blocks (for the error message).

    Returns
    -------
    dict
        ``{block number: result}`` when ``fetch``, else empty (results stay on the workers).
    """
    from distributed import as_completed

    index = {f.key: i for i, f in futures.items()}
    pending = list(futures.values())
    futures.clear()
    ac = as_completed(pending)
    del pending
    out = {}
    try:
        for fut in ac:
            i = index[fut.key]
            if fetch or fut.status != "finished":
                try:
                    # re-raises the worker's exception with its traceback; a cancelled future
                    # raises its reason, and so does a finished one whose result was lost
                    # with its worker before it could be fetched
                    value = fut.result()
                except Exception as exc:
                    if fut.status == "cancelled" or type(exc).__name__ in _LOST:
                        raise _lost_worker_error(client, blocks,
                                                 None if merging else blocks[i], exc,
                                                 fut.status) from exc
                    raise
                if fetch:
                    out[i] = value
                del value
            if on_done is not None:
                on_done(i)
    except BaseException:
        left = list(getattr(ac, "futures", ()))
        if left:
            client.cancel(left)
        raise
    return out


#: Exceptions (by name) of a future that cannot complete because a worker was lost.
_LOST = ("KilledWorker", "FutureCancelledError", "CancelledError")


def _lost_worker_error(client, blocks: list, block: _Block | None, exc: BaseException | None,
                       status: str) -> RuntimeError:
    """The error of a task that can no longer run: its worker (or the worker holding its
    structures) left the cluster, which loses the structures scattered to it (Dask cannot
    recompute scattered data, so the fit cannot go on without them).

    Names the workers of the placement that are gone (those holding ``block`` when the
    scheduler cannot be asked) and the structures each held, and Dask's reason.
    """
    held: dict[str, list[int]] = {}
    for b in blocks:
        lo, hi = held.get(b.worker, (b.start, b.stop))
        held[b.worker] = [min(lo, b.start), max(hi, b.stop)]
    try:
        alive = set(client.nthreads())
        gone = [w for w in held if w not in alive]
    except Exception:  # noqa: BLE001 - the scheduler itself may be gone
        gone = []
    if not gone and block is not None:
        gone = [block.worker]
    reason = getattr(exc, "reason", None)
    if exc is None:
        cause = status
    elif reason:
        cause = f"{type(exc).__name__}, reason: {reason}"
    else:
        cause = f"{type(exc).__name__}: {exc}"
    during = " while merging the workers' factors" if block is None else ""
    if gone:
        who = "; ".join(f"Dask worker {w}, which held structures {held[w][0]}..{held[w][1] - 1}"
                        for w in gone)
    else:
        who = "a Dask worker"
    return RuntimeError(
        f"the fit lost {who}{during} ({cause}): the worker died or left the cluster, and the "
        "structures sent to it are lost with it (Dask cannot recompute data sent by the "
        "client), so the fit stopped. A worker killed for exceeding its memory limit is the "
        "usual cause; fit again once the cluster is whole")


# -- worker memory allocator ----------------------------------------------------------------
_malloc_lock = threading.Lock()
_malloc_users = [0]


@contextlib.contextmanager
def _task_malloc():
    """glibc's malloc tuned for a kmlip task on a Dask worker, restored afterwards.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also fixes glibc's
    mmap threshold at 128 kB: every per-structure temporary above it (features, pair gradients,
    kernel rows) is then a fresh mmap whose pages fault in again, which cost 40% more CPU in the
    data pass (measured, benchmarks/scaling_dask.py). During the task the thresholds are raised
    (temporaries reuse the heap); afterwards they are set back to the environment's values (or
    glibc's defaults) and the heap is trimmed, so the worker returns the memory as Dask expects.
    """
    libc = _libc()
    if libc is None:
        yield
        return
    with _malloc_lock:
        _malloc_users[0] += 1
        if _malloc_users[0] == 1:
            libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20)
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    try:
        yield
    finally:
        with _malloc_lock:
            _malloc_users[0] -= 1
            if _malloc_users[0] == 0:
                libc.mallopt(_M_TRIM_THRESHOLD, _env_int("MALLOC_TRIM_THRESHOLD_", 128 << 10))
                libc.mallopt(_M_MMAP_THRESHOLD, _env_int("MALLOC_MMAP_THRESHOLD_", 128 << 10))
                libc.malloc_trim(0)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters


def _env_int(name: str, default: int) -> int:
    import os

    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        return default


@functools.lru_cache(maxsize=1)
def _libc():
    """glibc through ctypes, or None (another C library, or no mallopt)."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


# -- selection ----------------------------------------------------------------------------------
def _key_weights(descriptor, frames, keys) -> np.ndarray:
    """Per structure and key, the weight of its share of the sample: the number of
    environments of that key for atom-centred descriptors (atoms of that species), the number
    of atoms otherwise (a proxy: the environments are known only once computed).

    Returns
    -------
    ndarray, shape (n_frames, n_keys)
    """
    keys = np.asarray(list(keys), dtype=np.int64)
    if getattr(descriptor, "atom_centred", True):
        return np.array([[np.count_nonzero(a.numbers == z) for z in keys] for a in frames],
                        dtype=np.float64).reshape(len(frames), len(keys))
    return np.repeat(np.array([len(a) for a in frames], dtype=np.float64)[:, None],
                     len(keys), axis=1)


def _collect_block(descriptor, frames, keys, start, n_threads, caps, rng):
    """Worker task: features (a sample when over ``caps``) of a block's environments.

    The block is processed in pieces of about :data:`SELECT_PIECE_ATOMS` atoms, each sampled
    down to its share of ``caps`` before the next is computed, so a worker holds the features
    of one piece plus the sample, whatever the size of its block.
    """
    from kmlip._threads import serial_blas

    keys = list(keys)
    weights = _key_weights(descriptor, frames, keys)
    n_atoms = np.array([len(a) for a in frames], dtype=np.int64)
    total = max(1, int(n_atoms.sum()))
    cum = np.concatenate([[0], np.cumsum(n_atoms)])
    cuts = np.unique(np.searchsorted(cum, np.arange(0, total, SELECT_PIECE_ATOMS), "left"))
    bounds = [int(c) for c in cuts if c < len(frames)] + [len(frames)]
    feats: dict = {z: [] for z in keys}
    ids: dict = {z: [] for z in keys}
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        try:
            with serial_blas(), _task_malloc():
                env, eid = sparse_points.collect_environments(
                    keys, descriptor, frames[lo:hi], n_threads, frame_offset=start + lo,
                    name_frames=False)
        except Exception as exc:
            # collect_environments has no per-structure callback: find the structure by
            # redoing them one at a time (only on the error path)
            for k in range(lo, hi):
                try:
                    sparse_points.collect_environments(keys, descriptor, [frames[k]], n_threads,
                                                       name_frames=False)
                except Exception as exc_k:  # noqa: BLE001
                    raise _located(exc_k, start + k) from exc_k
            raise _located(exc, start + lo) from exc
        for z in env:
            X, I = env[z], eid[z]
            if caps is not None and caps.get(z) is not None:
                j = keys.index(z)
                cap = math.ceil(caps[z] * weights[lo:hi, j].sum() / max(weights[:, j].sum(), 1))
                if X.shape[0] > cap:
                    sel = np.sort(rng.choice(X.shape[0], size=cap, replace=False))
                    X, I = X[sel], I[sel]
            feats[z].append(X)
            ids[z].append(I)
    out_env, out_ids = {}, {}
    for z in keys:
        if not feats[z]:
            continue
        X, I = np.concatenate(feats[z]), np.concatenate(ids[z])
        if caps is not None and caps.get(z) is not None and X.shape[0] > caps[z]:
            # the pieces' rounded-up shares may exceed the block's cap by a few
            sel = np.sort(rng.choice(X.shape[0], size=caps[z], replace=False))
            X, I = X[sel], I[sel]
        out_env[z], out_ids[z] = X, I
    return out_env, out_ids


def _sample_caps(spec, blocks, weights, sample) -> list | None:
    """Per block ``{key: max environments returned}``, or None for everything.

    ``weights``: :func:`_key_weights` of all structures, columns in ``sorted(spec.counts)``.
    """
    if spec.method is None or (isinstance(sample, str) and sample == "all"):
        return None
    bad = ValueError(f"sample must be 'auto', 'all' or a positive int, got {sample!r}")
    if isinstance(sample, str):
        if sample != "auto":
            raise bad
    elif isinstance(sample, bool) or not isinstance(sample, (int, np.integer)) or sample < 1:
        raise bad
    keys = sorted(spec.counts)
    total = np.maximum(weights.sum(axis=0), 1.0)
    caps = []
    for b in blocks:
        share = weights[b.start:b.stop].sum(axis=0) / total
        c = {}
        for j, z in enumerate(keys):
            m = spec.counts[z]
            budget = max(SAMPLE_FACTOR * int(m), SAMPLE_MIN) if sample == "auto" else int(sample)
            c[z] = max(1, math.ceil(budget * share[j]))
        caps.append(c)
    return caps


def _spawn(rng: np.random.Generator, n: int) -> list:
    """``n`` independent child generators; ``rng``'s own stream is not advanced."""
    if hasattr(rng, "spawn"):
        return rng.spawn(n)
    # NumPy < 1.25: the same children from the generator's seed sequence
    return [np.random.default_rng(s) for s in rng.bit_generator._seed_seq.spawn(n)]


def choose(client, spec, descriptor, frames: Sequence, random_state, n_threads: int,
           sample="auto"):
    """Sparse points per kernel key, with the features computed on the Dask workers.

    Same parameters and return as :func:`kmlip.gp.sparse_points.choose`, plus:

    Parameters
    ----------
    client : dask.distributed.Client
    n_threads : int
        Unused: each worker runs its blocks with as many OpenMP threads as it has Dask
        threads (``threads_per_worker``).
    sample : "auto", "all" or int
        Environments per kernel key, in total over the workers, returned for the selection
        (see the module notes): "auto" about ``max(20 * n_sparse_k, 5000)``, "all" every
        environment (the serial choice exactly), or about that number. Ignored for sparse
        points given as indices (every environment is returned).

    Returns
    -------
    points : dict
        ``{key: (M_k, F) raw descriptor vectors}``.
    indices : dict or None
        ``{key name: (M_k, 2) int64 (global frame, environment)}``.
    """
    if spec.per_species is not None and all(kind == "points"
                                            for kind, _ in spec.per_species.values()):
        return {z: v for z, (_, v) in spec.per_species.items()}, None
    rng = random_state if isinstance(random_state, np.random.Generator) \
        else np.random.default_rng(random_state)
    keys = sorted(spec.counts)
    if len(frames) == 0:
        return sparse_points.choose_from(spec, {}, {}, frames, rng, descriptor.key_name)
    placement = _place_frames(client, frames, reuse=True)
    blocks = placement.blocks
    caps = _sample_caps(spec, blocks, _key_weights(descriptor, frames, keys), sample)
    # one child generator per block, spawned without advancing rng's own stream, so the client's
    # selection draws the same numbers as the serial one
    block_rngs = _spawn(rng, len(blocks)) if caps is not None else [None] * len(blocks)
    [desc_f] = client.scatter([descriptor], broadcast=True, hash=False)
    futures = {i: client.submit(_collect_block, desc_f, placement.futures[i], keys, b.start,
                                placement.workers[b.worker], None if caps is None else caps[i],
                                block_rngs[i], workers=[b.worker], allow_other_workers=True,
                                pure=False)
               for i, b in enumerate(blocks)}
    results = _wait(client, futures, blocks, fetch=True)
    parts = [results[i] for i in range(len(blocks))]
    env, env_ids = {}, {}
    for z in keys:
        f = [p[0][z] for p in parts if z in p[0]]
        if f:
            env[z] = np.concatenate(f)
            env_ids[z] = np.concatenate([p[1][z] for p in parts if z in p[1]])
    _keep_for_accumulate(client, placement)
    return sparse_points.choose_from(spec, env, env_ids, frames, rng, descriptor.key_name)


# -- data pass ----------------------------------------------------------------------------------
@dataclass
class _Partial:
    """Factors of the structures folded so far on one worker, and the time spent in rows."""

    factors: dict
    seconds_rows: float


def _accumulate_block(kernel, frames, extras, start, prev, n_threads, precision, block_rows):
    """Worker task: a block's rows folded into the factors of the previous blocks (``prev``)."""
    from kmlip._threads import serial_blas

    labels, e0_totals, baselines = extras
    done = [0]

    def tick():
        done[0] += 1

    try:
        with serial_blas(), _task_malloc():
            factors, t_rows = training.accumulate(
                kernel, frames, labels, e0_totals, baselines, n_threads, precision, block_rows,
                factors=None if prev is None else prev.factors, on_frame=tick,
                name_frames=False)
    except Exception as exc:
        raise _located(exc, start + done[0]) from exc
    return _Partial(factors, t_rows + (0.0 if prev is None else prev.seconds_rows))


def merge_factors(a: dict, b: dict) -> dict:
    """Per-class factors of the union of two sets of labels (one TSQR step).

    Parameters
    ----------
    a, b : dict
        ``{class: ClassFactor}``, each ``T`` upper triangular (k <= M+1) x (M+1); not modified.

    Returns
    -------
    dict
        ``{class: ClassFactor}`` with ``T^T T = T_a^T T_a + T_b^T T_b``, ``n_rows`` and
        ``log_scale_sum`` summed; a class present in one only is copied.
    """
    from kmlip._threads import serial_blas

    out = {}
    for cls in list(a) + [c for c in b if c not in a]:
        fa, fb = a.get(cls), b.get(cls)
        if fa is None or fb is None:
            f = fa if fb is None else fb
            out[cls] = ClassFactor(np.array(f.T, copy=True), f.n_rows, f.log_scale_sum)
            continue
        n1 = fa.T.shape[1]
        if fb.T.shape[1] != n1:
            raise ValueError(f"class {cls!r}: factors of {n1 - 1} and {fb.T.shape[1] - 1} "
                             "sparse points cannot be merged")
        with serial_blas():
            T = _stack_qr(fa.T, fb.T)
        out[cls] = ClassFactor(T, fa.n_rows + fb.n_rows, fa.log_scale_sum + fb.log_scale_sum)
    return out


def _stack_qr(Ta: np.ndarray, Tb: np.ndarray) -> np.ndarray:
    """Triangular factor of ``[Ta; Tb]`` (both upper triangular / trapezoidal)."""
    import scipy.linalg as sla

    ka, kb = Ta.shape[0], Tb.shape[0]
    n1 = Ta.shape[1]
    if ka + kb < n1 or ka < n1 or kb < n1:
        # small or trapezoidal factors (fewer labels than columns): a plain QR keeps the
        # trapezoidal shape the serial streaming QR has
        S = np.asfortranarray(np.vstack([Ta, Tb]))
        if S.shape[0] == 0:
            return np.zeros((0, n1))
        R = sla.qr(S, mode="r", overwrite_a=True, check_finite=False)[0]
        return np.ascontiguousarray(np.triu(R[:min(S.shape[0], n1)]))
    A = np.asfortranarray(Ta)
    B = np.asfortranarray(Tb)
    try:
        from kmlip._ext import contract

        # LAPACK's triangular-pentagonal QR: skips the zeros of both triangles
        contract.tpqrt_many([A], [B], [n1], 64, 1)
        return np.ascontiguousarray(np.triu(A))
    except (ImportError, AttributeError):  # pragma: no cover - without the compiled core
        R = sla.qr(np.vstack([Ta, Tb]), mode="r", check_finite=False)[0]
        return np.ascontiguousarray(np.triu(R[:n1]))


def _merge_partials(a: _Partial, b: _Partial) -> _Partial:
    return _Partial(merge_factors(a.factors, b.factors), max(a.seconds_rows, b.seconds_rows))


def accumulate(client, kernel, frames: Sequence, labels: Sequence, e0_totals: Sequence[float],
               baselines: Sequence, n_threads: int, precision: str, block_rows: int,
               factors: dict | None = None,
               on_frame: Callable[[], None] | None = None) -> tuple[dict, float]:
    """Every structure's label rows folded into per-class QR factors on the Dask workers.

    Same parameters and return as :func:`kmlip.gp.training.accumulate`, plus ``client``.

    Parameters
    ----------
    client : dask.distributed.Client
    kernel : KernelSum
        Sent once to every worker.
    frames, labels, e0_totals, baselines : sequences, one entry per structure
    n_threads : int
        Unused: each worker runs with as many OpenMP threads as it has Dask threads.
    precision : {"auto", "double", "mixed"}
    block_rows : int
        Rows per streaming-QR update on the workers.
    factors : dict, optional
        Existing ``{class: ClassFactor}`` to extend; merged on the client, never modified.
    on_frame : callable, optional
        Called once per structure, as the blocks holding them finish.

    Returns
    -------
    factors : dict
        ``{class: ClassFactor}``.
    seconds_rows : float
        Wall time in kernel rows of the busiest worker (the rest of the wall time is QR,
        merging and communication).
    """
    n = len(frames)
    for name, seq in (("labels", labels), ("e0_totals", e0_totals), ("baselines", baselines)):
        if len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries for {n} structures")
    if n == 0:
        return training.accumulate(kernel, frames, labels, e0_totals, baselines, n_threads,
                                   precision, block_rows, factors=factors)
    placement = _place_frames(client, frames, reuse=True)
    blocks = placement.blocks
    by_worker: dict[str, list[int]] = {}
    for i, b in enumerate(blocks):
        by_worker.setdefault(b.worker, []).append(i)
    [kernel_f] = client.scatter([kernel], broadcast=True, hash=False)
    extras = [None] * len(blocks)
    for w, mine in by_worker.items():
        data = [(list(labels[blocks[i].start:blocks[i].stop]),
                 [float(x) for x in e0_totals[blocks[i].start:blocks[i].stop]],
                 list(baselines[blocks[i].start:blocks[i].stop])) for i in mine]
        for i, f in zip(mine, client.scatter(data, workers=[w], hash=False), strict=True):
            extras[i] = f
    # one chain of blocks per worker: each block extends the factors of the one before, so a
    # worker holds one set of factors and the result does not depend on timing
    futures, finals = {}, []
    for w, mine in by_worker.items():
        prev = None
        for i in mine:
            b = blocks[i]
            prev = futures[i] = client.submit(
                _accumulate_block, kernel_f, placement.futures[i], extras[i], b.start, prev,
                placement.workers[w], precision, int(block_rows), workers=[w],
                allow_other_workers=True, pure=False)
        finals.append(prev)
    del prev

    def progress(i):
        if on_frame is not None:
            for _ in range(blocks[i].stop - blocks[i].start):
                on_frame()

    # every block is waited for (progress, the first error with its structure); only the
    # chains' last factors are kept, the intermediate ones are freed once consumed
    _wait(client, futures, blocks, progress)
    level = finals
    del finals
    while len(level) > 1:
        nxt = [client.submit(_merge_partials, level[j], level[j + 1], pure=False)
               for j in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    [total] = _wait(client, {0: level.pop()}, blocks, fetch=True, merging=True).values()
    del placement, extras, kernel_f
    out = total.factors
    if factors:
        out = merge_factors(factors, out)
    return out, total.seconds_rows


__all__ = ["BLOCKS_PER_WORKER", "SAMPLE_FACTOR", "SAMPLE_MIN", "accumulate", "choose",
           "merge_factors"]
