"""Transformer training steps fed four ways: from the device, from host memory, and the two live feeds.

The script writes a parquet token cache into a temporary directory (the token-cache columns:
``key``, ``caption``, ``text_ids`` list<int32>, ``image_ids`` list<int32>, ``fingerprint``;
random ids, since only their shapes matter for speed), then runs the same training loop --
``visgen.train.worker.run_step``: the transformer trainer's own step
(``visgen.train.lm.LMTask.train_step``), the LR schedule, the logs kept as the loop keeps them
and read every ``--log-every`` steps -- on four feeds, side by side:

* ``device`` -- the batches already in the training device's memory (the task's ``collate``
  applied and the result copied to the device beforehand), replayed from a list: the loop
  with a free feed, the reference;
* ``host``   -- the same numpy batches held in a Python list, through the loop's ``Feed``
  (feed thread: ``collate``, pinned memory; copy to the device one step ahead);
* ``memory`` -- the training split read into memory once (``data_in_memory``: what
  ``auto`` picks for a token cache of this size), drawn through the ``Feed`` with the
  per-epoch shuffle: the live path of ``visgen train lm`` when the split fits;
* ``stream`` -- ``ray.data.read_parquet`` over the cache streamed through the ``Feed``
  (``data_in_memory: false``; numpy batches, ``drop_last``, ``prefetch_batches``).

The step (as ``LMTask`` does it today) assembles the token sequences with the model's
``Layout`` (half the batch text -> image, 10 % of those with the null prompt, half image ->
text), then forward, backward, gradient clipping, AdamW (fp32 on CPU; bf16 autocast and
``torch.compile`` on GPU). Steps/s count over the steps after ``--warmup`` (start-up
excluded; a feed's time to its first batch is printed as ``first_batch_s``). The feeds
alternate ``--repeats`` times and the best run of each counts, since other processes on a
shared machine only ever slow a run down.

    python bench/lm_feed.py                               # small preset, 8x8 tokens, batch 32, CPU
    python bench/lm_feed.py --device cuda --batch-size 256 --rows 32000 --max-text-tokens 24 \
        --steps 400 --warmup 50 --cpus 16 --threads 0     # the one-GPU case
    python bench/lm_feed.py --dry-run --device cpu        # every code path at tiny sizes

Prints one JSON line per run, a table, and a JSON summary whose ``ratio`` is live / device
(live = the feed ``data_in_memory: auto`` picks; target >= 0.9).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Ray starts its workers at nice 15; on a machine shared with other jobs that starves the read
# tasks the ``stream`` path depends on (see bench/ingest.py).
os.environ.setdefault("RAY_worker_niceness", "0")
# OpenMP workers spinning for a descheduled sibling waste the cores Ray Data needs (see lm_decode.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

FEEDS = ("device", "host", "memory", "stream")
DRY_RUN = dict(preset="tiny", grid=(2, 2), batch_size=8, steps=6, warmup=2, repeats=1, text_vocab=64, codebook=32,
               max_text_tokens=8, files=2, log_every=2)


def write_token_cache(out: str, rows: int, files: int, text_vocab: int, codebook: int, n_image: int,
                      max_text_tokens: int, seed: int = 0) -> str:
    """``rows`` random rows in ``files`` parquet files under ``out``; returns ``out``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from visgen.text.tokenizer import SPECIAL_TOKENS

    rng = np.random.default_rng(seed)
    list_i32 = pa.list_(pa.int32())
    os.makedirs(out, exist_ok=True)
    for f, part in enumerate(np.array_split(np.arange(rows), files)):
        n = len(part)
        lengths = rng.integers(4, max_text_tokens + 1, n)
        text_flat = rng.integers(len(SPECIAL_TOKENS), text_vocab, int(lengths.sum()), dtype=np.int32)
        text = pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)),
                                        pa.array(text_flat))
        image = pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * n_image, n_image, dtype=np.int32)),
                                         pa.array(rng.integers(0, codebook, n * n_image, dtype=np.int32)))
        table = pa.table({"key": pa.array([f"{i:08d}" for i in part]), "caption": pa.array(["-"] * n),
                          "text_ids": text.cast(list_i32), "image_ids": image.cast(list_i32),
                          "fingerprint": pa.array(["bench"] * n)})
        pq.write_table(table, os.path.join(out, f"part-{f:05d}.parquet"))
    return out


