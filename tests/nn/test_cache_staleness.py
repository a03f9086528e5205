"""The layers' derived caches (sign bits of a signed-constant weight, Σᵢ Mᵢ for uniform α, a fused
step's masked weight, the uniform-α verdict) follow every change they can see: a new weight tensor
(even at a freed one's id and address), rows written through the bank's own methods or its words
view, a new superposition. Writes through ``.data`` keep the version counter: ``clear_caches``
rebuilds everything after them. Each result is compared with W ⊙ M formed here from the bits."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

import supsup_fast as ss
import supsup_fast.nn as snn
from supsup_fast.compat import MultitaskMaskLinear
from supsup_fast.models import build_model
from supsup_fast.ops.backends.reference import ReferenceBackend


def _learned(layer, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(k):
        snn.begin_task(layer, generator=g)
        snn.finish_task(layer)
    return layer


def _mask(layer, t):
    return ss.unpack_bits(layer.bank.words[t], layer.n).view_as(layer.weight).to(layer.weight.dtype)


def _uniform_reference(layer, x):
    k = layer.num_tasks
    s = sum(_mask(layer, t) for t in range(k)) / k
    return F.linear(x, layer.weight * s, layer.bias)


def test_a_new_signed_constant_weight_each_call_is_read_not_a_stale_sign_cache():
    """functional_call with a fresh ±c weight per call: a freed weight's id and address come back
    with version 0, which an id-keyed cache took for the old weight (89 of 100 calls wrong)."""
    torch.manual_seed(0)
    layer = _learned(snn.SupermaskLinear(64, 80), 1)
    snn.set_task(layer, 0)
    m, c, x = _mask(layer, 0), layer.weight.abs().max().item(), torch.randn(3, 64)
    for _ in range(40):
        w = torch.sign(torch.randn(80, 64)) * c
        torch.testing.assert_close(functional_call(layer, {"weight": w}, (x,)), F.linear(x, w * m))
        del w


@pytest.mark.parametrize("edit", ["set_row", "words", "append", "truncate", "bank_load_state_dict"])
def test_uniform_counts_follow_rows_changed_through_the_bank(edit):
    torch.manual_seed(1)
    layer, x = _learned(snn.SupermaskLinear(40, 24), 4), torch.randn(5, 40)
    bits = ss.pack_bits(torch.rand(24, 40) > 0.5)
    with torch.no_grad():
        with snn.superposition(layer, torch.full((4,), 0.25), uniform=True):
            layer(x)  # the counts are now kept
        if edit == "set_row":
            layer.bank.set_row(2, bits)
        elif edit == "words":
            layer.bank.words[2] = bits
        elif edit == "append":
            layer.bank.append(bits[None])
        elif edit == "truncate":
            layer.bank.truncate(3)
        else:
            other = _learned(snn.SupermaskLinear(40, 24), 4, seed=9)
            layer.bank.load_state_dict(other.bank.state_dict())
        k = layer.num_tasks
        with snn.superposition(layer, torch.full((k,), 1.0 / k), uniform=True):
            got = layer(x)
        torch.testing.assert_close(got, _uniform_reference(layer, x), rtol=1e-5, atol=1e-5)
        # an active subset's counts too
        active = torch.tensor([0, 2])
        with snn.superposition(layer, torch.full((2,), 0.5), active=active, uniform=True):
            got = layer(x)
        torch.testing.assert_close(got, F.linear(x, layer.weight * (_mask(layer, 0) + _mask(layer, 2)) / 2),
                                   rtol=1e-5, atol=1e-5)


def test_a_task_finished_after_the_counts_were_kept_is_counted_once():
    torch.manual_seed(2)
    layer, x = _learned(snn.SupermaskLinear(30, 20), 3), torch.randn(2, 30)
    with torch.no_grad():
        with snn.superposition(layer, torch.full((3,), 1 / 3), uniform=True):
            layer(x)
    kept = layer._counts
    _learned(layer, 2, seed=5)  # appended by commit_mask: the kept count is updated in place
    assert layer._counts is kept
    with torch.no_grad(), snn.superposition(layer, torch.full((5,), 0.2), uniform=True):
        torch.testing.assert_close(layer(x), _uniform_reference(layer, x), rtol=1e-5, atol=1e-5)


def test_clear_caches_after_writes_through_data():
    """Writes through .data keep the version counter, which the caches key on: after one,
    ss.nn.clear_caches(model) rebuilds what the layers derived (weights, bank rows)."""
    torch.manual_seed(3)
    model = _learned(build_model("lenet", 10, seed=1), 3)
    x = torch.randn(4, 784)
    snn.set_task(model, 1)
    with torch.no_grad():
        model(x)
        with snn.superposition(model, torch.full((3,), 1 / 3), uniform=True):
            model(x)
    for layer in model.layers:
        layer.weight.data.mul_(-1)
    model.layers[1].bank.storage.data[0] ^= 0x5555
    snn.clear_caches(model)

    def reference(masks):
        h = x
        for i, layer in enumerate(model.layers):
            h = F.linear(h, layer.weight * masks(layer))
            h = F.relu(h) if i < 2 else h
        return h
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(lambda layer: _mask(layer, 1)), rtol=1e-4, atol=1e-4)
        with snn.superposition(model, torch.full((3,), 1 / 3), uniform=True):
            got = model(x)
        torch.testing.assert_close(got, reference(lambda layer: sum(_mask(layer, t) for t in range(3)) / 3),
                                   rtol=1e-4, atol=1e-4)


def test_clear_caches_rebuilds_a_fused_steps_masked_weight():
    torch.manual_seed(4)
    model = build_model("lenet", 10, seed=0)
    snn.begin_task(model, generator=torch.Generator().manual_seed(3))
    opt = snn.InBackwardRMSprop(model, lr=1e-2)
    x, y = torch.randn(16, 784), torch.randint(0, 10, (16,))
    F.cross_entropy(model(x), y).backward()
    for layer in model.layers:
        layer.scores.data.neg_()
    snn.clear_caches(model)
    h = x
    for i, layer in enumerate(model.layers):
        h = F.linear(h, layer.weight * (layer.scores.detach() >= 0).float())
        h = F.relu(h) if i < 2 else h
    torch.testing.assert_close(model(x), h, rtol=1e-4, atol=1e-4)
    opt.close()


def test_a_reused_alpha_is_checked_again_by_a_new_uniform_superposition():
    layer = _learned(snn.SupermaskLinear(10, 6), 3)
    alpha = torch.full((3,), 1 / 3)
    with torch.no_grad(), snn.superposition(layer, alpha, uniform=True):
        layer(torch.randn(1, 10))
    alpha.data[0] = 0.9  # keeps alpha's version
    with pytest.raises(ValueError, match="uniform=True needs alpha = 1/k"):
        with snn.superposition(layer, alpha, uniform=True):
            pass


def test_a_float64_alpha_on_a_float32_layer_stays_on_the_cpu_kernels(monkeypatch):
    if ss.ops.backend_for(torch.device("cpu")).name != "cpu":
        pytest.skip("the cpu backend is not built here")
    torch.manual_seed(5)
    layer = _learned(snn.SupermaskLinear(50, 30), 6)
    x = torch.randn(1, 50, requires_grad=True)
    alpha = torch.rand(6, dtype=torch.float64, requires_grad=True)
    monkeypatch.setattr(ReferenceBackend, "superpose", lambda *a, **k: pytest.fail("fell back to the reference"))
    with snn.superposition(layer, alpha):
        y = layer(x)
    y.sum().backward()
    monkeypatch.undo()
    a = alpha.detach().float().requires_grad_(True)
    s = sum(a[t] * _mask(layer, t) for t in range(6))
    F.linear(x.detach(), layer.weight * s).sum().backward()
    torch.testing.assert_close(alpha.grad.float(), a.grad, rtol=1e-4, atol=1e-4)


def test_a_float64_models_alpha_gradients_are_float64_to_float64_accuracy():
    """One query and a batch of queries, against autograd through S = Σ αᵢ Mᵢ built in float64."""
    from supsup_fast.algorithms.inference import alpha_gradient, alpha_gradients_batched
    from supsup_fast.algorithms.objectives import get_objective
    model = _learned(build_model("lenet", 10, seed=1), 3).double()
    xs = torch.randn(3, 784, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def reference(x):
        alpha = torch.full((3,), 1 / 3, dtype=torch.float64, requires_grad=True)
        h = x
        for i, layer in enumerate(model.layers):
            h = F.linear(h, layer.weight * sum(alpha[t] * _mask(layer, t) for t in range(3)))
            h = F.relu(h) if i < 2 else h
        return torch.autograd.grad(get_objective("entropy")(h, 10), alpha)[0]
    want = torch.stack([reference(xs[j:j + 1]) for j in range(3)])
    one = alpha_gradient(model, xs[:1], "entropy", 10)
    assert one.dtype == torch.float64
    torch.testing.assert_close(one, want[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(alpha_gradients_batched(model, xs, "entropy", 10), want, rtol=1e-12, atol=1e-14)


def test_compat_layers_keep_nn_modules_state_dict_version():
    ours, theirs = MultitaskMaskLinear(4, 3, num_tasks=2), torch.nn.Linear(4, 3)
    assert ours.state_dict()._metadata[""]["version"] == theirs.state_dict()._metadata[""]["version"]


def test_a_compiled_uniform_superposition_sees_rows_written_through_the_bank():
    """Under torch.compile the count is computed from the bank (a trace cannot test its state), so a
    compiled forward agrees with eager after bank.set_row, as before it."""
    torch.manual_seed(6)
    layer, x = _learned(snn.SupermaskLinear(24, 10), 3), torch.randn(2, 24)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    alpha = torch.full((3,), 1 / 3)
    with torch.no_grad(), snn.superposition(layer, alpha, uniform=True):
        compiled(x)
        layer(x)  # eager keeps a count
        layer.bank.set_row(1, ss.pack_bits(torch.rand(10, 24) > 0.5))
        torch.testing.assert_close(compiled(x), _uniform_reference(layer, x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x), _uniform_reference(layer, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,k", [(torch.bfloat16, 300), (torch.float16, 2050)])
def test_counts_kept_under_a_half_precision_weight_count_past_its_integers(dtype, k):
    # Past 256 (bfloat16) / 2,048 (float16) one more task did not change a count kept in the weight's
    # dtype: a cache built early and updated by finish_task stuck there, and the uniform superposition drifted.
    torch.manual_seed(0)
    layer = snn.SupermaskLinear(8, 4, dtype=dtype)
    x = torch.randn(2, 8, dtype=dtype)
    for t in range(k):
        snn.begin_task(layer, init_scores=torch.ones(4, 8))  # every weight kept by every task
        snn.finish_task(layer)
        if t == 0:
            with snn.superposition(layer, torch.ones(1), uniform=True):
                layer(x)
    assert layer.counts().dtype == torch.float32 and float(layer.counts().max()) == k
    a = torch.full((k,), 1.0 / k)
    with snn.superposition(layer, a, uniform=True):
        y = layer(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y, F.linear(x, layer.weight), rtol=2e-2, atol=2e-2)  # S = 1 everywhere
    layer.float()
    layer.half()  # the module converts the kept count: it is counted again, not trusted
    assert layer.counts().dtype == torch.float32 and float(layer.counts().max()) == k
