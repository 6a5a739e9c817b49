"""Pretext tasks by name: what the ``pretext:`` list of a pre-training config refers to.

Registering a task is one line above its class::

    @register_task("mae")
    class MAE(PretextTask): ...

A config entry such as ``{task: mae, weight: 1.0, start_step: 0, mask_ratio: 0.75}`` picks the class by
``task``; ``weight`` is its loss weight in the sum of all tasks' losses, ``name`` (default: the task's own
name) tells two entries of the same task apart (e.g. two MAE variants), and every other key is an argument
of the class's constructor. The arguments are checked by name and type against the constructor's
signature before any data is opened, so a typo or a wrong type is a `ConfigError` naming the entry and
the key (``pretext.0 (mae): unknown key 'mask_ratoi'; did you mean 'mask_ratio'?``).

A task name that is not registered yet is looked up as the module ``medformer.pretext.<name>``, so a task
living in its own module needs no other edit to become available to configs.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, create_model

from medformer.config import build_config
from medformer.errors import ConfigError
from medformer.pretext.base import PretextTask

TASKS: dict[str, type[PretextTask]] = {}
T = TypeVar("T", bound=type[PretextTask])


def register_task(name: str) -> Callable[[T], T]:
    """Class decorator: make a `PretextTask` available to configs as ``task: <name>``."""

    def register(cls: T) -> T:
        known = TASKS.get(name)
        if known is not None and known.__qualname__ != cls.__qualname__:
            raise ValueError(
                f"pretext task name {name!r} is taken by {known.__module__}.{known.__qualname__}"
            )
        cls.name = name
        TASKS[name] = cls
        return cls

    return register


def task_class(name: str, where: str = "pretext") -> type[PretextTask]:
    """The class registered as ``name`` (importing ``medformer.pretext.<name>`` if needed)."""
    if name not in TASKS and name.isidentifier():
        try:
            importlib.import_module(f"medformer.pretext.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"medformer.pretext.{name}":
                raise
    if name not in TASKS:
        close = difflib.get_close_matches(name, list(TASKS), n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"{where}.task: unknown pretext task {name!r}; {hint}known tasks: {', '.join(TASKS)}"
        )
    return TASKS[name]


@cache
def options_model(cls: type[PretextTask]) -> type[BaseModel]:
    """A pydantic model of a config entry for ``cls``: its constructor's arguments plus task/weight/name."""
    hints = typing.get_type_hints(cls.__init__)
    fields: dict[str, Any] = {
        "task": (str, ...),
        "weight": (float, Field(1.0, ge=0)),
        "name": (str | None, None),
    }
    for p in inspect.signature(cls.__init__).parameters.values():
        if p.name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = ... if p.default is inspect.Parameter.empty else p.default
        fields[p.name] = (hints.get(p.name, Any), default)
    return create_model(
        f"{cls.__name__}Options",
        __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=True),
        **fields,
    )


def check_entry(entry: Mapping[str, Any], where: str = "pretext") -> tuple[type[PretextTask], BaseModel]:
    """Validate one ``pretext:`` entry: its class and its options (errors name ``where`` and the key)."""
    if not isinstance(entry, Mapping):
        raise ConfigError(
            f"{where}: a pretext entry is a mapping like {{task: mae, weight: 1}}, got {entry!r}"
        )
    if "task" not in entry:
        raise ConfigError(f"{where}: missing key 'task' (which pretext task; known: {', '.join(TASKS)})")
    cls = task_class(str(entry["task"]), where)
    return cls, build_config(options_model(cls), dict(entry), f"{where} ({entry['task']})")


def build_task(entry: Mapping[str, Any], where: str = "pretext") -> tuple[PretextTask, float]:
    """One configured task and its loss weight."""
    cls, options = check_entry(entry, where)
    kwargs = {
        k: getattr(options, k) for k in type(options).model_fields if k not in ("task", "weight", "name")
    }
    try:
        task = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where} ({entry['task']}): {e}") from None
    if options.name is not None:
        if not options.name or "." in options.name:
            raise ConfigError(f"{where}.name: {options.name!r} is not a valid task name (non-empty, no '.')")
        task.name = options.name
    return task, options.weight


def build_tasks(
    entries: Sequence[Mapping[str, Any]], where: str = "pretext"
) -> tuple[list[PretextTask], dict[str, float]]:
    """Every configured task and ``{name: weight}``; two entries with one name are an error."""
    if not entries:
        raise ConfigError(f"{where}: no pretext tasks given (e.g. pretext: [{{task: mae}}])")
    tasks, weights = [], {}
    for i, entry in enumerate(entries):
        task, weight = build_task(entry, f"{where}.{i}")
        if task.name in weights:
            raise ConfigError(
                f"{where}.{i}: a second task named {task.name!r}; give one of them another `name`"
            )
        tasks.append(task)
        weights[task.name] = weight
    return tasks, weights


def check_entries(entries: Sequence[Mapping[str, Any]], where: str = "pretext") -> None:
    """Validate a ``pretext:`` list when a config is loaded: names, types, values (the constructors run;
    they are cheap, the heads are only made by `PretextTask.attach`) and unique task names."""
    if not entries:
        raise ConfigError(f"{where}: no pretext tasks given (e.g. pretext: [{{task: mae}}])")
    names = [build_task(entry, f"{where}.{i}")[0].name for i, entry in enumerate(entries)]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"{where}: task names repeat ({repeated}); give each entry its own `name`")
