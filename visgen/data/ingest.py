"""Ingest: WebDataset shards → decoded, validated, resized, tokenized samples on Ray Data.

Pipeline (lazy, streamable into Ray Train with ``get_dataset_shard``)::

    expand_source(cfg.source)            shard list; the last ``holdout_shards`` are held out
      → TarShardDatasource               raw member bytes per sample; bad shards become rows
      → _ingest_batch, batch_size rows   per sample: json → caption → image decode/resize,
                                         then batched tokenization; CPU, inside the read tasks
                                         (or a map_batches stage with decode_in_read=False)
          ├─ good rows  → returned:      key, shard, image (H, W, 3) uint8, caption, text_ids, json
          └─ bad rows   → written:       <quarantine_dir>/q-<hash>.parquet (key, shard, reason, detail)

Every rejected sample becomes one quarantine row with a reason from :data:`QUARANTINE_REASONS`;
nothing raises out of a batch for bad data. The batch function writes its own quarantine rows,
so the table fills in while the dataset is streamed, not only on a materialised pass. Files are
named by a hash of their rows: a batch that is re-run (task retry, next epoch) rewrites the
same file, and :func:`quarantine_table` drops duplicate rows across files.

Validation order per sample (the first failure is the reason recorded): reader fault
(shard / key-split / oversized member) → ``.json`` → caption → image. Captions come first
because they are cheap: a sample with no caption never pays for an image decode.

Caption rules: the ``.txt`` member when present (strict UTF-8, a BOM is dropped), otherwise the
``.json`` object's ``"caption"`` string. Unicode NFC, control characters removed, whitespace runs
collapsed to one space, stripped. Then empty → ``caption_empty``; longer than
``max_caption_chars`` → cut at the last space before the limit (or at the limit itself when
the second half of the window has no space, e.g. Chinese) with ``overlong_caption='truncate'``,
or ``caption_too_long`` with ``'reject'``.

Image rules: the first ``.jpg/.jpeg/.png/.webp`` member (extension case ignored); decoded only
as JPEG, PNG or WebP whatever the extension says (PIL never probes other formats); header size
checked against ``max_image_pixels`` and ``min_size`` *before* decoding; EXIF orientation
applied; modes L, LA, P, PA, RGBA, CMYK, 1, I, I;16 converted to RGB (alpha composited over
``alpha_background``, 16-bit scaled to 8-bit); antialiased bicubic resize and centre crop
(``resize_mode='crop'``) or letterbox onto ``pad_color`` (``'pad'``) to ``resolution``². The pixel
steps are :mod:`visgen.data.images`, shared with ``Model`` and Serve (the bundle records
:meth:`IngestConfig.image_prep`, so a served model sees images made as its training images were).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
from pyarrow import fs as pafs
from pydantic import Field
from ray.data.extensions import ArrowTensorArray

from visgen import storage
from visgen.base import Section
from visgen.data.images import IMAGE_FORMATS, ImageError, ImagePrep, describe_error, open_image, to_model_square
from visgen.data.sources import expand_source, split_shards
from visgen.data.webdataset_source import IMAGE_EXTS, RawSample, TarShardDatasource

if TYPE_CHECKING:
    from visgen.text.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

_Byte = Annotated[int, Field(ge=0, le=255)]
# PIL refuses to open anything above twice its own MAX_IMAGE_PIXELS (DecompressionBombError).
_PIL_HARD_LIMIT = 2 * int(1024 * 1024 * 1024 // 4 // 3)


class IngestConfig(Section):
    """How shards are read, validated and turned into training samples."""

    source: str = Field(min_length=1, description="Shard spec: directory, glob, brace range "
                        "(shards/{00000..00099}.tar) or s3:// / gs:// / file:// URL of those.")
    resolution: int = Field(64, ge=8, le=4096, description="Output images are resolution × resolution RGB.")
    resize_mode: Literal["crop", "pad"] = Field("crop", description="'crop': scale the short side to "
                                                "resolution, centre-crop; 'pad': scale the long side, letterbox.")
    pad_color: tuple[_Byte, _Byte, _Byte] = Field((0, 0, 0), description="RGB fill of the letterbox bars "
                                                  "(resize_mode='pad').")
    alpha_background: tuple[_Byte, _Byte, _Byte] = Field((255, 255, 255), description="RGB background "
                                                         "that transparent images are composited over.")
    min_size: int = Field(32, ge=1, le=4096, description="Images whose shorter side is below this are "
                          "rejected (image_too_small).")
    max_image_pixels: int = Field(40_000_000, ge=1, le=_PIL_HARD_LIMIT, description="Images whose header "
                                  "declares more pixels are rejected before decoding (image_too_large).")
    max_member_bytes: int = Field(64 << 20, ge=1024, le=1 << 31, description="Tar members larger than this "
                                  "are skipped unread; the sample is rejected (member_too_large).")
    max_caption_chars: int = Field(512, ge=8, le=100_000, description="Captions longer than this (after "
                                   "whitespace normalisation) are truncated or rejected, see overlong_caption.")
    overlong_caption: Literal["truncate", "reject"] = Field("truncate", description="'truncate': cut at a "
                                                            "word boundary; 'reject': quarantine as caption_too_long.")
    max_text_tokens: int = Field(128, ge=1, le=8192, description="Text ids are truncated to this many tokens.")
    holdout_shards: int = Field(0, ge=0, description="The last N shards of the expanded source form the "
                                "held-out split.")
    batch_size: int = Field(64, ge=1, le=8192, description="Samples decoded per call (a read block; the "
                            "map_batches batch with decode_in_read=False).")
    num_cpus: float = Field(1.0, gt=0, le=64, description="CPUs reserved per read/decode task; below 1 "
                            "oversubscribes (useful when reading from an object store).")
    decode_in_read: bool = Field(True, description="Decode inside the read tasks (no copy of the raw bytes "
                                 "through the object store; parallelism = number of shards). False: a separate "
                                 "map_batches stage, which Ray can spread over more tasks than there are shards.")
    jpeg_draft: bool = Field(True, description="Let libjpeg decode JPEGs at 1/2, 1/4 or 1/8 scale when that "
                             "still covers the target size (several times faster; slight softening).")

    def image_prep(self) -> ImagePrep:
        """How these settings make an image into the model's square; bundles record it, serving repeats it."""
        return ImagePrep(resolution=self.resolution, resize_mode=self.resize_mode, pad_color=self.pad_color,
                         alpha_background=self.alpha_background, jpeg_draft=self.jpeg_draft)


