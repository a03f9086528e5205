import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import supsup_fast as ss
import supsup_fast.nn as snn
from supsup_fast.bits import unpack_bits_torch
from supsup_fast.nn.masks import kept_count


def test_linear_is_drop_in_and_frozen():
    layer = snn.SupermaskLinear(784, 33)
    assert layer.weight.shape == (33, 784) and layer.bias is None
    assert list(layer.parameters()) == []  # weights are buffers: optimisers never touch them
    w = layer.weight
    assert torch.allclose(w.abs(), torch.full_like(w, math.sqrt(2 / 784)))
    snn.begin_task(layer)
    assert [p is layer.scores for p in layer.parameters()] == [True]
    bound = 1 / math.sqrt(784)
    assert layer.scores.abs().max() <= bound
    x = torch.randn(5, 784)
    y = layer(x)
    assert torch.allclose(y, F.linear(x, w * (layer.scores >= 0)))
    snn.finish_task(layer)
    assert layer.scores is None and list(layer.parameters()) == []


def test_weight_inits_and_given_tensor():
    a = snn.SupermaskLinear(10, 4, seed=3)
    b = snn.SupermaskLinear(10, 4, seed=3)
    assert torch.equal(a.weight, b.weight)
    kn = snn.SupermaskLinear(1000, 50, init="kaiming_normal", seed=1)
    assert abs(kn.weight.std().item() - math.sqrt(2 / 1000)) < 0.003
    given = torch.randn(4, 10)
    assert torch.equal(snn.SupermaskLinear(10, 4, init=given).weight, given)
    with pytest.raises(ValueError, match="weight tensor must have shape"):
        snn.SupermaskLinear(10, 4, init=torch.randn(3, 3))
    with pytest.raises(ValueError, match="weight init"):
        snn.SupermaskLinear(10, 4, init="xavier")
    with pytest.raises(ValueError, match="mask_fn"):
        snn.SupermaskLinear(10, 4, mask_fn="random")


def test_ste_gradient_threshold_and_topk():
    layer = snn.SupermaskLinear(20, 6)
    snn.begin_task(layer)
    x = torch.randn(3, 20)
    layer(x).sum().backward()
    g_eff = torch.ones(3, 6).t() @ x  # dL/dW_eff
    assert torch.allclose(layer.scores.grad, g_eff * layer.weight, atol=1e-6)
    top = snn.SupermaskLinear(20, 6, mask_fn="topk", density=0.3)
    snn.begin_task(top)
    top(x).sum().backward()
    assert torch.allclose(top.scores.grad, g_eff * top.weight * top.scores.sign(), atol=1e-6)


@pytest.mark.parametrize("density", [0.01, 0.3, 0.5, 1.0])
def test_topk_exact_count(density):
    s = torch.randn(37, 29)
    m = snn.topk_mask(s.abs(), density)
    assert int(m.sum()) == kept_count(s.numel(), density)
    kept = s.abs()[m]
    dropped = s.abs()[~m]
    if dropped.numel() and kept.numel():
        assert kept.min() >= dropped.max()


def test_er_density():
    assert snn.er_density(20, 3, 3, 3, 1.0) == min(0.5, 23 / (20 * 3 * 9))
    assert snn.er_density(1024, 1024, 1, 1, 4.0) == pytest.approx(4 * 2048 / 1024 ** 2)
    assert snn.er_density(2, 2, 1, 1, 10) == 0.5
    with pytest.raises(ValueError):
        snn.er_density(2, 2, 1, 1, 0)


def test_bank_grows_amortised_and_stores_bits_only():
    layer = snn.SupermaskLinear(100, 10)
    caps = []
    for t in range(9):
        snn.begin_task(layer)
        snn.finish_task(layer)
        caps.append(layer.bank.storage.shape[0])
    assert layer.num_tasks == 9
    assert caps == [1, 2, 4, 4, 8, 8, 8, 8, 16]
    assert layer.bank.words.dtype == torch.int32
    assert layer.bank.nbytes() == 9 * 10 * 4 * 4  # ceil(100/32)=4 words per row
    floats = [b for b in layer.buffers() if b.is_floating_point()]
    assert sum(b.numel() for b in floats) == layer.weight.numel()  # only the frozen weight
    for t in range(9):  # row(t): one task's words, a view of the storage; only learned tasks
        assert torch.equal(layer.bank.row(t), layer.bank.words[t]) and layer.bank.row(t)._base is layer.bank.storage
    for bad in (9, 15, -1):  # past the count, inside the capacity; negative
        with pytest.raises(IndexError):
            layer.bank.row(bad)


