"""The image tokenizer's judge ceiling against training steps, in one process.

Trains a VQ (the ``small`` preset plus ``--model`` overrides) on freshly rendered shapes scenes
and, at each of ``--at`` steps, scores its reconstructions of real renders of the validation
prompts with the GenEval-shapes judge (:func:`visgen.eval.geneval.reconstruction_ceiling`): the
most a transformer drawing through this tokenizer could score. One JSON line per checkpoint:

    {"model", "step", "train_s", "psnr", "ceiling", "tasks": {...}, "usage", "code_entropy",
     "background_entropy", "blank_codes", "blank_max_error"}

``code_entropy`` is the entropy (nats) of the codes of the training renders, ``background_entropy``
the same over the patches that are pure background, and ``blank_codes`` the distinct codes of an
empty grey image (``blank_max_error``: the largest pixel error of its reconstruction, 0-255): what a transformer drawing through the tokenizer must predict. A tokenizer that
spreads one flat background over hundreds of codes (each also telling where it sits and what is
near) makes the transformer learn its encoder instead of the scene.

    python bench/vq_curve.py --at 400,800,1200                                   # the `small` preset
    python bench/vq_curve.py --model '{"base_channels": 32, "ch_mult": [1, 1, 1]}' --lr 2e-3

Constant learning rate after a 30-step warmup, batch 32, ``--threads`` torch threads; ``train_s``
counts only the training steps.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="{}", help="JSON overrides of the `small` VQ preset")
    ap.add_argument("--at", default="400,800,1200", help="steps at which to score the ceiling")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--images", type=int, default=6000, help="training renders (32 px, all six tasks)")
    ap.add_argument("--prompts-per-task", type=int, default=16, help="validation prompts per task and language")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    at = sorted({int(x) for x in args.at.split(",")})

    from visgen.data.shapes import TASKS
    from visgen.data.synth import render_prompt_scene
    from visgen.eval.geneval import reconstruction_ceiling, reference_image
    from visgen.eval.judge import load_judge
    from visgen.eval.tune import SamplingSearchConfig, validation_prompts
    from visgen.models.vq import VQLoss, VQModel, to_model_input, to_uint8, vq_config

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    over = json.loads(args.model)
    cfg = vq_config("small", **over)
    model, loss_fn = VQModel(cfg), VQLoss(cfg)
    images = np.stack([render_prompt_scene(TASKS[i % len(TASKS)], 10_000 + i, resolution=cfg.resolution,
                                           extra_attribute_prob=0.5)[1] for i in range(args.images)])
    records = validation_prompts(SamplingSearchConfig(prompts_per_task=args.prompts_per_task))
    refs = np.stack([reference_image(r, cfg.resolution, seed=i) for i, r in enumerate(records)])  # as the ceiling draws them
    judge = load_judge()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.95))
    rng = np.random.default_rng(args.seed)
    train_s = 0.0

    from visgen.data.shapes import BACKGROUND

    probe = images[:1000]
    f = cfg.downsample
    patches = probe.reshape(len(probe), cfg.resolution // f, f, cfg.resolution // f, f, 3).astype(np.int16)
    is_background = np.abs(patches - np.asarray(BACKGROUND, np.int16)).max(axis=(2, 4, 5)) <= 3  # (B, h, w)
    blank = np.broadcast_to(np.asarray(BACKGROUND, np.uint8), (1, cfg.resolution, cfg.resolution, 3)).copy()

    def entropy(ids: np.ndarray) -> float:
        p = np.bincount(ids.ravel(), minlength=cfg.codebook_size) / max(ids.size, 1)
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    def code_stats() -> dict:
        with torch.no_grad():
            ids = model.encode(to_model_input(probe)).numpy()
            blank_ids = model.encode(to_model_input(blank)).numpy()
            blank_err = float(np.abs(to_uint8(model.decode(torch.as_tensor(blank_ids))).astype(np.int16) - blank).max())
        return {"code_entropy": round(entropy(ids), 3), "background_entropy": round(entropy(ids[is_background]), 3),
                "blank_codes": int(np.unique(blank_ids).size), "blank_max_error": blank_err}

    def reconstruct(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return to_uint8(model.decode(model.encode(to_model_input(x))))

    for step in range(1, at[-1] + 1):
        t0 = time.perf_counter()
        model.train()
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, step / 30)
        x = to_model_input(images[rng.integers(0, len(images), args.batch_size)])
        out = model(x)
        loss, _ = loss_fn.generator_loss(x, out, step, last_layer=model.last_layer_weight())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        train_s += time.perf_counter() - t0
        if step not in at:
            continue
        model.eval()
        ceiling = reconstruction_ceiling(reconstruct, judge, cfg.resolution, records)
        mse = float(((reconstruct(refs).astype(np.float64) - refs) ** 2).mean())  # on the scored renders
        print(json.dumps({"model": over, "step": step, "train_s": round(train_s, 1),
                          "psnr": round(10 * math.log10(255 ** 2 / max(mse, 1e-12)), 2),
                          "ceiling": round(ceiling["overall"], 3),
                          "tasks": {t: round(v, 3) for t, v in ceiling["tasks"].items()},
                          "usage": round(float(model.codebook_usage()), 3), **code_stats()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
