"""GenEval-style scoring: each rule on hand-built detections with known answers, then the prompt
set and the benchmark end to end on real renders."""

from __future__ import annotations

import json
import re
from collections import Counter

import numpy as np
import pytest

from visgen.data import shapes
from visgen.data.captions import parse_caption
from visgen.data.shapes import Prompt, infer_task
from visgen.eval.geneval import (METADATA_NAME, PROMPT_SET_VERSION, PROMPTS_PER_TASK, TASKS, aggregate,
                                 build_prompt_set, judge_prompt, load_prompt_set, reference_image,
                                 relative_position, save_generations, score_folder, score_generations,
                                 validate_record, write_results)
from visgen.eval.judge import Detection


def det(shape, color, x, y, w=8.0, h=8.0, size="small"):
    """A detection centred at (x, y) with a w × h box."""
    return Detection(shape=shape, color=color, size=size, bbox=(x - w / 2, y - h / 2, x + w / 2, y + h / 2))


def rec(task, include, exclude=()):
    r = {"id": f"{task}_test", "task": task, "prompt": "-", "include": list(include)}
    if exclude:
        r["exclude"] = list(exclude)
    validate_record(r)
    return r


# -- relative position ---------------------------------------------------------------------------

def test_relative_position_directions_and_image_axes():
    centre = det("circle", "red", 32, 32)
    assert relative_position(det("square", "blue", 10, 32), centre) == {"left_of"}
    assert relative_position(det("square", "blue", 54, 32), centre) == {"right_of"}
    assert relative_position(det("square", "blue", 32, 10), centre) == {"above"}  # y grows downwards
    assert relative_position(det("square", "blue", 32, 54), centre) == {"below"}
    # A clean diagonal satisfies both components (each ~0.6 > 0.5 after the margin).
    assert relative_position(det("square", "blue", 10, 10), centre) == {"left_of", "above"}


def test_relative_position_margin():
    # Boxes 8 wide each: margin = 0.1 * (8 + 8) = 1.6 px. An offset of 1.5 px is inside the margin.
    a, b = det("circle", "red", 30.5, 32), det("square", "blue", 32, 32)
    assert relative_position(a, b) == set()
    # 2 px offset: the shrunk offset is 0.4 px, normalised 0.2 -> not > 0.5: still no relation.
    assert relative_position(det("circle", "red", 30, 32), b) == set()
    # 4 px offset: shrunk 2.4 / 4 = 0.6 > 0.5 -> left of.
    assert relative_position(det("circle", "red", 28, 32), b) == {"left_of"}
    # Bigger boxes widen the margin: the same 4 px with 16-px boxes (margin 3.2) -> 0.2, no relation.
    assert relative_position(det("circle", "red", 28, 32, 16, 16), det("square", "blue", 32, 32, 16, 16)) == set()


def test_relative_position_mostly_vertical_is_not_left():
    # dx = -6, dy = +20: the horizontal component after the margin is far below 0.5 of the offset.
    rels = relative_position(det("circle", "red", 26, 52), det("square", "blue", 32, 32))
    assert "left_of" not in rels and "below" in rels


# -- per-image verdicts ----------------------------------------------------------------------------

def test_single_object_ignores_other_objects_and_needs_the_shape():
    r = rec("single_object", [{"shape": "star", "count": 1}])
    assert judge_prompt(r, [det("star", "red", 10, 10), det("circle", "blue", 40, 40)]) == (True, "")
    ok, why = judge_prompt(r, [det("circle", "blue", 40, 40)])
    assert not ok and "expected 1 star, found 0" in why


def test_two_objects_needs_both():
    r = rec("two_objects", [{"shape": "star", "count": 1}, {"shape": "square", "count": 1}])
    assert judge_prompt(r, [det("star", "red", 10, 10), det("square", "blue", 40, 40)])[0]
    assert not judge_prompt(r, [det("star", "red", 10, 10), det("star", "blue", 40, 40)])[0]


@pytest.mark.parametrize("n_found, expected", [(2, False), (3, True), (4, False)])
def test_counting_requires_exactly_n(n_found, expected):
    r = rec("counting", [{"shape": "triangle", "count": 3}], [{"shape": "triangle", "count": 4}])
    dets = [det("triangle", "green", 8 + 12 * i, 20) for i in range(n_found)] + [det("circle", "green", 50, 50)]
    ok, why = judge_prompt(r, dets)
    assert ok is expected, why
    if n_found == 4:
        assert "fewer than 4" in why


