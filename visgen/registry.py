"""The model registry: bundles become versions of the MLflow registered model ``visgen``.

    version = register_bundle("work/shapes-32/models/bundle", spec.tracking, spec.workdir)
    promote(version, spec.tracking, spec.workdir)      # alias champion -> version, old champion -> previous
    rollback(spec.tracking, spec.workdir)              # champion <-> previous
    pipe = visgen.Model.load("models:/visgen@champion")   # with $MLFLOW_TRACKING_URI pointing at the store

A version's files are the bundle directory, logged as the artifacts (``bundle/``) of one MLflow run
in the tracking experiment; the version's ``source`` is that artifact directory, so
``models:/visgen/<v>`` and ``models:/visgen@<alias>`` download exactly the bundle. Each
registration gets its own run: runs are never resumed here, because re-logging into an existing
run would change the files of a version that is already registered.

Version tags carry what a reader needs to choose a version without downloading it: the headline
evaluation numbers of the manifest (``eval.<name>``), the fingerprints of the three parts, and a
content hash of the bundle (``bundle_sha256``) that makes registering the same files twice return
the existing version instead of a duplicate.

Promotion has one rule, :meth:`Registry.promote_if_better`, used by the pipeline's publish stage
and by scheduled retraining alike: the challenger replaces the champion when it improves the gate
metric (its ``eval.<metric>`` tag, or a score measured just now) by at least the margin in the
metric's direction; a missing or non-finite score never wins over a finite one.

Loading (:func:`load_version`) downloads one *numbered* version, never an alias, so the version a
server reports is the one whose files it loaded, even when the alias moves during the download.
Only safetensors and JSON are read (see :mod:`visgen.inference`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping

from visgen.inference import MANIFEST, TEXT_TOKENIZER_FILE, Model, read_manifest
from visgen.tracking import (TrackingConfig, download_artifacts, is_remote_store, open_run, param_text,
                             resolve_tracking_uri)

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger("visgen.registry")

MODEL_NAME = "visgen"
CHAMPION, PREVIOUS = "champion", "previous"
ARTIFACT_PATH = "bundle"  # where a registration run keeps the bundle
REQUIRED_FILES = (MANIFEST, "lm.safetensors", "lm.json", "image_tokenizer.safetensors", "image_tokenizer.json",
                  TEXT_TOKENIZER_FILE)
_ALIAS = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,254}$")
GATE_TAG = "visgen.gate"  # the promotion decision, on the challenger's version
GateDirection = Literal["higher", "lower"]
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")


@dataclass(frozen=True)
class VersionInfo:
    """What the registry knows about one version (no files downloaded)."""

    name: str
    version: str
    source: str
    run_id: str | None
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    @property
    def eval(self) -> dict[str, str]:
        """The evaluation headline numbers registered with the version (``eval.<name>`` tags)."""
        return {k[len("eval."):]: v for k, v in self.tags.items() if k.startswith("eval.")}

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "source": self.source, "run_id": self.run_id,
                "aliases": list(self.aliases), "eval": self.eval,
                "tags": {k: v for k, v in self.tags.items() if not k.startswith("eval.")}}


@dataclass(frozen=True)
class GateDecision:
    """The promotion rule's verdict on one challenger (see :func:`gate_decision`)."""

    promote: bool
    reason: str
    metric: str
    direction: GateDirection
    margin: float
    challenger: str
    challenger_score: float | None
    champion: str | None
    champion_score: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"promoted": self.promote, "reason": self.reason, "metric": self.metric, "direction": self.direction,
                "margin": self.margin, "challenger": self.challenger, "challenger_score": self.challenger_score,
                "champion": self.champion, "champion_score": self.champion_score}


