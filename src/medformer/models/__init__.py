"""Models: Medformer (Input Adaptformer -> Main Body -> Output Adaptformer) and CNN baselines.

The baselines (`ResNetBaseline`, `UNetBaseline`) import MONAI's networks, so they load on first use.
"""

from typing import Any

from medformer.models.body import PRESETS
from medformer.models.medformer import CheckpointError, LoadReport, Medformer, MedformerConfig, TaskEntry
from medformer.models.tokenizers import Encoded, TokenSet

__all__ = [
    "PRESETS",
    "CheckpointError",
    "Encoded",
    "LoadReport",
    "Medformer",
    "MedformerConfig",
    "ResNetBaseline",
    "TaskEntry",
    "TokenSet",
    "UNetBaseline",
]


def __getattr__(name: str) -> Any:
    if name in ("ResNetBaseline", "UNetBaseline"):
        from medformer.models import cnn

        return getattr(cnn, name)
    raise AttributeError(f"module 'medformer.models' has no attribute {name!r}")
