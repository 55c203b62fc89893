"""Bad shards: the tar reader's fault handling, and one end-to-end ingest on Ray over planted faults."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from collections import Counter

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from visgen.data.ingest import IngestConfig, build_dataset, quarantine_table, read_captions, run_ingest
from visgen.data.webdataset_source import iter_tar_members, iter_tar_samples


def jpeg(color=(200, 30, 60), size=(48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def tar_bytes(members: list[tuple[str, bytes]], fmt=tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def good_members(keys) -> list[tuple[str, bytes]]:
    return [m for k in keys for m in ((f"{k}.jpg", jpeg()), (f"{k}.txt", f"caption {k}".encode()),
                                      (f"{k}.json", json.dumps({"key": k}).encode()))]


def samples(data: bytes, **kw):
    return list(iter_tar_samples(io.BytesIO(data), "x.tar", **kw))


def offsets(data: bytes) -> dict[str, int]:
    """Member name → offset of its data in the tar (from the standard library's reader)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: m.offset_data for m in tar.getmembers()}


# -- the tar reader ---------------------------------------------------------------------------

def test_reader_agrees_with_tarfile_on_long_and_unicode_names():
    names = ["a" * 120 + "/000001.jpg", "dir/ünïcødé-000002.txt", "plain/000003.json"]
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT):
        members = [(n, os.urandom(700 + i)) for i, n in enumerate(names)
                   if fmt != tarfile.USTAR_FORMAT or len(n.encode()) <= 100]
        assert list((n, d) for n, d, _ in iter_tar_members(io.BytesIO(tar_bytes(members, fmt)), 1 << 20)) == members


