import json

import pytest
import torch

from supsup_fast.runs import supsup as exp_mod
from supsup_fast.runs import evaluate_run, run_experiment
from supsup_fast.runs.rundir import RunDirError
from supsup_fast.runs.config import load_yaml, make_config
from supsup_fast.runs import maskfile

def interrupt_after(monkeypatch, tasks: int):
    """Make the run stop with KeyboardInterrupt when it starts task number ``tasks``; returns the
    real train_task so the test can restore it."""
    real_train = exp_mod.train_task
    calls = []

    def crashing(model, split, settings, **kw):
        if len(calls) == tasks:
            raise KeyboardInterrupt
        calls.append(1)
        return real_train(model, split, settings, **kw)

    monkeypatch.setattr(exp_mod, "train_task", crashing)
    return real_train


SMALL = dict(model="lenet", tasks=3, iters=40, train_subset=1500, lr=1e-3, output_size=100, eval_at=[2])


def test_run_writes_all_outputs(tmp_path):
    cfg = make_config(overrides=SMALL)
    r = run_experiment(cfg, tmp_path / "run", progress=False)
    out = tmp_path / "run"
    saved = json.loads((out / "results.json").read_text())
    for key in ("average_accuracy", "per_task_accuracy", "task_inference_accuracy", "num_masks", "mask_bytes",
                "timing", "config", "accuracy_after_training", "accuracy_matrix", "forgetting", "backward_transfer"):
        assert key in saved
    assert saved["num_masks"] == 3 and len(saved["per_task_accuracy"]) == 3
    assert 0 <= saved["average_accuracy"] <= 1 and 0 <= saved["task_inference_accuracy"] <= 1
    assert saved["average_accuracy"] > 0.5  # a real run learns: chance is 0.1
    assert [row["tasks_learned"] for row in saved["accuracy_matrix"]] == [2, 3]
    assert saved["mask_bytes"] == 3 * (300 * 25 + 100 * 10 + 100 * 4) * 4
    assert saved["config"]["scenario"] == "GNu"
    # the machine, and the instruction set the C++ kernels ran where they ran (the results' last bits)
    assert saved["machine"]["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    if saved["backend"] == "cpu":
        from supsup_fast.ops.backends.cpu import cpu_isa
        assert saved["machine"]["cpu_isa"] == cpu_isa()
    else:
        assert "cpu_isa" not in saved["machine"]
    assert (out / "per_task.csv").read_text().count("\n") == 4
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "model.safetensors").exists()
    assert r["average_accuracy"] == saved["average_accuracy"]


def test_resume_keeps_finished_tasks(tmp_path, monkeypatch):
    cfg = make_config(overrides=SMALL)
    out = tmp_path / "run"
    real_train = interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, out, progress=False)
    files = sorted((out / "checkpoints").glob("task_*.safetensors"))
    assert [f.name for f in files] == ["task_00000.safetensors", "task_00001.safetensors"]
    stamps = [f.stat().st_mtime_ns for f in files]
    assert not list(out.rglob("*.tmp"))
    monkeypatch.setattr(exp_mod, "train_task", real_train)
    with pytest.raises(RunDirError, match="--resume"):
        run_experiment(cfg, out, progress=False)
    r = run_experiment(cfg, out, resume=True, progress=False)
    assert r["timing"]["tasks_resumed"] == 2 and r["num_masks"] == 3
    assert [f.stat().st_mtime_ns for f in files] == stamps


def test_resume_refuses_changed_settings_and_corrupt_checkpoint(tmp_path):
    out = tmp_path / "run"
    run_experiment(make_config(overrides=dict(SMALL, tasks=2, eval_at=[])), out, progress=False)
    with pytest.raises(RunDirError, match="lr"):
        run_experiment(make_config(overrides=dict(SMALL, tasks=2, eval_at=[], lr=0.5)), out, resume=True, progress=False)
    ck = out / "checkpoints" / "task_00001.safetensors"
    blob = bytearray(ck.read_bytes())
    blob[-1] ^= 1
    ck.write_bytes(bytes(blob))
    with pytest.raises(RunDirError, match=r"checksum.*task_00001.safetensors or pass --retrain-corrupt"):
        run_experiment(make_config(overrides=dict(SMALL, tasks=2, eval_at=[])), out, resume=True, progress=False)
    first = (out / "checkpoints" / "task_00000.safetensors").read_bytes()
    res = run_experiment(make_config(overrides=dict(SMALL, tasks=2, eval_at=[])), out, resume=True, progress=False,
                         retrain_corrupt=True)
    assert res["timing"]["tasks_resumed"] == 1  # task 1 retrained, task 0 kept as it was
    assert (out / "checkpoints" / "task_00000.safetensors").read_bytes() == first
    maskfile.read_mask_file(ck)


