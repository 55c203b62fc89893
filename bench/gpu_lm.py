"""VisGPT on one GPU: training MFU and text -> image throughput, next to the plain PyTorch reference.

One process measures, in this order (training first, so the decode compiles come after it):

(a) ``train``: training steps of the ``base`` preset (12 x 768) at the reference's shape
    (vocabulary 8192 text + 16384 image = 24 576, 320-token sequences, batch 64, half text ->
    image and half image -> text), bf16 autocast, fused AdamW; eager and ``torch.compile``.
    MFU = tokens/s x ``VisGPT.flops_per_token()`` / 989 TFLOP/s (dense bf16 H100/H200).
(b) ``gen``: text -> image at 256 image tokens with classifier-free guidance (the batch
    doubled), full-vocabulary sampling included, then VQ decoding of the codes to 256-px images
    with a ``base``-preset VQ (random weights: speed only), for 8, 64 and 256 prompts (16, 128
    and 512 rows), eager and with ``VisGPT.compile_decode()``: the whole decode step (head, CFG
    mix, sampling, token write, position) compiled, with ``reduce-overhead`` one CUDA graph per
    token. ``--legacy`` adds the loop from before that step, with only ``forward_step``
    compiled. ms/step = generation time / 256 (prefill included, as the reference counts it);
    images/s counts prompts per second end to end (transformer + VQ decoder).
(c) ``ref``: with ``--ref PATH`` (``ref_gpt.py``, not part of this repository), that script's
    own training measurement (eager and compiled) and its CUDA-graph decode (the ``REF_GRAPHS=1``
    path: ``decode_graphs``) at the same row counts, in this process, on this GPU.
    Without ``--ref`` (or when the file is absent) the reference is skipped with a note.

Targets (issue 13), in the table's last columns: compiled MFU >= 40 %, eager training >= 0.9x the
reference's tokens/s, compiled decode ms/step <= the reference's at 16 and 128 rows, >= 200
images/s end to end at 64 prompts.

Warm-up (and compilation) is excluded from every timing; timings are wall clock between
``torch.cuda.synchronize()`` calls. Prints one JSON line per measurement (also appended to
``--jsonl``, by default ``$OUT/gpu_lm.jsonl`` when ``$OUT`` is set) and a summary table.

    python bench/gpu_lm.py --ref ../shared/bench/ref_gpt.py   # one H200: about 5 minutes
    python bench/gpu_lm.py --dry-run                          # every code path at tiny sizes, on CPU, in seconds
    python bench/gpu_lm.py --report DIR                       # bench/gpu_all.sh's table from its outputs

The dry run uses tiny models and torch.compile's ``eager`` backend (graph capture and
``fullgraph`` checks without code generation); it checks the reference file's interface
but cannot time it (the reference needs CUDA).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import inspect
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

PEAK_BF16 = 989e12  # dense bf16 FLOP/s of an H100/H200 SXM (1979e12 is the 2:4-sparsity figure)


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the real run and the dry run."""

    gpt_preset: str = "base"
    text_vocab: int = 8192  # + codebook 16384 = 24 576, the reference's vocabulary
    codebook: int = 16384
    max_text_tokens: int = 59  # sequence = 256 image + 60 text slots + 4 = 320, the reference's length
    grid: tuple[int, int] = (16, 16)
    batch: int = 64
    train_steps: int = 20
    train_warmup: int = 3  # the first one compiles
    prompts: tuple[int, ...] = (8, 64, 256)  # x2 rows with CFG: 16, 128, 512
    decode_target_prompts: tuple[int, ...] = (8, 64)  # ms/step <= the reference's at 16 and 128 rows
    images_target_prompts: int = 64  # >= 200 images/s end to end here
    gen_repeats: int = 3
    vq_preset: str = "base"
    vq_overrides: tuple[tuple[str, object], ...] = ()
    compile_backend: str = "inductor"
    compile_mode: str = "reduce-overhead"  # VisGPT.compile_decode(mode): CUDA graphs over the whole decode step
    dropout: float | None = None  # None: the preset's (0.1 for base); the reference has none


