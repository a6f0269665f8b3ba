"""Robustness of the public surface against bad input.

Descriptor parameters: validation (type and range, naming the parameter), get_params identity,
scikit-learn clone, set_params that validates and leaves the descriptor unchanged on failure,
and model-file descriptions that give ValueError for anything malformed.

Then an audit of the API and the command line: structures (NaN, singular cells, overlapping
atoms, unknown species), labels, estimator parameters, model files, the calculator, the
uncertainty gate, the Ewald baseline and every subcommand: bad input gets a TypeError/ValueError
naming the cause (one line on stderr and exit status 2 at the CLI) and leaves no file
half-written; valid but unusual input (cells smaller than the cutoff, slabs, huge coordinates)
gets the exact answer of an equivalent ordinary structure."""
import contextlib
import io
import json
import os
import pickle
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read, write
from conftest import cual_cells
from sklearn.base import clone

import kmlip
from kmlip import KernelPotential, KMLIPCalculator
from kmlip.cli.main import main
from kmlip.descriptors.base import MAX_FEATURES, Descriptor
from kmlip.descriptors.histogram import PairHistogram
from kmlip.descriptors.soap import SOAP

SOAP_KW = dict(species=["Cu", "Al"], r_cut=4.0, n_max=3, l_max=2, sigma=0.5)
D2B_KW = dict(species=["Cu", "Al"], r_cut=4.5, n_max=6)

# (parameter, bad value, exception, words the message must contain besides the name)
SOAP_BAD = [
    ("normalize", "no", TypeError, "True or False"),
    ("normalize", 1, TypeError, "True or False"),
    ("normalize", None, TypeError, "True or False"),
    ("species", ["X"], ValueError, "dummy"),
    ("species", ["Cu", 0], ValueError, "dummy"),
    ("species", "Cu", TypeError, "list"),
    ("species", [], ValueError, "empty"),
    ("species", ["Cu", "Cu"], ValueError, "more than once"),
    ("species", ["Cu", 29], ValueError, "more than once"),
    ("species", ["Xx"], ValueError, "unknown"),
    ("species", [119], ValueError, "atomic number"),
    ("species", [29.0], TypeError, "atomic numbers"),
    ("species", {"Cu": 1}, TypeError, "list"),
    ("n_max", 10**6, ValueError, "linearly dependent"),
    ("n_max", 21, ValueError, "<= 20"),
    ("n_max", 0, ValueError, ">= 1"),
    ("n_max", 2.5, TypeError, "int"),
    ("n_max", True, TypeError, "int"),
    ("n_max", "8", TypeError, "int"),
    ("l_max", 10**9, ValueError, "<= 20"),
    ("l_max", -1, ValueError, ">= 0"),
    ("l_max", np.float64(3), TypeError, "int"),
    ("r_cut", True, TypeError, "real number"),
    ("r_cut", "5", TypeError, "real number"),
    ("r_cut", None, TypeError, "real number"),
    ("r_cut", float("nan"), ValueError, "finite"),
    ("r_cut", float("inf"), ValueError, "finite"),
    ("r_cut", 0.5, ValueError, ">= 1"),
    ("r_cut", -3.0, ValueError, ">= 1"),
    ("sigma", False, TypeError, "real number"),
    ("sigma", 0.0, ValueError, "> 0"),
    ("sigma", -0.1, ValueError, "> 0"),
    ("cutoff_width", True, TypeError, "real number"),
    ("cutoff_width", -0.1, ValueError, ">= 0"),
    ("cutoff_width", 4.5, ValueError, "r_cut"),
    ("center_weight", True, TypeError, "real number"),
    ("center_weight", float("nan"), ValueError, "finite"),
    ("convention", "quip", ValueError, "one of"),
    ("convention", None, TypeError, "str"),
    ("n_threads", 0, ValueError, "[1,"),
    ("n_threads", 10**6, ValueError, "[1,"),
    ("n_threads", 2.0, TypeError, "int"),
    ("n_threads", True, TypeError, "int"),
]


@pytest.mark.parametrize("name, value, exc, words", SOAP_BAD,
                         ids=[f"{n}={v!r}"[:40] for n, v, _, _ in SOAP_BAD])
def test_soap_rejects_bad_parameters(name, value, exc, words):
    with pytest.raises(exc) as info:
        SOAP(**{**SOAP_KW, name: value})
    msg = str(info.value)
    assert name in msg and words in msg, msg
    # set_params validates the same way and leaves the descriptor as it was
    soap = SOAP(**SOAP_KW)
    before = soap.get_params()
    X = soap.transform(bulk("Cu", cubic=True))
    with pytest.raises(exc):
        soap.set_params(**{name: value})
    assert soap.get_params() == before
    assert np.array_equal(soap.transform(bulk("Cu", cubic=True)), X)


def test_soap_feature_count_is_bounded_before_allocating():
    # 60 species, n_max 16, l_max 20: 10^7 features per atom; refused by arithmetic, instantly
    species = list(range(1, 61))
    with pytest.raises(ValueError, match="features per atom") as info:
        SOAP(species=species, r_cut=8.0, n_max=16, l_max=20)
    assert f"{MAX_FEATURES:,}" in str(info.value)


def test_soap_accepts_numpy_scalars_and_bools():
    soap = SOAP(species=np.array(["Cu", "Al"]), r_cut=np.float32(4.0), n_max=np.int64(3),
                l_max=np.int32(2), sigma=0.5, normalize=np.bool_(True))
    ref = SOAP(**SOAP_KW, normalize=True)
    atoms = bulk("Cu", cubic=True)
    assert np.array_equal(soap.transform(atoms), ref.transform(atoms))
    # model-file form is plain JSON and rebuilds the same descriptor
    d = soap.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["params"]["normalize"] is True and d["params"]["n_max"] == 3
    assert np.array_equal(Descriptor.from_dict(d).transform(atoms), ref.transform(atoms))


@pytest.mark.parametrize("make", [lambda: SOAP(**SOAP_KW, normalize=True),
                                  lambda: PairHistogram(**D2B_KW, width=0.4)],
                         ids=["SOAP", "PairHistogram"])
def test_get_params_identity_and_clone(make):
    species = ["Cu", "Al"]
    desc = make()
    desc.set_params(species=species)
    params = desc.get_params()
    assert params["species"] is species  # the very object passed
    assert desc.get_params(deep=False) == params
    twin = clone(desc)  # sklearn checks `param is passed_param` for every parameter
    assert type(twin) is type(desc) and twin is not desc
    assert twin.get_params() == params
    atoms = bulk("Cu", cubic=True)
    atoms.symbols[1] = "Al"
    assert np.array_equal(twin.transform(atoms), desc.transform(atoms))
    again = pickle.loads(pickle.dumps(desc))
    assert np.array_equal(again.transform(atoms), desc.transform(atoms))
    assert repr(desc).startswith(type(desc).__name__ + "(species=['Cu', 'Al']")


def test_clone_of_a_model_with_a_descriptor():
    from kmlip.model import KernelPotential

    model = KernelPotential(descriptor=SOAP(**SOAP_KW), n_sparse=5)
    twin = clone(model)
    assert twin.descriptor is not model.descriptor
    assert twin.descriptor.get_params() == model.descriptor.get_params()


def test_set_params_unknown_name():
    soap = SOAP(**SOAP_KW)
    with pytest.raises(ValueError, match="invalid parameter 'nmax'"):
        soap.set_params(nmax=4)
    soap.set_params(n_max=4, l_max=3)
    assert soap.n_features == (2 * 4) * (2 * 4 + 1) // 2 * 4


D2B_BAD = [
    ("species", ["X"], ValueError, "dummy"),
    ("species", "Cu", TypeError, "list"),
    ("species", [], ValueError, "empty"),
    ("r_cut", 0.5, ValueError, "> 0.5"),
    ("r_cut", float("inf"), ValueError, "finite"),
    ("r_cut", True, TypeError, "real number"),
    ("n_max", 1, ValueError, ">= 2"),
    ("n_max", 10**12, ValueError, "<= 1000"),
    ("n_max", 8.0, TypeError, "int"),
    ("width", 0.0, ValueError, "> 0"),
    ("width", "wide", TypeError, "real number"),
    ("cutoff_width", 0.0, ValueError, "> 0"),
    ("cutoff_width", 9.0, ValueError, "r_cut"),
]


