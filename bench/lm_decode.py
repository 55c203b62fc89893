"""Text -> image decoding on CPU: the captured decode step, the old per-token loop, full recompute.

Three paths run the same model (random weights, eval mode), the same prompts and the same seeds:

* ``cache``   — ``VisGPT.generate_images``: one prefill over the prompt, then one decode step per
  token through the static KV cache, each step one function over device buffers (head, guidance,
  filters, noise, argmax, token write, position) — what ``compile_decode()`` captures; eager here;
* ``legacy``  — the per-token loop visgen ran before that step (frozen below): the same cache, but
  the head, guidance, filters, noise, write and a fresh ``torch.tensor([pos])`` as separate eager
  operations each token (``--no-legacy`` skips it);
* ``nocache`` — every step reruns the whole causal forward over the sequence so far, the cost
  a model without a cache pays (quadratic in the image length).

The sampling noise is a counter-based hash of (seed, step, code), so all paths must emit
identical codes: their logits differ only by float rounding (``cache`` and ``legacy`` not even
that). Any difference is reported and the script exits non-zero. ``--captions`` adds the same
old-vs-new comparison for image -> text (``generate_text``, greedy and sampled).

Each repetition runs the paths back to back (so a change in machine load hits all); the
median over ``--repeats`` counts. Warm-up runs first generate only the last few codes of an
image (``prefix=``) through each path, so allocator and kernel start-up are not timed. Besides
wall time, the process's CPU time is reported: on a machine shared with other jobs the wall
clock measures the scheduler's share too, CPU time (one torch thread by default) does not.

    python bench/lm_decode.py                         # small preset, 16x16 tokens, 2 prompts, CFG 4
    python bench/lm_decode.py --batch-size 4 --no-cfg --repeats 5
    python bench/lm_decode.py --preset mini --captions

Prints one JSON line per measurement, then a table and a JSON summary (targets: cache/nocache
>= 5x; cache/legacy >= 1x).
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


PATHS = ("cache", "legacy", "nocache")


def decode_once(model, text, seeds, cfg_scale: float, path: str, prefix=None) -> tuple[float, float, "torch.Tensor"]:
    """One generation through ``path``: (wall seconds, CPU seconds of this process, codes (B, N))."""
    t0, c0 = time.perf_counter(), time.process_time()
    if path == "legacy":
        codes = legacy_generate_images(model, text, seeds, cfg_scale=cfg_scale, prefix=prefix)
    else:
        codes = model.generate_images(text, seeds, cfg_scale=cfg_scale, use_cache=path == "cache", prefix=prefix)
    return time.perf_counter() - t0, time.process_time() - c0, codes


def run(preset: str = "small", batch_size: int = 2, cfg_scale: float = 4.0, repeats: int = 3,
        text_vocab: int = 2048, codebook: int = 1024, max_text_tokens: int = 48, grid: tuple[int, int] = (16, 16),
        threads: int = 1, warmup_codes: int = 8, legacy: bool = True, emit=print) -> dict:
    """Time every path ``repeats`` times, interleaved; return the summary dict (medians)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    model = build_model(preset, text_vocab, codebook, max_text_tokens, grid)
    text, seeds = prompts(model, batch_size)
    n_img = model.layout.n_image
    rows = batch_size * (2 if cfg_scale != 1.0 else 1)  # sequences the transformer runs (CFG doubles them)
    paths = [p for p in PATHS if legacy or p != "legacy"]

    # Warm-up: generate only the last few codes (a fixed prefix of the rest) through each path.
    k = min(warmup_codes, n_img)
    prefix = torch.zeros(batch_size, n_img - k, dtype=torch.long)
    for path in paths:
        decode_once(model, text, seeds, cfg_scale, path, prefix)

    times: dict[str, list[float]] = {p: [] for p in paths}
    cpu: dict[str, list[float]] = {p: [] for p in paths}
    codes: dict[str, torch.Tensor] = {}
    for rep in range(repeats):
        for name in paths:
            seconds, cpu_s, out = decode_once(model, text, seeds, cfg_scale, name)
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
        "repeats": repeats, "threads": torch.get_num_threads(), "paths": paths,
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
    if legacy:
        summary.update(step_speedup=round(med["legacy"] / med["cache"], 3),
                       step_speedup_cpu=round(med_cpu["legacy"] / med_cpu["cache"], 3),
                       legacy_codes_identical=bool(torch.equal(codes["legacy"], codes["cache"])))
    return summary


