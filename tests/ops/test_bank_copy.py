"""The task-interleaved copy of a bank (``bank_t = interleave_tasks(bank)``, which ``MaskBank.interleaved()``
keeps) passed to ``mask_dot`` and to ``superposed_linear``: the cpu backend reads it instead of the bank,
the others ignore it, and every result equals the one without it (exactly, on small integers, where
every partial sum is exact in fp32). A copy of the wrong shape, or of the right shape but not made from the bank, is refused by name."""
import pytest
import torch

import supsup_fast as ss
from supsup_fast import ops
from supsup_fast.nn.bank import MaskBank

from tests.devices import backend_devices

CASES = backend_devices()
SIZES = [(1, (3,), 1), (4, (7,), 40), (17, (5,), 33), (100, (2, 3), 100), (250, (64,), 784)]


def _ints(g, *shape):
    return torch.randint(-3, 4, shape, generator=g).float()


@pytest.mark.parametrize("name,device", CASES)
@pytest.mark.parametrize("k,lead,n", SIZES)
def test_mask_dot_with_the_copy_equals_mask_dot(name, device, k, lead, n):
    g = torch.Generator().manual_seed(k + n)
    bank = ss.pack_bits(torch.rand(k, *lead, n, generator=g) < 0.5).to(device)
    v = _ints(g, *lead, n).to(device)
    with ss.use_backend(name):
        expect = ops.mask_dot(bank, v)
        got = ops.mask_dot(bank, v, ops.interleave_tasks(bank))
    assert torch.equal(got, expect)


@pytest.mark.parametrize("name,device", CASES)
@pytest.mark.parametrize("k,R,n", [(4, 7, 40), (17, 33, 100), (250, 64, 784)])
@pytest.mark.parametrize("batch", [1, 3])
def test_superposed_linear_with_the_copy_equals_without(name, device, k, R, n, batch):
    """Output, α-gradient and input gradient; one image with x needing a gradient is the path that
    reads the copy on the cpu backend (rows of g = 0 included: a dead unit), three images ignore it."""
    g = torch.Generator().manual_seed(k * R + batch)
    bank = ss.pack_bits(torch.rand(k, R, n, generator=g) < 0.5).to(device)
    w, bias, x0 = _ints(g, R, n).to(device), _ints(g, R).to(device), _ints(g, batch, n).to(device)
    a0 = torch.randint(1, 4, (k,), generator=g).float().to(device)
    gout = _ints(g, batch, R).to(device)
    gout[:, 1] = 0
    results = []
    for copy in (None, ops.interleave_tasks(bank)):
        a, x = a0.clone().requires_grad_(), x0.clone().requires_grad_()
        with ss.use_backend(name):
            y = ops.superposed_linear(x, w, bank, a, bias, bank_t=copy)
        y.backward(gout)
        results.append((y.detach(), a.grad, x.grad))
    for got, expect in zip(*results):
        assert torch.equal(got, expect)


def test_a_copy_of_the_wrong_shape_is_refused():
    g = torch.Generator().manual_seed(0)
    bank = ss.pack_bits(torch.rand(20, 6, 70, generator=g) < 0.5)
    other = ops.interleave_tasks(bank[:16])  # [6, 3, 16], not [6, 3, 32]
    with pytest.raises(ValueError, match=r"bank_t must be interleave_tasks\(bank\)"):
        ops.mask_dot(bank, torch.ones(6, 70), other)
    with pytest.raises(ValueError, match=r"bank_t must be interleave_tasks\(bank\)"):
        ops.superposed_linear(torch.ones(1, 70), torch.ones(6, 70), bank, torch.ones(20), bank_t=other)
    with pytest.raises(TypeError, match="bank_t"):
        ops.mask_dot(bank, torch.ones(6, 70), ops.interleave_tasks(bank).float())


