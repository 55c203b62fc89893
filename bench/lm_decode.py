"""Text -> image decoding on CPU: VisGPT's static KV cache against full recompute.

Both paths run the same model (random weights, eval mode), the same prompts and the same seeds
through ``VisGPT.generate_images``; the only difference is ``use_cache``:

* ``cache``   — one prefill over the prompt, then one token per step through the static cache;
* ``nocache`` — every step reruns the whole causal forward over the sequence so far, the cost
  a model without a cache pays (quadratic in the image length).

The sampling noise is a counter-based hash of (seed, step, code), so the two paths must emit
identical codes: their logits differ only by float rounding. Any difference is reported and
the script exits non-zero.

Each repetition runs both paths back to back (so a change in machine load hits both); the
median over ``--repeats`` counts. Warm-up runs first generate only the last few codes of an
image (``prefix=``) through each path, so allocator and kernel start-up are not timed. Besides
wall time, the process's CPU time is reported: on a machine shared with other jobs the wall
clock measures the scheduler's share too, CPU time (one torch thread by default) does not.

    python bench/lm_decode.py                         # small preset, 16x16 tokens, 2 prompts, CFG 4
    python bench/lm_decode.py --batch-size 4 --no-cfg --repeats 5

Prints one JSON line per measurement, then a table and a JSON summary (target: cache/nocache
>= 5x).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# On a CPU shared with other jobs, OpenMP workers that spin while waiting for a descheduled
# sibling burn the cores they wait for (2 threads on 2 busy cores: 2-40 s of CPU for what takes
# 1.5 s). Only effective when torch is imported after this line.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def build_model(preset: str, text_vocab: int, codebook: int, max_text_tokens: int, grid: tuple[int, int], seed: int = 0):
    import torch

    from visgen.models.gpt import VisGPT, gpt_config

    cfg = gpt_config(preset, text_vocab=text_vocab, codebook_size=codebook, max_text_tokens=max_text_tokens,
                     grid=grid)
    torch.manual_seed(seed)
    return VisGPT(cfg).eval()


def prompts(model, batch: int, seed: int = 0):
    """(B, S) text regions of random lengths and random non-special ids, plus (B,) seeds."""
    import torch

    from visgen.text.tokenizer import SPECIAL_TOKENS

    lay = model.layout
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        n = int(torch.randint(1, lay.text_slots, (1,), generator=g))  # 1 .. S-1 text ids
        rows.append(lay.text_region(torch.randint(len(SPECIAL_TOKENS), lay.text_vocab, (n,), generator=g).tolist()))
    return torch.tensor(rows, dtype=torch.long), torch.arange(1000, 1000 + batch, dtype=torch.long)


def decode_once(model, text, seeds, cfg_scale: float, use_cache: bool, prefix=None) -> tuple[float, float, "torch.Tensor"]:
    """One ``generate_images`` call: (wall seconds, CPU seconds of this process, codes (B, N))."""
    t0, c0 = time.perf_counter(), time.process_time()
    codes = model.generate_images(text, seeds, cfg_scale=cfg_scale, use_cache=use_cache, prefix=prefix)
    return time.perf_counter() - t0, time.process_time() - c0, codes


def run(preset: str = "small", batch_size: int = 2, cfg_scale: float = 4.0, repeats: int = 3,
        text_vocab: int = 2048, codebook: int = 1024, max_text_tokens: int = 48, grid: tuple[int, int] = (16, 16),
        threads: int = 1, warmup_codes: int = 8, emit=print) -> dict:
    """Time both paths ``repeats`` times, interleaved; return the summary dict (medians)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    model = build_model(preset, text_vocab, codebook, max_text_tokens, grid)
    text, seeds = prompts(model, batch_size)
    n_img = model.layout.n_image
    rows = batch_size * (2 if cfg_scale != 1.0 else 1)  # sequences the transformer runs (CFG doubles them)

    # Warm-up: generate only the last few codes (a fixed prefix of the rest) through each path.
    k = min(warmup_codes, n_img)
    prefix = torch.zeros(batch_size, n_img - k, dtype=torch.long)
    for use_cache in (True, False):
        decode_once(model, text, seeds, cfg_scale, use_cache, prefix)

    times: dict[str, list[float]] = {"cache": [], "nocache": []}
    cpu: dict[str, list[float]] = {"cache": [], "nocache": []}
    codes: dict[str, torch.Tensor] = {}
    for rep in range(repeats):
        for name in ("cache", "nocache"):
            seconds, cpu_s, out = decode_once(model, text, seeds, cfg_scale, use_cache=name == "cache")
            times[name].append(seconds)
            cpu[name].append(cpu_s)
            if name in codes and not torch.equal(codes[name], out):
                raise RuntimeError(f"{name}: repetition {rep} sampled different codes from repetition 0 with the "
                                   "same seeds; generation is not deterministic")
            codes[name] = out
            emit(json.dumps({"path": name, "repeat": rep, "seconds": round(seconds, 4), "cpu_s": round(cpu_s, 4),
                             "ms_per_token": round(1000 * seconds / n_img, 3),
                             "images_per_s": round(batch_size / seconds, 3), "load1": round(os.getloadavg()[0], 2)}))

    same = codes["cache"] == codes["nocache"]  # (B, N)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    summary = {
        "preset": preset, "params_M": round(model.num_params() / 1e6, 2), "grid": list(grid), "image_tokens": n_img,
        "seq_len": model.layout.length, "batch_size": batch_size, "cfg_scale": cfg_scale, "rows": rows,
        "repeats": repeats, "threads": torch.get_num_threads(),
        **{f"{k}_ms_per_token": round(1000 * v / n_img, 3) for k, v in med.items()},
        **{f"{k}_images_per_s": round(batch_size / v, 3) for k, v in med.items()},
        **{f"{k}_cpu_ms_per_token": round(1000 * v / n_img, 3) for k, v in med_cpu.items()},
        "speedup": round(med["nocache"] / med["cache"], 2),
        "speedup_cpu": round(med_cpu["nocache"] / med_cpu["cache"], 2),
        "codes_identical": bool(same.all()),
        "codes_differing": int((~same).sum()),
        "load1": round(os.getloadavg()[0], 2),
    }
    if not summary["codes_identical"]:
        first = (~same).nonzero()[0].tolist()
        summary["first_difference"] = {"row": first[0], "code": first[1]}
    return summary


