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

import numpy as np
from ase.data import atomic_numbers, chemical_symbols

from kmlip._threads import resolve_threads, threads_for
from kmlip._validate import (
    check_bool,
    check_choice,
    check_int,
    check_n_threads,
    check_real,
    check_species,
    checked_system,
)
from kmlip.descriptors.base import MAX_CUTOFF, MAX_FEATURES, Descriptor, PairGradients
from kmlip.neighbors import neighbor_list_arrays

DSCRIBE_DECAY = 1e-3
#: Upper bounds of n_max and l_max (see SOAP's docstring for why).
MAX_N_MAX = 20
MAX_L_MAX = 20


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
        Every species that may appear (symbols or atomic numbers; a list, tuple, set or 1-D
        array). ASE's dummy atom ``"X"`` (Z = 0) is refused.
    r_cut : float, default 5.0
        Cutoff radius in Å, >= 1 (the GTOs decay at points spread over [1 Å, r_cut]).
    n_max : int, default 8
        Number of radial basis functions, 1..20: DScribe's GTO basis is numerically linearly
        dependent beyond about 16 functions at any r_cut, so larger values cannot help.
    l_max : int, default 6
        Maximum angular momentum, 0..20.
    sigma : float, default 0.5
        Gaussian atom width in Å (> 0).
    convention : {"smooth", "dscribe"}, default "smooth"
        See the module docstring.
    cutoff_width : float, default 0.5
        Width of the cosine cutoff in Å, in [0, r_cut] ("smooth" only); 0 gives a hard cutoff
        at r_cut.
    normalize : bool, default False
        Return ``p / |p|`` (gradients transformed accordingly). Must be a bool (NumPy bool
        accepted); strings such as ``"no"`` raise TypeError.
    center_weight : float, default 1.0
        Weight of the centre atom's own Gaussian (any finite number).
    n_threads : int or None, default None
        OpenMP threads, 1..4096; None follows OMP_NUM_THREADS.

    Notes
    -----
    The arguments are stored unchanged (``get_params`` returns the very objects passed, as
    scikit-learn expects) and validated on construction and by ``set_params``: ``TypeError``
    for a wrong type (bools are not numbers here), ``ValueError`` for a bad value, each naming
    the parameter. The feature count ``(S n_max)(S n_max + 1)/2 (l_max + 1)`` may not exceed
    :data:`kmlip.descriptors.base.MAX_FEATURES` (10^6: 8 MB of features per atom, 24 MB of
    gradients per neighbour pair).
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
        # Validate everything, in plain Python types, before allocating anything: the sizes
        # below are bounded so that no parameter set can exhaust memory in the basis or tables.
        zs = check_species(self.species)
        r_cut = check_real("r_cut", self.r_cut, low=1.0, high=MAX_CUTOFF, unit="Å")
        N = check_int("n_max", self.n_max, low=1, high=MAX_N_MAX, why_high=(
            "DScribe's GTO radial basis is numerically linearly dependent beyond ~16 functions "
            "for any r_cut (overlap condition number > 1e15), so more cannot add information"))
        l_max = check_int("l_max", self.l_max, low=0, high=MAX_L_MAX)
        sigma = check_real("sigma", self.sigma, low=0.0, low_open=True, high=MAX_CUTOFF,
                           unit="Å")
        check_choice("convention", self.convention, ("smooth", "dscribe"))
        width = check_real("cutoff_width", self.cutoff_width, low=0.0, unit="Å")
        if width > r_cut:
            raise ValueError(f"cutoff_width must be in [0, r_cut={r_cut:g}] Å, got "
                             f"{self.cutoff_width!r}")
        check_real("center_weight", self.center_weight)
        check_bool("normalize", self.normalize)
        check_n_threads(self.n_threads)
        S, L1 = len(zs), l_max + 1
        R = S * N
        n_features = R * (R + 1) // 2 * L1
        if n_features > MAX_FEATURES:
            raise ValueError(
                f"SOAP with {S} species, n_max={N}, l_max={l_max} has {n_features:,} features "
                f"per atom, more than the limit of {MAX_FEATURES:,} ({8 * MAX_FEATURES // 10**6} "
                "MB per atom, 3x that per neighbour pair for gradients); lower n_max or l_max, "
                "or use fewer species")

        self.species_z = tuple(sorted(zs))
        self._z_index = {z: k for k, z in enumerate(self.species_z)}
        self.n_features = n_features

        alphas, betas = gto_basis(r_cut, N, l_max)
        eta = 1.0 / (2.0 * sigma**2)
        ls = np.arange(L1)[:, None]
        # exp(-alpha eta r^2 / (alpha + eta)) and the closed-form prefactor of the radial
        # integral, pi^1.5 eta^-1.5 (1 + alpha/eta)^-(l + 3/2), folded into the orthonormaliser.
        self._A = np.ascontiguousarray(-alphas / (1.0 + alphas / eta))
        pref = np.pi**1.5 * eta**-1.5 * (1.0 + alphas / eta) ** (-(ls + 1.5))
        # stored as B[l, k, n] (primitive k, basis function n) for the kernel's loops
        self._B = np.ascontiguousarray((betas * pref[:, None, :]).transpose(0, 2, 1))

        if self.convention == "dscribe":
            self.cutoff = r_cut + sigma * math.sqrt(-2.0 * math.log(DSCRIBE_DECAY))
            self._width = 0.0
        else:
            self.cutoff = r_cut
            self._width = width

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

    @staticmethod
    def _zof(s) -> int:
        return atomic_numbers[s] if isinstance(s, str) else int(s)

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

    def _work(self, n_pairs: int, gradients: bool) -> int:
        """Size of a call in the units of :func:`kmlip._threads.threads_for` (~ flops / 10):
        a structure too small for a parallel region to pay off runs on one thread."""
        per_pair = self.n_max * (self.l_max + 1) ** 2 + (3 * self.n_features if gradients else 0)
        # ~1 ms of single-thread work: a 32-atom Cu cell (n_max 6, l_max 4) stays serial
        return n_pairs * per_pair // 8

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
        nt = threads_for(nt, self._work(len(nl.centers), False))
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
        nt = threads_for(nt, self._work(len(nl.centers), gradients))
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
