"""Own data: the whole pipeline on image-text shards that are not the shapes renders, and the
held-out metrics that hold on any data (visgen.eval.generic).

One end-to-end run (slow, ~2 min on 2 cores) through `jobs/pipeline.py` on procedurally drawn
textures with English and Chinese captions (tests/owndata.py), in the session's Ray instance;
the retrieval tests reuse its bundle. The rest are unit tests on an untrained tiny bundle."""

from __future__ import annotations

import contextlib
import io
import json
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import owndata
from bundles import make_bundle
from net import free_port
from visgen.config import SpecError, load_spec
from visgen.eval import generic
from visgen.eval.generic import HeldoutEvalConfig

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "pipelines" / "own-data-example.yaml"
SKIP_TOKENIZER = "skipping the GenEval-shapes ceiling of the image tokenizer: the data is not the shapes renders"
SKIP_LM = "skipping GenEval-shapes, the caption slot benchmark and the sampling search: the data is not the shapes renders"


# -- an untrained tiny bundle: the metrics' mechanics ---------------------------------------------

@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    import visgen

    return visgen.Model.load(make_bundle(tmp_path_factory.mktemp("own-bundle")), device="cpu")


@pytest.fixture(scope="module")
def pairs():
    """24 held-out-like pairs at the bundle's 16 px, captions in English and Chinese."""
    from PIL import Image

    rows = owndata.samples(24, seed=1)
    images = [np.asarray(Image.fromarray(r["image"]).resize((16, 16), Image.Resampling.BICUBIC)) for r in rows]
    return images, [r["caption"] for r in rows]


def _ids_codes(pipe, images, captions):
    return generic.text_ids(pipe.tokenizer, pipe.lm, captions), pipe.encode_images(images)


def test_sequence_nll_is_the_training_loss(pipe, pairs):
    """The held-out loss scores exactly what VisGPT.loss scores, on sequences laid out by the trainer."""
    from visgen.train.lm import assemble

    ids, codes = _ids_codes(pipe, *pairs)
    cjk = generic.cjk_table(pipe.tokenizer, pipe.lm)
    n = 10
    tokens = assemble(ids[:n], codes[:n], pipe.lm.layout, n_t2i=6, cjk=cjk)
    with torch.no_grad():
        _, parts = pipe.lm.loss(tokens, 6)
    nll, count = generic.sequence_nll(pipe.lm, tokens, 6)
    assert float(nll[:6].sum() / count[:6].sum()) == pytest.approx(float(parts["t2i_loss"]), rel=1e-5)
    assert float(nll[6:].sum() / count[6:].sum()) == pytest.approx(float(parts["i2t_loss"]), rel=1e-5)
    assert (count[:6] == pipe.lm.layout.n_image).all() and (count[6:] >= 2).all()  # language token + <eos> at least


def test_heldout_loss_and_perplexity_are_finite(pipe, pairs):
    ids, codes = _ids_codes(pipe, *pairs)
    out = generic.heldout_loss(pipe.lm, ids, codes, cjk=generic.cjk_table(pipe.tokenizer, pipe.lm), batch_size=7)
    for task in ("t2i", "i2t"):
        loss, ppl = out[f"heldout_{task}_loss"], out[f"heldout_{task}_perplexity"]
        assert np.isfinite(loss) and loss > 0 and ppl == pytest.approx(np.exp(loss))
    assert out["heldout_t2i_perplexity"] <= pipe.lm.cfg.codebook_size * 1.5  # untrained: about uniform over the codes


def test_retrieval_is_exactly_chance_when_candidates_are_identical(pipe, pairs):
    """Every candidate the same caption and the same image: all scores tie, the credit is shared: 1/K."""
    images, captions = pairs
    ids, codes = _ids_codes(pipe, [images[0]] * 12, [captions[0]] * 12)
    out = generic.retrieval(pipe.lm, ids, codes, 4, cjk=generic.cjk_table(pipe.tokenizer, pipe.lm), batch_size=16)
    assert out["retrieval_i2t_at1"] == out["retrieval_t2i_at1"] == out["retrieval_chance"] == 0.25
    assert out["retrieval_k"] == 4 and out["retrieval_n"] == 12