class Trainer:
    """A task (by default the transformer trainer, ``LMTask``) set up on one worker environment,
    as the shared loop drives it; one object serves every feed."""

    def __init__(self, cfg, tc, device: str, task=None):
        import torch

        from visgen.inference import SamplingConfig
        from visgen.train.lm import LMRecipe, LMTask
        from visgen.train.task import WorkerEnv
        from visgen.train.worker import Meter

        torch.manual_seed(0)
        self.tc = tc
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())  # as the loop's workers get it
        self.env = WorkerEnv(tc, dev)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            torch.backends.cuda.matmul.allow_tf32 = True  # as the loop's workers set them
            torch.backends.cudnn.allow_tf32 = True
        self.task = task if task is not None else LMTask(cfg, LMRecipe(), SamplingConfig())
        self.env.build_optimizers(self.task.setup(self.env).param_groups)
        self.model = self.task.model
        self.meter = Meter(tc, self.env, 0, self.task.log_keys)
        self.last: dict = {}

    @property
    def has_collate(self) -> bool:
        from visgen.train.task import TrainTask

        return type(self.task).collate is not TrainTask.collate

    def step(self, batch, step: int) -> float:
        """One step of the loop (``run_step``) on a numpy batch, collated here; returns the loss."""
        from visgen.train.worker import run_step

        run_step(self.task, self.env, self.task.collate(batch, self.env, step), step, self.meter)
        return self.flush(step + 1)["loss"]

    def flush(self, step: int) -> dict:
        """Read the logs as the loop does at a log step (the one wait for the device)."""
        self.last = self.meter.flush(step, 0, _NoTracker())
        return self.last

    def sync(self) -> None:
        import torch

        if self.env.device.type == "cuda":
            torch.cuda.synchronize(self.env.device)


class _NoTracker:
    def log_metrics(self, metrics, step) -> None:
        pass


def timed_run(trainer: Trainer, items, steps: int, warmup: int, log_every: int) -> dict:
    """Run the loop's steps on the first ``steps`` batches of ``items`` (FeedItems or batches);
    steady-state steps/s after ``warmup``. Logs are read every ``log_every`` steps, as in the loop."""
    from visgen.train.feed import EpochEnd, FeedItem
    from visgen.train.worker import run_step

    trainer.meter = type(trainer.meter)(trainer.tc, trainer.env, 0, trainer.task.log_keys)
    t0 = time.perf_counter()
    first = t_warm = None
    n = 0
    for item in items:
        if isinstance(item, EpochEnd):
            continue
        batch = item.batch if isinstance(item, FeedItem) else item
        if n == 0:
            first = time.perf_counter() - t0
        if n == warmup:
            trainer.sync()
            t_warm = time.perf_counter()
        run_step(trainer.task, trainer.env, batch, n, trainer.meter)
        n += 1
        if n % log_every == 0 or n == steps:
            trainer.flush(n)
        if n == steps:
            break
    trainer.sync()
    if n < steps:
        raise RuntimeError(f"the feed gave {n} batches, fewer than --steps {steps}")
    t1 = time.perf_counter()
    return {"steps_per_s": (steps - warmup) / (t1 - t_warm), "first_batch_s": first, "wall_s": t1 - t0,
            "loss": trainer.last.get("loss", trainer.last.get("g_loss", float("nan")))}


