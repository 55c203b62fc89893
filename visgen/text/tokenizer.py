"""Byte-level BPE text tokenizer (HF ``tokenizers``), with the special tokens the model needs.

Byte-level means every Unicode string (Chinese, emoji, control characters) maps to tokens and
back without loss: there is no normaliser and no unknown token. The special tokens take ids
0..9 in the order of :data:`SPECIAL_TOKENS` (the control tokens of the sequence layout, then one
language token per caption language, :data:`LANGUAGE_TOKENS`); the rest of the vocabulary is
learned.

:meth:`TextTokenizer.script_tables` classifies every id by the bytes it stands for (ASCII only,
holds an ASCII letter, holds part of a CJK ideograph): the transformer trainer reads a caption's
language from its ids with it, and captioning in a requested language blocks the other script.

Special-token strings typed by a user (a caption that literally contains ``<eos>``) are encoded
as ordinary bytes, never as the control token: user text cannot inject control tokens.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from pydantic import Field
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from visgen.base import Section
# The table lives with the models (which must not import the tokenizers library); re-exported here.
from visgen.models.tokens import LANGUAGE_TOKENS, SPECIAL_TOKENS  # noqa: F401 - LANGUAGE_TOKENS is re-exported


class TextTokenizerConfig(Section):
    """How the text tokenizer is trained."""

    vocab_size: int = Field(4096, ge=len(SPECIAL_TOKENS) + 256, le=262_144,
                            description="Total vocabulary incl. the 256 byte symbols and the 10 specials.")
    min_frequency: int = Field(2, ge=1, description="A merge must occur this often in the training captions.")
    max_captions: int = Field(200_000, ge=1, description="At most this many captions are read to train it.")


class TextTokenizer:
    """Thin wrapper over a ``tokenizers.Tokenizer``: encode/decode text ids without specials."""

    def __init__(self, tok: Tokenizer):
        missing = [s for s in SPECIAL_TOKENS if tok.token_to_id(s) is None]
        if missing:
            raise ValueError(f"tokenizer lacks the special tokens {missing} (one trained by an older visgen, before the "
                             "language tokens): retrain it with `visgen data tokenizer --force` "
                             "(or visgen.text.train_text_tokenizer)")
        wrong = {s: tok.token_to_id(s) for i, s in enumerate(SPECIAL_TOKENS) if tok.token_to_id(s) != i}
        if wrong:
            raise ValueError(f"tokenizer has the special tokens at other ids than 0..{len(SPECIAL_TOKENS) - 1}: {wrong}; "
                             "retrain it with `visgen data tokenizer --force`")
        self._tok = tok
        self.special_ids = {s: tok.token_to_id(s) for s in SPECIAL_TOKENS}
        self._special_set = frozenset(self.special_ids.values())
        self._tables: dict[int, dict[str, np.ndarray]] = {}

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

    # -- what each id stands for -------------------------------------------------------------------
    def token_bytes(self) -> list[bytes | None]:
        """The bytes each id stands for (``None`` for the specials), in id order."""
        inverse = _unicode_to_bytes()
        out: list[bytes | None] = []
        for i in range(self.vocab_size):
            piece = self._tok.id_to_token(i)
            out.append(None if piece is None or i in self._special_set else bytes(inverse[c] for c in piece))
        return out

    def script_tables(self, size: int | None = None) -> dict[str, np.ndarray]:
        """Boolean tables over ids ``[0, size)`` (default: the vocabulary), computed once per size:

        * ``ascii``: the token's bytes are all ASCII;
        * ``latin``: the token holds an ASCII letter A-Z / a-z;
        * ``cjk``: the token holds the lead byte of a CJK ideograph (U+4000-U+9FFF, or U+3400-U+3FFF
          when the token also holds the byte after it): a caption is Chinese in the sense of
          :func:`visgen.data.captions.detect_language` exactly when one of its ids is ``cjk``
          (up to a rare U+3400-U+3FFF ideograph split across two tokens).

        The specials and the unused ids ``[vocab_size, size)`` are False in every table.
        """
        size = self.vocab_size if size is None else int(size)
        if size < self.vocab_size:
            raise ValueError(f"script tables of size {size} cannot cover the {self.vocab_size} ids of the tokenizer")
        if size not in self._tables:
            tables = {k: np.zeros(size, dtype=bool) for k in ("ascii", "latin", "cjk")}
            for i, b in enumerate(self.token_bytes()):
                if b is None:
                    continue
                tables["ascii"][i] = b.isascii()
                tables["latin"][i] = any(65 <= c <= 90 or 97 <= c <= 122 for c in b)
                tables["cjk"][i] = any(0xE4 <= c <= 0xE9 or (c == 0xE3 and n >= 0x90) for c, n in zip(b, b[1:] + b"\0"))
            for t in tables.values():
                t.flags.writeable = False
            self._tables[size] = tables
        return self._tables[size]

    def language_blocked(self, size: int | None = None) -> dict[str, np.ndarray]:
        """Per caption language, the ids a caption in that language may not use (the specials are not
        covered: the model handles them): ``en`` blocks every token with a non-ASCII byte, ``zh``
        every token holding an ASCII letter; both block the unused ids ``[vocab_size, size)``."""
        t = self.script_tables(size)
        learned = np.zeros(len(t["ascii"]), dtype=bool)  # ids that stand for bytes
        learned[: self.vocab_size] = True
        learned[sorted(self._special_set)] = False
        unused = np.arange(len(learned)) >= self.vocab_size
        return {"en": (learned & ~t["ascii"]) | unused, "zh": (learned & t["latin"]) | unused}

    def __repr__(self) -> str:
        return f"TextTokenizer(vocab_size={self.vocab_size})"


def _unicode_to_bytes() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table, as ``tokenizers`` uses it), inverted."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


# CJK ideographs, radicals and CJK / full-width punctuation. Each is its own piece before byte-level
# BPE, so merges stay inside one character (its UTF-8 bytes) and never join characters: Chinese is
# written without spaces, and on a small caption set BPE would otherwise learn whole phrases
# ("画面中有较大的紫色圆" as two tokens), one id per colour x shape x size combination, which the
# transformer can neither compose nor learn from few examples. Per-character Chinese is what
# BERT's Chinese vocabulary does for the same reason.
# How text is split before BPE; a work directory's tokenizer trained with other splitting is retrained.
PRE_TOKENIZATION = "cjk-characters+byte-level/1"
CJK_CHARACTER = r"[\u2e80-\u2fdf\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]"


def _empty_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CJK_CHARACTER), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
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
