"""ACSF: values and order against DScribe, gradients and cell derivative against central
differences, invariances, threads, parameter errors, and a Cu–Al EMT fit."""
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from conftest import fd_forces
from conftest import fd_positions as _fd_positions
from conftest import fd_strain as _fd_strain
from conftest import triclinic_cell as _triclinic

from kmlip import ACSF
from kmlip.descriptors.base import Descriptor

KW = dict(r_cut=6.0, g2_params=[(1.0, 0.0), (0.5, 2.0)], g3_params=[1.0, 2.0],
          g4_params=[(0.005, 1.0, 1.0), (0.005, 1.0, -1.0)], g5_params=[(0.005, 1.0, 1.0)])
# zeta != 1 and a larger eta exercise the power and the Gaussian factors of the gradients
KW_GRAD = dict(r_cut=4.5, g2_params=[(0.8, 0.0), (0.5, 2.5)], g3_params=[1.3],
               g4_params=[(0.05, 1.0, 1.0), (0.02, 3.0, -1.0)],
               g5_params=[(0.05, 2.0, 1.0), (0.0, 1.0, -1.0)])


def _alloy(seed=0, repeat=(2, 2, 2)):
    a = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(repeat)
    rng = np.random.default_rng(seed)
    a.symbols[rng.permutation(len(a))[:len(a) // 3]] = "Al"
    a.rattle(0.1, seed=seed)
    return a


# -- DScribe convention --------------------------------------------------------------------------

def _case(name):
    if name == "water":
        return ["H", "O"], molecule("H2O")
    if name == "ethanol":
        return ["O", "H", "C"], molecule("CH3CH2OH")  # order given differs from Z order
    if name == "cual_alloy":
        a = _alloy(1)
        a.wrap()
        return ["Cu", "Al"], a
    if name == "triclinic":  # small cell: the cutoff reaches several images of each atom
        return ["Al", "Cu"], _triclinic(3)
    if name == "three_species_crystal":  # DScribe's pair order differs from row-major for S=3
        a = _alloy(2, repeat=(2, 1, 1))
        a.symbols[[0, 5]] = "Ni"
        a.wrap()
        return ["Ni", "Cu", "Al"], a
    raise KeyError(name)


@pytest.mark.parametrize("case", ["water", "ethanol", "cual_alloy", "triclinic",
                                  "three_species_crystal"])
def test_matches_dscribe_values_and_order(case):
    dscribe = pytest.importorskip("dscribe.descriptors")
    species, atoms = _case(case)
    ours = ACSF(species=species, **KW)
    ref = dscribe.ACSF(species=species, periodic=bool(atoms.pbc.any()), **KW).create(atoms)
    X = ours.transform(atoms)
    assert X.shape == ref.shape == (len(atoms), ours.n_features)
    np.testing.assert_allclose(X, ref, rtol=1e-6, atol=1e-10 * np.abs(ref).max())
    # the nonzero features are not a handful: a wrong order cannot pass by accident
    assert np.count_nonzero(np.abs(ref) > 1e-6) > ref.size // 3


def test_feature_count_and_labels():
    acsf = ACSF(species=["O", "H", "C"], **KW)
    S = 3
    assert acsf.n_features == S * (1 + 2 + 2) + S * (S + 1) // 2 * 3
    labels = acsf.feature_labels()
    assert len(labels) == acsf.n_features
    assert labels[0] == ("G1", 1) and labels[5] == ("G1", 6) and labels[10] == ("G1", 8)
    assert labels[1] == ("G2", 1, 1.0, 0.0) and labels[4] == ("G3", 1, 2.0)
    # DScribe's pair blocks: (H,H), (H,C), (C,C), (H,O), (C,O), (O,O)
    pairs = [lab[1:3] for lab in labels[15::3]]
    assert pairs == [(1, 1), (1, 6), (6, 6), (1, 8), (6, 8), (8, 8)]
    assert labels[17][0] == "G5"


def test_cutoff_is_continuous_and_hard_beyond():
    acsf = ACSF(species=["Cu"], r_cut=4.0, g2_params=[(0.1, 0.0)], g5_params=[(0.0, 1.0, 1.0)])
    far = acsf.transform(Atoms("Cu3", positions=[[0, 0, 0], [4.0, 0, 0], [0, 4.2, 0]]))
    assert np.all(far == 0.0)
    near = acsf.transform(Atoms("Cu2", positions=[[0, 0, 0], [4.0 - 1e-4, 0, 0]]))
    assert 0.0 < np.abs(near).max() < 1e-7


# -- gradients -----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["molecule", "triclinic", "alloy_cell"])
def test_gradients_match_central_differences(case):
    if case == "molecule":
        atoms = molecule("CH3CH2OH")
        acsf = ACSF(species=["H", "C", "O"], **KW_GRAD)
    elif case == "triclinic":
        atoms = _triclinic(5)
        acsf = ACSF(species=["Cu", "Al"], **KW_GRAD)
    else:
        atoms = _alloy(3, repeat=(2, 1, 1))
        acsf = ACSF(species=["Cu", "Al"], **KW_GRAD)
    X, G = acsf.transform(atoms, gradients=True)
    np.testing.assert_array_equal(X, acsf.transform(atoms))
    # layout: per centre the self term first, then the pairs
    assert np.array_equal(G.neighbors[G.offsets[:-1]], np.arange(len(atoms)))
    assert np.all(G.vectors[G.offsets[:-1]] == 0.0)
    assert G.values.shape == (G.n_entries, 3, acsf.n_features)
    fd = _fd_positions(acsf, atoms)
    dense = G.dense(len(atoms))
    np.testing.assert_allclose(dense, fd, rtol=0, atol=2e-7 * np.abs(fd).max())
    assert np.abs(fd).max() > 0.1
    if atoms.pbc.all():
        fs = _fd_strain(acsf, atoms)
        np.testing.assert_allclose(G.strain(), fs, rtol=0, atol=2e-6 * np.abs(fs).max())


@pytest.mark.parametrize("case", ["ethanol", "triclinic"])
def test_gradients_match_dscribe_numerical_derivatives(case):
    dscribe = pytest.importorskip("dscribe.descriptors")
    species, atoms = _case(case)
    ours = ACSF(species=species, **KW_GRAD)
    ref, ref_X = dscribe.ACSF(species=species, periodic=bool(atoms.pbc.any()),
                              **KW_GRAD).derivatives(atoms, method="numerical", attach=True)
    X, G = ours.transform(atoms, gradients=True)
    np.testing.assert_allclose(X, ref_X, rtol=1e-6, atol=1e-10 * np.abs(ref_X).max())
    # DScribe's central differences carry their own truncation error
    np.testing.assert_allclose(G.dense(len(atoms)), ref, rtol=0, atol=1e-6 * np.abs(ref).max())


@pytest.mark.parametrize("vjp", [True, False])
def test_backprop_gives_forces_and_virial_of_a_scalar(vjp, monkeypatch):
    from kmlip.descriptors import acsf as acsf_module

    # both paths: the in-kernel vjp and the contraction of dense pair gradients
    monkeypatch.setattr(acsf_module, "VJP_MIN_FEATURES", 0 if vjp else 10**9)
    atoms = _triclinic(7)
    acsf = ACSF(species=["Cu", "Al"], **KW_GRAD)
    w = np.random.default_rng(0).standard_normal((len(atoms), acsf.n_features))

    def energy(X):
        return float(np.sum(w * X**2))

    X, V, forces, virial = acsf.backprop(atoms, lambda X: 2 * w * X)
    fd = fd_forces(lambda a: energy(acsf.transform(a)), atoms)
    np.testing.assert_allclose(forces, fd, atol=1e-6 * np.abs(fd).max())
    # the in-kernel vjp equals the base class's contraction of the pair gradients
    X2, _, forces2, virial2 = Descriptor.backprop(acsf, atoms, lambda X: 2 * w * X)
    np.testing.assert_array_equal(X, X2)
    np.testing.assert_allclose(forces, forces2, rtol=0, atol=1e-12 * np.abs(forces2).max())
    np.testing.assert_allclose(virial, virial2, rtol=0, atol=1e-12 * np.abs(virial2).max())
    # the virial is the strain derivative of E: central differences of the cell
    h = 1e-6
    fd_w = np.zeros((3, 3))
    for a in range(3):
        for b in range(3):
            res = []
            for sign in (1, -1):
                e = np.eye(3)
                e[a, b] += sign * h
                s = atoms.copy()
                s.set_cell(atoms.cell.array @ e.T, scale_atoms=True)
                res.append(energy(acsf.transform(s)))
            fd_w[a, b] = (res[0] - res[1]) / (2 * h)
    np.testing.assert_allclose(virial, fd_w, atol=1e-6 * np.abs(fd_w).max())


# -- invariances ---------------------------------------------------------------------------------

def test_rotation_translation_permutation_invariance():
    acsf = ACSF(species=["Cu", "Al"], **KW_GRAD)
    mol = Atoms("Cu3Al2", positions=np.random.default_rng(0).random((5, 3)) * 3.0)
    X = acsf.transform(mol)
    rot = mol.copy()
    rot.rotate(37, (1, 2, 3), center="COP")
    rot.translate((1.5, -2.0, 0.3))
    np.testing.assert_allclose(acsf.transform(rot), X, rtol=1e-10, atol=1e-12)
    perm = [2, 0, 1, 4, 3]  # permutes like atoms only
    np.testing.assert_allclose(acsf.transform(mol[perm]), X[perm], rtol=1e-12, atol=1e-14)
    cry = _alloy(2)
    Xc = acsf.transform(cry)
    r = cry.copy()
    r.rotate(23, (0.3, -1, 0.5), rotate_cell=True)
    r.translate((0.7, 0.1, -0.4))
    r.wrap()
    np.testing.assert_allclose(acsf.transform(r), Xc, rtol=1e-9, atol=1e-11)
    # moving an atom by a lattice vector changes nothing (unlike DScribe)
    shifted = cry.copy()
    shifted.positions[0] += cry.cell[1] - 2 * cry.cell[2]
    np.testing.assert_allclose(acsf.transform(shifted), Xc, rtol=1e-9, atol=1e-11)


def test_one_and_two_threads_identical():
    atoms = _alloy(4)
    acsf = ACSF(species=["Cu", "Al"], **KW_GRAD)
    X1, G1 = acsf.transform(atoms, gradients=True, n_threads=1)
    X2, G2 = acsf.transform(atoms, gradients=True, n_threads=2)
    assert np.array_equal(X1, X2) and np.array_equal(G1.values, G2.values)


# -- parameters ----------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, exc, match", [
    ("r_cut", 0.0, ValueError, "r_cut"),
    ("r_cut", -1.0, ValueError, "r_cut"),
    ("r_cut", "6", TypeError, "r_cut"),
    ("g2_params", [(-0.1, 0.0)], ValueError, "g2_params.*eta"),
    ("g2_params", [(0.1,)], ValueError, "g2_params"),
    ("g2_params", [("a", 0.0)], TypeError, "g2_params"),
    ("g2_params", 0.5, TypeError, "g2_params"),
    ("g3_params", [1.0, float("nan")], ValueError, "g3_params"),
    ("g3_params", [[1.0]], TypeError, "g3_params"),
    ("g4_params", [(-0.005, 1.0, 1.0)], ValueError, "g4_params.*eta"),
    ("g4_params", [(0.005, 1.0, 0.5)], ValueError, "g4_params.*lambda"),
    ("g4_params", [(0.005, 0.5, 1.0)], ValueError, "g4_params.*zeta"),
    ("g5_params", [(0.005, 1.0, 2.0)], ValueError, "g5_params.*lambda"),
    ("g5_params", [(0.005, 1.0)], ValueError, "g5_params"),
    ("g5_params", "abc", TypeError, "g5_params"),
    ("species", ["Cu", "Xx"], ValueError, "unknown species"),
    ("species", "Cu", TypeError, "species"),
    ("convention", "behler", ValueError, "convention"),
    ("n_threads", 0, ValueError, "n_threads"),
])
def test_bad_parameters_raise_naming_the_parameter(field, value, exc, match):
    kw = dict(species=["Cu", "Al"], **KW)
    kw[field] = value
    with pytest.raises(exc, match=match):
        ACSF(**kw)


