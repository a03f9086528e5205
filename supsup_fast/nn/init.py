"""Frozen random weights, rebuilt bit-exactly from (kind, seed) on any machine."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

WEIGHT_INITS = ("signed_constant", "kaiming_normal")
RELU_GAIN = math.sqrt(2.0)


def frozen_weight(shape: Tuple[int, ...], fan_in: int, init: str, generator: torch.Generator,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """signed_constant: W = ±√2/√fan_in, each sign a fair coin (the paper's default).
    kaiming_normal: W ~ N(0, 2/fan_in). Drawn on the CPU from ``generator`` (inside a
    ``torch.device`` context too) so the same seed gives the same bits everywhere."""
    std = RELU_GAIN / math.sqrt(fan_in)
    if init == "signed_constant":
        signs = torch.randint(0, 2, shape, generator=generator, dtype=torch.int64, device="cpu") * 2 - 1
        return (signs.to(torch.float64) * std).to(dtype)
    if init == "kaiming_normal":
        return (torch.randn(shape, generator=generator, dtype=torch.float64, device="cpu") * std).to(dtype)
    raise ValueError(f"weight init must be one of {WEIGHT_INITS} or a tensor, got {init!r}")


def frozen_bias(out: int, fan_in: int, generator: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    bound = 1.0 / math.sqrt(fan_in)
    return ((torch.rand(out, generator=generator, dtype=torch.float64, device="cpu") * 2 - 1) * bound).to(dtype)


def make_generator(seed: Optional[int]) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(0 if seed is None else int(seed))
    return g
