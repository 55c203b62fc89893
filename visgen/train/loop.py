"""The training loop every trainer shares, on Ray Train V2.

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
from collections.abc import Iterable, Iterator, Mapping
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

    def collate(self, batch: dict[str, np.ndarray], env: "WorkerEnv", step: int) -> Mapping[str, Any]:
        """Feed side: turn the numpy batch of step ``step`` into what :meth:`train_step` takes.

        Runs in the loop's feed thread, ahead of the step (up to ``prefetch_batches`` batches).
        Torch tensors in the returned mapping (CPU tensors) are pinned and copied to
        ``env.device`` by the loop, on a side stream one step ahead, so :meth:`train_step`
        receives them on the device; other values pass through. It must not touch the modules,
        the optimisers or the global RNGs (draw from a generator seeded by seed, rank and step).
        Default: the batch unchanged (``train_step`` then gets numpy arrays and moves them itself).
        """
        return batch

    def train_step(self, batch: Mapping[str, Any], env: "WorkerEnv", step: int) -> Mapping[str, Any]:
        """One optimisation step on this worker's share of the batch (as :meth:`collate` made it),
        through ``env.optimizer_step``.

        Forward passes run under ``env.autocast()``. Returns logs, each a float or a 0-dim tensor;
        return tensors (detached), not floats: the loop converts them only when it logs
        (``log_every``), so the step never waits for the device. Every rank must return the same
        keys (they are averaged over workers). ``step`` counts completed steps.
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

    def optimizer_step(self, name: str, loss: torch.Tensor) -> torch.Tensor:
        """Zero this optimiser's grads, backprop ``loss``, clip, step. Returns the pre-clip grad norm
        as a 0-dim tensor (on the device: reading it would wait for the step; the loop logs it).

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
        return norm.detach()

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
# The feed: training split -> numpy batches -> task.collate -> pinned memory -> the device
# ---------------------------------------------------------------------------------------------
class InMemoryData:
    """A training split held in host memory as numpy columns, and the batches drawn from it.

    Columns are kept in three forms: *dense* (one array, rows along axis 0: images, scalars),
    *ragged* (a 1-D list column such as token ids: one values array plus row offsets) and
    *objects* (anything else, e.g. strings). Dense and ragged columns are plain numpy arrays, so
    ``ray.put`` stores them once per node and every worker there maps them without a copy.

    :meth:`take` returns rows in Ray Data's own numpy batch format (what ``iter_batches(
    batch_format="numpy")`` gives for the same columns: a ragged column is an object array of
    1-D arrays), so a task sees the same batches from either feed.
    """

    def __init__(self, num_rows: int, dense: dict[str, np.ndarray] | None = None,
                 ragged: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
                 objects: dict[str, np.ndarray] | None = None, order: tuple[str, ...] = ()):
        self.num_rows = num_rows
        self.dense, self.ragged, self.objects = dense or {}, ragged or {}, objects or {}
        self.order = order or (*self.dense, *self.ragged, *self.objects)

    @property
    def columns(self) -> tuple[str, ...]:
        return self.order

    @property
    def nbytes(self) -> int:
        n = sum(a.nbytes for a in self.dense.values())
        n += sum(v.nbytes + o.nbytes for v, o in self.ragged.values())
        return n + sum(_object_nbytes(a) for a in self.objects.values())

    @classmethod
    def from_batches(cls, batches: Iterable[Mapping[str, np.ndarray]],
                     limit_bytes: int | None = None) -> "InMemoryData | None":
        """Concatenate numpy batches (Ray Data's format); None as soon as they exceed ``limit_bytes``."""
        parts: dict[str, list[np.ndarray]] = {}
        order: tuple[str, ...] = ()
        total = rows = 0
        for batch in batches:
            if not order:
                order = tuple(batch)
            elif tuple(batch) != order:
                raise ValueError(f"the training split's batches disagree on their columns: {order} vs {tuple(batch)}")
            n = len(next(iter(batch.values()))) if batch else 0
            for k, v in batch.items():
                parts.setdefault(k, []).append(np.asarray(v))
                total += _column_nbytes(np.asarray(v))
            rows += n
            if limit_bytes is not None and total > limit_bytes:
                return None
        dense, ragged, objects = {}, {}, {}
        for k in order:
            kind, value = _stack_column(parts[k], rows)
            {"dense": dense, "ragged": ragged, "objects": objects}[kind][k] = value
        return cls(rows, dense, ragged, objects, order)

    def take(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Rows ``idx`` (in that order) as a numpy batch."""
        out: dict[str, np.ndarray] = {}
        for k in self.order:
            if k in self.dense:
                out[k] = self.dense[k][idx]
            elif k in self.ragged:
                values, offsets = self.ragged[k]
                col = np.empty(len(idx), dtype=object)
                starts, ends = offsets[idx], offsets[np.asarray(idx) + 1]
                for i, (a, b) in enumerate(zip(starts.tolist(), ends.tolist())):
                    col[i] = values[a:b]
                out[k] = col
            else:
                out[k] = self.objects[k][idx]
        return out

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """The permutation of the rows for ``epoch``: a function of (seed, epoch) only, the same on every rank."""
        return np.random.default_rng([seed, 0x5EED, epoch]).permutation(self.num_rows)

    def batches_per_epoch(self, global_batch: int) -> int:
        return self.num_rows // global_batch  # drop_last: every rank takes the same number of steps

    def iter_epoch(self, epoch: int, *, seed: int, global_batch: int, rank: int = 0, world_size: int = 1,
                   start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """This rank's batches of ``epoch`` from batch ``start`` on.

        Global batch ``b`` is rows ``order[b*B:(b+1)*B]`` of the epoch's permutation; rank ``r``
        takes its ``r``-th slice of ``B / world_size`` rows. The global batches therefore do not
        depend on the worker count, and a resumed run can continue an epoch where it stopped.
        """
        per = global_batch // world_size
        order = self.epoch_order(seed, epoch)
        for b in range(start, self.batches_per_epoch(global_batch)):
            lo = b * global_batch + rank * per
            yield self.take(order[lo:lo + per])


def _object_nbytes(a: np.ndarray) -> int:
    return int(sum(x.nbytes if isinstance(x, np.ndarray) else sys.getsizeof(x) for x in a.ravel()))


def _column_nbytes(a: np.ndarray) -> int:
    return _object_nbytes(a) + 8 * a.size if a.dtype == object else a.nbytes


def _stack_column(parts: list[np.ndarray], rows: int) -> tuple[str, Any]:
    """Concatenate one column's batch arrays: ('dense', array), ('ragged', (values, offsets)) or ('objects', array)."""
    if all(p.dtype != object for p in parts) and len({p.shape[1:] for p in parts}) <= 1:
        return "dense", (np.concatenate(parts) if parts else np.empty(0))  # promotes e.g. <U5 + <U7
    cells = [x for p in parts for x in p]  # rows (one Python object each: the ragged / mixed case)
    if cells and all(isinstance(x, np.ndarray) and x.ndim == 1 and x.dtype != object for x in cells) \
            and len({x.dtype for x in cells}) == 1:
        offsets = np.zeros(rows + 1, dtype=np.int64)
        np.cumsum([len(x) for x in cells], out=offsets[1:])
        return "ragged", (np.concatenate(cells), offsets)
    col = np.empty(rows, dtype=object)
    col[:] = cells if rows else []
    return "objects", col


def read_in_memory(ds: Any, limit_bytes: int | None = None) -> InMemoryData | None:
    """Read a Ray Dataset into an :class:`InMemoryData` (one pass, whole blocks, in the dataset's
    order, so that row ``i`` is the same row on every run); None when it turns out larger than
    ``limit_bytes`` (the read stops there)."""
    options = ds.context.execution_options if hasattr(ds, "context") else None
    keep = options.preserve_order if options is not None else None
    if options is not None:
        options.preserve_order = True  # parallel reads would otherwise deliver blocks in any order
    try:
        batches = iter(ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2))
        data = InMemoryData.from_batches(batches, limit_bytes)
        if hasattr(batches, "close"):
            batches.close()  # stops the executor when the read stopped early
    finally:
        if options is not None:
            options.preserve_order = keep
    return data


def resolve_in_memory(ds: Any, train: TrainConfig, size_hint: int | None = None) -> tuple[InMemoryData | None, str]:
    """Apply ``train.data_in_memory`` to the training split: ``(data or None, why)``.

    ``size_hint``: an estimate of the split's size in memory (bytes) known without reading it;
    under ``auto`` a hint above the limit streams without reading anything. Otherwise ``auto``
    reads up to ``data_in_memory_max_mb`` and falls back to streaming if the split is larger.
    """
    mode = train.data_in_memory
    limit = train.data_in_memory_max_mb * 2**20
    if mode is False:
        return None, "data_in_memory=false"
    if mode == "auto" and size_hint is not None and size_hint > limit:
        return None, (f"data_in_memory=auto: the split is estimated at {size_hint / 2**20:.0f} MiB, over "
                      f"data_in_memory_max_mb={train.data_in_memory_max_mb}")
    t0 = time.perf_counter()
    data = read_in_memory(ds, None if mode is True else limit)
    if data is None:
        return None, (f"data_in_memory=auto: the split is over data_in_memory_max_mb={train.data_in_memory_max_mb} "
                      f"(stopped reading after {time.perf_counter() - t0:.1f} s)")
    return data, (f"data_in_memory={str(mode).lower()}: {data.num_rows} rows, {data.nbytes / 2**20:.1f} MiB, read in "
                  f"{time.perf_counter() - t0:.1f} s")


@dataclass
class FeedItem:
    """One batch for step ``step``: ``index`` counts the batches of epoch ``epoch`` (from 0)."""

    step: int
    epoch: int
    index: int
    batch: Mapping[str, Any]


@dataclass
class EpochEnd:
    """Epoch ``epoch`` ran to its end after ``batches`` batches (resumed epochs count from where they started)."""

    epoch: int
    batches: int


def _map_tensors(obj: Any, fn) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


class Feed:
    """Batches for the training steps, prepared in a background thread and copied to the device ahead.

    The thread pulls numpy batches from ``epochs(epoch, start)`` (an iterator of the epoch's
    batches from batch ``start``; one epoch after another from ``start_epoch``), runs
    ``task.collate`` for the step each one will train, pins the tensors it returns (CUDA) and
    queues up to ``depth`` of them. The training thread takes them in order; on CUDA it starts
    the copy of the next batch to the device (non-blocking, on a side stream) before handing out
    the current one, so the copy overlaps the step. The thread stops after ``steps`` batches.

    Iterating yields :class:`FeedItem` and, after a full epoch, :class:`EpochEnd`. ``close()``
    (also on exit of ``with``) stops the thread; an exception in it is re-raised in the training
    thread.
    """

    _DONE = object()

    def __init__(self, task: TrainTask, env: WorkerEnv, epochs, *, start_step: int, steps: int,
                 start_epoch: int = 0, start_index: int = 0, depth: int = 2):
        import queue
        import threading

        self.task, self.env, self.epochs = task, env, epochs
        self.start_step, self.steps = start_step, steps
        self.start_epoch, self.start_index = start_epoch, start_index
        self.cuda = env.device.type == "cuda"
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="visgen-feed", daemon=True)
        self._stream = torch.cuda.Stream(env.device) if self.cuda else None
        self._thread.start()

    # -- feed thread -----------------------------------------------------------------------
    def _put(self, item: Any) -> bool:
        import queue

        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            if self.cuda and self.env.device.index is not None:
                torch.cuda.set_device(self.env.device)  # pinned memory and copies for the worker's own GPU
            step, end, epoch, start = self.start_step, self.start_step + self.steps, self.start_epoch, self.start_index
            while step < end:
                n = start
                it = self.epochs(epoch, start)
                try:
                    for batch in it:
                        prepared = self.task.collate(batch, self.env, step)
                        if self.cuda:
                            prepared = _map_tensors(prepared, lambda t: t if t.is_cuda else t.pin_memory())
                        if not self._put(FeedItem(step, epoch, n, prepared)):
                            return
                        step, n = step + 1, n + 1
                        if step >= end or self._stop.is_set():
                            break
                    else:
                        if not self._put(EpochEnd(epoch, n - start)):
                            return
                        if n == start:
                            return  # an empty pass: the training thread raises; do not spin on it
                        epoch, start = epoch + 1, 0
                finally:
                    if hasattr(it, "close"):
                        it.close()
        except BaseException as err:  # noqa: BLE001 - handed to the training thread
            self._put(err)
        finally:
            self._put(self._DONE)

    # -- training thread -------------------------------------------------------------------
    def _get(self, block: bool = True) -> Any:
        item = self._queue.get(block=block)
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def _to_device(self, item: Any) -> Any:
        if not isinstance(item, FeedItem) or not self.cuda:
            return item
        with torch.cuda.stream(self._stream):
            batch = _map_tensors(item.batch, lambda t: t.to(self.env.device, non_blocking=True))
            ready = torch.cuda.Event()
            ready.record(self._stream)
        return item, batch, ready

    def _hand_out(self, staged: Any) -> Any:
        if not isinstance(staged, tuple):
            return staged
        item, batch, ready = staged
        current = torch.cuda.current_stream(self.env.device)
        current.wait_event(ready)
        # The tensors were allocated on the side stream: tell the allocator the step uses them.
        _map_tensors(batch, lambda t: t.record_stream(current))
        return FeedItem(item.step, item.epoch, item.index, batch)

    def __iter__(self) -> Iterator[FeedItem | EpochEnd]:
        import queue

        staged = self._to_device(self._get())
        while staged is not self._DONE:
            try:  # the next batch, when the thread has it ready, starts its copy before this step runs
                ahead = self._to_device(self._get(block=False))
            except queue.Empty:
                ahead = None
            except Exception as err:  # noqa: BLE001 - the thread's error: raised once this batch has trained
                ahead = err
            yield self._hand_out(staged)
            if isinstance(ahead, Exception):
                raise ahead
            staged = ahead if ahead is not None else self._to_device(self._get())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def __enter__(self) -> "Feed":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
        export_dir: str | Path | None = None, crash_at: CrashAt | None = None,
        data_size_hint: int | None = None) -> FitResult:
    """Train ``task`` on ``datasets["train"]`` with Ray Train; resume ``run_name`` if it has checkpoints.

    Checkpoints go to ``<storage_path>/<run_name>/`` (a local or shared-filesystem path).
    ``eval_batch`` is the fixed held-out batch of the quick eval (rank 0). ``tracking`` is a
    ``TrackingConfig`` (None = no MLflow; needs ``workdir``); ``params`` are logged as MLflow
    params (flattened); ``export_dir`` receives ``task.export`` at the end. ``crash_at`` is a
    test hook. ``data_size_hint``: an estimate of the training split's bytes in memory, known
    without reading it (see :func:`resolve_in_memory`). Raises ``InsufficientResourcesError`` at
    once when the workers cannot fit.
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
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"] if "train" in ds else []),
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
    progress, resumed_from, unmanaged, feed_state = _maybe_resume(env, trainable, run_dir, tc, resources.local_mode)

    tracker = _start_tracker(config, rank)
    try:
        summary = _run_steps(config, task, env, trainable, progress, tracker, run_dir, unmanaged, feed_state)
    except BaseException:
        tracker.end("FAILED")
        raise
    summary.update(resumed_from=resumed_from, mlflow_run_id=tracker.run_id)
    tracker.end("FINISHED")
    return summary


def _maybe_resume(env: WorkerEnv, trainable: Trainable, run_dir: Path, tc: TrainConfig,
                  local_mode: bool) -> tuple[Progress, int | None, Path | None, dict | None]:
    """Load the newest checkpoint of the run, if any.

    Returns ``(progress, step resumed from or None, unmanaged, feed)``; ``unmanaged`` is the loaded
    checkpoint when Ray never registered it (second case below), so that the loop deletes it
    once newer ones replace it (Ray's ``num_to_keep`` only deletes what it registered); ``feed``
    is the feed's position saved with it (``{}`` when it has none; None without a checkpoint).

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
            return Progress(), None, None, None
        progress, rng_ok = load_checkpoint(directory, modules=trainable.modules, optimizers=env.optimizers,
                                           schedulers=env.schedulers, rank=env.rank)
        feed = dict((read_progress(directory)[1].get("meta") or {}).get("feed") or {})
    env.reapply_schedule()
    if not rng_ok:  # no RNG state for this rank (more workers than at save time): a fresh, deterministic one
        seed_everything(tc.seed + env.rank + 1_000_003 * progress.step)
    if env.is_rank0:
        log.info("resumed from %s: step %d, epoch %d, %d samples seen", directory.name, progress.step,
                 progress.epoch, progress.samples_seen)
    # Ray prunes only what it registered; in local mode the loop prunes every checkpoint itself.
    return progress, progress.step, (directory if from_disk and not local_mode else None), feed


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
               tracker, run_dir: Path, unmanaged: Path | None, feed_state: Mapping[str, Any] | None = None) -> dict:
    tc: TrainConfig = config["train"]
    resources: WorkerResources = config["resources"]
    crash: CrashAt | None = config["crash_at"]
    per_worker = tc.batch_size // env.world_size
    meter = _Meter(tc, env, progress.step, task.log_keys)
    last_metrics: dict[str, float] = {}
    last_ckpt: Path | None = None
    history: list[dict[str, float]] = []  # every logged interval of this attempt (small: one dict per log)
    for module in trainable.modules.values():
        module.train()

    if progress.step >= tc.steps and env.is_rank0:
        log.info("run already at step %d of %d: nothing to train", progress.step, tc.steps)
    epochs, start_index, identity = _epoch_source(config, env, progress, feed_state)
    position = {**identity, "epoch": progress.epoch, "index": start_index}  # saved in checkpoints
    with Feed(task, env, epochs, start_step=progress.step, steps=max(0, tc.steps - progress.step),
              start_epoch=progress.epoch, start_index=start_index, depth=tc.prefetch_batches) as feed:
        for item in feed:
            if isinstance(item, EpochEnd):
                if item.batches == 0:
                    raise RuntimeError(f"the training split gave worker {env.rank} no batch of {per_worker} rows: it "
                                       f"has fewer than batch_size={tc.batch_size} rows in all; add data or lower "
                                       "train.batch_size")
                progress.epoch += 1  # the pass ran to its end
                position.update(epoch=progress.epoch, index=0)
                continue
            run_step(task, env, item.batch, progress.step, meter)
            progress.step += 1
            progress.samples_seen += tc.batch_size
            position.update(epoch=item.epoch, index=item.index + 1)
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
                    last_ckpt = _checkpoint(env, trainable, progress, resources, run_dir, tc, last_metrics, task,
                                            feed=dict(position))
                if unmanaged is not None and env.is_rank0 and _superseded(unmanaged, run_dir, tc.keep_checkpoints):
                    shutil.rmtree(unmanaged, ignore_errors=True)
                    unmanaged = None
            if step >= tc.steps:
                break

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


