"""supsup_fast: Supermasks in Superposition with bit-packed masks and fused kernels.

Install mapping (stated once, here): the folder ``kernels/`` (Triton) installs as the subpackage
``supsup_fast.kernels`` and ``csrc/`` (C++/CUDA sources and their build list, ``csrc/build.py``) as
``supsup_fast.csrc``. The C++/CUDA extensions are built only when sources exist and torch is
importable at build time (install with ``--no-build-isolation`` on machines that should build
them); otherwise the CPU kernels compile on first use.
"""
import glob
import importlib.util
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def csrc_build():
    """csrc/build.py, loaded by path: the package is not importable while it is being built."""
    spec = importlib.util.spec_from_file_location("supsup_fast_csrc_build", os.path.join(HERE, "csrc", "build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nvidia_include_dirs():
    """Headers of the nvidia-* wheels (cusparse.h, cublas_v2.h ...) that torch's CUDA headers include."""
    dirs = []
    try:
        import nvidia
        for root in getattr(nvidia, "__path__", []):
            dirs += sorted(glob.glob(os.path.join(root, "*", "include")))
    except ImportError:
        pass
    return dirs


def cuda_extension(torch, build):
    """The CUDA extension, or None with one line saying why it is skipped."""
    import shutil
    from torch.utils.cpp_extension import CUDA_HOME, CUDAExtension
    sources = build.cuda_sources("csrc")
    if not sources:
        return None
    if torch.version.cuda is None:
        print("supsup_fast: skipping the CUDA kernels (this torch is a CPU build)")
        return None
    if CUDA_HOME is None and shutil.which("nvcc") is None:
        print("supsup_fast: skipping the CUDA kernels (nvcc not found; set CUDA_HOME)")
        return None
    # machine code for A100 / H100-class cards, and PTX of the newest so that later GPUs JIT it
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    return CUDAExtension("supsup_fast._cuda", sources, include_dirs=nvidia_include_dirs(),
                         extra_compile_args={"cxx": build.CUDA_CXXFLAGS, "nvcc": build.CUDA_NVCCFLAGS},
                         define_macros=[build.PYTHON_MODULE_MACRO])


def extensions():
    build = csrc_build()
    cpu_sources = build.cpu_sources("csrc")
    if not cpu_sources:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("supsup_fast: torch is not importable at build time; the C++ CPU kernels will be compiled "
              "on first use instead (install with --no-build-isolation to build them now)")
        return [], {}
    ext = CppExtension("supsup_fast._C", cpu_sources, extra_compile_args=build.CPU_CFLAGS,
                       extra_link_args=build.CPU_LDFLAGS)
    exts = [ext]
    cuda = cuda_extension(torch, build)
    if cuda is not None:
        exts.append(cuda)
    return exts, {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()

setup(
    name="supsup_fast",
    version="0.1.0",
    description="Supermasks in Superposition (SupSup) with bit-packed masks and fused kernels",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["supsup_fast", "supsup_fast.*"]) + ["supsup_fast.kernels", "supsup_fast.csrc"],
    package_dir={"supsup_fast.kernels": "kernels", "supsup_fast.csrc": "csrc"},
    package_data={"supsup_fast.data": ["mnist_subset.npz"], "supsup_fast.csrc": ["cpu/*.cpp", "cpu/*.h", "cuda/*.cu", "cuda/*.cuh", "cuda/*.cpp"],
                  "supsup_fast.ops": ["gpu_op_table.json"]},
    install_requires=["torch>=2.4", "numpy", "safetensors", "tqdm", "matplotlib", "PyYAML", "ninja"],
    # The tests run the Triton kernels in Triton's CPU interpreter, which needs Triton >= 3.8 with
    # numpy 2 (3.6's interpreter cannot loop over runtime ints); GPUs run compiled kernels from 3.6 on.
    extras_require={"test": ["pytest", "pytest-benchmark", "hypothesis", "scikit-learn", "triton>=3.8,<3.10; platform_system == 'Linux'"],
                    "triton": ["triton>=3.6,<3.10"],
                    # benchmark mixed-domains (sklearn's bundled 8x8 digits), benchmarks/questions*.py
                    "questions": ["scikit-learn"]},
    entry_points={"console_scripts": ["supsup-fast=supsup_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
