"""Evaluating learned tasks under a scenario (reference doc §1.3).

GG: the task's own mask. GNs/GNu/NNs: per test batch, infer the task from the first
``infer_images`` images (only they go through the superposed net), then classify the whole batch
with the chosen single mask. GNu (unshared labels) scores the batch 0 when the task is wrong;
GNs (shared labels) keeps the prediction, and so does NNs, where the masks were allocated
without task identity and ``expected`` names the mask that counts as the right one. Per batch the
cost is one superposed fwd+bwd on a few images, which reads the k masks' bits once (the α-gradient),
plus one ordinary forward: evaluating k tasks is O(k) batches of O(k) bit reads, where the official
code's batches each build and read k float masks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from torch import nn

from ..data.tasks import TaskSplit
from ..nn import num_tasks, set_task
from ..nn.modes import task_index
from ..ops.registry import backend_for
from .calibration import CALIBRATIONS
from .checks import check_finite, check_positive_int
from .inference import METHODS, QueryLayoutError, check_scale, infer_oneshot_batched, infer_task, supports_batched
from .objectives import OBJECTIVES

SCENARIOS = ("GG", "GNs", "GNu", "NNs")


@dataclass
class EvalSettings:
    scenario: str = "GNu"
    inference: str = "oneshot"
    objective: str = "entropy"
    infer_images: int = 1
    batch_size: int = 128
    log_base: float = 2.0
    calibration: str = "none"  # per-mask scaling of the α-gradient (algorithms.calibration)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Each setting in its range (also rechecked by :func:`evaluate_task`: the fields can be reassigned)."""
        for name, choices in (("scenario", SCENARIOS), ("inference", METHODS), ("objective", OBJECTIVES),
                              ("calibration", CALIBRATIONS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"EvalSettings.{name} must be one of {choices}, got {getattr(self, name)!r}")
        for name in ("infer_images", "batch_size"):
            check_positive_int(f"EvalSettings.{name}", getattr(self, name))
        check_finite("EvalSettings.log_base", self.log_base, above=1.0)


@dataclass
class TaskEval:
    accuracy: float
    inferred_correctly: Optional[float]  # fraction of test batches whose task was inferred right
    batches: int
    inferred_tasks: Optional[List[int]] = None  # the task (mask) inferred for each test batch


def test_order(split: TaskSplit, task: int, seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(10_000 * seed + task)
    return g


@torch.no_grad()
def _predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(1)


class _SameMaskBatches:
    """Consecutive test batches classified with the same mask, run as one forward of up to
    ``max_bytes`` of input: on LeNet, 79 batches of 128 take 34 ms in 1,280-image forwards against 76
    ms one by one. Each image's prediction does not depend on its neighbours (eval mode)."""

    def __init__(self, model: nn.Module, max_bytes: int = 4 << 20):
        self.model, self.max_bytes = model, max_bytes
        self.task: Optional[int] = None
        self.xs: List[torch.Tensor] = []
        self.ys: List[torch.Tensor] = []
        self.bytes = self.correct = 0

    def add(self, task: int, xb: torch.Tensor, yb: torch.Tensor) -> None:
        size = xb.numel() * xb.element_size()
        if self.xs and (task != self.task or self.bytes + size > self.max_bytes):
            self._run()
        self.task = task
        self.xs.append(xb)
        self.ys.append(yb)
        self.bytes += size

    def _run(self) -> None:
        set_task(self.model, self.task)
        x = self.xs[0] if len(self.xs) == 1 else torch.cat(self.xs)
        y = self.ys[0] if len(self.ys) == 1 else torch.cat(self.ys)
        self.correct += int((_predict(self.model, x) == y).sum())
        self.xs, self.ys, self.bytes = [], [], 0

    def finish(self) -> int:
        """The number of correct predictions over every batch added."""
        if self.xs:
            self._run()
        return self.correct


def evaluate_task(model: nn.Module, split: TaskSplit, task: int, settings: EvalSettings, *, device: torch.device,
                  num_labels: int, seed: int = 0, on_batch: Optional[Callable[[], None]] = None,
                  expected: Optional[int] = None, alpha_scale: Optional[torch.Tensor] = None) -> TaskEval:
    """Accuracy on one task's test split (shuffled batches, fixed order per task and seed).
    ``expected``: the mask that counts as inferred correctly (default ``task``). ``alpha_scale`` [k]:
    per-mask factors of the α-gradient (``settings.calibration``, from :func:`.calibration.alpha_scale`)."""
    settings.validate()
    if settings.scenario != "GG" and settings.infer_images > settings.batch_size:
        raise ValueError(f"infer_images {settings.infer_images} exceeds the test batch size {settings.batch_size}: "
                         f"the task is inferred from images of one test batch")
    if settings.calibration != "none" and settings.scenario != "GG" and alpha_scale is None:
        raise ValueError(f"calibration {settings.calibration!r} needs alpha_scale (algorithms.calibration.alpha_scale)")
    name = "task (the mask that counts as inferred correctly, as expected is not given)" if expected is None \
        else "expected (the mask that counts as inferred correctly)"
    task = task_index(task)  # numpy integers are indices; 1.5 is refused
    expected = task if expected is None else task_index(expected)
    k = num_tasks(model)
    if not (0 <= expected < k or (settings.scenario == "NNs" and expected == -1)):
        raise ValueError(f"{name} must be an int in [0, {k}) for the model's {k} learned masks"
                         f"{' or -1 (no mask) under NNs' if settings.scenario == 'NNs' else ''}, got {expected!r}")
    check_scale(alpha_scale, k, "alpha_scale")
    if len(split) == 0:
        raise ValueError(f"split (task {task}'s test data) is empty; its accuracy would be 0 of 0")
    model.eval()
    correct = total = right_task = batches = 0
    chosen_per_batch: List[int] = []
    data = split.batches(settings.batch_size, shuffle=True, generator=test_order(split, task, seed))
    batched = None
    if (settings.scenario != "GG" and settings.inference == "oneshot" and settings.infer_images == 1
            and backend_for(device).fast_batched_inference and supports_batched(model)):
        # All of the task's queries (the first image of each test batch) in one batched pass.
        data = [(xb.to(device), yb.to(device)) for xb, yb in data]
        try:
            with torch.enable_grad():
                batched = infer_oneshot_batched(model, torch.cat([xb[:1] for xb, _ in data]), settings.objective,
                                                num_labels, alpha_scale).tolist()
        except QueryLayoutError:  # e.g. a sequence-first layer inside: one query at a time, the same choices
            batched = None
    pending = _SameMaskBatches(model)
    for xb, yb in data:
        xb, yb = xb.to(device), yb.to(device)
        batches += 1
        if settings.scenario == "GG":
            chosen = expected
        elif batched is not None:
            chosen = batched[batches - 1]
        else:
            with torch.enable_grad():
                chosen = infer_task(model, xb[: settings.infer_images], settings.inference, settings.objective,
                                    num_labels, settings.log_base, alpha_scale)
        chosen_per_batch.append(int(chosen))
        right_task += int(chosen == expected)
        total += len(yb)
        if on_batch is not None:
            on_batch()
        if settings.scenario == "GNu" and chosen != expected:
            continue
        pending.add(int(chosen), xb, yb)
    correct = pending.finish()
    gg = settings.scenario == "GG"
    return TaskEval(correct / max(total, 1), None if gg else right_task / max(batches, 1), batches,
                    None if gg else chosen_per_batch)
