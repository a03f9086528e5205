"""SupSup training, task inference, evaluation and whole runs."""
from .evaluation import SCENARIOS, EvalSettings, evaluate_task
from .inference import METHODS, alpha_gradient, infer_binary, infer_oneshot, infer_task
from .objectives import OBJECTIVES, entropy, superfluous
from .training import TrainSettings, train_task

__all__ = ["SCENARIOS", "EvalSettings", "evaluate_task", "METHODS", "alpha_gradient", "infer_binary",
           "infer_oneshot", "infer_task", "OBJECTIVES", "entropy", "superfluous", "TrainSettings", "train_task"]
