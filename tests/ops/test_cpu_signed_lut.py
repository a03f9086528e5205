"""The table-lookup kernel of signed-constant layers at 1-4 rows of x (csrc/cpu/signed_lut.cpp) against
the reference, on every ISA: rows and words cut anywhere in the vector's lane blocks, chunks split
across threads, the direct kernel past 4 rows (or the lookups up to 16 rows when asked to), and IEEE
results for non-finite inputs (on the float small-batch kernel too)."""
import textwrap

import pytest

from tests.ops.isa_runner import ISAS, SCRIPT_HEAD, needs_compiler, run_on_isa

SCRIPT = SCRIPT_HEAD + textwrap.dedent("""
    import os
    from supsup_fast.ops.backends.cpu import cpu_isa
    lut_rows = 0 if cpu_isa() == "scalar" else int(os.environ.get("SUPSUP_CPU_SIGNED_LUT", "4"))
    assert C.signed_lut_max_rows() == lut_rows
    # R and n across blocks of 16 (AVX-512) and 8 (AVX2) rows and words; 600 x 1000 splits into chunks
    for R, n in ((1, 1), (7, 33), (17, 70), (40, 300), (129, 1000), (600, 1000)):
        m, s = torch.rand(R, n) > 0.5, torch.rand(R, n) > 0.5
        mw, sw = ss.pack_bits(m), ss.pack_bits(s)
        sign = 2 * s.double() - 1
        for B in (1, 2, 3, 4, 5) if lut_rows <= 4 else (5, 7, 8, 16):
            x, b = ri(B, n), ri(R)
            # scale 0.5 on small integers: every sum exact, on either kernel
            got = C.signed_masked_linear_small(x, sw, mw, 0.5, b)
            assert torch.equal(got, (x.double() @ (0.5 * sign * m).T + b.double()).float()), (R, n, B)
            assert torch.equal(C.signed_masked_linear_small(x, sw, mw, 0.5, None), (x.double() @ (0.5 * sign * m).T).float())
            scale = torch.tensor(0.3).item()  # the float the op computes with
            xr = torch.randn(B, n)
            want = (xr.double() @ (scale * sign * m).T).float()
            assert torch.allclose(C.signed_masked_linear_small(xr, sw, mw, 0.3, None), want, rtol=1e-5, atol=1e-4), (R, n, B)
        # one row of x as a vector
        x = ri(n)
        assert torch.equal(C.signed_masked_linear_small(x, sw, mw, 0.5, None), (x.double() @ (0.5 * sign * m).T).float())
    # a non-finite input: IEEE as the reference (0 times inf is NaN where a bit is clear)
    m, s = torch.rand(20, 70) > 0.5, torch.rand(20, 70) > 0.5
    mw, sw = ss.pack_bits(m), ss.pack_bits(s)
    m[:, 3] = False
    mw = ss.pack_bits(m)
    for bad in (float("inf"), float("nan")):
        x = ri(2, 70)
        x[0, 3] = bad
        want = torch.nn.functional.linear(x, 0.5 * (2 * s.float() - 1) * m)
        got = C.signed_masked_linear_small(x, sw, mw, 0.5, None)
        assert torch.isnan(got[0]).all() and torch.equal(got[1], want[1]), bad
        # the float kernel of masked_linear alike
        w = ri(20, 70)
        got = C.masked_linear_small(x, w, mw, None)
        assert torch.isnan(got[0]).all() and torch.equal(got[1], torch.nn.functional.linear(x[1:], w * m)[0]), bad
    print("ok")
""")


@needs_compiler
@pytest.mark.parametrize("isa", ISAS)
def test_signed_lut_against_reference(isa):
    run_on_isa(SCRIPT, isa)


@needs_compiler
@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_signed_lut_past_four_rows_in_passes_of_four(isa):
    """SUPSUP_CPU_SIGNED_LUT=16: 5-16 rows of x through the lookups too, four rows a pass."""
    run_on_isa(SCRIPT, isa, {"SUPSUP_CPU_SIGNED_LUT": "16"})