DRY = Sizes(gpt_preset="tiny", text_vocab=64, codebook=64, max_text_tokens=7, grid=(4, 4), batch=4, train_steps=2,
            train_warmup=1, prompts=(1, 2), decode_target_prompts=(1, 2), images_target_prompts=2, gen_repeats=1,
            vq_preset="tiny", vq_overrides=(("resolution", 8),), compile_backend="eager")

# The targets of issue 13: the thresholds the table marks "met" or "NOT met".
TARGETS = {
    "train_eager_ratio": 0.9,  # eager training tokens/s >= 0.9 x the reference's
    "train_mfu": 0.40,  # compiled training MFU by executed FLOPs
    "decode_ratio": 1.0,  # reference ms/step / ours, compiled, at 16 and 128 rows
    "images_per_s": 200.0,  # text -> image end to end at 64 prompts (256 tokens, CFG, sampling, VQ decode)
    "serve_ratio": 0.8,  # Serve on the GPU / in-process Model.generate, concurrency 64
    "ingest_over_webdataset": 1.0,  # bench/ingest.py (a)/(b) on 16 cores
    "ingest_over_tight_loop": 0.8,  # bench/ingest.py (a)/(c) on 16 cores
    "wall_s": 480.0,  # bench/gpu_all.sh, everything
}


class Recorder:
    """Prints each measurement as one JSON line, keeps it for the summary, appends it to a file."""

    def __init__(self, path: str | None):
        self.rows: list[dict] = []
        self.path = path
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, **row) -> dict:
        row = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()}
        self.rows.append(row)
        line = json.dumps(row)
        print(line, flush=True)
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
        return row

    def find(self, **match) -> dict | None:
        for row in self.rows:
            if all(row.get(k) == v for k, v in match.items()):
                return row
        return None


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gpt_cfg(s: Sizes):
    from visgen.models.gpt import gpt_config

    extra = {} if s.dropout is None else {"dropout": s.dropout}
    return gpt_config(s.gpt_preset, text_vocab=s.text_vocab, codebook_size=s.codebook,
                      max_text_tokens=s.max_text_tokens, grid=s.grid, **extra)


def random_batch(layout, batch: int, codebook: int, device, seed: int = 0):
    """(B, L) valid token ids: rows [0, B/2) text -> image, the rest image -> text; random content."""
    import torch

    from visgen.text.tokenizer import SPECIAL_TOKENS

    g = torch.Generator().manual_seed(seed)
    n = batch // 2
    ids = [torch.randint(len(SPECIAL_TOKENS), layout.text_vocab, (layout.text_slots - 1,), generator=g).tolist()
           for _ in range(batch)]  # full-length captions
    # t2i prompts as they are; i2t captions behind their language token (<en>), as training builds them
    text = torch.tensor([layout.text_region(t, lang=None if i < n else "en") for i, t in enumerate(ids)])  # (B, S)
    image = torch.randint(0, codebook, (batch, layout.n_image), generator=g)  # (B, N)
    return torch.cat([layout.t2i(text[:n], image[:n]), layout.i2t(image[n:], text[n:])]).to(device), n


