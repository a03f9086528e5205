"""Issue #16, op contract edge cases, identical on every backend: ±inf α refused on every path
(the count-cache path included), k = 0 banks, q = 0 queries and out = 0 layers, IEEE 0·inf in
mask_dot, and the exact feature count of signed_masked_linear."""
import pytest
import torch

import supsup_fast as ss
from supsup_fast import ops

from tests.devices import backend_devices
from tests.ops.isa_runner import needs_compiler

CASES = backend_devices()
INF, NAN = float("inf"), float("nan")


def _bank(k, out, n, g, p=0.5):
    return ss.pack_bits(torch.rand(k, out, n, generator=g) < p)


def _on(name, device, fn):
    with ss.use_backend(name):
        return fn(device)


@pytest.mark.parametrize("name,device", CASES)
@pytest.mark.parametrize("bad", [INF, -INF, NAN])
def test_non_finite_alpha_refused_on_every_path(name, device, bad, rng):
    k, out, n = 4, 3, 40
    bank = _bank(k, out, n, rng).to(device)
    x, w = torch.randn(2, n, generator=rng).to(device), torch.randn(out, n, generator=rng).to(device)
    cx, cw = torch.randn(1, 2, 5, 5).to(device), torch.randn(3, 2, 2, 2).to(device)
    cbank = _bank(k, 3, 8, rng).to(device)
    a = torch.ones(k, device=device)
    a[1] = bad
    s = torch.ones(out, n, device=device)
    what = "NaN" if bad != bad else "±inf"
    with ss.use_backend(name):
        for call in (lambda: ops.superpose(bank, a, n),
                     lambda: ops.superposed_linear(x, w, bank, a),
                     lambda: ops.superposed_conv2d(cx, cw, cbank, a),
                     lambda: ops.superposed_with_s(x, w, bank, a, s),
                     lambda: ops.superposed_with_s(cx, cw, cbank, a, torch.ones_like(cw), conv={}),
                     lambda: torch.ops.supsup.superposed_given_s(x, w, bank, a, s, None, None)):
            with pytest.raises(ValueError, match=f"alpha contains {what}"):
                call()


def _edge_results(device):
    g = torch.Generator().manual_seed(3)
    n = 40
    bank0 = torch.zeros(0, 3, 2, dtype=torch.int32, device=device)
    bank = _bank(4, 3, n, g).to(device)
    x, w, b = (torch.randn(*shape, generator=g).to(device) for shape in ((2, n), (3, n), (3,)))
    out0_bank = torch.zeros(4, 0, 2, dtype=torch.int32, device=device)
    cx, cw = torch.randn(2, 2, 5, 5, generator=g).to(device), torch.randn(3, 2, 2, 2, generator=g).to(device)
    cbank0 = torch.zeros(0, 3, 1, dtype=torch.int32, device=device)
    sign = _bank(1, 3, n, g)[0].to(device)
    return {
        "superpose k=0": ops.superpose(bank0, torch.zeros(0, device=device), n),
        "bias": b,
        "mask_dot k=0": ops.mask_dot(bank0, torch.randn(3, n, generator=g).to(device)),
        "mask_dot out=0": ops.mask_dot(out0_bank, torch.zeros(0, n, device=device)),
        "mask_dot_batched k=0": ops.mask_dot_batched(bank0, torch.randn(2, 3, n, generator=g).to(device)),
        "mask_dot_batched q=0": ops.mask_dot_batched(bank, torch.zeros(0, 3, n, device=device)),
        "superposed_linear k=0": ops.superposed_linear(x, w, bank0, torch.zeros(0, device=device), b),
        "superposed_linear out=0": ops.superposed_linear(x, torch.zeros(0, n, device=device), out0_bank,
                                                         torch.ones(4, device=device)),
        "superposed_linear batch=0": ops.superposed_linear(torch.zeros(0, n, device=device), w, bank,
                                                           torch.ones(4, device=device)),
        "superposed_conv2d k=0": ops.superposed_conv2d(cx, cw, cbank0, torch.zeros(0, device=device)),
        "masked_linear out=0": ops.masked_linear(x, torch.zeros(0, n, device=device),
                                                 torch.zeros(0, 2, dtype=torch.int32, device=device)),
        "signed_masked_linear out=0": ops.signed_masked_linear(x, torch.zeros(0, 2, dtype=torch.int32, device=device),
                                                               torch.zeros(0, 2, dtype=torch.int32, device=device), 1.0),
        "signed_masked_linear batch=0": ops.signed_masked_linear(torch.zeros(0, n, device=device), sign, sign, 1.0),
    }


