"""The base every component's config section builds on: the section class, the spec error and
the helpers that read and edit plain spec data. Imports only pydantic and yaml, so every module
of the package can import it (``visgen/config.py`` composes the sections into a pipeline spec).

A bad spec raises :class:`SpecError` naming the field path, the offending value and what is
allowed, e.g. ``data.ingest.resolution: 7 is not allowed: Input should be greater than or
equal to 8``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError


# Fields of a pipeline spec that follow another section and cannot be set apart (the image
# tokenizer's resolution is data.ingest.resolution; the transformer's vocabulary and grid follow
# the tokenizers). visgen/config.py derives them; the CLI offers no flag for them.
DERIVED_FIELDS: dict[str, tuple[str, ...]] = {"image_tokenizer.model": ("resolution",),
                                              "lm.model": ("text_vocab", "codebook_size", "grid", "max_text_tokens")}


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
        cause = (e.get("ctx") or {}).get("error")
        if isinstance(cause, SpecError):
            # A section's own check raised inside a validator already names its fields and values;
            # pydantic would otherwise report it against the whole enclosing mapping.
            lines.append(str(cause).split(":\n", 1)[-1])
        elif e["type"] == "extra_forbidden":
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
