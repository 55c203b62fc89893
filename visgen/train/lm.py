"""Train VisGPT on Ray Train from the token cache (the shared loop in ``loop.py``).

Each step draws a global batch of cached (text ids, image codes) pairs and turns each row into
one of the two sequences: a fixed share ``t2i_ratio`` of the rows (chosen at random per step)
become text → image sequences, the rest image → text. A fixed count per batch keeps tensor
shapes static (what ``torch.compile`` wants) and makes the mix exact. Among the t2i rows a
share ``cond_dropout`` gets the null prompt, which teaches the unconditional model that
classifier-free guidance needs. Image → text rows start their text with the caption's language
token (``<zh>`` when one of its ids holds part of a CJK ideograph, else ``<en>``: one lookup in
a table over the text vocabulary, :meth:`TextTokenizer.script_tables`, for the whole batch).

The quick eval (rank 0, every ``eval_every`` steps) logs the held-out loss of both directions,
greedy captions of fixed held-out images, each asked for in its reference caption's language,
with their chrF against the reference (overall and per language) and, over the references the
shapes caption grammar reads (shapes data; skipped with one log line on other data), their slot
accuracy, and a grid of images drawn for those images' captions under their VQ reconstructions;
the captions go to MLflow as JSON.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from pydantic import Field

from visgen import storage
from visgen.base import Section
from visgen.data.captions import detect_language, slot_accuracy
from visgen.eval.captions import chrf, parse
from visgen.workdir import Workdir
from visgen.models.gpt import EN, LM_FORMAT, PAD, ZH, GPTConfig, Layout, VisGPT, load_gpt, save_gpt
from visgen.inference import SamplingConfig, caption_codes
from visgen.models.io import check_fits
from visgen.models.vq import CONFIG_FILE as VQ_JSON, load_vq, to_uint8
from visgen.tracking import make_grid
from visgen.train.checkpoint import child, latest_checkpoint
from visgen.train.config import ScalingConfig, TrainConfig
from visgen.train.loop import CrashAt, EvalResult, FitResult, Trainable, TrainTask, WorkerEnv, fit
from visgen.train.task import muon_groups

log = logging.getLogger("visgen.train")

RUN_NAME = "lm"


class LMRecipe(Section):
    """What the transformer is trained on and how: the task mix, guidance dropout, extra losses."""

    t2i_ratio: float = Field(0.5, ge=0.0, le=1.0, description="Share of each batch trained as text → image; the rest is image → text.")
    cond_dropout: float = Field(0.1, ge=0.0, le=1.0, description="Share of text → image rows whose prompt is replaced by the null prompt (for CFG).")
    z_loss: float = Field(0.0, ge=0.0, le=1.0, description="Weight of the squared log-partition penalty on the scored logits (1e-4 at scale); 0 = off.")
    compile: bool = Field(True, description="torch.compile the training forward on GPU (CPU runs eager).")
    eval_images: int = Field(8, ge=0, le=64, description="Held-out captions drawn as images in each quick eval's grid.")


def padded_ids(text_ids: Sequence[Sequence[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Variable-length id rows → ``(ids (B, width) int64 padded with <pad> and cut to width, lengths (B,))``,
    without a Python loop over the ids."""
    rows = list(text_ids)
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    out = np.full((len(rows), width), PAD, dtype=np.int64)
    total = int(lengths.sum())
    if total:
        flat = np.concatenate([np.asarray(r, dtype=np.int64).reshape(-1) for r in rows])
        row = np.repeat(np.arange(len(rows)), lengths)
        col = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        keep = col < width
        out[row[keep], col[keep]] = flat[keep]
    return out, lengths


