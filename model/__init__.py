"""dinoray model: pure PyTorch DINOv2 (no Ray, no DeepSpeed, no process groups).

The public API, loaded on first use (so `import model.schedules` or `model.recipes` does not pull in
torch for the config checks of `dinoray validate`); see model/vit.py, layers.py, heads.py, losses.py,
masking.py, ema.py, schedules.py, ssl.py, distill.py, recipes.py.
"""
import importlib

# public name -> the submodule that defines it
_EXPORTS = {
    "DistillMetaArch": "distill", "EMAMetaArch": "ema", "ema_update_": "ema", "DINOHead": "heads",
    "LOSS_PARTS": "losses", "MaskGenerator": "masking", "collate_masks": "masking",
    "DEFAULT_CFG": "ssl", "SSLMetaArch": "ssl", "normalize_images": "ssl",
    "ARCHS": "vit", "HUB_MODELS": "vit", "DinoVisionTransformer": "vit", "build_backbone": "vit",
    "build_hub_backbone": "vit", "flops_per_image": "vit", "native_bf16": "vit", "ssl_flops_per_image": "vit",
}
_SUBMODULES = ("distill", "drop_path", "ema", "heads", "layers", "losses", "masking", "recipes", "schedules", "ssl", "vit")

__all__ = sorted([*_EXPORTS, *_SUBMODULES])


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
