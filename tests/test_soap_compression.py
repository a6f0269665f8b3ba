"""Species-compressed SOAP (``compression="mu1nu1"`` / ``"mu2"``): values against DScribe 2.1,
gradients against central differences, backprop against the gradients, invariances, a fit, and
input errors."""
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from conftest import fd_forces
from conftest import fd_positions as _fd_positions
from conftest import fd_strain as _fd_strain

from kmlip import SOAP

METALS = ["Cu", "Ag", "Au", "Ni", "Pd"]
MODES = ["mu1nu1", "mu2"]


def _ethanol():
    atoms = molecule("CH3CH2OH")
    atoms.rattle(0.05, seed=1)
    return atoms


def _alloy(seed=0, repeat=(2, 1, 1)):
    """A rattled fcc cell of five metals (periodic, positions wrapped for DScribe)."""
    rng = np.random.default_rng(seed)
    atoms = bulk("Cu", "fcc", a=3.8, cubic=True).repeat(repeat)
    atoms.symbols = rng.choice(METALS, len(atoms))
    atoms.rattle(0.08, seed=seed)
    atoms.wrap()
    return atoms


def _triclinic(seed=0):
    rng = np.random.default_rng(seed)
    cell = np.array([[4.1, 0.0, 0.0], [1.3, 3.9, 0.0], [0.7, 0.9, 4.3]])
    return Atoms("CuAgAuCuAg", scaled_positions=rng.random((5, 3)), cell=cell, pbc=True)


def _dense(G, n_atoms, n_features):
    out = np.zeros((n_atoms, n_atoms, 3, n_features))
    np.add.at(out, (G.centers, G.neighbors), G.values)
    return out


# -- DScribe ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", ["ethanol", "alloy5"])
def test_matches_dscribe_values(mode, case):
    dscribe = pytest.importorskip("dscribe.descriptors")
    if case == "ethanol":
        atoms, species, periodic = _ethanol(), ["H", "C", "O"], False
    else:
        atoms, species, periodic = _alloy(3), METALS, True
    kw = dict(r_cut=4.0, n_max=4, l_max=3, sigma=0.5)
    ref = dscribe.SOAP(species=species, periodic=periodic, compression={"mode": mode},
                       **kw).create(atoms)
    soap = SOAP(species, convention="dscribe", compression=mode, **kw)
    X = soap.transform(atoms)
    assert X.shape == ref.shape
    assert soap.n_features == ref.shape[1]
    np.testing.assert_allclose(X, ref, rtol=1e-6, atol=1e-9 * np.abs(ref).max())


def test_feature_counts_and_labels():
    S, N, L1 = len(METALS), 4, 4
    full = SOAP(METALS, n_max=N, l_max=L1 - 1)
    mu1 = SOAP(METALS, n_max=N, l_max=L1 - 1, compression="mu1nu1")
    mu2 = SOAP(METALS, n_max=N, l_max=L1 - 1, compression="mu2")
    assert full.n_features == (S * N) * (S * N + 1) // 2 * L1
    assert mu1.n_features == S * N * N * L1
    assert mu2.n_features == N * (N + 1) // 2 * L1
    for s in (full, mu1, mu2):
        assert len(s.feature_labels()) == s.n_features
    # mu1nu1: for Z (sorted by atomic number), for l, for n, for every n'; Z_b = 0 (all species)
    labels = mu1.feature_labels()
    assert labels[0] == (28, 0, 0, 0, 0) and labels[1] == (28, 0, 0, 0, 1)
    assert labels[N * N] == (28, 0, 1, 0, 0)
    assert labels[-1] == (79, 0, L1 - 1, N - 1, N - 1)
    assert mu2.feature_labels()[:N + 1] == [(0, 0, 0, 0, n) for n in range(N)] + [(0, 0, 0, 1, 1)]


def test_mu2_is_the_species_blind_spectrum_and_mu1nu1_its_partial_sums():
    # mu2 equals the full SOAP of the same structure with every atom relabelled to one species;
    # summing mu1nu1 over Z gives the same matrix unpacked (DScribe convention: unit weights)
    atoms = _alloy(4)
    kw = dict(r_cut=4.0, n_max=3, l_max=2, convention="dscribe")
    mu2 = SOAP(METALS, compression="mu2", **kw).transform(atoms)
    blind = atoms.copy()
    blind.symbols = "Cu" * len(atoms)
    np.testing.assert_allclose(mu2, SOAP(["Cu"], **kw).transform(blind), rtol=1e-12, atol=1e-13)
    mu1 = SOAP(METALS, compression="mu1nu1", **kw).transform(atoms)
    summed = mu1.reshape(len(atoms), len(METALS), 3, 3, 3).sum(axis=1)   # (i, l, n, n')
    iu = np.triu_indices(3)
    packed = np.stack([summed[:, l][:, iu[0], iu[1]] for l in range(3)], axis=1)
    np.testing.assert_allclose(packed.reshape(len(atoms), -1), mu2, rtol=1e-10, atol=1e-12)


