"""The Triton backend against the reference backend, on fresh random inputs with odd sizes.
Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set in conftest)."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install 'supsup_fast[test]')")

import supsup_fast as ss  # noqa: E402
from supsup_fast import ops  # noqa: E402
from supsup_fast.ops.backends.reference import ReferenceBackend  # noqa: E402

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
R = ReferenceBackend()
SIZES = [1, 33, 784, 1000, 4133]  # 4133: several blocks per row under the interpreter's widest blocks


@pytest.fixture
def tb():
    from supsup_fast.ops.backends.triton import TritonBackend
    return TritonBackend()


def bits(*shape, g, p=0.5):
    return torch.rand(*shape, generator=g) < p


@pytest.mark.parametrize("n", SIZES)
def test_bit_kernels_exact(tb, rng, n):
    m = bits(3, 5, n, g=rng).to(DEV)
    w = tb.pack_bits(m)
    assert torch.equal(w.cpu(), R.pack_bits(m.cpu()))
    assert torch.equal(tb.unpack_bits(w, n), m)
    weight = torch.randn(5, n, generator=rng).to(DEV)
    assert torch.equal(tb.masked_weight(weight, w[0]).cpu(), R.masked_weight(weight.cpu(), w[0].cpu()))
    scores = torch.randn(5, n, generator=rng).to(DEV)
    assert torch.equal(tb.compare_pack(scores, 0.0).cpu(), R.pack_bits(scores.cpu() >= 0))
    assert torch.equal(tb.compare_pack(scores, 0.7, absolute=True).cpu(), R.pack_bits(scores.cpu().abs() >= 0.7))
    assert torch.equal(tb.threshold_masked_weight(scores, weight).cpu(), (weight * (scores >= 0)).cpu())


def test_signed_masked_weight_kernel_over_several_blocks(rng):
    from supsup_fast.kernels import ops as kops
    n = 4133
    sign, mask = (R.pack_bits(bits(3, n, g=rng)).to(DEV) for _ in range(2))
    out = kops.signed_masked_weight(sign, mask, 0.25, n, torch.float32)
    want = 0.25 * (2 * R.unpack_bits(sign.cpu(), n).float() - 1) * R.unpack_bits(mask.cpu(), n)
    assert torch.equal(out.cpu(), want)


def test_float64_bank_products_sum_in_float64(tb, rng):
    """The kernels sum in fp32; float64 α, v and scores go to the reference, which keeps their precision."""
    k, n = 6, 70
    bank = R.pack_bits(bits(k, 2, n, g=rng)).to(DEV)
    alpha = torch.rand(k, generator=rng, dtype=torch.float64).to(DEV)
    v = torch.randn(2, n, generator=rng, dtype=torch.float64).to(DEV)
    assert torch.equal(tb.superpose(bank, alpha, n).cpu(), R.superpose(bank.cpu(), alpha.cpu(), n))
    assert torch.equal(tb.mask_dot(bank, v).cpu(), R.mask_dot(bank.cpu(), v.cpu()))
    assert torch.equal(tb.mask_dot_batched(bank, v[None].expand(3, -1, -1)).cpu(),
                       R.mask_dot_batched(bank.cpu(), v[None].expand(3, -1, -1).cpu()))
    active = torch.tensor([4, 1], device=DEV)
    assert torch.equal(tb.superpose(bank, alpha[:2], n, active=active).cpu(),
                       R.superpose(bank[active].cpu(), alpha[:2].cpu(), n))
    scores = torch.tensor([[-1e-50, 1e-50, -0.0, 0.0, -3.0]], dtype=torch.float64, device=DEV)
    assert torch.equal(tb.compare_pack(scores, 0.0).cpu(), R.pack_bits(scores.cpu() >= 0))


def test_launchers_run_on_their_tensors_gpu(monkeypatch):
    """Triton launches on the current device: each launcher runs under its first tensor's device
    (fake cuda:1 tensors here, the current device being cuda:0), and without a guard where they agree."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from supsup_fast.ops.backends.triton import OnTensorsDevice
    entered, seen = [], []

    class Device:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    class Launchers:
        INTERPRET = True

        @staticmethod
        def superpose(bank, alpha, active):
            seen.append(len(entered))
            return "out"

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Device)
    guarded = OnTensorsDevice(Launchers())
    assert guarded.INTERPRET is True
    with FakeTensorMode(allow_non_fake_inputs=True):
        on1, on0 = torch.empty(2, 3, device="cuda:1"), torch.empty(2, 3, device="cuda:0")
    assert guarded.superpose(on1, on1, None) == "out" and entered == [torch.device("cuda:1")] and seen == [1]
    guarded.superpose(on0, on0, None)
    guarded.superpose(torch.empty(2, 3), torch.empty(2), None)
    assert entered == [torch.device("cuda:1")] and seen == [1, 1, 1]