def test_one_task_forward_follows_every_change_of_the_bank():
    """The bank keeps the last row view it handed out (a one-task forward reads it on every call):
    the forward must see an overwritten row, a bank regrown by appends, truncation then a new
    task in the same row, and a move to another dtype's storage."""
    import copy
    import pickle
    layer = snn.SupermaskLinear(40, 6, init="kaiming_normal")
    x = torch.randn(2, 40)
    masks = [torch.rand(6, 40) > 0.5 for _ in range(3)]
    expect = lambda m: F.linear(x, layer.weight * m)
    layer.append_packed(ss.pack_bits(masks[0]).unsqueeze(0))
    layer.set_mode_task(0)
    with torch.no_grad():
        assert torch.allclose(layer(x), expect(masks[0]), atol=1e-6)
        kept = layer.bank.storage
        layer.append_packed(ss.pack_bits(masks[1]).unsqueeze(0))  # regrows the storage
        assert layer.bank.storage is not kept and layer.bank._kept_row is None
        assert torch.allclose(layer(x), expect(masks[0]), atol=1e-6)
        layer.bank.set_row(0, ss.pack_bits(masks[2]))  # written in place
        assert torch.allclose(layer(x), expect(masks[2]), atol=1e-6)
        layer.set_mode_task(1)
        assert torch.allclose(layer(x), expect(masks[1]), atol=1e-6)
        layer.truncate_tasks(1)
        with pytest.raises(RuntimeError, match="task 1 has no mask yet"):
            layer(x)
        layer.append_packed(ss.pack_bits(masks[0]).unsqueeze(0))  # row 1 again, another mask
        assert torch.allclose(layer(x), expect(masks[0]), atol=1e-6)
        for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            assert twin.bank._kept_row is None and torch.equal(twin(x), layer(x))
        layer.double()  # a new weight; the words stay int32 (the same tensor), the kept view dropped all the same
        assert layer.bank._kept_row is None
        assert torch.allclose(layer(x.double()), F.linear(x.double(), layer.weight * masks[0]), atol=1e-12)


def test_modes_task_and_superposition_match_ops():
    layer = snn.SupermaskLinear(50, 7)
    masks = []
    for t in range(4):
        snn.begin_task(layer)
        masks.append(layer.current_mask())
        snn.finish_task(layer)
    x = torch.randn(3, 50)
    for t in range(4):
        snn.set_task(layer, t)
        assert torch.allclose(layer(x), F.linear(x, layer.weight * masks[t]), atol=1e-6)
    alpha = torch.full((4,), 0.25, requires_grad=True)
    with snn.superposition(layer, alpha, uniform=True):
        y_cached = layer(x)
    alpha2 = torch.full((4,), 0.25, requires_grad=True)
    with snn.superposition(layer, alpha2):
        y_plain = layer(x)
    assert torch.allclose(y_cached, y_plain, atol=1e-6)
    g1, = torch.autograd.grad(y_cached.square().sum(), alpha)
    g2, = torch.autograd.grad(y_plain.square().sum(), alpha2)
    assert torch.allclose(g1, g2, atol=1e-5)
    # counts cache = number of masks covering each weight, updated incrementally
    assert torch.equal(layer.counts(), torch.stack(masks).sum(0).float())
    snn.begin_task(layer)
    m5 = layer.current_mask()
    snn.finish_task(layer)
    assert torch.equal(layer.counts(), torch.stack(masks + [m5]).sum(0).float())
    active = torch.tensor([1, 3])
    a = torch.tensor([0.5, 0.5])
    with snn.superposition(layer, a, active=active):
        y = layer(x)
    assert torch.allclose(y, F.linear(x, layer.weight * (masks[1].float() + masks[3].float()) / 2), atol=1e-6)


def test_mode_errors():
    layer = snn.SupermaskLinear(8, 3)
    with pytest.raises(RuntimeError, match="begin_task"):
        snn.set_train_mode(layer)
    with pytest.raises(ValueError, match="task must be in"):
        snn.set_task(layer, 0)
    with pytest.raises(ValueError, match="alpha must have shape"):
        snn.set_superposition(layer, torch.ones(2))


