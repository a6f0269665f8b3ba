"""New columns (sparse points) and new rows (labels) for a fitted state, without a refit.

The per-class factors ``T_c = R([K_hat_c / s | y_c / s])`` of :mod:`kmlip.gp.sparse` cannot take
new columns by themselves: the Q of their QR is gone. On-the-fly learning has few labelled
frames, so the learner keeps their unit kernel rows in a :class:`RowCache` (O(N M) memory, N the
number of labels) and a new column block costs

* one descriptor pass per stored frame, for the kernel rows against the *new* sparse points only
  (the old columns' rows come from the cache), and
* one QR of ``[cached old rows | new rows | y] / s`` per class, O(N (M + ΔM)²),

plus K_MM of the extended basis and its Cholesky factor, O((M + ΔM)³). e0, the hyperparameters,
the jitter and the calibration are kept. The result equals a fresh fit on the same frames with
the extended sparse set, e0 fixed and the same hyperparameters (to rounding).

A sum of kernels (e.g. 2b + SOAP, :mod:`kmlip.gp.terms`) has its columns blocked by term, then
by kernel key: new points of a term land at the end of their key's block in that term, so the
cached rows are scattered into the extended layout (old and new columns each to their place)
rather than appended; :func:`points_by_term` says how a caller names the term.

New rows (:func:`add_rows`) are :meth:`~kmlip.model.KernelPotential.partial_fit` that also
appends the frames' rows to the cache, so the cache stays in step with the factors.

Rows are computed in double precision here (``precision="double"``): the cache is reused for
every later update, and the data are small.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from ase.data import chemical_symbols

from kmlip import kernels
from kmlip import labels as lab
from kmlip.gp import training
from kmlip.gp.sparse import FIXED_CLASSES, FREE_CLASSES, ClassFactor, _qr_r, cholesky_jitter
from kmlip.gp.state import FittedState
from kmlip.gp.terms import KernelSum, Term


@dataclass(frozen=True)
class FrameRows:
    """Unit kernel rows of one structure's labels, by label class.

    Attributes
    ----------
    rows : tuple of (str, ndarray (k, M), ndarray (k,), ndarray (k,))
        ``(class, unit kernel rows K_hat, targets y (minus e0 and baseline), relative noise s)``
        as returned by :func:`kmlip.gp.training.frame_rows`, columns in the order of the basis
        they were computed for.
    """

    rows: tuple

    @property
    def n_columns(self) -> int:
        return int(self.rows[0][1].shape[1]) if self.rows else 0


@dataclass(frozen=True)
class RowCache:
    """The unit kernel rows of every label a state was built from (see the module docstring).

    Immutable: :func:`add_rows` and :func:`add_columns` return a new cache beside the new state,
    so a step that raises leaves the learner's cache and model in step.

    Attributes
    ----------
    frames : tuple of FrameRows
        One entry per labelled structure, in training order.
    n_columns : int
        M of the state the rows belong to.
    """

    frames: tuple = ()
    n_columns: int = 0

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def n_labels(self) -> int:
        return sum(r[1].shape[0] for f in self.frames for r in f.rows)

    def factors(self) -> dict[str, ClassFactor]:
        """Per-class QR factors of all cached rows, ``{class: ClassFactor}``."""
        by_class: dict[str, list] = {}
        for f in self.frames:
            for cls, K, y, s in f.rows:
                by_class.setdefault(cls, []).append((K, y, s))
        out = {}
        for cls in FREE_CLASSES + FIXED_CLASSES:
            parts = by_class.get(cls)
            if not parts:
                continue
            K = np.concatenate([p[0] for p in parts])
            y = np.concatenate([p[1] for p in parts])
            s = np.concatenate([p[2] for p in parts])
            A = np.empty((K.shape[0], K.shape[1] + 1), order="F")
            A[:, :-1] = K / s[:, None]
            A[:, -1] = y / s
            out[cls] = ClassFactor(np.ascontiguousarray(_qr_r(A)), int(K.shape[0]),
                                   float(np.sum(np.log(s))))
        return out


    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (for ``np.savez``): per frame and class the rows, targets and noise."""
        out = {"n_columns": np.array([self.n_columns], dtype=np.int64),
               "n_frames": np.array([len(self.frames)], dtype=np.int64)}
        for k, f in enumerate(self.frames):
            for cls, K, y, s in f.rows:
                out[f"{k}__{cls}__K"] = K
                out[f"{k}__{cls}__y"] = y
                out[f"{k}__{cls}__s"] = s
        return out

    @classmethod
    def from_arrays(cls, arrays) -> RowCache:
        """Inverse of :meth:`to_arrays` (ValueError for inconsistent arrays)."""
        try:
            M = int(arrays["n_columns"][0])
            n = int(arrays["n_frames"][0])
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ValueError(f"not a row cache ({exc})") from None
        frames = []
        for k in range(n):
            rows = []
            for c in FREE_CLASSES + FIXED_CLASSES:
                key = f"{k}__{c}__K"
                if key not in arrays:
                    continue
                K = np.array(arrays[key], dtype=np.float64)
                y = np.array(arrays[f"{k}__{c}__y"], dtype=np.float64)
                s = np.array(arrays[f"{k}__{c}__s"], dtype=np.float64)
                if K.ndim != 2 or K.shape[1] != M or y.shape != (K.shape[0],) \
                        or s.shape != y.shape or np.any(s <= 0):
                    raise ValueError(f"row cache: inconsistent arrays of frame {k}, {c}")
                rows.append((c, K, y, s))
            frames.append(FrameRows(tuple(rows)))
        return cls(tuple(frames), M)


