"""The inference API: a model bundle loaded as one object that draws, captions and edits.

    model = visgen.Model.load("work/shapes-32/models/bundle")       # or "models:/visgen@champion"
    images = model.generate(["a red circle left of a blue square", "两个绿色的三角形"], n=4, seed=0)
    texts = model.caption(images)                                   # the model picks the language
    zh = model.caption(images, language="zh")                         # or ask for one: "en" / "zh"
    edited = model.edit(images[0], "a red circle left of a yellow square", keep_rows=3)
    per_request = model.generate_many([GenerationRequest("a blue circle", n=2, seed=7),     # independent requests,
                                       GenerationRequest("a red square", temperature=0.0)])  # batched where they agree

A bundle is a directory (an MLflow artifact directory once registered)::

    manifest.json                  format, fingerprints, configs, sampling defaults, image preparation
                                   (visgen.data.images.ImagePrep: crop / pad, backgrounds), library versions
    image_tokenizer.safetensors    + image_tokenizer.json   (visgen.models.vq)
    lm.safetensors                 + lm.json                (visgen.models.gpt)
    text_tokenizer.json            byte-level BPE (HF tokenizers JSON)
    eval.json                      evaluation results, once evaluated

Loading reads only safetensors and JSON, never a pickle, and checks that the three parts fit
together (codebook size, token grid, text vocabulary, fingerprints recorded in the manifest).
Every image a ``Model`` is given (file, bytes, PIL image, array) is made into the model's
square by :mod:`visgen.data.images` with the preparation the bundle records, the very
conversion ingest applied to the training images.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from pydantic import Field, model_validator

from visgen import __version__, storage
from visgen.base import Section
from visgen.data.captions import detect_language
from visgen.data.images import ImageError, ImagePrep, decode_image, to_model_square
from visgen.models.gpt import CAPTION_LANGUAGES, caption_languages  # noqa: F401 - CAPTION_LANGUAGES: re-exported
from visgen.models.gpt import CONFIG_FILE as LM_JSON, WEIGHTS_FILE as LM_WEIGHTS, load_gpt
from visgen.models.io import check_fits
from visgen.models.vq import CONFIG_FILE as VQ_JSON, WEIGHTS_FILE as VQ_WEIGHTS, load_vq, to_model_input, to_uint8
from visgen.tracking import download_artifacts

log = logging.getLogger("visgen")

BUNDLE_FORMAT = "visgen-bundle/1"
MANIFEST, EVAL_FILE, TEXT_TOKENIZER_FILE = "manifest.json", "eval.json", "text_tokenizer.json"


MAX_CANDIDATES = 64  # best-of-n reranking: candidates per image or caption
BACKGROUND_MIN_SHARE = 0.25  # a bundle records a background code when one code is at least this share of the cells


class SamplingConfig(Section):
    """Default sampling settings of text → image generation and captioning (each call may override them)."""

    cfg_scale: float = Field(3.0, ge=1.0, le=50.0, description="Classifier-free guidance scale of text → image; 1 = no guidance.")
    temperature: float = Field(1.0, ge=0.0, le=10.0, description="Softmax temperature of image sampling; 0 = greedy.")
    top_k: int = Field(0, ge=0, le=1 << 20, description="Sample image codes among the k most likely only; 0 = all.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling of image codes: the smallest set holding this probability.")
    object_temperature: float | None = Field(None, ge=0.0, le=10.0, description=(
        "Image codes: whether a slot gets the background code (the code of most training cells, which the "
        "bundle records) is drawn at temperature; a slot that does not gets a code drawn among the others "
        "at this temperature (0 = their most likely). Draws objects sharper without the background, the "
        "per-slot mode of a sparse scene, emptying scenes. null = off (one draw at temperature)."))
    object_cfg_scale: float | None = Field(None, ge=1.0, le=50.0, description=(
        "With object_temperature: the guidance scale of the draw among the object codes, so the layout "
        "(background or not, at cfg_scale) and the objects' codes are guided apart. null = cfg_scale."))
    object_min_p: float | None = Field(None, ge=0.0, le=1.0, description=(
        "With object_temperature: the draw among the object codes considers only codes whose probability "
        "under the conditional model is at least this fraction of its likeliest object code's (the "
        "plausibility bound of contrastive decoding): guidance cannot promote a code the prompt's own model "
        "finds implausible, which at strong guidance scatters specks and ragged outlines. null / 0 = off."))
    caption_temperature: float = Field(0.0, ge=0.0, le=10.0, description="Temperature of captioning; 0 = greedy.")
    candidates: int = Field(1, ge=1, le=MAX_CANDIDATES, description=(
        "Images drawn per requested image; the one whose prompt the model itself finds the likeliest caption "
        "of it, log p(prompt | image) by its image -> text direction, is returned (best-of-n). 1 = no "
        "reranking; n costs about n times the drawing."))
    caption_candidates: int = Field(1, ge=1, le=MAX_CANDIDATES, description=(
        "Captions written per image: one at caption_temperature and n - 1 sampled at "
        "caption_candidate_temperature; the one under which the model finds the image likeliest, "
        "log p(image | caption) by its text -> image direction, is returned. 1 = no reranking."))
    caption_candidate_temperature: float = Field(0.7, gt=0.0, le=10.0, description=(
        "Temperature of the extra captions of caption_candidates (greedy would repeat the first)."))

    @model_validator(mode="after")
    def _object_cfg_needs_objects(self) -> "SamplingConfig":
        if self.object_cfg_scale is not None and self.object_temperature is None:
            raise ValueError(f"object_cfg_scale={self.object_cfg_scale} guides the object codes of "
                             "object_temperature, which is null: set object_temperature too")
        if self.object_min_p is not None and self.object_temperature is None:
            raise ValueError(f"object_min_p={self.object_min_p} bounds the object codes of "
                             "object_temperature, which is null: set object_temperature too")
        return self


def candidate_seed(seed: int, index: int) -> int:
    """The seed of best-of-n candidate ``index`` of an image with ``seed``: the seed itself for the
    first (one candidate draws what no reranking draws), a seed no image seed below 2**48 uses for the rest."""
    return int(seed) ^ (int(index) << 48)


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt's share of a :meth:`Model.generate_many` call: ``n`` images of ``prompt``.

    Image j uses seed ``seed + j``. A sampling setting left ``None`` is the bundle's default
    (:class:`SamplingConfig`); requests whose settings come out the same are drawn together.
    """

    prompt: str
    n: int = 1
    seed: int = 0
    cfg_scale: float | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    candidates: int | None = None
    object_temperature: float | None = None
    object_cfg_scale: float | None = None
    object_min_p: float | None = None


