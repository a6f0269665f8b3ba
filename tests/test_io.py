"""Model files: bit-identical round trip, corruption / truncation / version errors, atomicity."""
from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest
from sklearn.exceptions import NotFittedError

from kmlip import io as kio
from kmlip.model import KernelPotential, load


def _predictions(model, frames):
    E, std = model.predict(frames, return_std=True)
    F = model.predict_forces(frames)
    S = model.predict_stress(frames)
    loc, var = model.predict_local_energies(frames[0], return_var=True)
    return [E, std, *F, S, loc, var]


def test_round_trip_is_bit_identical(fitted, test_frames, tmp_path):
    path = tmp_path / "model.kmlip"
    fitted.save(path)
    assert os.listdir(tmp_path) == ["model.kmlip"]  # exactly that path, no temp files left
    loaded = load(path)
    for a, b in zip(_predictions(fitted, test_frames[:3]), _predictions(loaded, test_frames[:3]),
                    strict=True):
        assert np.array_equal(a, b)
    assert loaded.get_params(deep=False)["n_sparse"] == fitted.n_sparse
    assert loaded.descriptor.get_params() == fitted.descriptor.get_params()
    assert loaded.e0_ == fitted.e0_ and loaded.species_ == fitted.species_
    assert loaded.log_marginal_likelihood_ == fitted.log_marginal_likelihood_
    # plain numpy can read it without pickle
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(bytes(z["metadata"]).decode())
        assert meta["format_version"] == kio.SINGLE_TERM_VERSION  # one atom-centred term
        assert np.array_equal(z["alpha"], fitted.alpha_)


def test_loaded_model_supports_online_update_and_optimisation(fitted, train_frames, tmp_path):
    path = tmp_path / "m.kmlip"
    fitted.save(path)
    loaded = load(path)
    assert loaded.log_marginal_likelihood() == pytest.approx(fitted.log_marginal_likelihood_)
    loaded.partial_fit(train_frames[:2])
    assert loaded.n_labels_["forces"] > fitted.n_labels_["forces"]


def test_round_trip_with_soap_and_explicit_sparse_points(train_frames, tmp_path):
    from conftest import soap_or_skip

    soap = soap_or_skip()
    m = KernelPotential(soap, n_sparse=10, sigma_stress=0.02, random_state=0,
                        n_threads=1).fit(train_frames[:5])
    m2 = KernelPotential(soap, sparse_method=dict(m.sparse_points_), n_threads=1)
    m2.fit(train_frames[:5])
    for model in (m, m2):
        path = tmp_path / "s.kmlip"
        model.save(path)
        loaded = load(path)
        assert np.array_equal(loaded.predict(train_frames[5:7]), model.predict(train_frames[5:7]))
        assert isinstance(loaded.sparse_method, type(model.sparse_method))


def test_truncated_and_corrupted_files_raise_value_error(fitted, tmp_path):
    path = tmp_path / "model.kmlip"
    fitted.save(path)
    data = path.read_bytes()
    trunc = tmp_path / "trunc.kmlip"
    for cut in (10, len(data) // 2, len(data) - 30):
        trunc.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="corrupted or truncated|not a kmlip"):
            load(trunc)
    # flip bytes inside the stored alpha array
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("alpha.npy")
    off = info.header_offset + 30 + len(info.filename) + len(info.extra) + 200
    bad = bytearray(data)
    bad[off:off + 8] = b"\xff" * 8
    corrupt = tmp_path / "corrupt.kmlip"
    corrupt.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="corrupt"):
        load(corrupt)
    junk = tmp_path / "junk.kmlip"
    junk.write_text("hello")
    with pytest.raises(ValueError):
        load(junk)
    other = tmp_path / "other.npz"
    np.savez(other, x=np.zeros(3))
    with pytest.raises(ValueError, match="not a kmlip"):
        load(other)


def _rewrite_metadata(src, dst, edit):
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    meta = json.loads(bytes(arrays.pop("metadata")).decode())
    edit(meta)
    if "header_sha256" in meta:
        meta["header_sha256"] = kio.header_digest(meta)  # an edit that keeps the file valid
    blob = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    with open(dst, "wb") as fh:
        np.savez(fh, metadata=blob, **arrays)


def test_newer_format_version_is_refused(fitted, tmp_path):
    path = tmp_path / "model.kmlip"
    fitted.save(path)
    newer = tmp_path / "newer.kmlip"
    _rewrite_metadata(path, newer, lambda m: m.update(format_version=kio.FORMAT_VERSION + 1))
    with pytest.raises(ValueError, match="newer"):
        load(newer)


def test_untrusted_baseline_class_is_refused(fitted, tmp_path):
    path = tmp_path / "model.kmlip"
    fitted.save(path)
    evil = tmp_path / "evil.kmlip"

    def edit(m):
        m["params"]["baseline"] = {"class": "os.system", "data": {}}

    _rewrite_metadata(path, evil, edit)
    with pytest.raises(ValueError, match="outside the trusted modules"):
        load(evil)


def test_version_1_files_still_load(fitted, test_frames, tmp_path):
    path = tmp_path / "model.kmlip"
    fitted.save(path)
    old = tmp_path / "v1.kmlip"

    def as_v1(m):
        m["format_version"] = 1
        del m["header_sha256"]

    _rewrite_metadata(path, old, as_v1)
    loaded = load(old)
    assert np.array_equal(loaded.predict(test_frames[:2]), fitted.predict(test_frames[:2]))


def test_failed_write_keeps_the_existing_file(fitted, tmp_path, monkeypatch):
    path = tmp_path / "model.kmlip"
    fitted.save(path)
    before = path.read_bytes()

    def boom(fh, **arrays):
        fh.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(kio.np, "savez", boom)
    with pytest.raises(OSError, match="disk full"):
        fitted.save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.kmlip"]


def test_export_raw_for_cpp_readers(fitted, tmp_path):
    fitted.export_raw(tmp_path / "raw")
    meta = json.loads((tmp_path / "raw" / "model.json").read_text())
    info = meta["arrays"]["alpha"]
    alpha = np.fromfile(tmp_path / "raw" / info["file"], dtype=info["dtype"])
    assert np.array_equal(alpha.reshape(info["shape"]), fitted.alpha_)
    col = meta["fitted"]["columns"][0]
    info = meta["arrays"][f"sparse_points__{col['symbol']}"]
    pts = np.fromfile(tmp_path / "raw" / info["file"], dtype=info["dtype"]).reshape(info["shape"])
    assert np.array_equal(pts, fitted.sparse_points_[col["symbol"]])


def test_save_unfitted_model_raises(d2b, tmp_path):
    with pytest.raises(NotFittedError):
        KernelPotential(d2b).save(tmp_path / "x.kmlip")
    assert not os.listdir(tmp_path)
