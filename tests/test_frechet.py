"""Fréchet distance: closed forms, edge cases, and on judge features of renders."""

from __future__ import annotations

import numpy as np
import pytest

from visgen.data import shapes
from visgen.eval import judge as J
from visgen.eval.frechet import fit_gaussian, frechet_distance, frechet_from_features, judge_frechet


def test_diagonal_gaussians_match_the_closed_form():
    # For diagonal covariances the distance is |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    expected = 5.0 + (1 - 2) ** 2 + 0.0 + (3 - 1) ** 2
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected)


def test_agrees_with_the_general_matrix_square_root():
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6))
    y = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) + 0.5
    (m1, s1), (m2, s2) = fit_gaussian(x), fit_gaussian(y)
    reference = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * sqrtm(s1 @ s2).real)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(reference, rel=1e-6)
    assert frechet_distance(m2, s2, m1, s1) == pytest.approx(reference, rel=1e-6)  # symmetric


def test_same_set_is_zero_and_a_mean_shift_adds_its_square():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 5))
    assert frechet_from_features(x, x) == pytest.approx(0.0, abs=1e-8)
    # Rank-deficient covariances (fewer samples than dimensions) still give a finite, exact value.
    few = rng.normal(size=(4, 10))
    assert frechet_from_features(few, few) == pytest.approx(0.0, abs=1e-8)
    assert frechet_from_features(x + 3.0, x) == pytest.approx(9.0 * 5, rel=1e-9)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="N >= 2"):
        fit_gaussian(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="same D"):
        frechet_from_features(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="non-finite"):
        fit_gaussian(np.array([[0.0, np.nan], [1.0, 2.0]]))


def _renders(tasks, n, offset, res=32):
    return [J.encode_decode_jpeg(shapes.render(J.held_out_scene(tasks[i % len(tasks)], offset + i, res)), 95)
            for i in range(n)]


def test_judge_features_separate_distributions():
    # Any fixed network will do for these properties; an untrained one keeps the test fast.
    import torch
    from scipy import ndimage

    torch.manual_seed(0)
    cfg = J.JudgeConfig()
    judge = J.Judge(cfg, J.build_net(cfg))
    real_a = _renders(shapes.TASKS, 60, 0)
    real_b = _renders(shapes.TASKS, 60, 1000)           # same distribution, other scenes
    single = _renders(["single_object"], 60, 2000)        # a different distribution: one object each
    # Blurred, washed-out "generations" of the same scenes.
    blurry = [np.clip(ndimage.gaussian_filter(im.astype(np.float32), (1.0, 1.0, 0)) * 0.8 + 25, 0, 255).astype(np.uint8)
              for im in real_a]
    fa, fb, fs = judge.features(real_a), judge.features(real_b), judge.features(single)
    assert fa.shape == (60, J.FEATURE_DIM_FIXED + cfg.hidden)
    assert frechet_from_features(fa, fa) == pytest.approx(0.0, abs=1e-6)
    d_same_dist = frechet_from_features(fa, fb)
    assert frechet_from_features(fs, fb) > 2.0 * d_same_dist > 0.0
    result = judge_frechet(judge, blurry, real_b)
    assert result["frechet_judge"] > 5.0 * d_same_dist
    assert result["judge_fingerprint"] == judge.fingerprint and result["generated"] == result["real"] == 60
