"""The ``visgen`` command line.

Flags are generated from the config sections each command uses, so every flag reaches a spec
field by construction (``--num-shards`` → ``data.synth.num_shards``); ``--set dotted.key=value``
reaches any other field. Values are validated by the same classes that validate the YAML.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from visgen.base import DERIVED_FIELDS, SpecError, parse_override, validate_section
from visgen.runtime import init_ray, setup_logging

log = logging.getLogger("visgen")

DEFAULT_PIPELINE = "pipelines/shapes-32.yaml"


# -- flags generated from config sections ---------------------------------------------------------

def _is_plain_str(annotation: Any) -> bool:
    """str and Optional[str] take the raw text; everything else is parsed as YAML (numbers, lists, null)."""
    if annotation is str:
        return True
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) \
        and len(args) == 1 and args[0] is str


def _is_bool(annotation: Any) -> bool:
    return annotation is bool


# The class of each section a command takes flags from, by module: building one command's flags
# imports that command's components only, where visgen.config (the whole spec) imports all of them
# (torch, Ray Data): `visgen serve --help` answers in a fraction of a second. The classes are the
# ones visgen.config.SECTIONS reads from the spec's tree (tests/test_cli.py checks that they agree).
SECTION_CLASSES: dict[str, str] = {
    "data.synth": "visgen.data.synth:SynthConfig",
    "data.ingest": "visgen.data.ingest:IngestConfig",
    "text_tokenizer": "visgen.text.tokenizer:TextTokenizerConfig",
    "image_tokenizer.model": "visgen.models.vq:VQConfig",
    "image_tokenizer.train": "visgen.train.config:TrainConfig",
    "image_tokenizer.scaling": "visgen.train.config:ScalingConfig",
    "token_cache": "visgen.data.token_cache:TokenCacheConfig",
    "lm.model": "visgen.models.gpt:GPTConfig",
    "lm.recipe": "visgen.train.lm:LMRecipe",
    "lm.train": "visgen.train.config:TrainConfig",
    "lm.scaling": "visgen.train.config:ScalingConfig",
    "eval.geneval": "visgen.eval.geneval:GenEvalConfig",
    "eval.captions": "visgen.eval.captions:CaptionEvalConfig",
    "eval.sampling_search": "visgen.eval.tune:SamplingSearchConfig",
    "eval.heldout": "visgen.eval.generic:HeldoutEvalConfig",
    "serve": "visgen.serve.config:ServeConfig",
    "serve.limits": "visgen.serve.config:ServeLimits",
    "retrain": "visgen.retrain:RetrainConfig",
}


def section_class(section: str) -> type[BaseModel]:
    """The class of spec section ``section`` (a key of :data:`SECTION_CLASSES`), importing only its module."""
    module, name = SECTION_CLASSES[section].split(":")
    return getattr(importlib.import_module(module), name)


def add_section_flags(parser: argparse.ArgumentParser, sections: list[str], taken: set[str] | None = None) -> None:
    """Add one ``--flag`` per field of each named section; the dest records the dotted field path."""
    classes = {sec: section_class(sec) for sec in sections}
    taken = set() if taken is None else taken
    names: dict[str, list[str]] = {}
    for sec in sections:
        for field in classes[sec].model_fields:
            names.setdefault(field, []).append(sec)
    for sec in sections:
        group = parser.add_argument_group(f"{sec} (spec section; flags override the YAML)")
        for field, info in classes[sec].model_fields.items():
            if field in DERIVED_FIELDS.get(sec, ()):
                continue
            if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
                continue  # a nested section: its fields get flags of their own ("serve.limits")
            flag = field.replace("_", "-")
            if len(names[field]) > 1 or flag in taken:  # ambiguous across sections: qualify it
                flag = f"{sec.split('.')[-1]}-{flag}".replace("_", "-")
            taken.add(flag)
            dest = "cfg:" + f"{sec}.{field}"
            help_text = (info.description or "").rstrip(".") + f" (default: {info.default!r})"
            help_text = help_text.replace("%", "%%")
            if _is_bool(info.annotation):
                group.add_argument(f"--{flag}", dest=dest, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            else:
                kind = "raw" if _is_plain_str(info.annotation) else "yaml"
                choices = list(typing.get_args(info.annotation)) if typing.get_origin(info.annotation) is typing.Literal else None
                group.add_argument(f"--{flag}", dest=dest, default=None, metavar="{" + ",".join(map(str, choices)) + "}" if choices else "VALUE",
                                   choices=choices, type=(str if kind == "raw" else _yaml_value), help=help_text)


def _yaml_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in getattr(args, "set", None) or []:
        key, value = parse_override(item)
        out[key] = value
    for dest, value in vars(args).items():
        if dest.startswith("cfg:") and value is not None:
            out[dest[4:]] = value
    if getattr(args, "workdir", None):
        out["workdir"] = args.workdir
    return out


def spec_from_args(args: argparse.Namespace):
    from visgen.config import load_spec  # the spec imports every component (torch, Ray Data): not at --help

    return load_spec(args.pipeline, overrides_from_args(args))


# -- commands -------------------------------------------------------------------------------------

def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str, ensure_ascii=False))


def cmd_data_synth(args):
    from visgen import stages  # torch, Ray: keeps `visgen --help` fast

    report = stages.synth(spec_from_args(args), overwrite=args.overwrite)
    print(report.format() if hasattr(report, "format") else report)


def cmd_data_ingest(args):
    from visgen import stages  # torch, Ray: keeps `visgen --help` fast

    report = stages.ingest(spec_from_args(args))
    print(report.format())


def pack_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The ``data pack`` flags as ``PackConfig`` fields (``--template`` / ``--template-zh`` → ``templates``)."""
    fields = {dest[5:]: v for dest, v in vars(args).items() if dest.startswith("pack:") and v is not None}
    templates = {lang: fields.pop(f"template_{lang}") for lang in ("en", "zh") if f"template_{lang}" in fields}
    if templates:  # the languages given replace the default English template
        fields["templates"] = templates
    return fields


