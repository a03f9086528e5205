import pytest
import torch
import torch.nn.functional as F
from torch import nn

import supsup_fast as ss
import supsup_fast.nn as snn
from supsup_fast.algorithms import (TrainSettings, alpha_gradient, entropy, infer_binary, infer_oneshot, superfluous,
                                    train_task)
from supsup_fast.data import PermutedMNIST, load_embedded
from supsup_fast.data.tasks import TaskSplit
from supsup_fast.models import build_model

from tests.ops.isa_runner import needs_compiler


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    tasks = PermutedMNIST(load_embedded(), 4, seed=1)
    model = build_model("lenet", 100, seed=1)
    settings = TrainSettings(iters=150, batch_size=128, lr=1e-3)
    for t in range(4):
        split = tasks.train(t)
        train_task(model, TaskSplit(split.x[:3000], split.y[:3000], split.transform), settings,
                   device=torch.device("cpu"), generator=torch.Generator().manual_seed(t))
    return model, tasks


def float_stack_alpha_grad(model, x, objective, num_labels):
    """The official algorithm: float masks, (α[:,None] * stack).sum(0) under autograd."""
    k = snn.num_tasks(model)
    alpha = torch.full((k,), 1.0 / k, requires_grad=True)
    h = x
    layers = list(snn.supermask_layers(model).values())
    for i, layer in enumerate(layers):
        stack = torch.stack([ss.unpack_bits(layer.bank.words[t], layer.n).float().view_as(layer.weight)
                             for t in range(k)])
        w = layer.weight * (alpha.view(-1, 1, 1) * stack).sum(0)
        h = F.linear(h, w)
        if i < len(layers) - 1:
            h = F.relu(h)
    obj = objective(h, num_labels)
    return torch.autograd.grad(obj, alpha)[0]


@pytest.mark.parametrize("images", [3, 1])  # one image: the MLP path over the interleaved copies on the cpu backend
@pytest.mark.parametrize("objective,fn", [("entropy", entropy), ("superfluous", superfluous)])
def test_alpha_gradient_equals_float_stack(trained, objective, fn, images):
    model, tasks = trained
    x, _ = tasks.test(2).batch(torch.arange(images))
    got = alpha_gradient(model, x, objective, 10)
    expect = float_stack_alpha_grad(model, x, fn, 10)
    assert torch.allclose(got, expect, rtol=1e-3, atol=1e-6)
    assert int(got.argmin()) == int(expect.argmin())


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_task_inference_inside_no_grad_or_inference_mode(trained, context):
    # Evaluation code runs under no_grad / inference_mode; the α-gradient of a query of several images
    # (and every binary round) took autograd there and failed with a raw "does not require grad".
    model, tasks = trained
    x, _ = tasks.test(2).batch(torch.arange(3))
    want = alpha_gradient(model, x, "entropy", 10)
    from supsup_fast.algorithms.inference import alpha_gradients_batched
    custom = ss.convert(nn.Sequential(nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10)), weights="signed_constant")
    for _ in range(3):
        snn.begin_task(custom)
        snn.finish_task(custom)
    want_batched = alpha_gradients_batched(custom, x)  # not the package's MLP: autograd through the layers
    with context():
        xc = x.clone()  # under inference_mode: an inference tensor
        got = alpha_gradient(model, xc, "entropy", 10)
        oneshot, binary = infer_oneshot(model, xc, "entropy", 10), infer_binary(model, xc, "entropy", 10)
        got_batched = alpha_gradients_batched(custom, xc)
    assert torch.equal(got, want) and torch.equal(got_batched, want_batched)
    assert (oneshot, binary) == (infer_oneshot(model, x, "entropy", 10), infer_binary(model, x, "entropy", 10))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mlp_task_inference_under_autocast_is_the_fp32_one(trained, dtype):
    # One image through the package's MLP takes the fused C++ path, whose linear autocast made bf16
    # ("expected scalar type Float"): it runs in the weights' dtype, as the superposed layers do.
    from supsup_fast.algorithms.inference import alpha_gradients_batched
    model, tasks = trained
    x, _ = tasks.test(1).batch(torch.arange(4))
    want_one, want_batched = alpha_gradient(model, x[:1], "entropy", 10), alpha_gradients_batched(model, x)
    with torch.autocast("cpu", dtype=dtype):
        assert torch.equal(alpha_gradient(model, x[:1], "entropy", 10), want_one)
        assert torch.equal(alpha_gradients_batched(model, x), want_batched)


