"""The on-the-fly learner calibrates its uncertainty on frames held out before each update."""
from __future__ import annotations

import numpy as np
from test_active import CountingEMT, _cu, _held_out, _labelled, _learn

from kmlip import load
from kmlip.uncertainty import coverage


def _md_frames(n, seed=11, temperature=800.0):
    """Frames of an EMT Langevin run (32-atom Cu, as the learner's runs), 10 steps apart."""
    from ase import units
    from ase.calculators.emt import EMT
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    atoms = _cu()
    atoms.calc = EMT()
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    dyn = Langevin(atoms, units.fs, temperature_K=temperature, friction=0.01 / units.fs,
                   rng=rng)
    dyn.run(30)
    frames = []
    for _ in range(n):
        dyn.run(10)
        frames.append(_labelled(atoms))
    return frames


def test_learned_model_carries_a_calibration(tmp_path):
    run = tmp_path / "run"
    res = _learn(run, CountingEMT(), threshold=0.02)
    assert res.n_reference_calls >= 3, "the test needs calls from a model of two frames"
    cal = res.model.fitted_state_.calibration
    assert cal is not None and cal.measure == "novelty" and cal.n_atoms > 0
    # the final calibration cross-validates over the labelled frames after the start structure
    # (calls 2, 3, ... of 32 atoms each)
    n_cv = min(res.n_reference_calls - 1, 8)
    assert cal.n_atoms == 32 * n_cv and cal.report["n_frames"] == n_cv
    assert set(cal.report["spearman"]) >= {"novelty", "energies_var", "forces_var_diag"}
    log = (run / "log").read_text()
    assert "calibration on" in log  # during the run: frames held out before their update
    assert "final calibration by cross-validation" in log
    # stored in the model file, with the data it was fitted on
    assert load(run / "model.kmlip").fitted_state_.calibration == cal
    with np.load(run / "calibration.npz") as z:
        calls = sorted({int(k.split("__")[0][4:]) for k in z.files})
    assert calls == list(range(3, res.n_reference_calls + 1))
    # on frames of an independent EMT run like the learner's, the calibrated uncertainty
    # covers most force errors
    errs, u = [], []
    for a in _md_frames(4):
        r = res.model.compute(a, ("forces", "uncertainty"))
        errs.append(r.forces - a.get_forces())
        u.append(r.uncertainty)
    # a small, poor model (3-4 calls, n_max 3, l_max 2: RMS error ~0.1 eV/Å) on frames of
    # true EMT dynamics, which differ from the model's own: about 80 % (uncalibrated: 50 %);
    # the benchmark's 108-atom runs reach 92-98 %
    assert coverage(np.concatenate(errs), np.concatenate(u)) > 0.7


def test_calibration_does_not_change_the_gate(tmp_path):
    # the gate trips at a novelty fixed by sigma_F, whatever the calibration says: the same
    # reference calls with and without it
    a = _learn(tmp_path / "a", CountingEMT(), calibrate=True)
    b = _learn(tmp_path / "b", CountingEMT(), calibrate=False)
    assert [r["step"] for r in a.calls] == [r["step"] for r in b.calls]
    assert b.model.fitted_state_.calibration is None
    held = _held_out(1)[0]
    np.testing.assert_allclose(a.model.predict_forces(held), b.model.predict_forces(held),
                               rtol=1e-9, atol=1e-10)


def test_cli_learn_calibrates_unless_told_not_to(tmp_path):
    from ase.io import read, write

    from kmlip.cli.main import main

    start = tmp_path / "start.xyz"
    write(start, _cu(seed=1, rattle=0.05))
    base = ["learn", str(start), "--reference", "emt", "--steps", "80", "--temperature", "800",
            "--r-cut", "4.0", "--n-max", "3", "--l-max", "2", "--threshold", "0.02",
            "--max-calls", "4", "--quiet"]
    assert main(base + ["-o", str(tmp_path / "a")]) == 0
    assert main(base + ["-o", str(tmp_path / "b"), "--no-calibrate"]) == 0
    a, b = load(tmp_path / "a" / "model.kmlip"), load(tmp_path / "b" / "model.kmlip")
    n_calls = len(read(tmp_path / "a" / "reference.extxyz", ":"))
    assert n_calls >= 3, "the test needs calls from a model of two frames"
    assert a.fitted_state_.calibration is not None
    assert b.fitted_state_.calibration is None
    assert "calibrated on every frame" in (tmp_path / "a" / "log").read_text()


def test_resume_with_a_damaged_calibration_file(tmp_path):
    from test_active import STEPS

    run = tmp_path / "run"
    first = _learn(run, CountingEMT(), threshold=0.02)
    assert first.model.fitted_state_.calibration is not None
    (run / "calibration.npz").write_bytes(b"not an npz file")
    ref = CountingEMT()
    res = _learn(run, ref, threshold=0.02, steps=STEPS + 20)
    # the run goes on (the held-out data of the earlier calls are lost; the final
    # cross-validation needs only the labelled frames)
    assert res.steps == STEPS + 20
    cal = res.model.fitted_state_.calibration
    assert cal is not None
    assert cal.report["n_frames"] == min(res.n_reference_calls - 1, 8)
