"""Descriptors: per-atom features with per-pair gradients and strain derivatives."""
from kmlip.descriptors.base import Descriptor, Environments, PairGradients

__all__ = ["ACSF", "Descriptor", "Distance2b", "Environments", "PairGradients", "SOAP"]

_LAZY = {"SOAP": "kmlip.descriptors.soap", "ACSF": "kmlip.descriptors.acsf",
         "Distance2b": "kmlip.descriptors.distance2b"}


def __getattr__(name):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(name)
