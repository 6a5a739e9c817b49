"""Training: `fit` runs objectives over multi-collection batches on one or many processes."""

from medformer.config import TrainConfig
from medformer.train.engine import FitResult, NonFiniteLossError, Objective, fit
from medformer.train.optim import finetune_param_groups

__all__ = ["FitResult", "NonFiniteLossError", "Objective", "TrainConfig", "finetune_param_groups", "fit"]
