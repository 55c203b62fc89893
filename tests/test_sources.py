"""Shard-spec expansion: directory, glob, brace range, file:// and fsspec URLs, and the errors."""

from __future__ import annotations

import os
import uuid

import pytest

from visgen.config import SpecError
from visgen.data.sources import expand_source, shard_signature, split_shards


@pytest.fixture
def shard_dir(tmp_path):
    """Five empty shards plus the side files img2dataset writes next to them."""
    for i in range(5):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"")
        (tmp_path / f"{i:05d}.parquet").write_bytes(b"")
        (tmp_path / f"{i:05d}_stats.json").write_text("{}")
    (tmp_path / ".00009.tar").write_bytes(b"")  # hidden: an editor or rsync temp file
    (tmp_path / "_tmp.tar").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "00007.tar").write_bytes(b"")  # directories are not searched recursively
    return tmp_path


def names(paths):
    return [os.path.basename(p) for p in paths]


def test_directory_lists_tars_sorted_and_absolute(shard_dir, monkeypatch):
    monkeypatch.chdir(shard_dir.parent)
    got = expand_source(shard_dir.name)  # relative spec → absolute paths
    assert names(got) == [f"{i:05d}.tar" for i in range(5)]
    assert all(os.path.isabs(p) and os.path.dirname(p) == str(shard_dir) for p in got)


def test_glob_and_brace(shard_dir):
    assert names(expand_source(f"{shard_dir}/0000[13].tar")) == ["00001.tar", "00003.tar"]
    assert names(expand_source(f"{shard_dir}/{{00001..00003}}.tar")) == ["00001.tar", "00002.tar", "00003.tar"]
    # Brace order is kept (it decides which shards are held out); repeats are dropped.
    assert names(expand_source(f"{shard_dir}/{{00004,00000,00004}}.tar")) == ["00004.tar", "00000.tar"]
    # A brace alternative may itself be a directory or glob.
    got = expand_source(f"{{{shard_dir}/sub,{shard_dir}/0000[0].tar}}")
    assert names(got) == ["00007.tar", "00000.tar"]


def test_file_url_gives_local_paths(shard_dir):
    assert expand_source(f"file://{shard_dir}") == [str(shard_dir / f"{i:05d}.tar") for i in range(5)]
    assert names(expand_source(f"file://{shard_dir}/{{00000..00001}}.tar")) == ["00000.tar", "00001.tar"]
    assert names(expand_source(f"file://localhost{shard_dir}/*.tar")) == names(expand_source(str(shard_dir)))
    with pytest.raises(SpecError, match="must be absolute"):
        expand_source("file://relative/dir")


@pytest.mark.parametrize("spec_suffix, expect", [
    ("/nowhere", "1 named shard"),            # a path that does not exist
    ("/*.tgz", "matched no shards"),          # a glob that matches nothing
    ("/sub/*.json", "matched no shards"),
    ("/{00003..00006}.tar", "2 named shard"),  # a brace range naming missing shards
])
def test_nothing_matched_names_the_spec(shard_dir, spec_suffix, expect):
    spec = f"{shard_dir}{spec_suffix}"
    with pytest.raises(SpecError, match=expect) as info:
        expand_source(spec)
    assert repr(spec) in str(info.value)


def test_empty_directory_and_bad_specs(tmp_path):
    with pytest.raises(SpecError, match="matched no shards"):
        expand_source(str(tmp_path))
    with pytest.raises(SpecError, match="empty shard spec"):
        expand_source("  ")
    with pytest.raises(SpecError, match="mixes URL schemes"):
        expand_source(f"{{{tmp_path},s3://bucket/x}}/a.tar")


def test_fsspec_url_listing_glob_and_brace():
    # fsspec's in-memory filesystem exercises the object-store code path (listing, globbing,
    # one listing per prefix for a brace range) without a bucket.
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/visgen-test-{uuid.uuid4().hex[:8]}"
    for i in range(3):
        fs.pipe(f"{root}/{i:05d}.tar", b"")
    fs.pipe(f"{root}/00000_stats.json", b"{}")
    try:
        want = [f"memory://{root}/{i:05d}.tar" for i in range(3)]
        assert expand_source(f"memory://{root}") == want
        assert expand_source(f"memory://{root}/*.tar") == want
        assert expand_source(f"memory://{root}/{{00000..00002}}.tar") == want
        with pytest.raises(SpecError, match="1 named shard"):
            expand_source(f"memory://{root}/{{00000..00003}}.tar")
        with pytest.raises(SpecError, match="matched no shards"):
            expand_source(f"memory://{root}/*.tgz")
    finally:
        fs.rm(root, recursive=True)


def test_s3_without_s3fs_says_what_to_install(monkeypatch):
    import fsspec.core

    def missing(url, **kw):  # what fsspec raises when s3fs is not installed (the test env has it)
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec.core, "url_to_fs", missing)
    with pytest.raises(SpecError, match=r"pip install s3fs, or install visgen with the 'cloud' extra"):
        expand_source("s3://bucket/shards/{00000..00009}.tar")


def test_unknown_scheme():
    with pytest.raises(SpecError, match="nosuchfs"):
        expand_source("nosuchfs://bucket/x.tar")


def test_split_shards():
    shards = [f"{i}.tar" for i in range(5)]
    assert split_shards(shards, 2, "train") == shards[:3]
    assert split_shards(shards, 2, "holdout") == shards[3:]
    assert split_shards(shards, 2, "all") == shards
    assert split_shards(shards, 0, "train") == shards
    with pytest.raises(SpecError, match="leaves no training shards"):
        split_shards(shards, 5, "train")
    with pytest.raises(SpecError, match="holdout_shards is 0"):
        split_shards(shards, 0, "holdout")
    with pytest.raises(ValueError, match="split 'test'"):
        split_shards(shards, 1, "test")


def test_shard_signature_changes_with_any_shard(shard_dir):
    """[path, size, mtime_ns] per shard in order; one function that every reuse check calls."""
    shards = expand_source(str(shard_dir))
    sig = shard_signature(shards)
    assert [s[0] for s in sig] == shards and all(s[1] == 0 and isinstance(s[2], int) for s in sig)
    assert shard_signature(list(reversed(shards))) != sig  # order matters: the last ones are held out
    with open(shards[1], "ab") as f:
        f.write(b"more")
    assert shard_signature(shards)[1][1] == 4 and shard_signature(shards) != sig
    missing = str(shard_dir / "gone.tar")
    assert shard_signature([missing]) == [[missing, None, None]]  # unreachable now: the name is what we have


def test_every_reuse_check_uses_the_one_shard_signature():
    from visgen import retrain, stages
    from visgen.data import token_cache

    assert token_cache.shard_signature is shard_signature and retrain.shard_signature is shard_signature
    assert not hasattr(stages, "_source_signature")

