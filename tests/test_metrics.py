from __future__ import annotations

import numpy as np
import pytest

from ia2cache.metrics import ece_equal_mass, ece_equal_width


def test_ece_equal_width_by_hand() -> None:
    conf = np.array([0.05, 0.10, 0.95, 0.97, 0.50])
    corr = np.array([0, 1, 1, 0, 1])
    # 15 bins of width 1/15 = 0.0667: 0.05 is in bin 0, 0.10 in bin 1.
    # bin0: {0.05}: |0 - 0.05| ; bin1: {0.10}: |1 - 0.10| ; bin7: {0.50}: |1 - 0.5|
    # bin14: {0.95, 0.97}: |0.5 - 0.96|
    want = (0.05 + 0.90 + 0.50 + 2 * 0.46) / 5
    assert ece_equal_width(conf, corr) == pytest.approx(want)


def test_ece_equal_mass_by_hand() -> None:
    conf = np.array([0.9, 0.2, 0.6, 0.8])
    corr = np.array([1, 0, 0, 1])
    # 2 bins of 2 rows after sorting: {0.2, 0.6} -> |0 - 0.4| ; {0.8, 0.9} -> |1 - 0.85|
    want = 0.5 * 0.4 + 0.5 * 0.15
    assert ece_equal_mass(conf, corr, n_bins=2) == pytest.approx(want)


def test_perfect_calibration_is_zero_and_confidence_one_goes_last_bin() -> None:
    assert ece_equal_width(np.array([1.0, 1.0]), np.array([1, 1])) == pytest.approx(0.0)
    assert ece_equal_mass(np.array([1.0, 0.0]), np.array([1, 0])) == pytest.approx(0.0)


def test_bad_shapes_refused() -> None:
    with pytest.raises(ValueError):
        ece_equal_width(np.array([0.1]), np.array([1, 0]))
