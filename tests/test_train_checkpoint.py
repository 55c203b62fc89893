"""Checkpoints: the safetensors + JSON tree format, exact resume of model/optimiser/scheduler/RNG."""

from __future__ import annotations

import copy
import json
import math
import random

import numpy as np
import pytest
import torch

from visgen.train.checkpoint import (
    Progress, capture_rng, flatten_state, latest_checkpoint, list_checkpoints, load_checkpoint, load_state,
    prune_checkpoints, read_progress, restore_rng, save_checkpoint, save_state, unflatten_state,
)
from visgen.train.config import TrainConfig
from visgen.train.loop import LRSchedule, WorkerEnv, decay_groups
from visgen.train.task import Muon, muon_groups, newton_schulz


def assert_same(a, b, path="root"):
    """Deep equality that also checks Python types (tuple vs list, int vs float) and tensor dtypes."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{tuple(a.shape)} != {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b), f"{path}: tensor values differ"
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), f"{path}: arrays differ"
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}/{i}")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), f"{path}: nan != {b}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))


def _trained_env(steps: int = 3) -> tuple[torch.nn.Module, WorkerEnv]:
    torch.manual_seed(0)
    net = _net()
    env = WorkerEnv(TrainConfig(steps=10, warmup_steps=2, lr=1e-2, weight_decay=0.1), torch.device("cpu"))
    env.build_optimizers({"model": decay_groups(net, 0.1)})
    for _ in range(steps):
        env.optimizer_step("model", net(torch.randn(5, 4)).pow(2).mean())
        env.step_schedulers()
    return net, env


def test_optimizer_state_flattening_round_trips_exactly():
    _, env = _trained_env()
    state = {"optimizer": env.optimizers["model"].state_dict(), "scheduler": env.schedulers["model"].state_dict()}
    tensors, tree = flatten_state(state)
    json.dumps(tree, allow_nan=False)  # strict JSON: no NaN/Infinity literals, no pickles
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())
    assert any(k.startswith("optimizer/state/0/") for k in tensors), sorted(tensors)  # readable keys
    assert_same(unflatten_state(tensors, tree), state)


def test_flatten_handles_awkward_python_values(tmp_path):
    shared = torch.arange(6.0)
    obj = {
        "int_keys": {0: "a", 7: (1, 2.5, None)},  # JSON keys are strings: must come back as ints
        "tag_like": {"__tensor__": "not a tensor"},  # a key that looks like a format tag
        "floats": [float("inf"), float("-inf"), float("nan"), 0.1],
        "numpy": (np.arange(5, dtype=np.uint32), np.float32(1.5), np.int64(3)),
        "tied": [shared, shared.view(2, 3)],  # aliases: safetensors refuses them unless cloned
        "scalar": torch.tensor(2.0), "empty": torch.zeros(0, 3), "bool": torch.tensor([True, False]),
    }
    save_state(tmp_path, "x", obj)
    assert_same(load_state(tmp_path, "x"), obj)


def test_flatten_rejects_unsupported_values_with_path():
    with pytest.raises(TypeError, match=r"cannot store a set at 'a/b'"):
        flatten_state({"a": {"b": {1, 2}}})


def test_checkpoint_restores_model_optimizer_scheduler_and_rng_exactly(tmp_path):
    net, env = _trained_env()
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    saved_optim = copy.deepcopy(env.optimizers["model"].state_dict())
    saved_sched = copy.deepcopy(env.schedulers["model"].state_dict())
    saved_model = copy.deepcopy(net.state_dict())
    save_checkpoint(tmp_path / "ck", progress=Progress(step=3, epoch=1, samples_seen=96), modules={"model": net},
                    optimizers=env.optimizers, schedulers=env.schedulers)

    def continue_training(net, env):  # the same 2 steps, consuming every RNG the loop may use
        out = []
        for _ in range(2):
            x = torch.randn(5, 4) + float(np.random.rand()) + random.random()
            env.optimizer_step("model", net(x).pow(2).mean())
            env.step_schedulers()
            out.append(env.lr())
        return out, [p.detach().clone() for p in net.parameters()]

    expected_lrs, expected_params = continue_training(net, env)

    torch.manual_seed(123)  # a different init and RNG state, all overwritten by the load
    net2 = _net()
    env2 = WorkerEnv(env.train, torch.device("cpu"))
    env2.build_optimizers({"model": decay_groups(net2, 0.1)})
    progress, rng_ok = load_checkpoint(tmp_path / "ck", modules={"model": net2}, optimizers=env2.optimizers,
                                       schedulers=env2.schedulers)
    assert (progress, rng_ok) == (Progress(step=3, epoch=1, samples_seen=96), True)
    assert_same(env2.optimizers["model"].state_dict(), saved_optim)
    assert_same(env2.schedulers["model"].state_dict(), saved_sched)
    assert_same(net2.state_dict(), saved_model)
    env2.reapply_schedule()  # what the loop does after a load: a no-op under an unchanged config
    lrs, params = continue_training(net2, env2)
    assert lrs == expected_lrs
    for a, b in zip(params, expected_params):
        assert torch.equal(a, b)


def test_rng_capture_restore_is_exact():
    state = capture_rng()
    a = (torch.rand(3), np.random.rand(3), random.random())
    tensors, tree = flatten_state(state)
    restore_rng(unflatten_state(tensors, tree))
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_per_rank_rng_files_and_missing_rank(tmp_path):
    net, env = _trained_env(1)
    parts = dict(progress=Progress(step=1), modules={"model": net}, optimizers=env.optimizers, schedulers=env.schedulers)
    save_checkpoint(tmp_path, **parts, rank=0, world_size=2)
    save_checkpoint(tmp_path, **parts, rank=1, world_size=2)
    assert {p.name for p in tmp_path.iterdir()} == {
        "trainer.json", "modules.json", "modules.safetensors", "optim.json", "optim.safetensors",
        "rng_rank0.json", "rng_rank0.safetensors", "rng_rank1.json", "rng_rank1.safetensors"}
    _, ok = load_checkpoint(tmp_path, modules={"model": net}, optimizers=env.optimizers, schedulers=env.schedulers, rank=2)
    assert ok is False  # saved by 2 workers, resumed by 3: rank 2 is reseeded by the loop
    with pytest.raises(ValueError, match=r"holds modules \['model'\] but the task builds \['disc', 'model'\]"):
        load_checkpoint(tmp_path, modules={"model": net, "disc": _net()}, optimizers=env.optimizers,
                        schedulers=env.schedulers)


def test_listing_pruning_and_bad_checkpoints(tmp_path):
    net, env = _trained_env(1)
    for step in (5, 10, 15):
        save_checkpoint(tmp_path / f"checkpoint_{step:08d}", progress=Progress(step=step), modules={"model": net},
                        optimizers=env.optimizers, schedulers=env.schedulers)
    (tmp_path / "checkpoint_00000020").mkdir()  # incomplete (no trainer.json): ignored
    assert [s for s, _ in list_checkpoints(tmp_path)] == [5, 10, 15]
    assert latest_checkpoint(tmp_path).name == "checkpoint_00000015"
    assert [p.name for p in prune_checkpoints(tmp_path, keep=2)] == ["checkpoint_00000005"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10, 15]
    info = json.loads((tmp_path / "checkpoint_00000015" / "trainer.json").read_text())
    info["version"] = 99
    (tmp_path / "checkpoint_00000015" / "trainer.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="unsupported checkpoint format"):
        read_progress(tmp_path / "checkpoint_00000015")
    with pytest.raises(FileNotFoundError, match="not a visgen training checkpoint"):
        read_progress(tmp_path / "checkpoint_00000020")


def test_lr_schedule_warmup_cosine_and_resume_with_longer_run():
    s = LRSchedule(warmup=4, total=20, kind="cosine", min_ratio=0.1)
    assert s(0) == pytest.approx(0.25) and s(3) == pytest.approx(1.0) and s(4) == pytest.approx(1.0)
    assert s(12) == pytest.approx(0.55) and s(20) == pytest.approx(0.1) and s(50) == pytest.approx(0.1)
    assert LRSchedule(0, 20, "constant", 0.1)(15) == 1.0
    # Resuming under a config with more steps: the new schedule applies from the saved step on.
    net, env = _trained_env(3)
    longer = WorkerEnv(TrainConfig(steps=40, warmup_steps=2, lr=1e-2, weight_decay=0.1), torch.device("cpu"))
    longer.build_optimizers({"model": decay_groups(net, 0.1)})
    longer.schedulers["model"].load_state_dict(env.schedulers["model"].state_dict())
    longer.optimizers["model"].load_state_dict(env.optimizers["model"].state_dict())
    longer.reapply_schedule()
    assert longer.lr() == pytest.approx(1e-2 * LRSchedule(2, 40, "cosine", 0.1)(3))


def test_muon_trains_the_marked_matrices_and_resumes_exactly(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)),
                              torch.nn.Linear(8, 10))
    hidden = net[1]
    cfg = TrainConfig(steps=10, warmup_steps=2, lr=1e-2, weight_decay=0.1, optimizer="muon", muon_lr=0.02)

    def build(model):
        env = WorkerEnv(cfg, torch.device("cpu"))
        env.build_optimizers({"model": muon_groups(model, model[1], 0.1)})
        return env

    env = build(net)
    assert sorted(env.optimizers) == ["model", "model.muon"]
    assert isinstance(env.optimizers["model.muon"], Muon) and env.optimizers["model.muon"].ns_dtype == torch.float32
    muon = {id(p) for g in env.optimizers["model.muon"].param_groups for p in g["params"]}
    adamw = {id(p) for g in env.optimizers["model"].param_groups for p in g["params"]}
    assert muon == {id(hidden[0].weight)} and not muon & adamw  # the hidden matrix only; embeddings/head on AdamW
    assert muon | adamw == {id(p) for p in net.parameters()}

    def steps(model, env, n):
        out = []
        for i in range(n):
            x = torch.arange(5) + i
            before = [p.detach().clone() for p in model.parameters()]
            env.optimizer_step("model", model(x).logsumexp(-1).mean())
            env.step_schedulers()
            out.append(all(not torch.equal(a, b) for a, b in zip(before, model.parameters())))
        return out

    assert all(steps(net, env, 3))  # one optimizer_step moves every parameter, Muon's and AdamW's
    save_checkpoint(tmp_path / "ck", progress=Progress(step=3, epoch=0, samples_seen=15), modules={"model": net},
                    optimizers=env.optimizers, schedulers=env.schedulers)
    steps(net, env, 2)
    torch.manual_seed(1)
    net2 = torch.nn.Sequential(torch.nn.Embedding(10, 8), torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)),
                               torch.nn.Linear(8, 10))
    env2 = build(net2)
    load_checkpoint(tmp_path / "ck", modules={"model": net2}, optimizers=env2.optimizers, schedulers=env2.schedulers)
    env2.reapply_schedule()
    steps(net2, env2, 2)
    for a, b in zip(net.parameters(), net2.parameters()):
        assert torch.equal(a, b)
    plain = WorkerEnv(TrainConfig(steps=10, lr=1e-2, weight_decay=0.1), torch.device("cpu"))
    plain.build_optimizers({"model": muon_groups(net, net[1], 0.1)})  # adamw: the marked group is AdamW's too
    assert list(plain.optimizers) == ["model"] and isinstance(plain.optimizers["model"], torch.optim.AdamW)
    assert all("muon" not in g for g in plain.optimizers["model"].param_groups)


def test_muon_orthogonalises_in_the_chosen_dtype_and_agrees_with_torchs():
    torch.manual_seed(0)
    shapes = [(48, 16), (16, 48), (16, 16), (48, 16)]  # two of one shape: stacked into one batch
    grads = [[torch.randn(*s) for s in shapes] for _ in range(3)]
    # Newton-Schulz's quintic pushes every singular value into roughly [0.7, 1.2] (not exactly 1)
    for m in newton_schulz(grads[0], torch.optim.Muon([torch.nn.Parameter(torch.zeros(2, 2))]).defaults["ns_coefficients"],
                           5, 1e-7, torch.float32):
        s = torch.linalg.svdvals(m)
        assert 0.6 < float(s.min()) and float(s.max()) < 1.3

    def run(cls, **kw):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(*s) * 0.02) for s in shapes]
        opt = cls(params, lr=0.01, weight_decay=0.0, adjust_lr_fn="original", **kw)
        for g in grads:
            for p, x in zip(params, g):
                p.grad = x.clone()
            opt.step()
        return params, opt

    torch.manual_seed(0)
    start = [torch.randn(*s) * 0.02 for s in shapes]
    ref, ref_opt = run(torch.optim.Muon)  # bfloat16 Newton-Schulz, one matrix at a time
    moved = max(float((p - q).detach().abs().max()) for p, q in zip(ref, run(torch.optim.Muon)[0]))
    assert moved == 0.0
    for dtype in (torch.bfloat16, torch.float32):
        mine, opt = run(Muon, ns_dtype=dtype)
        # the two runs agree to bf16 rounding (measured 1-3 % of how far the matrices moved)
        for p, q, p0 in zip(mine, ref, start):
            assert float((p - q).norm() / (q - p0).norm()) < 0.05, (dtype, float((p - q).norm() / (q - p0).norm()))
        assert all(torch.equal(opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"])
                   for p, q in zip(mine, ref))
    opt.load_state_dict(ref_opt.state_dict())  # torch's checkpoints load into ours
    with pytest.raises(ValueError, match="original"):
        Muon([torch.nn.Parameter(torch.zeros(2, 2))], adjust_lr_fn="match_rms_adamw")


# -- the weight average (train.ema_decay) -----------------------------------------------------------
def test_weight_average_follows_the_ramped_decay_and_copies_integer_buffers():
    from visgen.train.ema import WeightAverage

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))  # float and integer buffers
    start = {k: v.clone() for k, v in net.state_dict().items()}
    ema = WeightAverage({"model": net}, decay=0.9)
    expected = {k: v.clone().double() for k, v in start.items() if v.is_floating_point()}
    for n in range(1, 31):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net.train()(torch.randn(4, 3))  # moves the running stats, counts a batch
        d = min(0.9, (1 + n) / (10 + n))
        assert ema.current_decay() == pytest.approx(d)
        ema.update({"model": net})
        for k, v in net.state_dict().items():
            if v.is_floating_point():
                expected[k] = d * expected[k] + (1 - d) * v.double()
    assert ema.updates == 30
    for k, v in ema.shadow["model"].items():
        if v.is_floating_point():
            assert torch.allclose(v.double(), expected[k], atol=1e-5), k
            assert not torch.allclose(v, net.state_dict()[k]), f"{k}: the average is not the last weights"
    assert int(ema.shadow["model"]["1.num_batches_tracked"]) == 30  # copied, not averaged
    other = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema.copy_to({"model": other})
    for k, v in other.state_dict().items():
        assert torch.equal(v, ema.shadow["model"][k])


def test_weight_average_round_trips_through_a_checkpoint_and_refuses_another_model(tmp_path):
    from visgen.train.checkpoint import load_ema
    from visgen.train.ema import WeightAverage

    net, env = _trained_env()
    ema = WeightAverage({"model": net}, decay=0.99)
    for _ in range(3):
        with torch.no_grad():
            net[0].weight.add_(1.0)
        ema.update({"model": net})
    save_checkpoint(tmp_path / "ck", progress=Progress(step=3, epoch=0, samples_seen=15), modules={"model": net},
                    optimizers=env.optimizers, schedulers=env.schedulers, ema=ema.state_dict())
    assert "ema.safetensors" in read_progress(tmp_path / "ck")[1]["files"]
    again = WeightAverage({"model": net}, decay=0.99)
    again.load_state_dict(load_ema(tmp_path / "ck"), {"model": net})
    assert again.updates == 3
    assert_same(again.shadow, ema.shadow)
    save_checkpoint(tmp_path / "plain", progress=Progress(step=3, epoch=0, samples_seen=15), modules={"model": net},
                    optimizers=env.optimizers, schedulers=env.schedulers)
    assert load_ema(tmp_path / "plain") is None
    with pytest.raises(ValueError, match="does not fit the module"):
        again.load_state_dict(load_ema(tmp_path / "ck"), {"model": torch.nn.Linear(4, 2)})
    with pytest.raises(ValueError, match="holds modules"):
        again.load_state_dict(load_ema(tmp_path / "ck"), {"disc": net})
    with pytest.raises(ValueError, match="ema decay"):
        WeightAverage({"model": net}, decay=1.0)


def test_a_bad_ema_decay_names_the_field():
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="ema_decay"):
            TrainConfig(ema_decay=bad)
    assert TrainConfig().ema_decay is None and TrainConfig(ema_decay=0.995).ema_decay == 0.995
