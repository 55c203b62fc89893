"""Any image → the model's square: the one conversion that ingest, ``Model`` and Serve share.

Training images and the images a served model is shown must be made the same way, pixel for
pixel, or the model is asked about pictures unlike those it learnt from. So every path calls
:func:`decode_image` (bytes) or :func:`to_model_square` (an opened PIL image or an array), with
the :class:`ImagePrep` the model was trained with (recorded in its bundle's manifest).

Order of the steps, and why::

    open_image        header only: format, width x height against the limits (no pixel decoded;
                      a 50 kB PNG can declare 50 000 x 50 000 pixels)
    draft (JPEG)      libjpeg decodes at 1/2, 1/4 or 1/8 scale when that still covers the size
                      the resize needs (several times faster; slight softening)
    load              decode the pixels
    EXIF orientation  before anything that depends on which side is the short one
    → RGB             alpha composited over ``alpha_background``; 16-bit scaled to 8-bit (PIL's
                      own convert clips at 255, turning most 16-bit images white); palette,
                      CMYK, LA, 1, ... through PIL
    → square          antialiased bicubic: centre crop (``crop``: short side → resolution) or
                      letterbox onto ``pad_color`` (``pad``: long side → resolution)

Errors are :class:`ImageError` with a ``reason`` that callers map to their own vocabulary
(ingest quarantine reasons, Serve HTTP statuses).
"""

from __future__ import annotations

import io
import re
import warnings
from typing import Annotated, Literal, Sequence

import numpy as np
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field, ValidationError

#: What ingest and Serve decode by default, whatever a file's extension says.
IMAGE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP")
#: The manifest key of a bundle's :class:`ImagePrep`.
MANIFEST_KEY = "image_prep"

_Byte = Annotated[int, Field(ge=0, le=255)]
_RESAMPLE = Image.Resampling.BICUBIC  # PIL widens the kernel when downscaling: antialiased
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})


class ImagePrep(BaseModel):
    """How an image becomes the model's (resolution, resolution, 3) uint8 square.

    The defaults are ingest's defaults (:class:`visgen.data.ingest.IngestConfig`): a bundle that
    does not record its preparation was trained with them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    resolution: int = Field(ge=1, le=4096, description="Side of the output square in pixels.")
    resize_mode: Literal["crop", "pad"] = Field("crop", description="'crop': scale the short side to resolution, "
                                                "centre-crop; 'pad': scale the long side, letterbox.")
    pad_color: tuple[_Byte, _Byte, _Byte] = Field((0, 0, 0), description="RGB fill of the letterbox bars.")
    alpha_background: tuple[_Byte, _Byte, _Byte] = Field((255, 255, 255), description="RGB background that "
                                                         "transparent images are composited over.")
    jpeg_draft: bool = Field(True, description="Let libjpeg decode JPEGs at a reduced scale that still covers "
                             "the target size.")

    @classmethod
    def from_manifest(cls, manifest: dict, resolution: int) -> "ImagePrep":
        """The preparation a bundle records, or ingest's defaults for a bundle written before it did."""
        recorded = manifest.get(MANIFEST_KEY)
        if recorded is None:
            return cls(resolution=resolution)
        try:
            prep = cls.model_validate({"resolution": resolution, **recorded})
        except (ValidationError, TypeError) as err:
            raise ValueError(f"the bundle manifest's {MANIFEST_KEY!r} entry {recorded!r} is not valid: {err}") from None
        if prep.resolution != resolution:
            raise ValueError(f"the bundle manifest's {MANIFEST_KEY!r} says resolution {prep.resolution} but its image "
                             f"tokenizer works at {resolution}: the bundle's parts were not made together")
        return prep


class ImageError(ValueError):
    """An image that cannot be made into the model's square.

    ``reason``: ``image_format`` (not one of the accepted formats), ``image_decode_error``
    (unreadable header or pixels), ``image_too_large`` / ``image_too_small`` (header size
    against the limits; ``size`` holds (width, height) when the header was read).
    """

    REASONS = ("image_format", "image_decode_error", "image_too_large", "image_too_small")

    def __init__(self, reason: str, detail: str, size: tuple[int, int] | None = None, fmt: str | None = None):
        assert reason in self.REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail, self.size, self.format = reason, detail, size, fmt


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------
def open_image(data: bytes, *, formats: Sequence[str] | None = IMAGE_FORMATS, max_pixels: int | None = None,
               min_size: int = 1) -> Image.Image:
    """Image bytes → a PIL image whose header is read and checked, pixels not yet decoded.

    ``formats``: PIL format names tried (``None``: any PIL reads). ``max_pixels`` /
    ``min_size`` are checked against the header's width x height.
    """
    names = _format_names(formats)
    try:
        with warnings.catch_warnings():
            # PIL warns above its own MAX_IMAGE_PIXELS; the caller's limit is checked below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(formats) if formats is not None else None)
    except Image.DecompressionBombError as err:
        raise ImageError("image_too_large", str(err)) from None
    except Image.UnidentifiedImageError:
        raise ImageError("image_format", f"not a {names} image ({len(data)} bytes, starting {bytes(data[:8])!r})") from None
    except Exception as err:  # noqa: BLE001 - any parser failure on hostile bytes
        raise ImageError("image_decode_error", f"not a readable {names} image: {describe_error(err)}") from None
    w, h = img.size
    if max_pixels is not None and (w < 1 or h < 1 or w * h > max_pixels):
        raise ImageError("image_too_large", f"{img.format} header declares {w}x{h} = {w * h} pixels > {max_pixels}",
                         (w, h), img.format)
    if min(w, h) < min_size:
        raise ImageError("image_too_small", f"{w}x{h}: shorter side {min(w, h)} < {min_size}", (w, h), img.format)
    return img


