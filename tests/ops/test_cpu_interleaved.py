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

from tests.ops.isa_runner import ISAS, SCRIPT_HEAD, needs_compiler, run_on_isa_with_setting

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
    # the copy of the transposed masks (transpose_masks: pad bits dropped, rows past R zero) read with
    # x and g swapped and w transposed, and the plain copy read alone: the same sums, exactly
    for n, R in ((1, 37), (33, 5), (44, 29), (100, 64), (70, 33), (5, 100)):
        for k in (1, 17, 40):
            m = torch.rand(k, R, n) > 0.5
            bank, W = ss.pack_bits(m), ri(R, n)
            dirty = bank.clone()
            if n % 32:
                dirty[..., -1] |= -(1 << (n % 32))
            tb = C.transpose_masks(dirty, n)
            assert torch.equal(tb, ss.pack_bits(m.transpose(1, 2).contiguous())), (n, R, k)
            assert torch.equal(tb, ref.transpose_masks(dirty, n)), (n, R, k)
            tc, Wt = C.interleave_tasks(tb), W.t().contiguous()
            for q in (1, 5):
                g, x = rank1_queries(q, R, n)
                x[:, ::3] = 0  # dead inputs: the rows of the transposed copy that are skipped
                exp = ref.mask_dot_outer(bank, g, x, W)
                assert torch.equal(C.mask_dot_rank1_interleaved(tc, k, x, g, Wt), exp), (n, R, k, q)
                assert torch.equal(C.mask_dot_rank1_interleaved(C.interleave_tasks(dirty), k, g, x, W), exp), (n, R, k, q)
    # a whole ReLU MLP's backward in one call, layers in either orientation: the sums of the reference
    # layer by layer, with g passed down through the backward weights and the ReLU
    sizes, k, q = (45, 37, 33, 20), 23, 4
    banks = [ss.pack_bits(torch.rand(k, o, i) > 0.5) for i, o in zip(sizes[:-1], sizes[1:])]
    Ws = [ri(o, i) for i, o in zip(sizes[:-1], sizes[1:])]
    Us = [ri(o, i) for i, o in zip(sizes[:-1], sizes[1:])]
    hs = [ri(q, i).clamp(min=0) for i in sizes[:-1]]
    g = ri(q, sizes[-1])
    exp, gi = torch.zeros(q, k), g
    for i in reversed(range(3)):
        exp += ref.mask_dot_outer(banks[i], gi, hs[i], Ws[i])
        gi = (gi @ Us[i]) * (hs[i] > 0)
    for tr in ([False] * 3, [True] * 3, [True, False, True]):
        copies = [C.interleave_tasks(C.transpose_masks(b, sizes[i]) if t else b) for i, (b, t) in enumerate(zip(banks, tr))]
        kw = [w.t().contiguous() if t else w for w, t in zip(Ws, tr)]
        out, ok = C.mlp_mask_dot_outer(banks, copies, tr, kw, Us, hs, g)
        assert ok and torch.equal(out, exp), tr
    # products that may overflow: no result, the caller goes the reference way
    out, ok = C.mlp_mask_dot_outer(banks, copies, tr, [w * 1e30 for w in kw], Us, hs, g * 1e10)
    assert not ok and out.numel() == 0
    # float inputs: equal to float tolerance
    bank = ss.pack_bits(torch.rand(300, 20, 70) > 0.5)
    g, x, W = torch.randn(3, 20), torch.randn(3, 70), torch.randn(20, 70)
    assert torch.allclose(C.mask_dot_rank1_batched(bank, g, x, W, C.interleave_tasks(bank)), ref.mask_dot_outer(bank, g, x, W),
                          rtol=1e-4, atol=1e-3)
    # a copy of the wrong shape is refused
    for bad in (C.interleave_tasks(bank[:-16]), C.interleave_tasks(bank)[:, :-1], C.interleave_tasks(bank).float()):
        refused(lambda: C.mask_dot_rank1_batched(bank, g, x, W, bad), "bank_t")
    print("ok")
