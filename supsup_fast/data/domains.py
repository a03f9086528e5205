"""Two extra 28x28 image domains in MNIST's format (uint8 [N, 28, 28], white on black, int64 labels 0..9)
for mixed-domain continual learning: sklearn's bundled 8x8 digits upsampled to 28x28, and procedural shapes."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SHAPE_CLASSES = ("circle", "disc", "square", "filled_square", "triangle", "plus", "x", "equals", "bullseye",
                 "diamond")
_NUM_DIGITS = 1797  # images in sklearn's load_digits


@dataclass
class DomainData:
    """uint8 images [N, 28, 28] and int64 labels [N] for both splits (MNIST's layout)."""
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: str


def _check_int(name: str, value, low: int, high: float = math.inf) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        bound = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an int {bound}, got {value!r}")


def sklearn_digits_28(seed: int = 0, test_size: int = 297) -> DomainData:
    """sklearn's 1797 bundled 8x8 digits, bilinearly upsampled to 20x20 and centred in 28x28 like MNIST;
    the last ``test_size`` of a fixed ``RandomState(seed)`` permutation are the test split."""
    _check_int("test_size", test_size, 1, _NUM_DIGITS - 1)
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("the sklearn-digits domain needs scikit-learn: pip install scikit-learn "
                          "(or the package's test extra)") from e
    digits = load_digits()
    x = torch.from_numpy(np.asarray(digits.images, dtype=np.float32) * (255.0 / 16.0))[:, None]
    x = F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False)
    images = F.pad(x.round().clamp(0, 255).to(torch.uint8)[:, 0], (4, 4, 4, 4))
    labels = torch.from_numpy(np.asarray(digits.target, dtype=np.int64))
    perm = torch.from_numpy(np.random.RandomState(seed).permutation(len(labels)))
    train, test = perm[:-test_size], perm[-test_size:]
    return DomainData(images[train], labels[train], images[test], labels[test],
                      f"sklearn load_digits ({len(labels)} 8x8 images) upsampled to 28x28, seed {seed}")


def _segment(u: torch.Tensor, v: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """Distance to the horizontal segment from (-half, 0) to (half, 0)."""
    return torch.hypot((u.abs() - half).clamp(min=0), v)


def _polygon(u: torch.Tensor, v: torch.Tensor, sides: int, apothem: torch.Tensor, phase: float) -> torch.Tensor:
    """Signed distance (exact inside, sharp-cornered outside) to a regular polygon; a face normal at ``phase``."""
    angles = phase + 2 * math.pi * torch.arange(sides) / sides
    return (u[..., None] * angles.cos() + v[..., None] * angles.sin()).amax(-1) - apothem


def _shape_distance(c: int, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Class ``c``'s distance in pixels, negative inside the ink: intensity = clamp(0.5 - d, 0, 1)."""
    ln, k = torch.hypot(u, v), math.sqrt(0.5)
    stroke = {0: lambda: (ln - r).abs(),
              2: lambda: _polygon(u, v, 4, 0.75 * r, 0.0).abs(),
              4: lambda: _polygon(u, v - 0.2 * r, 3, 0.5 * r, math.pi / 2).abs(),
              5: lambda: torch.minimum(_segment(u, v, r), _segment(v, u, r)),
              6: lambda: torch.minimum(_segment(k * (u + v), k * (v - u), r), _segment(k * (u - v), k * (u + v), r)),
              7: lambda: torch.minimum(_segment(u, v - 0.4 * r, r), _segment(u, v + 0.4 * r, r)),
              8: lambda: torch.minimum((ln - r).abs(), ln - 0.3 * r + w / 2),
              9: lambda: _polygon(u, v, 4, 0.75 * r, math.pi / 4).abs()}
    filled = {1: lambda: ln - 0.8 * r, 3: lambda: _polygon(u, v, 4, 0.65 * r, 0.0)}
    return filled[c]() if c in filled else stroke[c]() - w / 2


def _render(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    labels = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]
    rand = torch.rand(n, 5, generator=g)
    cx, cy = (14 + 6 * (rand[:, :2] - 0.5)).unbind(1)  # centre within +-3 px of the middle
    r = (6 + 4 * rand[:, 2])[:, None, None]  # size ("radius") 6..10 px
    # Pose jitter of +-15 degrees only: full rotation would make square/diamond and plus/x the same class.
    theta = (math.pi / 6 * (rand[:, 3] - 0.5))[:, None, None]
    w = (1.2 + 1.3 * rand[:, 4])[:, None, None]  # stroke width 1.2..2.5 px
    ys, xs = torch.meshgrid(torch.arange(28) + 0.5, torch.arange(28) + 0.5, indexing="ij")
    dx, dy = xs - cx[:, None, None], ys - cy[:, None, None]
    u, v = theta.cos() * dx + theta.sin() * dy, theta.cos() * dy - theta.sin() * dx
    images = torch.empty(n, 28, 28)
    for c in range(10):  # one vectorised pass per class, not per image
        m = labels == c
        images[m] = (0.5 - _shape_distance(c, u[m], v[m], r[m], w[m])).clamp(0, 1)
    images = (images + 0.08 * torch.randn(n, 28, 28, generator=g)).clamp(0, 1)  # Gaussian pixel noise
    return (images * 255).round().to(torch.uint8), labels.to(torch.int64)


def shapes_28(num_train: int = 6000, num_test: int = 1000, seed: int = 0) -> DomainData:
    """10 balanced classes of rendered shapes (``SHAPE_CLASSES``) with random centre, size, small rotation,
    stroke width and pixel noise; deterministic in ``seed``, train and test from one generator stream."""
    _check_int("num_train", num_train, 10)
    _check_int("num_test", num_test, 10)
    _check_int("seed", seed, 0)
    g = torch.Generator().manual_seed(int(seed))
    train_images, train_labels = _render(int(num_train), g)
    test_images, test_labels = _render(int(num_test), g)
    return DomainData(train_images, train_labels, test_images, test_labels,
                      f"procedural shapes ({', '.join(SHAPE_CLASSES)}), 28x28, seed {seed}")
