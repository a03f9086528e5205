"""Task inference's forward through a ReLU MLP: each layer's input, the logits' gradient of the
inference objective in closed form, and how many of them are nonzero (the copies task inference reads
are picked by it). One C++ call on the cpu backend."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import checks
from .dispatch import eager_without_grad, outside_autocast, under_autocast
from .registry import backend_for

OBJECTIVES = ("entropy", "superfluous")


def logit_gradients(name: str, logits: Tensor, num_labels: int) -> Tensor:
    """Row j: the gradient of objective ``name`` of example j alone w.r.t. its logits (that of
    ``objective(logits) * q``), in closed form: no autograd graph for a query's few hundred logits.
    Entropy: ∂H/∂z = -p ⊙ (log p + H). Superfluous: softmax(z) on the superfluous neurons (index ≥
    ``num_labels``), 0 on the real ones (their logits are detached)."""
    if name == "entropy":
        logp = torch.log_softmax(logits, dim=1)
        p = logp.exp()
        h = -(p * logp).sum(1, keepdim=True)
        return -p * (logp + h)
    if name == "superfluous":
        check_num_labels(num_labels, logits.shape[1])
        g = torch.softmax(logits, dim=1)
        g[:, :num_labels] = 0
        return g
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {name!r}")


def check_num_labels(num_labels: int, outputs: int) -> None:
    """``num_labels``, the real classes (the outputs past them are superfluous neurons), is an int in
    [1, outputs] where G reads it: past the outputs its gradient would be all zero and every query task 0."""
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or not 1 <= num_labels <= outputs:
        raise ValueError(f"num_labels (the real classes) must be an int in [1, {outputs}], the model's outputs; "
                         f"got {num_labels!r}")


def _check_layers(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]]) -> None:
    """Each weight [out, in] takes the previous layer's output; each bias is None or [out]; all of x's
    dtype and device (a bias of [1] would broadcast, a wrong one fail inside ATen, naming neither)."""
    features = x.shape[1]
    for i, (w, b) in enumerate(zip(weights, biases)):
        checks._floating(f"weights[{i}]", w)
        if w.dim() != 2 or w.shape[1] != features:
            raise ValueError(f"weights[{i}] must be [out, {features}] (the previous layer's outputs), got shape "
                             f"{tuple(w.shape)}")
        if b is not None:
            checks._floating(f"biases[{i}]", b)
            if tuple(b.shape) != (w.shape[0],):
                raise ValueError(f"biases[{i}] must be None or of shape [{w.shape[0]}], got shape {tuple(b.shape)}")
        for name, t in ((f"weights[{i}]", w), (f"biases[{i}]", b)):
            if t is not None and (t.dtype != x.dtype or t.device != x.device):
                raise ValueError(f"{name} must be {x.dtype} on {x.device} as x, got {t.dtype} on {t.device}")
        features = w.shape[0]


def mlp_logit_gradients(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]], objective: str,
                        num_labels: int, count_nonzero: bool = True,
                        check: bool = True) -> Tuple[List[Tensor], Tensor, Optional[List[int]]]:
    """x [q, n] through the linear layers ``weights`` / ``biases`` with ReLU between them: returns
    each layer's input [x, h_1, ..., h_{L-1}], the logits' gradient g [q, out] of ``objective``
    (``logit_gradients``) and, with ``count_nonzero``, the count of nonzeros of each input and of g
    (L + 1 ints; None without). The cpu backend runs the same ATen ops on contiguous operands in one
    C++ call (the same floats). An eager fast path, not a registered op: the counts are host ints.
    ``check=False`` skips the check of the weights' and biases' shapes and dtypes (a caller passing a
    model's own layers, whose shapes hold by construction, saves its few µs a query). Under autocast
    it runs outside it, in x's dtype, as the cpu backend's C++ call does."""
    if under_autocast(x):
        return outside_autocast(mlp_logit_gradients, x, x.dtype, weights, biases, objective, num_labels, count_nonzero, check)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if objective == "superfluous" and len(weights) >= 1:
        check_num_labels(num_labels, weights[-1].shape[0])
    if len(weights) < 1 or len(biases) != len(weights):
        raise ValueError(f"mlp_logit_gradients needs one weight and one bias (or None) per layer, got {len(weights)} "
                         f"weights and {len(biases)} biases")
    checks._floating("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must be [q, n], got shape {tuple(x.shape)}")
    if check:
        _check_layers(x, weights, biases)
    fused = getattr(backend_for(x.device), "mlp_logit_gradients", None)
    if fused is not None and eager_without_grad(x, *weights, *biases):
        out = fused(x, list(weights), list(biases), objective, num_labels)
        if out is not None:
            return out if count_nonzero else (out[0], out[1], None)
    inputs = [x.contiguous()]
    h = inputs[0]
    for i, (w, b) in enumerate(zip(weights, biases)):
        h = F.linear(h, w.contiguous(), b)
        if i + 1 < len(weights):
            h = h.relu()
            inputs.append(h)
    g = logit_gradients(objective, h, num_labels)
    return inputs, g, [int(torch.count_nonzero(t)) for t in (*inputs, g)] if count_nonzero else None
