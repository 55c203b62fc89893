"""VisGPT: layout, per-modality loss, KV cache, sampling, guidance, completion, save/load."""

from __future__ import annotations

import math

import pytest
import torch

from visgen.config import SpecError
from visgen.models.gpt import (
    BOS, EN, EOI, EOS, I2T, NULL, PAD, SOI, T2I, TASK_I2T, TASK_T2I, ZH, VisGPT, gpt_config, load_gpt, sample, save_gpt,
    grid_offsets, rotate, uniform_noise,
)
from visgen.models.vq import LOOK_DIM

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
    i2t = lay.i2t(image, torch.tensor([lay.text_region([20, 21], lang="zh")]))[0].tolist()
    assert i2t[:3] == [BOS, I2T, SOI] and i2t[lay.i2t_eoi] == EOI and i2t[lay.i2t_text][:4] == [ZH, 20, 21, EOS]
    assert i2t[lay.i2t_text][4:] == [PAD] * 5 and len(i2t) == lay.length
    assert lay.text_region(None) == [NULL] + [PAD] * 8
    assert lay.text_region(list(range(100, 120)))[-1] == EOS  # long text is cut, <eos> always fits
    assert lay.text_region(list(range(100, 120)), lang="en") == [EN, *range(100, 107), EOS]  # one slot less
    with pytest.raises(ValueError, match="'fr'.*'en', 'zh'"):
        lay.text_region([20], lang="fr")


def test_batched_text_regions_equal_the_row_by_row_ones(model):
    lay = model.layout
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(10, TEXT_VOCAB, (k,), generator=g).tolist() for k in (0, 1, 3, 7, 8, 9, 15)]
    ids = torch.full((len(rows), 15), PAD)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    lengths = torch.tensor([len(r) for r in rows])
    null = torch.tensor([i == 2 for i in range(len(rows))])
    assert lay.text_regions(ids, lengths, null=null).tolist() == \
        [lay.text_region(None if i == 2 else r) for i, r in enumerate(rows)]
    lang = torch.tensor([EN, ZH] * 3 + [EN])
    assert lay.text_regions(ids, lengths, lang=lang).tolist() == \
        [lay.text_region(r, lang="en" if i % 2 == 0 else "zh") for i, r in enumerate(rows)]
    with pytest.raises(ValueError, match="non-special"):
        lay.text_regions(torch.tensor([[11, EN]]), torch.tensor([2]))


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
    text = torch.tensor([lay.text_region([10, 11])] * 2 + [lay.text_region([10, 11], lang="zh")] * 2)
    image = torch.tensor([[1, 2, 3, 4]] * 4)
    tokens = torch.cat([lay.t2i(text[:2], image[:2]), lay.i2t(image[2:], text[2:])])
    loss, logs = m.loss(tokens, n_t2i=2)
    assert abs(float(logs["t2i_loss"]) - torch.log(torch.tensor(CODES)).item()) < 0.3
    # The language slot is scored over the two language tokens, text over the non-special ids + <eos>.
    uniform = (torch.log(torch.tensor(2.0)) + 3 * torch.log(torch.tensor(TEXT_VOCAB - 9.0))).item() / 4
    assert abs(float(logs["i2t_loss"]) - uniform) < 0.3
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
        model.head.weight[:10] += 5.0
        model.head.weight[EOS] -= 5.0
    try:
        caps = model.generate_text(codes, seeds, temperature=2.0)
    finally:
        with torch.no_grad():
            model.head.weight.copy_(saved)
    for ids in caps:
        assert len(ids) <= model.layout.text_slots - 2  # the language slot and the closing <eos>
        assert all(10 <= t < TEXT_VOCAB for t in ids), ids


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
    text = torch.tensor([lay.text_region(torch.randint(10, 320, (lay.text_slots - 1,), generator=g).tolist(),
                                         lang=None if i < n_t2i else "en") for i in range(b)])
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


def _captured_text_regions(model):
    """The i2t text regions of the last generate_text call, read off the decode state it wrote."""
    return lambda: model.decode_state.seq[:, model.layout.i2t_text]


def test_a_requested_language_is_forced_in_the_language_slot(model):
    image = torch.randint(0, CODES, (4, 16), generator=torch.Generator().manual_seed(5))
    seeds = torch.arange(4)
    regions = _captured_text_regions(model)
    with torch.no_grad():  # make the model prefer <zh> by far when it chooses
        saved = model.head.weight.clone()
        model.head.weight[ZH] += 50.0
    try:
        ids, langs = model.generate_text(image, seeds, return_language=True)
        assert langs == ["zh"] * 4 and regions()[:, 0].tolist() == [ZH] * 4  # "auto": the model's choice
        ids, langs = model.generate_text(image, seeds, language=["en", "zh", "auto", None], return_language=True)
        assert langs == ["en", "zh", "zh", "zh"] and regions()[:, 0].tolist() == [EN, ZH, ZH, ZH]
        forced, langs = model.generate_text(image, seeds, language="en", return_language=True, use_cache=False)
        assert langs == ["en"] * 4 and regions()[:, 0].tolist() == [EN] * 4
    finally:
        with torch.no_grad():
            model.head.weight.copy_(saved)
    # The language token is not part of the returned text, and the cache changes nothing.
    assert forced == model.generate_text(image, seeds, language="en")
    assert all(EN not in row and ZH not in row for row in forced)


