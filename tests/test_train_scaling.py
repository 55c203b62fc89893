"""Worker sizing: 'auto' resolution, fail-fast on requests the cluster cannot fit, config validation."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from visgen.config import SpecError, validate_section
from visgen.train.config import ScalingConfig, TrainConfig
from visgen.train.scaling import Capacity, InsufficientResourcesError, NodeShape, resolve_scaling

TWO_CPU = Capacity(nodes=(NodeShape(cpus=2, gpus=0),), source="live nodes")
GPU_NODES = Capacity(nodes=(NodeShape(cpus=16, gpus=1), NodeShape(cpus=16, gpus=1)), source="live nodes")


def test_auto_leaves_data_cpus_free_on_a_two_cpu_machine():
    r = resolve_scaling(ScalingConfig(num_workers=2), TWO_CPU)
    assert (r.num_workers, r.cpus_per_worker, r.use_gpu) == (2, 0.5, False)
    assert r.to_ray().resources_per_worker == {"CPU": 0.5}
    r3 = resolve_scaling(ScalingConfig(num_workers=3), TWO_CPU)
    assert r3.cpus_per_worker == 0.33  # rounded down: 3 x 0.33 + 1 <= 2


def test_auto_uses_gpus_when_present_and_local_mode():
    r = resolve_scaling(ScalingConfig(num_workers=2, data_cpus=4), GPU_NODES)
    assert r.use_gpu and r.gpus_per_worker == 1.0 and r.cpus_per_worker == 14.0
    assert r.to_ray().resources_per_worker == {"CPU": 14.0, "GPU": 1.0}
    local = resolve_scaling(ScalingConfig(num_workers=0), TWO_CPU)
    assert local.local_mode and not local.use_gpu and local.to_ray().num_workers == 0
    assert local.cpus_per_worker == 1  # torch threads in the driver: 2 CPUs - data_cpus


@pytest.mark.parametrize("cfg, cap, message", [
    (dict(num_workers=4, use_gpu=True), TWO_CPU, r"asks for GPUs .* the cluster has 2 CPU, 0 GPU"),
    (dict(num_workers=1, cpus_per_worker=64), TWO_CPU, r"needs 64 CPU on a single node, but no node has that much"),
    (dict(num_workers=2, cpus_per_worker=1), TWO_CPU, r"data_cpus=1 must stay free for Ray Data.*starve"),
    (dict(num_workers=2, data_cpus=2), TWO_CPU, r"no CPU left for 2 training worker\(s\).*data_cpus=2"),
    (dict(num_workers=3, use_gpu=True, cpus_per_worker=1, data_cpus=0), GPU_NODES, r"can place at most 2 of the requested 3"),
    (dict(num_workers=2, use_gpu=True, cpus_per_worker=1, placement_strategy="STRICT_PACK"), GPU_NODES,
     r"can place at most 1 of the requested 2 .*STRICT_PACK"),
    (dict(num_workers=0, use_gpu=True), TWO_CPU, r"local mode\) but the cluster has no GPU"),
])
def test_impossible_requests_fail_with_a_clear_message(cfg, cap, message):
    with pytest.raises(InsufficientResourcesError, match=message):
        resolve_scaling(ScalingConfig(**cfg), cap)


def test_autoscaler_max_counts_nodes_that_do_not_exist_yet():
    cap = Capacity(nodes=(NodeShape(cpus=8, gpus=0, count=1), NodeShape(cpus=8, gpus=4, count=2)), source="autoscaler max")
    r = resolve_scaling(ScalingConfig(num_workers=8, use_gpu=True, cpus_per_worker=2), cap)
    assert r.num_workers == 8
    with pytest.raises(InsufficientResourcesError, match=r"at most 8 of the requested 9 .*autoscaler max"):
        resolve_scaling(ScalingConfig(num_workers=9, use_gpu=True, cpus_per_worker=2), cap)
    unbounded = Capacity(nodes=(NodeShape(cpus=8, gpus=1, count=math.inf),), source="autoscaler max")
    assert resolve_scaling(ScalingConfig(num_workers=64, use_gpu=True, cpus_per_worker=4), unbounded).num_workers == 64


def test_live_cluster_request_fails_fast(ray_session, tmp_path):
    """Through fit(): 4 GPUs on a CPU-only cluster raise at once instead of waiting for a placement group."""
    from visgen.train.image_tokenizer import ImageTokenizerTask
    from visgen.models.vq import vq_config
    from visgen.train.loop import fit

    ds = ray_session.data.from_items([{"image": np.zeros((16, 16, 3), np.uint8)}] * 4)
    t0 = time.perf_counter()
    with pytest.raises(InsufficientResourcesError, match="asks for GPUs"):
        fit(ImageTokenizerTask(vq_config("tiny")), train=TrainConfig(steps=1, batch_size=4),
            scaling=ScalingConfig(num_workers=4, use_gpu=True), run_name="never", storage_path=tmp_path,
            datasets={"train": ds})
    with pytest.raises(InsufficientResourcesError, match="64 CPU on a single node"):
        resolve_scaling(ScalingConfig(num_workers=2, cpus_per_worker=64))
    assert time.perf_counter() - t0 < 60
    assert not (tmp_path / "never").exists()


def test_train_config_validation_names_field_and_value():
    with pytest.raises(SpecError, match=r"warmup_steps=50 exceeds steps=10"):
        validate_section(TrainConfig, {"steps": 10, "warmup_steps": 50})
    with pytest.raises(SpecError, match=r"precision: 'fp16' is not allowed"):
        validate_section(TrainConfig, {"precision": "fp16"})
    with pytest.raises(SpecError, match=r"cpus_per_worker: 'lots' is not allowed: .*'auto' or a number of CPUs"):
        validate_section(ScalingConfig, {"cpus_per_worker": "lots"})
    with pytest.raises(SpecError, match=r"cpus_per_worker: 0 is not allowed"):
        validate_section(ScalingConfig, {"cpus_per_worker": 0})
    with pytest.raises(SpecError, match=r"use_gpu: 'yes please' is not allowed: .*'auto', true or false"):
        validate_section(ScalingConfig, {"use_gpu": "yes please"})
    assert validate_section(ScalingConfig, {"use_gpu": True, "cpus_per_worker": 0.5}).cpus_per_worker == 0.5
    assert validate_section(TrainConfig, {"betas": [0.9, 0.99]}).betas == (0.9, 0.99)


def test_batch_must_divide_over_workers(ray_session, tmp_path):
    from visgen.models.vq import vq_config
    from visgen.train.image_tokenizer import ImageTokenizerTask
    from visgen.train.loop import fit

    ds = ray_session.data.from_items([{"image": np.zeros((16, 16, 3), np.uint8)}] * 4)
    with pytest.raises(ValueError, match=r"batch_size=5 does not divide over 2 workers"):
        fit(ImageTokenizerTask(vq_config("tiny")), train=TrainConfig(steps=1, batch_size=5),
            scaling=ScalingConfig(num_workers=2), run_name="r", storage_path=tmp_path, datasets={"train": ds})


def test_auto_sizes_gpu_workers_from_the_gpu_nodes_only():
    # Big CPU-only nodes must not make a GPU worker ask for more CPUs than a GPU node has.
    mixed = Capacity(nodes=(NodeShape(cpus=8, gpus=1, count=2), NodeShape(cpus=16, gpus=0, count=4)), source="live nodes")
    r = resolve_scaling(ScalingConfig(num_workers=2, data_cpus=2), mixed)
    assert r.use_gpu and r.cpus_per_worker == 7.0  # (2 x 8 GPU-node CPUs - 2) / 2, not capped at 16
    one = resolve_scaling(ScalingConfig(num_workers=1, data_cpus=1), mixed)
    assert one.cpus_per_worker == 8.0
    cpu = resolve_scaling(ScalingConfig(num_workers=2, use_gpu=False, data_cpus=2), mixed)
    assert cpu.cpus_per_worker == 16.0  # CPU training may use the big nodes
