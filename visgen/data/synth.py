"""Write the shapes data set as WebDataset shards in img2dataset's layout, in parallel with Ray.

Output directory::

    00000.tar            KEY.jpg, KEY.txt (caption), KEY.json (ground truth) per sample
    00000_stats.json     img2dataset-style per-shard summary (counts, duration, task / language mix)
    00001.tar ...
    _synth_manifest.json config, its hash and whether every shard is written

Keys are img2dataset's: the shard index then the sample index, each zero-padded
(``000010005`` = shard 1, sample 5). Every sample is a pure function of (seed, shard, index),
and tar members carry fixed mtimes and owners, so the same config writes byte-identical tars on
any machine with the same libjpeg. Shards are written to a temporary name and renamed, so a
killed run leaves only complete shards, and re-running the same config finishes the rest.

``write_shard`` is a plain function (unit-testable without Ray); ``synthesize`` runs it as one
Ray task per shard. ``make_scene`` / ``render_prompt_scene`` give the evaluation suite the very
scenes, captions and renders the shards hold.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import ray
from PIL import Image
from pydantic import Field, model_validator

from visgen import storage
from visgen.base import Section
from visgen.data import captions, shapes
from visgen.data.webdataset_source import write_tar_member

log = logging.getLogger("visgen.data.synth")

# The names of shapes.TASKS, spelled out so the config schema (and the CLI) lists them.
TaskName = Literal["single_object", "two_objects", "counting", "colors", "position", "color_attr"]
MANIFEST_NAME = "_synth_manifest.json"
_SUITE_TAG = 0x5EED_E7A1  # mixed into prompt_suite seeds, keeping them apart from shard samples


class SynthConfig(Section):
    """The procedural shapes data set: how many shards, what each sample looks like, and where it goes."""

    output: str = Field("data/shapes", description="Directory the shards are written to (created if missing).")
    num_shards: int = Field(4, ge=1, le=100_000, description="Number of tar shards to write.")
    samples_per_shard: int = Field(1000, ge=1, le=1_000_000, description="Samples in each shard.")
    resolution: int = Field(32, ge=8, le=1024, description="Image side in pixels (square images).")
    language: Literal["en", "zh", "mixed"] = Field(
        "en", description="Caption language; 'mixed' draws English or Chinese per sample.")
    zh_fraction: float = Field(0.5, ge=0.0, le=1.0,
                               description="With language='mixed': probability that a sample's caption is Chinese.")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="Base seed; every sample derives from (seed, shard, index).")
    jpeg_quality: int = Field(95, ge=1, le=100, description="JPEG quality (chroma kept at full resolution).")
    task_weights: dict[TaskName, Annotated[float, Field(ge=0.0)]] = Field(
        default_factory=lambda: {t: 1.0 for t in shapes.TASKS},
        description="Relative frequency of each GenEval task; tasks left out get weight 0.")
    extra_attribute_prob: float = Field(
        0.5, ge=0.0, le=1.0,
        description="Probability that a caption also states an attribute its task does not need (a size, a colour).")
    large_share: float = Field(
        0.5, ge=0.0, le=1.0,
        description="Probability that an object whose size the caption does not state is drawn large (else small). "
                    "Above 0.5 a prompt without a size is mostly drawn large, where shapes are legible: at 32 px a "
                    "small hexagon is a few pixels from a circle.")
    cpus_per_shard: float = Field(1.0, gt=0.0, le=64.0,
                                  description="Ray CPUs reserved by each shard-writing task (fractions allowed).")

    @model_validator(mode="after")
    def _some_task(self) -> SynthConfig:
        if sum(self.task_weights.values()) <= 0:
            raise ValueError(f"task_weights must give at least one task a positive weight, got {self.task_weights!r}")
        return self


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(num_shards=2, samples_per_shard=16, resolution=32),          # unit tests, CI
    "cpu-demo": dict(num_shards=10, samples_per_shard=1000, resolution=32),   # 10k samples in seconds on 2 cores
    "gpu-64": dict(num_shards=100, samples_per_shard=5000, resolution=64, language="mixed"),
}


def preset(name: str, **overrides: Any) -> SynthConfig:
    """A named :data:`PRESETS` config with ``overrides`` applied (validated)."""
    if name not in PRESETS:
        raise ValueError(f"unknown synth preset {name!r}; available: {', '.join(PRESETS)}")
    return SynthConfig.model_validate({**PRESETS[name], **overrides})


def config_hash(cfg: SynthConfig) -> str:
    """Hash of everything that decides the shards' bytes (not where they go or how they are scheduled)."""
    # large_share at its default leaves the hash of shard sets written before it existed as it was.
    exclude = {"output", "cpus_per_shard"} | ({"large_share"} if cfg.large_share == 0.5 else set())
    content = cfg.model_dump(mode="json", exclude=exclude)
    # Tasks left out weigh 0, and only the ratios matter: equal mixes hash equally.
    total = sum(cfg.task_weights.values())
    content["task_weights"] = [cfg.task_weights.get(t, 0.0) / total for t in shapes.TASKS]
    content["generator"] = shapes.GENERATOR_VERSION
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


