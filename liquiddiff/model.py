"""The LiquidDiffusion U-Net and its presets."""
from __future__ import annotations

import itertools
import numbers
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .modules import (
    DownSample,
    FusedSwitch,
    LiquidDiffusionBlock,
    SkipFusion,
    TimestepEmbedding,
    UpSample,
    project_time,
)


@dataclass(frozen=True)
class LiquidDiffusionConfig:
    channels: tuple[int, ...] = (64, 128, 256)
    blocks: tuple[int, ...] = (2, 2, 4)
    bottleneck_blocks: int = 2
    in_channels: int = 3
    ffn_mult: int = 2
    name: str = "custom"

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "blocks", tuple(int(b) for b in self.blocks))
        if not self.channels or len(self.channels) != len(self.blocks):
            raise ValueError(
                f"channels {self.channels} and blocks {self.blocks} (--channels, --blocks, or the preset's) must "
                f"be non-empty and of equal length: one block count per stage"
            )
        if any(c <= 0 for c in self.channels) or any(b < 0 for b in self.blocks):
            raise ValueError(f"channels must be positive and blocks non-negative: {self.channels}, {self.blocks}")
        if self.in_channels <= 0:
            raise ValueError(f"in_channels must be positive, got {self.in_channels}")

    @property
    def downsample_factor(self) -> int:
        """H and W must be multiples of this (one stride-2 conv between stages)."""
        return 2 ** (len(self.channels) - 1)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


PRESETS: dict[str, LiquidDiffusionConfig] = {
    # Sized for a CPU demo: 32 px digits train in minutes on two cores.
    "micro": LiquidDiffusionConfig(channels=(32, 64), blocks=(1, 1), bottleneck_blocks=1, name="micro"),
    "tiny": LiquidDiffusionConfig(channels=(64, 128, 256), blocks=(2, 2, 4), name="tiny"),
    "small": LiquidDiffusionConfig(channels=(96, 192, 384), blocks=(2, 3, 6), name="small"),
    "base": LiquidDiffusionConfig(channels=(128, 256, 512), blocks=(2, 4, 8), name="base"),
    "large": LiquidDiffusionConfig(channels=(128, 256, 512, 768), blocks=(2, 4, 8, 4), name="large"),
}


def _stage(channels: int, n: int, temb_dim: int, ffn_mult: int) -> nn.ModuleList:
    return nn.ModuleList(LiquidDiffusionBlock(channels, temb_dim, ffn_mult) for _ in range(n))


