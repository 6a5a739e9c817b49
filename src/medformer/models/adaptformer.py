"""The Input and Output Adaptformers: what makes one body serve every collection, modality and task.

The Input Adaptformer turns a batch of any dimensionality, size and modality set into a `TokenSet`
and owns the learned latent embeddings that tell the body what it is looking at: one vector per
modality (added to that modality's tokens), a few latent tokens per collection (dataset / body part,
prepended to the sequence) and one latent token per task (appended as a reader; see `body.py`).
The Output Adaptformer holds one head per task (`heads.py`).

Vocabularies grow by name (``add_modality("T1")``): each entry is its own parameter, stored under its
name, so adding a modality, collection or task adds exactly its own weights and a checkpoint written
before the addition still loads into everything else unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from medformer.models.tokenizers import (
    ConvPatchTokenizer,
    Encoded,
    HybridTokenizer,
    PatchTokenizer,
    TokenSet,
    sincos_position_embedding,
)


def check_name(kind: str, name: str) -> str:
    """Vocabulary names become parameter names: non-empty, no dots."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"{kind} name {name!r} is invalid: use a non-empty string without '.'")
    return name


def _embedding(like: Tensor, *shape: int) -> nn.Parameter:
    """A new N(0, 0.02) embedding on the device and dtype of ``like`` (a model may grow after `.to()`)."""
    return nn.Parameter(torch.randn(*shape, device=like.device, dtype=like.dtype) * 0.02)


