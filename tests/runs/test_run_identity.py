"""Run folders: identity of every mask file, one run per folder, resumes on the same data only,
evaluation rows tied to their checkpoints, and failures that come early and in one line."""
import json
import shutil

import pytest
import torch

from supsup_fast.runs import maskfile
from supsup_fast.runs import loop as exp_mod
from supsup_fast.runs import evaluate_run, run_experiment
from supsup_fast.runs.rundir import RunDirError
from supsup_fast.runs.rundir import RunLock
from supsup_fast.cli import main
from supsup_fast.runs.config import make_config
from supsup_fast.runs.maskfile import MaskFileError

SMALL = dict(model="lenet", tasks=2, iters=30, train_subset=1000, lr=1e-3, output_size=100, eval_at=[])


def run(out, resume=False, **changes):
    return run_experiment(make_config(overrides=dict(SMALL, **changes)), out, resume=resume, progress=False)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "a"
    return out, run(out)


def copy_run(src, dst):
    shutil.copytree(src, dst)
    (dst / ".lock").unlink(missing_ok=True)
    return dst


def test_checkpoint_from_another_run_is_refused_on_resume(finished, tmp_path):
    other = tmp_path / "other"
    run(other, lr=5e-3)
    mine = copy_run(finished[0], tmp_path / "mine")
    shutil.copy(other / "checkpoints" / "task_00001.safetensors", mine / "checkpoints" / "task_00001.safetensors")
    with pytest.raises(RunDirError, match=r"task_00001.safetensors belongs to another run: the settings that shape "
                                          r"the masks differ \(lr 0.005 in the file, .* in this run\); if this run's "
                                          r"config.json was edited since, restore it"):
        run(mine, resume=True)


def test_checkpoint_of_another_task_is_refused(finished, tmp_path):
    mine = copy_run(finished[0], tmp_path / "mine")
    ck = mine / "checkpoints"
    shutil.copy(ck / "task_00000.safetensors", ck / "task_00001.safetensors")
    with pytest.raises(RunDirError, match="task index differ"):
        run(mine, resume=True)


def test_evaluate_refuses_a_model_file_from_another_run(finished, tmp_path):
    other = tmp_path / "other"
    run(other, lr=5e-3)
    mine = copy_run(finished[0], tmp_path / "mine")
    shutil.copy(other / "model.safetensors", mine / "model.safetensors")
    with pytest.raises(RunDirError, match="model.safetensors belongs to another run"):
        evaluate_run(mine, {}, tmp_path / "eval", progress=False)


def test_second_run_on_a_locked_folder_is_refused_with_the_holders_pid(finished, tmp_path):
    mine = copy_run(finished[0], tmp_path / "mine")
    lock = RunLock(mine).acquire()
    try:
        with pytest.raises(RunDirError, match=r"in use by another run \(pid \d+\)"):
            run(mine, resume=True)
    finally:
        lock.release()
    run(mine, resume=True)  # free again once the holder let go


@pytest.fixture
def other_training_data(monkeypatch):
    """load_benchmark as the runs call it, with one pixel of the training images changed."""
    real = exp_mod.load_benchmark

    def other_data(*args, **kw):
        tasks = real(*args, **kw)
        tasks.mnist.train_images = tasks.mnist.train_images.clone()
        tasks.mnist.train_images[0, 14, 14] ^= 1
        return tasks

    monkeypatch.setattr(exp_mod, "load_benchmark", other_data)


def test_resume_on_other_training_data_is_refused(finished, tmp_path, other_training_data):
    mine = copy_run(finished[0], tmp_path / "mine")
    with pytest.raises(RunDirError, match="the training data"):
        run(mine, resume=True)


def test_a_refused_resume_leaves_the_run_config_as_it_was(finished, tmp_path, other_training_data):
    """A resume with a changed resumable setting that is then refused (its checkpoints are of other
    data) must not write that setting: the next plain --resume would inherit it."""
    mine = copy_run(finished[0], tmp_path / "mine")
    before = (mine / "config.json").read_bytes()
    with pytest.raises(RunDirError, match="the training data"):
        run(mine, resume=True, eval_at=[1])
    assert (mine / "config.json").read_bytes() == before


