"""VisGPT: layout, per-modality loss, KV cache, sampling, guidance, completion, save/load."""

from __future__ import annotations

import pytest
import torch

from visgen.config import SpecError
from visgen.models.gpt import (
    BOS, EOI, EOS, I2T, NULL, PAD, SOI, T2I, TASK_I2T, TASK_T2I, VisGPT, gpt_config, load_gpt, sample, save_gpt,
    uniform_noise,
)

TEXT_VOCAB, CODES = 300, 64


@pytest.fixture(scope="module")
def model() -> VisGPT:
    torch.manual_seed(0)
    m = VisGPT(gpt_config("tiny", text_vocab=TEXT_VOCAB, codebook_size=CODES, grid=(4, 4), max_text_tokens=8))
    # Random init gives near-uniform logits; scale the head so sampling has real structure to get wrong.
    with torch.no_grad():
        m.head.weight.mul_(20)
    return m.eval()


def _texts(m: VisGPT, n: int = 3) -> torch.Tensor:
    lay = m.layout
    rows = [[10 + i, 11 + i, 12 + i][: 1 + i % 3] for i in range(n)]
    return torch.tensor([lay.text_region(r) for r in rows])


def test_layout_places_every_token_where_the_docstring_says(model):
    lay = model.layout
    text = torch.tensor([lay.text_region([20, 21])])
    image = torch.arange(16)[None]
    t2i = lay.t2i(text, image)[0].tolist()
    assert len(t2i) == lay.length == 16 + 9 + 4
    assert t2i[:2] == [BOS, T2I] and t2i[2:5] == [20, 21, EOS] and t2i[5:11] == [PAD] * 6
    assert t2i[lay.t2i_soi] == SOI and t2i[lay.t2i_image] == [TEXT_VOCAB + i for i in range(16)] and t2i[-1] == EOI
    i2t = lay.i2t(image, text)[0].tolist()
    assert i2t[:3] == [BOS, I2T, SOI] and i2t[lay.i2t_eoi] == EOI and i2t[lay.i2t_text][:3] == [20, 21, EOS]
    assert lay.text_region(None) == [NULL] + [PAD] * 8
    assert lay.text_region(list(range(100, 120)))[-1] == EOS  # long text is cut, <eos> always fits


def test_text_region_rejects_special_and_out_of_vocab_ids(model):
    with pytest.raises(ValueError, match="non-special"):
        model.layout.text_region([BOS, 50])
    with pytest.raises(ValueError, match=str(TEXT_VOCAB)):
        model.layout.text_region([TEXT_VOCAB])


def test_config_errors_name_the_field():
    with pytest.raises(SpecError, match="n_head"):
        gpt_config("tiny", n_head=3)
    with pytest.raises(SpecError, match="preset"):
        gpt_config("huge")


