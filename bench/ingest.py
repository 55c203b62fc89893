"""Ingest throughput: visgen's Ray Data pipeline against the plain ways of doing the same work.

All three read the same shards (256-px JPEG shapes scenes, img2dataset layout) and do the same
per-sample work through the same function, ``visgen.data.ingest.process_samples`` (JSON, caption
rules, JPEG decode with draft mode, EXIF, RGB, antialiased resize + centre crop, batched
tokenization), so the comparison measures the pipelines, not the decoders:

  (a) visgen: ``build_dataset`` on a local Ray with ``--cpus`` CPUs, consumed with ``count()``;
  (b) ``webdataset.WebDataset`` + ``torch.utils.data.DataLoader`` with ``--cpus`` workers;
  (c) one process in a tight loop over the tars, × ``--cpus``: the ideal, no pipeline at all;
  (d) for context, ``--cpus`` independent processes running that loop over their own shards:
      what the cores really deliver together, with no pipeline.

Prints images/s of each, then (a)/(b) and (a)/(c). Warm-up passes first start (and import into)
every worker process; then ``--rounds`` rounds run c, b, a in turn, and the best pass of each
counts.

On a machine shared with other jobs, wall-clock ratios measure the scheduler's share as much as
the pipelines, so the CPU seconds of the whole process tree (the driver, Ray's own processes and
workers, DataLoader workers; read from /proc) are reported too: images per CPU-second is the
pipeline's efficiency, and (a)/(c) on it is what (a)/(c) becomes on dedicated cores, provided
the pipeline keeps them busy.

    python bench/ingest.py                     # 16 shards x 500 samples, 64-px output, all cores
    python bench/ingest.py --cpus 2 --resolution 32 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one tokenizer thread per worker, as the cores are counted
# Ray starts its workers at nice 15 (to keep the driver and raylet responsive). On a machine shared
# with other jobs that hands Ray a sliver of the CPU the two baselines get at nice 0; run all three
# at the same priority so that the comparison is of pipelines, not of priorities.
os.environ.setdefault("RAY_worker_niceness", "0")


def _process_table() -> tuple[dict[int, list[int]], dict[int, int]]:
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # fields from "state" on
        children.setdefault(int(fields[1]), []).append(int(entry))
        ticks[int(entry)] = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return children, ticks


def descendants() -> set[int]:
    """PIDs of every live descendant of this process."""
    if not os.path.isdir("/proc/self"):
        return set()
    children, _ = _process_table()
    out, stack = set(), list(children.get(os.getpid(), []))
    while stack:
        pid = stack.pop()
        out.add(pid)
        stack += children.get(pid, [])
    return out


def tree_cpu_seconds(exclude: set[int] = frozenset()) -> float:
    """User + system CPU time of this process and its descendants (reaped ones included),
    leaving out the subtrees rooted at ``exclude`` (Ray's processes, when timing the others)."""
    if not os.path.isdir("/proc/self"):
        return float("nan")
    children, ticks = _process_table()
    total, stack = 0, [os.getpid()]
    while stack:
        pid = stack.pop()
        if pid in exclude:
            continue
        total += ticks.get(pid, 0)
        stack += children.get(pid, [])
    return total / os.sysconf("SC_CLK_TCK")


def measured(fn, exclude: set[int] = frozenset()) -> tuple[int, float, float]:
    """Run ``fn() -> (kept, wall seconds)``; add the CPU seconds its processes used meanwhile."""
    before = tree_cpu_seconds(exclude)
    kept, wall = fn()
    return kept, wall, tree_cpu_seconds(exclude) - before


def make_shards(out: Path, shards: int, per_shard: int, size: int) -> list[str]:
    from visgen.data.synth import SynthConfig, write_shard

    cfg = SynthConfig(output=str(out), num_shards=shards, samples_per_shard=per_shard, resolution=size,
                      jpeg_quality=90)
    paths = [out / f"{i:05d}.tar" for i in range(shards)]
    todo = [i for i, p in enumerate(paths) if not p.exists()]
    if todo:
        print(f"writing {len(todo)} shard(s) of {per_shard} {size}-px samples to {out} ...", flush=True)
        with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
            list(pool.map(write_shard, [cfg] * len(todo), todo))
    return [str(p) for p in paths]


def make_tokenizer(shards: list[str], path: Path) -> str:
    if not path.exists():
        from visgen.data.webdataset_source import iter_tar_samples
        from visgen.text.tokenizer import TextTokenizerConfig, train_text_tokenizer

        with open(shards[0], "rb") as f:
            captions = [s.txt.decode() for s in iter_tar_samples(f, shards[0]) if s.txt]
        train_text_tokenizer(captions, TextTokenizerConfig(vocab_size=1024, min_frequency=2)).save(path)
    return str(path)


# -- (c) one process, no pipeline ----------------------------------------------------------------

def tight_loop(shards: list[str], cfg, tokenizer_path: str) -> tuple[int, float]:
    from visgen.data.ingest import process_samples
    from visgen.data.webdataset_source import iter_tar_samples
    from visgen.text.tokenizer import TextTokenizer

    tok = TextTokenizer.load(tokenizer_path)
    kept = 0
    start = time.perf_counter()
    for shard in shards:
        with open(shard, "rb", buffering=1 << 20) as f:
            batch = []
            for sample in iter_tar_samples(f, shard, cfg.max_member_bytes):
                batch.append(sample)
                if len(batch) == cfg.batch_size:
                    kept += len(process_samples(batch, cfg, tok)[0])
                    batch = []
            if batch:
                kept += len(process_samples(batch, cfg, tok)[0])
    return kept, time.perf_counter() - start


def _tight_loop_part(part: list[str], cfg, tokenizer_path: str) -> int:
    return tight_loop(part, cfg, tokenizer_path)[0]


def independent_processes(shards: list[str], cfg, tokenizer_path: str, n: int) -> tuple[int, float]:
    """(d) ``n`` forked processes, each running the tight loop over its own shards: what the
    machine's cores really deliver with no pipeline at all (two busy processes rarely run at
    twice the speed of one: shared caches, memory bandwidth, or hyperthreads behind vCPUs)."""
    import multiprocessing as mp

    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=n, mp_context=mp.get_context("fork")) as pool:
        kept = sum(pool.map(_tight_loop_part, [shards[i::n] for i in range(n)], [cfg] * n, [tokenizer_path] * n))
    return kept, time.perf_counter() - start


