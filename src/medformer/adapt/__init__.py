"""Domain adaptation: take a trained Medformer to a new site, scanner or collection with few or no labels.

- `adapter`: adapter-only adaptation (new collection latents, frozen body) and ``medformer adapt``;
- `alignment`: unsupervised source/target feature alignment objectives (DANN, CORAL);
- `gradient_reversal`: the gradient reversal layer and domain classifier of DANN;
- `tta`: test-time adaptation by entropy minimisation of LayerNorm affine parameters (TENT).
"""

from medformer.adapt.adapter import (
    AdaptConfig,
    adapter_parameter_names,
    add_adapted_collection,
    freeze_all_but,
    run_adapt,
)
from medformer.adapt.alignment import AlignmentObjective, coral_loss, pooled_features
from medformer.adapt.gradient_reversal import DomainClassifier, dann_lambda, grad_reverse
from medformer.adapt.tta import tent, tent_on_dataset

__all__ = [
    "AdaptConfig",
    "AlignmentObjective",
    "DomainClassifier",
    "adapter_parameter_names",
    "add_adapted_collection",
    "coral_loss",
    "dann_lambda",
    "freeze_all_but",
    "grad_reverse",
    "pooled_features",
    "run_adapt",
    "tent",
    "tent_on_dataset",
]
