"""The settings the official code reads from its global ``args`` when it builds a layer
(``num_tasks``, ``sparsity``, ``train_weight_tasks``), and whether a layer keeps every task's float
scores (``keep_scores``).

Constructor keywords win; otherwise the values given to :func:`configure` are used.
"""
from __future__ import annotations

import numbers
from typing import Optional

_SETTINGS = {"num_tasks": None, "sparsity": 0.5, "train_weight_tasks": 0, "keep_scores": False}


def configure(num_tasks: Optional[int] = None, sparsity: Optional[float] = None,
              train_weight_tasks: Optional[int] = None, keep_scores: Optional[bool] = None) -> dict:
    """Set the defaults of the compat layers built afterwards: the official ``args.num_tasks``,
    ``args.sparsity`` and ``args.train_weight_tasks`` (0, SupSup's setting, freezes the weights; any
    other value leaves them trainable, as upstream), and ``keep_scores``: keep every task's float
    scores beside its bits, as the official layer does (for code that reads a finished task's
    scores, e.g. trainers/reinit.py's transfer; memory as upstream). Returns the settings now in force."""
    if num_tasks is not None:
        _SETTINGS["num_tasks"] = check_num_tasks(num_tasks)
    if sparsity is not None:
        _SETTINGS["sparsity"] = check_sparsity(sparsity)
    if train_weight_tasks is not None:
        if isinstance(train_weight_tasks, bool) or not isinstance(train_weight_tasks, numbers.Integral):
            raise ValueError(f"train_weight_tasks must be an int (args.train_weight_tasks), got {train_weight_tasks!r}")
        _SETTINGS["train_weight_tasks"] = int(train_weight_tasks)
    if keep_scores is not None:
        if not isinstance(keep_scores, bool):
            raise ValueError(f"keep_scores must be True or False, got {keep_scores!r}")
        _SETTINGS["keep_scores"] = keep_scores
    return dict(_SETTINGS)


def scores_kept() -> bool:
    return _SETTINGS["keep_scores"]


def weights_frozen() -> bool:
    """Whether a new layer freezes its weight (official: ``args.train_weight_tasks == 0``)."""
    return _SETTINGS["train_weight_tasks"] == 0


def check_num_tasks(num_tasks) -> int:
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, numbers.Integral) or num_tasks < 1:
        raise ValueError(f"num_tasks must be an int >= 1, got {num_tasks!r}")
    return int(num_tasks)


def check_sparsity(sparsity) -> float:
    # The official name: the fraction of weights *kept* by the top-k mask (0.5 by default).
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real) or not 0.0 < float(sparsity) <= 1.0:
        er = (" (with --er-sparsity, args.sparsity is the Erdős–Rényi multiplier: leave it out here, main.py "
              "sets each layer's m.sparsity from it)" if isinstance(sparsity, numbers.Real) and sparsity > 1 else "")
        raise ValueError(f"sparsity must be a float in (0, 1] (fraction of weights kept), got {sparsity!r}{er}")
    return float(sparsity)


def resolve_num_tasks(num_tasks: Optional[int], default: Optional[int] = None) -> int:
    if num_tasks is None:
        num_tasks = _SETTINGS["num_tasks"] if _SETTINGS["num_tasks"] is not None else default
        if num_tasks is None:
            raise ValueError("num_tasks is not set: pass num_tasks=N to the layer or call "
                             "supsup_fast.compat.configure(num_tasks=N) first")
    return check_num_tasks(num_tasks)


def resolve_sparsity(sparsity: Optional[float]) -> float:
    return check_sparsity(_SETTINGS["sparsity"] if sparsity is None else sparsity)