# -- (b) webdataset + DataLoader -----------------------------------------------------------------

class _WdsBatches:
    """Turns webdataset's sample dicts into the same RawSample batches ingest decodes."""

    def __init__(self, cfg, tokenizer_path):
        self.cfg, self.tokenizer_path, self.tok = cfg, tokenizer_path, None

    def __call__(self, batch):
        from visgen.data.ingest import process_samples
        from visgen.data.webdataset_source import IMAGE_EXTS, RawSample
        from visgen.text.tokenizer import TextTokenizer

        if self.tok is None:
            self.tok = TextTokenizer.load(self.tokenizer_path)
        raws = []
        for d in batch:
            lower = {k.lower(): v for k, v in d.items() if not k.startswith("__")}
            ext = next((e for e in IMAGE_EXTS if e in lower), None)
            raws.append(RawSample(key=d["__key__"], shard=d["__url__"], image=lower.get(ext) if ext else None,
                                  image_name=f"{d['__key__']}.{ext}" if ext else "", txt=lower.get("txt"),
                                  json=lower.get("json")))
        good, _ = process_samples(raws, self.cfg, self.tok)
        return good


def _identity(x):
    return x


def webdataset_loader(shards: list[str], cfg, tokenizer_path: str, workers: int) -> tuple[int, float]:
    import torch.utils.data
    import webdataset as wds

    ds = (wds.WebDataset(shards, shardshuffle=False, empty_check=False, nodesplitter=wds.split_by_node,
                         workersplitter=wds.split_by_worker)
          .batched(cfg.batch_size, collation_fn=_identity, partial=True)
          .map(_WdsBatches(cfg, tokenizer_path)))
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers, collate_fn=_identity)
    start = time.perf_counter()
    kept = sum(len(d) for d in loader)
    return kept, time.perf_counter() - start


# -- (a) visgen on Ray Data --------------------------------------------------------------------------

