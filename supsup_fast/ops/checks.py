"""Argument checks shared by every op. They only read shapes, dtypes and devices, so they also
run on fake tensors while torch.compile traces; data checks (NaN) run in the real kernels."""
from __future__ import annotations

import math
import operator
from typing import Optional, Sequence

import torch

from ..bits import num_words
from .registry import backend_for


def _floating(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def words_tensor(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must hold int32 words (canonical bit layout), got dtype {t.dtype}")


def check_unpack_bits(words: torch.Tensor, n, min_n: int = 1) -> None:
    """unpack_bits's arguments: int32 words [..., ceil(n/32)] and an int n >= min_n (the registered op
    takes n = 0, a layer of no inputs, whose signed backward unpacks no words)."""
    words_tensor("words", words)
    if not is_int(n) or n < min_n:
        raise ValueError(f"n must be a {'positive' if min_n >= 1 else 'non-negative'} int, got {n!r}")
    if words.dim() < 1 or words.shape[-1] != (n + 31) // 32:
        raise ValueError(f"words must have ceil(n/32) = {(n + 31) // 32} words in its last dimension "
                         f"for n = {n}, got shape {tuple(words.shape)}")


def is_int(value) -> bool:
    """An int argument: a Python int (not a bool), or a symbolic one under torch.compile(dynamic=True)."""
    return isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool)


def same_device(**tensors: Optional[torch.Tensor]) -> None:
    devices = {k: v.device for k, v in tensors.items() if v is not None}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {desc}")


def n_of(weight: torch.Tensor) -> int:
    return int(math.prod(weight.shape[1:]))


def check_words_for_weight(name: str, words: torch.Tensor, weight: torch.Tensor, banked: bool) -> None:
    words_tensor(name, words)
    out, n = weight.shape[0], n_of(weight)
    expect = (out, num_words(n))
    got = tuple(words.shape[1:]) if banked else tuple(words.shape)
    if banked and words.dim() != 3:
        raise ValueError(f"{name} must be [k, out, words] = [k, {expect[0]}, {expect[1]}], got shape {tuple(words.shape)}")
    if got != expect:
        lead = "[k, " if banked else "["
        raise ValueError(
            f"{name} must be {lead}{expect[0]}, {expect[1]}] for a weight of shape {tuple(weight.shape)} "
            f"(n = {n} bits per row -> {expect[1]} int32 words), got shape {tuple(words.shape)}")


def check_alpha(alpha: torch.Tensor, k: int) -> None:
    _floating("alpha", alpha)
    if alpha.dim() != 1 or alpha.shape[0] != k:
        raise ValueError(f"alpha must have shape [k] = [{k}] to match the bank's {k} tasks, got {tuple(alpha.shape)}")


def check_active(active: torch.Tensor, k: int) -> None:
    """``active``, the subset of a k-task bank to superpose: a 1-D integer tensor of distinct task
    indices in [0, k) (a repeated index would count its mask twice in one sum and not in another)."""
    if not isinstance(active, torch.Tensor) or active.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"active must be an int64 or int32 tensor of task indices, got {type(active).__name__}"
                        f"{' of dtype ' + str(active.dtype) if isinstance(active, torch.Tensor) else ''}")
    if active.dim() != 1:
        raise ValueError(f"active must be 1-D (task indices), got shape {tuple(active.shape)}")
    if active.numel() == 0 or capturing(active):
        return
    lo, hi = int(active.min()), int(active.max())
    if lo < 0 or hi >= k:
        raise ValueError(f"active must hold task indices in [0, {k}), got values in [{lo}, {hi}]")
    if torch.unique(active).numel() != active.numel():
        raise ValueError(f"active must hold distinct task indices, got {active.tolist() if active.numel() <= 20 else 'repeats'}")


