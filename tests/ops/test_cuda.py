"""CUDA C++ kernels: every .cu file must compile alone for sm_90 (nvcc, compile only). On a GPU
machine the backend is also checked against the reference backend."""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import supsup_fast as ss

CUDA_DIR = Path(__file__).resolve().parents[2] / "csrc" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))


def test_cuda_sources_exist_and_include_no_torch_header():
    assert {p.name for p in CU_FILES} >= {"bank.cu", "weights.cu"}
    for p in CU_FILES + [CUDA_DIR / "kernels.cuh"]:
        text = p.read_text()
        assert "torch/" not in text and "ATen/" not in text and "c10/" not in text, p.name
    assert "TORCH_LIBRARY(supsup_cuda" in (CUDA_DIR / "bindings.cpp").read_text()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed on this machine")
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_cu_file_compiles_for_sm90(cu, tmp_path):
    proc = subprocess.run(["nvcc", "-c", "-arch=sm_90", "-std=c++17", "-O3", "-Xptxas", "-warn-spills",
                           str(cu), "-o", str(tmp_path / (cu.stem + ".o"))], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (tmp_path / (cu.stem + ".o")).stat().st_size > 0


def test_cuda_backend_absent_without_gpu_and_table_is_valid():
    from supsup_fast import ops
    from supsup_fast.ops.backends.cuda import op_table
    assert all(v in ("cuda", "triton") for v in op_table().values())
    if not torch.cuda.is_available():
        assert "cuda" not in ops.available()
        with pytest.raises(RuntimeError, match="not available on this machine"):
            ops.set_backend("cuda")


def test_cuda_kernels_built_for_other_gpus_are_refused_with_the_fix():
    """A prebuilt extension without machine code or PTX for this card registers its ops and fails at
    the first launch; the backend's probe turns that into a refusal (auto then takes Triton) that
    names the card's compute capability and the rebuild; a launch that works passes."""
    from supsup_fast.ops.backends.cuda import probe_kernels

    def no_image():
        raise RuntimeError("supsup_cuda: masked_weight failed: no kernel image is available for execution on the device")
    with pytest.raises(RuntimeError, match=r"compute capability 7\.5.*no kernel image.*TORCH_CUDA_ARCH_LIST=\"7\.5\""):
        probe_kernels(no_image, (7, 5))
    probe_kernels(lambda: None, (9, 0))


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def test_forced_cuda_backend_runs_its_own_kernels():
    """Under `auto` the CUDA backend hands an op to Triton unless the measured table says cuda; a
    test of the CUDA kernels must force the backend by name (the table shipped may be empty)."""
    from supsup_fast import ops
    from supsup_fast.ops.backends.cuda import CudaBackend
    cb = CudaBackend.__new__(CudaBackend)  # no extension needed to check the routing rule
    cb.table = {}
    assert not cb._mine("mask_dot")
    with ops.use_backend("reference"):  # any forced name: the rule reads only the name in force
        assert cb._mine("mask_dot") and cb._mine("signed_gemv")
    cb.table = {"mask_dot": "cuda"}
    assert cb._mine("mask_dot") and not cb._mine("superpose")


class _Recorder:
    """Stands in for torch.ops.supsup_cuda: records which kernels a routing sends work to."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def kernel(*args):
            self.calls.append(name)
            raise AssertionError(f"the CUDA kernel {name} was called")
        return kernel


def _routing_backend(fallback):
    from supsup_fast.ops.backends.cuda import CudaBackend
    cb = CudaBackend.__new__(CudaBackend)  # the routing rules only; no extension, no GPU
    cb.ops, cb.fallback, cb.table = _Recorder(), fallback, {}
    return cb


def test_cuda_signed_gemv_takes_non_finite_x_and_leaves_a_non_finite_scale_to_the_fallback():
    """The GEMV adds 0 · x at the cleared bits where x is not finite in the kernel itself (no host
    sync on its µs path; checked against the reference on a GPU below); an inf scale would make the
    zero weights' 0 · scale NaN, which only the fallback computes as the contract does."""
    from supsup_fast import ops
    from supsup_fast.ops.backends.reference import ReferenceBackend
    ref = ReferenceBackend()
    cb = _routing_backend(ref)
    ones = ref.pack_bits(torch.ones(4, 40, dtype=torch.bool))
    x = torch.zeros(2, 40)
    x[0, 3] = float("inf")
    with ops.use_backend("reference"):  # any forced name: the GEMV is chosen wherever it can run
        y = cb.signed_masked_linear(torch.ones(1, 40), ones, ones, float("inf"), None)
        assert torch.isinf(y).all() and cb.ops.calls == []
        with pytest.raises(AssertionError, match="signed_gemv was called"):
            cb.signed_masked_linear(x, ones, ones, 0.5, None)


def test_cuda_backend_takes_the_fused_alpha_backward_with_a_triton_fallback(monkeypatch):
    """The fused α-backward (weight-gradient GEMM epilogue, then one pass over the bits) needs the
    Triton launchers; it was gated on an attribute TritonBackend does not have, so it never ran."""
    pytest.importorskip("triton")
    from supsup_fast.ops.backends import cuda
    from supsup_fast.ops.backends.reference import DenseLinear
    from supsup_fast.ops.backends.triton import TritonBackend
    tb = TritonBackend()  # the interpreter here (conftest sets TRITON_INTERPRET=1), the GPU there
    taken = []
    monkeypatch.setattr(cuda, "fused_alpha_backward", lambda *a: taken.append(a) or ("dx", "da", "dw"))
    cb = _routing_backend(tb)
    x, w, g = torch.randn(2, 5), torch.randn(3, 5), torch.randn(2, 3)
    out = cb.superposed_backward(DenseLinear(), g, x, w, None, torch.rand(4), None, True, True, False)
    assert out == ("dx", "da", "dw") and len(taken) == 1 and taken[0][1] is tb.kernels
    # float64: the GEMM kernels have no such variant; the general path, whose ops keep float64
    bank = ss.ops.pack_bits(torch.rand(4, 3, 5) < 0.5)
    dx, da, _ = cb.superposed_backward(DenseLinear(), g.double(), x.double(), w.double(), bank,
                                       torch.rand(4, dtype=torch.float64), None, True, True, False)
    assert len(taken) == 1 and da.dtype == torch.float64


@gpu
def test_cuda_kernels_match_reference():
    from supsup_fast import ops
    from supsup_fast.ops.backends.cuda import CudaBackend
    from supsup_fast.ops.backends.reference import ReferenceBackend
    cb, ref = CudaBackend(), ReferenceBackend()
    with ops.use_backend("cuda"):  # forced by name: every call below runs the CUDA kernels, not Triton
        for op in ("mask_dot", "superpose", "signed_gemv", "masked_weight"):
            assert cb._mine(op), op
        _cuda_kernels_match_reference(cb, ref)


def _cuda_kernels_match_reference(cb, ref):
    g = torch.Generator().manual_seed(0)
    for k, rows, n in [(1, 3, 33), (37, 5, 784), (300, 2, 1000)]:
        bank = ref.pack_bits(torch.rand(k, rows, n, generator=g) < 0.5)
        v = torch.randn(rows, n, generator=g)
        alpha = torch.rand(k, generator=g)
        torch.testing.assert_close(cb.mask_dot(bank.cuda(), v.cuda()).cpu(), ref.mask_dot(bank, v), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(cb.superpose(bank.cuda(), alpha.cuda(), n).cpu(), ref.superpose(bank, alpha, n))
    for batch in (1, 3, 16):
        x = torch.randn(batch, 784, generator=g)
        sign, mask = (ref.pack_bits(torch.rand(300, 784, generator=g) < 0.5) for _ in range(2))
        torch.testing.assert_close(cb.signed_masked_linear(x.cuda(), sign.cuda(), mask.cuda(), 0.05, None).cpu(),
                                   ref.signed_masked_linear(x, sign, mask, 0.05, None), rtol=1e-4, atol=1e-4)
        x[0, 5], x[-1, 700] = float("inf"), float("nan")  # 0 · inf at the cleared bits: NaN, as the contract
        dense_row = torch.zeros(300, 784, dtype=torch.bool)
        dense_row[7] = True  # one output row with every bit set: +inf through the GEMV, not NaN
        m2 = ref.pack_bits(dense_row | (torch.rand(300, 784, generator=g) < 0.5))
        torch.testing.assert_close(cb.signed_masked_linear(x.cuda(), sign.cuda(), m2.cuda(), 0.05, None).cpu(),
                                   ref.signed_masked_linear(x, sign, m2, 0.05, None), rtol=1e-4, atol=1e-4,
                                   equal_nan=True)
    w = torch.randn(8, 3, 3, 3, generator=g)
    words = ref.pack_bits(torch.rand(8, 27, generator=g) < 0.5)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        assert torch.equal(cb.masked_weight(w.to(dt).cuda(), words.cuda()).cpu(), ref.masked_weight(w.to(dt), words))
    cl = torch.ops.supsup_cuda.masked_weight(w.cuda(), words.cuda(), True)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(cl.cpu(), ref.masked_weight(w, words))


def _cuda_include():
    import os
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_runtime.h").is_file():
            return str(Path(root) / "include")
    return None


@pytest.mark.skipif(shutil.which("g++") is None or _cuda_include() is None,
                    reason="needs g++ and the CUDA runtime headers (CUDA_HOME or /usr/local/cuda)")
def test_bindings_compile_against_torch_headers(tmp_path):
    """bindings.cpp against this torch's headers and the CUDA runtime headers (syntax and types,
    no link). A CPU build of torch lacks one generated CUDA header, stubbed here."""
    import sysconfig
    from torch.utils.cpp_extension import include_paths
    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = ["g++", "-std=c++20", "-fsyntax-only", f"-I{tmp_path}", *[f"-I{p}" for p in include_paths()],
           f"-I{_cuda_include()}", f"-I{sysconfig.get_paths()['include']}", "-DSUPSUP_PYTHON_MODULE",
           str(CUDA_DIR / "bindings.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
