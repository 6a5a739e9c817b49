"""Cross-modal generation: translators that synthesise a missing modality (for pretext tasks only).

`Translator`, `ModalityFiller`, `fill_missing` and `strip_synthetic` live in `translator.py`; the
`medformer generate` command (Pix2Pix / CycleGAN training, PSNR / SSIM report) in `train.py`.
"""

from medformer.generate.translator import ModalityFiller, Translator, fill_missing, strip_synthetic

__all__ = [
    "GenerateConfig",
    "ModalityFiller",
    "Translator",
    "fill_missing",
    "run_generate",
    "strip_synthetic",
]


def __getattr__(name: str):
    if name in ("GenerateConfig", "run_generate"):  # the training side imports more: load it on demand
        from medformer.generate import train

        return getattr(train, name)
    raise AttributeError(f"module 'medformer.generate' has no attribute {name!r}")