def to_rgb(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any PIL mode → RGB (alpha composited over ``background``, 16-bit scaled to 8-bit)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        a = np.asarray(img).astype(np.int64)
        a8 = (np.clip(a, 0, 65535) >> 8).astype(np.uint8)  # (H, W)
        return Image.fromarray(a8, "L").convert("RGB")
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, ...


def pre_resize_size(w: int, h: int, prep: ImagePrep) -> tuple[int, int]:
    """Size the whole image is scaled to before the crop / pad: short (crop) or long (pad) side → resolution."""
    side = min(w, h) if prep.resize_mode == "crop" else max(w, h)
    scale = prep.resolution / side
    return max(1, round(w * scale)), max(1, round(h * scale))


def resize_to_square(img: Image.Image, prep: ImagePrep) -> np.ndarray:
    """RGB image → (R, R, 3) uint8 by centre crop or letterbox, antialiased. An (R, R) image is kept as it is."""
    r = prep.resolution
    w, h = img.size
    if prep.resize_mode == "crop":
        s = min(w, h)
        left, top = (w - s) / 2, (h - s) / 2
        # Resample straight from the centre square: one pass, no intermediate full-size image.
        out = img.resize((r, r), _RESAMPLE, box=(left, top, left + s, top + s))
    else:
        nw, nh = pre_resize_size(w, h, prep)
        out = Image.new("RGB", (r, r), tuple(prep.pad_color))
        out.paste(img.resize((nw, nh), _RESAMPLE), ((r - nw) // 2, (r - nh) // 2))
    return np.asarray(out, dtype=np.uint8)


def load_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255),
             draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an opened image's pixels, upright (EXIF orientation), as RGB; raises ``image_decode_error``.

    ``draft_size``: let a JPEG decode at the smallest 1/2^k scale that still covers this size.
    """
    w, h, fmt, mode = *img.size, img.format, img.mode
    try:
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", draft_size)  # a no-op once the pixels are loaded
        img.load()
        img = ImageOps.exif_transpose(img)
        return to_rgb(img, background)
    except Exception as err:  # noqa: BLE001 - truncated data, bad Huffman tables, broken zlib stream, ...
        raise ImageError("image_decode_error", f"{fmt} {w}x{h} {mode}: {describe_error(err)}") from None


# ---------------------------------------------------------------------------------------------
# The whole conversion
# ---------------------------------------------------------------------------------------------
def to_model_square(image: Image.Image | np.ndarray, prep: ImagePrep) -> np.ndarray:
    """A PIL image (opened or loaded) or a uint8 array → (R, R, 3) uint8, as ingest makes training images.

    Arrays: (H, W) grey, (H, W, 3) RGB or (H, W, 4) RGBA (alpha composited over the background).
    An (R, R, 3) array comes back unchanged.
    """
    if isinstance(image, Image.Image):
        draft = pre_resize_size(*image.size, prep) if prep.jpeg_draft else None
        return resize_to_square(load_rgb(image, prep.alpha_background, draft), prep)
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))) \
            or min(arr.shape[:2], default=0) < 1:
        raise ValueError(f"expected a uint8 image array of shape (H, W), (H, W, 3) or (H, W, 4), got "
                         f"{arr.dtype} {arr.shape}; convert it with np.asarray(PIL.Image.open(path).convert('RGB'))")
    if arr.shape == (prep.resolution, prep.resolution, 3):
        return np.ascontiguousarray(arr)
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[arr.shape[-1] if arr.ndim == 3 else 2]
    return resize_to_square(to_rgb(Image.fromarray(np.ascontiguousarray(arr), mode), prep.alpha_background), prep)


def decode_image(data: bytes, prep: ImagePrep, *, formats: Sequence[str] | None = IMAGE_FORMATS,
                 max_pixels: int | None = None, min_size: int = 1) -> np.ndarray:
    """Image file bytes → (R, R, 3) uint8 under ``prep``; raises :class:`ImageError`.

    ``formats`` / ``max_pixels`` / ``min_size`` are checked on the header before any pixel is decoded.
    """
    img = open_image(data, formats=formats, max_pixels=max_pixels, min_size=min_size)
    return to_model_square(img, prep)


def describe_error(err: BaseException) -> str:
    """``Type: message`` without object addresses, so the same failure reads the same in every run."""
    return _ADDRESS.sub("", f"{type(err).__name__}: {err}")


_ADDRESS = re.compile(r" ?<[^<>]* at 0x[0-9a-fA-F]+>")


def _format_names(formats: Sequence[str] | None) -> str:
    if not formats:
        return "known"
    names = [str(f) for f in formats]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"

