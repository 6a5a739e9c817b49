"""`medformer generate`: train a cross-modal translator, then measure it on the test split.

Two modes (Taleb et al. use both, by whether the data are registered):

- **paired** (Pix2Pix, Isola et al. 2017): registered pairs (x, y) of one subject. Generator
  ``G: x -> y`` (U-Net) and a conditional PatchGAN ``D(x, y)``; ``G`` minimises
  ``adversarial * GAN(D(x, G(x)), real) + lambda_l1 * |G(x) - y|_1``, ``D`` tells ``(x, y)`` from
  ``(x, G(x))``.
- **unpaired** (CycleGAN, Zhu et al. 2017): images of the two modalities from different subjects (or
  unregistered, e.g. CT and MRI). Generators ``G: x -> y``, ``F: y -> x`` and PatchGANs ``D_x``, ``D_y``;
  ``G`` and ``F`` minimise ``adversarial * (GAN(D_y(G(x))) + GAN(D_x(F(y))))
  + lambda_cycle * (|F(G(x)) - x|_1 + |G(F(y)) - y|_1) + lambda_identity * lambda_cycle * (|G(y) - y|_1 +
  |F(x) - x|_1)``. Both directions are saved (``translator/`` and ``translator_reverse/``).

GAN terms are least squares (LSGAN, as in CycleGAN's code) or the original cross-entropy
(``gan_loss: vanilla``). Training draws random crops (``patch_size``) so 3D volumes fit a CPU; the
translators are fully convolutional and run on whole images afterwards. The translator with the best
validation PSNR is kept. On the test split: PSNR, SSIM (MONAI, 7-voxel Gaussian window), MAE and the
PSNR inside the foreground, for the translator and for the trivial baseline "copy the source image",
written to ``results.json`` / ``report.md`` with an example figure ``examples.png``.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler

from medformer.config import RunConfig, Section, dump_config
from medformer.data.dataset import CollectionDataset, collate
from medformer.data.study import Collection, Study
from medformer.errors import ConfigError
from medformer.generate.translator import Translator
from medformer.runtime import resolve_device, seed_everything


class GenerateSection(Section):
    """What to translate and how (``generate:`` in a config; see docs/generation.md)."""

    source: str  # modality name, e.g. T1w
    target: str  # e.g. T2w
    mode: Literal["paired", "unpaired"] = "paired"
    collection: str | None = None  # which data source (default: the only one)
    patch_size: list[int] | None = None  # random training crops, e.g. [32, 32, 32]; null: whole images
    channels: list[int] = Field(default_factory=lambda: [32, 64, 128, 256])  # U-Net widths
    strides: list[int] = Field(default_factory=lambda: [2, 2, 2])
    num_res_units: int = Field(2, ge=0)
    norm: Literal["batch", "instance"] = "batch"  # U-Net normalisation (see Translator)
    disc_channels: int = Field(32, ge=1)  # PatchGAN width of its first layer
    disc_layers: int = Field(3, ge=1)  # PatchGAN downsampling layers
    adversarial: float = Field(1.0, ge=0)  # weight of the GAN term (0: plain L1 / cycle training)
    gan_loss: Literal["lsgan", "vanilla"] = "lsgan"
    lambda_l1: float = Field(100.0, ge=0)  # paired: Pix2Pix's L1 weight
    lambda_cycle: float = Field(10.0, ge=0)  # unpaired: cycle-consistency weight
    lambda_identity: float = Field(0.5, ge=0)  # unpaired: identity weight, relative to lambda_cycle
    disc_lr_ratio: float = Field(1.0, gt=0)  # discriminator learning rate = ratio x train.lr
    data_range: float = Field(1.0, gt=0)  # intensity range for PSNR / SSIM (1 after percentile scaling)
    val_studies: int = Field(8, ge=1)  # validation studies scored at each evaluation
    examples: int = Field(4, ge=0)  # test studies in examples.png


class GenerateConfig(RunConfig):
    """A `medformer generate` run: data + preprocessing as everywhere, the translator in ``generate``,
    and from ``train``: ``steps``, ``batch_size``, ``lr``, ``betas``, ``log_every``, ``eval_every``,
    ``num_workers``, ``progress``."""

    output: str = "runs/generate"
    generate: GenerateSection


# ----------------------------------------------------------------------------------------------------
# Image quality


def psnr(pred: Tensor, target: Tensor, data_range: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """Peak signal-to-noise ratio in dB per image, ``(B, C, *spatial)`` -> ``(B,)`` (over ``mask`` if
    given)."""
    err = (pred.float() - target.float()) ** 2
    if mask is None:
        mse = err.flatten(1).mean(1)
    else:
        m = mask.float().expand_as(err).flatten(1)
        mse = (err.flatten(1) * m).sum(1) / m.sum(1).clamp_min(1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-12))


def ssim(pred: Tensor, target: Tensor, data_range: float = 1.0, win_size: int = 7) -> Tensor:
    """Structural similarity per image (MONAI's ``SSIMMetric``, Gaussian window), ``(B,)``."""
    from monai.metrics import SSIMMetric

    ndim = pred.dim() - 2
    win = min(win_size, *pred.shape[2:])
    win -= 1 - win % 2  # odd
    metric = SSIMMetric(spatial_dims=ndim, data_range=data_range, win_size=win, reduction="none")
    return metric(pred.float(), target.float()).flatten()


def image_quality(pred: Tensor, target: Tensor, data_range: float = 1.0) -> dict[str, Tensor]:
    """PSNR, SSIM, MAE of whole images, and PSNR inside the foreground (target above its minimum)."""
    lowest = target.flatten(1).amin(1).view(-1, *[1] * (target.dim() - 1))
    return {
        "psnr": psnr(pred, target, data_range),
        "ssim": ssim(pred, target, data_range),
        "mae": (pred.float() - target.float()).abs().flatten(1).mean(1),
        "psnr_foreground": psnr(pred, target, data_range, target > lowest),
    }


# ----------------------------------------------------------------------------------------------------
# Data


def random_crop(
    images: Tensor, size: Sequence[int] | None, generator: torch.Generator | None = None
) -> Tensor:
    """A random crop of ``size`` per sample from ``(B, M, *spatial)`` (zero-padded first if smaller)."""
    if size is None:
        return images
    spatial = images.shape[2:]
    if len(size) != len(spatial):
        raise ConfigError(
            f"generate.patch_size {list(size)} has {len(size)} axes; the images have {len(spatial)}"
        )
    pad = []
    for s, c in zip(reversed(spatial), reversed(size)):
        pad += [0, max(0, c - s)]
    images = F.pad(images, pad)
    out = []
    for x in images:
        start = [
            int(torch.randint(0, s - c + 1, (1,), generator=generator)) for s, c in zip(x.shape[1:], size)
        ]
        out.append(x[(slice(None), *[slice(a, a + c) for a, c in zip(start, size)])])
    return torch.stack(out)


def batches(
    dataset: CollectionDataset, batch_size: int, steps: int, workers: int, seed: int
) -> Iterator[dict]:
    """``steps`` random batches drawn with replacement (an endless stream for a fixed-length run)."""
    generator = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(dataset, replacement=True, num_samples=steps * batch_size, generator=generator)
    loader = DataLoader(dataset, batch_size, sampler=sampler, collate_fn=collate, num_workers=workers)
    return iter(loader)


def _has(study: Study, *modalities: str) -> bool:
    return all(m in study.modalities for m in modalities)


def _pick_collection(collections: list[Collection], section: GenerateSection) -> Collection:
    if section.collection is not None:
        found = [c for c in collections if c.name == section.collection]
        if not found:
            raise ConfigError(
                f"generate.collection {section.collection!r} is not among {[c.name for c in collections]}"
            )
        return found[0]
    if len(collections) != 1:
        raise ConfigError(f"several data sources ({[c.name for c in collections]}): set generate.collection")
    return collections[0]


# ----------------------------------------------------------------------------------------------------
# Training


def gan_loss(logits: Tensor, real: bool, kind: str) -> Tensor:
    target = torch.ones_like(logits) if real else torch.zeros_like(logits)
    if kind == "lsgan":
        return F.mse_loss(logits, target)
    return F.binary_cross_entropy_with_logits(logits, target)


def patch_discriminator(ndim: int, in_channels: int, section: GenerateSection) -> nn.Module:
    """MONAI's PatchGAN (instance norm: batches are small); its last output is the real/fake map."""
    from monai.networks.nets import PatchDiscriminator

    return PatchDiscriminator(
        spatial_dims=ndim, channels=section.disc_channels, in_channels=in_channels,
        num_layers_d=section.disc_layers, norm="INSTANCE",
    )  # fmt: skip


def _judge(d: nn.Module, x: Tensor) -> Tensor:
    return d(x)[-1]


@torch.no_grad()
def evaluate_translator(
    translator: Translator,
    dataset: CollectionDataset,
    source: int,
    target: int,
    data_range: float,
    device: torch.device,
    limit: int | None = None,
) -> tuple[dict[str, float], dict[str, float]]:
    """Mean image quality over the studies of ``dataset`` (that have both modalities): the translator's,
    and the "copy the source image" baseline's."""
    translator.eval()
    sums: dict[str, float] = {}
    base: dict[str, float] = {}
    n = 0
    for i in range(len(dataset) if limit is None else min(limit, len(dataset))):
        item = dataset[i]
        x = item["images"][None, source : source + 1].to(device)
        y = item["images"][None, target : target + 1].to(device)
        for into, pred in ((sums, translator(x)), (base, x)):
            for k, v in image_quality(pred, y, data_range).items():
                into[k] = into.get(k, 0.0) + float(v.sum())
        n += 1
    translator.train()
    return {k: v / max(n, 1) for k, v in sums.items()}, {k: v / max(n, 1) for k, v in base.items()}


def run_generate(config: GenerateConfig, progress: bool = True) -> dict[str, Any]:
    """Train the translator(s) of ``config.generate``, score on test, write the run folder."""
    from medformer.finetune import open_collections
    from medformer.train.logging import RunLog

    seed_everything(config.seed)
    section, train_cfg = config.generate, config.train
    device = resolve_device(config.device)
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    dump_config(config, out / "config.yaml")
    if train_cfg.steps is None:
        raise ConfigError("generate: set train.steps (optimizer steps of the translator)")

    collections, cache = open_collections(config)  # type: ignore[arg-type]
    col = _pick_collection(collections, section)
    for m in (section.source, section.target):
        if m not in col.modalities:
            raise ConfigError(f"generate: modality {m!r} is not in {col.name} (modalities: {col.modalities})")
    si, ti = col.modalities.index(section.source), col.modalities.index(section.target)
    train = col.split("train")
    pairs = [s for s in train if _has(s, section.source, section.target)]
    if section.mode == "paired":
        pools = {"pairs": pairs}
    else:  # each direction from its own shuffled pool: no pairing is used, even where it exists
        pools = {
            "x": [s for s in train if _has(s, section.source)],
            "y": [s for s in train if _has(s, section.target)],
        }
    empty = [k for k, v in pools.items() if not v]
    if empty:
        raise ConfigError(
            f"generate: no training studies with {section.source} and/or {section.target} in {col.name}"
        )
    scored = {
        split: CollectionDataset(
            col,
            None,
            load=cache,
            studies=[s for s in col.split(split) if _has(s, section.source, section.target)],
        )
        for split in ("val", "test")
    }

    # networks and optimizers
    ndim = col.ndim
    info = {
        "mode": section.mode,
        "collection": col.name,
        "preprocess": config.preprocess.model_dump(mode="json"),
    }

    def make(source: str, target: str) -> Translator:
        return Translator(
            source, target, ndim, section.channels, section.strides, section.num_res_units, section.norm, info
        )

    g = make(section.source, section.target).to(device)
    nets: dict[str, nn.Module] = {"g": g}
    if section.mode == "paired":
        nets["d_y"] = patch_discriminator(ndim, 2, section)
    else:
        nets["f"] = make(section.target, section.source)
        nets["d_x"] = patch_discriminator(ndim, 1, section)
        nets["d_y"] = patch_discriminator(ndim, 1, section)
    for k in nets:
        nets[k] = nets[k].to(device).train()
    gen_params = [p for k, n in nets.items() if not k.startswith("d_") for p in n.parameters()]
    disc_params = [p for k, n in nets.items() if k.startswith("d_") for p in n.parameters()]
    opt_g = torch.optim.Adam(gen_params, lr=train_cfg.lr, betas=train_cfg.betas)
    opt_d = torch.optim.Adam(disc_params, lr=train_cfg.lr * section.disc_lr_ratio, betas=train_cfg.betas)

    bs, steps = train_cfg.batch_size, train_cfg.steps
    streams = {
        k: batches(
            CollectionDataset(col, None, load=cache, studies=v),
            bs,
            steps,
            train_cfg.num_workers,
            config.seed + i,
        )
        for i, (k, v) in enumerate(pools.items())
    }
    crop_gen = torch.Generator().manual_seed(config.seed)
    eval_every = train_cfg.eval_every or max(1, steps // 5)
    runlog = RunLog(out, True, steps, 0, progress and train_cfg.progress)
    runlog.info(
        "generate %s -> %s (%s, %dD) on %s: %d training studies, %d steps of %d, %s",
        section.source, section.target, section.mode, ndim, col.name,
        sum(len(v) for v in pools.values()), steps, bs, device,
    )  # fmt: skip
    best: tuple[float, dict[str, dict[str, Tensor]]] | None = None
    window: dict[str, float] = {}
    start = time.perf_counter()
    adv = section.adversarial
    try:
        for step in range(1, steps + 1):
            x, y = _draw(streams, section, si, ti, crop_gen)
            logs = _train_step(nets, opt_g, opt_d, x.to(device), y.to(device), section, adv)
            for k, v in logs.items():
                window[k] = window.get(k, 0.0) + v
            runlog.step()
            if step % train_cfg.log_every == 0 or step == steps:
                n = train_cfg.log_every if step % train_cfg.log_every == 0 else step % train_cfg.log_every
                record = {"step": step, **{k: v / n for k, v in window.items()}}
                runlog.record(record)
                runlog.postfix(record.get("loss_g"))
                window = {}
            if len(scored["val"]) and (step % eval_every == 0 or step == steps):
                val, _ = evaluate_translator(
                    g, scored["val"], si, ti, section.data_range, device, section.val_studies
                )
                runlog.record(
                    {"step": step, "split": "val", **{f"val/{k}": v for k, v in val.items()}}, prefix="val"
                )
                if best is None or val["psnr"] > best[0]:
                    best = (
                        val["psnr"],
                        {k: copy.deepcopy(n.state_dict()) for k, n in nets.items() if not k.startswith("d_")},
                    )
    finally:
        runlog.close()
    seconds = time.perf_counter() - start
    if best is not None:
        for k, state in best[1].items():
            nets[k].load_state_dict(state)

    # test, save, report
    results: dict[str, Any] = {
        "source": section.source, "target": section.target, "mode": section.mode, "collection": col.name,
        "ndim": ndim, "steps": steps, "train_seconds": round(seconds, 1),
        "selected_by": "best val PSNR" if best is not None else "last step",
    }  # fmt: skip
    for split in ("val", "test"):
        if len(scored[split]):
            quality, baseline = evaluate_translator(g, scored[split], si, ti, section.data_range, device)
            results[split] = quality
            results[f"{split}_copy_source"] = baseline
            results[f"{split}_studies"] = len(scored[split])
    g.info["metrics"] = {k: results[k] for k in ("val", "test") if k in results}
    g.save(out / "translator")
    if "f" in nets:
        nets["f"].save(out / "translator_reverse")
    rows = min(section.examples, len(scored["test"]))
    if rows:
        plot_examples(g, scored["test"], si, ti, out / "examples.png", rows, device)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    write_report(out / "report.md", results)
    return results


def _draw(
    streams: dict[str, Iterator[dict]], section: GenerateSection, si: int, ti: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """The next training batch: source and target crops ``(B, 1, *patch)`` (paired: the same crop)."""
    if section.mode == "paired":
        images = random_crop(next(streams["pairs"])["images"], section.patch_size, generator)
        return images[:, si : si + 1], images[:, ti : ti + 1]
    x = random_crop(next(streams["x"])["images"][:, si : si + 1], section.patch_size, generator)
    y = random_crop(next(streams["y"])["images"][:, ti : ti + 1], section.patch_size, generator)
    return x, y


def _train_step(
    nets: dict[str, nn.Module],
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    x: Tensor,
    y: Tensor,
    section: GenerateSection,
    adv: float,
) -> dict[str, float]:
    """One generator step and one discriminator step (paired: Pix2Pix; unpaired: CycleGAN)."""
    kind = section.gan_loss
    g = nets["g"]
    logs: dict[str, float] = {}
    discriminators = [n for k, n in nets.items() if k.startswith("d_")]
    for d in discriminators:
        d.requires_grad_(False)  # the generator step does not train them
    if "f" not in nets:  # paired
        fake = g(x)
        l1 = F.l1_loss(fake, y)
        loss_g = section.lambda_l1 * l1
        if adv > 0:
            loss_g = loss_g + adv * gan_loss(_judge(nets["d_y"], torch.cat([x, fake], 1)), True, kind)
        logs["l1"] = float(l1.detach())
        fakes = {"d_y": (torch.cat([x, y], 1), torch.cat([x, fake.detach()], 1))}
    else:  # unpaired
        f = nets["f"]
        fake_y, fake_x = g(x), f(y)
        cycle = F.l1_loss(f(fake_y), x) + F.l1_loss(g(fake_x), y)
        loss_g = section.lambda_cycle * cycle
        if section.lambda_identity > 0:
            identity = F.l1_loss(g(y), y) + F.l1_loss(f(x), x)
            loss_g = loss_g + section.lambda_identity * section.lambda_cycle * identity
            logs["identity"] = float(identity.detach())
        if adv > 0:
            loss_g = loss_g + adv * (
                gan_loss(_judge(nets["d_y"], fake_y), True, kind)
                + gan_loss(_judge(nets["d_x"], fake_x), True, kind)
            )
        logs["cycle"] = float(cycle.detach())
        fakes = {"d_y": (y, fake_y.detach()), "d_x": (x, fake_x.detach())}
    opt_g.zero_grad(set_to_none=True)
    loss_g.backward()
    opt_g.step()
    logs["loss_g"] = float(loss_g.detach())
    if adv > 0:
        loss_d = 0.0
        for name, (real, fake) in fakes.items():
            d = nets[name].requires_grad_(True)
            loss_d = loss_d + 0.5 * (
                gan_loss(_judge(d, real), True, kind) + gan_loss(_judge(d, fake), False, kind)
            )
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        logs["loss_d"] = float(loss_d.detach())
    return logs


# ----------------------------------------------------------------------------------------------------
# Report


@torch.no_grad()
def plot_examples(
    translator: Translator, dataset: CollectionDataset, source: int, target: int, path: Path, rows: int,
    device: torch.device,
) -> Path:  # fmt: skip
    """Rows of studies: source, synthetic, target, |synthetic - target| (3D: the middle axial slice)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    translator.eval()
    fig = Figure(figsize=(10, 2.6 * rows))
    FigureCanvasAgg(fig)
    axes = np.asarray(fig.subplots(rows, 4, squeeze=False))
    for r in range(rows):
        item = dataset[r]
        x = item["images"][None, source : source + 1].to(device)
        y = item["images"][None, target : target + 1]
        pred = translator(x).cpu()
        q = {k: float(v) for k, v in image_quality(pred, y).items()}
        pictures = [x.cpu()[0, 0], pred[0, 0], y[0, 0], (pred - y).abs()[0, 0]]
        if pictures[0].dim() == 3:
            pictures = [p[p.shape[0] // 2] for p in pictures]
        titles = [translator.source, f"synthetic {translator.target}", translator.target, "|error|"]
        for c, (ax, pic, title) in enumerate(zip(axes[r], pictures, titles)):
            ax.imshow(pic.numpy(), cmap="magma" if c == 3 else "gray", vmin=0, vmax=1 if c < 3 else 0.3)
            ax.set_axis_off()
            ax.set_title(title if r == 0 else "", fontsize=9)
        label = f"{item['id']}\nPSNR {q['psnr']:.1f} dB, SSIM {q['ssim']:.3f}"
        axes[r, 1].text(0.02, 0.02, label, color="yellow", fontsize=7, transform=axes[r, 1].transAxes)
    fig.suptitle(
        f"{translator.source} -> {translator.target}: test studies (synthetic images are not real data)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    translator.train()
    return path


def write_report(path: Path, results: dict[str, Any]) -> Path:
    """A short Markdown summary of a generate run."""
    lines = [
        f"# Cross-modal translation {results['source']} -> {results['target']} ({results['mode']})",
        "",
        f"Collection {results['collection']} ({results['ndim']}D), {results['steps']} steps, "
        f"{results['train_seconds']} s of training; translator {results['selected_by']}.",
        "",
        "| split | model | PSNR (dB) | PSNR foreground (dB) | SSIM | MAE |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for split in ("val", "test"):
        for name, key in (("translator", split), ("copy the source", f"{split}_copy_source")):
            if key in results:
                m = results[key]
                lines.append(
                    f"| {split} ({results[f'{split}_studies']}) | {name} | {m['psnr']:.2f} | "
                    f"{m['psnr_foreground']:.2f} | {m['ssim']:.4f} | {m['mae']:.4f} |"
                )
    lines += ["", "![examples](examples.png)", ""]
    path.write_text("\n".join(lines))
    return path


__all__ = [
    "GenerateConfig",
    "GenerateSection",
    "evaluate_translator",
    "image_quality",
    "psnr",
    "random_crop",
    "run_generate",
    "ssim",
]
