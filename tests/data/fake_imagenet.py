"""Writes a tiny ImageNet in the real on-disk layout: <root>/train/<wnid>/*.JPEG, <root>/val/<wnid>/*.JPEG."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def write_fake_imagenet(root: Path, classes: int = 20, train_per_class: int = 4, val_per_class: int = 2,
                        seed: int = 0) -> Path:
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                h, w = int(rng.integers(24, 64)), int(rng.integers(24, 64))
                pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
                pixels[..., c % 3] = 40 + 10 * (c % 20)  # a class-dependent channel
                Image.fromarray(pixels).save(folder / f"n{c:08d}_{i}.JPEG", format="JPEG")
    return root