@pytest.mark.parametrize("name, value, exc, words", D2B_BAD,
                         ids=[f"{n}={v!r}"[:40] for n, v, _, _ in D2B_BAD])
def test_pair_histogram_rejects_bad_parameters(name, value, exc, words):
    with pytest.raises(exc) as info:
        PairHistogram(**{**D2B_KW, name: value})
    assert name in str(info.value) and words in str(info.value), str(info.value)
    desc = PairHistogram(**D2B_KW)
    with pytest.raises(exc):
        desc.set_params(**{name: value})
    assert desc.get_params() == D2B_KW | {"width": None, "cutoff_width": 0.5}


def test_set_species_order_is_by_atomic_number():
    # a set has no order of its own; layouts must not depend on string hashing
    desc = PairHistogram(species={"Cu", "Al", "Ni"}, r_cut=4.5, n_max=4)
    assert desc.species_z == (13, 28, 29)
    assert desc.to_dict()["params"]["species"] == ["Al", "Ni", "Cu"]
    assert Descriptor.from_dict(desc.to_dict()).species_z == (13, 28, 29)


BAD_DESCRIPTIONS = [
    None, [], "SOAP", {"type": "SOAP"}, {"params": {}},
    {"type": "Nope", "params": {}},
    {"type": ["SOAP"], "params": {}},
    {"type": "SOAP", "params": ["Cu"]},
    {"type": "SOAP", "params": {}},                                        # species missing
    {"type": "SOAP", "params": {"species": ["Cu"], "n_max": 10**9}},
    {"type": "SOAP", "params": {"species": ["Cu"], "n_max": 8.0}},
    {"type": "SOAP", "params": {"species": ["Cu"], "normalize": "no"}},
    {"type": "SOAP", "params": {"species": ["X"]}},
    {"type": "SOAP", "params": {"species": "Cu"}},
    {"type": "SOAP", "params": {"species": [{"Cu": 1}]}},
    {"type": "SOAP", "params": {"species": ["Cu"], "r_cut": None}},
    {"type": "SOAP", "params": {"species": ["Cu"], "bogus": 1}},
    {"type": "PairHistogram", "params": {"species": ["Cu"], "r_cut": 4.0, "n_max": 10**12}},
    {"type": "PairHistogram", "params": {"species": ["Cu"], "r_cut": "4.0"}},
]


@pytest.mark.parametrize("d", BAD_DESCRIPTIONS, ids=range(len(BAD_DESCRIPTIONS)))
def test_from_dict_raises_value_error(d):
    with pytest.raises(ValueError) as info:
        Descriptor.from_dict(d)
    assert type(info.value) is ValueError
    if isinstance(d, dict) and d.get("type") in ("SOAP", "PairHistogram"):
        assert d["type"] in str(info.value)


# ================================================================================================
# Robustness audit of the public API and the command line: bad input gets a TypeError/ValueError
# naming the cause (one line on stderr and exit status 2 at the CLI), never a traceback, a hang,
# a crash or a silent wrong number; valid-but-unusual input gets the exact right answer; a failed
# write never destroys an existing file. Tiny systems (SOAP n_max 2, l_max 2, 5 sparse points).
# ================================================================================================
@contextlib.contextmanager
def _raises(exc, match=None):
    """``pytest.raises`` that also requires the exact type (not a subclass of it)."""
    with pytest.raises(exc, match=match) as info:
        yield info
    types = exc if isinstance(exc, tuple) else (exc,)
    assert type(info.value) in types, f"{type(info.value).__name__}: {info.value}"


TINY = dict(species=["Cu", "Al"], r_cut=3.5, n_max=2, l_max=2, sigma=0.5)


def _tiny_model(**kw) -> KernelPotential:
    return KernelPotential(descriptor=SOAP(**TINY), **{"n_sparse": 5, "random_state": 0,
                                                       "n_threads": 1, **kw})


@pytest.fixture(scope="module")
def frames():
    """Six 8-atom EMT Cu-Al cells with energy, forces and stress."""
    return cual_cells(6, seed=0)


@pytest.fixture(scope="module")
def model(frames):
    """A tiny model fitted on energies, forces and stresses (module-wide; do not mutate)."""
    return _tiny_model(sigma_stress=0.02).fit(frames)


def _relabelled(frames):
    """Copies of ``frames`` with copies of their labels (safe to damage)."""
    out = []
    for a in frames:
        b = a.copy()
        b.calc = SinglePointCalculator(b, **{k: np.copy(v) for k, v in a.calc.results.items()})
        out.append(b)
    return out


def _cu(seed=None) -> Atoms:
    a = bulk("Cu", "fcc", a=3.6, cubic=True)
    a.symbols[1] = "Al"
    if seed is not None:
        a.rattle(0.05, seed=seed)
    return a


# -- structures ----------------------------------------------------------------------------------

def _nan_pos(a):
    a.positions[2, 1] = np.nan


def _inf_pos(a):
    a.positions[0, 0] = np.inf


def _nan_cell(a):
    a.cell[1, 1] = np.nan


def _zero_cell(a):
    a.cell[:] = 0.0


def _singular_cell(a):
    a.cell[1] = a.cell[0]


def _coincident(a):
    a.positions[1] = a.positions[0]


def _too_close(a):
    a.positions[1] = a.positions[0] + 1e-8


def _image_overlap(a):
    # atom 1 on the periodic image of atom 0 one cell vector away: 0 Å between them
    a.positions[1] = a.positions[0] + a.cell[0]


def _unknown_species(a):
    a.symbols[3] = "Fe"


def _dummy_species(a):
    a.numbers[3] = 0


BAD_STRUCTURES = [
    (_nan_pos, "positions contain NaN or inf (atoms [2])"),
    (_inf_pos, "positions contain NaN or inf (atoms [0])"),
    (_nan_cell, "cell contains NaN or inf"),
    (_zero_cell, "zero volume"),
    (_singular_cell, "degenerate periodic vectors"),
    (_coincident, "atoms 0 and 1 are 0 Å apart"),
    (_too_close, "overlapping atoms"),
    (_image_overlap, "(periodic image [-1, 0, 0]) are 0 Å apart"),
    (_unknown_species, "species ['Fe'] unknown to the model"),
    (_dummy_species, "species ['X'] unknown to the model"),
]

BAD_STRUCTURES_BY_NAME = [(d.__name__[1:], w) for d, w in BAD_STRUCTURES]


@pytest.mark.parametrize("damage, words", BAD_STRUCTURES,
                         ids=[d.__name__[1:] for d, _ in BAD_STRUCTURES])
def test_bad_structure_is_refused_everywhere(damage, words, model, frames):
    a = _cu()
    damage(a)
    with _raises(ValueError) as info:
        model.compute(a, ("energy", "forces", "stress"))
    assert words in str(info.value)
    a.calc = KMLIPCalculator(model)
    with _raises(ValueError, match=re.escape(words)):
        a.get_forces()
    # in training data too (fit and the online update)
    bad = _relabelled(frames)
    damage(bad[2])
    with _raises(ValueError) as info:
        _tiny_model().fit(bad)
    assert words.replace("the model", "the descriptor") in str(info.value)
    with _raises(ValueError) as info:
        clone(model).fit(frames[:2]).partial_fit(bad[1:3])
    assert words in str(info.value)


@pytest.mark.parametrize("damage", [_unknown_species, _dummy_species],
                         ids=["unknown_species", "dummy_species"])
def test_fit_names_the_frame_of_unknown_species(damage, model, frames):
    bad = _relabelled(frames)
    damage(bad[2])
    with _raises(ValueError, match=r"^frame 2: species \['(Fe|X)'\] unknown"):
        _tiny_model().fit(bad)
    with _raises(ValueError, match=r"^frame 1: species \['(Fe|X)'\] unknown"):
        clone(model).fit(frames[:2]).partial_fit(bad[1:3])


STRUCTURAL = [(d, w) for d, w in BAD_STRUCTURES if d not in (_unknown_species, _dummy_species)]


@pytest.mark.parametrize("damage, words", STRUCTURAL, ids=[d.__name__[1:] for d, _ in STRUCTURAL])
def test_fit_names_the_frame_of_a_bad_structure(damage, words, frames):
    bad = _relabelled(frames)
    damage(bad[2])
    with _raises(ValueError, match=r"^(frame|structure) 2\b.*" + re.escape(words)):
        _tiny_model().fit(bad)


