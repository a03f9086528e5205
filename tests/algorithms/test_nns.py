"""NNs: mask allocation without task identity (reference doc §1.8)."""
import pytest
import torch

from supsup_fast import ops
from supsup_fast.runs import run_experiment
from supsup_fast.algorithms.nns import MaskAllocator, NNsSettings
from supsup_fast.runs.config import make_config
from supsup_fast.models import build_model
from supsup_fast.nn import begin_task, finish_task, num_tasks, supermask_layers

NNS = dict(scenario="NNs", model="lenet", tasks=3, iters=200, output_size=100, lr=1e-3, nns_check_every=100,
           train_subset=4000, eval_at=[2])


def test_nns_allocates_one_mask_per_true_task(tmp_path):
    res = run_experiment(make_config(overrides=NNS), tmp_path / "run", progress=False)
    assert res["num_masks"] == 3
    assert res["nns"]["mask_for_true_task"] == [0, 1, 2]
    assert res["nns"]["new_masks_per_true_task"] == [1, 1, 1]
    decisions = res["nns"]["decisions"]
    # 4000 images = 32 batches per epoch, 3 epochs at most: a decision at the start of each epoch
    # (epoch-local batch index % 100 == 0, as the official trainer); only the first allocates.
    for t in range(3):
        mine = [d for d in decisions if d["true_task"] == t]
        assert [d["batch"] for d in mine] == [0, 32, 64] and mine[0]["new"] and not any(d["new"] for d in mine[1:])
        assert all(d["mask"] == t for d in mine)
    assert all(d["superposed"] == 5 for d in decisions[1:])  # K = max(masks, 5)
    assert res["average_accuracy"] > 0.75 and res["task_inference_accuracy"] > 0.9
    assert len(res["accuracy_matrix"]) == 2  # after 2 and 3 true tasks


@pytest.mark.parametrize("spacing,resumed_tasks", [(64, 2), (0.25, 0)])
def test_nns_resume_matches_uninterrupted(tmp_path, monkeypatch, spacing, resumed_tasks):
    # spacing 64: a checkpoint after every true task while few masks are held; 0.25: one every 4 ×
    # masks true tasks, so none before the interruption, and the resume retrains from the start
    from supsup_fast.runs.nns import NNsRun
    monkeypatch.setattr(NNsRun, "CHECKPOINT_SPACING", spacing)
    cfg = make_config(overrides=dict(NNS, tasks=3, eval_at=[]))
    full = run_experiment(cfg, tmp_path / "full", progress=False)
    real = MaskAllocator.train_true_task
    calls = []

    def crashing(self, true_task, *a, **kw):
        if true_task == 2 and not calls:
            calls.append(1)
            raise KeyboardInterrupt
        return real(self, true_task, *a, **kw)

    monkeypatch.setattr(MaskAllocator, "train_true_task", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "cut", progress=False)
    resumed = run_experiment(cfg, tmp_path / "cut", resume=True, progress=False)
    assert resumed["timing"]["tasks_resumed"] == resumed_tasks
    assert resumed["per_task_accuracy"] == full["per_task_accuracy"]
    assert resumed["nns"]["decisions"] == full["nns"]["decisions"]


def test_mask_budget_stops_allocation(tmp_path):
    from supsup_fast.runs import evaluate_run
    res = run_experiment(make_config(overrides=dict(NNS, tasks=2, mask_budget=1, eval_at=[])), tmp_path / "r", progress=False)
    # Fewer masks than true tasks: re-evaluation still covers every true task.
    again = evaluate_run(tmp_path / "r", {}, tmp_path / "e", progress=False)
    assert len(again["per_task_accuracy"]) == 2 and again["num_masks"] == 1
    assert res["num_masks"] == 1
    second = [d for d in res["nns"]["decisions"] if d["true_task"] == 1]
    assert second[0]["new"] and second[0]["mask"] is None  # over budget: not trained
    assert res["nns"]["mask_for_true_task"][1] in (None, 0)


def test_decide_allocates_for_untrained_superposition():
    # One untrained mask and four random slots: the data fits none better than the others, so
    # K·max softmax stays below 1 + ε and a new mask is allocated.
    model = build_model("lenet", 20, seed=3)
    alloc = MaskAllocator(model, NNsSettings(), seed=1)
    begin_task(model, generator=torch.Generator().manual_seed(0))
    finish_task(model)
    mask, new, confidence, big_k = alloc.decide(torch.randn(64, 784))
    assert (mask, new, big_k) == (1, True, 5) and confidence < 1.125 / 5
    assert num_tasks(model) == 1  # the random slots were removed again


def test_random_slot_is_the_slot_initial_mask():
    """A slot's untrained mask is the mask a fresh task starts from when its scores are drawn from
    the slot's generator (seed (7919·(seed+1)·1000003 + slot)): built here through the public
    begin_task/finish_task path, not through the allocator's own helpers."""
    model = build_model("lenet", 20, seed=3)
    alloc = MaskAllocator(model, NNsSettings(), seed=1)
    words = alloc._random_slot_words(range(2, 4))
    fresh = build_model("lenet", 20, seed=3)
    for slot in (2, 3):
        begin_task(fresh, generator=torch.Generator().manual_seed(7_919 * 2 * 1_000_003 + slot))
        finish_task(fresh)
    for name, layer in supermask_layers(fresh).items():
        assert torch.equal(words[name], layer.bank.words), name
        assert not torch.equal(words[name][0], words[name][1])
    assert num_tasks(model) == 0  # drawing slot masks does not touch the model's bank


def test_scores_from_bits_and_commit_overwrite():
    model = build_model("lenet", 20, seed=3)
    for t in range(2):
        begin_task(model, generator=torch.Generator().manual_seed(t))
        finish_task(model)
    layer = next(iter(supermask_layers(model).values()))
    counts_before = layer.counts().clone()
    s = layer.scores_from_bits(0)
    assert torch.equal((s >= 0).reshape(layer.weight.shape[0], -1), ops.unpack_bits(layer.bank.words[0], layer.n).bool())
    layer.train_scores(torch.nn.Parameter(-s))  # the complement of mask 0
    layer.commit_mask(0)
    assert torch.equal(ops.unpack_bits(layer.bank.words[0], layer.n).bool(), (s < 0).reshape(layer.weight.shape[0], -1))
    assert not torch.equal(layer.counts(), counts_before)  # the count cache was rebuilt
    with pytest.raises(ValueError, match="slot must be in"):
        layer.commit_mask(5)
    with pytest.raises(ValueError, match="task must be in"):
        layer.scores_from_bits(2)


def test_nns_config_errors():
    with pytest.raises(ValueError, match="NNs needs an MLP"):
        make_config(overrides=dict(scenario="NNs", benchmark="split-cifar100", model="gemresnet18"))
    with pytest.raises(ValueError, match="--transfer does not apply"):
        make_config(overrides=dict(scenario="NNs", model="lenet", transfer=True))
    with pytest.raises(ValueError, match="--mask-budget"):
        make_config(overrides=dict(scenario="NNs", mask_budget=0))
    with pytest.raises(ValueError, match="without per-task BatchNorm"):
        MaskAllocator(build_model("gemresnet18", 5), NNsSettings(), seed=1)