def prompt_batch(layout, prompts: int, device, seed: int = 1):
    """(P, S) text regions of random captions (8 to S-1 ids) and (P,) seeds."""
    import torch

    from visgen.text.tokenizer import SPECIAL_TOKENS

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(prompts):
        n = int(torch.randint(min(8, layout.text_slots - 1), layout.text_slots, (1,), generator=g))
        rows.append(layout.text_region(torch.randint(len(SPECIAL_TOKENS), layout.text_vocab, (n,), generator=g).tolist()))
    return torch.tensor(rows, device=device), torch.arange(prompts, device=device, dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# (a) training
# ---------------------------------------------------------------------------------------------
def bench_train(s: Sizes, device, compiled: bool, record: Recorder) -> dict:
    import torch

    from visgen.models.gpt import VisGPT

    torch.manual_seed(0)
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = VisGPT(gpt_cfg(s)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)
    fwd = torch.compile(model, backend=s.compile_backend) if compiled else model
    tokens, n_t2i = random_batch(model.layout, s.batch, s.codebook, device)
    dev_type = torch.device(device).type

    def step() -> torch.Tensor:
        with torch.autocast(dev_type, dtype=torch.bfloat16):
            loss, _ = fwd(tokens, n_t2i)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    loss = step()
    sync(device)
    first = time.perf_counter() - t0
    if not loss.requires_grad or not torch.isfinite(loss):
        raise RuntimeError(f"training step is broken: loss={float(loss)} requires_grad={loss.requires_grad}")
    for _ in range(s.train_warmup - 1):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(s.train_steps):
        step()
    sync(device)
    step_s = (time.perf_counter() - t0) / s.train_steps
    L = model.layout.length
    tok_s = s.batch * L / step_s
    row = record(source="visgen", what="train", compiled=compiled, params_M=model.num_params(embeddings=False) / 1e6,
                 batch=s.batch, seq=L, dropout=model.cfg.dropout, step_s=step_s, tokens_per_s=tok_s,
                 mfu=tok_s * model.flops_per_token(n_t2i / s.batch) / PEAK_BF16, first_step_s=first,
                 peak_mem_GiB=torch.cuda.max_memory_allocated() / 2**30 if dev_type == "cuda" else None)
    del model, opt, fwd, tokens
    free_memory()
    return row


# ---------------------------------------------------------------------------------------------
# (b) generation: transformer sampling + VQ decoding
# ---------------------------------------------------------------------------------------------
def cudagraph_skips() -> int:
    """Times inductor declined to use CUDA graphs so far (the reason goes to the log)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["inductor"].get("cudagraph_skips", 0))
    except Exception:  # counters are internal; a missing one is not a failure of the benchmark
        return -1


def load_legacy():
    """bench/lm_decode.py's frozen copy of the decode loop before the captured step (issue 13)."""
    name = "visgen_bench_lm_decode"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent / "lm_decode.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def bench_generate(s: Sizes, device, cfg_scale: float, record: Recorder, vq_channels_last: bool = False,
                   legacy: bool = False) -> list[dict]:
    """Per prompt count: eager, then the compiled decode step (and with ``legacy`` the old loop with
    only ``forward_step`` compiled), each timed end to end and per step."""
    import torch

    from visgen.models.gpt import VisGPT
    from visgen.models.vq import VQModel, vq_config

    torch.manual_seed(0)
    model = VisGPT(gpt_cfg(s)).to(device=device, dtype=torch.bfloat16).eval()
    vq_cfg = vq_config(s.vq_preset, codebook_size=s.codebook, **dict(s.vq_overrides))
    fmt = torch.channels_last if vq_channels_last else torch.contiguous_format
    vq = VQModel(vq_cfg).to(device=device, dtype=torch.bfloat16, memory_format=fmt).eval()
    if tuple(vq.grid_shape) != tuple(s.grid):
        raise ValueError(f"VQ grid {vq.grid_shape} (resolution {vq_cfg.resolution}) does not match the "
                         f"transformer's grid {s.grid}")
    h, w = s.grid
    n_img = h * w
    rows, eager_codes = [], {}
    modes = ["eager", "compiled"] + (["legacy"] if legacy else [])
    legacy_step = None
    for mode in modes:
        if mode == "compiled":
            model.compile_decode(s.compile_mode, backend=s.compile_backend)
        if mode == "legacy":  # before issue 13: only forward_step compiled, the rest eager per token
            kw = dict(mode=s.compile_mode) if s.compile_backend == "inductor" else {}
            legacy_step = torch.compile(model.forward_step, backend=s.compile_backend, fullgraph=True, dynamic=False,
                                        **kw)
        for p in s.prompts:
            text, seeds = prompt_batch(model.layout, p, device)

            def generate():
                if mode == "legacy":
                    return load_legacy().legacy_generate_images(model, text, seeds, cfg_scale=cfg_scale,
                                                                step_fn=legacy_step)
                return model.generate_images(text, seeds, cfg_scale=cfg_scale)

            skips = cudagraph_skips()
            t0 = time.perf_counter()
            codes = generate()  # warm-up: allocates the cache; compiles and captures in "compiled"
            vq.decode(codes.view(p, h, w))
            sync(device)
            first = time.perf_counter() - t0
            lm_s, vq_s = [], []
            for _ in range(s.gen_repeats):
                sync(device)
                t0 = time.perf_counter()
                codes = generate()  # (P, N)
                sync(device)
                t1 = time.perf_counter()
                images = vq.decode(codes.view(p, h, w))  # (P, 3, H, W)
                sync(device)
                lm_s.append(t1 - t0)
                vq_s.append(time.perf_counter() - t1)
            lm, dec = statistics.median(lm_s), statistics.median(vq_s)
            extra = {}
            if mode == "eager":
                eager_codes[p] = codes
            else:
                # bf16 kernels differ between eager and compiled, so a sampled code may flip and the
                # rest of that image diverge: informational, not a failure.
                extra["codes_equal_eager"] = float((codes == eager_codes[p]).float().mean())
                extra["cudagraph_skips"] = cudagraph_skips() - skips if skips >= 0 else None
            rows.append(record(source="visgen", what="generate" if mode != "legacy" else "generate_legacy",
                               mode=mode, prompts=p, rows=p * (2 if cfg_scale != 1.0 else 1), image_tokens=n_img,
                               cfg_scale=cfg_scale, compile_mode=s.compile_mode if mode != "eager" else None,
                               lm_s=lm, ms_per_step=1000 * lm / n_img, vq_s=dec, total_s=lm + dec,
                               lm_images_per_s=p / lm, images_per_s=p / (lm + dec),
                               image_px=list(images.shape[-2:]), first_s=first, **extra))
    model.clear_cache()
    del model, vq, legacy_step
    free_memory()
    return rows