def test_mask_bank_copy_serves_mask_dot():
    """The copy a MaskBank keeps for task inference is the one these ops take."""
    g = torch.Generator().manual_seed(3)
    bank = MaskBank(8, 50)
    bank.append(ss.pack_bits(torch.rand(40, 8, 50, generator=g) < 0.5))
    v = _ints(g, 8, 50)
    assert torch.equal(ops.mask_dot(bank.words, v, bank.interleaved()), ops.mask_dot(bank.words, v))


@pytest.mark.parametrize("uniform", [False, True])
def test_linear_layer_reads_its_kept_copy_in_one_image_inference(uniform):
    """A SupermaskLinear in superposition, one image whose input needs a gradient: the layer builds its
    bank's copy and hands it to the op, and the α- and input gradients are those computed from the
    bank alone (keep_interleaved=False)."""
    from supsup_fast import nn as snn
    from supsup_fast.bench import random_model_with_masks
    model = random_model_with_masks("lenet", 50, 37, seed=5)
    layer = list(snn.supermask_layers(model).values())[1]  # 300 -> 100: its input is a hidden layer's
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(1, layer.weight.shape[1], generator=g)
    k = layer.num_tasks
    alpha0 = torch.full((k,), 1.0 / k) if uniform else torch.rand(k, generator=g)
    grads = []
    for keep in (True, False):
        layer.bank.keep_interleaved = keep
        a, x = alpha0.clone().requires_grad_(), x0.clone().requires_grad_()
        with snn.superposition(layer, a, uniform=uniform):
            y = layer(x)
        built = layer.bank.kept_interleaved()[0] is not None
        assert built == (keep and ss.ops.backend_for(x.device).reads_interleaved)
        grads.append(torch.autograd.grad(y.square().sum(), (a, x)))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-5)


def test_first_layer_reads_its_kept_copy_for_every_task_output():
    """The first layer of one-image task inference (input and weight need no gradient, α does): the
    layer builds its bank's task copy and every task's output (y = D α) is read from it, with the
    output and α-gradient of keep_interleaved=False."""
    from supsup_fast import nn as snn
    from supsup_fast.bench import random_model_with_masks
    model = random_model_with_masks("lenet", 50, 37, seed=6)
    layer = list(snn.supermask_layers(model).values())[0]
    x = torch.randn(1, layer.weight.shape[1], generator=torch.Generator().manual_seed(1))
    alpha0 = torch.rand(layer.num_tasks, generator=torch.Generator().manual_seed(2))
    results = []
    for keep in (True, False):
        layer.bank.keep_interleaved = keep
        a = alpha0.clone().requires_grad_()
        with snn.superposition(layer, a):
            y = layer(x)
        assert (layer.bank.kept_interleaved()[0] is not None) == (keep and ss.ops.backend_for(x.device).reads_interleaved)
        results.append((y.detach(), torch.autograd.grad(y.square().sum(), a)[0]))
    for got, expect in zip(*results):
        torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5 * float(expect.abs().max()))


@pytest.mark.parametrize("name,device", CASES)
def test_the_copy_is_what_a_reading_backend_reads(name, device, monkeypatch):
    """Given the copy of another bank of the same shape, a backend that reads copies (cpu) returns that
    bank's sums, and the others the given bank's: the equality tests above cannot tell a copy ignored.
    (With the ops' copy check off: it refuses such a copy, tested below.)"""
    monkeypatch.setattr(ss.ops.registry._instance(name), "interleaved_copy_matches", None)
    g = torch.Generator().manual_seed(9)
    bank, other = (ss.pack_bits(torch.rand(20, 6, 70, generator=g) < 0.5).to(device) for _ in range(2))
    v, w, x0, gout = (_ints(g, *shape).to(device) for shape in ((6, 70), (6, 70), (1, 70), (1, 6)))
    reads = ss.ops.registry._instance(name).reads_interleaved
    with ss.use_backend(name):
        got = ops.mask_dot(bank, v, ops.interleave_tasks(other))
        expect = ops.mask_dot(other if reads else bank, v)
        grads = []
        for b, copy in ((bank, ops.interleave_tasks(other)), (other if reads else bank, None)):
            a, x = torch.ones(20, device=device, requires_grad=True), x0.clone().requires_grad_()
            ops.superposed_linear(x, w, b, a, bank_t=copy).backward(gout)
            grads.append(a.grad)
    assert torch.equal(got, expect)
    assert torch.equal(grads[0], grads[1])
    assert reads == (name == "cpu")


