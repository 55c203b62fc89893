"""visgen.Model and the bundle: load, generate / caption / edit, the CLI commands, MLflow URIs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import visgen
from bundles import make_bundle
from visgen.inference import (
    MAX_CANDIDATES, GenerationRequest, Model, caption_codes, candidate_seed, read_manifest,
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A bundle of untrained tiny parts: enough for every code path and shape."""
    return make_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="module")
def pipe(bundle) -> Model:
    return visgen.Model.load(bundle, device="cpu")


def test_bundle_manifest_records_every_part(bundle):
    m = read_manifest(bundle)
    assert m["format"] == "visgen-bundle/1"
    assert {"lm", "image_tokenizer", "text_tokenizer", "sampling"} <= set(m)
    assert len(m["lm"]["fingerprint"]) == 64 and m["text_tokenizer"]["vocab_size"] <= 400
    assert not list(bundle.glob("*.pkl")) and not list(bundle.glob("*.pt"))


def test_generate_returns_uint8_images_per_prompt_and_seed(pipe):
    images = pipe.generate(["a red circle left of a blue square", "两个绿色的三角形"], n=2, seed=7)
    assert len(images) == 4
    assert all(isinstance(im, np.ndarray) and im.dtype == np.uint8 and im.shape == (16, 16, 3) for im in images)
    again = pipe.generate(["两个绿色的三角形"], n=2, seed=9)  # image j of prompt i uses seed + i*n + j
    np.testing.assert_array_equal(again[0], images[2])
    assert pipe.generate("one prompt")[0].shape == (16, 16, 3)


def test_caption_accepts_arrays_pil_images_and_paths(pipe, tmp_path):
    img = pipe.generate("a blue star", seed=1)[0]
    path = tmp_path / "x.png"
    Image.fromarray(np.repeat(np.repeat(img, 4, 0), 4, 1)).save(path)  # 64 px: resized to 16
    texts = pipe.caption([img, Image.fromarray(img), str(path)])
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert texts[0] == texts[1]
    assert pipe.caption(img) == texts[:1]


def test_caption_in_a_requested_language_holds_no_word_of_the_other(pipe):
    """Even an untrained model: a forced "zh" never writes a Latin letter, a forced "en" only ASCII."""
    import re

    images = list(np.random.default_rng(0).integers(0, 256, (24, 16, 16, 3), dtype=np.uint8))
    for temperature in (0.0, 1.5):
        zh = pipe.caption(images, language="zh", temperature=temperature, seed=1)
        en = pipe.caption(images, language="en", temperature=temperature, seed=1)
        assert not any(re.search(r"[A-Za-z]", t) for t in zh), zh
        assert all(t.isascii() and not re.search(r"[\u3400-\u9fff]", t) for t in en), en
    assert "".join(zh) and "".join(en)  # something was written in both
    mixed = pipe.caption(images[:4], language=["zh", "en", "auto", "zh"], temperature=1.5, seed=1)
    assert mixed[0] == zh[0] and mixed[1] == en[1] and mixed[3] == zh[3]  # per image, whatever the batch
    assert pipe.caption(images[:4], language="auto") == pipe.caption(images[:4])  # the default


def test_generate_many_answers_each_request_as_if_it_ran_alone(pipe):
    """Requests of different prompts, counts, seeds and settings in one call: grouped by settings,
    and each request's images exactly what it gets on its own (image j uses seed + j)."""
    reqs = [GenerationRequest("a red circle", n=2, seed=5),
            GenerationRequest("a blue square", n=1, seed=40, temperature=0.0),
            GenerationRequest("两个绿色的三角形", n=1, seed=6)]
    out = pipe.generate_many(reqs)
    assert [len(images) for images in out] == [2, 1, 1]
    alone = [pipe.generate("a red circle", n=2, seed=5), pipe.generate("a blue square", seed=40, temperature=0.0),
             pipe.generate("两个绿色的三角形", seed=6)]
    for got, want in zip(out, alone):
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
    # batch_size only cuts the forwards
    np.testing.assert_array_equal(pipe.generate_many(reqs[:1], batch_size=1)[0][1], out[0][1])
    assert pipe.generate_many([]) == []