@pytest.mark.parametrize("k,n", [(1, 33), (7, 784), (40, 1000)])
def test_superpose_and_mask_dot(tb, rng, k, n):
    bank = R.pack_bits(bits(k, 3, n, g=rng)).to(DEV)
    alpha = torch.rand(k, generator=rng).to(DEV)
    torch.testing.assert_close(tb.superpose(bank, alpha, n).cpu(), R.superpose(bank.cpu(), alpha.cpu(), n))
    # 0/1 identities are exact: α = 1 gives the per-weight count, integer v gives integer dots.
    ones = torch.ones(k, device=DEV)
    assert torch.equal(tb.superpose(bank, ones, n).cpu(), R.superpose(bank.cpu(), ones.cpu(), n))
    vi = torch.randint(-8, 9, (3, n), generator=rng).float().to(DEV)
    assert torch.equal(tb.mask_dot(bank, vi).cpu(), R.mask_dot(bank.cpu(), vi.cpu()))
    v = torch.randn(3, n, generator=rng).to(DEV)
    torch.testing.assert_close(tb.mask_dot(bank, v).cpu(), R.mask_dot(bank.cpu(), v.cpu()), rtol=1e-5, atol=1e-4)
    active = torch.arange(0, k, 2, device=DEV)
    torch.testing.assert_close(tb.mask_dot(bank, v, active=active).cpu(), R.mask_dot(bank[active].cpu(), v.cpu()),
                               rtol=1e-5, atol=1e-4)
    a = alpha[: active.numel()]
    torch.testing.assert_close(tb.superpose(bank, a, n, active=active).cpu(), R.superpose(bank[active].cpu(), a.cpu(), n))
    # Deterministic: the two-stage reduction gives bit-identical results on every call.
    assert torch.equal(tb.mask_dot(bank, v), tb.mask_dot(bank, v))


