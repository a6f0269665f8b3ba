"""Entry point of the ``kmlip`` command: dispatches to ``kmlip.cli.<subcommand>``.

Errors are one line on stderr, ``kmlip <cmd>: error: <cause>``: exit status 2 for bad input
(files that cannot be read, invalid parameters, failed writes), 1 for an unexpected internal
error (set ``KMLIP_DEBUG=1`` to get its traceback), 130 on Ctrl-C. Warnings are one line too.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from importlib import import_module

SUBCOMMANDS = {
    "demo": "fit and test a small potential on a built-in example (EMT Cu)",
    "fit": "fit a SOAP + sparse-GP potential to labelled structures",
    "predict": "predict energies, forces, stress and their uncertainties for structures",
    "info": "describe a saved model file",
    "eval": "errors of a model on labelled structures and how well its uncertainty predicts them",
    "md": "molecular dynamics with a model, optionally stopped by an uncertainty gate",
    "learn": "learn a potential on the fly from a reference calculator (EMT, xtb, any ASE one)",
    "lammps": "LAMMPS pair style: build the plugin, export a model for pair_coeff",
}

EPILOG = ("Errors are printed as one line on stderr with exit status 2 (1 for an internal error; "
          "set KMLIP_DEBUG=1 for its traceback).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kmlip", epilog=EPILOG, description=(
        "Kernel machine-learned interatomic potentials (SOAP + sparse GP). "
        "Units: eV, Å, eV/Å, stress eV/Å³."))
    from kmlip import __version__

    parser.add_argument("--version", action="version", version=f"kmlip {__version__}",
                        help="print the kmlip version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND",
                                help="run 'kmlip COMMAND --help' for its options")
    for name, help_ in SUBCOMMANDS.items():
        module = import_module(f"kmlip.cli.{name}")
        p = sub.add_parser(name, help=help_, description=getattr(module, "DESCRIPTION", help_),
                           epilog=EPILOG)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command line and returns the exit status (see the module docstring).

    Parameters
    ----------
    argv : list of str or None
        Arguments without the program name; None reads ``sys.argv[1:]``.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) and usage errors (2), printed by argparse
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if not getattr(args, "command", None):
        parser.print_help()
        return 1
    prefix = f"kmlip {args.command}"

    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        from kmlip.cli._files import first_line

        text = first_line(message) if isinstance(message, Warning) else str(message)
        print(f"{prefix}: warning: {text}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = one_line_warning  # restored when the block ends
        try:
            return int(args._run(args) or 0)
        except KeyboardInterrupt:
            print(f"{prefix}: interrupted", file=sys.stderr)
            return 130
        except (ValueError, TypeError, OSError, KeyError, MemoryError) as exc:
            from kmlip.cli._files import first_line

            msg = first_line(exc)
            if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in msg:
                msg = f"{exc.filename}: {msg}"
            if isinstance(exc, MemoryError):
                msg = f"out of memory{': ' + msg if msg != 'MemoryError' else ''}"
            print(f"{prefix}: error: {msg}", file=sys.stderr)
            return 2
        except Exception as exc:
            if os.environ.get("KMLIP_DEBUG"):
                raise
            from kmlip.cli._files import first_line

            print(f"{prefix}: internal error: {type(exc).__name__}: {first_line(exc)} "
                  "(set KMLIP_DEBUG=1 for a traceback)", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
