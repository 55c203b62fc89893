"""The training feed: the split in memory or streamed, the feed thread, device-side logs, resume."""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from visgen.config import SpecError, load_spec
from visgen.train.config import TrainConfig
from visgen.train.feed import (
    EpochEnd, Feed, FeedItem, InMemoryData, iter_stream_epoch, read_in_memory, resolve_in_memory,
)
from visgen.train.task import TrainTask, WorkerEnv
from visgen.train.worker import Meter


def token_rows(n: int, seed: int = 0, n_image: int = 6) -> pa.Table:
    """Rows shaped like the token cache: key, ragged text_ids and fixed-length image_ids (list<int32>)."""
    from visgen.text.tokenizer import SPECIAL_TOKENS

    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 6, n)
    text = pa.ListArray.from_arrays(pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)),
                                    pa.array(rng.integers(len(SPECIAL_TOKENS), 64, int(lengths.sum()), dtype=np.int32)))
    image = pa.ListArray.from_arrays(pa.array(np.arange(0, (n + 1) * n_image, n_image, dtype=np.int32)),
                                     pa.array(rng.integers(0, 32, n * n_image, dtype=np.int32)))
    return pa.table({"key": pa.array([f"{i:05d}" for i in range(n)]), "text_ids": text, "image_ids": image})


@pytest.fixture(scope="module")
def cache(ray_session, tmp_path_factory):
    """A 50-row parquet 'token cache' in 3 files, read back by Ray Data."""
    d = tmp_path_factory.mktemp("cache")
    table = token_rows(50)
    for i, part in enumerate((slice(0, 17), slice(17, 35), slice(35, 50))):
        pq.write_table(table.slice(part.start, part.stop - part.start), d / f"part-{i}.parquet")
    return ray_session.data.read_parquet(str(d)), table


def rows_of(batch: dict) -> dict[str, tuple]:
    """key -> (text ids, image ids) of a numpy batch."""
    return {str(k): (tuple(t.tolist()), tuple(i.tolist()))
            for k, t, i in zip(batch["key"], batch["text_ids"], batch["image_ids"])}


# -- the spec option -------------------------------------------------------------------------------
def test_data_in_memory_accepts_auto_true_false_and_refuses_the_rest():
    assert TrainConfig().data_in_memory == "auto"
    assert TrainConfig(data_in_memory=True).data_in_memory is True
    assert TrainConfig(data_in_memory=False).data_in_memory is False
    for bad in ("yes", "on", 1, None, "memory"):
        with pytest.raises(ValueError, match="expected 'auto', true or false"):
            TrainConfig(data_in_memory=bad)
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        TrainConfig(data_in_memory_max_mb=0)


def test_a_bad_data_in_memory_in_a_spec_names_the_field():
    with pytest.raises(SpecError) as e:
        load_spec("pipelines/shapes-tiny.yaml", {"lm.train.data_in_memory": "sometimes"})
    assert "lm.train.data_in_memory" in str(e.value) and "expected 'auto', true or false" in str(e.value)
    spec = load_spec("pipelines/shapes-tiny.yaml", {"lm.train.data_in_memory": False,
                                                    "image_tokenizer.train.data_in_memory_max_mb": 64})
    assert spec.lm.train.data_in_memory is False and spec.image_tokenizer.train.data_in_memory_max_mb == 64


# -- the split in memory ---------------------------------------------------------------------------
def test_in_memory_columns_keep_ray_data_batch_format():
    batches = [
        {"image": np.arange(2 * 4, dtype=np.uint8).reshape(2, 2, 2), "ids": _obj([[1, 2], [3]]), "name": _obj(["a", "b"])},
        {"image": np.arange(8, 12, dtype=np.uint8).reshape(1, 2, 2), "ids": _obj([[4, 5, 6]]), "name": _obj(["c"])},
    ]
    data = InMemoryData.from_batches(batches)
    assert data.num_rows == 3 and data.columns == ("image", "ids", "name")
    assert set(data.dense) == {"image"} and set(data.ragged) == {"ids"} and set(data.objects) == {"name"}
    got = data.take(np.array([2, 0]))
    assert got["image"].shape == (2, 2, 2) and got["image"].dtype == np.uint8
    assert np.array_equal(got["image"][0], batches[1]["image"][0])
    assert got["ids"].dtype == object and [r.tolist() for r in got["ids"]] == [[4, 5, 6], [1, 2]]
    assert got["ids"][0].dtype == np.int32 and list(got["name"]) == ["c", "a"]
    assert data.nbytes >= 12 + 6 * 4
    assert InMemoryData.from_batches(batches, limit_bytes=10) is None  # over the limit: gives up


