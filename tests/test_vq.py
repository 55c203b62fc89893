"""VQ image tokenizer: geometry, quantizer maths, usage stats and restarts, losses, persistence, a short overfit."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from visgen.config import SpecError
from visgen.models.vq import (
    CONFIG_FILE,
    PRESETS,
    WEIGHTS_FILE,
    PatchDiscriminator,
    VectorQuantizer,
    VQLoss,
    VQModel,
    load_vq,
    save_vq,
    to_model_input,
    to_uint8,
    vq_config,
)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    # One thread: these models are too small to gain from more, and on a busy machine extra
    # threads mostly wait for each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def _images(n: int, res: int, seed: int = 0) -> np.ndarray:
    """Flat-coloured rectangles and discs on a grey background, uint8 (n, res, res, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:res, 0:res]
    imgs = np.full((n, res, res, 3), 128, np.uint8)
    palette = np.array([[230, 25, 25], [30, 60, 230], [255, 230, 0], [20, 170, 40], [10, 10, 10], [250, 250, 250]])
    for i in range(n):
        for _ in range(rng.integers(1, 3)):
            s = int(rng.integers(res // 4, res // 2))
            x0, y0 = rng.integers(0, res - s, 2)
            if rng.random() < 0.5:
                mask = (xx >= x0) & (xx < x0 + s) & (yy >= y0) & (yy < y0 + s)
            else:
                mask = (xx - x0 - s / 2) ** 2 + (yy - y0 - s / 2) ** 2 <= (s / 2) ** 2
            imgs[i][mask] = palette[rng.integers(len(palette))]
    return imgs


def _cheap(preset: str, **kw) -> VQModel:
    """The preset's geometry (resolution, levels, codebook) with few channels so a CPU forward is instant."""
    return VQModel(vq_config(preset, base_channels=4, z_channels=8, num_res_blocks=1, **kw))


# -- config ---------------------------------------------------------------------------------------

def test_presets_validate_and_unknown_preset_lists_them():
    for name in PRESETS:
        cfg = vq_config(name)
        assert cfg.resolution % cfg.downsample == 0
    with pytest.raises(SpecError, match="tiny, small, base"):
        vq_config("huge")


def test_bad_geometry_is_a_clear_error():
    with pytest.raises(SpecError, match="not divisible by the downsample factor 16"):
        vq_config("base", resolution=72)
    with pytest.raises(SpecError, match="no reconstruction loss"):
        vq_config("tiny", l1_weight=0.0, l2_weight=0.0)
    with pytest.raises(SpecError, match="disc_layers=3 is too deep"):
        vq_config("tiny", use_gan=True, disc_layers=3)
    with pytest.raises(SpecError, match="codebook_size"):
        vq_config("tiny", codebook_size=1)
    with pytest.raises(SpecError, match="unknown key"):
        vq_config("tiny", codebok_size=64)


# -- geometry and lookup --------------------------------------------------------------------------

@pytest.mark.parametrize("preset", list(PRESETS))
def test_encode_decode_round_trip_shapes(preset):
    model = _cheap(preset).eval()
    cfg = model.cfg
    x = torch.rand(2, 3, cfg.resolution, cfg.resolution) * 2 - 1
    ids = model.encode(x)
    h, w = model.grid_shape
    assert h == w == cfg.resolution // cfg.downsample
    assert ids.shape == (2, h, w) and ids.dtype == torch.long
    assert 0 <= int(ids.min()) and int(ids.max()) < model.num_codes == cfg.codebook_size
    imgs = model.decode(ids)
    assert imgs.shape == x.shape and imgs.dtype == torch.float32
    assert float(imgs.min()) >= -1.0 and float(imgs.max()) <= 1.0
    out = model(x)
    assert out["recon"].shape == x.shape and torch.equal(out["ids"], ids)
    assert out["codebook_loss"].ndim == 0 and out["commit_loss"].ndim == 0


@pytest.mark.parametrize("preset", list(PRESETS))
def test_patch_encoder_codes_depend_on_their_own_patch_only(preset):
    model = _cheap(preset, encoder="patch").eval()
    cfg, f = model.cfg, model.cfg.downsample
    x = torch.rand(1, 3, cfg.resolution, cfg.resolution) * 2 - 1
    y = x.clone()
    y[:, :, :f, :f] = -x[:, :, :f, :f]  # change the top-left patch only
    a, b = model.encode(x), model.encode(y)
    z = model.encoder(x) - model.encoder(y)
    assert float(z[..., 1:, :].abs().max()) == 0.0 and float(z[..., 0, 1:].abs().max()) == 0.0
    assert float(z[..., 0, 0].abs().max()) > 0
    assert torch.equal(a[:, 1:], b[:, 1:]) and torch.equal(a[:, 0, 1:], b[:, 0, 1:])
    # a flat image is one code wherever the patch sits; the convolutional encoder sees its padding
    flat = torch.zeros(1, 3, cfg.resolution, cfg.resolution)
    assert model.encode(flat).unique().numel() == 1
    assert _cheap(preset, encoder="resnet").eval().encoder(flat).flatten(2).std(-1).max() > 0


def test_channel_norm_keeps_the_decoder_local():
    # GroupNorm pools statistics over the whole map: one code changed in a corner moves every pixel
    # (and a map of one code, an empty scene, is normalised by ~sqrt(eps)). Per-position channel
    # norm leaves pixels outside the decoder's receptive field exactly as they were.
    for norm, local in (("channel", True), ("group", False)):
        torch.manual_seed(0)
        model = VQModel(vq_config("small", resolution=128, base_channels=8, z_channels=16,
                                  encoder="patch", norm=norm)).eval()
        ids = torch.full((1, 32, 32), 3)  # 4x down: 32 x 32 codes, wider than the decoder's receptive field
        changed = ids.clone()
        changed[0, 0, 0] = 7
        far = (model.decode(ids) - model.decode(changed))[..., 96:, 96:].abs().max()
        assert (float(far) == 0.0) is local, (norm, float(far))


def test_models_saved_before_the_encoder_and_norm_fields_still_load(tmp_path):
    model = VQModel(vq_config("tiny")).eval()
    save_vq(model, tmp_path)
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    for key in ("encoder", "norm"):  # what a file written before these fields existed holds
        del meta["config"][key]
    (tmp_path / CONFIG_FILE).write_text(json.dumps(meta))
    assert load_vq(tmp_path).fingerprint() == model.fingerprint() == meta["fingerprint"]
    assert VQModel(vq_config("tiny", encoder="patch")).fingerprint() != model.fingerprint()


def test_bad_inputs_are_rejected():
    model = VQModel(vq_config("tiny")).eval()
    with pytest.raises(ValueError, match="to_model_input"):
        model.encode(torch.zeros(1, 16, 16, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="not divisible"):
        model.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match=r"ids must lie in \[0, 64\)"):
        model.decode(torch.full((1, 8, 8), 64))


def test_gradients_reach_encoder_through_straight_through():
    model = VQModel(vq_config("tiny"))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    F.mse_loss(model(x)["recon"], x).backward()  # reconstruction only: no commitment path
    g = model.encoder.conv_in.weight.grad
    assert g is not None and float(g.abs().sum()) > 0
    assert model.quantizer.embedding.weight.grad is None  # codes learn only from the codebook loss


def test_l2_normalised_lookup_picks_nearest_code_by_cosine():
    q = VectorQuantizer(vq_config("tiny", codebook_size=32, codebook_dim=4)).eval()
    with torch.no_grad():  # codes of very different lengths: Euclidean nearest would differ
        q.embedding.weight.copy_(torch.randn(32, 4) * torch.logspace(-2, 2, 32)[:, None])
    z = torch.randn(3, 4, 5, 5) * 7.0
    ids = q(z)["ids"]  # (3, 5, 5)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    cos = F.normalize(flat, dim=-1) @ F.normalize(q.embedding.weight, dim=-1).t()
    assert torch.equal(ids.reshape(-1), cos.argmax(-1))
    assert not torch.equal(ids.reshape(-1), torch.cdist(flat, q.embedding.weight).argmin(-1))
    # Scaling z does not change a cosine lookup.
    assert torch.equal(q(z * 0.01)["ids"], ids)


def test_euclidean_lookup_when_codes_not_normalised():
    q = VectorQuantizer(vq_config("tiny", codebook_size=32, codebook_dim=4, l2_norm_codes=False)).eval()
    with torch.no_grad():
        q.embedding.weight.copy_(torch.randn(32, 4))
    z = torch.randn(2, 4, 3, 3)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.equal(q(z)["ids"].reshape(-1), torch.cdist(flat, q.embedding.weight).argmin(-1))


def test_vq_losses_vanish_when_z_is_a_code():
    q = VectorQuantizer(vq_config("tiny", codebook_size=16, codebook_dim=4))
    ids = torch.randint(0, 16, (2, 3, 3))
    z = q.lookup(ids).detach() * 3.0  # on the code's ray; l2 normalisation removes the scale
    out = q(z)
    assert torch.equal(out["ids"], ids)
    assert float(out["codebook_loss"].detach()) < 1e-12 and float(out["commit_loss"]) < 1e-12
    assert torch.allclose(out["zq"], q.lookup(ids), atol=1e-6)
    # Away from a code both losses are positive, and only the codebook loss reaches the codes.
    z2 = (z + 0.3 * torch.randn_like(z)).requires_grad_(True)
    out2 = q(z2)
    assert float(out2["codebook_loss"].detach()) > 0 and float(out2["commit_loss"].detach()) > 0
    out2["codebook_loss"].backward()
    assert z2.grad is None or float(z2.grad.abs().sum()) == 0
    assert float(q.embedding.weight.grad.abs().sum()) > 0


def test_entropy_loss_is_optional_and_finite():
    cfg = vq_config("tiny", entropy_weight=0.1)
    q = VectorQuantizer(cfg)
    out = q(torch.randn(2, cfg.codebook_dim, 4, 4))
    assert torch.isfinite(out["entropy_loss"]) and float(out["entropy_loss"].detach()) != 0
    assert float(VectorQuantizer(vq_config("tiny"))(torch.randn(2, 8, 4, 4))["entropy_loss"]) == 0


# -- usage statistics and dead-code restarts -------------------------------------------------------

def test_usage_counts_only_training_forwards_over_a_window():
    q = VectorQuantizer(vq_config("tiny", codebook_size=16, codebook_dim=4, usage_window=4, restart_dead_codes=False))
    with torch.no_grad():
        q.embedding.weight.copy_(torch.eye(4).repeat(4, 1) + 0.01 * torch.randn(16, 4))
    z = q.lookup(torch.zeros(1, 2, 2, dtype=torch.long)).detach()  # always code 0
    q.eval()
    q(z)
    assert q.usage() == 0.0 and int(q.stat_steps) == 0  # eval forwards leave the stats alone
    q.train()
    with torch.no_grad():
        q(z)
    assert int(q.stat_steps) == 0  # so do no-grad forwards (validation in train mode)
    for _ in range(3):
        q(z)
    assert q.usage() == pytest.approx(1 / 16) and q.perplexity() == pytest.approx(1.0)
    z_all = q.lookup(torch.arange(16).reshape(1, 4, 4)).detach()  # every code once
    q(z_all)
    assert q.usage() == 1.0
    assert 1.0 < q.perplexity() < 16.0
    for _ in range(4):  # a full window of code-0-only steps pushes the all-codes step out
        q(z)
    assert q.usage() == pytest.approx(1 / 16)


def test_dead_code_restart_reinitialises_unused_codes_and_usage_rises():
    cfg = vq_config("tiny", codebook_size=16, codebook_dim=4, usage_window=4)
    q = VectorQuantizer(cfg).train()
    with torch.no_grad():  # code 0 points along +x, all others away from it
        w = -torch.rand(16, 4) - 0.5
        w[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
        q.embedding.weight.copy_(w)
    near_x = torch.tensor([1.0, 0.1, 0.1, 0.1]).reshape(1, 4, 1, 1).expand(8, 4, 4, 4).contiguous()
    for _ in range(4):  # one window in which only code 0 is used
        assert (q(near_x)["ids"] == 0).all()
    assert q.usage() == pytest.approx(1 / 16)
    before = q.embedding.weight.detach().clone()
    diverse = torch.randn(8, 4, 4, 4)
    q(diverse)  # step 4: a full window observed -> 15 dead codes restarted from this batch
    assert int(q.stat_restarts) == 15
    assert torch.equal(q.embedding.weight[0], before[0])  # the live code is untouched
    batch = F.normalize(diverse.permute(0, 2, 3, 1).reshape(-1, 4), dim=-1)
    for k in range(1, 16):  # every restarted code is one of the batch's (normalised) vectors
        assert torch.isclose(batch, q.embedding.weight[k].detach()).all(-1).any()
    for _ in range(3):  # the window now holds the restart step and three more
        q(torch.randn(8, 4, 4, 4))
    assert q.usage() >= 15 / 16  # every restarted code is in use (code 0 may lose out to them)
    assert int(q.stat_restarts) == 15  # restarted codes are not judged again within a window


def _ddp_restart_worker(rank: int, world: int, init_file: str, result_file: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # different random state and data on each rank
        q = VectorQuantizer(vq_config("tiny", codebook_size=16, codebook_dim=4, usage_window=2)).train()
        with torch.no_grad():
            q.embedding.weight.copy_(torch.ones(16, 4))  # same init everywhere, all codes identical
        for _ in range(5):
            q(torch.randn(4, 4, 2, 2) + 3.0 * rank)
        state = {"weight": q.embedding.weight.detach().tolist(), "counts": q.stat_counts.tolist(),
                 "restarts": int(q.stat_restarts)}
        with open(f"{result_file}.{rank}", "w") as f:
            json.dump(state, f)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # spawns two processes (a few seconds of imports)
def test_restarts_and_counts_stay_identical_across_ddp_ranks(tmp_path):
    import torch.multiprocessing as mp

    world = 2
    mp.spawn(_ddp_restart_worker, args=(world, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=world)
    states = [json.loads((tmp_path / f"out.{r}").read_text()) for r in range(world)]
    assert states[0]["restarts"] > 0
    assert states[0] == states[1]


# -- fingerprint and persistence --------------------------------------------------------------------

def test_fingerprint_stable_and_sensitive():
    model = VQModel(vq_config("tiny"))
    fp = model.fingerprint()
    assert len(fp) == 64 and fp == model.fingerprint()
    model(torch.rand(2, 3, 16, 16) * 2 - 1)  # a training forward changes usage stats only
    model.encode(torch.rand(2, 3, 16, 16))
    assert model.fingerprint() == fp
    with torch.no_grad():
        model.decoder.conv_out.bias[0] += 1e-6
    assert model.fingerprint() != fp
    torch.manual_seed(0)
    a = VQModel(vq_config("tiny"))
    torch.manual_seed(0)
    b = VQModel(vq_config("tiny", beta=0.5))  # same weights, different config
    assert a.fingerprint() != b.fingerprint()


def test_save_load_round_trip_is_exact(tmp_path):
    model = VQModel(vq_config("tiny"))
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    model(x)  # non-trivial usage stats, which must survive too
    save_vq(model, tmp_path)
    assert (tmp_path / WEIGHTS_FILE).is_file() and (tmp_path / CONFIG_FILE).is_file()
    loaded = load_vq(tmp_path)
    assert not loaded.training and loaded.cfg == model.cfg
    assert loaded.fingerprint() == model.fingerprint()
    sd_a, sd_b = model.state_dict(), loaded.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    model.eval()
    assert torch.equal(model.encode(x), loaded.encode(x))
    assert torch.equal(model.decode(model.encode(x)), loaded.decode(loaded.encode(x)))
    assert loaded.codebook_usage() == model.codebook_usage()


def test_load_refuses_mismatched_weights_and_missing_files(tmp_path):
    save_vq(VQModel(vq_config("tiny")), tmp_path / "a")
    save_vq(VQModel(vq_config("tiny")), tmp_path / "b")  # different random weights
    (tmp_path / "a" / WEIGHTS_FILE).write_bytes((tmp_path / "b" / WEIGHTS_FILE).read_bytes())
    with pytest.raises(ValueError, match="fingerprint"):
        load_vq(tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="not a saved VQ tokenizer"):
        load_vq(tmp_path / "missing")


def test_pixel_conversions_round_trip():
    imgs = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    x = to_model_input(imgs)
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert np.array_equal(to_uint8(x), imgs)
    assert np.array_equal(to_uint8(to_model_input(torch.from_numpy(imgs))), imgs)
    assert np.array_equal(to_uint8(torch.full((1, 3, 2, 2), 5.0)), np.full((1, 2, 2, 3), 255, np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        to_model_input(imgs.astype(np.float32))


# -- GAN ------------------------------------------------------------------------------------------

def _gan_setup(**kw):
    cfg = vq_config("tiny", use_gan=True, disc_start=5, **kw)
    model, loss_fn = VQModel(cfg), VQLoss(cfg)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    return model, loss_fn, x, model(x)


def test_discriminator_off_before_disc_start_and_when_disabled():
    model, loss_fn, x, out = _gan_setup()
    assert isinstance(loss_fn.discriminator, PatchDiscriminator)
    assert loss_fn.discriminator_loss(x, out["recon"].detach(), step=4) == (None, {})
    _, logs = loss_fn.generator_loss(x, out, step=4, last_layer=model.last_layer_weight())
    assert "g_gan" not in logs
    d_loss, dlogs = loss_fn.discriminator_loss(x, out["recon"].detach(), step=5)
    assert torch.isfinite(d_loss) and set(dlogs) == {"d_loss", "logits_real", "logits_fake"}
    d_loss.backward()
    assert all(p.grad is not None for p in loss_fn.discriminator.parameters())
    off = VQLoss(vq_config("tiny"))
    assert off.discriminator is None
    assert off.discriminator_loss(x, out["recon"].detach(), step=10**6) == (None, {})


def test_adaptive_gan_weight_is_finite_and_clamped():
    model, loss_fn, x, out = _gan_setup()
    g_loss, logs = loss_fn.generator_loss(x, out, step=5, last_layer=model.last_layer_weight())
    assert math.isfinite(logs["d_weight"]) and 0 < logs["d_weight"] <= loss_fn.cfg.disc_adaptive_max
    assert logs["g_loss"] == pytest.approx(float(g_loss.detach()))
    g_loss.backward()
    assert model.encoder.conv_in.weight.grad is not None

    model, loss_fn, x, out = _gan_setup(disc_adaptive_max=1e-3)
    _, logs = loss_fn.generator_loss(x, out, step=5, last_layer=model.last_layer_weight())
    assert logs["d_weight"] == pytest.approx(1e-3)
    # Without gradients (evaluation) the GAN term cannot be balanced and is left out.
    with torch.no_grad():
        out = model(x)
        _, logs = loss_fn.generator_loss(x, out, step=5, last_layer=model.last_layer_weight())
    assert logs["d_weight"] == 0.0


# -- training signal --------------------------------------------------------------------------------

def test_tiny_overfit_lowers_loss_and_keeps_codebook_in_use():
    cfg = vq_config("tiny")
    model, loss_fn = VQModel(cfg), VQLoss(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.9, 0.95))
    x = to_model_input(_images(16, cfg.resolution))
    losses = []
    for step in range(100):
        out = model(x)
        loss, logs = loss_fn.generator_loss(x, out, step, last_layer=model.last_layer_weight())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(logs["rec_loss"])
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.25 * first, (first, last)
    assert model.codebook_usage() >= 0.95
    assert model.codebook_perplexity() > 0.5 * cfg.codebook_size
    assert int(model.quantizer.stat_restarts) > 0  # the restart path ran


def test_code_looks_are_the_patch_each_code_paints():
    torch.manual_seed(0)
    model = VQModel(vq_config("tiny")).eval()
    looks = model.code_looks(chunk=5)  # chunks that do not divide the codebook
    f, side = model.cfg.downsample, 4
    assert looks.shape == (model.num_codes, 3 * side * side) and looks.dtype == torch.float32
    for code in (0, model.num_codes - 1):
        picture = model.decode(torch.full((1, 3, 3), code))[:, :, f:2 * f, f:2 * f]
        want = F.adaptive_avg_pool2d(picture, side).flatten()
        torch.testing.assert_close(looks[code], want)
    assert looks.abs().max() <= 1.0 and looks.std(0).mean() > 0  # in pixel range, and codes differ
