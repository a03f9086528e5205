"""The official SupSup layers (``MultitaskMaskLinear``, ``MultitaskMaskConv``,
``FastMultitaskMaskConv``) on packed bits and the fused ops.

Same constructor, attributes and forward as the official code: ``task`` (>= 0: that task's mask,
< 0: the superposition of the first ``num_tasks_learned`` masks weighted by ``alphas`` of shape
[k,1,1] or [k,1,1,1,1], entries <= 0 left out), ``scores`` named ``scores.{t}``,
``cache_masks()``/``clear_masks()``, ``stacked``. What differs is storage: a finished task keeps only
its bits (``bank``, int32[k, out, ceil(n/32)]); the float scores of the task being trained alone exist.
A task's scores are packed into its bank row when the model moves to another task or
``cache_masks()`` is called, and dropped when it moves to another task >= 0: the superposition
(task < 0) keeps them, so an optimiser built over them (the official trainers/reinit.py keeps one
across a task -1 step) trains the same Parameter when the task is selected again.
``configure(keep_scores=True)`` gives every task float scores from the start and keeps them, as
upstream (``scores.{t}`` in the state dict for all t; memory as upstream). Otherwise selecting or
reading (``scores[t]``, ``scores[:t]``) a packed task gives it float scores rebuilt from its bits
(``scores_from_bits``: ±½ init bound, whose mask is exactly those bits), trainable again; its next
pack replaces its bank row (the official layer would keep the old float scores). An untrained task
starts from its official initial scores.
"""
from __future__ import annotations

import functools
import hashlib
import math
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..nn.bank import MaskBank
from ..ops.dispatch import outside_autocast, under_autocast
from ..nn.masks import COMPAT_TOPK, mask_from_scores, masked_weight_from_scores, score_init_bound
from .scores import ScoreList, ScoreStream, as_task_index
from .settings import resolve_num_tasks, resolve_sparsity, scores_kept, weights_frozen


def alpha_vector(alphas: torch.Tensor, k: int) -> torch.Tensor:
    """The first k entries of the official ``alphas`` ([N,1,1], [N,1,1,1,1] or [N]) as a [k]
    vector, with entries <= 0 zeroed (the official forward leaves them out of the sum, so they
    get no gradient either)."""
    if not isinstance(alphas, torch.Tensor):
        raise TypeError(f"alphas must be a tensor of shape [num_tasks, 1, 1] (set_alphas), got {type(alphas).__name__}")
    if alphas.dim() < 1 or alphas.shape[0] < k or any(s != 1 for s in alphas.shape[1:]):
        raise ValueError(f"alphas must have shape [N, 1, 1] (or [N, 1, 1, 1, 1]) with N >= num_tasks_learned = {k}, "
                         f"got {tuple(alphas.shape)}")
    a = alphas[:k].reshape(k)
    return torch.where(a > 0, a, torch.zeros_like(a))


