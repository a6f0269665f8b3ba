"""Descriptors: anything that yields per-atom features, per-pair gradients and the strain derivative."""
from kmlip.descriptors.base import Descriptor, PairGradients

__all__ = ["Descriptor", "PairGradients", "SOAP"]


def __getattr__(name):
    if name == "SOAP":
        from kmlip.descriptors.soap import SOAP
        return SOAP
    raise AttributeError(name)
