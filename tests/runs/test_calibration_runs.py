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


def test_calibration_measures_each_mask_on_the_images_it_was_trained_on(tmp_path, monkeypatch):
    """--train-subset N: a mask's baseline comes from its N training images, not from images it never saw."""
    from supsup_fast.runs import loop
    sizes = []
    real = loop.mask_baselines
    monkeypatch.setattr(loop, "mask_baselines", lambda model, splits, *a, **k: sizes.append([len(s) for s in splits])
                        or real(model, splits, *a, **k))
    assert main(["run", "--model", "lenet", "--tasks", "2", "--iters", "5", "--train-subset", "300", "--calibration",
                 "entropy", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert sizes and all(s == [300] * len(s) for s in sizes)


def test_transfer_outside_gg_warns_about_task_inference():
    import warnings
    with pytest.warns(UserWarning, match="--transfer is the paper's GG setting: under GNu"):
        config = make_config(dict(scenario="GNu", transfer=True))
    with warnings.catch_warnings():  # once per config: the run validates it again, also after torchrun's device
        warnings.simplefilter("error")
        config.validate()
        config.replace(device="cpu").validate()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make_config(dict(scenario="GG", transfer=True))


def test_calibration_factors_must_be_finite_and_positive():
    import torch
    from supsup_fast.algorithms import infer_oneshot
    from supsup_fast.algorithms.calibration import alpha_scale
    from supsup_fast.models import build_model
    from supsup_fast.nn import begin_task, finish_task
    model = build_model("lenet", 10, seed=1)
    for t in range(3):
        begin_task(model, generator=torch.Generator().manual_seed(t))
        finish_task(model)
    x = torch.randn(1, 784)
    for bad in ([float("nan"), 1, 1], [float("inf"), 1, 1], [0.0, 1, 1], [-1.0, 1, 1]):
        with pytest.raises(ValueError, match=r"scale \(the per-mask calibration factors\) must be finite and > 0"):
            infer_oneshot(model, x, scale=torch.tensor(bad))
    with pytest.raises(ValueError, match=r"entropy baseline of mask\(s\) \[1\] is not finite"):
        alpha_scale("entropy", {"entropy": torch.tensor([1.0, float("nan"), 2.0]), "logit_norm": torch.ones(3)}, 10)
