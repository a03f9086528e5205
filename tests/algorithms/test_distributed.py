"""Real 2-rank gloo jobs on the CPU through torchrun, against one process on the same settings."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from supsup_fast.runs import maskfile

RUN = ["--scenario", "GNu", "--model", "lenet", "--output-size", "100", "--iters", "40", "--train-subset", "1000",
       "--no-progress"]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def single(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "supsup_fast", *args], env=_env(), capture_output=True, text=True,
                          timeout=600)


def torchrun_cmd(*args: str, ranks: int = 2) -> list:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
            "-m", "supsup_fast", *args]


def torchrun(*args: str, ranks: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_cmd(*args, ranks=ranks), env=_env(), capture_output=True, text=True, timeout=600)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def assert_same_model(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    ok(single("run", *RUN, "--tasks", "4", "--eval-at", "2", "--out", str(out)))
    return out


def test_task_parallel_masks_and_results_equal_one_process(single_run, tmp_path):
    out = tmp_path / "dist"
    proc = ok(torchrun("run", *RUN, "--tasks", "4", "--eval-at", "2", "--out", str(out)))
    assert proc.stdout.count("average accuracy") == 1  # rank 0 alone reports
    assert_same_model(single_run, out)
    a, b = results(single_run), results(out)
    for key in ("per_task_accuracy", "per_task_inference_accuracy", "accuracy_after_training", "average_accuracy"):
        assert a[key] == b[key], key
    assert [r["accuracy"] for r in a["accuracy_matrix"]] == [r["accuracy"] for r in b["accuracy_matrix"]]
    assert b["distributed"]["world_size"] == 2 and b["distributed"]["backend"] == "gloo"
    assert b["distributed"]["parallel"] == "task"
    assert set(b["timing"]["eval_by_tasks_learned"]) == {"2", "4"}
    assert a["distributed"] == {"world_size": 1, "backend": None, "parallel": "single", "shard_bank": False,
                                "bank_bytes_per_rank": [a["mask_bytes"]]}


def test_resume_at_another_world_size(single_run, tmp_path):
    out = tmp_path / "run"
    ok(torchrun("run", *RUN, "--tasks", "4", "--eval-at", "2", "--out", str(out)))
    # As if the run had stopped after two tasks: their checkpoints and config only.
    for t in (2, 3):
        (out / "checkpoints" / f"task_{t:05d}.safetensors").unlink()
    for name in ("model.safetensors", "results.json", "progress.json"):
        (out / name).unlink()
    ok(single("run", *RUN, "--tasks", "4", "--eval-at", "2", "--out", str(out), "--resume"))
    assert_same_model(single_run, out)
    assert results(out)["per_task_accuracy"] == results(single_run)["per_task_accuracy"]
    assert results(out)["timing"]["tasks_resumed"] == 2


SGD = ["--optimizer", "sgd", "--lr", "0.1"]


def differing_mask_bits(a: Path, b: Path) -> tuple:
    """(mask bits that differ, mask bits in all) between two runs' models."""
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    banks = [key for key in ta if key.startswith("bank/")]
    differ = sum(int(np.unpackbits(torch.bitwise_xor(ta[k], tb[k]).numpy().view(np.uint8)).sum()) for k in banks)
    return differ, sum(32 * ta[k].numel() for k in banks)


def test_data_parallel_trains_the_same_masks(tmp_path):
    # With SGD one process and each rank take the same autograd step; DDP's average is the
    # whole-batch gradient up to summation order, so the scores agree to float rounding and an SGD
    # step is proportional to the gradient. In this short run (24 steps) no score ends within
    # rounding of 0, so the masks are the same bits; longer runs differ in a few (README).
    alone, out = tmp_path / "one", tmp_path / "dp"
    ok(single("run", *RUN, *SGD, "--tasks", "4", "--eval-at", "2", "--out", str(alone)))
    ok(torchrun("run", *RUN, *SGD, "--tasks", "4", "--eval-at", "2", "--parallel", "data", "--out", str(out)))
    assert results(out)["distributed"]["parallel"] == "data"
    assert_same_model(alone, out)


