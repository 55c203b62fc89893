"""Training the VQ image tokenizer on Ray Train: local mode, 2 CPU workers, worker failure, resume, eval."""

from __future__ import annotations

import json

import numpy as np
import pytest

from visgen.models.vq import load_vq, vq_config
from visgen.tracking import TrackingConfig
from visgen.train.checkpoint import list_checkpoints, read_progress
from visgen.train.config import ScalingConfig, TrainConfig
from visgen.train.image_tokenizer import evaluate_image_tokenizer, recon_grid, train_image_tokenizer
from visgen.train.loop import CrashAt

RES = 16


def scenes(n: int, seed: int) -> np.ndarray:
    """(n, 16, 16, 3) uint8: a flat background with one axis-aligned rectangle of another colour."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, RES, RES, 3), np.uint8)
    for i in range(n):
        out[i] = rng.integers(0, 256, 3)
        x, y = rng.integers(0, RES // 2, 2)
        w, h = rng.integers(4, RES // 2 + 1, 2)
        out[i, y:y + h, x:x + w] = rng.integers(0, 256, 3)
    return out


@pytest.fixture(scope="module")
def data(ray_session):
    ds = ray_session.data.from_items([{"image": im} for im in scenes(256, 0)], override_num_blocks=2).materialize()
    holdout = ray_session.data.from_items([{"image": im} for im in scenes(32, 1)], override_num_blocks=1).materialize()
    return ds, holdout


def train_cfg(**kw) -> TrainConfig:
    base = dict(steps=60, batch_size=16, lr=3e-3, warmup_steps=4, schedule="constant", log_every=10,
                checkpoint_every=30, keep_checkpoints=2, eval_samples=8, seed=0, max_failures=1)
    return TrainConfig(**{**base, **kw})


def first_last(history, key="l2"):  # the MSE term: what PSNR measures
    return history[0][key], history[-1][key]


@pytest.mark.slow
def test_local_mode_lowers_loss_exports_tracks_and_resumes(data, tmp_path, fresh_mlflow_db):
    ds, holdout = data
    fresh_mlflow_db(tmp_path)
    tracking = TrackingConfig(experiment="test-train")
    res = train_image_tokenizer(vq_config("tiny"), train_cfg(eval_every=20), ScalingConfig(num_workers=0), ds,
                                holdout=holdout, workdir=tmp_path, tracking=tracking)
    first, last = first_last(res.fit.history)
    assert last < 0.85 * first, res.fit.history
    assert res.fit.step == 60 and res.fit.resumed_from is None
    assert res.model_dir == tmp_path / "models" / "image_tokenizer"
    model = load_vq(res.model_dir)  # save_vq layout, fingerprint-checked
    assert set(res.eval) == {"eval/psnr", "eval/ssim", "eval/usage", "eval/perplexity"}
    run_dir = tmp_path / "ray_results" / "image_tokenizer"
    assert [s for s, _ in list_checkpoints(run_dir)] == [30, 60]
    assert {"images_per_s", "eta_s", "lr", "g_loss", "usage"} <= set(res.metrics)

    # Re-running the same run name with more steps continues from step 60, not from 0.
    again = train_image_tokenizer(vq_config("tiny"), train_cfg(steps=80), ScalingConfig(num_workers=0), ds,
                                  holdout=holdout, workdir=tmp_path, tracking=tracking)
    assert again.fit.resumed_from == 60 and again.fit.step == 80
    assert [h["step"] for h in again.fit.history] == [70, 80]
    assert [s for s, _ in list_checkpoints(run_dir)] == [60, 80]  # keep_checkpoints=2
    assert read_progress(run_dir / "checkpoint_00000080")[0].samples_seen == 80 * 16

    result = evaluate_image_tokenizer(again.model_dir, holdout, workdir=tmp_path, tracking=tracking, batch_size=8)
    saved = json.loads((tmp_path / "eval" / "image_tokenizer.json").read_text())
    assert saved["n_images"] == 32 and saved["fingerprint"] == load_vq(again.model_dir).fingerprint()
    assert 0 < result["usage"] <= 1 and result["psnr"] > 10 and 1 <= result["perplexity"] <= model.num_codes

    # One MLflow run (resumed by name) holds the training curves, eval image grids and holdout metrics.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(res.fit.mlflow_run_id)
    assert again.fit.mlflow_run_id == run.info.run_id
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "rec_loss")]
    assert steps == [10, 20, 30, 40, 50, 60, 70, 80]
    assert {"holdout/psnr", "eval/psnr", "images_per_s", "eta_s"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model", "checkpoint", "eval"} <= artifacts, artifacts
    assert any("recon" in a.path for a in client.list_artifacts(run.info.run_id, "images")), artifacts


def test_local_mode_with_gan_trains_discriminator(data, tmp_path):
    ds, holdout = data
    cfg = vq_config("tiny", use_gan=True, disc_start=4)
    res = train_image_tokenizer(cfg, train_cfg(steps=8, log_every=4, checkpoint_every=8), ScalingConfig(num_workers=0),
                                ds, holdout=holdout, workdir=tmp_path)
    assert "d_loss" in res.metrics and "d_loss" not in res.fit.history[0]  # off for steps 0..3
    from visgen.train.checkpoint import load_state

    modules = load_state(tmp_path / "ray_results" / "image_tokenizer" / "checkpoint_00000008", "modules")
    assert set(modules) == {"model", "disc"}


def test_recon_grid_pairs_rows():
    real = np.full((10, 4, 4, 3), 200, np.uint8)
    grid = recon_grid(real, np.zeros_like(real), per_row=8)
    # 4 rows (real, recon, real, recon) of 8 cells of 4 px with 2 px padding.
    assert grid.shape == (4 * 6 + 2, 8 * 6 + 2, 3)
    assert grid[2:6, 2:6].min() == 200 and grid[8:12, 2:6].max() == 0


@pytest.mark.slow
def test_two_cpu_workers_with_gan_lower_the_loss(data, tmp_path):
    """DDP over 2 workers x 0.5 CPU (the rest stays free for Ray Data), generator and discriminator."""
    ds, holdout = data
    cfg = vq_config("tiny", use_gan=True, disc_start=50)
    res = train_image_tokenizer(cfg, train_cfg(), ScalingConfig(num_workers=2), ds, holdout=holdout, workdir=tmp_path)
    first, last = first_last(res.fit.history)
    assert last < 0.85 * first, res.fit.history
    assert "d_loss" in res.metrics and res.fit.step == 60
    names = {p.name for p in (tmp_path / "ray_results" / "image_tokenizer" / "checkpoint_00000060").iterdir()}
    assert {"rng_rank0.json", "rng_rank1.json", "modules.safetensors", "optim.safetensors", "trainer.json"} <= names


@pytest.mark.slow
def test_worker_killed_mid_run_resumes_from_last_checkpoint(data, tmp_path):
    ds, holdout = data
    marker = tmp_path / "crashed"
    tc = train_cfg(steps=12, checkpoint_every=4, log_every=2, max_failures=1)
    res = train_image_tokenizer(vq_config("tiny"), tc, ScalingConfig(num_workers=2), ds, holdout=holdout,
                                workdir=tmp_path, crash_at=CrashAt(step=6, rank=1, marker=str(marker)))
    assert marker.read_text().startswith("crashed rank 1 after step 6")
    # The restarted worker group loaded checkpoint_4 and counted on from there, not from 0.
    assert res.fit.resumed_from == 4 and res.fit.step == 12
    assert [h["step"] for h in res.fit.history] == [6, 8, 10, 12]
    run_dir = tmp_path / "ray_results" / "image_tokenizer"
    assert [s for s, _ in list_checkpoints(run_dir)] == [8, 12]
    # (a re-run continuing a finished run is covered in local mode above; tests/test_two_nodes.py
    # restarts a worker group on another node)


def test_job_entry_point_reports_a_bad_spec(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ndata: {ingest: {source: /nowhere}}\nimage_tokenizer: {train: {steps: 0}}\n")
    out = subprocess.run([sys.executable, "jobs/train_tokenizer.py", "--pipeline", str(bad)],
                         cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "image_tokenizer.train.steps: 0 is not allowed" in out.stderr
