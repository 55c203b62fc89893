"""Where one pipeline's artifacts live: a local directory or an object store URL (see :class:`Workdir`)."""

from __future__ import annotations

import json
from pathlib import Path

from visgen import storage


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
