"""dinoray model: pure PyTorch DINOv2 (no Ray, no DeepSpeed, no process groups).

Re-exports the public API; see model/vit.py, heads.py, losses.py, masking.py, ema.py, schedules.py,
ssl.py, distill.py, recipes.py.
"""

from . import losses, masking, recipes, schedules
from .distill import DistillMetaArch
from .ema import EMAMetaArch, ema_update_
from .heads import DINOHead
from .losses import LOSS_PARTS
from .masking import MaskGenerator, collate_masks
from .ssl import DEFAULT_CFG, SSLMetaArch, normalize_images
from .vit import (ARCHS, HUB_MODELS, DinoVisionTransformer, build_backbone, build_hub_backbone,
                  flops_per_image, ssl_flops_per_image)

__all__ = [
    "ARCHS", "DEFAULT_CFG", "DINOHead", "DinoVisionTransformer", "DistillMetaArch", "EMAMetaArch", "HUB_MODELS",
    "LOSS_PARTS", "MaskGenerator", "SSLMetaArch", "build_backbone", "build_hub_backbone", "collate_masks",
    "ema_update_", "flops_per_image", "losses", "masking", "normalize_images", "recipes", "schedules",
    "ssl_flops_per_image",
]
