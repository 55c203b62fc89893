"""Scheduled retraining: no-op without new shards, continue + evaluate + gate with them, one at a time."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from visgen import stages
from visgen.config import load_spec
from visgen.models.gpt import VisGPT, save_gpt
from visgen.models.vq import VQModel, save_vq
from visgen.registry import Registry
from visgen.retrain import RetrainConfig, retrain

SPEC = "pipelines/shapes-tiny.yaml"
pytestmark = pytest.mark.slow  # trains and evaluates a few tiny challengers (~2 min)


def _spec(work, source=None, **over):
    overrides = {"workdir": str(work), "lm.train.eval_samples": 4, "lm.recipe.eval_images": 2,
                 "eval.geneval.limit_per_task": 1, "eval.geneval.languages": ["en"], "eval.captions.samples": 8, **over}
    if source:
        overrides["data.ingest.source"] = source
    return load_spec(SPEC, overrides)


@pytest.fixture(scope="module")
def champion(ray_session, tmp_path_factory, fresh_mlflow_db):
    """A registered champion trained on the tiny spec's 3 shards (untrained weights: the gate is what is tested)."""
    work = tmp_path_factory.mktemp("retrain") / "w"
    fresh_mlflow_db(work)
    spec = _spec(work)
    stages.synth(spec)
    stages.text_tokenizer(spec)
    torch.manual_seed(0)
    save_vq(VQModel(spec.image_tokenizer.model), spec.paths.models / "image_tokenizer")
    save_gpt(VisGPT(spec.lm.model), spec.paths.models / "lm")
    stages.bundle(spec)
    published = stages.publish(spec)
    assert published["promoted"] and published["aliases"] == {"champion": published["version"]}
    return work


def _add_shards(work, name: str, seed: int) -> str:
    spec = _spec(work, **{"data.synth.output": str(work / name), "data.synth.seed": seed, "data.synth.num_shards": 1})
    stages.synth(spec)
    return str(work / name)


def test_nothing_new_is_a_no_op(champion):
    out = retrain(_spec(champion))
    assert out["status"] == "nothing_new" and out["new_shards"] == [] and out["champion"] == "1"
    assert Registry.from_config(_spec(champion).tracking, champion).aliases() == {"champion": "1"}
    assert not any((champion / "retrain").glob("*/bundle"))


def test_new_shards_train_evaluate_and_promote_or_refuse(champion):
    _add_shards(champion, "new1", seed=11)
    source = f"{champion}/{{shards,new1}}/*.tar"
    out = retrain(_spec(champion, source), RetrainConfig(steps=4, warmup_steps=1, margin=-1.0))
    assert out["status"] == "promoted", out
    assert out["new_shards"] == [f"{champion}/new1/00000.tar"] and out["steps"] == 4
    reg = Registry.from_config(_spec(champion).tracking, champion)
    assert reg.aliases() == {"champion": out["challenger"], "previous": "1"}
    decision = json.loads(next((champion / "retrain").glob("*/decision.json")).read_text())
    assert decision["challenger"] == out["challenger"]
    # both were scored on the same held-out set: same prompts and images counted
    run = next(p for p in (champion / "retrain").iterdir() if (p / "decision.json").is_file())
    a, b = (json.loads((run / "eval" / who / "lm.json").read_text()) for who in ("challenger", "champion"))
    assert a["geneval_images"] == b["geneval_images"] and a["caption_images"] == b["caption_images"]

    # the new champion has seen everything: nothing to do
    assert retrain(_spec(champion, source))["status"] == "nothing_new"

    # rollback: the old champion is back, and the data it has not seen was already tried from it
    assert reg.rollback() == {"champion": "1", "previous": out["challenger"]}
    again = retrain(_spec(champion, source))
    assert again["status"] == "already_tried" and again["challenger"] == out["challenger"]

    # more data, a margin nothing can reach: registered, not promoted, and the version says why
    _add_shards(champion, "new2", seed=12)
    source2 = f"{champion}/{{shards,new1,new2}}/*.tar"
    refused = retrain(_spec(champion, source2), RetrainConfig(steps=2, warmup_steps=0, margin=1.0))
    assert refused["status"] == "rejected" and "< margin 1" in refused["reason"]
    assert refused["reason"].startswith("geneval_overall (higher is better, margin 1)")
    assert refused["challenger_score"] is not None and refused["champion_score"] is not None
    assert reg.aliases()["champion"] == "1"
    assert reg.version(refused["challenger"]).tags["visgen.gate"] == f"rejected: {refused['reason']}"


def test_two_retrains_at_once_only_one_runs(champion):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from visgen.retrain import retrain_lock\n"
         "with retrain_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)", str(champion)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.perf_counter()
        out = retrain(_spec(champion))
        assert out["status"] == "busy" and f"pid {holder.pid}" in out["reason"]
        assert time.perf_counter() - t0 < 5  # refused at once, not queued
    finally:
        holder.kill()
        holder.wait()
    assert retrain(_spec(champion))["status"] in ("nothing_new", "already_tried")  # the lock died with its holder
