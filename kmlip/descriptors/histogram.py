"""A radial-histogram descriptor (per atom): smooth histograms of neighbour distances per species.

For centre ``i`` and neighbour species ``b`` (index in ``species``)::

    X_i[b * n_max + n] = sum_{j in b, r_ij < r_cut} fc(r_ij) * exp(-(r_ij - mu_n)^2 / (2 w^2))

with ``mu_n`` evenly spaced on ``[0.5, r_cut]`` (Å), ``w`` their spacing unless given, and ``fc``
a shifted cosine that goes from 1 at ``r_cut - cutoff_width`` to 0 at ``r_cut``. With the
normalised dot-product kernel of degree ζ it yields a many-body (EAM-like) energy model; it is
cheap (pure NumPy, O(pairs × n_max)) and mostly serves tests and quick baselines.

Gradients follow :class:`kmlip.descriptors.base.PairGradients`: per centre, first the self term
(``-sum`` of the pair terms of that centre, so that entries sharing (centre, neighbour) add up to
the full derivative even for periodic images of the centre itself), then one entry per
neighbour-list pair with ``values = phi'(r) r_hat_ij`` in the block of the neighbour's species.
"""
from __future__ import annotations

import numpy as np
from ase.data import chemical_symbols

from kmlip._validate import check_int, check_n_threads, check_real, check_species, checked_system
from kmlip.descriptors.base import MAX_CUTOFF, MAX_FEATURES, Descriptor, PairGradients

#: Upper bound of n_max (see :class:`PairHistogram`).
MAX_N_MAX = 1000


def _pairs(atoms, cutoff: float):
    """Full neighbour list sorted by centre: (i, j, r_ij vectors, distances)."""
    try:
        from kmlip.neighbors import (  # the package's own (compiled) list
            check_no_overlap,
            neighbor_list,
        )
    except ImportError:
        neighbor_list = None
    if neighbor_list is not None:
        nl = neighbor_list(atoms, cutoff)
        check_no_overlap(nl)
        i = np.asarray(nl.centers, dtype=np.int64)
        j = np.asarray(nl.neighbors, dtype=np.int64)
        D = np.asarray(nl.vectors, dtype=np.float64)
        d = np.asarray(nl.distances, dtype=np.float64)
    else:
        from ase.neighborlist import neighbor_list as ase_nl

        i, j, D, d = ase_nl("ijDd", atoms, cutoff)
        i = i.astype(np.int64)
        j = j.astype(np.int64)
    order = np.argsort(i, kind="stable")
    return i[order], j[order], np.ascontiguousarray(D[order]), d[order]


