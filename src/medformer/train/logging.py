"""What rank 0 writes while training: metrics.jsonl, train.log, TensorBoard scalars, the progress bar.

``metrics.jsonl`` has one JSON object per line: a training record every ``log_every`` steps (``step``,
``epoch``, ``lr``, ``loss``, ``loss/<objective>``, the objectives' own logs, ``samples_per_s``,
``data_wait``, ...) and one per evaluation (``{"step": ..., "split": "val", ...metrics}``). On resume the
records after the checkpoint's step (written by the interrupted run) are dropped, so the file reads as
one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger("medformer.train")


def read_metrics(path: Path, up_to_step: int | None = None) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (those with ``step <= up_to_step`` when given)."""
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if up_to_step is None or r.get("step", 0) <= up_to_step]


class RunLog:
    """Outputs of one training run; a no-op on ranks other than 0 (``enabled=False``)."""

    def __init__(
        self,
        output: Path,
        enabled: bool,
        total: int,
        initial: int = 0,
        progress: bool = True,
        history: list[dict[str, Any]] | None = None,
    ):
        self.enabled = enabled
        self.history: list[dict[str, Any]] = list(history or [])
        self.writer = None
        self.handler: logging.Handler | None = None
        self.bar = tqdm(total=total, initial=initial, disable=not (enabled and progress), unit="step")
        if not enabled:
            return
        self.metrics_path = output / "metrics.jsonl"
        # rewrite: keeps the records up to a resumed checkpoint, drops the interrupted run's later ones
        self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        self.metrics_file = self.metrics_path.open("a", buffering=1)  # line-buffered: survives a crash
        self.handler = logging.FileHandler(output / "train.log")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        root = logging.getLogger("medformer")
        root.addHandler(self.handler)
        self.level = root.level
        if root.getEffectiveLevel() > logging.INFO:
            root.setLevel(logging.INFO)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output / "tensorboard"), purge_step=initial or None)
        except ImportError:  # tensorboard is optional (pip install medformer[tensorboard])
            self.writer = None

    def record(self, values: dict[str, Any], prefix: str = "train") -> None:
        """Append one record to metrics.jsonl and TensorBoard (``prefix/key`` tags)."""
        if not self.enabled:
            return
        self.history.append(values)
        self.metrics_file.write(json.dumps(values) + "\n")
        if self.writer is not None:
            step = int(values["step"])
            for k, v in values.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(k if "/" in k else f"{prefix}/{k}", v, step)

    def info(self, message: str, *args: Any) -> None:
        if self.enabled:
            log.info(message, *args)

    def step(self) -> None:
        self.bar.update(1)

    def postfix(self, loss: float | None) -> None:
        if loss is not None:
            self.bar.set_postfix(loss=f"{loss:.4g}", refresh=False)

    def close(self) -> None:
        self.bar.close()
        if not self.enabled:
            return
        self.metrics_file.close()
        if self.writer is not None:
            self.writer.close()
        if self.handler is not None:
            root = logging.getLogger("medformer")
            root.removeHandler(self.handler)
            root.setLevel(self.level)
            self.handler.close()
