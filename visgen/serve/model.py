"""The model deployment: one loaded bundle (image tokenizer + transformer) per replica.

The image tokenizer and the transformer live in the same replica on purpose. They are one
model version (the bundle's fingerprints tie them together), so a hot reload must switch both
at once; as two deployments, a request could meet the new transformer and the old tokenizer
in the middle of a rollout. Keeping them together also saves a hop per request (codes would
otherwise travel between replicas twice) and lets one ``@serve.batch`` call run prompt →
codes → pixels for the whole batch.

Batching: ``generate`` and ``caption`` requests are grouped by ``@serve.batch`` and then merged
once more by :class:`Coalescer`. Ray Serve forms a batch as soon as its wait window closes and
only then queues it for the (single) model, so under load it cuts many small batches that wait
in line behind the running one (``bench/serve_load.py``: 2.1x over unbatched at 16 clients).
The coalescer puts every waiting request in one line and, whenever the model is free, runs up to
``max_batch_size`` of them in one call, which is one :meth:`visgen.Model.generate_many` (or
``caption``): requests that share sampling settings run as one forward; image j of a request uses
seed ``seed + j``, so a response does not depend on what it was batched with. The replica uses
only the model's public methods and attributes.

Hot reload: the replica follows ``model_uri``. For an alias (``models:/visgen@champion``) it
checks the registry every ``poll_interval_s``; ``reconfigure(user_config)`` (``serve deploy`` with
a new ``user_config``) switches at once. The new version is loaded next to the old one in a
thread, then swapped in with one assignment; each batch holds the model it started with, so
requests in flight finish on the old version and none fail.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from ray import serve

from visgen.serve.config import ServeConfig
from visgen.serve.inputs import encode_png

log = logging.getLogger("ray.serve")


@dataclass
class Served:
    """One loaded model version and what the API reports about it."""

    pipe: Any  # visgen.Model
    info: dict = field(default_factory=dict)
    # The transformer's KV cache is module state: one forward at a time per pipeline.
    lock: threading.Lock = field(default_factory=threading.Lock)


# A loader maps (model_uri, tracking_uri, device) to (pipeline, info); tests inject their own.
Loader = Callable[[str, str | None, str], tuple[Any, dict]]
# A version probe maps (model_uri, tracking_uri) to the version the URI points at now (None: fixed).
Probe = Callable[[str, str | None], str | None]


def load_model(model_uri: str, tracking_uri: str | None, device: str) -> tuple[Any, dict]:
    """Load a registered version (``models:/NAME@ALIAS`` or ``models:/NAME/V``) or a bundle directory."""
    # torch: only a replica loads a model; the ingress imports this module too
    from visgen.inference import Model, read_manifest, resolve_bundle

    if model_uri.startswith("models:/"):
        from visgen.registry import MODEL_NAME, Registry  # mlflow: only registered versions need it

        if tracking_uri is None:
            raise ValueError(f"serving {model_uri} needs a tracking URI (the registry's store)")
        name = model_uri[len("models:/"):].split("@")[0].split("/")[0] or MODEL_NAME
        reg = Registry(tracking_uri, name=name)
        version = reg.resolve_uri(model_uri)
        pipe = reg.load(version.version, device=device)
        info = {"name": name, "version": version.version, "aliases": list(version.aliases),
                "eval": version.eval, "run_id": version.run_id}
    else:  # a bundle directory, or a bundle in an object store (s3://bucket/run/models/bundle)
        local = resolve_bundle(model_uri)
        pipe = Model.load(local, device=device)
        manifest = read_manifest(local)
        info = {"name": model_uri.rstrip("/").rsplit("/", 1)[-1], "version": "local-" + manifest["lm"]["fingerprint"][:12],
                "aliases": [], "eval": {k: str(v) for k, v in (manifest.get("eval") or {}).items()}, "run_id": None}
    return pipe, info


def probe_version(model_uri: str, tracking_uri: str | None) -> str | None:
    """The version an alias URI points at now; None for URIs that cannot move."""
    if not (model_uri.startswith("models:/") and "@" in model_uri) or tracking_uri is None:
        return None
    from visgen.registry import Registry  # torch, mlflow: only alias URIs are probed

    name = model_uri[len("models:/"):].split("@")[0]
    return Registry(tracking_uri, name=name).resolve_uri(model_uri).version


class Coalescer:
    """One model call at a time; each call takes up to ``max_size`` of the oldest waiting jobs.

    ``run(jobs)`` queues the jobs and returns their results. Whoever holds the turn keeps calling
    the model on the head of the line until its own jobs are answered, so jobs queued by other
    callers meanwhile ride along in the same call instead of waiting for their own. A call in
    progress finishes and answers its jobs even if the caller that started it is cancelled.
    """

    def __init__(self, call: Callable[[list[dict]], list[dict]], max_size: int):
        self.call, self.max_size = call, max(1, int(max_size))
        self._line: deque[tuple[dict, asyncio.Future]] = deque()
        self._turn: asyncio.Lock | None = None

    async def run(self, jobs: list[dict]) -> list[dict]:
        loop = asyncio.get_running_loop()
        if self._turn is None:
            self._turn = asyncio.Lock()  # created on the replica's loop, not in __init__
        futures = [loop.create_future() for _ in jobs]
        self._line.extend(zip(jobs, futures))
        async with self._turn:
            while not all(f.done() for f in futures):
                if not self._line:  # ours are in a call whose caller went away; it still answers them
                    await asyncio.wait([f for f in futures if not f.done()])
                    break
                take = [self._line.popleft() for _ in range(min(self.max_size, len(self._line)))]
                await asyncio.shield(self._answer(take))
        failed = [err for err in (f.exception() for f in futures) if err is not None]  # retrieves them all
        if failed:
            raise failed[0]
        return [f.result() for f in futures]

    async def _answer(self, take: list[tuple[dict, asyncio.Future]]) -> None:
        try:
            results = await asyncio.to_thread(self.call, [job for job, _ in take])
            if len(results) != len(take):
                raise RuntimeError(f"the model answered {len(results)} results for {len(take)} jobs")
        except BaseException as err:  # noqa: BLE001 - every waiting job gets the failure, none hangs
            results = [err] * len(take)
        for (_, future), result in zip(take, results):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)


class VisgenModel:
    """Serve deployment body (wrapped by :func:`visgen.serve.app.build_app`)."""

    def __init__(self, cfg: dict, tracking_uri: str | None, loader: Loader | None = None, probe: Probe | None = None):
        import torch  # torch: only a replica needs it; the ingress imports this module too

        self.cfg = ServeConfig.model_validate(cfg)
        torch.set_num_threads(max(1, int(self.cfg.model_num_cpus)))
        self._loader, self._probe = loader or load_model, probe or probe_version
        self._tracking_uri = tracking_uri
        self._model_uri = self.cfg.model_uri
        self._poll_s = self.cfg.poll_interval_s
        self._reload_lock = asyncio.Lock()
        self._last_error: str | None = None
        self._failures = 0  # consecutive batches that failed inside the model
        self._replica = _replica_id()
        self._served = self._load(self._model_uri)
        self._generate_batch.set_max_batch_size(self.cfg.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        self._caption_batch.set_max_batch_size(self.cfg.max_batch_size)
        self._caption_batch.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        # Each model call runs on the version current when it starts (a reload may land between calls).
        self._lines = {
            "generate": Coalescer(lambda jobs: self._guarded(self._served, self._run_generate, jobs), self.cfg.max_batch_size),
            "caption": Coalescer(lambda jobs: self._guarded(self._served, self._run_caption, jobs), self.cfg.max_batch_size),
        }
        self._poller: asyncio.Task | None = None
        self._ensure_poller()

    # -- loading and hot reload -------------------------------------------------------------------
    def _load(self, model_uri: str) -> Served:
        t0 = time.perf_counter()
        pipe, info = self._loader(model_uri, self._tracking_uri, self.cfg.device)
        info = {**info, "model_uri": model_uri, "resolution": pipe.resolution, "grid": list(pipe.grid),
                # how uploads must be made square: as this bundle's training images were
                "image_prep": pipe.image_prep.model_dump(mode="json"),
                "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        log.info("loaded %s version %s in %.1f s", model_uri, info.get("version"), time.perf_counter() - t0)
        compiled = self.cfg.compile_decode is True or (self.cfg.compile_decode == "auto" and pipe.device.type == "cuda")
        if compiled:
            pipe.lm.compile_decode()
        if self.cfg.warmup is True or (self.cfg.warmup == "auto" and compiled):
            info["warmup_s"] = warm_up(pipe, sorted({1, self.cfg.max_batch_size}))
            log.info("warmed %s version %s (compiled decode: %s): %s", model_uri, info.get("version"), compiled,
                     info["warmup_s"])
        return Served(pipe=pipe, info=info)

    async def _switch(self, model_uri: str, version: str | None, why: str) -> None:
        """Load ``model_uri`` beside the current model, then swap it in (requests in flight keep theirs)."""
        async with self._reload_lock:
            if version is not None and version == self._served.info.get("version") and model_uri == self._model_uri:
                return
            try:
                new = await asyncio.to_thread(self._load, model_uri)
            except Exception as err:  # noqa: BLE001 - a bad new version must not take the old one down
                self._last_error = f"{why}: could not load {model_uri}: {type(err).__name__}: {err}"
                log.error("%s; still serving version %s", self._last_error, self._served.info.get("version"))
                return
            old = self._served.info.get("version")
            self._served, self._model_uri, self._last_error = new, model_uri, None
            log.info("%s: switched from version %s to %s", why, old, new.info.get("version"))

    def _ensure_poller(self) -> None:
        if self._poller is not None or self._poll_s <= 0:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # constructed outside the event loop: started by the first health check instead
        self._poller = loop.create_task(self._poll())

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            try:
                version = await asyncio.to_thread(self._probe, self._model_uri, self._tracking_uri)
            except Exception as err:  # noqa: BLE001 - registry down: keep serving what we have
                log.warning("could not resolve %s (%s: %s); still serving version %s", self._model_uri,
                            type(err).__name__, err, self._served.info.get("version"))
                continue
            if version is not None and version != self._served.info.get("version"):
                await self._switch(self._model_uri, version, f"alias of {self._model_uri} moved to version {version}")

    async def reconfigure(self, user_config: dict) -> None:
        """``user_config``: ``model_uri`` (switch to it now, or re-resolve the same alias) and/or ``poll_interval_s``."""
        unknown = set(user_config or {}) - {"model_uri", "poll_interval_s"}
        if unknown:
            raise ValueError(f"user_config keys {sorted(unknown)} are unknown; allowed: model_uri, poll_interval_s")
        cfg = self.cfg.model_copy(update={k: v for k, v in (user_config or {}).items()})
        ServeConfig.model_validate(cfg.model_dump())  # same limits as the spec
        if "poll_interval_s" in user_config:
            self._poll_s = float(user_config["poll_interval_s"])
            if self._poller is not None:
                self._poller.cancel()
                self._poller = None
            self._ensure_poller()
        uri = user_config.get("model_uri", self._model_uri)
        version = await asyncio.to_thread(self._probe, uri, self._tracking_uri) if uri.startswith("models:/") and "@" in uri else None
        if uri != self._model_uri or (version is not None and version != self._served.info.get("version")):
            await self._switch(uri, None, f"reconfigure to {uri}")

    # -- requests ---------------------------------------------------------------------------------
    def info(self) -> dict:
        self._ensure_poller()
        served = self._served
        return {**served.info, "sampling": served.pipe.sampling.model_dump(), "reload_error": self._last_error,
                "replica": self._replica}

    async def generate(self, job: dict) -> dict:
        return await self._generate_batch(job)

    async def caption(self, job: dict) -> dict:
        return await self._caption_batch(job)

    async def edit(self, job: dict) -> dict:
        served = self._served
        return (await asyncio.to_thread(self._guarded, served, self._run_edit, [job]))[0]

    # Up to 4 Serve batches reach the coalescer at once (the default 64 in-flight requests over
    # batches of 16); it merges them, so a busy model's next call is as full as the line allows.
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02, max_concurrent_batches=4)
    async def _generate_batch(self, jobs: list[dict]) -> list[dict]:
        return await self._lines["generate"].run(jobs)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02, max_concurrent_batches=4)
    async def _caption_batch(self, jobs: list[dict]) -> list[dict]:
        return await self._lines["caption"].run(jobs)

    def _guarded(self, served: Served, fn, jobs: list[dict]) -> list[dict]:
        """Run ``fn`` under the model's lock; a failure answers each job with an error, not a dead batch."""
        with served.lock:
            try:
                out = fn(served, jobs)
                self._failures = 0
                return out
            except ValueError as err:  # a request the model itself refuses
                return [{"error": str(err), "status": 422, "version": served.info.get("version")}] * len(jobs)
            except Exception as err:  # noqa: BLE001 - counted; check_health restarts a replica that keeps failing
                self._failures += 1
                log.exception("model call failed (%d in a row)", self._failures)
                return [{"error": f"{type(err).__name__}: {err}", "status": 500,
                         "version": served.info.get("version")}] * len(jobs)

    @staticmethod
    def _run_generate(served: Served, jobs: list[dict]) -> list[dict]:
        # Model.generate_many groups the jobs by sampling settings, one forward per group;
        # image j of a job uses seed + j, so an answer does not depend on its batch.
        from visgen.inference import GenerationRequest  # lazy: it imports torch, which the ingress never needs

        pipe, version = served.pipe, served.info.get("version")
        out: list[dict | None] = [None] * len(jobs)
        requests, at = [], []
        for i, j in enumerate(jobs):
            try:  # a setting this model refuses (object_temperature without a background code) fails its job only
                pipe.resolve_sampling(j.get("cfg_scale"), j.get("temperature"), j.get("top_k"), j.get("top_p"),
                                      j.get("object_temperature"), j.get("object_cfg_scale"), j.get("object_min_p"))
            except ValueError as err:
                out[i] = {"error": str(err), "status": 422, "version": version}
                continue
            requests.append(GenerationRequest(
                prompt=j["prompt"], n=j["n"], seed=j["seed"], cfg_scale=j.get("cfg_scale"),
                temperature=j.get("temperature"), top_k=j.get("top_k"), top_p=j.get("top_p"),
                candidates=j.get("candidates"), object_temperature=j.get("object_temperature"),
                object_cfg_scale=j.get("object_cfg_scale"), object_min_p=j.get("object_min_p")))
            at.append(i)
        for i, ims in zip(at, pipe.generate_many(requests, batch_size=None)):
            out[i] = {"images": [encode_png(im) for im in ims], "version": version, "batch": len(requests)}
        return out

    @staticmethod
    def _run_caption(served: Served, jobs: list[dict]) -> list[dict]:
        # One forward per candidate count in the batch: language, seed and count per job (forced
        # token + blocked script); a job's caption does not depend on what it is batched with.
        pipe, version = served.pipe, served.info.get("version")
        texts = pipe.caption([np.asarray(j["image"], dtype=np.uint8) for j in jobs],
                             language=[j.get("language", "auto") for j in jobs],
                             seed=[j.get("seed", 0) for j in jobs],
                             candidates=[j.get("candidates") for j in jobs], batch_size=None)
        return [{"caption": t, "version": version, "batch": len(jobs)} for t in texts]

    @staticmethod
    def _run_edit(served: Served, jobs: list[dict]) -> list[dict]:
        pipe, version = served.pipe, served.info.get("version")
        out = []
        for j in jobs:
            try:  # a job the model refuses fails alone, not the edits batched with it
                image = pipe.edit(np.asarray(j["image"], dtype=np.uint8), j["prompt"], keep_rows=int(j["keep_rows"]),
                                  seed=j.get("seed", 0), cfg_scale=j.get("cfg_scale"), temperature=j.get("temperature"),
                                  top_k=j.get("top_k"), top_p=j.get("top_p"),
                                  object_temperature=j.get("object_temperature"),
                                  object_cfg_scale=j.get("object_cfg_scale"),
                                  object_min_p=j.get("object_min_p"))
            except ValueError as err:
                out.append({"error": str(err), "status": 422, "version": version})
                continue
            out.append({"images": [encode_png(image)], "version": version})
        return out

    # -- health -----------------------------------------------------------------------------------
    def check_health(self) -> None:
        """Serve calls this every ``health_check_period_s``; raising makes it replace this replica.

        Unhealthy once ``unhealthy_after_failures`` model calls in a row failed: a replica whose
        model keeps raising (a broken device context, corrupted state) does not heal by itself, and
        a fresh replica reloads the model from the registry. Refused requests (4xx) do not count.
        A hot-reload poller that died is restarted here rather than failing the replica.
        """
        if self._poller is not None and self._poller.done() and not self._poller.cancelled():
            err = self._poller.exception()
            log.error("the alias poller stopped (%s: %s); restarting it", type(err).__name__, err)
            self._poller = None
        self._ensure_poller()
        if self._failures >= self.cfg.unhealthy_after_failures:
            raise RuntimeError(f"replica {self._replica}: the model failed {self._failures} calls in a row "
                               f"(limit {self.cfg.unhealthy_after_failures}; the errors are in this replica's log)")


def _replica_id() -> str:
    """Serve's id of this replica (``local`` outside Serve), reported by ``/v1/model``."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - constructed outside a replica (unit tests, local mode)
        return "local"


def warm_up(pipe, batch_sizes: list[int]) -> dict[str, float]:
    """Generate and caption once at each batch size (requests of the shapes a replica serves), so
    that compilation, CUDA graph capture and allocator growth happen before the first request.
    Returns the seconds each took, by ``"generate@B"`` / ``"caption@B"``."""
    times: dict[str, float] = {}
    for b in batch_sizes:
        t0 = time.perf_counter()
        images = pipe.generate(["warm-up"] * b, seed=0, batch_size=b)
        times[f"generate@{b}"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        pipe.caption(images, batch_size=b)
        times[f"caption@{b}"] = round(time.perf_counter() - t0, 3)
    return times
