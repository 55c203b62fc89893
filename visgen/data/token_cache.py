"""Token cache: ingest output → frozen VQ image tokenizer on a Ray Data actor pool → parquet.

The language model never sees pixels. This stage encodes every ingested image once, with the
frozen image tokenizer, and stores the token ids next to the caption's text ids::

    build_dataset(ingest, split,           CPU read/decode tasks (visgen.data.ingest); bad
      tag_split=True)                      samples go to the quarantine table, not the cache;
                                           every split's rows tagged with it, in one stream
      → map_batches(_ImageEncoder,         one VQ model per actor, loaded once for all splits;
          compute=ActorPoolStrategy,       the pool is sized from the cluster, on GPUs when
          num_gpus=..., batch_size=...)    it has any
      → write_parquet(<tmp>/,              <tmp>/<split>/: key, caption, text_ids, image_ids,
          partition_cols=[split])          fingerprint
    manifest.json written last, then <tmp> renamed over out_dir

Layout of ``out_dir``::

    manifest.json     inputs (tokenizer fingerprints, ingest config, shard signature), grid,
                      codebook size, rows per split, seconds, format version
    train/*.parquet   one row per kept sample (``rows_per_file`` rows per file, roughly)
    holdout/*.parquet only when ``ingest.holdout_shards > 0``

Columns: ``key`` string, ``caption`` string, ``text_ids`` list<int32> (the ingest's, truncated
to ``max_text_tokens``), ``image_ids`` list<int32> (the h*w codes of the image in raster order,
row by row), ``fingerprint`` string (the image tokenizer's, on every row, so a file that strays
from its directory still says which tokenizer made it).

Reuse and refusal:

* A build whose inputs equal the manifest's (same image tokenizer fingerprint, text tokenizer
  fingerprint, content-relevant ingest settings, shard paths/sizes/mtimes, precision) reuses
  the cache untouched. Anything else rebuilds it and logs which input changed.
* The cache is built in a hidden sibling directory and renamed into place only once every file
  and the manifest are written: a crash leaves the previous cache (or none), never half of one.
* :func:`read_token_cache` refuses (:class:`TokenCacheError`) a cache made by another image
  tokenizer than the one the caller expects, a missing or unreadable manifest, and a missing
  or empty split.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
from pydantic import Field, ValidationInfo, field_validator

from visgen import storage
from visgen.base import Section
from visgen.data.ingest import (
    NOTICE_REASONS,
    SPLIT_COLUMN,  # which split a row belongs to during a build: the write's partition column, not in the files
    IngestConfig,
    build_dataset,
    clear_quarantine,
    quarantine_summary,
)
from visgen.data.sources import expand_source, shard_signature, split_shards
from visgen.train.scaling import Capacity, InsufficientResourcesError, cluster_capacity

log = logging.getLogger(__name__)

FORMAT = "visgen.token_cache/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "holdout")
COLUMNS = ("key", "caption", "text_ids", "image_ids", "fingerprint")
# Ingest settings that decide *how* the ingest runs, not what it produces: changing them does not
# make a cache stale. (``source`` is covered by the shard list itself.)
_EXECUTION_ONLY = frozenset({"source", "batch_size", "num_cpus", "decode_in_read"})
# When the cluster can grow without bound (an autoscaler group without max_count), 'auto' pools
# stop here; it is also the largest value max_actors accepts.
_MAX_ACTORS = 1024


class TokenCacheError(ValueError):
    """A token cache is missing, incomplete, or was made by another image tokenizer than expected."""


class TokenCacheConfig(Section):
    """How the frozen image tokenizer is run over the ingest output, and how the cache is written."""

    batch_size: int = Field(256, ge=1, le=65_536, description="Images per encoder call (one actor batch); "
                            "larger batches amortise per-call overhead and fill a GPU, at the cost of actor memory.")
    min_actors: int = Field(1, ge=1, le=_MAX_ACTORS, description="Encoder actors started up front (the pool "
                            "never shrinks below this).")
    max_actors: Literal["auto"] | Annotated[int, Field(ge=1, le=_MAX_ACTORS)] = Field(
        "auto", description="Most encoder actors; 'auto' = what the cluster fits: one per gpus_per_actor GPUs on "
        "GPU clusters, else (cluster CPUs - data_cpus) / cpus_per_actor.")
    cpus_per_actor: float = Field(1.0, gt=0, le=256, description="CPUs reserved per encoder actor (also its torch "
                                  "thread count on CPU, rounded down, at least 1).")
    gpus_per_actor: Literal["auto"] | Annotated[float, Field(ge=0, le=8)] = Field(
        "auto", description="GPUs per encoder actor; 'auto' = 1 when the cluster has GPUs, else 0 (CPU). "
        "Fractions pack several actors on one GPU.")
    data_cpus: float = Field(1.0, gt=0, le=65_536, description="CPUs kept free for the ingest read/decode tasks "
                             "feeding the encoder: 'auto' pools leave them out, and a pool that would take them "
                             "is refused (the reads would starve and the build hang).")
    rows_per_file: int = Field(50_000, ge=1, le=100_000_000, description="Target rows per parquet file (a hint: "
                               "Ray combines blocks until at least this many rows, or the split ends).")
    precision: Literal["fp32", "tf32", "bf16"] = Field(
        "fp32", description="Encoder arithmetic on GPU: 'fp32' full precision (TF32 off), 'tf32' TF32 convs and "
        "matmuls, 'bf16' autocast; the last two are faster but may flip codes that are near ties. CPU always runs "
        "fp32. Part of the cache's identity: changing it rebuilds the cache.")

    @field_validator("max_actors")
    @classmethod
    def _max_not_below_min(cls, v: Any, info: ValidationInfo) -> Any:
        lo = info.data.get("min_actors")
        if v != "auto" and lo is not None and v < lo:
            raise ValueError(f"max_actors={v} is below min_actors={lo}; raise max_actors or use 'auto'")
        return v


# ---------------------------------------------------------------------------------------------
# Sizing the encoder pool
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderPool:
    """The resolved actor pool: ``min_actors..max_actors`` actors of ``cpus`` CPU and ``gpus`` GPU."""

    min_actors: int
    max_actors: int
    cpus: float
    gpus: float
    notes: tuple[str, ...] = ()

    @property
    def use_gpu(self) -> bool:
        return self.gpus > 0

    def describe(self) -> str:
        n = f"{self.min_actors}" if self.min_actors == self.max_actors else f"{self.min_actors}..{self.max_actors}"
        gpu = f", {self.gpus:g} GPU" if self.use_gpu else ""
        return f"{n} actor(s) x ({self.cpus:g} CPU{gpu})"


def resolve_pool(cfg: TokenCacheConfig, capacity: Capacity | None = None, read_cpus: float = 0.0) -> EncoderPool:
    """Resolve the ``'auto'`` fields against ``capacity`` (default: the connected cluster), check the fit.

    Ray Data waits without an error for actors the cluster cannot place, and a pool that takes
    every CPU leaves none to the read tasks feeding it, which hangs the build just as silently;
    both are refused here with the numbers and what to change. ``read_cpus`` is what one read
    task reserves (``ingest.num_cpus``): at least that much is kept free even if ``data_cpus`` is less.
    """
    cap = capacity if capacity is not None else cluster_capacity()
    notes: list[str] = []
    if cfg.gpus_per_actor == "auto":
        gpus = 1.0 if cap.total_gpus >= 1 else 0.0
        notes.append(f"gpus_per_actor=auto -> {gpus:g} (cluster GPUs: {cap.total_gpus:g})")
    else:
        gpus = float(cfg.gpus_per_actor)
    cpus = cfg.cpus_per_actor
    where = f"the cluster has {cap.describe()}"
    # An actor cannot span nodes: its CPUs and GPUs must all be on one.
    if gpus > max((n.gpus for n in cap.nodes), default=0.0):
        raise InsufficientResourcesError(
            f"token_cache.gpus_per_actor={gpus:g} does not fit on any node ({where}); set gpus_per_actor to "
            "'auto', 0 (CPU) or at most one node's GPUs")
    if cpus > cap.max_node_cpus:
        raise InsufficientResourcesError(
            f"token_cache.cpus_per_actor={cpus:g} does not fit on any node ({where}); lower cpus_per_actor")

    def how_many(total: float, per_actor: float) -> int:  # infinite when an autoscaler group has no max
        return math.floor(total / per_actor + 1e-6) if math.isfinite(total) else _MAX_ACTORS

    reserve = max(cfg.data_cpus, read_cpus)
    if reserve > cfg.data_cpus:
        notes.append(f"keeping {reserve:g} CPU free for the reads (one read task's num_cpus > data_cpus={cfg.data_cpus:g})")
    cpu_fit = how_many(cap.total_cpus - reserve, cpus)
    gpu_fit = how_many(cap.total_gpus, gpus) if gpus > 0 else _MAX_ACTORS
    fit = min(cpu_fit, gpu_fit, _MAX_ACTORS)
    if fit < cfg.min_actors:
        raise InsufficientResourcesError(
            f"token_cache.min_actors={cfg.min_actors} encoder actor(s) x ({cpus:g} CPU"
            f"{f', {gpus:g} GPU' if gpus else ''}) do not fit with data_cpus={reserve:g} CPUs left to the "
            f"ingest reads: {where}, room for {max(fit, 0)}. Lower min_actors, cpus_per_actor or data_cpus")
    if cfg.max_actors == "auto":
        hi = fit
        if gpus > 0 and gpu_fit <= cpu_fit:
            why = f"{cap.total_gpus:g} GPUs / {gpus:g} per actor"
        else:
            why = f"({cap.total_cpus:g} CPUs - {reserve:g} for the reads) / {cpus:g} per actor"
        notes.append(f"max_actors=auto -> {hi} ({why}{', capped' if hi == _MAX_ACTORS else ''})")
    else:
        hi = cfg.max_actors  # explicit: Ray Data scales up to it as actors can be placed
    return EncoderPool(cfg.min_actors, max(hi, cfg.min_actors), cpus, gpus, tuple(notes))


# ---------------------------------------------------------------------------------------------
# The encoder actor
# ---------------------------------------------------------------------------------------------


def _output_schema() -> pa.Schema:
    return pa.schema([("key", pa.string()), ("caption", pa.string()), ("text_ids", pa.list_(pa.int32())),
                      ("image_ids", pa.list_(pa.int32())), ("fingerprint", pa.string())])


def _image_ids_array(ids: np.ndarray) -> pa.Array:
    """(B, L) int32 → list<int32> array without a Python loop (offsets 0, L, 2L, ...)."""
    b, n = ids.shape
    offsets = pa.array(np.arange(0, (b + 1) * n, n, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(ids.reshape(-1), pa.int32()))


class _ImageEncoder:
    """One frozen VQ encoder per actor, loaded once, then fed batches of ingest rows.

    Input: an Arrow batch of the ingest's rows (key, shard, image, caption, text_ids, json).
    Output: the cache's columns; key, caption and text_ids pass through untouched (no copy).
    """

    def __init__(self, image_tokenizer_dir: str, fingerprint: str, use_gpu: bool, precision: str, threads: int):
        import torch  # torch: only the encoder actors load the image tokenizer

        from visgen.models.vq import load_vq

        if use_gpu:
            if not torch.cuda.is_available():
                raise RuntimeError("the encoder actor was given a GPU but torch sees no CUDA device "
                                   f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, torch "
                                   f"{torch.__version__}); install a CUDA build of torch or set gpus_per_actor: 0")
            self.device = torch.device("cuda")  # Ray narrows CUDA_VISIBLE_DEVICES to this actor's GPU
            torch.backends.cudnn.allow_tf32 = precision != "fp32"
            torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
        else:
            self.device = torch.device("cpu")
            torch.set_num_threads(threads)
        self.autocast = use_gpu and precision == "bf16"
        # load_vq checks the weights against the fingerprint in image_tokenizer.json; that file must
        # still be the one the driver read, or the rows would carry the wrong fingerprint.
        local = storage.local_copy(image_tokenizer_dir)  # a URL (object store workdir): this node's copy
        found = _image_tokenizer_meta(local)["fingerprint"]
        if found != fingerprint:
            raise RuntimeError(f"{image_tokenizer_dir} changed while the token cache was being built "
                               f"(fingerprint {fingerprint[:12]} -> {found[:12]}); run the build again")
        self.model = load_vq(local, self.device)
        self.fingerprint = fingerprint

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch  # torch: only the encoder actors need it

        from visgen.models.vq import to_model_input

        schema = _output_schema()
        split = SPLIT_COLUMN in batch.column_names  # a build's rows say which split they belong to
        if split:
            schema = schema.append(pa.field(SPLIT_COLUMN, pa.string()))
        if batch.num_rows == 0:  # a block whose samples were all quarantined
            return schema.empty_table()
        images = batch.column("image").combine_chunks().to_numpy()  # (B, R, R, 3) uint8
        if not (images.flags.writeable and images.flags.c_contiguous):  # a view of Arrow's read-only buffer
            images = np.array(images, copy=True, order="C")
        # uint8 crosses to the device, not float32: a quarter of the transfer.
        x = torch.from_numpy(images).to(self.device, non_blocking=True)
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=self.autocast):
            ids = self.model.encode(to_model_input(x))  # (B, h, w)
        ids = ids.flatten(1).to(torch.int32).cpu().numpy()  # (B, h*w), raster order
        n = batch.num_rows
        return pa.Table.from_arrays(
            [batch.column("key"), batch.column("caption"), batch.column("text_ids").cast(pa.list_(pa.int32())),
             _image_ids_array(ids), pa.array([self.fingerprint] * n, pa.string()),
             *([batch.column(SPLIT_COLUMN)] if split else [])],
            schema=schema)


# ---------------------------------------------------------------------------------------------
# Inputs and their signature
# ---------------------------------------------------------------------------------------------


def _image_tokenizer_meta(directory: str | Path) -> dict:
    """``image_tokenizer.json`` of a saved VQ (config + fingerprint), read without loading weights."""
    from visgen.models.vq import CONFIG_FILE  # visgen.models.vq imports torch; this reads only its JSON

    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {directory} is not a saved image tokenizer; train one with "
                                "`visgen train tokenizer --pipeline ...`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(meta.get("fingerprint"), str) or not isinstance(meta.get("config"), dict):
            raise ValueError("no 'fingerprint' string and 'config' mapping")
    except ValueError as err:
        raise ValueError(f"{path} is not a readable image tokenizer description: {err}") from None
    return meta


def _ingest_content(ingest: IngestConfig) -> dict:
    return {k: v for k, v in ingest.model_dump(mode="json").items() if k not in _EXECUTION_ONLY}


def _expected_inputs(ingest: IngestConfig, text_fingerprint: str, image_fingerprint: str, precision: str,
                     shards: list[str]) -> dict:
    """Everything the cache's content depends on; a cache is up to date when its manifest holds exactly this."""
    return {"format": FORMAT, "image_fingerprint": image_fingerprint, "text_fingerprint": text_fingerprint,
            "precision": precision, "ingest": _ingest_content(ingest), "shards": shard_signature(shards)}