def gate_decision(metric: str, challenger: str, challenger_score: float | None, champion: str | None,
                  champion_score: float | None, margin: float = 0.0, direction: GateDirection = "higher") -> GateDecision:
    """Whether version ``challenger`` should replace ``champion`` (``None``: there is none) on ``metric``.

    Promote when there is no champion, or when the challenger improves on the champion by at
    least ``margin`` in ``direction`` (``higher``: new - old >= margin; ``lower``: old - new >=
    margin). A missing or non-finite score never promotes over a champion with a finite one;
    when neither has one the champion stays.
    """
    _check_gate(metric, margin, direction)
    new = _finite(challenger_score)
    old = _finite(champion_score)
    rule = f"{metric} ({direction} is better, margin {margin:g})"

    def decide(ok: bool, why: str) -> GateDecision:
        return GateDecision(ok, why, metric, direction, float(margin), str(challenger), new,
                            None if champion is None else str(champion), old)

    if champion is None:
        return decide(True, f"no champion yet: v{challenger} becomes it ({metric} {_show(challenger_score)})")
    if str(champion) == str(challenger):
        return decide(True, f"v{challenger} is already the champion")
    if new is None and old is None:
        return decide(False, f"{rule}: neither challenger v{challenger} ({_show(challenger_score)}) nor champion "
                             f"v{champion} ({_show(champion_score)}) has a finite {metric}: keeping the champion; "
                             f"evaluate both, or gate on a metric they have")
    if new is None:
        return decide(False, f"{rule}: challenger v{challenger} has {_show(challenger_score)}, champion v{champion} "
                             f"has {old:.4f}: an unscored challenger never replaces a scored champion")
    if old is None:
        return decide(True, f"{rule}: challenger v{challenger} {new:.4f}, champion v{champion} has "
                            f"{_show(champion_score)}: the scored challenger replaces it")
    gain = new - old if direction == "higher" else old - new
    ok = gain >= margin - 1e-12 * max(1.0, abs(new), abs(old))  # 0.6 - 0.5 must meet a margin of 0.1
    return decide(ok, f"{rule}: challenger v{challenger} {new:.4f} vs champion v{champion} {old:.4f}: improvement "
                      f"{gain:+.4f} {'>=' if ok else '<'} margin {margin:g}")


