"""What every pretext task is, and how several of them train one model together.

A pretext task (lightly's "method = backbone + head + loss + views") is a small `nn.Module` that

* makes its **views and targets** from a loader batch (masks, augmented copies, shuffled tiles ...),
* owns its **heads** (decoders, projectors), created by `attach` once the model's width is known,
* turns the model's output into a **loss and float logs**,
* can draw a **picture** of what it does (`visualise`, optional).

`Pretrainer` bundles the model with its tasks into one `nn.Module`, so the engine's optimizer,
checkpoints, DDP gradient averaging and EMA see the task heads as ordinary parameters and a resumed run
restores them. Each task becomes one engine objective (`Pretrainer.objectives`) with its own loss
weight; a task with ``start_step = N`` is silent before step N (the engine tells the model the step
through `set_step`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor, nn


class PretextTask(nn.Module):
    """Base class: override `loss` (and `views`, `attach`, `visualise` where needed).

    ``start_step``: the task contributes from this optimizer step on (0: from the start).
    """

    name: str = "pretext"

    def __init__(self, start_step: int = 0):
        super().__init__()
        self.start_step = start_step

    def attach(self, model: nn.Module) -> None:
        """Create the heads this task needs for ``model`` (called once, before training)."""

    def views(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Inputs and targets made from a batch (random draws happen here). Default: the batch itself."""
        return dict(batch)

    def loss(self, model: nn.Module, views: dict[str, Any]) -> tuple[Tensor | None, dict[str, float]]:
        """Scalar loss (mean over the micro-batch) and logs; ``None`` if the batch cannot serve this task."""
        raise NotImplementedError

    def forward(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[Tensor | None, dict[str, float]]:
        return self.loss(model, self.views(batch))

    def visualise(self, model: nn.Module, batch: Mapping[str, Any]) -> Any | None:
        """A matplotlib figure of the task on ``batch`` (e.g. masked input / reconstruction / truth)."""
        return None

    def active(self, step: int) -> bool:
        return step >= self.start_step


class TaskObjective:
    """One pretext task as an engine objective: ``objective(pretrainer, batch) -> (loss, logs)``."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, pretrainer: Pretrainer, batch: dict[str, Any]) -> tuple[Tensor | None, dict]:
        task = pretrainer.tasks[self.name]
        if not task.active(pretrainer.step):
            return None, {}
        loss, logs = task(pretrainer.model, batch)
        return loss, {f"{self.name}/{k}": v for k, v in logs.items()}


class Pretrainer(nn.Module):
    """The model plus its pretext tasks: what the engine trains during pre-training.

    ``pretrainer.model`` is the network that is kept afterwards (``pretrainer.model.save(dir)``); the
    task heads live in ``pretrainer.tasks`` and are saved in the run's checkpoints only.
    """

    def __init__(self, model: nn.Module, tasks: Iterable[PretextTask]):
        super().__init__()
        self.model = model
        self.tasks = nn.ModuleDict()
        for task in tasks:
            if task.name in self.tasks:
                raise ValueError(f"two pretext tasks are named {task.name!r}")
            task.attach(model)
            self.tasks[task.name] = task
        self.step = 0

    def set_step(self, step: int) -> None:
        """Called by the engine before every optimizer step (drives `PretextTask.start_step`)."""
        self.step = step

    def objectives(self) -> list[TaskObjective]:
        return [TaskObjective(name) for name in self.tasks]
