"""The scale-out acceptance check on the full MNIST: the same 4-task GNu LeNet run three ways,

    D: OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 -m supsup_fast run ARGS --out D
    S: OMP_NUM_THREADS=1 supsup-fast run ARGS --out S
    T: OMP_NUM_THREADS=2 supsup-fast run ARGS --out T

D's model.safetensors must equal S's tensor by tensor and its results must equal S's; D's training
time (``timing.train``) is compared with T's. Then ``evaluate S --shard-bank`` over 2 ranks must
equal ``evaluate S`` with each rank holding at most 60 % of the mask bytes.

    python benchmarks/scaling_check.py --data-root ../shared/data/mnist [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from scaling import _run, cpu_isa
from supsup_fast.bench.report import stamp
from supsup_fast.machine import host_record

HERE = Path(__file__).resolve().parent
COMPARED = ("per_task_accuracy", "per_task_inference_accuracy", "accuracy_after_training", "average_accuracy",
            "task_inference_accuracy", "num_masks", "mask_bytes")


def same_tensors(a: Path, b: Path) -> bool:
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return set(ta) == set(tb) and all(bool((ta[k] == tb[k]).all()) for k in ta)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--repeats", type=int, default=3, help="timed runs of D and T each (median)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "scaling-check-cpu.json")
    a = p.parse_args()
    a.out.parent.mkdir(parents=True, exist_ok=True)  # a bad --out fails now, not after the runs
    if a.out.is_dir() or not os.access(a.out.parent, os.W_OK):
        sys.exit(f"--out {a.out}: not a writable file path")
    args = ["run", "--scenario", "GNu", "--benchmark", "permuted-mnist", "--model", "lenet", "--output-size", "100",
            "--tasks", str(a.tasks), "--iters", str(a.iters), "--data-root", a.data_root, "--no-progress"]
    work = Path(tempfile.mkdtemp(prefix="scaling-check-"))
    try:
        report = _check(a, args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    a.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("model_tensors_D_equal_S", "results_D_equal_S", "train_seconds_median",
                                             "speedup_D_vs_T", "sharded_evaluation_equal", "max_rank_share_of_mask_bytes")}, indent=2))
    failed = [k for k in ("model_tensors_D_equal_S", "results_D_equal_S", "sharded_evaluation_equal") if not report[k]]
    if report["max_rank_share_of_mask_bytes"] > 0.6:
        failed.append("max_rank_share_of_mask_bytes")
    if failed:
        sys.exit(f"scaling check failed: {', '.join(failed)} (see {a.out})")


def _check(a, args, work: Path) -> dict:
    times = {"D (2 ranks x 1 thread)": [], "T (1 process x 2 threads)": []}
    s = _run(1, 1, args + ["--out", str(work / "S")])
    for i in range(a.repeats):  # interleaved, so drift in the machine's load hits both alike
        d = _run(2, 1, args + ["--out", str(work / f"D{i}")])
        t = _run(1, 2, args + ["--out", str(work / f"T{i}")])
        times["D (2 ranks x 1 thread)"].append(d["timing"]["train"])
        times["T (1 process x 2 threads)"].append(t["timing"]["train"])
    equal_tensors = all(same_tensors(work / f"D{i}", work / "S") for i in range(a.repeats))
    equal_results = all(json.loads((work / f"D{i}" / "results.json").read_text()).get(k) == s.get(k)
                        for i in range(a.repeats) for k in COMPARED)
    plain = _run(1, 2, ["evaluate", str(work / "S"), "--out", str(work / "E1"), "--no-progress"])
    sharded = _run(2, 1, ["evaluate", str(work / "S"), "--shard-bank", "--out", str(work / "E2"), "--no-progress"])
    per_rank = sharded["distributed"]["bank_bytes_per_rank"]
    median = {k: statistics.median(v) for k, v in times.items()}
    report = {
        "command": " ".join(["python", "benchmarks/scaling_check.py", *sys.argv[1:]]),
        "machine": {**host_record(), "cpu_isa": cpu_isa()},
        **stamp(),
        "settings": {"tasks": a.tasks, "iters": a.iters, "repeats": a.repeats},
        "model_tensors_D_equal_S": equal_tensors,
        "results_D_equal_S": equal_results,
        "train_seconds_S_1_process_1_thread": s["timing"]["train"],
        "train_seconds_runs": times,
        "train_seconds_median": median,
        "speedup_D_vs_T": median["T (1 process x 2 threads)"] / median["D (2 ranks x 1 thread)"],
        "sharded_evaluation_equal": all(plain.get(k) == sharded.get(k) for k in ("per_task_accuracy", "per_task_inference_accuracy")),
        "bank_bytes_per_rank": per_rank,
        "max_rank_share_of_mask_bytes": max(per_rank) / sharded["mask_bytes"],
        "average_accuracy": s["average_accuracy"],
    }
    return report


if __name__ == "__main__":
    main()
