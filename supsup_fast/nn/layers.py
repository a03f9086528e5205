"""Drop-in supermask layers: frozen random weights, one binary mask per task stored as bits.

A layer is in one of three modes (:mod:`.modes`: train, one task, superposition), set model-wide
by the helpers in :mod:`supsup_fast.nn.tasks`; the uniform superposition uses the count caches of
:mod:`.counts`. The concrete layers are in :mod:`.linear` and :mod:`.conv`.
"""
from __future__ import annotations

import contextlib
import functools
import math
import warnings
from typing import Optional, Union

import torch
from torch import nn

from .. import ops
from ..ops.registry import backend_for
from ..ops.dispatch import outside_autocast, under_autocast
from .bank import MaskBank
from .counts import CountCaches
from .fused_autograd import fused_train_forward
from .init import frozen_bias, frozen_weight, make_generator
from .masks import MASK_FUNCTIONS, mask_from_scores, masked_weight_from_scores, score_init_bound
from .modes import Mode, OneTask, Superposition, Train, check_uniform_alpha, task_index




def _seed_from_torch() -> int:
    """A seed drawn from torch's default generator (advancing it), also under a FakeTensorMode,
    where the draw would be a fake tensor with no value."""
    try:
        from torch._subclasses.fake_tensor import unset_fake_temporarily
    except ImportError:  # pragma: no cover - torch without it has no FakeTensorMode to step out of
        unset_fake_temporarily = contextlib.nullcontext
    with unset_fake_temporarily():
        return int(torch.randint(0, 2 ** 62, (), dtype=torch.int64, device="cpu"))