def _describe_changes(old: dict, new: dict) -> list[str]:
    """Human-readable differences between a manifest's inputs and the current ones."""
    changes = []
    if old.get("format") != new["format"]:
        changes.append(f"cache format {old.get('format')!r} -> {new['format']!r}")
    for k, what in (("image_fingerprint", "image tokenizer fingerprint"), ("text_fingerprint", "text tokenizer fingerprint")):
        if old.get(k) != new[k]:
            changes.append(f"{what} {_short(old.get(k))} -> {_short(new[k])}")
    if old.get("precision") != new["precision"]:
        changes.append(f"precision {old.get('precision')!r} -> {new['precision']!r}")
    old_ing, new_ing = old.get("ingest") or {}, new["ingest"]
    for k in sorted(set(old_ing) | set(new_ing)):
        if old_ing.get(k) != new_ing.get(k):
            changes.append(f"ingest.{k} {old_ing.get(k)!r} -> {new_ing.get(k)!r}")
    old_sh = {s[0]: s[1:] for s in old.get("shards") or []}
    new_sh = {s[0]: s[1:] for s in new["shards"]}
    added = [p for p in new_sh if p not in old_sh]
    removed = [p for p in old_sh if p not in new_sh]
    modified = [p for p in new_sh if p in old_sh and old_sh[p] != new_sh[p]]
    for label, paths in (("added", added), ("removed", removed), ("modified (size/mtime)", modified)):
        if paths:
            names = ", ".join(os.path.basename(p) for p in paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
            changes.append(f"shards {label}: {names}")
    if not (added or removed or modified) and [s[0] for s in old.get("shards") or []] != list(new_sh):
        changes.append("shard order changed (the held-out split is the last shards)")
    return changes


def _short(fp: Any) -> str:
    return fp[:12] if isinstance(fp, str) else repr(fp)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _rebuild_hint(out_dir: Path | str) -> str:
    return f"rebuild the cache: `visgen data token-cache --pipeline ...` (or delete {out_dir} and run the pipeline)"


def _load_manifest(out: Path | str) -> tuple[dict | None, str]:
    """(manifest, "") or (None, what is wrong with it); ``out`` is a local path or a URL."""
    path = storage.join(str(out), MANIFEST)
    if not storage.is_file(path):
        return None, ("does not exist" if not storage.exists(out)
                      else "has no manifest.json (not a token cache, or an interrupted build)")
    try:
        manifest = json.loads(storage.read_text(path))
    except (OSError, ValueError) as err:
        return None, f"has an unreadable manifest.json ({err})"
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        return None, f"has a manifest of format {found!r}, not {FORMAT!r}"
    return manifest, ""


def cache_manifest(out_dir: str | Path) -> dict:
    """The cache's ``manifest.json``; :class:`TokenCacheError` when missing, unreadable or of another format."""
    out = storage.location(out_dir)
    manifest, problem = _load_manifest(out)
    if manifest is None:
        raise TokenCacheError(f"token cache {out} {problem}; {_rebuild_hint(out)}")
    return manifest


def split_location(out_dir: str | Path, manifest: dict, split: str) -> str:
    """Where a split's parquet files are: ``<out>/<split>`` (a local cache, swapped in by a rename),
    or ``<out>/<build>/<split>`` (an object store cache, whose manifest names the build it commits)."""
    return storage.join(str(out_dir), *([manifest["build"]] if manifest.get("build") else []), split)


def _check_split(out_dir: str | Path, split: str, expect_fingerprint: str | None) -> tuple[dict, str]:
    out = storage.location(out_dir)
    manifest = cache_manifest(out)
    found = manifest.get("image_fingerprint")
    if expect_fingerprint is not None and found != expect_fingerprint:
        raise TokenCacheError(
            f"token cache {out} was made by image tokenizer {_short(found)}, but the model expects "
            f"{_short(expect_fingerprint)}: its image ids mean other codes. {_rebuild_hint(out).capitalize()} "
            "with the current image tokenizer")
    rows = (manifest.get("splits") or {}).get(split)
    path = split_location(out, manifest, split)
    if split not in SPLITS or not rows or not storage.is_dir(path):
        have = {s: n for s, n in (manifest.get("splits") or {}).items() if n}
        why = "is empty" if rows == 0 else "is not in it"
        hint = " (set data.ingest.holdout_shards >= 1 to have one)" if split == "holdout" and rows is None else ""
        raise TokenCacheError(f"token cache {out}: split {split!r} {why}{hint}; splits with rows: {have or 'none'}")
    return manifest, path


def read_token_cache(out_dir: str | Path, split: str = "train",
                     expect_fingerprint: str | None = None) -> ray.data.Dataset:
    """The cached rows of ``split`` as a Ray Dataset (``key, caption, text_ids, image_ids, fingerprint``).

    Pass the image tokenizer's fingerprint as ``expect_fingerprint`` wherever the ids will be
    interpreted (LM training, evals): a cache from another tokenizer is refused with
    :class:`TokenCacheError` instead of silently training on the wrong codes.
    """
    _, path = _check_split(out_dir, split, expect_fingerprint)
    return ray.data.read_parquet(path, columns=list(COLUMNS))


def _head(out_dir: str | Path, split: str, n: int, columns, expect_fingerprint: str | None):
    """The first ``n`` rows of ``split`` (``columns`` only) as a pyarrow Table, without Ray."""
    import pyarrow.dataset as pads  # pyarrow.dataset (0.4 s): only reading rows back needs it

    _, path = _check_split(out_dir, split, expect_fingerprint)
    fs, root = storage.filesystem(path)
    files = [f"{root}/{f}" for f in storage.listdir(path) if f.endswith(".parquet")]
    return pads.dataset(files, format="parquet", filesystem=fs).head(n, columns=list(columns))


def read_token_rows(out_dir: str | Path, split: str = "train", n: int = 16,
                    expect_fingerprint: str | None = None) -> list[dict]:
    """The first ``n`` rows of ``split`` as dicts, without Ray (pyarrow only): ``key`` / ``caption`` /
    ``fingerprint`` str, ``text_ids`` and ``image_ids`` int32 numpy arrays (``image_ids`` flat, h*w
    in raster order; the grid is ``cache_manifest(out_dir)["grid"]``)."""
    if n < 0:
        raise ValueError(f"n={n} must be >= 0")
    table = _head(out_dir, split, n, COLUMNS, expect_fingerprint)
    cols = {c: table.column(c) for c in COLUMNS}
    rows = []
    for i in range(table.num_rows):
        rows.append({"key": cols["key"][i].as_py(), "caption": cols["caption"][i].as_py(),
                     "text_ids": cols["text_ids"][i].values.to_numpy(zero_copy_only=False).astype(np.int32),
                     "image_ids": cols["image_ids"][i].values.to_numpy(zero_copy_only=False).astype(np.int32),
                     "fingerprint": cols["fingerprint"][i].as_py()})
    return rows


def dominant_code(out_dir: str | Path, split: str = "train", expect_fingerprint: str | None = None,
                  rows: int = 20_000) -> tuple[int, float]:
    """The most common image code of ``split`` and its share of the cells, over its first ``rows``
    rows (pyarrow only): on sparse scenes, the background. A split without cells is refused."""
    import pyarrow.compute as pc  # pyarrow.compute: only reading rows back needs it

    if rows < 1:
        raise ValueError(f"rows={rows} must be >= 1")
    table = _head(out_dir, split, rows, ("image_ids",), expect_fingerprint)
    ids = pc.list_flatten(table.column("image_ids")).to_numpy(zero_copy_only=False)
    if ids.size == 0:
        raise TokenCacheError(f"token cache {storage.location(out_dir)}: split {split!r} holds no image codes")
    counts = np.bincount(ids.astype(np.int64))
    code = int(counts.argmax())
    return code, float(counts[code] / ids.size)


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


@dataclass
class TokenCacheReport:
    """What :func:`build_token_cache` did (or found already done)."""

    out_dir: str
    rows: dict[str, int]                 # rows per split
    seconds: float                       # this call's wall time (reuse: the check only)
    reused: bool
    image_fingerprint: str
    text_fingerprint: str
    grid: tuple[int, int]
    codebook_size: int
    build_seconds: float                 # the build that made the cache (from its manifest when reused)
    changes: list[str] = field(default_factory=list)  # why it was (re)built
    quarantined: dict[str, int] = field(default_factory=dict)  # rejected samples by reason (builds only)
    pool: str = ""                       # the encoder pool used (builds only)

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())

    @property
    def images_per_s(self) -> float:
        """Images tokenized per second of the build (ingest decode included), end to end."""
        return self.total_rows / self.build_seconds if self.build_seconds > 0 else 0.0

    def format(self) -> str:
        h, w = self.grid
        splits = " + ".join(f"{n} {s}" for s, n in self.rows.items())
        head = (f"token cache: {splits} rows, {h}x{w} = {h * w} image tokens per row (codebook {self.codebook_size}), "
                f"image tokenizer {self.image_fingerprint[:12]}, text tokenizer {self.text_fingerprint[:12]}")
        if self.reused:
            lines = [head, f"  up to date: reused as is (built in {self.build_seconds:.1f} s, "
                           f"{self.images_per_s:.0f} images/s); checked in {self.seconds:.2f} s"]
        else:
            lines = [head, f"  built in {self.build_seconds:.1f} s ({self.images_per_s:.0f} images/s) "
                           f"with {self.pool}"]
            lines += [f"  rebuilt because: {c}" for c in self.changes]
            lines += [f"  quarantined {reason:<20} {n:>8}" for reason, n in self.quarantined.items()]
        lines.append(f"  -> {self.out_dir} (parquet per split: {', '.join(COLUMNS)})")
        return "\n".join(lines)


