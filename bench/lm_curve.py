"""Quality against compute: train the transformer on a pipeline's token cache and score it as it goes.

The pipeline trains to a fixed step count and evaluates once; tuning a recipe needs the curve.
This script takes a work directory the pipeline has filled (token cache, image tokenizer, text
tokenizer), trains VisGPT in this process with the trainer's own pieces (``assemble``, the
optimiser groups, the warmup + cosine schedule) and, every ``--eval-every`` steps, draws the
validation prompts of the sampling search (not the benchmark's) under each ``--sampling``
setting and scores them with the GenEval-shapes judge. It also captions held-out images and
reports their slot accuracy. One JSON line per evaluation:

    {"step", "wall_s", "train_s", "loss", "val": {"cfg3.0_t1.0_k0": {"overall", tasks...}}, "caption_slot_accuracy"}

    python bench/lm_curve.py --workdir work/shapes-32 --steps 2000 --eval-every 500 \\
        --preset mini --lr 3e-3 --sampling 3,1.0,0 --sampling 3,0.5,8

Train time (``train_s``) excludes evaluation, so the curve reads as score against training
minutes on this machine. Runs on the CPU with ``--threads`` torch threads, or ``--device cuda``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def load_cache(cache_dir: Path, split: str) -> tuple[list[list[int]], np.ndarray, list[str]]:
    import pyarrow.dataset as pads

    files = sorted(str(p) for p in (cache_dir / split).glob("*.parquet"))
    if not files:
        raise SystemExit(f"no parquet files in {cache_dir / split}: run the pipeline's token-cache stage first")
    t = pads.dataset(files, format="parquet").to_table(columns=["text_ids", "image_ids", "caption"])
    text = [list(map(int, r)) for r in t.column("text_ids").to_pylist()]
    image = np.asarray(t.column("image_ids").to_pylist(), dtype=np.int64)
    return text, image, [str(c) for c in t.column("caption").to_pylist()]


def parse_sampling(text: str) -> dict:
    try:
        cfg, temp, k = text.split(",")
        return {"cfg_scale": float(cfg), "temperature": float(temp), "top_k": int(k)}
    except ValueError:
        raise SystemExit(f"--sampling {text!r}: expected CFG,TEMPERATURE,TOP_K such as 3,1.0,0") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="a pipeline work directory with token_cache/ and models/")
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--model", default="{}", help="JSON overrides of the GPT preset, e.g. '{\"n_layer\": 6}'")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--max-text-tokens", type=int, default=26, help="= data.ingest.max_text_tokens of the pipeline (the demo: 26)")
    ap.add_argument("--t2i-ratio", type=float, default=0.5)
    ap.add_argument("--cond-dropout", type=float, default=0.1)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--prompts-per-task", type=int, default=8, help="validation prompts per task and language")
    ap.add_argument("--captions", type=int, default=128, help="held-out images captioned per evaluation")
    ap.add_argument("--sampling", action="append", default=None, help="CFG,TEMPERATURE,TOP_K (repeatable)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0 = torch's default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw",
                    help="muon: the blocks' weight matrices train with torch.optim.Muon at --muon-lr (the rest with AdamW)")
    ap.add_argument("--muon-lr", type=float, default=0.02)
    args = ap.parse_args(argv)

    from visgen.data.captions import detect_language, slot_accuracy
    from visgen.eval.captions import parse
    from visgen.eval.geneval import score_generations
    from visgen.eval.judge import load_judge
    from visgen.eval.tune import SamplingSearchConfig, validation_prompts
    from visgen.models.gpt import PAD, VisGPT, gpt_config
    from visgen.models.vq import load_vq
    from visgen.inference import Model, caption_codes
    from visgen.text.tokenizer import TextTokenizer
    from visgen.train.lm import assemble
    from visgen.train.config import TrainConfig
    from visgen.train.task import WorkerEnv, muon_groups

    if args.threads:
        torch.set_num_threads(args.threads)
    wd = Path(args.workdir)
    dev = torch.device(args.device)
    text, image, _ = load_cache(wd / "token_cache", "train")
    h_text, h_image, h_caps = load_cache(wd / "token_cache", "holdout")
    vq = load_vq(wd / "models" / "image_tokenizer", device=dev)
    tok = TextTokenizer.load(wd / "text_tokenizer.json")
    cfg = gpt_config(args.preset, **{"text_vocab": tok.vocab_size, "codebook_size": vq.num_codes,
                                     "grid": tuple(vq.grid_shape), "max_text_tokens": args.max_text_tokens,
                                     **json.loads(args.model)})
    cjk = tok.script_tables(cfg.text_vocab)["cjk"]  # marks Chinese captions: their <zh> language token
    torch.manual_seed(args.seed)
    model = VisGPT(cfg).to(dev)
    if cfg.code_looks:
        model.set_code_looks(vq.code_looks())
    # The trainer's own optimisers, schedule and clipping (what lm.train configures in a pipeline).
    env = WorkerEnv(TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                                warmup_steps=args.warmup, min_lr_ratio=args.min_lr_ratio, optimizer=args.optimizer,
                                muon_lr=args.muon_lr), dev)
    env.build_optimizers({"model": muon_groups(model, model.blocks, args.weight_decay)})
    judge = load_judge()
    records = validation_prompts(SamplingSearchConfig(prompts_per_task=args.prompts_per_task))
    settings = [parse_sampling(s) for s in (args.sampling or ["3,1.0,0"])]
    print(json.dumps({"config": vars(args), "params": model.num_params(False), "train_rows": len(text),
                      "layout_length": model.layout.length}), flush=True)

    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(text))
    cursor, train_s, losses, parts = 0, 0.0, [], {"t2i_loss": [], "i2t_loss": []}
    k_gain = min(256, len(h_text))
    gain_text, gain_image = [h_text[i] for i in range(k_gain)], h_image[:k_gain]

    def condition_gain() -> dict:
        """Held-out loss the condition saves, in nats per picture / caption: t2i with the null prompt
        minus with the true one (x image tokens); i2t with another picture minus with its own (x caption tokens)."""
        with torch.no_grad():
            true = assemble(gain_text, gain_image, model.layout, k_gain, None, cjk).to(dev)
            null = assemble(gain_text, gain_image, model.layout, k_gain, [True] * k_gain, cjk).to(dev)
            t_true, t_null = (float(model.loss(x, k_gain)[0]) for x in (true, null))
            own = assemble(gain_text, gain_image, model.layout, 0, None, cjk).to(dev)
            other = assemble(gain_text, np.roll(gain_image, 1, axis=0), model.layout, 0, None, cjk).to(dev)
            c_own, c_other = (float(model.loss(x, 0)[0]) for x in (own, other))
        words = float((own[:, model.layout.i2t_text] != PAD).sum(1).float().mean())  # the scored caption slots
        return {"t2i_gain_nats": round((t_null - t_true) * model.layout.n_image, 2),
                "i2t_gain_nats": round((c_other - c_own) * words, 2)}
    t_start = time.perf_counter()
    n_t2i = int(round(args.t2i_ratio * args.batch_size))
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        if cursor + args.batch_size > len(order):
            order, cursor = rng.permutation(len(text)), 0
        idx = order[cursor: cursor + args.batch_size]
        cursor += args.batch_size
        null = rng.random(n_t2i) < args.cond_dropout
        model.train()
        tokens = assemble([text[i] for i in idx], image[idx], model.layout, n_t2i, null, cjk).to(dev)
        loss, logs = model.loss(tokens, n_t2i)
        env.optimizer_step("model", loss)
        env.step_schedulers()
        losses.append(float(loss.detach()))
        for key in parts:
            if key in logs:  # a ratio of 0 or 1 trains one direction only
                parts[key].append(float(logs[key]))
        train_s += time.perf_counter() - t0
        if step % args.eval_every and step != args.steps:
            continue
        model.eval()
        gain = condition_gain()
        pipe = Model(model, vq, tok)
        val = {}
        for s in settings:
            images = pipe.generate([r["prompt"] for r in records], seed=1_000_000, batch_size=128, **s)
            res = score_generations(records, images, judge, details=False)
            name = f"cfg{s['cfg_scale']:g}_t{s['temperature']:g}_k{s['top_k']}"
            val[name] = {"overall": round(res["overall"], 3),
                         **{t: round(v["accuracy"], 3) for t, v in res["tasks"].items()}}
        k = min(args.captions, len(h_text))
        codes = torch.as_tensor(h_image[:k], device=dev)
        # each held-out image is asked for a caption in its reference caption's language
        caps = caption_codes(model, tok, codes, torch.arange(k, device=dev), [detect_language(c) for c in h_caps[:k]])
        model.clear_cache()
        slot = float(np.mean([slot_accuracy(parse(p)[0], parse(t)[0]) for p, t in zip(caps, h_caps[:k])]))
        print(json.dumps({"step": step, "wall_s": round(time.perf_counter() - t_start, 1), "train_s": round(train_s, 1),
                          "loss": round(float(np.mean(losses[-args.eval_every:])), 4),
                          **{key: round(float(np.mean(v[-args.eval_every:])), 4) for key, v in parts.items() if v},
                          **gain, "val": val,
                          "caption_slot_accuracy": round(slot, 3)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