def visgen_ray(cfg, tokenizer_path: str, qdir: str) -> tuple[int, float]:
    from visgen.data.ingest import run_ingest

    report = run_ingest(cfg, tokenizer_path, qdir)
    return report.kept, report.seconds


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--per-shard", type=int, default=500)
    p.add_argument("--size", type=int, default=256, help="side of the stored JPEGs")
    p.add_argument("--resolution", type=int, default=64, help="ingest output side")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    p.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "visgen-bench-ingest"))
    p.add_argument("--rounds", type=int, default=3, help="rounds of (c, d, b, a), interleaved so that a "
                   "change in machine load hits all three; the best pass of each counts")
    p.add_argument("--only", choices=["a", "b", "c", "d"], action="append", help="run only these pipelines")
    p.add_argument("--map-batches", action="store_true", help="run (a) with decode_in_read=False: decoding "
                   "in a map_batches stage after the read instead of inside the read tasks")
    args = p.parse_args(argv)

    from visgen.data.ingest import IngestConfig

    data = Path(args.data) / f"{args.shards}x{args.per_shard}-{args.size}px"
    shards = make_shards(data, args.shards, args.per_shard, args.size)
    tok = make_tokenizer(shards, data / "tokenizer.json")
    cfg = IngestConfig(source=str(data), resolution=args.resolution, batch_size=args.batch_size,
                       decode_in_read=not args.map_batches)
    only = set(args.only or "abcd")
    print(f"{len(shards)} shards x {args.per_shard} x {args.size}px JPEG -> {args.resolution}px, "
          f"batch {args.batch_size}, {args.cpus} CPU(s), load average {os.getloadavg()[0]:.1f}", flush=True)

    ray_pids: set[int] = set()
    qdir = tempfile.mkdtemp(prefix="visgen-bench-q-")
    pipelines = {}
    if "c" in only:
        tight_loop(shards[:1], cfg, tok)  # imports and caches
        pipelines["c_one_process"] = lambda: tight_loop(shards, cfg, tok)
    if "d" in only:
        pipelines["d_independent_processes"] = lambda: independent_processes(shards, cfg, tok, args.cpus)
    if "b" in only:
        webdataset_loader(shards[: args.cpus], cfg, tok, args.cpus)
        pipelines["b_webdataset_dataloader"] = lambda: webdataset_loader(shards, cfg, tok, args.cpus)
    if "a" in only:
        import ray

        others = descendants()
        ray.init(num_cpus=args.cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
        # One shard per CPU starts (and imports into) every worker process before timing.
        visgen_ray(cfg.model_copy(update={"source": "{" + ",".join(shards[: args.cpus]) + "}"}), tok, qdir)
        ray_pids = descendants() - others
        pipelines["a_visgen_ray"] = lambda: visgen_ray(cfg, tok, qdir)

    runs: dict[str, list[tuple[int, float, float]]] = {name: [] for name in pipelines}
    try:
        for r in range(args.rounds):
            for name, fn in pipelines.items():
                # Ray's processes idle (and are left out) while the other two run.
                kept, wall, cpu = measured(fn, exclude=set() if name.startswith("a_") else ray_pids)
                runs[name].append((kept, wall, cpu))
                print(f"  round {r + 1} {name:<24} {kept} images {wall:6.2f} s = {kept / wall:5.0f} images/s | "
                      f"{cpu:6.2f} CPU-s = {kept / cpu:5.0f} images/CPU-s | load {os.getloadavg()[0]:.1f}",
                      flush=True)
    finally:
        shutil.rmtree(qdir, ignore_errors=True)
        if "a" in only:
            import ray

            ray.shutdown()

    wall = {k: max(n / w for n, w, _ in v) for k, v in runs.items()}
    eff = {k: max(n / c for n, _, c in v) for k, v in runs.items()}
    out = {"cpus": args.cpus, "images": args.shards * args.per_shard, "resolution": args.resolution,
           **{f"{k}_images_per_s": round(v, 1) for k, v in wall.items()},
           **{f"{k}_images_per_cpu_s": round(v, 1) for k, v in eff.items()}}
    a, b, c = "a_visgen_ray", "b_webdataset_dataloader", "c_one_process"
    print("best pass of each:")
    for k in runs:
        print(f"  {k:<24} {wall[k]:6.0f} images/s   {eff[k]:6.0f} images/CPU-s")
    if c in wall:
        out["c_limit_images_per_s"] = round(wall[c] * args.cpus, 1)
        print(f"  {'c x cores (the limit)':<24} {out['c_limit_images_per_s']:6.0f} images/s")
    if a in wall and "d_independent_processes" in wall:
        d = "d_independent_processes"
        out["a_over_d"] = round(wall[a] / wall[d], 3)
        print(f"(a)/(d) visgen / {args.cpus} independent processes:    wall {out['a_over_d']:.2f}, "
              f"per CPU-second {eff[a] / eff[d]:.2f}   (for context: the cores' real limit)")
    if a in wall and b in wall:
        out["a_over_b"] = round(wall[a] / wall[b], 3)
        out["a_over_b_cpu"] = round(eff[a] / eff[b], 3)
        print(f"(a)/(b) visgen / webdataset+DataLoader:        wall {out['a_over_b']:.2f}, "
              f"per CPU-second {out['a_over_b_cpu']:.2f}   (target >= 1.0)")
    if a in wall and c in wall:
        out["a_over_c"] = round(wall[a] / out["c_limit_images_per_s"], 3)
        out["a_over_c_cpu"] = round(eff[a] / eff[c], 3)
        print(f"(a)/(c) visgen / (one process x {args.cpus} cores): wall {out['a_over_c']:.2f}, "
              f"per CPU-second {out['a_over_c_cpu']:.2f}   (target >= 0.8)")
    kept = {n for v in runs.values() for n, _, _ in v}
    if len(kept) > 1:
        print(f"WARNING: the pipelines kept different numbers of images: {sorted(kept)}", file=sys.stderr)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