# -- the weight-interleaved copy (bank_w = interleave_weights(bank, n)) read by superpose ------------
@pytest.mark.parametrize("name,device", CASES)
@pytest.mark.parametrize("k,lead,n", SIZES + [(33, (3,), 70)])
def test_superpose_with_the_weight_copy_equals_superpose(name, device, k, lead, n):
    """Output and α-gradient (superpose's backward is mask_dot, from the bank)."""
    g = torch.Generator().manual_seed(k * n + 1)
    bank = ss.pack_bits(torch.rand(k, *lead, n, generator=g) < 0.5).to(device)
    a0, gout = _ints(g, k).to(device), _ints(g, *lead, n).to(device)
    with ss.use_backend(name):
        copy = ops.interleave_weights(bank, n)
        assert copy.shape == (*lead, -k // 32 * -1, -n // 16 * -16) and copy.dtype == torch.int32
        results = []
        for bank_w in (None, copy):
            a = a0.clone().requires_grad_()
            s = ops.superpose(bank, a, n, bank_w)
            s.backward(gout)
            results.append((s.detach(), a.grad))
    for got, expect in zip(*results):
        assert torch.equal(got, expect)


@pytest.mark.parametrize("name,device", CASES)
@pytest.mark.parametrize("batch", [1, 3])
def test_superposed_linear_with_both_copies_equals_without(name, device, batch):
    g = torch.Generator().manual_seed(batch)
    k, R, n = 40, 33, 100
    bank = ss.pack_bits(torch.rand(k, R, n, generator=g) < 0.5).to(device)
    w, bias, x0 = _ints(g, R, n).to(device), _ints(g, R).to(device), _ints(g, batch, n).to(device)
    a0, gout = torch.randint(1, 4, (k,), generator=g).float().to(device), _ints(g, batch, R).to(device)
    results = []
    for copies in ({}, {"bank_t": ops.interleave_tasks(bank), "bank_w": ops.interleave_weights(bank, n)}):
        a, x = a0.clone().requires_grad_(), x0.clone().requires_grad_()
        with ss.use_backend(name):
            y = ops.superposed_linear(x, w, bank, a, bias, **copies)
        y.backward(gout)
        results.append((y.detach(), a.grad, x.grad))
    for got, expect in zip(*results):
        assert torch.equal(got, expect)


@pytest.mark.parametrize("name,device", CASES)
def test_the_weight_copy_is_what_a_reading_backend_reads(name, device, monkeypatch):
    """Given another bank's weight copy, the cpu backend returns that bank's S, the others the given
    bank's (with the ops' copy check off, as above)."""
    monkeypatch.setattr(ss.ops.registry._instance(name), "weight_copy_matches", None)
    g = torch.Generator().manual_seed(11)
    bank, other = (ss.pack_bits(torch.rand(40, 6, 70, generator=g) < 0.5).to(device) for _ in range(2))
    a = _ints(g, 40).to(device)
    reads = ss.ops.registry._instance(name).reads_interleaved
    with ss.use_backend(name):
        got = ops.superpose(bank, a, 70, ops.interleave_weights(other, 70))
        expect = ops.superpose(other if reads else bank, a, 70)
    assert torch.equal(got, expect)
    assert not torch.equal(ops.superpose(bank, a, 70), ops.superpose(other, a, 70))


@pytest.mark.parametrize("name,device", CASES)
def test_a_copy_that_is_not_the_banks_is_refused_where_copies_are_read(name, device):
    """A copy of the right shape made from another bank, from the bank before its last task was
    added (k = 33 and 40 round up alike) or before its last task changed: a backend that reads
    copies (cpu) refuses it by name in every op that takes one; the others read the bank alone and
    return its results."""
    g = torch.Generator().manual_seed(11)
    k, R, n = 40, 6, 70
    bank, other = (ss.pack_bits(torch.rand(k, R, n, generator=g) < 0.5).to(device) for _ in range(2))
    changed = bank.clone()
    changed[-1] = other[-1]
    a, v, x = _ints(g, k).to(device), _ints(g, R, n).to(device), _ints(g, 1, n).to(device)
    w, gq = _ints(g, R, n).to(device), _ints(g, 2, R).to(device)
    xq = _ints(g, 2, n).to(device)
    reads = ss.ops.registry._instance(name).reads_interleaved
    calls = {
        "bank_t": [lambda b, t: ops.mask_dot(b, v, t), lambda b, t: ops.bank_linear(x, w, b, t),
                   lambda b, t: ops.mask_dot_outer(b, gq, xq, w, t), lambda b, t: ops.superposed_linear(x, w, b, a, bank_t=t)],
        "bank_w": [lambda b, t: ops.superpose(b, a, n, t), lambda b, t: ops.superposed_linear(x, w, b, a, bank_w=t)],
    }
    copies = {"bank_t": ops.interleave_tasks, "bank_w": lambda b: ops.interleave_weights(b, n)}
    what = {"bank_t": r"bank_t is not interleave_tasks\(bank\)", "bank_w": r"bank_w is not interleave_weights\(bank, n=70\)"}
    with ss.use_backend(name):
        for kind, ops_taking_it in calls.items():
            for op in ops_taking_it:
                expect = op(bank, None)
                stales = [copies[kind](other), copies[kind](bank[:33]), copies[kind](changed)]
                for stale in stales + [_strided(c) for c in stales]:  # the same words through strides
                    if reads:
                        with pytest.raises(ValueError, match=what[kind]):
                            op(bank, stale)
                    else:
                        assert torch.equal(op(bank, stale), expect)
                assert torch.equal(op(bank, copies[kind](bank)), expect)  # its own copy: accepted, the same result
                assert torch.equal(op(bank, _strided(copies[kind](bank))), expect)


def _strided(t):
    """``t``'s values in a non-contiguous tensor (every other element of a wider one)."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def test_a_weight_copy_of_the_wrong_shape_is_refused():
    g = torch.Generator().manual_seed(0)
    bank = ss.pack_bits(torch.rand(40, 6, 70, generator=g) < 0.5)
    for other in (ops.interleave_weights(bank[:32], 70), ops.interleave_weights(bank[:, :5], 70)):
        with pytest.raises(ValueError, match=r"bank_w must be interleave_weights\(bank, n=70\)"):
            ops.superpose(bank, torch.ones(40), 70, other)
        with pytest.raises(ValueError, match=r"bank_w must be interleave_weights\(bank, n=70\)"):
            ops.superposed_linear(torch.ones(1, 70), torch.ones(6, 70), bank, torch.ones(40), bank_w=other)
    with pytest.raises(TypeError, match="bank_w"):
        ops.superpose(bank, torch.ones(40), 70, ops.interleave_weights(bank, 70).float())
    with pytest.raises(ValueError, match="n must be a positive int"):
        ops.interleave_weights(bank, 0)
    with pytest.raises(ValueError, match="words per row"):
        ops.interleave_weights(bank, 200)


@pytest.mark.parametrize("keep", [False, True])
def test_linear_layer_reads_its_kept_weight_copy_under_a_general_alpha(keep):
    """keep_interleaved_weights (off by default): the layer builds and keeps the weight copy for a general
    α with x needing a gradient, and output and gradients equal those from the bank alone."""
    from supsup_fast import nn as snn
    from supsup_fast.bench import random_model_with_masks
    model = random_model_with_masks("lenet", 50, 37, seed=5)
    layer = list(snn.supermask_layers(model).values())[1]
    assert layer.bank.keep_interleaved_weights is False
    g = torch.Generator().manual_seed(4)
    x0, alpha0 = torch.randn(3, layer.weight.shape[1], generator=g), torch.rand(layer.num_tasks, generator=g)
    results = []
    for use in (False, keep):
        layer.bank.keep_interleaved_weights = use
        a, x = alpha0.clone().requires_grad_(), x0.clone().requires_grad_()
        with snn.superposition(layer, a):
            y = layer(x)
        assert (layer.bank._interleaved[2] is not None) == (use and ss.ops.backend_for(x.device).reads_interleaved)
        results.append((y.detach(), *torch.autograd.grad(y.square().sum(), (a, x))))
    for got, expect in zip(*results):  # float sums in another order: equal to fp32 rounding of the largest terms
        torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5 * float(expect.abs().max()))
    layer.bank.keep_interleaved_weights = False
    assert layer.bank._interleaved[2] is None  # turning it off frees the copy
    if keep and ss.ops.backend_for(x0.device).reads_interleaved:
        layer.bank.keep_interleaved_weights = True
        built = layer.bank.interleaved_weights()
        assert torch.equal(built, ops.interleave_weights(layer.bank.words, layer.bank.n))
        assert layer.bank.interleaved_weights() is built  # kept while the bank is unchanged
        layer.bank.words[0, 0, 0] ^= 1
        assert layer.bank.interleaved_weights() is not built  # a write through the words view is seen


@pytest.mark.parametrize("name,device", CASES)
def test_superpose_with_the_weight_copy_in_float64(name, device):
    """A float64 α: the cpu backend's fallback (the reference's superpose_interleaved) from the copy
    gives the bank's sums exactly on small integers, as every other backend does."""
    g = torch.Generator().manual_seed(12)
    bank = ss.pack_bits(torch.rand(45, 4, 70, generator=g) < 0.5).to(device)
    a = torch.randint(-3, 4, (45,), generator=g).double().to(device)
    with ss.use_backend(name):
        got = ops.superpose(bank, a, 70, ops.interleave_weights(bank, 70))
        expect = ops.superpose(bank, a, 70)
    assert got.dtype == torch.float64 and torch.equal(got, expect)


