"""NNs: the model never sees the task index while training; masks are allocated by the rule of
:mod:`supsup_fast.algorithms.nns`. One rolling checkpoint (all masks + the allocator log), rewritten
whole as true tasks finish. Under torchrun every true task is trained data-parallel."""
from __future__ import annotations

import time
import warnings

from tqdm.auto import tqdm

from ..algorithms.evaluation import EvalSettings, evaluate_task
from ..algorithms.nns import AllocatorState, MaskAllocator
from ..nn import num_tasks
from ..ops.registry import backend_for, use_backend
from . import maskfile
from .loop import Experiment, evaluation_points, task_generator, train_subset, training_steps, unusable_checkpoint
from .rundir import RunDirError, check_identity


class NNsRun(Experiment):
    # A checkpoint takes time and bytes in proportion to the masks held, and every finished true task
    # may change any mask: written after every true task, a 2,500-task run would write about 100 GB.
    # One every max(1, masks // CHECKPOINT_SPACING) true tasks keeps the total linear in the run; an
    # interruption retrains at most that many true tasks (the same masks: each has its own seed).
    CHECKPOINT_SPACING = 64
    # Every task's masks in one rolling checkpoint (under checkpoints/): --retrain-corrupt does not apply.
    ROLLING_CHECKPOINT = "nns_latest.safetensors"

    def _row_at(self, rows: list, k: int) -> list:
        """``rows`` with the evaluation row after ``k`` true tasks computed from the masks held now:
        a row of the progress file is kept only if it was computed from the same masks (a run retrained
        from an earlier point, e.g. on other data after its checkpoint was deleted, has other masks)."""
        # Rank 0's digest for every rank: the decision below starts a collective evaluation or not.
        digest = self._on_main(lambda: maskfile.bank_digest(self.model))
        if any(r["tasks_learned"] == k and r.get("masks_sha256") == digest for r in rows):
            return rows
        row = self._evaluate_all(k, f"eval {k} true tasks")
        row["masks_sha256"] = digest
        rows = [r for r in rows if r["tasks_learned"] != k] + [row]
        self.save_progress(rows)
        return rows

    def _score_cache_file(self, done: int):
        return self.ckpt_dir / f"nns_scores_{done:06d}.safetensors"

    def _save_checkpoint(self, ckpt, allocator: MaskAllocator, done: int, after: list, train_seconds: float) -> None:
        """The float scores the allocator keeps (a reused mask trains on from them), then the masks and
        the log; each file names how many true tasks it follows, so an interruption between the two
        leaves the older checkpoint beside its own scores."""
        cache = self._score_cache_file(done)
        maskfile.save_score_cache(cache, allocator.score_cache(), extra={
            "true_tasks_done": done, "masks_sha256": maskfile.bank_digest(self.model), "run_identity": self.identity()})
        maskfile.save_model(self.model, ckpt, extra={
            "true_tasks_done": done, "accuracy_after_training": after, "train_seconds": train_seconds,
            "allocator": allocator.state.to_dict(), "run_identity": self.identity()})
        for old in self.ckpt_dir.glob("nns_scores_*.safetensors"):
            if old != cache:
                old.unlink(missing_ok=True)

    def _restore_score_cache(self, allocator: MaskAllocator, done: int) -> None:
        path = self._score_cache_file(done)
        if not path.exists():  # a run checkpointed before the scores were saved
            warnings.warn(f"{path} is missing: the masks that later true tasks train again start from scores "
                          f"rebuilt from their bits, so they may end other than an uninterrupted run's", stacklevel=2)
            return
        try:
            cache, extra = maskfile.load_score_cache(path)
            check_identity(path, extra, self.identity())
            digest = maskfile.bank_digest(self.model)
            if maskfile.require_extra(path, extra, "true_tasks_done", kind=int) != done or extra.get("masks_sha256") != digest:
                raise maskfile.MaskFileError("its scores are of other masks than the checkpoint's")
            allocator.restore_score_cache(cache)
        except ValueError as exc:  # MaskFileError, RunDirError
            raise RunDirError(f"{path} is unusable: {exc}. Delete it to resume without it (masks that later true "
                              f"tasks train again then start from scores rebuilt from their bits), or delete "
                              f"{self.ckpt_dir} to retrain this run from its first true task") from exc

    def run(self) -> dict:
        """NNs: the model never sees the task index; masks are allocated by the rule of
        :mod:`.nns`. One checkpoint (all masks + allocator log) after each true task."""
        self.prepare_out_dir()
        try:
            return self._run_nns_locked()
        finally:
            self.release()

    def _run_nns_locked(self) -> dict:
        cfg = self.config
        ckpt = self.ckpt_dir / self.ROLLING_CHECKPOINT
        done, after, train_seconds, state = 0, [], 0.0, None
        if self.resume and ckpt.exists():
            try:
                tensors, meta = maskfile.read_mask_file(ckpt)
            except maskfile.MaskFileError as exc:
                raise unusable_checkpoint(ckpt, exc) from exc
            check_identity(ckpt, maskfile.parse_metadata(ckpt, meta)[4], self.identity())
            extra = maskfile.apply_mask_file(self.model, ckpt, tensors, meta)
            done, after, train_seconds = maskfile.require_extra(ckpt, extra, "true_tasks_done", "accuracy_after_training",
                                                                 "train_seconds")
            state = AllocatorState.from_dict(maskfile.require_extra(ckpt, extra, "allocator", kind=dict))
        allocator = MaskAllocator(self.model, cfg.nns_settings(), cfg.seed, state, ctx=self.ctx)
        if done:
            self._restore_score_cache(allocator, done)
        self.nns_state = allocator.state
        with use_backend(cfg.backend):
            backend_name = backend_for(self.device).name
            rows = self.progress_rows()
            eval_points = evaluation_points(cfg)
            # A row is computed with the masks as they stand after its true task, and those change as
            # later true tasks train them: a point this run has passed without its row cannot be made up.
            passed = [k for k in eval_points if k < done and not any(r["tasks_learned"] == k for r in rows)]
            if passed:
                raise RunDirError(f"--eval-at {passed}: this NNs run has passed {'that point' if len(passed) == 1 else 'those points'} "
                                  f"({done} true tasks done) and its masks have changed since; NNs rows are computed "
                                  f"as the run reaches them: drop {'it' if len(passed) == 1 else 'them'} or start a new --out")
            self.commit_config()  # the checkpoint belongs to this run, and no --eval-at point was passed
            if 0 < done < cfg.tasks and done in eval_points:
                rows = self._row_at(rows, done)  # the checkpoint holds exactly those masks
            task_bar = tqdm(range(cfg.tasks), desc=f"NNs {cfg.benchmark}", unit="true task", disable=not self.progress)
            task_bar.update(done)
            saved = done
            for t in range(done, cfg.tasks):
                gen = task_generator(cfg.seed, t)
                split = train_subset(self.tasks.train(t), cfg.train_subset)
                steps = training_steps(cfg, split)
                step_bar = tqdm(total=steps, desc=f"true task {t}", unit="it", leave=False, disable=not self.progress)
                start = time.perf_counter()
                allocator.train_true_task(t, split, self.train_settings, device=self.device, generator=gen,
                                          on_step=lambda s, loss: step_bar.update(1))
                train_seconds += time.perf_counter() - start
                step_bar.close()
                trained = allocator.state.mask_for_task(t) is not None  # False only past the mask budget
                own = evaluate_task(self.model, self.tasks.test(t), t,
                                    EvalSettings(scenario="GG" if trained else "NNs", batch_size=cfg.test_batch_size),
                                    device=self.device, num_labels=self.tasks.num_labels, seed=cfg.seed,
                                    expected=self._expected_mask(t))
                after.append(own.accuracy)
                # The row before the checkpoint: interrupted between them, the resume retrains true task t
                # (the same masks) and finds its row, never a checkpoint past a point without its row.
                if t + 1 in eval_points and t + 1 < cfg.tasks:
                    rows = self._row_at(rows, t + 1)
                if t + 1 - saved >= max(1, num_tasks(self.model) // self.CHECKPOINT_SPACING) or t + 1 == cfg.tasks:
                    self._on_main(lambda: self._save_checkpoint(ckpt, allocator, t + 1, after, train_seconds))
                    saved = t + 1
                task_bar.update(1)
                task_bar.set_postfix(masks=num_tasks(self.model), acc=f"{own.accuracy:.4f}")
            allocator.finish()
            self._on_main(lambda: maskfile.save_model(self.model, self.out / "model.safetensors",
                                                     extra={**self._model_extra(after), **self._nns_extra()}))
            rows = self._row_at(rows, cfg.tasks)  # the points before were reached in the loop
            task_bar.close()
        results = self._results(after, rows, train_seconds, done, backend_name)
        self._on_main(lambda: self._write_outputs(results))
        return results