def test_oneshot_and_binary_find_the_task(trained):
    model, tasks = trained
    hits_one = hits_bin = total = 0
    for t in range(4):
        for s in range(0, 640, 128):
            x, _ = tasks.test(t).batch(torch.arange(s, s + 128))
            hits_one += infer_oneshot(model, x[:1], "entropy", 10) == t
            hits_bin += infer_binary(model, x, "entropy", 10) == t
            total += 1
    assert hits_one / total >= 0.9
    assert hits_bin / total >= 0.9


def test_superfluous_objective_only_flows_through_extra_neurons():
    logits = torch.randn(2, 12, requires_grad=True)
    superfluous(logits, 10).backward()
    assert torch.all(logits.grad[:, :10] == 0) and torch.all(logits.grad[:, 10:] != 0)
    logits = torch.randn(2, 12, requires_grad=True)
    h = entropy(logits, 10)
    p = logits.softmax(1)
    assert torch.allclose(h, -(p * p.log()).sum(1).mean())


def test_binary_log_base_and_errors(trained):
    model, tasks = trained
    x, _ = tasks.test(1).batch(torch.arange(128))
    assert infer_binary(model, x, "entropy", 10, log_base=4) == 1
    with pytest.raises(ValueError, match="log_base"):
        infer_binary(model, x, log_base=1)


@pytest.mark.parametrize("name", ["entropy", "superfluous"])
def test_logit_gradients_are_the_objectives_gradients(name):
    """The closed forms of the MLP task-inference path equal autograd through the objectives: row j
    is the gradient of example j's own objective."""
    from supsup_fast.algorithms.objectives import get_objective, logit_gradients
    logits = (torch.randn(7, 30, dtype=torch.float64) * 3).requires_grad_(True)
    (expect,) = torch.autograd.grad(get_objective(name)(logits, 10) * 7, logits)
    torch.testing.assert_close(logit_gradients(name, logits.detach(), 10), expect)
    with pytest.raises(ValueError, match="objective must be one of"):
        logit_gradients("cross_entropy", logits.detach(), 10)


def test_task_inference_shortcut_is_taken_only_for_the_plain_mlp():
    """The MLP shortcut (no module called) is for this package's MLP as built with nothing hooked in.
    A forward hook that changes a layer's output, a layer replaced by another module, or an MLP of
    another class (tanh) go the general way, and the cpu backend's one-image α-gradient still equals
    the reference backend's; batched queries of the tanh MLP equal one query each."""
    from supsup_fast.algorithms.inference import alpha_gradients_batched
    from supsup_fast.bench import random_model_with_masks

    def check_one_image(model):
        x = torch.randn(1, 784)
        with ss.use_backend("reference"):
            expect = alpha_gradient(model, x, "entropy", 10)
        with ss.use_backend("cpu"):
            got = alpha_gradient(model, x, "entropy", 10)
        torch.testing.assert_close(got, expect, rtol=1e-3, atol=1e-6)
        return got

    model = random_model_with_masks("lenet", 20, 9, seed=4)
    plain = check_one_image(model)
    handle = model.layers[1].register_forward_hook(lambda m, i, o: o * 2)
    try:
        torch.manual_seed(0)
        hooked = check_one_image(model)
    finally:
        handle.remove()
    torch.manual_seed(0)
    assert not torch.allclose(hooked, check_one_image(model), rtol=1e-3, atol=1e-6)  # the hook was honoured
    replaced = random_model_with_masks("lenet", 20, 9, seed=4)
    replaced.layers[2] = torch.nn.Linear(100, 20)
    check_one_image(replaced)

    class TanhMLP(torch.nn.Module):
        def __init__(self, layers):
            super().__init__()
            self.layers = layers

        def forward(self, x):
            for i, layer in enumerate(self.layers):
                x = layer(x)
                x = torch.tanh(x) if i < len(self.layers) - 1 else x
            return x

    custom = TanhMLP(model.layers)
    check_one_image(custom)
    xs = torch.randn(3, 784)
    got = alpha_gradients_batched(custom, xs, "entropy", 10)
    with ss.use_backend("reference"):
        for j in range(3):
            torch.testing.assert_close(got[j], alpha_gradient(custom, xs[j:j + 1], "entropy", 10), rtol=1e-3, atol=1e-6)
    assert plain.shape == (9,)


