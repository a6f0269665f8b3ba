"""Reading and writing the files named on the command line, with one-line errors.

Every failure to read an input becomes a ``ValueError("<path>: <what is wrong>")``, which
:func:`kmlip.cli.main.main` prints as ``kmlip <cmd>: error: <path>: <what is wrong>`` with exit
status 2. ASE's readers raise many exception types for files they cannot parse
(``UnknownFileTypeError``, ``StopIteration``, ``IndexError``, ``UnicodeDecodeError``,
``AttributeError``, ...), so the readers are wrapped broadly; ``KeyboardInterrupt`` and
``SystemExit`` pass through.
"""
from __future__ import annotations

import os
import stat


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name."""
    text = str(exc).strip()
    if isinstance(exc, KeyError) and exc.args:
        text = f"missing key {exc.args[0]!r}"
    return text.splitlines()[0].strip() if text else type(exc).__name__


def _with_path(path: str, msg: str) -> str:
    return msg if msg.startswith(f"{path}:") else f"{path}: {msg}"


def check_readable(path: str, what: str) -> bytes:
    """The first bytes of ``path``; ValueError if it is missing, a directory, not a regular
    file (a pipe, a device), unreadable or empty."""
    if not os.path.lexists(path):
        raise ValueError(f"{path}: {what} does not exist")
    if not os.path.exists(path):
        raise ValueError(f"{path}: {what} is a broken symbolic link")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, not a {what}")
    if not os.path.isfile(path):
        # a named pipe without a writer blocks the open forever, and a pipe cannot be read
        # twice (its head is read here first); a device such as /dev/zero never ends
        kind = "a pipe" if stat.S_ISFIFO(os.stat(path).st_mode) else "a device or socket"
        raise ValueError(f"{path}: not a regular file ({kind}); give the {what} as a file")
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except PermissionError:
        raise ValueError(f"{path}: permission denied (cannot read the {what})") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the {what} ({first_line(exc)})") from None
    if not head:
        raise ValueError(f"{path}: {what} is empty")
    return head


def read_structures(path: str, format: str | None = None) -> list:
    """All structures in an ASE-readable file.

    Parameters
    ----------
    path : str
    format : str or None
        ASE format name (``"extxyz"``, ``"vasp-xdatcar"``, ...); None lets ASE guess from the
        name and content.

    Returns
    -------
    list of ase.Atoms
        At least one structure, each with at least one atom.

    Raises
    ------
    ValueError
        ``"<path>: <what is wrong>"`` for any file ASE cannot read or that holds no structure.
    """
    from ase import Atoms
    from ase.io import read
    from ase.io.formats import UnknownFileTypeError

    path = os.fspath(path)
    check_readable(path, "structure file")
    try:
        frames = read(path, index=":", format=format)
    except (KeyboardInterrupt, SystemExit):
        raise
    except UnknownFileTypeError as exc:
        hint = "" if format else "; name it with --format (e.g. --format extxyz)"
        raise ValueError(f"{path}: ASE does not know this file format ({first_line(exc)})"
                         f"{hint}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file ASE can read as "
                         f"{format or 'the format its name suggests'} "
                         "(binary content)") from None
    except MemoryError:
        raise ValueError(f"{path}: out of memory while reading it (is it a structure "
                         "file?)") from None
    except Exception as exc:  # noqa: BLE001 - ASE's readers raise anything on bad input
        raise ValueError(f"{path}: ASE cannot read it as a structure file "
                         f"({type(exc).__name__}: {first_line(exc)})") from None
    if isinstance(frames, Atoms):
        frames = [frames]
    frames = list(frames)
    if not frames:
        hint = ""
        if not format:
            try:
                from ase.io.formats import filetype

                hint = (f" (read as ASE format {filetype(path)!r}; if that is wrong, name the "
                        "format with --format, e.g. --format extxyz)")
            except Exception:  # noqa: BLE001 - the hint is optional
                hint = " (if ASE guessed the format wrong, name it with --format)"
        raise ValueError(f"{path}: holds no structures{hint}")
    for k, atoms in enumerate(frames):
        if not isinstance(atoms, Atoms):
            raise ValueError(f"{path}: item {k} is a {type(atoms).__name__}, not a structure")
        if len(atoms) == 0:
            raise ValueError(f"{path}: structure {k} has no atoms")
    return frames


def load_model(path: str):
    """A model file loaded by :func:`kmlip.load`, any failure as one ``ValueError``.

    Raises
    ------
    ValueError
        ``"<path>: <what is wrong>"``: missing, a directory, unreadable, empty, not a kmlip
        model, corrupted, truncated or from a newer kmlip. Exceptions other than ValueError
        from the loader (which should not happen) are reported the same way, named by type.
    """
    from kmlip import load

    path = os.fspath(path)
    head = check_readable(path, "model file")
    if not head.startswith(b"PK"):
        # model files are ZIP (NPZ) archives; say so rather than let NumPy guess "pickle"
        raise ValueError(f"{path}: not a kmlip model file (not a ZIP archive; model files are "
                         "written by 'kmlip fit' or KernelPotential.save)")
    try:
        return load(path)
    except (KeyboardInterrupt, SystemExit):
        raise
    except ValueError as exc:
        raise ValueError(_with_path(path, first_line(exc))) from None
    except MemoryError:
        raise ValueError(f"{path}: out of memory while loading the model file (corrupted "
                         "sizes?)") from None
    except Exception as exc:  # noqa: BLE001 - a safety net: the loader should raise ValueError
        raise ValueError(f"{path}: cannot load the model file ({type(exc).__name__}: "
                         f"{first_line(exc)})") from None


def check_output(path: str, inputs: dict | None = None) -> None:
    """Raises ValueError now, before any work, if ``path`` cannot be written later.

    The file itself is written atomically at the end (a temporary file renamed over it), so a
    failed run never leaves a partial file nor destroys an existing one.

    Parameters
    ----------
    path : str
        The output file.
    inputs : dict of str to str, optional
        ``{description: path}`` of input files the output must not replace (a successful run
        would destroy its own input, e.g. ``kmlip fit train.xyz -o train.xyz``).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory; give a file name for the output")
    for what, other in (inputs or {}).items():
        other = os.fspath(other)
        try:
            same = os.path.samefile(path, other)
        except OSError:  # either does not exist (yet): they cannot be the same file
            same = False
        if same:
            raise ValueError(f"{path}: is the {what}; writing the output there would destroy "
                             "it, give another file name")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ValueError(f"{path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ValueError(f"{path}: cannot write to directory {directory} (permission denied)")