def test_blocked_ids_are_never_sampled_and_bad_languages_are_refused(model):
    image = torch.randint(0, CODES, (8, 16), generator=torch.Generator().manual_seed(6))
    blocked = torch.zeros(8, TEXT_VOCAB, dtype=torch.bool)
    blocked[::2, 10:200] = True  # even rows may only use ids 200..299
    blocked[1::2, 150:] = True   # odd rows only ids 10..149
    caps = model.generate_text(image, torch.arange(8), language="zh", blocked=blocked, temperature=3.0)
    assert any(caps)
    for i, ids in enumerate(caps):
        assert all((t >= 200) if i % 2 == 0 else (10 <= t < 150) for t in ids), (i, ids)
    with pytest.raises(ValueError, match="'fr' is not allowed; allowed: 'auto', 'en', 'zh'"):
        model.generate_text(image, torch.arange(8), language="fr")
    with pytest.raises(ValueError, match="2 languages for 8 images"):
        model.generate_text(image, torch.arange(8), language=["en", "zh"])


def test_a_model_saved_before_the_language_tokens_is_refused(model, tmp_path):
    import json

    save_gpt(model, tmp_path / "lm")
    meta = json.loads((tmp_path / "lm" / "lm.json").read_text())
    assert meta["format"] == "visgen-lm/2"
    meta["format"] = "visgen-lm/1"
    (tmp_path / "lm" / "lm.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"'visgen-lm/1'.*older visgen.*visgen train lm"):
        load_gpt(tmp_path / "lm")


# ---------------------------------------------------------------------------------------------
# The captured decode step (issue 13): the same tokens as the per-token loop it replaced
# ---------------------------------------------------------------------------------------------
def _legacy():
    """bench/lm_decode.py keeps the pre-issue-13 decode loop, verbatim, as its baseline."""
    import importlib.util
    import sys
    from pathlib import Path

    name = "bench_lm_decode_legacy"
    if name not in sys.modules:
        path = Path(__file__).resolve().parent.parent / "bench" / "lm_decode.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def _fresh_model(**overrides) -> VisGPT:
    """The fixture's model (with ``overrides`` of its config), built anew: compile_decode() changes
    the model it is called on."""
    torch.manual_seed(0)
    m = VisGPT(gpt_config("tiny", text_vocab=TEXT_VOCAB, codebook_size=CODES, grid=(4, 4), max_text_tokens=8,
                          **overrides))
    with torch.no_grad():
        m.head.weight.mul_(20)
    return m.eval()


IMAGE_SETTINGS = {
    "greedy": dict(temperature=0.0),
    "greedy_cfg": dict(temperature=0.0, cfg_scale=3.0),
    "sampled": dict(temperature=1.0),
    "sampled_cfg_top_k": dict(cfg_scale=2.5, top_k=20),
    "sampled_cfg_top_p": dict(cfg_scale=4.0, temperature=0.7, top_p=0.8),
    "top_k_top_p_prefix": dict(cfg_scale=2.0, top_k=30, top_p=0.9, temperature=1.3, prefix=5),
}


@pytest.mark.parametrize("setting", list(IMAGE_SETTINGS))
def test_decode_step_emits_the_legacy_loops_image_codes(model, setting):
    kw = dict(IMAGE_SETTINGS[setting])
    text, seeds = _texts(model, 5), torch.tensor([3, 1 << 40, 7, 8, 9])  # a seed above 2**32 too
    if "prefix" in kw:
        kw["prefix"] = torch.randint(0, CODES, (5, kw["prefix"]), generator=torch.Generator().manual_seed(4))
    want = _legacy().legacy_generate_images(model, text, seeds, **kw)
    assert torch.equal(model.generate_images(text, seeds, **kw), want)


CAPTION_SETTINGS = {
    "greedy_auto": dict(temperature=0.0),
    "greedy_forced_blocked": dict(temperature=0.0, language=["en", "zh", "auto", "en", "zh", "auto"], blocked=True),
    "sampled_auto_top_k": dict(temperature=1.5, top_k=40),
    "sampled_forced_top_p": dict(temperature=1.0, top_p=0.9, language="zh", blocked=True),
    "sampled_all": dict(temperature=2.0, top_k=100, top_p=0.95, language=["auto", "en"] * 3),
}


@pytest.mark.parametrize("setting", list(CAPTION_SETTINGS))
def test_decode_step_writes_the_legacy_loops_captions(model, setting):
    kw = dict(CAPTION_SETTINGS[setting])
    image = torch.randint(0, CODES, (6, 16), generator=torch.Generator().manual_seed(7))
    seeds = torch.arange(6) * 13
    if kw.get("blocked"):  # per-row tables, as a tokenizer's other-script tables would be
        blocked = torch.zeros(6, TEXT_VOCAB, dtype=torch.bool)
        blocked[::2, 10:150] = True
        blocked[1::2, 200:] = True
        kw["blocked"] = blocked
    want, want_region = _legacy().legacy_generate_text(model, image, seeds, **kw)
    got = model.generate_text(image, seeds, **kw)
    assert got == want and any(got)
    assert torch.equal(model.decode_state.seq[:, model.layout.i2t_text], want_region)  # <lang>, text, <eos>, <pad>s


def test_decode_state_keeps_its_buffers_between_generations(model):
    """Fixed addresses: what lets a CUDA graph replay the step; a new row count reallocates."""
    text, seeds = _texts(model, 2), torch.tensor([1, 2])
    model.generate_images(text, seeds, cfg_scale=2.0)
    ptrs = {n: b.data_ptr() for n, b in model.decode_state.named_buffers()}
    model.generate_images(text.flip(0), seeds + 5, cfg_scale=3.0, temperature=0.5, top_p=0.7)
    assert {n: b.data_ptr() for n, b in model.decode_state.named_buffers()} == ptrs
    model.generate_text(torch.zeros(4, 16, dtype=torch.long), torch.arange(4))  # 4 rows, as the guided 2 x 2
    assert {n: b.data_ptr() for n, b in model.decode_state.named_buffers()} == ptrs
    model.generate_images(text, seeds)  # 2 rows: a new state
    assert model.decode_state.seq.shape[0] == 2
    model.clear_cache()
    assert model.decode_state is None and model.blocks[0].attn.kv_cache is None


def test_compiled_step_is_one_graph_per_structure_and_matches_eager():
    """``fullgraph=True`` proves the step has no graph break (no host sync, no Python branch on a
    device value); the counting backend proves new sampling values reuse the graph."""
    m = _fresh_model()
    text, seeds = _texts(m, 3), torch.tensor([5, 6, 7])
    image = torch.randint(0, CODES, (3, 16), generator=torch.Generator().manual_seed(2))
    runs = [dict(cfg_scale=2.5, top_k=20, top_p=0.9), dict(cfg_scale=4.0, top_k=20, top_p=0.7, temperature=0.6)]
    caps = [dict(temperature=1.0, top_k=30, language="en"),
            dict(temperature=0.5, top_k=30, language=["zh", "auto", "en"])]
    objects = [dict(cfg_scale=2.5, top_k=20, top_p=0.9, object_temperature=0.7, background=3),
               dict(cfg_scale=3.0, top_k=20, top_p=0.9, object_temperature=0.4, background=5)]
    want = [m.generate_images(text, seeds, **kw) for kw in runs + objects] + \
        [m.generate_text(image, seeds, **kw) for kw in caps]
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward  # run the captured graph as is: no code generation on CPU

    m.compile_decode(backend=counting)
    assert m.decode_compiled
    got = [m.generate_images(text, seeds, **kw) for kw in runs]
    assert len(graphs) == 1  # the second run's new cfg_scale / temperature / top_p reused the graph
    got += [m.generate_images(text, seeds, **kw) for kw in objects]
    assert len(graphs) == 2  # objects drawn apart: one more structure; a new temperature and background reuse it
    got += [m.generate_text(image, seeds, **kw) for kw in caps]
    assert len(graphs) == 3  # one for the text step, whatever the languages
    assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(got, want))


