"""The fused training step (nn.fused_step): the in-backward RMSprop of threshold supermask layers
against the plain step (autograd through W ⊙ 1[s ≥ 0], FusedRMSprop), on an MLP with odd sizes and
a conv net, and through algorithms.train_task."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import supsup_fast as ss
import supsup_fast.nn as snn
from supsup_fast.algorithms.training import (TrainSettings, make_optimizer, make_task_optimizer, mlp_step_without_autograd,
                                             train_task)
from supsup_fast.models import build_model
from supsup_fast.data.tasks import TaskSplit
from supsup_fast.nn import InBackwardAdam, InBackwardOptimizer, InBackwardRMSprop, SupermaskConv2d, SupermaskLinear


class Mlp(nn.Module):
    def __init__(self, mask_fn="threshold", bias=False):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.a = SupermaskLinear(37, 29, bias=bias, generator=g, mask_fn=mask_fn, init="kaiming_normal")
        self.b = SupermaskLinear(29, 5, generator=g, mask_fn=mask_fn)

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(4)
        self.c1 = SupermaskConv2d(3, 6, 3, padding=1, generator=g)
        self.c2 = SupermaskConv2d(6, 4, 3, stride=2, generator=g, bias=True)
        self.fc = SupermaskLinear(4 * 3 * 3, 7, generator=g)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.c1(x)))).flatten(1))


def twins(make):
    a, b = make(), make()
    snn.begin_task(a, generator=torch.Generator().manual_seed(1))
    snn.begin_task(b, generator=torch.Generator().manual_seed(1))
    return a, b


def scores(model):
    return [m.scores.detach().clone() for m in snn.supermask_layers(model).values()]


FUSED = {"rmsprop": InBackwardRMSprop, "adam": InBackwardAdam}


@pytest.mark.parametrize("make,shape,classes", [(Mlp, (13, 37), 5), (ConvNet, (6, 3, 7, 7), 7)])
@pytest.mark.parametrize("wd", [0.0, 1e-3])
@pytest.mark.parametrize("optimizer", ["rmsprop", "adam"])
def test_fused_step_equals_plain_step(make, shape, classes, wd, optimizer):
    plain, fused = twins(make)
    opt_plain = make_optimizer(snn.task_parameters(plain), TrainSettings(lr=1e-2, weight_decay=wd, optimizer=optimizer))
    opt_fused = FUSED[optimizer](fused, lr=1e-2, weight_decay=wd)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        x, y = torch.randn(shape, generator=gen), torch.randint(0, classes, (shape[0],), generator=gen)
        losses = []
        for model, opt in ((plain, opt_plain), (fused, opt_fused)):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    for a, b in zip(scores(plain), scores(fused)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    for m in snn.supermask_layers(fused).values():
        assert m.scores.grad is None  # the update happened in the backward; nothing is left for step()
        assert torch.equal(m.mode().fused.masked_weight, m.weight * (m.scores >= 0))


def test_the_first_layer_computes_no_input_gradient(monkeypatch):
    _, model = twins(Mlp)
    InBackwardRMSprop(model, lr=1e-2)
    asked = {}

    def recording(name, real):
        def dense_grads(grad, x, w, need_input):
            asked[name] = need_input
            return real(grad, x, w, need_input)
        return dense_grads

    for name in ("a", "b"):
        layer = getattr(model, name)
        monkeypatch.setattr(layer, "_dense_grads", recording(name, layer._dense_grads))
    F.cross_entropy(model(torch.randn(4, 37)), torch.tensor([0, 1, 2, 3])).backward()
    assert asked == {"a": False, "b": True}


def test_input_gradient_matches_autograd():
    plain, fused = twins(Mlp)
    InBackwardRMSprop(fused, lr=0.0)  # lr 0: the scores stay, so both models stay equal
    x1 = torch.randn(5, 37, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    plain(x1).square().sum().backward()
    fused(x2).square().sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-6)


def in_backward_mlp():
    """An MLP whose layers take InBackwardRMSprop steps, and an input batch for it."""
    _, model = twins(Mlp)
    InBackwardRMSprop(model, lr=1e-2)
    return model, torch.randn(3, 37)


def test_a_second_backward_of_an_old_forward_is_refused():
    model, x = in_backward_mlp()
    first, second = model(x).sum(), model(x).sum()
    first.backward()
    with pytest.raises(RuntimeError, match="one backward per forward, in order"):
        second.backward()


def test_a_backward_after_the_scores_were_edited_is_refused():
    model, x = in_backward_mlp()
    old = model(x).sum()
    with torch.no_grad():
        model.a.scores.neg_()
    model(x)  # rebuilds the masked weight from the edited scores
    with pytest.raises(RuntimeError, match="masked weight changed after this forward"):
        old.backward()


def test_scores_changed_outside_the_step_are_seen():
    model, x = in_backward_mlp()
    with torch.no_grad():
        model.a.scores.neg_()  # an in-place edit bumps the version: the masked weight is rebuilt
        expect = model.b(F.relu(F.linear(x, model.a.weight * (model.a.scores >= 0))))
        assert torch.equal(model(x), expect)


def test_topk_layers_are_refused_and_train_task_falls_back():
    _, model = twins(lambda: Mlp(mask_fn="topk"))
    with pytest.raises(ValueError, match="model: layer 'a' uses mask_fn='topk'"):
        InBackwardRMSprop(model, lr=1e-2)
    with pytest.raises(ValueError, match="model: layer 'a' uses mask_fn='topk'"):
        InBackwardAdam(model, lr=1e-2)
    assert not isinstance(make_task_optimizer(model, TrainSettings()), InBackwardOptimizer)
    assert not isinstance(make_task_optimizer(twins(Mlp)[1], TrainSettings(optimizer="sgd")), InBackwardOptimizer)
    assert not isinstance(make_task_optimizer(twins(Mlp)[1], TrainSettings(fused_step=False)), InBackwardOptimizer)
    assert isinstance(make_task_optimizer(twins(Mlp)[1], TrainSettings()), InBackwardRMSprop)
    assert isinstance(make_task_optimizer(twins(Mlp)[1], TrainSettings(optimizer="adam")), InBackwardAdam)


@pytest.mark.parametrize("scheduler,optimizer", [("none", "rmsprop"), ("cosine", "rmsprop"), ("cosine_warmup", "adam")])
def test_train_task_fused_and_plain_learn_the_same_mask(scheduler, optimizer, monkeypatch):
    import supsup_fast.algorithms.training as training
    made = []
    real = training.make_task_optimizer
    monkeypatch.setattr(training, "make_task_optimizer", lambda *a: made.append(real(*a)) or made[-1])
    gen = torch.Generator().manual_seed(5)
    split = TaskSplit(torch.randn(200, 37, generator=gen), torch.randint(0, 5, (200,), generator=gen))
    masks = []
    for fused in (False, True):
        model = Mlp(bias=True)
        s = TrainSettings(iters=None, epochs=3, batch_size=32, lr=1e-2, scheduler=scheduler, optimizer=optimizer,
                          warmup_epochs=1, fused_step=fused)
        train_task(model, split, s, device=torch.device("cpu"), generator=torch.Generator().manual_seed(2))
        masks.append([m.bank.words.clone() for m in snn.supermask_layers(model).values()])
        assert all(isinstance(m.mode(), snn.OneTask) for m in snn.supermask_layers(model).values())
    assert [isinstance(o, InBackwardOptimizer) for o in made] == [False, True]  # both paths really ran
    for a, b in zip(*masks):
        assert torch.equal(a, b)


def test_load_state_dict_and_the_lr_reach_the_fused_update():
    _, model = twins(Mlp)
    opt = InBackwardRMSprop(model, lr=1e-2)
    x, y = torch.randn(8, 37), torch.randint(0, 5, (8,))
    F.cross_entropy(model(x), y).backward()
    saved = opt.state_dict()
    saved["param_groups"][0]["lr"] = 0.0
    opt.load_state_dict(saved)  # new group and state dicts: the layers' updates must read these
    before = scores(model)
    F.cross_entropy(model(x), y).backward()
    for a, b in zip(before, scores(model)):
        assert torch.equal(a, b)  # lr 0 from the loaded group: nothing moved
    assert opt.state[model.a.scores]["square_avg"].abs().sum() > 0  # the loaded state was updated
    with pytest.raises(ValueError, match="takes no other groups"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})


def test_the_mlp_step_with_a_scheduler_through_train_task_warns_nothing():
    import warnings
    gen = torch.Generator().manual_seed(5)
    split = TaskSplit(torch.randn(64, 784, generator=gen), torch.randint(0, 10, (64,), generator=gen))
    model = build_model("lenet", 10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        train_task(model, split, TrainSettings(iters=None, epochs=2, batch_size=32, scheduler="cosine"),
                   device=torch.device("cpu"), generator=torch.Generator().manual_seed(1))
    assert model.layers[0].num_tasks == 1


@pytest.mark.parametrize("optimizer", ["rmsprop", "adam"])
def test_the_mlp_step_without_autograd_follows_the_plain_step(optimizer):
    # models.MLP (LeNet-300-100 here) trained by a fused optimiser takes the whole step from
    # ops.mlp_cross_entropy_grads: the same math as autograd's, to float rounding.
    plain, fused = twins(lambda: build_model("lenet", 10))
    settings = TrainSettings(lr=1e-3, optimizer=optimizer)
    opt_plain, opt_fused = make_optimizer(snn.task_parameters(plain), settings), make_task_optimizer(fused, settings)
    step = mlp_step_without_autograd(fused, opt_fused, torch.device("cpu"))
    assert step is not None
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x, y = torch.randn(16, 1, 28, 28, generator=gen), torch.randint(0, 10, (16,), generator=gen)
        loss = F.cross_entropy(plain(x), y)
        opt_plain.zero_grad(set_to_none=True)
        loss.backward()
        opt_plain.step()
        assert step(x, y) == pytest.approx(loss.item(), rel=1e-5)
    # An RMSprop/Adam step is lr·g/(|g| + ε)-sized: where |g| is near ε a rounding difference in g
    # moves the step by a part of lr, so the tolerance is a few % of lr (the bits step's GEMMs, where
    # the backend takes it, sum in another order than autograd's BLAS).
    for a, b in zip(scores(plain), scores(fused)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=3e-2 * settings.lr)


def test_the_mlp_step_is_only_taken_where_it_applies():
    model = build_model("lenet", 10)
    snn.begin_task(model)
    assert mlp_step_without_autograd(model, make_optimizer(snn.task_parameters(model), TrainSettings()),
                                     torch.device("cpu")) is None  # a plain optimiser: autograd
    _, conv = twins(ConvNet)
    assert mlp_step_without_autograd(conv, InBackwardRMSprop(conv, lr=1e-3), torch.device("cpu")) is None
    model.layers[0].bias = torch.zeros(300)  # a bias: the by-hand gradients do not cover it
    assert mlp_step_without_autograd(model, InBackwardRMSprop(model, lr=1e-3), torch.device("cpu")) is None


def test_the_whole_model_rmsprop_step_matches_on_both_backends_and_reads_the_group():
    """RMSprop's MLP step is one backend call (mlp_ste_rmsprop_step_): the cpu kernel and the
    reference composition agree, and a learning rate loaded into the optimiser reaches it."""
    results = []
    for backend in ("cpu", "reference"):
        torch.manual_seed(3)
        model = build_model("lenet", 10)
        snn.begin_task(model)
        with ss.use_backend(backend):
            opt = make_task_optimizer(model, TrainSettings(lr=1e-3, optimizer="rmsprop"))
            step = mlp_step_without_autograd(model, opt, torch.device("cpu"))
        gen = torch.Generator().manual_seed(0)
        losses = [step(torch.randn(16, 784, generator=gen), torch.randint(0, 10, (16,), generator=gen)) for _ in range(3)]
        results.append((losses, scores(model), model))
        saved = opt.state_dict()
        saved["param_groups"][0]["lr"] = 0.0
        opt.load_state_dict(saved)
        before = scores(model)
        step(torch.randn(16, 784, generator=gen), torch.randint(0, 10, (16,), generator=gen))
        assert all(torch.equal(a, b) for a, b in zip(before, scores(model)))  # lr 0: nothing moved
    (l_cpu, s_cpu, _), (l_ref, s_ref, _) = results
    assert l_cpu == pytest.approx(l_ref, rel=1e-5)
    for a, b in zip(s_cpu, s_ref):  # 3 % of lr: see test_the_mlp_step_without_autograd_follows_the_plain_step
        torch.testing.assert_close(a, b, rtol=1e-4, atol=3e-5)


@pytest.mark.parametrize("signed", [True, False])
def test_the_mlp_step_that_keeps_masks_as_bits_follows_the_float_step(monkeypatch, signed):
    """Where the backend prefers it (mask_bits_training_step), the MLP's RMSprop step keeps each mask
    as bits (mlp_ste_rmsprop_bits_step_) and frees the masked weight; signed-constant layers are
    read as their sign bits, others as float. It follows the float step, and a forward or a
    per-layer backward between such steps sees the mask they wrote."""
    cpu = ss.ops.backend_for(torch.device("cpu"))
    calls = []
    real = type(cpu).mlp_ste_rmsprop_bits_step_

    def counted(self, *args):
        calls.append(args[3])  # the sign bits given, per layer
        return real(self, *args)

    float_twin, bits_twin = twins(lambda: build_model("lenet", 10))
    if not signed:
        for model in (float_twin, bits_twin):
            model.layers[1].weight.mul_(torch.linspace(0.5, 1.5, 300))  # no longer signed-constant
    assert (bits_twin.layers[1].signed_weight_bits() is not None) == signed
    settings = TrainSettings(lr=1e-3)
    steps = []
    for model, bits in ((float_twin, False), (bits_twin, True)):
        monkeypatch.setattr(type(cpu), "mask_bits_training_step", lambda self, batch, num_weights, bits=bits: bits)
        monkeypatch.setattr(type(cpu), "mlp_ste_rmsprop_bits_step_", counted)
        opt = make_task_optimizer(model, settings)
        steps.append((model, opt, mlp_step_without_autograd(model, opt, torch.device("cpu")), bits))
    gen = torch.Generator().manual_seed(0)
    for i in range(4):
        x, y = torch.randn(32, 784, generator=gen), torch.randint(0, 10, (32,), generator=gen)
        losses = []
        for model, opt, step, bits in steps:
            monkeypatch.setattr(type(cpu), "mask_bits_training_step", lambda self, batch, num_weights, bits=bits: bits)
            if i == 2:  # a per-layer (autograd) step in between: it must see the mask the bits step wrote
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                losses.append(loss.item())
            else:
                losses.append(step(x, y))
        assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert len(calls) == 3 and all((c is not None) == (signed or l != 1) for l, c in enumerate(calls[-1]))
    for layer in bits_twin.layers:
        assert layer.mode().fused.masked_weight is None  # freed: the last step kept the mask as bits
    for a, b in zip(scores(float_twin), scores(bits_twin)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=3e-2 * settings.lr)
    for layer in bits_twin.layers:  # a forward after the steps rebuilds the masked weight from the scores
        state = layer.mode().fused
        assert torch.equal(state.effective_weight(layer.scores, layer.weight), layer.weight * (layer.scores >= 0))
        assert torch.equal(state.mask_words(layer.scores, layer.weight), ss.pack_bits(layer.scores >= 0))
        with torch.no_grad():
            layer.scores.neg_()  # an edit outside the step (it bumps the version): the bits are rebuilt
        assert torch.equal(state.mask_words(layer.scores, layer.weight), ss.pack_bits(layer.scores >= 0))


def test_the_cpu_backend_keeps_masks_as_bits_where_that_measured_faster(monkeypatch):
    # AVX-512: always (batch <= 256); AVX2: only for models whose float step state leaves the cache
    # (FC1024, not LeNet), and not on Intel CPUs; scalar CPUs and large batches keep the float step.
    from supsup_fast.ops.backends import cpu as cpu_module
    backend = cpu_module.CpuBackend()
    lenet = sum(m.weight.numel() for m in build_model("lenet", 500).layers)
    fc1024 = sum(m.weight.numel() for m in build_model("fc1024", 500).layers)
    expected = {("amd", "avx512"): (True, True), ("amd", "avx2"): (False, True), ("amd", "scalar"): (False, False),
                ("intel", "avx512"): (True, True), ("intel", "avx2"): (False, False), ("other", "avx2"): (False, True)}
    for (vendor, isa), (small, large) in expected.items():
        monkeypatch.setattr(backend, "isa", isa)
        monkeypatch.setattr(backend, "vendor", vendor)
        assert backend.mask_bits_training_step(128, lenet) is small, (vendor, isa)
        assert backend.mask_bits_training_step(128, fc1024) is large, (vendor, isa)
        assert backend.mask_bits_training_step(512, fc1024) is False, (vendor, isa)


def test_an_evaluation_between_steps_keeps_the_in_backward_optimiser():
    # set_task (to look at an old task) and back to set_train_mode: the layers must go on applying
    # the in-backward update; opt.step() is a no-op, so falling back to the plain step would train nothing.
    model = Mlp()
    snn.begin_task(model, generator=torch.Generator().manual_seed(1))
    snn.finish_task(model)
    snn.begin_task(model, generator=torch.Generator().manual_seed(2))
    opt = InBackwardRMSprop(model, lr=1e-2)
    x, y = torch.randn(13, 37, generator=torch.Generator().manual_seed(5)), torch.arange(13) % 5
    F.cross_entropy(model(x), y).backward()
    snn.set_task(model, 0)
    model(x)
    snn.set_train_mode(model)
    before = scores(model)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, scores(model)))
    assert all(m.scores.grad is None for m in snn.supermask_layers(model).values())
    opt.close()
    snn.set_train_mode(model)  # closed: the plain step, with gradients for a plain optimiser
    assert all(m.mode().fused is None for m in snn.supermask_layers(model).values())


def test_closing_the_last_tasks_optimiser_leaves_the_next_ones():
    model = Mlp()
    snn.begin_task(model, generator=torch.Generator().manual_seed(1))
    old = InBackwardRMSprop(model, lr=1e-2)
    snn.finish_task(model)
    snn.begin_task(model, generator=torch.Generator().manual_seed(2))
    new = InBackwardAdam(model, lr=1e-2)
    old.close()  # late: must not return the new task's layers to the plain step
    before = scores(model)
    F.cross_entropy(model(torch.randn(13, 37)), torch.arange(13) % 5).backward()
    assert all(not torch.equal(a, b) for a, b in zip(before, scores(model)))
    # a second optimiser over the same task takes over; closing the first leaves the second's
    second = InBackwardRMSprop(model, lr=1e-2)
    new.close()
    assert all(m.mode().fused is not None for m in snn.supermask_layers(model).values())
    second.close()
    assert all(m.mode().fused is None for m in snn.supermask_layers(model).values())


def test_in_backward_optimisers_are_refused_under_ddp(tmp_path):
    # Inside DDP the update would use each rank's own gradient before DDP averages them.
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = Mlp()
        snn.begin_task(model, generator=torch.Generator().manual_seed(1))
        ddp = DistributedDataParallel(model)
        with pytest.raises(ValueError, match="before DistributedDataParallel averages it"):
            InBackwardRMSprop(ddp)
        opt = InBackwardRMSprop(model)  # the inner model: refused at the first forward through DDP
        with pytest.raises(RuntimeError, match="under DDP use torch.optim.RMSprop"):
            ddp(torch.randn(3, 37))
        model(torch.randn(3, 37)).sum().backward()  # outside DDP the fused step still runs
        opt.close()
        ddp(torch.randn(3, 37)).sum().backward()  # and the plain step runs under DDP
        assert all(m.scores.grad is not None for m in snn.supermask_layers(model).values())
    finally:
        dist.destroy_process_group()