def assemble(text_ids: Sequence[Sequence[int]], image_ids: np.ndarray | torch.Tensor, layout: Layout,
             n_t2i: int, null: Sequence[bool] | None = None, cjk: np.ndarray | None = None) -> torch.Tensor:
    """Rows ``[:n_t2i]`` as t2i sequences (``null[i]``: null prompt), the rest as i2t → (B, L) long.

    i2t rows start their text with the caption's language token: ``<zh>`` when any of its ids is
    True in ``cjk`` (a bool table over the text ids, ``TextTokenizer.script_tables(text_vocab)["cjk"]``),
    else ``<en>``; without a table every caption counts as English.
    """
    image = torch.as_tensor(np.asarray(image_ids), dtype=torch.long)
    ids, lengths = padded_ids(text_ids, layout.text_slots - 1)
    b = len(lengths)
    null_rows = np.zeros(b, dtype=bool)
    if null is not None:
        null_rows[:n_t2i] = np.asarray(null, dtype=bool)[:n_t2i]
    ids_t, len_t = torch.from_numpy(ids), torch.from_numpy(lengths)
    t2i = layout.text_regions(ids_t[:n_t2i], len_t[:n_t2i], null=torch.from_numpy(null_rows[:n_t2i]))
    zh = np.take(cjk, ids[n_t2i:], mode="clip").any(-1) if cjk is not None else np.zeros(b - n_t2i, dtype=bool)
    lang = torch.from_numpy(np.where(zh, ZH, EN).astype(np.int64))
    i2t = layout.text_regions(ids_t[n_t2i:], len_t[n_t2i:], lang=lang)
    return torch.cat([layout.t2i(t2i, image[:n_t2i]), layout.i2t(image[n_t2i:], i2t)])


def shapes_slot_scores(captions: Sequence[str], truth: Sequence[str], langs: Sequence[str]) -> dict[str, float]:
    """Caption slot accuracy (overall and per language) over the reference captions the shapes caption
    grammar reads in full; ``{}`` when it reads none (not shapes data: a photo's caption has no slots)."""
    refs = [parse(t) for t in truth]
    keep = [i for i, (_, in_grammar) in enumerate(refs) if in_grammar]
    if not keep:
        return {}
    scores = np.array([slot_accuracy(parse(captions[i])[0], refs[i][0]) for i in keep])
    kept = np.array([langs[i] for i in keep])
    out = {"caption_slot_accuracy": float(scores.mean())}
    for lang in sorted(set(kept)):
        out[f"caption_slot_accuracy_{lang}"] = float(scores[kept == lang].mean())
    return out


def _image_matrix(column: Any) -> np.ndarray:
    """A batch's ``image_ids`` column (2D array or array of 1D arrays) → (B, N) int64."""
    arr = np.asarray(column)
    return (np.stack([np.asarray(r) for r in arr]) if arr.dtype == object else arr).astype(np.int64)


