"""The transformer benchmarks run end to end at tiny sizes, so that they cannot rot unnoticed.

bench/ is not a package: each script is imported from its path.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
# The reference GPT lives beside the repository, not in it: <repo>/../shared/bench/ref_gpt.py.
REF = str(REPO.parent / "shared" / "bench" / "ref_gpt.py")
NO_REF = f"the reference GPT {REF} (../shared/bench/ref_gpt.py from the repository root) is absent"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _summary(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])["summary"]


TINY = ["--preset", "tiny", "--grid", "4x4", "--text-vocab", "64", "--codebook", "32", "--max-text-tokens", "8"]


def test_lm_decode_cache_matches_full_recompute(capsys):
    s = _load("lm_decode").main([*TINY, "--batch-size", "2", "--repeats", "2"])
    out = capsys.readouterr().out
    assert _summary(out) == s
    assert s["codes_identical"] and s["codes_differing"] == 0
    assert s["image_tokens"] == 16 and s["rows"] == 4  # CFG doubles the rows
    assert s["cache_ms_per_token"] > 0 and s["nocache_ms_per_token"] > 0 and s["speedup"] > 0
    assert "cache / nocache speed-up" in out


def test_lm_decode_without_cfg_and_bad_grid(capsys):
    mod = _load("lm_decode")
    s = mod.run(preset="tiny", batch_size=1, cfg_scale=1.0, repeats=1, text_vocab=64, codebook=32,
                max_text_tokens=8, grid=(2, 3), emit=lambda line: None)
    assert s["rows"] == 1 and s["image_tokens"] == 6 and s["codes_identical"]
    with pytest.raises(SystemExit):
        mod.main([*TINY[:2], "--grid", "16by16"])
    assert "grid must look like 16x16" in capsys.readouterr().err


def test_lm_feed_trainer_steps_on_ray_shaped_batches():
    from visgen.models.gpt import gpt_config
    from visgen.train.config import TrainConfig

    feed = _load("lm_feed")
    cfg = gpt_config("tiny", text_vocab=64, codebook_size=32, max_text_tokens=8, grid=(2, 2))
    trainer = feed.Trainer(cfg, TrainConfig(steps=4, batch_size=4, schedule="constant"), "cpu")
    # Ray Data yields list<int32> columns as object arrays of int32 arrays.
    from visgen.text.tokenizer import SPECIAL_TOKENS

    first = len(SPECIAL_TOKENS)  # the first id that is not a special token
    rows = [np.array(t, np.int32) + first for t in ([0, 1], [2], [3, 4, 5], [6])]
    batch = {"text_ids": np.empty(4, dtype=object), "image_ids": np.empty(4, dtype=object)}
    for i, t in enumerate(rows):
        batch["text_ids"][i], batch["image_ids"][i] = t, np.array([0, 1, 2, 3], np.int32)
    before = trainer.model.head.weight.detach().clone()
    losses = [trainer.step(batch, step) for step in range(2)]
    assert all(np.isfinite(losses)) and not torch.equal(before, trainer.model.head.weight)


@pytest.mark.slow  # Ray Data passes over the cache and 4 feeds x 4 steps: ~30 s on two busy cores
def test_lm_feed_every_feed_against_the_device(ray_session, capsys):
    feed = _load("lm_feed")
    s = feed.main([*TINY, "--batch-size", "4", "--steps", "4", "--warmup", "1", "--repeats", "1", "--files", "2",
                   "--log-every", "2", "--device", "cpu"])
    out = capsys.readouterr().out
    assert _summary(out) == s
    runs = [json.loads(line) for line in out.splitlines() if line.startswith('{"feed"')]
    assert [r["feed"] for r in runs] == ["device", "host", "memory", "stream"]
    assert all(r["steps_per_s"] > 0 and np.isfinite(r["loss"]) for r in runs)
    # The token cache fits the default limit: data_in_memory=auto picks the in-memory feed.
    assert s["live_feed"] == "memory" and s["ratio"] == s["memory_over_device"]
    assert s["ratio"] == round(s["memory_steps_per_s"] / s["device_steps_per_s"], 3)
    assert s["rows"] == 16 and s["batches_per_epoch"] == 4 and s["seq_len"] == 16 + 9 + 4
    assert s["memory_feed_only_batches_per_s"] > 0 and s["stream_feed_only_batches_per_s"] > 0
    assert "live (memory) / device" in out


@pytest.mark.slow
def test_lm_feed_dry_run_and_feed_subsets(ray_session, capsys):
    feed = _load("lm_feed")
    # --rows 56: not the dry run's default (6 steps x batch 8 = 48), and one pass of 7 batches holds
    # the 6 steps, so the stream feed starts one Ray Data pass per run (20 rows took three, ~2.5 s
    # each). Streaming over several passes is tested in tests/test_train_feed.py
    # (test_the_transformer_trains_on_either_feed[stream] and
    # test_feed_collates_in_a_thread_with_the_step_and_marks_epochs).
    s = feed.main(["--dry-run", "--device", "cpu", "--feeds", "device,stream", "--rows", "56"])
    runs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"feed"')]
    assert [r["feed"] for r in runs] == ["device", "stream"] and s["preset"] == "tiny"
    assert s["rows"] == 56 and s["live_feed"] == "stream"  # auto would pick memory, which did not run
    with pytest.raises(SystemExit):
        feed.main(["--dry-run", "--feeds", "device,disk"])
    assert "feeds must be a comma-separated subset" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.slow
def test_lm_feed_dry_run_on_cuda(ray_session):
    s = _load("lm_feed").main(["--dry-run", "--device", "cuda"])
    assert s["device"] == "cuda" and s["ratio"] > 0


def test_lm_feed_token_cache_schema(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    feed = _load("lm_feed")
    feed.write_token_cache(str(tmp_path), rows=10, files=3, text_vocab=64, codebook=32, n_image=4, max_text_tokens=8)
    table = pq.read_table(tmp_path)
    assert table.num_rows == 10 and len(list(tmp_path.glob("*.parquet"))) == 3
    assert table.schema.field("text_ids").type == pa.list_(pa.int32())
    assert table.schema.field("image_ids").type == pa.list_(pa.int32())
    text, image = table.column("text_ids").to_pylist(), table.column("image_ids").to_pylist()
    assert all(4 <= len(t) <= 8 and min(t) >= 8 and max(t) < 64 for t in text)  # no specials, fits the text slots
    assert all(len(i) == 4 and 0 <= min(i) and max(i) < 32 for i in image)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_bench_refuses_to_run_without_a_gpu(capsys):
    with pytest.raises(SystemExit) as e:
        _load("gpu_lm").main([])
    assert e.value.code == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_gpu_bench_dry_run(tmp_path, capsys):
    gpu = _load("gpu_lm")
    ref = [] if not os.path.isfile(REF) else ["--ref", REF]
    rows = gpu.main(["--dry-run", "--jsonl", str(tmp_path / "out.jsonl"), *ref])
    out = capsys.readouterr().out
    train = [r for r in rows if r.get("source") == "visgen" and r.get("what") == "train"]
    gen = [r for r in rows if r.get("source") == "visgen" and r.get("what") == "generate"]
    assert [r["compiled"] for r in train] == [False, True]
    assert {(r["mode"], r["prompts"]) for r in gen} == {(m, p) for m in ("eager", "compiled") for p in (1, 2)}
    assert all(r["images_per_s"] > 0 and r["lm_s"] > 0 and r["vq_s"] > 0 for r in gen)
    # Same seeds, fp32 on CPU: the compiled step samples the very codes the eager one does.
    assert all(r["codes_equal_eager"] == 1.0 for r in gen if r["mode"] == "compiled")
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == len(rows)
    assert "train compiled: MFU" in out and "decode 2 prompts x2 CFG, compiled" in out
    if ref:
        assert any(r.get("what") == "interface_check" and r["ok"] for r in rows)


def test_gpu_bench_notes_a_missing_reference(tmp_path, capsys):
    rows = _load("gpu_lm").main(["--dry-run", "--only", "ref", "--ref", str(tmp_path / "absent.py")])
    out = capsys.readouterr().out
    assert f"reference skipped: {tmp_path / 'absent.py'} does not exist" in out
    assert not [r for r in rows if r.get("source")]  # nothing was measured


@pytest.mark.skipif(not os.path.isfile(REF), reason=NO_REF)
def test_gpu_bench_loads_the_reference():
    gpu = _load("gpu_lm")
    ref = gpu.load_ref(REF)
    rec = gpu.Recorder(None)
    gpu.check_ref_on_cpu(ref, rec)
    assert rec.rows[-1]["ok"]