@pytest.mark.slow  # inductor builds C++ kernels: ~20 s with a warm inductor cache, ~70 s cold on two busy cores
def test_inductor_compiled_step_matches_eager():
    m = _fresh_model()
    text, seeds = _texts(m, 2), torch.tensor([11, 12])
    kw = dict(cfg_scale=3.0, top_k=20, temperature=0.9)
    want = m.generate_images(text, seeds, **kw)
    m.compile_decode(mode=None)  # CPU: no CUDA graphs
    assert torch.equal(m.generate_images(text, seeds, **kw), want)


def test_code_looks_tie_codes_that_look_alike_and_survive_save_load(tmp_path):
    torch.manual_seed(0)
    m = VisGPT(gpt_config("tiny", text_vocab=TEXT_VOCAB, codebook_size=CODES, grid=(4, 4), max_text_tokens=8,
                          code_looks=True)).eval()
    looks = torch.rand(CODES, LOOK_DIM) * 2 - 1
    looks[7] = looks[3]  # two codes that look the same
    with pytest.raises(ValueError, match="shape"):
        m.set_code_looks(looks[:5])
    m.set_code_looks(looks)
    with torch.no_grad():  # the same learned rows too: the looks are then all that tells codes apart
        m.tok_emb.weight[TEXT_VOCAB:TEXT_VOCAB + CODES] = 0
        m.head.weight[TEXT_VOCAB:TEXT_VOCAB + CODES] = 0
    lay = m.layout
    image = torch.randint(0, CODES, (1, 16), generator=torch.Generator().manual_seed(3))
    seqs = []
    for code in (3, 7, 9):
        image[0, 5] = code
        seqs.append(lay.t2i(_texts(m, 1), image.clone()))
    seq = torch.cat(seqs)
    h = m.hidden(seq, torch.full((3,), TASK_T2I))
    assert torch.equal(h[0], h[1]) and not torch.allclose(h[0], h[2])  # embedding: alike in, alike out
    logits = m.image_logits(h[0, -1])
    assert logits[3] == logits[7] and logits[3] != logits[9]  # head: alike codes, alike logits
    save_gpt(m, tmp_path / "lm")
    back = load_gpt(tmp_path / "lm")
    assert torch.equal(back.code_look, looks)
    assert torch.equal(back.image_logits(h[0, -1]), logits)
    plain = VisGPT(gpt_config("tiny", text_vocab=TEXT_VOCAB, codebook_size=CODES, grid=(4, 4), max_text_tokens=8))
    with pytest.raises(ValueError, match="code_looks=false"):
        plain.set_code_looks(looks)
    assert "code_looks" not in plain.state_dict() and not hasattr(plain, "look_in")


