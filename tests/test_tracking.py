"""The MLflow adapter: sqlite default, resume by run name, rank-0 only, and staying out of the way
when the tracking server is down (at start or mid-run). Nothing here needs Ray."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from pydantic import Field

from visgen.config import Section, SpecError, validate_section
from visgen.tracking import (TrackingConfig, Tracker, download_artifacts, flatten, is_remote_store, make_grid,
                             open_run, param_text, resolve_tracking_uri)

from net import free_port

HTTP_ENV = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """No tracking URI from the outside; HTTP bounds the tracker sets are removed again afterwards."""
    for name in ("MLFLOW_TRACKING_URI", *HTTP_ENV):
        monkeypatch.delenv(name, raising=False)
    yield
    for name in HTTP_ENV:
        os.environ.pop(name, None)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """One work directory (one sqlite database) for the module: creating the schema costs ~1.5 s."""
    return tmp_path_factory.mktemp("trackwd")


@pytest.fixture
def cfg(request) -> TrackingConfig:
    """A config with an experiment of its own per test, so tests sharing the database stay independent."""
    return TrackingConfig(experiment=f"exp-{request.node.name}", log_images_every=10)


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _warnings(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "visgen.tracking" and r.levelno >= logging.WARNING]


def _exercise_all(tracker: Tracker) -> None:
    """Call every logging method once with plausible arguments."""
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 1.0}, step=0)
    tracker.log_image(np.zeros((4, 4, 3), np.uint8), "grid", step=0)
    tracker.log_artifact(__file__)
    tracker.log_dict({"x": 1}, "d.json")
    tracker.set_tags({"t": "v"})


# -- config and helpers ----------------------------------------------------------------------

def test_config_fields_documented_and_validated():
    for name, field in TrackingConfig.model_fields.items():
        assert field.description, f"TrackingConfig.{name} has no description"
    with pytest.raises(SpecError, match="request_timeout_s"):
        validate_section(TrackingConfig, {"request_timeout_s": 0})
    with pytest.raises(SpecError, match="log_images_every"):
        validate_section(TrackingConfig, {"log_images_every": -1})
    with pytest.raises(SpecError, match="unknown key"):
        validate_section(TrackingConfig, {"experimnet": "x"})


def test_resolve_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(TrackingConfig(), "wd") == f"sqlite:///{tmp_path / 'wd' / 'mlflow.db'}"
    spec = TrackingConfig(tracking_uri="http://mlflow.example:5000")
    assert resolve_tracking_uri(spec, "wd") == "http://mlflow.example:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/db.sqlite")
    assert resolve_tracking_uri(spec, "wd") == "sqlite:////elsewhere/db.sqlite"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "  ")  # blank means unset
    assert resolve_tracking_uri(spec, "wd") == "http://mlflow.example:5000"


class _Inner(Section):
    dims: list[int] = Field([1, 2], description="d")
    on: bool = Field(True, description="o")


class _Outer(Section):
    name: str = Field("m", description="n")
    inner: _Inner = Field(default_factory=_Inner, description="i")
    note: str | None = Field(None, description="x")


def test_flatten_spec_to_params():
    assert flatten(_Outer()) == {"name": "m", "inner.dims": "[1, 2]", "inner.on": "true", "note": "null"}
    nested = {"lm": {"layers": np.int64(4), "lr": 1e-4, "opt": {}}, "tok": _Inner(on=False), "path": Path("/a/b")}
    assert flatten(nested, sep="/") == {"lm/layers": "4", "lm/lr": "0.0001", "lm/opt": "{}",
                                        "tok/dims": "[1, 2]", "tok/on": "false", "path": "/a/b"}
    with pytest.raises(TypeError, match="mapping"):
        flatten([1, 2])


def test_param_text_and_store_kinds():
    """The public helpers the registry shares: one spelling of values, one idea of a remote store."""
    assert [param_text(v) for v in ("a b", 3, 0.5, True, None, [1, 2], {"k": "v"}, np.int64(4))] == \
        ["a b", "3", "0.5", "true", "null", "[1, 2]", '{"k": "v"}', "4"]
    assert flatten({"x": {"y": True}}) == {"x.y": param_text(True)}
    assert all(is_remote_store(u) for u in ("http://h:5000", "HTTPS://h", "databricks", "databricks-uc://p"))
    assert not any(is_remote_store(u) for u in ("sqlite:///tmp/m.db", "/tmp/mlruns", "file:///tmp/mlruns"))


def test_open_run_creates_resumes_and_downloads(workdir, cfg, tmp_path):
    """open_run: a run that must exist (raises instead of disabling); download_artifacts reads runs:/ URIs."""
    uri = resolve_tracking_uri(cfg, workdir)
    client, run_id, params = open_run(cfg, uri, workdir, "reg-1", {"kind": ["a", 1]})
    assert params == {} and client.get_run(run_id).data.tags["kind"] == '["a", 1]'
    client.log_param(run_id, "p", "1")
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "f.txt").write_text("hello")
    client.log_artifacts(run_id, str(tmp_path / "files"), "bundle")
    client.set_terminated(run_id, "FINISHED")
    again, same, held = open_run(cfg, uri, workdir, "reg-1")
    assert same == run_id and held == {"p": "1"} and again.get_run(run_id).info.status == "RUNNING"
    # local store: the experiment's artifacts live under the workdir
    assert client.get_run(run_id).info.artifact_uri.startswith((workdir / "mlartifacts").resolve().as_uri())
    local = download_artifacts(f"runs:/{run_id}/bundle", tmp_path / "dl", tracking_uri=uri)
    assert (local / "f.txt").read_text() == "hello"


def test_make_grid_layout():
    imgs = np.stack([np.full((3, 4, 3), i + 1, np.uint8) for i in range(5)])  # (5, 3, 4, 3)
    grid = make_grid(imgs, nrow=2, padding=1, pad_value=255)
    assert grid.shape == (3 * 4 + 1, 2 * 5 + 1, 3) and grid.dtype == np.uint8
    assert (grid[1:4, 1:5] == 1).all() and (grid[1:4, 6:10] == 2).all()  # row 0: images 0, 1
    assert (grid[9:12, 1:5] == 5).all() and (grid[9:12, 6:10] == 255).all()  # row 2: image 4, empty cell
    assert (grid[0] == 255).all() and (grid[:, 5] == 255).all()  # padding lines
    gray = make_grid(np.zeros((2, 5, 5), np.uint8), nrow=8, padding=0)
    assert gray.shape == (5, 10, 3)
    with pytest.raises(TypeError, match="uint8"):
        make_grid(imgs.astype(np.float32))
    with pytest.raises(ValueError, match=r"\(B>0, H, W, 1\|3\)"):
        make_grid(np.zeros((2, 4, 4, 4), np.uint8))


# -- sqlite default --------------------------------------------------------------------------

def test_sqlite_default_round_trip(workdir, cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in the CWD
    long_value = "x" * 7000
    tracker = Tracker.start(cfg, workdir, "rt", params={"model.dim": 64, "long": long_value}, tags={"stage": "vq"})
    assert tracker.active and tracker.run_id
    tracker.log_metrics({"loss": 2.0, "lr": np.float32(1e-3)}, step=0)
    tracker.log_metrics({"loss": 1.5}, step=10)
    grid = make_grid(np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), nrow=2)
    tracker.log_image(grid, "recon", step=10)
    ckpt = tmp_path / "ckpt"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"weights")
    (ckpt / "sub" / "opt.pt").write_bytes(b"opt")
    tracker.log_artifact(ckpt, "checkpoints/step_10")
    tracker.log_artifact(ckpt / "model.safetensors")
    tracker.log_dict({"fid": np.float64(12.5), "ok": True}, "eval/results")
    tracker.set_tags({"note": "hello"})
    tracker.end()
    assert not tracker.active
    tracker.log_metrics({"loss": 0.0}, step=20)  # after end: ignored, no error

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = _client(uri)
    run = client.get_run(tracker.run_id)
    assert run.info.run_name == "rt" and run.info.status == "FINISHED"
    assert run.data.params["model.dim"] == "64" and run.data.params["long"] == long_value[:6000]
    assert run.data.tags["stage"] == "vq" and run.data.tags["note"] == "hello"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(0, 2.0), (10, 1.5)]
    assert run.data.metrics["lr"] == pytest.approx(1e-3)

    exp = client.get_experiment_by_name(cfg.experiment)
    assert exp.artifact_location == (workdir / "mlartifacts").as_uri()
    assert list(tmp_path.glob("mlruns*")) == [] and not (tmp_path / "mlflow.db").exists()
    assert {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints/step_10")} == {
        "checkpoints/step_10/model.safetensors", "checkpoints/step_10/sub"}
    dst = tmp_path / "dl"
    dst.mkdir()
    assert Path(client.download_artifacts(run.info.run_id, "model.safetensors", str(dst))).read_bytes() == b"weights"
    results = json.loads(Path(client.download_artifacts(run.info.run_id, "eval/results.json", str(dst))).read_text())
    assert results == {"fid": 12.5, "ok": True}
    pngs = [a.path for a in client.list_artifacts(run.info.run_id, "images") if a.path.endswith(".png")]
    assert len(pngs) == 1 and "recon" in pngs[0] and "step+10" in pngs[0]
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(client.download_artifacts(run.info.run_id, pngs[0], str(dst)))), grid)


def test_resume_by_run_name_appends(workdir, cfg, caplog):
    first = Tracker.start(cfg, workdir, "resumable", params={"lr": 0.1, "steps": 100})
    first.log_metrics({"loss": 3.0}, step=0)
    first.log_metrics({"loss": 2.0}, step=1)
    first.end("KILLED")
    other = Tracker.start(cfg, workdir, "another-run")
    assert other.run_id != first.run_id
    other.end()

    with caplog.at_level(logging.WARNING, logger="visgen.tracking"):
        again = Tracker.start(cfg, workdir, "resumable", params={"lr": 0.1, "steps": 200, "new": "yes"})
    assert again.active and again.run_id == first.run_id
    changed = _warnings(caplog)
    assert len(changed) == 1 and "steps" in changed[0].getMessage() and "lr" not in changed[0].getMessage()
    again.log_params({"lr": 0.1})  # same value again: silently fine
    again.log_metrics({"loss": 1.0}, step=2)
    client = again._client
    assert client.get_run(again.run_id).info.status == "RUNNING"
    again.end()

    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.1", "steps": "100", "new": "yes"}
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [3.0, 2.0, 1.0]

    client.delete_run(first.run_id)  # a deleted run is never resumed
    fresh = Tracker.start(cfg, workdir, "resumable")
    assert fresh.active and fresh.run_id != first.run_id
    fresh.end()


def test_run_names_with_quotes_resume(workdir, cfg):
    for name in ("it's", 'say "hi"'):
        a = Tracker.start(cfg, workdir, name)
        a.end()
        b = Tracker.start(cfg, workdir, name)
        assert b.run_id == a.run_id
        b.end()
    with pytest.raises(ValueError, match="not both"):
        Tracker.start(cfg, workdir, """it's "both" """)
    with pytest.raises(ValueError, match="non-empty"):
        Tracker.start(cfg, workdir, " ")