def test_colour_is_judged_on_the_object_itself():
    r = rec("colors", [{"shape": "circle", "count": 1, "color": "red"}])
    assert judge_prompt(r, [det("circle", "red", 10, 10)])[0]
    # Red is in the image, but on the wrong object.
    ok, why = judge_prompt(r, [det("circle", "blue", 10, 10), det("square", "red", 40, 40)])
    assert not ok and "blue" in why


def test_colour_attribution_swapped_colours_fail():
    r = rec("color_attr", [{"shape": "circle", "count": 1, "color": "red"},
                           {"shape": "square", "count": 1, "color": "blue"}])
    assert judge_prompt(r, [det("circle", "red", 10, 10), det("square", "blue", 40, 40)])[0]
    ok, why = judge_prompt(r, [det("circle", "blue", 10, 10), det("square", "red", 40, 40)])
    assert not ok and "circle" in why


def test_position_rule_wrong_relation_and_margin():
    # "a circle left of a square": include 0 is the square (target), include 1 the circle.
    r = rec("position", [{"shape": "square", "count": 1}, {"shape": "circle", "count": 1, "position": ["left_of", 0]}])
    assert judge_prompt(r, [det("circle", "red", 10, 32), det("square", "blue", 50, 32)])[0]
    ok, why = judge_prompt(r, [det("circle", "red", 50, 32), det("square", "blue", 10, 32)])
    assert not ok and "right_of" in why
    ok, why = judge_prompt(r, [det("circle", "red", 30.5, 32), det("square", "blue", 32, 32)])
    assert not ok and "no clear relation" in why
    # Every detected circle must be left of the square (GenEval checks all pairs).
    assert not judge_prompt(r, [det("circle", "red", 10, 32), det("circle", "red", 60, 32), det("square", "blue", 40, 32)])[0]


def test_validate_record_names_the_problem():
    with pytest.raises(ValueError, match="task 'colours'"):
        validate_record({"id": "x", "task": "colours", "prompt": "-", "include": [{"shape": "circle", "count": 1}]})
    with pytest.raises(ValueError, match="position"):
        validate_record({"id": "x", "task": "position", "prompt": "-",
                         "include": [{"shape": "circle", "count": 1, "position": ["near", 0]}]})
    with pytest.raises(ValueError, match="count >= 1"):
        validate_record({"id": "x", "task": "counting", "prompt": "-", "include": [{"shape": "circle", "count": 0}]})


def test_aggregate_overall_is_mean_of_task_accuracies():
    a = {"task": "counting", "lang": "en"}
    b = {"task": "position", "lang": "zh"}
    out = aggregate([(a, True), (a, False), (a, False), (a, False), (b, True)])
    assert out["tasks"]["counting"]["accuracy"] == 0.25 and out["tasks"]["position"]["accuracy"] == 1.0
    assert out["overall"] == pytest.approx(0.625)  # not 2/5: each task weighs the same
    assert out["by_language"]["zh"]["overall"] == 1.0 and out["images"] == 5


# -- the prompt set ---------------------------------------------------------------------------------

def test_committed_prompt_set_is_reproducible_and_versioned():
    committed = load_prompt_set()
    assert committed == build_prompt_set(), (
        "the committed prompt set differs from what build_prompt_set() writes now (the grammar or the "
        "sampling changed): scores would no longer be comparable. Keep v1 as it is and add a new version "
        "(PROMPT_SET_VERSION, a new file) with `python -m visgen.eval.geneval --write-prompts`")
    assert {r["version"] for r in committed} == {PROMPT_SET_VERSION}
    per = Counter((r["task"], r["lang"]) for r in committed)
    assert set(per) == {(t, lang) for t in TASKS for lang in ("en", "zh")}
    assert set(per.values()) == {PROMPTS_PER_TASK}


def test_every_prompt_states_its_slots_and_languages_pair_up():
    records = load_prompt_set()
    by_id = {r["id"]: r for r in records}
    for r in records:
        slots = Prompt.from_dict(r["slots"])
        assert parse_caption(r["prompt"]).canonical() == slots.canonical(), r
        assert (r["lang"] == "zh") == bool(re.search(r"[\u4e00-\u9fff]", r["prompt"]))
        twin = by_id[r["id"][:-2] + ("zh" if r["lang"] == "en" else "en")]
        assert twin["slots"] == r["slots"] and twin["include"] == r["include"]
        assert infer_task(slots) == r["task"]
    counting = [r for r in records if r["task"] == "counting"]
    assert {r["include"][0]["count"] for r in counting} == {2, 3, 4}
    assert all(r["exclude"][0]["count"] == r["include"][0]["count"] + 1 for r in counting)
    # Balanced coverage: every shape in single_object, every relation in position.
    assert {r["include"][0]["shape"] for r in records if r["task"] == "single_object"} == set(shapes.SHAPES)
    assert {r["include"][0]["position"][0] for r in records if r["task"] == "position"} == set(shapes.RELATIONS)


