"""Evaluation on any image-text data: numbers that need no judge, no grammar and no downloads.

Computed on the first held-out pairs (image, caption) of ``data.ingest``'s held-out shards, with
the bundle's own parts (:class:`visgen.Model`'s public attributes):

* ``heldout_t2i_loss`` / ``heldout_i2t_loss`` — the training objective on held-out pairs: mean
  next-token cross-entropy (nats) of the image codes given the caption, and of the caption's
  language token, text and ``<eos>`` given the image. The sequences are laid out by the trainer's
  own :func:`visgen.train.lm.assemble` and scored on exactly the tokens :meth:`VisGPT.loss`
  scores (:func:`sequence_nll`; a test holds the two equal). ``*_perplexity`` = exp(loss), per
  token: for t2i between 1 and the codebook size, for i2t up to the text vocabulary.
* ``heldout_caption_bleu_<lang>`` / ``heldout_caption_chrf_<lang>`` — the model's captions of the
  held-out images, each asked for in its reference caption's language, against that one reference
  (sacrebleu corpus BLEU and chrF, 0-100; Chinese tokenised per character for BLEU, effective
  n-gram order so short captions score). One reference only, so BLEU is low even for good captions
  of varied data; chrF (character n-grams) is the steadier of the two.
* ``retrieval_i2t_at1`` — N held-out pairs in groups of K: for each image, the share whose own
  caption scores highest among its group's K captions, by log p(caption | image) less the
  caption's log-mean likelihood over the group's images (its prior: otherwise a caption that is
  likely anyway, short or in a common wording, wins for every image). ``retrieval_t2i_at1`` — for
  each caption, the share whose own image scores highest among the group's K images, by
  log p(image | caption) - log p(image | null prompt) (the image's prior, which the null prompt of
  classifier-free guidance trains the model to know). Chance is 1 / K (``retrieval_chance``); exact
  ties share the credit, so a model that ignores the other modality scores chance exactly.
* ``frechet_vq_encoder`` — Fréchet distance between images generated for held-out captions and
  the held-out images themselves, on the image tokenizer's encoder features (spatial mean of the
  encoder output, ``z_channels`` dimensions). **Not FID**: the features are the bundle's own
  tokenizer's, so compare values only between models sharing one image tokenizer (its fingerprint
  is recorded) and computed from equally many images; it is biased upwards for few images.
* a sample grid: generated images with their prompt under each (``samples.png``, logged to MLflow
  by :func:`visgen.eval.bundle.evaluate_bundle`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from pydantic import Field, model_validator
from sacrebleu.metrics import BLEU

from visgen.base import Section
from visgen.data.captions import detect_language
from visgen.eval.captions import chrf
from visgen.eval.frechet import frechet_from_features
from visgen.models.vq import to_model_input
from visgen.workdir import Workdir

log = logging.getLogger("visgen.eval")

TIE_TOLERANCE = 1e-5  # nats: candidates scored this close to the best share the credit


class HeldoutEvalConfig(Section):
    """Metrics on the held-out shards that hold for any data (loss, captions, retrieval, Fréchet, grid)."""

    samples: int = Field(32, ge=1, le=100_000, description="Held-out pairs for the loss, perplexity and caption BLEU / chrF (the first N).")
    retrieval_n: int = Field(32, ge=0, le=100_000, description="Held-out pairs in the retrieval metrics, in groups of retrieval_k (a remainder is left out); 0 = no retrieval.")
    retrieval_k: int = Field(8, ge=2, le=1000, description="Candidates per query in retrieval: the pairs of its group (the true one and K-1 others); chance = 1/K.")
    images: int = Field(16, ge=0, le=100_000, description="Images generated from held-out captions for the Fréchet distance (against as many real ones); 0 = none.")
    grid: int = Field(8, ge=0, le=64, description="Generated images shown in the sample grid (at most `images`).")
    batch_size: int = Field(64, ge=1, le=8192, description="Sequences scored / images generated per model call.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Seed of the retrieval groups and of the generated images.")

    @model_validator(mode="after")
    def _check(self) -> "HeldoutEvalConfig":
        if self.retrieval_n and self.retrieval_n < self.retrieval_k:
            raise ValueError(f"retrieval_n={self.retrieval_n} is below retrieval_k={self.retrieval_k}: each query needs "
                             f"K - 1 other held-out pairs as candidates")
        if self.images == 1:
            raise ValueError("images=1: the Fréchet distance needs at least 2 images per side (0 switches it off)")
        if self.grid > self.images:
            raise ValueError(f"grid={self.grid} is more than images={self.images}: the grid shows generated images")
        return self


# ---------------------------------------------------------------------------------------------
# Held-out pairs
# ---------------------------------------------------------------------------------------------
def heldout_pairs(ingest: Any, workdir: str | Path, n: int) -> tuple[list[np.ndarray], list[str]]:
    """The first ``n`` held-out (image (R, R, 3) uint8, caption) pairs, as ingest makes them."""
    from visgen.data.ingest import build_dataset  # Ray Data: only reading the held-out split needs it

    ds = build_dataset(ingest, None, Workdir(workdir).quarantine, split="holdout")
    rows = ds.select_columns(["image", "caption"]).take(n)
    if not rows:
        raise ValueError(f"the held-out split of {ingest.source!r} is empty: nothing to evaluate "
                         f"(data.ingest.holdout_shards={ingest.holdout_shards})")
    return [np.asarray(r["image"], dtype=np.uint8) for r in rows], [str(r["caption"]) for r in rows]


def text_ids(tokenizer, lm, captions: Sequence[str]) -> list[list[int]]:
    """Captions → text ids, cut as ingest cuts them for the token cache (``max_text_tokens``)."""
    return tokenizer.encode_batch(list(captions), max_length=lm.cfg.max_text_tokens)


def cjk_table(tokenizer, lm) -> np.ndarray:
    """The trainer's table of text ids that mark a Chinese caption (see :func:`visgen.train.lm.assemble`)."""
    return tokenizer.script_tables(lm.cfg.text_vocab)["cjk"]