def measure_feeds(trainer: Trainer, dataset, *, feeds=FEEDS, steps: int, warmup: int, repeats: int,
                  log_every: int, emit=print) -> dict:
    """Run ``trainer`` on each feed ``repeats`` times, interleaved; best run per feed and context figures.

    ``dataset``: the Ray Dataset of the training split (already restricted to the task's columns).
    """
    from visgen.train.feed import EpochEnd, Feed, iter_stream_epoch, map_tensors, read_in_memory

    tc, env, task = trainer.tc, trainer.env, trainer.task
    unknown = sorted(set(feeds) - set(FEEDS))
    if unknown:
        raise ValueError(f"unknown feed(s) {unknown}; choose from {list(FEEDS)}")
    t0 = time.perf_counter()
    data = read_in_memory(dataset)  # also starts Ray's worker processes
    read_s = time.perf_counter() - t0
    per_epoch = data.batches_per_epoch(tc.batch_size)
    if per_epoch == 0:
        raise ValueError(f"{data.num_rows} rows do not make one batch of {tc.batch_size}")
    held = min(steps, per_epoch)
    host = list(itertools.islice(data.iter_epoch(0, seed=tc.seed, global_batch=tc.batch_size), held))
    device = [map_tensors(task.collate(b, env, i), lambda t: t.to(env.device)) for i, b in enumerate(host)]

    def feed(epochs):
        return Feed(task, env, epochs, start_step=0, steps=steps, depth=tc.prefetch_batches)

    def memory_epochs(epoch, start):
        return data.iter_epoch(epoch, seed=tc.seed, global_batch=tc.batch_size, start=start)

    def stream_epochs(epoch, start):
        return iter_stream_epoch(dataset, tc.batch_size, tc, rank=0, epoch=epoch)

    sources = {
        "device": lambda: itertools.islice(itertools.cycle(device), steps),
        "host": lambda: feed(lambda epoch, start: iter(host)),
        "memory": lambda: feed(memory_epochs),
        "stream": lambda: feed(stream_epochs),
    }

    def feed_only(epochs) -> float:  # batches/s the feed delivers with no step to run
        t = time.perf_counter()
        with feed(epochs) as f:
            n = sum(1 for item in f if not isinstance(item, EpochEnd))
        trainer.sync()
        return n / (time.perf_counter() - t)

    context = {f"{name}_feed_only_batches_per_s": round(feed_only(e), 2)
               for name, e in (("memory", memory_epochs), ("stream", stream_epochs)) if name in feeds}
    best: dict[str, dict] = {}
    for rep in range(repeats):
        for name in [f for f in FEEDS if f in feeds]:
            items = sources[name]()
            try:
                r = timed_run(trainer, items, steps, warmup, log_every)
            finally:
                if hasattr(items, "close"):
                    items.close()
            r = {"feed": name, "repeat": rep, **{k: round(v, 4) for k, v in r.items()},
                 "load1": round(os.getloadavg()[0], 2)}
            emit(json.dumps(r))
            if name not in best or r["steps_per_s"] > best[name]["steps_per_s"]:
                best[name] = r
    auto = "memory" if data.nbytes <= tc.data_in_memory_max_mb * 2**20 else "stream"
    out = {f"{name}_steps_per_s": best[name]["steps_per_s"] for name in best}
    out |= {f"{name}_first_batch_s": best[name]["first_batch_s"] for name in best if name != "device"}
    if "device" in best:
        out |= {f"{name}_over_device": round(best[name]["steps_per_s"] / best["device"]["steps_per_s"], 3)
                for name in best if name != "device"}
    live = auto if auto in best else next((f for f in ("memory", "stream", "host") if f in best), None)
    out |= {"live_feed": live, "ratio": out.get(f"{live}_over_device") if live else None,
            "collate": trainer.has_collate, "rows": data.num_rows, "split_mib": round(data.nbytes / 2**20, 2),
            "read_in_memory_s": round(read_s, 2), "batches_per_epoch": per_epoch, **context}
    return out


