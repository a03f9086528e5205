"""Benchmark helpers and the report behind ``supsup-fast bench``.

Every measurement is a ratio taken side by side in one process against the real alternative
(DESIGN §8): the float-stack SupSup of the official code, the dense matmul on the materialised
masked weight, and the memory floor (packed bytes ÷ read bandwidth measured here and now).
Times are medians of several runs after a warm-up.
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import supsup_fast as ss

from . import nn as snn
from .algorithms.inference import alpha_gradient
from .algorithms.objectives import entropy
from .models import build_model
from .ops.registry import backend_for


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, min_seconds: float = 0.0) -> float:
    for _ in range(warmup):
        fn()
    times = []
    while len(times) < repeats or sum(times) < min_seconds:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        if len(times) >= 50 * repeats:
            break
    return statistics.median(times)


def interleaved_medians(fns: Dict[str, Callable[[], object]], repeats: int = 7, warmup: int = 1,
                        min_seconds: float = 0.0) -> Dict[str, float]:
    """Median time of each function, taking one sample of each in turn, so that a slow phase of a
    shared, noisy machine hits every contender alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    rounds = 0
    while rounds < repeats or sum(samples[next(iter(fns))]) < min_seconds:
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
        rounds += 1
        if rounds >= 50 * repeats:
            break
    return {name: statistics.median(ts) for name, ts in samples.items()}