def test_conv_layer_modes():
    conv = snn.SupermaskConv2d(4, 6, 3, stride=2, padding=1, groups=2)
    assert conv.weight.shape == (6, 2, 3, 3)
    snn.begin_task(conv)
    m = conv.current_mask()
    snn.finish_task(conv)
    x = torch.randn(2, 4, 9, 9)
    snn.set_task(conv, 0)
    assert torch.allclose(conv(x), F.conv2d(x, conv.weight * m, None, 2, 1, 1, 2), atol=1e-6)


def test_multitask_batchnorm_keeps_per_task_stats():
    bn = snn.MultitaskBatchNorm(3)
    bn.train()
    data = [torch.randn(64, 3) * (t + 1) + 5 * t for t in range(2)]
    for t in range(2):
        bn.begin_task()
        for _ in range(50):
            bn(data[t])
        bn.finish_task()
    assert bn.num_tasks == 2
    bn.eval()
    for t in range(2):
        bn.set_mode_task(t)
        out = bn(data[t])
        assert out.mean().abs() < 0.3 and (out.std() - 1).abs() < 0.3  # own stats normalise own data
    bn.set_mode_task(0)
    assert bn(data[1]).mean() > 2  # task 0's stats do not normalise task 1's data


def test_active_counts_shrink_incrementally_and_match_sums():
    layer = snn.SupermaskLinear(40, 6)
    masks = []
    for _ in range(9):
        snn.begin_task(layer)
        masks.append(layer.current_mask().float())
        snn.finish_task(layer)
    stack = torch.stack(masks)
    for active in ([0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 2, 4, 6, 8], [2, 6], [6], [1, 3]):  # the last is not a subset
        idx = torch.tensor(active)
        assert torch.equal(layer.active_counts(idx), stack[idx].sum(0))
    x = torch.randn(2, 40)
    idx = torch.tensor([1, 5, 7])
    a1 = torch.full((3,), 1 / 3, requires_grad=True)
    a2 = torch.full((3,), 1 / 3, requires_grad=True)
    with snn.superposition(layer, a1, active=idx, uniform=True):
        y1 = layer(x)
    with snn.superposition(layer, a2, active=idx):
        y2 = layer(x)
    assert torch.allclose(y1, y2, atol=1e-6)
    g1, = torch.autograd.grad(y1.square().sum(), a1)
    g2, = torch.autograd.grad(y2.square().sum(), a2)
    assert torch.allclose(g1, g2, atol=1e-5)


def test_transfer_initialises_scores_from_running_mean():
    model = torch.nn.Sequential(snn.SupermaskLinear(30, 8), torch.nn.ReLU(), snn.SupermaskLinear(8, 4))
    snn.enable_transfer(model)
    assert snn.transfer_init_scores(model) is None  # first task: the usual random init
    trained = []
    for t in range(3):
        snn.begin_task(model, init_scores=snn.transfer_init_scores(model), generator=torch.Generator().manual_seed(t))
        for layer in snn.supermask_layers(model).values():
            layer.scores.data += torch.randn_like(layer.scores) * 0.1  # "training"
        trained.append({n: l.scores.detach().clone() for n, l in snn.supermask_layers(model).items()})
        snn.finish_task(model)
    init = snn.transfer_init_scores(model)
    for name in init:
        expect = torch.stack([tr[name] for tr in trained]).mean(0)
        assert torch.allclose(init[name], expect, atol=1e-6)
    snn.begin_task(model, init_scores=init)
    for name, layer in snn.supermask_layers(model).items():
        assert torch.allclose(layer.scores, init[name]) and layer.scores.data_ptr() != init[name].data_ptr()
    plain = snn.SupermaskLinear(30, 8)
    snn.begin_task(plain)
    snn.finish_task(plain)
    assert plain.score_mean is None  # nothing float kept per layer unless Transfer is on


def test_uniform_weight_follows_the_bank():
    """uniform_weight() = W ⊙ Σᵢ Mᵢ / k, rebuilt when a task is added or a mask rewritten."""
    from supsup_fast.nn import SupermaskLinear
    torch.manual_seed(0)
    layer = SupermaskLinear(20, 6, seed=1)
    masks = [torch.rand(6, 20) > 0.5 for _ in range(3)]
    expect = lambda ms: layer.weight * torch.stack(ms).float().mean(0)
    for m in masks[:2]:
        layer.append_packed(ss.pack_bits(m)[None])
    first = layer.uniform_weight()
    torch.testing.assert_close(first, expect(masks[:2]))
    assert layer.uniform_weight() is first
    layer.append_packed(ss.pack_bits(masks[2])[None])
    torch.testing.assert_close(layer.uniform_weight(), expect(masks))
    layer.begin_task()
    layer.commit_mask(0)
    masks[0] = layer.current_mask().reshape(6, 20)
    torch.testing.assert_close(layer.uniform_weight(), expect(masks))
    layer.weight.mul_(-2)  # an in-place change of the frozen weight
    torch.testing.assert_close(layer.uniform_weight(), expect(masks))


