"""The op contract on every backend this machine has: each public op of ``supsup_fast.ops`` run under
each (backend, device) pair against the reference backend, on fresh random inputs with odd sizes
(1 and 33 bits: one word and a partial word; 784 and 1000: many words with and without a ragged
end) and garbage pad bits. Integer results (bits, counts) are compared exactly, float results to
fp32 summation-order tolerance. Backend-specific paths (ISA levels, batch-size regimes, tiles)
stay in the backend's own test file."""
import pytest
import torch
import torch.nn.functional as F

import supsup_fast as ss
from tests.devices import backend_devices, ids

PAIRS = backend_devices()
SIZES = [1, 33, 784, 1000]
TOL = dict(rtol=1e-4, atol=1e-4)


def on(pair, fn, *args):
    """``fn(*args)`` under the backend of ``pair`` (inputs moved to its device) and under the
    reference on the CPU; returns both, on the CPU."""
    name, dev = pair
    moved = [a.to(dev) if isinstance(a, torch.Tensor) else a for a in args]
    with ss.use_backend(name):
        got = fn(*moved)
    with ss.use_backend("reference"):
        ref = fn(*args)
    cpu = lambda t: tuple(x.cpu() for x in t) if isinstance(t, tuple) else t.cpu()
    return cpu(got), ref


def with_garbage_pad(words: torch.Tensor, n: int) -> torch.Tensor:
    """The same mask with every pad bit of the last word set: the ops must ignore them."""
    if n % 32:
        words = words.clone()
        words[..., -1] |= ~((1 << (n % 32)) - 1)
    return words


@pytest.fixture(params=PAIRS, ids=ids(PAIRS))
def pair(request):
    return request.param


@pytest.mark.parametrize("n", SIZES)
def test_pack_and_unpack_are_exact(pair, n):
    mask = torch.rand(3, 5, n) > 0.5
    got, ref = on(pair, ss.pack_bits, mask)
    assert torch.equal(got, ref)
    got, _ = on(pair, ss.unpack_bits, with_garbage_pad(ref, n), n)
    assert torch.equal(got, mask)


@pytest.mark.parametrize("n", SIZES)
def test_superpose_and_mask_dot(pair, n):
    k = 7
    bank = with_garbage_pad(ss.pack_bits(torch.rand(k, 3, n) > 0.5), n)
    counts, ref_counts = on(pair, ss.ops.superpose, bank, torch.ones(k), n)
    assert torch.equal(counts, ref_counts)  # integer counts: exact
    got, ref = on(pair, ss.ops.superpose, bank, torch.rand(k), n)
    torch.testing.assert_close(got, ref, **TOL)
    got, ref = on(pair, ss.ops.mask_dot, bank, torch.randn(3, n))
    torch.testing.assert_close(got, ref, **TOL)
    got, ref = on(pair, ss.ops.mask_dot, bank, torch.randint(-3, 4, (3, n)).float())
    assert torch.equal(got, ref)  # integer v: exact
    got, ref = on(pair, ss.ops.mask_dot_batched, bank, torch.randn(5, 3, n))
    torch.testing.assert_close(got, ref, **TOL)


@pytest.mark.parametrize("n", [33, 784])
@pytest.mark.parametrize("k,q", [(3, 2), (7, 1), (7, 37)])
def test_mask_dot_outer(pair, n, k, q):
    """The α-gradients of q one-image queries through one layer, v never materialised: equal to
    mask_dot_batched of the materialised products (exactly for integer g, x, w), garbage pad bits
    ignored, more queries than one block of 32."""
    R = 5
    bank = with_garbage_pad(ss.pack_bits(torch.rand(k, R, n) > 0.5), n)
    g, x, w = torch.randn(q, R), torch.randn(q, n), torch.randn(R, n)
    got, ref = on(pair, ss.ops.mask_dot_outer, bank, g, x, w)
    torch.testing.assert_close(got, ref, **TOL)
    torch.testing.assert_close(ref, ss.ops.mask_dot_batched(bank, g[:, :, None] * x[:, None, :] * w), **TOL)
    gi, xi, wi = (torch.randint(-3, 4, t.shape).float() for t in (g, x, w))
    got, ref = on(pair, ss.ops.mask_dot_outer, bank, gi, xi, wi)
    assert torch.equal(got, ref)
    # given the bank's task-interleaved copy (read by the cpu backend, ignored by the others): the same
    gi[:, 1] = 0  # a dead row, skipped whole in that layout
    with_copy = lambda b, *a: ss.ops.mask_dot_outer(b, *a, ss.ops.interleave_tasks(b))
    got, ref = on(pair, with_copy, bank, gi, xi, wi)
    assert torch.equal(got, ref)
    assert torch.equal(ref, ss.ops.mask_dot_outer(bank, gi, xi, wi))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("batch", [1, 17, 130])
