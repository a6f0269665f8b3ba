"""Descriptors: per-atom features with per-pair gradients and strain derivatives."""
from kmlip.descriptors.base import Descriptor, PairGradients

__all__ = ["Descriptor", "PairGradients", "SOAP"]


def __getattr__(name):
    if name == "SOAP":
        from kmlip.descriptors.soap import SOAP
        return SOAP
    raise AttributeError(name)