def test_batched_queries_refuse_another_dtype_like_the_layers():
    from supsup_fast.algorithms.inference import alpha_gradients_batched
    from supsup_fast.bench import random_model_with_masks
    model = random_model_with_masks("lenet", 20, 5, seed=1)
    for backend in ("cpu", "reference"):
        with ss.use_backend(backend), pytest.raises(TypeError, match="x dtype torch.float64 must match weight dtype"):
            alpha_gradients_batched(model, torch.randn(2, 784, dtype=torch.float64))
        with ss.use_backend(backend), pytest.raises(TypeError, match="x dtype torch.float64 must match weight dtype"):
            alpha_gradient(model, torch.randn(1, 784, dtype=torch.float64), "entropy", 10)


@needs_compiler
def test_each_layer_is_read_through_the_copy_that_reads_less(monkeypatch):
    """On the cpu backend task inference reads each layer through the copy with fewer words for the
    query: the logits layer (every logit has a gradient, about half its inputs are 0) through the
    copy of the transposed masks; a first layer fed mostly-zero inputs (raw pixels, not normalised)
    through it too, dense inputs through the plain copy. Every result equals the reference backend's."""
    from supsup_fast.algorithms.inference import alpha_gradients_batched
    from supsup_fast.bench import random_model_with_masks
    model = random_model_with_masks("lenet", 200, 37, seed=6)
    torch.manual_seed(6)
    dense = torch.randn(1, 784)
    sparse = dense * (torch.rand(1, 784) < 0.2)
    kept = lambda i: tuple(c is not None for c in model.layers[i].bank.kept_interleaved())
    from supsup_fast.ops.backends.cpu import CpuBackend
    fused, ran = CpuBackend.mlp_mask_dot_outer, []
    monkeypatch.setattr(CpuBackend, "mlp_mask_dot_outer", lambda self, *a: ran.append(fused(self, *a)) or ran[-1])
    for x, first_layer in ((dense, (True, False)), (sparse, (True, True))):
        with ss.use_backend("reference"):
            expect = alpha_gradient(model, x, "entropy", 10)
        with ss.use_backend("cpu"):
            got = alpha_gradient(model, x, "entropy", 10)
            batched = alpha_gradients_batched(model, torch.cat([dense, sparse, x]), "entropy", 10)
            one_by_one = alpha_gradients_batched(model, torch.cat([dense, sparse, x]), "entropy", 10, max_chunk_bytes=1)
        torch.testing.assert_close(one_by_one, batched)  # queries in chunks of one (threads split them otherwise)
        torch.testing.assert_close(got, expect, rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(batched[2], expect, rtol=1e-3, atol=1e-6)
        assert kept(0) == first_layer and kept(2) == (False, True)
    assert len(ran) == 10 and all(r is not None for r in ran)  # the backward was one C++ call each time
    # a blank image reads nothing: no second copy is built for it
    with ss.use_backend("cpu"):
        alpha_gradient(model, torch.zeros(1, 784), "entropy", 10)
    assert kept(0) == (True, True) and kept(1) == (True, False) and kept(2) == (False, True)


def test_a_second_copy_is_built_only_where_it_reads_at_most_three_quarters():
    from supsup_fast.algorithms.inference import _read_transposed
    w = torch.empty(64, 320)  # a row: 10 words; a column: 2 words
    copy = torch.empty(0)
    assert _read_transposed((None, None), 10, 49, w)  # 100 words through the row copy, 98 through the other
    assert not _read_transposed((None, None), 10, 50, w)  # a tie keeps the row copy
    assert _read_transposed((copy, None), 10, 37, w) and not _read_transposed((copy, None), 10, 38, w)  # 74 / 76 of 100
    assert not _read_transposed((None, copy), 7, 50, w) and _read_transposed((None, copy), 8, 50, w)  # 70 / 80 of 100
    assert _read_transposed((copy, copy), 10, 49, w) and not _read_transposed((copy, copy), 10, 51, w)
    # a layer that adds nothing (no live output or no nonzero input) reads what is kept, the row copy if none
    assert not _read_transposed((None, None), 0, 50, w) and not _read_transposed((None, None), 10, 0, w)
    assert _read_transposed((None, copy), 10, 0, w) and not _read_transposed((copy, None), 0, 50, w)


def test_batched_queries_through_a_layer_called_twice_and_over_token_rows():
    """A query's weight gradient sums rank-one terms over a layer's calls in one forward (a weight-tied
    layer) and over the rows of a [q, T, in] input: the batched α-gradients equal one-image calls."""
    import supsup_fast as ss
    from supsup_fast.algorithms.inference import alpha_gradient, alpha_gradients_batched

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 10)

        def forward(self, x):
            return self.b(torch.relu(self.a(torch.relu(self.a(x)))))

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(12, 32), nn.Linear(32, 10)

        def forward(self, x):
            return self.b(torch.relu(self.a(x))).mean(1)

    torch.manual_seed(0)
    for net, xs in ((Tied(), torch.randn(6, 16)), (Tokens(), torch.randn(5, 7, 12))):
        model = ss.convert(net, weights="signed_constant")
        for t in range(3):
            snn.begin_task(model, generator=torch.Generator().manual_seed(t))
            snn.finish_task(model)
        batched = alpha_gradients_batched(model, xs)
        one_by_one = torch.stack([alpha_gradient(model, xs[j:j + 1], "entropy", 10) for j in range(xs.shape[0])])
        torch.testing.assert_close(batched, one_by_one, rtol=1e-4, atol=1e-7)


