"""The model registry against a real sqlite MLflow store: register, promote, rollback, load by alias."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import visgen
from visgen.registry import CHAMPION, PREVIOUS, Registry, promote, register_bundle, resolve_alias, rollback
from visgen.tracking import TrackingConfig

from bundles import make_bundle

EVAL = {"geneval_overall": 0.625, "caption_exact": 0.25, "judge": "v1", "per_task": {"counting": 0.5}}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    a = make_bundle(tmp_path_factory.mktemp("a"), seed=0, eval_results=EVAL)
    b = make_bundle(tmp_path_factory.mktemp("b"), seed=1)
    return a, b


@pytest.fixture()
def store(tmp_path, monkeypatch):
    """A fresh sqlite store under a workdir (and no $MLFLOW_TRACKING_URI leaking in)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
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


def test_pipeline_loads_the_champion_by_alias(bundles, store, monkeypatch):
    cfg, workdir = store
    v1, v2 = (register_bundle(b, cfg, workdir) for b in bundles)
    promote(v2, cfg, workdir)
    reg = Registry.from_config(cfg, workdir)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", reg.tracking_uri)
    pipe = visgen.Pipeline.load("models:/visgen@champion", device="cpu")
    direct = visgen.Pipeline.load(bundles[1], device="cpu")
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
