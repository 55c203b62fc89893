"""VisGPT: one decoder-only transformer over text and image tokens.

Text → image, image → text and image completion are one next-token model (DALL-E 1, LlamaGen,
Chameleon, Janus) over a shared vocabulary::

    [0, text_vocab)                          byte-level BPE ids; the specials sit at 0-9
    [text_vocab, text_vocab + codebook_size) image codes of the VQ tokenizer, at an offset
    ... up to a multiple of 64                unused (never emitted, never a target)

Every sequence has the same fixed layout, length L = N + S + 4 with N image tokens and
S = max_text_tokens + 1 text slots (text, ``<eos>``, ``<pad>`` up to S)::

    t2i:  <bos> <t2i> [text <eos> <pad>...] <soi> img_0 ... img_{N-1} <eoi>
    i2t:  <bos> <i2t> <soi> img_0 ... img_{N-1} <eoi> [<lang> text <eos> <pad>...]

The first text slot of an image → text sequence is the caption's language, ``<en>`` or ``<zh>``
(a caption holding a CJK ideograph is Chinese), so a caption holds at most S - 2 tokens there.
The language token is a training target like the text: captioning either lets the model choose
it ("auto") or forces it, and a forced language also blocks the tokens of the other script
(``blocked`` of :meth:`VisGPT.generate_text`, built from the tokenizer by the caller).

A fixed layout needs no attention padding mask (``is_causal`` SDPA, flash kernels on GPU) and
gives every image token a fixed slot. The classifier-free-guidance "null" prompt is the text
region ``[<null> <pad>...]``. Positions: a learned embedding per sequence slot plus a learned
row + column embedding on image tokens, so the 2D grid is shared by both layouts. With
``rope_2d`` the queries and keys of image tokens are also rotated by their row (half of each
head's dimensions) and column (the other half), so attention between two image tokens sees
their offset on the grid whatever the layout (LlamaGen's 2D RoPE; text slots are not rotated).

The loss is per-modality: image targets are scored against image codes only, text targets
against text ids only (the specials other than ``<eos>`` excluded; the language slot against the
language tokens only), so the model never spends probability on the wrong modality, and sampling
applies the same restriction.

Generation keeps a static KV cache and a decode state (the sequences, the position, the step
counter, the seeds and sampling values) in module buffers. One decode step is one function over
them, from the token just written to the next one written (head, guidance, temperature,
top-k / top-p, noise, argmax, the write and the position), with no host input and fixed shapes,
so ``compile_decode()`` captures it whole (a CUDA graph with ``reduce-overhead``). Sampling noise
is a counter-based hash of (seed, step, token id) per row (:mod:`visgen.models.sampling`), so a
seed gives the same output whatever else shares the batch (CFG doubling, serving batches).

Pure PyTorch: no Ray, no MLflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, model_validator

from visgen.base import Section, SpecError, validate_section
from visgen.models.sampling import (  # noqa: F401 - sample, uniform_noise: re-exported for callers of gpt
    check_sampling, guide, pick, sample, uniform_noise,
)
from visgen.models.io import fingerprint, load_model, save_model
from visgen.models.tokens import LANGUAGE_TOKENS, SPECIAL_TOKENS
from visgen.models.vq import LOOK_DIM

SPECIAL = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
BOS, EOS, PAD = SPECIAL["<bos>"], SPECIAL["<eos>"], SPECIAL["<pad>"]
T2I, I2T, SOI, EOI, NULL = SPECIAL["<t2i>"], SPECIAL["<i2t>"], SPECIAL["<soi>"], SPECIAL["<eoi>"], SPECIAL["<null>"]
LANG_IDS = {lang: SPECIAL[tok] for lang, tok in LANGUAGE_TOKENS.items()}  # {"en": <en>, "zh": <zh>}
EN, ZH = LANG_IDS["en"], LANG_IDS["zh"]
CAPTION_LANGUAGES = ("auto", *LANG_IDS)  # what captioning accepts: the model chooses, or one language
TASK_T2I, TASK_I2T = 0, 1
LM_FORMAT = "visgen-lm/2"  # /2: language tokens (ids 8-9) and the language slot of the i2t layout
OBJECT_NOISE = 1 << 20  # object_temperature's second draw: its noise counter, past any image's step


class GPTConfig(Section):
    """Architecture of the transformer and the vocabulary/layout it is built for."""

    # --- architecture --------------------------------------------------------------------
    n_layer: int = Field(12, ge=1, le=256, description="Transformer blocks.")
    n_head: int = Field(12, ge=1, le=256, description="Attention heads; d_model must divide by it.")
    d_model: int = Field(768, ge=8, le=32768, description="Width of the residual stream.")
    ffn_mult: float = Field(8 / 3, gt=0, le=16, description="SwiGLU hidden width = ffn_mult * d_model, rounded up to a multiple of 64.")
    dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout on embeddings, attention probabilities and residual branches (training only).")
    qk_norm: bool = Field(True, description="RMS-normalise queries and keys per head (Chameleon): keeps attention logits bounded.")
    init_std: float = Field(0.02, gt=0, le=1.0, description="Std of the normal initialisation (residual projections scaled by 1/sqrt(2*n_layer)).")
    code_looks: bool = Field(False, description=(
        "Add to each image code's input embedding and output-head row a learned projection of what the code "
        "looks like (its decoded patch as 4x4 RGB, from the image tokenizer): codes that look alike start "
        "alike, so the many rarely seen codes learn from the common ones."))
    tie_embeddings: bool = Field(False, description=(
        "Use the input embedding table as the output head (one matrix): what t2i learns about which code "
        "to draw and i2t about which word to write shapes the embeddings the other direction reads."))
    pooled_condition: bool = Field(False, description=(
        "Add a learned projection of the condition's mean token embedding (the prompt's words in text -> image, "
        "the picture's codes in image -> text) to every position after the condition: each output slot sees "
        "the whole condition from the first layer on, before attention has learned where to look for it."))
    grid_context: bool = Field(False, description=(
        "Add to the input of each text -> image slot a learned projection of the embeddings of the three codes "
        "above the code it predicts (above-left, above, above-right; the code to its left is the slot's own "
        "input): every slot sees the causal neighbourhood an outline continues from, without attention having "
        "to learn where on the grid it lies. Image -> text and text slots are unchanged."))
    grid_context_radius: int = Field(1, ge=1, le=4, description=(
        "With grid_context: how far the causal neighbourhood reaches. 1 = the three codes above; r > 1 = the "
        "codes in the r rows above within r columns either side, and the r - 1 codes left of the slot's own input "
        "in its row (11 codes at r = 2), each embedding projected to d_model / 4 before the projection to d_model "
        "(the wider window costs about what the three full embeddings do). An object's outline and extent span "
        "more than one row: this lets one block see how far the object drawn so far reaches."))
    neighbour_context: bool = Field(False, description=(
        "Add to the input of each image -> text image slot a local feature of the 3x3 neighbourhood of its code "
        "(a 3x3 convolution over the code embeddings to d_model / 2 channels, SiLU, a projection back): the "
        "caption reads outlines (which boundary codes sit next to which), not only single codes, even with one "
        "block. The picture is wholly given before the caption, so the slots may see codes after them; no loss "
        "is taken at image slots of image -> text rows. Text -> image slots are unchanged."))
    rope_2d: bool = Field(False, description=(
        "Rotate the queries and keys of image tokens by their row (half of each head's dimensions) and column "
        "(the other half), 2D RoPE: attention between two image tokens depends on their offset on the grid "
        "from the first step on, instead of learning it from absolute positions. Text slots are not rotated; "
        "the learned position embeddings stay. Needs head_dim divisible by 4."))
    rope_base: float = Field(100.0, gt=1.0, le=1e6, description=(
        "2D RoPE frequency base: rotation pair i of an axis turns by base^(-i/(head_dim/4)) per grid step."))
    # --- vocabulary and layout (derived from the other components in a pipeline spec) -----
    text_vocab: int = Field(16384, ge=len(SPECIAL_TOKENS) + 1, le=1 << 20,
                            description="Text ids [0, text_vocab) incl. the specials; = text_tokenizer.vocab_size.")
    codebook_size: int = Field(16384, ge=2, le=1 << 20, description="Image codes; = the image tokenizer's codebook_size.")
    grid: tuple[int, int] = Field((16, 16), description="Image tokens per column and row (h, w); = the tokenizer's latent grid.")
    max_text_tokens: int = Field(64, ge=1, le=4096, description="Text tokens per caption/prompt (longer text is cut); = data.ingest.max_text_tokens.")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def vocab_size(self) -> int:
        """Embedding rows: text + image ids rounded up to a multiple of 64 (aligned matmuls)."""
        return -(-(self.text_vocab + self.codebook_size) // 64) * 64

    @property
    def ffn_hidden(self) -> int:
        return -(-int(self.ffn_mult * self.d_model) // 64) * 64

    @model_validator(mode="after")
    def _check_shapes(self) -> "GPTConfig":
        if self.d_model % self.n_head:
            raise ValueError(f"d_model={self.d_model} does not divide by n_head={self.n_head}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = d_model / n_head = {self.head_dim} must be even")
        if self.grid_context_radius != 1 and not self.grid_context:
            raise ValueError(f"grid_context_radius={self.grid_context_radius} sizes the window of grid_context, "
                             "which is off: set grid_context: true or leave the radius at 1")
        if self.rope_2d and self.head_dim % 4:
            raise ValueError(f"rope_2d splits each head between rows and columns: head_dim = d_model / n_head "
                             f"= {self.head_dim} must divide by 4")
        if min(self.grid) < 1 or max(self.grid) > 1024:
            raise ValueError(f"grid must be two sizes in [1, 1024], got {self.grid}")
        return self


PRESETS: dict[str, dict] = {
    # Unit tests: a few thousand parameters.
    "tiny": dict(n_layer=2, n_head=2, d_model=64, dropout=0.0),
    # The 2-core CPU demo (32 px, 8x8 tokens): ~0.8 M parameters in the blocks.
    "mini": dict(n_layer=4, n_head=4, d_model=128, dropout=0.0),
    # CPU experiments / a small GPU run: ~2.7 M parameters in the blocks.
    "small": dict(n_layer=6, n_head=4, d_model=192, dropout=0.1),
    # GPU scale: 12 x 768 (~85 M in the blocks, ~105 M with a 24k vocabulary), LlamaGen-B-like.
    "base": dict(n_layer=12, n_head=12, d_model=768, dropout=0.1),
}


def grid_offsets(radius: int) -> list[tuple[int, int]]:
    """``grid_context``'s causal window, (row, column) offsets from the predicted cell: the ``radius``
    rows above within ``radius`` columns either side, then the cells left of the slot's own input
    (the code just left of the cell) in its row. Radius 1: above-left, above, above-right."""
    rows = [(dr, dc) for dr in range(-radius, 0) for dc in range(-radius, radius + 1)]
    return rows + [(0, dc) for dc in range(-radius, -1)]


def gpt_config(preset: str = "small", **overrides) -> GPTConfig:
    """A preset with overrides, validated: ``gpt_config("tiny", text_vocab=512, grid=(4, 4))``."""
    if preset not in PRESETS:
        raise SpecError(f"unknown GPT preset {preset!r}; choose one of {sorted(PRESETS)}")
    return validate_section(GPTConfig, {**PRESETS[preset], **overrides}, where="lm.model")


# ---------------------------------------------------------------------------------------------
# Sequence layout
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Index arithmetic of the two fixed sequence layouts (see the module docstring)."""

    n_image: int  # N
    text_slots: int  # S = max_text_tokens + 1
    text_vocab: int

    @property
    def length(self) -> int:
        return self.n_image + self.text_slots + 4

    # t2i: <bos> <t2i> [S text slots] <soi> [N image] <eoi>
    @property
    def t2i_text(self) -> slice:
        return slice(2, 2 + self.text_slots)

    @property
    def t2i_soi(self) -> int:
        return 2 + self.text_slots

    @property
    def t2i_image(self) -> slice:
        return slice(self.t2i_soi + 1, self.t2i_soi + 1 + self.n_image)

    # i2t: <bos> <i2t> <soi> [N image] <eoi> [S text slots]
    @property
    def i2t_image(self) -> slice:
        return slice(3, 3 + self.n_image)

    @property
    def i2t_eoi(self) -> int:
        return 3 + self.n_image

    @property
    def i2t_text(self) -> slice:
        return slice(self.i2t_eoi + 1, self.i2t_eoi + 1 + self.text_slots)

    def text_region(self, ids: Sequence[int] | None, lang: str | None = None) -> list[int]:
        """``ids`` (cut to S - 1) + ``<eos>`` + ``<pad>``s; ``None`` is the null prompt ``<null> <pad>...``.

        ``lang`` ('en' / 'zh') makes the image → text region: ``<lang>`` + ``ids`` (cut to S - 2) + ...
        """
        if ids is None:
            return [NULL] + [PAD] * (self.text_slots - 1)
        head = [] if lang is None else [lang_id(lang)]
        ids = [int(i) for i in ids][: self.text_slots - 1 - len(head)]
        bad = [i for i in ids if not len(SPECIAL_TOKENS) <= i < self.text_vocab]
        if bad:
            raise ValueError(f"text ids must be non-special ids in [{len(SPECIAL_TOKENS)}, {self.text_vocab}); got {bad[:5]}")
        return head + ids + [EOS] + [PAD] * (self.text_slots - 1 - len(head) - len(ids))

    def text_regions(self, ids: torch.Tensor, lengths: torch.Tensor, lang: torch.Tensor | None = None,
                     null: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`text_region` for a batch, without a Python loop over rows: ``ids`` (B, W) long, of
        which row i holds ``lengths[i]`` ids (the rest is ignored) → (B, S). ``lang`` (B,) language
        token ids makes image → text regions; ``null`` (B,) bool puts the null prompt on those rows."""
        b, s = ids.shape[0], self.text_slots
        off = 0 if lang is None else 1
        cap = s - 1 - off
        if ids.shape[1] < cap:
            ids = torch.cat([ids, ids.new_full((b, cap - ids.shape[1]), PAD)], dim=1)
        body = ids[:, :cap]
        n = lengths.to(ids.device).long().clamp(0, cap)
        valid = torch.arange(cap, device=ids.device)[None] < n[:, None]
        bad = valid & ((body < len(SPECIAL_TOKENS)) | (body >= self.text_vocab))
        if bool(bad.any()):
            raise ValueError(f"text ids must be non-special ids in [{len(SPECIAL_TOKENS)}, {self.text_vocab}); "
                             f"got {body[bad][:5].tolist()}")
        out = ids.new_full((b, s), PAD)
        out[:, off: off + cap] = torch.where(valid, body, PAD)
        out[torch.arange(b, device=ids.device), off + n] = EOS
        if lang is not None:
            out[:, 0] = lang.to(ids.device)
        if null is not None:
            out[null.to(ids.device)] = torch.tensor(self.text_region(None), dtype=out.dtype, device=ids.device)
        return out

    def t2i(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """(B, S) text regions + (B, N) codes → (B, L) token ids."""
        b = text.shape[0]
        col = lambda v: torch.full((b, 1), v, dtype=torch.long, device=text.device)  # noqa: E731
        return torch.cat([col(BOS), col(T2I), text, col(SOI), image + self.text_vocab, col(EOI)], dim=1)

    def i2t(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b = text.shape[0]
        col = lambda v: torch.full((b, 1), v, dtype=torch.long, device=text.device)  # noqa: E731
        return torch.cat([col(BOS), col(I2T), col(SOI), image + self.text_vocab, col(EOI), text], dim=1)


def lang_id(language: str) -> int:
    """The special token id of caption language ``language`` ('en' / 'zh')."""
    if language not in LANG_IDS:
        raise ValueError(f"unknown caption language {language!r}; allowed: {', '.join(map(repr, LANG_IDS))}")
    return LANG_IDS[language]


def caption_languages(language: str | Sequence[str | None] | None, n: int) -> list[str]:
    """``language`` for ``n`` captions → one of :data:`CAPTION_LANGUAGES` per caption (None = 'auto');
    a ValueError naming the value and the allowed ones for anything else."""
    langs = [language] * n if language is None or isinstance(language, str) else list(language)
    if len(langs) != n:
        raise ValueError(f"{len(langs)} languages for {n} images; pass one language, or one per image")
    out = []
    for lang in langs:
        lang = "auto" if lang is None else lang
        if lang not in CAPTION_LANGUAGES:
            raise ValueError(f"language {lang!r} is not allowed; allowed: {', '.join(map(repr, CAPTION_LANGUAGES))}")
        out.append(lang)
    return out


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------
class KVCache(nn.Module):
    """Static per-layer cache: (B, H, L, Dh) key and value buffers written in place at ``input_pos``."""

    def __init__(self, batch: int, heads: int, length: int, head_dim: int, dtype: torch.dtype, device):
        super().__init__()
        shape = (batch, heads, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k, self.v


class DecodeState(nn.Module):
    """What a decode step reads and writes besides the KV cache, as buffers at fixed addresses:
    the compiled step updates them in place, so a token needs no host input and a CUDA graph can
    replay the step. One per batch of ``rows`` sequences, reused while the row count fits."""

    def __init__(self, rows: int, length: int, text_vocab: int, width: int, device):
        super().__init__()
        long = dict(dtype=torch.long, device=device)
        f32 = dict(dtype=torch.float32, device=device)  # sampling values: the logits are sampled in fp32
        for name, t in {
            "seq": torch.zeros(rows, length, **long),  # (B', L) the sequences being written
            "pos": torch.zeros(1, **long),  # the slot of the token the next step reads
            "step": torch.zeros((), **long),  # image code / text slot index of the next token: the noise counter
            "seeds": torch.zeros(rows, **long),  # (B',); a guided batch repeats its B seeds
            "task": torch.zeros(rows, **long),  # (B',) TASK_T2I / TASK_I2T
            "cfg_scale": torch.ones((), **f32),
            "temperature": torch.ones((), **f32),
            "top_p": torch.ones((), **f32),
            "object_temperature": torch.ones((), **f32),  # images: of the code drawn once not the background
            "object_cfg_scale": torch.ones((), **f32),  # images: the guidance scale of that draw
            "object_min_p": torch.zeros((), **f32),  # images: that draw's plausibility bound (0 = none)
            "background": torch.zeros((), **long),  # images: the background code of object_temperature
            "forced": torch.zeros(rows, **long),  # (B,) captions: the requested language token, -1 = the model's choice
            "blocked": torch.zeros(rows, text_vocab, dtype=torch.bool, device=device),  # (B, V_text) captions
            "done": torch.zeros(rows, dtype=torch.bool, device=device),  # (B,) captions: <eos> written
            "cond": torch.zeros(rows, width, **f32),  # (B', d) pooled_condition: VisGPT.condition of each row
        }.items():
            self.register_buffer(name, t, persistent=False)

    def fits(self, rows: int, device) -> bool:
        return self.seq.shape[0] == rows and self.seq.device == torch.device(device) \
            and self.temperature.dtype == torch.float32  # a later model.to(dtype) casts buffers too

    def start(self, seq: torch.Tensor, task: int, seeds: torch.Tensor, *, pos: int, step: int, temperature: float,
              top_p: float, cfg_scale: float = 1.0, forced: torch.Tensor | None = None,
              blocked: torch.Tensor | None = None, object_temperature: float = 1.0, background: int = 0,
              object_cfg_scale: float = 1.0, object_min_p: float = 0.0) -> None:
        """Load a new batch (copies and fills: no buffer is replaced)."""
        self.seq.copy_(seq)
        self.task.fill_(task)
        self.seeds.copy_(seeds)
        self.pos.fill_(pos)
        self.step.fill_(step)
        self.cfg_scale.fill_(cfg_scale)
        self.temperature.fill_(temperature)
        self.top_p.fill_(top_p)
        self.object_temperature.fill_(object_temperature)
        self.object_cfg_scale.fill_(object_cfg_scale)
        self.object_min_p.fill_(object_min_p)
        self.background.fill_(background)
        self.done.zero_()
        if forced is not None:
            self.forced.copy_(forced)
        if blocked is not None:
            self.blocked.copy_(blocked)  # (V_text,) broadcasts to every row


def _plan(temperature: float, top_k: int, top_p: float, vocab: int) -> dict:
    """The structural switches of :func:`visgen.models.sampling.pick` for these sampling values:
    what selects a compiled graph (a no-op filter normalised away, so it selects none of its own)."""
    greedy = temperature == 0
    return dict(greedy=greedy, top_k=0 if greedy or top_k >= vocab else top_k, nucleus=not greedy and top_p < 1.0)


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` whose weight follows the input's dtype. Under bf16 autocast q and k arrive in
    bf16 while the weight stays fp32; the mixed pair cannot use the fused kernel (PyTorch falls
    back to the composite one and warns). The kernel still accumulates in fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype) if self.weight is not None else None
        return F.rms_norm(x, self.normalized_shape, weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim, self.dropout = cfg.n_head, cfg.head_dim, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(cfg.head_dim) if cfg.qk_norm else nn.Identity()
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # 3 x (B, H, s, Dh)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # the keys are cached rotated: a decode step rotates only its own token
            q, k = rotate(q, *rope), rotate(k, *rope)
        if input_pos is not None:  # incremental: attend over the whole static cache, masked to the past
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, H, L, Dh)
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, s, d))

    def forward_at(self, x: torch.Tensor, groups: Sequence[tuple[slice, slice]], causal: torch.Tensor,
                   rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """A causal pass over whole sequences ``x`` (B, L, d) whose output is wanted only at some slots:
        for each (rows, slots) of ``groups`` (contiguous slices), the (rows, slots, d) output of those
        rows at those slots, equal to :meth:`forward`'s there. Keys and values come from every slot; the
        queries, the attention and the projection only from the slots asked for. ``causal``: the (L, L)
        lower-triangular bool mask."""
        b, L, d = x.shape
        w = self.qkv.weight
        kv = F.linear(x, w[d:]).view(b, L, 2, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # 2 x (B, H, L, Dh)
        k, v = self.k_norm(kv[0]), kv[1]
        if rope is not None:
            k = rotate(k, *rope)
        out = []
        for rows, slots in groups:
            xq = x[rows, slots]
            n, s = xq.shape[:2]
            q = self.q_norm(F.linear(xq, w[:d]).view(n, s, self.n_head, self.head_dim).transpose(1, 2))
            if rope is not None:
                q = rotate(q, rope[0][rows, :, slots], rope[1][rows, :, slots])
            end = slots.stop  # the slots after the last query are masked anyway: leave them out
            y = F.scaled_dot_product_attention(q, k[rows, :, :end], v[rows, :, :end], attn_mask=causal[slots, :end],
                                               dropout_p=self.dropout if self.training else 0.0)
            out.append(self.proj(y.transpose(1, 2).reshape(n, s, d)))
        return out


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (B, H, s, Dh) with angles' ``cos`` / ``sin`` (B, 1, s, Dh/2): pair i is (x_i, x_{i+Dh/2})."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class SwiGLU(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.ffn_hidden, bias=False)
        self.down = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(cfg.d_model), RMSNorm(cfg.d_model)
        self.attn, self.mlp = Attention(cfg), SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), input_pos, mask, rope))
        return x + self.drop(self.mlp(self.mlp_norm(x)))

    def forward_at(self, x: torch.Tensor, groups: Sequence[tuple[slice, slice]], causal: torch.Tensor,
                   rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """:meth:`forward` of whole sequences ``x`` (B, L, d), computed only where it is wanted: the
        (rows, slots, d) output of each (rows, slots) of ``groups`` (see :meth:`Attention.forward_at`).
        The groups' slots go through the MLP together, as one matrix."""
        attn = self.attn.forward_at(self.attn_norm(x), groups, causal, rope)
        y = [x[rows, slots] + self.drop(a) for (rows, slots), a in zip(groups, attn)]
        flat = torch.cat([t.flatten(0, 1) for t in y])
        flat = flat + self.drop(self.mlp(self.mlp_norm(flat)))
        return [part.view_as(t) for part, t in zip(flat.split([t.shape[0] * t.shape[1] for t in y]), y)]


class _TiedHead(nn.Module):
    """The output head of ``tie_embeddings``: ``weight`` is the embedding table's, held outside the
    module tree so the state dict (and the safetensors file) stores the matrix once, as ``tok_emb``."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self._tied = [embedding]  # a list: not registered as a submodule

    @property
    def weight(self) -> torch.Tensor:
        return self._tied[0].weight


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
class VisGPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        h, w = cfg.grid
        self.layout = Layout(n_image=h * w, text_slots=cfg.max_text_tokens + 1, text_vocab=cfg.text_vocab)
        L, d = self.layout.length, cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.pos_emb = nn.Embedding(L, d)
        self.row_emb, self.col_emb = nn.Embedding(h, d), nn.Embedding(w, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(d)
        self.head = _TiedHead(self.tok_emb) if cfg.tie_embeddings else nn.Linear(d, cfg.vocab_size, bias=False)
        if cfg.pooled_condition:
            self.cond_proj = nn.Linear(d, d, bias=False)
        offsets = grid_offsets(cfg.grid_context_radius)  # grid_context's causal window (the slot table below)
        if cfg.grid_context:
            if cfg.grid_context_radius == 1:
                self.ctx_proj = nn.Linear(len(offsets) * d, d, bias=False)
            else:  # each code's embedding narrowed first: 11 codes at r = 2 cost what 3 full ones do
                self.ctx_down = nn.Linear(d, d // 4, bias=False)
                self.ctx_proj = nn.Linear(len(offsets) * (d // 4), d, bias=False)
        if cfg.neighbour_context:
            self.nbr_conv = nn.Conv2d(d, d // 2, 3, padding=1, bias=False)
            self.nbr_proj = nn.Linear(d // 2, d, bias=False)
        if cfg.code_looks:  # filled by set_code_looks() from the image tokenizer, saved with the weights
            self.register_buffer("code_look", torch.zeros(cfg.codebook_size, LOOK_DIM))
            self.look_in = nn.Linear(LOOK_DIM, d, bias=False)
            self.look_out = nn.Linear(LOOK_DIM, d, bias=False)

        # Per task and sequence slot: which image cell sits there (N = "not an image token").
        n, lay = self.layout.n_image, self.layout
        slot = torch.full((2, L), n, dtype=torch.long)
        slot[TASK_T2I, lay.t2i_image] = torch.arange(n)
        slot[TASK_I2T, lay.i2t_image] = torch.arange(n)
        self.register_buffer("image_slot", slot, persistent=False)
        # grid_context: per t2i slot, the slots holding the codes of the causal window around the code
        # that slot predicts (slot t2i_soi + j predicts cell j; grid_offsets); L where there is none.
        target = torch.arange(n)
        r, c = target // w, target % w
        above = torch.full((L, len(offsets)), L, dtype=torch.long)
        for k, (dr, dc) in enumerate(offsets):
            ok = (r + dr >= 0) & (c + dc >= 0) & (c + dc < w)
            above[lay.t2i_soi + target[ok], k] = lay.t2i_image.start + (r[ok] + dr) * w + c[ok] + dc
        self.register_buffer("context_slot", above, persistent=False)
        if cfg.rope_2d:  # per task and slot, the rotation angles: rows on the first half of the pairs, columns on the second
            quarter = cfg.head_dim // 4
            freq = cfg.rope_base ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
            cells = torch.arange(n + 1)  # row n: not an image slot, angle 0
            rows, cols = (cells // w).double(), (cells % w).double()
            angle = torch.cat([rows[:, None] * freq, cols[:, None] * freq], dim=1)  # (N + 1, Dh/2)
            angle[n] = 0.0
            angle = angle[slot]  # (2, L, Dh/2)
            self.register_buffer("rope_cos", angle.cos().float(), persistent=False)
            self.register_buffer("rope_sin", angle.sin().float(), persistent=False)
        self.register_buffer("causal", torch.ones(L, L, dtype=torch.bool).tril(), persistent=False)
        # Per task: the first slot after the condition (t2i: <soi>, i2t: <eoi>), where pooled_condition adds it.
        self.register_buffer("cond_from", torch.tensor([lay.t2i_soi, lay.i2t_eoi]), persistent=False)
        # Text positions may emit any text id and <eos>, never another special; the language slot
        # (the first i2t text slot) only a language token.
        blocked = torch.zeros(cfg.text_vocab, dtype=torch.bool)
        blocked[: len(SPECIAL_TOKENS)] = True
        blocked[EOS] = False
        self.register_buffer("text_blocked", blocked, persistent=False)
        lang_only = torch.ones(cfg.text_vocab, dtype=torch.bool)
        lang_only[list(LANG_IDS.values())] = False
        self.register_buffer("lang_blocked", lang_only, persistent=False)
        i2t = blocked[None].repeat(self.layout.text_slots, 1)
        i2t[0] = lang_only
        self.register_buffer("i2t_blocked", i2t, persistent=False)  # (S, V_text), per i2t text slot
        self.decode_state: DecodeState | None = None  # allocated by the first generation
        self._compiled_steps: dict = {}  # compile_decode(): {"image": fn, "text": fn}
        self._init_weights()

    def _init_weights(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.ndim < 2:
                continue  # norm gains stay at 1
            scale = 1 / math.sqrt(2 * self.cfg.n_layer) if name.endswith(("proj.weight", "down.weight")) else 1.0
            nn.init.normal_(p, mean=0.0, std=std * scale)

    def set_code_looks(self, looks: torch.Tensor) -> None:
        """Store what each image code looks like, ``VQModel.code_looks()`` (K, LOOK_DIM), before training."""
        if not self.cfg.code_looks:
            raise ValueError("this transformer was built with code_looks=false: it has no place for code looks")
        want = (self.cfg.codebook_size, LOOK_DIM)
        if tuple(looks.shape) != want or not looks.is_floating_point() or not bool(torch.isfinite(looks).all()):
            raise ValueError(f"code looks must be finite floats of shape {want} (VQModel.code_looks()), got "
                             f"{looks.dtype} {tuple(looks.shape)}")
        self.code_look.copy_(looks)

    # -- sizes ----------------------------------------------------------------------------------
    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not embeddings:
            n -= sum(m.weight.numel() for m in (self.tok_emb, self.pos_emb, self.row_emb, self.col_emb))
        return n

    def flops_per_token(self, t2i_ratio: float = 0.5) -> float:
        """Training FLOPs per sequence slot (forward + backward), as :meth:`loss` executes them.

        PaLM's MFU count, 6 N + 12 L d T, for the blocks (N: the blocks' matmul weights; T: the
        layout length; norms and embeddings are not matmuls), except that the last block computes
        its queries, attention, projection and MLP only at the slots the loss scores
        (:meth:`hidden_at`; keys and values at every slot), plus the output head only where the loss
        computes it: the N image positions x the codebook on t2i rows, the text slots x the text
        vocabulary on i2t rows, mixed by ``t2i_ratio``. Counting the whole head at every slot would
        overstate the work (and the MFU) several times over for a small model with a large vocabulary.
        """
        if not 0.0 <= t2i_ratio <= 1.0:
            raise ValueError(f"t2i_ratio must be within [0, 1], got {t2i_ratio}")
        lay, d, L = self.layout, self.cfg.d_model, self.layout.length
        per_block = sum(mod.weight.numel() for mod in self.blocks[0].modules() if isinstance(mod, nn.Linear))
        kv = 2 * d * d  # the last block's key and value projections: at every slot
        full = (self.cfg.n_layer - 1) * (6 * per_block * L + 12 * d * L * L) + 6 * kv * L  # per sequence
        scored = {TASK_T2I: (lay.n_image, lay.t2i_soi + lay.n_image), TASK_I2T: (lay.text_slots, lay.i2t_eoi + lay.text_slots)}
        last = {task: 6 * (per_block - kv) * n + 12 * d * n * end for task, (n, end) in scored.items()}
        last_block = t2i_ratio * last[TASK_T2I] + (1 - t2i_ratio) * last[TASK_I2T]
        head = 6 * d * (t2i_ratio * lay.n_image * self.cfg.codebook_size
                        + (1 - t2i_ratio) * lay.text_slots * self.cfg.text_vocab)
        return (full + last_block + head) / L

    # -- forward ----------------------------------------------------------------------------------
    def condition(self, tokens: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """``pooled_condition``: sequences (B, >= the condition's end) → (B, d), the projected mean
        embedding of each row's condition: the prompt's tokens other than ``<pad>`` (the null prompt
        is its ``<null>``) on t2i rows, the picture's codes on i2t rows."""
        lay = self.layout
        text = tokens[:, lay.t2i_text]
        keep = (text != PAD).unsqueeze(-1).to(self.tok_emb.weight.dtype)
        words = (self.tok_emb(text) * keep).sum(1) / keep.sum(1).clamp(min=1)
        codes = self.tok_emb(tokens[:, lay.i2t_image]).mean(1)
        return self.cond_proj(torch.where((task == TASK_T2I)[:, None], words, codes))

    def grid_context(self, seq: torch.Tensor, positions: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """``grid_context``: (B, s, d), at slots ``positions`` (s,) of the sequences ``seq`` (B, >= the
        slots read), the projected embeddings of the codes in the causal window of the code each t2i
        slot predicts (:func:`grid_offsets`; zero where the grid has none, and on i2t rows). Every slot read
        lies before the slot itself, so the model stays causal."""
        L = self.layout.length
        idx = self.context_slot[positions]  # (s, K)
        (b, s), k = (seq.shape[0], idx.shape[0]), idx.shape[1]
        flat = idx.clamp(max=seq.shape[1] - 1).reshape(-1)  # (K s,)
        keep = (idx < L).to(self.tok_emb.weight.dtype)[None, :, :, None]  # (1, s, K, 1)
        if self.cfg.grid_context_radius == 1:
            e = self.tok_emb(seq.gather(1, flat[None].expand(b, -1)))
        elif k * s > seq.shape[1]:  # a pass over many slots: narrow each slot's embedding once, then gather
            e = self.ctx_down(self.tok_emb(seq)).index_select(1, flat)
        else:  # a decode step: narrow only the codes it reads
            e = self.ctx_down(self.tok_emb(seq.gather(1, flat[None].expand(b, -1))))
        e = e.view(b, s, k, -1) * keep
        return self.ctx_proj(e.flatten(2)) * (task == TASK_T2I).to(e.dtype)[:, None, None]

    def neighbour_context(self, seq: torch.Tensor, positions: torch.Tensor, task: torch.Tensor,
                          first_i2t: int = 0) -> torch.Tensor | None:
        """``neighbour_context``: (B, s, d), at slots ``positions`` (s,) of the sequences ``seq`` (B, >= the
        i2t image's end), the local feature of the 3x3 neighbourhood of the code at each i2t image slot
        (zero elsewhere and on t2i rows); None when ``seq`` does not hold a whole i2t image, or when
        ``first_i2t`` (the caller's word that the rows before it are t2i: a training batch's ``n_t2i``)
        leaves no row to compute."""
        lay = self.layout
        if seq.shape[1] < lay.i2t_image.stop or first_i2t >= seq.shape[0]:
            return None
        (h, w), b, d = self.cfg.grid, seq.shape[0] - first_i2t, self.cfg.d_model
        grid = self.tok_emb(seq[first_i2t:, lay.i2t_image]).transpose(1, 2).reshape(b, d, h, w)
        feat = F.silu(self.nbr_conv(grid)).flatten(2).transpose(1, 2)  # (b, N, d/2)
        feat = torch.cat([feat, feat.new_zeros(b, 1, feat.shape[2])], 1)  # row N: not an i2t image slot
        cells = self.image_slot[TASK_I2T][positions]  # (s,)
        out = self.nbr_proj(feat[:, cells]) * (task[first_i2t:] == TASK_I2T).to(feat.dtype)[:, None, None]
        return torch.cat([out.new_zeros(first_i2t, *out.shape[1:]), out]) if first_i2t else out

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor, task: torch.Tensor,
              cond: torch.Tensor | None = None, seq: torch.Tensor | None = None, first_i2t: int = 0) -> torch.Tensor:
        """(B, s) ids at slots ``positions`` (s,) of layout ``task`` (B,) → (B, s, d); ``cond`` (B, d),
        :meth:`condition`, is added at the slots after the condition. ``seq`` (B, >= s's slots): the
        whole sequences the ids come from, which ``grid_context`` reads (default: ``tokens``, when
        they are the sequences from slot 0). ``first_i2t``: the caller's word that the rows before it
        are t2i and the rest i2t (a training batch's ``n_t2i``; 0: no word), so ``neighbour_context``
        skips the first (it reads i2t rows only) and ``grid_context`` the others."""
        n = self.layout.n_image
        w = self.cfg.grid[1]
        cells = torch.arange(n, device=tokens.device)
        cell = self.row_emb(cells // w) + self.col_emb(cells % w)  # (N, d)
        cell = torch.cat([cell, cell.new_zeros(1, cell.shape[1])])  # row N: not an image slot
        slot = self.image_slot[task][:, positions]  # (B, s)
        x = self.tok_emb(tokens)
        if self.cfg.code_looks:  # image ids take the projected look of their code
            tv, k = self.cfg.text_vocab, self.cfg.codebook_size
            code = (tokens - tv).clamp(0, k - 1)
            is_image = ((tokens >= tv) & (tokens < tv + k))[..., None]
            x = x + F.embedding(code, self.look_in(self.code_look.to(x.dtype))) * is_image
        x = x + self.pos_emb(positions) + cell[slot]
        if self.cfg.grid_context:
            seq_ = tokens if seq is None else seq
            s, lo = positions.shape[0], self.layout.t2i_soi
            hi = min(lo + n, s)
            if first_i2t and s == seq_.shape[1] and hi > lo:
                # A pass over whole sequences from slot 0 whose first rows are t2i: only those rows' slots
                # that predict an image code have a window (half of a training batch's slots).
                ctx = self.grid_context(seq_[:first_i2t], positions[lo:hi], task[:first_i2t])
                x = x + F.pad(ctx, (0, 0, lo, s - hi, 0, x.shape[0] - first_i2t))
            else:
                x = x + self.grid_context(seq_, positions, task)
        # i2t image slots are embedded only in passes over many slots (training, scoring, a caption's
        # prefill, the picture all written); a one-slot decode step never sits on one.
        if self.cfg.neighbour_context and positions.shape[0] > 1:
            nbr = self.neighbour_context(tokens if seq is None else seq, positions, task, first_i2t)
            if nbr is not None:
                x = x + nbr
        if cond is not None:
            after = (positions[None] >= self.cond_from[task][:, None]).unsqueeze(-1)  # (B, s, 1)
            x = x + cond[:, None].to(x.dtype) * after
        return self.drop(x)

    def hidden(self, tokens: torch.Tensor, task: torch.Tensor, first_i2t: int = 0) -> torch.Tensor:
        """Full causal pass over whole sequences (B, L) → final-norm hidden states (B, L, d);
        ``first_i2t`` as in :meth:`embed` (a training batch's ``n_t2i``)."""
        x, rope = self._embed_whole(tokens, task, first_i2t)
        for block in self.blocks:
            x = block(x, rope=rope)
        return self.norm(x)

    def _embed_whole(self, tokens: torch.Tensor, task: torch.Tensor,
                     first_i2t: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """The input of a pass over whole sequences (B, L) from slot 0: the embeddings (B, L, d) and the rope angles."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        cond = self.condition(tokens, task) if self.cfg.pooled_condition else None
        return self.embed(tokens, positions, task, cond, first_i2t=first_i2t), self.rope(positions, task)

    def hidden_at(self, tokens: torch.Tensor, task: torch.Tensor, groups: Sequence[tuple[slice, slice]],
                  first_i2t: int = 0) -> list[torch.Tensor]:
        """:meth:`hidden` of whole sequences (B, L), wanted only at some slots: for each (rows, slots) of
        ``groups`` (contiguous slices), the final-norm hidden states (rows, slots, d), equal to
        ``hidden(...)[rows, slots]``. Every block but the last runs on every slot (the last one's keys
        and values need them all); the last block's queries, attention output and MLP run only on
        the slots asked for: a training batch's loss reads 64 of a 95-slot t2i row and 27 of an i2t
        row, so with one block that is 58 % of its work."""
        x, rope = self._embed_whole(tokens, task, first_i2t)
        for block in self.blocks[:-1]:
            x = block(x, rope=rope)
        causal = self.causal[: tokens.shape[1], : tokens.shape[1]]
        return [self.norm(h) for h in self.blocks[-1].forward_at(x, groups, causal, rope)]

    def _scored_hidden(self, tokens: torch.Tensor, n_t2i: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A training-layout batch (first ``n_t2i`` rows t2i) → the hidden states at the slots the loss
        scores: t2i rows at the N slots predicting image codes, i2t rows at the S slots predicting
        the text (None for a task with no rows)."""
        b, lay = tokens.shape[0], self.layout
        task = torch.full((b,), TASK_T2I, dtype=torch.long, device=tokens.device)
        task[n_t2i:] = TASK_I2T
        t2i = (slice(0, n_t2i), slice(lay.t2i_soi, lay.t2i_soi + lay.n_image)) if n_t2i else None
        i2t = (slice(n_t2i, b), slice(lay.i2t_eoi, lay.i2t_eoi + lay.text_slots)) if b > n_t2i else None
        out = iter(self.hidden_at(tokens, task, [g for g in (t2i, i2t) if g], first_i2t=n_t2i))
        return (next(out) if t2i else None), (next(out) if i2t else None)

    def rope(self, positions: torch.Tensor, task: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``rope_2d``: the (cos, sin) (B, 1, s, Dh/2) of slots ``positions`` (s,) in layout ``task`` (B,)."""
        if not self.cfg.rope_2d:
            return None
        return self.rope_cos[task][:, None, positions], self.rope_sin[task][:, None, positions]

    def image_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., d) → (..., codebook_size): the head restricted to image codes."""
        off = self.cfg.text_vocab
        rows = self.head.weight[off: off + self.cfg.codebook_size]
        if self.cfg.code_looks:  # each code's row plus the projection of its look
            rows = rows + self.look_out(self.code_look.to(rows.dtype))
        return F.linear(h, rows)

    def text_logits(self, h: torch.Tensor, blocked: torch.Tensor | None = None) -> torch.Tensor:
        """(..., d) → (..., text_vocab): the head restricted to text ids, specials but <eos> at -inf
        (or the ids ``blocked``, a bool mask broadcasting against the logits)."""
        logits = F.linear(h, self.head.weight[: self.cfg.text_vocab])
        return logits.masked_fill(self.text_blocked if blocked is None else blocked, float("-inf"))

    def forward(self, tokens: torch.Tensor, n_t2i: int, z_loss: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training forward = :meth:`loss` (what DDP and ``torch.compile`` wrap)."""
        return self.loss(tokens, n_t2i, z_loss)

    def loss(self, tokens: torch.Tensor, n_t2i: int, z_loss: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Next-token loss of a batch whose first ``n_t2i`` rows are t2i sequences, the rest i2t.

        t2i rows are scored on their N image tokens, i2t rows on their language token, text and
        ``<eos>`` (pads ignored), each restricted to its modality (the language slot to the
        language tokens). The batch loss weights rows equally, so the
        t2i/i2t mix of the batch is the mix of the objective. ``z_loss`` adds that weight times
        the mean squared log-partition of the scored logits (keeps logits from drifting).
        """
        b = tokens.shape[0]
        n_i2t = b - n_t2i
        h_t2i, h_i2t = self._scored_hidden(tokens, n_t2i)  # (n, N, d), (m, S, d)
        lay = self.layout
        total = (h_t2i if h_t2i is not None else h_i2t).new_zeros(())
        logs: dict[str, torch.Tensor] = {}
        if n_t2i:
            logits = self.image_logits(h_t2i).float()  # (n, N, K)
            target = tokens[:n_t2i, lay.t2i_image] - self.cfg.text_vocab  # (n, N)
            img = F.cross_entropy(logits.flatten(0, 1), target.flatten())
            total = total + img * (n_t2i / b)
            logs["t2i_loss"] = img.detach()
            if z_loss:
                total = total + z_loss * (n_t2i / b) * logits.logsumexp(-1).pow(2).mean()
        if n_i2t:
            logits = self.text_logits(h_i2t, self.i2t_blocked).float()  # (m, S, V_text)
            target = tokens[n_t2i:, lay.i2t_text].clone()  # (m, S)
            target[target == PAD] = -100
            txt = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
            total = total + txt * (n_i2t / b)
            logs["i2t_loss"] = txt.detach()
            if z_loss:
                lse = logits.logsumexp(-1)[target != -100]
                total = total + z_loss * (n_i2t / b) * lse.pow(2).mean()
        return total, logs

    @torch.no_grad()
    def sequence_nll(self, tokens: torch.Tensor, n_t2i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of a batch laid out like training (first ``n_t2i`` rows t2i, the rest i2t): the
        summed negative log-likelihood (B,) of the tokens :meth:`loss` scores, and how many there are (B,).

        Same targets and masks as the loss: t2i rows on their N image codes among the image codes; i2t
        rows on the language token (among the language tokens), the text and ``<eos>`` (pads skipped).
        ``nll.sum() / count.sum()`` per task is the loss the trainer reports for that task; what
        best-of-n reranking (:mod:`visgen.inference`) and the retrieval metrics compare."""
        b = tokens.shape[0]
        h_t2i, h_i2t = self._scored_hidden(tokens, n_t2i)  # (n, N, d), (m, S, d)
        lay = self.layout
        nll = torch.zeros(b, dtype=torch.float32, device=tokens.device)
        count = torch.zeros(b, dtype=torch.float32, device=tokens.device)
        if n_t2i:
            logits = self.image_logits(h_t2i).float()  # (n, N, K)
            target = tokens[:n_t2i, lay.t2i_image] - self.cfg.text_vocab  # (n, N)
            nll[:n_t2i] = F.cross_entropy(logits.transpose(1, 2), target, reduction="none").sum(1)
            count[:n_t2i] = lay.n_image
        if b > n_t2i:
            logits = self.text_logits(h_i2t, self.i2t_blocked).float()  # (m, S, V_text)
            target = tokens[n_t2i:, lay.i2t_text].clone()  # (m, S)
            scored = target != PAD
            target[~scored] = -100
            ce = F.cross_entropy(logits.transpose(1, 2), target, reduction="none", ignore_index=-100)  # (m, S)
            nll[n_t2i:] = ce.sum(1)
            count[n_t2i:] = scored.sum(1).float()
        return nll, count

    # -- incremental decoding ---------------------------------------------------------------------
    # A generation is a prefill over the prompt (eager: its length varies) that emits the first
    # token, then one decode step per further token. The step is one function over the buffers of
    # the KV cache and of DecodeState: it reads the token just written, runs it through the
    # cache, turns the hidden state into logits of the right head, mixes guidance, samples, writes
    # the token and advances the position and the step counter, all in place on the device. No
    # host value enters it and its shapes never change, so compile_decode() compiles it once per
    # batch size and sampling structure (a CUDA graph on GPU with "reduce-overhead").
    def setup_cache(self, batch: int, device=None, dtype: torch.dtype | None = None) -> None:
        """(Re)allocate the static KV cache for ``batch`` sequences; a no-op when it already fits."""
        p = self.head.weight
        device, dtype = device or p.device, dtype or p.dtype
        first = self.blocks[0].attn.kv_cache
        if first is not None and first.k.shape[0] == batch and first.k.device == torch.device(device) \
                and first.k.dtype == dtype:
            return
        for block in self.blocks:
            block.attn.kv_cache = KVCache(batch, self.cfg.n_head, self.layout.length, self.cfg.head_dim, dtype, device)

    def compile_decode(self, mode: str | None = "reduce-overhead", *, backend: str = "inductor") -> None:
        """``torch.compile`` the whole one-token decode steps (:meth:`decode_image_step`,
        :meth:`decode_text_step`); generation uses them from then on. On a GPU ``reduce-overhead``
        replays each step as one CUDA graph; ``max-autotune-no-cudagraphs`` tunes kernels without
        graphs. ``backend`` other than inductor (``eager``, ``aot_eager``: tracing and the
        ``fullgraph`` check without code generation) ignores ``mode``. Without this call the same
        steps run eagerly."""
        kw: dict = dict(fullgraph=True, dynamic=False, backend=backend)
        if backend == "inductor" and mode:
            kw["mode"] = mode
        self._compiled_steps = {"image": torch.compile(self.decode_image_step, **kw),
                                "text": torch.compile(self.decode_text_step, **kw)}

    @property
    def decode_compiled(self) -> bool:
        """Whether :meth:`compile_decode` was called (generation runs the compiled steps)."""
        return bool(self._compiled_steps)

    def clear_cache(self) -> None:
        """Drop the KV cache and the decode state (the compiled steps stay, and recompile on the next
        generation if its buffers are new)."""
        for block in self.blocks:
            block.attn.kv_cache = None
        self.decode_state = None

    def forward_step(self, tokens: torch.Tensor, input_pos: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """Run ``tokens`` (B, s) at slots ``input_pos`` (s,) through the cache → hidden (B, s, d)."""
        st = self.decode_state
        cond = st.cond if self.cfg.pooled_condition else None  # set by _decode's prefill
        x = self.embed(tokens, input_pos, task, cond,
                       seq=st.seq if self.cfg.grid_context or self.cfg.neighbour_context else None)
        mask = self.causal[input_pos][None, None]  # (1, 1, s, L): each new token sees itself and the past
        rope = self.rope(input_pos, task)
        for block in self.blocks:
            x = block(x, input_pos, mask, rope)
        return self.norm(x)

    def decode_image_step(self, guided: bool, greedy: bool, top_k: int, nucleus: bool, split: bool = False,
                          object_greedy: bool = False, bounded: bool = False) -> None:
        """One image code for every row of :attr:`decode_state`, in place (what ``compile_decode``
        compiles): the token at ``pos`` through the cache, then :meth:`_emit_image`."""
        st = self.decode_state
        h = self.forward_step(st.seq.index_select(1, st.pos), st.pos, st.task)[:, -1]  # (B', d)
        self._emit_image(h, guided=guided, greedy=greedy, top_k=top_k, nucleus=nucleus, split=split,
                         object_greedy=object_greedy, bounded=bounded)

    def decode_text_step(self, greedy: bool, top_k: int, nucleus: bool) -> None:
        """One caption token for every row of :attr:`decode_state`, in place (see :meth:`_emit_text`)."""
        st = self.decode_state
        h = self.forward_step(st.seq.index_select(1, st.pos), st.pos, st.task)[:, -1]  # (B, d)
        self._emit_text(h, greedy=greedy, top_k=top_k, nucleus=nucleus)

    def _emit_image(self, h: torch.Tensor, *, guided: bool, greedy: bool, top_k: int, nucleus: bool,
                    split: bool = False, object_greedy: bool = False, bounded: bool = False) -> None:
        """Hidden states at ``pos`` (B', d) → the next image code of each prompt, written at ``pos + 1``
        (the null-prompt half of a guided batch gets the same code). ``split``: a draw that is not
        the background code is replaced by a draw among the other codes, guided at
        ``object_cfg_scale``, at ``object_temperature`` (``object_greedy``: their argmax), with
        noise of its own (step counter offset by 2**20); ``bounded``: among the codes whose probability
        under the conditional model is at least ``object_min_p`` times that of its likeliest object code."""
        st = self.decode_state
        raw = self.image_logits(h).float()  # (B', K)
        logits = guide(raw, st.cfg_scale) if guided else raw  # (B, K)
        b = logits.shape[0]
        code = pick(logits, st.seeds[:b], st.step, st.temperature, st.top_p,
                    greedy=greedy, top_k=top_k, nucleus=nucleus)  # (B,)
        if split:
            objects = guide(raw, st.object_cfg_scale) if guided else raw
            rest = objects.index_fill(1, st.background.view(1), float("-inf"))
            if bounded:
                # The plausibility bound of contrastive decoding: guidance rewards a code by how much less
                # the null prompt expects it, also when the prompt's own model finds it implausible; such
                # codes are dropped. A probability ratio is a logit difference: no softmax needed.
                cond = raw[:b].index_fill(1, st.background.view(1), float("-inf"))
                low = cond < cond.max(-1, keepdim=True).values + st.object_min_p.log()
                rest = rest.masked_fill(low, float("-inf"))
            other = pick(rest, st.seeds[:b], st.step + OBJECT_NOISE, st.object_temperature, st.top_p,
                         greedy=object_greedy, top_k=0, nucleus=False)
            code = torch.where(code == st.background, code, other)
        self._advance((code.repeat(2) if guided else code) + self.cfg.text_vocab)

    def _emit_text(self, h: torch.Tensor, *, greedy: bool, top_k: int, nucleus: bool) -> None:
        """Hidden states at ``pos`` (B, d) → the next caption token, written at ``pos + 1``. Step 0 is
        the language slot (the language tokens only, or the forced one), the last slot can only
        close the text, and a row past its ``<eos>`` gets ``<pad>``. Every branch is a ``where`` on
        the step counter, so all slots share one graph."""
        st = self.decode_state
        lang_slot = st.step == 0
        blocked = torch.where(lang_slot, self.lang_blocked, st.blocked)  # (B, V_text)
        logits = self.text_logits(h, blocked).float()
        tok = pick(logits, st.seeds, st.step, st.temperature, st.top_p, greedy=greedy, top_k=top_k, nucleus=nucleus)
        tok = torch.where(lang_slot & (st.forced >= 0), st.forced, tok)
        tok = torch.where(st.step == self.layout.text_slots - 1, EOS, tok)
        tok = torch.where(st.done, PAD, tok)
        self._advance(tok)
        st.done.logical_or_(tok == EOS)

    def _advance(self, tok: torch.Tensor) -> None:
        """Write ``tok`` (B',) at slot ``pos + 1`` and move ``pos`` and ``step`` on by one."""
        st = self.decode_state
        st.seq.index_copy_(1, st.pos + 1, tok[:, None])
        st.pos.add_(1)
        st.step.add_(1)

    def _decode_state(self, rows: int, device) -> DecodeState:
        st = self.decode_state
        if st is None or not st.fits(rows, device):
            self.decode_state = st = DecodeState(rows, self.layout.length, self.cfg.text_vocab, self.cfg.d_model, device)
        return st

    def _decode(self, emit, step, start: int, n_tokens: int, use_cache: bool, plan: dict,
                stop_when_done: bool = False) -> None:
        """Emit ``n_tokens`` tokens into :attr:`decode_state`, whose ``pos`` is ``start``: the prefill
        ``seq[:, :start + 1]`` gives the first, ``step`` each further one. Without the cache every
        token reruns the whole causal forward (the reference path the cache is tested against)."""
        st = self.decode_state
        if self.cfg.pooled_condition:  # the condition lies wholly before ``start``
            st.cond.copy_(self.condition(st.seq, st.task))
        if use_cache:
            self.setup_cache(st.seq.shape[0])
            prompt = st.seq[:, : start + 1]
            h = self.forward_step(prompt, torch.arange(start + 1, device=prompt.device), st.task)[:, -1]
        else:
            h = self.hidden(st.seq[:, : start + 1], st.task)[:, -1]
        emit(h, **plan)
        # Stopping once every caption has closed needs the device's answer: on CPU that costs
        # nothing, on a GPU a sync per token would stall the queue, so ask every 8 tokens.
        every = 1 if st.seq.device.type == "cpu" else 8
        for i in range(1, n_tokens):
            if stop_when_done and i % every == 0 and bool(st.done.all()):
                break
            if use_cache:
                step(**plan)
            else:
                emit(self.hidden(st.seq[:, : start + i + 1], st.task)[:, -1], **plan)

    @torch.no_grad()
    def generate_images(self, text: torch.Tensor, seeds: torch.Tensor, *, cfg_scale: float = 1.0,
                        temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                        prefix: torch.Tensor | None = None, use_cache: bool = True,
                        object_temperature: float | None = None, background: int | None = None,
                        object_cfg_scale: float | None = None, object_min_p: float | None = None) -> torch.Tensor:
        """Sample image codes (B, N) for text regions (B, S) (see :meth:`Layout.text_region`).

        ``cfg_scale`` != 1 runs the null prompt alongside (the batch doubled) and samples from
        ``uncond + cfg_scale * (cond - uncond)``. ``prefix`` (B, P) fixes the first P codes
        (raster order: whole rows above a cut) and samples the rest: completion / editing.
        ``seeds`` (B,) int64: row i's samples depend only on seeds[i] and its own logits.
        ``object_temperature`` (with ``background``, a code id): whether a slot gets the background
        code is drawn as above; a slot that does not gets a code drawn among the others at this
        temperature instead (0 = their most likely), so objects are drawn sharper without the
        background, the per-slot mode of a sparse scene, winning more slots. ``object_cfg_scale``
        (with ``object_temperature``; default ``cfg_scale``): the guidance scale of that draw, so
        the layout (background or not) and the objects' codes can be guided apart. ``object_min_p``
        (with ``object_temperature``; default 0 = off): that draw considers only the codes whose
        probability under the conditional model is at least this fraction of its likeliest object
        code's, the plausibility bound of contrastive decoding: guidance cannot promote a code the
        prompt's own model finds implausible just because the null prompt's finds it less so.
        """
        check_sampling(temperature, top_k, top_p)
        if (object_temperature is None) != (background is None):
            raise ValueError(f"object_temperature and background go together; got object_temperature="
                             f"{object_temperature!r}, background={background!r}")
        if object_temperature is not None:
            if not 0.0 <= object_temperature <= 10.0:
                raise ValueError(f"object_temperature must be in [0, 10], got {object_temperature}")
            if isinstance(background, bool) or not isinstance(background, int) \
                    or not 0 <= background < self.cfg.codebook_size:
                raise ValueError(f"background must be a code id in [0, {self.cfg.codebook_size}), got {background!r}")
        elif object_cfg_scale is not None or object_min_p is not None:
            name, value = ("object_cfg_scale", object_cfg_scale) if object_cfg_scale is not None \
                else ("object_min_p", object_min_p)
            raise ValueError(f"{name}={value} bounds the object draw of object_temperature, which is not set")
        min_p = 0.0 if object_min_p is None else float(object_min_p)
        if not 0.0 <= min_p <= 1.0:
            raise ValueError(f"object_min_p must be in [0, 1], got {object_min_p}")
        obj_cfg = cfg_scale if object_cfg_scale is None else float(object_cfg_scale)
        if not 1.0 <= obj_cfg <= 50.0:
            raise ValueError(f"object_cfg_scale must be in [1, 50], got {object_cfg_scale}")
        lay, dev = self.layout, self.head.weight.device
        b = text.shape[0]
        if tuple(seeds.shape) != (b,):
            raise ValueError(f"one seed per row: {tuple(seeds.shape)} seeds for {b} rows")
        p = 0 if prefix is None else prefix.shape[1]
        if not 0 <= p <= lay.n_image:
            raise ValueError(f"prefix has {p} codes; the image has {lay.n_image}")
        guided = cfg_scale != 1.0 or obj_cfg != 1.0
        rows = torch.cat([text, self._null_text(b, text.device)]) if guided else text  # (B or 2B, S)
        image = torch.zeros(rows.shape[0], lay.n_image, dtype=torch.long, device=dev)
        if p:
            image[:, :p] = prefix.repeat(2, 1) if guided else prefix
        seq = lay.t2i(rows.to(dev), image)  # (B', L); image slots after the prefix get overwritten
        if p == lay.n_image:
            return seq[:b, lay.t2i_image] - lay.text_vocab
        first = lay.t2i_soi + p  # slot whose output predicts code p
        st = self._decode_state(seq.shape[0], dev)
        split = object_temperature is not None
        st.start(seq, TASK_T2I, seeds.repeat(2) if guided else seeds, pos=first, step=p, cfg_scale=cfg_scale,
                 temperature=temperature, top_p=top_p, object_temperature=object_temperature if split else 1.0,
                 background=background if split else 0, object_cfg_scale=obj_cfg, object_min_p=min_p)
        plan = dict(guided=guided, **_plan(temperature, top_k, top_p, self.cfg.codebook_size),
                    split=split, object_greedy=split and object_temperature == 0, bounded=split and min_p > 0)
        step = self._compiled_steps.get("image", self.decode_image_step)
        self._decode(self._emit_image, step, first, lay.n_image - p, use_cache, plan)
        return st.seq[:b, lay.t2i_image] - lay.text_vocab

    @torch.no_grad()
    def generate_text(self, image: torch.Tensor, seeds: torch.Tensor, *, language: str | Sequence[str | None] | None = None,
                      blocked: torch.Tensor | None = None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                      use_cache: bool = True, return_language: bool = False):
        """Caption codes (B, N): text ids per row, up to ``<eos>`` (excluded). ``temperature=0`` is greedy.

        ``language`` (one for all rows, or one per row): 'auto' / None lets the model choose the
        language token, 'en' / 'zh' puts that token in the language slot. ``blocked``, a bool mask
        (V_text,) or (B, V_text), adds ids the text slots may not emit in that row (the other
        script of a requested language: :meth:`visgen.text.TextTokenizer.language_blocked`).
        With ``return_language`` also returns the language each row was written in.
        """
        check_sampling(temperature, top_k, top_p)
        lay, dev = self.layout, self.head.weight.device
        b = image.shape[0]
        langs = caption_languages(language, b)
        if tuple(seeds.shape) != (b,):
            raise ValueError(f"one seed per row: {tuple(seeds.shape)} seeds for {b} rows")
        forced = torch.tensor([LANG_IDS.get(lang, -1) for lang in langs], dtype=torch.long, device=dev)
        text_mask = self.text_blocked if blocked is None else self.text_blocked | blocked.to(dev, torch.bool)
        filler = torch.full((b, lay.text_slots), PAD, dtype=torch.long, device=dev)
        st = self._decode_state(b, dev)
        st.start(lay.i2t(image.to(dev), filler), TASK_I2T, seeds, pos=lay.i2t_eoi, step=0, temperature=temperature,
                 top_p=top_p, forced=forced, blocked=text_mask)
        step = self._compiled_steps.get("text", self.decode_text_step)
        plan = _plan(temperature, top_k, top_p, self.cfg.text_vocab)
        self._decode(self._emit_text, step, lay.i2t_eoi, lay.text_slots, use_cache, plan, stop_when_done=True)
        out = []
        region = st.seq[:, lay.i2t_text]
        for row in region[:, 1:].tolist():
            out.append(row[: row.index(EOS)] if EOS in row else [t for t in row if t != PAD])
        if not return_language:
            return out
        by_id = {v: k for k, v in LANG_IDS.items()}
        return out, [by_id[int(t)] for t in region[:, 0].tolist()]

    def _null_text(self, b: int, device) -> torch.Tensor:
        return torch.tensor([self.layout.text_region(None)] * b, dtype=torch.long, device=device)

    def fingerprint(self) -> str:
        """sha256 of the config and every weight."""
        return fingerprint(self.cfg, self.state_dict(),
                           late_fields=("code_looks", "tie_embeddings", "pooled_condition", "rope_2d", "rope_base",
                                        "grid_context", "neighbour_context", "grid_context_radius"))


# ---------------------------------------------------------------------------------------------
# Save / load: safetensors + JSON, never a pickle
# ---------------------------------------------------------------------------------------------
_NAME = "lm"
WEIGHTS_FILE, CONFIG_FILE = f"{_NAME}.safetensors", f"{_NAME}.json"


def save_gpt(model: VisGPT, directory: str | Path) -> Path:
    """Write ``lm.safetensors`` and ``lm.json`` (config, fingerprint, parameter count) into ``directory``."""
    return save_model(model, directory, name=_NAME, fmt=LM_FORMAT, cfg=model.cfg, fp=model.fingerprint(),
                      extra={"params": model.num_params()})


def load_gpt(directory: str | Path, device: str | torch.device = "cpu") -> VisGPT:
    """Rebuild a model written by :func:`save_gpt`, in eval mode; checks format and fingerprint."""
    return load_model(directory, VisGPT, GPTConfig, name=_NAME, fmt=LM_FORMAT, what="VisGPT transformer",
                      device=device, old_format_hint=(
                          ": a transformer saved by an older visgen, before the caption language tokens, whose text "
                          "ids mean other tokens now. Retrain it (`visgen train lm`, or `visgen run`, which also "
                          "rebuilds the text tokenizer)"))
