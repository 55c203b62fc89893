"""The model registry against a real sqlite MLflow store: register, promote, rollback, load by alias,
and the one promotion rule (``promote_if_better``) that the pipeline's publish stage applies."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import visgen
from visgen import stages
from visgen.config import SpecError, load_spec
from visgen.inference import write_bundle_eval
from visgen.registry import (CHAMPION, GATE_TAG, PREVIOUS, Registry, gate_decision, promote, register_bundle,
                             resolve_alias, rollback)
from visgen.retrain import RetrainConfig
from visgen.tracking import TrackingConfig

from bundles import make_bundle

EVAL = {"geneval_overall": 0.625, "caption_exact": 0.25, "judge": "v1", "per_task": {"counting": 0.5}}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    a = make_bundle(tmp_path_factory.mktemp("a"), seed=0, eval_results=EVAL)
    b = make_bundle(tmp_path_factory.mktemp("b"), seed=1)
    return a, b


@pytest.fixture()
def store(tmp_path, monkeypatch, fresh_mlflow_db):
    """A fresh sqlite store under a workdir (and no $MLFLOW_TRACKING_URI leaking in)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    fresh_mlflow_db(tmp_path / "work")
    return TrackingConfig(experiment="registry-test"), tmp_path / "work"


def test_register_creates_a_version_with_eval_tags_and_the_bundle_as_its_files(bundles, store, tmp_path):
    cfg, workdir = store
    v = register_bundle(bundles[0], cfg, workdir, tags={"data": "shapes-tiny"})
    assert v == "1"
    reg = Registry.from_config(cfg, workdir)
    assert reg.tracking_uri == f"sqlite:///{workdir.resolve()}/mlflow.db"
    info = reg.version(v)
    assert info.eval == {"geneval_overall": "0.625", "caption_exact": "0.25", "judge": "v1"}  # headline numbers only
    assert info.tags["data"] == "shapes-tiny" and len(info.tags["bundle_sha256"]) == 64
    m = json.loads((bundles[0] / "manifest.json").read_text())
    assert info.tags["lm.fingerprint"] == m["lm"]["fingerprint"]
    assert info.source.startswith((workdir.resolve() / "mlartifacts").as_uri()) and info.source.endswith("/bundle")
    files = reg.download(v, tmp_path / "dl")
    for f in bundles[0].iterdir():
        assert (files / f.name).read_bytes() == f.read_bytes(), f.name
    run = reg.client.get_run(info.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["eval.geneval_overall"] == 0.625
    # Same files again: the existing version, not a duplicate.
    assert register_bundle(bundles[0], cfg, workdir) == "1"
    assert register_bundle(bundles[1], cfg, workdir) == "2"
    assert reg.version("2").tags["eval.status"] == "not evaluated"


def test_promote_keeps_the_previous_champion_and_rollback_swaps_back(bundles, store):
    cfg, workdir = store
    v1, v2 = (register_bundle(b, cfg, workdir) for b in bundles)
    assert promote(v1, cfg, workdir) == {CHAMPION: v1}
    assert promote(v1, cfg, workdir) == {CHAMPION: v1}  # already champion: nothing moves
    assert promote(v2, cfg, workdir) == {CHAMPION: v2, PREVIOUS: v1}
    assert resolve_alias(cfg, workdir) == v2 and resolve_alias(cfg, workdir, PREVIOUS) == v1
    assert rollback(cfg, workdir) == {CHAMPION: v1, PREVIOUS: v2}
    assert rollback(cfg, workdir) == {CHAMPION: v2, PREVIOUS: v1}  # a second rollback redoes it


def test_model_loads_the_champion_by_alias(bundles, store, monkeypatch):
    cfg, workdir = store
    v1, v2 = (register_bundle(b, cfg, workdir) for b in bundles)
    promote(v2, cfg, workdir)
    reg = Registry.from_config(cfg, workdir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", reg.tracking_uri)
    pipe = visgen.Model.load("models:/visgen@champion", device="cpu")
    direct = visgen.Model.load(bundles[1], device="cpu")
    assert pipe.info()["lm_fingerprint"] == direct.info()["lm_fingerprint"]
    np.testing.assert_array_equal(pipe.generate("a red circle", seed=3)[0], direct.generate("a red circle", seed=3)[0])
    loaded = reg.load(reg.resolve_uri("models:/visgen@champion").version)
    assert loaded.source == f"models:/visgen/{v2}"
    assert reg.resolve_uri(f"models:/visgen/{v1}").eval["geneval_overall"] == "0.625"


def test_bad_bundles_and_references_are_refused_with_a_reason(bundles, store, tmp_path):
    cfg, workdir = store
    reg = Registry.from_config(cfg, workdir)
    with pytest.raises(LookupError, match="no alias 'champion'.*visgen promote"):
        reg.resolve()
    with pytest.raises(LookupError, match="no 'previous' alias"):
        reg.rollback()
    with pytest.raises(FileNotFoundError, match="not a visgen bundle"):
        reg.register(tmp_path)
    partial = tmp_path / "partial"
    shutil.copytree(bundles[0], partial)
    (partial / "lm.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="lacks lm.safetensors"):
        reg.register(partial)
    pickled = tmp_path / "pickled"
    shutil.copytree(bundles[0], pickled)
    (pickled / "extra.pt").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="pickle-format files"):
        reg.register(pickled)
    v = reg.register(bundles[0]).version
    with pytest.raises(LookupError, match=r"version 7 .* does not exist \(versions: 1"):
        reg.promote(7)
    for bad in ("0", "x", -1):
        with pytest.raises(ValueError, match="positive integer"):
            reg.version(bad)
    with pytest.raises(ValueError, match="must look like"):
        reg.resolve_uri("runs:/abc/bundle")
    with pytest.raises(ValueError, match="names model 'other'"):
        reg.resolve_uri("models:/other@champion")
    assert reg.aliases() == {} and v == "1"


# -- the promotion rule ---------------------------------------------------------------------------

NAN = float("nan")
GATE_CASES = [
    # metric, challenger score, champion (version, score), margin, direction -> promoted, words in the reason
    ("geneval_overall", None, ("1", 0.5), 0.0, "higher", False, "never replaces a scored champion"),
    ("geneval_overall", NAN, ("1", 0.5), -1.0, "higher", False, "non-finite score (nan)"),
    ("geneval_overall", 0.4, ("1", None), 0.0, "higher", True, "champion v1 has no score"),
    ("geneval_overall", 0.4, ("1", NAN), 0.0, "higher", True, "the scored challenger replaces it"),
    ("geneval_overall", None, ("1", None), 0.0, "higher", False, "keeping the champion"),
    ("geneval_overall", None, None, 0.0, "higher", True, "no champion yet"),
    ("geneval_overall", 0.5, ("1", 0.5), 0.0, "higher", True, "improvement +0.0000 >= margin 0"),
    ("geneval_overall", 0.49, ("1", 0.5), 0.0, "higher", False, "improvement -0.0100 < margin 0"),
    ("geneval_overall", 0.6, ("1", 0.5), 0.1, "higher", True, ">= margin 0.1"),
    ("geneval_overall", 0.59, ("1", 0.5), 0.1, "higher", False, "< margin 0.1"),
    ("heldout_t2i_loss", 2.0, ("1", 2.5), 0.0, "lower", True, "challenger v2 2.0000 vs champion v1 2.5000"),
    ("heldout_t2i_loss", 2.5, ("1", 2.0), 0.0, "lower", False, "improvement -0.5000 < margin 0"),
    ("heldout_t2i_loss", 2.2, ("1", 2.5), 0.5, "lower", False, "improvement +0.3000 < margin 0.5"),
    ("heldout_t2i_loss", 2.6, ("1", 2.5), -0.2, "lower", True, "improvement -0.1000 >= margin -0.2"),
    ("heldout_t2i_loss", 2.0, ("2", 2.0), 0.5, "lower", True, "already the champion"),
]


@pytest.mark.parametrize("metric, new, champ, margin, direction, promoted, words", GATE_CASES)
def test_gate_decision(metric, new, champ, margin, direction, promoted, words):
    champion, old = champ if champ is not None else (None, None)
    d = gate_decision(metric, "2", new, champion, old, margin, direction)
    assert d.promote is promoted and words in d.reason, d.reason
    if champion is not None and champion != "2":  # the reason names the metric and its direction
        assert d.reason.startswith(f"{metric} ({direction} is better, margin {margin:g})"), d.reason


def test_gate_spec_takes_any_metric_and_a_direction():
    cfg = RetrainConfig()
    assert (cfg.gate_metric, cfg.gate_direction, cfg.margin) == ("geneval_overall", "higher", 0.0)
    assert RetrainConfig(gate_metric="heldout_t2i_loss", gate_direction="lower", margin=0.05).gate_direction == "lower"
    for bad, words in [({"gate_direction": "up"}, "'higher' or 'lower'"), ({"gate_metric": ""}, "gate_metric"),
                       ({"gate_metric": "a b"}, "gate_metric"), ({"margin": float("nan")}, "margin")]:
        with pytest.raises(SpecError, match=words):
            load_spec("pipelines/shapes-tiny.yaml", {f"retrain.{k}": v for k, v in bad.items()})
    for bad in [dict(direction="up"), dict(metric=" "), dict(margin=NAN)]:
        args = {"metric": "m", "margin": 0.0, "direction": "higher", **bad}
        with pytest.raises(ValueError, match="gate (direction|metric|margin)"):
            gate_decision(args["metric"], "2", 1.0, "1", 0.5, args["margin"], args["direction"])


def test_publish_applies_the_gate_of_the_spec(bundles, store, tmp_path):
    """stages.publish: an unevaluated bundle never replaces an evaluated champion; metric, direction
    and margin come from the spec's retrain section; the decision is tagged on the version."""
    _, workdir = store

    def publish(bundle, **gate):
        spec = load_spec("pipelines/shapes-tiny.yaml", {"workdir": str(workdir), **{f"retrain.{k}": v for k, v in gate.items()}})
        shutil.rmtree(spec.paths.bundle, ignore_errors=True)
        shutil.copytree(bundle, spec.paths.bundle)
        return stages.publish(spec)

    def scored(name: str, results: dict):
        d = tmp_path / name
        shutil.copytree(bundles[1], d)
        write_bundle_eval(d, results)
        return d

    first = publish(bundles[0])  # geneval_overall 0.625, no champion yet
    assert first["promoted"] and first["aliases"] == {CHAMPION: first["version"]} and "no champion yet" in first["reason"]
    unscored = publish(bundles[1])
    assert not unscored["promoted"] and unscored["aliases"] == {CHAMPION: first["version"]}
    assert ("geneval_overall (higher is better" in unscored["reason"] and "0.6250" in unscored["reason"]
            and "no score" in unscored["reason"]), unscored["reason"]
    reg = Registry.from_config(TrackingConfig(experiment="visgen-shapes-tiny"), workdir)
    assert reg.version(unscored["version"]).tags[GATE_TAG].startswith("rejected: geneval_overall")

    lower = dict(gate_metric="heldout_t2i_loss", gate_direction="lower")
    worse, better = scored("worse", {"heldout_t2i_loss": 3.0}), scored("better", {"heldout_t2i_loss": 2.0})
    out = publish(worse, **lower)  # the champion has no heldout_t2i_loss: the scored bundle replaces it
    assert out["promoted"] and out["champion_score"] is None and out["challenger_score"] == 3.0
    out = publish(better, margin=1.5, **lower)  # 3.0 -> 2.0 is an improvement of 1.0 < 1.5
    assert not out["promoted"] and "improvement +1.0000 < margin 1.5" in out["reason"]
    out = publish(better, margin=0.5, **lower)  # the same version, gated again with a smaller margin
    assert out["promoted"] and out["aliases"][CHAMPION] == out["version"] and out["direction"] == "lower"
    # A metric neither has: the champion stays, and the reason says what the challenger does have.
    out = publish(bundles[0], gate_metric="retrieval_i2t_at1")
    assert not out["promoted"] and out["aliases"][CHAMPION] == reg.resolve().version != out["version"]
    assert "keeping the champion" in out["reason"] and "geneval_overall" in out["reason"], out["reason"]
