"""Token cache: frozen VQ encoder on a Ray Data actor pool → parquet, reuse, refusal, rebuilds."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from visgen.config import SpecError, validate_section
from visgen.data import token_cache
from visgen.data.ingest import IngestConfig, process_samples, quarantine_table
from visgen.data.token_cache import (
    TokenCacheConfig,
    TokenCacheError,
    build_token_cache,
    cache_manifest,
    read_token_cache,
    read_token_rows,
    resolve_pool,
)
from visgen.data.webdataset_source import iter_tar_samples
from visgen.models.vq import VQModel, load_vq, save_vq, to_model_input, vq_config
from visgen.text.tokenizer import TextTokenizer, TextTokenizerConfig, train_text_tokenizer
from visgen.train.scaling import Capacity, InsufficientResourcesError, NodeShape

RES = 16
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange"]


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")  # lossless: the cache must see exactly these pixels
    return buf.getvalue()


def scene(rng: np.random.Generator) -> np.ndarray:
    """(16, 16, 3) uint8: a flat background with one rectangle of another colour."""
    im = np.empty((RES, RES, 3), np.uint8)
    im[:] = rng.integers(0, 256, 3)
    x, y = rng.integers(0, RES // 2, 2)
    w, h = rng.integers(3, RES // 2 + 1, 2)
    im[y:y + h, x:x + w] = rng.integers(0, 256, 3)
    return im


def write_shards(d: Path, n_shards: int, per_shard: int, seed: int = 0, bad: bool = True) -> dict[str, str]:
    """Shards ``00000.tar...``; returns the planted bad keys and the reason ingest must give each."""
    rng = np.random.default_rng(seed)
    d.mkdir(parents=True, exist_ok=True)
    planted = {}
    for s in range(n_shards):
        with wds.TarWriter(str(d / f"{s:05d}.tar")) as w:
            for i in range(per_shard):
                colour = COLOURS[(s * per_shard + i) % len(COLOURS)]
                w.write({"__key__": f"s{s}-{i:03d}", "png": png(scene(rng)), "txt": f"a {colour} box number {i}"})
            if bad and s == 0:
                w.write({"__key__": "bad-garbage", "png": b"not an image", "txt": "x"})
                w.write({"__key__": "bad-nocaption", "png": png(scene(rng))})
                planted |= {"bad-garbage": "image_decode_error", "bad-nocaption": "caption_missing"}
    return planted


def tiny_vq(directory: Path, seed: int) -> tuple[VQModel, str]:
    torch.manual_seed(seed)
    model = VQModel(vq_config("tiny")).eval()
    save_vq(model, directory)
    return model, model.fingerprint()


def expected_rows(shard_dir: Path, cfg: IngestConfig, tok: TextTokenizer, vq: VQModel) -> dict[str, dict]:
    """What the cache must hold, computed without Ray: the ingest's own per-sample path, then
    ``vq.encode`` one image at a time (so no batch composition is shared with the actors)."""
    rows = {}
    for shard in sorted(shard_dir.glob("*.tar")):
        with open(shard, "rb") as f:
            good, _ = process_samples(list(iter_tar_samples(f, str(shard))), cfg, tok)
        for i, key in enumerate(good.key):
            ids = vq.encode(to_model_input(good.image[i:i + 1]))  # (1, h, w)
            rows[key] = {"caption": good.caption[i], "text_ids": list(good.text_ids[i]),
                         "image_ids": ids.reshape(-1).tolist()}
    return rows


def file_state(d: Path) -> dict[str, int]:
    return {str(p.relative_to(d)): p.stat().st_mtime_ns for p in sorted(d.rglob("*")) if p.is_file()}


# A 2-CPU machine: one read task (1 CPU) and one encoder actor (1 CPU).
CACHE_CFG = TokenCacheConfig(batch_size=16, rows_per_file=1000)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("token_cache")
    planted = write_shards(root / "shards", n_shards=3, per_shard=10)
    tok = train_text_tokenizer([f"a {c} box number {i}" for c in COLOURS for i in range(10)] * 3,
                               TextTokenizerConfig(vocab_size=300, min_frequency=1))
    tok.save(root / "text_tokenizer.json")
    vq_a, fp_a = tiny_vq(root / "vq_a", seed=0)
    vq_b, fp_b = tiny_vq(root / "vq_b", seed=1)
    ingest = IngestConfig(source=str(root / "shards"), resolution=RES, min_size=8, batch_size=8,
                          holdout_shards=1, max_text_tokens=6)
    return dict(root=root, planted=planted, tok=tok, vq_a=vq_a, fp_a=fp_a, vq_b=vq_b, fp_b=fp_b, ingest=ingest)


@pytest.fixture(scope="module")
def built(ray_session, world):
    """The cache of the world's shards with tokenizer A, built once for the module."""
    root = world["root"]
    report = build_token_cache(world["ingest"], root / "text_tokenizer.json", root / "vq_a", root / "cache",
                               CACHE_CFG, root / "quarantine")
    return report


