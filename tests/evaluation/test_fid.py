"""Frechet distance against scipy's sqrtm formula and closed forms."""
import numpy as np
import pytest
import scipy.linalg
import torch

from genvis.errors import GenvisError
from genvis.evaluation import feature_statistics, frechet_distance


def _scipy_fd(mu1, sigma1, mu2, sigma2):
    """The textbook formula (pytorch-fid / ADM evaluator), independent of genvis."""
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1 + sigma2 - 2 * covmean.real))


def _random_spd(rng, d):
    g = rng.randn(d, d)
    return g @ g.T / d + 0.1 * np.eye(d)


@pytest.mark.parametrize("d", [1, 7, 64])
def test_matches_scipy_sqrtm(d):
    rng = np.random.RandomState(d)
    for _ in range(3):
        mu1, mu2 = rng.randn(d), rng.randn(d)
        s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_scipy_fd(mu1, s1, mu2, s2), rel=1e-6)


def test_identical_statistics_give_zero_even_when_rank_deficient():
    rng = np.random.RandomState(0)
    mu, sigma = rng.randn(32), _random_spd(rng, 32)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    # 50 samples in 200 dims with some dead (always-zero) features: a singular covariance.
    x = rng.randn(50, 200) * rng.rand(200) * 10
    x[:, :40] = 0
    mu, sigma = feature_statistics(x)
    assert np.linalg.matrix_rank(sigma) < 200
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_one_dimensional_closed_form():
    # Between N(m1, s1^2) and N(m2, s2^2): (m1 - m2)^2 + (s1 - s2)^2.
    for m1, s1, m2, s2 in [(0.0, 1.0, 0.0, 1.0), (1.5, 2.0, -0.5, 0.5), (3.0, 0.1, 3.0, 4.0)]:
        expected = (m1 - m2) ** 2 + (s1 - s2) ** 2
        got = frechet_distance(np.array([m1]), np.array([[s1**2]]), np.array([m2]), np.array([[s2**2]]))
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_diagonal_closed_form():
    # Commuting (diagonal) covariances: sum of the 1-D terms.
    rng = np.random.RandomState(1)
    m1, m2, s1, s2 = rng.randn(5), rng.randn(5), rng.rand(5) + 0.1, rng.rand(5) + 0.1
    expected = np.sum((m1 - m2) ** 2 + (s1 - s2) ** 2)
    assert frechet_distance(m1, np.diag(s1**2), m2, np.diag(s2**2)) == pytest.approx(expected, rel=1e-10)


def test_feature_statistics_numpy_and_torch():
    rng = np.random.RandomState(2)
    x = rng.randn(100, 6).astype(np.float32)
    mu, sigma = feature_statistics(x)
    assert mu.dtype == np.float64 and sigma.shape == (6, 6)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mu, x64.sum(0) / 100, rtol=1e-12)
    centred = x64 - x64.mean(0)
    np.testing.assert_allclose(sigma, centred.T @ centred / 99, rtol=1e-10)  # ddof = 1
    mu_t, sigma_t = feature_statistics(torch.from_numpy(x))
    np.testing.assert_array_equal(mu_t, mu)
    np.testing.assert_array_equal(sigma_t, sigma)
    assert feature_statistics(x[:, :1])[1].shape == (1, 1)


def test_shape_mismatch_names_shapes():
    with pytest.raises(GenvisError, match=r"\(3,\).*\(4, 4\)|\(4, 4\).*\(3,\)"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(GenvisError, match=r"\(3, 2\)"):
        frechet_distance(np.zeros(3), np.zeros((3, 2)), np.zeros(3), np.eye(3))
