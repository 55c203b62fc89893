"""Shared fixtures: one local Ray instance for the whole test session."""

from __future__ import annotations

import os

import pytest
import s3server

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Keep Ray Train / Data progress bars out of test logs.
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Every process of the session (Ray's workers included) talks S3 to a local server, never AWS.
s3server.export_env()


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance sized like the machine (2 CPUs in CI). Started once, shared by all tests."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=int(os.environ.get("VISGEN_TEST_CPUS", "2")), include_dashboard=False,
                 configure_logging=False, log_to_driver=True)
    yield ray
    # Left running until interpreter exit: shutting down and restarting Ray costs seconds per test.


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """moto's S3 server on a loopback port (the AWS variables point at it); make buckets with ``s3.bucket()``."""
    srv = s3server.server(tmp_path_factory.mktemp("s3"))
    yield srv
    srv.stop()
