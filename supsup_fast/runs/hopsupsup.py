"""A HopSupSup run (``--model bnnet --inference hopfield``): train and store each task's neuron
masks, then recover every task's masks from its test batches and classify with them.

Checkpoints: after each task, ``checkpoints/hopfield.safetensors`` holds the Hopfield matrices and
the true masks so far (kept only to measure recovery), written atomically; ``--resume`` continues
after the last finished task."""
from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from ..algorithms.hopsupsup import accuracy, hopfield_bytes, recover_masks, set_masks, train_task
from ..atomic_files import remove_temporaries
from .loop import Experiment, task_generator, train_subset, unusable_checkpoint
from .maskfile import MaskFileError, load_hopfield_checkpoint, require_extra, save_hopfield_checkpoint
from .results import machine_info, write_csv, write_json, write_plot


class HopSupSupRun(Experiment):
    # Every task in one rolling checkpoint (under checkpoints/): --retrain-corrupt does not apply.
    ROLLING_CHECKPOINT = "hopfield.safetensors"

    def run(self) -> dict:
        self.prepare_out_dir()
        try:
            return run_hopsupsup(self)
        finally:
            self.release()


def run_hopsupsup(exp: Experiment) -> dict:

    cfg, model, device = exp.config, exp.model, exp.device
    s = cfg.hop_settings()
    ckpt = exp.ckpt_dir / HopSupSupRun.ROLLING_CHECKPOINT
    exp.ckpt_dir.mkdir(parents=True, exist_ok=True)
    true_masks, after, train_seconds, done = [], [], 0.0, 0
    if exp.resume and ckpt.exists():
        try:
            extra, true_masks = load_hopfield_checkpoint(ckpt, model, exp.identity())
        except MaskFileError as exc:
            raise unusable_checkpoint(ckpt, exc) from exc
        done, after, train_seconds = require_extra(ckpt, extra, "tasks_done", "accuracy_after_training", "train_seconds")
    exp.commit_config()  # the checkpoint belongs to this run
    bar = tqdm(range(cfg.tasks), desc="HopSupSup train", unit="task", disable=not exp.progress)
    bar.update(done)
    for t in range(done, cfg.tasks):
        start = time.perf_counter()
        split = train_subset(exp.tasks.train(t), cfg.train_subset)
        masks = train_task(model, split, s, device=device, generator=task_generator(cfg.seed, t))
        train_seconds += time.perf_counter() - start
        true_masks.append(masks)
        set_masks(model, masks)
        after.append(accuracy(model, exp.tasks.test(t), s.test_batch_size, device=device,
                              generator=torch.Generator().manual_seed(10_000 * cfg.seed + t)))
        save_hopfield_checkpoint(ckpt, model, true_masks, {"tasks_done": t + 1, "accuracy_after_training": after, "train_seconds": train_seconds,
                                        "run_identity": exp.identity()})
        bar.update(1)
        bar.set_postfix(acc=f"{after[-1]:.4f}")
    bar.close()
    start = time.perf_counter()
    trials = cfg.hop_recovery_trials
    accs, exact, first, bit_errors, steps = [], [], [], [], []
    bar = tqdm(total=cfg.tasks * trials, desc="HopSupSup recover", unit="recovery", disable=not exp.progress)
    for t in range(cfg.tasks):
        test = exp.tasks.test(t)
        acc_t, exact_t, first_t, err_t = [], [], [], []
        for trial in range(trials):  # each trial sees the test batches in another order
            order = torch.Generator().manual_seed(20_000 * cfg.seed + 100 * t + trial)
            rec = recover_masks(model, test, s, device=device, generator=order, true_masks=true_masks[t])
            acc_t.append(accuracy(model, test, s.test_batch_size, device=device,
                                  generator=torch.Generator().manual_seed(10_000 * cfg.seed + t)))
            exact_t.append(rec.bit_errors == 0)
            first_t.append(rec.first_exact_step)
            err_t.append(rec.bit_errors)
            bar.update(1)
        accs.append(sum(acc_t) / trials)
        exact.append(sum(exact_t) / trials)
        first.append(first_t)
        bit_errors.append(err_t)
        steps.append(rec.steps)
    bar.close()
    eval_seconds = time.perf_counter() - start
    # Every test batch of a task is classified with the masks recovered for it, so the share of
    # test batches classified with exactly the true masks weighs each recovery by its batch count.
    batches = [exp.tasks.test(t).num_batches(s.test_batch_size) for t in range(cfg.tasks)]
    on_true = sum(b * e for b, e in zip(batches, exact)) / sum(batches)
    per_task_inf = exact
    avg = sum(accs) / len(accs)
    results = {
        "average_accuracy": avg, "per_task_accuracy": accs,
        "task_inference_accuracy": on_true, "per_task_inference_accuracy": per_task_inf,
        "accuracy_after_training": after,
        "accuracy_matrix": [{"tasks_learned": cfg.tasks, "accuracy": accs, "task_inference": per_task_inf,
                             "average_accuracy": avg, "task_inference_accuracy": on_true, "seconds": eval_seconds}],
        "hopsupsup": {"recovered_exactly": exact, "recovery_trials": trials, "test_batches_with_true_mask": on_true,
                      "first_exact_step": first, "recovery_steps": steps, "bit_errors": bit_errors,
                      "gamma": s.gamma, "recovery_lr": s.recovery_lr, "test_batch_size": s.test_batch_size},
        "num_masks": cfg.tasks, "mask_bytes": 0, "hopfield_bytes": hopfield_bytes(model), "bn_bytes": 0,
        "output_size": exp.output_size, "num_labels": exp.tasks.num_labels,
        "timing": {"train": train_seconds, "eval": eval_seconds, "eval_by_tasks_learned": {str(cfg.tasks): eval_seconds},
                   "tasks_resumed": done},
        "backend": "torch", "machine": machine_info(device), "data": exp.tasks.source, "config": cfg.to_dict(),
    }
    write_json(exp.out / "results.json", results)
    save_hopfield_checkpoint(exp.out / "hopfield.safetensors", model, true_masks, {"tasks_done": cfg.tasks, "accuracy_after_training": after,
                                                                 "train_seconds": train_seconds,
                                                                 "run_identity": exp.identity()})
    write_csv(results, exp.out / "per_task.csv")
    write_plot(results, exp.out / "accuracy.png")
    remove_temporaries(exp.out, exp.ckpt_dir)  # of writes killed in an earlier attempt (one process: none at work)
    return results