# -- keys and names (img2dataset conventions) -----------------------------------------------------

def _digits(n: int, minimum: int) -> int:
    return max(minimum, len(str(max(n - 1, 0))))


def shard_name(cfg: SynthConfig, shard_index: int) -> str:
    """``00003`` for shard 3: at least five digits, more when there are over 100 000 shards."""
    return f"{shard_index:0{_digits(cfg.num_shards, 5)}d}"


def sample_key(cfg: SynthConfig, shard_index: int, sample_index: int) -> str:
    """``000010005`` for shard 1, sample 5: the shard name, then the sample index (at least four digits)."""
    return shard_name(cfg, shard_index) + f"{sample_index:0{_digits(cfg.samples_per_shard, 4)}d}"


# -- one sample -----------------------------------------------------------------------------------

def make_scene(task: str, seed: int, *, resolution: int = 32, language: str = "en", zh_fraction: float = 0.5,
               extra_attribute_prob: float = 0.0, scene_id: str | None = None, large_share: float = 0.5) -> shapes.Scene:
    """A captioned scene; the same arguments always give the same scene and caption.

    This is exactly how shard samples are made (the json's ``seed`` and ``task``, with the
    config's ``language`` / ``zh_fraction`` / ``extra_attribute_prob`` / ``large_share``, rebuild any sample), and
    how the evaluation suite should make its prompts: ``extra_attribute_prob=0`` gives
    GenEval-style prompts that state only what the task needs.
    """
    scene = shapes.sample_scene(task, seed, resolution=resolution, extra_attribute_prob=extra_attribute_prob,
                                scene_id=scene_id, large_share=large_share)
    # A separate stream for the wording, so the layout does not depend on the language.
    rng = np.random.default_rng([int(seed), 1])
    return captions.caption_scene(scene, language, rng, zh_fraction)


def render_prompt_scene(task: str, seed: int, *, resolution: int = 32, language: str = "en",
                        extra_attribute_prob: float = 0.0) -> tuple[shapes.Scene, np.ndarray]:
    """``make_scene`` plus its render: (scene, uint8 image (R, R, 3))."""
    scene = make_scene(task, seed, resolution=resolution, language=language, extra_attribute_prob=extra_attribute_prob)
    return scene, shapes.render(scene)


