"""The weight-interleaved bank copy (ops.interleave_weights) and the superpose kernel that reads it
(csrc/cpu/lut_interleaved.cpp superpose_interleaved), against the reference backend on every
instruction-set level this CPU has."""
import textwrap

import pytest

from tests.ops.isa_runner import ISAS, SCRIPT_HEAD, needs_compiler, run_on_isa_with_setting

SCRIPT = SCRIPT_HEAD + textwrap.dedent("""
    import math
    # the copy: bit i of word (q, c) is column c's bit of task 32q + i; zero past k and past n, whatever the pad bits
    for shape, n in (((0, 3, 1), 20), ((1, 1, 1), 1), ((31, 4, 2), 40), ((32, 2, 1), 32), ((33, 2, 3, 4), 100),
                     ((70, 5, 25), 784), ((250, 3, 1), 17)):
        bank = torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32)  # random words: pad bits set too
        got = C.interleave_weights(bank, n)
        assert torch.equal(got, ref.interleave_weights(bank, n)), (shape, n)
        k = shape[0]
        assert got.shape == (*shape[1:-1], -k // 32 * -1, -n // 16 * -16), got.shape
        rows = math.prod(shape[1:-1])
        m = ss.unpack_bits(bank, n).reshape(k, rows, n)  # [k, rows, n]
        words = got.reshape(rows, got.shape[-2], got.shape[-1])
        for t in (0, k // 2, k - 1) if k else ():
            assert torch.equal((words[:, t // 32, :n] >> (t % 32)) & 1, m[t].int()), (shape, n, t)
        assert not words[..., n:].any() and (k % 32 == 0 or not (words[:, -1] >> (k % 32)).any()), (shape, n)
    # superpose read from the copy: small integers, every partial sum exact in fp32, so equal to the
    # reference exactly. The last word's tasks are looked up only as far as needed where that saves enough:
    # k = 33 and 100 leave 1 and 4 tasks in it (one 5-bit or 3-bit group), 250 leaves 26, 64 a full word.
    for k in (1, 17, 33, 64, 100, 250):
        for lead, n in (((3,), 1), ((7,), 40), ((2, 3), 100), ((61,), 784), ((4,), 1030)):
            bank = ss.pack_bits(torch.rand(k, *lead, n) > 0.5)
            dirty = bank.clone()
            if n % 32:
                dirty[..., -1] |= -(1 << (n % 32))
            alpha = ri(k)
            got = C.superpose_interleaved(C.interleave_weights(dirty, n), k, alpha, n)
            assert got.shape == (*lead, n)
            assert torch.equal(got, ref.superpose(bank, alpha, n)), (k, lead, n)
    # random floats: the same sums up to summation order
    bank = ss.pack_bits(torch.rand(300, 37, 200) > 0.5)
    alpha = torch.randn(300)
    torch.testing.assert_close(C.superpose_interleaved(C.interleave_weights(bank, 200), 300, alpha, 200),
                               ref.superpose(bank, alpha, 200), rtol=1e-5, atol=1e-4)
    # no task, a copy of the wrong shape
    assert not C.superpose_interleaved(C.interleave_weights(bank[:0], 200), 0, alpha[:0], 200).any()
    for bad in (C.interleave_weights(bank[:40], 200), C.interleave_weights(bank, 200)[:, :, :64].contiguous()):
        refused(lambda: C.superpose_interleaved(bad, 300, alpha, 200), "bank_w must be the weight-interleaved copy")
    print("ok")
""")


@needs_compiler
@pytest.mark.parametrize("prefetch", ["0", "1"])
@pytest.mark.parametrize("isa", ISAS)
def test_weight_copy_and_superpose_against_reference(isa, prefetch):
    run_on_isa_with_setting(SCRIPT, isa, "prefetch", prefetch)


@needs_compiler
@pytest.mark.parametrize("shift_indices", ["0", "1"])
def test_weight_copy_superpose_avx2_index_forms(shift_indices):
    """superpose over the weight copy with either way the AVX2 loop forms its indices."""
    run_on_isa_with_setting(SCRIPT, "avx2", "shift_indices", shift_indices)
