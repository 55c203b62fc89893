"""`visgen data pack`: folders, ImageFolder trees and parquet files → shards that ingest reads back.

Images are drawn here (gradients and stripes, not the shapes generator), captions are English and
Chinese. Every packed output is read back by the project's own ingest (``build_dataset``).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visgen.cli import build_parser, pack_fields
from visgen.config import SpecError, validate_section
from visgen.data.ingest import IngestConfig, build_dataset, quarantine_table
from visgen.data.pack import MANIFEST_NAME, PackConfig, PackError, pack, plan


def picture(seed: int, size=(40, 36)) -> Image.Image:
    """A gradient with stripes: different for every seed, nothing like a shapes scene."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = rng.integers(0, 256, 3)
    stripes = ((x + y * int(rng.integers(1, 4))) // int(rng.integers(3, 7)) % 2) * 60
    img = (base[None, None, :] * (x[..., None] / w) + stripes[..., None]).clip(0, 255).astype(np.uint8)  # (H, W, 3)
    return Image.fromarray(img, "RGB")


def encoded(seed: int, fmt: str, size=(40, 36), mode="RGB") -> bytes:
    buf = io.BytesIO()
    picture(seed, size).convert(mode).save(buf, fmt)
    return buf.getvalue()


def ingest_back(out: Path, tmp_path: Path) -> dict[str, dict]:
    """Read ``out`` with the project's ingest: {key: row}; ingest must quarantine nothing."""
    q = tmp_path / f"ingest-q-{out.name}"
    cfg = IngestConfig(source=str(out), resolution=16, min_size=16, batch_size=8)
    rows = {r["key"]: r for r in build_dataset(cfg, None, str(q)).take_all()}
    assert quarantine_table(str(q)).num_rows == 0
    return rows


def captions_of(rows: dict[str, dict]) -> dict[str, list[str]]:
    """{source: sorted captions} from ingested rows (the source is in each sample's .json)."""
    out: dict[str, list[str]] = {}
    for r in rows.values():
        out.setdefault(json.loads(r["json"])["source"], []).append(r["caption"])
    return {k: sorted(v) for k, v in out.items()}


# -- (a) a folder of images + a captions file ------------------------------------------------------

@pytest.fixture
def captioned(tmp_path):
    src = tmp_path / "photos"
    (src / "sub").mkdir(parents=True)
    (src / "a.jpg").write_bytes(encoded(1, "JPEG"))
    (src / "b.png").write_bytes(encoded(2, "PNG", mode="RGBA"))
    (src / "sub" / "c.webp").write_bytes(encoded(3, "WEBP"))
    (src / "d.jpg").write_bytes(encoded(4, "JPEG"))
    good_jpeg = encoded(5, "JPEG", size=(64, 64))
    (src / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (src / "empty.jpg").write_bytes(b"")
    (src / "garbage.png").write_bytes(b"this is not an image at all" * 4)
    (src / "tiny.png").write_bytes(encoded(6, "PNG", size=(10, 12)))
    (src / "old.bmp").write_bytes(encoded(7, "BMP"))
    (src / "not-captioned.jpg").write_bytes(encoded(8, "JPEG"))
    rows = [
        {"file_name": "a.jpg", "caption": "a warm gradient", "language": "en"},
        {"file_name": "a.jpg", "caption": "暖色渐变"},                       # a second caption: a second sample
        {"file_name": "b.png", "text": None, "caption": ["blue stripes", "蓝色条纹"]},  # a list: one sample each
        {"file_name": "sub/c", "caption": "a key, not a path"},               # by key (path without extension)
        {"file_name": "d.jpg", "caption": "   "},                             # caption_empty, as ingest says
        {"file_name": "truncated.jpg", "caption": "cut in half"},
        {"file_name": "empty.jpg", "caption": "zero bytes"},
        {"file_name": "garbage.png", "caption": "text bytes"},
        {"file_name": "tiny.png", "caption": "too small"},
        {"file_name": "old.bmp", "caption": "a format ingest does not read"},
    ]
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    cfg = PackConfig(source=str(src), output=str(tmp_path / "out-a"), captions=str(captions), shard_size=4,
                     min_size=16, shuffle=False)  # sorted input order: the keys below are predictable
    return cfg, src


def test_captions_folder_quarantine_noop_and_repack(ray_session, captioned, tmp_path):
    cfg, src = captioned
    report = pack(cfg)
    out = Path(cfg.output)
    assert report.planned == 11 and report.kept == 5 and not report.skipped
    assert [Path(s).name for s in report.shards] == ["00000.tar", "00001.tar", "00002.tar"]
    for name in ("00000", "00001", "00002"):
        assert (out / f"{name}_stats.json").is_file() and (out / f"{name}.parquet").is_file()
    assert report.quarantined == {"image_decode_error": 4, "image_too_small": 1, "caption_empty": 1}

    rows = ingest_back(out, tmp_path)
    assert captions_of(rows) == {"a.jpg": ["a warm gradient", "暖色渐变"], "b.png": ["blue stripes", "蓝色条纹"],
                                 "sub/c.webp": ["a key, not a path"]}
    meta = {json.loads(r["json"])["caption"]: json.loads(r["json"]) for r in rows.values()}
    assert meta["暖色渐变"]["language"] == "zh" and meta["blue stripes"]["language"] == "en"
    assert meta["a warm gradient"]["width"] == 40 and meta["a warm gradient"]["height"] == 36
    # Sorted input order: a.jpg's two captions are the first two samples, keys follow img2dataset.
    assert sorted(rows)[:2] == ["000000000", "000000001"]
    with tarfile.open(out / "00000.tar") as tar:
        names = tar.getnames()
    assert names[:3] == ["000000000.jpg", "000000000.txt", "000000000.json"] and "000000002.png" in names

    q = {(r["detail"].split(":")[0], r["reason"]) for r in quarantine_table(cfg.quarantine).to_pylist()}
    assert q == {("truncated.jpg", "image_decode_error"), ("empty.jpg", "image_decode_error"),
                 ("garbage.png", "image_decode_error"), ("old.bmp", "image_decode_error"),
                 ("tiny.png", "image_too_small"), ("d.jpg", "caption_empty")}
    assert "pack: 5 samples kept, 6 quarantined" in report.format() and cfg.quarantine in report.format()

    # Same inputs and options: nothing is written again.
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    again = pack(cfg.model_copy(update={"cpus_per_shard": 0.5}))  # scheduling is not content
    assert again.skipped and again.written == 0 and again.kept == 5 and "nothing to do" in again.format()
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == mtimes

    # A changed image re-packs; so does a changed option. Old shards of the larger plan go away.
    time.sleep(0.01)
    (src / "b.png").write_bytes(encoded(22, "PNG"))
    changed = pack(cfg)
    assert not changed.skipped and changed.written == 3
    bigger = pack(cfg.model_copy(update={"shard_size": 20}))
    assert bigger.written == 1 and sorted(p.name for p in out.glob("*.tar")) == ["00000.tar"]
    assert len(quarantine_table(cfg.quarantine)) == 6  # the old pass's quarantine rows were replaced
    assert json.loads((out / MANIFEST_NAME).read_text())["complete"]


# -- (b) an ImageFolder tree -----------------------------------------------------------------------

def test_imagefolder_templates_labels_and_reencoding(ray_session, tmp_path):
    src = tmp_path / "tree"
    for c, cls in enumerate(["golden_retriever", "tabby_cat"]):
        (src / cls / "more").mkdir(parents=True)
        (src / cls / "x.png").write_bytes(encoded(10 + c, "PNG"))
        (src / cls / "more" / "y.webp").write_bytes(encoded(20 + c, "WEBP"))
    (src / "tabby_cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"golden_retriever": {"zh": "金毛犬"}, "tabby_cat": {"en": "tabby", "zh": "虎斑猫"}},
                                 ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "out-b"
    cfg = PackConfig(source=str(src), output=str(out), labels=str(labels), image_format="jpg", shard_size=5,
                     templates={"en": "a photo of a {label}", "zh": "一张{label}的照片"})
    report = pack(cfg)
    assert report.planned == 10 and report.kept == 8 and report.quarantined == {"image_decode_error": 2}

    rows = ingest_back(out, tmp_path)
    assert captions_of(rows) == {
        "golden_retriever/more/y.webp": ["a photo of a golden retriever", "一张金毛犬的照片"],
        "golden_retriever/x.png": ["a photo of a golden retriever", "一张金毛犬的照片"],
        "tabby_cat/more/y.webp": ["a photo of a tabby", "一张虎斑猫的照片"],
        "tabby_cat/x.png": ["a photo of a tabby", "一张虎斑猫的照片"]}
    meta = [json.loads(r["json"]) for r in rows.values()]
    assert {(m["class"], m["label_index"], m["language"]) for m in meta if m["label"] == "虎斑猫"} == {("tabby_cat", 1, "zh")}
    with tarfile.open(out / "00000.tar") as tar:  # PNG and WebP re-encoded as JPEG
        assert {n.rsplit(".", 1)[1] for n in tar.getnames()} == {"jpg", "txt", "json"}


# -- (c) a Hugging Face style parquet, through the real entry point ---------------------------------

@pytest.mark.slow
def test_cli_packs_a_parquet_end_to_end(ray_session, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from visgen.cli import main

    images = [{"bytes": encoded(30 + i, "JPEG" if i % 2 else "PNG"), "path": f"img{i}"} for i in range(5)]
    images[3] = {"bytes": b"\x89PNG\r\n\x1a\n broken", "path": "broken.png"}
    texts = ["a green ramp", "一条绿色的渐变", "red and black bars", "never written", "灰色的条纹"]
    table = pa.table({"id": list(range(5)), "image": images, "text": texts})
    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(table, path, row_group_size=2)
    out = tmp_path / "out-c"

    # The real entry point, in its own process, joining the test session's Ray cluster.
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    done = subprocess.run([sys.executable, "-m", "visgen.cli", "data", "pack", str(path), "--out", str(out),
                           "--shard-size", "2"], capture_output=True, text=True,
                          timeout=180, env=env)
    assert done.returncode == 0, done.stderr
    assert "pack: 4 samples kept, 1 quarantined, of 5 planned, in 3 shard(s)" in done.stdout
    assert "image_decode_error" in done.stdout

    rows = ingest_back(out, tmp_path)
    assert captions_of(rows) == {f"{path.name}#{i}": [t] for i, t in enumerate(texts) if i != 3}
    assert {json.loads(r["json"])["language"] for r in rows.values()} == {"en", "zh"}

    # The same command again (in this process: the parser start-up is the cost) is a no-op.
    assert main(["data", "pack", str(path), "--out", str(out), "--shard-size", "2"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    for argv, expected in [
        ((str(tmp_path / "nope"), "--out", str(out)), "nope' does not exist"),
        ((str(path), "--out", str(out), "--text-column", "caption"), "no column 'caption'"),
        ((str(path), "--out", str(out), "--template", "no placeholder"), "no placeholder"),
    ]:
        assert main(["data", "pack", *argv]) == 2
        assert expected in capsys.readouterr().err


# -- without Ray: planning, errors, flags ----------------------------------------------------------

def test_bad_inputs_name_the_problem_and_the_value(tmp_path):
    def fails(match: str, **kw):
        cfg = PackConfig(**{"source": str(src), "output": str(tmp_path / "out"), **kw})
        with pytest.raises(PackError, match=match):
            plan(cfg)

    src = tmp_path / "imgs"
    src.mkdir()
    fails(r"no class folders and no images", layout="imagefolder")
    (src / "a.jpg").write_bytes(encoded(1, "JPEG"))
    fails(r"1 image file\(s\) and no captions file: pass --captions")
    fails(r"SRC '.*missing' does not exist", source=str(tmp_path / "missing"))

    captions = tmp_path / "c.csv"
    captions.write_text("path,caption\na.jpg,ok\nb.jpg,gone\nc/d.png,also gone\n", encoding="utf-8")
    fails(r"names 2 image\(s\) not found under SRC.*c.csv:3: 'b.jpg'; c.csv:4: 'c/d.png'", captions=str(captions))
    fails(r"no column 'words' \(the text column\); its columns are: 'path', 'caption'",
          captions=str(captions), text_column="words")
    captions.write_text("picture,words\na.jpg,x\n", encoding="utf-8")
    fails(r"cannot tell which column holds the image .* columns are: 'picture', 'words'", captions=str(captions))
    fails(r"captions file '.*nothere.jsonl' does not exist", captions=str(tmp_path / "nothere.jsonl"))

    empty = tmp_path / "empty-classes"
    (empty / "cat").mkdir(parents=True)
    fails(r"gives no samples", source=str(empty))

    with pytest.raises(SpecError, match=r"templates: .*'a {name}'.*no '\{label\}' placeholder"):
        validate_section(PackConfig, {"source": "x", "output": "y", "templates": {"en": "a {name}"}})


def test_parquet_class_labels_become_captions_through_templates(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    hf = {"info": {"features": {"img": {"_type": "Image"},
                                "label": {"_type": "ClassLabel", "names": ["angular_leaf_spot", "healthy"]}}}}
    table = pa.table({"img": [encoded(i, "PNG") for i in range(3)], "label": [1, 0, 1]})
    table = table.replace_schema_metadata({b"huggingface": json.dumps(hf).encode()})
    path = tmp_path / "beans.parquet"
    pq.write_table(table, path)
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"healthy": {"zh": "健康的叶子"}}, ensure_ascii=False), encoding="utf-8")
    p = plan(PackConfig(source=str(path), output=str(tmp_path / "o"), labels=str(labels), shuffle=False,
                        templates={"en": "a photo of a {label} leaf", "zh": "一张{label}的照片"}))
    assert p.layout == "parquet"
    assert [(s.source, s.caption, s.language) for s in p.samples[:4]] == [
        ("beans.parquet#0", "a photo of a healthy leaf", "en"), ("beans.parquet#0", "一张健康的叶子的照片", "zh"),
        ("beans.parquet#1", "a photo of a angular leaf spot leaf", "en"),
        ("beans.parquet#1", "一张angular leaf spot的照片", "zh")]
    with pytest.raises(PackError, match=r"column 'label' is int64, not image bytes"):
        plan(PackConfig(source=str(path), output=str(tmp_path / "o"), image_column="label"))


def test_every_pack_flag_reaches_its_field(tmp_path):
    argv = ["data", "pack", "SRC", "--out", "OUT", "--layout", "captions", "--captions", "c.jsonl",
            "--labels", "l.json", "--template", "a {label}", "--template-zh", "{label}的照片",
            "--image-column", "img", "--text-column", "txt", "--language-column", "lng", "--shard-size", "7",
            "--no-shuffle", "--shuffle-seed", "5",
            "--image-format", "webp", "--jpeg-quality", "80", "--min-size", "9", "--max-image-pixels", "1000",
            "--max-member-bytes", "2048", "--quarantine", "Q", "--cpus-per-shard", "0.25"]
    args = build_parser().parse_args(argv)
    cfg = validate_section(PackConfig, pack_fields(args))
    assert cfg.model_dump() == {
        "source": "SRC", "output": "OUT", "layout": "captions", "captions": "c.jsonl", "labels": "l.json",
        "templates": {"en": "a {label}", "zh": "{label}的照片"}, "image_column": "img", "text_column": "txt",
        "language_column": "lng", "shard_size": 7, "shuffle": False, "shuffle_seed": 5, "image_format": "webp", "jpeg_quality": 80, "min_size": 9,
        "max_image_pixels": 1000, "max_member_bytes": 2048, "quarantine_dir": "Q", "cpus_per_shard": 0.25}
    defaults = validate_section(PackConfig, pack_fields(build_parser().parse_args(["data", "pack", "S", "--out", "O"])))
    assert defaults == PackConfig(source="S", output="O")


def test_images_are_shuffled_with_their_captions_kept_together(tmp_path):
    """A class-sorted ImageFolder: shuffled, every image's two captions stay adjacent (one shard), the
    last shard holds more than the last class, the same seed gives the same plan; --no-shuffle
    keeps the sorted order."""
    from visgen.data.pack import plan

    src = tmp_path / "src"
    for label in ("cat", "dog", "fox"):
        (src / label).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (40, 40), (40 * i, 0, 0)).save(src / label / f"{i}.png")
    templates = {"en": "a photo of a {label}", "zh": "一张{label}的照片"}
    base = dict(source=str(src), output=str(tmp_path / "o"), templates=templates)
    shuffled = plan(PackConfig(**base)).samples
    ordered = plan(PackConfig(**base, shuffle=False)).samples
    assert [s.source for s in ordered] == sorted(s.source for s in ordered)
    assert sorted(s.source for s in shuffled) == sorted(s.source for s in ordered)
    assert [s.source for s in shuffled] != [s.source for s in ordered]
    pairs = [(shuffled[i], shuffled[i + 1]) for i in range(0, len(shuffled), 2)]
    assert all(a.source == b.source and (a.language, b.language) == ("en", "zh") for a, b in pairs)
    last_shard = {s.extra["class"] for s in shuffled[-12:]}  # shard_size 12: the last of three
    assert len(last_shard) > 1, last_shard
    assert [s.source for s in plan(PackConfig(**base)).samples] == [s.source for s in shuffled]
    assert [s.source for s in plan(PackConfig(**base, shuffle_seed=1)).samples] != [s.source for s in shuffled]
