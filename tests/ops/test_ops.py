import re

import pytest
import torch
import torch.nn.functional as F

import supsup_fast as ss


def rand_bank(k, out, n, p=0.5):
    masks = torch.rand(k, out, n) < p
    return masks, ss.pack_bits(masks)


def float_stack_superpose(masks, alpha):
    return (alpha.view(-1, *[1] * (masks.dim() - 1)) * masks.to(alpha.dtype)).sum(0)


@pytest.mark.parametrize("n", [1, 33, 784, 1000])
def test_masked_linear_matches_dense(n):
    out = 7
    mask = torch.rand(out, n) > 0.5
    w, x, b = torch.randn(out, n), torch.randn(3, 2, n), torch.randn(out)
    got = ss.ops.masked_linear(x, w, ss.pack_bits(mask), b)
    assert torch.allclose(got, F.linear(x, w * mask, b), atol=1e-5, rtol=1e-5)


def test_identities_exact():
    n, out = 70, 5
    w, x = torch.randn(out, n, dtype=torch.float64), torch.randn(4, n, dtype=torch.float64)
    ones = ss.pack_bits(torch.ones(out, n, dtype=torch.bool))
    assert torch.equal(ss.ops.masked_linear(x, w, ones), F.linear(x, w))
    masks, bank = rand_bank(3, out, n)
    # one-hot alpha = the single mask
    for t in range(3):
        a = torch.zeros(3, dtype=torch.float64)
        a[t] = 1
        assert torch.equal(ss.ops.superposed_linear(x, w, bank, a), ss.ops.masked_linear(x, w, bank[t]))
    # M + not M = dense
    comp = ss.pack_bits(~masks[0])
    both = torch.stack([bank[0], comp])
    assert torch.equal(ss.ops.superpose(both, torch.ones(2, dtype=torch.float64), n), torch.ones(out, n, dtype=torch.float64))
    assert torch.allclose(ss.ops.masked_linear(x, w, bank[0]) + ss.ops.masked_linear(x, w, comp), F.linear(x, w))


@pytest.mark.parametrize("n", [1, 33, 784])
def test_superpose_and_mask_dot_match_float_stack(n):
    masks, bank = rand_bank(6, 5, n)
    alpha = torch.rand(6, dtype=torch.float64)
    assert torch.allclose(ss.ops.superpose(bank, alpha, n), float_stack_superpose(masks, alpha))
    v = torch.randn(5, n, dtype=torch.float64)
    expect = (masks.double() * v).sum((1, 2))
    assert torch.allclose(ss.ops.mask_dot(bank, v), expect)


def test_superpose_lead_dims_and_counts_exact():
    masks, bank = rand_bank(9, 2, 3 * 33)
    bank4 = bank.view(9, 2, -1)
    counts = ss.ops.superpose(bank4, torch.ones(9), 99)
    assert torch.equal(counts, masks.sum(0).float())


def test_alpha_gradient_equals_float_stack():
    k, out, n = 5, 6, 50
    masks, bank = rand_bank(k, out, n)
    w, x = torch.randn(out, n, dtype=torch.float64), torch.randn(3, n, dtype=torch.float64)
    a1 = torch.full((k,), 1 / k, dtype=torch.float64, requires_grad=True)
    ss.ops.superposed_linear(x, w, bank, a1).pow(2).sum().backward()
    a2 = a1.detach().clone().requires_grad_()
    F.linear(x, w * float_stack_superpose(masks, a2)).pow(2).sum().backward()
    assert torch.allclose(a1.grad, a2.grad)


def _conv_inputs(dtype=torch.float64):
    x = torch.randn(2, 4, 7, 6, dtype=dtype)
    w = torch.randn(6, 2, 3, 3, dtype=dtype)  # groups=2
    return x, w


def test_conv_ops_match_dense():
    x, w = _conv_inputs()
    masks, bank = rand_bank(3, 6, 2 * 9)
    kw = dict(stride=2, padding=1, dilation=1, groups=2)
    got = ss.ops.masked_conv2d(x, w, bank[1], None, **kw)
    assert torch.allclose(got, F.conv2d(x, w * masks[1].view_as(w), None, **kw))
    a = torch.rand(3, dtype=torch.float64)
    got = ss.ops.superposed_conv2d(x, w, bank, a, None, **kw)
    s = float_stack_superpose(masks, a).view_as(w)
    assert torch.allclose(got, F.conv2d(x, w * s, None, **kw))


