"""Caption metrics: how well generated captions of real renders state the scenes' ground truth.

Each generated caption is parsed back into slots with the caption grammar's parser
(:func:`visgen.data.captions.parse_caption`; captions outside the grammar are scanned for the
noun phrases and relation they do state) and compared with the scene it describes:

* ``slot_accuracy`` — the grammar's :func:`~visgen.data.captions.slot_accuracy` against the
  scene's prompt (the slots its reference caption states), averaged over captions: per true
  object slot its shape, count and each stated colour / size, plus the relation when there is
  one (compared in canonical form: "A left of B" = "B right of A").
* ``slots`` — the same checks split by kind (``shape``, ``count``, ``color``, ``size``,
  ``relation``): correct / stated, pooled over all captions.
* ``exact`` — the caption states exactly the scene's prompt (canonical form).
* ``faithful`` — everything the caption states is true of the scene and it accounts for every
  object: each stated slot matches exactly ``count`` objects, a stated relation holds, and the
  stated counts add up to the scene's objects. Unlike ``exact`` it does not penalise a caption
  that truthfully adds a colour or size the reference left out.
* ``parsed`` — share of captions inside the grammar (strict parse succeeds).
* ``language_ok`` — share of captions that hold no words of the other language than the one
  asked for (:func:`~visgen.data.captions.language_ok`: an English caption no CJK ideograph, a
  Chinese one no Latin letter).
* ``bleu`` — corpus BLEU (sacrebleu) per language against ``references`` captions of the same
  prompt: the scene's own caption plus others the grammar writes for it (it has synonyms, so
  one reference would punish a correct synonym). English is lower-cased and tokenised with
  sacrebleu's ``13a``; Chinese with its ``zh`` tokenizer (one token per character). No Java tools.

Every number is also reported per language asked for (``by_language``): the benchmark asks each
image for a caption in the language of its reference caption.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import Field

from visgen.base import Section
from visgen.data import captions as grammar
from visgen.data.shapes import Prompt, Scene

SLOT_KINDS = ("shape", "count", "color", "size", "relation")


class CaptionEvalConfig(Section):
    """The caption benchmark: held-out renders captioned by the model, scored against their ground truth."""

    samples: int = Field(256, ge=1, le=1_000_000, description="Held-out images to caption (the first N of the held-out shards).")
    temperature: float = Field(0.0, ge=0.0, le=10.0, description="Caption sampling temperature; 0 = greedy.")
    batch_size: int = Field(128, ge=1, le=8192, description="Images captioned per model call.")
    references: int = Field(4, ge=1, le=64, description="Reference captions per image for BLEU (the grammar's synonyms).")


def parse(text: str) -> tuple[Prompt, bool]:
    """``(prompt, in_grammar)``: strict parse when the caption is in the grammar, lenient otherwise."""
    try:
        return grammar.parse_caption(text, strict=True), True
    except grammar.CaptionParseError:
        return grammar.parse_caption(text, strict=False), False


def slot_checks(predicted: Prompt, truth: Prompt) -> dict[str, tuple[int, int]]:
    """``{kind: (correct, stated)}`` — the items :func:`visgen.data.captions.slot_accuracy` scores,
    split by kind (their correct / stated totals give exactly its value)."""
    t, p = truth.canonical(), predicted.canonical()
    by_shape = {}
    for s in p.objects:
        by_shape.setdefault(s.shape, s)
    out = {k: [0, 0] for k in SLOT_KINDS}

    def add(kind: str, ok: bool) -> None:
        out[kind][0] += int(ok)
        out[kind][1] += 1

    for slot in t.objects:
        match = by_shape.get(slot.shape)
        add("shape", match is not None)
        add("count", match is not None and match.count == slot.count)
        if slot.color is not None:
            add("color", match is not None and match.color == slot.color)
        if slot.size is not None:
            add("size", match is not None and match.size == slot.size)
    if t.relation is not None:
        add("relation", p.relation == t.relation and [s.shape for s in p.objects] == [s.shape for s in t.objects])
    return {k: (c, n) for k, (c, n) in out.items()}


def faithful(predicted: Prompt, scene: Scene) -> bool:
    """The caption is true of the scene (:meth:`Prompt.holds_for`) and accounts for all its objects."""
    return bool(predicted.objects) and predicted.num_objects == len(scene.objects) and predicted.holds_for(scene.objects)


def reference_captions(scene: Scene, language: str, n: int, seed: int = 0) -> list[str]:
    """``n`` reference captions of the scene's prompt in ``language``: its own caption first (when
    in that language), then grammar samples (deterministic in ``seed`` and the scene's seed)."""
    refs = [scene.caption] if scene.caption and scene.language == language else []
    rng = np.random.default_rng([seed, scene.seed, grammar.LANGUAGES.index(language)])
    explicit = scene.task == "counting"
    tries = 0
    while len(refs) < n and tries < 20 * n:
        text = grammar.make_caption(scene.prompt, language, rng, explicit_count=explicit)
        tries += 1
        if text not in refs:
            refs.append(text)
    while len(refs) < n:  # a prompt with fewer wordings than n: repeat (sacrebleu needs n streams)
        refs.append(refs[len(refs) % max(len(refs), 1)])
    return refs


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], language: str) -> float:
    """Corpus BLEU (0-100) of hypotheses against per-hypothesis reference lists (equal length)."""
    import sacrebleu  # sacrebleu (0.1 s): only scoring needs it, not the CLI reading CaptionEvalConfig

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        return float("nan")
    k = len(references[0])
    if any(len(r) != k for r in references):
        raise ValueError("every hypothesis needs the same number of references")
    streams = [[refs[i] for refs in references] for i in range(k)]      # sacrebleu: one list per reference index
    tokenize = "zh" if language == "zh" else "13a"
    return float(sacrebleu.corpus_bleu(list(hypotheses), streams, tokenize=tokenize, lowercase=language != "zh").score)