def cmd_data_pack(args):
    from visgen.data.pack import PackConfig, pack  # Ray Data: keeps `visgen --help` fast

    print(pack(validate_section(PackConfig, pack_fields(args), where="visgen data pack")).format())


def cmd_data_tokenizer(args):
    from visgen import stages  # torch, Ray: keeps `visgen --help` fast
    from visgen.text.tokenizer import TextTokenizer

    path = stages.text_tokenizer(spec_from_args(args), force=args.force)
    tok = TextTokenizer.load(path)
    print(f"text tokenizer: {path} (vocab {tok.vocab_size}, specials {tok.special_ids})")


def cmd_train_tokenizer(args):
    from visgen import stages  # torch, Ray: keeps `visgen --help` fast

    res = stages.train_tokenizer(spec_from_args(args), run_name=args.run_name)
    print(f"image tokenizer: {res.fit.step} steps, exported to {res.model_dir}")
    _print_json({"train": res.metrics, "eval": res.eval})


def cmd_eval_tokenizer(args):
    from visgen import stages  # torch, Ray: keeps `visgen --help` fast

    _print_json(stages.eval_tokenizer(spec_from_args(args), run_name=args.run_name))


def cmd_eval_judge(args):
    from visgen.eval.judge import DEFAULT_JUDGE_DIR, JudgeConfig, judge_report  # scipy, torch: keeps `visgen --help` fast

    spec = spec_from_args(args)
    default = spec.paths.eval / "judge" if args.train else DEFAULT_JUDGE_DIR  # never retrain the shipped one in place
    _print_json(judge_report(args.judge_dir or default, JudgeConfig(), train=args.train,
                             resolutions=args.resolutions, per_task=args.per_task, degraded=args.degraded))


def cmd_eval_generations(args):
    from visgen.eval.geneval import score_folder, write_results  # torch, scipy: keeps `visgen --help` fast
    from visgen.eval.judge import load_judge

    result = score_folder(args.images, load_judge(args.judge_dir))
    out = Path(args.out) if args.out else Path(args.images) / "results.json"
    write_results(result, out)
    _print_json({k: result[k] for k in ("overall", "tasks", "by_language", "judge", "missing_prompts") if k in result})
    print(f"full results: {out}")