def test_generate_many_checks_every_request_first(pipe, monkeypatch):
    calls = []
    monkeypatch.setattr(pipe.lm, "generate_images", lambda *a, **k: calls.append(1))
    for bad, err, match in [(GenerationRequest("x", temperature=-1.0), ValueError, "temperature"),
                            (GenerationRequest("x", n=0), ValueError, "request 1: n must be"),
                            (GenerationRequest(3), TypeError, "strings"),
                            (GenerationRequest("x", seed="7"), TypeError, "request 1: seed must be an integer"),
                            ({"prompt": "x"}, TypeError, "GenerationRequest")]:
        with pytest.raises(err, match=match):
            pipe.generate_many([GenerationRequest("fine"), bad])
    with pytest.raises(ValueError, match="batch_size"):
        pipe.generate_many([GenerationRequest("fine")], batch_size=0)
    assert not calls  # refused before anything was drawn


def test_best_of_n_images_keep_the_draw_whose_prompt_the_model_finds_likeliest(pipe):
    prompts = ["a red circle left of a blue square", "两个绿色的三角形", "a white star"]
    k, seed = 5, 11
    chosen = pipe.generate(prompts, seed=seed, candidates=k)
    # every candidate by hand: candidate c of the image with seed s draws with candidate_seed(s, c)
    text = pipe.text_regions(prompts).repeat_interleave(k, 0)
    seeds = torch.tensor([candidate_seed(seed + i, c) for i in range(3) for c in range(k)])
    s = pipe.sampling
    codes = pipe.lm.generate_images(text, seeds, cfg_scale=s.cfg_scale, temperature=s.temperature, top_k=s.top_k,
                                    top_p=s.top_p)
    nll = pipe.prompt_nll([p for p in prompts for _ in range(k)], codes).view(3, k)
    assert nll.argmin(1).tolist() != [0, 0, 0]  # reranking chose another draw than the plain one somewhere
    want = pipe.decode_codes(codes.view(3, k, -1)[torch.arange(3), nll.argmin(1)])
    for a, b in zip(chosen, want):
        np.testing.assert_array_equal(a, b)
    # the chosen image is the likeliest of its candidates and does not depend on the batch
    np.testing.assert_array_equal(pipe.generate(prompts[1:2], seed=seed + 1, candidates=k)[0], chosen[1])
    # one candidate draws exactly what no reranking draws: candidate 0 keeps the image's own seed
    np.testing.assert_array_equal(pipe.generate(prompts, seed=seed, candidates=1)[2], pipe.generate(prompts, seed=seed)[2])
    with pytest.raises(ValueError, match="candidates"):
        pipe.generate(prompts, candidates=0)
    with pytest.raises(ValueError, match="candidates"):
        pipe.generate(prompts, candidates=MAX_CANDIDATES + 1)
    with pytest.raises(TypeError, match="request 0: candidates must be an integer"):
        pipe.generate_many([GenerationRequest("x", candidates=2.0)])


