"""SOAP power spectrum with exact analytic gradients (Cython/OpenMP kernel in ``_ext/soap.pyx``).

Basis and density
-----------------
Radial basis: DScribe's GTOs, ``phi_{kl}(r) = r^l exp(-alpha_{kl} r^2)`` with ``alpha`` chosen so
that function ``k`` decays to 1e-3 at ``a_k`` (``a`` evenly spaced on [1, r_cut]), Löwdin
orthonormalised per ``l``. Atom density: unnormalised Gaussians ``exp(-|r - r_j|^2 / 2 sigma^2)``,
the centre atom included (``center_weight``). The radial integral of a Gaussian against a GTO has a
closed form, so expansion coefficients are exact (no quadrature, no splines).

Conventions
-----------
``convention="smooth"`` (default, for potentials): neighbours with ``r < r_cut`` weighted by a
shifted cosine that goes from 1 at ``r_cut - cutoff_width`` to 0 at ``r_cut``, so energies and
forces are smooth; power spectrum ``p = sum_m c c'`` with off-diagonal (r < r') entries times
sqrt(2), so that ``p . q`` equals the full (unpacked) inner product.

``convention="dscribe"``: reproduces ``dscribe.descriptors.SOAP(rbf="gto")``: hard cutoff at
``r_cut + sigma*sqrt(-2 ln 1e-3)`` (= r_cut + 3.717 sigma), the prefactor ``pi*sqrt(8/(2l+1))``.

Feature layout (both conventions, DScribe's order)
--------------------------------------------------
Species sorted by atomic number. For each species pair (a, b) with a <= b, for l in 0..l_max,
for n in 0..n_max-1, for n' in (n..n_max-1 if a == b else 0..n_max-1): ``p[(a n)(b n') l]``.
``n_features = (S n_max)(S n_max + 1)/2 (l_max + 1)`` for S species. :meth:`SOAP.feature_labels`
lists the tuples ``(Z_a, Z_b, l, n, n')``.

Memory: features ``8 F`` bytes per atom; gradients ``24 F`` bytes per pair entry (one per
neighbour-list pair plus one self term per atom); scratch per thread
``8 [(S n_max + 4 n_max)(l_max+1)^2 + 3 F + n_neigh (4 (l_max+1)^2 + 2 (l_max+1) n_max)]`` bytes.
"""
from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from ase.data import atomic_numbers, chemical_symbols

from kmlip._threads import resolve_threads
from kmlip._validate import checked_system
from kmlip.descriptors.base import Descriptor, PairGradients
from kmlip.neighbors import neighbor_list_arrays

DSCRIBE_DECAY = 1e-3


def gto_basis(r_cut: float, n_max: int, l_max: int) -> tuple[np.ndarray, np.ndarray]:
    """DScribe's GTO exponents and Löwdin orthonormalisation coefficients.

    Returns
    -------
    alphas : ndarray, shape (l_max + 1, n_max), 1/Å²
    betas : ndarray, shape (l_max + 1, n_max, n_max)
        ``R_{nl}(r) = sum_k betas[l, n, k] r^l exp(-alphas[l, k] r^2)`` is orthonormal in
        ``int r^2 dr`` on [0, inf).
    """
    a = np.linspace(1.0, r_cut, n_max)
    alphas = np.zeros((l_max + 1, n_max))
    betas = np.zeros((l_max + 1, n_max, n_max))
    worst = 1.0
    for l in range(l_max + 1):
        al = -np.log(DSCRIBE_DECAY / a**l) / a**2
        m = al[:, None] + al[None, :]
        S = 0.5 * math.gamma(l + 1.5) * m ** (-l - 1.5)
        w, U = np.linalg.eigh(S)
        if w.min() <= 0.0:
            raise ValueError(
                f"the GTO radial basis is numerically linearly dependent for n_max={n_max}, "
                f"r_cut={r_cut}: lower n_max or raise r_cut")
        worst = min(worst, w.min() / w.max())
        alphas[l] = al
        betas[l] = (U / np.sqrt(w)) @ U.T
    if worst < 1e-13:
        warnings.warn(f"the GTO radial basis is ill-conditioned for n_max={n_max}, "
                      f"r_cut={r_cut} (overlap rcond {worst:.1e}); features lose precision",
                      RuntimeWarning, stacklevel=3)
    return alphas, betas


