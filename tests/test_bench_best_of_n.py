"""bench/best_of_n.py on a tiny bundle and a real WebDataset shard of shapes renders: its rows are
what Model.caption / the benchmark give for each candidate count, with the ratios to one draw."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from bench import best_of_n
from tests.bundles import RESOLUTION, make_bundle
from visgen.data import shapes
from visgen.data.captions import detect_language
from visgen.data.synth import make_scene
from visgen.eval.captions import caption_metrics
from visgen.inference import Model


def _shard(path: Path, n: int = 12) -> Path:
    with wds.TarWriter(str(path)) as w:
        for i in range(n):
            scene = make_scene(shapes.TASKS[i % 6], i, resolution=RESOLUTION, language="mixed" if i % 2 else "en")
            buf = io.BytesIO()
            Image.fromarray(shapes.render(scene)).save(buf, format="PNG")
            w.write({"__key__": f"{i:06d}", "png": buf.getvalue(), "json": scene.to_json().encode()})
    return path


def test_rows_are_the_models_own_numbers_with_ratios(tmp_path, capsys):
    bundle = make_bundle(tmp_path)
    shard = _shard(tmp_path / "00000.tar")
    bench = best_of_n
    rows = bench.main(["--bundle", str(bundle), "--shard", str(shard), "--offset", "2", "--count", "8",
                       "--caption-candidates", "1,3", "--candidates", "1,2", "--limit-per-task", "1", "--threads", "1"])
    caps = [r for r in rows if r["what"] == "captions"]
    assert [r["candidates"] for r in caps] == [1, 3] and all(r["captions"] == 8 for r in caps)
    # the row for n = 3 is the slot accuracy of Model.caption(candidates=3) on renders 2..9
    images, scenes = bench.read_renders(shard, 2, 8)
    langs = [detect_language(s.caption or "") for s in scenes]
    preds = Model.load(bundle, device="cpu").caption(images, language=langs, temperature=0.0, candidates=3)
    assert caps[1]["slot_accuracy"] == pytest.approx(caption_metrics(preds, scenes, languages=langs)["slot_accuracy"],
                                                     abs=1e-4)
    imgs = [r for r in rows if r["what"] == "images"]
    assert [r["candidates"] for r in imgs] == [1, 2] and all(r["images"] == 12 for r in imgs)  # 6 tasks x 2 languages
    assert all(0.0 <= r["overall"] <= 1.0 and set(r["tasks"]) == set(shapes.TASKS) for r in imgs)
    ratios = {r["what"]: r for r in rows if r["what"].endswith("ratio")}
    assert set(ratios) == {"captions ratio", "images ratio"}
    assert ratios["captions ratio"]["candidates"] == 3 and ratios["captions ratio"]["time"] > 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == len(rows)  # one JSON line per row
    np.testing.assert_array_equal(images[0], shapes.render(make_scene(shapes.TASKS[2], 2, resolution=RESOLUTION,
                                                                      language="en")))


def test_bad_arguments_are_refused(tmp_path, capsys):
    bench = best_of_n
    with pytest.raises(SystemExit):
        bench.main(["--bundle", "x", "--caption-candidates", "1,0"])
    assert "candidate counts must be integers >= 1, got '1,0'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--bundle", "x", "--candidates", "two"])
    assert "expected comma-separated integers, got 'two'" in capsys.readouterr().err
    bundle = make_bundle(tmp_path)
    shard = _shard(tmp_path / "00000.tar", n=3)
    with pytest.raises(SystemExit, match="has 3 samples: none from offset 5"):
        bench.main(["--bundle", str(bundle), "--shard", str(shard), "--offset", "5"])
