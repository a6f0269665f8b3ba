"""Atom-centred symmetry functions (Behler) with exact analytic gradients.

The per-centre maths is plain C in ``_ext/acsf_core.h``; ``_ext/acsf.pyx`` runs it over the
centres with OpenMP.

Definitions
-----------
With the pair vectors ``r_ij`` of the neighbour list (periodic images are separate neighbours)
and Behler's cutoff ``fc(r) = (cos(pi r / r_cut) + 1) / 2`` for ``r < r_cut`` (0 beyond):

- ``G1 = sum_j fc(r_ij)``
- ``G2(eta, R_s) = sum_j exp(-eta (r_ij - R_s)^2) fc(r_ij)``
- ``G3(kappa) = sum_j cos(kappa r_ij) fc(r_ij)``
- ``G4(eta, zeta, lambda) = sum_{j<k} 2^(1-zeta) (1 + lambda cos theta_ijk)^zeta
  exp(-eta (r_ij^2 + r_ik^2 + r_jk^2)) fc(r_ij) fc(r_ik) fc(r_jk)``
- ``G5(eta, zeta, lambda)``: G4 without the ``r_jk`` factors.

G1–G3 are summed per neighbour species, G4 and G5 per unordered pair of neighbour species; the
sums over ``j < k`` run over unordered pairs of neighbours, as in DScribe. These are the
definitions of ``dscribe.descriptors.ACSF`` (2.1), whose values and feature order
``convention="dscribe"`` reproduces (the only convention so far).

Feature layout (DScribe's order)
--------------------------------
Species sorted by atomic number, indices ``0..S-1``. First, for each species ``s``: G1, then the
G2 in the order of ``g2_params``, then the G3 in the order of ``g3_params``. Then, for each
species pair ``(a, b)`` with ``a <= b`` in the order ``(0,0), (0,1), (1,1), (0,2), (1,2),
(2,2), ...`` (by ``b``, then ``a``): the G4, then the G5, in parameter order.
``n_features = S (1 + n_g2 + n_g3) + S (S + 1) / 2 (n_g4 + n_g5)``; :meth:`ACSF.feature_labels`
names each one.

The centre's own species is not encoded (as in DScribe): a model that needs it gets it from the
kernel's species handling or from separate descriptors per species.

Memory: features ``8 F`` bytes per atom; gradients ``24 F`` bytes per pair entry (one per
neighbour-list pair plus one self term per atom); scratch ``8 n_neigh (4 + n_g4 + n_g5)`` bytes
per thread.
"""
from __future__ import annotations

import numpy as np
from ase.data import chemical_symbols

from kmlip._threads import resolve_threads, threads_for
from kmlip._validate import (
    check_choice,
    check_n_threads,
    check_real,
    check_species,
    checked_system,
)
from kmlip.descriptors.base import MAX_CUTOFF, MAX_FEATURES, Descriptor, PairGradients
from kmlip.neighbors import check_no_overlap, neighbor_list_arrays

#: Feature count from which :meth:`ACSF.backprop` contracts in the kernel (vjp) rather than
#: through dense pair gradients: the vjp needs a second pass over the triplets, which the
#: gradient path saves, while the gradient path writes 3 F doubles per pair. Measured (1 thread,
#: 1000-atom CuAl, 216-atom Si): F = 17-40 dense path 1.2-1.3x faster, F = 50 even.
VJP_MIN_FEATURES = 48
#: Largest zeta accepted: (1 + lambda cos)^zeta / 2^(zeta - 1) underflows long before.
MAX_ZETA = 1000.0


