"""Caption grammar for shape scenes: English and Chinese realisations of a :class:`Prompt`, and
the parser that reads any of them back.

A caption is a *frame* (``"a photo of {a} {rel} {b}"``, ``"{b}的{rel}有{a}"``) filled with noun
phrases and a relation phrase; every word is drawn from synonym tables (shapes, colours, sizes,
number words, relations). Generation and parsing are built from the same tables, so
``parse_caption(make_caption(p, ...)) == p`` for every prompt, language and choice of words;
``iter_captions`` enumerates all of a prompt's realisations to prove it.

Which frames apply follows the prompt's structure: one object (``one``), one object with an
explicit number (``count``: the counting task, and any count above one), two objects (``two``)
and two objects with a relation (``position``).

Chinese captions are written in Chinese only (no Latin letters, no digits); the parser also
accepts 二 and the digits 1-4 as numbers. English captions may start with a capital and end
with a full stop; the parser ignores case, surplus spaces and final punctuation.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from visgen.data.shapes import COLORS, MAX_COUNT, RELATIONS, SHAPES, SIZES, ObjectSlot, Prompt, Scene

T = TypeVar("T")
Pick = Callable[[Sequence[T]], T]

LANGUAGES: tuple[str, ...] = ("en", "zh")
CAPTION_MODES: tuple[str, ...] = ("en", "zh", "mixed")
FRAME_KINDS: tuple[str, ...] = ("one", "count", "two", "position")


class CaptionParseError(ValueError):
    """The text is not a caption this grammar produces (strict parsing)."""


@dataclass(frozen=True)
class Lexicon:
    """Everything one language needs: synonyms per concept and the frames per prompt structure."""

    shapes: dict[str, tuple[tuple[str, str], ...]]   # shape -> ((singular, plural), ...)
    colors: dict[str, tuple[str, ...]]
    sizes: dict[str, tuple[str, ...]]
    numbers: dict[int, tuple[str, ...]]              # generated number words
    relations: dict[str, tuple[str, ...]]
    frames: dict[str, tuple[str, ...]]               # kind -> templates with {a}, {b}, {rel}, {be}


EN = Lexicon(
    shapes={
        "circle": (("circle", "circles"), ("disk", "disks")),
        "square": (("square", "squares"),),
        "triangle": (("triangle", "triangles"),),
        "star": (("star", "stars"), ("five-pointed star", "five-pointed stars")),
        "hexagon": (("hexagon", "hexagons"),),
        "cross": (("cross", "crosses"), ("plus sign", "plus signs")),
    },
    colors={"red": ("red",), "orange": ("orange",), "yellow": ("yellow",), "green": ("green",),
            "blue": ("blue",), "purple": ("purple", "violet"), "pink": ("pink",), "brown": ("brown",),
            "black": ("black",), "white": ("white",)},
    sizes={"small": ("small", "little", "tiny"), "large": ("large", "big")},
    numbers={1: ("one",), 2: ("two", "2"), 3: ("three", "3"), 4: ("four", "4")},
    relations={
        "left_of": ("to the left of", "left of", "on the left side of"),
        "right_of": ("to the right of", "right of", "on the right side of"),
        "above": ("above", "over"),
        "below": ("below", "under", "beneath"),
    },
    frames={
        "one": ("{a}", "a photo of {a}", "an image of {a}", "a picture of {a}", "a drawing of {a}",
                "there {be} {a}", "{a} on a plain background"),
        "count": ("{a}", "a photo of {a}", "an image of {a}", "there {be} {a}", "exactly {a}",
                  "a picture with exactly {a}"),
        "two": ("{a} and {b}", "a photo of {a} and {b}", "an image of {a} and {b}", "{a} together with {b}",
                "both {a} and {b}", "there {be} {a} and {b}"),
        "position": ("{a} {rel} {b}", "a photo of {a} {rel} {b}", "{a} is {rel} {b}", "there {be} {a} {rel} {b}",
                     "an image with {a} {rel} {b}"),
    },
)

ZH = Lexicon(
    shapes={
        "circle": (("圆形", "圆形"), ("圆", "圆"), ("圆盘", "圆盘")),
        "square": (("正方形", "正方形"), ("方块", "方块"), ("方形", "方形")),
        "triangle": (("三角形", "三角形"),),
        "star": (("星形", "星形"), ("五角星", "五角星"), ("星星", "星星")),
        "hexagon": (("六边形", "六边形"), ("六角形", "六角形")),
        "cross": (("十字形", "十字形"), ("十字", "十字"), ("加号", "加号")),
    },
    colors={"red": ("红色",), "orange": ("橙色",), "yellow": ("黄色",), "green": ("绿色",), "blue": ("蓝色",),
            "purple": ("紫色",), "pink": ("粉色", "粉红色"), "brown": ("棕色", "褐色"), "black": ("黑色",),
            "white": ("白色",)},
    sizes={"small": ("小", "小的", "较小的"), "large": ("大", "大的", "较大的")},
    numbers={1: ("一",), 2: ("两",), 3: ("三",), 4: ("四",)},
    relations={
        "left_of": ("左边", "左侧", "左方"),
        "right_of": ("右边", "右侧", "右方"),
        "above": ("上方", "上面", "上边"),
        "below": ("下方", "下面", "下边"),
    },
    frames={
        "one": ("{a}", "图中有{a}", "画面中有{a}", "这是{a}", "一张图片，上面有{a}"),
        "count": ("{a}", "图中有{a}", "画面里恰好有{a}", "一共有{a}"),
        "two": ("{a}和{b}", "{a}与{b}", "图中有{a}和{b}", "画面中有{a}，还有{b}"),
        "position": ("{a}在{b}的{rel}", "{a}位于{b}的{rel}", "{b}的{rel}有{a}", "图中{a}在{b}的{rel}"),
    },
)

LEXICONS: dict[str, Lexicon] = {"en": EN, "zh": ZH}
_ZH_MEASURE = "个"
_ZH_COLOR_DE = "的"  # 红色 / 红色的


def _check_language(language: str, allowed: Sequence[str] = LANGUAGES) -> None:
    if language not in allowed:
        raise ValueError(f"unknown caption language {language!r}; allowed: {', '.join(map(repr, allowed))}")


def frame_kind(prompt: Prompt, explicit_count: bool = False) -> str:
    """Which frames realise ``prompt``: one / count / two / position."""
    if not prompt.objects:
        raise ValueError("cannot caption a prompt without objects")
    if prompt.relation is not None:
        return "position"
    if len(prompt.objects) == 2:
        return "two"
    if len(prompt.objects) == 1:
        return "count" if explicit_count or prompt.objects[0].count > 1 else "one"
    raise ValueError(f"the grammar states one or two object slots, got {len(prompt.objects)}: {prompt!r}")


# -- generation -----------------------------------------------------------------------------------
# Generation is written once against a ``pick`` callback: random captions pass a picker that draws
# from an RNG; ``iter_captions`` passes one that walks every sequence of choices.

def _en_noun_phrase(slot: ObjectSlot, explicit_count: bool, pick: Pick) -> str:
    words = []
    if slot.size is not None:
        words.append(pick(EN.sizes[slot.size]))
    if slot.color is not None:
        words.append(pick(EN.colors[slot.color]))
    singular, plural = pick(EN.shapes[slot.shape])
    words.append(plural if slot.count > 1 else singular)
    if slot.count > 1 or explicit_count:
        det = pick(EN.numbers[slot.count])
    else:
        det = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([det, *words])


def _zh_noun_phrase(slot: ObjectSlot, explicit_count: bool, pick: Pick) -> str:
    if slot.count > 1 or explicit_count:
        num = pick(ZH.numbers[slot.count]) + _ZH_MEASURE
    else:
        num = pick(("一" + _ZH_MEASURE, ""))  # 一个红色星形 / 红色星形
    size = pick(ZH.sizes[slot.size]) if slot.size is not None else ""
    color = ""
    if slot.color is not None:
        color = pick(ZH.colors[slot.color])
        if not size:  # one 的 per phrase reads naturally: 较小的红色星形, not 较小的红色的星形
            color += pick(("", _ZH_COLOR_DE))
    shape = pick(ZH.shapes[slot.shape])[0]
    return num + size + color + shape


def _realize(prompt: Prompt, language: str, explicit_count: bool, pick: Pick) -> str:
    lex = LEXICONS[language]
    kind = frame_kind(prompt, explicit_count)
    frame = pick(lex.frames[kind])
    np_fn = _en_noun_phrase if language == "en" else _zh_noun_phrase
    a = np_fn(prompt.objects[0], explicit_count, pick)
    b = np_fn(prompt.objects[1], explicit_count, pick) if len(prompt.objects) > 1 else ""
    rel = pick(lex.relations[prompt.relation]) if prompt.relation is not None else ""
    be = "are" if prompt.objects[0].count > 1 else "is"
    text = frame.format(a=a, b=b, rel=rel, be=be)
    if language == "en":
        if text[0].isalpha() and pick((False, True)):  # "2 stars" has no capital form
            text = text[0].upper() + text[1:]
        return text + pick(("", "."))
    return text + pick(("", "。"))


def make_caption(prompt: Prompt, language: str, rng: np.random.Generator, *, explicit_count: bool = False) -> str:
    """A random caption of ``prompt`` in ``language`` ('en' or 'zh').

    ``explicit_count`` writes the number even for one object ("one star", "一个星形"): the
    counting task's captions always state their count.
    """
    _check_language(language)
    return _realize(prompt, language, explicit_count, lambda options: options[int(rng.integers(len(options)))])


def iter_captions(prompt: Prompt, language: str, *, explicit_count: bool = False) -> Iterator[str]:
    """Every caption the grammar can write for ``prompt`` (each sequence of word choices once)."""
    _check_language(language)
    path: list[list[int]] = []  # odometer over the choices made so far: [index, number of options]
    while True:
        depth = 0

        def pick(options: Sequence[T]) -> T:
            nonlocal depth
            if depth == len(path):
                path.append([0, len(options)])
            choice = options[path[depth][0]]
            depth += 1
            return choice

        yield _realize(prompt, language, explicit_count, pick)
        del path[depth:]
        while path and path[-1][0] + 1 == path[-1][1]:
            path.pop()
        if not path:
            return
        path[-1][0] += 1  # later choices are rebuilt on the next walk: they may depend on this one


def choose_language(mode: str, rng: np.random.Generator, zh_fraction: float = 0.5) -> str:
    """'en' / 'zh' as given; 'mixed' draws one per call (Chinese with probability ``zh_fraction``)."""
    _check_language(mode, CAPTION_MODES)
    if mode != "mixed":
        return mode
    return "zh" if rng.random() < zh_fraction else "en"


def caption_scene(scene: Scene, mode: str, rng: np.random.Generator, zh_fraction: float = 0.5) -> Scene:
    """``scene`` with a caption of its prompt in ``mode`` ('en' | 'zh' | 'mixed')."""
    language = choose_language(mode, rng, zh_fraction)
    text = make_caption(scene.prompt, language, rng, explicit_count=scene.task == "counting")
    return scene.with_caption(text, language)


# -- parsing --------------------------------------------------------------------------------------

def _alternation(words: Sequence[str]) -> str:
    # Longest first, so 圆形 is not read as 圆 + 形 and "plus signs" not as "plus sign" + "s".
    return "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))


def _inverse(table: dict[Any, Sequence[str]]) -> dict[str, Any]:
    return {w: key for key, words in table.items() for w in words}


@dataclass(frozen=True)
class _Parser:
    """Regular expressions compiled from one lexicon, and the word -> concept maps to read them."""

    language: str
    np_pattern: str
    frames: tuple[re.Pattern[str], ...]
    relation_re: re.Pattern[str]
    shape_of: dict[str, tuple[str, bool]]  # word -> (shape, is plural)
    color_of: dict[str, str]
    size_of: dict[str, str]
    number_of: dict[str, int]
    relation_of: dict[str, str]


def _en_number_words() -> dict[str, int]:
    words = _inverse(EN.numbers)
    words.update({str(n): n for n in range(1, MAX_COUNT + 1)})
    words.update({"a": 1, "an": 1})
    return words


def _zh_number_words() -> dict[str, int]:
    words = _inverse(ZH.numbers)
    words.update({str(n): n for n in range(1, MAX_COUNT + 1)})
    words["二"] = 2
    return words


def _build_parser(language: str) -> _Parser:
    lex = LEXICONS[language]
    shape_of = {}
    for shape, forms in lex.shapes.items():
        for singular, plural in forms:
            shape_of[singular] = (shape, False)
            shape_of.setdefault(plural, (shape, True))
    color_of, size_of, relation_of = _inverse(lex.colors), _inverse(lex.sizes), _inverse(lex.relations)
    if language == "en":
        number_of = _en_number_words()
        np_pattern = (r"(?P<{p}num>{num}) (?:(?P<{p}size>{size}) )?(?:(?P<{p}color>{color}) )?(?P<{p}shape>{shape})")
    else:
        number_of = _zh_number_words()
        np_pattern = (r"(?:(?P<{p}num>{num})" + _ZH_MEASURE + r")?(?P<{p}size>{size})?"
                      r"(?:(?P<{p}color>{color})" + _ZH_COLOR_DE + r"?)?(?P<{p}shape>{shape})")
    np_pattern = np_pattern.replace("{num}", _alternation(number_of)).replace("{size}", _alternation(size_of)) \
        .replace("{color}", _alternation(color_of)).replace("{shape}", _alternation(shape_of))
    rel_pattern = _alternation(relation_of)
    frames = []
    for kind in FRAME_KINDS:
        for frame in lex.frames[kind]:
            regex = ""
            for literal, field in re.findall(r"([^{]*)(?:\{(\w+)\})?", frame):
                regex += re.escape(_normalize(literal, language, strip=False))
                if field in ("a", "b"):
                    regex += np_pattern.replace("{p}", field + "_")
                elif field == "rel":
                    regex += f"(?P<rel>{rel_pattern})"
                elif field == "be":
                    regex += "(?:is|are)"
            frames.append(re.compile(regex))
    return _Parser(language, np_pattern, tuple(frames), re.compile(rel_pattern), shape_of, color_of, size_of,
                   number_of, relation_of)


_PARSERS: dict[str, _Parser] = {}


def _parser(language: str) -> _Parser:
    if language not in _PARSERS:  # built on first use, not at import
        _PARSERS[language] = _build_parser(language)
    return _PARSERS[language]


_CJK = re.compile(r"[\u3400-\u9fff]")


_LATIN = re.compile(r"[A-Za-z]")


def detect_language(text: str) -> str:
    """'zh' when the text holds any CJK ideograph, else 'en'."""
    return "zh" if _CJK.search(text) else "en"


def language_ok(text: str, language: str) -> bool:
    """``text`` holds no words of the other language: 'en' no CJK ideograph, 'zh' no Latin letter A-Z / a-z."""
    _check_language(language)
    return not (_CJK if language == "en" else _LATIN).search(text)


def _normalize(text: str, language: str, strip: bool = True) -> str:
    if language == "en":
        text = re.sub(r"\s+", " ", text.lower())
        return text.strip().rstrip(".!").strip() if strip else text
    text = re.sub(r"\s+", "", text).replace(",", "，")
    return text.rstrip("。.！!") if strip else text


def _slot(p: _Parser, m: re.Match[str], prefix: str) -> ObjectSlot:
    num = m.group(prefix + "num")
    size, color = m.group(prefix + "size"), m.group(prefix + "color")
    shape, _plural = p.shape_of[m.group(prefix + "shape")]
    return ObjectSlot(shape=shape, count=p.number_of[num] if num else 1,
                      color=p.color_of[color] if color else None, size=p.size_of[size] if size else None)


def parse_caption(text: str, strict: bool = True) -> Prompt:
    """The :class:`Prompt` a caption states, in either language.

    Strict (default): ``text`` must be a caption the grammar can write, else
    :class:`CaptionParseError`. With ``strict=False`` text outside the grammar (e.g. a model's
    caption) is scanned for noun phrases and a relation phrase between the first two, so a
    partly right caption still yields the slots it does state; nothing found gives a prompt
    with no objects.
    """
    if not isinstance(text, str):
        raise TypeError(f"caption must be a str, got {type(text).__name__}")
    language = detect_language(text)
    p = _parser(language)
    norm = _normalize(text, language)
    for frame in p.frames:
        m = frame.fullmatch(norm)
        if m is None:
            continue
        slots = [_slot(p, m, "a_")]
        if m.re.groupindex.get("b_shape"):
            slots.append(_slot(p, m, "b_"))
        rel = m.groupdict().get("rel")
        try:
            return Prompt(tuple(slots), p.relation_of[rel] if rel else None)
        except ValueError:  # the frame's words, but a scene no caption states (a relation of a group)
            break
    if strict:
        raise CaptionParseError(f"caption {text!r} is not in the {language} shapes grammar "
                                "(use parse_caption(text, strict=False) to extract what it states)")
    return _scan(p, norm)


def _scan(p: _Parser, norm: str) -> Prompt:
    """Lenient parse: every noun phrase in order, and a relation read from where the phrase sits."""
    np_re = p.np_pattern.replace("{p}", "")
    matches = list(re.finditer(np_re if p.language == "zh" else rf"\b{np_re}\b", norm))
    slots = tuple(_slot(p, m, "") for m in matches)
    if len(slots) != 2 or any(s.count != 1 for s in slots):
        return Prompt(slots)
    between, after = norm[matches[0].end():matches[1].start()], norm[matches[1].end():]
    if (r := p.relation_re.search(between)) is not None:
        if p.language == "zh":  # B的左边有A: the phrase before the relation is the reference object
            return Prompt((slots[1], slots[0]), p.relation_of[r.group(0)])
        return Prompt(slots, p.relation_of[r.group(0)])  # A to the left of B
    if p.language == "zh" and (r := p.relation_re.search(after)) is not None:
        return Prompt(slots, p.relation_of[r.group(0)])  # A在B的左边
    return Prompt(slots)


def slot_accuracy(predicted: Prompt, truth: Prompt) -> float:
    """Fraction of the truth's stated slots a predicted prompt gets right, in [0, 1].

    Scored items: per truth object slot its shape, count and each stated colour / size (matched to
    the predicted slot of the same shape), plus the relation when the truth has one. Relations are
    compared in canonical form, so "A left of B" equals "B right of A".
    """
    t, p = truth.canonical(), predicted.canonical()
    total = correct = 0
    by_shape: dict[str, ObjectSlot] = {}
    for s in p.objects:
        by_shape.setdefault(s.shape, s)
    for slot in t.objects:
        match = by_shape.get(slot.shape)
        checks = [match is not None, match is not None and match.count == slot.count]
        if slot.color is not None:
            checks.append(match is not None and match.color == slot.color)
        if slot.size is not None:
            checks.append(match is not None and match.size == slot.size)
        total += len(checks)
        correct += sum(checks)
    if t.relation is not None:
        total += 1
        correct += p.relation == t.relation and tuple(s.shape for s in p.objects) == tuple(s.shape for s in t.objects)
    return correct / total if total else 1.0
