"""Linked-cell neighbour list against ASE's ``neighbor_list('ijdDS')``."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.neighborlist import neighbor_list as ase_neighbor_list

from kmlip.neighbors import NeighborList, neighbor_list, neighbor_list_arrays

TOL = 1e-12


def _ase_pairs(atoms: Atoms, cutoff: float) -> dict:
    i, j, d, D, S = ase_neighbor_list("ijdDS", atoms, cutoff, self_interaction=False)
    return {(int(a), int(b), tuple(int(x) for x in s)): (dd, v)
            for a, b, s, dd, v in zip(i, j, S, d, D, strict=True)}


def _check_structure(nl: NeighborList, positions, cell, cutoff: float) -> None:
    """Dtypes, shapes, sortedness, offsets, geometry and i<->j symmetry of a list."""
    n = nl.n_atoms
    p = nl.n_pairs
    assert n == len(positions)
    for arr, dtype, shape in [
        (nl.centers, np.int64, (p,)), (nl.neighbors, np.int64, (p,)),
        (nl.shifts, np.int64, (p, 3)), (nl.vectors, np.float64, (p, 3)),
        (nl.distances, np.float64, (p,)), (nl.offsets, np.int64, (n + 1,)),
    ]:
        assert arr.dtype == dtype
        assert arr.shape == shape
        assert arr.flags.c_contiguous
    # offsets are the CSR starts of the centres
    assert nl.offsets[0] == 0 and nl.offsets[-1] == p
    np.testing.assert_array_equal(np.diff(nl.offsets), np.bincount(nl.centers, minlength=n))
    for i in range(n):
        assert np.all(nl.centers[nl.offsets[i]:nl.offsets[i + 1]] == i)
    # strictly increasing in (i, j, S) lexicographic order (no duplicates)
    if p > 1:
        keys = np.column_stack([nl.centers, nl.neighbors, nl.shifts])
        diff = keys[1:] - keys[:-1]
        first_nonzero = diff[np.arange(p - 1), np.argmax(diff != 0, axis=1)]
        assert np.all(first_nonzero > 0)
    # geometry from the original positions
    pos = np.asarray(positions, dtype=float)
    cell = np.asarray(cell, dtype=float)
    vec = pos[nl.neighbors] - pos[nl.centers] + nl.shifts @ cell
    np.testing.assert_allclose(nl.vectors, vec, rtol=0, atol=TOL)
    np.testing.assert_allclose(nl.distances, np.linalg.norm(nl.vectors, axis=1), rtol=0, atol=TOL)
    assert np.all(nl.distances < cutoff)
    self_zero = (nl.centers == nl.neighbors) & np.all(nl.shifts == 0, axis=1)
    assert not np.any(self_zero)
    # full list: (i, j, S) present iff (j, i, -S) present, with the same distance
    fwd = {(a, b, tuple(s)): d for a, b, s, d in
           zip(nl.centers.tolist(), nl.neighbors.tolist(), nl.shifts.tolist(), nl.distances,
                                           strict=True)}
    for (a, b, s), d in fwd.items():
        back = fwd[(b, a, tuple(-x for x in s))]
        assert abs(back - d) <= TOL


def _compare_with_ase(atoms: Atoms, cutoff: float, **kw) -> NeighborList:
    nl = neighbor_list(atoms, cutoff, **kw)
    _check_structure(nl, atoms.positions, atoms.cell.array, cutoff)
    ref = _ase_pairs(atoms, cutoff)
    ours = {(int(a), int(b), tuple(int(x) for x in s)): (dd, v) for a, b, s, dd, v in
            zip(nl.centers, nl.neighbors, nl.shifts, nl.distances, nl.vectors, strict=True)}
    assert len(ours) == nl.n_pairs
    assert set(ours) == set(ref), (
        f"missing {sorted(set(ref) - set(ours))[:5]}, extra {sorted(set(ours) - set(ref))[:5]}")
    keys = list(ref)
    if keys:
        np.testing.assert_allclose([ours[k][0] for k in keys], [ref[k][0] for k in keys],
                                   rtol=0, atol=TOL)
        np.testing.assert_allclose([ours[k][1] for k in keys], [ref[k][1] for k in keys],
                                   rtol=0, atol=TOL)
    return nl


def _random_triclinic(rng: np.random.Generator, skew: float = 0.8) -> np.ndarray:
    lengths = rng.uniform(6.0, 10.0, 3)
    cell = np.diag(lengths)
    cell[1, 0] = skew * lengths[1] * rng.uniform(-1, 1)
    cell[2, 0] = skew * lengths[2] * rng.uniform(-1, 1)
    cell[2, 1] = skew * lengths[2] * rng.uniform(-1, 1)
    # random rotation so no cell vector is axis-aligned
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return cell @ q


def _random_atoms(rng, cell, n, pbc, frac_range=(0.0, 1.0)) -> Atoms:
    frac = rng.uniform(*frac_range, size=(n, 3))
    return Atoms(f"Si{n}", positions=frac @ cell, cell=cell, pbc=pbc)


@pytest.mark.parametrize("seed", range(5))
def test_random_triclinic_periodic(seed):
    rng = np.random.default_rng(seed)
    cell = _random_triclinic(rng)
    atoms = _random_atoms(rng, cell, 40, True)
    nl = _compare_with_ase(atoms, rng.uniform(3.5, 5.5))
    assert nl.n_pairs > 0


def test_strongly_skewed_cell():
    cell = np.array([[8.0, 0.0, 0.0], [7.6, 1.5, 0.0], [-7.2, 1.2, 2.5]])
    rng = np.random.default_rng(11)
    atoms = _random_atoms(rng, cell, 12, True)
    _compare_with_ase(atoms, 4.5)
    atoms.pbc = [True, True, False]
    _compare_with_ase(atoms, 4.5)


@pytest.mark.parametrize("seed", [3, 4])
def test_dense_system_uses_several_bins(seed, monkeypatch):
    # 250 atoms in a ~12 Å box: several bins per direction; half-cutoff bins when dense.
    import kmlip.neighbors as nbm

    fractions = []
    orig = nbm._bin_counts

    def spy(width, rc, fraction):
        fractions.append(fraction)
        return orig(width, rc, fraction)

    monkeypatch.setattr(nbm, "_bin_counts", spy)
    rng = np.random.default_rng(seed)
    cell = _random_triclinic(rng, skew=0.3) * (12.0 / 8.0)
    atoms = _random_atoms(rng, cell, 250, True)
    _compare_with_ase(atoms, 3.0)
    assert fractions == [1.0]       # full-cutoff bins
    _compare_with_ase(atoms, 5.0)
    assert fractions == [1.0, 1.0, 0.5]   # dense: half-cutoff bins


@pytest.mark.parametrize("pbc", list(itertools.product([False, True], repeat=3)))
def test_partial_pbc(pbc):
    rng = np.random.default_rng(sum(2**k * b for k, b in enumerate(pbc)))
    cell = _random_triclinic(rng)
    atoms = _random_atoms(rng, cell, 30, pbc, frac_range=(-0.3, 1.3))
    nl = _compare_with_ase(atoms, 4.5)
    for k in range(3):
        if not pbc[k]:
            assert np.all(nl.shifts[:, k] == 0)


def test_nonperiodic_cell_rows_are_irrelevant():
    rng = np.random.default_rng(5)
    cell = _random_triclinic(rng)
    atoms = _random_atoms(rng, cell, 30, [True, False, True], frac_range=(-0.5, 1.5))
    ref = _compare_with_ase(atoms, 4.0)
    other = cell.copy()
    other[1] = [0.0, 0.0, 0.0]
    nl = neighbor_list_arrays(atoms.positions, other, atoms.pbc, 4.0)
    for name in ("centers", "neighbors", "shifts", "vectors", "distances", "offsets"):
        np.testing.assert_array_equal(getattr(nl, name), getattr(ref, name))


@pytest.mark.parametrize("factor", [1.7, 3.02])
def test_fcc_primitive_cutoff_larger_than_cell(factor):
    a = 3.6
    atoms = bulk("Cu", "fcc", a=a)   # one atom per cell
    nl = _compare_with_ase(atoms, factor * a)
    # every pair is a periodic self-image
    assert np.all(nl.centers == 0) and np.all(nl.neighbors == 0)
    assert nl.n_pairs == {1.7: 78, 3.02: 458}[factor]   # 3.02 a includes the 3 a shell


def test_fcc_shell_counts():
    # 12 + 6 + 24 + 12 neighbours within the 4th shell of fcc (a/sqrt2, a, a*sqrt(3/2), a*sqrt2).
    a = 3.6
    nl = neighbor_list(bulk("Cu", "fcc", a=a), 1.45 * a)
    assert nl.n_pairs == 54
    np.testing.assert_allclose(np.sort(nl.distances)[:12], a / np.sqrt(2), rtol=1e-14)


def test_skewed_two_atom_cell_many_images():
    cell = np.array([[2.5, 0.0, 0.0], [2.1, 1.9, 0.0], [0.7, -1.6, 2.2]])
    atoms = Atoms("CO", scaled_positions=[[0.1, 0.2, 0.3], [0.6, 0.55, 0.8]], cell=cell, pbc=True)
    nl = _compare_with_ase(atoms, 7.3)
    assert np.any((nl.centers == nl.neighbors) & np.any(nl.shifts != 0, axis=1))
    assert np.max(np.abs(nl.shifts)) >= 3
    # a wire / slab of the same cell with a large cutoff
    for pbc in ([True, False, False], [True, False, True]):
        atoms.pbc = pbc
        _compare_with_ase(atoms, 6.1)


def test_benzene_molecule():
    atoms = molecule("C6H6")
    assert not atoms.pbc.any() and np.allclose(atoms.cell.array, 0.0)
    nl = _compare_with_ase(atoms, 3.0)
    # every C has its two C neighbours at ~1.4 Å within a 1.5 Å cutoff
    nl = _compare_with_ase(atoms, 1.5)
    is_c = atoms.numbers == 6
    cc = is_c[nl.centers] & is_c[nl.neighbors]
    assert cc.sum() == 12


def test_molecule_far_outside_its_cell():
    atoms = molecule("C6H6")
    atoms.cell = [[4.0, 0.0, 0.0], [1.0, 5.0, 0.0], [0.0, 0.0, 3.0]]
    atoms.positions += [250.0, -80.0, 40.0]
    ref = neighbor_list(molecule("C6H6"), 3.0)
    nl = _compare_with_ase(atoms, 3.0)
    for name in ("centers", "neighbors", "shifts", "offsets"):
        np.testing.assert_array_equal(getattr(nl, name), getattr(ref, name))


@pytest.mark.parametrize("seed", range(3))
def test_random_sparse_cluster_zero_cell(seed):
    # clumps of atoms far apart (bin count is capped), zero cell, pbc False
    rng = np.random.default_rng(100 + seed)
    centres = rng.uniform(-2000.0, 2000.0, size=(6, 3))
    pos = np.concatenate([c + rng.normal(0.0, 1.5, size=(8, 3)) for c in centres])
    pos[0] = [1.0e4, 0.0, 0.0]    # one isolated atom very far away
    atoms = Atoms(f"Ar{len(pos)}", positions=pos)
    nl = _compare_with_ase(atoms, 3.5)
    assert nl.offsets[1] == nl.offsets[0]    # the isolated atom has no neighbours
    assert nl.n_pairs > 0


@pytest.mark.parametrize("pbc", [True, (True, False, True)])
def test_atoms_outside_periodic_cell(pbc):
    rng = np.random.default_rng(21)
    cell = _random_triclinic(rng)
    atoms = _random_atoms(rng, cell, 25, pbc, frac_range=(-3.0, 4.0))
    nl = _compare_with_ase(atoms, 4.5)
    # same pairs as the wrapped structure, with shifts changed by the wrap
    wrapped = atoms.copy()
    wrapped.wrap()
    nlw = neighbor_list(wrapped, 4.5)
    np.testing.assert_array_equal(nl.centers, nlw.centers)
    np.testing.assert_allclose(np.sort(nl.distances), np.sort(nlw.distances), rtol=0, atol=TOL)
    assert not np.array_equal(nl.shifts, nlw.shifts)


def test_empty_and_single_atom():
    for atoms in (Atoms(), Atoms(cell=np.eye(3) * 5.0, pbc=True)):
        nl = neighbor_list(atoms, 3.0)
        assert nl.n_atoms == 0 and nl.n_pairs == 0
        assert nl.shifts.shape == (0, 3) and nl.vectors.shape == (0, 3)
        assert nl.offsets.shape == (1,) and nl.offsets[0] == 0
    one = Atoms("H", positions=[[1.0, 2.0, 3.0]])
    nl = neighbor_list(one, 3.0)
    _check_structure(nl, one.positions, one.cell.array, 3.0)
    assert nl.n_pairs == 0 and nl.offsets.tolist() == [0, 0]
    # single atom in a large periodic cell: no image within the cutoff
    one = Atoms("H", positions=[[1.0, 2.0, 3.0]], cell=np.eye(3) * 10.0, pbc=True)
    assert neighbor_list(one, 3.0).n_pairs == 0
    # ... and in a small one: the six nearest images
    one.cell = np.eye(3) * 2.0
    nl = _compare_with_ase(one, 2.5)
    assert nl.n_pairs == 6
    assert len(nl) == nl.n_pairs


def test_arrays_entry_point_and_threads_agree():
    rng = np.random.default_rng(7)
    cell = _random_triclinic(rng) * 6.0   # about 0.05 atoms / Å^3
    atoms = _random_atoms(rng, cell, 5000, [True, True, False])
    a = neighbor_list(atoms, 3.0, n_threads=1)
    b = neighbor_list_arrays(atoms.positions.tolist(), cell.tolist(), [1, 1, 0], 3, n_threads=2)
    for name in ("centers", "neighbors", "shifts", "vectors", "distances", "offsets"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    _check_structure(a, atoms.positions, cell, 3.0)


def test_result_is_frozen():
    nl = neighbor_list(molecule("H2O"), 2.0)
    with pytest.raises(AttributeError):
        nl.n_atoms = 5


# ---- validation -----------------------------------------------------------------------------

POS = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
CELL = np.eye(3) * 5.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_positions(bad):
    pos = POS.copy()
    pos[1, 2] = bad
    with pytest.raises(ValueError, match="positions"):
        neighbor_list_arrays(pos, CELL, True, 3.0)
    with pytest.raises(ValueError, match="positions"):
        neighbor_list(Atoms("H2", positions=pos), 3.0)


@pytest.mark.parametrize("cutoff", [0.0, -1.0, np.nan, np.inf])
def test_bad_cutoff_value(cutoff):
    with pytest.raises(ValueError, match="cutoff"):
        neighbor_list_arrays(POS, CELL, True, cutoff)


@pytest.mark.parametrize("cutoff", ["3.0", None, True, [3.0]])
def test_bad_cutoff_type(cutoff):
    with pytest.raises(TypeError, match="cutoff"):
        neighbor_list_arrays(POS, CELL, True, cutoff)


@pytest.mark.parametrize("cell, pbc", [
    (np.zeros((3, 3)), True),
    (np.zeros((3, 3)), [False, True, False]),
    (np.diag([5.0, 5.0, 0.0]), True),
    ([[5.0, 0, 0], [10.0, 0, 0], [0, 0, 5.0]], [True, True, False]),   # parallel vectors
    ([[5.0, 0, 0], [0, 5.0, 0], [5.0, 5.0, 0]], True),                 # coplanar vectors
])
def test_singular_periodic_cell(cell, pbc):
    with pytest.raises(ValueError, match="singular"):
        neighbor_list_arrays(POS, cell, pbc, 3.0)


def test_singular_cell_is_fine_along_non_periodic_directions():
    nl = neighbor_list_arrays(POS, np.diag([5.0, 5.0, 0.0]), [True, True, False], 3.0)
    assert nl.n_pairs == 2
    nl = neighbor_list_arrays(POS, np.zeros((3, 3)), False, 3.0)
    assert nl.n_pairs == 2


def test_non_finite_cell():
    cell = CELL.copy()
    cell[0, 1] = np.nan
    with pytest.raises(ValueError, match="cell"):
        neighbor_list_arrays(POS, cell, True, 3.0)


@pytest.mark.parametrize("pos, cell, pbc", [
    (np.zeros((2, 2)), CELL, True),
    (np.zeros(3), CELL, True),
    (POS, np.eye(2), True),
    (POS, np.ones(3), True),
    (POS, CELL, [True, False]),
])
def test_wrong_shapes(pos, cell, pbc):
    with pytest.raises(ValueError, match="shape"):
        neighbor_list_arrays(pos, cell, pbc, 3.0)


def test_wrong_types():
    with pytest.raises(TypeError, match="positions"):
        neighbor_list_arrays([["a", "b", "c"]], CELL, True, 3.0)
    with pytest.raises(TypeError, match="pbc"):
        neighbor_list_arrays(POS, CELL, [0.5, 1.0, 0.0], 3.0)
    with pytest.raises(TypeError, match="atoms"):
        neighbor_list(POS, 3.0)


def test_cutoff_too_large_for_cell():
    with pytest.raises(ValueError, match="too large"):
        neighbor_list_arrays(POS, np.eye(3) * 0.01, True, 1.0e4)
