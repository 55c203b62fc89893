"""The pipeline's stages, each a function of the spec that returns its durable artifact.

Each stage hands every component only its own section of the spec. The CLI and the
``jobs/*.py`` entry points are thin wrappers over these functions.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from pathlib import Path

import requests

from visgen import storage
from visgen.config import PipelineSpec, SpecError
from visgen.data import ingest as data_ingest
from visgen.data.images import ImagePrep
from visgen.data.sources import expand_source, shard_signature
from visgen.data.synth import synthesize
from visgen.data.token_cache import TokenCacheError, build_token_cache
from visgen.eval import bundle as bundle_eval, tune
from visgen.inference import background_record, check_background, read_manifest, write_bundle
from visgen.models.gpt import CONFIG_FILE as LM_JSON
from visgen.models.vq import CONFIG_FILE as VQ_JSON
from visgen.registry import Registry
from visgen.runtime import init_ray
from visgen.text.tokenizer import PRE_TOKENIZATION, SPECIAL_TOKENS, TextTokenizer, train_text_tokenizer
from visgen.tracking import resolve_tracking_uri
from visgen.train import image_tokenizer, lm as lm_training

log = logging.getLogger("visgen")


def synth(spec: PipelineSpec, overwrite: bool = False):
    """Generate the shapes shards named by ``data.synth`` (skipped when already there)."""
    if spec.data.synth is None:
        raise SpecError(f"spec {spec.name!r} has no data.synth section: it reads existing shards "
                        f"from data.ingest.source={spec.data.ingest.source!r}")
    init_ray()
    return synthesize(spec.data.synth, overwrite=overwrite)


def text_tokenizer(spec: PipelineSpec, force: bool = False) -> Path:
    """Train the byte-level BPE over the captions of the shard source; reuse it when up to date."""
    out = spec.paths.text_tokenizer
    meta_path = out.with_suffix(".meta.json")
    spec.paths.pull(out.name, meta_path.name)  # an object store workdir: its copy in the local mirror
    # The special tokens are part of what the file must hold: one trained before the language
    # tokens (<en>, <zh>) existed is retrained here, not refused later by every stage that loads it.
    # So is the splitting: one trained with phrase-level Chinese tokens is retrained per character.
    meta = {"config": spec.text_tokenizer.model_dump(mode="json"),
            "source": shard_signature(expand_source(spec.data.ingest.source)), "specials": list(SPECIAL_TOKENS),
            "pre_tokenization": PRE_TOKENIZATION}
    if not force and out.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == meta:
        try:
            TextTokenizer.load(out)
            log.info("text tokenizer %s is up to date; reusing it", out)
            return out
        except ValueError as err:
            log.warning("text tokenizer %s cannot be used (%s); retraining it", out, err)
    elif out.is_file() and not force:
        log.info("text tokenizer %s was trained for other captions, settings, special tokens or splitting; "
                 "retraining it", out)
    init_ray()
    t0 = time.perf_counter()
    ds = data_ingest.read_captions(spec.data.ingest)

    def captions():
        for batch in ds.iter_batches(batch_size=4096, batch_format="numpy"):
            yield from (str(c) for c in batch["caption"])

    tok = train_text_tokenizer(captions(), spec.text_tokenizer)
    tok.save(out)
    meta_path.write_text(json.dumps(meta, indent=1))
    spec.paths.push(out.name, meta_path.name)
    log.info("text tokenizer: vocab %d trained in %.1fs -> %s", tok.vocab_size, time.perf_counter() - t0, out)
    return out


def ingest(spec: PipelineSpec):
    """One full pass of the ingest pipeline: counts kept / quarantined by reason, images/s."""
    init_ray()
    spec.paths.pull("text_tokenizer.json")
    tok = spec.paths.text_tokenizer
    return data_ingest.run_ingest(spec.data.ingest, spec.paths.shared(tok) if tok.is_file() else None, spec.paths.quarantine)


def train_tokenizer(spec: PipelineSpec, run_name: str | None = None, crash_at=None):
    """Train the image tokenizer on Ray Train (resumes the run when checkpoints exist)."""
    init_ray()
    it = spec.image_tokenizer
    return image_tokenizer.train_image_tokenizer(it.model, it.train, it.scaling, spec.data.ingest, workdir=spec.workdir,
                                                 tracking=spec.tracking, params={"pipeline": spec.dump()},
                                                 crash_at=crash_at, run_name=run_name or image_tokenizer.RUN_NAME)


def eval_tokenizer(spec: PipelineSpec, run_name: str | None = None) -> dict:
    """PSNR / SSIM / codebook usage / perplexity of the exported tokenizer on the held-out shards; on
    shapes data also the GenEval-shapes ceiling of its reconstructions (what a transformer can reach)."""
    spec.paths.pull("models/image_tokenizer")
    model_dir = spec.paths.models / "image_tokenizer"
    if not (model_dir.is_dir() and any(model_dir.iterdir())):
        raise FileNotFoundError(f"no trained image tokenizer in {model_dir}; run `visgen train tokenizer --pipeline ...` first")
    if not spec.eval.shapes:
        print(f"skipping the GenEval-shapes ceiling of the image tokenizer: {_not_shapes(spec)}", flush=True)
    return image_tokenizer.evaluate_image_tokenizer(model_dir, spec.data.ingest, workdir=spec.workdir,
                                                    tracking=spec.tracking, run_name=run_name or image_tokenizer.RUN_NAME,
                                                    geneval_ceiling=spec.eval.shapes)


def _not_shapes(spec: PipelineSpec) -> str:
    """Why the shapes-only benchmarks do not run, in the words a log line needs."""
    why = "eval.shapes is false" if spec.data.synth is not None else "the spec has no data.synth section"
    return f"the data is not the shapes renders ({why}; set eval.shapes: true if it is)"


def token_cache(spec: PipelineSpec, force: bool = False):
    """Encode every ingested image with the frozen image tokenizer (an actor pool) into the parquet cache."""
    model_dir = _trained_image_tokenizer(spec)
    spec.paths.pull("text_tokenizer.json")
    tok = spec.paths.text_tokenizer
    if not tok.is_file():
        raise FileNotFoundError(f"no text tokenizer at {tok}; run `visgen data tokenizer --pipeline ...` first")
    init_ray()
    # The encoder actors read both tokenizers on any node: their shared locations.
    return build_token_cache(spec.data.ingest, spec.paths.shared(tok), spec.paths.shared(model_dir),
                             spec.paths.token_cache, spec.token_cache, spec.paths.quarantine, force=force)


def _trained_image_tokenizer(spec: PipelineSpec) -> Path:
    spec.paths.pull("models/image_tokenizer")
    model_dir = spec.paths.models / "image_tokenizer"
    if not (model_dir / "image_tokenizer.json").is_file():
        raise FileNotFoundError(f"no trained image tokenizer in {model_dir}; run `visgen train tokenizer --pipeline ...` first")
    return model_dir


def train_lm(spec: PipelineSpec, run_name: str | None = None, crash_at=None):
    """Train the transformer on the token cache (resumes the run when checkpoints exist)."""
    cache = spec.paths.token_cache
    if not storage.is_file(storage.join(cache, "manifest.json")):
        raise FileNotFoundError(f"no token cache in {cache}; run `visgen data token-cache --pipeline ...` first")
    init_ray()
    spec.paths.pull("text_tokenizer.json")
    lm = spec.lm
    return lm_training.train_lm(lm.model, lm.recipe, lm.train, lm.scaling, cache_dir=cache,
                                image_tokenizer_dir=_trained_image_tokenizer(spec), text_tokenizer=spec.paths.text_tokenizer,
                                workdir=spec.workdir, sampling=spec.sampling, tracking=spec.tracking,
                                params={"pipeline": spec.dump()}, run_name=run_name or lm_training.RUN_NAME,
                                crash_at=crash_at)


def bundle(spec: PipelineSpec, force: bool = False) -> Path:
    """Assemble ``<workdir>/models/bundle`` from the trained transformer and tokenizers, recording how
    ingest made the training images square (``data.ingest`` → ``image_prep``) for every later user
    of the bundle; an existing bundle of the same parts, sampling defaults, image preparation and
    shards is kept as it is (with its eval results), so re-running the pipeline does not register
    a new version of an unchanged model."""
    spec.paths.pull("models/lm", "models/bundle", "text_tokenizer.json")
    lm_dir, vq_dir = spec.paths.models / "lm", _trained_image_tokenizer(spec)
    if not (lm_dir / LM_JSON).is_file():
        raise FileNotFoundError(f"no trained transformer in {lm_dir}; run `visgen train lm --pipeline ...` first")
    shards = shard_signature(_shard_list(spec))
    prep = spec.data.ingest.image_prep()
    vq_fp = json.loads((vq_dir / VQ_JSON).read_text())["fingerprint"]
    try:  # the most common training code; a bundle of parts trained elsewhere may have no cache here
        background = background_record(spec.paths.token_cache, vq_fp)
    except TokenCacheError as e:
        log.warning("bundle: no background code recorded (%s)", e)
        background = None
    check_background(spec.sampling.object_temperature, background, f"the token cache {spec.paths.token_cache}")
    out = spec.paths.bundle
    if not force and (out / "manifest.json").is_file():
        old = read_manifest(out)
        try:  # a bundle written before the record was made with ingest's defaults
            old_prep = ImagePrep.from_manifest(old, prep.resolution)
        except ValueError:
            old_prep = None
        same = (old.get("lm", {}).get("fingerprint") == json.loads((lm_dir / LM_JSON).read_text())["fingerprint"]
                and old.get("image_tokenizer", {}).get("fingerprint") == json.loads((vq_dir / VQ_JSON).read_text())["fingerprint"]
                and old.get("text_tokenizer", {}).get("fingerprint") == TextTokenizer.load(spec.paths.text_tokenizer).fingerprint()
                # A searched bundle keeps the spec's section apart from the chosen defaults.
                and old.get("sampling_spec", old.get("sampling")) == spec.sampling.model_dump(mode="json")
                and old.get("shards") == shards
                and old.get("background_code") == background
                and old_prep == prep)
        if same:
            log.info("bundle %s is up to date (same parts, sampling, image preparation and shards); keeping it", out)
            return out
    out = write_bundle(out, lm_dir=lm_dir, image_tokenizer_dir=vq_dir, text_tokenizer=spec.paths.text_tokenizer,
                       sampling=spec.sampling, image_prep=prep,
                       extra={"pipeline": spec.name, "shards": shards, "background_code": background})
    spec.paths.push("models/bundle")
    log.info("bundle written to %s", spec.paths.location(out))
    return out


def _shard_list(spec: PipelineSpec) -> list[str]:
    return expand_source(spec.data.ingest.source)


def eval_lm(spec: PipelineSpec, bundle_dir: str | Path | None = None, run_name: str | None = None,
            force: bool = False) -> dict:
    """The held-out metrics of any data (``eval.heldout``: loss, perplexity, caption BLEU / chrF,
    retrieval, Fréchet distance, sample grid) and, on shapes data (``eval.shapes``), GenEval-shapes
    and the caption slot benchmark, on the bundle (default: the pipeline's own). A bundle already
    evaluated with the same settings on the same held-out data keeps its results. With
    ``eval.sampling_search.enabled`` on shapes data the bundle's sampling defaults are first chosen
    on validation prompts (:mod:`visgen.eval.tune`), and the benchmark runs with them."""
    if not bundle_dir:
        spec.paths.pull("models/bundle")
    d = Path(bundle_dir) if bundle_dir else spec.paths.bundle
    if not (d / "manifest.json").is_file():
        raise FileNotFoundError(f"no model bundle in {d}; run `visgen train lm --pipeline ...` (it writes the bundle) first")
    ev = spec.eval
    search = ev.sampling_search
    searching = search.enabled and ev.shapes
    identity = bundle_eval.eval_identity(spec.data.ingest, ev.geneval, ev.captions, search if searching else None,
                             ev.heldout, ev.shapes)
    done = d / "eval.json"
    if not force and done.is_file():
        previous = json.loads(done.read_text(encoding="utf-8"))
        if previous.get("identity") == identity:
            log.info("bundle %s was already evaluated with these settings on this held-out data; keeping the results", d)
            return previous
    init_ray()
    if not ev.shapes:
        print(f"skipping GenEval-shapes, the caption slot benchmark"
              f"{' and the sampling search' if search.enabled else ''}: {_not_shapes(spec)}", flush=True)
    tuned = tune.tune_bundle(d, search, judge=ev.geneval.judge) if searching else None
    result = bundle_eval.evaluate_bundle(d, ingest=spec.data.ingest, geneval=ev.geneval, captions=ev.captions,
                                         workdir=spec.workdir, tracking=spec.tracking,
                                         run_name=run_name or lm_training.RUN_NAME,
                                         sampling_search=search if searching else None, search_result=tuned,
                                         heldout=ev.heldout, shapes=ev.shapes)
    spec.paths.push("eval", *(("models/bundle",) if not bundle_dir else ()))  # the bundle now holds its scores
    return result


def publish(spec: PipelineSpec) -> dict:
    """Register the bundle as a version of the MLflow model ``visgen``; make it the champion when
    there is none yet or when it passes the gate of ``retrain`` (``gate_metric``, ``gate_direction``,
    ``margin``) against the champion's registered scores: the rule scheduled retraining applies,
    :meth:`visgen.registry.Registry.promote_if_better`."""
    reg = Registry.from_config(spec.tracking, spec.workdir)
    spec.paths.pull("models/bundle")
    new = reg.register(spec.paths.bundle)
    gate = spec.retrain
    decision = reg.promote_if_better(new.version, gate.gate_metric, gate.margin, gate.gate_direction)
    spec.paths.push("mlflow.db")  # an object store workdir keeps the sqlite registry next to the rest
    return {"version": new.version, "model": reg.name, "tracking_uri": reg.tracking_uri, **decision.as_dict(),
            "aliases": reg.aliases()}


def serve_check(spec: PipelineSpec, keep_running: bool = False) -> dict:
    """Start the Serve app on the champion and send it one generate and one caption request over HTTP."""
    from ray import serve  # Ray Serve, FastAPI: only this stage starts an app

    from visgen.serve.app import build_app
    init_ray()
    cfg = spec.serve
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(build_app(cfg, resolve_tracking_uri(spec.tracking, spec.workdir)), name=cfg.app_name,
              route_prefix=cfg.route_prefix)
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    base = f"http://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
    t0 = time.perf_counter()
    gen = requests.post(f"{base}/v1/generate", json={"prompt": "a red circle left of a blue square", "n": 1, "seed": 0},
                        timeout=cfg.request_timeout_s)
    gen.raise_for_status()
    png = base64.b64decode(gen.json()["images"][0]["png_base64"])
    t1 = time.perf_counter()
    cap = requests.post(f"{base}/v1/caption", files={"image": ("generated.png", png, "image/png")},
                        timeout=cfg.request_timeout_s)
    cap.raise_for_status()
    out = {"url": f"{base}/", "version": gen.json()["version"], "generate_ms": round(1000 * (t1 - t0)),
           "caption": cap.json()["caption"], "caption_ms": round(1000 * (time.perf_counter() - t1))}
    if not keep_running:
        serve.delete(cfg.app_name)
        serve.shutdown()
    return out


def _banner(i: int, n: int, title: str) -> float:
    print(f"\n=== [{i}/{n}] {title} ===", flush=True)
    return time.perf_counter()


def run_pipeline(spec: PipelineSpec) -> dict:
    """The main job: every stage in order. Stages whose artifact is up to date are skipped by the
    stage itself (shards by config hash, the text tokenizer by config + shard list, the token
    cache by its manifest, training by its checkpoints)."""
    t_start = time.perf_counter()
    summary: dict = {"pipeline": spec.name, "workdir": spec.workdir}
    # An object store workdir: continue the MLflow store (runs, registry) a run elsewhere left there.
    spec.paths.pull("mlflow.db")
    steps = 10
    t = _banner(1, steps, "shapes shards (Ray tasks)" if spec.data.synth is not None else "shards")
    if spec.data.synth is not None:
        print(synth(spec).format())
    else:
        print(f"no data.synth section: reading existing shards from {spec.data.ingest.source}")
    summary["synth_s"] = round(time.perf_counter() - t, 1)

    t = _banner(2, steps, "text tokenizer (byte-level BPE over the captions)")
    summary["text_tokenizer"] = str(text_tokenizer(spec))
    summary["text_tokenizer_s"] = round(time.perf_counter() - t, 1)

    t = _banner(3, steps, "ingest (Ray Data: decode, validate, resize, tokenize, quarantine)")
    report = ingest(spec)
    print(report.format())
    summary["ingest"] = {"kept": report.kept, "quarantined": dict(report.quarantined),
                         "images_per_s": round(report.images_per_s, 1)}
    summary["ingest_s"] = round(time.perf_counter() - t, 1)

    t = _banner(4, steps, "image tokenizer (Ray Train)")
    res = train_tokenizer(spec)
    summary["image_tokenizer"] = {"model_dir": str(res.model_dir), "steps": res.fit.step}
    summary["train_tokenizer_s"] = round(time.perf_counter() - t, 1)

    t = _banner(5, steps, "evaluate image tokenizer on the held-out shards")
    ev = eval_tokenizer(spec)
    summary["image_tokenizer_eval"] = {k: ev[k] for k in ("psnr", "ssim", "usage", "perplexity", "n_images",
                                                          "geneval_ceiling") if k in ev}
    summary["eval_tokenizer_s"] = round(time.perf_counter() - t, 1)

    t = _banner(6, steps, "token cache (Ray Data, frozen image tokenizer as an actor pool)")
    cache = token_cache(spec)
    print(cache.format())
    summary["token_cache_s"] = round(time.perf_counter() - t, 1)

    t = _banner(7, steps, "transformer: text -> image and image -> text (Ray Train)")
    lm = train_lm(spec)
    summary["lm"] = {"model_dir": str(lm.model_dir), "steps": lm.fit.step,
                     **{k: round(v, 4) for k, v in lm.metrics.items() if k.endswith("loss")}}
    summary["bundle"] = str(bundle(spec))
    summary["train_lm_s"] = round(time.perf_counter() - t, 1)

    t = _banner(8, steps, "evaluate: held-out loss, captions, retrieval, Fréchet distance"
                + (" + GenEval-shapes and caption slots" if spec.eval.shapes else ""))
    ev = eval_lm(spec)
    summary["lm_eval"] = {k: v for k, v in ev.items() if isinstance(v, (int, float)) and k.startswith(EVAL_SUMMARY_KEYS)}
    summary["eval_lm_s"] = round(time.perf_counter() - t, 1)

    t = _banner(9, steps, "register the bundle in MLflow; promote it to champion when it passes the gate (retrain.gate_*)")
    summary["registry"] = publish(spec)
    print(json.dumps(summary["registry"], indent=1))

    t = _banner(10, steps, "serve the champion (Ray Serve) and send it one generate and one caption request")
    summary["serve"] = serve_check(spec)
    print(json.dumps(summary["serve"], indent=1, ensure_ascii=False))
    summary["total_s"] = round(time.perf_counter() - t_start, 1)
    # Machine-readable record of the run for whoever submitted it (job logs are text).
    out = spec.paths.root / "summary.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=1, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    tmp.replace(out)
    spec.paths.push("summary.json", "mlflow.db")
    return summary


EVAL_SUMMARY_KEYS = ("geneval_", "caption_", "heldout_", "retrieval_", "frechet_")  # eval numbers in summary.json


def where_to_look(spec: PipelineSpec, pipeline: str = "PIPELINE.yaml") -> str:
    uri = resolve_tracking_uri(spec.tracking, spec.workdir)
    lines = [f"artifacts:        {spec.workdir}  (this run: {spec.paths.location('summary.json')})",
             f"quarantine table: {spec.paths.quarantine}",
             f"tokenizer eval:   {spec.paths.eval / 'image_tokenizer.json'}",
             f"model eval:       {spec.paths.eval / 'lm.json'}  (sample grid: {spec.paths.eval / 'heldout' / 'samples.png'}"
             + (f"; GenEval-shapes images: {spec.paths.eval / 'geneval'})" if spec.eval.shapes else ")"),
             f"model bundle:     {spec.paths.bundle}"
             + (f"  (durable copy: {spec.paths.location(spec.paths.bundle)})" if spec.paths.remote else ""),
             (f"try it:           visgen generate \"a red circle left of a blue square\" --out out.png --bundle {spec.paths.bundle}"
              if spec.eval.shapes else
              f"try it:           visgen generate \"A CAPTION LIKE YOUR DATA'S\" --out out.png --bundle {spec.paths.bundle}\n"
              f"                  visgen caption photo.jpg --bundle {spec.paths.bundle}"),
             f"serve it:         visgen serve --pipeline {pipeline} --workdir {spec.workdir}   "
             f"(playground: http://127.0.0.1:{spec.serve.port}/)"]
    if uri.startswith("sqlite:"):
        lines.append(f"MLflow UI:        mlflow ui --backend-store-uri {uri}   (then open http://127.0.0.1:5000)")
    else:
        lines.append(f"MLflow:           {uri}")
    return "\n".join(lines)
