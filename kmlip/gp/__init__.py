"""Sparse Gaussian-process regression: streaming-QR DTC solve, variances, sparse selection."""
from kmlip.gp.selection import select
from kmlip.gp.sparse import (
    StreamingQR,
    cholesky_jitter,
    optimize_hyperparameters,
    predictive_variance,
    solve_stack,
)

__all__ = ["StreamingQR", "cholesky_jitter", "optimize_hyperparameters", "predictive_variance",
           "select", "solve_stack"]