def test_non_utf8_member_names_become_valid_distinct_keys(tmp_path):
    from visgen.data.ingest import process_samples, write_quarantine

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT, errors="surrogateescape") as tar:
        for name, data in [("k\udcff.jpg", jpeg()), ("k\udcff.txt", b"latin-1 name"), ("k\udcfe.txt", b"x")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = samples(buf.getvalue())
    assert [s.key for s in out] == ["k\\xff", "k\\xfe"]
    good, bad = process_samples(out, IngestConfig(source="unused", min_size=8))
    assert good.key == ["k\\xff"] and bad[0]["reason"] == "image_missing"
    assert write_quarantine(bad, str(tmp_path))  # Arrow and parquet accept the keys


def test_truncated_inside_a_member_keeps_complete_samples():
    data = tar_bytes(good_members(["k0", "k1", "k2"]))
    cut = offsets(data)["k2.txt"] + 3  # three bytes into k2's caption
    out = samples(data[:cut])
    assert [s.key for s in out[:-1]] == ["k0", "k1"] and not any(s.fault for s in out[:-1])
    fault = out[-1]
    assert (fault.key, fault.fault) == ("", "shard_truncated")
    assert "inside member 'k2.txt' (3 of" in fault.detail and "'k2'" in fault.detail
    assert "2 complete sample(s)" in fault.detail


def test_truncated_at_a_member_boundary_is_detected():
    # tarfile would call this a clean end; the missing end-of-archive marker gives it away.
    data = tar_bytes(good_members(["k0", "k1"]))
    cut = offsets(data)["k1.txt"] - 512  # right before k1.txt's header
    with tarfile.open(fileobj=io.BytesIO(data[:cut])) as tar:
        assert len(tar.getmembers()) == 4  # k0 (3 members) + k1.jpg: no error from the standard library
    out = samples(data[:cut])
    assert [s.key for s in out] == ["k0", ""]
    assert out[-1].fault == "shard_truncated" and "end-of-archive marker" in out[-1].detail
    assert "unfinished sample 'k1'" in out[-1].detail


@pytest.mark.parametrize("data, expect", [
    (b"", "empty file"),
    (b"hello", "only 5 bytes"),
    (b"<html>" + b"x" * 2000, "fails its checksum"),
    (gzip.compress(tar_bytes(good_members(["k0"]))), "gzip-compressed"),
])
def test_not_a_tar(data, expect):
    out = samples(data)
    assert len(out) == 1 and (out[0].key, out[0].fault) == ("", "shard_unreadable")
    assert expect in out[0].detail


def test_corrupt_header_mid_file():
    data = bytearray(tar_bytes(good_members(["k0", "k1", "k2"])))
    hdr = offsets(bytes(data))["k1.json"] - 512
    data[hdr + 10] ^= 0xFF  # flip a byte of k1.json's header name: checksum no longer matches
    out = samples(bytes(data))
    assert [s.key for s in out] == ["k0", ""]
    assert out[-1].fault == "shard_corrupt" and "unfinished sample 'k1'" in out[-1].detail


def test_split_key_keeps_reading_the_shard():
    members = good_members(["a", "b"]) + [("a.cls", b"7"), ("a.txt", b"late")] + good_members(["c"])
    out = samples(tar_bytes(members))
    assert [(s.key, s.fault) for s in out] == [("a", ""), ("b", ""), ("a", "key_split"), ("c", "")]
    assert out[0].txt == b"caption a"  # the first run is untouched by the later one
    assert "'a.cls', 'a.txt'" in out[2].detail and "after key 'b'" in out[2].detail


def test_oversized_members_are_skipped_unread():
    members = [("k0.jpg", jpeg()), ("k0.txt", b"x" * 5000), ("k1.jpg", jpeg()), ("k1.txt", b"ok"),
               ("k1.npy", b"\0" * 9000)]  # an oversized member ingest does not use is just ignored
    out = samples(tar_bytes(members), max_member_bytes=4096)
    assert [(s.key, s.fault) for s in out] == [("k0", "member_too_large"), ("k1", "")]
    assert "'k0.txt' is 5000 bytes" in out[0].detail


def test_links_directories_and_hidden_members_are_ignored():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        d = tarfile.TarInfo("sub")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        link = tarfile.TarInfo("sub/k0.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
        for name, data in [("sub/k0.jpg", jpeg()), ("sub/._k0.jpg", b"junk"), ("sub/k0.txt", b"real")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (s,) = samples(buf.getvalue())
    assert (s.key, s.txt, s.image_name) == ("sub/k0", b"real", "sub/k0.jpg")


def test_io_error_mid_stream_becomes_a_shard_row():
    data = tar_bytes(good_members(["k0", "k1", "k2"]))

    class Flaky(io.BytesIO):
        def read(self, n=-1):
            if self.tell() > offsets(data)["k2.jpg"]:
                raise OSError("connection reset")
            return super().read(n)

    out = list(iter_tar_samples(Flaky(data), "x.tar"))
    assert [s.key for s in out] == ["k0", "k1", ""]
    assert out[-1].fault == "shard_unreadable" and "connection reset" in out[-1].detail


# -- end to end on Ray --------------------------------------------------------------------------

def png(mode: str, color, size=(40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Five shards: good samples of every kind, one of each bad sample, and one of each bad shard.

    Returns (shard dir, the keys that must be kept, the (shard, key, reason) rows that must be
    quarantined).
    """
    d = tmp_path_factory.mktemp("shards")
    good, bad = set(), set()
    with wds.TarWriter(str(d / "00000.tar")) as w:
        w.write({"__key__": "g-jpg", "jpg": jpeg(), "txt": "a jpeg", "json": '{"n": 1}'})
        w.write({"__key__": "g-upper", "JPG": jpeg(), "TXT": "upper-case extensions"})
        w.write({"__key__": "g-rgba", "png": png("RGBA", (0, 0, 255, 128)), "txt": "a png with alpha"})
        w.write({"__key__": "g-gray16", "png": png("I;16", 40000), "txt": "sixteen-bit gray"})
        w.write({"__key__": "g-json", "jpeg": jpeg(), "json": '{"caption": "caption from json"}'})
        w.write({"__key__": "g-pickle", "jpg": jpeg(), "txt": "kept; its pickle is dropped", "pyd": b"\x80\x04N."})
        good |= {"g-jpg", "g-upper", "g-rgba", "g-gray16", "g-json", "g-pickle"}
        planted_bad = {
            "b-garbage": ({"jpg": b"not an image", "txt": "x"}, "image_decode_error"),
            "b-small": ({"jpg": jpeg(size=(100, 4)), "txt": "x"}, "image_too_small"),
            "b-empty": ({"jpg": jpeg(), "txt": "   "}, "caption_empty"),
            "b-utf8": ({"jpg": jpeg(), "txt": b"\xff\xfe"}, "caption_undecodable"),
            "b-nocap": ({"jpg": jpeg()}, "caption_missing"),
            "b-noimg": ({"txt": "caption only"}, "image_missing"),
            "b-json": ({"jpg": jpeg(), "txt": "x", "json": "{oops"}, "json_invalid"),
        }
        for key, (fields, reason) in planted_bad.items():
            w.write({"__key__": key, **fields})
            bad.add(("00000.tar", key, reason))
    bad.add(("00000.tar", "g-pickle", "member_dropped"))

    data = tar_bytes(good_members(["t0", "t1", "t2"]))  # truncated inside t2.jpg
    (d / "00001.tar").write_bytes(data[: offsets(data)["t2.jpg"] + 100])
    good |= {"t0", "t1"}
    bad.add(("00001.tar", "", "shard_truncated"))

    (d / "00002.tar").write_bytes(b"this is not a tar file\n" * 50)
    bad.add(("00002.tar", "", "shard_unreadable"))

    split = good_members(["s0", "s1"]) + [("s0.json", b'{"late": true}')] + good_members(["s2"])
    (d / "00003.tar").write_bytes(tar_bytes(split))
    good |= {"s0", "s1", "s2"}
    bad.add(("00003.tar", "s0", "key_split"))

    (d / "00004.tar").write_bytes(tar_bytes(good_members(["h0", "h1"])))  # the held-out shard
    good |= {"h0", "h1"}
    return d, good, bad


def _rows(q: str) -> set[tuple[str, str, str]]:
    t = quarantine_table(q).to_pylist()
    return {(os.path.basename(r["shard"]), r["key"], r["reason"]) for r in t}


@pytest.mark.slow
def test_end_to_end_keeps_every_good_sample_and_quarantines_every_bad_one(ray_session, planted, tmp_path):
    from visgen.text.tokenizer import TextTokenizerConfig, train_text_tokenizer

    shard_dir, good, bad = planted
    tok_path = str(tmp_path / "tok.json")
    train_text_tokenizer(["a jpeg", "caption from json", "caption t0"] * 10,
                         TextTokenizerConfig(vocab_size=300, min_frequency=1)).save(tok_path)
    cfg = IngestConfig(source=str(shard_dir), resolution=16, min_size=8, batch_size=4, max_text_tokens=5)
    q = str(tmp_path / "quarantine")

    rows = []
    for batch in build_dataset(cfg, tok_path, q).iter_batches(batch_size=8, batch_format="numpy"):
        assert batch["image"].shape[1:] == (16, 16, 3) and batch["image"].dtype == np.uint8
        rows += [dict(zip(batch, vals, strict=True)) for vals in zip(*batch.values(), strict=True)]
    by_key = {r["key"]: r for r in rows}
    assert sorted(by_key) == sorted(good) and len(rows) == len(good)
    assert _rows(q) == bad  # every planted fault, with its reason, and nothing else

    assert by_key["g-json"]["caption"] == "caption from json"
    assert by_key["g-jpg"]["json"] == '{"n": 1}' and by_key["g-upper"]["json"] == ""
    assert by_key["s0"]["shard"] == str(shard_dir / "00003.tar")
    assert 0 < len(by_key["g-jpg"]["text_ids"]) <= 5
    assert tuple(by_key["g-rgba"]["image"][8, 8]) == pytest.approx((127, 127, 255), abs=3)  # over white

    # The table is plain parquet: any reader opens the directory.
    import pandas as pd

    assert len(pd.read_parquet(q)) == len(bad)


@pytest.mark.slow
def test_run_ingest_report_and_splits(ray_session, planted, tmp_path):
    shard_dir, good, bad = planted
    # The map_batches form of the pipeline (the first test covers decoding inside the read tasks).
    cfg = IngestConfig(source=str(shard_dir), resolution=16, min_size=8, batch_size=4, holdout_shards=1,
                       decode_in_read=False)
    q = str(tmp_path / "q")
    report = run_ingest(cfg, None, q, split="train")
    assert report.kept == len(good) - 2 and report.shards == 4
    want = Counter(reason for shard, _, reason in bad if shard != "00004.tar")
    assert report.quarantined == {r: n for r, n in want.items() if r != "member_dropped"}
    assert report.notices == {"member_dropped": 1}
    text = report.format()
    assert "shard_unreadable" in text and "images/s" in text and q in text

    again = run_ingest(cfg, None, q, split="holdout")  # a fresh pass replaces the old table
    assert (again.kept, again.quarantined, again.shards) == (2, {}, 1)

    captions = {r["caption"] for r in read_captions(cfg).take_all()}  # train split by default
    assert "caption from json" in captions and "caption h0" not in captions and "   " not in captions

    # A shard that disappears between listing and reading is quarantined, not a failed task.
    vanishing = tmp_path / "vanishing"
    vanishing.mkdir()
    for key in ("v0", "v1"):
        (vanishing / f"{key}.tar").write_bytes(tar_bytes(good_members([key])))
    ds = build_dataset(cfg.model_copy(update={"source": str(vanishing), "holdout_shards": 0}), None, q + "2")
    os.remove(vanishing / "v1.tar")
    assert [r["key"] for r in ds.take_all()] == ["v0"]
    assert _rows(q + "2") == {("v1.tar", "", "shard_unreadable")}
