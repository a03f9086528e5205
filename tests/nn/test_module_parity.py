"""What a PyTorch user expects of a module, found missing by a user-side audit: a replaced weight is
the weight used, mid-task checkpoints keep BN statistics, copies drop caches and in-backward
optimisers, the superposition context restores only what it set, lifecycle errors are clear."""
import contextlib
import copy
import io
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import supsup_fast as ss
import supsup_fast.nn as snn


def trained(layer, tasks=2, seed=0):
    for t in range(tasks):
        snn.begin_task(layer, generator=torch.Generator().manual_seed(seed + t))
        snn.finish_task(layer)
    return layer


def mask(layer, t):
    return ss.unpack_bits(layer.bank.words[t], layer.weight[0].numel()).view_as(layer.weight).float()


@pytest.mark.parametrize("how", ["load_state_dict", "functional_call", "copy_"])
def test_a_signed_constant_layer_computes_with_the_weight_it_holds(rng, how):
    """The 2-bit path rebuilt the weight as sign(W)·max|W| whatever W was loaded."""
    layer = trained(snn.SupermaskLinear(40, 7, bias=True, init="signed_constant"))
    snn.set_task(layer, 1)
    x, w2 = torch.randn(3, 40, generator=rng), torch.randn(7, 40, generator=rng)
    want = F.linear(x, w2 * mask(layer, 1), layer.bias)
    if how == "functional_call":
        y = torch.func.functional_call(layer, {"weight": w2}, (x,))
    else:
        if how == "copy_":
            with torch.no_grad():
                layer.weight.copy_(w2)
        else:
            layer.load_state_dict({**layer.state_dict(), "weight": w2})
        y = layer(x)
    torch.testing.assert_close(y, want)


def test_a_signed_constant_weight_that_requires_grad_gets_its_gradient(rng):
    layer = trained(snn.SupermaskLinear(40, 7, init="signed_constant"), tasks=1)
    snn.set_task(layer, 0)
    layer.weight.requires_grad_(True)
    x = torch.randn(3, 40, generator=rng)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.weight.grad, torch.ones(3, 7).t().mm(x) * mask(layer, 0))


def test_a_mid_task_state_dict_keeps_the_bn_statistics_of_the_task(rng):
    def model():
        return nn.Sequential(snn.SupermaskLinear(6, 4), snn.MultitaskBatchNorm(4))
    a = model()
    snn.begin_task(a, generator=torch.Generator().manual_seed(0))
    a.train()
    for _ in range(3):
        a(torch.randn(8, 6, generator=rng))
    sd = a.state_dict()
    assert {"1.current_mean", "1.current_var"} <= set(sd)
    b = model()
    snn.begin_task(b, generator=torch.Generator().manual_seed(5))
    b.load_state_dict(sd)
    for m in (a, b):
        snn.finish_task(m)
    torch.testing.assert_close(b[1].means.rows, a[1].means.rows)
    assert float(a[1].means.rows.abs().sum()) > 0
    assert "1.current_mean" not in a.state_dict()  # no task in training: nothing to save


def test_convert_keeps_a_float64_models_bn_dtype_and_eval_flag():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 5 * 5, 3)).double().eval()
    model = ss.convert(net, weights="kaiming_normal")
    assert not any(m.training for m in model.modules())
    bn = model[1]
    assert bn.means.storage.dtype == torch.float64
    snn.begin_task(model)
    model.train()
    assert model(torch.randn(2, 3, 5, 5, dtype=torch.float64)).dtype == torch.float64


def test_begin_task_inside_a_superposition_block_keeps_training_mode():
    m = trained(nn.Sequential(snn.SupermaskLinear(8, 6), nn.ReLU(), snn.SupermaskLinear(6, 3)))
    with snn.superposition(m, torch.full((2,), 0.5), uniform=True):
        m(torch.randn(2, 8))
        snn.begin_task(m)
    assert all(layer.mode().kind == "train" for layer in snn.supermask_layers(m).values())
    m(torch.randn(4, 8)).pow(2).sum().backward()
    assert all(layer.scores.grad is not None for layer in snn.supermask_layers(m).values())
    with snn.superposition(m, torch.full((2,), 0.5)):  # the usual case: the modes come back
        pass
    assert all(layer.mode().kind == "train" for layer in snn.supermask_layers(m).values())


