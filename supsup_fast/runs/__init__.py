"""The application layer: a whole run (config, the task loop, scenario drivers, results and
files, distributed launch). The CLI calls :func:`run_experiment` and :func:`evaluate_run`."""
from __future__ import annotations

from pathlib import Path
from typing import Union

from ..distributed import SINGLE, DistContext
from .config import RunConfig, load_yaml, make_config
from .evaluate import evaluate_run
from .hopsupsup import HopSupSupRun
from .loop import Experiment, refuse_existing_run
from .nns import NNsRun
from .supsup import SupSupRun


def driver_for(config: RunConfig) -> type:
    """The scenario driver that runs ``config``."""
    if config.inference == "hopfield":
        return HopSupSupRun
    return NNsRun if config.scenario == "NNs" else SupSupRun


def run_experiment(config: RunConfig, out: Union[str, Path], resume: bool = False, progress: bool = True,
                   ctx: DistContext = SINGLE, retrain_corrupt: bool = False) -> dict:
    if not resume and not ctx.enabled:  # at once, not after the data and a first-use compile of the kernels
        refuse_existing_run(Path(out))  # (under torchrun rank 0 checks it, under the run lock)
    return driver_for(config)(config, out, resume, progress, ctx=ctx, retrain_corrupt=retrain_corrupt).run()



__all__ = ["RunConfig", "load_yaml", "make_config", "run_experiment", "evaluate_run", "driver_for", "Experiment",
           "SupSupRun", "NNsRun", "HopSupSupRun"]
