"""medformer: multitask, multimodal self-supervised pre-training for 2D and 3D medical images.

``medformer.Medformer`` and ``medformer.MedformerConfig`` load on first use, so the command line
starts without importing torch.
"""

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("medformer")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+local"

__all__ = ["Medformer", "MedformerConfig", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Medformer", "MedformerConfig"):
        from medformer import models

        return getattr(models, name)
    raise AttributeError(f"module 'medformer' has no attribute {name!r}")
