"""The on-the-fly learner calibrates its uncertainty on frames held out before each update."""
from __future__ import annotations

import numpy as np
from test_active import CountingEMT, _cu, _held_out, _learn

from kmlip import load
from kmlip.uncertainty import coverage


def test_learned_model_carries_a_calibration(tmp_path):
    run = tmp_path / "run"
    res = _learn(run, CountingEMT(), threshold=0.02)
    assert res.n_reference_calls >= 3, "the test needs calls from a model of two frames"
    cal = res.model.fitted_state_.calibration
    assert cal is not None and cal.measure == "novelty" and cal.n_atoms > 0
    # the frames held out from models of >= 2 frames: calls 3, 4, ... of 32 atoms each
    assert cal.n_atoms == 32 * (res.n_reference_calls - 2)
    assert cal.report["n_frames"] == res.n_reference_calls - 2
    assert set(cal.report["spearman"]) >= {"novelty", "energies_var", "forces_var_diag"}
    assert "calibration on" in (run / "log").read_text()
    # stored in the model file, with the data it was fitted on
    assert load(run / "model.kmlip").fitted_state_.calibration == cal
    with np.load(run / "calibration.npz") as z:
        calls = sorted({int(k.split("__")[0][4:]) for k in z.files})
    assert calls == list(range(3, res.n_reference_calls + 1))
    # on held-out frames the calibrated uncertainty covers most force errors
    errs, u = [], []
    for a in _held_out(4):
        r = res.model.compute(a, ("forces", "uncertainty"))
        errs.append(r.forces - a.get_forces())
        u.append(r.uncertainty)
    assert coverage(np.concatenate(errs), np.concatenate(u)) > 0.8


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
    # the run goes on; the data of the earlier calls are lost, the model's calibration is kept
    # until a new call refits it on the new frames
    assert res.steps == STEPS + 20
    cal = res.model.fitted_state_.calibration
    assert cal is not None
    if len(ref.calls) > 0:
        assert cal.report["n_frames"] == len(ref.calls)