def _param_table(name: str, value, width: int, labels: tuple[str, ...]) -> np.ndarray:
    """``value`` (None or a list of ``width``-tuples, or of numbers when ``width`` is 0) as a
    float array of shape (n, max(width, 1)); TypeError/ValueError naming ``name``."""
    if value is None:
        return np.zeros((0, max(width, 1)))
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__len__"):
        raise TypeError(f"{name} must be a list of {_what(width, labels)}, got "
                        f"{type(value).__name__} {value!r}")
    rows = []
    for k, row in enumerate(list(value) if not isinstance(value, np.ndarray) else value):
        if width == 0:
            rows.append((check_real(f"{name}[{k}]", row),))
            continue
        if isinstance(row, (str, bytes, dict)) or not hasattr(row, "__len__"):
            raise TypeError(f"{name}[{k}] must be a tuple {labels}, got "
                            f"{type(row).__name__} {row!r}")
        if len(row) != width:
            raise ValueError(f"{name}[{k}] must have {width} entries {labels}, got {row!r}")
        rows.append(tuple(check_real(f"{name}[{k}] ({lab})", x)
                          for lab, x in zip(labels, row, strict=True)))
    return np.array(rows, dtype=np.float64).reshape(len(rows), max(width, 1))


def _what(width: int, labels: tuple[str, ...]) -> str:
    return "numbers " + str(labels) if width == 0 else f"tuples {labels}"


