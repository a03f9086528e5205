"""Signed-constant layers at 1-16 rows of x on the CPU: ``ss.ops.signed_masked_linear`` (weights as
sign and mask bits) beside dense ``F.linear`` on the materialised ±scale weight, and beside the direct
kernel that the table-lookup one (csrc/cpu/signed_lut.cpp, 1-4 rows) replaced, forced with
``SUPSUP_CPU_SIGNED_LUT=0`` in the same process. On every x86 ISA level this CPU has.

    python benchmarks/signed_small.py [--isa avx2 --isa avx512] [--threads 1] [--out benchmarks/results]

Each ISA runs in a child process with the kernels and torch capped to it (as kernels2.py), and writes
``signed-small-cpu-<isa>.json`` and a ``.png``. Interleaved medians of loops of calls, without autograd.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from kernels2 import _commit, _isas, run_per_isa  # noqa: E402

SHAPES = [(1024, 1024), (300, 784), (100, 300)]  # out x in: FC1024's hidden layer, LeNet's first and second
ROWS = [1, 2, 4, 8, 16]


def child(isa: str, out: Path, note: str) -> dict:
    import torch
    import torch.nn.functional as F

    import supsup_fast as ss
    from supsup_fast.bench import interleaved_medians, machine
    from supsup_fast.ops.backends.cpu import cpu_isa

    assert cpu_isa() == isa, f"asked for {isa}, the kernels run {cpu_isa()}"
    g = torch.Generator().manual_seed(0)
    rows = []
    state = {"lut": None}
    for out_f, in_f in SHAPES:
        m = torch.rand(out_f, in_f, generator=g) > 0.5
        s = torch.rand(out_f, in_f, generator=g) > 0.5
        mw, sw, scale = ss.pack_bits(m), ss.pack_bits(s), 0.05
        dense_w = scale * (2 * s.float() - 1) * m
        for b in ROWS:
            x = torch.randn(b, in_f, generator=g)

            def ours(lut: bool):
                if state["lut"] is not lut:  # set the environment only when the kernel changes (µs a call)
                    if lut:
                        os.environ.pop("SUPSUP_CPU_SIGNED_LUT", None)  # the default: lookups up to 4 rows
                    else:
                        os.environ["SUPSUP_CPU_SIGNED_LUT"] = "0"
                    state["lut"] = lut
                return ss.ops.signed_masked_linear(x, sw, mw, scale)

            with torch.no_grad():
                for lut in (True, False):
                    assert torch.allclose(ours(lut), F.linear(x, dense_w), rtol=1e-4, atol=1e-4)
                t = interleaved_medians({"ours": lambda: ours(True), "direct": lambda: ours(False),
                                         "dense": lambda: F.linear(x, dense_w)}, repeats=15, calls_per_sample=20)
            os.environ.pop("SUPSUP_CPU_SIGNED_LUT", None)
            state["lut"] = None
            row = {"out": out_f, "in": in_f, "rows": b, "ours_s": t["ours"], "direct_s": t["direct"], "dense_s": t["dense"],
                   "lut": b <= int(torch.ops.supsup_cpu.signed_lut_max_rows()),
                   "dense_over_ours": t["dense"] / t["ours"], "direct_over_ours": t["direct"] / t["ours"]}
            rows.append(row)
            print(f"{isa} {out_f}x{in_f} rows {b:2d}: ours {t['ours']*1e6:7.1f} µs  direct kernel {t['direct']*1e6:7.1f} µs  "
                  f"dense {t['dense']*1e6:7.1f} µs  ({row['dense_over_ours']:.2f}x dense)", flush=True)
    rep = {"isa": isa, "machine": machine(), "threads": torch.get_num_threads(), "commit": _commit(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "note": note, "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"signed-small-cpu-{isa}.json"
    path.write_text(json.dumps(rep, indent=2))
    plot(rep, path.with_suffix(".png"))
    return rep


def plot(rep: dict, path: Path) -> None:
    import matplotlib

    from supsup_fast.machine import cpu_label
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(SHAPES), figsize=(4.2 * len(SHAPES), 3.6))
    for ax, (out_f, in_f) in zip(axes, SHAPES):
        rs = [r for r in rep["rows"] if (r["out"], r["in"]) == (out_f, in_f)]
        b = [r["rows"] for r in rs]
        for key, label, style in (("ours_s", "signed_masked_linear", "o-"), ("direct_s", "direct kernel (SUPSUP_CPU_SIGNED_LUT=0)", "s--"),
                                  ("dense_s", "dense F.linear", "^:")):
            ax.plot(b, [r[key] * 1e6 for r in rs], style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{out_f} x {in_f}")
        ax.set_xlabel("rows of x")
    axes[0].set_ylabel("µs per call")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"signed-constant layer, CPU {rep['isa']} ({cpu_label(rep['machine'])}, {rep['threads']} threads)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--isa", action="append", choices=["scalar", "avx2", "avx512"], help="default: every level this CPU has")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--threads", type=int, default=None, help="torch / kernel threads (default: torch's)")
    p.add_argument("--note", default="", help="how the machine was used meanwhile (stored in the JSON)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        if a.threads:
            import torch
            torch.set_num_threads(a.threads)
        child(a.isa[0], a.out, a.note)
        return
    run_per_isa(Path(__file__), a.isa or _isas(), ["--out", str(a.out)] + (["--threads", str(a.threads)] if a.threads else [])
                + (["--note", a.note] if a.note else []))


if __name__ == "__main__":
    main()
