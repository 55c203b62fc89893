"""The training loop every trainer shares, on Ray Train V2.

A model family plugs in as a :class:`TrainTask` (build modules, one optimisation step on a
batch, a quick eval, an export); :func:`fit` does the rest, the same way for all of them:

* sizes the worker group from the cluster and fails fast when it cannot fit (``scaling.py``);
* runs ``TorchTrainer`` with the training split as a Ray Data stream (split evenly over
  workers), DDP on gloo (CPU) or NCCL (GPU), bf16 autocast on GPU;
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

The data stream is not seekable: a resumed run starts a fresh pass over the training split
(``Progress.epoch`` counts completed passes), so the samples an interrupted pass had already
delivered are seen once more.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from visgen.train.checkpoint import (
    Progress, checkpoint_dir_name, latest_checkpoint, list_checkpoints, load_checkpoint, prune_checkpoints,
    read_progress, save_checkpoint, seed_everything,
)
from visgen.train.config import ScalingConfig, TrainConfig
from visgen.train.scaling import WorkerResources, resolve_scaling

log = logging.getLogger("visgen.train")


# ---------------------------------------------------------------------------------------------
# What a trainer plugs in
# ---------------------------------------------------------------------------------------------
@dataclass
class Trainable:
    """What a task builds on each worker.

    ``modules``: the unwrapped modules, by name; they are checkpointed, exported and evaluated
    (rank 0 evaluates alone, so never through a DDP wrapper). ``param_groups``: one AdamW
    optimiser per entry, built by the loop from :class:`TrainConfig` (see :func:`decay_groups`).
    """

    modules: dict[str, torch.nn.Module]
    param_groups: dict[str, list[dict[str, Any]]]


@dataclass
class EvalResult:
    metrics: dict[str, float] = field(default_factory=dict)
    images: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (H, W, 3) uint8
    texts: dict[str, Any] = field(default_factory=dict)  # name -> JSON-able samples (e.g. captions)


class TrainTask:
    """A model family's part of training. Instances are pickled to the workers before
    :meth:`setup`, so ``__init__`` should keep only configs (no tensors, no Ray handles)."""

    name = "task"
    #: dataset columns the task reads; the trainer drops the rest before streaming.
    columns: tuple[str, ...] = ()
    #: logs shown in the progress line (all logs go to MLflow); default: every key with "loss".
    log_keys: tuple[str, ...] = ()

    def setup(self, env: "WorkerEnv") -> Trainable:
        """Build the modules on ``env.device``; wrap the ones trained with DDP through ``env.prepare``."""
        raise NotImplementedError

    def train_step(self, batch: dict[str, np.ndarray], env: "WorkerEnv", step: int) -> dict[str, float]:
        """One optimisation step on this worker's share of the batch, through ``env.optimizer_step``.

        Forward passes run under ``env.autocast()``. Returns float logs; every rank must return
        the same keys (they are averaged over workers). ``step`` counts completed steps.
        """
        raise NotImplementedError

    def evaluate(self, env: "WorkerEnv", batch: dict[str, np.ndarray], step: int) -> EvalResult:
        """Rank 0 only: metrics and images on the fixed held-out ``batch``, on the unwrapped modules."""
        return EvalResult()

    def export(self, env: "WorkerEnv", directory: Path) -> Path:
        """Rank 0 only, at the end: write the trained model for downstream stages; returns the directory."""
        raise NotImplementedError


def decay_groups(module: torch.nn.Module, weight_decay: float, **extra: Any) -> list[dict[str, Any]]:
    """AdamW groups: decay on every tensor of 2 or more dims (matrices, conv kernels, embeddings),
    none on biases and norm gains, whose decay only pulls offsets and scales to 0 (nanoGPT's
    rule). ``extra`` goes into both groups (e.g. a per-module lr)."""
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim >= 2]
    other = [p for p in module.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay, **extra},
              {"params": other, "weight_decay": 0.0, **extra}]
    return [g for g in groups if g["params"]]


class LRSchedule:
    """Linear warmup to 1, then cosine to ``min_ratio`` at ``total`` (or constant): a multiplier of lr.

    A class, not a closure, so ``LambdaLR.state_dict`` records its fields as plain data.
    """

    def __init__(self, warmup: int, total: int, kind: str, min_ratio: float):
        self.warmup, self.total, self.kind, self.min_ratio = warmup, total, kind, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant" or self.total <= self.warmup:
            return 1.0
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


# ---------------------------------------------------------------------------------------------
# The per-worker environment handed to the task
# ---------------------------------------------------------------------------------------------
class WorkerEnv:
    """Device, rank, precision and the optimisers of one worker; distributed details live here."""

    def __init__(self, train: TrainConfig, device: torch.device, rank: int = 0, world_size: int = 1,
                 distributed: bool = False):
        self.train, self.device, self.rank, self.world_size = train, device, rank, world_size
        self.distributed = distributed and world_size > 1
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR] = {}
        self.bf16 = train.precision == "bf16" and device.type == "cuda"

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    def prepare(self, module: torch.nn.Module, sync_buffers: bool = True, **ddp_kwargs: Any) -> torch.nn.Module:
        """Move to the device and, with more than one worker, wrap in DDP (Ray's ``prepare_model``).

        ``sync_buffers=False`` skips DDP's per-forward broadcast of rank 0's buffers, for modules
        that keep their buffers identical across ranks themselves.
        """
        if not self.distributed:
            return module.to(self.device)
        import inspect

        import ray.train.torch
        from torch.nn.parallel import DistributedDataParallel

        if not sync_buffers:  # newer torch renamed the flag; ask the installed one which it takes
            new_name = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
            ddp_kwargs["forward_sync_buffers" if new_name else "broadcast_buffers"] = False
        return ray.train.torch.prepare_model(module, move_to_device=self.device, parallel_strategy_kwargs=ddp_kwargs)

    def autocast(self) -> contextlib.AbstractContextManager:
        # bf16 needs no loss scaling. CPU runs stay fp32: they are the small-scale reference path.
        if self.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def build_optimizers(self, groups: Mapping[str, list[dict[str, Any]]]) -> None:
        tc = self.train
        self._schedule = LRSchedule(tc.warmup_steps, tc.steps, tc.schedule, tc.min_lr_ratio)
        self._peak_lrs: dict[str, list[float]] = {}
        for name, g in groups.items():
            opt = torch.optim.AdamW(g, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay,
                                    fused=self.device.type == "cuda")
            self.optimizers[name] = opt
            self._peak_lrs[name] = [group["lr"] for group in opt.param_groups]
            self.schedulers[name] = torch.optim.lr_scheduler.LambdaLR(opt, self._schedule)

    def reapply_schedule(self) -> None:
        """After loading a checkpoint: the LR schedule (peak lr, warmup, steps, shape) is the one
        of the *current* config, so extending ``steps`` on resume re-shapes the remaining decay;
        the position in it (the step counter) comes from the checkpoint. With an unchanged
        config this reproduces the saved learning rates exactly."""
        tc = self.train
        # A new object: LambdaLR.load_state_dict wrote the saved fields into the old one.
        self._schedule = LRSchedule(tc.warmup_steps, tc.steps, tc.schedule, tc.min_lr_ratio)
        for name, sched in self.schedulers.items():
            peaks = self._peak_lrs[name]
            sched.lr_lambdas = [self._schedule] * len(peaks)
            sched.base_lrs = list(peaks)
            factor = self._schedule(sched.last_epoch)
            for group, peak in zip(sched.optimizer.param_groups, peaks):
                group["initial_lr"], group["lr"] = peak, peak * factor
            sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]

    def optimizer_step(self, name: str, loss: torch.Tensor) -> float:
        """Zero this optimiser's grads, backprop ``loss``, clip, step. Returns the pre-clip grad norm.

        Zeroing first (not after) drops gradients another loss left on these parameters, e.g.
        the generator loss backpropagating through a GAN discriminator.
        """
        opt = self.optimizers[name]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        clip = self.train.grad_clip if self.train.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip) if params else torch.zeros(())
        opt.step()
        return float(norm)

    def step_schedulers(self) -> None:
        # Once per global step for every optimiser, so each lr is a function of the step alone even
        # when an optimiser skips steps (a discriminator before it switches on); torch warns about
        # exactly that skip.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            for s in self.schedulers.values():
                s.step()

    def lr(self) -> float:
        first = next(iter(self.optimizers.values()), None)
        return float(first.param_groups[0]["lr"]) if first is not None else 0.0

    def mean_over_workers(self, values: Mapping[str, float]) -> dict[str, float]:
        if not self.distributed or not values:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64 if self.device.type == "cpu" else torch.float32,
                         device=self.device)
        dist.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist())}


# ---------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CrashAt:
    """Fault injection for tests: rank ``rank`` exits hard after step ``step``, once (``marker`` records it)."""

    step: int
    rank: int
    marker: str


@dataclass
class FitResult:
    run_dir: Path
    step: int
    resumed_from: int | None
    metrics: dict[str, float]  # the last logged interval
    eval: dict[str, float]  # the final quick eval
    history: list[dict[str, float]]  # every logged interval since the (re)start, with its "step"
    checkpoint: Path | None
    export_dir: Path | None
    mlflow_run_id: str | None
    wall_s: float


def fit(task: TrainTask, *, train: TrainConfig, scaling: ScalingConfig, run_name: str, storage_path: str | Path,
        datasets: Mapping[str, Any], eval_batch: Mapping[str, np.ndarray] | None = None,
        tracking: Any = None, workdir: str | Path | None = None, params: Mapping[str, Any] | None = None,
        export_dir: str | Path | None = None, crash_at: CrashAt | None = None) -> FitResult:
    """Train ``task`` on ``datasets["train"]`` with Ray Train; resume ``run_name`` if it has checkpoints.

    Checkpoints go to ``<storage_path>/<run_name>/`` (a local or shared-filesystem path).
    ``eval_batch`` is the fixed held-out batch of the quick eval (rank 0). ``tracking`` is a
    ``TrackingConfig`` (None = no MLflow; needs ``workdir``); ``params`` are logged as MLflow
    params (flattened); ``export_dir`` receives ``task.export`` at the end. ``crash_at`` is a
    test hook. Raises ``InsufficientResourcesError`` at once when the workers cannot fit.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    if "train" not in datasets:
        raise ValueError(f"fit needs a 'train' dataset; got {sorted(datasets)}")
    if not run_name or "/" in run_name:
        raise ValueError(f"run_name must be a non-empty name without '/', got {run_name!r}")
    if tracking is not None and workdir is None:
        raise ValueError("fit: tracking needs the pipeline workdir (where mlflow.db and mlartifacts live)")
    if not ray.is_initialized():
        from visgen.runtime import init_ray

        init_ray()
    resources = resolve_scaling(scaling)  # raises InsufficientResourcesError before anything waits
    world = max(1, resources.num_workers)
    if train.batch_size % world:
        raise ValueError(f"train.batch_size={train.batch_size} does not divide over {world} workers; "
                         f"use a multiple of {world} (batch_size is the global batch)")
    storage = Path(storage_path).expanduser().resolve()
    run_dir = storage / run_name
    log.info("training %s as run %r: %s, global batch %d (%d per worker), %d steps; checkpoints in %s",
             task.name, run_name, resources.describe(), train.batch_size, train.batch_size // world, train.steps, run_dir)
    for note in resources.notes:
        log.info("scaling: %s", note)

    ds = {k: (v.select_columns(list(task.columns)) if task.columns and k == "train" else v) for k, v in datasets.items()}
    loop_config = dict(task=task, train=train, resources=resources, run_name=run_name, run_dir=str(run_dir),
                       eval_batch=dict(eval_batch) if eval_batch is not None else None, tracking=tracking,
                       workdir=str(workdir) if workdir is not None else None, params=dict(params or {}),
                       export_dir=str(export_dir) if export_dir is not None else None, crash_at=crash_at)
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=loop_config,
        scaling_config=resources.to_ray(),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=str(storage),
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=train.keep_checkpoints)),
        datasets=ds,
        # Only the training stream is split over workers; any other dataset reaches every
        # worker whole (ray.train.get_dataset_shard(name) in task code).
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    summary = result.return_value or {}
    ckpt = summary.get("checkpoint")
    return FitResult(run_dir=run_dir, step=int(summary.get("step", 0)), resumed_from=summary.get("resumed_from"),
                     metrics=summary.get("metrics", {}), eval=summary.get("eval", {}),
                     history=summary.get("history", []),
                     checkpoint=Path(ckpt) if ckpt else None,
                     export_dir=Path(summary["export_dir"]) if summary.get("export_dir") else None,
                     mlflow_run_id=summary.get("mlflow_run_id"), wall_s=time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------
def _setup_worker_logging() -> None:
    # Ray worker processes have no handler on the root logger, so INFO lines would vanish.
    if not logging.getLogger().handlers and not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        log.addHandler(h)
    log.setLevel(logging.INFO)


def _device(resources: WorkerResources) -> torch.device:
    if not resources.use_gpu:
        return torch.device("cpu")
    if resources.local_mode:
        if not torch.cuda.is_available():
            raise RuntimeError("use_gpu is set but torch sees no CUDA device in the driver process")
        return torch.device("cuda", torch.cuda.current_device())
    import ray.train.torch

    return ray.train.torch.get_device()


def _train_worker(config: dict) -> dict:
    import ray.train

    _setup_worker_logging()
    resources: WorkerResources = config["resources"]
    # Intra-op threads = the CPUs this worker holds (Ray's own default for fractional CPUs is
    # one thread; in local mode the driver would otherwise use every core and fight Ray Data).
    threads_before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(resources.cpus_per_worker)))
    try:
        return _train_worker_body(config, ray.train.get_context())
    finally:
        torch.set_num_threads(threads_before)  # matters in local mode: this is the driver process