def test_a_refused_resume_writes_no_config_where_there_was_none(finished, tmp_path):
    """config.json deleted to be rebuilt by --resume: a resume refused by the checkpoints (other
    settings) writes none, and the right settings then rebuild it."""
    mine = copy_run(finished[0], tmp_path / "mine")
    (mine / "config.json").unlink()
    with pytest.raises(RunDirError, match="belongs to another run"):
        run(mine, resume=True, lr=2e-3)
    assert not (mine / "config.json").exists()
    run(mine, resume=True)
    assert json.loads((mine / "config.json").read_text())["lr"] == SMALL["lr"]


def test_an_accepted_resume_records_its_changed_settings(finished, tmp_path):
    mine = copy_run(finished[0], tmp_path / "mine")
    (mine / "results.json").unlink()
    run(mine, resume=True, eval_at=[1])
    assert json.loads((mine / "config.json").read_text())["eval_at"] == [1]


def test_resuming_an_evaluation_folder_is_refused(finished, tmp_path):
    evaluate_run(finished[0], {}, tmp_path / "eval", progress=False)
    before = sorted(p.name for p in (tmp_path / "eval").iterdir())
    with pytest.raises(RunDirError, match=r"holds an evaluation \(supsup-fast evaluate\) of the run in .*: resume that run"):
        run(tmp_path / "eval", resume=True)
    assert sorted(p.name for p in (tmp_path / "eval").iterdir() if p.name != ".lock") == [n for n in before if n != ".lock"]


def test_evaluate_refuses_masks_trained_on_other_data_unless_data_root_is_given(finished, tmp_path, other_training_data):
    with pytest.raises(RunDirError, match="model.safetensors belongs to another run: the training data"):
        evaluate_run(finished[0], {}, tmp_path / "eval", progress=False)
    cfg = json.loads((finished[0] / "config.json").read_text())
    res = evaluate_run(finished[0], {"data_root": cfg["data_root"]}, tmp_path / "eval2", progress=False)
    assert len(res["per_task_accuracy"]) == 2  # evaluated on the data named, as asked


def test_stale_progress_rows_are_recomputed(tmp_path):
    out = tmp_path / "r"
    first = run(out, tasks=3, eval_at=[2])
    progress = json.loads((out / "progress.json").read_text())
    row = next(r for r in progress["rows"] if r["tasks_learned"] == 2)
    row["accuracy"] = [0.0, 0.0]  # as if computed from masks that are no longer there
    row["masks_sha256"] = "0" * 64
    progress["sha256"] = exp_mod.progress_digest(progress)  # a whole file, its rows of other masks
    (out / "progress.json").write_text(json.dumps(progress))
    again = run(out, resume=True, tasks=3, eval_at=[2])
    assert again["accuracy_matrix"][0]["accuracy"] == first["accuracy_matrix"][0]["accuracy"]
    # A row whose digest matches is reused, not recomputed.
    progress = json.loads((out / "progress.json").read_text())
    assert all(r["masks_sha256"] != "0" * 64 for r in progress["rows"])


def test_an_edited_or_malformed_progress_file_is_refused(finished, tmp_path):
    mine = copy_run(finished[0], tmp_path / "mine")
    (mine / "model.safetensors").unlink()
    progress = json.loads((mine / "progress.json").read_text())
    progress["rows"][0]["accuracy"][0] = 0.999  # a valid JSON edit of one digit
    (mine / "progress.json").write_text(json.dumps(progress))
    with pytest.raises(RunDirError, match=r"progress file .*progress.json failed its checksum"):
        run(mine, resume=True)
    for rows in ("x", [1], [{}], [{"tasks_learned": 2}]):
        bad = {"rows": rows, "train_wall_seconds": 1.0}
        bad["sha256"] = exp_mod.progress_digest(bad)
        (mine / "progress.json").write_text(json.dumps(bad))
        with pytest.raises(RunDirError, match=r"progress file .*progress.json is malformed"):
            run(mine, resume=True)


def test_nns_rows_of_other_masks_are_recomputed(tmp_path):
    """An NNs run retrained from an earlier point (its checkpoint deleted, as the error for a
    corrupt one advises, or on other data) has other masks than its old progress rows."""
    out = tmp_path / "nns"
    nns = dict(scenario="NNs", tasks=2, eval_at=[1], iters=20)
    first = run(out, **nns)
    progress = json.loads((out / "progress.json").read_text())
    row = next(r for r in progress["rows"] if r["tasks_learned"] == 1)
    row["accuracy"] = [0.0]  # as if computed from the masks of another attempt
    row["masks_sha256"] = "0" * 64
    progress["sha256"] = exp_mod.progress_digest(progress)
    (out / "progress.json").write_text(json.dumps(progress))
    for name in ("checkpoints/nns_latest.safetensors", "model.safetensors", "results.json"):
        (out / name).unlink()
    again = run(out, resume=True, **nns)
    assert again["accuracy_matrix"][0]["accuracy"] == first["accuracy_matrix"][0]["accuracy"]
    assert again["average_accuracy"] == first["average_accuracy"]


