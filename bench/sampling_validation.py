"""Sampling settings side by side on one bundle, scored on the validation prompts (not the benchmark's).

Each setting (a JSON object of ``Model.generate`` sampling arguments: cfg_scale, temperature,
top_k, top_p, object_temperature, object_cfg_scale; ``{}`` = the bundle's defaults) draws one
image per validation prompt (``--prompts-per-task`` per task and language, the sampling search's
prompt set) with each of ``--seed-sets`` image seed sets (the search's first seed, then + 1 000 000
each), and the shapes judge scores them. One JSON line per setting:

    {"setting": {...}, "overall": [per seed set], "mean", "tasks": [{task: accuracy}...],
     "empty": [images with no object detected, per seed set],
     "single_by_shape": [{shape: [right, prompts]} of the single-object task, per seed set], "images", "seconds"}

    python bench/sampling_validation.py --bundle work/shapes-32/models/bundle \\
        --settings '[{}, {"cfg_scale": 5.0, "object_cfg_scale": 3.0}]'

Two seed sets of 768 prompts differ by 0.02-0.05 overall on the demo's bundles: read a setting
as better only when it wins on both.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from visgen.eval.geneval import score_generations  # noqa: E402
from visgen.eval.judge import load_judge  # noqa: E402
from visgen.eval.tune import SamplingSearchConfig, validation_prompts  # noqa: E402
from visgen.inference import Model  # noqa: E402

SEED_SET_STRIDE = 1_000_000


def _settings(text: str) -> list[dict]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--settings is not JSON ({e}): {text!r}") from None
    if not isinstance(value, list) or not value or not all(isinstance(v, dict) for v in value):
        raise argparse.ArgumentTypeError(f"--settings must be a non-empty JSON list of objects, got {text!r}")
    return value


def _single_by_shape(records: list[dict], per_image: list[dict]) -> dict[str, list[int]]:
    """``{shape: [right, prompts]}`` over the single-object prompts: which shapes the drawer gets wrong."""
    out: dict[str, list[int]] = {}
    for rec, im in zip(records, per_image):
        if rec["task"] == "single_object":
            tally = out.setdefault(rec["slots"]["objects"][0]["shape"], [0, 0])
            tally[0] += int(im["correct"])
            tally[1] += 1
    return dict(sorted(out.items()))


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, help="model bundle directory")
    ap.add_argument("--settings", type=_settings, default=[{}],
                    help="JSON list of sampling settings, e.g. '[{}, {\"cfg_scale\": 5}]' (default: [{}], the bundle's)")
    ap.add_argument("--prompts-per-task", type=int, default=64, help="validation prompts per task and language (default 64)")
    ap.add_argument("--seed-sets", type=int, default=2, help="image seed sets per setting (default 2)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.seed_sets < 1 or args.prompts_per_task < 1:
        ap.error(f"--seed-sets and --prompts-per-task must be >= 1, got {args.seed_sets} and {args.prompts_per_task}")
    torch.set_num_threads(args.threads)
    model = Model.load(args.bundle, device="cpu")
    judge = load_judge(None)
    cfg = SamplingSearchConfig(prompts_per_task=args.prompts_per_task)
    records = validation_prompts(cfg)
    texts = [r["prompt"] for r in records]
    rows = []
    for setting in args.settings:
        t0 = time.perf_counter()
        runs = []
        for k in range(args.seed_sets):
            images = model.generate(texts, seed=cfg.image_seed + k * SEED_SET_STRIDE, batch_size=args.batch_size,
                                    **setting)
            runs.append(score_generations(records, images, judge))
        overall = [round(r["overall"], 4) for r in runs]
        row = {"setting": setting, "overall": overall, "mean": round(sum(overall) / len(overall), 4),
               "tasks": [{t: round(v["accuracy"], 4) for t, v in r["tasks"].items()} for r in runs],
               "empty": [sum(not im["detections"] for im in r["per_image"]) for r in runs],
               "single_by_shape": [_single_by_shape(records, r["per_image"]) for r in runs],
               "images": len(texts), "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
