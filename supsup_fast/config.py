"""Run configuration: defaults < YAML preset < command-line flags."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Union

import yaml

from .algorithms.evaluation import SCENARIOS
from .algorithms.inference import METHODS

INFERENCE_METHODS = METHODS + ("hopfield",)
PARALLEL_MODES = ("auto", "task", "data")
from .algorithms.objectives import OBJECTIVES
from .algorithms.training import OPTIMIZERS, SCHEDULERS
from .data import BENCHMARK_MODELS, BENCHMARKS
from .models import MODELS


@dataclass
class RunConfig:
    scenario: str = "GNu"
    benchmark: str = "permuted-mnist"
    model: str = "fc1024"
    tasks: int = 10
    output_size: Optional[int] = None     # None: 100 for GNs/GNu (superfluous neurons), ℓ for GG
    iters: Optional[int] = 1000           # batches per task; None = full epochs
    epochs: int = 3
    batch_size: int = 128
    lr: float = 1e-4
    optimizer: str = "rmsprop"
    weight_decay: float = 0.0
    scheduler: str = "none"
    warmup_epochs: int = 5                 # cosine_warmup only
    image_size: int = 224                  # split-imagenet only: crop size
    mask_fn: Optional[str] = None          # None: threshold for MLPs, topk for ResNets
    density: Optional[float] = None
    er_multiplier: Optional[float] = None
    init: str = "signed_constant"
    inference: str = "oneshot"
    objective: str = "entropy"
    infer_images: int = 1
    log_base: float = 2.0
    test_batch_size: int = 128
    eval_at: List[int] = field(default_factory=list)  # also evaluate all learned tasks after these many
    data_root: Optional[str] = None        # None: the MNIST subset embedded in the package
    download: bool = False
    seed: int = 1
    backend: str = "auto"
    device: str = "cpu"
    train_subset: Optional[int] = None     # use only the first N training images per task (smoke runs)
    transfer: bool = False                 # start each task's scores from the running mean of earlier tasks' scores
    mask_budget: int = 2500                # NNs: most masks ever allocated
    nns_epsilon: float = 0.125             # NNs: allocate when K · max softmax(-∇αH) < 1 + ε
    nns_check_every: int = 100             # NNs: training batches between allocation decisions
    nns_score_cache: int = 4               # NNs: masks whose float scores are kept for further training
    hop_gamma: float = 1.5e-3              # HopSupSup: weight of the Hopfield energy in recovery
    hop_recovery_lr: float = 500.0         # HopSupSup: SGD learning rate of the recovery
    hop_recovery_trials: int = 1           # HopSupSup: recoveries per task, each over another test-batch order
    parallel: str = "auto"                 # world size > 1: "task" (GG/GNs/GNu), "data" (DDP; NNs, Transfer); auto picks
    shard_bank: bool = False               # evaluations: each rank holds only its own range of tasks' bits

    # Fields that may change between an interrupted run and its --resume.
    RESUMABLE_CHANGES = ("backend", "device", "download", "data_root", "parallel", "shard_bank")

    def validate(self) -> "RunConfig":
        def one_of(name, value, options):
            if value not in options:
                raise ValueError(f"--{name.replace('_', '-')} must be one of {list(options)}, got {value!r}")
        one_of("scenario", self.scenario, SCENARIOS)
        one_of("benchmark", self.benchmark, BENCHMARKS)
        one_of("model", self.model, MODELS)
        one_of("optimizer", self.optimizer, OPTIMIZERS)
        one_of("scheduler", self.scheduler, SCHEDULERS)
        one_of("inference", self.inference, INFERENCE_METHODS)
        one_of("objective", self.objective, OBJECTIVES)
        one_of("parallel", self.parallel, PARALLEL_MODES)
        for name in ("tasks", "epochs", "batch_size", "infer_images", "test_batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive int, got {getattr(self, name)!r}")
        if self.iters is not None and (not isinstance(self.iters, int) or self.iters < 1):
            raise ValueError(f"--iters must be a positive int, got {self.iters!r}")
        if self.output_size is not None and (not isinstance(self.output_size, int) or self.output_size < 1):
            raise ValueError(f"--output-size must be a positive int, got {self.output_size!r}")
        for name in ("warmup_epochs", "image_size", "mask_budget", "nns_check_every", "nns_score_cache", "hop_recovery_trials"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive int, got {getattr(self, name)!r}")
        if not self.nns_epsilon >= 0:
            raise ValueError(f"--nns-epsilon must be >= 0, got {self.nns_epsilon}")
        if (self.inference == "hopfield") != (self.model == "bnnet"):
            raise ValueError("--inference hopfield (HopSupSup) goes with --model bnnet, and bnnet only with hopfield; "
                             f"got --inference {self.inference} --model {self.model}")
        if self.inference == "hopfield" and self.scenario != "GNu":
            raise ValueError(f"--inference hopfield runs scenario GNu, got --scenario {self.scenario}")
        if self.scenario == "NNs" and self.model not in ("fc1024", "lenet"):
            raise ValueError(f"--scenario NNs needs an MLP without per-task BN (fc1024 or lenet), got --model {self.model}")
        if self.scenario == "NNs" and self.transfer:
            raise ValueError("--transfer does not apply to --scenario NNs (a new mask starts from its slot's random scores)")
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        fits = BENCHMARK_MODELS[self.benchmark]
        if self.model not in fits:
            raise ValueError(f"--model {self.model} does not fit the inputs of {self.benchmark}; use one of {list(fits)}")
        return self

    def nns_settings(self):
        from .algorithms.nns import NNsSettings
        return NNsSettings(check_every=self.nns_check_every, epsilon=self.nns_epsilon, budget=self.mask_budget,
                           score_cache=self.nns_score_cache)

    def resolved_output_size(self, num_labels: int) -> int:
        size = self.output_size if self.output_size is not None else (num_labels if self.scenario == "GG" else max(100, num_labels))
        if size < num_labels:
            raise ValueError(f"--output-size {size} is smaller than the {num_labels} labels of {self.benchmark}; "
                             f"it must be >= {num_labels} (extra neurons are the superfluous neurons)")
        return size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name for f in dataclasses.fields(RunConfig)}


def load_yaml(path: Union[str, Path]) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of settings")
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise ValueError(f"config file {path} has unknown settings {unknown}; known: {sorted(FIELDS)}")
    return data


def make_config(preset: Optional[dict] = None, overrides: Optional[dict] = None) -> RunConfig:
    values = dict(preset or {})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = sorted(set(values) - FIELDS)
    if unknown:
        raise ValueError(f"unknown settings {unknown}")
    return RunConfig(**values).validate()