def test_tied_embeddings_share_one_matrix_train_it_from_both_ends_and_survive_save_load(tmp_path):
    torch.manual_seed(0)
    cfg = gpt_config("tiny", text_vocab=TEXT_VOCAB, codebook_size=CODES, grid=(4, 4), max_text_tokens=8,
                     tie_embeddings=True)
    m = VisGPT(cfg)
    assert m.head.weight is m.tok_emb.weight and "head.weight" not in m.state_dict()
    untied = VisGPT(gpt_config("tiny", text_vocab=TEXT_VOCAB, codebook_size=CODES, grid=(4, 4), max_text_tokens=8))
    assert m.num_params() == untied.num_params() - untied.head.weight.numel()
    lay = m.layout
    image = torch.randint(0, CODES, (2, 16), generator=torch.Generator().manual_seed(1))
    seq = torch.cat([lay.t2i(_texts(m, 2), image), lay.i2t(image, _texts(m, 2))])
    loss, _ = m.loss(seq, n_t2i=2)
    loss.backward()
    grad = m.tok_emb.weight.grad
    # t2i scores image codes through the head: the rows of codes never fed in still get a gradient
    unseen = sorted(set(range(CODES)) - set(image.flatten().tolist()))
    assert unseen and grad[[TEXT_VOCAB + c for c in unseen]].abs().sum() > 0
    m.eval()
    save_gpt(m, tmp_path / "lm")
    back = load_gpt(tmp_path / "lm").eval()
    assert back.head.weight is back.tok_emb.weight
    with torch.no_grad():
        assert torch.equal(back.loss(seq, n_t2i=2)[0], m.loss(seq, n_t2i=2)[0])
    # an untied model's files keep their fingerprint: the new field is left out at its default
    assert "tie_embeddings" not in untied.cfg.model_dump(exclude_defaults=True)


def test_pooled_condition_reaches_every_output_slot_stays_causal_and_decodes_as_recomputed(tmp_path):
    m = _fresh_model(pooled_condition=True)
    with torch.no_grad():
        m.cond_proj.weight.mul_(50)  # large enough that the pooled path decides the samples
    lay = m.layout
    image = torch.randint(0, CODES, (3, 16), generator=torch.Generator().manual_seed(1))
    t2i = torch.full((3,), TASK_T2I)
    # The pooled prompt is added from <soi> on: changing only the text moves the output at <soi> even
    # with the attention blocks removed from the path (the embedding alone carries it).
    other = _texts(m).flip(0)
    x = m.embed(lay.t2i(_texts(m), image), torch.arange(lay.length), t2i, m.condition(lay.t2i(_texts(m), image), t2i))
    y = m.embed(lay.t2i(other, image), torch.arange(lay.length), t2i, m.condition(lay.t2i(other, image), t2i))
    assert not torch.allclose(x[0, lay.t2i_soi], y[0, lay.t2i_soi])
    # Causal: the condition depends on the condition region only, not on the codes being predicted.
    shuffled = torch.randint(0, CODES, (3, 16), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(m.condition(lay.t2i(_texts(m), image), t2i), m.condition(lay.t2i(_texts(m), shuffled), t2i))
    i2t = torch.full((3,), TASK_I2T)
    torch.testing.assert_close(m.condition(lay.i2t(image, _texts(m)), i2t), m.condition(lay.i2t(image, other), i2t))
    # <pad> does not dilute the prompt: [12 <eos> <pad>...] pools the embeddings of 12 and <eos> only
    one = torch.tensor([lay.text_region([12])])
    want = m.cond_proj((m.tok_emb.weight[12] + m.tok_emb.weight[EOS]) / 2)
    torch.testing.assert_close(m.condition(lay.t2i(one, image[:1]), t2i[:1])[0], want)
    # The KV-cache decode adds the condition the prefill pooled: samples equal full recomputation.
    seeds = torch.tensor([5, 6, 7])
    a = m.generate_images(_texts(m), seeds, cfg_scale=2.5, temperature=1.0)
    b = m.generate_images(_texts(m), seeds, cfg_scale=2.5, temperature=1.0, use_cache=False)
    assert torch.equal(a, b)
    assert m.generate_text(image, seeds, temperature=1.0) == m.generate_text(image, seeds, temperature=1.0, use_cache=False)
    save_gpt(m, tmp_path / "lm")
    back = load_gpt(tmp_path / "lm")
    assert torch.equal(back.generate_images(_texts(m), seeds, cfg_scale=2.5, temperature=1.0), a)


def test_grid_context_feeds_each_t2i_slot_the_codes_above_its_target_causally(tmp_path):
    m = _fresh_model(grid_context=True)
    with torch.no_grad():
        m.ctx_proj.weight.mul_(50)  # large enough that the context decides the samples
    lay = m.layout
    t2i, i2t = torch.full((1,), TASK_T2I), torch.full((1,), TASK_I2T)
    image = torch.randint(0, CODES, (1, 16), generator=torch.Generator().manual_seed(1))
    seq = lay.t2i(_texts(m, 1), image)
    positions = torch.arange(lay.length)
    # The slot predicting cell (2, 1) (= 9 on the 4 x 4 grid) reads cells (1, 0), (1, 1), (1, 2): 4, 5, 6;
    # changing only cell 5 moves that slot's input, and the slot predicting cell (0, 1) reads nothing.
    other = image.clone()
    other[0, 5] = (other[0, 5] + 1) % CODES
    x = m.grid_context(seq, positions, t2i)
    y = m.grid_context(lay.t2i(_texts(m, 1), other), positions, t2i)
    moved = {int(i) for i in torch.nonzero((x - y).abs().sum(-1)[0] > 0)[:, 0]}
    assert moved == {lay.t2i_soi + j for j in (8, 9, 10)}  # the cells below-right, below, below-left of 5
    assert torch.equal(x[0, lay.t2i_soi + 1], torch.zeros(m.cfg.d_model))  # first row: nothing above
    # Edges: column 0 has no above-left, column 3 no above-right
    ids = m.context_slot[lay.t2i_soi + 4] - lay.t2i_image.start
    assert ids.tolist() == [lay.length - lay.t2i_image.start, 0, 1]
    # Causal: a slot's hidden state does not depend on any code at or after the one it predicts.
    h = m.hidden(seq, t2i)
    for j in (5, 9, 15):
        later = image.clone()
        later[0, j:] = (later[0, j:] + 7) % CODES
        h2 = m.hidden(lay.t2i(_texts(m, 1), later), t2i)
        torch.testing.assert_close(h2[0, : lay.t2i_soi + j + 1], h[0, : lay.t2i_soi + j + 1])
    # i2t rows get no context (their image is the condition, read in full by attention)
    assert torch.equal(m.grid_context(lay.i2t(image, _texts(m, 1)), positions, i2t), torch.zeros(1, lay.length, m.cfg.d_model))
    # The KV-cache decode reads the codes it already wrote: samples equal full recomputation, edits too.
    seeds = torch.tensor([5, 6, 7])
    a = m.generate_images(_texts(m), seeds, cfg_scale=2.5, temperature=1.0)
    assert torch.equal(a, m.generate_images(_texts(m), seeds, cfg_scale=2.5, temperature=1.0, use_cache=False))
    prefix = a[:, :6]
    e = m.generate_images(_texts(m), seeds, cfg_scale=2.5, temperature=1.0, prefix=prefix)
    assert torch.equal(e, m.generate_images(_texts(m), seeds, cfg_scale=2.5, temperature=1.0, prefix=prefix,
                                            use_cache=False))
    plain = VisGPT(gpt_config("tiny", text_vocab=TEXT_VOCAB, codebook_size=CODES, grid=(4, 4), max_text_tokens=8))
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("ctx_proj")})
    assert not torch.equal(plain.eval().generate_images(_texts(m), seeds, cfg_scale=2.5, temperature=1.0), a)
    save_gpt(m, tmp_path / "lm")
    back = load_gpt(tmp_path / "lm")
    assert back.cfg.grid_context and torch.equal(back.generate_images(_texts(m), seeds, cfg_scale=2.5, temperature=1.0), a)
    # an older model's files keep their fingerprint: the field is left out at its default
    assert "grid_context" not in plain.cfg.model_dump(exclude_defaults=True)


