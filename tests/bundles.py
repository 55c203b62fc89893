"""Tiny random-init model bundles for the Model API, registry and serving tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from visgen.data.captions import make_caption
from visgen.data.shapes import sample_prompt
from visgen.models.gpt import VisGPT, gpt_config, save_gpt
from visgen.models.vq import VQModel, save_vq, vq_config
from visgen.inference import write_bundle, write_bundle_eval
from visgen.text.tokenizer import TextTokenizerConfig, train_text_tokenizer

RESOLUTION = 16


def captions(n: int = 400) -> list[str]:
    rng = np.random.default_rng(0)
    tasks = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
    return [make_caption(sample_prompt(tasks[i % 6], rng), ("en", "zh")[i % 2], rng) for i in range(n)]


def make_bundle(root: Path, seed: int = 0, eval_results: dict | None = None, image_prep=None, **vq_overrides) -> Path:
    """An untrained tiny bundle under ``root/bundle``; ``seed`` picks the weights, so two seeds are two models.
    ``image_prep``: the recorded image preprocessing (an ``ImagePrep``; None records none, as old bundles)."""
    root = Path(root)
    torch.manual_seed(seed)
    vq = VQModel(vq_config("tiny", **{"resolution": RESOLUTION, **vq_overrides})).eval()
    tok = train_text_tokenizer(captions(), TextTokenizerConfig(vocab_size=400, min_frequency=1))
    h, w = vq.grid_shape
    lm = VisGPT(gpt_config("tiny", text_vocab=400, codebook_size=vq.num_codes, grid=(h, w), max_text_tokens=16))
    save_vq(vq, root / "vq")
    save_gpt(lm, root / "lm")
    tok.save(root / "text_tokenizer.json")
    bundle = write_bundle(root / "bundle", lm_dir=root / "lm", image_tokenizer_dir=root / "vq",
                          text_tokenizer=root / "text_tokenizer.json", image_prep=image_prep)
    if eval_results is not None:
        write_bundle_eval(bundle, eval_results)
    return bundle
