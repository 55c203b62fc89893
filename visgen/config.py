"""Typed pipeline specs.

A spec is one YAML file under ``pipelines/``. It is loaded into :class:`PipelineSpec`, whose
sections are owned by the modules they configure (``SynthConfig`` lives next to the shapes
generator, ``IngestConfig`` next to the ingest stage, ...). Components receive only their
own section. Every section forbids unknown keys, so a typo is an error, not a silent default.

A bad spec raises :class:`SpecError` naming the field path, the offending value and what is
allowed, e.g. ``data.ingest.resolution: 7 is not allowed: Input should be greater than or
equal to 8``.
"""

from __future__ import annotations

import json
import os
import re
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class Section(BaseModel):
    """Base for every config section: unknown keys are errors, instances are immutable.

    Derive variants with ``cfg.model_copy(update={...})`` (validated by :func:`replace`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class SpecError(ValueError):
    """A pipeline spec (or an override of one) is invalid. The message names field, value and rule."""


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        value = e.get("input")
        if e["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown key (value {value!r}); check the spelling against the spec reference in README.md")
        elif e["type"] == "missing":
            lines.append(f"{path}: required field is missing")
        else:
            lines.append(f"{path}: {value!r} is not allowed: {e['msg']}")
    return "\n".join(lines)


def validate_section(cls: type[BaseModel], data: Any, where: str = "") -> Any:
    """Build ``cls`` from ``data``, turning pydantic's errors into a :class:`SpecError`."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise SpecError(f"invalid spec{' (' + where + ')' if where else ''}:\n" + format_validation_error(err)) from None


def replace(section: Section, **changes: Any) -> Any:
    """Validated ``dataclasses.replace`` for a section (``model_copy`` alone skips validation)."""
    data = section.model_dump()
    data.update(changes)
    return validate_section(type(section), data)


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"spec file {str(p)!r} does not exist (looked in {p.resolve().parent}); "
                        f"available specs: {', '.join(sorted(x.name for x in Path('pipelines').glob('*.yaml'))) or 'none found in ./pipelines'}")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise SpecError(f"spec file {str(p)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise SpecError(f"spec file {str(p)!r} must hold a mapping at the top level, got {type(data).__name__}")
    return data


# ---------------------------------------------------------------------------------------------
# The pipeline spec: composition of the sections owned by each component.
# ---------------------------------------------------------------------------------------------


def _sections():
    # Imported lazily: the section classes live next to the code they configure, and some of
    # those modules import this one.
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
    from visgen.text.tokenizer import TextTokenizerConfig
    from visgen.pipeline import SamplingConfig
    from visgen.retrain import RetrainConfig
    from visgen.serve.config import ServeConfig, ServeLimits
    from visgen.tracking import TrackingConfig
    from visgen.train.config import ScalingConfig, TrainConfig
    from visgen.train.lm import LMRecipe

    return locals()


class Workdir:
    """Where every durable artifact of one pipeline lives (one directory, nothing else to set up).

    ``root`` is a local directory or an object store URL (``s3://bucket/run``, see
    :mod:`visgen.storage`). With a URL, the artifacts that Ray tasks, Train workers and Serve
    replicas read or write on any node are addressed by URL (:meth:`location`; the quarantine
    table, the token cache and the Train checkpoints are written there directly), and the driver
    works on the rest (text tokenizer, exported models, bundle, evaluation files, summary, the
    sqlite MLflow store) in a local mirror of the workdir (:attr:`root`), pulled before a stage
    reads it and pushed when the stage wrote it (:meth:`pull` / :meth:`push`). For a local
    workdir :attr:`root` is the directory itself and pulling or pushing does nothing.
    """

    def __init__(self, root: str | Path):
        from visgen import storage

        if storage.is_url(root):
            self.url: str | None = storage.location(root)
            self.root = storage.mirror_dir(self.url)
        else:
            self.url = None
            self.root = Path(root).expanduser().resolve()

    remote = property(lambda self: self.url is not None)
    shards = property(lambda self: self.root / "shards")
    text_tokenizer = property(lambda self: self.root / "text_tokenizer.json")
    models = property(lambda self: self.root / "models")
    bundle = property(lambda self: self.root / "models" / "bundle")
    eval = property(lambda self: self.root / "eval")
    # Shared by every node: a URL for a remote workdir.
    quarantine = property(lambda self: self.location("quarantine"))
    token_cache = property(lambda self: self.location("token_cache"))
    ray_results = property(lambda self: self.location("ray_results"))

    def location(self, relative: str | Path) -> str:
        """The durable location of ``relative`` (a path inside the workdir, or a local path under
        :attr:`root`): ``<url>/<relative>`` for a remote workdir, the local path otherwise."""
        rel = Path(relative)
        if rel.is_absolute():
            rel = rel.relative_to(self.root)
        if self.url is None:
            return str(self.root / rel)
        from visgen import storage

        return storage.join(self.url, rel.as_posix())

    def shared(self, path: str | Path) -> str:
        """What to hand a Ray task for a local path: its location in the bucket when the workdir is
        remote and ``path`` is in the mirror, else the path itself (a URL stays a URL)."""
        text = str(path)
        if self.url is None or "://" in text:
            return text
        p = Path(text).expanduser().resolve()
        return self.location(p) if p.is_relative_to(self.root) else str(p)

    def pull(self, *relative: str | Path) -> None:
        """Bring the named files or directories of a remote workdir into the local mirror (a name the
        bucket does not hold is left as it is; one whose listing has not changed since the last pull
        or push is not downloaded again); nothing for a local workdir."""
        if self.url is None:
            return
        from visgen import storage

        for rel in relative:
            loc = self.location(rel)
            remote = storage.listing(loc)
            if not remote:
                continue
            local = self.root / loc[len(self.url) + 1:]
            key = loc[len(self.url) + 1:]
            if not (local.exists() and self._synced().get(key) == remote):
                storage.download(loc, local)
                self._record(key, remote)

    def push(self, *relative: str | Path) -> None:
        """Upload the named files or directories of the local mirror to a remote workdir (replacing
        them there); nothing for a local workdir or for a name the mirror does not hold."""
        if self.url is None:
            return
        from visgen import storage

        for rel in relative:
            loc = self.location(rel)
            key = loc[len(self.url) + 1:]
            local = self.root / key
            if local.exists():
                storage.upload(local, loc)
                self._record(key, storage.listing(loc))

    def _synced(self) -> dict:
        path = self.root / ".visgen-sync.json"
        try:
            return {k: [tuple(e) for e in v] for k, v in json.loads(path.read_text()).items()}
        except (OSError, ValueError):
            return {}

    def _record(self, key: str, listing: list) -> None:
        state = self._synced()
        state[key] = [tuple(e) for e in listing]
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / ".visgen-sync.json").write_text(json.dumps(state))

    def __repr__(self) -> str:
        return f"Workdir({self.url or str(self.root)!r})"


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


