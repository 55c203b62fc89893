"""Shared fixtures: one local Ray instance for the whole test session."""

from __future__ import annotations

import os

import pytest
import s3server

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
# Keep Ray Train / Data progress bars out of test logs.
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Ray Train's controller acts on its workers (start, checkpoint reports, a dead worker, the end of
# the run) only when it polls them, every 2 s by default: with a few tiny steps per run most of a
# test's run is that wait. Every Ray node the tests start (this session's, `ray start` in the
# cluster tests) inherits the shorter interval from this environment.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# One torch (OpenMP) thread per process that does not set its own count (this one, the pipelines
# and jobs the tests start; training workers, token-cache actors and Serve replicas set theirs):
# the tests' models are tiny, and on two cores shared with Ray's processes a second thread mostly
# spins at OpenMP barriers while the other waits for a core (a retrain test measured 23 s with one
# thread, 120 s with two, on a busy machine). Set before torch is imported, so it holds from the
# first test on, whatever ran before it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
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
def mlflow_db_template(tmp_path_factory):
    """An empty MLflow sqlite database, created once by the installed MLflow (its schema migrations
    cost seconds per new database). Made from the tests' working directory, like every database
    the tests' code creates, so even MLflow's 'Default' experiment reads the same."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()  # creates the tables
    return path


@pytest.fixture(scope="session")
def fresh_mlflow_db(mlflow_db_template):
    """``fresh_mlflow_db(directory)`` puts a new, empty MLflow database at ``directory/mlflow.db``
    (a copy of the session's template) and returns its path: a store of its own for a test or module
    at the cost of a file copy. The code under test opens it as it would one it created itself."""
    import shutil
    from pathlib import Path

    def put(directory) -> Path:
        target = Path(directory) / "mlflow.db"
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            raise FileExistsError(f"{target} exists already")
        shutil.copyfile(mlflow_db_template, target)
        return target

    return put


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """moto's S3 server on a loopback port (the AWS variables point at it); make buckets with ``s3.bucket()``."""
    srv = s3server.server(tmp_path_factory.mktemp("s3"))
    yield srv
    srv.stop()
