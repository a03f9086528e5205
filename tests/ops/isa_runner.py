"""Running a check script under each x86 ISA level the C++ CPU kernels have (scalar, AVX2,
AVX-512): the level is fixed per process (SUPSUP_CPU_ISA), so each runs in a child process."""
import os
import shutil
import subprocess
import sys

import pytest

ISAS = ["scalar", "avx2", "avx512"]

needs_compiler = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                    reason="no C++ compiler on this machine: the cpu backend cannot be built")

# How each check script starts: the C++ ops (C), the reference they are checked against (ref), a
# fixed seed, and the ISA line that run_on_isa expects first.
SCRIPT_HEAD = """import torch, supsup_fast as ss
from supsup_fast.ops.backends.cpu import cpu_isa
from supsup_fast.ops.backends.reference import ReferenceBackend
torch.manual_seed(0)
ref = ReferenceBackend(); C = torch.ops.supsup_cpu
print(cpu_isa())
ri = lambda *shape: torch.randint(-3, 4, shape).float()  # small integers: every partial sum is exact in fp32

def refused(call, words):
    # call() must raise a RuntimeError whose message contains words
    try:
        call()
    except RuntimeError as e:
        assert words in str(e), e
    else:
        raise AssertionError(f"accepted what should be refused ({words})")

def rank1_queries(q, R, n):
    # g [q, R] and x [q, n] of q one-image queries: a run of dead rows, scattered ones, one query with none live
    g, x = ri(q, R), ri(q, n)
    g[:, 5:17] = 0
    g[g.abs() < 2] = 0
    if q > 1:
        g[1] = 0
    return g, x
"""


def cpu_isas() -> list:
    """The ISA levels this CPU can run."""
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    out = ["scalar"]
    if " avx2" in flags and " fma" in flags:
        out.append("avx2")
    if " avx512f" in flags and " avx512bw" in flags and " avx512vl" in flags and " avx512dq" in flags:
        out.append("avx512")
    return out


def cpu_has_gfni_vbmi() -> bool:
    """Whether this CPU runs the GFNI table kernels (AVX-512 with GFNI and VBMI)."""
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    return " gfni" in flags and " avx512vbmi" in flags and "avx512" in cpu_isas()


def run_on_isa(script: str, isa: str, extra_env: dict = None) -> None:
    """Run ``script`` with the kernels capped to ``isa`` (skipped where the CPU lacks it); the
    script prints the ISA it ran and then "ok"."""
    if isa not in cpu_isas():
        pytest.skip(f"this CPU has no {isa}")
    env = dict(os.environ, SUPSUP_CPU_ISA=isa, OMP_NUM_THREADS="2", **(extra_env or {}))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == [isa, "ok"]


def run_on_isa_with_setting(script: str, isa: str, setting: str, value: str, extra_env: dict = None) -> None:
    """run_on_isa with one of the table loops' vendor-chosen settings forced on ("1") or off ("0"),
    after checking that the kernels took it: "prefetch" (SUPSUP_CPU_PREFETCH, the bits prefetched
    ahead; on by default on Intel CPUs only), "prefetch_l2" (SUPSUP_CPU_PREFETCH_L2, those prefetches
    into L2 rather than L1; on by default on Intel CPUs only), "shift_indices" (SUPSUP_CPU_SHIFT_INDICES, the AVX2
    loops' indices by shifts; on by default on Intel CPUs only), "wide_gemm_tiles"
    (SUPSUP_CPU_WIDE_TILES, the AVX-512 packed GEMM's 64 x 6 tile; on by default on Intel CPUs only) or
    "short_gemm_chunks" (SUPSUP_CPU_SHORT_CHUNKS, the AVX2 packed GEMM's K chunks of at most 256; on by
    default on Intel CPUs only).
    ``script`` starts with SCRIPT_HEAD; ``extra_env`` sets more variables."""
    op, env = {"prefetch": ("stream_prefetch", "SUPSUP_CPU_PREFETCH"),
               "prefetch_l2": ("stream_prefetch_l2", "SUPSUP_CPU_PREFETCH_L2"),
               "shift_indices": ("shift_indices", "SUPSUP_CPU_SHIFT_INDICES"),
               "wide_gemm_tiles": ("wide_gemm_tiles", "SUPSUP_CPU_WIDE_TILES"),
               "short_gemm_chunks": ("short_gemm_chunks", "SUPSUP_CPU_SHORT_CHUNKS")}[setting]
    check = f"assert C.{op}() is {value == '1'}\n"
    run_on_isa(SCRIPT_HEAD + check + script[len(SCRIPT_HEAD):], isa, {**(extra_env or {}), env: value})
