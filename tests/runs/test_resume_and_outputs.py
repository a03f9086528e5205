"""Issue #16, behaviour checks for what the suite proved too little or not at all: forgetting /
BWT values, conv nets with BN under superposition, a GNs run trained and scored, the superfluous
objective and binary inference finding the task, `evaluate` errors, `demo`, `bench --quick`, a
model file holding only some tasks, a Hopfield checkpoint from another model, GG and HopSupSup
resumed between tasks."""
import json
import re

import pytest
import torch
import torch.nn.functional as F

import supsup_fast.nn as snn
from supsup_fast.atomic_files import atomic_write_bytes
from supsup_fast.runs import maskfile
from supsup_fast.runs import supsup as exp_mod
from supsup_fast.runs import evaluate_run, run_experiment
from supsup_fast.algorithms.metrics import cl_metrics
from supsup_fast.cli import main
from supsup_fast.runs.config import make_config
from supsup_fast.models import build_model
from supsup_fast.nn.batchnorm import MultitaskBatchNorm
from supsup_fast.runs.maskfile import MaskFileError
from supsup_fast.runs.rundir import RunDirError

SMALL = dict(model="lenet", tasks=3, iters=40, train_subset=1500, lr=1e-3, output_size=100)


def interrupt_after(monkeypatch, module, tasks):
    real = module.train_task
    calls = []

    def crashing(*args, **kw):
        if len(calls) == tasks:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kw)

    monkeypatch.setattr(module, "train_task", crashing)


def run_interrupted(monkeypatch, cfg, out, tasks):
    """A run of ``cfg`` into ``out`` stopped (Ctrl-C) as it starts training task ``tasks``."""
    interrupt_after(monkeypatch, exp_mod, tasks)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, out, progress=False)
    monkeypatch.undo()


def banks(model):
    return {n: l.bank.words.clone() for n, l in snn.supermask_layers(model).items()}


# -- metrics --------------------------------------------------------------------------------------
def test_forgetting_and_backward_transfer_on_a_hand_computed_example():
    after = [0.90, 0.80, 0.70]        # R[j], right after training task j
    final = [0.85, 0.60, 0.70]        # F[j], at the end
    history = [[0.95, 0.70]]          # an eval_at point after 2 tasks: task 0 was best there
    m = cl_metrics(after, final, history)
    # BWT = ((0.85 - 0.90) + (0.60 - 0.80)) / 2; forgetting = ((0.95 - 0.85) + (0.80 - 0.60)) / 2
    assert m["backward_transfer"] == pytest.approx(-0.125)
    assert m["forgetting"] == pytest.approx(0.15)
    assert cl_metrics(after, final) == pytest.approx({"backward_transfer": -0.125, "forgetting": 0.125})
    assert cl_metrics([0.5], [0.4]) == {"backward_transfer": 0.0, "forgetting": 0.0}
    assert cl_metrics([0.5, 0.5], [0.7, 0.1])["backward_transfer"] == pytest.approx(0.2)  # the last task never counts


# -- conv nets and BatchNorm under superposition ----------------------------------------------------
@pytest.fixture(scope="module")
def conv_net():
    torch.manual_seed(0)
    model = build_model("gemresnet18", 10, seed=2)
    for t in range(3):
        snn.begin_task(model, generator=torch.Generator().manual_seed(t))
        model.train()
        with torch.no_grad():  # give each task its own BN statistics
            model(torch.randn(8, 3, 32, 32) * (t + 1))
        snn.finish_task(model)
    model.eval()
    return model


