"""Caption grammar: every caption it writes parses back to its prompt, in both languages."""

from __future__ import annotations

import re

import numpy as np
import pytest

from visgen.data import captions as C
from visgen.data import shapes as S
from visgen.data.shapes import ObjectSlot, Prompt

_LATIN_OR_DIGIT = re.compile(r"[A-Za-z0-9]")


def _covering_prompts() -> list[tuple[Prompt, bool]]:
    """(prompt, explicit_count) pairs that together reach every frame and every word of both lexicons."""
    colors = list(S.COLORS)
    out: list[tuple[Prompt, bool]] = []
    for i, color in enumerate(colors):  # one object: every shape, colour and size, with and without attributes
        out.append((Prompt((ObjectSlot(S.SHAPES[i % len(S.SHAPES)], 1, color, S.SIZES[i % 2]),)), False))
    out += [(Prompt((ObjectSlot(s),)), False) for s in S.SHAPES]
    for n in range(1, S.MAX_COUNT + 1):  # counting: every number word
        out.append((Prompt((ObjectSlot(S.SHAPES[n], n),)), True))
    for i, shape in enumerate(S.SHAPES):  # every plural
        out.append((Prompt((ObjectSlot(shape, 2 + i % 3),)), True))
    out.append((Prompt((ObjectSlot("cross", 3, "brown", "small"),)), True))
    out.append((Prompt((ObjectSlot("star", 1, "pink", "large"), ObjectSlot("circle", 1, "purple"))), False))
    out.append((Prompt((ObjectSlot("hexagon"), ObjectSlot("square", size="small"))), False))
    for rel in S.RELATIONS:
        out.append((Prompt((ObjectSlot("triangle", color="orange"), ObjectSlot("star")), rel), False))
    return out


@pytest.mark.parametrize("language", C.LANGUAGES)
def test_every_caption_of_the_grammar_parses_back(language):
    lex = C.LEXICONS[language]
    seen_text = []
    total = 0
    for prompt, explicit in _covering_prompts():
        caps = list(C.iter_captions(prompt, language, explicit_count=explicit))
        assert len(caps) == len(set(caps)), "each sequence of word choices must give a distinct caption"
        for cap in caps:
            assert C.parse_caption(cap) == prompt, (cap, prompt)
        seen_text.append("\n".join(caps))
        total += len(caps)
    corpus = "\n".join(seen_text).lower()
    # Every frame and every synonym of the lexicon was generated (and therefore parsed) at least once.
    for kind, frames in lex.frames.items():
        for frame in frames:
            literal = max(re.split(r"\{\w+\}", frame), key=len).strip().lower()
            assert literal == "" or literal in corpus, (kind, frame)
    words = [w for forms in lex.shapes.values() for pair in forms for w in pair]
    words += [w for table in (lex.colors, lex.sizes, lex.numbers, lex.relations) for ws in table.values() for w in ws]
    missing = [w for w in words if w.lower() not in corpus]
    assert not missing, missing
    assert total > 1000


def test_enumeration_counts_every_choice():
    # a small red star, English: 7 frames x 3 size words x 1 colour x 2 star words x 2 cases x 2 endings
    p = Prompt((ObjectSlot("star", 1, "red", "small"),))
    assert len(list(C.iter_captions(p, "en"))) == 7 * 3 * 1 * 2 * 2 * 2


@pytest.mark.parametrize("language", ["en", "zh"])
def test_random_captions_of_sampled_scenes_parse_back(language):
    rng = np.random.default_rng(0)
    for seed in range(300):
        scene = S.sample_scene(S.TASKS[seed % 6], seed, extra_attribute_prob=0.5)
        cap = C.make_caption(scene.prompt, language, rng, explicit_count=scene.task == "counting")
        assert C.parse_caption(cap) == scene.prompt, cap
        assert C.detect_language(cap) == language
        if language == "zh":
            assert not _LATIN_OR_DIGIT.search(cap), cap
        else:
            assert not re.search(r"[\u3400-\u9fff]", cap), cap


