"""superpose in task blocks (csrc/cpu/bank.cpp) against the reference backend on every ISA level
of this CPU: k across several blocks, odd sizes, active subsets, exact integer counts."""
import shutil
import textwrap

import pytest

from tests.ops.isa_runner import ISAS, run_on_isa

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="no C++ compiler on this machine: the cpu backend cannot be built")

SCRIPT = textwrap.dedent("""
    import torch, supsup_fast as ss
    from supsup_fast.ops.backends.cpu import cpu_isa
    from supsup_fast.ops.backends.reference import ReferenceBackend
    torch.manual_seed(0)
    ref = ReferenceBackend(); C = torch.ops.supsup_cpu
    print(cpu_isa())
    for n in (1, 33, 784, 1000):
        for k in (1, 63, 64, 65, 200):
            bank = ss.pack_bits(torch.rand(k, 5, n) > 0.5)
            ones = torch.ones(k)
            assert torch.equal(C.superpose(bank, ones, n), ref.superpose(bank, ones, n)), (n, k)
            a = torch.rand(k)
            assert torch.allclose(C.superpose(bank, a, n), ref.superpose(bank, a, n), rtol=1e-5, atol=1e-4), (n, k)
            act = torch.randperm(k)[: max(1, (2 * k) // 3)]
            got = C.superpose(bank, torch.ones(act.numel()), n, act)
            assert torch.equal(got, ref.superpose(bank[act], torch.ones(act.numel()), n)), (n, k)
            if n % 32:  # set pad bits are ignored, and nothing is written past a row
                dirty = bank.clone(); dirty[..., -1] |= -(1 << (n % 32))
                assert torch.equal(C.superpose(dirty, ones, n), ref.superpose(bank, ones, n))
    print("ok")
""")


@pytest.mark.parametrize("isa", ISAS)
def test_blocked_superpose_against_reference(isa):
    run_on_isa(SCRIPT, isa)