def _report_from_manifest(out_dir: Path | str, manifest: dict, seconds: float, reused: bool, **kw) -> TokenCacheReport:
    return TokenCacheReport(
        out_dir=str(out_dir), rows=dict(manifest["splits"]), seconds=seconds, reused=reused,
        image_fingerprint=manifest["image_fingerprint"], text_fingerprint=manifest["text_fingerprint"],
        grid=tuple(manifest["grid"]), codebook_size=manifest["codebook_size"], build_seconds=manifest["seconds"], **kw)


def _up_to_date(out: Path | str, expected: dict, splits: list[str]) -> tuple[dict | None, list[str]]:
    """(manifest, []) when the cache at ``out`` holds exactly ``expected``; else (None, reasons)."""
    manifest, problem = _load_manifest(out)
    if manifest is None:
        return None, [f"no cache at {out} yet" if not storage.exists(out) else f"{out} {problem}"]
    changes = _describe_changes(manifest.get("inputs") or {}, expected)
    rows = manifest.get("splits") or {}
    if sorted(rows) != sorted(splits):
        changes.append(f"splits {sorted(rows)} -> {sorted(splits)}")
    for s in splits:
        if not storage.is_dir(split_location(out, manifest, s)):
            changes.append(f"split directory {split_location(out, manifest, s)} is missing")
    if not changes and (manifest.get("inputs") or {}) != expected:  # a field this module does not describe
        changes.append("manifest inputs differ")
    return (manifest, []) if not changes else (None, changes)