def test_env_tracking_uri_overrides_spec(workdir, cfg, tmp_path, monkeypatch):
    # The spec points at a server that does not exist; the environment must win over it.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    spec = cfg.model_copy(update={"tracking_uri": f"http://127.0.0.1:{free_port()}"})
    own = tmp_path / "own-workdir"
    tracker = Tracker.start(spec, own, "from-env")
    assert tracker.active
    tracker.log_metrics({"m": 1.0}, step=0)
    tracker.end()
    run = _client(f"sqlite:///{workdir / 'mlflow.db'}").get_run(tracker.run_id)
    assert run.info.run_name == "from-env" and run.data.metrics == {"m": 1.0}
    assert not (own / "mlflow.db").exists()


def test_context_manager_marks_failure(workdir, cfg):
    with pytest.raises(RuntimeError), Tracker.start(cfg, workdir, "crashes") as tracker:
        raise RuntimeError("boom")
    assert _client(f"sqlite:///{workdir / 'mlflow.db'}").get_run(tracker.run_id).info.status == "FAILED"


def test_inactive_trackers_log_nothing(tmp_path, cfg):
    for tracker in (Tracker.start(cfg, tmp_path, "r", params={"a": 1}, rank=1),
                    Tracker.start(cfg.model_copy(update={"enabled": False}), tmp_path, "r", params={"a": 1})):
        assert not tracker.active and tracker.run_id is None
        assert not tracker.wants_images(0)
        _exercise_all(tracker)
        tracker.log_image("not an image", "bad name!", step=0)  # arguments are not even looked at
        with tracker:
            pass
    assert list(tmp_path.iterdir()) == []  # no database, no artifact folder


