"""Reconstruction metrics: PSNR / SSIM on known inputs, codebook usage and perplexity on hand-built ids."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from visgen.eval.recon import ReconMetrics, evaluate_reconstruction, to_unit_range
from visgen.models.vq import VQModel, to_model_input, vq_config


def _uint8(n=4, res=16, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, res, res, 3), dtype=np.uint8)


def test_identical_images_give_capped_psnr_and_unit_ssim():
    imgs = _uint8()
    m = ReconMetrics(psnr_cap=100.0)
    m.update(imgs, imgs)
    r = m.compute()
    assert r["psnr"] == 100.0 and r["ssim"] == pytest.approx(1.0, abs=1e-6)
    assert r["n_images"] == 4 and math.isnan(r["usage"]) and math.isnan(r["perplexity"])


def test_uint8_offset_gives_exact_psnr():
    imgs = np.full((2, 16, 16, 3), 100, np.uint8)
    m = ReconMetrics()
    m.update(imgs, imgs + 5)  # MSE = (5/255)^2 on every pixel
    assert m.compute()["psnr"] == pytest.approx(20 * math.log10(255 / 5), abs=1e-3)


def test_known_gaussian_noise_gives_known_psnr_in_model_range():
    g = torch.Generator().manual_seed(0)
    real01 = 0.2 + 0.6 * torch.rand(8, 3, 32, 32, generator=g)  # away from 0 and 1: noise is never clipped
    sigma = 0.05
    noisy01 = real01 + sigma * torch.randn(real01.shape, generator=g)
    m = ReconMetrics()
    m.update(real01 * 2 - 1, noisy01 * 2 - 1)  # float images in the model's [-1, 1]
    r = m.compute()
    assert r["psnr"] == pytest.approx(10 * math.log10(1 / sigma**2), abs=0.15)  # 26.02 dB
    assert 0.0 < r["ssim"] < 0.99


def test_float_recon_is_clamped_and_mixed_forms_compare():
    imgs = _uint8()
    x = to_model_input(imgs)
    over = x * 3.0  # an unclamped decoder output overshooting [-1, 1]
    assert torch.equal(to_unit_range(over), (x * 3.0).clamp(-1, 1).add(1).div(2))
    m = ReconMetrics()
    m.update(imgs, x)  # uint8 real vs float recon of the same pixels
    assert m.compute()["psnr"] == 100.0


def test_usage_and_perplexity_over_the_whole_set():
    m = ReconMetrics(num_codes=8)
    imgs = _uint8(2, 16)
    m.update(imgs, imgs, torch.zeros(2, 2, 2, dtype=torch.long))  # batch 1: only code 0
    m.update(imgs, imgs, np.ones((2, 2, 2), dtype=np.int64))       # batch 2: only code 1
    r = m.compute()
    # Each batch alone has perplexity 1; over the set the two codes are equally likely.
    assert r["usage"] == pytest.approx(2 / 8) and r["perplexity"] == pytest.approx(2.0)
    assert r["codes_used"] == 2 and r["n_images"] == 4

    m = ReconMetrics(num_codes=8)
    m.update(imgs, imgs, torch.arange(8).reshape(2, 2, 2))  # every code once: uniform
    assert m.compute()["usage"] == 1.0 and m.compute()["perplexity"] == pytest.approx(8.0)

    m = ReconMetrics(num_codes=4)
    m.update(imgs, imgs, torch.tensor([[[0, 0], [0, 1]], [[0, 0], [0, 1]]]))  # p = (3/4, 1/4)
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert m.compute()["perplexity"] == pytest.approx(expected)


def test_merge_equals_one_accumulator():
    a, b, whole = ReconMetrics(num_codes=16), ReconMetrics(num_codes=16), ReconMetrics(num_codes=16)
    for i, part in enumerate((a, b)):
        real, recon = _uint8(3, 16, seed=i), _uint8(3, 16, seed=10 + i)
        ids = torch.randint(0, 16, (3, 4, 4), generator=torch.Generator().manual_seed(i))
        part.update(real, recon, ids)
        whole.update(real, recon, ids)
    merged = a.merge(b).compute()
    ref = whole.compute()
    assert merged.keys() == ref.keys()
    assert all(merged[k] == pytest.approx(ref[k]) for k in ref)


def test_bad_inputs_are_clear_errors():
    imgs = _uint8(2, 16)
    m = ReconMetrics(num_codes=4)
    with pytest.raises(ValueError, match="before any update"):
        m.compute()
    with pytest.raises(ValueError, match="differ in shape"):
        m.update(imgs, _uint8(2, 8))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 4\)"):
        m.update(imgs, imgs, torch.full((2, 2, 2), 4))
    with pytest.raises(ValueError, match="no num_codes"):
        ReconMetrics().update(imgs, imgs, torch.zeros(2, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="uint8"):
        m.update(imgs.astype(np.float32), imgs)


def test_evaluate_reconstruction_on_a_model():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: extra threads only wait for each other on a busy machine
    try:
        _check_evaluate_reconstruction()
    finally:
        torch.set_num_threads(threads)


def _check_evaluate_reconstruction():
    model = VQModel(vq_config("tiny"))
    model.train()
    imgs = _uint8(6, 16)
    steps = int(model.quantizer.stat_steps)
    batches = [imgs[:3], {"image": imgs[3:]}]  # plain arrays and Ray-style dict batches
    r = evaluate_reconstruction(model, batches)
    assert r["n_images"] == 6
    assert 0 < r["usage"] <= 1 and 1 <= r["perplexity"] <= model.num_codes
    assert r["codes_used"] == round(r["usage"] * model.num_codes)
    assert math.isfinite(r["psnr"]) and -1 <= r["ssim"] <= 1
    assert model.training and int(model.quantizer.stat_steps) == steps  # mode restored, no stats updated
    # The metric matches reconstructing by hand.
    model.eval()
    x = to_model_input(imgs)
    ref = ReconMetrics(num_codes=model.num_codes)
    with torch.no_grad():
        out = model(x)
    ref.update(imgs, out["recon"], out["ids"])
    assert r["psnr"] == pytest.approx(ref.compute()["psnr"], abs=1e-4)
    assert evaluate_reconstruction(model, batches, max_batches=1)["n_images"] == 3
