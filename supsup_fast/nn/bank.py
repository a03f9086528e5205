"""Per-layer storage that grows one task at a time with amortised (capacity-doubling) growth."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .. import ops
from ..bits import num_words, pad_bits_set


class TaskRows(nn.Module):
    """A ``[k, *row_shape]`` tensor that grows by one row per task without copying all previous
    rows each time: the buffer's capacity doubles when full, so appending k tasks costs O(k) row
    copies in total. ``rows`` is a view of the first ``k`` rows. The spare capacity is allocated
    uninitialised, so on the CPU it holds address space, not memory, until rows are written there; a copy
    (``copy.deepcopy``, pickle) holds the k rows only.

    ``state_dict()`` holds the k rows (``{prefix}rows``, not the spare capacity) and
    ``load_state_dict`` restores them, k included, refusing rows of another shape or dtype;
    ``persist_rows = False`` leaves them out (a layer that saves its rows in a format of its own)."""

    def __init__(self, row_shape: Tuple[int, ...], dtype: torch.dtype, device=None):
        super().__init__()
        self.row_shape = tuple(int(s) for s in row_shape)
        self.register_buffer("storage", torch.zeros(0, *self.row_shape, dtype=dtype, device=device), persistent=False)
        self.count = 0
        self._kept_row = None  # (storage, index, view) of the last row() call
        self.persist_rows = True

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.persist_rows:  # a copy of the k rows: saving the view would write the whole storage
            destination[prefix + "rows"] = self.rows.detach().clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        rows = state_dict.pop(prefix + "rows", None) if self.persist_rows else None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if not self.persist_rows:
            return
        if rows is None:
            missing_keys.append(prefix + "rows")
            return
        if isinstance(rows, torch.Tensor) and rows.is_floating_point() and self.storage.is_floating_point():
            rows = rows.to(self.storage.dtype)  # as load_state_dict converts a float buffer
        if not isinstance(rows, torch.Tensor) or rows.dim() != 1 + len(self.row_shape) or \
                tuple(rows.shape[1:]) != self.row_shape or rows.dtype != self.storage.dtype:
            got = f"{rows.dtype}{list(rows.shape)}" if isinstance(rows, torch.Tensor) else type(rows).__name__
            error_msgs.append(f"{prefix}rows must be {self.storage.dtype}[k, {', '.join(map(str, self.row_shape))}], got {got}")
            return
        problem = self._check_rows(rows)
        if problem is not None:
            error_msgs.append(f"{prefix}rows: {problem}")
            return
        with torch.no_grad(), torch.inference_mode(False):
            if local_metadata.get("assign_to_params_buffers", False):  # load_state_dict(assign=True): its tensor, as for a buffer
                self.storage = rows.detach() if rows.is_contiguous() else rows.detach().contiguous()
            else:
                self.storage = rows.to(self.storage.device).clone()
        self.count = rows.shape[0]
        self._kept_row = None

    def _check_rows(self, rows: torch.Tensor) -> Optional[str]:
        """Why ``rows`` from a state dict cannot be this module's (None when they can)."""
        return None

    @property
    def rows(self) -> torch.Tensor:
        return self.storage[: self.count]

    def row(self, index: int) -> torch.Tensor:
        """Row ``index`` (< count) as a view. A one-task layer's forward reads its task's words this
        way on every call, and a fresh view costs about 2 µs (a 32 x 32 layer's batch-1 call takes 12),
        so the last view is kept while the storage is the same tensor; writes to the row go to the
        storage in place and show through it."""
        if not 0 <= index < self.count:
            raise IndexError(f"row index must be in [0, {self.count}), got {index}")
        storage = self._buffers["storage"]
        kept = self._kept_row
        if kept is not None and kept[0] is storage and kept[1] == index:
            return kept[2]
        view = storage[index]
        # Not kept under torch.jit.trace (torch._C._is_tracing(), which dynamo cannot call): its check
        # re-runs the forward, which must record the same indexing as the first run.
        if torch.compiler.is_compiling() or not torch._C._is_tracing():
            self._kept_row = (storage, index, view)
        return view

    def __len__(self) -> int:
        return self.count

    def _reserve(self, capacity: int) -> None:
        if capacity <= self.storage.shape[0]:
            return
        new_cap = max(capacity, 2 * self.storage.shape[0], 1)
        with torch.inference_mode(False):  # grown under inference_mode, the bank must stay writable after it
            # empty, not zeros: the spare rows stay untouched address space (not resident) until a task
            # is written there; nothing reads past count, and copies and files hold the rows only.
            grown = torch.empty(new_cap, *self.row_shape, dtype=self.storage.dtype, device=self.storage.device)
            grown[: self.count] = self.storage[: self.count]
        self.storage = grown
        self._kept_row = None  # it holds the old storage

    def append(self, rows: torch.Tensor) -> None:
        """Append one row ``[*row_shape]`` or a block ``[m, *row_shape]``."""
        if tuple(rows.shape) == self.row_shape:
            rows = rows.unsqueeze(0)
        if tuple(rows.shape[1:]) != self.row_shape:
            raise ValueError(f"rows must be [m, {', '.join(map(str, self.row_shape))}], got {tuple(rows.shape)}")
        if rows.dtype != self.storage.dtype:
            raise TypeError(f"rows must have dtype {self.storage.dtype}, got {rows.dtype}")
        m = rows.shape[0]
        self._reserve(self.count + m)
        self.storage[self.count: self.count + m] = rows.to(self.storage.device)
        self.count += m

    def set_row(self, index: int, row: torch.Tensor) -> None:
        """Overwrite row ``index`` (< count) in place."""
        if not 0 <= index < self.count:
            raise IndexError(f"row index must be in [0, {self.count}), got {index}")
        if tuple(row.shape) != self.row_shape or row.dtype != self.storage.dtype:
            raise ValueError(f"row must be {self.storage.dtype}{list(self.row_shape)}, got {row.dtype}{list(row.shape)}")
        self.storage[index] = row.to(self.storage.device)

    def truncate(self, count: int) -> None:
        self.count = min(self.count, int(count))

    def _apply(self, fn, recurse=True):  # .to(), .float(), ...: the kept view is of the old storage
        self._kept_row = None
        return super()._apply(fn, recurse)

    def __getstate__(self):  # copy.deepcopy and pickle: the rows without the spare capacity or the kept view
        state = dict(super().__getstate__())
        state["_kept_row"] = None
        state["_buffers"] = {**state["_buffers"], "storage": self.storage[: self.count].clone()}
        return state

    def __setstate__(self, state):  # a pickle from before the kept view
        super().__setstate__(state)
        self.__dict__.setdefault("_kept_row", None)
        self.__dict__.setdefault("persist_rows", True)  # a pickle from before the rows were saved

    def extra_repr(self) -> str:
        return f"count={self.count}, row_shape={self.row_shape}, dtype={self.storage.dtype}"