@pytest.mark.parametrize("side, n_atoms", [(3.6e-3, 4), (0.05, 1), (0.15, 27)])
def test_cells_far_too_small_are_refused_before_the_search(side, n_atoms, model):
    # the search would need 72 bytes per pair: 1.6 GB for one atom in a 0.02 Å cube
    a = Atoms(f"Cu{n_atoms}", cell=[side] * 3, pbc=True)
    a.set_scaled_positions(np.random.default_rng(0).random((n_atoms, 3)))
    with _raises(ValueError, match=r"is too large for the cell: it reaches about .* "
                                         r"neighbours per atom \(more than 1e\+06\); the cell "
                                         r"is far too small for its"):
        model.compute(a, ("energy", "forces"))
    # a slab of the same kind: the estimate from the periodic area
    a.pbc = [True, True, False]
    a.cell[2] = 0.0
    if n_atoms * np.pi * 4.5**2 / side**2 > 1e6:  # cutoff incl. the cutoff of the neighbour list
        with _raises(ValueError, match="far too small"):
            model.compute(a, ("energy",))


@pytest.mark.parametrize("X, exc, words", [
    ("Cu", TypeError, "got str"), (None, TypeError, "got NoneType"),
    ({"numbers": [29]}, TypeError, "got dict"), ([], ValueError, "X is empty"),
    ([bulk("Cu"), "Cu"], TypeError, "X[1] is a str"),
], ids=["str", "None", "dict", "empty", "mixed"])
def test_predict_needs_atoms(X, exc, words, model):
    with _raises(exc, match=re.escape(words)):
        model.predict(X)


def test_compute_rejects_unknown_properties(model):
    with _raises(ValueError, match=r"unknown properties \['magmom'\]"):
        model.compute(_cu(), ("energy", "magmom"))
    with _raises(TypeError, match="properties must be a sequence"):
        model.compute(_cu(), 3)


def test_empty_structure_is_zero(model):
    r = model.compute(Atoms(cell=[3.0, 3.0, 3.0], pbc=True),
                      ("energy", "forces", "stress", "energies_var", "uncertainty"))
    assert r.energy == 0.0 and r.forces.shape == (0, 3) and np.array_equal(r.stress, np.zeros(6))
    assert r.energies_var.shape == (0,) and r.uncertainty.shape == (0,)


