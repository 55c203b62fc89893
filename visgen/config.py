"""Typed pipeline specs: the composition of every component's section.

A spec is one YAML file under ``pipelines/``. It is loaded into :class:`PipelineSpec`, a typed
tree whose sections are owned by the modules they configure (``SynthConfig`` lives next to the
shapes generator, ``IngestConfig`` next to the ingest stage, ...) and built on
:mod:`visgen.base`, which imports nothing of the package: the components never import this
module, so the import graph has no circle. Components receive only their own section. Every
section forbids unknown keys, so a typo is an error, not a silent default. :data:`SECTIONS` (every
section's dotted path and class) and :data:`DERIVED_FIELDS` (fields that follow another section)
are read from the same tree by the CLI, which builds its flags from them.

A bad spec raises :class:`SpecError` naming the field path, the offending value and what is
allowed, e.g. ``data.ingest.resolution: 7 is not allowed: Input should be greater than or
equal to 8``.
"""

from __future__ import annotations

import os
import re
import typing
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from visgen import storage
# The base names, re-exported: `from visgen.config import SpecError` is what users and tests write.
from visgen.base import (  # noqa: F401
    DERIVED_FIELDS, Section, SpecError, format_validation_error, get_dotted, parse_override, read_yaml, replace, set_dotted,
    validate_section,
)
from visgen.data.ingest import IngestConfig
from visgen.data.synth import SynthConfig
from visgen.data.token_cache import TokenCacheConfig
from visgen.eval.captions import CaptionEvalConfig
from visgen.eval.generic import HeldoutEvalConfig
from visgen.eval.geneval import GenEvalConfig
from visgen.eval.tune import SamplingSearchConfig
from visgen.models.gpt import PRESETS as GPT_PRESETS
from visgen.models.gpt import GPTConfig
from visgen.models.vq import PRESETS as VQ_PRESETS
from visgen.models.vq import VQConfig
from visgen.inference import SamplingConfig
from visgen.retrain import RetrainConfig
from visgen.serve.config import ServeConfig
from visgen.text.tokenizer import TextTokenizerConfig
from visgen.tracking import TrackingConfig
from visgen.train.config import ScalingConfig, TrainConfig
from visgen.train.lm import LMRecipe
from visgen.workdir import Workdir  # noqa: F401 - re-exported

_PLACEHOLDER = re.compile(r"\$\{(workdir|name)\}")


def _substitute(obj: Any, values: dict[str, str]) -> Any:
    """Replace ``${workdir}`` / ``${name}`` in every string (``{a..b}`` brace ranges are left alone)."""
    if isinstance(obj, str):
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], obj)
    if isinstance(obj, dict):
        return {k: _substitute(v, values) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_substitute(v, values) for v in obj]
    return obj


