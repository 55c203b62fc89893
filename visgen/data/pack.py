"""Pack a folder of images (or a parquet of images) into WebDataset shards in img2dataset's layout.

Inputs (``PackConfig.layout``, ``'auto'`` picks the first that applies)::

    parquet      SRC is a .parquet file, or a directory holding .parquet files and no images:
                 an image column (bytes, or Hugging Face's struct {bytes, path}) and a text column
                 (a string, a list of strings, or an integer ClassLabel named through ``templates``)
    captions     SRC is a directory of images and ``captions`` names a JSONL / CSV / TSV file (or SRC
                 holds metadata.jsonl / metadata.csv, Hugging Face's imagefolder convention): one
                 row per caption, naming its image by a path relative to SRC or by its key (the
                 path without extension); several rows, or a list of captions, per image allowed
    imagefolder  SRC/<class>/**/<image>: the class folder name (or its entry in ``labels``) is put
                 into each template, one template per language

Every caption becomes one sample: an image with three captions is three samples (three keys).

Output directory::

    00000.tar            KEY.jpg|png|webp, KEY.txt (caption), KEY.json (key, caption, language, source, ...)
    00000.parquet        img2dataset-style per-sample table, quarantined samples included (status)
    00000_stats.json     img2dataset-style per-shard summary, plus quarantine counts by reason
    _pack_manifest.json  input signature, options and whether every shard is written
    _quarantine/         q-*.parquet: the rejected samples (key, shard, reason, detail), as ingest writes it

Samples are planned on the driver in sorted input order (paths sorted; parquet row order), then
shuffled by image with a seed (``shuffle``; an image's captions stay together), and
sample ``i`` goes to shard ``i // shard_size`` with key ``<shard><index in shard>``, so the same
inputs always give the same keys. One Ray task writes one shard. Each sample goes through
ingest's own validation (:func:`visgen.data.ingest.process_samples`: caption rules, then image
decode, size and pixel limits), so a sample that ingest would reject is quarantined here, with
ingest's reason, and never written. Shards are therefore at most ``shard_size`` samples long
(img2dataset's shards are short by their failed downloads the same way).

The manifest holds a signature of the plan: every caption, language and source, each image
file's size and mtime (the parquet files' for that layout) and the options that change bytes. A
second run with the same signature is a no-op; an interrupted one finishes the missing shards;
a different signature deletes the files this module writes (never anything else) and packs again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from pydantic import Field, ValidationError, field_validator, model_validator

from visgen.base import Section
from visgen.data.captions import detect_language
from visgen.data.ingest import (
    NOTICE_REASONS,
    QUARANTINE_REASONS,
    IngestConfig,
    clear_quarantine,
    normalize_caption,
    process_samples,
    write_quarantine,
)
from visgen.data.images import IMAGE_FORMATS, load_rgb, open_image
from visgen.data.webdataset_source import RawSample, write_tar_member
from visgen.runtime import init_ray

log = logging.getLogger(__name__)

PACK_VERSION = 1  # bump when the bytes written for the same plan change
MANIFEST_NAME = "_pack_manifest.json"
QUARANTINE_DIRNAME = "_quarantine"
_INGEST_DEFAULTS = IngestConfig.model_fields
# Files that may be listed as images: anything ingest cannot read is listed anyway and then
# quarantined as image_decode_error, so a folder of BMPs is reported, not silently empty.
LISTED_IMAGE_EXTS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
IMAGE_COLUMNS = ("image", "img", "image_bytes", "jpg", "png", "webp", "file_name", "filename", "file",
                 "path", "image_path", "key")
TEXT_COLUMNS = ("caption", "text", "captions", "texts", "prompt", "sentence", "sentences", "txt", "title", "label")
LANGUAGE_COLUMNS = ("language", "lang")


class PackError(ValueError):
    """The inputs of ``pack`` are unusable; the message names the path, column or value."""


class PackConfig(Section):
    """What to pack, how captions are made, and how the shards are written."""

    source: str = Field(min_length=1, description="SRC: a directory of images, an ImageFolder tree, or a "
                        ".parquet file (or a directory of them).")
    output: str = Field(min_length=1, description="Directory the shards are written to (created if missing).")
    layout: Literal["auto", "captions", "imagefolder", "parquet"] = Field(
        "auto", description="How SRC is read; 'auto': parquet if SRC is parquet, captions if a captions "
        "file is given or SRC holds metadata.jsonl/.csv, else imagefolder.")
    captions: str | None = Field(None, description="JSONL, CSV or TSV file of (image, caption[, language]) "
                                 "rows; image paths are relative to SRC.")
    labels: str | None = Field(None, description="JSON file mapping a class name (folder name or ClassLabel "
                               "name) to its label, or to {language: label}.")
    templates: dict[str, str] = Field(default_factory=lambda: {"en": "a photo of a {label}"},
                                      description="Caption template per language for class labels; "
                                      "'{label}' is replaced. One sample per image and template.")
    image_column: str | None = Field(None, description="Column naming the image: a path or key in a "
                                     "captions file, the image bytes in a parquet (default: autodetect).")
    text_column: str | None = Field(None, description="Column holding the caption(s), or a parquet "
                                    "ClassLabel (default: autodetect).")
    language_column: str | None = Field(None, description="Column holding each caption's language "
                                        "(default: 'language' or 'lang' when present, else detected).")
    shard_size: int = Field(1000, ge=1, le=1_000_000, description="Samples planned per shard.")
    shuffle: bool = Field(True, description="Shuffle the images (each with all its captions) before cutting shards, so "
                                            "every shard, the held-out last one included, is a random sample of a "
                                            "class-sorted input; off: sorted input order.")
    shuffle_seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of that shuffle (the same seed, the same shards).")
    image_format: Literal["keep", "jpg", "png", "webp"] = Field(
        "keep", description="'keep': the original bytes; else images in another format are re-encoded.")
    jpeg_quality: int = Field(95, ge=1, le=100, description="Quality of re-encoded JPEG / WebP images.")
    min_size: int = Field(_INGEST_DEFAULTS["min_size"].default, ge=1, le=4096,
                          description="Images whose shorter side is below this are quarantined (image_too_small).")
    max_image_pixels: int = Field(_INGEST_DEFAULTS["max_image_pixels"].default, ge=1,
                                  description="Images declaring more pixels are quarantined (image_too_large).")
    max_member_bytes: int = Field(_INGEST_DEFAULTS["max_member_bytes"].default, ge=1024, le=1 << 31,
                                  description="Image files larger than this are quarantined (member_too_large).")
    quarantine_dir: str | None = Field(None, description="Where the quarantine table goes "
                                       "(default: OUTPUT/_quarantine).")
    cpus_per_shard: float = Field(1.0, gt=0.0, le=64.0, description="Ray CPUs reserved by each shard task.")

    @field_validator("templates")
    @classmethod
    def _templates_name_the_label(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("at least one template is needed, e.g. {'en': 'a photo of a {label}'}")
        for lang, text in v.items():
            if "{label}" not in text:
                raise ValueError(f"template {text!r} for language {lang!r} has no '{{label}}' placeholder")
        return v

    @model_validator(mode="after")
    def _ingest_accepts_the_limits(self) -> PackConfig:
        try:  # the limits go to IngestConfig in every shard task: fail here, not there
            self.validation()
        except ValidationError as err:
            raise ValueError("; ".join(f"{e['loc'][0]}: {e['msg']}" for e in err.errors())) from None
        return self

    def validation(self) -> IngestConfig:
        """The ingest config whose rules judge each sample (resolution is irrelevant: kept small)."""
        return IngestConfig(source=self.output, resolution=16, min_size=self.min_size,
                            max_image_pixels=self.max_image_pixels, max_member_bytes=self.max_member_bytes)

    @property
    def quarantine(self) -> str:
        return self.quarantine_dir or str(Path(self.output) / QUARANTINE_DIRNAME)


# -- the plan -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Planned:
    """One sample to write: where its image is, its caption and its extra ``.json`` fields.

    ``path`` is an image file, or (``row`` >= 0) the parquet file whose row ``row`` holds it.
    """

    source: str               # shown to users: a path relative to SRC, or "file.parquet#row"
    path: str
    caption: str
    language: str
    row: int = -1
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    layout: str
    samples: list[Planned]
    files: list[str]          # every input file whose content decides the output (signature)
    note: str = ""


def _is_hidden(name: str) -> bool:
    return name.startswith((".", "_"))


def _list_images(root: Path, skip: set[Path]) -> list[Path]:
    """Image files under ``root``, recursively, sorted by relative path; hidden entries and ``skip`` left out."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        dirnames[:] = sorted(n for n in dirnames if not _is_hidden(n) and (d / n).resolve() not in skip)
        found += [d / n for n in filenames if not _is_hidden(n) and Path(n).suffix.lower() in LISTED_IMAGE_EXTS]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _language(caption: str, given: Any) -> str:
    if isinstance(given, str) and given.strip():
        return given.strip()
    return detect_language(caption)