def test_corrupt_progress_file_is_named(finished, tmp_path):
    mine = copy_run(finished[0], tmp_path / "mine")
    (mine / "progress.json").write_text("{not json")
    with pytest.raises(RunDirError, match=r"progress file .*progress.json is unreadable"):
        run(mine, resume=True)


def test_model_file_is_written_before_the_final_evaluation(tmp_path, monkeypatch):
    out = tmp_path / "r"

    def crash(self, k, desc):
        raise KeyboardInterrupt

    monkeypatch.setattr(exp_mod.Experiment, "_evaluate_all", crash)
    with pytest.raises(KeyboardInterrupt):
        run(out)
    monkeypatch.undo()
    assert maskfile.load_model(out / "model.safetensors") is not None
    res = evaluate_run(out, {}, tmp_path / "eval", progress=False)  # the masks are usable from the CLI
    assert len(res["per_task_accuracy"]) == 2


def test_tampered_metadata_with_a_recomputed_checksum_is_a_mask_file_error(finished, tmp_path):
    from safetensors.torch import save_file
    src = finished[0] / "model.safetensors"
    tensors, meta = maskfile.read_mask_file(src)
    for key, value in (("first_task", "zero"), ("layout", None), ("model_spec", json.dumps({"name": "nope"}))):
        bad = dict(meta)
        if value is None:
            del bad[key]
        else:
            bad[key] = value
        bad["checksum"] = maskfile.checksum(tensors, {k: v for k, v in bad.items() if k != "checksum"})
        path = tmp_path / f"{key}.safetensors"
        save_file(tensors, str(path), metadata=bad)
        with pytest.raises(MaskFileError, match=key if value is None else ("malformed" if key == "first_task" else "model_spec")):
            maskfile.load_model(path)


