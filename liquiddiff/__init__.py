"""LiquidDiffusion: an attention-free U-Net of Parallel CfC blocks, trained with rectified flow."""
from .model import (
    PRESETS,
    LiquidDiffusion,
    LiquidDiffusionConfig,
    build,
    liquid_diffusion_base,
    liquid_diffusion_large,
    liquid_diffusion_micro,
    liquid_diffusion_small,
    liquid_diffusion_tiny,
)
from .training import RectifiedFlowTrainer

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "LiquidDiffusion",
    "LiquidDiffusionConfig",
    "RectifiedFlowTrainer",
    "build",
    "liquid_diffusion_micro",
    "liquid_diffusion_tiny",
    "liquid_diffusion_small",
    "liquid_diffusion_base",
    "liquid_diffusion_large",
]
