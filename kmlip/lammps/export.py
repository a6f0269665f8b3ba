"""Export of a fitted model for the LAMMPS pair style (a file that C++ reads without NumPy).

Why an export and not the ``.kmlip`` file itself: the SOAP tables (GTO exponents and the Löwdin
orthonormaliser ``S^-1/2`` of each l) come from a symmetric eigendecomposition whose overlap
matrix has a condition number of 1e7-1e12; recomputing them in C++ would change the features in
the 8th digit. The export carries the very tables the Python descriptor uses, so LAMMPS and
:class:`~kmlip.calculator.KMLIPCalculator` agree to rounding (~1e-13 relative).

File layout (``format_version`` 1), all little-endian::

    b"KMLIP-LAMMPS\\n"                     13 bytes of magic
    header length n (ASCII decimal) + b"\\n"
    n bytes of UTF-8 JSON (below), then zero padding to a multiple of 8 bytes
    the arrays, each at its "offset" (bytes from the start of the array section), C order

JSON header::

    {"format": "kmlip-lammps", "format_version": 1, "kmlip_version", "model_sha256",
     "descriptor": {"type": "SOAP", "n_max", "l_max", "n_species", "n_features", "cutoff",
                    "cutoff_width", "center_weight", "normalize", "compression",
                    "species_z": [Z, ...] (descriptor species order)},
     "zeta", "delta", "e0": {symbol: eV}, "species": [symbols the model predicts],
     "columns": [{"symbol", "Z", "offset", "count"}],
     "baseline": null | {"type": "Ewald", "charges": {symbol: e} | null, "accuracy"},
     "calibration": {"measure", "scale", "floor"},
     "arrays": {name: {"dtype": "<f8" | "<i8", "shape", "offset", "nbytes"}}}

Arrays: ``soap_A`` (l_max+1, n_max), ``soap_B`` (l_max+1, n_max, n_max), ``soap_feat_index``
(int64) and ``soap_feat_scale`` (the descriptor's packing tables), ``soap_ylm_norm``
((l_max+1)^2), ``points_hat`` (M, F) normalised sparse points in column order, ``alpha`` (M,),
and per column block z (square (M_z, M_z), concatenated in column order, M_z^2 doubles each):
``novelty_factor`` ``W_z = L_hat_zz^-1`` and ``variance_factor`` ``H_z`` (lower triangular,
``H_z^T H_z = Q_z``; see :class:`kmlip.gp.sparse.PosteriorVariance`). For an atom of species z
with unit kernel row ``k`` (``k_m = (p_hat . s_hat_m)^zeta``) and ``k** = 1`` (0 for an empty
environment)::

    energies_var = delta^2 (k** - |H_z k|^2),   novelty = delta^2 (k** - |W_z k|^2),
    uncertainty  = sqrt(floor^2 + scale^2 * measure)          (measure: one of the two)

Memory: ``8 (M F + 2 sum_z M_z^2)`` bytes per rank, plus the small SOAP tables.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
from ase.data import chemical_symbols

FORMAT = "kmlip-lammps"
FORMAT_VERSION = 1
MAGIC = b"KMLIP-LAMMPS\n"


def _fitted_state(model):
    """The fitted state of a KernelPotential, or of the model file at ``model`` (a path)."""
    if isinstance(model, (str, os.PathLike)):
        from kmlip.model import load

        model = load(model)
    state = getattr(model, "fitted_state_", None)
    if state is None:
        raise ValueError("the model is not fitted (no fitted_state_): fit or load it first")
    return state


def _single_soap(state):
    """The state's one SOAP descriptor; ValueError for any other kind of model."""
    from kmlip.descriptors.soap import SOAP

    kernel = getattr(state, "kernel", None)  # a sum of kernels: one term per descriptor
    terms = getattr(kernel, "terms", None)
    if terms is not None and len(terms) != 1:
        raise ValueError(f"the LAMMPS pair style supports models with a single SOAP kernel; "
                         f"this model is a sum of {len(terms)} kernels")
    desc = getattr(state, "descriptor", None)
    if not isinstance(desc, SOAP):
        raise ValueError("the LAMMPS pair style supports models with a single SOAP kernel; this "
                         f"model's descriptor is {type(desc).__name__}")
    return desc