# -- config and pool sizing (no Ray) -------------------------------------------------------------

def test_config_ranges_and_cross_field_check():
    assert TokenCacheConfig().max_actors == "auto" and TokenCacheConfig().gpus_per_actor == "auto"
    with pytest.raises(SpecError, match="max_actors.*below min_actors=4"):
        validate_section(TokenCacheConfig, {"min_actors": 4, "max_actors": 2})
    for bad in ({"batch_size": 0}, {"gpus_per_actor": -1}, {"max_actors": 0}, {"max_actors": "many"},
                {"cpus_per_actor": 0}, {"precision": "fp16"}, {"rows_per_actor": 5}):
        with pytest.raises(SpecError):
            validate_section(TokenCacheConfig, bad)
    assert validate_section(TokenCacheConfig, {"gpus_per_actor": 0.5, "max_actors": 8}).gpus_per_actor == 0.5


def cap(cpus, gpus, count=1):
    return Capacity(nodes=(NodeShape(cpus, gpus, count),), source="live nodes")


def test_pool_sizing_from_the_cluster():
    cpu = resolve_pool(TokenCacheConfig(), cap(2, 0))  # this machine: one actor, one CPU left to the reads
    assert (cpu.min_actors, cpu.max_actors, cpu.cpus, cpu.gpus) == (1, 1, 1.0, 0.0)
    big = resolve_pool(TokenCacheConfig(cpus_per_actor=2), cap(16, 0, count=2))
    assert big.max_actors == 15 and not big.use_gpu  # (32 - 1) / 2
    gpu = resolve_pool(TokenCacheConfig(), cap(16, 8, count=2))
    assert (gpu.gpus, gpu.max_actors) == (1.0, 16) and "gpus_per_actor=auto -> 1" in gpu.notes[0]
    half = resolve_pool(TokenCacheConfig(gpus_per_actor=0.5, cpus_per_actor=0.5), cap(4, 1))
    assert half.max_actors == 2  # GPU-bound: 1 GPU / 0.5
    unbounded = resolve_pool(TokenCacheConfig(), cap(8, 1, count=float("inf")))
    assert unbounded.max_actors == 1024
    assert resolve_pool(TokenCacheConfig(max_actors=3), cap(2, 0)).max_actors == 3  # explicit is kept
    # shapes-tiny: half-CPU actors and reads; a read task that asks for more than data_cpus still gets room.
    assert resolve_pool(TokenCacheConfig(cpus_per_actor=0.5, data_cpus=0.5), cap(2, 0), read_cpus=0.5).max_actors == 3
    assert resolve_pool(TokenCacheConfig(cpus_per_actor=0.5, data_cpus=0.5), cap(2, 0), read_cpus=1).max_actors == 2
    with pytest.raises(InsufficientResourcesError, match="min_actors=2.*data_cpus=1.*room for 1"):
        resolve_pool(TokenCacheConfig(min_actors=2), cap(2, 0))
    with pytest.raises(InsufficientResourcesError, match="gpus_per_actor=1 does not fit on any node .the cluster has 2 CPU, 0 GPU"):
        resolve_pool(TokenCacheConfig(gpus_per_actor=1), cap(2, 0))
    with pytest.raises(InsufficientResourcesError, match="cpus_per_actor=4 does not fit"):
        resolve_pool(TokenCacheConfig(cpus_per_actor=4), cap(2, 0))
    with pytest.raises(InsufficientResourcesError, match="gpus_per_actor=2 does not fit on any node"):
        resolve_pool(TokenCacheConfig(gpus_per_actor=2), cap(8, 1, count=4))  # 4 GPUs, but one per node