def test_masked_linear_forward_and_backward(pair, n, batch):
    out = 9
    words = with_garbage_pad(ss.pack_bits(torch.rand(out, n) > 0.5), n)
    w, b = torch.randn(out, n), torch.randn(out)

    def fwd_bwd(x, w, words, b):
        x = x.detach().requires_grad_(True)
        y = ss.ops.masked_linear(x, w, words, b)
        (gx,) = torch.autograd.grad((y * torch.arange(out, dtype=y.dtype, device=y.device)).sum(), x)
        return y, gx

    (y, gx), (y_ref, gx_ref) = on(pair, fwd_bwd, torch.randn(batch, n), w, words, b)
    torch.testing.assert_close(y, y_ref, **TOL)
    torch.testing.assert_close(gx, gx_ref, **TOL)


@pytest.mark.parametrize("n", [33, 784])
def test_signed_masked_linear(pair, n):
    out = 11
    # (set pad bits are refused here by design: they mean words built for more features than x has)
    sign, mask = ss.pack_bits(torch.rand(out, n) > 0.5), ss.pack_bits(torch.rand(out, n) > 0.5)
    got, ref = on(pair, lambda x, s, m: ss.ops.signed_masked_linear(x, s, m, 0.25, in_features=n),
                  torch.randn(3, n), sign, mask)
    torch.testing.assert_close(got, ref, **TOL)


@pytest.mark.parametrize("n", [33, 784])
def test_superposed_linear_alpha_gradient(pair, n):
    k, out = 6, 10
    bank = ss.pack_bits(torch.rand(k, out, n) > 0.5)
    w = torch.randn(out, n)

    def alpha_grad(x, w, bank, alpha):
        alpha, x = alpha.detach().requires_grad_(True), x.detach().requires_grad_(True)
        y = ss.ops.superposed_linear(x, w, bank, alpha)
        ga, gx = torch.autograd.grad(-(F.softmax(y, -1) * F.log_softmax(y, -1)).sum(), (alpha, x))
        return y, ga, gx

    got, ref = on(pair, alpha_grad, torch.randn(2, n), w, bank, torch.rand(k))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **TOL)


