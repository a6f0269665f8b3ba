"""Uncertainty-gated dynamics (and, later, on-the-fly learning) around a fitted model."""
from kmlip.active.gate import UncertaintyExceeded, UncertaintyGate, run_gated

__all__ = ["UncertaintyExceeded", "UncertaintyGate", "run_gated"]