def _train_worker_body(config: dict, ctx) -> dict:
    task: TrainTask = config["task"]
    tc: TrainConfig = config["train"]
    resources: WorkerResources = config["resources"]
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = _device(resources)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores: the usual speed knob
        torch.backends.cudnn.allow_tf32 = True
    env = WorkerEnv(tc, device, rank, world, distributed=dist.is_available() and dist.is_initialized())
    run_dir = Path(config["run_dir"])

    # Same seed on every rank for the initial weights (DDP also broadcasts rank 0's), then one
    # stream per rank for dropout, restarts, shuffling.
    seed_everything(tc.seed)
    trainable = task.setup(env)
    env.build_optimizers(trainable.param_groups)
    seed_everything(tc.seed + rank)
    progress, resumed_from, unmanaged = _maybe_resume(env, trainable, run_dir, tc, resources.local_mode)

    tracker = _start_tracker(config, rank)
    try:
        summary = _run_steps(config, task, env, trainable, progress, tracker, run_dir, unmanaged)
    except BaseException:
        tracker.end("FAILED")
        raise
    summary.update(resumed_from=resumed_from, mlflow_run_id=tracker.run_id)
    tracker.end("FINISHED")
    return summary


def _maybe_resume(env: WorkerEnv, trainable: Trainable, run_dir: Path, tc: TrainConfig,
                  local_mode: bool) -> tuple[Progress, int | None, Path | None]:
    """Load the newest checkpoint of the run, if any.

    Returns ``(progress, step resumed from or None, unmanaged)``; ``unmanaged`` is the loaded
    checkpoint when Ray never registered it (second case below), so that the loop deletes it
    once newer ones replace it (Ray's ``num_to_keep`` only deletes what it registered).

    Candidates: the checkpoint Ray hands back (``get_checkpoint``) and the newest complete one
    in the run directory. The second matters in two cases: local mode, where Ray keeps none;
    and a worker that dies within a second or two of a checkpoint, before Ray's controller
    polled the report: the files are in storage but Ray restarts from the one before.
    """
    import ray.train

    on_disk = latest_checkpoint(run_dir)
    disk_step = read_progress(on_disk)[0].step if on_disk is not None else -1
    ckpt = ray.train.get_checkpoint()
    with contextlib.ExitStack() as stack:
        directory = Path(stack.enter_context(ckpt.as_directory())) if ckpt is not None else None
        from_disk = on_disk is not None and (directory is None or read_progress(directory)[0].step < disk_step)
        if from_disk:
            if not local_mode and env.is_rank0:
                log.warning("Ray restored %s but %s is newer and complete (written just before the failure): "
                            "resuming from it", directory.name if directory else "no checkpoint", on_disk.name)
            directory = on_disk
        if directory is None:
            return Progress(), None, None
        progress, rng_ok = load_checkpoint(directory, modules=trainable.modules, optimizers=env.optimizers,
                                           schedulers=env.schedulers, rank=env.rank)
    env.reapply_schedule()
    if not rng_ok:  # no RNG state for this rank (more workers than at save time): a fresh, deterministic one
        seed_everything(tc.seed + env.rank + 1_000_003 * progress.step)
    if env.is_rank0:
        log.info("resumed from %s: step %d, epoch %d, %d samples seen", directory.name, progress.step,
                 progress.epoch, progress.samples_seen)
    # Ray prunes only what it registered; in local mode the loop prunes every checkpoint itself.
    return progress, progress.step, (directory if from_disk and not local_mode else None)


