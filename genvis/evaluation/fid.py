"""Gaussian feature statistics and the Frechet distance between them, in float64.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule...") is
    ||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)).
The trace of the matrix square root is computed from symmetric eigendecompositions and one
SVD instead of scipy's `sqrtm`, which is slow for D = 2048 and can return complex values or fail on
near-singular covariances (few samples, or dead ReLU features).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from genvis.errors import GenvisError


def feature_statistics(features) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of features.

    Args:
        features: [N, D] numpy array or torch tensor (any float dtype, any device), N >= 2.

    Returns:
        mu: float64 [D]; sigma: float64 [D, D], `np.cov(rowvar=False)` (unbiased, ddof=1).
    """
    if hasattr(features, "detach"):  # torch tensor, without importing torch here
        features = features.detach().cpu().double().numpy()
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise GenvisError(f"features of shape {features.shape}: expected [N, D] with N >= 2")
    mu = features.mean(axis=0)
    sigma = np.cov(features, rowvar=False)
    return mu, np.atleast_2d(sigma)  # np.cov gives a 0-d array when D == 1


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix; negative rounding-error eigenvalues -> 0."""
    eigvals, eigvecs = np.linalg.eigh(matrix)
    return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), as a python float.

    Args:
        mu1, mu2: [D] means. sigma1, sigma2: [D, D] symmetric PSD covariances.

    With A = S1^(1/2) and B = S2^(1/2) (symmetric roots from `eigh`, negative eigenvalues clipped),
    S1 S2 is similar to the PSD matrix A S2 A = (A B)(A B)^T, so
        tr((S1 S2)^(1/2)) = sum(sqrt(eigvalsh(A S2 A))) = sum(singvals(A B)).
    The singular-value form is used: eigenvalues of A S2 A near zero carry rounding errors of
    about eps * |S|^2, which the square root inflates to sqrt(eps) * |S| each. With rank-deficient
    covariances (dead ReLU features, N < D) that left FD(x, x) at about -1e-4 instead of 0;
    singular values of A B are accurate to about eps * |S| and give |FD(x, x)| ~ 1e-11.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise GenvisError(
            f"frechet_distance: shapes mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, "
            f"sigma2 {sigma2.shape}; expected [D] means and [D, D] covariances of one D"
        )
    # One BLAS/LAPACK thread: multithreaded eigh/svd/matmul round differently with the thread count, and
    # the metric must not depend on the machine's or the launcher's OMP_NUM_THREADS (accelerate launch
    # sets 1 for several processes); single-threaded it is the same bits everywhere on one build.
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        a = _sqrt_psd((sigma1 + sigma1.T) / 2)
        b = _sqrt_psd((sigma2 + sigma2.T) / 2)
        tr_covmean = np.linalg.svd(a @ b, compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
