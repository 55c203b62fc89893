"""Object storage for real: a local S3 server (moto, ``tests/s3server.py``) holding the shards, the
workdir of a whole pipeline run, Ray Train checkpoints that a restarted worker group reads back,
and the bundle that ``Model.load`` and Serve's model loader read from the bucket."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from net import free_port
from visgen import storage
from visgen.config import Workdir, load_spec

ROOT = Path(__file__).resolve().parent.parent


def test_locations_and_workdir_of_a_url(tmp_path, monkeypatch):
    monkeypatch.setenv("VISGEN_CACHE_DIR", str(tmp_path / "cache"))
    assert storage.is_url("s3://b/k") and storage.is_url("gs://b") and not storage.is_url("/x/y")
    assert not storage.is_url("file:///x") and storage.location("file:///x/../y") == "/y"
    assert storage.location("S3://b/run/") == "s3://b/run" and storage.join("s3://b/run", "models/", "lm") == "s3://b/run/models/lm"
    with pytest.raises(storage.StorageError, match="names no bucket"):
        storage.location("s3://")
    wd = Workdir("s3://b/run")
    assert wd.remote and wd.root == storage.mirror_dir("s3://b/run") and wd.root.is_relative_to(tmp_path / "cache")
    assert (wd.quarantine, wd.token_cache, wd.ray_results) == ("s3://b/run/quarantine", "s3://b/run/token_cache",
                                                               "s3://b/run/ray_results")
    assert wd.shared(wd.models / "lm") == "s3://b/run/models/lm" and wd.shared(tmp_path) == str(tmp_path)
    local = Workdir(tmp_path)
    assert not local.remote and local.quarantine == str(tmp_path / "quarantine") and local.shared(tmp_path / "x") == str(tmp_path / "x")
    spec = load_spec(ROOT / "pipelines" / "shapes-tiny.yaml", {"workdir": "s3://b/run"})
    assert spec.workdir == "s3://b/run" and spec.data.ingest.source == "s3://b/run/shards"


def test_storage_round_trip_through_the_s3_api(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("VISGEN_CACHE_DIR", str(tmp_path / "cache"))
    bucket = s3.bucket()
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"a": 1}')
    (src / "sub" / "weights.bin").write_bytes(b"\0" * 1000)
    url = f"s3://{bucket}/run/models/thing"
    storage.upload(src, url)
    assert s3.keys(bucket, "run/models/thing/") == ["run/models/thing/config.json", "run/models/thing/sub/weights.bin"]
    assert [(rel, size) for rel, size, _ in storage.listing(url)] == [("config.json", 8), ("sub/weights.bin", 1000)]
    assert storage.is_dir(url) and storage.is_file(url + "/config.json") and storage.listdir(f"s3://{bucket}/run") == ["models"]

    copy = storage.local_copy(url)
    assert (copy / "sub" / "weights.bin").read_bytes() == b"\0" * 1000
    stamp = (copy / "config.json").stat().st_mtime_ns
    assert storage.local_copy(url) == copy and (copy / "config.json").stat().st_mtime_ns == stamp  # cached
    storage.write_text(url + "/config.json", '{"a": 22}')  # changed in the bucket: downloaded again
    assert json.loads((storage.local_copy(url) / "config.json").read_text()) == {"a": 22}

    # A replacing upload leaves no file of the older version behind.
    shutil.rmtree(src / "sub")
    storage.upload(src, url)
    assert s3.keys(bucket, "run/models/thing/") == ["run/models/thing/config.json"]
    storage.delete(url)
    assert not storage.exists(url) and s3.keys(bucket, "run/models/") == []

    # Errors name the object.
    with pytest.raises(FileNotFoundError, match=f"s3://{bucket}/run/nothing/here does not exist"):
        storage.local_copy(f"s3://{bucket}/run/nothing/here")
    with pytest.raises(FileNotFoundError, match="s3://no-such-bucket-visgen/x.json does not exist"):
        storage.read_text("s3://no-such-bucket-visgen/x.json")
    with pytest.raises(storage.StorageError, match="cannot write s3://no-such-bucket-visgen/x.json"):
        storage.write_text("s3://no-such-bucket-visgen/x.json", "{}")


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_pipeline_on_an_s3_workdir_trains_and_serves_from_the_bucket(s3, tmp_path):
    """The tiny pipeline with its workdir in a bucket and shards read through an s3:// brace range:
    every artifact lands in the bucket, the champion is served (over HTTP) from artifacts in the
    bucket, and a machine with an empty local mirror finds every stage up to date there."""
    bucket = s3.bucket()
    work = f"s3://{bucket}/run"
    env = {**os.environ, "VISGEN_CACHE_DIR": str(tmp_path / "cache-a"), "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    args = [sys.executable, "jobs/pipeline.py", "--pipeline", "pipelines/shapes-tiny.yaml", "--workdir", work,
            "--set", f"data.ingest.source={work}/shards/{{00000..00002}}.tar",
            "--set", "eval.sampling_search.enabled=false", "--set", f"serve.port={free_port()}"]
    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]

    keys = s3.keys(bucket, "run/")
    for prefix in ("run/shards/00002.tar", "run/text_tokenizer.json", "run/token_cache/manifest.json",
                   "run/ray_results/image_tokenizer/checkpoint_00000024/trainer.json",
                   "run/ray_results/lm/checkpoint_00000016/modules.safetensors", "run/models/image_tokenizer/",
                   "run/models/lm/", "run/models/bundle/manifest.json", "run/eval/lm.json",
                   "run/eval/image_tokenizer.json", "run/mlartifacts/", "run/summary.json", "run/mlflow.db"):
        assert any(k.startswith(prefix) for k in keys), (prefix, keys)
    manifest = json.loads(storage.read_text(f"{work}/token_cache/manifest.json"))
    assert any(k.startswith(f"run/token_cache/{manifest['build']}/train/") and k.endswith(".parquet") for k in keys)
    summary = json.loads(storage.read_text(f"{work}/summary.json"))
    assert summary["serve"]["version"] == "1" and summary["registry"]["promoted"]

    # The registered version's files are in the bucket: what Serve downloaded for the champion.
    from mlflow import MlflowClient

    mirror = tmp_path / "cache-a" / "workdirs"
    db = next(mirror.glob("*/mlflow.db"))
    source = MlflowClient(tracking_uri=f"sqlite:///{db}").get_model_version("visgen", "1").source
    assert source.startswith(f"s3://{bucket}/run/mlartifacts/"), source

    # Another machine: an empty local mirror. The bundle loads straight from the bucket (as a
    # Serve replica given serve.model_uri=s3://... does), and the stages find their work done.
    os.environ["VISGEN_CACHE_DIR"] = str(tmp_path / "cache-b")
    try:
        from visgen import stages
        from visgen.inference import Model
        from visgen.serve.model import load_model

        pipe = Model.load(f"{work}/models/bundle", device="cpu")
        assert isinstance(pipe.caption([np.asarray(Image.open(io.BytesIO(_png())))])[0], str)
        _, info = load_model(f"{work}/models/bundle", None, "cpu")
        assert info["name"] == "bundle" and info["version"].startswith("local-")
        spec = load_spec(ROOT / "pipelines" / "shapes-tiny.yaml",
                         {"workdir": work, "data.ingest.source": f"{work}/shards/{{00000..00002}}.tar",
                          "eval.sampling_search.enabled": False})
        assert stages.bundle(spec) == spec.paths.bundle  # pulled, and up to date: not rewritten
        assert storage.read_text(f"{work}/models/bundle/manifest.json") == (spec.paths.bundle / "manifest.json").read_text()
        assert stages.eval_lm(spec)["identity"] == json.loads(storage.read_text(f"{work}/eval/lm.json"))["identity"]
    finally:
        os.environ.pop("VISGEN_CACHE_DIR", None)


@pytest.mark.slow
def test_killed_worker_resumes_from_the_checkpoint_in_the_bucket(s3, ray_session, tmp_path, monkeypatch):
    """Two Ray Train workers checkpoint to the bucket (RunConfig.storage_path=s3://...); one dies
    after step 6, and the restarted group reads checkpoint 4 back from the bucket."""
    from visgen.models.vq import load_vq, vq_config
    from visgen.train.checkpoint import list_checkpoints
    from visgen.train.config import ScalingConfig, TrainConfig
    from visgen.train.image_tokenizer import train_image_tokenizer
    from visgen.train.loop import CrashAt

    monkeypatch.setenv("VISGEN_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    ds = ray_session.data.from_items([{"image": im} for im in images], override_num_blocks=2).materialize()
    bucket = s3.bucket()
    work = f"s3://{bucket}/run"
    marker = tmp_path / "crashed"
    tc = TrainConfig(steps=12, batch_size=16, lr=3e-3, warmup_steps=2, schedule="constant", log_every=2,
                     checkpoint_every=4, keep_checkpoints=2, eval_samples=8, seed=0, max_failures=1)
    res = train_image_tokenizer(vq_config("tiny"), tc, ScalingConfig(num_workers=2), ds, holdout=ds, workdir=work,
                                crash_at=CrashAt(step=6, rank=1, marker=str(marker)))
    assert marker.read_text().startswith("crashed rank 1 after step 6")
    assert res.fit.resumed_from == 4 and res.fit.step == 12
    assert res.fit.run_dir == f"{work}/ray_results/image_tokenizer"
    assert [s for s, _ in list_checkpoints(res.fit.run_dir)] == [8, 12]
    assert all(not k.startswith("run/ray_results/image_tokenizer/checkpoint_00000004/")
               for k in s3.keys(bucket, "run/ray_results/"))  # pruned in the bucket
    # Exported by rank 0 to the bucket, and pulled into the driver's local mirror.
    assert s3.keys(bucket, "run/models/image_tokenizer/")
    assert res.model_dir == Workdir(work).models / "image_tokenizer"
    load_vq(res.model_dir)


@pytest.mark.slow
def test_a_bucket_deleted_before_ingest_reads_it_is_named_not_waited_for(s3, ray_session, tmp_path):
    """The shard listing succeeded, then the bucket went away: ingest reports the unreadable shard
    by its s3:// name (quarantine) and ends, instead of hanging."""
    import webdataset as wds

    from visgen.data.ingest import IngestConfig, build_dataset, quarantine_table

    shard = tmp_path / "00000.tar"
    with wds.TarWriter(str(shard)) as w:
        for i in range(4):
            w.write({"__key__": f"k{i}", "png": _png(), "txt": b"a red square"})
    bucket = s3.bucket("vanishing")
    storage.upload(shard, f"s3://{bucket}/shards/00000.tar")
    cfg = IngestConfig(source=f"s3://{bucket}/shards/{{00000..00000}}.tar", resolution=32, min_size=16,
                       holdout_shards=0, batch_size=4, num_cpus=0.5)
    ds = build_dataset(cfg, None, str(tmp_path / "quarantine"))  # lists the shards now, reads them later
    s3.drop_bucket(bucket)
    assert ds.take_all() == []
    q = quarantine_table(str(tmp_path / "quarantine")).to_pylist()
    assert [(r["reason"], r["shard"]) for r in q] == [("shard_unreadable", f"s3://{bucket}/shards/00000.tar")], q
    assert "does not exist" in q[0]["detail"] and f"{bucket}/shards/00000.tar" in q[0]["detail"], q
