"""CUDA C++ kernels: every .cu file must compile alone for sm_90 (nvcc, compile only). On a GPU
machine the backend is also checked against the reference backend."""
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

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
