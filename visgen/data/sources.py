"""Shard specs: turn the ``source`` string of a pipeline spec into an ordered list of tar shards.

A spec is one of

* a directory: every ``*.tar`` directly inside it (img2dataset's ``*.parquet`` /
  ``*_stats.json`` side files are not shards), sorted by name;
* a glob: ``shards/*.tar``, ``data/part-??/*.tar``; the matching files, sorted;
* a brace range or list: ``shards/{00000..00099}.tar``, ``{a,b}/*.tar`` (expanded with
  ``braceexpand`` first; each alternative is then read as a file, directory or glob);
* any of the above behind a URL: ``file:///abs/shards``, ``s3://bucket/laion/{00000..09999}.tar``,
  ``gs://bucket/shards/*.tar``.

Directory listings and globs skip names starting with ``.`` or ``_``: writers stage partial
shards under such names (``.00003.tar.tmp``), and Ray's own listing skips them too.

Order is meaningful: the last ``holdout_shards`` of the list form the held-out split, so the
list keeps brace order across alternatives and sorts within each directory or glob.

Local paths (and ``file://`` URLs) come back as absolute local paths. Object-store URLs are
expanded with ``fsspec`` (``s3fs`` for ``s3://``, ``gcsfs`` for ``gs://``, installed by the
``cloud`` extra) and come back as full URLs; credentials come from the usual environment
(``AWS_*``, ``GOOGLE_APPLICATION_CREDENTIALS``, instance metadata). Literal object paths named
by a brace range are checked with one listing per parent prefix, not one request per shard.

A spec that matches nothing, or names a literal shard that does not exist, is an error that
quotes the spec: training on silently fewer shards than asked for is worse than stopping.
"""

from __future__ import annotations

import glob as globlib
import os
import posixpath
from collections import defaultdict
from urllib.parse import urlparse

from braceexpand import braceexpand

from visgen.base import SpecError

_GLOB_CHARS = ("*", "?", "[")
_LOCAL_SCHEMES = ("", "file")


def _scheme(spec: str) -> str:
    head, sep, _ = spec.partition("://")
    return head.lower() if sep and head.isidentifier() else ""


def _has_glob(pattern: str) -> bool:
    return any(c in pattern for c in _GLOB_CHARS)


def _is_hidden(name: str) -> bool:
    # Writers stage partial files under such names (".00003.tar.tmp", "_tmp.tar"); Ray's own
    # file listing skips them the same way.
    return name.rstrip("/").rsplit("/", 1)[-1].startswith((".", "_"))


def _is_shard_name(name: str) -> bool:
    return name.lower().endswith(".tar") and not _is_hidden(name)


def _local_path(pattern: str, spec: str) -> str:
    """A local pattern or ``file://`` URL → an absolute local path pattern."""
    if _scheme(pattern) == "file":
        url = urlparse(pattern)
        if url.netloc not in ("", "localhost"):
            raise SpecError(f"source {spec!r}: file:// URLs must be absolute (file:///abs/path), "
                            f"got host {url.netloc!r}")
        pattern = url.path
    return os.path.abspath(os.path.expanduser(pattern))


def _expand_local(patterns: list[str], spec: str) -> list[str]:
    found: list[str] = []
    missing: list[str] = []
    for pattern in patterns:
        path = _local_path(pattern, spec)
        if _has_glob(path):
            found += sorted(p for p in globlib.glob(path) if os.path.isfile(p) and not _is_hidden(p))
        elif os.path.isdir(path):
            found += sorted(os.path.join(path, n) for n in os.listdir(path)
                            if _is_shard_name(n) and os.path.isfile(os.path.join(path, n)))
        elif os.path.isfile(path):
            found.append(path)
        else:
            missing.append(path)
    return _finish(found, missing, spec)