# -- quarantine vocabulary ------------------------------------------------------------------

#: Every reason a row can carry. Rows with ``key == ""`` concern a whole shard.
QUARANTINE_REASONS: dict[str, str] = {
    "shard_unreadable": "the shard cannot be opened or is not a tar (empty, gzip, garbage), or an I/O error "
                        "stopped the read (complete samples before it are kept)",
    "shard_truncated": "the tar ends inside a member or without its end-of-archive marker; complete "
                       "samples before the cut are kept, the unfinished one is dropped (named in the detail)",
    "shard_corrupt": "a member header after the first fails its checksum; complete samples before it are kept",
    "key_split": "a key's members reappear after another key's; the later run is dropped (the first "
                 "run was validated as its own sample)",
    "member_too_large": "an image/.txt/.json member is larger than max_member_bytes; skipped unread",
    "json_invalid": "the .json member is not UTF-8 JSON holding an object",
    "caption_missing": "no .txt member and no string 'caption' in the .json",
    "caption_undecodable": "the caption is not valid UTF-8 (or holds lone surrogates)",
    "caption_empty": "the caption is empty or whitespace only",
    "caption_too_long": "the caption is longer than max_caption_chars (overlong_caption='reject')",
    "image_missing": "no .jpg/.jpeg/.png/.webp member",
    "image_decode_error": "the image bytes are not a decodable JPEG/PNG/WebP (corrupt, truncated, other format)",
    "image_too_small": "the shorter side is below min_size",
    "image_too_large": "the header declares more than max_image_pixels pixels (or trips PIL's bomb guard)",
    "sample_error": "an unexpected error while validating the sample; the detail holds the exception",
    "member_dropped": "notice, not a rejection: pickled members (.pkl/.pickle/.pyd/.pth/.pt) were dropped "
                      "unread; the sample itself is judged on its other members",
}
#: Reasons that record something about a kept sample rather than a rejection.
NOTICE_REASONS = frozenset({"member_dropped"})
SHARD_REASONS = frozenset({"shard_unreadable", "shard_truncated", "shard_corrupt"})