def test_load_prompt_set_filters_and_rejects_bad_files(tmp_path):
    sub = load_prompt_set(tasks=["counting"], languages=["zh"], limit_per_task=5)
    assert len(sub) == 5 and {(r["task"], r["lang"]) for r in sub} == {("counting", "zh")}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "task": "counting", "prompt": "-", "include": [{"shape": "blob", "count": 1}]}\n')
    with pytest.raises(ValueError, match="'a'.*shape"):
        load_prompt_set(bad)
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_prompt_set(bad)


# -- scoring and I/O with a judge whose answers are fixed -------------------------------------------

class FixedJudge:
    """Answers from a table keyed by the image's first pixel value; a stand-in for the I/O tests."""

    fingerprint = "fixed"

    def __init__(self, answers):
        self.answers = answers
        self.accuracy = {"32": {"tasks": dict.fromkeys(TASKS, 1.0), "min": 1.0, "images": 600}}

    def detect_batch(self, images):
        return [self.answers[int(im[0, 0, 0])] for im in images]


def _two_prompts():
    counting = next(r for r in load_prompt_set(tasks=["counting"]) if r["include"][0]["count"] == 2)
    colors = load_prompt_set(tasks=["colors"], languages=["zh"], limit_per_task=1)[0]
    return counting, colors


def test_score_generations_and_folder_round_trip(tmp_path, fresh_mlflow_db):
    counting, colors = _two_prompts()
    shape, colour = colors["include"][0]["shape"], colors["include"][0]["color"]
    c_shape = counting["include"][0]["shape"]
    answers = {
        0: [det(c_shape, "red", 10, 10), det(c_shape, "red", 20, 20)],                       # right: exactly 2
        1: [det(c_shape, "red", 10, 10), det(c_shape, "red", 20, 20), det(c_shape, "red", 5, 25)],  # 3: wrong
        2: [det(shape, colour, 16, 16)],                                                     # right
    }
    images = [np.full((32, 32, 3), k, np.uint8) for k in (0, 1, 2)]
    records = [counting, counting, colors]
    from mlflow import MlflowClient

    from visgen.tracking import Tracker, TrackingConfig

    fresh_mlflow_db(tmp_path / "mlflow")
    tracker = Tracker.start(TrackingConfig(experiment="geneval-test"), tmp_path / "mlflow", "geneval")
    result = score_generations(records, images, FixedJudge(answers), tracker=tracker, step=7)
    tracker.end()
    assert result["tasks"]["counting"] == {"accuracy": 0.5, "correct": 1, "images": 2}
    assert result["tasks"]["colors"]["accuracy"] == 1.0 and result["overall"] == pytest.approx(0.75)
    assert result["judge"]["min_task_accuracy"] == 1.0 and result["resolution"] == 32
    assert result["per_image"][1]["reason"].startswith("expected fewer than 3")
    assert result["prompts"] == 2 and result["by_language"]["zh"]["overall"] == 1.0
    # logged to a real MLflow run (sqlite store under the test's workdir)
    client = MlflowClient(f"sqlite:///{(tmp_path / 'mlflow').resolve()}/mlflow.db")
    run = client.get_run(tracker.run_id)
    (point,) = client.get_metric_history(tracker.run_id, "geneval/overall")
    assert point.step == 7 and point.value == pytest.approx(0.75)
    assert "geneval/judge_min_task_accuracy" in run.data.metrics
    assert "geneval.json" in [f.path.split("/")[-1] for f in client.list_artifacts(tracker.run_id, "eval")]

    folder = save_generations(tmp_path / "gen", records, images)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [METADATA_NAME, f"{counting['id']}_0.png", f"{counting['id']}_1.png", f"{colors['id']}_0.png"])
    (folder / "stray_file_0.png").write_bytes((folder / f"{colors['id']}_0.png").read_bytes())
    from_folder = score_folder(folder, FixedJudge(answers))
    assert from_folder["overall"] == result["overall"] and from_folder["unknown_files"] == ["stray_file_0.png"]
    out = write_results(from_folder, tmp_path / "res" / "geneval.json")
    assert json.loads(out.read_text(encoding="utf-8"))["tasks"] == result["tasks"]