def test_top1_groups_and_ties():
    assert generic.top1(np.array([[3.0, 1.0, 2.0], [0.0, 1.0, 2.0]])) == 0.5
    assert generic.top1(np.array([[1.0, 1.0, 0.0, 1.0]])) == pytest.approx(1 / 3)  # three-way tie at the top
    assert generic.top1(np.array([[0.0, 2.0], [2.0, 0.0]]), truth=np.array([1, 0])) == 1.0
    g = generic.groups(10, 4, seed=3)
    assert g.shape == (2, 4) and len(set(g.reshape(-1).tolist())) == 8  # a remainder of 2 is left out
    assert (generic.groups(10, 4, seed=3) == g).all()
    with pytest.raises(ValueError, match="k=11 candidates among n=10"):
        generic.groups(10, 11)
    with pytest.raises(ValueError, match="shape"):
        generic.top1(np.zeros(5))


def test_caption_bleu_and_chrf_per_language():
    refs = ["red vertical stripes", "a blue checkerboard", "红色的竖条纹", "一张蓝色的棋盘格图"]
    langs = ["en", "en", "zh", "zh"]
    perfect = generic.caption_scores(refs, refs, langs)
    assert set(perfect) == {f"heldout_caption_{m}_{lang}" for m in ("bleu", "chrf") for lang in ("en", "zh")}
    assert all(v == pytest.approx(100.0) for v in perfect.values())
    wrong = generic.caption_scores(["green dots", "yellow rings", "绿色的圆点", "黄色的圆环"], refs, langs)
    assert all(0 <= v < 50 for v in wrong.values())
    with pytest.raises(ValueError, match="one of each"):
        generic.caption_scores(refs[:3], refs, langs)


def test_heldout_config_errors_name_the_values():
    with pytest.raises(ValueError, match="retrieval_n=4 is below retrieval_k=8"):
        HeldoutEvalConfig(retrieval_n=4)
    with pytest.raises(ValueError, match="images=1"):
        HeldoutEvalConfig(images=1, grid=0)
    with pytest.raises(ValueError, match="grid=9 is more than images=8"):
        HeldoutEvalConfig(images=8, grid=9)
    assert HeldoutEvalConfig(retrieval_n=0, retrieval_k=50).retrieval_n == 0  # retrieval off


def test_evaluate_heldout_on_an_untrained_bundle(pipe, pairs, tmp_path):
    images, captions = pairs
    cfg = HeldoutEvalConfig(samples=12, retrieval_n=16, retrieval_k=4, images=6, grid=3, batch_size=32)
    out = generic.evaluate_heldout(pipe, images, captions, cfg, out_dir=tmp_path)
    names = {"heldout_t2i_loss", "heldout_i2t_loss", "heldout_t2i_perplexity", "heldout_i2t_perplexity",
             "retrieval_i2t_at1", "retrieval_t2i_at1", "retrieval_chance", "frechet_vq_encoder",
             "heldout_caption_chrf_en", "heldout_caption_chrf_zh", "heldout_caption_bleu_en", "heldout_caption_bleu_zh"}
    assert names <= set(out) and all(np.isfinite(out[k]) for k in names)
    assert out["heldout_pairs"] == 12 and out["retrieval_n"] == 16 and out["frechet_images"] == 6
    assert 0 <= out["retrieval_i2t_at1"] <= 1 and out["frechet_vq_encoder"] >= 0
    assert Path(out["grid"]).is_file() and len(out["grid_prompts"]) == 3
    with pytest.raises(ValueError, match="fewer than eval.heldout.retrieval_k=8"):
        generic.evaluate_heldout(pipe, images[:5], captions[:5], HeldoutEvalConfig(samples=4), out_dir=None)


def test_frechet_vq_encoder_is_zero_for_the_same_set(pipe, pairs):
    images = pairs[0][:8]
    assert generic.frechet_vq_encoder(pipe.vq, images, images)["frechet_vq_encoder"] == pytest.approx(0.0, abs=1e-6)
    far = generic.frechet_vq_encoder(pipe.vq, images, [np.full_like(im, 255) ^ im for im in images])
    assert far["frechet_vq_encoder"] > 0 and far["frechet_feature_dim"] == pipe.vq.cfg.z_channels


# -- the spec: what counts as shapes data ---------------------------------------------------------

def test_example_spec_is_not_shapes_and_shapes_specs_are(tmp_path):
    src = owndata.write_shards(tmp_path / "shards", num_shards=2, per_shard=4)
    spec = load_spec(EXAMPLE, {"data.ingest.source": str(src)})
    assert spec.data.synth is None and spec.eval.shapes is False
    assert spec.image_tokenizer.model.resolution == 64 and tuple(spec.lm.model.grid) == (8, 8)
    assert spec.eval.heldout.retrieval_k == 8 and spec.dump()["eval"]["shapes"] is False
    assert load_spec("pipelines/shapes-tiny.yaml").eval.shapes is True
    assert load_spec("pipelines/shapes-tiny.yaml", {"eval.shapes": False}).eval.shapes is False
    with pytest.raises(SpecError, match="eval.shapes: 'yes' is not allowed"):
        load_spec("pipelines/shapes-tiny.yaml", {"eval.shapes": "yes"})


