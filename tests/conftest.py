"""Shared fixtures: one local Ray instance for the whole test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Keep Ray Train / Data progress bars out of test logs.
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance sized like the machine (2 CPUs in CI). Started once, shared by all tests."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=int(os.environ.get("VISGEN_TEST_CPUS", "2")), include_dashboard=False,
                 configure_logging=False, log_to_driver=True)
    yield ray
    # Left running until interpreter exit: shutting down and restarting Ray costs seconds per test.


# `make test` runs two pytest workers (`-n 2 --dist loadgroup`). The modules below drive whole
# jobs through child processes (their own `ray start` head, `ray job submit`, `jobs/*.py`) and
# spend much of their time waiting on them, so they run on one worker while every other test runs
# on the other, in file order, sharing that worker's one Ray instance.
STANDALONE_MODULES = {"test_e2e_pipeline.py", "test_own_data.py", "test_two_nodes.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        group = "standalone" if item.path.name in STANDALONE_MODULES else "session"
        item.add_marker(pytest.mark.xdist_group(group))