def test_conv_net_superposition_of_one_task_is_that_task_with_batch_statistics(conv_net, monkeypatch):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        superposed = []
        for t in range(3):
            with snn.superposition(conv_net, F.one_hot(torch.tensor(t), 3).float()):
                superposed.append(conv_net(x))
        with snn.superposition(conv_net, torch.full((3,), 1 / 3), uniform=True):
            uniform_cached = conv_net(x)
        with snn.superposition(conv_net, torch.full((3,), 1 / 3)):
            uniform_general = conv_net(x)
        snn.set_task(conv_net, 1)
        own_stats = conv_net(x)
        # Superposed BN normalises with the batch's own statistics; so does this reference:
        monkeypatch.setattr(MultitaskBatchNorm, "forward",
                            lambda self, h: F.batch_norm(h, None, None, None, None, True, 0.0, self.eps))
        single = []
        for t in range(3):
            snn.set_task(conv_net, t)
            single.append(conv_net(x))
    for t in range(3):
        torch.testing.assert_close(superposed[t], single[t], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(superposed[0], superposed[1])  # the masks differ
    assert not torch.allclose(own_stats, single[1], atol=1e-3)  # task mode uses the task's own BN stats
    torch.testing.assert_close(uniform_cached, uniform_general, rtol=1e-4, atol=1e-4)


def test_conv_net_alpha_gradient_is_finite_and_per_task(conv_net):
    from supsup_fast.algorithms.inference import alpha_gradient
    g = alpha_gradient(conv_net, torch.randn(2, 3, 32, 32), "entropy", 10)
    assert g.shape == (3,) and torch.isfinite(g).all() and g.abs().sum() > 0


# -- a trained GNu run, evaluated under other settings ---------------------------------------------
@pytest.fixture(scope="module")
def gnu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gnu") / "run"
    res = run_experiment(make_config(overrides=SMALL), out, progress=False)
    return out, res


def test_gns_run_trained_and_scored(tmp_path):
    gns = run_experiment(make_config(overrides=dict(SMALL, scenario="GNs")), tmp_path / "gns", progress=False)
    gg = evaluate_run(tmp_path / "gns", {"scenario": "GG"}, tmp_path / "gg", progress=False)
    assert gns["config"]["scenario"] == "GNs" and gns["task_inference_accuracy"] >= 0.9
    assert gns["average_accuracy"] > 0.7  # chance is 0.1
    # GNs differs from GG only on the batches whose task was inferred wrong.
    assert abs(gns["average_accuracy"] - gg["average_accuracy"]) <= 1 - gns["task_inference_accuracy"] + 1e-9
    if gns["task_inference_accuracy"] == 1.0:
        assert gns["per_task_accuracy"] == gg["per_task_accuracy"]


def test_superfluous_objective_and_binary_inference_find_the_task(gnu_run, tmp_path):
    out, gnu = gnu_run
    gg = evaluate_run(out, {"scenario": "GG"}, tmp_path / "gg", progress=False)
    for overrides in ({"objective": "superfluous"}, {"inference": "binary"},
                      {"inference": "binary", "infer_images": 16, "log_base": 3.0}):
        r = evaluate_run(out, overrides, tmp_path / "_".join(map(str, overrides.values())), progress=False)
        assert r["task_inference_accuracy"] >= 0.9, overrides
        assert abs(r["average_accuracy"] - gg["average_accuracy"]) <= 1 - r["task_inference_accuracy"] + 1e-9
        assert r["config"][list(overrides)[0]] == list(overrides.values())[0]


def test_evaluate_errors_are_one_line(gnu_run, tmp_path, capsys):
    out, _ = gnu_run
    cases = [([str(tmp_path / "nothing")], "not a finished run"),
             ([str(out), "--log-base", "1"], "--log-base"),
             ([str(out), "--infer-images", "0"], "--infer-images"),
             ([str(out), "--backend", "nope"], "--backend")]
    for argv, needle in cases:
        assert main(["evaluate", *argv, "--out", str(tmp_path / "ev"), "--no-progress"]) == 2, argv
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err


def test_model_file_holding_only_some_tasks(gnu_run, tmp_path):
    out, _ = gnu_run
    model = maskfile.load_model(out / "model.safetensors")
    maskfile.save_masks(model, tmp_path / "first2.safetensors", first_task=0, end_task=2)
    part = maskfile.load_model(tmp_path / "first2.safetensors")
    assert snn.num_tasks(part) == 2
    for name, words in banks(part).items():
        assert torch.equal(words, snn.supermask_layers(model)[name].bank.words[:2])
    maskfile.save_masks(model, tmp_path / "last.safetensors", first_task=2, end_task=3)
    with pytest.raises(MaskFileError, match="starts at task 2"):
        maskfile.load_model(tmp_path / "last.safetensors")
    # The tail appended to the two-task model completes it, bit for bit.
    maskfile.load_masks(part, tmp_path / "last.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(banks(part).values(), banks(model).values()))
    with pytest.raises(MaskFileError):
        maskfile.load_masks(part, tmp_path / "last.safetensors")  # task 2 again: not the next task


def test_evaluate_refuses_a_run_whose_model_file_lacks_tasks(gnu_run, tmp_path):
    """The run's own identity copied into a file that holds only 2 of its 3 tasks."""
    out, _ = gnu_run
    import shutil
    run = tmp_path / "run"
    shutil.copytree(out, run)
    meta = maskfile.read_metadata(out / "model.safetensors")
    extra = maskfile.parse_metadata(out / "model.safetensors", meta)[4]
    model = maskfile.load_model(run / "model.safetensors")
    maskfile.save_masks(model, run / "model.safetensors", first_task=0, end_task=2, extra=extra)
    with pytest.raises(ValueError, match="task"):
        evaluate_run(run, {}, tmp_path / "ev", progress=False)


# -- resume -----------------------------------------------------------------------------------------
def test_gg_resume_matches_uninterrupted(tmp_path, monkeypatch):
    cfg = make_config(overrides=dict(SMALL, scenario="GG", benchmark="split-mnist", output_size=None))
    full = run_experiment(cfg, tmp_path / "full", progress=False)
    interrupt_after(monkeypatch, exp_mod, 2)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "cut", progress=False)
    monkeypatch.undo()
    resumed = run_experiment(cfg, tmp_path / "cut", resume=True, progress=False)
    assert resumed["timing"]["tasks_resumed"] == 2
    assert resumed["per_task_accuracy"] == full["per_task_accuracy"] and resumed["task_inference_accuracy"] is None
    assert resumed["average_accuracy"] > 0.8
    a = maskfile.load_model(tmp_path / "full" / "model.safetensors")
    b = maskfile.load_model(tmp_path / "cut" / "model.safetensors")
    assert all(torch.equal(x, y) for x, y in zip(banks(a).values(), banks(b).values()))


HOP = dict(scenario="GNu", benchmark="split-mnist-10", model="bnnet", inference="hopfield", output_size=10, tasks=2,
           test_batch_size=64, hop_recovery_trials=1, train_subset=1000)


def test_hopsupsup_resumed_between_tasks_gives_the_same_recovery(tmp_path, monkeypatch):
    from supsup_fast.runs import hopsupsup as hopsupsup_run
    cfg = make_config(overrides=HOP)
    full = run_experiment(cfg, tmp_path / "full", progress=False)
    interrupt_after(monkeypatch, hopsupsup_run, 1)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "cut", progress=False)
    monkeypatch.undo()
    resumed = run_experiment(cfg, tmp_path / "cut", resume=True, progress=False)
    assert resumed["timing"]["tasks_resumed"] == 1
    for key in ("accuracy_after_training", "per_task_accuracy", "task_inference_accuracy"):
        assert resumed[key] == full[key], key
    assert resumed["hopsupsup"]["recovered_exactly"] == full["hopsupsup"]["recovered_exactly"]
    assert resumed["hopsupsup"]["first_exact_step"] == full["hopsupsup"]["first_exact_step"]
    assert min(full["accuracy_after_training"]) > 0.8  # the preset's training settings (the defaults here) learn