def label_keys(state: FittedState, keys: lab.LabelKeys | None = None) -> lab.LabelKeys:
    """Label keys whose classes in use follow the state's hyperparameters (as partial_fit)."""
    k = keys or lab.LabelKeys()
    h = state.hyper
    return lab.LabelKeys(k.energy_key, k.forces_key, k.stress_key, h.sigma_energy is not None,
                         h.sigma_force is not None, h.sigma_stress is not None)


def _rows_of(state: FittedState, kernel: KernelSum, frames: Sequence,
             keys: lab.LabelKeys, n_threads: int | None) -> list[FrameRows]:
    from kmlip._threads import resolve_threads
    from kmlip.gp.training import baseline_values

    n_threads = resolve_threads(n_threads)
    out = []
    try:
        for k, a in enumerate(frames):
            lab.check_species(a, state.species_z, f"frame {k}", "model")
            labels = lab.read_labels(a, k, keys)
            e0_total = float(np.sum(state.e0_table[a.numbers]))
            rows = training.frame_rows(kernel, a, labels, e0_total,
                                       baseline_values(state.baseline, a), n_threads, "double")
            out.append(FrameRows(tuple((c, np.array(K), np.array(y, dtype=np.float64),
                                        np.array(s, dtype=np.float64))
                                       for c, K, y, s in sorted(rows, key=_class_rank))))
    finally:
        kernel.release_scratch()
    return out


def _class_rank(row) -> int:
    # one canonical order of the classes within a frame, whatever produced the rows
    return (FREE_CLASSES + FIXED_CLASSES).index(row[0])


def build_cache(state: FittedState, frames: Sequence, keys: lab.LabelKeys | None = None,
                n_threads: int | None = None) -> RowCache:
    """The row cache of ``frames`` against the state's sparse points (one descriptor pass each).

    Parameters
    ----------
    state : FittedState
    frames : list of ase.Atoms
        The labelled structures the state was built from, in training order.
    keys : LabelKeys, optional
        Where labels are read (classes in use follow the state's σ's).
    n_threads : int or None
    """
    frames = lab.as_frames(frames)
    rows = _rows_of(state, state.kernel, frames, label_keys(state, keys), n_threads)
    return RowCache(tuple(rows), state.n_sparse)


def add_rows(state: FittedState, cache: RowCache, frames: Sequence,
             keys: lab.LabelKeys | None = None,
             n_threads: int | None = None) -> tuple[FittedState, RowCache]:
    """New labels: ``partial_fit`` that keeps the row cache in step.

    The frames' rows (one descriptor pass each) are appended to the cache and folded into the
    state's per-class factors; sparse points, e0 and hyperparameters are unchanged.

    Returns
    -------
    state : FittedState
    cache : RowCache
        A new cache (the one passed is not modified).
    """
    check_cache(state, cache)
    state.require_factors("add_rows")
    frames = lab.as_frames(frames)
    new = _rows_of(state, state.kernel, frames, label_keys(state, keys), n_threads)
    factors = {c: ClassFactor(np.array(f.T), f.n_rows, f.log_scale_sum)
               for c, f in state.factors.items()}
    n1 = state.n_sparse + 1
    for fr in new:
        for cls, K, y, s in fr.rows:
            A = np.empty((K.shape[0], n1))
            A[:, :-1] = K / s[:, None]
            A[:, -1] = y / s
            f = factors.get(cls)
            if f is None:
                f = factors[cls] = ClassFactor(np.zeros((0, n1)))
            f.T = np.ascontiguousarray(_qr_r(np.asfortranarray(np.vstack([f.T, A]))))
            f.n_rows += K.shape[0]
            f.log_scale_sum += float(np.sum(np.log(s)))
    return state.with_factors(factors), RowCache(cache.frames + tuple(new), cache.n_columns)