def test_masked_conv2d_inference_runs_the_op_body_with_the_same_result_and_errors():
    """Without a gradient to record, masked_conv2d runs the op's body directly (one-pass argument
    check, then the backend) instead of the custom-op dispatcher: the same result as through the op,
    and a wrong argument still gets its named error."""
    x, w = _conv_inputs(torch.float32)
    masks, bank = rand_bank(3, 6, 2 * 9)
    kw = dict(stride=2, padding=1, dilation=1, groups=2)
    with torch.no_grad():
        eager = ss.ops.masked_conv2d(x, w, bank[1], None, **kw)
    via_op = ss.ops.masked_conv2d(x.clone().requires_grad_(), w, bank[1], None, **kw)
    assert via_op.grad_fn is not None and torch.equal(eager, via_op.detach())
    assert torch.allclose(eager, F.conv2d(x, w * masks[1].view_as(w).float(), None, **kw), atol=1e-5)
    with torch.no_grad():
        with pytest.raises(ValueError, match="mask_words"):
            ss.ops.masked_conv2d(x, w, bank[1][:5], None, **kw)
        with pytest.raises(ValueError, match="bias must have shape"):
            ss.ops.masked_conv2d(x, w, bank[1], torch.randn(5), **kw)
        with pytest.raises(ValueError, match="x must be"):
            ss.ops.masked_conv2d(x[0, 0], w, bank[1], None, **kw)
        with pytest.raises(TypeError, match="dtype"):
            ss.ops.masked_conv2d(x.double(), w, bank[1], None, **kw)


def test_gradcheck_all_ops():
    k, out, n = 3, 4, 37
    masks, bank = rand_bank(k, out, n)
    dt = torch.float64
    x = torch.randn(2, n, dtype=dt, requires_grad=True)
    w = torch.randn(out, n, dtype=dt, requires_grad=True)
    b = torch.randn(out, dtype=dt, requires_grad=True)
    a = torch.rand(k, dtype=dt, requires_grad=True)
    v = torch.randn(out, n, dtype=dt, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: ss.ops.masked_linear(x, w, bank[0], b), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w, a, b: ss.ops.superposed_linear(x, w, bank, a, b), (x, w, a, b))
    assert torch.autograd.gradcheck(lambda a: ss.ops.superpose(bank, a, n), (a,))
    assert torch.autograd.gradcheck(lambda v: ss.ops.mask_dot(bank, v), (v,))
    # superposed_with_s takes s = Σ αᵢ Mᵢ as given (numerically constant in α), so compare its
    # gradients with superposed_linear's instead of finite differences.
    s = ss.ops.superpose(bank, a.detach(), n)
    a1, a2 = a.detach().clone().requires_grad_(), a.detach().clone().requires_grad_()
    x1, x2 = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    ss.ops.superposed_with_s(x1, w.detach(), bank, a1, s).sin().sum().backward()
    ss.ops.superposed_linear(x2, w.detach(), bank, a2).sin().sum().backward()
    assert torch.allclose(a1.grad, a2.grad) and torch.allclose(x1.grad, x2.grad)
    cx = torch.randn(1, 2, 5, 5, dtype=dt, requires_grad=True)
    cw = torch.randn(3, 2, 2, 2, dtype=dt, requires_grad=True)
    cm, cbank = rand_bank(k, 3, 8)
    assert torch.autograd.gradcheck(lambda x, w: ss.ops.masked_conv2d(x, w, cbank[2], None, padding=1), (cx, cw))
    assert torch.autograd.gradcheck(lambda x, w, a: ss.ops.superposed_conv2d(x, w, cbank, a, None, stride=2), (cx, cw, a))


def test_compile_fullgraph_traces_ops():
    """torch.compile(fullgraph=True) against an independent float-stack formula (not the same ops
    path in eager mode), values and gradients."""
    k, out, n = 3, 4, 40
    masks, bank = rand_bank(k, out, n)
    w = torch.randn(out, n)

    def f(x, a):
        return ss.ops.superposed_linear(x, w, bank, a).square().sum() + ss.ops.masked_linear(x, w, bank[1]).sum()

    def float_stack(x, a):
        w_eff = w * float_stack_superpose(masks, a)
        return (x @ w_eff.t()).square().sum() + (x @ (w * masks[1].float()).t()).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert_compiled_matches(compiled, float_stack, torch.randn(2, n), torch.rand(k), tol=1e-4, alpha_atol=1e-3)


