"""What a trainer plugs into the shared training loop (:mod:`visgen.train.loop`), and the per-worker
environment the loop hands it.

A model family is a :class:`TrainTask`: it builds its modules (:class:`Trainable`), turns a numpy
batch into tensors (``collate``, in the feed thread), runs one optimisation step through
:class:`WorkerEnv` (which owns the optimisers, the LR schedules, autocast and the reductions over
workers), evaluates on a fixed held-out batch and exports the trained model.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from visgen.train.config import TrainConfig


# What a trainer plugs in
# ---------------------------------------------------------------------------------------------
@dataclass
class Trainable:
    """What a task builds on each worker.

    ``modules``: the unwrapped modules, by name; they are checkpointed, exported and evaluated
    (rank 0 evaluates alone, so never through a DDP wrapper). ``param_groups``: one AdamW
    optimiser per entry, built by the loop from :class:`TrainConfig` (see :func:`decay_groups`).
    """

    modules: dict[str, torch.nn.Module]
    param_groups: dict[str, list[dict[str, Any]]]  # a group with "muon": True is Muon's under optimizer: muon


@dataclass
class EvalResult:
    metrics: dict[str, float] = field(default_factory=dict)
    images: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (H, W, 3) uint8
    texts: dict[str, Any] = field(default_factory=dict)  # name -> JSON-able samples (e.g. captions)


class TrainTask:
    """A model family's part of training. Instances are pickled to the workers before
    :meth:`setup`, so ``__init__`` should keep only configs (no tensors, no Ray handles)."""

    name = "task"
    #: dataset columns the task reads; the trainer drops the rest before streaming.
    columns: tuple[str, ...] = ()
    #: logs shown in the progress line (all logs go to MLflow); default: every key with "loss".
    log_keys: tuple[str, ...] = ()

    def setup(self, env: "WorkerEnv") -> Trainable:
        """Build the modules on ``env.device``; wrap the ones trained with DDP through ``env.prepare``."""
        raise NotImplementedError

    def collate(self, batch: dict[str, np.ndarray], env: "WorkerEnv", step: int) -> Mapping[str, Any]:
        """Feed side: turn the numpy batch of step ``step`` into what :meth:`train_step` takes.

        Runs in the loop's feed thread, ahead of the step (up to ``prefetch_batches`` batches).
        Torch tensors in the returned mapping (CPU tensors) are pinned and copied to
        ``env.device`` by the loop, on a side stream one step ahead, so :meth:`train_step`
        receives them on the device; other values pass through. It must not touch the modules,
        the optimisers or the global RNGs (draw from a generator seeded by seed, rank and step).
        Default: the batch unchanged (``train_step`` then gets numpy arrays and moves them itself).
        """
        return batch

    def train_step(self, batch: Mapping[str, Any], env: "WorkerEnv", step: int) -> Mapping[str, Any]:
        """One optimisation step on this worker's share of the batch (as :meth:`collate` made it),
        through ``env.optimizer_step``.

        Forward passes run under ``env.autocast()``. Returns logs, each a float or a 0-dim tensor;
        return tensors (detached), not floats: the loop converts them only when it logs
        (``log_every``), so the step never waits for the device. Every rank must return the same
        keys (they are averaged over workers). ``step`` counts completed steps.
        """
        raise NotImplementedError

    def evaluate(self, env: "WorkerEnv", batch: dict[str, np.ndarray], step: int) -> EvalResult:
        """Rank 0 only: metrics and images on the fixed held-out ``batch``, on the unwrapped modules."""
        return EvalResult()

    def export(self, env: "WorkerEnv", directory: Path) -> Path:
        """Rank 0 only, at the end: write the trained model for downstream stages; returns the directory."""
        raise NotImplementedError


def decay_groups(module: torch.nn.Module, weight_decay: float, **extra: Any) -> list[dict[str, Any]]:
    """AdamW groups: decay on every tensor of 2 or more dims (matrices, conv kernels, embeddings),
    none on biases and norm gains, whose decay only pulls offsets and scales to 0 (nanoGPT's
    rule). ``extra`` goes into both groups (e.g. a per-module lr)."""
    decay = [p for p in module.parameters() if p.requires_grad and p.ndim >= 2]
    other = [p for p in module.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay, **extra},
              {"params": other, "weight_decay": 0.0, **extra}]
    return [g for g in groups if g["params"]]


def muon_groups(module: torch.nn.Module, hidden: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """:func:`decay_groups` of ``module`` with the weight matrices of ``hidden`` (a part of it: the
    transformer blocks) in a group of their own marked ``"muon": True``. Under ``optimizer: muon`` that
    group trains with Muon; otherwise it is an AdamW group like the others, with the same decay."""
    matrices = [p for p in hidden.parameters() if p.requires_grad and p.ndim == 2]
    taken = {id(p) for p in matrices}
    rest = [{**g, "params": [p for p in g["params"] if id(p) not in taken]} for g in decay_groups(module, weight_decay)]
    return [{"params": matrices, "weight_decay": weight_decay, "muon": True}] + [g for g in rest if g["params"]]


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` whose Newton–Schulz orthogonalisation runs in ``ns_dtype``, batched over
    the matrices of one shape (one ``bmm`` per iteration instead of one ``mm`` per matrix).

    torch's runs it in bfloat16 always. That is right on a GPU; on a CPU without native bf16 matrix
    multiplies (AVX2, no AVX512-BF16/AMX) it is emulated and about 10x slower than float32: on such
    a 2-core machine a 4 x 128 transformer spent most of each step there (0.7 instead of several steps/s).
    The state (``momentum_buffer``) and the param groups are torch's, so checkpoints of either load into
    the other. Only the ``original`` learning-rate adjustment, sqrt(max(1, fan_out / fan_in)), is offered.
    """

    def __init__(self, params, *, ns_dtype: torch.dtype = torch.bfloat16, **kwargs):
        if kwargs.get("adjust_lr_fn", "original") not in (None, "original"):
            raise ValueError(f"visgen's Muon offers only adjust_lr_fn='original', got {kwargs['adjust_lr_fn']!r}")
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params: list[torch.Tensor] = []
            grads: list[torch.Tensor] = []
            bufs: list[torch.Tensor] = []
            self._init_group(group, params, grads, bufs)
            momentum, lr, wd = group["momentum"], float(group["lr"]), group["weight_decay"]
            updates = []
            for grad, buf in zip(grads, bufs):
                buf.lerp_(grad, 1 - momentum)
                updates.append(grad.lerp(buf, momentum) if group["nesterov"] else buf)
            ortho = newton_schulz(updates, group["ns_coefficients"], group["ns_steps"], group["eps"], self.ns_dtype)
            for p, update in zip(params, ortho):
                fan_out, fan_in = p.shape[:2]
                p.mul_(1 - lr * wd)
                p.add_(update.to(p.dtype), alpha=-lr * math.sqrt(max(1.0, fan_out / fan_in)))
        return loss


