"""The cluster path on one machine: `ray start --head`, then `ray job submit` of the pipeline job,
exactly as the README tells users to do on a cluster."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head():
    """A separate Ray head (own ports and temp dir) in --block mode: stopping it stops only this
    cluster, never the test session's own Ray instance."""
    import tempfile

    temp_dir = tempfile.mkdtemp(prefix="vg-ray-")  # short: Ray's socket paths must fit in 107 bytes
    gcs, dash, agent, client = (_free_port() for _ in range(4))
    # A loopback-only test cluster: token authentication off for the head and the CLI alike (Ray
    # 2.60 otherwise turns it on and the CLI needs the token; the README says how on a real cluster).
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
           "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp_dir}",
         # every fixed default port moved, so this head can run beside any other Ray on the machine
         f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
         "--disable-usage-stats"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    run_env = {**env, "RAY_ADDRESS": address}
    deadline = time.time() + 180
    while True:  # ready = the job API answers (the dashboard and the head's job agent are up)
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}: {proc.stdout.read()[-3000:]}")
        probe = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=run_env,
                               capture_output=True, text=True, timeout=60)
        if probe.returncode == 0:
            break
        if time.time() > deadline:
            os.killpg(proc.pid, 9)
            pytest.fail(f"the Ray head's job API never came up: {probe.stderr[-2000:]}")
        time.sleep(2)
    yield {"address": address, "env": run_env}
    os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
    import shutil

    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_submit_runs_the_pipeline_job(head, tmp_path):
    work = tmp_path / "work"
    submission = f"visgen-test-{int(time.time())}"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", head["address"], "--submission-id", submission,
           "--working-dir", str(ROOT), "--", "python", "jobs/pipeline.py", "--pipeline", "pipelines/shapes-tiny.yaml",
           "--workdir", str(work), "--set", f"serve.port={_free_port()}"]
    out = subprocess.run(cmd, cwd=ROOT, env=head["env"], capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-3000:]
    assert f"Job '{submission}' succeeded" in out.stdout + out.stderr
    assert "=== [10/10] serve the champion" in out.stdout
    # what the job left behind: trained, evaluated, registered and promoted
    assert json.loads((work / "eval" / "lm.json").read_text())["geneval_images"] > 0
    assert (work / "models" / "bundle" / "eval.json").is_file()
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    assert str(client.get_model_version_by_alias("visgen", "champion").version) == "1"

    # The job's record on the cluster, and the same submission id cannot run twice.
    status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", head["address"], submission],
                            env=head["env"], capture_output=True, text=True, timeout=120)
    assert "succeeded" in (status.stdout + status.stderr).lower()
    again = subprocess.run(cmd, cwd=ROOT, env=head["env"], capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "already exists" in (again.stdout + again.stderr)
