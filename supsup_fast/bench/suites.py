"""The benchmark suites behind ``supsup-fast bench`` (each a ratio against its baseline, taken
side by side in one process; see docs/design.md, Performance)."""
from __future__ import annotations

import time
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from .. import ops

from .. import nn as snn
from ..algorithms.inference import alpha_gradient, infer_oneshot
from ..algorithms.training import TrainSettings, backprop_step, make_task_optimizer, mlp_step_without_autograd
from ..models import build_model
from .baselines import FloatStackMLP, random_model_with_masks
from .timing import interleaved_medians, median_time, read_bandwidth


def bench_alpha_gradient(ks: List[int], float_stack_max_k: int, repeats: int = 3) -> List[dict]:
    """α-gradient of one superposed fwd+bwd on 1 image, FC1024 s=500."""
    rows = []
    x = torch.randn(1, 784)
    bw = read_bandwidth()
    for k in ks:
        model = random_model_with_masks("fc1024", 500, k)
        packed = snn.mask_bytes(model)
        for layer in snn.supermask_layers(model).values():
            layer.counts()  # the count cache is built once per bank, not per query
        ours = median_time(lambda: alpha_gradient(model, x, "entropy", 10), repeats=repeats)
        row = {"k": k, "packed_bytes": packed, "ours_s": ours, "memory_floor_s": 2 * packed / bw,
               "read_bandwidth_GBps": bw / 1e9, "float_stack_bytes": packed * 32}
        row["ours_vs_floor"] = ours / row["memory_floor_s"]
        if k <= float_stack_max_k:
            fs = FloatStackMLP(model)
            g_ref = fs.alpha_gradient(x)
            g_ours = alpha_gradient(model, x, "entropy", 10)
            row["rel_err"] = float((g_ours - g_ref).abs().max() / g_ref.abs().max())
            row["same_argmin"] = bool(int(g_ours.argmin()) == int(g_ref.argmin()))
            row["float_stack_s"] = median_time(lambda: fs.alpha_gradient(x), repeats=repeats)
            row["speedup_vs_float_stack"] = row["float_stack_s"] / ours
            del fs
        rows.append(row)
    return rows


def bench_single_task_forward(batches: List[int], size: int = 1024, repeats: int = 15) -> List[dict]:
    """A size×size SupermaskLinear (signed-constant weights, the paper's default) evaluating one
    packed task mask, and the op ``masked_linear`` on a float weight, each vs ``F.linear`` on the
    materialised masked weight."""
    layer = snn.SupermaskLinear(size, size, seed=0)
    snn.begin_task(layer)
    snn.finish_task(layer)
    snn.set_task(layer, 0)
    words = layer.bank.words[0]
    w_float = torch.randn(size, size)
    mask = ops.unpack_bits(words, size)
    dense_w, dense_float = layer.weight * mask, w_float * mask
    rows = []
    with torch.no_grad():
        for b in batches:
            x = torch.randn(b, size)
            t = interleaved_medians({"layer": lambda: layer(x), "op": lambda: ops.masked_linear(x, w_float, words),
                                     "dense": lambda: F.linear(x, dense_w), "dense_float": lambda: F.linear(x, dense_float)},
                                    repeats=repeats, min_seconds=1.0)
            rows.append({"batch": b, "ours_s": t["layer"], "dense_s": t["dense"], "ours_vs_dense_speed": t["dense"] / t["layer"],
                         "op_float_weight_s": t["op"], "op_vs_dense_speed": t["dense_float"] / t["op"]})
    return rows


