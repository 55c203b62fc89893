"""Reading WebDataset / img2dataset tar shards into raw samples, one bad shard at a time (and
:func:`write_tar_member`, how the shard writers add members reproducibly).

``ray.data.read_webdataset`` raises inside the read task on a truncated or non-tar file, which
fails the whole dataset. This module reads tars itself so that every fault becomes a *row*:

* :func:`iter_tar_members` walks the tar headers of a byte stream (ustar, GNU long names and
  pax headers) and raises :class:`TarFault` with a precise reason instead of guessing. Unlike
  ``tarfile``, a tar cut exactly at a member boundary is reported (``tarfile`` takes a missing
  end-of-archive marker, or a garbage header after the first, for a clean end).
* :func:`iter_tar_samples` groups members into samples by key (the WebDataset rule: the key is
  the member path up to the first dot of its file name; the rest is the extension), keeps only
  the image / ``.txt`` / ``.json`` members as bytes, and turns faults into rows.
* :class:`TarShardDatasource` is the Ray Data datasource around it: a read task streams whole
  shards (a tar cannot be split) and yields Arrow blocks of :data:`RAW_SCHEMA`, or whatever an
  optional per-block ``transform`` makes of them (ingest decodes there, inside the read task).

What happens to a faulty shard's samples (losing no good data is preferred):

* ``shard_unreadable`` (cannot be opened, empty, or its first header is not a tar header):
  nothing is read from it; one row with ``key == ""``.
* ``shard_truncated`` (the file ends inside a member, or at a member boundary without the
  end-of-archive marker), ``shard_corrupt`` (a later header fails its checksum) and I/O errors
  mid-file (``shard_unreadable``): every sample whose run of members was closed by the next
  key's first member is emitted and validated as usual. The run still open at the fault is
  dropped, because members of it may have followed (a caption without its ground-truth
  ``.json`` would pass validation and mislead evaluation); it is named in the detail of the
  one ``key == ""`` row, with the count of complete samples read before the fault. (When the
  fault hits the first member of a new key, the run before it is known complete and kept.)
* ``key_split`` (a key's members come back after another key's, e.g. ``A.jpg A.txt B.jpg
  B.txt A.json``): samples stream out as soon as their key's run ends, so the first run of
  ``A`` has already been emitted as a sample of its own and is validated like any other; each
  later run is dropped unread and becomes a ``key_split`` row with ``key == "A"``. The shard
  is read on.

Nothing is ever written to disk and nothing is unpickled: members are held as bytes, members
with pickle extensions (:data:`PICKLE_EXTS`) are dropped unread and listed in ``dropped``, and
every other extension is ignored.
"""

from __future__ import annotations

import io
import re
import struct
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_SKIP_CHUNK = 1 << 20

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Extensions whose WebDataset decoders would unpickle the bytes (pickle, torch.save files).
PICKLE_EXTS = frozenset({"pkl", "pickle", "pyd", "pth", "pt"})

_REGULAR_TYPES = (b"0", b"\0", b"7")
# Types that carry no data blocks (links, devices, directories, FIFOs); as in ``tarfile``,
# their size field is ignored.
_NO_DATA_TYPES = (b"1", b"2", b"3", b"4", b"5", b"6")
_KEY_RE = re.compile(r"^((?:.*/|)[^./][^./]*)\.([^/]+)$")

RAW_SCHEMA = pa.schema([
    pa.field("key", pa.string()),
    pa.field("shard", pa.string()),
    pa.field("image", pa.large_binary()),   # null when the sample has no image member
    pa.field("image_name", pa.string()),     # member name of the image ("" when none)
    pa.field("txt", pa.large_binary()),
    pa.field("json", pa.large_binary()),
    pa.field("fault", pa.string()),          # "" or the quarantine reason the reader assigned
    pa.field("detail", pa.string()),
    pa.field("dropped", pa.list_(pa.string())),  # member names dropped unread (pickles)
])


class TarFault(Exception):
    """The tar stream cannot be read on. ``member`` names the member being read when it broke."""

    def __init__(self, reason: str, detail: str, member: str | None = None):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.member = reason, detail, member


@dataclass
class RawSample:
    """One sample as found in a shard: the bytes of its useful members, or a reader fault."""

    key: str
    shard: str
    image: bytes | None = None
    image_name: str = ""
    txt: bytes | None = None
    json: bytes | None = None
    fault: str = ""
    detail: str = ""
    dropped: list[str] = field(default_factory=list)

    def to_row(self) -> dict[str, Any]:
        return {"key": self.key, "shard": self.shard, "image": self.image, "image_name": self.image_name,
                "txt": self.txt, "json": self.json, "fault": self.fault, "detail": self.detail,
                "dropped": list(self.dropped)}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "RawSample":
        return cls(key=row["key"], shard=row["shard"], image=row["image"], image_name=row["image_name"] or "",
                   txt=row["txt"], json=row["json"], fault=row["fault"] or "", detail=row["detail"] or "",
                   dropped=list(row["dropped"] or ()))


