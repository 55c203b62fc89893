"""The worker side of the shared training loop: what each Ray Train worker runs.

:func:`train_worker` is the ``TorchTrainer`` loop function; it builds a :class:`WorkerRun` (one
worker's part of one attempt at the run) and calls :meth:`WorkerRun.run`, which

1. builds the task's modules and optimisers (same initial weights on every rank, then one RNG
   stream per rank),
2. resumes from the newest checkpoint (:meth:`~WorkerRun.resume`),
3. trains to ``train.steps`` (:meth:`~WorkerRun.run_steps`), logging every ``log_every``
   (:class:`Meter`), evaluating every ``eval_every`` (:meth:`~WorkerRun.quick_eval`) and
   checkpointing every ``checkpoint_every`` (:meth:`~WorkerRun.checkpoint`),
4. exports the model and logs the final checkpoint on rank 0 (:meth:`~WorkerRun.finish`).
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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from visgen import storage
from visgen.tracking import Tracker, flatten
from visgen.train.checkpoint import (
    Progress, checkpoint_dir_name, child, latest_checkpoint, list_checkpoints, load_checkpoint, load_ema,
    prune_checkpoints, read_progress, save_checkpoint, seed_everything,
)
from visgen.train.config import TrainConfig
from visgen.train.ema import WeightAverage
from visgen.train.feed import EpochEnd, Feed, InMemoryData, iter_stream_epoch
from visgen.train.scaling import WorkerResources
from visgen.train.task import TrainTask, WorkerEnv

log = logging.getLogger("visgen.train")


@dataclass(frozen=True)
class CrashAt:
    """Fault injection for tests: rank ``rank`` exits hard after step ``step``, once (``marker`` records it)."""

    step: int
    rank: int
    marker: str


def train_worker(config: dict) -> dict:
    """The ``TorchTrainer`` loop function (``config`` is built by :func:`visgen.train.loop.fit`)."""
    import ray.train  # lazy: this module is imported by the driver too, where Ray may not be started

    _setup_worker_logging()
    resources: WorkerResources = config["resources"]
    # Intra-op threads = the CPUs this worker holds (Ray's own default for fractional CPUs is
    # one thread; in local mode the driver would otherwise use every core and fight Ray Data).
    threads_before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(resources.cpus_per_worker)))
    try:
        ctx = ray.train.get_context()
        return WorkerRun(config, ctx.get_world_rank(), ctx.get_world_size()).run()
    finally:
        torch.set_num_threads(threads_before)  # matters in local mode: this is the driver process


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
    import ray.train.torch  # lazy: only GPU workers ask Ray for their device

    return ray.train.torch.get_device()


class WorkerRun:
    """One worker's part of one attempt at a training run: the task, its modules and optimisers
    (through :class:`WorkerEnv`), the progress counters, the MLflow run (rank 0) and the
    checkpoints it writes."""

    def __init__(self, config: dict, rank: int, world_size: int):
        self.task: TrainTask = config["task"]
        self.tc: TrainConfig = config["train"]
        self.resources: WorkerResources = config["resources"]
        self.config = config
        # A local path, or an object store URL when the workdir is one (Ray Train's storage_path).
        self.run_dir = config["run_dir"] if storage.is_url(config["run_dir"]) else Path(config["run_dir"])
        device = _device(self.resources)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores: the usual speed knob
            torch.backends.cudnn.allow_tf32 = True
        self.env = WorkerEnv(self.tc, device, rank, world_size,
                             distributed=dist.is_available() and dist.is_initialized())
        # Same seed on every rank for the initial weights (DDP also broadcasts rank 0's), then one
        # stream per rank for dropout, restarts, shuffling.
        seed_everything(self.tc.seed)
        self.trainable = self.task.setup(self.env)
        self.env.build_optimizers(self.trainable.param_groups)
        # The weight average lives on rank 0, which alone evaluates, saves and exports the modules.
        self.ema = (WeightAverage(self.trainable.modules, self.tc.ema_decay)
                    if self.tc.ema_decay is not None and rank == 0 else None)
        seed_everything(self.tc.seed + rank)
        self.progress = Progress()
        self.resumed_from: int | None = None
        # A checkpoint this run loaded that Ray never registered: deleted by the run once newer
        # ones replace it (Ray's num_to_keep only deletes what it registered).
        self.unmanaged: Path | None = None
        self.feed_state: dict | None = None  # the feed position saved with the loaded checkpoint
        self.tracker = Tracker()  # no-op until start_tracking (rank 0 with tracking configured)

    # -- the attempt, start to end ---------------------------------------------------------------
    def run(self) -> dict:
        self.resume()
        self.start_tracking()
        try:
            summary = self.run_steps()
            summary.update(self.finish())
        except BaseException:
            self.tracker.end("FAILED")
            raise
        summary.update(resumed_from=self.resumed_from, mlflow_run_id=self.tracker.run_id)
        self.tracker.end("FINISHED")
        return summary

    def resume(self) -> None:
        """Load the newest checkpoint of the run, if any: modules, optimisers, schedules, RNG
        streams, progress and the feed position.

        Candidates: the checkpoint Ray hands back (``get_checkpoint``) and the newest complete one
        in the run directory. The second matters in two cases: local mode, where Ray keeps none;
        and a worker that dies within a second or two of a checkpoint, before Ray's controller
        polled the report: the files are in storage but Ray restarts from the one before.
        """
        import ray.train  # lazy: as in train_worker

        env, tc = self.env, self.tc
        local_mode = self.resources.local_mode
        on_disk = latest_checkpoint(self.run_dir)
        disk_step = read_progress(on_disk)[0].step if on_disk is not None else -1
        ckpt = ray.train.get_checkpoint()
        with contextlib.ExitStack() as stack:
            directory = Path(stack.enter_context(ckpt.as_directory())) if ckpt is not None else None
            from_disk = on_disk is not None and (directory is None or read_progress(directory)[0].step < disk_step)
            if from_disk:
                if not local_mode and env.is_rank0:
                    log.warning("Ray restored %s but %s is newer and complete (written just before the failure): "
                                "resuming from it", directory.name if directory else "no checkpoint",
                                storage.name(on_disk))
                directory = on_disk
            if directory is None:
                return
            progress, rng_ok = load_checkpoint(directory, modules=self.trainable.modules, optimizers=env.optimizers,
                                               schedulers=env.schedulers, rank=env.rank)
            if self.ema is not None:
                saved = load_ema(directory)
                if saved is not None:
                    self.ema.load_state_dict(saved, self.trainable.modules)
                else:
                    log.info("%s holds no weight average (trained without train.ema_decay): the average starts "
                             "from its weights", storage.name(directory))
                    self.ema.reset(self.trainable.modules)
            self.feed_state = dict((read_progress(directory)[1].get("meta") or {}).get("feed") or {})
        env.reapply_schedule()
        if not rng_ok:  # no RNG state for this rank (more workers than at save time): a fresh, deterministic one
            seed_everything(tc.seed + env.rank + 1_000_003 * progress.step)
        if env.is_rank0:
            log.info("resumed from %s: step %d, epoch %d, %d samples seen", storage.name(directory), progress.step,
                     progress.epoch, progress.samples_seen)
        self.progress, self.resumed_from = progress, progress.step
        # Ray prunes only what it registered; in local mode the loop prunes every checkpoint itself.
        self.unmanaged = directory if from_disk and not local_mode else None

    def start_tracking(self) -> None:
        """Rank 0 opens (or reopens, on a restart) the run's MLflow run."""
        cfg = self.config["tracking"]
        if cfg is None or self.env.rank != 0:
            return
        params = {**flatten(self.config["params"]), **flatten({"train": self.tc}),
                  "scaling.resolved": self.resources.describe()}
        tags = {"visgen.task": self.task.name, "visgen.ray_run": self.config["run_name"]}
        self.tracker = Tracker.start(cfg, self.config["workdir"] or self.config["run_dir"], self.config["run_name"],
                                     params=params, rank=self.env.rank, tags=tags)

    # -- the steps -------------------------------------------------------------------------------
    def run_steps(self) -> dict:
        """Train from ``progress.step`` to ``train.steps``; returns the step, the last logged
        interval, the final quick eval, the history of logged intervals and the last checkpoint."""
        tc, env, progress = self.tc, self.env, self.progress
        crash: CrashAt | None = self.config["crash_at"]
        per_worker = tc.batch_size // env.world_size
        meter = Meter(tc, env, progress.step, self.task.log_keys)
        last_metrics: dict[str, float] = {}
        history: list[dict[str, float]] = []  # every logged interval of this attempt (small: one dict per log)
        for module in self.trainable.modules.values():
            module.train()

        if progress.step >= tc.steps and env.is_rank0:
            log.info("run already at step %d of %d: nothing to train", progress.step, tc.steps)
        epochs, start_index, identity = self._epoch_source()
        position = {**identity, "epoch": progress.epoch, "index": start_index}  # saved in checkpoints
        with Feed(self.task, env, epochs, start_step=progress.step, steps=max(0, tc.steps - progress.step),
                  start_epoch=progress.epoch, start_index=start_index, depth=tc.prefetch_batches) as feed:
            for item in feed:
                if isinstance(item, EpochEnd):
                    if item.batches == 0:
                        raise RuntimeError(f"the training split gave worker {env.rank} no batch of {per_worker} rows: "
                                           f"it has fewer than batch_size={tc.batch_size} rows in all; add data or "
                                           "lower train.batch_size")
                    progress.epoch += 1  # the pass ran to its end
                    position.update(epoch=progress.epoch, index=0)
                    continue
                run_step(self.task, env, item.batch, progress.step, meter)
                if self.ema is not None:
                    self.ema.update(self.trainable.modules)
                progress.step += 1
                progress.samples_seen += tc.batch_size
                position.update(epoch=item.epoch, index=item.index + 1)
                step = progress.step
                if crash is not None and step == crash.step and env.rank == crash.rank \
                        and not os.path.exists(crash.marker):
                    Path(crash.marker).write_text(f"crashed rank {env.rank} after step {step}\n")
                    os._exit(1)
                if step % tc.log_every == 0 or step == tc.steps:
                    last_metrics = meter.flush(step, progress.epoch, self.tracker)
                    history.append({"step": step, **last_metrics})
                if tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
                    with meter.paused():
                        self.quick_eval(step)
                if step % tc.checkpoint_every == 0 or step == tc.steps:
                    with meter.paused():
                        self.checkpoint(last_metrics, feed=dict(position))
                    if self.unmanaged is not None and env.is_rank0 \
                            and _superseded(self.unmanaged, self.run_dir, tc.keep_checkpoints):
                        _remove(self.unmanaged)
                        self.unmanaged = None
                if step >= tc.steps:
                    break

        if self.ema is not None:  # the last checkpoint keeps the step's own weights; from here on, the average
            self.ema.copy_to(self.trainable.modules)
            log.info("the weights are now the average of training (ema_decay %g, %d updates): evaluated and exported",
                     self.ema.decay, self.ema.updates)
        last_eval = self.quick_eval(progress.step)
        return {"step": progress.step, "metrics": last_metrics, "eval": last_eval, "history": history,
                "checkpoint": str(child(self.run_dir, checkpoint_dir_name(progress.step)))}

    def _epoch_source(self):
        """``(epochs(epoch, start) -> batches, index of the first batch in progress.epoch, identity)``;
        ``identity`` describes the feed in checkpoints (with the position added).

        In memory, the order of an epoch depends on (seed, epoch) alone, so a resumed run continues
        the interrupted epoch at the batch it had reached (saved in the checkpoint). A stream cannot
        seek: a resumed run starts a fresh pass.
        """
        import ray  # lazy: as in train_worker
        import ray.train

        tc, env, progress, feed_state = self.tc, self.env, self.progress, self.feed_state
        ref = self.config.get("train_in_memory")
        if ref is None:
            shard = ray.train.get_dataset_shard("train")
            per_worker = tc.batch_size // env.world_size
            return ((lambda epoch, start: iter_stream_epoch(shard, per_worker, tc, env.rank, epoch)), 0,
                    {"mode": "stream"})
        data: InMemoryData = ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref
        per_epoch = data.batches_per_epoch(tc.batch_size)
        identity = {"mode": "memory", "rows": data.num_rows, "batch_size": tc.batch_size, "seed": tc.seed}
        start = 0
        if feed_state and all(feed_state.get(k) == v for k, v in identity.items()) \
                and feed_state.get("epoch") == progress.epoch:
            start = int(feed_state.get("index", 0))
            if per_epoch and start >= per_epoch:  # saved right at the end of a pass: the next one starts
                progress.epoch, start = progress.epoch + 1, 0
        elif feed_state is not None and env.is_rank0:
            log.info("resumed run: the checkpoint's feed position (%s) does not apply to this feed; starting a fresh "
                     "pass over the training split", dict(feed_state) or "none saved")

        def epochs(epoch: int, first: int) -> Iterator[dict[str, np.ndarray]]:
            return data.iter_epoch(epoch, seed=tc.seed, global_batch=tc.batch_size, rank=env.rank,
                                   world_size=env.world_size, start=first)

        return epochs, start, identity

    # -- evaluation, checkpoints, the end -------------------------------------------------------
    def quick_eval(self, step: int) -> dict:
        """Rank 0 evaluates alone on the fixed held-out batch (the others go on; they meet again at
        the next collective). Returns the ``eval/*`` metrics, also logged with images and texts."""
        batch = self.config["eval_batch"]
        env, modules = self.env, self.trainable.modules
        if not env.is_rank0 or batch is None:
            return {}
        for m in modules.values():
            m.eval()
        try:
            with torch.no_grad():
                res = self.task.evaluate(env, batch, step)
        finally:
            for m in modules.values():
                m.train()
        metrics = {f"eval/{k}": float(v) for k, v in res.metrics.items()}
        self.tracker.log_metrics(metrics, step)
        for name, image in res.images.items():
            self.tracker.log_image(image, name, step)
        for name, data in res.texts.items():
            self.tracker.log_dict({"step": step, name: data}, f"eval/{name}_step{step:07d}.json")
        if metrics:
            log.info("eval @ step %d: %s", step, "  ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
        return metrics

    def checkpoint(self, metrics: Mapping[str, float], feed: dict | None = None) -> Path:
        """Every rank writes its part and reports it (``ray.train.report`` is a collective in V2).
        ``feed``: where the feed stands (kind, epoch, batch index), for an in-memory feed to resume exactly."""
        import ray.train  # lazy: as in train_worker
        from ray.train import Checkpoint

        env, tc, progress, run_dir = self.env, self.tc, self.progress, self.run_dir
        name = checkpoint_dir_name(progress.step)
        meta = {"task": self.task.name, "train": tc.model_dump(mode="json"), "feed": feed or {}}
        report = {"step": progress.step, "epoch": progress.epoch,
                  **{k: v for k, v in metrics.items() if isinstance(v, float)}}
        parts = dict(progress=progress, modules=self.trainable.modules, optimizers=env.optimizers,
                     schedulers=env.schedulers, rank=env.rank, world_size=env.world_size, meta=meta,
                     ema=self.ema.state_dict() if self.ema is not None else None)
        if self.resources.local_mode and storage.is_url(run_dir):
            # Ray keeps no local-mode checkpoints: write here, then upload (trainer.json names every
            # file with its size, so a half-uploaded checkpoint is never taken for a complete one).
            with tempfile.TemporaryDirectory(prefix=f"visgen-{name}-") as tmp:
                save_checkpoint(tmp, **parts)
                final = child(run_dir, name)
                storage.upload(tmp, final)
            prune_checkpoints(run_dir, tc.keep_checkpoints)
            ray.train.report(report)
            return final
        if self.resources.local_mode:
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
        return child(run_dir, name)

    def finish(self) -> dict:
        """Rank 0: export the model for the next stages and log it and the final checkpoint to MLflow."""
        export_dir = None
        if self.env.is_rank0:
            target = self.config["export_dir"]
            if target and storage.is_url(target):  # export here, then upload: rank 0 may be on any node
                with tempfile.TemporaryDirectory(prefix="visgen-export-") as tmp:
                    local = self.task.export(self.env, Path(tmp) / storage.name(target))
                    storage.upload(local, target)
                    self.tracker.log_artifact(local, "model")
                export_dir = target
                log.info("exported %s to %s", self.task.name, export_dir)
            elif target:
                export_dir = self.task.export(self.env, Path(target))
                self.tracker.log_artifact(export_dir, "model")
                log.info("exported %s to %s", self.task.name, export_dir)
            final = latest_checkpoint(self.run_dir)
            if final is not None:
                self.tracker.log_artifact(storage.local_copy(final), f"checkpoint/{storage.name(final)}")
        return {"export_dir": str(export_dir) if export_dir else None}


def run_step(task: TrainTask, env: WorkerEnv, batch: Mapping[str, Any], step: int, meter: "Meter") -> None:
    """One training step as the loop runs it (the benchmarks call this too): the task's step, the
    LR schedules, the logs into the meter (kept as tensors until it logs)."""
    meter.add(task.train_step(batch, env, step))
    env.step_schedulers()


def _remove(directory: Path | str) -> None:
    if storage.is_url(directory):
        storage.delete(directory)
    else:
        shutil.rmtree(directory, ignore_errors=True)


def _superseded(directory: Path | str, run_dir: Path | str, keep: int) -> bool:
    step = read_progress(directory)[0].step
    return sum(1 for s, _ in list_checkpoints(run_dir) if s > step) >= keep


class Meter:
    """Averages task logs over a log interval and turns wall time into images/s and ETA.

    Logs may be floats or 0-dim tensors. Tensors stay where they are (on the device) until
    :meth:`flush`, which reads them all in one transfer: the steps in between never wait for the
    device, so the feed and the host side of the next step overlap the device's work. A
    non-finite value is therefore reported at the log step (naming the step it came from).

    Time spent in checkpoints and evals is excluded from images/s (it is a training-speed
    figure) but included in the ETA (which must hold for the whole run).
    """

    def __init__(self, tc: TrainConfig, env: WorkerEnv, start_step: int, keys: tuple[str, ...] = ()):
        self.tc, self.env = tc, env
        self.keys = keys
        self.start_step = start_step
        # key -> [(step, value)]; a loss term may switch on mid-interval (GAN)
        self.values: dict[str, list[tuple[int, float | torch.Tensor]]] = {}
        self.count = 0
        self.t_last = self.t_start = time.perf_counter()
        self.step_last = start_step
        self.paused_s = 0.0

    def add(self, logs: Mapping[str, Any]) -> None:
        step = self.step_last + self.count + 1
        for k, v in logs.items():
            if isinstance(v, torch.Tensor):
                if v.numel() != 1:
                    raise ValueError(f"log {k!r} must be a float or a 0-dim tensor, got a tensor of shape "
                                     f"{tuple(v.shape)}")
                v = v.detach().reshape(())
            else:
                v = float(v)
                if not math.isfinite(v):
                    self._non_finite(k, v, step)
            self.values.setdefault(k, []).append((step, v))
        self.count += 1

    def _non_finite(self, key: str, value: float, step: int) -> None:
        raise FloatingPointError(f"non-finite {key}={value} at step {step} on rank {self.env.rank}; lower train.lr or "
                                 "enable train.grad_clip")

    def _read(self) -> dict[str, list[tuple[int, float]]]:
        """Every logged value as a float, with one device-to-host transfer per device."""
        tensors: dict[torch.device, list[torch.Tensor]] = {}
        for entries in self.values.values():
            for _, v in entries:
                if isinstance(v, torch.Tensor):
                    tensors.setdefault(v.device, []).append(v.float())
        host = {d: iter(torch.stack(ts).cpu().tolist()) for d, ts in tensors.items()}
        out = {}
        for k, entries in self.values.items():
            out[k] = [(s, next(host[v.device]) if isinstance(v, torch.Tensor) else v) for s, v in entries]
        return out

    @contextlib.contextmanager
    def paused(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t

    def flush(self, step: int, epoch: int, tracker) -> dict[str, float]:
        values = self._read()
        bad = [(s, k, v) for k, entries in values.items() for s, v in entries if not math.isfinite(v)]
        if bad:
            s, k, v = min(bad)
            self._non_finite(k, v, s)
        means = self.env.mean_over_workers({k: sum(v for _, v in e) / len(e) for k, e in values.items() if e})
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
                     fmt_s(metrics["eta_s"]))
            tracker.log_metrics(metrics, step)
        self.values, self.count = {}, 0
        self.t_last, self.step_last, self.paused_s = now, step, 0.0
        return metrics


def fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
