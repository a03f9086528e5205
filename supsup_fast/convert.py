"""``convert(model)``: give an existing PyTorch model supermasks without rewriting it.

Each selected ``nn.Linear`` / ``nn.Conv2d`` becomes a :class:`~supsup_fast.nn.SupermaskLinear` /
:class:`~supsup_fast.nn.SupermaskConv2d` (frozen weights, per-task packed masks) and, optionally,
each BatchNorm a per-task :class:`~supsup_fast.nn.MultitaskBatchNorm`. The result is driven by
``supsup_fast.nn.begin_task / finish_task / set_task / superposition`` like the package's own models.
"""
from __future__ import annotations

import copy
import fnmatch
import sys
import types
import warnings
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

from . import ops
from .nn import MultitaskBatchNorm, SupermaskConv2d, SupermaskLinear
from .nn.conv import resolve_padding

WEIGHT_MODES = ("keep", "signed_constant", "kaiming_normal")
Selector = Union[str, Type[nn.Module]]


class FrozenAffine(nn.Module):
    """A pretrained BatchNorm's affine part (γ, β), frozen, applied after per-task statistics."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.weight.view(shape) + self.bias.view(shape)


class CompilableSupermaskLinear(SupermaskLinear):
    """SupermaskLinear whose single-task forward also traces under ``torch.compile(fullgraph=True)``:
    the signed-constant 2-bit path reads its scale as a Python float from the weight, which a trace
    cannot, so while compiling the general packed-mask op is used (same result)."""

    def _masked(self, x, words):
        if torch.compiler.is_compiling():
            return ops.masked_linear(x, self.weight, words, self.bias)
        return super()._masked(x, words)


def _selectors(name: str, value) -> Tuple[Selector, ...]:
    if value is None:
        return ()
    items = (value,) if isinstance(value, (str, type)) else tuple(value)
    for s in items:
        if not isinstance(s, str) and not (isinstance(s, type) and issubclass(s, nn.Module)):
            raise TypeError(f"{name} must hold module names (glob patterns allowed) or nn.Module types, got {s!r}")
    return items


def _matches(name: str, module: nn.Module, selectors: Sequence[Selector]) -> bool:
    return any(fnmatch.fnmatchcase(name, s) if isinstance(s, str) else isinstance(module, s) for s in selectors)


def _padding(name: str, conv: nn.Conv2d):
    try:
        return resolve_padding(conv.padding, conv.kernel_size, conv.stride, conv.dilation)
    except ValueError as exc:
        raise ValueError(f"layer {name!r}: {exc}") from None


def _mask_layer(name: str, m: nn.Module, weights: str, seed: int, mask_fn: str, density: float) -> nn.Module:
    keep = weights == "keep"
    init = m.weight.detach() if keep else weights
    has_bias = keep and m.bias is not None  # re-initialised layers have no bias, as in the paper
    kw = dict(init=init, mask_fn=mask_fn, density=density, seed=seed, device=m.weight.device, dtype=m.weight.dtype)
    if isinstance(m, nn.Linear):
        new = CompilableSupermaskLinear(m.in_features, m.out_features, bias=has_bias, **kw)
    else:
        new = SupermaskConv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, _padding(name, m), m.dilation,
                              m.groups, bias=has_bias, padding_mode=m.padding_mode, **kw)
    if has_bias:
        new.bias.copy_(m.bias.detach())
    return new


def _task_bn(name: str, m: nn.modules.batchnorm._BatchNorm, weights: str) -> nn.Module:
    if m.momentum is None:
        warnings.warn(f"layer {name!r}: momentum=None (a cumulative average of the statistics) becomes the per-task "
                      f"BatchNorm's exponential average with momentum 0.1", stacklevel=3)
    like = m.weight if m.weight is not None else m.running_mean  # the BN's device and dtype, if it has either
    bn = MultitaskBatchNorm(m.num_features, eps=m.eps, momentum=0.1 if m.momentum is None else m.momentum,
                            device=None if like is None else like.device,
                            dtype=None if like is None or not like.is_floating_point() else like.dtype)
    if weights == "keep" and m.affine:
        return nn.Sequential(bn, FrozenAffine(m.weight, m.bias))
    return bn


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _warn_lost_hooks_and_ties(model: nn.Module, masked: List[Tuple[str, nn.Module]], weights: str) -> None:
    """What a replaced layer cannot carry over: hooks registered on it, and a weight Parameter it
    shared with another module, converted or not (e.g. an embedding tied to an output layer; a tied
    module, registered under two names, stays one module)."""
    hooked = [name for name, m in masked if any(getattr(m, h, None) for h in _HOOKS)]
    if hooked:
        warnings.warn(f"convert replaces {len(hooked)} layer(s) that have hooks registered; the supermask layers "
                      f"do not carry them (register them again on the converted model): "
                      f"{', '.join(hooked[:8])}{' ...' if len(hooked) > 8 else ''}", stacklevel=3)
    owners: Dict[int, Dict[int, str]] = {}  # a Parameter -> the modules holding it (each at its first name)
    for name, m in model.named_modules():
        for p in m._parameters.values():
            if p is not None:
                owners.setdefault(id(p), {}).setdefault(id(m), name)
    tied, seen = [], set()
    for _, m in masked:
        holders = owners.get(id(m.weight), {})
        if len(holders) > 1 and id(m.weight) not in seen:
            seen.add(id(m.weight))
            tied.append(list(holders.values()))
    if tied:
        how = "a copy of the shared weight" if weights == "keep" else "a frozen weight drawn for it alone"
        warnings.warn(f"convert unties weights shared between layers: each supermask layer holds {how} and "
                      f"masks of its own: {'; '.join(', '.join(names) for names in tied[:8])}", stacklevel=3)


def convert(module: nn.Module, *, weights: str = "keep", include: Optional[Iterable[Selector]] = None,
            exclude: Optional[Iterable[Selector]] = None, batchnorm: bool = True, mask_fn: str = "threshold",
            density: float = 0.5, seed: int = 0, inplace: bool = False, freeze_others: bool = True) -> nn.Module:
    """Replace the ``nn.Linear`` / ``nn.Conv2d`` layers of ``module`` by supermask layers.

    weights: ``"keep"`` masks the existing (e.g. pretrained) weights, Piggyback-style, biases kept
    frozen; ``"signed_constant"`` (the paper) or ``"kaiming_normal"`` re-draw them from ``seed``
    (layer i uses ``seed + i``) without bias.
    include / exclude: module names (glob patterns, e.g. ``"features.*"``) or module types; by
    default every Linear and Conv2d is converted (exactly those classes: a subclass, such as
    MultiheadAttention's ``out_proj`` whose weight the attention reads directly, is left frozen,
    with a warning naming it; a module registered under several names, a tied layer, is converted
    once and stays shared; other convolutions, Conv1d, Conv3d and transposed, stay frozen and
    unmasked, with a warning). batchnorm: every BatchNorm (1d, 2d, 3d, SyncBatchNorm) with running
    statistics not excluded becomes per-task non-affine BN (``include`` selects the masked layers
    only; with ``"keep"``, a pretrained affine γ, β is kept frozen after it); one without running
    statistics is stateless and stays; an InstanceNorm with running statistics stays, with a warning.
    mask_fn / density: ``"threshold"`` (scores >= 0) or ``"topk"`` (edge-popup, keep ``density``).
    inplace: convert ``module`` itself instead of a deep copy. freeze_others: the parameters left
    (unconverted layers) stop requiring grad, so only the task's scores are ever trained.
    Returns the model, ready for ``supsup_fast.nn.begin_task(model)``.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights must be one of {WEIGHT_MODES}, got {weights!r}")
    include_s, exclude_s = _selectors("include", include), _selectors("exclude", exclude)
    model = module if inplace else copy.deepcopy(module)
    plan, skipped, unmasked, shared_stats = [], [], [], []
    aliases: Dict[int, List[str]] = {}  # a module registered under several names is selected by any of them
    for name, m in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(m), []).append(name)

    def excluded(m: nn.Module) -> bool:
        return any(_matches(n, m, exclude_s) for n in aliases[id(m)])

    def selected(m: nn.Module) -> bool:
        return (not include_s or any(_matches(n, m, include_s) for n in aliases[id(m)])) and not excluded(m)

    for name, m in model.named_modules():  # each module once, at its first name (as torch lists it)
        if type(m) in (nn.Linear, nn.Conv2d):
            if selected(m):
                plan.append((name, "mask", m))
        elif isinstance(m, (nn.Linear, nn.Conv2d)):
            if selected(m):
                skipped.append(f"{name} ({type(m).__name__})")
        elif isinstance(m, nn.modules.conv._ConvNd):  # Conv1d, Conv3d, transposed convolutions
            if selected(m):
                unmasked.append(f"{name} ({type(m).__name__})")
        elif isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            # BatchNorm1d/2d/3d and SyncBatchNorm keep per-task statistics (the official code's issue #11:
            # shared ones move with every task trained); a BN without running statistics is stateless.
            if not batchnorm or excluded(m):
                continue
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.modules.lazy.LazyModuleMixin):
                plan.append((name, "bn", m))
            else:  # InstanceNorm with running statistics, a lazy BN before its first forward
                shared_stats.append(f"{name} ({type(m).__name__})")
    if not any(kind == "mask" for _, kind, _ in plan):
        raise ValueError("no nn.Linear / nn.Conv2d layer matched include/exclude: nothing to convert")
    if any(name == "" for name, _, _ in plan):
        raise ValueError("module itself is a single layer: wrap it (e.g. nn.Sequential(layer)) to convert it")
    if skipped:  # a subclass may be read by its owner without its forward (MultiheadAttention's out_proj)
        warnings.warn(f"convert leaves {len(skipped)} subclass(es) of nn.Linear / nn.Conv2d as they are (frozen, "
                      f"unmasked): {', '.join(skipped[:8])}{' ...' if len(skipped) > 8 else ''}", stacklevel=2)
    if unmasked:
        warnings.warn(f"convert masks nn.Linear and nn.Conv2d layers only; {len(unmasked)} other convolution(s) stay as "
                      f"they are (frozen, unmasked): {', '.join(unmasked[:8])}{' ...' if len(unmasked) > 8 else ''}",
                      stacklevel=2)
    if shared_stats:
        warnings.warn(f"{len(shared_stats)} normalisation layer(s) with running statistics stay as they are, their "
                      f"statistics shared by every task (each task's training moves them): "
                      f"{', '.join(shared_stats[:8])}{' ...' if len(shared_stats) > 8 else ''}; convert a lazy "
                      f"BatchNorm after a first forward", stacklevel=2)
    _warn_lost_hooks_and_ties(model, [(name, m) for name, kind, m in plan if kind == "mask"], weights)
    index, replaced = 0, {}
    for name, kind, m in plan:
        if kind == "mask":
            replaced[id(m)] = _mask_layer(name, m, weights, seed + index, mask_fn, density)
            index += 1
        else:
            replaced[id(m)] = _task_bn(name, m, weights)
        replaced[id(m)].train(m.training)  # a model converted in eval() stays in eval()
    # A module registered under several names (a weight-tied layer) becomes one new module at all of them.
    for name, m in list(model.named_modules(remove_duplicate=False)):
        if id(m) in replaced and name:
            parent_name, _, child = name.rpartition(".")
            model.get_submodule(parent_name)._modules[child] = replaced[id(m)]
    _no_fast_paths(model)
    if freeze_others:
        for p in model.parameters():
            p.requires_grad_(False)
    return model


