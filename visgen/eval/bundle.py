"""Evaluate a model bundle: the metrics of :mod:`visgen.eval.generic` on any data; on shapes data
also GenEval-shapes for text → image and the caption slot benchmark for image → text.

All run through the public :class:`visgen.Model` (what users and the Serve app call), so
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

from visgen.data.captions import detect_language
from visgen.data.shapes import Scene
from visgen.data.sources import expand_source, shard_signature, split_shards
from visgen.eval.captions import caption_metrics
from visgen.tracking import Tracker
from visgen.workdir import Workdir

log = logging.getLogger("visgen.eval")


def caption_holdout(pipe, ingest: Any, cfg: Any, workdir: str | Path) -> dict:
    """Caption the first ``cfg.samples`` held-out renders, each in the language of its reference
    caption, and score them against their scenes (per language too)."""
    from visgen.data.ingest import build_dataset  # Ray Data: only this benchmark reads the held-out split

    ds = build_dataset(ingest, None, Workdir(workdir).quarantine, split="holdout").select_columns(["image", "json"])
    rows = ds.take(cfg.samples)
    if not rows:
        raise ValueError("the held-out split is empty: nothing to caption (check data.ingest.holdout_shards)")
    scenes = []
    for i, r in enumerate(rows):
        try:
            scenes.append(Scene.from_json(r["json"]))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"held-out sample {i}: its .json holds no shapes scene ({type(err).__name__}: {err}; "
                             f".json {str(r['json'])[:80]!r}): the caption slot benchmark only applies to shapes data; "
                             f"set eval.shapes: false for other data") from None
    images = [np.asarray(r["image"], dtype=np.uint8) for r in rows]
    languages = [detect_language(s.caption or "") for s in scenes]  # as the trainer labels captions
    t0 = time.perf_counter()
    preds = pipe.caption(images, language=languages, temperature=cfg.temperature, batch_size=cfg.batch_size)
    seconds = time.perf_counter() - t0
    result = caption_metrics(preds, scenes, languages=languages, references=cfg.references, details=True)
    result["images_per_s"] = len(images) / max(seconds, 1e-9)
    return result


def geneval_bundle(pipe, cfg: Any, out_dir: Path, judge=None) -> dict:
    """The GenEval-shapes benchmark on the model's generator (seeds 0, 1, 2, ... over the run)."""
    # torch, scipy: only the shapes benchmark needs them; importing this module stays light
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


def eval_identity(ingest: Any, geneval: Any, captions: Any, sampling_search: Any = None, heldout: Any = None,
                  shapes: bool = True) -> dict:
    """What an evaluation result depends on besides the model: benchmark settings, held-out data
    and, when the sampling defaults are searched first, that search's settings."""
    shards = expand_source(ingest.source)
    holdout = split_shards(shards, ingest.holdout_shards, "holdout") if ingest.holdout_shards else []
    out = {"resolution": ingest.resolution, "holdout": shard_signature(holdout)}
    if shapes:
        out.update(geneval=geneval.model_dump(mode="json"), captions=captions.model_dump(mode="json"))
    if heldout is not None:
        out["heldout"] = heldout.model_dump(mode="json")
    if sampling_search is not None:
        out["sampling_search"] = sampling_search.model_dump(mode="json")
    return out


def _shapes_summary(gen: dict, cap: dict) -> dict:
    """The headline numbers of GenEval-shapes and the caption slot benchmark."""
    return {
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
    }