class InputAdaptformer(nn.Module):
    """Tokenizers (one per dimensionality) and the latent embeddings (modality, collection, task)."""

    def __init__(
        self,
        dim: int,
        patch_size_2d: int,
        patch_size_3d: int,
        num_latents: int = 1,
        tokenizer: str = "linear",
        stem_width_3d: int = 8,
        collection_stems: bool = False,
    ):
        super().__init__()
        self.dim, self.num_latents = dim, num_latents
        make = {"linear": PatchTokenizer, "conv": ConvPatchTokenizer, "hybrid": HybridTokenizer}[tokenizer]
        stems = {"collection_stems": collection_stems} if tokenizer == "hybrid" else {}
        self.tokenizers = nn.ModuleDict(
            {
                "2d": make(2, patch_size_2d, dim, **stems),
                "3d": make(3, patch_size_3d, dim, **({"width": stem_width_3d, **stems} if stems else {})),
            }
        )
        self.modality_embed = nn.ParameterDict()
        self.collection_embed = nn.ParameterDict()
        self.task_embed = nn.ParameterDict()

    def _like(self) -> Tensor:
        return self.tokenizers["2d"].proj.weight

    def patch_size(self, ndim: int) -> int:
        return self.tokenizers[f"{ndim}d"].patch_size

    # -- vocabularies -------------------------------------------------------------------------------
    def add_modality(self, name: str) -> None:
        if check_name("modality", name) not in self.modality_embed:
            self.modality_embed[name] = _embedding(self._like(), self.dim)

    def add_collection(self, name: str, ndim: int | None = None) -> None:
        """Latent tokens for the collection, and its own statistics (and stem, with collection stems) in a
        tokenizer that keeps them: the 2D one for a 2D collection; both for a 3D one (its slices are 2D
        images: cross-dimensional consistency reads them) or when its dimensionality is not known."""
        if check_name("collection", name) not in self.collection_embed:
            self.collection_embed[name] = _embedding(self._like(), self.num_latents, self.dim)
        for key, tokenizer in self.tokenizers.items():
            if isinstance(tokenizer, HybridTokenizer) and int(key[0]) <= (ndim or 3):
                tokenizer.add_collection(name)

    def add_task(self, key: str) -> None:
        if check_name("task", key) not in self.task_embed:
            self.task_embed[key] = _embedding(self._like(), self.dim)

    # -- tokens -------------------------------------------------------------------------------------
    def tokenize(
        self,
        images: Tensor,
        modalities: tuple[str, ...] | list[str],
        present: Tensor | None = None,
        collection: str | None = None,
    ) -> TokenSet:
        """``images`` ``(B, M, *spatial)`` -> a `TokenSet` (see its docstring).

        Modalities absent from every sample get no tokens at all; when only some samples lack one, its
        tokens become padding (``pad``), which no token attends to. Absent images are zeroed, so their
        pixel values can never reach an output.
        """
        if images.dim() not in (4, 5):
            raise ValueError(
                "images must be (batch, modalities, H, W) or (batch, modalities, D, H, W), "
                f"got {tuple(images.shape)}"
            )
        b, m = images.shape[:2]
        ndim = images.dim() - 2
        if len(modalities) != m:
            raise ValueError(
                f"images have {m} modality channel(s), but {len(modalities)} modality names were given"
            )
        unknown = [name for name in modalities if name not in self.modality_embed]
        if unknown:
            raise KeyError(f"unknown modalities {unknown}: register them with model.add_modality(name)")
        if collection is not None and collection not in self.collection_embed:
            raise KeyError(f"unknown collection {collection!r}: register it with model.add_collection(name)")
        if present is None:
            present = torch.ones(b, m, dtype=torch.bool, device=images.device)
        present = present.to(images.device, torch.bool)
        if not present.any(1).all():
            empty = torch.nonzero(~present.any(1)).flatten().tolist()
            raise ValueError(f"sample(s) {empty} of the batch have no modality present")

        if not images.is_floating_point():
            images = images.float()
        keep = present.any(0)  # modalities that some sample has
        if not keep.all():
            idx = torch.nonzero(keep).flatten()
            images, present = images[:, idx], present[:, idx]
            modalities = tuple(modalities[i] for i in idx.tolist())
        modalities = tuple(modalities)
        all_present = bool(present.all())
        if not all_present:
            images = images.masked_fill(~present.view(b, -1, *[1] * ndim), 0.0)  # even NaN becomes 0

        tokenizer = self.tokenizers[f"{ndim}d"]
        tokens, grid = (  # (B, M', G, D)
            tokenizer(images, collection) if isinstance(tokenizer, HybridTokenizer) else tokenizer(images)
        )
        g = tokens.shape[2]
        pos = sincos_position_embedding(grid, self.dim, tokens.device, tokens.dtype)
        mod = torch.stack([self.modality_embed[name] for name in modalities])  # (M', D)
        tokens = (tokens + pos + mod[:, None, :]).flatten(1, 2)  # (B, M' * G, D), modality-major

        mm = len(modalities)
        pad = None if all_present else (~present)[:, :, None].expand(b, mm, g).reshape(b, mm * g)
        modality = torch.arange(mm, device=tokens.device).repeat_interleave(g).expand(b, -1)
        position = torch.arange(g, device=tokens.device).repeat(mm).expand(b, -1)
        return TokenSet(
            tokens=tokens,
            pad=pad,
            modality=modality,
            position=position,
            grid=grid,
            spatial=tuple(images.shape[2:]),
            patch_size=tokenizer.patch_size,
            modalities=modalities,
            present=present,
            collection=collection,
            images=images,
        )

    def latents(self, collection: str | None, batch: int) -> Tensor:
        """The collection's latent tokens ``(B, L, D)`` (``L = 0`` when no collection is given)."""
        if collection is None:
            return self._like().new_zeros(batch, 0, self.dim)
        return self.collection_embed[collection].expand(batch, -1, -1)

    def task_tokens(self, keys: list[str], batch: int) -> Tensor:
        """The tasks' latent tokens ``(B, T, D)``."""
        missing = [k for k in keys if k not in self.task_embed]
        if missing:
            raise KeyError(f"unknown tasks {missing}: register them with model.add_task(spec)")
        return torch.stack([self.task_embed[k] for k in keys]).expand(batch, -1, -1)


class OutputAdaptformer(nn.Module):
    """One head per task key; `forward` runs the requested ones on the body's output."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleDict()

    def forward(self, encoded: Encoded, keys: list[str]) -> dict[str, Tensor]:
        return {k: self.heads[k](encoded) for k in keys}
