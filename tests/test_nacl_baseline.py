"""Issue 4, deliverable 6: on rock-salt NaCl the GP alone misses long-range Coulomb energetics
that GP + Ewald reproduces (the demonstration in examples/nacl_ewald.py)."""

import numpy as np
from conftest import load_example


def _example():
    return load_example("nacl_ewald")


def test_reference_coulomb_part_matches_madelung():
    ex = _example()
    atoms = ex.crystal(ex.A0, 1)
    e = ex.Ewald(charges=ex.CHARGES, accuracy=1e-10).compute(atoms)[0]
    np.testing.assert_allclose(e / 4, -8.9235141054, rtol=1e-9)
    # the Born–Mayer parameter puts the reference crystal in equilibrium near A0
    energies = [ex.labelled(ex.crystal(ex.A0 * s, 1)).get_potential_energy()
                for s in (0.99, 1.0, 1.01)]
    assert energies[1] < energies[0] and energies[1] < energies[2]


def test_ewald_baseline_captures_vacancy_pair_energetics():
    ex = _example()
    res = ex.run(n_train=10)
    gp, gp_ewald = res["GP only"], res["GP + Ewald"]
    # the separated vacancy pair's energy varies on a scale far beyond the SOAP cutoff
    assert gp_ewald["vacancy pairs"] < 0.3 * gp["vacancy pairs"]
    assert gp_ewald["vacancy pairs"] < 1.0  # meV/atom