def test_cell_smaller_than_cutoff_equals_supercell(model):
    # a 2-atom bcc cell of side 2.9 Å < r_cut 3.5 Å: every neighbour is a periodic image
    a = bulk("Cu", "bcc", a=2.9, cubic=True)
    a.symbols[1] = "Al"
    a.rattle(0.05, seed=4)
    assert a.cell.lengths().max() < TINY["r_cut"]
    props = ("energy", "forces", "stress", "energies_var")
    small, big = model.compute(a, props), model.compute(a.repeat((2, 3, 2)), props)
    assert small.energy == pytest.approx(big.energy / 12, rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(big.forces[:2], small.forces, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(big.stress, small.stress, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(big.energies_var[:2], small.energies_var, rtol=1e-8)


def test_one_atom_in_a_tiny_cell_equals_supercell(model):
    # one atom, cubic cell of 0.9 Å: ~250 images of itself within the cutoff
    a = Atoms("Cu", cell=[0.9, 0.9, 0.9], pbc=True)
    e1 = model.compute(a, ("energy",)).energy
    e8 = model.compute(a.repeat(2), ("energy", "forces"))
    assert e1 == pytest.approx(e8.energy / 8, rel=1e-12)
    np.testing.assert_allclose(e8.forces, 0.0, atol=1e-10)


def test_slab_equals_the_same_slab_in_a_padded_periodic_cell(model):
    slab = _cu(seed=1)
    slab.pbc = [True, True, False]
    padded = slab.copy()
    padded.cell[2] = [0.0, 0.0, 40.0]  # far more vacuum than the cutoff
    padded.pbc = True
    props = ("energy", "forces")
    r, p = model.compute(slab, props), model.compute(padded, props)
    assert r.energy == pytest.approx(p.energy, rel=1e-12)
    np.testing.assert_allclose(r.forces, p.forces, atol=1e-12)
    # the out-of-plane cell vector does not matter, not even a zero one
    slab.cell[2] = 0.0
    assert model.compute(slab, ("energy",)).energy == pytest.approx(r.energy, rel=1e-12)


@pytest.mark.parametrize("pbc", [True, False], ids=["periodic", "cluster"])
def test_huge_coordinates_give_the_same_result(model, pbc):
    a = _cu(seed=2)
    a.pbc = pbc
    far = a.copy()
    far.positions += 1e6 * np.array([1.0, -0.7, 0.3])
    props = ("energy", "forces")
    r, f = model.compute(a, props), model.compute(far, props)
    # positions at 1e6 Å are exact to ~1e-10 Å; the results to about that
    assert f.energy == pytest.approx(r.energy, abs=1e-7)
    np.testing.assert_allclose(f.forces, r.forces, atol=1e-6)


def test_coordinates_beyond_double_precision_are_refused(model):
    a = _cu()
    a.positions[0, 0] = 1e300
    with _raises(ValueError, match="too far outside the periodic cell"):
        model.compute(a, ("energy",))


# -- labels --------------------------------------------------------------------------------------

def _set_result(key, value):
    def damage(a):
        a.calc.results[key] = value
    return damage


def _set_info(key, value):
    def damage(a):
        a.info[key] = value
    return damage


def _drop_labels(a):
    a.calc = None


BAD_LABELS = [
    (_set_result("energy", np.nan), "energy 'energy' is NaN or inf"),
    (_set_result("energy", True), "energy 'energy' is not a number: True"),
    (_set_result("energy", "-3.2"), "energy 'energy' is not a number"),
    (_set_result("energy", np.array([1.0, 2.0])), "energy 'energy' is not a number"),
    (_set_result("forces", np.full((8, 3), np.inf)), "forces 'forces' contain NaN or inf"),
    (_set_result("forces", np.zeros((7, 3))), "have shape (7, 3), expected (8, 3)"),
    (_set_result("forces", np.zeros(24)), "have shape (24,), expected (8, 3)"),
    (_set_result("stress", np.zeros(5)),
     "frame 2: stress 'stress': must have shape (6,), (3, 3) or (9,), got (5,)"),
    (_set_result("stress", ["1"] * 6), "stress 'stress' is not numbers (dtype <U1)"),
    (_set_result("forces", np.full((8, 3), "0.1")), "forces 'forces' are not numbers"),
    (_set_result("forces", np.zeros((8, 3), dtype=bool)), "forces 'forces' are not numbers"),
    (_set_result("stress", np.full(6, np.nan)), "stress 'stress' contains NaN or inf"),
    (_drop_labels, "no energy label 'energy'"),
    (_set_info("energy_sigma", -0.1), "info['energy_sigma'] must be a positive finite number"),
    (_set_info("force_sigma", 0.0), "info['force_sigma'] must be a positive finite number"),
    (_set_info("virial_sigma", np.nan), "info['virial_sigma'] must be a positive finite number"),
    (_set_info("force_sigma", "0.1"), "info['force_sigma'] must be a positive number, got str"),
    (_set_info("energy_sigma", True), "info['energy_sigma'] must be a positive number, got bool"),
    (_set_info("virial_sigma", [0.1, 0.2]), "info['virial_sigma'] must be a positive number"),
]


@pytest.mark.parametrize("damage, words", BAD_LABELS, ids=range(len(BAD_LABELS)))
def test_bad_labels_name_the_frame_and_cause(damage, words, frames):
    bad = _relabelled(frames)
    damage(bad[2])
    m = _tiny_model(sigma_stress=0.02)
    with _raises(ValueError) as info:
        m.fit(bad)
    assert type(info.value) is ValueError
    msg = str(info.value)
    assert msg.startswith("frame 2: ") and words in msg, msg
    assert not hasattr(m, "fitted_state_")


@pytest.mark.parametrize("value, words", [
    (-np.ones(8), "8 positive numbers"), (np.ones((8, 3)), "8 positive numbers"),
    (np.ones(8, dtype=bool), "8 positive numbers"), (np.full(8, np.nan), "8 positive numbers"),
], ids=["negative", "shape", "bool", "nan"])
def test_bad_per_atom_force_sigma(value, words, frames):
    bad = _relabelled(frames)
    bad[4].arrays["force_atom_sigma"] = value
    with _raises(ValueError, match=r"^frame 4: arrays\['force_atom_sigma'\] must be "
                                         + re.escape(words)):
        _tiny_model().fit(bad)


@pytest.mark.parametrize("key, words", [
    ("energy_key", "no energy label 'total_energy'"),
    ("forces_key", "no forces label 'total_energy'"),
    ("stress_key", "no stress label 'total_energy'"),
])
def test_label_keys_pointing_nowhere(key, words, frames):
    with _raises(ValueError, match=r"^frame 0: " + re.escape(words)):
        _tiny_model(sigma_stress=0.02, **{key: "total_energy"}).fit(frames)


def test_valid_per_structure_sigma_changes_only_its_frame(frames):
    # a valid override is used: numpy scalars count as numbers
    good = _relabelled(frames)
    good[2].info["energy_sigma"] = np.float32(1e-3)
    good[3].info["force_sigma"] = np.int64(1)
    _tiny_model().fit(good)


# -- estimator parameters ------------------------------------------------------------------------

BAD_PARAMS = [
    ("delta", -1.0, ValueError, "delta must be a positive finite number"),
    ("delta", 0.0, ValueError, "delta must be a positive finite number"),
    ("delta", float("nan"), ValueError, "delta must be a positive finite number"),
    ("delta", True, TypeError, "delta must be a positive number, got bool"),
    ("delta", "0.2", TypeError, "delta must be a positive number, got str"),
    ("sigma_energy", 0.0, ValueError, "sigma_energy must be a positive finite number"),
    ("sigma_force", float("inf"), ValueError, "sigma_force must be a positive finite number"),
    ("sigma_stress", -0.1, ValueError, "sigma_stress must be a positive finite number"),
    ("sigma_force", "0.02", TypeError, "sigma_force must be a positive number, got str"),
    ("n_sparse", -3, ValueError, "n_sparse must be a non-negative int"),
    ("n_sparse", 2.5, ValueError, "n_sparse must be a non-negative int"),
    ("n_sparse", True, ValueError, "n_sparse must be a non-negative int"),
    ("n_sparse", float("nan"), ValueError, "n_sparse must be a non-negative int"),
    ("n_sparse", {"Cu": -1}, ValueError, "n_sparse['Cu'] must be a non-negative int"),
    ("n_sparse", {"Xx": 3}, ValueError, "'Xx' is not a chemical symbol"),
    ("zeta", 0, ValueError, "zeta must be an integer in [1, 64]"),
    ("zeta", 2.5, ValueError, "zeta must be an integer in [1, 64]"),
    ("zeta", True, ValueError, "zeta must be an integer in [1, 64]"),
    ("zeta", float("nan"), ValueError, "zeta must be an integer in [1, 64]"),
    ("sparse_method", "kmeans", ValueError, "unknown sparse_method 'kmeans'"),
    ("sparse_method", None, TypeError, "sparse_method must be"),
    ("random_state", "x", TypeError, "random_state must be an int"),
    ("n_threads", 0, ValueError, "n_threads must be in [1,"),
    ("n_threads", True, TypeError, "n_threads must be an int"),
    ("jitter", -1.0, ValueError, "jitter must be a finite number >= 0"),
    ("e0", {"Cu": float("nan"), "Al": 0.0}, ValueError, "e0['Cu'] is not finite"),
    ("e0", [1.0], TypeError, "e0 must be a dict"),
    ("block_size", 0, ValueError, "block_size must be a positive int"),
    ("precision", "half", ValueError, "precision must be one of"),
    ("energy_key", 3, TypeError, "energy_key must be a str"),
    ("baseline", "ewald", TypeError, "baseline must have compute(atoms)"),
    ("descriptor", "SOAP", TypeError, "descriptor must be a kmlip descriptor"),
]


@pytest.mark.parametrize("name, value, exc, words", BAD_PARAMS,
                         ids=[f"{n}={v!r}"[:30] for n, v, _, _ in BAD_PARAMS])
def test_bad_estimator_parameters(name, value, exc, words, frames):
    m = KernelPotential(**{"descriptor": SOAP(**TINY), "n_sparse": 5, name: value})
    with _raises(exc) as info:
        m.fit(frames)
    assert type(info.value) is exc and words in str(info.value), str(info.value)
    assert not hasattr(m, "fitted_state_")


def test_both_sigmas_none_is_refused(frames):
    with _raises(ValueError, match="at least one of sigma_energy and sigma_force"):
        _tiny_model(sigma_energy=None, sigma_force=None).fit(frames)


def test_n_sparse_beyond_the_environments_takes_them_all(frames):
    n_atoms = sum(len(a) for a in frames)
    for method in ("cur", "fps", "random"):
        m = _tiny_model(n_sparse=10**6, sparse_method=method).fit(frames)
        assert m.fitted_state_.basis.n_sparse == n_atoms


def test_n_sparse_zero_everywhere_is_refused(frames):
    with _raises(ValueError, match="n_sparse"):
        _tiny_model(n_sparse=0).fit(frames)


def test_n_sparse_for_an_unknown_species_is_refused(frames):
    with _raises(ValueError, match="Fe"):
        _tiny_model(n_sparse={"Fe": 3, "Cu": 2, "Al": 2}).fit(frames)


def test_negative_random_state_names_the_parameter(frames):
    with _raises(ValueError, match="random_state"):
        _tiny_model(random_state=-1).fit(frames)


@pytest.mark.parametrize("call", ["predict", "fit"])
def test_bool_flags_must_be_bools(call, model, frames):
    with _raises(TypeError, match="return_std|optimize"):
        if call == "predict":
            model.predict(frames[0], return_std="yes")
        else:
            _tiny_model().fit(frames, optimize="no")


def test_noise_levels_needs_atoms(model):
    with _raises(TypeError, match="Atoms"):
        model.noise_levels("x")


def test_predict_names_the_bad_structure_of_a_list(model, frames):
    bad = [a.copy() for a in frames]
    bad[3].positions[2, 1] = np.nan
    with _raises(ValueError, match="structure 3"):
        model.predict(bad)


# -- model files ---------------------------------------------------------------------------------

def _bad_model_files(tmp_path, good: bytes):
    files = {
        "empty": b"",
        "truncated_head": good[:10],
        "truncated_half": good[: len(good) // 2],
        "truncated_last_byte": good[:-1],
        "flipped_byte": good[:200] + bytes([good[200] ^ 0xFF]) + good[201:],
        "text": b"3\n\nCu 0 0 0\nCu 1 1 1\nCu 2 2 2\n",
        "binary": np.random.default_rng(0).bytes(500),
    }
    out = {}
    for name, data in files.items():
        p = tmp_path / f"{name}.kmlip"
        p.write_bytes(data)
        out[name] = p
    p = tmp_path / "other.npz"
    np.savez(p, alpha=np.zeros(3))
    out["npz_without_metadata"] = p
    p = tmp_path / "zip.kmlip"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("metadata.npy", b"not an npy array")
    out["zip_bad_member"] = p
    return out


def test_unreadable_model_files(model, tmp_path):
    good = tmp_path / "good.kmlip"
    model.save(good)
    for name, p in _bad_model_files(tmp_path, good.read_bytes()).items():
        with _raises(ValueError) as info:
            kmlip.load(p)
        assert type(info.value) is ValueError and str(info.value).startswith(f"{p}: "), name
    with _raises(ValueError, match="is a directory"):
        kmlip.load(tmp_path)
    with _raises(FileNotFoundError, match="does not exist"):
        kmlip.load(tmp_path / "missing.kmlip")
    with _raises(TypeError):
        kmlip.load(None)


def test_save_errors_name_the_path_and_leave_nothing(model, tmp_path):
    with _raises(ValueError, match=re.escape(f"{tmp_path / 'no' / 'm.kmlip'}: directory "
                                                   f"{tmp_path / 'no'} does not exist")):
        model.save(tmp_path / "no" / "m.kmlip")
    with _raises(ValueError, match="is a directory"):
        model.save(tmp_path)
    with _raises(TypeError, match="path must be a str"):
        model.save(3)
    assert list(tmp_path.iterdir()) == []


def test_failed_writes_keep_the_existing_file(model, tmp_path, monkeypatch):
    path = tmp_path / "m.kmlip"
    model.save(path)
    before = path.read_bytes()

    def half_then_fail(fh, *args, **kwargs):
        fh.write(b"PK\x03\x04 half a model")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", half_then_fail)
    with _raises(OSError, match="No space left"):
        model.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["m.kmlip"]

    import tempfile

    def refuse(*args, **kwargs):  # a read-only directory (also when the tests run as root)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with _raises(PermissionError) as info:
        model.save(path)
    assert info.value.filename == str(path) and "cannot write to directory" in str(info.value)
    monkeypatch.undo()
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["m.kmlip"]
    assert np.array_equal(kmlip.load(path).predict(_cu()), model.predict(_cu()))


# -- calculator ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, exc, words", [
    ({"variances": ("energies", "magmoms")}, ValueError, "unknown variances ['magmoms']"),
    ({"variances": [1]}, ValueError, "unknown variances [1]"),
    ({"variances": None}, TypeError, "variances must be a tuple of names"),
    ({"variances": 3}, TypeError, "variances must be a tuple of names"),
    ({"variances": {"energies": 1}}, TypeError, "variances must be a tuple of names"),
    ({"forces_var": "no"}, TypeError, "forces_var must be True or False"),
], ids=["unknown", "int_name", "None", "int", "dict", "forces_var_str"])
def test_calculator_rejects_bad_arguments(kwargs, exc, words, model):
    with _raises(exc, match=re.escape(words)):
        KMLIPCalculator(model, **kwargs)


def test_calculator_needs_a_fitted_model():
    with _raises(ValueError, match="needs a fitted KernelPotential"):
        KMLIPCalculator(_tiny_model())
    with _raises(ValueError, match="needs a fitted KernelPotential"):
        KMLIPCalculator("model.kmlip")


def test_calculator_properties_the_model_can_and_cannot_give(model, frames):
    from kmlip.calculator import VARIANCES
    from kmlip.descriptors.distance2b import Distance2b

    pair_sum = KernelPotential(descriptor=[Distance2b(species=["Cu", "Al"], r_cut=3.5),
                                           SOAP(**TINY)],
                               n_sparse=[3, 3], zeta=[None, 2], delta=[0.5, 0.2],
                               random_state=0, n_threads=1).fit(frames[:3])
    # every variance the calculator names, a sum of kernels gives too, on every call
    a = frames[0].copy()
    a.calc = KMLIPCalculator(pair_sum, variances=tuple(VARIANCES))
    a.get_forces()
    ref = pair_sum.compute(a, [VARIANCES[v] for v in VARIANCES])
    for name in VARIANCES.values():
        np.testing.assert_allclose(a.calc.results[name], getattr(ref, name), rtol=1e-10)
    # ASE's own error for what no kmlip model computes; no stress without a periodic cell
    with _raises(PropertyNotImplementedError):
        a.get_dipole_moment()
    b = Atoms("CuAl", positions=[[0, 0, 0], [2.5, 0, 0]])
    b.calc = KMLIPCalculator(model)
    with _raises(PropertyNotImplementedError):
        b.get_stress()
    assert np.isfinite(b.get_potential_energy())


# -- uncertainty gate ----------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, exc, words", [
    ({"threshold": -1.0}, ValueError, "threshold must be a positive number"),
    ({"threshold": 0.0}, ValueError, "threshold must be a positive number"),
    ({"threshold": float("nan")}, ValueError, "threshold must be a positive number"),
    ({"threshold": float("inf")}, ValueError, "threshold must be a positive number"),
    ({"relative": -2.0}, ValueError, "relative must be a positive number"),
    ({"threshold": True}, TypeError, "threshold must be a positive number, got bool"),
    ({"threshold": "0.1"}, TypeError, "threshold must be a positive number, got str"),
    ({}, ValueError, "give exactly one of threshold"),
    ({"threshold": 0.1, "relative": 2.0}, ValueError, "give exactly one of threshold"),
], ids=["negative", "zero", "nan", "inf", "relative_negative", "bool", "str", "none", "both"])
def test_gate_rejects_bad_thresholds(kwargs, exc, words, model):
    from kmlip.active import UncertaintyGate

    a = _cu()
    a.calc = KMLIPCalculator(model, variances=("uncertainty",))
    with _raises(exc, match=re.escape(words)):
        UncertaintyGate(a, log=None, **kwargs)