@pytest.mark.parametrize("preset,resolution,grid", [("photo-64", 64, 8), ("photo-128", 128, 16), ("photo-256", 256, 16)])
def test_photo_presets(preset, resolution, grid):
    from visgen.models.vq import vq_config

    cfg = vq_config(preset)
    assert cfg.resolution == resolution and resolution // cfg.downsample == grid


def test_shapes_only_steps_are_skipped_with_one_line(tmp_path, monkeypatch, capsys):
    """Tokenizer eval without the judge ceiling, LM eval without GenEval / slots / sampling search."""
    from visgen import stages
    from visgen.eval import bundle as bundle_eval
    from visgen.eval import tune
    from visgen.train import image_tokenizer

    src = owndata.write_shards(tmp_path / "shards", num_shards=2, per_shard=4)
    spec = load_spec(EXAMPLE, {"data.ingest.source": str(src), "workdir": str(tmp_path / "w"),
                               "eval.sampling_search.enabled": True})
    seen = {}
    monkeypatch.setattr(stages, "init_ray", lambda: None)
    monkeypatch.setattr(image_tokenizer, "evaluate_image_tokenizer", lambda *a, **k: seen.update(tok=k) or {})
    monkeypatch.setattr(tune, "tune_bundle", lambda *a, **k: pytest.fail("the sampling search reads the shapes judge"))
    monkeypatch.setattr(bundle_eval, "evaluate_bundle", lambda *a, **k: seen.update(lm=k) or {})
    (spec.paths.models / "image_tokenizer").mkdir(parents=True)
    (spec.paths.models / "image_tokenizer" / "image_tokenizer.json").write_text("{}")
    spec.paths.bundle.mkdir(parents=True)
    (spec.paths.bundle / "manifest.json").write_text("{}")
    stages.eval_tokenizer(spec)
    stages.eval_lm(spec)
    out = capsys.readouterr().out
    assert out.count(SKIP_TOKENIZER) == 1 and out.count(SKIP_LM) == 1 and "no data.synth section" in out
    assert seen["tok"]["geneval_ceiling"] is False
    assert seen["lm"]["shapes"] is False and seen["lm"]["sampling_search"] is None
    assert seen["lm"]["heldout"] == spec.eval.heldout


def test_quick_eval_slot_accuracy_only_on_shapes_captions():
    from visgen.train.lm import shapes_slot_scores

    assert shapes_slot_scores(["red dots", "x"], ["red vertical stripes", "一张蓝色的圆点图"], ["en", "zh"]) == {}
    out = shapes_slot_scores(["a red circle", "一个红色的圆"], ["a red circle", "一个红色的圆"], ["en", "zh"])
    assert out == {"caption_slot_accuracy": 1.0, "caption_slot_accuracy_en": 1.0, "caption_slot_accuracy_zh": 1.0}


# -- end to end on own shards ---------------------------------------------------------------------

def _tiny_own_spec(tmp: Path, shards: Path) -> Path:
    """The tiny shapes spec as a new user copies it: no data.synth, the source at their shards."""
    spec = yaml.safe_load((ROOT / "pipelines" / "shapes-tiny.yaml").read_text())
    del spec["data"]["synth"]
    spec["name"] = "own-tiny"
    spec["data"]["ingest"].update(source=str(shards), resolution=16, max_text_tokens=16)
    spec["lm"]["train"].update(steps=120, batch_size=32, lr=5e-3, warmup_steps=10, checkpoint_every=60, log_every=20)
    spec["image_tokenizer"]["train"].update(steps=40)
    spec["eval"] = {"heldout": {"samples": 32, "retrieval_n": 48, "retrieval_k": 4, "images": 8, "grid": 4},
                    "sampling_search": {"enabled": True}}  # on, to see it skipped
    spec["retrain"] = {"gate_metric": "heldout_t2i_loss", "gate_direction": "lower"}  # the gate on any data
    spec["tracking"] = {"experiment": "visgen-own-tiny"}
    path = tmp / "own-tiny.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    return path