def chrf(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (0-100, sacrebleu defaults: character 6-grams, whitespace ignored) against one reference each."""
    import sacrebleu  # sacrebleu (0.1 s): only scoring needs it, not the CLI reading CaptionEvalConfig

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        return float("nan")
    return float(sacrebleu.corpus_chrf(list(hypotheses), [list(references)]).score)


def _summary(rows: list[dict]) -> dict:
    totals = {k: [0, 0] for k in SLOT_KINDS}
    for r in rows:
        for k, (c, n) in r["checks"].items():
            totals[k][0] += c
            totals[k][1] += n
    n = len(rows)
    return {
        "captions": n,
        "parsed": sum(r["in_grammar"] for r in rows) / n,
        "slot_accuracy": float(np.mean([r["slot_accuracy"] for r in rows])),
        "slots": {k: (c / t if t else None) for k, (c, t) in totals.items()},
        "exact": sum(r["exact"] for r in rows) / n,
        "faithful": sum(r["faithful"] for r in rows) / n,
        "language_ok": sum(r["language_ok"] for r in rows) / n,
    }


def caption_metrics(predictions: Sequence[str], scenes: Sequence[Scene], languages: Sequence[str] | None = None,
                    references: int = 4, seed: int = 0, details: bool = False) -> dict:
    """All caption metrics for ``predictions[i]``, a generated caption of ``scenes[i]``'s render.

    ``languages[i]`` is the language the caption was asked for (default: each scene's caption
    language); BLEU is computed per language. Returns ``{"captions", "parsed", "slot_accuracy",
    "slots": {kind: accuracy}, "exact", "faithful", "language_ok", "bleu": {lang: score}, "references",
    "by_language": {lang: {...}}}`` (plus ``"per_caption"`` with ``details``).
    """
    if len(predictions) != len(scenes):
        raise ValueError(f"{len(predictions)} captions but {len(scenes)} scenes; pass one caption per scene")
    if not predictions:
        raise ValueError("no captions to score")
    if references < 1:
        raise ValueError(f"references must be >= 1, got {references}")
    languages = list(languages) if languages is not None else [s.language for s in scenes]
    if len(languages) != len(scenes):
        raise ValueError(f"{len(languages)} languages for {len(scenes)} scenes")
    for lang in set(languages):
        if lang not in grammar.LANGUAGES:
            raise ValueError(f"unknown caption language {lang!r}; allowed: {grammar.LANGUAGES}")
    rows = []
    for text, scene, lang in zip(predictions, scenes, languages):
        if not isinstance(text, str):
            raise TypeError(f"captions must be str, got {type(text).__name__} for scene {scene.scene_id!r}")
        pred, in_grammar = parse(text)
        rows.append({"scene_id": scene.scene_id, "lang": lang, "caption": text, "in_grammar": in_grammar,
                     "language_ok": grammar.language_ok(text, lang),
                     "slot_accuracy": grammar.slot_accuracy(pred, scene.prompt),
                     "checks": slot_checks(pred, scene.prompt),
                     "exact": pred.canonical() == scene.prompt.canonical(),
                     "faithful": faithful(pred, scene),
                     "refs": reference_captions(scene, lang, references, seed)})
    out = _summary(rows)
    out["references"] = references
    out["bleu"] = {}
    out["by_language"] = {}
    for lang in sorted(set(languages)):
        sub = [r for r in rows if r["lang"] == lang]
        out["bleu"][lang] = bleu([r["caption"] for r in sub], [r["refs"] for r in sub], lang)
        out["by_language"][lang] = {**_summary(sub), "bleu": out["bleu"][lang]}
    if details:
        out["per_caption"] = [{k: v for k, v in r.items() if k != "checks"} for r in rows]
    return out


def log_to_tracker(result: dict, tracker, step: int = 0, prefix: str = "caption") -> None:
    """Scalars to ``tracker.log_metrics`` (``caption/slot_accuracy``, ``caption/bleu_en`` ...), the
    result to ``tracker.log_dict`` as ``eval/caption.json``."""
    metrics = {f"{prefix}/{k}": result[k] for k in ("slot_accuracy", "exact", "faithful", "parsed", "language_ok")}
    metrics.update({f"{prefix}/slot_{k}": v for k, v in result["slots"].items() if v is not None})
    metrics.update({f"{prefix}/bleu_{lang}": v for lang, v in result["bleu"].items()})
    metrics.update({f"{prefix}/slot_accuracy_{lang}": v["slot_accuracy"] for lang, v in result["by_language"].items()})
    tracker.log_metrics(metrics, step)
    tracker.log_dict(result, f"eval/{prefix}.json")
