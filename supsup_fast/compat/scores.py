"""Float scores of the compat layers: only the task being trained has them.

``ScoreList`` names its Parameters by task index, so ``named_parameters()`` yields
``scores.{t}`` exactly as the official ``nn.ParameterList`` does (the main repository picks the
current task's parameters by that name). ``ScoreStream`` regenerates, on demand, the initial
scores the official layer draws for every task at construction.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn


def as_task_index(value: object, what: str) -> int:
    """``value`` (an int, a numpy integer or a one-element tensor) as an int; else TypeError(``what``)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what}, got {value!r}")
    return int(value)


class ScoreList(nn.Module):
    """Live score Parameters by task index (at most one in the usual flow).

    Reads like the official ``nn.ParameterList`` of all ``num_tasks`` scores: ``scores[t]`` (negative
    t from the end), ``scores[a:b]`` (a list), ``len`` and iteration cover every task, and a task
    without live scores is made live by ``materialize`` (the owning layer's: rebuilt from its bits,
    or its initial scores). Iterating therefore holds every task's float scores, as upstream."""

    def __init__(self):
        super().__init__()
        self.materialize: Optional[Callable[[int], nn.Parameter]] = None
        # the owner's look at a state dict's scores before they load: returns scores for the live
        # tasks the dict does not carry
        self.before_load: Optional[Callable[[Dict[int, torch.Tensor]], Dict[int, torch.Tensor]]] = None
        self.num_tasks: Optional[int] = None

    def __getitem__(self, task: Union[int, slice]) -> Union[nn.Parameter, List[nn.Parameter]]:
        if isinstance(task, slice):
            return [self[t] for t in range(self._size())[task]]
        task = as_task_index(task, "scores index must be an int or a slice")
        if task < 0:
            task += self._size()
        key = str(task)
        if key in self._parameters:
            return self._parameters[key]
        if self.materialize is None:
            raise KeyError(f"task {task} has no float scores; live scores: {self.tasks()}")
        return self.materialize(task)

    def _size(self) -> int:
        if self.num_tasks is None:
            raise TypeError("negative indices and slices need the layer's num_tasks")
        return self.num_tasks

    def live(self, task: int) -> nn.Parameter:
        return self._parameters[str(task)]

    def __contains__(self, task: object) -> bool:
        """Whether ``task`` has live float scores (reading ``scores[task]`` would make them)."""
        if isinstance(task, bool) or not isinstance(task, numbers.Integral):  # numpy integers count, as upstream's list
            return False
        return str(int(task)) in self._parameters

    def __len__(self) -> int:
        return self._size()

    def __iter__(self) -> Iterator[nn.Parameter]:
        return (self[t] for t in range(self._size()))

    def tasks(self) -> List[int]:
        return sorted(int(k) for k in self._parameters)

    def put(self, task: int, scores: nn.Parameter) -> None:
        self.register_parameter(str(int(task)), scores)

    def pop(self, task: int) -> nn.Parameter:
        return self._parameters.pop(str(int(task)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        carried = {int(key[len(prefix):]): value for key, value in state_dict.items()
                   if key.startswith(prefix) and key[len(prefix):].isdigit()}
        # A saved model may hold scores for tasks this one has not started: made live (the owner's
        # device and dtype) to load into.
        for task, value in carried.items():
            if str(task) not in self._parameters:
                if self.materialize is not None:
                    self.materialize(task)
                else:
                    self.register_parameter(str(task), nn.Parameter(torch.empty_like(value)))
        if self.before_load is not None:
            for task, value in self.before_load(carried).items():
                state_dict[f"{prefix}{task}"] = value  # loaded below like the others
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


def _draw(out: torch.Tensor, generator=None) -> torch.Tensor:
    # The official score init: kaiming_uniform_(a=√5), i.e. U(-1/√fan_in, 1/√fan_in).
    return nn.init.kaiming_uniform_(out, a=math.sqrt(5), generator=generator)


class ScoreStream:
    """The official layer draws ``num_tasks`` score tensors from torch's global RNG when it is
    built. We save the RNG state, advance the global RNG by the same draws (so the rest of a
    script, e.g. DataLoader shuffling, sees the same random numbers as with the official layer)
    and regenerate task t's draw when it is needed. Sequential tasks cost one draw each."""

    def __init__(self, shape: Tuple[int, ...], num_tasks: int):
        self.shape = tuple(shape)
        self.num_tasks = num_tasks
        self.start = torch.get_rng_state()
        scratch = torch.empty(self.shape)
        for _ in range(num_tasks):
            _draw(scratch)
        self._gen = None
        self._next = 0

    def scores(self, task: int) -> torch.Tensor:
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task must be in [0, num_tasks={self.num_tasks}), got {task}")
        if self._gen is None or task < self._next:
            self._gen = torch.Generator()
            self._gen.set_state(self.start)
            self._next = 0
        out = torch.empty(self.shape)
        while self._next <= task:
            _draw(out, self._gen)
            self._next += 1
        return out

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_gen"], state["_next"] = None, 0
        return state
