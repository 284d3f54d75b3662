"""Pictures a run writes: sample grids and the loss curve (PNG, no display needed)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .files import written_atomically


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> uint8 [B, H, W, C]."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2, scale: int = 1) -> Image.Image:
    """Tile a batch into one picture, ``nrow`` images a row (default: as square as possible).

    ``scale`` enlarges each pixel (nearest neighbour) so that 16 px samples are visible.
    """
    pixels = to_uint8(images)
    b, h, w, c = pixels.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y:y + h, x:x + w] = pixels[i]
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)  # 2-D uint8 -> "L", 3-D -> "RGB"
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    return img


def display_scale(image_size: int, target: int = 64) -> int:
    """Enlarge small images in grids to about ``target`` px a tile, so they can be looked at."""
    return max(1, target // image_size)


def save_png(img: Image.Image, path: str | Path) -> Path:
    """Write through a temporary name, so a reader never sees a half-written picture."""
    path = Path(path)
    with written_atomically(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def save_images(images: torch.Tensor, folder: str | Path) -> list[Path]:
    """One PNG per image: 0000.png, 0001.png, ..."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, px in enumerate(to_uint8(images)):
        img = Image.fromarray(px[..., 0] if px.shape[-1] == 1 else px)
        paths.append(save_png(img, folder / f"{i:04d}.png"))
    return paths


def _plain_log_labels(axis) -> None:
    """The ticks matplotlib's log formatter labels, labelled as plain numbers (0.3, not 3x10^-1:
    a loss curve rarely spans a decade, where only minor ticks are labelled), with grid lines."""
    from matplotlib.ticker import LogFormatter

    class PlainLogFormatter(LogFormatter):
        def __call__(self, x, pos=None):
            return f"{x:g}" if super().__call__(x, pos) else ""

    axis.set_major_formatter(PlainLogFormatter())
    axis.set_minor_formatter(PlainLogFormatter(labelOnlyBase=False))


def plot_loss(steps: list[int], losses: list[float], path: str | Path, title: str = "") -> Path:
    """Loss per logged step (faint) and its running average (bold), log scale."""
    import matplotlib

    matplotlib.use("Agg")  # files only: works with no display and no GUI toolkit
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if steps:
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="loss")
        window = max(1, len(losses) // 20)
        kernel = np.ones(window) / window
        smooth = np.convolve(np.asarray(losses, dtype=float), kernel, mode="valid")
        ax.plot(steps[window - 1:], smooth, color="tab:blue", linewidth=2, label=f"mean of {window}")
        if min(losses) > 0:
            ax.set_yscale("log")
            _plain_log_labels(ax.yaxis)
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("rectified-flow loss (MSE)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    try:
        with written_atomically(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return path