@pytest.fixture(scope="module")
def own_run(ray_session, tmp_path_factory):
    """`python jobs/pipeline.py` on 5 shards of textures (the last held out), in this process."""
    tmp = tmp_path_factory.mktemp("own-data")
    shards = owndata.write_shards(tmp / "shards", num_shards=5, per_shard=64)
    spec = _tiny_own_spec(tmp, shards)
    work = tmp / "work"
    argv = ["jobs/pipeline.py", "--pipeline", str(spec), "--workdir", str(work), "--set", f"serve.port={free_port()}"]
    buf = io.StringIO()
    old_argv, old_path = sys.argv, list(sys.path)
    try:
        sys.argv = argv
        sys.path.insert(0, str(ROOT / "jobs"))  # as `python jobs/pipeline.py` puts the script's folder first
        with contextlib.redirect_stdout(buf):
            try:
                runpy.run_path(str(ROOT / "jobs" / "pipeline.py"), run_name="__main__")
            except SystemExit as done:
                assert not done.code, buf.getvalue()[-3000:]
    finally:
        sys.argv, sys.path[:] = old_argv, old_path
    return {"work": work, "out": buf.getvalue(), "spec": spec}


@pytest.mark.slow
def test_pipeline_runs_end_to_end_on_own_shards(own_run):
    work, out = own_run["work"], own_run["out"]
    assert "=== [10/10] serve the champion" in out
    assert out.count(SKIP_TOKENIZER) == 1 and out.count(SKIP_LM) == 1
    summary = json.loads((work / "summary.json").read_text())
    ev = summary["lm_eval"]
    assert not any(k.startswith(("geneval_", "caption_slot")) for k in ev)
    for key in ("heldout_t2i_loss", "heldout_i2t_loss", "retrieval_i2t_at1", "retrieval_t2i_at1", "frechet_vq_encoder",
                "heldout_caption_chrf_en", "heldout_caption_chrf_zh"):
        assert np.isfinite(ev[key]), key
    assert "geneval_ceiling" not in summary["image_tokenizer_eval"]
    assert summary["registry"]["promoted"] and isinstance(summary["serve"]["caption"], str)
    manifest = json.loads((work / "models" / "bundle" / "manifest.json").read_text())
    assert manifest["eval"]["retrieval_i2t_at1"] == ev["retrieval_i2t_at1"]  # what /v1/model reports
    assert (work / "eval" / "heldout" / "samples.png").is_file()

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    exp = client.get_experiment_by_name("visgen-own-tiny")
    lm_run = next(r for r in client.search_runs([exp.experiment_id]) if r.info.run_name == "lm")
    metrics = lm_run.data.metrics
    assert "final/heldout_t2i_loss" in metrics and "final/retrieval_t2i_at1" in metrics
    # the quick eval during training: chrF, and no slot accuracy on captions without shape slots
    assert any(k.endswith("caption_chrf") for k in metrics) and not any("slot_accuracy" in k for k in metrics)
    assert "eval/heldout/samples.png" in {a.path for a in client.list_artifacts(lm_run.info.run_id, "eval/heldout")}
    version = client.get_model_version_by_alias("visgen", "champion")
    assert "eval.heldout_i2t_loss" in version.tags


@pytest.mark.slow
def test_retrieval_beats_chance_on_the_trained_model_and_not_on_shuffled_pairs(own_run):
    import visgen
    from visgen.config import load_spec as load

    ev = json.loads((own_run["work"] / "models" / "bundle" / "eval.json").read_text())
    chance = ev["retrieval_chance"]
    assert chance == 0.25 and ev["retrieval_n"] == 48
    assert ev["retrieval_i2t_at1"] >= chance + 0.15, ev
    assert ev["retrieval_t2i_at1"] >= chance + 0.15, ev

    spec = load(own_run["spec"], {"workdir": str(own_run["work"])})
    pipe = visgen.Model.load(spec.paths.bundle, device="cpu")
    images, captions = generic.heldout_pairs(spec.data.ingest, spec.workdir, 48)
    ids, codes = _ids_codes(pipe, images, captions)
    perm = np.random.default_rng(0).permutation(len(ids))
    cjk = generic.cjk_table(pipe.tokenizer, pipe.lm)
    shuffled = generic.retrieval(pipe.lm, [ids[i] for i in perm], codes, 4, cjk=cjk, seed=5)
    for key in ("retrieval_i2t_at1", "retrieval_t2i_at1"):  # the true pairs are gone: chance, within noise
        assert abs(shuffled[key] - chance) < 0.2, (key, shuffled)