def _module_forward_required(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook that does nothing: its presence turns off torch's fused fast paths (see
    ``_no_fast_paths``)."""
    return None


def _no_fast_paths(model: nn.Module) -> None:
    """nn.TransformerEncoderLayer's inference fast path (``torch._transformer_encoder_layer_fwd``)
    reads ``linear1`` / ``linear2``'s weights itself instead of calling them: the masks were skipped
    in eval() (and a redrawn layer without bias crashed it). Torch takes that path only where no
    hook is registered on the layer or its children, so a converted one gets an empty hook; and an
    nn.TransformerEncoder holding one stops turning a padded batch into a nested tensor, which the
    layers would then be given."""
    def converted(layer: nn.Module) -> bool:
        return isinstance(layer, nn.TransformerEncoderLayer) and \
            any(isinstance(getattr(layer, n, None), SupermaskLinear) for n in ("linear1", "linear2"))
    for m in model.modules():
        if converted(m):
            m.register_forward_pre_hook(_module_forward_required)
        if isinstance(m, nn.TransformerEncoder) and any(converted(layer) for layer in m.layers):
            m.use_nested_tensor = False


class _CallableModule(types.ModuleType):
    # ``import supsup_fast.convert`` binds this module as ``supsup_fast.convert``; keep it callable.
    def __call__(self, *args, **kwargs):
        return convert(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
