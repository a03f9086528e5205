"""A run's output files: results.json (and progress.json) written atomically, a CSV per task, a
PNG of accuracy per task, and the machine a run was made on."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional, Union

import torch

from ..atomic_files import atomic_write_bytes
from ..machine import host_record
from .rundir import RunDirError


def machine_info(device: torch.device, backend: Optional[str] = None) -> dict:
    """The machine a run's results came from. Their last bits depend on the instruction set the
    kernels ran (summation order), so with ``backend`` "cpu" (this package's C++ kernels) it names
    theirs (``SUPSUP_CPU_ISA`` caps it), and torch's own in every case."""
    info = host_record()
    if backend == "cpu":  # the run loaded the extension already
        from ..ops.backends.cpu import cpu_isa
        info["cpu_isa"] = cpu_isa()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_json(path: Path, data: dict) -> None:
    def writer(tmp):
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=2)
    atomic_write_bytes(path, writer)


def read_json(path: Path, what: str, remedy: str = "delete it to rebuild it") -> dict:
    """A JSON object from ``path``; a file that is unreadable, not JSON or not an object is refused,
    naming it, ``what`` it is and the ``remedy``."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunDirError(f"{what} {path} is unreadable or not valid JSON ({exc}); {remedy}") from exc
    if not isinstance(data, dict):
        raise RunDirError(f"{what} {path} must hold a JSON object")
    return data




def write_csv(results: dict, path: Union[str, Path]) -> None:
    k = len(results["per_task_accuracy"])
    rows = zip(range(k), results["accuracy_after_training"], results["per_task_accuracy"],
               results["per_task_inference_accuracy"] or [None] * k, results.get("task_names") or [""] * k)
    def writer(tmp):
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["task", "accuracy_after_training", "final_accuracy", "task_inference_accuracy", "task_name"])
            for t, a, f, i, name in rows:
                w.writerow([t, f"{a:.6f}", f"{f:.6f}", "" if i is None else f"{i:.6f}", name])
    atomic_write_bytes(path, writer)


def write_plot(results: dict, path: Union[str, Path]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = results["config"]
    tasks = list(range(1, len(results["per_task_accuracy"]) + 1))
    rows = results["accuracy_matrix"]
    fig, axes = plt.subplots(1, 2 if len(rows) > 1 else 1, figsize=(11 if len(rows) > 1 else 6.5, 4), squeeze=False)
    ax = axes[0][0]
    many = len(tasks) > 100  # thousands of tasks: dots, no lines
    style = dict(linestyle="none", markersize=2) if many else {}
    ax.plot(tasks, results["accuracy_after_training"], "o" if many else "o-", label="right after training (own mask)", **style)
    ax.plot(tasks, results["per_task_accuracy"], "s" if many else "s-", label=f"final ({cfg['scenario']})", **style)
    if results["per_task_inference_accuracy"] is not None:
        ax.plot(tasks, results["per_task_inference_accuracy"], "^" if many else "^--", label="task inferred correctly",
                **style)
    ax.set_xlabel("task")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{cfg['scenario']} {cfg['benchmark']} {cfg['model']} s={results['output_size']}: "
                 f"avg {results['average_accuracy']:.4f}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if len(rows) > 1:
        ax2 = axes[0][1]
        ax2.plot([r["tasks_learned"] for r in rows], [r["average_accuracy"] for r in rows], "o-")
        ax2.set_xlabel("tasks learned")
        ax2.set_ylabel("average accuracy")
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    try:
        atomic_write_bytes(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