class SOAP(Descriptor):
    """Smooth Overlap of Atomic Positions power spectrum.

    Parameters
    ----------
    species : list of str or int
        Every species that may appear (symbols or atomic numbers).
    r_cut : float
        Cutoff radius in Å (> 0).
    n_max : int
        Number of radial basis functions (>= 1).
    l_max : int
        Maximum angular momentum (>= 0).
    sigma : float
        Gaussian atom width in Å (> 0).
    convention : {"smooth", "dscribe"}
        See the module docstring.
    cutoff_width : float
        Width of the cosine cutoff in Å ("smooth" only); 0 gives a hard cutoff at r_cut.
    normalize : bool
        Return ``p / |p|`` (gradients transformed accordingly).
    center_weight : float
        Weight of the centre atom's own Gaussian.
    n_threads : int or None
        OpenMP threads; None follows OMP_NUM_THREADS.
    """

    def __init__(self, species, r_cut: float = 5.0, n_max: int = 8, l_max: int = 6,
                 sigma: float = 0.5, convention: str = "smooth", cutoff_width: float = 0.5,
                 normalize: bool = False, center_weight: float = 1.0,
                 n_threads: int | None = None):
        self.species = species
        self.r_cut = r_cut
        self.n_max = n_max
        self.l_max = l_max
        self.sigma = sigma
        self.convention = convention
        self.cutoff_width = cutoff_width
        self.normalize = normalize
        self.center_weight = center_weight
        self.n_threads = n_threads
        self._setup()

    # -- construction -------------------------------------------------------------------------
    def _setup(self) -> None:
        if isinstance(self.species, (str, int)) or not hasattr(self.species, "__iter__"):
            raise TypeError("species must be a list of chemical symbols or atomic numbers")
        zs = []
        for s in self.species:
            if isinstance(s, (int, np.integer)) and not isinstance(s, bool):
                z = int(s)
                if not 0 < z < len(chemical_symbols):
                    raise ValueError(f"invalid atomic number {z} in species")
            elif isinstance(s, str) and s in atomic_numbers:
                z = atomic_numbers[s]
            else:
                raise ValueError(f"unknown species {s!r}")
            zs.append(z)
        if not zs:
            raise ValueError("species must not be empty")
        if len(set(zs)) != len(zs):
            raise ValueError(f"species contains duplicates: {list(self.species)}")
        for name in ("r_cut", "sigma", "cutoff_width", "center_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
                raise TypeError(f"{name} must be a number, got {type(v).__name__}")
            if not math.isfinite(v):
                raise ValueError(f"{name} must be finite, got {v}")
        for name in ("n_max", "l_max"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if self.r_cut <= 0:
            raise ValueError(f"r_cut must be > 0, got {self.r_cut}")
        if self.n_max < 1:
            raise ValueError(f"n_max must be >= 1, got {self.n_max}")
        if self.l_max < 0:
            raise ValueError(f"l_max must be >= 0, got {self.l_max}")
        if self.l_max > 20:
            raise ValueError(f"l_max must be <= 20, got {self.l_max}")
        if self.sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        if self.convention not in ("smooth", "dscribe"):
            raise ValueError(f"convention must be 'smooth' or 'dscribe', got {self.convention!r}")
        if self.cutoff_width < 0 or self.cutoff_width > self.r_cut:
            raise ValueError(f"cutoff_width must be in [0, r_cut], got {self.cutoff_width}")
        resolve_threads(self.n_threads)

        self.species_z = tuple(sorted(zs))
        self._z_index = {z: k for k, z in enumerate(self.species_z)}
        S, N, L1 = len(self.species_z), self.n_max, self.l_max + 1
        R = S * N
        self.n_features = R * (R + 1) // 2 * L1

        alphas, betas = gto_basis(float(self.r_cut), N, self.l_max)
        eta = 1.0 / (2.0 * self.sigma**2)
        ls = np.arange(L1)[:, None]
        # exp(-alpha eta r^2 / (alpha + eta)) and the closed-form prefactor of the radial
        # integral, pi^1.5 eta^-1.5 (1 + alpha/eta)^-(l + 3/2), folded into the orthonormaliser.
        self._A = np.ascontiguousarray(-alphas / (1.0 + alphas / eta))
        pref = np.pi**1.5 * eta**-1.5 * (1.0 + alphas / eta) ** (-(ls + 1.5))
        # stored as B[l, k, n] (primitive k, basis function n) for the kernel's loops
        self._B = np.ascontiguousarray((betas * pref[:, None, :]).transpose(0, 2, 1))

        if self.convention == "dscribe":
            self.cutoff = float(self.r_cut + self.sigma * math.sqrt(-2.0 * math.log(DSCRIBE_DECAY)))
            self._width = 0.0
        else:
            self.cutoff = float(self.r_cut)
            self._width = float(self.cutoff_width)

        index = np.full((L1, R, R), -1, dtype=np.int64)
        scale = np.zeros((L1, R, R))
        labels = []
        f = 0
        for a in range(S):
            for b in range(a, S):
                for l in range(L1):
                    for n in range(N):
                        for n2 in range(n if a == b else 0, N):
                            r1, r2 = a * N + n, b * N + n2
                            index[l, r1, r2] = f
                            if self.convention == "dscribe":
                                scale[l, r1, r2] = np.pi * math.sqrt(8.0 / (2 * l + 1))
                            else:
                                scale[l, r1, r2] = 1.0 if r1 == r2 else math.sqrt(2.0)
                            labels.append((self.species_z[a], self.species_z[b], l, n, n2))
                            f += 1
        assert f == self.n_features
        self._feat_index, self._feat_scale, self._labels = index, scale, labels
        # orthonormal real Y_lm = norm * Pi_l^|m| * {cos, sin}(m phi) r^-l, at l*l + l + |m|
        norm = np.zeros(L1 * L1)
        for l in range(L1):
            for m in range(l + 1):
                fac = math.factorial(l - m) / math.factorial(l + m)
                norm[l * l + l + m] = math.sqrt((2 - (m == 0)) * (2 * l + 1) / (4 * np.pi) * fac)
        self._ylm_norm = norm

    def feature_labels(self) -> list[tuple[int, int, int, int, int]]:
        """``(Z_a, Z_b, l, n, n')`` of every feature, in output order."""
        return list(self._labels)

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {"species": [s if isinstance(s, str) else int(s) for s in self.species],
                "r_cut": float(self.r_cut), "n_max": int(self.n_max), "l_max": int(self.l_max),
                "sigma": float(self.sigma), "convention": self.convention,
                "cutoff_width": float(self.cutoff_width), "normalize": bool(self.normalize),
                "center_weight": float(self.center_weight), "n_threads": self.n_threads}

    def set_params(self, **params) -> SOAP:
        for k, v in params.items():
            if k not in self.get_params():
                raise ValueError(f"invalid parameter {k!r} for SOAP")
            setattr(self, k, v)
        self._setup()
        return self

    @staticmethod
    def _zof(s) -> int:
        return atomic_numbers[s] if isinstance(s, str) else int(s)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"SOAP({args})"

    # -- evaluation ---------------------------------------------------------------------------
    def _prepare(self, atoms, n_threads):
        numbers, positions, cell, pbc = checked_system(atoms)
        unknown = sorted(set(numbers.tolist()) - set(self.species_z))
        if unknown:
            names = ", ".join(chemical_symbols[z] for z in unknown)
            raise ValueError(f"species {names} not declared in SOAP(species=...)")
        nt = resolve_threads(self.n_threads if n_threads is None else n_threads)
        nl = neighbor_list_arrays(positions, cell, pbc, self.cutoff)
        zmap = np.zeros(max(self.species_z) + 1, dtype=np.int32)
        for z, k in self._z_index.items():
            zmap[z] = k
        center_species = zmap[numbers]
        pair_species = np.ascontiguousarray(center_species[nl.neighbors])
        args = (self._A, self._B, self._feat_index, self._feat_scale, self._ylm_norm,
                self.n_max, self.l_max,
                len(self.species_z), self.n_features, self.cutoff, self._width,
                float(self.center_weight), bool(self.normalize), center_species, nl.offsets,
                np.ascontiguousarray(nl.vectors), pair_species)
        return nt, nl, center_species, pair_species, args

    def backprop(self, atoms, grad_fn, n_threads: int | None = None):
        """Features, then forces and virial of a scalar ``E(X)`` without forming dX/dr.

        Computes ``X``, calls ``V = grad_fn(X)`` (``dE/dX``, shape (n_atoms, n_features)) and
        contracts ``V`` with the pair derivatives inside the kernel (cost per pair independent
        of n_features). This is the fast path of prediction.

        Returns
        -------
        X : ndarray, shape (n_atoms, n_features)
        V : ndarray, shape (n_atoms, n_features), as returned by ``grad_fn``
        forces : ndarray, shape (n_atoms, 3)
            ``-dE/dr`` in energy units per Å.
        virial : ndarray, shape (3, 3)
            ``dE/d eps`` (unsymmetrised, ``W[a, b] = sum_pairs dE/d(r_ij)_a (r_ij)_b``);
            the ASE stress is ``sym(W) / volume``.
        """
        from kmlip._ext import soap as _soap

        nt, nl, center_species, pair_species, args = self._prepare(atoms, n_threads)
        n_atoms = len(center_species)
        X = np.empty((n_atoms, self.n_features))
        if n_atoms:
            _soap.compute(*args, X, None, nt)
        V = np.ascontiguousarray(grad_fn(X), dtype=np.float64)
        if V.shape != X.shape:
            raise ValueError(f"grad_fn returned shape {V.shape}, expected {X.shape}")
        fpair = np.zeros((len(nl.centers), 3))
        if len(nl.centers):
            _soap.vjp(*args, V, fpair, nt)
        forces = np.zeros((n_atoms, 3))
        for a in range(3):
            forces[:, a] = (np.bincount(nl.neighbors, weights=-fpair[:, a], minlength=n_atoms)
                            + np.bincount(nl.centers, weights=fpair[:, a], minlength=n_atoms))
        virial = fpair.T @ nl.vectors
        return X, V, forces, virial

    def transform(self, atoms, gradients: bool = False, n_threads: int | None = None):
        """SOAP of every atom, optionally with position gradients.

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
            ``G.values[k] = dX[G.centers[k]] / dr[G.neighbors[k]]``, shape (n_entries, 3, F).
        """
        from kmlip._ext import soap as _soap

        nt, nl, center_species, pair_species, args = self._prepare(atoms, n_threads)
        n_atoms = len(center_species)
        X = np.empty((n_atoms, self.n_features))
        grad = None
        if gradients:
            n_entries = n_atoms + len(nl.centers)
            # zeros, not empty: the kernel skips the species blocks a pair cannot move
            grad = np.zeros((n_entries, 3, self.n_features))
        if n_atoms:
            _soap.compute(*args, X, grad, nt)
        if not gradients:
            return X
        # entry layout per centre i: [self, pairs of i in neighbour-list order]
        counts = np.diff(nl.offsets)
        offsets = nl.offsets + np.arange(n_atoms + 1)
        centers = np.repeat(np.arange(n_atoms, dtype=np.int64), counts + 1)
        first = offsets[:-1]
        neighbors = np.empty_like(centers)
        vectors = np.zeros((len(centers), 3))
        mask = np.ones(len(centers), dtype=bool)
        mask[first] = False
        neighbors[first] = np.arange(n_atoms)
        neighbors[mask] = nl.neighbors
        vectors[mask] = nl.vectors
        return X, PairGradients(centers=centers, neighbors=neighbors, values=grad,
                                vectors=vectors, offsets=offsets)
