"""``kmlip info``: prints what a model file holds."""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model file")


def run(args: argparse.Namespace) -> int:
    from kmlip import load

    model = load(args.model)
    print(f"model: {args.model}")
    for k, v in model.get_params(deep=False).items():
        if k != "descriptor":
            print(f"  {k}: {v!r}")
    print(f"  descriptor: {model.descriptor!r}")
    for attr in ("e0_", "n_sparse_", "n_labels_"):
        if hasattr(model, attr):
            print(f"  {attr}: {getattr(model, attr)!r}")
    return 0