# ---------------------------------------------------------------------------------------------
# (c) the reference
# ---------------------------------------------------------------------------------------------
def load_ref(path: str):
    """Import ``ref_gpt.py`` from ``path`` under a private module name (its main blocks do not run)."""
    spec = importlib.util.spec_from_file_location("visgen_bench_ref_gpt", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path} as a Python module")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    missing = [n for n in ("main", "decode_graphs", "emit", "GPT", "CachedStep") if not hasattr(mod, n)]
    if missing:
        raise ImportError(f"{path} lacks {missing}: not the ref_gpt.py this benchmark was written for")
    if "batches" not in inspect.signature(mod.decode_graphs).parameters:
        raise ImportError(f"{path}: decode_graphs() takes no 'batches' argument; cannot size it to the prompts")
    return mod


@contextlib.contextmanager
def argv(args: list[str]):
    saved = sys.argv
    sys.argv = args
    try:
        yield
    finally:
        sys.argv = saved


def bench_ref_train(ref, record: Recorder) -> None:
    """The reference's own training measurement (eager and compiled), re-emitted with ``source="ref"``."""
    ref.emit = lambda **kw: record(source="ref", **kw)
    with argv([ref.__file__, "train"]):  # its main() reads the sections to run from sys.argv
        ref.main()
    free_memory()


def bench_ref_decode(ref, s: Sizes, record: Recorder) -> None:
    """The reference's CUDA-graph decode (what ``REF_GRAPHS=1`` runs) at the CFG-doubled row counts of (b)."""
    ref.emit = lambda **kw: record(source="ref", **kw)
    ref.decode_graphs(batches=tuple(2 * p for p in s.prompts))
    free_memory()


def check_ref_on_cpu(ref, record: Recorder) -> None:
    """Dry run: the reference needs CUDA to time anything; check its model runs a cached step."""
    import torch

    m = ref.GPT(64, 32, 2, 2, 16).to(torch.bfloat16).eval()  # vocab, d, layers, heads, length
    with torch.no_grad():
        step = ref.CachedStep(m, 2)
        prompt = torch.randint(0, 64, (2, 4))
        m(prompt, step.caches(), torch.arange(4))
        logits = step(prompt[:, -1:], torch.tensor([4]))
    if logits.shape != (2, 64):
        raise RuntimeError(f"reference CachedStep returned logits of shape {tuple(logits.shape)}, expected (2, 64)")
    record(source="ref", what="interface_check", ok=True,
           note="reference loaded; timed runs need CUDA and are skipped in the dry run")


# ---------------------------------------------------------------------------------------------
# Summary: one table with the targets (also what bench/gpu_all.sh prints, from the saved lines)
# ---------------------------------------------------------------------------------------------
def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def find(rows: list[dict], **match) -> dict | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