def _pick_column(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, where: str,
                 required: bool = True) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise PackError(f"{where} has no column {wanted!r} (the {what} column); its columns are: "
                            f"{', '.join(map(repr, columns))}")
        return wanted
    lower = {c.lower(): c for c in columns}
    for c in candidates:
        if c in lower:
            return lower[c]
    if required:
        raise PackError(f"{where}: cannot tell which column holds the {what} (looked for "
                        f"{', '.join(candidates)}); its columns are: {', '.join(map(repr, columns))}; "
                        f"name it with --{what.split()[0]}-column")
    return None


def _captions_list(value: Any) -> list[str]:
    """A caption cell → its captions: a list gives one each; None gives '' (quarantined as caption_empty)."""
    if isinstance(value, (list, tuple)):
        return [("" if v is None else str(v)) for v in value]
    return ["" if value is None else str(value)]


def _read_rows(path: Path) -> tuple[list[str], list[tuple[str, dict[str, Any]]]]:
    """A captions file → (columns, [(where, row)]) with ``where`` like ``file.jsonl:12``."""
    if not path.is_file():
        raise PackError(f"captions file {str(path)!r} does not exist")
    rows: list[tuple[str, dict[str, Any]]] = []
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise PackError(f"captions file {str(path)!r} line {n} is not JSON: {err}") from None
            if not isinstance(row, dict):
                raise PackError(f"captions file {str(path)!r} line {n} holds a {type(row).__name__}, "
                                "expected an object like {\"file_name\": \"a.jpg\", \"caption\": \"...\"}")
            rows.append((f"{path.name}:{n}", row))
    elif path.suffix.lower() in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        rows = [(f"{path.name}:{n}", row) for n, row in enumerate(reader, 2)]
        if reader.fieldnames is None:
            raise PackError(f"captions file {str(path)!r} is empty: expected a header row")
    else:
        raise PackError(f"captions file {str(path)!r}: unknown format {path.suffix!r}; use .jsonl, .csv or .tsv")
    columns = list(dict.fromkeys(k for _, r in rows for k in r))
    if not rows:
        raise PackError(f"captions file {str(path)!r} holds no rows")
    return columns, rows