def test_a_uniform_alpha_changed_inside_the_block_is_refused():
    layer = trained(snn.SupermaskLinear(8, 6), tasks=3)
    alpha = torch.full((3,), 1 / 3)
    with snn.superposition(layer, alpha, uniform=True):
        layer(torch.randn(1, 8))
        alpha.copy_(torch.tensor([1.0, 0.0, 0.0]))
        with pytest.raises(ValueError, match="uniform=True needs alpha = 1/k"):
            layer(torch.randn(1, 8))


def test_copies_carry_no_caches_and_no_in_backward_optimiser(rng):
    layer = trained(snn.SupermaskLinear(64, 32, init="kaiming_normal"), tasks=3)

    def saved_size(module):
        buf = io.BytesIO()
        torch.save(module, buf)
        return buf.tell()
    fresh = saved_size(layer)
    alpha, x = torch.full((3,), 1 / 3, requires_grad=True), torch.randn(1, 64, generator=rng, requires_grad=True)
    with snn.superposition(layer, alpha, uniform=True):
        layer(x).sum().backward()
    assert layer._counts is not None
    assert saved_size(layer) == fresh
    snn.begin_task(layer)
    opt = snn.InBackwardRMSprop(layer, lr=1e-2)
    copied = pickle.loads(pickle.dumps(layer))
    twin = copy.deepcopy(layer)
    for m in (copied, twin):
        assert m.mode().kind == "train" and m.mode().fused is None
        m(torch.randn(4, 64, generator=rng)).sum().backward()  # the plain step: a gradient, no update
        assert m.scores.grad is not None
        snn.set_train_mode(m)  # and the copy keeps no in-backward state to return to
        assert m.mode().fused is None
    opt.close()


def test_task_indices_must_be_integers_and_bn_lifecycle_errors_are_clear():
    m = trained(nn.Sequential(snn.SupermaskLinear(6, 4), snn.MultitaskBatchNorm(4)))
    snn.set_task(m, torch.tensor(1))
    for bad in (1.5, torch.tensor(0.9), "1"):
        with pytest.raises(TypeError, match="task must be an integer task index"):
            snn.set_task(m, bad)
    with pytest.raises(RuntimeError, match="call begin_task first"):
        m[1].finish_task()
    before = [mod._mode for mod in snn.task_modules(m)]
    with pytest.raises(RuntimeError, match="no task is being trained"):
        snn.set_train_mode(m)
    assert [mod._mode for mod in snn.task_modules(m)] == before


def test_conv_repr_names_its_dilation():
    assert "dilation=(2, 2)" in repr(snn.SupermaskConv2d(3, 4, 3, dilation=2))


@pytest.mark.parametrize("padding,dilation", [("same", 1), ("same", 2), ("valid", 1), (1, 1)])
def test_conv_takes_nn_conv2ds_padding_strings(rng, padding, dilation):
    ref = nn.Conv2d(3, 4, 3, padding=padding, dilation=dilation, bias=False)
    layer = trained(snn.SupermaskConv2d(3, 4, 3, padding=padding, dilation=dilation, init=ref.weight.detach()), tasks=1)
    snn.set_task(layer, 0)
    x = torch.randn(2, 3, 9, 9, generator=rng)
    torch.testing.assert_close(layer(x), F.conv2d(x, ref.weight * mask(layer, 0), None, 1, ref.padding if padding != "same"
                                                   else dilation, dilation))
    assert layer(x).shape == ref(x).shape


