"""Text side of the model: the byte-level BPE tokenizer. Pure Python + HF tokenizers."""

from visgen.text.tokenizer import SPECIAL_TOKENS, TextTokenizer, TextTokenizerConfig, train_text_tokenizer

__all__ = ["SPECIAL_TOKENS", "TextTokenizer", "TextTokenizerConfig", "train_text_tokenizer"]
