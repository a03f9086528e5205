"""The checks of issue #14 ("Kernels, round 2"), on every x86 ISA level this CPU has.

    python benchmarks/kernels2.py [--quick] [--isa avx2 --isa avx512] [--parts training,alpha,oneshot,masked_linear]
                                  [--out benchmarks/results]

For each ISA a child process runs with SUPSUP_CPU_ISA=<isa> (the C++ kernels capped to that
instruction set) and torch capped to it as well (MKL_ENABLE_INSTRUCTIONS, ONEDNN_MAX_CPU_ISA,
ATEN_CPU_CAPABILITY: an AVX2-only machine's BLAS runs AVX2 too), and writes ``kernels2-cpu-<isa>.json`` and a
``.png`` plot against k. Every figure stands beside its floor, all measured in the same process:
- one read of the packed bits = a float sum over as many bytes, timed in the same interleaved rounds
  as the ops it is the floor of (since session 45 for the general-α ops, since session 46 for the
  one-shot query; before, packed bytes ÷ the streaming read bandwidth measured at the start of the
  run, still stored as ``*_at_start_s``);
- the fp32 add floor = k·n masked adds at one vector add (8 lanes AVX2, 16 AVX-512) per cycle per
  thread at the nominal clock (an estimate of the ALU bound of the plain masked-add kernel);
- the training step beside the plain-torch official-style loop and three plain GEMMs per layer, and whole
  tasks through `train_task` with and without the fused step.
Ratios come from interleaved medians (the contenders take turns), as the machine may be shared.
``--parts`` re-measures some sections only: the others are kept from the JSON already there, and
each section records when, at which commit and with which note it was measured.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# What an AVX2-only machine runs for torch's side too: MKL, oneDNN and ATen's own kernels capped to
# AVX2, so a ratio against torch compares like with like (uncapped, MKL kept using AVX-512 while our
# kernels were capped: dense 1024 x 1024 at batch 1024 took 6.5 ms here instead of 10.9).
_TORCH_ISA_CAPS = {"avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
                   "scalar": {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41", "ATEN_CPU_CAPABILITY": "default"}}


def _cpu_flags() -> str:
    try:
        return open("/proc/cpuinfo").read()
    except OSError:
        return ""


def _isas() -> list:
    f = _cpu_flags()
    out = []
    if " avx2" in f:
        out.append("avx2")
    if " avx512f" in f and " avx512bw" in f:
        out.append("avx512")
    return out or ["scalar"]


def _ghz() -> float:
    for line in _cpu_flags().splitlines():
        if line.startswith("cpu MHz"):
            return float(line.split(":")[1]) / 1000
    return 3.0


# ------------------------------------------------------------------------------------------------
PARTS = ("training", "alpha", "oneshot", "masked_linear")
SECTIONS = {"training": ("training_step_b128_s500", "train_task_1000_iters"),
            "alpha": ("superposed_fc1024_s500_general_alpha",), "oneshot": ("oneshot_query_lenet_s500",),
            "masked_linear": ("masked_linear_1024",)}


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def child(isa: str, quick: bool, out: Path, note: str = "", parts: tuple = PARTS) -> dict:
    import torch

    from supsup_fast.bench import bench_training_step, machine, read_bandwidth
    from supsup_fast.ops.backends.cpu import cpu_isa

    threads = torch.get_num_threads()
    got = cpu_isa()
    assert got == isa, f"asked for {isa}, the kernels run {got}"
    lanes = 16 if isa == "avx512" else (8 if isa == "avx2" else 1)
    ghz = _ghz()
    bw = read_bandwidth()
    rep = {"isa": isa, "machine": machine(), "quick": quick, "read_bandwidth_GBps": bw / 1e9, "nominal_GHz": ghz,
           "note": note or "machine possibly shared with other jobs: ratios are interleaved medians in one process"}

    def add_floor(bits: int) -> float:
        return bits / (lanes * threads * ghz * 1e9)

    path = out / f"kernels2-cpu-{isa}{'-quick' if quick else ''}.json"
    if set(parts) != set(PARTS):  # keep the sections not re-measured now
        if not path.exists():
            raise SystemExit(f"--parts {','.join(parts)}: {path} has no earlier sections to keep; run all parts first")
        old = json.loads(path.read_text())
        for part in PARTS:
            if part not in parts:
                for key in SECTIONS[part]:
                    if key in old:
                        rep[key] = old[key]
                rep.setdefault("measured", {})[part] = old.get("measured", {}).get(part, {"note": old.get("note", "")})
    # Each section keeps the bandwidth of its own run (the top-level figure is the latest run's): the
    # one-read floors of a kept section were computed with it.
    stamp = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": _commit(), "note": rep["note"],
             "read_bandwidth_GBps": bw / 1e9,
             "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
             "mkl_enable_instructions": os.environ.get("MKL_ENABLE_INSTRUCTIONS", "(not capped)")}
    for part in parts:
        rep.setdefault("measured", {})[part] = stamp

    # 1. training step
    if "training" in parts:
        rep["training_step_b128_s500"] = [bench_training_step(model_name=m, repeats=5 if quick else 15) for m in ("lenet", "fc1024")]
        for r in rep["training_step_b128_s500"]:
            r["bar"] = 1.8 if r["model"] == "lenet" else 1.5
        rep["train_task_1000_iters"] = _whole_task(quick)
    if "alpha" in parts:
        rep["superposed_fc1024_s500_general_alpha"] = _alpha_gradient(isa, quick, bw, add_floor)
    if "oneshot" in parts:
        rep["oneshot_query_lenet_s500"] = _oneshot(isa, quick, bw, add_floor)
    if "masked_linear" in parts:
        rep["masked_linear_1024"] = _masked_linear(quick)

    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rep, indent=2))
    plot(rep, path.with_suffix(".png"))
    print_table(rep)
    return rep


def _whole_task(quick: bool) -> list:
    """``algorithms.train_task`` end to end (1,000 iterations of batch 128, s=500, on a 60,000-image
    task of random data: the time does not depend on the pixels), with the fused step and without it
    (``TrainSettings(fused_step=False)``: autograd through the layers and FusedRMSprop, the path
    before the fused step). Interleaved medians of whole tasks."""
    import torch

    from supsup_fast.algorithms.training import TrainSettings, train_task
    from supsup_fast.bench import interleaved_medians
    from supsup_fast.data.tasks import TaskSplit
    from supsup_fast.models import build_model
    iters = 100 if quick else 1000
    gen = torch.Generator().manual_seed(0)
    split = TaskSplit(torch.randn(60_000, 784, generator=gen), torch.randint(0, 10, (60_000,), generator=gen))
    rows = []
    for name in ("lenet", "fc1024"):
        def task(fused: bool):
            return lambda: train_task(build_model(name, 500), split, TrainSettings(iters=iters, fused_step=fused),
                                      device=torch.device("cpu"), generator=torch.Generator().manual_seed(1))
        t = interleaved_medians({"fused": task(True), "unfused": task(False)}, repeats=2 if quick else 3)
        rows.append({"model": name, "iters": iters, "fused_s": t["fused"], "unfused_s": t["unfused"],
                     "speedup": t["unfused"] / t["fused"]})
    return rows


def _alpha_gradient(isa: str, quick: bool, bw: float, add_floor) -> list:
    """superposed_linear with a general α, FC1024 s=500, 1 image, beside the float-stack and the floors."""
    import torch
    import torch.nn.functional as F

    import supsup_fast as ss
    from supsup_fast import nn as snn
    from supsup_fast.algorithms.objectives import entropy
    from supsup_fast.bench import FloatStackMLP, interleaved_medians, ops_alpha_gradient, random_model_with_masks
    ks = [10, 250] if quick else [10, 250, 1000, 2500]
    rows = []
    x = torch.randn(1, 784)
    for k in ks:
        model = random_model_with_masks("fc1024", 500, k)
        layers = list(snn.supermask_layers(model).values())
        packed = sum(l.bank.words.numel() * 4 for l in layers)
        bits = sum(k * l.weight.numel() for l in layers)
        alpha0 = torch.rand(k) * (2.0 / k)  # a general α of mean 1/k (the logits stay in range)
        # The layers' copies (each as much memory as the bank): the task-interleaved one kept for task
        # inference (MaskBank.interleaved(), read by mask_dot and the α-gradient, bank_t=) and the
        # weight-interleaved one (MaskBank.interleaved_weights(), keep_interleaved_weights: read by
        # superpose, bank_w=). The ops read them where given.
        copies = [l.bank.interleaved() for l in layers]
        wcopies = [ss.ops.interleave_weights(l.bank.words, l.n) for l in layers]
        # One read of the bits: a float sum over as many bytes, timed in the same interleaved rounds as
        # the ops it is the floor of, so that the host's drift hits both alike.
        floor_buf = torch.ones(packed // 4)

        def one_read():
            return floor_buf.sum()

        def ours(use_copies: bool = False):
            return ops_alpha_gradient(layers, x, alpha0, copies if use_copies else None, wcopies if use_copies else None)

        fns = {"ours": ours, "ours_copy": lambda: ours(True), "one_read": one_read}
        fs = None
        if k <= 250:
            fs = FloatStackMLP(model)

            def float_stack():
                a = alpha0.clone().requires_grad_(True)
                h = x
                for i, (l, st) in enumerate(zip(fs.layers, fs.stacks)):
                    h = F.linear(h, l.weight * (a.view(-1, 1, 1) * st).sum(0))
                    if i < len(fs.layers) - 1:
                        h = F.relu(h)
                return torch.autograd.grad(entropy(h, 10), a)[0]
            fns["float_stack"] = float_stack
            ref = float_stack()
            err = float((ours() - ref).abs().max() / ref.abs().max())
            err_copy = float((ours(True) - ref).abs().max() / ref.abs().max())
        t = interleaved_medians(fns, repeats=5)
        # The interleaved samples above find the bits evicted by the float stack's gigabytes; here the
        # α-gradient runs back to back, as repeated queries run it (on a last-level cache larger
        # than the bits, they stay there).
        loop = interleaved_medians({"ours_copy": fns["ours_copy"]}, repeats=5, calls_per_sample=5)["ours_copy"]
        row = {"k": k, "packed_bytes": packed, "ours_s": t["ours"], "ours_copy_s": t["ours_copy"],
               "ours_copy_loop_s": loop, "two_reads_s": 2 * t["one_read"], "two_reads_at_start_s": 2 * packed / bw,
               "add_floor_s": 2 * add_floor(bits)}
        row["ours_vs_two_reads"] = row["ours_s"] / row["two_reads_s"]
        row["ours_copy_vs_two_reads"] = row["ours_copy_s"] / row["two_reads_s"]
        if fs is not None:
            row.update(float_stack_s=t["float_stack"], speedup_vs_float_stack=t["float_stack"] / t["ours"], rel_err=err,
                       speedup_copy_vs_float_stack=t["float_stack"] / t["ours_copy"], rel_err_copy=err_copy,
                       speedup_copy_loop_vs_float_stack=t["float_stack"] / loop)
        # superpose and mask_dot alone, general α, all three layers
        v = [torch.randn(l.weight.shape) for l in layers]
        sup = lambda: [ss.ops.superpose(l.bank.words, alpha0, l.n) for l in layers]
        sup_copy = lambda: [ss.ops.superpose(l.bank.words, alpha0, l.n, c) for l, c in zip(layers, wcopies)]
        dot = lambda: [ss.ops.mask_dot(l.bank.words, vi) for l, vi in zip(layers, v)]
        dot_copy = lambda: [ss.ops.mask_dot(l.bank.words, vi, c) for l, vi, c in zip(layers, v, copies)]
        t2 = interleaved_medians({"superpose": sup, "superpose_copy": sup_copy, "mask_dot": dot, "mask_dot_copy": dot_copy,
                                  "one_read": one_read}, repeats=5)
        row.update(superpose_s=t2["superpose"], superpose_copy_s=t2["superpose_copy"], mask_dot_s=t2["mask_dot"],
                   mask_dot_copy_s=t2["mask_dot_copy"], one_read_s=t2["one_read"], one_read_at_start_s=packed / bw,
                   add_floor_one_pass_s=add_floor(bits))
        row["superpose_vs_one_read"] = row["superpose_s"] / row["one_read_s"]
        row["mask_dot_vs_one_read"] = row["mask_dot_s"] / row["one_read_s"]
        row["mask_dot_copy_vs_one_read"] = row["mask_dot_copy_s"] / row["one_read_s"]
        row["superpose_copy_vs_one_read"] = row["superpose_copy_s"] / row["one_read_s"]
        rows.append(row)
        print(isa, "alpha-grad", {a: (round(b, 5) if isinstance(b, float) else b) for a, b in row.items()}, flush=True)
        del model, layers, fs, fns, copies, wcopies, floor_buf
    return rows


def _oneshot(isa: str, quick: bool, bw: float, add_floor) -> list:
    """One-shot and batched task-inference queries, LeNet s=500."""
    import torch

    from supsup_fast import nn as snn
    from supsup_fast.algorithms.inference import alpha_gradient, alpha_gradients_batched
    from supsup_fast.bench import interleaved_medians, random_model_with_masks
    qrows = []
    for k in ([250] if quick else [250, 2500]):
        model = random_model_with_masks("lenet", 500, k)
        layers = list(snn.supermask_layers(model).values())
        for l in layers:
            l.counts()
        packed = sum(l.bank.words.numel() * 4 for l in layers)
        bits = sum(k * l.weight.numel() for l in layers)
        x1 = torch.randn(1, 784)
        nq = 32
        xs = torch.randn(nq, 784)
        one = lambda: alpha_gradient(model, x1, "entropy", 10)
        floor_buf = torch.ones(packed // 4)  # one read of the bits, in the same rounds (see _alpha_gradient)
        t = interleaved_medians({"one": one, "batched": lambda: alpha_gradients_batched(model, xs, "entropy", 10),
                                 "one_read": floor_buf.sum}, repeats=5)
        # Queries back to back, as a loop of them runs (each finds what the last left in the caches),
        # and each after a read of far more memory than the last-level cache (its bits from DRAM).
        loop = interleaved_medians({"one": one}, repeats=7, calls_per_sample=10)["one"]
        cold = _after_flush(one, repeats=7)
        qrows.append({"k": k, "packed_bytes": packed, "oneshot_query_s": t["one"], "oneshot_loop_query_s": loop,
                      "oneshot_cold_query_s": cold, "batched_per_query_s": t["batched"] / nq,
                      "batch_queries": nq, "one_read_s": t["one_read"], "one_read_at_start_s": packed / bw, "add_floor_s": add_floor(bits), "target_s": 3e-3 if isa == "avx512" else 6e-3,
                      "fig4_final_eval_projection_s": 197_500 * t["batched"] / nq})
        print(isa, "oneshot", qrows[-1], flush=True)
        del model, layers, floor_buf
    return qrows


def _after_flush(fn, repeats: int, flush_bytes: int = 1 << 30) -> float:
    """Median time of fn, each call after a sum over flush_bytes (1 GiB: more than any last-level
    cache, the Xeon VM's 300 MiB included), so that what fn reads comes from DRAM."""
    import statistics

    import torch
    buf = torch.ones(flush_bytes // 4)
    fn()
    ts = []
    for _ in range(repeats):
        buf.sum()
        start = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - start)
    return statistics.median(ts)


def _masked_linear(quick: bool) -> list:
    """masked_linear 1024x1024 against dense F.linear on the materialised weight."""
    import torch
    import torch.nn.functional as F

    import supsup_fast as ss
    from supsup_fast.bench import interleaved_medians
    mrows = []
    w = torch.randn(1024, 1024)
    words = ss.pack_bits(torch.rand(1024, 1024) > 0.5)
    dense_w = w * ss.unpack_bits(words, 1024)
    with torch.no_grad():
        for b in ([1, 128] if quick else [1, 16, 128, 1024, 8192]):
            xb = torch.randn(b, 1024)
            t = interleaved_medians({"ours": lambda: ss.ops.masked_linear(xb, w, words), "dense": lambda: F.linear(xb, dense_w)},
                                    repeats=15, min_seconds=0.5 if quick else 1.5)
            mrows.append({"batch": b, "ours_s": t["ours"], "dense_s": t["dense"], "speed_vs_dense": t["dense"] / t["ours"],
                          "bar": 1.0 if b <= 16 else 0.95})
    return mrows


def print_table(rep: dict) -> None:
    from supsup_fast.machine import cpu_label
    isa = rep["isa"]
    print(f"== {isa} ({cpu_label(rep['machine'])}, {rep['machine']['threads']} threads, "
          f"read {rep['read_bandwidth_GBps']:.1f} GB/s; {rep['note']})")
    for part, stamp in rep.get("measured", {}).items():
        when = f"measured {stamp['date']} at {stamp['commit']}" if "date" in stamp else "kept from the earlier full run"
        torch_isa = stamp.get("torch_cpu_capability", "not capped (before the torch cap)")
        print(f"  {part}: {when} ({stamp.get('note', '')}; torch: {torch_isa})")
    for r in rep["training_step_b128_s500"]:
        loop = f"in loops of {r['steps_per_sample']}" if "steps_per_sample" in r else "one step at a time"
        print(f"  training step {r['model']:7s} ({loop}) ours {r['ours_s']*1e3:7.2f} ms  plain {r['plain_torch_ste_s']*1e3:7.2f} ms  "
              f"{r['ours_vs_plain_speed']:.2f}x (bar {r['bar']}x)  three-GEMM floor {r['three_gemms_s']*1e3:.2f} ms")
        if "single_call" in r:
            c = r["single_call"]
            print(f"  training step {r['model']:7s} (one step at a time) ours {c['ours_s']*1e3:7.2f} ms  "
                  f"plain {c['plain_torch_ste_s']*1e3:7.2f} ms  {c['ours_vs_plain_speed']:.2f}x")
    for r in rep.get("train_task_1000_iters", []):
        print(f"  train_task {r['model']:7s} {r['iters']} iterations: fused {r['fused_s']:.2f} s, "
              f"unfused {r['unfused_s']:.2f} s ({r['speedup']:.2f}x)")
    for r in rep["superposed_fc1024_s500_general_alpha"]:
        fs = f"{r['speedup_vs_float_stack']:7.1f}x float-stack" if "float_stack_s" in r else "      (no float-stack)"
        print(f"  k={r['k']:5d} α-grad {r['ours_s']*1e3:8.2f} ms {fs}  {r['ours_vs_two_reads']:5.2f}x two reads ({r['two_reads_s']*1e3:.2f} ms)"
              f" | superpose {r['superpose_vs_one_read']:5.2f}x  mask_dot {r['mask_dot_vs_one_read']:5.2f}x one read ({r['one_read_s']*1e3:.2f} ms"
              + (f"; at the start-of-run bandwidth {r['one_read_at_start_s']*1e3:.2f}" if "one_read_at_start_s" in r else "")
              + f"), add floor {r['add_floor_one_pass_s']*1e3:.2f} ms")
        if "ours_copy_s" in r:  # the same ops given the layers' copies (bank_t=, and bank_w= where superpose_copy_s is)
            fs = f"{r['speedup_copy_vs_float_stack']:7.1f}x float-stack" if "float_stack_s" in r else "      (no float-stack)"
            sup = f"superpose {r['superpose_copy_vs_one_read']:5.2f}x  " if "superpose_copy_s" in r else ""
            print(f"  {'':7s} with copies {r['ours_copy_s']*1e3:8.2f} ms {fs}  {r['ours_copy_vs_two_reads']:5.2f}x two reads"
                  f" | {sup}mask_dot {r['mask_dot_copy_vs_one_read']:5.2f}x one read")
        if "ours_copy_loop_s" in r:
            fs = f"{r['speedup_copy_loop_vs_float_stack']:7.1f}x float-stack" if "float_stack_s" in r else "      (no float-stack)"
            print(f"  {'':7s} back to back {r['ours_copy_loop_s']*1e3:7.2f} ms {fs}  "
                  f"{r['ours_copy_loop_s'] / r['two_reads_s']:5.2f}x two reads")
    for r in rep["oneshot_query_lenet_s500"]:
        if "oneshot_loop_query_s" in r:
            print(f"  one-shot LeNet s=500 k={r['k']}: {r['oneshot_loop_query_s']*1e3:.2f} ms per query back to back, "
                  f"{r['oneshot_cold_query_s']*1e3:.2f} ms with its bits from DRAM")
        print(f"  one-shot LeNet s=500 k={r['k']}: {r['oneshot_query_s']*1e3:.2f} ms per query after a batched one, {r['batched_per_query_s']*1e3:.2f} ms "
              f"per query batched ({r['batch_queries']}); one read {r['one_read_s']*1e3:.2f} ms, add floor {r['add_floor_s']*1e3:.2f} ms, "
              f"target {r['target_s']*1e3:.0f} ms; Fig 4 final eval (197,500 queries) projected {r['fig4_final_eval_projection_s']/60:.1f} min")
    for r in rep["masked_linear_1024"]:
        print(f"  masked_linear 1024 batch {r['batch']:5d}: {r['speed_vs_dense']:.2f}x dense (bar {r['bar']})")


def plot(rep: dict, path: Path) -> None:
    import matplotlib

    from supsup_fast.machine import cpu_label
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = rep["superposed_fc1024_s500_general_alpha"]
    ks = [r["k"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    ax.loglog(ks, [r["ours_s"] for r in rows], "o-", label="α-gradient (superposed_linear fwd+bwd)")
    ax.loglog(ks, [r["superpose_s"] for r in rows], "s-", label="superpose")
    ax.loglog(ks, [r["mask_dot_s"] for r in rows], "^-", label="mask_dot")
    cp = [r for r in rows if "ours_copy_s" in r]
    ax.loglog([r["k"] for r in cp], [r["ours_copy_s"] for r in cp], "o--", label="α-gradient, with copies")
    lp = [r for r in rows if "ours_copy_loop_s" in r]
    ax.loglog([r["k"] for r in lp], [r["ours_copy_loop_s"] for r in lp], "o:", label="α-gradient, with copies, back to back")
    ax.loglog([r["k"] for r in cp], [r["mask_dot_copy_s"] for r in cp], "^--", label="mask_dot, task-interleaved copy")
    sc = [r for r in rows if "superpose_copy_s" in r]
    ax.loglog([r["k"] for r in sc], [r["superpose_copy_s"] for r in sc], "s--", label="superpose, weight-interleaved copy")
    fs = [r for r in rows if "float_stack_s" in r]
    ax.loglog([r["k"] for r in fs], [r["float_stack_s"] for r in fs], "x--", label="α-gradient, float-stack")
    ax.loglog(ks, [r["one_read_s"] for r in rows], "k:", label="one read of the bits")
    ax.loglog(ks, [r["add_floor_one_pass_s"] for r in rows], "k-.", label="fp32 add floor (one pass)")
    ax.set_xlabel("tasks k")
    ax.set_ylabel("seconds")
    ax.set_title(f"FC1024 s=500, general α, 1 image ({rep['isa']})")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    ax = axes[1]
    q = rep["oneshot_query_lenet_s500"]
    ax.loglog([r["k"] for r in q], [r["oneshot_query_s"] for r in q], "o-", label="one-shot query, after a batched one")
    lq = [r for r in q if "oneshot_loop_query_s" in r]
    ax.loglog([r["k"] for r in lq], [r["oneshot_loop_query_s"] for r in lq], "o--", label="one-shot query, back to back")
    ax.loglog([r["k"] for r in lq], [r["oneshot_cold_query_s"] for r in lq], "o:", label="one-shot query, bits from DRAM")
    ax.loglog([r["k"] for r in q], [r["batched_per_query_s"] for r in q], "s-", label="per query, batched")
    ax.loglog([r["k"] for r in q], [r["one_read_s"] for r in q], "k:", label="one read of the bits")
    ax.loglog([r["k"] for r in q], [r["add_floor_s"] for r in q], "k-.", label="fp32 add floor")
    ax.axhline(q[0]["target_s"], color="red", ls="--", lw=0.8, label="target")
    ax.set_xlabel("tasks k")
    ax.set_title(f"task inference, LeNet s=500 ({rep['isa']})")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"{cpu_label(rep['machine'])}, {rep['machine']['threads']} threads, kernels capped to {rep['isa']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--isa", action="append", choices=["scalar", "avx2", "avx512"], help="default: every level this CPU has")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--note", default="", help="how the machine was used meanwhile (stored in the JSON), e.g. 'quiet machine'")
    p.add_argument("--threads", type=int, default=None, help="torch / kernel threads (default: torch's, the core count)")
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"comma-separated sections to measure (default: all of {','.join(PARTS)}); the rest are kept from the JSON")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    parts = tuple(x.strip() for x in a.parts.split(",") if x.strip())
    bad = [x for x in parts if x not in PARTS]
    if bad or not parts:
        p.error(f"--parts: expected a comma-separated subset of {','.join(PARTS)}, got {a.parts!r}")
    if a.child:
        if a.threads:
            import torch
            torch.set_num_threads(a.threads)
        child(a.isa[0], a.quick, a.out, a.note, parts)
        return
    run_per_isa(Path(__file__), a.isa or _isas(), ["--out", str(a.out), "--parts", ",".join(parts)]
                + (["--quick"] if a.quick else []) + (["--threads", str(a.threads)] if a.threads else [])
                + (["--note", a.note] if a.note else []))


def run_per_isa(script: Path, isas: list, args: list) -> None:
    """Run ``script --child --isa <isa> *args`` for each ISA level, the C++ kernels and torch capped to it."""
    for isa in isas:
        env = dict(os.environ, SUPSUP_CPU_ISA=isa, **_TORCH_ISA_CAPS.get(isa, {}))
        start = time.time()
        rc = subprocess.run([sys.executable, str(script), "--child", "--isa", isa, *args], env=env).returncode
        if rc != 0:  # the child printed why
            sys.exit(f"{script.name}: the {isa} run failed (exit status {rc}); see its message above")
        print(f"({isa}: {time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