def _check_replaceable(out: Path | str) -> None:
    # Replacing a directory deletes it: only ever one that holds nothing but a token cache's entries.
    if storage.is_url(out):
        foreign = [n for n in storage.listdir(out) if n not in (MANIFEST, *SPLITS) and not n.startswith("build-")]
        if foreign:
            raise TokenCacheError(f"{out} holds {foreign[:5]}, which a token cache does not: refusing to replace it; "
                                  "remove them or pick another out_dir")
        return
    if out.exists():
        if not out.is_dir():
            raise TokenCacheError(f"token cache path {out} exists and is not a directory; remove it or pick another out_dir")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in (MANIFEST, *SPLITS))
        if foreign:
            raise TokenCacheError(f"{out} exists and holds {foreign[:5]}, which a token cache does not: refusing to "
                                  "replace it; remove it or pick another out_dir")


def _staging_dirs(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.building-*")) + sorted(out.parent.glob(f".{out.name}.old-*"))


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``. An existing ``out`` is renamed aside first and deleted after, so
    at every instant ``out`` is either the complete old cache, absent, or the complete new one."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _count_rows(split_dir: Path | str) -> tuple[int, int]:
    """(rows, files) of the parquet files in ``split_dir`` (a local path or a URL), from their footers."""
    fs, root = storage.filesystem(split_dir)
    files = [f"{root}/{f}" for f in storage.listdir(split_dir) if f.endswith(".parquet")]
    return sum(pq.read_metadata(f, filesystem=fs).num_rows for f in files), len(files)


def _rows(batch: pa.Table) -> pa.Table:
    return batch


def _encode_splits(datasets: dict[str, ray.data.Dataset], dest: Path | str, image_dir: str, fingerprint: str,
                   pool: EncoderPool, cfg: TokenCacheConfig) -> dict[str, tuple[int, int]]:
    """Run one encoder pool over the ingest datasets of every split (built with ``tag_split``: each
    row names its split) and write split ``s`` under ``<dest>/<s>``; {split: (rows, files)}. The
    splits go through the pool as one stream, so its actors start (and load the model) once."""
    parts = list(datasets.values())
    rows = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    tokens = rows.map_batches(
        _ImageEncoder,
        fn_constructor_kwargs={"image_tokenizer_dir": image_dir, "fingerprint": fingerprint, "use_gpu": pool.use_gpu,
                               "precision": cfg.precision, "threads": max(1, int(pool.cpus))},
        compute=ray.data.ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
        batch_size=cfg.batch_size, batch_format="pyarrow", zero_copy_batch=True,
        num_cpus=pool.cpus, num_gpus=pool.gpus)
    # rows_per_file rows per write (each write makes one file per split it holds); the batching
    # happens here because the write's own min_rows_per_file is deprecated with partition columns.
    tokens = tokens.map_batches(_rows, batch_size=cfg.rows_per_file, batch_format="pyarrow", zero_copy_batch=True)
    split_dirs = {split: storage.join(dest, split) if storage.is_url(dest) else Path(dest) / split
                  for split in datasets}
    if not storage.is_url(dest):
        for d in split_dirs.values():  # a split whose rows were all rejected still has its (empty) directory
            d.mkdir()
    # partitioning_flavor=None: pyarrow's directory partitioning, <dest>/<split>/ (not <dest>/split=<split>/);
    # the split column itself is not written into the files.
    tokens.write_parquet(str(dest), partition_cols=[SPLIT_COLUMN], partitioning_flavor=None)
    return {split: _count_rows(d) for split, d in split_dirs.items()}


def build_token_cache(ingest: IngestConfig, text_tokenizer_path: str | Path, image_tokenizer_dir: str | Path,
                      out_dir: str | Path, cfg: TokenCacheConfig, quarantine_dir: str | Path,
                      force: bool = False) -> TokenCacheReport:
    """Tokenize every ingested image with the frozen image tokenizer and write the parquet cache.

    Reads both splits (``train``; ``holdout`` when ``ingest.holdout_shards > 0``) through
    :func:`visgen.data.ingest.build_dataset`, so the same validation applies and bad samples are
    quarantined under ``quarantine_dir`` (cleared first: the table then describes this pass).
    An up-to-date cache is reused unless ``force``. ``out_dir`` is a path every node sees (a local
    or mounted directory) or an object store URL; the tokenizers are paths or URLs too. Ray must
    be initialised.

    A local cache is built in a staging directory and swapped in by a rename. An object store has
    no rename: there the splits are written under ``<out>/build-<id>/`` and the manifest, written
    last, names that build; older builds are deleted after it (a reader holding the previous
    manifest during that instant gets a clear missing-file error, never a mix of two builds).
    """
    from visgen.models.vq import VQConfig  # torch, tokenizers: only a build needs them
    from visgen.text.tokenizer import TextTokenizer

    t0 = time.perf_counter()
    image_dir = storage.location(image_tokenizer_dir)
    text_path = storage.location(text_tokenizer_path)
    remote = storage.is_url(out_dir)
    out = storage.location(out_dir) if remote else Path(out_dir).expanduser().resolve()

    # Identify every input before any work: a cache that is up to date costs a few stats.
    meta = _image_tokenizer_meta(storage.local_copy(image_dir))
    vq = VQConfig.model_validate(meta["config"])
    if vq.resolution != ingest.resolution:
        raise TokenCacheError(f"image tokenizer {image_dir} was trained at resolution {vq.resolution} but "
                              f"data.ingest.resolution is {ingest.resolution}: the token grid would not be the "
                              "model's; use the same resolution for both (or retrain the tokenizer)")
    grid = (vq.resolution // vq.downsample,) * 2
    text_fp = TextTokenizer.load(storage.local_copy(text_path)).fingerprint()
    shards = expand_source(ingest.source)
    splits = ["train", "holdout"] if ingest.holdout_shards > 0 else ["train"]
    split_shard_lists = {s: split_shards(shards, ingest.holdout_shards, s) for s in splits}
    expected = _expected_inputs(ingest, text_fp, meta["fingerprint"], cfg.precision, shards)

    manifest, changes = _up_to_date(out, expected, splits)
    if manifest is not None and not force:
        log.info("token cache %s is up to date (image tokenizer %s); reusing it", out, _short(meta["fingerprint"]))
        return _report_from_manifest(out, manifest, time.perf_counter() - t0, reused=True)
    changes = ["forced (force=True)"] if force and manifest is not None else changes
    for c in changes:
        log.info("token cache %s: rebuilding: %s", out, c)
    _check_replaceable(out)

    pool = resolve_pool(cfg, read_cpus=ingest.num_cpus)
    for note in pool.notes:
        log.info("token cache: %s", note)
    build = f"build-{uuid.uuid4().hex[:8]}"
    if remote:
        tmp = storage.join(out, build)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        for stale in _staging_dirs(out):  # left by a build that crashed; never a complete cache
            log.warning("removing %s, left by an interrupted token cache build", stale)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = out.parent / f".{out.name}.building-{build[6:]}"
        tmp.mkdir()
    quarantine = str(quarantine_dir) if "://" in str(quarantine_dir) else str(Path(quarantine_dir).expanduser().resolve())
    clear_quarantine(quarantine)
    committed = False
    try:
        t_build = time.perf_counter()
        datasets = {split: build_dataset(ingest, text_path, quarantine, split, tag_split=True) for split in splits}
        written = _encode_splits(datasets, tmp, image_dir, meta["fingerprint"], pool, cfg)
        rows, files = {s: written[s][0] for s in splits}, {s: written[s][1] for s in splits}
        for split in splits:
            log.info("token cache: %s: %d rows in %d file(s) from %d shard(s)", split, rows[split], files[split],
                     len(split_shard_lists[split]))
        seconds = time.perf_counter() - t_build
        counts = quarantine_summary(quarantine)
        quarantined = {r: n for r, n in counts.items() if r not in NOTICE_REASONS}
        empty = [s for s in splits if rows[s] == 0]
        if empty:
            raise TokenCacheError(
                f"token cache: split(s) {empty} have no rows: every sample of their shards was rejected "
                f"({quarantined or 'no quarantine rows'}); see the quarantine table in {quarantine}")
        manifest = {
            "format": FORMAT,
            "inputs": expected,
            "image_fingerprint": meta["fingerprint"],
            "text_fingerprint": text_fp,
            "image_tokenizer_dir": image_dir,
            "text_tokenizer_path": text_path,
            "grid": list(grid),
            "codebook_size": vq.codebook_size,
            "resolution": vq.resolution,
            "ingest": ingest.model_dump(mode="json"),
            "shards": expected["shards"],
            "splits": rows,
            "files": files,
            "columns": list(COLUMNS),
            "seconds": round(seconds, 3),
            "images_per_s": round(sum(rows.values()) / seconds, 1) if seconds > 0 else 0.0,
            "encoder": {"pool": pool.describe(), "batch_size": cfg.batch_size, "precision": cfg.precision},
            "created_unix": round(time.time(), 3),
            **({"build": build} if remote else {}),
        }
        # The manifest is the last file written: without it no reader takes the directory for a cache.
        text = json.dumps(manifest, indent=1, sort_keys=True)
        if remote:
            storage.write_text(storage.join(out, MANIFEST), text)
            committed = True
            for name in storage.listdir(out):  # the previous build (and any a crash left behind)
                if name not in (MANIFEST, build):
                    storage.delete(storage.join(out, name))
        else:
            (tmp / MANIFEST).write_text(text, encoding="utf-8")
            _swap_in(tmp, out)
    finally:
        if remote and not committed:
            storage.delete(tmp)
        elif not remote and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    report = _report_from_manifest(out, manifest, time.perf_counter() - t0, reused=False, changes=changes,
                                   quarantined=quarantined, pool=pool.describe())
    log.debug("%s", report.format())  # callers print the summary
    return report
