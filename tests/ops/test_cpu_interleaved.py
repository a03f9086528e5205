"""The task-interleaved bank copy (ops.interleave_tasks) and the rank-1 kernels that read it
(csrc/cpu/lut_interleaved.cpp, through mask_dot_outer's bank_t), against the reference backend on
every instruction-set level this CPU has; the copy kept by MaskBank; one-image task inference,
which reads it on the cpu backend."""
import copy
import textwrap

import pytest
import torch

import supsup_fast as ss
from supsup_fast.nn.bank import MaskBank

from tests.ops.isa_runner import ISAS, SCRIPT_HEAD, needs_compiler, run_on_isa

SCRIPT = SCRIPT_HEAD + textwrap.dedent("""
    # the copy: word w of task t at [..., w, t], tasks padded with zero words to a multiple of 16
    for shape in ((0, 3, 2), (1, 1), (15, 4, 3), (16, 2, 5), (17, 3, 2, 4), (70, 130, 3)):
        bank = torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32)
        got = C.interleave_tasks(bank)
        assert torch.equal(got, ref.interleave_tasks(bank)), shape
        kp = -shape[0] // 16 * -16
        assert got.shape == (*shape[1:], kp)
        assert torch.equal(got[..., :shape[0]], bank.movedim(0, -1)) and not got[..., shape[0]:].any(), shape
    # small integers: every partial sum is exact in fp32, so every path must give the reference exactly.
    # A row's last word is looked up only for its valid bits where that saves enough: 30 and 44 bits take
    # 6 and 3 of the 7 5-bit groups (AVX-512), 44 takes 4 of 11 3-bit groups (AVX2), 100 (4 bits) one group;
    # 63 (31 bits) takes all 7, the last of 2 bits; 784: 61 rows of 25 words, two threads' shares
    for n, R in ((1, 37), (30, 11), (33, 37), (44, 29), (63, 5), (100, 7), (784, 61)):
        for k in (1, 4, 17, 100):
            m = torch.rand(k, R, n) > 0.5
            bank, W = ss.pack_bits(m), ri(R, n)
            dirty = bank.clone()  # set pad bits count for nothing
            if n % 32:
                dirty[..., -1] |= -(1 << (n % 32))
            bt = C.interleave_tasks(dirty)
            for q in (1, 5, 40):
                g, x = rank1_queries(q, R, n)
                exp = ref.mask_dot_outer(bank, g, x, W)
                assert torch.equal(C.mask_dot_rank1_batched(dirty, g, x, W, bt), exp), (n, R, k, q)
            # 0 · inf is NaN, as in the reference: with x or w not finite no row is skipped
            xi, Wi = x[:3].clone(), W.clone()
            xi[:, n // 2] = float("inf")
            Wi[2, n - 1] = float("-inf")
            gz = torch.zeros(3, R)
            for xx, WW, hit in ((xi, W, m[:, :, n // 2].any(1)), (x[:3], Wi, m[:, 2, n - 1])):
                assert torch.equal(C.mask_dot_rank1_batched(bank, gz, xx, WW, C.interleave_tasks(bank)).isnan(),
                                   hit[None].repeat(3, 1)), (n, k)
    # 4,100 tasks: a word's run of tasks is looked up in blocks of 4,096
    m = torch.rand(4100, 3, 70) > 0.5
    bank, W = ss.pack_bits(m), ri(3, 70)
    g, x = ri(3, 3), ri(3, 70)
    assert torch.equal(C.mask_dot_rank1_batched(bank, g, x, W, C.interleave_tasks(bank)), ref.mask_dot_outer(bank, g, x, W))
    # 1,600 tasks with every row live: from 1,500 tasks the copy is read instead of the queries-in-lanes kernel
    m = torch.rand(1600, 6, 44) > 0.5
    bank, W = ss.pack_bits(m), ri(6, 44)
    g, x = ri(16, 6), ri(16, 44)
    g[g == 0] = 1
    assert torch.equal(C.mask_dot_rank1_batched(bank, g, x, W, C.interleave_tasks(bank)), ref.mask_dot_outer(bank, g, x, W))
    # float inputs: equal to float tolerance
    bank = ss.pack_bits(torch.rand(300, 20, 70) > 0.5)
    g, x, W = torch.randn(3, 20), torch.randn(3, 70), torch.randn(20, 70)
    assert torch.allclose(C.mask_dot_rank1_batched(bank, g, x, W, C.interleave_tasks(bank)), ref.mask_dot_outer(bank, g, x, W),
                          rtol=1e-4, atol=1e-3)
    # a copy of the wrong shape is refused
    for bad in (C.interleave_tasks(bank[:-16]), C.interleave_tasks(bank)[:, :-1], C.interleave_tasks(bank).float()):
        try:
            C.mask_dot_rank1_batched(bank, g, x, W, bad)
        except RuntimeError as e:
            assert "bank_t" in str(e), e
        else:
            raise AssertionError("accepted a bank_t that is not the bank's copy")
    print("ok")
""")


