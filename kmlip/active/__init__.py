"""Uncertainty-gated dynamics and on-the-fly learning around a fitted model."""
from kmlip.active.gate import UncertaintyExceeded, UncertaintyGate, run_gated
from kmlip.active.learn import LearningResult, learn_on_the_fly

__all__ = ["LearningResult", "UncertaintyExceeded", "UncertaintyGate", "learn_on_the_fly",
           "run_gated"]
