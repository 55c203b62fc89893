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


def test_chinese_is_one_token_per_character_and_shared_between_captions(tok):
    # Merges never join two CJK characters (each character's bytes do merge): "红色" in one
    # caption and another is the same ids, so the transformer learns a colour once, not once per
    # phrase. A phrase-level vocabulary (the plain byte-level regex) fails both checks.
    cjk = lambda ch: "\u2e80" <= ch <= "\u9fff" or "\uf900" <= ch <= "\uffef"  # noqa: E731
    for i in range(len(SPECIAL_TOKENS), tok.vocab_size):
        piece = tok.decode([i])
        assert sum(map(cjk, piece)) <= 1, (i, piece)
    red, circle = tok.encode("红色"), tok.encode("圆形")
    assert len(red) == 2 and len(circle) == 2
    ids = tok.encode("一个红色的圆形在蓝色正方形的左边")
    assert len(ids) == len("一个红色的圆形在蓝色正方形的左边")
    joined = ",".join(map(str, ids))
    assert ",".join(map(str, red)) in joined and ",".join(map(str, circle)) in joined


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


def test_language_tokens_are_specials_after_the_layout_ones(tok):
    from visgen.text.tokenizer import LANGUAGE_TOKENS

    assert SPECIAL_TOKENS[-2:] == tuple(LANGUAGE_TOKENS.values()) == ("<en>", "<zh>")
    assert tok.special_ids["<en>"] == 8 and tok.special_ids["<zh>"] == 9
    ids = tok.encode("<en> <zh> typed by a user")  # plain bytes, never the control tokens
    assert not {8, 9} & set(ids) and tok.decode(ids) == "<en> <zh> typed by a user"


def test_a_tokenizer_without_the_language_tokens_is_refused_with_the_fix(tmp_path):
    from tokenizers import pre_tokenizers, trainers

    from visgen.text.tokenizer import _empty_bpe

    old = _empty_bpe()  # what an older visgen trained: the eight layout specials only
    old.train_from_iterator(CAPTIONS, trainer=trainers.BpeTrainer(
        vocab_size=300, min_frequency=1, special_tokens=list(SPECIAL_TOKENS[:8]),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    old.save(str(tmp_path / "old.json"))
    with pytest.raises(ValueError, match=r"<en>.*visgen data tokenizer --force"):
        TextTokenizer.load(tmp_path / "old.json")


def test_token_bytes_and_script_tables(tok):
    import numpy as np

    from bundles import captions
    from visgen.data.captions import detect_language

    raw = tok.token_bytes()
    assert raw[:len(SPECIAL_TOKENS)] == [None] * len(SPECIAL_TOKENS) and len(raw) == tok.vocab_size
    for text in ("a red circle", "红色的圆形", "emoji 🙂 mixed 中文", "ünïcödé"):
        assert b"".join(raw[i] for i in tok.encode(text)) == text.encode("utf-8")
    t = tok.script_tables(512)
    assert all(len(v) == 512 and v.dtype == bool for v in t.values())
    assert not any(v[:len(SPECIAL_TOKENS)].any() or v[tok.vocab_size:].any() for v in t.values())
    # The cjk table reads a caption's language off its ids exactly as detect_language reads the text.
    texts = captions(400) + ["a 星 in English", "only ascii here", "。，！ punctuation only", "数字 3"] + list(CAPTIONS[:5])
    for text, ids in zip(texts, tok.encode_batch(texts)):
        assert bool(t["cjk"][ids].any()) == (detect_language(text) == "zh"), text
    blocked = tok.language_blocked(512)
    ascii_ids = [i for i in range(len(SPECIAL_TOKENS), tok.vocab_size) if raw[i].isascii()]
    assert not blocked["en"][ascii_ids].any() and blocked["en"][tok.encode("红色")].all()
    assert blocked["zh"][tok.encode("red")].any() and not blocked["zh"][tok.encode("红色的圆形")].any()
    assert blocked["en"][tok.vocab_size:].all() and blocked["zh"][tok.vocab_size:].all()  # unused ids
    assert not blocked["en"][:len(SPECIAL_TOKENS)].any()  # the model masks the specials itself
    assert np.array_equal(tok.script_tables(512)["cjk"], t["cjk"])
    with pytest.raises(ValueError, match="cannot cover"):
        tok.script_tables(10)


def test_the_stage_retrains_a_tokenizer_from_before_the_language_tokens(tmp_path, monkeypatch):
    """A stale work directory (tokenizer + meta written by an older visgen) is rebuilt by
    ``visgen data tokenizer``, not refused by every later stage; an up-to-date one is reused."""
    import json

    import numpy as np
    from tokenizers import pre_tokenizers, trainers

    from visgen import stages
    from visgen.config import load_spec
    from visgen.data import ingest
    from visgen.data.sources import expand_source, shard_signature
    from visgen.text.tokenizer import _empty_bpe

    spec = load_spec("pipelines/shapes-tiny.yaml", {"workdir": str(tmp_path / "w")})
    shards = tmp_path / "w" / "shards"
    shards.mkdir(parents=True)
    for i in range(3):
        (shards / f"{i:05d}.tar").write_bytes(b"\0" * 512)  # only their signature matters here
    reads = []

    class Captions:  # stands in for the Ray Data pass over the shard captions
        def iter_batches(self, **kw):
            reads.append(1)
            yield {"caption": np.array(CAPTIONS, dtype=object)}

    monkeypatch.setattr(stages, "init_ray", lambda *a, **k: None)
    monkeypatch.setattr(ingest, "read_captions", lambda cfg: Captions())
    out = spec.paths.text_tokenizer
    out.parent.mkdir(parents=True, exist_ok=True)
    old = _empty_bpe()
    old.train_from_iterator(CAPTIONS, trainer=trainers.BpeTrainer(
        vocab_size=300, min_frequency=1, special_tokens=list(SPECIAL_TOKENS[:8]),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    old.save(str(out))
    old_meta = {"config": spec.text_tokenizer.model_dump(mode="json"),
                "source": shard_signature(expand_source(spec.data.ingest.source))}
    out.with_suffix(".meta.json").write_text(json.dumps(old_meta))  # what the older stage wrote
    with pytest.raises(ValueError, match="<en>"):
        TextTokenizer.load(out)

    assert stages.text_tokenizer(spec) == out and len(reads) == 1
    assert TextTokenizer.load(out).special_ids["<zh>"] == 9
    assert stages.text_tokenizer(spec) == out and len(reads) == 1  # up to date now: reused
    old.save(str(out))  # a file that lacks the specials under an up-to-date meta is retrained too
    assert stages.text_tokenizer(spec) == out and len(reads) == 2
    assert TextTokenizer.load(out).special_ids["<en>"] == 8
    meta = json.loads(out.with_suffix(".meta.json").read_text())
    del meta["pre_tokenization"]  # written before Chinese was split per character: retrained
    out.with_suffix(".meta.json").write_text(json.dumps(meta))
    assert stages.text_tokenizer(spec) == out and len(reads) == 3
    assert len(TextTokenizer.load(out).encode("红色的圆形")) == 5
