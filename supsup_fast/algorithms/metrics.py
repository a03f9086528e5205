"""Continual-learning metrics.

R[j] is task j's accuracy right after it was trained (its own mask), F[j] its accuracy at the end
under the run's scenario. With T tasks:
- average accuracy = mean_j F[j];
- backward transfer (Lopez-Paz & Ranzato 2017, GEM) BWT = 1/(T-1) Σ_{j<T-1} (F[j] - R[j]);
- forgetting = 1/(T-1) Σ_{j<T-1} (R[j] - F[j]). Chaudhry et al. take the best accuracy over all
  earlier evaluations instead of R[j]; we evaluate every task right after training (and at the
  ``eval_at`` checkpoints), and the best of those is used, so the two agree when only R is known.
SupSup never changes a finished mask, so any forgetting measures task-inference errors.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence


def average(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")


def cl_metrics(after_training: List[float], final: List[float], history: Optional[List[List[float]]] = None) -> Dict[str, float]:
    T = len(final)
    if T < 2:
        return {"backward_transfer": 0.0, "forgetting": 0.0}
    best = list(after_training)
    for row in history or []:
        for j, acc in enumerate(row[: T]):
            best[j] = max(best[j], acc)
    bwt = average([final[j] - after_training[j] for j in range(T - 1)])
    forgetting = average([best[j] - final[j] for j in range(T - 1)])
    return {"backward_transfer": bwt, "forgetting": forgetting}