EXPECT_SHAPES = {"bias": (3,), "superpose k=0": (3, 40), "mask_dot k=0": (0,), "mask_dot out=0": (4,),
                 "mask_dot_batched k=0": (2, 0), "mask_dot_batched q=0": (0, 4), "superposed_linear k=0": (2, 3),
                 "superposed_linear out=0": (2, 0), "superposed_linear batch=0": (0, 3),
                 "superposed_conv2d k=0": (2, 3, 4, 4), "masked_linear out=0": (2, 0),
                 "signed_masked_linear out=0": (2, 0), "signed_masked_linear batch=0": (0, 3)}


@pytest.mark.parametrize("name,device", CASES)
def test_empty_sizes_defined_and_identical_on_every_backend(name, device):
    got = _on(name, device, _edge_results)
    ref = _on("reference", torch.device("cpu"), _edge_results)
    assert set(got) == set(EXPECT_SHAPES)
    for key, value in got.items():
        assert tuple(value.shape) == EXPECT_SHAPES[key], key
        assert torch.equal(value.cpu(), ref[key]), key
    # An empty sum is zero: k = 0 superposes to zeros, a superposed layer over no task gives its bias.
    assert torch.equal(ref["superpose k=0"], torch.zeros(3, 40))
    assert torch.equal(ref["mask_dot out=0"], torch.zeros(4))
    assert torch.equal(ref["superposed_linear k=0"], ref["bias"].expand(2, 3))
    assert torch.equal(ref["superposed_conv2d k=0"], torch.zeros(2, 3, 4, 4))


@pytest.mark.parametrize("name,device", CASES)
def test_empty_bank_backward(name, device):
    with ss.use_backend(name):
        x = torch.randn(2, 40, device=device, requires_grad=True)
        a = torch.zeros(0, device=device, requires_grad=True)
        y = ops.superposed_linear(x, torch.randn(3, 40, device=device), torch.zeros(0, 3, 2, dtype=torch.int32,
                                                                                   device=device), a)
        y.sum().backward()
    assert torch.equal(x.grad.cpu(), torch.zeros(2, 40)) and a.grad.shape == (0,)


@pytest.mark.parametrize("name,device", CASES)
def test_mask_dot_non_finite_v_is_ieee_on_every_backend(name, device, rng):
    out, n = 3, 40
    masks = torch.rand(5, out, n, generator=rng) < 0.5
    masks[0] = False                      # holds no bit: 0·inf = NaN
    masks[1] = True                       # holds every bit: +inf + -inf = NaN
    masks[2] = True
    masks[2, 1, 5] = False                # holds the +inf, not the -inf (0·-inf): NaN
    masks[3] = False
    masks[3, 0, 0] = masks[3, 1, 5] = True  # both infs and nothing else: NaN
    masks[4] = True
    v = torch.zeros(out, n)
    v[0, 0], v[0, 1], v[1, 5] = INF, 2.0, -INF
    bank = ss.pack_bits(masks)
    with ss.use_backend(name):
        got = ops.mask_dot(bank.to(device), v.to(device)).cpu()
        got_b = ops.mask_dot_batched(bank.to(device), torch.stack([v, torch.ones(out, n)]).to(device)).cpu()
    expect = (masks.double() * v.double()).flatten(1).sum(1).float()  # Σⱼ Mᵢⱼ vⱼ in IEEE arithmetic
    assert torch.isnan(expect).all()
    torch.testing.assert_close(got, expect, equal_nan=True)
    torch.testing.assert_close(got_b[0], expect, equal_nan=True)
    assert torch.equal(got_b[1], masks.flatten(1).sum(1).float())
    # Only +inf, every task holding it: +inf; a task missing it: NaN.
    v2 = torch.zeros(out, n)
    v2[0, 0] = INF
    with ss.use_backend(name):
        got2 = ops.mask_dot(bank.to(device), v2.to(device)).cpu()
    assert torch.isnan(got2[0]) and got2[1] == INF and got2[3] == INF
    v_nan = torch.zeros(out, n)
    v_nan[2, 3] = NAN
    with ss.use_backend(name):
        assert torch.isnan(ops.mask_dot(bank.to(device), v_nan.to(device))).all()


