"""Model files: versioned NPZ + JSON metadata, no pickle.

Layout of a ``.kmlip`` file (what :meth:`KernelPotential.save` writes)
-----------------------------------------------------------------------
An uncompressed NumPy ``.npz`` archive (a ZIP of "stored" ``.npy`` members, readable with
``np.load(path, allow_pickle=False)`` or any ZIP + NPY reader) holding:

``metadata``
    uint8 array: UTF-8 JSON (below).
``alpha`` (M,) float64
    Weights of the full kernel: ``eps_i = delta^2 sum_m alpha_m (p_hat_i . s_hat_m)^zeta``
    over the columns m of the centre's species.
``R`` (M, M) float64, upper triangular
    ``R^T R = K_MM + K_MN Lambda^-1 K_NM`` (posterior precision in the sparse basis).
``L_hat`` (M, M) float64, lower triangular
    Cholesky factor of the *unit* ``K_hat_MM + jitter I`` (``K_MM = delta^2 L_hat L_hat^T``).
``sparse_points__<Symbol>`` (M_z, F) float64
    Raw (unnormalised) descriptor vectors of the sparse points of centre species ``Symbol``;
    columns of alpha / R / L_hat are these blocks in the order of ``metadata.fitted.columns``.
``sparse_indices__<Symbol>`` (M_z, 2) int64, optional
    (training frame, atom) of each sparse point.
``factor__<class>`` (k, M+1) float64, optional
    Streaming-QR factors of the label classes (for online updates and hyperparameter
    optimisation after loading).

The JSON metadata::

    {"format": "kmlip-model", "format_version": 1, "kmlip_version": "...",
     "params": {constructor arguments; descriptor as {"type", "params"}, baseline as
                {"class": "module.Class", "data": baseline.to_dict()}},
     "fitted": {"species", "e0" {symbol: eV}, "delta", "sigma_energy", "sigma_force",
                "sigma_stress", "jitter", "zeta", "log_marginal_likelihood", "n_labels",
                "columns": [{"symbol", "Z", "offset", "count"}], "descriptor", "baseline",
                "factors": {class: {"n_rows", "log_scale_sum"}}, ...},
     "arrays": {name: {"shape", "dtype", "sha256"}}}

Prediction needs only ``metadata`` (descriptor, zeta, delta, e0, columns), ``alpha`` and the
sparse points; variances also ``R`` and ``L_hat``.

For readers without NumPy (a C++ plugin), :func:`export_raw` writes the same content as a
directory: ``model.json`` (the metadata, each array entry with a ``file``, little-endian
``dtype`` ``"<f8"`` / ``"<i8"`` and C order) and one raw binary file per array.

Guarantees: :func:`save_model` writes exactly ``path`` through a temporary file in the same
directory and ``os.replace`` (a failed write never touches an existing file); :func:`load`
raises ``ValueError`` for a truncated or corrupted file (ZIP CRC and per-array SHA-256 checked),
a file that is not a kmlip model, or one written by a newer format version; a loaded model
predicts bit-identically.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from importlib import import_module
from typing import Any

import numpy as np

FORMAT = "kmlip-model"
FORMAT_VERSION = 1
_PARAMS_JSON = ("zeta", "delta", "n_sparse", "sigma_energy", "sigma_force", "sigma_stress",
                "energy_key", "forces_key", "stress_key", "e0", "jitter", "block_size",
                "n_threads", "random_state", "verbose", "progress", "precision")


def _version() -> str:
    try:
        from kmlip import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


def _jsonable(v: Any) -> Any:
    """Plain-JSON form of a parameter value; arrays become {"__ndarray__": ..., "dtype": ...}."""
    if isinstance(v, np.ndarray):
        return {"__ndarray__": v.tolist(), "dtype": str(v.dtype)}
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"cannot store a parameter of type {type(v).__name__} in a model file")


def _unjson(v: Any) -> Any:
    if isinstance(v, dict):
        if "__ndarray__" in v:
            return np.asarray(v["__ndarray__"], dtype=v["dtype"])
        return {k: _unjson(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_unjson(x) for x in v]
    return v


def _baseline_dict(b) -> dict | None:
    if b is None:
        return None
    if not hasattr(b, "to_dict"):
        raise TypeError(f"baseline {type(b).__name__} has no to_dict(); cannot save it")
    cls = type(b)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "data": _jsonable(b.to_dict())}


def _baseline_from(d: dict | None, trusted_modules: tuple[str, ...]):
    if d is None:
        return None
    path = d.get("class", "")
    module, _, name = path.rpartition(".")
    if not any(module == m or module.startswith(m + ".") for m in trusted_modules):
        raise ValueError(f"model file names baseline class {path!r} outside the trusted "
                         f"modules {trusted_modules}; pass trusted_modules to load() to allow it")
    try:
        cls = getattr(import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import baseline class {path!r}") from exc
    return cls.from_dict(_unjson(d["data"]))


def _descriptor_from(d: dict):
    from kmlip.descriptors.base import Descriptor

    return Descriptor.from_dict(d)


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _model_arrays(model, include_factors: bool) -> tuple[dict, dict]:
    """(arrays, metadata) describing a fitted model."""
    model._check_fitted()
    arrays: dict[str, np.ndarray] = {"alpha": model.alpha_, "R": model.R_, "L_hat": model.L_hat_}
    columns = []
    basis = model.basis_
    from ase.data import chemical_symbols

    for z in basis.species_z:
        s = chemical_symbols[z]
        arrays[f"sparse_points__{s}"] = basis.points[z]
        columns.append({"symbol": s, "Z": int(z), "offset": int(basis.offsets[z]),
                        "count": int(basis.points[z].shape[0])})
        if model.sparse_indices_ is not None and s in model.sparse_indices_:
            arrays[f"sparse_indices__{s}"] = np.asarray(model.sparse_indices_[s], dtype=np.int64)
    factors = {}
    for cls, f in model.factors_.items():
        factors[cls] = {"n_rows": int(f.n_rows), "log_scale_sum": float(f.log_scale_sum)}
        if include_factors:
            arrays[f"factor__{cls}"] = f.T
    params = {k: _jsonable(getattr(model, k)) for k in _PARAMS_JSON}
    sm = model.sparse_method
    params["sparse_method"] = _jsonable(sm)
    params["descriptor"] = _jsonable(model.descriptor.to_dict())
    params["baseline"] = _baseline_dict(model.baseline)
    fitted = {
        "species": list(model.species_), "e0": dict(model.e0_), "delta": model.delta_,
        "sigma_energy": model.sigma_energy_, "sigma_force": model.sigma_force_,
        "sigma_stress": model.sigma_stress_, "jitter": model.jitter_, "zeta": basis.zeta,
        "log_marginal_likelihood": model.log_marginal_likelihood_,
        "n_labels": dict(model.n_labels_), "columns": columns,
        "descriptor": _jsonable(model.descriptor_.to_dict()),
        "baseline": _baseline_dict(model.baseline_), "factors": factors,
        "factors_included": bool(include_factors),
        "optimization": _jsonable(getattr(model, "optimization_", None)),
        "fit_timings": _jsonable(getattr(model, "fit_timings_", {})),
    }
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "kmlip_version": _version(),
            "params": params, "fitted": fitted,
            "arrays": {k: {"shape": list(v.shape), "dtype": v.dtype.str, "sha256": _sha(v)}
                       for k, v in arrays.items()}}
    return arrays, meta


def atomic_write(path: str, write, text: bool = False) -> None:
    """Calls ``write(fh)`` on a temporary file next to ``path``, then renames it over ``path``.

    A failed ``write`` leaves an existing ``path`` untouched and no temporary file behind.
    ``text=True`` hands ``write`` a UTF-8 text handle instead of a binary one.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            if text:
                wrapper = io.TextIOWrapper(fh, encoding="utf-8")
                write(wrapper)
                wrapper.flush()
                wrapper.detach()
            else:
                write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def save_model(model, path, include_factors: bool = True) -> None:
    """Writes a fitted :class:`~kmlip.model.KernelPotential` to exactly ``path``, atomically.

    Parameters
    ----------
    model : KernelPotential
    path : str or os.PathLike
        Destination (no suffix is added).
    include_factors : bool
        Also store the per-class QR factors (online updates after loading).
    """
    arrays, meta = _model_arrays(model, include_factors)
    blob = np.frombuffer(json.dumps(meta, allow_nan=True).encode("utf-8"), dtype=np.uint8)

    def write(fh):
        np.savez(fh, metadata=blob, **arrays)

    atomic_write(path, write)


