"""Typed run configuration: YAML files plus dotted command-line overrides, validated by pydantic.

Every section forbids unknown keys, so a typo is an error that names the key and the closest valid
one (``optim.lrr`` -> "did you mean 'optim.lr'?"), and a wrong type names the key and the type it
expects. Later sections (model, optim, pretext, ...) are added here as the commands grow.
"""

from __future__ import annotations

import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medformer.errors import ConfigError


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataSource(Section):
    """One collection to use: a MedMNIST file or flag, a CSV manifest, a datalist, or a folder."""

    path: str
    name: str | None = None  # defaults to the name the reader gives the collection
    size: int = 28  # MedMNIST image size when `path` is a flag or a folder of MedMNIST files
    skip_bad: bool = False


class PreprocessConfig(Section):
    """Preprocessing run once per study and cached on disk (see medformer.data.transforms)."""

    orientation: str | None = "RAS"  # reorient 3D volumes to these axis codes; null keeps the file's order
    spacing: list[float] | None = None  # resample to this voxel size (mm), e.g. [1, 1, 1]
    resample_to_first: bool = False  # put modalities on different grids onto the first one's grid
    crop_foreground: bool = True
    intensity: Literal["percentile", "ct_window", "minmax", "none"] = "percentile"
    percentiles: tuple[float, float] = (0.5, 99.5)
    ct_window: tuple[float, float] = (-1000.0, 1000.0)
    size: list[int] | None = None  # final grid; with `resize: pad_crop` pads/crops, else interpolates
    resize: Literal["pad_crop", "interpolate"] = "pad_crop"


class AugmentConfig(Section):
    """Augmentation strengths; 0 switches a transform off. The defaults are off (``medformer finetune``
    and the pretext tasks choose their own in their configs)."""

    flip: float = Field(0.0, ge=0, le=1)  # probability of flipping each spatial axis
    flip_axes: list[int] | None = None  # spatial axes that may flip (default all; -1 = last)
    rotate: float = Field(0.0, ge=0, le=180)  # maximum rotation angle, degrees (about every axis in 3D)
    zoom: float = Field(0.0, ge=0, lt=1)  # scale factor drawn from [1 - zoom, 1 + zoom]
    shift: float = Field(0.0, ge=0, le=1)  # translation, fraction of the image extent
    intensity_scale: float = Field(0.0, ge=0, lt=1)  # x (1 + U(-s, s))
    intensity_shift: float = Field(0.0, ge=0)  # + U(-s, s)
    gamma: float = Field(0.0, ge=0, lt=1)  # x ** exp(U(-g, g)) on the [0, 1]-scaled intensities
    noise: float = Field(0.0, ge=0)  # Gaussian noise with standard deviation U(0, noise)
    blur: float = Field(0.0, ge=0)  # Gaussian blur with sigma U(0, blur) voxels ...
    blur_prob: float = Field(0.5, ge=0, le=1)  # ... applied to this fraction of the samples

    @property
    def spatial(self) -> bool:
        return self.flip > 0 or self.rotate > 0 or self.zoom > 0 or self.shift > 0

    @property
    def active(self) -> bool:
        intensity = self.intensity_scale or self.intensity_shift or self.gamma or self.noise or self.blur
        return self.spatial or bool(intensity)


class ModelConfig(Section):
    """Which network: a Medformer (preset + overrides, or ``init`` from a saved model) or a CNN baseline."""

    arch: Literal["medformer", "resnet18", "resnet50", "unet"] = "medformer"
    preset: Literal["tiny", "small", "base"] = "tiny"
    dim: int | None = None  # free-size overrides of the preset
    depth: int | None = None
    heads: int | None = None
    patch_size_2d: int | None = None
    patch_size_3d: int | None = None
    tokenizer: Literal["linear", "conv", "hybrid"] | None = None  # conv: patch-local CNN; hybrid: CNN stem
    stem_width_3d: int | None = None  # hybrid: channels of the 3D stem's first convolution (default 8)
    collection_stems: bool | None = None  # hybrid: each collection its own stem convolutions
    drop_path: float | None = None
    checkpointing: bool = False
    init: str | None = None  # a saved model folder (pre-trained, or a run's model/ or best/)
    stem: Literal["medmnist", "imagenet"] = "medmnist"  # ResNet stem (medmnist: 3x3, stride 1, no max-pool)


class FinetuneSection(Section):
    """How the labels are used: which part trains, and with how many labels."""

    mode: Literal["full", "linear", "attentive", "llrd"] = "full"
    layer_decay: float = Field(0.75, gt=0, le=1)
    label_fraction: float = Field(1.0, gt=0, le=1)
    label_seed: int = 0
    tasks: list[str] | None = None  # task names to train (default: every task of the collections)
    mixup: float = Field(0.0, ge=0)  # Beta(alpha, alpha) of mixup (medformer.data.mixup); 0: off


class EvalConfig(Section):
    batch_size: int = Field(128, ge=1)
    hd95: bool = False  # Hausdorff distance is slow on large volumes


