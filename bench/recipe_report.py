"""Read one pipeline run and print what the one-GPU recipe promises, next to its targets.

    python bench/recipe_report.py --workdir work/shapes-32-gpu [--wall-s 512] [--dmon dmon.txt]

Reads ``<workdir>/summary.json`` (per-stage seconds), ``<workdir>/eval/lm.json`` (GenEval-shapes
per task and language, caption scores per language, the sampling search) and, when given, a
``nvidia-smi dmon -s u`` log (GPU SM utilisation samples while the run went). Prints one table
with each number, its target and whether it holds, then one JSON line with the same (for logs).
Exits 0 either way: the report is the product, not a test.

Targets (issue: one-GPU recipe): end to end <= 600 s; GenEval-shapes overall >= 0.90 and every
task >= 0.75, in English and in Chinese; caption slot accuracy >= 0.95 in each language.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TASKS = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
STAGES = ("synth_s", "text_tokenizer_s", "ingest_s", "train_tokenizer_s", "eval_tokenizer_s", "token_cache_s",
          "train_lm_s", "eval_lm_s", "total_s")


def gpu_utilisation(dmon: Path) -> dict:
    """Mean and median SM % over the samples of a ``nvidia-smi dmon -s u`` log (header lines skipped)."""
    sm = []
    for line in dmon.read_text(errors="replace").splitlines():
        parts = line.split()
        if not parts or line.lstrip().startswith("#"):
            continue
        try:
            sm.append(float(parts[1]))  # gpu, sm, mem, enc, dec, ...
        except (IndexError, ValueError):
            continue
    if not sm:
        return {"samples": 0}
    s = sorted(sm)
    return {"samples": len(sm), "sm_mean": round(sum(sm) / len(sm), 1), "sm_median": s[len(s) // 2],
            "busy_share": round(sum(x >= 50 for x in sm) / len(sm), 3)}


def rows(summary: dict, ev: dict, wall_s: float | None) -> list[tuple[str, object, str, bool | None]]:
    """(name, value, target, holds) rows; holds is None where no target applies."""
    out: list[tuple[str, object, str, bool | None]] = []
    wall = wall_s if wall_s is not None else summary.get("total_s")
    out.append(("end to end (s)", wall, "<= 600", None if wall is None else wall <= 600))
    for key in STAGES[:-1]:
        if key in summary:
            out.append((f"  {key[:-2]} (s)", summary[key], "", None))
    lm = summary.get("lm", {})
    if lm.get("steps") and summary.get("train_lm_s"):
        out.append(("  transformer steps/s (incl. start-up)", round(lm["steps"] / summary["train_lm_s"], 1), "", None))
    gen = ev.get("geneval", {})
    out.append(("GenEval-shapes overall", ev.get("geneval_overall"), ">= 0.90",
                None if ev.get("geneval_overall") is None else ev["geneval_overall"] >= 0.90))
    for lang, part in sorted(gen.get("by_language", {}).items()):
        out.append((f"  overall [{lang}]", round(part["overall"], 3), ">= 0.90", part["overall"] >= 0.90))
        for task in TASKS:
            if task in part.get("tasks", {}):
                acc = part["tasks"][task]["accuracy"]
                out.append((f"    {task} [{lang}]", round(acc, 3), ">= 0.75", acc >= 0.75))
    for lang in ("en", "zh"):
        key = f"caption_slot_accuracy_{lang}"
        if key in ev:
            out.append((f"caption slot accuracy [{lang}]", round(ev[key], 3), ">= 0.95", ev[key] >= 0.95))
        if f"caption_bleu_{lang}" in ev:
            out.append((f"  caption BLEU [{lang}]", round(ev[f"caption_bleu_{lang}"], 1), "", None))
    if "caption_language_ok" in ev:
        out.append(("captions in the language asked for", ev["caption_language_ok"], "1.0", ev["caption_language_ok"] >= 1.0))
    search = ev.get("sampling_search")
    if search:
        out.append(("sampling chosen on validation prompts", json.dumps(search["chosen"]), "", None))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="the pipeline's work directory")
    ap.add_argument("--wall-s", type=float, default=None, help="wall time measured around the whole command")
    ap.add_argument("--dmon", default=None, help="nvidia-smi dmon -s u log of the run")
    args = ap.parse_args(argv)
    wd = Path(args.workdir)
    for need in (wd / "summary.json", wd / "eval" / "lm.json"):
        if not need.is_file():
            print(f"{need} is missing: did the pipeline run to the end in {wd}?", file=sys.stderr)
            return 2
    summary = json.loads((wd / "summary.json").read_text(encoding="utf-8"))
    ev = json.loads((wd / "eval" / "lm.json").read_text(encoding="utf-8"))
    table = rows(summary, ev, args.wall_s)
    if args.dmon and Path(args.dmon).is_file():
        util = gpu_utilisation(Path(args.dmon))
        table.append(("GPU SM % (mean over the run)", util.get("sm_mean"), "", None))
        table.append(("GPU samples >= 50 % SM", util.get("busy_share"), "", None))
    width = max(len(r[0]) for r in table)
    print(f"{'measurement':<{width}}  {'value':>12}  {'target':>8}  holds")
    for name, value, target, holds in table:
        mark = "" if holds is None else ("yes" if holds else "NO")
        print(f"{name:<{width}}  {str(value):>12}  {target:>8}  {mark}")
    checked = [r for r in table if r[3] is not None]
    print(f"{sum(bool(r[3]) for r in checked)}/{len(checked)} targets hold")
    print(json.dumps({"report": "gpu-recipe", "rows": [{"name": n.strip(), "value": v, "target": t, "holds": h}
                                                       for n, v, t, h in table]}, ensure_ascii=False, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
