"""The modes of a supermask layer and of per-task BatchNorm, set model-wide by the helpers in
:mod:`supsup_fast.nn.tasks`:

- ``Train(fused)``: the float scores of the task being learned give the mask (straight-through estimator;
  with ``fused``, :mod:`.fused_step`'s in-backward optimiser);
- ``OneTask(t)``: the packed mask t of the bank;
- ``Superposition(alpha, active, uniform)``: W ⊙ Σᵢ αᵢ Mᵢ over the bank (optionally an active subset
  of tasks); with ``uniform`` (α = 1/k, checked by :func:`check_uniform_alpha`) the forward uses a
  cached per-weight count of set bits and reads no mask bit.

Each mode has a ``kind`` string ("train", "task", "superpose") for code that must not import this
module (the distributed hooks).
"""
from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .. import ops


@dataclass(frozen=True, eq=False)
class Train:
    fused: Optional[object] = None  # a fused_step.FusedScoreState: the optimiser runs inside the backward
    kind = "train"


@dataclass(frozen=True)
class OneTask:
    task: int
    kind = "task"


@dataclass(frozen=True, eq=False)
class Superposition:
    alpha: Optional[torch.Tensor] = None  # per-task BatchNorm needs none: it normalises with batch statistics
    active: Optional[torch.Tensor] = None
    uniform: bool = False
    version: Optional[int] = None  # alpha's version counter when its uniformity was checked (None: none kept)
    kind = "superpose"


Mode = Union[Train, OneTask, Superposition]


# The last alpha found uniform: (weak reference, version counter, k). set_superposition hands the
# same alpha to every layer, so only the first one pays the check's host sync.
_uniform_ok: Optional[tuple] = None


def task_index(task) -> int:
    """``task`` as an int: ints, numpy integers and integer 0-d tensors pass; 1.5 is refused, not truncated."""
    try:
        return operator.index(task)
    except TypeError:
        raise TypeError(f"task must be an integer task index, got {task!r} ({type(task).__name__})") from None


def check_uniform_alpha(alpha: torch.Tensor, k: int, fresh: bool = False) -> None:
    """``uniform=True`` promises alpha = 1/k over the k superposed tasks: the layers then use their
    cached counts Σᵢ Mᵢ / k and never read alpha in the forward, so a non-uniform alpha would
    silently give the uniform superposition. Raises ValueError naming ``alpha`` if it is not.
    The value check (a host sync) is skipped inside a CUDA-graph capture, like the other data checks.
    ``fresh``: check the values even where this alpha, at this version, passed before (a new
    superposition: its values may have been written through ``.data``, which keeps the version)."""
    global _uniform_ok
    ops.checks.check_alpha(alpha, k)
    if k == 0 or ops.checks.capturing(alpha) or alpha.is_meta:
        return
    version, last = ops.checks.tensor_version(alpha), _uniform_ok  # an inference tensor's matches no verdict
    if not fresh and last is not None and last[0]() is alpha and last[1] == version and last[2] == k:
        return
    a = alpha.detach()
    if not torch.allclose(a, torch.full_like(a, 1.0 / k), rtol=1e-5, atol=1e-8):
        raise ValueError(f"uniform=True needs alpha = 1/k = {1.0 / k:.6g} for all {k} superposed tasks, "
                         f"got alpha values in [{float(a.min()):.6g}, {float(a.max()):.6g}]; pass uniform=False")
    _uniform_ok = (weakref.ref(alpha), version, k)
