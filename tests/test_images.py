"""One image preparation: the same bytes give the same model square through ingest, Model and Serve.

Training images come from ingest (``process_samples``), captioning images from ``Model.caption``
(bytes, a path or a PIL image) and from ``/v1/caption``, whose ingress decodes the upload with
``serve.inputs.decode_image`` and whose replica hands the array to ``Model.encode_images``. The
HTTP app itself is exercised in tests/test_serve.py; here the ingress's decode function is called
directly, as the ingress calls it, so that no second Serve app has to start.
"""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
from PIL import Image

from bundles import RESOLUTION, make_bundle
from visgen.data.images import ImageError, ImagePrep, decode_image, to_model_square
from visgen.data.ingest import IngestConfig, process_samples
from visgen.data.webdataset_source import RawSample
from visgen.inference import Model, read_manifest, write_bundle
from visgen.serve.config import ServeLimits
from visgen.serve.inputs import RequestError, decode_image as serve_decode_image

R = RESOLUTION
PAD = ImagePrep(resolution=R, resize_mode="pad", pad_color=(0, 255, 0), alpha_background=(0, 0, 255))


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _cases() -> dict[str, bytes]:
    """Files whose preparation differs from a plain resize + convert('RGB') (all non-square)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:30, 0:44]
    smooth = Image.fromarray(np.stack([x * 5, y * 8, (x + y) * 3], -1).astype(np.uint8))  # (30, 44, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored wide, displayed rotated: tall
    rgba = np.dstack([np.asarray(smooth), rng.integers(0, 256, (30, 44), np.uint8)])
    palette = smooth.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return {
        "jpeg-exif-rotated": _encode(smooth, "JPEG", quality=95, exif=exif),
        "rgba-png": _encode(Image.fromarray(rgba, "RGBA"), "PNG"),
        "16-bit-png": _encode(Image.fromarray((x * 1400 + y * 30).astype(np.uint16)), "PNG"),
        "cmyk-jpeg": _encode(smooth.convert("CMYK"), "JPEG", quality=95),
        "palette-png-transparent": _encode(palette, "PNG", transparency=0),
        "non-square-rgb-png": _encode(smooth, "PNG"),
        "large-jpeg": _encode(smooth.resize((440, 300)), "JPEG", quality=90),  # decoded at a draft scale
    }


CASES = _cases()


def _ingest(data: bytes, prep: ImagePrep) -> np.ndarray:
    """The training image ingest makes of ``data`` (the batch function Ray Data runs)."""
    cfg = IngestConfig(source="unused", min_size=8, **prep.model_dump())
    good, bad = process_samples([RawSample(key="k", shard="s.tar", image=data, image_name="k.png", txt=b"x")], cfg)
    assert bad == [], bad
    return good.image[0]


@pytest.fixture(scope="module")
def pipes(tmp_path_factory) -> dict[str, Model]:
    """A bundle written before bundles recorded their preparation, and one trained with ``PAD``."""
    root = tmp_path_factory.mktemp("images")
    old = make_bundle(root)
    padded = write_bundle(root / "padded", lm_dir=root / "lm", image_tokenizer_dir=root / "vq",
                          text_tokenizer=root / "text_tokenizer.json", image_prep=PAD)
    return {"default": Model.load(old, device="cpu"), "pad": Model.load(padded, device="cpu")}


def _caption_input(pipe: Model, images: list, monkeypatch) -> np.ndarray:
    """The (B, R, R, 3) uint8 images ``Model.caption`` hands the image tokenizer for ``images``."""
    seen = []

    class Seen(Exception):
        pass

    def spy(x):  # stop there: the captions' words do not matter here
        seen.append(x)
        raise Seen

    monkeypatch.setattr(pipe.vq, "encode", spy)
    with pytest.raises(Seen):
        pipe.caption(images)
    monkeypatch.undo()
    assert len(seen) == 1 and seen[0].shape == (len(images), 3, R, R)
    return np.rint((seen[0].permute(0, 2, 3, 1).numpy() + 1.0) * 127.5).astype(np.uint8)  # back from [-1, 1]


@pytest.mark.parametrize("which", ["default", "pad"])
def test_ingest_pipeline_and_serve_make_the_same_square(pipes, which, tmp_path, monkeypatch):
    pipe = pipes[which]
    prep = PAD if which == "pad" else ImagePrep(resolution=R)
    assert pipe.image_prep == prep
    want = np.stack([_ingest(data, prep) for data in CASES.values()])
    assert want.shape == (len(CASES), R, R, 3) and want.dtype == np.uint8

    # Model.caption, given the file's bytes, its path or the opened PIL image.
    paths = []
    for i, data in enumerate(CASES.values()):
        paths.append(tmp_path / f"upload-{i}.img")
        paths[-1].write_bytes(data)
    for given in (list(CASES.values()), paths, [Image.open(io.BytesIO(d)) for d in CASES.values()]):
        got = _caption_input(pipe, given, monkeypatch)
        for name, g, w in zip(CASES, got, want):
            np.testing.assert_array_equal(g, w, err_msg=f"{name}: {type(given[0]).__name__}")

    # /v1/caption: the ingress decodes the upload for the served bundle, the replica encodes that array.
    limits = ServeLimits()
    for name, data, w in zip(CASES, CASES.values(), want):
        served = serve_decode_image(data, limits, "image", prep=pipe.image_prep)
        np.testing.assert_array_equal(served, w, err_msg=name)
        np.testing.assert_array_equal(pipe.prepare_images([served])[0], served)
        if which == "default":  # what the ingress passes for a bundle without a record: the resolution only
            np.testing.assert_array_equal(serve_decode_image(data, limits, "image", resolution=R), w, err_msg=name)



def test_the_cases_differ_from_a_plain_resize():
    """Each case would come out otherwise under a stretch-resize + convert('RGB') (the skew fixed here)."""
    for name, data in CASES.items():
        naive = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((R, R), Image.Resampling.BICUBIC))
        assert not np.array_equal(naive, _ingest(data, ImagePrep(resolution=R))), name


def test_palette_gif_outside_ingest_formats():
    """GIF is no training format (ingest rejects it), but Model and a Serve that accepts GIF prepare it alike."""
    p = Image.fromarray(np.arange(30 * 44, dtype=np.uint8).reshape(30, 44) % 7 * 30).convert("P")
    data = _encode(p, "GIF")
    want = to_model_square(Image.open(io.BytesIO(data)), PAD)
    np.testing.assert_array_equal(decode_image(data, PAD, formats=None), want)
    limits = ServeLimits(image_formats=("PNG", "JPEG", "WEBP", "GIF"))
    np.testing.assert_array_equal(serve_decode_image(data, limits, prep=PAD), want)
    with pytest.raises(ImageError) as err:
        decode_image(data, PAD)  # ingest's formats
    assert err.value.reason == "image_format" and "JPEG, PNG or WEBP" in str(err.value)
    cfg = IngestConfig(source="unused", min_size=8, **PAD.model_dump())
    _, bad = process_samples([RawSample(key="k", shard="s", image=data, image_name="k.png", txt=b"x")], cfg)
    assert bad[0]["reason"] == "image_decode_error"


def test_bundles_record_the_preparation_and_old_ones_mean_ingest_defaults(pipes, tmp_path):
    assert IngestConfig(source="x", resolution=R).image_prep() == ImagePrep(resolution=R)  # the fallback's meaning
    assert "image_prep" not in read_manifest(pipes["default"].source)
    assert read_manifest(pipes["pad"].source)["image_prep"] == PAD.model_dump(mode="json")
    assert pipes["pad"].info()["image_prep"]["resize_mode"] == "pad"
    with pytest.raises(ValueError, match="image_prep.resolution=32 .* trained at 16"):
        write_bundle(tmp_path / "b", lm_dir=pipes["pad"].source, image_tokenizer_dir=pipes["pad"].source,
                     text_tokenizer=f"{pipes['pad'].source}/text_tokenizer.json",
                     image_prep=PAD.model_copy(update={"resolution": 32}))
    broken = tmp_path / "broken"
    shutil.copytree(pipes["pad"].source, broken)
    manifest = read_manifest(broken)
    manifest["image_prep"]["resize_mode"] = "stretch"
    (broken / "manifest.json").write_text(__import__("json").dumps(manifest))
    with pytest.raises(ValueError, match="'image_prep' entry .*stretch"):
        Model.load(broken, device="cpu")


def test_bad_images_are_refused_with_what_was_wrong(pipes, tmp_path):
    pipe = pipes["default"]
    with pytest.raises(ValueError, match=r"uint8 image array .* got float32 \(4, 4, 3\)"):
        pipe.prepare_images([np.zeros((4, 4, 3), np.float32)])
    with pytest.raises(ValueError, match=r"12 image bytes: not a known image \(12 bytes, starting b'not an i'\)"):
        pipe.prepare_images([b"not an image"])
    with pytest.raises(FileNotFoundError, match="cannot read image file .*missing.png"):
        pipe.prepare_images([tmp_path / "missing.png"])
    cut = CASES["large-jpeg"][: len(CASES["large-jpeg"]) // 2]
    with pytest.raises(RequestError, match="could not be decoded") as err:
        serve_decode_image(cut, ServeLimits(), prep=pipe.image_prep)
    assert err.value.status == 400
