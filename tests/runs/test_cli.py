import json
import subprocess
import sys
import warnings

import pytest

from supsup_fast.cli import main

FAST = ["--model", "lenet", "--tasks", "2", "--iters", "20", "--train-subset", "600", "--lr", "1e-3",
        "--output-size", "100", "--no-progress"]


def test_run_and_evaluate(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["run", *FAST, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "average accuracy" in text and "task inference" in text
    results = json.loads((out / "results.json").read_text())
    assert results["num_masks"] == 2
    with warnings.catch_warnings():  # the GNu run's config carries task-inference settings: no warning
        warnings.simplefilter("error")
        assert main(["evaluate", str(out), "--scenario", "GG", "--out", str(tmp_path / "gg"), "--no-progress"]) == 0
    assert json.loads((tmp_path / "gg" / "results.json").read_text())["task_inference_accuracy"] is None
    # given on the command line, they would change nothing under GG: said so
    with pytest.warns(UserWarning, match=r"--scenario GG evaluates each task with its own mask \(no task inference\): "
                                         r"--inference, --infer-images do not apply and are ignored"):
        assert main(["evaluate", str(out), "--scenario", "GG", "--inference", "binary", "--infer-images", "4",
                     "--out", str(tmp_path / "gg2"), "--no-progress"]) == 0


def test_yaml_preset_with_flag_override(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: lenet\ntasks: 1\niters: 5\noutput-size: 50\ntrain_subset: 300\n")
    out = tmp_path / "r"
    assert main(["run", "--config", str(cfg), "--iters", "7", "--out", str(out), "--no-progress"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["iters"] == 7 and saved["output_size"] == 50 and saved["model"] == "lenet"


@pytest.mark.parametrize("args,message", [
    (["--data-root", "/nonexistent/mnist"], "--data-root /nonexistent/mnist is not a folder"),
    (["--output-size", "5"], "--output-size 5 is smaller than the 10 labels"),
    (["--tasks", "0"], "--tasks (YAML key tasks) must be a positive int"),
    (["--benchmark", "split-mnist", "--tasks", "9"], "SplitMNIST has 5 tasks"),
    (["--backend", "nope"], "--backend (YAML key backend) must be one of"),
    (["--scenario", "NNs", "--benchmark", "split-cifar100", "--model", "gemresnet18"], "NNs needs an MLP"),
    (["--inference", "hopfield"], "--inference hopfield (HopSupSup) goes with --model bnnet"),
    (["--mask-budget", "0"], "--mask-budget (YAML key mask_budget) must be a positive int"),
    (["--benchmark", "split-imagenet", "--model", "resnet50"], "split-imagenet needs --data-root"),
    (["--retrain-corrupt"], "--retrain-corrupt applies to a resumed run: pass --resume with it"),
    (["--config", "/"], "config file / is a directory, not a YAML file"),
    (["--device", "meta"], "must be cpu or a CUDA GPU (cuda, cuda:1 ...), got 'meta'"),
    (["--out", ""], "--out must name a folder, got an empty string"),
    (["--seed", "4294967295"], "must be at most 2**32 - 2 = 4294967294 with --tasks 2"),
])
def test_clear_errors(tmp_path, capsys, args, message):
    code = main(["run", *FAST, "--out", str(tmp_path / "r"), *args])
    assert code == 2
    assert message in capsys.readouterr().err


def test_unknown_scenario_rejected_by_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--scenario", "XYZ"])
    assert exc.value.code == 2
    assert "invalid choice: 'XYZ'" in capsys.readouterr().err


def test_corrupt_mask_file_on_resume_loses_nothing(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["run", *FAST, "--out", str(out)]) == 0
    ck = out / "checkpoints" / "task_00000.safetensors"
    good = ck.read_bytes()
    ck.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    assert main(["run", *FAST, "--out", str(out), "--resume"]) == 2
    assert "checksum" in capsys.readouterr().err
    assert (out / "checkpoints" / "task_00001.safetensors").exists()
    assert main(["run", *FAST, "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_console_entry_point_help():
    res = subprocess.run([sys.executable, "-m", "supsup_fast.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "demo" in res.stdout and "bench" in res.stdout


def test_nns_and_hopsupsup_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "nns"
    assert main(["run", *FAST, "--scenario", "NNs", "--nns-check-every", "10", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "NNs                   mask per true task" in text
    res = json.loads((out / "results.json").read_text())
    assert res["nns"]["new_masks_per_true_task"][0] >= 1 and sum(res["nns"]["new_masks_per_true_task"]) == res["num_masks"]
    # its tasks share one checkpoint: --retrain-corrupt is refused, saying what to delete instead
    assert main(["run", *FAST, "--scenario", "NNs", "--out", str(out), "--resume", "--retrain-corrupt"]) == 2
    assert "NNs keeps all its tasks in one" in capsys.readouterr().err
    out = tmp_path / "hop"
    assert main(["run", "--config", "configs/hopsupsup_split_mnist.yaml", "--tasks", "1", "--train-subset", "300",
                 "--hop-recovery-trials", "1", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "recovered exactly" in text and "Hopfield storage      33.6 MB" in text
    assert (out / "hopfield.safetensors").is_file()
    assert main(["run", "--config", "configs/hopsupsup_split_mnist.yaml", "--tasks", "1", "--train-subset", "300",
                 "--hop-recovery-trials", "1", "--out", str(out), "--resume", "--retrain-corrupt"]) == 2
    assert "HopSupSup keeps all its tasks in one" in capsys.readouterr().err
    assert main(["evaluate", str(out), "--no-progress"]) == 2  # its masks live in the Hopfield network
    assert "is a HopSupSup run (--inference hopfield): its masks live in its Hopfield network" in capsys.readouterr().err


def test_run_and_demo_help_show_the_defaults_they_use(capsys):
    from supsup_fast.cli import build_parser
    for argv, model, iters in ((["run", "--help"], "fc1024", "1000"), (["demo", "--help"], "lenet", "1000")):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)
        out = " ".join(capsys.readouterr().out.split())
        assert f"[default: {model}]" in out and f"over its training set) [default: {iters}]" in out


def test_evaluate_passes_download_on(tmp_path, monkeypatch):
    # Its data error advises --download: the flag must reach the evaluation (off unless given).
    import supsup_fast.runs as runs
    seen = []
    monkeypatch.setattr(runs, "evaluate_run", lambda run, overrides, out, progress, ctx: seen.append(overrides) or {})
    monkeypatch.setattr("supsup_fast.cli._summary", lambda results, out: "")
    assert main(["evaluate", str(tmp_path), "--download", "--data-root", str(tmp_path / "d"), "--no-progress"]) == 0
    assert main(["evaluate", str(tmp_path), "--no-progress"]) == 0
    assert seen[0]["download"] is True and "download" not in seen[1]


def test_a_leftover_world_size_is_named(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert main(["run", *FAST, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "supsup-fast: error: WORLD_SIZE=2 is set but RANK, MASTER_ADDR, MASTER_PORT are not: launch with torchrun" in err


def test_bench_names_an_out_folder_it_cannot_make(tmp_path, capsys):
    (tmp_path / "afile").write_text("")
    assert main(["bench", "--quick", "--out", str(tmp_path / "afile" / "sub")]) == 2
    assert f"--out {tmp_path / 'afile' / 'sub'}: cannot make that folder" in capsys.readouterr().err
