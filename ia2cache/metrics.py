"""Accuracy and calibration metrics (numpy only)."""

from __future__ import annotations

import numpy as np

N_BINS = 15


def ece_equal_width(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> float:
    """Expected calibration error with ``n_bins`` equal-width bins over [0, 1] (the standard one).

    A confidence of exactly 1.0 falls in the last bin.
    """
    conf, corr = _check(confidence, correct)
    idx = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    total = 0.0
    for b in range(n_bins):
        m = idx == b
        if m.any():
            total += m.sum() / len(conf) * abs(corr[m].mean() - conf[m].mean())
    return float(total)


def ece_equal_mass(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> float:
    """ECE with ``n_bins`` equal-mass bins (the IA2 paper's): rows sorted by confidence, split
    into bins of (nearly) equal size with ``np.array_split``; ties keep their original order."""
    conf, corr = _check(confidence, correct)
    order = np.argsort(conf, kind="stable")
    total = 0.0
    for part in np.array_split(order, min(n_bins, len(conf))):
        total += len(part) / len(conf) * abs(corr[part].mean() - conf[part].mean())
    return float(total)


def _check(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    conf = np.asarray(confidence, dtype=np.float64)
    corr = np.asarray(correct, dtype=np.float64)
    if conf.shape != corr.shape or conf.ndim != 1 or len(conf) == 0:
        raise ValueError("confidence and correct must be non-empty 1-d arrays of equal length")
    return conf, corr
