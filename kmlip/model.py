"""Sparse Gaussian-process interatomic potential (GAP-style), as a scikit-learn estimator.

Model
-----
``E = sum_i eps_i + sum_i e0(Z_i) + E_baseline``, ``eps_i = sum_m alpha_m k(p_i, s_m)`` over the
sparse environments ``s_m`` of the centre species of atom i, with the normalised dot-product
kernel ``k = delta^2 (p_hat . s_hat)^zeta`` (:mod:`kmlip.kernels`). Trained on total energies,
force components and virials (force matching) by the projected-process / DTC solve of
:mod:`kmlip.gp.sparse`.

Labels
------
Read from each ``ase.Atoms`` (``info``/``arrays`` first, then the cached results of
``atoms.calc``, e.g. a ``SinglePointCalculator`` or what ``ase.io.read`` of an extxyz attaches;
no calculation is ever triggered):

* energy: ``atoms.info[energy_key]`` or ``atoms.calc.results[energy_key]`` (eV); required when
  ``sigma_energy`` is not None.
* forces: ``atoms.arrays[forces_key]`` or ``calc.results[forces_key]``, shape (n_atoms, 3)
  (eV/Å); required when ``sigma_force`` is not None.
* stress: ``atoms.info[stress_key]`` (3x3, 9 or Voigt 6) or ``calc.results[stress_key]``
  (eV/Å³, ASE sign); used when ``sigma_stress`` is not None, required then for frames periodic in
  all three directions (others contribute no virial). The virial label is ``V * stress``
  (= dE/d strain), 6 Voigt components.

Noise (GAP's convention, sigma per atom for extensive labels): a total energy has
``sigma_energy * sqrt(n_atoms)``, a force component ``sigma_force``, a virial component
``sigma_stress * sqrt(n_atoms)``. Per-structure overrides, as GAP, are *absolute*:
``atoms.info['energy_sigma']`` (eV, total energy), ``atoms.info['force_sigma']`` (eV/Å),
``atoms.arrays['force_atom_sigma']`` (eV/Å per atom), ``atoms.info['virial_sigma']`` (eV per
virial component). Overridden labels are kept in separate classes whose noise is not rescaled by
hyperparameter optimisation.

Memory
------
Training streams structures one at a time through the descriptor (features and pair gradients of
one structure live at once), the kernel-row contraction and a per-class streaming QR of
``block_size`` rows; peak memory is about
``8 * [(n_classes + 2) (M+1)^2 + (block_size + M) (M+1) + n_env F]`` bytes plus one structure's
pair gradients (n_entries × 3 × F doubles). ``n_env F`` (all environments' features, for the
choice of sparse points) is the only part that grows with the data set. Measured: 250 cells of
64 fcc Cu atoms with forces and virials, SOAP (n_max 8, l_max 6, F = 252), M = 2,000: peak RSS
1.06 GB (0.9 GB above the process's baseline); 1,000 such cells add only their features
(~100 MB).

Online updates
--------------
:meth:`KernelPotential.partial_fit` adds labelled frames as new rows of the stored per-class QR
factors (``factors_``) and re-solves, with sparse points, e0 and hyperparameters unchanged —
identical to a fit on all frames with the same sparse points. Adding sparse points (columns)
needs the kernel rows of the old labels against the new points, i.e. another pass over the
training descriptors; it is not implemented yet (refit with ``sparse_method={symbol: points}``).
"""
from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers, chemical_symbols
from sklearn.base import BaseEstimator

from kmlip import kernels
from kmlip.gp import selection
from kmlip.gp.sparse import (
    FREE_CLASSES,
    StreamingQR,
    cholesky_jitter,
    optimize_hyperparameters,
    predictive_variance,
    solve_stack,
)

_SIGMA_OF_CLASS = {"energy": "sigma_energy", "forces": "sigma_force", "virial": "sigma_stress"}


def _copy_component(obj):
    """Independent copy of a descriptor or baseline: via its dict form when it has one."""
    if obj is None:
        return None
    if hasattr(obj, "to_dict") and hasattr(type(obj), "from_dict"):
        try:
            return type(obj).from_dict(obj.to_dict())
        except Exception:  # noqa: BLE001 - fall back to a plain deep copy
            pass
    return copy.deepcopy(obj)


def _as_frames(X, what: str = "frames") -> list[Atoms]:
    if isinstance(X, Atoms):
        return [X]
    if isinstance(X, (str, bytes)) or not isinstance(X, (Sequence, np.ndarray)) \
            and not hasattr(X, "__iter__"):
        raise TypeError(f"{what} must be an ase.Atoms or a list of ase.Atoms, "
                        f"got {type(X).__name__}")
    frames = list(X)
    if not frames:
        raise ValueError(f"{what} is empty")
    for k, a in enumerate(frames):
        if not isinstance(a, Atoms):
            raise TypeError(f"{what}[{k}] is a {type(a).__name__}, not an ase.Atoms")
    return frames


def _is_periodic(atoms: Atoms) -> bool:
    return bool(np.all(atoms.pbc))


def _voigt(stress, where: str) -> np.ndarray:
    s = np.asarray(stress, dtype=np.float64)
    if s.shape == (6,):
        return s.copy()
    if s.shape in ((3, 3), (9,)):
        s = s.reshape(3, 3)
        return np.array([s[0, 0], s[1, 1], s[2, 2], 0.5 * (s[1, 2] + s[2, 1]),
                         0.5 * (s[0, 2] + s[2, 0]), 0.5 * (s[0, 1] + s[1, 0])])
    raise ValueError(f"{where}: stress must have shape (6,), (3, 3) or (9,), got {s.shape}")


def _positive(value, where: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where} must be a positive number, got {value!r}") from exc
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{where} must be a positive finite number, got {value!r}")
    return v