""")


@needs_compiler
@pytest.mark.parametrize("prefetch", ["0", "1"])
@pytest.mark.parametrize("isa", ISAS)
def test_interleaved_rank1_against_reference(isa, prefetch):
    run_on_isa_with_setting(SCRIPT, isa, "prefetch", prefetch)


@needs_compiler
@pytest.mark.parametrize("prefetch_l2", ["0", "1"])
@pytest.mark.parametrize("isa", ["avx512", "avx2"])  # the scalar loop does not prefetch
def test_interleaved_rank1_prefetch_into_l1_or_l2(isa, prefetch_l2):
    """The streams prefetching into L2 (Intel's default) or L1 (elsewhere) read the same bits."""
    run_on_isa_with_setting(SCRIPT, isa, "prefetch_l2", prefetch_l2, extra_env={"SUPSUP_CPU_PREFETCH": "1"})


@needs_compiler
@pytest.mark.parametrize("shift_indices", ["0", "1"])
def test_interleaved_rank1_avx2_index_forms(shift_indices):
    """The AVX2 loop's two ways to form its 3-bit indices (shifts on Intel, multiply-highs elsewhere)."""
    run_on_isa_with_setting(SCRIPT, "avx2", "shift_indices", shift_indices)


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
    assert bank.kept_interleaved() == (None, None)
    bank.interleaved()
    assert copy.deepcopy(bank).kept_interleaved() == (None, None) and bank.kept_interleaved()[0] is not None
    bank.keep_interleaved = False
    assert bank.kept_interleaved() == (None, None)


def test_mask_bank_keeps_both_orientations_and_frees_a_stale_one():
    """interleaved(transposed=True) is the copy of the transposed masks, kept beside the plain one;
    building either after a change frees the other's stale copy."""
    torch.manual_seed(1)
    bank = MaskBank(37, 45)
    bank.append(ss.pack_bits(torch.rand(19, 37, 45) > 0.5))
    plain, trans = bank.interleaved(), bank.interleaved(transposed=True)
    assert torch.equal(trans, ss.ops.interleave_tasks(ss.ops.transpose_masks(bank.words, 45)))
    assert trans.shape == (45, 2, 32) and bank.kept_interleaved() == (plain, trans)
    bank.words[3].zero_()  # in place, through the public view: both copies stale
    assert bank.kept_interleaved() == (None, None)
    rebuilt = bank.interleaved(transposed=True)
    assert torch.equal(rebuilt, ss.ops.interleave_tasks(ss.ops.transpose_masks(bank.words, 45)))
    assert bank._interleaved[0] is None  # the stale plain copy was freed, not kept beside the new one
    bank.append(ss.pack_bits(torch.rand(37, 45) > 0.5))
    assert bank._interleaved == (None, None, None)


@needs_compiler
def test_transpose_masks_on_every_backend_and_its_refusals():
    torch.manual_seed(2)
    m = torch.rand(2, 3, 37, 70) > 0.5  # leading dimensions, rows and columns not multiples of 32
    words = ss.pack_bits(m)
    exp = ss.pack_bits(m.transpose(-1, -2).contiguous())
    for backend in ("reference", "cpu"):
        with ss.use_backend(backend):
            assert torch.equal(ss.ops.transpose_masks(words, 70), exp), backend
            assert ss.ops.transpose_masks(words[:, :, :0], 70).shape == (2, 3, 70, 0)
    with pytest.raises(ValueError, match=r"words must be \[\*, R, ceil\(n/32\)\] = \[\*, R, 3\] for n = 70"):
        ss.ops.transpose_masks(words[..., :1], 70)
    with pytest.raises(ValueError, match="n must be a positive int"):
        ss.ops.transpose_masks(words, 0)
    with pytest.raises(TypeError, match="int32"):
        ss.ops.transpose_masks(words.long(), 70)


@needs_compiler
def test_mask_dot_outer_interleaved_matches_mask_dot_outer_and_refuses_a_mismatch():
    """Read from a copy alone, plain or of the transposed masks (x and g swapped), the α-gradients
    equal mask_dot_outer's; not finite products go the reference way (0 · inf = NaN)."""
    torch.manual_seed(3)
    k, R, n = 21, 30, 50
    bank = ss.pack_bits(torch.rand(k, R, n) > 0.5)
    g, x, w = torch.randn(3, R), torch.randn(3, n), torch.randn(R, n)
    g[:, ::2] = 0
    x[:, 1::3] = 0
    with ss.use_backend("reference"):
        exp = ss.ops.mask_dot_outer(bank, g, x, w)
    plain, trans = ss.ops.interleave_tasks(bank), ss.ops.interleave_tasks(ss.ops.transpose_masks(bank, n))
    for backend in ("reference", "cpu"):
        with ss.use_backend(backend):
            torch.testing.assert_close(ss.ops.mask_dot_outer_interleaved(plain, k, g, x, w), exp)
            torch.testing.assert_close(ss.ops.mask_dot_outer_interleaved(trans, k, x, g, w.t().contiguous()), exp)
            assert ss.ops.mask_dot_outer_interleaved(plain[..., :0], 0, g, x, w).shape == (3, 0)
    xi = x.clone()
    xi[0, 0] = float("inf")
    with ss.use_backend("reference"):
        exp_inf = ss.ops.mask_dot_outer(bank, g, xi, w)
    assert exp_inf.isnan().any()
    torch.testing.assert_close(ss.ops.mask_dot_outer_interleaved(plain, k, g, xi, w), exp_inf, equal_nan=True)
    with pytest.raises(ValueError, match=r"bank_t must be interleave_tasks of a \[21, 30, 2\] bank .* shape \(30, 2, 32\)"):
        ss.ops.mask_dot_outer_interleaved(plain[:, :1], k, g, x, w)
    with pytest.raises(ValueError, match="bank_t"):
        ss.ops.mask_dot_outer_interleaved(trans, k, g, x, w)  # the transposed copy read the plain way
    with pytest.raises(ValueError, match="k .* must be an int >= 0"):
        ss.ops.mask_dot_outer_interleaved(plain, -1, g, x, w)


def _mlp_case(seed=4, k=19, sizes=(40, 33, 20, 17), q=3):
    torch.manual_seed(seed)
    layers = list(zip(sizes[:-1], sizes[1:]))
    banks = [ss.pack_bits(torch.rand(k, o, i) > 0.5) for i, o in layers]
    ws = [torch.randn(o, i) for i, o in layers]
    us = [torch.randn(o, i) for i, o in layers]
    hs = [torch.randn(q, i).relu() for i, _ in layers]
    return banks, ws, us, hs, torch.randn(q, sizes[-1])


@needs_compiler
def test_mlp_mask_dot_outer_equals_the_op_by_op_sums():
    """One call for an MLP's backward gives exactly the op-by-op sums on the cpu backend (the same
    kernels, added in the same order), and the reference's to float tolerance, in any orientation."""
    banks, ws, us, hs, g = _mlp_case()
    k = banks[0].shape[0]
    for tr in ([False, False, False], [True, True, True], [False, True, True]):
        copies = [ss.ops.interleave_tasks(ss.ops.transpose_masks(b, hs[i].shape[1]) if t else b)
                  for i, (b, t) in enumerate(zip(banks, tr))]
        kw = [w.t().contiguous() if t else w for w, t in zip(ws, tr)]
        op_by_op, gi = torch.zeros(g.shape[0], k), g
        for i in reversed(range(3)):
            op_by_op += (ss.ops.mask_dot_outer_interleaved(copies[i], k, hs[i], gi, kw[i]) if tr[i]
                         else ss.ops.mask_dot_outer(banks[i], gi, hs[i], ws[i], copies[i]))
            gi = (gi @ us[i]) * (hs[i] > 0)
        got = ss.ops.mlp_mask_dot_outer(banks, copies, tr, kw, us, hs, g)
        assert torch.equal(got, op_by_op), tr
        with ss.use_backend("cpu"):  # the one C++ call ran (it returns None where it cannot)
            assert torch.equal(ss.ops.backend_for(g.device).mlp_mask_dot_outer(banks, copies, tr, kw, us, hs, g), got), tr
        with ss.use_backend("reference"):
            torch.testing.assert_close(ss.ops.mlp_mask_dot_outer(banks, copies, tr, kw, us, hs, g), got, rtol=1e-4, atol=1e-5)
    # a product that may overflow: the reference way, NaN where the reference has it
    big = [w * 1e30 for w in kw]
    with ss.use_backend("reference"):
        exp = ss.ops.mlp_mask_dot_outer(banks, copies, tr, big, us, hs, g * 1e10)
    torch.testing.assert_close(ss.ops.mlp_mask_dot_outer(banks, copies, tr, big, us, hs, g * 1e10), exp, equal_nan=True)


@needs_compiler
def test_mlp_mask_dot_outer_names_what_is_wrong():
    banks, ws, us, hs, g = _mlp_case()
    copies = [ss.ops.interleave_tasks(b) for b in banks]
    tr = [False] * 3
    with pytest.raises(ValueError, match="one bank, copy, orientation, weight, backward weight and input per layer"):
        ss.ops.mlp_mask_dot_outer(banks, copies[:2], tr, ws, us, hs, g)
    with pytest.raises(ValueError, match=r"copies\[1\] must be interleave_tasks\(banks\[i\]\)"):
        ss.ops.mlp_mask_dot_outer(banks, [copies[0], copies[2], copies[2]], tr, ws, us, hs, g)
    with pytest.raises(ValueError, match=r"copies\[2\] must be interleave_tasks\(transpose_masks"):
        ss.ops.mlp_mask_dot_outer(banks, copies, [False, False, True], [ws[0], ws[1], ws[2].t().contiguous()], us, hs, g)
    with pytest.raises(ValueError, match=r"backward_weights\[1\]"):
        ss.ops.mlp_mask_dot_outer(banks, copies, tr, ws, [us[0], us[1].t(), us[2]], hs, g)
    with pytest.raises(ValueError, match=r"layer 2: weights\[2\] must be Wᵀ \[20, 17\] \(transposed\[2\] = True\), got \(17, 20\)"):
        ss.ops.mlp_mask_dot_outer(banks, [copies[0], copies[1], ss.ops.interleave_tasks(ss.ops.transpose_masks(banks[2], 20))],
                                  [False, False, True], ws, us, hs, g)
    with pytest.raises(ValueError, match=r"g must be \[q, 17\]"):
        ss.ops.mlp_mask_dot_outer(banks, copies, tr, ws, us, hs, g[:, :5])


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
    assert all(layer.bank.kept_interleaved() == (None, None) for layer in layers)