def _start_tracker(config: dict, rank: int):
    from visgen.tracking import Tracker, flatten

    cfg = config["tracking"]
    if cfg is None or rank != 0:
        return Tracker()
    train, resources = config["train"], config["resources"]
    params = {**flatten(config["params"]), **flatten({"train": train}),
              "scaling.resolved": resources.describe()}
    tags = {"visgen.task": config["task"].name, "visgen.ray_run": config["run_name"]}
    return Tracker.start(cfg, config["workdir"] or config["run_dir"], config["run_name"], params=params, rank=rank, tags=tags)


def _run_steps(config: dict, task: TrainTask, env: WorkerEnv, trainable: Trainable, progress: Progress,
               tracker, run_dir: Path, unmanaged: Path | None) -> dict:
    import ray.train

    tc: TrainConfig = config["train"]
    resources: WorkerResources = config["resources"]
    crash: CrashAt | None = config["crash_at"]
    per_worker = tc.batch_size // env.world_size
    shard = ray.train.get_dataset_shard("train")
    meter = _Meter(tc, env, progress.step, task.log_keys)
    last_metrics: dict[str, float] = {}
    last_ckpt: Path | None = None
    history: list[dict[str, float]] = []  # every logged interval of this attempt (small: one dict per log)
    for module in trainable.modules.values():
        module.train()

    if progress.step >= tc.steps and env.is_rank0:
        log.info("run already at step %d of %d: nothing to train", progress.step, tc.steps)
    while progress.step < tc.steps:
        batches = 0
        for batch in _iter_batches(shard, per_worker, tc, env.rank, progress.epoch):
            logs = task.train_step(batch, env, progress.step)
            env.step_schedulers()
            batches += 1
            progress.step += 1
            progress.samples_seen += tc.batch_size
            meter.add(logs)
            step = progress.step
            if crash is not None and step == crash.step and env.rank == crash.rank and not os.path.exists(crash.marker):
                Path(crash.marker).write_text(f"crashed rank {env.rank} after step {step}\n")
                os._exit(1)
            if step % tc.log_every == 0 or step == tc.steps:
                last_metrics = meter.flush(step, progress.epoch, tracker)
                history.append({"step": step, **last_metrics})
            if tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
                with meter.paused():
                    _quick_eval(config, task, env, trainable, step, tracker)
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                with meter.paused():
                    last_ckpt = _checkpoint(env, trainable, progress, resources, run_dir, tc, last_metrics, task)
                if unmanaged is not None and env.is_rank0 and _superseded(unmanaged, run_dir, tc.keep_checkpoints):
                    shutil.rmtree(unmanaged, ignore_errors=True)
                    unmanaged = None
            if step >= tc.steps:
                break
        else:
            progress.epoch += 1  # the pass ran to its end
        if batches == 0:
            raise RuntimeError(f"the training split gave worker {env.rank} no batch of {per_worker} rows: it has fewer than "
                               f"batch_size={tc.batch_size} rows in all; add data or lower train.batch_size")

    last_eval = _quick_eval(config, task, env, trainable, progress.step, tracker)
    export_dir = None
    if env.is_rank0:
        if config["export_dir"]:
            export_dir = task.export(env, Path(config["export_dir"]))
            tracker.log_artifact(export_dir, "model")
            log.info("exported %s to %s", task.name, export_dir)
        final = last_ckpt if last_ckpt is not None and last_ckpt.is_dir() else latest_checkpoint(run_dir)
        if final is not None:
            tracker.log_artifact(final, f"checkpoint/{final.name}")
    return {"step": progress.step, "metrics": last_metrics, "eval": last_eval, "history": history,
            "checkpoint": str(run_dir / checkpoint_dir_name(progress.step)),
            "export_dir": str(export_dir) if export_dir else None}


