"""Scheduled retraining behind an evaluation gate.

One retrain (``visgen retrain --pipeline P`` / ``jobs/retrain.py``, run by a schedule):

1. take a lock under the workdir — a second retrain started meanwhile says so and exits 0
   without doing anything, so a schedule can never run two at once;
2. find the shards the champion has not seen (its bundle's manifest lists the shards it was
   trained on); none → exit 0, "nothing new";
3. build the token cache over every shard (new + replayed old ones) with the champion's own
   frozen tokenizers, and continue training the champion's transformer on it for
   ``retrain.steps`` steps (a new Ray Train run; checkpoints, resume and tracking as usual);
4. evaluate challenger and champion on the same held-out shards with the same benchmark;
5. register the challenger; promote it only when it improves on the champion by at least
   ``retrain.margin`` on ``retrain.gate_metric`` in ``retrain.gate_direction``, with both scores
   from step 4 (:meth:`visgen.registry.Registry.promote_if_better`, the rule the pipeline's
   publish stage applies too); the version is tagged with the decision either way. The old
   champion stays as ``previous`` for ``visgen rollback``; Serve replicas follow the alias by
   themselves.

Every decision is written to ``<workdir>/retrain/<stamp>/decision.json`` and returned.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from visgen import storage
from visgen.base import Section, replace
from visgen.data.sources import expand_source, shard_signature
from visgen.eval.bundle import evaluate_bundle
from visgen.eval.tune import tune_bundle
from visgen.runtime import init_ray

log = logging.getLogger("visgen.retrain")


class RetrainConfig(Section):
    """How scheduled retraining continues the champion and when the challenger replaces it."""

    steps: int = Field(200, ge=1, le=10_000_000, description="Optimiser steps continuing the champion on new + replayed data.")
    lr: float = Field(5e-4, gt=0, le=1.0, description="Peak learning rate of the continued training (warmup, then cosine).")
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps of the continued training.")
    gate_metric: str = Field(
        "geneval_overall", min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.\-/]+$",
        description="Evaluation number a new bundle must improve to become the champion (pipeline and retraining), "
                    "e.g. geneval_overall on shapes, heldout_t2i_loss or retrieval_i2t_at1 on other data.")
    gate_direction: Literal["higher", "lower"] = Field(
        "higher", description="Which way gate_metric improves: 'higher' (accuracies) or 'lower' (losses, distances).")
    margin: float = Field(0.0, allow_inf_nan=False, description="Promote only when the new bundle improves "
                          "gate_metric by at least this much in gate_direction (negative: tolerate that much worse).")


class RetrainBusy(RuntimeError):
    """Another retrain holds the lock."""


@contextlib.contextmanager
def retrain_lock(workdir: Path):
    """An exclusive, non-blocking lock on ``<workdir>/retrain.lock`` (released when the process dies)."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "retrain.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = path.read_text(errors="replace").strip() or "unknown"
            raise RetrainBusy(f"another retrain holds {path} ({holder})") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n".encode())
        yield
    finally:
        os.close(fd)


def _shard_key(entry) -> tuple:
    path, size, mtime = (list(entry) + [None, None])[:3]
    return (path, size, mtime)


def unseen_shards(spec, manifest: dict) -> tuple[list[str], list[str]]:
    """(all current shards, those not in the champion's training manifest — new or rewritten)."""
    current = shard_signature(expand_source(spec.data.ingest.source))
    seen = {_shard_key(e) for e in manifest.get("shards") or []}
    return [c[0] for c in current], [c[0] for c in current if _shard_key(c) not in seen]


def _shards_key(spec) -> str:
    """A short hash of the shard list with sizes and mtimes: which data a challenger was trained on."""
    sig = json.dumps(shard_signature(expand_source(spec.data.ingest.source)), sort_keys=True)
    return hashlib.sha256(sig.encode()).hexdigest()[:16]


def retrain(spec, cfg: RetrainConfig | None = None) -> dict:
    """One retrain attempt (see the module docstring); returns the decision record."""
    cfg = cfg or spec.retrain
    wd = spec.paths.root  # the lock is per machine: for an object store workdir, in its local mirror
    try:
        with retrain_lock(wd):
            return _retrain_locked(spec, cfg)
    except RetrainBusy as err:
        log.info("%s: not starting a second one", err)
        return {"status": "busy", "reason": str(err)}


