"""supsup_fast.compat against a float layer written here from the public description of the
official SupSup notebook (RAIVNLab/supsup, mnist.ipynb): every task keeps float scores, the mask is
1[scores >= 0] with a straight-through gradient, weights are signed constants, ``cache_masks``
stacks float masks, and ``task < 0`` computes W ⊙ Σᵢ αᵢ Mᵢ over the tasks with αᵢ > 0."""
from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from supsup_fast import compat, ops
from supsup_fast.compat import settings
from supsup_fast.data import load_benchmark


# -- the float reference ------------------------------------------------------------------------
class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores):
        return (scores >= 0).float()

    @staticmethod
    def backward(ctx, grad):
        return grad


class FloatMultitaskMaskLinear(nn.Linear):
    def __init__(self, *args, num_tasks=1, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_tasks = num_tasks
        self.scores = nn.ParameterList()
        for _ in range(num_tasks):
            s = torch.empty(self.weight.shape)
            nn.init.kaiming_uniform_(s, a=math.sqrt(5))
            self.scores.append(nn.Parameter(s))
        self.weight.requires_grad = False
        with torch.no_grad():
            std = math.sqrt(2.0) / math.sqrt(self.in_features)  # ReLU gain / sqrt(fan_in)
            self.weight.copy_(self.weight.sign() * std)

    @torch.no_grad()
    def cache_masks(self):
        self.register_buffer("stacked", torch.stack([(s >= 0).float() for s in self.scores]))

    def forward(self, x):
        if self.task < 0:
            k = self.num_tasks_learned
            a = self.alphas[:k]
            keep = (a > 0).view(k)
            subnet = (a[keep] * self.stacked[:k][keep]).sum(0)
        else:
            subnet = _StraightThrough.apply(self.scores[self.task])
        return F.linear(x, self.weight * subnet, self.bias)


def _setter(attr, cls):
    def f(model, value, verbose=False):
        for m in model.modules():
            if isinstance(m, cls):
                setattr(m, attr, value)
    return f


FLOAT_API = dict(layer=FloatMultitaskMaskLinear,
                 set_model_task=_setter("task", FloatMultitaskMaskLinear),
                 cache_masks=lambda model: [m.cache_masks() for m in model.modules() if isinstance(m, FloatMultitaskMaskLinear)],
                 set_num_tasks_learned=_setter("num_tasks_learned", FloatMultitaskMaskLinear),
                 set_alphas=_setter("alphas", FloatMultitaskMaskLinear))
COMPAT_API = dict(layer=compat.MultitaskMaskLinear, set_model_task=compat.set_model_task, cache_masks=compat.cache_masks,
                  set_num_tasks_learned=compat.set_num_tasks_learned, set_alphas=compat.set_alphas)


class MultitaskFC(nn.Module):
    """The notebook's model: 784-300-300-100, no bias, ReLU."""

    def __init__(self, layer, hidden, num_tasks):
        super().__init__()
        self.model = nn.Sequential(layer(784, hidden, num_tasks=num_tasks, bias=False), nn.ReLU(),
                                   layer(hidden, hidden, num_tasks=num_tasks, bias=False), nn.ReLU(),
                                   layer(hidden, 100, num_tasks=num_tasks, bias=False))

    def forward(self, x):
        return self.model(x.flatten(1))


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of every distinct storage behind the model's parameters and buffers (capacity included)."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def oneshot(api, model, image, k):
    api["set_model_task"](model, -1, verbose=False)
    alphas = (torch.ones(k, 1, 1) / k).requires_grad_(True)
    api["set_alphas"](model, alphas, verbose=False)
    logits = model(image)
    entropy = -(logits.softmax(dim=1) * logits.log_softmax(dim=1)).sum(1).mean()
    (g,) = torch.autograd.grad(entropy, alphas)
    assert g.shape == (k, 1, 1)
    return int((-g).squeeze().argmax())


def notebook_flow(api, bench, num_tasks=5, batches=25, trials=6):
    torch.manual_seed(0)
    model = MultitaskFC(api["layer"], 300, num_tasks)
    for task in range(num_tasks):
        api["set_model_task"](model, task)
        opt = torch.optim.RMSprop([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        gen = torch.Generator().manual_seed(task)
        for i, (x, y) in enumerate(bench.train(task).batches(128, shuffle=True, generator=gen)):
            if i == batches:
                break
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        api["cache_masks"](model)
        api["set_num_tasks_learned"](model, task + 1)
    gg = []
    with torch.no_grad():
        for task in range(num_tasks):
            api["set_model_task"](model, task)
            test = bench.test(task)
            x, y = test.batch(torch.arange(len(test)))
            gg.append(float((model(x).argmax(1) == y).float().mean()))
    inferred = []
    for task in range(num_tasks):
        test = bench.test(task)
        for j in range(trials):
            x, _ = test.batch(torch.tensor([j * 97]))
            inferred.append((task, oneshot(api, model, x, num_tasks)))
    return model, gg, inferred


@pytest.fixture(scope="module")
def flows():
    bench = load_benchmark("permuted-mnist", 5, seed=0)
    return notebook_flow(FLOAT_API, bench), notebook_flow(COMPAT_API, bench)


def test_notebook_flow_matches_float_layer(flows):
    (ref, gg_ref, inf_ref), (ours, gg_ours, inf_ours) = flows
    assert min(gg_ref) > 0.5  # the short epoch did learn every task
    assert gg_ours == pytest.approx(gg_ref, abs=0.01)
    acc = lambda inf: sum(t == p for t, p in inf) / len(inf)
    assert acc(inf_ours) == pytest.approx(acc(inf_ref), abs=0.05)
    assert acc(inf_ours) >= 0.8
    assert sum(a == b for a, b in zip(inf_ref, inf_ours)) >= 0.9 * len(inf_ref)
    # Same random init and training: the masks agree bit for bit (up to float ties at 0).
    pairs = zip([m for m in ref.modules() if isinstance(m, FloatMultitaskMaskLinear)],
                [m for m in ours.modules() if isinstance(m, compat.MultitaskMaskLinear)])
    for r, o in pairs:
        if True:
            for t in range(5):
                agree = (o.mask(t) == (r.stacked[t] > 0)).float().mean()
                assert agree > 0.999


def test_notebook_flow_holds_bits(flows):
    (ref, _, _), (ours, _, _) = flows
    for m in ours.modules():
        if isinstance(m, compat.MultitaskMaskLinear):
            assert m.bank.words.dtype == torch.int32
            assert m.bank.words.shape == (5, m.out_features, math.ceil(m.in_features / 32))
            floats = [t for t in list(m.parameters()) + list(m.buffers()) if t.is_floating_point()]
            # The weight and the last trained task's scores, kept through the superposition (an
            # optimiser may still hold them); no float mask, no other task's scores.
            assert m.scores.tasks() == [4]
            assert sum(t.numel() for t in floats) == 2 * m.weight.numel()
    assert tensor_bytes(ours) <= 0.25 * tensor_bytes(ref)


# -- layer behaviour ---------------------------------------------------------------------------
def test_rng_and_init_match_the_official_layer():
    torch.manual_seed(3)
    ref = FloatMultitaskMaskLinear(20, 7, num_tasks=3, bias=False)
    after_ref = torch.rand(4)
    torch.manual_seed(3)
    ours = compat.MultitaskMaskLinear(20, 7, num_tasks=3, bias=False)
    assert torch.equal(torch.rand(4), after_ref)  # the rest of a script sees the same random numbers
    assert torch.equal(ours.weight, ref.weight) and not ours.weight.requires_grad
    for t in (2, 0, 1):
        ours.task = t
        assert torch.equal(ours.scores[t], ref.scores[t])


def test_optimizer_trains_exactly_the_current_task():
    m = compat.MultitaskMaskLinear(40, 10, num_tasks=3, bias=False)
    x, y = torch.randn(16, 40), torch.randint(0, 10, (16,))
    for task in range(2):
        compat.set_model_task(m, task, verbose=False)
        params = [p for p in m.parameters() if p.requires_grad]
        assert [n for n, p in m.named_parameters() if p.requires_grad] == [f"scores.{task}"]
        opt = torch.optim.RMSprop(params, lr=1e-2)
        bank_before = m.bank.words.clone()
        before = params[0].detach().clone()
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
        assert not torch.equal(params[0], before)
        assert torch.equal(m.bank.words, bank_before)
        compat.cache_masks(m)
        assert torch.equal(m.mask(task), params[0].detach() >= 0)
    compat.set_model_task(m, 0, verbose=False)  # task 0 again: scores rebuilt from its bits; task 1 is bits only
    assert m.scores.tasks() == [0] and len(m.bank) == 2
    assert torch.allclose(m(x), F.linear(x, m.weight * m.mask(0)), atol=1e-5)


def _chain(layers, x, masks):
    """The MLP's forward with the given masks (float reference, no fused op)."""
    for i, (m, mask) in enumerate(zip(layers, masks)):
        x = F.linear(x if i == 0 else F.relu(x), m.weight * mask.float(), m.bias)
    return x


def test_reselecting_a_finished_task_trains_it_again_from_its_bits():
    torch.manual_seed(0)
    model = MultitaskFC(compat.MultitaskMaskLinear, 64, num_tasks=3)
    layers = [m for m in model.modules() if isinstance(m, compat.MultitaskMaskLinear)]
    x, y = torch.randn(32, 784), torch.randint(0, 100, (32,))
    for task in range(2):
        compat.set_model_task(model, task, verbose=False)
        opt = torch.optim.RMSprop([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        compat.cache_masks(model)
        compat.set_num_tasks_learned(model, task + 1)
    bits = [m.bank.words.clone() for m in layers]
    masks0 = [m.mask(0) for m in layers]
    # task 0's output from its cached bits (one-hot alphas: the packed-bits path)
    compat.set_model_task(model, -1, verbose=False)
    compat.set_alphas(model, torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1), verbose=False)
    with torch.no_grad():
        cached = model(x)
    assert torch.allclose(cached, _chain(layers, x, masks0), atol=1e-5)

    compat.set_model_task(model, 0, verbose=False)
    params = [p for p in model.parameters() if p.requires_grad]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [f"model.{i}.scores.0" for i in (0, 2, 4)]
    for m, mask in zip(layers, masks0):
        assert m.scores.tasks() == [0]  # only the current task holds float scores
        half_bound = 0.5 / math.sqrt(m.in_features)
        assert torch.equal(m.scores[0].detach(), (mask.float() * 2 - 1) * half_bound)
        assert torch.equal(m.mask(0), mask)
    with torch.no_grad():
        out = model(x)
    assert torch.equal(out, _chain(layers, x, masks0))  # the rebuilt scores give task 0's mask exactly
    assert torch.allclose(out, cached, atol=1e-5)
    compat.set_model_task(model, 0, verbose=False)  # selecting it again keeps the same Parameters
    assert [p for p in model.parameters() if p.requires_grad] == params
    compat.cache_masks(model)  # untouched rebuilt scores: the bank is as it was
    assert all(torch.equal(m.bank.words, b) for m, b in zip(layers, bits))

    # one small step (the notebook's lr): the bits change only where a score crossed 0
    opt = torch.optim.RMSprop(params, lr=1e-4)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    compat.cache_masks(model)
    for m, b, mask in zip(layers, bits, masks0):
        assert len(m.bank) == 2
        assert torch.equal(m.bank.words[1], b[1])
        new = m.scores[0].detach() >= 0
        assert torch.equal(ops.unpack_bits(m.bank.words[0], m.bank.n).view_as(m.weight), new)
        assert torch.equal(m.bank.words[0], b[0]) == torch.equal(new, mask)
    # large steps cross the threshold: task 0's row is replaced, task 1's stays
    opt = torch.optim.RMSprop(params, lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    compat.set_model_task(model, 1, verbose=False)  # moving on packs task 0
    for m, b in zip(layers, bits):
        assert len(m.bank) == 2 and m.scores.tasks() == [1]
        assert not torch.equal(m.bank.words[0], b[0])
        assert torch.equal(m.bank.words[1], b[1])
        assert torch.equal(m.mask(1), ops.unpack_bits(b[1], m.bank.n).view_as(m.weight))
    trained0 = [m.bank.words[0].clone() for m in layers]

    # a never-trained task still gets its fresh (official) initial scores
    compat.set_model_task(model, 2, verbose=False)
    for m, t0, b in zip(layers, trained0, bits):
        assert torch.equal(m.scores[2], m._stream.scores(2))
        assert torch.equal(m.bank.words[0], t0) and torch.equal(m.bank.words[1], b[1])
    # ... also when the superposition gave it an initial-mask bank row
    m = compat.MultitaskMaskLinear(10, 4, num_tasks=3, bias=False)
    m.task = 0
    m.task, m.num_tasks_learned, m.alphas = -1, 3, torch.ones(3, 1, 1) / 3
    m(torch.randn(2, 10))
    assert len(m.bank) == 3
    m.task = 2
    assert torch.equal(m.scores[2], m._stream.scores(2))


def test_reselecting_a_finished_topk_task_reproduces_its_mask():
    conv = compat.MultitaskMaskConv(40, 12, kernel_size=1, num_tasks=2, sparsity=0.3, bias=False)
    x, y = torch.randn(8, 40, 1, 1), torch.randint(0, 12, (8,))
    conv.task = 0
    opt = torch.optim.SGD([conv.scores[0]], lr=1.0)
    F.cross_entropy(conv(x).flatten(1), y).backward()
    opt.step()
    conv.task = 1  # packs task 0
    mask0, bits0 = conv.mask(0), conv.bank.words[0].clone()
    conv.task = 0
    assert conv.scores[0].requires_grad and torch.equal(conv.mask(0), mask0)
    with torch.no_grad():
        assert torch.equal(conv(x), F.conv2d(x, conv.weight * mask0.float()))
    conv.cache_masks()
    assert len(conv.bank) == 2 and torch.equal(conv.bank.words[0], bits0)


def _float_stack_grad(m, x, alphas, k):
    a = alphas.detach().clone().requires_grad_(True)
    keep = (a[:k] > 0).view(k)
    stack = torch.stack([m.mask(t).float() for t in range(k)])
    out = F.linear(x, m.weight * (a[:k][keep] * stack[keep]).sum(0))
    (g,) = torch.autograd.grad(out.square().sum(), a)
    return out.detach(), g


@pytest.mark.parametrize("alphas", [torch.ones(4, 1, 1) / 4, torch.tensor([0.5, -0.2, 0.0, 0.7]).view(4, 1, 1)],
                         ids=["uniform", "general"])
def test_superposed_alpha_gradient_goes_through_fused_ops(monkeypatch, alphas):
    m = compat.MultitaskMaskLinear(70, 9, num_tasks=4, bias=False)
    for t in range(4):
        m.task = t
        with torch.no_grad():
            m.scores[t].normal_()
    m.cache_masks()
    calls = []
    for name in ("superposed_linear", "superposed_with_s"):
        real = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _r=real, _n=name, **kw: calls.append(_n) or _r(*a, **kw))
    compat.set_num_tasks_learned(m, 4)
    compat.set_model_task(m, -1, verbose=False)
    a = alphas.clone().requires_grad_(True)
    compat.set_alphas(m, a, verbose=False)
    x = torch.randn(3, 70)
    out = m(x)
    (g,) = torch.autograd.grad(out.square().sum(), a)
    ref_out, ref_g = _float_stack_grad(m, x, alphas, 4)
    assert calls and g.shape == (4, 1, 1)
    assert torch.allclose(out, ref_out, atol=1e-4)
    assert torch.allclose(g, ref_g, rtol=1e-4, atol=1e-3)


def test_one_hot_alphas_evaluate_one_task_and_tasks_beyond_learned_are_ignored():
    m = compat.MultitaskMaskLinear(33, 5, num_tasks=5, bias=True)
    for t in range(3):
        m.task = t
    m.cache_masks()
    compat.set_num_tasks_learned(m, 3)
    m.task = -1
    x = torch.randn(2, 33)
    m.alphas = torch.tensor([0.0, 1.0, 0.0, 9.0, 9.0]).view(5, 1, 1)  # entries past num_tasks_learned unused
    with torch.no_grad():
        assert torch.allclose(m(x), F.linear(x, m.weight * m.mask(1), m.bias), atol=1e-5)
        m.alphas = torch.tensor([0.0, 0.5, 0.0, 0.0, 0.0]).view(5, 1, 1)
        assert torch.allclose(m(x), F.linear(x, m.weight * m.mask(1) * 0.5, m.bias), atol=1e-5)


class FloatTopKConv(nn.Conv2d):
    """The main repository's edge-popup mask: keep the largest |scores|, a ``sparsity`` fraction."""

    def masked(self, scores, sparsity):
        flat = scores.abs().flatten()
        mask = torch.zeros_like(flat)
        mask[flat.sort().indices[int((1 - sparsity) * flat.numel()):]] = 1
        return self.weight * mask.view_as(scores)


def test_conv_layers_1x1_mlp_and_5d_alphas(monkeypatch):
    monkeypatch.setattr(settings, "_SETTINGS", dict(settings._SETTINGS))  # configure() is restored after the test
    assert compat.configure(num_tasks=3, sparsity=0.3) == {"num_tasks": 3, "sparsity": 0.3, "train_weight_tasks": 0, "keep_scores": False}
    convs = [compat.MultitaskMaskConv(784, 50, kernel_size=1, bias=False),
             compat.FastMultitaskMaskConv(50, 10, kernel_size=1, bias=False)]
    model = nn.Sequential(convs[0], nn.ReLU(), convs[1])
    assert convs[0].num_tasks == 3 and convs[0].sparsity == 0.3 and not hasattr(convs[1], "sparsity")
    x = torch.randn(4, 784, 1, 1)
    compat.set_model_task(model, 0, verbose=False)
    s0 = convs[0].scores[0].detach().clone()
    ref = FloatTopKConv(784, 50, 1, bias=False)
    ref.weight.data = convs[0].weight.data
    expect = F.conv2d(x, ref.masked(s0, 0.3))
    with torch.no_grad():
        assert torch.allclose(convs[0](x), expect, atol=1e-5)
    for t in (1, 2):
        compat.set_model_task(model, t, verbose=False)
    compat.cache_masks(model)
    assert int(convs[0].mask(0).sum()) == 50 * 784 - int(0.7 * 50 * 784)
    compat.set_model_task(model, 0, verbose=False)
    with torch.no_grad():
        assert torch.allclose(convs[0](x), expect, atol=1e-4)
    compat.set_num_tasks_learned(model, 3)
    compat.set_model_task(model, -1, verbose=False)
    alphas = (torch.ones(3, 1, 1, 1, 1) / 3).requires_grad_(True)
    compat.set_alphas(model, alphas, verbose=False)
    (g,) = torch.autograd.grad(model(x[:1]).logsumexp(1).sum(), alphas)
    a = (torch.ones(3, 1, 1, 1, 1) / 3).requires_grad_(True)
    h = F.relu(F.conv2d(x[:1], convs[0].weight * (a * torch.stack([convs[0].mask(t).float() for t in range(3)])).sum(0)))
    out = F.conv2d(h, convs[1].weight * (a * torch.stack([convs[1].mask(t).float() for t in range(3)])).sum(0))
    (g_ref,) = torch.autograd.grad(out.logsumexp(1).sum(), a)
    assert torch.allclose(g, g_ref, rtol=1e-4, atol=1e-4)


def test_multitask_bn_and_freezing_helpers():
    bn = compat.MultitaskNonAffineBN(4, num_tasks=2)
    conv = compat.FastMultitaskMaskConv(3, 4, 3, padding=1, num_tasks=2, bias=False)
    model = nn.Sequential(conv, bn)
    x = torch.randn(8, 3, 5, 5) * 3 + 1
    for t in range(2):
        compat.set_model_task(model, t, verbose=False)
        model.train()
        model(x + t)
    assert not torch.allclose(bn.bns[0].running_mean, bn.bns[1].running_mean)
    compat.set_model_task(model, 1, verbose=False)
    compat.freeze_model_scores(model, 1)
    assert not any(p.requires_grad for p in model.parameters())
    compat.unfreeze_model_scores(model, 1)
    compat.freeze_model_scores(model, 0)  # a packed task: nothing to freeze, no error
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["0.scores.1"]
    compat.set_num_tasks_learned(model, 2)
    compat.set_model_task(model, -1, verbose=False)
    compat.set_alphas(model, torch.ones(2, 1, 1, 1, 1) / 2, verbose=False)
    before = bn.bns[1].running_mean.clone()
    y = model(x)
    assert torch.allclose(y.mean((0, 2, 3)), torch.zeros(4), atol=1e-4)  # batch statistics
    assert torch.equal(bn.bns[1].running_mean, before)


def test_state_dict_round_trip_and_official_checkpoint(tmp_path):
    torch.manual_seed(5)
    ref = nn.Sequential(FloatMultitaskMaskLinear(50, 20, num_tasks=3, bias=False), nn.ReLU(),
                        FloatMultitaskMaskLinear(20, 10, num_tasks=3, bias=False))
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, FloatMultitaskMaskLinear):
                for s in m.scores:
                    s.normal_()
                m.cache_masks()
    path = tmp_path / "final.pt"
    sd = {f"module.{k}": v for k, v in ref.state_dict().items()}  # saved from nn.DataParallel
    torch.save({"epoch": 1, "state_dict": sd, "args": argparse.Namespace(num_tasks=3, sparsity=0.5)}, path)
    ours = nn.Sequential(compat.MultitaskMaskLinear(50, 20, num_tasks=3, bias=False), nn.ReLU(),
                         compat.MultitaskMaskLinear(20, 10, num_tasks=3, bias=False))
    compat.load_official_checkpoint(ours, path)
    x = torch.randn(5, 50)
    for t in range(3):
        for r, o in ((ref[0], ours[0]), (ref[2], ours[2])):
            assert torch.equal(o.mask(t), r.scores[t] >= 0)
            assert o.scores.tasks() == ([] if t == 0 else [t - 1])  # only the selected task has scores
        compat.set_model_task(ours, t, verbose=False)
        for m in (ref[0], ref[2]):
            m.task = t
        with torch.no_grad():
            assert torch.allclose(ours(x), ref(x), atol=1e-5)
    # our own state_dict carries the bits (as mask_bits, not also as the bank's rows); a fresh model loads it
    assert not any(k.endswith(".rows") for k in ours.state_dict())
    fresh = nn.Sequential(compat.MultitaskMaskLinear(50, 20, num_tasks=3, bias=False), nn.ReLU(),
                          compat.MultitaskMaskLinear(20, 10, num_tasks=3, bias=False))
    fresh.load_state_dict(ours.state_dict())
    compat.set_model_task(fresh, 2, verbose=False)
    with torch.no_grad():
        assert torch.allclose(fresh(x), ours(x))
    # and back to the official layout
    out = tmp_path / "export.pt"
    compat.save_official_checkpoint(ours, out)  # by default the keys of a fresh official model
    fresh_official = nn.Sequential(FloatMultitaskMaskLinear(50, 20, num_tasks=3, bias=False), nn.ReLU(),
                                   FloatMultitaskMaskLinear(20, 10, num_tasks=3, bias=False))
    fresh_official.load_state_dict(torch.load(out)["state_dict"])
    for t in range(3):
        assert torch.equal(fresh_official[2].scores[t] >= 0, ref[2].scores[t] >= 0)
    compat.save_official_checkpoint(ours, out, stacked=True)
    back = nn.Sequential(FloatMultitaskMaskLinear(50, 20, num_tasks=3, bias=False), nn.ReLU(),
                         FloatMultitaskMaskLinear(20, 10, num_tasks=3, bias=False))
    for m in (back[0], back[2]):
        m.cache_masks()  # registers the float layer's `stacked` buffer to load into
    back.load_state_dict(torch.load(out)["state_dict"])
    for t in range(3):
        assert torch.equal(back[0].scores[t] >= 0, ref[0].scores[t] >= 0)
        assert torch.equal(back[2].stacked[t], ref[2].stacked[t])


def test_saved_official_checkpoint_resumes_in_the_official_main(tmp_path):
    """The file has the keys of the official main.py's final.pt, and its --resume lines run on it
    (torch.load, checkpoint["best_acc1"], the filtered load_state_dict, checkpoint["epoch"]), giving
    every task's mask back in a fresh official model; bad accuracies and epochs are refused."""
    torch.manual_seed(2)
    ours = nn.Sequential(compat.MultitaskMaskLinear(30, 8, num_tasks=3, bias=False))
    for t in range(3):
        compat.set_model_task(ours, t, verbose=False)
        with torch.no_grad():
            ours[0].scores[t].normal_()
    compat.set_model_task(ours, 0, verbose=False)
    path = tmp_path / "final.pt"
    compat.save_official_checkpoint(ours, path, epoch=7, best_acc1=[91.5, 92, 93.25])
    official = nn.Sequential(FloatMultitaskMaskLinear(30, 8, num_tasks=3, bias=False))
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # main.py --resume, as written upstream
    best_acc1 = checkpoint["best_acc1"]
    pretrained_dict = checkpoint["state_dict"]
    model_dict = official.state_dict()
    pretrained_dict = {k: v for k, v in pretrained_dict.items() if k in model_dict}
    model_dict.update(pretrained_dict)
    official.load_state_dict(pretrained_dict)
    assert checkpoint["epoch"] == 7 and checkpoint["arch"] == "Sequential"
    assert best_acc1 == [91.5, 92.0, 93.25] and checkpoint["curr_acc1"] == [0.0, 0.0, 0.0]
    for t in range(3):
        assert torch.equal(official[0].scores[t] >= 0, ours[0].mask(t))
    with pytest.raises(ValueError, match="best_acc1 must hold one accuracy per task \\(3 numbers\\)"):
        compat.save_official_checkpoint(ours, path, best_acc1=[1.0])
    with pytest.raises(ValueError, match="curr_acc1 must hold one accuracy per task"):
        compat.save_official_checkpoint(ours, path, curr_acc1=0.5)
    with pytest.raises(ValueError, match="epoch must be a non-negative integer"):
        compat.save_official_checkpoint(ours, path, epoch=-1)
    with pytest.raises(ValueError, match="arch must be a string"):
        compat.save_official_checkpoint(ours, path, arch=5)
    assert torch.load(path, weights_only=True)["epoch"] == 7  # a refused save leaves the file as it was


def test_official_checkpoint_with_more_tasks_than_the_model_is_refused(tmp_path):
    """As upstream: scores.N past num_tasks are unexpected keys (refused when strict, ignored when
    not), and a stacked/mask_bits of more tasks never fits. A truncated file is named."""
    torch.manual_seed(1)
    ref = nn.Sequential(FloatMultitaskMaskLinear(30, 8, num_tasks=5, bias=False))
    path = tmp_path / "final.pt"
    torch.save({"state_dict": ref.state_dict()}, path)
    small = lambda: nn.Sequential(compat.MultitaskMaskLinear(30, 8, num_tasks=3, bias=False))
    with pytest.raises(ValueError, match=r"scores of task\(s\) \[3, 4\] for layer '0', built with num_tasks=3"):
        compat.load_official_checkpoint(small(), path)
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "0.scores.3", "0.scores.4"'):
        small().load_state_dict(ref.state_dict())
    loose = compat.load_official_checkpoint(small(), path, strict=False)
    assert len(loose[0].bank) == 3
    for t in range(3):
        assert torch.equal(loose[0].mask(t), ref[0].scores[t] >= 0)
    ref[0].cache_masks()
    torch.save({"state_dict": {"0.stacked": ref[0].stacked}}, path)
    with pytest.raises(RuntimeError, match=r"stacked holds 5 tasks, but this layer was built with num_tasks=3"):
        compat.load_official_checkpoint(small(), path, strict=False)
    with pytest.raises(RuntimeError, match=r"mask_bits holds 5 tasks"):
        small().load_state_dict({"0.weight": ref[0].weight, "0.mask_bits": torch.zeros(5, 8, 1, dtype=torch.int32)})
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"final.pt' is not a readable torch checkpoint"):
        compat.load_official_checkpoint(small(), path)


def test_bad_input():
    m = compat.MultitaskMaskLinear(10, 4, num_tasks=2)
    # task >= num_tasks is stored, as upstream (the official NNs trainer sets it when the slots run out and
    # skips those batches); only a forward fails, as upstream's scores[task]
    m.task = 0
    with torch.no_grad():
        m.scores[0].copy_(torch.randn(4, 10))
    trained = m.mask(0).clone()
    m.task = 2
    assert m.task == 2 and torch.equal(m.mask(0), trained)  # the live task was packed on the way
    with pytest.raises(IndexError, match="task 2 is out of range: this layer has num_tasks = 2"):
        m(torch.randn(1, 10))
    with pytest.raises(TypeError, match="task must be an int"):
        m.task = 0.5
    m.task = 0
    m.task = -1
    with pytest.raises(RuntimeError, match="num_tasks_learned"):
        m(torch.randn(1, 10))
    m.num_tasks_learned = 1
    with pytest.raises(RuntimeError, match="alphas is not set"):
        m(torch.randn(1, 10))
    m.alphas = torch.ones(2, 3)
    with pytest.raises(ValueError, match="alphas must have shape"):
        m(torch.randn(1, 10))
    with pytest.raises(ValueError, match="num_tasks must be an int"):
        compat.MultitaskMaskLinear(10, 4, num_tasks=0)
    with pytest.raises(ValueError, match="num_tasks is not set"):
        compat.MultitaskMaskConv(3, 4, 1)
    with pytest.raises(ValueError, match="sparsity"):
        compat.configure(sparsity=1.5)
    with pytest.raises(TypeError, match="alphas must be a torch.Tensor"):
        compat.set_alphas(m, [0.5, 0.5])
    with pytest.raises(ValueError, match="path"):
        compat.load_official_checkpoint(m, "/nonexistent/final.pt")
    with pytest.raises(RuntimeError, match="no task set"):
        compat.MultitaskMaskLinear(10, 4, num_tasks=2)(torch.randn(1, 10))


def test_main_repository_flow_with_model_apply(monkeypatch):
    """main.py / adaptors.py drive the layers with model.apply(setattr) and pick the task's
    parameters by name (``*.scores.{idx}``); GG uses one-hot alphas [N,1,1,1,1] with task < 0."""
    monkeypatch.setattr(settings, "_SETTINGS", dict(settings._SETTINGS))
    compat.configure(num_tasks=3)
    model = nn.Sequential(compat.FastMultitaskMaskConv(30, 20, kernel_size=1, bias=False), nn.ReLU(),
                          compat.FastMultitaskMaskConv(20, 5, kernel_size=1, bias=False))
    x, y = torch.randn(12, 30, 1, 1), torch.randint(0, 5, (12,))
    for idx in range(3):
        model.apply(lambda m: setattr(m, "task", idx))
        params = [p for n, p in model.named_parameters()
                  if p.requires_grad and n.split(".")[-2] == "scores" and int(n.split(".")[-1]) == idx]
        assert len(params) == 2
        opt = torch.optim.RMSprop(params, lr=1e-2)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(x).flatten(1), y).backward()
            opt.step()
        model.apply(lambda m: setattr(m, "num_tasks_learned", idx + 1))
    model.apply(lambda m: setattr(m, "task", -1))
    compat.cache_masks(model)
    alphas = torch.zeros(3, 1, 1, 1, 1)
    alphas[1] = 1
    model.apply(lambda m: setattr(m, "alphas", alphas))
    with torch.no_grad():
        h = F.relu(F.conv2d(x, model[0].weight * model[0].mask(1)))
        assert torch.allclose(model(x), F.conv2d(h, model[2].weight * model[2].mask(1)), atol=1e-5)
    model.apply(lambda m: setattr(m, "alphas", None))


def test_an_official_checkpoint_that_does_not_fit_changes_nothing(tmp_path):
    """load_state_dict copies tensor by tensor: a wrong shape in a later layer used to leave the
    earlier ones overwritten."""
    torch.manual_seed(1)
    ref = nn.Sequential(FloatMultitaskMaskLinear(20, 30, num_tasks=2, bias=False), nn.ReLU(),
                        FloatMultitaskMaskLinear(30, 5, num_tasks=2, bias=False))
    sd = dict(ref.state_dict())
    sd["2.weight"] = torch.zeros(6, 30)
    target = nn.Sequential(compat.MultitaskMaskLinear(20, 30, num_tasks=2, bias=False), nn.ReLU(),
                           compat.MultitaskMaskLinear(30, 5, num_tasks=2, bias=False))
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"nothing was loaded\): 2.weight: \(6, 30\) in the checkpoint, \(5, 30\)"):
        compat.load_official_checkpoint(target, sd)
    after = target.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    sd = dict(ref.state_dict())
    sd["0.scores.1"] = torch.zeros(30, 21)
    with pytest.raises(ValueError, match=r"0.scores.1: \(30, 21\) in the checkpoint, \(30, 20\) in the model"):
        compat.load_official_checkpoint(target, sd)


