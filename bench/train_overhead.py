"""Ray Train step overhead: the same VQ training steps with and without Ray, on CPU.

Three ways to run the identical loop (same model, same in-memory images, same steps, same
thread count):

* ``plain``  — a bare PyTorch loop in this process (``ImageTokenizerTask.train_step`` on
  slices of a numpy array);
* ``local``  — Ray Train local mode (``num_workers=0``): the shared loop, fed by Ray Data;
* ``worker`` — Ray Train with one worker actor (the real distributed path minus DDP).

Steps/s are measured in steady state: over the second half of the steps, after data
pipelines and worker processes have started (their one-off start-up cost is printed
separately as ``wall_s``). Each variant runs ``--repeats`` times, interleaved, and the best
is kept, because other processes on a shared machine only ever slow a run down.

    python bench/train_overhead.py                    # small preset, 32 px, batch 32
    python bench/train_overhead.py --steps 200 --threads 2

Prints one JSON line per run and a summary with the overhead of each Ray variant
(target: <= 5 %).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np


def scenes(n: int, res: int, seed: int = 0) -> np.ndarray:
    """(n, res, res, 3) uint8: flat backgrounds with one rectangle each."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, res, res, 3), np.uint8)
    for i in range(n):
        out[i] = rng.integers(0, 256, 3)
        x, y = rng.integers(0, res // 2, 2)
        w, h = rng.integers(res // 4, res // 2 + 1, 2)
        out[i, y:y + h, x:x + w] = rng.integers(0, 256, 3)
    return out


def run_plain(images: np.ndarray, cfg, tc, threads: int) -> dict:
    import torch

    from visgen.train.checkpoint import seed_everything
    from visgen.train.image_tokenizer import ImageTokenizerTask
    from visgen.train.loop import WorkerEnv

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    seed_everything(tc.seed)
    env = WorkerEnv(tc, torch.device("cpu"))
    task = ImageTokenizerTask(cfg)
    env.build_optimizers(task.setup(env).param_groups)
    half, bs, n = tc.steps // 2, tc.batch_size, len(images)
    for step in range(tc.steps):
        if step == half:
            t_half = time.perf_counter()
        i = (step * bs) % (n - bs + 1)
        task.train_step({"image": images[i:i + bs]}, env, step)
        env.step_schedulers()
    t1 = time.perf_counter()
    return {"steps_per_s": (tc.steps - half) / (t1 - t_half), "wall_s": t1 - t0}


def run_ray(ds, cfg, tc, num_workers: int, threads: int) -> dict:
    from visgen.train.config import ScalingConfig
    from visgen.train.image_tokenizer import ImageTokenizerTask
    from visgen.train.loop import fit

    scaling = ScalingConfig(num_workers=num_workers, cpus_per_worker=threads, data_cpus=0)
    with tempfile.TemporaryDirectory() as storage:
        t0 = time.perf_counter()
        res = fit(ImageTokenizerTask(cfg), train=tc, scaling=scaling, run_name="bench", storage_path=storage,
                  datasets={"train": ds})
        wall = time.perf_counter() - t0
    steady = res.history[-1]  # the second log interval: steps half+1 .. steps
    assert steady["step"] == tc.steps, res.history
    return {"steps_per_s": steady["steps_per_s"], "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", help="VQ preset (tiny|small|base)")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads in every variant")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    import ray

    from visgen.models.vq import vq_config
    from visgen.train.config import TrainConfig

    cfg = vq_config(args.preset)
    # One checkpoint (at the end, outside the measured interval), two log intervals, no eval.
    tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=1e-3, log_every=args.steps // 2,
                     checkpoint_every=args.steps, max_failures=0, precision="fp32")
    images = scenes(args.steps * args.batch_size // 2, cfg.resolution)  # two passes over the data
    ray.init(num_cpus=max(2, args.threads), include_dashboard=False, configure_logging=False, log_to_driver=False)
    ds = ray.data.from_items([{"image": im} for im in images], override_num_blocks=4).materialize()

    best: dict[str, dict] = {}
    for rep in range(args.repeats):
        for name in ("plain", "local", "worker"):
            if name == "plain":
                r = run_plain(images, cfg, tc, args.threads)
            else:
                r = run_ray(ds, cfg, tc, 0 if name == "local" else 1, args.threads)
            r = {"variant": name, "repeat": rep, **{k: round(v, 3) for k, v in r.items()}}
            print(json.dumps(r), flush=True)
            if name not in best or r["steps_per_s"] > best[name]["steps_per_s"]:
                best[name] = r
    base = best["plain"]["steps_per_s"]
    summary = {"preset": args.preset, "batch_size": args.batch_size, "steps": args.steps, "threads": args.threads,
               **{f"{k}_steps_per_s": v["steps_per_s"] for k, v in best.items()},
               **{f"{k}_overhead_pct": round(100 * (base / v["steps_per_s"] - 1), 2) for k, v in best.items() if k != "plain"}}
    print(json.dumps({"summary": summary}))


if __name__ == "__main__":
    main()