class MultitaskMaskMixin:
    """State and forward shared by the compat layers (mixed into nn.Linear / nn.Conv2d)."""

    mask_fn = "threshold"

    def _init_multitask(self, num_tasks: int) -> None:
        if weights_frozen():  # official: args.train_weight_tasks == 0
            self.weight.requires_grad_(False)
        self.num_tasks = num_tasks
        self.num_tasks_learned = 0
        self.alphas: Optional[torch.Tensor] = None
        self.scores = ScoreList()
        self.scores.materialize, self.scores.num_tasks = self._live_scores, self.num_tasks
        self.scores.before_load = self._scores_to_load
        n = self.weight[0].numel()
        self._bits_loaded = False  # set while a state dict's scores load after its bits
        self.bank = MaskBank(self.weight.shape[0], n, device=self.weight.device)
        self.bank.persist_rows = False  # the layer's state_dict carries the bits as mask_bits, as upstream's layout
        self._stream = ScoreStream(tuple(self.weight.shape), num_tasks)
        self._filler = set()  # bank rows holding an untrained task's initial mask
        self._bank_version = 0  # bumped whenever the bank changes (count cache key)
        self._count_cache = None
        self._task = None
        self._rebuilt = set()  # live tasks whose scores were rebuilt from their bank rows
        # live tasks made from their official initial scores -> a digest of those scores: a commit
        # tells an untouched task (still untrained) by it, without drawing the scores again
        self._initial: Dict[int, str] = {}
        # tasks whose scores compat's freeze_model_scores froze (their Parameters are remade when selected
        # again; a requires_grad_(False) of one's own on the live Parameter is not remembered)
        self._frozen = set()
        self.keep_scores = scores_kept()
        if self.keep_scores:  # as upstream: every task's float scores exist from the start and stay
            for t in range(num_tasks):
                self._live_scores(t)

    # -- the official attributes ---------------------------------------------------------------
    @property
    def task(self) -> Optional[int]:
        return self._task

    @task.setter
    def task(self, task: int) -> None:
        task = as_task_index(task, "task must be an int (>= 0: that task, < 0: superposition)")
        # task >= num_tasks is stored, as upstream, where only a forward fails (scores[task]): the official
        # NNs trainer sets it once every slot is used and then skips those batches.
        if task < 0 or not self.keep_scores:  # keep_scores: the bits matter to the superposition alone
            for live in self.scores.tasks():
                if live != task:  # the other task's mask becomes bits
                    self._commit(live)
                    if task >= 0:  # moving on to another task: its floats go
                        self.scores.pop(live)
                        self._rebuilt.discard(live)
                        self._initial.pop(live, None)
        if 0 <= task < self.num_tasks:
            self._live_scores(task)
        self._task = task

    def _live_scores(self, task: int) -> nn.Parameter:
        """Task ``task``'s float scores (official: ``scores[task]``, which always exists): its live
        Parameter, else one made live from its bits (a finished task: same mask, trainable again)
        or from its official initial scores (an untrained task)."""
        if not 0 <= task < self.num_tasks:
            raise IndexError(f"task must be in [0, num_tasks={self.num_tasks}), got {task}")
        if task not in self.scores:  # frozen by freeze_model_scores: stays frozen across a switch, as upstream
            # made outside inference mode: scores first read under torch.inference_mode() (an evaluation
            # that selects a task) must still train afterwards, as upstream's, made in __init__, do
            with torch.inference_mode(False):
                self.scores.put(task, nn.Parameter(self.stored_scores(task), requires_grad=task not in self._frozen))
            self._note_source(task)
        return self.scores.live(task)

    def _note_source(self, task: int) -> None:
        """Record where live task ``task``'s scores came from: its initial scores or its bits."""
        if self._untrained(task):
            self._initial[task] = _digest(self.scores.live(task))
        else:
            self._rebuilt.add(task)

    def _untrained(self, task: int) -> bool:
        return not (task < len(self.bank) and task not in self._filler)

    def stored_scores(self, task: int) -> torch.Tensor:
        """Float scores for a task without live ones: rebuilt from its bits (a finished task: the
        same mask) or its official initial scores (an untrained task)."""
        scores = self._stream.scores(task) if self._untrained(task) else self._scores_for(self._row_mask(task))
        return scores.to(device=self.weight.device, dtype=self.weight.dtype)

    @property
    def density(self) -> float:
        return 1.0

    def cache_masks(self) -> None:
        """Pack the live scores into their bank rows (the official layer stacks float masks)."""
        for live in self.scores.tasks():
            self._commit(live)

    @property
    def stacked(self) -> torch.Tensor:
        """The official ``cache_masks()`` buffer: float masks [num_tasks, *weight.shape] (untrained
        tasks: their initial scores' masks), built from the bits on each read (live scores packed first)."""
        self.cache_masks()
        self._ensure_rows(self.num_tasks)
        return torch.stack([self._row_mask(t).to(self.weight.dtype) for t in range(self.num_tasks)])

    def clear_masks(self) -> None:
        """The official layer frees its stacked float masks here; the bits are the storage, so only
        the cached bit counts are dropped."""
        self._count_cache = None

    def mask(self, task: int) -> torch.Tensor:
        """Task ``task``'s binary mask (bool, shaped like weight)."""
        if task in self.scores:
            return mask_from_scores(self.scores[task].detach(), self.mask_fn, self.density)
        if not 0 <= task < len(self.bank):
            raise ValueError(f"task must be a trained task in [0, {len(self.bank)}), got {task}")
        return self._row_mask(task)

    def _row_mask(self, task: int) -> torch.Tensor:
        return ops.unpack_bits(self.bank.words[task], self.bank.n).view_as(self.weight)

    def scores_from_bits(self, task: int) -> torch.Tensor:
        """Float scores that give task ``task``'s mask back (used when a packed task is selected
        again, and exported to the official format): ±bound/2 for a threshold mask, bound or
        bound/2 (kept or not) for a top-k mask."""
        return self._scores_for(self.mask(task))

    def _scores_for(self, mask: torch.Tensor) -> torch.Tensor:
        m = 0.5 * score_init_bound(self.weight[0].numel())
        bits = mask.float()
        return (bits * 2 - 1) * m if self.mask_fn == "threshold" else (bits + 1) * m

    def _apply(self, fn, *args, **kwargs):
        # .double(), .half(), .to(...): a live task that still holds its initial scores keeps counting as
        # untrained. Its fingerprint is of the values in their dtype, so a cast that changes the dtype
        # (fn tried on an empty tensor) takes it again; any other .to() hashes nothing.
        initial = self.__dict__.get("_initial") or {}
        live = [t for t in self.scores.tasks() if t in initial]
        recast = {}  # dtype -> whether fn changes it
        for t in live:
            s = self.scores.live(t).data
            if s.dtype not in recast:
                recast[s.dtype] = fn(s.new_empty(0)).dtype != s.dtype
        untouched = [t for t in live if recast[self.scores.live(t).dtype] and self._still_initial(t)]
        out = super()._apply(fn, *args, **kwargs)
        for t in untouched:
            initial[t] = _digest(self.scores.live(t))
        return out

    def __setstate__(self, state):  # a pickle from before the bank saved its rows: they travel as mask_bits here
        super().__setstate__(state)
        self.__dict__.setdefault("keep_scores", False)
        self.bank.persist_rows = False
        if "_bank_version" not in self.__dict__:  # was kept as _version, hiding nn.Module's state-dict version
            self._bank_version = self.__dict__.pop("_version", 0)
        if not isinstance(self._rebuilt, set):  # was one task or None
            self._rebuilt = set() if self._rebuilt is None else {self._rebuilt}
        if not isinstance(self.__dict__.get("_initial"), dict):
            self._initial = {}
        self.__dict__.setdefault("_bits_loaded", False)
        self.__dict__.setdefault("_frozen", set())
        self.scores.materialize, self.scores.num_tasks = self._live_scores, self.num_tasks
        self.scores.before_load = self._scores_to_load

    # -- state_dict: the bits travel as ``mask_bits``; an official ``stacked`` is read too ---------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        # A live task's mask goes into its row too (the bank itself is not changed): a loader that keeps
        # only the keys a fresh model has (the official main.py --resume) drops its scores.{t}, and the
        # task being trained would come back untrained.
        live = set(self.scores.tasks())
        untouched = {t for t in live if self._still_initial(t)}
        # The rows up to the last trained task: trailing untrained tasks' rows (made for a superposition
        # or `stacked`) would load as trained ones.
        trained = [t for t in range(len(self.bank)) if t not in self._filler and t not in live]
        trained += [t for t in live if t not in untouched]
        rows = max(trained) + 1 if trained else 0
        words, untrained = [], []
        for t in range(rows):
            in_bank = t < len(self.bank) and (t not in live or self._row_current(t) or
                                              (t in untouched and t in self._filler))
            if in_bank:  # the row holds the task's mask: a finished task, or live scores rebuilt from it
                words.append(self.bank.words[t])
            elif t in live:
                words.append(self._pack(self.scores.live(t)))
            else:  # below a live task, never made: its initial scores' mask, as _ensure_rows
                words.append(self._pack(self._stream.scores(t).to(self.weight.device)))
            if t in untouched or (t not in live and (t in self._filler or t >= len(self.bank))):
                untrained.append(t)
        destination[prefix + "mask_bits"] = torch.stack(words) if words else self.bank.words[:0].clone()
        # the untrained tasks among those rows (only read, or made for a superposition): they load as such
        destination[prefix + "mask_untrained"] = torch.tensor(untrained, dtype=torch.int64)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        self._bits_loaded = False  # (its scores load next, in ScoreList: _scores_to_load)
        bits = state_dict.pop(prefix + "mask_bits", None)
        untrained = state_dict.pop(prefix + "mask_untrained", None)
        stacked = state_dict.pop(prefix + "stacked", None)
        # Scores of tasks past num_tasks: the official ParameterList has no such entries, so they are
        # unexpected keys (load_state_dict refuses them when strict, else ignores them, as upstream).
        for t in scores_beyond(state_dict, prefix, self.num_tasks):
            state_dict.pop(f"{prefix}scores.{t}")
            unexpected_keys.append(f"{prefix}scores.{t}")
        for name, held in (("mask_bits", bits), ("stacked", stacked)):
            if held is not None and held.dim() >= 1 and held.shape[0] > self.num_tasks:
                error_msgs.append(f"{prefix}{name} holds {held.shape[0]} tasks, but this layer was built with "
                                  f"num_tasks={self.num_tasks}; build it with num_tasks >= {held.shape[0]}")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        has_scores = any(k.startswith(prefix + "scores.") for k in state_dict)
        if bits is None and stacked is not None and not has_scores:
            if tuple(stacked.shape[1:]) != tuple(self.weight.shape):
                error_msgs.append(f"{prefix}stacked must be [k, {', '.join(map(str, self.weight.shape))}], got {tuple(stacked.shape)}")
                return
            bits = ops.pack_bits((stacked != 0).reshape(stacked.shape[0], self.weight.shape[0], -1))
        if bits is not None:
            expect = tuple(self.bank.row_shape)
            if bits.dtype != torch.int32 or bits.dim() != 3 or tuple(bits.shape[1:]) != expect:
                error_msgs.append(f"{prefix}mask_bits must be int32[k, {expect[0]}, {expect[1]}], got {bits.dtype}{list(bits.shape)}")
                return
            problem = self.bank._check_rows(bits)  # the core bank's refusal of set padding bits
            if problem:
                error_msgs.append(f"{prefix}mask_bits has {problem}")
                return
            rows = bits.shape[0]
            if untrained is not None and (untrained.dim() != 1 or untrained.is_floating_point()
                                          or bool(((untrained < 0) | (untrained >= rows)).any())):
                error_msgs.append(f"{prefix}mask_untrained must list row indices in [0, {rows}), got {untrained.tolist()}")
                return
            self.bank.truncate(0)
            self.bank.append(bits.to(self.bank.storage.device))
            self._filler = set() if untrained is None else {int(t) for t in untrained}
            self._bank_version += 1
            self._bits_loaded = True
        elif strict and stacked is None and not has_scores:
            # Nothing to take the masks from (e.g. the official main.py's --resume, which keeps only the
            # keys a fresh model's state_dict has): refused rather than loading the weights alone.
            error_msgs.append(f"{prefix}mask_bits is missing, and no stacked or scores.* either: nothing to load the "
                              f"masks from (the official main.py --resume keeps only the keys a fresh model has; load "
                              f"official checkpoints with supsup_fast.compat.load_official_checkpoint(model, path))")

    def _scores_to_load(self, carried: Dict[int, torch.Tensor]) -> Dict[int, torch.Tensor]:
        """Before a state dict's scores load (after its bits): a task it carries counts as untrained
        while it holds its official initial scores; a live task it does not carry takes the scores of
        the bits just loaded (its initial ones if they hold none), so no stale score outlives a load."""
        for task, value in carried.items():
            self._rebuilt.discard(task)
            initial = self._stream.scores(task)
            if torch.equal(value.detach().cpu(), initial.to(value.dtype)):  # (in the dict's dtype: half included)
                self._initial[task] = _digest(value.to(self.weight.dtype))  # what the live scores will hold
            else:
                self._initial.pop(task, None)
        if not self._bits_loaded:
            return {}
        self._bits_loaded = False  # this load's
        fill = {}
        for task in self.scores.tasks():
            if task not in carried:
                fill[task] = self.stored_scores(task).to(self.scores.live(task))
                if self._untrained(task):
                    self._initial[task] = _digest(fill[task])
                else:
                    self._rebuilt.add(task)
        return fill

    # -- bank ----------------------------------------------------------------------------------
    def _pack(self, scores: torch.Tensor) -> torch.Tensor:
        mask = mask_from_scores(scores.detach(), self.mask_fn, self.density)
        return ops.pack_bits(mask.reshape(self.weight.shape[0], -1))

    def _ensure_rows(self, k: int) -> None:
        """Bank rows 0..k-1 exist; an untrained task gets its initial scores' mask, as in the
        official ``stacked``."""
        while len(self.bank) < k:
            j = len(self.bank)
            if j in self.scores:
                self.bank.append(self._pack(self.scores[j]))
            else:
                self.bank.append(self._pack(self._stream.scores(j).to(self.weight.device)))
                self._filler.add(j)
            self._bank_version += 1

    def _still_initial(self, task: int) -> bool:
        """Whether live task ``task`` holds the official initial scores it was made from (never trained)."""
        return task in self._initial and self._initial[task] == _digest(self.scores.live(task))

    def _row_current(self, task: int) -> bool:
        """Whether live task ``task``'s scores are the untouched ones rebuilt from its bank row: the row
        already holds its bits (and a top-k row whose count differs from kept_count, e.g. loaded, is
        not rewritten)."""
        s = self.scores.live(task).detach()
        return (task in self._rebuilt and task < len(self.bank) and task not in self._filler
                and torch.equal(s, self._scores_for(self._row_mask(task)).to(s)))

    def _commit(self, task: int) -> None:
        self._ensure_rows(task)
        if self._row_current(task):
            return
        s = self.scores.live(task).detach()
        words = self._pack(s)
        if task == len(self.bank):
            self.bank.append(words)
        else:
            self.bank.set_row(task, words)
        if self._still_initial(task):
            self._filler.add(task)  # only read, never trained: it still starts from its initial scores
        else:
            self._filler.discard(task)
            self._initial.pop(task, None)
        self._bank_version += 1

    def _counts(self, k: int) -> torch.Tensor:
        """Σᵢ<k Mᵢ per weight (float), cached while the bank and k are unchanged."""
        key = (k, self._bank_version, self.weight.device, self.weight.dtype)
        if self._count_cache is None or self._count_cache[0] != key:
            # counted in float32 under a half weight (integers exact to 2^24), then in the weight's dtype
            ones = torch.ones(k, dtype=torch.promote_types(self.weight.dtype, torch.float32), device=self.weight.device)
            counts = ops.superpose(self.bank.words[:k], ones, self.bank.n).view_as(self.weight)
            self._count_cache = (key, counts.to(self.weight.dtype))
        return self._count_cache[1]

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under autocast, as SupermaskLayer: a task read from its float scores (training) keeps autocast's
        # precision; the bits and the superposition run as fp32 ops.
        if under_autocast(x) and \
                not (self._task is not None and self._task >= 0 and self._task in self.scores):
            return outside_autocast(functools.partial(MultitaskMaskMixin.forward, self), x, self.weight.dtype)
        if self._task is None:
            raise RuntimeError("no task set: call set_model_task(model, t) (or set layer.task) first")
        if self._task >= self.num_tasks:  # upstream: scores[task] raises IndexError
            raise IndexError(f"task {self._task} is out of range: this layer has num_tasks = {self.num_tasks}")
        if self._task >= 0:
            if self._task in self.scores:
                w = masked_weight_from_scores(self.scores[self._task], self.weight, self.mask_fn, self.density)
                return self._dense(x, w)
            return self._masked(x, self.bank.words[self._task], None)
        return self._superposed_forward(x)

    def _superposed_forward(self, x: torch.Tensor) -> torch.Tensor:
        k = int(self.num_tasks_learned)
        if not 1 <= k <= self.num_tasks:
            raise RuntimeError(f"num_tasks_learned must be in [1, {self.num_tasks}] for the superposition "
                               f"(set_num_tasks_learned), got {k}")
        if self.alphas is None:
            raise RuntimeError("alphas is not set: call set_alphas(model, alphas) before a task < 0 forward")
        a = alpha_vector(self.alphas, k).to(self.weight.dtype)
        self._ensure_rows(k)
        bank = self.bank.words[:k]
        if torch.compiler.is_compiling():  # the shortcuts below test α's values, which a trace cannot
            return self._superposed(x, bank, a)
        if not (torch.is_grad_enabled() and a.requires_grad):
            on = torch.nonzero(a).flatten()
            if on.numel() == 1:  # a one-hot α (evaluation after inference): one task's bits
                return self._masked(x, bank[int(on)], a[on])
        a0 = a[0].detach()
        if bool((a.detach() == a0).all()) and bool(a0 > 0):
            # Uniform α (one-shot inference): W ⊙ α₀·counts is one dense product; the α-gradient
            # still reads each bit once, in the fused op.
            return ops.superposed_with_s(x, self.weight, bank, a, self._counts(k) * a0, self.bias, self._conv_kwargs())
        return self._superposed(x, bank, a)

    def _masked(self, x: torch.Tensor, words: torch.Tensor, scale: Optional[torch.Tensor]) -> torch.Tensor:
        """x through W ⊙ (scale·M) + b, M one task's packed mask."""
        if scale is None or bool(scale == 1):
            return self._masked_op(x, words, self.bias)
        y = self._masked_op(x, words, None) * scale.reshape(())
        return y if self.bias is None else y + self._bias_view()