def test_grid_context_radius_widens_the_causal_window(tmp_path):
    assert grid_offsets(1) == [(-1, -1), (-1, 0), (-1, 1)]
    assert grid_offsets(2) == [(-2, -2), (-2, -1), (-2, 0), (-2, 1), (-2, 2),
                               (-1, -2), (-1, -1), (-1, 0), (-1, 1), (-1, 2), (0, -2)]
    m = _fresh_model(grid_context=True, grid_context_radius=2)
    with torch.no_grad():
        m.ctx_proj.weight.mul_(50)
    lay = m.layout
    t2i = torch.full((1,), TASK_T2I)
    image = torch.randint(0, CODES, (1, 16), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(lay.length)
    x = m.grid_context(lay.t2i(_texts(m, 1), image), positions, t2i)
    # Changing cell 5 = (1, 1) on the 4 x 4 grid moves exactly the slots whose window holds it: the cells
    # (r, c) with r - 1 <= 2 rows below and |c - 1| <= 2, and (1, 3) two to its right in its row.
    other = image.clone()
    other[0, 5] = (other[0, 5] + 1) % CODES
    y = m.grid_context(lay.t2i(_texts(m, 1), other), positions, t2i)
    moved = {int(i) - lay.t2i_soi for i in torch.nonzero((x - y).abs().sum(-1)[0] > 0)[:, 0]}
    assert moved == {7, 8, 9, 10, 11, 12, 13, 14, 15}
    # Causal, and the cached decode equals full recomputation, edits too; save / load keeps it.
    h = m.hidden(lay.t2i(_texts(m, 1), image), t2i)
    for j in (3, 6, 13):
        later = image.clone()
        later[0, j:] = (later[0, j:] + 7) % CODES
        h2 = m.hidden(lay.t2i(_texts(m, 1), later), t2i)
        torch.testing.assert_close(h2[0, : lay.t2i_soi + j + 1], h[0, : lay.t2i_soi + j + 1])
    seeds = torch.tensor([5, 6, 7])
    a = m.generate_images(_texts(m), seeds, cfg_scale=2.5, temperature=1.0)
    assert torch.equal(a, m.generate_images(_texts(m), seeds, cfg_scale=2.5, temperature=1.0, use_cache=False))
    e = m.generate_images(_texts(m), seeds, cfg_scale=2.5, temperature=1.0, prefix=a[:, :6])
    assert torch.equal(e, m.generate_images(_texts(m), seeds, cfg_scale=2.5, temperature=1.0, prefix=a[:, :6],
                                            use_cache=False))
    save_gpt(m, tmp_path / "lm")
    back = load_gpt(tmp_path / "lm")
    assert back.cfg.grid_context_radius == 2
    assert torch.equal(back.generate_images(_texts(m), seeds, cfg_scale=2.5, temperature=1.0), a)
    with pytest.raises(ValueError, match="grid_context_radius=2 sizes the window of grid_context, which is off"):
        gpt_config("tiny", grid_context_radius=2)


def test_neighbour_context_feeds_each_i2t_image_slot_its_3x3_neighbourhood(tmp_path):
    m = _fresh_model(neighbour_context=True)
    with torch.no_grad():
        m.nbr_proj.weight.mul_(50)  # large enough that the context decides the captions
    lay = m.layout
    t2i, i2t = torch.full((1,), TASK_T2I), torch.full((1,), TASK_I2T)
    image = torch.randint(0, CODES, (1, 16), generator=torch.Generator().manual_seed(1))
    seq = lay.i2t(image, _texts(m, 1))
    positions = torch.arange(lay.length)
    # Changing only cell 5 = (1, 1) of the 4 x 4 grid moves the slots of cells (0..2, 0..2), and no other slot.
    other = image.clone()
    other[0, 5] = (other[0, 5] + 1) % CODES
    x = m.neighbour_context(seq, positions, i2t)
    y = m.neighbour_context(lay.i2t(other, _texts(m, 1)), positions, i2t)
    moved = {int(i) for i in torch.nonzero((x - y).abs().sum(-1)[0] > 0)[:, 0]}
    assert moved == {lay.i2t_image.start + r * 4 + c for r in range(3) for c in range(3)}
    # t2i rows get nothing, and neither do sequences that do not hold a whole picture
    assert torch.equal(m.neighbour_context(lay.t2i(_texts(m, 1), image), positions, t2i),
                       torch.zeros(1, lay.length, m.cfg.d_model))
    assert m.neighbour_context(seq[:, : lay.i2t_image.stop - 1], positions[: lay.i2t_image.stop - 1], i2t) is None
    # A batch whose first rows are t2i gives the same hidden states when the pass skips them.
    mixed = torch.cat([lay.t2i(_texts(m, 1), image), seq])
    task = torch.tensor([TASK_T2I, TASK_I2T])
    torch.testing.assert_close(m.hidden(mixed, task, first_i2t=1), m.hidden(mixed, task))
    # The captions depend on it, the cached decode equals full recomputation, and it is saved.
    seeds = torch.tensor([5, 6, 7])
    images = torch.randint(0, CODES, (3, 16), generator=torch.Generator().manual_seed(2))
    a = m.generate_text(images, seeds, temperature=1.0)
    assert a == m.generate_text(images, seeds, temperature=1.0, use_cache=False)
    plain = VisGPT(gpt_config("tiny", text_vocab=TEXT_VOCAB, codebook_size=CODES, grid=(4, 4), max_text_tokens=8))
    plain.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("nbr_")})
    assert plain.eval().generate_text(images, seeds, temperature=1.0) != a
    # Text -> image drawing is unchanged by it (the module only reads i2t rows).
    assert torch.equal(plain.generate_images(_texts(m), seeds, cfg_scale=2.5, temperature=1.0),
                       m.generate_images(_texts(m), seeds, cfg_scale=2.5, temperature=1.0))
    save_gpt(m, tmp_path / "lm")
    back = load_gpt(tmp_path / "lm")
    assert back.cfg.neighbour_context and back.generate_text(images, seeds, temperature=1.0) == a
    assert "neighbour_context" not in plain.cfg.model_dump(exclude_defaults=True)


