"""GenEval-style compositional benchmark on the shapes domain.

A fixed, versioned prompt set (``prompts/geneval_shapes_v1.jsonl``, English and Chinese) covers
GenEval's six tasks; generated images are read by the shapes judge (:mod:`visgen.eval.judge`)
and each image is scored correct or incorrect with GenEval's rules:

* **single object / two objects** — each named shape is present (at least once);
* **counting** — exactly N of the named shape (at least N, and not N + 1);
* **colours** — the named shape is present *in the named colour*: colour is judged on the
  detected object itself, not anywhere in the image;
* **position** — the two box centres differ by more than a margin of 0.1 × the boxes' summed
  size along each axis, and the margin-reduced offset, divided by the length of the raw offset,
  exceeds 0.5 in the stated direction — for every pair of matching objects;
* **colour attribution** — each named shape in its own named colour (swapped colours fail).

Objects the prompt does not name are ignored. Per task, accuracy = correct images / images;
overall = the mean of the six task accuracies (not of all images), as in GenEval.

Every result carries the judge's accuracy on held-out real renders at the scored resolution:
a benchmark number means little without it.

Generated images are given either as a Python list of (prompt record, image) or as a folder::

    DIR/metadata.jsonl            one prompt record per line (the prompt set, or the part of it used)
    DIR/<prompt id>_<index>.png   any number of images per prompt (.png, .jpg, .jpeg, .webp)

:func:`save_generations` writes that layout.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import Field

from visgen.base import Section
from visgen.data import captions, shapes
from visgen.data.shapes import ObjectSlot, Prompt
from visgen.eval.generic import prompt_sheet
from visgen.eval.judge import Detection, Judge, encode_decode_jpeg, judge_accuracy

log = logging.getLogger("visgen.eval.geneval")

TASKS = shapes.TASKS
RELATIONS = shapes.RELATIONS
LANGUAGES = captions.LANGUAGES

PROMPT_SET_VERSION = "geneval-shapes-v1"
PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
DEFAULT_PROMPT_SET = PROMPT_DIR / "geneval_shapes_v1.jsonl"
# v1: 48 prompt slot sets per task, each written once in English and once in Chinese.
PROMPTS_PER_TASK = 48
PROMPT_SET_SEED = 20_240_601
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
METADATA_NAME = "metadata.jsonl"


# -- GenEval's rules ----------------------------------------------------------------------------------

def relative_position(a: Detection, b: Detection) -> set[str]:
    """Relations of ``a`` to ``b`` under GenEval's rule (box centres, margin 0.1 × summed size,
    normalised component > 0.5); names as in :data:`visgen.data.shapes.RELATIONS`. The generator
    places objects by the same function, so a render's stated relation always holds here."""
    return shapes.relations_between(a.bbox, b.bbox)


def _matches(det: Detection, req: Mapping) -> bool:
    """An object meets a requirement when its shape and, where the requirement names them, its
    colour and size agree."""
    return (det.shape == req["shape"]
            and ("color" not in req or det.color == req["color"])
            and ("size" not in req or det.size == req["size"]))


def _describe(req: Mapping) -> str:
    return " ".join(str(req[k]) for k in ("size", "color", "shape") if k in req)