def run_step(task: TrainTask, env: WorkerEnv, batch: Mapping[str, Any], step: int, meter: "_Meter") -> None:
    """One training step as the loop runs it (the benchmarks call this too): the task's step, the
    LR schedules, the logs into the meter (kept as tensors until it logs)."""
    meter.add(task.train_step(batch, env, step))
    env.step_schedulers()


def _epoch_source(config: dict, env: WorkerEnv, progress: Progress, feed_state: Mapping[str, Any] | None):
    """``(epochs(epoch, start) -> batches, index of the first batch in progress.epoch, identity)``;
    ``identity`` describes the feed in checkpoints (with the position added).

    In memory, the order of an epoch depends on (seed, epoch) alone, so a resumed run continues
    the interrupted epoch at the batch it had reached (saved in the checkpoint). A stream cannot
    seek: a resumed run starts a fresh pass.
    """
    import ray
    import ray.train

    tc: TrainConfig = config["train"]
    ref = config.get("train_in_memory")
    if ref is None:
        shard = ray.train.get_dataset_shard("train")
        per_worker = tc.batch_size // env.world_size
        return (lambda epoch, start: iter_stream_epoch(shard, per_worker, tc, env.rank, epoch)), 0, {"mode": "stream"}
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


def _superseded(directory: Path, run_dir: Path, keep: int) -> bool:
    step = read_progress(directory)[0].step
    return sum(1 for s, _ in list_checkpoints(run_dir) if s > step) >= keep


