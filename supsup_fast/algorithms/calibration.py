"""Per-mask calibration of task inference, for tasks of unequal difficulty.

Near the uniform superposition the one-shot gradient is, to first order, a correlation between the
superposed logits and each mask's logits: gᵢ = ∂H/∂αᵢ ≈ -(1/s)⟨z̄ - mean z̄, zᵢ - mean zᵢ⟩. A mask whose
logits are large everywhere (an easy, confident task) gets large |gᵢ| on any input, and a hard task's
own mask, with small logits, loses to it. Dividing gᵢ by the size of mask i's logits turns the
correlation into a cosine. Two measures of that size, from each task's own training images with its
own mask (a scalar per mask that training could store):

- ``entropy``: sqrt(log s - Hᵢ), Hᵢ the mean output entropy (nats). For near-uniform outputs
  log s - H ≈ ‖z - mean z‖² / 2s, so this is the logit norm that the baseline entropy implies.
- ``logit-norm``: the mean over images of ‖zᵢ - mean zᵢ‖ / sqrt(s), measured directly.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from ..data.tasks import TaskSplit
from ..nn import set_task

CALIBRATIONS = ("none", "entropy", "logit-norm")


@torch.no_grad()
def mask_baselines(model: nn.Module, splits: Sequence[TaskSplit], device: torch.device,
                   images: int = 1000) -> Dict[str, torch.Tensor]:
    """Mask i's mean output entropy (nats) and centred logit norm on the first ``images`` of
    ``splits[i]`` (task i's training split): {"entropy": [k], "logit_norm": [k]}."""
    if images < 1:
        raise ValueError(f"images must be >= 1, got {images}")
    model.eval()
    entropy, norm = [], []
    for i, split in enumerate(splits):
        set_task(model, i)
        x, _ = split.batch(torch.arange(min(images, len(split))))
        logits = model(x.to(device)).float()
        logp = torch.log_softmax(logits, dim=1)
        entropy.append(float(-(logp.exp() * logp).sum(1).mean()))
        centred = logits - logits.mean(1, keepdim=True)
        norm.append(float((centred.norm(dim=1) / math.sqrt(logits.shape[1])).mean()))
    return {"entropy": torch.tensor(entropy), "logit_norm": torch.tensor(norm)}


def alpha_scale(kind: str, baselines: Optional[Dict[str, torch.Tensor]], output_size: int) -> Optional[torch.Tensor]:
    """The factor each mask's α-gradient is multiplied by before the argmin (None for ``none``)."""
    if kind not in CALIBRATIONS:
        raise ValueError(f"calibration must be one of {CALIBRATIONS}, got {kind!r}")
    if kind == "none":
        return None
    if baselines is None:
        raise ValueError(f"calibration {kind!r} needs the masks' baselines (mask_baselines)")
    key = "entropy" if kind == "entropy" else "logit_norm"
    bad = (~torch.isfinite(baselines[key])).nonzero().flatten().tolist()
    if bad:  # a mask whose logits were not finite: its factor would decide every query's argmin
        raise ValueError(f"calibration {kind!r}: the {key} baseline of mask(s) {bad[:8]} is not finite (their logits on "
                         f"their own training images hold NaN or inf)")
    if kind == "entropy":
        size = (math.log(output_size) - baselines["entropy"]).clamp_min(1e-6).sqrt()
    else:
        size = baselines["logit_norm"].clamp_min(1e-6)
    return 1.0 / size
