"""bank_linear (every task's masked linear layer on one input at once) against float64 einsum on
every backend and every ISA level of the C++ kernels, and the superposed_linear route that uses it:
a first layer's output D α and α-gradient Dᵀg from one pass over the bits."""
import shutil
import textwrap

import pytest
import torch

import supsup_fast as ss
from supsup_fast.ops.backends.cpu import CpuBackend

from tests.devices import backend_devices, ids
from tests.ops.isa_runner import ISAS, SCRIPT_HEAD, run_on_isa, run_on_isa_with_setting

PAIRS = backend_devices()
needs_cxx = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                               reason="no C++ compiler on this machine: the cpu backend cannot be built")


def expected(x, w, masks):
    return torch.einsum("...n,trn->...rt", x.double(), (w * masks).double()).float()


@pytest.mark.parametrize("name,device", PAIRS, ids=ids(PAIRS))
@pytest.mark.parametrize("k,rows,n,lead", [(1, 3, 5, ()), (17, 33, 70, (1,)), (40, 10, 1000, (3,)), (250, 64, 784, ()),
                                           (16, 7, 32, (2, 2)), (33, 1, 1, (1,)), (5, 9, 45, (17,)), (20, 6, 100, (3, 7))])
def test_bank_linear_matches_einsum(name, device, k, rows, n, lead):
    g = torch.Generator().manual_seed(k * 1000 + n)
    masks = torch.rand(k, rows, n, generator=g) > 0.5
    w, x = torch.randn(rows, n, generator=g), torch.randn(*lead, n, generator=g)
    with ss.use_backend(name):
        got = ss.ops.bank_linear(x.to(device), w.to(device), ss.pack_bits(masks).to(device)).cpu()
    assert got.shape == (*lead, rows, k)
    assert torch.allclose(got, expected(x, w, masks), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,device", PAIRS, ids=ids(PAIRS))
@pytest.mark.parametrize("k,rows,n,lead", [(1, 3, 5, ()), (17, 33, 70, (1,)), (250, 64, 784, ()), (33, 1, 1, (3,))])
def test_bank_linear_given_the_task_copy_equals_without(name, device, k, rows, n, lead):
    """Exactly, on small integers; one row of x reads the copy on the cpu backend, three ignore it."""
    g = torch.Generator().manual_seed(k + n)
    bank = ss.pack_bits(torch.rand(k, rows, n, generator=g) > 0.5).to(device)
    w = torch.randint(-3, 4, (rows, n), generator=g).float().to(device)
    x = torch.randint(-3, 4, (*lead, n), generator=g).float().to(device)
    with ss.use_backend(name):
        got = ss.ops.bank_linear(x, w, bank, ss.ops.interleave_tasks(bank))
        assert torch.equal(got, ss.ops.bank_linear(x, w, bank))
    with pytest.raises(ValueError, match=r"bank_t must be interleave_tasks\(bank\)"):
        ss.ops.bank_linear(x, w, bank, ss.ops.interleave_tasks(torch.cat([bank, bank[:1].repeat(16, 1, 1)])))



@pytest.mark.parametrize("name,device", PAIRS, ids=ids(PAIRS))
def test_bank_linear_reads_the_copy_it_is_given_on_the_cpu_backend(name, device, monkeypatch):
    """Given another bank's copy, the cpu backend returns that bank's outputs, the others the given bank's:
    the equality test above cannot tell a copy ignored. (With the ops' copy check off, which refuses
    such a copy: tests/ops/test_bank_copy.py.)"""
    monkeypatch.setattr(ss.ops.registry._instance(name), "interleaved_copy_matches", None)
    g = torch.Generator().manual_seed(8)
    bank, other = (ss.pack_bits(torch.rand(20, 6, 70, generator=g) > 0.5).to(device) for _ in range(2))
    w, x = torch.randint(-3, 4, (6, 70), generator=g).float().to(device), torch.randint(-3, 4, (70,), generator=g).float().to(device)
    reads = ss.ops.registry._instance(name).reads_interleaved
    with ss.use_backend(name):
        got = ss.ops.bank_linear(x, w, bank, ss.ops.interleave_tasks(other))
        assert torch.equal(got, ss.ops.bank_linear(x, w, other if reads else bank))
    assert reads == (name == "cpu")


ISA_SCRIPT = SCRIPT_HEAD + textwrap.dedent("""
    # k across 8/16-task groups, rows across table blocks (rows of 25 and 32 words, 1000 words a block)
    for k, R, n in ((1, 3, 5), (9, 41, 784), (17, 100, 1024), (250, 64, 784), (16, 7, 33), (33, 1, 1)):
        m = torch.rand(k, R, n) > 0.5
        bank, w, x = ss.pack_bits(m), torch.randn(R, n), torch.randn(n)
        ref = torch.einsum("n,trn->rt", x.double(), (w * m).double()).float()
        assert torch.allclose(C.mask_dot_rows(bank, x, w), ref, rtol=1e-4, atol=1e-4), (k, R, n)
        if n % 32:  # set pad bits are ignored
            dirty = bank.clone(); dirty[..., -1] |= -(1 << (n % 32))
            assert torch.allclose(C.mask_dot_rows(dirty, x, w), ref, rtol=1e-4, atol=1e-4)
            bank = dirty
        # from the task-interleaved copy: on small integers (every partial sum exact in fp32) equal to
        # the bank's kernel exactly, pad bits included; a copy of the wrong shape refused
        xi, wi = torch.randint(-3, 4, (n,)).float(), torch.randint(-3, 4, (R, n)).float()
        bt = C.interleave_tasks(bank)
        assert torch.equal(C.mask_dot_rows_interleaved(bt, k, xi, wi), C.mask_dot_rows(bank, xi, wi)), (k, R, n)
        refused(lambda: C.mask_dot_rows_interleaved(bt, k + 16, xi, wi), "bank_t must be the task-interleaved copy")
    print("ok")
""")


@needs_cxx
@pytest.mark.parametrize("isa", ISAS)
def test_cpu_row_kernel_on_every_isa(isa):
    run_on_isa(ISA_SCRIPT, isa)


@needs_cxx
@pytest.mark.parametrize("shift_indices", ["0", "1"])
def test_cpu_row_kernel_avx2_index_forms(shift_indices):
    """mask_dot_rows_interleaved with either way the AVX2 loop forms its indices."""
    run_on_isa_with_setting(ISA_SCRIPT, "avx2", "shift_indices", shift_indices)


@needs_cxx
def test_non_finite_inputs_follow_the_reference():
    """A masked-out inf still gives 0·inf = NaN: the cpu backend hands such inputs to the reference."""
    masks = torch.rand(20, 4, 40) > 0.5
    bank, w, x = ss.pack_bits(masks), torch.randn(4, 40), torch.randn(40)
    x[3] = float("inf")
    with ss.use_backend("cpu"):
        got = ss.ops.bank_linear(x, w, bank)
    with ss.use_backend("reference"):
        ref = ss.ops.bank_linear(x, w, bank)
    assert torch.equal(got.isnan(), ref.isnan()) and got.isnan().any()
    assert torch.equal(got[~got.isnan()], ref[~ref.isnan()])


def test_bad_arguments_are_named():
    bank = ss.pack_bits(torch.rand(5, 4, 40) > 0.5)
    with pytest.raises(ValueError, match="bank must be"):
        ss.ops.bank_linear(torch.randn(40), torch.randn(4, 40), bank[:, :3])
    with pytest.raises(ValueError, match="x must be"):
        ss.ops.bank_linear(torch.randn(41), torch.randn(4, 40), bank)
    with pytest.raises(TypeError, match="bank must hold int32"):
        ss.ops.bank_linear(torch.randn(40), torch.randn(4, 40), bank.long())
    with pytest.raises(RuntimeError, match="not differentiable"):
        ss.ops.bank_linear(torch.randn(40, requires_grad=True), torch.randn(4, 40), bank)


def _alpha_grad(x, layers, alpha):
    a = alpha.clone().requires_grad_(True)
    h = x
    for i, (w, bank, b) in enumerate(layers):
        h = ss.ops.superposed_linear(h, w, bank, a, b)
        if i < len(layers) - 1:
            h = torch.relu(h)
    out = torch.log_softmax(h, -1)
    loss = -(out.exp() * out).sum()
    return h.detach(), torch.autograd.grad(loss, a)[0]


@needs_cxx
@pytest.mark.parametrize("k", [5, 40])
def test_first_layer_route_gives_the_same_output_and_alpha_gradient(k, monkeypatch):
    """superposed_linear on an input needing no gradient runs y = D α (one pass over the bits) on the
    cpu backend; output and α-gradient agree with the reference backend and the float computation."""
    g = torch.Generator().manual_seed(k)
    sizes = [(37, 70), (20, 37), (10, 20)]
    layers = [(torch.randn(o, i, generator=g) * 0.3, ss.pack_bits(torch.rand(k, o, i, generator=g) > 0.5),
               torch.randn(o, generator=g)) for o, i in sizes]
    x, alpha = torch.randn(1, 70, generator=g), torch.rand(k, generator=g) / k
    calls = []
    real = CpuBackend.bank_linear
    monkeypatch.setattr(CpuBackend, "bank_linear", lambda self, *a: calls.append(1) or real(self, *a))
    with ss.use_backend("cpu"):
        y, da = _alpha_grad(x, layers, alpha)
    assert len(calls) == 1  # the first layer only: the others need an input gradient
    with ss.use_backend("reference"):
        y_ref, da_ref = _alpha_grad(x, layers, alpha)
    assert len(calls) == 1
    assert torch.allclose(y, y_ref, rtol=1e-4, atol=1e-5) and torch.allclose(da, da_ref, rtol=1e-3, atol=1e-5)
    # the float computation: W ⊙ Σ αᵢ Mᵢ as a float tensor, plain autograd
    a = alpha.clone().requires_grad_(True)
    h = x
    for i, (w, bank, b) in enumerate(layers):
        m = ss.unpack_bits(bank, w.shape[1]).float()
        h = torch.nn.functional.linear(h, w * (a[:, None, None] * m).sum(0), b)
        if i < len(layers) - 1:
            h = torch.relu(h)
    out = torch.log_softmax(h, -1)
    da_float = torch.autograd.grad(-(out.exp() * out).sum(), a)[0]
    assert torch.allclose(da, da_float, rtol=1e-3, atol=1e-5)


def test_reference_walks_many_rows_of_x_in_bounded_passes(monkeypatch):
    """Above 16 rows of x (and on GPU backends) the reference runs; it takes the rows of x a few at a
    time so that W ⊙ x never holds more than a bounded number of floats."""
    from supsup_fast.ops.backends import reference
    monkeypatch.setattr(reference, "_PLANE_CHUNK", 64 * 3)  # one row of x per pass here
    masks = torch.rand(5, 3, 40) > 0.5
    w, x = torch.randn(3, 40), torch.randn(20, 40)
    got = reference.ReferenceBackend().bank_linear(x, w, ss.pack_bits(masks))
    assert torch.allclose(got, expected(x, w, masks), rtol=1e-4, atol=1e-4)
    with ss.use_backend("cpu"):
        assert torch.allclose(ss.ops.bank_linear(x, w, ss.pack_bits(masks)), expected(x, w, masks), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,device", PAIRS, ids=ids(PAIRS))
def test_eager_superposed_with_s_matches_the_custom_op(name, device):
    """superposed_with_s (and superposed_linear when x needs a gradient) run eagerly through a plain
    autograd.Function with the op's own bodies; output and every gradient equal the custom op's."""
    from supsup_fast.ops import superposed as S
    g = torch.Generator().manual_seed(11)
    k, out, n = 6, 9, 45
    bank = ss.pack_bits(torch.rand(k, out, n, generator=g) > 0.5).to(device)
    w0, b0, x0 = torch.randn(out, n, generator=g), torch.randn(out, generator=g), torch.randn(3, n, generator=g)
    a0 = torch.rand(k, generator=g)
    results = []
    with ss.use_backend(name):
        for run in ("eager", "op"):
            x, w, b, a = (t.clone().to(device).requires_grad_() for t in (x0, w0, b0, a0))
            s = ss.ops.superpose(bank, a.detach(), n).view(out, n)
            y = (ss.ops.superposed_with_s(x, w, bank, a, s, b) if run == "eager"
                 else S.superposed_given_s_op(x, w, bank, a, s, b, None))
            grads = torch.autograd.grad((y * torch.arange(out, device=device)).sum(), (x, w, b, a))
            results.append([y.detach().cpu()] + [t.cpu() for t in grads])
    for e, o in zip(*results):
        assert torch.allclose(e, o, rtol=1e-5, atol=1e-5)


def test_eager_superposed_refuses_double_backward():
    bank = ss.pack_bits(torch.rand(4, 3, 10) > 0.5)
    x, w, a = torch.randn(1, 10, requires_grad=True), torch.randn(3, 10), torch.rand(4, requires_grad=True)
    y = ss.ops.superposed_linear(x, w, bank, a)
    (ga,) = torch.autograd.grad(y.sum(), a, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(ga.sum(), x)
