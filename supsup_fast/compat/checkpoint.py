"""Official float-score checkpoints (``scores.{i}``, ``stacked``) <-> packed bits."""
from __future__ import annotations

import argparse
import numbers
import pathlib
import pickle
from collections import OrderedDict
from typing import Dict, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .. import ops
from ..atomic_files import atomic_write_bytes
from .layers import MultitaskMaskMixin, scores_beyond

PathOrDict = Union[str, pathlib.Path, Mapping[str, object]]


def _read(source: PathOrDict, weights_only: bool) -> Mapping[str, torch.Tensor]:
    if isinstance(source, (str, pathlib.Path)):
        path = pathlib.Path(source)
        if not path.is_file():
            raise ValueError(f"path {str(path)!r} is not a file")
        # Official checkpoints pickle their argparse args (with paths and devices) beside the state dict.
        with torch.serialization.safe_globals([argparse.Namespace, pathlib.PosixPath, pathlib.WindowsPath, torch.device]):
            try:
                source = torch.load(path, map_location="cpu", weights_only=weights_only)
            except (pickle.UnpicklingError, EOFError, OSError, RuntimeError, ValueError) as exc:
                raise ValueError(f"path {str(path)!r} is not a readable torch checkpoint (truncated, corrupt or "
                                 f"another format): {type(exc).__name__}: {exc}") from exc
    if not isinstance(source, Mapping):
        raise TypeError(f"path must be a file or a state dict / checkpoint dict, got {type(source).__name__}")
    sd = source.get("state_dict", source)
    if not isinstance(sd, Mapping):
        raise TypeError(f"the checkpoint's state_dict must be a mapping, got {type(sd).__name__}")
    return sd


