import pytest
import torch

import supsup_fast as ss
from supsup_fast.bits import num_words, pack_bits_torch, unpack_bits_torch
from tests.ops.isa_runner import needs_compiler


@pytest.mark.parametrize("n", [1, 31, 32, 33, 64, 784, 1000])
def test_roundtrip_odd_sizes(n):
    mask = torch.rand(3, 5, n) > 0.5
    words = ss.pack_bits(mask)
    assert words.dtype == torch.int32
    assert words.shape == (3, 5, num_words(n))
    assert torch.equal(ss.unpack_bits(words, n), mask)


def test_canonical_layout_lsb_first_and_zero_pad():
    n = 40
    mask = torch.zeros(n, dtype=torch.bool)
    mask[[0, 3, 31, 32, 39]] = True
    words = ss.pack_bits(mask)
    assert words.tolist() == [1 | (1 << 3) | -(1 << 31), 1 | (1 << 7)]
    # pad bits (40..63) are zero
    assert (words[1] >> 8).item() == 0
    for j in range(n):
        assert bool((words[j // 32] >> (j % 32)) & 1) == bool(mask[j])


def test_all_ones_word_is_minus_one():
    assert ss.pack_bits(torch.ones(32, dtype=torch.bool)).item() == -1


def test_pack_accepts_float_01():
    m = (torch.rand(7, 70) > 0.3)
    assert torch.equal(ss.pack_bits(m.float()), ss.pack_bits(m))
    assert torch.equal(pack_bits_torch(m), ss.pack_bits(m))
    assert torch.equal(unpack_bits_torch(ss.pack_bits(m), 70), m)


def test_bad_inputs():
    with pytest.raises(TypeError, match="int32"):
        ss.unpack_bits(torch.zeros(3, dtype=torch.int64), 70)
    with pytest.raises(ValueError, match="ceil"):
        ss.unpack_bits(torch.zeros(2, dtype=torch.int32), 70)
    with pytest.raises(ValueError, match="n must be"):
        ss.unpack_bits(torch.zeros(2, dtype=torch.int32), 0)
    with pytest.raises(TypeError, match="mask"):
        ss.pack_bits([1, 0, 1])
    with pytest.raises(ValueError, match="holding nan"):
        ss.pack_bits(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match=r"mask must be bool or hold only 0 and 1, got a torch.float32 tensor holding -0.5"):
        ss.pack_bits(torch.tensor([[-0.5, 0.3, 1.0, 0.0]]))  # scores are not a mask
    assert torch.equal(ss.pack_bits(torch.tensor([1, 0, 1])), ss.pack_bits(torch.tensor([True, False, True])))
    assert torch.equal(ss.pack_bits(torch.tensor([1.0, 0.0, 1.0])), ss.pack_bits(torch.tensor([True, False, True])))


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu", marks=needs_compiler)])
def test_the_registered_ops_check_their_arguments(backend):
    """torch.ops.supsup.pack_bits / unpack_bits called directly (as torch.compile and opcheck do)
    refuse what the public functions refuse: the Triton kernel read past each row for words of the
    wrong width (the reference returned [R, 32] where the op's fake promised [R, n]) and took a
    non-bool mask's bytes as bits."""
    with ss.use_backend(backend):
        with pytest.raises(ValueError, match=r"ceil\(n/32\) = 4 words"):
            torch.ops.supsup.unpack_bits(torch.zeros(5, 1, dtype=torch.int32), 100)
        with pytest.raises(ValueError, match="n must be a non-negative int"):
            torch.ops.supsup.unpack_bits(torch.zeros(5, 0, dtype=torch.int32), -1)
        assert torch.ops.supsup.unpack_bits(torch.zeros(5, 0, dtype=torch.int32), 0).shape == (5, 0)
        for mask in (torch.tensor([[1, 0, 2]], dtype=torch.uint8), torch.tensor([[1, 0, 1]], dtype=torch.int32)):
            with pytest.raises(ValueError, match="mask must be a bool tensor"):
                torch.ops.supsup.pack_bits(mask)
        words = torch.ops.supsup.pack_bits(torch.tensor([[True, False, True]]))
        assert torch.equal(torch.ops.supsup.unpack_bits(words, 3), torch.tensor([[True, False, True]]))
