"""Descriptor parameters: validation (type and range, naming the parameter), get_params identity,
scikit-learn clone, set_params that validates and leaves the descriptor unchanged on failure,
and model-file descriptions that give ValueError for anything malformed."""
import json
import pickle

import numpy as np
import pytest
from ase.build import bulk
from sklearn.base import clone

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