@pytest.mark.parametrize("k,q,n", [(3, 1, 33), (70, 5, 784), (5, 17, 1000)])
def test_mask_dot_batched(tb, rng, k, q, n):
    bank = R.pack_bits(bits(k, 2, n, g=rng)).to(DEV)
    v = torch.randn(q, 2, n, generator=rng).to(DEV)
    expect = torch.stack([R.mask_dot(bank.cpu(), v[j].cpu()) for j in range(q)])
    # On a GPU the kernel runs bf16x3 products on tensor cores, whose fp32 accumulation truncates:
    # measured on an H200 (benchmarks/gpu_debug_mask_dot.py) the error is up to 1e-5 of the largest
    # |result| (fp32 CUDA-core sums: 2e-7), so the tolerance scales with it there. Integer inputs stay exact.
    atol = 1e-4 + (3e-5 * float(expect.abs().max()) if DEV.type == "cuda" else 0.0)
    torch.testing.assert_close(tb.mask_dot_batched(bank, v).cpu(), expect, rtol=1e-5, atol=atol)
    vi = torch.randint(-8, 9, (q, 2, n), generator=rng).float().to(DEV)
    assert torch.equal(tb.mask_dot_batched(bank, vi).cpu(), R.mask_dot_batched(bank.cpu(), vi.cpu()))
    with ops.use_backend("triton"):
        torch.testing.assert_close(ops.mask_dot_batched(bank, v).cpu(), expect, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("batch,n_in,n_out", [(1, 33, 7), (5, 784, 100), (130, 100, 65)])
def test_masked_linear_forward_backward(rng, batch, n_in, n_out):
    x = torch.randn(batch, n_in, generator=rng).to(DEV)
    w = torch.randn(n_out, n_in, generator=rng).to(DEV)
    b = torch.randn(n_out, generator=rng).to(DEV)
    words = R.pack_bits(bits(n_out, n_in, g=rng)).to(DEV)
    outs = {}
    for name in ("reference", "triton"):
        xs, ws, bs = (t.clone().requires_grad_(True) for t in (x, w, b))
        with ops.use_backend(name):
            y = ss.ops.masked_linear(xs, ws, words, bs)
            y.pow(2).sum().backward()
        outs[name] = (y.detach(), xs.grad, ws.grad, bs.grad)
    for got, exp in zip(outs["triton"], outs["reference"]):
        torch.testing.assert_close(got, exp, rtol=1e-4, atol=1e-3)


def test_signed_masked_linear(tb, rng):
    for batch in (1, 16, 70):
        x = torch.randn(batch, 784, generator=rng).to(DEV)
        sign, mask = (R.pack_bits(bits(300, 784, g=rng)).to(DEV) for _ in range(2))
        b = torch.randn(300, generator=rng).to(DEV)
        torch.testing.assert_close(tb.signed_masked_linear(x, sign, mask, 0.05, b).cpu(),
                                   R.signed_masked_linear(x.cpu(), sign.cpu(), mask.cpu(), 0.05, b.cpu()), rtol=1e-4, atol=1e-4)


def test_low_precision_forward(tb, rng):
    x = torch.randn(9, 100, generator=rng).to(DEV).bfloat16()
    w = torch.randn(40, 100, generator=rng).to(DEV).bfloat16()
    words = R.pack_bits(bits(40, 100, g=rng)).to(DEV)
    from supsup_fast.ops.backends.reference import DenseLinear
    got = tb.masked_forward(DenseLinear(), x, w, words, None)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float().cpu(), F.linear(x.float(), R.masked_weight(w.float(), words)).cpu(),
                               rtol=2e-2, atol=5e-2)


def test_batched_task_inference_matches_separate_one_shot_calls():
    from supsup_fast.algorithms.inference import alpha_gradient, alpha_gradients_batched, infer_oneshot_batched
    from supsup_fast.models import build_model
    from supsup_fast.nn import begin_task, finish_task
    model = build_model("lenet", 30, seed=2).to(DEV)
    for t in range(6):
        begin_task(model, generator=torch.Generator().manual_seed(t))
        finish_task(model)
    xs = torch.randn(7, 784, generator=torch.Generator().manual_seed(1)).to(DEV)
    with ops.use_backend("triton"):
        batched = alpha_gradients_batched(model, xs, "entropy", 10)
        separate = torch.stack([alpha_gradient(model, xs[j:j + 1], "entropy", 10) for j in range(7)])
        torch.testing.assert_close(batched, separate, rtol=1e-4, atol=1e-6)
        assert torch.equal(infer_oneshot_batched(model, xs), separate.argmin(1).cpu())
        g = alpha_gradients_batched(model, xs, "superfluous", 10)
        torch.testing.assert_close(g[3], alpha_gradient(model, xs[3:4], "superfluous", 10), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="SupermaskLinear"):
        alpha_gradients_batched(build_model("gemresnet18", 5), torch.randn(2, 3, 32, 32))


