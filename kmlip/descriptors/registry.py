"""Maps descriptor type names (as stored in model files) to classes."""
from __future__ import annotations

from importlib import import_module
from typing import Any

_TYPES = {
    "SOAP": "kmlip.descriptors.soap",
    "Distance2B": "kmlip.descriptors.distance2b",
}


def build(d: dict[str, Any]):
    """Rebuilds a descriptor from ``{"type": name, "params": {...}}``."""
    try:
        name, params = d["type"], d["params"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"descriptor description must have 'type' and 'params': {d!r}") from exc
    if name not in _TYPES:
        raise ValueError(f"unknown descriptor type {name!r}; known: {sorted(_TYPES)}")
    cls = getattr(import_module(_TYPES[name]), name)
    return cls(**params)