# ---------------------------------------------------------------------------------------------
# Bundles
# ---------------------------------------------------------------------------------------------
def write_bundle(out_dir: str | Path, *, lm_dir: str | Path, image_tokenizer_dir: str | Path,
                 text_tokenizer: str | Path, sampling: SamplingConfig | None = None,
                 image_prep: ImagePrep | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Assemble a bundle from the trained parts (copied; written to a temp dir, then swapped in).

    ``image_prep``: how the training images were made square (``IngestConfig.image_prep()``);
    recorded so that every user of the bundle prepares images the same way. Without it the
    bundle's readers assume ingest's defaults.
    """
    from visgen.text.tokenizer import TextTokenizer  # tokenizers: only writing or loading a bundle reads it

    out = Path(out_dir)
    lm_meta = json.loads((Path(lm_dir) / LM_JSON).read_text(encoding="utf-8"))
    vq_meta = json.loads((Path(image_tokenizer_dir) / VQ_JSON).read_text(encoding="utf-8"))
    tok = TextTokenizer.load(text_tokenizer)
    vq_resolution = vq_meta["config"].get("resolution")
    if image_prep is not None and image_prep.resolution != vq_resolution:
        raise ValueError(f"image_prep.resolution={image_prep.resolution} but the image tokenizer in {image_tokenizer_dir} "
                         f"was trained at {vq_resolution}: pass the ingest settings it was trained with")
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for src, name in ((Path(lm_dir) / LM_WEIGHTS, LM_WEIGHTS), (Path(lm_dir) / LM_JSON, LM_JSON),
                      (Path(image_tokenizer_dir) / VQ_WEIGHTS, VQ_WEIGHTS),
                      (Path(image_tokenizer_dir) / VQ_JSON, VQ_JSON)):
        shutil.copy2(src, tmp / name)
    tok.save(tmp / TEXT_TOKENIZER_FILE)
    manifest = {
        "format": BUNDLE_FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "visgen_version": __version__,
        "torch_version": torch.__version__,
        "lm": {"fingerprint": lm_meta["fingerprint"], "config": lm_meta["config"], "params": lm_meta.get("params")},
        "image_tokenizer": {"fingerprint": vq_meta["fingerprint"], "config": vq_meta["config"]},
        "text_tokenizer": {"fingerprint": tok.fingerprint(), "vocab_size": tok.vocab_size},
        "sampling": (sampling or SamplingConfig()).model_dump(mode="json"),
        **({"image_prep": image_prep.model_dump(mode="json")} if image_prep is not None else {}),
        **(extra or {}),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def background_record(cache_dir: str | Path, image_fingerprint: str | None = None) -> dict:
    """``{"code", "share"}``: the token cache's most common training code and its share of the cells
    (the bundle's ``background_code``; ``sampling.object_temperature`` uses it as the background
    when the share is at least ``BACKGROUND_MIN_SHARE``)."""
    from visgen.data.token_cache import dominant_code  # pyarrow: only writing a bundle reads it

    code, share = dominant_code(cache_dir, expect_fingerprint=image_fingerprint)
    return {"code": code, "share": round(share, 4)}


def background_of(record: dict | None) -> int | None:
    """The background code of a ``background_record`` (a bundle's ``background_code``): its code when
    it covers at least ``BACKGROUND_MIN_SHARE`` of the cells, else None."""
    return int(record["code"]) if record and record.get("share", 0) >= BACKGROUND_MIN_SHARE else None


def check_background(object_temperature: float | None, record: dict | None, where: str) -> int | None:
    """The background code ``object_temperature`` draws apart from (None when it is off); a
    ValueError naming the share when the data has none."""
    code = background_of(record)
    if object_temperature is None or code is not None:
        return code
    most = f"the most common, code {record['code']}, covers {record['share']:.1%}" if record else "none recorded"
    raise ValueError(f"sampling.object_temperature={object_temperature} needs a background code, one image "
                     f"code covering at least {BACKGROUND_MIN_SHARE:.0%} of the cells of {where} ({most}): set "
                     "sampling.object_temperature to null for this data")


def read_manifest(bundle_dir: str | Path) -> dict:
    path = Path(bundle_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: {bundle_dir} is not a visgen bundle "
                                f"(expected {MANIFEST}, lm.safetensors, image_tokenizer.safetensors, {TEXT_TOKENIZER_FILE})")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from None
    if manifest.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r} is not {BUNDLE_FORMAT!r}")
    return manifest


def write_bundle_eval(bundle_dir: str | Path, results: dict) -> Path:
    """Store evaluation results in the bundle (``eval.json``) and their headline numbers in the manifest."""
    d = Path(bundle_dir)
    manifest = read_manifest(d)
    (d / EVAL_FILE).write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    manifest["eval"] = {k: v for k, v in results.items() if isinstance(v, (int, float, str))}
    (d / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return d / EVAL_FILE


OBJECT_STORE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs")  # read with pyarrow (visgen.storage)


def resolve_bundle(source: str | Path, tracking_uri: str | None = None) -> Path:
    """A local bundle directory for ``source``: a path; an object store URL (``s3://bucket/run/models/bundle``,
    ``gs://...``), copied to this node's cache (:func:`visgen.storage.local_copy`: downloaded once,
    again only when it changed); or an MLflow URI (``models:/visgen@champion``, ``runs:/<id>/bundle``)
    downloaded to a temporary directory. ``tracking_uri`` names the store (default:
    ``$MLFLOW_TRACKING_URI`` / the process's current one)."""
    s = str(source)
    if "://" not in s and not s.startswith(("models:/", "runs:/")):
        p = Path(s).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"bundle {s!r} does not exist (a bundle directory or an MLflow URI like models:/visgen@champion)")
        return p
    if s.split("://", 1)[0].lower() in OBJECT_STORE_SCHEMES:
        local = storage.local_copy(s)
        if not (local / MANIFEST).is_file():
            raise FileNotFoundError(f"{s} holds no {MANIFEST}: not a model bundle (the pipeline writes one to "
                                    "<workdir>/models/bundle)")
        return local
    dst = tempfile.mkdtemp(prefix="visgen-bundle-")
    local = download_artifacts(s, dst, tracking_uri=tracking_uri)
    if not (local / MANIFEST).is_file():  # a model version whose artifacts hold the bundle one level down
        found = [p.parent for p in local.rglob(MANIFEST)]
        if len(found) != 1:
            raise FileNotFoundError(f"{s} has no single {MANIFEST} in its artifacts (found {len(found)})")
        local = found[0]
    return local


# ---------------------------------------------------------------------------------------------
# The model object
# ---------------------------------------------------------------------------------------------
def _device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Model:
    """Text → image, image → text and editing with one loaded bundle (models in eval mode)."""

    def __init__(self, lm, image_tokenizer, text_tokenizer, manifest: dict | None = None,
                 sampling: SamplingConfig | None = None, source: str | None = None):
        self.lm, self.vq, self.tokenizer = lm, image_tokenizer, text_tokenizer
        self.manifest = manifest or {}
        self.sampling = sampling or SamplingConfig()
        self.source = source
        self._check_parts()
        if self.sampling.object_temperature is not None:
            self._background(self.sampling.object_temperature)  # refused at load, not at every request
        # How images become the model's square: as the training images were made (ingest's defaults
        # for a bundle that predates the record).
        self.image_prep = ImagePrep.from_manifest(self.manifest, self.resolution)

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def load(cls, source: str | Path, device: str | torch.device = "auto", tracking_uri: str | None = None) -> "Model":
        """From a bundle directory or an MLflow URI (``models:/visgen@champion``, ``runs:/<id>/bundle``)."""
        from visgen.text.tokenizer import TextTokenizer  # tokenizers: only writing or loading a bundle reads it

        d = resolve_bundle(source, tracking_uri)
        manifest = read_manifest(d)
        dev = _device(device)
        lm, vq = load_gpt(d, device=dev), load_vq(d, device=dev)
        tok = TextTokenizer.load(d / TEXT_TOKENIZER_FILE)
        for part, fp in (("lm", lm.fingerprint()), ("image_tokenizer", vq.fingerprint()),
                         ("text_tokenizer", tok.fingerprint())):
            want = manifest.get(part, {}).get("fingerprint")
            if want and want != fp:
                raise ValueError(f"{d}: {part} fingerprint {fp[:12]} differs from the manifest's {want[:12]}: "
                                 "the bundle's files are from different models")
        sampling = SamplingConfig.model_validate(manifest.get("sampling") or {})
        return cls(lm, vq, tok, manifest=manifest, sampling=sampling, source=str(source))

    @property
    def background_code(self) -> int | None:
        """The code of most training cells (the manifest's ``background_code``, taken from the token
        cache) when it covers at least ``BACKGROUND_MIN_SHARE`` of them, else None."""
        return background_of(self.manifest.get("background_code"))

    def _check_parts(self) -> None:
        cfg = self.lm.cfg
        check_fits(cfg, codebook_size=self.vq.num_codes, grid=self.vq.grid_shape, text_vocab_size=self.tokenizer.vocab_size)

    @property
    def device(self) -> torch.device:
        return self.lm.head.weight.device

    @property
    def resolution(self) -> int:
        return self.vq.cfg.resolution

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.lm.cfg.grid)

    def info(self) -> dict:
        m = self.manifest
        return {"source": self.source, "resolution": self.resolution, "grid": list(self.grid),
                "lm_params": self.lm.num_params(), "lm_fingerprint": m.get("lm", {}).get("fingerprint"),
                "image_tokenizer_fingerprint": m.get("image_tokenizer", {}).get("fingerprint"),
                "created": m.get("created"), "eval": m.get("eval", {}), "sampling": self.sampling.model_dump(),
                "image_prep": self.image_prep.model_dump(mode="json")}

    # -- building blocks -------------------------------------------------------------------------
    def text_regions(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts → (B, S) text regions (cut to max_text_tokens; any language the tokenizer reads)."""
        lay = self.lm.layout
        ids = self.tokenizer.encode_batch([_check_text(p) for p in prompts], max_length=lay.text_slots - 1)
        return torch.tensor([lay.text_region(i) for i in ids], dtype=torch.long, device=self.device)

    def prepare_images(self, images: Sequence[Any]) -> np.ndarray:
        """Images → (B, R, R, 3) uint8, made as ingest made the training images (``self.image_prep``).

        Each image: a file path, the file's bytes (any format PIL reads), a PIL image, or a uint8
        array (H, W), (H, W, 3) or (H, W, 4). An (R, R, 3) array is taken as it is.
        """
        return np.stack([_prepare(im, self.image_prep) for im in images])

    def encode_images(self, images: Sequence[Any]) -> torch.Tensor:
        """Images (see :meth:`prepare_images`) → codes (B, N)."""
        arr = self.prepare_images(images)  # (B, R, R, 3)
        with torch.no_grad():
            ids = self.vq.encode(to_model_input(arr).to(self.device))  # (B, h, w)
        return ids.flatten(1)

    def decode_codes(self, codes: torch.Tensor) -> list[np.ndarray]:
        h, w = self.grid
        with torch.no_grad():
            return list(to_uint8(self.vq.decode(codes.view(-1, h, w).to(self.device))))

    def resolve_sampling(self, cfg_scale: float | None = None, temperature: float | None = None,
                         top_k: int | None = None, top_p: float | None = None,
                         object_temperature: float | None = None, object_cfg_scale: float | None = None,
                         object_min_p: float | None = None) -> dict:
        """The keyword arguments of :meth:`VisGPT.generate_images` for one request: each setting
        left None is the bundle's, each given one is checked against the spec's limits; with
        ``object_temperature`` (the request's or the bundle's) the bundle's background code too.
        A ValueError names what is refused."""
        s = self.sampling
        out = dict(cfg_scale=s.cfg_scale if cfg_scale is None else float(cfg_scale),
                   temperature=s.temperature if temperature is None else float(temperature),
                   top_k=s.top_k if top_k is None else int(top_k),
                   top_p=s.top_p if top_p is None else float(top_p))
        obj = s.object_temperature if object_temperature is None else float(object_temperature)
        obj_cfg = s.object_cfg_scale if object_cfg_scale is None else float(object_cfg_scale)
        min_p = s.object_min_p if object_min_p is None else float(object_min_p)
        SamplingConfig(**out, object_temperature=obj, object_cfg_scale=obj_cfg,
                       object_min_p=min_p)  # the spec's limits and messages
        if obj is not None:
            out.update(object_temperature=obj, background=self._background(obj), object_cfg_scale=obj_cfg)
            if min_p:
                out["object_min_p"] = min_p
        return out

    def _background(self, object_temperature: float) -> int:
        """The background code ``object_temperature`` needs, or a ValueError naming the bundle."""
        bg = check_background(object_temperature, self.manifest.get("background_code"),
                              f"the token cache of {self.source or 'this bundle'}")
        if not 0 <= bg < self.vq.num_codes:
            raise ValueError(f"{self.source or 'this bundle'}: background_code {bg} is not a code of its "
                             f"{self.vq.num_codes}-code image tokenizer")
        return bg

    def _candidates(self, value: Any, field: str, where: str = "") -> int:
        """``value`` or, when None, the bundle's ``sampling.<field>`` (candidates / caption_candidates),
        checked to be an integer within the spec's limits (``where`` prefixes the message)."""
        k = getattr(self.sampling, field) if value is None else value
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
            raise TypeError(f"{where}candidates must be an integer, got {type(k).__name__} {k!r}")
        SamplingConfig(**{field: int(k)})  # same limits as the spec, with the same messages
        return int(k)

    def draw_codes(self, prompts: Sequence[str], seeds: Sequence[int], *, candidates: int = 1, **sampling) -> torch.Tensor:
        """One image's codes (B, N) per prompt and seed; with ``candidates`` > 1 the best of that many
        draws (seeds :func:`candidate_seed`) by :meth:`prompt_nll`. ``sampling``: cfg_scale,
        temperature, top_k, top_p, as :meth:`VisGPT.generate_images` takes them."""
        text = self.text_regions(prompts)  # (B, S)
        k = candidates
        seed_t = torch.tensor([candidate_seed(s, c) for s in seeds for c in range(k)], dtype=torch.long,
                              device=self.device)
        with torch.no_grad():
            codes = self.lm.generate_images(text.repeat_interleave(k, 0), seed_t, **sampling)  # (B k, N)
        if k == 1:
            return codes
        nll = self.prompt_nll([p for p in prompts for _ in range(k)], codes).view(len(prompts), k)
        return codes.view(len(prompts), k, -1)[torch.arange(len(prompts)), nll.argmin(1)]

    def prompt_nll(self, prompts: Sequence[str], codes: torch.Tensor) -> torch.Tensor:
        """-log p(prompt | image) (B,) of each prompt as the caption of codes (B, N), by the model's
        image → text direction, the caption language being the prompt's (as in training)."""
        lay = self.lm.layout
        ids = self.tokenizer.encode_batch([_check_text(p) for p in prompts], max_length=lay.text_slots - 2)
        text = torch.tensor([lay.text_region(i, detect_language(p)) for i, p in zip(ids, prompts)],
                            dtype=torch.long, device=self.device)
        return self.lm.sequence_nll(lay.i2t(codes.to(self.device), text), 0)[0]

    def image_nll(self, captions: Sequence[Sequence[int]], codes: torch.Tensor) -> torch.Tensor:
        """-log p(image | caption) (B,) of codes (B, N) under captions given as text ids, by the
        model's text → image direction."""
        lay = self.lm.layout
        text = torch.tensor([lay.text_region(c) for c in captions], dtype=torch.long, device=self.device)
        return self.lm.sequence_nll(lay.t2i(text, codes.to(self.device)), codes.shape[0])[0]

    # -- the three tasks -------------------------------------------------------------------------
    def generate(self, prompts: str | Sequence[str], *, n: int = 1, seed: int = 0, cfg_scale: float | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 candidates: int | None = None, object_temperature: float | None = None,
                 object_cfg_scale: float | None = None, object_min_p: float | None = None,
                 batch_size: int = 64) -> list[np.ndarray]:
        """``n`` images per prompt, prompt-major: (H, W, 3) uint8 arrays. Image j of prompt i uses
        seed ``seed + i * n + j``, so a seed reproduces its images whatever the batch. ``candidates``:
        each image is the best of that many draws by the model's own caption likelihood of the
        prompt (default: the bundle's ``sampling.candidates``). ``object_temperature``,
        ``object_cfg_scale``, ``object_min_p``: see :class:`SamplingConfig` (default: the bundle's)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        requests = [GenerationRequest(p, n=n, seed=int(seed) + i * n, cfg_scale=cfg_scale, temperature=temperature,
                                      top_k=top_k, top_p=top_p, candidates=candidates,
                                      object_temperature=object_temperature, object_cfg_scale=object_cfg_scale,
                                      object_min_p=object_min_p)
                    for i, p in enumerate(prompts)]
        return [im for images in self.generate_many(requests, batch_size=batch_size) for im in images]

    def generate_many(self, requests: Sequence[GenerationRequest], *,
                      batch_size: int | None = 64) -> list[list[np.ndarray]]:
        """The images of each request, in request order: ``n`` (H, W, 3) uint8 arrays per request.

        Requests may differ in prompt, count, seed and sampling settings: those whose settings
        (after the bundle's defaults) agree are drawn together, ``batch_size`` images per forward
        (``None``: each such group in one forward). Image j of a request uses seed ``seed + j``
        whatever it is batched with, so a request's images do not depend on the others. Every
        request is checked before anything is drawn: one bad request refuses the call.
        """
        requests = list(requests)
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None (one forward per group), got {batch_size}")
        groups: dict[tuple, list[int]] = {}  # resolved sampling settings -> request indices
        for i, req in enumerate(requests):
            if not isinstance(req, GenerationRequest):
                raise TypeError(f"request {i} is a {type(req).__name__}, not a visgen.inference.GenerationRequest")
            for name in ("n", "seed"):
                value = getattr(req, name)
                if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                    raise TypeError(f"request {i}: {name} must be an integer, got {type(value).__name__} {value!r}")
            if req.n < 1:
                raise ValueError(f"request {i}: n must be >= 1, got {req.n}")
            _check_text(req.prompt)
            kw = {**self.resolve_sampling(req.cfg_scale, req.temperature, req.top_k, req.top_p,
                                          req.object_temperature, req.object_cfg_scale, req.object_min_p),
                  "candidates": self._candidates(req.candidates, "candidates", f"request {i}: ")}
            groups.setdefault(tuple(sorted(kw.items())), []).append(i)
        out: list[list[np.ndarray]] = [[] for _ in requests]
        for key, idx in groups.items():
            # One row per image, request-major: (prompt, seed, which request it answers).
            rows = [(requests[i].prompt, int(requests[i].seed) + j, i) for i in idx for j in range(requests[i].n)]
            step = batch_size or len(rows)
            for at in range(0, len(rows), step):
                chunk = rows[at:at + step]
                codes = self.draw_codes([prompt for prompt, _, _ in chunk], [seed for _, seed, _ in chunk],
                                        **dict(key))  # (B, N)
                for (_, _, i), image in zip(chunk, self.decode_codes(codes)):
                    out[i].append(image)
        return out

    def caption(self, images: Any | Sequence[Any], *, language: str | Sequence[str] = "auto",
                seed: int | Sequence[int] = 0, temperature: float | None = None, top_k: int = 0, top_p: float = 1.0,
                candidates: int | Sequence[int | None] | None = None, batch_size: int | None = 64) -> list[str]:
        """One caption per image (greedy by default), ``batch_size`` images per forward (``None``: all in one).

        ``language``: "auto" (the model chooses), "en" or "zh" — one for all images or one per
        image. A requested language is put in the caption's language slot and the other script is
        blocked: an "en" caption holds ASCII only, a "zh" caption no Latin letter.
        ``seed``: image i uses ``seed + i``; or one seed per image (a batch of independent requests).
        ``candidates`` (default: the bundle's ``sampling.caption_candidates``): write that many
        captions per image, the first at ``temperature`` and the rest at
        ``sampling.caption_candidate_temperature``, and return the one under which the model finds
        the image likeliest (:meth:`image_nll`). One count for all images, or one per image (None:
        the default); images with the same count are captioned together.
        """
        images = [images] if _is_single_image(images) else list(images)
        langs = caption_languages(language, len(images))
        if isinstance(seed, (int, np.integer)):
            seeds = [int(seed) + i for i in range(len(images))]
        else:
            seeds = [int(s) for s in seed]
            if len(seeds) != len(images):
                raise ValueError(f"seed: {len(seeds)} seeds for {len(images)} images (give one, or one per image)")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None (all in one forward), got {batch_size}")
        temp = self.sampling.caption_temperature if temperature is None else float(temperature)
        SamplingConfig(caption_temperature=temp, top_k=top_k, top_p=top_p)
        if isinstance(candidates, (list, tuple)):
            if len(candidates) != len(images):
                raise ValueError(f"candidates: {len(candidates)} counts for {len(images)} images "
                                 "(give one, or one per image)")
            ks = [self._candidates(c, "caption_candidates", f"image {i}: ") for i, c in enumerate(candidates)]
        else:
            ks = [self._candidates(candidates, "caption_candidates")] * len(images)
        groups: dict[int, list[int]] = {}  # candidate count -> image indices
        for i, k in enumerate(ks):
            groups.setdefault(k, []).append(i)
        step = batch_size or max(1, len(images))
        out: list[str] = [""] * len(images)
        for k, idx in groups.items():
            for at in range(0, len(idx), step):
                chunk = idx[at:at + step]
                codes = self.encode_images([images[i] for i in chunk])  # (B, N)
                texts = self._best_captions(codes, [seeds[i] for i in chunk], [langs[i] for i in chunk], k,
                                            temperature=temp, top_k=top_k, top_p=top_p)
                for i, text in zip(chunk, texts):
                    out[i] = text
        return out

    def _best_captions(self, codes: torch.Tensor, seeds: Sequence[int], langs: Sequence[str], k: int, *,
                       temperature: float, top_k: int, top_p: float) -> list[str]:
        """Captions of codes (B, N): candidate 0 at ``temperature``, candidates 1.. k-1 at the
        bundle's ``caption_candidate_temperature``; per image the one with the lowest :meth:`image_nll`."""
        b, dev = codes.shape[0], self.device

        def write(rows: torch.Tensor, seeds_: list[int], langs_: list[str], temp: float) -> list[list[int]]:
            seed_t = torch.tensor(seeds_, dtype=torch.long, device=dev)
            return caption_codes(self.lm, self.tokenizer, rows, seed_t, langs_, temperature=temp, top_k=top_k,
                                 top_p=top_p, decode=False)

        cands = [write(codes, [candidate_seed(s, 0) for s in seeds], list(langs), temperature)]
        if k > 1:  # the other candidates in one decode (candidate-major rows): each row's noise is its seed's
            rest = write(codes.repeat(k - 1, 1), [candidate_seed(s, c) for c in range(1, k) for s in seeds],
                         list(langs) * (k - 1), self.sampling.caption_candidate_temperature)
            cands += [rest[i * b:(i + 1) * b] for i in range(k - 1)]
            nll = self.image_nll([ids for cand in cands for ids in cand], codes.repeat(k, 1)).view(k, b)
            best = nll.argmin(0).tolist()
        else:
            best = [0] * b
        return [self.tokenizer.decode(cands[best[i]][i]) for i in range(b)]

    def edit(self, image: Any, prompt: str, *, keep_rows: int, seed: int = 0, cfg_scale: float | None = None,
             temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
             object_temperature: float | None = None, object_cfg_scale: float | None = None,
             object_min_p: float | None = None) -> np.ndarray:
        """Keep the token rows above ``keep_rows`` of ``image`` and redraw the rest to match ``prompt``
        (raster-order completion: only a suffix of rows can be regenerated)."""
        h, w = self.grid
        if not isinstance(keep_rows, int) or not 0 <= keep_rows <= h:
            raise ValueError(f"keep_rows must be an integer in [0, {h}] (token rows of the {h}x{w} grid), got {keep_rows!r}")
        kw = self.resolve_sampling(cfg_scale, temperature, top_k, top_p, object_temperature,
                                   object_cfg_scale, object_min_p)  # one completion of the kept rows, not reranked
        codes = self.encode_images([image])
        text = self.text_regions([prompt])
        out = self.lm.generate_images(text, torch.tensor([int(seed)], device=self.device),
                                      prefix=codes[:, : keep_rows * w], **kw)
        return self.decode_codes(out)[0]


def caption_codes(lm, tokenizer, codes: torch.Tensor, seeds: torch.Tensor, language: str | Sequence[str] = "auto",
                  *, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, decode: bool = True) -> list:
    """Captions of image codes (B, N) by ``lm`` in ``language`` (one, or one per row: "auto" / "en" /
    "zh"), decoded with ``tokenizer``: what :meth:`Model.caption`, the Serve replica and the
    training's quick eval share. A requested language is forced and its other script blocked.
    ``decode=False`` returns the text ids instead of the strings."""
    langs = caption_languages(language, codes.shape[0])
    blocked = None
    if any(lang != "auto" for lang in langs):
        tables = tokenizer.language_blocked(lm.cfg.text_vocab)
        none = np.zeros(lm.cfg.text_vocab, dtype=bool)
        blocked = torch.from_numpy(np.stack([tables.get(lang, none) for lang in langs]))
    ids = lm.generate_text(codes, seeds, language=langs, blocked=blocked, temperature=temperature, top_k=top_k,
                           top_p=top_p)
    return [tokenizer.decode(t) for t in ids] if decode else ids


def _check_text(p: Any) -> str:
    if not isinstance(p, str):
        raise TypeError(f"prompts must be strings, got {type(p).__name__}: {p!r}")
    return p


def _is_single_image(x: Any) -> bool:
    return isinstance(x, (str, Path, bytes, bytearray, memoryview)) or (isinstance(x, np.ndarray) and x.ndim == 3) \
        or hasattr(x, "convert")


def _prepare(image: Any, prep: ImagePrep) -> np.ndarray:
    """One image → (R, R, 3) uint8 under ``prep``; a clear error naming what could not be read."""
    where = None
    if isinstance(image, (str, Path)):
        where = str(image)
        try:
            image = Path(image).expanduser().read_bytes()
        except OSError as err:
            raise FileNotFoundError(f"cannot read image file {where!r}: {err.strerror or err}") from None
    try:
        if isinstance(image, (bytes, bytearray, memoryview)):
            # Local files: any format PIL reads (ingest and Serve accept JPEG / PNG / WebP only).
            return decode_image(bytes(image), prep, formats=None)
        return to_model_square(image, prep)
    except ImageError as err:
        what = where or (f"{len(image)} image bytes" if isinstance(image, (bytes, bytearray, memoryview)) else "image")
        raise ValueError(f"{what}: {err.detail}") from None