def test_compat_layers_run_as_fp32_ops_under_autocast():
    """As the package's own layers: under torch.autocast the input is cast up and forward and
    backward stay in the weight's dtype (the superposed backward met a bf16 output otherwise)."""
    m = compat.MultitaskMaskLinear(12, 5, num_tasks=2, bias=False)
    for t in range(2):
        compat.set_model_task(m, t, verbose=False)
        m(torch.randn(3, 12)).sum().backward()
    compat.cache_masks(m)
    compat.set_num_tasks_learned(m, 2)
    x = torch.randn(33, 12).bfloat16()
    results = []
    for autocast in (True, False):
        alphas = torch.full((2, 1, 1), 0.5, requires_grad=True)
        compat.set_model_task(m, -1, verbose=False)
        compat.set_alphas(m, alphas, verbose=False)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = m(x if autocast else x.float())
        results.append((y, *torch.autograd.grad(y.square().sum(), alphas)))
    assert results[0][0].dtype == torch.float32
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


# -- the official trainers/reinit.py and main.py paths -------------------------------------------
def _reinit_flow(layer_cls, num_tasks=3, steps=3, transfer=True):
    """trainers/reinit.py's order: the optimiser is built over scores.{t} while task t is set, then
    task -1 (cache_masks), scores[t].data = scores[t-1].data (n-1 transfer), task t again and train.
    Returns the layer and each task's mask after training."""
    torch.manual_seed(0)
    m = layer_cls(30, 12, num_tasks=num_tasks, bias=False)
    x, target = torch.randn(16, 30), torch.randn(16, 12)
    masks = []
    for t in range(num_tasks):
        m.task = t
        opt = torch.optim.SGD([p for n, p in m.named_parameters() if n == f"scores.{t}"], lr=5.0)
        m.task, m.num_tasks_learned = -1, t
        m.cache_masks()
        if transfer and t > 0:
            m.scores[t].data = m.scores[t - 1].data.clone()
        m.task = t
        assert opt.param_groups[0]["params"][0] is m.scores[t]  # the optimiser trains the live scores
        for _ in range(steps):
            opt.zero_grad()
            ((m(x) - target) ** 2).mean().backward()
            opt.step()
        m.cache_masks()
        masks.append(m.mask(t).clone() if hasattr(m, "mask") else (m.scores[t] >= 0).clone())
    return m, masks