# -- tar headers ------------------------------------------------------------------------------

def _read_exact(stream, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        b = stream.read(n - got)
        if not b:
            break
        chunks.append(b)
        got += len(b)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _skip(stream, n: int) -> int:
    got = 0
    while got < n:
        b = stream.read(min(_SKIP_CHUNK, n - got))
        if not b:
            break
        got += len(b)
    return got


def _number(field: bytes) -> int:
    """A numeric header field: NUL/space-padded octal, or GNU base-256 (top bit set)."""
    if field and field[0] & 0x80:
        if field[0] == 0xFF:
            raise ValueError("negative base-256 number")
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    return int(text, 8) if text else 0


def _checksum_ok(h: bytes) -> bool:
    try:
        stored = _number(h[148:156])
    except ValueError:
        return False
    rest = h[:148] + b" " * 8 + h[156:]
    # POSIX says unsigned; some old writers summed signed bytes. Accept either, like tarfile.
    return stored in (sum(rest), sum(struct.unpack("512b", rest)))


def _text(b: bytes) -> str:
    # Names that are not UTF-8 keep their bytes visible as escapes (b"\xff" → "\\xff"): the key stays
    # distinct, deterministic and a valid string for Arrow and parquet.
    return b.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")


def _pax_records(data: bytes) -> dict[str, str]:
    """Parse pax extended-header records: ``"<len> <key>=<value>\\n"`` repeated."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        if length <= 0:
            break
        record = data[space + 1: pos + length - 1]  # drop the trailing newline
        k, _, v = record.partition(b"=")
        out[k.decode("utf-8", "replace")] = v.decode("utf-8", "backslashreplace")
        pos += length
    return out


def iter_tar_members(stream, max_member_bytes: int) -> Iterator[tuple[str, bytes | None, int]]:
    """Yield ``(name, data, size)`` for each regular file in a tar byte stream, in order.

    ``data`` is ``None`` for a member larger than ``max_member_bytes``; its bytes are skipped,
    never held. Raises :class:`TarFault` (``shard_unreadable`` / ``shard_truncated`` /
    ``shard_corrupt``) when the stream cannot be read on; members yielded before it are sound.
    An I/O error becomes a ``shard_unreadable`` fault whose detail starts with ``"read failed"``.
    A fault met while reading a member's data names that member (``TarFault.member``).
    """
    at: list[str | None] = [None]  # the member whose data is being read, if any
    try:
        yield from _walk_tar(stream, max_member_bytes, at)
    except TarFault:
        raise
    except Exception as err:
        raise TarFault("shard_unreadable", f"read failed: {type(err).__name__}: {err}", member=at[0]) from err


def _walk_tar(stream, max_member_bytes: int, at: list[str | None]) -> Iterator[tuple[str, bytes | None, int]]:
    offset = 0  # bytes consumed so far
    last = ""  # the last regular member read in full
    long_name: str | None = None
    pax: dict[str, str] = {}
    while True:
        h = _read_exact(stream, BLOCK)
        if len(h) < BLOCK:
            if offset == 0:
                what = "empty file" if not h else f"only {len(h)} bytes long"
                raise TarFault("shard_unreadable", f"not a tar archive: {what}")
            after = f" after member {last!r}" if last else ""
            if not h:
                raise TarFault("shard_truncated", f"file ends at byte {offset}{after} without the "
                                                  f"end-of-archive marker")
            raise TarFault("shard_truncated", f"file ends inside a member header at byte {offset + len(h)}{after}")
        if h == _ZERO_BLOCK:
            return  # end-of-archive marker (one zero block is enough, as for tarfile)
        if not _checksum_ok(h):
            if offset == 0:
                hint = " (it looks gzip-compressed; ingest reads uncompressed .tar)" if h[:2] == b"\x1f\x8b" else ""
                raise TarFault("shard_unreadable", f"not a tar archive: the first header fails its checksum{hint}")
            raise TarFault("shard_corrupt", f"the member header at byte {offset} fails its checksum; "
                                            f"the rest of the shard cannot be located")
        typeflag = h[156:157]
        size = _number(h[124:136])
        name = _text(h[0:100])
        if h[257:263] == b"ustar\x00":  # POSIX ustar: a 155-byte prefix extends the name
            prefix = _text(h[345:500])
            if prefix:
                name = f"{prefix}/{name}"
        offset += BLOCK
        if typeflag in _NO_DATA_TYPES:
            long_name, pax = None, {}
            continue
        padded = -(-size // BLOCK) * BLOCK

        if typeflag in (b"x", b"L", b"g", b"K"):  # headers that describe the next member
            data = _read_exact(stream, padded)
            offset += len(data)
            if len(data) < padded:
                raise TarFault("shard_truncated", f"file ends inside an extended header at byte {offset}")
            if typeflag == b"x":
                pax = _pax_records(data[:size])
            elif typeflag == b"L":
                long_name = _text(data[:size])
            continue

        if typeflag in _REGULAR_TYPES:
            name = pax.get("path", long_name or name)
            if "size" in pax:
                size, padded = int(pax["size"]), -(-int(pax["size"]) // BLOCK) * BLOCK
        long_name, pax = None, {}
        at[0] = name if typeflag in _REGULAR_TYPES else None
        if typeflag not in _REGULAR_TYPES or size > max_member_bytes:
            got = _skip(stream, padded)
            offset += got
            if got < min(size, padded):
                raise TarFault("shard_truncated", f"file ends inside member {name!r} "
                                                  f"({got} of {size} bytes)", member=name)
            at[0] = None
            if typeflag in _REGULAR_TYPES:
                last = name
                yield name, None, size
            continue
        data = _read_exact(stream, size)
        offset += len(data)
        if len(data) < size:
            raise TarFault("shard_truncated", f"file ends inside member {name!r} ({len(data)} of {size} bytes)",
                           member=name)
        # The padding is not data; a file cut inside it surfaces at the next header read.
        offset += _skip(stream, padded - size)
        at[0] = None
        last = name
        yield name, data, size


# -- grouping into samples ----------------------------------------------------------------------

def split_member_name(name: str) -> tuple[str, str] | None:
    """``"dir/000123.jpg"`` → ``("dir/000123", "jpg")``; ``None`` for names without a key/extension
    or hidden files (``.DS_Store``, ``._000123.jpg``)."""
    m = _KEY_RE.match(name)
    return (m.group(1), m.group(2)) if m else None


def _add_member(sample: RawSample, name: str, ext: str, data: bytes | None, size: int,
                max_member_bytes: int, keep_images: bool) -> None:
    ext = ext.lower()
    if ext.rsplit(".", 1)[-1] in PICKLE_EXTS:
        sample.dropped.append(name)
        return
    if ext not in IMAGE_EXTS and ext not in ("txt", "json"):
        return  # other fields (.cls, .npy, ...) are not used by ingest and never decoded
    if data is None:
        if not sample.fault:
            sample.fault = "member_too_large"
            sample.detail = f"member {name!r} is {size} bytes, above max_member_bytes={max_member_bytes}"
        return
    if ext in IMAGE_EXTS:
        if not sample.image_name:  # the first image member wins; later ones are extra views
            sample.image_name = name
            sample.image = data if keep_images else b""
    elif ext == "txt" and sample.txt is None:
        sample.txt = data
    elif ext == "json" and sample.json is None:
        sample.json = data


def iter_tar_samples(stream, shard: str, max_member_bytes: int = 64 << 20,
                     keep_images: bool = True) -> Iterator[RawSample]:
    """Group a tar stream's members into :class:`RawSample` s; faults become rows, never raise.

    A shard-level fault is yielded last, as a sample with ``key == ""`` and ``fault`` set; see
    the module docstring for which samples are kept around a fault. ``keep_images=False``
    records the image member's name but not its bytes (for caption-only passes).
    """
    current: RawSample | None = None
    members: list[str] = []  # member names of the current run
    seen: set[str] = set()
    emitted = 0

    def finish(sample: RawSample) -> RawSample:
        if sample.fault == "key_split":
            shown = ", ".join(repr(n) for n in members[:8]) + (" ..." if len(members) > 8 else "")
            sample.detail += f" ({shown}) was dropped unread"
        return sample

    def fault_row(reason: str, detail: str) -> Iterator[RawSample]:
        # The run open at the fault is unterminated: more of its members may have followed, so
        # it is dropped rather than passed on incomplete (a caption without its metadata, say).
        if current is not None and current.fault == "key_split":
            yield finish(current)
        elif current is not None:
            detail += f"; the unfinished sample {current.key!r} ({', '.join(map(repr, members))}) was dropped"
        yield RawSample("", shard, fault=reason, detail=f"{detail}; {emitted} complete sample(s) before it were read")

    try:
        for name, data, size in iter_tar_members(stream, max_member_bytes):
            parts = split_member_name(name)
            if parts is None:
                continue
            key, ext = parts
            if current is None or key != current.key:
                if current is not None:
                    yield finish(current)
                    emitted += current.fault != "key_split"
                if key in seen:
                    prev = current.key if current is not None else ""
                    current = RawSample(key, shard, fault="key_split", detail=(
                        f"members of key {key!r} reappear after key {prev!r}; the first run was processed "
                        f"as a sample of its own, this later run"))
                else:
                    seen.add(key)
                    current = RawSample(key, shard)
                members = []
            members.append(name)
            if current.fault != "key_split":
                _add_member(current, name, ext, data, size, max_member_bytes, keep_images)
    except TarFault as fault:
        detail = fault.detail
        cut = split_member_name(fault.member) if fault.member else None
        if cut is not None and (current is None or cut[0] != current.key):
            # The broken member starts a new key, so the run before it was complete.
            if current is not None:
                yield finish(current)
                emitted += current.fault != "key_split"
                current = None
            detail += f"; the sample {cut[0]!r} it starts was dropped"
        yield from fault_row(fault.reason, detail)
    else:
        if current is not None:
            yield finish(current)


def samples_to_table(samples: list[RawSample]) -> pa.Table:
    return pa.Table.from_pylist([s.to_row() for s in samples], schema=RAW_SCHEMA)


# -- Ray Data datasource ----------------------------------------------------------------------

class TarShardDatasource(FileBasedDatasource):
    """Ray Data datasource over tar shards, yielding :data:`RAW_SCHEMA` blocks.

    Every fault becomes a row (see the module docstring), so one bad shard never fails a read
    task. Errors that Ray classes as transient (``DataContext.retried_io_errors``, e.g. S3
    ``SLOW_DOWN``) are re-raised instead, so that Ray retries the shard; the blocks a retry
    replays are identical, as Ray's retry requires.
    """

    def __init__(self, paths: list[str], *, block_samples: int = 64, max_member_bytes: int = 64 << 20,
                 keep_images: bool = True, transform: Callable[[pa.Table], pa.Table] | None = None, **kwargs):
        """``transform``, when given, maps each raw block (``block_samples`` rows of
        :data:`RAW_SCHEMA`) to the block the task emits, inside the read task: decoding there
        keeps the raw bytes out of the object store."""
        super().__init__(paths, **kwargs)
        self._block_samples = block_samples
        self._max_member_bytes = max_member_bytes
        self._keep_images = keep_images
        self._transform = transform
        # Ray strips the scheme from object-store paths; put it back so that the `shard` column
        # names a shard the way expand_source does (s3://bucket/x.tar, not bucket/x.tar).
        self._url_prefix = {"s3": "s3://", "gcs": "gs://"}.get(self._filesystem.unwrap().type_name, "")

    def _open_input_source(self, filesystem, path, **open_args):
        try:
            return super()._open_input_source(filesystem, path, **open_args)
        except Exception as err:
            if _is_retryable(err, self._data_context):
                raise
            return _FailedSource(err)  # read as a shard_unreadable row, not a failed task

    def _read_stream(self, f, path: str):
        shard = self._url_prefix + path
        batch: list[RawSample] = []
        nbytes = 0
        for sample in iter_tar_samples(f, shard, self._max_member_bytes, self._keep_images):
            if sample.key == "" and sample.detail.startswith("read failed") and _is_retryable(
                    sample.detail, self._data_context):
                raise OSError(sample.detail)  # transient: Ray re-reads the shard
            batch.append(sample)
            nbytes += len(sample.image or b"") + len(sample.txt or b"") + len(sample.json or b"")
            # Flush on rows or bytes so that a block stays a few tens of MiB at most.
            if len(batch) >= self._block_samples or nbytes >= (32 << 20):
                yield self._emit(batch)
                batch, nbytes = [], 0
        if batch:
            yield self._emit(batch)

    def _emit(self, batch: list[RawSample]) -> pa.Table:
        table = samples_to_table(batch)
        return self._transform(table) if self._transform is not None else table


class _FailedSource:
    """Stands in for a shard that could not be opened; reading it re-raises the open error."""

    def __init__(self, err: Exception):
        self._err = err

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read(self, n: int = -1) -> bytes:
        raise self._err


def _is_retryable(err: Any, ctx) -> bool:
    text = str(err)
    return any(p in text for p in (getattr(ctx, "retried_io_errors", None) or ()))


TAR_MTIME = 1_577_836_800  # 2020-01-01T00:00:00Z for every member written: the same input gives byte-identical tars


def write_tar_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add one member with fixed metadata (mtime, mode, owner), so shards are byte-reproducible."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), TAR_MTIME, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))
