"""CNN baselines behind Medformer's interface: the same batch in, the same ``{task key: output}`` dict out.

- `ResNetBaseline`: MONAI's ResNet-18 or ResNet-50, 2D or 3D, the collection's modalities as input
  channels (absent ones zeroed), one Linear head per task on the pooled features. Stem: by default
  ``stem="medmnist"``, the MedMNIST papers' stem for 28-pixel inputs (3x3 conv, stride 1, no max-pool:
  ``conv1_t_size=3, conv1_t_stride=1, no_max_pool=True``); ``stem="imagenet"`` is the original 7x7
  stride-2 conv + max-pool, for inputs of 128 pixels and more.
- `UNetBaseline`: MONAI's U-Net (3D by default) for segmentation tasks; inputs are padded to a multiple
  of its total stride and the output cropped back.

Unlike Medformer they have a fixed modality list (input channels) and are built for one collection.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from monai.networks.nets import ResNet, UNet
from torch import Tensor, nn

from medformer.data.study import TaskSpec
from medformer.models.heads import OrdinalMode, head_width
from medformer.models.tokenizers import pad_to_multiple

RESNETS: dict[int, tuple[str, list[int], int]] = {  # depth -> (block, layers, feature expansion)
    18: ("basic", [2, 2, 2, 2], 1),
    50: ("bottleneck", [3, 4, 6, 3], 4),
}
STEMS: dict[str, dict[str, Any]] = {
    "medmnist": {"conv1_t_size": 3, "conv1_t_stride": 1, "no_max_pool": True},
    "imagenet": {"conv1_t_size": 7, "conv1_t_stride": 2, "no_max_pool": False},
}


def _task_keys(
    tasks: Sequence[TaskSpec] | Mapping[str, TaskSpec], collection: str | None
) -> dict[str, TaskSpec]:
    """Keys as Medformer makes them: ``"<collection>/<task>"``, or the task name when unbound."""
    if isinstance(tasks, Mapping):
        return dict(tasks)
    return {spec.name if collection is None else f"{collection}/{spec.name}": spec for spec in tasks}


class _BatchInput(nn.Module):
    """Shared input handling: a batch dict or tensor -> ``(B, C, *spatial)``, this model's channel order."""

    def __init__(self, modalities: Sequence[str], collection: str | None):
        super().__init__()
        self.modalities = tuple(modalities)
        self.collection = collection

    def tasks_for(self, collection: str | None, ndim: int | None = None) -> list[str]:
        """All of this baseline's tasks: it is built for one collection (same call as Medformer's)."""
        return list(self.tasks)

    def images(
        self, x: Mapping[str, Any] | Tensor, modalities: Sequence[str] | None, present: Tensor | None
    ) -> Tensor:
        if isinstance(x, Mapping):
            images = x["images"]
            modalities = modalities if modalities is not None else x["modalities"]
            present = present if present is not None else x.get("present")
        else:
            images = x
        modalities = tuple(modalities) if modalities is not None else self.modalities
        unknown = sorted(set(modalities) - set(self.modalities))
        if unknown:
            raise KeyError(
                f"modalities {unknown} are not input channels of this baseline ({list(self.modalities)})"
            )
        images = images.float()
        if present is not None:
            absent = ~present.to(images.device, torch.bool).view(*present.shape, *[1] * (images.dim() - 2))
            images = images.masked_fill(absent, 0.0)
        if modalities == self.modalities:
            return images
        out = images.new_zeros(images.shape[0], len(self.modalities), *images.shape[2:])
        for i, m in enumerate(modalities):
            out[:, self.modalities.index(m)] = images[:, i]
        return out


class ResNetBaseline(_BatchInput):
    """MONAI ResNet-18/50 classifier/regressor with one Linear head per task (not segmentation)."""

    def __init__(
        self,
        ndim: int,
        modalities: Sequence[str],
        tasks: Sequence[TaskSpec] | Mapping[str, TaskSpec],
        *,
        depth: Literal[18, 50] = 18,
        stem: Literal["medmnist", "imagenet"] = "medmnist",
        collection: str | None = None,
        ordinal: OrdinalMode = "classes",
    ):
        super().__init__(modalities, collection)
        if depth not in RESNETS or stem not in STEMS:
            raise ValueError(f"depth must be one of {list(RESNETS)} and stem one of {list(STEMS)}")
        self.tasks = _task_keys(tasks, collection)
        dense = [k for k, s in self.tasks.items() if s.kind == "segmentation"]
        if dense:
            raise ValueError(f"ResNetBaseline cannot segment ({dense}); use UNetBaseline")
        block, layers, expansion = RESNETS[depth]
        self.backbone = ResNet(
            block, layers, [64, 128, 256, 512], spatial_dims=ndim, n_input_channels=len(self.modalities),
            feed_forward=False, **STEMS[stem],
        )  # fmt: skip
        self.heads = nn.ModuleDict(
            {k: nn.Linear(512 * expansion, head_width(s, ordinal)) for k, s in self.tasks.items()}
        )

    def forward(
        self,
        x: Mapping[str, Any] | Tensor,
        modalities: Sequence[str] | None = None,
        present: Tensor | None = None,
        collection: str | None = None,
        tasks: Sequence[str] | None = None,
    ) -> dict[str, Tensor]:
        features = self.backbone(self.images(x, modalities, present))
        return {k: self.heads[k](features) for k in (tasks if tasks is not None else self.tasks)}


class UNetBaseline(_BatchInput):
    """MONAI U-Net for one or more segmentation tasks: one network, its output channels split per task."""

    def __init__(
        self,
        modalities: Sequence[str],
        tasks: Sequence[TaskSpec] | Mapping[str, TaskSpec],
        *,
        ndim: int = 3,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        strides: Sequence[int] = (2, 2, 2, 2),
        num_res_units: int = 2,
        collection: str | None = None,
    ):
        super().__init__(modalities, collection)
        self.tasks = _task_keys(tasks, collection)
        other = [k for k, s in self.tasks.items() if s.kind != "segmentation"]
        if other:
            raise ValueError(
                f"UNetBaseline only segments; {other} are not segmentation tasks (use ResNetBaseline)"
            )
        self.widths = [s.out_channels for s in self.tasks.values()]
        self.multiple = math.prod(strides)
        self.unet = UNet(
            spatial_dims=ndim, in_channels=len(self.modalities), out_channels=sum(self.widths),
            channels=tuple(channels), strides=tuple(strides), num_res_units=num_res_units,
        )  # fmt: skip

    def forward(
        self,
        x: Mapping[str, Any] | Tensor,
        modalities: Sequence[str] | None = None,
        present: Tensor | None = None,
        collection: str | None = None,
        tasks: Sequence[str] | None = None,
    ) -> dict[str, Tensor]:
        images = self.images(x, modalities, present)
        spatial = images.shape[2:]
        y = self.unet(pad_to_multiple(images, self.multiple))[(..., *[slice(0, s) for s in spatial])]
        outputs = dict(zip(self.tasks, torch.split(y, self.widths, dim=1)))
        return {k: outputs[k] for k in (tasks if tasks is not None else self.tasks)}
