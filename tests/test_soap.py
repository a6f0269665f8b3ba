"""SOAP: values against DScribe, gradients against DScribe and central differences, invariances,
threads and input errors."""
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from conftest import fd_forces
from conftest import fd_positions as _fd_positions
from conftest import fd_strain as _fd_strain
from conftest import triclinic_cell as _triclinic

from kmlip import SOAP


def _rattled(atoms, amount, seed):
    atoms = atoms.copy()
    atoms.rattle(amount, seed=seed)
    return atoms


def _alloy(seed=0):
    a = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    rng = np.random.default_rng(seed)
    a.symbols[rng.permutation(len(a))[:12]] = "Al"
    return _rattled(a, 0.1, seed)


# -- DScribe convention --------------------------------------------------------------------------

dscribe = pytest.importorskip("dscribe.descriptors")


@pytest.mark.parametrize("case", ["ethanol", "water", "si_crystal", "cual_alloy", "triclinic",
                                  "nacl_small_cell"])
def test_matches_dscribe_values(case):
    if case == "ethanol":
        atoms, species, periodic = _rattled(molecule("CH3CH2OH"), 0.05, 1), ["H", "C", "O"], False
    elif case == "water":
        atoms, species, periodic = molecule("H2O"), ["O", "H"], False
    elif case == "si_crystal":
        atoms = _rattled(bulk("Si", "diamond", a=5.43, cubic=True), 0.05, 2)
        species, periodic = ["Si"], True
    elif case == "cual_alloy":
        atoms, species, periodic = _alloy(3), ["Cu", "Al"], True
    elif case == "triclinic":
        atoms, species, periodic = _triclinic(4), ["Al", "Cu"], True
    else:  # a cell smaller than the cutoff: many periodic images of each atom
        atoms = bulk("NaCl", "rocksalt", a=5.64)
        atoms = _rattled(atoms, 0.05, 5)
        species, periodic = ["Na", "Cl"], True
    params = dict(species=species, r_cut=4.0, n_max=4, l_max=4, sigma=0.5)
    ours = SOAP(**params, convention="dscribe").transform(atoms)
    ref = dscribe.SOAP(**params, rbf="gto", periodic=periodic).create(atoms)
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-9 * np.abs(ref).max())


def test_matches_dscribe_gradients_on_molecules():
    for atoms, species in [(_rattled(molecule("CH3CH2OH"), 0.05, 7), ["H", "C", "O"]),
                           (_rattled(molecule("CH4"), 0.05, 8), ["C", "H"])]:
        params = dict(species=species, r_cut=4.0, n_max=4, l_max=3, sigma=0.5)
        X, G = SOAP(**params, convention="dscribe").transform(atoms, gradients=True)
        dref, xref = dscribe.SOAP(**params, rbf="gto", periodic=False).derivatives(
            atoms, method="analytical", attach=True)
        np.testing.assert_allclose(X, xref, rtol=1e-6, atol=1e-9 * np.abs(xref).max())
        np.testing.assert_allclose(G.dense(), dref, rtol=1e-6, atol=1e-8 * np.abs(dref).max())


def test_dscribe_feature_count_and_labels():
    params = dict(species=["Cu", "Al"], r_cut=5.0, n_max=8, l_max=6, sigma=0.5)
    soap = SOAP(**params, convention="dscribe")
    ref = dscribe.SOAP(**params, rbf="gto", periodic=True)
    assert soap.n_features == ref.get_number_of_features() == 952
    labels = soap.feature_labels()
    loc = ref.get_location(("Al", "Cu"))
    assert {lab[:2] for lab in labels[loc]} == {(13, 29)}


# -- exact gradients -----------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["triclinic", "self_images", "molecule", "dscribe_molecule",
                                  "normalized"])