def test_caches_built_under_inference_mode_serve_later_calls():
    """Counts, s = counts / k, the sign bits, the kept copies and a grown bank built inside
    torch.inference_mode() are normal tensors: afterwards the layer still trains a task (counts
    updated in place), runs a uniform α-gradient (s saved for backward) and evaluates."""
    from supsup_fast.algorithms.inference import alpha_gradients_batched
    from supsup_fast.models import build_model
    torch.manual_seed(0)
    layer = snn.SupermaskLinear(20, 5)
    for _ in range(2):
        snn.begin_task(layer)
        snn.finish_task(layer)
    x = torch.randn(1, 20)
    with torch.inference_mode():
        with snn.superposition(layer, torch.full((2,), 0.5), uniform=True):
            layer(x)
        snn.set_task(layer, 0)
        layer(x)
        snn.begin_task(layer)
        snn.finish_task(layer)  # the bank grows (and its counts) inside inference mode
    snn.begin_task(layer)
    snn.finish_task(layer)
    alpha = torch.full((4,), 0.25, requires_grad=True)
    with snn.superposition(layer, alpha, uniform=True):
        y = layer(x)
    (g,) = torch.autograd.grad(y.sum(), alpha)
    masks = unpack_bits_torch(layer.bank.words, 20).float()
    expect = torch.stack([(x @ (layer.weight * m).t()).sum() for m in masks])
    torch.testing.assert_close(g, expect, rtol=1e-5, atol=1e-5)
    model = build_model("lenet", 10)
    for _ in range(3):
        snn.begin_task(model)
        snn.finish_task(model)
    xs = torch.randn(4, 784)
    with torch.inference_mode():
        inside = alpha_gradients_batched(model, xs)
    torch.testing.assert_close(alpha_gradients_batched(model, xs), inside)


def test_active_must_be_distinct_task_indices():
    layer = snn.SupermaskLinear(8, 3)
    for _ in range(3):
        snn.begin_task(layer)
        snn.finish_task(layer)
    third = torch.full((3,), 1 / 3)
    for active, error, message in ((torch.tensor([0, 0, 1]), ValueError, r"distinct task indices, got \[0, 0, 1\]"),
                                   (torch.tensor([0, 3]), ValueError, r"task indices in \[0, 3\), got values in \[0, 3\]"),
                                   (torch.tensor([[0, 1]]), ValueError, "active must be 1-D"),
                                   (torch.tensor([0.0, 1.0]), TypeError, "int64 or int32 tensor of task indices"),
                                   ([0, 1], TypeError, "int64 or int32 tensor of task indices")):
        with pytest.raises(error, match=message):
            with snn.superposition(layer, third[: len(active)], active=active, uniform=True):
                pass
    x = torch.randn(1, 8)
    masks = unpack_bits_torch(layer.bank.words, 8).float()
    for active in ([0, 1, 2], [2, 0], [1]):  # shrinking and reordered subsets, cached counts in between
        a = torch.full((len(active),), 1 / len(active))
        with snn.superposition(layer, a, active=torch.tensor(active), uniform=True):
            y = layer(x)
        torch.testing.assert_close(y, F.linear(x, layer.weight * masks[active].mean(0)), rtol=1e-5, atol=1e-6)