def add_columns(state: FittedState, frames: Sequence, new_points,
                cache: RowCache | None = None, keys: lab.LabelKeys | None = None,
                n_threads: int | None = None) -> tuple[FittedState, RowCache]:
    """New sparse points for a fitted state, from its labelled frames and row cache.

    Parameters
    ----------
    state : FittedState
        With its per-class factors; one kernel term or a sum of them.
    frames : list of ase.Atoms
        The labelled structures the state was built from, in the cache's order.
    new_points : mapping or sequence of mappings
        The points to add, as (m, F) raw descriptor vectors (a 1-D array of m values for a
        one-feature descriptor such as Distance2b's distances, Å), named by kernel key (see
        :func:`points_by_term`): ``{key: X}`` with key a name (``"Cu"``, ``"Cu-Al"``) or the
        integer key (atomic number; :func:`~kmlip.descriptors.distance2b.pair_key`), which for
        a sum of kernels must belong to exactly one term; ``{term_index: {key: X}}``; or one
        mapping per term (the form of ``KernelPotential.sparse_points_``). Each term's new
        points are appended after that key's existing points: columns stay blocked by term,
        then by key in the descriptor's key order.
    cache : RowCache, optional
        The rows of ``frames`` against the state's current points; None builds it (one more
        descriptor pass per frame).
    keys : LabelKeys, optional
    n_threads : int or None

    Returns
    -------
    state : FittedState
        Extended basis, L_hat of the extended K_MM (the state's jitter), factors refactored from
        ``[cached rows | new rows | y]``; e0, hyperparameters and calibration kept.
    cache : RowCache
        The rows against the extended basis, its columns in the extended order (each old column
        moved to its place in the extended layout, the new ones inserted at the end of their
        term's and key's block).

    Raises
    ------
    ValueError
        Points of a key the model has no e0 for (of one of its species), a key no term has or
        that names keys of several terms, wrong feature count, non-finite values, pair points
        outside the cutoff, frames that do not match the cache.
    """
    state.require_factors("add_columns")
    add = points_by_term(state, new_points)
    frames = lab.as_frames(frames)
    keys = label_keys(state, keys)
    if cache is None:
        cache = build_cache(state, frames, keys, n_threads)
    check_cache(state, cache)
    if len(cache) != len(frames):
        raise ValueError(f"the row cache holds {len(cache)} frames but {len(frames)} were given")
    if not any(add):
        return state, cache
    ext_terms, delta_terms, old_to_ext, new_to_ext = [], [], [], []
    ext_off = 0
    for t, term in enumerate(state.kernel.terms):
        old, desc, a = term.basis, term.descriptor, add[t]
        order = [k for k in desc.kernel_keys() if k in old.points or k in a]
        order += [k for k in old.species_z if k not in order]
        points = {k: np.concatenate([old.points[k], a[k]]) if k in old.points and k in a
                  else (old.points[k] if k in old.points else a[k]) for k in order}
        ext = _basis_like(desc, old, points, order)
        ext_terms.append(Term(desc, ext))
        # where this term's old and new columns go in the extended, term- then key-blocked order
        for k in old.species_z:
            old_to_ext.append(ext_off + ext.offsets[k] + np.arange(old.points[k].shape[0]))
        if a:
            delta = _basis_like(desc, old, a, order)
            delta_terms.append(Term(desc, delta))
            for k in delta.species_z:
                n_old = old.points[k].shape[0] if k in old.points else 0
                new_to_ext.append(ext_off + ext.offsets[k] + n_old
                                  + np.arange(a[k].shape[0]))
        ext_off += ext.n_sparse
    old_to_ext = np.concatenate(old_to_ext).astype(np.int64) if old_to_ext \
        else np.zeros(0, np.int64)
    new_to_ext = np.concatenate(new_to_ext).astype(np.int64)
    new_rows = _rows_of(state, KernelSum(delta_terms), frames, keys, n_threads)
    frames_ext = []
    for k, (fo, fn) in enumerate(zip(cache.frames, new_rows, strict=True)):
        if [r[0] for r in fo.rows] != [r[0] for r in fn.rows] or any(
                r0[1].shape[0] != r1[1].shape[0] or not np.array_equal(r0[2], r1[2])
                for r0, r1 in zip(fo.rows, fn.rows, strict=True)):
            raise ValueError(f"frame {k} does not match the row cache (other labels)")
        rows = []
        for (cls, K0, y, s), (_, K1, _, _) in zip(fo.rows, fn.rows, strict=True):
            K = np.zeros((K0.shape[0], ext_off))
            K[:, old_to_ext] = K0
            K[:, new_to_ext] = K1
            rows.append((cls, K, y, s))
        frames_ext.append(FrameRows(tuple(rows)))
    cache_ext = RowCache(tuple(frames_ext), ext_off)
    factors = cache_ext.factors()
    kernel = KernelSum(ext_terms)
    L_hat, jit = cholesky_jitter(kernel.kmm(), state.jitter)
    with_points = set(kernel.species_with_points())
    order_z = []
    for term in ext_terms:
        order_z += [z for z in term.descriptor.species_z if z not in order_z]
    species = tuple(chemical_symbols[z] for z in order_z
                    if z in with_points or chemical_symbols[z] in state.e0)
    new_state = FittedState.solved(
        factors=factors, L_hat=L_hat, hyper=state.hyper, kernel=kernel,
        baseline=state.baseline, sparse_indices=None, species=species,
        e0=dict(state.e0), jitter=jit, optimization=state.optimization,
        calibration=state.calibration)
    return new_state, cache_ext


