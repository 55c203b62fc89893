"""Per-sample decode and validation rules of the ingest stage (plain functions, no Ray)."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import warnings

import numpy as np
import pytest
from PIL import Image

from visgen.config import SpecError, validate_section
from visgen.data import ingest
from visgen.data.ingest import (
    QUARANTINE_REASONS,
    IngestConfig,
    Rejected,
    clear_quarantine,
    decode_image,
    process_samples,
    quarantine_summary,
    quarantine_table,
    read_caption,
    truncate_caption,
    write_quarantine,
)
from visgen.data.webdataset_source import RawSample, iter_tar_samples

CFG = IngestConfig(source="unused", resolution=32, min_size=8)
RED = (200, 30, 60)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def run(members: list[tuple[str, bytes]], cfg: IngestConfig = CFG, tokenizer=None):
    samples = list(iter_tar_samples(io.BytesIO(tar_bytes(members)), "mem.tar"))
    return process_samples(samples, cfg, tokenizer)


def reject_reason(**kw) -> str | None:
    s = RawSample(key="k", shard="s.tar", **kw)
    good, bad = process_samples([s], kw.pop("cfg", CFG))
    return bad[0]["reason"] if bad else None


def solid(mode: str, color, size=(48, 40)) -> Image.Image:
    return Image.new(mode, size, color)


# -- images -------------------------------------------------------------------------------------

@pytest.mark.parametrize("ext, fmt", [
    ("jpg", "JPEG"), ("jpeg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"),
    ("JPG", "JPEG"), ("JPEG", "JPEG"), ("PNG", "PNG"), ("WebP", "WEBP"),
])
def test_every_format_and_extension_case(ext, fmt):
    data = encode(solid("RGB", RED), fmt, **({"quality": 95} if fmt != "PNG" else {}))
    good, bad = run([(f"k.{ext}", data), ("k.txt", b"a red box")])
    assert bad == [] and good.key == ["k"]
    assert good.image.shape == (1, 32, 32, 3) and good.image.dtype == np.uint8
    assert np.abs(good.image[0].reshape(-1, 3).mean(0) - RED).max() < 6


def test_content_decides_format_not_extension():
    png = encode(solid("RGB", RED), "PNG")
    good, bad = run([("k.jpg", png), ("k.txt", b"x")])
    assert good.key == ["k"]
    gif = encode(solid("RGB", RED).convert("P"), "GIF")
    _, bad = run([("k.jpg", gif), ("k.txt", b"x")])  # GIF/BMP/TIFF are never probed
    assert bad[0]["reason"] == "image_decode_error"


def _png_16bit(value: int) -> bytes:
    return encode(Image.fromarray(np.full((40, 48), value, np.uint16)), "PNG")


MODE_CASES = [
    ("L", encode(solid("L", 128), "PNG"), (128, 128, 128)),
    ("L-jpeg", encode(solid("L", 128), "JPEG", quality=95), (128, 128, 128)),
    ("1", encode(solid("1", 1), "PNG"), (255, 255, 255)),
    ("LA opaque", encode(solid("LA", (90, 255)), "PNG"), (90, 90, 90)),
    ("LA transparent", encode(solid("LA", (90, 0)), "PNG"), (255, 255, 255)),  # white background
    ("RGBA half", encode(solid("RGBA", (255, 0, 0, 128)), "PNG"), (255, 127, 127)),
    ("RGBA webp", encode(solid("RGBA", (0, 0, 255, 0)), "WEBP", lossless=True), (255, 255, 255)),
    ("P", encode(solid("RGB", RED).convert("P"), "PNG"), RED),
    ("CMYK", encode(solid("CMYK", (0, 255, 255, 0)), "JPEG", quality=95), (255, 0, 0)),
    ("I;16 mid", _png_16bit(0x8000), (128, 128, 128)),
    ("I;16 max", _png_16bit(0xFFFF), (255, 255, 255)),
]


@pytest.mark.parametrize("name, data, expect", MODE_CASES, ids=[c[0] for c in MODE_CASES])
def test_modes_become_rgb(name, data, expect):
    out = decode_image(data, CFG)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert np.abs(out.reshape(-1, 3).mean(0) - expect).max() <= 4, name


def test_palette_transparency_and_background_are_honoured():
    p = solid("P", 0)
    p.putpalette([10, 20, 30] * 256)
    data = encode(p, "PNG", transparency=0)  # palette index 0 is fully transparent
    cfg = CFG.model_copy(update={"alpha_background": (0, 0, 255)})
    assert tuple(decode_image(data, cfg)[5, 5]) == (0, 0, 255)


def _halves(w: int, h: int) -> Image.Image:
    """Left half red, right half blue."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (255, 0, 0)
    a[:, w // 2:] = (0, 0, 255)
    return Image.fromarray(a)


def test_crop_and_pad():
    data = encode(_halves(64, 32), "PNG")
    crop = decode_image(data, CFG)  # centre square x ∈ [16, 48): still red | blue
    assert tuple(crop[16, 2]) == (255, 0, 0) and tuple(crop[16, 29]) == (0, 0, 255)
    cfg = CFG.model_copy(update={"resize_mode": "pad", "pad_color": (0, 255, 0)})
    pad = decode_image(data, cfg)  # 64×32 → 32×16 content in rows [8, 24), green bars above/below
    assert tuple(pad[2, 16]) == (0, 255, 0) and tuple(pad[29, 16]) == (0, 255, 0)
    assert tuple(pad[16, 2]) == (255, 0, 0) and tuple(pad[16, 29]) == (0, 0, 255)


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored wide, displayed rotated 90° clockwise: tall
    data = encode(_halves(64, 32), "JPEG", quality=95, exif=exif)
    cfg = CFG.model_copy(update={"resize_mode": "pad", "pad_color": (0, 255, 0)})
    out = decode_image(data, cfg)
    assert np.abs(out[16, 1].astype(int) - (0, 255, 0)).max() < 10  # bars now left/right
    assert out[2, 16, 0] > 200 and out[29, 16, 2] > 200  # red on top, blue below


def test_jpeg_draft_stays_close_to_full_decode():
    y, x = np.mgrid[0:256, 0:256]
    img = Image.fromarray(np.stack([x, y, (x + y) // 2], -1).astype(np.uint8))
    data = encode(img, "JPEG", quality=90)
    fast = decode_image(data, CFG).astype(int)
    full = decode_image(data, CFG.model_copy(update={"jpeg_draft": False})).astype(int)
    assert np.abs(fast - full).mean() < 2.0


def test_bomb_guard_reads_only_the_header(monkeypatch):
    data = encode(Image.new("L", (4000, 3000)), "PNG")  # 12 Mpx, a few kB compressed
    from PIL import ImageFile

    def no_decode(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(Rejected) as info:
        decode_image(data, CFG.model_copy(update={"max_image_pixels": 10_000_000}))
    assert info.value.reason == "image_too_large" and "4000x3000" in info.value.detail


def test_pil_bomb_error_and_warning_are_handled(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(Rejected) as info:  # > 2 × PIL's limit: PIL raises while opening
        decode_image(encode(solid("RGB", RED, (100, 100)), "PNG"), CFG)
    assert info.value.reason == "image_too_large"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's warning (1000 < 1600 px) must not escape or reject
        assert decode_image(encode(solid("RGB", RED, (40, 40)), "PNG"), CFG).shape == (32, 32, 3)


def test_too_small_and_corrupt():
    with pytest.raises(Rejected, match="shorter side 7") as info:
        decode_image(encode(solid("RGB", RED, (100, 7)), "PNG"), CFG)
    assert info.value.reason == "image_too_small"
    jpeg = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "JPEG")
    for bad in (jpeg[: len(jpeg) // 2], b"\x89PNG\r\n\x1a\n" + b"\0" * 40, os.urandom(300), b""):
        with pytest.raises(Rejected) as info:
            decode_image(bad, CFG)
        assert info.value.reason == "image_decode_error"
        assert "0x" not in info.value.detail  # no object addresses: details are deterministic


# -- captions and json -------------------------------------------------------------------------

CAPTION_CASES = [
    (b"a red  circle\n", None, {}, "a red circle"),
    ("\ufeffun cercle rouge".encode(), None, {}, "un cercle rouge"),        # BOM dropped
    ("一个红色的圆".encode(), None, {}, "一个红色的圆"),
    (b"tab\tand\x00nul", None, {}, "tab and nul"),                       # control characters
    (None, {"caption": " from json "}, {}, "from json"),                  # .json fallback
    (b"txt wins", {"caption": "json loses"}, {}, "txt wins"),
    (b"", {"caption": "json"}, {}, "caption_empty"),                      # .txt present: it is the caption
    (b" \n\t ", None, {}, "caption_empty"),
    (b"\xff\xfe broken", None, {}, "caption_undecodable"),
    (None, {"caption": "\ud800 lone surrogate"}, {}, "caption_undecodable"),
    (None, None, {}, "caption_missing"),
    (None, {"url": "http://x"}, {}, "caption_missing"),
    (None, {"caption": None}, {}, "caption_missing"),
    (b"one two three four five", None, {"max_caption_chars": 12}, "one two"),
    (b"one two three four five", None, {"max_caption_chars": 13}, "one two three"),
    ("一二三四五六七八九十一二".encode(), None, {"max_caption_chars": 8}, "一二三四五六七八"),
    (b"one two three four five", None, {"max_caption_chars": 12, "overlong_caption": "reject"}, "caption_too_long"),
]


CAPTION_IDS = [f"{i}-{c[3] if c[3] in QUARANTINE_REASONS else 'ok'}" for i, c in enumerate(CAPTION_CASES)]


@pytest.mark.parametrize("txt, meta, overrides, expect", CAPTION_CASES, ids=CAPTION_IDS)
def test_caption_rules(txt, meta, overrides, expect):
    cfg = CFG.model_copy(update=overrides)
    if expect in QUARANTINE_REASONS:
        with pytest.raises(Rejected) as info:
            read_caption(txt, meta, cfg)
        assert info.value.reason == expect
    else:
        assert read_caption(txt, meta, cfg) == expect


def test_truncate_caption():
    assert truncate_caption("short", 10) == "short"
    assert truncate_caption("exactly ten", 11) == "exactly ten"
    assert truncate_caption("a verylongwordwithoutspaces", 10) == "a verylong"  # no space in the back half
    assert len(truncate_caption("word " * 100, 64)) <= 64


def test_json_rules_and_ground_truth_passthrough():
    img = encode(solid("RGB", RED), "PNG")
    meta = b'{"caption": "two red squares", "objects": [1, 2]}'
    good, bad = run([("k.png", img), ("k.json", meta)])
    assert good.caption == ["two red squares"] and good.json == [meta.decode()]
    for raw in (b"{not json", b"[1, 2]", b"\xff{}"):
        _, bad = run([("k.png", img), ("k.txt", b"x"), ("k.json", raw)])
        assert bad[0]["reason"] == "json_invalid", raw
    good, _ = run([("k.png", img), ("k.txt", b"x")])
    assert good.json == [""]


def test_every_sample_reason_and_cheap_checks_first():
    img = encode(solid("RGB", RED), "PNG")
    assert reject_reason(image=img, image_name="k.png", txt=b"ok") is None
    assert reject_reason(txt=b"ok") == "image_missing"
    assert reject_reason(image=b"junk", image_name="k.jpg", txt=b"ok") == "image_decode_error"
    # A sample with both a bad caption and a bad image is rejected for the caption, undecoded.
    assert reject_reason(image=b"junk", image_name="k.jpg", txt=b"  ") == "caption_empty"
    assert reject_reason(image=img, image_name="k.png", fault="member_too_large", detail="d") == "member_too_large"


class _Trap:
    """Unpickling this creates a directory: proof that a member was unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_pickled_members_are_dropped_never_unpickled(tmp_path):
    marker = str(tmp_path / "unpickled")
    trap = pickle.dumps(_Trap(marker))
    img = encode(solid("RGB", RED), "PNG")
    members = [("k.png", img), ("k.txt", b"a caption"), ("k.pkl", trap), ("k.pth", trap), ("k.cls.pyd", trap),
               ("k.cls", b"3")]
    good, bad = run(members)
    assert not os.path.exists(marker)
    assert good.key == ["k"]  # the sample itself is fine
    assert [(b["reason"], b["detail"]) for b in bad] == [("member_dropped", "'k.pkl', 'k.pth', 'k.cls.pyd'")]


def test_tokenization_truncates_without_specials():
    from visgen.text.tokenizer import TextTokenizerConfig, train_text_tokenizer

    tok = train_text_tokenizer(["a red circle", "two blue squares", "一个红色的圆"] * 20,
                               TextTokenizerConfig(vocab_size=300, min_frequency=1))
    img = encode(solid("RGB", RED), "PNG")
    members = [("a.png", img), ("a.txt", b"two blue squares and a red circle"), ("b.png", img), ("b.txt", b"x")]
    good, _ = run(members, CFG.model_copy(update={"max_text_tokens": 3}), tok)
    assert good.text_ids[0] == tok.encode("two blue squares and a red circle")[:3]
    assert len(good.text_ids[0]) == 3 and good.text_ids[1] == tok.encode("x")
    assert not set(good.text_ids[0]) & set(tok.special_ids.values())
    good, _ = run(members)  # no tokenizer: empty ids, nothing else changes
    assert good.text_ids == [[], []] and good.caption[1] == "x"


# -- quarantine files ---------------------------------------------------------------------------

def test_quarantine_files_are_deterministic_and_deduplicated(tmp_path):
    q = str(tmp_path / "q")
    rows = [{"key": "a", "shard": "s.tar", "reason": "caption_empty", "detail": "d"},
            {"key": "", "shard": "t.tar", "reason": "shard_truncated", "detail": "cut"}]
    first = write_quarantine(rows, q)
    assert write_quarantine(rows, q) == first  # a re-run batch rewrites the same file
    assert write_quarantine([], q) is None
    write_quarantine(rows[:1] + [{"key": "b", "shard": "s.tar", "reason": "caption_empty", "detail": "d"}], q)
    table = quarantine_table(q)
    assert table.column_names == ["key", "shard", "reason", "detail"]
    assert table.num_rows == 3  # "a" appears in two files, counted once
    assert quarantine_summary(q) == {"caption_empty": 2, "shard_truncated": 1}
    (tmp_path / "q" / "keep.txt").write_text("not ours")
    assert clear_quarantine(q) == 2 and os.listdir(q) == ["keep.txt"]
    assert quarantine_summary(q) == {} and quarantine_summary(str(tmp_path / "absent")) == {}


# -- config -------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, value, message", [
    ("resize_mode", "stretch", "resize_mode"),
    ("pad_color", [0, 0, 300], "pad_color"),
    ("resolution", 7, "resolution"),
    ("overlong_caption", "drop", "overlong_caption"),
    ("typo_field", 1, "unknown key"),
])
def test_config_rejects_bad_values(field, value, message):
    with pytest.raises(SpecError, match=message):
        validate_section(IngestConfig, {"source": "shards", field: value}, "data.ingest")


def test_config_defaults_and_docs():
    cfg = validate_section(IngestConfig, {"source": "shards", "pad_color": [1, 2, 3]})
    assert cfg.pad_color == (1, 2, 3) and cfg.resize_mode == "crop"
    assert all(f.description for f in IngestConfig.model_fields.values())
    assert set(ingest.NOTICE_REASONS) | set(ingest.SHARD_REASONS) <= set(QUARANTINE_REASONS)
