"""Request parsing and validation for the HTTP endpoints, before any model work.

Every refusal is a :class:`RequestError` carrying the HTTP status, the offending field and the
limit, which the ingress turns into ``{"error": {"status", "field", "message", "limit"}}``.
Order matters: sizes are checked before bytes are read in full, and an image's pixel count is
read from its header before a single pixel is decoded (a 50 kB PNG can claim 50 000 x 50 000
pixels and would otherwise take gigabytes to decode).
"""

from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
import io
import json
import re
import typing
from typing import Any, AsyncIterator, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from visgen.data.images import ImageError, ImagePrep, load_rgb, open_image, to_model_square
from visgen.serve.config import ServeLimits

_REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


class RequestError(Exception):
    """A request refused with ``status``; ``field`` names what was wrong, ``limit`` what is allowed."""

    def __init__(self, status: int, field: str, message: str, limit: Any = None):
        super().__init__(message)
        self.status, self.field, self.message, self.limit = status, field, message, limit

    def body(self, request_id: str) -> dict:
        return {"error": {"status": self.status, "field": self.field, "message": self.message, "limit": self.limit},
                "request_id": request_id}


def request_id(header: str | None, fresh: str) -> str:
    """The caller's ``X-Request-Id`` when it is a sane token, else ``fresh``."""
    return header if header and _REQUEST_ID.match(header) else fresh


# ---------------------------------------------------------------------------------------------
# Request schemas (built from the limits, so the OpenAPI docs show the real bounds)
# ---------------------------------------------------------------------------------------------
def request_models(limits: ServeLimits, grid_rows: int | None = None) -> dict[str, type[BaseModel]]:
    """Pydantic models of the JSON bodies: ``generate``, ``caption``, ``edit``."""
    strict = ConfigDict(extra="forbid")
    sampling = dict(
        seed=(int, Field(0, ge=0, le=limits.max_seed, description="Sampling seed; image j uses seed + j.")),
        cfg_scale=(float | None, Field(None, ge=1.0, le=limits.max_cfg_scale,
                                       description="Classifier-free guidance scale (default: the model's).")),
        temperature=(float | None, Field(None, ge=0.0, le=limits.max_temperature,
                                         description="Sampling temperature, 0 = greedy (default: the model's).")),
        top_k=(int | None, Field(None, ge=0, le=limits.max_top_k, description="Sample among the k most likely codes; 0 = all.")),
        top_p=(float | None, Field(None, gt=0.0, le=1.0, description="Nucleus sampling mass.")),
        object_temperature=(float | None, Field(None, ge=0.0, le=limits.max_temperature, description=(
            "Draw object codes apart from the background at this temperature, 0 = their most likely "
            "(default: the model's; needs a model whose data has a background code)."))),
        object_cfg_scale=(float | None, Field(None, ge=1.0, le=limits.max_cfg_scale, description=(
            "Guidance scale of the object codes drawn apart from the background; cfg_scale then guides "
            "whether a slot is background (default: the model's)."))),
        object_min_p=(float | None, Field(None, ge=0.0, le=1.0, description=(
            "The object codes drawn apart from the background are drawn among those whose probability under "
            "the prompt's own model is at least this fraction of the likeliest one's; 0 = all (default: the "
            "model's)."))),
    )
    prompt = (str, Field(min_length=1, max_length=limits.max_prompt_chars, description="What to draw (any language the model reads)."))
    image = (str, Field(min_length=1, description="The image file (PNG, JPEG or WebP), base64-encoded."))
    def best_of(what: str) -> tuple:
        return (int | None, Field(None, ge=1, le=limits.max_candidates, description=f"{what} (default: the model's)."))

    candidates = best_of("Draw this many images per image and return the one whose prompt the model finds the "
                         "likeliest caption of it")
    generate = create_model("GenerateRequest", __config__=strict, prompt=prompt,
                            n=(int, Field(1, ge=1, le=limits.max_n, description="Images to draw.")),
                            candidates=candidates, **sampling)
    language = (Literal["auto", "en", "zh"], Field("auto", description="Caption language: auto (the model chooses), "
                                                   "en or zh (forced; the other script is blocked)."))
    caption = create_model("CaptionRequest", __config__=strict, image=image, language=language,
                           candidates=best_of("Write this many captions and return the one under which the "
                                              "model finds the image likeliest"))
    rows = Field(ge=0, le=grid_rows, description="Token rows kept from the top; the rest is redrawn.") if grid_rows is not None \
        else Field(ge=0, description="Token rows kept from the top; the rest is redrawn.")
    edit = create_model("EditRequest", __config__=strict, image=image, prompt=prompt, keep_rows=(int, rows), **sampling)
    return {"generate": generate, "caption": caption, "edit": edit}