def test_state_dict_carries_the_masks_and_per_task_statistics():
    """model.state_dict() holds each bank's k rows and each per-task BN's statistics (not the spare
    capacity); a fresh model loads them and gives the same outputs in every mode; rows of another
    shape, or a state dict without them, are refused by load_state_dict."""
    import io

    def make():
        torch.manual_seed(0)
        return ss.convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                                        nn.Linear(8 * 6 * 6, 10)), weights="signed_constant")
    model, x = make(), torch.randn(4, 3, 8, 8)
    for _ in range(3):
        snn.begin_task(model)
        model(x).sum().backward()
        snn.finish_task(model)
    sd = model.state_dict()
    assert sd["0.bank.rows"].shape == (3, 8, 1) and sd["4.bank.rows"].shape == (3, 10, 9) and sd["1.means.rows"].shape == (3, 8)
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    fresh = make()
    fresh.load_state_dict(torch.load(buf))
    assert snn.num_tasks(fresh) == 3
    for fn in (lambda m: snn.set_task(m, 2), lambda m: snn.set_task(m, 0)):
        fn(model), fn(fresh)
        with torch.no_grad():
            assert torch.equal(fresh(x), model(x))
    alpha = torch.full((3,), 1 / 3)
    with snn.superposition(model, alpha, uniform=True), snn.superposition(fresh, alpha, uniform=True):
        torch.testing.assert_close(fresh(x), model(x))
    with pytest.raises(RuntimeError, match=r"4.bank.rows must be torch.int32\[k, 10, 9\], got torch.int32\[3, 10, 8\]"):
        make().load_state_dict(dict(sd, **{"4.bank.rows": sd["4.bank.rows"][..., :8]}))
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "0.bank.rows"'):
        make().load_state_dict({k: v for k, v in sd.items() if not k.endswith(".rows")})


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_topk_and_per_task_batchnorm_train_in_the_models_dtype(dtype):
    torch.manual_seed(0)
    model = ss.convert(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)),
                       mask_fn="topk").to(dtype)
    x = torch.randn(4, 3, 8, 8, dtype=dtype)
    for _ in range(2):
        snn.begin_task(model)
        model.train()
        model(x).sum().backward()
        snn.finish_task(model)
    model.eval()
    snn.set_task(model, 1)
    with torch.no_grad():
        assert model(x).dtype == dtype and snn.num_tasks(model) == 2


def test_clear_errors_for_models_without_tasks_and_one_image_through_batchnorm1d():
    from supsup_fast.algorithms import infer_task
    from supsup_fast.runs.maskfile import save_model
    with pytest.raises(ValueError, match="has no supermask layer .* nothing in it holds tasks"):
        snn.num_tasks(nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(ValueError, match=r"model has no .spec .* torch.save\(model.state_dict\(\)\)"):
        save_model(ss.convert(nn.Sequential(nn.Linear(3, 2))), "/tmp/never.safetensors")
    torch.manual_seed(0)
    model = ss.convert(nn.Sequential(nn.Linear(20, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10)))
    for _ in range(2):
        snn.begin_task(model)
        model(torch.randn(8, 20)).sum().backward()
        snn.finish_task(model)
    model.eval()
    with pytest.raises(ValueError, match=r"holds one value per channel: infer the task from 2 or more images"):
        infer_task(model, torch.randn(1, 20))
    assert infer_task(model, torch.randn(2, 20)) in (0, 1)


def test_state_dict_rows_convert_dtype_and_compat_pickles_keep_their_layout():
    import copy
    import pickle

    from supsup_fast.compat import MultitaskMaskLinear, cache_masks, set_model_task
    torch.manual_seed(0)
    src = ss.convert(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))).double()
    snn.begin_task(src)
    src(torch.randn(4, 6, dtype=torch.float64)).sum().backward()
    snn.finish_task(src)
    dst = ss.convert(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)))
    bank = dst[0].bank
    snn.begin_task(dst)
    snn.finish_task(dst)
    kept = bank.interleaved()
    dst.load_state_dict(src.state_dict())  # float64 statistics into a float32 model, as torch converts buffers
    assert dst[1][0].means.rows.dtype == torch.float32 and torch.equal(dst[0].bank.words, src[0].bank.words)
    assert bank.kept_interleaved()[0] is None and bank.interleaved() is not kept  # the loaded rows' copy, not the old one
    layer = MultitaskMaskLinear(6, 4, num_tasks=2, bias=False)
    set_model_task(layer, 0, verbose=False)
    cache_masks(layer)
    del layer.bank.__dict__["persist_rows"]  # as pickled before the bank saved its rows
    for back in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):
        assert "mask_bits" in back.state_dict() and not any(k.endswith(".rows") for k in back.state_dict())


def test_unbatched_conv_input_trains_with_the_in_backward_optimiser():
    """One [C, H, W] image takes the step of the batch of one, the fused in-backward RMSprop included."""
    torch.manual_seed(0)
    x = torch.randn(3, 7, 7)
    scores = []
    for xb in (x, x.unsqueeze(0)):
        conv = snn.SupermaskConv2d(3, 4, 3, padding=1, seed=5)
        snn.begin_task(conv, generator=torch.Generator().manual_seed(1))
        opt = snn.InBackwardRMSprop(conv, lr=1e-2)
        conv(xb).sum().backward()
        opt.step()
        scores.append(conv.scores.detach())
    torch.testing.assert_close(scores[0], scores[1])