class KernelPotential(BaseEstimator):
    """Sparse GP potential: SOAP-like descriptor + normalised dot-product kernel, as GAP.

    Parameters
    ----------
    descriptor : Descriptor
        Anything following :class:`kmlip.descriptors.base.Descriptor` (e.g. ``SOAP(...)``).
    zeta : int
        Kernel exponent ζ (>= 1).
    delta : float
        Kernel scale δ in eV (prior std of a local energy).
    n_sparse : int or dict
        Sparse environments per species of the centre atom (an int for every species, or
        ``{symbol: int}``), capped at the number of training environments of that species.
    sparse_method : str, array or dict
        ``"cur"`` (leverage scores), ``"fps"`` (farthest point) or ``"random"`` (see
        :mod:`kmlip.gp.selection`); a 1-D int array of global environment indices (atoms of all
        training frames concatenated in order); or ``{symbol: indices or (M_z, F) features}``.
    sigma_energy : float or None
        Energy noise in eV per atom (a total energy has ``sigma_energy * sqrt(n_atoms)``);
        None: energies are not used as labels.
    sigma_force : float or None
        Force noise per component, eV/Å; None: forces are not used.
    sigma_stress : float or None
        Virial noise in eV per atom (per Voigt component ``sigma_stress * sqrt(n_atoms)``);
        None: stresses are not used.
    energy_key, forces_key, stress_key : str
        Where labels are read (see the module docstring).
    e0 : dict or None
        Isolated-atom energies ``{symbol: eV}``; None fits them by least squares on the training
        energies (minus baseline) against species counts, weighted by the energy noise of each
        structure (0 when energies are not used).
    baseline : object or None
        ``compute(atoms) -> (E, F (n, 3), stress (6,) or None)`` with ``to_dict`` / ``from_dict``
        (e.g. :class:`kmlip.ewald.Ewald`); the GP learns the difference and predictions add it.
    jitter : float
        Added to the diagonal of the unit K_MM (raised with a warning if that is not enough).
    block_size : int or None
        Label rows per streaming-QR update; None: ``clip(8 M, 4096, 256 MB / (8 (M+1)))``.
    n_threads : int or None
        OpenMP and BLAS threads; None follows OMP_NUM_THREADS.
    random_state : int, numpy Generator or None
        Seed of the sparse-point choice (the only random step).
    verbose : int
        0 silent; 1 prints a summary of each fit phase.
    progress : bool or None
        tqdm progress bar over the training structures; None shows it when stderr is a terminal
        and there are at least 50 structures.
    precision : {"auto", "double", "mixed"}
        Arithmetic of the training GEMM (pair gradients × sparse points, the dominant cost).
        "mixed" runs it in float32 on sparse points centred on their mean direction, with all
        accumulations, the QR and the solve in double (about 1.3-1.6× faster fits; on 200 fcc
        Cu cells test errors agreed with "double" to 3 digits). "auto" takes "mixed" for a
        species whose sparse points are tightly clustered (within
        :data:`kmlip.kernels.MIXED_MAX_SPREAD` of their mean direction, e.g. a crystal and
        its MD) and "double" otherwise (e.g. random alloys, molecules). Predictions are always
        double.

    Attributes
    ----------
    species_ : list of str
        Species the model can predict (with sparse points or an e0).
    e0_ : dict
        ``{symbol: eV}`` used.
    alpha_ : ndarray, shape (M,)
        Weights (eV per unit kernel, i.e. ``eps_i = sum_m alpha_m delta^2 k_hat(p_i, s_m)``).
    sparse_points_ : dict
        ``{symbol: (M_z, F) raw descriptor vectors}``.
    sparse_indices_ : dict or None
        ``{symbol: (M_z, 2) int (frame, atom)}`` of sparse points taken from the training set.
    delta_, sigma_energy_, sigma_force_, sigma_stress_ : float
        Hyperparameters of the solution (optimised ones when ``fit(..., optimize=True)``).
    log_marginal_likelihood_ : float
        Log marginal likelihood of the training labels at these hyperparameters.
    n_labels_ : dict
        Number of labels per class.
    fit_timings_ : dict
        Wall seconds per fit phase.
    """

    def __init__(self, descriptor=None, zeta: int = 4, delta: float = 0.2,
                 n_sparse: int | Mapping[str, int] = 1000, sparse_method="cur",
                 sigma_energy: float | None = 0.002, sigma_force: float | None = 0.02,
                 sigma_stress: float | None = None, energy_key: str = "energy",
                 forces_key: str = "forces", stress_key: str = "stress",
                 e0: Mapping[str, float] | None = None, baseline=None, jitter: float = 1e-8,
                 block_size: int | None = None, n_threads: int | None = None,
                 random_state=None, verbose: int = 0, progress: bool | None = None,
                 precision: str = "auto"):
        self.descriptor = descriptor
        self.zeta = zeta
        self.delta = delta
        self.n_sparse = n_sparse
        self.sparse_method = sparse_method
        self.sigma_energy = sigma_energy
        self.sigma_force = sigma_force
        self.sigma_stress = sigma_stress
        self.energy_key = energy_key
        self.forces_key = forces_key
        self.stress_key = stress_key
        self.e0 = e0
        self.baseline = baseline
        self.jitter = jitter
        self.block_size = block_size
        self.n_threads = n_threads
        self.random_state = random_state
        self.verbose = verbose
        self.progress = progress
        self.precision = precision

    # -- scikit-learn plumbing -------------------------------------------------------------------
    def __sklearn_clone__(self):
        # Descriptors normalise their arguments (lists, floats), which breaks sklearn's identity
        # check of cloned parameters; copy them through their dict form instead.
        params = {}
        for k, v in self.get_params(deep=False).items():
            params[k] = _copy_component(v) if k in ("descriptor", "baseline") \
                else copy.deepcopy(v)
        return type(self)(**params)

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "alpha_")

    def _check_fitted(self):
        if not hasattr(self, "alpha_"):
            raise RuntimeError("this KernelPotential is not fitted yet; call fit(frames) first")

    # -- validation ------------------------------------------------------------------------------
    def _validated_params(self) -> dict[str, Any]:
        d = self.descriptor
        if d is None or not hasattr(d, "transform") or not hasattr(d, "species_z"):
            raise TypeError("descriptor must be a kmlip descriptor (e.g. SOAP(...)), got "
                            f"{type(d).__name__}")
        if isinstance(self.zeta, bool) or not isinstance(self.zeta, (int, np.integer)) \
                or self.zeta < 1:
            raise ValueError(f"zeta must be an integer >= 1, got {self.zeta!r}")
        p = {"delta": _positive(self.delta, "delta"),
             "jitter": float(self.jitter)}
        if not (math.isfinite(p["jitter"]) and p["jitter"] >= 0):
            raise ValueError(f"jitter must be >= 0, got {self.jitter!r}")
        for name in ("sigma_energy", "sigma_force", "sigma_stress"):
            v = getattr(self, name)
            p[name] = None if v is None else _positive(v, name)
        if p["sigma_energy"] is None and p["sigma_force"] is None:
            raise ValueError("at least one of sigma_energy and sigma_force must be set")
        for name in ("energy_key", "forces_key", "stress_key"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a str")
        if self.block_size is not None and (isinstance(self.block_size, bool)
                                            or int(self.block_size) < 1):
            raise ValueError(f"block_size must be a positive int or None, got {self.block_size}")
        if self.precision not in ("auto", "double", "mixed"):
            raise ValueError("precision must be 'auto', 'double' or 'mixed', got "
                             f"{self.precision!r}")
        if self.baseline is not None and not hasattr(self.baseline, "compute"):
            raise TypeError("baseline must have compute(atoms) -> (energy, forces, stress)")
        return p

    def _species_symbols(self) -> list[str]:
        return [chemical_symbols[z] for z in self.descriptor.species_z]

    # -- labels ------------------------------------------------------------------------------------
    def _labels(self, atoms: Atoms, k: int, p: dict) -> dict[str, Any]:
        """Labels and noise overrides of frame k; raises ValueError naming frame and key."""
        # Cached calculator results only: reading labels must never trigger a calculation.
        results = (getattr(atoms.calc, "results", None) or {}) if atoms.calc is not None else {}
        n = len(atoms)
        out: dict[str, Any] = {"energy": None, "forces": None, "stress": None}

        def fetch(container, key):
            return container[key] if key in container else results.get(key)

        if p["sigma_energy"] is not None:
            e = fetch(atoms.info, self.energy_key)
            if e is None:
                raise ValueError(f"frame {k}: no energy label {self.energy_key!r} "
                                 "(atoms.info or calculator results)")
            try:
                e = float(np.asarray(e).reshape(()))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"frame {k}: energy {self.energy_key!r} is not a number") \
                    from exc
            if not math.isfinite(e):
                raise ValueError(f"frame {k}: energy {self.energy_key!r} is NaN or inf")
            out["energy"] = e
        if p["sigma_force"] is not None:
            f = fetch(atoms.arrays, self.forces_key)
            if f is None:
                raise ValueError(f"frame {k}: no forces label {self.forces_key!r} "
                                 "(atoms.arrays or calculator results)")
            f = np.asarray(f, dtype=np.float64)
            if f.shape != (n, 3):
                raise ValueError(f"frame {k}: forces {self.forces_key!r} have shape {f.shape}, "
                                 f"expected ({n}, 3)")
            if not np.all(np.isfinite(f)):
                raise ValueError(f"frame {k}: forces {self.forces_key!r} contain NaN or inf")
            out["forces"] = f
        if p["sigma_stress"] is not None and _is_periodic(atoms):
            s = fetch(atoms.info, self.stress_key)
            if s is None:
                raise ValueError(f"frame {k}: no stress label {self.stress_key!r} for a "
                                 "periodic structure (sigma_stress is set)")
            s = _voigt(s, f"frame {k}")
            if not np.all(np.isfinite(s)):
                raise ValueError(f"frame {k}: stress {self.stress_key!r} contains NaN or inf")
            out["stress"] = s
        for key in ("energy_sigma", "force_sigma", "virial_sigma"):
            if atoms.info.get(key) is not None:
                out[key] = _positive(atoms.info[key], f"frame {k}: info[{key!r}]")
        if "force_atom_sigma" in atoms.arrays:
            fa = np.asarray(atoms.arrays["force_atom_sigma"], dtype=np.float64).reshape(-1)
            if fa.shape != (n,) or not np.all(np.isfinite(fa)) or np.any(fa <= 0):
                raise ValueError(f"frame {k}: arrays['force_atom_sigma'] must be {n} positive "
                                 "numbers")
            out["force_atom_sigma"] = fa
        return out

    def _check_species(self, atoms: Atoms, known: set[int], k: int | None, what: str):
        bad = sorted(set(int(z) for z in atoms.numbers) - known)
        if bad:
            where = f"frame {k}: " if k is not None else ""
            names = [chemical_symbols[z] for z in bad]
            raise ValueError(f"{where}species {names} unknown to the {what} "
                             f"(knows {sorted(chemical_symbols[z] for z in known)})")

    def _baseline(self, atoms: Atoms):
        if self.baseline_ is None:
            return 0.0, np.zeros((len(atoms), 3)), np.zeros(6)
        E, F, S = self.baseline_.compute(atoms)
        F = np.zeros((len(atoms), 3)) if F is None else np.asarray(F, dtype=np.float64)
        S = np.zeros(6) if S is None else _voigt(S, "baseline stress")
        return float(E), F, S

    # -- fit ---------------------------------------------------------------------------------------
    def fit(self, frames, y=None, optimize: bool = False, optimize_delta: bool = True):
        """Fits the sparse GP to labelled structures.

        Parameters
        ----------
        frames : list of ase.Atoms
            Training structures with labels (see the module docstring).
        y : None
            Ignored (labels live in the frames); present for scikit-learn compatibility.
        optimize : bool
            After the data pass, maximise the log marginal likelihood over δ and the σ's of the
            label classes in use (L-BFGS-B on their logarithms, analytic gradient, O(M³) per
            step, no new data pass); the optimised values are ``delta_``, ``sigma_*_`` and the
            likelihood ``log_marginal_likelihood_`` (constructor arguments stay unchanged).
        optimize_delta : bool
            Include δ in the optimisation.

        Returns
        -------
        self
        """
        t_start = time.perf_counter()
        p = self._validated_params()
        frames = _as_frames(frames)
        from kmlip._threads import resolve_threads

        nt = resolve_threads(self.n_threads)
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=nt, user_api="blas"):
            self._fit(frames, p, nt, optimize, optimize_delta, t_start)
        return self

    def _progress(self, n: int, desc: str):
        show = self.progress
        if show is None:
            show = bool(getattr(sys.stderr, "isatty", lambda: False)()) and n >= 50
        if not show:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=n, desc=desc, unit="frame", leave=False)

    def _log(self, msg: str):
        if self.verbose:
            print(f"[kmlip] {msg}", file=sys.stderr, flush=True)

    def _fit(self, frames, p, nt, optimize, optimize_delta, t_start):
        timings = {}
        desc = self.descriptor
        self.descriptor_ = _copy_component(desc)
        self.baseline_ = _copy_component(self.baseline)
        declared = set(int(z) for z in desc.species_z)
        for k, a in enumerate(frames):
            self._check_species(a, declared, k, "descriptor")
        labels = [self._labels(a, k, p) for k, a in enumerate(frames)]

        # Baseline values and e0.
        t0 = time.perf_counter()
        base = [self._baseline(a) for a in frames]
        symbols = self._species_symbols()
        present = sorted({int(z) for a in frames for z in a.numbers})
        self.e0_ = self._fit_e0(frames, labels, base, present, p)
        timings["baseline_e0"] = time.perf_counter() - t0

        # Pass 1: features only, for the choice of sparse points.
        t0 = time.perf_counter()
        points, sparse_idx = self._choose_sparse(frames, present, nt)
        timings["selection"] = time.perf_counter() - t0
        self.basis_ = kernels.SparseBasis({z: points[z] for z in points}, int(self.zeta),
                                          species_z=desc.species_z)
        M = self.basis_.n_sparse
        self.sparse_points_ = {chemical_symbols[z]: self.basis_.points[z]
                               for z in self.basis_.species_z}
        self.sparse_indices_ = sparse_idx
        self.species_ = [s for s in symbols
                         if s in self.sparse_points_ or s in self.e0_]
        self._log(f"{len(frames)} frames, M = {M} sparse points "
                  f"({', '.join(f'{s}: {len(v)}' for s, v in self.sparse_points_.items())})")

        t0 = time.perf_counter()
        L_hat, jit = cholesky_jitter(self.basis_.kmm(), p["jitter"])
        self.L_hat_, self.jitter_ = L_hat, jit

        # Pass 2: kernel rows of every label, streamed through the QR.
        qr = StreamingQR(M, self._block_rows(M))
        bar = self._progress(len(frames), "kmlip fit")
        t_rows = 0.0
        for k, a in enumerate(frames):
            t1 = time.perf_counter()
            rows = self._frame_rows(a, labels[k], base[k], p, nt)
            t_rows += time.perf_counter() - t1
            for cls, K_rows, yv, sc in rows:
                qr.add(cls, K_rows, yv, sc)
            if bar is not None:
                bar.update(1)
        self.factors_ = qr.finalize()
        self.basis_.release_scratch()
        if bar is not None:
            bar.close()
        timings["kernel_rows"] = t_rows
        timings["qr"] = time.perf_counter() - t0 - t_rows
        self.n_labels_ = {c: f.n_rows for c, f in self.factors_.items()}
        if sum(self.n_labels_.values()) == 0:
            raise ValueError("no labels to fit")

        # Solve (optionally optimising hyperparameters).
        t0 = time.perf_counter()
        self.delta_ = p["delta"]
        self.sigma_energy_ = p["sigma_energy"]
        self.sigma_force_ = p["sigma_force"]
        self.sigma_stress_ = p["sigma_stress"]
        self.optimization_ = None
        if optimize:
            d, s, res = optimize_hyperparameters(
                self.factors_, self.L_hat_, self.delta_, self._free_sigmas(),
                optimize_delta=optimize_delta)
            self.delta_ = d
            for cls, v in s.items():
                setattr(self, _SIGMA_OF_CLASS[cls] + "_", v)
            self.optimization_ = {"success": bool(res.success), "message": str(res.message),
                                  "n_iterations": int(res.nit)}
            self._log(f"optimised: delta={d:.4g} " + " ".join(
                f"{_SIGMA_OF_CLASS[c]}={v:.4g}" for c, v in s.items()))
        self._solve()
        timings["solve"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        self.fit_timings_ = timings
        self._log("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items())
                  + f"; log marginal likelihood {self.log_marginal_likelihood_:.6g}")

    def _free_sigmas(self) -> dict[str, float]:
        out = {}
        for cls in FREE_CLASSES:
            f = self.factors_.get(cls)
            if f is not None and f.n_rows > 0:
                out[cls] = getattr(self, _SIGMA_OF_CLASS[cls] + "_")
        return out

    def _solve(self):
        sol = solve_stack(self.factors_, self.L_hat_, self.delta_, self._free_sigmas())
        self.alpha_ = sol.alpha
        self.R_ = sol.R
        self.log_marginal_likelihood_ = sol.log_marginal_likelihood

    def _block_rows(self, M: int) -> int:
        if self.block_size is not None:
            return int(self.block_size)
        cap = max(1024, (256 << 20) // (8 * (M + 1)))
        return int(min(max(8 * M, 4096), cap))

    def _fit_e0(self, frames, labels, base, present, p) -> dict[str, float]:
        if self.e0 is not None:
            if not isinstance(self.e0, Mapping):
                raise TypeError("e0 must be a dict {symbol: eV} or None")
            e0 = {}
            for s, v in self.e0.items():
                z = atomic_numbers.get(s) if isinstance(s, str) else None
                if z is None:
                    raise ValueError(f"e0 key {s!r} is not a chemical symbol")
                try:
                    e0[s] = float(v)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"e0[{s!r}] is not a number") from exc
                if not math.isfinite(e0[s]):
                    raise ValueError(f"e0[{s!r}] is not finite")
            missing = [chemical_symbols[z] for z in present if chemical_symbols[z] not in e0]
            if missing:
                raise ValueError(f"e0 has no value for species {missing} of the training set")
            return e0
        if p["sigma_energy"] is None:
            return {chemical_symbols[z]: 0.0 for z in present}
        C = np.array([[np.count_nonzero(a.numbers == z) for z in present] for a in frames],
                     dtype=np.float64)
        y = np.array([lab["energy"] - b[0] for lab, b in zip(labels, base, strict=True)])
        # Weighted by the energy noise of each structure, so that per-structure overrides
        # (e.g. a huge energy_sigma for an unreliable energy) act on e0 as on the GP.
        sig = np.array([lab.get("energy_sigma", p["sigma_energy"] * math.sqrt(len(a)))
                        for lab, a in zip(labels, frames, strict=True)])
        coef = np.linalg.lstsq(C / sig[:, None], y / sig, rcond=None)[0]
        return {chemical_symbols[z]: float(c) for z, c in zip(present, coef, strict=True)}

    def _n_sparse_for(self, symbol: str) -> int:
        ns = self.n_sparse
        if isinstance(ns, Mapping):
            v = ns.get(symbol, 0)
        else:
            v = ns
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"n_sparse must be a non-negative int or a dict of them, got {v!r}")
        return int(v)

    def _choose_sparse(self, frames, present, nt):
        """Sparse points per species: (points {Z: (M_z, F)}, indices {symbol: (M_z, 2)})."""
        method = self.sparse_method
        F = self.descriptor.n_features
        if isinstance(method, Mapping):
            explicit = {}
            for s, v in method.items():
                if s not in atomic_numbers:
                    raise ValueError(f"sparse_method key {s!r} is not a chemical symbol")
                arr = np.asarray(v)
                if arr.ndim == 2 and np.issubdtype(arr.dtype, np.floating):
                    if arr.shape[1] != F:
                        raise ValueError(f"sparse points of {s} have {arr.shape[1]} features, "
                                         f"the descriptor {F}")
                    explicit[atomic_numbers[s]] = arr.astype(np.float64)
            if len(explicit) == len(method):
                return explicit, None
        rng = np.random.default_rng(self.random_state) \
            if not isinstance(self.random_state, np.random.Generator) else self.random_state
        # Features of every environment, grouped by centre species, with (frame, atom) ids.
        feats: dict[int, list] = {z: [] for z in present}
        ids: dict[int, list] = {z: [] for z in present}
        for k, a in enumerate(frames):
            X = self.descriptor.transform(a, gradients=False, n_threads=nt)
            for z in present:
                rows = np.flatnonzero(a.numbers == z)
                if rows.size:
                    feats[z].append(X[rows])
                    ids[z].append(np.stack([np.full(rows.size, k), rows], axis=1))
        env = {z: np.concatenate(feats[z]) for z in present if feats[z]}
        env_ids = {z: np.concatenate(ids[z]) for z in present if ids[z]}
        points, chosen = {}, {}
        if isinstance(method, str):
            for z in present:
                m = min(self._n_sparse_for(chemical_symbols[z]), env[z].shape[0])
                sel = selection.select(env[z], m, method, rng)
                points[z] = env[z][sel]
                chosen[chemical_symbols[z]] = env_ids[z][sel]
            return points, chosen
        if isinstance(method, Mapping):
            for s, v in method.items():
                z = atomic_numbers[s]
                arr = np.asarray(v)
                if arr.ndim == 2 and np.issubdtype(arr.dtype, np.floating):
                    points[z] = arr.astype(np.float64)
                    continue
                idx = self._index_array(arr, f"sparse_method[{s!r}]")
                if z not in env:
                    raise ValueError(f"sparse_method[{s!r}]: no {s} environments in training")
                if idx.size and (idx.min() < 0 or idx.max() >= env[z].shape[0]):
                    raise ValueError(f"sparse_method[{s!r}]: index out of range "
                                     f"(0..{env[z].shape[0] - 1})")
                points[z] = env[z][idx]
                chosen[s] = env_ids[z][idx]
            return points, chosen
        idx = self._index_array(np.asarray(method), "sparse_method")
        n_total = sum(len(a) for a in frames)
        if idx.size and (idx.min() < 0 or idx.max() >= n_total):
            raise ValueError(f"sparse_method: global environment index out of range "
                             f"(0..{n_total - 1})")
        starts = np.cumsum([0] + [len(a) for a in frames])
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

    @staticmethod
    def _index_array(arr: np.ndarray, where: str) -> np.ndarray:
        if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
            raise TypeError(f"{where} must be 'cur', 'fps', 'random', a 1-D int array or a "
                            "dict of index arrays / feature arrays")
        if np.unique(arr).size != arr.size:
            raise ValueError(f"{where} has duplicate indices")
        return arr.astype(np.int64)

    def _frame_rows(self, atoms: Atoms, lab: dict, base, p: dict, nt: int):
        """(class, unit kernel rows, targets, relative noise) of every label of one frame."""
        n = len(atoms)
        Z = np.asarray(atoms.numbers, dtype=np.int64)
        need_grad = lab["forces"] is not None or lab["stress"] is not None
        if need_grad:
            X, G = self.descriptor_.transform(atoms, gradients=True, n_threads=nt)
        else:
            X = self.descriptor_.transform(atoms, gradients=False, n_threads=nt)
        out = []
        E_b, F_b, S_b = base
        if lab["energy"] is not None:
            e0 = sum(self.e0_[chemical_symbols[z]] for z in Z)
            y = np.array([lab["energy"] - e0 - E_b])
            row = self.basis_.energy_row(X, Z)[None, :]
            if "energy_sigma" in lab:
                out.append(("energy_fixed", row, y, np.array([lab["energy_sigma"]])))
            else:
                out.append(("energy", row, y, np.array([math.sqrt(n)])))
        if need_grad:
            Fr, W9 = self.basis_.derivative_rows(X, Z, G, n_threads=nt,
                                                 precision=self.precision)
            if lab["forces"] is not None:
                y = (lab["forces"] - F_b).reshape(-1)
                if "force_atom_sigma" in lab:
                    out.append(("forces_fixed", Fr, y, np.repeat(lab["force_atom_sigma"], 3)))
                elif "force_sigma" in lab:
                    out.append(("forces_fixed", Fr, y, np.full(3 * n, lab["force_sigma"])))
                else:
                    out.append(("forces", Fr, y, np.ones(3 * n)))
            if lab["stress"] is not None:
                V = atoms.get_volume()
                y = V * (lab["stress"] - S_b)
                rows = kernels.virial_voigt(W9)
                if "virial_sigma" in lab:
                    out.append(("virial_fixed", rows, y, np.full(6, lab["virial_sigma"])))
                else:
                    out.append(("virial", rows, y, np.full(6, math.sqrt(n))))
        return out

    # -- hyperparameters without a data pass ------------------------------------------------
    def log_marginal_likelihood(self, delta: float | None = None,
                                sigma_energy: float | None = None,
                                sigma_force: float | None = None,
                                sigma_stress: float | None = None,
                                eval_gradient: bool = False):
        """Log marginal likelihood of the training labels at other hyperparameters, O(M³).

        Unset arguments take the fitted values. With ``eval_gradient`` also returns
        ``{name: d log p / d log value}`` for "delta" and the classes in use.
        """
        self._check_fitted()
        sig = self._free_sigmas()
        given = {"energy": sigma_energy, "forces": sigma_force, "virial": sigma_stress}
        for c in sig:
            if given[c] is not None:
                sig[c] = _positive(given[c], _SIGMA_OF_CLASS[c])
        d = self.delta_ if delta is None else _positive(delta, "delta")
        sol = solve_stack(self.factors_, self.L_hat_, d, sig, gradient=eval_gradient)
        if eval_gradient:
            return sol.log_marginal_likelihood, sol.gradient
        return sol.log_marginal_likelihood

    def update_hyperparameters(self, delta: float | None = None,
                               sigma_energy: float | None = None,
                               sigma_force: float | None = None,
                               sigma_stress: float | None = None):
        """Re-solves for new δ / σ's from the stored factors (no data pass). Returns self."""
        self._check_fitted()
        if delta is not None:
            self.delta_ = _positive(delta, "delta")
        for name, v in (("sigma_energy", sigma_energy), ("sigma_force", sigma_force),
                        ("sigma_stress", sigma_stress)):
            if v is not None:
                setattr(self, name + "_", _positive(v, name))
        self._solve()
        return self

    def optimize_hyperparameters(self, optimize_delta: bool = True):
        """Maximises the log marginal likelihood from the stored factors and re-solves.

        Returns
        -------
        dict
            The optimised ``delta`` and σ's and ``log_marginal_likelihood``.
        """
        self._check_fitted()
        d, s, res = optimize_hyperparameters(self.factors_, self.L_hat_, self.delta_,
                                             self._free_sigmas(), optimize_delta=optimize_delta)
        self.delta_ = d
        for cls, v in s.items():
            setattr(self, _SIGMA_OF_CLASS[cls] + "_", v)
        self.optimization_ = {"success": bool(res.success), "message": str(res.message),
                              "n_iterations": int(res.nit)}
        self._solve()
        return self.hyperparameters_

    @property
    def hyperparameters_(self) -> dict[str, Any]:
        """Fitted hyperparameters and the log marginal likelihood."""
        self._check_fitted()
        return {"delta": self.delta_, "sigma_energy": self.sigma_energy_,
                "sigma_force": self.sigma_force_, "sigma_stress": self.sigma_stress_,
                "log_marginal_likelihood": self.log_marginal_likelihood_}

    def partial_fit(self, frames, y=None):
        """Adds labelled frames to a fitted model (new QR rows; sparse points, e0 and
        hyperparameters unchanged) and re-solves. Fits from scratch when not fitted."""
        if not hasattr(self, "alpha_"):
            return self.fit(frames)
        p = self._validated_params()
        p.update(sigma_energy=self.sigma_energy, sigma_force=self.sigma_force,
                 sigma_stress=self.sigma_stress)
        frames = _as_frames(frames)
        from kmlip._threads import resolve_threads

        nt = resolve_threads(self.n_threads)
        known = {atomic_numbers[s] for s in self.species_}
        for k, a in enumerate(frames):
            self._check_species(a, known, k, "model")
        labels = [self._labels(a, k, p) for k, a in enumerate(frames)]
        M = self.basis_.n_sparse
        qr = StreamingQR(M, self._block_rows(M))
        qr.factors = {c: copy.deepcopy(f) for c, f in self.factors_.items()}
        for k, a in enumerate(frames):
            for cls, K_rows, yv, sc in self._frame_rows(a, labels[k], self._baseline(a), p, nt):
                qr.add(cls, K_rows, yv, sc)
        self.factors_ = qr.finalize()
        self.basis_.release_scratch()
        self.n_labels_ = {c: f.n_rows for c, f in self.factors_.items()}
        self._solve()
        return self

    # -- prediction --------------------------------------------------------------------------------
    def _evaluate(self, atoms: Atoms, forces: bool = False, stress: bool = False,
                  local_var: bool = False, energy_var: bool = False,
                  forces_var: bool = False) -> dict[str, Any]:
        """Everything about one structure from one descriptor pass (units eV, Å).

        BLAS is limited to the model's thread count meanwhile: idle BLAS threads spin and would
        otherwise burn a core per call.
        """
        from kmlip._threads import blas_limited

        with blas_limited(self.n_threads):
            return self._evaluate_unlimited(atoms, forces=forces, stress=stress,
                                            local_var=local_var, energy_var=energy_var,
                                            forces_var=forces_var)

    def _evaluate_unlimited(self, atoms: Atoms, forces: bool = False, stress: bool = False,
                            local_var: bool = False, energy_var: bool = False,
                            forces_var: bool = False) -> dict[str, Any]:
        self._check_fitted()
        if not isinstance(atoms, Atoms):
            raise TypeError(f"expected an ase.Atoms, got {type(atoms).__name__}")
        self._check_species(atoms, {atomic_numbers[s] for s in self.species_}, None, "model")
        n = len(atoms)
        Z = np.asarray(atoms.numbers, dtype=np.int64)
        stress = stress and _is_periodic(atoms)
        need_grad = forces or stress or forces_var
        nt = self.n_threads
        d2 = self.delta_ ** 2
        basis = self.basis_
        rows = local_var or energy_var
        # Fast path: a descriptor that can back-propagate dE/dX to forces and virial inside its
        # kernel never forms the pair gradients (cost per pair independent of n_features).
        fast = need_grad and not forces_var and hasattr(self.descriptor_, "backprop")
        G = None
        if fast:
            held = {}

            def grad_fn(X):
                held["eval"] = basis.evaluate(X, Z, self.alpha_, grad=True, rows=rows)
                return d2 * held["eval"][1]

            X, _, f_fast, W_fast = self.descriptor_.backprop(atoms, grad_fn, n_threads=nt)
            eps, v, K_loc = held["eval"]
        else:
            if need_grad:
                X, G = self.descriptor_.transform(atoms, gradients=True, n_threads=nt)
            else:
                X = self.descriptor_.transform(atoms, gradients=False, n_threads=nt)
            eps, v, K_loc = basis.evaluate(X, Z, self.alpha_, grad=need_grad, rows=rows)
        out: dict[str, Any] = {}
        e0 = np.array([self.e0_.get(chemical_symbols[z], 0.0) for z in Z])
        eps = d2 * eps
        out["local_energies"] = eps + e0
        E_b, F_b, S_b = self._baseline(atoms) if self.baseline_ is not None else (0.0, None, None)
        out["energy"] = float(np.sum(out["local_energies"])) + E_b
        out["baseline_energy"] = E_b
        if need_grad:
            if fast:
                f, W = f_fast, W_fast
            else:
                f, W = kernels.contract_forces(G, d2 * v, n, n_threads=nt)
            if F_b is not None:
                f = f + F_b
            out["forces"] = f
            if stress:
                s = kernels.virial_voigt(W.reshape(9)) / atoms.get_volume()
                out["stress"] = s + (S_b if S_b is not None else 0.0)
        if local_var or energy_var:
            if local_var:
                Xh, _ = kernels.normalize(X)
                kss = np.einsum("ij,ij->i", Xh, Xh)  # 1, or 0 for an empty environment
                out["local_energies_var"] = predictive_variance(
                    K_loc, kss, self.L_hat_, self.R_, self.delta_, "local energy")
            if energy_var:
                kss = kernels.energy_prior_variance(X, Z, basis.zeta)
                out["energy_var"] = float(predictive_variance(
                    K_loc.sum(0)[None, :], np.array([kss]), self.L_hat_, self.R_,
                    self.delta_, "energy")[0])
        if forces_var:
            Fr, _ = basis.derivative_rows(X, Z, G, n_threads=nt)
            kss = kernels.force_prior_variance(X, Z, G, basis.zeta).reshape(-1)
            out["forces_var"] = predictive_variance(
                Fr, kss, self.L_hat_, self.R_, self.delta_, "force").reshape(n, 3)
        return out

    def predict(self, X, return_std: bool = False):
        """Total energies.

        Parameters
        ----------
        X : ase.Atoms or list of ase.Atoms
        return_std : bool
            Also return the epistemic standard deviation of each total energy (posterior of the
            sparse GP, without the label noise; see :meth:`noise_levels`).

        Returns
        -------
        energies : ndarray, shape (n_frames,)
            eV (a single Atoms gives shape (1,)).
        std : ndarray, shape (n_frames,), only with ``return_std``
            eV.
        """
        frames = _as_frames(X, "X")
        res = [self._evaluate(a, energy_var=return_std) for a in frames]
        E = np.array([r["energy"] for r in res])
        if return_std:
            return E, np.sqrt(np.array([r["energy_var"] for r in res]))
        return E

    def predict_forces(self, X):
        """Forces in eV/Å: (n_atoms, 3) for one Atoms, a list of such arrays for a list."""
        if isinstance(X, Atoms):
            return self._evaluate(X, forces=True)["forces"]
        return [self._evaluate(a, forces=True)["forces"] for a in _as_frames(X, "X")]

    def predict_stress(self, X):
        """Stress in eV/Å³ (Voigt xx yy zz yz xz xy, ASE sign): (6,) for one Atoms,
        (n_frames, 6) for a list; NaN rows for non-periodic structures."""
        def one(a):
            if not _is_periodic(a):
                return np.full(6, np.nan)
            return self._evaluate(a, stress=True)["stress"]

        if isinstance(X, Atoms):
            return one(X)
        return np.array([one(a) for a in _as_frames(X, "X")])

    def predict_local_energies(self, X, return_var: bool = False):
        """Per-atom energies (local GP energy + e0, eV) and optionally their epistemic
        variances (eV²): arrays (n_atoms,) for one Atoms, lists of them for a list."""
        def one(a):
            r = self._evaluate(a, local_var=return_var)
            return (r["local_energies"], r["local_energies_var"]) if return_var \
                else r["local_energies"]

        if isinstance(X, Atoms):
            return one(X)
        return [one(a) for a in _as_frames(X, "X")]

    def predict_forces_variance(self, X):
        """Epistemic variance of every force component (eV²/Å²), (n_atoms, 3) per structure."""
        if isinstance(X, Atoms):
            return self._evaluate(X, forces_var=True)["forces_var"]
        return [self._evaluate(a, forces_var=True)["forces_var"] for a in _as_frames(X, "X")]

    def noise_levels(self, atoms: Atoms) -> dict[str, float | None]:
        """Aleatoric noise variances the model assumes for the labels of ``atoms``:
        ``energy`` (eV², total energy), ``forces`` (eV²/Å², per component), ``stress``
        ((eV/Å³)², per Voigt component; None when not used or not periodic)."""
        self._check_fitted()
        n = len(atoms)
        out: dict[str, float | None] = {"energy": None, "forces": None, "stress": None}
        if self.sigma_energy_ is not None:
            out["energy"] = self.sigma_energy_ ** 2 * n
        if self.sigma_force_ is not None:
            out["forces"] = self.sigma_force_ ** 2
        if self.sigma_stress_ is not None and _is_periodic(atoms):
            out["stress"] = self.sigma_stress_ ** 2 * n / atoms.get_volume() ** 2
        return out

    # -- scoring -----------------------------------------------------------------------------------
    def _reference(self, frames):
        p = {"sigma_energy": 1.0, "sigma_force": None, "sigma_stress": None}
        return np.array([self._labels(a, k, p)["energy"] for k, a in enumerate(frames)])

    def score(self, X, y=None, sample_weight=None) -> float:
        """Coefficient of determination R² of the total energies (scikit-learn convention:
        1 is perfect, 0 is the mean predictor). Reference energies are read from the frames
        with ``energy_key``."""
        from sklearn.metrics import r2_score

        frames = _as_frames(X, "X")
        return float(r2_score(self._reference(frames), self.predict(frames),
                              sample_weight=sample_weight))

    def evaluate(self, frames) -> dict[str, float]:
        """Errors against the labels of ``frames``.

        Returns
        -------
        dict
            ``energy_mae`` / ``energy_rmse`` (eV/atom), ``forces_mae`` / ``forces_rmse``
            (eV/Å, per component), ``stress_mae`` / ``stress_rmse`` (eV/Å³, per Voigt
            component, periodic frames), each present when the frames carry that label, and
            ``n_frames``.
        """
        frames = _as_frames(frames)
        pe = {"sigma_energy": None, "sigma_force": None, "sigma_stress": None}
        dE, dF, dS = [], [], []
        for k, a in enumerate(frames):
            r = self._evaluate(a, forces=True, stress=True)
            lab_e = self._labels(a, k, dict(pe, sigma_energy=1.0)) \
                if self._has(a, self.energy_key, "info") else None
            if lab_e is not None:
                dE.append((r["energy"] - lab_e["energy"]) / len(a))
            if self._has(a, self.forces_key, "arrays"):
                f = self._labels(a, k, dict(pe, sigma_force=1.0))["forces"]
                dF.append((r["forces"] - f).ravel())
            if _is_periodic(a) and self._has(a, self.stress_key, "info"):
                s = self._labels(a, k, dict(pe, sigma_stress=1.0))["stress"]
                dS.append(r["stress"] - s)
        out: dict[str, float] = {"n_frames": len(frames)}
        for name, d in (("energy", dE), ("forces", dF), ("stress", dS)):
            if d:
                x = np.concatenate([np.atleast_1d(v) for v in d])
                out[f"{name}_mae"] = float(np.mean(np.abs(x)))
                out[f"{name}_rmse"] = float(np.sqrt(np.mean(x * x)))
        return out

    @staticmethod
    def _has(atoms: Atoms, key: str, where: str) -> bool:
        if key in getattr(atoms, where):
            return True
        results = getattr(atoms.calc, "results", None) if atoms.calc is not None else None
        return bool(results) and key in results

    # -- files -------------------------------------------------------------------------------------
    def save(self, path, include_factors: bool = True) -> None:
        """Writes the fitted model to exactly ``path`` (atomically); see :mod:`kmlip.io`.

        ``include_factors`` stores the per-class QR factors too (needed by :meth:`partial_fit`
        and :meth:`optimize_hyperparameters` after loading; (n_classes) (M+1)² doubles).
        """
        from kmlip.io import save_model

        save_model(self, path, include_factors=include_factors)


__all__ = ["KernelPotential"]
