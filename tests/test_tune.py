"""The sampling search: coordinate search, its config, the validation prompts, and a real bundle tuned."""

from __future__ import annotations

import json

import pytest

from visgen.config import SpecError, validate_section
from visgen.eval.geneval import PROMPT_SET_SEED, build_prompt_set
from visgen.eval.tune import SamplingSearchConfig, coordinate_search, tune_bundle, validation_prompts
from visgen.inference import Model, read_manifest

from bundles import make_bundle


def test_coordinate_search_walks_each_axis_and_scores_each_setting_once():
    calls = []

    def score(s):
        calls.append(dict(s))
        return -(s["a"] - 2) ** 2 - (s["b"] - 3) ** 2

    best, value, trials = coordinate_search({"a": 1, "b": 1}, {"a": [0, 1, 2], "b": [3, 1]}, score)
    assert best == {"a": 2, "b": 3} and value == 0
    # (1,1) start, (0,1), (2,1), then b: (2,3); (1,1) and (2,1) are not scored again
    assert calls == [{"a": 1, "b": 1}, {"a": 0, "b": 1}, {"a": 2, "b": 1}, {"a": 2, "b": 3}]
    assert [t["score"] for t in trials] == [-5, -8, -4, 0]


def test_coordinate_search_keeps_the_start_on_ties():
    best, value, trials = coordinate_search({"a": 5}, {"a": [1, 2, 3]}, lambda s: 0.5)
    assert best == {"a": 5} and value == 0.5 and len(trials) == 4


def test_coordinate_search_moves_only_for_a_gain_above_the_margin():
    scores = {1: 0.135, 2: 0.146, 3: 0.20}  # 2 is within the margin of the start, 3 beyond it
    best, value, trials = coordinate_search({"a": 1}, {"a": [2, 3]}, lambda s: scores[s["a"]], min_gain=0.03)
    assert best == {"a": 3} and value == 0.20
    best, value, _ = coordinate_search({"a": 1}, {"a": [2]}, lambda s: scores[s["a"]], min_gain=0.03)
    assert best == {"a": 1} and value == 0.135
    best, _, _ = coordinate_search({"a": 1}, {"a": [2]}, lambda s: scores[s["a"]])  # no margin: strictly higher
    assert best == {"a": 2}


def test_config_refuses_the_benchmark_seed_and_bad_values():
    with pytest.raises(SpecError, match="benchmark prompt set's own seed"):
        validate_section(SamplingSearchConfig, {"prompt_seed": PROMPT_SET_SEED})
    with pytest.raises(SpecError, match=r"cfg_scale values must be in \[1, 50\].*0.5"):
        validate_section(SamplingSearchConfig, {"cfg_scale": [0.5, 2]})
    with pytest.raises(SpecError, match="temperature values must be in"):
        validate_section(SamplingSearchConfig, {"temperature": [0]})
    with pytest.raises(SpecError, match="top_k values must be >= 0"):
        validate_section(SamplingSearchConfig, {"top_k": [-1]})
    with pytest.raises(SpecError, match=r"object_cfg_scale values must be in \[1, 50\].*0.9"):
        validate_section(SamplingSearchConfig, {"object_cfg_scale": [0.9]})


def test_validation_prompts_are_not_the_benchmark_prompts():
    cfg = SamplingSearchConfig(prompts_per_task=48)
    val = validation_prompts(cfg)
    bench = build_prompt_set()
    assert len(val) == len(bench) and {r["version"] for r in val} == {"geneval-shapes-val"}
    same = sum(a["prompt"] == b["prompt"] for a, b in zip(val, bench))
    assert same < 0.2 * len(val), same
    assert {r["task"] for r in val} == {r["task"] for r in bench}


def test_tune_bundle_writes_the_choice_and_keeps_the_spec_section(tmp_path):
    bundle = make_bundle(tmp_path, resolution=32, ch_mult=(1, 2, 2))  # 8 x 8 tokens at 32 px, as the demo
    cfg = SamplingSearchConfig(enabled=True, cfg_scale=(1.5, 3.0), temperature=(1.0,), top_k=(0, 8),
                               prompts_per_task=1, languages=("en",))
    spec_sampling = read_manifest(bundle)["sampling"]
    result = tune_bundle(bundle, cfg, device="cpu")
    manifest = read_manifest(bundle)
    assert manifest["sampling_spec"] == spec_sampling
    assert manifest["sampling_search"]["chosen"] == result["chosen"]
    assert {k: manifest["sampling"][k] for k in result["chosen"]} == result["chosen"]
    assert result["prompts"] == 6 and len(result["trials"]) >= 3
    assert all(set(t["tasks"]) == {"single_object", "two_objects", "counting", "colors", "position", "color_attr"}
               for t in result["trials"])
    pipe = Model.load(bundle, device="cpu")
    assert pipe.sampling.cfg_scale == result["chosen"]["cfg_scale"] and pipe.sampling.top_k == result["chosen"]["top_k"]
    # a second search starts from the spec's section again, not from the first choice
    again = tune_bundle(bundle, cfg, device="cpu")
    assert again["start"] == result["start"] and json.dumps(again["chosen"]) == json.dumps(result["chosen"])


def test_the_object_guidance_axis_is_searched_after_the_layouts(tmp_path):
    bundle = make_bundle(tmp_path, resolution=32, ch_mult=(1, 2, 2))
    cfg = SamplingSearchConfig(enabled=True, cfg_scale=(3.0,), object_cfg_scale=(1.5, 6.0), temperature=(1.0,),
                               top_k=(0,), prompts_per_task=1, languages=("en",))
    with pytest.raises(ValueError, match=r"object_cfg_scale=\[1.5, 6.0\] searches .* sampling.object_temperature is null"):
        tune_bundle(bundle, cfg, device="cpu")
    m = json.loads((bundle / "manifest.json").read_text())
    m["sampling"] = {**m["sampling"], "cfg_scale": 3.0, "object_temperature": 0.0}
    m["background_code"] = {"code": 1, "share": 0.5}
    (bundle / "manifest.json").write_text(json.dumps(m))
    result = tune_bundle(bundle, cfg, device="cpu")
    assert result["start"]["object_cfg_scale"] == 3.0  # null in the spec: the layout's scale
    assert [(t["cfg_scale"], t["object_cfg_scale"]) for t in result["trials"]] == [(3.0, 3.0), (3.0, 1.5), (3.0, 6.0)]
    best = max(result["trials"], key=lambda t: t["overall"])
    assert result["validation_overall"] == best["overall"]  # the other axes have one value: the best trial wins
    assert read_manifest(bundle)["sampling"]["object_cfg_scale"] == result["chosen"]["object_cfg_scale"]
    assert Model.load(bundle, device="cpu").sampling.object_cfg_scale == result["chosen"]["object_cfg_scale"]