def test_gate_checks_its_output_and_accepts_numpy_numbers(model, tmp_path):
    from ase.md.verlet import VelocityVerlet

    from kmlip.active import UncertaintyGate, run_gated

    a = _cu(seed=3)
    a.calc = KMLIPCalculator(model, variances=("uncertainty",))
    missing = tmp_path / "no" / "tripped.extxyz"
    with _raises(ValueError, match=re.escape(f"directory {tmp_path / 'no'} does not exist")):
        UncertaintyGate(a, threshold=1e-9, log=None, output=missing)
    with _raises(ValueError, match="is a directory"):
        UncertaintyGate(a, threshold=1e-9, log=None, output=tmp_path)
    with _raises(TypeError, match="UncertaintyGate needs atoms whose calculator"):
        UncertaintyGate(_cu(), threshold=0.1, log=None)
    gate = UncertaintyGate(a, threshold=np.float32(0.5), log=None)
    assert gate.threshold == 0.5
    dyn = VelocityVerlet(a, timestep=1.0)
    for steps, exc in ((-1, ValueError), (2.0, TypeError), (True, TypeError), ("3", TypeError)):
        with _raises(exc, match="steps must be a non-negative int"):
            run_gated(dyn, steps, gate)
    assert run_gated(dyn, np.int64(2), gate) == 2
    out = tmp_path / "tripped.extxyz"
    gate = UncertaintyGate(a, threshold=1e-9, log=None, output=out)
    assert run_gated(VelocityVerlet(a, timestep=1.0), 3, gate) == 0
    assert read(out).arrays["uncertainty"].shape == (4,)


# -- Ewald baseline ------------------------------------------------------------------------------

def test_ewald_refuses_overlapping_charges_but_not_close_ones():
    from kmlip.ewald import K_E, Ewald

    ew = Ewald({"Na": 1.0, "Cl": -1.0})
    crystal = bulk("NaCl", "rocksalt", a=5.64).repeat((2, 1, 1))
    crystal.positions[3] = crystal.positions[2] + 1e-9
    with _raises(ValueError, match="charged atoms 2 and 3 are 1.73e-09 Å apart"):
        ew.compute(crystal)
    pair = Atoms("NaCl", positions=[[0, 0, 0], [0, 0, 1e-9]])
    with _raises(ValueError, match="charged atoms 0 and 1"):
        ew.compute(pair)
    # 1e-5 Å is unusual but valid: the bare Coulomb energy, exactly
    pair.positions[1, 2] = 1e-5
    e, f, s = ew.compute(pair)
    assert e == pytest.approx(-K_E / 1e-5, rel=1e-12) and s is None
    np.testing.assert_allclose(f[0], [0, 0, K_E / 1e-10], rtol=1e-12)


# -- command line --------------------------------------------------------------------------------

CLI_FIT = ["--r-cut", "3.5", "--n-max", "2", "--l-max", "2", "--n-sparse", "5", "--seed", "0"]


@pytest.fixture(scope="module")
def cli_files(tmp_path_factory, frames):
    d = tmp_path_factory.mktemp("robust_cli")
    train = d / "train.xyz"
    write(train, frames, format="extxyz")
    model = d / "m.kmlip"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main(["fit", str(train), "-o", str(model), *CLI_FIT]) == 0
    start = d / "start.xyz"
    write(start, _cu(seed=5), format="extxyz")
    bad = {}
    for damage, _ in BAD_STRUCTURES:
        if damage in (_dummy_species,):
            continue
        a = _cu(seed=5)
        damage(a)
        bad[damage.__name__[1:]] = d / f"{damage.__name__[1:]}.xyz"
        write(bad[damage.__name__[1:]], a, format="extxyz")
    return {"dir": d, "train": train, "model": model, "start": start, "bad": bad}


