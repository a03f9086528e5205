"""SupSup networks built from supermask layers (every layer masked, the output layer included;
no biases, as the official code). ``build_model`` records its arguments in ``model.spec`` so a
mask-bank file can rebuild the frozen weights bit-exactly."""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .nn import MultitaskBatchNorm, SupermaskConv2d, SupermaskLinear, er_density
from .nn.hopfield import NeuronMaskBatchNorm
from .nn.init import frozen_weight, make_generator

MODELS = ("fc1024", "lenet", "gemresnet18", "resnet18", "resnet50", "bnnet")


class LayerFactory:
    """Creates supermask layers in a fixed order from one generator (weights are a function of
    the seed and the architecture only), with the mask function and per-layer density."""

    def __init__(self, seed: int, init: str, mask_fn: str, density: Optional[float], er_multiplier: Optional[float]):
        self.gen = make_generator(seed)
        self.init, self.mask_fn, self.density, self.er = init, mask_fn, density, er_multiplier

    def _density(self, c_out, c_in, kh=1, kw=1) -> float:
        if self.er is not None:
            return er_density(c_out, c_in, kh, kw, self.er)
        return 0.5 if self.density is None else self.density

    def linear(self, i: int, o: int) -> SupermaskLinear:
        return SupermaskLinear(i, o, init=self.init, mask_fn=self.mask_fn, density=self._density(o, i), generator=self.gen)

    def conv(self, i: int, o: int, k: int, stride: int = 1, padding: int = 0) -> SupermaskConv2d:
        return SupermaskConv2d(i, o, k, stride=stride, padding=padding, init=self.init, mask_fn=self.mask_fn,
                               density=self._density(o, i, k, k), generator=self.gen)


class MLP(nn.Module):
    """784-h1-...-out with ReLU (FC1024: 1024-1024, LeNet-300-100)."""

    def __init__(self, f: LayerFactory, sizes: List[int]):
        super().__init__()
        self.layers = nn.ModuleList(f.linear(i, o) for i, o in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        x = x.flatten(1)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


class BNNet(nn.Module):
    """HopSupSup's network (reference doc §1.9): 784 → 2048 → BN-mask → Swish → 2048 → BN-mask →
    Swish → s. The linear weights are frozen signed constants and are not masked; each task's
    mask selects neurons through the BN weight."""

    def __init__(self, gen: torch.Generator, sizes: List[int], init: str):
        super().__init__()
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            self.register_buffer(f"w{i}", frozen_weight((b, a), a, init, gen))
        self.bns = nn.ModuleList(NeuronMaskBatchNorm(h) for h in sizes[1:-1])

    def forward(self, x):
        x = x.flatten(1)
        for i, bn in enumerate(self.bns):
            x = F.silu(bn(F.linear(x, getattr(self, f"w{i}"))))
        return F.linear(x, getattr(self, f"w{len(self.bns)}"))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, f: LayerFactory, c_in: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = f.conv(c_in, planes, 3, stride, 1)
        self.bn1 = MultitaskBatchNorm(planes)
        self.conv2 = f.conv(planes, planes, 3, 1, 1)
        self.bn2 = MultitaskBatchNorm(planes)
        self.shortcut = None
        if stride != 1 or c_in != planes:
            self.shortcut = nn.Sequential(f.conv(c_in, planes, 1, stride, 0), MultitaskBatchNorm(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, f: LayerFactory, c_in: int, planes: int, stride: int):
        super().__init__()
        out = planes * 4
        self.conv1, self.bn1 = f.conv(c_in, planes, 1), MultitaskBatchNorm(planes)
        self.conv2, self.bn2 = f.conv(planes, planes, 3, stride, 1), MultitaskBatchNorm(planes)
        self.conv3, self.bn3 = f.conv(planes, out, 1), MultitaskBatchNorm(out)
        self.shortcut = None
        if stride != 1 or c_in != out:
            self.shortcut = nn.Sequential(f.conv(c_in, out, 1, stride, 0), MultitaskBatchNorm(out))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nn.Module):
    """ResNet with masked convs, per-task non-affine BN and a 1×1 masked conv head.

    stem="cifar": 3×3 stride-1 stem (GEMResNet18 and ResNet-18 on 32×32 inputs);
    stem="imagenet": 7×7 stride-2 stem + 3×3 max-pool (ResNet-50 on 224×224)."""

    def __init__(self, f: LayerFactory, block, layers: List[int], widths: List[int], output_size: int,
                 stem: str, in_channels: int = 3):
        super().__init__()
        if stem == "cifar":
            self.stem = nn.Sequential(f.conv(in_channels, widths[0], 3, 1, 1), MultitaskBatchNorm(widths[0]), nn.ReLU())
        else:
            self.stem = nn.Sequential(f.conv(in_channels, widths[0], 7, 2, 3), MultitaskBatchNorm(widths[0]), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
        c = widths[0]
        stages = []
        for i, (n, w) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(n):
                blocks.append(block(f, c, w, (1 if i == 0 else 2) if j == 0 else 1))
                c = w * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = f.conv(c, output_size, 1)

    def forward(self, x):
        x = self.stages(self.stem(x))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.head(x).flatten(1)


def build_model(name: str, output_size: int, *, seed: int = 0, init: str = "signed_constant",
                mask_fn: Optional[str] = None, density: Optional[float] = None,
                er_multiplier: Optional[float] = None, input_size: int = 784, in_channels: int = 3) -> nn.Module:
    """Build a SupSup network. ``output_size`` s ≥ the label count; the extra neurons are the
    paper's superfluous neurons. MLPs default to the threshold mask (GNu), ResNets to top-k
    edge-popup; ``er_multiplier`` S switches on the Erdős–Rényi per-layer density."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    if not isinstance(output_size, int) or output_size < 1:
        raise ValueError(f"output_size must be a positive int, got {output_size!r}")
    conv = name not in ("fc1024", "lenet", "bnnet")
    mask_fn = mask_fn or ("topk" if conv else "threshold")
    f = LayerFactory(seed, init, mask_fn, density, er_multiplier)
    if name == "bnnet":
        model = BNNet(make_generator(seed), [input_size, 2048, 2048, output_size], init)
    elif name == "fc1024":
        model = MLP(f, [input_size, 1024, 1024, output_size])
    elif name == "lenet":
        model = MLP(f, [input_size, 300, 100, output_size])
    elif name == "gemresnet18":
        model = ResNet(f, BasicBlock, [2, 2, 2, 2], [20, 40, 80, 160], output_size, "cifar", in_channels)
    elif name == "resnet18":
        model = ResNet(f, BasicBlock, [2, 2, 2, 2], [64, 128, 256, 512], output_size, "cifar", in_channels)
    else:
        model = ResNet(f, Bottleneck, [3, 4, 6, 3], [64, 128, 256, 512], output_size, "imagenet", in_channels)
    model.spec = dict(name=name, output_size=output_size, seed=seed, init=init, mask_fn=mask_fn, density=density,
                      er_multiplier=er_multiplier, input_size=input_size, in_channels=in_channels)
    return model
