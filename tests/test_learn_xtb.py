"""examples/learn_xtb.py in small: on-the-fly learning with tblite's GFN2-xTB (the [xtb] extra)."""
from __future__ import annotations

import numpy as np
import pytest
from ase.io import read
from conftest import load_example

pytest.importorskip("tblite.ase")



def _example():
    return load_example("learn_xtb")


def test_learn_xtb_small(tmp_path):
    ex = _example()
    out = tmp_path / "run"
    r = ex.run("H2O", steps=150, temperature=400.0, out=str(out), n_test=4, test_every=10,
               max_reference_calls=6, progress=False)
    res = r["result"]
    assert res.steps == 150 and 2 <= res.n_reference_calls <= 6
    # the reference frames carry GFN2-xTB's labels of their positions
    refs = read(out / "reference.extxyz", ":")
    assert len(refs) == res.n_reference_calls
    a = refs[-1].copy()
    a.calc = ex.reference()
    # (xTB converges its SCC to ~1e-5 eV/Å from another start)
    np.testing.assert_allclose(refs[-1].get_forces(), a.get_forces(), atol=1e-3)
    np.testing.assert_allclose(refs[-1].get_potential_energy(), a.get_potential_energy(),
                               atol=1e-4)
    # learned something: force errors on an independent xTB run well below the forces
    assert r["force_mae"] < 0.5 * r["force_rms_reference"]
    assert res.model.fitted_state_.calibration is not None
    traj = read(out / "trajectory.extxyz", ":")
    assert all(t.arrays["uncertainty"].shape == (3,) for t in traj)
