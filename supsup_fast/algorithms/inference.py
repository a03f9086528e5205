"""Task inference by the gradient of an objective w.r.t. the superposition coefficients α
(reference doc §1.5 one-shot, §1.6 binary). Only the inference images go through the superposed
network; with uniform α the forward uses each layer's cached count of set bits."""
from __future__ import annotations

import contextlib
import math
import weakref
from typing import Optional

import torch
from torch import nn

from .. import ops
from ..bits import num_words
from ..models import MLP
from ..nn import MultitaskBatchNorm, SupermaskLinear, num_tasks, superposition, supermask_layers
from .checks import check_finite
from .objectives import get_objective

METHODS = ("oneshot", "binary")


class QueryLayoutError(ValueError):
    """A model's layers do not keep a batch of queries as their inputs' first dimension (e.g. a
    sequence-first layer inside): batched task inference does not apply; infer one query at a time."""


# model -> {query shape (xs.shape[1:]): the QueryLayoutError message, or None where its layers were seen to
# keep the queries first at two query counts (a probe of q + 1, then the pass of q)}
_QUERIES_FIRST = weakref.WeakKeyDictionary()


def _check_query(model: nn.Module, x: torch.Tensor, name: str = "x") -> int:
    """The images a task is inferred from must be finite (a NaN image gives NaN gradients, whose
    argmin is task 0), and the model must have learned a task. Returns the task count."""
    if not isinstance(x, torch.Tensor):  # integer inputs pass: a converted model may begin with an nn.Embedding
        raise TypeError(f"{name} (the images to infer the task from) must be a tensor, got {type(x).__name__}")
    if x.numel() == 0:
        raise ValueError(f"{name} (the images to infer the task from) is empty, shape {tuple(x.shape)}")
    if x.dim() < 2:
        raise ValueError(f"{name} (the images to infer the task from) must be a batch [B, ...] with B >= 1, "
                         f"got shape {tuple(x.shape)} (x[None] for one image)")
    if isinstance(model, MLP) and math.prod(x.shape[1:]) != model.layers[0].in_features:  # its forward flattens each image
        raise ValueError(f"{name} (the images to infer the task from) has {math.prod(x.shape[1:])} values per image, shape "
                         f"{tuple(x.shape)}; the model's first layer takes {model.layers[0].in_features}")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        what = "NaN" if bool(torch.isnan(x).any()) else "±inf"
        raise ValueError(f"{name} (the images to infer the task from) holds {what}; task inference needs finite inputs")
    k = num_tasks(model)
    if k < 1:
        raise ValueError("task inference needs at least one learned task; the model has none")
    return k


def alpha_gradient(model: nn.Module, x: torch.Tensor, objective: str, num_labels: int,
                   active: Optional[torch.Tensor] = None) -> torch.Tensor:
    """∂f/∂α at α = 1/k over the learned tasks (or the ``active`` subset): one forward, one backward.
    One image through this package's MLP (nothing hooked into it), on a backend that reads the banks'
    task-interleaved copies, goes the batched MLP way (one query), which skips the bits of the dead
    rows; every other model and call takes autograd through the superposed modules."""
    _check_query(model, x)
    return _alpha_gradient(model, x, objective, num_labels, active)