def cmd_data_token_cache(args):
    from visgen import stages  # torch, Ray: keeps `visgen --help` fast

    print(stages.token_cache(spec_from_args(args), force=args.force).format())


def cmd_train_lm(args):
    from visgen import stages  # torch, Ray: keeps `visgen --help` fast

    spec = spec_from_args(args)
    res = stages.train_lm(spec, run_name=args.run_name)
    out = stages.bundle(spec)
    _print_json({"model_dir": res.model_dir, "bundle": out, "steps": res.fit.step, "metrics": res.metrics,
                 "eval": res.eval, "mlflow_run_id": res.fit.mlflow_run_id})


def cmd_eval_lm(args):
    from visgen import stages  # torch, Ray: keeps `visgen --help` fast

    ev = stages.eval_lm(spec_from_args(args), bundle_dir=args.bundle, run_name=args.run_name, force=args.force)
    _print_json({k: v for k, v in ev.items() if not isinstance(v, (dict, list))})


def _load_model(args):
    from visgen.inference import Model  # torch: keeps `visgen --help` fast

    if args.bundle:
        return Model.load(args.bundle, device=args.device)
    paths = spec_from_args(args).paths
    # An object store workdir: its bundle from the bucket (a cached copy on this machine).
    return Model.load(paths.location(paths.bundle), device=args.device)


def _output_paths(out: str, count: int) -> list[Path]:
    p = Path(out)
    if count == 1 and p.suffix:
        paths = [p]
    elif p.suffix:  # several images for one file name: name_000.png, name_001.png, ...
        paths = [p.with_name(f"{p.stem}_{i:03d}{p.suffix}") for i in range(count)]
    else:
        paths = [p / f"{i:03d}.png" for i in range(count)]
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    return paths


def _save_images(images, out: str) -> None:
    from PIL import Image  # keeps `visgen --help` to argparse, yaml and pydantic

    for image, path in zip(images, _output_paths(out, len(images))):
        Image.fromarray(image).save(path)
        print(path)


def cmd_generate(args):
    model = _load_model(args)
    images = model.generate(args.prompts, n=args.n, seed=args.seed, cfg_scale=args.cfg_scale,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            candidates=args.candidates, object_temperature=args.object_temperature,
                            object_cfg_scale=args.object_cfg_scale, object_min_p=args.object_min_p)
    _save_images(images, args.out)


def cmd_caption(args):
    model = _load_model(args)
    texts = model.caption(args.images, language=args.language, seed=args.seed, temperature=args.temperature,
                          candidates=args.candidates)
    for path, text in zip(args.images, texts):
        print(f"{path}\t{text}")


def cmd_edit(args):
    model = _load_model(args)
    image = model.edit(args.image, args.prompt, keep_rows=args.keep_rows, seed=args.seed, cfg_scale=args.cfg_scale,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       object_temperature=args.object_temperature, object_cfg_scale=args.object_cfg_scale,
                       object_min_p=args.object_min_p)
    _save_images([image], args.out)


@contextlib.contextmanager
def _registry(args):
    """The spec's registry; for an object store workdir its sqlite store is pulled from the bucket
    first and pushed back after a change."""
    from visgen.registry import Registry  # torch, MLflow: keeps `visgen --help` fast

    spec = spec_from_args(args)
    spec.paths.pull("mlflow.db")
    yield Registry.from_config(spec.tracking, spec.workdir), spec
    spec.paths.push("mlflow.db")


def cmd_register(args):
    tags = dict(parse_override(t) for t in args.tag or [])
    with _registry(args) as (reg, spec):
        if not args.bundle:
            spec.paths.pull("models/bundle")
        info = reg.register(args.bundle or spec.paths.bundle, tags=tags, verify=not args.no_verify)
    _print_json({"version": info.version, "source": info.source, "tags": info.tags})


def cmd_promote(args):
    with _registry(args) as (reg, _):
        _print_json({"aliases": reg.promote(args.version)})


def cmd_rollback(args):
    with _registry(args) as (reg, _):
        _print_json({"aliases": reg.rollback()})


