"""``kmlip info``: prints what a model file holds."""
from __future__ import annotations

import argparse

from kmlip.cli._files import load_model

DESCRIPTION = ("Describe a saved model file: its parameters, descriptor, per-species e0 (eV) "
               "and sparse points. A file that cannot be loaded gives a one-line error.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model file written by 'kmlip fit' or KernelPotential.save")


def run(args: argparse.Namespace) -> int:
    model = load_model(args.model)
    print(f"model: {args.model}")
    for k, v in model.get_params(deep=False).items():
        if k != "descriptor":
            print(f"  {k}: {v!r}")
    print(f"  descriptor: {model.descriptor!r}")
    for attr in ("e0_", "n_sparse_", "n_labels_"):
        if hasattr(model, attr):
            print(f"  {attr}: {getattr(model, attr)!r}")
    return 0
