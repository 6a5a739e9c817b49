"""The training loop: objectives in, trained model, metrics and checkpoints out.

One optimizer step, read top to bottom (`Trainer.train_step`):

    for each of grad_accum micro-batches (one collection each, see MultiCollectionSampler):
        for each objective: loss = objective(model, batch); backward(weighting(loss) / grad_accum)
    average gradients over ranks (distributed.py) -> unscale (fp16) -> clip -> AdamW -> LR schedule -> EMA
    every log_every: metrics.jsonl; every eval_every: evaluate (EMA weights), keep the best;
    every checkpoint_every: an atomic checkpoint that a resumed run continues from exactly.

An objective is any callable ``objective(model, batch) -> (loss | None, {name: float})`` with a ``name``;
it may call the model whole (``model(batch)``) or its parts (``model.tokenize``, ``model.encode``,
``model.heads[k]``). ``None`` means "nothing to learn from this batch" (e.g. no labelled study) and the
objective is skipped for it.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from medformer.config import TrainConfig, dump_config
from medformer.data.sampling import MultiCollectionSampler, multi_collection_loader
from medformer.errors import ConfigError, MedformerError
from medformer.runtime import resolve_device, seed_everything
from medformer.train import checkpoint as ckpt
from medformer.train import distributed as dist
from medformer.train.ema import EMA
from medformer.train.logging import RunLog, log, read_metrics
from medformer.train.optim import WarmupCosine, default_param_groups
from medformer.train.weighting import LossWeighting


class Objective(Protocol):
    """A training objective: a scalar loss (mean over the micro-batch's samples) and float logs."""

    name: str

    def __call__(self, model: nn.Module, batch: dict[str, Any]) -> tuple[Tensor | None, dict[str, float]]: ...


class NonFiniteLossError(MedformerError):
    """A loss or gradient became NaN/Inf (see ``train.skip_nonfinite``)."""


@dataclass
class FitResult:
    """What a run produced. Paths are complete on rank 0 (other ranks write nothing)."""

    step: int
    output: Path
    model_dir: Path  # the final (raw) weights
    ema_dir: Path | None = None  # the final EMA weights, when ema_decay is set
    best_dir: Path | None = None  # the best model by select_metric, when set
    best_metric: float | None = None
    best_step: int | None = None
    checkpoint: Path | None = None  # the last checkpoint
    skipped_steps: int = 0  # steps skipped for a non-finite loss (skip_nonfinite)
    history: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl's records


def fit(
    model: nn.Module,
    objectives: Sequence[Objective],
    datasets: Mapping[str, Dataset],
    config: TrainConfig,
    output: str | Path,
    *,
    weights: Mapping[str, float] | None = None,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    param_groups: list[dict] | None = None,
    resume: bool = False,
) -> FitResult:
    """Train ``model`` in place on ``datasets`` (name -> one collection's map-style dataset).

    ``weights``: objective name -> loss weight; ``evaluate(model) -> {"val/auc": ...}`` runs on rank 0
    every ``eval_every`` steps and at the end (EMA weights when enabled, eval mode, no grad);
    ``param_groups``: AdamW groups (e.g. `finetune_param_groups`), default decay / no-decay groups;
    ``resume``: continue from the newest checkpoint in ``output/checkpoints`` (fresh start if none).
    Under ``torchrun`` the process group is joined and every rank trains on its share of each batch.
    """
    device = resolve_device(config.device)
    info = dist.setup(device.type == "cuda")
    if device.type == "cuda" and info.distributed:
        device = torch.device("cuda", info.local_rank)
    try:
        trainer = Trainer(model, objectives, datasets, config, Path(output), info, device,
                          weights, evaluate, param_groups)  # fmt: skip
        return trainer.run(resume)
    finally:
        dist.cleanup(info)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """``auto``: bf16 on a CUDA GPU that supports it; off on CPU, where bf16 matmuls are slower."""
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch; names, ids and other values stay as they are."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


class BatchStream:
    """Endless batches from the loader, counting those handed out: a DataLoader's workers read ahead,
    so the sampler's own position is not where training is. ``state_dict`` is that exact position."""

    def __init__(self, loader: DataLoader, sampler: MultiCollectionSampler, rank: int):
        self.loader, self.sampler, self.rank = loader, sampler, rank
        self.epoch, self.consumed = 0, 0
        self.iterator: Iterator[Any] | None = None
        # worker seeds from their own generator, so starting an epoch does not draw from the training RNG
        self.generator = torch.Generator()
        loader.generator = self.generator

    def __next__(self) -> Any:
        if self.iterator is None:
            self.sampler.load_state_dict(self.state_dict())
            seed = np.random.SeedSequence([self.sampler.seed, self.rank, self.epoch]).generate_state(1)[0]
            self.generator.manual_seed(int(seed))
            self.iterator = iter(self.loader)
        batch = next(self.iterator)
        self.consumed += 1
        if self.consumed == len(self.sampler):
            self.epoch, self.consumed, self.iterator = self.epoch + 1, 0, None
        return batch

    @property
    def epochs(self) -> float:
        return self.epoch + self.consumed / len(self.sampler)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "start": self.consumed, "seed": self.sampler.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.consumed, self.iterator = int(state["epoch"]), int(state["start"]), None


class Trainer:
    """The state of one run (model, optimizer, data position, logs) and the steps that change it."""

    def __init__(
        self,
        model: nn.Module,
        objectives: Sequence[Objective],
        datasets: Mapping[str, Dataset],
        config: TrainConfig,
        output: Path,
        info: dist.DistInfo,
        device: torch.device,
        weights: Mapping[str, float] | None,
        evaluate: Callable[[nn.Module], dict[str, float]] | None,
        param_groups: list[dict] | None,
    ):
        if not objectives:
            raise ValueError("fit needs at least one objective")
        if config.steps is None and config.epochs is None:
            raise ConfigError("train: set train.steps or train.epochs")
        self.cfg, self.info, self.device, self.output = config, info, device, output
        self.objectives, self.evaluate = list(objectives), evaluate
        seed_everything(config.seed + info.rank)  # each rank its own dropout / augmentation draws

        # data: every rank draws the same global batches and keeps its share
        try:
            self.sampler = MultiCollectionSampler(
                {name: len(ds) for name, ds in datasets.items()}, config.batch_size, config.strategy,
                config.temperature, seed=config.seed, rank=info.rank, world_size=info.world_size,
            )  # fmt: skip
        except ValueError as e:
            raise ConfigError(f"train.strategy: {e}") from e
        loader = multi_collection_loader(datasets, self.sampler, config.num_workers, device.type == "cuda")
        self.stream = BatchStream(loader, self.sampler, info.rank)
        per_epoch = len(self.sampler) / config.grad_accum
        self.total = config.steps or max(1, math.ceil(config.epochs * per_epoch))
        self.eval_every = config.eval_every or max(1, round(per_epoch))

        # model, loss weighting, optimizer, schedule, precision, EMA
        self.model = model.to(device).train()
        self.weighting = LossWeighting([o.name for o in self.objectives], weights, config.loss_weighting)
        self.weighting.to(device)
        dist.broadcast_tensors([*model.state_dict().values(), *self.weighting.parameters()], info)
        if param_groups is None:
            param_groups = default_param_groups(model, config.weight_decay)
        groups = [{**g, "lr": g.get("lr", config.lr * g.get("lr_scale", 1.0))} for g in param_groups]
        if self.weighting.log_vars is not None:
            groups.append({"params": [self.weighting.log_vars], "names": ["loss_weighting.log_vars"],
                           "weight_decay": 0.0, "lr": config.lr})  # fmt: skip
        self.params = [p for g in groups for p in g["params"]]
        if not self.params:
            raise ValueError("nothing to train: no parameter requires a gradient")
        grouped = {id(p) for p in self.params}
        left_out = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in grouped]
        if left_out:  # e.g. a task added after the groups were made: it would never train
            log.warning("%d trainable parameters are in no parameter group: %s", len(left_out), left_out[:5])
        fused = {"fused": True} if device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(
            groups, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, **fused
        )
        warmup = config.warmup_steps
        if warmup is None:
            warmup = int(config.warmup_fraction * self.total)
        self.schedule = WarmupCosine(self.total, warmup, config.min_lr_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        self.amp = autocast_dtype(config.amp, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == torch.float16)
        self.ema = EMA(model, config.ema_decay) if config.ema_decay and info.main else None

        self.step, self.skipped = 0, 0
        self.best: tuple[float, int] | None = None  # (metric, step)
        self.last_checkpoint: Path | None = None
        self.checkpoints = output / "checkpoints"
        self._reset_window()

    # -- the run --------------------------------------------------------------------------------------
    def run(self, resume: bool) -> FitResult:
        cfg, info = self.cfg, self.info
        removed: list[str] = []
        if info.main:
            self.output.mkdir(parents=True, exist_ok=True)
            removed = ckpt.remove_partial(self.checkpoints)
        dist.barrier(info)
        latest = ckpt.find_latest(self.checkpoints)
        if latest is not None and not resume:
            raise ConfigError(
                f"{self.checkpoints} already holds checkpoints of an earlier run (newest: {latest.name}); "
                "resume it (--resume / resume=True) or choose another output folder"
            )
        state = ckpt.load_state(latest) if latest is not None else None
        start = 0 if state is None else int(state["step"])
        history = read_metrics(self.output / "metrics.jsonl", start) if state and info.main else []
        self.log = RunLog(self.output, info.main, self.total, start, cfg.progress, history)
        try:
            if removed:
                log.warning("removed partial checkpoints of an interrupted save: %s", ", ".join(removed))
            if state is not None:
                self._resume(latest, state)
            if info.main and not (self.output / "config.yaml").exists():  # a command's fuller config wins
                dump_config(cfg, self.output / "config.yaml")
            self._describe(latest, resume)
            while self.step < self.total:
                self.train_step()
                self.step += 1
                self.log.step()
                last = self.step == self.total
                if self.step % cfg.log_every == 0 or last:
                    self._log_window()
                if self.evaluate is not None and (self.step % self.eval_every == 0 or last):
                    self._evaluate()
                if (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or last:
                    self._checkpoint()
            return self._finish()
        finally:
            self.log.close()

    def train_step(self) -> None:
        """One optimizer step over ``grad_accum`` micro-batches (see the module docstring)."""
        cfg, model = self.cfg, self.model
        if hasattr(model, "set_step"):  # e.g. a Pretrainer: tasks that start after step N
            model.set_step(self.step)
        autocast = torch.autocast(self.device.type, dtype=self.amp) if self.amp is not None else nullcontext()
        bad = [0] * len(self.objectives)  # non-finite losses per objective
        for _ in range(cfg.grad_accum):
            t0 = time.perf_counter()
            batch = to_device(next(self.stream), self.device)
            self.window["wait"] += time.perf_counter() - t0
            self.window["samples"] += int(batch["images"].shape[0])
            total: float | None = None
            for i, objective in enumerate(self.objectives):
                with autocast:
                    loss, logs = objective(model, batch)
                if loss is None:
                    continue
                value = float(loss.detach())
                finite = math.isfinite(value)
                if self.info.distributed:  # all ranks skip together: a lone backward would wait forever
                    flag = torch.tensor([0.0 if finite else 1.0], device=self.device)
                    finite = float(dist.sum_tensor(flag, self.info)) == 0
                if not finite:
                    bad[i] += 1
                    continue
                term = self.weighting.term(i, loss.float())
                self.scaler.scale(term / cfg.grad_accum).backward()
                total = (total or 0.0) + float(term.detach())
                self._add(f"loss/{objective.name}", value)
                for k, v in logs.items():
                    self._add(k, float(v))
            if total is not None:
                self._add("loss", total)

        if self.info.distributed:
            bad = dist.sum_tensor(torch.tensor(bad, device=self.device), self.info).tolist()
        if any(bad):
            self._nonfinite("loss", self.objectives[next(i for i, n in enumerate(bad) if n)].name)
            return
        dist.allreduce_gradients(self.params, self.info)
        self.scaler.unscale_(self.optimizer)
        with_grad = [p for p in self.params if p.grad is not None]
        if with_grad:  # the norm before clipping (clip_norm=None: measured, scaled by exactly 1)
            norm = float(torch.nn.utils.clip_grad_norm_(with_grad, cfg.clip_norm or math.inf))
            if not self.scaler.is_enabled() and not math.isfinite(norm):
                self._nonfinite("gradient", None)
                return
            self._add("grad_norm", norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._end_step()
        if self.ema is not None:
            self.ema.update(model, self.step)

    def _end_step(self) -> None:
        with warnings.catch_warnings():  # fp16: GradScaler skips optimizer.step after an overflow, on purpose
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)

    def _nonfinite(self, what: str, objective: str | None) -> None:
        where = f" from objective {objective!r}" if objective else ""
        if not self.cfg.skip_nonfinite:
            raise NonFiniteLossError(
                f"non-finite {what} (NaN/Inf) at step {self.step + 1}{where}; lower the learning rate, "
                "check the data, or set train.skip_nonfinite=true to skip such steps"
            )
        self.skipped += 1
        self.log.info("step %d: skipped, non-finite %s%s", self.step + 1, what, where)
        self._end_step()

    # -- logs, evaluation, checkpoints ----------------------------------------------------------------
    def _reset_window(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}
        self.window = {"start": time.perf_counter(), "wait": 0.0, "samples": 0}

    def _add(self, key: str, value: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value
        self.counts[key] = self.counts.get(key, 0.0) + 1

    def _log_window(self) -> None:
        elapsed = max(time.perf_counter() - self.window["start"], 1e-9)
        self._add("data_wait", self.window["wait"] / elapsed)
        values = dist.average_logs(self.sums, self.counts, self.info, self.device)
        record = {
            "step": self.step,
            "epoch": round(self.stream.epochs, 4),
            "lr": self.cfg.lr * self.schedule(self.step - 1),
            **values,
            "samples_per_s": self.window["samples"] * self.info.world_size / elapsed,
            "skipped": self.skipped,
            **self.weighting.logs(),
        }
        self.log.record(record)
        self.log.postfix(record.get("loss"))
        self.log.info(
            "step %d/%d  loss %.4g  lr %.3g  %.1f samples/s  data wait %.0f%%",
            self.step, self.total, record.get("loss", float("nan")), record["lr"],
            record["samples_per_s"], 100 * record.get("data_wait", 0.0),
        )  # fmt: skip
        self._reset_window()

    def _evaluate(self) -> None:
        if self.info.main:
            model = self.model
            model.eval()
            with (
                ckpt.preserved_rng(),
                torch.no_grad(),
                self.ema.applied(model) if self.ema else nullcontext(),
            ):
                metrics = {k: float(v) for k, v in self.evaluate(model).items()}
                improved = self._select(metrics)
                if improved:
                    ckpt.save_weights(model, self.output / "best")
            model.train()
            self.log.record({"step": self.step, "split": "val", **metrics}, prefix="val")
            summary = "  ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            self.log.info("step %d eval: %s%s", self.step, summary, "  (best so far)" if improved else "")
        dist.barrier(self.info)

    def _select(self, metrics: dict[str, float]) -> bool:
        """Whether these metrics beat the best so far on ``select_metric``."""
        key = self.cfg.select_metric
        if key is None:
            return False
        if key not in metrics:
            raise ConfigError(
                f"train.select_metric {key!r} is not among the evaluation's metrics {sorted(metrics)}"
            )
        value = metrics[key]
        better = (
            self.best is None
            or (self.cfg.select_mode == "max" and value > self.best[0])
            or (self.cfg.select_mode == "min" and value < self.best[0])
        )
        if better:
            self.best = (value, self.step)
        return better

    def _checkpoint(self) -> None:
        rngs = dist.gather_objects(ckpt.rng_state(), self.info)
        if self.info.main:
            state = {
                "step": self.step,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "data": self.stream.state_dict(),
                "rng": rngs,
                "weighting": self.weighting.state_dict(),
                "scaler": self.scaler.state_dict(),
                "best": self.best,
                "skipped": self.skipped,
                "world_size": self.info.world_size,
            }
            meta = {
                "step": self.step,
                "epoch": self.stream.epochs,
                "total_steps": self.total,
                "world_size": self.info.world_size,
                "config": self.cfg.model_dump(mode="json"),
                "metrics": next((r for r in reversed(self.log.history) if "split" not in r), None),
                "best": None if self.best is None else {"metric": self.best[0], "step": self.best[1]},
            }
            self.last_checkpoint = ckpt.save_checkpoint(
                self.checkpoints, self.step, self.model, state, meta, self.ema, self.cfg.keep_last
            )
            self.log.info("step %d: checkpoint %s", self.step, self.last_checkpoint)
        dist.barrier(self.info)

    def _resume(self, directory: Path, state: dict[str, Any]) -> None:
        """Restore everything `_checkpoint` saved in ``directory`` (``state``: its train_state.pt)."""
        saved = json.loads((directory / ckpt.STATE_JSON).read_text()).get("config", {})
        mine = self.cfg.model_dump(mode="json")
        changes = [f"{k} {saved[k]!r} -> {v!r}" for k, v in mine.items() if k in saved and saved[k] != v]
        if changes:
            self.log.info("resuming with changed settings: %s", ", ".join(changes))
        ckpt.load_weights(self.model, directory)
        self.optimizer.load_state_dict(state["optimizer"])
        schedule = dict(vars(self.schedule))  # this run's, not the checkpoint's: steps may be extended
        self.scheduler.load_state_dict(state["scheduler"])
        vars(self.schedule).update(schedule)
        self.weighting.load_state_dict(state["weighting"])
        self.scaler.load_state_dict(state["scaler"])
        self.stream.load_state_dict(state["data"])
        if self.ema is not None and (directory / "model_ema").is_dir():
            self.ema.load_state_dict(ckpt.read_weights(directory / "model_ema"))
        elif self.ema is not None:  # EMA switched on at resume: start averaging from the loaded weights
            self.ema = EMA(self.model, self.ema.decay)
        self.step, self.skipped = int(state["step"]), int(state["skipped"])
        self.best = tuple(state["best"]) if state["best"] is not None else None
        if len(state["rng"]) == self.info.world_size:
            ckpt.set_rng_state(state["rng"][self.info.rank])
        else:
            log.warning(
                "resuming %d ranks from a checkpoint of %d: random streams restart (not an exact resume)",
                self.info.world_size, len(state["rng"]),
            )  # fmt: skip
        self.last_checkpoint = directory

    def _describe(self, resumed: Path | None, resume: bool) -> None:
        cfg, info = self.cfg, self.info
        n = sum(p.numel() for p in self.params)
        self.log.info(
            "training %d steps on %s x %d (%s precision): %d trainable parameters, %d samples per step "
            "(%d per micro-batch x %d ranks x %d accumulation), %d batches per epoch",
            self.total, self.device, info.world_size, self.amp or "fp32", n,
            cfg.batch_size * info.world_size * cfg.grad_accum, cfg.batch_size, info.world_size,
            cfg.grad_accum, len(self.sampler),
        )  # fmt: skip
        if resumed is not None:
            self.log.info("resumed from %s (step %d)", resumed, self.step)
        elif resume:
            self.log.info("no checkpoint in %s: starting from scratch", self.checkpoints)
        if self.step > self.total:
            log.warning("the checkpoint is at step %d, past the %d steps asked for", self.step, self.total)

    def _finish(self) -> FitResult:
        out = self.output
        result = FitResult(
            step=self.step, output=out, model_dir=out / "model",
            ema_dir=out / "model_ema" if self.ema is not None else None,
            best_dir=out / "best" if self.best is not None else None,
            best_metric=None if self.best is None else self.best[0],
            best_step=None if self.best is None else self.best[1],
            checkpoint=self.last_checkpoint, skipped_steps=self.skipped, history=list(self.log.history),
        )  # fmt: skip
        if self.info.main:
            ckpt.save_weights(self.model, out / "model")
            if self.ema is not None:
                with self.ema.applied(self.model):
                    ckpt.save_weights(self.model, out / "model_ema")
            self.log.info("done: step %d, model in %s", self.step, out / "model")
        dist.barrier(self.info)
        return result
