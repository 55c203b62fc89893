"""Shard writer: img2dataset layout, byte determinism, webdataset compatibility, Ray synthesis."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
import typing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visgen.config import SpecError, validate_section
from visgen.data import captions, shapes
from visgen.data.synth import (MANIFEST_NAME, PRESETS, SynthConfig, TaskName, SynthOutputError, config_hash, make_scene,
                               preset, prompt_suite, render_prompt_scene, sample_key, shard_name, synthesize,
                               write_shard)


def _cfg(tmp_path: Path, name: str = "out", **kw) -> SynthConfig:
    base = dict(output=str(tmp_path / name), num_shards=2, samples_per_shard=24, resolution=32, language="mixed")
    return SynthConfig(**{**base, **kw})


def test_config_validation_names_field_and_value():
    with pytest.raises(SpecError, match=r"resolution: 4 is not allowed"):
        validate_section(SynthConfig, {"resolution": 4})
    with pytest.raises(SpecError, match=r"language: 'fr' is not allowed"):
        validate_section(SynthConfig, {"language": "fr"})
    with pytest.raises(SpecError, match=r"task_weights.dogs"):
        validate_section(SynthConfig, {"task_weights": {"dogs": 1.0}})
    with pytest.raises(SpecError, match=r"task_weights.counting: -1"):
        validate_section(SynthConfig, {"task_weights": {"counting": -1.0}})
    with pytest.raises(SpecError, match="at least one task a positive weight"):
        validate_section(SynthConfig, {"task_weights": {"counting": 0.0}})
    with pytest.raises(SpecError, match="unknown key"):
        validate_section(SynthConfig, {"num_shard": 3})
    assert typing.get_args(TaskName) == shapes.TASKS
    for name in PRESETS:
        assert isinstance(preset(name), SynthConfig)
    assert all(f.description for f in SynthConfig.model_fields.values())


def test_keys_follow_img2dataset():
    cfg = SynthConfig(num_shards=10, samples_per_shard=10_000)
    assert shard_name(cfg, 1) == "00001" and sample_key(cfg, 1, 5) == "000010005"
    big = SynthConfig(num_shards=200_000 // 2, samples_per_shard=100_001)
    assert sample_key(big, 7, 3) == "00007" + "000003"


def test_write_shard_is_byte_deterministic(tmp_path):
    a, b = write_shard(_cfg(tmp_path, "a"), 1), write_shard(_cfg(tmp_path, "b"), 1)
    assert Path(a.path).read_bytes() == Path(b.path).read_bytes()
    c = write_shard(_cfg(tmp_path, "c", seed=1), 1)
    assert Path(c.path).read_bytes() != Path(a.path).read_bytes()
    other_shard = write_shard(_cfg(tmp_path, "a"), 0)
    assert Path(other_shard.path).read_bytes() != Path(a.path).read_bytes()
    with tarfile.open(a.path) as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:3]] == ["000010000.jpg", "000010000.txt", "000010000.json"]
    assert len(members) == 3 * 24
    assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in members} == {(members[0].mtime, 0, 0, "", 0o644)}
    stats = json.loads((tmp_path / "a" / "00001_stats.json").read_text())
    assert stats["count"] == stats["successes"] == 24 and stats["status_dict"] == {"success": 24}
    assert sum(stats["tasks"].values()) == 24 and sum(stats["languages"].values()) == 24
    assert not list((tmp_path / "a").glob(".*tmp"))
    with pytest.raises(ValueError, match="shard_index 2"):
        write_shard(_cfg(tmp_path, "a"), 2)


def test_webdataset_reads_shards_and_ground_truth_matches_pixels(tmp_path):
    import webdataset as wds

    cfg = _cfg(tmp_path, samples_per_shard=60, language="mixed")
    paths = [write_shard(cfg, i).path for i in range(cfg.num_shards)]
    samples = list(wds.WebDataset(paths, shardshuffle=False))
    assert len(samples) == 120
    tasks, languages = set(), set()
    for s in samples:
        assert {"jpg", "txt", "json"} <= set(s)
        meta = json.loads(s["json"])
        caption = s["txt"].decode("utf-8")
        assert meta["key"] == s["__key__"] and meta["caption"] == caption and meta["status"] == "success"
        scene = shapes.Scene.from_json(meta)
        assert captions.parse_caption(caption) == scene.prompt      # caption states the prompt
        assert scene.prompt.holds_for(scene.objects)                # objects realise it (counts, relation)
        img = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB"))
        assert img.shape == (32, 32, 3) == (meta["height"], meta["width"], 3)
        for o in meta["objects"]:  # the pixel at each object's centre has the object's colour (through JPEG)
            cx, cy = o["center"]
            assert np.abs(img[int(cy), int(cx)].astype(int) - o["rgb"]).max() < 40, (s["__key__"], o)
            x0, y0, x1, y1 = o["bbox"]
            assert 0 <= x0 < x1 <= 32 and 0 <= y0 < y1 <= 32
        # Reproducible from the json alone (task, seed) plus the config's wording options.
        again = make_scene(meta["task"], meta["seed"], language=cfg.language, zh_fraction=cfg.zh_fraction,
                           extra_attribute_prob=cfg.extra_attribute_prob, scene_id=meta["scene_id"])
        assert again == scene.with_caption(caption, meta["language"])
        tasks.add(meta["task"])
        languages.add(meta["language"])
    assert tasks == set(shapes.TASKS) and languages == {"en", "zh"}


def test_task_weights_select_tasks(tmp_path):
    cfg = _cfg(tmp_path, num_shards=1, task_weights={"position": 1.0, "counting": 0.0}, language="zh")
    stats = write_shard(cfg, 0)
    assert stats.tasks == {"position": 24} and stats.languages == {"zh": 24}


def test_render_prompt_scene_is_deterministic():
    s1, img1 = render_prompt_scene("color_attr", 11, resolution=48, language="zh")
    s2, img2 = render_prompt_scene("color_attr", 11, resolution=48, language="zh")
    assert s1 == s2 and np.array_equal(img1, img2) and img1.shape == (48, 48, 3)
    assert s1.language == "zh" and captions.parse_caption(s1.caption) == s1.prompt
    assert all(o.color is not None and o.size is None for o in s1.prompt.objects)  # GenEval-style by default


def test_prompt_suite_is_stable_and_geneval_style():
    suite = prompt_suite(3, seed=5, language="en")
    assert len(suite) == 3 * len(shapes.TASKS) and suite == prompt_suite(3, seed=5, language="en")
    assert prompt_suite(2, seed=5, tasks=("counting",)) == [s for s in suite if s.task == "counting"][:2]
    assert prompt_suite(3, seed=6) != suite
    for scene in suite:
        assert shapes.infer_task(scene.prompt) == scene.task or scene.task == "counting"
        assert all(o.size is None for o in scene.prompt.objects)
    with pytest.raises(ValueError, match="'dogs'"):
        prompt_suite(1, tasks=("dogs",))


def test_equal_task_mixes_hash_equally():
    a = SynthConfig(task_weights={"counting": 2})
    b = SynthConfig(task_weights={t: (1.0 if t == "counting" else 0.0) for t in reversed(shapes.TASKS)})
    assert config_hash(a) == config_hash(b)
    assert SynthConfig(task_weights={"counting": 1, "colors": 1}) != a
    assert config_hash(a) != config_hash(SynthConfig()) == config_hash(SynthConfig(output="elsewhere"))


def test_large_share_changes_the_shards_hash_only_off_its_default():
    assert config_hash(SynthConfig(large_share=0.5)) == config_hash(SynthConfig())
    assert config_hash(SynthConfig(large_share=0.8)) != config_hash(SynthConfig())
    # The hash of shard sets written before the option existed (the default's content lacks it).
    content = SynthConfig().model_dump(mode="json", exclude={"output", "cpus_per_shard", "large_share"})
    content["task_weights"] = [1 / len(shapes.TASKS)] * len(shapes.TASKS)
    content["generator"] = shapes.GENERATOR_VERSION
    assert config_hash(SynthConfig()) == hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
    with pytest.raises(ValueError, match="large_share"):
        SynthConfig(large_share=1.2)


def test_synthesize_with_ray_skips_refuses_overwrites_and_resumes(ray_session, tmp_path):
    cfg = _cfg(tmp_path, samples_per_shard=8, cpus_per_shard=0.5)
    report = synthesize(cfg)
    assert report.written == 2 and not report.skipped and report.num_samples == 16
    assert [Path(p).name for p in report.shards] == ["00000.tar", "00001.tar"]
    direct = write_shard(cfg.model_copy(update={"output": str(tmp_path / "direct")}), 1)
    assert Path(report.shards[1]).read_bytes() == Path(direct.path).read_bytes()  # Ray or not: same bytes
    manifest = json.loads((Path(cfg.output) / MANIFEST_NAME).read_text())
    assert manifest["complete"] and manifest["num_samples"] == 16

    again = synthesize(cfg.model_copy(update={"cpus_per_shard": 1.0}))  # scheduling is not content
    assert again.skipped and again.written == 0 and "skipped" in again.message

    changed = cfg.model_copy(update={"resolution": 64})
    with pytest.raises(SynthOutputError, match=r"resolution: 32 -> 64.*overwrite=True"):
        synthesize(changed)
    (Path(cfg.output) / "notes.md").write_text("kept")
    report = synthesize(changed, overwrite=True)
    assert report.written == 2
    with tarfile.open(report.shards[0]) as tar:
        jpg = tar.extractfile(tar.getmembers()[0]).read()
    assert Image.open(io.BytesIO(jpg)).size == (64, 64)
    assert (Path(cfg.output) / "notes.md").read_text() == "kept"  # only our own files are replaced

    # An interrupted run (manifest incomplete, one shard missing) is finished, not redone.
    first = Path(report.shards[0])
    mtime = first.stat().st_mtime_ns
    Path(report.shards[1]).unlink()
    m = json.loads((Path(cfg.output) / MANIFEST_NAME).read_text())
    (Path(cfg.output) / MANIFEST_NAME).write_text(json.dumps({**m, "complete": False}))
    time.sleep(0.01)
    resumed = synthesize(changed)
    assert resumed.written == 1 and "resumed" in resumed.message and first.stat().st_mtime_ns == mtime
    assert synthesize(changed, overwrite=True).written == 2  # overwrite rewrites even an identical config


def test_synthesize_refuses_unknown_shards(ray_session, tmp_path):
    out = tmp_path / "foreign"
    out.mkdir()
    (out / "00000.tar").write_bytes(b"not ours")
    with pytest.raises(SynthOutputError, match="without a readable _synth_manifest.json"):
        synthesize(_cfg(tmp_path, "foreign"))
    (out / "laion-part.tar").write_bytes(b"not ours either")
    with pytest.raises(SynthOutputError, match="laion-part.tar"):
        synthesize(_cfg(tmp_path, "foreign"), overwrite=True)  # never deletes tars it did not write
    assert (out / "laion-part.tar").exists()
    with pytest.raises(ValueError, match="cpus_per_shard=64"):
        synthesize(_cfg(tmp_path, "fresh", cpus_per_shard=64))


@pytest.mark.slow
def test_generation_speed(tmp_path):
    """The CPU demo needs ~10k 32-px samples in well under a minute on 2 cores."""
    cfg = _cfg(tmp_path, num_shards=1, samples_per_shard=1000)
    t0 = time.process_time()
    write_shard(cfg, 0)
    per_cpu_second = 1000 / (time.process_time() - t0)
    print(f"shapes synth: {per_cpu_second:.0f} samples per CPU-second at 32 px")
    assert per_cpu_second > 300