QUARANTINE_COLUMNS = ("key", "shard", "reason", "detail")
SPLIT_COLUMN = "split"  # what build_dataset(tag_split=True) adds: the split each row was read for


class Rejected(Exception):
    """A sample fails validation; ``reason`` is a key of :data:`QUARANTINE_REASONS`."""

    def __init__(self, reason: str, detail: str):
        assert reason in QUARANTINE_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# -- captions and metadata ----------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\ufeff]")


def normalize_caption(text: str) -> str:
    """NFC, control/zero-width characters removed, whitespace collapsed to single spaces."""
    text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub(" ", text)
    return " ".join(text.split())


def truncate_caption(text: str, limit: int) -> str:
    """Cut ``text`` to at most ``limit`` characters at a word boundary.

    Falls back to a hard cut at ``limit`` when the last half of the window holds no space
    (scripts written without spaces, or one enormous token).
    """
    if len(text) <= limit:
        return text
    if text[limit] == " ":
        return text[:limit].rstrip()
    head = text[:limit]
    space = head.rfind(" ")
    return head[:space].rstrip() if space >= limit // 2 else head


def parse_json(raw: bytes | None) -> tuple[dict | None, str]:
    """The ``.json`` member → (object, its text). ``(None, "")`` when absent; raises ``json_invalid``."""
    if raw is None:
        return None, ""
    try:
        text = raw.decode("utf-8-sig")
        meta = json.loads(text)
    except UnicodeDecodeError as err:
        raise Rejected("json_invalid", f".json is not valid UTF-8: {err}") from None
    except (ValueError, RecursionError) as err:
        raise Rejected("json_invalid", f".json does not parse: {err}") from None
    if not isinstance(meta, dict):
        raise Rejected("json_invalid", f".json holds a {type(meta).__name__}, expected an object")
    return meta, text


def read_caption(txt: bytes | None, meta: dict | None, cfg: IngestConfig) -> str:
    """The sample's caption under the rules in the module docstring; raises :class:`Rejected`."""
    if txt is not None:
        try:
            text = txt.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            raise Rejected("caption_undecodable", f".txt is not valid UTF-8: {err}") from None
    elif meta is not None and "caption" in meta:
        text = meta["caption"]
        if not isinstance(text, str):
            raise Rejected("caption_missing", f".json 'caption' is {type(text).__name__}, not a string")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:  # a lone surrogate escaped in the JSON (\ud800)
            raise Rejected("caption_undecodable", f".json 'caption' is not valid Unicode: {err}") from None
    else:
        raise Rejected("caption_missing", "no .txt member and no 'caption' in the .json"
                       if meta is not None else "no .txt member and no .json member")
    text = normalize_caption(text)
    if not text:
        raise Rejected("caption_empty", "the caption is empty or whitespace only")
    if len(text) > cfg.max_caption_chars:
        if cfg.overlong_caption == "reject":
            raise Rejected("caption_too_long", f"{len(text)} characters > max_caption_chars={cfg.max_caption_chars}")
        text = truncate_caption(text, cfg.max_caption_chars)
    return text