def _obj(rows):
    out = np.empty(len(rows), dtype=object)
    out[:] = [np.asarray(r, dtype=np.int32) if isinstance(r, list) else r for r in rows]
    return out


def test_an_epoch_in_memory_holds_the_rows_of_a_streamed_pass(cache):
    ds, table = cache
    data = read_in_memory(ds)
    assert data.num_rows == 50 and set(data.ragged) == {"text_ids", "image_ids"}
    tc = TrainConfig(batch_size=8, seed=3)
    streamed, in_memory = {}, {}
    stream_batches = list(iter_stream_epoch(ds, 8, tc, rank=0, epoch=0))
    memory_batches = list(data.iter_epoch(0, seed=3, global_batch=8))
    assert len(stream_batches) == len(memory_batches) == 50 // 8  # drop_last on both
    for s, m in zip(stream_batches, memory_batches):
        assert set(s) == set(m)
        for k in s:  # the same format: object arrays of int32 rows for the list columns
            assert s[k].dtype == m[k].dtype and s[k].shape == m[k].shape
            assert type(s[k][0]) is type(m[k][0]) and getattr(s[k][0], "dtype", None) == getattr(m[k][0], "dtype", None)
        streamed |= rows_of(s)
        in_memory |= rows_of(m)
    every = rows_of({c: _column(table, c) for c in ("key", "text_ids", "image_ids")})
    assert len(in_memory) == 48 and all(every[k] == v for k, v in in_memory.items())  # no row twice, all real
    assert all(every[k] == v for k, v in streamed.items())


def _column(table: pa.Table, name: str) -> np.ndarray:
    values = table.column(name).to_pylist()
    return _obj([np.asarray(v, np.int32) if isinstance(v, list) else v for v in values])


def test_in_memory_order_is_a_function_of_seed_and_epoch_and_splits_over_ranks(cache):
    ds, _ = cache
    data = read_in_memory(ds)
    keys = lambda batches: [list(b["key"]) for b in batches]  # noqa: E731
    first = keys(data.iter_epoch(0, seed=1, global_batch=10))
    assert first == keys(data.iter_epoch(0, seed=1, global_batch=10))  # deterministic
    assert first != keys(data.iter_epoch(1, seed=1, global_batch=10))  # reshuffled per epoch
    assert first != keys(data.iter_epoch(0, seed=2, global_batch=10))
    assert sorted(k for b in first for k in b) == sorted(f"{i:05d}" for i in range(50))
    # Two workers split each global batch: together they train on the very same rows per step.
    r0 = keys(data.iter_epoch(0, seed=1, global_batch=10, rank=0, world_size=2))
    r1 = keys(data.iter_epoch(0, seed=1, global_batch=10, rank=1, world_size=2))
    assert [a + b for a, b in zip(r0, r1)] == first
    # Resuming at batch 3 continues the same epoch.
    assert keys(data.iter_epoch(0, seed=1, global_batch=10, start=3)) == first[3:]


class _Unreadable:
    def iter_batches(self, **kw):
        raise AssertionError("must not be read")


def test_resolve_in_memory_follows_the_option_and_the_limit(cache):
    ds, _ = cache
    assert resolve_in_memory(_Unreadable(), TrainConfig(data_in_memory=False))[0] is None
    data, why = resolve_in_memory(_Unreadable(), TrainConfig(data_in_memory_max_mb=1), size_hint=5 * 2**20)
    assert data is None and "estimated at 5 MiB" in why  # auto + a large hint: nothing read
    data, why = resolve_in_memory(ds, TrainConfig())
    assert data is not None and data.num_rows == 50 and "50 rows" in why
    # auto with a limit the split exceeds: falls back to streaming; true ignores the limit.
    tiny = TrainConfig(data_in_memory_max_mb=1)
    big = ds.map_batches(lambda b: {**b, "pad": np.zeros((len(b["key"]), 64 * 1024), np.uint8)}, batch_format="numpy")
    data, why = resolve_in_memory(big, tiny)
    assert data is None and "over data_in_memory_max_mb=1" in why
    data, _ = resolve_in_memory(big, TrainConfig(data_in_memory=True, data_in_memory_max_mb=1))
    assert data is not None and data.nbytes > 2**20