def test_masked_and_superposed_conv2d(pair):
    k, out, cin = 3, 5, 4
    bank = ss.pack_bits(torch.rand(k, out, cin * 9) > 0.5)
    w = torch.randn(out, cin, 3, 3)
    got, ref = on(pair, lambda x, w, m: ss.ops.masked_conv2d(x, w, m, None, stride=2, padding=1), torch.randn(2, cin, 9, 9), w, bank[0])
    torch.testing.assert_close(got, ref, **TOL)

    def alpha_grad(x, w, bank, alpha, with_x):
        alpha, x = alpha.detach().requires_grad_(True), x.detach().requires_grad_(with_x)
        y = ss.ops.superposed_conv2d(x, w, bank, alpha, padding=1)
        grads = torch.autograd.grad(y.square().sum(), (alpha, x) if with_x else (alpha,))
        return (y, *grads)

    for with_x in (False, True):  # with x: S is computed once and kept for the backward
        got, ref = on(pair, lambda *a: alpha_grad(*a, with_x), torch.randn(2, cin, 7, 7), w, bank, torch.rand(k))
        torch.testing.assert_close(got[0], ref[0], **TOL)
        for a, b in zip(got[1:], ref[1:]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


def test_threshold_masked_weight(pair):
    scores, w = torch.randn(7, 45), torch.randn(7, 45)
    got, ref = on(pair, ss.ops.threshold_masked_weight, scores, w)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("shape,wd", [((7, 45), 0.0), ((3, 5, 3, 3), 1e-3), ((1, 1), 0.0)])
def test_ste_rmsprop_step(pair, shape, wd):
    scores, dw, w, sq = torch.randn(shape), torch.randn(shape), torch.randn(shape), torch.rand(shape)

    def step(scores, dw, w, sq):
        scores, sq, out = scores.clone(), sq.clone(), torch.full_like(w, float("nan"))
        ss.ops.ste_rmsprop_step_(scores, dw, w, sq, out, 1e-2, 0.9, 1e-8, wd)
        return scores, sq, out

    (s1, q1, o1), (s0, q0, o0) = on(pair, step, scores, dw, w, sq)
    torch.testing.assert_close(s1, s0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(q1, q0, rtol=1e-5, atol=1e-7)
    assert torch.equal(o1, w * (s1 >= 0))  # the masked weight follows the backend's own new scores exactly
    assert torch.equal(o0, w * (s0 >= 0))


@pytest.mark.parametrize("shape,wd,step", [((7, 45), 0.0, 1), ((3, 5, 3, 3), 1e-3, 4), ((1, 1), 0.0, 100)])
@pytest.mark.parametrize("betas,m_scale", [((0.8, 0.95), 0.1), ((0.0, 0.9), 100.0), ((0.3, 0.999), 100.0)])
def test_ste_adam_step(pair, shape, wd, step, betas, m_scale):
    """beta1 <= 0.5 with |g| << |m|: torch's lerp takes m from g's side there (no cancellation)."""
    scores, dw, w = torch.randn(shape), torch.randn(shape), torch.randn(shape)
    m, v = m_scale * torch.randn(shape), torch.rand(shape)

    def adam(scores, dw, w, m, v):
        scores, m, v, out = scores.clone(), m.clone(), v.clone(), torch.full_like(w, float("nan"))
        ss.ops.ste_adam_step_(scores, dw, w, m, v, out, step, 1e-2, betas, 1e-8, wd)
        return scores, m, v, out

    got, ref = on(pair, adam, scores, dw, w, m, v)
    for a, b in zip(got[:3], ref[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert torch.equal(got[3], w * (got[0] >= 0)) and torch.equal(ref[3], w * (ref[0] >= 0))


@pytest.mark.parametrize("sizes", [(13, 11, 5, 3), (37, 1), (784, 300, 100, 10)])
def test_mlp_cross_entropy_grads_equal_autograd(pair, sizes):
    gen = torch.Generator().manual_seed(sum(sizes))
    x = torch.randn(9, sizes[0], generator=gen)
    y = torch.randint(0, sizes[-1], (9,), generator=gen)
    weights = [torch.randn(o, i, generator=gen) / i ** 0.5 for i, o in zip(sizes[:-1], sizes[1:])]
    def loss_and_grads(x, y, *weights):
        loss, grads = ss.ops.mlp_cross_entropy_grads(x, y, weights)
        return (loss, *grads)

    got, ref = on(pair, loss_and_grads, x, y, *weights)
    leaves = [w.clone().requires_grad_() for w in weights]
    h = x
    for i, w in enumerate(leaves):
        h = F.linear(h, w)
        if i + 1 < len(leaves):
            h = F.relu(h)
    expect = F.cross_entropy(h, y)
    expect = (expect.detach(), *torch.autograd.grad(expect, leaves))
    for result in (got, ref):
        assert len(result) == len(expect)
        for a, e in zip(result, expect):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)


def test_mlp_cross_entropy_grads_refuses_bad_arguments():
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match=r"weights\[1\] must be \[out, 5\]"):
        ss.ops.mlp_cross_entropy_grads(x, y, [torch.randn(5, 6), torch.randn(3, 4)])
    with pytest.raises(ValueError, match="y must be an int64 vector of 4 labels"):
        ss.ops.mlp_cross_entropy_grads(x, y[:3], [torch.randn(3, 6)])
    with pytest.raises(ValueError, match="at least one layer"):
        ss.ops.mlp_cross_entropy_grads(x, y, [])
    with pytest.raises(ValueError, match=r"y must hold class indices in \[0, 2\)"):
        ss.ops.mlp_cross_entropy_grads(x, y, [torch.randn(2, 6)])
    with pytest.raises(ValueError, match=r"x must be \[batch, features\] with batch >= 1, got shape \(0, 6\)"):
        ss.ops.mlp_cross_entropy_grads(x[:0], y[:0], [torch.randn(3, 6)])


def test_ste_rmsprop_step_refuses_bad_arguments():
    w = torch.randn(4, 6)
    good = dict(scores=torch.randn(4, 6), weight_grad=torch.randn(4, 6), weight=w, square_avg=torch.zeros(4, 6),
                masked_weight=torch.empty(4, 6), lr=1e-3)
    with pytest.raises(ValueError, match="square_avg must have the weight's shape"):
        ss.ops.ste_rmsprop_step_(**dict(good, square_avg=torch.zeros(4, 5)))
    with pytest.raises(ValueError, match="scores must be a floating-point tensor"):
        ss.ops.ste_rmsprop_step_(**dict(good, scores=torch.zeros(4, 6, dtype=torch.int32)))
    for bad in (dict(lr=-1.0), dict(lr=float("nan")), dict(eps=float("nan")), dict(weight_decay=float("nan"))):
        with pytest.raises(ValueError, match="lr >= 0"):
            ss.ops.ste_rmsprop_step_(**dict(good, **bad))
    adam = dict(scores=good["scores"], weight_grad=good["weight_grad"], weight=w, exp_avg=torch.zeros(4, 6),
                exp_avg_sq=torch.zeros(4, 6), masked_weight=torch.empty(4, 6), step=1, lr=1e-3)
    with pytest.raises(ValueError, match="exp_avg_sq must have the weight's shape"):
        ss.ops.ste_adam_step_(**dict(adam, exp_avg_sq=torch.zeros(6, 4)))
    with pytest.raises(ValueError, match="step must be >= 1"):
        ss.ops.ste_adam_step_(**dict(adam, step=0))
    with pytest.raises(ValueError, match="betas < 1"):
        ss.ops.ste_adam_step_(**dict(adam, betas=(0.9, 1.0)))
    with pytest.raises(ValueError, match="lr >= 0"):
        ss.ops.ste_adam_step_(**dict(adam, lr=float("nan")))


def test_every_backend_of_this_machine_is_covered():
    # The contract is only as good as its list of backends: on a CPU machine with the C++ kernels
    # and Triton's interpreter, all three CPU-capable backends must be in it.
    names = {n for n, d in PAIRS if d.type == "cpu"}
    assert "reference" in names
    assert "cpu" in ss.backends.available() and "cpu" in names
    try:
        import triton  # noqa: F401
    except ImportError:
        return
    if not torch.cuda.is_available():
        assert "triton" in names