def test_evaluate_run_under_other_scenarios(tmp_path):
    out = tmp_path / "run"
    gnu = run_experiment(make_config(overrides=dict(SMALL, eval_at=[])), out, progress=False)
    gg = evaluate_run(out, {"scenario": "GG"}, tmp_path / "gg", progress=False)
    assert gg["task_inference_accuracy"] is None
    assert gg["per_task_accuracy"] == pytest.approx(gnu["accuracy_after_training"])
    # GNs and the superfluous objective are checked on runs where they must succeed in
    # tests/runs/test_resume_and_outputs.py.


def test_gg_split_and_rotated_binary_runs(tmp_path):
    gg = run_experiment(make_config(overrides=dict(SMALL, scenario="GG", benchmark="split-mnist", tasks=2,
                                                   output_size=None, eval_at=[])), tmp_path / "gg", progress=False)
    assert gg["output_size"] == 2 and gg["task_inference_accuracy"] is None and gg["average_accuracy"] > 0.8
    # evaluated under GNu, the masks keep the run's 2 outputs (the scenario's default would be 100)
    gnu = evaluate_run(tmp_path / "gg", {"scenario": "GNu", "objective": "superfluous", "calibration": "entropy"},
                       tmp_path / "gg-gnu", progress=False)
    assert gnu["output_size"] == 2 and gnu["num_masks"] == 2
    rot = run_experiment(make_config(overrides=dict(SMALL, benchmark="rotated-mnist", tasks=3, inference="binary",
                                                    infer_images=128, eval_at=[])), tmp_path / "rot", progress=False)
    assert rot["num_masks"] == 3
    # binary inference picking the right task is checked in tests/runs/test_resume_and_outputs.py


def test_config_validation_and_presets(tmp_path):
    with pytest.raises(ValueError, match="--scenario"):
        make_config(overrides={"scenario": "XX"})
    with pytest.raises(ValueError, match="--tasks"):
        make_config(overrides={"tasks": 0})
    cfg = make_config(overrides={"output_size": 5})
    with pytest.raises(ValueError, match="--output-size 5 is smaller than the 10 labels"):
        cfg.resolved_output_size(10)
    (tmp_path / "bad.yaml").write_text("sceanrio: GNu\n")
    with pytest.raises(ValueError, match="unknown settings"):
        load_yaml(tmp_path / "bad.yaml")


def test_every_shipped_preset_is_valid():
    from pathlib import Path
    presets = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))
    assert presets
    for p in presets:
        make_config(load_yaml(p))


def test_transfer_state_survives_resume(tmp_path, monkeypatch):
    import supsup_fast.nn as snn
    from supsup_fast.runs.maskfile import load_model
    cfg = make_config(overrides=dict(SMALL, tasks=3, eval_at=[], transfer=True))
    full = run_experiment(cfg, tmp_path / "full", progress=False)
    reference_model = load_model(tmp_path / "full" / "model.safetensors")
    real_train = interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "cut", progress=False)
    monkeypatch.setattr(exp_mod, "train_task", real_train)
    resumed = run_experiment(cfg, tmp_path / "cut", resume=True, progress=False)
    resumed_model = load_model(tmp_path / "cut" / "model.safetensors")
    for a, b in zip(snn.supermask_layers(reference_model).values(), snn.supermask_layers(resumed_model).values()):
        assert a.score_mean is not None and torch.equal(a.score_mean, b.score_mean)
        assert torch.equal(a.bank.words, b.bank.words)  # same masks as the uninterrupted run
    assert resumed["per_task_accuracy"] == full["per_task_accuracy"]