def test_encoder_actor_in_process(world):
    """The actor's batch function without Ray: ids as vq.encode gives them, passthrough columns, empty blocks."""
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    images = np.stack([scene(np.random.default_rng(i)) for i in range(5)])  # (5, 16, 16, 3)
    batch = pa.table({"key": [f"k{i}" for i in range(5)], "shard": ["x.tar"] * 5,
                      "image": ArrowTensorArray.from_numpy(images), "caption": ["c"] * 5,
                      "text_ids": pa.array([[1, 2], [3], [], [4, 5, 6], [7]], pa.list_(pa.int32())),
                      "json": [""] * 5})
    enc = token_cache._ImageEncoder(str(world["root"] / "vq_a"), world["fp_a"], use_gpu=False, precision="fp32",
                                    threads=1)
    out = enc(batch)
    assert out.column_names == list(token_cache.COLUMNS)
    want = world["vq_a"].encode(to_model_input(images)).reshape(5, -1)  # (5, 64)
    assert out.column("image_ids").to_pylist() == want.tolist()
    assert out.column("text_ids").to_pylist() == [[1, 2], [3], [], [4, 5, 6], [7]]
    assert set(out.column("fingerprint").to_pylist()) == {world["fp_a"]}
    assert enc(batch.slice(0, 0)).num_rows == 0
    with pytest.raises(RuntimeError, match="changed while the token cache was being built"):
        token_cache._ImageEncoder(str(world["root"] / "vq_a"), world["fp_b"], use_gpu=False, precision="fp32", threads=1)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="torch sees no CUDA device"):
            token_cache._ImageEncoder(str(world["root"] / "vq_a"), world["fp_a"], use_gpu=True, precision="fp32",
                                      threads=1)


def test_change_descriptions_name_the_input():
    shards = ["/d/00000.tar", "/d/00001.tar"]
    ing = IngestConfig(source="/d", resolution=RES)
    old = token_cache._expected_inputs(ing, "t" * 16, "a" * 64, "fp32", shards)
    old["shards"] = [[p, 10, 1] for p in shards]
    new = json.loads(json.dumps(old))
    assert token_cache._describe_changes(old, new) == []
    new.update(image_fingerprint="b" * 64, precision="bf16")
    new["ingest"]["resolution"] = 32
    new["shards"] = [["/d/00000.tar", 10, 2], ["/d/00002.tar", 5, 1]]
    assert token_cache._describe_changes(old, new) == [
        f"image tokenizer fingerprint {'a' * 12} -> {'b' * 12}", "precision 'fp32' -> 'bf16'",
        "ingest.resolution 16 -> 32", "shards added: 00002.tar", "shards removed: 00001.tar",
        "shards modified (size/mtime): 00000.tar"]
    # Execution-only settings do not make a cache stale.
    faster = token_cache._expected_inputs(ing.model_copy(update={"batch_size": 512, "num_cpus": 0.5}),
                                          "t" * 16, "a" * 64, "fp32", [])
    assert faster["ingest"] == token_cache._expected_inputs(ing, "t" * 16, "a" * 64, "fp32", [])["ingest"]


