"""The Gao et al. (2022) functional forms of the algorithm benchmark, fitted to hand-made curves."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.algorithms import fit_gao, gao_curve


@pytest.mark.parametrize("form", ["bon", "rl"])
def test_fit_recovers_exact_coefficients(form):
    d = np.array([0.5, 1.0, 1.5, 2.0, 3.0])
    gain = gao_curve(d, a=0.8, b=0.15, form=form)
    a, b, r2 = fit_gao(d, gain, form)
    assert a == pytest.approx(0.8, abs=1e-9) and b == pytest.approx(0.15, abs=1e-9) and r2 == pytest.approx(1.0)


def test_forms_by_hand():
    # d (a - b d) at d=2, a=1, b=0.25: 2 * (1 - 0.5) = 1;  d (a - b log d) at d=e: e * (1 - 0.25) = 0.75 e
    assert gao_curve(np.array([2.0]), 1.0, 0.25, "bon")[0] == pytest.approx(1.0)
    assert gao_curve(np.array([np.e]), 1.0, 0.25, "rl")[0] == pytest.approx(0.75 * np.e)


def test_noisy_fit_has_r2_below_one_and_drops_d_zero():
    rng = np.random.default_rng(0)
    d = np.concatenate([[0.0], np.linspace(0.2, 3, 30)])  # d = 0 is dropped (log 0)
    gain = gao_curve(d, 1.0, 0.3, "rl") + rng.normal(0, 0.05, len(d))
    a, b, r2 = fit_gao(d, gain, "rl")
    assert 0.9 < r2 < 1.0 and abs(a - 1.0) < 0.1 and abs(b - 0.3) < 0.1


def test_bad_input():
    with pytest.raises(ValueError, match="form must be"):
        fit_gao(np.ones(4), np.ones(4), "linear")
    with pytest.raises(ValueError, match="at least 3 points"):
        fit_gao(np.array([0.0, 1.0, 2.0]), np.ones(3), "bon")