# (batch, x needs grad, big weight). One image with x needing no grad runs as y = D α (bank_linear),
# which never forms g·x·w: there a finite weight whose product overflows is not a case of the
# contract (D gives the clear tasks a finite gradient, the S path NaN), so only inf is checked.
NON_FINITE_ALPHA_GRAD = [(1, False, INF), (1, True, INF), (1, True, 3e38), (3, False, INF), (3, False, 3e38),
                         (3, True, INF)]


@pytest.mark.parametrize("name,device", CASES)
@pytest.mark.parametrize("batch,x_grad,big", NON_FINITE_ALPHA_GRAD)
def test_superposed_alpha_grad_non_finite_products_are_ieee(name, device, batch, x_grad, big, rng):
    """A weight of inf, or a product g·x·w that overflows, makes Σⱼ Mᵢⱼ vⱼ NaN for each task whose bit
    there is clear (0·inf), as in the reference, on every path: the one-image rank-1 kernel (batch 1,
    x needing grad), every task's outputs (batch 1) and the lookup over a materialised v (batch 3)."""
    k, out, n = 6, 5, 40
    masks = torch.rand(k, out, n, generator=rng) < 0.5
    masks[:3, 3, n - 1] = True
    masks[3:, 3, n - 1] = False
    w = torch.randn(out, n, generator=rng)
    w[3, n - 1] = big
    x = torch.randn(batch, n, generator=rng) + 4.0  # no zero: each product at (3, n-1) is ±big or beyond
    gout = torch.randn(batch, out, generator=rng).abs() + 2.0
    alpha = torch.full((k,), 1.0 / k, device=device, requires_grad=True)
    with ss.use_backend(name):
        xd = x.to(device).requires_grad_(x_grad)
        y = ops.superposed_linear(xd, w.to(device), ss.pack_bits(masks).to(device), alpha)
        y.backward(gout.to(device))
    v = (gout.t() @ x) * w  # ∂L/∂W_eff ⊙ W in fp32, as the contract forms it: (3, n-1) is +inf
    assert v[3, n - 1] == INF
    expect = (masks.double() * v.double()).flatten(1).sum(1).float()
    assert torch.isnan(expect[3:]).all() and (expect[:3] == INF).all()
    torch.testing.assert_close(alpha.grad.cpu(), expect, equal_nan=True)


@pytest.mark.parametrize("name,device", CASES)
def test_superposed_conv_alpha_grad_non_finite_weight_is_ieee(name, device, rng):
    k = 5
    masks = torch.rand(k, 4, 3 * 3 * 3, generator=rng) < 0.5
    masks[:2, 1, 0] = True
    masks[2:, 1, 0] = False
    w = torch.randn(4, 3, 3, 3, generator=rng)
    w[1, 0, 0, 0] = -INF
    x = torch.rand(2, 3, 6, 6, generator=rng) + 1.0
    alpha = torch.full((k,), 0.2, device=device, requires_grad=True)
    with ss.use_backend(name):
        y = ops.superposed_conv2d(x.to(device), w.to(device), ss.pack_bits(masks).to(device), alpha)
        y.backward(torch.ones_like(y))
    got = alpha.grad.cpu()
    assert (got[:2] == -INF).all() and torch.isnan(got[2:]).all(), got


