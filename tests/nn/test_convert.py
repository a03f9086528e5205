"""supsup_fast.convert on a small CNN defined here: two tasks trained, one-shot inference,
torch.compile of the converted model."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import supsup_fast as ss
from supsup_fast import nn as snn
from supsup_fast.algorithms.inference import infer_oneshot
from supsup_fast.convert import FrozenAffine
from supsup_fast.data import load_benchmark


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16),
                                      nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Linear(16 * 7 * 7, 10)

    def forward(self, x):
        return self.fc(self.features(x.view(-1, 1, 28, 28)).flatten(1))


def test_keep_mode_masks_the_existing_weights_on_a_copy():
    cnn = SmallCNN()
    model = ss.convert(cnn)  # weights="keep": Piggyback-style
    assert isinstance(cnn.features[0], nn.Conv2d)  # the original is untouched
    conv, fc = model.features[0], model.fc
    assert isinstance(conv, snn.SupermaskConv2d) and isinstance(fc, snn.SupermaskLinear)
    assert torch.equal(conv.weight, cnn.features[0].weight) and torch.equal(conv.bias, cnn.features[0].bias)
    assert isinstance(model.features[1][0], snn.MultitaskBatchNorm) and isinstance(model.features[1][1], FrozenAffine)
    assert list(model.parameters()) == []  # weights are frozen buffers; scores come with begin_task
    snn.begin_task(model)
    with torch.no_grad():  # all-ones scores: the mask keeps every weight, so the output is the network's
        for layer in snn.supermask_layers(model).values():
            layer.scores.fill_(1.0)
    model.eval(), cnn.eval()
    x = torch.randn(4, 784)
    with torch.no_grad():  # a fresh BN's running stats are 0 / 1, as a new task's: same network
        assert torch.allclose(model(x), cnn(x), atol=1e-4)


def test_reinit_mode_selection_and_freezing():
    cnn = SmallCNN()
    model = ss.convert(cnn, weights="signed_constant", exclude=["fc"], batchnorm=False, seed=3)
    conv = model.features[0]
    std = math.sqrt(2.0) / math.sqrt(conv.weight[0].numel())
    assert torch.allclose(conv.weight.abs(), torch.full_like(conv.weight, std)) and conv.bias is None
    assert isinstance(model.fc, nn.Linear) and not model.fc.weight.requires_grad
    assert isinstance(model.features[1], nn.BatchNorm2d)
    only = ss.convert(cnn, include=[nn.Linear], weights="kaiming_normal")
    assert isinstance(only.fc, snn.SupermaskLinear) and isinstance(only.features[0], nn.Conv2d)
    by_name = ss.convert(cnn, include="features.*", mask_fn="topk", density=0.3)
    assert isinstance(by_name.features[3], snn.SupermaskConv2d) and isinstance(by_name.fc, nn.Linear)
    inplace = ss.convert(cnn, inplace=True)
    assert inplace is cnn and isinstance(cnn.fc, snn.SupermaskLinear)


def test_bad_arguments():
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        ss.convert("resnet")
    with pytest.raises(ValueError, match="weights must be one of"):
        ss.convert(SmallCNN(), weights="pretrained-ish")
    with pytest.raises(TypeError, match="include must hold"):
        ss.convert(SmallCNN(), include=[3])
    with pytest.raises(ValueError, match="nothing to convert"):
        ss.convert(SmallCNN(), include=["nope.*"])
    with pytest.raises(ValueError, match="layer '0': padding='same' with an even effective kernel"):
        ss.convert(nn.Sequential(nn.Conv2d(1, 2, 2, padding="same")))
    with pytest.raises(ValueError, match="single layer"):
        ss.convert(nn.Linear(3, 4))


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    bench = load_benchmark("permuted-mnist", 2, seed=0)
    model = ss.convert(SmallCNN(), weights="signed_constant", seed=0)
    for task in range(2):
        snn.begin_task(model)
        opt = torch.optim.RMSprop(snn.task_parameters(model), lr=1e-3)
        model.train()
        gen = torch.Generator().manual_seed(task)
        for i, (x, y) in enumerate(bench.train(task).batches(64, shuffle=True, generator=gen)):
            if i == 40:
                break
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        snn.finish_task(model)
    model.eval()
    return model, bench


def test_two_tasks_trained_and_inferred_one_shot(trained):
    model, bench = trained
    assert snn.num_tasks(model) == 2 and snn.mask_bytes(model) > 0
    for task in range(2):
        snn.set_task(model, task)
        x, y = bench.test(task).batch(torch.arange(500))
        with torch.no_grad():
            assert float((model(x).argmax(1) == y).float().mean()) > 0.6
    hits = 0
    for task in range(2):
        for j in range(4):
            x, _ = bench.test(task).batch(torch.arange(j * 16, (j + 1) * 16))
            hits += infer_oneshot(model, x, "entropy") == task
    assert hits >= 7


def test_torch_compile_of_the_converted_model(trained):
    model, bench = trained
    x, _ = bench.test(1).batch(torch.arange(8))
    snn.set_task(model, 1)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-5)
    alpha = torch.full((2,), 0.5, requires_grad=True)
    with snn.superposition(model, alpha):
        out = compiled(x)
    (g,) = torch.autograd.grad(-(out.softmax(1) * out.log_softmax(1)).sum(1).mean(), alpha)
    assert g.shape == (2,) and bool(torch.isfinite(g).all())


def test_a_tied_layer_stays_one_layer_and_subclasses_are_named():
    lin = nn.Linear(16, 16)
    model = ss.convert(nn.Sequential(lin, nn.ReLU(), lin, nn.ReLU(), nn.Linear(16, 4)), weights="signed_constant")
    assert model[0] is model[2] and isinstance(model[0], snn.SupermaskLinear)
    assert len(snn.supermask_layers(model)) == 2
    snn.begin_task(model)
    model(torch.randn(3, 16)).sum().backward()
    snn.finish_task(model)
    assert snn.num_tasks(model) == 1

    class Sub(nn.Linear):
        pass
    with pytest.warns(UserWarning, match=r"leaves 1 subclass\(es\) of nn.Linear / nn.Conv2d as they are .*: 1 \(Sub\)"):
        mixed = ss.convert(nn.Sequential(nn.Linear(8, 8), Sub(8, 8)))
    assert isinstance(mixed[0], snn.SupermaskLinear) and type(mixed[1]) is Sub


class _TiedConv(nn.Module):
    """One conv run twice a forward (weight tying), between per-task BatchNorms."""

    def __init__(self):
        super().__init__()
        self.stem, self.shared, self.bn = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = F.relu(self.shared(F.relu(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(self.bn(self.shared(h)), 1).flatten(1))


@pytest.mark.parametrize("optimizer", ["rmsprop", "adam"])
def test_train_task_trains_a_layer_run_twice_with_the_plain_step(optimizer):
    """The fused in-backward step applies a layer's update in its backward, which a second use of
    the layer in the same forward cannot take (its backward was refused): train_task sees the layer
    run twice in the first batch and trains with the plain optimiser, the same masks as fused_step=False."""
    from supsup_fast.algorithms import TrainSettings, train_task
    from supsup_fast.data.tasks import TaskSplit
    g = torch.Generator().manual_seed(0)
    split = TaskSplit(torch.randn(24, 3, 6, 6, generator=g), torch.randint(0, 4, (24,), generator=g))
    models = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = ss.convert(_TiedConv())
        train_task(model, split, TrainSettings(iters=5, batch_size=8, lr=1e-2, optimizer=optimizer, fused_step=fused),
                   device=torch.device("cpu"), generator=torch.Generator().manual_seed(1))
        models.append(model)
    for name, layer in snn.supermask_layers(models[0]).items():
        assert torch.equal(layer.bank.words, snn.supermask_layers(models[1])[name].bank.words), name
    # the fused optimiser itself says what to do
    model = ss.convert(_TiedConv())
    snn.begin_task(model)
    snn.InBackwardRMSprop(model, lr=1e-2)
    with pytest.raises(RuntimeError, match="weight tying"):
        F.cross_entropy(model(split.x[:8]), split.y[:8]).backward()


def test_every_batchnorm_with_running_statistics_becomes_per_task_and_the_rest_is_named():
    """SyncBatchNorm (what convert_sync_batchnorm makes) and BatchNorm3d keep per-task statistics as
    BatchNorm1d/2d do (shared ones moved with every task trained: the official code's issue #11); a
    BN without running statistics is stateless and stays; what stays with shared statistics, or
    unmasked, is named in a warning."""
    net = nn.Sequential(nn.Conv2d(2, 4, 3), nn.SyncBatchNorm(4), nn.BatchNorm2d(4, track_running_stats=False),
                        nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    model = ss.convert(net)
    assert isinstance(model[1][0], snn.MultitaskBatchNorm) and type(model[2]) is nn.BatchNorm2d  # [1][1]: γ, β kept
    x = torch.randn(6, 2, 6, 6)
    outputs = []
    for t in range(2):
        snn.begin_task(model, generator=torch.Generator().manual_seed(t))
        model.train()
        model(x + 3 * t)  # moves the task's own statistics only
        snn.finish_task(model)
        model.eval()
        snn.set_task(model, 0)
        outputs.append(model(x))
    torch.testing.assert_close(outputs[0], outputs[1])
    three_d = ss.convert(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm3d(2)), weights="signed_constant")
    assert isinstance(three_d[1], snn.MultitaskBatchNorm)
    with pytest.warns(UserWarning, match=r"other convolution\(s\) stay as they are .*c1 \(Conv1d\)"):
        ss.convert(nn.ModuleDict({"l": nn.Linear(3, 3), "c1": nn.Conv1d(2, 2, 1)}))
    with pytest.warns(UserWarning, match=r"statistics shared by every task .*norm \(InstanceNorm2d\)"):
        ss.convert(nn.ModuleDict({"l": nn.Linear(3, 3), "norm": nn.InstanceNorm2d(3, track_running_stats=True)}))
    with pytest.warns(UserWarning, match=r"momentum=None .* momentum 0.1"):
        ss.convert(nn.ModuleDict({"l": nn.Linear(3, 3), "bn": nn.BatchNorm1d(3, momentum=None)}))


@pytest.mark.parametrize("weights", ["keep", "signed_constant"])
def test_transformer_encoder_layer_in_eval_runs_its_masked_layers(weights):
    # In eval() torch's fused fast path read linear1 / linear2's weights itself: the masks were skipped
    # ("keep": every task gave the dense output) or a redrawn layer without bias crashed it.
    torch.manual_seed(0)
    enc = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True, dropout=0.0)
    with pytest.warns(UserWarning, match="out_proj"):
        model = ss.convert(nn.Sequential(enc), weights=weights)
    for _ in range(2):
        snn.begin_task(model)
        snn.finish_task(model)
    model.eval()
    layer, x = model[0], torch.randn(4, 6, 32)

    def reference(t):
        l1, l2 = layer.linear1, layer.linear2
        m1, m2 = (ss.unpack_bits(l.bank.words[t], l.n).view_as(l.weight).float() for l in (l1, l2))
        h = layer.norm1(x + layer.self_attn(x, x, x, need_weights=False)[0])
        return layer.norm2(h + F.linear(F.relu(F.linear(h, l1.weight * m1, l1.bias)), l2.weight * m2, l2.bias))
    with torch.no_grad():
        for t in range(2):
            snn.set_task(model, t)
            torch.testing.assert_close(model(x), reference(t))
    # the stack turned a padded batch into a nested tensor, which the supermask layers were then given
    stack = ss.convert(nn.TransformerEncoder(enc, num_layers=2, enable_nested_tensor=True), weights=weights)
    for _ in range(2):
        snn.begin_task(stack)
        snn.finish_task(stack)
    stack.eval()
    pad = torch.zeros(4, 6, dtype=torch.bool)
    pad[:, 4:] = True
    with torch.no_grad():
        snn.set_task(stack, 1)
        y = stack(x, src_key_padding_mask=pad)
        stack.train()
        torch.testing.assert_close(y[:, :4], stack(x, src_key_padding_mask=pad)[:, :4])  # the slow path's


def test_include_and_exclude_see_every_name_of_a_module():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.adapter, self.head = nn.Linear(8, 8), nn.Linear(8, 4)
            self.frozen_adapter = self.adapter  # the same module under a second name

        def forward(self, x):
            return self.head(self.adapter(x))
    assert type(ss.convert(Net(), exclude=["frozen_adapter"]).adapter) is nn.Linear
    assert isinstance(ss.convert(Net(), include=["frozen_adapter", "head"]).adapter, snn.SupermaskLinear)


def test_a_weight_tied_to_a_module_left_unconverted_is_named_as_untied():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.lm_head = nn.Embedding(20, 8), nn.Linear(8, 20, bias=False)
            self.lm_head.weight = self.emb.weight  # the usual tie of a language model

        def forward(self, ids):
            return self.lm_head(self.emb(ids))
    with pytest.warns(UserWarning, match=r"unties weights shared between layers.*: emb, lm_head"):
        ss.convert(LM(), weights="signed_constant")