def prompt_suite(per_task: int, *, seed: int = 0, resolution: int = 32, language: str = "en",
                 tasks: tuple[str, ...] = shapes.TASKS) -> list[shapes.Scene]:
    """``per_task`` GenEval-style captioned scenes for each task, the same for the same arguments.

    Scene ``i`` of task ``t`` uses a seed derived from (seed, t's index in TASKS, i), so suites of
    different sizes share their first scenes. Prompts can repeat (there are only six
    single-object prompts); deduplicate on ``scene.prompt`` if needed.
    """
    unknown = [t for t in tasks if t not in shapes.TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown!r}; allowed: {', '.join(shapes.TASKS)}")
    out = []
    for task in tasks:
        t = shapes.TASKS.index(task)
        for i in range(per_task):
            # The trailing tag keeps these seeds apart from the shards' (seed, shard, index) streams.
            scene_seed = int(np.random.default_rng([seed, t, i, _SUITE_TAG]).integers(2**53))
            out.append(make_scene(task, scene_seed, resolution=resolution, language=language,
                                  scene_id=f"{task}-{seed}-{i}"))
    return out


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of a uint8 (H, W, 3) image. 4:4:4 chroma: at 32 px, 4:2:0 smears small objects' colours."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality, subsampling=0, optimize=False)
    return buf.getvalue()


def _sample(cfg: SynthConfig, shard_index: int, sample_index: int, task_p: np.ndarray) -> shapes.Scene:
    rng = np.random.default_rng([cfg.seed, shard_index, sample_index])
    task = shapes.TASKS[int(rng.choice(len(shapes.TASKS), p=task_p))]
    scene_seed = int(rng.integers(2**53))  # exact as a JSON number in any reader
    return make_scene(task, scene_seed, resolution=cfg.resolution, language=cfg.language,
                      zh_fraction=cfg.zh_fraction, extra_attribute_prob=cfg.extra_attribute_prob,
                      scene_id=sample_key(cfg, shard_index, sample_index), large_share=cfg.large_share)


def _task_probabilities(cfg: SynthConfig) -> np.ndarray:
    w = np.array([cfg.task_weights.get(t, 0.0) for t in shapes.TASKS], dtype=np.float64)
    return w / w.sum()


def sample_json(scene: shapes.Scene, key: str) -> dict[str, Any]:
    """The ``KEY.json`` record: img2dataset's fields (key, status, caption, width, height) plus the ground truth."""
    return {"key": key, "status": "success", "error_message": None, **scene.to_dict()}


# -- one shard ------------------------------------------------------------------------------------

@dataclass
class ShardStats:
    """What ``write_shard`` wrote."""

    shard: int
    path: str
    count: int
    seconds: float
    tasks: dict[str, int] = field(default_factory=dict)
    languages: dict[str, int] = field(default_factory=dict)



