"""The algorithms' Python API refuses what the CLI's config refuses: settings out of range, an empty
split (no step would train the mask appended as learned), a mask index past the bank, calibration
factors of the wrong length, and a bad query to alpha_gradient / alpha_gradients_batched."""
import math

import numpy as np
import pytest
import torch

import supsup_fast.nn as snn
from supsup_fast.algorithms import EvalSettings, TrainSettings, evaluate_task, train_task
from supsup_fast.algorithms.inference import alpha_gradient, alpha_gradients_batched, infer_oneshot, \
    infer_oneshot_batched, infer_task
from supsup_fast.data.tasks import TaskSplit
from supsup_fast.models import build_model


def _split(n: int) -> TaskSplit:
    g = torch.Generator().manual_seed(n)
    return TaskSplit(torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g))


@pytest.mark.parametrize("field,value", [("lr", math.inf), ("lr", 0.0), ("lr", float("nan")), ("weight_decay", -1.0),
                                         ("iters", 0), ("epochs", 0), ("batch_size", 0), ("batch_size", 2.5),
                                         ("optimizer", "lbfgs"), ("scheduler", "step"), ("momentum", True)])
def test_train_settings_out_of_range_are_refused(field, value):
    with pytest.raises(ValueError, match=rf"TrainSettings\.{field} must be"):
        TrainSettings(**{field: value})
    TrainSettings(iters=None)  # full epochs
    TrainSettings(epochs=np.int64(2), batch_size=np.int32(8), lr=np.float32(0.1))  # numpy numbers are numbers
    s = TrainSettings()
    setattr(s, field, value)  # reassigned after construction: train_task checks again
    with pytest.raises(ValueError, match=rf"TrainSettings\.{field} must be"):
        train_task(build_model("lenet", 10, seed=1), _split(8), s, device=torch.device("cpu"))


@pytest.mark.parametrize("field,value", [("scenario", "GX"), ("inference", "hopfield"), ("objective", "nll"),
                                         ("calibration", "zscore"), ("infer_images", 0), ("batch_size", -1),
                                         ("log_base", 1.0), ("log_base", math.inf)])
def test_eval_settings_out_of_range_are_refused(field, value):
    with pytest.raises(ValueError, match=rf"EvalSettings\.{field} must be"):
        EvalSettings(**{field: value})
    EvalSettings(infer_images=np.int64(1), batch_size=np.int64(8), log_base=np.float64(2.0))
    s = EvalSettings()
    setattr(s, field, value)  # reassigned after construction: evaluate_task checks again
    with pytest.raises(ValueError, match=rf"EvalSettings\.{field} must be"):
        evaluate_task(build_model("lenet", 10, seed=1), _split(8), 0, s, device=torch.device("cpu"), num_labels=10)


def test_training_on_an_empty_split_is_refused_and_appends_no_mask():
    m = build_model("lenet", 10, seed=1)
    with pytest.raises(ValueError, match=r"split \(the task's training data\) is empty"):
        train_task(m, _split(0), TrainSettings(iters=3), device=torch.device("cpu"))
    assert snn.num_tasks(m) == 0
    train_task(m, _split(20), TrainSettings(iters=2, batch_size=8), device=torch.device("cpu"))
    assert snn.num_tasks(m) == 1


def test_train_task_takes_a_device_name_and_refuses_a_split_that_is_not_one():
    m = build_model("lenet", 10, seed=1)
    s = _split(20)
    with pytest.raises(TypeError, match="split must be a task split with batches"):
        train_task(m, (s.x, s.y), TrainSettings(iters=2, batch_size=8), device="cpu")
    with pytest.raises(ValueError, match="device must name a torch device .* got 'gpu'"):
        train_task(m, s, TrainSettings(iters=2, batch_size=8), device="gpu")
    assert snn.num_tasks(m) == 0
    train_task(m, s, TrainSettings(iters=2, batch_size=8), device="cpu")
    assert snn.num_tasks(m) == 1


