"""Caption metrics on top of the grammar's parser: known answers for perfect, partly wrong and
out-of-grammar captions, BLEU per language."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from visgen.data import captions as grammar
from visgen.data import shapes
from visgen.data.shapes import ObjectSlot, Prompt
from visgen.data.synth import make_scene
from visgen.eval.captions import caption_metrics, faithful, parse, reference_captions, slot_checks


def _scenes(language: str, n: int = 4, extra: float = 0.5):
    return [make_scene(task, seed, language=language, extra_attribute_prob=extra)
            for task in shapes.TASKS for seed in range(n)]


@pytest.mark.parametrize("language", ["en", "zh"])
def test_reference_captions_score_perfectly(language):
    scenes = _scenes(language)
    m = caption_metrics([s.caption for s in scenes], scenes)
    assert m["slot_accuracy"] == m["exact"] == m["faithful"] == m["parsed"] == 1.0
    assert all(v in (1.0, None) for v in m["slots"].values()) and m["slots"]["relation"] == 1.0
    assert m["bleu"][language] == pytest.approx(100.0)
    # Another correct wording from the grammar (synonyms, frames) is still exact, and BLEU is
    # high because the references hold several wordings.
    rng = np.random.default_rng(5)
    reworded = [grammar.make_caption(s.prompt, language, rng, explicit_count=s.task == "counting") for s in scenes]
    m2 = caption_metrics(reworded, scenes)
    assert m2["exact"] == 1.0 and 30.0 < m2["bleu"][language] <= 100.0


def test_one_wrong_colour_costs_one_of_six_items():
    truth = Prompt((ObjectSlot("star", 1, "red"), ObjectSlot("circle", 1, "blue")))
    scene = shapes.scene_for_prompt(truth, 0, task="color_attr").with_caption("a red star and a blue circle", "en")
    m = caption_metrics(["a red star and a green circle"], [scene])
    # Items: shape, count, colour for each of two objects = 6; one is wrong.
    assert m["slot_accuracy"] == pytest.approx(5 / 6)
    assert m["slots"]["color"] == 0.5 and m["slots"]["shape"] == 1.0 and m["slots"]["count"] == 1.0
    assert m["exact"] == 0.0 and m["faithful"] == 0.0 and m["parsed"] == 1.0


def test_swapped_colours_and_flipped_relations():
    attr = Prompt((ObjectSlot("star", 1, "red"), ObjectSlot("circle", 1, "blue")))
    scene = shapes.scene_for_prompt(attr, 1, task="color_attr").with_caption("a red star and a blue circle", "en")
    assert caption_metrics(["a blue star and a red circle"], [scene])["slots"]["color"] == 0.0
    pos = Prompt((ObjectSlot("star"), ObjectSlot("circle")), "left_of")
    scene = shapes.scene_for_prompt(pos, 2, task="position").with_caption("a star left of a circle", "en")
    assert caption_metrics(["a circle to the right of a star"], [scene])["slot_accuracy"] == 1.0  # same fact
    m = caption_metrics(["a star to the right of a circle"], [scene])
    assert m["slots"]["relation"] == 0.0 and m["slot_accuracy"] == pytest.approx(4 / 5)
    zh = caption_metrics(["圆形的左边有星形"], [scene], languages=["zh"])  # B的左边有A: star left of circle
    assert zh["exact"] == 1.0 and zh["faithful"] == 1.0


def test_faithful_accepts_true_extra_attributes_and_rejects_wrong_counts():
    truth = Prompt((ObjectSlot("hexagon", 3),))
    scene = shapes.scene_for_prompt(Prompt((ObjectSlot("hexagon", 3, "green", "small"),)), 3, task="counting")
    scene = dataclasses.replace(scene, prompt=truth, caption="three hexagons")  # the reference states no colour
    m = caption_metrics(["three small green hexagons"], [scene])
    assert m["exact"] == 0.0 and m["faithful"] == 1.0 and m["slot_accuracy"] == 1.0
    assert caption_metrics(["two hexagons"], [scene])["faithful"] == 0.0
    assert caption_metrics(["three red hexagons"], [scene])["faithful"] == 0.0
    assert not faithful(Prompt(()), scene)


def test_out_of_grammar_captions_are_scanned_leniently():
    scene = shapes.scene_for_prompt(Prompt((ObjectSlot("cross", 1, "pink"),)), 4, task="colors")
    scene = scene.with_caption("a pink cross", "en")
    m = caption_metrics(["well, I think I can see a pink cross here, maybe"], [scene])
    assert m["parsed"] == 0.0 and m["slot_accuracy"] == 1.0 and m["faithful"] == 1.0
    empty = caption_metrics([""], [scene])
    assert empty["slot_accuracy"] == 0.0 and empty["faithful"] == 0.0


@pytest.mark.parametrize("text,first", [("Three orange crosses below a star.", "cross"),
                                        ("一个五角星的下面有三个三角形。", "star")])
def test_a_caption_relating_a_group_is_out_of_grammar_not_a_crash(text, first):
    # A sampled caption can put a count into a relation frame; no scene has such a relation, so
    # the strict parse refuses it and the lenient one keeps its objects without the relation.
    with pytest.raises(grammar.CaptionParseError, match="is not in the"):
        grammar.parse_caption(text, strict=True)
    prompt, in_grammar = parse(text)
    assert not in_grammar and prompt.relation is None and prompt.objects[0].shape == first
    scene = shapes.scene_for_prompt(Prompt((ObjectSlot("cross", 3, "orange"),)), 1, task="counting")
    assert caption_metrics([text], [scene.with_caption("three orange crosses", "en")])["parsed"] == 0.0


def test_slot_checks_add_up_to_the_grammar_slot_accuracy():
    rng = np.random.default_rng(0)
    for i in range(300):
        truth = shapes.sample_prompt(shapes.TASKS[i % 6], rng, 0.5)
        pred = shapes.sample_prompt(shapes.TASKS[(i * 7) % 6], rng, 0.5)
        checks = slot_checks(pred, truth)
        total = sum(n for _, n in checks.values())
        assert sum(c for c, _ in checks.values()) / total == pytest.approx(grammar.slot_accuracy(pred, truth))
        assert sum(c for c, _ in slot_checks(truth, truth).values()) == total


def test_chinese_bleu_uses_character_tokens():
    scenes = _scenes("zh", 2, extra=0.0)
    near = [s.caption[:-1] + ("圆" if s.caption[-1] != "圆" else "方") for s in scenes]  # last character wrong
    m = caption_metrics(near, scenes, references=1)
    # With whitespace tokens a Chinese caption is one token and any change scores 0.
    assert 20.0 < m["bleu"]["zh"] < 100.0


def test_references_and_errors():
    scene = _scenes("en", 1)[0]
    refs = reference_captions(scene, "en", 4)
    assert refs[0] == scene.caption and len(refs) == 4
    assert all(parse(r)[0].canonical() == scene.prompt.canonical() for r in refs)
    assert reference_captions(scene, "zh", 2)[0] != scene.caption  # other language: grammar samples only
    with pytest.raises(ValueError, match="1 captions but 2 scenes"):
        caption_metrics(["x"], [scene, scene])
    with pytest.raises(ValueError, match="unknown caption language 'fr'"):
        caption_metrics(["x"], [scene], languages=["fr"])


def test_language_ok_and_per_language_numbers():
    scenes = _scenes("en", 1) + _scenes("zh", 1)
    preds = [s.caption for s in scenes]
    preds[0] = "a red 星形"   # asked in English, holds Chinese
    preds[-1] = "红色的 star"  # asked in Chinese, holds a Latin word
    m = caption_metrics(preds, scenes)
    n = len(scenes)
    assert m["language_ok"] == pytest.approx((n - 2) / n)
    assert set(m["by_language"]) == {"en", "zh"}
    for lang in ("en", "zh"):
        sub = m["by_language"][lang]
        assert sub["captions"] == n // 2 and sub["language_ok"] == pytest.approx((n // 2 - 1) / (n // 2))
        assert 0.5 < sub["slot_accuracy"] < 1.0 and sub["bleu"] == m["bleu"][lang]
    assert grammar.language_ok("3 个 red 圆形", "en") is False and grammar.language_ok("三个圆形 3", "zh")
    assert grammar.language_ok("", "zh") and grammar.language_ok("a red circle.", "en")
    with pytest.raises(ValueError, match="'fr'"):
        grammar.language_ok("x", "fr")


def test_bundle_eval_asks_each_image_in_its_reference_language(tmp_path, monkeypatch, fresh_mlflow_db):
    """The held-out benchmark as evaluate_bundle runs it (shards and GenEval stubbed): one caption per
    image in the language of its reference caption; per-language numbers reach eval/lm.json, the
    bundle manifest, MLflow and the registry tags that /v1/model reports."""
    import json

    from bundles import make_bundle
    from visgen.data import ingest
    from visgen.data.shapes import render
    from visgen.eval import bundle as bundle_eval
    from visgen.eval.captions import CaptionEvalConfig
    from visgen.inference import Model, read_manifest
    from visgen.registry import Registry
    from visgen.tracking import TrackingConfig

    scenes = [make_scene(task, seed, resolution=16, language="mixed") for task in shapes.TASKS for seed in range(3)]
    assert {s.language for s in scenes} == {"en", "zh"}
    rows = [{"image": render(s), "json": s.to_json()} for s in scenes]

    class Holdout:
        def select_columns(self, cols):
            return self

        def take(self, n):
            return rows[:n]

    monkeypatch.setattr(ingest, "build_dataset", lambda *a, **k: Holdout())
    monkeypatch.setattr(bundle_eval, "geneval_bundle", lambda pipe, cfg, out_dir, judge=None: {
        "overall": 0.25, "tasks": {"colors": {"accuracy": 0.25, "images": 2}}, "images_per_s": 1.0})
    monkeypatch.setattr(bundle_eval, "eval_identity", lambda *a: {"stub": True})
    asked = []
    real = Model.caption

    def spy(self, images, **kw):
        asked.extend(kw["language"])
        return real(self, images, **kw)

    monkeypatch.setattr(Model, "caption", spy)
    bundle = make_bundle(tmp_path / "m")
    tracking = TrackingConfig(experiment="eval-test", tracking_uri=f"sqlite:///{fresh_mlflow_db(tmp_path)}")
    full = bundle_eval.evaluate_bundle(bundle, ingest=None, geneval=None, captions=CaptionEvalConfig(samples=len(rows)),
                                       workdir=tmp_path, tracking=tracking, device="cpu")
    assert asked == [grammar.detect_language(s.caption) for s in scenes]
    keys = {"caption_slot_accuracy", "caption_slot_accuracy_en", "caption_slot_accuracy_zh", "caption_bleu_en",
            "caption_bleu_zh", "caption_language_ok"}
    assert keys <= set(full) and all(isinstance(full[k], float) for k in keys)
    assert full["caption_language_ok"] == 1.0  # guaranteed by the blocked script, even untrained
    assert full["captions"]["by_language"]["zh"]["captions"] == asked.count("zh")
    assert keys <= set(json.loads((tmp_path / "eval" / "lm.json").read_text()))
    assert keys <= set(read_manifest(bundle)["eval"])
    import mlflow

    client = mlflow.MlflowClient(tracking.tracking_uri)
    run = client.search_runs([client.get_experiment_by_name("eval-test").experiment_id])[0]
    assert {f"final/{k}" for k in keys} <= set(run.data.metrics)
    version = Registry.from_config(tracking, tmp_path).register(bundle)
    assert keys <= set(version.eval)  # what GET /v1/model answers as "eval"