def test_superposition_keeps_the_scores_an_optimizer_was_built_over(monkeypatch):
    monkeypatch.setattr(settings, "_SETTINGS", dict(settings._SETTINGS))
    _, ref = _reinit_flow(FloatMultitaskMaskLinear, transfer=False)
    m, ours = _reinit_flow(compat.MultitaskMaskLinear, transfer=False)
    for t in range(3):
        assert torch.equal(ours[t], ref[t])
    # and the official n-1 transfer, bit for bit, once every task keeps its float scores
    compat.configure(keep_scores=True)
    _, ref = _reinit_flow(FloatMultitaskMaskLinear)
    m, ours = _reinit_flow(compat.MultitaskMaskLinear)
    assert m.scores.tasks() == [0, 1, 2]
    for t in range(3):
        assert torch.equal(ours[t], ref[t])


def test_scores_index_like_the_official_parameter_list():
    m = compat.MultitaskMaskConv(3, 4, 3, num_tasks=4, bias=False, sparsity=0.5)
    x = torch.randn(2, 3, 6, 6)
    for t in range(2):
        m.task = np.int64(t)  # numpy task indices, as the official layer takes them
        m(x)
    m.task = -1
    assert m.scores.tasks() == [1]
    m1 = m.mask(1).clone()
    packed0 = m.scores[0]  # a packed task: live again, rebuilt from its bits (same mask)
    assert isinstance(packed0, nn.Parameter) and m.scores.tasks() == [0, 1]
    assert torch.equal(m.mask(0), m._row_mask(0)) and torch.equal(m.scores[-3], m.scores[1])
    assert [p is q for p, q in zip(m.scores[:2], (packed0, m.scores[1]))] == [True, True]
    assert torch.equal(m.scores[3].detach(), m._stream.scores(3))  # untrained: its official initial scores
    stacked = m.stacked
    assert stacked.shape == (4, *m.weight.shape) and torch.equal(stacked[1], m1.float())
    m.task = 2
    assert m.scores.tasks() == [2]
    with pytest.raises(IndexError, match=r"task must be in \[0, num_tasks=4\)"):
        m.scores[4]


