"""Sparse Gaussian-process interatomic potential (GAP-style), as a scikit-learn estimator.

Model
-----
``E = sum_i eps_i + sum_i e0(Z_i) + E_baseline``, ``eps_i = sum_m alpha_m k(p_i, s_m)`` over the
sparse environments ``s_m`` of the centre species of atom i, with the normalised dot-product
kernel ``k = delta^2 (p_hat . s_hat)^zeta`` (:mod:`kmlip.kernels`). Trained on total energies,
force components and virials (force matching) by the projected-process / DTC solve of
:mod:`kmlip.gp.sparse`.

The estimator is a table of contents over small modules: labels (:mod:`kmlip.labels`), e0
(:mod:`kmlip.gp.e0`), sparse points (:mod:`kmlip.gp.sparse_points`), training rows into the
streaming QR (:mod:`kmlip.gp.training`), hyperparameters (:mod:`kmlip.gp.hyperparameters`), the
fitted state (:mod:`kmlip.gp.state`), prediction (:mod:`kmlip.prediction`), error metrics
(:mod:`kmlip.metrics`) and the file format (:mod:`kmlip.io`).

Every parameter is checked before any work; a fit builds one immutable
:class:`~kmlip.gp.state.FittedState` and assigns it in one statement at the end, so a fit (or
``partial_fit``, or a hyperparameter update) that raises leaves the previous model exactly as it
was. Fitted attributes (``alpha_``, ``e0_``, ``delta_``, ...) read from that state.

Labels and noise
----------------
See :mod:`kmlip.labels` for where labels are read. Noise (GAP's convention, sigma per atom for
extensive labels): a total energy has ``sigma_energy * sqrt(n_atoms)``, a force component
``sigma_force``, a virial component ``sigma_stress * sqrt(n_atoms)``; per-structure overrides
``atoms.info['energy_sigma']``, ``['force_sigma']``, ``['virial_sigma']``,
``atoms.arrays['force_atom_sigma']`` are absolute and not rescaled by hyperparameter
optimisation.

Memory
------
Training streams structures one at a time through the descriptor, the kernel-row contraction
and a per-class streaming QR of ``block_size`` rows; peak memory is about
``8 * [(n_classes + 2) (M+1)^2 + (block_size + M) (M+1) + n_env F]`` bytes plus one structure's
pair gradients (n_entries × 3 × F doubles). ``n_env F`` (all environments' features, for the
choice of sparse points) is the only part that grows with the data set.

Online updates
--------------
:meth:`KernelPotential.partial_fit` adds labelled frames as new rows of the stored per-class QR
factors and re-solves, with sparse points, e0 and hyperparameters unchanged — identical to a fit
on all frames with the same sparse points.
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from kmlip import io as model_io
from kmlip import labels as lab
from kmlip import metrics, prediction
from kmlip._threads import resolve_threads, serial_blas
from kmlip._validate import check_bool
from kmlip.gp import e0 as e0_mod
from kmlip.gp import hyperparameters as hp
from kmlip.gp import sparse_points, training
from kmlip.gp.sparse import cholesky_jitter
from kmlip.gp.state import (
    FittedState,
    baseline_from_dict,
    baseline_to_dict,
    copy_component,
    descriptor_from_dict,
    descriptor_to_dict,
    jsonable,
    unjson,
)
from kmlip.gp.terms import KernelSum, Term

PRECISIONS = ("auto", "double", "mixed")


@dataclass(frozen=True)
class _Config:
    """The estimator's parameters, validated (built before any work)."""

    hyper: hp.Hyperparameters
    keys: lab.LabelKeys
    terms: tuple  # of _TermConfig, one per kernel term
    e0: dict | None
    jitter: float
    block_size: int | None
    n_threads: int
    precision: str


@dataclass(frozen=True)
class _TermConfig:
    """One kernel term's parameters: its descriptor, ζ (None where it does not apply) and the
    sparse-point request."""

    descriptor: Any
    zeta: int | None
    n_sparse: Any
    sparse_method: Any


def _is_term_list(v) -> bool:
    return isinstance(v, (list, tuple))


def _passes(client):
    """The selection and data passes of a fit: serial, or on the workers of a Dask client."""
    if client is None:
        return sparse_points.choose, training.accumulate
    import functools

    from kmlip.gp import distributed

    return (functools.partial(distributed.choose, client),
            functools.partial(distributed.accumulate, client))


