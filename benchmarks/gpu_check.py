"""GPU check: on a machine with an NVIDIA GPU, run the GPU tests and time every op against its
baselines on the same card, print a short table and write JSON.

    pip install --no-deps --no-build-isolation -e .     # builds the CUDA extension where nvcc exists
    python benchmarks/gpu_check.py                      # writes benchmarks/results/gpu-<card>.json

Where the Python environment has no setuptools (pip then cannot build the package), run it from
the source tree instead: ``ln -s ../kernels supsup_fast/kernels; ln -s ../csrc supsup_fast/csrc;
PYTHONPATH=. python benchmarks/gpu_check.py`` (both extensions then compile on first use).

Each part (timings, the NCCL collectives of a sharded evaluation, the GPU tests, which run last
under ``--test-time-limit``) is recorded on its own: a failing part leaves its traceback under
``errors`` and the others still run, and the JSON is rewritten after every part.

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
from typing import Callable, List

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (Triton interpreter): tests this script")
    p.add_argument("--skip-tests", action="store_true", help="only time")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--no-table-update", action="store_true", help="do not rewrite gpu_op_table.json")
    p.add_argument("--test-time-limit", type=float, default=300.0, help="seconds the GPU tests may take (they run last)")
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


GPU_TEST_FILES = ["tests/kernels/test_triton.py", "tests/ops/test_cuda.py", "tests/ops/test_contract.py",
                  "tests/ops/test_ops.py", "tests/ops/test_edge_cases.py", "tests/ops/test_opcheck.py",
                  "tests/nn/test_layers.py", "tests/nn/test_optim.py", "tests/algorithms/test_inference.py"]


def run_tests(time_limit_s: float) -> dict:
    """The tests that run on the GPU (every backend on every device it supports), all of them
    (no -x), under a time limit so that the timings below still run."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", *GPU_TEST_FILES]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=time_limit_s)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        out, rc = out + f"\n(stopped after {time_limit_s:.0f} s)", 124
    lines = out.strip().splitlines()
    summary = next((ln for ln in reversed(lines) if " passed" in ln or " failed" in ln or "error" in ln), lines[-1] if lines else "")
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    return {"command": " ".join(cmd[2:]), "returncode": rc, "summary": summary, "failed": failed,
            "seconds": time.perf_counter() - start, "output_tail": out[-6000:]}


def model_with(k: int, name: str = "fc1024", s: int = 500):
    model = random_model_with_masks(name, s, k).to(DEV)
    for layer in snn.supermask_layers(model).values():
        layer.counts()
    return model


def bench_alpha(ks: List[int], stack_max_k: int, bw: float, name: str = "fc1024") -> List[dict]:
    """One one-shot α-gradient query (uniform α, the layers' count path) at each k."""
    rows = []
    x = torch.randn(1, 784, device=DEV)
    for k in ks:
        model = model_with(k, name)
        packed = snn.mask_bytes(model)
        ours = timer(lambda: alpha_gradient(model, x, "entropy", 10))
        row = {"model": name, "k": k, "packed_bytes": packed, "ours_s": ours, "hbm_floor_s": packed / bw,
               "ours_vs_floor": ours / (packed / bw), "backend": ops.backend_for(DEV).name}
        if k <= stack_max_k and name == "fc1024":
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