def write_shard(cfg: SynthConfig, shard_index: int) -> ShardStats:
    """Write shard ``shard_index`` of ``cfg`` (tar + stats json) into ``cfg.output``; a plain function.
    An object store output (``s3://...``) is written here first, then uploaded (tar, then stats)."""
    if not 0 <= shard_index < cfg.num_shards:
        raise ValueError(f"shard_index {shard_index} is outside [0, {cfg.num_shards}) for num_shards={cfg.num_shards}")
    if storage.is_url(cfg.output):
        with tempfile.TemporaryDirectory(prefix="visgen-synth-") as tmp_dir:
            local = write_shard(cfg.model_copy(update={"output": tmp_dir}), shard_index)
            name = shard_name(cfg, shard_index)
            for fname in (f"{name}.tar", f"{name}_stats.json"):
                storage.upload(Path(tmp_dir) / fname, storage.join(cfg.output, fname))
        return ShardStats(shard_index, storage.join(cfg.output, f"{name}.tar"), local.count, local.seconds,
                          local.tasks, local.languages)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    name = shard_name(cfg, shard_index)
    final, tmp = out / f"{name}.tar", out / f".{name}.tar.tmp"
    task_p = _task_probabilities(cfg)
    tasks: Counter[str] = Counter()
    languages: Counter[str] = Counter()
    start_wall, t0 = time.time(), time.perf_counter()
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(cfg.samples_per_shard):
            key = sample_key(cfg, shard_index, i)
            scene = _sample(cfg, shard_index, i, task_p)
            write_tar_member(tar, f"{key}.jpg", encode_jpeg(shapes.render(scene), cfg.jpeg_quality))
            write_tar_member(tar, f"{key}.txt", scene.caption.encode("utf-8"))
            write_tar_member(tar, f"{key}.json", json.dumps(sample_json(scene, key), ensure_ascii=False,
                                               separators=(",", ":")).encode("utf-8"))
            tasks[scene.task] += 1
            languages[scene.language] += 1
    os.replace(tmp, final)
    seconds = time.perf_counter() - t0
    n = cfg.samples_per_shard
    stats = {  # img2dataset's per-shard stats fields, plus the task and language mix
        "count": n, "successes": n, "failed_to_download": 0, "failed_to_resize": 0,
        "duration": seconds, "start_time": start_wall, "end_time": start_wall + seconds,
        "status_dict": {"success": n}, "config_hash": config_hash(cfg),
        "tasks": dict(sorted(tasks.items())), "languages": dict(sorted(languages.items())),
    }
    (out / f"{name}_stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    return ShardStats(shard_index, str(final), n, seconds, dict(tasks), dict(languages))


# -- the whole data set ---------------------------------------------------------------------------

class SynthOutputError(RuntimeError):
    """The output directory holds shards this config did not make."""


@dataclass
class SynthReport:
    """What ``synthesize`` did."""

    output: str
    shards: list[str]       # every shard of the data set, in order
    num_samples: int        # samples in the data set
    seconds: float          # wall time of this call
    written: int = 0        # shards written by this call (0 when skipped)
    written_samples: int = 0
    skipped: bool = False   # the output already held this exact data set
    message: str = ""

    @property
    def samples_per_second(self) -> float:
        """Generation speed of this call (samples written / wall seconds, Ray start-up excluded)."""
        return self.written_samples / self.seconds if self.seconds > 0 else 0.0

    def format(self) -> str:
        if self.skipped:
            return self.message
        return (f"{self.message}\n{len(self.shards)} shards, {self.num_samples} samples in {self.output} "
                f"({self.seconds:.1f} s, {self.samples_per_second:.0f} samples/s)")


def shard_paths(cfg: SynthConfig) -> list[str]:
    """The tar paths ``cfg`` names (written or not), in shard order."""
    return [storage.join(cfg.output, f"{shard_name(cfg, i)}.tar") if storage.is_url(cfg.output)
            else str(Path(cfg.output) / f"{shard_name(cfg, i)}.tar") for i in range(cfg.num_shards)]


_OWNED = re.compile(r"^(\d{5,}\.tar|\d{5,}_stats\.json|\.\d{5,}\.tar\.tmp|" + re.escape(MANIFEST_NAME) + ")$")


def _write_manifest(out: Path | str, cfg: SynthConfig, complete: bool) -> None:
    manifest = {"generator": shapes.GENERATOR_VERSION, "config_hash": config_hash(cfg),
                "config": cfg.model_dump(mode="json"), "complete": complete,
                "shards": [f"{shard_name(cfg, i)}.tar" for i in range(cfg.num_shards)],
                "num_samples": cfg.num_shards * cfg.samples_per_shard}
    storage.write_text(storage.join(str(out), MANIFEST_NAME), json.dumps(manifest, indent=2) + "\n")  # atomic


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if k not in ("output", "cpus_per_shard") and old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys) or "generator version"


