"""Measure (not project) the GNu evaluation of 250 tasks x 79 test batches, FC1024 s=500, on the
active backend: per batch, one-shot task inference on 1 image, then the chosen mask on the batch.
Random ~50% masks and random inputs (the work does not depend on which masks were learned).

    python benchmarks/gnu_eval_250.py [--tasks 250] [--out benchmarks/results/gnu-eval-250-cpu.json]
"""
import argparse
import json
import os
import sys
from pathlib import Path

from supsup_fast.bench import bench_gnu_evaluation, machine
from supsup_fast.bench.report import stamp

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--tasks", type=int, default=250)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "gnu-eval-250-cpu.json"))
    a = p.parse_args()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)  # a bad --out fails now, not after the measurement
    if Path(a.out).is_dir() or not os.access(Path(a.out).parent, os.W_OK):
        sys.exit(f"--out {a.out}: not a writable file path")
    r = bench_gnu_evaluation("fc1024", 500, a.tasks, tasks_timed=a.tasks)
    r["measured_seconds_all_tasks"] = r["seconds_per_task"] * a.tasks
    r["machine"] = machine()
    r.update(stamp())
    Path(a.out).write_text(json.dumps(r, indent=2))
    print(f"{a.tasks} tasks x {r['batches_per_task']} batches: {r['measured_seconds_all_tasks'] / 60:.1f} min "
          f"({r['seconds_per_batch'] * 1e3:.1f} ms per batch)")