def validate(model: type[BaseModel], data: Any) -> BaseModel:
    """``model`` from parsed JSON; the first problem becomes a 422 naming the field and its limit."""
    if not isinstance(data, dict):
        raise RequestError(422, "body", f"the body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data, strict=False)
    except ValidationError as err:
        e = err.errors()[0]
        field = ".".join(str(p) for p in e["loc"]) or "body"
        ctx = e.get("ctx") or {}
        limit = next((ctx[k] for k in ("le", "ge", "lt", "gt", "max_length", "min_length") if k in ctx), None)
        if e["type"] == "missing":
            raise RequestError(422, field, f"{field}: required field is missing") from None
        if e["type"] == "extra_forbidden":
            allowed = ", ".join(model.model_fields)
            raise RequestError(422, field, f"{field}: unknown field; allowed: {allowed}", allowed) from None
        if e["type"] == "literal_error":  # one of a fixed set: the limit is the set
            limit = list(typing.get_args(model.model_fields[field].annotation)) if field in model.model_fields else None
        shown = e.get("input")
        shown = (shown[:40] + "...") if isinstance(shown, str) and len(shown) > 40 else shown
        raise RequestError(422, field, f"{field}: {shown!r} is not allowed: {e['msg']}", limit) from None


# ---------------------------------------------------------------------------------------------
# Bodies
# ---------------------------------------------------------------------------------------------
async def read_body(content_length: str | None, chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise RequestError(400, "Content-Length", f"Content-Length {content_length!r} is not a number") from None
        if declared > limit:
            raise RequestError(413, "body", f"the body has {declared} bytes; the limit is {limit}", limit)
    buf = bytearray()
    async for chunk in chunks:
        buf += chunk
        if len(buf) > limit:  # a body sent without (or with a lying) Content-Length
            raise RequestError(413, "body", f"the body exceeds the limit of {limit} bytes", limit)
    return bytes(buf)


def parse_json(body: bytes) -> Any:
    if not body:
        raise RequestError(400, "body", "the body is empty; send a JSON object")
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(400, "body", f"the body is not valid JSON ({err})") from None


def parse_multipart(body: bytes, content_type: str) -> dict[str, bytes | str]:
    """``multipart/form-data`` → ``{field: bytes (file parts) | str (text parts)}``."""
    if "boundary=" not in content_type:
        raise RequestError(400, "Content-Type", "multipart/form-data without a boundary parameter")
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\nMIME-Version: 1.0\r\n\r\n" + body)
    if not msg.is_multipart():
        raise RequestError(400, "body", "the multipart body could not be parsed")
    out: dict[str, bytes | str] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        payload = part.get_payload(decode=True) or b""
        if part.get_filename() is None:
            try:
                out[name] = payload.decode("utf-8")
            except UnicodeDecodeError:
                raise RequestError(400, name, f"form field {name!r} is not UTF-8 text") from None
        else:
            out[name] = payload
    return out


def decode_base64(text: str, field: str, limit: int) -> bytes:
    """Base64 (or a ``data:...;base64,`` URL) → bytes, refusing what would decode to more than ``limit``."""
    if text.startswith("data:"):
        text = text.split(",", 1)[-1]
    if len(text) * 3 // 4 > limit + 3:
        raise RequestError(413, field, f"{field}: the image has about {len(text) * 3 // 4} bytes; the limit is {limit}", limit)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, field, f"{field}: not valid base64") from None


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------
def decode_image(data: bytes, limits: ServeLimits, field: str = "image", resolution: int | None = None,
                 prep: ImagePrep | None = None) -> np.ndarray:
    """An uploaded image file → uint8 (R, R, 3), made as the model's training images were.

    ``prep``: the served bundle's :class:`ImagePrep` (``Model.image_prep``); with only
    ``resolution``, ingest's defaults at that size (what a bundle without the record was trained
    with); with neither, the upright RGB image at its own size. The pixels come from
    :mod:`visgen.data.images`, the conversion ingest and ``Model`` use.

    Checked in this order: byte size, format (from the header), pixel count (from the header),
    then decoded. Truncated or corrupt files are a 400, never a crash.
    """
    if len(data) > limits.max_image_bytes:
        raise RequestError(413, field, f"{field}: the image has {len(data)} bytes; the limit is {limits.max_image_bytes}",
                           limits.max_image_bytes)
    if not data:
        raise RequestError(400, field, f"{field}: the image is empty")
    if prep is None and resolution is not None:
        prep = ImagePrep(resolution=resolution)
    elif prep is not None and resolution is not None and prep.resolution != resolution:
        raise ValueError(f"decode_image: prep.resolution={prep.resolution} differs from resolution={resolution}")
    try:
        im = open_image(data, formats=limits.image_formats, max_pixels=limits.max_image_pixels)  # the header only
    except ImageError as err:
        if err.reason == "image_too_large" and err.size is None:  # PIL's own guard, for sizes far beyond ours
            raise RequestError(413, field, f"{field}: the image has more than {limits.max_image_pixels} pixels, the "
                               f"limit ({err.detail})", limits.max_image_pixels) from None
        if err.reason == "image_too_large":
            w, h = err.size
            raise RequestError(413, field, f"{field}: the image is {w}x{h} = {w * h} pixels; the limit is "
                               f"{limits.max_image_pixels}", limits.max_image_pixels) from None
        if err.reason == "image_format":
            raise RequestError(415, field, f"{field}: not an image in an accepted format "
                               f"({', '.join(limits.image_formats)})", list(limits.image_formats)) from None
        raise RequestError(400, field, f"{field}: unreadable image header ({err.detail})") from None
    try:
        if prep is None:
            return np.asarray(load_rgb(im), dtype=np.uint8)
        return to_model_square(im, prep)
    except ImageError as err:  # truncated / corrupt data
        raise RequestError(400, field, f"{field}: the image could not be decoded ({err.detail})") from None


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def wants_png(accept: str | None) -> bool:
    """``Accept: image/png`` asked for (and preferred to JSON)."""
    if not accept:
        return False
    types = [t.split(";")[0].strip().lower() for t in accept.split(",")]
    return "image/png" in types and ("application/json" not in types or types.index("image/png") < types.index("application/json"))


Kind = Literal["json", "multipart"]


def body_kind(content_type: str | None) -> Kind:
    ct = (content_type or "").split(";")[0].strip().lower()
    if ct in ("application/json", ""):
        return "json"
    if ct == "multipart/form-data":
        return "multipart"
    raise RequestError(415, "Content-Type", f"Content-Type {ct!r} is not accepted; send application/json or "
                       "multipart/form-data", ["application/json", "multipart/form-data"])