def read_bandwidth(nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """Bytes per second of a streaming read (sum over a buffer far larger than the caches)."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    t = median_time(lambda: buf.sum(), repeats=repeats)
    return nbytes / t


def random_model_with_masks(name: str, output_size: int, k: int, seed: int = 0) -> torch.nn.Module:
    """A model whose banks hold k random ~50% masks (as trained GNu masks are)."""
    model = build_model(name, output_size, seed=seed)
    g = torch.Generator().manual_seed(seed)
    for layer in snn.supermask_layers(model).values():
        words = torch.randint(-(2 ** 31), 2 ** 31 - 1, (k, *layer.bank.row_shape), generator=g, dtype=torch.int64)
        words = words.to(torch.int32)
        pad = layer.bank.row_shape[1] * 32 - layer.n
        if pad:  # canonical layout: pad bits are zero
            words[..., -1] &= (1 << (32 - pad)) - 1
        layer.append_packed(words)
    for bn in model.modules():
        if isinstance(bn, snn.MultitaskBatchNorm):
            bn.append_stats(torch.zeros(k, bn.num_features), torch.ones(k, bn.num_features))
    return model


class FloatStackMLP:
    """The official implementation's superposition: float {0,1} masks stacked per layer,
    W ⊙ (α[:, None, None] * stack).sum(0) under autograd (reference doc §1.4, §4)."""

    def __init__(self, model: torch.nn.Module):
        self.layers = list(snn.supermask_layers(model).values())
        self.stacks = [ss.unpack_bits(l.bank.words, l.n).float().view(-1, *l.weight.shape) for l in self.layers]

    def alpha_gradient(self, x: torch.Tensor) -> torch.Tensor:
        k = self.stacks[0].shape[0]
        alpha = torch.full((k,), 1.0 / k, device=x.device, requires_grad=True)
        h = x.flatten(1)
        for i, (layer, stack) in enumerate(zip(self.layers, self.stacks)):
            h = F.linear(h, layer.weight * (alpha.view(-1, 1, 1) * stack).sum(0))
            if i < len(self.layers) - 1:
                h = F.relu(h)
        return torch.autograd.grad(entropy(h, 10), alpha)[0]


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
    mask = ss.unpack_bits(words, size)
    dense_w, dense_float = layer.weight * mask, w_float * mask
    rows = []
    with torch.no_grad():
        for b in batches:
            x = torch.randn(b, size)
            t = interleaved_medians({"layer": lambda: layer(x), "op": lambda: ss.ops.masked_linear(x, w_float, words),
                                     "dense": lambda: F.linear(x, dense_w), "dense_float": lambda: F.linear(x, dense_float)},
                                    repeats=repeats, min_seconds=1.0)
            rows.append({"batch": b, "ours_s": t["layer"], "dense_s": t["dense"], "ours_vs_dense_speed": t["dense"] / t["layer"],
                         "op_float_weight_s": t["op"], "op_vs_dense_speed": t["dense_float"] / t["op"]})
    return rows


def bench_training_step(batch: int = 128, repeats: int = 10, device: str = "cpu",
                        timer: Optional[Callable[[Callable[[], object]], float]] = None,
                        model_name: str = "fc1024") -> dict:
    """One mask-training step of ``model_name`` (s=500) through the layers vs the same STE step
    written in plain torch (W * (s >= 0) straight through, three GEMMs per layer). ``timer`` (seconds
    per call of a function) replaces the interleaved CPU timing, e.g. ``do_bench`` on a GPU."""
    from .algorithms.training import TrainSettings, make_optimizer

    x, y = torch.randn(batch, 784, device=device), torch.randint(0, 10, (batch,), device=device)
    model = build_model(model_name, 500).to(device)
    snn.begin_task(model)
    model.train()
    opt = make_optimizer(snn.task_parameters(model), TrainSettings())

    def ours():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

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
    t = interleaved_medians(fns, repeats=repeats) if timer is None else {k: timer(f) for k, f in fns.items()}
    t_ours, t_plain, t_gemm = t["ours"], t["plain"], t["gemm"]
    return {"model": model_name, "batch": batch, "ours_s": t_ours, "plain_torch_ste_s": t_plain, "three_gemms_s": t_gemm,
            "ours_vs_plain_speed": t_plain / t_ours, "ours_vs_gemm_floor": t_ours / t_gemm}


def bench_gnu_evaluation(model_name: str, output_size: int, k: int, tasks_timed: int = 2, batches: int = 79,
                         batch_size: int = 128) -> dict:
    """GNu evaluation of k learned tasks as the paper does it (per test batch: one-shot task inference
    on 1 image, then the chosen mask on the whole batch), timed on ``tasks_timed`` tasks' worth of
    batches with random masks and data, and projected to all k tasks (the work per batch does not
    depend on which task is evaluated)."""
    from .algorithms.inference import infer_oneshot
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


def machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "backend": backend_for(torch.device("cpu")).name}
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu_model"] = next(l.split(":", 1)[1].strip() for l in fh if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if info["backend"] == "cpu":
        from .ops.cpu import cpu_isa
        info["isa"] = cpu_isa()
    return info


def run_report(out: Path, quick: bool = False, backend: str = "auto") -> dict:
    """Run every benchmark with ``backend`` and write ``cpu-<backend>[-quick].{json,png}`` to ``out``."""
    from .ops.registry import use_backend
    with use_backend(backend):
        return _run_report(Path(out), quick)


def _run_report(out: Path, quick: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    if quick:
        ks, fs_max, batches, mem_ks = [1, 10], 10, [1, 128], [1, 10, 100]
    else:
        ks, fs_max, batches, mem_ks = [1, 10, 50, 250, 2500], 250, [1, 16, 128, 1024, 8192], [1, 10, 100, 250, 1000, 2500]
    report = {"machine": machine(), "quick": quick,
              "alpha_gradient_fc1024_s500": bench_alpha_gradient(ks, fs_max),
              "single_task_forward_1024": bench_single_task_forward(batches),
              "training_step_fc1024_b128": bench_training_step(),
              "gnu_evaluation": [bench_gnu_evaluation("fc1024", 500, 10 if quick else 250, 1 if quick else 2)] +
                                ([] if quick else [bench_gnu_evaluation("lenet", 500, 2500, 2)]),
              "memory_fc1024_s500": bench_memory(mem_ks)}
    name = f"cpu-{report['machine']['backend']}" + ("-quick" if quick else "")
    (out / f"{name}.json").write_text(json.dumps(report, indent=2))
    plot_report(report, out / f"{name}.png")
    print_table(report)
    return report


def print_table(report: dict) -> None:
    print(f"machine: {report['machine']}")
    print("alpha-gradient, FC1024 s=500, 1 image")
    for r in report["alpha_gradient_fc1024_s500"]:
        fs = f"float-stack {r['float_stack_s']*1e3:9.1f} ms  speed-up {r['speedup_vs_float_stack']:7.1f}x" if "float_stack_s" in r else "float-stack   (not run)"
        print(f"  k={r['k']:5d}  ours {r['ours_s']*1e3:9.1f} ms  {fs}  floor {r['memory_floor_s']*1e3:8.2f} ms  ours/floor {r['ours_vs_floor']:6.1f}")
    print("single-task forward 1024x1024 (speed vs dense on the materialised weight)")
    for r in report["single_task_forward_1024"]:
        print(f"  batch {r['batch']:5d}  layer {r['ours_s']*1e6:9.1f} us  dense {r['dense_s']*1e6:9.1f} us  {r['ours_vs_dense_speed']:.2f}x"
              f"   (op on a float weight: {r['op_vs_dense_speed']:.2f}x)")
    for e in report["gnu_evaluation"]:
        print(f"GNu evaluation {e['model']} s={e['output_size']} k={e['k']}: {e['seconds_per_batch']*1e3:.1f} ms per test batch, "
              f"{e['seconds_per_task']:.2f} s per task, all {e['k']} tasks projected {e['projected_seconds_all_tasks']/60:.1f} min")
    t = report["training_step_fc1024_b128"]
    print(f"training step FC1024 b128: ours {t['ours_s']*1e3:.1f} ms, plain-torch STE {t['plain_torch_ste_s']*1e3:.1f} ms "
          f"({t['ours_vs_plain_speed']:.2f}x), three-GEMM floor {t['three_gemms_s']*1e3:.1f} ms")


def plot_report(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    rows = report["alpha_gradient_fc1024_s500"]
    ax = axes[0]
    ax.loglog([r["k"] for r in rows], [r["ours_s"] for r in rows], "o-", label=f"packed ({report['machine']['backend']})")
    fs = [r for r in rows if "float_stack_s" in r]
    ax.loglog([r["k"] for r in fs], [r["float_stack_s"] for r in fs], "s-", label="float-stack (official)")
    ax.loglog([r["k"] for r in rows], [r["memory_floor_s"] for r in rows], "--", label="memory floor (2 passes)")
    ax.set_xlabel("tasks k")
    ax.set_ylabel("seconds")
    ax.set_title("α-gradient, FC1024 s=500, 1 image")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    mem = report["memory_fc1024_s500"]
    ax = axes[1]
    ax.loglog([r["k"] for r in mem], [r["packed_bytes"] for r in mem], "o-", label="packed bits")
    ax.loglog([r["k"] for r in mem], [r["float_stack_bytes"] for r in mem], "s-", label="float32 masks (official)")
    ax.axhline(24 * 2 ** 30, color="gray", ls=":", label="24 GiB")
    ax.set_xlabel("tasks k")
    ax.set_ylabel("bytes of masks")
    ax.set_title("mask memory, FC1024 s=500")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fw = report["single_task_forward_1024"]
    ax = axes[2]
    ax.semilogx([r["batch"] for r in fw], [r["ours_vs_dense_speed"] for r in fw], "o-", label="SupermaskLinear (signed-constant)")
    ax.semilogx([r["batch"] for r in fw], [r["op_vs_dense_speed"] for r in fw], "s--", label="masked_linear, float weight")
    ax.legend(fontsize=8)
    ax.axhline(1.0, color="gray", ls=":")
    ax.set_xlabel("batch")
    ax.set_ylabel("speed vs dense (higher is better)")
    ax.set_title("single-task packed forward 1024×1024")
    ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"supsup_fast on {report['machine']['processor']}, {report['machine']['threads']} threads, "
                 f"torch {report['machine']['torch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
