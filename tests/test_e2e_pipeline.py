"""End to end through the real entry points, as the README tells users to run them: `ray start
--head`, then `ray job submit` of `jobs/pipeline.py` on the tiny spec over generated shards plus
planted bad samples and bad shards; `serve deploy jobs/serve.yaml` of the champion it registered;
then the re-run, as `python jobs/pipeline.py`, that skips what is up to date. One full pipeline
run serves every entry point."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from net import free_port, gcs_crashed, ray_logs, stop_group

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _png(mode: str, size=(40, 40)) -> bytes:
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def plant_bad_shards(bad_dir: Path, good_shard: Path) -> dict[str, str]:
    """Write bad shards next to the good ones; returns {key or shard name: expected reason}."""
    import webdataset as wds

    bad_dir.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(bad_dir / "10000.tar")) as w:
        w.write({"__key__": "bad_jpeg", "jpg": b"\xff\xd8\xff\xe0 not really a jpeg", "txt": b"a red circle"})
        w.write({"__key__": "empty_caption", "png": _png("RGB"), "txt": b"   \n"})
        w.write({"__key__": "no_image", "txt": b"a blue square"})
        w.write({"__key__": "too_small", "png": _png("RGB", (8, 8)), "txt": b"a tiny star"})
        w.write({"__key__": "bad_utf8", "png": _png("RGB"), "txt": b"\xff\xfe\xfa caption"})
        # good ones in odd formats: must be kept
        w.write({"__key__": "palette_png", "png": _png("P"), "txt": b"a green hexagon"})
        w.write({"__key__": "upper_jpg", "JPG": _jpeg(), "json": json.dumps({"caption": "caption from json"}).encode()})
        w.write({"__key__": "with_pickle", "png": _png("LA"), "txt": b"a white cross", "pkl": b"\x80\x04cos\nsystem\n."})
    (bad_dir / "10001.tar").write_bytes(b"this is not a tar archive at all" * 40)
    data = good_shard.read_bytes()
    (bad_dir / "10002.tar").write_bytes(data[: len(data) // 2])  # truncated mid-member
    return {"bad_jpeg": "image_decode_error", "empty_caption": "caption_empty", "no_image": "image_missing",
            "too_small": "image_too_small", "bad_utf8": "caption_undecodable",
            "10001.tar": "shard_unreadable", "10002.tar": "shard_truncated"}


@contextmanager
def ray_head(attempts: int = 3):
    """A separate Ray head (own ports and temp dir) in --block mode: stopping it stops only this
    cluster, never the test session's own Ray instance. Yields a dict with the job ``address``, the
    ``env`` to run the CLI in, and ``wait_ready()``: the head starts in the background, so the caller
    can do other work while it comes up. A port found free can be taken before the head binds it; a
    head whose GCS died of that is stopped, its logs printed, and a new one started on other ports
    (``address`` and ``env`` then change, so read them after ``wait_ready()``)."""
    import requests

    # A loopback-only test cluster: token authentication off for the head and the CLI alike (Ray
    # 2.60 otherwise turns it on and the CLI needs the token; the README says how on a real cluster).
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
           "RAY_AUTH_MODE": "disabled",
           # Stopping the head at the end exits at once: Ray 2.60's SIGTERM handler otherwise drains
           # the node for up to 30 s first (meant for Serve replicas behind a load balancer; the
           # app is shut down by then).
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    head: dict = {"procs": []}

    def start() -> None:
        temp_dir = tempfile.mkdtemp(prefix="vg-ray-")  # short: Ray's socket paths must fit in 107 bytes
        gcs, dash, agent, client = (free_port() for _ in range(4))
        with open(Path(temp_dir) / "ray-start.log", "w") as log:
            proc = subprocess.Popen(
                [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
                 "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                 f"--temp-dir={temp_dir}",
                 # every fixed default port moved, so this head can run beside any other Ray on the machine
                 f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
                 "--disable-usage-stats"],
                env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        head.update(proc=proc, temp_dir=temp_dir, address=f"http://127.0.0.1:{dash}",
                    env={**env, "RAY_ADDRESS": f"http://127.0.0.1:{dash}"})
        head["procs"].append((proc, temp_dir))

    def wait_ready() -> None:
        """Until the job API answers (what `ray job list` asks: /api/version, then /api/jobs/), polled
        over HTTP from here: a `ray job list` per probe costs ~3 s of CPU the starting head needs."""
        failures: list[str] = []
        deadline, last = time.time() + 180, ""
        while True:
            proc, temp_dir = head["proc"], head["temp_dir"]
            if proc.poll() is not None or gcs_crashed(temp_dir):
                state = f"exited with {proc.returncode}" if proc.poll() is not None else "lost its GCS"
                failures.append(f"the Ray head {state}:\n{ray_logs(temp_dir)}")
                print(failures[-1], flush=True)
                stop_group(proc, timeout=5)  # a `ray start` whose GCS died takes ~40 s to give up on SIGTERM
                if len(failures) >= attempts:
                    pytest.fail("\n".join(failures))
                start()
                deadline = time.time() + 180
                continue
            try:
                version = requests.get(f"{head['address']}/api/version", timeout=10)
                jobs = requests.get(f"{head['address']}/api/jobs/", timeout=10) if version.status_code == 200 else version
                if jobs.status_code == 200 and isinstance(jobs.json(), list):
                    return
                last = f"{jobs.status_code}: {jobs.text[-2000:]}"
            except (requests.RequestException, ValueError) as err:
                last = repr(err)
            if time.time() > deadline:
                pytest.fail(f"the Ray head's job API never came up: {last}\n{ray_logs(temp_dir)}")
            time.sleep(0.5)

    head["wait_ready"] = wait_ready
    start()
    try:
        yield head
    finally:
        for proc, temp_dir in head["procs"]:
            stop_group(proc)
            shutil.rmtree(temp_dir, ignore_errors=True)


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (48, 48), (200, 30, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def serve_deploy_and_ask(head: dict, work: Path, tmp_path: Path) -> None:
    """`serve deploy jobs/serve.yaml` on the cluster, pointed at this run's registry: the champion answers."""
    import requests
    import yaml

    cfg = yaml.safe_load((ROOT / "jobs" / "serve.yaml").read_text())
    port = free_port()
    cfg["http_options"] = {"host": "127.0.0.1", "port": port}  # loopback, a free port; the rest as shipped
    app = cfg["applications"][0]
    app["args"] = {**app["args"], "pipeline": str(ROOT / "pipelines" / "shapes-tiny.yaml"),
                   "tracking_uri": f"sqlite:///{work}/mlflow.db"}
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(cfg))
    serve_cli = [str(BIN / "serve")]
    out = subprocess.run([*serve_cli, "deploy", str(config), "--address", head["address"]], env=head["env"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    try:
        url, deadline, info = f"http://127.0.0.1:{port}", time.time() + 240, None
        while time.time() < deadline and info is None:
            try:
                r = requests.get(url + "/v1/model", timeout=10)
                info = r.json() if r.status_code == 200 else None
            except requests.RequestException:
                pass
            if info is None:
                time.sleep(0.5)
        assert info is not None, "the app from serve deploy never answered /v1/model"
        assert info["version"] == "1" and info["model_uri"] == "models:/visgen@champion"
        r = requests.post(url + "/v1/generate", json={"prompt": "a red circle", "seed": 1},
                          headers={"Accept": "image/png"}, timeout=60)
        assert r.status_code == 200 and r.content.startswith(b"\x89PNG") and r.headers["X-Model-Version"] == "1"
    finally:
        # What `serve shutdown -y --address ...` sends (the request alone: no second CLI process);
        # like the CLI's exit status before, its answer does not decide the test.
        try:
            requests.delete(f"{head['address']}/api/serve/applications/", timeout=120)
        except requests.RequestException:
            pass


@pytest.mark.slow
def test_pipeline_job_end_to_end_through_ray_job_submit_then_rerun(tmp_path):
    t0 = time.perf_counter()

    def phase(name: str) -> None:  # where the time goes, in the -s / failure output
        print(f"[e2e {time.perf_counter() - t0:6.1f}s] {name}", flush=True)

    work = tmp_path / "work"
    env = {**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    py = sys.executable

    # 1) the shards first (so bad shards can be planted beside them), through the synth job (a plain
    # local job: its own Ray instance), while the Ray head for step 2 comes up in the background
    with ray_head() as head:
        out = subprocess.run([py, "jobs/synth.py", "--pipeline", "pipelines/shapes-tiny.yaml", "--workdir", str(work)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        expected = plant_bad_shards(work / "bad", work / "shards" / "00000.tar")
        phase("synth job done")

        # 2) the main job over good + bad shards (brace + glob source), submitted to a Ray cluster
        source = f"{work}/{{shards,bad}}/*.tar"
        port = free_port()
        job_args = ["jobs/pipeline.py", "--pipeline", "pipelines/shapes-tiny.yaml", "--workdir", str(work),
                    "--set", f"data.ingest.source={source}", "--set", "data.ingest.holdout_shards=1",
                    "--set", f"serve.port={port}"]
        submission = f"visgen-test-{int(time.time())}"
        head["wait_ready"]()
        phase("ray head up")
        submit = [str(BIN / "ray"), "job", "submit", "--address", head["address"], "--submission-id", submission,
                  "--working-dir", str(ROOT), "--", "python", *job_args]
        out = subprocess.run(submit, cwd=ROOT, env=head["env"], capture_output=True, text=True, timeout=1200)
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
        text = out.stdout + out.stderr
        assert f"Job '{submission}' succeeded" in text and "=== [10/10] serve the champion" in text
        first = json.loads((work / "summary.json").read_text())
        phase(f"pipeline job done: {({k: v for k, v in first.items() if k.endswith('_s')})}")
        # The recipe report reads this run's files, which nothing changes before the re-run: it runs
        # beside the checks below (its output is checked with the artifacts).
        report_proc = subprocess.Popen([py, "bench/recipe_report.py", "--workdir", str(work)], cwd=ROOT,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # the job's record on the cluster, and the same submission id cannot run twice (two
        # independent CLI calls, run side by side)
        status_proc = subprocess.Popen([str(BIN / "ray"), "job", "status", "--address", head["address"], submission],
                                       env=head["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        again_proc = subprocess.Popen(submit, cwd=ROOT, env=head["env"], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
        status_out, status_err = status_proc.communicate(timeout=120)
        again_out, again_err = again_proc.communicate(timeout=300)
        assert "succeeded" in (status_out + status_err).lower()
        assert again_proc.returncode != 0 and "already exists" in (again_out + again_err)
        phase("job record checked")
        serve_deploy_and_ask(head, work, tmp_path)
        phase("serve deploy answered")
    phase("ray head stopped")
    summary = json.loads((work / "summary.json").read_text())
    assert summary["pipeline"] == "shapes-tiny" and summary["total_s"] > 0

    # ingest: every good sample kept, every planted bad one quarantined with its reason
    import pandas as pd

    q = pd.read_parquet(work / "quarantine")
    by_key = {(r.key or Path(r.shard).name): r.reason for r in q.itertuples()}
    for name, reason in expected.items():
        assert by_key.get(name) == reason, (name, by_key.get(name), by_key)
    for good in ("palette_png", "upper_jpg"):
        assert good not in by_key
    # the pickle member is dropped unread; the sample itself is kept (a notice row, not a rejection)
    assert by_key["with_pickle"] == "member_dropped"
    ingest = summary["ingest"]
    # 3 synth shards x 48 + 3 good planted + the complete samples before the truncation point
    assert ingest["kept"] >= 3 * 48 + 3
    assert ingest["quarantined"]["image_decode_error"] == 1 and ingest["quarantined"]["shard_unreadable"] == 1
    assert "member_dropped" in text and "member_dropped" not in ingest["quarantined"]

    # artifacts of every stage
    assert (work / "text_tokenizer.json").is_file()
    assert summary["image_tokenizer"]["steps"] == 24
    ev = json.loads((work / "eval" / "image_tokenizer.json").read_text())
    assert ev["n_images"] > 0 and ev["psnr"] > 10 and 0 < ev["usage"] <= 1
    assert "mlflow ui --backend-store-uri sqlite:///" in text

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    exp = client.get_experiment_by_name("visgen-shapes-tiny")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])
            if not r.info.run_name.startswith("register-")}
    assert set(runs) == {"image_tokenizer", "lm"} and all(r.info.status == "FINISHED" for r in runs.values())
    assert "holdout/psnr" in runs["image_tokenizer"].data.metrics
    # shapes data: the judge read the tokenizer's reconstructions of real renders (the generator's ceiling)
    assert 0 <= ev["geneval_ceiling"] <= 1 and 0 <= summary["image_tokenizer_eval"]["geneval_ceiling"] <= 1
    assert "holdout/geneval_ceiling" in runs["image_tokenizer"].data.metrics

    # the transformer: trained from the token cache, the loss went down, bundle written and evaluated
    cache = json.loads((work / "token_cache" / "manifest.json").read_text())
    assert cache["image_fingerprint"] == ev["fingerprint"]
    assert summary["lm"]["steps"] == 16
    lm_hist = [m for m in client.get_metric_history(runs["lm"].info.run_id, "loss")]
    assert lm_hist[-1].value < lm_hist[0].value - 0.5, [m.value for m in lm_hist]
    bundle = work / "models" / "bundle"
    assert {"manifest.json", "lm.safetensors", "image_tokenizer.safetensors", "text_tokenizer.json",
            "eval.json"} <= {p.name for p in bundle.iterdir()}
    lm_eval = json.loads((work / "eval" / "lm.json").read_text())
    assert set(lm_eval["geneval"]["tasks"]) == {"single_object", "two_objects", "counting", "colors", "position",
                                                "color_attr"}
    assert 0 <= lm_eval["geneval_overall"] <= 1 and 0 <= lm_eval["caption_slot_accuracy"] <= 1
    assert "final/geneval_overall" in client.get_run(runs["lm"].info.run_id).data.metrics
    # the recipe report reads this run: one row per target, and the same as one JSON line
    rep_out, rep_err = report_proc.communicate(timeout=120)
    assert report_proc.returncode == 0, rep_err
    report = json.loads(rep_out.strip().splitlines()[-1])
    names = {r["name"] for r in report["rows"]}
    assert {"GenEval-shapes overall", "overall [en]", "single_object [zh]", "caption slot accuracy [en]"} <= names
    assert "targets hold" in rep_out
    grids = {a.path for a in client.list_artifacts(runs["lm"].info.run_id, "eval/geneval_grids")}
    assert grids == {f"eval/geneval_grids/{t}.png" for t in lm_eval["geneval"]["tasks"]}
    # the sampling defaults were searched on validation prompts first, and the benchmark used the choice
    search = lm_eval["sampling_search"]
    assert search["prompt_set"] == "geneval-shapes-val" and len(search["trials"]) >= 3
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["sampling_spec"]["cfg_scale"] == 2.0 and manifest["sampling_search"]["chosen"] == search["chosen"]
    # the most common training code, which sampling.object_temperature takes as the background
    assert isinstance(manifest["background_code"]["code"], int) and 0 < manifest["background_code"]["share"] <= 1
    assert {k: lm_eval["sampling"][k] for k in search["chosen"]} == search["chosen"]

    # registered, promoted, served: the app answered one generate and one caption request over HTTP
    assert summary["registry"]["promoted"] and summary["registry"]["aliases"]["champion"] == "1"
    assert str(client.get_model_version_by_alias("visgen", "champion").version) == "1"
    assert summary["serve"]["version"] in ("1", 1) and isinstance(summary["serve"]["caption"], str)

    phase("artifacts checked")
    # 3) re-running, now as a plain local job: shards and tokenizer reused, training resumes at its last step
    out = subprocess.run([py, *job_args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "skipped" in out.stdout and "up to date" in (out.stdout + out.stderr)
    assert "token cache" in out.stdout and "reused" in (out.stdout + out.stderr)
    # an unchanged model is not registered again: same bundle, same results, still version 1
    assert "bundle" in out.stderr and "is up to date" in out.stderr and "already evaluated" in out.stderr
    assert [str(v.version) for v in client.search_model_versions("name = 'visgen'")] == ["1"]
    phase("re-run done")