def capturing(t: torch.Tensor) -> bool:
    """True while a CUDA graph is being captured on t's device: data checks (a host sync) are
    skipped then, since they would fail the capture and could only see the capture-time values."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def surely_finite(t: torch.Tensor) -> bool:
    """True when t's sum is finite, which proves every entry finite (a NaN or an infinity makes the
    sum NaN or infinite); False may also mean the sum overflowed. One reduction, cheaper than
    ``isfinite(t).all()`` (1.4 ms per million floats on this project's CPU)."""
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    return math.isfinite(float(t.detach().sum(dtype=acc)))


def finite_unless_capturing(t: torch.Tensor) -> bool:
    """Whether t is surely finite (True, unchecked, inside a CUDA-graph capture: the check is a host
    sync). A sum that overflows only sends a call to the reference backend, which is always right."""
    return capturing(t) or t.numel() == 0 or surely_finite(t)


def outer_in_range(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether every product g·x·w of a rank-1 α-gradient is finite: max|g| · max|x| · max|w| below
    the dtype's largest value. Then the lookup kernels, which add only the set bits, agree with the
    contract's Σ Mᵢⱼ vⱼ; otherwise 0·inf must give NaN for the tasks whose bit is clear, and the
    reference runs. True, unchecked, inside a CUDA-graph capture."""
    if capturing(g):
        return True
    if g.numel() == 0 or x.numel() == 0 or weight.numel() == 0:
        return True
    bound = _abs_max(g) * _abs_max(x) * _abs_max(weight)
    return math.isfinite(bound) and bound < torch.finfo(weight.dtype).max


def _abs_max(t: torch.Tensor) -> float:
    """max |t| from one min-max reduction, with no |t| temporary (NaN where t holds one: then both
    ends are NaN)."""
    lo, hi = torch.aminmax(t.detach())
    return max(-float(lo), float(hi)) if not math.isnan(float(hi)) else math.nan


def check_no_nan_alpha(alpha: torch.Tensor) -> None:
    """α must be finite: NaN and ±inf both make every output NaN. Checked by every op that takes α
    (not inside a CUDA-graph capture, see ``capturing``)."""
    if not alpha.numel() or capturing(alpha):
        return
    if not surely_finite(alpha) and not bool(torch.isfinite(alpha).all()):  # exact only when the sum is not finite
        what = "NaN" if bool(torch.isnan(alpha).any()) else "±inf"
        raise ValueError(f"alpha contains {what}; the superposition coefficients must be finite")


check_finite_alpha = check_no_nan_alpha


def degenerate(*sizes: int) -> bool:
    """True when one of the sizes (k tasks, q queries, out rows, batch elements) is zero: the op
    then runs on the reference backend, so every backend gives the same (empty or zero) result."""
    return any(int(s) == 0 for s in sizes)


def check_bias(bias: Optional[torch.Tensor], weight: torch.Tensor) -> None:
    if bias is None:
        return
    _floating("bias", bias)
    if tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    if bias.dtype != weight.dtype:
        raise TypeError(f"bias dtype {bias.dtype} must match weight dtype {weight.dtype}")


def check_x_weight(x: torch.Tensor, weight: torch.Tensor, conv: bool) -> None:
    _floating("x", x)
    _floating("weight", weight)
    if x.dtype != weight.dtype:
        raise TypeError(f"x dtype {x.dtype} must match weight dtype {weight.dtype}")
    if conv:
        if weight.dim() != 4:
            raise ValueError(f"weight must be [out, in/groups, kh, kw], got shape {tuple(weight.shape)}")
        if x.dim() not in (3, 4):
            raise ValueError(f"x must be [N, C, H, W] or [C, H, W], got shape {tuple(x.shape)}")
    else:
        if weight.dim() != 2:
            raise ValueError(f"weight must be [out, in], got shape {tuple(weight.shape)}")
        if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
            raise ValueError(f"x must be [*, {weight.shape[1]}] to match weight [out, in] = "
                             f"{list(weight.shape)}, got shape {tuple(x.shape)}")


def valid_linear(x, weight, words, bias) -> bool:
    """The common valid masked_linear call, tested in one pass: a batch-1 layer's time is a few tens
    of µs, so the separate checks below run only to name what is wrong. Each shape is read once
    (a tensor's ``.shape`` builds a new torch.Size) and dtypes, which are singletons, compare by
    identity."""
    try:
        dtype, ws, xs, ms = weight.dtype, weight.shape, x.shape, words.shape
        if not (dtype.is_floating_point and x.dtype is dtype and words.dtype is torch.int32 and len(ws) == 2
                and len(xs) >= 1 and len(ms) == 2 and xs[-1] == ws[1] and ms[0] == ws[0] and ms[1] == num_words(ws[1])):
            return False
        return _same_device_and_bias(x, weight, words, bias, dtype, ws[0])
    except AttributeError:  # not a tensor: the full checks say which argument
        return False


def valid_conv(x, weight, words, bias) -> bool:
    """``valid_linear`` for masked_conv2d (weight [out, in/groups, kh, kw], x [N, C, H, W] or
    [C, H, W]; the channels against groups are ``check_conv_params``'s): the separate checks cost
    about 13 µs, a third of a small conv layer's call at batch 1."""
    try:
        dtype, ws, xs, ms = weight.dtype, weight.shape, x.shape, words.shape
        if not (dtype.is_floating_point and x.dtype is dtype and words.dtype is torch.int32 and len(ws) == 4
                and len(xs) in (3, 4) and len(ms) == 2 and ms[0] == ws[0] and ms[1] == num_words(ws[1] * ws[2] * ws[3])):
            return False
        return _same_device_and_bias(x, weight, words, bias, dtype, ws[0])
    except AttributeError:
        return False


def _same_device_and_bias(x, weight, words, bias, dtype, out: int) -> bool:
    device = weight.device
    if x.device != device or words.device != device:
        return False
    if bias is None:
        return True
    bs = bias.shape
    return bias.dtype is dtype and len(bs) == 1 and bs[0] == out and bias.device == device


def check_masked(x, weight, mask_words, bias, conv: bool) -> None:
    if (valid_conv if conv else valid_linear)(x, weight, mask_words, bias):
        return
    check_x_weight(x, weight, conv)
    check_words_for_weight("mask_words", mask_words, weight, banked=False)
    check_bias(bias, weight)
    same_device(x=x, weight=weight, mask_words=mask_words, bias=bias)


def check_superposed(x, weight, bank, alpha, bias, conv: bool) -> None:
    check_x_weight(x, weight, conv)
    check_words_for_weight("bank", bank, weight, banked=True)
    check_alpha(alpha, bank.shape[0])
    check_bias(bias, weight)
    same_device(x=x, weight=weight, bank=bank, alpha=alpha, bias=bias)


def check_bank(bank: torch.Tensor) -> None:
    words_tensor("bank", bank)
    if bank.dim() < 2:
        raise ValueError(f"bank must be [k, *lead, words], got shape {tuple(bank.shape)}")


def check_bank_rows(bank: torch.Tensor, n: int) -> None:
    """bank [k, *lead, ceil(n/32)] of n-bit rows."""
    check_bank(bank)
    if not is_int(n) or n < 1:
        raise ValueError(f"n must be a positive int (bits per row), got {n!r}")
    if bank.shape[-1] != num_words(n):
        raise ValueError(f"bank has {bank.shape[-1]} words per row but n = {n} needs {num_words(n)}")


def check_superpose(bank: torch.Tensor, alpha: torch.Tensor, n: int) -> None:
    check_bank_rows(bank, n)
    check_alpha(alpha, bank.shape[0])
    same_device(bank=bank, alpha=alpha)


def check_mask_dot(bank: torch.Tensor, v: torch.Tensor, batched: bool = False) -> None:
    """v is [*lead, n] (``batched``: [q, *lead, n]) matching bank [k, *lead, ceil(n/32)]."""
    check_bank(bank)
    _floating("v", v)
    lead = tuple(v.shape[1:-1]) if batched else tuple(v.shape[:-1])
    if (batched and v.dim() < 2) or lead != tuple(bank.shape[1:-1]):
        raise ValueError(f"v must be [{'q, ' if batched else ''}*lead, n] with lead = {list(bank.shape[1:-1])} "
                         f"from bank {list(bank.shape)}, got shape {tuple(v.shape)}")
    if bank.shape[-1] != num_words(v.shape[-1]):
        raise ValueError(f"bank has {bank.shape[-1]} words per row but v has n = {v.shape[-1]} "
                         f"(needs {num_words(v.shape[-1])} words)")
    same_device(bank=bank, v=v)


def check_bank_linear(x: torch.Tensor, weight: torch.Tensor, bank: torch.Tensor) -> None:
    """x [*, in] through every task's masked linear layer: weight [out, in], bank [k, out, ceil(in/32)]."""
    check_x_weight(x, weight, conv=False)
    check_words_for_weight("bank", bank, weight, banked=True)
    same_device(x=x, weight=weight, bank=bank)


def _check_outer_operands(op: str, g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """g [q, R], x [q, n] and weight [R, n] of one float dtype."""
    for name, t in (("g", g), ("x", x), ("weight", weight)):
        _floating(name, t)
    if weight.dim() != 2 or g.dim() != 2 or x.dim() != 2:
        raise ValueError(f"{op} needs g [q, R], x [q, n] and weight [R, n], got g {tuple(g.shape)}, "
                         f"x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    R, n = weight.shape
    if g.shape[1] != R or x.shape[1] != n or g.shape[0] != x.shape[0]:
        raise ValueError(f"g must be [q, {R}] and x [q, {n}] for weight {tuple(weight.shape)}, got g {tuple(g.shape)}, "
                         f"x {tuple(x.shape)}")
    if not (g.dtype == x.dtype == weight.dtype):
        raise ValueError(f"g, x and weight must share one dtype, got {g.dtype}, {x.dtype}, {weight.dtype}")


def check_mask_dot_outer(bank: torch.Tensor, g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                         bank_t: Optional[torch.Tensor] = None) -> None:
    """bank [k, R, ceil(n/32)], g [q, R], x [q, n], weight [R, n], all of one float dtype; bank_t, if
    given, shaped as interleave_tasks(bank): [R, ceil(n/32), k rounded up to 16]."""
    check_bank(bank)
    _check_outer_operands("mask_dot_outer", g, x, weight)
    R, n = weight.shape
    if bank.dim() != 3 or tuple(bank.shape[1:]) != (R, num_words(n)):
        raise ValueError(f"bank must be [k, {R}, {num_words(n)}] for weight {tuple(weight.shape)}, got {tuple(bank.shape)}")
    same_device(bank=bank, g=g, x=x, weight=weight)
    if bank_t is not None:
        check_bank_t(bank, bank_t)


def check_bank_t(bank: torch.Tensor, bank_t: torch.Tensor) -> None:
    """bank_t shaped as interleave_tasks(bank): [*bank.shape[1:], k rounded up to 16], words, on bank's device."""
    words_tensor("bank_t", bank_t)
    want = (*bank.shape[1:], -bank.shape[0] // 16 * -16)
    if tuple(bank_t.shape) != want:
        raise ValueError(f"bank_t must be interleave_tasks(bank), shape {want}, got {tuple(bank_t.shape)}")
    same_device(bank=bank, bank_t=bank_t)
    _check_copy_words("bank_t", "interleave_tasks(bank)", "interleaved_copy_matches", bank, bank_t)


def check_bank_w(bank: torch.Tensor, bank_w: torch.Tensor, n: int) -> None:
    """bank_w shaped as interleave_weights(bank, n): [*bank.shape[1:-1], ceil(k/32), n rounded up to 16],
    words, on bank's device."""
    words_tensor("bank_w", bank_w)
    want = (*bank.shape[1:-1], -bank.shape[0] // 32 * -32 // 32, -n // 16 * -16)
    if tuple(bank_w.shape) != want:
        raise ValueError(f"bank_w must be interleave_weights(bank, n={n}), shape {want}, got {tuple(bank_w.shape)}")
    same_device(bank=bank, bank_w=bank_w)
    _check_copy_words("bank_w", f"interleave_weights(bank, n={n})", "weight_copy_matches", bank, bank_w, n)


def check_mlp_copies(banks: Sequence[torch.Tensor], copies: Sequence[torch.Tensor], transposed: Sequence[bool]) -> None:
    """Each of ``mlp_mask_dot_outer``'s copies made from its bank (as ``check_bank_t`` does for one op):
    ``interleave_tasks(bank)``, or where ``transposed`` that of ``transpose_masks(bank, n)``."""
    for i, (bank, copy, t) in enumerate(zip(banks, copies, transposed)):
        if t:
            _check_copy_words(f"copies[{i}]", f"interleave_tasks(transpose_masks(banks[{i}], n))", "transposed_copy_matches",
                              bank, copy)
        else:
            _check_copy_words(f"copies[{i}]", f"interleave_tasks(banks[{i}])", "interleaved_copy_matches", bank, copy)


def tensor_version(t: torch.Tensor):
    """``t._version`` for a cache key; for an inference tensor, which keeps no version counter, a new
    object equal to nothing, so that a cache keyed on it is never reused."""
    return object() if t.is_inference() else t._version


def _check_copy_words(name: str, what: str, matcher: str, bank: torch.Tensor, copy: torch.Tensor, *n: int) -> None:
    """The shape of a copy does not show which bank it was made from (k rounds up to 16 or 32): the
    backend that reads it compares sampled words with the bank's, a few ns (a copy of another bank,
    or of this one before a task was added or changed, gives results of other masks otherwise)."""
    if torch.compiler.is_compiling() or bank.numel() == 0:
        return
    matches = getattr(backend_for(bank.device), matcher, None)
    # The matcher reads a contiguous copy only (and says nothing of another); the op reads it made contiguous.
    if matches is not None and matches(bank, copy.contiguous(), *n) is False:
        raise ValueError(f"{name} is not {what}: its words differ from the bank's (a copy of another bank, or of this "
                         f"bank before it changed); rebuild it with ss.ops.{what}. A layer's own copy goes stale "
                         f"when the bank's words are written through .data, which keeps their version: "
                         f"layer.bank.drop_interleaved() rebuilds it")


def check_mask_dot_outer_interleaved(bank_t: torch.Tensor, k: int, g: torch.Tensor, x: torch.Tensor,
                                     weight: torch.Tensor) -> None:
    """bank_t = interleave_tasks(bank) of a k-task bank [k, R, ceil(n/32)]: [R, ceil(n/32), k rounded
    up to 16]; g [q, R], x [q, n], weight [R, n] of one float dtype."""
    words_tensor("bank_t", bank_t)
    if not is_int(k) or k < 0:
        raise ValueError(f"k (the tasks of the bank that bank_t interleaves) must be an int >= 0, got {k!r}")
    _check_outer_operands("mask_dot_outer_interleaved", g, x, weight)
    R, n = weight.shape
    want = (R, num_words(n), -k // 16 * -16)
    if tuple(bank_t.shape) != want:
        raise ValueError(f"bank_t must be interleave_tasks of a [{k}, {R}, {num_words(n)}] bank for weight "
                         f"{tuple(weight.shape)}, shape {want}, got {tuple(bank_t.shape)}")
    same_device(bank_t=bank_t, g=g, x=x, weight=weight)


def check_mlp_mask_dot_outer(banks, copies, transposed, weights, backward_weights, inputs, g: torch.Tensor) -> None:
    """Per layer i of L >= 1: banks[i] [k, R_i, ceil(n_i/32)] (one k), backward_weights[i] [R_i, n_i],
    inputs[i] [q, n_i], weights[i] [R_i, n_i] with copies[i] = interleave_tasks(banks[i]), or where
    transposed[i], weights[i] [n_i, R_i] with copies[i] of transpose_masks(banks[i], n_i); n_{i+1} =
    R_i, and g [q, R_{L-1}]; all floats of one dtype."""
    lists = dict(banks=banks, copies=copies, transposed=transposed, weights=weights, backward_weights=backward_weights,
                 inputs=inputs)
    L = len(banks)
    if L < 1 or any(len(v) != L for v in lists.values()):
        raise ValueError("mlp_mask_dot_outer needs one bank, copy, orientation, weight, backward weight and input "
                         f"per layer, got {', '.join(f'{name}: {len(v)}' for name, v in lists.items())}")
    _floating("g", g)
    for i in range(L):
        check_bank(banks[i])
        _floating(f"inputs[{i}]", inputs[i])
        if banks[i].dim() != 3 or inputs[i].dim() != 2:
            raise ValueError(f"layer {i}: banks[{i}] must be [k, R, W] and inputs[{i}] [q, n], got "
                             f"{tuple(banks[i].shape)} and {tuple(inputs[i].shape)}")
        R, n = banks[i].shape[1], inputs[i].shape[1]
        u = backward_weights[i]
        _floating(f"backward_weights[{i}]", u)
        if tuple(u.shape) != (R, n) or u.dtype != g.dtype:
            raise ValueError(f"backward_weights[{i}] must be {g.dtype} [{R}, {n}], got {u.dtype} {tuple(u.shape)}")
        _floating(f"weights[{i}]", weights[i])
        want = (n, R) if transposed[i] else (R, n)
        if tuple(weights[i].shape) != want:
            raise ValueError(f"layer {i}: weights[{i}] must be {'Wᵀ ' if transposed[i] else 'W '}{list(want)} "
                             f"(transposed[{i}] = {bool(transposed[i])}), got {tuple(weights[i].shape)}")
        if i + 1 == L and (g.dim() != 2 or g.shape[1] != R):
            raise ValueError(f"g must be [q, {R}], the last layer's output gradients, got {tuple(g.shape)}")
        check_mask_dot_outer(banks[i], g.new_empty(g.shape[0], R) if i + 1 < L else g, inputs[i],
                             weights[i].t() if transposed[i] else weights[i])
        if banks[i].shape[0] != banks[0].shape[0]:
            raise ValueError(f"banks must share one k, got {banks[0].shape[0]} and {banks[i].shape[0]} (layer {i})")
        if inputs[i].shape[0] != g.shape[0]:
            raise ValueError(f"inputs[{i}] must be [{g.shape[0]}, {n}] (q = g's rows), got {tuple(inputs[i].shape)}")
        if i + 1 < L and inputs[i + 1].shape[1] != R:
            raise ValueError(f"layer {i} has {R} outputs but inputs[{i + 1}] is {tuple(inputs[i + 1].shape)}")
        words_tensor(f"copies[{i}]", copies[i])
        a, b = (n, R) if transposed[i] else (R, n)
        want = (a, num_words(b), -banks[i].shape[0] // 16 * -16)
        if tuple(copies[i].shape) != want:
            what = "interleave_tasks(transpose_masks(banks[i], n))" if transposed[i] else "interleave_tasks(banks[i])"
            raise ValueError(f"copies[{i}] must be {what}, shape {want}, got {tuple(copies[i].shape)}")


def check_transpose_masks(words: torch.Tensor, n: int) -> None:
    """words [*, R, ceil(n/32)], n >= 1 bits per row."""
    words_tensor("words", words)
    if not is_int(n) or n < 1:
        raise ValueError(f"n must be a positive int (bits per row), got {n!r}")
    if words.dim() < 2 or words.shape[-1] != num_words(n):
        raise ValueError(f"words must be [*, R, ceil(n/32)] = [*, R, {num_words(n)}] for n = {n}, "
                         f"got shape {tuple(words.shape)}")


def pair(name: str, value, n: int = 2) -> list:
    if isinstance(value, int):
        return [value] * n
    if isinstance(value, str):
        hint = " (string padding such as 'same' is the layers', SupermaskConv2d's, not the ops')" if name == "padding" else ""
        raise ValueError(f"{name} must be an int or a tuple of {n} ints, got {value!r}{hint}")
    try:
        value = [operator.index(v) for v in value]  # ints (numpy's too), never a float truncated
    except TypeError:
        raise ValueError(f"{name} must be an int or a tuple of {n} ints, got {value!r}") from None
    if len(value) != n:
        raise ValueError(f"{name} must have {n} entries, got {value}")
    return value


def check_conv_params(stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
                      x: torch.Tensor, weight: torch.Tensor) -> None:
    if any(s < 1 for s in stride):
        raise ValueError(f"stride must be >= 1, got {list(stride)}")
    if any(p < 0 for p in padding):
        raise ValueError(f"padding must be >= 0, got {list(padding)}")
    if any(d < 1 for d in dilation):
        raise ValueError(f"dilation must be >= 1, got {list(dilation)}")
    c_in = x.shape[-3]
    if groups < 1 or c_in % groups or weight.shape[0] % groups or weight.shape[1] * groups != c_in:
        raise ValueError(f"groups={groups} does not fit x with {c_in} channels and weight {list(weight.shape)}")