def test_reading_a_missing_or_broken_cache_is_refused(tmp_path):
    with pytest.raises(TokenCacheError, match="does not exist.*visgen data token-cache --pipeline"):
        read_token_rows(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    with pytest.raises(TokenCacheError, match="no manifest.json"):
        cache_manifest(tmp_path / "half")
    (tmp_path / "half" / "manifest.json").write_text("{not json")
    with pytest.raises(TokenCacheError, match="unreadable manifest.json"):
        read_token_cache(tmp_path / "half")
    (tmp_path / "half" / "manifest.json").write_text(json.dumps({"format": "visgen.token_cache/0"}))
    with pytest.raises(TokenCacheError, match="format 'visgen.token_cache/0'"):
        cache_manifest(tmp_path / "half")


# -- building on Ray -----------------------------------------------------------------------------

def test_cache_holds_the_encoder_ids_text_ids_and_fingerprint(ray_session, world, built):
    root, ingest = world["root"], world["ingest"]
    expect = expected_rows(root / "shards", ingest, world["tok"], world["vq_a"])
    assert len(expect) == 30 and not set(world["planted"]) & set(expect)

    assert not built.reused and built.rows == {"train": 20, "holdout": 10}
    assert built.grid == (8, 8) and built.codebook_size == 64 and built.image_fingerprint == world["fp_a"]
    # Ray for the train split, the pyarrow reader (what evals use) for the held-out one.
    rows = {r["key"]: dict(r, split="train")
            for r in read_token_cache(root / "cache", "train", expect_fingerprint=world["fp_a"]).take_all()}
    holdout = read_token_rows(root / "cache", "holdout", 100, expect_fingerprint=world["fp_a"])
    assert len(rows) == 20 and len(holdout) == 10 and not {r["key"] for r in holdout} & set(rows)
    rows |= {r["key"]: dict(r, split="holdout") for r in holdout}
    assert set(rows) == set(expect)
    assert {k for k, r in rows.items() if r["split"] == "holdout"} == {f"s2-{i:03d}" for i in range(10)}
    for key, want in expect.items():
        got = rows[key]
        assert list(got["image_ids"]) == want["image_ids"], key
        assert list(got["text_ids"]) == want["text_ids"] and 0 < len(want["text_ids"]) <= 6, key
        assert got["caption"] == want["caption"] and got["fingerprint"] == world["fp_a"]
    assert len({tuple(r["image_ids"]) for r in rows.values()}) > 1  # not a constant encoder

    # Bad samples are quarantined with their reasons, not cached, and did not stop the build.
    q = {r["key"]: r["reason"] for r in quarantine_table(str(root / "quarantine")).to_pylist()}
    assert q == world["planted"]
    assert built.quarantined == {"caption_missing": 1, "image_decode_error": 1}

    # The parquet schema, and the manifest's record of every input.
    import pyarrow.parquet as pq

    files = sorted((root / "cache" / "train").glob("*.parquet"))
    schema = pq.read_schema(files[0])
    assert [(f.name, str(f.type)) for f in schema] == [
        ("key", "string"), ("caption", "string"), ("text_ids", "list<element: int32>"),
        ("image_ids", "list<element: int32>"), ("fingerprint", "string")]
    m = cache_manifest(root / "cache")
    assert m["image_fingerprint"] == world["fp_a"] and m["text_fingerprint"] == world["tok"].fingerprint()
    assert m["grid"] == [8, 8] and m["codebook_size"] == 64 and m["splits"] == {"train": 20, "holdout": 10}
    assert m["ingest"]["holdout_shards"] == 1 and [os.path.basename(s[0]) for s in m["shards"]] == \
        ["00000.tar", "00001.tar", "00002.tar"] and all(s[1] > 0 for s in m["shards"])
    assert m["seconds"] > 0 and m["format"] == token_cache.FORMAT

    few = read_token_rows(root / "cache", "train", 3)
    assert len(few) == 3 and few[0]["image_ids"].dtype == np.int32 and few[0]["image_ids"].shape == (64,)
    assert [r["image_ids"].tolist() for r in few] == [expect[r["key"]]["image_ids"] for r in few]
    # The most common code of the train split and its share of the cells (what a bundle records as its background)
    counts = np.bincount(np.concatenate([np.asarray(r["image_ids"]) for r in rows.values() if r["split"] == "train"]))
    assert token_cache.dominant_code(root / "cache", expect_fingerprint=world["fp_a"]) == \
        (int(counts.argmax()), pytest.approx(counts.max() / counts.sum()))
    assert token_cache.dominant_code(root / "cache", "holdout", rows=1)[1] > 0
    with pytest.raises(ValueError, match="rows=0"):
        token_cache.dominant_code(root / "cache", rows=0)
    text = built.format()
    assert "20 train + 10 holdout" in text and "images/s" in text and "no cache at" in text
    assert built.images_per_s > 0


def test_up_to_date_cache_is_reused_untouched(ray_session, world, built):
    root = world["root"]
    before = file_state(root / "cache")
    again = build_token_cache(world["ingest"], root / "text_tokenizer.json", root / "vq_a", root / "cache",
                              CACHE_CFG.model_copy(update={"batch_size": 4}), root / "quarantine")
    assert again.reused and again.rows == built.rows and again.changes == []
    assert file_state(root / "cache") == before
    assert "up to date" in again.format() and again.seconds < 5


def test_other_tokenizer_is_refused_and_a_crashed_rebuild_keeps_the_old_cache(ray_session, world, built, monkeypatch):
    root, fp_a, fp_b = world["root"], world["fp_a"], world["fp_b"]
    cache = root / "cache_b"
    shutil.copytree(root / "cache", cache)  # the module's cache stays as it is for the other tests
    with pytest.raises(TokenCacheError) as err:
        read_token_cache(cache, "train", expect_fingerprint=fp_b)
    msg = str(err.value)
    assert str(cache) in msg and fp_a[:12] in msg and fp_b[:12] in msg and "visgen data token-cache" in msg
    with pytest.raises(TokenCacheError, match=fp_b[:12]):
        read_token_rows(cache, "train", 1, expect_fingerprint=fp_b)

    # A build that dies while its rows stream through the encoder and the writer (the held-out
    # split's read fails mid-build) leaves the old cache complete, and no staging dir.
    before = file_state(cache)
    real = token_cache.build_dataset

    def dies_on_holdout(cfg, tok, q, split, **kw):
        ds = real(cfg, tok, q, split, **kw)
        if split != "holdout":
            return ds

        def node_lost(batch):
            raise RuntimeError("node lost")

        return ds.map_batches(node_lost, batch_format="pyarrow")

    monkeypatch.setattr(token_cache, "build_dataset", dies_on_holdout)
    from ray.exceptions import UserCodeException

    with pytest.raises(UserCodeException, match="node lost"):  # Ray Data's wrapping of the task's error
        build_token_cache(world["ingest"], root / "text_tokenizer.json", root / "vq_b", cache, CACHE_CFG,
                          root / "quarantine")
    assert file_state(cache) == before and cache_manifest(cache)["image_fingerprint"] == fp_a
    assert not [p.name for p in root.iterdir() if p.name.startswith(".cache_b.")]
    monkeypatch.setattr(token_cache, "build_dataset", real)

    report = build_token_cache(world["ingest"], root / "text_tokenizer.json", root / "vq_b", cache, CACHE_CFG,
                               root / "quarantine")
    assert not report.reused and report.image_fingerprint == fp_b
    assert report.changes == [f"image tokenizer fingerprint {fp_a[:12]} -> {fp_b[:12]}"]
    assert f"rebuilt because: image tokenizer fingerprint {fp_a[:12]} -> {fp_b[:12]}" in report.format()
    rows = read_token_rows(cache, "train", 100, expect_fingerprint=fp_b)
    assert len(rows) == 20 and {r["fingerprint"] for r in rows} == {fp_b}
    with pytest.raises(TokenCacheError, match=f"image tokenizer {fp_b[:12]}.*expects {fp_a[:12]}"):
        read_token_cache(cache, expect_fingerprint=fp_a)


def test_changed_shards_rebuild_and_train_only_cache(ray_session, world, tmp_path):
    root = world["root"]
    shards = tmp_path / "shards"
    write_shards(shards, n_shards=1, per_shard=6, seed=3, bad=False)
    ingest = IngestConfig(source=str(shards), resolution=RES, min_size=8, batch_size=8)  # no holdout
    args = (root / "text_tokenizer.json", root / "vq_a", tmp_path / "cache", CACHE_CFG, tmp_path / "q")
    first = build_token_cache(ingest, *args)
    assert first.rows == {"train": 6} and not (tmp_path / "cache" / "holdout").exists()
    with pytest.raises(TokenCacheError, match="split 'holdout' is not in it.*holdout_shards >= 1"):
        read_token_cache(tmp_path / "cache", "holdout")

    write_shards(shards, n_shards=2, per_shard=4, seed=4, bad=False)  # rewrites 00000.tar, adds 00001.tar
    second = build_token_cache(ingest, *args)
    assert not second.reused and second.rows == {"train": 8}
    assert second.changes == ["shards added: 00001.tar", "shards modified (size/mtime): 00000.tar"]
    keys = {r["key"] for r in read_token_rows(tmp_path / "cache", "train", 100)}
    assert keys == {f"s{s}-{i:03d}" for s in range(2) for i in range(4)}
    assert build_token_cache(ingest, *args).reused

    # A directory that is not a token cache is never replaced.
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "notes.txt").write_text("keep me")
    with pytest.raises(TokenCacheError, match="refusing to replace"):
        build_token_cache(ingest, *args[:2], tmp_path / "elsewhere", *args[3:])
    assert (tmp_path / "elsewhere" / "notes.txt").read_text() == "keep me"


def test_resolution_mismatch_is_refused_before_any_work(world, tmp_path):
    root = world["root"]
    ingest = world["ingest"].model_copy(update={"resolution": 32})
    with pytest.raises(TokenCacheError, match="resolution 16 but data.ingest.resolution is 32"):
        build_token_cache(ingest, root / "text_tokenizer.json", root / "vq_a", tmp_path / "c", CACHE_CFG, tmp_path / "q")
    with pytest.raises(FileNotFoundError, match="not a saved image tokenizer"):
        build_token_cache(world["ingest"], root / "text_tokenizer.json", tmp_path, tmp_path / "c", CACHE_CFG,
                          tmp_path / "q")
    assert not (tmp_path / "c").exists()


def test_loaded_vq_round_trip_matches(world):
    # The actor loads the saved weights: they must encode like the in-memory model the test compares with.
    x = to_model_input(np.stack([scene(np.random.default_rng(i)) for i in range(4)]))
    assert torch.equal(load_vq(world["root"] / "vq_a").encode(x), world["vq_a"].encode(x))