def _finite(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _show(x: float | None) -> str:
    return "no score" if x is None else (f"{x:.4f}" if math.isfinite(x) else f"a non-finite score ({x})")


def _check_gate(metric: str, margin: float, direction: str) -> None:
    if not isinstance(metric, str) or not metric.strip():
        raise ValueError(f"the gate metric must be a metric name such as 'geneval_overall', got {metric!r}")
    if direction not in ("higher", "lower"):
        raise ValueError(f"the gate direction must be 'higher' or 'lower' (which way {metric} improves), got {direction!r}")
    if not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise ValueError(f"the gate margin must be a finite number, got {margin!r}")


def score_of(info: VersionInfo, metric: str) -> float | None:
    """The version's ``eval.<metric>`` tag as a number; ``None`` when absent or not a number."""
    raw = info.tags.get(f"eval.{metric}")
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


# ---------------------------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------------------------
class Registry:
    """The registered model ``name`` in the MLflow store at ``tracking_uri`` (also its registry)."""

    def __init__(self, tracking_uri: str, name: str = MODEL_NAME, experiment: str = "visgen",
                 workdir: str | Path | None = None):
        from mlflow import MlflowClient  # mlflow: seconds to import; only a registry in use needs it

        if not name or "/" in name or "@" in name:
            raise ValueError(f"registered model name {name!r} must be non-empty without '/' or '@'")
        self.tracking_uri, self.name, self.experiment = tracking_uri, name, experiment
        # A local directory or an object store URL (see visgen.config.Workdir).
        self.workdir = (str(workdir) if "://" in str(workdir) else Path(workdir).expanduser().resolve()) \
            if workdir is not None else None
        self.client: MlflowClient = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    @classmethod
    def from_config(cls, cfg: TrackingConfig, workdir: str | Path, name: str = MODEL_NAME) -> "Registry":
        """The store the training runs use (``$MLFLOW_TRACKING_URI`` > ``cfg.tracking_uri`` > sqlite under ``workdir``)."""
        return cls(resolve_tracking_uri(cfg, workdir), name=name, experiment=cfg.experiment, workdir=workdir)

    # -- registration ----------------------------------------------------------------------------
    def register(self, bundle_dir: str | Path, tags: Mapping[str, Any] | None = None,
                 verify: bool = True) -> VersionInfo:
        """Log ``bundle_dir`` as the artifacts of a new run and make it a new version of the model.

        ``verify`` loads the bundle on the CPU first (fingerprints, shapes), so a version that
        cannot be served is never registered. The same files registered again return the version
        that already holds them.
        """
        from mlflow.exceptions import MlflowException  # mlflow: only a registry in use needs it

        bundle = Path(bundle_dir).expanduser().resolve()
        manifest = check_bundle(bundle, verify=verify)
        digest = bundle_sha256(bundle)
        self._ensure_model()
        existing = self.client.search_model_versions(f"name = '{self.name}' and tag.bundle_sha256 = '{digest}'")
        if existing:
            mv = max(existing, key=lambda v: int(v.version))
            log.info("bundle %s is already version %s of %r (same files, sha256 %s)", bundle, mv.version, self.name,
                     digest[:12])
            return self.version(mv.version)

        version_tags = {**bundle_tags(manifest), "bundle_sha256": digest,
                        **{str(k): param_text(v) for k, v in (tags or {}).items()}}
        run_name = f"register-{manifest['lm']['fingerprint'][:12]}-{time.strftime('%Y%m%d-%H%M%S')}"
        workdir = self.workdir if self.workdir is not None else bundle.parent
        if not is_remote_store(self.tracking_uri) and self.workdir is None:
            log.warning("no workdir given: artifacts of a new experiment go next to the bundle, under %s", workdir)
        cfg = TrackingConfig(experiment=self.experiment, tracking_uri=self.tracking_uri)
        client, run_id, _ = open_run(cfg, self.tracking_uri, workdir, run_name,
                                     {"visgen.kind": "bundle", "visgen.bundle": str(bundle)})
        try:
            client.log_artifacts(run_id, str(bundle), ARTIFACT_PATH)
            for key, value in _numeric(manifest.get("eval") or {}).items():
                client.log_metric(run_id, f"eval.{key}", value)
            source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{ARTIFACT_PATH}"
            mv = self.client.create_model_version(self.name, source, run_id=run_id, tags=version_tags,
                                                  description=f"bundle {bundle.name} created {manifest.get('created')}")
        except (MlflowException, OSError):
            client.set_terminated(run_id, "FAILED")
            raise
        client.set_terminated(run_id, "FINISHED")
        log.info("registered %s as version %s of %r (run %s)", bundle, mv.version, self.name, run_id)
        return self.version(mv.version)

    def _ensure_model(self) -> None:
        from mlflow.exceptions import MlflowException  # mlflow: only a registry in use needs it

        try:
            self.client.get_registered_model(self.name)
        except MlflowException:
            try:
                self.client.create_registered_model(
                    self.name, description="visgen text <-> image bundles (VQ image tokenizer + transformer)")
            except MlflowException:  # created by someone else in between
                self.client.get_registered_model(self.name)

    # -- aliases ---------------------------------------------------------------------------------
    def version(self, version: str | int) -> VersionInfo:
        """One version's record; a clear error when it does not exist."""
        from mlflow.exceptions import MlflowException  # mlflow: only a registry in use needs it

        v = _version_str(version)
        try:
            mv = self.client.get_model_version(self.name, v)
        except MlflowException:
            known = ", ".join(sorted((str(m.version) for m in self._versions()), key=int)) or "none"
            raise LookupError(f"version {v} of registered model {self.name!r} does not exist "
                              f"(versions: {known}; store {self.tracking_uri})") from None
        return _info(mv)

    def resolve(self, alias: str = CHAMPION) -> VersionInfo:
        """The version an alias points at."""
        from mlflow.exceptions import MlflowException  # mlflow: only a registry in use needs it

        _check_alias(alias)
        try:
            return _info(self.client.get_model_version_by_alias(self.name, alias))
        except MlflowException:
            raise LookupError(f"registered model {self.name!r} has no alias {alias!r} "
                              f"(aliases: {self.aliases() or 'none'}; store {self.tracking_uri}); "
                              f"`visgen promote VERSION` sets {CHAMPION}") from None

    def aliases(self) -> dict[str, str]:
        """``{alias: version}`` of the registered model (empty when it does not exist yet)."""
        from mlflow.exceptions import MlflowException  # mlflow: only a registry in use needs it

        try:
            return {a: str(v) for a, v in self.client.get_registered_model(self.name).aliases.items()}
        except MlflowException:
            return {}

    def promote(self, version: str | int) -> dict[str, str]:
        """Point ``champion`` at ``version``; the champion it replaces becomes ``previous``.

        Promoting the current champion again changes nothing. Returns the aliases afterwards.
        """
        target = self.version(version)
        if target.tags.get("visgen.format") is None and not self._has_manifest(target):
            raise ValueError(f"version {target.version} of {self.name!r} holds no visgen bundle (source {target.source})")
        current = self.aliases().get(CHAMPION)
        if current == target.version:
            log.info("version %s is already %s of %r", target.version, CHAMPION, self.name)
            return self.aliases()
        if current is not None:
            self.client.set_registered_model_alias(self.name, PREVIOUS, current)
        self.client.set_registered_model_alias(self.name, CHAMPION, target.version)
        log.info("%s of %r: version %s (was %s)", CHAMPION, self.name, target.version, current)
        return self.aliases()

    def promote_if_better(self, version: str | int, metric: str, margin: float = 0.0, direction: GateDirection = "higher",
                          *, scores: Mapping[str, float | None] | None = None) -> GateDecision:
        """Promote ``version`` when :func:`gate_decision` says so; the verdict is returned and tagged
        on the version (``visgen.gate``).

        Scores are the versions' ``eval.<metric>`` tags; ``scores`` (``{version: score}``) replaces
        them for the versions it names, e.g. both measured just now on the same held-out shards.
        """
        _check_gate(metric, margin, direction)
        challenger = self.version(version)
        try:
            champion = self.resolve(CHAMPION)
        except LookupError:
            champion = None
        scores = {str(k): v for k, v in (scores or {}).items()}

        def score(info: VersionInfo) -> float | None:
            return _number(scores[info.version]) if info.version in scores else score_of(info, metric)

        decision = gate_decision(metric, challenger.version, score(challenger),
                                 None if champion is None else champion.version,
                                 None if champion is None else score(champion), margin, direction)
        known = sorted(k for k in challenger.eval if score_of(challenger, k) is not None)
        if not decision.promote and decision.challenger_score is None and known:
            decision = dataclasses.replace(decision, reason=f"{decision.reason} (v{challenger.version} has scores "
                                                            f"for: {', '.join(known)})")
        self.client.set_model_version_tag(self.name, challenger.version, GATE_TAG,
                                          f"{'promoted' if decision.promote else 'rejected'}: {decision.reason}")
        if decision.promote:
            self.promote(challenger.version)
        log.info("gate for version %s of %r: %s", challenger.version, self.name, decision.reason)
        return decision

    def rollback(self) -> dict[str, str]:
        """Swap ``champion`` and ``previous``: the last promotion undone (a second rollback redoes it)."""
        aliases = self.aliases()
        if PREVIOUS not in aliases:
            raise LookupError(f"registered model {self.name!r} has no {PREVIOUS!r} alias to roll back to "
                              f"(aliases: {aliases or 'none'})")
        prev, champ = aliases[PREVIOUS], aliases.get(CHAMPION)
        self.client.set_registered_model_alias(self.name, CHAMPION, prev)
        if champ is not None:
            self.client.set_registered_model_alias(self.name, PREVIOUS, champ)
        log.info("rolled back %s of %r: version %s (was %s)", CHAMPION, self.name, prev, champ)
        return self.aliases()

    # -- loading ---------------------------------------------------------------------------------
    def resolve_uri(self, model_uri: str) -> VersionInfo:
        """``models:/visgen@champion`` or ``models:/visgen/3`` → the version record."""
        m = _MODEL_URI.match(model_uri)
        if not m:
            raise ValueError(f"model URI {model_uri!r} must look like models:/{self.name}@{CHAMPION} or models:/{self.name}/3")
        if m["name"] != self.name:
            raise ValueError(f"model URI {model_uri!r} names model {m['name']!r}, this registry serves {self.name!r}")
        return self.resolve(m["alias"]) if m["alias"] else self.version(m["version"])

    def download(self, version: str | int, dst: str | Path) -> Path:
        """The files of one numbered version, downloaded under ``dst``; returns the bundle directory."""
        v = _version_str(version)
        # Resolved here rather than handing MLflow a models:/ URI: its models:/ resolution reads the
        # process-global registry URI and would ignore this registry's store.
        source = self.client.get_model_version_download_uri(self.name, v)
        local = download_artifacts(source, dst, tracking_uri=self.tracking_uri)
        if not (local / MANIFEST).is_file():
            raise FileNotFoundError(f"version {v} of {self.name!r} has no {MANIFEST} at the top of its files")
        return local

    def load(self, version: str | int, device: str = "cpu") -> "Model":
        """A :class:`visgen.Model` of one numbered version (downloaded to a temp dir, removed after loading)."""
        v = _version_str(version)
        tmp = tempfile.mkdtemp(prefix=f"visgen-v{v}-")
        try:
            pipe = Model.load(self.download(v, tmp), device=device)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # the weights are in memory now
        pipe.source = f"models:/{self.name}/{v}"
        return pipe

    def _versions(self):
        return self.client.search_model_versions(f"name = '{self.name}'")

    def _has_manifest(self, info: VersionInfo) -> bool:
        try:
            names = {Path(f.path).name for f in self.client.list_artifacts(info.run_id, ARTIFACT_PATH)} if info.run_id else set()
        except Exception:  # noqa: BLE001 - an unreadable store reads as "no"
            return False
        return MANIFEST in names


# ---------------------------------------------------------------------------------------------
# Functions (what the CLI calls)
# ---------------------------------------------------------------------------------------------
def register_bundle(bundle_dir: str | Path, tracking_cfg: TrackingConfig, workdir: str | Path,
                    name: str = MODEL_NAME, tags: Mapping[str, Any] | None = None, verify: bool = True) -> str:
    """Register a bundle directory as a new version of ``name``; returns the version number."""
    return Registry.from_config(tracking_cfg, workdir, name).register(bundle_dir, tags=tags, verify=verify).version


def promote(version: str | int, tracking_cfg: TrackingConfig, workdir: str | Path,
            name: str = MODEL_NAME) -> dict[str, str]:
    """Move ``champion`` to ``version`` (the old champion becomes ``previous``); returns the aliases."""
    return Registry.from_config(tracking_cfg, workdir, name).promote(version)


def rollback(tracking_cfg: TrackingConfig, workdir: str | Path, name: str = MODEL_NAME) -> dict[str, str]:
    """Swap ``champion`` and ``previous``; returns the aliases."""
    return Registry.from_config(tracking_cfg, workdir, name).rollback()


def resolve_alias(tracking_cfg: TrackingConfig, workdir: str | Path, alias: str = CHAMPION,
                  name: str = MODEL_NAME) -> str:
    """The version number ``alias`` points at."""
    return Registry.from_config(tracking_cfg, workdir, name).resolve(alias).version


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def check_bundle(bundle: Path, verify: bool = True) -> dict:
    """The manifest of a complete bundle directory; refuses missing parts and pickled files."""
    manifest = read_manifest(bundle)  # exists, JSON, right format
    missing = [f for f in REQUIRED_FILES if not (bundle / f).is_file()]
    if missing:
        raise FileNotFoundError(f"bundle {bundle} lacks {', '.join(missing)}: not a complete visgen bundle")
    pickled = sorted(p.name for p in bundle.iterdir() if p.suffix in (".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt"))
    if pickled:
        raise ValueError(f"bundle {bundle} holds pickle-format files {pickled}: bundles carry only safetensors and JSON")
    if verify:
        Model.load(bundle, device="cpu")  # fingerprints and shapes agree, or this raises
    return manifest


def bundle_sha256(bundle: Path) -> str:
    """Content hash over the bundle's files (names and bytes, in name order)."""
    h = hashlib.sha256()
    for p in sorted(q for q in bundle.rglob("*") if q.is_file()):
        h.update(p.relative_to(bundle).as_posix().encode() + b"\0")
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def bundle_tags(manifest: dict) -> dict[str, str]:
    """Version tags from a manifest: eval headline numbers, fingerprints, format and versions."""
    tags = {"visgen.format": str(manifest.get("format")), "visgen.version": str(manifest.get("visgen_version")),
            "created": str(manifest.get("created"))}
    for part in ("lm", "image_tokenizer", "text_tokenizer"):
        fp = (manifest.get(part) or {}).get("fingerprint")
        if fp:
            tags[f"{part}.fingerprint"] = str(fp)
    params = (manifest.get("lm") or {}).get("params")
    if params is not None:
        tags["lm.params"] = str(params)
    for key, value in (manifest.get("eval") or {}).items():
        tags[f"eval.{key}"] = param_text(value)
    if "eval" not in manifest:
        tags["eval.status"] = "not evaluated"
    return tags


def _number(x: Any) -> float | None:
    try:
        return None if x is None or isinstance(x, bool) else float(x)
    except (TypeError, ValueError):
        return None


def _numeric(d: Mapping[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _version_str(version: str | int) -> str:
    v = str(version).strip()
    if not v.isdigit() or int(v) < 1:
        raise ValueError(f"a model version is a positive integer, got {version!r}")
    return str(int(v))


def _check_alias(alias: str) -> None:
    if not isinstance(alias, str) or not _ALIAS.match(alias):
        raise ValueError(f"alias {alias!r} must start with a letter or '_' and hold only letters, digits, '_' and '-'")


def _info(mv) -> VersionInfo:
    return VersionInfo(name=mv.name, version=str(mv.version), source=mv.source, run_id=mv.run_id,
                       tags=dict(mv.tags or {}), aliases=tuple(getattr(mv, "aliases", None) or ()))
