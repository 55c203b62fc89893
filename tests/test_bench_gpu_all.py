"""bench/gpu_all.sh, the one command for the GPU check: its dry run and its table of targets.

The serve and ingest steps start Ray and are left to ``bash bench/gpu_all.sh --dry-run`` (about two
minutes); here the script runs its transformer step and the table, and the table's target logic is
checked on made-up outputs of every step.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_all.sh"


def _gpu_lm():
    spec = importlib.util.spec_from_file_location("bench_gpu_lm_all", ROOT / "bench" / "gpu_lm.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _bash(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def test_script_parses_and_refuses_unknown_arguments():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    assert "--dry-run" in _bash("--help").stdout
    bad = _bash("--fast")
    assert bad.returncode == 2 and "unknown argument --fast" in bad.stderr
    bad = _bash("--only", "lm,train")
    assert bad.returncode == 2 and "unknown step 'train'" in bad.stderr


def test_dry_run_of_the_transformer_step_prints_the_table(tmp_path):
    """The script end to end on CPU: bench/gpu_lm.py's generation path (captured step compiled with
    the eager backend, and the legacy loop), then the report; flags reach the benchmark's fields."""
    out = tmp_path / "out"
    r = _bash("--dry-run", "--only", "lm", "--legacy",
              env={"OUT": str(out), "OMP_NUM_THREADS": "1",
                   "GPU_LM_ARGS": "--only gen --prompts 1 --compile-mode max-autotune-no-cudagraphs"})
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [json.loads(line) for line in (out / "gpu_lm.jsonl").read_text().splitlines()]
    env = rows[0]
    assert env["what"] == "env" and env["dry_run"] and env["compile_mode"] == "max-autotune-no-cudagraphs"
    gen = {(row["what"], row["mode"]): row for row in rows if row.get("what", "").startswith("generate")}
    assert set(gen) == {("generate", "eager"), ("generate", "compiled"), ("generate_legacy", "legacy")}
    assert all(row["prompts"] == 1 and row["ms_per_step"] > 0 for row in gen.values())
    # Same seeds, fp32 on CPU: the compiled step and the old loop sample the codes eager does.
    assert gen[("generate", "compiled")]["codes_equal_eager"] == 1.0
    assert gen[("generate_legacy", "legacy")]["codes_equal_eager"] == 1.0
    table = (out / "table.txt").read_text()
    assert table == r.stdout[r.stdout.index("\nmeasurement"):]
    assert "decode 1 prompts x2 CFG, compiled: ms/step" in table and "before (fwd compiled)" in table
    assert "bench/gpu_all.sh wall time: s" in table and "note: dry run" in table


def _write_outputs(d: Path, *, images_per_s: float, serve_ratio: float | None) -> None:
    lm = [
        {"what": "env", "device": "NVIDIA H200", "torch": "2.x", "gpt_preset": "base", "dry_run": False,
         "decode_target_prompts": [8, 64], "images_target_prompts": 64},
        {"source": "visgen", "what": "train", "compiled": False, "tokens_per_s": 450_000.0, "mfu": 0.27},
        {"source": "visgen", "what": "train", "compiled": True, "tokens_per_s": 700_000.0, "mfu": 0.41},
        {"source": "ref", "what": "train", "compiled": False, "tokens_per_s": 472_328.0, "mfu": 0.29},
        {"source": "ref", "what": "train", "compiled": True, "tokens_per_s": 549_255.0, "mfu": 0.366},
    ]
    for p, ours, ref in ((8, 0.70, 0.75), (64, 1.5, 1.369), (256, 4.0, 4.2)):
        lm.append({"source": "visgen", "what": "generate", "mode": "compiled", "prompts": p, "rows": 2 * p,
                   "ms_per_step": ours, "lm_images_per_s": 2.0 * p, "images_per_s": images_per_s if p == 64 else 9.0,
                   "image_px": [256, 256]})
        lm.append({"source": "ref", "what": "decode_kvcache_graphs", "prompts": p, "batch": 2 * p,
                   "ms_per_step": ref, "images_per_s": 3.0 * p})
    (d / "gpu_lm.jsonl").write_text("".join(json.dumps(row) + "\n" for row in lm))
    serve = ["deploying...", json.dumps({"mode": "batched", "max_batch_size": 64, "concurrency": 64,
                                         "images_per_s": 150.0})]
    if serve_ratio is not None:
        serve.append(json.dumps({"concurrency": 64, "serve_images_per_s": 160.0 * serve_ratio,
                                 "pipeline_images_per_s": 160.0, "serve_over_pipeline": serve_ratio}))
    (d / "serve_load.log").write_text("\n".join(serve) + "\n")
    (d / "ingest.log").write_text("16 shards ...\n" + json.dumps({"cpus": 16, "images": 8000, "a_over_b": 1.12,
                                                                  "a_over_c": 0.71}) + "\n")


