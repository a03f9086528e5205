"""Evaluation classifies consecutive test batches that use the same mask in one forward: the counts
equal classifying every batch on its own, with the mask each batch chose, under every scenario."""
import pytest
import torch

import supsup_fast.nn as snn
from supsup_fast.algorithms import evaluation
from supsup_fast.algorithms.evaluation import EvalSettings, _SameMaskBatches, evaluate_task
from supsup_fast.data.tasks import TaskSplit


def one_by_one(model, batches):
    correct = 0
    with torch.no_grad():
        for task, x, y in batches:
            snn.set_task(model, task)
            correct += int((model(x).argmax(1) == y).sum())
    return correct


def test_grouped_counts_equal_batch_by_batch(model):
    g = torch.Generator().manual_seed(0)
    # masks chosen per batch: runs of one task, a change back and forth, sizes that cross the byte cap
    tasks = [0, 0, 0, 1, 1, 0, 2, 2, 2, 2, 1]
    batches = [(t, torch.rand(int(torch.randint(1, 9, (1,), generator=g)), 784, generator=g),
                torch.randint(0, 10, (8,), generator=g)) for t in tasks]
    batches = [(t, x, y[: x.shape[0]]) for t, x, y in batches]
    runs = []
    grouped = _SameMaskBatches(model, max_bytes=3 * 8 * 784 * 4)  # at most about 3 full batches a forward
    real_run = grouped._run

    def counting_run():
        runs.append((grouped.task, sum(x.shape[0] for x in grouped.xs)))
        real_run()
    grouped._run = counting_run
    with torch.no_grad():
        for t, x, y in batches:
            grouped.add(t, x, y)
        correct = grouped.finish()
    assert correct == one_by_one(model, batches)
    order = [t for i, (t, _) in enumerate(runs) if i == 0 or runs[i - 1][0] != t]
    assert order == [0, 1, 0, 2, 1]  # a forward never mixes masks
    assert all(images <= 3 * 8 for _, images in runs)  # the byte cap holds
    assert sum(images for _, images in runs) == sum(x.shape[0] for _, x, _ in batches)
    assert len(runs) < len(batches)  # and batches were grouped


@pytest.mark.parametrize("scenario", ["GG", "GNu", "GNs"])
def test_evaluate_task_counts_match_batch_by_batch(model, scenario, monkeypatch):
    split = TaskSplit(torch.rand(70, 784), torch.randint(0, 10, (70,)), None)
    settings = EvalSettings(scenario=scenario, batch_size=16)
    got = evaluate_task(model, split, 1, settings, device=torch.device("cpu"), num_labels=10)
    # the same evaluation with every batch classified on its own (a cap below one batch)
    monkeypatch.setattr(evaluation, "_SameMaskBatches", lambda m: _SameMaskBatches(m, max_bytes=1))
    alone = evaluate_task(model, split, 1, settings, device=torch.device("cpu"), num_labels=10)
    assert got.accuracy == alone.accuracy and got.inferred_tasks == alone.inferred_tasks
