"""A small image-text data set that is not the shapes renders, for the own-data tests.

Procedurally drawn textures in four colours: stripes (horizontal, vertical), a checkerboard, dots,
a gradient, a ring and a glyph (the letter A drawn with PIL's font; "大写字母" in Chinese, whose
captions hold no Latin letter), with small random jitter (period, phase,
background shade, pixel noise). Each sample is captioned in English or Chinese (every other
sample), in a few wordings: "red vertical stripes", "a red checkerboard", "红色的竖条纹", ...
Written as img2dataset-layout WebDataset shards: ``NNNNN.tar`` with ``<key>.jpg``, ``<key>.txt``,
``<key>.json`` (img2dataset's fields) per sample and an ``NNNNN_stats.json`` beside each shard.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

COLORS = {"red": ((220, 40, 40), "红色"), "green": ((40, 170, 60), "绿色"), "blue": ((40, 70, 220), "蓝色"),
          "yellow": ((235, 210, 30), "黄色")}
PATTERNS = {"horizontal stripes": "横条纹", "vertical stripes": "竖条纹", "checkerboard": "棋盘格",
            "dots": "圆点", "gradient": "渐变", "ring": "圆环", "letter A": "大写字母"}
EN_FORMS = ("{color} {pattern}", "a {color} {pattern}", "{pattern} in {color}")
ZH_FORMS = ("{color}的{pattern}", "一张{color}的{pattern}图")


def draw(pattern: str, color: tuple[int, int, int], rng: np.random.Generator, size: int = 48) -> np.ndarray:
    """One texture (size, size, 3) uint8: ``pattern`` in ``color`` on a dark jittered background."""
    c = np.asarray(color, dtype=np.float64)
    bg = np.full(3, rng.uniform(10, 50))
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    period = rng.integers(8, 14)
    phase = rng.integers(0, period)
    if pattern == "horizontal stripes":
        mask = ((y + phase) % period) < period / 2
    elif pattern == "vertical stripes":
        mask = ((x + phase) % period) < period / 2
    elif pattern == "checkerboard":
        mask = (((x + phase) // (period / 2)) + ((y + phase) // (period / 2))) % 2 == 0
    elif pattern == "dots":
        cx, cy = (x + phase) % period - period / 2, (y + phase) % period - period / 2
        mask = cx ** 2 + cy ** 2 < (period / 3.2) ** 2
    elif pattern == "gradient":
        t = (x / (size - 1))[..., None]
        img = bg * (1 - t) + c * t
        return _finish(img, rng)
    elif pattern == "ring":
        r = np.hypot(x - size / 2 - rng.integers(-3, 4), y - size / 2 - rng.integers(-3, 4))
        mask = np.abs(r - size * rng.uniform(0.25, 0.35)) < size * 0.08
    elif pattern == "letter A":
        canvas = Image.new("L", (size, size), 0)
        font = ImageFont.load_default(size=int(size * 0.8))
        ImageDraw.Draw(canvas).text((size / 2 + rng.integers(-3, 4), size / 2 + rng.integers(-3, 4)), "A",
                                    fill=255, font=font, anchor="mm")
        mask = np.asarray(canvas) > 127
    else:
        raise ValueError(f"unknown pattern {pattern!r}; allowed: {', '.join(PATTERNS)}")
    img = np.where(mask[..., None], c, bg)
    return _finish(img, rng)


def _finish(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def caption(color: str, pattern: str, language: str, rng: np.random.Generator) -> str:
    if language == "en":
        return str(rng.choice(EN_FORMS)).format(color=color, pattern=pattern)
    return str(rng.choice(ZH_FORMS)).format(color=COLORS[color][1], pattern=PATTERNS[pattern])


def samples(n: int, seed: int = 0) -> list[dict]:
    """``n`` samples ``{"image", "caption", "language", "color", "pattern"}``, classes in turn."""
    rng = np.random.default_rng(seed)
    classes = [(c, p) for c in COLORS for p in PATTERNS]
    out = []
    for i in range(n):
        color, pattern = classes[int(rng.integers(len(classes)))]
        lang = ("en", "zh")[i % 2]
        out.append({"image": draw(pattern, COLORS[color][0], rng), "caption": caption(color, pattern, lang, rng),
                    "language": lang, "color": color, "pattern": pattern})
    return out


def write_shards(out_dir: str | Path, num_shards: int = 4, per_shard: int = 64, seed: int = 0) -> Path:
    """img2dataset-layout shards under ``out_dir`` (``00000.tar`` ...); returns the directory."""
    import webdataset as wds

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = samples(num_shards * per_shard, seed)
    for s in range(num_shards):
        part = rows[s * per_shard:(s + 1) * per_shard]
        with wds.TarWriter(str(out / f"{s:05d}.tar")) as w:
            for j, r in enumerate(part):
                key = f"{s:05d}{j:04d}"
                buf = io.BytesIO()
                Image.fromarray(r["image"]).save(buf, format="JPEG", quality=92)
                meta = {"url": f"https://example.invalid/{key}.jpg", "key": key, "status": "success",
                        "error_message": None, "width": 48, "height": 48, "caption": r["caption"]}
                w.write({"__key__": key, "jpg": buf.getvalue(), "txt": r["caption"].encode("utf-8"),
                         "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})
        (out / f"{s:05d}_stats.json").write_text(json.dumps({"count": len(part), "successes": len(part),
                                                             "failed_to_download": 0}), encoding="utf-8")
    return out