def _basis_like(desc, old, points: dict, order: list):
    """A basis of the kind of ``old`` (same ζ, θ, cutoff) on ``points``, keys in ``order``."""
    if isinstance(old, kernels.SparseBasis):
        # the atom-centred kernel exactly as a fit builds it
        return kernels.SparseBasis(points, old.zeta, species_z=order)
    return desc.make_basis(points, getattr(old, "zeta", None))


def points_by_term(state: FittedState, new_points) -> list[dict[int, np.ndarray]]:
    """New sparse points sorted to their terms: ``[{kernel key: (m, F) array}]``, one dict per
    term (validated).

    How a caller names the term (for a sum of kernels):

    * ``{key: X}``: a key name (``"Cu"`` for an atom-centred term, ``"Cu-Al"`` or ``"Al-Cu"``
      for a Distance2b term) or an integer kernel key; it must belong to exactly one term;
      when several terms share it (e.g. two SOAP terms), name the term as below;
    * ``{term_index: {key: X}}`` (an int term index whose value is itself a mapping);
    * a list or tuple with one ``{key: X}`` mapping (or None) per term, as
      ``KernelPotential.sparse_points_`` returns them for a sum.

    The forms may be mixed within one mapping; points given twice for a key are concatenated.
    A single-term model takes ``{symbol or Z: X}`` (and the forms above with term 0).

    Raises
    ------
    ValueError, TypeError
        See :func:`add_columns`.
    """
    terms = state.kernel.terms
    n_t = len(terms)
    out: list[dict[int, np.ndarray]] = [{} for _ in terms]

    def put(t: int, key, P) -> None:
        desc = terms[t].descriptor
        try:
            k = _term_key(desc, key)
            name = desc.key_name(k)
            species = [chemical_symbols[z] for z in desc.key_species(k)]
        except (IndexError, ValueError):
            raise ValueError(f"{key!r} is not a kernel key of term {t} ("
                             f"{type(desc).__name__}; keys: "
                             f"{[desc.key_name(q) for q in desc.kernel_keys()]})") from None
        for z in species:
            if z not in state.e0:
                what = name if name == z else f"{name} (species {z})"
                raise ValueError(f"new sparse points of {what}, a species the model has no "
                                 "e0 for")
        if k not in desc.kernel_keys():
            raise ValueError(f"{name!r} is not a kernel key of term {t} ("
                             f"{type(desc).__name__}; keys: "
                             f"{[desc.key_name(q) for q in desc.kernel_keys()]})")
        F = int(desc.n_features)
        P = np.asarray(P, dtype=np.float64)
        if P.ndim == 1 and F == 1:
            P = P[:, None]
        if P.ndim != 2 or P.shape[1] != F:
            raise ValueError(f"new sparse points of {name} must have shape (m, {F}), got "
                             f"{P.shape}")
        if not np.all(np.isfinite(P)):
            raise ValueError(f"new sparse points of {name} are not finite")
        if P.shape[0] and not getattr(desc, "atom_centred", True):
            # a point whose prior variance is zero (a pair at or beyond the cutoff) adds a
            # zero column: nothing to learn, and K_MM only regular by its jitter
            kss = terms[t].basis.self_kernel(P, np.full(P.shape[0], k, dtype=np.int64))
            if np.any(kss <= 1e-12):
                raise ValueError(f"new sparse points of {name} include environments with no "
                                 f"prior variance (outside the cutoff of term {t})")
        if P.shape[0]:
            out[t][k] = np.concatenate([out[t][k], P]) if k in out[t] else P

    def term_of(key) -> int:
        if n_t == 1:
            return 0
        hits = []
        for t, term in enumerate(terms):
            try:
                k = _term_key(term.descriptor, key)
            except ValueError:
                continue
            if k in term.descriptor.kernel_keys():
                hits.append(t)
        if not hits:
            raise ValueError(f"{key!r} is not a kernel key of any term (keys: "
                             + "; ".join(f"term {t}: " + ", ".join(
                                 tm.descriptor.key_name(k) for k in tm.descriptor.kernel_keys())
                                 for t, tm in enumerate(terms)) + ")")
        if len(hits) > 1:
            raise ValueError(f"{key!r} is a kernel key of terms {hits}; name the term: "
                             f"{{term_index: {{{key!r}: X}}}}")
        return hits[0]

    def term_index(t) -> int:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < n_t:
            raise ValueError(f"{t!r} is not a term index (the model has {n_t} kernel terms)")
        return int(t)

    if isinstance(new_points, (list, tuple)):
        if len(new_points) != n_t:
            raise ValueError(f"new points: {len(new_points)} mappings given for {n_t} terms")
        for t, pts in enumerate(new_points):
            if pts is None:
                continue
            if not isinstance(pts, Mapping):
                raise TypeError(f"new points of term {t} must be a mapping {{key: X}}, got "
                                f"{type(pts).__name__}")
            for key, P in pts.items():
                put(t, key, P)
        return out
    if not isinstance(new_points, Mapping):
        raise TypeError("new points must be a mapping {key: X}, {term: {key: X}} or a list "
                        f"of mappings, one per term; got {type(new_points).__name__}")
    for key, P in new_points.items():
        if isinstance(P, Mapping):
            t = term_index(key)
            for k, Q in P.items():
                put(t, k, Q)
        else:
            put(term_of(key), key, P)
    return out


