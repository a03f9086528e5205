"""superpose in task blocks (csrc/cpu/bank.cpp) and by table lookups over bit transposes
(csrc/cpu/superpose_lut.cpp, from 24 tasks on AVX2 and on AVX-512 with GFNI; the scalar ISA's
portable byte tables over 32-task transposes from 8 tasks, bank.cpp) against the reference backend on
every ISA level of this CPU: k across several blocks and the table kernels' thresholds, odd sizes, rows
long enough to span several of its stream blocks, active subsets, exact integer counts."""
import textwrap

import pytest

from tests.ops.isa_runner import ISAS, SCRIPT_HEAD, cpu_has_gfni_vbmi, needs_compiler, run_on_isa

pytestmark = needs_compiler

SCRIPT = SCRIPT_HEAD + textwrap.dedent("""
    for n, R in ((1, 5), (33, 5), (784, 5), (1000, 5), (4099, 7), (1000, 400), (63, 700)):
        for k in ((1, 7, 8, 23, 24, 63, 64, 65, 200) if R == 5 else (17, 40)):
            bank = ss.pack_bits(torch.rand(k, R, n) > 0.5)
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


def test_avx512_superpose_without_gfni_against_reference():
    """The AVX-512 masked-add kernel, which CPUs without GFNI (Skylake-X, Cascade Lake) run."""
    if not cpu_has_gfni_vbmi():
        pytest.skip("this CPU has no GFNI: the plain AVX-512 superpose already runs in the avx512 case")
    run_on_isa(SCRIPT, "avx512", {"SUPSUP_CPU_GFNI": "0"})