class ACSF(Descriptor):
    """Behler–Parrinello atom-centred symmetry functions G1–G5.

    Parameters
    ----------
    species : list of str or int
        Every species that may appear (symbols or atomic numbers; a list, tuple, set or 1-D
        array).
    r_cut : float, default 6.0
        Cutoff radius in Å, in (0, 100].
    g2_params : list of (eta, R_s), optional
        ``eta >= 0`` in 1/Å², ``R_s`` in Å (any finite value).
    g3_params : list of float, optional
        ``kappa`` in 1/Å (any finite value).
    g4_params : list of (eta, zeta, lambda), optional
        ``eta >= 0`` in 1/Å², ``zeta`` in [1, 1000] (below 1 the derivative is singular at
        ``cos theta = -lambda``), ``lambda`` in {-1, 1}.
    g5_params : list of (eta, zeta, lambda), optional
        As ``g4_params``.
    convention : {"dscribe"}, default "dscribe"
        Definitions and feature order of ``dscribe.descriptors.ACSF`` (module docstring).
    n_threads : int or None, default None
        OpenMP threads, 1..4096; None follows OMP_NUM_THREADS.

    Notes
    -----
    The arguments are stored unchanged (``get_params`` returns the objects passed, so
    ``sklearn.base.clone`` works) and validated on construction and by ``set_params``:
    ``TypeError`` for a wrong type, ``ValueError`` for a bad value, each naming the parameter.
    G1 is always present (as in DScribe), so ``n_features >= len(species)``.
    """

    def __init__(self, species, r_cut: float = 6.0, g2_params=None, g3_params=None,
                 g4_params=None, g5_params=None, convention: str = "dscribe",
                 n_threads: int | None = None):
        self.species = species
        self.r_cut = r_cut
        self.g2_params = g2_params
        self.g3_params = g3_params
        self.g4_params = g4_params
        self.g5_params = g5_params
        self.convention = convention
        self.n_threads = n_threads
        self._setup()

    # -- construction -------------------------------------------------------------------------
    def _setup(self) -> None:
        zs = check_species(self.species)
        r_cut = check_real("r_cut", self.r_cut, low=0.0, low_open=True, high=MAX_CUTOFF,
                           unit="Å")
        g2 = _param_table("g2_params", self.g2_params, 2, ("eta", "R_s"))
        g3 = _param_table("g3_params", self.g3_params, 0, ("kappa",))[:, 0].copy()
        g4 = _param_table("g4_params", self.g4_params, 3, ("eta", "zeta", "lambda"))
        g5 = _param_table("g5_params", self.g5_params, 3, ("eta", "zeta", "lambda"))
        for name, t in (("g2_params", g2), ("g4_params", g4), ("g5_params", g5)):
            bad = np.flatnonzero(t[:, 0] < 0)
            if bad.size:
                raise ValueError(f"{name}[{bad[0]}]: eta must be >= 0 1/Å², got {t[bad[0], 0]!r}")
        for name, t in (("g4_params", g4), ("g5_params", g5)):
            for k, (_, zeta, lam) in enumerate(t):
                if not 1.0 <= zeta <= MAX_ZETA:
                    raise ValueError(f"{name}[{k}]: zeta must be in [1, {MAX_ZETA:g}] (below 1 "
                                     f"its derivative is singular), got {zeta!r}")
                if lam not in (-1.0, 1.0):
                    raise ValueError(f"{name}[{k}]: lambda must be -1 or 1, got {lam!r}")
        check_choice("convention", self.convention, ("dscribe",))
        check_n_threads(self.n_threads)

        S = len(zs)
        n_rad = 1 + len(g2) + len(g3)
        n_ang = len(g4) + len(g5)
        n_features = S * n_rad + S * (S + 1) // 2 * n_ang
        if n_features > MAX_FEATURES:
            raise ValueError(f"ACSF with {S} species has {n_features:,} features per atom, more "
                             f"than the limit of {MAX_FEATURES:,}; use fewer parameters or "
                             "species")
        self.species_z = tuple(sorted(zs))
        self._z_index = {z: k for k, z in enumerate(self.species_z)}
        self._zmap = np.zeros(max(self.species_z) + 1, dtype=np.int64)  # Z -> species code
        for z, k in self._z_index.items():
            self._zmap[z] = k
        self.n_features = n_features
        self.cutoff = r_cut
        self._g2 = np.ascontiguousarray(g2)
        self._g3 = np.ascontiguousarray(g3)
        self._g4 = np.ascontiguousarray(g4)
        self._g5 = np.ascontiguousarray(g5)
        self._radial_block = np.arange(S, dtype=np.int64) * n_rad
        ang = np.zeros((S, S), dtype=np.int64)
        labels = []
        for s in range(S):
            z = self.species_z[s]
            labels.append(("G1", z))
            labels += [("G2", z, float(e), float(rs)) for e, rs in g2]
            labels += [("G3", z, float(k)) for k in g3]
        for b in range(S):
            for a in range(b + 1):
                # DScribe's pair index b (b + 1) / 2 + a for a <= b
                ang[a, b] = ang[b, a] = S * n_rad + (b * (b + 1) // 2 + a) * n_ang
        for b in range(S):
            for a in range(b + 1):
                za, zb = self.species_z[a], self.species_z[b]
                labels += [("G4", za, zb, *map(float, t)) for t in g4]
                labels += [("G5", za, zb, *map(float, t)) for t in g5]
        self._angular_block = ang
        self._labels = labels
        assert len(labels) == n_features

    def feature_labels(self) -> list[tuple]:
        """Label of every feature, in output order: ``("G1", Z)``, ``("G2", Z, eta, R_s)``,
        ``("G3", Z, kappa)``, ``("G4", Z_a, Z_b, eta, zeta, lambda)``, ``("G5", ...)``."""
        return list(self._labels)

    # -- evaluation ---------------------------------------------------------------------------
    def _prepare(self, atoms, n_threads, gradients):
        """Neighbour list, kernel arguments and thread count of one structure."""
        numbers, positions, cell, pbc = checked_system(atoms)
        unknown = sorted(set(numbers.tolist()) - set(self.species_z))
        if unknown:
            names = ", ".join(chemical_symbols[z] for z in unknown)
            raise ValueError(f"species {names} not declared in ACSF(species=...)")
        nt = resolve_threads(self.n_threads if n_threads is None else n_threads)
        nl = neighbor_list_arrays(positions, cell, pbc, self.cutoff)
        check_no_overlap(nl)
        pair_species = np.ascontiguousarray(self._zmap[numbers][nl.neighbors])
        n_atoms, n_pairs = len(numbers), len(nl.centers)
        mean_neigh = n_pairs / max(n_atoms, 1)
        per_pair = (len(self._g2) + len(self._g3) + 1
                    + mean_neigh / 2 * (len(self._g4) + len(self._g5)) * (4 if gradients else 1))
        # in threads_for's units (~ flops / 10): a small structure runs on one thread
        nt = threads_for(nt, n_pairs * (per_pair * 3 + (self.n_features if gradients else 0)))
        args = (self._g2, self._g3, self._g4, self._g5, self._radial_block, self._angular_block,
                float(self.cutoff), self.n_features, nl.offsets,
                np.ascontiguousarray(nl.vectors), pair_species)
        return nt, nl, n_atoms, args

    def backprop(self, atoms, grad_fn, n_threads: int | None = None):
        """Features, then forces and virial of a scalar ``E(X)`` without forming dX/dr.

        Computes ``X``, calls ``V = grad_fn(X)`` (``dE/dX``, shape (n_atoms, n_features)) and
        contracts ``V`` with the pair derivatives inside the kernel (the fast path of
        prediction; same results as the base class's contraction of :meth:`transform`, which
        is used below :data:`VJP_MIN_FEATURES` features, where it is faster).

        Returns
        -------
        X : ndarray, shape (n_atoms, n_features)
        V : ndarray, shape (n_atoms, n_features), as returned by ``grad_fn``
        forces : ndarray, shape (n_atoms, 3)
            ``-dE/dr`` in energy units per Å.
        virial : ndarray, shape (3, 3)
            ``dE/d eps`` (unsymmetrised, ``W[a, b] = sum_pairs dE/d(r_ij)_a (r_ij)_b``).
        """
        from kmlip._ext import acsf as _acsf

        if self.n_features < VJP_MIN_FEATURES:
            return super().backprop(atoms, grad_fn, n_threads=n_threads)
        nt, nl, n_atoms, args = self._prepare(atoms, n_threads, True)
        X = np.empty((n_atoms, self.n_features))
        if n_atoms:
            _acsf.compute(*args, X, None, nt)
        V = np.ascontiguousarray(grad_fn(X), dtype=np.float64)
        if V.shape != X.shape:
            raise ValueError(f"grad_fn returned shape {V.shape}, expected {X.shape}")
        fpair = np.zeros((len(nl.centers), 3))
        if len(nl.centers):
            _acsf.vjp(*args, V, fpair, nt)
        forces = np.zeros((n_atoms, 3))
        for a in range(3):
            forces[:, a] = (np.bincount(nl.neighbors, weights=-fpair[:, a], minlength=n_atoms)
                            + np.bincount(nl.centers, weights=fpair[:, a], minlength=n_atoms))
        virial = fpair.T @ nl.vectors
        return X, V, forces, virial

    def transform(self, atoms, gradients: bool = False, n_threads: int | None = None):
        """ACSF of every atom, optionally with position gradients.

        Parameters
        ----------
        atoms : ase.Atoms
        gradients : bool
            Also return the per-pair derivatives.
        n_threads : int or None
            Overrides the descriptor's thread count for this call.

        Returns
        -------
        X : ndarray, shape (n_atoms, n_features)
        G : PairGradients (only if ``gradients``)
            ``G.values[k] = dX[G.centers[k]] / dr[G.neighbors[k]]`` in feature units per Å,
            shape (n_entries, 3, F); per centre the self term, then one entry per neighbour
            pair (the layout of :class:`kmlip.SOAP`). ``G.strain()`` is the cell derivative.
        """
        from kmlip._ext import acsf as _acsf

        nt, nl, n_atoms, args = self._prepare(atoms, n_threads, gradients)
        n_pairs = len(nl.centers)
        X = np.empty((n_atoms, self.n_features))
        grad = np.empty((n_atoms + n_pairs, 3, self.n_features)) if gradients else None
        if n_atoms:
            _acsf.compute(*args, X, grad, nt)
        if not gradients:
            return X
        return X, PairGradients.from_neighbor_list(nl, grad)