def newton_schulz(matrices: list[torch.Tensor], coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> list[torch.Tensor]:
    """Muon's approximate orthogonalisation of each 2-D matrix (the quintic Newton–Schulz iteration
    of torch and of Keller Jordan's reference), in ``dtype``, the matrices of one shape stacked."""
    a, b, c = coefficients
    out: list[torch.Tensor | None] = [None] * len(matrices)
    shapes: dict[tuple[int, ...], list[int]] = {}
    for i, m in enumerate(matrices):
        shapes.setdefault(tuple(m.shape), []).append(i)
    for shape, idx in shapes.items():
        x = torch.stack([matrices[i] for i in idx]).to(dtype)
        tall = shape[0] > shape[1]
        if tall:
            x = x.mT
        x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)
        for _ in range(steps):
            gram = x @ x.mT
            x = a * x + (b * gram + c * (gram @ gram)) @ x
        if tall:
            x = x.mT
        for j, i in enumerate(idx):
            out[i] = x[j]
    return out  # type: ignore[return-value]


class LRSchedule:
    """Linear warmup to 1, then cosine to ``min_ratio`` at ``total`` (or constant): a multiplier of lr.

    A class, not a closure, so ``LambdaLR.state_dict`` records its fields as plain data.
    """

    def __init__(self, warmup: int, total: int, kind: str, min_ratio: float):
        self.warmup, self.total, self.kind, self.min_ratio = warmup, total, kind, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant" or self.total <= self.warmup:
            return 1.0
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


