"""Ewald summation of point charges: an ASE calculator and the electrostatic baseline of a model.

The energy of point charges ``q_i`` at ``r_i`` in a periodic (triclinic) cell is split as::

    E = E_real + E_recip + E_self + E_background

    E_real  = k_e/2 Σ'_{i,j,S} q_i q_j erfc(α r_ijS) / r_ijS          (pairs with r < r_c)
    E_recip = k_e 2π/V Σ_{k≠0} exp(-k²/4α²)/k² |S(k)|²,  S(k) = Σ_j q_j e^{i k·r_j}   (|k| < k_c)
    E_self  = -k_e α/√π Σ_i q_i²
    E_bg    = -k_e π Q² / (2 V α²)      (neutralising background for a net charge Q = Σ q_i)

with k_e = 14.399645 eV·Å. Forces and the full stress tensor are the analytic derivatives of
both sums (the background term, which scales as 1/V, adds -E_bg/V to each diagonal entry).
Systems with ``pbc`` all False get the bare Coulomb sum over all pairs instead.

Choice of parameters for a requested accuracy ε: with p = -ln(ε/5), r_c = √p/α and k_c = 2α√p,
so the largest omitted term of either sum is ~ε/5 relative to its first (the factor 5 is a
measured safety margin); α = c √π (N/V²)^{1/6} balances the two sums (cost ∝ N^{3/2}), and the
prefactor ``c`` (``ALPHA_PREFACTOR``) was tuned by timing the compiled loops (the cost is flat
within ±10% of it). Achieved accuracy, measured against a reference at ε = 1e-14 on rattled rock
salt (64 to 1,000 ions, rattle 0.05-0.3 Å, ε = 1e-3 ... 1e-9) and tested at the default
(``tests/test_ewald.py``): relative energy error below ε (typically 0.01-0.1 ε); largest force
component error below ε k_e q²/r_nn² (measured ≤ 0.46 of it; r_nn the nearest-neighbour
distance, q the largest charge); largest stress component error a few ε max|σ| (up to 8 ε).

Algorithm: real space over linked cells (bins of r_c/2) with a half stencil, each pair evaluated
once (Newton's third law): per bin, the atoms of its stencil are gathered once, and each of its
atoms runs one vectorised pass over them (distance test, compaction, erfc, sums). Reciprocal
space over the half space of k vectors (S(-k) = S(k)*), phases e^{ik·r} from per-axis tables by
recurrence; the forces vectorised over blocks of 16 atoms.

Memory: O(N) — per atom the wrapped positions, fractional coordinates, forces, energies and a
6-component virial (~300 bytes in all), plus min(16, bins) arrays of 4 doubles per atom for the
far ends of the pairs (≤ 512 bytes per atom); per thread, phase tables of 256 atoms
(~4 kB · (n₁+2n₂+2n₃), n_a ≈ k_c|a_a|/2π) and a buffer of ≥ 1,024 candidate neighbours; and at
most 64 partial structure factors of the N_k ∝ N^{1/2} reciprocal vectors. No pair list is
stored: pairs are generated from linked cells on the fly.

Results do not depend on the number of threads, not even in the last bit: every output is
summed in a fixed order (the far ends of the pairs per fixed group of bins, the groups added in
order).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.data import atomic_numbers, chemical_symbols

from kmlip._threads import resolve_threads, threads_for
from kmlip._validate import check_numbers

__all__ = ["Ewald", "K_E"]

#: Coulomb constant e²/(4π ε₀) in eV·Å.
K_E = 14.399645

_FORMAT_VERSION = 1
# alpha * r_cut = sqrt(-ln eps) must stay within the fitted range of the compiled erfc (6.5)
_MIN_ACCURACY = 1e-17
# The cutoffs are set for eps / 5: with exactly eps, the measured relative energy error of
# rattled rock salt reached 1.4 eps in one case out of 24 (typically it is 0.01-0.5 eps).
_ACCURACY_MARGIN = 5.0


class Ewald(Calculator):
    """Ewald electrostatics of point charges, as an ASE calculator and as a model baseline.

    Parameters
    ----------
    charges : dict or None, default None
        Charge (in units of e) per species, keyed by chemical symbol (``{"Na": 1, "Cl": -1}``)
        or atomic number. Every species present in a structure must have an entry. ``None``
        takes per-atom charges from ``atoms.get_initial_charges()``.
    accuracy : float, default 1e-6
        Target relative accuracy ε of the energy, 1e-17 <= ε < 1. Sets the cutoffs
        r_c = √(-ln(ε/5))/α (Å) and k_c = 2α√(-ln(ε/5)) (1/Å). Forces come out accurate to
        ε k_e q²/r_nn² (eV/Å); see the module notes for the measured errors.
    n_threads : int or None, default None
        OpenMP threads; ``None`` follows ``OMP_NUM_THREADS``. A structure with less than
        ~1 ms of work (below ~300 ions at the default accuracy) runs on one thread, where a
        parallel region would cost more than it saves. Results are identical for any thread
        count.
    alpha : float or None, default None
        Splitting parameter α (1/Å). ``None`` chooses it per structure for the fastest sum;
        an explicit value keeps the accuracy (the cutoffs follow α) but not the speed.

    Notes
    -----
    Implemented properties: ``energy`` and ``free_energy`` (eV), ``energies`` (eV per atom,
    shape (n,); the split ½ q_i φ(r_i), which sums to the energy), ``forces`` (eV/Å, shape
    (n, 3)) and, for periodic cells, ``stress`` (eV/Å³, Voigt xx yy zz yz xz xy,
    ``(1/V) ∂E/∂ε`` as in ASE, positive for an ionic crystal held at its geometry).

    Periodic cells must be periodic in all three directions; partly periodic ones (slabs,
    wires) raise ``ValueError``. With ``pbc`` all False the bare Coulomb sum is used (no
    stress). Atoms of zero charge take no part in the sums (they get zero force).

    Examples
    --------
    >>> from ase.build import bulk
    >>> atoms = bulk("NaCl", "rocksalt", a=5.64)
    >>> atoms.calc = Ewald(charges={"Na": 1, "Cl": -1})
    >>> round(atoms.get_potential_energy(), 6)
    -8.923514
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    #: α = ALPHA_PREFACTOR · √π (N/V²)^{1/6}; measured optimum of the compiled loops.
    ALPHA_PREFACTOR = 1.5

    def __init__(self, charges: Mapping[str | int, float] | None = None,
                 accuracy: float = 1e-6, n_threads: int | None = None,
                 alpha: float | None = None) -> None:
        super().__init__()
        self._charges = _check_charges(charges)
        self._charges_arg = charges  # as passed: get_params returns it (scikit-learn's clone)
        if isinstance(accuracy, bool) or not isinstance(accuracy, numbers.Real):
            raise TypeError(f"accuracy must be a float, got {type(accuracy).__name__}")
        if not (_MIN_ACCURACY <= float(accuracy) < 1.0):
            raise ValueError(f"accuracy must be in [{_MIN_ACCURACY:g}, 1), got {accuracy!r} "
                             "(double precision cannot do better than ~1e-16 anyway)")
        self.accuracy = accuracy
        resolve_threads(n_threads)  # validates the type and value now, not at the first call
        self.n_threads = n_threads
        if alpha is not None:
            if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
                raise TypeError(f"alpha must be a float or None, got {type(alpha).__name__}")
            if not (math.isfinite(alpha) and alpha > 0):
                raise ValueError(f"alpha must be a finite positive number (1/Å), got {alpha!r}")
        self.alpha = alpha
        self._geometry: tuple | None = None  # cache of the last cell's stencil and k vectors
        self.parameters.update(self.to_dict())

    # ----------------------------------------------------------------------------- protocol
    @property
    def charges(self) -> dict[str, float] | None:
        """The per-species charges (a copy), or None for per-atom initial charges."""
        return None if self._charges is None else dict(self._charges)

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Constructor arguments as passed: ``charges``, ``accuracy``, ``n_threads``,
        ``alpha`` (so that scikit-learn's ``clone`` of a model with this baseline works)."""
        return {"charges": self._charges_arg, "accuracy": self.accuracy,
                "n_threads": self.n_threads, "alpha": self.alpha}

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable settings; :meth:`from_dict` rebuilds an equal object."""
        return {"type": "Ewald", "format_version": _FORMAT_VERSION, "charges": self.charges,
                "accuracy": float(self.accuracy), "n_threads": self.n_threads,
                "alpha": None if self.alpha is None else float(self.alpha)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Ewald:
        """Rebuilds an :class:`Ewald` from :meth:`to_dict` output.

        Raises
        ------
        ValueError
            If ``d`` describes another type or comes from a newer format version.
        """
        if not isinstance(d, Mapping):
            raise TypeError(f"from_dict expects a mapping, got {type(d).__name__}")
        if d.get("type", "Ewald") != "Ewald":
            raise ValueError(f"not an Ewald baseline: type={d.get('type')!r}")
        version = int(d.get("format_version", _FORMAT_VERSION))
        if version > _FORMAT_VERSION:
            raise ValueError(f"Ewald settings have format_version {version}, newer than "
                             f"{_FORMAT_VERSION} known to this kmlip; upgrade kmlip")
        return cls(charges=d.get("charges"), accuracy=d.get("accuracy", 1e-6),
                   n_threads=d.get("n_threads"), alpha=d.get("alpha"))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"Ewald({args})"

    def compute(self, atoms: Atoms) -> tuple[float, np.ndarray, np.ndarray | None]:
        """Energy, forces and stress of ``atoms`` (the baseline protocol of the GP model).

        Returns
        -------
        energy : float
            eV.
        forces : ndarray, shape (n_atoms, 3)
            eV/Å.
        stress : ndarray, shape (6,), or None
            eV/Å³, Voigt xx yy zz yz xz xy, ASE's sign; None for a non-periodic system.
        """
        r = self.evaluate(atoms)
        return r["energy"], r["forces"], r["stress"]

    def get_charges(self, atoms: Atoms) -> np.ndarray:
        """Per-atom charges (e), shape (n_atoms,), from the species map or the initial charges.

        Raises
        ------
        ValueError
            If a species has no charge in the map, or a charge is not finite.
        """
        if self._charges is None:
            q = np.array(atoms.get_initial_charges(), dtype=np.float64)
            if not np.all(np.isfinite(q)):
                bad = np.flatnonzero(~np.isfinite(q))[:5].tolist()
                raise ValueError(f"initial charges are not finite (NaN or inf) at atoms {bad}")
            return q
        numbers_ = atoms.get_atomic_numbers()
        check_numbers(numbers_)  # a huge one would size the table below, a negative one wrap
        table = np.full(max(int(numbers_.max(initial=0)) + 1, 1), np.nan)
        for sym, val in self._charges.items():
            z = atomic_numbers[sym]
            if z < table.size:
                table[z] = val
        q = table[numbers_]
        if np.any(np.isnan(q)):
            missing = sorted({chemical_symbols[z] for z in numbers_[np.isnan(q)]})
            raise ValueError(f"no charge given for species {', '.join(missing)}; charges map "
                             f"has {sorted(self._charges)}")
        return q

    def parameters_for(self, atoms: Atoms) -> dict[str, float]:
        """Splitting parameter α (1/Å) and cutoffs ``r_cut`` (Å), ``k_cut`` (1/Å) for ``atoms``
        (all None for a non-periodic system)."""
        q = self.get_charges(atoms)
        if not np.all(atoms.pbc):
            return {"alpha": None, "r_cut": None, "k_cut": None}  # direct sum (or refused)
        cell = np.asarray(atoms.cell.array, dtype=np.float64)
        volume = _check_cell(cell)
        return self._splitting(int(np.count_nonzero(q)), volume)

    def _splitting(self, n_charged: int, volume: float) -> dict[str, float]:
        p = math.sqrt(-math.log(float(self.accuracy) / _ACCURACY_MARGIN))
        if self.alpha is not None:
            alpha = float(self.alpha)
        else:
            n = max(n_charged, 1)
            alpha = self.ALPHA_PREFACTOR * math.sqrt(math.pi) * (n / volume**2) ** (1.0 / 6.0)
        return {"alpha": alpha, "r_cut": p / alpha, "k_cut": 2.0 * alpha * p}

    # ----------------------------------------------------------------------------- evaluation
    def evaluate(self, atoms: Atoms) -> dict[str, Any]:
        """Everything at once: ``energy`` (eV), ``energies`` (n,), ``forces`` (n, 3), ``stress``
        (6,) or None, plus ``alpha``, ``r_cut``, ``k_cut`` and ``n_kvectors`` used.

        Raises ValueError for two charged atoms (or an atom and a periodic image of another)
        closer than :data:`kmlip.neighbors.MIN_DISTANCE` (an atom given twice): their energy
        would be finite but meaningless (-8e9 eV at 1e-9 Å).
        """
        r = self._evaluate(atoms)
        q = np.abs(self.get_charges(atoms))
        q = q[q > 0]
        # Such a pair puts at least K_E q_min^2 / (2 MIN_DISTANCE) = 7e6 q_min^2 eV on each of its
        # atoms, 1000x over this trigger; sane structures stay far below it, so the neighbour
        # search that finds the pair runs only when needed (it would cost ~7% of a sum).
        from kmlip.neighbors import MIN_DISTANCE, check_no_overlap, neighbor_list_arrays

        if q.size > 1 and np.max(np.abs(r["energies"]), initial=0.0) \
                > 0.5e-3 * K_E * float(q.min()) ** 2 / MIN_DISTANCE:
            charged = np.flatnonzero(self.get_charges(atoms) != 0.0)
            nl = neighbor_list_arrays(atoms.positions[charged], atoms.cell.array, atoms.pbc,
                                      MIN_DISTANCE, n_threads=1)
            check_no_overlap(nl, index=charged, what="charged atoms")
        return r

    def _evaluate(self, atoms: Atoms) -> dict[str, Any]:
        from kmlip._ext import ewald as _core

        if not isinstance(atoms, Atoms):
            raise TypeError(f"expected ase.Atoms, got {type(atoms).__name__}")
        n = len(atoms)
        pos = np.ascontiguousarray(atoms.positions, dtype=np.float64)
        if not np.all(np.isfinite(pos)):
            bad = np.flatnonzero(~np.all(np.isfinite(pos), axis=1))[:5].tolist()
            raise ValueError(f"positions are not finite (NaN or inf) at atoms {bad}")
        pbc = np.asarray(atoms.pbc, dtype=bool)
        if pbc.any() and not pbc.all():
            raise ValueError(f"partly periodic systems (slabs, wires; pbc={pbc.tolist()}) are not "
                             "supported: Ewald needs pbc all True, or all False for a direct sum")
        q_all = self.get_charges(atoms)
        n_threads = resolve_threads(self.n_threads)
        periodic = bool(pbc.all())
        cell = np.asarray(atoms.cell.array, dtype=np.float64)
        volume = _check_cell(cell) if periodic else 0.0

        energies = np.zeros(n)
        forces = np.zeros((n, 3))
        stress = np.zeros(6) if periodic else None
        info: dict[str, Any] = {"alpha": None, "r_cut": None, "k_cut": None, "n_kvectors": 0}
        # Uncharged atoms contribute nothing; leaving them out keeps the cost to charged ones.
        idx = np.flatnonzero(q_all != 0.0)
        q = np.ascontiguousarray(q_all[idx])
        m = idx.size
        if m == 0:
            return {"energy": 0.0, "energies": energies, "forces": forces, "stress": stress, **info}

        if not periodic:
            x = np.ascontiguousarray(pos[idx])
            f = np.empty((m, 3))
            e = np.empty(m)
            n_threads = threads_for(n_threads, _DIRECT_WORK * m * m)
            if _core.direct_sum(x, q, n_threads, f, e):
                raise ValueError("two charged atoms are at the same position: infinite energy")
            energies[idx] = K_E * e
            forces[idx] = K_E * f
            return {"energy": float(energies.sum()), "energies": energies, "forces": forces,
                    "stress": None, **info}

        par = self._splitting(m, volume)
        alpha, rc, kc = par["alpha"], par["r_cut"], par["k_cut"]
        inv_cell = np.linalg.inv(cell)
        frac = pos[idx] @ inv_cell
        frac -= np.floor(frac)
        frac[frac >= 1.0] = 0.0  # -1e-17 - floor(-1e-17) rounds to 1.0
        x = frac @ cell

        # The bin stencil and the k vectors depend on the cell, alpha and the cutoffs alone:
        # keep the last ones (an MD run at fixed cell reuses them at every step).
        key = (cell.tobytes(), alpha, rc, kc, m)
        if self._geometry is None or self._geometry[0] != key:
            recip = 2.0 * np.pi * inv_cell.T  # rows b_1, b_2, b_3
            self._geometry = (key, _bins(cell, volume, rc, m), recip,
                              _kvectors(cell, recip, kc, alpha))
        _, bins, recip, kv = self._geometry
        # a structure too small for the parallel regions to pay for their start-up runs on one
        # thread (estimated half pairs, and atoms x half-space k vectors)
        n_pairs = m * m * (2.0 * math.pi / 3.0) * rc**3 / volume
        n_threads = threads_for(n_threads, _PAIR_WORK * n_pairs + _KVEC_WORK * m * kv["w"].size)

        # ---- real space: linked cells, half list, per-centre sums
        nbin = bins["n"]
        bidx = np.minimum((frac * nbin).astype(np.int64), nbin - 1)
        flat = (bidx[:, 0] * nbin[1] + bidx[:, 1]) * nbin[2] + bidx[:, 2]
        order = np.argsort(flat, kind="stable")
        bin_start = np.searchsorted(flat[order], np.arange(int(np.prod(nbin)) + 1))
        xs = np.ascontiguousarray(x[order].T)  # (3, m): the pair loop reads coordinates in runs
        qs = np.ascontiguousarray(q[order])
        f_real = np.zeros((m, 3))
        e_real = np.zeros(m)
        v_real = np.zeros((m, 6))
        bad = _core.real_space(xs, qs, bin_start.astype(np.int64), int(nbin[0]), int(nbin[1]),
                               int(nbin[2]), bins["stencil"], cell, alpha, rc, n_threads, f_real,
                               e_real, v_real)
        if bad:
            raise ValueError("two charged atoms (or an atom and a periodic image of another) are "
                             "at the same position: infinite energy")
        inv = np.empty_like(order)
        inv[order] = np.arange(m)
        f_real = f_real[inv]
        e_real = e_real[inv]
        vir = v_real.sum(axis=0)

        # ---- reciprocal space: half of the k vectors (S(-k) = S(k)*), grouped in rows of l
        info["n_kvectors"] = 2 * kv["w"].size
        pref = 4.0 * np.pi / volume
        phi = np.zeros(m)
        f_rec = np.zeros((m, 3))
        e_recip = 0.0
        if kv["w"].size:
            frac_c = np.ascontiguousarray(frac)
            s_re = np.empty(kv["w"].size)
            s_im = np.empty(kv["w"].size)
            n1, n2, n3 = kv["n"]
            _core.structure_factors(frac_c, q, kv["rows"], n1, n2, n3, n_threads, s_re, s_im)
            s2 = s_re * s_re + s_im * s_im
            wk = pref * kv["w"] * s2
            e_recip = float(wk.sum())
            k = kv["k"]
            c = kv["c"]
            cw = c * wk
            vir += np.array([cw @ (k[:, 0] ** 2), cw @ (k[:, 1] ** 2), cw @ (k[:, 2] ** 2),
                             cw @ (k[:, 1] * k[:, 2]), cw @ (k[:, 0] * k[:, 2]),
                             cw @ (k[:, 0] * k[:, 1])])
            vir[:3] -= e_recip
            g = np.empty((m, 3))
            _core.recip_atoms(frac_c, kv["rows"], n1, n2, n3, kv["w"] * s_re, kv["w"] * s_im,
                              n_threads, g, phi)
            f_rec = (2.0 * pref) * q[:, None] * (g @ recip)
            phi *= 2.0 * pref

        # ---- self and background
        qtot = float(q.sum())
        e_self_i = -alpha / math.sqrt(math.pi) * q * q
        e_bg = -math.pi * qtot * qtot / (2.0 * volume * alpha * alpha)
        e_bg_i = -math.pi * qtot * q / (2.0 * volume * alpha * alpha)  # sums to e_bg
        vir[:3] -= e_bg

        e_atoms = e_real + 0.5 * q * phi + e_self_i + e_bg_i
        energies[idx] = K_E * e_atoms
        forces[idx] = K_E * (f_real + f_rec)
        energy = K_E * (float(e_real.sum()) + e_recip + float(e_self_i.sum()) + e_bg)
        stress = K_E * vir / volume
        info.update(alpha=alpha, r_cut=rc, k_cut=kc)
        return {"energy": energy, "energies": energies, "forces": forces, "stress": stress,
                **info}

    # ----------------------------------------------------------------------------- ASE
    def calculate(self, atoms: Atoms | None = None, properties: list[str] | None = None,
                  system_changes: list[str] = all_changes) -> None:
        """ASE entry point: fills ``self.results`` (stress only for periodic systems)."""
        super().calculate(atoms, properties or ["energy"], system_changes)
        try:
            r = self.evaluate(self.atoms)
        except BaseException:
            self.reset()  # else asking again would return the previous structure's results
            raise
        self.results = {"energy": r["energy"], "free_energy": r["energy"],
                        "energies": r["energies"], "forces": r["forces"]}
        if r["stress"] is not None:
            self.results["stress"] = r["stress"]


# --------------------------------------------------------------------------------- helpers
def _check_charges(charges: Any) -> dict[str, float] | None:
    if charges is None:
        return None
    if not isinstance(charges, Mapping):
        raise TypeError("charges must be a dict {species: charge} or None (initial charges), "
                        f"got {type(charges).__name__}")
    out: dict[str, float] = {}
    for key, val in charges.items():
        if isinstance(key, numbers.Integral) and not isinstance(key, bool):
            if not 0 < int(key) < len(chemical_symbols):
                raise ValueError(f"charges: {key} is not an atomic number")
            sym = chemical_symbols[int(key)]
        elif isinstance(key, str) and key in atomic_numbers and key != "X":
            sym = key
        else:
            raise ValueError(f"charges: {key!r} is not a chemical symbol or atomic number")
        if isinstance(val, bool) or not isinstance(val, numbers.Real):
            raise TypeError(f"charges[{key!r}] must be a number, got {type(val).__name__}")
        if not math.isfinite(float(val)):
            raise ValueError(f"charges[{key!r}] is not finite: {val!r}")
        if sym in out:
            raise ValueError(f"charges: species {sym} given twice")
        out[sym] = float(val)
    return out


def _check_cell(cell: np.ndarray) -> float:
    """Volume (Å³) of a periodic cell; ValueError for a missing, flat or non-finite cell."""
    if not np.all(np.isfinite(cell)):
        raise ValueError("cell is not finite (NaN or inf)")
    volume = abs(float(np.linalg.det(cell)))
    lengths = np.linalg.norm(cell, axis=1)
    if volume < 1e-6 or volume < 1e-10 * float(np.prod(lengths)):
        raise ValueError(f"zero-volume cell (V = {volume:.3g} Å³) in a periodic system: set the "
                         "cell, or pbc=False for a molecule")
    return volume


# Work estimates in the units of kmlip._threads.threads_for (200,000 ~ 1 ms on one thread),
# measured: ~14 ns per real-space pair, ~1.25 ns per atom and k vector (structure factor and
# forces), ~5 ns per pair of the direct sum.
_PAIR_WORK = 2.8
_KVEC_WORK = 0.25
_DIRECT_WORK = 1.0

# Largest stencil of bin offsets or box of (h, k, l) indices set up (a too small or too large
# explicit alpha would otherwise exhaust memory).
_MAX_TABLE = 2e7

#: Bins per cutoff along each cell direction (tuned, 2 vs 3: smaller bins waste fewer distance
#: tests on the stencil corners, larger ones share each gather of a bin's stencil among more
#: centre atoms; 2 measured 4-7% faster on 1,000-8,000 ions, 4 is 20-30% slower).
_BINS_PER_CUTOFF = 2


def _bins(cell: np.ndarray, volume: float, rc: float, n_atoms: int) -> dict[str, Any]:
    """Linked-cell grid and the stencil of bin offsets that can hold a pair closer than rc."""
    # distance between the lattice planes normal to each reciprocal vector: 1/|row a of cell^-T|
    spacing = 1.0 / np.sqrt((np.linalg.inv(cell) ** 2).sum(axis=0))
    nbin = np.maximum(1, np.floor(spacing * _BINS_PER_CUTOFF / rc)).astype(np.intp)
    # keep the bin count O(n) (an explicit, large alpha makes rc small)
    while np.prod(nbin) > 2 * n_atoms + 27:
        nbin = np.maximum(1, nbin // 2)
    width = spacing / nbin
    reach = np.ceil(rc / width - 1e-12).astype(np.intp)
    if float(np.prod(2.0 * reach + 1)) > _MAX_TABLE:
        raise ValueError(f"the real-space cutoff {rc:.3g} Å spans too many periodic images of "
                         "this cell: alpha is too small for it (use a larger alpha, or "
                         "alpha=None to choose it automatically)")
    axes = [np.arange(-r, r + 1) for r in reach]
    d = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    # Lower bound of the distance between points of two bins d apart: their difference lies in
    # the box {sum_a (d_a + t_a) h_a, |t_a| <= 1}, h_a = cell_a / nbin_a. Bound it by the slabs
    # normal to each face and by the support of the box along the centre direction.
    h = cell / nbin[:, None]
    centre = d @ h
    slab = ((np.abs(d) - 1).clip(min=0) * width).max(axis=1)
    dist = np.linalg.norm(centre, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        u = centre / dist[:, None]
    support = np.abs(u @ h.T).sum(axis=1)
    along = np.where(dist > 0, dist - support, 0.0)
    keep = np.maximum(slab, along) < rc
    # half stencil (each pair is met from one end): (0, 0, 0) first, then of each pair of
    # opposite offsets the one that is positive in lexicographic order
    zero = np.all(d == 0, axis=1)
    positive = (d[:, 0] > 0) | ((d[:, 0] == 0) & (d[:, 1] > 0)) | \
        ((d[:, 0] == 0) & (d[:, 1] == 0) & (d[:, 2] > 0))
    half = np.concatenate([d[zero], d[keep & positive]])
    return {"n": nbin, "stencil": np.ascontiguousarray(half, dtype=np.int64)}


def _kvectors(cell: np.ndarray, recip: np.ndarray, kc: float, alpha: float) -> dict[str, Any]:
    """Half-space reciprocal vectors 0 < |k| < kc in rows (h, k) of consecutive l, with their
    weights w = exp(-k²/4α²)/k² and strain factors c = 2(1/k² + 1/4α²)."""
    nmax = np.floor(kc * np.linalg.norm(cell, axis=1) / (2.0 * np.pi)).astype(np.intp)
    n1, n2, n3 = (int(v) for v in nmax)
    if (n1 + 1.0) * (2.0 * n2 + 1) * (2.0 * n3 + 1) > _MAX_TABLE:
        raise ValueError(f"the reciprocal cutoff {kc:.3g} 1/Å needs too many k vectors for this "
                         "cell: alpha is too large for it (use a smaller alpha, or alpha=None "
                         "to choose it automatically)")
    hh, kk, ll = np.meshgrid(np.arange(0, n1 + 1), np.arange(-n2, n2 + 1),
                             np.arange(-n3, n3 + 1), indexing="ij")
    hh, kk, ll = hh.ravel(), kk.ravel(), ll.ravel()
    half = (hh > 0) | ((hh == 0) & (kk > 0)) | ((hh == 0) & (kk == 0) & (ll > 0))
    kvec = np.stack([hh, kk, ll], axis=1) @ recip
    k2 = np.einsum("ij,ij->i", kvec, kvec)
    sel = half & (k2 < kc * kc)
    hk = (hh[sel] * (2 * n2 + 1) + (kk[sel] + n2)).astype(np.intp)
    lsel = ll[sel]
    uniq, first = np.unique(hk, return_index=True)
    lo = np.minimum.reduceat(lsel, first) if first.size else first
    hi = np.maximum.reduceat(lsel, first) if first.size else first
    # a row is a whole interval of l (the sphere cuts a line in one segment); take [lo, hi]
    # so that the loops can run over contiguous memory
    count = hi - lo + 1
    offset = np.concatenate([[0], np.cumsum(count)[:-1]]) if count.size else count
    rows = np.stack([uniq // (2 * n2 + 1), uniq % (2 * n2 + 1) - n2, lo, count, offset],
                    axis=1).astype(np.int64)
    total = int(count.sum())
    hkl = np.empty((total, 3), dtype=np.intp)
    for col, vals in enumerate((rows[:, 0], rows[:, 1])):
        hkl[:, col] = np.repeat(vals, count)
    hkl[:, 2] = np.repeat(lo - offset, count) + np.arange(total)
    k = hkl.astype(np.float64) @ recip
    k2 = np.einsum("ij,ij->i", k, k)
    inv4a2 = 0.25 / (alpha * alpha)
    w = np.exp(-k2 * inv4a2) / k2          # E_recip = (4π/V) Σ_half w |S|²
    c = 2.0 * (1.0 / k2 + inv4a2)          # strain factor: dw/dε_ab = w c k_a k_b
    return {"rows": np.ascontiguousarray(rows), "n": (n1, n2, n3), "k": k, "w": w, "c": c}
