"""Per-mask calibration of task inference (algorithms.calibration) and the per-query record of
inferred tasks (the confusion counts of an evaluation)."""
import math

import pytest
import torch

from supsup_fast.algorithms import TrainSettings, alpha_gradient, infer_binary, infer_oneshot, train_task
from supsup_fast.algorithms.calibration import CALIBRATIONS, alpha_scale, mask_baselines
from supsup_fast.algorithms.evaluation import EvalSettings, evaluate_task
from supsup_fast.algorithms.inference import alpha_gradients_batched, infer_oneshot_batched
from supsup_fast.data import PermutedMNIST, load_embedded
from supsup_fast.data.tasks import TaskSplit
from supsup_fast.models import build_model
from supsup_fast.nn import set_task
from supsup_fast.runs.loop import confusions

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def trained():
    tasks = PermutedMNIST(load_embedded(), 3, seed=1)
    model = build_model("lenet", 100, seed=1)
    for t in range(3):
        split = tasks.train(t)
        train_task(model, TaskSplit(split.x[:2000], split.y[:2000], split.transform),
                   TrainSettings(iters=60, batch_size=128, lr=1e-3), device=CPU,
                   generator=torch.Generator().manual_seed(t))
    return model, tasks


def test_baselines_are_each_masks_own_outputs(trained):
    model, tasks = trained
    base = mask_baselines(model, [tasks.train(t) for t in range(3)], CPU, images=200)
    for t in range(3):
        set_task(model, t)
        x, _ = tasks.train(t).batch(torch.arange(200))
        with torch.no_grad():
            z = model(x)
        logp = torch.log_softmax(z, 1)
        assert math.isclose(base["entropy"][t], float(-(logp.exp() * logp).sum(1).mean()), rel_tol=1e-5)
        c = z - z.mean(1, keepdim=True)
        assert math.isclose(base["logit_norm"][t], float((c.norm(dim=1) / 10).mean()), rel_tol=1e-5)
    assert bool((base["entropy"] > 0).all()) and bool((base["entropy"] < math.log(100)).all())
    with pytest.raises(ValueError, match="images"):
        mask_baselines(model, [tasks.train(0)], CPU, images=0)


def test_alpha_scale():
    base = {"entropy": torch.tensor([0.5, 2.0, 10.0]), "logit_norm": torch.tensor([2.0, 0.5, 0.0])}
    assert alpha_scale("none", base, 100) is None
    torch.testing.assert_close(alpha_scale("entropy", base, 100),
                               torch.tensor([1 / math.sqrt(math.log(100) - 0.5), 1 / math.sqrt(math.log(100) - 2.0),
                                             1 / math.sqrt(1e-6)]))
    torch.testing.assert_close(alpha_scale("logit-norm", base, 100), torch.tensor([0.5, 2.0, 1e6]))
    assert CALIBRATIONS == ("none", "entropy", "logit-norm")
    with pytest.raises(ValueError, match="calibration must be one of"):
        alpha_scale("zscore", base, 100)
    with pytest.raises(ValueError, match="baselines"):
        alpha_scale("entropy", None, 100)


def test_scaled_inference_is_the_argmin_of_the_scaled_gradient(trained):
    model, tasks = trained
    scale = torch.tensor([3.0, 0.2, 1.0])  # strong enough to move some argmins
    xs = torch.cat([tasks.test(t).batch(torch.arange(4))[0] for t in range(3)])
    moved = 0
    for x in xs:
        g = alpha_gradient(model, x[None], "entropy", 10)
        assert infer_oneshot(model, x[None], scale=scale) == int((g * scale).argmin())
        moved += int((g * scale).argmin() != g.argmin())
    assert moved > 0
    batched = infer_oneshot_batched(model, xs, scale=scale)
    assert torch.equal(batched, (alpha_gradients_batched(model, xs) * scale).argmin(1))
    # Binary inference with a scale: with 3 tasks its first round keeps the 2 lowest scaled gradients.
    for x in xs[:4]:
        g = alpha_gradient(model, x[None], "entropy", 10) * scale
        assert infer_binary(model, x[None], scale=scale) in g.argsort()[:2].tolist()


def test_evaluation_records_inferred_tasks(trained):
    model, tasks = trained
    res = evaluate_task(model, tasks.test(1), 1, EvalSettings(scenario="GNu", batch_size=256), device=CPU,
                        num_labels=10)
    assert len(res.inferred_tasks) == res.batches
    assert math.isclose(res.inferred_correctly, sum(c == 1 for c in res.inferred_tasks) / res.batches)
    assert confusions([1, 0, 1, 2, 0], 1) == {"0": 2, "2": 1}
    assert evaluate_task(model, tasks.test(1), 1, EvalSettings(scenario="GG"), device=CPU,
                         num_labels=10).inferred_tasks is None
    with pytest.raises(ValueError, match="alpha_scale"):
        evaluate_task(model, tasks.test(1), 1, EvalSettings(scenario="GNu", calibration="entropy"), device=CPU,
                      num_labels=10)
