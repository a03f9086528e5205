"""GPU check: on a machine with an NVIDIA GPU, run the GPU tests and time every op against its
baselines on the same card, print a short table and write JSON.

    pip install --no-deps --no-build-isolation -e .     # builds the CUDA extension where nvcc exists
    python benchmarks/gpu_check.py                      # writes benchmarks/results/gpu-<card>.json

Baselines (docs/design.md, Performance): the float-stack SupSup of the official code, cuBLAS on the materialised
masked weight in the same dtype, and the HBM floor (packed bytes ÷ the bandwidth of a measured
device-to-device copy). Timings: ``triton.testing.do_bench`` (L2 flushed between runs, median)
and CUDA graphs (``do_bench_cudagraph``) for µs-scale kernels. The winner of each op between the
Triton and CUDA backends goes to ``supsup_fast/ops/gpu_op_table.json`` (what ``auto`` uses).

``--smoke`` runs every code path on the CPU with tiny sizes (Triton interpreter, wall-clock
timer): a check of this script itself, used by the tests; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (Triton interpreter): tests this script")
    p.add_argument("--skip-tests", action="store_true", help="only time")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--no-table-update", action="store_true", help="do not rewrite gpu_op_table.json")
    return p.parse_args(argv)


ARGS = parse_args()
if ARGS.smoke:
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import supsup_fast as ss  # noqa: E402
from supsup_fast import nn as snn  # noqa: E402
from supsup_fast import ops  # noqa: E402
from supsup_fast.algorithms.inference import alpha_gradient, alpha_gradients_batched  # noqa: E402
from supsup_fast.bench import FloatStackMLP, bench_training_step, median_time, random_model_with_masks  # noqa: E402

DEV = torch.device("cpu" if ARGS.smoke else "cuda")


def timer(fn: Callable[[], object], graph: bool = False) -> float:
    """Seconds per call: median with L2 flushed (do_bench), or inside a CUDA graph for µs kernels."""
    if DEV.type == "cpu":
        return median_time(fn, repeats=3)
    from triton.testing import do_bench, do_bench_cudagraph
    if graph:
        try:
            return do_bench_cudagraph(fn, rep=50) / 1e3
        except Exception:  # ops that cannot be captured (host sync) fall back to do_bench
            pass
    return do_bench(fn, warmup=10, rep=50, return_mode="median") / 1e3


def copy_bandwidth() -> float:
    """Bytes/s read by a device-to-device copy (it reads n and writes n bytes)."""
    n = (1 << 20) if ARGS.smoke else (1 << 30)
    src = torch.empty(n, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src))
    return 2 * n / t


def run_tests() -> dict:
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/kernels/test_triton.py", "tests/ops/test_cuda.py",
           "tests/ops/test_ops.py", "tests/nn/test_layers.py", "tests/algorithms/test_inference.py"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
    return {"command": " ".join(cmd[2:]), "returncode": proc.returncode, "summary": tail[0],
            "seconds": time.perf_counter() - start, "output_tail": (proc.stdout + proc.stderr)[-3000:]}


def model_with(k: int, name: str = "fc1024", s: int = 500):
    model = random_model_with_masks(name, s, k).to(DEV)
    for layer in snn.supermask_layers(model).values():
        layer.counts()
    return model


def bench_alpha(ks: List[int], stack_max_k: int, bw: float) -> List[dict]:
    rows = []
    x = torch.randn(1, 784, device=DEV)
    for k in ks:
        model = model_with(k)
        packed = snn.mask_bytes(model)
        ours = timer(lambda: alpha_gradient(model, x, "entropy", 10))
        row = {"k": k, "packed_bytes": packed, "ours_s": ours, "hbm_floor_s": packed / bw,
               "ours_vs_floor": ours / (packed / bw), "backend": ops.backend_for(DEV).name}
        if k <= stack_max_k:
            fs = FloatStackMLP(model)  # the official code's float masks, on this device
            g_ref, g = fs.alpha_gradient(x), alpha_gradient(model, x, "entropy", 10)
            row["rel_err"] = float((g - g_ref).abs().max() / g_ref.abs().max())
            row["same_argmin"] = int(g.argmin()) == int(g_ref.argmin())
            row["float_stack_s"] = timer(lambda: fs.alpha_gradient(x))
            row["speedup_vs_float_stack"] = row["float_stack_s"] / ours
            del fs
        rows.append(row)
        del model
        torch.cuda.empty_cache() if DEV.type == "cuda" else None
    return rows


def bench_bank_ops(k: int, bw: float, backends: List[str]) -> List[dict]:
    """mask_dot and superpose on one FC1024 layer-1 bank [k, 1024, 25] per backend."""
    g = torch.Generator().manual_seed(0)
    out, n = (64, 100) if ARGS.smoke else (1024, 784)
    bank = ss.pack_bits(torch.rand(k, out, n, generator=g) < 0.5).to(DEV)
    v = torch.randn(out, n, device=DEV)
    alpha = torch.rand(k, device=DEV)
    floor = bank.numel() * 4 / bw
    rows = []
    ref = ops.mask_dot(bank, v)
    for name in backends:
        with ops.use_backend(name):
            err = float((ops.mask_dot(bank, v) - ref).abs().max() / ref.abs().max())
            t_dot = timer(lambda: ops.mask_dot(bank, v), graph=True)
            t_sup = timer(lambda: ops.superpose(bank, alpha, n), graph=True)
        rows.append({"backend": name, "k": k, "bytes": bank.numel() * 4, "mask_dot_s": t_dot, "superpose_s": t_sup,
                     "mask_dot_vs_floor": t_dot / floor, "superpose_vs_floor": t_sup / floor, "rel_err": err})
    return rows


def bench_batched(k: int, q: int) -> dict:
    model = model_with(k)
    xs = torch.randn(q, 784, device=DEV)
    batched = timer(lambda: alpha_gradients_batched(model, xs))
    single = timer(lambda: alpha_gradient(model, xs[:1], "entropy", 10))
    G = alpha_gradients_batched(model, xs)
    S = torch.stack([alpha_gradient(model, xs[j:j + 1], "entropy", 10) for j in range(min(q, 8))])
    return {"k": k, "queries": q, "batched_per_query_s": batched / q, "one_shot_per_query_s": single,
            "speedup_per_query": single / (batched / q), "same_argmin_first8": bool(torch.equal(G[:S.shape[0]].argmin(1), S.argmin(1))),
            "max_abs_diff_first8": float((G[:S.shape[0]] - S).abs().max())}


def bench_forward(batches: List[int], size: int, backends: List[str]) -> List[dict]:
    rows = []
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(size, size, generator=g).to(DEV, dtype)
        words = ss.pack_bits(torch.rand(size, size, generator=g) < 0.5).to(DEV)
        dense_w = ops.backend_for(DEV).masked_weight(w, words)
        for b in batches:
            x = torch.randn(b, size, device=DEV, dtype=dtype)
            cublas = timer(lambda: F.linear(x, dense_w), graph=True)
            for name in backends:
                with ops.use_backend(name):
                    ours = timer(lambda: ops.masked_linear(x, w, words), graph=True)
                rows.append({"dtype": str(dtype).split(".")[-1], "batch": b, "backend": name, "ours_s": ours,
                             "cublas_s": cublas, "speedup_vs_cublas": cublas / ours})
    # The launch-bound regime: a whole FC1024 single-task forward replayed from one CUDA graph.
    if DEV.type == "cuda":
        from supsup_fast.bench import GraphedCall
        from supsup_fast.nn import set_task
        model = model_with(1)
        set_task(model, 0)
        for b in (1, 128, 1024):
            x = torch.randn(b, 784, device=DEV)
            eager = timer(lambda: model(x))
            graphed_call = GraphedCall(model, x)
            graphed = timer(lambda: graphed_call(x))
            rows.append({"dtype": "float32", "batch": b, "backend": "graph", "what": "FC1024 forward, eager vs CUDA graph",
                         "ours_s": graphed, "cublas_s": eager, "speedup_vs_cublas": eager / graphed})
    # Signed-constant weights as 2 bit planes vs cuBLAS on the materialised fp16 weight.
    sign = ss.pack_bits(torch.rand(size, size, generator=g) < 0.5).to(DEV)
    words = ss.pack_bits(torch.rand(size, size, generator=g) < 0.5).to(DEV)
    w16 = ops.backend_for(DEV).signed_masked_linear(torch.eye(size, device=DEV), sign, words, 0.05, None).t().half().contiguous()
    for b in [bb for bb in batches if bb <= 16]:
        x = torch.randn(b, size, device=DEV)
        x16 = x.half()
        cublas = timer(lambda: F.linear(x16, w16), graph=True)
        for name in backends:
            with ops.use_backend(name):
                ours = timer(lambda: ops.signed_masked_linear(x, sign, words, 0.05), graph=True)
            rows.append({"dtype": "2-bit signed", "batch": b, "backend": name, "ours_s": ours,
                         "cublas_s": cublas, "speedup_vs_cublas": cublas / ours, "baseline": "cuBLAS fp16"})
    return rows


def table(report: dict) -> str:
    lines = [f"GPU check on {report['machine']['gpu']} (torch {report['machine']['torch']}, triton {report['machine']['triton']})"]
    t = report.get("tests")
    if t:
        lines.append(f"tests: {t['summary']} (rc {t['returncode']})")
    lines.append(f"copy bandwidth: {report['copy_bandwidth_GBps']:.0f} GB/s")
    for r in report["alpha_gradient"]:
        extra = f", {r['speedup_vs_float_stack']:.1f}x float-stack" if "speedup_vs_float_stack" in r else ""
        lines.append(f"alpha-grad k={r['k']:5d}: {r['ours_s'] * 1e3:8.3f} ms = {r['ours_vs_floor']:.2f}x HBM floor{extra}")
    for r in report["bank_ops"]:
        lines.append(f"{r['backend']:7s} k={r['k']}: mask_dot {r['mask_dot_vs_floor']:.2f}x floor, superpose {r['superpose_vs_floor']:.2f}x floor")
    b = report["batched_inference"]
    lines.append(f"batched inference q={b['queries']} k={b['k']}: {b['speedup_per_query']:.1f}x faster per query than one-shot passes")
    for r in report["forward"]:
        if "what" in r:
            lines.append(f"{r['what']} b={r['batch']}: the graph is {r['speedup_vs_cublas']:.2f}x faster than eager")
        else:
            lines.append(f"forward {r['dtype']:12s} b={r['batch']:5d} {r['backend']:7s}: {r['speedup_vs_cublas']:.2f}x cuBLAS")
    s = report["training_step"]
    lines.append(f"training step b={s['batch']}: {s['ours_vs_plain_speed']:.2f}x plain torch STE, "
                 f"{s['ours_vs_gemm_floor']:.2f}x the three-GEMM floor")
    return "\n".join(lines)


def main() -> int:
    if DEV.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible (use --smoke for a CPU run of the script)", file=sys.stderr)
        return 2
    import triton
    backends = [b for b in ("triton", "cuda") if b in ops.available()] if DEV.type == "cuda" else ["triton"]
    report = {"machine": {"gpu": torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu (smoke)",
                          "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
                          "backends": ops.available()}}
    if not ARGS.skip_tests and not ARGS.smoke:
        report["tests"] = run_tests()
    bw = copy_bandwidth()
    report["copy_bandwidth_GBps"] = bw / 1e9
    small = ARGS.smoke
    report["alpha_gradient"] = bench_alpha([3] if small else [250, 2500], 3 if small else 250, bw)
    report["bank_ops"] = bench_bank_ops(5 if small else 2500, bw, backends)
    report["batched_inference"] = bench_batched(3 if small else 2500, 4 if small else 64)
    report["forward"] = bench_forward([1, 16] if small else [1, 16, 128, 1024, 8192], 64 if small else 1024, backends)
    report["training_step"] = bench_training_step(8 if small else 128, device=str(DEV), timer=timer)
    print(table(report))
    slug = re.sub(r"[^a-z0-9]+", "-", report["machine"]["gpu"].lower()).strip("-")
    out = Path(ARGS.out) / f"gpu-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    if DEV.type == "cuda" and not ARGS.no_table_update and "cuda" in backends:
        winner = {}
        by = {r["backend"]: r for r in report["bank_ops"]}
        winner["mask_dot"] = min(by, key=lambda n: by[n]["mask_dot_s"])
        winner["superpose"] = min(by, key=lambda n: by[n]["superpose_s"])
        sg = {r["backend"]: r["ours_s"] for r in report["forward"] if r["dtype"] == "2-bit signed" and r["batch"] == 1}
        if sg:
            winner["signed_gemv"] = min(sg, key=sg.get)
        table_path = ROOT / "supsup_fast" / "ops" / "gpu_op_table.json"
        table_path.write_text(json.dumps({"note": f"measured by benchmarks/gpu_check.py on {report['machine']['gpu']}",
                                          "winner": winner}, indent=2) + "\n")
        print(f"wrote {table_path}: {winner}")
    return 0 if report.get("tests", {}).get("returncode", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