@pytest.mark.parametrize("name,device", CASES)
def test_mlp_mask_dot_outer_refuses_copies_of_another_bank(name, device):
    """The MLP backward's copies, plain and of the transposed masks: another bank's is refused
    where it would be read (the transposed copy is read alone on every backend), the bank's own
    gives the same sums as the bank."""
    g = torch.Generator().manual_seed(5)
    k, R, n, q = 20, 6, 70, 2
    bank, other = (ss.pack_bits(torch.rand(k, R, n, generator=g) < 0.5).to(device) for _ in range(2))
    w, x, gq = _ints(g, R, n).to(device), _ints(g, q, n).to(device), _ints(g, q, R).to(device)
    wt = w.t().contiguous()
    reads = ss.ops.registry._instance(name).reads_interleaved
    with ss.use_backend(name):
        expect = ops.mask_dot_outer(bank, gq, x, w)
        own = ops.mlp_mask_dot_outer([bank], [ops.interleave_tasks(bank)], [False], [w], [w], [x], gq)
        own_t = ops.mlp_mask_dot_outer([bank], [ops.interleave_tasks(ops.transpose_masks(bank, n))], [True], [wt], [w], [x], gq)
        assert torch.equal(own, expect) and torch.equal(own_t, expect)
        if reads:
            with pytest.raises(ValueError, match=r"copies\[0\] is not interleave_tasks\(banks\[0\]\)"):
                ops.mlp_mask_dot_outer([bank], [ops.interleave_tasks(other)], [False], [w], [w], [x], gq)
        if torch.device(device).type == "cpu":  # the GPU backends do not rebuild the transposed copy to compare it
            with pytest.raises(ValueError, match=r"copies\[0\] is not interleave_tasks\(transpose_masks\(banks\[0\], n\)\)"):
                ops.mlp_mask_dot_outer([bank], [ops.interleave_tasks(ops.transpose_masks(other, n))], [True], [wt], [w], [x], gq)