def test_object_temperature_redraws_non_background_codes_among_the_others():
    m = _fresh_model()
    lay, seeds = m.layout, torch.tensor([5, 6, 7])
    plain = m.generate_images(_texts(m), seeds, temperature=1.0)
    bg = int(plain.flatten().mode().values)  # the model's most drawn code stands for the background
    g = m.generate_images(_texts(m), seeds, temperature=1.0, object_temperature=0.0, background=bg)
    # Teacher-forced on its own output: every code that is not the background is the most likely
    # of the others at its slot (the slot t2i_soi + j predicts cell j).
    h = m.hidden(lay.t2i(_texts(m), g), torch.full((3,), TASK_T2I))
    logits = m.image_logits(h[:, lay.t2i_soi: lay.t2i_soi + lay.n_image]).float()
    best_other = logits.index_fill(2, torch.tensor([bg]), float("-inf")).argmax(-1)
    obj = g != bg
    assert obj.any() and (~obj).any()
    assert torch.equal(g[obj], best_other[obj])
    # Whether a slot is background is the plain draw: the first cell where the two differ is one
    # the plain draw gave an object code, redrawn as the most likely object code.
    row, col = torch.nonzero(plain != g)[0].tolist()
    assert torch.equal(plain[row, :col], g[row, :col]) and plain[row, col] != bg and g[row, col] == best_other[row, col]
    # Guided, sampled objects, cached decode equal to full recomputation; edits too.
    kw = dict(cfg_scale=2.5, temperature=1.0, object_temperature=0.7, background=bg)
    a = m.generate_images(_texts(m), seeds, **kw)
    assert torch.equal(a, m.generate_images(_texts(m), seeds, use_cache=False, **kw))
    assert not torch.equal(a, m.generate_images(_texts(m), seeds, cfg_scale=2.5, temperature=1.0))
    e = m.generate_images(_texts(m), seeds, prefix=a[:, :6], **kw)
    assert torch.equal(e, m.generate_images(_texts(m), seeds, prefix=a[:, :6], use_cache=False, **kw))
    # The object draw guided at its own scale: teacher-forced on its output, every object code is
    # the most likely other code under uncond + object_cfg_scale * (cond - uncond).
    g = m.generate_images(_texts(m), seeds, cfg_scale=6.0, temperature=1.0, object_temperature=0.0, background=bg,
                          object_cfg_scale=2.0)
    null = m._null_text(3, g.device)
    task = torch.full((3,), TASK_T2I)
    cond, unc = (m.image_logits(m.hidden(lay.t2i(t, g), task)[:, lay.t2i_soi: lay.t2i_soi + lay.n_image]).float()
                 for t in (_texts(m), null))
    guided_best = (unc + 2.0 * (cond - unc)).index_fill(2, torch.tensor([bg]), float("-inf")).argmax(-1)
    obj = g != bg
    assert obj.any() and torch.equal(g[obj], guided_best[obj])
    # With object_min_p, among the codes the conditional model finds plausible (probability at least
    # min_p times its likeliest object code's): teacher-forced on the output, each object code is the
    # guided best of those, and the bound excludes codes guidance alone would have picked.
    p = m.generate_images(_texts(m), seeds, cfg_scale=6.0, temperature=1.0, object_temperature=0.0, background=bg,
                          object_cfg_scale=4.0, object_min_p=0.3)
    cond, unc = (m.image_logits(m.hidden(lay.t2i(t, p), task)[:, lay.t2i_soi: lay.t2i_soi + lay.n_image]).float()
                 for t in (_texts(m), null))
    off = torch.tensor([bg])
    logp = cond.index_fill(2, off, float("-inf")).log_softmax(-1)
    plausible = logp >= logp.max(-1, keepdim=True).values + math.log(0.3)
    guided = (unc + 4.0 * (cond - unc)).index_fill(2, off, float("-inf"))
    obj = p != bg
    assert obj.any() and torch.equal(p[obj], guided.masked_fill(~plausible, float("-inf")).argmax(-1)[obj])
    assert (~plausible.gather(2, guided.argmax(-1, keepdim=True))).any()  # the bound did drop a guided best
    q = dict(cfg_scale=6.0, temperature=1.0, object_temperature=0.7, background=bg, object_cfg_scale=4.0)
    assert torch.equal(m.generate_images(_texts(m), seeds, object_min_p=0.0, **q), m.generate_images(_texts(m), seeds, **q))
    r = m.generate_images(_texts(m), seeds, object_min_p=0.3, **q)
    assert torch.equal(r, m.generate_images(_texts(m), seeds, object_min_p=0.3, use_cache=False, **q))
    same = dict(cfg_scale=2.5, temperature=1.0, object_temperature=0.7, background=bg)
    assert torch.equal(m.generate_images(_texts(m), seeds, object_cfg_scale=2.5, **same), a)  # default: cfg_scale
    kw = dict(kw, cfg_scale=1.0, object_cfg_scale=3.0)  # objects guided while the layout is not: a guided batch
    b = m.generate_images(_texts(m), seeds, **kw)
    assert torch.equal(b, m.generate_images(_texts(m), seeds, use_cache=False, **kw))
    for bad, match in [(dict(object_temperature=0.5), "go together"), (dict(background=3), "go together"),
                       (dict(object_cfg_scale=2.0), "object_temperature, which is not set"),
                       (dict(object_min_p=0.1), "object_min_p=0.1 bounds the object draw of object_temperature"),
                       (dict(object_temperature=0.5, background=3, object_min_p=1.5), "object_min_p must be in"),
                       (dict(object_temperature=0.5, background=3, object_cfg_scale=0.5), "object_cfg_scale must be"),
                       (dict(object_temperature=-1.0, background=3), "object_temperature must be"),
                       (dict(object_temperature=0.5, background=CODES), "background must be a code id"),
                       (dict(object_temperature=0.5, background=True), "background must be a code id")]:
        with pytest.raises(ValueError, match=match):
            m.generate_images(_texts(m), seeds, **bad)


