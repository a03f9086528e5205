"""The settings the official code reads from its global ``args`` (``num_tasks``, ``sparsity``).

Constructor keywords win; otherwise the values given to :func:`configure` are used.
"""
from __future__ import annotations

from typing import Optional

_SETTINGS = {"num_tasks": None, "sparsity": 0.5}


def configure(num_tasks: Optional[int] = None, sparsity: Optional[float] = None) -> dict:
    """Set the defaults of the compat layers (the official ``args.num_tasks`` / ``args.sparsity``).
    Returns the settings now in force."""
    if num_tasks is not None:
        _SETTINGS["num_tasks"] = check_num_tasks(num_tasks)
    if sparsity is not None:
        _SETTINGS["sparsity"] = check_sparsity(sparsity)
    return dict(_SETTINGS)


def check_num_tasks(num_tasks) -> int:
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks must be an int >= 1, got {num_tasks!r}")
    return num_tasks


def check_sparsity(sparsity) -> float:
    # The official name: the fraction of weights *kept* by the top-k mask (0.5 by default).
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 < float(sparsity) <= 1.0:
        raise ValueError(f"sparsity must be a float in (0, 1] (fraction of weights kept), got {sparsity!r}")
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
