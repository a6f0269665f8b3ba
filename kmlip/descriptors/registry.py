"""Maps descriptor type names (as stored in model files) to classes."""
from __future__ import annotations

from importlib import import_module
from typing import Any

_TYPES = {
    "SOAP": "kmlip.descriptors.soap",
    "ACSF": "kmlip.descriptors.acsf",
    "Distance2b": "kmlip.descriptors.distance2b",
    "PairHistogram": "kmlip.descriptors.histogram",
}
#: Names used by older model files.
_ALIASES = {"Distance2B": "PairHistogram"}


def build(d: dict[str, Any]):
    """Rebuilds a descriptor from ``{"type": name, "params": {...}}``.

    The description usually comes from a model file, so every defect of it (not a dict, an
    unknown type, unknown or missing parameters, values of the wrong type or out of range) is a
    ``ValueError`` that names the descriptor and the cause.
    """
    if not isinstance(d, dict) or "type" not in d or "params" not in d:
        raise ValueError(f"descriptor description must be a dict with 'type' and 'params', "
                         f"got {_short(d)}")
    name, params = d["type"], d["params"]
    name = _ALIASES.get(name, name) if isinstance(name, str) else name
    if not isinstance(name, str) or name not in _TYPES:
        raise ValueError(f"unknown descriptor type {_short(name)}; known: {sorted(_TYPES)}")
    if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
        raise ValueError(f"descriptor {name}: 'params' must be a dict of named parameters, "
                         f"got {_short(params)}")
    cls = getattr(import_module(_TYPES[name]), name)
    valid = cls._get_param_names()
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"descriptor {name}: unknown parameters {unknown}; valid: {valid}")
    try:
        return cls(**params)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001 - any failure means the description is bad
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"descriptor {name}: invalid parameters ({msg})") from exc


def _short(v: Any, n: int = 80) -> str:
    r = repr(v)
    return r if len(r) <= n else r[:n - 3] + "..."