def judge_prompt(record: Mapping, detections: Sequence[Detection]) -> tuple[bool, str]:
    """GenEval's verdict for one image: ``(correct, reason)``, reason ``""`` when correct.

    Checked in order, the first failure being the reason:
      1. every ``include`` requirement has at least ``count`` objects meeting it (shape, and the
         colour / size it names, on the object itself);
      2. every ``exclude`` requirement has fewer than ``count`` objects meeting it (counting N
         excludes N + 1);
      3. a requirement with ``position: [relation, j]`` holds that relation for every pair of an
         object meeting it and an object meeting include ``j``.
    """
    include = record["include"]
    groups = [[d for d in detections if _matches(d, req)] for req in include]
    for req, found in zip(include, groups):
        if len(found) < req["count"]:
            same_shape = [d for d in detections if d.shape == req["shape"]]
            if len(same_shape) >= req["count"] and ("color" in req or "size" in req):
                seen = ", ".join(sorted(f"{d.size} {d.color}" for d in same_shape))
                return False, f"expected {req['count']} {_describe(req)}, the {req['shape']}s found are {seen}"
            return False, f"expected {req['count']} {_describe(req)}, found {len(found)}"
    for req in record.get("exclude", ()):
        n = sum(_matches(d, req) for d in detections)
        if n >= req["count"]:
            return False, f"expected fewer than {req['count']} {_describe(req)}, found {n}"
    for req, found in zip(include, groups):
        if "position" not in req:
            continue
        relation, j = req["position"]
        for obj in found:
            for target in groups[j]:
                rels = relative_position(obj, target)
                if relation not in rels:
                    got = ", ".join(sorted(rels)) or "no clear relation"
                    return False, f"expected {_describe(req)} {relation} {_describe(include[j])}, got {got}"
    return True, ""


def validate_record(record: Mapping) -> None:
    """Raise ``ValueError`` naming the prompt id, the field and the offending value."""
    rid = record.get("id", "<no id>") if isinstance(record, Mapping) else "<not a mapping>"

    def bad(msg: str) -> ValueError:
        return ValueError(f"prompt record {rid!r}: {msg}")

    if not isinstance(record, Mapping):
        raise bad(f"expected a mapping, got {type(record).__name__}")
    for key in ("id", "task", "prompt", "include"):
        if key not in record:
            raise bad(f"missing field {key!r}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", str(record["id"])):
        raise bad("id must be letters, digits, '_', '.', '-' (it names image files)")
    if record["task"] not in TASKS:
        raise bad(f"task {record['task']!r} is not one of {TASKS}")
    include = record["include"]
    if not isinstance(include, list) or not include:
        raise bad(f"include must be a non-empty list of requirements, got {include!r}")
    for i, req in enumerate([*include, *record.get("exclude", [])]):
        unknown = set(req) - {"shape", "count", "color", "size", "position"}
        if unknown:
            raise bad(f"requirement {i} has unknown keys {sorted(unknown)}; allowed: shape, count, color, size, position")
        if req.get("shape") not in shapes.SHAPES or isinstance(req.get("count"), bool) \
                or not isinstance(req.get("count"), int) or req["count"] < 1:
            raise bad(f"requirement {i} needs a shape in {shapes.SHAPES} and a count >= 1, got {dict(req)!r}")
        if "color" in req and req["color"] not in shapes.COLORS:
            raise bad(f"requirement {i} color {req['color']!r} is not one of {tuple(shapes.COLORS)}")
        if "size" in req and req["size"] not in shapes.SIZES:
            raise bad(f"requirement {i} size {req['size']!r} is not one of {shapes.SIZES}")
        if "position" in req:
            pos = req["position"]
            ok = (isinstance(pos, (list, tuple)) and len(pos) == 2 and pos[0] in RELATIONS
                  and isinstance(pos[1], int) and 0 <= pos[1] < len(include) and include[pos[1]] is not req)
            if not ok:
                raise bad(f"requirement {i} position {pos!r} must be [relation, index of another include], "
                          f"relation one of {RELATIONS}")


def aggregate(verdicts: Sequence[tuple[Mapping, bool]]) -> dict:
    """Per-task accuracy, overall = mean of per-task accuracies, and the same split by language."""
    def summarise(items: list[tuple[Mapping, bool]]) -> dict:
        counts: dict[str, list[int]] = {}
        for record, ok in items:
            c = counts.setdefault(record["task"], [0, 0])
            c[0] += int(ok)
            c[1] += 1
        per = {t: {"accuracy": c / n, "correct": c, "images": n}
               for t in TASKS if t in counts for c, n in [counts[t]]}
        return {"overall": float(np.mean([v["accuracy"] for v in per.values()])) if per else float("nan"),
                "tasks": per, "images": len(items)}

    verdicts = list(verdicts)
    out = summarise(verdicts)
    langs = sorted({r.get("lang", "en") for r, _ in verdicts})
    out["by_language"] = {lang: summarise([v for v in verdicts if v[0].get("lang", "en") == lang]) for lang in langs}
    return out


