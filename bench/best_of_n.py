"""Best of n against one draw, side by side on one bundle: captions and images.

Captions: held-out renders of one WebDataset shard (``--shard``, ``--offset``, ``--count``; each
sample's ``.json`` holds its scene), captioned greedily as candidate 0 plus n - 1 at the bundle's
``caption_candidate_temperature``, each in the language of its reference caption, scored with the
caption slot benchmark. Images: the GenEval-shapes benchmark through the bundle with ``candidates``
set to each n (``--images-per-prompt``). One JSON line per setting, then the ratios to n = 1:

    {"what": "captions", "candidates": 16, "slot_accuracy", "by_language": {"en", "zh"}, "seconds"}
    {"what": "images", "candidates": 8, "overall", "tasks": {...}, "by_language": {...}, "seconds"}

    python bench/best_of_n.py --bundle work/shapes-32/models/bundle --shard work/shapes-32/shards/00009.tar \\
        --offset 256 --count 256 --caption-candidates 1,8,16,32 --candidates 1,4,8

The demo evaluates the first 256 renders of its held-out shard (00009): choose settings on others.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from visgen.data.captions import detect_language  # noqa: E402
from visgen.data.shapes import Scene  # noqa: E402
from visgen.eval.bundle import geneval_bundle  # noqa: E402
from visgen.eval.captions import caption_metrics  # noqa: E402
from visgen.eval.geneval import GenEvalConfig  # noqa: E402
from visgen.inference import Model  # noqa: E402


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"candidate counts must be integers >= 1, got {text!r}")
    return values


def read_renders(shard: Path, offset: int, count: int) -> tuple[list[np.ndarray], list[Scene]]:
    """Samples ``offset .. offset + count`` (key order) of a shapes shard: RGB arrays and their scenes."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tf:
        for member in tf:
            if member.isfile() and "." in member.name:
                key, ext = member.name.split(".", 1)
                samples.setdefault(key, {})[ext.lower()] = tf.extractfile(member).read()
    keys = sorted(samples)[offset:offset + count]
    if not keys:
        raise SystemExit(f"{shard} has {len(samples)} samples: none from offset {offset}")
    images, scenes = [], []
    for key in keys:
        s = samples[key]
        data = next((s[e] for e in ("png", "jpg", "jpeg", "webp") if e in s), None)
        if data is None or "json" not in s:
            raise SystemExit(f"{shard}: sample {key} has no image or no .json scene (extensions {sorted(s)})")
        images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
        scenes.append(Scene.from_json(s["json"]))
    return images, scenes


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", required=True, help="model bundle directory")
    ap.add_argument("--shard", type=Path, help="a held-out shapes shard for the caption rows (none: no caption rows)")
    ap.add_argument("--offset", type=int, default=256, help="first render of the shard (default 256)")
    ap.add_argument("--count", type=int, default=256, help="renders captioned (default 256)")
    ap.add_argument("--caption-candidates", type=_ints, default=[1, 16], help="caption candidate counts (default 1,16)")
    ap.add_argument("--candidates", type=_ints, default=[], help="image candidate counts, e.g. 1,8 (default: no image rows)")
    ap.add_argument("--images-per-prompt", type=int, default=1, help="GenEval-shapes images per prompt (default 1)")
    ap.add_argument("--limit-per-task", type=int, default=None, help="benchmark prompts per task and language (default all)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = Model.load(args.bundle, device="cpu")
    rows: list[dict] = []

    def emit(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    if args.shard is not None:
        images, scenes = read_renders(args.shard, args.offset, args.count)
        langs = [detect_language(s.caption or "") for s in scenes]
        for k in args.caption_candidates:
            t0 = time.perf_counter()
            preds = model.caption(images, language=langs, temperature=0.0, candidates=k)
            seconds = time.perf_counter() - t0
            m = caption_metrics(preds, scenes, languages=langs)
            emit({"what": "captions", "candidates": k, "slot_accuracy": round(m["slot_accuracy"], 4),
                  "by_language": {lang: round(v["slot_accuracy"], 4) for lang, v in m["by_language"].items()},
                  "captions": len(preds), "seconds": round(seconds, 2)})
    base = model.sampling
    for k in args.candidates:
        model.sampling = base.model_copy(update={"candidates": k})
        cfg = GenEvalConfig(images_per_prompt=args.images_per_prompt, limit_per_task=args.limit_per_task)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            g = geneval_bundle(model, cfg, Path(out))
        emit({"what": "images", "candidates": k, "overall": round(g["overall"], 4),
              "tasks": {t: round(v["accuracy"], 4) for t, v in g["tasks"].items()},
              "by_language": {lang: round(v["overall"], 4) for lang, v in g["by_language"].items()},
              "images": sum(v["images"] for v in g["tasks"].values()), "seconds": round(time.perf_counter() - t0, 2)})
    model.sampling = base
    for what, key in (("captions", "slot_accuracy"), ("images", "overall")):
        one = next((r for r in rows if r["what"] == what and r["candidates"] == 1), None)
        for r in rows:
            if one is not None and r["what"] == what and r["candidates"] != 1:
                emit({"what": f"{what} ratio", "candidates": r["candidates"], key: round(r[key] / max(one[key], 1e-9), 3),
                      "time": round(r["seconds"] / max(one["seconds"], 1e-9), 2)})
    return rows


if __name__ == "__main__":
    main()