def _float_model_with_random_scores(seed: int) -> nn.Sequential:
    """One official float layer (30 -> 8, 3 tasks) whose scores are all drawn afresh."""
    torch.manual_seed(seed)
    ref = nn.Sequential(FloatMultitaskMaskLinear(30, 8, num_tasks=3, bias=False))
    for s in ref[0].scores:
        s.data.normal_()
    return ref


def test_keep_scores_state_dict_passes_the_official_resume_filter(monkeypatch):
    # main.py --resume keeps only the checkpoint's keys that a fresh model's state_dict has.
    monkeypatch.setattr(settings, "_SETTINGS", dict(settings._SETTINGS))
    ref = _float_model_with_random_scores(seed=2)
    saved = ref.state_dict()

    def resume(model):
        own = model.state_dict()
        model.load_state_dict({k: v for k, v in saved.items() if k in own})
        return model

    with pytest.raises(RuntimeError, match="0.mask_bits is missing, and no stacked or scores.* either"):
        resume(nn.Sequential(compat.MultitaskMaskLinear(30, 8, num_tasks=3, bias=False)))
    compat.configure(keep_scores=True)
    ours = resume(nn.Sequential(compat.MultitaskMaskLinear(30, 8, num_tasks=3, bias=False)))
    x = torch.randn(5, 30)
    for t in range(3):
        ref[0].task, ours[0].task = t, t
        assert torch.equal(ours(x), ref(x))