def test_data_parallel_rmsprop_agrees_with_the_fused_step(single_run, tmp_path):
    # With RMSprop one process takes the fused step, whose GEMMs may sum in another order than the
    # ranks' autograd (the CPU bits step does), and RMSprop's first steps are lr·g/|g|-sized: where
    # g is near 0 a rounding difference becomes a whole step, and a mask bit flipped by it changes
    # every later gradient. So the masks agree to a fraction of a percent, the accuracies to a point.
    out = tmp_path / "dp"
    ok(torchrun("run", *RUN, "--tasks", "4", "--eval-at", "2", "--parallel", "data", "--out", str(out)))
    differ, total = differing_mask_bits(single_run, out)
    assert differ <= 0.005 * total, (differ, total)
    for a, b in zip(results(single_run)["per_task_accuracy"], results(out)["per_task_accuracy"]):
        assert abs(a - b) <= 0.02, (a, b)


def test_transfer_is_never_run_task_parallel(tmp_path):
    proc = torchrun("run", *RUN, "--tasks", "2", "--transfer", "--parallel", "task", "--out", str(tmp_path / "t"))
    assert proc.returncode != 0
    assert "--parallel task cannot run --transfer" in proc.stderr


def test_sharded_evaluation_equals_unsharded(single_run, tmp_path):
    for extra in ([], ["--inference", "binary", "--objective", "superfluous"]):
        plain, sharded = tmp_path / f"plain{len(extra)}", tmp_path / f"sharded{len(extra)}"
        ok(single("evaluate", str(single_run), *extra, "--out", str(plain), "--no-progress"))
        ok(torchrun("evaluate", str(single_run), *extra, "--shard-bank", "--out", str(sharded), "--no-progress"))
        a, b = results(plain), results(sharded)
        assert a["per_task_accuracy"] == b["per_task_accuracy"]
        assert a["per_task_inference_accuracy"] == b["per_task_inference_accuracy"]
        per_rank = b["distributed"]["bank_bytes_per_rank"]
        assert len(per_rank) == 2 and max(per_rank) <= 0.6 * b["mask_bytes"] and sum(per_rank) == b["mask_bytes"]
        # the whole bank's summary from the ranks' ranges; the run's mask file copied, never assembled
        for key in ("num_masks", "mask_bytes", "bn_bytes", "output_size"):
            assert a[key] == b[key], key
        assert b["mask_entropy_bytes"] == pytest.approx(a["mask_entropy_bytes"], rel=1e-12)
        assert (sharded / "model.safetensors").read_bytes() == (single_run / "model.safetensors").read_bytes()


def test_sharded_evaluation_failures_reach_every_rank(single_run, tmp_path):
    # A corrupt checkpoint in rank 1's range, and a folder another process holds: both ranks say what
    # failed (not one the cause and the other a lost connection).
    run = tmp_path / "run"
    shutil.copytree(single_run, run)
    ck = run / "checkpoints" / "task_00003.safetensors"
    blob = bytearray(ck.read_bytes())
    blob[-1] ^= 1
    ck.write_bytes(bytes(blob))
    proc = torchrun("evaluate", str(run), "--shard-bank", "--out", str(tmp_path / "e1"), "--no-progress")
    assert proc.returncode != 0
    assert "error (rank 1): " in proc.stderr and "task_00003.safetensors" in proc.stderr
    assert "error (rank 0): rank 1 could not read its range of the masks" in proc.stderr, proc.stderr[-3000:]
    # A damaged model.safetensors: no rank loads it, so it is verified (streamed) before its metadata
    # is trusted or the file copied to the evaluation's folder.
    shutil.copy(single_run / "checkpoints" / "task_00003.safetensors", ck)
    model_file = run / "model.safetensors"
    blob = bytearray(model_file.read_bytes())
    blob[-1] ^= 1
    model_file.write_bytes(bytes(blob))
    proc = torchrun("evaluate", str(run), "--shard-bank", "--out", str(tmp_path / "e3"), "--no-progress")
    assert proc.returncode != 0
    for rank in (0, 1):
        assert f"error (rank {rank}): {model_file} failed its checksum" in proc.stderr, proc.stderr[-3000:]
    assert "--resume` writes it again" in proc.stderr and not (tmp_path / "e3" / "model.safetensors").exists()
    from supsup_fast.runs.rundir import RunLock
    lock = RunLock(tmp_path / "e2").acquire()
    try:
        proc = torchrun("evaluate", str(single_run), "--out", str(tmp_path / "e2"), "--no-progress")
    finally:
        lock.release()
    assert proc.returncode != 0
    for rank in (0, 1):
        assert f"error (rank {rank}): {tmp_path / 'e2'} is in use by another run" in proc.stderr, proc.stderr[-3000:]