class KernelPotential(BaseEstimator):
    """Sparse GP potential: a descriptor + normalised dot-product kernel, as GAP.

    Parameters
    ----------
    descriptor : Descriptor or list of Descriptor
        Anything following :class:`kmlip.descriptors.base.Descriptor` (e.g. ``SOAP(...)``);
        a list makes a **sum of kernels** (e.g. ``[Distance2b(...), SOAP(...)]``, GAP's usual
        two-body + SOAP model): each term has its own environments, sparse points, δ and
        selection, and the per-term parameters below may then be lists (one entry per term)
        or scalars (applying to every term).
    zeta : int, or list of int or None
        Kernel exponent ζ (>= 1) of the normalised dot-product kernel; None for a term with
        a kernel of its own (Distance2b's squared exponential), where a scalar ζ is ignored.
        All parameters after ``descriptor`` are keyword-only.
    delta : float or list of float
        Kernel scale δ in eV (prior std of a local energy), per term for a sum.
    n_sparse : int or dict, or a list of them
        Sparse environments per kernel key (centre species; species pair ``"Cu-Al"`` for
        Distance2b): an int for every key, or ``{key name: int}``, capped at the number of
        training environments of that key.
    sparse_method : str, array or dict, or a list of them
        ``"cur"`` (leverage scores), ``"fps"`` (farthest point), ``"random"`` or ``"uniform"``
        (evenly spaced, GAP's choice for two-body terms; see :mod:`kmlip.gp.selection`); a 1-D
        int array of global environment indices (atoms of all training frames concatenated in
        order); or ``{key name: indices or (M_k, F) features}``.
    sigma_energy : float or None
        Energy noise in eV per atom (a total energy has ``sigma_energy * sqrt(n_atoms)``);
        None: energies are not used as labels.
    sigma_force : float or None
        Force noise per component, eV/Å; None: forces are not used.
    sigma_stress : float or None
        Virial noise in eV per atom (per Voigt component ``sigma_stress * sqrt(n_atoms)``);
        None: stresses are not used.
    energy_key, forces_key, stress_key : str
        Where labels are read (see :mod:`kmlip.labels`).
    e0 : dict or None
        Isolated-atom energies ``{symbol: eV}``; None fits them by least squares on the training
        energies (minus baseline) against species counts, weighted by the energy noise of each
        structure (0 when energies are not used). A warning says when the compositions cannot
        determine them (e.g. only stoichiometric NaCl).
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
        Arithmetic of the training GEMM (pair gradients × sparse points, the dominant cost);
        see :meth:`kmlip.kernels.SparseBasis.derivative_rows`. Predictions are always double.

    Attributes
    ----------
    fitted_state_ : FittedState
        Everything learned (the attributes below read from it).
    species_ : list of str
        Species the model can predict (with sparse points or an e0).
    e0_ : dict
        ``{symbol: eV}`` used.
    alpha_ : ndarray, shape (M,)
        Weights (``eps_i = sum_m alpha_m delta^2 k_hat(p_i, s_m)``).
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

    def __init__(self, descriptor=None, *, zeta: int = 4, delta: float = 0.2,
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

    # -- parameters ------------------------------------------------------------------------------
    def _config(self) -> _Config:
        """All parameters checked (TypeError/ValueError naming the parameter), before any work."""
        terms, delta = self._terms_config()
        sig = {}
        for name in ("sigma_energy", "sigma_force", "sigma_stress"):
            v = getattr(self, name)
            sig[name] = None if v is None else lab.positive(v, name)
        if sig["sigma_energy"] is None and sig["sigma_force"] is None:
            raise ValueError("at least one of sigma_energy and sigma_force must be set")
        for name in ("energy_key", "forces_key", "stress_key"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a str, got {type(getattr(self, name)).__name__}")
        if isinstance(self.jitter, bool) or not isinstance(self.jitter, (int, float)) \
                or not (math.isfinite(self.jitter) and self.jitter >= 0):
            raise ValueError(f"jitter must be a finite number >= 0, got {self.jitter!r}")
        bs = self.block_size
        if bs is not None and (isinstance(bs, bool) or not isinstance(bs, (int, np.integer))
                               or bs < 1):
            raise ValueError(f"block_size must be a positive int or None, got {bs!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.baseline is not None and not callable(getattr(self.baseline, "compute", None)):
            raise TypeError("baseline must have compute(atoms) -> (energy, forces, stress)")
        if not (self.random_state is None or isinstance(self.random_state, np.random.Generator)
                or (isinstance(self.random_state, (int, np.integer))
                    and not isinstance(self.random_state, bool))):
            raise TypeError("random_state must be an int, a numpy Generator or None, got "
                            f"{type(self.random_state).__name__}")
        if isinstance(self.random_state, (int, np.integer)) and self.random_state < 0:
            raise ValueError(f"random_state must be >= 0, got {self.random_state}")
        if self.progress is not None and not isinstance(self.progress, (bool, np.bool_)):
            raise TypeError(f"progress must be True, False or None, got {self.progress!r}")
        if isinstance(self.verbose, bool) or not isinstance(self.verbose, (int, np.integer)):
            raise TypeError(f"verbose must be an int, got {self.verbose!r}")
        keys = lab.LabelKeys(self.energy_key, self.forces_key, self.stress_key,
                             sig["sigma_energy"] is not None, sig["sigma_force"] is not None,
                             sig["sigma_stress"] is not None)
        return _Config(hyper=hp.Hyperparameters(delta, **sig),
                       keys=keys, terms=terms, e0=e0_mod.validate_e0(self.e0),
                       jitter=float(self.jitter), block_size=None if bs is None else int(bs),
                       n_threads=resolve_threads(self.n_threads), precision=self.precision)

    def _terms_config(self):
        """(terms, delta): per-term parameters of a single descriptor or a sum of kernels."""
        multi = _is_term_list(self.descriptor)
        descs = list(self.descriptor) if multi else [self.descriptor]
        if not descs:
            raise ValueError("descriptor is an empty list; give at least one descriptor")
        for t, d in enumerate(descs):
            if d is None or not all(hasattr(d, a) for a in ("transform", "species_z",
                                                            "n_features")):
                where = f"descriptor[{t}]" if multi else "descriptor"
                raise TypeError(f"{where} must be a kmlip descriptor (e.g. SOAP(...)), got "
                                f"{type(d).__name__}")

        def per_term(name, value):
            if multi and _is_term_list(value):
                if len(value) != len(descs):
                    raise ValueError(f"{name} has {len(value)} entries but descriptor has "
                                     f"{len(descs)} terms")
                return list(value), True
            return [value] * len(descs), False

        zetas, zlist = per_term("zeta", self.zeta)
        terms = []
        n_sparse, _ = per_term("n_sparse", self.n_sparse)
        methods, _ = per_term("sparse_method", self.sparse_method)
        for t, (d, z) in enumerate(zip(descs, zetas, strict=True)):
            where = f"zeta[{t}]" if zlist else "zeta"
            if not getattr(d, "uses_zeta", True):
                if zlist and z is not None:
                    raise ValueError(f"{where} must be None for {type(d).__name__} (its kernel "
                                     f"is its own), got {z!r}")
                z = None
            elif isinstance(z, bool) or not isinstance(z, (int, np.integer)) \
                    or not 1 <= z <= 64:
                raise ValueError(f"{where} must be an integer in [1, 64], got {z!r}")
            else:
                z = int(z)
            terms.append(_TermConfig(d, z, n_sparse[t], methods[t]))
        deltas, dlist = per_term("delta", self.delta)
        deltas = [lab.positive(v, f"delta[{t}]" if dlist else "delta")
                  for t, v in enumerate(deltas)]
        return tuple(terms), (tuple(deltas) if multi else deltas[0])

    # -- fitted state ----------------------------------------------------------------------------
    def __sklearn_is_fitted__(self) -> bool:
        return "fitted_state_" in self.__dict__

    def _fitted(self) -> FittedState:
        check_is_fitted(self)
        return self.fitted_state_

    alpha_ = property(lambda self: self._fitted().alpha, doc="Weights, shape (M,).")
    R_ = property(lambda self: self._fitted().R, doc="Posterior factor, (M, M) upper.")
    L_hat_ = property(lambda self: self._fitted().L_hat, doc="Cholesky factor of unit K_MM.")
    jitter_ = property(lambda self: self._fitted().jitter, doc="Jitter used.")
    basis_ = property(lambda self: self._fitted().basis, doc="SparseBasis (one term).")
    descriptor_ = property(lambda self: self._fitted().descriptor,
                           doc="Fitted descriptor copy (a list for a sum of kernels).")
    baseline_ = property(lambda self: self._fitted().baseline, doc="Fitted baseline copy.")
    factors_ = property(lambda self: dict(self._fitted().factors), doc="Per-class QR factors.")
    e0_ = property(lambda self: dict(self._fitted().e0), doc="{symbol: eV}.")
    species_ = property(lambda self: list(self._fitted().species), doc="Predictable species.")
    delta_ = property(lambda self: (list(self._fitted().hyper.delta)
                                    if isinstance(self._fitted().hyper.delta, tuple)
                                    else self._fitted().hyper.delta),
                      doc="δ (eV); a list, one per term, for a sum of kernels.")
    sigma_energy_ = property(lambda self: self._fitted().hyper.sigma_energy)
    sigma_force_ = property(lambda self: self._fitted().hyper.sigma_force)
    sigma_stress_ = property(lambda self: self._fitted().hyper.sigma_stress)
    n_labels_ = property(lambda self: dict(self._fitted().n_labels), doc="Labels per class.")
    fit_timings_ = property(lambda self: dict(self._fitted().fit_timings))
    optimization_ = property(lambda self: self._fitted().optimization)
    log_marginal_likelihood_ = property(lambda self: self._fitted().log_marginal_likelihood)

    @property
    def sparse_points_(self):
        """``{key name: (M_k, F) descriptor vectors}`` (a list of such dicts for a sum of
        kernels, one per term)."""
        st = self._fitted()
        out = [{t.descriptor.key_name(k): t.basis.points[k] for k in t.basis.species_z}
               for t in st.kernel.terms]
        return out[0] if st.single else out

    @property
    def sparse_indices_(self) -> dict[str, np.ndarray] | None:
        idx = self._fitted().sparse_indices
        return None if idx is None else dict(idx)

    @property
    def hyperparameters_(self) -> dict[str, Any]:
        """Fitted hyperparameters and the log marginal likelihood."""
        st = self._fitted()
        return {**st.hyper.as_dict(), "log_marginal_likelihood": st.log_marginal_likelihood}

    # -- fit ---------------------------------------------------------------------------------------
    def fit(self, frames, y=None, optimize: bool = False, optimize_delta: bool = True,
            client=None):
        """Fits the sparse GP to labelled structures.

        Parameters
        ----------
        frames : list of ase.Atoms
            Training structures with labels (see :mod:`kmlip.labels`).
        y : None
            Ignored (labels live in the frames); present for scikit-learn compatibility.
        optimize : bool
            After the data pass, maximise the log marginal likelihood over δ and the σ's of the
            label classes in use (O(M³) per step, no new data pass); the optimised values are
            ``delta_``, ``sigma_*_`` (constructor arguments stay unchanged).
        optimize_delta : bool
            Include δ in the optimisation.
        client : dask.distributed.Client, optional
            Run the descriptor and kernel-row passes on its workers (:mod:`kmlip.gp.distributed`:
            structures are scattered in blocks, each worker streams its block into triangular
            factors, and the factors are tree-reduced); the same model as a serial fit.

        Returns
        -------
        self
        """
        t_start = time.perf_counter()
        optimize = check_bool("optimize", optimize)
        optimize_delta = check_bool("optimize_delta", optimize_delta)
        cfg = self._config()
        frames = lab.as_frames(frames)
        for tc in cfg.terms:
            for k, a in enumerate(frames):
                lab.check_species(a, tc.descriptor.species_z, f"frame {k}", "descriptor")
        specs = [sparse_points.validate(tc.n_sparse, tc.sparse_method, frames, tc.descriptor)
                 for tc in cfg.terms]
        labels = [lab.read_labels(a, k, cfg.keys) for k, a in enumerate(frames)]
        present = sorted({int(z) for a in frames for z in a.numbers})
        if cfg.e0 is not None:
            missing = [chemical_symbols[z] for z in present if chemical_symbols[z] not in cfg.e0]
            if missing:
                raise ValueError(f"e0 has no value for species {missing} of the training set")
        # kmlip's own OpenMP loops call BLAS per block; BLAS threads beside them would spin
        # (and a threaded SVD in the sparse selection is slower than a serial one here)
        try:
            with serial_blas():
                state = self._train(frames, labels, present, specs, cfg, optimize,
                                    optimize_delta, t_start, client)
        except BaseException:
            if client is not None:
                from kmlip.gp import distributed

                distributed.release(client)
            raise
        self.fitted_state_ = state
        return self

    def _train(self, frames, labels, present, specs, cfg: _Config, optimize: bool,
               optimize_delta: bool, t_start: float, client=None) -> FittedState:
        timings = {}
        choose, accumulate = _passes(client)
        t0 = time.perf_counter()
        baseline = copy_component(self.baseline)
        base = training.baselines_of(baseline, frames)
        e0 = cfg.e0 if cfg.e0 is not None else self._fit_e0(frames, labels, base, present, cfg)
        timings["baseline_e0"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        terms, sparse_idx = [], None
        single = len(cfg.terms) == 1
        for t, (tc, spec) in enumerate(zip(cfg.terms, specs, strict=True)):
            desc = copy_component(tc.descriptor)
            points, idx = choose(spec, desc, frames, self.random_state, cfg.n_threads)
            terms.append(Term(desc, desc.make_basis(points, tc.zeta)))
            if single:
                sparse_idx = idx
            elif idx:
                sparse_idx = {**(sparse_idx or {}), **{f"{t}:{k}": v for k, v in idx.items()}}
        kernel = KernelSum(terms)
        timings["selection"] = time.perf_counter() - t0
        M = kernel.n_sparse
        self._log(f"{len(frames)} frames, M = {M} sparse points (" + "; ".join(
            ", ".join(f"{t.descriptor.key_name(k)}: {len(t.basis.points[k])}"
                      for k in t.basis.species_z) for t in terms) + ")")

        t0 = time.perf_counter()
        L_hat, jit = cholesky_jitter(kernel.kmm(), cfg.jitter)
        bar = self._progress(len(frames), "kmlip fit")
        e0_tab = np.array([e0.get(s, 0.0) for s in chemical_symbols])
        try:
            factors, t_rows = accumulate(
                kernel, frames, labels, [float(np.sum(e0_tab[a.numbers])) for a in frames],
                base, cfg.n_threads, cfg.precision, training.block_rows_for(M, cfg.block_size),
                on_frame=None if bar is None else (lambda: bar.update(1)))
        finally:
            if bar is not None:
                bar.close()
        timings["kernel_rows"] = t_rows
        timings["qr"] = time.perf_counter() - t0 - t_rows

        t0 = time.perf_counter()
        with_points = set(kernel.species_with_points())
        order = []
        for t in terms:
            order += [z for z in t.descriptor.species_z if z not in order]
        species = tuple(chemical_symbols[z] for z in order
                        if z in with_points or chemical_symbols[z] in e0)
        state = FittedState.solved(
            factors=factors, L_hat=L_hat, hyper=cfg.hyper, kernel=kernel, baseline=baseline,
            sparse_indices=sparse_idx, species=species, e0=dict(e0), jitter=jit)
        if optimize:
            hyper, info = hp.optimize(state.factors, state.L_hat, state.hyper,
                                      optimize_delta=optimize_delta,
                                      groups=[kernel.columns(t) for t in range(len(kernel))])
            state = state.with_hyperparameters(hyper, info)
            self._log("optimised: " + ", ".join(f"{k}={v}" for k, v in
                                                hyper.as_dict().items() if v is not None))
        timings["solve"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - t_start
        self._log("timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items())
                  + f"; log marginal likelihood {state.log_marginal_likelihood:.6g}")
        return state.replace(fit_timings=timings)

    def _fit_e0(self, frames, labels, base, present, cfg: _Config) -> dict[str, float]:
        if not cfg.keys.use_energy:
            return {chemical_symbols[z]: 0.0 for z in present}
        counts = np.array([[np.count_nonzero(a.numbers == z) for z in present] for a in frames],
                          dtype=np.float64)
        energies = np.array([lb.energy - b[0] for lb, b in zip(labels, base, strict=True)])
        sig = np.array([lb.energy_sigma if lb.energy_sigma is not None
                        else cfg.hyper.sigma_energy * math.sqrt(len(a))
                        for lb, a in zip(labels, frames, strict=True)])
        return e0_mod.fit_e0(counts, energies, sig, present)

    def partial_fit(self, frames, y=None, client=None):
        """Adds labelled frames to a fitted model (new QR rows; sparse points, e0 and
        hyperparameters unchanged) and re-solves. Fits from scratch when not fitted.

        Parameters
        ----------
        frames : list of ase.Atoms
            New labelled structures (see :mod:`kmlip.labels`), of species the model knows.
        y : None
            Ignored (labels live in the frames); present for scikit-learn compatibility.
        client : dask.distributed.Client, optional
            Compute the new frames' kernel rows on its workers
            (:func:`kmlip.gp.distributed.accumulate`: each worker folds its block of the new
            frames into triangular factors, which are merged into the model's stored ones on
            the caller's side); the same model as without a client, to rounding. The model
            may have been fitted with or without a client. When the model is not fitted yet,
            ``fit(frames, client=client)``.

        Returns
        -------
        self

        Raises
        ------
        ValueError
            Bad frames or labels (the message names the frame; on Dask, ``"structure i (Dask
            worker ADDRESS): ..."``), or a model without its QR factors; the model is unchanged.
        RuntimeError
            A Dask worker died during the update (the message names it and the frames it
            held); the model is unchanged.
        """
        if not self.__sklearn_is_fitted__():
            return self.fit(frames, client=client)
        cfg = self._config()
        state = self.fitted_state_
        state.require_factors("partial_fit")
        frames = lab.as_frames(frames)
        for k, a in enumerate(frames):
            lab.check_species(a, state.species_z, f"frame {k}", "model")
        h = state.hyper
        keys = lab.LabelKeys(cfg.keys.energy_key, cfg.keys.forces_key, cfg.keys.stress_key,
                             h.sigma_energy is not None, h.sigma_force is not None,
                             h.sigma_stress is not None)
        labels = [lab.read_labels(a, k, keys) for k, a in enumerate(frames)]
        _, accumulate = _passes(client)
        # kmlip's own OpenMP loops call BLAS per block; BLAS threads beside them would spin
        # (and a threaded SVD in the sparse selection is slower than a serial one here)
        with serial_blas():
            base = training.baselines_of(state.baseline, frames)
            factors, _ = accumulate(
                state.kernel, frames, labels,
                [float(np.sum(state.e0_table[a.numbers])) for a in frames], base,
                cfg.n_threads, cfg.precision,
                training.block_rows_for(state.n_sparse, cfg.block_size),
                factors=state.factors)
            new = state.with_factors(factors)
        self.fitted_state_ = new
        return self

    def add_sparse_points(self, points, frames, row_cache=None):
        """Adds sparse points (new kernel columns) to the fitted model without a refit.

        The kernel rows of the old labels against the new points are computed (one descriptor
        pass per training frame, of the terms that take points only); the old columns' rows
        come from ``row_cache`` (built here when not given), and each label class is
        refactored by one QR (:mod:`kmlip.gp.columns`). e0 and hyperparameters are unchanged;
        the result equals a fit with all the points given (tested to ~1e-9 relative, for one
        term and for a 2b + SOAP sum). The constructor parameters are not changed: a later
        ``fit`` chooses points anew (pass ``sparse_method=model.sparse_points_`` to keep them).

        Parameters
        ----------
        points : dict or list of dict
            ``{key: (m, n_features) descriptor vectors}`` with key a kernel-key name (a symbol,
            ``"Cu"``, for an atom-centred term; a species pair, ``"Cu-Al"``, for Distance2b,
            whose points may be a 1-D array of distances in Å) or an integer key. For a sum of
            kernels a key must belong to exactly one term; where terms share key names (e.g. two
            SOAP terms), name the term: ``{term_index: {key: X}}``, or give one dict per term
            (as ``sparse_points_`` lists them). Points of a term land at the end of their key's
            block in that term (see :func:`kmlip.gp.columns.points_by_term`).
        frames : list of ase.Atoms
            All labelled frames the model was trained on, in training order.
        row_cache : RowCache, optional
            Their unit kernel rows (from an earlier call, or
            :func:`kmlip.gp.columns.build_cache`).

        Returns
        -------
        RowCache
            The extended row cache (for the next call).

        Raises
        ------
        ValueError
            Unknown or ambiguous key, wrong shape, non-finite values, a species without e0,
            pair distances outside the cutoff, frames that do not match the cache; the model is
            unchanged.
        """
        from kmlip.gp import columns

        st = self._fitted()
        frames = lab.as_frames(frames)
        keys = lab.LabelKeys(self.energy_key, self.forces_key, self.stress_key)
        new, row_cache = columns.add_columns(st, frames, points, row_cache, keys=keys,
                                             n_threads=self.n_threads)
        self.fitted_state_ = new
        return row_cache

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
        st = self._fitted()
        st.require_factors("the log marginal likelihood")
        hyper = st.hyper.updated(delta, sigma_energy, sigma_force, sigma_stress)
        sol = hp.solve(st.factors, st.L_hat, hyper, gradient=eval_gradient,
                       groups=[st.kernel.columns(t) for t in range(len(st.kernel))])
        if eval_gradient:
            return sol.log_marginal_likelihood, sol.gradient
        return sol.log_marginal_likelihood

    def update_hyperparameters(self, delta: float | None = None,
                               sigma_energy: float | None = None,
                               sigma_force: float | None = None,
                               sigma_stress: float | None = None):
        """Re-solves for new δ / σ's from the stored factors (no data pass). Returns self."""
        st = self._fitted()
        new = st.with_hyperparameters(
            st.hyper.updated(delta, sigma_energy, sigma_force, sigma_stress))
        self.fitted_state_ = new
        return self

    def optimize_hyperparameters(self, optimize_delta: bool = True,
                                 bounds: Mapping[str, tuple[float, float]] | None = None):
        """Maximises the log marginal likelihood from the stored factors and re-solves.

        Parameters
        ----------
        optimize_delta : bool
            Include δ.
        bounds : dict, optional
            ``{"delta" | "sigma_energy" | "sigma_force" | "sigma_stress": (low, high)}``.

        Returns
        -------
        dict
            The optimised ``delta`` and σ's and ``log_marginal_likelihood``.
        """
        st = self._fitted()
        st.require_factors("optimize_hyperparameters")
        hyper, info = hp.optimize(st.factors, st.L_hat, st.hyper, optimize_delta=optimize_delta,
                                  bounds=bounds,
                                  groups=[st.kernel.columns(t) for t in range(len(st.kernel))])
        self.fitted_state_ = st.with_hyperparameters(hyper, info)
        return self.hyperparameters_

    # -- prediction --------------------------------------------------------------------------------
    def compute(self, atoms: Atoms, properties: Iterable[str] = ("energy",),
                reuse: prediction.Prediction | None = None) -> prediction.Prediction:
        """Exactly the requested quantities of one structure, from one descriptor pass.

        Parameters
        ----------
        atoms : ase.Atoms
        properties : iterable of str
            Any of ``"energy"``, ``"energies"``, ``"forces"``, ``"stress"``, ``"energy_var"``,
            ``"energies_var"``, ``"forces_var"`` (see :mod:`kmlip.prediction`).
        reuse : Prediction, optional
            A previous result for the same positions (variances then need no descriptor pass).

        Returns
        -------
        Prediction
            ``energy`` (eV), ``energies`` (n_atoms,), ``forces`` (n_atoms, 3) eV/Å, ``stress``
            (6,) eV/Å³, variances in eV² / (eV/Å)²; None where not requested.
        """
        if reuse is not None and not isinstance(reuse, prediction.Prediction):
            raise TypeError("reuse must be a Prediction of an earlier compute() or None, got "
                            f"{type(reuse).__name__}")
        return prediction.compute(self._fitted(), atoms, properties, n_threads=self.n_threads,
                                  reuse=reuse)

    def _each(self, X, properties, pick):
        if isinstance(X, Atoms):
            return pick(self.compute(X, properties), X)
        frames = lab.as_frames(X, "X")
        return [training.in_frame(lambda a=a: pick(self.compute(a, properties), a), k, True,
                                  "structure") for k, a in enumerate(frames)]

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
        return_std = check_bool("return_std", return_std)
        frames = lab.as_frames(X, "X")
        props = ("energy", "energy_var") if return_std else ("energy",)
        res = [training.in_frame(lambda a=a: self.compute(a, props), k, len(frames) > 1,
                                 "structure") for k, a in enumerate(frames)]
        E = np.array([r.energy for r in res])
        if return_std:
            return E, np.sqrt(np.array([r.energy_var for r in res]))
        return E

    def predict_forces(self, X):
        """Forces in eV/Å: (n_atoms, 3) for one Atoms, a list of such arrays for a list."""
        return self._each(X, ("forces",), lambda r, a: r.forces)

    def predict_stress(self, X):
        """Stress in eV/Å³ (Voigt xx yy zz yz xz xy, ASE sign): (6,) for one Atoms,
        (n_frames, 6) for a list; NaN rows for non-periodic structures."""
        def pick(r, a):
            return r.stress if r.stress is not None else np.full(6, np.nan)

        out = self._each(X, ("stress",), pick)
        return out if isinstance(X, Atoms) else np.array(out)

    def predict_local_energies(self, X, return_var: bool = False):
        """Per-atom energies (local GP energy + e0, eV) and optionally their epistemic
        variances (eV²): arrays (n_atoms,) for one Atoms, lists of them for a list."""
        props = ("energies", "energies_var") if return_var else ("energies",)
        return self._each(X, props, lambda r, a: (r.energies, r.energies_var) if return_var
                          else r.energies)

    def predict_forces_variance(self, X):
        """Epistemic variance of every force component (eV²/Å²), (n_atoms, 3) per structure."""
        return self._each(X, ("forces_var",), lambda r, a: r.forces_var)

    def noise_levels(self, atoms: Atoms) -> dict[str, float | None]:
        """Aleatoric noise variances the model assumes for the labels of ``atoms``:
        ``energy`` (eV², total energy), ``forces`` (eV²/Å², per component), ``stress``
        ((eV/Å³)², per Voigt component; None when not used or not periodic)."""
        h = self._fitted().hyper
        if not isinstance(atoms, Atoms):
            raise TypeError(f"noise_levels needs an ase.Atoms, got {type(atoms).__name__}")
        n = len(atoms)
        out: dict[str, float | None] = {"energy": None, "forces": None, "stress": None}
        if h.sigma_energy is not None:
            out["energy"] = h.sigma_energy ** 2 * n
        if h.sigma_force is not None:
            out["forces"] = h.sigma_force ** 2
        if h.sigma_stress is not None and lab.is_periodic(atoms):
            out["stress"] = h.sigma_stress ** 2 * n / atoms.get_volume() ** 2
        return out

    # -- scoring -----------------------------------------------------------------------------------
    def score(self, X, y=None, sample_weight=None) -> float:
        """Coefficient of determination R² of the total energies (scikit-learn convention:
        1 is perfect, 0 is the mean predictor). Reference energies are read from the frames
        with ``energy_key``."""
        from sklearn.metrics import r2_score

        frames = lab.as_frames(X, "X")
        ref = np.array([lab.read_energy(a, self.energy_key, f"frame {k}")
                        for k, a in enumerate(frames)])
        return float(r2_score(ref, self.predict(frames), sample_weight=sample_weight))

    def error_metrics(self, frames) -> dict[str, float]:
        """MAE / RMSE against the labels of ``frames`` (see :func:`kmlip.metrics.error_metrics`):
        energy per atom (eV/atom), force components (eV/Å), stress components (eV/Å³)."""
        self._fitted()
        keys = lab.LabelKeys(self.energy_key, self.forces_key, self.stress_key)
        return metrics.error_metrics(self.compute, lab.as_frames(frames), keys)

    def calibrate(self, frames, measure: str = "auto") -> dict[str, Any]:
        """Fits the per-atom ``uncertainty`` (eV/Å) to the force errors of labelled frames.

        Use frames the model was not trained on (held-out, or from a later MD run). The map
        ``u_i = sqrt(b^2 + a^2 m_i)`` from a per-atom measure ``m_i`` is fitted by maximum
        likelihood of the force errors (:mod:`kmlip.uncertainty`) and stored in the model (and
        its file); the model's predictions are unchanged.

        Parameters
        ----------
        frames : list of ase.Atoms
            Structures with force labels (``forces_key``).
        measure : {"auto", "novelty", "energies_var"}
            The per-atom measure; "auto" takes the one whose ranking of the atoms agrees best
            with their force errors (Spearman), preferring "novelty" on ties.

        Returns
        -------
        dict
            ``measure``, ``scale`` (1/Å), ``floor`` (eV/Å), ``n_atoms``, the Spearman
            correlation of each measure with the per-atom force error, and the fraction of
            force-error components within ±2 uncertainty before and after (``coverage_before``,
            ``coverage_after``; 0.95 is ideal for Gaussian errors).
        """
        from kmlip import uncertainty as unc

        st = self._fitted()
        cal, report = unc.calibrate(self.compute, lab.as_frames(frames), self.forces_key,
                                    measure)
        self.fitted_state_ = st.replace(calibration=cal)
        return report

    #: Same as :meth:`error_metrics` (the name of earlier versions).
    evaluate = error_metrics

    # -- files -------------------------------------------------------------------------------------
    def _header(self, include_factors: bool) -> tuple[dict, dict]:
        arrays, fitted = self._fitted().to_arrays(include_factors)
        params = {}
        for k, v in self.get_params(deep=False).items():
            if k == "descriptor":
                params[k] = [descriptor_to_dict(d) for d in v] if _is_term_list(v) \
                    else descriptor_to_dict(v)
            elif k == "baseline":
                params[k] = baseline_to_dict(v)
            elif k == "random_state" and isinstance(v, np.random.Generator):
                params[k] = None  # a Generator's state is not a parameter worth storing
            else:
                params[k] = jsonable(v)
        return {"params": params, "fitted": fitted}, arrays

    def save(self, path, include_factors: bool = True) -> None:
        """Writes the fitted model to exactly ``path`` (atomically); see :mod:`kmlip.io`.

        ``include_factors`` stores the per-class QR factors too (needed by :meth:`partial_fit`
        and :meth:`optimize_hyperparameters` after loading; (n_classes) (M+1)² doubles).
        """
        header, arrays = self._header(include_factors)
        model_io.write_model_file(path, header, arrays)

    def export_raw(self, directory) -> None:
        """Writes the model as ``model.json`` + raw little-endian arrays (no NumPy needed to
        read it; see :func:`kmlip.io.export_raw`)."""
        header, arrays = self._header(include_factors=False)
        model_io.export_raw(directory, header, arrays)

    @classmethod
    def load(cls, path, trusted_modules: tuple[str, ...] = ("kmlip",)) -> KernelPotential:
        """Loads a model written by :meth:`save` (see :func:`load`)."""
        header, arrays = model_io.read_model_file(path)
        try:
            params = header.get("params")
            if not isinstance(params, dict):
                raise ValueError("'params' must be a dict")
            names = set(cls._get_param_names())
            unknown = sorted(set(params) - names)
            if unknown:
                raise ValueError(f"unknown parameters {unknown}")
            params = {k: unjson(v) for k, v in params.items()}
            d = params.get("descriptor")
            params["descriptor"] = [descriptor_from_dict(x) for x in d] \
                if isinstance(d, list) else descriptor_from_dict(d)
            params["baseline"] = baseline_from_dict(params.get("baseline"), trusted_modules)
            model = cls(**params)
            model._config()
            state = FittedState.from_arrays(arrays, header.get("fitted"), trusted_modules)
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            raise ValueError(f"{path}: invalid kmlip model file ({exc})") from exc
        model.fitted_state_ = state
        return model


def load(path, trusted_modules: tuple[str, ...] = ("kmlip",)) -> KernelPotential:
    """Loads a model written by :meth:`KernelPotential.save`.

    Parameters
    ----------
    path : str or os.PathLike
    trusted_modules : tuple of str
        Packages a baseline class may be imported from (the file names its class).

    Returns
    -------
    KernelPotential
        Fitted; predicts bit-identically to the saved model.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Unreadable, corrupted or inconsistent file, not a kmlip model, or a newer format
        version (the message names the file and the cause).
    """
    return KernelPotential.load(path, trusted_modules)


__all__ = ["KernelPotential", "load"]