def _strip_data_parallel(sd: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    own = set(model.state_dict().keys())
    if sd and all(k.startswith("module.") for k in sd) and not any(k.startswith("module.") for k in own):
        return OrderedDict((k[len("module."):], v) for k, v in sd.items())  # saved from nn.DataParallel
    return OrderedDict(sd)


def load_official_checkpoint(model: nn.Module, path: PathOrDict, strict: bool = True,
                             weights_only: bool = True) -> nn.Module:
    """Load an official SupSup checkpoint (a file written by its ``main.py``, or a state dict) into a
    model built from :mod:`supsup_fast.compat` layers: every task's float scores become bits, and
    no float scores are kept (with ``configure(keep_scores=True)`` they are, beside the bits).
    ``weights_only=False`` unpickles anything: only for trusted files."""
    sd = _strip_data_parallel(_read(path, weights_only), model)
    if strict:  # the clearer message for the usual cause of unexpected scores keys
        for name, m in model.named_modules():
            beyond = scores_beyond(sd, f"{name}." if name else "", m.num_tasks) if isinstance(m, MultitaskMaskMixin) else []
            if beyond:
                raise ValueError(f"the checkpoint holds scores of task(s) {beyond} for layer {name!r}, built with "
                                 f"num_tasks={m.num_tasks}: build the model with num_tasks >= {beyond[-1] + 1} "
                                 f"(or pass strict=False to load the first {m.num_tasks} tasks)")
    _check_shapes(model, sd)  # before anything is copied: load_state_dict copies tensor by tensor
    result = model.load_state_dict(sd, strict=strict)
    for m in model.modules():
        if isinstance(m, MultitaskMaskMixin):
            for t in m.scores.tasks():
                m._commit(t)
                if not m.keep_scores:  # keep_scores: the checkpoint's float scores stay, as upstream
                    m.scores.pop(t)
            task, m._task = m._task, None
            if task is not None:  # the selected task stays selected (upstream's load leaves `task` alone)
                m.task = task
    if not strict and (result.missing_keys or result.unexpected_keys):
        print(f"load_official_checkpoint: missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    return model


def _check_shapes(model: nn.Module, sd: Mapping[str, object]) -> None:
    """Refuse a checkpoint with a tensor of another shape than the model's (a weight, a BN buffer,
    a task's scores) before any is loaded, naming them."""
    own = model.state_dict()
    wrong = [f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in the model" for k, v in sd.items()
             if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape]
    for name, m in model.named_modules():
        if isinstance(m, MultitaskMaskMixin):
            prefix = f"{name}." if name else ""
            wrong += [f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(m.weight.shape)} in the model"
                      for k, v in sd.items() if k.startswith(prefix + "scores.") and k[len(prefix) + 7:].isdigit()
                      and isinstance(v, torch.Tensor) and v.shape != m.weight.shape]
    if wrong:
        raise ValueError(f"the checkpoint does not fit the model (nothing was loaded): {'; '.join(wrong[:5])}"
                         f"{' ...' if len(wrong) > 5 else ''}")


def official_state_dict(model: nn.Module, stacked: bool = False) -> Dict[str, torch.Tensor]:
    """The model's state in the official layout: ``scores.{i}`` for all ``num_tasks`` tasks (scores
    rebuilt from the bits for packed tasks: same masks) and, if asked, the float ``stacked`` masks
    (a fresh official model has that buffer only after ``cache_masks()``: by default it is left out,
    so that ``load_state_dict`` of a fresh official model takes the file as it is)."""
    sd = model.state_dict()
    for name, m in model.named_modules():
        if not isinstance(m, MultitaskMaskMixin):
            continue
        prefix = f"{name}." if name else ""
        for key in [k for k in sd if k in (prefix + "mask_bits", prefix + "mask_untrained") or k.startswith(prefix + "scores.")]:
            del sd[key]
        masks = []
        for i in range(m.num_tasks):
            s = m.scores.live(i).detach().clone() if i in m.scores else m.stored_scores(i)
            sd[f"{prefix}scores.{i}"] = s
            masks.append(m._pack(s))
        if stacked:
            bits = torch.stack(masks)
            sd[prefix + "stacked"] = torch.stack([
                ops.unpack_bits(b, m.bank.n).view_as(m.weight).to(m.weight.dtype) for b in bits])
    return sd


def save_official_checkpoint(model: nn.Module, path: Union[str, pathlib.Path], stacked: bool = False, *,
                             epoch: int = 0, arch: Optional[str] = None, best_acc1: Optional[Sequence[float]] = None,
                             curr_acc1: Optional[Sequence[float]] = None) -> None:
    """Write the model for the official code to load (atomically), with the keys of its ``main.py``'s
    ``final.pt``: ``state_dict`` (:func:`official_state_dict`), ``epoch``, ``arch`` (by default the
    model's class name) and ``best_acc1`` / ``curr_acc1``, one accuracy per task (by default zeros
    for the model's ``num_tasks``), which ``main.py --resume`` reads. Its pickled ``args`` are left
    out, so that the file loads with ``torch.load(weights_only=True)``."""
    if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
        raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
    if arch is not None and not isinstance(arch, str):
        raise ValueError(f"arch must be a string (the model's name), got {type(arch).__name__}")
    num_tasks = max((m.num_tasks for m in model.modules() if isinstance(m, MultitaskMaskMixin)), default=0)
    accuracies = {name: _accuracies(name, values, num_tasks) for name, values in
                  (("best_acc1", best_acc1), ("curr_acc1", curr_acc1))}
    state = {"epoch": int(epoch), "arch": type(model).__name__ if arch is None else arch,
             "state_dict": official_state_dict(model, stacked), **accuracies}
    atomic_write_bytes(path, lambda tmp: torch.save(state, tmp))


def _accuracies(name: str, values: Optional[Sequence[float]], num_tasks: int) -> list:
    """One float per task (zeros when None), as the official main.py keeps best_acc1 / curr_acc1."""
    if values is None:
        return [0.0] * num_tasks
    try:
        values = list(values)
        if len(values) != num_tasks or any(isinstance(v, bool) for v in values):
            raise TypeError
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must hold one accuracy per task ({num_tasks} numbers), got {values!r}") from None
