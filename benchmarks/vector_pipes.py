"""Is the AVX2 table loop of ``mask_dot`` / ``superpose`` bound by its instructions or by memory?

    python benchmarks/vector_pipes.py [--out benchmarks/results/vector-pipes.json]

Two probes, one process, x86 with AVX2 and g++ only:

1. The loop's instruction mix without its loads (csrc/cpu/lut_interleaved.cpp, one step: 8 tasks x one
   32-bit mask word = 11 3-bit lookups by ``vpermps``, their indices, the adds), as inline assembly on
   independent registers, in cycles per step. The cycle is measured by a chain of dependent integer
   adds (one cycle each on every x86 core). Separate and paired mixes show which instructions share
   vector pipes here; "kernel mix" is what the loop issues (multiply-high indices, csrc/cpu/simd.h
   index3_bits_at; Intel's plain shifts are the "shift indices" row), "5 adds as FMA" asks whether
   moving adds onto the multiply pipes (x * 1 + s, exact) would help.
2. ``ss.ops.mask_dot`` over the task-interleaved copy (the kernel itself) at k = 2,500 with its bits in
   the last-level cache (32 rows of 1,024: 10 MB) and from DRAM (1,024 rows: 329 MB), in cycles per
   32 bytes of bits per thread at the measured clock. Where both rates match and sit a little above
   the mix, the loop is bound by its instructions, not by memory.

Timings only: run on a quiet machine. The kernels run at the ISA in effect (``SUPSUP_CPU_ISA``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ITERS = 20_000_000
# Registers: ymm15 the mask word, ymm14 a table, ymm13 an addend; index results ymm0-4, lookups
# ymm5-9, sums ymm10-12 (rotating, so no instruction waits on the last iteration's): AVX2's 16.
MIXES = {
    "11 vpermps": dict(perm=11),
    "10 shifts": dict(shift=10),
    "9 multiply-highs": dict(mulhi=9),
    "11 adds": dict(add=11),
    "11 vpermps + 10 shifts": dict(perm=11, shift=10),
    "11 vpermps + 11 adds": dict(perm=11, add=11),
    "10 shifts + 11 adds": dict(shift=10, add=11),
    "11 vpermps + 9 multiply-highs": dict(perm=11, mulhi=9),
    "shift indices: 11 vpermps + 10 shifts + 11 adds": dict(perm=11, shift=10, add=11),
    "kernel mix: 11 vpermps + 9 multiply-highs + 2 shifts + 11 adds": dict(perm=11, mulhi=9, shift=2, add=11),
    "the same, 5 adds as FMA": dict(perm=11, mulhi=9, shift=2, add=6, fma=5),
}


def _asm(perm=0, shift=0, mulhi=0, add=0, fma=0) -> str:
    lines = [f"vpmulhuw %%ymm14, %%ymm15, %%ymm{i % 5}" for i in range(mulhi)]
    lines += [f"vpsrld ${3 * (i + 1)}, %%ymm15, %%ymm{(mulhi + i) % 5}" for i in range(shift)]
    lines += [f"vpermps %%ymm14, %%ymm{i % 5}, %%ymm{5 + i % 5}" for i in range(perm)]
    lines += [f"vaddps %%ymm{5 + i % 5}, %%ymm13, %%ymm{10 + i % 3}" for i in range(add)]
    # x * t + s written over the lookup x (vfmadd213ps): no chain across iterations, as with the adds
    lines += [f"vfmadd213ps %%ymm13, %%ymm14, %%ymm{5 + (add + i) % 5}" for i in range(fma)]
    return "\\n".join(lines)


def _program(iters: int) -> str:
    clobber = ",".join(f'"xmm{i}"' for i in range(16))
    out = ["#include <chrono>", "#include <cstdio>", "int main() {", f"  const long n = {iters};",
           "  auto now = [] { return std::chrono::steady_clock::now(); };",
           "  auto ns = [](auto a, auto b) { return std::chrono::duration<double, std::nano>(b - a).count(); };",
           # 100 dependent adds a pass: the cycle time
           '  { long r = 0; auto t0 = now(); for (long i = 0; i < n / 10; ++i) asm volatile('
           + '"' + "\\n".join(["add $1, %0"] * 100) + '" : "+r"(r));'
           + ' printf("clock %.6f\\n", ns(t0, now()) / (n / 10 * 100.0)); }']
    for name, mix in MIXES.items():
        out.append(f'  {{ auto t0 = now(); for (long i = 0; i < n; ++i) asm volatile("{_asm(**mix)}" ::: {clobber});'
                   f' printf("%s\\t%.6f\\n", "{name}", ns(t0, now()) / n); }}')
    out.append("  return 0;\n}")
    return "\n".join(out)


def instruction_mixes(iters: int = ITERS) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "pipes.cpp", Path(tmp) / "pipes"
        src.write_text(_program(iters))
        subprocess.run(["g++", "-O2", "-mavx2", "-mfma", str(src), "-o", str(exe)], check=True)
        lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines()
    cycle_ns = float(lines[0].split()[1])
    mixes = {}
    for line in lines[1:]:
        name, t = line.rsplit("\t", 1)
        mixes[name] = float(t) / cycle_ns
    return {"cycle_ns": cycle_ns, "ghz": 1 / cycle_ns, "cycles_per_step": mixes}


def kernel_rates(cycle_ns: float, k: int = 2500, repeats: int = 25, rows: tuple = (32, 1024)) -> dict:
    import torch

    import supsup_fast as ss
    from supsup_fast.bits import num_words
    threads = torch.get_num_threads()
    out = {"threads": threads, "k": k}
    for place, r in zip(("last-level cache", "DRAM"), rows):  # 10 MB and 329 MB by default
        words = torch.randint(-2**31, 2**31 - 1, (k, r, num_words(1024)), dtype=torch.int32)
        copy, v = ss.ops.interleave_tasks(words), torch.randn(r, 1024)
        for _ in range(3):
            ss.ops.mask_dot(words, v, copy)
        ts = []
        for _ in range(repeats):
            start = time.perf_counter()
            ss.ops.mask_dot(words, v, copy)
            ts.append(time.perf_counter() - start)
        t = statistics.median(ts)
        nbytes = copy.numel() * 4
        out[place] = {"bits_MB": nbytes / 1e6, "ms": t * 1e3, "GBps": nbytes / t / 1e9,
                      "cycles_per_32B_per_thread": t / cycle_ns * 1e9 * threads / (nbytes / 32)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=None, help="also write the figures here as JSON")
    a = p.parse_args()
    from supsup_fast.bench import machine
    from supsup_fast.bench.report import stamp
    from supsup_fast.machine import cpu_label
    from supsup_fast.ops.backends.cpu import cpu_isa
    rep = {"machine": machine(), **stamp(), "isa": cpu_isa(), **instruction_mixes()}
    rep["kernel"] = kernel_rates(rep["cycle_ns"])
    print(f"{cpu_label(rep['machine'])}: clock {rep['ghz']:.2f} GHz (dependent integer adds)")
    print("cycles per loop step (8 tasks x 32 bits), instructions alone:")
    for name, c in rep["cycles_per_step"].items():
        print(f"  {c:6.2f}  {name}")
    print(f"ss.ops.mask_dot over the task-interleaved copy, k = {rep['kernel']['k']}, {rep['isa']}, "
          f"{rep['kernel']['threads']} threads:")
    for place in ("last-level cache", "DRAM"):
        r = rep["kernel"][place]
        print(f"  bits in {place:16s} {r['bits_MB']:7.1f} MB  {r['ms']:7.2f} ms  {r['GBps']:5.1f} GB/s  "
              f"{r['cycles_per_32B_per_thread']:5.2f} cycles per 32 B per thread")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(rep, indent=2))


if __name__ == "__main__":
    main()
