"""Lookup-table mask_dot kernels (csrc/cpu/lut.cpp) and the cpu backend's native batched queries,
against the reference backend, on every instruction-set level this CPU has (SUPSUP_CPU_ISA caps it
in a subprocess)."""
import textwrap

import pytest
import torch

from tests.ops.isa_runner import ISAS, SCRIPT_HEAD, needs_compiler, run_on_isa

pytestmark = needs_compiler

SCRIPT = SCRIPT_HEAD + textwrap.dedent("""
    from supsup_fast.ops.backends.cpu import CpuBackend
    assert CpuBackend.fast_batched_inference
    for n in (1, 33, 784, 1000):
        for k in (1, 3, 4, 17, 33, 100):  # 100: batched queries run 4 groups of 16 tasks per table load, and a rest
            for lead in ((7,), (2, 3)):
                m = torch.rand(k, *lead, n) > 0.5
                bank = ss.pack_bits(m)
                v = torch.randn(*lead, n)
                exp = (m.double() * v.double()).flatten(1).sum(1).float()
                assert torch.allclose(C.mask_dot(bank, v), exp, rtol=1e-4, atol=1e-3), (n, k, lead)
                # small integers: every partial sum is exact in fp32, so the result is exact
                vi = torch.randint(-3, 4, (*lead, n)).float()
                assert torch.equal(C.mask_dot(bank, vi), ref.mask_dot(bank, vi)), (n, k, lead)
                # pad bits set in the words are ignored
                dirty = bank.clone()
                if n % 32:
                    dirty[..., -1] |= -(1 << (n % 32))
                    assert torch.equal(C.mask_dot(dirty, vi), ref.mask_dot(bank, vi))
                # q queries at once: row j is mask_dot of query j
                for q in (1, 5, 40):
                    vq = torch.randint(-3, 4, (q, *lead, n)).float()
                    got = C.mask_dot_batched(bank, vq)
                    assert got.shape == (q, k)
                    assert torch.equal(got, ref.mask_dot_batched(bank, vq)), (n, k, lead, q)
                vq = torch.randn(6, *lead, n)
                assert torch.allclose(C.mask_dot_batched(bank, vq), ref.mask_dot_batched(bank, vq), rtol=1e-4, atol=1e-3)
                # an active subset of the tasks
                act = torch.randperm(k)[: max(1, k // 2)]
                assert torch.equal(C.mask_dot(bank, vi, act), ref.mask_dot(bank[act], vi))
                assert torch.equal(C.mask_dot_batched(bank, vq[:2].round(), act), ref.mask_dot_batched(bank[act], vq[:2].round()))
            # rank 1: v = (g xᵀ) ⊙ W formed inside the kernel
            R = 9
            m = torch.rand(k, R, n) > 0.5
            bank = ss.pack_bits(m)
            g, x, W = torch.randn(R), torch.randn(n), torch.randn(R, n)
            exp = (m.double() * (torch.outer(g, x) * W).double()).flatten(1).sum(1).float()
            assert torch.allclose(C.mask_dot_rank1(bank, g, x, W), exp, rtol=1e-4, atol=1e-3), (n, k)
    # rank 1 with rows where g = 0 (dead ReLUs, ignored logits): those rows are skipped, and the result
    # is exactly that of summing them (small integers: every partial sum is exact in fp32)
    # 61 rows of 25 words: two threads' shares; 44: a last word of 12 bits, 3 of 8 nibbles (4 of 11 3-bit groups) looked up
    for n, R in ((1, 37), (33, 37), (44, 29), (784, 61)):
        for k in (4, 17, 100):
            m = torch.rand(k, R, n) > 0.5
            bank, W = ss.pack_bits(m), ri(R, n)
            dirty = bank.clone()  # set pad bits: a row's last word is looked up only for its valid nibbles
            if n % 32:
                dirty[..., -1] |= -(1 << (n % 32))
            for q in (1, 5, 40):
                g, x = rank1_queries(q, R, n)
                exp = ref.mask_dot_outer(bank, g, x, W)
                assert torch.equal(C.mask_dot_rank1_batched(dirty, g, x, W), exp), (n, R, k, q)
                assert torch.equal(C.mask_dot_rank1(dirty, g[0], x[0], W), exp[0]), (n, R, k, q)
            assert torch.equal(C.mask_dot_rank1(bank, torch.zeros(R), x[0], W), torch.zeros(k))
            # 0 · inf is NaN, as in the reference: with x or w not finite no row is skipped
            xi, Wi = x[0].clone(), W.clone()
            xi[n // 2] = float("inf")
            Wi[2, n - 1] = float("-inf")
            for gz, xx, WW, hit in ((torch.zeros(R), xi, W, m[:, :, n // 2].any(1)), (torch.zeros(R), x[0], Wi, m[:, 2, n - 1])):
                assert torch.equal(C.mask_dot_rank1(bank, gz, xx, WW).isnan(), hit), (n, k)
                assert torch.equal(C.mask_dot_rank1_batched(bank, gz[None].repeat(3, 1), xx[None].repeat(3, 1), WW).isnan(),
                                   hit[None].repeat(3, 1)), (n, k)
        # 500 tasks, every row live: 16 queries at a time in the vector lanes (lut_lanes.cpp, from 64 tasks), the rest as above;
        # pad bits set in the words are ignored there too
        m = torch.rand(500, R, n) > 0.5
        bank, W = ss.pack_bits(m), ri(R, n)
        dirty = bank.clone()
        if n % 32:
            dirty[..., -1] |= -(1 << (n % 32))
        for q in (16, 37):
            g, x = ri(q, R), ri(q, n)
            g[g == 0] = 1
            assert torch.equal(C.mask_dot_rank1_batched(dirty, g, x, W), ref.mask_dot_outer(bank, g, x, W)), (n, R, q)
        x[3, n // 2] = float("nan")
        got = C.mask_dot_rank1_batched(bank, g, x, W)
        assert torch.equal(got.isnan(), torch.arange(37)[:, None].eq(3) & m[:, :, n // 2].any(1)[None]), n
    # the public ops on the cpu backend: mask_dot_batched and the one-image α-gradient
    bank = ss.pack_bits(torch.rand(21, 13, 100) > 0.5)
    v = torch.randn(4, 13, 100)
    with ss.use_backend("cpu"):
        got = ss.ops.mask_dot_batched(bank, v)
    with ss.use_backend("reference"):
        exp = ss.ops.mask_dot_batched(bank, v)
    assert torch.allclose(got, exp, rtol=1e-4, atol=1e-4)
    x, W = torch.randn(1, 100), torch.randn(13, 100)
    grads = []
    for b in ("cpu", "reference"):
        with ss.use_backend(b):
            a = torch.full((21,), 1 / 21, requires_grad=True)
            y = ss.ops.superposed_linear(x, W, bank, a)
            grads.append(torch.autograd.grad(y.square().sum(), a)[0])
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-4)
    print("ok")
""")


@pytest.mark.parametrize("isa", ISAS)
def test_lut_mask_dot_against_reference(isa):
    run_on_isa(SCRIPT, isa)


def test_batched_inference_on_cpu_matches_per_query():
    """Evaluation's batched path (now taken on the cpu backend) gives each query's own α-gradient."""
    import supsup_fast as ss
    from supsup_fast.algorithms.inference import alpha_gradient, alpha_gradients_batched
    from supsup_fast.bench import random_model_with_masks
    model = random_model_with_masks("lenet", 20, 37, seed=3)
    xs = torch.randn(5, 784)
    with ss.use_backend("cpu"):
        batched = alpha_gradients_batched(model, xs, "entropy", 10)
    with ss.use_backend("reference"):
        for j in range(5):
            one = alpha_gradient(model, xs[j:j + 1], "entropy", 10)
            assert torch.allclose(batched[j], one, rtol=1e-3, atol=1e-6)