def _expand_remote(patterns: list[str], spec: str, scheme: str) -> list[str]:
    import fsspec  # fsspec (0.1 s): only URL sources need it

    try:
        fs, _ = fsspec.core.url_to_fs(patterns[0])
    except ImportError as err:
        extra = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs"}.get(scheme)
        hint = f" (pip install {extra}, or install visgen with the 'cloud' extra)" if extra else ""
        raise SpecError(f"source {spec!r}: no filesystem for {scheme}:// URLs{hint}: {err}") from None
    except ValueError as err:
        raise SpecError(f"source {spec!r}: unknown URL scheme {scheme!r}: {err}") from None

    def url(path: str) -> str:
        return path if _scheme(path) else f"{scheme}://{path}"

    found: list[str] = []
    literal: list[str] = []
    for pattern in patterns:
        path = fs._strip_protocol(pattern)
        if _has_glob(path):
            found += [url(p) for p in sorted(fs.glob(path)) if not _is_hidden(p) and not fs.isdir(p)]
        elif not _is_shard_name(path) and fs.isdir(path):
            found += [url(p) for p in sorted(fs.ls(path, detail=False)) if _is_shard_name(p)]
        else:  # a shard named literally: checked below, batched per parent prefix
            literal.append(path)

    # One listing per parent prefix instead of one HEAD request per shard: a brace range over
    # 10k objects is 10k round trips otherwise.
    by_parent: dict[str, list[str]] = defaultdict(list)
    for path in literal:
        by_parent[posixpath.dirname(path)].append(path)
    present: set[str] = set()
    for parent in by_parent:
        try:
            present.update(p.rstrip("/") for p in fs.ls(parent, detail=False))
        except FileNotFoundError:
            pass
    missing = [url(p) for p in literal if p not in present]
    found += [url(p) for p in literal if p in present]
    return _finish(found, missing, spec)


def _finish(found: list[str], missing: list[str], spec: str) -> list[str]:
    if missing:
        shown = ", ".join(repr(m) for m in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise SpecError(f"source {spec!r}: {len(missing)} named shard(s) do not exist: {shown}")
    shards = list(dict.fromkeys(found))  # drop repeats (overlapping globs), keep first position
    if not shards:
        raise SpecError(f"source {spec!r} matched no shards: expected a directory holding *.tar files, "
                        f"a glob, a brace range like shards/{{00000..00009}}.tar, or an s3:// / gs:// URL of those")
    return shards


def expand_source(spec: str) -> list[str]:
    """Expand a shard spec into the ordered list of shard paths/URLs it names.

    Raises :class:`~visgen.config.SpecError` naming the spec when nothing matches or a shard
    named literally is missing.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"source {spec!r}: empty shard spec; give a directory, glob, brace range or URL")
    spec = spec.strip()
    try:
        patterns = list(braceexpand(spec))
    except Exception as err:  # braceexpand raises its own error type on unbalanced braces
        raise SpecError(f"source {spec!r}: bad brace expression: {err}") from None
    schemes = {_scheme(p) for p in patterns}
    if len(schemes) > 1:
        raise SpecError(f"source {spec!r}: mixes URL schemes {sorted(schemes)}; use one storage backend per spec")
    scheme = schemes.pop()
    if scheme in _LOCAL_SCHEMES:
        return _expand_local(patterns, spec)
    return _expand_remote(patterns, spec, scheme)


def shard_signature(paths: list[str]) -> list[list]:
    """``[path, size, mtime_ns]`` per shard, in order: the one signature every reuse check compares
    (text tokenizer, token cache, bundle, held-out set, retraining's "new shards").

    Any added, removed, rewritten or reordered shard changes it. Object-store URLs use the store's
    size and modification time when it reports them; a shard that cannot be reached right now
    gets ``[path, None, None]``.
    """
    sig = []
    for p in paths:
        try:
            if "://" in p:
                from pyarrow import fs as pafs  # lazy: only object-store shards need it

                fs, path = pafs.FileSystem.from_uri(p)
                info = fs.get_file_info(path)
                sig.append([p, info.size, info.mtime_ns])
            else:
                st = os.stat(p)
                sig.append([p, st.st_size, st.st_mtime_ns])
        except (OSError, ValueError, ImportError):  # unreachable right now: the name is what we have
            sig.append([p, None, None])
    return sig


def split_shards(shards: list[str], holdout_shards: int, split: str) -> list[str]:
    """The shards of one split: the last ``holdout_shards`` are held out, the rest train.

    ``split`` is ``'train'``, ``'holdout'`` or ``'all'``.
    """
    if split not in ("train", "holdout", "all"):
        raise ValueError(f"split {split!r} is not one of 'train', 'holdout', 'all'")
    if split == "all":
        return list(shards)
    if holdout_shards >= len(shards) and split == "train":
        raise SpecError(f"holdout_shards={holdout_shards} leaves no training shards: the source has only "
                        f"{len(shards)} shard(s); lower holdout_shards or add shards")
    if split == "holdout":
        if holdout_shards == 0:
            raise SpecError("split 'holdout' asked for, but holdout_shards is 0; set holdout_shards >= 1")
        return list(shards[-holdout_shards:])
    return list(shards[: len(shards) - holdout_shards])
