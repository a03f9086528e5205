"""``SupermaskConv2d``: a drop-in ``nn.Conv2d`` whose weight is frozen and masked per task."""
from __future__ import annotations

import operator
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from .. import ops
from .layers import SupermaskLayer


def resolve_padding(padding, kernel_size, stride, dilation) -> Tuple[int, int]:
    """``nn.Conv2d``'s padding as two ints: given as ints, ``"valid"`` (none) or ``"same"`` (stride 1;
    the output keeps the input's size where the padding can be symmetric, an odd dilation·(k - 1))."""
    from ..ops.checks import pair
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        if any(s != 1 for s in stride):
            raise ValueError(f"padding='same' needs stride 1, got {tuple(stride)}")
        total = [d * (k - 1) for d, k in zip(dilation, kernel_size)]
        if any(t % 2 for t in total):
            raise ValueError(f"padding='same' with an even effective kernel (dilation·(kernel_size - 1) = {tuple(total)}) "
                             f"needs padding on one side only, which is not supported; pass the padding as ints")
        return (total[0] // 2, total[1] // 2)
    return tuple(pair("padding", padding))


PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class SupermaskConv2d(SupermaskLayer):
    """Drop-in for ``nn.Conv2d`` with frozen weights and per-task binary masks."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = False, padding_mode: str = "zeros", *,
                 init: Union[str, torch.Tensor] = "signed_constant",
                 mask_fn: str = "threshold", density: float = 0.5, seed: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, device=None, dtype=None):
        super().__init__()
        from ..ops.checks import pair
        kh, kw = pair("kernel_size", kernel_size)
        sizes = {}
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            try:
                sizes[name] = operator.index(value)  # ints, numpy's too (nn.Conv2d keeps them), never a float truncated
            except TypeError:
                sizes[name] = None
            if isinstance(value, bool) or sizes[name] is None or sizes[name] < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        in_channels, out_channels, groups = sizes["in_channels"], sizes["out_channels"], sizes["groups"]
        if kh < 1 or kw < 1:
            raise ValueError(f"kernel_size must be positive, got {kernel_size!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)
        self.stride, self.dilation, self.groups = tuple(pair("stride", stride)), tuple(pair("dilation", dilation)), groups
        for name, value in (("stride", self.stride), ("dilation", self.dilation)):
            if min(value) < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        self.padding = resolve_padding(padding, (kh, kw), self.stride, self.dilation)
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        self.padding_mode = padding_mode
        shape = (out_channels, in_channels // groups, kh, kw)
        self._setup(shape, in_channels // groups * kh * kw, bias, init, mask_fn, density, seed, generator, device, dtype)

    padding_mode = "zeros"  # (a class default too: layers pickled before the setting existed)

    @property
    def _conv_padding(self) -> Tuple[int, int]:
        """As nn.Conv2d: another mode pads x itself (F.pad, in forward), then the convolution pads nothing."""
        return self.padding if self.padding_mode == "zeros" else (0, 0)

    def _conv_kwargs(self) -> dict:
        return dict(stride=self.stride, padding=self._conv_padding, dilation=self.dilation, groups=self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            self._check_input(x)
            ph, pw = self.padding
            x = F.pad(x, (pw, pw, ph, ph), mode=self.padding_mode)
        return super().forward(x)

    def _check_input(self, x):
        if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4) or x.shape[-3] != self.in_channels:
            got = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__}(in_channels={self.in_channels}) needs x of shape [N, {self.in_channels}, H, W] "
                             f"or [{self.in_channels}, H, W], got {got}")

    def _dense(self, x, w):
        return F.conv2d(x, w, self.bias, self.stride, self._conv_padding, self.dilation, self.groups)

    def _dense_grads(self, grad, x, w, need_input: bool):
        """(dL/dx or None, dL/dW) of ``_dense`` at weight ``w``; an unbatched [C, H, W] x as a batch of one."""
        if x.dim() == 3:
            dx, dw = self._dense_grads(grad.unsqueeze(0), x.unsqueeze(0), w, need_input)
            return (dx.squeeze(0) if dx is not None else None), dw
        dx, dw, _ = torch.ops.aten.convolution_backward(grad, x, w, None, list(self.stride), list(self._conv_padding),
                                                        list(self.dilation), False, [0, 0], self.groups,
                                                        [need_input, True, False])
        return (dx if need_input else None), dw

    def _masked(self, x, words):
        w, bias = self._frozen()
        return ops.masked_conv2d(x, w, words, bias, self.stride, self._conv_padding, self.dilation, self.groups)

    def _superposed(self, x, bank, alpha, bank_t=None, bank_w=None):  # the copies serve linear layers only
        return ops.superposed_conv2d(x, self.weight, bank, alpha, self.bias, **self._conv_kwargs())

    def _shape_repr(self):
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}"
                + (f", padding_mode={self.padding_mode!r}" if self.padding_mode != "zeros" else ""))
