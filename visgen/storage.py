"""Where artifacts live: a local directory or an object store URL (``s3://``, ``gs://``), one interface.

A *location* is a string: an absolute local path, or a URL whose scheme pyarrow's filesystems
know (``s3://bucket/key``, ``gs://bucket/key``; ``file://`` is a local path). Every stage, Ray
task, Train worker and Serve replica that reads an artifact passes a location and reads it with
:func:`local_copy`; one that writes one writes a local file or directory and hands it to
:func:`upload`. For a local location both are free (the path itself); for a URL:

* :func:`local_copy` downloads the object (or the "directory" under a prefix) once per node
  into the cache (``$VISGEN_CACHE_DIR``, default ``~/.cache/visgen``) and re-downloads only when
  the listing (names, sizes, modification times) changed, under a file lock so that the actors
  of one node download it once;
* :func:`upload` copies a local file or directory to the URL, replacing what was there.

Credentials and the endpoint come from the standard variables of each store, read by pyarrow:
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_DEFAULT_REGION`` / ``AWS_ENDPOINT_URL``
(an S3-compatible server such as MinIO), ``GOOGLE_APPLICATION_CREDENTIALS``. Nothing is
hard-wired. Errors name the location and the operation (:class:`StorageError`).

Ray Train's ``RunConfig.storage_path`` and Ray Data's ``read_parquet`` / ``write_parquet`` take
the same URLs and the same variables, so checkpoints and the token cache go to the bucket
without a copy through the driver.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import pyarrow.fs as pafs
from filelock import FileLock

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class StorageError(OSError):
    """An object store (or a local path standing in for one) could not be read or written."""


# -- locations ----------------------------------------------------------------------------------


def is_url(location: str | Path) -> bool:
    """Whether ``location`` names an object store (``s3://``, ``gs://``, ...) rather than a local path."""
    m = _URL.match(str(location))
    return bool(m) and m.group(1).lower() != "file"


def location(path_or_url: str | Path) -> str:
    """The canonical form: a URL without a trailing slash, or an absolute local path (``file://`` stripped)."""
    text = str(path_or_url)
    if is_url(text):
        scheme, rest = text.split("://", 1)
        rest = rest.rstrip("/")
        if not rest:
            raise StorageError(f"{text!r} names no bucket: write {scheme}://BUCKET/PREFIX")
        return f"{scheme.lower()}://{rest}"
    if text.startswith("file://"):
        text = text[len("file://"):]
    return str(Path(text).expanduser().resolve())


def join(base: str | Path, *parts: str) -> str:
    """``base/part/...`` for a URL or a local path."""
    base = location(base)
    if not is_url(base):
        return str(Path(base, *parts))
    return "/".join([base, *(p.strip("/") for p in parts if p.strip("/"))])


def name(loc: str | Path) -> str:
    """The last path component of a location."""
    return str(loc).rstrip("/").rsplit("/", 1)[-1]


def cache_root() -> Path:
    """Where downloaded copies and the local mirrors of remote workdirs live on this node."""
    return Path(os.environ.get("VISGEN_CACHE_DIR") or Path.home() / ".cache" / "visgen").expanduser().resolve()


def mirror_dir(url: str) -> Path:
    """The local directory that mirrors the remote workdir ``url`` on this node (same URL, same directory)."""
    url = location(url)
    scheme, rest = url.split("://", 1)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", rest)[:120]
    return cache_root() / "workdirs" / f"{scheme}-{safe}-{hashlib.sha1(url.encode()).hexdigest()[:10]}"


def filesystem(loc: str | Path) -> tuple[pafs.FileSystem, str]:
    """``(pyarrow filesystem, path inside it)`` for a location; :class:`StorageError` naming it when the
    scheme is unknown or the store cannot be reached."""
    loc = location(loc)
    if not is_url(loc):
        return pafs.LocalFileSystem(), loc
    try:
        return pafs.FileSystem.from_uri(loc)
    except (OSError, ValueError) as err:  # pyarrow: ArrowInvalid (a ValueError) for an unknown scheme
        raise StorageError(f"cannot open {loc}: {err}; credentials and endpoint come from the store's standard "
                           "variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL "
                           "for S3)") from None


def _info(loc: str, opened: tuple[pafs.FileSystem, str] | None = None) -> pafs.FileInfo:
    """What ``loc`` is, through ``opened`` (the ``filesystem(loc)`` a caller already holds) or a new one."""
    fs, path = opened or filesystem(loc)
    try:
        return fs.get_file_info(path)
    except OSError as err:
        raise StorageError(f"cannot read {loc}: {err}") from None


def exists(loc: str | Path) -> bool:
    return _info(str(loc)).type != pafs.FileType.NotFound


def is_file(loc: str | Path) -> bool:
    return _info(str(loc)).type == pafs.FileType.File


def is_dir(loc: str | Path) -> bool:
    return _info(str(loc)).type == pafs.FileType.Directory


def listdir(loc: str | Path) -> list[str]:
    """Names directly under a directory location (sorted); empty when it does not exist."""
    fs, path = filesystem(loc)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    except OSError as err:
        raise StorageError(f"cannot list {location(loc)}: {err}") from None
    return sorted(i.base_name for i in infos)


def read_bytes(loc: str | Path) -> bytes:
    fs, path = filesystem(loc)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{location(loc)} does not exist") from None
    except OSError as err:
        raise StorageError(f"cannot read {location(loc)}: {err}") from None


def read_text(loc: str | Path) -> str:
    return read_bytes(loc).decode("utf-8")


def write_bytes(loc: str | Path, data: bytes) -> None:
    """Write a whole object (a local file is written to a temporary name and renamed)."""
    loc = location(loc)
    if not is_url(loc):
        p = Path(loc)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_bytes(data)
        tmp.replace(p)
        return
    fs, path = filesystem(loc)
    try:
        with fs.open_output_stream(path) as f:
            f.write(data)
    except OSError as err:
        raise StorageError(f"cannot write {loc}: {err}") from None


def write_text(loc: str | Path, text: str) -> None:
    write_bytes(loc, text.encode("utf-8"))


def delete(loc: str | Path) -> None:
    """Delete a file or a directory tree; nothing when it does not exist."""
    fs, path = filesystem(loc)
    try:
        kind = fs.get_file_info(path).type
        if kind == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif kind == pafs.FileType.File:
            fs.delete_file(path)
    except OSError as err:
        raise StorageError(f"cannot delete {location(loc)}: {err}") from None


def listing(loc: str | Path) -> list[tuple[str, int, int]]:
    """``(relative path, size, mtime ns)`` of every file at or under ``loc``, sorted; empty when absent.
    A file location lists itself with relative path ``""``."""
    fs, path = filesystem(loc)
    try:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.File:
            return [("", info.size, info.mtime_ns or 0)]
        if info.type != pafs.FileType.Directory:
            return []
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except OSError as err:
        raise StorageError(f"cannot list {location(loc)}: {err}") from None
    root = path.rstrip("/") + "/"
    return sorted((i.path[len(root):], i.size, i.mtime_ns or 0) for i in infos if i.type == pafs.FileType.File)


# -- copies -------------------------------------------------------------------------------------


def upload(local: str | Path, loc: str | Path, replace: bool = True) -> None:
    """Copy the local file or directory ``local`` to ``loc``. ``replace``: delete what ``loc`` held
    first, so a directory upload leaves no file of an older version behind."""
    src = Path(local)
    loc = location(loc)
    if not src.exists():
        raise FileNotFoundError(f"cannot upload {src} to {loc}: it does not exist")
    if not is_url(loc) and Path(loc) == src.resolve():
        return
    fs, path = filesystem(loc)
    try:
        if replace:
            delete(loc)
        if src.is_dir():
            fs.create_dir(path, recursive=True)
            pafs.copy_files(str(src.resolve()), path, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=fs)
        else:
            parent = path.rsplit("/", 1)[0]
            if parent and parent != path:
                fs.create_dir(parent, recursive=True)
            pafs.copy_files(str(src.resolve()), path, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=fs)
    except OSError as err:
        raise StorageError(f"cannot upload {src} to {loc}: {err}") from None


def download(loc: str | Path, local: str | Path) -> Path:
    """Copy the file or directory at ``loc`` to the local path ``local`` (replacing it); returns ``local``."""
    loc = location(loc)
    dst = Path(local)
    fs, path = filesystem(loc)
    kind = _info(loc, (fs, path)).type  # the filesystem opened above, not a second one
    if kind == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{loc} does not exist")
    if dst.is_dir():
        shutil.rmtree(dst)
    elif dst.exists():
        dst.unlink()
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        if kind == pafs.FileType.Directory:
            dst.mkdir()
        pafs.copy_files(path, str(dst), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    except OSError as err:
        raise StorageError(f"cannot download {loc} to {dst}: {err}") from None
    return dst


def local_copy(loc: str | Path) -> Path:
    """A local path holding the file or directory at ``loc``: the path itself when it is local, else a
    copy in this node's cache, downloaded when missing or when the remote listing changed."""
    loc = location(loc)
    if not is_url(loc):
        return Path(loc)
    sig = listing(loc)
    if not sig:
        raise FileNotFoundError(f"{loc} does not exist (or is an empty prefix)")
    slot = cache_root() / "objects" / hashlib.sha1(loc.encode()).hexdigest()[:20]
    slot.mkdir(parents=True, exist_ok=True)
    target, stamp = slot / name(loc), slot / "listing.json"
    want = json.dumps([loc, sig])
    with FileLock(str(slot / ".lock")):
        if target.exists() and stamp.is_file() and stamp.read_text() == want:
            return target
        tmp = Path(tempfile.mkdtemp(prefix=".dl-", dir=slot)) / name(loc)
        download(loc, tmp)
        stamp.unlink(missing_ok=True)
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        tmp.rename(target)
        shutil.rmtree(tmp.parent, ignore_errors=True)
        stamp.write_text(want)
    return target


def copy_tree(src: str | Path, dst: str | Path) -> None:
    """Copy a directory between two locations of the same or different stores (replacing ``dst``)."""
    sfs, spath = filesystem(src)
    dfs, dpath = filesystem(dst)
    try:
        delete(dst)
        dfs.create_dir(dpath, recursive=True)
        pafs.copy_files(spath, dpath, source_filesystem=sfs, destination_filesystem=dfs)
    except OSError as err:
        raise StorageError(f"cannot copy {location(src)} to {location(dst)}: {err}") from None