def test_gradients_match_central_differences(case):
    kw = dict(r_cut=4.5, n_max=3, l_max=3, sigma=0.5)
    if case == "triclinic":
        atoms, soap = _triclinic(0), SOAP(species=["Cu", "Al"], **kw)
    elif case == "self_images":  # one atom in a cell much smaller than the cutoff, plus a second
        atoms = Atoms("CuAl", positions=[[0, 0, 0], [1.1, 0.9, 0.7]],
                      cell=[[2.5, 0, 0], [0.4, 2.4, 0], [0.3, 0.5, 2.6]], pbc=True)
        atoms = _rattled(atoms, 0.02, 1)
        soap = SOAP(species=["Cu", "Al"], **kw)
    elif case == "molecule":
        atoms, soap = _rattled(molecule("CH3CH2OH"), 0.05, 2), SOAP(species=["C", "H", "O"], **kw)
    elif case == "dscribe_molecule":
        atoms = _rattled(molecule("H2O"), 0.05, 3)
        soap = SOAP(species=["H", "O"], **kw, convention="dscribe")
    else:
        atoms, soap = _triclinic(5), SOAP(species=["Cu", "Al"], **kw, normalize=True)
    X, G = soap.transform(atoms, gradients=True)
    dense = G.dense()
    fd = _fd_positions(soap, atoms)
    scale = np.abs(dense).max()
    assert scale > 0
    np.testing.assert_allclose(dense, fd, atol=2e-7 * scale)
    # the self term is minus the sum over the other entries of the centre
    for i in range(len(atoms)):
        s = slice(G.offsets[i], G.offsets[i + 1])
        assert G.neighbors[G.offsets[i]] == i and np.all(G.vectors[G.offsets[i]] == 0)
        np.testing.assert_allclose(G.values[s].sum(axis=0), 0.0, atol=1e-10 * scale)
    if atoms.pbc.any():
        np.testing.assert_allclose(G.strain(), _fd_strain(soap, atoms),
                                   atol=2e-6 * np.abs(G.strain()).max())


def test_gradient_layout_matches_contract():
    atoms = _alloy(1)
    soap = SOAP(species=["Cu", "Al"], r_cut=5.0, n_max=3, l_max=2, sigma=0.5)
    X, G = soap.transform(atoms, gradients=True)
    n = len(G.centers)
    assert G.neighbors.shape == (n,) and G.values.shape == (n, 3, soap.n_features)
    assert G.centers.dtype == np.int64 and G.neighbors.dtype == np.int64
    assert np.all(np.diff(G.centers) >= 0)
    np.testing.assert_allclose(X, soap.transform(atoms))


def test_smooth_cutoff_is_continuous():
    soap = SOAP(species=["Cu"], r_cut=4.0, n_max=3, l_max=2, sigma=0.5)
    ref = soap.transform(Atoms("Cu", positions=[[0, 0, 0]]))
    for d in (3.9999, 4.0, 4.5):
        two = soap.transform(Atoms("Cu2", positions=[[0, 0, 0], [d, 0, 0]]))
        np.testing.assert_allclose(two[0], ref[0], atol=1e-12 + 1e-6 * np.abs(ref).max())
    inside = soap.transform(Atoms("Cu2", positions=[[0, 0, 0], [3.6, 0, 0]]))
    assert np.abs(inside[0] - ref[0]).max() > 1e-3 * np.abs(ref).max()


# -- invariances ---------------------------------------------------------------------------------

def test_rotation_translation_permutation_invariance():
    soap = SOAP(species=["Cu", "Al"], r_cut=4.5, n_max=4, l_max=4, sigma=0.5)
    mol = Atoms("Cu3Al2", positions=np.random.default_rng(0).random((5, 3)) * 3.0)
    X = soap.transform(mol)
    rot = mol.copy()
    rot.rotate(37, (1, 2, 3), center="COP")
    rot.translate((1.5, -2.0, 0.3))
    np.testing.assert_allclose(soap.transform(rot), X, rtol=1e-10, atol=1e-12)
    perm = [2, 0, 1, 4, 3]  # permutes like atoms only
    np.testing.assert_allclose(soap.transform(mol[perm]), X[perm], rtol=1e-12, atol=1e-14)
    # periodic: rotating cell and atoms together, translating, wrapping
    cry = _alloy(2)
    Xc = soap.transform(cry)
    r = cry.copy()
    r.rotate(23, (0.3, -1, 0.5), rotate_cell=True)
    r.translate((0.7, 0.1, -0.4))
    r.wrap()
    np.testing.assert_allclose(soap.transform(r), Xc, rtol=1e-9, atol=1e-11)


# -- OpenMP --------------------------------------------------------------------------------------

def test_one_and_two_threads_identical():
    atoms = _alloy(4)
    soap = SOAP(species=["Cu", "Al"], r_cut=4.5, n_max=4, l_max=3, sigma=0.5)
    X1, G1 = soap.transform(atoms, gradients=True, n_threads=1)
    X2, G2 = soap.transform(atoms, gradients=True, n_threads=2)
    assert np.array_equal(X1, X2) and np.array_equal(G1.values, G2.values)
    X3 = SOAP(species=["Cu", "Al"], r_cut=4.5, n_max=4, l_max=3, sigma=0.5,
              n_threads=2).transform(atoms)
    assert np.array_equal(X1, X3)


# -- bad input -----------------------------------------------------------------------------------