class LiquidDiffusion(nn.Module):
    """Attention-free U-Net of LiquidDiffusionBlocks predicting the rectified-flow velocity.

    forward(x [B, C, H, W], t [B] in [0, 1], or one time for the batch) -> velocity [B, C, H, W].
    """

    def __init__(self, config: LiquidDiffusionConfig | None = None, *, fused: bool = False, **overrides):
        super().__init__()
        config = replace(config or LiquidDiffusionConfig(), **overrides)
        self.config = config
        ch = config.channels
        temb_dim = 4 * ch[0]
        self.time_embed = TimestepEmbedding(ch[0], temb_dim)
        self.stem = nn.Sequential(
            nn.Conv2d(config.in_channels, ch[0], 3, padding=1), nn.SiLU(), nn.Conv2d(ch[0], ch[0], 3, padding=1)
        )
        self.encoder = nn.ModuleList(_stage(c, n, temb_dim, config.ffn_mult) for c, n in zip(ch, config.blocks))
        self.downs = nn.ModuleList(DownSample(ch[i], ch[i + 1]) for i in range(len(ch) - 1))
        self.bottleneck = _stage(ch[-1], config.bottleneck_blocks, temb_dim, config.ffn_mult)
        self.ups = nn.ModuleList(UpSample(ch[i + 1], ch[i]) for i in range(len(ch) - 1))
        self.fusions = nn.ModuleList(SkipFusion(c) for c in ch)
        self.decoder = nn.ModuleList(_stage(c, n, temb_dim, config.ffn_mult) for c, n in zip(ch, config.blocks))
        # 32 groups (all channels below 32); where 32 does not divide the channels (48, 40), the
        # most groups up to 32 that do, which GroupNorm requires.
        self.head_norm = nn.GroupNorm(next(g for g in range(min(32, ch[0]), 0, -1) if ch[0] % g == 0), ch[0])
        self.head = nn.Conv2d(ch[0], config.in_channels, 3, padding=1)
        self.set_fused(fused)
        self.gradient_checkpointing = False

    @classmethod
    def from_checkpoint(cls, path, *, ema: bool = True, fused: bool = False) -> "LiquidDiffusion":
        """The model a ``liquiddiff train`` / ``RectifiedFlowTrainer.save_checkpoint`` file holds,
        for inference: its config, the EMA weights (``ema=False``: the raw ones), on the CPU, in
        eval mode. ``.to(device)`` it, call it, or hand it to a trainer to sample."""
        from . import checkpoint as checkpoint_file

        return cls.from_state(checkpoint_file.load(path), ema=ema, fused=fused, source=f"checkpoint {path}")

    @classmethod
    def from_state(cls, state: dict, *, ema: bool = True, fused: bool = False,
                   source: str = "checkpoint") -> "LiquidDiffusion":
        """:meth:`from_checkpoint` from a checkpoint already read (``checkpoint.load``)."""
        saved = state.get("config")
        if not isinstance(saved, dict):
            raise ValueError(f"{source} has no model config; it was not written by liquiddiff")
        try:
            model = cls(LiquidDiffusionConfig(**saved), fused=fused)
        except TypeError as exc:
            raise ValueError(f"{source}: unexpected model config {saved} ({exc})") from None
        try:
            model.load_state_dict(state["ema" if ema else "model"])
        except RuntimeError as exc:  # shapes that do not match the config: a damaged or edited file
            raise ValueError(f"{source}: weights do not match its model config ({exc})") from None
        return model.eval()

    @property
    def fused(self) -> bool:
        return self._fused

    def set_fused(self, fused: bool = True) -> "LiquidDiffusion":
        """Route the CfC and AdaLN ops through the fused kernels (or back); weights are untouched."""
        self._fused = bool(fused)
        for m in self.modules():
            if isinstance(m, FusedSwitch):
                m.fused = self._fused
        return self

    def set_gradient_checkpointing(self, enabled: bool = True) -> "LiquidDiffusion":
        """Keep only each block's inputs for backward and rerun the block's forward there
        (``torch.utils.checkpoint``): far less activation memory for about one more forward pass
        of the blocks per train step. It changes no value or gradient, and is a setting of this
        module, not of its config or ``state_dict``."""
        self.gradient_checkpointing = bool(enabled)
        return self

    def _block(self, block: LiquidDiffusionBlock, h, temb, t, projected):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            # No RNG state to keep: a block draws no random numbers.
            return checkpoint(block, h, temb, t, projected, use_reentrant=False, preserve_rng_state=False)
        return block(h, temb, t, projected)

    def blocks(self) -> list[LiquidDiffusionBlock]:
        """The LiquidDiffusionBlocks in the order forward calls them."""
        stages = [*self.encoder, self.bottleneck, *reversed(self.decoder)]
        return [block for stage in stages for block in stage]

    def check_input(self, x: torch.Tensor, t: torch.Tensor | None = None) -> None:
        """Shape checks with messages that say what to change; run before any work."""
        cfg = self.config
        if x.dim() != 4:
            raise ValueError(f"x: expected images [B, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != cfg.in_channels:
            raise ValueError(f"x: expected {cfg.in_channels} channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        k = cfg.downsample_factor
        if x.shape[2] % k or x.shape[3] % k:
            raise ValueError(
                f"x: image size {x.shape[2]}x{x.shape[3]} must be a multiple of {k} "
                f"for {len(cfg.channels)} U-Net stages"
            )
        if t is not None and (t.dim() != 1 or t.shape[0] != x.shape[0]):
            raise ValueError(f"t: expected shape [{x.shape[0]}] or one time for the batch, got {tuple(t.shape)}")

    @staticmethod
    def batch_times(x: torch.Tensor, t) -> torch.Tensor:
        """``t`` as [B]: one time (a number, a 0-d or one-element tensor, as in the seed's Euler
        loop ``model(z, i / N)``) is every image's, on x's device; a [B] tensor is left as it is.
        A number becomes fp32 (fp64 for a float64 x). Under ``torch.compile`` it is a value dynamo
        makes symbolic after its second one (``torch.full``, where ``as_tensor`` made it a
        constant: a graph per value, then eager past the recompile limit)."""
        if isinstance(t, numbers.Real):  # a Python or numpy number
            t = torch.full((1,), t, device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
        elif not isinstance(t, torch.Tensor):  # a numpy array, a list
            t = torch.as_tensor(t, device=x.device)
        if t.numel() == 1 and t.dim() <= 1 and x.dim() == 4:
            t = t.reshape(1).to(x.device).expand(x.shape[0])
        return t

    def forward(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        t = self.batch_times(x, t)
        self.check_input(x, t)
        temb = self.time_embed(t)
        if x.is_floating_point():
            # The relaxation weight in the activations' dtype: a float64 t (from numpy), or a model
            # cast to bf16 for inference given an fp32 t, would otherwise promote every block's output.
            t = t.to(x.dtype)
        # Fused, every block's time projections in one GEMM (they all project the same temb);
        # blocks take them in call order.
        projected = iter(project_time(temb, self.blocks()) if self.fused else itertools.repeat(None))
        h = self.stem(x)
        skips = []
        for i, stage in enumerate(self.encoder):
            for block in stage:
                h = self._block(block, h, temb, t, next(projected))
            skips.append(h)
            if i < len(self.downs):
                h = self.downs[i](h)
        for block in self.bottleneck:
            h = self._block(block, h, temb, t, next(projected))
        for i in reversed(range(len(self.decoder))):
            if i < len(self.ups):
                h = self.ups[i](h)
            h = self.fusions[i](h, skips[i])
            for block in self.decoder[i]:
                h = self._block(block, h, temb, t, next(projected))
        return self.head(F.silu(self.head_norm(h)))


def build(preset: str, *, fused: bool = False, **overrides) -> LiquidDiffusion:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    return LiquidDiffusion(PRESETS[preset], fused=fused, **overrides)


def liquid_diffusion_micro(*, fused: bool = False, **overrides) -> LiquidDiffusion:
    return build("micro", fused=fused, **overrides)


def liquid_diffusion_tiny(*, fused: bool = False, **overrides) -> LiquidDiffusion:
    return build("tiny", fused=fused, **overrides)


def liquid_diffusion_small(*, fused: bool = False, **overrides) -> LiquidDiffusion:
    return build("small", fused=fused, **overrides)


def liquid_diffusion_base(*, fused: bool = False, **overrides) -> LiquidDiffusion:
    return build("base", fused=fused, **overrides)


def liquid_diffusion_large(*, fused: bool = False, **overrides) -> LiquidDiffusion:
    return build("large", fused=fused, **overrides)
