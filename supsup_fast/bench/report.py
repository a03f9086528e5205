"""``supsup-fast bench``: every suite, written as JSON and a plot with the machine named."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from ..machine import cpu_label, host_record
from ..ops.backends.cpu import cpu_isa
from ..ops.registry import backend_for, use_backend
from .suites import bench_alpha_gradient, bench_gnu_evaluation, bench_memory, bench_single_task_forward, bench_training_step


def machine() -> dict:
    """``host_record`` with the backend the benchmarks ran and, on the ``cpu`` backend, the ISA of its
    kernels and the switches that tune them (each is CPU-dependent; env vars force them)."""
    info = {**host_record(), "backend": backend_for(torch.device("cpu")).name}
    if info["backend"] == "cpu":
        info["cpu_isa"] = cpu_isa()
        info["cpu_vendor"] = str(torch.ops.supsup_cpu.vendor())
        info["stream_prefetch"] = bool(torch.ops.supsup_cpu.stream_prefetch())
        info["stream_prefetch_l2"] = bool(torch.ops.supsup_cpu.stream_prefetch_l2())
        info["shift_indices"] = bool(torch.ops.supsup_cpu.shift_indices())
        info["wide_gemm_tiles"] = bool(torch.ops.supsup_cpu.wide_gemm_tiles())
        info["short_gemm_chunks"] = bool(torch.ops.supsup_cpu.short_gemm_chunks())
    return info


def stamp() -> dict:
    """When, and from which commit of a git checkout (``unknown`` for an installed copy), a report ran;
    ``+dirty`` after the commit where tracked files differ from it (the report is not that commit's)."""
    import datetime
    import subprocess
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here,
                                capture_output=True, text=True, check=True, timeout=10).stdout.strip() or "unknown"
        # (the results folder aside: a benchmark run after another, which wrote there, is still of the commit)
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                  ":(top,exclude)benchmarks/results"], cwd=here,
                                 capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        commit += "+dirty" if changed and commit != "unknown" else ""
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit}


def run_report(out: Path, quick: bool = False, backend: str = "auto", progress: bool = True) -> dict:
    """Run every benchmark with ``backend`` and write ``cpu-<backend>[-quick].{json,png}`` to ``out``;
    with ``progress``, a line on stderr as each suite starts and ends."""
    with use_backend(backend):
        return _run_report(Path(out), quick, progress)


