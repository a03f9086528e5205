"""HopSupSup: Hopfield storage of neuron masks and their recovery (reference doc §1.9)."""
import json

import pytest
import torch

from supsup_fast.runs import run_experiment
from supsup_fast.algorithms.hopsupsup import HopSettings, accuracy, recover_masks, set_masks, train_task
from supsup_fast.runs.config import make_config
from supsup_fast.data import load_benchmark
from supsup_fast.models import build_model
from supsup_fast.nn.hopfield import HopfieldStore, NeuronMaskBatchNorm


def naive_storkey(patterns, d):
    psi = torch.zeros(d, d, dtype=torch.float64)
    for x in patterns:
        h = psi @ x
        new = torch.zeros_like(psi)
        for i in range(d):
            for j in range(d):
                new[i, j] = psi[i, j] + (x[i] * x[j] - float(i == j) - x[i] * h[j] - h[i] * x[j]) / d
        psi = new
    return psi


def test_store_matches_the_rule_elementwise(rng):
    d = 13
    masks = [torch.rand(d, generator=rng) < 0.5 for _ in range(4)]
    store = HopfieldStore(d)
    for m in masks:
        store.store(m)
    expect = naive_storkey([m.double() * 2 - 1 for m in masks], d)
    torch.testing.assert_close(store.psi.double(), expect, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(store.mean_pattern(), torch.stack([m.float() * 2 - 1 for m in masks]).mean(0))
    with pytest.raises(ValueError, match=r"mask must have shape \[13\]"):
        store.store(torch.ones(12))


def test_stored_patterns_are_attractors(rng):
    d = 512
    masks = [torch.rand(d, generator=rng) < 0.5 for _ in range(5)]
    store = HopfieldStore(d)
    for m in masks:
        store.store(m)
    for m in masks:
        x = m.float() * 2 - 1
        assert torch.equal(torch.sign(store.psi @ x), x)  # one synchronous update keeps the pattern
        flipped = x.clone()
        flipped[:40] *= -1  # 40 corrupted neurons come back in one update
        assert torch.equal(torch.sign(store.psi @ flipped), x)
        assert store.energy(x) < store.energy(flipped)


def test_neuron_mask_bn_uses_batch_stats_and_masks_channels():
    bn = NeuronMaskBatchNorm(4)
    x = torch.randn(32, 4) * 3 + 1
    bn.mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
    y = bn(x)
    ref = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(y, ref * bn.mask)
    bn.scores = torch.nn.Parameter(torch.tensor([0.5, -0.1, 0.0, -2.0]))
    y = bn(x)
    y.sum().backward()
    assert torch.equal(bn.current_mask(), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert bn.scores.grad is not None and bn.scores.grad.abs().sum() > 0  # straight-through


def test_train_store_and_recover_two_tasks():
    tasks = load_benchmark("split-mnist-10", 2, 1)  # embedded subset
    model = build_model("bnnet", 10, seed=1)
    s, dev = HopSettings(), torch.device("cpu")
    true = [train_task(model, tasks.train(t), s, device=dev, generator=torch.Generator().manual_seed(t)) for t in range(2)]
    for t in range(2):
        # Recover from unlabelled batches (the training images here, for enough steps on the subset).
        rec = recover_masks(model, tasks.train(t), s, device=dev, generator=torch.Generator().manual_seed(5 + t),
                            true_masks=true[t])
        assert rec.bit_errors == 0 and rec.first_exact_step is not None and rec.first_exact_step < 40
        got = accuracy(model, tasks.test(t), 64, device=dev)
        set_masks(model, true[t])
        assert got == accuracy(model, tasks.test(t), 64, device=dev) and got > 0.9


def test_hopsupsup_run_and_resume(tmp_path):
    cfg = make_config(overrides=dict(scenario="GNu", benchmark="split-mnist-10", model="bnnet", inference="hopfield",
                                     output_size=10, tasks=2, iters=None, epochs=1, lr=0.1, optimizer="sgd",
                                     weight_decay=1e-4, test_batch_size=64, hop_recovery_trials=2, train_subset=2000))
    res = run_experiment(cfg, tmp_path / "hop", progress=False)
    hop = res["hopsupsup"]
    assert len(hop["recovered_exactly"]) == 2 and hop["recovery_trials"] == 2
    assert res["hopfield_bytes"] == 2 * (2048 * 2048 + 2048) * 4
    assert (tmp_path / "hop" / "hopfield.safetensors").is_file() and (tmp_path / "hop" / "accuracy.png").is_file()
    again = run_experiment(cfg, tmp_path / "hop", resume=True, progress=False)
    assert again["timing"]["tasks_resumed"] == 2
    assert again["accuracy_after_training"] == res["accuracy_after_training"]
    assert again["per_task_accuracy"] == res["per_task_accuracy"]


def test_hopfield_config_errors(tmp_path):
    with pytest.raises(ValueError, match="--inference hopfield"):
        make_config(overrides=dict(model="lenet", inference="hopfield"))
    with pytest.raises(ValueError, match="bnnet only with hopfield"):
        make_config(overrides=dict(model="bnnet", inference="oneshot"))
    ck = tmp_path / "hop" / "checkpoints"
    ck.mkdir(parents=True)
    (ck / "hopfield.safetensors").write_bytes(b"garbage")
    cfg = make_config(overrides=dict(benchmark="split-mnist-10", model="bnnet", inference="hopfield", output_size=10,
                                     tasks=1, iters=None, epochs=1))
    (tmp_path / "hop" / "config.json").write_text(json.dumps(cfg.to_dict()))
    from supsup_fast.runs.rundir import RunDirError
    with pytest.raises(RunDirError, match=r"hopfield.safetensors is unusable: .*corrupt.*Delete it"):
        run_experiment(cfg, tmp_path / "hop", resume=True, progress=False)