def bench_batched(k: int, q: int, name: str = "fc1024") -> dict:
    model = model_with(k, name)
    xs = torch.randn(q, 784, device=DEV)
    batched = timer(lambda: alpha_gradients_batched(model, xs))
    single = timer(lambda: alpha_gradient(model, xs[:1], "entropy", 10))
    G = alpha_gradients_batched(model, xs)
    S = torch.stack([alpha_gradient(model, xs[j:j + 1], "entropy", 10) for j in range(min(q, 8))])
    return {"model": name, "k": k, "queries": q, "batched_per_query_s": batched / q, "one_shot_per_query_s": single,
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


def nccl_check() -> dict:
    """The collectives a sharded evaluation uses, through NCCL with CUDA tensors (gloo in --smoke):
    a one-process group (NCCL refuses two ranks on one GPU), the sharded α-gradient path forced on,
    compared with the plain one-process α-gradient."""
    import torch.distributed as dist
    from supsup_fast.algorithms.sharded import ShardedModel
    from supsup_fast.distributed import DistContext

    class Forced(DistContext):  # world size 1, but every collective path taken
        @property
        def enabled(self) -> bool:
            return True

    backend = "gloo" if DEV.type == "cpu" else "nccl"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        t = torch.arange(4.0, device=DEV)
        dist.all_reduce(t)
        gathered = [None]
        dist.all_gather_object(gathered, {"rank": 0})
        model = model_with(3 if ARGS.smoke else 50)
        x = torch.randn(1, 784, device=DEV)
        sharded = ShardedModel(model, Forced(1, 0, 0, backend), 0, 3 if ARGS.smoke else 50)
        g_sharded = sharded.alpha_gradients(x, "entropy", 10)
        g_plain = alpha_gradient(model, x, "entropy", 10).cpu()
        xs = torch.randn(4, 784, device=DEV)
        b_sharded = sharded.alpha_gradients_batched(xs, "entropy", 10)
        b_plain = alpha_gradients_batched(model, xs).cpu()
        dist.barrier()
        return {"backend": backend, "all_reduce_ok": t.tolist() == [0.0, 1.0, 2.0, 3.0], "gather_ok": gathered == [{"rank": 0}],
                "sharded_alpha_max_abs_diff": float((g_sharded - g_plain).abs().max()),
                "sharded_batched_max_abs_diff": float((b_sharded - b_plain).abs().max()),
                "same_argmin": bool(torch.equal(b_sharded.argmin(1), b_plain.argmin(1)))}
    finally:
        dist.destroy_process_group()


def table(report: dict) -> str:
    lines = [f"GPU check on {report['machine']['gpu']} (torch {report['machine']['torch']}, triton {report['machine']['triton']})"]
    t = report.get("tests")
    if t:
        lines.append(f"tests: {t['summary']} (rc {t['returncode']}, {t['seconds']:.0f} s)")
        lines += [f"  {f}" for f in t.get("failed", [])[:20]]
    for name, err in report.get("errors", {}).items():
        lines.append(f"section {name} FAILED: {err.strip().splitlines()[-1]}")
    if "copy_bandwidth_GBps" in report:
        lines.append(f"copy bandwidth: {report['copy_bandwidth_GBps']:.0f} GB/s")
    for r in report.get("alpha_gradient", []):
        extra = f", {r['speedup_vs_float_stack']:.1f}x float-stack" if "speedup_vs_float_stack" in r else ""
        lines.append(f"one-shot alpha-grad {r['model']:6s} k={r['k']:5d}: {r['ours_s'] * 1e3:8.3f} ms = {r['ours_vs_floor']:.2f}x HBM floor{extra}")
    for r in report.get("bank_ops", []):
        lines.append(f"{r['backend']:7s} k={r['k']}: mask_dot {r['mask_dot_vs_floor']:.2f}x floor, superpose {r['superpose_vs_floor']:.2f}x floor, rel err {r['rel_err']:.1e}")
    for b in report.get("batched_inference", []):
        lines.append(f"batched inference {b['model']} q={b['queries']} k={b['k']}: {b['batched_per_query_s'] * 1e3:.3f} ms per query, "
                     f"{b['speedup_per_query']:.1f}x one-shot passes, same argmin {b['same_argmin_first8']}")
    for r in report.get("forward", []):
        if "what" in r:
            lines.append(f"{r['what']} b={r['batch']}: the graph is {r['speedup_vs_cublas']:.2f}x faster than eager")
        else:
            lines.append(f"forward {r['dtype']:12s} b={r['batch']:5d} {r['backend']:7s}: {r['speedup_vs_cublas']:.2f}x cuBLAS")
    for s in report.get("training_step", []):
        lines.append(f"training step {s.get('model', '')} b={s['batch']}: {s['ours_vs_plain_speed']:.2f}x plain torch STE, "
                     f"{s['ours_vs_gemm_floor']:.2f}x the three-GEMM floor")
    n = report.get("nccl")
    if n:
        lines.append(f"{n['backend']} collectives: all_reduce {n['all_reduce_ok']}, gather {n['gather_ok']}, sharded path vs one process "
                     f"max |diff| {n['sharded_alpha_max_abs_diff']:.1e} (batched {n['sharded_batched_max_abs_diff']:.1e}), same argmin {n['same_argmin']}")
    return "\n".join(lines)


def main() -> int:
    if DEV.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible (use --smoke for a CPU run of the script)", file=sys.stderr)
        return 2
    import traceback
    import triton
    from supsup_fast.bench.report import stamp
    backends = [b for b in ("triton", "cuda") if b in ops.available()] if DEV.type == "cuda" else ["triton"]
    if not backends:  # every section would time the reference backend on the GPU
        print(f"gpu_check: neither the triton nor the cuda backend loaded (available: {ops.available()}); "
              "install the package (pip install --no-deps --no-build-isolation -e .) first", file=sys.stderr)
        return 2
    report = {"machine": {"gpu": torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu (smoke)",
                          "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
                          "backends": ops.available()}, **stamp(), "errors": {}}
    slug = re.sub(r"[^a-z0-9]+", "-", report["machine"]["gpu"].lower()).strip("-")
    out = Path(ARGS.out) / f"gpu-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def section(name: str, fn: Callable[[], object]) -> None:
        """Run one part; a failure is recorded and the rest still runs. The JSON is rewritten after
        every part, so a run cut short keeps what it measured."""
        start = time.perf_counter()
        try:
            report[name] = fn()
        except Exception:
            report["errors"][name] = traceback.format_exc()
            print(f"gpu_check: {name} failed:\n{report['errors'][name]}", file=sys.stderr)
        print(f"gpu_check: {name} done in {time.perf_counter() - start:.0f} s", flush=True)
        out.write_text(json.dumps(report, indent=2))
        if DEV.type == "cuda":
            torch.cuda.empty_cache()

    small = ARGS.smoke
    bw = copy_bandwidth()
    report["copy_bandwidth_GBps"] = bw / 1e9
    section("alpha_gradient", lambda: bench_alpha([3] if small else [250, 2500], 3 if small else 250, bw)
            + bench_alpha([3] if small else [250, 2500], 0, bw, "lenet"))
    section("bank_ops", lambda: bench_bank_ops(5 if small else 2500, bw, backends))
    section("batched_inference", lambda: [bench_batched(3 if small else k, 4 if small else 64, name)
                                          for name, k in (("fc1024", 2500), ("lenet", 2500))])
    section("forward", lambda: bench_forward([1, 16] if small else [1, 16, 128, 1024, 8192], 64 if small else 1024, backends))
    section("training_step", lambda: [dict(bench_training_step(8 if small else 128, device=str(DEV), timer=timer, model_name=m), model=m)
                                      for m in ("lenet", "fc1024")])
    section("nccl", nccl_check)
    if not ARGS.skip_tests and not small:
        section("tests", lambda: run_tests(ARGS.test_time_limit))
    print(table(report))
    print(f"wrote {out}")
    if DEV.type == "cuda" and not ARGS.no_table_update and "cuda" in backends and report.get("bank_ops"):
        winner = {}
        by = {r["backend"]: r for r in report["bank_ops"]}
        winner["mask_dot"] = min(by, key=lambda n: by[n]["mask_dot_s"])
        winner["superpose"] = min(by, key=lambda n: by[n]["superpose_s"])
        sg = {r["backend"]: r["ours_s"] for r in report.get("forward", []) if r["dtype"] == "2-bit signed" and r["batch"] == 1}
        if sg:
            winner["signed_gemv"] = min(sg, key=sg.get)
        table_path = ROOT / "supsup_fast" / "ops" / "gpu_op_table.json"
        table_path.write_text(json.dumps({"note": f"measured by benchmarks/gpu_check.py on {report['machine']['gpu']}",
                                          "winner": winner}, indent=2) + "\n")
        print(f"wrote {table_path}: {winner}")
    ok = report.get("tests", {}).get("returncode", 0) == 0 and not report["errors"]
    return 0 if ok else 1

if __name__ == "__main__":
    sys.exit(main())