class LMTask(TrainTask):
    """VisGPT as a :class:`TrainTask`: one module ``model``, one optimiser."""

    name = "lm"
    columns = ("text_ids", "image_ids")
    log_keys = ("loss", "t2i_loss", "i2t_loss")

    def __init__(self, cfg: GPTConfig, recipe: LMRecipe, sampling: SamplingConfig,
                 image_tokenizer_dir: str | None = None, text_tokenizer: str | None = None,
                 init_from: str | None = None):
        self.cfg, self.recipe, self.sampling = cfg, recipe, sampling
        self.image_tokenizer_dir, self.text_tokenizer = image_tokenizer_dir, text_tokenizer
        self.init_from = init_from
        self._vq = self._tok = None
        self.cjk: np.ndarray | None = None  # text ids that mark a Chinese caption (see assemble)
        self._said_not_shapes = False

    def _language_table(self) -> np.ndarray | None:
        if self.cjk is None and self.text_tokenizer:
            from visgen.text.tokenizer import TextTokenizer  # tokenizers: visgen.config imports this module

            self.cjk = TextTokenizer.load(storage.local_copy(self.text_tokenizer)).script_tables(self.cfg.text_vocab)["cjk"]
        return self.cjk

    def setup(self, env: WorkerEnv) -> Trainable:
        if self._language_table() is None:
            log.warning("no text tokenizer given: every image -> text row is trained as an English caption (<en>)")
        self.model = VisGPT(self.cfg).to(env.device)
        if self.init_from:  # continue from a trained model; a checkpoint of this run, if any, overrides it
            start = load_gpt(storage.local_copy(self.init_from))
            if start.cfg != self.cfg:
                raise ValueError(f"cannot start from {self.init_from}: its config differs from lm.model "
                                 f"({start.cfg.model_dump()} vs {self.cfg.model_dump()})")
            self.model.load_state_dict(start.state_dict())
        elif self.cfg.code_looks:
            vq = self._parts(env)[0]
            if vq is None:
                raise ValueError("lm.model.code_looks needs the image tokenizer (image_tokenizer_dir) to read the code looks from")
            self.model.set_code_looks(vq.code_looks())
        self.ddp_model = env.prepare(self.model)
        self.forward = self.ddp_model
        if env.device.type == "cuda" and self.recipe.compile:
            self.forward = torch.compile(self.ddp_model)
        return Trainable(modules={"model": self.model},
                         param_groups={"model": muon_groups(self.model, self.model.blocks, env.train.weight_decay)})

    def collate(self, batch: dict[str, np.ndarray], env: WorkerEnv, step: int) -> dict[str, Any]:
        """The step's token sequences, built on the host in the loop's feed thread, ahead of the step."""
        text, image = batch["text_ids"], _image_matrix(batch["image_ids"])
        b = len(text)
        # Seeded by (seed, rank, step): a resumed run draws the same mix for the same step.
        rng = np.random.default_rng([env.train.seed, env.rank, step])
        order = rng.permutation(b)
        n_t2i = int(round(self.recipe.t2i_ratio * b))
        null = rng.random(n_t2i) < self.recipe.cond_dropout
        tokens = assemble([text[i] for i in order], image[order], self.model.layout, n_t2i, null, self.cjk)
        return {"tokens": tokens, "n_t2i": n_t2i}

    def train_step(self, batch: dict[str, Any], env: WorkerEnv, step: int) -> dict[str, torch.Tensor]:
        if "tokens" not in batch:  # a raw numpy batch (called outside the loop's feed)
            batch = self.collate(batch, env, step)
        tokens = batch["tokens"].to(env.device, non_blocking=True)  # already there when the loop fed it
        with env.autocast():
            loss, parts = self.forward(tokens, batch["n_t2i"], self.recipe.z_loss)
        # Tensors, read by the loop only at log_every: no host sync per step.
        logs: dict[str, torch.Tensor] = dict(parts)
        logs["loss"] = loss.detach()
        logs["grad_norm"] = env.optimizer_step("model", loss)
        return logs

    # -- quick eval ---------------------------------------------------------------------------------
    def _parts(self, env: WorkerEnv):
        from visgen.text.tokenizer import TextTokenizer  # tokenizers: visgen.config imports this module

        if self._vq is None and self.image_tokenizer_dir:
            self._vq = load_vq(storage.local_copy(self.image_tokenizer_dir), device=env.device)
        if self._tok is None and self.text_tokenizer:
            self._tok = TextTokenizer.load(storage.local_copy(self.text_tokenizer))
        return self._vq, self._tok

    def evaluate(self, env: WorkerEnv, batch: dict[str, np.ndarray], step: int) -> EvalResult:
        m, lay = self.model, self.model.layout
        text, image = list(batch["text_ids"]), _image_matrix(batch["image_ids"])
        n = len(text)
        cjk = self._language_table()
        _, t2i = m.loss(assemble(text, image, lay, n, cjk=cjk).to(env.device), n)
        _, i2t = m.loss(assemble(text, image, lay, 0, cjk=cjk).to(env.device), 0)
        metrics = {"t2i_loss": float(t2i["t2i_loss"]), "i2t_loss": float(i2t["i2t_loss"])}
        vq, tok = self._parts(env)
        codes = torch.as_tensor(image, device=env.device)
        seeds = torch.arange(n, device=env.device)
        texts: dict[str, Any] = {}
        images: dict[str, np.ndarray] = {}
        try:
            if tok is not None:
                truth = [str(c) for c in batch["caption"]]
                langs = [detect_language(t) for t in truth]  # ask in the reference caption's language
                captions = caption_codes(m, tok, codes, seeds, langs)
                metrics["caption_chrf"] = chrf(captions, truth)
                for lang in sorted(set(langs)):
                    rows = [i for i, la in enumerate(langs) if la == lang]
                    metrics[f"caption_chrf_{lang}"] = chrf([captions[i] for i in rows], [truth[i] for i in rows])
                slots = shapes_slot_scores(captions, truth, langs)
                if not slots and not self._said_not_shapes:
                    log.info("quick eval: caption slot accuracy skipped: no held-out caption is in the shapes caption "
                             "grammar (the data is not shapes); chrF against the reference is logged instead")
                    self._said_not_shapes = True
                metrics.update(slots)
                texts["captions"] = [{"truth": t, "language": lang, "generated": p}
                                     for t, lang, p in zip(truth, langs, captions)]
            k = min(self.recipe.eval_images, n)
            if vq is not None and k:
                s = self.sampling
                drawn = m.generate_images(torch.tensor([lay.text_region(t) for t in text[:k]], device=env.device),
                                          seeds[:k], cfg_scale=s.cfg_scale, temperature=s.temperature,
                                          top_k=s.top_k, top_p=s.top_p)
                h, w = self.cfg.grid
                real = to_uint8(vq.decode(codes[:k].view(k, h, w)))
                fake = to_uint8(vq.decode(drawn.view(k, h, w)))
                images["samples"] = make_grid(np.concatenate([real, fake]), nrow=k)
                if tok is not None:
                    texts["prompts"] = [tok.decode(t) for t in text[:k]]
        finally:
            m.clear_cache()  # the cache buffers must not outlive the eval (DDP, checkpoints)
        return EvalResult(metrics=metrics, images=images, texts=texts)

    def export(self, env: WorkerEnv, directory: Path) -> Path:
        return save_gpt(self.model, directory)