def print_table(s: dict, out=sys.stdout) -> None:
    print(f"\n{s['preset']} ({s['params_M']} M params), {s['image_tokens']} image tokens "
          f"(grid {s['grid'][0]}x{s['grid'][1]}), sequence {s['seq_len']}, {s['batch_size']} prompt(s), "
          f"CFG {s['cfg_scale']} -> {s['rows']} rows, {s['threads']} thread(s), median of {s['repeats']}, "
          f"load {s['load1']}", file=out)
    print(f"  {'path':<10} {'ms/token':>10} {'images/s':>10} {'CPU ms/token':>13}", file=out)
    for k in ("cache", "nocache"):
        print(f"  {k:<10} {s[f'{k}_ms_per_token']:>10.2f} {s[f'{k}_images_per_s']:>10.3f} "
              f"{s[f'{k}_cpu_ms_per_token']:>13.2f}", file=out)
    print(f"  cache / nocache speed-up: {s['speedup']:.1f}x wall, {s['speedup_cpu']:.1f}x CPU time   (target >= 5x)",
          file=out)
    if s["codes_identical"]:
        print("  codes: identical in both paths", file=out)
    else:
        print(f"  codes: {s['codes_differing']} of {s['batch_size'] * s['image_tokens']} DIFFER "
              f"(first at {s['first_difference']})", file=out)


def parse_grid(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"grid must look like 16x16, got {text!r}") from None
    return h, w


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="VisGPT preset (tiny|small|base)")
    p.add_argument("--batch-size", type=int, default=2, help="prompts per generate call")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance scale; 1 turns CFG off")
    p.add_argument("--no-cfg", action="store_true", help="same as --cfg-scale 1 (no null-prompt rows)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each path; the median counts")
    p.add_argument("--text-vocab", type=int, default=2048)
    p.add_argument("--codebook", type=int, default=1024)
    p.add_argument("--max-text-tokens", type=int, default=48)
    p.add_argument("--grid", type=parse_grid, default=(16, 16), help="image tokens HxW (16x16 = 256 tokens)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default); one thread "
                   "measures the steadiest on a shared machine and is the faster one for cached decode")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.repeats < 1:
        p.error(f"--batch-size and --repeats must be >= 1, got {args.batch_size} and {args.repeats}")

    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPU(s)", flush=True)
    s = run(preset=args.preset, batch_size=args.batch_size, cfg_scale=1.0 if args.no_cfg else args.cfg_scale,
            repeats=args.repeats, text_vocab=args.text_vocab, codebook=args.codebook,
            max_text_tokens=args.max_text_tokens, grid=args.grid, threads=args.threads,
            emit=lambda line: print(line, flush=True))
    print_table(s)
    print(json.dumps({"summary": s}))
    if not s["codes_identical"]:
        print(f"error: the cached and uncached paths sampled different codes ({s['codes_differing']} differ, first at "
              f"{s['first_difference']}); the KV cache path is not equivalent to full recompute", file=sys.stderr)
        sys.exit(1)
    return s


if __name__ == "__main__":
    main()
