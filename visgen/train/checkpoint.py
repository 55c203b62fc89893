"""Training checkpoints as safetensors + JSON: no pickles, readable by any tool, exact on reload.

A training state is a tree of dicts, lists and tuples whose leaves are tensors, numpy arrays
and plain scalars (an optimiser ``state_dict``, RNG states, model weights). :func:`flatten_state`
splits such a tree into a flat ``{key: tensor}`` dict, stored as ``NAME.safetensors``, and a
JSON skeleton, stored as ``NAME.json``, in which each tensor is replaced by its key. Python
types JSON cannot express (tuples, int dict keys, non-finite floats, numpy arrays and scalars)
are tagged, so :func:`unflatten_state` rebuilds the identical tree.

One checkpoint directory (``checkpoint_00000200`` for step 200)::

    trainer.json                          format, version, step, epoch, samples seen, world size
    modules.safetensors + modules.json    {module name: state_dict}   (rank 0)
    ema.safetensors + ema.json            the weight average, with train.ema_decay   (rank 0)
    optim.safetensors + optim.json        {"optimizers": {...}, "schedulers": {...}}   (rank 0)
    rng_rank{R}.safetensors + .json       torch / CUDA / numpy / python RNG of rank R   (every rank)

Model replicas and optimiser states are identical across DDP ranks, so rank 0 writes them;
RNG streams differ per rank, so each rank writes its own.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from visgen import storage

CHECKPOINT_FORMAT = "visgen-train-checkpoint"
CHECKPOINT_VERSION = 1
_DIR_RE = re.compile(r"^checkpoint_(\d+)$")
# Tags of values JSON cannot hold natively. A dict whose keys collide with a tag, or whose keys
# are not all strings, is written as an explicit list of (key, value) pairs.
_TAGS = ("__tensor__", "__ndarray__", "__tuple__", "__dict__", "__float__", "__npscalar__")


# ---------------------------------------------------------------------------------------------
# Tree <-> (tensors, JSON skeleton)
# ---------------------------------------------------------------------------------------------
def flatten_state(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a state tree into ``({key: cpu tensor}, json_skeleton)``; inverse of :func:`unflatten_state`.

    Keys follow the tree path (``state/0/exp_avg``) so the safetensors file reads on its own.
    Tensors that share storage (tied weights) are cloned: safetensors refuses aliases.
    """
    tensors: dict[str, torch.Tensor] = {}
    seen_storage: set[int] = set()

    def put(path: str, t: torch.Tensor) -> str:
        key, i = path or "_", 1
        while key in tensors:
            key, i = f"{path}#{i}", i + 1
        t = t.detach().cpu()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if ptr is not None and ptr in seen_storage:
            t = t.clone()
        elif ptr is not None:
            seen_storage.add(ptr)
        tensors[key] = t.contiguous()
        return key

    def enc(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            return {"__tensor__": put(path, x)}
        if isinstance(x, np.ndarray):
            return {"__ndarray__": put(path, torch.from_numpy(np.array(x, copy=True)))}
        if isinstance(x, np.generic):
            return {"__npscalar__": x.dtype.str, "value": enc(x.item(), path)}
        if x is None or isinstance(x, (bool, int, str)):
            return x
        if isinstance(x, float):
            return x if math.isfinite(x) else {"__float__": repr(x)}
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v, f"{path}/{i}") for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [enc(v, f"{path}/{i}") for i, v in enumerate(x)]
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x) and not any(k in _TAGS for k in x):
                return {k: enc(v, f"{path}/{k}" if path else k) for k, v in x.items()}
            return {"__dict__": [[enc(k, f"{path}/key"), enc(v, f"{path}/{k}" if path else str(k))] for k, v in x.items()]}
        raise TypeError(f"cannot store a {type(x).__name__} at {path or '<root>'!r} in a checkpoint "
                        "(allowed: tensors, numpy arrays, None/bool/int/float/str, and lists/tuples/dicts of them)")

    return tensors, enc(obj, "")