class Table:
    """Lines of (measurement, visgen, reference, ratio, target, status)."""

    def __init__(self):
        self.lines: list[tuple[str, str, str, str, str, str]] = []

    def add(self, name: str, ours, ref=None, spec: str = ".3f", *, higher_better: bool = True,
            target: float | None = None, on: str = "ratio") -> None:
        """``on``: what ``target`` applies to, the ratio to the reference or the value itself."""
        ratio = None
        if ours is not None and ref:
            ratio = ours / ref if higher_better else ref / ours
        status, goal = "", ""
        if target is not None:
            value = ratio if on == "ratio" else ours
            goal = f"{'ratio ' if on == 'ratio' else ''}>= {target:g}"
            status = "-" if value is None else ("met" if value >= target else "NOT met")
        self.lines.append((name, _fmt(ours, spec), _fmt(ref, spec), _fmt(ratio, ".2f"), goal, status))

    def render(self, notes: list[str]) -> list[str]:
        out = ["", f"{'measurement':<52} {'visgen':>12} {'reference':>12} {'ratio':>6}  {'target':<12} status"]
        out += [f"{n:<52} {a:>12} {b:>12} {r:>6}  {g:<12} {st}".rstrip() for n, a, b, r, g, st in self.lines]
        return out + [f"note: {n}" for n in notes]


def lm_table(rows: list[dict], table: Table) -> None:
    """The lines of (a), (b) and (c) from the measurement rows (live, or read back from the JSONL)."""
    env = find(rows, what="env") or {}
    decode_targets = set(env.get("decode_target_prompts") or ())
    images_target = env.get("images_target_prompts")
    for compiled in (False, True):
        ours = find(rows, source="visgen", what="train", compiled=compiled)
        ref = find(rows, source="ref", what="train", compiled=compiled)
        tag = "compiled" if compiled else "eager"
        if ours or ref:
            table.add(f"train {tag}: tokens/s", ours and ours["tokens_per_s"], ref and ref["tokens_per_s"], ",.0f",
                      target=None if compiled else TARGETS["train_eager_ratio"])
            table.add(f"train {tag}: MFU", ours and ours["mfu"], ref and ref["mfu"], ".3f",
                      target=TARGETS["train_mfu"] if compiled else None, on="value")
    prompts = sorted({r["prompts"] for r in rows if r.get("what") in ("generate", "generate_legacy")})
    for p in prompts:
        ref = find(rows, source="ref", what="decode_kvcache_graphs", prompts=p)
        for mode in ("eager", "legacy", "compiled"):
            ours = find(rows, source="visgen", what="generate_legacy" if mode == "legacy" else "generate", mode=mode,
                        prompts=p)
            if not ours:
                continue
            r = ref if mode == "compiled" else None
            rows_ = ours["rows"]
            label = {"eager": "eager", "legacy": "before (fwd compiled)", "compiled": "compiled"}[mode]
            table.add(f"decode {p} prompts x2 CFG, {label}: ms/step", ours["ms_per_step"], r and r.get("ms_per_step"),
                      ".3f", higher_better=False,
                      target=TARGETS["decode_ratio"] if mode == "compiled" and p in decode_targets else None)
            if mode != "compiled":
                continue
            table.add(f"  {rows_} rows, transformer only: images/s", ours["lm_images_per_s"], r and r.get("images_per_s"),
                      ".1f")
            table.add(f"  + VQ decode to {ours['image_px'][0]} px: images/s", ours["images_per_s"], None, ".1f",
                      target=TARGETS["images_per_s"] if p == images_target else None, on="value")


def serve_ingest_table(serve: list[dict], ingest: dict | None, table: Table, notes: list[str]) -> None:
    """bench/serve_load.py's and bench/ingest.py's JSON lines → their lines of the table."""
    if serve:
        ratio = [r for r in serve if "serve_over_pipeline" in r]
        if ratio:
            r = max(ratio, key=lambda r: r.get("concurrency", 0))
            table.add(f"serve, concurrency {r.get('concurrency')}: images/s", r.get("serve_images_per_s"),
                      r.get("pipeline_images_per_s"), ".1f", target=TARGETS["serve_ratio"])
            notes.append("serve: 'reference' is the in-process Model.generate at the same batch size")
        runs = [r for r in serve if r.get("mode") == "batched"]
        if runs:
            r = max(runs, key=lambda r: r["concurrency"])
            table.add(f"serve batched, concurrency {r['concurrency']}: images/s", r["images_per_s"], None, ".1f")
        if not ratio:
            table.add("serve / in-process Model.generate, conc. 64", None, None, target=TARGETS["serve_ratio"])
            notes.append("serve: bench/serve_load.py printed no 'serve_over_pipeline' line (item 3 adds the GPU "
                         "replica and the in-process comparison)")
    if ingest:
        cpus = ingest.get("cpus")
        table.add(f"ingest {cpus} CPUs, visgen / webdataset+DataLoader", ingest.get("a_over_b"), None, ".2f",
                  target=TARGETS["ingest_over_webdataset"], on="value")
        table.add(f"ingest {cpus} CPUs, visgen / (tight loop x cores)", ingest.get("a_over_c"), None, ".2f",
                  target=TARGETS["ingest_over_tight_loop"], on="value")


