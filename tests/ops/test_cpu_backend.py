"""The C++ CPU backend's own paths (ISA levels, batch-size regimes, raw kernels) against the reference
backend; the op contract on every backend is in test_contract.py."""
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import supsup_fast as ss
import supsup_fast.nn as snn
from supsup_fast.ops.registry import backend_for
from tests.ops.isa_runner import ISAS, SCRIPT_HEAD, run_on_isa, run_on_isa_with_setting

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="no C++ compiler on this machine: the cpu backend cannot be built")

SIZES = [1, 33, 784, 1000]


def test_cpu_backend_builds_and_is_auto_for_cpu():
    # On a GPU machine cuda/triton rank above cpu in available(); for CPU tensors auto still picks cpu.
    assert "cpu" in ss.backends.available()
    assert ss.backends.backend_for(torch.device("cpu")).name == "cpu"
    assert ss.backends.available().index("cpu") < ss.backends.available().index("reference")
    from supsup_fast.ops.backends.cpu import cpu_isa
    assert cpu_isa() in ("avx512", "avx2", "scalar")


def test_a_built_extension_loads_without_the_compile_notice():
    # The notice says a compile is under way: a process that loads the cached build stays quiet.
    from supsup_fast.ops.backends.cpu import load_cpu_extension
    how = load_cpu_extension()
    res = subprocess.run([sys.executable, "-c", "from supsup_fast.ops.backends.cpu import load_cpu_extension; "
                          "print(load_cpu_extension())"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip() == how, res.stderr
    assert "compiling" not in res.stderr


def both(fn):
    with ss.use_backend("reference"):
        ref = fn()
    with ss.use_backend("cpu"):
        got = fn()
    return got, ref


def test_active_task_lists():
    n = 100
    bank = ss.pack_bits(torch.rand(9, 4, n) > 0.5)
    active = torch.tensor([7, 2, 5])
    v, a = torch.randn(4, n), torch.rand(3)
    C = torch.ops.supsup_cpu
    with ss.use_backend("reference"):
        assert torch.allclose(C.mask_dot(bank, v, active), ss.ops.mask_dot(bank[active], v), rtol=1e-5, atol=1e-4)
        assert torch.allclose(C.superpose(bank, a, n, active), ss.ops.superpose(bank[active], a, n), atol=1e-6)
    with pytest.raises(RuntimeError, match="active task indices"):
        C.mask_dot(bank, v, torch.tensor([9]))
    none = torch.zeros(0, dtype=torch.long)  # an empty list selects no task (not all of them)
    assert C.mask_dot(bank, v, none).shape == (0,)
    assert torch.equal(C.superpose(bank, torch.zeros(0), n, none), torch.zeros(4, n))
    assert C.mask_dot_batched(bank, v[None], none).shape == (1, 0)
    words = bank[0]
    with pytest.raises(RuntimeError, match="bias must have shape"):
        C.masked_linear_small(torch.randn(2, n), torch.randn(4, n), words, torch.randn(3))
    with pytest.raises(ValueError, match="bias must have shape"):
        ss.ops.signed_masked_linear(torch.randn(2, n), words, words, 0.1, torch.randn(3))
    with pytest.raises(RuntimeError, match="at most 16 rows"):
        C.masked_linear_small(torch.randn(17, n), torch.randn(4, n), words)


@pytest.mark.parametrize("batch", [0, 3, 40])
def test_masked_linear_odd_layouts(batch):
    """Empty batches, 3-D inputs and a non-contiguous bias go through every path."""
    n = 70
    mask = torch.rand(12, n) > 0.5
    words, w = ss.pack_bits(mask), torch.randn(12, n)
    bias = torch.randn(12, 2)[:, 0]  # non-contiguous
    x = torch.randn(batch, 2, n)
    got, ref = both(lambda: ss.ops.masked_linear(x, w, words, bias))
    assert got.shape == (batch, 2, 12) and torch.allclose(got, ref, atol=1e-5)
    sw = ss.pack_bits(w > 0)
    got, ref = both(lambda: ss.ops.signed_masked_linear(x, sw, words, 0.5, bias))
    assert got.shape == (batch, 2, 12) and torch.allclose(got, ref, atol=1e-5)


def test_garbage_pad_bits_are_ignored():
    n = 40  # 24 pad bits in the second word
    mask = torch.rand(3, 2, n) > 0.5
    bank = ss.pack_bits(mask)
    dirty = bank.clone()
    dirty[..., -1] |= torch.tensor(-(1 << 31) | (0xFF << 20), dtype=torch.int32)
    C = torch.ops.supsup_cpu
    v = torch.randn(2, n)
    assert torch.allclose(C.mask_dot(dirty, v), C.mask_dot(bank, v))
    assert torch.equal(C.superpose(dirty, torch.ones(3), n), C.superpose(bank, torch.ones(3), n))
    w = torch.randn(2, n)
    assert torch.equal(C.masked_weight(w, dirty[0]), w * mask[0])


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("batch", [1, 2, 3, 9, 16, 17, 130])
def test_masked_linear(n, batch):
    mask = torch.rand(37, n) > 0.5
    words = ss.pack_bits(mask)
    w, x, b = torch.randn(37, n), torch.randn(batch, n), torch.randn(37)
    got, ref = both(lambda: ss.ops.masked_linear(x, w, words, b))
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert torch.allclose(got, F.linear(x, w * mask, b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rows,n,batch", [(64, 1024, 17), (70, 77, 25), (97, 513, 130), (300, 257, 256), (65, 1, 40),
                                          (64, 96, 12), (129, 1000, 9), (40, 784, 50), (70, 200, 600)])
@pytest.mark.parametrize("packed_limit", [1 << 20, 0])
def test_packed_masked_gemm(rows, n, batch, packed_limit, monkeypatch):
    """The packed masked GEMM (batches above 16, layers of 64+ outputs) and the small-batch kernel
    on tails of every tile size: rows not a multiple of 32, K not a multiple of 16 or of the 256-wide
    chunk (784 = 3 x 256 + 16, MNIST's width), x rows not a multiple of 12 or 6. Checked against
    float64. Above 16 rows, both large-batch paths whatever this CPU's row limit (gemm_batch, by
    vendor and ISA): the packed GEMM, and W ⊙ M materialised for BLAS."""
    monkeypatch.setattr(backend_for(torch.device("cpu")), "gemm_batch", packed_limit, raising=False)
    mask, signs = torch.rand(rows, n) > 0.5, torch.rand(rows, n) > 0.5
    w, x, b = torch.randn(rows, n), torch.randn(batch, n), torch.randn(rows)
    expect = F.linear(x.double(), (w * mask).double(), b.double()).float()
    got = ss.ops.masked_linear(x, w, ss.pack_bits(mask), b)
    assert torch.allclose(got, expect, rtol=1e-4, atol=1e-4)
    expect = F.linear(x.double(), 0.07 * (signs.double() * 2 - 1) * mask, b.double()).float()
    got = ss.ops.signed_masked_linear(x, ss.pack_bits(signs), ss.pack_bits(mask), 0.07, b)
    assert torch.allclose(got, expect, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rows,n", [(37, 45), (200, 700)])
def test_small_batch_ops_on_one_thread_or_split(rows, n):
    """The small-batch ops run a layer of up to 64 Ki weights on the calling thread and split a larger
    one across threads (rows, or columns for the input gradient: small_batch_grain). 37 x 45 runs
    whole; 200 x 700 splits in two row chunks and three column chunks. Both agree with float64 at
    batch 1 and 5."""
    C = torch.ops.supsup_cpu
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        mask, signs = torch.rand(rows, n) > 0.5, torch.rand(rows, n) > 0.5
        w, s, b = torch.randn(rows, n), torch.rand(rows, n), torch.randn(rows)
        words, sign_words = ss.pack_bits(mask), ss.pack_bits(signs)
        signed_w = 0.3 * (signs.double() * 2 - 1) * mask
        for batch in (1, 5):
            x, g = torch.randn(batch, n), torch.randn(batch, rows)
            expect = F.linear(x.double(), (w * mask).double(), b.double()).float()
            assert torch.allclose(C.masked_linear_small(x, w, words, b), expect, rtol=1e-4, atol=1e-4)
            expect = F.linear(x.double(), signed_w, b.double()).float()
            assert torch.allclose(C.signed_masked_linear_small(x, sign_words, words, 0.3, b), expect, rtol=1e-4, atol=1e-4)
            expect = F.linear(x.double(), (w * s).double(), b.double()).float()
            assert torch.allclose(C.scaled_linear_small(x, w, s, b), expect, rtol=1e-4, atol=1e-4)
            expect = (g.double() @ (w * s).double()).float()
            assert torch.allclose(C.scaled_linear_small_t(g, w, s), expect, rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(threads)


BATCH1_SCRIPT = SCRIPT_HEAD + textwrap.dedent("""
    # The batch-1 GEMV takes rows four at a time (AVX2) with a partial last word masked: every row count
    # 1..9 (tails of 1-3 rows), widths with and without a partial word, and a layer split across threads
    # (chunks that need not be multiples of 4), and the padding bits past n ignored. Small integers: every sum is exact in fp32.
    torch.set_num_threads(2)
    for R, n in [(r, m) for r in range(1, 10) for m in (1, 31, 32, 64, 77)] + [(203, 700), (130, 1024)]:
        mask = torch.rand(R, n) > 0.5
        w, x, b = ri(R, n), ri(1, n), ri(R)
        words = ss.pack_bits(mask)
        if n % 32:  # padding bits past n set: they must be ignored, never read as weights
            words[:, -1] |= -(1 << (n % 32))
        assert torch.equal(C.masked_linear_small(x, w, words, b), x @ (w * mask).T + b), (R, n)
        assert torch.equal(C.masked_linear_small(x, w, words), x @ (w * mask).T), (R, n)
    print("ok")
""")


@pytest.mark.parametrize("isa", ISAS)
def test_batch1_masked_gemv_row_tails_on_every_isa(isa):
    run_on_isa(BATCH1_SCRIPT, isa)


def test_direct_batch1_path_is_taken_only_where_it_may_be():
    """ss.ops.masked_linear runs its common inference call (float32 CPU, 1-16 rows, plain tensors, no
    autograd, the cpu backend in force) straight through the C++ op (csrc/cpu/python_module.cpp);
    every other call takes the general path, with the same result or the same named error."""
    from torch.testing._internal.logging_tensor import LoggingTensor
    from torch._subclasses.fake_tensor import FakeTensorMode
    from supsup_fast.ops.dispatch import direct_function

    def direct(x, w, words, b):
        f = direct_function("direct_masked_linear", x)
        return None if f is None else f(x, w, words, b)

    mask = torch.rand(20, 70) > 0.5
    w, b, words = torch.randn(20, 70), torch.randn(20), ss.pack_bits(mask)
    expect = lambda x: F.linear(x.double(), (w * mask).double(), b.double()).float()
    for x in (torch.randn(70), torch.randn(1, 70), torch.randn(16, 70)):
        got = direct(x, w, words, b)
        assert got is not None and got.shape == x.shape[:-1] + (20,)
        assert torch.allclose(got, expect(x), rtol=1e-4, atol=1e-4)
        assert torch.equal(ss.ops.masked_linear(x, w, words, b), got)
        assert torch.allclose(direct(x, w, words, None), got - b, rtol=1e-5, atol=1e-5)
    x = torch.randn(3, 70)
    assert torch.equal(direct(x, torch.nn.Parameter(w, requires_grad=False), words, b), direct(x, w, words, b))
    not_taken = {
        "17 rows": (torch.randn(17, 70), w, b),
        "no rows": (torch.randn(0, 70), w, b),
        "3-d x": (torch.randn(2, 3, 70), w, b),
        "float64": (x.double(), w.double(), b.double()),
        "x requires grad": (x.clone().requires_grad_(), w, b),
        "bias requires grad": (x, w, b.clone().requires_grad_()),
        "weight a Parameter that requires grad": (x, torch.nn.Parameter(w.clone()), b),
        "non-contiguous x (refused by the op)": (torch.randn(70, 3).t(), w, b),
        "weight of another width (refused by the op)": (x, torch.randn(20, 69), b),
    }
    for why, (xi, wi, bi) in not_taken.items():
        assert direct(xi, wi, words, bi) is None, why
        if wi.shape[1] == 70:
            got = ss.ops.masked_linear(xi, wi, words, bi)
            assert torch.allclose(got.double(), F.linear(xi.double(), (wi * mask).double(), bi.double()), rtol=1e-4, atol=1e-4), why
    assert direct_function("direct_masked_linear", x.to("meta")) is None
    f = direct_function("direct_masked_linear", x)
    assert f(x, w.to("meta"), words, b) is None  # a meta weight: not a plain CPU tensor
    assert f(x, LoggingTensor(w), words, b) is None  # a tensor subclass
    assert f(x, w, words, torch.randn(20, dtype=torch.complex64).conj()) is None  # conjugate bit set
    x_neg = torch._neg_view(x)  # a negative view: its memory holds -x_neg, so the kernel must not read it
    assert f(x_neg, w, words, b) is None
    assert torch.allclose(ss.ops.masked_linear(x_neg, w, words, b), expect(-x), rtol=1e-4, atol=1e-4)
    with FakeTensorMode():  # a dispatch mode in force
        assert f(x, w, words, b) is None
    with pytest.raises(TypeError, match="takes .x, weight, mask_words, bias."):
        f(x, w, words)
    with torch.no_grad():
        assert direct(x.clone().requires_grad_(), w, words, b) is not None
    with torch.inference_mode():
        got = direct(x, w, words, b)
        assert got is not None and got.is_inference() and torch.equal(got, direct(x, w, words, b))
    assert direct(torch.randn(3, 70).requires_grad_(False), w, words, b) is not None
    # under vmap the tensors are functorch wrappers: the general path, batched correctly
    xs = torch.randn(4, 3, 70)
    got = torch.vmap(lambda xi: ss.ops.masked_linear(xi, w, words, b))(xs)
    assert torch.allclose(got, torch.stack([expect(xi) for xi in xs]), rtol=1e-4, atol=1e-4)
    with ss.use_backend("reference"):
        assert direct(x, w, words, b) is None
    with torch.no_grad(), torch.profiler.profile() as prof:  # the direct call still shows in the profiler
        ss.ops.masked_linear(x, w, words, b)
    assert "supsup_cpu::masked_linear_small" in {e.name for e in prof.events()}
    with torch.no_grad():  # torch.jit.trace records only dispatched ops: the direct path stands aside
        traced = torch.jit.trace(lambda xi: ss.ops.masked_linear(xi, w, words, b), x, check_trace=False)
        x2 = torch.randn(3, 70)
        assert torch.allclose(traced(x2), expect(x2), rtol=1e-4, atol=1e-4)
        assert "supsup_cpu::masked_linear_small" in {n.kind() for n in traced.graph.nodes()}
    xg = x.clone().requires_grad_()
    ss.ops.masked_linear(xg, w, words, b).sum().backward()
    assert torch.allclose(xg.grad, (w * mask).sum(0).expand(3, 70), rtol=1e-4, atol=1e-5)
    # refused by the op: the general path names the argument
    with pytest.raises(ValueError, match="mask_words"):
        ss.ops.masked_linear(x, w, words[:, :2], b)
    with pytest.raises(ValueError, match="bias"):
        ss.ops.masked_linear(x, w, words, torch.randn(19))
    with pytest.raises((ValueError, TypeError), match="mask_words"):
        ss.ops.masked_linear(x, w, words.float(), b)


def test_direct_batch1_path_of_signed_constant_layers():
    """signed_masked_linear's small-batch inference runs the C++ op directly too; the op refuses words
    with bits set past x's features, so that call still raises the op's named error."""
    from supsup_fast.ops.dispatch import direct_function
    n, R = 70, 20
    mask, signs = torch.rand(R, n) > 0.5, torch.rand(R, n) > 0.5
    mw, sw, b = ss.pack_bits(mask), ss.pack_bits(signs), torch.randn(R)
    signed_w = 0.3 * (signs.double() * 2 - 1) * mask
    for x in (torch.randn(n), torch.randn(1, n), torch.randn(16, n), torch.randn(17, n)):
        expect = F.linear(x.double(), signed_w, b.double()).float()
        assert torch.allclose(ss.ops.signed_masked_linear(x, sw, mw, 0.3, b), expect, rtol=1e-4, atol=1e-5)
    x = torch.randn(2, n)
    f = direct_function("direct_signed_masked_linear", x)
    got = f(x, sw, mw, 0.3, b)
    assert got is not None and torch.allclose(got, F.linear(x.double(), signed_w, b.double()).float(), rtol=1e-4, atol=1e-5)
    assert f(x, sw, mw, 1, b) is None  # an int scale: the general path converts it
    assert torch.equal(ss.ops.signed_masked_linear(x, sw, mw, 1, b), ss.ops.signed_masked_linear(x, sw, mw, 1.0, b))
    assert f(x, sw, mw, 0.3, b.clone().requires_grad_()) is None
    with pytest.raises(TypeError, match="takes .x, sign_words, mask_words, scale, bias."):
        f(x, sw, mw, 0.3)
    with ss.use_backend("reference"):
        assert direct_function("direct_signed_masked_linear", x) is None
    # words built for 70 features, x with 65: bits set past bit 65
    with pytest.raises(ValueError, match="bits set past bit 65"):
        ss.ops.signed_masked_linear(torch.randn(1, 65), sw, mw, 0.3, b)
    with pytest.raises(RuntimeError, match="bits set past bit 65"):
        torch.ops.supsup_cpu.signed_masked_linear_small(torch.randn(1, 65), sw, mw, 0.3, b)
    with pytest.raises(ValueError, match="in_features"):
        ss.ops.signed_masked_linear(x, sw, mw, 0.3, b, in_features=69)
    xg = x.clone().requires_grad_()
    ss.ops.signed_masked_linear(xg, sw, mw, 0.3, b).sum().backward()
    assert torch.allclose(xg.grad.double(), signed_w.sum(0).expand(2, n), rtol=1e-4, atol=1e-5)
    layer = snn.SupermaskLinear(n, R)  # signed-constant by default: its one-task forward takes this path
    layer.append_packed(mw)
    layer.set_mode_task(0)
    with torch.no_grad():
        got = layer(x)
        with ss.use_backend("reference"):
            ref = layer(x)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_packed_gemm_takes_3d_and_non_contiguous_inputs():
    mask = torch.rand(70, 96) > 0.5
    w, b = torch.randn(96, 70).t(), torch.randn(70, 2)[:, 0]  # both non-contiguous
    x = torch.randn(3, 96, 7).transpose(1, 2)  # [3, 7, 96], 21 rows, non-contiguous
    expect = F.linear(x.double(), (w * mask).double(), b.double()).float()
    got = ss.ops.masked_linear(x, w, ss.pack_bits(mask), b)
    assert got.shape == (3, 7, 70) and torch.allclose(got, expect, rtol=1e-4, atol=1e-4)


def test_packed_gemm_checks_its_arguments():
    C = torch.ops.supsup_cpu
    b = torch.randn(70)  # no input features: an empty sum, the bias alone (never uninitialised memory)
    assert torch.equal(C.masked_linear_gemm(torch.randn(5, 0), torch.randn(70, 0), torch.zeros(70, 0, dtype=torch.int32), b),
                       b.expand(5, 70))
    assert torch.equal(C.masked_linear_gemm(torch.randn(5, 0), torch.randn(70, 0), torch.zeros(70, 0, dtype=torch.int32)),
                       torch.zeros(5, 70))
    with pytest.raises(RuntimeError, match="at least one input feature"):
        C.masked_linear_small(torch.randn(2, 0), torch.randn(4, 0), torch.zeros(4, 0, dtype=torch.int32))
    assert torch.equal(C.mask_dot_rows(torch.zeros(3, 4, 0, dtype=torch.int32), torch.randn(0), torch.randn(4, 0)),
                       torch.zeros(4, 3))
    words = ss.pack_bits(torch.rand(70, 40) > 0.5)
    with pytest.raises(RuntimeError, match="mask_words must be"):
        C.masked_linear_gemm(torch.randn(20, 40), torch.randn(70, 40), words[:, :1].contiguous())
    with pytest.raises(RuntimeError, match="bias must have shape"):
        C.masked_linear_gemm(torch.randn(20, 40), torch.randn(70, 40), words, torch.randn(3))
    with pytest.raises(RuntimeError, match="x must be"):
        C.masked_linear_gemm(torch.randn(20, 41), torch.randn(70, 40), words)
    with pytest.raises(RuntimeError, match="words per row"):
        C.signed_masked_linear_gemm(torch.randn(20, 70), words, words, 0.5)


def test_wgrad_step_refuses_a_masked_weight_sharing_memory():
    # masked_weight is the step's output (and, off AVX-512, where its weight gradient is formed): one
    # that shares memory with an input would overwrite it mid-step
    C = torch.ops.supsup_cpu
    dz, x = torch.randn(4, 6), torch.randn(4, 5)
    p, w, sq, out = torch.randn(6, 5), torch.randn(6, 5), torch.rand(6, 5), torch.empty(6, 5)
    p0, sq0 = p.clone(), sq.clone()
    for name, alias in (("weight", w), ("param", p), ("square_avg", sq)):
        with pytest.raises(RuntimeError, match=f"masked_weight must not share memory with {name}"):
            C.ste_rmsprop_wgrad_step_(dz, x, p, w, sq, alias, 1e-2, 0.9, 1e-8, 0.0)
    big = torch.randn(40)
    with pytest.raises(RuntimeError, match="masked_weight must not share memory with x"):
        C.ste_rmsprop_wgrad_step_(dz, big[:20].view(4, 5), p, w, sq, big[10:40].view(6, 5), 1e-2, 0.9, 1e-8, 0.0)
    assert torch.equal(p, p0) and torch.equal(sq, sq0)  # refused before anything was written
    C.ste_rmsprop_wgrad_step_(dz, x, p, w, sq, out, 1e-2, 0.9, 1e-8, 0.0)
    assert torch.equal(out, w * (p >= 0))


@pytest.mark.parametrize("batch", [1, 5, 16, 17, 300, 600])
def test_signed_masked_linear(batch):
    n = 333
    signs, mask = torch.rand(21, n) > 0.5, torch.rand(21, n) > 0.5
    x, b = torch.randn(batch, n), torch.randn(21)
    sw, mw = ss.pack_bits(signs), ss.pack_bits(mask)
    got, ref = both(lambda: ss.ops.signed_masked_linear(x, sw, mw, 0.07, b))
    expect = F.linear(x, 0.07 * (signs.float() * 2 - 1) * mask, b)
    assert torch.allclose(got, expect, rtol=1e-4, atol=1e-5) and torch.allclose(ref, expect, rtol=1e-4, atol=1e-5)


def test_signed_layer_path_matches_generic_and_has_grad():
    layer = snn.SupermaskLinear(100, 30, bias=True)
    snn.begin_task(layer)
    snn.finish_task(layer)
    snn.set_task(layer, 0)
    x = torch.randn(4, 100, requires_grad=True)
    y = layer(x)  # signed path (4 rows)
    big = torch.randn(40, 100)
    assert torch.allclose(layer(big), ss.ops.masked_linear(big, layer.weight, layer.bank.words[0], layer.bias), atol=1e-5)
    expect = ss.ops.masked_linear(x, layer.weight, layer.bank.words[0], layer.bias)
    assert torch.allclose(y, expect, atol=1e-5)
    (g,) = torch.autograd.grad(y.sum(), x)
    (g2,) = torch.autograd.grad(expect.sum(), x)
    assert torch.allclose(g, g2, atol=1e-5)


def test_superposed_and_conv_gradients_match_reference():
    k, out, n = 6, 20, 75
    bank = ss.pack_bits(torch.rand(k, out, n) > 0.5)
    w, xb = torch.randn(out, n), torch.randn(3, n)

    def run():
        x, a = xb.clone().requires_grad_(), torch.full((k,), 1 / k, requires_grad=True)
        y = ss.ops.superposed_linear(x, w, bank, a)
        gx, ga = torch.autograd.grad(y.square().sum(), (x, a))
        return torch.cat([y.flatten(), gx.flatten(), ga])
    got, ref = both(run)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4)
    cw, cx = torch.randn(8, 3, 3, 3), torch.randn(2, 3, 9, 9)
    cbank = ss.pack_bits(torch.rand(k, 8, 27) > 0.5)
    ca = torch.rand(k)

    def conv():
        x, a = cx.clone().requires_grad_(), ca.clone().requires_grad_()
        y = ss.ops.superposed_conv2d(x, cw, cbank, a, padding=1) + ss.ops.masked_conv2d(x, cw, cbank[2], stride=2).sum()
        gx, ga = torch.autograd.grad(y.square().sum(), (x, a))
        return torch.cat([y.flatten(), gx.flatten(), ga])
    got, ref = both(conv)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("k", [1, 3, 4, 17])
@pytest.mark.parametrize("n", [33, 784])
def test_one_image_alpha_gradient_rank1_path(k, n):
    """One image: the cpu backend forms v = (g xᵀ) ⊙ W inside mask_dot; same gradients as the reference."""
    bank = ss.pack_bits(torch.rand(k, 9, n) > 0.5)
    w, xb = torch.randn(9, n), torch.randn(1, n)

    def run():
        x, a = xb.clone().requires_grad_(), torch.full((k,), 1 / k, requires_grad=True)
        y = ss.ops.superposed_linear(x, w, bank, a)
        gx, ga = torch.autograd.grad(y.square().sum(), (x, a))
        return torch.cat([gx.flatten(), ga])
    got, ref = both(run)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4)
    C = torch.ops.supsup_cpu
    g, x = torch.randn(9), torch.randn(n)
    assert torch.allclose(C.mask_dot_rank1(bank, g, x, w), C.mask_dot(bank, torch.outer(g, x) * w), rtol=1e-4, atol=1e-4)


def test_float64_falls_back_to_reference():
    bank = ss.pack_bits(torch.rand(3, 4, 50) > 0.5)
    a = torch.rand(3, dtype=torch.float64)
    got, ref = both(lambda: ss.ops.superpose(bank, a, 50))
    assert got.dtype == torch.float64 and torch.equal(got, ref)


EVERY_ISA_SCRIPT = textwrap.dedent("""
        import torch, torch.nn.functional as F, supsup_fast as ss
        from supsup_fast.ops.backends.cpu import cpu_isa
        from supsup_fast.ops.backends.reference import ReferenceBackend
        ref = ReferenceBackend(); C = torch.ops.supsup_cpu
        print(cpu_isa())
        for n in (1, 33, 784, 1000):
            m = torch.rand(5, 7, n) > 0.5; w = ss.pack_bits(m)
            assert torch.equal(C.pack_bits(m), w) and torch.equal(C.unpack_bits(w, n), m)
            v, a = torch.randn(7, n), torch.rand(5)
            assert torch.allclose(C.mask_dot(w, v), ref.mask_dot(w, v), rtol=1e-4, atol=1e-3)
            assert torch.allclose(C.superpose(w, a, n), ref.superpose(w, a, n), atol=1e-5)
            W = torch.randn(7, n)
            assert torch.equal(C.masked_weight(W, w[0]), W * m[0])
            W2 = W.masked_fill(~m[0], float("inf"))  # a clear bit gives 0 whatever the weight (the AND / select)
            assert torch.equal(C.masked_weight(W2, w[0]), torch.where(m[0], W2, torch.zeros(())))
            for B in (1, 3, 16):
                x = torch.randn(B, n)
                assert torch.allclose(C.masked_linear_small(x, W, w[0]), x @ (W * m[0]).T, atol=1e-4, rtol=1e-4)
                s = ss.pack_bits(W > 0)
                expect = x @ (0.5 * (W > 0).float().mul(2).sub(1) * m[0]).T
                assert torch.allclose(C.signed_masked_linear_small(x, s, w[0], 0.5), expect, atol=1e-4, rtol=1e-4)
        # the packed GEMM: row/K/batch tails; K past one 2,048-wide chunk, rows past one block (AVX2: 24, AVX-512:
        # 32 at K >= 1,024), batches past one 128-row pass
        for R, n, B in ((70, 77, 25), (33, 300, 13), (1, 40, 200), (50, 2100, 140), (75, 1030, 20)):
            m, s = torch.rand(R, n) > 0.5, torch.rand(R, n) > 0.5
            W, x, b = torch.randn(R, n), torch.randn(B, n), torch.randn(R)
            expect = F.linear(x.double(), (W * m).double(), b.double()).float()
            assert torch.allclose(C.masked_linear_gemm(x, W, ss.pack_bits(m), b), expect, atol=1e-4, rtol=1e-4)
            expect = F.linear(x.double(), 0.5 * (s.double() * 2 - 1) * m, b.double()).float()
            got = C.signed_masked_linear_gemm(x, ss.pack_bits(s), ss.pack_bits(m), 0.5, b)
            assert torch.allclose(got, expect, atol=1e-4, rtol=1e-4)
        for n in (1, 8, 31, 32, 77, 96):  # whole words, and a last word cut at every kind of place
            sw, mw = ss.pack_bits(torch.rand(9, n) > 0.5), ss.pack_bits(torch.rand(9, n) > 0.5)
            su, mu = ss.unpack_bits(sw, n).float(), ss.unpack_bits(mw, n).float()
            if n % 32:  # set padding bits are ignored
                sw[:, -1] |= -(1 << (n % 32)); mw[:, -1] |= -(1 << (n % 32))
            buf = torch.full((9 * n + 8,), float("nan"))  # 8 sentinels past the end: no store beyond row 8's n
            out = buf[:9 * n].view(9, n)
            C.signed_masked_weight_into(sw, mw, 0.25, out)
            assert torch.equal(out, 0.25 * (2 * su - 1) * mu) and buf[9 * n:].isnan().all(), n
        sc, wt = torch.randn(1000 + 7), torch.randn(1000 + 7)
        assert torch.equal(C.threshold_masked_weight(sc, wt), wt * (sc >= 0))
        p, g, sq = torch.randn(1003), torch.randn(1003), torch.rand(1003)
        p2, sq2 = p.clone(), sq.clone()
        C.rmsprop_step_(p, g, sq, 1e-3, 0.99, 1e-8, 1e-4)
        g2 = g + 1e-4 * p2
        sq2 = sq2 * 0.99 + 0.01 * g2 * g2
        assert torch.allclose(sq, sq2, rtol=1e-5) and torch.allclose(p, p2 - 1e-3 * g2 / (sq2.sqrt() + 1e-8), rtol=1e-5, atol=1e-7)
        for B, O, I in ((128, 300, 784), (7, 13, 50), (1, 1, 1), (33, 9, 97), (5, 17, 48)):
            # the step with its weight gradient formed inside it (AVX-512: tile by tile, never stored):
            # the same as BLAS's dzᵀx then the step, on odd sizes, every tile tail included
            dz, xb, wt = torch.randn(B, O), torch.randn(B, I), torch.randn(O, I)
            p, sq = torch.randn(O, I), torch.rand(O, I)
            p2, sq2, out, out2 = p.clone(), sq.clone(), torch.full((O, I), float("nan")), torch.empty(O, I)
            C.ste_rmsprop_wgrad_step_(dz, xb, p, wt, sq, out, 1e-2, 0.9, 1e-8, 1e-3)
            C.ste_rmsprop_step_(p2, (dz.double().t() @ xb.double()).float(), wt, sq2, out2, 1e-2, 0.9, 1e-8, 1e-3)
            assert torch.allclose(sq, sq2, rtol=1e-4, atol=1e-5) and torch.allclose(p, p2, rtol=1e-5, atol=1e-5)
            assert torch.equal(out, wt * (p >= 0))
        for n in (1, 15, 17, 1003):  # the fused STE step: vector body and every tail length
            p, dw, wt, sq = torch.randn(n), torch.randn(n), torch.randn(n), torch.rand(n)
            out = torch.full((n,), float("nan"))
            p2, sq2 = p.clone(), sq.clone()
            C.ste_rmsprop_step_(p, dw, wt, sq, out, 1e-2, 0.9, 1e-8, 1e-3)
            g2 = dw * wt + 1e-3 * p2
            sq2 = sq2 * 0.9 + 0.1 * g2 * g2
            p2 = p2 - 1e-2 * g2 / (sq2.sqrt() + 1e-8)
            assert torch.allclose(sq, sq2, rtol=1e-5) and torch.allclose(p, p2, rtol=1e-5, atol=1e-7)
            assert torch.equal(out, wt * (p >= 0))
            p, m, v = torch.randn(n), 0.1 * torch.randn(n), torch.rand(n)
            p2, m2, v2 = p.clone(), m.clone(), v.clone()
            C.ste_adam_step_(p, dw, wt, m, v, out, 3, 1e-2, 0.9, 0.99, 1e-8, 1e-3)
            g2 = dw * wt + 1e-3 * p2
            m2 = m2 + 0.1 * (g2 - m2)
            v2 = v2 * 0.99 + 0.01 * g2 * g2
            p2 = p2 - (1e-2 / (1 - 0.9 ** 3)) * m2 / (v2.sqrt() / (1 - 0.99 ** 3) ** 0.5 + 1e-8)
            assert torch.allclose(m, m2, rtol=1e-5, atol=1e-7) and torch.allclose(v, v2, rtol=1e-5, atol=1e-7)
            assert torch.allclose(p, p2, rtol=1e-5, atol=1e-6) and torch.equal(out, wt * (p >= 0))
        print("ok")
""")


@pytest.mark.parametrize("isa", ISAS)
def test_every_isa_path_agrees(isa):
    """Every kernel under each instruction-set level (capped: a CPU without AVX-512 / AVX2)."""
    run_on_isa(EVERY_ISA_SCRIPT, isa)


PORTABLE_LAYERS_SCRIPT = """
import torch, torch.nn.functional as F, supsup_fast as ss
from supsup_fast.ops.backends.cpu import cpu_isa
from supsup_fast.ops.registry import backend_for
print(cpu_isa())
be = backend_for(torch.device("cpu"))
assert be.name == "cpu" and torch.ops.supsup_cpu.vendor() == "other" and not torch.ops.supsup_cpu.wide_gemm_tiles()
assert be.direct_masked_linear is None and be.direct_signed_masked_linear is None  # layers: W ⊙ M, then BLAS
for rows in (1, 16, 130):
    m, s = torch.rand(70, 77) > 0.5, torch.rand(70, 77) > 0.5
    w, x, b = torch.randn(70, 77), torch.randn(rows, 77), torch.randn(70)
    assert torch.allclose(ss.ops.masked_linear(x, w, ss.pack_bits(m), b), F.linear(x, w * m, b), atol=1e-5)
    expect = F.linear(x, 0.5 * (s.float() * 2 - 1) * m, b)
    assert torch.allclose(ss.ops.signed_masked_linear(x, ss.pack_bits(s), ss.pack_bits(m), 0.5, b), expect, atol=1e-5)
print("ok")
"""


def test_portable_build_compiles_and_agrees():
    """The extension as an ARM CPU builds it: SUPSUP_CPU_PORTABLE=1 compiles csrc/cpu with
    -DSUPSUP_PORTABLE, so no x86 intrinsic, target attribute or CPU builtin is compiled (SUPSUP_X86 is
    0). It reports the scalar ISA, every kernel agrees with the reference (the every-ISA script), and
    layers form W ⊙ M and run BLAS at every batch (no direct small-batch call). (That the sources also
    compile for aarch64 was checked with a cross compiler, which CI does not have.)"""
    run_on_isa(EVERY_ISA_SCRIPT, "scalar", {"SUPSUP_CPU_PORTABLE": "1"})
    run_on_isa(PORTABLE_LAYERS_SCRIPT, "scalar", {"SUPSUP_CPU_PORTABLE": "1"})


# The float and signed packed GEMMs against float64 on (rows R, inputs n, rows of x B), on one thread and two.
# Just before each call a block of y's size full of NaN is freed, which the allocator mostly hands out
# again as y (counted): the first K chunk must store y, not add to what was there.
GEMM_CHECK = """
import torch.nn.functional as F
def freed_nan_block(B, R):
    block = torch.full((B, R), float("nan"))
    return block.data_ptr()
def check_gemms(shapes):
    reused = 0
    for t in (1, 2):
        torch.set_num_threads(t)
        for R, n, B in shapes:
            m, s = torch.rand(R, n) > 0.5, torch.rand(R, n) > 0.5
            W, x, b = torch.randn(R, n), torch.randn(B, n), torch.randn(R)
            mw, sw = ss.pack_bits(m), ss.pack_bits(s)
            expect = F.linear(x.double(), (W * m).double(), b.double()).float()
            nan_at = freed_nan_block(B, R)
            got = C.masked_linear_gemm(x, W, mw, b)
            reused += got.data_ptr() == nan_at
            assert torch.allclose(got, expect, atol=1e-4, rtol=1e-4), (t, R, n, B)
            expect = F.linear(x.double(), 0.5 * (s.double() * 2 - 1) * m, b.double()).float()
            nan_at = freed_nan_block(B, R)
            got = C.signed_masked_linear_gemm(x, sw, mw, 0.5, b)
            reused += got.data_ptr() == nan_at
            assert torch.allclose(got, expect, atol=1e-4, rtol=1e-4), (t, R, n, B)
    assert reused >= len(shapes), f"y reused the freed NaN block in only {reused} of {4 * len(shapes)} calls"
"""

WIDE_TILE_SCRIPT = SCRIPT_HEAD + GEMM_CHECK + """
# 128+ rows of x and 256+ outputs a thread: the 64 x 6 tile where it is on. A last tile cut at 33-63
# and at 0 rows, x rows past one 128-row pass and not a multiple of 6, on one thread and split; from 512
# rows of x (where the tile is on) blocks of 512 KiB of panels, several tiles each and the last cut short
check_gemms(((300, 77, 131), (600, 1030, 135), (1024, 33, 128), (1100, 64, 260), (257, 5, 128), (700, 300, 515),
             (300, 784, 512)))
print("ok")
"""


@pytest.mark.parametrize("wide", ["0", "1"])
def test_packed_gemm_tiles_avx512(wide):
    """The AVX-512 packed GEMM with its 64 x 6 tile (and from 512 rows of x its larger blocks) forced on
    and off (SUPSUP_CPU_WIDE_TILES; on by default on Intel CPUs only), against float64 on the sizes that
    take it and on the tails of both tiles."""
    run_on_isa_with_setting(WIDE_TILE_SCRIPT, "avx512", "wide_gemm_tiles", wide)


CHUNK_SCRIPT = SCRIPT_HEAD + GEMM_CHECK + """
# K past 256 (even chunks in whole words: 300 -> 160 + 140, 1030 -> 4 x 224 + 134, 2100 past one
# 2,048-wide chunk), at 256 and below (one chunk), tiles of 24 rows whole and cut, 4 x rows and their tail
check_gemms(((48, 300, 33), (50, 1030, 18), (25, 257, 40), (24, 256, 17), (7, 2100, 21), (73, 33, 64)))
# the input gradient's GEMM (W as [K, R]) of the second layer chunks K = its 300 outputs (the first layer
# has no input gradient): the whole bits step against float64
B, dims = 20, (40, 64, 300, 7)
weights = [torch.randn(o, i) * (2.0 / i) ** 0.5 for i, o in zip(dims[:-1], dims[1:])]
params = [torch.randn(o, i) * 0.01 for i, o in zip(dims[:-1], dims[1:])]
sqs = [torch.rand(o, i) * 1e-3 for i, o in zip(dims[:-1], dims[1:])]
x, y = torch.randn(B, dims[0]), torch.randint(0, dims[-1], (B,))
words = [ss.pack_bits(p >= 0) for p in params]
p64, sq64, w64, words64 = [p.double() for p in params], [q.double() for q in sqs], [w.double() for w in weights], [m.clone() for m in words]
hyper = (1e-2, 0.9, 0.1, 1e-3)
loss = C.mlp_ste_rmsprop_bits_step_(x, y, weights, [None] * 3, [1.0] * 3, words, params, sqs, *hyper)
loss64 = ref.mlp_ste_rmsprop_bits_step_(x.double(), y, w64, [None] * 3, [1.0] * 3, words64, p64, sq64, *hyper)
assert abs(loss.item() - loss64.item()) <= 1e-5 * abs(loss64.item()) + 1e-6
for l in range(3):
    torch.testing.assert_close(params[l].double(), p64[l], rtol=1e-5, atol=1e-6)
print("ok")
"""


@pytest.mark.parametrize("short", ["0", "1"])
def test_packed_gemm_chunks_avx2(short):
    """The AVX2 packed GEMM with its K chunks of at most 256 forced on and off (SUPSUP_CPU_SHORT_CHUNKS;
    on by default on Intel CPUs only), y = x (W ⊙ M)ᵀ and the input gradient's y = g (W ⊙ M), against
    float64 on K past one chunk and within one, and on the tails of the 24 x 4 tile."""
    run_on_isa_with_setting(CHUNK_SCRIPT, "avx2", "short_gemm_chunks", short)


def test_signed_layer_sees_a_replaced_weight():
    """The layer's cached sign bits follow a new weight tensor, even one that reuses an old address."""
    layer = snn.SupermaskLinear(100, 30, bias=False)
    snn.begin_task(layer)
    snn.finish_task(layer)
    snn.set_task(layer, 0)
    x = torch.randn(2, 100)
    layer(x)  # fills the sign-bit cache
    layer.weight = torch.nn.Parameter(-layer.weight.detach().clone(), requires_grad=False)
    with torch.no_grad():
        assert torch.allclose(layer(x), ss.ops.masked_linear(x, layer.weight, layer.bank.words[0]), atol=1e-5)
        layer.bias = torch.nn.Parameter(torch.randn(30), requires_grad=False)  # a Parameter bias too
        assert torch.allclose(layer(x), ss.ops.masked_linear(x, layer.weight, layer.bank.words[0], layer.bias), atol=1e-5)