def _prepare_output(cfg: SynthConfig, overwrite: bool) -> tuple[Path | str, SynthReport | None]:
    """Check what ``cfg.output`` holds; returns a report when there is nothing to do.

    Same config: skip when complete, else keep the finished shards (resume). Another config, or
    shard files without a manifest: refuse unless ``overwrite``, which deletes only files this
    module names (shards, stats, manifest) and never a ``.tar`` it did not write. ``cfg.output``
    may be an object store URL.
    """
    out = cfg.output if storage.is_url(cfg.output) else Path(cfg.output)
    if not storage.exists(out):
        return out, None
    if not storage.is_dir(out):
        raise SynthOutputError(f"output {str(out)!r} exists and is not a directory")
    names = storage.listdir(out)
    owned = [n for n in names if _OWNED.match(n)]
    foreign_tars = sorted(n for n in names if n.endswith(".tar") and not _OWNED.match(n))
    if foreign_tars:
        raise SynthOutputError(f"{out} holds .tar files the shapes generator does not write "
                               f"({', '.join(foreign_tars[:5])}); choose another output directory")
    try:
        manifest = json.loads(storage.read_text(storage.join(str(out), MANIFEST_NAME))) if MANIFEST_NAME in names else None
    except (OSError, ValueError):
        manifest = None
    if manifest is not None and manifest.get("config_hash") == config_hash(cfg) and not overwrite:
        paths = shard_paths(cfg)
        if manifest.get("complete") and all(storage.name(p) in names for p in paths):
            n = cfg.num_shards * cfg.samples_per_shard
            return out, SynthReport(str(out), paths, n, 0.0, skipped=True, message=(
                f"{out} already holds these {cfg.num_shards} shards ({n} samples, config "
                f"{config_hash(cfg)}); skipped. Pass overwrite=True to write them again."))
        return out, None  # same config, interrupted: keep the finished shards, write the rest
    if owned and not overwrite:
        if manifest is not None:
            what = ("shapes shards made from a different config "
                    f"({_differences(manifest.get('config', {}), cfg.model_dump(mode='json'))})")
        else:
            names = ", ".join(sorted(owned)[:5])
            what = f"shard files ({names}, ...) without a readable {MANIFEST_NAME}, so of unknown origin"
        raise SynthOutputError(f"{out} holds {what}; pass overwrite=True (CLI: --overwrite) to replace them, "
                               "or choose another output directory")
    for n in owned:
        storage.delete(storage.join(str(out), n))
    return out, None


def synthesize(cfg: SynthConfig, overwrite: bool = False) -> SynthReport:
    """Write the data set ``cfg`` describes, one Ray task per shard; skip it when already there.

    The caller starts Ray (``ray.init``). Raises :class:`SynthOutputError` when the output holds
    shards from another config, unless ``overwrite=True``.
    """
    if not ray.is_initialized():
        raise RuntimeError("synthesize needs a running Ray: call ray.init() (or visgen.runtime.init_ray()) first")
    t0 = time.perf_counter()
    out, done = _prepare_output(cfg, overwrite)
    if done is not None:
        log.info(done.message)
        return done
    if not storage.is_url(out):
        out.mkdir(parents=True, exist_ok=True)
    present = set(storage.listdir(out))
    todo = [i for i in range(cfg.num_shards) if f"{shard_name(cfg, i)}.tar" not in present]
    resumed = cfg.num_shards - len(todo)
    _write_manifest(out, cfg, complete=False)

    cluster_cpus = ray.cluster_resources().get("CPU", 0.0)
    if cfg.cpus_per_shard > cluster_cpus:
        raise ValueError(f"cpus_per_shard={cfg.cpus_per_shard} exceeds the {cluster_cpus:g} CPUs of the Ray cluster: "
                         "the shard tasks could never be scheduled; lower cpus_per_shard")
    write = ray.remote(num_cpus=cfg.cpus_per_shard, max_retries=2)(write_shard)
    pending = [write.remote(cfg, i) for i in todo]
    finished = 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        stats: ShardStats = ray.get(ready[0])
        finished += 1
        log.info("shard %s: %d samples in %.2f s (%d/%d)", stats.path, stats.count, stats.seconds, finished, len(todo))
    _write_manifest(out, cfg, complete=True)

    seconds = time.perf_counter() - t0
    msg = f"wrote {len(todo)} shards" + (f" (resumed: {resumed} were already complete)" if resumed else "")
    report = SynthReport(str(out), shard_paths(cfg), cfg.num_shards * cfg.samples_per_shard, seconds,
                         written=len(todo), written_samples=len(todo) * cfg.samples_per_shard, message=msg)
    log.info(report.format())
    return report