def _plan_captions(cfg: PackConfig, src: Path, captions: Path, skip: set[Path]) -> Plan:
    columns, rows = _read_rows(captions)
    where = f"captions file {str(captions)!r}"
    img_col = _pick_column(columns, cfg.image_column, IMAGE_COLUMNS, "image", where)
    txt_col = _pick_column(columns, cfg.text_column, TEXT_COLUMNS, "text", where)
    lang_col = _pick_column(columns, cfg.language_column, LANGUAGE_COLUMNS, "language", where, required=False)
    by_key: dict[str, Path] | None = None
    found: list[tuple[str, int, Planned]] = []
    missing: list[str] = []
    for order, (at, row) in enumerate(rows):
        name = row.get(img_col)
        if not isinstance(name, str) or not name.strip():
            missing.append(f"{at}: {img_col}={name!r}")
            continue
        path = src / name.strip()
        if not path.is_file():  # not a path: maybe a key (the path without its extension)
            if by_key is None:
                by_key = {p.relative_to(src).with_suffix("").as_posix(): p for p in _list_images(src, skip)}
            path = by_key.get(name.strip().replace("\\", "/"))
            if path is None:
                missing.append(f"{at}: {name!r}")
                continue
        rel = path.relative_to(src).as_posix() if path.is_relative_to(src) else str(path)
        for caption in _captions_list(row.get(txt_col)):
            found.append((rel, order, Planned(rel, str(path), caption, _language(caption, row.get(lang_col)))))
    if missing:
        shown = "; ".join(missing[:5]) + (f"; and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise PackError(f"{where} names {len(missing)} image(s) not found under SRC {str(src)!r} "
                        f"(column {img_col!r}, a path relative to SRC or a key): {shown}")
    found.sort(key=lambda t: (t[0], t[1]))  # sorted by image path; an image's captions in file order
    samples = [p for _, _, p in found]
    used = {p.path for p in samples}
    return Plan("captions", samples, [str(captions), *sorted(used)],
                note=f"{len(used)} images, columns image={img_col!r} text={txt_col!r} language={lang_col!r}")


def _read_labels(cfg: PackConfig) -> dict[str, dict[str, str] | str]:
    if cfg.labels is None:
        return {}
    path = Path(cfg.labels)
    if not path.is_file():
        raise PackError(f"labels file {cfg.labels!r} does not exist")
    try:
        labels = json.loads(path.read_text(encoding="utf-8-sig"))
    except ValueError as err:
        raise PackError(f"labels file {cfg.labels!r} is not JSON: {err}") from None
    bad = [k for k, v in labels.items() if not (isinstance(v, str) or (isinstance(v, dict) and all(
        isinstance(x, str) for x in v.values())))] if isinstance(labels, dict) else None
    if bad is None or bad:
        raise PackError(f"labels file {cfg.labels!r} must map class names to a label or to {{language: label}}, "
                        f"e.g. {{\"cat\": {{\"en\": \"cat\", \"zh\": \"猫\"}}}}; bad entries: {bad or labels!r}"[:400])
    return labels


def class_captions(name: str, labels: dict[str, Any], templates: dict[str, str]) -> list[tuple[str, str, str]]:
    """A class name → [(language, label, caption)], one per template.

    The label is ``labels[name][language]`` (or ``labels[name]`` when that is a string), else the
    name with underscores as spaces (``golden_retriever`` → ``golden retriever``).
    """
    entry = labels.get(name)
    out = []
    for lang, template in templates.items():
        label = entry if isinstance(entry, str) else (entry or {}).get(lang) or name.replace("_", " ")
        out.append((lang, label, template.replace("{label}", label)))
    return out


def _warn_untranslated(classes: list[str], labels: dict[str, Any], templates: dict[str, str]) -> None:
    for lang in templates:
        plain = [c for c in classes if not isinstance(labels.get(c), str) and lang not in (labels.get(c) or {})]
        if plain and lang != "en":
            log.warning("pack: %d class(es) have no %r label in the labels file and use their folder name in "
                        "the %r template: %s", len(plain), lang, lang, ", ".join(plain[:5]))