def _fails(capsys, argv, *words, cmd=None, quiet=False):
    """Runs ``kmlip argv``; checks exit 2, exactly one stderr line naming the words (and
    nothing on stdout when ``quiet``: the error came before any work)."""
    capsys.readouterr()
    assert main([str(x) for x in argv]) == 2
    out, err = capsys.readouterr()
    assert not quiet or out == "", out
    # one-line warnings (e.g. about e0) may precede the error; the error is one line
    lines = [ln for ln in err.strip().splitlines() if ": warning: " not in ln]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"kmlip {cmd or argv[0]}: error: "), lines[0]
    for w in words:
        assert str(w) in lines[0], (w, lines[0])
    return lines[0]


def _listing(d):
    return sorted(p.name for p in d.iterdir())


MD_BAD = [
    (["--steps", "-1"], "--steps must be >= 0"),
    (["--temperature", "nan"], "--temperature must be a finite number"),
    (["--temperature", "-5"], "--temperature must be a finite number of kelvin >= 0"),
    (["--timestep", "0"], "--timestep must be in (0, 100] fs"),
    (["--timestep", "inf"], "--timestep must be in (0, 100] fs"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--gate-std", "-0.1"], "--gate-std must be a positive number"),
    (["--gate-relative", "nan"], "--gate-relative must be a positive number"),
    (["--log-interval", "0"], "--log-interval must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--friction", "0.1", "--ensemble", "nve"], "--friction applies to --ensemble nvt only"),
    (["--ensemble", "npt", "--pressure", "nan"], "--pressure must be a finite number"),
]


@pytest.mark.parametrize("extra, words", MD_BAD, ids=[" ".join(e) for e, _ in MD_BAD])
def test_md_bad_options(extra, words, cli_files, capsys, tmp_path):
    out = tmp_path / "traj.xyz"
    opts = {"--steps": "2", "--temperature": "300"}
    for k in range(0, len(extra), 2):
        opts[extra[k]] = extra[k + 1]
    argv = ["md", cli_files["model"], cli_files["start"], "-o", out]
    for k, v in opts.items():
        argv += [k, v]
    _fails(capsys, argv, words)
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("kind", ["nan_pos", "zero_cell", "coincident", "image_overlap",
                                  "unknown_species"])
def test_md_bad_start_structure(kind, cli_files, capsys, tmp_path):
    out = tmp_path / "traj.xyz"
    path = cli_files["bad"][kind]
    words = dict(BAD_STRUCTURES_BY_NAME, zero_cell="periodic directions without cell vectors")[kind]
    _fails(capsys, ["md", cli_files["model"], path, "-o", out, "--steps", "2",
                    "--temperature", "300"], f"{path}: ", words)
    assert _listing(tmp_path) == []


def test_md_outputs_checked_before_any_work(cli_files, capsys, tmp_path):
    base = ["md", cli_files["model"], cli_files["start"], "--steps", "2", "--temperature", "300"]
    _fails(capsys, base + ["-o", tmp_path / "no" / "t.xyz"],
           f"directory {tmp_path / 'no'} does not exist")
    _fails(capsys, base + ["-o", tmp_path], "is a directory")
    _fails(capsys, ["md", tmp_path / "none.kmlip", cli_files["start"], "-o", tmp_path / "t.xyz",
                    "--steps", "2", "--temperature", "300"], "model file does not exist")
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("kind", ["nan_pos", "coincident", "unknown_species"])
def test_predict_and_eval_name_file_and_structure(kind, cli_files, capsys, tmp_path):
    path = cli_files["bad"][kind]
    words = dict(BAD_STRUCTURES_BY_NAME)[kind]
    out = tmp_path / "p.xyz"
    out.write_text("keep me\n")
    _fails(capsys, ["predict", cli_files["model"], path, "-o", out],
           f"{path}: structure 0: ", words)
    _fails(capsys, ["eval", cli_files["model"], path], f"{path}: structure 0: ", words)
    assert out.read_text() == "keep me\n" and _listing(tmp_path) == ["p.xyz"]


def test_fit_errors_name_file_frame_and_keep_the_old_model(cli_files, capsys, tmp_path,
                                                           monkeypatch, frames):
    out = tmp_path / "m.kmlip"
    out.write_bytes(cli_files["model"].read_bytes())
    before = out.read_bytes()
    for damage, words in ((_nan_pos, "positions contain NaN or inf"),
                          (_too_close, "overlapping atoms"),
                          (_singular_cell, "degenerate periodic vectors")):
        bad = _relabelled(frames)
        damage(bad[1])
        train = tmp_path / "bad_train.xyz"
        write(train, bad, format="extxyz")
        _fails(capsys, ["fit", train, "-o", out, *CLI_FIT], f"{train}: frame 1: ", words)
        train.unlink()
    _fails(capsys, ["fit", cli_files["train"], "-o", out, *CLI_FIT[:-2], "--seed", "-1"],
           "--seed must be >= 0")
    _fails(capsys, ["fit", cli_files["train"], "-o", out, *CLI_FIT, "--energy-key", "E"],
           f"{cli_files['train']}: frame 0: no energy label 'E'")
    _fails(capsys, ["fit", cli_files["train"], "-o", tmp_path / "no" / "m.kmlip", *CLI_FIT],
           "does not exist")

    # a failure after the fit, while writing: the old model stays whole
    def broken_savez(fh, *args, **kwargs):
        fh.write(b"PK\x03\x04")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", broken_savez)
    _fails(capsys, ["fit", cli_files["train"], "-o", out, *CLI_FIT], "No space left on device")
    monkeypatch.undo()
    assert out.read_bytes() == before and _listing(tmp_path) == ["m.kmlip"]


def test_learn_bad_input_leaves_nothing(cli_files, capsys, tmp_path):
    run = tmp_path / "run"
    start = cli_files["start"]
    base = ["--steps", "2", "--temperature", "300", "-o", run]
    for argv, words in [
        (["--reference", "nope", *base], "--reference 'nope': expected 'emt', 'xtb'"),
        (["--reference", "os:getcwd", *base], "returned a str, not an ASE calculator"),
        (["--reference", "no_such_module_xyz:f", *base], "cannot import 'no_such_module_xyz'"),
        (["--reference", "emt", *base[:-2], "-o", run, "--seed", "-1"], "--seed must be >= 0"),
        (["--reference", "emt", "--steps", "-1", *base[2:]], "--steps must be >= 0"),
        (["--reference", "emt", "--temperature", "nan", *base[:2], *base[4:]],
         "temperature must be a number >= 0 K"),
        (["--reference", "emt", "--timestep", "0", *base], "timestep must be a positive number"),
        (["--reference", "emt", "--threshold", "-1", *base], "threshold must be a positive"),
        (["--reference", "emt", "--r-cut", "0.1", *base], "r_cut must be >= 1"),
    ]:
        _fails(capsys, ["learn", start, *argv], words)
        assert not run.exists()
    for kind in ("nan_pos", "coincident", "zero_cell"):
        path = cli_files["bad"][kind]
        _fails(capsys, ["learn", path, "--reference", "emt", *base], f"{path}: ",
               dict(BAD_STRUCTURES_BY_NAME)[kind])
        assert not run.exists()
    _fails(capsys, ["learn", start, "--reference", "emt", *base[:-1], tmp_path / "no" / "run"],
           "does not exist")
    _fails(capsys, ["learn", start, "--reference", "emt", *base[:-1], start],
           "exists and is not a directory")
    # an existing directory that is not a run: a failed start leaves its files as they were
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    _fails(capsys, ["learn", cli_files["bad"]["nan_pos"], "--reference", "emt",
                    *base[:-1], mine], "positions contain NaN")
    assert _listing(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep"


def test_lammps_export_output_checked_first(cli_files, capsys, tmp_path):
    _fails(capsys, ["lammps", "export", cli_files["model"], tmp_path / "no" / "m.lammps"],
           f"{tmp_path / 'no' / 'm.lammps'}: directory {tmp_path / 'no'} does not exist")
    _fails(capsys, ["lammps", "export", cli_files["start"], tmp_path / "m.lammps"],
           "not a kmlip model file")
    assert _listing(tmp_path) == []


def test_usage_errors_exit_2(capsys, cli_files):
    capsys.readouterr()
    assert main(["md", str(cli_files["model"]), str(cli_files["start"]), "-o", "t.xyz",
                 "--steps", "x", "--temperature", "300"]) == 2
    assert "argument --steps: invalid int value: 'x'" in capsys.readouterr().err
    assert main(["nosuchcommand"]) == 2


def test_installed_command_exit_status_and_one_line(cli_files, tmp_path):
    # the real process: exit status 2 and one line, for a bad option and an unreadable model
    for argv, words in (
        (["md", cli_files["model"], cli_files["start"], "-o", tmp_path / "t.xyz", "--steps",
          "5", "--temperature", "300", "--timestep", "0"], "--timestep must be in (0, 100] fs"),
        (["predict", cli_files["start"], cli_files["start"]], "not a kmlip model file"),
    ):
        # cwd away from the source tree: "python -m" puts the working directory first on the
        # path, and a non-editable install (CI) must not be shadowed by the uncompiled sources
        p = subprocess.run([sys.executable, "-m", "kmlip.cli.main", *map(str, argv)],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path,
                           env={**os.environ, "KMLIP_DEBUG": ""})
        assert p.returncode == 2, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], p.stderr
    assert _listing(tmp_path) == []