def test_image_split_bound_from_stats_files_or_tar_sizes(tmp_path):
    import json

    from visgen.data.ingest import IngestConfig
    from visgen.train.image_tokenizer import images_size_bound

    for i, size in enumerate((10 * 1024, 20 * 1024, 4 * 1024)):
        (tmp_path / f"{i:05d}.tar").write_bytes(b"\0" * size)
    (tmp_path / "00000_stats.json").write_text(json.dumps({"count": 7, "successes": 5}))
    ingest = IngestConfig(source=str(tmp_path), resolution=8, holdout_shards=1)
    # shard 0: 5 samples (img2dataset's successes); shard 1: no stats, at most 20 KiB / 1 KiB; shard 2 held out.
    assert images_size_bound(ingest, 8) == (5 + 20) * 8 * 8 * 3
    assert images_size_bound(object(), 8) is None
    assert images_size_bound(IngestConfig(source="s3://bucket/{00000..00003}.tar", resolution=8), 8) is None


# -- the feed thread ----------------------------------------------------------------------------------
class _Recorder(TrainTask):
    def __init__(self, fail_at: int | None = None):
        self.calls: list[tuple[int, str]] = []
        self.fail_at = fail_at

    def collate(self, batch, env, step):
        if step == self.fail_at:
            raise ValueError(f"bad batch at step {step}")
        self.calls.append((step, threading.current_thread().name))
        return {"x": torch.as_tensor(batch["x"]), "tag": step}


def _epochs(n_batches: int):
    def epochs(epoch: int, start: int):
        for b in range(start, n_batches):
            yield {"x": np.full(2, 100 * epoch + b)}
    return epochs


def _env() -> WorkerEnv:
    return WorkerEnv(TrainConfig(), torch.device("cpu"))


def test_feed_collates_in_a_thread_with_the_step_and_marks_epochs():
    task = _Recorder()
    with Feed(task, _env(), _epochs(3), start_step=10, steps=7, start_epoch=2, start_index=1, depth=2) as feed:
        items = list(feed)
    got = [(i.step, i.epoch, i.index, int(i.batch["x"][0]), i.batch["tag"]) if isinstance(i, FeedItem)
           else ("end", i.epoch, i.batches) for i in items]
    assert got == [(10, 2, 1, 201, 10), (11, 2, 2, 202, 11), ("end", 2, 2),
                   (12, 3, 0, 300, 12), (13, 3, 1, 301, 13), (14, 3, 2, 302, 14), ("end", 3, 3),
                   (15, 4, 0, 400, 15), (16, 4, 1, 401, 16)]  # stops after 7 batches, no end of epoch 4
    assert {name for _, name in task.calls} == {"visgen-feed"}


def test_feed_reports_an_empty_epoch_and_reraises_errors():
    with Feed(_Recorder(), _env(), _epochs(0), start_step=0, steps=5) as feed:
        assert [(type(i), i.batches) for i in feed] == [(EpochEnd, 0)]
    with Feed(_Recorder(fail_at=2), _env(), _epochs(5), start_step=0, steps=5) as feed:
        seen = []
        with pytest.raises(ValueError, match="bad batch at step 2"):
            for item in feed:
                seen.append(item.step)
        assert seen == [0, 1]  # the batches prepared before the error still train


def test_closing_the_feed_early_stops_its_thread():
    feed = Feed(_Recorder(), _env(), _epochs(10**6), start_step=0, steps=10**6, depth=1)
    first = next(iter(feed))
    assert first.step == 0
    feed.close()
    assert not feed._thread.is_alive()


# -- logs stay tensors until the loop logs ------------------------------------------------------------
class _Tracker:
    def log_metrics(self, metrics, step):
        pass


def test_meter_averages_tensor_and_float_logs_and_names_a_non_finite_step():
    tc = TrainConfig(batch_size=4, steps=10)
    meter = Meter(tc, _env(), 0)
    meter.add({"loss": torch.tensor(1.0), "grad_norm": 2.0})
    meter.add({"loss": torch.tensor(3.0), "grad_norm": torch.tensor(4.0, dtype=torch.float64), "d_loss": torch.tensor(5.0)})
    m = meter.flush(2, 0, _Tracker())
    assert m["loss"] == 2.0 and m["grad_norm"] == 3.0 and m["d_loss"] == 5.0 and m["steps_per_s"] > 0
    meter.add({"loss": torch.tensor(1.0)})
    meter.add({"loss": torch.tensor(float("nan"))})  # no error yet: reading it would wait for the device
    with pytest.raises(FloatingPointError, match="non-finite loss=nan at step 4"):
        meter.flush(4, 0, _Tracker())
    with pytest.raises(FloatingPointError, match="non-finite loss=inf at step 5"):
        meter.add({"loss": float("inf")})
    with pytest.raises(ValueError, match="0-dim tensor"):
        meter.add({"loss": torch.ones(2)})