class TrainConfig(Section):
    """The training loop (see medformer.train and docs/training.md): length, batches, AdamW and its
    schedule, precision, EMA, loss weighting, logging, evaluation and checkpoints.

    ``batch_size`` is per process (micro-batch): one optimizer step sees
    ``batch_size * world_size * grad_accum`` samples.
    """

    steps: int | None = Field(None, ge=1)  # total optimizer steps; or set `epochs`
    epochs: float | None = Field(None, gt=0)  # steps = ceil(epochs * batches per epoch / grad_accum)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # under torchrun with CUDA: cuda:LOCAL_RANK
    batch_size: int = Field(32, ge=1)
    # which collection each micro-batch comes from; or shares {collection name: share}, where a share may
    # be a list, one per epoch (the last holds): see medformer.data.sampling
    strategy: Literal["proportional", "uniform", "temperature"] | dict[str, float | list[float]] = (
        "proportional"
    )
    temperature: float = Field(2.0, gt=0)
    num_workers: int = Field(0, ge=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.05, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int | None = Field(None, ge=0)  # or `warmup_fraction` of the steps
    warmup_fraction: float = Field(0.0, ge=0, lt=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # cosine decays to min_lr_ratio * lr
    grad_accum: int = Field(1, ge=1)
    clip_norm: float | None = Field(1.0, gt=0)  # null: no clipping
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"  # auto: bf16 on CUDA when supported, else off
    ema_decay: float | None = Field(None, gt=0, lt=1)  # null: no EMA
    loss_weighting: Literal["fixed", "uncertainty"] = "fixed"
    skip_nonfinite: bool = False  # skip (and count) a step whose loss is NaN/Inf instead of stopping
    log_every: int = Field(50, ge=1)
    eval_every: int | None = Field(None, ge=1)  # null: once per epoch-equivalent (and at the end)
    select_metric: str | None = None  # e.g. "val/auc": the best model so far goes to <output>/best
    select_mode: Literal["max", "min"] = "max"
    checkpoint_every: int | None = Field(1000, ge=1)  # null: only at the end
    keep_last: int | None = Field(3, ge=1)  # checkpoints kept; null: all
    seed: int = 0
    progress: bool = True

    def model_post_init(self, context: Any) -> None:
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("train: set either train.steps or train.epochs, not both")
        if self.warmup_steps is not None and self.warmup_fraction > 0:
            raise ConfigError("train: set either train.warmup_steps or train.warmup_fraction, not both")


class RunConfig(Section):
    """What every run command reads: shared options, data, preprocessing, model, training, evaluation."""

    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    output: str = "runs/run"
    cache_dir: str | None = None  # preprocessing cache; default: <output>/../.cache
    data: list[DataSource] = Field(default_factory=list)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)


C = TypeVar("C", bound=BaseModel)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-4"`` -> (["optim", "lr"], 0.0003); values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _looks_numeric(value):  # YAML reads "3e-4" as a string
        value = float(value)
    return key.strip().split("."), value


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set dotted keys in a nested dict (list items by index: ``data.0.path=...``)."""
    for item in overrides:
        keys, value = parse_override(item)
        node: Any = tree
        for i, k in enumerate(keys[:-1]):
            if isinstance(node, list):
                node = node[_index(k, keys[: i + 1], len(node))]
                continue
            if not isinstance(node.get(k, {}), (dict, list)):
                raise ConfigError(f"override {item!r}: {'.'.join(keys[: i + 1])} is not a section")
            node = node.setdefault(k, {})
        last = keys[-1]
        if isinstance(node, list):
            node[_index(last, keys, len(node))] = value
        else:
            node[last] = value
    return tree


def _index(key: str, path: list[str], length: int) -> int:
    if not key.isdigit() or int(key) >= length:
        raise ConfigError(f"override key {'.'.join(path)}: {key!r} is not an index of a list of {length}")
    return int(key)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level of a config must be a mapping of keys")
    return tree


def build_config(cls: type[C], tree: dict[str, Any], source: str = "config") -> C:
    """Validate a nested dict into `cls`, turning pydantic's report into one clear ConfigError."""
    try:
        return cls.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(f"{source}: " + "; ".join(_describe(cls, err) for err in e.errors())) from None


def load_config(
    cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None, **defaults: Any
) -> C:
    """YAML file (optional) + dotted overrides -> validated config. ``defaults`` fill keys the file
    does not set (used by commands whose flags, such as ``--seed``, map to config keys)."""
    tree: dict[str, Any] = load_yaml(path) if path else {}
    for key, value in defaults.items():
        if value is not None:
            tree[key] = value
    tree = apply_overrides(tree, overrides or [])
    return build_config(cls, tree, str(path) if path else "config")


def _describe(root: type[BaseModel], err: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc)
    if err["type"] == "extra_forbidden":
        valid = _fields_at(root, loc[:-1])
        close = difflib.get_close_matches(loc[-1], valid, n=1, cutoff=0.5)
        hint = f"; did you mean {'.'.join([*loc[:-1], close[0]])!r}?" if close else ""
        return f"unknown key {key!r}{hint} (valid keys here: {', '.join(valid)})"
    expected = _expected_type(root, loc)
    got = err.get("input")
    return f"key {key!r}: {err['msg'].lower()}" + (f" (expected {expected}, got {got!r})" if expected else "")


def _model_at(root: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    model: Any = root
    for part in loc:
        if part.isdigit():
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        model = _unwrap(model.model_fields[part].annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """list[X] / X | None -> X, so paths walk into nested sections."""
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else annotation
    return annotation


def _fields_at(root: type[BaseModel], loc: list[str]) -> list[str]:
    model = _model_at(root, loc)
    return sorted(model.model_fields) if model else []


def _expected_type(root: type[BaseModel], loc: list[str]) -> str | None:
    parent = _model_at(root, [p for p in loc[:-1]])
    field_name = next((p for p in reversed(loc) if not p.isdigit()), None)
    if parent is None or field_name not in parent.model_fields:
        return None
    ann = parent.model_fields[field_name].annotation
    return getattr(ann, "__name__", None) if isinstance(ann, type) else str(ann).replace("typing.", "")


def dump_config(config: BaseModel, path: str | Path) -> None:
    """Write the resolved config next to a run's results, so the run can be repeated exactly."""
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