def test_wants_images_and_bad_images(workdir, cfg):
    tracker = Tracker.start(cfg, workdir, "imgs")
    assert tracker.wants_images(0) and tracker.wants_images(20) and not tracker.wants_images(15)
    with pytest.raises(ValueError, match=r"uint8 array of shape \(H, W, 3\)"):
        tracker.log_image(np.zeros((4, 4, 3), np.float32), "grid", step=0)
    with pytest.raises(ValueError, match="may only use"):
        tracker.log_image(np.zeros((4, 4, 3), np.uint8), "grid:1", step=0)
    with pytest.raises(TypeError, match="'loss'"):
        tracker.log_metrics({"loss": [1.0, 2.0]}, step=0)
    with pytest.raises(TypeError, match="step must be an int"):
        tracker.log_metrics({"loss": 1.0}, step=None)
    assert tracker.active  # caller bugs raise; they do not switch tracking off
    tracker.end()
    assert not tracker.wants_images(0)
    assert not Tracker.start(cfg.model_copy(update={"log_images_every": 0}), workdir, "imgs").wants_images(0)


def test_failure_mid_run_warns_once_then_no_op(workdir, cfg, caplog, tmp_path):
    from mlflow.exceptions import MlflowException

    tracker = Tracker.start(cfg, workdir, "flaky")
    calls = []

    def broken(*args, **kwargs):
        calls.append(args)
        raise MlflowException("store went away")

    client = tracker._client
    client.log_batch = broken  # instance attribute: only this tracker's client breaks
    with caplog.at_level(logging.WARNING, logger="visgen.tracking"):
        tracker.log_metrics({"loss": 1.0}, step=0)
        assert not tracker.active
        _exercise_all(tracker)
        tracker.end("FAILED")
    assert len(calls) == 1
    warns = _warnings(caplog)
    assert len(warns) == 1 and "store went away" in warns[0].getMessage()
    assert client.get_run(tracker.run_id).info.status == "RUNNING"  # end() was a no-op too

    missing = Tracker.start(cfg, workdir, "missing-artifact")  # a missing file is skipped, tracking stays on
    missing.log_artifact(tmp_path / "nope.bin")
    assert missing.active
    missing.end()