class SupermaskLayer(CountCaches, nn.Module):
    """Shared state and logic of SupermaskLinear (nn/linear.py) and SupermaskConv2d (nn/conv.py)."""

    def _setup(self, weight_shape, fan_in: int, bias: bool, init: Union[str, torch.Tensor],
               mask_fn: str, density: float, seed: Optional[int], generator: Optional[torch.Generator],
               device, dtype) -> None:
        if mask_fn not in MASK_FUNCTIONS:
            raise ValueError(f"mask_fn must be one of {MASK_FUNCTIONS}, got {mask_fn!r}")
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density must be in (0, 1], got {density}")
        dtype = dtype or torch.float32
        if not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
        if generator is None and seed is None:
            # As nn.Linear's init draws from torch's default generator: torch.manual_seed fixes the
            # weights, and two layers built alike get different ones.
            seed = _seed_from_torch()
        gen = generator if generator is not None else make_generator(seed)
        # None: the default device, which a `with torch.device(...)` block sets (the draws stay on the CPU).
        device = torch.get_default_device() if device is None else torch.device(device)
        if isinstance(init, torch.Tensor):
            if tuple(init.shape) != tuple(weight_shape):
                raise ValueError(f"weight tensor must have shape {tuple(weight_shape)}, got {tuple(init.shape)}")
            weight = init.detach().clone().to(dtype)
            self.init_kind = "tensor"
            self._draw_state = None
        else:
            self._draw_state = gen.get_state()  # where this layer's draws begin: reset_parameters redraws from it
            self._draw_dtype = dtype
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
        self._mode: Mode = OneTask(0)

    # The in-backward optimiser's state of the task being trained (fused_step), kept across mode
    # changes until the optimiser is closed or the task ends (a class default: pickles from before it).
    _fused = None

    _draw_state = None  # (class defaults: layers pickled before them cannot redraw)
    _draw_dtype = torch.float32

    def reset_parameters(self) -> None:
        """Draw the frozen weight (and bias) again, bit for bit as at construction: for a model built
        on the meta device and materialised with ``to_empty()`` (as ``nn.Linear.reset_parameters``
        initialises one, except that the draw repeats, so the masks keep their meaning)."""
        if self._draw_state is None:
            raise RuntimeError("this layer's weight was given as a tensor (or it was pickled before layers kept "
                               "their draw): it cannot be drawn again; load it instead")
        gen = torch.Generator(device="cpu")
        gen.set_state(self._draw_state)
        drawn = self._draw_dtype  # drawn in the dtype of construction, then cast as the layer was since (.double())
        with torch.no_grad():
            self.weight.copy_(frozen_weight(tuple(self.weight.shape), self.fan_in, self.init_kind, gen, drawn))
            if self.bias is not None:
                self.bias.copy_(frozen_bias(self.weight.shape[0], self.fan_in, gen, drawn))

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
        s = torch.rand(self.weight.shape, generator=generator, dtype=torch.float32, device="cpu") * 2 * bound - bound
        return s.to(self.weight.device, self.score_dtype)

    @property
    def score_dtype(self) -> torch.dtype:
        """float64 for a float64 layer (its score gradient in its precision), else float32 (scores in
        bf16 or fp16 would lose RMSprop's small steps)."""
        return torch.float64 if self.weight.dtype == torch.float64 else torch.float32

    def begin_task(self, init_scores: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None) -> None:
        """Create float scores for a new task (kaiming-uniform, or ``init_scores``) and enter train mode."""
        if init_scores is None:
            s = self.initial_scores(generator)
        else:
            if tuple(init_scores.shape) != tuple(self.weight.shape):
                raise ValueError(f"init_scores must have shape {tuple(self.weight.shape)}, got {tuple(init_scores.shape)}")
            s = init_scores.detach().clone().to(self.score_dtype)
        self.train_scores(nn.Parameter(s.to(self.weight.device)))

    def train_scores(self, scores: nn.Parameter) -> None:
        """Train (or keep training) the mask given by ``scores``; the same Parameter keeps its
        optimiser state."""
        if tuple(scores.shape) != tuple(self.weight.shape):
            raise ValueError(f"scores must have shape {tuple(self.weight.shape)}, got {tuple(scores.shape)}")
        if scores is not self.scores:  # new scores: an in-backward optimiser of the old ones no longer applies
            self._fused = None
        self.scores = scores
        self._mode = Train(self._fused)

    def scores_from_bits(self, task: int, magnitude: Optional[float] = None) -> torch.Tensor:
        """Scores that reproduce finished mask ``task``: +m where the bit is set, -m elsewhere
        (m defaults to half the init bound, the mean |score| at init). Used when a stored mask is
        trained further and its float scores are no longer kept."""
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"task must be in [0, {self.num_tasks}) (tasks learned), got {task}")
        m = 0.5 * score_init_bound(self.fan_in) if magnitude is None else float(magnitude)
        bits = ops.unpack_bits(self.bank.words[task], self.n).view_as(self.weight)
        return (bits.to(self.score_dtype) * 2 - 1) * m

    def current_mask(self) -> torch.Tensor:
        if self.scores is None:
            raise RuntimeError("no task is being trained: call begin_task first")
        return mask_from_scores(self.scores.detach(), self.mask_fn, self.density)

    def commit_mask(self, slot: int) -> None:
        """Write the mask of the current scores into bank row ``slot`` (``slot == num_tasks``
        appends a new task); the scores stay, so training can go on."""
        backend = backend_for(self.weight.device)
        if self.mask_fn == "threshold":
            words = backend.compare_pack(self.scores.detach(), 0.0)  # scores -> bits in one kernel
        else:
            words = ops.pack_bits(self.current_mask().reshape(self.weight.shape[0], -1))
        if slot == self.num_tasks:
            counted = self.counts_current()
            self.bank.append(words)
            self.counts_appended(counted, words)
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
        self._fused = None
        self._mode = OneTask(self.num_tasks - 1)

    def append_packed(self, words: torch.Tensor) -> None:
        """Append finished masks given as packed words ``[m, out, W]`` (loading a file)."""
        self.bank.append(words.to(self.weight.device))
        self._counts = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # The bank (a child, loaded after this) may come back with other masks: the caches keyed on
        # the task count go now, before anything can read them.
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        self._counts = None
        self._active_cache = None
        if self.scores is None and prefix + "scores" in state_dict:  # torch reports it as an unexpected key
            warnings.warn(f"{prefix}scores: the state dict was saved while a task was being trained; call "
                          f"snn.begin_task(model) before loading it to go on training that task", stacklevel=3)

    def truncate_tasks(self, k: int) -> None:
        self.bank.truncate(k)
        self._counts = None
        self._active_cache = None

    # Derived from the weight and the bank, rebuilt on first use: a copy or pickle does not carry them.
    _DERIVED = ("_active_cache", "_counts_state", "_s_cache", "_ws_cache", "_wt_cache", "_sign_cache")

    def clear_caches(self) -> None:
        """Drop everything derived from the weight, the bank and the scores (rebuilt on first use):
        after a write through ``.data``, which the caches' version keys do not see."""
        for name in self._DERIVED:
            self.__dict__.pop(name, None)
        self._counts = None
        self.bank.drop_interleaved()
        if self._fused is not None:
            self._fused.forget()

    def __getstate__(self):
        """copy.deepcopy and pickle: without the derived caches, and a layer trained by an in-backward
        optimiser (whose state lives in that optimiser) copies as one trained by the plain step."""
        state = {k: v for k, v in super().__getstate__().items() if k not in self._DERIVED}
        state["_buffers"] = {**state["_buffers"], "_counts": None}
        if isinstance(state.get("_mode"), Train) and state["_mode"].fused is not None:
            state["_mode"] = Train()
        state.pop("_fused", None)
        return state

    # -- modes --------------------------------------------------------------------------------
    def set_mode_task(self, t: int) -> None:
        t = task_index(t)
        if not 0 <= t < self.num_tasks:
            raise ValueError(f"task must be in [0, {self.num_tasks}) (tasks learned), got {t}")
        self._mode = OneTask(t)

    def set_mode_train(self, fused=None) -> None:
        """Train the current scores; ``fused`` (a :class:`.fused_step.FusedScoreState`) applies the
        optimiser inside the backward pass (:class:`.fused_step.InBackwardRMSprop` sets it). Without
        it, the layer goes on with the in-backward optimiser it was last given, if one is open: an
        evaluation between training steps (``set_task``, then ``set_train_mode``) keeps it."""
        if self.scores is None:
            raise RuntimeError("no task is being trained: call begin_task first")
        if fused is not None:
            self._fused = fused
        self._mode = Train(self._fused)

    def release_fused(self, fused) -> None:
        """Return to the plain training step if ``fused`` is the layer's in-backward state (its
        optimiser is closing); a state another optimiser gave it since is kept."""
        if fused is None or self._fused is not fused:
            return
        self._fused = None
        if isinstance(self._mode, Train):
            self._mode = Train()

    def set_mode_superpose(self, alpha: torch.Tensor, active: Optional[torch.Tensor] = None, uniform: bool = False,
                           *, checked: bool = False) -> None:
        """Superpose the bank (or the tasks listed in ``active``) with coefficients ``alpha``.
        ``uniform=True`` promises alpha = 1/k over the k superposed tasks (enables the count caches);
        the promise is checked here (``check_uniform_alpha``), whoever calls."""
        if active is not None and not checked:  # set_superposition checked it once for all layers
            ops.checks.check_active(active, self.num_tasks)
        if uniform and not checked:
            check_uniform_alpha(alpha, self.num_tasks if active is None else active.numel())
        # An inference tensor keeps no version counter: its uniformity is checked here only.
        version = alpha._version if uniform and not alpha.is_inference() else None
        self._mode = Superposition(alpha, active, bool(uniform), version)

    def mode(self) -> Mode:
        return self._mode

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under autocast, one task, a superposition and the fused step read the bit kernels or run
        # their own backward: fp32 ops. A plain training step (float weight, autograd) keeps
        # autocast's precision, as nn.Linear / nn.Conv2d would.
        if under_autocast(x) and \
                not (isinstance(self._mode, Train) and self._mode.fused is None):
            return outside_autocast(functools.partial(SupermaskLayer.forward, self), x, self.weight.dtype)
        self._check_input(x)
        mode = self._mode
        if isinstance(mode, Train):
            if self.scores is None:
                raise RuntimeError("train mode needs scores: call begin_task first")
            if mode.fused is not None:
                return fused_train_forward(self, x, mode.fused)
            return self._dense(x, masked_weight_from_scores(self.scores, self.weight, self.mask_fn, self.density))
        if isinstance(mode, OneTask):
            bank = self.bank
            if mode.task >= bank.count:
                raise RuntimeError(f"task {mode.task} has no mask yet ({bank.count} learned)")
            return self._masked(x, bank.row(mode.task))
        bank = self.bank.words if mode.active is None else self.bank.words.index_select(0, mode.active)
        bank_t = self._interleaved_copy(x, mode)
        if mode.uniform:
            # An α changed in place inside the block is refused, not ignored (rechecked only once it changed).
            if mode.version is not None and not torch.compiler.is_compiling() and mode.alpha._version != mode.version:
                check_uniform_alpha(mode.alpha, bank.shape[0])
            counts = self.counts() if mode.active is None else self.active_counts(mode.active)
            s = self._uniform_s(counts, bank.shape[0])
            return ops.superposed_with_s(x, self.weight, bank, mode.alpha, s, self.bias, self._conv_kwargs(), bank_t)
        return self._superposed(x, bank, mode.alpha, bank_t, self._weight_copy(x, mode))

    def _frozen(self):
        """(weight, bias) from the buffers' dict: each attribute read goes through Module.__getattr__,
        about 1 µs of a small layer's one-task call at batch 1. A user may have made either a
        Parameter: then it is no buffer."""
        buffers = self._buffers
        return (buffers["weight"] if "weight" in buffers else self.weight,
                buffers["bias"] if "bias" in buffers else self.bias)

    def _check_input(self, x: torch.Tensor) -> None:
        """Refuse an x this layer cannot take, naming the layer's own sizes (the ops below would name
        their packed operands instead)."""

    def _interleaved_copy(self, x: torch.Tensor, mode: Superposition) -> Optional[torch.Tensor]:
        """The bank's task-interleaved copy where this layer's α-gradient would read it, else None."""
        return None

    def _weight_copy(self, x: torch.Tensor, mode: Superposition) -> Optional[torch.Tensor]:
        """The bank's weight-interleaved copy where this layer's S = Σᵢ αᵢ Mᵢ would be read from it, else None."""
        return None

    def _conv_kwargs(self) -> Optional[dict]:
        return None

    def extra_repr(self) -> str:
        return (f"{self._shape_repr()}, bias={self.bias is not None}, init={self.init_kind}, "
                f"mask_fn={self.mask_fn}, tasks={self.num_tasks}")