def cmd_serve(args):
    from visgen.serve.app import run  # Ray Serve, FastAPI: keeps `visgen --help` fast
    from visgen.tracking import resolve_tracking_uri

    spec = spec_from_args(args)
    spec.paths.pull("mlflow.db")  # an object store workdir: its registry, from the bucket
    init_ray()
    print(f"serving {spec.serve.model_uri} on http://{spec.serve.host}:{spec.serve.port}{spec.serve.route_prefix} "
          f"(playground at /, API docs at /docs); Ctrl-C stops", flush=True)
    run(spec.serve, resolve_tracking_uri(spec.tracking, spec.workdir), blocking=True)


def cmd_retrain(args):
    from visgen.retrain import retrain  # Ray, pyarrow: keeps `visgen --help` fast

    _print_json(retrain(spec_from_args(args)))


def cmd_run(args):
    from visgen import stages  # torch, Ray: keeps `visgen --help` fast

    spec = spec_from_args(args)
    summary = stages.run_pipeline(spec)
    print("\n=== summary ===")
    _print_json(summary)
    print(stages.where_to_look(spec, args.pipeline))


def cmd_spec_show(args):
    _print_json(spec_from_args(args).dump())


COMMANDS: dict[tuple[str, ...], tuple[Any, list[str], str]] = {
    ("data", "synth"): (cmd_data_synth, ["data.synth"], "generate the procedural shapes shards (WebDataset, img2dataset layout)"),
    ("data", "ingest"): (cmd_data_ingest, ["data.ingest"], "run the Ray Data ingest pass: decode, validate, resize, tokenize, quarantine"),
    ("data", "pack"): (cmd_data_pack, [], "pack a folder of images + captions, an ImageFolder tree or a parquet "
                                         "into img2dataset-layout shards (one Ray task per shard)"),
    ("data", "tokenizer"): (cmd_data_tokenizer, ["text_tokenizer"], "train the byte-level BPE text tokenizer over the shard captions"),
    ("train", "tokenizer"): (cmd_train_tokenizer, ["image_tokenizer.model", "image_tokenizer.train", "image_tokenizer.scaling"],
                             "train the VQ image tokenizer on Ray Train (resumes a run with checkpoints)"),
    ("eval", "tokenizer"): (cmd_eval_tokenizer, [], "PSNR, SSIM, codebook usage and perplexity on the held-out shards"),
    ("eval", "judge"): (cmd_eval_judge, [], "train (--train) and/or measure the shapes judge's per-task accuracy on held-out renders"),
    ("eval", "generations"): (cmd_eval_generations, [], "GenEval-style scores of a folder of generated images (metadata.jsonl + images)"),
    ("data", "token-cache"): (cmd_data_token_cache, ["token_cache"],
                              "encode the ingested images with the frozen image tokenizer into the parquet token cache"),
    ("train", "lm"): (cmd_train_lm, ["lm.model", "lm.recipe", "lm.train", "lm.scaling"],
                      "train the text<->image transformer on the token cache (Ray Train) and write the model bundle"),
    ("eval", "lm"): (cmd_eval_lm, ["eval.geneval", "eval.captions", "eval.sampling_search", "eval.heldout"],
                     "GenEval-shapes (text -> image) and caption accuracy (image -> text) of the model bundle, "
                     "after choosing its sampling defaults on validation prompts when eval.sampling_search.enabled"),
    ("generate",): (cmd_generate, [], "draw images for text prompts (any language the tokenizer was trained on)"),
    ("caption",): (cmd_caption, [], "caption image files"),
    ("edit",): (cmd_edit, [], "keep the top token rows of an image and redraw the rest to match a prompt"),
    ("register",): (cmd_register, [], "register a model bundle as a new version of the MLflow model 'visgen' (eval results as tags)"),
    ("promote",): (cmd_promote, [], "point the alias 'champion' at a version (the old champion becomes 'previous')"),
    ("rollback",): (cmd_rollback, [], "swap 'champion' and 'previous' back"),
    ("serve",): (cmd_serve, ["serve", "serve.limits"], "serve the champion over HTTP with Ray Serve (generate / caption / edit, playground at /)"),
    ("retrain",): (cmd_retrain, ["retrain"], "continue the champion on shards it has not seen; promote the result only "
                                            "if it beats the champion on the same held-out set (one at a time)"),
    ("run",): (cmd_run, [], "the whole pipeline: shards -> tokenizers -> ingest -> token cache -> transformer -> eval -> "
                            "register -> serve check"),
    ("spec", "show"): (cmd_spec_show, [], "print the fully resolved spec (after overrides) as JSON"),
}