def iter_stream_epoch(shard, per_worker: int, tc: TrainConfig, rank: int,
                      epoch: int) -> Iterator[dict[str, np.ndarray]]:
    """One pass of the streaming feed: this worker's Ray Data shard in numpy batches of ``per_worker`` rows."""
    # drop_last: every rank then takes the same number of steps per pass (the split is equal),
    # so no rank waits in an all-reduce for a batch that never comes.
    shuffle = {"local_shuffle_buffer_size": tc.shuffle_buffer, "local_shuffle_seed": tc.seed + 7919 * epoch + rank} \
        if tc.shuffle_buffer else {}
    return iter(shard.iter_batches(batch_size=per_worker, batch_format="numpy", drop_last=True,
                                   prefetch_batches=tc.prefetch_batches, **shuffle))


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
                tc: TrainConfig, metrics: dict, task: TrainTask, feed: dict | None = None) -> Path:
    """Every rank writes its part and reports it (``ray.train.report`` is a collective in V2).
    ``feed``: where the feed stands (kind, epoch, batch index), for an in-memory feed to resume exactly."""
    import ray.train
    from ray.train import Checkpoint

    name = checkpoint_dir_name(progress.step)
    meta = {"task": task.name, "train": tc.model_dump(mode="json"), "feed": feed or {}}
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
                     _fmt_s(metrics["eta_s"]))
            tracker.log_metrics(metrics, step)
        self.values, self.count = {}, 0
        self.t_last, self.step_last, self.paused_s = now, step, 0.0
        return metrics


def _fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def read_run_progress(run_dir: str | Path) -> Progress | None:
    """Progress of the newest checkpoint of a run directory, or None when it has none."""
    latest = latest_checkpoint(run_dir)
    return read_progress(latest)[0] if latest is not None else None