def run_captions(preset: str = "small", batch_size: int = 2, repeats: int = 3, text_vocab: int = 2048,
                 codebook: int = 1024, max_text_tokens: int = 48, grid: tuple[int, int] = (16, 16), threads: int = 1,
                 emit=print) -> dict:
    """Image -> text, the captured step (eager) against the legacy loop: greedy in English, and
    sampled (temperature 1, top-k 50) in the model's own language. Random weights write every
    slot (no early <eos>), so ms/token is per text slot."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    model = build_model(preset, text_vocab, codebook, max_text_tokens, grid)
    g = torch.Generator().manual_seed(2)
    image = torch.randint(0, codebook, (batch_size, model.layout.n_image), generator=g)
    seeds = torch.arange(batch_size, dtype=torch.long)
    blocked = torch.zeros(text_vocab, dtype=torch.bool)
    blocked[text_vocab // 2:] = True  # stands in for a tokenizer's other-script table
    settings = {"greedy_en": dict(language="en", blocked=blocked, temperature=0.0),
                "sampled_auto": dict(language="auto", temperature=1.0, top_k=50)}
    out: dict = {"batch_size": batch_size, "text_slots": model.layout.text_slots}
    for name, kw in settings.items():
        times: dict[str, list[float]] = {"cache": [], "legacy": []}
        ids: dict[str, list] = {}
        for rep in range(repeats + 1):  # the first round warms up
            for path in ("cache", "legacy"):
                t0 = time.perf_counter()
                if path == "legacy":
                    got, _ = legacy_generate_text(model, image, seeds, **kw)
                else:
                    got = model.generate_text(image, seeds, **kw)
                if rep:
                    times[path].append(time.perf_counter() - t0)
                ids[path] = got
        slots = max(len(r) for r in ids["cache"]) + 2  # the language slot and <eos> too
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"setting": name, **{f"{k}_ms_per_token": round(1000 * v / slots, 3) for k, v in med.items()},
               "step_speedup": round(med["legacy"] / med["cache"], 3), "tokens": slots,
               "ids_identical": ids["cache"] == ids["legacy"]}
        emit(json.dumps({"captions": row}))
        out[name] = row
    return out


def print_table(s: dict, out=sys.stdout) -> None:
    print(f"\n{s['preset']} ({s['params_M']} M params), {s['image_tokens']} image tokens "
          f"(grid {s['grid'][0]}x{s['grid'][1]}), sequence {s['seq_len']}, {s['batch_size']} prompt(s), "
          f"CFG {s['cfg_scale']} -> {s['rows']} rows, {s['threads']} thread(s), median of {s['repeats']}, "
          f"load {s['load1']}", file=out)
    print(f"  {'path':<10} {'ms/token':>10} {'images/s':>10} {'CPU ms/token':>13}", file=out)
    for k in s["paths"]:
        print(f"  {k:<10} {s[f'{k}_ms_per_token']:>10.2f} {s[f'{k}_images_per_s']:>10.3f} "
              f"{s[f'{k}_cpu_ms_per_token']:>13.2f}", file=out)
    print(f"  cache / nocache speed-up: {s['speedup']:.1f}x wall, {s['speedup_cpu']:.1f}x CPU time   (target >= 5x)",
          file=out)
    if "step_speedup" in s:
        print(f"  decode step, new / legacy speed-up (eager): {s['step_speedup']:.2f}x wall, "
              f"{s['step_speedup_cpu']:.2f}x CPU time; codes "
              f"{'identical' if s['legacy_codes_identical'] else 'DIFFER'}", file=out)
    if s["codes_identical"]:
        print("  codes: identical in both paths", file=out)
    else:
        print(f"  codes: {s['codes_differing']} of {s['batch_size'] * s['image_tokens']} DIFFER "
              f"(first at {s['first_difference']})", file=out)
    for name in ("greedy_en", "sampled_auto"):
        c = s.get("captions", {}).get(name)
        if c:
            print(f"  captions {name:<13} new {c['cache_ms_per_token']:.2f} ms/token, legacy {c['legacy_ms_per_token']:.2f}"
                  f" -> {c['step_speedup']:.2f}x; ids {'identical' if c['ids_identical'] else 'DIFFER'}", file=out)


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
    p.add_argument("--no-legacy", action="store_true", help="skip the pre-issue-13 per-token loop")
    p.add_argument("--captions", action="store_true", help="also time image -> text, new step against the legacy loop")
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.repeats < 1:
        p.error(f"--batch-size and --repeats must be >= 1, got {args.batch_size} and {args.repeats}")

    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPU(s)", flush=True)
    s = run(preset=args.preset, batch_size=args.batch_size, cfg_scale=1.0 if args.no_cfg else args.cfg_scale,
            repeats=args.repeats, text_vocab=args.text_vocab, codebook=args.codebook,
            max_text_tokens=args.max_text_tokens, grid=args.grid, threads=args.threads, legacy=not args.no_legacy,
            emit=lambda line: print(line, flush=True))
    if args.captions:
        s["captions"] = run_captions(preset=args.preset, batch_size=args.batch_size, repeats=args.repeats,
                                     text_vocab=args.text_vocab, codebook=args.codebook,
                                     max_text_tokens=args.max_text_tokens, grid=args.grid, threads=args.threads,
                                     emit=lambda line: print(line, flush=True))
    print_table(s)
    print(json.dumps({"summary": s}))
    if not s["codes_identical"]:
        print(f"error: the cached and uncached paths sampled different codes ({s['codes_differing']} differ, first at "
              f"{s['first_difference']}); the KV cache path is not equivalent to full recompute", file=sys.stderr)
        sys.exit(1)
    differ = [k for k, c in s.get("captions", {}).items() if isinstance(c, dict) and not c["ids_identical"]]
    if not s.get("legacy_codes_identical", True) or differ:
        print(f"error: the decode step and the legacy loop emitted different tokens (images: "
              f"{'differ' if not s.get('legacy_codes_identical', True) else 'same'}, captions differ in {differ})",
              file=sys.stderr)
        sys.exit(1)
    return s


# ---------------------------------------------------------------------------------------------
# The per-token decode loop visgen ran before the captured step (issue 13), frozen verbatim as the
# baseline: its sampling code, its loops. Only ``forward_step`` could be compiled; the head, the
# guidance mix, the filters, the noise, the write and a fresh ``torch.tensor([pos])`` ran eagerly
# each token. The captured step must emit the very tokens this does (tests/test_gpt.py).
# ---------------------------------------------------------------------------------------------
_M32 = 0xFFFFFFFF


def _legacy_mix32(x):
    x = x & _M32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _M32
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def legacy_uniform_noise(seeds, step: int, ids):
    import torch

    if isinstance(ids, int):
        ids = torch.arange(ids, device=seeds.device, dtype=torch.long)[None, :]
    seeds = seeds.long()[:, None]
    hi = _legacy_mix32((seeds >> 32) + 0x632BE5AB)
    key = _legacy_mix32((seeds & _M32) * 0x5BD1E995 + hi
                        + _legacy_mix32(torch.tensor(step, device=seeds.device) * 0x27D4EB2F + 1))
    x = _legacy_mix32(key ^ _legacy_mix32(ids.long() + 0x1B873593))
    return (x.double() + 0.5) / 4294967296.0


def legacy_sample(logits, seeds, step: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    import torch

    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    ids = None
    if 0 < top_k < logits.shape[-1]:
        logits, ids = logits.topk(top_k, dim=-1)
    if top_p < 1.0:
        if ids is None:
            logits, ids = logits.sort(dim=-1, descending=True)
        probs = logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p
        drop[:, 0] = False
        logits = logits.masked_fill(drop, float("-inf"))
    noise = legacy_uniform_noise(seeds, step, ids if ids is not None else logits.shape[-1])
    choice = (logits - torch.log(-torch.log(noise)).float()).argmax(-1)
    return ids.gather(1, choice[:, None])[:, 0] if ids is not None else choice


def _legacy_hidden(model, seq, pos: int, task, prefill: bool, step_fn=None):
    import torch

    if prefill:
        return model.forward_step(seq[:, : pos + 1], torch.arange(pos + 1, device=seq.device), task)[:, -1]
    return (step_fn or model.forward_step)(seq[:, pos: pos + 1], torch.tensor([pos], device=seq.device), task)[:, -1]


def legacy_generate_images(model, text, seeds, *, cfg_scale: float = 1.0, temperature: float = 1.0, top_k: int = 0,
                           top_p: float = 1.0, prefix=None, step_fn=None):
    """``VisGPT.generate_images`` as it was (cached path); ``step_fn``: a compiled ``forward_step``."""
    import torch

    from visgen.models.gpt import TASK_T2I

    lay, dev = model.layout, model.head.weight.device
    b = text.shape[0]
    p = 0 if prefix is None else prefix.shape[1]
    guided = cfg_scale != 1.0
    null = torch.tensor([lay.text_region(None)] * b, dtype=torch.long, device=text.device)
    rows = torch.cat([text, null]) if guided else text
    image = torch.zeros(rows.shape[0], lay.n_image, dtype=torch.long, device=dev)
    if p:
        image[:, :p] = prefix.repeat(2, 1) if guided else prefix
    seq = lay.t2i(rows.to(dev), image)
    task = torch.full((seq.shape[0],), TASK_T2I, dtype=torch.long, device=dev)
    model.setup_cache(seq.shape[0])
    first = lay.t2i_soi + p
    for i in range(p, lay.n_image):
        pos = first + (i - p)
        h = _legacy_hidden(model, seq, pos, task, prefill=i == p, step_fn=step_fn)
        logits = model.image_logits(h).float()
        if guided:
            cond, uncond = logits.chunk(2)
            logits = uncond + cfg_scale * (cond - uncond)
        code = legacy_sample(logits, seeds, i, temperature, top_k, top_p)
        seq[:, pos + 1] = (code.repeat(2) if guided else code) + lay.text_vocab
    return seq[:b, lay.t2i_image] - lay.text_vocab


def legacy_generate_text(model, image, seeds, *, language=None, blocked=None, temperature: float = 0.0, top_k: int = 0,
                         top_p: float = 1.0, step_fn=None):
    """``VisGPT.generate_text`` as it was (cached path) → (caption ids per row, the i2t text regions (B, S))."""
    import torch

    from visgen.models.gpt import EOS, LANG_IDS, PAD, TASK_I2T, caption_languages

    lay, dev = model.layout, model.head.weight.device
    b = image.shape[0]
    langs = caption_languages(language, b)
    forced = torch.tensor([LANG_IDS.get(lang, -1) for lang in langs], dtype=torch.long, device=dev)
    text_mask = model.text_blocked if blocked is None else model.text_blocked | blocked.to(dev, torch.bool)
    filler = torch.full((b, lay.text_slots), PAD, dtype=torch.long, device=dev)
    seq = lay.i2t(image.to(dev), filler)
    task = torch.full((b,), TASK_I2T, dtype=torch.long, device=dev)
    model.setup_cache(b)
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    last = lay.text_slots - 1
    for j in range(lay.text_slots):
        pos = lay.i2t_eoi + j
        h = _legacy_hidden(model, seq, pos, task, prefill=j == 0, step_fn=step_fn)
        if j == 0:
            tok = torch.where(forced >= 0, forced, legacy_sample(model.text_logits(h, model.lang_blocked).float(), seeds,
                                                                 j, temperature, top_k, top_p))
        elif j == last:
            tok = torch.full((b,), EOS, dtype=torch.long, device=dev)
        else:
            tok = legacy_sample(model.text_logits(h, text_mask).float(), seeds, j, temperature, top_k, top_p)
        tok = torch.where(done, torch.full_like(tok, PAD), tok)
        seq[:, pos + 1] = tok
        done |= tok == EOS
        if bool(done.all()):
            break
    region = seq[:, lay.i2t_text]
    out = [row[: row.index(EOS)] if EOS in row else [t for t in row if t != PAD] for row in region[:, 1:].tolist()]
    return out, region



if __name__ == "__main__":
    main()