@pytest.mark.parametrize("name,device", CASES)
def test_signed_masked_linear_checks_the_exact_feature_count(name, device, rng):
    sign, mask = (ss.pack_bits(torch.rand(6, 70, generator=rng) < 0.5).to(device) for _ in range(2))
    with ss.use_backend(name):
        ops.signed_masked_linear(torch.randn(2, 70, device=device), sign, mask, 0.1)
        with pytest.raises(ValueError, match="built for more than the 65 features"):
            ops.signed_masked_linear(torch.randn(2, 65, device=device), sign, mask, 0.1)
        with pytest.raises(ValueError, match=r"x must be \[\*, 70\]"):
            ops.signed_masked_linear(torch.randn(2, 69, device=device), sign, mask, 0.1, in_features=70)
        with pytest.raises(ValueError, match=r"ceil\(in/32\)"):
            ops.signed_masked_linear(torch.randn(2, 97, device=device), sign, mask, 0.1)
        with pytest.raises(TypeError, match="x must be a floating-point"):
            ops.signed_masked_linear(torch.ones(2, 70, dtype=torch.int64, device=device), sign, mask, 0.1)
        # Words packed for 65 features pass with x of 65 features (zero pad bits).
        s65, m65 = (ss.pack_bits(torch.rand(6, 65, generator=rng) < 0.5).to(device) for _ in range(2))
        ops.signed_masked_linear(torch.randn(2, 65, device=device), s65, m65, 0.1, in_features=65)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_data_checks_do_not_break_cuda_graph_capture():
    """The α and v checks are host syncs: inside a CUDA-graph capture they are skipped, so the
    ops stay capturable (benchmarks/gpu_check.py times them in graphs)."""
    g = torch.Generator().manual_seed(0)
    bank = _bank(8, 16, 100, g).cuda()
    v, alpha = torch.randn(16, 100, device="cuda"), torch.rand(8, device="cuda")
    for name in ss.backends.available():
        backend = ss.ops.registry._instance(name)
        if not backend.supports(torch.device("cuda")):
            continue
        with ss.use_backend(name):
            expect_dot, expect_sup = ops.mask_dot(bank, v), ops.superpose(bank, alpha, 100)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                ops.mask_dot(bank, v), ops.superpose(bank, alpha, 100)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                dot, sup = ops.mask_dot(bank, v), ops.superpose(bank, alpha, 100)
            graph.replay()
            torch.cuda.synchronize()
            torch.testing.assert_close(dot, expect_dot)
            torch.testing.assert_close(sup, expect_sup)


