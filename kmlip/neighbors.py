"""O(N) linked-cell neighbour lists with ASE's semantics.

:func:`neighbor_list` returns exactly the pairs of
``ase.neighborlist.neighbor_list('ijdDS', atoms, cutoff, self_interaction=False)``: a *full*
list (both i→j and j→i) of every pair with ``|r_ij| < cutoff`` (strict), where

    r_ij = r_j + S @ cell - r_i

with ``r`` the positions as given (not wrapped) and ``S`` an integer shift that is zero along
non-periodic directions. The pair (i, i, S=0) is excluded; periodic self-images (i, i, S≠0)
are included, and when the cutoff exceeds the cell every image of an atom within the cutoff
appears as its own pair. Unlike ASE, the pairs come sorted: by centre, then neighbour index,
then shift (lexicographic), with CSR ``offsets`` per centre.

Algorithm
---------
Periodic directions are binned in fractional coordinates wrapped to [0, 1) (the integer wrap
of each atom is kept, so shifts refer to the original positions). Non-periodic directions are
replaced by orthonormal vectors perpendicular to the periodic ones, and binned over the
bounding range of the atoms' coordinates along them, so molecules may sit anywhere, with any
cell. Bins are one cutoff wide in perpendicular distance (the plane spacing
``d_k = V / |a_i × a_j|`` split into ``floor(d_k / cutoff)`` bins), or half a cutoff when a full
bin would hold more than about 12 atoms; each centre scans ``ceil(cutoff / width)`` bins each
way, across as many periodic repeats as needed, so cutoffs larger than the cell are handled.
The total number of bins is capped at a few per atom, so memory is O(N) even for sparse
clusters. The pair search is a two-pass (count, then fill and sort per centre) OpenMP loop in
``kmlip._ext.neighbors``; systems below a few thousand atoms run on one thread.

Each candidate is accepted with ASE's own test, ``|(r_j - r_i) + S @ cell| < cutoff`` on the
original positions, so the pair set matches ASE's; only a pair whose distance equals the cutoff
to the last bit of rounding (e.g. a lattice vector exactly as long as the cutoff) can fall on
different sides in the two codes, because their floating-point summation order may differ.

Memory: 72 bytes per pair (the five output arrays), a few hundred bytes per atom and 8 bytes
per bin during the search.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from kmlip._ext.neighbors import search_pairs
from kmlip._threads import resolve_threads

__all__ = ["MIN_DISTANCE", "NeighborList", "check_no_overlap", "neighbor_list",
           "neighbor_list_arrays"]

# Bins are one cutoff wide, or half a cutoff when a full bin would hold more atoms than this
# on average (measured on fcc Cu: half bins pay off from about 12 atoms per full bin).
_HALF_BINS_ABOVE = 12.0
# Below this many atoms per thread the OpenMP start-up costs more than it saves.
_ATOMS_PER_THREAD = 2000
# Upper bound of the number of bins, per atom (plus a constant), to keep memory O(N).
_BINS_PER_ATOM = 4
_MIN_BINS_CAP = 1000
# Periodic cells whose smallest/largest singular value is below this are singular.
_SINGULAR_RTOL = 1e-10
# Refuse searches that would visit more periodic bin images than this per centre.
_MAX_IMAGE_BINS = 10**8
#: Refuse structures whose cutoff sphere holds more neighbours per atom than this, estimated
#: from the periodic density before the search: 72 MB of pairs per atom, and what the
#: descriptors keep per pair on top. A solid at r_cut = 100 Å (the largest SOAP cutoff) has
#: ~4e5; more means a cell far too small for its atoms, whose search would exhaust memory.
MAX_NEIGHBOURS_PER_ATOM = 10**6
#: Two atoms (or an atom and a periodic image of another) closer than this (Å) are taken as a
#: duplicated atom: no interatomic potential is meant for them, and the pair direction is
#: undefined at zero distance.
MIN_DISTANCE = 1e-6


@dataclass(frozen=True)
class NeighborList:
    """A full, sorted neighbour list (ASE ``'ijdDS'`` semantics).

    Attributes
    ----------
    centers : numpy.ndarray of int64, shape (n_pairs,)
        Centre index i, ascending.
    neighbors : numpy.ndarray of int64, shape (n_pairs,)
        Neighbour index j; within a centre ascending, ties broken by ``shifts``.
    shifts : numpy.ndarray of int64, shape (n_pairs, 3)
        Integer cell shift S with ``r_ij = r_j + S @ cell - r_i``; zero along non-periodic
        directions.
    vectors : numpy.ndarray of float64, shape (n_pairs, 3)
        Pair vectors r_ij (Å).
    distances : numpy.ndarray of float64, shape (n_pairs,)
        ``|r_ij|`` (Å), all strictly below the cutoff.
    offsets : numpy.ndarray of int64, shape (n_atoms + 1,)
        Pairs of centre i are ``offsets[i]:offsets[i + 1]``.
    n_atoms : int
        Number of atoms.

    Notes
    -----
    All arrays are C-contiguous. "Frozen" forbids rebinding the attributes; the arrays
    themselves are ordinary writeable arrays (so they can be passed to typed memoryviews),
    but should be treated as read-only.
    """

    centers: np.ndarray
    neighbors: np.ndarray
    shifts: np.ndarray
    vectors: np.ndarray
    distances: np.ndarray
    offsets: np.ndarray
    n_atoms: int

    @property
    def n_pairs(self) -> int:
        """Number of (directed) pairs."""
        return int(self.centers.shape[0])

    def __len__(self) -> int:
        return self.n_pairs


def neighbor_list(atoms, cutoff: float, *, n_threads: int | None = None) -> NeighborList:
    """Full neighbour list of an :class:`ase.Atoms` (same pairs as ASE's ``neighbor_list``).

    Parameters
    ----------
    atoms : ase.Atoms
        Structure; its positions (Å), cell (Å) and pbc are used.
    cutoff : float
        Cutoff radius (Å), > 0; pairs with distance strictly below it are kept.
    n_threads : int or None, optional
        OpenMP threads; ``None`` follows ``OMP_NUM_THREADS``.

    Returns
    -------
    NeighborList
        Pairs sorted by centre, neighbour and shift.

    Raises
    ------
    TypeError
        If ``atoms`` is not Atoms-like or ``cutoff`` is not a real number.
    ValueError
        On non-finite positions or cell, ``cutoff <= 0`` or non-finite, or a singular cell
        along periodic directions.
    """
    try:
        positions = atoms.positions
        cell = atoms.cell
        pbc = atoms.pbc
    except AttributeError as exc:
        raise TypeError(
            f"atoms must be an ase.Atoms (with positions, cell, pbc), got {type(atoms).__name__}"
        ) from exc
    return neighbor_list_arrays(positions, np.asarray(cell), pbc, cutoff, n_threads=n_threads)


def neighbor_list_arrays(
    positions,
    cell,
    pbc,
    cutoff: float,
    *,
    n_threads: int | None = None,
) -> NeighborList:
    """Full neighbour list from raw arrays (same pairs as ASE's ``primitive_neighbor_list``).

    Parameters
    ----------
    positions : array_like of float, shape (n_atoms, 3)
        Cartesian positions (Å), anywhere (atoms outside the cell are fine; shifts refer to
        these positions as given).
    cell : array_like of float, shape (3, 3)
        Cell vectors as rows (Å). Rows of non-periodic directions are ignored (they may be
        zero); the periodic rows must be linearly independent.
    pbc : bool or array_like of bool, shape (3,)
        Periodicity per cell vector.
    cutoff : float
        Cutoff radius (Å), > 0; pairs with distance strictly below it are kept.
    n_threads : int or None, optional
        OpenMP threads; ``None`` follows ``OMP_NUM_THREADS``.

    Returns
    -------
    NeighborList
        Pairs sorted by centre, neighbour and shift.

    Raises
    ------
    TypeError
        On non-numeric input or a cutoff that is not a real number.
    ValueError
        On wrong shapes, non-finite positions or cell, ``cutoff <= 0`` or non-finite, or a
        singular cell along periodic directions.
    """
    pos = _as_float_array(positions, "positions")
    if pos.ndim != 2 or pos.shape[1] != 3:
        raise ValueError(f"positions must have shape (n_atoms, 3), got {pos.shape}")
    if not np.all(np.isfinite(pos)):
        raise ValueError("positions contain NaN or infinite values")
    cell_a = _as_float_array(cell, "cell")
    if cell_a.shape != (3, 3):
        raise ValueError(f"cell must have shape (3, 3), got {cell_a.shape}")
    if not np.all(np.isfinite(cell_a)):
        raise ValueError("cell contains NaN or infinite values")
    pbc_a = _as_pbc(pbc)
    rc = _as_cutoff(cutoff)
    n = pos.shape[0]
    nt = min(resolve_threads(n_threads), max(1, n // _ATOMS_PER_THREAD))

    basis = _working_basis(cell_a, pbc_a)
    if n == 0:
        return _empty(0)
    _check_density(pos, cell_a, pbc_a, rc)

    # Fractional coordinates in the working basis; along non-periodic directions the basis
    # vector is a unit vector orthogonal to all others, so the coordinate is in Å.
    frac = np.linalg.solve(basis.T, pos.T).T
    recip_norm = np.linalg.norm(np.linalg.inv(basis).T, axis=1)  # |g_k| = 1 / d_k

    wrap = np.zeros((n, 3), dtype=np.int64)
    origin = np.zeros(3)
    extent = np.zeros(3)   # range of the binned coordinate: 1 (periodic) or Å (non-periodic)
    for k in range(3):
        if pbc_a[k]:
            fl = np.floor(frac[:, k])
            if np.max(np.abs(fl)) > 2.0**52:
                raise ValueError("positions are too far outside the periodic cell")
            f = frac[:, k] - fl
            over = f >= 1.0   # rounding of tiny negative fractions
            fl[over] += 1.0
            f[over] -= 1.0
            frac[:, k] = f
            wrap[:, k] = fl.astype(np.int64)
            extent[k] = 1.0
        else:
            origin[k] = float(frac[:, k].min())
            extent[k] = float(frac[:, k].max()) - origin[k]
    # Perpendicular width (Å) of the binned range: plane spacing d_k along periodic
    # directions, the coordinate range along non-periodic ones.
    width = extent / recip_norm
    nb = _bin_counts(width, rc, 1.0)
    if n / _n_bins(nb) > _HALF_BINS_ABOVE:
        nb = _bin_counts(width, rc, 0.5)
    _cap_bins(nb, max(_MIN_BINS_CAP, _BINS_PER_ATOM * n))
    # bin coordinate = (frac - origin) * scale
    scale = np.divide(nb, extent, out=np.zeros(3), where=extent > 0.0)

    # Bin coordinates (clipped: rounding may put a coordinate on the upper edge).
    bins = np.floor((frac - origin) * scale).astype(np.int64)
    np.clip(bins, 0, nb - 1, out=bins)

    # Wrapped Cartesian positions for the cheap distance prefilter.
    shift_cart = wrap.astype(np.float64) @ np.where(pbc_a[:, None], cell_a, 0.0)
    pw = pos - shift_cart

    # Rounding slack: prefilter radius and bin reach are inflated by a tiny relative margin
    # so that no pair within the cutoff is missed (the final test is exact, as ASE's).
    mag = float(np.max(np.abs(pos)) + np.max(np.abs(shift_cart), initial=0.0))
    m = np.zeros(3, dtype=np.int64)
    for k in range(3):
        mag += (1 + 2 * rc * recip_norm[k]) * float(np.linalg.norm(cell_a[k])) * pbc_a[k]
    tol = 1e-10 * (rc + mag)
    for k in range(3):
        reach = (rc + tol) * recip_norm[k] * scale[k] + 1e-9
        if pbc_a[k]:
            if reach > _MAX_IMAGE_BINS:
                raise ValueError(
                    f"cutoff {rc} Å is too large for the cell along direction {k}"
                )
            m[k] = int(np.ceil(reach))
        else:
            m[k] = int(min(np.ceil(reach), nb[k]))
    if np.prod((2 * m + 1)[pbc_a].astype(float)) > _MAX_IMAGE_BINS:
        raise ValueError(f"cutoff {rc} Å is too large for the cell: too many periodic images")

    lin = (bins[:, 0] * nb[1] + bins[:, 1]) * nb[2] + bins[:, 2]
    order = np.argsort(lin, kind="stable").astype(np.int64)
    n_bins = int(np.prod(nb))
    bin_start = np.zeros(n_bins + 1, dtype=np.int64)
    np.cumsum(np.bincount(lin, minlength=n_bins), out=bin_start[1:])

    centers, nbrs, shifts, vectors, distances, offsets = search_pairs(
        order,
        np.ascontiguousarray(pos[order]),
        np.ascontiguousarray(pw[order]),
        np.ascontiguousarray(wrap[order]),
        np.ascontiguousarray(bins[order]),
        bin_start,
        nb,
        m,
        pbc_a.astype(np.uint8),
        np.ascontiguousarray(cell_a),
        rc,
        rc + tol,
        nt,
    )
    return NeighborList(centers, nbrs, shifts, vectors, distances, offsets, int(n))


def check_no_overlap(nl: NeighborList, min_distance: float = MIN_DISTANCE, *,
                     index: np.ndarray | None = None, what: str = "atoms") -> None:
    """Raises ValueError when a pair of ``nl`` is closer than ``min_distance`` (Å).

    Descriptors call it on their neighbour list: overlapping atoms are an input error (most
    often an atom written twice), not a structure a potential can describe.

    Parameters
    ----------
    nl : NeighborList
    min_distance : float
        Å.
    index : ndarray of int, optional
        Atom numbers to report for the list's atoms (when it was built on a subset).
    what : str
        How the atoms are named in the message.
    """
    if nl.n_pairs == 0:
        return
    k = int(np.argmin(nl.distances))
    d = float(nl.distances[k])
    if d < min_distance:
        i, j = int(nl.centers[k]), int(nl.neighbors[k])
        if index is not None:
            i, j = int(index[i]), int(index[j])
        image = "" if not np.any(nl.shifts[k]) else f" (periodic image {nl.shifts[k].tolist()})"
        raise ValueError(f"{what} {i} and {j}{image} are {d:.3g} Å apart, closer than "
                         f"{min_distance:g} Å: overlapping atoms (an atom given twice?)")


def _check_density(pos: np.ndarray, cell: np.ndarray, pbc: np.ndarray, rc: float) -> None:
    """ValueError when the cutoff would reach more than :data:`MAX_NEIGHBOURS_PER_ATOM`.

    Estimate: the atoms' density over the volume they occupy times the cutoff sphere. That
    volume is the cell's (3 periodic directions), or the periodic face or period times the
    atoms' extent across it, the extent counted at least about a cutoff (an atomically thin
    slab or wire, whose images fill a disc or a line of the sphere); exact for a tiny cell.
    """
    n = len(pos)
    vecs = cell[pbc]
    k = len(vecs)
    if k == 0:
        return
    if k == 3:
        volume = abs(float(np.linalg.det(vecs)))
    elif k == 2:
        normal = np.cross(vecs[0], vecs[1])
        area = float(np.linalg.norm(normal))
        thickness = float(np.ptp(pos @ (normal / area)))
        volume = area * max(thickness, 4.0 / 3.0 * rc)
    else:
        length = float(np.linalg.norm(vecs[0]))
        u = vecs[0] / length
        v = np.cross(u, [1.0, 0.0, 0.0] if abs(u[0]) < 0.9 else [0.0, 1.0, 0.0])
        v /= np.linalg.norm(v)
        w = np.cross(u, v)
        side = np.sqrt(2.0 * np.pi / 3.0) * rc
        volume = length * max(float(np.ptp(pos @ v)), side) * max(float(np.ptp(pos @ w)), side)
    per_atom = n * 4.0 / 3.0 * np.pi * rc**3 / volume
    if per_atom > MAX_NEIGHBOURS_PER_ATOM:
        raise ValueError(f"cutoff {rc:g} Å is too large for the cell: it reaches about "
                         f"{per_atom:.3g} neighbours per atom (more than "
                         f"{MAX_NEIGHBOURS_PER_ATOM:.0e}); the cell is far too small for its {n} "
                         f"atom{'s' * (n != 1)}")


def _as_float_array(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise TypeError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.float64)


def _as_pbc(pbc) -> np.ndarray:
    arr = np.asarray(pbc)
    if arr.dtype != bool:
        if not np.issubdtype(arr.dtype, np.integer) or not np.all((arr == 0) | (arr == 1)):
            raise TypeError(f"pbc must be bool or three bools, got {pbc!r}")
        arr = arr.astype(bool)
    if arr.ndim == 0:
        arr = np.repeat(arr, 3)
    if arr.shape != (3,):
        raise ValueError(f"pbc must be a bool or have shape (3,), got shape {arr.shape}")
    return arr.copy()


def _as_cutoff(cutoff) -> float:
    if isinstance(cutoff, (bool, np.bool_)) or not isinstance(cutoff, numbers.Real):
        raise TypeError(f"cutoff must be a real number (Å), got {type(cutoff).__name__}")
    rc = float(cutoff)
    if not np.isfinite(rc):
        raise ValueError(f"cutoff must be finite, got {rc}")
    if rc <= 0.0:
        raise ValueError(f"cutoff must be > 0 Å, got {rc}")
    return rc


def _working_basis(cell: np.ndarray, pbc: np.ndarray) -> np.ndarray:
    """Cell rows along periodic directions, orthonormal complements along the others.

    Raises ValueError when the periodic rows are linearly dependent (zero-volume cell).
    """
    per = np.flatnonzero(pbc)
    basis = np.zeros((3, 3))
    if per.size == 0:
        return np.eye(3)
    rows = cell[per]
    sv = np.linalg.svd(rows, compute_uv=False)
    if sv[0] == 0.0 or sv[-1] < _SINGULAR_RTOL * sv[0]:
        raise ValueError(
            "cell is singular (zero volume) along the periodic directions "
            f"{per.tolist()}: the periodic cell vectors must be linearly independent"
        )
    basis[per] = rows
    if per.size < 3:
        _, _, vt = np.linalg.svd(rows)
        basis[np.flatnonzero(~pbc)] = vt[per.size:]
    return basis


def _bin_counts(width: np.ndarray, rc: float, fraction: float) -> np.ndarray:
    """Bins per direction so that each is at least ``fraction * rc`` wide (at least one)."""
    nb = np.ones(3, dtype=np.int64)
    for k in range(3):
        nb[k] = max(1, int(min(width[k] / (fraction * rc), 2.0**40)))
    return nb


def _n_bins(nb: np.ndarray) -> int:
    return int(nb[0]) * int(nb[1]) * int(nb[2])   # Python ints: no overflow


def _cap_bins(nb: np.ndarray, cap: int) -> None:
    """Halves the bin counts (in place) until there are at most ``cap`` bins."""
    while _n_bins(nb) > cap:
        for k in range(3):
            nb[k] = max(1, int(nb[k]) // 2)


def _empty(n_atoms: int) -> NeighborList:
    return NeighborList(
        centers=np.zeros(0, dtype=np.int64),
        neighbors=np.zeros(0, dtype=np.int64),
        shifts=np.zeros((0, 3), dtype=np.int64),
        vectors=np.zeros((0, 3), dtype=np.float64),
        distances=np.zeros(0, dtype=np.float64),
        offsets=np.zeros(n_atoms + 1, dtype=np.int64),
        n_atoms=n_atoms,
    )