def test_smooth_convention_packed_dot_is_the_full_inner_product():
    # smooth mu2 packs the symmetric per-l matrix with sqrt(2) off the diagonal and mu1nu1 keeps
    # every (n, n') with factor 1, so p . q is the Frobenius inner product of the matrices in both
    a, b = _alloy(5), _alloy(6)
    kw = dict(r_cut=4.0, n_max=3, l_max=2)
    mu2 = SOAP(METALS, compression="mu2", **kw)
    mu1 = SOAP(METALS, compression="mu1nu1", **kw)

    def unpack(x):   # mu2 features -> (l, n, n') matrices, undoing the packing factors only
        M = np.zeros((3, 3, 3))
        for v, (_, _, l, n, n2) in zip(x, mu2.feature_labels(), strict=True):
            M[l, n, n2] = M[l, n2, n] = v / (1.0 if n == n2 else np.sqrt(2.0))
        return M

    p, q = mu2.transform(a)[0], mu2.transform(b)[0]
    Mp, Mq = unpack(p), unpack(q)
    assert np.isclose(p @ q, np.sum(Mp * Mq), rtol=1e-12)
    # the same matrix from mu1nu1 summed over Z: both modes share one normalisation of entries
    summed = mu1.transform(a)[0].reshape(len(METALS), 3, 3, 3).sum(axis=0)
    np.testing.assert_allclose(summed, Mp, rtol=1e-10, atol=1e-12 * np.abs(Mp).max())
    assert np.abs(Mp - Mp.transpose(0, 2, 1)).max() < 1e-12 * np.abs(Mp).max()


# -- gradients -------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("convention,normalize", [("smooth", False), ("dscribe", False),
                                                  ("smooth", True)])
def test_gradients_match_central_differences(mode, convention, normalize):
    atoms = _triclinic(2)
    soap = SOAP(["Cu", "Ag", "Au"], r_cut=3.5, n_max=3, l_max=3, convention=convention,
                normalize=normalize, compression=mode)
    X, G = soap.transform(atoms, gradients=True)
    dense = _dense(G, len(atoms), soap.n_features)
    fd = _fd_positions(soap, atoms)
    np.testing.assert_allclose(dense, fd, atol=1e-6 * np.abs(fd).max())
    np.testing.assert_allclose(G.strain(), _fd_strain(soap, atoms),
                               atol=2e-6 * np.abs(G.strain()).max())


@pytest.mark.parametrize("mode", MODES)
def test_gradients_on_a_molecule(mode):
    atoms = molecule("H2O")
    atoms.rattle(0.05, seed=3)
    soap = SOAP(["H", "O"], r_cut=3.5, n_max=3, l_max=2, compression=mode)
    _, G = soap.transform(atoms, gradients=True)
    fd = _fd_positions(soap, atoms)
    np.testing.assert_allclose(_dense(G, 3, soap.n_features), fd, atol=1e-6 * np.abs(fd).max())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("normalize", [False, True])
def test_backprop_equals_contraction_with_pair_gradients(mode, normalize):
    atoms = _alloy(7)
    soap = SOAP(METALS, r_cut=4.0, n_max=3, l_max=3, normalize=normalize, compression=mode)
    w = np.random.default_rng(1).standard_normal((len(atoms), soap.n_features))
    X, V, forces, virial = soap.backprop(atoms, lambda X: 2 * w * X)
    X2, G = soap.transform(atoms, gradients=True)
    assert np.array_equal(X, X2)
    np.testing.assert_array_equal(V, 2 * w * X)
    fe = np.einsum("kaf,kf->ka", G.values, V[G.centers])
    ref = np.zeros_like(forces)
    np.add.at(ref, G.neighbors, -fe)
    np.testing.assert_allclose(forces, ref, atol=1e-10 * np.abs(ref).max())
    np.testing.assert_allclose(virial, fe.T @ G.vectors, atol=1e-10 * np.abs(virial).max())