# -- the prompt set -----------------------------------------------------------------------------------

def requirements(prompt: Prompt, task: str) -> tuple[list[dict], list[dict]]:
    """GenEval ``include`` / ``exclude`` lists for a prompt (what :func:`judge_prompt` checks).

    ``objects[0] <relation> objects[1]`` becomes ``include[0].position = [relation, 1]``; a
    counting prompt for N also excludes N + 1 of the same object.
    """
    include = []
    for slot in prompt.objects:
        req: dict[str, Any] = {"shape": slot.shape, "count": slot.count}
        if slot.color is not None:
            req["color"] = slot.color
        if slot.size is not None:
            req["size"] = slot.size
        include.append(req)
    if prompt.relation is not None:
        include[0]["position"] = [prompt.relation, 1]
    exclude = []
    if task == "counting":
        exclude = [{k: v for k, v in {**req, "count": req["count"] + 1}.items() if k != "position"} for req in include]
    return include, exclude


def _task_prompts(task: str) -> list[Prompt]:
    """Every distinct prompt GenEval's version of ``task`` can state, in a fixed order."""
    colors = tuple(shapes.COLORS)
    pairs = [(a, b) for a in shapes.SHAPES for b in shapes.SHAPES if a != b]
    if task == "single_object":
        return [Prompt((ObjectSlot(s),)) for s in shapes.SHAPES]
    if task == "counting":  # as GenEval: two to four (one is the single-object task)
        return [Prompt((ObjectSlot(s, n),)) for n in range(2, shapes.MAX_COUNT + 1) for s in shapes.SHAPES]
    if task == "colors":
        return [Prompt((ObjectSlot(s, 1, c),)) for s in shapes.SHAPES for c in colors]
    if task == "two_objects":
        return [Prompt((ObjectSlot(a), ObjectSlot(b))) for a, b in pairs]
    if task == "position":
        return [Prompt((ObjectSlot(a), ObjectSlot(b)), r) for a, b in pairs for r in RELATIONS]
    if task == "color_attr":
        return [Prompt((ObjectSlot(a, 1, ca), ObjectSlot(b, 1, cb)))
                for a, b in pairs for ca in colors for cb in colors if ca != cb]
    raise ValueError(f"unknown task {task!r}; allowed: {TASKS}")


def build_prompt_set(per_task: int = PROMPTS_PER_TASK, languages: Sequence[str] = LANGUAGES,
                     seed: int = PROMPT_SET_SEED, version: str = PROMPT_SET_VERSION) -> list[dict]:
    """The benchmark's prompt records, deterministically.

    Per task, ``per_task`` distinct prompts drawn without replacement from every prompt the task
    can state (cycled, with new wording, when the task has fewer — single object has six), so
    shapes, colours and relations are covered evenly. Each is written in every language by the
    caption grammar (``captions.make_caption``; counting prompts always state their number).
    Ids are ``<task>_<k>_<lang>``: the same ``k`` is the same prompt in each language.
    """
    records = []
    for t_index, task in enumerate(TASKS):
        pool = _task_prompts(task)
        order = np.random.default_rng([seed, t_index]).permutation(len(pool))
        for k in range(per_task):
            prompt = pool[int(order[k % len(pool)])]
            include, exclude = requirements(prompt, task)
            for lang in languages:
                rng = np.random.default_rng([seed, t_index, k, LANGUAGES.index(lang)])
                text = captions.make_caption(prompt, lang, rng, explicit_count=task == "counting")
                rec = {"id": f"{task}_{k:03d}_{lang}", "version": version, "task": task, "lang": lang,
                       "prompt": text, "slots": prompt.to_dict(), "include": include}
                if exclude:
                    rec["exclude"] = exclude
                records.append(rec)
    return records


