"""Per-task storage baselines for the question "is a 1-bit-per-weight SupSup mask a cheaper way to
store a PermutedMNIST task than a small network of its own?" (benchmarks/questions_budget.py).

Three ways to hold one task, each trained on that task alone with :func:`train_per_task`:

* :class:`SmallMLP` — a dense 784-width-10 ReLU network per task; stored in float32, float16 or
  int8 (:func:`quantize_model`).
* :class:`LoRAMLP` — the frozen random network SupSup masks (:func:`frozen_weights`: LeNet
  784-300-100-10, signed-constant, no biases — bit-identical to ``build_model("lenet", 10, seed=...)``)
  plus a per-task low-rank update ΔW = B·A of rank r per layer.
* :class:`BatchEnsembleMLP` — the same frozen network with per-task rank-1 multiplicative factors,
  W_task = W ⊙ (s rᵀ) (BatchEnsemble's "fast weights").

Byte conventions (per task; see :func:`storage_bytes` and :func:`frozen_bytes`):

* A model's per-task bytes count its trainable parameters (``requires_grad``) only; the frozen
  random weights are buffers and are counted once, separately.
* float32: 4 bytes per parameter; float16: 2 bytes per parameter, weights and biases alike.
* int8: a parameter with ≥ 2 dims (a weight matrix, a LoRA factor) takes 1 byte per entry plus one
  float32 scale per output row (dim 0); a 1-dim parameter (a bias, a BatchEnsemble factor) stays
  float32 (4 bytes per entry, not rounded).
* The shared frozen network costs n_weights × 4 bytes if its float32 weights are stored, or
  8 bytes (one int64 seed) if it is regenerated from its seed — as SupSup's frozen network is.
"""
from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..data.tasks import TaskSplit
from ..nn.init import frozen_weight, make_generator

PRECISIONS = ("float32", "float16", "int8")
LENET_SIZES = (784, 300, 100, 10)
SEED_BYTES = 8  # an int64 seed regenerates the frozen network (the architecture is code)
DEFAULT_LR = 1e-3  # Adam's default; the small MLPs'
# Adam learning rates per family, from a small sweep (1e-3, 3e-3, 1e-2, 3e-2; 400 steps of 128 on 8,000
# images of the embedded MNIST subset, accuracy on its other 2,000 training images): the multiplicative
# BatchEnsemble factors start at 1 and barely move at 1e-3 (0.53 against 0.84 at 1e-2); LoRA gains at 3e-3.
RECOMMENDED_LR = {"mlp": 1e-3, "lora": 3e-3, "batchensemble": 1e-2}


def _init_linear(layer: nn.Linear, generator: Optional[torch.Generator]) -> None:
    """nn.Linear's own default initialisation, drawn from ``generator`` (reproducible per task)."""
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
    bound = 1.0 / math.sqrt(layer.in_features)
    with torch.no_grad():
        layer.bias.copy_((torch.rand(layer.out_features, generator=generator) * 2 - 1) * bound)


