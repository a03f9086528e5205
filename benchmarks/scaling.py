"""Scale-out table: tasks per hour trained and queries per second evaluated, one process against
torchrun ranks, on this machine; plus a projection to W ranks from the measured times.

    python benchmarks/scaling.py [--tasks 8] [--iters 300] [--repeats 3] [--out benchmarks/results]

Each configuration is a real CLI run (`supsup-fast run` / `torchrun -m supsup_fast run`) on the
embedded MNIST subset (the time of a training iteration does not depend on the data set size):
  1 process x 2 threads      OMP_NUM_THREADS=2 supsup-fast run ...
  2 ranks x 1 thread (task)  OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 -m supsup_fast run ...
  2 ranks x 1 thread (data)  ... --parallel data
and for evaluation `evaluate RUN` in one process x 2 threads, over 2 ranks (tasks spread), and
over 2 ranks with --shard-bank. Times are the runs' own `timing.train` / `timing.eval` (wall
clock of the phase, all ranks together), medians over ``--repeats``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from supsup_fast.bench.report import stamp
from supsup_fast.machine import cpu_label, host_record

RUN = ["--scenario", "GNu", "--model", "lenet", "--output-size", "100", "--no-progress"]


def _cmd(ranks: int, args: list) -> list:
    if ranks == 1:
        return [sys.executable, "-m", "supsup_fast", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
            "-m", "supsup_fast", *args]


def _run(ranks: int, threads: int, args: list) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run(_cmd(ranks, args), env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    out = Path(args[args.index("--out") + 1])
    return json.loads((out / "results.json").read_text())


def cpu_isa() -> str:
    try:
        from supsup_fast.ops.backends.cpu import cpu_isa as isa
        return isa()
    except Exception:  # the report still names the CPU below
        return "unknown"


def measure(tasks: int, iters: int, repeats: int, work: Path) -> dict:
    train_modes = {"1 process x 2 threads": (1, 2, []), "2 ranks x 1 thread (task-parallel)": (2, 1, []),
                   "2 ranks x 1 thread (data-parallel)": (2, 1, ["--parallel", "data"])}
    rows, eval_rows, ref_run = [], [], None
    for name, (ranks, threads, extra) in train_modes.items():
        times, per_task = [], []
        for r in range(repeats):
            out = work / f"train-{len(rows)}-{r}"
            res = _run(ranks, threads, ["run", *RUN, "--tasks", str(tasks), "--iters", str(iters), *extra,
                                        "--out", str(out)])
            times.append(res["timing"]["train"])
            per_task.append(res["timing"].get("train_task_seconds_sum", res["timing"]["train"]) / tasks)
            if ref_run is None:
                ref_run = out
        t = statistics.median(times)
        rows.append({"mode": name, "ranks": ranks, "threads_per_rank": threads, "train_seconds": t,
                     "train_seconds_all": times, "tasks_per_hour": 3600 * tasks / t,
                     "seconds_per_task_on_one_rank": statistics.median(per_task)})
    eval_modes = {"1 process x 2 threads": (1, 2, []), "2 ranks x 1 thread (tasks spread)": (2, 1, []),
                  "2 ranks x 1 thread (--shard-bank)": (2, 1, ["--shard-bank"])}
    for name, (ranks, threads, extra) in eval_modes.items():
        times, queries, per_rank = [], 0, None
        for r in range(repeats):
            out = work / f"eval-{len(eval_rows)}-{r}"
            res = _run(ranks, threads, ["evaluate", str(ref_run), *extra, "--out", str(out), "--no-progress"])
            times.append(res["timing"]["eval"])
            queries = res["timing"]["eval_queries"]  # one task inference per test batch
            per_rank = res["distributed"]["bank_bytes_per_rank"]
        t = statistics.median(times)
        eval_rows.append({"mode": name, "ranks": ranks, "eval_seconds": t, "eval_seconds_all": times,
                          "queries": queries, "queries_per_second": queries / t, "bank_bytes_per_rank": per_rank})
    return {"train": rows, "evaluate": eval_rows}


def projection(train_rows: list, tasks: int, widths=(1, 2, 4, 8, 16, 64)) -> list:
    """Task-parallel tasks per hour at W ranks, from the measured 2-rank run: every rank spends the
    measured seconds per task plus the per-task share of what the 2-rank wall time adds on top
    (start-up, segment barriers, store round trips), and ranks do not slow each other."""
    two = next(r for r in train_rows if r["mode"].startswith("2 ranks") and "task" in r["mode"])
    per_task = two["seconds_per_task_on_one_rank"]
    overhead = max(0.0, (2 * two["train_seconds"] - per_task * tasks) / tasks)
    return [{"ranks": w, "projected_tasks_per_hour": 3600 * w / (per_task + overhead),
             "seconds_per_task": per_task, "overhead_seconds_per_task": overhead,
             "assumes": "one free core (or GPU) per rank; per-task time and overhead as measured at 2 ranks"}
            for w in widths]


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    tr, ev, pr = report["train"], report["evaluate"], report["projection"]
    axes[0].barh([r["mode"] for r in tr], [r["tasks_per_hour"] for r in tr])
    axes[0].set_xlabel("tasks per hour (LeNet, measured)")
    axes[1].barh([r["mode"] for r in ev], [r["queries_per_second"] for r in ev])
    axes[1].set_xlabel("task-inference queries per second (measured)")
    axes[2].plot([p["ranks"] for p in pr], [p["projected_tasks_per_hour"] for p in pr], "o--")
    axes[2].set_xscale("log", base=2)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("ranks (projection)")
    axes[2].set_ylabel("tasks per hour")
    fig.suptitle(f"supsup_fast scale-out on {cpu_label(report['machine'])} ({report['machine']['cpu_count']} cores, "
                 f"{report['machine']['cpu_isa']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="supsup-scaling-"))
    try:
        report = measure(args.tasks, args.iters, args.repeats, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["projection"] = projection(report["train"], args.tasks)
    report["machine"] = {**host_record(), "cpu_isa": cpu_isa()}
    report.update(stamp())
    report["settings"] = {"tasks": args.tasks, "iters": args.iters, "repeats": args.repeats, "model": "lenet",
                          "output_size": 100, "data": "embedded MNIST subset"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling-cpu.json").write_text(json.dumps(report, indent=2))
    plot(report, out / "scaling-cpu.png")
    one = report["train"][0]["train_seconds"]
    for r in report["train"]:
        print(f"train  {r['mode']:38s} {r['train_seconds']:7.2f} s  {r['tasks_per_hour']:9.0f} tasks/h  "
              f"{one / r['train_seconds']:.2f}x")
    for r in report["evaluate"]:
        print(f"eval   {r['mode']:38s} {r['eval_seconds']:7.2f} s  {r['queries_per_second']:9.1f} queries/s  "
              f"bank bytes per rank {r['bank_bytes_per_rank']}")
    for r in report["projection"]:
        print(f"projection {r['ranks']:3d} ranks: {r['projected_tasks_per_hour']:9.0f} tasks/h")


if __name__ == "__main__":
    main()
