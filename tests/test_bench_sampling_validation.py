"""bench/sampling_validation.py on a tiny bundle: each row is the judge's score of what
Model.generate draws for that setting on the validation prompts, per seed set."""

from __future__ import annotations

import json

import pytest

from bench import sampling_validation as bench
from tests.bundles import make_bundle
from visgen.data import shapes
from visgen.eval.geneval import score_generations
from visgen.eval.judge import load_judge
from visgen.eval.tune import SamplingSearchConfig, validation_prompts
from visgen.inference import Model


def test_rows_are_the_judges_scores_of_each_setting_and_seed_set(tmp_path, capsys):
    bundle = make_bundle(tmp_path)
    settings = [{}, {"cfg_scale": 1.5, "top_k": 4}]
    rows = bench.main(["--bundle", str(bundle), "--settings", json.dumps(settings), "--prompts-per-task", "1",
                       "--seed-sets", "2", "--threads", "1"])
    assert [r["setting"] for r in rows] == settings and all(r["images"] == 12 for r in rows)  # 6 tasks x 2 languages
    assert all(len(r["overall"]) == len(r["tasks"]) == len(r["empty"]) == 2 for r in rows)
    assert all(set(t) == set(shapes.TASKS) for r in rows for t in r["tasks"])
    assert all(0 <= e <= 12 for r in rows for e in r["empty"])
    # seed set 2 of the second setting, recomputed through the public API
    cfg = SamplingSearchConfig(prompts_per_task=1)
    records = validation_prompts(cfg)
    images = Model.load(bundle, device="cpu").generate([r["prompt"] for r in records], seed=cfg.image_seed + 1_000_000,
                                                        **settings[1])
    want = score_generations(records, images, load_judge(None))
    assert rows[1]["overall"][1] == pytest.approx(want["overall"], abs=1e-4)
    assert rows[1]["empty"][1] == sum(not im["detections"] for im in want["per_image"])
    assert rows[1]["mean"] == pytest.approx(sum(rows[1]["overall"]) / 2, abs=1e-4)
    single = [(im["correct"], r["slots"]["objects"][0]["shape"]) for r, im in zip(records, want["per_image"])
              if r["task"] == "single_object"]
    assert rows[1]["single_by_shape"][1] == {s: [sum(ok for ok, t in single if t == s), sum(t == s for _, t in single)]
                                              for s in sorted({t for _, t in single})}
    assert len(capsys.readouterr().out.strip().splitlines()) == 2  # one JSON line per setting


@pytest.mark.parametrize("argv, words", [
    (["--settings", "{not json"], "--settings is not JSON"),
    (["--settings", "{}"], "must be a non-empty JSON list of objects"),
    (["--settings", "[]"], "must be a non-empty JSON list of objects"),
    (["--seed-sets", "0"], "--seed-sets and --prompts-per-task must be >= 1, got 0 and 64"),
])
def test_bad_arguments_are_refused(argv, words, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--bundle", "x", *argv])
    assert words in capsys.readouterr().err
