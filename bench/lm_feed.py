"""Transformer training fed by live Ray Data against the same batches held in memory.

The script writes a parquet token cache into a temporary directory (the token-cache columns:
``key``, ``caption``, ``text_ids`` list<int32>, ``image_ids`` list<int32>, ``fingerprint``;
random ids, since only their shapes matter for speed), then runs the same VisGPT training
steps two ways, side by side:

* ``ray``    — ``ray.data.read_parquet`` over the cache, iterated with the training loop's own
  ``visgen.train.loop._iter_batches`` (numpy batches, ``drop_last``, ``prefetch_batches``);
* ``memory`` — the very batches a first Ray pass produced, held in a Python list: the feed
  costs nothing, the upper bound.

Both paths do the same per-batch work in the training process: the transformer trainer's own
step, ``visgen.train.lm.LMTask.train_step`` on a ``WorkerEnv`` (as the shared loop runs it):
the token sequences built with the model's ``Layout`` (half the batch text -> image, 10 % of
those with the null prompt, half image -> text), forward, backward, gradient clipping, AdamW
(fp32 on CPU; bf16 autocast and ``torch.compile`` on GPU). Steps/s count over the
steps after ``--warmup`` (pipeline and model start-up excluded; the Ray run's start-up time is
printed as ``first_batch_s``). The paths alternate ``--repeats`` times and the best run of each
counts, since other processes on a shared machine only ever slow a run down.

    python bench/lm_feed.py                               # small preset, 8x8 tokens, batch 32, CPU
    python bench/lm_feed.py --preset tiny --steps 200 --batch-size 64
    python bench/lm_feed.py --preset base --grid 16x16 --batch-size 64 --device cuda

Prints one JSON line per run, a table, and a JSON summary with ray/memory (target >= 0.95).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
# Ray starts its workers at nice 15; on a machine shared with other jobs that starves the read
# tasks the ``ray`` path depends on (see bench/ingest.py).
os.environ.setdefault("RAY_worker_niceness", "0")
# OpenMP workers spinning for a descheduled sibling waste the cores Ray Data needs (see lm_decode.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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
    """The transformer trainer's own step (``visgen.train.lm.LMTask.train_step``) on one worker
    environment, as the shared loop drives it; one object serves both feeds."""

    def __init__(self, cfg, tc, device: str):
        import torch

        from visgen.pipeline import SamplingConfig
        from visgen.train.lm import LMRecipe, LMTask
        from visgen.train.loop import WorkerEnv

        torch.manual_seed(0)
        self.env = WorkerEnv(tc, torch.device(device))
        self.task = LMTask(cfg, LMRecipe(), SamplingConfig())
        self.env.build_optimizers(self.task.setup(self.env).param_groups)
        self.model = self.task.model

    def step(self, batch: dict[str, np.ndarray], step: int) -> float:
        """Assemble the sequences (half text -> image with 10 % null prompts, half image -> text
        by the task's recipe), forward, backward, clip, AdamW; returns the loss."""
        logs = self.task.train_step(batch, self.env, step)
        self.env.step_schedulers()
        return logs["loss"]

    def sync(self) -> None:
        import torch

        if self.env.device.type == "cuda":
            torch.cuda.synchronize()


def timed_run(trainer: Trainer, batches, steps: int, warmup: int) -> dict:
    """Train on the first ``steps`` batches of ``batches``; steady-state steps/s after ``warmup``."""
    t0 = time.perf_counter()
    first = t_warm = None
    n = 0
    loss = None
    for batch in batches:
        if n == 0:
            first = time.perf_counter() - t0
        if n == warmup:
            trainer.sync()
            t_warm = time.perf_counter()
        loss = trainer.step(batch, n)
        n += 1
        if n == steps:
            break
    trainer.sync()
    if n < steps:
        raise RuntimeError(f"the feed gave {n} batches, fewer than --steps {steps}")
    t1 = time.perf_counter()
    return {"steps_per_s": (steps - warmup) / (t1 - t_warm), "first_batch_s": first, "wall_s": t1 - t0,
            "loss": loss}


def run(preset: str = "small", grid: tuple[int, int] = (8, 8), batch_size: int = 32, steps: int = 40,
        warmup: int = 5, repeats: int = 2, text_vocab: int = 2048, codebook: int = 1024,
        max_text_tokens: int = 48, files: int = 8, prefetch_batches: int = 2, device: str = "auto",
        threads: int = 1, cpus: int = 2, emit=print) -> dict:
    """Write the cache, run both feeds ``repeats`` times interleaved; return the summary dict."""
    import ray
    import torch

    from visgen.models.gpt import gpt_config
    from visgen.train.config import TrainConfig
    from visgen.train.lm import assemble
    from visgen.train.loop import _iter_batches

    if not 0 <= warmup < steps:
        raise ValueError(f"need 0 <= warmup < steps, got warmup={warmup}, steps={steps}")
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 (half text -> image, half image -> text), got {batch_size}")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if threads:
        torch.set_num_threads(threads)
    cfg = gpt_config(preset, text_vocab=text_vocab, codebook_size=codebook, max_text_tokens=max_text_tokens, grid=grid)
    # A constant learning rate: every run trains at the same rate whatever came before it.
    tc = TrainConfig(steps=steps, batch_size=batch_size, prefetch_batches=prefetch_batches, schedule="constant",
                     weight_decay=0.05)
    trainer = Trainer(cfg, tc, device)

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    tmp = tempfile.mkdtemp(prefix="visgen-bench-lm-feed-")
    try:
        cache = write_token_cache(os.path.join(tmp, "train"), steps * batch_size, files, text_vocab, codebook,
                                  trainer.model.layout.n_image, max_text_tokens)

        def ray_batches():
            return _iter_batches(ray.data.read_parquet(cache), batch_size, tc, rank=0, epoch=0)

        # The first pass materialises the in-memory batches and starts Ray's worker processes.
        memory = list(ray_batches())
        # For context: what Ray Data alone delivers, with nothing else to do.
        t0 = time.perf_counter()
        feed_only = sum(1 for _ in ray_batches()) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for b in memory[:8]:
            assemble(list(b["text_ids"]), np.stack(list(b["image_ids"])), trainer.model.layout,
                     len(b["text_ids"]) // 2)
        assemble_ms = 1000 * (time.perf_counter() - t0) / min(8, len(memory))

        best: dict[str, dict] = {}
        for rep in range(repeats):
            for name in ("memory", "ray"):
                r = timed_run(trainer, iter(memory) if name == "memory" else ray_batches(), steps, warmup)
                r = {"feed": name, "repeat": rep, **{k: round(v, 4) for k, v in r.items()},
                     "load1": round(os.getloadavg()[0], 2)}
                emit(json.dumps(r))
                if name not in best or r["steps_per_s"] > best[name]["steps_per_s"]:
                    best[name] = r
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if started_ray:
            ray.shutdown()

    return {
        "preset": preset, "params_M": round(trainer.model.num_params() / 1e6, 2), "grid": list(grid),
        "seq_len": trainer.model.layout.length, "batch_size": batch_size, "steps": steps, "warmup": warmup,
        "repeats": repeats, "device": device, "threads": torch.get_num_threads(), "ray_cpus": cpus,
        "memory_steps_per_s": best["memory"]["steps_per_s"], "ray_steps_per_s": best["ray"]["steps_per_s"],
        "ratio": round(best["ray"]["steps_per_s"] / best["memory"]["steps_per_s"], 3),
        "tokens_per_s": round(best["ray"]["steps_per_s"] * batch_size * trainer.model.layout.length, 1),
        "ray_first_batch_s": best["ray"]["first_batch_s"],
        "ray_feed_only_batches_per_s": round(feed_only, 2), "assemble_ms": round(assemble_ms, 3),
        "load1": round(os.getloadavg()[0], 2),
    }


def print_table(s: dict, out=sys.stdout) -> None:
    print(f"\n{s['preset']} ({s['params_M']} M params), grid {s['grid'][0]}x{s['grid'][1]}, sequence {s['seq_len']}, "
          f"batch {s['batch_size']}, {s['steps'] - s['warmup']} timed steps, best of {s['repeats']}, "
          f"{s['device']} ({s['threads']} torch thread(s), Ray {s['ray_cpus']} CPUs), load {s['load1']}", file=out)
    print(f"  {'feed':<8} {'steps/s':>9}", file=out)
    print(f"  {'memory':<8} {s['memory_steps_per_s']:>9.3f}", file=out)
    print(f"  {'ray':<8} {s['ray_steps_per_s']:>9.3f}   (first batch after {s['ray_first_batch_s']:.2f} s)", file=out)
    print(f"  ray / memory: {s['ratio']:.3f}   (target >= 0.95)", file=out)
    print(f"  for context: Ray Data alone delivers {s['ray_feed_only_batches_per_s']:.1f} batches/s; building the "
          f"token sequences costs {s['assemble_ms']:.2f} ms per batch (in both feeds)", file=out)


def parse_grid(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"grid must look like 8x8, got {text!r}") from None
    return h, w


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="VisGPT preset (tiny|small|base)")
    p.add_argument("--grid", type=parse_grid, default=(8, 8), help="image tokens HxW (the CPU demo uses 8x8)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=40, help="steps per run (the cache holds exactly this many batches)")
    p.add_argument("--warmup", type=int, default=5, help="leading steps of each run left out of steps/s")
    p.add_argument("--repeats", type=int, default=2, help="runs of each feed, interleaved; the best counts")
    p.add_argument("--text-vocab", type=int, default=2048)
    p.add_argument("--codebook", type=int, default=1024)
    p.add_argument("--max-text-tokens", type=int, default=48)
    p.add_argument("--files", type=int, default=8, help="parquet files in the cache")
    p.add_argument("--prefetch-batches", type=int, default=2, help="TrainConfig.prefetch_batches of the Ray feed")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training step (0: torch's "
                   "default); the default leaves the second of two cores to Ray Data's read tasks")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray instance")
    args = p.parse_args(argv)

    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPU(s)", flush=True)
    s = run(preset=args.preset, grid=args.grid, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
            repeats=args.repeats, text_vocab=args.text_vocab, codebook=args.codebook,
            max_text_tokens=args.max_text_tokens, files=args.files, prefetch_batches=args.prefetch_batches,
            device=args.device, threads=args.threads, cpus=args.cpus, emit=lambda line: print(line, flush=True))
    print_table(s)
    print(json.dumps({"summary": s}))
    return s


if __name__ == "__main__":
    main()
