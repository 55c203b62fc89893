"""The training feed: training split -> numpy batches -> ``task.collate`` -> pinned memory -> the device.

Two sources of numpy batches: the split held in host memory (:class:`InMemoryData`, read once
when it fits, ``train.data_in_memory``; a fresh permutation every epoch from the seed, so a
resumed run continues an epoch exactly where it stopped) or this worker's Ray Data stream
(:func:`iter_stream_epoch`). :class:`Feed` runs ``collate`` in a background thread and starts the
copy of the next batch to the device one step ahead.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from visgen.train.config import TrainConfig
from visgen.train.task import TrainTask, WorkerEnv


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


def map_tensors(obj: Any, fn) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, Mapping):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_tensors(v, fn) for v in obj)
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
                            prepared = map_tensors(prepared, lambda t: t if t.is_cuda else t.pin_memory())
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
            batch = map_tensors(item.batch, lambda t: t.to(self.env.device, non_blocking=True))
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
        map_tensors(batch, lambda t: t.record_stream(current))
        return FeedItem(item.step, item.epoch, item.index, batch)

    def __iter__(self) -> Iterator[FeedItem | EpochEnd]:
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


def iter_stream_epoch(shard, per_worker: int, tc: TrainConfig, rank: int,
                      epoch: int) -> Iterator[dict[str, np.ndarray]]:
    """One pass of the streaming feed: this worker's Ray Data shard in numpy batches of ``per_worker`` rows."""
    # drop_last: every rank then takes the same number of steps per pass (the split is equal),
    # so no rank waits in an all-reduce for a batch that never comes.
    shuffle = {"local_shuffle_buffer_size": tc.shuffle_buffer, "local_shuffle_seed": tc.seed + 7919 * epoch + rank} \
        if tc.shuffle_buffer else {}
    return iter(shard.iter_batches(batch_size=per_worker, batch_format="numpy", drop_last=True,
                                   prefetch_batches=tc.prefetch_batches, **shuffle))
