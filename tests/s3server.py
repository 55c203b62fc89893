"""A real S3 API for the tests: moto's server on a loopback port, one per test session.

:func:`export_env` runs when the test session starts (``conftest.py``), before Ray does: it
points the standard AWS variables at a free loopback port, so that every process of the session
(the driver, Ray's workers, a second Ray node, a ``ray job`` subprocess) talks to the local
server and never to AWS. :func:`server` starts the server on that port the first time a test
asks for it (the ``s3`` fixture); tests make their own bucket (:meth:`S3Server.bucket`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from net import free_port

_PORT_VAR = "VISGEN_TEST_S3_PORT"


def export_env() -> None:
    """Point the AWS variables at this session's local S3 server (a fresh port per session)."""
    port = int(os.environ.get(_PORT_VAR) or free_port())
    os.environ[_PORT_VAR] = str(port)
    os.environ.update({
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "visgen-test",
        "AWS_SECRET_ACCESS_KEY": "visgen-test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata probing for credentials
    })
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(var, None)


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen
    log: Path
    buckets: list[str] = field(default_factory=list)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint)

    def bucket(self, prefix: str = "visgen") -> str:
        """A new, empty bucket; returns its name."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        self.buckets.append(name)
        return name

    def keys(self, bucket: str, prefix: str = "", markers: bool = False) -> list[str]:
        """The object keys under ``prefix``; without the empty ``dir/`` marker objects that
        pyarrow writes for directories unless ``markers``."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        keys = sorted(o["Key"] for page in pages for o in page.get("Contents", []))
        return keys if markers else [k for k in keys if not k.endswith("/")]

    def drop_bucket(self, bucket: str) -> None:
        """Delete every object, then the bucket itself."""
        c = self.client()
        for key in self.keys(bucket, markers=True):
            c.delete_object(Bucket=bucket, Key=key)
        c.delete_bucket(Bucket=bucket)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def server(tmp_dir: Path) -> S3Server:
    """Start moto's S3 server on the session's port and wait until it answers."""
    port = int(os.environ[_PORT_VAR])
    log = tmp_dir / "moto.log"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto's S3 server did not start on port {port}: {log.read_text()[-2000:]}")
            time.sleep(0.2)
    return S3Server(endpoint=f"http://127.0.0.1:{port}", process=proc, log=log)
