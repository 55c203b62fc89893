"""bench/lm_curve.py end to end on a tiny work directory: the curve's JSON lines, Muon, the condition gain."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tests.bundles import captions
from visgen.models.vq import VQModel, save_vq, vq_config
from visgen.text.tokenizer import TextTokenizerConfig, train_text_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _load_script():
    spec = importlib.util.spec_from_file_location("lm_curve", ROOT / "bench" / "lm_curve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _workdir(root: Path) -> Path:
    torch.manual_seed(0)
    vq = VQModel(vq_config("tiny")).eval()
    save_vq(vq, root / "models" / "image_tokenizer")
    caps = captions(96)
    tok = train_text_tokenizer(caps, TextTokenizerConfig(vocab_size=400, min_frequency=1))
    tok.save(root / "text_tokenizer.json")
    n_image = vq.grid_shape[0] * vq.grid_shape[1]
    rng = np.random.default_rng(0)
    for split, rows in (("train", caps[:64]), ("holdout", caps[64:])):
        (root / "token_cache" / split).mkdir(parents=True)
        table = pa.table({"text_ids": [tok.encode(c)[:16] for c in rows],
                          "image_ids": rng.integers(0, vq.num_codes, (len(rows), n_image)).tolist(),
                          "caption": rows})
        pq.write_table(table, root / "token_cache" / split / "part-0.parquet")
    return root


def test_curve_prints_scores_and_condition_gain_with_muon(tmp_path, capsys):
    work = _workdir(tmp_path / "work")
    rc = _load_script().main(["--workdir", str(work), "--preset", "tiny", "--steps", "4", "--eval-every", "2",
                              "--batch-size", "8", "--warmup", "1", "--max-text-tokens", "16", "--optimizer", "muon",
                              "--prompts-per-task", "1", "--captions", "4", "--threads", "1"])
    assert rc == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert lines[0]["config"]["optimizer"] == "muon"
    points = lines[1:]
    assert [p["step"] for p in points] == [2, 4]
    for p in points:
        for key in ("loss", "t2i_loss", "i2t_loss", "t2i_gain_nats", "i2t_gain_nats", "caption_slot_accuracy"):
            assert math.isfinite(p[key]), (key, p)
        assert 0 <= p["val"]["cfg3_t1_k0"]["overall"] <= 1