def test_inference_fast_path_is_the_op_body():
    """Without autograd, masked_linear runs the op's body directly (no custom-op dispatcher): same
    result and same argument errors as the op; with a gradient to record, under a dispatch mode
    (fake tensors) or on meta tensors it goes through the op."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from supsup_fast.ops.dispatch import eager_without_grad
    from supsup_fast.ops.masked import masked_linear_op
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(3, 45, generator=g), torch.randn(7, 45, generator=g), torch.randn(7, generator=g)
    words = ss.pack_bits(torch.rand(7, 45, generator=g) > 0.5)
    with torch.no_grad():
        assert eager_without_grad(x, w, words, b)
        assert torch.equal(ss.ops.masked_linear(x, w, words, b), masked_linear_op(x, w, words, b))
        with pytest.raises(ValueError, match="mask_words"):
            ss.ops.masked_linear(x, w, words[:, :1], b)
    assert eager_without_grad(x, w, words, b)  # grad mode on, but nothing requires grad
    assert not eager_without_grad(x.clone().requires_grad_(), w, words, b)
    assert not eager_without_grad(torch.empty(3, 45, device="meta"), w, words, b)
    with FakeTensorMode():
        assert not eager_without_grad(torch.empty(3, 45), w, words, b)


def test_signed_inference_fast_path_is_the_op_body():
    """signed_masked_linear without autograd runs the op's body directly: the same result and the
    same argument errors (pad bits included) as the op; with x or the bias requiring grad it goes
    through the op, which records the graph."""
    from supsup_fast.ops.signed import signed_masked_linear_op
    g = torch.Generator().manual_seed(5)
    x, b = torch.randn(3, 45, generator=g), torch.randn(7, generator=g)
    sign, mask = (ss.pack_bits(torch.rand(7, 45, generator=g) > 0.5) for _ in range(2))
    with torch.no_grad():
        for bias in (None, b):
            assert torch.equal(ops.signed_masked_linear(x, sign, mask, 0.25, bias),
                               signed_masked_linear_op(x, sign, mask, 0.25, bias))
        with pytest.raises(ValueError, match="sign_words and mask_words"):
            ops.signed_masked_linear(x, sign, mask[:, :1], 0.25)
        with pytest.raises(ValueError, match="built for more than the 40 features"):
            ops.signed_masked_linear(x[:, :40], sign, mask, 0.25)
    for args in ((x.clone().requires_grad_(), b), (x, b.clone().requires_grad_())):
        y = ops.signed_masked_linear(args[0], sign, mask, 0.25, args[1])
        assert y.grad_fn is not None
        y.sum().backward()
        assert all(a.grad is not None for a in args if a.requires_grad)


def test_one_pass_linear_gate_takes_only_valid_plain_calls():
    """eager_linear_backend (masked_linear's one-pass gate) answers a backend exactly when the
    separate tests would run the op's body on that backend: valid, non-empty arguments, plain
    tensors, nothing to record. Every way a call can fail one of those tests gets None, so the
    general path runs (and names what is wrong)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from supsup_fast.ops.dispatch import _pick, eager_linear_backend
    g = torch.Generator().manual_seed(4)
    x, w, b = torch.randn(3, 45, generator=g), torch.randn(7, 45, generator=g), torch.randn(7, generator=g)
    words = ss.pack_bits(torch.rand(7, 45, generator=g) > 0.5)
    with torch.no_grad():
        assert eager_linear_backend(x, w, words, b) is _pick(x.device, x.numel(), w.shape[0])
        assert eager_linear_backend(x[0], w, words, None) is not None  # a 1-d x: one image
        assert eager_linear_backend(x.double(), w.double(), words, b.double()) is not None
        assert eager_linear_backend(x.clone().requires_grad_(), w, words, b) is not None  # no_grad: nothing recorded
        refused = {
            "x features": (torch.randn(3, 44), w, words, b),
            "x dtype": (x.double(), w, words, b),
            "x 0-d": (torch.tensor(1.0), w, words, b),
            "weight 1-d": (x, w[0], words, b),
            "weight int": (x.long(), w.long(), words, None),
            "words dtype": (x, w, words.long(), b),
            "words rows": (x, w, words[:6], b),
            "words per row": (x, w, words[:, :1], b),
            "words 1-d": (x, w, words[0], b),
            "bias length": (x, w, words, b[:6]),
            "bias dtype": (x, w, words, b.double()),
            "bias 2-d": (x, w, words, b[None]),
            "empty batch": (x[:0], w, words, b),
            "no outputs": (x, w[:0], words[:0], b[:0]),
            "meta x": (torch.empty(3, 45, device="meta"), w, words, b),
            "not a tensor": (x.tolist(), w, words, b),
        }
        for name, args in refused.items():
            assert eager_linear_backend(*args) is None, name
        with FakeTensorMode():
            assert eager_linear_backend(torch.empty(3, 45), torch.empty(7, 45), torch.empty(7, 2, dtype=torch.int32),
                                        None) is None
    assert eager_linear_backend(x, w, words, b) is not None  # grad mode on, nothing requires grad
    for grad_arg in range(3):  # x, weight or bias requiring grad: the op records the graph
        args = [x, w, b]
        args[grad_arg] = args[grad_arg].clone().requires_grad_()
        assert eager_linear_backend(args[0], args[1], words, args[2]) is None
        y = ss.ops.masked_linear(args[0], args[1], words, args[2])
        assert y.requires_grad and y.grad_fn is not None


def test_pad_bit_check_is_not_fooled_by_a_reused_address():
    """The pad-bit check of signed_masked_linear is done once per words tensor; a different tensor
    at the same address and version (here: two tensors over one numpy buffer) is checked again."""
    import numpy as np
    buf_s = ss.pack_bits(torch.rand(6, 65) < 0.5).numpy().copy()
    buf_m = ss.pack_bits(torch.rand(6, 65) < 0.5).numpy().copy()
    clean_s, clean_m = torch.from_numpy(buf_s), torch.from_numpy(buf_m)
    ops.signed_masked_linear(torch.randn(2, 65), clean_s, clean_m, 0.1)
    del clean_s, clean_m
    buf_m[:, -1] |= np.int32(1 << 5)  # a bit past feature 65, written behind torch's back
    dirty_s, dirty_m = torch.from_numpy(buf_s), torch.from_numpy(buf_m)  # same addresses, version 0
    with pytest.raises(ValueError, match="built for more than the 65 features"):
        ops.signed_masked_linear(torch.randn(2, 65), dirty_s, dirty_m, 0.1)


@pytest.mark.parametrize("name,device", CASES)
@pytest.mark.parametrize("bad", [INF, NAN])
@pytest.mark.parametrize("rows", [1, 3, 200])
def test_masked_out_non_finite_weights_never_enter(name, device, bad, rows):
    """W ⊙ M selects W where the bit is set: a ±inf or NaN weight under a clear bit contributes
    nothing to the output, and an inf input gives the masked-out weights a zero gradient, on every
    backend (the reference selects as the kernels do, not 0·inf = NaN)."""
    g = torch.Generator().manual_seed(rows)
    m = torch.rand(5, 70, generator=g) < 0.5
    w = torch.randn(5, 70, generator=g)
    w[~m] = bad
    bits, x = ss.pack_bits(m).to(device), torch.randn(rows, 70, generator=g).to(device)
    with ss.use_backend(name):
        y = ss.ops.masked_linear(x, w.to(device), bits)
        torch.testing.assert_close(y, x @ torch.where(m, w, 0.0).t().to(device), rtol=1e-5, atol=1e-5)
        xi = x.clone()
        xi[0, 3] = INF
        wq = torch.randn(5, 70, generator=g).to(device).requires_grad_()
        ss.ops.masked_linear(xi, wq, bits).sum().backward()
    assert torch.equal(wq.grad.cpu()[~m], torch.zeros(int((~m).sum())))


@pytest.mark.parametrize("rows", [1, 40])
@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_compiler)])
def test_signed_masked_linear_refuses_a_bias_of_another_dtype(backend, rows):
    """A float64 bias beside a float32 x is refused on every backend, as masked_linear refuses one
    unlike its weight (the reference raised inside F.linear, the Triton backend cast it)."""
    x = torch.randn(rows, 70)
    signs, mask = ss.pack_bits(torch.rand(12, 70) < 0.5), ss.pack_bits(torch.rand(12, 70) < 0.5)
    with ss.use_backend(backend):
        with pytest.raises(TypeError, match="bias dtype torch.float64 must match x's dtype torch.float32"):
            ss.ops.signed_masked_linear(x, signs, mask, 0.5, torch.zeros(12, dtype=torch.float64))
        want = ss.ops.signed_masked_linear(x, signs, mask, 0.5, None) + 1
        torch.testing.assert_close(ss.ops.signed_masked_linear(x, signs, mask, 0.5, torch.ones(12)), want)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_compiler)])
def test_signed_masked_linear_of_no_inputs_has_a_backward(backend):
    """A signed layer of 0 input features: y = b, and x's gradient is empty (its backward unpacks
    the words of no weights)."""
    x, words = torch.randn(2, 0, requires_grad=True), torch.zeros(3, 0, dtype=torch.int32)
    with ss.use_backend(backend):
        y = ss.ops.signed_masked_linear(x, words, words, 0.5, torch.ones(3))
        y.sum().backward()
    assert torch.equal(y, torch.ones(2, 3)) and x.grad.shape == (2, 0)
