"""The public ops under torch.autocast: ops of autocast's fp32 list, as the layers run them. A floating
x is cast to the weight's dtype and the op runs with autocast off, so the output's dtype does not
depend on which kernel the row count picks (it was float32 up to 16 rows and bfloat16 above, where the
backward then failed on a bfloat16 gradient against a float32 weight)."""
import pytest
import torch
import torch.nn.functional as F

import supsup_fast as ss
from tests.ops.isa_runner import needs_compiler


def _operands(seed, out=12, n=70, k=3):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, n, generator=g)
    bank = ss.pack_bits(torch.rand(k, out, n, generator=g) < 0.5)
    return weight, bank, torch.randn(out, generator=g), torch.rand(k, generator=g)


@pytest.mark.parametrize("rows", [1, 8, 64])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", ["masked_linear", "superposed_linear", "superposed_with_s", "signed_masked_linear", "bank_linear"])
def test_linear_ops_under_autocast_are_fp32_ops(op, dtype, rows):
    weight, bank, bias, alpha = _operands(rows)
    x = torch.randn(rows, weight.shape[1])
    signs = ss.pack_bits(weight > 0)
    scale = 0.25

    def call(x, alpha):
        if op == "masked_linear":
            return ss.ops.masked_linear(x, weight, bank[1], bias)
        if op == "superposed_linear":
            return ss.ops.superposed_linear(x, weight, bank, alpha, bias)
        if op == "superposed_with_s":
            s = ss.ops.superpose(bank, alpha.detach(), weight.shape[1]).view_as(weight)
            return ss.ops.superposed_with_s(x, weight, bank, alpha, s, bias)
        if op == "signed_masked_linear":
            return ss.ops.signed_masked_linear(x, signs, bank[1], scale, bias)
        with torch.no_grad():
            return ss.ops.bank_linear(x, weight, bank)

    grads = op != "bank_linear"
    xa, aa = x.clone().requires_grad_(grads), alpha.clone().requires_grad_(grads)
    want = call(xa, aa)
    for given in (x, x.to(dtype)):  # a float32 x, and one autocast produced
        xb, ab = given.clone().requires_grad_(grads), alpha.clone().requires_grad_(grads)
        with torch.autocast("cpu", dtype=dtype):
            got = call(xb, ab)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, call(given.float(), alpha))
        if grads:
            got.sum().backward()
            assert xb.grad is not None and xb.grad.dtype == given.dtype
    if grads:
        want.sum().backward()
        xb, ab = x.clone().requires_grad_(True), alpha.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=dtype):
            y = call(xb, ab)
        y.sum().backward()  # outside autocast, as torch recommends
        torch.testing.assert_close(xb.grad, xa.grad)
        if op.startswith("superposed"):
            torch.testing.assert_close(ab.grad, aa.grad)


@pytest.mark.parametrize("op", ["masked_conv2d", "superposed_conv2d"])
def test_conv_ops_under_autocast_are_fp32_ops(op):
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(6, 4, 3, 3, generator=g)
    bank = ss.pack_bits(torch.rand(3, 6, 36, generator=g) < 0.5)
    alpha = torch.rand(3, generator=g, requires_grad=True)
    x = torch.randn(2, 4, 7, 7, generator=g, requires_grad=True)
    call = (lambda x: ss.ops.masked_conv2d(x, weight, bank[0], None, padding=1)) if op == "masked_conv2d" else \
        (lambda x: ss.ops.superposed_conv2d(x, weight, bank, alpha, None, padding=1))
    want = call(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = call(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert x.grad.dtype == torch.float32
    mask = ss.unpack_bits(bank[0], 36).view_as(weight).float()
    if op == "masked_conv2d":
        torch.testing.assert_close(want, F.conv2d(x, weight * mask, padding=1))


@pytest.mark.parametrize("rows", [1, 32])
def test_signed_masked_linear_under_autocast_takes_a_half_precision_bias(rows):
    # x is cast to float32 (no weight tensor to take a dtype from): a bfloat16 bias is cast with it
    # (it met "bias must be float32" at one row and a dtype mismatch at 32)
    weight, bank, bias, _ = _operands(rows)
    x, signs = torch.randn(rows, weight.shape[1]), ss.pack_bits(weight > 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = ss.ops.signed_masked_linear(x.bfloat16(), signs, bank[1], 0.25, bias.bfloat16())
    want = ss.ops.signed_masked_linear(x.bfloat16().float(), signs, bank[1], 0.25, bias.bfloat16().float())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)


def _mlp(seed=7, q=3, sizes=(40, 24, 10), k=5):
    """A ReLU MLP's layers (weights [out, in]) and each layer's inputs for q queries."""
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(o, i, generator=g) / i ** 0.5 for i, o in zip(sizes[:-1], sizes[1:])]
    banks = [ss.pack_bits(torch.rand(k, *w.shape, generator=g) < 0.5) for w in ws]
    h, hs = torch.randn(q, sizes[0], generator=g), []
    for i, w in enumerate(ws):
        hs.append(h)
        h = F.linear(h, w).relu() if i + 1 < len(ws) else F.linear(h, w)
    return ws, banks, hs, torch.randn(q, sizes[-1], generator=g), torch.randint(0, sizes[-1], (q,), generator=g)


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_compiler)])
def test_mlp_fused_paths_run_outside_autocast(backend):
    """The MLP's one-call paths (task inference's backward and logit gradients, the training step's
    loss and weight gradients) give under autocast what they give outside it, on every backend: op by
    op a bfloat16 g met a float32 weight ("g, x and weight must share one dtype") and the logits'
    gradient came back in bfloat16, where the cpu backend's C++ call stays in float32."""
    ws, banks, hs, g, y = _mlp()
    copies = [ss.ops.interleave_tasks(b) for b in banks]
    with ss.use_backend(backend):
        calls = {"mlp_mask_dot_outer": lambda: ss.ops.mlp_mask_dot_outer(banks, copies, [False, False], ws, ws, hs, g),
                 "mlp_logit_gradients": lambda: ss.ops.mlp_logit_gradients(hs[0], ws, [None, None], "entropy", 10)[1],
                 "mlp_cross_entropy_grads": lambda: ss.ops.mlp_cross_entropy_grads(hs[0], y, ws)[1][0]}
        for name, call in calls.items():
            want = call()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                got = call()
            assert got.dtype == torch.float32, name
            torch.testing.assert_close(got, want, msg=name)
