"""Run outputs beside results.json: a CSV per task and a PNG of accuracy per task."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Union


def write_csv(results: dict, path: Union[str, Path]) -> None:
    rows = zip(range(len(results["per_task_accuracy"])), results["accuracy_after_training"],
               results["per_task_accuracy"], results["per_task_inference_accuracy"] or [None] * len(results["per_task_accuracy"]))
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["task", "accuracy_after_training", "final_accuracy", "task_inference_accuracy"])
        for t, a, f, i in rows:
            w.writerow([t, f"{a:.6f}", f"{f:.6f}", "" if i is None else f"{i:.6f}"])


def write_plot(results: dict, path: Union[str, Path]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = results["config"]
    tasks = list(range(1, len(results["per_task_accuracy"]) + 1))
    rows = results["accuracy_matrix"]
    fig, axes = plt.subplots(1, 2 if len(rows) > 1 else 1, figsize=(11 if len(rows) > 1 else 6.5, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot(tasks, results["accuracy_after_training"], "o-", label="right after training (own mask)")
    ax.plot(tasks, results["per_task_accuracy"], "s-", label=f"final ({cfg['scenario']})")
    if results["per_task_inference_accuracy"] is not None:
        ax.plot(tasks, results["per_task_inference_accuracy"], "^--", label="task inferred correctly")
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