def write_prompt_set(path: str | Path = DEFAULT_PROMPT_SET, **kwargs: Any) -> Path:
    """Write :func:`build_prompt_set` as JSONL (the committed file is made by exactly this call)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r, ensure_ascii=False, sort_keys=True) for r in build_prompt_set(**kwargs)]
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def load_prompt_set(path: str | Path = DEFAULT_PROMPT_SET, tasks: Sequence[str] | None = None,
                    languages: Sequence[str] | None = None, limit_per_task: int | None = None) -> list[dict]:
    """Prompt records from a JSONL file, optionally only some tasks / languages / the first N per task."""
    records = _read_jsonl(Path(path))
    for bad_task in set(tasks or ()) - set(TASKS):
        raise ValueError(f"unknown task {bad_task!r}; allowed: {TASKS}")
    out, seen = [], Counter()
    for r in records:
        if (tasks and r["task"] not in tasks) or (languages and r.get("lang") not in languages):
            continue
        seen[(r["task"], r.get("lang"))] += 1
        if limit_per_task is None or seen[(r["task"], r.get("lang"))] <= limit_per_task:
            out.append(r)
    return out


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
    records = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not valid JSON ({err})") from None
        validate_record(rec)
        records.append(rec)
    ids = Counter(r["id"] for r in records)
    dup = [i for i, c in ids.items() if c > 1]
    if dup:
        raise ValueError(f"{path}: prompt ids must be unique, repeated: {dup[:5]}")
    return records


def reference_image(record: Mapping, resolution: int, seed: int = 0, jpeg_quality: int = 95) -> np.ndarray:
    """A real render of a prompt record (a scene realising its slots), JPEG-encoded like the shards:
    what a perfect generator would produce. Used for the benchmark's upper bound and its tests."""
    scene = shapes.scene_for_prompt(Prompt.from_dict(record["slots"]), seed, task=record["task"],
                                    resolution=resolution)
    return encode_decode_jpeg(shapes.render(scene), jpeg_quality)


def reconstruction_ceiling(reconstruct: Callable[[np.ndarray], np.ndarray], judge: Judge, resolution: int,
                           records: Sequence[Mapping] | None = None) -> dict:
    """GenEval-shapes of an image tokenizer's reconstructions of real renders of the prompts.

    A text → image model draws *through* its image tokenizer, so this is the most it can score:
    a tokenizer that turns a small triangle into a blob caps every generator built on it, however
    good the transformer. ``reconstruct`` maps uint8 images (B, R, R, 3) to their reconstructions.
    Default records: the benchmark's English prompts (the Chinese ones name the same slots).
    """
    records = list(records) if records is not None else load_prompt_set(languages=("en",))
    refs = np.stack([reference_image(r, resolution, seed=i) for i, r in enumerate(records)])
    res = score_generations(records, list(reconstruct(refs)), judge, details=False)
    return {"overall": res["overall"], "tasks": {t: v["accuracy"] for t, v in res["tasks"].items()},
            "images": len(records), "resolution": resolution}


# -- scoring ------------------------------------------------------------------------------------------

def _judge_report(judge: Judge, resolution: int | None) -> dict:
    """The judge's held-out accuracy at ``resolution``, measured now if it never was."""
    key = str(resolution)
    if resolution is not None and key not in judge.accuracy:
        log.info("judge accuracy at %s px was never measured; measuring it now", resolution)
        judge.meta.setdefault("accuracy", {}).update(judge_accuracy(judge, [resolution]))
    acc = judge.accuracy.get(key)
    return {"fingerprint": judge.fingerprint, "resolution": resolution,
            "accuracy": acc["tasks"] if acc else None, "min_task_accuracy": acc["min"] if acc else None,
            "held_out_images": acc["images"] if acc else 0}