def _read(path) -> tuple[dict, dict]:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            names = list(z.files)
            if "metadata" not in names:
                raise ValueError(f"{path}: not a kmlip model file (no metadata)")
            meta = json.loads(bytes(z["metadata"]).decode("utf-8"))
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise ValueError(f"{path}: not a kmlip model file")
            version = meta.get("format_version")
            if not isinstance(version, int):
                raise ValueError(f"{path}: model file has no valid format_version")
            if version > FORMAT_VERSION:
                raise ValueError(f"{path}: model file format_version {version} is newer than "
                                 f"this kmlip ({_version()}) supports ({FORMAT_VERSION}); "
                                 "upgrade kmlip to read it")
            arrays = {}
            for name, info in meta.get("arrays", {}).items():
                if name not in names:
                    raise ValueError(f"{path}: model file is missing array {name!r} "
                                     "(truncated or corrupted)")
                a = z[name]
                if list(a.shape) != info["shape"] or a.dtype.str != info["dtype"] \
                        or _sha(a) != info["sha256"]:
                    raise ValueError(f"{path}: array {name!r} does not match its checksum "
                                     "(corrupted file)")
                arrays[name] = a
    except ValueError as exc:
        if str(exc).startswith(f"{path}:"):
            raise
        raise ValueError(f"{path}: corrupted or truncated kmlip model file ({exc})") from exc
    except (zipfile.BadZipFile, OSError, EOFError, KeyError, UnicodeDecodeError,
            json.JSONDecodeError, zipfile.LargeZipFile) as exc:
        raise ValueError(f"{path}: corrupted or truncated kmlip model file "
                         f"({type(exc).__name__}: {exc})") from exc
    return meta, arrays


