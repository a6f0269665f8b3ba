"""Model files: versioned NPZ + JSON header, no pickle. This module knows the file format only.

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

The JSON header::

    {"format": "kmlip-model", "format_version": 2, "kmlip_version": "...",
     "params": {estimator parameters from get_params(); descriptor as {"type", "params"},
                baseline as {"class": "module.Class", "data": baseline.to_dict()}},
     "fitted": {"species", "e0" {symbol: eV}, "delta", "sigma_energy", "sigma_force",
                "sigma_stress", "jitter", "zeta", "log_marginal_likelihood", "n_labels",
                "columns": [{"symbol", "Z", "offset", "count"}], "descriptor", "baseline",
                "factors": {class: {"n_rows", "log_scale_sum"}}, "factors_included", ...},
     "arrays": {name: {"shape", "dtype", "sha256"}},
     "header_sha256": sha256 of the canonical JSON of the other keys}

A sum of kernels, or a kernel whose environments are not atoms, stores ``"terms"`` in place of
``descriptor``/``zeta``/``columns``: a list of ``{"descriptor", "zeta" (null where it does not
apply), "columns": [{"name", "key", "offset", "count"}]}``, with arrays
``sparse_points__<t>__<name>`` and ``sparse_indices__<t>__<name>``, and ``delta`` a list (one
per term); such files are version 3.

Versioning: a reader refuses a ``format_version`` newer than it knows; version 1 files (no
``header_sha256``) still load. Version 2 added ``header_sha256`` (required from 2 on); version 3
added ``terms`` (single atom-centred models are still written as version 2).

For readers without NumPy (a C++ plugin), :func:`export_raw` writes the same content as a
directory: ``model.json`` (the header, each array entry with a ``file``, little-endian
``dtype`` ``"<f8"`` / ``"<i8"`` and C order) and one raw binary file per array.

Guarantees: :func:`write_model_file` writes exactly ``path`` through a temporary file in the
same directory and ``os.replace`` (a failed write never touches an existing file);
:func:`read_model_file` raises ``ValueError`` naming the file for anything unreadable: a
truncated or corrupted file (ZIP CRC, per-array SHA-256 and header digest checked; array sizes
checked against the archive before anything is allocated), a file that is not a kmlip model, or
one written by a newer format version.
"""
from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import tempfile
import zipfile
from collections.abc import Mapping

import numpy as np

FORMAT = "kmlip-model"
FORMAT_VERSION = 3
#: Version written for a model whose fitted state keeps the single-term layout of version 2
#: (``descriptor``/``zeta``/``columns``): readers that know version 2 still read such files.
SINGLE_TERM_VERSION = 2
#: dtypes an array of a model file may have
_DTYPES = ("<f8", "<i8", "|u1")
#: largest JSON header accepted (bytes)
_MAX_HEADER = 64 << 20