# -- images -------------------------------------------------------------------------------------
# The pixels themselves are made by visgen.data.images, the one conversion Model and Serve share;
# here only its errors become quarantine reasons.

def decode_image(data: bytes, cfg: IngestConfig) -> np.ndarray:
    """Image bytes → (resolution, resolution, 3) uint8; raises :class:`Rejected`."""
    try:
        img = open_image(data, formats=IMAGE_FORMATS, max_pixels=cfg.max_image_pixels, min_size=cfg.min_size)
    except ImageError as err:
        if err.reason == "image_too_large" and err.size is not None:
            w, h = err.size
            raise Rejected("image_too_large", f"{err.format} header declares {w}x{h} = {w * h} "
                                              f"pixels > max_image_pixels={cfg.max_image_pixels}") from None
        if err.reason == "image_too_small":
            w, h = err.size
            raise Rejected("image_too_small", f"{w}x{h}: shorter side {min(w, h)} < min_size={cfg.min_size}") from None
        raise Rejected("image_decode_error" if err.reason == "image_format" else err.reason, err.detail) from None
    try:
        return to_model_square(img, cfg.image_prep())
    except ImageError as err:
        raise Rejected("image_decode_error", err.detail) from None


# -- one batch ----------------------------------------------------------------------------------

@dataclass
class Decoded:
    """Good samples of one batch, column-wise. ``image`` is (B, R, R, 3) uint8."""

    key: list[str]
    shard: list[str]
    image: np.ndarray
    caption: list[str]
    text_ids: list[list[int]]
    json: list[str]

    def __len__(self) -> int:
        return len(self.key)


def validate_sample(sample: RawSample, cfg: IngestConfig) -> tuple[np.ndarray, str, str]:
    """One raw sample → (image (R, R, 3) uint8, caption, json text); raises :class:`Rejected`."""
    if sample.fault:
        raise Rejected(sample.fault, sample.detail)
    meta, json_text = parse_json(sample.json)
    caption = read_caption(sample.txt, meta, cfg)
    if not sample.image_name:
        raise Rejected("image_missing", f"no {'/'.join('.' + e for e in IMAGE_EXTS)} member")
    return decode_image(sample.image or b"", cfg), caption, json_text


def quarantine_row(sample: RawSample, reason: str, detail: str) -> dict[str, str]:
    return {"key": sample.key, "shard": sample.shard, "reason": reason, "detail": detail}


def process_samples(samples: Sequence[RawSample], cfg: IngestConfig,
                    tokenizer: TextTokenizer | None = None) -> tuple[Decoded, list[dict[str, str]]]:
    """Validate and decode a batch: (good samples, quarantine rows). Never raises for bad data."""
    keys, shards, images, captions, jsons = [], [], [], [], []
    bad: list[dict[str, str]] = []
    for s in samples:
        if s.dropped:
            bad.append(quarantine_row(s, "member_dropped", ", ".join(repr(n) for n in s.dropped)))
        try:
            image, caption, json_text = validate_sample(s, cfg)
        except Rejected as r:
            bad.append(quarantine_row(s, r.reason, r.detail))
            continue
        except Exception as err:  # a bug, not bad data: still one sample, never the batch
            bad.append(quarantine_row(s, "sample_error", describe_error(err)))
            continue
        keys.append(s.key)
        shards.append(s.shard)
        images.append(image)
        captions.append(caption)
        jsons.append(json_text)
    if tokenizer is not None and captions:
        text_ids = tokenizer.encode_batch(captions, max_length=cfg.max_text_tokens)
    else:
        text_ids = [[] for _ in captions]
    r = cfg.resolution
    stacked = np.stack(images) if images else np.zeros((0, r, r, 3), np.uint8)  # (B, R, R, 3)
    return Decoded(keys, shards, stacked, captions, text_ids, jsons), bad


