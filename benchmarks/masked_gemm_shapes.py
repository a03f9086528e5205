"""The packed masked GEMM (``ss.ops.masked_linear`` from 17 rows up to the backend's limit, 256 to
4,096 by CPU vendor and ISA, on layers of 64+ outputs) against dense ``F.linear`` on the materialised weight, over the layer shapes of the
package's models and batches, on the CPU kernels' current ISA (``SUPSUP_CPU_ISA`` caps it; cap torch
too for a fair dense baseline, e.g. ``MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2``).
Interleaved medians in one process. Prints a table; ``--out`` writes it as JSON.

    python benchmarks/masked_gemm_shapes.py [--threads N] [--out FILE]
"""
import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import supsup_fast as ss
from supsup_fast.bench import interleaved_medians, machine
from supsup_fast.bench.report import stamp
from supsup_fast.ops.backends.cpu import cpu_isa

SHAPES = [(1024, 1024), (300, 784), (1024, 784), (500, 1024), (4096, 256)]  # (out, in)
BATCHES = [32, 128, 256]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch / kernel threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=11)
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = []
    print(f"ISA {cpu_isa()}, torch {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    with torch.no_grad():
        for out_f, in_f in SHAPES:
            w = torch.randn(out_f, in_f)
            words = ss.pack_bits(torch.rand(out_f, in_f) > 0.5)
            dense_w = w * ss.unpack_bits(words, in_f)
            for batch in BATCHES:
                x = torch.randn(batch, in_f)
                assert torch.allclose(ss.ops.masked_linear(x, w, words), F.linear(x, dense_w), rtol=1e-4, atol=1e-3)
                t = interleaved_medians({"ours": lambda: ss.ops.masked_linear(x, w, words),
                                         "dense": lambda: F.linear(x, dense_w)}, repeats=a.repeats, min_seconds=0.3)
                row = {"out": out_f, "in": in_f, "batch": batch, "ours_s": t["ours"], "dense_s": t["dense"],
                       "speed_vs_dense": t["dense"] / t["ours"]}
                rows.append(row)
                print(f"{out_f:5d} x {in_f:5d}  batch {batch:4d}: ours {t['ours'] * 1e3:7.3f} ms  dense {t['dense'] * 1e3:7.3f} ms"
                      f"  {row['speed_vs_dense']:.2f}x", flush=True)
    if a.out:
        rep = {**stamp(), "isa": cpu_isa(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": machine(),
               "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows}
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(rep, indent=2))


if __name__ == "__main__":
    main()