@pytest.mark.parametrize("scenario", ["GG", "GNu", "GNs"])
def test_evaluating_a_task_past_the_bank_is_refused(model, scenario):
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match=r"task \(the mask that counts as inferred correctly.*\[0, 3\).*got 3"):
        evaluate_task(model, _split(16), 3, EvalSettings(scenario=scenario), device=cpu, num_labels=10)
    with pytest.raises(ValueError, match=r"expected \(the mask that counts as inferred correctly\).*got -1"):
        evaluate_task(model, _split(16), 0, EvalSettings(scenario=scenario), device=cpu, num_labels=10, expected=-1)
    res = evaluate_task(model, _split(16), 2, EvalSettings(scenario=scenario, batch_size=8), device=cpu, num_labels=10)
    assert res.batches == 2
    assert evaluate_task(model, _split(16), np.int64(2), EvalSettings(scenario=scenario, batch_size=8), device=cpu,
                         num_labels=10).accuracy == res.accuracy  # a numpy index is an index


def test_nns_evaluation_accepts_no_mask_but_not_past_the_bank(model):
    cpu = torch.device("cpu")
    res = evaluate_task(model, _split(16), 7, EvalSettings(scenario="NNs", batch_size=8), device=cpu, num_labels=10,
                        expected=-1)
    assert res.inferred_correctly == 0.0
    with pytest.raises(ValueError, match=r"\[0, 3\) for the model's 3 learned masks or -1"):
        evaluate_task(model, _split(16), 7, EvalSettings(scenario="NNs"), device=cpu, num_labels=10, expected=3)


def test_evaluating_an_empty_test_split_is_refused(model):
    with pytest.raises(ValueError, match=r"split \(task 1's test data\) is empty"):
        evaluate_task(model, _split(0), 1, EvalSettings(), device=torch.device("cpu"), num_labels=10)


def test_calibration_factors_of_the_wrong_length_are_refused(model):
    x, cpu = torch.randn(2, 784), torch.device("cpu")
    for call in (lambda s: infer_oneshot(model, x[:1], scale=s), lambda s: infer_task(model, x[:1], "binary", scale=s),
                 lambda s: infer_oneshot_batched(model, x, scale=s)):
        with pytest.raises(ValueError, match=r"scale \(the per-mask calibration factors\).*k = 3, got \(2,\)"):
            call(torch.ones(2))
        call(torch.ones(3))
    with pytest.raises(ValueError, match=r"alpha_scale \(the per-mask calibration factors\).*k = 3, got \(4,\)"):
        evaluate_task(model, _split(8), 0, EvalSettings(calibration="entropy"), device=cpu, num_labels=10,
                      alpha_scale=torch.ones(4))


@pytest.mark.parametrize("bad,match", [(torch.full((1, 784), math.nan), "holds NaN"),
                                       (torch.zeros(0, 784), "is empty"),
                                       (torch.randn(1, 783), "has 783 values per image"),
                                       ([[0.0] * 784], "must be a tensor")])
def test_alpha_gradients_check_the_query_as_task_inference_does(model, bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        alpha_gradient(model, bad, "entropy", 10)
    with pytest.raises((ValueError, TypeError), match=match):
        alpha_gradients_batched(model, bad, "entropy", 10)


def test_task_inference_takes_integer_inputs_of_a_model_that_embeds_them():
    """A converted model that begins with an nn.Embedding infers tasks from token ids."""
    import supsup_fast as ss
    from torch import nn
    net = nn.Sequential(nn.Embedding(50, 8), nn.Flatten(), nn.Linear(8 * 4, 6))
    model = ss.convert(net)
    for t in range(3):
        snn.begin_task(model, generator=torch.Generator().manual_seed(t))
        snn.finish_task(model)
    tokens = torch.randint(0, 50, (2, 4))
    assert alpha_gradient(model, tokens, "entropy", 6).shape == (3,)
    assert 0 <= infer_oneshot(model, tokens, num_labels=6) < 3
