"""kmlip: kernel machine-learned interatomic potentials.

SOAP descriptors with exact analytic gradients (Cython/OpenMP), sparse Gaussian-process regression
with force and virial matching, predictive variances, an Ewald baseline and an ASE calculator.
"""
from importlib import import_module

__version__ = "0.1.0"

# Public names resolved lazily, so that importing kmlip stays cheap and one missing optional piece
# does not break the rest.
_LAZY = {
    "SOAP": "kmlip.descriptors.soap",
    "ACSF": "kmlip.descriptors.acsf",
    "Distance2b": "kmlip.descriptors.distance2b",
    "neighbor_list": "kmlip.neighbors",
    "KernelPotential": "kmlip.model",
    "load": "kmlip.model",
    "KMLIPCalculator": "kmlip.calculator",
    "Ewald": "kmlip.ewald",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kmlip' has no attribute {name!r}")


def __dir__():
    return __all__
