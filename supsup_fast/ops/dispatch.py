"""What every op family shares: picking the backend for a call, and the small argument helpers.

Each op (one module per family: ``bits``, ``bank``, ``masked``, ``superposed``, ``signed``) is a
``torch.library`` custom op in the ``supsup`` namespace with a fake implementation and autograd.
It validates its arguments (in the real and in the fake implementation, so errors are the same
eagerly and under torch.compile), then hands the work to the backend chosen by
:mod:`supsup_fast.ops.registry`. Backward formulas call registered ops only, so a kernel backend
accelerates training and task inference without touching the op modules.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor

from . import checks
from .backends.reference import DenseConv2d, DenseLinear, ReferenceBackend
from .registry import backend_for

_LINEAR = DenseLinear()
_REFERENCE = ReferenceBackend()


def autocast_enabled_for(x) -> bool:
    """Whether autocast is on for ``x``'s device (cpu or cuda; others have no autocast here)."""
    return isinstance(x, torch.Tensor) and x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)


def under_autocast(x) -> bool:
    """``autocast_enabled_for(x)``, after the cheapest test (a public op asks it every call)."""
    return torch._C._is_any_autocast_enabled() and autocast_enabled_for(x)


def outside_autocast(forward, x: torch.Tensor, dtype: torch.dtype, *args, **kwargs) -> torch.Tensor:
    """``forward(x, *args, **kwargs)`` as an op of autocast's fp32 list: autocast off, a floating x
    cast to ``dtype`` (the weight's). The bit kernels compute in the weight's dtype, so output,
    gradients and saved tensors stay of one dtype (under autocast a bf16 output met fp32 saved
    tensors in the backward, and the output's dtype depended on which kernel the row count chose)."""
    with torch.autocast(x.device.type, enabled=False):
        return forward(x.to(dtype) if x.is_floating_point() else x, *args, **kwargs)


def _pick(device: torch.device, *sizes: int):
    """The backend for ``device``; the reference one when a size is zero (k = 0 tasks, q = 0
    queries, out = 0 rows, an empty batch), so that every backend returns the same empty or zero
    result (an empty sum is 0: superpose of k = 0 tasks is all zeros, a superposed layer over no
    task outputs its bias)."""
    backend = backend_for(device)  # a forced backend that cannot run here still says so
    return _REFERENCE if checks.degenerate(*sizes) else backend


def eager_plain(*tensors: Optional[Tensor]) -> bool:
    """Whether a call may run its op's bodies eagerly through a plain ``torch.autograd.Function``
    instead of the custom-op dispatcher: plain eager tensors (no torch.compile/FX tracing, no fake,
    meta or subclass tensors, no dispatch mode such as opcheck's). Gradients may be recorded."""
    # is_compiling() first: dynamo folds it, and would not trace the C call. The loop, not all() over
    # a generator: this runs on every batch-1 layer call.
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    for t in tensors:
        if t is not None and ((type(t) is not Tensor and type(t) is not torch.nn.Parameter) or t.is_meta):
            return False
    return True


def eager_without_grad(*tensors: Optional[Tensor]) -> bool:
    """Whether a call may run its op's body directly instead of through the custom-op dispatcher:
    plain eager tensors (``eager_plain``) and no gradient to record. The body is the very function
    the op runs, so the result is the same; the dispatcher's Python overhead (about 70 µs a call on
    this project's CPU) is most of a batch-1 layer's time."""
    if not eager_plain(*tensors):
        return False
    if not torch.is_grad_enabled():
        return True
    for t in tensors:
        if t is not None and t.requires_grad:
            return False
    return True


_CPU = torch.device("cpu")


def direct_function(name: str, x: Tensor):
    """The CPU backend's direct function ``name`` (``direct_masked_linear``,
    ``direct_signed_masked_linear``) where x is a CPU tensor and nothing traces the call, else None.
    The function runs the most common call, inference of a float32 CPU layer on 1-16 rows, straight
    through the C++ op: at batch 1 a large layer's kernel streams W through the caches, so the Python
    before the next call runs cold and each step of it costs µs (``benchmarks/call_overhead.py``).
    It tests in C++ what else the call must be (plain dense tensors, no dispatch mode, no
    ``torch.jit.trace`` under way, no gradient to record, 1-16 rows, arguments the op accepts) and
    returns None where it is not; the caller then takes the general path, which names what is wrong.
    ``is_compiling()`` first: dynamo folds it, and would not trace the C call."""
    if torch.compiler.is_compiling() or type(x) is not Tensor or not x.is_cpu:
        return None
    return getattr(backend_for(_CPU), name)


def eager_linear_backend(x: Tensor, weight: Tensor, words: Tensor, bias: Optional[Tensor]):
    """The backend that runs a ``masked_linear`` call's body directly, or None: ``eager_without_grad``,
    then ``checks.valid_linear`` and ``_pick``'s test for an empty size, for the common call (a layer's
    inference at batch 1 takes tens of µs, and the separate checks cost about 5-10 µs of Python a
    call on the Intel Xeon VM). On None the caller takes the general path, which names what is wrong."""
    if not eager_without_grad(x, weight, words, bias) or not checks.valid_linear(x, weight, words, bias):
        return None
    if x.numel() == 0 or weight.shape[0] == 0:
        return None
    return backend_for(weight.device)


def _finite(v: Tensor) -> bool:
    """checks.finite_unless_capturing: v surely finite, or a CUDA-graph capture under way."""
    return checks.finite_unless_capturing(v)


def _lead(bank: Tensor) -> int:
    return math.prod(bank.shape[1:-1])


def _dense(conv_params):
    return _LINEAR if conv_params is None else DenseConv2d(*conv_params)


def _flatten_conv(stride, padding, dilation, groups) -> List[int]:
    return list(stride) + list(padding) + list(dilation) + [int(groups)]


def _unflatten_conv(p: Optional[List[int]]):
    if p is None:
        return None
    return p[0:2], p[2:4], p[4:6], p[6]


def _conv_out_fake(x, weight, stride, padding, dilation):
    dims = []
    for i in range(2):
        size = x.shape[-2 + i]
        k = dilation[i] * (weight.shape[2 + i] - 1) + 1
        dims.append((size + 2 * padding[i] - k) // stride[i] + 1)
    return x.new_empty(*x.shape[:-3], weight.shape[0], *dims)