class PipelineSpec(BaseModel):
    """One pipeline: data → text tokenizer → image tokenizer → token cache → LM → evaluation → serving.

    Sections are validated by the classes of the components that own them; this class only
    composes them and checks what spans sections (e.g. image resolution).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                      description="Pipeline name: names the MLflow experiment default, runs and checkpoints.")
    workdir: str = Field(description="Directory holding every artifact of this pipeline (`${name}` allowed).")
    data: DataSpec
    text_tokenizer: TextTokenizerConfig
    image_tokenizer: ImageTokenizerSpec
    token_cache: TokenCacheConfig
    lm: LMSpec
    sampling: SamplingConfig
    eval: EvalSpec
    serve: ServeConfig
    retrain: RetrainConfig
    tracking: TrackingConfig

    @model_validator(mode="before")
    @classmethod
    def _build_sections(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        raw = dict(raw)
        name = raw.get("name", "pipeline")
        workdir = raw.get("workdir") or "work/${name}"
        # Absolute, so Ray tasks and Train workers (whose CWD may differ) all see the same paths; a
        # URL (s3://bucket/run) is kept as a URL.
        raw["workdir"] = storage.location(_substitute(str(workdir), {"name": str(name), "workdir": ""}))
        raw = _substitute(raw, {"name": str(name), "workdir": raw["workdir"]})
        out = {k: raw[k] for k in ("name", "workdir") if k in raw}
        unknown = sorted(set(raw) - set(TOP_LEVEL_KEYS))
        if unknown:
            raise SpecError("invalid spec:\n" + "\n".join(
                f"{k}: unknown key (value {raw[k]!r}); allowed top-level keys: {', '.join(TOP_LEVEL_KEYS)}"
                for k in unknown))

        data = raw.get("data")
        if not isinstance(data, dict) or "ingest" not in data:
            raise SpecError("invalid spec:\ndata.ingest: required section is missing (the shard source and preprocessing)")
        _check_keys(data, "data", ("synth", "ingest"))
        ingest = _validate_at(IngestConfig, data["ingest"], "data.ingest")
        out["data"] = DataSpec(
            synth=_validate_at(SynthConfig, data["synth"], "data.synth") if data.get("synth") is not None else None,
            ingest=ingest)
        out["text_tokenizer"] = _validate_at(TextTokenizerConfig, raw.get("text_tokenizer") or {}, "text_tokenizer")
        tracking = dict(raw.get("tracking") or {})
        tracking.setdefault("experiment", f"visgen-{name}")
        out["tracking"] = _validate_at(TrackingConfig, tracking, "tracking")
        out["image_tokenizer"] = _image_tokenizer_section(raw.get("image_tokenizer") or {}, ingest)
        out["token_cache"] = _validate_at(TokenCacheConfig, raw.get("token_cache") or {}, "token_cache")
        out["lm"] = _lm_section(raw.get("lm") or {}, ingest, out["text_tokenizer"], out["image_tokenizer"].model)
        out["sampling"] = _validate_at(SamplingConfig, raw.get("sampling") or {}, "sampling")
        ev = raw.get("eval") or {}
        _check_keys(ev, "eval", ("shapes", "geneval", "captions", "sampling_search", "heldout"))
        out["eval"] = EvalSpec(geneval=_validate_at(GenEvalConfig, ev.get("geneval") or {}, "eval.geneval"),
                               captions=_validate_at(CaptionEvalConfig, ev.get("captions") or {}, "eval.captions"),
                               sampling_search=_validate_at(SamplingSearchConfig, ev.get("sampling_search") or {},
                                                            "eval.sampling_search"),
                               heldout=_validate_at(HeldoutEvalConfig, ev.get("heldout") or {}, "eval.heldout"),
                               shapes=_shapes_benchmarks(ev.get("shapes", "auto"), data.get("synth") is not None))
        out["serve"] = _validate_at(ServeConfig, raw.get("serve") or {}, "serve")
        out["retrain"] = _validate_at(RetrainConfig, raw.get("retrain") or {}, "retrain")
        return out

    @cached_property
    def paths(self) -> Workdir:
        return Workdir(self.workdir)

    def dump(self) -> dict:
        """Plain-data form (what MLflow logs as params, flattened)."""
        return self.model_dump(mode="json")


TOP_LEVEL_KEYS = ("name", "workdir", "data", "text_tokenizer", "image_tokenizer", "token_cache", "lm", "sampling",
                  "eval", "serve", "retrain", "tracking")


class _Tree(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSpec(_Tree):
    """``data:`` — the shapes generator (optional) and the ingest stage."""

    synth: SynthConfig | None = None
    ingest: IngestConfig


class ImageTokenizerSpec(_Tree):
    """``image_tokenizer:`` — model (a VQ preset + overrides), training and scaling sections."""

    model: VQConfig
    train: TrainConfig
    scaling: ScalingConfig


class LMSpec(_Tree):
    """``lm:`` — the transformer (a GPT preset + overrides), its training recipe, loop and scaling."""

    model: GPTConfig
    recipe: LMRecipe
    train: TrainConfig
    scaling: ScalingConfig


class EvalSpec(_Tree):
    """``eval:`` — what the evaluation stages measure.

    ``heldout``: the metrics that hold on any data (held-out loss and perplexity, caption BLEU /
    chrF, retrieval by the model's own likelihood, Fréchet distance on the image tokenizer's
    encoder features, a sample grid); always run. ``shapes`` (bool, resolved from the spec's
    ``eval.shapes: auto | true | false``; auto = the spec has a ``data.synth`` section) switches
    on what only means something on the shapes data: GenEval-shapes (``geneval``), the caption
    slot benchmark (``captions``), the judge-read ceiling of the image tokenizer and the search of
    the sampling defaults on validation prompts (``sampling_search``), which all read the shapes judge."""

    geneval: GenEvalConfig
    captions: CaptionEvalConfig
    sampling_search: SamplingSearchConfig
    heldout: HeldoutEvalConfig
    shapes: bool = True


def _shapes_benchmarks(value: Any, has_synth: bool) -> bool:
    """``eval.shapes`` → whether the shapes-only benchmarks run ('auto': when ``data.synth`` is present)."""
    if value == "auto":
        return has_synth
    if isinstance(value, bool):
        return value
    raise SpecError(f"invalid spec:\neval.shapes: {value!r} is not allowed: expected 'auto' (shapes benchmarks when "
                    f"data.synth is present), true (the shards are shapes renders) or false (any other data)")


def _check_keys(raw: Any, path: str, allowed: tuple[str, ...]) -> None:
    if not isinstance(raw, dict):
        raise SpecError(f"invalid spec:\n{path}: {raw!r} is not allowed: expected a mapping with keys {', '.join(allowed)}")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise SpecError("invalid spec:\n" + "\n".join(f"{path}.{k}: unknown key; allowed: {', '.join(allowed)}" for k in unknown))


def _lm_section(raw: Any, ingest, text_tokenizer, vq) -> LMSpec:
    _check_keys(raw, "lm", ("model", "recipe", "train", "scaling"))
    model = dict(raw.get("model") or {})
    preset = model.pop("preset", "small")
    if preset not in GPT_PRESETS:
        raise SpecError(f"invalid spec:\nlm.model.preset: {preset!r} is not allowed: choose one of {sorted(GPT_PRESETS)}")
    side = vq.resolution // vq.downsample
    # The vocabulary and layout follow the tokenizers and the ingest stage; they cannot be set apart.
    derived = {"text_vocab": (text_tokenizer.vocab_size, "text_tokenizer.vocab_size"),
               "codebook_size": (vq.codebook_size, "image_tokenizer.model.codebook_size"),
               "grid": ((side, side), "the image tokenizer's latent grid"),
               "max_text_tokens": (ingest.max_text_tokens, "data.ingest.max_text_tokens")}
    assert tuple(derived) == DERIVED_FIELDS["lm.model"]
    for key, (value, source) in derived.items():
        if key in model and (tuple(model[key]) if key == "grid" else model[key]) != value:
            raise SpecError(f"invalid spec:\nlm.model.{key}: {model[key]!r} is not allowed: it follows {source} ({value!r})")
        model[key] = value
    return LMSpec(
        model=_validate_at(GPTConfig, {**GPT_PRESETS[preset], **model}, "lm.model"),
        recipe=_validate_at(LMRecipe, raw.get("recipe") or {}, "lm.recipe"),
        train=_validate_at(TrainConfig, raw.get("train") or {}, "lm.train"),
        scaling=_validate_at(ScalingConfig, raw.get("scaling") or {}, "lm.scaling"),
    )


def _validate_at(cls: type[BaseModel], data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise SpecError(f"invalid spec:\n{path}: {data!r} is not allowed: expected a mapping of {cls.__name__} fields")
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise SpecError("invalid spec:\n" + format_validation_error(err, prefix=path)) from None


def _image_tokenizer_section(raw: dict, ingest) -> ImageTokenizerSpec:
    _check_keys(raw, "image_tokenizer", ("model", "train", "scaling"))
    model = dict(raw.get("model") or {})
    preset = model.pop("preset", "small")
    presets = VQ_PRESETS
    if preset not in presets:
        raise SpecError(f"invalid spec:\nimage_tokenizer.model.preset: {preset!r} is not allowed: choose one of {sorted(presets)}")
    base = dict(presets[preset]) if isinstance(presets[preset], dict) else presets[preset].model_dump()
    if "resolution" in model and model["resolution"] != ingest.resolution:
        raise SpecError(f"invalid spec:\nimage_tokenizer.model.resolution: {model['resolution']!r} is not allowed: "
                        f"it must equal data.ingest.resolution ({ingest.resolution})")
    base.update(model)
    base["resolution"] = ingest.resolution
    return ImageTokenizerSpec(
        model=_validate_at(VQConfig, base, "image_tokenizer.model"),
        train=_validate_at(TrainConfig, raw.get("train") or {}, "image_tokenizer.train"),
        scaling=_validate_at(ScalingConfig, raw.get("scaling") or {}, "image_tokenizer.scaling"),
    )


def load_spec(path: str | Path, overrides: dict[str, Any] | None = None) -> PipelineSpec:
    """Load ``pipelines/X.yaml`` and apply dotted overrides (``{"data.ingest.resolution": 64}``)."""
    data = read_yaml(path)
    overrides = dict(overrides or {})
    if os.environ.get("VISGEN_WORKDIR") and "workdir" not in overrides:
        overrides["workdir"] = os.environ["VISGEN_WORKDIR"]  # e.g. shared storage on a cluster
    for key, value in overrides.items():
        set_dotted(data, key, value)
    try:
        return PipelineSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(f"invalid spec {str(path)!r}:\n" + format_validation_error(err)) from None
    except SpecError as err:
        raise SpecError(str(err).replace("invalid spec:", f"invalid spec {str(path)!r}:", 1)) from None


PipelineSpec.model_rebuild()  # its field types are defined below it


def _unwrap(annotation: Any) -> Any:
    """``X | None`` → ``X``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args and len(args) == 1 else annotation


def _section_tree(model: type[BaseModel], prefix: str = "") -> dict[str, type[Section]]:
    out: dict[str, type[Section]] = {}
    for name, info in model.model_fields.items():
        kind = _unwrap(info.annotation)
        if not (isinstance(kind, type) and issubclass(kind, BaseModel)):
            continue
        path = f"{prefix}{name}"
        if issubclass(kind, Section):
            out[path] = kind
        out.update(_section_tree(kind, prefix=f"{path}."))  # a group (DataSpec), or a nested section (serve.limits)
    return out


# Every section of a spec by its dotted path ("lm.train" -> TrainConfig), read from the typed tree.
SECTIONS: dict[str, type[Section]] = _section_tree(PipelineSpec)