def summary_table(record: Recorder, s: Sizes, notes: list[str]) -> list[str]:
    table = Table()
    lm_table(record.rows, table)
    return table.render(notes)


def read_json_lines(path: Path) -> list[dict]:
    """The JSON objects among a file's lines (a log mixes them with text); none for a missing file."""
    out = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
    return out


def report(out_dir: str, wall_s: float | None = None, failed: list[str] = ()) -> list[str]:
    """The one table of bench/gpu_all.sh, from what its steps left in ``out_dir``: gpu_lm.jsonl,
    serve_load.log, ingest.log (each optional)."""
    d = Path(out_dir)
    rows = read_json_lines(d / "gpu_lm.jsonl")
    env = find(rows, what="env") or {}
    table, notes = Table(), []
    if env.get("dry_run"):
        notes.append("dry run: tiny sizes on CPU; the numbers only show that every path runs, the status column "
                     "is not a verdict")
    lm_table(rows, table)
    ingest = [r for r in read_json_lines(d / "ingest.log") if "cpus" in r and "images" in r]
    serve_ingest_table(read_json_lines(d / "serve_load.log"), ingest[-1] if ingest else None, table, notes)
    if wall_s is not None:
        table.add("bench/gpu_all.sh wall time: s", wall_s, None, ".0f", higher_better=False)
        ok = wall_s <= TARGETS["wall_s"]
        table.lines[-1] = (*table.lines[-1][:4], f"<= {TARGETS['wall_s']:g}", "met" if ok else "NOT met")
    if env:
        notes.append(f"device: {env.get('device')}, torch {env.get('torch')}, LM preset {env.get('gpt_preset')}")
    if find(rows, source="ref", what="decode_kvcache_graphs"):
        notes.append("reference decode: greedy, no CFG mix, no VQ; visgen's: CFG 4, full-vocabulary sampling")
    notes += [f"step FAILED: {name} (see its log in {d})" for name in failed]
    return table.render(notes)


