"""The mean cross-entropy and its logits gradient that every C++ MLP step computes in one pass per
row (cross_entropy.cpp, with a vectorised exp): checked on every ISA against F.cross_entropy in
float64 through a one-layer MLP whose weight is the identity (its logits are x itself), on odd
class counts and batch sizes, logits far apart (exp underflows), and non-finite logits (which
follow ATen's NaN and infinity semantics)."""
import textwrap

import pytest

from tests.ops.isa_runner import ISAS, SCRIPT_HEAD, needs_compiler, run_on_isa

pytestmark = needs_compiler


@pytest.mark.parametrize("isa", ISAS)
def test_cross_entropy_and_its_gradient_match_float64(isa):
    script = SCRIPT_HEAD + textwrap.dedent("""
    import math
    import torch.nn.functional as F

    def check(logits, y, what):
        eye = torch.eye(logits.shape[1])
        loss, (grad,) = C.mlp_cross_entropy_grads(logits, y, [eye])
        z = logits.double().requires_grad_()
        expect = F.cross_entropy(z, y)
        (dz,) = torch.autograd.grad(expect, z)
        assert abs(loss.item() - expect.item()) <= 1e-5 * abs(expect.item()) + 1e-6, (what, loss.item(), expect.item())
        # grad = dzᵀ x with x = logits: the gradient of the identity weight, exact up to the GEMM's rounding
        torch.testing.assert_close(grad.double(), dz.t() @ logits.double(), rtol=1e-4, atol=1e-6, msg=what)

    # every tail of a 16- and 8-lane row, one class, a batch of one, the s = 500 logits
    for B, K in [(1, 1), (3, 7), (5, 8), (9, 17), (128, 500), (7, 1001), (300, 10)]:
        logits = torch.randn(B, K) * 3
        check(logits, torch.randint(0, K, (B,)), (B, K))
    # logits 200 apart: exp underflows to 0 for most classes, and the label may be one of those
    logits = torch.randn(6, 33) * 100
    y = torch.randint(0, 33, (6,))
    check(logits, y, "underflow")
    logits[0, :] = -1e30  # a row of equal, very negative logits: uniform softmax
    check(logits, y, "uniform row")
    # non-finite logits, made by the layer: weight 10 on class 0 turns x = ±1e38 into a logit of ±inf
    # (and 0 · 1e38 = 0 elsewhere). +inf or NaN give NaN, -inf a class of probability 0 (finite loss,
    # gradient 0 there), or an infinite loss where it is the label, as ATen's cross-entropy gives.
    weight = torch.eye(19)
    weight[0, 0] = 10.0
    for value, label in ((1e38, 5), (float("nan"), 5), (-1e38, 5), (-1e38, 0)):
        x = torch.randn(4, 19)
        x[2, 0] = value
        y = torch.tensor([0, 3, label, 18])
        loss, (grad,) = C.mlp_cross_entropy_grads(x, y, [weight])
        z = torch.mm(x, weight.t()).double().requires_grad_()
        expect = F.cross_entropy(z, y)
        if math.isfinite(expect.item()):
            assert abs(loss.item() - expect.item()) <= 1e-5 * abs(expect.item()) + 1e-6, (value, label, loss, expect)
            (dz,) = torch.autograd.grad(expect, z)
            torch.testing.assert_close(grad.double(), dz.t() @ x.double(), rtol=1e-4, atol=1e-6)
        else:
            assert loss.item() == expect.item() or (math.isnan(loss.item()) and math.isnan(expect.item())), (value, label, loss, expect)
    print("ok")
    """)
    run_on_isa(script, isa)