# ---------------------------------------------------------------------------------------------
# Stage function
# ---------------------------------------------------------------------------------------------
@dataclass
class LMTrainResult:
    model_dir: Path | None  # <workdir>/models/lm (save_gpt layout)
    metrics: dict[str, float]
    eval: dict[str, float]
    fit: FitResult


def _eval_batch(cache_dir: Path, n: int) -> dict[str, np.ndarray]:
    from visgen.data.token_cache import read_token_rows  # Ray Data: visgen.config imports this module

    rows = []
    try:
        rows = read_token_rows(cache_dir, "holdout", n)
    except (FileNotFoundError, ValueError):
        pass
    if not rows:
        log.warning("the token cache has no held-out split: the quick eval uses training rows")
        rows = read_token_rows(cache_dir, "train", n)
    if not rows:
        raise ValueError(f"the token cache {cache_dir} is empty: nothing to train the transformer on")
    text = np.empty(len(rows), dtype=object)
    text[:] = [list(map(int, r["text_ids"])) for r in rows]
    return {"text_ids": text, "image_ids": np.stack([np.asarray(r["image_ids"], dtype=np.int64) for r in rows]),
            "caption": np.array([str(r["caption"]) for r in rows], dtype=object)}


RUN_INPUTS = "lm_inputs.json"  # in the run's checkpoint directory: what its token ids mean


def retire_stale_run(run_dir: Path | str, inputs: dict) -> Path | str | None:
    """Keep a run's checkpoints only while they mean the same tokens: when ``run_dir`` holds
    checkpoints made for other inputs (another text or image tokenizer, an older layout — or
    checkpoints without a record, from before the record existed), move the run aside
    (``<run>.stale-<time>``, returned) so that training starts afresh instead of resuming weights
    whose token ids mean something else. Records ``inputs`` for the run either way."""
    if storage.is_url(run_dir):
        return _retire_stale_remote_run(str(run_dir), inputs)
    run_dir = Path(run_dir)
    record = run_dir / RUN_INPUTS
    aside = None
    if latest_checkpoint(run_dir) is not None:
        try:
            old = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if old != inputs:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            aside = run_dir.with_name(f"{run_dir.name}.stale-{stamp}")
            n = 1
            while aside.exists():
                n += 1
                aside = run_dir.with_name(f"{run_dir.name}.stale-{stamp}-{n}")
            run_dir.rename(aside)
            log.warning("the checkpoints in %s were trained for other inputs (%s, now %s): moved to %s; "
                        "training starts afresh", run_dir, old, inputs, aside)
    run_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(inputs, indent=1), encoding="utf-8")
    return aside