def run(preset: str = "small", grid: tuple[int, int] = (8, 8), batch_size: int = 32, steps: int = 40,
        warmup: int = 5, repeats: int = 2, text_vocab: int = 2048, codebook: int = 1024,
        max_text_tokens: int = 48, files: int = 8, prefetch_batches: int = 2, device: str = "auto",
        threads: int = 1, cpus: int = 2, rows: int | None = None, log_every: int = 20,
        feeds=FEEDS, emit=print) -> dict:
    """Write the cache, run the feeds ``repeats`` times interleaved; return the summary dict."""
    import ray
    import torch

    from visgen.models.gpt import gpt_config
    from visgen.train.config import TrainConfig
    from visgen.train.lm import LMTask, assemble

    if not 0 <= warmup < steps:
        raise ValueError(f"need 0 <= warmup < steps, got warmup={warmup}, steps={steps}")
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (half text -> image, half image -> text), got {batch_size}")
    device = _device(device)
    if threads:
        torch.set_num_threads(threads)
    cfg = gpt_config(preset, text_vocab=text_vocab, codebook_size=codebook, max_text_tokens=max_text_tokens, grid=grid)
    # A constant learning rate: every run trains at the same rate whatever came before it.
    tc = TrainConfig(steps=steps, batch_size=batch_size, prefetch_batches=prefetch_batches, schedule="constant",
                     weight_decay=0.05, log_every=log_every)
    trainer = Trainer(cfg, tc, device)

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    tmp = tempfile.mkdtemp(prefix="visgen-bench-lm-feed-")
    try:
        cache = write_token_cache(os.path.join(tmp, "train"), rows or steps * batch_size, files, text_vocab, codebook,
                                  trainer.model.layout.n_image, max_text_tokens)
        dataset = ray.data.read_parquet(cache).select_columns(list(LMTask.columns))
        summary = measure_feeds(trainer, dataset, feeds=feeds, steps=steps, warmup=warmup, repeats=repeats,
                                log_every=log_every, emit=emit)
        batch = next(iter(dataset.iter_batches(batch_size=batch_size, batch_format="numpy")))
        t0 = time.perf_counter()
        for _ in range(8):  # for context: the per-row sequence assembly LMTask.train_step does today
            assemble(list(batch["text_ids"]), np.stack(list(batch["image_ids"])), trainer.model.layout, batch_size // 2)
        assemble_ms = 1000 * (time.perf_counter() - t0) / 8
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if started_ray:
            ray.shutdown()

    return {
        "task": "lm", "preset": preset, "params_M": round(trainer.model.num_params() / 1e6, 2), "grid": list(grid),
        "seq_len": trainer.model.layout.length, "batch_size": batch_size, "steps": steps, "warmup": warmup,
        "repeats": repeats, "log_every": log_every, "device": device, "threads": torch.get_num_threads(),
        "ray_cpus": cpus, **summary,
        "tokens_per_s": round(summary.get(f"{summary['live_feed']}_steps_per_s", 0) * batch_size
                              * trainer.model.layout.length, 1),
        "assemble_ms": round(assemble_ms, 3), "load1": round(os.getloadavg()[0], 2),
    }


def _device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: torch sees no CUDA device here")
    return device


def print_table(s: dict, out=sys.stdout) -> None:
    if s["task"] == "lm":
        what = f"{s['preset']} ({s['params_M']} M params), grid {s['grid'][0]}x{s['grid'][1]}, sequence {s['seq_len']}"
    else:
        what = s.get("model", s["task"])
    print(f"\n{what}, batch {s['batch_size']}, {s['steps'] - s['warmup']} timed steps, logs read every "
          f"{s['log_every']}, best of {s['repeats']}, {s['device']} ({s['threads']} torch thread(s), Ray "
          f"{s['ray_cpus']} CPUs), load {s['load1']}", file=out)
    print(f"  {'feed':<8} {'steps/s':>9} {'/ device':>9}", file=out)
    for name in FEEDS:
        if f"{name}_steps_per_s" not in s:
            continue
        ratio = s.get(f"{name}_over_device")
        first = s.get(f"{name}_first_batch_s")
        print(f"  {name:<8} {s[f'{name}_steps_per_s']:>9.3f} {'' if ratio is None else f'{ratio:.3f}':>9}"
              + (f"   (first batch after {first:.2f} s)" if first is not None else ""), file=out)
    if s.get("ratio") is not None:
        print(f"  live ({s['live_feed']}) / device: {s['ratio']:.3f}   (target >= 0.9)", file=out)
    if not s["collate"]:
        print("  note: the task has no collate hook, so its step builds its tensors from host numpy arrays on "
              "every feed; the device feed then differs from host only by the feed thread", file=out)
    ctx = [f"{k.removesuffix('_feed_only_batches_per_s')} {v:.1f}" for k, v in s.items() if k.endswith("_feed_only_batches_per_s")]
    if ctx:
        print(f"  for context: the feeds alone deliver (batches/s): {', '.join(ctx)}; the split is {s['rows']} rows, "
              f"{s['split_mib']} MiB, read into memory in {s['read_in_memory_s']:.2f} s", file=out)
    if "assemble_ms" in s:
        print(f"  building the token sequences costs {s['assemble_ms']:.2f} ms per batch (in the step, on every feed)",
              file=out)


def parse_grid(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"grid must look like 8x8, got {text!r}") from None
    return h, w


def parse_feeds(text: str) -> tuple[str, ...]:
    feeds = tuple(f.strip() for f in text.split(",") if f.strip())
    bad = [f for f in feeds if f not in FEEDS]
    if bad or not feeds:
        raise argparse.ArgumentTypeError(f"feeds must be a comma-separated subset of {','.join(FEEDS)}, got {text!r}")
    return feeds


def common_args(p: argparse.ArgumentParser) -> None:
    """The options every feed benchmark takes."""
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=40, help="steps per run")
    p.add_argument("--warmup", type=int, default=5, help="leading steps of each run left out of steps/s")
    p.add_argument("--repeats", type=int, default=2, help="runs of each feed, interleaved; the best counts")
    p.add_argument("--rows", type=int, default=None, help="rows in the training split (default: steps x batch size, "
                   "one epoch per run)")
    p.add_argument("--log-every", type=int, default=20, help="TrainConfig.log_every: the loop reads the logs "
                   "(waits for the device) every this many steps")
    p.add_argument("--prefetch-batches", type=int, default=2, help="TrainConfig.prefetch_batches")
    p.add_argument("--feeds", type=parse_feeds, default=FEEDS, help=f"comma-separated subset of {','.join(FEEDS)}")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training step (0: torch's "
                   "default); the default leaves the second of two cores to the feed")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes, few steps, one repeat: checks every code "
                   "path in seconds (numbers mean nothing)")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="VisGPT preset (tiny|small|base)")
    p.add_argument("--grid", type=parse_grid, default=(8, 8), help="image tokens HxW (the CPU demo uses 8x8)")
    p.add_argument("--text-vocab", type=int, default=2048)
    p.add_argument("--codebook", type=int, default=1024)
    p.add_argument("--max-text-tokens", type=int, default=48)
    p.add_argument("--files", type=int, default=8, help="parquet files in the cache")
    common_args(p)
    args = p.parse_args(argv)
    kw = dict(preset=args.preset, grid=args.grid, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
              repeats=args.repeats, text_vocab=args.text_vocab, codebook=args.codebook,
              max_text_tokens=args.max_text_tokens, files=args.files, log_every=args.log_every, rows=args.rows)
    if args.dry_run:
        kw.update(DRY_RUN)

    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPU(s)", flush=True)
    s = run(**kw, prefetch_batches=args.prefetch_batches, device=args.device, threads=args.threads, cpus=args.cpus,
            feeds=args.feeds, emit=lambda line: print(line, flush=True))
    print_table(s)
    print(json.dumps({"summary": s}))
    return s


if __name__ == "__main__":
    main()