def test_counting_captions_state_the_number():
    rng = np.random.default_rng(1)
    one = Prompt((ObjectSlot("star"),))
    for _ in range(20):
        assert re.search(r"\bone\b", C.make_caption(one, "en", rng, explicit_count=True).lower())
        assert "一个" in C.make_caption(one, "zh", rng, explicit_count=True)
        en = C.make_caption(Prompt((ObjectSlot("star", 3),)), "en", rng).lower()
        assert re.search(r"\b(three|3) ([\w-]+ )*stars\b", en), en


def test_mixed_mode_picks_a_language_per_sample():
    rng = np.random.default_rng(2)
    langs = []
    for seed in range(200):
        scene = C.caption_scene(S.sample_scene("position", seed), "mixed", rng)
        assert C.detect_language(scene.caption) == scene.language
        assert C.parse_caption(scene.caption) == scene.prompt
        langs.append(scene.language)
    assert 60 < langs.count("zh") < 140
    assert {C.caption_scene(S.sample_scene("colors", 0), "mixed", rng, zh_fraction=0.0).language} == {"en"}
    with pytest.raises(ValueError, match="'fr'"):
        C.choose_language("fr", rng)


def test_parse_ignores_case_spacing_and_final_punctuation():
    want = Prompt((ObjectSlot("star", 1, "red", "large"),))
    assert C.parse_caption("  A Photo of   a BIG Red Star. ") == want
    assert C.parse_caption("图中有 一个 大的 红色 星形 。") == want


def test_equivalent_relations_compare_equal_in_canonical_form():
    a = C.parse_caption("a star to the left of a circle")
    b = C.parse_caption("a circle is to the right of a star")
    c = C.parse_caption("圆形的右边有一个星形")  # "to the right of the circle is a star"
    assert a != b and a.canonical() == b.canonical()
    assert c == Prompt((ObjectSlot("star"), ObjectSlot("circle")), "right_of")
    assert c.canonical() != a.canonical()


def test_text_outside_the_grammar():
    with pytest.raises(C.CaptionParseError, match="a dog on a sofa"):
        C.parse_caption("a dog on a sofa")
    assert C.parse_caption("a dog on a sofa", strict=False) == Prompt(())
    got = C.parse_caption("I think I see a big red star, and maybe above a green cross", strict=False)
    assert got == Prompt((ObjectSlot("star", 1, "red", "large"), ObjectSlot("cross", 1, "green")), "above")
    assert C.parse_caption("嗯，一个蓝色圆形好像在两个星形旁边", strict=False) == \
        Prompt((ObjectSlot("circle", color="blue"), ObjectSlot("star", 2)))
    assert C.parse_caption("我觉得红色星形在蓝色圆形的右边吧", strict=False) == \
        Prompt((ObjectSlot("star", color="red"), ObjectSlot("circle", color="blue")), "right_of")
    assert C.parse_caption("圆形的左边好像有一个星形", strict=False) == \
        Prompt((ObjectSlot("star"), ObjectSlot("circle")), "left_of")
    with pytest.raises(TypeError):
        C.parse_caption(None)  # type: ignore[arg-type]


def test_slot_accuracy():
    truth = Prompt((ObjectSlot("star", 1, "red"), ObjectSlot("circle", 1, None, "large")), "left_of")
    assert C.slot_accuracy(truth, truth) == 1.0
    flipped = Prompt((ObjectSlot("circle", 1, None, "large"), ObjectSlot("star", 1, "red")), "right_of")
    assert C.slot_accuracy(flipped, truth) == 1.0
    wrong_colour = Prompt((ObjectSlot("star", 1, "blue"), ObjectSlot("circle", 1, None, "large")), "left_of")
    # items: star shape, count, colour; circle shape, count, size; relation -> 6 of 7 right
    assert C.slot_accuracy(wrong_colour, truth) == pytest.approx(6 / 7)
    assert C.slot_accuracy(Prompt(()), truth) == 0.0