# -- descriptors directly ------------------------------------------------------------------------

def _descriptors():
    from kmlip import ACSF
    from kmlip.descriptors.distance2b import Distance2b

    return [SOAP(species=["Cu"], r_cut=3.5, n_max=2, l_max=2),
            ACSF(species=["Cu"], r_cut=3.5, g2_params=[(1.0, 0.0)]),
            Distance2b(species=["Cu"], r_cut=3.5),
            PairHistogram(species=["Cu"], r_cut=3.5, n_max=4)]


@pytest.mark.parametrize("k", range(4), ids=["SOAP", "ACSF", "Distance2b", "PairHistogram"])
def test_descriptors_refuse_overlaps_and_non_atoms(k):
    desc = _descriptors()[k]
    a = bulk("Cu", "fcc", a=3.6, cubic=True)
    a.positions[3] = a.positions[2] + [0.0, 3e-7, 0.0]
    for grad in (False, True):
        with _raises(ValueError, match=r"atoms 2 and 3 are 3e-07 Å apart, closer than "
                                             r"1e-06 Å: overlapping atoms"):
            desc.transform(a, gradients=grad)
    a.positions[3, 1] += 1e-6  # 1.3e-6 Å: unusual but allowed
    assert np.all(np.isfinite(desc.transform(a)))
    with _raises(TypeError, match="expected an ase.Atoms, got str"):
        desc.transform("Cu")
    with _raises(ValueError, match="n_threads must be"):
        desc.transform(bulk("Cu"), n_threads=0)
    empty = desc.transform(Atoms(cell=[4.0, 4.0, 4.0], pbc=True))
    assert empty.shape == (0, desc.n_features)


# -- calculators after a failed call -------------------------------------------------------------

def test_calculator_does_not_reuse_results_after_a_failure(model, frames):
    calc = KMLIPCalculator(model)
    good = frames[0].copy()
    e_good = calc.get_potential_energy(good)
    bad = frames[1].copy()
    bad.positions[1] = bad.positions[0]
    for _ in range(2):  # asking again must not return the previous structure's energy
        with _raises(ValueError, match="overlapping atoms"):
            calc.get_potential_energy(bad)
        with _raises(ValueError, match="overlapping atoms"):
            calc.get_forces(bad)
    assert calc.get_potential_energy(good) == e_good


def test_ewald_calculator_does_not_reuse_results_after_a_failure():
    from kmlip.ewald import Ewald

    ew = Ewald({"Na": 1.0, "Cl": -1.0})
    good = bulk("NaCl", "rocksalt", a=5.64)
    e_good = ew.get_potential_energy(good)
    bad = good.copy()
    bad.pbc = [True, True, False]
    for _ in range(2):
        with _raises(ValueError, match="partly periodic systems"):
            ew.get_potential_energy(bad)
    assert ew.get_potential_energy(good) == e_good


# -- files that are not regular files, crafted model files ---------------------------------------

def test_pipes_and_devices_are_refused_not_read(model, cli_files, capsys, tmp_path):
    fifo = tmp_path / "pipe.kmlip"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes
    with _raises(ValueError, match="not a regular file"):
        kmlip.load(fifo)
    _fails(capsys, ["info", fifo], f"{fifo}: not a regular file (a pipe)")
    _fails(capsys, ["predict", fifo, cli_files["start"]], "not a regular file (a pipe)")
    _fails(capsys, ["predict", cli_files["model"], fifo], "not a regular file (a pipe)")
    _fails(capsys, ["fit", cli_files["train"], "-o", tmp_path / "m.kmlip", "--model", fifo],
           "not a regular file (a pipe)")
    if os.path.exists("/dev/zero"):  # endless: reading it would fill the memory
        _fails(capsys, ["predict", cli_files["model"], "/dev/zero"],
               "/dev/zero: not a regular file (a device or socket)")
        _fails(capsys, ["md", "/dev/zero", cli_files["start"], "-o", tmp_path / "t.xyz",
                        "--steps", "1", "--temperature", "10"], "not a regular file")
    assert _listing(tmp_path) == ["pipe.kmlip"]