@pytest.mark.parametrize("setup,args,message", [
    ("file", [], "is a file, not a folder"),
    (None, ["--device", "cuda"], "sees no CUDA GPU"),
])
def test_one_line_errors_before_any_data_is_loaded(tmp_path, capsys, monkeypatch, setup, args, message):
    if args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    blocker = tmp_path / "plain-file"
    blocker.write_text("x")
    out = blocker / "run" if setup == "file" else tmp_path / "run"
    monkeypatch.setattr(exp_mod, "load_benchmark", lambda *a, **k: pytest.fail("data loaded before the check"))
    code = main(["run", "--tasks", "1", "--iters", "1", "--out", str(out), "--no-progress", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_a_gpu_index_past_the_machines_gpus_is_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(exp_mod, "load_benchmark", lambda *a, **k: pytest.fail("data loaded before the check"))
    code = main(["run", "--tasks", "1", "--iters", "1", "--out", str(tmp_path / "run"), "--no-progress",
                 "--device", "cuda:2"])
    err = capsys.readouterr().err
    assert code == 2 and "--device cuda:2: this machine has 2 CUDA GPU(s), cuda:0 to cuda:1" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_hopfield_checkpoint_of_another_run_is_refused_on_resume(tmp_path):
    hop = dict(model="bnnet", inference="hopfield", benchmark="split-mnist", tasks=2, epochs=1, train_subset=300,
               iters=None, test_batch_size=64)
    a, b = tmp_path / "a", tmp_path / "b"
    run_experiment(make_config(overrides=hop), a, progress=False)
    run_experiment(make_config(overrides=dict(hop, lr=hop.get("lr", 0.1) * 0.5)), b, progress=False)
    shutil.copy(b / "checkpoints" / "hopfield.safetensors", a / "checkpoints" / "hopfield.safetensors")
    with pytest.raises(RunDirError, match="hopfield.safetensors belongs to another run"):
        run_experiment(make_config(overrides=hop), a, resume=True, progress=False)


def test_evaluate_refuses_to_write_over_the_run_or_another_training_run(finished, tmp_path):
    mine = copy_run(finished[0], tmp_path / "mine")
    before = {p.name: p.read_bytes() for p in mine.iterdir() if p.is_file() and p.name != ".lock"}
    with pytest.raises(RunDirError, match=r"is the evaluated run's own folder"):
        evaluate_run(mine, {"scenario": "GG"}, mine / "." , progress=False)
    other = copy_run(finished[0], tmp_path / "other")
    with pytest.raises(RunDirError, match=r"holds a training run \(progress.json or checkpoints/\)"):
        evaluate_run(mine, {"scenario": "GG"}, other, progress=False)
    assert {p.name: p.read_bytes() for p in mine.iterdir() if p.is_file() and p.name != ".lock"} == before
    first = evaluate_run(mine, {"scenario": "GG"}, tmp_path / "eval", progress=False)
    again = evaluate_run(mine, {"scenario": "GG"}, tmp_path / "eval", progress=False)  # an evaluation's folder: rewritten
    assert again["per_task_accuracy"] == first["per_task_accuracy"]


def test_evaluate_names_a_scenario_that_the_masks_were_not_trained_for(finished, tmp_path):
    with pytest.raises(RunDirError, match=r"--scenario NNs needs the masks of an NNs run; .* was trained as GNu"):
        evaluate_run(finished[0], {"scenario": "NNs"}, tmp_path / "eval", progress=False)
    nns = tmp_path / "nns"
    run(nns, scenario="NNs", tasks=2)
    with pytest.raises(RunDirError, match=r"is an NNs run .* evaluate it as NNs \(leave out --scenario\), not as GNu"):
        evaluate_run(nns, {"scenario": "GNu"}, tmp_path / "eval2", progress=False)


def test_default_evaluation_folders_differ_by_what_is_evaluated():
    from supsup_fast.cli import default_evaluation_folder
    assert default_evaluation_folder({}) == "eval-same"
    assert default_evaluation_folder({"scenario": "GNs", "device": "cpu"}) == "eval-GNs"
    names = {default_evaluation_folder(o) for o in ({"objective": "superfluous"}, {"inference": "binary"},
                                                    {"objective": "superfluous", "inference": "binary"},
                                                    {"infer_images": 4}, {"log_base": 3.0}, {"calibration": "entropy"})}
    assert len(names) == 6 and "eval-superfluous-binary" in names and "eval-i4" in names
    # other test data gets its own folder, one per data root
    roots = {default_evaluation_folder({"data_root": r}) for r in ("/data/mnist", "/data/other")}
    assert len(roots) == 2 and not roots & {"eval-same"} and all(n.startswith("eval-data-") for n in roots)


def test_evaluate_says_how_to_rebuild_a_corrupt_run_config(finished, tmp_path):
    mine = copy_run(finished[0], tmp_path / "mine")
    (mine / "config.json").write_text("{not json")
    with pytest.raises(RunDirError, match=r"config.json is unreadable or not valid JSON .* delete it and run "
                                          r"`supsup-fast run` with the run's settings, --out .* and --resume"):
        evaluate_run(mine, {}, tmp_path / "eval", progress=False)


def test_an_nns_run_refuses_an_evaluation_point_it_has_passed(tmp_path):
    """NNs masks keep training as later true tasks arrive, so a row for a point already passed cannot
    be computed with the masks of that time: adding it on --resume is refused, not computed with
    the later masks."""
    out = tmp_path / "nns"
    run(out, scenario="NNs", tasks=2)
    with pytest.raises(RunDirError, match=r"--eval-at \[1\]: this NNs run has passed that point \(2 true tasks done\)"):
        run(out, resume=True, scenario="NNs", tasks=2, eval_at=[1])
    done = run(out, resume=True, scenario="NNs", tasks=2)  # without it, the finished run resumes as before
    assert len(done["accuracy_after_training"]) == 2


def test_evaluate_takes_none_of_the_runs_parallel_settings(finished, tmp_path):
    """A run's --shard-bank / --parallel / --eval-at describe how it trained: an evaluation in one
    process of a run trained with --shard-bank used to take the sharded path and look for the run's
    checkpoints in its own output folder."""
    mine = copy_run(finished[0], tmp_path / "mine")
    cfg = json.loads((mine / "config.json").read_text())
    cfg.update(shard_bank=True, parallel="data", eval_at=[1])
    (mine / "config.json").write_text(json.dumps(cfg))
    res = evaluate_run(mine, {}, tmp_path / "eval", progress=False)
    assert res["per_task_accuracy"] == finished[1]["per_task_accuracy"]
    assert res["distributed"]["parallel"] == "single" and res["distributed"]["shard_bank"] is False
    written = json.loads((tmp_path / "eval" / "config.json").read_text())
    assert written["shard_bank"] is False and written["parallel"] == "auto" and written["eval_at"] == []


def test_a_failed_evaluation_leaves_no_config_behind(finished, tmp_path, monkeypatch):
    def broken(self, k, desc):
        raise RuntimeError("evaluation failed")
    monkeypatch.setattr(exp_mod.Experiment, "_evaluate_all", broken)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        evaluate_run(finished[0], {"scenario": "GNs"}, tmp_path / "eval", progress=False)
    assert not (tmp_path / "eval" / "config.json").exists()


def test_parallel_task_with_transfer_or_nns_is_refused_in_one_process_too():
    for changes, what in ((dict(transfer=True), "--transfer"), (dict(scenario="NNs"), "NNs")):
        with pytest.raises(ValueError, match=f"--parallel task cannot run {what}"):
            make_config(overrides=dict(SMALL, parallel="task", **changes)).validate()


def test_shard_bank_with_an_evaluation_point_below_the_world_size_is_refused_before_any_work():
    from supsup_fast.distributed import DistContext
    ctx = DistContext(world_size=3, rank=0, backend="gloo")
    config = make_config(overrides=dict(SMALL, tasks=4, eval_at=[2], shard_bank=True))
    with pytest.raises(ValueError, match=r"first one \(after 2 tasks: --eval-at / --tasks\) has 2 for 3 ranks"):
        exp_mod.parallel_mode(config, ctx)
    assert exp_mod.parallel_mode(make_config(overrides=dict(SMALL, tasks=4, eval_at=[3], shard_bank=True)), ctx) == "task"
    # no evaluation point before the last (as under `evaluate`): fewer ranks, not --eval-at, is the remedy
    with pytest.raises(ValueError, match=r"one task per rank: 1 task \(--tasks\) for 3 ranks; launch at most 1 rank"):
        exp_mod.parallel_mode(make_config(overrides=dict(SMALL, tasks=1, shard_bank=True)), ctx)


def test_errors_under_torchrun_name_their_rank(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(exp_mod, "load_benchmark", lambda *a, **k: pytest.fail("data loaded before the check"))
    blocker = tmp_path / "plain-file"
    blocker.write_text("x")
    # init_from_env would start a process group: the folder check in the CLI comes before it
    monkeypatch.setattr("supsup_fast.distributed.init_from_env", lambda device: (exp_mod.SINGLE, device))
    code = main(["run", "--tasks", "1", "--iters", "1", "--out", str(blocker / "run"), "--no-progress"])
    assert code == 2 and capsys.readouterr().err.startswith("supsup-fast: error (rank 1): --out ")


def test_a_progress_file_of_the_version_before_its_checksum_is_still_read(tmp_path):
    out = tmp_path / "r"
    first = run(out, tasks=3, eval_at=[2])
    progress = json.loads((out / "progress.json").read_text())
    del progress["sha256"]
    (out / "progress.json").write_text(json.dumps(progress))
    (out / "model.safetensors").unlink()
    again = run(out, resume=True, tasks=3, eval_at=[2])
    assert again["accuracy_matrix"] == first["accuracy_matrix"]


def test_evaluate_says_how_to_finish_or_rewrite_a_runs_model_file(finished, tmp_path):
    mine = copy_run(finished[0], tmp_path / "mine")
    model_file = mine / "model.safetensors"
    blob = bytearray(model_file.read_bytes())
    blob[-1] ^= 1
    model_file.write_bytes(bytes(blob))
    with pytest.raises(RunDirError, match=r"model.safetensors failed its checksum.*`supsup-fast run --out .*mine "
                                          r"--resume` writes it again from the run's task checkpoints"):
        evaluate_run(mine, {}, tmp_path / "eval", progress=False)
    model_file.unlink()
    with pytest.raises(RunDirError, match=r"is not a finished run \(it has no model.safetensors\); if it was "
                                          r"interrupted, `supsup-fast run --out .*mine --resume` finishes it"):
        evaluate_run(mine, {}, tmp_path / "eval", progress=False)
    (mine / "config.json").unlink()  # then a resume cannot finish it either: no hint to run one
    with pytest.raises(RunDirError, match=r"is not a finished run \(it has no config.json and model.safetensors\)$"):
        evaluate_run(mine, {}, tmp_path / "eval", progress=False)
