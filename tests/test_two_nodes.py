"""Two Ray nodes on one machine, as on a cluster: `ray start --head` and `ray start --address`, each
with its own temp dir, CPUs and a resource naming it. The image tokenizer trains with 2 workers
placed on different nodes (`STRICT_SPREAD`); the second node's raylet is killed mid-run, a new node
joins (what an autoscaler does), and the run finishes from its last checkpoint. The work directory
is an S3 bucket (the session's local S3 server, ``tests/s3server.py``): shards, checkpoints and the
exported model go through it, as on a cluster without a shared disk.

Runs through the job scripts as child processes (the driver joins the cluster with RAY_ADDRESS),
so it never touches the test session's own Ray instance."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from net import free_port, gcs_crashed, ray_logs, stop_group
from visgen import storage

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
STEPS, EVERY = 40, 5


def _env() -> dict:
    # Loopback-only test cluster: token authentication off for the nodes and the drivers alike.
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
           # A stopped test node exits at once: Ray 2.60's SIGTERM handler otherwise drains the node
           # for up to 30 s first (meant for Serve replicas behind a load balancer; none here).
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(k, None)
    return env


@contextmanager
def ray_node(name: str, head_port: int, head: bool):
    """One node (`ray start --block`) in its own process group and temp dir; yields (process, temp dir)."""
    temp_dir = tempfile.mkdtemp(prefix=f"vg-{name}-")  # short: Ray's socket paths must fit in 107 bytes
    args = [str(BIN / "ray"), "start", "--block", "--num-cpus=1", f"--resources={json.dumps({name: 1})}",
            f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    args += (["--head", f"--port={head_port}", "--include-dashboard=false", f"--ray-client-server-port={free_port()}"]
             if head else [f"--address=127.0.0.1:{head_port}"])
    with open(Path(temp_dir) / "ray-start.log", "w") as log:
        proc = subprocess.Popen(args, env=_env(), stdout=log, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
    try:
        time.sleep(0.5)
        if proc.poll() is not None:
            pytest.fail(f"`ray start` of {name} exited with {proc.returncode}:\n{ray_logs(temp_dir)}")
        yield proc, temp_dir
    finally:
        stop_group(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def listening(port: int, proc: subprocess.Popen, temp_dir: str, timeout: float) -> bool:
    """Whether the head's GCS port accepts connections within ``timeout`` s. False at once when its
    `ray start` exited or its GCS crashed (`ray start` itself keeps waiting for a GCS that died)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            pass
        if gcs_crashed(temp_dir):
            return False
        time.sleep(0.5)
    return False


@contextmanager
def head_node(attempts: int = 3, timeout: float = 60):
    """The head node on a fresh port, yielding (port, process, temp dir) once its GCS listens.

    A port found free can be taken again before the GCS binds it (the suite's own Ray instance and
    servers open connections all the time), and a head whose GCS does not come up cannot be
    recovered: such a head is stopped, its logs printed, and a new one started on another port."""
    failures = []
    for _ in range(attempts):
        port = free_port()
        with ray_node("nodeA", port, head=True) as (proc, temp_dir):
            if listening(port, proc, temp_dir, timeout):
                yield port, proc, temp_dir
                return
            state = f"exited with {proc.returncode}" if proc.poll() is not None else "not listening"
            failures.append(f"head on port {port} {state}:\n{ray_logs(temp_dir)}")
            print(failures[-1], flush=True)
            stop_group(proc, timeout=5)  # a `ray start` whose GCS died takes ~40 s to give up on SIGTERM
    pytest.fail(f"no head node came up in {attempts} tries:\n" + "\n".join(failures))


def wait_for_nodes(head_port: int, names: set[str], nodes: list[tuple[subprocess.Popen, str]],
                   timeout: float = 180) -> None:
    """Until the cluster has a live node holding each named resource; fails at once, with the node's
    logs, when one of ``nodes`` (process, temp dir) has exited."""
    code = ("import json, ray\nray.init(logging_level='ERROR')\n"
            "print(json.dumps(sorted(k for n in ray.nodes() if n['Alive'] for k in n['Resources'])))")
    env = {**_env(), "RAY_ADDRESS": f"127.0.0.1:{head_port}"}
    deadline, last = time.time() + timeout, ""
    while time.time() < deadline:
        for proc, temp_dir in nodes:
            if proc.poll() is not None:
                pytest.fail(f"`ray start` in {temp_dir} exited with {proc.returncode}:\n{ray_logs(temp_dir)}")
        try:
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=90)
        except subprocess.TimeoutExpired as err:
            last = f"probe timed out: {str(err.stderr)[-1500:]}"
            continue
        if out.returncode == 0 and names <= set(json.loads(out.stdout.strip().splitlines()[-1])):
            return
        last = out.stdout[-500:] + out.stderr[-1500:]
        time.sleep(1)
    logs = "\n".join(ray_logs(temp_dir) for _, temp_dir in nodes)
    pytest.fail(f"nodes {sorted(names)} never joined the cluster: {last}\n{logs}")


