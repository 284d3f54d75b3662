"""LiquidDiffusion: an attention-free U-Net of Parallel CfC blocks, trained with rectified flow."""
import torch as _torch

# pyproject's floor, said at import where an environment got around pip (a conda torch): older
# versions fail later, in the middle of a backward (kernels/recompute.py).
if tuple(int(p) for p in _torch.__version__.split("+")[0].split(".")[:2]) < (2, 8):
    raise ImportError(f"liquiddiff needs torch >= 2.8, this environment has torch {_torch.__version__}")

from .model import (  # noqa: E402
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
