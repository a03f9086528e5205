"""``SupermaskLinear``: a drop-in ``nn.Linear`` whose weight is frozen and masked per task."""
from __future__ import annotations

import weakref
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .. import ops
from .layers import SupermaskLayer


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

    def _check_input(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != self.in_features:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__}(in_features={self.in_features}) needs x of shape [*, {self.in_features}], got {got}")

    def _dense(self, x, w):
        return F.linear(x, w, self.bias)

    def _dense_grads(self, grad, x, w, need_input: bool):
        """(dL/dx or None, dL/dW) of ``_dense`` at weight ``w``."""
        dw = grad.reshape(-1, grad.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]))
        return (grad.matmul(w) if need_input else None), dw

    def _masked(self, x, words):
        w, bias = self._frozen()
        # A signed-constant layer reads its frozen weights as sign bits: 2 bits per weight with the mask,
        # where the weight is still exactly ±scale (one loaded from elsewhere, or replaced through
        # functional_call, is not) and no gradient of it is asked for. Not under torch.compile or
        # torch.jit.trace (the scale is a float read from the weight, which a trace cannot hold) nor on
        # meta tensors; masked_linear computes the same x (W ⊙ M)ᵀ from the float weight.
        if (self.init_kind == "signed_constant" and x.dtype == w.dtype and not w.requires_grad
                and not torch.compiler.is_compiling() and not torch._C._is_tracing()):  # = torch.jit.is_tracing()
            sign_words, scale, exact = self._sign_bits(w)
            if exact:
                return ops.signed_masked_linear(x, sign_words, words, scale, bias)
        return ops.masked_linear(x, w, words, bias)

    def _sign_bits(self, w: Optional[torch.Tensor] = None):
        """(sign bits, scale, exact) of the frozen weight ``w`` (the layer's), rebuilt if the weight
        changes: exact where every |w| is the same nonzero scale (the sign bits are None otherwise)."""
        if w is None:
            w = self.weight
        # The weight itself (weakly), not its id(): a new weight tensor (functional_call, a dtype round
        # trip) can land at a freed one's id and address with the same version.
        key = (ops.checks.tensor_version(w), w.data_ptr())
        cache = self.__dict__.get("_sign_cache")
        if cache is None or cache[0][0]() is not w or cache[0][1] != key:
            if w.is_meta:  # no values to read: never exactly signed-constant
                return None, 0.0, False
            with torch.inference_mode(False):  # a cache outlives an inference_mode block: a normal tensor
                magnitude = w.detach().abs()
                scale = float(magnitude.max()) if w.numel() else 0.0
                exact = scale > 0 and bool((magnitude == scale).all())
                self._sign_cache = cache = ((weakref.ref(w), key), ops.pack_bits(w.detach() > 0) if exact else None,
                                            scale, exact)
        return cache[1], cache[2], cache[3]

    def signed_weight_bits(self) -> Optional[Tuple[torch.Tensor, float]]:
        """(sign bits, scale) of the frozen weight where it is exactly signed-constant (every |w| the
        same nonzero scale), else None: what a step may read in place of the float weight."""
        if self.init_kind != "signed_constant":
            return None
        sign_words, scale, exact = self._sign_bits()
        return (sign_words, scale) if exact else None

    def _superposed(self, x, bank, alpha, bank_t=None, bank_w=None):
        return ops.superposed_linear(x, self.weight, bank, alpha, self.bias, bank_t=bank_t, bank_w=bank_w)

    def _weight_copy(self, x, mode):
        """``bank.interleaved_weights()`` where the bank keeps it (``keep_interleaved_weights``, off by
        default) and S is computed from the bank (x and a general α both need gradients, the whole bank
        active) on a backend that reads the copy (ops.superposed_linear's bank_w)."""
        if torch.compiler.is_compiling():  # the copies are an eager speed-up; a trace reads the bank
            return None
        if not (mode.active is None and self.bank.keep_interleaved_weights and torch.is_grad_enabled() and x.requires_grad
                and mode.alpha.requires_grad and self.weight.dtype == torch.float32
                and ops.backend_for(x.device).reads_interleaved):
            return None
        return self.bank.interleaved_weights()

    def _interleaved_copy(self, x, mode):
        """``bank.interleaved()`` (kept while the bank is unchanged; ``keep_interleaved`` turns it off)
        for one image whose α needs a gradient on a backend that reads the copy: where the input needs
        one too, the α-gradient reads the copy about twice as fast as the bank, and where neither input
        nor weight does (a first layer), every task's output (ops.superposed_linear's bank_t)."""
        if torch.compiler.is_compiling():
            return None
        if not (mode.active is None and self.bank.keep_interleaved and torch.is_grad_enabled()
                and mode.alpha.requires_grad and (x.requires_grad or not self.weight.requires_grad)
                and x.numel() == x.shape[-1] and self.weight.dtype == torch.float32
                and ops.backend_for(x.device).reads_interleaved):
            return None
        return self.bank.interleaved()

    def _shape_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}"