# ---------------------------------------------------------------------------------------------
# Teacher-forced scoring
# ---------------------------------------------------------------------------------------------
def sequence_nll(lm, tokens: torch.Tensor, n_t2i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`visgen.models.gpt.VisGPT.sequence_nll`: per row, the summed NLL of what the loss scores
    and how many tokens that is (B,) each, as float64 on the CPU."""
    nll, count = lm.sequence_nll(tokens, n_t2i)
    return nll.double().cpu(), count.double().cpu()


def score_pairs(lm, ids: Sequence[Sequence[int]], codes: torch.Tensor, pairs: np.ndarray, task: str, *,
                cjk: np.ndarray | None, batch_size: int = 64, null: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(nll, count)`` (M,) of M (text index, image index) ``pairs`` as ``task`` ('t2i' / 'i2t')
    sequences; ``null`` scores the images under the null prompt instead of the text (t2i only)."""
    from visgen.train.lm import assemble  # the train loop (0.4 s): geneval imports this module for prompt_sheet

    if task not in ("t2i", "i2t"):
        raise ValueError(f"task {task!r} is not 't2i' or 'i2t'")
    nll, count = [], []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        texts = [ids[t] for t in chunk[:, 0]]
        image = codes[torch.as_tensor(chunk[:, 1])]
        n_t2i = len(chunk) if task == "t2i" else 0
        flags = np.full(len(chunk), null) if task == "t2i" else None
        seq = assemble(texts, image.cpu(), lm.layout, n_t2i, null=flags, cjk=cjk).to(codes.device)
        a, c = sequence_nll(lm, seq, n_t2i)
        nll.append(a.numpy())
        count.append(c.numpy())
    return np.concatenate(nll), np.concatenate(count)


def heldout_loss(lm, ids: Sequence[Sequence[int]], codes: torch.Tensor, *, cjk: np.ndarray | None,
                 batch_size: int = 64) -> dict[str, float]:
    """Held-out loss (nats per token) and perplexity of both tasks on matching (text i, image i) pairs."""
    pairs = np.stack([np.arange(len(ids))] * 2, axis=1)
    out = {}
    for task in ("t2i", "i2t"):
        nll, count = score_pairs(lm, ids, codes, pairs, task, cjk=cjk, batch_size=batch_size)
        loss = float(nll.sum() / max(count.sum(), 1.0))
        out[f"heldout_{task}_loss"] = loss
        out[f"heldout_{task}_perplexity"] = float(np.exp(loss))
    return out


# ---------------------------------------------------------------------------------------------
# Retrieval by the model's own likelihood
# ---------------------------------------------------------------------------------------------
def groups(n: int, k: int, seed: int = 0) -> np.ndarray:
    """(n // k, k) pair indices: the n pairs in a seeded random order, cut into groups of k (a
    remainder of fewer than k pairs is left out)."""
    if not 2 <= k <= n:
        raise ValueError(f"retrieval needs 2 <= k <= n, got k={k} candidates among n={n} pairs")
    order = np.random.default_rng(seed).permutation(n)
    return order[: n // k * k].reshape(-1, k)


def top1(scores: np.ndarray, truth: np.ndarray | None = None, tolerance: float = TIE_TOLERANCE) -> float:
    """Share of rows of ``scores`` (n, k) whose true candidate (column ``truth[i]``, default 0) is highest;
    a row where t candidates tie for the best (within ``tolerance``) and the true one is among them counts 1/t."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] < 2:
        raise ValueError(f"scores must be (n, k >= 2), got shape {s.shape}")
    truth = np.zeros(len(s), dtype=np.int64) if truth is None else np.asarray(truth, dtype=np.int64)
    tied = s >= s.max(axis=1, keepdims=True) - tolerance
    return float(np.mean(np.where(tied[np.arange(len(s)), truth], 1.0 / tied.sum(axis=1), 0.0)))


def _log_mean_exp(x: np.ndarray, axis: int) -> np.ndarray:
    m = x.max(axis=axis, keepdims=True)
    return m + np.log(np.exp(x - m).mean(axis=axis, keepdims=True))


def retrieval(lm, ids: Sequence[Sequence[int]], codes: torch.Tensor, k: int, *, cjk: np.ndarray | None,
              seed: int = 0, batch_size: int = 64) -> dict[str, float]:
    """``retrieval_i2t_at1`` / ``retrieval_t2i_at1`` over the pairs (text i, image i).

    The pairs are cut into groups of ``k`` (:func:`groups`); within a group every image is scored
    with every caption, both ways (k² sequences per direction and group), and each image's
    candidates are its group's captions, each caption's its group's images:

    * i2t: log p(caption | image) minus the caption's log-mean likelihood over the group's k images
      (its prior: without it the caption that is likely anyway — short, in a common wording — wins
      for every image);
    * t2i: log p(image | caption) minus log p(image | null prompt) (the image's prior).

    A model that ignores the other modality scores every candidate alike: exactly chance, 1/k."""
    g = groups(len(ids), k, seed)  # (G, k)
    n_groups = len(g)
    img = np.repeat(g[:, :, None], k, axis=2)  # [group, a, b] = image a
    txt = np.repeat(g[:, None, :], k, axis=1)  # [group, a, b] = caption b
    pairs = np.stack([txt.reshape(-1), img.reshape(-1)], axis=1)
    nll, _ = score_pairs(lm, ids, codes, pairs, "i2t", cjk=cjk, batch_size=batch_size)
    cap = -nll.reshape(n_groups, k, k)  # log p(caption b | image a)
    i2t = (cap - _log_mean_exp(cap, axis=1)).reshape(-1, k)  # rows: images a; columns: captions b
    nll, _ = score_pairs(lm, ids, codes, pairs, "t2i", cjk=cjk, batch_size=batch_size)
    gen = -nll.reshape(n_groups, k, k)  # log p(image a | caption b)
    own = np.stack([g.reshape(-1)] * 2, axis=1)
    prior, _ = score_pairs(lm, ids, codes, own, "t2i", cjk=cjk, batch_size=batch_size, null=True)
    t2i = (gen + prior.reshape(n_groups, k, 1)).transpose(0, 2, 1).reshape(-1, k)  # rows: captions b; columns: images a
    truth = np.tile(np.arange(k), n_groups)  # the true candidate of row a (b) is column a (b)
    return {"retrieval_i2t_at1": top1(i2t, truth), "retrieval_t2i_at1": top1(t2i, truth), "retrieval_chance": 1.0 / k,
            "retrieval_k": k, "retrieval_n": int(g.size)}


# ---------------------------------------------------------------------------------------------
# Captions, Fréchet distance, grid
# ---------------------------------------------------------------------------------------------
def bleu(hypotheses: Sequence[str], references: Sequence[str], language: str) -> float:
    """Corpus BLEU (0-100) against one reference each: English lower-cased with sacrebleu's ``13a``
    tokenizer, Chinese with its ``zh`` one (a token per character). Effective order: n-gram orders the
    hypotheses do not reach are left out, so that captions shorter than four tokens can score."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        return float("nan")
    metric = BLEU(tokenize="zh" if language == "zh" else "13a", lowercase=language != "zh", effective_order=True)
    return float(metric.corpus_score(list(hypotheses), [list(references)]).score)


def caption_scores(predictions: Sequence[str], references: Sequence[str], languages: Sequence[str]) -> dict[str, float]:
    """``heldout_caption_bleu_<lang>`` and ``heldout_caption_chrf_<lang>`` per language asked for."""
    if not len(predictions) == len(references) == len(languages):
        raise ValueError(f"{len(predictions)} captions, {len(references)} references, {len(languages)} languages: "
                         "pass one of each per image")
    out = {}
    for lang in sorted(set(languages)):
        hyp = [p for p, la in zip(predictions, languages) if la == lang]
        ref = [r for r, la in zip(references, languages) if la == lang]
        out[f"heldout_caption_bleu_{lang}"] = bleu(hyp, ref, lang)
        out[f"heldout_caption_chrf_{lang}"] = chrf(hyp, ref)
    return out


@torch.no_grad()
def vq_encoder_features(vq, images: Sequence[np.ndarray], batch_size: int = 64) -> np.ndarray:
    """uint8 images (R, R, 3) → (N, z_channels): the image tokenizer's encoder output, averaged over the grid."""
    device = next(vq.parameters()).device
    feats = []
    for i in range(0, len(images), batch_size):
        x = to_model_input(np.stack(images[i:i + batch_size])).to(device)
        feats.append(vq.encoder(x).float().mean(dim=(2, 3)).cpu().numpy())  # (B, z_channels, h, w) -> (B, z)
    return np.concatenate(feats)


def frechet_vq_encoder(vq, generated: Sequence[np.ndarray], real: Sequence[np.ndarray], batch_size: int = 64) -> dict:
    """``frechet_vq_encoder`` between two image sets, with what the value depends on."""
    g, r = vq_encoder_features(vq, generated, batch_size), vq_encoder_features(vq, real, batch_size)
    return {"frechet_vq_encoder": frechet_from_features(g, r), "frechet_images": int(len(generated)),
            "frechet_feature_dim": int(g.shape[1])}


def prompt_sheet(images: Sequence[np.ndarray], labels: Sequence[str], *, notes: Sequence[str | None] | None = None,
                 scale: int = 4, label_px: int = 44) -> np.ndarray:
    """One row of images, each enlarged ``scale`` times (nearest neighbour) with its label written under
    it, wrapped to the cell (by word, or by character for text without spaces) and, given ``notes``,
    a last line coloured green for "ok", red for "miss". Returns uint8 (H, W, 3).

    PIL's built-in font has Latin glyphs only: other scripts show as boxes (the labels travel as
    text beside the picture wherever it is logged)."""
    if not images or len(images) != len(labels):
        raise ValueError(f"need one label per image and at least one image, got {len(images)} images, {len(labels)} labels")
    font = ImageFont.load_default(size=11)
    notes = list(notes) if notes is not None else [None] * len(images)
    h, w = np.asarray(images[0]).shape[:2]
    cw, ch = w * scale, h * scale + label_px
    sheet = Image.new("RGB", (len(images) * (cw + 4) + 4, ch + 8), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (im, text, note) in enumerate(zip(images, labels, notes)):
        x = 4 + i * (cw + 4)
        sheet.paste(Image.fromarray(np.asarray(im, dtype=np.uint8)).resize((cw, h * scale), Image.Resampling.NEAREST),
                    (x, 4))
        lines = [""]
        for word in str(text).split():
            pieces = [word] if draw.textlength(word, font=font) <= cw else list(word)  # CJK: by character
            for j, piece in enumerate(pieces):
                sep = " " if j == 0 and lines[-1] else ""
                trial = lines[-1] + sep + piece
                if draw.textlength(trial, font=font) <= cw or not lines[-1]:
                    lines[-1] = trial
                else:
                    lines.append(piece)
        if note is not None:
            lines.append(note)
        ok = {"ok": True, "miss": False}.get(note) if note is not None else None
        draw.multiline_text((x, 6 + h * scale), "\n".join(lines[:4]), font=font, spacing=0,
                            fill=(0, 110, 0) if ok else (0, 0, 0) if ok is None else (180, 0, 0))
    return np.asarray(sheet)


# ---------------------------------------------------------------------------------------------
# All of it on a bundle
# ---------------------------------------------------------------------------------------------
def evaluate_heldout(pipe, images: Sequence[np.ndarray], captions: Sequence[str], cfg: HeldoutEvalConfig,
                     out_dir: str | Path | None = None) -> dict:
    """Every metric of the module docstring on held-out ``(images[i], captions[i])`` with the loaded
    :class:`visgen.Model` ``pipe``. Flat metric names at the top level; ``caption_examples``,
    ``grid_prompts`` and ``seconds`` beside them. With ``out_dir`` the grid is written to
    ``<out_dir>/samples.png`` (``"grid"`` holds its path)."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions: pass held-out pairs")
    if len(images) < 2:
        raise ValueError(f"{len(images)} held-out pair(s): the held-out metrics need at least 2")
    lm, tok = pipe.lm, pipe.tokenizer
    t0 = time.perf_counter()
    n_loss = min(cfg.samples, len(images))
    n_ret = min(cfg.retrieval_n, len(images))
    if cfg.retrieval_n and n_ret < cfg.retrieval_k:
        raise ValueError(f"the held-out split has {len(images)} pairs, fewer than eval.heldout.retrieval_k="
                         f"{cfg.retrieval_k}: lower retrieval_k or hold out more data (data.ingest.holdout_shards)")
    n_codes = max(n_loss, n_ret)
    ids = text_ids(tok, lm, captions[:n_codes])
    cjk = cjk_table(tok, lm)
    codes = torch.cat([pipe.encode_images(list(images[i:i + cfg.batch_size]))
                       for i in range(0, n_codes, cfg.batch_size)])  # (n, N)
    out: dict[str, Any] = {"heldout_pairs": n_loss}
    seconds: dict[str, float] = {}
    out.update(heldout_loss(lm, ids[:n_loss], codes[:n_loss], cjk=cjk, batch_size=cfg.batch_size))
    seconds["loss"] = time.perf_counter() - t0

    t = time.perf_counter()
    langs = [detect_language(c) for c in captions[:n_loss]]  # as the trainer labels captions
    preds = pipe.caption(list(images[:n_loss]), language=langs, batch_size=cfg.batch_size)
    out.update(caption_scores(preds, captions[:n_loss], langs))
    out["caption_examples"] = [{"reference": r, "language": la, "generated": p}
                               for r, la, p in zip(captions[:16], langs, preds)]
    seconds["captions"] = time.perf_counter() - t

    if n_ret:
        t = time.perf_counter()
        out.update(retrieval(lm, ids[:n_ret], codes[:n_ret], cfg.retrieval_k, cjk=cjk, seed=cfg.seed,
                             batch_size=cfg.batch_size))
        seconds["retrieval"] = time.perf_counter() - t

    n_img = min(cfg.images, len(images))
    if n_img >= 2:
        t = time.perf_counter()
        prompts = list(captions[:n_img])
        drawn = pipe.generate(prompts, seed=cfg.seed, batch_size=cfg.batch_size)
        out.update(frechet_vq_encoder(pipe.vq, drawn, list(images[:n_img]), cfg.batch_size))
        k = min(cfg.grid, n_img)
        if k and out_dir is not None:
            path = Path(out_dir) / "samples.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(prompt_sheet(drawn[:k], prompts[:k])).save(path)
            out["grid"] = str(path)
        out["grid_prompts"] = prompts[:k]
        seconds["generate"] = time.perf_counter() - t
    out["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    out["heldout_eval_s"] = round(time.perf_counter() - t0, 2)
    return out
