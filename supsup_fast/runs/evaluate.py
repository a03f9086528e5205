"""Re-evaluation of a finished run (``supsup-fast evaluate``): its masks under other evaluation
settings, in one process or under torchrun (tasks spread over ranks, or a sharded bank)."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Union

from ..algorithms.nns import AllocatorState
from ..distributed import SINGLE, DistContext
from ..ops.registry import backend_for, use_backend
from . import maskfile
from .config import RunConfig, warn_unused_under_gg
from .loop import Experiment
from .results import read_json, write_json
from .rundir import RunDirError, RunLock, check_identity, run_identity


def evaluate_run(run_dir: Union[str, Path], overrides: dict, out: Union[str, Path], progress: bool = True,
                 ctx: DistContext = SINGLE) -> dict:
    """Re-evaluate a finished run's masks (its model.safetensors) under other evaluation settings,
    e.g. the masks of a GNu run under GG or GNs. Training settings stay those of the run. With
    ``shard_bank`` under torchrun each rank reads only its own range of the task checkpoints."""
    run_dir, out = Path(run_dir), Path(out)
    cfg_path, model_path = run_dir / "config.json", run_dir / "model.safetensors"
    if (run_dir / "hopfield.safetensors").is_file() or (run_dir / "checkpoints" / "hopfield.safetensors").is_file():
        raise RunDirError(f"{run_dir} is a HopSupSup run (--inference hopfield): its masks live in its Hopfield "
                          f"network, not in a mask file, so `evaluate` has none to re-evaluate")
    if not cfg_path.is_file() or not model_path.is_file():
        missing = " and ".join(p.name for p in (cfg_path, model_path) if not p.is_file())
        hint = (f"; if it was interrupted, `supsup-fast run --out {run_dir} --resume` finishes it"
                if cfg_path.is_file() else "")  # resume needs the run's config
        raise RunDirError(f"{run_dir} is not a finished run (it has no {missing}){hint}")
    check_output_folder(run_dir, out)
    values = read_json(cfg_path, "run config", "restore it, or delete it and run `supsup-fast run` with the run's "
                       f"settings, --out {run_dir} and --resume to write it again (the finished tasks are kept)")
    trained_as = values.get("scenario")
    # How the run trained and when it evaluated (--parallel, --shard-bank, --eval-at) are not this
    # evaluation's settings: it evaluates all tasks once, sharded only when asked.
    values.update(parallel="auto", shard_bank=False, eval_at=[])
    values["download"] = False  # the run's own --download is not this evaluation's: only when asked
    values.update(overrides)
    try:
        config = RunConfig(**values).validate()
    except TypeError as exc:
        raise RunDirError(f"{cfg_path} is not a supsup_fast run config ({exc})") from exc
    warn_unused_under_gg(config.scenario, overrides)
    sharded = config.shard_bank and ctx.enabled
    # Sharded, no rank loads the file (load_model would verify it): its checksum is checked here,
    # streamed, before its metadata is trusted or the file copied to the output folder.
    with _rewrite_hint(run_dir):
        meta = maskfile.verify_mask_file(model_path) if sharded else maskfile.read_metadata(model_path)
    extra = maskfile.parse_metadata(model_path, meta)[4]
    # NNs masks are allocated as tasks arrive, the others one per task: say so before the identity
    # check, whose digest differs between the two for that reason.
    if config.scenario == "NNs" and "allocator" not in extra:
        raise RunDirError(f"--scenario NNs needs the masks of an NNs run; {run_dir} was trained as {trained_as}")
    if config.scenario != "NNs" and "allocator" in extra:
        raise RunDirError(f"{run_dir} is an NNs run (its masks were allocated as tasks arrived, not one per task): "
                          f"evaluate it as NNs (leave out --scenario), not as {config.scenario}")
    identity = run_identity(config, "")
    check_identity(model_path, extra, {k: identity[k] for k in ("settings_sha256", "settings")})
    after = maskfile.require_extra(model_path, extra, "accuracy_after_training", kind=list)
    held = int(meta["num_tasks"])
    if config.scenario != "NNs" and not (held == len(after) == config.tasks):
        raise RunDirError(f"{model_path} holds {held} tasks, but the run {run_dir} trained {config.tasks} "
                          f"({len(after)} with accuracies recorded): the file is incomplete or from an unfinished run")
    if sharded and config.scenario == "NNs":
        raise ValueError("--shard-bank does not apply to NNs runs (one checkpoint holds all masks)")
    with _rewrite_hint(run_dir):
        model = None if sharded else maskfile.load_model(model_path)
    exp = Experiment(config, out, progress=progress, model=model, ctx=ctx)
    if sharded:  # each rank reads its own range of the run's checkpoints (the run folder may be read-only)
        exp.ckpt_dir = run_dir / "checkpoints"
    exp.parallel = "shard" if sharded else ("task" if ctx.enabled else "single")  # results.distributed.parallel
    if "data_root" not in overrides:  # the run's own data: its masks must have been trained on it
        check_identity(model_path, extra, {"data_sha256": exp.data_sha256})
    # The run's own output size (a GG run's is its labels, where the new scenario's default would be 100)
    exp.output_size = json.loads(meta["model_spec"]).get("output_size", exp.output_size)
    if sharded:
        exp.data_sha256 = extra["run_identity"].get("data_sha256", exp.data_sha256)  # the run's own checkpoints
    if config.scenario == "NNs":
        exp.nns_state = AllocatorState.from_dict(maskfile.require_extra(model_path, extra, "allocator", kind=dict))
    # One writer per folder, as for a run; every rank learns if rank 0 could not take the lock.
    held: list = []
    exp._on_main(lambda: held.append(RunLock(out).acquire()))
    lock = held[0] if held else None
    try:
        return _evaluate(exp, config, run_dir, out, model_path, meta, after, sharded, ctx)
    finally:
        if lock is not None:
            lock.release()


@contextlib.contextmanager
def _rewrite_hint(run_dir: Path):
    """A damaged model file of the run is refused with the command that writes it again."""
    try:
        yield
    except maskfile.MaskFileError as exc:
        raise RunDirError(f"{exc}; `supsup-fast run --out {run_dir} --resume` writes it again from the run's "
                          f"task checkpoints") from exc


def _evaluate(exp: Experiment, config: RunConfig, run_dir: Path, out: Path, model_path: Path, meta: dict, after: list,
              sharded: bool, ctx: DistContext) -> dict:
    with use_backend(config.backend):
        backend_name = backend_for(exp.device).name
        # NNs: the true tasks seen (one accuracy-after-training each), not the masks allocated.
        learned = len(after) if config.scenario == "NNs" else int(meta["num_tasks"])
        row = exp._evaluate_all(learned, "evaluate")
    if sharded and not ctx.is_main:
        exp._on_main(lambda: None)
        return {"rank": ctx.rank, **row}
    # Sharded, no rank holds the whole model: the summary adds up the ranks' and the run's mask file is
    # copied as it is, never loaded.
    results = exp._results(after, [row], 0.0, 0, backend_name)
    results["evaluated_from"] = str(run_dir)
    # config.json with the outputs: a failed evaluation leaves no folder that looks evaluated.
    exp._on_main(lambda: (write_json(out / "config.json", config.to_dict()),
                          exp._write_outputs(results, model_file=model_path if sharded else None,
                                             model_checksum=meta["checksum"])))
    return results


def check_output_folder(run_dir: Path, out: Path) -> None:
    """Refuse an ``out`` where the evaluation's files (config.json, results.json, model.safetensors,
    ...) would replace a run's: the evaluated run's own folder, or any folder a training run wrote
    (its progress.json or checkpoints/). An earlier evaluation's folder may be written again."""
    if out.resolve() == run_dir.resolve():
        raise RunDirError(f"--out {out} is the evaluated run's own folder: its config.json, results.json and "
                          f"model.safetensors would be replaced; choose another folder (the default is {run_dir / 'eval-<scenario>'})")
    if (out / "progress.json").exists() or (out / "checkpoints").is_dir():
        raise RunDirError(f"--out {out} holds a training run (progress.json or checkpoints/), which the evaluation "
                          f"would overwrite; choose another folder")