# -- invariances and threads -----------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_rotation_translation_permutation_and_lattice_invariance(mode):
    atoms = _alloy(8)
    soap = SOAP(METALS, r_cut=4.0, n_max=3, l_max=3, compression=mode)
    X = soap.transform(atoms)
    assert np.abs(X).max() > 0
    moved = atoms.copy()
    moved.rotate(37, (1, 2, 3), rotate_cell=True)
    moved.translate([0.3, -1.1, 2.2])
    np.testing.assert_allclose(soap.transform(moved), X, rtol=1e-9, atol=1e-12)
    perm = np.random.default_rng(0).permutation(len(atoms))
    np.testing.assert_allclose(soap.transform(atoms[perm]), X[perm], rtol=1e-12, atol=1e-14)
    shifted = atoms.copy()
    shifted.positions[0] += atoms.cell[1] - atoms.cell[2]
    np.testing.assert_allclose(soap.transform(shifted), X, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_one_and_two_threads_identical(mode):
    atoms = _alloy(9, repeat=(2, 2, 1))
    soap = SOAP(METALS, r_cut=4.0, n_max=3, l_max=2, compression=mode)
    X1, G1 = soap.transform(atoms, gradients=True, n_threads=1)
    X2, G2 = soap.transform(atoms, gradients=True, n_threads=2)
    assert np.array_equal(X1, X2) and np.array_equal(G1.values, G2.values)


def test_compression_off_is_the_default_full_spectrum():
    atoms = _alloy(10)
    a = SOAP(METALS, r_cut=4.0, n_max=3, l_max=2)
    b = SOAP(METALS, r_cut=4.0, n_max=3, l_max=2, compression="off")
    assert a.n_features == b.n_features
    assert np.array_equal(a.transform(atoms), b.transform(atoms))


# -- parameters ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["MU2", "crossover", "", None, {"mode": "mu2"}, 1, True])
def test_bad_compression_raises_value_error(bad):
    with pytest.raises(ValueError, match="compression"):
        SOAP(METALS, compression=bad)
    soap = SOAP(METALS, compression="mu2")
    with pytest.raises(ValueError, match="compression"):
        soap.set_params(compression=bad)


def test_params_round_trip_and_set_params_relayout():
    soap = SOAP(METALS, r_cut=4.0, n_max=3, l_max=2, compression="mu1nu1")
    again = SOAP(**soap.get_params())
    atoms = _alloy(11)
    assert np.array_equal(soap.transform(atoms), again.transform(atoms))
    from kmlip.descriptors.base import Descriptor
    assert Descriptor.from_dict(soap.to_dict()).get_params() == soap.get_params()
    soap.set_params(compression="mu2")
    assert soap.n_features == 3 * 4 // 2 * 3
    assert soap.transform(atoms).shape == (len(atoms), soap.n_features)


# -- a potential -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_kernel_potential_fits_with_compressed_soap(mode):
    from ase.calculators.emt import EMT

    from kmlip.model import KernelPotential

    def frames(n, seed):
        rng = np.random.default_rng(seed)
        out = []
        for _ in range(n):
            a = bulk("Cu", "fcc", a=3.75, cubic=True)
            a.symbols = rng.choice(["Cu", "Ag", "Au"], len(a))
            a.rattle(0.1, seed=int(rng.integers(1 << 30)))
            a.calc = EMT()
            a.get_potential_energy()
            a.get_forces()
            out.append(a)
        return out

    train, test = frames(12, 0), frames(4, 1)
    soap = SOAP(["Cu", "Ag", "Au"], r_cut=4.0, n_max=4, l_max=3, compression=mode)
    model = KernelPotential(soap, n_sparse=30, zeta=2, sigma_energy=0.002, sigma_force=0.05,
                            random_state=0, n_threads=1)
    model.fit(train)
    F = np.concatenate(model.predict_forces(test))
    F_ref = np.concatenate([a.get_forces() for a in test])
    assert np.sqrt(np.mean((F - F_ref) ** 2)) < 0.6 * np.sqrt(np.mean(F_ref ** 2))
    atoms = test[0]
    F0 = model.predict_forces(atoms)
    fd = fd_forces(lambda a: model.predict(a)[0], atoms, h=1e-4)
    np.testing.assert_allclose(F0, fd, atol=1e-5 * max(1.0, np.abs(fd).max()))