_BUNDLE_FLAGS = [
    ("--bundle", {"help": "model bundle directory or MLflow URI such as models:/visgen@champion "
                          "(default: <workdir>/models/bundle of --pipeline)"}),
    ("--device", {"default": "auto", "help": "cpu, cuda, cuda:1 ... (default: cuda when available)"}),
]
_SAMPLING_FLAGS = [
    ("--seed", {"type": int, "default": 0, "help": "sampling seed; image i uses seed + i (default: 0)"}),
    ("--cfg-scale", {"type": float, "help": "classifier-free guidance scale (default: the bundle's)"}),
    ("--temperature", {"type": float, "help": "sampling temperature, 0 = greedy (default: the bundle's)"}),
    ("--top-k", {"type": int, "help": "sample among the k most likely codes (default: the bundle's)"}),
    ("--top-p", {"type": float, "help": "nucleus sampling mass (default: the bundle's)"}),
    ("--object-temperature", {"type": float, "help": "draw object codes apart from the background at this "
                                                     "temperature, 0 = their most likely (default: the bundle's)"}),
    ("--object-cfg-scale", {"type": float, "help": "guidance scale of those object codes; --cfg-scale then guides "
                                                   "whether a slot is background (default: the bundle's)"}),
    ("--object-min-p", {"type": float, "help": "draw those object codes among the ones the prompt's own model "
                                               "finds at least this fraction as likely as its likeliest; 0 = all "
                                               "(default: the bundle's)"}),
    *_BUNDLE_FLAGS,
]