@pytest.mark.parametrize("layer", ["linear", "fast_conv", "conv"])
def test_train_weight_tasks_trains_the_weight_as_upstream(monkeypatch, layer):
    monkeypatch.setattr(settings, "_SETTINGS", dict(settings._SETTINGS))
    make = {"linear": lambda: compat.MultitaskMaskLinear(12, 5, num_tasks=2),
            "fast_conv": lambda: compat.FastMultitaskMaskConv(3, 5, 3, num_tasks=2),
            "conv": lambda: compat.MultitaskMaskConv(3, 5, 3, num_tasks=2, sparsity=0.5)}[layer]
    assert not make().weight.requires_grad  # SupSup: args.train_weight_tasks = 0
    compat.configure(train_weight_tasks=-1)
    m = make()
    assert m.weight.requires_grad
    x = torch.randn(4, 12) if layer == "linear" else torch.randn(4, 3, 7, 7)
    m.task = 1
    m(x).square().sum().backward()
    mask = m.mask(1).float()
    w = m.weight.detach().clone().requires_grad_(True)
    ref = F.linear(x, w * mask, m.bias) if layer == "linear" else F.conv2d(x, w * mask, m.bias)
    ref.square().sum().backward()
    assert torch.allclose(m.weight.grad, w.grad, atol=1e-5)


