"""Self-supervised pretext tasks: each one a `PretextTask`, trained together by a `Pretrainer`.

Tasks register a config name with `register_task`; importing this package registers the built-in ones.
"""

from medformer.pretext.base import PretextTask, Pretrainer, TaskObjective
from medformer.pretext.registry import TASKS, build_tasks, register_task, task_class

# built-in tasks (importing a module registers its tasks)
from medformer.pretext.contrastive import Contrastive  # isort: skip
from medformer.pretext.cross_dimensional import CrossDimensional  # isort: skip
from medformer.pretext.mae import MAE  # isort: skip
from medformer.pretext.puzzle import JigsawPuzzle  # isort: skip
from medformer.pretext.source_prediction import SourcePrediction  # isort: skip

__all__ = [
    "MAE",
    "TASKS",
    "Contrastive",
    "CrossDimensional",
    "JigsawPuzzle",
    "PretextTask",
    "Pretrainer",
    "SourcePrediction",
    "TaskObjective",
    "build_tasks",
    "register_task",
    "task_class",
]