@needs_compiler
@pytest.mark.parametrize("isa", ISAS)
def test_interleaved_rank1_against_reference(isa):
    run_on_isa(SCRIPT, isa)


def test_mask_dot_outer_refuses_a_mismatched_copy():
    bank = ss.pack_bits(torch.rand(5, 3, 40) > 0.5)
    g, x, w = torch.randn(2, 3), torch.randn(2, 40), torch.randn(3, 40)
    good = ss.ops.interleave_tasks(bank)
    with pytest.raises(ValueError, match=r"bank_t must be interleave_tasks\(bank\), shape \(3, 2, 16\)"):
        ss.ops.mask_dot_outer(bank, g, x, w, good[:2])
    with pytest.raises(ValueError, match="bank_t"):
        ss.ops.mask_dot_outer(bank, g, x, w, ss.ops.interleave_tasks(torch.cat([bank] * 4)))
    with pytest.raises(TypeError, match="bank_t"):
        ss.ops.mask_dot_outer(bank, g, x, w, good.float())


def test_mask_bank_keeps_its_copy_until_the_bank_changes():
    """MaskBank.interleaved() is rebuilt after every kind of change to the bank, and only then."""
    torch.manual_seed(0)
    bank = MaskBank(3, 40)
    words = lambda m: torch.randint(-2**31, 2**31 - 1, (m, 3, 2), dtype=torch.int32)
    bank.append(words(2))
    first = bank.interleaved()
    assert bank.interleaved() is first
    assert torch.equal(first, ss.ops.interleave_tasks(bank.words))
    changes = [lambda: bank.append(words(1)),  # grows within capacity, then by reallocation
               lambda: bank.append(words(9)),
               lambda: bank.set_row(1, words(1)[0]),
               lambda: bank.words[0].zero_(),  # in place, through the public view
               lambda: bank.truncate(5)]
    for change in changes:
        before = bank.interleaved()
        change()
        after = bank.interleaved()
        assert after is not before
        assert torch.equal(after, ss.ops.interleave_tasks(bank.words))
        assert bank.interleaved() is after
    bank.drop_interleaved()
    assert torch.equal(bank.interleaved(), ss.ops.interleave_tasks(bank.words))
    # nothing carries a copy along: a move, a deep copy, or a bank that may not keep one
    bank.to(torch.device("cpu"))
    assert bank._interleaved is None
    bank.interleaved()
    assert copy.deepcopy(bank)._interleaved is None and bank._interleaved is not None
    bank.keep_interleaved = False
    assert bank._interleaved is None


@needs_compiler
def test_one_image_task_inference_reads_the_copy_and_matches_the_reference():
    """On the cpu backend one image through an MLP goes the batched way over the interleaved copies;
    its α-gradient equals the reference backend's superposed one, and the copies are kept."""
    from supsup_fast import nn as snn
    from supsup_fast.algorithms.inference import alpha_gradient, infer_oneshot
    from supsup_fast.bench import random_model_with_masks
    model = random_model_with_masks("lenet", 20, 41, seed=5)
    x = torch.randn(1, 784)
    with ss.use_backend("reference"):
        exp = alpha_gradient(model, x, "entropy", 10)
        exp_task = infer_oneshot(model, x)
    layers = list(snn.supermask_layers(model).values())
    with ss.use_backend("cpu"):
        got = alpha_gradient(model, x, "entropy", 10)
        copies = [l.bank.interleaved() for l in layers]
        again = alpha_gradient(model, x, "entropy", 10)
        assert infer_oneshot(model, x) == exp_task
    torch.testing.assert_close(got, exp, rtol=1e-3, atol=1e-6)
    assert torch.equal(again, got)
    assert all(l.bank.interleaved() is c for l, c in zip(layers, copies))
    # a bank that may not keep the copy (a sharded one, split to save memory) is read in place
    for layer in layers:
        layer.bank.drop_interleaved()
        layer.bank.keep_interleaved = False
    with ss.use_backend("cpu"):
        torch.testing.assert_close(alpha_gradient(model, x, "entropy", 10), exp, rtol=1e-3, atol=1e-6)
    assert all(layer.bank._interleaved is None for layer in layers)