def bench_training_step(batch: int = 128, repeats: int = 10, device: str = "cpu",
                        timer: Optional[Callable[[Callable[[], object]], float]] = None,
                        model_name: str = "fc1024", block: int = 10) -> dict:
    """One mask-training step of ``model_name`` (s=500) as ``train_task`` makes it (for the MLPs: the
    fused step without autograd) vs the same STE step
    written in plain torch (W * (s >= 0) straight through, three GEMMs per layer). On the CPU each
    contender runs ``block`` steps back to back, as a training loop does, the blocks of the
    contenders interleaved (the median step of a block is reported); ``single_call`` times each step
    alone between the others', its state evicted by theirs. ``timer`` (seconds per call of a
    function) replaces the interleaved CPU timing, e.g. ``do_bench`` on a GPU."""

    x, y = torch.randn(batch, 784, device=device), torch.randint(0, 10, (batch,), device=device)
    model = build_model(model_name, 500).to(device)
    snn.begin_task(model)
    model.train()
    opt = make_task_optimizer(model, TrainSettings())  # what train_task uses: the fused step here

    def batch_loss(xb, yb):
        loss = F.cross_entropy(model(xb), yb)
        return loss, loss.detach()

    one_step = mlp_step_without_autograd(model, opt, torch.device(device)) or backprop_step(opt, batch_loss)

    def ours():
        one_step(x, y)

    weights = [l.weight for l in snn.supermask_layers(model).values()]
    scores = [l.scores.detach().clone().requires_grad_() for l in snn.supermask_layers(model).values()]
    opt2 = torch.optim.RMSprop(scores, lr=1e-4)

    def plain():
        h = x
        for i, (w, s) in enumerate(zip(weights, scores)):
            m = (s >= 0).to(s.dtype)
            h = F.linear(h, w * (m + s - s.detach()))
            if i < len(weights) - 1:
                h = F.relu(h)
        loss = F.cross_entropy(h, y)
        opt2.zero_grad(set_to_none=True)
        loss.backward()
        opt2.step()

    def gemms():
        h = x
        for w in weights:
            out = F.linear(h, w)
            out.t().matmul(h)  # dW
            out.matmul(w)      # dX
            h = out[:, : w.shape[0]]
    fns = {"ours": ours, "plain": plain, "gemm": gemms}
    single = None
    if timer is not None:
        t = {k: timer(f) for k, f in fns.items()}
    else:
        if block < 1:
            raise ValueError(f"block must be >= 1 step, got {block}")
        t = interleaved_medians(fns, repeats=repeats, calls_per_sample=block)
        cold = interleaved_medians(fns, repeats=repeats)
        single = {"ours_s": cold["ours"], "plain_torch_ste_s": cold["plain"], "three_gemms_s": cold["gemm"],
                  "ours_vs_plain_speed": cold["plain"] / cold["ours"]}
    t_ours, t_plain, t_gemm = t["ours"], t["plain"], t["gemm"]
    out = {"model": model_name, "batch": batch, "ours_s": t_ours, "plain_torch_ste_s": t_plain, "three_gemms_s": t_gemm,
           "ours_vs_plain_speed": t_plain / t_ours, "ours_vs_gemm_floor": t_ours / t_gemm}
    if single is not None:
        out.update(steps_per_sample=block, single_call=single)
    return out


def bench_gnu_evaluation(model_name: str, output_size: int, k: int, tasks_timed: int = 2, batches: int = 79,
                         batch_size: int = 128) -> dict:
    """GNu evaluation of k learned tasks as the paper does it (per test batch: one-shot task inference
    on 1 image, then the chosen mask on the whole batch), timed on ``tasks_timed`` tasks' worth of
    batches with random masks and data, and projected to all k tasks (the work per batch does not
    depend on which task is evaluated)."""
    model = random_model_with_masks(model_name, output_size, k)
    for layer in snn.supermask_layers(model).values():
        layer.counts()
    xs = torch.randn(batches, batch_size, 784)

    def one_task():
        for x in xs:
            t = infer_oneshot(model, x[:1], "entropy", 10)
            snn.set_task(model, t)
            with torch.no_grad():
                model(x).argmax(1)

    one_task()  # warm-up
    start = time.perf_counter()
    for _ in range(tasks_timed):
        one_task()
    per_task = (time.perf_counter() - start) / tasks_timed
    return {"model": model_name, "output_size": output_size, "k": k, "batches_per_task": batches,
            "seconds_per_task": per_task, "seconds_per_batch": per_task / batches,
            "projected_seconds_all_tasks": per_task * k}


def bench_memory(ks: List[int]) -> List[dict]:
    rows = []
    for k in ks:
        model = random_model_with_masks("fc1024", 500, min(k, 2))
        per_task = snn.mask_bytes(model) // min(k, 2)
        n = sum(l.weight.numel() for l in snn.supermask_layers(model).values())
        rows.append({"k": k, "packed_bytes": per_task * k, "float_stack_bytes": 4 * n * k,
                     "bits_per_weight_per_task": 8 * per_task / n})
    return rows
