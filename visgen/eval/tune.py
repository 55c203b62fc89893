"""Choose a bundle's sampling defaults (CFG scale, temperature, top-k) on a validation prompt set.

How well a text → image model scores depends as much on how it is sampled as on its weights:
an under-trained model drawn at temperature 1 from all 1024 codes scatters stray codes over the
background, the same model at a lower temperature or a small top-k draws clean shapes. Those
settings are chosen here, on prompts that are *not* the benchmark's, so the benchmark number is
not tuned on itself:

* the validation prompts come from the same grammar as GenEval-shapes but from another seed
  (``prompt_seed``; the benchmark's seed is refused), so their wording and the order in which the
  slot sets are drawn differ (a task with few distinct slot sets, such as single object with
  its six shapes, necessarily names the same objects);
* every image is drawn from seeds starting at ``image_seed`` (the benchmark starts at 0);
* the judge and the scoring rules are GenEval-shapes' own (:func:`visgen.eval.geneval.score_generations`).

The search is coordinate-wise: starting from the spec's ``sampling`` section it tries every
listed value of ``cfg_scale`` with the others fixed, keeps the best, then ``temperature``, then
``top_k``. A value replaces the current one only if it scores higher (the mean of the six task
accuracies) by more than ``min_gain``, so ties, and with a margin differences within the noise
of the validation set, keep the spec's setting. Each trial is recorded, so the table of
what was tried is the curve a user reads (in the bundle manifest, ``eval/lm.json`` and MLflow).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from visgen.base import Section, replace

log = logging.getLogger("visgen.eval.tune")

VALIDATION_VERSION = "geneval-shapes-val"


class SamplingSearchConfig(Section):
    """Pick the bundle's sampling defaults on a validation prompt set before the benchmark runs."""

    enabled: bool = Field(False, description="Run the search; off = the bundle keeps the spec's sampling section.")
    cfg_scale: tuple[float, ...] = Field((1.5, 2.0, 3.0, 4.5), min_length=1,
                                         description="Classifier-free guidance scales to try (each >= 1).")
    temperature: tuple[float, ...] = Field((0.5, 0.75, 1.0), min_length=1,
                                           description="Image sampling temperatures to try (each > 0).")
    top_k: tuple[int, ...] = Field((0, 8, 32), min_length=1, description="top-k values to try (0 = all codes).")
    object_cfg_scale: tuple[float, ...] = Field((), description=(
        "Guidance scales of the object codes to try, right after cfg_scale (needs sampling.object_temperature); "
        "empty = not searched, the spec's value is kept."))
    prompts_per_task: int = Field(8, ge=1, le=1000, description="Validation prompts per task and language.")
    min_gain: float = Field(0.0, ge=0.0, le=1.0, description=(
        "A setting replaces the current one only when its validation overall is higher by more than this; "
        "0 = strictly higher. About one standard error of the score (0.03 at 96 prompts) keeps noise from "
        "moving the defaults."))
    languages: tuple[Literal["en", "zh"], ...] = Field(("en", "zh"), min_length=1, description="Validation prompt languages.")
    prompt_seed: int = Field(7, ge=0, le=2**31 - 1,
                             description="Seed of the validation prompt set; must differ from the benchmark's prompt-set seed.")
    image_seed: int = Field(1_000_000, ge=0, le=2**40,
                            description="First sampling seed of the validation images (the benchmark's start at 0).")
    batch_size: int = Field(128, ge=1, le=4096, description="Prompts per generate call.")

    @field_validator("cfg_scale", "object_cfg_scale")
    @classmethod
    def _cfg(cls, v: tuple[float, ...], info: ValidationInfo) -> tuple[float, ...]:
        bad = [x for x in v if not 1.0 <= x <= 50.0]
        if bad:
            raise ValueError(f"{info.field_name} values must be in [1, 50] (1 = no guidance), got {bad}")
        return v

    @field_validator("temperature")
    @classmethod
    def _temp(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        bad = [x for x in v if not 0.0 < x <= 10.0]
        if bad:
            raise ValueError(f"temperature values must be in (0, 10] (greedy decoding draws one image per prompt), got {bad}")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        bad = [x for x in v if x < 0]
        if bad:
            raise ValueError(f"top_k values must be >= 0 (0 = all codes), got {bad}")
        return v

    @field_validator("prompt_seed")
    @classmethod
    def _not_benchmark(cls, v: int) -> int:
        from visgen.eval.geneval import PROMPT_SET_SEED  # torch, scipy: the CLI reads SamplingSearchConfig from here

        if v == PROMPT_SET_SEED:
            raise ValueError(f"seed {v} is the benchmark prompt set's own seed: the search would tune on the benchmark")
        return v


def validation_prompts(cfg: SamplingSearchConfig) -> list[dict]:
    """The validation prompt records: GenEval-shapes' grammar and rules, another seed and version."""
    from visgen.eval.geneval import build_prompt_set  # torch, scipy: the CLI reads SamplingSearchConfig from here

    return build_prompt_set(per_task=cfg.prompts_per_task, languages=cfg.languages, seed=cfg.prompt_seed,
                            version=VALIDATION_VERSION)


def coordinate_search(start: dict[str, Any], grid: dict[str, Sequence[Any]],
                      score: Callable[[dict[str, Any]], float],
                      min_gain: float = 0.0) -> tuple[dict[str, Any], float, list[dict]]:
    """Maximise ``score`` one axis at a time, in ``grid``'s order, from ``start``.

    Each value of an axis is tried with the other axes at their current best; a value replaces
    the current one only when it scores higher by more than ``min_gain`` (0: strictly higher),
    so ties keep the earlier setting (the start first). A setting is scored once however often it comes up. Returns the best setting,
    its score and every scored setting in order, each as ``{**setting, "score": s}``.
    """
    seen: dict[tuple, float] = {}
    trials: list[dict] = []

    def once(setting: dict[str, Any]) -> float:
        key = tuple(sorted(setting.items()))
        if key not in seen:
            seen[key] = float(score(setting))
            trials.append({**setting, "score": seen[key]})
        return seen[key]

    current = dict(start)
    best = once(current)
    for axis, values in grid.items():
        for value in values:
            trial = {**current, axis: value}
            got = once(trial)
            if got > best + min_gain:
                best, current = got, trial
    return current, best, trials


def search_sampling(pipe, judge, cfg: SamplingSearchConfig) -> dict[str, Any]:
    """:func:`coordinate_search` over ``cfg``'s values from ``pipe.sampling``, scored by the
    GenEval-shapes overall (mean of the task accuracies) on the validation prompts.

    Axes: ``cfg_scale``, then ``object_cfg_scale`` when ``cfg`` lists values for it, then
    ``temperature`` and ``top_k``. Returns ``{"chosen": {cfg_scale, [object_cfg_scale,]
    temperature, top_k}, "start": {...}, "validation_overall",
    "trials": [{settings, "overall", "tasks"}...], "prompts", "images", "prompt_set", "seconds"}``.
    """
    from visgen.eval.geneval import score_generations  # torch, scipy: the CLI reads SamplingSearchConfig from here

    records = validation_prompts(cfg)
    texts = [r["prompt"] for r in records]
    s = pipe.sampling
    start = {"cfg_scale": float(s.cfg_scale), "temperature": float(s.temperature), "top_k": int(s.top_k)}
    grid = {"cfg_scale": [float(v) for v in cfg.cfg_scale], "temperature": [float(v) for v in cfg.temperature],
            "top_k": [int(v) for v in cfg.top_k]}
    if cfg.object_cfg_scale:
        if s.object_temperature is None:
            raise ValueError(f"eval.sampling_search.object_cfg_scale={list(cfg.object_cfg_scale)} searches the guidance "
                             "of the object codes, but sampling.object_temperature is null: set it, or leave the axis empty")
        start["object_cfg_scale"] = float(s.cfg_scale if s.object_cfg_scale is None else s.object_cfg_scale)
        grid = {"cfg_scale": grid.pop("cfg_scale"), "object_cfg_scale": [float(v) for v in cfg.object_cfg_scale], **grid}
    axes = tuple(grid)
    tasks: dict[tuple, dict] = {}
    t0 = time.perf_counter()

    def score(setting: dict[str, Any]) -> float:
        images = pipe.generate(texts, seed=cfg.image_seed, batch_size=cfg.batch_size, **setting)
        res = score_generations(records, images, judge, details=False)
        tasks[tuple(sorted(setting.items()))] = {t: round(v["accuracy"], 4) for t, v in res["tasks"].items()}
        log.info("sampling search: %s -> validation overall %.3f", setting, res["overall"])
        return res["overall"]

    chosen, best, scored = coordinate_search(start, grid, score, cfg.min_gain)
    trials = [{**{a: t[a] for a in axes}, "overall": round(t["score"], 4),
               "tasks": tasks[tuple(sorted((a, t[a]) for a in axes))]} for t in scored]
    return {"chosen": chosen, "start": start, "validation_overall": round(best, 4), "trials": trials,
            "prompts": len(records), "images": len(records) * len(trials), "prompt_set": VALIDATION_VERSION,
            "seconds": round(time.perf_counter() - t0, 1)}


def chosen_sampling(base: Any, result: dict) -> Any:
    """``base`` (a ``SamplingConfig``) with the search's chosen values, validated."""
    return replace(base, **result["chosen"])


def summary_line(result: dict) -> str:
    c, st = result["chosen"], result["start"]
    moved = [f"{a} {st[a]} -> {c[a]}" for a in c if c[a] != st[a]] or ["spec defaults kept"]
    return (f"sampling search: {len(result['trials'])} settings x {result['prompts']} validation prompts in "
            f"{result['seconds']:.0f}s; validation overall {result['validation_overall']:.3f}; " + ", ".join(moved))



def tune_bundle(bundle_dir, cfg: SamplingSearchConfig, *, judge: str | None = None, device: str = "auto") -> dict:
    """Run :func:`search_sampling` on a bundle and store the choice as its sampling defaults.

    The manifest's ``sampling`` becomes the chosen setting (what ``Model.load``, the CLI and
    Serve use from then on), ``sampling_spec`` keeps the spec's own section (what the bundle
    stage compares to decide whether a bundle is up to date) and ``sampling_search`` the trials.
    """
    from visgen.eval.judge import load_judge  # torch, scipy: the CLI reads SamplingSearchConfig from here
    from visgen.inference import MANIFEST, Model, read_manifest

    d = Path(bundle_dir)
    manifest = read_manifest(d)
    spec_sampling = manifest.get("sampling_spec", manifest.get("sampling"))
    pipe = Model.load(d, device=device)
    pipe.sampling = pipe.sampling.model_validate(spec_sampling)  # start from the spec, not an earlier choice
    result = search_sampling(pipe, load_judge(judge), cfg)
    manifest["sampling_spec"] = spec_sampling
    manifest["sampling"] = chosen_sampling(pipe.sampling, result).model_dump(mode="json")
    manifest["sampling_search"] = result
    tmp = d / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    tmp.replace(d / MANIFEST)
    log.info(summary_line(result))
    return result