def test_best_of_n_captions_keep_the_one_under_which_the_image_is_likeliest(pipe):
    images = list(np.random.default_rng(3).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    k = 6
    chosen = pipe.caption(images, language=["en", "zh", "auto", "en"], seed=2, candidates=k)
    codes = pipe.encode_images(images)
    cands = []  # candidate 0 at the caption temperature (greedy), the rest at caption_candidate_temperature
    for c in range(k):
        seeds = torch.tensor([candidate_seed(2 + i, c) for i in range(4)])
        temp = pipe.sampling.caption_temperature if c == 0 else pipe.sampling.caption_candidate_temperature
        cands.append(caption_codes(pipe.lm, pipe.tokenizer, codes, seeds, ["en", "zh", "auto", "en"], temperature=temp,
                                   decode=False))
    nll = pipe.image_nll([ids for cand in cands for ids in cand], codes.repeat(k, 1)).view(k, 4)
    assert chosen == [pipe.tokenizer.decode(cands[j][i]) for i, j in enumerate(nll.argmin(0).tolist())]
    assert nll.argmin(0).tolist() != [0, 0, 0, 0]  # not the greedy caption everywhere
    # a requested language still holds: no Latin letter in the zh caption, ASCII only in the en ones
    assert not any("a" <= ch.lower() <= "z" for ch in chosen[1]) and chosen[0].isascii() and chosen[3].isascii()
    assert pipe.caption(images, seed=2, candidates=1) == pipe.caption(images, seed=2)
    with pytest.raises(ValueError, match="caption_candidates"):
        pipe.caption(images, candidates=0)
    with pytest.raises(TypeError, match="candidates must be an integer"):
        pipe.caption(images, candidates="3")
    # one count per image: each image as a call with its own count (seeds by position), batched or not
    ks = [k, None, 1, k]
    want = [pipe.caption(im, language=lang, seed=2 + i, candidates=c)[0]
            for i, (im, lang, c) in enumerate(zip(images, ["en", "zh", "auto", "en"], ks))]
    for batch_size in (None, 1):
        assert pipe.caption(images, language=["en", "zh", "auto", "en"], seed=2, candidates=ks,
                            batch_size=batch_size) == want
    assert want[0] == chosen[0] and want[3] == chosen[3]
    with pytest.raises(ValueError, match="candidates: 2 counts for 4 images"):
        pipe.caption(images, candidates=[2, 3])
    with pytest.raises(TypeError, match="image 1: candidates must be an integer"):
        pipe.caption(images, candidates=[2, "3", 1, 1])


def test_caption_takes_one_seed_per_image(pipe):
    images = list(np.random.default_rng(1).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8))
    by_position = pipe.caption(images, temperature=1.5, seed=4)  # image i uses seed 4 + i
    assert pipe.caption(images, temperature=1.5, seed=[4, 5, 6], batch_size=None) == by_position
    assert pipe.caption(images[2:], temperature=1.5, seed=[6]) == by_position[2:]
    with pytest.raises(ValueError, match="2 seeds for 3 images"):
        pipe.caption(images, seed=[1, 2])


def test_caption_language_is_validated(pipe):
    img = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="language 'fr' is not allowed; allowed: 'auto', 'en', 'zh'"):
        pipe.caption(img, language="fr")
    with pytest.raises(ValueError, match="2 languages for 1 images"):
        pipe.caption(img, language=["en", "zh"])


def test_edit_keeps_the_rows_above_the_cut(pipe):
    img = pipe.generate("a yellow cross", seed=3)[0]
    codes = pipe.encode_images([img])
    out = pipe.edit(img, "a purple hexagon", keep_rows=4, seed=5)
    assert out.shape == img.shape and out.dtype == np.uint8
    w = pipe.grid[1]
    # Re-encoding decoded pixels need not give the same codes: check the codes the edit produced.
    kept = pipe.lm.generate_images(pipe.text_regions(["a purple hexagon"]), torch.tensor([5]),
                                   prefix=codes[:, : 4 * w], cfg_scale=pipe.sampling.cfg_scale,
                                   temperature=pipe.sampling.temperature)
    assert torch.equal(kept[:, : 4 * w], codes[:, : 4 * w])
    with pytest.raises(ValueError, match="keep_rows"):
        pipe.edit(img, "x", keep_rows=99)


