"""Train and evaluate the VQ image tokenizer on Ray Train (the shared loop in ``loop.py``).

``train_image_tokenizer`` feeds the ingest output's training split to the workers (read into
memory once when it fits, ``train.data_in_memory``; streamed otherwise), runs
the generator (and, once ``disc_start`` is reached, the PatchGAN discriminator) steps, logs a
reconstruction grid of fixed held-out images at each eval, and exports the final model with
``save_vq`` to ``<workdir>/models/image_tokenizer/``. ``evaluate_image_tokenizer`` measures
PSNR, SSIM, codebook usage and perplexity over the whole held-out split and writes them to
``<workdir>/eval/image_tokenizer.json`` and MLflow.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visgen import storage
from visgen.data.sources import expand_source, split_shards
from visgen.workdir import Workdir
from visgen.models.vq import VQConfig, VQLoss, VQModel, load_vq, save_vq, to_model_input, to_uint8
from visgen.runtime import init_ray
from visgen.tracking import Tracker, make_grid
from visgen.train.checkpoint import child
from visgen.train.config import ScalingConfig, TrainConfig
from visgen.train.loop import (CrashAt, EvalResult, FitResult, Trainable, TrainTask, WorkerEnv, decay_groups, fit,
                               read_run_progress)

log = logging.getLogger("visgen.train")

RUN_NAME = "image_tokenizer"


class ImageTokenizerTask(TrainTask):
    """The VQ tokenizer as a :class:`TrainTask`: modules ``model`` (+ ``disc`` with the GAN)."""

    name = "image_tokenizer"
    columns = ("image",)
    log_keys = ("g_loss", "rec_loss", "d_loss", "usage")

    def __init__(self, cfg: VQConfig):
        self.cfg = cfg

    def setup(self, env: WorkerEnv) -> Trainable:
        cfg, tc = self.cfg, env.train
        self.model = VQModel(cfg).to(env.device)
        self.loss = VQLoss(cfg).to(env.device)
        # The quantizer keeps its usage buffers identical across ranks itself (all-reduced
        # hits); DDP's per-forward buffer broadcast would only repeat that work.
        self.ddp_model = env.prepare(self.model, sync_buffers=False)
        modules: dict[str, torch.nn.Module] = {"model": self.model}
        groups = {"model": decay_groups(self.model, tc.weight_decay)}
        if self.loss.discriminator is not None:
            disc = self.loss.discriminator
            modules["disc"] = disc
            groups["disc"] = decay_groups(disc, tc.weight_decay)
            # VQLoss calls self.discriminator; under DDP it must be the wrapped one, while the
            # checkpoint and exports keep the bare module.
            self.loss.discriminator = env.prepare(disc)
        return Trainable(modules=modules, param_groups=groups)

    def collate(self, batch: dict[str, np.ndarray], env: WorkerEnv, step: int) -> dict[str, torch.Tensor]:
        # uint8 crosses to the device (a quarter of float32's bytes); the loop pins and copies it ahead.
        images = batch["image"]
        if not (images.flags.writeable and images.flags.c_contiguous):  # a view of Arrow's read-only buffer
            images = np.array(images, order="C")
        return {"image": torch.from_numpy(images)}

    def train_step(self, batch: dict[str, Any], env: WorkerEnv, step: int) -> dict[str, Any]:
        # (B, H, W, 3) uint8, on the device when it comes through the loop's feed (numpy also works).
        x = to_model_input(batch["image"]).to(env.device, non_blocking=True)  # (B, 3, H, W) in [-1, 1]
        with env.autocast():
            out = self.ddp_model(x)
            loss, logs = self.loss.generator_loss(x, out, step, last_layer=self.model.last_layer_weight())
        logs["grad_norm"] = env.optimizer_step("model", loss)
        if self.loss.gan_active(step):
            with env.autocast():
                d_loss, d_logs = self.loss.discriminator_loss(x, out["recon"].detach(), step)
            d_logs["d_grad_norm"] = env.optimizer_step("disc", d_loss)
            logs.update(d_logs)
        # Over the quantizer's sliding window (not this batch), identical on every rank. Reading them
        # waits for the device, so only on the steps the loop logs (the window's value at that step).
        done, tc = step + 1, env.train
        if done % tc.log_every == 0 or done >= tc.steps:
            logs["usage"] = self.model.codebook_usage()
            logs["perplexity"] = self.model.codebook_perplexity()
        return logs

    def evaluate(self, env: WorkerEnv, batch: dict[str, np.ndarray], step: int) -> EvalResult:
        from visgen.eval.recon import ReconMetrics  # torchmetrics: only evaluation needs it

        images = batch["image"]  # (N, H, W, 3) uint8
        out = self.model(to_model_input(images).to(env.device))  # eval mode: no usage-stat updates
        metrics = ReconMetrics(num_codes=self.model.num_codes)
        metrics.update(images, out["recon"].float().cpu(), out["ids"].cpu())
        res = metrics.compute()
        recon = to_uint8(out["recon"].float())  # (N, H, W, 3)
        return EvalResult(metrics={k: res[k] for k in ("psnr", "ssim", "usage", "perplexity")},
                          images={"recon": recon_grid(images, recon)})

    def export(self, env: WorkerEnv, directory: Path) -> Path:
        return save_vq(self.model, directory)


def recon_grid(real: np.ndarray, recon: np.ndarray, per_row: int = 8) -> np.ndarray:
    """Rows of up to ``per_row`` originals, each followed by a row of their reconstructions."""
    rows = []
    for i in range(0, len(real), per_row):
        a, b = real[i:i + per_row], recon[i:i + per_row]
        pad = per_row - len(a)
        if pad and len(real) > per_row:  # keep columns aligned in the last, shorter pair of rows
            blank = np.zeros((pad, *a.shape[1:]), np.uint8)
            a, b = np.concatenate([a, blank]), np.concatenate([b, blank])
        rows += [a, b]
    return make_grid(np.concatenate(rows), nrow=min(per_row, len(real)))


# ---------------------------------------------------------------------------------------------
# Stage functions
# ---------------------------------------------------------------------------------------------
@dataclass
class TokenizerTrainResult:
    model_dir: Path | None  # <workdir>/models/image_tokenizer (save_vq layout)
    metrics: dict[str, float]  # last logged training metrics (losses, usage, images/s, ...)
    eval: dict[str, float]  # final quick eval on the fixed held-out batch
    fit: FitResult


def _build_split(data: Any, split: str, workdir: Workdir):
    """One split of the ingest output (``data`` is an IngestConfig), images only."""
    from visgen.data.ingest import IngestConfig, build_dataset  # Ray Data: driver only; Train workers import this module

    if not isinstance(data, IngestConfig):
        raise TypeError(f"data must be an IngestConfig or a ray.data.Dataset, got {type(data).__name__}")
    # The image tokenizer needs no text ids: no text tokenizer path.
    return build_dataset(data, None, workdir.quarantine, split=split)


def _datasets(data: Any, holdout: Any, workdir: Workdir):
    """(train, holdout or None) for training: the datasets passed in, or splits of the ingest output."""
    import ray.data  # Ray Data: driver only; Train workers import this module

    if isinstance(data, ray.data.Dataset):
        return data, holdout
    train_ds = _build_split(data, "train", workdir)
    if holdout is None and data.holdout_shards > 0:
        holdout = _build_split(data, "holdout", workdir)
    return train_ds, holdout


def images_size_bound(data: Any, resolution: int) -> int | None:
    """An upper bound of the training split's decoded images in memory, known without decoding any.

    Sample counts come from the shards' img2dataset stats files (``00000_stats.json`` next to
    ``00000.tar``: ``successes``, else ``count``; ``visgen data synth`` writes them too). A shard
    without one is bounded by its size: every sample takes at least 1 KiB of a tar (a 512-byte
    header and one 512-byte data block), so S tar bytes hold at most S / 1024 images. Each image
    is ``resolution``² × 3 bytes. None when ``data`` is not an ingest section or a shard is not a
    local file.
    """
    from visgen.data.ingest import IngestConfig  # Ray Data: driver only; Train workers import this module

    if not isinstance(data, IngestConfig):
        return None
    if storage.is_url(str(data.source)):  # object-store shards: not listed here just for a bound
        return None
    try:
        shards = split_shards(expand_source(data.source), data.holdout_shards, "train")
        samples = sum(_shard_samples(p) for p in shards)
    except (OSError, ValueError):  # object-store URLs, unreadable paths: no bound
        return None
    return samples * resolution * resolution * 3


def _shard_samples(path: str) -> int:
    """Samples in a local shard: from its stats file when it has one, else the 1-KiB-per-sample bound."""
    stats = os.path.splitext(path)[0] + "_stats.json"
    try:
        with open(stats, encoding="utf-8") as f:
            info = json.load(f)
        n = info.get("successes", info.get("count"))
        if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
            return n
    except (OSError, ValueError, AttributeError):
        pass
    return os.path.getsize(path) // 1024


def _eval_images(train_ds, holdout_ds, n: int, resolution: int) -> np.ndarray:
    rows = holdout_ds.take(n) if holdout_ds is not None else []
    if not rows:
        log.warning("no held-out images: the quick eval and its reconstruction grid use training images")
        rows = train_ds.take(n)
    if not rows:
        raise ValueError("the training split is empty: nothing to train the image tokenizer on")
    images = np.stack([np.asarray(r["image"], dtype=np.uint8) for r in rows])  # (N, H, W, 3)
    if images.shape[1:] != (resolution, resolution, 3):
        raise ValueError(f"images are {images.shape[1:]} but the tokenizer is configured for "
                         f"{resolution}x{resolution}x3: set image_tokenizer.model.resolution = data.ingest.resolution")
    return images


def train_image_tokenizer(model: VQConfig, train: TrainConfig, scaling: ScalingConfig, data: Any, *,
                          workdir: str | Path, holdout: Any = None, tracking: Any = None,
                          run_name: str = RUN_NAME, params: dict | None = None,
                          crash_at: CrashAt | None = None) -> TokenizerTrainResult:
    """Train the image tokenizer; resume ``run_name`` if it has checkpoints under ``<workdir>/ray_results``.

    ``data`` is the ingest section (its ``train`` split feeds training, in memory or streamed as
    ``train.data_in_memory`` says; ``holdout`` feeds the quick eval) or a ready
    ``ray.data.Dataset`` with an ``image`` column (then ``holdout`` is optional).
    ``tracking`` is the ``TrackingConfig`` (None: no MLflow). Returns the exported model directory
    and the final metrics.
    """
    wd = Workdir(workdir)
    train_ds, holdout_ds = _datasets(data, holdout, wd)
    eval_images = _eval_images(train_ds, holdout_ds, train.eval_samples, model.resolution)
    res = fit(ImageTokenizerTask(model), train=train, scaling=scaling, run_name=run_name,
              storage_path=wd.ray_results, datasets={"train": train_ds}, eval_batch={"image": eval_images},
              tracking=tracking, workdir=wd.url or wd.root, export_dir=wd.location("models/image_tokenizer"),
              crash_at=crash_at,
              data_size_hint=images_size_bound(data, model.resolution),
              params={"image_tokenizer.model": model, "image_tokenizer.scaling": scaling, **(params or {})})
    log.info("image tokenizer: %d steps in %.0fs, exported to %s", res.step, res.wall_s, res.export_dir)
    wd.pull("models/image_tokenizer")  # a remote workdir: the driver's stages read the local mirror
    return TokenizerTrainResult(model_dir=wd.models / "image_tokenizer", metrics=res.metrics, eval=res.eval, fit=res)


def evaluate_image_tokenizer(model_dir: str | Path, data: Any, *, workdir: str | Path, tracking: Any = None,
                             run_name: str = RUN_NAME, batch_size: int = 64, max_batches: int | None = None,
                             device: str = "auto", geneval_ceiling: bool = False) -> dict[str, Any]:
    """PSNR, SSIM, codebook usage and perplexity of a saved tokenizer on the held-out split.

    ``data`` is the ingest section (its ``holdout`` split is read) or a ``ray.data.Dataset``.
    ``geneval_ceiling`` (shapes data): also GenEval-shapes of the tokenizer's reconstructions of
    real renders of the benchmark prompts (:func:`visgen.eval.geneval.reconstruction_ceiling`),
    the most any transformer drawing through this tokenizer can score.
    Writes ``<workdir>/eval/image_tokenizer.json`` and logs ``holdout/*`` metrics and that JSON
    to the MLflow run ``run_name`` (the training run, resumed by name).
    """
    import ray.data  # Ray Data, torchmetrics: only evaluation needs them

    from visgen.eval.recon import evaluate_reconstruction

    wd = Workdir(workdir)
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    vq = load_vq(model_dir, device=dev)
    if isinstance(data, ray.data.Dataset):
        ds = data
    else:
        init_ray()
        ds = _build_split(data, "holdout", wd)  # SpecError naming holdout_shards when there is none
    t0 = time.perf_counter()
    batches = ds.select_columns(["image"]).iter_batches(batch_size=batch_size, batch_format="numpy")
    try:
        metrics = evaluate_reconstruction(vq, batches, max_batches=max_batches)
    except ValueError as err:
        if "before any update" in str(err):
            raise ValueError("the held-out split is empty: nothing to evaluate (check data.ingest's holdout setting)") from None
        raise
    if geneval_ceiling:
        from visgen.eval.geneval import reconstruction_ceiling  # scipy: only the GenEval ceiling needs the judge
        from visgen.eval.judge import load_judge

        def reconstruct(images: np.ndarray) -> np.ndarray:
            with torch.no_grad():
                return to_uint8(vq.decode(vq.encode(to_model_input(images).to(dev))))

        ceiling = reconstruction_ceiling(reconstruct, load_judge(), vq.cfg.resolution)
        metrics["geneval_ceiling"] = ceiling["overall"]
        metrics.update({f"geneval_ceiling_{t}": v for t, v in ceiling["tasks"].items()})
    result = {**metrics, "model_dir": str(Path(model_dir).resolve()), "fingerprint": vq.fingerprint(),
              "codebook_size": vq.num_codes, "eval_s": round(time.perf_counter() - t0, 2)}
    out = wd.eval / "image_tokenizer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, allow_nan=True), encoding="utf-8")
    wd.push("eval/image_tokenizer.json")
    if tracking is not None:
        progress = read_run_progress(child(wd.ray_results, run_name))
        with Tracker.start(tracking, wd.url or wd.root, run_name) as tracker:
            tracker.log_metrics({f"holdout/{k}": v for k, v in metrics.items()
                                 if k in ("psnr", "ssim", "usage", "perplexity") or k.startswith("geneval_ceiling")},
                                step=progress.step if progress else 0)
            tracker.log_dict(result, "eval/image_tokenizer.json")
    log.info("image tokenizer eval on %d held-out images: PSNR %.2f dB, SSIM %.4f, usage %.3f, perplexity %.1f -> %s",
             metrics["n_images"], metrics["psnr"], metrics["ssim"], metrics["usage"], metrics["perplexity"], out)
    if geneval_ceiling:
        log.info("image tokenizer: GenEval-shapes of its reconstructions of real renders (the ceiling of any "
                 "transformer drawing through it) %.3f", metrics["geneval_ceiling"])
    return result