# ---------------------------------------------------------------------------------------------
# The per-worker environment handed to the task
# ---------------------------------------------------------------------------------------------
class WorkerEnv:
    """Device, rank, precision and the optimisers of one worker; distributed details live here."""

    def __init__(self, train: TrainConfig, device: torch.device, rank: int = 0, world_size: int = 1,
                 distributed: bool = False):
        self.train, self.device, self.rank, self.world_size = train, device, rank, world_size
        self.distributed = distributed and world_size > 1
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, torch.optim.lr_scheduler.LambdaLR] = {}
        self.bf16 = train.precision == "bf16" and device.type == "cuda"

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    def prepare(self, module: torch.nn.Module, sync_buffers: bool = True, **ddp_kwargs: Any) -> torch.nn.Module:
        """Move to the device and, with more than one worker, wrap in DDP (Ray's ``prepare_model``).

        ``sync_buffers=False`` skips DDP's per-forward broadcast of rank 0's buffers, for modules
        that keep their buffers identical across ranks themselves.
        """
        if not self.distributed:
            return module.to(self.device)
        import ray.train.torch  # ray.train: only a distributed Train worker gets here

        if not sync_buffers:  # newer torch renamed the flag; ask the installed one which it takes
            new_name = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
            ddp_kwargs["forward_sync_buffers" if new_name else "broadcast_buffers"] = False
        return ray.train.torch.prepare_model(module, move_to_device=self.device, parallel_strategy_kwargs=ddp_kwargs)

    def autocast(self) -> contextlib.AbstractContextManager:
        # bf16 needs no loss scaling. CPU runs stay fp32: they are the small-scale reference path.
        if self.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def build_optimizers(self, groups: Mapping[str, list[dict[str, Any]]]) -> None:
        tc = self.train
        self._schedule = LRSchedule(tc.warmup_steps, tc.steps, tc.schedule, tc.min_lr_ratio)
        self._peak_lrs: dict[str, list[float]] = {}
        for name, g in groups.items():
            muon, adamw = [], []
            for group in g:
                if group.get("muon") and tc.optimizer == "muon":
                    muon.append(group)
                else:
                    adamw.append({k: v for k, v in group.items() if k != "muon"})
            built = {}
            if adamw:
                built[name] = torch.optim.AdamW(adamw, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay,
                                                fused=self.device.type == "cuda")
            if muon:  # "<name>.muon": stepped with "<name>" by optimizer_step
                built[f"{name}.muon"] = Muon(
                    [{"params": group["params"]} for group in muon], lr=tc.muon_lr, weight_decay=0.0,
                    adjust_lr_fn="original", ns_dtype=torch.bfloat16 if self.device.type == "cuda" else torch.float32)
            for key, opt in built.items():
                self.optimizers[key] = opt
                self._peak_lrs[key] = [group["lr"] for group in opt.param_groups]
                self.schedulers[key] = torch.optim.lr_scheduler.LambdaLR(opt, self._schedule)

    def _family(self, name: str) -> list[torch.optim.Optimizer]:
        """The optimisers that train the parameters of ``name``: AdamW's and, under Muon, ``<name>.muon``."""
        return [o for key, o in self.optimizers.items() if key == name or key == f"{name}.muon"]

    def reapply_schedule(self) -> None:
        """After loading a checkpoint: the LR schedule (peak lr, warmup, steps, shape) is the one
        of the *current* config, so extending ``steps`` on resume re-shapes the remaining decay;
        the position in it (the step counter) comes from the checkpoint. With an unchanged
        config this reproduces the saved learning rates exactly."""
        tc = self.train
        # A new object: LambdaLR.load_state_dict wrote the saved fields into the old one.
        self._schedule = LRSchedule(tc.warmup_steps, tc.steps, tc.schedule, tc.min_lr_ratio)
        for name, sched in self.schedulers.items():
            peaks = self._peak_lrs[name]
            sched.lr_lambdas = [self._schedule] * len(peaks)
            sched.base_lrs = list(peaks)
            factor = self._schedule(sched.last_epoch)
            for group, peak in zip(sched.optimizer.param_groups, peaks):
                group["initial_lr"], group["lr"] = peak, peak * factor
            sched._last_lr = [group["lr"] for group in sched.optimizer.param_groups]

    def optimizer_step(self, name: str, loss: torch.Tensor) -> torch.Tensor:
        """Zero this optimiser's grads, backprop ``loss``, clip, step. Returns the pre-clip grad norm
        as a 0-dim tensor (on the device: reading it would wait for the step; the loop logs it).

        Zeroing first (not after) drops gradients another loss left on these parameters, e.g.
        the generator loss backpropagating through a GAN discriminator.
        """
        opts = self._family(name)
        if not opts:
            raise KeyError(f"no optimiser named {name!r}; this worker has {sorted(self.optimizers)}")
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for opt in opts for g in opt.param_groups for p in g["params"] if p.grad is not None]
        clip = self.train.grad_clip if self.train.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip) if params else torch.zeros(())
        for opt in opts:
            opt.step()
        return norm.detach()

    def step_schedulers(self) -> None:
        # Once per global step for every optimiser, so each lr is a function of the step alone even
        # when an optimiser skips steps (a discriminator before it switches on); torch warns about
        # exactly that skip.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            for s in self.schedulers.values():
                s.step()

    def lr(self) -> float:
        first = next(iter(self.optimizers.values()), None)
        return float(first.param_groups[0]["lr"]) if first is not None else 0.0

    def mean_over_workers(self, values: Mapping[str, float]) -> dict[str, float]:
        if not self.distributed or not values:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64 if self.device.type == "cpu" else torch.float32,
                         device=self.device)
        dist.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist())}