def assert_compiled_matches(compiled, reference, x, a, tol, alpha_atol):
    """compiled(x, a) and reference(x, a) agree, and so do their x- and α-gradients."""
    x1, a1 = x.clone().requires_grad_(), a.clone().requires_grad_()
    x2, a2 = x.clone().requires_grad_(), a.clone().requires_grad_()
    got, expect = compiled(x1, a1), reference(x2, a2)
    torch.testing.assert_close(got, expect, rtol=tol, atol=tol)
    got.backward()
    expect.backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(a1.grad, a2.grad, rtol=tol, atol=alpha_atol)


def test_compile_with_dynamic_shapes_takes_symbolic_sizes():
    """Under torch.compile(dynamic=True) n reaches the ops as a symbolic int: superpose, and
    superposed_linear with x and α needing gradients (which calls superpose), trace and agree with eager."""
    k, out, n = 5, 7, 45
    masks, bank = rand_bank(k, out, n)
    w = torch.randn(out, n)

    def f(x, a):
        return ss.ops.superposed_linear(x, w, bank, a).square().sum() + ss.ops.superpose(bank, a, x.shape[-1]).sum()

    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    assert_compiled_matches(compiled, f, torch.randn(3, n), torch.rand(k), tol=1e-5, alpha_atol=1e-4)
    with pytest.raises(ValueError, match="n must be a positive int"):
        ss.unpack_bits(bank, True)


def test_compile_fullgraph_traces_the_interleaved_copy():
    """interleave_tasks and mask_dot_outer(bank_t=) are ops too: a compiled query builds and reads the
    copy and gives the eager result without it."""
    _, bank = rand_bank(19, 5, 70)
    w, g, x = torch.randn(5, 70), torch.randn(3, 5), torch.randn(3, 70)
    compiled = torch.compile(lambda g, x: ss.ops.mask_dot_outer(bank, g, x, w, ss.ops.interleave_tasks(bank)),
                             fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(g, x), ss.ops.mask_dot_outer(bank, g, x, w), rtol=1e-4, atol=1e-4)


def test_mask_dot_batched_equals_separate_mask_dots():
    _, bank = rand_bank(6, 3, 70)
    v = torch.randn(4, 3, 70)
    expect = torch.stack([ss.ops.mask_dot(bank, v[j]) for j in range(4)])
    torch.testing.assert_close(ss.ops.mask_dot_batched(bank, v), expect, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"v must be \[q, \*lead, n\]"):
        ss.ops.mask_dot_batched(bank, v[0])
    with pytest.raises(ValueError, match="needs 1 words|words per row"):
        ss.ops.mask_dot_batched(bank, torch.randn(4, 3, 20))


def test_bad_inputs_name_the_argument():
    k, out, n = 2, 3, 40
    _, bank = rand_bank(k, out, n)
    w, x = torch.randn(out, n), torch.randn(2, n)
    with pytest.raises(TypeError, match="mask_words.*int32"):
        ss.ops.masked_linear(x, w, bank[0].long())
    with pytest.raises(ValueError, match="mask_words must be"):
        ss.ops.masked_linear(x, w, bank[0][:, :1])
    with pytest.raises(ValueError, match="alpha must have shape"):
        ss.ops.superposed_linear(x, w, bank, torch.rand(k + 1))
    with pytest.raises(ValueError, match="NaN"):
        ss.ops.superposed_linear(x, w, bank, torch.tensor([0.5, float("nan")]))
    with pytest.raises(ValueError, match="NaN"):
        ss.ops.superpose(bank, torch.tensor([0.5, float("nan")]), n)
    with pytest.raises(ValueError, match="x must be"):
        ss.ops.masked_linear(torch.randn(2, n + 1), w, bank[0])
    with pytest.raises(TypeError, match="dtype"):
        ss.ops.masked_linear(x.double(), w, bank[0])
    with pytest.raises(ValueError, match="words per row"):
        ss.ops.superpose(bank, torch.rand(k), n + 40)
    with pytest.raises(ValueError, match="v must be"):
        ss.ops.mask_dot(bank, torch.randn(out + 1, n))
    with pytest.raises(TypeError, match="bank.*int32"):
        ss.ops.mask_dot(bank.float(), torch.randn(out, n))
    with pytest.raises(ValueError, match="bias must have shape"):
        ss.ops.masked_linear(x, w, bank[0], torch.randn(out + 1))
    with pytest.raises(ValueError, match="groups"):
        ss.ops.masked_conv2d(torch.randn(1, 4, 5, 5), torch.randn(3, 2, 3, 3), ss.pack_bits(torch.ones(3, 18, dtype=torch.bool)), groups=3)
    with pytest.raises(ValueError, match=r"stride must be an int or a tuple of 2 ints, got \(1.5, 1\)"):  # never truncated
        ss.ops.masked_conv2d(torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3), ss.pack_bits(torch.ones(3, 18, dtype=torch.bool)), stride=(1.5, 1))
    meta = torch.randn(2, n, device="meta")
    with pytest.raises(ValueError, match="one device"):
        ss.ops.masked_linear(meta, w.to("meta"), bank[0])