def _retire_stale_remote_run(run_dir: str, inputs: dict) -> str | None:
    """:func:`retire_stale_run` for checkpoints in an object store: a copy then a delete (no rename there)."""
    record, aside = storage.join(run_dir, RUN_INPUTS), None
    if latest_checkpoint(run_dir) is not None:
        try:
            old = json.loads(storage.read_text(record))
        except (OSError, ValueError):
            old = None
        if old != inputs:
            aside = f"{run_dir}.stale-{time.strftime('%Y%m%d-%H%M%S')}"
            n = 1
            while storage.exists(aside):
                n += 1
                aside = f"{run_dir}.stale-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
            storage.copy_tree(run_dir, aside)
            storage.delete(run_dir)
            log.warning("the checkpoints in %s were trained for other inputs (%s, now %s): moved to %s; "
                        "training starts afresh", run_dir, old, inputs, aside)
    storage.write_text(record, json.dumps(inputs, indent=1))
    return aside


def check_compatible(model: GPTConfig, image_tokenizer_dir: str | Path, text_tokenizer: str | Path) -> str:
    """The LM config fits the trained tokenizers (codebook, grid, vocabulary); returns the VQ fingerprint."""
    from visgen.text.tokenizer import TextTokenizer  # tokenizers: visgen.config imports this module

    meta = json.loads((Path(image_tokenizer_dir) / VQ_JSON).read_text(encoding="utf-8"))
    vq = meta["config"]
    side = vq["resolution"] // 2 ** (len(vq["ch_mult"]) - 1)
    check_fits(model, codebook_size=vq["codebook_size"], grid=(side, side),
               text_vocab_size=TextTokenizer.load(text_tokenizer).vocab_size,
               image_tokenizer=f"the image tokenizer in {image_tokenizer_dir}", text_tokenizer=f"the text tokenizer {text_tokenizer}")
    return meta["fingerprint"]


def train_lm(model: GPTConfig, recipe: LMRecipe, train: TrainConfig, scaling: ScalingConfig, *,
             cache_dir: str | Path, image_tokenizer_dir: str | Path, text_tokenizer: str | Path,
             workdir: str | Path, sampling: SamplingConfig | None = None, tracking: Any = None,
             run_name: str = RUN_NAME, params: dict | None = None, crash_at: CrashAt | None = None,
             init_from: str | Path | None = None, export_dir: str | Path | None = None) -> LMTrainResult:
    """Train the transformer on the token cache; resume ``run_name`` if it has checkpoints.

    The cache must have been made by the image tokenizer in ``image_tokenizer_dir`` (its
    fingerprint is checked). Exports ``save_gpt`` to ``<workdir>/models/lm``.
    """
    from visgen.data.token_cache import read_token_cache  # Ray Data: visgen.config imports this module
    from visgen.text.tokenizer import TextTokenizer  # tokenizers: visgen.config imports this module

    wd = Workdir(workdir)
    fingerprint = check_compatible(model, image_tokenizer_dir, text_tokenizer)
    retire_stale_run(child(wd.ray_results, run_name), {"format": LM_FORMAT, "image_tokenizer": fingerprint,
                                                       "text_tokenizer": TextTokenizer.load(text_tokenizer).fingerprint()})
    train_ds = read_token_cache(cache_dir, "train", expect_fingerprint=fingerprint)
    eval_batch = _eval_batch(cache_dir, train.eval_samples)
    # The workers read the tokenizers (and write the export) on any node: their shared locations.
    task = LMTask(model, recipe, sampling or SamplingConfig(), wd.shared(image_tokenizer_dir), wd.shared(text_tokenizer),
                  init_from=wd.shared(init_from) if init_from else None)
    export = wd.shared(export_dir) if export_dir else wd.location("models/lm")
    res = fit(task, train=train, scaling=scaling, run_name=run_name, storage_path=wd.ray_results,
              datasets={"train": train_ds}, eval_batch=eval_batch, tracking=tracking, workdir=wd.url or wd.root,
              export_dir=export, crash_at=crash_at,
              params={"lm.model": model, "lm.recipe": recipe, "lm.scaling": scaling, **(params or {})})
    log.info("transformer: %d steps in %.0fs, exported to %s", res.step, res.wall_s, res.export_dir)
    model_dir = res.export_dir
    if wd.url is not None and export.startswith(wd.url + "/"):  # the driver's stages read the local mirror
        rel = export[len(wd.url) + 1:]
        wd.pull(rel)
        model_dir = wd.root / rel
    return LMTrainResult(model_dir=model_dir, metrics=res.metrics, eval=res.eval, fit=res)
