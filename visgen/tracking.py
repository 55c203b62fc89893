"""MLflow tracking behind one thin adapter; this module and :mod:`visgen.registry` alone import MLflow.

Training code calls :meth:`Tracker.start` on every rank; only rank 0 gets a live tracker, the
others get one whose methods return at once. The adapter alone decides how params, metrics,
images and artifacts are named in MLflow.

Three rules shape it:

* **Explicit run ids, no global state.** Everything goes through ``mlflow.MlflowClient`` with the
  run id, never the fluent ``mlflow.start_run`` API, because the tracker lives inside Ray worker
  processes and several trackers may share one process (tests, eval next to training).
* **A run is named, and a name is resumable.** Starting with a ``run_name`` that already exists
  (not deleted) in the experiment continues that MLflow run, so re-running a Ray Train job with
  the same ``RunConfig(name=...)`` appends to the same curves instead of opening a new run.
* **Tracking never stops training.** An unreachable server (at start or mid-run) or any MLflow
  error inside a log call is reported once through ``logging`` and turns the tracker into a
  no-op. MLflow's HTTP client is bounded so that a dead server costs seconds, not minutes
  (see :func:`_bound_http_client`).

Other modules reach MLflow through public functions here: :func:`open_run` (a run that must
exist, e.g. a registration), :func:`download_artifacts` (``runs:/`` and ``models:/`` URIs),
:func:`param_text` (how values are spelled) and :func:`is_remote_store`.

Where runs go (:func:`resolve_tracking_uri`): ``$MLFLOW_TRACKING_URI`` if set, else the spec's
``tracking_uri``, else a sqlite database ``<workdir>/mlflow.db`` with artifacts under
``<workdir>/mlartifacts``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from visgen.base import Section
from visgen.workdir import Workdir

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

DB_NAME = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
RunStatus = Literal["FINISHED", "FAILED", "KILLED"]

# Image keys become artifact file names and UI chart names; MLflow accepts only these characters.
_IMAGE_KEY = re.compile(r"^[A-Za-z0-9_\-./ ]+$")
# Schemes of tracking servers, which pick a new experiment's artifact root themselves. Any other
# store this process writes itself, and without an explicit location MLflow would put artifacts
# under ./mlruns of whatever the CWD is.
_REMOTE_SCHEMES = ("http", "https", "databricks", "databricks-uc", "uc")


class TrackingConfig(Section):
    """Where and how training runs are recorded in MLflow."""

    experiment: str = Field("visgen", min_length=1, max_length=500,
                            description="MLflow experiment that holds the runs (created on first use).")
    tracking_uri: str | None = Field(None, min_length=1,
                                     description="MLflow tracking URI; None = sqlite:///<workdir>/mlflow.db. "
                                                 "$MLFLOW_TRACKING_URI overrides it.")
    log_images_every: int = Field(500, ge=0, le=100_000_000,
                                  description="Log image grids (e.g. reconstructions) every this many steps; 0 = never.")
    request_timeout_s: float = Field(3.0, gt=0, le=60,
                                     description="Timeout of each request to a tracking server (and of the reachability probe).")
    enabled: bool = Field(True, description="Record runs at all; False makes every tracker a no-op.")


def resolve_tracking_uri(cfg: TrackingConfig, workdir: str | Path) -> str:
    """The tracking URI to use: ``$MLFLOW_TRACKING_URI`` > ``cfg.tracking_uri`` > sqlite under ``workdir``.

    The sqlite path is absolute, so the URI means the same thing in a Ray worker whose CWD differs.
    """
    env_uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env_uri:
        return env_uri
    if cfg.tracking_uri:
        return cfg.tracking_uri
    # A remote workdir (s3://...) keeps the sqlite store in its local mirror: sqlite needs a file.
    return f"sqlite:///{Workdir(workdir).root / DB_NAME}"


def is_remote_store(uri: str) -> bool:
    """Whether ``uri`` names a tracking server (``http(s)``, Databricks) rather than a store this
    process writes itself (sqlite, a local path).

    A server chooses where a new experiment's artifacts go; for a local store the caller must
    name the directory (:func:`open_run` puts it under the workdir), or MLflow would use
    ``./mlruns`` of whatever the current directory is. Remote stores also get a bounded HTTP client.
    """
    return uri.split(":", 1)[0].lower() in _REMOTE_SCHEMES


def _bound_http_client(timeout_s: float) -> None:
    """Bound MLflow's REST client so that a dead server costs seconds, not minutes.

    MLflow's defaults (120 s per request, 7 retries, backoff factor 2: sleeps 4, 8, ..., 120 s)
    make one call to a dead server block for minutes. With 2 retries, backoff factor 1 and the
    configured timeout, a refused connection fails in about 2.5 s (sleeps of 0 and 2 s plus up
    to 0.5 s of jitter) and a black-holed host in about 3 x timeout + 2.5 s, after which the
    tracker disables itself; a single transient 5xx or dropped connection is still retried.

    MLflow reads these variables on every request, so setting them here takes effect for the
    client created next. Values the user exported win (``setdefault``).
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, math.ceil(timeout_s))))  # MLflow parses an int
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "0.5")