def test_noncontiguous_inputs_are_handled():
    k, out, n = 2, 6, 40
    masks, bank = rand_bank(k, out, n)
    w = torch.randn(n, out).t()  # non-contiguous
    x = torch.randn(n, 3).t()
    got = ss.ops.masked_linear(x, w, bank[0])
    assert torch.allclose(got, F.linear(x, w * masks[0]), atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_unbatched_conv_input_has_the_gradients_of_a_batch_of_one(backend):
    """F.conv2d takes one [C, H, W] image; so do the masked and superposed convs, backward included."""
    g = torch.Generator().manual_seed(3)
    x0, w0 = torch.randn(3, 7, 7, generator=g), torch.randn(4, 3, 3, 3, generator=g)
    bank = ss.pack_bits(torch.rand(2, 4, 27, generator=g) < 0.5)
    a0 = torch.tensor([0.3, 0.7])
    with ss.use_backend(backend):
        for op in (lambda x, w, a: ss.ops.masked_conv2d(x, w, bank[0], padding=1, stride=2),
                   lambda x, w, a: ss.ops.superposed_conv2d(x, w, bank, a, padding=1, dilation=2)):
            grads = []
            for x in (x0, x0.unsqueeze(0)):
                xs, ws, a = x.clone().requires_grad_(), w0.clone().requires_grad_(), a0.clone().requires_grad_()
                y = op(xs, ws, a)
                y.backward(torch.ones_like(y))
                grads.append((y.reshape(-1, *y.shape[-2:]), xs.grad.reshape(x0.shape), ws.grad, a.grad))
            for got, expect in zip(*grads):
                if expect is not None:
                    torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)


def test_superposed_conv2d_checks_its_parameters_on_every_path():
    """With x and α both needing gradients the op computes S once and takes the given-S path: it
    must refuse bad groups, padding, stride and dilation by name as the other path does."""
    _, bank = rand_bank(3, 4, 2 * 2 * 2)
    w = torch.randn(4, 2, 2, 2)
    cases = [(dict(groups=3), "groups=3 does not fit"), (dict(padding=-1), "padding must be >= 0"),
             (dict(stride=0), "stride must be >= 1"), (dict(dilation=(1, 0)), "dilation must be >= 1")]
    for kwargs, message in cases:
        for grad in (False, True):
            x = torch.randn(1, 2, 5, 5).requires_grad_(grad)
            a = torch.rand(3).requires_grad_(grad)
            with pytest.raises(ValueError, match=re.escape(message)):
                ss.ops.superposed_conv2d(x, w, bank, a, **kwargs)
    with pytest.raises(ValueError, match="padding must be an int or a tuple of 2 ints, got 'same' \\(string padding"):
        ss.ops.masked_conv2d(torch.randn(1, 2, 5, 5), w, bank[0], padding="same")
    with pytest.raises(ValueError, match="stride must be an int or a tuple of 2 ints, got 'x'$"):
        ss.ops.masked_conv2d(torch.randn(1, 2, 5, 5), w, bank[0], stride="x")
