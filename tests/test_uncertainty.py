"""Per-atom novelty and calibrated uncertainty; uncertainty-gated dynamics."""
from __future__ import annotations

import io

import numpy as np
import pytest
from ase import units
from ase.io import read
from ase.md.verlet import VelocityVerlet
from conftest import soap_or_skip

from kmlip.active import UncertaintyExceeded, UncertaintyGate, run_gated
from kmlip.calculator import KMLIPCalculator
from kmlip.datasets import emt_frames
from kmlip.model import KernelPotential, load


@pytest.fixture(scope="module")
def cu_model():
    soap = soap_or_skip(species=["Cu"])
    model = KernelPotential(soap, n_sparse=60, random_state=0, n_threads=1)
    return model.fit(emt_frames(12, seed=0))


def _compressed(atoms, volume_factor=0.85):
    a = atoms.copy()
    a.set_cell(a.cell * volume_factor ** (1 / 3), scale_atoms=True)
    return a


def test_novelty_is_the_projected_process_term(cu_model):
    a = emt_frames(1, seed=5)[0]
    r = cu_model.compute(a, ("novelty", "energies_var"))
    st = cu_model.fitted_state_
    K = st.basis.local_rows(r.features, a.numbers)
    A = np.linalg.solve(st.L_hat, K.T)
    want = st.hyper.delta ** 2 * (1.0 - np.sum(A * A, axis=0))
    np.testing.assert_allclose(r.novelty, want, rtol=1e-6, atol=1e-12 * st.hyper.delta ** 2)
    assert np.all(r.novelty <= r.energies_var + 1e-15)
    # a sparse point's own environment is (nearly) not novel; a compressed cell is
    far = cu_model.compute(_compressed(a, 0.7), ("novelty",)).novelty
    assert np.median(far) > 100 * np.median(r.novelty)


def test_calibrate_fits_force_errors_and_is_stored(cu_model, tmp_path):
    model = KernelPotential(cu_model.descriptor, n_sparse=60, random_state=0, n_threads=1)
    model.fit(emt_frames(12, seed=0))
    held_out = emt_frames(8, seed=2)
    rep = model.calibrate(held_out)
    assert rep["measure"] in ("novelty", "energies_var")
    assert rep["scale"] > 0 and rep["floor"] > 0 and rep["n_atoms"] == 8 * 32
    assert 0.85 <= rep["coverage_after"] <= 1.0
    test = emt_frames(4, seed=3)
    u = np.concatenate([model.compute(a, ("uncertainty",)).uncertainty for a in test])
    err = np.concatenate([np.linalg.norm(model.predict_forces(a) - a.get_forces(), axis=1)
                          for a in test]) / np.sqrt(3)
    assert 0.3 < np.sqrt(np.mean(err ** 2)) / np.sqrt(np.mean(u ** 2)) < 3.0
    # compressed cells are flagged
    u_far = np.concatenate([model.compute(_compressed(a), ("uncertainty",)).uncertainty
                            for a in test])
    assert np.median(u_far) >= 2 * np.median(u)
    path = tmp_path / "cal.kmlip"
    model.save(path)
    loaded = load(path)
    assert loaded.fitted_state_.calibration == model.fitted_state_.calibration
    np.testing.assert_array_equal(loaded.compute(test[0], ("uncertainty",)).uncertainty,
                                  model.compute(test[0], ("uncertainty",)).uncertainty)
    with pytest.raises(ValueError, match="measure"):
        model.calibrate(held_out, measure="max")


def test_gate_stops_dynamics_on_a_compressed_cell(cu_model, tmp_path):
    start = _compressed(emt_frames(1, seed=7)[0], 0.8)
    start.calc = KMLIPCalculator(cu_model, variances=("uncertainty",))
    log = io.StringIO()
    out = tmp_path / "tripped.xyz"
    gate = UncertaintyGate(start, threshold=1e-3, output=out, log=log)
    dyn = VelocityVerlet(start, 1.0 * units.fs)
    steps = run_gated(dyn, 20, gate)
    assert steps == 0 and gate.tripped is not None
    assert "1e-03 eV/Å" in log.getvalue() or "0.001 eV/Å" in log.getvalue()
    frame = read(out)
    np.testing.assert_allclose(frame.arrays["uncertainty"].max(), gate.tripped.max_uncertainty,
                               rtol=1e-6)
    # raised from inside ASE's own run loop
    gate2 = UncertaintyGate(start, threshold=1e-3, log=None)
    dyn.attach(gate2, interval=1)
    with pytest.raises(UncertaintyExceeded):
        dyn.run(5)


def test_gate_lets_known_dynamics_run(cu_model):
    a = emt_frames(1, seed=8, rattle=0.02)[0]
    a.calc = KMLIPCalculator(cu_model, variances=("uncertainty",))
    gate = UncertaintyGate(a, relative=50.0, log=None)
    steps = run_gated(VelocityVerlet(a, 1.0 * units.fs), 5, gate)
    assert steps == 5 and gate.tripped is None and len(gate.history) == 6
    with pytest.raises(ValueError, match="exactly one"):
        UncertaintyGate(a, threshold=0.1, relative=2.0)
    with pytest.raises(ValueError, match="positive"):
        UncertaintyGate(a, threshold=-1.0)
    b = a.copy()
    with pytest.raises(TypeError, match="KMLIPCalculator"):
        UncertaintyGate(b, threshold=0.1)
