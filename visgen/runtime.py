"""Connecting to Ray: the cluster in ``RAY_ADDRESS`` (or the one a Ray job runs in), else a local one."""

from __future__ import annotations

import logging
import os

log = logging.getLogger("visgen")


def init_ray(num_cpus: int | None = None) -> None:
    """Idempotent ``ray.init``. Inside ``ray job submit`` or with ``RAY_ADDRESS`` set, Ray joins that
    cluster; otherwise it starts a local one sized like this machine."""
    import ray  # ray: the CLI imports this module; only joining a cluster needs Ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    kwargs = {"ignore_reinit_error": True, "configure_logging": True, "logging_level": logging.WARNING}
    if not os.environ.get("RAY_ADDRESS") and num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    ray.init(**kwargs)
    from ray.data import DataContext  # ray.data: after ray.init, for the same reason

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    res = ray.cluster_resources()
    log.info("Ray: %s CPUs, %s GPUs", res.get("CPU", 0), res.get("GPU", 0))


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # Artifact downloads (registry, bundles) would otherwise draw a progress bar per file.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for noisy in ("urllib3", "alembic", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