def raylet_pid(temp_dir: str) -> int:
    """The raylet of the node started with ``temp_dir`` (its socket lives there)."""
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"/raylet") and any(a.startswith(b"--raylet_socket_name=" + temp_dir.encode())
                                                         for a in argv):
            return pid
    raise AssertionError(f"no raylet process for the node in {temp_dir}")


def checkpoints(run_dir: str) -> list[int]:
    """Steps of the checkpoints in the bucket whose trainer.json (written last by rank 0) is there."""
    return sorted(int(name.split("_")[-1]) for name in storage.listdir(run_dir)
                  if name.startswith("checkpoint_") and storage.is_file(f"{run_dir}/{name}/trainer.json"))


@pytest.mark.slow
def test_tokenizer_workers_on_two_nodes_survive_losing_a_node(tmp_path, s3):
    t0 = time.perf_counter()

    def phase(name: str) -> None:  # where the time goes, in the -s / failure output
        print(f"[two-nodes {time.perf_counter() - t0:6.1f}s] {name}", flush=True)

    # The work directory is in the S3 bucket: the shards, the checkpoints both nodes write and read
    # back (RunConfig.storage_path) and the exported model; nothing is shared through a local disk.
    work = f"s3://{s3.bucket()}/run"
    common = ["--pipeline", "pipelines/shapes-tiny.yaml", "--workdir", work]
    train = ["jobs/train_tokenizer.py", *common, "--num-workers", "2", "--placement-strategy", "STRICT_SPREAD",
             "--steps", str(STEPS), "--checkpoint-every", str(EVERY), "--log-every", str(EVERY),
             "--max-failures", "2"]
    run_dir = f"{work}/ray_results/image_tokenizer"
    with ExitStack() as stack:
        port, head_proc, head_dir = stack.enter_context(head_node())
        head = (head_proc, head_dir)
        env = {**_env(), "RAY_ADDRESS": f"127.0.0.1:{port}", "VISGEN_CACHE_DIR": str(tmp_path / "cache")}
        wait_for_nodes(port, {"nodeA"}, [head])
        phase("head up")
        node_b = stack.enter_context(ray_node("nodeB", port, head=False))
        temp_b = node_b[1]
        # the shards while node B joins: the synth job needs the head only
        out = subprocess.run([sys.executable, "jobs/synth.py", *common], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        phase("synth job done")
        wait_for_nodes(port, {"nodeA", "nodeB"}, [head, node_b])
        phase("second node joined")

        job = subprocess.Popen([sys.executable, *train], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.time() + 600
            while not checkpoints(run_dir) and job.poll() is None and time.time() < deadline:
                time.sleep(0.2)
            assert job.poll() is None, "the run ended before its first checkpoint: " + job.stdout.read()[-3000:]
            first = checkpoints(run_dir)
            assert first and first[-1] < STEPS, first
            phase(f"first checkpoint {first}")
            os.kill(raylet_pid(temp_b), signal.SIGKILL)  # node B is gone, with the worker it held
            stack.enter_context(ray_node("nodeC", port, head=False))  # a replacement node joins
            phase("node B killed, node C started")
            text, _ = job.communicate(timeout=900)
            phase("training job done")
        finally:
            if job.poll() is None:
                job.kill()
    phase("nodes stopped")
    assert job.returncode == 0, text[-5000:]
    # the run finished all its steps, restarted from a checkpoint written before the node died
    assert f"image tokenizer: {STEPS} steps" in text, text[-3000:]
    resumed = [int(line.split("step ")[1].split(",")[0]) for line in text.splitlines() if "resumed from checkpoint_" in line]
    assert resumed and resumed[0] >= first[-1] and resumed[0] % EVERY == 0, (first, resumed, text[-3000:])
    assert checkpoints(run_dir)[-1] == STEPS
    assert storage.is_file(f"{work}/models/image_tokenizer/image_tokenizer.safetensors")