def _plan_imagefolder(cfg: PackConfig, src: Path, skip: set[Path]) -> Plan:
    classes = sorted(p.name for p in src.iterdir() if p.is_dir() and not _is_hidden(p.name) and p.resolve() not in skip)
    if not classes:
        loose = _list_images(src, skip)
        raise PackError(f"SRC {str(src)!r} has no class folders" + (
            f" but {len(loose)} image file(s) and no captions file: pass --captions FILE (JSONL/CSV naming each "
            "image and its caption), or put the images in one folder per class" if loose else
            " and no images: expected SRC/<class>/<image>.jpg, a captions file, or a .parquet file"))
    labels = _read_labels(cfg)
    _warn_untranslated(classes, labels, cfg.templates)
    samples, files = [], []
    for index, name in enumerate(classes):
        captions = class_captions(name, labels, cfg.templates)
        for path in _list_images(src / name, skip):
            rel = path.relative_to(src).as_posix()
            files.append(str(path))
            for lang, label, caption in captions:
                samples.append(Planned(rel, str(path), caption, lang,
                                       extra={"class": name, "label": label, "label_index": index}))
    loose = [p for p in src.iterdir() if p.is_file() and p.suffix.lower() in LISTED_IMAGE_EXTS]
    if loose:
        log.warning("pack: %d image(s) directly in SRC (outside any class folder) are not packed, e.g. %s",
                    len(loose), loose[0].name)
    return Plan("imagefolder", samples, ([cfg.labels] if cfg.labels else []) + files,
                note=f"{len(classes)} classes, {len(files)} images, templates {cfg.templates}")


# -- parquet --------------------------------------------------------------------------------------

def _class_names(schema, column: str) -> list[str] | None:
    """Hugging Face ``ClassLabel`` names of ``column`` from the parquet's ``huggingface`` metadata."""
    meta = (schema.metadata or {}).get(b"huggingface")
    try:
        feature = json.loads(meta)["info"]["features"][column]
    except (TypeError, ValueError, KeyError):
        return None
    return feature.get("names") if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" else None


def _is_image_type(t) -> bool:
    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return True
    return pa.types.is_struct(t) and any(t.field(i).name == "bytes" for i in range(t.num_fields))


def _is_text_type(t) -> bool:
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _parquet_columns(cfg: PackConfig, schema, where: str) -> tuple[str, str, str | None, list[str] | None]:
    cols = list(schema.names)
    types = {n: schema.field(n).type for n in cols}
    described = ", ".join(f"{n!r} ({types[n]})" for n in cols)
    img = cfg.image_column or next((c for c in cols if c.lower() in IMAGE_COLUMNS and _is_image_type(types[c])),
                                   next((c for c in cols if _is_image_type(types[c])), None))
    if img is None or img not in types:
        raise PackError(f"{where} has no {'column ' + repr(img) if img else 'image column'} "
                        f"(binary, or a struct with 'bytes'); its columns: {described}; name it with --image-column")
    if not _is_image_type(types[img]):
        raise PackError(f"{where}: column {img!r} is {types[img]}, not image bytes (binary, or struct "
                        f"{{bytes, path}}); its columns: {described}")
    txt = cfg.text_column
    if txt is None:
        txt = next((c for n in TEXT_COLUMNS for c in cols if c.lower() == n and _is_text_type(types[c])), None) \
            or next((c for c in cols if pa.types.is_integer(types[c]) and _class_names(schema, c)), None)
    if txt is None or txt not in types:
        raise PackError(f"{where} has no {'column ' + repr(txt) if txt else 'text column'} (a string, a list of "
                        f"strings, or a ClassLabel); its columns: {described}; name it with --text-column")
    names = None
    if not _is_text_type(types[txt]):
        names = _class_names(schema, txt) if pa.types.is_integer(types[txt]) else None
        if names is None:
            raise PackError(f"{where}: text column {txt!r} is {types[txt]}: expected strings, a list of strings, "
                            f"or an integer ClassLabel with names in the Hugging Face metadata")
    lang = _pick_column(cols, cfg.language_column, LANGUAGE_COLUMNS, "language", where, required=False)
    return img, txt, lang, names


