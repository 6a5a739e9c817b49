"""Self-supervised pretext tasks: each one a `PretextTask`, trained together by a `Pretrainer`."""

from medformer.pretext.base import PretextTask, Pretrainer, TaskObjective

__all__ = ["PretextTask", "Pretrainer", "TaskObjective"]