def score_generations(records: Sequence[Mapping], images: Sequence[np.ndarray], judge: Judge, *,
                      tracker=None, step: int = 0, details: bool = True) -> dict:
    """Score generated images: ``images[i]`` was generated for ``records[i]`` (records may repeat).

    Returns ``{"benchmark", "prompt_set", "overall", "tasks": {task: {accuracy, correct, images}},
    "by_language", "images", "prompts", "resolution", "judge": {fingerprint, accuracy per task,
    min_task_accuracy}, "per_image": [...]}``. With ``tracker`` (``visgen.tracking.Tracker``)
    the scalars go to ``log_metrics`` at ``step`` and the whole result to ``log_dict``.
    """
    if len(records) != len(images):
        raise ValueError(f"got {len(records)} prompt records but {len(images)} images; pass one record per image")
    if not records:
        raise ValueError("nothing to score: no images")
    for r in {id(r): r for r in records}.values():
        validate_record(r)
    sizes = Counter(tuple(np.asarray(im).shape[:2]) for im in images)
    (h, w), _ = sizes.most_common(1)[0]
    resolution = h if h == w else None
    detections = judge.detect_batch(list(images))
    verdicts, per_image, index = [], [], Counter()
    for rec, dets in zip(records, detections):
        ok, reason = judge_prompt(rec, dets)
        verdicts.append((rec, ok))
        if details:
            per_image.append({"id": rec["id"], "index": index[rec["id"]], "task": rec["task"], "correct": ok,
                              "reason": reason, "detections": [d.to_dict() for d in dets]})
        index[rec["id"]] += 1
    result = {"benchmark": "geneval-shapes", "prompt_set": records[0].get("version", "custom"),
              **aggregate(verdicts), "prompts": len(index), "resolution": resolution,
              "image_sizes": {f"{hh}x{ww}": n for (hh, ww), n in sizes.items()},
              "judge": _judge_report(judge, resolution)}
    if details:
        result["per_image"] = per_image
    if tracker is not None:
        log_to_tracker(result, tracker, step)
    return result


def log_to_tracker(result: Mapping, tracker, step: int = 0, prefix: str = "geneval") -> None:
    """Scalars to ``tracker.log_metrics`` (``geneval/overall``, ``geneval/<task>``, the judge's
    worst-task accuracy), the full result to ``tracker.log_dict`` as ``eval/geneval.json``."""
    metrics = {f"{prefix}/overall": result["overall"]}
    metrics.update({f"{prefix}/{t}": v["accuracy"] for t, v in result["tasks"].items()})
    metrics.update({f"{prefix}/{lang}/overall": v["overall"] for lang, v in result.get("by_language", {}).items()})
    if result.get("judge", {}).get("min_task_accuracy") is not None:
        metrics[f"{prefix}/judge_min_task_accuracy"] = result["judge"]["min_task_accuracy"]
    tracker.log_metrics(metrics, step)
    tracker.log_dict(dict(result), f"eval/{prefix}.json")