class PairHistogram(Descriptor):
    """Two-body radial descriptor with analytic gradients.

    Parameters
    ----------
    species : list of str or int
        Chemical symbols (or atomic numbers) the descriptor accepts, centres and neighbours;
        a list, tuple, set or 1-D array. ASE's dummy atom ``"X"`` (Z = 0) is refused.
    r_cut : float
        Cutoff radius in Å, > 0.5 (the Gaussians' centres lie on [0.5, r_cut]).
    n_max : int, default 8
        Number of Gaussians per neighbour species, 2..1000 (at 1000 their spacing is already
        below 0.01 Å for r_cut < 10 Å; more only costs memory).
    width : float or None, default None
        Gaussian width ``w`` in Å (> 0); ``None`` uses the spacing of the centres ``mu_n``.
    cutoff_width : float, default 0.5
        Width in Å of the cosine transition ending at ``r_cut``, in (0, r_cut].

    The arguments are stored unchanged (``get_params`` returns the objects passed) and validated
    on construction and by ``set_params``: ``TypeError`` for a wrong type (bools are not
    numbers), ``ValueError`` for a bad value, naming the parameter.

    Attributes
    ----------
    n_features : int
        ``len(species) * n_max``.
    cutoff : float
        ``r_cut`` (Å).
    """

    def __init__(self, species, r_cut: float, n_max: int = 8, width: float | None = None,
                 cutoff_width: float = 0.5):
        self.species = species
        self.r_cut = r_cut
        self.n_max = n_max
        self.width = width
        self.cutoff_width = cutoff_width
        self._setup()

    def _setup(self) -> None:
        zs = check_species(self.species)
        r_cut = check_real("r_cut", self.r_cut, low=0.5, low_open=True, high=MAX_CUTOFF,
                           unit="Å")
        n_max = check_int("n_max", self.n_max, low=2, high=MAX_N_MAX)
        width = None if self.width is None else check_real(
            "width", self.width, low=0.0, low_open=True, high=r_cut, unit="Å")
        cw = check_real("cutoff_width", self.cutoff_width, low=0.0, low_open=True, unit="Å")
        if cw > r_cut:
            raise ValueError(f"cutoff_width must be in (0, r_cut={r_cut:g}] Å, got "
                             f"{self.cutoff_width!r}")
        n_features = len(zs) * n_max
        if n_features > MAX_FEATURES:
            raise ValueError(f"PairHistogram with {len(zs)} species and n_max={n_max} has "
                             f"{n_features:,} features per atom, more than the limit of "
                             f"{MAX_FEATURES:,}; lower n_max or use fewer species")
        self.species_z = zs
        self._r_cut, self._n_max, self._cw = r_cut, n_max, cw
        self.n_features = n_features
        self.cutoff = r_cut
        self._mu = np.linspace(0.5, r_cut, n_max)
        self._w = width if width is not None else float(self._mu[1] - self._mu[0])

    def _species_index(self, atoms) -> np.ndarray:
        lookup = {z: k for k, z in enumerate(self.species_z)}
        Z = atoms.get_atomic_numbers()
        bad = sorted({int(z) for z in Z if int(z) not in lookup})
        if bad:
            names = [chemical_symbols[z] for z in bad]
            raise ValueError(f"species {names} not declared in the descriptor's species "
                             f"{list(self.species)}")
        return np.array([lookup[int(z)] for z in Z], dtype=np.int64)

    def _radial(self, d: np.ndarray):
        """phi_n(d) and d phi_n / d r for each distance, shapes (n_pairs, n_max)."""
        r0 = self._r_cut - self._cw
        x = np.clip((d - r0) / self._cw, 0.0, 1.0)
        fc = 0.5 * (1.0 + np.cos(np.pi * x))
        dfc = np.where((d > r0) & (d < self._r_cut),
                       -0.5 * np.pi / self._cw * np.sin(np.pi * x), 0.0)
        u = d[:, None] - self._mu[None, :]
        g = np.exp(-0.5 * u * u / self._w**2)
        phi = fc[:, None] * g
        dphi = dfc[:, None] * g - fc[:, None] * g * u / self._w**2
        return phi, dphi

    def transform(self, atoms, gradients: bool = False, n_threads: int | None = None):
        """Features, and optionally per-pair gradients.

        Parameters
        ----------
        atoms : ase.Atoms
        gradients : bool
            Also return :class:`PairGradients`.
        n_threads : int or None
            Ignored (pure NumPy); accepted for protocol compatibility.

        Returns
        -------
        X : ndarray, shape (n_atoms, n_features)
        G : PairGradients, only when ``gradients``
        """
        checked_system(atoms)  # TypeError for anything but Atoms; NaN, singular cells
        check_n_threads(n_threads)
        spec = self._species_index(atoms)
        n = len(atoms)
        i, j, D, d = _pairs(atoms, self._r_cut)
        keep = d < self._r_cut
        i, j, D, d = i[keep], j[keep], D[keep], d[keep]
        phi, dphi = self._radial(d)
        nm = self._n_max
        X = np.zeros((n, self.n_features))
        cols = spec[j][:, None] * nm + np.arange(nm)[None, :]
        np.add.at(X, (np.repeat(i, nm).reshape(-1, nm), cols), phi)
        if not gradients:
            return X
        n_pairs = len(i)
        counts = np.bincount(i, minlength=n)
        offsets = np.zeros(n + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(counts + 1)  # +1: the self term of each centre
        # Entry index of each pair: after its centre's self term, in neighbour-list order.
        pair_start = offsets[:-1] + 1
        rank = np.arange(n_pairs) - np.repeat(np.cumsum(counts) - counts, counts)
        pos = pair_start[i] + rank
        n_e = int(offsets[-1])
        values = np.zeros((n_e, 3, self.n_features))
        rhat = D / d[:, None]
        pair_vals = np.zeros((n_pairs, 3, self.n_features))
        rows = np.arange(n_pairs)
        for k in range(nm):
            pair_vals[rows, :, spec[j] * nm + k] = rhat * dphi[:, k:k + 1]
        values[pos] = pair_vals
        self_vals = np.zeros((n, 3, self.n_features))
        np.add.at(self_vals, i, pair_vals)
        values[offsets[:-1]] = -self_vals
        centers = np.repeat(np.arange(n, dtype=np.int64), counts + 1)
        neighbors = np.arange(n, dtype=np.int64)[centers].copy()
        neighbors[pos] = j
        vectors = np.zeros((n_e, 3))
        vectors[pos] = D
        return X, PairGradients(centers=centers, neighbors=neighbors, values=values,
                                vectors=vectors, offsets=offsets)
