"""kmlip: kernel machine-learned interatomic potentials.

SOAP descriptors with exact analytic gradients (Cython/OpenMP), sparse Gaussian-process regression
with force and virial matching, predictive variances, an Ewald baseline and an ASE calculator.
"""
from kmlip._lazy import lazy_attributes

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

__getattr__, __dir__, __all__ = lazy_attributes(__name__, _LAZY, extra=("__version__",))