def _superseded(directory: Path, run_dir: Path, keep: int) -> bool:
    step = read_progress(directory)[0].step
    return sum(1 for s, _ in list_checkpoints(run_dir) if s > step) >= keep


def _iter_batches(shard, per_worker: int, tc: TrainConfig, rank: int, epoch: int) -> Iterable[dict[str, np.ndarray]]:
    # drop_last: every rank then takes the same number of steps per pass (the split is equal),
    # so no rank waits in an all-reduce for a batch that never comes.
    shuffle = {"local_shuffle_buffer_size": tc.shuffle_buffer, "local_shuffle_seed": tc.seed + 7919 * epoch + rank} \
        if tc.shuffle_buffer else {}
    return shard.iter_batches(batch_size=per_worker, batch_format="numpy", drop_last=True,
                              prefetch_batches=tc.prefetch_batches, **shuffle)


def _quick_eval(config: dict, task: TrainTask, env: WorkerEnv, trainable: Trainable, step: int, tracker) -> dict:
    """Rank 0 evaluates alone (the others go on; they meet again at the next collective)."""
    batch = config["eval_batch"]
    if not env.is_rank0 or batch is None:
        return {}
    for m in trainable.modules.values():
        m.eval()
    try:
        with torch.no_grad():
            res = task.evaluate(env, batch, step)
    finally:
        for m in trainable.modules.values():
            m.train()
    metrics = {f"eval/{k}": float(v) for k, v in res.metrics.items()}
    tracker.log_metrics(metrics, step)
    for name, image in res.images.items():
        tracker.log_image(image, name, step)
    for name, data in res.texts.items():
        tracker.log_dict({"step": step, name: data}, f"eval/{name}_step{step:07d}.json")
    if metrics:
        log.info("eval @ step %d: %s", step, "  ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return metrics


def _checkpoint(env: WorkerEnv, trainable: Trainable, progress: Progress, resources: WorkerResources, run_dir: Path,
                tc: TrainConfig, metrics: dict, task: TrainTask) -> Path:
    """Every rank writes its part and reports it (``ray.train.report`` is a collective in V2)."""
    import ray.train
    from ray.train import Checkpoint

    name = checkpoint_dir_name(progress.step)
    meta = {"task": task.name, "train": tc.model_dump(mode="json")}
    report = {"step": progress.step, "epoch": progress.epoch, **{k: v for k, v in metrics.items() if isinstance(v, float)}}
    parts = dict(progress=progress, modules=trainable.modules, optimizers=env.optimizers, schedulers=env.schedulers,
                 rank=env.rank, world_size=env.world_size, meta=meta)
    if resources.local_mode:
        final = run_dir / name
        tmp = run_dir / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save_checkpoint(tmp, **parts)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # atomic: a crash mid-write never leaves a half checkpoint under the real name
        prune_checkpoints(run_dir, tc.keep_checkpoints)
        ray.train.report(report, checkpoint=Checkpoint.from_directory(str(final)))
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f"visgen-{name}-"))
    save_checkpoint(tmp, **parts)
    ray.train.report(report, checkpoint=Checkpoint.from_directory(str(tmp)), checkpoint_dir_name=name,
                     delete_local_checkpoint_after_upload=True)
    if env.is_rank0:
        log.info("checkpoint %s saved (step %d)", name, progress.step)
    return run_dir / name


