"""Entry point of the ``kmlip`` command: dispatches to ``kmlip.cli.<subcommand>``."""
from __future__ import annotations

import argparse
import sys
from importlib import import_module

SUBCOMMANDS = {
    "demo": "fit and test a small potential on a built-in example (EMT Cu)",
    "fit": "fit a potential to labelled structures (extxyz)",
    "predict": "predict energies, forces and uncertainties for structures",
    "info": "describe a saved model file",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kmlip", description=(
        "Kernel machine-learned interatomic potentials (SOAP + sparse GP)."))
    from kmlip import __version__

    parser.add_argument("--version", action="version", version=f"kmlip {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_ in SUBCOMMANDS.items():
        module = import_module(f"kmlip.cli.{name}")
        p = sub.add_parser(name, help=help_, description=help_)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status (errors: one line on stderr, status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 1
    try:
        return int(args._run(args) or 0)
    except (ValueError, TypeError, OSError, KeyError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"kmlip {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kmlip: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