def test_undeclared_species_in_structure():
    with pytest.raises(ValueError, match="not declared"):
        ACSF(species=["Cu"], **KW).transform(molecule("H2O"))


def test_params_round_trip_and_clone():
    acsf = ACSF(species=["Cu", "Al"], **KW)
    params = acsf.get_params()
    assert params["g4_params"] is KW["g4_params"]
    again = ACSF(**params)
    atoms = _alloy(0)
    assert np.array_equal(acsf.transform(atoms), again.transform(atoms))
    rebuilt = Descriptor.from_dict(acsf.to_dict())
    assert isinstance(rebuilt, ACSF)
    assert np.array_equal(rebuilt.transform(atoms), acsf.transform(atoms))
    import json
    json.dumps(acsf.to_dict())
    sk = pytest.importorskip("sklearn.base")
    assert sk.clone(acsf).get_params()["g2_params"] == KW["g2_params"]
    acsf.set_params(g3_params=None)
    assert acsf.n_features == 2 * 3 + 3 * 3
    with pytest.raises(ValueError, match="lambda"):
        acsf.set_params(g4_params=[(0.1, 1.0, 0.0)])
    assert acsf.n_features == 2 * 3 + 3 * 3  # unchanged after the failed set_params


# -- a potential ---------------------------------------------------------------------------------