def save_generations(out_dir: str | Path, records: Sequence[Mapping], images: Sequence[np.ndarray]) -> Path:
    """Write generated images in the folder layout :func:`score_folder` reads (PNG, lossless)."""
    if len(records) != len(images):
        raise ValueError(f"got {len(records)} prompt records but {len(images)} images")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index: Counter[str] = Counter()
    unique: dict[str, Mapping] = {}
    for rec, img in zip(records, images):
        validate_record(rec)
        Image.fromarray(np.asarray(img, dtype=np.uint8)).save(out / f"{rec['id']}_{index[rec['id']]}.png")
        index[rec["id"]] += 1
        unique.setdefault(rec["id"], rec)
    lines = [json.dumps(r, ensure_ascii=False, sort_keys=True) for r in unique.values()]
    (out / METADATA_NAME).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def task_grids(records: Sequence[Mapping], images: Sequence[np.ndarray], verdicts: Sequence[bool] | None = None, *,
               per_task: int = 8, language: str = "en", scale: int = 4, label_px: int = 44) -> dict[str, np.ndarray]:
    """One picture per task: its first ``per_task`` images in ``language``, each enlarged ``scale``
    times (nearest neighbour, so pixels stay pixels) with its prompt written under it and, given
    ``verdicts``, the judge's verdict ("ok" / "miss"). Returns ``{task: uint8 (H, W, 3)}``.

    The label uses PIL's built-in font, which has Latin glyphs only: pass ``language="en"`` (the
    Chinese prompts name the same slots as the English ones with the same number).
    """
    verdicts = list(verdicts) if verdicts is not None else [None] * len(records)
    out: dict[str, np.ndarray] = {}
    for task in TASKS:
        picked = [(r, im, v) for r, im, v in zip(records, images, verdicts)
                  if r["task"] == task and r.get("lang", "en") == language][:per_task]
        if not picked:
            continue
        out[task] = prompt_sheet([im for _, im, _ in picked], [str(r["prompt"]) for r, _, _ in picked],
                                 notes=[None if ok is None else "ok" if ok else "miss" for _, _, ok in picked],
                                 scale=scale, label_px=label_px)
    return out


def read_generations(folder: str | Path) -> tuple[list[dict], list[np.ndarray], dict]:
    """Records and images (one record per image) from a folder, plus what was missing or unknown."""
    d = Path(folder)
    if not d.is_dir():
        raise FileNotFoundError(f"generations folder {str(d)!r} does not exist")
    by_id = {r["id"]: r for r in _read_jsonl(d / METADATA_NAME)}
    pattern = re.compile(r"^(?P<id>.+)_(?P<index>\d+)$")
    records, images, unknown, seen = [], [], [], Counter()
    for p in sorted(d.iterdir()):
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        m = pattern.match(p.stem)
        if m is None or m.group("id") not in by_id:
            unknown.append(p.name)
            continue
        with Image.open(p) as im:
            images.append(np.asarray(im.convert("RGB")))
        records.append(by_id[m.group("id")])
        seen[m.group("id")] += 1
    missing = sorted(set(by_id) - set(seen))
    if unknown:
        log.warning("%s: %d image(s) match no prompt id in %s and were skipped, e.g. %s",
                    d, len(unknown), METADATA_NAME, unknown[:3])
    if not images:
        raise ValueError(f"{d} holds no images named <prompt id>_<index>{{{','.join(IMAGE_SUFFIXES)}}} "
                         f"for the {len(by_id)} prompts of its {METADATA_NAME}")
    return records, images, {"missing_prompts": missing, "unknown_files": unknown}


def score_folder(folder: str | Path, judge: Judge, *, tracker=None, step: int = 0, details: bool = True) -> dict:
    """:func:`score_generations` over a folder (layout in the module docstring). Prompts of the
    metadata without images are listed under ``"missing_prompts"`` and not scored."""
    records, images, extra = read_generations(folder)
    result = score_generations(records, images, judge, tracker=None, details=details)
    result["folder"] = str(Path(folder).resolve())
    result["missing_prompts"] = extra["missing_prompts"]
    result["unknown_files"] = extra["unknown_files"]
    if tracker is not None:
        log_to_tracker(result, tracker, step)
    return result


