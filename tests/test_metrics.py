"""Metrics against hand-computed values."""

import numpy as np
import pytest

from epbench import metrics


def test_relmse_hand_computed():
    # two elements over K = 2 steps
    f = np.array([[1.0, 0.0], [1.0, 0.0]])
    g = np.array([[1.0, 0.0], [-1.0, 0.0]])
    # element 0: ‖f−g‖ = sqrt((0 + 4)/2) = sqrt(2); max(‖f‖, ‖g‖) = 1 → sqrt(2)
    # element 1: both identically zero → 0
    assert metrics.relmse(f, g) == pytest.approx(np.sqrt(2) / 2)


def test_relmse_one_side_zero_and_scale():
    f = np.array([[2.0], [2.0]])
    g = np.zeros((2, 1))
    assert metrics.relmse(f, g) == pytest.approx(1.0)
    h = np.array([[1.0], [3.0]])
    # ‖f−h‖ = sqrt((1+1)/2) = 1; ‖f‖ = 2, ‖h‖ = sqrt(5) → 1/sqrt(5)
    assert metrics.relmse(f, h) == pytest.approx(1 / np.sqrt(5))
    assert metrics.relmse(h, h) == 0.0


def test_relmse_keeps_element_shape():
    f = np.ones((3, 2, 2))
    assert metrics.relmse(f, f) == 0.0
    with pytest.raises(ValueError):
        metrics.relmse(np.ones((3, 2)), np.ones((3, 3)))


def test_sign_agreement_both_zero_rule():
    f = np.array([1.0, -2.0, 0.0, 3.0, 0.0])
    g = np.array([2.0, -1.0, 0.0, -3.0, 1.0])
    same, both_zero = metrics.sign_agreement(f, g)
    assert same == pytest.approx(60.0)  # elements 0, 1 and 2 (both zero counts as the same sign)
    assert both_zero == pytest.approx(20.0)


def test_cosine():
    assert metrics.cosine([1.0, 0.0], [0.0, 2.0]) == pytest.approx(0.0)
    assert metrics.cosine([1.0, 1.0], [2.0, 2.0]) == pytest.approx(1.0)
    assert metrics.cosine([1.0, 2.0], [-1.0, -2.0]) == pytest.approx(-1.0)
    assert metrics.cosine([3.0, 4.0], [4.0, 3.0]) == pytest.approx(24 / 25)
    assert metrics.cosine([0.0, 0.0], [0.0, 0.0]) == 1.0
    assert metrics.cosine([0.0, 0.0], [1.0, 0.0]) == 0.0


def test_error_rate():
    scores = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert metrics.error_rate(scores, np.array([1, 0, 0, 0])) == pytest.approx(25.0)