def _status(lines: list[str], name: str) -> str:
    """'met', 'NOT met', or '-' (no target, or nothing to judge) of the first line starting with ``name``."""
    line = next(line for line in lines if line.startswith(name)).rstrip()
    return "NOT met" if line.endswith("NOT met") else "met" if line.endswith("met") else "-"


def test_report_marks_each_target(tmp_path):
    gpu = _gpu_lm()
    _write_outputs(tmp_path, images_per_s=231.0, serve_ratio=0.85)
    lines = gpu.report(str(tmp_path), wall_s=455.0)
    text = "\n".join(lines)
    assert _status(lines, "train eager: tokens/s") == "met"  # 450k / 472k = 0.95 >= 0.9
    assert _status(lines, "train compiled: MFU") == "met"  # 0.41 >= 0.40
    assert _status(lines, "decode 8 prompts x2 CFG, compiled") == "met"  # 0.70 <= 0.75 ms
    assert _status(lines, "decode 64 prompts x2 CFG, compiled") == "NOT met"  # 1.5 > 1.369 ms: "NOT met"
    assert _status(lines, "decode 256 prompts x2 CFG, compiled") == "-"  # reported, no target
    plus_vq = [line for line in lines if line.lstrip().startswith("+ VQ decode")]
    assert [line.endswith(" met") for line in plus_vq] == [False, True, False] and "231.0" in plus_vq[1]
    assert _status(lines, "serve, concurrency 64") == "met"
    assert _status(lines, "ingest 16 CPUs, visgen / webdataset") == "met"
    assert _status(lines, "ingest 16 CPUs, visgen / (tight loop") == "NOT met"  # 0.71 < 0.8
    assert _status(lines, "bench/gpu_all.sh wall time") == "met"
    assert "device: NVIDIA H200" in text and "FAILED" not in text


def test_report_without_a_serve_comparison_or_with_failed_steps(tmp_path):
    gpu = _gpu_lm()
    _write_outputs(tmp_path, images_per_s=120.0, serve_ratio=None)
    lines = gpu.report(str(tmp_path), wall_s=600.0, failed=["serve"])
    assert _status(lines, "serve / in-process Model.generate") == "-"
    assert any("printed no 'serve_over_pipeline' line" in line for line in lines)
    assert any(line.startswith("note: step FAILED: serve") for line in lines)
    assert _status(lines, "bench/gpu_all.sh wall time") == "NOT met"
    assert gpu.report(str(tmp_path / "nothing")) == gpu.Table().render([])  # no outputs: an empty table


@pytest.mark.parametrize("argv", [["--report", "DIR", "--wall-s", "12", "--failed", "lm,ingest"]])
def test_report_flags_reach_the_report(tmp_path, capsys, argv):
    _write_outputs(tmp_path, images_per_s=231.0, serve_ratio=0.9)
    argv = [str(tmp_path) if a == "DIR" else a for a in argv]
    assert _gpu_lm().main(argv) == []
    out = capsys.readouterr().out
    assert "bench/gpu_all.sh wall time: s" in out and " 12 " in out
    assert "step FAILED: lm" in out and "step FAILED: ingest" in out
