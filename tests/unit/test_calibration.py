"""Platt calibration recovers a known miscalibration and leaves degenerate heads alone."""

from __future__ import annotations

import numpy as np
import pytest

from feedrec.evaluation.metrics import expected_calibration_error
from feedrec.models.calibration import fit_calibration, fit_platt


def test_platt_recovers_known_scale_and_bias() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 2.0, 200_000)
    labels = rng.random(len(logits)) < 1 / (1 + np.exp(-(0.5 * logits - 1.0)))
    scale, bias = fit_platt(logits, labels)
    assert scale == pytest.approx(0.5, abs=0.02) and bias == pytest.approx(-1.0, abs=0.03)
    before = expected_calibration_error(labels, 1 / (1 + np.exp(-logits)))
    after = expected_calibration_error(labels, 1 / (1 + np.exp(-(scale * logits + bias))))
    assert after < 0.01 < before


def test_single_class_head_is_left_as_identity() -> None:
    assert fit_platt(np.array([0.1, 0.2]), np.array([0, 0])) == (1.0, 0.0)


def test_table_has_one_row_per_head() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(1000, 3))
    labels = (rng.random((1000, 3)) < 0.3).astype(float)
    assert fit_calibration(logits, labels).shape == (3, 2)