def test_configure_names_the_er_sparsity_multiplier(monkeypatch):
    monkeypatch.setattr(settings, "_SETTINGS", dict(settings._SETTINGS))
    with pytest.raises(ValueError, match="with --er-sparsity, args.sparsity is the Erdős–Rényi multiplier"):
        compat.configure(sparsity=32)
    with pytest.raises(ValueError, match="keep_scores must be True or False"):
        compat.configure(keep_scores=1)
    with pytest.raises(ValueError, match="train_weight_tasks must be an int"):
        compat.configure(train_weight_tasks=0.5)


def test_reading_an_untrained_tasks_scores_keeps_its_official_start(monkeypatch):
    # scores[t], iteration and `stacked` read untrained tasks (trainers/reinit.py does): the task still
    # starts from its official initial scores when trained, also after a state_dict round trip.
    torch.manual_seed(4)
    m = compat.FastMultitaskMaskConv(3, 4, 3, num_tasks=4, bias=False)
    m.task = 0
    m.scores[0].data.normal_()
    assert len(m.scores) == 4 and len(list(m.scores)) == 4  # as the official ParameterList
    m.scores[2]
    _ = m.stacked
    m.task = 1  # commits 0 (trained) and the read-only 2, 3; drops their floats
    assert m.scores.tasks() == [1]
    assert torch.equal(m.scores[2].detach(), m._stream.scores(2))
    m.scores[1].data.normal_()  # trained (a write through .data, which no version counter sees)
    m.task = -1
    fresh = compat.FastMultitaskMaskConv(3, 4, 3, num_tasks=4, bias=False)
    fresh.load_state_dict(m.state_dict())
    assert len(fresh.bank) == 2  # the rows up to the last trained task (1), not the read ones
    fresh.task = 3
    assert torch.equal(fresh.scores[3].detach(), fresh._stream.scores(3))  # its own official init


def test_keep_scores_loads_official_floats_and_packs_only_for_the_superposition(monkeypatch):
    monkeypatch.setattr(settings, "_SETTINGS", dict(settings._SETTINGS))
    ref = _float_model_with_random_scores(seed=5)
    compat.configure(keep_scores=True)
    ours = compat.load_official_checkpoint(nn.Sequential(compat.MultitaskMaskLinear(30, 8, num_tasks=3, bias=False)),
                                           ref.state_dict())
    layer = ours[0]
    assert layer.scores.tasks() == [0, 1, 2]
    for t in range(3):
        assert torch.equal(layer.scores[t], ref[0].scores[t])  # the checkpoint's floats, not rebuilt ones
    version = layer._bank_version
    for t in (2, 0, 1):
        layer.task = t  # no repacking of every task at each switch
    assert layer._bank_version == version
    with torch.no_grad():
        layer.scores[1].neg_()
    layer.task = -1  # the superposition reads the bits: packed now
    assert torch.equal(layer.mask(1), layer._row_mask(1)) and torch.equal(layer._row_mask(1), ref[0].scores[1] < 0)


def _trained_pair(keep: bool, monkeypatch):
    monkeypatch.setattr(settings, "_SETTINGS", dict(settings._SETTINGS))
    compat.configure(keep_scores=keep)
    torch.manual_seed(0)
    m = compat.MultitaskMaskLinear(20, 7, num_tasks=4, bias=False)
    x, y = torch.randn(16, 20), torch.randn(16, 7)
    for t in (0, 1):
        m.task = t
        opt = torch.optim.SGD([m.scores[t]], lr=5.0)
        for _ in range(3):
            opt.zero_grad()
            ((m(x) - y) ** 2).mean().backward()
            opt.step()
    m.task = -1
    return m, x


def test_state_dicts_move_between_live_tasks_and_keep_scores(monkeypatch):
    plain, x = _trained_pair(False, monkeypatch)
    masks = [plain.mask(t).clone() for t in range(2)]
    # into a keep_scores model (every task live): strict, its live scores come from the loaded bits
    compat.configure(keep_scores=True)
    torch.manual_seed(1)
    keep = compat.MultitaskMaskLinear(20, 7, num_tasks=4, bias=False)
    keep.load_state_dict(plain.state_dict())
    for t in range(2):
        keep.task, plain.task = t, t
        assert torch.equal(keep.mask(t), masks[t]) and torch.equal(keep(x), plain(x))
    # a model with another task live reloads an earlier state strictly, and the stale scores go
    compat.configure(keep_scores=False)
    other = compat.MultitaskMaskLinear(20, 7, num_tasks=4, bias=False)
    other.task = 2
    with torch.no_grad():
        other.scores[2].fill_(1.0)
    other.load_state_dict(plain.state_dict())
    assert torch.equal(other.scores[2].detach(), other._stream.scores(2))  # untrained in the loaded state
    # a keep_scores state dict carries untrained tasks' initial scores: in a model built the same way
    # (the same initial scores) they stay untrained
    keep.task = -1
    torch.manual_seed(1)
    back = compat.MultitaskMaskLinear(20, 7, num_tasks=4, bias=False)
    back.load_state_dict(keep.state_dict())
    back.task = 0
    assert back.state_dict()["mask_bits"].shape[0] == 2
    back.task = 3
    assert torch.equal(back.scores[3].detach(), back._stream.scores(3))


