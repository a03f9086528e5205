"""Drop-in supermask layers: frozen random weights, one binary mask per task stored as bits.

A layer is in one of three modes, set model-wide by the helpers in :mod:`supsup_fast.nn.tasks`:
- train: the float scores of the task being learned give the mask (straight-through estimator);
- task t: the packed mask t of the bank (``masked_linear``/``masked_conv2d``);
- superposition: W ⊙ Σᵢ αᵢ Mᵢ over the bank (optionally an active subset of tasks); with uniform α
  the forward uses a cached per-weight count of set bits, so it reads no mask bit.
"""
from __future__ import annotations

import math
import weakref
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops.registry import backend_for
from .bank import MaskBank
from .init import frozen_bias, frozen_weight, make_generator
from .masks import MASK_FUNCTIONS, mask_from_scores, masked_weight_from_scores, score_init_bound


class Mode:
    TRAIN = "train"
    TASK = "task"
    SUPERPOSE = "superpose"


# The last alpha found uniform: (weak reference, version counter, k). set_superposition hands the
# same alpha to every layer, so only the first one pays the check's host sync.
_uniform_ok: Optional[tuple] = None


def _version(t: torch.Tensor) -> Optional[int]:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter: never reuse a verdict then
        return None


def check_uniform_alpha(alpha: torch.Tensor, k: int) -> None:
    """``uniform=True`` promises alpha = 1/k over the k superposed tasks: the layers then use their
    cached counts Σᵢ Mᵢ / k and never read alpha in the forward, so a non-uniform alpha would
    silently give the uniform superposition. Raises ValueError naming ``alpha`` if it is not.
    The value check (a host sync) is skipped inside a CUDA-graph capture, like the other data checks."""
    global _uniform_ok
    ops.checks.check_alpha(alpha, k)
    if k == 0 or ops.checks.capturing(alpha):
        return
    version, last = _version(alpha), _uniform_ok
    if version is not None and last is not None and last[0]() is alpha and last[1] == version and last[2] == k:
        return
    a = alpha.detach()
    if not torch.allclose(a, torch.full_like(a, 1.0 / k), rtol=1e-5, atol=1e-8):
        raise ValueError(f"uniform=True needs alpha = 1/k = {1.0 / k:.6g} for all {k} superposed tasks, "
                         f"got alpha values in [{float(a.min()):.6g}, {float(a.max()):.6g}]; pass uniform=False")
    if version is not None:
        _uniform_ok = (weakref.ref(alpha), version, k)