def unflatten_state(tensors: dict[str, torch.Tensor], tree: Any) -> Any:
    """Rebuild the tree written by :func:`flatten_state` (tensors come back as stored, on CPU)."""

    def dec(x: Any) -> Any:
        if isinstance(x, list):
            return [dec(v) for v in x]
        if not isinstance(x, dict):
            return x
        if "__tensor__" in x:
            return tensors[x["__tensor__"]]
        if "__ndarray__" in x:
            return tensors[x["__ndarray__"]].numpy()
        if "__npscalar__" in x:
            return np.dtype(x["__npscalar__"]).type(dec(x["value"]))
        if "__float__" in x:
            return float(x["__float__"])
        if "__tuple__" in x:
            return tuple(dec(v) for v in x["__tuple__"])
        if "__dict__" in x:
            return {dec(k): dec(v) for k, v in x["__dict__"]}
        return {k: dec(v) for k, v in x.items()}

    return dec(tree)


def save_state(directory: str | Path, name: str, obj: Any) -> None:
    """Write ``obj`` as ``directory/name.safetensors`` + ``directory/name.json``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors, tree = flatten_state(obj)
    save_file(tensors, str(d / f"{name}.safetensors"))
    (d / f"{name}.json").write_text(json.dumps(tree, indent=1, allow_nan=False), encoding="utf-8")


def load_state(directory: str | Path, name: str) -> Any:
    """Read back what :func:`save_state` wrote."""
    d = Path(directory)
    missing = [p.name for p in (d / f"{name}.safetensors", d / f"{name}.json") if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {str(d)!r} is incomplete: missing {missing}")
    tree = json.loads((d / f"{name}.json").read_text(encoding="utf-8"))
    return unflatten_state(load_file(str(d / f"{name}.safetensors")), tree)


# ---------------------------------------------------------------------------------------------
# RNG
# ---------------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """The torch (CPU and every CUDA device), numpy-global and python ``random`` states."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    # random.setstate wants the inner state as a tuple; it comes back from JSON as one (tagged).
    random.setstate(state["python"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Checkpoint directories
# ---------------------------------------------------------------------------------------------
@dataclass
class Progress:
    """Where a run is: the counters a resumed run continues from."""

    step: int = 0  # optimiser steps completed
    epoch: int = 0  # passes over the training split started before this one
    samples_seen: int = 0  # samples consumed, summed over workers


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def save_checkpoint(directory: str | Path, *, progress: Progress, modules: dict[str, torch.nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer], schedulers: dict[str, Any],
                    rank: int = 0, world_size: int = 1, meta: dict | None = None,
                    ema: dict | None = None) -> Path:
    """Write this rank's part of a checkpoint into ``directory`` (see the module docstring).
    ``ema``: the weight average's state (:class:`visgen.train.ema.WeightAverage`), rank 0."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_state(d, f"rng_rank{rank}", capture_rng())
    if rank == 0:
        save_state(d, "modules", {k: m.state_dict() for k, m in modules.items()})
        save_state(d, "optim", {"optimizers": {k: o.state_dict() for k, o in optimizers.items()},
                                "schedulers": {k: s.state_dict() for k, s in schedulers.items()}})
        if ema is not None:
            save_state(d, "ema", ema)
        # Sizes of rank 0's files: an upload that copied trainer.json but not all of the rest
        # (a failure mid-copy) is recognised as incomplete by checkpoint_complete().
        files = {p.name: p.stat().st_size for p in sorted(d.iterdir())
                 if p.name.startswith(("modules.", "optim.", "rng_rank0.", "ema."))}
        info = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **asdict(progress),
                "world_size": world_size, "saved_at": time.time(), "files": files, "meta": meta or {}}
        (d / "trainer.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    return d


def child(run_dir: str | Path, name: str) -> Path | str:
    """``run_dir/name`` for a local path (a Path) or an object store URL (a str, see :mod:`visgen.storage`)."""
    return storage.join(str(run_dir), name) if storage.is_url(run_dir) else Path(run_dir) / name


def read_progress(directory: str | Path) -> tuple[Progress, dict]:
    """``(Progress, full trainer.json)`` of a checkpoint (local or at a URL), checking format and version."""
    p = child(directory, "trainer.json")
    try:
        text = storage.read_text(p)
    except FileNotFoundError:
        raise FileNotFoundError(f"{str(directory)!r} is not a visgen training checkpoint (no trainer.json)") from None
    info = json.loads(text)
    if info.get("format") != CHECKPOINT_FORMAT or info.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{str(p)!r}: unsupported checkpoint format {info.get('format')!r} v{info.get('version')!r} "
                         f"(this code reads {CHECKPOINT_FORMAT!r} v{CHECKPOINT_VERSION})")
    return Progress(step=int(info["step"]), epoch=int(info["epoch"]), samples_seen=int(info["samples_seen"])), info


def checkpoint_complete(directory: str | Path) -> bool:
    """Whether rank 0's part of a checkpoint is all there (readable trainer.json, every file at its size)."""
    try:
        _, info = read_progress(directory)
    except (OSError, ValueError, KeyError):
        return False
    if storage.is_url(directory):
        have = {rel: size for rel, size, _ in storage.listing(directory)}
        return all(have.get(name) == size for name, size in info.get("files", {}).items())
    d = Path(directory)
    return all((d / name).is_file() and (d / name).stat().st_size == size for name, size in info.get("files", {}).items())


def load_checkpoint(directory: str | Path, *, modules: dict[str, torch.nn.Module],
                    optimizers: dict[str, torch.optim.Optimizer], schedulers: dict[str, Any],
                    rank: int = 0) -> tuple[Progress, bool]:
    """Restore modules, optimisers, schedulers and this rank's RNG in place.

    Returns ``(progress, rng_restored)``; ``rng_restored`` is False when the checkpoint was
    written by fewer workers than now (the caller reseeds that rank deterministically). A
    checkpoint at a URL is read from this node's copy (:func:`visgen.storage.local_copy`).
    """
    d = storage.local_copy(directory)
    progress, _ = read_progress(d)
    saved = load_state(d, "modules")
    _check_names("module", saved, modules, d)
    for k, m in modules.items():
        m.load_state_dict(saved[k])
    optim = load_state(d, "optim")
    _check_names("optimizer", optim["optimizers"], optimizers, d)
    _check_names("scheduler", optim["schedulers"], schedulers, d)
    for k, o in optimizers.items():
        o.load_state_dict(optim["optimizers"][k])
    for k, s in schedulers.items():
        s.load_state_dict(optim["schedulers"][k])
    rng_restored = (d / f"rng_rank{rank}.json").is_file()
    if rng_restored:
        restore_rng(load_state(d, f"rng_rank{rank}"))
    return progress, rng_restored


def load_ema(directory: str | Path) -> dict | None:
    """The weight average saved with a checkpoint (``train.ema_decay``), or None when it has none."""
    d = storage.local_copy(directory)
    return load_state(d, "ema") if (Path(d) / "ema.json").is_file() else None


def load_module_weights(directory: str | Path, name: str) -> dict[str, torch.Tensor]:
    """The ``state_dict`` of one module of a checkpoint (e.g. to export the final model)."""
    saved = load_state(directory, "modules")
    if name not in saved:
        raise KeyError(f"checkpoint {str(directory)!r} has no module {name!r} (has {sorted(saved)})")
    return saved[name]


def _check_names(kind: str, saved: dict, live: dict, d: Path) -> None:
    if set(saved) != set(live):
        raise ValueError(f"checkpoint {str(d)!r} holds {kind}s {sorted(saved)} but the task builds {sorted(live)}: "
                         "it was written by a different task; use another run name")


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path | str]]:
    """Complete checkpoints under ``run_dir`` (a local path or a URL) as ``(step, location)``, oldest
    first (see :func:`checkpoint_complete`)."""
    if storage.is_url(run_dir):
        found = []
        for name in storage.listdir(run_dir):
            m = _DIR_RE.match(name)
            if m and checkpoint_complete(child(run_dir, name)):
                found.append((int(m.group(1)), child(run_dir, name)))
        return sorted(found)
    d = Path(run_dir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _DIR_RE.match(p.name)
        if m and p.is_dir() and checkpoint_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | str | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints; returns what was removed."""
    doomed = [p for _, p in list_checkpoints(run_dir)[:-keep]] if keep > 0 else []
    for p in doomed:
        if storage.is_url(p):
            storage.delete(p)
        else:
            shutil.rmtree(p, ignore_errors=True)
    return doomed