def _digest(scores: torch.Tensor) -> str:
    """SHA-256 of a tensor's values (exact, unlike a version counter, which writes through ``.data`` skip)."""
    return hashlib.sha256(scores.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def scores_beyond(state_dict, prefix: str, num_tasks: int) -> List[int]:
    """The task indices t >= ``num_tasks`` of the ``{prefix}scores.{t}`` keys of ``state_dict``."""
    start = len(prefix) + len("scores.")
    return sorted(int(k[start:]) for k in state_dict
                  if k.startswith(prefix + "scores.") and k[start:].isdigit() and int(k[start:]) >= num_tasks)


class MultitaskMaskLinear(MultitaskMaskMixin, nn.Linear):
    """The notebook's layer: ``MultitaskMaskLinear(in, out, num_tasks=N, bias=False)``.
    The weight is made signed constant (±√2/√fan_in, the sign of nn.Linear's init), as there."""

    def __init__(self, *args, num_tasks: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        with torch.no_grad():
            std = nn.init.calculate_gain("relu") / math.sqrt(self.in_features)  # one float32 rounding, as upstream
            self.weight.copy_(self.weight.sign() * std)
        self._init_multitask(resolve_num_tasks(num_tasks, default=1))

    def _conv_kwargs(self):
        return None

    def _bias_view(self):
        return self.bias

    def _dense(self, x, w):
        return F.linear(x, w, self.bias)

    def _masked_op(self, x, words, bias):
        return ops.masked_linear(x, self.weight, words, bias)

    def _superposed(self, x, bank, a):
        return ops.superposed_linear(x, self.weight, bank, a, self.bias)


class _MultitaskConvBase(MultitaskMaskMixin, nn.Conv2d):
    def __init__(self, *args, num_tasks: Optional[int] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if isinstance(self.padding, str) or self.padding_mode != "zeros":
            raise ValueError(f"padding must be ints with padding_mode='zeros', got padding={self.padding!r}, "
                             f"padding_mode={self.padding_mode!r}")
        self._init_multitask(resolve_num_tasks(num_tasks))

    def _conv_kwargs(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)

    def _bias_view(self):
        return self.bias.view(1, -1, 1, 1)

    def _dense(self, x, w):
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def _masked_op(self, x, words, bias):
        return ops.masked_conv2d(x, self.weight, words, bias, **self._conv_kwargs())

    def _superposed(self, x, bank, a):
        return ops.superposed_conv2d(x, self.weight, bank, a, self.bias, **self._conv_kwargs())


class MultitaskMaskConv(_MultitaskConvBase):
    """The main repository's edge-popup layer: top-k of |scores| keeping a ``sparsity`` fraction
    (official name; ``args.sparsity``, 0.5 by default). Weights keep nn.Conv2d's init: the official
    Builder applies ``conv_init`` (e.g. signed constant) afterwards."""

    mask_fn = COMPAT_TOPK  # top-k of |scores|, tied entries chosen as the official GetSubnet's sort does

    def __init__(self, *args, num_tasks: Optional[int] = None, sparsity: Optional[float] = None, **kwargs):
        super().__init__(*args, num_tasks=num_tasks, **kwargs)
        self.sparsity = resolve_sparsity(sparsity)

    @property
    def density(self) -> float:
        return float(self.sparsity)


class FastMultitaskMaskConv(_MultitaskConvBase):
    """The main repository's threshold layer (mask = 1[scores >= 0], Piggyback-style)."""


class StackedFastMultitaskMaskConv(FastMultitaskMaskConv):
    """The conv type of the official NNs experiment (``experiments/NNs/supsup.py``): upstream it forms
    the superposition's masks from every learned task's scores at each forward rather than from
    ``cache_masks()``'s buffer. Here both read the tasks' bits (a live task's scores are packed when
    the model moves to the superposition), so it is :class:`FastMultitaskMaskConv` under that name."""
