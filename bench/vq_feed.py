"""Image tokenizer training steps fed four ways: from the device, from host memory, and the two live feeds.

The same comparison as ``bench/lm_feed.py`` (whose feed runner this script uses), for the VQ
image tokenizer: the script writes shapes shards (WebDataset tars of JPEGs, as ``visgen data
synth`` does) into a temporary directory, builds the training split with the real ingest
(``visgen.data.ingest.build_dataset``: tar walk, JPEG decode, resize, inside the Ray Data read
tasks), and runs the training loop's step (``visgen.train.worker.run_step`` on
``ImageTokenizerTask``: uint8 images collated and copied to the device by the loop's feed,
generator forward/backward and AdamW; bf16 autocast on GPU) on four feeds:

* ``device`` -- the uint8 image batches already in the training device's memory, replayed;
* ``host``   -- the same numpy batches in a Python list, through the loop's ``Feed``;
* ``memory`` -- the decoded split held in memory (``data_in_memory``), per-epoch shuffle;
* ``stream`` -- the ingest streamed from Ray Data, decoding JPEGs on every pass.

    python bench/vq_feed.py                                   # small preset, 32 px, batch 32, CPU
    python bench/vq_feed.py --device cuda --batch-size 256 --rows 8192 --steps 200 --warmup 30 --cpus 16 --threads 0
    python bench/vq_feed.py --dry-run --device cpu            # every code path at tiny sizes

Prints one JSON line per run, a table, and a JSON summary whose ``ratio`` is live / device
(live = the feed ``data_in_memory: auto`` picks; target >= 0.9).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

_spec = importlib.util.spec_from_file_location("visgen_bench_lm_feed", Path(__file__).resolve().with_name("lm_feed.py"))
lm_feed = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = lm_feed
_spec.loader.exec_module(lm_feed)  # also sets the Ray / OpenMP environment this benchmark needs

DRY_RUN = dict(preset="tiny", resolution=16, batch_size=8, steps=6, warmup=2, repeats=1, log_every=2, per_shard=16)


def write_shards(out: str, rows: int, resolution: int, per_shard: int, seed: int = 0) -> list[str]:
    """Shapes shards holding ``rows`` samples in all (``per_shard`` each), written in this process."""
    from visgen.data.synth import SynthConfig, write_shard

    shards = max(1, math.ceil(rows / per_shard))
    cfg = SynthConfig(output=out, num_shards=shards, samples_per_shard=per_shard, resolution=resolution, seed=seed)
    return [write_shard(cfg, i).path for i in range(shards)]


def run(preset: str = "small", resolution: int = 32, batch_size: int = 32, steps: int = 40, warmup: int = 5,
        repeats: int = 2, prefetch_batches: int = 2, device: str = "auto", threads: int = 1, cpus: int = 2,
        rows: int | None = None, log_every: int = 20, per_shard: int = 500, feeds=lm_feed.FEEDS,
        emit=print) -> dict:
    """Write the shards, run the feeds ``repeats`` times interleaved; return the summary dict."""
    import ray
    import torch

    from visgen.data.ingest import IngestConfig, build_dataset
    from visgen.models.vq import vq_config
    from visgen.train.config import TrainConfig
    from visgen.train.image_tokenizer import ImageTokenizerTask

    if not 0 <= warmup < steps:
        raise ValueError(f"need 0 <= warmup < steps, got warmup={warmup}, steps={steps}")
    device = lm_feed._device(device)
    if threads:
        torch.set_num_threads(threads)
    cfg = vq_config(preset, resolution=resolution)
    tc = TrainConfig(steps=steps, batch_size=batch_size, prefetch_batches=prefetch_batches, schedule="constant",
                     lr=1e-4, log_every=log_every)
    trainer = lm_feed.Trainer(None, tc, device, task=ImageTokenizerTask(cfg))

    started_ray = not ray.is_initialized()
    if started_ray:
        ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    tmp = tempfile.mkdtemp(prefix="visgen-bench-vq-feed-")
    try:
        n = rows or steps * batch_size
        write_shards(os.path.join(tmp, "shards"), n, resolution, min(per_shard, n))
        ingest = IngestConfig(source=os.path.join(tmp, "shards"), resolution=resolution, min_size=min(16, resolution),
                              batch_size=64, num_cpus=1.0)
        dataset = build_dataset(ingest, None, os.path.join(tmp, "quarantine"), "train") \
            .select_columns(list(ImageTokenizerTask.columns))
        summary = lm_feed.measure_feeds(trainer, dataset, feeds=feeds, steps=steps, warmup=warmup, repeats=repeats,
                                        log_every=log_every, emit=emit)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if started_ray:
            ray.shutdown()
    params = sum(p.numel() for p in trainer.model.parameters())
    return {"task": "vq", "model": f"VQ {preset} ({params / 1e6:.2f} M params), {resolution} px", "preset": preset,
            "resolution": resolution, "params_M": round(params / 1e6, 2), "batch_size": batch_size, "steps": steps,
            "warmup": warmup, "repeats": repeats, "log_every": log_every, "device": device,
            "threads": torch.get_num_threads(), "ray_cpus": cpus, **summary,
            "images_per_s": round(summary.get(f"{summary['live_feed']}_steps_per_s", 0) * batch_size, 1),
            "load1": round(os.getloadavg()[0], 2)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="VQ preset (tiny|small|base)")
    p.add_argument("--resolution", type=int, default=32, help="image side in pixels (the CPU demo uses 32)")
    p.add_argument("--per-shard", type=int, default=500, help="samples per tar shard")
    lm_feed.common_args(p)
    args = p.parse_args(argv)
    kw = dict(preset=args.preset, resolution=args.resolution, batch_size=args.batch_size, steps=args.steps,
              warmup=args.warmup, repeats=args.repeats, log_every=args.log_every, rows=args.rows,
              per_shard=args.per_shard)
    if args.dry_run:
        kw.update(DRY_RUN)

    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPU(s)", flush=True)
    s = run(**kw, prefetch_batches=args.prefetch_batches, device=args.device, threads=args.threads, cpus=args.cpus,
            feeds=args.feeds, emit=lambda line: print(line, flush=True))
    lm_feed.print_table(s)
    print(json.dumps({"summary": s}))
    return s


if __name__ == "__main__":
    main()