def test_rope_2d_makes_image_attention_see_grid_offsets_and_decodes_as_recomputed(tmp_path):
    m = _fresh_model(rope_2d=True)
    lay = m.layout
    t2i = torch.full((1,), TASK_T2I)
    cos, sin = m.rope(torch.arange(lay.length), t2i)  # (1, 1, L, Dh/2)
    # Text slots are not rotated; image cell (r, c) turns by r on the first half of the pairs, c on the second.
    text_slots = [i for i in range(lay.length) if i not in range(lay.t2i_image.start, lay.t2i_image.stop)]
    assert torch.equal(cos[0, 0, text_slots], torch.ones(len(text_slots), m.cfg.head_dim // 2))
    assert torch.equal(sin[0, 0, text_slots], torch.zeros(len(text_slots), m.cfg.head_dim // 2))
    # The score of a query and a key that are the same vectors at two image cells depends on their
    # offset on the grid only: (0,0)->(1,2) scores as (2,1)->(3,3), and not as (0,0)->(2,1).
    q = torch.randn(1, 1, 1, m.cfg.head_dim)
    k = torch.randn(1, 1, 1, m.cfg.head_dim)

    def score(a: tuple[int, int], b: tuple[int, int]) -> float:
        sa, sb = (lay.t2i_image.start + r * 4 + c for r, c in (a, b))
        qa = rotate(q, cos[:, :, sa:sa + 1], sin[:, :, sa:sa + 1])
        kb = rotate(k, cos[:, :, sb:sb + 1], sin[:, :, sb:sb + 1])
        return float((qa * kb).sum())

    assert abs(score((0, 0), (1, 2)) - score((2, 1), (3, 3))) < 1e-5
    assert abs(score((0, 0), (1, 2)) - score((0, 0), (2, 1))) > 1e-3
    # i2t rotates the same cells by the same angles, though they sit at other slots
    c2, _ = m.rope(torch.arange(lay.length), torch.full((1,), TASK_I2T))
    torch.testing.assert_close(c2[0, 0, lay.i2t_image], cos[0, 0, lay.t2i_image])
    # Keys are cached rotated: the KV-cache decode samples what full recomputation samples, and it trains.
    seeds = torch.tensor([5, 6, 7])
    a = m.generate_images(_texts(m), seeds, cfg_scale=2.5, temperature=1.0)
    assert torch.equal(a, m.generate_images(_texts(m), seeds, cfg_scale=2.5, temperature=1.0, use_cache=False))
    image = torch.randint(0, CODES, (3, 16), generator=torch.Generator().manual_seed(1))
    assert m.generate_text(image, seeds, temperature=1.0) == m.generate_text(image, seeds, temperature=1.0, use_cache=False)
    plain = VisGPT(gpt_config("tiny", text_vocab=TEXT_VOCAB, codebook_size=CODES, grid=(4, 4), max_text_tokens=8))
    plain.load_state_dict(m.state_dict())  # the option adds no weights: only the rotation differs
    assert not torch.equal(plain.eval().generate_images(_texts(m), seeds, cfg_scale=2.5, temperature=1.0), a)
    save_gpt(m, tmp_path / "lm")
    back = load_gpt(tmp_path / "lm")
    assert back.cfg.rope_2d and torch.equal(back.generate_images(_texts(m), seeds, cfg_scale=2.5, temperature=1.0), a)
    # a head that cannot be split between rows and columns is refused with the numbers
    with pytest.raises(ValueError, match="head_dim = d_model / n_head = 6 must divide by 4"):
        gpt_config("tiny", d_model=12, n_head=2, rope_2d=True)


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(n_layer=3, rope_2d=True),
    dict(n_layer=1, pooled_condition=True, grid_context=True, grid_context_radius=3, neighbour_context=True),
])
@pytest.mark.parametrize("n_t2i", [0, 4, 6])
def test_loss_at_the_scored_slots_equals_the_loss_of_the_whole_pass(overrides, n_t2i):
    """The loss runs the last block only where it is scored (hidden_at) and the grid context only on
    t2i rows; its value and every gradient equal those of the whole causal pass (hidden) read there."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    m = VisGPT(gpt_config("tiny", text_vocab=TEXT_VOCAB, codebook_size=CODES, grid=(4, 4), max_text_tokens=8,
                          **overrides))
    lay, b = m.layout, 6
    g = torch.Generator().manual_seed(1)
    text = torch.tensor([lay.text_region(torch.randint(10, TEXT_VOCAB, (1 + i,), generator=g).tolist(),
                                         lang=None if i < n_t2i else ("en", "zh")[i % 2]) for i in range(b)])
    image = torch.randint(0, CODES, (b, lay.n_image), generator=g)
    tokens = torch.cat([lay.t2i(text[:n_t2i], image[:n_t2i]), lay.i2t(image[n_t2i:], text[n_t2i:])])

    def whole_pass_parts() -> dict[int, torch.Tensor]:
        """Per task, its mean loss from the whole pass."""
        task = torch.tensor([TASK_T2I] * n_t2i + [TASK_I2T] * (b - n_t2i))
        h = m.hidden(tokens, task)  # first_i2t unset: every slot of every row computed
        parts = {}
        if n_t2i:
            logits = m.image_logits(h[:n_t2i, lay.t2i_soi: lay.t2i_soi + lay.n_image])
            parts[TASK_T2I] = F.cross_entropy(logits.flatten(0, 1), (tokens[:n_t2i, lay.t2i_image] - TEXT_VOCAB).flatten())
        if b > n_t2i:
            logits = m.text_logits(h[n_t2i:, lay.i2t_eoi: lay.i2t_eoi + lay.text_slots], m.i2t_blocked)
            target = tokens[n_t2i:, lay.i2t_text].masked_fill(tokens[n_t2i:, lay.i2t_text] == PAD, -100)
            parts[TASK_I2T] = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
        return parts

    def whole_pass_loss():
        parts = whole_pass_parts()
        return sum(parts[t] * (n_t2i if t == TASK_T2I else b - n_t2i) / b for t in parts)

    results = []
    for fn in (lambda: m.loss(tokens, n_t2i)[0], whole_pass_loss):
        m.zero_grad(set_to_none=True)
        loss = fn()
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}))
    (fast, fast_grads), (whole, whole_grads) = results
    assert torch.allclose(fast, whole, atol=1e-6), (fast, whole)
    assert fast_grads.keys() <= whole_grads.keys()
    for k, grad in whole_grads.items():  # a part no scored slot reads gets no gradient (the whole pass: zeros)
        assert torch.allclose(fast_grads.get(k, torch.zeros_like(grad)), grad, atol=1e-6), k
    nll, count = m.sequence_nll(tokens, n_t2i)  # the scoring pass takes the same path
    with torch.no_grad():
        parts = whole_pass_parts()
    for t, rows in ((TASK_T2I, slice(0, n_t2i)), (TASK_I2T, slice(n_t2i, b))):
        if t in parts:
            assert torch.allclose(nll[rows].sum() / count[rows].sum(), parts[t].float(), atol=1e-5), t
