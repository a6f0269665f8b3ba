"""Sparse-point specification (``n_sparse``, ``sparse_method``), checked before any work, and
the choice of the sparse environments from the training structures.

``n_sparse``: an int for every centre species, or ``{symbol: int}`` (capped at the number of
training environments of that species). ``sparse_method``: ``"cur"``, ``"fps"`` or ``"random"``
(:mod:`kmlip.gp.selection`); a 1-D int array of global environment indices (the atoms of all
training frames concatenated in order); or ``{symbol: indices into that species' environments,
or an (M_z, n_features) float array of descriptor vectors}``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from ase.data import atomic_numbers, chemical_symbols

from kmlip.gp import selection, training


@dataclass(frozen=True)
class SparseSpec:
    """Validated sparse-point request.

    Attributes
    ----------
    counts : dict
        ``{Z: requested number}`` for every species of the training set.
    method : str or None
        Selection method, when the points are chosen by one.
    global_indices : ndarray or None
        Global environment indices.
    per_species : dict or None
        ``{Z: ("indices", int array) or ("points", (M_z, F) array)}``.
    """

    counts: dict
    method: str | None = None
    global_indices: np.ndarray | None = None
    per_species: dict | None = None


def _count(v, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        raise ValueError(f"{where} must be a non-negative int, got {v!r}")
    return int(v)


def _symbol(s, where: str) -> int:
    z = atomic_numbers.get(s, 0) if isinstance(s, str) else 0
    if z == 0:
        raise ValueError(f"{where}: {s!r} is not a chemical symbol")
    return z


def _index_array(v, where: str, n_max: int) -> np.ndarray:
    arr = np.asarray(v)
    if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise TypeError(f"{where} must be 'cur', 'fps', 'random', a 1-D int array or a dict of "
                        "index arrays / feature arrays")
    arr = arr.astype(np.int64)
    if np.unique(arr).size != arr.size:
        raise ValueError(f"{where} has duplicate indices")
    if arr.size and (arr.min() < 0 or arr.max() >= n_max):
        raise ValueError(f"{where}: index out of range (0..{n_max - 1})")
    return arr


def validate(n_sparse, sparse_method, frames: Sequence, descriptor) -> SparseSpec:
    """Checks ``n_sparse`` and ``sparse_method`` against the training frames (no features yet).

    Counts and methods are per kernel key of the descriptor (:meth:`Descriptor.kernel_keys`:
    the centre species of atom-centred descriptors, species pairs for
    :class:`~kmlip.descriptors.distance2b.Distance2b`), named as the descriptor names them.

    Raises
    ------
    TypeError, ValueError
        Naming the parameter and what is wrong with it.
    """
    n_features = int(descriptor.n_features)
    numbers = np.concatenate([np.asarray(a.numbers) for a in frames]) if len(frames) else []
    present = sorted(descriptor.keys_present(numbers))
    centred = getattr(descriptor, "atom_centred", True)
    env_count = {z: sum(int(np.count_nonzero(a.numbers == z)) for a in frames)
                 for z in present} if centred else None

    def key_of(s, where):
        if centred:
            return _symbol(s, where)
        try:
            return descriptor.key_from_name(s)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    if isinstance(n_sparse, Mapping):
        counts = {}
        known = set(descriptor.kernel_keys())
        for s, v in n_sparse.items():
            z = key_of(s, "n_sparse")
            if z not in known:
                # a typo would otherwise leave that species without points, unnoticed
                raise ValueError(f"n_sparse[{s!r}]: not a species of the descriptor "
                                 f"({[descriptor.key_name(k) for k in sorted(known)]})")
            counts[z] = _count(v, f"n_sparse[{s!r}]")
        counts = {z: counts.get(z, 0) for z in present}
    else:
        c = _count(n_sparse, "n_sparse")
        counts = {z: c for z in present}
    method = sparse_method
    if isinstance(method, str):
        if method not in selection.METHODS:
            raise ValueError(f"unknown sparse_method {method!r}; use one of "
                             f"{selection.METHODS}, indices or arrays")
        if present and not any(counts.values()):
            raise ValueError(f"n_sparse gives no sparse points for any species "
                             f"({n_sparse!r}): the model would be e0 alone")
        return SparseSpec(counts=counts, method=method)
    if isinstance(method, Mapping):
        per = {}
        for s, v in method.items():
            z = key_of(s, "sparse_method")
            arr = np.asarray(v)
            if arr.ndim == 2 and np.issubdtype(arr.dtype, np.floating):
                if arr.shape[1] != n_features:
                    raise ValueError(f"sparse_method[{s!r}]: sparse points have {arr.shape[1]} "
                                     f"features, the descriptor {n_features}")
                if not np.all(np.isfinite(arr)):
                    raise ValueError(f"sparse_method[{s!r}]: sparse points contain NaN or inf")
                per[z] = ("points", np.array(arr, dtype=np.float64))
                continue
            if not centred:
                raise ValueError(f"sparse_method[{s!r}]: index arrays need atom-centred "
                                 f"environments; give {type(descriptor).__name__}'s sparse "
                                 "points as an (M, n_features) float array or a method name")
            if z not in env_count:
                raise ValueError(f"sparse_method[{s!r}]: no {s} environments in training")
            per[z] = ("indices", _index_array(arr, f"sparse_method[{s!r}]", env_count[z]))
        return SparseSpec(counts=counts, per_species=per)
    if not centred:
        raise ValueError(f"sparse_method as global indices needs atom-centred environments; "
                         f"{type(descriptor).__name__} takes a method name or points")
    n_total = sum(len(a) for a in frames)
    idx = _index_array(method, "sparse_method", n_total)
    return SparseSpec(counts=counts, global_indices=idx)


def collect_environments(keys: Sequence[int], descriptor, frames: Sequence, n_threads: int,
                         frame_offset: int = 0, name_frames: bool = True):
    """Features of every environment of the given kernel keys, and where each comes from.

    Parameters
    ----------
    keys : sequence of int
    descriptor : Descriptor
    frames : sequence of ase.Atoms
    n_threads : int
    frame_offset : int
        Added to the frame numbers in the ids (for blocks of a larger set).
    name_frames : bool
        Prefix a structure's ValueError/TypeError with "frame k: " (k with the offset).

    Returns
    -------
    env : dict
        ``{key: (n_k, F) features}`` (keys without environments are left out).
    env_ids : dict
        ``{key: (n_k, 2) int64 (frame, environment index in the frame)}``.
    """
    feats: dict[int, list] = {z: [] for z in keys}
    ids: dict[int, list] = {z: [] for z in keys}
    def env_of(k, nt):
        return training.in_frame(
            lambda: descriptor.environments(frames[k], gradients=False, n_threads=nt),
            k + frame_offset, name_frames)

    if n_threads > 1 and len(frames) > 1:
        # whole structures side by side, one thread each (as the training pass)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(n_threads) as pool:
            envs = list(pool.map(lambda k: env_of(k, 1), range(len(frames))))
    else:
        envs = [env_of(k, n_threads) for k in range(len(frames))]
    for k, e in enumerate(envs):
        for z in keys:
            rows = np.flatnonzero(e.keys == z)
            if rows.size:
                feats[z].append(e.features[rows])
                ids[z].append(np.stack([np.full(rows.size, k + frame_offset), rows], axis=1))
    env = {z: np.concatenate(feats[z]) for z in keys if feats[z]}
    env_ids = {z: np.concatenate(ids[z]).astype(np.int64) for z in keys if ids[z]}
    return env, env_ids


def choose(spec: SparseSpec, descriptor, frames: Sequence, random_state, n_threads: int):
    """Sparse points per kernel key (one pass of :func:`collect_environments`, then
    :func:`choose_from`).

    Returns
    -------
    points : dict
        ``{key: (M_k, F) raw descriptor vectors}``.
    indices : dict or None
        ``{key name: (M_k, 2) int64 (frame, environment)}`` of the points taken from the
        training set.
    """
    if spec.per_species is not None and all(kind == "points"
                                            for kind, _ in spec.per_species.values()):
        return {z: v for z, (_, v) in spec.per_species.items()}, None
    rng = random_state if isinstance(random_state, np.random.Generator) \
        else np.random.default_rng(random_state)
    env, env_ids = collect_environments(sorted(spec.counts), descriptor, frames, n_threads)
    return choose_from(spec, env, env_ids, frames, rng, descriptor.key_name)


def choose_from(spec: SparseSpec, env: dict, env_ids: dict, frames: Sequence,
                rng: np.random.Generator, key_name=None):
    """Sparse points chosen among collected environments (see :func:`choose`).

    ``env`` and ``env_ids`` as returned by :func:`collect_environments` (possibly a sample of
    all environments, e.g. gathered from workers); ``frames`` is only used for global indices.
    """
    if key_name is None:
        key_name = chemical_symbols.__getitem__
    present = sorted(spec.counts)
    points, chosen = {}, {}
    if spec.method is not None:
        for z in present:
            if z not in env:
                continue
            m = min(spec.counts[z], env[z].shape[0])
            sel = selection.select(env[z], m, spec.method, rng)
            points[z] = env[z][sel]
            chosen[key_name(z)] = env_ids[z][sel]
        return points, chosen
    if spec.per_species is not None:
        for z, (kind, v) in spec.per_species.items():
            if kind == "points":
                points[z] = v
            else:
                points[z] = env[z][v]
                chosen[chemical_symbols[z]] = env_ids[z][v]
        return points, chosen or None
    starts = np.cumsum([0] + [len(a) for a in frames])
    idx = spec.global_indices
    frame_of = np.searchsorted(starts, idx, side="right") - 1
    atom_of = idx - starts[frame_of]
    for z in present:
        sel = [(f, at) for f, at in zip(frame_of, atom_of, strict=True)
               if frames[f].numbers[at] == z]
        if not sel:
            continue
        pairs = np.array(sel, dtype=np.int64)
        lookup = {tuple(r): t for t, r in enumerate(env_ids[z].tolist())}
        pos = np.array([lookup[tuple(r)] for r in pairs.tolist()])
        points[z] = env[z][pos]
        chosen[chemical_symbols[z]] = pairs
    return points, chosen


__all__ = ["SparseSpec", "choose", "choose_from", "collect_environments", "validate"]