def _probe(uri: str, timeout_s: float) -> str | None:
    """One GET of ``<uri>/health`` without retries. None if anything answered, else why not.

    Any HTTP status counts as reachable (a proxy may 404 the path; auth errors are MLflow's to
    report), and so does a TLS failure: the server is there, and MLflow applies its own TLS
    settings (``MLFLOW_TRACKING_INSECURE_TLS``, ...) that this probe does not know about.
    """
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
            return None
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as err:
        if isinstance(err.reason, ssl.SSLError):
            return None
        return str(err.reason)
    except (TimeoutError, OSError) as err:
        return f"{type(err).__name__}: {err}" if str(err) else f"no answer within {timeout_s:g} s"


# -- flattening and image helpers ------------------------------------------------------------

def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Enum):
        return value.value
    return str(value)  # Path, datetime, ...: their readable form


def param_text(value: Any) -> str:
    """A param or tag value as MLflow stores it: strings as they are, scalars and lists in JSON
    spelling (``true``, ``null``, ``[1, 2]``), enums by value; not cut to MLflow's length limits.

    The one spelling of values in this package's runs and model versions, so a tag written by
    the registry reads like the same param logged by a tracker.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, Enum):
        value = value.value
    if value is None or isinstance(value, (bool, int, float, list, tuple, dict)):
        return json.dumps(value, default=_json_default, ensure_ascii=False)
    return str(value)


def flatten(nested: Mapping[str, Any] | BaseModel, sep: str = ".") -> dict[str, str]:
    """Flatten a spec into MLflow params: ``{"vq": {"codebook": 8}}`` -> ``{"vq.codebook": "8"}``.

    Pydantic models (at the top or nested in dicts) are dumped first; lists stay one param in
    JSON form (``"[1, 1, 2]"``), so a preset's channel multipliers read as one value; an empty
    mapping is kept as ``"{}"`` so that its key does not vanish.
    """
    if not sep:
        raise ValueError("flatten: sep must be a non-empty string")
    if isinstance(nested, BaseModel):
        nested = nested.model_dump(mode="json")
    if not isinstance(nested, Mapping):
        raise TypeError(f"flatten expects a mapping or a pydantic model, got {type(nested).__name__}")
    out: dict[str, str] = {}

    def walk(node: Mapping[str, Any], prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{sep}{key}" if prefix else str(key)
            if isinstance(value, BaseModel):
                value = value.model_dump(mode="json")
            if isinstance(value, Mapping) and value:
                walk(value, name)
            else:
                out[name] = param_text(dict(value) if isinstance(value, Mapping) else value)

    walk(nested, "")
    return out


def make_grid(images: np.ndarray, nrow: int = 8, padding: int = 2, pad_value: int = 0) -> np.ndarray:
    """Tile a batch of uint8 images into one image for logging.

    images: (B, H, W, C) uint8 with C in {1, 3}, or (B, H, W) grayscale. Returns
    (rows*(H+p)+p, cols*(W+p)+p, 3) uint8 with ``cols = min(nrow, B)`` and ``p = padding``;
    images fill the grid row by row, empty cells keep ``pad_value``.
    """
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise TypeError(f"make_grid expects a uint8 numpy array, got "
                        f"{type(images).__name__}{'' if not isinstance(images, np.ndarray) else ' of ' + str(images.dtype)}")
    if images.ndim == 3:
        images = images[..., None]  # (B, H, W, 1)
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"make_grid expects images of shape (B>0, H, W, 1|3), got {images.shape}")
    if nrow < 1 or padding < 0 or not 0 <= pad_value <= 255:
        raise ValueError(f"make_grid: need nrow >= 1, padding >= 0, 0 <= pad_value <= 255; "
                         f"got nrow={nrow}, padding={padding}, pad_value={pad_value}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)  # (B, H, W, 3)
    b, h, w, _ = images.shape
    cols = min(nrow, b)
    rows = math.ceil(b / cols)
    grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, 3), pad_value, np.uint8)
    for i in range(b):
        y = padding + (i // cols) * (h + padding)
        x = padding + (i % cols) * (w + padding)
        grid[y:y + h, x:x + w] = images[i]
    return grid


# -- the adapter -----------------------------------------------------------------------------

class Tracker:
    """One MLflow run, seen from rank 0. Build it with :meth:`Tracker.start`.

    Every method is a no-op on an inactive tracker (rank != 0, tracking disabled, or after a
    failure), and returns immediately without looking at its arguments, so non-zero ranks pay
    nothing. Arguments that are wrong by construction (a float image, a bad status) raise on an
    active tracker; failures of the outside world (server, disk) are reported once and disable it.

    Also a context manager: ``with Tracker.start(...) as t:`` ends the run FINISHED, or FAILED
    (KILLED on Ctrl-C) when the block raises.
    """

    def __init__(self, cfg: TrackingConfig | None = None):
        """An inactive tracker; :meth:`start` makes live ones."""
        self._client: MlflowClient | None = None
        self.run_id: str | None = None
        self._cfg = cfg or TrackingConfig(enabled=False)
        self._params: dict[str, str] = {}  # what the run holds, to skip re-logs on resume
        self._warned = False

    @property
    def active(self) -> bool:
        """True while calls reach MLflow: rank 0, enabled, started, not failed, not ended."""
        return self._client is not None

    # -- lifecycle ---------------------------------------------------------------------------
    @classmethod
    def start(cls, cfg: TrackingConfig, workdir: str | Path, run_name: str,
              params: Mapping[str, Any] | None = None, rank: int = 0,
              tags: Mapping[str, Any] | None = None) -> "Tracker":
        """Start (or resume) the run ``run_name`` in ``cfg.experiment``; a no-op tracker unless rank 0.

        Resume: the newest non-deleted run of that name in the experiment is continued (status set
        back to RUNNING), so a re-run job with the same name appends to the same run id.
        ``params`` (flat, see :func:`flatten`) and ``tags`` are logged right away. Never raises
        because of MLflow: an unreachable server or a failing store gives an inactive tracker and
        one warning. ``workdir`` holds the default sqlite store; pass an absolute path from the
        driver, since a Ray worker's CWD is not the driver's.
        """
        if not isinstance(run_name, str) or not run_name.strip():
            raise ValueError(f"Tracker.start: run_name must be a non-empty string, got {run_name!r}")
        if "'" in run_name and '"' in run_name:
            raise ValueError(f"Tracker.start: run_name {run_name!r} may contain single or double quotes, not both")
        if rank != 0 or not cfg.enabled:
            return cls()

        uri = resolve_tracking_uri(cfg, workdir)
        tracker = cls(cfg=cfg)
        try:
            if is_remote_store(uri):
                _bound_http_client(cfg.request_timeout_s)
                if uri.split(":", 1)[0].lower() in ("http", "https"):
                    t0 = time.perf_counter()
                    why = _probe(uri, cfg.request_timeout_s)
                    if why is not None:
                        tracker._disable(f"cannot reach the tracking server {uri} ({why}, "
                                         f"{time.perf_counter() - t0:.1f} s)")
                        return tracker
            client, run_id, logged = open_run(cfg, uri, workdir, run_name, tags)
        except Exception as err:  # noqa: BLE001 - any store/server failure must leave training running
            tracker._disable(f"could not start run {run_name!r} in experiment {cfg.experiment!r} at {uri}", err)
            return tracker
        tracker._client, tracker.run_id, tracker._params = client, run_id, logged
        if params:
            tracker.log_params(params)
        return tracker

    def end(self, status: RunStatus = "FINISHED") -> None:
        """Mark the run terminated with ``status``; later calls on this tracker are no-ops."""
        if not self.active:
            return
        if status not in ("FINISHED", "FAILED", "KILLED"):
            raise ValueError(f"Tracker.end: status must be FINISHED, FAILED or KILLED, got {status!r}")
        self._call("end the run", self._client.set_terminated, self.run_id, status)
        self._client = None

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    # -- logging -----------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log flat params (values stringified, cut to MLflow's length limit).

        MLflow refuses to change a logged param, so on a resumed run a param already logged with
        the same value is skipped and one with a different value is skipped with a warning.
        """
        if not self.active:
            return
        from mlflow.entities import Param  # mlflow: seconds to import; only a run that logs needs it
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        new: dict[str, str] = {}
        changed: list[str] = []
        for key, value in params.items():
            key, text = str(key), param_text(value)[:MAX_PARAM_VAL_LENGTH]
            old = self._params.get(key)
            if old is None:
                new[key] = text
            elif old != text:
                changed.append(f"{key}: logged {_short(old)}, now {_short(text)}")
        if changed:
            logger.warning("MLflow run %s keeps its first value of %d changed param(s) (MLflow params are "
                           "immutable; start a new run name to record the new ones): %s",
                           self.run_id, len(changed), "; ".join(changed))
        items = [Param(k, v) for k, v in new.items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            if not self._call("log params", self._client.log_batch, self.run_id,
                              params=items[i:i + MAX_PARAMS_TAGS_PER_BATCH], synchronous=True):
                return
        self._params.update(new)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Log scalar metrics at ``step`` (values are anything ``float()`` accepts: tensors, numpy)."""
        if not self.active:
            return
        from mlflow.entities import Metric  # mlflow: seconds to import; only a run that logs needs it
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise TypeError(f"log_metrics: step must be an int, got {step!r}")
        ts = int(time.time() * 1000)
        items = []
        for key, value in metrics.items():
            try:
                items.append(Metric(str(key), float(value), ts, int(step)))
            except (TypeError, ValueError) as err:
                raise TypeError(f"log_metrics: metric {key!r} = {value!r} is not a scalar ({err})") from None
        for i in range(0, len(items), MAX_METRICS_PER_BATCH):
            if not self._call("log metrics", self._client.log_batch, self.run_id,
                              metrics=items[i:i + MAX_METRICS_PER_BATCH], synchronous=True):
                return

    def wants_images(self, step: int) -> bool:
        """Whether an image logged at ``step`` would be recorded: lets callers skip rendering grids."""
        every = self._cfg.log_images_every
        return self.active and every > 0 and step % every == 0

    def log_image(self, image: np.ndarray, name: str, step: int) -> None:
        """Log an RGB image (H, W, 3) uint8 as a step of the image series ``name`` (UI step slider)."""
        if not self.active:
            return
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            desc = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
            raise ValueError(f"log_image({name!r}): expected a uint8 array of shape (H, W, 3), got {desc}; "
                             f"make_grid() tiles a batch into one such image")
        if not _IMAGE_KEY.match(name):
            raise ValueError(f"log_image: name {name!r} may only use letters, digits, '_', '-', '.', ' ' and '/'")
        self._call("log an image", self._client.log_image, self.run_id, image, key=name, step=int(step),
                   synchronous=True)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file (to ``artifact_path/<file name>``) or a directory's contents (to ``artifact_path/``).

        A path that does not exist is warned about and skipped (tracking stays on).
        """
        if not self.active:
            return
        p = Path(local_path)
        if p.is_dir():
            self._call(f"log artifact directory {str(p)!r}", self._client.log_artifacts, self.run_id, str(p), artifact_path)
        elif p.is_file():
            self._call(f"log artifact {str(p)!r}", self._client.log_artifact, self.run_id, str(p), artifact_path)
        else:
            logger.warning("MLflow run %s: artifact %r does not exist; skipped", self.run_id, str(p))

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        """Log ``data`` as the JSON artifact ``name`` (``.json`` is appended if missing); numpy values become numbers."""
        if not self.active:
            return
        name = name if name.endswith(".json") else name + ".json"
        text = json.dumps(data, indent=2, ensure_ascii=False, default=_json_default, allow_nan=True)
        self._call(f"log {name!r}", self._client.log_text, self.run_id, text, name)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values stringified like params and cut to MLflow's limit; tags may change)."""
        if not self.active:
            return
        from mlflow.entities import RunTag  # mlflow: seconds to import; only a run that logs needs it
        from mlflow.utils.validation import MAX_PARAMS_TAGS_PER_BATCH, MAX_TAG_VAL_LENGTH

        items = [RunTag(str(k), param_text(v)[:MAX_TAG_VAL_LENGTH]) for k, v in tags.items()]
        for i in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
            if not self._call("set tags", self._client.log_batch, self.run_id,
                              tags=items[i:i + MAX_PARAMS_TAGS_PER_BATCH], synchronous=True):
                return

    # -- failure handling --------------------------------------------------------------------
    def _call(self, what: str, fn, *args, **kwargs) -> bool:
        """Run one MLflow call; on any error report once, go inactive, and return False."""
        try:
            fn(*args, **kwargs)
            return True
        except Exception as err:  # noqa: BLE001 - tracking must never take training down
            self._disable(f"failed to {what} in run {self.run_id}", err)
            return False

    def _disable(self, what: str, err: BaseException | None = None) -> None:
        self._client = None
        if not self._warned:
            self._warned = True
            detail = f": {type(err).__name__}: {_short(str(err), 500)}" if err is not None else ""
            logger.warning("MLflow tracking disabled, training continues without it: %s%s", what, detail)


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def open_run(cfg: TrackingConfig, uri: str, workdir: str | Path, run_name: str,
             tags: Mapping[str, Any] | None = None) -> tuple[MlflowClient, str, dict[str, str]]:
    """Get or create the experiment ``cfg.experiment`` in the store at ``uri``, then resume the
    newest active run named ``run_name`` (status back to RUNNING, ``tags`` set) or create it.

    Returns ``(client, run_id, params the run already holds)``. Unlike :meth:`Tracker.start`
    this raises on any MLflow failure and ignores ``cfg.enabled``: it is for callers whose run
    must exist (the registry's registration runs), and the caller ends the run
    (``client.set_terminated``). For a local store the experiment's artifacts go under
    ``<workdir>/mlartifacts`` (see :func:`is_remote_store`).
    """
    from mlflow import MlflowClient  # mlflow: seconds to import; only a run that logs needs it
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

    artifact_location = None
    if not is_remote_store(uri):
        wd = Workdir(workdir)
        wd.root.mkdir(parents=True, exist_ok=True)  # holds the sqlite file
        if wd.remote:  # an object store workdir: the artifacts go to the bucket (MLflow's S3 / GCS stores)
            artifact_location = wd.location(ARTIFACT_DIR)
        else:
            artifact_dir = wd.root / ARTIFACT_DIR
            artifact_dir.mkdir(parents=True, exist_ok=True)
            artifact_location = artifact_dir.as_uri()
    client = MlflowClient(tracking_uri=uri)

    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        try:
            exp_id = client.create_experiment(cfg.experiment, artifact_location=artifact_location)
        except MlflowException:
            # Another job created it between our lookup and create; anything else re-raises below.
            exp = client.get_experiment_by_name(cfg.experiment)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    elif exp.lifecycle_stage == "deleted":
        raise RuntimeError(f"experiment {cfg.experiment!r} is deleted; restore it "
                           f"(`mlflow experiments restore --experiment-id {exp.experiment_id}`) or set tracking.experiment")
    else:
        exp_id = exp.experiment_id

    quote = "'" if "'" not in run_name else '"'
    found = client.search_runs([exp_id], filter_string=f"attributes.run_name = {quote}{run_name}{quote}",
                               run_view_type=ViewType.ACTIVE_ONLY, max_results=1,
                               order_by=["attributes.start_time DESC"])
    tag_strs = {str(k): param_text(v)[:MAX_TAG_VAL_LENGTH] for k, v in (tags or {}).items()}
    if found:
        run = found[0]
        client.update_run(run.info.run_id, status="RUNNING")
        for k, v in tag_strs.items():
            client.set_tag(run.info.run_id, k, v)
        logger.info("resuming MLflow run %r (%s) in experiment %r", run_name, run.info.run_id, cfg.experiment)
        return client, run.info.run_id, dict(run.data.params)
    run = client.create_run(exp_id, run_name=run_name, tags=tag_strs)
    logger.info("started MLflow run %r (%s) in experiment %r at %s", run_name, run.info.run_id, cfg.experiment, uri)
    return client, run.info.run_id, {}


def download_artifacts(artifact_uri: str, dst: str | Path, tracking_uri: str | None = None) -> Path:
    """Download an MLflow artifact URI (``runs:/<id>/<path>``, ``models:/<name>@<alias>``, a store's
    own ``s3://`` / ``file://`` location) into the directory ``dst``; returns the local path.

    ``tracking_uri`` names the store that resolves ``runs:/`` and ``models:/`` URIs (default:
    ``$MLFLOW_TRACKING_URI`` / the process's current one). MLflow errors propagate: a reader that
    asked for files cannot go on without them.
    """
    import mlflow  # lazy: MLflow costs seconds to import and most callers never download

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(dst),
                                                    tracking_uri=tracking_uri))