def test_loss_starts_near_uniform_and_learns():
    torch.manual_seed(0)
    m = VisGPT(gpt_config("tiny", text_vocab=TEXT_VOCAB, codebook_size=CODES, grid=(2, 2), max_text_tokens=4))
    lay = m.layout
    text = torch.tensor([lay.text_region([10, 11])] * 4)
    image = torch.tensor([[1, 2, 3, 4]] * 4)
    tokens = torch.cat([lay.t2i(text[:2], image[:2]), lay.i2t(image[2:], text[2:])])
    loss, logs = m.loss(tokens, n_t2i=2)
    assert abs(float(logs["t2i_loss"]) - torch.log(torch.tensor(CODES)).item()) < 0.3
    # Text is scored over the non-special text ids + <eos> only.
    assert abs(float(logs["i2t_loss"]) - torch.log(torch.tensor(TEXT_VOCAB - 7.0)).item()) < 0.3
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(30):
        loss, _ = m.loss(tokens, n_t2i=2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5


def test_kv_cache_logits_equal_full_recompute(model):
    lay = model.layout
    text = _texts(model)
    image = torch.randint(0, CODES, (3, 16), generator=torch.Generator().manual_seed(1))
    seq = lay.t2i(text, image)
    task = torch.full((3,), TASK_T2I)
    full = model.hidden(seq, task)  # (B, L, d)
    model.setup_cache(3)
    p0 = lay.t2i_soi + 1
    pre = model.forward_step(seq[:, :p0], torch.arange(p0), task)
    steps = [model.forward_step(seq[:, p:p + 1], torch.tensor([p]), task) for p in range(p0, lay.length)]
    cached = torch.cat([pre, *steps], dim=1)
    torch.testing.assert_close(model.image_logits(cached), model.image_logits(full), atol=1e-4, rtol=1e-4)


def test_cached_and_uncached_generation_agree(model):
    seeds = torch.tensor([5, 6, 7])
    a = model.generate_images(_texts(model), seeds, cfg_scale=2.5, top_k=20, top_p=0.9)
    b = model.generate_images(_texts(model), seeds, cfg_scale=2.5, top_k=20, top_p=0.9, use_cache=False)
    assert torch.equal(a, b)
    image = torch.randint(0, CODES, (3, 16), generator=torch.Generator().manual_seed(2))
    assert model.generate_text(image, seeds, temperature=1.0) == model.generate_text(image, seeds, temperature=1.0,
                                                                                       use_cache=False)


def test_generated_tokens_never_cross_modality(model):
    seeds = torch.arange(16)
    text = _texts(model, 16)
    codes = model.generate_images(text, seeds, temperature=1.5)
    assert codes.shape == (16, 16) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < CODES
    # Push the text head towards every special and the image range: sampling must still refuse them.
    with torch.no_grad():
        saved = model.head.weight.clone()
        model.head.weight[:8] += 5.0
        model.head.weight[EOS] -= 5.0
    try:
        caps = model.generate_text(codes, seeds, temperature=2.0)
    finally:
        with torch.no_grad():
            model.head.weight.copy_(saved)
    for ids in caps:
        assert len(ids) <= model.layout.text_slots - 1
        assert all(8 <= t < TEXT_VOCAB for t in ids), ids


def test_cfg_scale_one_equals_unguided(model):
    text = _texts(model)
    seeds = torch.tensor([1, 2, 3])
    plain = model.generate_images(text, seeds, cfg_scale=1.0)
    # Guidance at scale 1 through the doubled batch: uncond + 1 * (cond - uncond) = cond.
    lay = model.layout
    rows = torch.cat([text, model._null_text(3, "cpu")])
    seq = lay.t2i(rows, torch.zeros(6, 16, dtype=torch.long))
    h = model.hidden(seq, torch.full((6,), TASK_T2I))[:, lay.t2i_soi]
    cond, uncond = model.image_logits(h).chunk(2)
    torch.testing.assert_close(uncond + 1.0 * (cond - uncond), cond, atol=1e-5, rtol=0)
    assert torch.equal(sample(cond, seeds, 0), plain[:, 0])
    guided = model.generate_images(text, seeds, cfg_scale=4.0)
    assert not torch.equal(plain, guided)  # guidance does change samples at another scale


def test_same_seed_same_output_whatever_the_batch(model):
    text = _texts(model, 4)
    seeds = torch.tensor([11, 12, 13, 14])
    full = model.generate_images(text, seeds, cfg_scale=3.0, top_k=30)
    again = model.generate_images(text, seeds, cfg_scale=3.0, top_k=30)
    alone = model.generate_images(text[2:3], seeds[2:3], cfg_scale=3.0, top_k=30)
    assert torch.equal(full, again) and torch.equal(full[2:3], alone)
    other = model.generate_images(text, seeds + 100, cfg_scale=3.0, top_k=30)
    assert not torch.equal(full, other)


def test_completion_keeps_the_prefix_rows(model):
    text = _texts(model)
    original = torch.randint(0, CODES, (3, 16), generator=torch.Generator().manual_seed(3))
    keep = 8  # two of four rows
    out = model.generate_images(text, torch.tensor([1, 2, 3]), prefix=original[:, :keep], cfg_scale=2.0)
    assert torch.equal(out[:, :keep], original[:, :keep])
    assert not torch.equal(out[:, keep:], original[:, keep:])
    with pytest.raises(ValueError, match="prefix"):
        model.generate_images(text, torch.tensor([1, 2, 3]), prefix=torch.zeros(3, 17, dtype=torch.long))


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(200, 1)
    seeds = torch.arange(200)
    assert set(sample(logits, seeds, 0, temperature=0).tolist()) == {3}
    assert set(sample(logits, seeds, 0, top_k=2).tolist()) == {2, 3}
    # p(3) = 0.64, p(2) = 0.24: top_p 0.5 keeps only the first token, 0.8 the first two.
    assert set(sample(logits, seeds, 0, top_p=0.5).tolist()) == {3}
    assert set(sample(logits, seeds, 0, top_p=0.8).tolist()) == {2, 3}
    counts = torch.bincount(sample(logits[:1].repeat(20000, 1), torch.arange(20000), 0), minlength=4).float() / 20000
    torch.testing.assert_close(counts, logits[0].softmax(-1), atol=0.02, rtol=0)
    with pytest.raises(ValueError, match="temperature"):
        sample(logits, seeds, 0, temperature=-1)


def test_noise_is_uniform_and_keyed_by_seed_and_step():
    u = uniform_noise(torch.arange(100), 3, 1000)
    assert u.shape == (100, 1000) and 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert not torch.equal(u, uniform_noise(torch.arange(100), 4, 1000))
    assert torch.equal(u[7], uniform_noise(torch.tensor([7]), 3, 1000)[0])


def test_save_load_round_trip(model, tmp_path):
    save_gpt(model, tmp_path / "lm")
    back = load_gpt(tmp_path / "lm")
    assert back.fingerprint() == model.fingerprint() and back.cfg == model.cfg
    seeds = torch.tensor([1, 2, 3])
    assert torch.equal(back.generate_images(_texts(model), seeds), model.generate_images(_texts(model), seeds))
    (tmp_path / "lm" / "lm.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="lm.safetensors"):
        load_gpt(tmp_path / "lm")


def test_flops_and_params_of_the_base_preset():
    m = VisGPT(gpt_config("base", text_vocab=16384, codebook_size=8192, grid=(16, 16), max_text_tokens=59))
    assert m.layout.length == 256 + 60 + 4
    assert 95e6 < m.num_params(embeddings=False) < 110e6  # blocks ~85 M + the 24.5k-row head
    assert 100e6 < m.num_params() < 130e6
    body = m.num_params(embeddings=False) - m.head.weight.numel()
    assert 6 * body < m.flops_per_token() < 6 * m.num_params(embeddings=False) + 12 * 12 * 768 * 320


@pytest.mark.parametrize("n_t2i", [0, 3, 6])
def test_flops_per_token_matches_what_the_loss_executes(n_t2i):
    """The MFU numerator against PyTorch's own count of a forward + backward of the loss."""
    from torch.utils.flop_counter import FlopCounterMode

    m = VisGPT(gpt_config("tiny", text_vocab=320, codebook_size=64, grid=(4, 4), max_text_tokens=11))
    lay, b = m.layout, 6
    g = torch.Generator().manual_seed(0)
    text = torch.tensor([lay.text_region(torch.randint(8, 320, (lay.text_slots - 1,), generator=g).tolist())
                        for _ in range(b)])
    image = torch.randint(0, 64, (b, lay.n_image), generator=g)
    tokens = torch.cat([lay.t2i(text[:n_t2i], image[:n_t2i]), lay.i2t(image[n_t2i:], text[n_t2i:])])
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):  # attention as counted matmuls
        loss, _ = m(tokens, n_t2i)
        loss.backward()
    measured = counter.get_total_flops() / (b * lay.length)
    assert measured == pytest.approx(m.flops_per_token(n_t2i / b), rel=0.01)


def test_rmsnorm_takes_the_fused_kernel_under_bf16_autocast():
    """q/k arrive in bf16 under autocast; a fp32 weight would push them onto the composite kernel."""
    import warnings

    from visgen.models.gpt import RMSNorm

    norm = RMSNorm(16)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 16))
    x = torch.randn(4, 16).to(torch.bfloat16)
    warn_always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # the fallback warning is once per process: an earlier test may have used it up
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # PyTorch warns when it cannot use the fused implementation
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = norm(x)
    finally:
        torch.set_warn_always(warn_always)
    assert got.dtype == torch.bfloat16
    want = torch.nn.functional.rms_norm(x.float(), (16,), norm.weight, norm.eps)
    torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)
    assert norm(x.float()).dtype == torch.float32 and "weight" in norm.state_dict()  # fp32 path and checkpoints unchanged