def test_kernel_potential_fits_emt_and_forces_are_energy_derivatives(train_frames, test_frames):
    from kmlip.model import KernelPotential

    # narrow G2 shells: a radial histogram whose shape the normalised dot-product kernel sees
    acsf = ACSF(species=["Cu", "Al"], r_cut=4.5,
                g2_params=[(4.0, float(r)) for r in np.arange(2.0, 4.6, 0.25)],
                g4_params=[(0.1, 1.0, 1.0), (0.1, 1.0, -1.0), (0.1, 4.0, 1.0)])
    model = KernelPotential(acsf, n_sparse=60, zeta=4, sigma_energy=0.002, sigma_force=0.05,
                            random_state=0, n_threads=1)
    model.fit(train_frames[:20])
    frames = test_frames
    E = model.predict(frames)
    E_ref = np.array([a.get_potential_energy() for a in frames])
    # far better than the spread of the energies (0.071 eV/atom); measured 0.018 eV/atom
    assert np.sqrt(np.mean((E - E_ref) ** 2)) < 0.4 * np.std(E_ref)
    F = np.concatenate(model.predict_forces(frames))
    F_ref = np.concatenate([a.get_forces() for a in frames])
    # measured 0.15 of the force scale
    assert np.sqrt(np.mean((F - F_ref) ** 2)) < 0.25 * np.sqrt(np.mean(F_ref**2))
    atoms = frames[0]
    F = model.predict_forces(atoms)
    fd = fd_forces(lambda a: model.predict(a)[0], atoms, h=1e-4)
    np.testing.assert_allclose(F, fd, atol=1e-5 * max(1.0, np.abs(fd).max()))


def test_model_with_acsf_saves_and_loads(train_frames, tmp_path):
    from kmlip.model import KernelPotential, load

    acsf = ACSF(species=["Cu", "Al"], r_cut=4.5, g2_params=[(4.0, 2.5), (4.0, 3.5)],
                g4_params=[(0.1, 1.0, 1.0)])
    model = KernelPotential(acsf, n_sparse=10, random_state=0, n_threads=1)
    model.fit(train_frames[:4])
    path = tmp_path / "acsf.kmlip"
    model.save(path)
    again = load(path)
    assert isinstance(again.descriptor, ACSF)
    assert again.descriptor.get_params() == acsf.to_dict()["params"]
    np.testing.assert_array_equal(again.predict(train_frames[4:6]),
                                  model.predict(train_frames[4:6]))