def test_bad_input_errors():
    kw = dict(r_cut=4.0, n_max=3, l_max=2, sigma=0.5)
    with pytest.raises(ValueError, match="not declared"):
        SOAP(species=["Cu"], **kw).transform(molecule("H2O"))
    bad = molecule("H2O")
    bad.positions[1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        SOAP(species=["H", "O"], **kw).transform(bad)
    flat = Atoms("Cu", positions=[[0, 0, 0]], cell=[[3, 0, 0], [0, 3, 0], [0, 0, 0]], pbc=True)
    with pytest.raises(ValueError, match="zero volume"):
        SOAP(species=["Cu"], **kw).transform(flat)
    for field, value in [("r_cut", 0.0), ("r_cut", -1.0), ("n_max", 0), ("l_max", -1),
                         ("sigma", 0.0)]:
        with pytest.raises(ValueError, match=field):
            SOAP(species=["Cu"], **{**kw, field: value})
    with pytest.raises(ValueError, match="unknown species"):
        SOAP(species=["Xx"], **kw)
    with pytest.raises(ValueError, match="convention"):
        SOAP(species=["Cu"], **kw, convention="quip")
    with pytest.raises(TypeError):
        SOAP(species=["Cu"], **kw).transform("not atoms")
    with pytest.raises(TypeError):
        SOAP(species=["Cu"], **{**kw, "n_max": 2.5})


def test_params_round_trip():
    soap = SOAP(species=["Cu", "Al"], r_cut=4.0, n_max=3, l_max=2, sigma=0.4, normalize=True)
    again = SOAP(**soap.get_params())
    atoms = _alloy(0)
    assert np.array_equal(soap.transform(atoms), again.transform(atoms))
    from kmlip.descriptors.base import Descriptor
    rebuilt = Descriptor.from_dict(soap.to_dict())
    assert rebuilt.get_params() == soap.get_params()


@pytest.mark.parametrize("normalize", [False, True])
def test_backprop_equals_contraction_with_pair_gradients(normalize):
    atoms = _triclinic(6)
    soap = SOAP(species=["Cu", "Al"], r_cut=4.5, n_max=3, l_max=3, sigma=0.5,
                normalize=normalize)
    w = np.random.default_rng(1).standard_normal((len(atoms), soap.n_features))

    def energy(X):
        return float(np.sum(w * X**2))

    X, V, forces, virial = soap.backprop(atoms, lambda X: 2 * w * X)
    # forces are -dE/dr by central differences of E(X(r))
    fd = fd_forces(lambda a: energy(soap.transform(a)), atoms)
    np.testing.assert_allclose(forces, fd, atol=1e-6 * np.abs(fd).max())
    _, G = soap.transform(atoms, gradients=True)
    fe = np.einsum("kaf,kf->ka", G.values, V[G.centers])
    np.testing.assert_allclose(virial, fe.T @ G.vectors, atol=1e-10 * np.abs(virial).max())


# -- parameter bounds ----------------------------------------------------------------------------

def test_n_max_bound_is_where_the_gto_basis_is_numerically_singular():
    # The documented reason for MAX_N_MAX: one more GTO than the bound gives an overlap matrix
    # whose condition number exceeds 1/eps at every r_cut, so the orthonormal basis is noise.
    import math

    from kmlip.descriptors.soap import DSCRIBE_DECAY, MAX_N_MAX

    def rcond(r_cut, n, l_max=4):
        a = np.linspace(1.0, r_cut, n)
        worst = 1.0
        for l in range(l_max + 1):
            al = -np.log(DSCRIBE_DECAY / a**l) / a**2
            S = 0.5 * math.gamma(l + 1.5) * (al[:, None] + al[None, :]) ** (-l - 1.5)
            d = np.sqrt(np.diag(S))
            w = np.linalg.eigvalsh(S / d[:, None] / d[None, :])
            worst = min(worst, w.min() / w.max())
        return worst

    for r_cut in (2.0, 3.0, 5.0, 8.0, 12.0, 20.0, 50.0, 200.0):
        assert rcond(r_cut, MAX_N_MAX + 1) < 1e-15, r_cut
    assert rcond(6.0, 8) > 1e-9  # the usual settings are well conditioned
    with pytest.raises(ValueError, match="n_max"):
        SOAP(species=["Cu"], n_max=MAX_N_MAX + 1)


def test_dummy_species_refused_like_ewald():
    from kmlip.ewald import Ewald

    for species in (["X"], ["Na", 0]):
        with pytest.raises(ValueError, match="dummy"):
            SOAP(species=species)
    with pytest.raises(ValueError):
        Ewald(charges={"X": 1.0})
    with pytest.raises(ValueError):
        Ewald(charges={0: 1.0})