class _SequenceFirst(nn.Module):
    """A layer that sees [T, q, D] (sequence-first, as nn.LSTM's default layout) inside the model."""

    def __init__(self, d=16):
        super().__init__()
        self.tok, self.head = nn.Linear(d, d), nn.Linear(d, 10)

    def forward(self, x):  # x [q, T, D]
        return self.head(torch.relu(self.tok(x.transpose(0, 1))).mean(0))


def test_batched_inference_refuses_layers_that_do_not_keep_the_queries_first():
    # With T == q the shapes passed the batched pass's own test and tokens were taken for queries
    # (α-gradients off by 0.07); evaluate_task falls back to one query at a time.
    from supsup_fast.algorithms import EvalSettings, evaluate_task, evaluation
    from supsup_fast.algorithms.inference import QueryLayoutError, alpha_gradients_batched
    torch.manual_seed(0)
    model = ss.convert(_SequenceFirst(), weights="signed_constant")
    for _ in range(3):
        snn.begin_task(model)
        snn.finish_task(model)
    model.eval()
    with pytest.raises(QueryLayoutError, match=r"keep the 3 queries"):  # q = T - 1: the probe of q + 1 passes
        alpha_gradients_batched(model, torch.randn(3, 4, 16))
    xs = torch.randn(4, 4, 16)  # then q == T == 4: not taken for a shape already seen to keep the queries first
    with pytest.raises(QueryLayoutError, match=r"layer 'tok' saw \(4, 5, 16\) -> \(4, 5, 16\) for 5 queries"):
        alpha_gradients_batched(model, xs)
    split = TaskSplit(torch.randn(24, 4, 16), torch.randint(0, 10, (24,)))
    got = evaluate_task(model, split, 0, EvalSettings(batch_size=8), device=torch.device("cpu"), num_labels=10)
    order = split.batches(8, shuffle=True, generator=evaluation.test_order(split, 0, 0))  # evaluate_task's
    assert got.inferred_tasks == [infer_oneshot(model, xb[:1], "entropy", 10) for xb, _ in order]


def test_batched_inference_of_integer_inputs_equals_one_query_at_a_time():
    # Token ids cannot require a gradient: the batched pass made them, and failed.
    from supsup_fast.algorithms.inference import alpha_gradients_batched
    torch.manual_seed(0)
    model = ss.convert(nn.Sequential(nn.Embedding(50, 16), nn.Flatten(), nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, 10)),
                       weights="signed_constant")
    for _ in range(3):
        snn.begin_task(model)
        snn.finish_task(model)
    model.eval()
    xs = torch.randint(0, 50, (5, 8))
    want = torch.stack([alpha_gradient(model, xs[j:j + 1], "entropy", 10) for j in range(5)])
    torch.testing.assert_close(alpha_gradients_batched(model, xs), want, rtol=1e-5, atol=1e-6)
