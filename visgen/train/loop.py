"""The training loop every trainer shares, on Ray Train V2: the driver side (:func:`fit`).

A model family plugs in as a :class:`TrainTask` (build modules, one optimisation step on a
batch, a quick eval, an export); :func:`fit` does the rest, the same way for all of them:

* sizes the worker group from the cluster and fails fast when it cannot fit (``scaling.py``);
* feeds the training split (``Feed``): read into memory once when it fits
  (``train.data_in_memory``; one copy per node in the object store, a fresh permutation every
  epoch from the seed) or streamed from Ray Data (split evenly over workers); a background
  thread runs the task's ``collate`` and pins the tensors, and the copy to the device starts
  one step ahead on a side stream; task logs stay tensors until ``log_every``, so no step
  waits for the device;
* runs ``TorchTrainer``: DDP on gloo (CPU) or NCCL (GPU), bf16 autocast on GPU;
* every ``log_every`` steps logs step, losses (averaged over the interval and the workers),
  lr, images/s and ETA on rank 0, to the log and to MLflow (``Tracker``; Ray's MLflow
  callback does not work with Train V2);
* every ``eval_every`` steps and at the end, rank 0 runs the task's quick eval on a fixed
  held-out batch and logs its metrics and image grid;
* every ``checkpoint_every`` steps and at the end writes a checkpoint (``checkpoint.py``),
  keeps the newest ``keep_checkpoints``, and on a restart (``FailureConfig(max_failures)``)
  or a re-run with the same run name resumes from the latest one: the step counter, the
  optimiser moments and the RNG streams continue, and the LR schedule of the current config
  picks up at that step.

``num_workers=0`` runs the loop in the driver process (Ray Train local mode). Ray does not
persist local-mode checkpoints, so there the loop writes them to the same
``<storage_path>/<run_name>/checkpoint_<step>`` layout itself, and resumes from it.

In memory, the order of an epoch is a function of (seed, epoch) and checkpoints record the
batch reached, so a resumed run continues the interrupted epoch exactly where it stopped. The
stream is not seekable: there a resumed run starts a fresh pass over the training split
(``Progress.epoch`` counts completed passes), so the samples an interrupted pass had already
delivered are seen once more.

Modules: :mod:`visgen.train.task` (what a trainer plugs in, the worker environment),
:mod:`visgen.train.feed` (training split -> batches on the device), :mod:`visgen.train.worker`
(what each worker runs), this one (the driver: sizing, the feed's source, ``TorchTrainer``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from visgen import storage
from visgen.runtime import init_ray
from visgen.train.checkpoint import Progress, child, latest_checkpoint, read_progress
from visgen.train.config import ScalingConfig, TrainConfig
from visgen.train.feed import resolve_in_memory
from visgen.train.scaling import resolve_scaling
# What trainers import from here: the task interface and the worker's fault-injection hook.
from visgen.train.task import EvalResult, LRSchedule, Trainable, TrainTask, WorkerEnv, decay_groups
from visgen.train.worker import CrashAt, train_worker

__all__ = ["CrashAt", "EvalResult", "FitResult", "LRSchedule", "Trainable", "TrainTask", "WorkerEnv", "decay_groups",
           "fit", "read_run_progress"]

log = logging.getLogger("visgen.train")


@dataclass
class FitResult:
    run_dir: Path | str  # a URL when the checkpoints are in an object store
    step: int
    resumed_from: int | None
    metrics: dict[str, float]  # the last logged interval
    eval: dict[str, float]  # the final quick eval
    history: list[dict[str, float]]  # every logged interval since the (re)start, with its "step"
    checkpoint: Path | str | None
    export_dir: Path | str | None
    mlflow_run_id: str | None
    wall_s: float


def fit(task: TrainTask, *, train: TrainConfig, scaling: ScalingConfig, run_name: str, storage_path: str | Path,
        datasets: Mapping[str, Any], eval_batch: Mapping[str, np.ndarray] | None = None,
        tracking: Any = None, workdir: str | Path | None = None, params: Mapping[str, Any] | None = None,
        export_dir: str | Path | None = None, crash_at: CrashAt | None = None,
        data_size_hint: int | None = None) -> FitResult:
    """Train ``task`` on ``datasets["train"]`` with Ray Train; resume ``run_name`` if it has checkpoints.

    Checkpoints go to ``<storage_path>/<run_name>/``: a local or shared-filesystem path, or an
    object store URL (``s3://bucket/run/ray_results``) that every node reaches; ``export_dir`` too.
    ``eval_batch`` is the fixed held-out batch of the quick eval (rank 0). ``tracking`` is a
    ``TrackingConfig`` (None = no MLflow; needs ``workdir``); ``params`` are logged as MLflow
    params (flattened); ``export_dir`` receives ``task.export`` at the end. ``crash_at`` is a
    test hook. ``data_size_hint``: an estimate of the training split's bytes in memory, known
    without reading it (see :func:`resolve_in_memory`). Raises ``InsufficientResourcesError`` at
    once when the workers cannot fit.
    """
    import ray  # ray.train: only the driver's fit needs it; workers import this module too
    import ray.train
    from ray.train.torch import TorchTrainer

    if "train" not in datasets:
        raise ValueError(f"fit needs a 'train' dataset; got {sorted(datasets)}")
    if not run_name or "/" in run_name:
        raise ValueError(f"run_name must be a non-empty name without '/', got {run_name!r}")
    if tracking is not None and workdir is None:
        raise ValueError("fit: tracking needs the pipeline workdir (where mlflow.db and mlartifacts live)")
    if not ray.is_initialized():
        init_ray()
    resources = resolve_scaling(scaling)  # raises InsufficientResourcesError before anything waits
    world = max(1, resources.num_workers)
    if train.batch_size % world:
        raise ValueError(f"train.batch_size={train.batch_size} does not divide over {world} workers; "
                         f"use a multiple of {world} (batch_size is the global batch)")
    storage_loc = storage.location(storage_path)  # a local path or an object store URL (Ray takes both)
    run_dir = child(storage_loc, run_name)
    log.info("training %s as run %r: %s, global batch %d (%d per worker), %d steps; checkpoints in %s",
             task.name, run_name, resources.describe(), train.batch_size, train.batch_size // world, train.steps, run_dir)
    for note in resources.notes:
        log.info("scaling: %s", note)

    ds = {k: (v.select_columns(list(task.columns)) if task.columns and k == "train" else v) for k, v in datasets.items()}
    # The training split in memory (train.data_in_memory): read here once, put in the object
    # store once, mapped by every worker of a node without a copy; else streamed to the workers.
    in_memory, why = resolve_in_memory(ds["train"], train, data_size_hint)
    if in_memory is not None:
        log.info("feed: the training split is in memory (%s); batches reshuffled every epoch with seed %d",
                 why, train.seed)
        in_memory_ref = ray.put(in_memory)
        del in_memory, ds["train"]
    else:
        log.info("feed: streaming the training split from Ray Data (%s)", why)
        in_memory_ref = None
    loop_config = dict(task=task, train=train, resources=resources, run_name=run_name, run_dir=str(run_dir),
                       train_in_memory=in_memory_ref,
                       eval_batch=dict(eval_batch) if eval_batch is not None else None, tracking=tracking,
                       workdir=str(workdir) if workdir is not None else None, params=dict(params or {}),
                       export_dir=str(export_dir) if export_dir is not None else None, crash_at=crash_at)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=resources.to_ray(),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage_loc,
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=train.keep_checkpoints)),
        datasets=ds,
        # Only the training stream is split over workers; any other dataset reaches every
        # worker whole (ray.train.get_dataset_shard(name) in task code).
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"] if "train" in ds else []),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    summary = result.return_value or {}
    ckpt = summary.get("checkpoint")
    return FitResult(run_dir=run_dir, step=int(summary.get("step", 0)), resumed_from=summary.get("resumed_from"),
                     metrics=summary.get("metrics", {}), eval=summary.get("eval", {}),
                     history=summary.get("history", []),
                     checkpoint=_path_or_url(ckpt) if ckpt else None,
                     export_dir=_path_or_url(summary["export_dir"]) if summary.get("export_dir") else None,
                     mlflow_run_id=summary.get("mlflow_run_id"), wall_s=time.perf_counter() - t0)


def _path_or_url(loc: str) -> Path | str:
    return loc if storage.is_url(loc) else Path(loc)


def read_run_progress(run_dir: str | Path) -> Progress | None:
    """Progress of the newest checkpoint of a run directory, or None when it has none."""
    latest = latest_checkpoint(run_dir)
    return read_progress(latest)[0] if latest is not None else None