@pytest.mark.parametrize("padding_mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("unbatched", [False, True])
def test_conv_padding_modes_as_nn_conv2d(rng, padding_mode, unbatched):
    """One task (forward, input gradient), training (the scores' gradient) and a superposition (the
    α-gradient), each against nn.Conv2d with the same padding_mode on W ⊙ M or W ⊙ S."""
    ref = nn.Conv2d(3, 4, 3, padding=(1, 2), padding_mode=padding_mode, bias=True)
    layer = trained(snn.SupermaskConv2d(3, 4, 3, padding=(1, 2), padding_mode=padding_mode, bias=True,
                                        init=ref.weight.detach()), tasks=2)
    with torch.no_grad():
        layer.bias.copy_(ref.bias)
    assert f"padding_mode={padding_mode!r}" in repr(layer)
    x = torch.randn(*(() if unbatched else (2,)), 3, 7, 6, generator=rng, requires_grad=True)
    snn.set_task(layer, 1)
    y = layer(x)
    (dx,) = torch.autograd.grad(y.square().sum(), x)
    with torch.no_grad():
        ref.weight.copy_(layer.weight * mask(layer, 1))
    y_ref = ref(x)
    (dx_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(dx, dx_ref)
    alpha = torch.tensor([0.3, 0.7], requires_grad=True)
    with snn.superposition(layer, alpha):
        (da,) = torch.autograd.grad(layer(x).sum(), alpha)
    torch.testing.assert_close(da, torch.stack([F.conv2d(F.pad(x, (2, 2, 1, 1), mode=padding_mode),
                                                         layer.weight * mask(layer, t)).sum() for t in range(2)]))
    snn.begin_task(layer, generator=torch.Generator().manual_seed(5))
    layer(x).sum().backward()
    scores = layer.scores.detach().clone().requires_grad_(True)  # the straight-through estimator's gradient
    w_ste = layer.weight * (scores >= 0).float() + layer.weight * (scores - scores.detach())
    F.conv2d(F.pad(x.detach(), (2, 2, 1, 1), mode=padding_mode), w_ste, layer.bias).sum().backward()
    torch.testing.assert_close(layer.scores.grad, scores.grad)


def test_convert_keeps_a_conv_padding_mode(rng):
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU())
    converted = ss.convert(copy.deepcopy(net), weights="keep")
    layer = converted[0]
    assert layer.padding_mode == "reflect"
    snn.begin_task(converted, generator=torch.Generator().manual_seed(0))
    snn.finish_task(converted)
    x = torch.randn(2, 3, 6, 6, generator=rng)
    with torch.no_grad():
        net[0].weight.mul_(mask(layer, 0))
        torch.testing.assert_close(converted(x), net(x))
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        snn.SupermaskConv2d(3, 4, 3, padding_mode="mirror")


def test_conv_padding_same_that_needs_one_sided_padding_is_refused():
    with pytest.raises(ValueError, match="padding='same' needs stride 1"):
        snn.SupermaskConv2d(3, 4, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="even effective kernel"):
        snn.SupermaskConv2d(3, 4, 2, padding="same")


@pytest.mark.parametrize("make", [lambda: snn.SupermaskLinear(8, 5), lambda: snn.SupermaskLinear(8, 5, init="kaiming_normal"),
                                  lambda: snn.SupermaskConv2d(3, 4, 3)], ids=["signed", "kaiming", "conv"])
def test_jit_trace_of_a_one_task_layer_passes_its_check_and_matches_eager(rng, make):
    layer = trained(make())
    snn.set_task(layer, 0)  # the first forward of the task is the traced one
    x = torch.randn(2, 8, generator=rng) if isinstance(layer, snn.SupermaskLinear) else torch.randn(1, 3, 5, 5, generator=rng)
    traced = torch.jit.trace(layer, (x,))  # check_trace re-runs the forward and compares the graphs
    torch.testing.assert_close(traced(x), layer(x))


def test_a_uniform_alpha_is_checked_once_unless_it_changes(monkeypatch):
    from supsup_fast.nn import layers as layer_module
    m = trained(nn.Sequential(snn.SupermaskLinear(8, 6), nn.ReLU(), snn.SupermaskLinear(6, 3)), tasks=3)
    calls = []
    real = layer_module.check_uniform_alpha
    monkeypatch.setattr(layer_module, "check_uniform_alpha", lambda a, k: calls.append(k) or real(a, k))
    with torch.inference_mode():
        alpha = torch.full((3,), 1 / 3)  # an inference tensor: no version counter to key a cache on
    with snn.superposition(m, alpha, uniform=True):
        for _ in range(5):
            m(torch.randn(1, 8))
    assert calls == []  # checked by set_superposition, not again by each layer's forward


def test_a_float64_model_loads_its_own_mask_file(tmp_path):
    from supsup_fast.models import build_model
    from supsup_fast.runs import maskfile
    model = build_model("gemresnet18", 5, seed=1).double()
    snn.begin_task(model, generator=torch.Generator().manual_seed(0))
    model.train()
    model(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    snn.finish_task(model)
    maskfile.save_model(model, tmp_path / "m.safetensors")
    fresh = build_model("gemresnet18", 5, seed=1).double()
    maskfile.load_masks(fresh, tmp_path / "m.safetensors")
    assert fresh.stem[1].means.rows.dtype == torch.float64
    torch.testing.assert_close(fresh.stem[1].means.rows, model.stem[1].means.rows)


@pytest.mark.parametrize("make", [lambda: snn.SupermaskLinear(20, 7), lambda: snn.SupermaskConv2d(3, 4, 3, padding=1)],
                         ids=["linear", "conv"])
@pytest.mark.parametrize("rows", [1, 33])
def test_layers_under_autocast(rng, make, rows):
    """Under torch.autocast one task, a superposition and the fused training step run as autocast's
    fp32 ops: the input cast up, one dtype through forward and backward (a bf16 output met fp32
    saved tensors in the superposed and fused backwards), the results those of the same call outside
    autocast on the input rounded to bf16. A plain training step keeps autocast's precision."""
    layer = trained(make(), tasks=2)
    shape = (rows, 20) if isinstance(layer, snn.SupermaskLinear) else (rows, 3, 5, 5)
    x = torch.randn(*shape, generator=rng).bfloat16().requires_grad_(True)
    for mode in ("task", "superposition", "fused"):
        alpha = torch.tensor([0.25, 0.75], requires_grad=True)
        results = []
        for autocast in (True, False):
            opt = None
            if mode == "task":
                snn.set_task(layer, 1)
            elif mode == "fused":  # the in-backward optimiser updates the scores: compare one step's output and dx
                snn.begin_task(layer, generator=torch.Generator().manual_seed(3))
                opt = snn.InBackwardRMSprop(layer, lr=1e-3)
            ctx = snn.superposition(layer, alpha) if mode == "superposition" else contextlib.nullcontext()
            with ctx, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = layer(x if autocast else x.float())
            wrt = [x] + ([alpha] if mode == "superposition" else [])
            results.append((y, *torch.autograd.grad(y.square().sum(), wrt)))
            if opt is not None:
                opt.close()
        assert results[0][0].dtype == torch.float32
        for got, want in zip(*results):
            torch.testing.assert_close(got.float(), want.float())
    snn.begin_task(layer, generator=torch.Generator().manual_seed(4))  # the plain step
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert layer.scores.grad is not None and layer.scores.grad.dtype == torch.float32


def test_a_float64_layer_trains_float64_scores(rng):
    layer = snn.SupermaskConv2d(2, 3, 3, dtype=torch.float64)
    snn.begin_task(layer, generator=torch.Generator().manual_seed(0))
    assert layer.scores.dtype == torch.float64
    x = torch.randn(2, 2, 5, 5, generator=rng, dtype=torch.float64)
    layer(x).square().sum().backward()
    scores = layer.scores.detach().clone().requires_grad_(True)
    w = layer.weight * (scores >= 0) + layer.weight * (scores - scores.detach())
    F.conv2d(x, w).square().sum().backward()
    torch.testing.assert_close(layer.scores.grad, scores.grad, rtol=1e-12, atol=1e-12)
    snn.finish_task(layer)
    assert layer.scores_from_bits(0).dtype == torch.float64
    assert snn.SupermaskLinear(3, 2, dtype=torch.bfloat16).initial_scores().dtype == torch.float32


def test_a_copy_or_pickle_of_a_grown_bank_holds_its_rows_only():
    """Tasks appended one at a time double the storage when full; the spare rows are address space
    (uninitialised, never read), and a deepcopy or a pickle holds the k rows alone."""
    layer = trained(snn.SupermaskLinear(40, 9), tasks=5)
    assert layer.bank.storage.shape[0] == 8 and layer.bank.count == 5
    for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert copied.bank.storage.shape[0] == 5
        assert torch.equal(copied.bank.words, layer.bank.words)
        trained(copied, tasks=1, seed=7)  # and grows again
        assert copied.bank.count == 6 and torch.equal(copied.bank.words[:5], layer.bank.words)


@pytest.mark.parametrize("make", [lambda: snn.SupermaskLinear(40, 9),
                                  lambda: snn.SupermaskConv2d(3, 5, 3, padding=1)])
def test_weights_without_a_seed_follow_torchs_generator_as_nn_linear(make):
    # seed=None and no generator: drawn from torch's default generator, so torch.manual_seed fixes
    # the weights and two layers built alike differ (as two nn.Linear do).
    torch.manual_seed(7)
    a, b = make(), make()
    torch.manual_seed(7)
    again = make()
    torch.manual_seed(8)
    other = make()
    assert not torch.equal(a.weight, b.weight)
    assert torch.equal(a.weight, again.weight) and not torch.equal(a.weight, other.weight)
    assert torch.equal(type(a)(*_args(a), seed=3).weight, type(a)(*_args(a), seed=3).weight)  # a seed still fixes them


def _args(layer):
    if isinstance(layer, snn.SupermaskLinear):
        return layer.in_features, layer.out_features
    return layer.in_channels, layer.out_channels, layer.kernel_size


def test_integer_dtypes_are_refused_as_nn_linear_does():
    with pytest.raises(TypeError, match="dtype must be a floating-point dtype, got torch.int64"):
        snn.SupermaskLinear(4, 3, dtype=torch.int64)


@pytest.mark.parametrize("init", ["signed_constant", "kaiming_normal"])
def test_load_state_dict_with_assign_into_a_meta_model(rng, init):
    # Built on meta, then load_state_dict(assign=True): the bank's rows are the state dict's tensors,
    # as the weight is, and the outputs are the source model's.
    source = trained(snn.SupermaskLinear(70, 9, init=init, seed=1))
    with torch.device("meta"):
        target = snn.SupermaskLinear(70, 9, init=init, seed=1)
    state = source.state_dict()
    target.load_state_dict(state, assign=True)
    assert target.weight.device.type == "cpu" and target.bank.words.device.type == "cpu"
    assert target.bank.words.data_ptr() == state["bank.rows"].data_ptr()
    x = torch.randn(64, 70, generator=rng)
    for t in range(2):
        snn.set_task(source, t)
        snn.set_task(target, t)
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
        torch.testing.assert_close(target(x[:4]), source(x[:4]), rtol=0, atol=0)


def test_signed_masked_linear_refuses_a_meta_operand_beside_real_ones(rng):
    layer = trained(snn.SupermaskLinear(70, 9, seed=1))
    sign_words, scale, _ = layer._sign_bits()
    words = layer.bank.words[0]
    x = torch.randn(4, 70, generator=rng)
    for kw in (dict(mask_words=words.to("meta")), dict(sign_words=sign_words.to("meta"))):
        args = {**dict(sign_words=sign_words, mask_words=words), **kw}
        with pytest.raises(ValueError, match="all tensors must be on one device"):
            ss.ops.signed_masked_linear(x, args["sign_words"], args["mask_words"], scale)
        with pytest.raises(ValueError, match="all tensors must be on one device"):
            ss.ops.signed_masked_linear(x.requires_grad_(), args["sign_words"], args["mask_words"], scale)
        x = x.detach()


def test_bank_rows_with_padding_bits_set_are_refused_by_load_state_dict():
    layer = trained(snn.SupermaskLinear(70, 9, seed=1))  # 70 weights a row: bits 70..95 are padding
    state = layer.state_dict()
    state["bank.rows"] = state["bank.rows"].clone()
    state["bank.rows"][1, 2, -1] |= 1 << 10
    fresh = snn.SupermaskLinear(70, 9, seed=1)
    with pytest.raises(RuntimeError, match="bank.rows: bits set past bit 70"):
        fresh.load_state_dict(state)
    assert fresh.num_tasks == 0


def test_begin_task_refuses_init_scores_that_name_no_layer():
    model = nn.Sequential(snn.SupermaskLinear(6, 5, seed=1), nn.ReLU(), snn.SupermaskLinear(5, 3, seed=2))
    wanted = torch.full((5, 6), 0.25)
    with pytest.raises(ValueError, match=r"names no supermask layer of the model: \['0.scores'\]; its layers are \['0', '2'\]"):
        snn.begin_task(model, init_scores={"0.scores": wanted})
    assert all(m.scores is None for m in snn.supermask_layers(model).values())
    with pytest.raises(TypeError, match="a tensor only for a model that is one supermask layer"):
        snn.begin_task(model, init_scores=wanted)
    snn.begin_task(model, init_scores={"0": wanted})  # a layer left out starts from random scores
    assert torch.equal(model[0].scores.detach(), wanted) and model[2].scores is not None
    layer = snn.SupermaskLinear(6, 5, seed=1)
    snn.begin_task(layer, init_scores=wanted)
    assert torch.equal(layer.scores.detach(), wanted)


@pytest.mark.parametrize("kwargs,message", [
    (dict(kernel_size=0), "kernel_size must be positive"),
    (dict(groups=0), "groups must be a positive int, got 0"),
    (dict(in_channels=0), "in_channels must be a positive int, got 0"),
    (dict(out_channels=0), "out_channels must be a positive int, got 0"),
    (dict(stride=0), r"stride must be positive, got \(0, 0\)"),
    (dict(dilation=(1, 0)), r"dilation must be positive, got \(1, 0\)"),
])
def test_conv_constructor_refuses_sizes_nn_conv2d_refuses(kwargs, message):
    args = {**dict(in_channels=4, out_channels=6, kernel_size=3), **kwargs}
    with pytest.raises(ValueError, match=message):
        snn.SupermaskConv2d(**args)


def test_convert_warns_of_hooks_and_tied_weights_it_cannot_keep():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    net[0].register_forward_hook(lambda *args: None)
    with pytest.warns(UserWarning, match="1 layer\\(s\\) that have hooks registered.*: 0"):
        ss.convert(net)
    tied = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    tied[2].weight = tied[0].weight
    with pytest.warns(UserWarning, match="unties weights shared between layers.*: 0, 2"):
        ss.convert(tied, weights="signed_constant")
    shared = nn.Linear(4, 4)  # one module at two names stays one module: nothing to warn of
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        converted = ss.convert(nn.Sequential(shared, nn.ReLU(), shared))
    assert converted[0] is converted[2]


def test_a_mid_task_state_dict_loaded_before_begin_task_says_what_to_do():
    layer = trained(snn.SupermaskLinear(12, 5, seed=1), tasks=1)
    snn.begin_task(layer)
    state = layer.state_dict()
    fresh = trained(snn.SupermaskLinear(12, 5, seed=1), tasks=1)
    hint = r"scores: the state dict was saved while a task was being trained; call snn.begin_task"
    with pytest.warns(UserWarning, match=hint), pytest.raises(RuntimeError, match="Unexpected key.*scores"):
        fresh.load_state_dict(state)
    with pytest.warns(UserWarning, match=hint):  # not strict: the same hint, and torch's list of what it left
        assert fresh.load_state_dict(state, strict=False).unexpected_keys == ["scores"]
    snn.begin_task(fresh)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.scores, layer.scores)


@pytest.mark.parametrize("name", ["lenet", "gemresnet18"])
def test_a_model_built_on_meta_is_materialised_by_to_empty_and_reset_parameters(name):
    # The draws stay on the CPU inside a torch.device block (a shared generator advances as on the
    # CPU), and reset_parameters repeats each layer's draw bit for bit.
    from supsup_fast.models import build_model
    cpu = build_model(name, 10, seed=4)
    with torch.device("meta"):
        meta = build_model(name, 10, seed=4)
    assert all(l.weight.is_meta and l.bank.words.is_meta for l in snn.supermask_layers(meta).values())
    meta.to_empty(device="cpu")
    for module in meta.modules():
        if isinstance(module, snn.SupermaskLinear | snn.SupermaskConv2d):
            module.reset_parameters()
    for (n, a), (_, b) in zip(snn.supermask_layers(cpu).items(), snn.supermask_layers(meta).items()):
        assert torch.equal(a.weight, b.weight), n
    with torch.device("meta"):
        layer = snn.SupermaskLinear(20, 7, bias=True, init="kaiming_normal", seed=5)
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    twin = snn.SupermaskLinear(20, 7, bias=True, init="kaiming_normal", seed=5)
    assert torch.equal(layer.weight, twin.weight) and torch.equal(layer.bias, twin.bias)
    given = snn.SupermaskLinear(20, 7, init=torch.ones(7, 20))
    with pytest.raises(RuntimeError, match="given as a tensor"):
        given.reset_parameters()


def test_conv_takes_numpy_ints_as_nn_conv2d_does():
    import numpy as np
    net = nn.Sequential(nn.Conv2d(np.int64(3), np.int64(6), np.int64(3), groups=np.int64(3)))
    converted = ss.convert(net)
    assert (converted[0].in_channels, converted[0].out_channels, converted[0].groups) == (3, 6, 3)
    assert type(converted[0].in_channels) is int
    with pytest.raises(ValueError, match="in_channels must be a positive int, got 2.5"):
        snn.SupermaskConv2d(2.5, 4, 3)


def test_a_layer_without_a_seed_builds_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        layer = snn.SupermaskLinear(8, 4)
    assert tuple(layer.weight.shape) == (4, 8)


def test_reset_parameters_repeats_the_draw_after_a_dtype_change():
    layer = snn.SupermaskLinear(30, 7, bias=True, init="kaiming_normal", seed=3)
    drawn = layer.weight.clone(), layer.bias.clone()
    layer.double()
    layer.weight.zero_()
    layer.reset_parameters()
    assert layer.weight.dtype == torch.float64
    assert torch.equal(layer.weight, drawn[0].double()) and torch.equal(layer.bias, drawn[1].double())