def test_scores_made_after_double_are_float64():
    m = compat.MultitaskMaskLinear(20, 7, num_tasks=3, bias=False)
    m.task = 0
    m.task = 1
    m.double()
    m.task = 0  # rebuilt from its bits
    assert m.scores[0].dtype == torch.float64 and m.scores[2].dtype == torch.float64  # 2: untrained
    m(torch.randn(2, 20, dtype=torch.float64)).sum().backward()
    assert m.scores[0].grad.dtype == torch.float64


def test_a_read_task_below_a_trained_one_stays_untrained_through_a_state_dict():
    torch.manual_seed(6)
    m = compat.MultitaskMaskLinear(20, 7, num_tasks=3, bias=False)
    m.task = 0  # selected, never trained
    m.task = 1
    with torch.no_grad():
        m.scores[1].neg_()
    m.task = -1
    sd = m.state_dict()
    assert sd["mask_bits"].shape[0] == 2 and sd["mask_untrained"].tolist() == [0]
    torch.manual_seed(6)
    fresh = compat.MultitaskMaskLinear(20, 7, num_tasks=3, bias=False)
    fresh.load_state_dict(sd)
    fresh.task = 0
    assert torch.equal(fresh.scores[0].detach(), fresh._stream.scores(0))
    fresh.task = 1
    assert torch.equal(fresh.mask(1), m.mask(1))
    # scores made by a load take the model's dtype, and a later partial load keeps trained scores
    double = compat.MultitaskMaskLinear(20, 7, num_tasks=3, bias=False).double()
    double.load_state_dict(sd)
    assert all(double.scores.live(t).dtype == torch.float64 for t in double.scores.tasks())
    trained = fresh.scores[1].detach().clone()
    fresh.scores.load_state_dict({}, strict=False)
    assert torch.equal(fresh.scores[1].detach(), trained)
    with pytest.raises(RuntimeError, match=r"mask_untrained must list row indices in \[0, 2\)"):
        fresh.load_state_dict(dict(sd, mask_untrained=torch.tensor([5])))


def test_a_checkpoint_saved_mid_task_keeps_that_task_through_the_official_resume_filter():
    # main.py --resume keeps only the keys a fresh model's state_dict has: scores.{t} of the task being
    # trained is dropped, so its mask must travel in mask_bits (it loaded as the untrained task).
    def make(seed):
        torch.manual_seed(seed)
        return nn.Sequential(compat.MultitaskMaskLinear(20, 10, num_tasks=3, bias=False))
    m = make(0)
    m.apply(lambda x: setattr(x, "task", 1))
    with torch.no_grad():
        m[0].scores[1].copy_(torch.randn(10, 20))
    trained = m[0].scores[1].detach() >= 0
    saved = m.state_dict()
    assert len(m[0].bank) == 0  # saving packed nothing into the bank
    fresh = make(1)
    keep = fresh.state_dict()
    fresh.load_state_dict({k: v for k, v in saved.items() if k in keep})
    fresh.apply(lambda x: setattr(x, "task", 1))
    assert torch.equal(fresh[0].scores[1].detach() >= 0, trained)
    assert fresh[0]._untrained(0) and not fresh[0]._untrained(1)  # task 0 (below it) stays untrained
    # a live task only read (its initial scores) loads as untrained, as before
    m2 = make(0)
    m2.apply(lambda x: setattr(x, "task", 1))
    assert m2.state_dict()["0.mask_bits"].shape[0] == 0


def test_frozen_scores_stay_frozen_across_a_task_switch():
    conv = compat.FastMultitaskMaskConv(4, 4, 1, bias=False, num_tasks=3)
    model = nn.Sequential(conv)
    model.apply(lambda m: setattr(m, "task", 1))
    compat.freeze_model_scores(model, 1)
    model.apply(lambda m: setattr(m, "task", 2))
    model.apply(lambda m: setattr(m, "task", 1))
    assert not conv.scores[1].requires_grad
    compat.unfreeze_model_scores(model, 1)
    compat.freeze_model_scores(model, 2)  # a packed task: frozen when made live again
    model.apply(lambda m: setattr(m, "task", 2))
    assert not conv.scores[2].requires_grad
    model.apply(lambda m: setattr(m, "task", 1))
    assert conv.scores[1].requires_grad
    # a model-wide requires_grad_(False) (as for an evaluation) is not taken for a freeze: requires_grad_(True)
    # cannot reach a packed task's remade Parameter, which would then train nothing
    model.requires_grad_(False)
    model.apply(lambda m: setattr(m, "task", 0))
    model.requires_grad_(True)
    model.apply(lambda m: setattr(m, "task", 1))
    assert conv.scores[1].requires_grad


def test_uniform_superposition_after_a_dtype_change_uses_counts_in_the_new_dtype():
    torch.manual_seed(0)
    m = compat.MultitaskMaskLinear(30, 7, num_tasks=5, bias=False)
    for t in range(5):
        m.task = t
        with torch.no_grad():
            m.scores[t].copy_(torch.randn(7, 30))
    m.num_tasks_learned, m.alphas = 5, torch.full((5, 1, 1), 0.2)
    m.task = -1
    x = torch.randn(3, 30)
    m(x)  # fills the count cache in float32
    m.double()
    m.alphas = m.alphas.double()
    masks = torch.stack([m.mask(t) for t in range(5)]).double()
    want = F.linear(x.double(), m.weight * (m.alphas * masks).sum(0))
    assert m(x.double()).dtype == torch.float64
    torch.testing.assert_close(m(x.double()), want, rtol=1e-13, atol=1e-13)


def test_mask_bits_with_padding_bits_set_are_refused_on_load():
    m = compat.MultitaskMaskLinear(100, 4, num_tasks=2, bias=False)
    m.task = 0
    with torch.no_grad():
        m.scores[0].copy_(torch.randn(4, 100))  # trained: a row of its own in mask_bits
    state = m.state_dict()
    state["mask_bits"] = state["mask_bits"].clone()
    state["mask_bits"][0, 0, -1] |= 1 << 30  # bit 126 of a 100-weight row
    with pytest.raises(RuntimeError, match=r"mask_bits has bits set past bit 100 of a row"):
        compat.MultitaskMaskLinear(100, 4, num_tasks=2, bias=False).load_state_dict(state)


def _official_get_subnet(scores, k):  # models/modules.py GetSubnet.forward, as upstream
    out = scores.clone()
    _, idx = scores.flatten().sort()
    j = int((1 - k) * scores.numel())
    flat_out = out.flatten()
    flat_out[idx[:j]] = 0
    flat_out[idx[j:]] = 1
    return out