def test_gnu_evaluation_same_on_triton_and_reference(tmp_path):
    from supsup_fast.runs import evaluate_run, run_experiment
    from supsup_fast.runs.config import make_config
    cfg = make_config(overrides=dict(model="lenet", tasks=2, iters=30, train_subset=800, lr=1e-3, output_size=50,
                                     backend="reference"))
    run_experiment(cfg, tmp_path / "run", progress=False)
    ref = evaluate_run(tmp_path / "run", {"backend": "reference"}, tmp_path / "e1", progress=False)
    tri = evaluate_run(tmp_path / "run", {"backend": "triton", "device": str(DEV)}, tmp_path / "e2", progress=False)
    assert tri["backend"] == "triton"
    assert tri["per_task_accuracy"] == ref["per_task_accuracy"]
    assert tri["per_task_inference_accuracy"] == ref["per_task_inference_accuracy"]


def test_triton_ops_are_registered_for_torch_compile():
    from supsup_fast.kernels import ops as kops  # noqa: F401
    for name in ("pack_bits", "unpack_bits", "masked_weight", "superpose", "mask_dot", "mask_dot_batched",
                 "masked_linear", "masked_linear_dx", "grad_weight", "compare_pack", "threshold_masked_weight"):
        assert hasattr(torch.ops.supsup_triton, name)
    if DEV.type != "cuda":
        return  # the CPU interpreter runs kernels even on fake tensors; shape propagation is checked on GPUs
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        bank = torch.zeros(5, 40, dtype=torch.int32, device=DEV)
        out = torch.ops.supsup_triton.mask_dot_batched(bank, torch.zeros(3, 40 * 32, device=DEV), None)
        assert out.shape == (3, 5)


def test_auto_never_picks_the_interpreter_for_cpu_tensors():
    from tests.devices import real_devices
    for device in real_devices():
        name = ops.backend_for(device).name
        if device.type == "cpu":
            assert name in ("cpu", "reference")  # never triton (interpreter) nor cuda for CPU tensors
        else:
            # The highest-priority available backend that runs on the GPU: cuda where it loads
            # (it routes each op by the measured table), else triton.
            assert name == ("cuda" if "cuda" in ops.available() else "triton")


def test_every_kernel_compiles_for_sm90():
    """Ahead-of-time lowering to sm_90 cubins (no GPU needed): a kernel that cannot lower for
    Hopper, or needs more shared memory than it has, fails here."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "supsup_fast.kernels.aot", "90"], env=env, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "kernel variants compiled for sm_90" in proc.stdout


def test_graphed_call_refuses_cpu_tensors():
    from supsup_fast.bench import GraphedCall
    with pytest.raises(ValueError, match="CUDA tensor"):
        GraphedCall(lambda x: x * 2, torch.ones(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need an NVIDIA GPU")
def test_graphed_single_task_forward_matches_eager():
    from supsup_fast.bench import GraphedCall
    from supsup_fast.models import build_model
    from supsup_fast.nn import begin_task, finish_task, set_task
    model = build_model("fc1024", 500, seed=0).cuda()
    begin_task(model, generator=torch.Generator().manual_seed(0))
    finish_task(model)
    set_task(model, 0)
    x = torch.randn(64, 784, device="cuda")
    graphed = GraphedCall(model, x)
    torch.testing.assert_close(graphed(x), model(x))
    with pytest.raises(ValueError, match="captured shape"):
        graphed(torch.randn(2, 784, device="cuda"))


def test_training_on_triton_packs_the_same_masks_as_reference():
    """A layer trained under the Triton backend (threshold STE forward kernel, compare-and-pack of
    the finished mask) ends with the same bits as under the reference backend."""
    from supsup_fast.nn import SupermaskLinear, begin_task, finish_task, task_parameters
    banks = {}
    for name in ("reference", "triton"):
        layer = SupermaskLinear(100, 33, seed=3).to(DEV)
        with ops.use_backend(name):
            begin_task(layer, generator=torch.Generator().manual_seed(0))
            opt = torch.optim.SGD(task_parameters(layer), lr=0.5)
            x = torch.randn(16, 100, generator=torch.Generator().manual_seed(1)).to(DEV)
            for _ in range(3):
                opt.zero_grad()
                layer(x).pow(2).mean().backward()
                opt.step()
            finish_task(layer)
        banks[name] = layer.bank.words.cpu()
    assert torch.equal(banks["triton"], banks["reference"])
