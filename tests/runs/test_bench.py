"""The benchmark helpers measure the right things (no timings asserted here)."""
import pytest
import torch

import supsup_fast as ss
import supsup_fast.nn as snn
from supsup_fast.algorithms.inference import alpha_gradient
from supsup_fast.bench import FloatStackMLP, ops_alpha_gradient, random_model_with_masks


def test_random_banks_are_canonical():
    model = random_model_with_masks("lenet", 100, 3)
    for layer in snn.supermask_layers(model).values():
        words = layer.bank.words
        assert words.shape[0] == 3
        bits = ss.unpack_bits(words, layer.n)
        assert torch.equal(ss.pack_bits(bits), words)  # pad bits are zero
        assert 0.45 < bits.float().mean() < 0.55


def test_float_stack_baseline_agrees_with_ours():
    model = random_model_with_masks("fc1024", 500, 4)
    x = torch.randn(1, 784)
    assert torch.allclose(FloatStackMLP(model).alpha_gradient(x), alpha_gradient(model, x, "entropy", 10),
                          rtol=1e-3, atol=1e-7)


def test_ops_alpha_gradient_agrees_with_the_float_stack_with_and_without_copies():
    """The general-α contender of benchmarks/kernels2.py and bank_copies.py: at a uniform α it is the
    float stack's gradient, and the layers' copies change nothing beyond summation order."""
    model = random_model_with_masks("lenet", 50, 20, seed=3)
    layers = list(snn.supermask_layers(model).values())
    x, k = torch.randn(1, 784), 20
    expect = FloatStackMLP(model).alpha_gradient(x)
    uniform = torch.full((k,), 1.0 / k)
    copies_t = [l.bank.interleaved() for l in layers]
    copies_w = [ss.ops.interleave_weights(l.bank.words, l.n) for l in layers]
    for t, w in ((None, None), (copies_t, None), (copies_t, copies_w)):
        got = ops_alpha_gradient(layers, x, uniform, t, w)
        assert torch.allclose(got, expect, rtol=1e-3, atol=1e-7)


def test_quick_report_writes_json_and_png(tmp_path, monkeypatch, capsys):
    import supsup_fast.bench as bench
    monkeypatch.setattr(bench, "read_bandwidth", lambda: 1e10)
    report = bench.run_report(tmp_path, quick=True)
    err = capsys.readouterr().err  # a line as each of the five suites starts and ends
    assert [line.split(" ", 2)[1] for line in err.splitlines() if line.startswith("bench [")] == \
        ["[1/5]", "[1/5]", "[2/5]", "[2/5]", "[3/5]", "[3/5]", "[4/5]", "[4/5]", "[5/5]", "[5/5]"]
    assert "α-gradient, FC1024 s=500, k = 1, 10 ..." in err and "done in" in err
    name = f"cpu-{report['machine']['backend']}-quick"
    assert (tmp_path / f"{name}.json").exists()
    assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    rows = report["alpha_gradient_fc1024_s500"]
    assert all(r["same_argmin"] and r["rel_err"] < 1e-3 for r in rows if "rel_err" in r)
    title = bench.report.report_title(report["machine"])  # the plot names the ISA it ran on
    assert f"{report['machine']['backend']} backend" in title and report["machine"]["torch_cpu_capability"] in title
    if report["machine"]["backend"] == "cpu":
        assert f"({report['machine']['cpu_isa']} kernels)" in title
    import json
    import re
    saved = json.loads((tmp_path / f"{name}.json").read_text())  # stamped with when and which commit
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", saved["date"]) and re.fullmatch(r"[0-9a-f]{7,}(\+dirty)?|unknown", saved["commit"])


def test_report_title_names_the_kernels_isa_and_torchs():
    from supsup_fast.bench.report import report_title
    info = {"cpu_model": "AMD EPYC", "microarchitecture": "Zen 5", "threads": 2, "backend": "cpu", "cpu_isa": "avx2",
            "torch": "2.13.0+cpu", "torch_cpu_capability": "AVX2"}
    assert report_title(info) == ("supsup_fast on AMD EPYC (Zen 5), 2 threads, cpu backend (avx2 kernels), "
                                  "torch 2.13.0+cpu (AVX2)")
    info.update(backend="reference", cpu_isa=None)
    assert "reference backend, torch" in report_title(info)


def test_gpu_check_script_runs_in_smoke_mode(tmp_path):
    """benchmarks/gpu_check.py is only timed on a GPU machine; --smoke runs all of its code paths on
    the CPU (Triton interpreter, tiny sizes) so that the script itself cannot rot."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu-cpu-smoke.json").read_text())
    assert {"alpha_gradient", "bank_ops", "batched_inference", "forward", "training_step", "nccl"} <= set(report)
    assert report["errors"] == {}
    assert all(b["same_argmin_first8"] for b in report["batched_inference"])
    assert report["nccl"]["all_reduce_ok"] and report["nccl"]["same_argmin"]
    assert report["nccl"]["sharded_alpha_max_abs_diff"] < 1e-5
    assert report["bank_ops"][0]["rel_err"] < 1e-5


def test_training_step_benchmark_times_loops_and_single_steps():
    from supsup_fast.bench import bench_training_step
    r = bench_training_step(batch=8, repeats=1, model_name="lenet", block=3)
    assert r["steps_per_sample"] == 3 and r["model"] == "lenet" and r["batch"] == 8
    for key in ("ours_s", "plain_torch_ste_s", "three_gemms_s"):
        assert r[key] > 0 and r["single_call"][key] > 0
    assert r["ours_vs_plain_speed"] == r["plain_torch_ste_s"] / r["ours_s"]
    with pytest.raises(ValueError, match="block must be >= 1"):
        bench_training_step(batch=8, repeats=1, model_name="lenet", block=0)
