"""benchmarks/vector_pipes.py, the AVX2 table loop's instruction-mix probe, runs end to end at tiny
sizes so that the script cannot rot (no timing is asserted: only that every figure is there)."""
import importlib.util
import math
import platform
import re
import shutil
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "vector_pipes.py"


def _load():
    spec = importlib.util.spec_from_file_location("vector_pipes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _has_avx2() -> bool:
    try:
        return "avx2" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or shutil.which("g++") is None or not _has_avx2(),
                    reason="the probe is AVX2 inline assembly built with g++")
def test_instruction_mixes_report_every_mix_in_cycles():
    vp = _load()
    rep = vp.instruction_mixes(iters=2000)
    assert rep["cycle_ns"] > 0 and math.isfinite(rep["ghz"])
    assert set(rep["cycles_per_step"]) == set(vp.MIXES)
    assert all(c > 0 and math.isfinite(c) for c in rep["cycles_per_step"].values())


def test_generated_assembly_keeps_to_avx2_registers():
    """An AVX2-only CPU has ymm0-15: the probe must not name ymm16+ (AVX-512 encodings)."""
    vp = _load()
    for mix in vp.MIXES.values():
        text = vp._asm(**mix)
        regs = [int(r) for r in re.findall(r"ymm(\d+)", text)]
        assert regs and max(regs) <= 15
        assert text.count("vpermps") == mix.get("perm", 0)


def test_kernel_rates_time_mask_dot_over_the_task_copy():
    vp = _load()
    torch.manual_seed(0)
    rep = vp.kernel_rates(cycle_ns=0.25, k=40, repeats=2, rows=(2, 3))
    assert rep["k"] == 40 and rep["threads"] == torch.get_num_threads()
    for place in ("last-level cache", "DRAM"):
        r = rep[place]
        assert r["bits_MB"] > 0 and r["ms"] > 0 and r["GBps"] > 0 and r["cycles_per_32B_per_thread"] > 0
