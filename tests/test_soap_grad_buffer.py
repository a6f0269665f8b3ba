"""SOAP gradients written into reused or uninitialised storage equal fresh ones bit for bit."""
from __future__ import annotations

import numpy as np
import pytest
from conftest import cual_cells, soap_or_skip


@pytest.mark.parametrize("compression, species", [("off", ["Cu", "Al"]), ("mu1nu1", ["Cu", "Al"]),
                                                  ("off", ["Cu"]), ("mu2", ["Cu", "Al"])])
def test_gradients_in_a_dirty_reused_buffer_are_bitwise_those_of_a_fresh_array(compression,
                                                                               species):
    from kmlip.descriptors.soap import GradientBuffer

    soap = soap_or_skip(compression=compression, species=species)
    # two species: the kernel skips the blocks a pair cannot move, which must still read zero;
    # one species (and the compressed modes): every value is written, nothing is zeroed
    small, big = cual_cells(2, seed=7, repeat=(2, 1, 1), frac_al=0.5 if len(species) > 1 else 0)
    big = big.repeat((1, 2, 1))
    buf = GradientBuffer()
    for atoms in (small, big, small):
        X, G = soap.transform(atoms, gradients=True, n_threads=2)
        if compression == "off" and len(species) > 1:
            assert np.count_nonzero(G.values == 0) > 0
        # leftovers of a previous structure or NaN garbage: every entry must be overwritten
        buf.take((buf._data.size,))[...] = np.nan
        Xb, Gb = soap.transform(atoms, gradients=True, n_threads=2, grad_buffer=buf)
        assert np.shares_memory(Gb.values, buf._data)
        assert np.array_equal(X, Xb)
        assert Gb.values.shape == G.values.shape and Gb.values.flags.c_contiguous
        assert np.array_equal(G.values, Gb.values)
        for name in ("centers", "neighbors", "vectors", "offsets"):
            assert np.array_equal(getattr(G, name), getattr(Gb, name))


def test_buffer_grows_and_returns_views():
    from kmlip.descriptors.soap import GradientBuffer

    buf = GradientBuffer()
    a = buf.take((4, 3, 5))
    assert a.shape == (4, 3, 5) and a.dtype == np.float64
    b = buf.take((2, 3, 5))
    assert np.shares_memory(a, b)
    c = buf.take((40, 3, 5))
    assert c.shape == (40, 3, 5) and not np.shares_memory(a, c)