def set_dotted(data: dict, dotted: str, value: Any) -> None:
    """``set_dotted(d, "data.ingest.resolution", 64)``; creates intermediate mappings."""
    keys = dotted.split(".")
    node = data
    for i, k in enumerate(keys[:-1]):
        nxt = node.get(k)
        if nxt is None:
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise SpecError(f"{'.'.join(keys[:i + 1])}: is a {type(nxt).__name__}, cannot set {dotted!r} inside it")
        node = nxt
    node[keys[-1]] = value


def get_dotted(obj: Any, dotted: str) -> Any:
    for k in dotted.split("."):
        obj = obj[k] if isinstance(obj, dict) else getattr(obj, k)
    return obj


def parse_override(text: str) -> tuple[str, Any]:
    """``"data.ingest.resolution=64"`` → ``("data.ingest.resolution", 64)`` (the value is YAML)."""
    if "=" not in text:
        raise SpecError(f"override {text!r} must look like dotted.key=value, e.g. data.ingest.resolution=64")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


class PipelineSpec(BaseModel):
    """One pipeline: data → text tokenizer → image tokenizer → token cache → LM → evaluation → serving.

    Sections are validated by the classes of the components that own them; this class only
    composes them and checks what spans sections (e.g. image resolution).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                      description="Pipeline name: names the MLflow experiment default, runs and checkpoints.")
    workdir: str = Field(description="Directory holding every artifact of this pipeline (`${name}` allowed).")
    data: Any
    text_tokenizer: Any = None
    image_tokenizer: Any = None
    token_cache: Any = None
    lm: Any = None
    sampling: Any = None
    eval: Any = None
    serve: Any = None
    retrain: Any = None
    tracking: Any = None

    @model_validator(mode="before")
    @classmethod
    def _build_sections(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        s = _sections()
        raw = dict(raw)
        name = raw.get("name", "pipeline")
        workdir = raw.get("workdir") or "work/${name}"
        # Absolute, so Ray tasks and Train workers (whose CWD may differ) all see the same paths; a
        # URL (s3://bucket/run) is kept as a URL.
        from visgen import storage

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
        ingest = _validate_at(s["IngestConfig"], data["ingest"], "data.ingest")
        out["data"] = DataSpec(
            synth=_validate_at(s["SynthConfig"], data["synth"], "data.synth") if data.get("synth") is not None else None,
            ingest=ingest)
        out["text_tokenizer"] = _validate_at(s["TextTokenizerConfig"], raw.get("text_tokenizer") or {}, "text_tokenizer")
        tracking = dict(raw.get("tracking") or {})
        tracking.setdefault("experiment", f"visgen-{name}")
        out["tracking"] = _validate_at(s["TrackingConfig"], tracking, "tracking")
        out["image_tokenizer"] = _image_tokenizer_section(raw.get("image_tokenizer") or {}, ingest, s)
        out["token_cache"] = _validate_at(s["TokenCacheConfig"], raw.get("token_cache") or {}, "token_cache")
        out["lm"] = _lm_section(raw.get("lm") or {}, ingest, out["text_tokenizer"], out["image_tokenizer"].model, s)
        out["sampling"] = _validate_at(s["SamplingConfig"], raw.get("sampling") or {}, "sampling")
        ev = raw.get("eval") or {}
        _check_keys(ev, "eval", ("shapes", "geneval", "captions", "sampling_search", "heldout"))
        out["eval"] = EvalSpec(geneval=_validate_at(s["GenEvalConfig"], ev.get("geneval") or {}, "eval.geneval"),
                               captions=_validate_at(s["CaptionEvalConfig"], ev.get("captions") or {}, "eval.captions"),
                               sampling_search=_validate_at(s["SamplingSearchConfig"], ev.get("sampling_search") or {},
                                                            "eval.sampling_search"),
                               heldout=_validate_at(s["HeldoutEvalConfig"], ev.get("heldout") or {}, "eval.heldout"),
                               shapes=_shapes_benchmarks(ev.get("shapes", "auto"), data.get("synth") is not None))
        out["serve"] = _validate_at(s["ServeConfig"], raw.get("serve") or {}, "serve")
        out["retrain"] = _validate_at(s["RetrainConfig"], raw.get("retrain") or {}, "retrain")
        return out

    @cached_property
    def paths(self) -> Workdir:
        return Workdir(self.workdir)

    def dump(self) -> dict:
        """Plain-data form (what MLflow logs as params, flattened)."""
        return {
            "name": self.name,
            "workdir": self.workdir,
            "data": {k: (v.model_dump(mode="json") if v is not None else None) for k, v in vars(self.data).items()},
            "text_tokenizer": self.text_tokenizer.model_dump(mode="json"),
            "image_tokenizer": {k: v.model_dump(mode="json") for k, v in vars(self.image_tokenizer).items()},
            "token_cache": self.token_cache.model_dump(mode="json"),
            "lm": {k: v.model_dump(mode="json") for k, v in vars(self.lm).items()},
            "sampling": self.sampling.model_dump(mode="json"),
            "eval": {k: (v.model_dump(mode="json") if isinstance(v, BaseModel) else v) for k, v in vars(self.eval).items()},
            "serve": self.serve.model_dump(mode="json"),
            "retrain": self.retrain.model_dump(mode="json"),
            "tracking": self.tracking.model_dump(mode="json"),
        }


TOP_LEVEL_KEYS = ("name", "workdir", "data", "text_tokenizer", "image_tokenizer", "token_cache", "lm", "sampling",
                  "eval", "serve", "retrain", "tracking")


class DataSpec:
    """``data:`` — the shapes generator (optional) and the ingest stage."""

    def __init__(self, synth, ingest):
        self.synth, self.ingest = synth, ingest

    def __repr__(self) -> str:
        return f"DataSpec(synth={self.synth!r}, ingest={self.ingest!r})"


class ImageTokenizerSpec:
    """``image_tokenizer:`` — model (a VQ preset + overrides), training and scaling sections."""

    def __init__(self, model, train, scaling):
        self.model, self.train, self.scaling = model, train, scaling

    def __repr__(self) -> str:
        return f"ImageTokenizerSpec(model={self.model!r}, train={self.train!r}, scaling={self.scaling!r})"


class LMSpec:
    """``lm:`` — the transformer (a GPT preset + overrides), its training recipe, loop and scaling."""

    def __init__(self, model, recipe, train, scaling):
        self.model, self.recipe, self.train, self.scaling = model, recipe, train, scaling

    def __repr__(self) -> str:
        return f"LMSpec(model={self.model!r}, recipe={self.recipe!r}, train={self.train!r}, scaling={self.scaling!r})"


class EvalSpec:
    """``eval:`` — what the evaluation stages measure.

    ``heldout``: the metrics that hold on any data (held-out loss and perplexity, caption BLEU /
    chrF, retrieval by the model's own likelihood, Fréchet distance on the image tokenizer's
    encoder features, a sample grid); always run. ``shapes`` (bool, resolved from the spec's
    ``eval.shapes: auto | true | false``; auto = the spec has a ``data.synth`` section) switches
    on what only means something on the shapes data: GenEval-shapes (``geneval``), the caption
    slot benchmark (``captions``), the judge-read ceiling of the image tokenizer and the search of
    the sampling defaults on validation prompts (``sampling_search``), which all read the shapes judge."""

    def __init__(self, geneval, captions, sampling_search, heldout=None, shapes: bool = True):
        self.geneval, self.captions, self.sampling_search = geneval, captions, sampling_search
        self.heldout, self.shapes = heldout, shapes

    def __repr__(self) -> str:
        return (f"EvalSpec(shapes={self.shapes!r}, geneval={self.geneval!r}, captions={self.captions!r}, "
                f"sampling_search={self.sampling_search!r}, heldout={self.heldout!r})")


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


def _lm_section(raw: Any, ingest, text_tokenizer, vq, s: dict) -> LMSpec:
    _check_keys(raw, "lm", ("model", "recipe", "train", "scaling"))
    model = dict(raw.get("model") or {})
    preset = model.pop("preset", "small")
    if preset not in s["GPT_PRESETS"]:
        raise SpecError(f"invalid spec:\nlm.model.preset: {preset!r} is not allowed: choose one of {sorted(s['GPT_PRESETS'])}")
    side = vq.resolution // vq.downsample
    # The vocabulary and layout follow the tokenizers and the ingest stage; they cannot be set apart.
    derived = {"text_vocab": (text_tokenizer.vocab_size, "text_tokenizer.vocab_size"),
               "codebook_size": (vq.codebook_size, "image_tokenizer.model.codebook_size"),
               "grid": ((side, side), "the image tokenizer's latent grid"),
               "max_text_tokens": (ingest.max_text_tokens, "data.ingest.max_text_tokens")}
    for key, (value, source) in derived.items():
        if key in model and (tuple(model[key]) if key == "grid" else model[key]) != value:
            raise SpecError(f"invalid spec:\nlm.model.{key}: {model[key]!r} is not allowed: it follows {source} ({value!r})")
        model[key] = value
    return LMSpec(
        model=_validate_at(s["GPTConfig"], {**s["GPT_PRESETS"][preset], **model}, "lm.model"),
        recipe=_validate_at(s["LMRecipe"], raw.get("recipe") or {}, "lm.recipe"),
        train=_validate_at(s["TrainConfig"], raw.get("train") or {}, "lm.train"),
        scaling=_validate_at(s["ScalingConfig"], raw.get("scaling") or {}, "lm.scaling"),
    )


def _validate_at(cls: type[BaseModel], data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise SpecError(f"invalid spec:\n{path}: {data!r} is not allowed: expected a mapping of {cls.__name__} fields")
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise SpecError("invalid spec:\n" + format_validation_error(err, prefix=path)) from None


def _image_tokenizer_section(raw: dict, ingest, s: dict) -> ImageTokenizerSpec:
    _check_keys(raw, "image_tokenizer", ("model", "train", "scaling"))
    model = dict(raw.get("model") or {})
    preset = model.pop("preset", "small")
    presets = s["VQ_PRESETS"]
    if preset not in presets:
        raise SpecError(f"invalid spec:\nimage_tokenizer.model.preset: {preset!r} is not allowed: choose one of {sorted(presets)}")
    base = dict(presets[preset]) if isinstance(presets[preset], dict) else presets[preset].model_dump()
    if "resolution" in model and model["resolution"] != ingest.resolution:
        raise SpecError(f"invalid spec:\nimage_tokenizer.model.resolution: {model['resolution']!r} is not allowed: "
                        f"it must equal data.ingest.resolution ({ingest.resolution})")
    base.update(model)
    base["resolution"] = ingest.resolution
    return ImageTokenizerSpec(
        model=_validate_at(s["VQConfig"], base, "image_tokenizer.model"),
        train=_validate_at(s["TrainConfig"], raw.get("train") or {}, "image_tokenizer.train"),
        scaling=_validate_at(s["ScalingConfig"], raw.get("scaling") or {}, "image_tokenizer.scaling"),
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
