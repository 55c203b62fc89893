import pytest

from visgen.text.tokenizer import SPECIAL_TOKENS, TextTokenizer, TextTokenizerConfig, train_text_tokenizer

CAPTIONS = [
    "a red circle left of a blue square",
    "two small green stars",
    "一个红色的圆形在蓝色正方形的左边",
    "三个黄色的三角形",
    "a photo of a purple hexagon above a white triangle",
] * 40


@pytest.fixture(scope="module")
def tok():
    return train_text_tokenizer(iter(CAPTIONS), TextTokenizerConfig(vocab_size=400, min_frequency=1))


def test_special_tokens_take_the_first_ids(tok):
    assert [tok.special_ids[s] for s in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))


@pytest.mark.parametrize("text", [
    "a red circle left of a blue square",
    "一个红色的圆形在蓝色正方形的左边",
    "emoji 🙂🎉👩‍👩‍👧 and 中文 mixed",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n",
    "",
    "ünïcödé ñ ß Ω ∑ 𝔘",
    "\x00 control \x7f",
])
def test_any_unicode_round_trips(tok, text):
    ids = tok.encode(text)
    assert all(i >= len(SPECIAL_TOKENS) for i in ids)
    assert tok.decode(ids) == text


def test_merges_are_learned(tok):
    # BPE learned the training phrases: far fewer tokens than bytes.
    text = "a red circle left of a blue square"
    assert len(tok.encode(text)) < len(text.encode()) / 2


def test_user_text_cannot_inject_special_tokens(tok):
    text = "<bos> a caption with <eos> and <soi> inside"
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special_ids.values())
    assert tok.decode(ids) == text
    # the batch path agrees with the single path
    assert tok.encode_batch([text, "plain"]) == [ids, tok.encode("plain")]


def test_truncation(tok):
    assert len(tok.encode("a red circle " * 50, max_length=7)) == 7


def test_save_load_round_trip(tok, tmp_path):
    path = tok.save(tmp_path / "sub" / "tokenizer.json")
    again = TextTokenizer.load(path)
    assert again.vocab_size == tok.vocab_size
    assert again.encode("两个 green stars 🙂") == tok.encode("两个 green stars 🙂")
    assert again.fingerprint() == tok.fingerprint()


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        TextTokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        TextTokenizer.load(bad)


def test_config_rejects_a_vocab_smaller_than_the_byte_alphabet():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="vocab_size"):
        TextTokenizerConfig(vocab_size=100)