@pytest.mark.parametrize("n", [10, 1000, 30_000])
def test_topk_conv_breaks_ties_at_the_threshold_as_the_official_sort(n):
    # Two |scores| tied at the threshold, one kept: torch.topk and the official sort may keep different ones.
    conv = compat.MultitaskMaskConv(n // 10, 10, 1, bias=False, num_tasks=1, sparsity=1 - 2.5 / n)
    g = torch.Generator().manual_seed(n)
    s = torch.rand(n, generator=g) + 1.0
    s[[3, n - 2]] = 0.5
    s[5] = 0.1
    conv.task = 0
    with torch.no_grad():
        conv.scores[0].copy_(s.view_as(conv.scores[0]) * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).view_as(conv.scores[0]))
    want = _official_get_subnet(conv.scores[0].detach().abs(), conv.sparsity).bool()
    assert torch.equal(conv.mask(0), want)
    x = torch.randn(2, n // 10, 3, 3)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight * want))
    conv.cache_masks()
    assert torch.equal(conv._row_mask(0), want)


def test_sorted_topk_mask_is_the_official_sort_with_and_without_ties():
    # kthvalue finds the threshold; only a tie at it takes the full sort: both must give the sort's masks
    from supsup_fast.nn.masks import sorted_topk_mask
    g = torch.Generator().manual_seed(0)
    for trial in range(200):
        n = int(torch.randint(1, 2000, (1,), generator=g))
        x = torch.rand(n, generator=g)
        if trial % 3 == 0:
            x = (x * 7).floor()  # many ties
        density = float(torch.rand(1, generator=g))
        assert torch.equal(sorted_topk_mask(x, density), _official_get_subnet(x, density).bool()), (trial, n, density)


def test_scores_first_made_under_inference_mode_train_afterwards():
    """An evaluation under torch.inference_mode() that selects a task for the first time must not
    leave that task's scores as inference tensors: upstream makes them in __init__, and they train."""
    m = nn.Sequential(compat.MultitaskMaskLinear(6, 4, num_tasks=3, bias=False))
    x = torch.randn(2, 6)
    with torch.inference_mode():
        compat.set_model_task(m, 1, verbose=False)
        m(x)
    compat.set_model_task(m, 1, verbose=False)
    before = m[0].scores[1].detach().clone()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    m(x).sum().backward()
    opt.step()
    assert not torch.equal(m[0].scores[1].detach(), before)


def test_load_official_checkpoint_keeps_the_selected_task():
    """As upstream's load_state_dict, loading leaves `task` as it was: the next forward runs."""
    torch.manual_seed(0)
    src = nn.Sequential(compat.MultitaskMaskLinear(6, 4, num_tasks=3, bias=False))
    sd = compat.official_state_dict(src)
    m = nn.Sequential(compat.MultitaskMaskLinear(6, 4, num_tasks=3, bias=False))
    compat.set_model_task(m, 2, verbose=False)
    compat.load_official_checkpoint(m, sd)
    assert m[0].task == 2
    x = torch.randn(3, 6)
    assert torch.equal(m(x), F.linear(x, src[0].weight * (sd["0.scores.2"] >= 0).float()))


def test_a_dtype_cast_keeps_an_untrained_task_untrained():
    """A task that was only read (still its official initial scores) stays untrained through
    .double() and through a float64 state dict: selected again it gets those initial scores back,
    not scores rebuilt from its mask."""
    torch.manual_seed(0)
    initial = compat.MultitaskMaskLinear(6, 4, num_tasks=3, bias=False).scores[0].detach().clone()
    torch.manual_seed(0)
    layer = compat.MultitaskMaskLinear(6, 4, num_tasks=3, bias=False)
    layer.task = 0
    layer.double()
    layer.task = 1
    layer.task = 0
    assert torch.equal(layer.scores[0].detach(), initial.double())
    # the same through a state dict of a float64 model that carries the untrained task's scores
    sd = layer.state_dict()
    torch.manual_seed(0)
    other = compat.MultitaskMaskLinear(6, 4, num_tasks=3, bias=False).double()
    other.load_state_dict(sd)
    other.task = 1
    other.task = 0
    assert torch.equal(other.scores[0].detach(), initial.double())
    assert other.state_dict()["mask_bits"].shape[0] == 0  # no trained task to save
    # and through a half-precision model's own state dict
    torch.manual_seed(0)
    half = compat.MultitaskMaskLinear(6, 4, num_tasks=3, bias=False)
    half.task = 0
    half.half()
    torch.manual_seed(0)
    fresh = compat.MultitaskMaskLinear(6, 4, num_tasks=3, bias=False).half()
    fresh.load_state_dict(half.state_dict())
    fresh.task = 1
    fresh.task = 0
    assert torch.equal(fresh.scores[0].detach(), initial.half())
    assert fresh.state_dict()["mask_bits"].shape[0] == 0


def test_freeze_takes_a_numpy_task_index():
    """freeze_model_scores(model, np.int64) freezes the selected task's scores (upstream indexes a
    ParameterList, which takes numpy integers)."""
    m = nn.Sequential(compat.FastMultitaskMaskConv(3, 4, kernel_size=1, bias=False, num_tasks=3))
    idx = np.arange(3)[0]
    compat.set_model_task(m, idx, verbose=False)
    compat.freeze_model_scores(m, idx)
    assert not m[0].scores[0].requires_grad
    assert np.int64(0) in m[0].scores and 1 not in m[0].scores and True not in m[0].scores


def test_stacked_fast_conv_computes_the_official_superposition():
    """The official NNs experiment's conv type: in superposition it convolves with W ⊙ Σ α_t (s_t ≥ 0)
    over the learned tasks' scores (upstream stacks GetSubnet of each), and with one task's mask when
    a task is set."""
    torch.manual_seed(0)
    layer = compat.StackedFastMultitaskMaskConv(3, 4, kernel_size=3, padding=1, bias=False, num_tasks=3)
    scores = []
    for t in range(2):
        layer.task = t
        with torch.no_grad():
            layer.scores[t].copy_(torch.randn_like(layer.scores[t]))  # "trained" scores
        scores.append(layer.scores[t].detach().clone())
    x = torch.randn(2, 3, 7, 9)
    layer.task = 1
    torch.testing.assert_close(layer(x), F.conv2d(x, layer.weight * (scores[1] >= 0).float(), padding=1))
    layer.num_tasks_learned = 2
    alphas = torch.tensor([0.3, 0.7])
    layer.alphas = alphas.view(2, 1, 1, 1, 1)
    layer.task = -1
    subnet = sum(a * (s >= 0).float() for a, s in zip(alphas, scores))
    torch.testing.assert_close(layer(x), F.conv2d(x, layer.weight * subnet, padding=1))


def test_a_cast_fingerprints_live_tasks_only_when_their_dtype_changes(monkeypatch):
    """.to() in the scores' own dtype hashes nothing (a keep_scores model may hold thousands of live
    tasks); .double() keeps an untrained task untrained and a trained one trained."""
    from supsup_fast.compat import layers
    torch.manual_seed(0)
    layer = compat.MultitaskMaskLinear(6, 4, num_tasks=3, bias=False)
    layer.task = 1
    with torch.no_grad():
        layer.scores[1].neg_()  # trained
    layer.task = 0  # read only: untrained, live
    assert 0 in layer.scores and layer._still_initial(0)
    calls = []
    real = layers._digest
    monkeypatch.setattr(layers, "_digest", lambda s: calls.append(s.dtype) or real(s))
    layer.to(torch.float32)
    layer.float()
    assert calls == []
    layer.double()
    assert calls and layer._still_initial(0)
    initial = layer.scores[0].detach().clone()
    layer.task = 1
    layer.task = 0
    assert torch.equal(layer.scores[0].detach(), initial)  # its initial scores, not ones rebuilt from its bits
    assert layer.state_dict()["mask_untrained"].tolist() == [0]
    with torch.no_grad():  # trained while live: a cast keeps it trained
        layer.scores[0].add_(1.0)
    layer.float()
    assert not layer._still_initial(0)
