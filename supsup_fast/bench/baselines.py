"""The real alternatives the package is measured against: a model holding k random masks, and
the official code's float-stack superposition of it; and the package's own α-gradient through its
ops, which they are measured against."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .. import ops

from .. import nn as snn
from ..algorithms.objectives import entropy
from ..models import build_model


def random_model_with_masks(name: str, output_size: int, k: int, seed: int = 0) -> torch.nn.Module:
    """A model whose banks hold k random ~50% masks (as trained GNu masks are)."""
    model = build_model(name, output_size, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for layer in snn.supermask_layers(model).values():
        words = torch.randint(-(2 ** 31), 2 ** 31 - 1, (k, *layer.bank.row_shape), generator=g, dtype=torch.int64)
        words = words.to(torch.int32)
        pad = layer.bank.row_shape[1] * 32 - layer.n
        if pad:  # canonical layout: pad bits are zero
            words[..., -1] &= (1 << (32 - pad)) - 1
        layer.append_packed(words)
    for bn in model.modules():
        if isinstance(bn, snn.MultitaskBatchNorm):
            bn.append_stats(torch.zeros(k, bn.num_features), torch.ones(k, bn.num_features))
    return model


class FloatStackMLP:
    """The official implementation's superposition: float {0,1} masks stacked per layer,
    W ⊙ (α[:, None, None] * stack).sum(0) under autograd (reference doc §1.4, §4)."""

    def __init__(self, model: torch.nn.Module):
        self.layers = list(snn.supermask_layers(model).values())
        self.stacks = [ops.unpack_bits(l.bank.words, l.n).float().view(-1, *l.weight.shape) for l in self.layers]

    def alpha_gradient(self, x: torch.Tensor) -> torch.Tensor:
        k = self.stacks[0].shape[0]
        alpha = torch.full((k,), 1.0 / k, device=x.device, requires_grad=True)
        h = x.flatten(1)
        for i, (layer, stack) in enumerate(zip(self.layers, self.stacks)):
            h = F.linear(h, layer.weight * (alpha.view(-1, 1, 1) * stack).sum(0))
            if i < len(self.layers) - 1:
                h = F.relu(h)
        return torch.autograd.grad(entropy(h, 10), alpha)[0]


def ops_alpha_gradient(layers: Sequence[torch.nn.Module], x: torch.Tensor, alpha: torch.Tensor,
                       copies_t: Optional[Sequence[torch.Tensor]] = None,
                       copies_w: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
    """The entropy's α-gradient of a ReLU MLP of supermask layers for input x under a general α,
    through ``ops.superposed_linear`` layer by layer (no bias), given the layers' task-interleaved
    (``copies_t``) and weight-interleaved (``copies_w``) copies where passed."""
    a = alpha.detach().clone().requires_grad_(True)
    h = x
    for i, layer in enumerate(layers):
        h = ops.superposed_linear(h, layer.weight, layer.bank.words, a,
                                  bank_t=None if copies_t is None else copies_t[i],
                                  bank_w=None if copies_w is None else copies_w[i])
        if i < len(layers) - 1:
            h = F.relu(h)
    return torch.autograd.grad(entropy(h, 10), a)[0]