def test_optimizer_step_returns_the_norm_as_a_tensor():
    env = _env()
    net = torch.nn.Linear(3, 1)
    env.build_optimizers({"model": [{"params": list(net.parameters())}]})
    norm = env.optimizer_step("model", net(torch.ones(2, 3)).sum())
    assert isinstance(norm, torch.Tensor) and norm.ndim == 0 and float(norm) > 0


# -- the loop end to end (local mode): the in-memory feed and the weight average resume exactly --------
@pytest.mark.slow  # three short local-mode runs: ~40 s on two busy cores
def test_in_memory_resume_matches_an_uninterrupted_run(ray_session, tmp_path):
    from visgen.models.vq import load_vq, vq_config
    from visgen.train.checkpoint import load_ema, load_state, read_progress
    from visgen.train.config import ScalingConfig
    from visgen.train.image_tokenizer import train_image_tokenizer

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    ds = ray_session.data.from_items([{"image": im} for im in images], override_num_blocks=3)
    base = dict(batch_size=8, lr=1e-3, schedule="constant", log_every=2, checkpoint_every=3, seed=5,
                data_in_memory=True, ema_decay=0.8)
    cfg = vq_config("tiny")
    straight = train_image_tokenizer(cfg, TrainConfig(steps=7, **base), ScalingConfig(num_workers=0), ds,
                                     workdir=tmp_path / "a")
    train_image_tokenizer(cfg, TrainConfig(steps=3, **base), ScalingConfig(num_workers=0), ds, workdir=tmp_path / "b")
    resumed = train_image_tokenizer(cfg, TrainConfig(steps=7, **base), ScalingConfig(num_workers=0), ds,
                                    workdir=tmp_path / "b")
    assert straight.fit.step == resumed.fit.step == 7 and resumed.fit.resumed_from == 3
    a, b = (tmp_path / d / "ray_results" / "image_tokenizer" / "checkpoint_00000007" for d in ("a", "b"))
    wa, wb = load_state(a, "modules")["model"], load_state(b, "modules")["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # The average went on from the checkpoint's, and what was exported is the average, not the last step.
    ea, eb = load_ema(a), load_ema(b)
    assert ea["updates"] == eb["updates"] == 7
    assert all(torch.equal(ea["modules"]["model"][k], eb["modules"]["model"][k]) for k in wa)
    exported = load_vq(resumed.model_dir).state_dict()
    assert all(torch.equal(exported[k], eb["modules"]["model"][k]) for k in exported)
    assert not torch.equal(exported["decoder.conv_out.weight"], wb["decoder.conv_out.weight"])
    # 5 batches per epoch: the resumed run went on at batch 3 of epoch 0, then into epoch 1.
    assert read_progress(b)[1]["meta"]["feed"] == {"mode": "memory", "rows": 40, "batch_size": 8, "seed": 5,
                                                   "epoch": 1, "index": 2}


@pytest.mark.slow  # two short local-mode runs of the tiny transformer: ~30 s on two busy cores
@pytest.mark.parametrize("in_memory", [True, False], ids=["memory", "stream"])
def test_the_transformer_trains_on_either_feed(cache, tmp_path, in_memory):
    from visgen.models.gpt import gpt_config
    from visgen.inference import SamplingConfig
    from visgen.train.config import ScalingConfig
    from visgen.train.lm import LMRecipe, LMTask
    from visgen.train.loop import fit

    ds, _ = cache
    cfg = gpt_config("tiny", text_vocab=64, codebook_size=32, max_text_tokens=8, grid=(2, 3))
    tc = TrainConfig(steps=8, batch_size=8, lr=3e-3, schedule="constant", log_every=4, checkpoint_every=8,
                     data_in_memory=in_memory)
    res = fit(LMTask(cfg, LMRecipe(), SamplingConfig()), train=tc, scaling=ScalingConfig(num_workers=0),
              run_name="lm", storage_path=tmp_path, datasets={"train": ds})
    assert res.step == 8 and [h["step"] for h in res.history] == [4, 8]
    assert all(np.isfinite(h["loss"]) and h["grad_norm"] > 0 for h in res.history)
    assert res.history[-1]["epoch"] == 1.0  # 50 rows = 6 batches of 8 per pass: step 8 is in the second
