"""Loopback ports and process groups for the tests that start servers (Serve, the MLflow server,
Ray heads and nodes)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM the process group of ``proc`` (started with ``start_new_session=True``), SIGKILL it
    when it has not exited within ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def ray_logs(temp_dir: str) -> str:
    """A Ray node's `ray start` output (``ray-start.log``, where the tests write it) and its GCS and
    raylet logs, each cut to its start (a crash's reason) and end, for a failure message."""
    root = Path(temp_dir)
    parts = []
    for path in [root / "ray-start.log", *sorted(root.glob("session_latest/logs/gcs_server.*")),
                 *sorted(root.glob("session_latest/logs/raylet.*"))]:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        if len(text) > 2500:  # a crash puts its reason first and a stack trace after it
            text = f"{text[:1200]}\n[...]\n{text[-1200:]}"
        parts.append(f"--- {path.relative_to(root)}\n{text}")
    return "\n".join(parts) or f"(no logs in {temp_dir})"


def gcs_crashed(temp_dir: str) -> bool:
    """Whether the GCS of the head started with ``temp_dir`` died on a failed check, for example
    because a port found free was taken before it bound it; its `ray start --block` keeps waiting."""
    return any("Check failed" in p.read_text(errors="replace")
               for p in Path(temp_dir).glob("session_latest/logs/gcs_server.err"))
