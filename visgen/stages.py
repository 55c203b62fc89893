"""The pipeline's stages, each a function of the spec that returns its durable artifact.

Each stage hands every component only its own section of the spec. The CLI and the
``jobs/*.py`` entry points are thin wrappers over these functions.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from visgen.config import PipelineSpec, SpecError
from visgen.runtime import init_ray

log = logging.getLogger("visgen")


def synth(spec: PipelineSpec, overwrite: bool = False):
    """Generate the shapes shards named by ``data.synth`` (skipped when already there)."""
    from visgen.data.synth import synthesize

    if spec.data.synth is None:
        raise SpecError(f"spec {spec.name!r} has no data.synth section: it reads existing shards "
                        f"from data.ingest.source={spec.data.ingest.source!r}")
    init_ray()
    return synthesize(spec.data.synth, overwrite=overwrite)


def _source_signature(paths: list[str]) -> list[list]:
    sig = []
    for p in paths:
        try:
            st = Path(p).stat()
            sig.append([p, st.st_size, int(st.st_mtime)])
        except OSError:  # object-store URLs: the name is what we have
            sig.append([p, None, None])
    return sig


def text_tokenizer(spec: PipelineSpec, force: bool = False) -> Path:
    """Train the byte-level BPE over the captions of the shard source; reuse it when up to date."""
    from visgen.data.ingest import read_captions
    from visgen.data.sources import expand_source
    from visgen.text.tokenizer import train_text_tokenizer

    out = spec.paths.text_tokenizer
    meta_path = out.with_suffix(".meta.json")
    meta = {"config": spec.text_tokenizer.model_dump(mode="json"),
            "source": _source_signature(expand_source(spec.data.ingest.source))}
    if not force and out.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == meta:
        log.info("text tokenizer %s is up to date; reusing it", out)
        return out
    init_ray()
    t0 = time.perf_counter()
    ds = read_captions(spec.data.ingest)

    def captions():
        for batch in ds.iter_batches(batch_size=4096, batch_format="numpy"):
            yield from (str(c) for c in batch["caption"])

    tok = train_text_tokenizer(captions(), spec.text_tokenizer)
    tok.save(out)
    meta_path.write_text(json.dumps(meta, indent=1))
    log.info("text tokenizer: vocab %d trained in %.1fs -> %s", tok.vocab_size, time.perf_counter() - t0, out)
    return out


def ingest(spec: PipelineSpec):
    """One full pass of the ingest pipeline: counts kept / quarantined by reason, images/s."""
    from visgen.data.ingest import run_ingest

    init_ray()
    tok = spec.paths.text_tokenizer
    return run_ingest(spec.data.ingest, str(tok) if tok.is_file() else None, str(spec.paths.quarantine))


def train_tokenizer(spec: PipelineSpec, run_name: str | None = None, crash_at=None):
    """Train the image tokenizer on Ray Train (resumes the run when checkpoints exist)."""
    from visgen.train.image_tokenizer import RUN_NAME, train_image_tokenizer

    init_ray()
    it = spec.image_tokenizer
    return train_image_tokenizer(it.model, it.train, it.scaling, spec.data.ingest, workdir=spec.workdir,
                                 tracking=spec.tracking, params={"pipeline": spec.dump()}, crash_at=crash_at,
                                 run_name=run_name or RUN_NAME)


def eval_tokenizer(spec: PipelineSpec, run_name: str | None = None) -> dict:
    """PSNR / SSIM / codebook usage / perplexity of the exported tokenizer on the held-out shards."""
    from visgen.train.image_tokenizer import RUN_NAME, evaluate_image_tokenizer

    model_dir = spec.paths.models / "image_tokenizer"
    if not (model_dir.is_dir() and any(model_dir.iterdir())):
        raise FileNotFoundError(f"no trained image tokenizer in {model_dir}; run `visgen train tokenizer --pipeline ...` first")
    return evaluate_image_tokenizer(model_dir, spec.data.ingest, workdir=spec.workdir, tracking=spec.tracking,
                                    run_name=run_name or RUN_NAME)


def _banner(i: int, n: int, title: str) -> float:
    print(f"\n=== [{i}/{n}] {title} ===", flush=True)
    return time.perf_counter()


def run_pipeline(spec: PipelineSpec) -> dict:
    """The main job: every stage in order. Stages whose artifact is up to date are skipped by the
    stage itself (shards by config hash, the text tokenizer by config + shard list, training by
    its checkpoints)."""
    t_start = time.perf_counter()
    summary: dict = {"pipeline": spec.name, "workdir": spec.workdir}
    steps = 5
    t = _banner(1, steps, "shapes shards (Ray tasks)")
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
    summary["image_tokenizer_eval"] = {k: ev[k] for k in ("psnr", "ssim", "usage", "perplexity", "n_images") if k in ev}
    summary["eval_tokenizer_s"] = round(time.perf_counter() - t, 1)
    summary["total_s"] = round(time.perf_counter() - t_start, 1)
    return summary


def where_to_look(spec: PipelineSpec) -> str:
    from visgen.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(spec.tracking, spec.workdir)
    lines = [f"artifacts:        {spec.workdir}",
             f"quarantine table: {spec.paths.quarantine}",
             f"tokenizer eval:   {spec.paths.eval / 'image_tokenizer.json'}"]
    if uri.startswith("sqlite:"):
        lines.append(f"MLflow UI:        mlflow ui --backend-store-uri {uri}   (then open http://127.0.0.1:5000)")
    else:
        lines.append(f"MLflow:           {uri}")
    return "\n".join(lines)