@pytest.mark.parametrize("kwargs, match", [
    (dict(cfg_scale=0.5), "cfg_scale"), (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_k=-3), "top_k"), (dict(n=0), "n must be"),
])
def test_bad_sampling_parameters_are_refused(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe.generate("a red circle", **kwargs)


def test_bad_inputs_name_the_problem(pipe):
    with pytest.raises(TypeError, match="strings"):
        pipe.generate([3])
    with pytest.raises(ValueError, match="uint8"):
        pipe.caption([np.zeros((16, 16, 3), np.float32)])


def test_object_temperature_draws_with_the_bundles_background_code(bundle, tmp_path):
    def variant(name: str, **fields) -> Path:
        out = tmp_path / name
        shutil.copytree(bundle, out)
        m = json.loads((out / "manifest.json").read_text())
        m.update(fields)
        (out / "manifest.json").write_text(json.dumps(m))
        return out

    sampling = {**read_manifest(bundle)["sampling"], "object_temperature": 0.0}
    model = Model.load(variant("bg", sampling=sampling, background_code={"code": 3, "share": 0.5}), device="cpu")
    assert model.background_code == 3 and model.info()["sampling"]["object_temperature"] == 0.0
    text = model.text_regions(["a red circle"])
    want = model.lm.generate_images(text, torch.tensor([4]), cfg_scale=model.sampling.cfg_scale,
                                    temperature=model.sampling.temperature, object_temperature=0.0, background=3)
    np.testing.assert_array_equal(model.generate("a red circle", seed=4)[0], model.decode_codes(want)[0])
    # a batch of requests draws the same way
    np.testing.assert_array_equal(model.generate_many([GenerationRequest("a red circle", n=1, seed=4)])[0][0],
                                  model.decode_codes(want)[0])
    # per call: a value overrides the bundle's, on a bundle with a background code
    half = model.lm.generate_images(text, torch.tensor([4]), cfg_scale=model.sampling.cfg_scale,
                                    temperature=model.sampling.temperature, object_temperature=0.5, background=3)
    np.testing.assert_array_equal(model.generate("a red circle", seed=4, object_temperature=0.5)[0],
                                  model.decode_codes(half)[0])
    np.testing.assert_array_equal(
        model.generate_many([GenerationRequest("a red circle", seed=4, object_temperature=0.5)])[0][0],
        model.decode_codes(half)[0])
    img = model.generate("a blue star", seed=1)[0]
    kept = model.encode_images([img])[:, : 2 * model.grid[1]]
    edit = model.lm.generate_images(text, torch.tensor([2]), cfg_scale=model.sampling.cfg_scale,
                                    temperature=model.sampling.temperature,
                                    prefix=kept, object_temperature=0.5, background=3)
    np.testing.assert_array_equal(model.edit(img, "a red circle", keep_rows=2, seed=2, object_temperature=0.5),
                                  model.decode_codes(edit)[0])
    with pytest.raises(ValueError, match="object_temperature"):
        model.generate("a red circle", object_temperature=-1.0)
    # the object codes' own guidance scale, per call
    apart = model.lm.generate_images(text, torch.tensor([4]), cfg_scale=model.sampling.cfg_scale,
                                     temperature=model.sampling.temperature, object_temperature=0.0, background=3,
                                     object_cfg_scale=1.5)
    np.testing.assert_array_equal(model.generate("a red circle", seed=4, object_cfg_scale=1.5)[0],
                                  model.decode_codes(apart)[0])
    with pytest.raises(ValueError, match="object_cfg_scale"):
        model.generate("a red circle", object_cfg_scale=0.5)
    # the object draw's plausibility bound, per call (generate, a batch of requests, edit) and as the bundle's default
    bound = model.lm.generate_images(text, torch.tensor([4]), cfg_scale=model.sampling.cfg_scale,
                                     temperature=model.sampling.temperature, object_temperature=0.0, background=3,
                                     object_cfg_scale=4.0, object_min_p=0.5)
    np.testing.assert_array_equal(model.generate("a red circle", seed=4, object_cfg_scale=4.0, object_min_p=0.5)[0],
                                  model.decode_codes(bound)[0])
    np.testing.assert_array_equal(
        model.generate_many([GenerationRequest("a red circle", seed=4, object_cfg_scale=4.0, object_min_p=0.5)])[0][0],
        model.decode_codes(bound)[0])
    bounded = Model.load(variant("minp", sampling={**sampling, "object_cfg_scale": 4.0, "object_min_p": 0.5},
                                 background_code={"code": 3, "share": 0.5}), device="cpu")
    np.testing.assert_array_equal(bounded.generate("a red circle", seed=4)[0], model.decode_codes(bound)[0])
    kept_edit = model.lm.generate_images(text, torch.tensor([2]), cfg_scale=model.sampling.cfg_scale,
                                         temperature=model.sampling.temperature, prefix=kept, object_temperature=0.0,
                                         background=3, object_cfg_scale=4.0, object_min_p=0.5)
    np.testing.assert_array_equal(bounded.edit(img, "a red circle", keep_rows=2, seed=2),
                                  model.decode_codes(kept_edit)[0])
    with pytest.raises(ValueError, match="object_min_p"):
        model.generate("a red circle", object_min_p=1.5)
    # on a bundle without one, asking per call is refused with the reason
    plain = Model.load(bundle, device="cpu")
    with pytest.raises(ValueError, match="object_temperature=0.5 needs a background code"):
        plain.generate("a red circle", object_temperature=0.5)
    with pytest.raises(ValueError, match="object_cfg_scale=2.0 guides the object codes of object_temperature, which is null"):
        plain.generate("a red circle", object_cfg_scale=2.0)
    with pytest.raises(ValueError, match="needs a background code"):
        plain.generate_many([GenerationRequest("x"), GenerationRequest("y", object_temperature=0.0)])
    # a bundle that asks for it without a background code, or with one its tokenizer lacks, is refused at load
    with pytest.raises(ValueError, match="object_temperature=0.0 needs a background code.*none recorded"):
        Model.load(variant("none", sampling=sampling), device="cpu")
    with pytest.raises(ValueError, match="the most common, code 3, covers 12.0%"):
        Model.load(variant("low", sampling=sampling, background_code={"code": 3, "share": 0.12}), device="cpu")
    with pytest.raises(ValueError, match="background_code 9999 is not a code"):
        Model.load(variant("far", sampling=sampling, background_code={"code": 9999, "share": 0.5}), device="cpu")


def test_mismatched_or_tampered_bundles_are_refused(bundle, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(bundle, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["lm"]["fingerprint"] = "0" * 64
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="lm fingerprint"):
        Model.load(bad)
    with pytest.raises(FileNotFoundError, match="not a visgen bundle"):
        Model.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Model.load(tmp_path / "nope")


def test_cli_generate_caption_edit(bundle, tmp_path, capsys):
    from visgen.cli import main

    out = tmp_path / "gen.png"
    assert main(["generate", "a red circle left of a blue square", "--bundle", str(bundle), "--out", str(out),
                 "--seed", "3", "--cfg-scale", "2", "--device", "cpu"]) == 0
    assert Image.open(out).size == (16, 16)
    assert main(["generate", "一个红色的圆", "--n", "2", "--bundle", str(bundle), "--out", str(tmp_path / "many.png")]) == 0
    assert (tmp_path / "many_000.png").is_file() and (tmp_path / "many_001.png").is_file()
    capsys.readouterr()
    assert main(["caption", str(out), "--bundle", str(bundle)]) == 0
    assert capsys.readouterr().out.startswith(str(out) + "\t")
    assert main(["edit", str(out), "a green square", "--keep-rows", "2", "--bundle", str(bundle),
                 "--out", str(tmp_path / "edit.png")]) == 0
    assert Image.open(tmp_path / "edit.png").size == (16, 16)
    assert main(["generate", "x", "--bundle", str(bundle), "--out", str(out), "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err
    # --candidates: the CLI's image is Model.generate(candidates=3)'s
    assert main(["generate", "a white star", "--bundle", str(bundle), "--out", str(out), "--seed", "4",
                 "--candidates", "3"]) == 0
    want = visgen.Model.load(bundle, device="cpu").generate("a white star", seed=4, candidates=3)[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out)), want)
    assert main(["generate", "x", "--bundle", str(bundle), "--out", str(out), "--candidates", "0"]) == 2
    assert "candidates" in capsys.readouterr().err


def test_cli_caption_language_flag_reaches_the_call(bundle, tmp_path, capsys, monkeypatch):
    import re

    from visgen.cli import build_parser, main
    from visgen.inference import CAPTION_LANGUAGES

    img = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(img)
    capsys.readouterr()
    assert main(["caption", str(img), "--bundle", str(bundle), "--language", "zh", "--temperature", "1.5"]) == 0
    text = capsys.readouterr().out.split("\t", 1)[1]
    assert not re.search(r"[A-Za-z]", text)
    seen = {}
    real = Model.caption

    def spy(self, images, **kw):
        seen.update(kw)
        return real(self, images, **kw)

    monkeypatch.setattr(Model, "caption", spy)
    assert main(["caption", str(img), "--bundle", str(bundle), "--language", "en"]) == 0
    assert seen["language"] == "en"
    assert main(["caption", str(img), "--bundle", str(bundle)]) == 0
    assert seen["language"] == "auto" and seen["candidates"] is None  # the defaults: the model chooses, the bundle's n
    assert main(["caption", str(img), "--bundle", str(bundle), "--candidates", "4"]) == 0
    assert seen["candidates"] == 4
    for command, method in (("generate", "generate"), ("edit", "edit")):  # object_temperature: generate and edit
        blank = np.zeros((16, 16, 3), np.uint8)
        monkeypatch.setattr(Model, method, lambda self, *a, blank=[blank] if method == "generate" else blank, **kw:
                            seen.update(kw) or blank)
        head = ["generate", "x"] if command == "generate" else ["edit", str(img), "x", "--keep-rows", "2"]
        seen.clear()
        assert main([*head, "--bundle", str(bundle), "--out", str(tmp_path / "o.png"), "--object-temperature", "0.25"]) == 0
        assert seen["object_temperature"] == 0.25
        assert main([*head, "--bundle", str(bundle), "--out", str(tmp_path / "o.png"), "--object-cfg-scale", "2"]) == 0
        assert seen["object_cfg_scale"] == 2.0
        assert main([*head, "--bundle", str(bundle), "--out", str(tmp_path / "o.png")]) == 0
        assert seen["object_temperature"] is None and seen["object_cfg_scale"] is None
    for lang in CAPTION_LANGUAGES:  # the flag takes every language the pipeline does
        assert build_parser().parse_args(["caption", str(img), "--language", lang]).language == lang
    with pytest.raises(SystemExit) as exit_info:
        main(["caption", str(img), "--bundle", str(bundle), "--language", "fr"])
    assert exit_info.value.code == 2 and "invalid choice: 'fr'" in capsys.readouterr().err


def test_load_from_an_mlflow_artifact_uri(bundle, tmp_path, fresh_mlflow_db):
    import mlflow

    uri = f"sqlite:///{fresh_mlflow_db(tmp_path)}"  # named per call: no process-global MLflow state is touched
    client = mlflow.MlflowClient(uri)
    exp = client.create_experiment("bundles", artifact_location=str(tmp_path / "artifacts"))
    run = client.create_run(exp)
    client.log_artifacts(run.info.run_id, str(bundle), "bundle")
    pipe = Model.load(f"runs:/{run.info.run_id}/bundle", device="cpu", tracking_uri=uri)
    assert pipe.info()["lm_fingerprint"] == read_manifest(bundle)["lm"]["fingerprint"]
    assert pipe.generate("a red circle")[0].shape == (16, 16, 3)
