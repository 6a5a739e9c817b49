"""Medformer: Input Adaptformer -> Main Body -> Output Adaptformer (Simionescu 2025), read top to bottom.

    batch (B, M, *spatial), any 2D/3D size, any modality subset
      -> tokenize   TokenSet: per-modality patch tokens + sin-cos position + modality embedding
      -> [select]   keep only visible tokens (MAE-style pretext tasks skip masked tokens)
      -> encode     [collection latents | patch tokens | task readers] through the transformer body
      -> heads      per task: query cross-attention head, or dense head back to the input grid

Tasks, collections and modalities are added by name (`add_task`, `add_collection`, `add_modality`);
each adds only its own embeddings and head. `save` writes ``model.safetensors`` + ``config.json``;
`from_pretrained` rebuilds the model, and `load_pretrained` loads a checkpoint into a model whose task
set differs, saying which heads it added or skipped.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from medformer.data.study import Collection, TaskSpec
from medformer.errors import MedformerError
from medformer.models.adaptformer import InputAdaptformer, OutputAdaptformer, check_name
from medformer.models.body import PRESETS, Body
from medformer.models.heads import OrdinalMode, make_head
from medformer.models.templates import Align, ModalityTemplates
from medformer.models.tokenizers import Encoded, TokenSet, tokens_to_image

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FORMAT_VERSION = 1


class CheckpointError(MedformerError):
    """A checkpoint that cannot be loaded as asked: the message lists every mismatch."""


@dataclass
class MedformerConfig:
    """Architecture of a Medformer. Presets: ``MedformerConfig.from_preset("tiny" | "small" | "base")``.

    Patch sizes: 4 for 2D (a 28x28 image -> 7x7 = 49 tokens per modality), 8 for 3D (64^3 -> 512 tokens,
    96^3 -> 1728); other sizes are zero-padded up to a multiple. ``num_latents`` latent tokens per
    collection; ``head_queries`` query tokens and ``head_mlp_ratio`` MLP width per classification /
    regression head (~6*dim^2 weights each); ``dense_channels`` feature maps in dense heads. ``drop_path``
    and ``checkpointing`` change training only.
    """

    dim: int = 192
    depth: int = 12
    heads: int = 3
    mlp_ratio: float = 4.0
    patch_size_2d: int = 4
    patch_size_3d: int = 8
    qkv_bias: bool = True
    num_latents: int = 1
    head_queries: int = 4
    head_mlp_ratio: float = 1.0
    dense_channels: int = 16
    # "linear" patches; "conv": plus a patch-local CNN (tokenizers.ConvPatchTokenizer); "hybrid": a CNN
    # stem over the whole image (tokenizers.HybridTokenizer), best from scratch on small sets; it encodes a
    # masked subset from images whose hidden patches are zeroed (`_hide`)
    tokenizer: str = "linear"
    # channels of the hybrid stem's first 3D convolution (doubling per stage); 2D starts at 32
    stem_width_3d: int = 8
    # hybrid: each collection its own stem convolutions (ultrasound and X-ray need different edges)
    collection_stems: bool = False
    drop_path: float = 0.0
    checkpointing: bool = False

    TRAINING_ONLY = ("drop_path", "checkpointing")

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} must be divisible by heads={self.heads}")
        for name in (
            "dim",
            "depth",
            "heads",
            "patch_size_2d",
            "patch_size_3d",
            "head_queries",
            "dense_channels",
            "stem_width_3d",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.tokenizer not in ("linear", "conv", "hybrid"):
            raise ValueError(f"tokenizer must be 'linear', 'conv' or 'hybrid', got {self.tokenizer!r}")
        if self.num_latents < 0 or not 0.0 <= self.drop_path < 1.0 or self.head_mlp_ratio <= 0:
            raise ValueError("num_latents must be >= 0, drop_path in [0, 1) and head_mlp_ratio > 0")

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> MedformerConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> MedformerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            log.warning("ignoring unknown Medformer config keys %s (written by a newer medformer?)", unknown)
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass(frozen=True)
class TaskEntry:
    """A registered task: its spec, the collection it belongs to (None: any), its grid dimensionality."""

    spec: TaskSpec
    collection: str | None = None
    ndim: int | None = None
    ordinal: OrdinalMode = "classes"

    def to_dict(self) -> dict[str, Any]:
        spec = asdict(self.spec)
        spec["classes"] = list(spec["classes"]) if spec["classes"] is not None else None
        return {"spec": spec, "collection": self.collection, "ndim": self.ndim, "ordinal": self.ordinal}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TaskEntry:
        spec = dict(d["spec"])
        spec["classes"] = tuple(spec["classes"]) if spec.get("classes") is not None else None
        return cls(TaskSpec(**spec), d.get("collection"), d.get("ndim"), d.get("ordinal", "classes"))


@dataclass
class LoadReport:
    """What a non-strict load did: parts the model has that the checkpoint lacks (freshly initialised:
    ``added``) and parts the checkpoint has that the model lacks (``skipped``), by task / collection /
    modality, plus the raw parameter names."""

    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model

    @property
    def added(self) -> list[str]:
        return _units(self.missing)

    @property
    def skipped(self) -> list[str]:
        return _units(self.unexpected)

    @property
    def exact(self) -> bool:
        return not self.missing and not self.unexpected

    def __str__(self) -> str:
        if self.exact:
            return "every parameter loaded"
        parts = []
        if self.added:
            parts.append(f"not in the checkpoint, freshly initialised: {', '.join(self.added)}")
        if self.skipped:
            parts.append(f"in the checkpoint but not in the model, skipped: {', '.join(self.skipped)}")
        return "; ".join(parts)


_UNIT_PREFIXES = (
    ("input_adaptformer.task_embed.", "task"),
    ("output_adaptformer.heads.", "task"),
    ("input_adaptformer.collection_embed.", "collection"),
    ("input_adaptformer.modality_embed.", "modality"),
    ("input_adaptformer.templates.volumes.", "template"),
    ("input_adaptformer.tokenizers.2d.stats.", "collection"),
    ("input_adaptformer.tokenizers.3d.stats.", "collection"),
    ("input_adaptformer.tokenizers.2d.stems.", "collection"),
    ("input_adaptformer.tokenizers.3d.stems.", "collection"),
)


def _units(names: Iterable[str]) -> list[str]:
    """Group parameter names by what they belong to: "task 'x'", "collection 'y'", or the name itself."""
    out: list[str] = []
    for name in names:
        unit = next(
            (f"{kind} {name[len(p) :].split('.')[0]!r}" for p, kind in _UNIT_PREFIXES if name.startswith(p)),
            f"parameter {name}",
        )
        if unit not in out:
            out.append(unit)
    return out


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class Medformer(nn.Module):
    """One transformer for many image types and tasks. See the module docstring for the data flow.

    Example::

        model = Medformer(MedformerConfig.from_preset("tiny"), modalities=["T1", "T2"], collections=["brats"])
        key = model.add_task(TaskSpec("grade", "binary"), collection="brats")   # -> "brats/grade"
        out = model(batch)                     # {"brats/grade": (B, 1) logits}
    """

    def __init__(
        self,
        config: MedformerConfig | None = None,
        *,
        modalities: Iterable[str] = (),
        collections: Iterable[str | Collection] = (),
        tasks: Iterable[TaskSpec] = (),
    ):
        super().__init__()
        self.config = cfg = config or MedformerConfig()
        self.input_adaptformer = InputAdaptformer(
            cfg.dim,
            cfg.patch_size_2d,
            cfg.patch_size_3d,
            cfg.num_latents,
            cfg.tokenizer,
            cfg.stem_width_3d,
            cfg.collection_stems,
        )
        self.body = Body(
            cfg.dim, cfg.depth, cfg.heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.drop_path, cfg.checkpointing
        )
        self.output_adaptformer = OutputAdaptformer()
        self.apply(_init_weights)
        for tokenizer in self.input_adaptformer.tokenizers.values():
            # MAE's patch-embedding init: with std 0.02 the content of a [0, 1]-scaled patch is ~10x
            # smaller than its sin-cos position code, and a small data set never learns to see it
            nn.init.xavier_uniform_(tokenizer.proj.weight)
        self.tasks: dict[str, TaskEntry] = {}
        self.collections: dict[str, int | None] = {}  # name -> ndim (None: not told)
        self.load_report: LoadReport | None = None  # set by from_pretrained
        for name in modalities:
            self.add_modality(name)
        for c in collections:
            self.add_collection(c)
        for spec in tasks:
            self.add_task(spec)

    # -- vocabularies -------------------------------------------------------------------------------
    @property
    def heads(self) -> nn.ModuleDict:
        """Task key -> head; ``model.heads[key](encoded)`` gives that task's output."""
        return self.output_adaptformer.heads

    @property
    def modalities(self) -> list[str]:
        return list(self.input_adaptformer.modality_embed)

    def add_modality(self, name: str) -> None:
        """Register a modality name (idempotent): adds one learned embedding vector (and a zero
        template, when the model has modality templates)."""
        self.input_adaptformer.add_modality(name)
        if self.templates is not None:
            self.templates.add(name)

    @property
    def templates(self) -> ModalityTemplates | None:
        """The learned modality templates (BrainMVP), when added: `add_templates`."""
        return getattr(self.input_adaptformer, "templates", None)

    def add_templates(
        self,
        shape: Sequence[int],
        align: Align = "grid",
        normalise: bool = False,
        fill_missing: bool = False,
        lr_scale: float = 10.0,
    ) -> ModalityTemplates:
        """Give the input side one learnable template volume per modality on a ``shape`` reference grid
        (idempotent: an existing module is returned as it is; see `models/templates.py`)."""
        if self.templates is None:
            templates = ModalityTemplates(shape, self.modalities, align, normalise, fill_missing, lr_scale)
            self.input_adaptformer.templates = templates.to(self.body.norm.weight.device)
        return self.templates

    def add_collection(self, collection: str | Collection, ndim: int | None = None) -> None:
        """Register a collection (idempotent): adds its latent tokens. Given a `Collection`, also registers
        its modalities and its tasks (keyed ``"<collection>/<task>"``)."""
        if isinstance(collection, Collection):
            self.add_collection(collection.name, collection.ndim)
            for m in collection.modalities:
                self.add_modality(m)
            for spec in collection.tasks:
                key = self.task_key(spec, collection.name)
                if key not in self.tasks:
                    self.add_task(spec, collection=collection.name)
            return
        if ndim is not None and ndim not in (2, 3):
            raise ValueError(f"collection {collection!r}: ndim must be 2 or 3, got {ndim}")
        known = self.collections.get(collection)
        if known is not None and ndim is not None and known != ndim:
            raise ValueError(f"collection {collection!r} is registered as {known}D, not {ndim}D")
        self.input_adaptformer.add_collection(collection, ndim if ndim is not None else known)
        self.collections[collection] = ndim if ndim is not None else known

    @staticmethod
    def task_key(spec: TaskSpec, collection: str | None = None) -> str:
        """A task's key in outputs and heads: ``"<collection>/<task>"``, or the task name when unbound."""
        return spec.name if collection is None else f"{collection}/{spec.name}"

    def add_task(
        self,
        spec: TaskSpec,
        collection: str | None = None,
        *,
        key: str | None = None,
        ndim: int | None = None,
        ordinal: OrdinalMode = "classes",
    ) -> str:
        """Register a task: adds its latent token and its head, nothing else. Returns its key.

        ``collection`` binds it to a (registered) collection: ``model(batch)`` then runs it for that
        collection's batches. Segmentation needs the grid dimensionality: from the collection or ``ndim``.
        ``ordinal="cumulative"`` gives K-1 cumulative logits instead of K class logits (see heads.py).
        """
        key = check_name("task", key or self.task_key(spec, collection))
        if key in self.tasks:
            raise ValueError(f"task {key!r} is already registered; pass key= to add another with this name")
        if collection is not None:
            if collection not in self.collections:
                raise KeyError(f"unknown collection {collection!r}: add_collection({collection!r}) first")
            ndim = ndim or self.collections[collection]
        if ndim is not None and ndim not in (2, 3):
            raise ValueError(f"task {key!r}: ndim must be 2 or 3, got {ndim}")
        cfg = self.config
        patch = None if ndim is None else self.input_adaptformer.patch_size(ndim)
        head = make_head(
            key, spec, cfg.dim, cfg.heads, ndim, patch,
            num_queries=cfg.head_queries, head_mlp_ratio=cfg.head_mlp_ratio,
            dense_channels=cfg.dense_channels, ordinal=ordinal,
        )  # fmt: skip
        head.apply(_init_weights)
        device = self.body.norm.weight.device
        dtype = self.body.norm.weight.dtype
        self.output_adaptformer.heads[key] = head.to(device=device, dtype=dtype)
        self.input_adaptformer.add_task(key)
        self.tasks[key] = TaskEntry(spec, collection, ndim, ordinal)
        return key

    def remove_task(self, key: str) -> None:
        """Drop a task's head and latent token (e.g. a pre-training head before fine-tuning)."""
        if key not in self.tasks:
            raise KeyError(f"no task {key!r} (tasks: {sorted(self.tasks)})")
        del self.output_adaptformer.heads[key]
        del self.input_adaptformer.task_embed[key]
        del self.tasks[key]

    def tasks_for(self, collection: str | None, ndim: int | None = None) -> list[str]:
        """The tasks `forward` runs by default: this collection's, and unbound ones that fit ``ndim``."""
        return [
            k
            for k, t in self.tasks.items()
            if t.collection == collection or (t.collection is None and (t.ndim is None or t.ndim == ndim))
        ]

    # -- the forward path ---------------------------------------------------------------------------
    def tokenize(
        self,
        images: Tensor,
        modalities: Sequence[str],
        present: Tensor | None = None,
        collection: str | None = None,
    ) -> TokenSet:
        """(a) images ``(B, M, *spatial)`` -> `TokenSet` (see `InputAdaptformer.tokenize`)."""
        return self.input_adaptformer.tokenize(images, tuple(modalities), present, collection)

    def _hide(self, tokens: TokenSet, visible: Tensor) -> TokenSet:
        """The tokens again, from images whose hidden patches (all but ``visible``) are zeroed.

        The hybrid stem's convolutions reach across patches, so a visible token tokenized from the whole
        image would carry its hidden neighbours' pixels; zeroing them at the input first is how SimMIM and
        ConvNeXt V2 mask a CNN. Costs a second pass of the stem, not of the body.
        """
        seen = torch.zeros(tokens.tokens.shape[:2], device=tokens.images.device, dtype=tokens.images.dtype)
        seen = seen.scatter(1, visible.to(seen.device, torch.long), 1.0)
        keep = tokens_to_image(seen[..., None].expand(-1, -1, tokens.patch_size**tokens.ndim), tokens)
        return self.tokenize(tokens.images * keep, tokens.modalities, tokens.present, tokens.collection)

    def encode(self, tokens: TokenSet, visible: Tensor | None = None, tasks: Sequence[str] = ()) -> Encoded:
        """(b, c) Run the body on the collection's latent tokens and the patch tokens (only the ``visible``
        ones, ``(B, K)`` indices into ``tokens``, when given), with the latent tokens of ``tasks`` as
        readers."""
        if visible is not None:
            if self.config.tokenizer == "hybrid":
                tokens = self._hide(tokens, visible)
            tokens = tokens.select(visible)
        b = tokens.tokens.shape[0]
        latents = self.input_adaptformer.latents(tokens.collection, b).to(tokens.tokens.dtype)
        parts = [latents, tokens.tokens]
        if tasks:
            parts.append(self.input_adaptformer.task_tokens(list(tasks), b).to(tokens.tokens.dtype))
        parts = [p for p in parts if p.shape[1]]
        x = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        pad = tokens.pad
        if pad is not None and latents.shape[1]:
            pad = torch.cat([pad.new_zeros(b, latents.shape[1]), pad], dim=1)
        x = self.body(x, pad, num_readers=len(tasks))
        c = x.shape[1] - len(tasks)
        return Encoded(
            tokens=x[:, :c],
            pad=pad,
            num_latents=latents.shape[1],
            tokenset=tokens,
            task_tokens={k: x[:, c + i] for i, k in enumerate(tasks)},
        )

    def forward(
        self,
        x: Mapping[str, Any] | Tensor,
        modalities: Sequence[str] | None = None,
        present: Tensor | None = None,
        collection: str | None = None,
        tasks: Sequence[str] | None = None,
    ) -> dict[str, Tensor]:
        """A batch dict (see `medformer.data.dataset`) or an images tensor -> ``{task key: output}``.

        Outputs: ``(B, out_channels)`` for per-study tasks, ``(B, classes, *spatial)`` for segmentation.
        ``tasks`` defaults to `tasks_for` the batch's collection.
        """
        if isinstance(x, Mapping):
            if self.templates is not None and self.templates.fill_missing and "present" in x:
                x = self.templates.fill(x)  # missing modalities from their templates
            images = x["images"]
            modalities = modalities if modalities is not None else x["modalities"]
            present = present if present is not None else x.get("present")
            collection = collection if collection is not None else x.get("collection")
        else:
            images = x
        if modalities is None:
            raise ValueError("pass the modality names of the images' second axis (modalities=...)")
        keys = self.tasks_for(collection, images.dim() - 2) if tasks is None else list(tasks)
        unknown = [k for k in keys if k not in self.tasks]
        if unknown:
            raise KeyError(f"unknown tasks {unknown}; registered: {sorted(self.tasks)}")
        encoded = self.encode(self.tokenize(images, modalities, present, collection), tasks=keys)
        return self.output_adaptformer(encoded, keys)

    # -- sizes --------------------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part (input adaptformer, body, output adaptformer) and in total."""
        parts = {
            "input_adaptformer": self.input_adaptformer,
            "body": self.body,
            "output_adaptformer": self.output_adaptformer,
        }
        counts = {name: sum(p.numel() for p in m.parameters()) for name, m in parts.items()}
        counts["total"] = sum(counts.values())
        return counts

    # -- checkpoints --------------------------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        """The JSON description written next to the weights."""
        import medformer

        return {
            "format": "medformer",
            "format_version": FORMAT_VERSION,
            "medformer_version": medformer.__version__,
            "architecture": self.config.to_dict(),
            "modalities": self.modalities,
            "collections": {name: {"ndim": ndim} for name, ndim in self.collections.items()},
            "tasks": {key: entry.to_dict() for key, entry in self.tasks.items()},
            **({"templates": self.templates.describe()} if self.templates is not None else {}),
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into ``directory`` (each atomically)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        tmp = out / (WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out / WEIGHTS_NAME)
        tmp = out / (CONFIG_NAME + ".tmp")
        tmp.write_text(json.dumps(self.describe(), indent=2) + "\n")
        os.replace(tmp, out / CONFIG_NAME)
        return out

    @staticmethod
    def read_config(directory: str | os.PathLike) -> dict[str, Any]:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise CheckpointError(
                f"{path}: no Medformer config here (expected {CONFIG_NAME} and {WEIGHTS_NAME})"
            )
        try:
            meta = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from e
        if meta.get("format") != "medformer" or "architecture" not in meta:
            raise CheckpointError(f"{path}: not a Medformer config (no 'format: medformer' / 'architecture')")
        return meta

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, strict: bool = True, **overrides: Any
    ) -> Medformer:
        """Rebuild a saved model (architecture, modalities, collections, tasks) and load its weights.

        ``overrides`` may change training-only settings (``drop_path``, ``checkpointing``). With
        ``strict=False`` a mismatch between config and weights is logged and kept in ``model.load_report``.
        """
        meta = cls.read_config(directory)
        bad = sorted(set(overrides) - set(MedformerConfig.TRAINING_ONLY))
        if bad:
            raise ValueError(f"{bad} are part of the saved architecture and cannot be overridden")
        model = cls(MedformerConfig.from_dict({**meta["architecture"], **overrides}))
        for name in meta.get("modalities", []):
            model.add_modality(name)
        for name, info in meta.get("collections", {}).items():
            model.add_collection(name, (info or {}).get("ndim"))
        for key, d in meta.get("tasks", {}).items():
            entry = TaskEntry.from_dict(d)
            model.add_task(entry.spec, entry.collection, key=key, ndim=entry.ndim, ordinal=entry.ordinal)
        if meta.get("templates"):
            model.input_adaptformer.templates = ModalityTemplates.from_description(meta["templates"])
        model.load_report = model.load_pretrained(directory, strict=strict)
        return model

    def load_pretrained(self, directory: str | os.PathLike, strict: bool = True) -> LoadReport:
        """Load a checkpoint's weights into this model, which may have other tasks/collections/modalities.

        The architectures must agree. ``strict=True`` raises `CheckpointError` listing every task,
        collection or modality that one side has and the other lacks; ``strict=False`` loads what matches,
        logs a warning naming what was freshly initialised or skipped, and returns the `LoadReport`.
        """
        directory = Path(directory)
        meta = self.read_config(directory)
        saved = MedformerConfig.from_dict(meta["architecture"]).to_dict()
        mine = self.config.to_dict()
        diff = [
            f"{k}: checkpoint {saved[k]!r}, model {mine[k]!r}"
            for k in mine
            if k not in MedformerConfig.TRAINING_ONLY and saved[k] != mine[k]
        ]
        if diff:
            raise CheckpointError(f"{directory}: architecture differs from the model's ({'; '.join(diff)})")
        weights_path = directory / WEIGHTS_NAME
        if not weights_path.is_file():
            raise CheckpointError(f"{weights_path}: weights file missing")
        weights = load_file(str(weights_path))
        own = self.state_dict()
        shapes = [
            f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}"
            for k, v in own.items()
            if k in weights and weights[k].shape != v.shape
        ]
        if shapes:
            raise CheckpointError(
                f"{weights_path}: parameter shapes differ (checkpoint vs model): {'; '.join(shapes)}"
            )
        report = LoadReport(
            missing=[k for k in own if k not in weights], unexpected=[k for k in weights if k not in own]
        )
        if strict and not report.exact:
            raise CheckpointError(
                f"{directory} does not match the model: {report}. Load with strict=False to accept this, or "
                "register/remove those parts (add_task/remove_task, add_collection, add_modality) first"
            )
        self.load_state_dict({k: v for k, v in weights.items() if k in own}, strict=False)
        if not report.exact:
            log.warning("loaded %s with differences: %s", directory, report)
        return report
