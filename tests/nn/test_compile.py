"""torch.compile(fullgraph=True) of models built from the layers, in every mode a user runs them:
one task at one and several rows, the superposition of one and of several images (uniform and
general α, its α-gradient), and a training step (the scores' straight-through gradient). Each
compiled result is checked against the same model run eagerly. The conv case is in test_convert."""
import pytest
import torch
import torch.nn as nn

import supsup_fast as ss
from supsup_fast import nn as snn
from supsup_fast.models import build_model


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "lenet":
        model = build_model("lenet", 10)  # signed-constant weights: the sign-bit path when eager
    elif kind == "converted":
        model = ss.convert(nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 10)), weights="signed_constant")
    else:
        model = nn.Sequential(snn.SupermaskLinear(40, 24, init="kaiming_normal", seed=1), nn.ReLU(),
                              snn.SupermaskLinear(24, 10, init="kaiming_normal", seed=2))
    for _ in range(3):  # three tasks with random scores
        snn.begin_task(model)
        snn.finish_task(model)
    return model


def _inputs(model: nn.Module, rows: int) -> torch.Tensor:
    first = next(iter(snn.supermask_layers(model).values()))
    return torch.randn(rows, first.in_features)


def _compiled(model):
    torch._dynamo.reset()
    return torch.compile(model, fullgraph=True, backend="aot_eager")


@pytest.mark.parametrize("kind", ["lenet", "converted", "kaiming_normal"])
def test_one_task_at_one_and_eight_rows(kind):
    model = _model(kind)
    snn.set_task(model, 1)
    compiled = _compiled(model)
    for rows in (1, 8):
        x = _inputs(model, rows)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["lenet", "converted", "kaiming_normal"])
@pytest.mark.parametrize("uniform", [True, False])
def test_superposition_alpha_gradient_of_one_and_of_two_images(kind, uniform):
    model = _model(kind)
    compiled = _compiled(model)
    for rows in (1, 2):  # one compiled model, both shapes: a recompile must not trip on the layers' caches
        x = _inputs(model, rows)
        grads = []
        for fn in (compiled, model):
            alpha = torch.full((3,), 1 / 3) if uniform else torch.tensor([0.2, 0.5, 0.3])
            alpha.requires_grad_(True)
            with snn.superposition(model, alpha, uniform=uniform):
                out = fn(x)
            entropy = -(out.softmax(1) * out.log_softmax(1)).sum(1).mean()
            grads.append(torch.autograd.grad(entropy, alpha)[0])
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["lenet", "converted"])
def test_training_step_score_gradients(kind):
    model = _model(kind)
    snn.begin_task(model)
    compiled = _compiled(model)
    x, y = _inputs(model, 8), torch.randint(0, 10, (8,))
    layers = list(snn.supermask_layers(model).values())
    grads = []
    for fn in (compiled, model):
        loss = nn.functional.cross_entropy(fn(x), y)
        grads.append(torch.autograd.grad(loss, [l.scores for l in layers]))
    for got, expect in zip(*grads):
        torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-7)


def test_official_style_model_through_compat():
    """Code written for the official SupSup, with supsup_fast.compat's layers: one task, the
    superposition's α-gradient (alphas [k,1,1]) and a training step, compiled against eager."""
    from supsup_fast.compat import MultitaskMaskLinear, cache_masks, set_alphas, set_model_task, set_num_tasks_learned
    torch.manual_seed(0)
    model = nn.Sequential(MultitaskMaskLinear(40, 24, num_tasks=3, bias=False), nn.ReLU(),
                          MultitaskMaskLinear(24, 10, num_tasks=3, bias=False))
    for t in range(3):
        set_model_task(model, t, verbose=False)
        cache_masks(model)
    set_num_tasks_learned(model, 3)
    set_model_task(model, 1, verbose=False)
    compiled = _compiled(model)
    with torch.no_grad():
        for rows in (1, 8):
            x = torch.randn(rows, 40)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    set_model_task(model, -1, verbose=False)
    for uniform in (True, False):
        compiled = _compiled(model)
        x = torch.randn(1, 40)
        grads = []
        for fn in (compiled, model):
            alphas = (torch.full((3, 1, 1), 1 / 3) if uniform else torch.tensor([0.2, 0.5, 0.3]).view(3, 1, 1)).requires_grad_(True)
            set_alphas(model, alphas, verbose=False)
            out = fn(x)
            entropy = -(out.softmax(1) * out.log_softmax(1)).sum(1).mean()
            grads.append(torch.autograd.grad(entropy, alphas)[0])
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    set_model_task(model, 0, verbose=False)
    compiled = _compiled(model)
    x, y = torch.randn(8, 40), torch.randint(0, 10, (8,))
    scores = [p for p in model.parameters() if p.requires_grad]
    got = torch.autograd.grad(nn.functional.cross_entropy(compiled(x), y), scores)
    expect = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), scores)
    for g, e in zip(got, expect):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