EXTRA_FLAGS = {
    ("data", "synth"): [("--overwrite", {"action": "store_true", "help": "replace shards made from a different config"})],
    ("train", "tokenizer"): [("--run-name", {"help": "Ray Train / MLflow run name; the same name resumes (default: image_tokenizer)"})],
    ("eval", "tokenizer"): [("--run-name", {"help": "MLflow run to log the held-out metrics to (default: image_tokenizer)"})],
    ("eval", "judge"): [
        ("--train", {"action": "store_true", "help": "train the judge (on rendered shapes only) before measuring it"}),
        ("--judge-dir", {"help": "judge weights directory (default: the shipped judge; with --train <workdir>/eval/judge)"}),
        ("--resolutions", {"nargs": "+", "type": int, "help": "image sizes to measure at (default: 32 64)"}),
        ("--per-task", {"type": int, "help": "held-out renders per task"}),
        ("--degraded", {"action": "store_true", "help": "also measure on degraded renders (blur, noise, JPEG)"}),
    ],
    ("eval", "generations"): [
        ("--images", {"required": True, "help": "folder holding metadata.jsonl and <prompt id>_<index>.png images"}),
        ("--judge-dir", {"help": "judge weights directory (default: the judge shipped with visgen)"}),
        ("--out", {"help": "result JSON path (default: IMAGES/results.json)"}),
    ],
    ("data", "pack"): [
        ("pack:source", {"metavar": "SRC", "help": "a directory of images (with --captions or metadata.jsonl), an "
                                                   "ImageFolder tree (SRC/<class>/<image>), or a .parquet file"}),
        ("--out", {"dest": "pack:output", "metavar": "DIR", "required": True, "help": "output directory of the shards"}),
        ("--layout", {"dest": "pack:layout", "choices": ["auto", "captions", "imagefolder", "parquet"],
                      "help": "how SRC is read (default: auto)"}),
        ("--captions", {"dest": "pack:captions", "metavar": "FILE",
                        "help": "JSONL / CSV / TSV rows naming an image (path relative to SRC, or key) and its caption"}),
        ("--labels", {"dest": "pack:labels", "metavar": "FILE",
                      "help": "JSON: class name -> label, or -> {language: label} (e.g. Chinese names)"}),
        ("--template", {"dest": "pack:template_en", "metavar": "TEXT",
                        "help": "English caption template for class labels (default: \"a photo of a {label}\")"}),
        ("--template-zh", {"dest": "pack:template_zh", "metavar": "TEXT",
                           "help": "Chinese caption template, e.g. \"一张{label}的照片\" (one sample per template)"}),
        ("--image-column", {"dest": "pack:image_column", "metavar": "NAME", "help": "image column: path/key (captions file), "
                                                                 "bytes (parquet) (default: autodetect)"}),
        ("--text-column", {"dest": "pack:text_column", "metavar": "NAME", "help": "caption column (default: autodetect)"}),
        ("--language-column", {"dest": "pack:language_column", "metavar": "NAME",
                               "help": "language column (default: language/lang if present, else detected)"}),
        ("--shard-size", {"dest": "pack:shard_size", "metavar": "N", "type": int, "help": "samples per shard (default: 1000)"}),
        ("--shuffle", {"dest": "pack:shuffle", "action": argparse.BooleanOptionalAction,
                       "help": "shuffle the images (each with its captions) before cutting shards, so every shard is "
                               "a random sample (default: on; --no-shuffle keeps the sorted input order)"}),
        ("--shuffle-seed", {"dest": "pack:shuffle_seed", "metavar": "N", "type": int, "help": "seed of the shuffle (default: 0)"}),
        ("--image-format", {"dest": "pack:image_format", "choices": ["keep", "jpg", "png", "webp"],
                            "help": "keep the original bytes, or re-encode other formats (default: keep)"}),
        ("--jpeg-quality", {"dest": "pack:jpeg_quality", "metavar": "Q", "type": int, "help": "re-encoding quality (default: 95)"}),
        ("--min-size", {"dest": "pack:min_size", "metavar": "PX", "type": int,
                        "help": "quarantine images whose shorter side is smaller (default: ingest's, 32)"}),
        ("--max-image-pixels", {"dest": "pack:max_image_pixels", "metavar": "N", "type": int,
                                "help": "quarantine images declaring more pixels (default: ingest's)"}),
        ("--max-member-bytes", {"dest": "pack:max_member_bytes", "metavar": "BYTES", "type": int,
                                "help": "quarantine image files larger than this (default: ingest's)"}),
        ("--quarantine", {"dest": "pack:quarantine_dir", "metavar": "DIR",
                          "help": "quarantine table directory (default: OUT/_quarantine)"}),
        ("--cpus-per-shard", {"dest": "pack:cpus_per_shard", "metavar": "CPUS", "type": float,
                              "help": "Ray CPUs per shard task (default: 1)"}),
    ],
    ("data", "tokenizer"): [("--force", {"action": "store_true", "help": "retrain even when the saved tokenizer is up to date"})],
    ("data", "token-cache"): [("--force", {"action": "store_true", "help": "rebuild even when the cache is up to date"})],
    ("train", "lm"): [("--run-name", {"help": "Ray Train / MLflow run name; the same name resumes (default: lm)"})],
    ("eval", "lm"): [
        ("--bundle", {"help": "model bundle directory or MLflow URI (default: <workdir>/models/bundle)"}),
        ("--run-name", {"help": "MLflow run to log the results to (default: lm)"}),
        ("--force", {"action": "store_true", "help": "evaluate again even when the bundle has results for these settings"}),
    ],
    ("register",): [
        ("bundle", {"nargs": "?", "metavar": "BUNDLE", "help": "bundle directory (default: <workdir>/models/bundle)"}),
        ("--tag", {"action": "append", "metavar": "KEY=VALUE", "help": "extra version tag (repeatable)"}),
        ("--no-verify", {"action": "store_true", "help": "skip loading the bundle before registering it"}),
    ],
    ("promote",): [("version", {"metavar": "VERSION", "help": "model version number"})],
    ("generate",): [
        ("prompts", {"nargs": "+", "metavar": "PROMPT", "help": "text prompt(s), e.g. \"a red circle left of a blue square\""}),
        ("--out", {"required": True, "help": "output PNG (several images: NAME_000.png, ...) or a directory"}),
        ("--n", {"type": int, "default": 1, "help": "images per prompt (default: 1)"}),
        ("--candidates", {"type": int, "help": "draw this many per image and keep the one whose prompt the model "
                                              "finds the likeliest caption of it (default: the bundle's)"}),
        *_SAMPLING_FLAGS,
    ],
    ("caption",): [
        ("images", {"nargs": "+", "metavar": "IMAGE", "help": "image files (resized to the model's resolution)"}),
        ("--language", {"choices": ["auto", "en", "zh"], "default": "auto",
                        "help": "caption language: auto (the model chooses), en or zh (default: auto)"}),
        ("--seed", {"type": int, "default": 0, "help": "sampling seed (default: 0)"}),
        ("--temperature", {"type": float, "help": "0 = greedy (default: the bundle's caption_temperature)"}),
        ("--candidates", {"type": int, "help": "write this many captions per image and keep the one under which "
                                              "the model finds the image likeliest (default: the bundle's)"}),
        *_BUNDLE_FLAGS,
    ],
    ("edit",): [
        ("image", {"metavar": "IMAGE", "help": "image file to edit"}),
        ("prompt", {"metavar": "PROMPT", "help": "what the edited image should show"}),
        ("--keep-rows", {"type": int, "required": True, "help": "token rows kept from the top of the image; the rest is redrawn"}),
        ("--out", {"required": True, "help": "output PNG"}),
        *_SAMPLING_FLAGS,
    ],
}