def test_hopfield_checkpoint_from_another_model_is_refused(tmp_path):
    from supsup_fast.runs.maskfile import load_hopfield_checkpoint as _load, save_hopfield_checkpoint as _save
    from supsup_fast.algorithms.hopsupsup import mask_layers
    model = build_model("bnnet", 10, seed=1)
    masks = [torch.rand(l.num_features) < 0.5 for l in mask_layers(model)]
    _save(tmp_path / "hop.safetensors", model, [masks], {"tasks_done": 1, "accuracy_after_training": [0.9],
                                                         "train_seconds": 1.0})
    extra, true_masks = _load(tmp_path / "hop.safetensors", build_model("bnnet", 10, seed=1))
    assert extra["tasks_done"] == 1 and all(torch.equal(a, b) for a, b in zip(true_masks[0], masks))
    for other in (build_model("bnnet", 10, seed=2), build_model("bnnet", 12, seed=1)):
        with pytest.raises(MaskFileError, match="not a Hopfield checkpoint of this model"):
            _load(tmp_path / "hop.safetensors", other)


# -- CLI: demo and bench ------------------------------------------------------------------------------
def test_demo_runs_the_demo_settings(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--tasks", "2", "--iters", "30", "--train-subset", "1000", "--lr", "1e-3",
                 "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    cfg = res["config"]
    assert (cfg["scenario"], cfg["benchmark"], cfg["model"], cfg["output_size"]) == ("GNu", "permuted-mnist", "lenet", 100)
    assert len(res["per_task_accuracy"]) == 2 and res["average_accuracy"] > 0.5
    assert "average accuracy" in capsys.readouterr().out


def test_bench_quick_from_the_cli(tmp_path, monkeypatch):
    import supsup_fast.bench as bench
    monkeypatch.setattr(bench, "read_bandwidth", lambda: 1e10)
    calls = []
    real = bench.run_report
    monkeypatch.setattr(bench, "run_report", lambda out, quick, backend, progress: calls.append((out, quick, backend, progress)) or {})
    assert main(["bench", "--quick", "--out", str(tmp_path), "--backend", "reference"]) == 0
    assert main(["bench", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    assert calls == [(tmp_path, True, "reference", True), (tmp_path, True, "auto", False)]
    assert real is not bench.run_report


def test_resume_accepts_changed_evaluation_settings_only(tmp_path, monkeypatch):
    cfg = make_config(overrides=SMALL)
    interrupt_after(monkeypatch, exp_mod, 2)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "run", progress=False)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="lr"):
        run_experiment(make_config(overrides=dict(SMALL, lr=5e-3)), tmp_path / "run", resume=True, progress=False)
    changed = make_config(overrides=dict(SMALL, objective="superfluous", inference="binary", infer_images=8,
                                         log_base=3.0, test_batch_size=100))
    res = run_experiment(changed, tmp_path / "run", resume=True, progress=False)
    assert res["timing"]["tasks_resumed"] == 2
    assert (res["config"]["objective"], res["config"]["infer_images"], res["config"]["log_base"]) == ("superfluous", 8, 3.0)
    assert res["task_inference_accuracy"] >= 0.9


def test_ctrl_c_on_the_cli_says_how_to_continue(tmp_path, monkeypatch, capsys):
    interrupt_after(monkeypatch, exp_mod, 1)
    out = tmp_path / "run"
    argv = ["run", "--model", "lenet", "--tasks", "2", "--iters", "20", "--train-subset", "500", "--out", str(out),
            "--no-progress"]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and f"`supsup-fast run --out {out} --resume`" in err and "Traceback" not in err
    assert (out / "checkpoints" / "task_00000.safetensors").is_file()
    monkeypatch.undo()
    assert main(argv + ["--resume"]) == 0
    assert len(json.loads((out / "results.json").read_text())["per_task_accuracy"]) == 2


def test_resume_on_the_cli_takes_the_runs_own_settings(tmp_path, monkeypatch, capsys):
    # `run --out OUT --resume` alone continues the run under OUT/config.json's settings, not the
    # defaults; a flag still overrides (an evaluation setting) or is refused (one that shapes the masks).
    interrupt_after(monkeypatch, exp_mod, 1)
    out = tmp_path / "run"
    argv = ["run", "--model", "lenet", "--tasks", "2", "--iters", "20", "--train-subset", "500", "--lr", "2e-3",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 130
    monkeypatch.undo()
    capsys.readouterr()
    saved = json.loads((out / "config.json").read_text())
    assert main(["run", "--out", str(out), "--resume", "--lr", "1e-3", "--no-progress"]) == 2
    assert "lr (0.002 -> 0.001)" in capsys.readouterr().err
    assert main(["run", "--out", str(out), "--resume", "--infer-images", "4", "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["timing"]["tasks_resumed"] == 1 and len(results["per_task_accuracy"]) == 2
    assert results["config"] == dict(saved, infer_images=4)


def test_resume_of_a_folder_without_a_run(tmp_path, capsys):
    # A mistyped --out with --resume alone would start a default run: refused. With the run's
    # settings given (a job that always passes --resume) it starts, saying so.
    assert main(["run", "--out", str(tmp_path / "typo"), "--resume", "--no-progress"]) == 2
    assert "holds no run to resume (no config.json); check --out" in capsys.readouterr().err
    out = tmp_path / "new"
    argv = ["run", "--model", "lenet", "--tasks", "1", "--iters", "5", "--train-subset", "300", "--out", str(out),
            "--resume", "--no-progress"]
    assert main(argv) == 0
    assert "holds no run yet; starting it" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["model"] == "lenet"


def test_resume_refuses_a_config_json_with_foreign_settings(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model": "lenet", "learning_rate": 0.1}))
    assert main(["run", "--out", str(out), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "config.json holds settings this version does not know: ['learning_rate']" in err
    (out / "config.json").write_text("[1, 2]")
    assert main(["run", "--out", str(out), "--resume", "--no-progress"]) == 2
    assert "must hold a JSON object" in capsys.readouterr().err


def test_resume_recomputes_evaluation_rows_of_other_evaluation_settings(tmp_path):
    # A row of progress.json computed under other evaluation settings is never reported as one of
    # these: an --eval-at point finished before the resume is evaluated again.
    small = dict(SMALL, tasks=3, eval_at=[2])
    first = run_experiment(make_config(overrides=small), tmp_path / "run", progress=False)
    changed = make_config(overrides=dict(small, objective="superfluous", infer_images=8))
    again = run_experiment(changed, tmp_path / "run", resume=True, progress=False)
    assert again["timing"]["tasks_resumed"] == 3
    old = {r["tasks_learned"]: r["eval_sha256"] for r in first["accuracy_matrix"]}
    new = {r["tasks_learned"]: r["eval_sha256"] for r in again["accuracy_matrix"]}
    assert set(new) == {2, 3} and all(new[k] != old[k] for k in new)
    fresh = evaluate_run(tmp_path / "run", dict(objective="superfluous", infer_images=8), tmp_path / "eval", progress=False)
    assert again["per_task_inference_accuracy"] == fresh["per_task_inference_accuracy"]


def test_a_directly_built_config_is_validated(tmp_path):
    from supsup_fast.runs.config import RunConfig
    with pytest.raises(ValueError, match="lr"):
        run_experiment(RunConfig(lr=float("inf"), tasks=1, iters=5), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_an_unavailable_backend_fails_before_any_file_is_written(tmp_path):
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        run_experiment(make_config(overrides=dict(SMALL, backend="cuda")), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "config.json").exists()


def test_corrupt_nns_checkpoint_names_the_file_to_delete(tmp_path):
    cfg = make_config(overrides=dict(SMALL, scenario="NNs", tasks=1))
    ck = tmp_path / "run" / "checkpoints"
    ck.mkdir(parents=True)
    (ck / "nns_latest.safetensors").write_bytes(b"garbage")
    (tmp_path / "run" / "config.json").write_text(json.dumps(cfg.to_dict()))
    with pytest.raises(RunDirError, match=r"nns_latest.safetensors is unusable: .*Delete it"):
        run_experiment(cfg, tmp_path / "run", resume=True, progress=False)


def test_shard_bank_refusals_come_before_training():
    from supsup_fast.distributed import DistContext
    from supsup_fast.runs.loop import parallel_mode
    two_ranks = DistContext(world_size=2, rank=0, backend="gloo")
    with pytest.raises(ValueError, match="--shard-bank does not apply to NNs"):
        parallel_mode(make_config(overrides=dict(SMALL, scenario="NNs", shard_bank=True)), two_ranks)
    assert parallel_mode(make_config(overrides=dict(SMALL, shard_bank=True)), two_ranks) == "task"


def test_a_failed_write_names_the_file_and_leaves_no_temporary(tmp_path):
    def full_disk(tmp):
        with open(tmp, "w") as fh:
            fh.write("partial")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match=r"could not write .*results.json: \[Errno 28\] No space left on device"):
        atomic_write_bytes(tmp_path / "results.json", full_disk)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_parts_of_an_earlier_run_folder_are_one_line_errors(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("not a folder")
    code = main(["run", "--tasks", "1", "--iters", "1", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "checkpoints is not a writable folder" in err and len(err.strip().splitlines()) == 1


def test_a_finished_run_removes_the_temporaries_of_killed_writes(tmp_path):
    out = tmp_path / "run"
    config = make_config(overrides=dict(SMALL, tasks=2, iters=5))
    run_experiment(config, out, progress=False)
    stale = [out / "checkpoints" / "task_00001.safetensors.k1ll3d.tmp", out / "results.json.x9.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    (out / "model.safetensors").unlink()
    run_experiment(config, out, resume=True, progress=False)
    assert not any(path.exists() for path in stale)
    assert (out / "checkpoints" / "task_00001.safetensors").is_file()


def test_cheap_refusals_come_before_the_data_and_the_kernels(tmp_path, monkeypatch):
    # A first use compiles the C++ kernels (about a minute): a wrong --data-root or an --out that
    # holds a run must not wait for that, nor an existing run for the data.
    from supsup_fast.runs import loop

    def no_backend(device):
        raise AssertionError("the backend was resolved before the refusal")

    monkeypatch.setattr(loop, "backend_for", no_backend)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
        run_experiment(make_config(overrides=dict(SMALL, data_root=str(empty))), tmp_path / "a", progress=False)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text("{}")
    monkeypatch.setattr(loop, "load_benchmark", lambda *a, **k: pytest.fail("the data was loaded before the refusal"))
    with pytest.raises(RunDirError, match="already holds a run; pass --resume"):
        run_experiment(make_config(overrides=SMALL), tmp_path / "b", progress=False)


def test_training_time_survives_an_interrupted_final_evaluation(tmp_path, monkeypatch):
    from supsup_fast.runs.loop import Experiment
    cfg = make_config(overrides=dict(SMALL, tasks=2, eval_at=[]))

    def interrupted(self, k, desc):
        raise KeyboardInterrupt

    monkeypatch.setattr(Experiment, "_evaluate_all", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "run", progress=False)
    monkeypatch.undo()
    res = run_experiment(cfg, tmp_path / "run", resume=True, progress=False)
    assert res["timing"]["tasks_resumed"] == 2 and res["timing"]["train"] > 0


def test_training_time_of_tasks_finished_before_an_interruption_is_kept(tmp_path, monkeypatch):
    # Killed inside a segment (no save of the wall time yet): the finished tasks' training time was lost,
    # and timing.train came out below the sum of the tasks' own training times.
    cfg = make_config(overrides=dict(SMALL, eval_at=[]))
    run_interrupted(monkeypatch, cfg, tmp_path / "run", 2)
    res = run_experiment(cfg, tmp_path / "run", resume=True, progress=False)
    timing = res["timing"]
    assert timing["tasks_resumed"] == 2 and timing["train"] >= timing["train_task_seconds_sum"] > 0
    again = run_experiment(cfg, tmp_path / "run", resume=True, progress=False)  # nothing left: nothing added twice
    assert again["timing"]["train"] == timing["train"]


@pytest.mark.parametrize("eval_at", [[], [1]])  # [1]: the finished task lies in a segment with nothing left to do
def test_a_resume_on_another_backend_is_said_and_recorded(tmp_path, monkeypatch, eval_at):
    # Another backend (or instruction set) sums in another order: the tasks trained after the resume
    # may differ in a few bits from an uninterrupted run. Said at the resume, and kept in results.json.
    cfg = make_config(overrides=dict(SMALL, eval_at=eval_at))
    run_interrupted(monkeypatch, cfg, tmp_path / "run", 1)
    first = next(iter(run_experiment(cfg, tmp_path / "same", progress=False)["trained_on"]))
    with pytest.warns(UserWarning, match=r"this resume trains on reference, torch .*, and the run's finished tasks were "
                                         r"trained 0 on " + re.escape(first)):
        res = run_experiment(make_config(overrides=dict(SMALL, eval_at=eval_at, backend="reference")), tmp_path / "run",
                             resume=True, progress=False)
    assert list(res["trained_on"].items()) == [(first, "0"), (next(k for k in res["trained_on"] if k != first), "1-2")]


def test_an_nns_run_resumed_trains_reused_masks_from_the_same_scores(tmp_path, monkeypatch):
    # With ε = 0 every true task trains mask 0 further: resumed after the first true task, it must go on
    # from the float scores the uninterrupted run kept (saved beside the checkpoint), not from
    # scores rebuilt from its bits.
    from supsup_fast.algorithms.nns import MaskAllocator
    cfg = make_config(overrides=dict(SMALL, scenario="NNs", tasks=2, iters=30, nns_check_every=10, nns_epsilon=0.0,
                                     train_subset=600, eval_at=[2], seed=0))
    whole = run_experiment(cfg, tmp_path / "whole", progress=False)
    real, calls = MaskAllocator.train_true_task, []

    def crashing(self, *args, **kw):
        if len(calls) == 1:
            raise KeyboardInterrupt
        calls.append(1)
        return real(self, *args, **kw)

    monkeypatch.setattr(MaskAllocator, "train_true_task", crashing)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "run", progress=False)
    monkeypatch.undo()
    ck = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ck.glob("nns_scores_*")) == ["nns_scores_000001.safetensors"]
    resumed = run_experiment(cfg, tmp_path / "run", resume=True, progress=False)
    assert resumed["timing"]["tasks_resumed"] == 1
    assert resumed["nns"]["mask_for_true_task"] == whole["nns"]["mask_for_true_task"] == [0, 0]
    assert resumed["nns"]["decisions"] == whole["nns"]["decisions"]
    assert resumed["per_task_accuracy"] == whole["per_task_accuracy"]
    assert resumed["accuracy_after_training"] == whole["accuracy_after_training"]
    assert all(torch.equal(a, b) for a, b in zip(banks(maskfile.load_model(tmp_path / "whole" / "model.safetensors")).values(),
                                                 banks(maskfile.load_model(tmp_path / "run" / "model.safetensors")).values()))
    assert sorted(p.name for p in ck.glob("nns_scores_*")) == ["nns_scores_000002.safetensors"]
    # a damaged score file is refused by name; without one, the resume warns and goes on
    (tmp_path / "run" / "progress.json").unlink(missing_ok=True)
    (ck / "nns_scores_000002.safetensors").write_bytes(b"garbage")
    with pytest.raises(RunDirError, match=r"nns_scores_000002.safetensors is unusable: .*Delete it to resume without it"):
        run_experiment(cfg, tmp_path / "run", resume=True, progress=False)
    (ck / "nns_scores_000002.safetensors").unlink()
    with pytest.warns(UserWarning, match="nns_scores_000002.safetensors is missing"):
        run_experiment(cfg, tmp_path / "run", resume=True, progress=False)


def test_a_task_whose_evaluation_after_training_fails_is_not_trained_again(tmp_path, monkeypatch):
    # Unreadable test data or Ctrl-C during task t's evaluation after training: its trained mask is
    # kept (checkpoints/trained_t), and the resume evaluates it without training it again.
    cfg = make_config(overrides=SMALL)
    whole = run_experiment(cfg, tmp_path / "whole", progress=False)
    real_eval, calls = exp_mod.evaluate_task, []

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_eval(*args, **kw)

    monkeypatch.setattr(exp_mod, "evaluate_task", failing)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "run", progress=False)
    monkeypatch.undo()
    ck = tmp_path / "run" / "checkpoints"
    assert (ck / "trained_00001.safetensors").is_file() and not (ck / "task_00001.safetensors").exists()
    trained = []
    real_train = exp_mod.train_task
    monkeypatch.setattr(exp_mod, "train_task", lambda model, split, *a, **kw: trained.append(1) or real_train(model, split, *a, **kw))
    resumed = run_experiment(cfg, tmp_path / "run", resume=True, progress=False)
    assert len(trained) == 1  # task 2 only
    assert not (ck / "trained_00001.safetensors").exists()
    assert resumed["per_task_accuracy"] == whole["per_task_accuracy"]
    assert resumed["accuracy_after_training"] == whole["accuracy_after_training"]
    assert all(torch.equal(a, b) for a, b in zip(banks(maskfile.load_model(tmp_path / "whole" / "model.safetensors")).values(),
                                                 banks(maskfile.load_model(tmp_path / "run" / "model.safetensors")).values()))


def test_an_unusable_trained_mask_is_trained_again_with_a_warning(tmp_path, monkeypatch):
    cfg = make_config(overrides=dict(SMALL, tasks=2))
    interrupt_after(monkeypatch, exp_mod, 1)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "run", progress=False)
    monkeypatch.undo()
    (tmp_path / "run" / "checkpoints" / "trained_00001.safetensors").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match=r"trained_00001.safetensors is unusable .*task 1 is trained again"):
        res = run_experiment(cfg, tmp_path / "run", resume=True, progress=False)
    assert len(res["per_task_accuracy"]) == 2
    assert not (tmp_path / "run" / "checkpoints" / "trained_00001.safetensors").exists()
