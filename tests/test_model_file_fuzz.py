"""Model files are untrusted input: mutated files give a ValueError or the original model."""
from __future__ import annotations

import hashlib
import io
import json
import zipfile

import numpy as np
import pytest
from conftest import cual_cells

from kmlip import io as kio
from kmlip.model import KernelPotential, load

BAD_VALUES = [float("nan"), float("inf"), float("-inf"), "x", [], {}, True, None, 2**64, -(2**64)]


@pytest.fixture(scope="module")
def small_model(d2b):
    frames = cual_cells(6, seed=7)
    return KernelPotential(d2b, n_sparse=6, sigma_stress=0.02, random_state=0,
                           n_threads=1).fit(frames)


@pytest.fixture(scope="module")
def probe():
    return cual_cells(2, seed=8, rattle=0.2)


def _snapshot(model, frames):
    out = []
    for a in frames:
        r = model.compute(a, ("energy", "energies", "forces", "stress", "energies_var"))
        out += [np.array([r.energy]), r.energies, r.forces, r.stress, r.energies_var]
    return out


def _outcome(path, reference, probe):
    """'error' for a ValueError, 'same' for a model predicting exactly as the original."""
    try:
        m = load(path)
    except ValueError:
        return "error"
    try:
        snap = _snapshot(m, probe)
    except ValueError:
        return "error"  # refused at prediction time with a clear message is also fine
    same = all(np.array_equal(a, b) for a, b in zip(snap, reference, strict=True))
    return "same" if same else "different"


def _read(path):
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    arrays = {n[:-4]: np.load(io.BytesIO(b), allow_pickle=False) for n, b in members.items()}
    meta = json.loads(arrays.pop("metadata").tobytes().decode())
    return meta, arrays


def _write(path, meta, arrays, digest=True):
    """Writes a model file with valid array checksums (and header digest if asked)."""
    for name, a in arrays.items():
        meta["arrays"][name] = {"shape": list(a.shape), "dtype": a.dtype.str,
                                "sha256": hashlib.sha256(a.tobytes()).hexdigest()}
    if digest:
        meta["header_sha256"] = kio.header_digest(meta)
    blob = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(path, "wb") as fh:
        np.savez(fh, metadata=blob, **arrays)


def _leaves(node, path=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(node, list) and node:
        for i, v in enumerate(node):
            yield from _leaves(v, path + (i,))
    else:
        yield path


def _set(node, path, value):
    for k in path[:-1]:
        node = node[k]
    if value is _DELETE and isinstance(node, dict):
        del node[path[-1]]
    else:
        node[path[-1]] = None if value is _DELETE else value


_DELETE = object()


def test_byte_mutations_give_value_error_or_the_original(small_model, probe, tmp_path):
    src = tmp_path / "m.kmlip"
    small_model.save(src)
    reference = _snapshot(load(src), probe)
    assert all(np.array_equal(a, b) for a, b in zip(reference, _snapshot(small_model, probe),
                                                    strict=True))
    data = src.read_bytes()
    rng = np.random.default_rng(0)
    dst = tmp_path / "x.kmlip"
    seen = {"error": 0, "same": 0}
    for trial in range(1500):
        buf = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            pos = int(rng.integers(len(buf)))
            kind = rng.integers(3)
            if kind == 0:
                buf[pos] ^= 1 << int(rng.integers(8))
            elif kind == 1:
                buf[pos] = int(rng.integers(256))
            else:
                del buf[pos:pos + int(rng.integers(1, 64))]
        dst.write_bytes(bytes(buf))
        out = _outcome(dst, reference, probe)
        assert out != "different", f"trial {trial}: a mutated file loaded as another model"
        seen[out] += 1
    assert seen["error"] > 1000  # almost every mutation is caught


def test_json_edits_without_a_new_digest_are_refused(small_model, tmp_path):
    src = tmp_path / "m.kmlip"
    small_model.save(src)
    meta, arrays = _read(src)
    meta["fitted"]["delta"] *= 1.5
    dst = tmp_path / "edited.kmlip"
    _write(dst, meta, arrays, digest=False)
    with pytest.raises(ValueError, match="checksum"):
        load(dst)


def test_invalid_json_values_with_valid_checksums_are_refused(small_model, probe, tmp_path):
    src = tmp_path / "m.kmlip"
    small_model.save(src)
    reference = _snapshot(load(src), probe)
    meta0, arrays0 = _read(src)
    leaves = [p for p in _leaves({k: v for k, v in meta0.items()
                                  if k not in ("arrays", "header_sha256")})]
    rng = np.random.default_rng(1)
    dst = tmp_path / "x.kmlip"
    for trial in range(400):
        meta, arrays = json.loads(json.dumps(meta0)), dict(arrays0)
        path = leaves[int(rng.integers(len(leaves)))]
        value = [*BAD_VALUES, _DELETE][int(rng.integers(len(BAD_VALUES) + 1))]
        _set(meta, path, value)
        _write(dst, meta, arrays)
        out = _outcome(dst, reference, probe)
        assert out != "different", f"trial {trial}: {path} = {value!r} loaded as another model"
    # array edits with valid checksums: shapes and values are checked against each other
    for name in arrays0:
        for bad in (arrays0[name][:-1], np.full_like(arrays0[name], np.nan)
                    if arrays0[name].dtype.kind == "f" else -arrays0[name] - 1):
            meta, arrays = json.loads(json.dumps(meta0)), dict(arrays0)
            arrays[name] = np.ascontiguousarray(bad)
            _write(dst, meta, arrays)
            assert _outcome(dst, reference, probe) != "different", name
