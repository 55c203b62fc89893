"""Byte-level BPE text tokenizer (HF ``tokenizers``), with the special tokens the model needs.

Byte-level means every Unicode string (Chinese, emoji, control characters) maps to tokens and
back without loss: there is no normaliser and no unknown token. The special tokens take ids
0..7 in the order of :data:`SPECIAL_TOKENS`; the rest of the vocabulary is learned.

Special-token strings typed by a user (a caption that literally contains ``<eos>``) are encoded
as ordinary bytes, never as the control token: user text cannot inject control tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from pydantic import Field
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from visgen.config import Section

SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>", "<t2i>", "<i2t>", "<soi>", "<eoi>", "<null>")


class TextTokenizerConfig(Section):
    """How the text tokenizer is trained."""

    vocab_size: int = Field(4096, ge=len(SPECIAL_TOKENS) + 256, le=262_144,
                            description="Total vocabulary incl. the 256 byte symbols and the 8 specials.")
    min_frequency: int = Field(2, ge=1, description="A merge must occur this often in the training captions.")
    max_captions: int = Field(200_000, ge=1, description="At most this many captions are read to train it.")


class TextTokenizer:
    """Thin wrapper over a ``tokenizers.Tokenizer``: encode/decode text ids without specials."""

    def __init__(self, tok: Tokenizer):
        missing = [s for s in SPECIAL_TOKENS if tok.token_to_id(s) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing}; train it with visgen.text.train_text_tokenizer")
        self._tok = tok
        self.special_ids = {s: tok.token_to_id(s) for s in SPECIAL_TOKENS}
        self._special_set = frozenset(self.special_ids.values())

    # -- persistence -------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> "TextTokenizer":
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"text tokenizer {str(p)!r} not found; build it with `visgen data tokenizer --pipeline ...`")
        try:
            return cls(Tokenizer.from_file(str(p)))
        except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"{str(p)!r} is not a tokenizers JSON file: {err}") from None

    @classmethod
    def from_str(cls, text: str) -> "TextTokenizer":
        return cls(Tokenizer.from_str(text))

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(p.suffix + ".tmp")
        self._tok.save(str(tmp))
        tmp.replace(p)  # atomic: a reader never sees half a file
        return p

    def to_str(self) -> str:
        return self._tok.to_str()

    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha256(self.to_str().encode()).hexdigest()[:16]

    # -- encoding ------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _has_special_text(self, text: str) -> bool:
        return "<" in text and any(s in text for s in SPECIAL_TOKENS)

    def _encode_plain(self, text: str) -> list[int]:
        # Bypass the added-token matcher: pre-tokenise, then run the BPE model on each piece.
        pieces = self._tok.pre_tokenizer.pre_tokenize_str(text)
        return [t.id for piece, _ in pieces for t in self._tok.model.tokenize(piece)]

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """Text → ids (no special tokens added), truncated to ``max_length`` tokens."""
        return self.encode_batch([text], max_length)[0]

    def encode_batch(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        texts = list(texts)
        fast_idx = [i for i, t in enumerate(texts) if not self._has_special_text(t)]
        out: list[list[int]] = [[] for _ in texts]
        if fast_idx:
            for i, enc in zip(fast_idx, self._tok.encode_batch([texts[i] for i in fast_idx], add_special_tokens=False)):
                out[i] = enc.ids
        for i, t in enumerate(texts):
            if self._has_special_text(t):
                out[i] = self._encode_plain(t)
        if max_length is not None:
            out = [ids[:max_length] for ids in out]
        return out

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self._special_set]
        return self._tok.decode(ids, skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size})"


def _empty_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def train_text_tokenizer(captions: Iterable[str], cfg: TextTokenizerConfig) -> TextTokenizer:
    """Train byte-level BPE over ``captions`` (any iterable of str, e.g. a Ray Data pass)."""
    tok = _empty_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )

    def limited():
        for n, c in enumerate(captions):
            if n >= cfg.max_captions:
                return
            yield c

    tok.train_from_iterator(limited(), trainer=trainer)
    return TextTokenizer(tok)


def describe(tok: TextTokenizer) -> str:
    return json.dumps({"vocab_size": tok.vocab_size, "special_ids": tok.special_ids})
