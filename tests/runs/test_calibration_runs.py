"""--calibration through the run layer: settings, refusals, and the rows it writes."""
import json

import pytest

from supsup_fast.cli import main
from supsup_fast.runs import make_config


def test_calibration_refused_where_it_does_not_apply():
    for bad, what in [(dict(scenario="GG"), "GG"), (dict(scenario="NNs", model="lenet"), "NNs"),
                      (dict(shard_bank=True), "--shard-bank")]:
        with pytest.raises(ValueError, match=f"--calibration logit-norm.*{what}"):
            make_config(dict(calibration="logit-norm", **bad))
    with pytest.raises(ValueError, match="--calibration"):
        make_config(dict(calibration="zscore"))
    assert make_config(dict(calibration="entropy")).eval_settings().calibration == "entropy"


def test_run_then_evaluate_with_calibration(tmp_path):
    out = tmp_path / "run"
    assert main(["run", "--benchmark", "permuted-mnist-noisy", "--model", "lenet", "--tasks", "3", "--iters", "20",
                 "--train-subset", "1000", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    row = res["accuracy_matrix"][-1]
    assert res["task_names"] == ["0% label noise", "20% label noise", "40% label noise"]
    assert row["queries_per_task"] == [16, 16, 16]  # the embedded 2,000 test images in batches of 128
    assert "mask_baselines" not in row
    assert sum(sum(c.values()) for c in row["task_confusions"].values()) == \
        round(sum((1 - ti) * 16 for ti in row["task_inference"]))
    assert (out / "per_task.csv").read_text().splitlines()[1].endswith(",0% label noise")
    cal = tmp_path / "cal"
    assert main(["evaluate", str(out), "--calibration", "logit-norm", "--out", str(cal), "--no-progress"]) == 0
    ev = json.loads((cal / "results.json").read_text())
    assert ev["config"]["calibration"] == "logit-norm"
    base = ev["accuracy_matrix"][-1]["mask_baselines"]
    assert len(base["entropy"]) == len(base["logit_norm"]) == 3 and min(base["logit_norm"]) > 0
    assert ev["accuracy_matrix"][-1]["eval_sha256"] != row["eval_sha256"]
