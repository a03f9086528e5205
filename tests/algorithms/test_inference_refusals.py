"""Issue #16, inference: uniform superposition with a non-uniform α, images holding NaN/inf, and a
model with no task are refused instead of giving a silently wrong task."""
import pytest
import torch

import supsup_fast.nn as snn
from supsup_fast.algorithms import infer_binary, infer_oneshot
from supsup_fast.algorithms.inference import infer_oneshot_batched, infer_task
from supsup_fast.models import build_model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("lenet", 100, seed=1)
    for t in range(3):
        snn.begin_task(m, generator=torch.Generator().manual_seed(t))
        snn.finish_task(m)
    m.eval()
    return m


def test_uniform_superposition_with_non_uniform_alpha_is_refused(model):
    x = torch.randn(4, 784)
    alpha = torch.tensor([0.98, 0.01, 0.01])
    with pytest.raises(ValueError, match=r"uniform=True needs alpha = 1/k"):
        with snn.superposition(model, alpha, uniform=True):
            model(x)
    # The same α without the promise is what the check protects: it differs from the uniform result.
    with torch.no_grad():
        with snn.superposition(model, alpha):
            general = model(x)
        with snn.superposition(model, torch.full((3,), 1 / 3), uniform=True):
            uniform = model(x)
        with snn.superposition(model, torch.full((3,), 1 / 3)):
            uniform_general = model(x)
    assert not torch.allclose(general, uniform)
    torch.testing.assert_close(uniform, uniform_general, rtol=1e-4, atol=1e-5)
    # An active subset is uniform over its own size.
    active = torch.tensor([0, 2])
    with snn.superposition(model, torch.full((2,), 0.5), active=active, uniform=True):
        model(x)
    with pytest.raises(ValueError, match="uniform=True"):
        with snn.superposition(model, torch.full((2,), 1 / 3), active=active, uniform=True):
            model(x)


def test_layer_level_uniform_superposition_checks_alpha_too():
    """The layer method that takes ``uniform`` validates α itself: calling it directly (not through
    snn.superposition) cannot give the uniform result for a non-uniform α."""
    torch.manual_seed(0)
    layer = snn.SupermaskLinear(30, 8, seed=1)
    for t in range(2):
        snn.begin_task(layer, generator=torch.Generator().manual_seed(t))
        snn.finish_task(layer)
    before = layer.mode()
    with pytest.raises(ValueError, match=r"uniform=True needs alpha = 1/k = 0\.5 .*alpha values in \[0\.1, 0\.9\]"):
        layer.set_mode_superpose(torch.tensor([0.9, 0.1]), None, True)
    assert layer.mode() == before  # refused before the mode changed
    with pytest.raises(ValueError, match="alpha"):  # over an active subset, uniform over its own size
        layer.set_mode_superpose(torch.tensor([0.7, 0.3]), torch.tensor([0, 1]), True)
    layer.set_mode_superpose(torch.tensor([1.0]), torch.tensor([1]), True)
    with pytest.raises(ValueError, match=r"alpha must have shape \[k\] = \[2\]"):
        layer.set_mode_superpose(torch.full((3,), 1 / 3), None, True)
    # The uniform α passes, and gives the general superposition's output.
    x = torch.randn(4, 30)
    layer.set_mode_superpose(torch.full((2,), 0.5), None, True)
    uniform = layer(x)
    layer.set_mode_superpose(torch.full((2,), 0.5), None, False)
    torch.testing.assert_close(uniform, layer(x), rtol=1e-5, atol=1e-6)
    # The α the check passed once is checked again after an in-place change.
    alpha = torch.full((2,), 0.5)
    layer.set_mode_superpose(alpha, None, True)
    alpha[0] = 0.9
    with pytest.raises(ValueError, match="uniform=True needs alpha"):
        layer.set_mode_superpose(alpha, None, True)
    # A failed model-wide call leaves no layer switched (the check runs before any mode changes).
    model = torch.nn.Sequential(layer)
    snn.set_task(model, 1)
    with pytest.raises(ValueError, match="uniform=True needs alpha"):
        snn.set_superposition(model, torch.tensor([0.9, 0.1]), uniform=True)
    assert layer.mode().kind == "task"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_superposition_refuses_non_finite_alpha(model, bad):
    alpha = torch.full((3,), 1 / 3)
    alpha[0] = bad
    with pytest.raises(ValueError, match="alpha contains"):
        with snn.superposition(model, alpha):
            pass


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_infer_task_refuses_non_finite_images(model, bad):
    x = torch.rand(2, 784)
    x[1, 17] = bad
    what = "NaN" if bad != bad else "±inf"
    for call in (lambda: infer_task(model, x), lambda: infer_oneshot(model, x),
                 lambda: infer_binary(model, x), lambda: infer_task(model, x, "binary"),
                 lambda: infer_oneshot_batched(model, x)):
        with pytest.raises(ValueError, match=f"holds {what}"):
            call()
    assert 0 <= infer_task(model, torch.rand(2, 784)) < 3  # finite images still work


