"""Count caches of a supermask layer: Σᵢ Mᵢ per weight over the whole bank or an active subset,
and Σᵢ Mᵢ / k for the uniform superposition. With them a uniform-α forward reads no mask bit. Also
the transposed frozen weight, which task inference reads with a bank's transposed copy."""
from __future__ import annotations

import weakref

import torch

from .. import ops


def bank_state(bank) -> tuple:
    """What a count derived from ``bank`` depends on: (a weak reference to its storage, its row
    count, version, address). A row written through the bank or its ``words`` view bumps
    the version; a new storage fails the identity test even at a freed one's address. Writes
    through ``.data`` keep the version, and are not seen (as by the layers' other caches)."""
    s = bank._buffers["storage"]
    return (weakref.ref(s), _storage_key(bank, s))


def same_bank_state(saved, bank) -> bool:
    s = bank._buffers["storage"]  # not bank.storage: Module.__getattr__ costs a forward about 0.3 µs a layer
    return saved is not None and saved[0]() is s and saved[1] == _storage_key(bank, s)  # is: a .to() makes another


def _storage_key(bank, s: torch.Tensor) -> tuple:
    return bank.count, ops.checks.tensor_version(s), s.data_ptr()


class CountCaches:
    """Mixed into :class:`supsup_fast.nn.layers.SupermaskLayer` (which owns ``bank``, ``weight``,
    ``n``, ``num_tasks``). Each count is kept with the bank state it was computed from
    (:func:`bank_state`), so rows changed through ``layer.bank`` directly are seen too."""

    def _weight_dtype(self) -> torch.dtype:
        w = self._buffers.get("weight")  # not through Module.__getattr__ (a forward asks twice); a Parameter else
        return (w if w is not None else self.weight).dtype

    def _count_dtype(self) -> torch.dtype:
        """Counts are integers: kept in float32 (exact to 2^24 tasks) under a half or bfloat16 weight,
        where one more task would not change a count past 256 (bfloat16) or 2,048 (float16)."""
        dtype = self._weight_dtype()
        return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype

    def set_count_cache(self, enabled: bool) -> None:
        """Whether to keep Σᵢ Mᵢ per weight (float, one weight-sized tensor) for uniform α."""
        if not enabled:
            self._counts = None

    def active_counts(self, active: torch.Tensor) -> torch.Tensor:
        """Σ_{i ∈ active} Mᵢ per weight. Binary task inference shrinks the active set every round;
        when the new set is a subset of the last one, the count is updated by subtracting only the
        tasks just ruled out (bits read over a whole search ≈ k, not k·log k)."""
        with torch.inference_mode(False):  # kept past an inference_mode block: normal tensors (as below)
            return self._active_counts(active)

    def _active_counts(self, active: torch.Tensor) -> torch.Tensor:
        cache = getattr(self, "_active_cache", None)
        ones = lambda m: torch.ones(m, dtype=self._count_dtype(), device=self.weight.device)
        if cache is not None and same_bank_state(cache[0], self.bank) and bool(torch.isin(active, cache[1]).all()) \
                and cache[2].dtype == self._count_dtype():
            removed = cache[1][~torch.isin(cache[1], active)]
            counts = cache[2]
            if removed.numel():
                counts = counts - ops.superpose(self.bank.words.index_select(0, removed), ones(removed.numel()), self.n).view_as(self.weight)
        elif active.numel() == self.num_tasks:
            counts = self.counts()
        else:
            counts = ops.superpose(self.bank.words.index_select(0, active), ones(active.numel()), self.n).view_as(self.weight)
        self._active_cache = (bank_state(self.bank), active.clone(), counts)
        return counts

    def counts(self) -> torch.Tensor:
        if torch.compiler.is_compiling():  # a trace cannot test the bank's state: computed, as eager would find it
            ones = torch.ones(self.num_tasks, dtype=self._count_dtype(), device=self.weight.device)
            return ops.superpose(self.bank.words, ones, self.n).view_as(self.weight)
        if self.counts_current():
            return self._buffers["_counts"]
        self._counts = None  # free the stale one first
        with torch.inference_mode(False):  # updated in place by commit_mask, maybe outside inference_mode
            ones = torch.ones(self.num_tasks, dtype=self._count_dtype(), device=self.weight.device)
            self._counts = ops.superpose(self.bank.words, ones, self.n).view_as(self.weight)
        self._counts_state = bank_state(self.bank)
        return self._counts

    def counts_current(self) -> bool:
        """Whether a count is kept and is of the bank as it is now."""
        counts = self._buffers["_counts"]
        # (a module .half() / .to(dtype) converts the buffer: then it is counted again)
        return counts is not None and counts.dtype == self._count_dtype() and \
            same_bank_state(self.__dict__.get("_counts_state"), self._modules["bank"])

    def counts_appended(self, counted: bool, words: torch.Tensor) -> None:
        """After ``words`` were appended to the bank, ``counted`` (:meth:`counts_current`) before: add
        their bits to the kept count instead of recounting the whole bank."""
        if counted:
            self._counts += ops.unpack_bits(words, self.n).view_as(self.weight).to(self._counts.dtype)
            self._counts_state = bank_state(self.bank)
        else:
            self._counts = None

    def _uniform_s(self, counts: torch.Tensor, k: int) -> torch.Tensor:
        """counts / k, kept while the same count tensor (same version) and k are in use: every
        one-shot query of an evaluation reuses it instead of rescaling a weight-sized tensor."""
        if torch.compiler.is_compiling():  # a trace cannot test version counters; it computes s once per call
            return (counts * (1.0 / k)).to(self.weight.dtype)
        cache = getattr(self, "_s_cache", None)
        dtype = self._weight_dtype()
        if cache is None or cache[0] is not counts or cache[1] != ops.checks.tensor_version(counts) or cache[2] != k \
                or cache[3].dtype != dtype:
            with torch.inference_mode(False):  # saved for backward by a later α-gradient: a normal tensor
                cache = (counts, ops.checks.tensor_version(counts), k, (counts * (1.0 / k)).to(dtype))
            self._s_cache = cache
        return cache[3]

    def transposed_weight(self) -> torch.Tensor:
        """Wᵀ of a linear layer (contiguous [in, out]), kept while the weight stays (its version counter,
        as in ``uniform_weight``): task inference reads a bank's transposed copy with it."""
        cache = getattr(self, "_wt_cache", None)
        if cache is None or cache[0] is not self.weight or cache[1] != ops.checks.tensor_version(self.weight):
            self._wt_cache = cache = None  # free the stale one before building the new one
            w = self.weight.detach()
            with torch.inference_mode(False):
                self._wt_cache = cache = (self.weight, ops.checks.tensor_version(self.weight),
                                          w.reshape(w.shape[0], -1).t().contiguous())
        return cache[2]

    def uniform_weight(self) -> torch.Tensor:
        """W ⊙ Σᵢ Mᵢ / k over the whole bank, the weight of the uniform superposition (the same fp32
        products as W ⊙ s in the superposed forward), kept while the weight, the counts and k stay:
        one more weight-sized tensor. Task inference through an MLP multiplies by it directly. A
        change to the frozen weight is seen through its version counter, so not through ``.data``
        (the convention of the layers' other caches)."""
        counts, k = self.counts(), self.num_tasks
        key = (ops.checks.tensor_version(counts), k, ops.checks.tensor_version(self.weight))
        cache = getattr(self, "_ws_cache", None)
        if cache is None or cache[0] is not counts or cache[1] is not self.weight or cache[2] != key:
            self._ws_cache = cache = None  # free the stale one before building the new one
            with torch.inference_mode(False):
                self._ws_cache = cache = (counts, self.weight, key, self.weight * (counts * (1.0 / k)).to(self.weight.dtype))
        return cache[3]