def _version() -> str:
    try:
        from kmlip import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "unknown"


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def header_digest(header: Mapping) -> str:
    """SHA-256 of the canonical JSON of a header without its ``header_sha256`` key."""
    body = {k: v for k, v in header.items() if k != "header_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def atomic_write(path, write, text: bool = False) -> None:
    """Calls ``write(fh)`` on a temporary file next to ``path``, then renames it over ``path``.

    A failed ``write`` leaves an existing ``path`` untouched and no temporary file behind.
    ``text=True`` hands ``write`` a UTF-8 text handle instead of a binary one.

    Raises
    ------
    TypeError
        ``path`` is not a str or path-like.
    ValueError
        ``path`` is a directory, or its directory does not exist (checked before anything is
        written; the message names ``path``, not the temporary file).
    PermissionError
        The directory is not writable (``filename`` is ``path``).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__} {path!r}")
    path = os.fspath(path)
    if not isinstance(path, str):
        path = os.fsdecode(path)
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory; give a file name")
    if not os.path.isdir(directory):
        raise ValueError(f"{path}: directory {directory} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                   dir=directory)
    except PermissionError as exc:
        raise PermissionError(exc.errno, f"cannot write to directory {directory} "
                                         f"({exc.strerror})", path) from None
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


def _complete_header(header: Mapping, arrays: Mapping[str, np.ndarray]) -> dict:
    fitted = header.get("fitted")
    version = FORMAT_VERSION if isinstance(fitted, Mapping) and "terms" in fitted \
        else SINGLE_TERM_VERSION
    meta = {"format": FORMAT, "format_version": version, "kmlip_version": _version(),
            **{k: v for k, v in header.items()
               if k not in ("format", "format_version", "arrays", "header_sha256")},
            "arrays": {k: {"shape": list(v.shape), "dtype": v.dtype.str, "sha256": _sha(v)}
                       for k, v in arrays.items()}}
    meta["header_sha256"] = header_digest(meta)
    return meta


def write_model_file(path, header: Mapping, arrays: Mapping[str, np.ndarray]) -> None:
    """Writes a model file to exactly ``path``, atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Destination (no suffix is added).
    header : mapping
        JSON-able ``{"params": ..., "fitted": ...}``; format keys and checksums are added.
    arrays : mapping of str to ndarray
        float64 / int64 arrays, stored C-contiguous.
    """
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    meta = _complete_header(header, arrays)
    blob = np.frombuffer(json.dumps(meta, allow_nan=True).encode("utf-8"), dtype=np.uint8)

    def write(fh):
        np.savez(fh, metadata=blob, **arrays)

    atomic_write(path, write)


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    """One .npy member, its declared size checked against the archive before reading it."""
    with zf.open(info) as fh:
        version = np.lib.format.read_magic(fh)
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise ValueError(f"unsupported npy version {version}")
        # the header is a small Python literal: parse it without numpy's own reader, which
        # accepts object dtypes and would allocate whatever shape it declares
        import struct

        hlen_size = 2 if version == (1, 0) else 4
        (hlen,) = struct.unpack("<H" if hlen_size == 2 else "<I", fh.read(hlen_size))
        if hlen > 1 << 16:
            raise ValueError("npy header too long")
        d = ast.literal_eval(fh.read(hlen).decode("latin1"))
        if not isinstance(d, dict) or set(d) != {"descr", "fortran_order", "shape"}:
            raise ValueError("malformed npy header")
        descr, shape = d["descr"], d["shape"]
        if descr not in _DTYPES or not isinstance(shape, tuple) \
                or not all(isinstance(s, int) and s >= 0 for s in shape) \
                or d["fortran_order"] is not False:
            raise ValueError(f"unexpected array type {descr!r} {shape!r}")
        dtype = np.dtype(descr)
        nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
        offset = 6 + 2 + hlen_size + hlen
        if offset + nbytes != info.file_size:
            raise ValueError("array size does not match the archive (truncated or corrupted)")
        data = fh.read(nbytes)
        if len(data) != nbytes:
            raise ValueError("array data truncated")
        return np.frombuffer(data, dtype=dtype).reshape(shape).copy()


def read_model_file(path) -> tuple[dict, dict[str, np.ndarray]]:
    """Reads and checks a model file.

    Returns
    -------
    header : dict
        The JSON header (format keys, ``params``, ``fitted``, ``arrays``).
    arrays : dict of str to ndarray

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Anything else that makes the file unreadable, naming the file and the cause.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model file {path!r} does not exist")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, not a kmlip model file")
    if not os.path.isfile(path):
        # a FIFO would block the open forever, a device such as /dev/zero never ends
        raise ValueError(f"{path}: not a regular file (a pipe or a device), not a kmlip model "
                         "file")
    try:
        with zipfile.ZipFile(path) as zf:
            infos = {i.filename: i for i in zf.infolist()}
            if "metadata.npy" not in infos:
                raise ValueError("not a kmlip model file (no metadata)")
            if infos["metadata.npy"].file_size > _MAX_HEADER:
                raise ValueError("header too large")
            blob = _read_member(zf, infos["metadata.npy"])
            meta = json.loads(blob.tobytes().decode("utf-8"))
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise ValueError("not a kmlip model file")
            version = meta.get("format_version")
            if isinstance(version, bool) or not isinstance(version, int) or version < 1:
                raise ValueError("model file has no valid format_version")
            if version > FORMAT_VERSION:
                raise ValueError(f"model file format_version {version} is newer than this "
                                 f"kmlip ({_version()}) supports ({FORMAT_VERSION}); upgrade "
                                 "kmlip to read it")
            if version >= 2 and meta.get("header_sha256") != header_digest(meta):
                raise ValueError("header does not match its checksum (corrupted or edited file)")
            listed = meta.get("arrays")
            if not isinstance(listed, dict):
                raise ValueError("header lists no arrays")
            arrays = {}
            for name, info in listed.items():
                member = infos.get(f"{name}.npy")
                if member is None:
                    raise ValueError(f"missing array {name!r} (truncated or corrupted)")
                a = _read_member(zf, member)
                if not isinstance(info, dict) or list(a.shape) != info.get("shape") \
                        or a.dtype.str != info.get("dtype") or _sha(a) != info.get("sha256"):
                    raise ValueError(f"array {name!r} does not match its checksum (corrupted "
                                     "file)")
                arrays[name] = a
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    except (MemoryError, RecursionError, Exception) as exc:  # noqa: BLE001
        # zipfile and the decoders raise many types for damaged input (BadZipFile,
        # NotImplementedError for an unknown compression, RuntimeError, EOFError, ...)
        raise ValueError(f"{path}: corrupted or truncated kmlip model file "
                         f"({type(exc).__name__}: {exc})") from exc
    return meta, arrays


def read_header(path) -> dict:
    """The JSON header of a model file (checked like :func:`read_model_file`)."""
    return read_model_file(path)[0]


def export_raw(directory, header: Mapping, arrays: Mapping[str, np.ndarray]) -> None:
    """Writes ``model.json`` plus one raw little-endian binary file per array into
    ``directory`` (created if needed), for readers without NumPy (see the module docstring)."""
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    meta = _complete_header(header, arrays)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"{os.fspath(directory)}: exists and is not a directory")
    os.makedirs(directory, exist_ok=True)
    for name, a in arrays.items():
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        fname = f"{name}.bin"
        atomic_write(os.path.join(directory, fname), lambda fh, a=a: fh.write(a.tobytes()))
        meta["arrays"][name].update(file=fname, dtype=a.dtype.str, order="C")
    meta["header_sha256"] = header_digest(meta)
    text = json.dumps(meta, indent=1, allow_nan=True).encode("utf-8")
    atomic_write(os.path.join(directory, "model.json"), lambda fh: fh.write(text))


__all__ = ["FORMAT_VERSION", "atomic_write", "export_raw", "header_digest", "read_header",
           "read_model_file", "write_model_file"]
