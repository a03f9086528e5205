"""The module-level helpers of the notebook and of the official ``utils.py``."""
from __future__ import annotations

from typing import Iterator, Tuple

import torch
from torch import nn

from .bn import MultitaskNonAffineBN
from .layers import MultitaskMaskMixin


def _multitask(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, MultitaskMaskMixin))


def set_model_task(model: nn.Module, task: int, verbose: bool = True) -> None:
    """Every mask layer (and per-task BN) uses ``task``; < 0 selects the superposition."""
    for n, m in model.named_modules():
        if isinstance(m, (MultitaskMaskMixin, MultitaskNonAffineBN)):
            if verbose:
                print(f"=> Set task of {n} to {task}")
            m.task = task


def cache_masks(model: nn.Module, verbose: bool = False) -> None:
    """Pack the current scores into bits (``m.cache_masks()`` on every module that has it,
    as both the notebook helper and ``utils.cache_masks`` do)."""
    for n, m in model.named_modules():
        if hasattr(m, "cache_masks"):
            if verbose:
                print(f"=> Caching mask state for {n}")
            m.cache_masks()


def clear_masks(model: nn.Module) -> None:
    for m in model.modules():
        if hasattr(m, "clear_masks"):
            m.clear_masks()


def set_mask(model: nn.Module, task: int) -> None:
    for m in model.modules():
        if hasattr(m, "set_mask"):
            m.set_mask(task)


def set_num_tasks_learned(model: nn.Module, num_tasks_learned: int, verbose: bool = False) -> None:
    if isinstance(num_tasks_learned, bool) or not isinstance(num_tasks_learned, int) or num_tasks_learned < 0:
        raise ValueError(f"num_tasks_learned must be an int >= 0, got {num_tasks_learned!r}")
    for n, m in _multitask(model):
        if verbose:
            print(f"=> Setting learned tasks of {n} to {num_tasks_learned}")
        m.num_tasks_learned = num_tasks_learned


def set_alphas(model: nn.Module, alphas: torch.Tensor, verbose: bool = True) -> None:
    """Superposition coefficients, shape [num_tasks, 1, 1] (linear) or [num_tasks, 1, 1, 1, 1]."""
    if not isinstance(alphas, torch.Tensor):
        raise TypeError(f"alphas must be a torch.Tensor, got {type(alphas).__name__}")
    for n, m in _multitask(model):
        if verbose:
            print(f"=> Setting alphas for {n}")
        m.alphas = alphas


def _convs(model: nn.Module) -> Iterator[Tuple[str, nn.Module]]:
    # The official freezing helpers act on every nn.Conv2d (its layers are all convolutions).
    return ((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))


def freeze_model_weights(model: nn.Module) -> None:
    for _, m in _convs(model):
        m.weight.requires_grad_(False)
        m.weight.grad = None


def unfreeze_model_weights(model: nn.Module) -> None:
    for _, m in _convs(model):
        m.weight.requires_grad_(True)


def _task_scores(m: nn.Module, task_idx: int):
    scores = getattr(m, "scores", None)
    if isinstance(m, MultitaskMaskMixin):
        return scores[task_idx] if task_idx in scores else None  # a packed task has no float scores
    return scores[task_idx] if scores is not None else None


def freeze_model_scores(model: nn.Module, task_idx: int) -> None:
    for _, m in _convs(model):
        if isinstance(m, MultitaskMaskMixin):  # also a packed task's: its scores, when made again, start frozen
            m._frozen.add(task_idx)
        s = _task_scores(m, task_idx)
        if s is not None:
            s.requires_grad_(False)
            s.grad = None


def unfreeze_model_scores(model: nn.Module, task_idx: int) -> None:
    for _, m in _convs(model):
        if isinstance(m, MultitaskMaskMixin):
            m._frozen.discard(task_idx)
        s = _task_scores(m, task_idx)
        if s is not None:
            s.requires_grad_(True)
