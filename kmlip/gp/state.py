"""The fitted state of a sparse-GP potential: one immutable object, built once per fit.

Everything a prediction, a variance, an online update or a model file needs: copies of the
descriptor and baseline, the sparse basis, e0, the Cholesky factor of K_MM, the per-class QR
factors, the hyperparameters and the solution (weights α, posterior factor R, log marginal
likelihood). A new fit, an online update or new hyperparameters make a new state
(:meth:`FittedState.with_hyperparameters`, :meth:`FittedState.with_factors`); the estimator
assigns it in one statement, so a step that raises leaves the previous model exactly as it was.

Arrays are read-only. The state converts itself to and from plain arrays and a JSON-able dict
(:meth:`FittedState.to_arrays`, :meth:`FittedState.from_arrays`); the latter validates every
value and every shape against each other, because model files are untrusted input.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import import_module
from types import MappingProxyType
from typing import Any

import numpy as np
from ase.data import atomic_numbers, chemical_symbols

from kmlip import kernels
from kmlip.gp import hyperparameters as hp
from kmlip.gp.sparse import (
    FIXED_CLASSES,
    FREE_CLASSES,
    ClassFactor,
    PosteriorVariance,
    predictive_variance,
)
from kmlip.gp.terms import KernelSum, Term
from kmlip.uncertainty import Calibration, default_calibration

#: Largest kernel exponent a model file may carry (ζ is a small integer in practice).
MAX_ZETA = 64
#: Physical ranges of a model file's scalars, eV: anything outside is a damaged file
#: (an all-electron isolated-atom energy of the heaviest elements is below 1e6 eV).
MAX_ENERGY_SCALE = 1e6
MAX_E0 = 1e7


def _frozen(a: np.ndarray, dtype=np.float64) -> np.ndarray:
    a = np.array(a, dtype=dtype, order="C", copy=True)
    a.flags.writeable = False
    return a


# -- descriptor and baseline as plain dicts ------------------------------------------------------
def jsonable(v: Any) -> Any:
    """Plain-JSON form of a value; arrays become ``{"__ndarray__": list, "dtype": str}``."""
    if isinstance(v, np.ndarray):
        return {"__ndarray__": v.tolist(), "dtype": str(v.dtype)}
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    if isinstance(v, Mapping):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if v is None or isinstance(v, (int, float, str)):
        return v
    raise TypeError(f"cannot store a value of type {type(v).__name__} in a model file")


def unjson(v: Any) -> Any:
    """Inverse of :func:`jsonable`."""
    if isinstance(v, dict):
        if "__ndarray__" in v:
            return np.asarray(v["__ndarray__"], dtype=np.dtype(v["dtype"]))
        return {k: unjson(x) for k, x in v.items()}
    if isinstance(v, list):
        return [unjson(x) for x in v]
    return v


def descriptor_to_dict(d) -> dict:
    """``{"type", "params"}`` of a descriptor (its ``to_dict``)."""
    return jsonable(d.to_dict())


def descriptor_from_dict(d: Any):
    """Rebuilds a descriptor; ValueError for anything that is not a valid description."""
    from kmlip.descriptors.base import Descriptor

    if not isinstance(d, Mapping):
        raise ValueError(f"descriptor description must be a dict, got {type(d).__name__}")
    try:
        desc = Descriptor.from_dict(dict(d))
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - a file's params may break a constructor anyhow
        raise ValueError(f"invalid descriptor description ({type(exc).__name__}: {exc})") \
            from exc
    for attr in ("transform", "species_z", "n_features", "cutoff"):
        if not hasattr(desc, attr):
            raise ValueError(f"descriptor {type(desc).__name__} lacks {attr!r}")
    return desc


def baseline_to_dict(b) -> dict | None:
    """``{"class": "module.Class", "data": b.to_dict()}`` or None."""
    if b is None:
        return None
    if not hasattr(b, "to_dict"):
        raise TypeError(f"baseline {type(b).__name__} has no to_dict(); cannot save it")
    cls = type(b)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "data": jsonable(b.to_dict())}


def baseline_from_dict(d: Any, trusted_modules: tuple[str, ...] = ("kmlip",)):
    """Rebuilds a baseline from a trusted module; ValueError for anything else."""
    if d is None:
        return None
    if not isinstance(d, Mapping) or not isinstance(d.get("class"), str):
        raise ValueError("baseline description must be {'class': 'module.Class', 'data': ...}")
    path = d["class"]
    module, _, name = path.rpartition(".")
    if not any(module == m or module.startswith(m + ".") for m in trusted_modules):
        raise ValueError(f"model file names baseline class {path!r} outside the trusted "
                         f"modules {trusted_modules}; pass trusted_modules to load() to allow it")
    try:
        cls = getattr(import_module(module), name)
        b = cls.from_dict(unjson(d.get("data")))
    except Exception as exc:  # noqa: BLE001 - untrusted description
        raise ValueError(f"cannot rebuild baseline {path!r} ({type(exc).__name__}: {exc})") \
            from exc
    if not (callable(getattr(b, "compute", None)) and callable(getattr(b, "to_dict", None))):
        raise ValueError(f"{path!r} is not a baseline (needs compute(atoms) and to_dict())")
    return b


def copy_component(obj):
    """An independent copy of a descriptor or baseline, through its dict form when it has one."""
    import copy

    if obj is None:
        return None
    if hasattr(obj, "to_dict") and hasattr(type(obj), "from_dict"):
        try:
            return type(obj).from_dict(obj.to_dict())
        except Exception:  # noqa: BLE001 - fall back to a plain deep copy
            pass
    return copy.deepcopy(obj)


# -- the state -----------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class FittedState:
    """Everything learned by a fit (read-only; see the module docstring).

    Attributes
    ----------
    kernel : KernelSum
        The kernel terms: copies of the descriptors taken at fit time (the estimator's
        parameters may change afterwards) and their sparse bases (sparse points per kernel
        key, ζ). :attr:`descriptor` and :attr:`basis` give a single-term model's.
    baseline
        Copy taken at fit time.
    sparse_indices : mapping or None
        ``{key name: (M_k, 2) (frame, environment)}`` of sparse points taken from the training
        set (a sum of kernels: keys ``"t:name"`` with t the term).
    species : tuple of str
        Species the model predicts (with sparse points or an e0).
    e0 : mapping
        ``{symbol: eV}``.
    L_hat : ndarray (M, M)
        Lower Cholesky factor of the unit ``K_hat_MM + jitter I``.
    jitter : float
    factors : mapping
        ``{label class: ClassFactor}`` (may be empty for a file saved without them).
    hyper : Hyperparameters
        (δ is a tuple, one per term, for a sum of kernels.)
    alpha : ndarray (M,)
        Weights, ``eps_i = delta_t^2 sum_m alpha_m k_hat_t(p_i, s_m)`` over the columns of
        each term t.
    R : ndarray (M, M)
        Upper triangular, ``R^T R = K_MM + K_MN Lambda^-1 K_NM``.
    log_marginal_likelihood : float
    n_labels : mapping
        Labels per class.
    optimization : dict or None
        Outcome of the last hyperparameter optimisation.
    fit_timings : mapping
        Wall seconds per fit phase.
    calibration : Calibration or None
        Map from a per-atom measure to the per-atom uncertainty (None: uncalibrated).
    """

    kernel: KernelSum
    baseline: Any
    sparse_indices: Mapping[str, np.ndarray] | None
    species: tuple[str, ...]
    e0: Mapping[str, float]
    L_hat: np.ndarray
    jitter: float
    factors: Mapping[str, ClassFactor]
    hyper: hp.Hyperparameters
    alpha: np.ndarray
    R: np.ndarray
    log_marginal_likelihood: float
    n_labels: Mapping[str, int]
    optimization: dict | None = None
    fit_timings: Mapping[str, float] = field(default_factory=dict)
    calibration: Calibration | None = None
    _derived: dict = field(default_factory=dict, repr=False)

    @classmethod
    def solved(cls, *, factors: Mapping[str, ClassFactor], L_hat: np.ndarray,
               hyper: hp.Hyperparameters, **kw) -> FittedState:
        """Solves for α and R at ``hyper`` and builds the state."""
        factors = dict(factors)
        n_labels = {c: int(f.n_rows) for c, f in factors.items()}
        if sum(n_labels.values()) == 0:
            raise ValueError("no labels to fit")
        kernel = kw["kernel"]
        sol = hp.solve(factors, L_hat, hyper,
                       groups=[kernel.columns(t) for t in range(len(kernel))])
        if not np.all(np.isfinite(sol.alpha)):
            # finite labels can still overflow once scaled by 1/σ (an energy of 1e308 eV)
            raise ValueError("the fit gave non-finite weights: labels or noise levels out of "
                             "range (a label near the float limit, or a noise level near 0)")
        kw["e0"] = MappingProxyType(dict(kw["e0"]))
        if kw.get("sparse_indices") is not None:
            kw["sparse_indices"] = MappingProxyType(dict(kw["sparse_indices"]))
        return cls(factors=MappingProxyType(factors), L_hat=_frozen(L_hat), hyper=hyper,
                   alpha=_frozen(sol.alpha), R=_frozen(sol.R),
                   log_marginal_likelihood=float(sol.log_marginal_likelihood),
                   n_labels=MappingProxyType(n_labels), **kw)

    # -- the kernel terms ---------------------------------------------------------------------
    @property
    def single(self) -> bool:
        """One kernel term (a descriptor and its basis), as most models."""
        return self.kernel.single

    @property
    def descriptor(self):
        """The descriptor of a single-term model; a sum of kernels: the list of them."""
        if self.single:
            return self.kernel.terms[0].descriptor
        return [t.descriptor for t in self.kernel.terms]

    @property
    def descriptors(self) -> tuple:
        return tuple(t.descriptor for t in self.kernel.terms)

    @property
    def basis(self):
        """The sparse basis of a single-term model (ValueError for a sum of kernels)."""
        if not self.single:
            raise ValueError("a sum of kernels has one sparse basis per term "
                             "(fitted_state_.kernel.terms[t].basis)")
        return self.kernel.terms[0].basis

    @property
    def n_sparse(self) -> int:
        """Sparse points of all terms."""
        return self.kernel.n_sparse

    @property
    def column_delta(self):
        """δ per column (a scalar for one term), as :mod:`kmlip.gp.sparse` takes it."""
        return self.kernel.column_scale(self.hyper.delta)

    @property
    def atom_centred(self) -> bool:
        """One atom-centred term: variances take the per-species fast path."""
        return self.single and getattr(self.kernel.terms[0].descriptor, "atom_centred", True)

    @property
    def uncertainty_map(self) -> Calibration:
        """The calibration, or the uncalibrated default (see :mod:`kmlip.uncertainty`)."""
        return self.calibration or default_calibration(self.hyper.sigma_force)

    def _rebuilt(self, **changes) -> FittedState:
        # a calibration maps a measure to a force error; it stays until the next calibrate()
        kw = {f: getattr(self, f) for f in self.__dataclass_fields__
              if f not in ("_derived", "alpha", "R", "log_marginal_likelihood", "n_labels")}
        kw.update(changes)
        return FittedState.solved(**kw)

    def with_hyperparameters(self, hyper: hp.Hyperparameters,
                             optimization: dict | None = None) -> FittedState:
        """The same data at other hyperparameters (O(M³), no data pass)."""
        self.require_factors("changing hyperparameters")
        return self._rebuilt(hyper=hyper, optimization=optimization)

    def with_factors(self, factors: Mapping[str, ClassFactor]) -> FittedState:
        """The same sparse basis with other (e.g. extended) per-class factors."""
        return self._rebuilt(factors=factors)

    def require_factors(self, what: str) -> None:
        if not self.factors:
            raise ValueError(f"{what} needs the per-class QR factors, which this model does not "
                             "hold (saved with include_factors=False)")

    # -- derived quantities, computed once --------------------------------------------------
    @property
    def e0_table(self) -> np.ndarray:
        """e0 indexed by atomic number (0 for species without one), eV."""
        t = self._derived.get("e0_table")
        if t is None:
            t = np.zeros(len(chemical_symbols))
            for s, v in self.e0.items():
                t[atomic_numbers[s]] = v
            t.flags.writeable = False
            self._derived["e0_table"] = t
        return t

    @property
    def species_z(self) -> frozenset[int]:
        return frozenset(atomic_numbers[s] for s in self.species)

    def local_variance(self, K: np.ndarray, numbers: np.ndarray, k_ss: np.ndarray,
                       n_threads: int | None = None) -> np.ndarray:
        """Epistemic variances of local energies from their unit kernel rows ``K`` (n, M), as
        :meth:`variance` but one GEMM per species against a factor built once per state."""
        pv = self._derived.get("posterior_variance")
        if pv is None:
            b = self.basis
            pv = PosteriorVariance(self.L_hat, self.R, self.hyper.delta,
                                   {z: b.columns(z) for z in b.species_z})
            self._derived["posterior_variance"] = pv
        return pv.local(K, numbers, k_ss, n_threads=n_threads)

    def local_novelty(self, K: np.ndarray, numbers: np.ndarray, k_ss: np.ndarray,
                      n_threads: int | None = None) -> np.ndarray:
        """Projected-process term of the local-energy variance, ``delta^2 (k** - |L^-1 k|^2)``
        (eV²): how far each environment is from the span of its species' sparse points (0 on
        a sparse point, ``delta^2`` far from all). One GEMM per species against the inverse
        Cholesky factor of its K_MM block, built once per state."""
        from kmlip._ext import contract
        from kmlip._threads import serial_blas
        from kmlip.gp.sparse import _triangular_inverse

        packed = self._derived.get("novelty")
        b = self.basis
        if packed is None:
            packed = {}
            for z in b.species_z:
                sl = b.columns(z)
                W = _triangular_inverse(self.L_hat[sl, sl], lower=True)
                packed[z] = contract.pack_lower([W], PosteriorVariance.BLOCK)
            self._derived["novelty"] = packed
        K = np.asarray(K, dtype=np.float64)
        explained = np.zeros(K.shape[0])
        for z in b.species_z:
            idx = np.flatnonzero(numbers == z)
            if idx.size:
                Kz = np.ascontiguousarray(K[idx, b.columns(z)])
                with serial_blas():
                    explained[idx] = contract.tri_square_norms(
                        Kz, packed[z], PosteriorVariance.BLOCK, n_threads)[0]
        return self.hyper.delta ** 2 * np.maximum(np.asarray(k_ss) - explained, 0.0)

    def variance(self, K_star: np.ndarray, k_ss: np.ndarray, what: str) -> np.ndarray:
        """Epistemic variance of predictions with unit kernel rows ``K_star`` (n, M) and unit
        prior variances ``k_ss`` (n,): ``delta^2 k** - |L^-1 k*|^2 + |R^-T k*|^2`` (eV²...).
        A sum of kernels takes ``k_ss`` as the full prior variance (eV², each term scaled by
        its own δ²)."""
        return predictive_variance(K_star, k_ss, self.L_hat, self.R, self.column_delta, what)

    # -- arrays and JSON ----------------------------------------------------------------------
    def to_arrays(self, include_factors: bool = True) -> tuple[dict[str, np.ndarray], dict]:
        """Arrays and a JSON-able description, as stored in model files (see :mod:`kmlip.io`).

        A single atom-centred term keeps the layout of format version 2 (``descriptor``,
        ``zeta``, ``columns`` by chemical symbol); other models list their ``terms``.
        """
        arrays: dict[str, np.ndarray] = {"alpha": self.alpha, "R": self.R, "L_hat": self.L_hat}
        meta_kernel: dict[str, Any] = {}
        if self.atom_centred:
            columns = []
            basis = self.basis
            for z in basis.species_z:
                s = chemical_symbols[z]
                arrays[f"sparse_points__{s}"] = basis.points[z]
                columns.append({"symbol": s, "Z": int(z), "offset": int(basis.offsets[z]),
                                "count": int(basis.points[z].shape[0])})
                if self.sparse_indices is not None and s in self.sparse_indices:
                    arrays[f"sparse_indices__{s}"] = np.asarray(self.sparse_indices[s],
                                                                dtype=np.int64)
            meta_kernel = {"zeta": basis.zeta, "columns": columns,
                           "descriptor": descriptor_to_dict(self.descriptor)}
        else:
            terms = []
            for t, term in enumerate(self.kernel.terms):
                b, d = term.basis, term.descriptor
                cols = []
                for k in b.species_z:
                    name = d.key_name(k)
                    arrays[f"sparse_points__{t}__{name}"] = b.points[k]
                    cols.append({"name": name, "key": int(k), "offset": int(b.offsets[k]),
                                 "count": int(b.points[k].shape[0])})
                    tag = f"{t}:{name}"
                    if self.sparse_indices is not None and tag in self.sparse_indices:
                        arrays[f"sparse_indices__{t}__{name}"] = np.asarray(
                            self.sparse_indices[tag], dtype=np.int64)
                terms.append({"descriptor": descriptor_to_dict(d), "zeta": b.zeta,
                              "columns": cols})
            meta_kernel = {"terms": terms}
        factors = {}
        for cls, f in self.factors.items():
            factors[cls] = {"n_rows": int(f.n_rows), "log_scale_sum": float(f.log_scale_sum)}
            if include_factors:
                arrays[f"factor__{cls}"] = f.T
        meta = {
            "species": list(self.species), "e0": dict(self.e0), **self.hyper.as_dict(),
            "jitter": self.jitter, **meta_kernel,
            "log_marginal_likelihood": self.log_marginal_likelihood,
            "n_labels": dict(self.n_labels),
            "baseline": baseline_to_dict(self.baseline), "factors": factors,
            "factors_included": bool(include_factors and factors),
            "optimization": jsonable(self.optimization),
            "fit_timings": jsonable(dict(self.fit_timings)),
            "calibration": None if self.calibration is None
            else jsonable(self.calibration.to_dict()),
        }
        return {k: np.ascontiguousarray(v) for k, v in arrays.items()}, meta

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], meta: Mapping,
                    trusted_modules: tuple[str, ...] = ("kmlip",)) -> FittedState:
        """Rebuilds a state from :meth:`to_arrays` output, validating everything.

        Raises
        ------
        ValueError
            Any value out of range or of the wrong type, or arrays whose shapes do not match
            each other or the descriptor.
        """
        v = _Validator(arrays, meta)
        baseline = baseline_from_dict(v.get("baseline"), trusted_modules)
        if "terms" in meta:
            kernel, indices, order = _read_terms(v, arrays)
        else:
            kernel, indices, order = _read_single_term(v, arrays)
        M = kernel.n_sparse
        alpha = v.array("alpha", (M,), np.float64)
        R = v.array("R", (M, M), np.float64)
        L_hat = v.array("L_hat", (M, M), np.float64)
        if M and (np.any(np.tril(R, -1) != 0) or np.any(np.diag(R) == 0)):
            raise ValueError("R is not an invertible upper-triangular matrix")
        if M and (np.any(np.triu(L_hat, 1) != 0) or np.any(np.diag(L_hat) <= 0)):
            raise ValueError("L_hat is not a Cholesky factor (lower triangular, positive "
                             "diagonal)")
        species = v.get("species")
        if not isinstance(species, list) or not all(
                isinstance(s, str) and atomic_numbers.get(s, 0) > 0 for s in species):
            raise ValueError("'species' must be a list of chemical symbols")
        e0 = v.get("e0")
        if not isinstance(e0, Mapping):
            raise ValueError("'e0' must be a dict")
        e0 = {s: v.number(f"e0[{s!r}]", x) for s, x in e0.items()}
        if any(abs(x) > MAX_E0 for x in e0.values()):
            raise ValueError(f"e0 values must lie within ±{MAX_E0:g} eV")
        for s in e0:
            if atomic_numbers.get(s, 0) == 0:
                raise ValueError(f"e0 key {s!r} is not a chemical symbol")
        if any(chemical_symbols[z] not in e0 for z in order):
            raise ValueError("'e0' lacks a species that has sparse points")
        known = {chemical_symbols[z] for z in order} | set(e0)
        allowed = set().union(*(t.descriptor.species_z for t in kernel.terms))
        if set(species) != {s for s in known if atomic_numbers[s] in allowed}:
            raise ValueError("'species' does not match the sparse points and e0")
        if kernel.single:
            delta = v.positive("delta")
        else:
            dl = v.get("delta")
            if not isinstance(dl, list) or len(dl) != len(kernel):
                raise ValueError(f"'delta' must be a list of {len(kernel)} values (one per "
                                 "kernel term)")
            delta = tuple(v.number(f"delta[{t}]", x) for t, x in enumerate(dl))
            if not all(0 < x < math.inf for x in delta):
                raise ValueError("'delta' values must be positive and finite")
        hyper = hp.Hyperparameters(
            delta=delta, sigma_energy=v.positive("sigma_energy", none=True),
            sigma_force=v.positive("sigma_force", none=True),
            sigma_stress=v.positive("sigma_stress", none=True))
        jitter = v.number("jitter", v.get("jitter"))
        if not 0 <= jitter <= 1:
            raise ValueError("jitter must be in [0, 1]")
        lml = v.number("log_marginal_likelihood", v.get("log_marginal_likelihood"))
        n_labels = v.get("n_labels")
        if not isinstance(n_labels, Mapping) or not all(
                k in FREE_CLASSES + FIXED_CLASSES and isinstance(x, int)
                and not isinstance(x, bool) and x >= 0 for k, x in n_labels.items()):
            raise ValueError("'n_labels' must map label classes to counts")
        factors_meta = v.get("factors")
        if not isinstance(factors_meta, Mapping):
            raise ValueError("'factors' must be a dict")
        factors = {}
        if v.get("factors_included", False) is True:
            for c, info in factors_meta.items():
                if c not in FREE_CLASSES + FIXED_CLASSES or not isinstance(info, Mapping):
                    raise ValueError(f"unknown label class {c!r} in 'factors'")
                n_rows = info.get("n_rows")
                if isinstance(n_rows, bool) or not isinstance(n_rows, int) or n_rows < 0 \
                        or n_labels.get(c) != n_rows:
                    raise ValueError(f"factor {c!r}: n_rows does not match n_labels")
                T = v.array(f"factor__{c}", None, np.float64)
                if T.ndim != 2 or T.shape[1] != M + 1 or T.shape[0] > M + 1:
                    raise ValueError(f"factor__{c} has shape {T.shape}, expected (<= {M + 1}, "
                                     f"{M + 1})")
                if c in FREE_CLASSES and hyper.sigma_of(c) is None and n_rows:
                    raise ValueError(f"factor {c!r} has labels but its sigma is None")
                factors[c] = ClassFactor(_frozen(T), n_rows,
                                         v.number(f"factor {c} log_scale_sum",
                                                  info.get("log_scale_sum")))
        elif v.get("factors_included", False) is not False:
            raise ValueError("'factors_included' must be true or false")
        timings = v.get("fit_timings", {})
        optimization = v.get("optimization", None)
        if not isinstance(timings, Mapping) or not (optimization is None
                                                    or isinstance(optimization, Mapping)):
            raise ValueError("'fit_timings' / 'optimization' must be dicts")
        cal = v.get("calibration", None)
        calibration = None if cal is None else Calibration.from_dict(cal)
        return cls(kernel=kernel, baseline=baseline,
                   sparse_indices=MappingProxyType(indices) if indices else None,
                   species=tuple(species), e0=MappingProxyType(e0), L_hat=L_hat, jitter=jitter,
                   factors=MappingProxyType(factors), hyper=hyper, alpha=alpha, R=R,
                   log_marginal_likelihood=lml, n_labels=MappingProxyType(dict(n_labels)),
                   optimization=dict(optimization) if optimization else None,
                   fit_timings=MappingProxyType(dict(timings)), calibration=calibration)

    def replace(self, **changes) -> FittedState:
        """A copy with fields replaced (no re-solve; for bookkeeping fields)."""
        return replace(self, _derived={}, **changes)


def _read_single_term(v, arrays):
    """The kernel of a file with format version 1/2 layout (one atom-centred term)."""
    descriptor = descriptor_from_dict(v.get("descriptor"))
    zeta = v.integer("zeta", 1, MAX_ZETA)
    F = int(descriptor.n_features)
    columns = v.get("columns")
    if not isinstance(columns, list):
        raise ValueError("'columns' must be a list")
    points, indices, order, offset = {}, {}, [], 0
    for col in columns:
        if not isinstance(col, Mapping):
            raise ValueError("every entry of 'columns' must be a dict")
        s = col.get("symbol")
        if not isinstance(s, str) or atomic_numbers.get(s, 0) == 0:
            raise ValueError(f"column symbol {s!r} is not a chemical symbol")
        z = atomic_numbers[s]
        if col.get("Z") != z or z in points:
            raise ValueError(f"column of {s}: atomic number {col.get('Z')!r} wrong or "
                             "repeated")
        if z not in descriptor.species_z:
            raise ValueError(f"sparse points of {s}, a species the descriptor does not have")
        count = col.get("count")
        if col.get("offset") != offset or isinstance(count, bool) \
                or not isinstance(count, int) or count < 1:
            raise ValueError(f"column layout of {s} is inconsistent (offset/count)")
        P = v.array(f"sparse_points__{s}", (count, F), np.float64)
        points[z] = P
        key = f"sparse_indices__{s}"
        if key in arrays:
            idx = v.array(key, (count, 2), np.int64, finite=False)
            if np.any(idx < 0):
                raise ValueError(f"{key} has negative entries")
            indices[s] = _frozen(idx, np.int64)
        order.append(z)
        offset += count
    basis = kernels.SparseBasis(points, zeta, species_z=order)
    if basis.n_sparse != offset:
        raise ValueError("sparse points and columns disagree")
    return KernelSum([Term(descriptor, basis)]), indices, order


def _read_terms(v, arrays):
    """The kernel of a file that lists its ``terms`` (format version 3)."""
    terms_meta = v.get("terms")
    if not isinstance(terms_meta, list) or not terms_meta or len(terms_meta) > 64:
        raise ValueError("'terms' must be a non-empty list (at most 64 kernel terms)")
    terms, indices = [], {}
    for t, tm in enumerate(terms_meta):
        if not isinstance(tm, Mapping):
            raise ValueError(f"terms[{t}] must be a dict")
        d = descriptor_from_dict(tm.get("descriptor"))
        zeta = tm.get("zeta")
        if getattr(d, "uses_zeta", True):
            if isinstance(zeta, bool) or not isinstance(zeta, int) or not 1 <= zeta <= MAX_ZETA:
                raise ValueError(f"terms[{t}]: zeta must be an integer in [1, {MAX_ZETA}]")
        elif zeta is not None:
            raise ValueError(f"terms[{t}]: zeta must be null for {type(d).__name__}")
        cols = tm.get("columns")
        if not isinstance(cols, list):
            raise ValueError(f"terms[{t}]: 'columns' must be a list")
        F = int(d.n_features)
        points, offset = {}, 0
        for col in cols:
            if not isinstance(col, Mapping):
                raise ValueError(f"terms[{t}]: every column entry must be a dict")
            name, key, count = col.get("name"), col.get("key"), col.get("count")
            try:
                k = d.key_from_name(name)
            except (ValueError, TypeError):
                raise ValueError(f"terms[{t}]: {name!r} is not a kernel key of "
                                 f"{type(d).__name__}") from None
            if key != k or k in points:
                raise ValueError(f"terms[{t}]: key of {name!r} wrong or repeated")
            if col.get("offset") != offset or isinstance(count, bool) \
                    or not isinstance(count, int) or count < 1:
                raise ValueError(f"terms[{t}]: column layout of {name} is inconsistent")
            points[k] = v.array(f"sparse_points__{t}__{name}", (count, F), np.float64)
            member = f"sparse_indices__{t}__{name}"
            if member in arrays:
                idx = v.array(member, (count, 2), np.int64, finite=False)
                if np.any(idx < 0):
                    raise ValueError(f"{member} has negative entries")
                indices[f"{t}:{name}"] = _frozen(idx, np.int64)
            offset += count
        basis = d.make_basis(points, zeta)
        if basis.n_sparse != offset:
            raise ValueError(f"terms[{t}]: sparse points and columns disagree")
        terms.append(Term(d, basis))
    kernel = KernelSum(terms)
    return kernel, indices, kernel.species_with_points()


class _Validator:
    """Typed access to an untrusted state description, raising ValueError with the key."""

    def __init__(self, arrays: Mapping[str, np.ndarray], meta: Mapping):
        if not isinstance(meta, Mapping):
            raise ValueError("fitted state must be a dict")
        self.arrays, self.meta = arrays, meta

    def get(self, key: str, *default):
        if key in self.meta:
            return self.meta[key]
        if default:
            return default[0]
        raise ValueError(f"missing key {key!r}")

    @staticmethod
    def number(where: str, x) -> float:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
            raise ValueError(f"{where} must be a finite number, got {x!r}")
        return float(x)

    def positive(self, key: str, none: bool = False) -> float | None:
        x = self.get(key)
        if x is None and none:
            return None
        x = self.number(key, x)
        if not 0 < x <= MAX_ENERGY_SCALE:
            raise ValueError(f"{key} must be in (0, {MAX_ENERGY_SCALE:g}], got {x!r}")
        return x

    def integer(self, key: str, lo: int, hi: int) -> int:
        x = self.get(key)
        if isinstance(x, bool) or not isinstance(x, int) or not lo <= x <= hi:
            raise ValueError(f"{key} must be an integer in [{lo}, {hi}], got {x!r}")
        return x

    def array(self, name: str, shape, dtype, finite: bool = True) -> np.ndarray:
        if name not in self.arrays:
            raise ValueError(f"missing array {name!r}")
        a = self.arrays[name]
        if not isinstance(a, np.ndarray) or a.dtype != np.dtype(dtype):
            raise ValueError(f"array {name!r} must be {np.dtype(dtype)}")
        if shape is not None and a.shape != tuple(shape):
            raise ValueError(f"array {name!r} has shape {a.shape}, expected {tuple(shape)}")
        if finite and not np.all(np.isfinite(a)):
            raise ValueError(f"array {name!r} contains NaN or inf")
        return _frozen(a, dtype)


__all__ = ["FittedState", "baseline_from_dict", "baseline_to_dict", "copy_component",
           "descriptor_from_dict", "descriptor_to_dict", "jsonable", "unjson"]