def _term_key(desc, key) -> int:
    """Integer kernel key of a term's descriptor from a name or an int (ValueError otherwise);
    an atom-centred term takes any chemical symbol (checked against its keys afterwards)."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return int(key)
    if getattr(desc, "atom_centred", True):
        return lab_z(key)
    if not isinstance(key, str):
        raise ValueError(f"{key!r} is not a kernel key name")
    return desc.key_from_name(key)


def lab_z(symbol) -> int:
    """Atomic number of a chemical symbol (ValueError otherwise)."""
    from ase.data import atomic_numbers

    if not isinstance(symbol, str) or atomic_numbers.get(symbol, 0) == 0:
        raise ValueError(f"{symbol!r} is not a chemical symbol")
    return atomic_numbers[symbol]


def check_cache(state: FittedState, cache: RowCache) -> None:
    if not isinstance(cache, RowCache):
        raise TypeError(f"cache must be a RowCache, got {type(cache).__name__}")
    if cache.n_columns != state.n_sparse:
        raise ValueError(f"the row cache has {cache.n_columns} columns but the model has "
                         f"{state.n_sparse} sparse points")
    n_cache = {}
    for f in cache.frames:
        for cls, K, _, _ in f.rows:
            n_cache[cls] = n_cache.get(cls, 0) + K.shape[0]
    n_state = {c: n for c, n in state.n_labels.items() if n}
    if n_cache != n_state:
        raise ValueError(f"the row cache holds labels {n_cache} but the model {n_state}")


__all__ = ["FrameRows", "RowCache", "add_columns", "add_rows", "build_cache", "label_keys",
           "points_by_term"]