def _parquet_files(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    return sorted(p for p in src.iterdir() if p.is_file() and p.suffix == ".parquet" and not _is_hidden(p.name))


def _plan_parquet(cfg: PackConfig, src: Path) -> Plan:
    files = _parquet_files(src)
    if not files:
        raise PackError(f"SRC {str(src)!r} holds no .parquet files")
    samples: list[Planned] = []
    chosen = None
    for f in files:
        where = f"parquet file {str(f)!r}"
        try:
            pf = pq.ParquetFile(f)
        except Exception as err:
            raise PackError(f"{where} cannot be read as parquet: {err}") from None
        img, txt, lang_col, names = _parquet_columns(cfg, pf.schema_arrow, where)
        if chosen is not None and chosen[:2] != (img, txt):
            raise PackError(f"{where} autodetects columns image={img!r} text={txt!r}, unlike image={chosen[0]!r} "
                            f"text={chosen[1]!r} in the files before it; name them with --image-column/--text-column")
        chosen = (img, txt, lang_col)
        table = pf.read(columns=[txt] + ([lang_col] if lang_col else []))
        texts = table.column(txt).to_pylist()
        langs = table.column(lang_col).to_pylist() if lang_col else [None] * len(texts)
        labels = _read_labels(cfg) if names is not None else {}
        for row, (value, given) in enumerate(zip(texts, langs)):
            source = f"{f.name}#{row}"
            if names is not None:  # ClassLabel: one sample per template
                if value is None or not 0 <= value < len(names):
                    raise PackError(f"{where} row {row}: label {value!r} is outside the {len(names)} ClassLabel names")
                for lang, label, caption in class_captions(names[value], labels, cfg.templates):
                    samples.append(Planned(source, str(f), caption, lang, row,
                                           {"class": names[value], "label": label, "label_index": value}))
            else:
                for caption in _captions_list(value):
                    samples.append(Planned(source, str(f), caption, _language(caption, given), row))
    assert chosen is not None
    extra = [cfg.labels] if cfg.labels and any(s.extra for s in samples) else []
    return Plan("parquet", samples, extra + [str(f) for f in files],
                note=f"{len(files)} parquet file(s), columns image={chosen[0]!r} text={chosen[1]!r} "
                     f"language={chosen[2]!r}")


def plan(cfg: PackConfig) -> Plan:
    """Every sample to pack, in sorted input order; raises :class:`PackError` on unusable inputs."""
    src = Path(cfg.source).expanduser().resolve()
    if not src.exists():
        raise PackError(f"SRC {cfg.source!r} does not exist (resolved to {str(src)!r})")
    skip = {Path(cfg.output).expanduser().resolve(), Path(cfg.quarantine).expanduser().resolve()}
    layout = cfg.layout
    if layout == "auto":
        if src.is_file() or (src.is_dir() and any(src.glob("*.parquet")) and not _list_images(src, skip)):
            layout = "parquet"
        elif cfg.captions is not None or any((src / n).is_file() for n in ("metadata.jsonl", "metadata.csv")):
            layout = "captions"
        else:
            layout = "imagefolder"
    if layout == "parquet":
        if src.is_file() and src.suffix != ".parquet":
            raise PackError(f"SRC {cfg.source!r} is a file but not a .parquet file; give a directory of images "
                            "or a parquet file")
        result = _plan_parquet(cfg, src)
    elif not src.is_dir():
        raise PackError(f"SRC {cfg.source!r} is not a directory (layout {layout!r} reads a directory of images)")
    elif layout == "captions":
        meta = next((src / n for n in ("metadata.jsonl", "metadata.csv") if (src / n).is_file()), None)
        captions = Path(cfg.captions).expanduser().resolve() if cfg.captions else meta
        if captions is None:
            raise PackError(f"layout 'captions' needs a captions file: pass --captions FILE, or put metadata.jsonl "
                            f"in SRC {cfg.source!r}")
        result = _plan_captions(cfg, src, captions, skip)
    else:
        result = _plan_imagefolder(cfg, src, skip)
    if not result.samples:
        raise PackError(f"SRC {cfg.source!r} (layout {result.layout!r}) gives no samples: {result.note}")
    if cfg.shuffle:
        result.samples = shuffled_by_image(result.samples, cfg.shuffle_seed)
    return result


def shuffled_by_image(samples: list[Planned], seed: int) -> list[Planned]:
    """``samples`` in a seeded random order of their images; an image's captions stay together, in
    their order (so they land in the same shard: a held-out image is never trained on in another
    language)."""
    groups: dict[tuple[str, int], list[Planned]] = {}
    for s in samples:
        groups.setdefault((s.path, s.row), []).append(s)
    order = list(groups.values())
    perm = np.random.default_rng(seed).permutation(len(order))
    return [s for i in perm for s in order[i]]


def signature(cfg: PackConfig, p: Plan) -> str:
    """Hash of everything that decides the shards' bytes: the plan, the inputs' size and mtime, the options."""
    h = hashlib.sha256()
    options = cfg.model_dump(mode="json", exclude={"source", "output", "quarantine_dir", "cpus_per_shard"})
    h.update(json.dumps({"version": PACK_VERSION, "layout": p.layout, "options": options}, sort_keys=True).encode())
    for s in p.samples:
        h.update(json.dumps([s.source, s.caption, s.language, s.row, s.extra], sort_keys=True,
                            ensure_ascii=False).encode("utf-8", "surrogatepass"))
    for f in p.files:
        st = os.stat(f)
        h.update(f"\n{f}\t{st.st_size}\t{st.st_mtime_ns}".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:24]


# -- one shard ------------------------------------------------------------------------------------

def shard_name(num_shards: int, index: int) -> str:
    """``00003``: at least five digits, more past 100 000 shards (img2dataset's naming)."""
    return f"{index:0{max(5, len(str(num_shards - 1)))}d}"


def sample_key(num_shards: int, shard_size: int, shard: int, index: int) -> str:
    """``000010005`` for shard 1, sample 5: the shard name, then the index in it (at least four digits)."""
    return shard_name(num_shards, shard) + f"{index:0{max(4, len(str(shard_size - 1)))}d}"


_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def _extension(data: bytes) -> str:
    """The extension of bytes that passed validation, from their header (``images.open_image``)."""
    return _EXTENSIONS[open_image(data, formats=IMAGE_FORMATS).format]


def _reencode(data: bytes, fmt: str, cfg: PackConfig, validation: IngestConfig) -> bytes:
    """Validated bytes → ``fmt``, upright and RGB as ingest would see them (alpha over its background)."""
    rgb = load_rgb(open_image(data, formats=IMAGE_FORMATS), validation.alpha_background)
    buf = io.BytesIO()
    if fmt == "jpg":
        rgb.save(buf, format="JPEG", quality=cfg.jpeg_quality, subsampling=0)
    elif fmt == "webp":
        rgb.save(buf, format="WEBP", quality=cfg.jpeg_quality)
    else:
        rgb.save(buf, format="PNG")
    return buf.getvalue()


class _ParquetImages:
    """Reads the image cells of one shard's rows, a row group at a time (never the whole file)."""

    def __init__(self, cfg: PackConfig):
        self.cfg = cfg
        self._files: dict[str, tuple[Any, str, list[int]]] = {}  # path -> (ParquetFile, column, group starts)
        self._group: tuple[str, int] | None = None
        self._cells: list[Any] = []

    def _open(self, path: str) -> tuple[Any, str, list[int]]:
        if path not in self._files:
            pf = pq.ParquetFile(path)
            column = self.cfg.image_column or _parquet_columns(self.cfg, pf.schema_arrow, path)[0]
            starts = [0]
            for g in range(pf.metadata.num_row_groups):
                starts.append(starts[-1] + pf.metadata.row_group(g).num_rows)
            self._files[path] = (pf, column, starts)
        return self._files[path]

    def get(self, path: str, row: int) -> bytes:
        pf, column, starts = self._open(path)
        g = next(i for i in range(len(starts) - 1) if row < starts[i + 1])
        if self._group != (path, g):  # shards take rows in order: one row group is read once
            self._group, self._cells = (path, g), pf.read_row_group(g, columns=[column]).column(column).to_pylist()
        cell = self._cells[row - starts[g]]
        if isinstance(cell, dict):  # Hugging Face Image(): {bytes, path}; bytes null when stored outside
            if cell.get("bytes") is not None:
                return cell["bytes"]
            if cell.get("path"):
                ref = Path(cell["path"]) if os.path.isabs(cell["path"]) else Path(path).parent / cell["path"]
                return ref.read_bytes()
            raise FileNotFoundError("the image cell holds neither bytes nor a path")
        if cell is None:
            raise FileNotFoundError("the image cell is null")
        return cell



@dataclass
class ShardResult:
    """What ``write_shard`` wrote."""

    index: int
    path: str
    planned: int
    kept: int
    quarantined: dict[str, int]
    seconds: float


def _load(s: Planned, cfg: PackConfig, images: _ParquetImages) -> bytes:
    if s.row >= 0:
        return images.get(s.path, s.row)
    size = os.path.getsize(s.path)
    if size > cfg.max_member_bytes:
        raise _TooLarge(f"{s.source}: {size} bytes > max_member_bytes={cfg.max_member_bytes}")
    return Path(s.path).read_bytes()


class _TooLarge(Exception):
    pass


def _judge(s: Planned, key: str, shard: str, cfg: PackConfig, validation: IngestConfig,
           images: _ParquetImages) -> tuple[bytes | None, str, list[dict[str, str]]]:
    """One planned sample → (image bytes to write or None, caption, quarantine rows), by ingest's rules."""
    try:
        data = _load(s, cfg, images)
    except _TooLarge as err:
        return None, "", [{"key": key, "shard": shard, "reason": "member_too_large", "detail": str(err)}]
    except OSError as err:
        return None, "", [{"key": key, "shard": shard, "reason": "image_missing",
                           "detail": f"{s.source}: cannot read the image: {type(err).__name__}: {err}"}]
    if len(data) > cfg.max_member_bytes:
        return None, "", [{"key": key, "shard": shard, "reason": "member_too_large",
                           "detail": f"{s.source}: {len(data)} bytes > max_member_bytes={cfg.max_member_bytes}"}]
    caption = normalize_caption(s.caption)
    raw = RawSample(key=key, shard=shard, image=data, image_name=f"{key}.img",
                    txt=caption.encode("utf-8", "surrogatepass"))
    good, bad = process_samples([raw], validation)
    bad = [{**r, "detail": f"{s.source}: {r['detail']}"} for r in bad]
    return (data if len(good) else None), caption, bad


def write_shard(cfg: PackConfig, index: int, num_shards: int, samples: list[Planned], sig: str) -> ShardResult:
    """Write shard ``index`` (tar, parquet, stats json) of ``samples`` into ``cfg.output``; a plain function."""
    out = Path(cfg.output)
    name = shard_name(num_shards, index)
    final = out / f"{name}.tar"
    validation = cfg.validation()
    images = _ParquetImages(cfg)
    rows: list[dict[str, Any]] = []
    bad_rows: list[dict[str, str]] = []
    start_wall, t0 = time.time(), time.perf_counter()
    tmp = out / f".{name}.tar.tmp"
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i, s in enumerate(samples):
            key = sample_key(num_shards, cfg.shard_size, index, i)
            data, caption, bad = _judge(s, key, str(final), cfg, validation, images)
            bad_rows += bad
            meta: dict[str, Any] = {"key": key, "caption": caption, "language": s.language, "source": s.source,
                                    **s.extra}
            rejected = [r for r in bad if r["reason"] not in NOTICE_REASONS]
            if data is None or rejected:
                r = rejected[0]
                rows.append({**meta, "status": "quarantined", "error_message": f"{r['reason']}: {r['detail']}"})
                continue
            ext = _extension(data)
            if cfg.image_format != "keep" and ext != cfg.image_format:
                data, ext = _reencode(data, cfg.image_format, cfg, validation), cfg.image_format
            width, height = open_image(data, formats=IMAGE_FORMATS).size  # header only
            meta.update(status="success", error_message=None, width=width, height=height,
                        sha256=hashlib.sha256(data).hexdigest())
            write_tar_member(tar, f"{key}.{ext}", data)
            write_tar_member(tar, f"{key}.txt", caption.encode("utf-8"))
            write_tar_member(tar, f"{key}.json", json.dumps(meta, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
            rows.append(meta)
    os.replace(tmp, final)
    write_quarantine(bad_rows, cfg.quarantine)
    columns = {"key": pa.string(), "caption": pa.string(), "language": pa.string(), "source": pa.string(),
               "status": pa.string(), "error_message": pa.string(), "width": pa.int32(), "height": pa.int32(),
               "sha256": pa.string()}
    table = pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows], schema=pa.schema(list(columns.items())))
    pq.write_table(table, out / f".{name}.parquet.tmp")
    os.replace(out / f".{name}.parquet.tmp", out / f"{name}.parquet")
    seconds = time.perf_counter() - t0
    reasons = Counter(r["reason"] for r in bad_rows if r["reason"] not in NOTICE_REASONS)
    kept = sum(r["status"] == "success" for r in rows)
    stats = {  # img2dataset's per-shard stats fields, plus the quarantine counts and the signature
        "count": len(samples), "successes": kept, "failed_to_download": 0, "failed_to_resize": len(samples) - kept,
        "duration": seconds, "start_time": start_wall, "end_time": start_wall + seconds,
        "status_dict": {"success": kept, **reasons}, "quarantined": dict(sorted(reasons.items())),
        "signature": sig,
    }
    (out / f".{name}_stats.json.tmp").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    os.replace(out / f".{name}_stats.json.tmp", out / f"{name}_stats.json")  # last: marks the shard done
    return ShardResult(index, str(final), len(samples), kept, dict(reasons), seconds)


# -- the whole data set ---------------------------------------------------------------------------

@dataclass
class PackReport:
    """What ``pack`` did (or found already done)."""

    output: str
    shards: list[str]
    planned: int
    kept: int
    quarantined: dict[str, int]
    seconds: float
    quarantine_dir: str
    written: int = 0          # shards written by this call
    skipped: bool = False     # the output already held these shards
    message: str = ""

    @property
    def rejected(self) -> int:
        return sum(self.quarantined.values())

    def format(self) -> str:
        lines = [self.message,
                 f"pack: {self.kept} samples kept, {self.rejected} quarantined, of {self.planned} planned, in "
                 f"{len(self.shards)} shard(s) under {self.output} ({self.seconds:.1f} s)"]
        for reason, n in sorted(self.quarantined.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {reason:<20} {n:>8}  {QUARANTINE_REASONS.get(reason, '')}")
        if self.rejected:
            lines.append(f"quarantine table: {self.quarantine_dir} (parquet; key, shard, reason, detail)")
        return "\n".join(line for line in lines if line)


_OWNED = re.compile(r"^(\d{5,}\.tar|\d{5,}\.parquet|\d{5,}_stats\.json|\.\d{5,}(\.tar|\.parquet|_stats\.json)\.tmp|"
                    + re.escape(MANIFEST_NAME) + r"|\." + re.escape(MANIFEST_NAME) + r"\.tmp)$")


def _write_manifest(out: Path, cfg: PackConfig, p: Plan, sig: str, shards: list[str], complete: bool,
                    totals: dict[str, Any] | None = None) -> None:
    manifest = {"signature": sig, "version": PACK_VERSION, "layout": p.layout, "source": str(Path(cfg.source).resolve()),
                "config": cfg.model_dump(mode="json"), "complete": complete, "shards": shards,
                "num_planned": len(p.samples), **(totals or {})}
    tmp = out / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out / MANIFEST_NAME)


def _read_manifest(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _prepare_output(out: Path, sig: str, quarantine: str) -> dict[str, Any] | None:
    """Check what ``out`` holds. Returns the manifest when it is this plan's; clears an older pack's files.

    Refuses an output holding ``.tar`` files this module did not write (another tool's shards,
    the user's data), so nothing but our own files is ever deleted.
    """
    if not out.exists():
        return None
    if not out.is_dir():
        raise PackError(f"output {str(out)!r} exists and is not a directory")
    manifest = _read_manifest(out)
    if manifest is None:  # not ours: refuse anything that looks like shards, delete nothing
        ours = sorted(p.name for p in out.iterdir() if _OWNED.match(p.name) or p.suffix == ".tar")
        if ours:
            raise PackError(f"output {str(out)!r} holds shard files without a readable {MANIFEST_NAME} "
                            f"({', '.join(ours[:5])}{', ...' if len(ours) > 5 else ''}), so not written by "
                            "`visgen data pack`; choose an empty or new directory")
        return None
    foreign = sorted(p.name for p in out.glob("*.tar") if not _OWNED.match(p.name))
    if foreign:
        raise PackError(f"output {str(out)!r} holds .tar files `visgen data pack` did not write "
                        f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); choose another directory")
    if manifest.get("signature") == sig:
        return manifest
    log.info("pack: %s holds shards of other inputs or options (signature %s, now %s): packing again",
             out, manifest.get("signature"), sig)
    for p in out.iterdir():
        if _OWNED.match(p.name) and p.is_file():
            p.unlink()
    clear_quarantine(quarantine)
    return None


def _done(out: Path, name: str, sig: str) -> dict[str, Any] | None:
    """The stats of a finished shard of this plan, else None."""
    try:
        stats = json.loads((out / f"{name}_stats.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return stats if stats.get("signature") == sig and (out / f"{name}.tar").is_file() else None


def pack(cfg: PackConfig) -> PackReport:
    """Pack ``cfg.source`` into shards under ``cfg.output``, one Ray task per shard; a no-op when done.

    Ray is joined (or started, :func:`visgen.runtime.init_ray`) only when there are shards to
    write, so bad inputs and no-op runs return at once. Raises :class:`PackError` for unusable
    inputs (missing SRC, captions naming missing images, unknown columns, nothing to pack, every
    sample quarantined).
    """
    t0 = time.perf_counter()
    p = plan(cfg)
    sig = signature(cfg, p)
    out = Path(cfg.output).expanduser().resolve()
    cfg = cfg.model_copy(update={"output": str(out), "quarantine_dir": str(Path(cfg.quarantine).expanduser().resolve())})
    num_shards = -(-len(p.samples) // cfg.shard_size)
    names = [shard_name(num_shards, i) for i in range(num_shards)]
    shards = [str(out / f"{n}.tar") for n in names]
    manifest = _prepare_output(out, sig, cfg.quarantine)
    if manifest is not None and manifest.get("complete") and all(_done(out, n, sig) for n in names):
        report = PackReport(str(out), shards, len(p.samples), manifest.get("kept", 0), manifest.get("quarantined", {}),
                            time.perf_counter() - t0, cfg.quarantine, skipped=True, message=(
                                f"{out} already holds these {num_shards} shard(s) (signature {sig}); nothing to do"))
        return _checked(report, cfg)
    out.mkdir(parents=True, exist_ok=True)
    _write_manifest(out, cfg, p, sig, [Path(s).name for s in shards], complete=False)
    todo = [i for i, n in enumerate(names) if _done(out, n, sig) is None]

    init_ray()
    cluster_cpus = ray.cluster_resources().get("CPU", 0.0)
    if cfg.cpus_per_shard > cluster_cpus:
        raise PackError(f"cpus_per_shard={cfg.cpus_per_shard} exceeds the {cluster_cpus:g} CPUs of the Ray cluster: "
                        "the shard tasks could never be scheduled; lower it")
    write = ray.remote(num_cpus=cfg.cpus_per_shard, max_retries=2)(write_shard)
    pending = [write.remote(cfg, i, num_shards, p.samples[i * cfg.shard_size:(i + 1) * cfg.shard_size], sig)
               for i in todo]
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        r: ShardResult = ray.get(ready[0])
        log.info("pack: shard %s: %d of %d samples kept in %.2f s", r.path, r.kept, r.planned, r.seconds)

    kept, quarantined = 0, Counter()
    for n in names:
        stats = _done(out, n, sig) or {}
        kept += stats.get("successes", 0)
        quarantined.update(stats.get("quarantined", {}))
    totals = {"kept": kept, "quarantined": dict(sorted(quarantined.items()))}
    _write_manifest(out, cfg, p, sig, [Path(s).name for s in shards], complete=True, totals=totals)
    report = PackReport(str(out), shards, len(p.samples), kept, dict(quarantined), time.perf_counter() - t0,
                        cfg.quarantine, written=len(todo),
                        message=f"packed {p.layout} input {cfg.source} ({p.note}): wrote {len(todo)} shard(s)"
                                + (f", {num_shards - len(todo)} already complete" if len(todo) < num_shards else ""))
    return _checked(report, cfg)


def _checked(report: PackReport, cfg: PackConfig) -> PackReport:
    if report.kept == 0:
        raise PackError(f"every one of the {report.planned} samples from SRC {cfg.source!r} was quarantined "
                        f"({report.quarantined}); see the table in {report.quarantine_dir}")
    log.debug("%s", report.format())  # callers print the report; logging it too showed it twice
    return report