def variance_factors(L_hat: np.ndarray, R: np.ndarray, delta: float,
                     blocks: list[slice]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-block factors of the local-energy variance and novelty.

    Parameters
    ----------
    L_hat : ndarray, shape (M, M)
        Lower Cholesky factor of the unit ``K_hat_MM + jitter I`` (block diagonal).
    R : ndarray, shape (M, M)
        Upper triangular, ``R^T R = K_MM + K_MN Lambda^-1 K_NM`` (full kernel units).
    delta : float
        Kernel scale, eV.
    blocks : list of slice
        Column block of each species, in column order.

    Returns
    -------
    H : list of ndarray (M_z, M_z)
        Lower triangular, ``H^T H = Q_z = W^T W - delta^2 Sigma_zz`` (Sigma = (R^T R)^-1), so
        that ``delta^2 (1 - |H k|^2)`` is the posterior variance of a local energy; built as in
        :class:`kmlip.gp.sparse.PosteriorVariance` (no squaring of ill-conditioned matrices).
    W : list of ndarray (M_z, M_z)
        ``L_hat_zz^-1`` (lower), for the novelty ``delta^2 (1 - |W k|^2)``.
    """
    from kmlip.gp.sparse import _triangular_inverse, block_variance_factors

    Rinv = _triangular_inverse(R, lower=False)
    Hs, Ws = [], []
    for sl in blocks:
        H, W = block_variance_factors(L_hat, Rinv, delta, sl)
        Hs.append(H)
        Ws.append(W)
    return Hs, Ws


def lammps_arrays(model) -> tuple[dict, dict[str, np.ndarray]]:
    """The JSON header (without ``arrays``) and the arrays of the export of ``model``.

    Parameters
    ----------
    model : KernelPotential or str or os.PathLike
        A fitted model, or the path of a model file.

    Raises
    ------
    ValueError
        The model is not fitted, is not a single-SOAP model, or has a baseline other than
        :class:`kmlip.ewald.Ewald`.
    """
    from kmlip.ewald import Ewald

    state = _fitted_state(model)
    desc = _single_soap(state)
    basis = state.basis
    baseline = state.baseline
    if baseline is not None and not isinstance(baseline, Ewald):
        raise ValueError(f"the LAMMPS pair style supports no baseline or the Ewald baseline "
                         f"(run with coul/long + kspace); this model has "
                         f"{type(baseline).__name__}")
    F = int(desc.n_features)
    columns, blocks, hats = [], [], []
    for z in basis.species_z:
        sl = basis.columns(z)
        columns.append({"symbol": chemical_symbols[z], "Z": int(z), "offset": int(sl.start),
                        "count": int(sl.stop - sl.start)})
        blocks.append(sl)
        hats.append(np.asarray(basis.points_hat[z], dtype=np.float64).reshape(-1, F))
    M = int(basis.n_sparse)
    delta = state.hyper.delta
    delta = float(delta[0] if isinstance(delta, (tuple, list)) else delta)
    L_hat = np.asarray(state.L_hat, dtype=np.float64)
    R = np.asarray(state.R, dtype=np.float64)
    if M:
        Hs, Ws = variance_factors(L_hat, R, delta, blocks)
    else:
        Hs, Ws = [], []
    cal = state.uncertainty_map
    header = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "kmlip_version": _version(),
        "descriptor": {
            "type": "SOAP", "n_max": int(desc.n_max), "l_max": int(desc.l_max),
            "n_species": len(desc.species_z), "n_features": F,
            "cutoff": float(desc.cutoff), "cutoff_width": float(desc._width),
            "center_weight": float(desc.center_weight), "normalize": bool(desc.normalize),
            "compression": str(desc.compression),
            "species_z": [int(z) for z in desc.species_z]},
        "zeta": int(basis.zeta), "delta": delta,
        "e0": {str(s): float(v) for s, v in state.e0.items()},
        "species": [str(s) for s in state.species],
        "columns": columns,
        "baseline": None if baseline is None else {
            "type": "Ewald", "charges": baseline.charges,
            "accuracy": float(baseline.accuracy)},
        "calibration": {"measure": cal.measure, "scale": float(cal.scale),
                        "floor": float(cal.floor)},
    }
    empty = np.zeros(0)
    arrays = {
        "soap_A": desc._A, "soap_B": desc._B,
        "soap_feat_index": np.asarray(desc._feat_index, dtype=np.int64),
        "soap_feat_scale": desc._feat_scale, "soap_ylm_norm": desc._ylm_norm,
        "points_hat": np.concatenate(hats, axis=0) if hats else np.zeros((0, F)),
        "alpha": np.asarray(state.alpha, dtype=np.float64),
        "variance_factor": np.concatenate([h.ravel() for h in Hs]) if Hs else empty,
        "novelty_factor": np.concatenate([w.ravel() for w in Ws]) if Ws else empty,
    }
    if arrays["alpha"].shape != (M,) or arrays["points_hat"].shape != (M, F):
        raise ValueError("inconsistent fitted state: alpha / sparse points do not match M")
    return header, {k: np.ascontiguousarray(v) for k, v in arrays.items()}


def _version() -> str:
    try:
        from kmlip import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


def export_lammps(model, path) -> str:
    """Writes the LAMMPS export of ``model`` to exactly ``path`` (atomically).

    Parameters
    ----------
    model : KernelPotential or str or os.PathLike
        A fitted single-SOAP model, or the path of its model file.
    path : str or os.PathLike
        Destination, read by ``pair_coeff * * <path> <element per type>``.

    Returns
    -------
    str
        The absolute path written.
    """
    from kmlip.io import atomic_write

    header, arrays = lammps_arrays(model)
    entries, offset = {}, 0
    for name, a in arrays.items():
        a = a.astype(a.dtype.newbyteorder("<"), copy=False)
        arrays[name] = a
        entries[name] = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": offset,
                         "nbytes": int(a.nbytes)}
        offset += int(math.ceil(a.nbytes / 8) * 8)
    header["arrays"] = entries
    text = json.dumps(header, allow_nan=False).encode("utf-8")
    pad = (-(len(MAGIC) + len(str(len(text))) + 1 + len(text))) % 8

    def write(fh):
        fh.write(MAGIC)
        fh.write(f"{len(text)}\n".encode("ascii"))
        fh.write(text)
        fh.write(b"\0" * pad)
        for a in arrays.values():
            fh.write(a.tobytes())
            fh.write(b"\0" * ((-a.nbytes) % 8))

    atomic_write(path, write)
    return os.path.abspath(os.fspath(path))


def read_lammps_header(path) -> dict:
    """The JSON header of an export (for inspection and tests)."""
    with open(path, "rb") as fh:
        if fh.read(len(MAGIC)) != MAGIC:
            raise ValueError(f"{path}: not a kmlip LAMMPS export")
        n = int(fh.readline().decode("ascii"))
        return json.loads(fh.read(n).decode("utf-8"))


__all__ = ["FORMAT_VERSION", "export_lammps", "lammps_arrays", "read_lammps_header",
           "variance_factors"]


def _main(argv: list[str] | None = None) -> int:
    """``python -m kmlip.lammps.export MODEL.kmlip OUT``: what the plugin runs when
    ``pair_coeff`` is given a model file rather than its export."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m kmlip.lammps.export MODEL.kmlip OUT", file=sys.stderr)
        return 2
    try:
        export_lammps(args[0], args[1])
    except (ValueError, TypeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_main())