# -- quarantine table ---------------------------------------------------------------------------

def _quarantine_fs(quarantine_dir: str):
    if "://" in quarantine_dir:
        return pafs.FileSystem.from_uri(quarantine_dir)
    return pafs.LocalFileSystem(), os.path.abspath(quarantine_dir)


def _quarantine_schema():
    return pa.schema([(c, pa.string()) for c in QUARANTINE_COLUMNS])


def write_quarantine(rows: list[dict[str, str]], quarantine_dir: str) -> str | None:
    """Write one batch's quarantine rows as ``q-<hash of the rows>.parquet``; returns the path.

    The name depends only on the rows, so re-running the same batch rewrites the same file.
    Local writes go through a hidden temporary name and a rename, so a reader never sees half
    a file (object stores publish a PUT atomically anyway).
    """
    if not rows:
        return None
    digest = hashlib.sha1("\n".join("\t".join(r[c] for c in QUARANTINE_COLUMNS) for r in rows)
                          .encode("utf-8", "backslashreplace")).hexdigest()[:24]
    fs, root = _quarantine_fs(quarantine_dir)
    fs.create_dir(root, recursive=True)
    path = f"{root}/q-{digest}.parquet"
    table = pa.Table.from_pylist(rows, schema=_quarantine_schema())
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{root}/.q-{digest}.{os.getpid()}.{time.monotonic_ns()}.tmp"
        pq.write_table(table, tmp, filesystem=fs)
        fs.move(tmp, path)
    else:
        pq.write_table(table, path, filesystem=fs)
    return path


def _quarantine_files(quarantine_dir: str):
    fs, root = _quarantine_fs(quarantine_dir)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return fs, []
    files = fs.get_file_info(pafs.FileSelector(root))
    return fs, sorted(f.path for f in files if f.base_name.startswith("q-") and f.base_name.endswith(".parquet"))


def quarantine_table(quarantine_dir: str) -> pa.Table:
    """All quarantine rows under ``quarantine_dir``, duplicates removed, sorted by shard, key, reason."""
    fs, files = _quarantine_files(quarantine_dir)
    if not files:
        return _quarantine_schema().empty_table()
    table = pa.concat_tables([pq.read_table(f, filesystem=fs) for f in files])
    table = table.group_by(list(QUARANTINE_COLUMNS)).aggregate([])  # distinct rows
    return table.select(list(QUARANTINE_COLUMNS)).sort_by([("shard", "ascending"), ("key", "ascending"),
                                                            ("reason", "ascending")])


def quarantine_summary(quarantine_dir: str) -> dict[str, int]:
    """Row counts by reason (notices included, see :data:`NOTICE_REASONS`), largest first."""
    counts = Counter(quarantine_table(quarantine_dir).column("reason").to_pylist())
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def clear_quarantine(quarantine_dir: str) -> int:
    """Delete the ``q-*.parquet`` files a previous pass left (nothing else); returns how many."""
    fs, files = _quarantine_files(quarantine_dir)
    for f in files:
        fs.delete_file(f)
    return len(files)


# -- Ray Data pipeline --------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _tokenizer(path: str) -> TextTokenizer:
    # Loaded once per worker process; Ray reuses workers across tasks. A URL (object store
    # workdir) is read from this node's copy.
    from visgen.text.tokenizer import TextTokenizer  # tokenizers: only ingest with a text tokenizer loads it

    return TextTokenizer.load(storage.local_copy(path))


def decoded_to_table(d: Decoded, resolution: int) -> pa.Table:
    return pa.Table.from_arrays(
        [pa.array(d.key, pa.string()), pa.array(d.shard, pa.string()), ArrowTensorArray.from_numpy(d.image),
         pa.array(d.caption, pa.string()), pa.array(d.text_ids, pa.list_(pa.int32())), pa.array(d.json, pa.string())],
        names=["key", "shard", "image", "caption", "text_ids", "json"])