def _run_report(out: Path, quick: bool, progress: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    if quick:
        ks, fs_max, batches, mem_ks = [1, 10], 10, [1, 128], [1, 10, 100]
    else:
        ks, fs_max, batches, mem_ks = [1, 10, 50, 250, 2500], 250, [1, 16, 128, 1024, 8192], [1, 10, 100, 250, 1000, 2500]
    suites = [
        ("alpha_gradient_fc1024_s500", f"α-gradient, FC1024 s=500, k = {', '.join(map(str, ks))}",
         lambda: bench_alpha_gradient(ks, fs_max)),
        ("single_task_forward_1024", f"single-task forward 1024², batch {', '.join(map(str, batches))}",
         lambda: bench_single_task_forward(batches)),
        ("training_step_fc1024_b128", "training step, FC1024, batch 128", bench_training_step),
        ("gnu_evaluation", "GNu evaluation" + ("" if quick else " (FC1024 k = 250, LeNet k = 2,500)"),
         lambda: [bench_gnu_evaluation("fc1024", 500, 10 if quick else 250, 1 if quick else 2)] +
                 ([] if quick else [bench_gnu_evaluation("lenet", 500, 2500, 2)])),
        ("memory_fc1024_s500", f"memory, FC1024 s=500, k = {', '.join(map(str, mem_ks))}", lambda: bench_memory(mem_ks)),
    ]
    report = {"machine": machine(), **stamp(), "quick": quick}
    for i, (key, label, run) in enumerate(suites, 1):
        if progress:
            print(f"bench [{i}/{len(suites)}] {label} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        report[key] = run()
        if progress:
            print(f"bench [{i}/{len(suites)}] done in {_duration(time.perf_counter() - start)}", file=sys.stderr, flush=True)
    name = f"cpu-{report['machine']['backend']}" + ("-quick" if quick else "")
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    plot_report(report, out / f"{name}.png")
    print_table(report)
    return report


def report_title(info: dict) -> str:
    """The machine line of a report's plot: CPU, threads, backend, the ISA its kernels ran (cpu
    backend) and torch with the ISA of its own kernels."""
    kernels = f" ({info['cpu_isa']} kernels)" if info.get("cpu_isa") else ""
    # Reports written before the key was named torch_cpu_capability call it cpu_capability.
    capability = info.get("torch_cpu_capability", info.get("cpu_capability", "?"))
    return (f"supsup_fast on {cpu_label(info)}, {info['threads']} threads, {info['backend']} backend{kernels}, "
            f"torch {info['torch']} ({capability})")


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def print_table(report: dict) -> None:
    print(f"machine: {report_title(report['machine'])}" + (f"; {report['date']}, commit {report['commit']}" if "date" in report else ""))
    print("alpha-gradient, FC1024 s=500, 1 image")
    for r in report["alpha_gradient_fc1024_s500"]:
        fs = f"float-stack {r['float_stack_s']*1e3:9.1f} ms  speed-up {r['speedup_vs_float_stack']:7.1f}x" if "float_stack_s" in r else "float-stack   (not run)"
        print(f"  k={r['k']:5d}  ours {r['ours_s']*1e3:9.1f} ms  {fs}  floor {r['memory_floor_s']*1e3:8.2f} ms  ours/floor {r['ours_vs_floor']:6.1f}")
    print("single-task forward 1024x1024 (speed vs dense on the materialised weight)")
    for r in report["single_task_forward_1024"]:
        print(f"  batch {r['batch']:5d}  layer {r['ours_s']*1e6:9.1f} us  dense {r['dense_s']*1e6:9.1f} us  {r['ours_vs_dense_speed']:.2f}x"
              f"   (op on a float weight: {r['op_vs_dense_speed']:.2f}x)")
    for e in report["gnu_evaluation"]:
        print(f"GNu evaluation {e['model']} s={e['output_size']} k={e['k']}: {e['seconds_per_batch']*1e3:.1f} ms per test batch, "
              f"{e['seconds_per_task']:.2f} s per task, all {e['k']} tasks projected {_duration(e['projected_seconds_all_tasks'])}")
    t = report["training_step_fc1024_b128"]
    loop = f", in loops of {t['steps_per_sample']} steps" if "steps_per_sample" in t else ""
    print(f"training step FC1024 b128{loop}: ours {t['ours_s']*1e3:.1f} ms, plain-torch STE {t['plain_torch_ste_s']*1e3:.1f} ms "
          f"({t['ours_vs_plain_speed']:.2f}x), three-GEMM floor {t['three_gemms_s']*1e3:.1f} ms")
    if "single_call" in t:
        c = t["single_call"]
        print(f"  one step at a time: ours {c['ours_s']*1e3:.1f} ms, plain-torch STE {c['plain_torch_ste_s']*1e3:.1f} ms "
              f"({c['ours_vs_plain_speed']:.2f}x)")


def plot_report(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    rows = report["alpha_gradient_fc1024_s500"]
    ax = axes[0]
    ax.loglog([r["k"] for r in rows], [r["ours_s"] for r in rows], "o-", label=f"packed ({report['machine']['backend']})")
    fs = [r for r in rows if "float_stack_s" in r]
    ax.loglog([r["k"] for r in fs], [r["float_stack_s"] for r in fs], "s-", label="float-stack (official)")
    ax.loglog([r["k"] for r in rows], [r["memory_floor_s"] for r in rows], "--", label="memory floor (2 passes)")
    _label(ax, "tasks k", "seconds", "α-gradient, FC1024 s=500, 1 image")
    mem = report["memory_fc1024_s500"]
    ax = axes[1]
    ax.loglog([r["k"] for r in mem], [r["packed_bytes"] for r in mem], "o-", label="packed bits")
    ax.loglog([r["k"] for r in mem], [r["float_stack_bytes"] for r in mem], "s-", label="float32 masks (official)")
    ax.axhline(24 * 2 ** 30, color="gray", ls=":", label="24 GiB")
    _label(ax, "tasks k", "bytes of masks", "mask memory, FC1024 s=500")
    fw = report["single_task_forward_1024"]
    ax = axes[2]
    ax.semilogx([r["batch"] for r in fw], [r["ours_vs_dense_speed"] for r in fw], "o-", label="SupermaskLinear (signed-constant)")
    ax.semilogx([r["batch"] for r in fw], [r["op_vs_dense_speed"] for r in fw], "s--", label="masked_linear, float weight")
    ax.legend(fontsize=8)
    ax.axhline(1.0, color="gray", ls=":")
    ax.set_xlabel("batch")
    ax.set_ylabel("speed vs dense (higher is better)")
    ax.set_title("single-task packed forward 1024×1024")
    ax.grid(alpha=0.3, which="both")
    fig.suptitle(report_title(report["machine"]), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _label(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