# Commands that read no pipeline spec: no --pipeline / --workdir / --set (a flag must reach something).
SPECLESS_COMMANDS = {("data", "pack")}


def command_of(argv: list[str]) -> tuple[str, ...]:
    """The command ``argv`` names (``("data", "pack")``, ``("generate",)``), or ``()`` when none does."""
    words = [a for a in argv if not a.startswith("-")][:2]
    for n in (1, 2):
        if tuple(words[:n]) in COMMANDS:
            return tuple(words[:n])
    return ()


def build_parser(only: tuple[str, ...] | None = None) -> argparse.ArgumentParser:
    """The whole command line. ``only``: generate the spec-section flags for that command alone
    (``main`` passes the command being run): the section classes import their components (torch,
    Ray Data), which ``visgen --help`` or ``visgen data pack`` should not wait for."""
    parser = argparse.ArgumentParser(prog="visgen", description="Train and serve a text<->image model on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    sub_by_group: dict[str, argparse._SubParsersAction] = {}
    group_help = {"data": "data stages: synth, pack, ingest, tokenizer, token-cache", "train": "training stages",
                  "eval": "evaluation", "spec": "inspect pipeline specs"}
    for command, (fn, sections, help_text) in COMMANDS.items():
        if len(command) == 1:
            p = groups.add_parser(command[0], help=help_text, description=help_text)
        else:
            group, name = command
            if group not in sub_by_group:
                gp = groups.add_parser(group, help=group_help.get(group, group), description=group_help.get(group, group))
                sub_by_group[group] = gp.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
            p = sub_by_group[group].add_parser(name, help=help_text, description=help_text)
        if command not in SPECLESS_COMMANDS:
            p.add_argument("--pipeline", "-p", default=DEFAULT_PIPELINE, help=f"pipeline spec YAML (default: {DEFAULT_PIPELINE})")
            p.add_argument("--workdir", help="override the spec's workdir (where every artifact goes)")
            p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any spec field, e.g. --set data.ingest.resolution=64")
        taken = {"pipeline", "workdir", "set", "verbose"}
        for flag, kw in EXTRA_FLAGS.get(command, []):
            p.add_argument(flag, **kw)
            taken.add(flag.lstrip("-"))
        if sections and (only is None or only == command):
            add_section_flags(p, sections, taken)
        p.set_defaults(func=fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=command_of(argv))
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        args.func(args)
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as err:
        if args.verbose:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