def _ingest_batch(batch: pa.Table, cfg: IngestConfig, tokenizer_path: str | None, quarantine_dir: str,
                  tag: str | None = None) -> pa.Table:
    samples = [RawSample.from_row(row) for row in batch.to_pylist()]
    tok = _tokenizer(tokenizer_path) if tokenizer_path else None
    good, bad = process_samples(samples, cfg, tok)
    write_quarantine(bad, quarantine_dir)
    table = decoded_to_table(good, cfg.resolution)
    if tag is not None:
        table = table.append_column(SPLIT_COLUMN, pa.array([tag] * table.num_rows, pa.string()))
    return table


def _caption_batch(batch: pa.Table, cfg: IngestConfig) -> pa.Table:
    captions = []
    for row in batch.to_pylist():
        s = RawSample.from_row(row)
        if s.fault or not s.image_name:
            continue
        try:
            captions.append(read_caption(s.txt, parse_json(s.json)[0], cfg))
        except Rejected:
            pass
    return pa.table({"caption": pa.array(captions, pa.string())})


def _read_shards(cfg: IngestConfig, shards: list[str], keep_images: bool,
                 transform: Callable[[pa.Table], pa.Table] | None = None) -> ray.data.Dataset:
    source = TarShardDatasource(shards, block_samples=cfg.batch_size, max_member_bytes=cfg.max_member_bytes,
                                keep_images=keep_images, transform=transform)
    return ray.data.read_datasource(source, num_cpus=cfg.num_cpus)


def _local_or_url(path: str) -> str:
    # Ray workers may run in another working directory (a job's working_dir): pass them
    # absolute paths, resolved here on the driver.
    return path if "://" in path else os.path.abspath(path)


def build_dataset(cfg: IngestConfig, tokenizer_path: str | None, quarantine_dir: str,
                  split: Literal["train", "holdout", "all"] = "all", tag_split: bool = False) -> ray.data.Dataset:
    """The lazy ingest dataset: rows ``key, shard, image (R, R, 3) uint8, caption, text_ids, json``
    (and ``split``, the split's name, with ``tag_split``: for a consumer that streams several splits as one).

    Rejected samples are written under ``quarantine_dir`` as they are met (while streaming into
    a trainer too); read them back with :func:`quarantine_table` / :func:`quarantine_summary`.
    ``tokenizer_path`` (a ``TextTokenizer`` JSON, readable from every node) may be ``None``:
    ``text_ids`` are then empty lists. ``quarantine_dir`` must be writable from every node
    (local path on one machine, shared storage or an object-store URI on a cluster).

    With ``cfg.decode_in_read`` (the default) each read task decodes its own blocks of
    ``batch_size`` samples. Ray does not fuse a read with a ``map_batches`` that sets a batch
    size, and the separate stage costs a copy of every raw byte through the object store and a
    second round of tasks (about 20 % more CPU per image on ``bench/ingest.py``'s shards, 2 CPUs).
    The ``map_batches`` form is kept for clusters with more cores than shards, where it spreads
    the decoding wider than the shard count allows.
    """
    shards = split_shards(expand_source(cfg.source), cfg.holdout_shards, split)
    return _build(cfg, shards, tokenizer_path, quarantine_dir, split if tag_split else None)


def _build(cfg: IngestConfig, shards: list[str], tokenizer_path: str | None, quarantine_dir: str,
           tag: str | None = None) -> ray.data.Dataset:
    if tokenizer_path is not None:
        tokenizer_path = _local_or_url(tokenizer_path)
        _tokenizer(tokenizer_path)  # fail here, with the loader's message, not in every task
    quarantine_dir = _local_or_url(quarantine_dir)
    fs, root = _quarantine_fs(quarantine_dir)
    fs.create_dir(root, recursive=True)
    # The split column is added in the ingest's own tasks: a separate stage could not always fuse with the read.
    kwargs = {"cfg": cfg, "tokenizer_path": tokenizer_path, "quarantine_dir": quarantine_dir,
              **({"tag": tag} if tag is not None else {})}
    if cfg.decode_in_read:
        return _read_shards(cfg, shards, keep_images=True, transform=functools.partial(_ingest_batch, **kwargs))
    return _read_shards(cfg, shards, keep_images=True).map_batches(
        _ingest_batch, fn_kwargs=kwargs, batch_format="pyarrow", batch_size=cfg.batch_size,
        num_cpus=cfg.num_cpus, zero_copy_batch=True)


