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

Species compression (Darby, Kermode & Csányi, npj Comput. Mater. 8, 166 (2022); DScribe 2.1's
``compression={"mode": ...}`` with unit species weights). With ``c~_{nlm} = sum_s c^s_{nlm}`` the
density of all species together:

- ``compression="mu2"``: ``p_{nn'l} = sum_m c~_{nlm} c~_{n'lm}``, the power spectrum of one
  species-blind density; for l, for n, for n' >= n; ``n_max (n_max + 1)/2 (l_max + 1)`` features,
  independent of S; labels ``(0, 0, l, n, n')`` (Z = 0: all species).
- ``compression="mu1nu1"``: ``p^Z_{nn'l} = sum_m c^Z_{nlm} c~_{n'lm}``; for Z, for l, for n, for
  every n' (the matrix is not symmetric); ``S n_max^2 (l_max + 1)`` features; labels
  ``(Z, 0, l, n, n')``.

Scale factors: ``"dscribe"`` multiplies every feature by ``pi*sqrt(8/(2l+1))`` as DScribe does.
``"smooth"`` keeps the property of the full spectrum that the packed dot product equals the
Frobenius inner product of the per-l matrices: for mu2 (a symmetric matrix, packed n <= n') the
off-diagonal entries carry sqrt(2); for mu1nu1 (every (n, n') stored) all factors are 1.
Gradients, the strain derivative and :meth:`SOAP.backprop` are exact in every mode.

Memory: features ``8 F`` bytes per atom; gradients ``24 F`` bytes per pair entry (one per
neighbour-list pair plus one self term per atom); scratch per thread
``8 [(S n_max + 4 n_max)(l_max+1)^2 + 3 F + n_neigh (4 (l_max+1)^2 + 2 (l_max+1) n_max)]`` bytes
(F of the chosen compression; mu1nu1 counts S + 1 species here, mu2 one).
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
from kmlip.neighbors import check_no_overlap, neighbor_list_arrays

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


class GradientBuffer:
    """Reusable float64 storage for the gradient arrays of successive ``transform`` calls.

    Grows (by a quarter more than asked, so that slowly growing structures do not reallocate
    every time) and never shrinks; owned by a loop over structures (training).
    """

    def __init__(self):
        self._data = np.empty(0)

    def take(self, shape: tuple[int, ...]) -> np.ndarray:
        """An uninitialised C-contiguous float64 array of ``shape``, a view of the buffer.

        Parameters
        ----------
        shape : tuple of int

        Returns
        -------
        ndarray of float64, shape ``shape``
            Valid until the next ``take``.
        """
        n = math.prod(shape)
        if n > self._data.size:
            self._data = np.empty(n + n // 4)
        return self._data[:n].reshape(shape)


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
    compression : {"off", "mu1nu1", "mu2"}, default "off"
        Species compression (see the module docstring): "off" the full power spectrum, "mu1nu1"
        features linear in the number of species, "mu2" independent of it. Any other value
        raises ValueError.

    Notes
    -----
    The arguments are stored unchanged (``get_params`` returns the very objects passed, as
    scikit-learn expects) and validated on construction and by ``set_params``: ``TypeError``
    for a wrong type (bools are not numbers here), ``ValueError`` for a bad value, each naming
    the parameter. The feature count ``(S n_max)(S n_max + 1)/2 (l_max + 1)`` may not exceed
    :data:`kmlip.descriptors.base.MAX_FEATURES` (10^6: 8 MB of features per atom, 24 MB of
    gradients per neighbour pair); with compression the count of that mode applies.
    """

    def __init__(self, species, r_cut: float = 5.0, n_max: int = 8, l_max: int = 6,
                 sigma: float = 0.5, convention: str = "smooth", cutoff_width: float = 0.5,
                 normalize: bool = False, center_weight: float = 1.0,
                 n_threads: int | None = None, compression: str = "off"):
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
        self.compression = compression
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
        modes = ("off", "mu1nu1", "mu2")
        if not isinstance(self.compression, str) or self.compression not in modes:
            raise ValueError(f"compression must be one of {list(modes)} (a str, not DScribe's "
                             f"dict), got {self.compression!r}")
        mode = self.compression
        S, L1 = len(zs), l_max + 1
        R = S * N
        if mode == "mu1nu1":
            n_features = S * N * N * L1
        elif mode == "mu2":
            n_features = N * (N + 1) // 2 * L1
        else:
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

        if mode == "off":
            index, scale, labels = self._full_layout(S, N, L1)
        else:
            index, scale, labels = self._compressed_layout(mode, S, N, L1)
        self._feat_index, self._feat_scale, self._labels = index, scale, labels
        # orthonormal real Y_lm = norm * Pi_l^|m| * {cos, sin}(m phi) r^-l, at l*l + l + |m|
        norm = np.zeros(L1 * L1)
        for l in range(L1):
            for m in range(l + 1):
                fac = math.factorial(l - m) / math.factorial(l + m)
                norm[l * l + l + m] = math.sqrt((2 - (m == 0)) * (2 * l + 1) / (4 * np.pi) * fac)
        self._ylm_norm = norm

    def _full_layout(self, S, N, L1):
        """Index (L1, R, R) and scale tables and labels of the full power spectrum."""
        R = S * N
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
        return index, scale, labels

    def _compressed_layout(self, mode, S, N, L1):
        """Tables of the compressed modes. mu2 is the full layout of one species (the kernel
        runs with every atom mapped to species 0); mu1nu1 has index and scale of shape
        (L1, S N, N), entry [l, Z N + n, n'] for p^Z_{nn'l} (the layout soap_core.h expects)."""
        if mode == "mu2":
            index, scale, labels = self._full_layout(1, N, L1)
            return index, scale, [(0, 0, l, n, n2) for (_, _, l, n, n2) in labels]
        index = np.zeros((L1, S * N, N), dtype=np.int64)
        scale = np.ones((L1, S * N, N))
        labels = []
        f = 0
        for a in range(S):
            for l in range(L1):
                for n in range(N):
                    for n2 in range(N):
                        index[l, a * N + n, n2] = f
                        if self.convention == "dscribe":
                            scale[l, a * N + n, n2] = np.pi * math.sqrt(8.0 / (2 * l + 1))
                        labels.append((self.species_z[a], 0, l, n, n2))
                        f += 1
        assert f == self.n_features
        return index, scale, labels

    def feature_labels(self) -> list[tuple[int, int, int, int, int]]:
        """``(Z_a, Z_b, l, n, n')`` of every feature, in output order (Z = 0: the sum over all
        species, in the compressed modes)."""
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
        check_no_overlap(nl)
        zmap = np.zeros(max(self.species_z) + 1, dtype=np.int64)
        for z, k in self._z_index.items():
            zmap[z] = k
        center_species = zmap[numbers]
        n_species = len(self.species_z)
        if self.compression == "mu2":
            # one species-blind density: the full kernel with every atom of species 0
            center_species = np.zeros_like(center_species)
            n_species = 1
        pair_species = np.ascontiguousarray(center_species[nl.neighbors])
        args = (self._A, self._B, self._feat_index, self._feat_scale, self._ylm_norm,
                self.n_max, self.l_max,
                n_species, self.n_features, self.cutoff, self._width,
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
            _soap.compute(*args, X, None, nt, mu1nu1=self.compression == "mu1nu1")
        V = np.ascontiguousarray(grad_fn(X), dtype=np.float64)
        if V.shape != X.shape:
            raise ValueError(f"grad_fn returned shape {V.shape}, expected {X.shape}")
        fpair = np.zeros((len(nl.centers), 3))
        if len(nl.centers):
            _soap.vjp(*args, V, fpair, nt, mu1nu1=self.compression == "mu1nu1")
        forces = np.zeros((n_atoms, 3))
        for a in range(3):
            forces[:, a] = (np.bincount(nl.neighbors, weights=-fpair[:, a], minlength=n_atoms)
                            + np.bincount(nl.centers, weights=fpair[:, a], minlength=n_atoms))
        virial = fpair.T @ nl.vectors
        return X, V, forces, virial

    #: ``transform`` accepts ``grad_buffer`` (a :class:`GradientBuffer`).
    accepts_grad_buffer = True

    def transform(self, atoms, gradients: bool = False, n_threads: int | None = None,
                  grad_buffer: GradientBuffer | None = None):
        """SOAP of every atom, optionally with position gradients.

        Parameters
        ----------
        atoms : ase.Atoms
        gradients : bool
            Also return the per-pair derivatives.
        n_threads : int or None
            Overrides the descriptor's thread count for this call.
        grad_buffer : GradientBuffer, optional
            Storage for ``G.values``, reused from call to call (a loop over structures then
            touches no fresh pages per structure). ``G.values`` is then a view of the buffer,
            valid until the buffer's next use. Without it ``G.values`` is a new array.

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
            # not zeroed here (~51 MB for 108 Cu atoms at n_max 8, l_max 6): the kernel writes
            # every value, except with several species the blocks a pair cannot move, and then
            # each OpenMP thread zeroes the entries of its centres (soap.pyx), so the first
            # touch and the zeroing run in parallel instead of serially in this thread
            shape = (n_entries, 3, self.n_features)
            grad = np.empty(shape) if grad_buffer is None else grad_buffer.take(shape)
        if n_atoms:
            _soap.compute(*args, X, grad, nt, mu1nu1=self.compression == "mu1nu1")
        if not gradients:
            return X
        return X, PairGradients.from_neighbor_list(nl, grad)
