"""Superposed forward / input gradient for a few images on the cpu backend (W ⊙ S never
materialised: csrc/cpu/gemv.cpp) against the reference backend, on every ISA level of this CPU."""
import shutil
import textwrap

import pytest

from tests.ops.isa_runner import ISAS, run_on_isa

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="no C++ compiler on this machine: the cpu backend cannot be built")

SCRIPT = textwrap.dedent("""
    import torch, supsup_fast as ss
    from supsup_fast.ops.backends.cpu import cpu_isa
    torch.manual_seed(0)
    print(cpu_isa())
    C = torch.ops.supsup_cpu
    for n in (1, 33, 784, 1000):
        for R in (1, 10, 33):
            W, S = torch.randn(R, n), torch.rand(R, n)
            for B in (1, 3, 16):
                x, g, b = torch.randn(B, n), torch.randn(B, R), torch.randn(R)
                assert torch.allclose(C.scaled_linear_small(x, W, S, b), x @ (W * S).T + b, rtol=1e-4, atol=1e-4)
                assert torch.allclose(C.scaled_linear_small(x, W, S), x @ (W * S).T, rtol=1e-4, atol=1e-4)
                assert torch.allclose(C.scaled_linear_small_t(g, W, S), g @ (W * S), rtol=1e-4, atol=1e-4)
    # the public op through autograd: general α and the given-s path, 1 and several images
    for n in (33, 784):
        bank = ss.pack_bits(torch.rand(13, 20, n) > 0.5)
        W, bias = torch.randn(20, n), torch.randn(20)
        for B in (1, 5):
            x0, a0 = torch.randn(B, n), torch.rand(13)
            res = []
            for be in ("cpu", "reference"):
                with ss.use_backend(be):
                    a = a0.clone().requires_grad_(True)
                    x = x0.clone().requires_grad_(True)
                    y = ss.ops.superposed_linear(x, W, bank, a, bias)
                    ga, gx = torch.autograd.grad(y.square().sum(), (a, x))
                    s = ss.ops.superpose(bank, torch.full((13,), 1 / 13), n)
                    a2 = torch.full((13,), 1 / 13, requires_grad=True)
                    x2 = x0.clone().requires_grad_(True)
                    y2 = ss.ops.superposed_with_s(x2, W, bank, a2, s, bias)
                    ga2, gx2 = torch.autograd.grad(y2.square().sum(), (a2, x2))
                    res.append((y, ga, gx, y2, ga2, gx2))
            for u, v in zip(*res):
                err = float((u - v).abs().max() / v.abs().max().clamp_min(1e-6))
                assert err < 1e-4, (n, B, err)
    print("ok")
""")


@pytest.mark.parametrize("isa", ISAS)
def test_scaled_gemv_against_reference(isa):
    run_on_isa(SCRIPT, isa)


def test_uniform_s_cache_follows_the_bank():
    """The layer's cached counts / k is rebuilt when a task is added (new count, new k)."""
    import torch
    import supsup_fast.nn as snn
    from supsup_fast.algorithms.inference import alpha_gradient
    from supsup_fast.bench import random_model_with_masks
    model = random_model_with_masks("lenet", 20, 5, seed=1)
    x = torch.randn(1, 784)
    g1 = alpha_gradient(model, x, "entropy", 10)
    snn.begin_task(model)
    snn.finish_task(model)
    g2 = alpha_gradient(model, x, "entropy", 10)
    assert g1.shape == (5,) and g2.shape == (6,)
    fresh = random_model_with_masks("lenet", 20, 5, seed=1)
    for (_, a), (_, b) in zip(snn.supermask_layers(fresh).items(), snn.supermask_layers(model).items()):
        a.append_packed(b.bank.words[5:6])
    assert torch.allclose(alpha_gradient(fresh, x, "entropy", 10), g2, rtol=1e-4, atol=1e-6)
