"""``kmlip fit``: label classes switched off with ``--sigma-* none`` (energy-only data), and the
local Dask cluster of ``--workers`` on a free HTTP port."""
from __future__ import annotations

import socket

import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write

from kmlip import load
from kmlip.cli.fit import noise_level
from kmlip.cli.main import build_parser, main
from kmlip.datasets import emt_frames

SOAP_ARGS = ["--r-cut", "4.0", "--n-max", "3", "--l-max", "2", "--n-sparse", "10",
             "--threads", "1"]


def _energy_only(frames):
    """Copies of ``frames`` that carry their total energy and nothing else."""
    out = []
    for a in frames:
        b = a.copy()
        b.calc = SinglePointCalculator(b, energy=a.get_potential_energy())
        out.append(b)
    return out


@pytest.fixture(scope="module")
def labelled():
    # 4-atom cells of two lattice constants: distinct energies, few environments
    return emt_frames(12, repeat=(1, 1, 1), seed=5) + emt_frames(4, repeat=(1, 1, 1),
                                                                  a=3.7, seed=6)


def test_noise_level_values():
    assert noise_level("0.01") == 0.01
    assert noise_level("none") is None and noise_level(" None ") is None
    import argparse

    for bad in ("0", "-0.1", "nan", "inf", "abc", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="positive number or 'none'"):
            noise_level(bad)
    args = build_parser().parse_args(["fit", "t.xyz", "-o", "m.kmlip", "--sigma-force", "none",
                                      "--sigma-energy", "NONE", "--sigma-stress", "0.5"])
    assert (args.sigma_energy, args.sigma_force, args.sigma_stress) == (None, None, 0.5)


def test_energy_only_fit(labelled, tmp_path, capsys):
    """A file without forces fits with ``--sigma-force none`` and matches the same fit in
    Python; with forces in use it fails with the file, frame and missing label named."""
    from kmlip import SOAP, KernelPotential

    train = tmp_path / "energies.xyz"
    frames = _energy_only(labelled)
    write(train, frames, format="extxyz")
    out = tmp_path / "e.kmlip"
    assert main(["fit", str(train), "-o", str(out), *SOAP_ARGS, "--sigma-force", "none"]) == 0
    printed = capsys.readouterr().out
    assert "energy_mae" in printed and "force" not in printed
    m = load(out)
    assert m.sigma_force_ is None and m.sigma_energy_ == 0.002
    ref = KernelPotential(SOAP(["Cu"], r_cut=4.0, n_max=3, l_max=2, sigma=0.5), zeta=4,
                          delta=0.2, n_sparse=10, sparse_method="cur", sigma_energy=0.002,
                          sigma_force=None, sigma_stress=None, random_state=0,
                          n_threads=1).fit(read(train, ":"))
    test = emt_frames(2, repeat=(1, 1, 1), seed=7)
    np.testing.assert_allclose(m.predict(test), ref.predict(test), rtol=1e-10)
    # energies were learnt: the fit is far better than the mean energy per atom
    e = np.array([a.get_potential_energy() for a in labelled])
    assert np.mean(np.abs(m.predict(labelled) - e)) < 0.2 * np.mean(np.abs(e - e.mean()))

    # forces in use (the default) on that file: the existing error, one line, no model
    never = tmp_path / "never.kmlip"
    assert main(["fit", str(train), "-o", str(never), *SOAP_ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"kmlip fit: error: {train}: frame 0: no forces label 'forces' "
                   "(atoms.arrays or calculator results)")
    assert not never.exists()
    # no label class left: the model's error, one line
    assert main(["fit", str(train), "-o", str(never), *SOAP_ARGS, "--sigma-force", "none",
                 "--sigma-energy", "none"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kmlip fit: error:") and "sigma_energy" in err and "\n" not in err
    assert not never.exists()
    # a bad value: argparse's usage error naming the option
    assert main(["fit", str(train), "-o", str(never), "--sigma-force", "off"]) == 2
    assert "--sigma-force: expected a positive number or 'none', got 'off'" in \
        capsys.readouterr().err


def test_energy_and_stress_without_forces(labelled, tmp_path, capsys):
    """``--sigma-force none --sigma-stress X`` fits energies and stresses only: forces in
    the file are ignored (the model equals that of the file without them)."""
    with_f = tmp_path / "with.xyz"
    write(with_f, labelled, format="extxyz")
    no_f = []
    for a in labelled:
        b = a.copy()
        b.calc = SinglePointCalculator(b, energy=a.get_potential_energy(),
                                       stress=a.get_stress())
        no_f.append(b)
    without = tmp_path / "without.xyz"
    write(without, no_f, format="extxyz")
    args = [*SOAP_ARGS, "--sigma-force", "none", "--sigma-stress", "0.01"]
    assert main(["fit", str(with_f), "-o", str(tmp_path / "a.kmlip"), *args]) == 0
    assert main(["fit", str(without), "-o", str(tmp_path / "b.kmlip"), *args]) == 0
    a, b = load(tmp_path / "a.kmlip"), load(tmp_path / "b.kmlip")
    assert a.sigma_force_ is None and a.sigma_stress_ == 0.01
    assert a.n_labels_ == b.n_labels_ and "forces" not in {k for k, v in a.n_labels_.items()
                                                           if v}
    test = emt_frames(2, repeat=(1, 1, 1), seed=8)
    np.testing.assert_allclose(a.predict(test), b.predict(test), rtol=1e-10)


def test_local_dask_cluster_takes_a_free_http_port(labelled, tmp_path, capsys):
    """``--workers``: the scheduler's HTTP server does not ask for port 8787, so a run beside
    another cluster (here: anything holding 8787) prints no port warning."""
    pytest.importorskip("distributed")
    train = tmp_path / "train.xyz"
    write(train, labelled[:6], format="extxyz")
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        try:
            holder.bind(("127.0.0.1", 8787))
            holder.listen(1)
        except OSError:
            pass  # already taken by someone else: the same situation
        out = tmp_path / "w.kmlip"
        assert main(["fit", str(train), "-o", str(out), *SOAP_ARGS, "--workers", "1"]) == 0
    finally:
        holder.close()
    err = capsys.readouterr().err
    assert "8787" not in err and "already in use" not in err, err
    assert load(out).n_labels_["energy"] == 6


@pytest.mark.parametrize("extra, named", [(["--r-cut", "5.0"], "--r-cut"),
                                          (["--species", "Cu", "--sigma", "0.4"],
                                           "--species, --sigma")])
def test_soap_options_with_a_model_spec_are_refused(labelled, tmp_path, capsys, extra, named):
    import json

    train = tmp_path / "train.xyz"
    write(train, labelled[:2], format="extxyz")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"terms": [{"descriptor": {
        "type": "SOAP", "params": {"species": ["Cu"], "r_cut": 4.0, "n_max": 3, "l_max": 2}}}]}))
    out = tmp_path / "m.kmlip"
    assert main(["fit", str(train), "-o", str(out), "--model", str(spec), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"kmlip fit: error: {named} and --model cannot be combined"), err
    assert "\n" not in err and not out.exists()
    # the spec alone (with the sparse-GP options, which fill its terms) fits
    assert main(["fit", str(train), "-o", str(out), "--model", str(spec), "--n-sparse", "4",
                 "--threads", "1"]) == 0
    assert load(out).descriptor.r_cut == 4.0