def write_results(result: Mapping, path: str | Path) -> Path:
    """Write a result dict as indented JSON (atomically: a reader never sees half a file)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False, default=_json_default) + "\n", encoding="utf-8")
    tmp.replace(p)
    return p


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def score_references(records: Sequence[Mapping], judge: Judge, resolution: int, images_per_prompt: int = 1,
                     seed: int = 0, **kwargs: Any) -> dict:
    """The benchmark on real renders of its own prompts: the score a perfect generator would get
    with this judge (should be ≥ 0.99; quoted next to a model's score as the ceiling)."""
    recs = [r for r in records for _ in range(images_per_prompt)]
    imgs = [reference_image(r, resolution, seed=seed + i) for i, r in enumerate(recs)]
    return score_generations(recs, imgs, judge, **kwargs)


# -- running the benchmark on a generator -----------------------------------------------------------

class GenEvalConfig(Section):
    """Which prompts the GenEval-style benchmark runs and how many images each gets."""

    prompt_set: str | None = Field(None, description="Prompt JSONL; None = the committed geneval_shapes_v1.jsonl.")
    judge: str | None = Field(None, description="Judge directory (judge.safetensors + judge.json); None = the judge shipped with visgen.")
    images_per_prompt: int = Field(4, ge=1, le=64, description="Images generated per prompt (GenEval uses 4).")
    limit_per_task: int | None = Field(None, ge=1, description="Use only the first N prompts per task and language (quick runs).")
    languages: tuple[Literal["en", "zh"], ...] = Field(("en", "zh"), min_length=1, description="Prompt languages to run.")
    batch_size: int = Field(64, ge=1, le=4096, description="Prompts handed to the generator per call.")


def evaluate_generator(generate: Callable[[list[str]], Sequence[np.ndarray]], judge: Judge,
                       cfg: GenEvalConfig | None = None, *, out_dir: str | Path | None = None,
                       tracker=None, step: int = 0) -> dict:
    """Run the benchmark end to end: prompt texts → ``generate`` → judge → scores.

    ``generate(texts)`` returns one uint8 (H, W, 3) image per text (call it with repeated texts
    for several images per prompt; sampling must differ between calls or within a batch). With
    ``out_dir`` the images are saved in the folder layout and the result as ``results.json``.
    """
    cfg = cfg or GenEvalConfig()
    records = load_prompt_set(cfg.prompt_set or DEFAULT_PROMPT_SET, languages=cfg.languages,
                              limit_per_task=cfg.limit_per_task)
    todo = [r for r in records for _ in range(cfg.images_per_prompt)]
    images: list[np.ndarray] = []
    for i in range(0, len(todo), cfg.batch_size):
        batch = todo[i:i + cfg.batch_size]
        out = list(generate([r["prompt"] for r in batch]))
        if len(out) != len(batch):
            raise ValueError(f"generate() returned {len(out)} images for {len(batch)} prompts")
        images.extend(np.asarray(im) for im in out)
    if out_dir is not None:
        save_generations(out_dir, todo, images)
    result = score_generations(todo, images, judge, tracker=tracker, step=step)
    if out_dir is not None:
        write_results(result, Path(out_dir) / "results.json")
        # For people: prompt and verdict under each image, one sheet per task (a subfolder, so the
        # folder itself keeps only the scored images).
        grids = Path(out_dir) / "grids"
        grids.mkdir(exist_ok=True)
        verdicts = [p["correct"] for p in result["per_image"]]
        for task, grid in task_grids(todo, images, verdicts).items():
            Image.fromarray(grid).save(grids / f"{task}.png")
    return result


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m visgen.eval.geneval --write-prompts``: (re)write the committed prompt set file."""
    parser = argparse.ArgumentParser(prog="python -m visgen.eval.geneval", description=main.__doc__)
    parser.add_argument("--write-prompts", action="store_true", help="write the versioned prompt set JSONL")
    parser.add_argument("--out", default=str(DEFAULT_PROMPT_SET), help="where to write it")
    args = parser.parse_args(argv)
    if not args.write_prompts:
        parser.error("nothing to do: pass --write-prompts")
    path = write_prompt_set(args.out)
    print(f"wrote {len(_read_jsonl(path))} prompts ({PROMPT_SET_VERSION}) to {path}")


if __name__ == "__main__":
    main()
