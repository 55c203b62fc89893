"""Fréchet distance between generated and real images: on the shapes judge's features, and the math for any features.

The distance fits a Gaussian to each set of feature vectors and reports

    d² = ‖μ_g − μ_r‖² + Tr(Σ_g + Σ_r − 2 (Σ_g^½ Σ_r Σ_g^½)^½)

The features are :meth:`visgen.eval.judge.Judge.features`: one vector per image built from what
the judge sees — the fraction of the image in each of the ten colours, a coarse 4 × 4 map of
foreground, the number of objects, counts of detected shapes / colours / sizes, three fidelity
terms (background tint, objects' distance from their palette colour, edge softness), and the
mean of the judge network's last hidden layer over the image's objects. It therefore measures
both *what* a generator draws (composition, colour and shape statistics) and, more coarsely,
*how cleanly* it draws it.

**This is not FID and is not comparable to FID.** FID uses Inception-v3 pool features of natural
images; these features only know the shapes domain, have a different dimension and scale, and
depend on the judge's weights (the judge's fingerprint is reported with every value). Use it to
compare models scored with the same judge, on the same resolution and sample size — the estimate
is biased upwards for small samples, so compare numbers computed from equally many images.

The Gaussian fit and the distance (:func:`frechet_from_features`) serve any features: on data that
is not shapes, :mod:`visgen.eval.generic` reports ``frechet_vq_encoder`` on the image tokenizer's
encoder features, with the same caveats (not FID; comparable only under one image tokenizer).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def fit_gaussian(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and covariance ``(D, D)`` of ``(N, D)`` features (N ≥ 2)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2 to estimate a covariance, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"features hold {int((~np.isfinite(x)).sum())} non-finite values")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a positive semi-definite matrix (tiny negative eigenvalues from
    round-off are clipped to zero)."""
    w, v = np.linalg.eigh((s + s.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between two Gaussians.

    The cross term uses ``Tr((Σ1^½ Σ2 Σ1^½)^½)``, which equals ``Tr((Σ1 Σ2)^½)`` but is the square
    root of a symmetric PSD matrix, so it is computed with ``eigh`` (real, stable) rather than a
    general matrix square root that can turn complex on nearly singular covariances.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    r1 = _psd_sqrt(sigma1)
    cross = np.linalg.eigvalsh(r1 @ sigma2 @ r1)
    trace_sqrt = float(np.sqrt(np.clip(cross, 0.0, None)).sum())
    d2 = float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)
    return max(d2, 0.0)


def frechet_from_features(generated: np.ndarray, real: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to two ``(N, D)`` feature sets."""
    g, r = np.asarray(generated), np.asarray(real)
    if g.ndim != 2 or r.ndim != 2 or g.shape[1] != r.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with the same D, got {g.shape} and {r.shape}")
    return frechet_distance(*fit_gaussian(g), *fit_gaussian(r))


def judge_frechet(judge, generated: Sequence[np.ndarray], real: Sequence[np.ndarray]) -> dict:
    """Fréchet distance on judge features between generated and real uint8 images.

    Returns ``{"frechet_judge": d, "generated": n_g, "real": n_r, "feature_dim": D,
    "judge_fingerprint": ...}`` so a value never travels without what it depends on.
    """
    fg, fr = judge.features(generated), judge.features(real)
    return {"frechet_judge": frechet_from_features(fg, fr), "generated": int(fg.shape[0]), "real": int(fr.shape[0]),
            "feature_dim": int(fg.shape[1]), "judge_fingerprint": judge.fingerprint}