def read_captions(cfg: IngestConfig, split: Literal["train", "holdout", "all"] = "train") -> ray.data.Dataset:
    """A dataset with one ``caption`` column: the captions ingest would keep, under the same rules.

    Images are not decoded (a sample whose image would later be rejected still contributes its
    caption); samples without an image member, with a reader fault or a bad caption are skipped.
    Defaults to the train split, so the text tokenizer never sees held-out captions.
    """
    shards = split_shards(expand_source(cfg.source), cfg.holdout_shards, split)
    return _read_shards(cfg, shards, keep_images=False, transform=functools.partial(_caption_batch, cfg=cfg))


@dataclass
class IngestReport:
    """What one full ingest pass did."""

    kept: int
    quarantined: dict[str, int]  # rejected samples (and shard faults) by reason
    notices: dict[str, int]      # rows about kept samples, e.g. member_dropped
    shards: int
    seconds: float
    quarantine_dir: str

    @property
    def rejected(self) -> int:
        return sum(self.quarantined.values())

    @property
    def images_per_s(self) -> float:
        """Kept images per second of wall time."""
        return self.kept / self.seconds if self.seconds > 0 else 0.0

    def format(self) -> str:
        lines = [f"ingest: {self.kept} samples kept, {self.rejected} quarantined rows from {self.shards} shard(s) "
                 f"in {self.seconds:.1f} s ({self.images_per_s:.0f} images/s)"]
        for reason, n in self.quarantined.items():
            lines.append(f"  {reason:<20} {n:>8}  {QUARANTINE_REASONS.get(reason, '')}")
        for reason, n in self.notices.items():
            lines.append(f"  {reason:<20} {n:>8}  {QUARANTINE_REASONS.get(reason, '')}")
        lines.append(f"quarantine table: {self.quarantine_dir} (parquet; key, shard, reason, detail)")
        return "\n".join(lines)


def run_ingest(cfg: IngestConfig, tokenizer_path: str | None, quarantine_dir: str,
               split: Literal["train", "holdout", "all"] = "all") -> IngestReport:
    """One full validating pass: consume the dataset, return counts and throughput.

    The quarantine files of an earlier pass in ``quarantine_dir`` are deleted first, so the
    table describes this pass only. Nothing else in the directory is touched.
    """
    shards = split_shards(expand_source(cfg.source), cfg.holdout_shards, split)
    quarantine_dir = _local_or_url(quarantine_dir)
    clear_quarantine(quarantine_dir)
    ds = _build(cfg, shards, tokenizer_path, quarantine_dir)
    start = time.perf_counter()
    # Stream every block to completion; only block metadata (row counts) reaches the driver.
    # (Dataset.count() would add a projection stage of its own on top of the pipeline.)
    kept = sum(bundle.num_rows() or 0 for bundle in ds.iter_internal_ref_bundles())
    seconds = time.perf_counter() - start
    counts = quarantine_summary(quarantine_dir)
    report = IngestReport(
        kept=kept,
        quarantined={r: n for r, n in counts.items() if r not in NOTICE_REASONS},
        notices={r: n for r, n in counts.items() if r in NOTICE_REASONS},
        shards=len(shards), seconds=seconds, quarantine_dir=quarantine_dir)
    log.debug("%s", report.format())  # callers print the summary; logging it too showed it twice
    return report