def test_infer_task_other_bad_inputs(model):
    with pytest.raises(ValueError, match="is empty"):
        infer_task(model, torch.zeros(0, 784))
    with pytest.raises(TypeError, match="floating-point"):
        infer_task(model, torch.zeros(2, 784, dtype=torch.uint8))
    with pytest.raises(ValueError, match="log_base must be a finite number > 1"):
        infer_binary(model, torch.rand(2, 784), log_base=float("nan"))
    empty = build_model("lenet", 100, seed=1)
    with pytest.raises(ValueError, match="at least one learned task"):
        infer_task(empty, torch.rand(2, 784))
    with pytest.raises(ValueError, match=r"must be a batch \[B, \.\.\.\] with B >= 1, got shape \(784,\) \(x\[None\] for one image\)"):
        infer_task(model, torch.rand(784))
    for x in (torch.rand(1, 100), torch.rand(2, 1, 27, 28)):
        with pytest.raises(ValueError, match=rf"has {x[0].numel()} values per image, .* the model's first layer takes 784"):
            infer_task(model, x)
    assert 0 <= infer_task(model, torch.rand(2, 1, 28, 28)) < 3  # images flatten to the first layer's 784


def test_layers_name_their_own_input_size():
    """A wrong input width is named by the layer, not by the packed operands of the ops beneath it."""
    import torch.nn.functional as F
    linear = snn.SupermaskLinear(784, 64)
    snn.begin_task(linear)
    snn.finish_task(linear)
    conv = snn.SupermaskConv2d(3, 8, 3)
    for layer, bad, message in ((linear, torch.rand(2, 100), r"SupermaskLinear\(in_features=784\) needs x of shape \[\*, 784\], got shape \(2, 100\)"),
                                (linear, torch.rand(2, 783), r"in_features=784.* got shape \(2, 783\)"),
                                (conv, torch.rand(2, 4, 9, 9), r"SupermaskConv2d\(in_channels=3\) needs x of shape \[N, 3, H, W\]")):
        snn.begin_task(layer) if layer is conv else snn.set_task(layer, 0)
        with pytest.raises(ValueError, match=message):
            layer(bad)
        with pytest.raises(ValueError, match=message):  # the superposition too
            if layer is linear:
                with snn.superposition(layer, torch.ones(1, requires_grad=True)):
                    layer(bad)
            else:
                layer(bad)
    assert linear(torch.rand(2, 784)).shape == (2, 64)
    assert F.relu(conv(torch.rand(2, 3, 9, 9))).shape == (2, 8, 7, 7)


def test_evaluate_task_refuses_more_inference_images_than_a_batch(model):
    from supsup_fast.algorithms.evaluation import EvalSettings, evaluate_task
    from supsup_fast.data.tasks import TaskSplit
    split = TaskSplit(torch.rand(40, 784), torch.zeros(40, dtype=torch.long), None)
    with pytest.raises(ValueError, match="infer_images 20 exceeds the test batch size 16"):
        evaluate_task(model, split, 0, EvalSettings(infer_images=20, batch_size=16), device=torch.device("cpu"),
                      num_labels=10)
    r = evaluate_task(model, split, 0, EvalSettings(infer_images=16, batch_size=16), device=torch.device("cpu"),
                      num_labels=10)
    assert r.batches == 3


@pytest.mark.parametrize("field,value", [("recovery_lr", -5.0), ("recovery_lr", float("nan")), ("lr", 0.0),
                                         ("gamma", float("inf")), ("test_batch_size", 0), ("epochs", True)])
def test_hopsupsup_settings_refuse_bad_values(field, value):
    from supsup_fast.algorithms.hopsupsup import HopSettings
    with pytest.raises(ValueError, match=f"HopSupSup {field}"):
        HopSettings(**{field: value})
    HopSettings()


@pytest.mark.parametrize("bad", [150, 0, -1, 2.5, True])
def test_num_labels_outside_the_models_outputs_is_refused(model, bad):
    from supsup_fast.algorithms.inference import alpha_gradient, alpha_gradients_batched
    x = torch.randn(1, 784)
    for call in (lambda: infer_task(model, x, "oneshot", "superfluous", num_labels=bad),  # G reads num_labels
                 lambda: infer_task(model, torch.randn(3, 784), "binary", "superfluous", num_labels=bad),
                 lambda: alpha_gradient(model, x, "superfluous", bad),
                 lambda: alpha_gradients_batched(model, torch.randn(2, 784), "superfluous", bad)):
        with pytest.raises(ValueError, match=r"num_labels \(the real classes\) must be an int in \[1, 100\]"):
            call()


def test_binary_inference_stops_when_a_round_rules_nothing_out(model, monkeypatch):
    """A base just above 1 keeps ceil(n / base) = n tasks every round: the rounds then repeat one
    another, and the loop stops at the first (it ran log_base(k) + 1 ≈ 1.1e7 rounds at 1.0000001)."""
    from supsup_fast.algorithms import inference
    x = torch.randn(1, 784)
    oneshot = infer_oneshot(model, x)
    calls = []
    real = inference._alpha_gradient
    monkeypatch.setattr(inference, "_alpha_gradient", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert infer_binary(model, x, log_base=1.0000001) == oneshot
    assert len(calls) == 1


def test_alpha_gradients_of_a_model_without_tasks_are_refused():
    from supsup_fast.algorithms.inference import alpha_gradient, alpha_gradients_batched
    empty = build_model("lenet", 20, seed=1)
    with pytest.raises(ValueError, match="needs at least one learned task"):
        alpha_gradient(empty, torch.randn(1, 784), "entropy", 10)
    with pytest.raises(ValueError, match="needs at least one learned task"):
        alpha_gradients_batched(empty, torch.randn(2, 784), "entropy", 10)
