"""Input checks shared by descriptors, baselines and the model."""
from __future__ import annotations

import math
import numbers

import numpy as np


def checked_system(atoms) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validated ``(numbers, positions, cell, pbc)`` of an ``ase.Atoms``.

    Raises
    ------
    TypeError
        If ``atoms`` is not an ``ase.Atoms``.
    ValueError
        For non-finite positions or cell, or a singular cell in a periodic direction.
    """
    from ase import Atoms

    if not isinstance(atoms, Atoms):
        raise TypeError(f"expected an ase.Atoms, got {type(atoms).__name__}")
    positions = np.ascontiguousarray(atoms.get_positions(), dtype=np.float64)
    if not np.all(np.isfinite(positions)):
        bad = np.unique(np.nonzero(~np.isfinite(positions))[0])
        raise ValueError(f"positions contain NaN or inf (atoms {bad[:5].tolist()})")
    cell = np.ascontiguousarray(atoms.cell.array, dtype=np.float64)
    if not np.all(np.isfinite(cell)):
        raise ValueError("cell contains NaN or inf")
    pbc = np.asarray(atoms.pbc, dtype=bool).copy()
    if pbc.any():
        vecs = cell[pbc]
        # the periodic vectors must span a space of their own dimension
        s = np.linalg.svd(vecs, compute_uv=False)
        if s.size == 0 or s.min() <= 1e-10 * max(1.0, s.max()):
            raise ValueError("cell has zero volume (or degenerate periodic vectors) with pbc=True")
    numbers = np.ascontiguousarray(atoms.numbers, dtype=np.int64)
    check_numbers(numbers)
    return numbers, positions, cell, pbc


def check_numbers(numbers) -> None:
    """ValueError for atomic numbers that are no element (negative or above 118).

    0 (ASE's dummy atom "X") passes here; species checks refuse it by name. Without this a
    number past the periodic table indexes out of ASE's tables (IndexError), and a negative
    one from their end (-1 would be named "Og").
    """
    from ase.data import chemical_symbols

    numbers = np.asarray(numbers)
    bad = (numbers < 0) | (numbers >= len(chemical_symbols))
    if np.any(bad):
        idx = np.flatnonzero(bad)
        raise ValueError(f"atomic numbers {numbers[idx[:5]].tolist()} (atoms {idx[:5].tolist()}) "
                         f"are no element (1..{len(chemical_symbols) - 1})")


def check_structure(atoms, where: str = "") -> None:
    """Checks a structure as the descriptors will, before any work, naming it by ``where``.

    Non-finite positions or cell, a singular periodic cell (:func:`checked_system`), or two
    atoms (or an atom and a periodic image of another) closer than
    :data:`kmlip.neighbors.MIN_DISTANCE`. Costs one neighbour search at that tiny cutoff.

    Raises
    ------
    TypeError
        If ``atoms`` is not an ``ase.Atoms``.
    ValueError
        ``"<where>: <cause>"``.
    """
    from kmlip.neighbors import MIN_DISTANCE, check_no_overlap, neighbor_list_arrays

    prefix = f"{where}: " if where else ""
    try:
        _, positions, cell, pbc = checked_system(atoms)
        if len(positions) > 1:
            check_no_overlap(neighbor_list_arrays(positions, cell, pbc, MIN_DISTANCE,
                                                  n_threads=1))
    except ValueError as exc:
        raise ValueError(f"{prefix}{exc}") from None


# -- parameter checks (descriptors, baselines, the model) ----------------------------------------
# Each returns the value in a plain Python type for internal use; callers keep the object they
# were given as the public parameter (scikit-learn's clone checks identity).

#: Largest OpenMP thread count a parameter may ask for; far above any real machine, it only
#: stops a typo (``n_threads=10**6``) from spawning a million threads.
MAX_THREADS = 4096


def check_real(name: str, value, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, unit: str = "") -> float:
    """A finite real number in ``[low, high]`` (``(low, high]`` when ``low_open``).

    Raises
    ------
    TypeError
        For a bool, or anything that is not a real number (str, None, array, complex).
    ValueError
        For NaN, ±inf or a value out of range.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    u = f" {unit}" if unit else ""
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if low is not None and (v <= low if low_open else v < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low:g}{u}, got {value!r}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be <= {high:g}{u}, got {value!r}")
    return v


def check_int(name: str, value, *, low: int | None = None, high: int | None = None,
              why_high: str = "") -> int:
    """An integer (Python or NumPy, not bool) in ``[low, high]``.

    ``why_high`` is appended to the message when the value exceeds ``high``.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    v = int(value)
    if low is not None and v < low:
        raise ValueError(f"{name} must be >= {low}, got {v}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be <= {high}, got {v}" + (f": {why_high}" if why_high
                                                                   else ""))
    return v


def check_bool(name: str, value) -> bool:
    """``True``/``False`` (Python or NumPy bool); a string such as ``"no"`` is a TypeError."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    """One of the strings ``choices``."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, one of {list(choices)}, got "
                        f"{type(value).__name__} {value!r}")
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def check_n_threads(value, name: str = "n_threads") -> int | None:
    """``None`` (follow ``OMP_NUM_THREADS``) or an int in ``[1, MAX_THREADS]``.

    NumPy integers are refused, as by :func:`kmlip._threads.resolve_threads`, which the kernels
    call with the stored value.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or None, got {type(value).__name__} {value!r}")
    if not 1 <= value <= MAX_THREADS:
        raise ValueError(f"{name} must be None or in [1, {MAX_THREADS}], got {value}")
    return value


def check_species(value, name: str = "species") -> tuple[int, ...]:
    """Atomic numbers of a list of chemical symbols or atomic numbers, in the given order.

    A list, tuple, set or 1-D array of distinct elements; each a symbol (``"Cu"``) or an atomic
    number 1..118; a set is taken in order of atomic number. ASE's dummy species ``"X"``
    (Z = 0) is refused: it is no element, and the Ewald baseline refuses it too.

    Raises
    ------
    TypeError
        ``value`` is a single string, a mapping, or not a list-like; an element is neither str
        nor int.
    ValueError
        Empty, duplicates, unknown symbols, atomic numbers out of range, or ``"X"``.
    """
    from ase.data import atomic_numbers, chemical_symbols

    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a list of chemical symbols, e.g. [{value!r}], "
                        f"not a single string")
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise TypeError(f"{name} must be a 1-D list, got an array of shape {value.shape}")
        items = value.tolist()
    elif isinstance(value, (list, tuple)):
        items = list(value)
    elif isinstance(value, (set, frozenset)):
        # a set has no order of its own (string hashes vary between processes): order by Z,
        # so that layouts that follow the given order are reproducible
        items = sorted(value, key=lambda s: (atomic_numbers.get(s, -1) if isinstance(s, str)
                                             else s if isinstance(s, numbers.Integral) else -1))
    else:
        raise TypeError(f"{name} must be a list of chemical symbols or atomic numbers, got "
                        f"{type(value).__name__}")
    if not items:
        raise ValueError(f"{name} must not be empty")
    zs = []
    for s in items:
        if isinstance(s, str):
            if s == "X":
                raise ValueError(f"{name}: 'X' is ASE's dummy atom (Z = 0), not an element; "
                                 "list the real elements of the structures")
            if s not in atomic_numbers:
                raise ValueError(f"{name}: unknown species {s!r} (not a chemical symbol)")
            zs.append(atomic_numbers[s])
        elif isinstance(s, numbers.Integral) and not isinstance(s, (bool, np.bool_)):
            z = int(s)
            if z == 0:
                raise ValueError(f"{name}: atomic number 0 is ASE's dummy atom 'X', not an "
                                 "element; list the real elements of the structures")
            if not 0 < z < len(chemical_symbols):
                raise ValueError(f"{name}: invalid atomic number {z} "
                                 f"(1..{len(chemical_symbols) - 1})")
            zs.append(z)
        else:
            raise TypeError(f"{name} entries must be chemical symbols or atomic numbers, got "
                            f"{type(s).__name__} {s!r}")
    if len(set(zs)) != len(zs):
        dup = sorted({chemical_symbols[z] for z in zs if zs.count(z) > 1})
        raise ValueError(f"{name} lists {', '.join(dup)} more than once: {items}")
    return tuple(zs)


def plain(value):
    """``value`` in plain JSON types (NumPy scalars and arrays, tuples and sets become Python
    numbers and lists); for :meth:`to_dict` of parameters."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((plain(v) for v in value), key=repr)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return value