class SmallMLP(nn.Module):
    """784 → width → 10 with ReLU and biases, trained from scratch for one task.
    Parameters: (in_features + 1)·width + (width + 1)·classes."""

    def __init__(self, width: int, in_features: int = 784, classes: int = 10,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.fc1 = nn.Linear(in_features, width)
        self.fc2 = nn.Linear(width, classes)
        for layer in (self.fc1, self.fc2):
            _init_linear(layer, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


# -- the shared frozen random network -------------------------------------------------------------

def frozen_weights(seed: int, sizes: Sequence[int] = LENET_SIZES, init: str = "signed_constant") -> List[torch.Tensor]:
    """The frozen weights [out, in] of SupSup's MLP with these layer sizes, drawn as
    :class:`supsup_fast.models.LayerFactory` draws them (one generator seeded with ``seed``, layers
    in order): for LeNet sizes they equal ``build_model("lenet", 10, seed=seed)``'s weights bit for
    bit, so the adapters sit on exactly the network that a SupSup run with ``--seed seed`` masks."""
    gen = make_generator(seed)
    return [frozen_weight((o, i), i, init, gen) for i, o in zip(sizes[:-1], sizes[1:])]


class FrozenMLP(nn.Module):
    """The shared frozen random MLP (no biases, ReLU between layers). Its weights are buffers
    (``w0``, ``w1``...): never parameters, never trained, not counted in per-task bytes."""

    def __init__(self, seed: int = 1, sizes: Sequence[int] = LENET_SIZES, init: str = "signed_constant"):
        super().__init__()
        self.sizes = tuple(sizes)
        for i, w in enumerate(frozen_weights(seed, sizes, init)):
            self.register_buffer(f"w{i}", w)

    @property
    def num_layers(self) -> int:
        return len(self.sizes) - 1

    def frozen(self) -> List[torch.Tensor]:
        return [getattr(self, f"w{i}") for i in range(self.num_layers)]

    def layer(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Layer i's pre-activation; adapters override it."""
        return F.linear(x, getattr(self, f"w{i}"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i in range(self.num_layers):
            x = self.layer(i, x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return x


class LoRAMLP(FrozenMLP):
    """Frozen random MLP + per-task low-rank update of every layer: y = x Wᵀ + x (B·A)ᵀ with
    A ∈ R^{r×in} (nn.Linear's default kaiming-uniform init) and B ∈ R^{out×r} (zeros), so the
    model starts as the frozen network. No LoRA α/r scaling (scale 1; Adam makes it a
    learning-rate factor only). ``bias=True`` adds a trainable per-task bias to every layer
    (default off: SupSup's network has none). Per-task parameters: Σ_layers r·(in + out) [+ out]."""

    def __init__(self, rank: int, seed: int = 1, sizes: Sequence[int] = LENET_SIZES, init: str = "signed_constant",
                 bias: bool = False, generator: Optional[torch.Generator] = None):
        super().__init__(seed, sizes, init)
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.rank = rank
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        self.bias = nn.ParameterList() if bias else None
        for i, o in zip(self.sizes[:-1], self.sizes[1:]):
            a = torch.empty(rank, i)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            self.A.append(nn.Parameter(a))
            self.B.append(nn.Parameter(torch.zeros(o, rank)))
            if self.bias is not None:
                self.bias.append(nn.Parameter(torch.zeros(o)))

    def layer(self, i: int, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, getattr(self, f"w{i}")) + F.linear(F.linear(x, self.A[i]), self.B[i])
        return y if self.bias is None else y + self.bias[i]


class BatchEnsembleMLP(FrozenMLP):
    """Frozen random MLP with per-task rank-1 multiplicative factors (BatchEnsemble):
    W_task = W ⊙ (s rᵀ), computed as y = s ⊙ ((r ⊙ x) Wᵀ), r ∈ R^in, s ∈ R^out per layer.
    ``factor_init="ones"`` (default) starts at the frozen network; ``"signs"`` draws each entry
    ±1 with a fair coin (BatchEnsemble's random-sign init). ``bias=True`` adds a per-task bias
    per layer (default off). Per-task parameters: Σ_layers (in + out) [+ out]."""

    def __init__(self, seed: int = 1, sizes: Sequence[int] = LENET_SIZES, init: str = "signed_constant",
                 factor_init: str = "ones", bias: bool = False, generator: Optional[torch.Generator] = None):
        super().__init__(seed, sizes, init)
        if factor_init not in ("ones", "signs"):
            raise ValueError(f"factor_init must be 'ones' or 'signs', got {factor_init!r}")

        def factor(n: int) -> nn.Parameter:
            if factor_init == "ones":
                return nn.Parameter(torch.ones(n))
            return nn.Parameter(torch.randint(0, 2, (n,), generator=generator).float() * 2 - 1)

        self.r = nn.ParameterList(factor(i) for i in self.sizes[:-1])
        self.s = nn.ParameterList(factor(o) for o in self.sizes[1:])
        self.bias = nn.ParameterList(nn.Parameter(torch.zeros(o)) for o in self.sizes[1:]) if bias else None

    def layer(self, i: int, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x * self.r[i], getattr(self, f"w{i}")) * self.s[i]
        return y if self.bias is None else y + self.bias[i]


# -- bytes and precision ---------------------------------------------------------------------------

def trainable_parameters(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def storage_bytes(model: nn.Module, precision: str = "float32") -> int:
    """Per-task bytes of ``model``'s trainable parameters at ``precision`` (module docstring)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    total = 0
    for _, p in trainable_parameters(model):
        if precision == "float32":
            total += 4 * p.numel()
        elif precision == "float16":
            total += 2 * p.numel()
        elif p.dim() >= 2:
            total += p.numel() + 4 * p.shape[0]  # int8 entries + one float32 scale per output row
        else:
            total += 4 * p.numel()  # int8 convention: 1-dim parameters stay float32
    return total


def int8_round_trip(w: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantisation of a ≥ 2-dim tensor: scale_row = max|w_row| / 127,
    q = round(w / scale) ∈ [-127, 127]; returns (q · scale in w's dtype, scales [rows]).
    An all-zero row gets scale 0 and stays zero. |w - q·scale| ≤ scale/2 entrywise."""
    rows = w.reshape(w.shape[0], -1).double()
    scale = rows.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(rows / safe[:, None]).clamp(-127, 127)
    return (q * scale[:, None]).to(w.dtype).reshape(w.shape), scale.float()


def quantize_model(model: nn.Module, precision: str) -> Tuple[nn.Module, int]:
    """A deep copy of ``model`` whose trainable parameters hold the values stored at ``precision``
    (float16: a float16 round trip; int8: :func:`int8_round_trip` for ≥ 2-dim parameters, 1-dim
    ones unchanged), computing in float32 as before, and the per-task bytes (:func:`storage_bytes`).
    The frozen buffers are not touched."""
    nbytes = storage_bytes(model, precision)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for _, p in trainable_parameters(out):
            if precision == "float16":
                p.copy_(p.half().to(p.dtype))
            elif precision == "int8" and p.dim() >= 2:
                p.copy_(int8_round_trip(p)[0])
    return out, nbytes


def frozen_bytes(model: nn.Module) -> Dict[str, int]:
    """The one-off cost of a model's shared frozen buffers: float32 bytes if stored
    (n_weights × 4), and bytes if regenerated from the seed (8; 0 weights → 0)."""
    n = sum(b.numel() for b in model.buffers())
    return {"n_weights": n, "stored_float32": 4 * n, "regenerated_from_seed": SEED_BYTES if n else 0}


# -- training and evaluation -----------------------------------------------------------------------

def train_per_task(model: nn.Module, split: TaskSplit, iters: int = 1000, batch_size: int = 128,
                   lr: float = DEFAULT_LR, generator: Optional[torch.Generator] = None) -> List[float]:
    """Train ``model``'s trainable parameters on one task: Adam(lr), cross-entropy, ``iters``
    steps over shuffled batches of ``split``, starting a new epoch (new shuffle from
    ``generator``) when one runs out. Returns the loss of every step.

    lr 1e-3 (Adam's default) suits the small MLPs; the adapters want more (:data:`RECOMMENDED_LR`)."""
    params = [p for _, p in trainable_parameters(model)]
    if not params:
        raise ValueError("model has no trainable parameters")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    losses: List[float] = []
    while len(losses) < iters:
        for x, y in split.batches(batch_size, shuffle=True, generator=generator):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if len(losses) >= iters:
                break
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, split: TaskSplit, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on ``split``."""
    model.eval()
    correct = 0
    for x, y in split.batches(batch_size, shuffle=False):
        correct += int((model(x).argmax(1) == y).sum())
    return correct / len(split)


__all__ = ["PRECISIONS", "LENET_SIZES", "SEED_BYTES", "DEFAULT_LR", "RECOMMENDED_LR", "SmallMLP", "frozen_weights", "FrozenMLP",
           "LoRAMLP", "BatchEnsembleMLP", "trainable_parameters", "storage_bytes", "int8_round_trip",
           "quantize_model", "frozen_bytes", "train_per_task", "accuracy"]
