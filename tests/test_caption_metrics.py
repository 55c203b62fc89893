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
