"""The report logic of benchmarks/questions.py (issue #18): confusion matrices from evaluation rows,
per-level summaries and where wrongly inferred queries went, on hand-made results."""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "questions.py"


@pytest.fixture(scope="module")
def questions():
    spec = importlib.util.spec_from_file_location("questions_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_confusion_matrix_from_rows(questions):
    row = {"accuracy": [0.9, 0.8, 0.7], "queries_per_task": [10, 4, 6],
           "task_confusions": {"1": {"0": 3}, "2": {"0": 1, "1": 2}}}
    m = questions.confusion({"accuracy_matrix": [row], "num_masks": 3})
    assert m == [[10, 0, 0], [3, 1, 0], [1, 2, 3]]
    # NNs: rows are true tasks, columns masks; a true task's own mask is the one trained most on it.
    nns = {"accuracy_matrix": [{"accuracy": [0.9, 0.9], "queries_per_task": [5, 5], "task_confusions": {"1": {"0": 2}}}],
           "num_masks": 3, "nns": {"mask_for_true_task": [0, 2]}}
    assert questions.confusion(nns) == [[5, 0, 0], [2, 0, 3]]


def test_summary_by_level_and_where_wrong_queries_went(questions):
    def run(own, ti1, confusions):
        return {"task_names": ["easy", "hard", "easy", "hard"], "own_mask_accuracy": own,
                "variants": {"H oneshot": {"final_accuracy": [0.9, 0.5, 0.9, 0.5], "task_inference": ti1,
                                           "task_confusions": confusions}}}
    runs = {"1": run([0.95, 0.6, 0.93, 0.62], [1.0, 0.5, 1.0, 0.7], {"1": {"0": 4, "3": 1}}),
            "2": run([0.97, 0.7, 0.95, 0.68], [1.0, 0.9, 1.0, 0.9], {"3": {"2": 2}})}
    s = questions.summarise_difficulty(runs)
    assert s["levels_easiest_first"] == ["easy", "hard"]
    assert s["own_mask_accuracy"]["hard"]["mean"] == pytest.approx((0.61 + 0.69) / 2)
    v = s["variants"]["H oneshot"]
    assert v["task_inference"]["hard"]["mean"] == pytest.approx((0.6 + 0.9) / 2)
    assert v["task_inference"]["easy"]["std"] == 0.0
    assert v["wrong_queries"] == 7 and v["wrong_queries_went_to"] == {"easier": 6, "same level": 1, "harder": 0}
    assert questions.variant_name(("H", "oneshot", "logit-norm")) == "H oneshot +logit-norm"
    assert questions.variant_name(("G", "binary", "none", 16)) == "G binary (16 images)"