def _worker_pids(parent: int) -> list:
    kids = Path(f"/proc/{parent}/task/{parent}/children")
    return [int(p) for p in kids.read_text().split()] if kids.exists() else []


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc to find torchrun's workers")
def test_killed_rank_loses_no_finished_task(single_run, tmp_path):
    out = tmp_path / "killed"
    args = ("run", *RUN, "--tasks", "4", "--eval-at", "2", "--iters", "400", "--out", str(out))
    proc = subprocess.Popen(torchrun_cmd(*args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = out / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and not (ckpts.exists() and any(ckpts.glob("task_*.safetensors"))):
        time.sleep(0.2)
    workers = _worker_pids(proc.pid)
    assert workers, "torchrun started no workers"
    os.kill(workers[-1], signal.SIGKILL)
    proc.wait(timeout=300)
    assert proc.returncode != 0
    finished = sorted(ckpts.glob("task_*.safetensors"))
    assert finished  # a write the kill cut short left only its temporary (task_N.safetensors.<random>.tmp)
    for f in finished:
        maskfile.read_mask_file(f)  # whole and verified: written atomically
    before = {f.name: f.read_bytes() for f in finished}
    ok(single("run", *args[1:], "--resume"))
    assert results(out)["timing"]["tasks_resumed"] >= len(finished)
    assert not list(ckpts.glob("*.tmp"))  # the finished run removed the temporaries of killed writes
    for name, data in before.items():  # resume kept them, did not retrain them
        assert (ckpts / name).read_bytes() == data
    # The same settings with --iters 400 in one process give the same masks.
    ref = tmp_path / "ref"
    ok(single(*args[:-1], str(ref)))
    assert_same_model(ref, out)


def test_python_dash_m_is_the_cli():
    proc = subprocess.run([sys.executable, "-m", "supsup_fast", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "run" in proc.stdout and "evaluate" in proc.stdout


def test_nns_runs_data_parallel_and_decides_as_one_process(tmp_path):
    args = ["run", "--scenario", "NNs", "--model", "lenet", "--output-size", "100", "--tasks", "3", "--iters", "120",
            "--train-subset", "1000", "--nns-check-every", "50", "--batch-size", "127", "--no-progress"]
    ok(single(*args, "--out", str(tmp_path / "s")))
    ok(torchrun(*args, "--out", str(tmp_path / "d")))  # 127 = 64 + 63 images per rank
    a, b = results(tmp_path / "s"), results(tmp_path / "d")
    assert b["distributed"]["parallel"] == "data"
    assert a["nns"]["decisions"] == b["nns"]["decisions"]  # the same allocation decisions, all of them
    assert_same_model(tmp_path / "s", tmp_path / "d")
    assert a["per_task_accuracy"] == b["per_task_accuracy"]


BATCHED_CHECK = """
import json, sys, torch
from supsup_fast.runs import maskfile
from supsup_fast.algorithms.sharded import ShardedModel
from supsup_fast.data import load_benchmark
from supsup_fast.distributed import init_from_env, shard_range
from supsup_fast.models import build_model
run = sys.argv[1]
ctx, _ = init_from_env("cpu")
meta = maskfile.read_metadata(run + "/model.safetensors")
model = build_model(**json.loads(meta["model_spec"]))
own = shard_range(4, ctx)
for t in own:
    maskfile.load_masks(model, f"{run}/checkpoints/task_{t:05d}.safetensors", first_task=t)
sharded = ShardedModel(model, ctx, own.start, 4)
tasks = load_benchmark("permuted-mnist", 4, 1)
xs = torch.cat([next(iter(tasks.test(t).batches(128, shuffle=False)))[0][:3] for t in range(4)])
batched = sharded.alpha_gradients_batched(xs, "entropy", 10)
one_by_one = torch.stack([sharded.alpha_gradients(xs[j:j + 1], "entropy", 10) for j in range(len(xs))])
full = maskfile.load_model(run + "/model.safetensors")
from supsup_fast.algorithms.inference import alpha_gradient
single = torch.stack([alpha_gradient(full, xs[j:j + 1], "entropy", 10) for j in range(len(xs))])
assert torch.allclose(batched, one_by_one, atol=1e-5), (batched - one_by_one).abs().max()
assert torch.allclose(batched, single, atol=1e-5), (batched - single).abs().max()
assert batched.argmin(1).tolist() == single.argmin(1).tolist()
"""


def test_sharded_alpha_gradients_equal_one_process(single_run, tmp_path):
    script = tmp_path / "check.py"
    script.write_text(BATCHED_CHECK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           str(single_run)]
    ok(subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600))


def test_run_with_a_sharded_bank_equals_one_process(single_run, tmp_path):
    out = tmp_path / "sharded-run"
    ok(torchrun("run", *RUN, "--tasks", "4", "--eval-at", "2", "--shard-bank", "--out", str(out)))
    a, b = results(single_run), results(out)
    assert [r["accuracy"] for r in a["accuracy_matrix"]] == [r["accuracy"] for r in b["accuracy_matrix"]]
    assert a["per_task_inference_accuracy"] == b["per_task_inference_accuracy"]
    assert b["distributed"]["shard_bank"] and max(b["distributed"]["bank_bytes_per_rank"]) <= 0.6 * b["mask_bytes"]
    assert_same_model(single_run, out)  # written from the checkpoints: no rank assembles the bank
    # resumed when finished: no evaluation runs, and the summary still comes from the checkpoints; a
    # changed resumable setting is written to config.json by rank 0 once the ranks checked the checkpoints
    ok(torchrun("run", *RUN, "--tasks", "4", "--eval-at", "2", "--shard-bank", "--out", str(out), "--resume",
                "--backend", "cpu"))
    assert json.loads((out / "config.json").read_text())["backend"] == "cpu"
    for c in (b, results(out)):
        for key in ("num_masks", "mask_bytes", "bn_bytes"):
            assert a[key] == c[key], key
        assert c["mask_entropy_bytes"] == pytest.approx(a["mask_entropy_bytes"], rel=1e-12)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_through_a_c10d_rendezvous(single_run, tmp_path):
    """Multi-node launch without code changes: two torchrun agents (as on two hosts) meet at one
    c10d rendezvous on loopback and share the run folder."""
    out, port = tmp_path / "nodes", _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "supsup-test",
           "-m", "supsup_fast", "run", *RUN, "--tasks", "4", "--eval-at", "2", "--out", str(out)]
    agents = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    outputs = [a.communicate(timeout=600) for a in agents]
    assert all(a.returncode == 0 for a in agents), outputs
    assert results(out)["distributed"]["world_size"] == 2
    assert_same_model(single_run, out)


BN_STEP_CHECK = """
import os, sys, torch
from torch import nn
from supsup_fast.algorithms.data_parallel import train_task_data_parallel
from supsup_fast.algorithms.training import TrainSettings, train_task
from supsup_fast.data.tasks import TaskSplit
from supsup_fast.distributed import init_from_env, shutdown
from supsup_fast.nn import MultitaskBatchNorm, SupermaskLinear, supermask_layers

def model():
    torch.manual_seed(0)
    return nn.Sequential(SupermaskLinear(24, 32, seed=1), MultitaskBatchNorm(32), nn.ReLU(),
                         SupermaskLinear(32, 5, seed=2))

ctx, _ = init_from_env("cpu")
g = torch.Generator().manual_seed(3)
x = torch.randn(200, 24, generator=g) * 3 + 1  # batch statistics far from the init (0, 1)
split = TaskSplit(x, torch.randint(0, 5, (200,), generator=g))
settings = TrainSettings(iters=6, epochs=1, batch_size=50, lr=0.05, optimizer="sgd")
dp = model()
train_task_data_parallel(dp, split, settings, ctx, device=torch.device("cpu"), generator=torch.Generator().manual_seed(7))
one = model()
train_task(one, split, settings, device=torch.device("cpu"), generator=torch.Generator().manual_seed(7))
bn_dp, bn_one = dp[1], one[1]
torch.testing.assert_close(bn_dp.means.rows[0], bn_one.means.rows[0], rtol=1e-4, atol=1e-5)
torch.testing.assert_close(bn_dp.vars.rows[0], bn_one.vars.rows[0], rtol=1e-4, atol=1e-5)
for (name, a), b in zip(supermask_layers(dp).items(), supermask_layers(one).values()):
    assert torch.equal(a.bank.words, b.bank.words), name
shutdown(ctx)
# One file per rank: two ranks printing to one pipe can interleave their lines.
open(os.path.join(sys.argv[1], f"ok{ctx.rank}"), "w").close()
"""


def test_data_parallel_step_with_batchnorm_equals_one_process(tmp_path):
    # BatchNorm in training mode normalises with the statistics of the whole batch on every rank,
    # so a data-parallel task (each rank trains on half of every batch) ends with the same masks and
    # the same running statistics as one process on the whole batch. Per-rank statistics would
    # not: the averaged variances miss the spread between the halves.
    script = tmp_path / "bn_check.py"
    script.write_text(BN_STEP_CHECK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), str(tmp_path)]
    ok(subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600))
    assert (tmp_path / "ok0").exists() and (tmp_path / "ok1").exists()
