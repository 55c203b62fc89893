"""The special tokens every part of the model agrees on, with no tokenizer library behind them.

The text tokenizer (``visgen/text/tokenizer.py``) reserves ids ``0..len(SPECIAL_TOKENS)-1`` for these,
in this order; the transformer's sequence layout (``visgen/models/gpt.py``) uses the same ids. Kept
here so that ``visgen/models`` imports nothing but PyTorch (and pydantic for its configs).
"""

from __future__ import annotations

LANGUAGE_TOKENS = {"en": "<en>", "zh": "<zh>"}  # caption language -> its special token
SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>", "<t2i>", "<i2t>", "<soi>", "<eoi>", "<null>", *LANGUAGE_TOKENS.values())
