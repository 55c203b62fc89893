"""Config sections of the training stages: the optimisation loop and the worker resources.

Both trainers (image tokenizer, transformer) take one :class:`TrainConfig` and one
:class:`ScalingConfig`; the model section stays with the model. ``batch_size`` is the
*global* batch: each of ``W`` workers draws ``batch_size / W`` samples per step, so changing
the worker count keeps the optimisation the same.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from visgen.base import Section


def _auto_or_cpus(v: Any) -> Any:
    # One clear error instead of pydantic's one-per-union-member.
    if v == "auto":
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1024:
        raise ValueError("expected 'auto' or a number of CPUs in (0, 1024]")
    return float(v)


def _auto_or_bool(v: Any) -> Any:
    if v == "auto" or isinstance(v, bool):
        return v
    raise ValueError("expected 'auto', true or false")


# A setting that is 'auto' (decided from the machine) or forced true / false (spec, YAML, CLI flag).
AutoOrBool = Annotated[Literal["auto"] | bool, BeforeValidator(_auto_or_bool)]


class TrainConfig(Section):
    """The optimisation loop shared by every trainer: steps, optimiser, schedule, checkpoints, logging."""

    steps: int = Field(1000, ge=1, le=100_000_000,
                       description="Total optimiser steps; a resumed run continues until the step counter reaches it.")
    batch_size: int = Field(32, ge=1, le=1_048_576,
                            description="Global batch (samples per step summed over workers); must divide by the worker count.")
    lr: float = Field(1e-4, gt=0, le=1.0, description="Peak learning rate of AdamW (reached after warmup).")
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.95), description="AdamW (beta1, beta2).")
    weight_decay: float = Field(0.0, ge=0, le=1.0, description="AdamW decoupled weight decay, on tensors of >= 2 dims only (not biases, norm gains).")
    optimizer: Literal["adamw", "muon"] = Field("adamw", description=(
        "muon: the hidden weight matrices a trainer marks (the transformer blocks' linear layers) train with "
        "torch.optim.Muon at muon_lr, orthogonalised momentum updates that learn more per sample; embeddings, "
        "heads and gains stay on AdamW at lr. Trainers that mark nothing (the image tokenizer) use AdamW throughout."))
    muon_lr: float = Field(0.02, gt=0, le=1.0, description=(
        "Peak learning rate of Muon (optimizer: muon), on the same warmup and schedule; Muon's groups take no weight decay."))
    warmup_steps: int = Field(0, ge=0, description="Linear warmup from 0 to lr over this many steps.")
    schedule: Literal["cosine", "constant"] = Field("cosine", description="LR after warmup: cosine decay to min_lr_ratio*lr, or constant.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Floor of the cosine schedule as a fraction of lr.")
    ema_decay: float | None = Field(None, gt=0, lt=1, description=(
        "Keep an exponential moving average of the weights (this decay per step, ramped up as (1+n)/(10+n) over "
        "the first updates; it averages about the last 1/(1-decay) steps) and export and evaluate it instead of "
        "the last step's weights. Checkpoints carry it, so a resumed run continues the same average. None: off."))
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm of each optimiser to this; 0 disables.")
    checkpoint_every: int = Field(500, ge=1, description="Save a checkpoint every this many steps (and always at the end).")
    keep_checkpoints: int = Field(2, ge=1, le=1000, description="Keep only the newest this many checkpoints of a run.")
    log_every: int = Field(20, ge=1, description="Log step, loss, images/s and ETA every this many steps (rank 0).")
    eval_every: int | None = Field(None, ge=1, description="Run the task's quick eval (metrics + image grid) every this many steps; None = only at the end.")
    eval_samples: int = Field(16, ge=1, le=1024, description="Held-out samples in the quick eval and its image grid.")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="Base seed; worker r seeds torch/numpy/random with seed + r.")
    max_failures: int = Field(2, ge=-1, le=1000, description="Worker-group restarts (from the last checkpoint) before the run fails; -1 = unlimited.")
    precision: Literal["fp32", "bf16"] = Field("bf16", description="bf16 autocast on GPU; CPU always runs fp32 (autocast is not used there).")
    prefetch_batches: int = Field(2, ge=0, le=64, description="Batches prepared ahead of the step, per worker: the "
                                  "feed thread's queue (collate, pinned memory; at least 1) and, when streaming, Ray "
                                  "Data's prefetch.")
    shuffle_buffer: int = Field(0, ge=0, le=1_000_000, description="Streaming feed only: rows in each worker's local shuffle buffer; 0 keeps the stream order.")
    data_in_memory: AutoOrBool = Field(
        "auto", description="true: read the training split into memory once (one copy per node in Ray's object "
        "store, shared by its workers) and draw batches from it, in a fresh order every epoch from (seed, epoch), so a "
        "resumed run continues the interrupted epoch exactly; false: stream it from Ray Data on every pass; 'auto': "
        "in memory when it is at most data_in_memory_max_mb, else streamed. CPU and GPU alike.")
    data_in_memory_max_mb: int = Field(1024, ge=1, le=16_777_216, description="Largest training split (MiB in memory) "
                                       "that data_in_memory: auto keeps in memory.")

    @model_validator(mode="after")
    def _check_steps(self) -> "TrainConfig":
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} exceeds steps={self.steps}")
        return self


class ScalingConfig(Section):
    """How many training workers, on what, and how much of the cluster stays free for Ray Data."""

    num_workers: int = Field(2, ge=0, le=4096,
                             description="Training workers (DDP ranks); 0 runs the loop in the driver process (Ray Train local mode).")
    use_gpu: AutoOrBool = Field("auto", description="Train on GPUs; 'auto' = when the cluster has at least one.")
    cpus_per_worker: Annotated[Literal["auto"] | float, BeforeValidator(_auto_or_cpus)] = Field(
        "auto", description="CPUs reserved per worker (and its torch threads); 'auto' = (cluster CPUs - data_cpus) / num_workers.")
    gpus_per_worker: float = Field(1.0, gt=0, le=16, description="GPUs per worker when training on GPU (fractions share a device).")
    data_cpus: float = Field(1.0, ge=0, le=100_000,
                             description="CPUs kept free for the Ray Data stages feeding training (ingest, decode).")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement strategy of the worker group.")
