"""supsup_fast: Supermasks in Superposition with bit-packed masks and fused kernels.

The Triton kernels in ``kernels/`` install as ``supsup_fast.kernels``. C++/CUDA extensions in
``csrc/`` are built only when sources exist and torch is importable at build time (install with
``--no-build-isolation`` on machines that should build them); an empty or absent ``csrc/`` is fine.
"""
import glob
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def extensions():
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if not cpu_sources:
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("supsup_fast: torch is not importable at build time; the C++ CPU kernels will be compiled "
              "on first use instead (install with --no-build-isolation to build them now)")
        return [], {}
    ext = CppExtension("supsup_fast._C", cpu_sources,
                       extra_compile_args=["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-Wno-maybe-uninitialized"], extra_link_args=["-fopenmp"],
                       define_macros=[("SUPSUP_PYTHON_MODULE", None)])
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()

setup(
    name="supsup_fast",
    version="0.1.0",
    description="Supermasks in Superposition (SupSup) with bit-packed masks and fused kernels",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["supsup_fast", "supsup_fast.ops", "supsup_fast.nn", "supsup_fast.data", "supsup_fast.algorithms",
              "supsup_fast.kernels", "supsup_fast.csrc"],
    package_dir={"supsup_fast.kernels": "kernels", "supsup_fast.csrc": "csrc"},
    package_data={"supsup_fast.data": ["mnist_subset.npz"], "supsup_fast.csrc": ["cpu/*.cpp", "cpu/*.h"]},
    install_requires=["torch>=2.4", "numpy", "safetensors", "tqdm", "matplotlib", "PyYAML", "ninja"],
    extras_require={"test": ["pytest", "pytest-benchmark"], "triton": ["triton>=3.6"]},
    entry_points={"console_scripts": ["supsup-fast=supsup_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