def _alpha_gradient(model: nn.Module, x: torch.Tensor, objective: str, num_labels: int,
                    active: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`alpha_gradient` of a query :func:`_check_query` passed."""
    k = num_tasks(model) if active is None else active.numel()
    if k == 0:
        raise ValueError("active (the tasks to superpose) is empty; it needs at least one task")
    if active is None and x.dim() >= 1 and x.shape[0] == 1 and _plain_mlp(model) \
            and ops.backend_for(model.layers[0].weight.device).reads_interleaved:
        return _mlp_alpha_gradients(model, k, x, objective, num_labels)[0]
    with _grad_on():
        (x,) = _normal_tensors(x)
        alpha = _uniform_alpha(model, k).requires_grad_(True)
        with superposition(model, alpha, active=active, uniform=True):
            logits = model(x)
        obj = get_objective(objective)(logits, num_labels)
        (grad,) = torch.autograd.grad(obj, alpha)
    return grad


@contextlib.contextmanager
def _grad_on():
    """Autograd on, whatever the caller runs under: evaluation code often holds no_grad or
    inference_mode, and task inference takes its one gradient regardless (a context is entered only
    where it changes something: each costs µs of a query)."""
    with contextlib.ExitStack() as stack:
        if torch.is_inference_mode_enabled():
            stack.enter_context(torch.inference_mode(False))
        if not torch.is_grad_enabled():
            stack.enter_context(torch.enable_grad())
        yield


def _normal_tensors(*tensors: torch.Tensor) -> tuple:
    """The tensors, those made under inference_mode cloned: autograd cannot save those for a backward."""
    return tuple(t.clone() if t.is_inference() else t for t in tensors)


def check_scale(scale: Optional[torch.Tensor], k: int, name: str = "scale") -> None:
    if scale is None:
        return
    if not isinstance(scale, torch.Tensor) or tuple(scale.shape) != (k,):
        raise ValueError(f"{name} (the per-mask calibration factors) must be a tensor [k] with one factor per learned "
                         f"task, k = {k}, got {tuple(scale.shape) if isinstance(scale, torch.Tensor) else type(scale).__name__}")
    if not bool((torch.isfinite(scale) & (scale > 0)).all()):  # NaN, inf, 0 or a sign flip would decide the argmin
        raise ValueError(f"{name} (the per-mask calibration factors) must be finite and > 0, got values in "
                         f"[{float(scale.min())}, {float(scale.max())}]{' with NaN' if bool(scale.isnan().any()) else ''}")


def _uniform_alpha(model: nn.Module, k: int) -> torch.Tensor:
    """α = 1/k on the model's device: float64 for a float64 model (its α-gradient in its precision),
    else float32 (1/k in bf16 or fp16 is not 1/k to the uniform check's tolerance)."""
    w = next((layer.weight for layer in supermask_layers(model).values()), None)
    device = w.device if w is not None else next(iter(model.buffers())).device
    dtype = torch.float64 if w is not None and w.dtype == torch.float64 else torch.float32
    return torch.full((k,), 1.0 / k, device=device, dtype=dtype)


def _scaled(grad: torch.Tensor, scale: Optional[torch.Tensor], active: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The α-gradient times a per-mask calibration factor (:mod:`.calibration`), if any."""
    if scale is None:
        return grad
    scale = scale.to(grad.device, grad.dtype)
    return grad * (scale if active is None else scale[active])


def infer_oneshot(model: nn.Module, x: torch.Tensor, objective: str = "entropy", num_labels: int = 10,
                  scale: Optional[torch.Tensor] = None) -> int:
    """argminᵢ ∂f/∂αᵢ over the learned tasks (== argmax of -∇αH, paper Eq. 4); with ``scale`` [k],
    argminᵢ scaleᵢ · ∂f/∂αᵢ."""
    k = _check_query(model, x)
    check_scale(scale, k)
    if k == 1:
        return 0
    return int(_scaled(_alpha_gradient(model, x, objective, num_labels), scale).argmin())


def supports_batched(model: nn.Module) -> bool:
    """Batched task inference needs per-example weight gradients that are rank one: only
    SupermaskLinear layers, and no layer that mixes examples (BatchNorm)."""
    return _rank1_model(model, supermask_layers(model))


def _rank1_model(model: nn.Module, layers: dict) -> bool:
    return bool(layers) and all(isinstance(l, SupermaskLinear) for l in layers.values()) and \
        not any(isinstance(m, (MultitaskBatchNorm, nn.BatchNorm1d, nn.BatchNorm2d)) for m in model.modules())


def alpha_gradients_batched(model: nn.Module, xs: torch.Tensor, objective: str = "entropy", num_labels: int = 10,
                            max_chunk_bytes: int = 1 << 28) -> torch.Tensor:
    """The α-gradients of q independent one-image queries ``xs`` [q, ...]: row j equals
    ``alpha_gradient(model, xs[j:j+1], ...)``. One superposed forward + backward for all q, then per
    layer one pass over the bits for a chunk of queries (``ops.mask_dot_outer``: the mask_dot of
    the per-query v_j = (g_j x_jᵀ) ⊙ W, which the CPU kernels never materialise), instead of q passes.
    Outside this package's plain MLP the layers' inputs and outputs are recorded by forward hooks and
    the gradient is taken at each layer's output as its hooks leave it: a hook may all-reduce it (the
    sharded bank's does), not otherwise transform it."""
    layers = _check_rank1(model)  # what the model is, before what the query holds
    k = _check_query(model, xs, "xs")
    return _alpha_gradients_batched(model, layers, k, xs, objective, num_labels, max_chunk_bytes)


def _check_rank1(model: nn.Module) -> dict:
    layers = supermask_layers(model)
    if not _rank1_model(model, layers):
        raise ValueError("batched task inference needs a model of SupermaskLinear layers without BatchNorm "
                         "(an MLP such as fc1024 or lenet)")
    return layers


def _alpha_gradients_batched(model: nn.Module, layers: dict, k: int, xs: torch.Tensor, objective: str,
                             num_labels: int, max_chunk_bytes: int = 1 << 28) -> torch.Tensor:
    """:func:`alpha_gradients_batched` of a model :func:`_check_rank1` passed (``layers``, its
    supermask layers) and a query :func:`_check_query` passed (``k`` tasks)."""
    if _plain_mlp(model):
        return _mlp_alpha_gradients(model, k, xs, objective, num_labels, max_chunk_bytes)
    return _rank1_alpha_gradients(model, layers, k, xs, objective, num_labels, max_chunk_bytes)


def _plain_mlp(model: nn.Module) -> bool:
    """This package's MLP as built (SupermaskLinear layers with ReLU between them, no forward replaced),
    with nothing hooked into the modules its forward calls, itself and its layers (the sharded bank's
    all-reduce, a user's probe): only then may the α-gradients multiply the layers' weights without
    calling them."""
    if type(model) is not MLP or "forward" in vars(model):
        return False
    if not all(type(layer) is SupermaskLinear and "forward" not in vars(layer) for layer in model.layers):
        return False
    from torch.nn.modules import module as nn_module
    if any((nn_module._global_forward_hooks, nn_module._global_forward_pre_hooks, nn_module._global_backward_hooks,
            nn_module._global_backward_pre_hooks)):
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                   for m in (model, *model.layers))


def _mlp_alpha_gradients(model: MLP, k: int, xs: torch.Tensor, objective: str, num_labels: int,
                         max_chunk_bytes: int = 1 << 28) -> torch.Tensor:
    """``_rank1_alpha_gradients`` for this package's MLP (linear layers with ReLU between them), with
    no autograd through the network and no layer mode switched: each layer's cached uniform weight
    W ⊙ Σᵢ Mᵢ / k, one forward, the objective's gradient w.r.t. the logits in closed form, then the
    backward in one call over the banks' task-interleaved copies (``ops.mlp_mask_dot_outer``) where
    the backend reads them, else layer by layer. On a small query the Python and autograd glue of
    the general path cost as much as the bits."""
    layers = list(model.layers)
    q = xs.shape[0]
    if xs.dtype != layers[0].weight.dtype:  # as the superposed layers say it
        raise TypeError(f"x dtype {xs.dtype} must match weight dtype {layers[0].weight.dtype}")
    # not autocast: the superposition runs in the weights' dtype, as the superposed layers leave autocast
    # (entered only when on: the context costs µs of a query of ~0.3 ms)
    no_autocast = torch.autocast(xs.device.type, enabled=False) if torch._C._is_any_autocast_enabled() \
        else contextlib.nullcontext()
    with torch.no_grad(), no_autocast:
        weights = [layer.uniform_weight() for layer in layers]
        copies = all(_reads_copy(layer) for layer in layers)
        # hs[i]: the input of layer i; nonzero[i]: its nonzeros, nonzero[-1] those of g
        hs, g, nonzero = ops.mlp_logit_gradients(xs.flatten(1), weights, [layer.bias for layer in layers], objective,
                                                 num_labels, count_nonzero=copies, check=False)  # the model's own layers
        if copies:
            # nonzero inputs, and live outputs as the forward tells them: g_i = 0 where ReLU gave 0
            inputs, outputs = nonzero[:-1], nonzero[1:]
            kept = [layer.bank.kept_interleaved() for layer in layers]
            transposed = [_read_transposed(kept[i], outputs[i], inputs[i], layer.weight) for i, layer in enumerate(layers)]
            read = [kept[i][t] if kept[i][t] is not None else layer.bank.interleaved(t)
                    for i, (layer, t) in enumerate(zip(layers, transposed))]
            banks = [layer.bank.words for layer in layers]
            kernel_weights = [layer.transposed_weight() if t else layer.weight for layer, t in zip(layers, transposed)]
            # queries in chunks: where a product may overflow it goes op by op, and the reference then
            # materialises each query's (g xᵀ) ⊙ W
            chunk = max(1, max_chunk_bytes // max(layer.weight.element_size() * layer.weight.numel() for layer in layers))
            parts = [ops.mlp_mask_dot_outer(banks, read, transposed, kernel_weights, weights,
                                            [h[j0:j0 + chunk] for h in hs], g[j0:j0 + chunk])
                     for j0 in range(0, max(q, 1), chunk)]
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        out = torch.zeros(q, k, dtype=torch.float64 if xs.dtype == torch.float64 else torch.float32, device=xs.device)
        for i in reversed(range(len(layers))):
            _add_layer_alpha_gradients(out, layers[i], g, hs[i], max_chunk_bytes)
            if i > 0:
                g = (g @ weights[i]) * (hs[i] > 0)  # through ReLU: where its output is positive
    return out


def _reads_copy(layer) -> bool:
    """Whether task inference reads the layer's bank through a task-interleaved copy: where the bank
    may keep one and the backend reads it (cpu, whose kernels are float32)."""
    w = layer.weight
    return layer.bank.keep_interleaved and w.dtype == torch.float32 and ops.backend_for(w.device).reads_interleaved


def _add_layer_alpha_gradients(out: torch.Tensor, layer, g: torch.Tensor, x_in: torch.Tensor, max_chunk_bytes: int) -> None:
    """out [q, k] += the α-gradients of q queries through one linear layer: g [q, out] the gradients
    of its outputs, x_in [q, in] its inputs. Where the layer reads one, through one of its bank's
    task-interleaved copies (kept by the bank until it changes): the row copy skips each query's
    outputs with g = 0, the transposed one its inputs with x = 0 (``_read_transposed``)."""
    w = layer.weight
    q = out.shape[0]
    x2, g2 = x_in.reshape(q, -1).to(w.dtype), g.detach().reshape(q, -1)
    use_copy = _reads_copy(layer)
    if use_copy and _read_transposed(layer.bank.kept_interleaved(), int(torch.count_nonzero(g2)), int(torch.count_nonzero(x2)), w):
        out += ops.mask_dot_outer_interleaved(layer.bank.interleaved(transposed=True), out.shape[1], x2, g2,
                                              layer.transposed_weight())
        return
    bank_t = layer.bank.interleaved() if use_copy else None
    chunk = max(1, max_chunk_bytes // max(1, w.numel() * w.element_size()))
    for j0 in range(0, q, chunk):
        j1 = min(q, j0 + chunk)
        out[j0:j1] += ops.mask_dot_outer(layer.bank.words, g2[j0:j1], x2[j0:j1], w, bank_t).to(out.dtype)


def _read_transposed(kept: tuple, live_outputs: int, live_inputs: int, weight: torch.Tensor) -> bool:
    """Whether queries with these counts of nonzero output gradients and inputs (over all queries)
    read the layer through its transposed copy: the copy that reads fewer words, ceil(in/32) per
    live output through the row copy, ceil(out/32) per nonzero input through the transposed one (an
    entropy gradient reaches every logit, but about half of a ReLU's outputs, the next layer's
    inputs, are 0). A second copy of one bank is built only where it reads at most 3/4 as much."""
    row_words = live_outputs * num_words(weight.shape[1])
    col_words = live_inputs * num_words(weight.shape[0])
    have_row, have_col = (c is not None for c in kept)  # the bank's kept_interleaved()
    if row_words == 0 or col_words == 0:  # the layer adds nothing: read what is kept, the row copy if none
        return have_col and not have_row
    if have_row and not have_col:
        return col_words <= 0.75 * row_words
    if have_col and not have_row:
        return not row_words <= 0.75 * col_words
    return col_words < row_words


def _rank1_alpha_gradients(model: nn.Module, layers: dict, k: int, xs: torch.Tensor, objective: str, num_labels: int,
                           max_chunk_bytes: int = 1 << 28) -> torch.Tensor:
    q = xs.shape[0]
    alpha = _uniform_alpha(model, k)
    shape = tuple(xs.shape[1:])
    verdicts = _QUERIES_FIRST.setdefault(model, {})
    if shape not in verdicts:
        _probe_queries_first(model, layers, xs, alpha)
    if verdicts.get(shape):
        raise QueryLayoutError(verdicts[shape])
    seen = {name: [] for name in layers}  # every call of a layer (one may run more than once a forward)
    hooks = [layer.register_forward_hook(lambda m, inp, out, name=name: seen[name].append((inp[0], out)))
             for name, layer in layers.items()]
    if not xs.is_floating_point():  # token ids into an embedding: each layer's input is made a leaf instead
        hooks += [layer.register_forward_pre_hook(_input_needs_grad) for layer in layers.values()]
    try:
        with _grad_on():
            xs, alpha = _normal_tensors(xs, alpha)
            if xs.is_floating_point():
                xs = xs.detach().requires_grad_(True)  # gradients flow to every layer's output, not to alpha
            with superposition(model, alpha, uniform=True):
                logits = model(xs)
            # Objectives are means over examples, so q × objective = Σ_j objective(example j).
            total = get_objective(objective)(logits, num_labels) * q
            calls = [(name, x_in, y) for name in layers for x_in, y in seen[name]]
            grads = torch.autograd.grad(total, [y for _, _, y in calls], allow_unused=True)
    finally:
        for h in hooks:
            h.remove()
    out = torch.zeros(q, k, dtype=alpha.dtype, device=alpha.device)
    for (name, x_in, y), g in zip(calls, grads):
        if g is None:  # an output the logits do not depend on
            continue
        if x_in.dim() < 2 or x_in.shape[0] != q or y.shape[0] != q:
            raise QueryLayoutError(f"batched task inference needs each layer's input and output to keep the {q} queries as "
                             f"their first dimension; layer {name!r} saw {tuple(x_in.shape)} -> {tuple(y.shape)}: "
                             f"infer each image with infer_task instead")
        # A query's weight gradient is the sum of its rank-one terms over the layer's calls and, for an
        # input [q, T, in], over its T rows: each is added as a query of its own, then summed.
        rows = x_in[0].numel() // x_in.shape[-1]
        if rows == 1:
            _add_layer_alpha_gradients(out, layers[name], g, x_in.detach(), max_chunk_bytes)
        else:
            part = torch.zeros(q * rows, k, dtype=out.dtype, device=out.device)
            _add_layer_alpha_gradients(part, layers[name], g.reshape(q * rows, -1), x_in.detach().reshape(q * rows, -1),
                                       max_chunk_bytes)
            out += part.view(q, rows, k).sum(1)
    verdicts[shape] = None  # queries first at q + 1 and at q: not a fixed dimension that happened to match
    return out


def _input_needs_grad(module: nn.Module, args: tuple):
    """Forward pre-hook: a floating input that needs no gradient becomes a leaf that does, so the
    layer's output is reached by the backward (a model whose own input, token ids, cannot)."""
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.is_floating_point() and not x.requires_grad:
        return (x.detach().requires_grad_(True),) + tuple(args[1:])
    return None


def _probe_queries_first(model: nn.Module, layers: dict, xs: torch.Tensor, alpha: torch.Tensor) -> None:
    """Record in ``_QUERIES_FIRST`` a model whose layers see the queries elsewhere than in their
    inputs' first dimension. A sequence-first layer ([T, q, D]) passes the shape test of the batched
    pass where T happens to equal q, and then mixes queries: so, until a pass has also kept them
    first, a forward of q + 1 queries must show q + 1 first in every layer's input and output."""
    shape = tuple(xs.shape[1:])
    probe = torch.cat([xs.detach(), xs[:1].detach()])
    q, seen = probe.shape[0], []
    hooks = [layer.register_forward_hook(lambda m, inp, out, name=name: seen.append((name, inp[0].shape, out.shape)))
             for name, layer in layers.items()]
    try:
        with torch.no_grad(), superposition(model, alpha, uniform=True):
            model(probe)
    finally:
        for h in hooks:
            h.remove()
    for name, s_in, s_out in seen:
        if len(s_in) < 2 or s_in[0] != q or s_out[0] != q:
            _QUERIES_FIRST[model][shape] = (
                f"batched task inference needs each layer's input and output to keep the queries as their first "
                f"dimension; layer {name!r} saw {tuple(s_in)} -> {tuple(s_out)} for {q} queries: infer each image "
                f"with infer_task instead")
            return


def infer_oneshot_batched(model: nn.Module, xs: torch.Tensor, objective: str = "entropy",
                          num_labels: int = 10, scale: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One-shot task inference for q independent queries at once: LongTensor [q]."""
    k = _check_query(model, xs, "xs")
    check_scale(scale, k)
    if k == 1:
        return torch.zeros(xs.shape[0], dtype=torch.long)
    layers = _check_rank1(model)
    return _scaled(_alpha_gradients_batched(model, layers, k, xs, objective, num_labels), scale).argmin(1).cpu()


def infer_binary(model: nn.Module, x: torch.Tensor, objective: str = "entropy", num_labels: int = 10,
                 log_base: float = 2.0, scale: Optional[torch.Tensor] = None) -> int:
    """Repeatedly keep the 1/log_base of the surviving tasks whose gradient is lowest (for base 2
    the official code keeps g ≤ lower median), until one remains.

    The official loop stops after ⌊log₂ k⌋ + 1 rounds and then reports a stale index; here, if ties
    keep more than one task after that many rounds, the lowest gradient among them is returned."""
    check_finite("log_base", log_base, above=1.0)
    k = _check_query(model, x)
    check_scale(scale, k)
    device = next(iter(model.buffers())).device
    good = torch.arange(k, device=device)
    grad = None
    for _ in range(int(math.floor(math.log(max(k, 1), log_base))) + 1):
        if good.numel() == 1:
            return int(good[0])
        active = None if good.numel() == k else good
        grad = _scaled(_alpha_gradient(model, x, objective, num_labels, active=active), scale, active)
        keep = max(1, math.ceil(good.numel() / log_base))
        thr = grad.sort().values[keep - 1]
        sel = grad <= thr
        if bool(sel.all()):  # nothing ruled out: every later round would repeat this one (log_base near 1, ties)
            break
        good, grad = good[sel], grad[sel]
    if good.numel() == 1:
        return int(good[0])
    return int(good[grad.argmin()])


def infer_task(model: nn.Module, x: torch.Tensor, method: str = "oneshot", objective: str = "entropy",
               num_labels: int = 10, log_base: float = 2.0, scale: Optional[torch.Tensor] = None) -> int:
    """The inferred task of images ``x``; ``scale`` [k]: per-mask calibration factors of the gradient."""
    if method == "oneshot":
        return infer_oneshot(model, x, objective, num_labels, scale)
    if method == "binary":
        return infer_binary(model, x, objective, num_labels, log_base, scale)
    raise ValueError(f"inference must be one of {METHODS}, got {method!r}")