def test_server_down_at_start(cfg, tmp_path, caplog):
    port = free_port()  # bound and released: nothing listens there
    spec = cfg.model_copy(update={"tracking_uri": f"http://127.0.0.1:{port}", "request_timeout_s": 2.0})
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="visgen.tracking"):
        tracker = Tracker.start(spec, tmp_path, "offline", params={"a": 1}, tags={"b": 2})
        elapsed = time.perf_counter() - t0
        _exercise_all(tracker)
        tracker.end()
    assert elapsed < 10, f"start against a dead server took {elapsed:.1f} s"
    assert not tracker.active and tracker.run_id is None
    warns = _warnings(caplog)
    assert len(warns) == 1 and f"127.0.0.1:{port}" in warns[0].getMessage()
    # The bounds for MLflow's HTTP client are in place for any later client in this process.
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "2" and os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"


# -- a real tracking server ------------------------------------------------------------------

def _stop(proc: subprocess.Popen) -> None:
    """Terminate the server's process group (the server forks uvicorn and a job runner)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)
    except ProcessLookupError:
        pass


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on a free loopback port with proxied artifacts; yields (uri, process)."""
    port = free_port()
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
             "--artifacts-destination", str(tmp_path / "server-artifacts")],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not come up (exit code {proc.poll()}):\n{log.read_text()[-3000:]}")
                time.sleep(0.3)
        yield uri, proc
    finally:
        _stop(proc)


@pytest.mark.slow
def test_real_server_round_trip_then_server_dies(mlflow_server, cfg, tmp_path, caplog):
    uri, proc = mlflow_server
    spec = cfg.model_copy(update={"tracking_uri": uri, "request_timeout_s": 2.0})
    workdir = tmp_path / "wd"
    tracker = Tracker.start(spec, workdir, "served", params=flatten({"vq": {"dim": 8}}))
    assert tracker.active
    tracker.log_metrics({"loss": 1.0}, step=0)
    tracker.log_image(make_grid(np.zeros((2, 4, 4, 3), np.uint8), nrow=2), "recon", step=0)
    tracker.log_dict({"ok": 1}, "manifest")
    tracker.log_artifact(__file__, "code")
    tracker.end()
    resumed = Tracker.start(spec, workdir, "served", params={"vq.dim": 8})
    assert resumed.run_id == tracker.run_id
    resumed.log_metrics({"loss": 0.5}, step=1)

    client = _client(uri)
    run = client.get_run(tracker.run_id)
    assert run.data.params == {"vq.dim": "8"} and run.info.status == "RUNNING"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "loss")] == [1.0, 0.5]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"manifest.json", "code", "images"}
    assert json.loads(Path(client.download_artifacts(run.info.run_id, "manifest.json", str(tmp_path))).read_text()) == {"ok": 1}
    assert not (workdir / "mlflow.db").exists()  # the server owns storage; nothing written locally

    _stop(proc)  # the server dies mid-run
    with caplog.at_level(logging.WARNING, logger="visgen.tracking"):
        t0 = time.perf_counter()
        resumed.log_metrics({"loss": 0.25}, step=2)
        elapsed = time.perf_counter() - t0
        _exercise_all(resumed)
        resumed.end()
    assert elapsed < 10, f"a log call against a dead server took {elapsed:.1f} s"
    assert not resumed.active and len(_warnings(caplog)) == 1