@pytest.mark.parametrize("content, words", [
    (b"\xff\xfe\x00binary", "not a UTF-8 text file"),
    (b"[" * 100_000, "nested too deeply"),
    (b"{\"terms\": []}", "needs a non-empty list 'terms'"),
    (b"", "model spec is empty"),
], ids=["binary", "deep", "no_terms", "empty"])
def test_fit_model_spec_errors(content, words, cli_files, capsys, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_bytes(content)
    _fails(capsys, ["fit", cli_files["train"], "-o", tmp_path / "m.kmlip", "--model", spec],
           f"{spec}: ", words)
    assert _listing(tmp_path) == ["spec.json"]


@pytest.mark.parametrize("where, name, value, words", [
    ("arrays", "alpha", np.nan, "array 'alpha' contains NaN or inf"),
    ("arrays", "R", np.inf, "array 'R' contains NaN or inf"),
    ("fitted", "delta", -1.0, "delta must be in (0,"),
    ("fitted", "sigma_force", float("nan"), "sigma_force must be a finite number"),
    ("fitted", "zeta", 0, "zeta must be an integer in [1, 64]"),
])
def test_crafted_model_files_with_valid_checksums(where, name, value, words, model, tmp_path):
    # checksums only catch accidents: a file written with bad content and matching checksums
    # must still be refused, not give NaN or nonsense predictions
    import copy

    from kmlip.io import read_model_file, write_model_file

    path = tmp_path / "good.kmlip"
    model.save(path)
    header, arrays = read_model_file(path)
    header = copy.deepcopy({k: header[k] for k in ("params", "fitted")})
    if where == "arrays":
        arrays[name] = arrays[name].copy()
        arrays[name].flat[0] = value
    else:
        header["fitted"][name] = value
    bad = tmp_path / "bad.kmlip"
    write_model_file(bad, header, arrays)
    with _raises(ValueError, match=re.escape(words)) as info:
        kmlip.load(bad)
    assert str(info.value).startswith(f"{bad}: ")


def test_md_keep_velocities_refuses_nan_momenta(cli_files, capsys, tmp_path):
    a = _cu(seed=6)
    a.set_momenta(np.full((len(a), 3), np.nan))
    start = tmp_path / "start.xyz"
    write(start, a, format="extxyz")
    _fails(capsys, ["md", cli_files["model"], start, "-o", tmp_path / "t.xyz", "--steps", "3",
                    "--temperature", "300", "--keep-velocities"],
           f"{start}: momenta contain NaN or inf (atoms [0, 1, 2, 3])")
    assert _listing(tmp_path) == ["start.xyz"]


def test_learn_threads_checked_before_the_first_reference_call(cli_files, capsys, tmp_path):
    _fails(capsys, ["learn", cli_files["start"], "--reference", "emt", "--steps", "2",
                    "--temperature", "300", "-o", tmp_path / "run", "--threads", "0"],
           "--threads must be >= 1", quiet=True)
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("extra, words", [
    (["--seed", "-1"], "--seed must be >= 0"), (["--threads", "0"], "--threads must be >= 1"),
    (["--out", "no/d.kmlip"], "no/d.kmlip: directory"),
], ids=["seed", "threads", "out"])
def test_demo_options_checked_before_any_work(extra, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fails(capsys, ["demo", "--quick", "--out", "d.kmlip", *extra], words, quiet=True)
    assert _listing(tmp_path) == []


def test_outputs_never_replace_inputs(cli_files, capsys, tmp_path):
    # a successful run must not destroy its own input: refused before any work
    import shutil

    train, model, start = (shutil.copy(cli_files[k], tmp_path) for k in ("train", "model",
                                                                          "start"))
    before = {p: open(p, "rb").read() for p in (train, model, start)}
    for argv, what in [
        (["fit", train, "-o", train, *CLI_FIT], "is the training file"),
        (["predict", model, start, "-o", start], "is the structures file"),
        (["predict", model, start, "-o", model], "is the model file"),
        (["md", model, start, "-o", start, "--steps", "1", "--temperature", "10"],
         "is the start file"),
        (["eval", model, train, "--calibrate", "-o", train], "is the structures file"),
        (["lammps", "export", model, model], "is the model file"),
    ]:
        _fails(capsys, argv, f"{argv[argv.index('-o') + 1] if '-o' in argv else model}: {what}",
               quiet=True)
    assert {p: open(p, "rb").read() for p in before} == before
    assert sorted(_listing(tmp_path)) == sorted(os.path.basename(p) for p in before)


def test_overflowing_labels_do_not_give_a_nan_model(frames):
    bad = _relabelled(frames)
    bad[2].calc.results["energy"] = 1.7e308
    m = _tiny_model()
    try:
        m.fit(bad)
    except ValueError:
        return
    assert np.all(np.isfinite(m.alpha_))


@pytest.mark.parametrize("z", [119, 200, -1, 2**40])
def test_atomic_numbers_that_are_no_element(z, model, frames):
    # were IndexError from ASE's tables, 'Og' for -1, and an 8 TiB charge table in Ewald
    from kmlip.ewald import Ewald

    a = _cu()
    a.numbers[2] = z
    words = f"atomic numbers [{z}] (atoms [2]) are no element (1..118)"
    for call in (lambda: model.compute(a, ("energy",)), lambda: SOAP(**TINY).transform(a),
                 lambda: _descriptors()[2].transform(a), lambda: Ewald({"Cu": 1.0}).compute(a)):
        with _raises(ValueError, match=re.escape(words)):
            call()
    bad = _relabelled(frames)
    bad[1].numbers[2] = z
    with _raises(ValueError, match=re.escape(f"frame 1: {words}")):
        _tiny_model().fit(bad)


def test_export_raw_into_a_file_is_refused(model, tmp_path):
    target = tmp_path / "model.raw"
    target.write_text("keep")
    with _raises(ValueError, match=re.escape(f"{target}: exists and is not a directory")):
        model.export_raw(target)
    assert target.read_text() == "keep"


def test_eval_plot_dir_checked_before_any_work(cli_files, capsys, tmp_path, monkeypatch):
    plots = tmp_path / "plots"
    real_access = os.access

    def read_only(path, mode, *args, **kwargs):  # a read-only directory, also for root
        if os.fspath(path) == str(tmp_path) and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", read_only)
    _fails(capsys, ["eval", cli_files["model"], cli_files["train"], "--plot-dir", plots],
           f"{plots}: cannot write to directory {tmp_path} (permission denied)", quiet=True)
    assert _listing(tmp_path) == []


def test_learn_emt_refuses_elements_it_cannot_label(capsys, tmp_path):
    start = tmp_path / "si.xyz"
    write(start, bulk("Si", cubic=True), format="extxyz")
    _fails(capsys, ["learn", start, "--reference", "emt", "--steps", "2", "--temperature",
                    "300", "-o", tmp_path / "run"], "ASE's EMT has no parameters for ['Si']",
           quiet=True)
    assert _listing(tmp_path) == ["si.xyz"]


def failing_reference_factory():
    """A ``--reference module:callable`` whose factory fails (used below)."""
    raise RuntimeError("licence server unreachable")


def test_learn_reference_factory_that_fails(cli_files, capsys, tmp_path):
    _fails(capsys, ["learn", cli_files["start"], "--reference",
                    "test_robustness:failing_reference_factory", "--steps", "2",
                    "--temperature", "300", "-o", tmp_path / "run"],
           "failing_reference_factory() failed (RuntimeError: licence server unreachable)",
           quiet=True)
    assert _listing(tmp_path) == []


@pytest.mark.parametrize("cmd", ["md", "learn", "eval", "predict", "fit"])
def test_unreadable_extxyz_for_every_subcommand(cmd, cli_files, capsys, tmp_path):
    bad = tmp_path / "broken.xyz"
    bad.write_text("3\nProperties=species:S:1:pos:R:3\nCu 0 0 0\nCu 1 1\n")
    argv = {"md": ["md", cli_files["model"], bad, "-o", tmp_path / "t.xyz", "--steps", "1",
                   "--temperature", "10"],
            "learn": ["learn", bad, "--reference", "emt", "--steps", "1", "--temperature",
                      "10", "-o", tmp_path / "run"],
            "eval": ["eval", cli_files["model"], bad],
            "predict": ["predict", cli_files["model"], bad, "-o", tmp_path / "p.xyz"],
            "fit": ["fit", bad, "-o", tmp_path / "m.kmlip", *CLI_FIT]}[cmd]
    _fails(capsys, argv, f"{bad}: ASE cannot read it as a structure file", quiet=True)
    assert _listing(tmp_path) == ["broken.xyz"]


def test_compute_reuse_must_be_a_prediction(model):
    with _raises(TypeError, match="reuse"):
        model.compute(_cu(), ("energy_var",), reuse="x")


def test_huge_vacuum_cell_equals_the_cluster(model):
    cluster = _cu(seed=7)
    cluster.pbc = False
    boxed = cluster.copy()
    boxed.cell = np.diag([1e6, 2e6, 3e6])
    boxed.pbc = True
    props = ("energy", "forces", "energies_var")
    r, b = model.compute(cluster, props), model.compute(boxed, props)
    assert b.energy == pytest.approx(r.energy, rel=1e-12)
    np.testing.assert_allclose(b.forces, r.forces, atol=1e-12)
    np.testing.assert_allclose(b.energies_var, r.energies_var, rtol=1e-10)
    # its stress is finite and ~0 (the virial over a 6e18 Å^3 volume)
    assert np.all(np.abs(model.compute(boxed, ("stress",)).stress) < 1e-15)


def test_e0_values_must_be_numbers(frames):
    with _raises((TypeError, ValueError), match=r"e0\['Cu'\]"):
        _tiny_model(e0={"Cu": "1.0", "Al": 0.0}).fit(frames)


def test_left_handed_cell_is_the_mirror_image(model, frames):
    # a negative-determinant cell is valid: the mirror image of a right-handed one
    from kmlip.ewald import Ewald

    mirror = np.diag([1.0, 1.0, -1.0])
    voigt_sign = np.array([1, 1, 1, -1, -1, 1])  # yz and xz change sign under z -> -z

    def reflect(a):
        b = a.copy()
        b.set_cell(a.cell.array @ mirror)
        b.positions = a.positions @ mirror
        assert np.linalg.det(b.cell.array) < 0
        return b

    a = frames[0]
    props = ("energy", "forces", "stress", "energies_var")
    r, s = model.compute(a, props), model.compute(reflect(a), props)
    assert s.energy == pytest.approx(r.energy, rel=1e-13)
    np.testing.assert_allclose(s.forces, r.forces @ mirror, atol=1e-13)
    np.testing.assert_allclose(s.stress, r.stress * voigt_sign, atol=1e-13)
    np.testing.assert_allclose(s.energies_var, r.energies_var, rtol=1e-11)
    salt = bulk("NaCl", "rocksalt", a=5.64, cubic=True)
    salt.rattle(0.1, seed=1)
    ew = Ewald({"Na": 1.0, "Cl": -1.0})
    (e1, f1, s1), (e2, f2, s2) = ew.compute(salt), ew.compute(reflect(salt))
    assert e2 == pytest.approx(e1, rel=1e-12)
    np.testing.assert_allclose(f2, f1 @ mirror, atol=1e-10)
    np.testing.assert_allclose(s2, s1 * voigt_sign, atol=1e-12)