def main(argv_: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", help="path of ref_gpt.py (the plain PyTorch reference); omitted or absent: skipped")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU, eager compile backend: checks every path")
    p.add_argument("--only", action="append", choices=["train", "gen", "ref"],
                   help="run only these sections: train = (a), gen = (b), ref = (c) (the reference's training and decode)")
    p.add_argument("--cfg-scale", type=float, default=4.0, help="guidance scale of (b); 1 turns CFG off")
    p.add_argument("--vq-channels-last", action="store_true", help="run the VQ decoder in channels_last memory format")
    p.add_argument("--dropout", type=float, help="training dropout (default: the preset's, 0.1; 0 matches the reference)")
    p.add_argument("--prompts", help="comma-separated prompt counts of (b) and (c) (default 8,64,256)")
    p.add_argument("--compile-mode", help="VisGPT.compile_decode mode of (b) (default reduce-overhead: CUDA graphs; "
                   "or max-autotune-no-cudagraphs, default, ...)")
    p.add_argument("--legacy", action="store_true", help="(b) also times the loop before the captured step, with "
                   "only forward_step compiled (bench/lm_decode.py keeps it): the before/after in one process")
    p.add_argument("--report", metavar="DIR", help="measure nothing: print bench/gpu_all.sh's one table from the "
                   "outputs in DIR (gpu_lm.jsonl, serve_load.log, ingest.log)")
    p.add_argument("--wall-s", type=float, help="with --report: the whole check's wall time, against its target")
    p.add_argument("--failed", default="", help="with --report: comma-separated steps that failed")
    p.add_argument("--train-steps", type=int, help="timed training steps (default 20)")
    p.add_argument("--gen-repeats", type=int, help="timed generations per setting; the median counts (default 3)")
    p.add_argument("--jsonl", default=os.path.join(os.environ["OUT"], "gpu_lm.jsonl") if os.environ.get("OUT") else None,
                   help="also append the JSON lines here (default: $OUT/gpu_lm.jsonl when $OUT is set)")
    args = p.parse_args(argv_)
    if args.report:
        for line in report(args.report, args.wall_s, [f for f in args.failed.split(",") if f]):
            print(line)
        return []

    import torch

    s = DRY if args.dry_run else Sizes()
    if args.train_steps:
        s = replace(s, train_steps=args.train_steps)
    if args.gen_repeats:
        s = replace(s, gen_repeats=args.gen_repeats)
    if args.prompts:
        try:
            prompts = tuple(int(v) for v in args.prompts.split(","))
        except ValueError:
            p.error(f"--prompts must be comma-separated integers like 8,64, got {args.prompts!r}")
        if not prompts or min(prompts) < 1:
            p.error(f"--prompts needs counts >= 1, got {args.prompts!r}")
        s = replace(s, prompts=prompts)
    if args.dropout is not None:
        s = replace(s, dropout=args.dropout)
    if args.compile_mode:
        s = replace(s, compile_mode=args.compile_mode)
    if args.dry_run:
        device = "cpu"
        torch.set_num_threads(1)  # tiny shapes: a second thread only adds OpenMP waits on a shared CPU
    elif not torch.cuda.is_available():
        p.error("no CUDA device: this benchmark measures a GPU (torch.cuda.is_available() is False). "
                "Run it on a GPU machine, or use --dry-run to check every code path on CPU at tiny sizes.")
    else:
        device = "cuda"
        torch.backends.cuda.matmul.allow_tf32 = True  # as the reference sets at import: same fp32 matmul rules
        torch.backends.cudnn.allow_tf32 = True
    only = set(args.only or ("train", "gen", "ref"))
    notes: list[str] = ["dry run: tiny sizes on CPU; the numbers only show that every path runs"] if args.dry_run else []

    ref = None
    if "ref" in only:
        if not args.ref:
            notes.append("reference skipped: no --ref PATH given")
        elif not os.path.isfile(args.ref):
            notes.append(f"reference skipped: {args.ref} does not exist")
        else:
            ref = load_ref(args.ref)
    for n in notes:
        print(f"NOTE: {n}", flush=True)

    record = Recorder(args.jsonl)
    record(what="env", device=torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
           torch=torch.__version__, gpt_preset=s.gpt_preset, vq_preset=s.vq_preset, dry_run=args.dry_run,
           compile_mode=s.compile_mode, compile_backend=s.compile_backend,
           decode_target_prompts=list(s.decode_target_prompts), images_target_prompts=s.images_target_prompts)
    t_start = time.perf_counter()
    # Training first (ours, then the reference's), the decode compiles after.
    if "train" in only:
        for compiled in (False, True):
            bench_train(s, device, compiled, record)
    if ref is not None:
        if args.dry_run:
            check_ref_on_cpu(ref, record)
        else:
            bench_ref_train(ref, record)
    if "gen" in only:
        bench_generate(s, device, args.cfg_scale, record, args.vq_channels_last, legacy=args.legacy)
    if ref is not None and not args.dry_run:
        bench_ref_decode(ref, s, record)
    if ref is not None:
        notes.append("reference decode: greedy, no CFG mixing, no VQ decode, 64 prompt tokens; "
                     "visgen's includes CFG mixing and sampling (VQ time reported separately)")
    notes.append("visgen MFU counts the FLOPs the loss executes (flops_per_token): the output head only at the "
                 "positions that predict a token, against that modality's rows (half t2i, half i2t batches)")
    record(what="elapsed", seconds=time.perf_counter() - t_start)
    for text in summary_table(record, s, notes):
        print(text)
    return record.rows


if __name__ == "__main__":
    # A bare GPU machine may have the repository without visgen installed: import it from here.
    if importlib.util.find_spec("visgen") is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
