"""medformer: multitask, multimodal self-supervised pre-training for 2D and 3D medical images."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("medformer")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+local"

__all__ = ["__version__"]