class MaskBank(TaskRows):
    """The packed masks of one layer: ``int32[k, out, ceil(n/32)]``, canonical bit layout."""

    def __init__(self, out_features: int, n: int, device=None):
        super().__init__((out_features, num_words(n)), torch.int32, device)
        self.n = int(n)
        # (key, tensor) or None per copy: interleaved(False), interleaved(True), interleaved_weights()
        self._interleaved = (None, None, None)
        self._keep_interleaved = True
        self._keep_interleaved_weights = False

    @property
    def words(self) -> torch.Tensor:
        return self.rows

    def _check_rows(self, rows: torch.Tensor) -> Optional[str]:
        if not rows.is_meta and pad_bits_set(rows, self.n):
            return (f"bits set past bit {self.n} of a row (the padding of the last word must be zero); "
                    f"these are not the masks of a layer with {self.n} weights per output")
        return None

    @property
    def keep_interleaved(self) -> bool:
        """Whether task inference may keep ``interleaved()`` (as much memory as the bank). A sharded
        bank, split across ranks to save memory, does not; setting False frees the copy."""
        return self._keep_interleaved

    @keep_interleaved.setter
    def keep_interleaved(self, keep: bool) -> None:
        self._keep_interleaved = bool(keep)
        if not keep:
            self.drop_interleaved()

    @property
    def keep_interleaved_weights(self) -> bool:
        """Whether a layer in superposition with a general α may keep ``interleaved_weights()`` (as much
        memory as the bank) to compute S = Σᵢ αᵢ Mᵢ from it. Off by default; setting False frees it."""
        return self._keep_interleaved_weights

    @keep_interleaved_weights.setter
    def keep_interleaved_weights(self, keep: bool) -> None:
        self._keep_interleaved_weights = bool(keep)
        if not keep:
            self._set_copy(2, None)

    def interleaved_weights(self) -> torch.Tensor:
        """``ops.interleave_weights(words, n)``, kept until the bank changes (as ``interleaved()``): the
        layout from which ``ops.superpose(bank_w=)`` reads S = Σᵢ αᵢ Mᵢ on the CPU, 16 weights' 32 tasks
        per vector. As much memory as the bank; ``drop_interleaved()`` frees it."""
        return self._kept_copy(2, lambda: ops.interleave_weights(self.words, self.n))

    def interleaved(self, transposed: bool = False) -> torch.Tensor:
        """``ops.interleave_tasks(words)``, kept until the bank changes (a task appended, a row
        rewritten, the bank truncated, moved or copied): the layout in which one-image task inference
        on the CPU reads only each query's live rows (``ops.mask_dot_outer(bank_t=)``). With
        ``transposed``, the copy of the transposed masks, ``interleave_tasks(transpose_masks(words,
        n))`` [n, ceil(out/32), kp], read by the layer's nonzero inputs instead
        (``ops.mask_dot_outer_interleaved``). Each holds about as much memory as the bank;
        ``drop_interleaved()`` frees them."""
        if transposed:
            return self._kept_copy(1, lambda: ops.interleave_tasks(ops.transpose_masks(self.words, self.n)))
        return self._kept_copy(0, lambda: ops.interleave_tasks(self.words))

    def _kept_copy(self, which: int, build) -> torch.Tensor:
        """Copy ``which`` of ``_interleaved``, built by ``build()`` where missing or stale."""
        key = self._copy_key()
        cached = self._interleaved[which]  # one read: another thread may drop or rebuild it meanwhile
        if cached is None or cached[0] != key:
            self._interleaved = self._current_copies(key)  # free the stale copies before building the new one
            with torch.inference_mode(False):  # the copy outlives an inference_mode block: a normal tensor
                cached = (key, build())
            self._set_copy(which, cached)
        return cached[1]

    def kept_interleaved(self) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The current copies kept, ``interleaved(False)`` and ``interleaved(True)``, each None where
        not kept or stale (returning it would build it)."""
        return tuple(c if c is None else c[1] for c in self._current_copies(self._copy_key())[:2])

    def _copy_key(self) -> tuple:
        return (self.count, id(self.storage), self.storage.data_ptr(), ops.checks.tensor_version(self.storage), self.storage.device)

    def _current_copies(self, key: tuple) -> tuple:
        """The (key, copy) entries built under ``key``, None for the stale or missing ones."""
        return tuple(c if c is not None and c[0] == key else None for c in self._interleaved)

    def _set_copy(self, which: int, cached) -> None:
        copies = list(self._interleaved)  # a new tuple: a reader holds the old one whole
        copies[which] = cached
        self._interleaved = tuple(copies)

    def drop_interleaved(self) -> None:
        self._interleaved = (None, None, None)

    def _load_from_state_dict(self, *args, **kwargs):  # new rows: the copies of the old ones go
        super()._load_from_state_dict(*args, **kwargs)
        self.drop_interleaved()

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .float(), ...: the copy stays behind otherwise
        self.drop_interleaved()
        return super()._apply(fn, recurse)

    def __getstate__(self):  # copy.deepcopy and pickle: a copy of the model does not carry the cache
        state = dict(super().__getstate__())
        state["_interleaved"] = (None, None, None)
        return state

    def __setstate__(self, state):  # a pickle from before the weight copy held two copies (or one, or None)
        super().__setstate__(state)
        if not isinstance(self._interleaved, tuple) or len(self._interleaved) != 3:
            self._interleaved = (None, None, None)
        self.__dict__.setdefault("_keep_interleaved_weights", False)

    # A change frees the copy at once (training goes on without holding a stale one); the key in
    # interleaved() also catches writes through the words view.
    def append(self, rows: torch.Tensor) -> None:
        self.drop_interleaved()
        super().append(rows)

    def set_row(self, index: int, row: torch.Tensor) -> None:
        self.drop_interleaved()
        super().set_row(index, row)

    def truncate(self, count: int) -> None:
        self.drop_interleaved()
        super().truncate(count)

    def nbytes(self) -> int:
        return self.count * self.row_shape[0] * self.row_shape[1] * 4
