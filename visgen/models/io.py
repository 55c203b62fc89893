"""Saving and loading models by role: safetensors weights + a JSON description, never a pickle.

Every saved model is a directory with ``<name>.safetensors`` and ``<name>.json`` (``format``,
``config``, ``fingerprint`` and any extra fields). :func:`save_model` writes both (the format in
the safetensors header too), :func:`load_model` checks the format, rebuilds the module from its
config, loads the weights strictly and checks them against the fingerprint, so a file of another
model, another format or a corrupt one fails loudly. :func:`fingerprint` is the sha256 both use.
:func:`check_fits` is the one check that a transformer and its tokenizers belong together.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from pydantic import BaseModel
from safetensors.torch import load_file, save_file

from visgen.base import validate_section

M = TypeVar("M", bound=torch.nn.Module)


def fingerprint(cfg: BaseModel, state: dict[str, torch.Tensor], skip: Callable[[str], bool] = lambda name: False,
                late_fields: tuple[str, ...] = ()) -> str:
    """sha256 of the config and of every tensor (name, dtype, shape, bytes) not ``skip``-ped.

    ``late_fields``: config fields added after models were saved, left out of the hash while they
    hold their default (the behaviour those models were built with), so the saved files still load.
    """
    dump = cfg.model_dump(mode="json")
    for name in late_fields:
        if getattr(cfg, name) == type(cfg).model_fields[name].default:
            dump.pop(name)
    h = hashlib.sha256(json.dumps(dump, sort_keys=True).encode())
    for name, t in sorted(state.items()):
        if skip(name):
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_model(model: torch.nn.Module, directory: str | Path, *, name: str, fmt: str, cfg: BaseModel, fp: str,
               extra: dict[str, Any] | None = None) -> Path:
    """Write ``<name>.safetensors`` and ``<name>.json`` (format, config, fingerprint, ``extra``) into ``directory``."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(d / f"{name}.safetensors"), metadata={"format": fmt})
    meta = {"format": fmt, "config": cfg.model_dump(mode="json"), "fingerprint": fp, **(extra or {})}
    (d / f"{name}.json").write_text(json.dumps(meta, indent=1, sort_keys=True), encoding="utf-8")
    return d


def read_meta(directory: str | Path, *, name: str, fmt: str, what: str, old_format_hint: str = "") -> dict:
    """The ``<name>.json`` of a saved model, after checking both files exist and the format is ``fmt``."""
    d = Path(directory)
    for f in (f"{name}.json", f"{name}.safetensors"):
        if not (d / f).is_file():
            raise FileNotFoundError(f"{d / f} does not exist: {d} is not a saved {what} "
                                    f"(expected {name}.json and {name}.safetensors)")
    try:
        meta = json.loads((d / f"{name}.json").read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"{d / f'{name}.json'} is not valid JSON: {err}") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{d / f'{name}.json'} has format {found!r}, not {fmt!r}{old_format_hint}")
    return meta


def load_model(directory: str | Path, build: Callable[[Any], M], cfg_class: type[BaseModel], *, name: str, fmt: str,
               what: str, device: str | torch.device = "cpu", old_format_hint: str = "") -> M:
    """Rebuild a model written by :func:`save_model`: ``build(config)`` then the weights (strict),
    checked against the recorded fingerprint (``model.fingerprint()``); in eval mode on ``device``."""
    d = Path(directory)
    meta = read_meta(d, name=name, fmt=fmt, what=what, old_format_hint=old_format_hint)
    model = build(validate_section(cfg_class, meta.get("config"), where=str(d / f"{name}.json")))
    model.load_state_dict(load_file(str(d / f"{name}.safetensors")), strict=True)
    if model.fingerprint() != meta.get("fingerprint"):
        raise ValueError(f"{d / f'{name}.safetensors'} does not match the fingerprint in {d / f'{name}.json'} "
                         f"({str(meta.get('fingerprint'))[:12]}…): the files are corrupt or from different models")
    return model.to(device).eval()


def check_fits(lm: Any, *, codebook_size: int, grid: tuple[int, int], text_vocab_size: int,
               image_tokenizer: str = "the image tokenizer", text_tokenizer: str = "the text tokenizer") -> None:
    """The transformer config ``lm`` (a ``GPTConfig``) reads the ids of these tokenizers: the same
    codebook and grid as the image tokenizer, room for every text id. ValueError naming both otherwise."""
    if lm.codebook_size != codebook_size or tuple(lm.grid) != tuple(grid):
        raise ValueError(f"the transformer expects {lm.codebook_size} codes on a {tuple(lm.grid)} grid but "
                         f"{image_tokenizer} has {codebook_size} codes on {tuple(grid)}: they were not trained together")
    if text_vocab_size > lm.text_vocab:
        raise ValueError(f"{text_tokenizer} has {text_vocab_size} ids but the transformer's text_vocab is "
                         f"{lm.text_vocab}; set text_tokenizer.vocab_size <= lm.model.text_vocab (the spec derives it)")