def test_score_generations_rejects_mismatched_inputs(tmp_path):
    counting, _ = _two_prompts()
    with pytest.raises(ValueError, match="1 prompt records but 2 images"):
        score_generations([counting], [np.zeros((32, 32, 3), np.uint8)] * 2, FixedJudge({}))
    (tmp_path / METADATA_NAME).write_text(json.dumps(counting) + "\n")
    with pytest.raises(ValueError, match="no images named"):
        score_folder(tmp_path, FixedJudge({}))


# -- the benchmark on real renders (trained judge; see tests/test_judge.py) ------------------------------

@pytest.mark.slow
def test_real_renders_score_high_and_shuffled_pairs_score_low(tmp_path_factory):
    from visgen.eval.judge import load_or_train_judge, preset

    # The same path as tests/test_judge.py: the judge is trained once per test session.
    judge = load_or_train_judge(tmp_path_factory.getbasetemp() / "judge-test-preset", preset("test"))
    records = load_prompt_set(limit_per_task=8)            # 6 tasks x 2 languages x 8 = 96 prompts
    images = [reference_image(r, 32, seed=i) for i, r in enumerate(records)]
    real = score_generations(records, images, judge)
    assert real["overall"] >= 0.99, [p for p in real["per_image"] if not p["correct"]][:5]
    assert real["judge"]["min_task_accuracy"] >= 0.99
    order = np.random.default_rng(0).permutation(len(images))
    shuffled = score_generations(records, [images[i] for i in order], judge)
    assert shuffled["overall"] < 0.35, shuffled["tasks"]


def test_evaluate_generator_batches_saves_and_scores(tmp_path):
    from visgen.eval.geneval import GenEvalConfig, evaluate_generator

    calls = []

    def generate(texts):
        calls.append(list(texts))
        return [np.zeros((32, 32, 3), np.uint8) for _ in texts]  # every image: "two red squares" below

    judge = FixedJudge({0: [det("square", "red", 8, 16), det("square", "red", 24, 16)]})
    cfg = GenEvalConfig(limit_per_task=1, languages=("en",), images_per_prompt=2, batch_size=5)
    result = evaluate_generator(generate, judge, cfg, out_dir=tmp_path / "run")
    assert sum(len(c) for c in calls) == 6 * 2 and max(len(c) for c in calls) == 5
    assert result["images"] == 12 and result["prompts"] == 6
    assert json.loads((tmp_path / "run" / "results.json").read_text(encoding="utf-8"))["overall"] == result["overall"]
    assert len(list((tmp_path / "run").glob("*.png"))) == 12
    with pytest.raises(ValueError, match="returned 0 images for 5 prompts"):
        evaluate_generator(lambda texts: [], judge, cfg)


def test_task_grids_one_sheet_per_task_with_the_prompt_under_each_image():
    from visgen.eval.geneval import build_prompt_set, reference_image, task_grids

    records = build_prompt_set(per_task=3)
    images = [reference_image(r, 32, seed=i) for i, r in enumerate(records)]
    verdicts = [i % 2 == 0 for i in range(len(records))]
    grids = task_grids(records, images, verdicts, per_task=2, scale=4)
    assert set(grids) == set(TASKS)
    for task, grid in grids.items():
        assert grid.dtype == np.uint8 and grid.shape[2] == 3
        # two cells of 128 px (32 px x 4) side by side, each with a label strip under it
        assert grid.shape[1] == 2 * (128 + 4) + 4 and grid.shape[0] > 128 + 20
        first = next(im for r, im in zip(records, images) if r["task"] == task and r["lang"] == "en")
        assert np.array_equal(grid[4:4 + 128:4, 4:4 + 128:4], first)  # the image itself, enlarged pixel for pixel
        strip = grid[4 + 128 + 2:, 4:4 + 128]
        assert (strip < 128).any()  # text was written under the image


def test_reconstruction_ceiling_is_one_for_a_lossless_tokenizer_and_zero_for_one_that_erases():
    from visgen.eval.geneval import build_prompt_set, reconstruction_ceiling
    from visgen.eval.judge import load_judge

    records = build_prompt_set(per_task=3, languages=("en",))
    judge = load_judge()
    lossless = reconstruction_ceiling(lambda x: x, judge, 32, records)
    assert lossless["overall"] == 1.0 and lossless["images"] == 18 and set(lossless["tasks"]) == set(TASKS)
    erased = reconstruction_ceiling(lambda x: np.full_like(x, 128), judge, 32, records)
    assert erased["overall"] == 0.0
