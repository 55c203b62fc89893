"""Evaluate a model bundle: GenEval-shapes for text → image, the caption benchmark for image → text.

Both run through the public :class:`visgen.Pipeline` (what users and the Serve app call), so
they measure the whole path: prompt → text ids → transformer → codes → VQ decoder → pixels, and
pixels → VQ encoder → codes → transformer → text. Results are written to
``<workdir>/eval/lm.json`` and into the bundle (``eval.json`` + headline numbers in its
manifest) and logged to the MLflow run of the transformer.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("visgen.eval")


def caption_holdout(pipe, ingest: Any, cfg: Any, workdir: Path) -> dict:
    """Caption the first ``cfg.samples`` held-out renders, each in the language of its reference
    caption, and score them against their scenes (per language too)."""
    from visgen.data.captions import detect_language
    from visgen.data.ingest import build_dataset
    from visgen.data.shapes import Scene
    from visgen.eval.captions import caption_metrics

    ds = build_dataset(ingest, None, str(workdir / "quarantine"), split="holdout").select_columns(["image", "json"])
    rows = ds.take(cfg.samples)
    if not rows:
        raise ValueError("the held-out split is empty: nothing to caption (check data.ingest.holdout_shards)")
    scenes = [Scene.from_json(r["json"]) for r in rows]
    images = [np.asarray(r["image"], dtype=np.uint8) for r in rows]
    languages = [detect_language(s.caption or "") for s in scenes]  # as the trainer labels captions
    t0 = time.perf_counter()
    preds = pipe.caption(images, language=languages, temperature=cfg.temperature, batch_size=cfg.batch_size)
    seconds = time.perf_counter() - t0
    result = caption_metrics(preds, scenes, languages=languages, references=cfg.references, details=True)
    result["images_per_s"] = len(images) / max(seconds, 1e-9)
    return result


def geneval_bundle(pipe, cfg: Any, out_dir: Path, judge=None) -> dict:
    """The GenEval-shapes benchmark on the pipeline's generator (seeds 0, 1, 2, ... over the run)."""
    from visgen.eval.geneval import evaluate_generator
    from visgen.eval.judge import load_judge

    judge = judge or load_judge(cfg.judge)
    state = {"seed": 0, "images": 0, "seconds": 0.0}

    def generate(texts: list[str]):
        t0 = time.perf_counter()
        out = pipe.generate(texts, seed=state["seed"], batch_size=len(texts))
        state["seconds"] += time.perf_counter() - t0
        state["seed"] += len(texts)
        state["images"] += len(texts)
        return out

    result = evaluate_generator(generate, judge, cfg, out_dir=out_dir)
    result["images_per_s"] = state["images"] / max(state["seconds"], 1e-9)
    return result


def eval_identity(ingest: Any, geneval: Any, captions: Any, sampling_search: Any = None) -> dict:
    """What an evaluation result depends on besides the model: benchmark settings, held-out data
    and, when the sampling defaults are searched first, that search's settings."""
    from visgen.data.sources import expand_source, split_shards
    from visgen.data.token_cache import shard_signature

    shards = expand_source(ingest.source)
    holdout = split_shards(shards, ingest.holdout_shards, "holdout") if ingest.holdout_shards else []
    out = {"geneval": geneval.model_dump(mode="json"), "captions": captions.model_dump(mode="json"),
           "resolution": ingest.resolution, "holdout": shard_signature(holdout)}
    if sampling_search is not None:
        out["sampling_search"] = sampling_search.model_dump(mode="json")
    return out


def evaluate_bundle(bundle_dir: str | Path, *, ingest: Any, geneval: Any, captions: Any, workdir: str | Path,
                    tracking: Any = None, run_name: str = "lm", device: str = "auto",
                    eval_dir: str | Path | None = None, sampling_search: Any = None,
                    search_result: dict | None = None) -> dict:
    """Both benchmarks on the bundle; returns (and stores) the summary with per-task numbers.

    ``sampling_search`` / ``search_result``: the search that chose the bundle's sampling defaults
    (:mod:`visgen.eval.tune`) and what it found; both are recorded with the results.

    Results go to ``eval_dir`` (default ``<workdir>/eval``: ``lm.json`` and ``geneval/``) and into
    the bundle; ``tracking`` logs them to the MLflow run ``run_name``."""
    from visgen.pipeline import Pipeline, write_bundle_eval
    from visgen.tracking import Tracker

    wd = Path(workdir).expanduser().resolve()
    pipe = Pipeline.load(bundle_dir, device=device)
    t0 = time.perf_counter()
    ev_dir = Path(eval_dir) if eval_dir else wd / "eval"
    gen = geneval_bundle(pipe, geneval, ev_dir / "geneval")
    t_gen = time.perf_counter() - t0
    cap = caption_holdout(pipe, ingest, captions, wd)
    summary = {
        "geneval_overall": gen["overall"],
        **{f"geneval_{task}": v["accuracy"] for task, v in gen["tasks"].items()},
        "caption_slot_accuracy": cap["slot_accuracy"],
        "caption_exact": cap["exact"],
        "caption_faithful": cap["faithful"],
        "caption_parsed": cap["parsed"],
        "caption_language_ok": cap["language_ok"],
        **{f"caption_slot_accuracy_{lang}": v["slot_accuracy"] for lang, v in cap["by_language"].items()},
        **{f"caption_bleu_{lang}": v for lang, v in cap["bleu"].items()},
        "geneval_images": sum(v["images"] for v in gen["tasks"].values()),
        "caption_images": cap["captions"],
        "generate_images_per_s": round(gen["images_per_s"], 2),
        "caption_images_per_s": round(cap["images_per_s"], 2),
        "judge": gen.get("judge", {}).get("fingerprint") if isinstance(gen.get("judge"), dict) else gen.get("judge"),
        "sampling": pipe.sampling.model_dump(),
        "eval_s": round(time.perf_counter() - t0, 1), "geneval_s": round(t_gen, 1),
    }
    full = {**summary, "identity": eval_identity(ingest, geneval, captions, sampling_search), "geneval": {k: gen[k] for k in ("overall", "tasks", "by_language") if k in gen},
            "captions": {k: v for k, v in cap.items() if k != "per_caption"},
            "caption_examples": cap.get("per_caption", [])[:32]}
    if search_result is not None:
        full["sampling_search"] = search_result
    out = ev_dir / "lm.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(full, indent=1, default=str), encoding="utf-8")
    write_bundle_eval(bundle_dir, full)
    if tracking is not None:
        with Tracker.start(tracking, wd, run_name) as tracker:
            tracker.log_metrics({f"final/{k}": v for k, v in summary.items() if isinstance(v, (int, float))}, step=0)
            tracker.log_dict(full, "eval/lm.json")
            for grid in sorted((ev_dir / "geneval" / "grids").glob("*.png")):  # samples per task, prompt under each
                tracker.log_artifact(grid, "eval/geneval_grids")
    log.info("evaluated %s: GenEval-shapes overall %.3f, caption slot accuracy %.3f -> %s",
             bundle_dir, summary["geneval_overall"], summary["caption_slot_accuracy"], out)
    return full