def _retrain_locked(spec, cfg: RetrainConfig) -> dict:
    # torch, Ray: only a retrain that runs needs them, not `visgen retrain --help` (it reads RetrainConfig here)
    from visgen.data.token_cache import build_token_cache
    from visgen.inference import background_record, check_background, read_manifest, write_bundle
    from visgen.models.gpt import load_gpt
    from visgen.registry import CHAMPION, Registry
    from visgen.train.lm import train_lm

    wd = spec.paths.root  # local files of this attempt (the local mirror of an object store workdir)
    reg = Registry.from_config(spec.tracking, spec.workdir)
    try:
        champion = reg.resolve(CHAMPION)
    except LookupError as err:
        raise FileNotFoundError(f"nothing to retrain: {err}") from None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = wd / "retrain" / stamp
    champ_dir = reg.download(champion.version, run_dir / "champion")
    manifest = read_manifest(champ_dir)
    shards, new = unseen_shards(spec, manifest)
    record = {"champion": champion.version, "started": stamp, "shards": len(shards), "new_shards": new}
    if not new:
        shutil.rmtree(run_dir, ignore_errors=True)
        log.info("retrain: the champion (version %s) has seen all %d shards: nothing new to train on",
                 champion.version, len(shards))
        return {**record, "status": "nothing_new"}
    data_key = _shards_key(spec)
    tried = reg.client.search_model_versions(
        f"name = '{reg.name}' and tag.`visgen.parent_version` = '{champion.version}' and tag.`visgen.shards` = '{data_key}'")
    if tried:
        shutil.rmtree(run_dir, ignore_errors=True)
        v = max(tried, key=lambda m: int(m.version))
        why = v.tags.get("visgen.gate", "no decision recorded")
        log.info("retrain: version %s already continued champion %s on exactly these shards (%s): not repeating it",
                 v.version, champion.version, why)
        return {**record, "status": "already_tried", "challenger": str(v.version), "reason": why}
    log.info("retrain: %d new shard(s) since version %s: %s", len(new), champion.version,
             ", ".join(Path(s).name for s in new[:10]))
    init_ray()

    # The champion's own tokenizers, frozen: the challenger differs only in the transformer.
    # What Ray tasks and Train workers read (on any node): in the bucket when the workdir is one.
    shared_champ = spec.paths.location(champ_dir)
    if spec.paths.remote:
        storage.upload(champ_dir, shared_champ)
    cache_dir = spec.paths.location(f"retrain/{stamp}/token_cache")
    cache = build_token_cache(spec.data.ingest, storage.join(shared_champ, "text_tokenizer.json"), shared_champ,
                              cache_dir, spec.token_cache, spec.paths.quarantine)
    print(cache.format(), flush=True)
    model_cfg = load_gpt(champ_dir).cfg
    train_cfg = replace(spec.lm.train, steps=cfg.steps, lr=cfg.lr, warmup_steps=min(cfg.warmup_steps, cfg.steps),
                        checkpoint_every=min(spec.lm.train.checkpoint_every, cfg.steps))
    res = train_lm(model_cfg, spec.lm.recipe, train_cfg, spec.lm.scaling, cache_dir=cache_dir,
                   image_tokenizer_dir=champ_dir, text_tokenizer=champ_dir / "text_tokenizer.json", workdir=spec.workdir,
                   sampling=spec.sampling, tracking=spec.tracking, run_name=f"retrain-{stamp}",
                   params={"retrain": cfg, "parent_version": champion.version}, init_from=champ_dir,
                   export_dir=run_dir / "lm")
    background = background_record(cache_dir, read_manifest(champ_dir)["image_tokenizer"]["fingerprint"])
    check_background(spec.sampling.object_temperature, background, f"the challenger's token cache {cache_dir}")
    challenger_dir = write_bundle(run_dir / "bundle", lm_dir=res.model_dir, image_tokenizer_dir=champ_dir,
                                  text_tokenizer=champ_dir / "text_tokenizer.json", sampling=spec.sampling,
                                  image_prep=spec.data.ingest.image_prep(),  # how its token cache was made
                                  extra={"pipeline": spec.name, "parent_version": champion.version,
                                         "background_code": background,
                                         "shards": shard_signature(expand_source(spec.data.ingest.source))})

    # The challenger's sampling defaults are searched as the pipeline searches them (the champion
    # keeps the choice it was registered with); then the same held-out shards, prompts and seeds for both.
    # The shapes-only benchmarks (and the search, which reads the shapes judge) run on shapes data only.
    search = spec.eval.sampling_search
    searching = search.enabled and spec.eval.shapes
    tuned = tune_bundle(challenger_dir, search, judge=spec.eval.geneval.judge) if searching else None
    kw = dict(ingest=spec.data.ingest, geneval=spec.eval.geneval, captions=spec.eval.captions, workdir=spec.workdir,
              heldout=spec.eval.heldout, shapes=spec.eval.shapes)
    challenger_eval = evaluate_bundle(challenger_dir, eval_dir=run_dir / "eval" / "challenger",
                                      tracking=spec.tracking, run_name=f"retrain-{stamp}",
                                      sampling_search=search if searching else None, search_result=tuned, **kw)
    champion_eval = evaluate_bundle(champ_dir, eval_dir=run_dir / "eval" / "champion", **kw)
    version = reg.register(challenger_dir, tags={"visgen.parent_version": champion.version,
                                                 "visgen.retrain": stamp, "visgen.shards": data_key}).version
    # Both scores as measured just now on the same held-out shards (the champion's registered tags
    # may come from other held-out data).
    decision = reg.promote_if_better(version, cfg.gate_metric, cfg.margin, cfg.gate_direction, scores={
        version: challenger_eval.get(cfg.gate_metric), champion.version: champion_eval.get(cfg.gate_metric)})
    record.update(challenger=version, metric=cfg.gate_metric, direction=cfg.gate_direction,
                  challenger_score=decision.challenger_score, champion_score=decision.champion_score,
                  margin=cfg.margin, steps=res.fit.step, reason=decision.reason,
                  status="promoted" if decision.promote else "rejected", aliases=reg.aliases())
    log.info("retrain: version %s %s: %s", version, record["status"], decision.reason)
    (run_dir / "decision.json").write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")
    spec.paths.push(f"retrain/{stamp}/decision.json", f"retrain/{stamp}/bundle", "mlflow.db")
    return record