def evaluate_bundle(bundle_dir: str | Path, *, ingest: Any, geneval: Any, captions: Any, workdir: str | Path,
                    tracking: Any = None, run_name: str = "lm", device: str = "auto",
                    eval_dir: str | Path | None = None, sampling_search: Any = None,
                    search_result: dict | None = None, heldout: Any = None, shapes: bool = True) -> dict:
    """The bundle's benchmarks; returns (and stores) the summary with per-task numbers.

    ``shapes``: GenEval-shapes and the caption slot benchmark (shapes data only; the spec's
    ``eval.shapes``). ``heldout`` (a :class:`visgen.eval.generic.HeldoutEvalConfig`, the spec's
    ``eval.heldout``): the metrics that hold on any data (:mod:`visgen.eval.generic`); None skips them.
    ``sampling_search`` / ``search_result``: the search that chose the bundle's sampling defaults
    (:mod:`visgen.eval.tune`) and what it found; both are recorded with the results.

    Results go to ``eval_dir`` (default ``<workdir>/eval``: ``lm.json``, ``geneval/``, ``heldout/``)
    and into the bundle; ``tracking`` logs them to the MLflow run ``run_name``."""
    # torch: only evaluating loads a model; importing this module stays light
    from visgen.eval.generic import evaluate_heldout, heldout_pairs
    from visgen.inference import Model, write_bundle_eval

    if not shapes and heldout is None:
        raise ValueError("nothing to evaluate: shapes=False (not shapes data) and no held-out metrics (heldout=None); "
                         "pass heldout=HeldoutEvalConfig() (the spec's eval.heldout)")
    wd = Workdir(workdir)  # a local directory, or the local mirror of an object store workdir
    workdir = wd.url or wd.root
    pipe = Model.load(bundle_dir, device=device)
    t0 = time.perf_counter()
    ev_dir = Path(eval_dir) if eval_dir else wd.eval
    summary: dict[str, Any] = {}
    full: dict[str, Any] = {}
    if shapes:
        gen = geneval_bundle(pipe, geneval, ev_dir / "geneval")
        t_gen = time.perf_counter() - t0
        cap = caption_holdout(pipe, ingest, captions, workdir)
        summary.update(_shapes_summary(gen, cap), geneval_s=round(t_gen, 1))
        full.update(geneval={k: gen[k] for k in ("overall", "tasks", "by_language") if k in gen},
                    captions={k: v for k, v in cap.items() if k != "per_caption"},
                    caption_examples=cap.get("per_caption", [])[:32])
    if heldout is not None:
        images, texts = heldout_pairs(ingest, workdir, max(heldout.samples, heldout.retrieval_n, heldout.images))
        anydata = evaluate_heldout(pipe, images, texts, heldout, out_dir=ev_dir / "heldout")
        summary.update({k: v for k, v in anydata.items() if isinstance(v, (int, float))})
        full["heldout"] = {k: v for k, v in anydata.items() if not isinstance(v, (int, float))}
    summary.update(sampling=pipe.sampling.model_dump(), eval_s=round(time.perf_counter() - t0, 1))
    full = {**summary, "identity": eval_identity(ingest, geneval, captions, sampling_search, heldout, shapes), **full}
    if search_result is not None:
        full["sampling_search"] = search_result
    out = ev_dir / "lm.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(full, indent=1, default=str, ensure_ascii=False), encoding="utf-8")
    write_bundle_eval(bundle_dir, full)
    if tracking is not None:
        with Tracker.start(tracking, workdir, run_name) as tracker:
            tracker.log_metrics({f"final/{k}": v for k, v in summary.items() if isinstance(v, (int, float))}, step=0)
            tracker.log_dict(full, "eval/lm.json")
            for grid in sorted((ev_dir / "geneval" / "grids").glob("*.png")) if shapes else ():
                tracker.log_artifact(grid, "eval/geneval_grids")  # samples per task, prompt under each
            if heldout is not None and (ev_dir / "heldout" / "samples.png").is_file():
                tracker.log_artifact(ev_dir / "heldout" / "samples.png", "eval/heldout")  # prompt under each
    log.info("evaluated %s -> %s: %s", bundle_dir, out, headline(summary))
    return full


HEADLINE = (("geneval_overall", "GenEval-shapes overall"), ("caption_slot_accuracy", "caption slot accuracy"),
            ("heldout_t2i_loss", "held-out t2i loss"), ("heldout_i2t_loss", "held-out i2t loss"),
            ("retrieval_i2t_at1", "retrieval i2t@1"), ("retrieval_t2i_at1", "retrieval t2i@1"),
            ("frechet_vq_encoder", "Fréchet (VQ encoder)"))


def headline(summary: dict) -> str:
    """The headline numbers a summary holds, one line (retrieval with its chance level)."""
    parts = [f"{name} {summary[key]:.3f}" for key, name in HEADLINE if isinstance(summary.get(key), (int, float))]
    if "retrieval_chance" in summary:
        parts.append(f"retrieval chance {summary['retrieval_chance']:.3f}")
    return ", ".join(parts) or "no metrics"