def load(path, trusted_modules: tuple[str, ...] = ("kmlip",)):
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
    ValueError
        Truncated / corrupted file, not a kmlip model, or a newer format version.
    """
    from kmlip.gp.sparse import ClassFactor
    from kmlip.kernels import SparseBasis
    from kmlip.model import KernelPotential

    meta, arrays = _read(path)
    try:
        params = {k: _unjson(v) for k, v in meta["params"].items()}
        params["descriptor"] = _descriptor_from(meta["params"]["descriptor"])
        params["baseline"] = _baseline_from(meta["params"]["baseline"], trusted_modules)
        f = meta["fitted"]
        model = KernelPotential(**params)
        model.descriptor_ = _descriptor_from(f["descriptor"])
        model.baseline_ = _baseline_from(f["baseline"], trusted_modules)
        points, indices = {}, {}
        for col in f["columns"]:
            points[int(col["Z"])] = arrays[f"sparse_points__{col['symbol']}"]
            key = f"sparse_indices__{col['symbol']}"
            if key in arrays:
                indices[col["symbol"]] = arrays[key]
        order = [int(c["Z"]) for c in f["columns"]]
        model.basis_ = SparseBasis(points, int(f["zeta"]), species_z=order)
        for col in f["columns"]:
            if model.basis_.offsets[int(col["Z"])] != col["offset"]:
                raise ValueError("column layout mismatch")
        from ase.data import chemical_symbols

        model.sparse_points_ = {chemical_symbols[z]: model.basis_.points[z]
                                for z in model.basis_.species_z}
        model.sparse_indices_ = indices or None
        model.species_ = list(f["species"])
        model.e0_ = {k: float(v) for k, v in f["e0"].items()}
        model.delta_ = float(f["delta"])
        for name in ("sigma_energy", "sigma_force", "sigma_stress"):
            v = f[name]
            setattr(model, name + "_", None if v is None else float(v))
        model.jitter_ = float(f["jitter"])
        model.log_marginal_likelihood_ = float(f["log_marginal_likelihood"])
        model.n_labels_ = {k: int(v) for k, v in f["n_labels"].items()}
        M = model.basis_.n_sparse
        model.alpha_ = np.ascontiguousarray(arrays["alpha"])
        model.R_ = np.ascontiguousarray(arrays["R"])
        model.L_hat_ = np.ascontiguousarray(arrays["L_hat"])
        if model.alpha_.shape != (M,) or model.R_.shape != (M, M) \
                or model.L_hat_.shape != (M, M):
            raise ValueError("array shapes do not match the number of sparse points")
        factors = {}
        if f.get("factors_included"):
            for cls, info in f["factors"].items():
                factors[cls] = ClassFactor(np.ascontiguousarray(arrays[f"factor__{cls}"]),
                                           int(info["n_rows"]), float(info["log_scale_sum"]))
        model.factors_ = factors
        model.optimization_ = _unjson(f.get("optimization"))
        model.fit_timings_ = _unjson(f.get("fit_timings", {}))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{os.fspath(path)}: inconsistent kmlip model file ({exc})") from exc
    return model


def export_raw(model, directory) -> None:
    """Writes ``model.json`` plus one raw little-endian binary file per array into
    ``directory`` (created if needed), for readers without NumPy (see the module docstring)."""
    arrays, meta = _model_arrays(model, include_factors=False)
    os.makedirs(directory, exist_ok=True)
    for name, a in arrays.items():
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        fname = f"{name}.bin"
        atomic_write(os.path.join(directory, fname), lambda fh, a=a: fh.write(a.tobytes()))
        meta["arrays"][name].update(file=fname, dtype=a.dtype.str, order="C")
    text = json.dumps(meta, indent=1, allow_nan=True).encode("utf-8")
    atomic_write(os.path.join(directory, "model.json"), lambda fh: fh.write(text))


def loads_metadata(path) -> dict:
    """The JSON metadata of a model file (validated like :func:`load`)."""
    return _read(path)[0]


__all__ = ["FORMAT_VERSION", "export_raw", "load", "loads_metadata", "save_model"]