class _Meter:
    """Averages task logs over a log interval and turns wall time into images/s and ETA.

    Time spent in checkpoints and evals is excluded from images/s (it is a training-speed
    figure) but included in the ETA (which must hold for the whole run).
    """

    def __init__(self, tc: TrainConfig, env: WorkerEnv, start_step: int, keys: tuple[str, ...] = ()):
        self.tc, self.env = tc, env
        self.keys = keys
        self.start_step = start_step
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}  # per key: a loss term may switch on mid-interval (GAN)
        self.count = 0
        self.t_last = self.t_start = time.perf_counter()
        self.step_last = start_step
        self.paused_s = 0.0

    def add(self, logs: Mapping[str, float]) -> None:
        for k, v in logs.items():
            v = float(v)
            if not math.isfinite(v):
                raise FloatingPointError(f"non-finite {k}={v} at step {self.step_last + self.count + 1} on rank "
                                         f"{self.env.rank}; lower train.lr or enable train.grad_clip")
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.count += 1

    @contextlib.contextmanager
    def paused(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t

    def flush(self, step: int, epoch: int, tracker) -> dict[str, float]:
        means = self.env.mean_over_workers({k: v / self.counts[k] for k, v in self.sums.items()})
        now = time.perf_counter()
        steps = step - self.step_last
        busy = max(1e-9, now - self.t_last - self.paused_s)
        elapsed = max(1e-9, now - self.t_start)
        rate_all = (step - self.start_step) / elapsed  # steps/s including checkpoint and eval time
        metrics = {**means, "lr": self.env.lr(), "epoch": float(epoch),
                   "steps_per_s": steps / busy, "images_per_s": steps * self.tc.batch_size / busy,
                   "eta_s": (self.tc.steps - step) / max(rate_all, 1e-9)}
        if self.env.is_rank0:
            shown = [k for k in self.keys if k in means] or [k for k in means if "loss" in k][:4]
            log.info("step %d/%d  %s  lr %.3g  %.1f img/s  eta %s", step, self.tc.steps,
                     "  ".join(f"{k} {means[k]:.4g}" for k in shown), metrics["lr"], metrics["images_per_s"],
                     _fmt_s(metrics["eta_s"]))
            tracker.log_metrics(metrics, step)
        self.sums, self.counts, self.count = {}, {}, 0
        self.t_last, self.step_last, self.paused_s = now, step, 0.0
        return metrics


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def read_run_progress(run_dir: str | Path) -> Progress | None:
    """Progress of the newest checkpoint of a run directory, or None when it has none."""
    latest = latest_checkpoint(run_dir)
    return read_progress(latest)[0] if latest is not None else None