class SupermaskLayer(nn.Module):
    """Shared state and logic of SupermaskLinear and SupermaskConv2d."""

    def _setup(self, weight_shape, fan_in: int, bias: bool, init: Union[str, torch.Tensor],
               mask_fn: str, density: float, seed: Optional[int], generator: Optional[torch.Generator],
               device, dtype) -> None:
        if mask_fn not in MASK_FUNCTIONS:
            raise ValueError(f"mask_fn must be one of {MASK_FUNCTIONS}, got {mask_fn!r}")
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density}")
        dtype = dtype or torch.float32
        gen = generator if generator is not None else make_generator(seed)
        if isinstance(init, torch.Tensor):
            if tuple(init.shape) != tuple(weight_shape):
                raise ValueError(f"weight tensor must have shape {tuple(weight_shape)}, got {tuple(init.shape)}")
            weight = init.detach().clone().to(dtype)
            self.init_kind = "tensor"
        else:
            weight = frozen_weight(tuple(weight_shape), fan_in, init, gen, dtype)
            self.init_kind = init
        self.register_buffer("weight", weight.to(device))
        self.register_buffer("bias", frozen_bias(weight_shape[0], fan_in, gen, dtype).to(device) if bias else None)
        self.fan_in = fan_in
        self.mask_fn = mask_fn
        self.density = float(density)
        self.bank = MaskBank(weight_shape[0], math.prod(weight_shape[1:]), device=device)
        self.scores: Optional[nn.Parameter] = None
        self.register_buffer("_counts", None, persistent=False)  # Σᵢ Mᵢ, float, shaped like weight
        # Transfer (paper §3.2): the running mean of the trained scores of all finished tasks, one
        # float tensor per layer (not per task), kept only when track_score_mean is set.
        self.track_score_mean = False
        self.register_buffer("score_mean", None, persistent=False)
        self._mode = (Mode.TASK, 0)

    # -- task lifecycle -----------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return len(self.bank)

    @property
    def n(self) -> int:
        return self.bank.n

    def initial_scores(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Fresh scores for a new task: kaiming-uniform, as the official code's score init."""
        bound = score_init_bound(self.fan_in)
        s = torch.rand(self.weight.shape, generator=generator, dtype=torch.float32) * 2 * bound - bound
        return s.to(self.weight.device)

    def begin_task(self, init_scores: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> None:
        """Create float scores for a new task (kaiming-uniform, or ``init_scores``) and enter train mode."""
        if init_scores is None:
            s = self.initial_scores(generator)
        else:
            if tuple(init_scores.shape) != tuple(self.weight.shape):
                raise ValueError(f"init_scores must have shape {tuple(self.weight.shape)}, got {tuple(init_scores.shape)}")
            s = init_scores.detach().clone().float()
        self.train_scores(nn.Parameter(s.to(self.weight.device)))

    def train_scores(self, scores: nn.Parameter) -> None:
        """Train (or keep training) the mask given by ``scores``; the same Parameter keeps its
        optimiser state."""
        if tuple(scores.shape) != tuple(self.weight.shape):
            raise ValueError(f"scores must have shape {tuple(self.weight.shape)}, got {tuple(scores.shape)}")
        self.scores = scores
        self._mode = (Mode.TRAIN,)

    def scores_from_bits(self, task: int, magnitude: Optional[float] = None) -> torch.Tensor:
        """Scores that reproduce finished mask ``task``: +m where the bit is set, -m elsewhere
        (m defaults to half the init bound, the mean |score| at init). Used when a stored mask is
        trained further and its float scores are no longer kept."""
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task must be in [0, {self.num_tasks}) (tasks learned), got {task}")
        m = 0.5 * score_init_bound(self.fan_in) if magnitude is None else float(magnitude)
        bits = ops.unpack_bits(self.bank.words[task], self.n).view_as(self.weight)
        return (bits.float() * 2 - 1) * m

    def current_mask(self) -> torch.Tensor:
        if self.scores is None:
            raise RuntimeError("no task is being trained: call begin_task first")
        return mask_from_scores(self.scores.detach(), self.mask_fn, self.density)

    def commit_mask(self, slot: int) -> None:
        """Write the mask of the current scores into bank row ``slot`` (``slot == num_tasks``
        appends a new task); the scores stay, so training can go on."""
        backend = backend_for(self.weight.device)
        if self.mask_fn == "threshold" and hasattr(backend, "compare_pack"):
            words = backend.compare_pack(self.scores.detach(), 0.0)  # scores -> bits in one kernel
        else:
            words = ops.pack_bits(self.current_mask().reshape(self.weight.shape[0], -1))
        if slot == self.num_tasks:
            self.bank.append(words)
            if self._counts is not None:  # add the new mask's bits to the cached per-weight count
                self._counts += ops.unpack_bits(words, self.n).view_as(self.weight).to(self._counts.dtype)
        elif 0 <= slot < self.num_tasks:
            self.bank.set_row(slot, words)
            self._counts = None
            self._active_cache = None
        else:
            raise ValueError(f"slot must be in [0, {self.num_tasks}] (tasks learned, or the next one), got {slot}")

    def finish_task(self) -> None:
        """Pack the trained mask into the bank and drop the float scores."""
        if self.scores is None:
            raise RuntimeError("no task is being trained: call begin_task first")
        if self.track_score_mean:
            scores = self.scores.detach()
            if self.score_mean is None or self.num_tasks == 0:
                self.score_mean = scores.clone()
            else:
                self.score_mean = self.score_mean + (scores - self.score_mean) / (self.num_tasks + 1)
        self.commit_mask(self.num_tasks)
        self.scores = None
        self._mode = (Mode.TASK, self.num_tasks - 1)

    def append_packed(self, words: torch.Tensor) -> None:
        """Append finished masks given as packed words ``[m, out, W]`` (loading a file)."""
        self.bank.append(words.to(self.weight.device))
        self._counts = None

    def truncate_tasks(self, k: int) -> None:
        self.bank.truncate(k)
        self._counts = None
        self._active_cache = None

    def set_count_cache(self, enabled: bool) -> None:
        """Whether to keep Σᵢ Mᵢ per weight (float, one weight-sized tensor) for uniform α."""
        if not enabled:
            self._counts = None

    def active_counts(self, active: torch.Tensor) -> torch.Tensor:
        """Σ_{i ∈ active} Mᵢ per weight. Binary task inference shrinks the active set every round;
        when the new set is a subset of the last one, the count is updated by subtracting only the
        tasks just ruled out (bits read over a whole search ≈ k, not k·log k)."""
        cache = getattr(self, "_active_cache", None)
        ones = lambda m: torch.ones(m, dtype=self.weight.dtype, device=self.weight.device)
        if cache is not None and cache[0] == self.num_tasks and bool(torch.isin(active, cache[1]).all()):
            removed = cache[1][~torch.isin(cache[1], active)]
            counts = cache[2]
            if removed.numel():
                counts = counts - ops.superpose(self.bank.words.index_select(0, removed), ones(removed.numel()), self.n).view_as(self.weight)
        elif active.numel() == self.num_tasks:
            counts = self.counts()
        else:
            counts = ops.superpose(self.bank.words.index_select(0, active), ones(active.numel()), self.n).view_as(self.weight)
        self._active_cache = (self.num_tasks, active.clone(), counts)
        return counts

    def counts(self) -> torch.Tensor:
        if self._counts is None:
            k = self.num_tasks
            ones = torch.ones(k, dtype=self.weight.dtype, device=self.weight.device)
            self._counts = ops.superpose(self.bank.words, ones, self.n).view_as(self.weight)
        return self._counts

    # -- modes --------------------------------------------------------------------------------
    def set_mode_task(self, t: int) -> None:
        if not 0 <= t < self.num_tasks:
            raise ValueError(f"task must be in [0, {self.num_tasks}) (tasks learned), got {t}")
        self._mode = (Mode.TASK, int(t))

    def set_mode_train(self) -> None:
        if self.scores is None:
            raise RuntimeError("no task is being trained: call begin_task first")
        self._mode = (Mode.TRAIN,)

    def set_mode_superpose(self, alpha: torch.Tensor, active: Optional[torch.Tensor] = None, uniform: bool = False) -> None:
        """Superpose the bank (or the tasks listed in ``active``) with coefficients ``alpha``.
        ``uniform=True`` promises alpha = 1/k over the k superposed tasks (enables the count caches);
        the promise is checked here (``check_uniform_alpha``), whoever calls."""
        if uniform:
            check_uniform_alpha(alpha, self.num_tasks if active is None else active.numel())
        self._mode = (Mode.SUPERPOSE, alpha, active, bool(uniform))

    def mode(self):
        return self._mode

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = self._mode[0]
        if kind == Mode.TRAIN:
            if self.scores is None:
                raise RuntimeError("train mode needs scores: call begin_task first")
            return self._dense(x, masked_weight_from_scores(self.scores, self.weight, self.mask_fn, self.density))
        if kind == Mode.TASK:
            t = self._mode[1]
            if t >= self.num_tasks:
                raise RuntimeError(f"task {t} has no mask yet ({self.num_tasks} learned)")
            return self._masked(x, self.bank.words[t])
        _, alpha, active, uniform = self._mode
        bank = self.bank.words if active is None else self.bank.words.index_select(0, active)
        if uniform:
            counts = self.counts() if active is None else self.active_counts(active)
            s = self._uniform_s(counts, bank.shape[0])
            return ops.superposed_with_s(x, self.weight, bank, alpha, s, self.bias, self._conv_kwargs())
        return self._superposed(x, bank, alpha)

    def _uniform_s(self, counts: torch.Tensor, k: int) -> torch.Tensor:
        """counts / k, kept while the same count tensor (same version) and k are in use: every
        one-shot query of an evaluation reuses it instead of rescaling a weight-sized tensor."""
        cache = getattr(self, "_s_cache", None)
        if cache is None or cache[0] is not counts or cache[1] != counts._version or cache[2] != k:
            cache = (counts, counts._version, k, counts * (1.0 / k))
            self._s_cache = cache
        return cache[3]

    def _conv_kwargs(self) -> Optional[dict]:
        return None

    def extra_repr(self) -> str:
        return (f"{self._shape_repr()}, bias={self.bias is not None}, init={self.init_kind}, "
                f"mask_fn={self.mask_fn}, tasks={self.num_tasks}")


class SupermaskLinear(SupermaskLayer):
    """Drop-in for ``nn.Linear`` with frozen weights and per-task binary masks."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *,
                 init: Union[str, torch.Tensor] = "signed_constant", mask_fn: str = "threshold",
                 density: float = 0.5, seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 device=None, dtype=None):
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"in_features and out_features must be >= 1, got {in_features}, {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self._setup((out_features, in_features), in_features, bias, init, mask_fn, density, seed, generator, device, dtype)

    def _dense(self, x, w):
        return F.linear(x, w, self.bias)

    def _masked(self, x, words):
        # A signed-constant layer reads its frozen weights as sign bits: 2 bits per weight with the mask.
        if self.init_kind == "signed_constant" and x.dtype == self.weight.dtype:
            sign_words, scale = self._sign_bits()
            return ops.signed_masked_linear(x, sign_words, words, scale, self.bias)
        return ops.masked_linear(x, self.weight, words, self.bias)

    def _sign_bits(self):
        """The frozen signed-constant weight as (sign bits, scale), rebuilt if the weight changes."""
        key = (self.weight._version, self.weight.data_ptr())
        if getattr(self, "_sign_cache", None) is None or self._sign_cache[0] != key:
            scale = float(self.weight.abs().max())
            self._sign_cache = (key, ops.pack_bits(self.weight > 0), scale)
        return self._sign_cache[1], self._sign_cache[2]

    def _superposed(self, x, bank, alpha):
        return ops.superposed_linear(x, self.weight, bank, alpha, self.bias)

    def _shape_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}"


class SupermaskConv2d(SupermaskLayer):
    """Drop-in for ``nn.Conv2d`` with frozen weights and per-task binary masks."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, *, init: Union[str, torch.Tensor] = "signed_constant",
                 mask_fn: str = "threshold", density: float = 0.5, seed: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, device=None, dtype=None):
        super().__init__()
        from ..ops.checks import pair
        kh, kw = pair("kernel_size", kernel_size)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)
        self.stride, self.padding = tuple(pair("stride", stride)), tuple(pair("padding", padding))
        self.dilation, self.groups = tuple(pair("dilation", dilation)), groups
        shape = (out_channels, in_channels // groups, kh, kw)
        self._setup(shape, in_channels // groups * kh * kw, bias, init, mask_fn, density, seed, generator, device, dtype)

    def _conv_kwargs(self) -> dict:
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)

    def _dense(self, x, w):
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def _masked(self, x, words):
        return ops.masked_conv2d(x, self.weight, words, self.bias, **self._conv_kwargs())

    def _superposed(self, x, bank, alpha):
        return ops.superposed_conv2d(x, self.weight, bank, alpha, self.bias, **self._conv_kwargs())

    def _shape_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}")
