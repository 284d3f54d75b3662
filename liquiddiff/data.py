"""Training data without torchvision: an image folder and the digits scikit-learn ships.

Both datasets return float tensors [C, H, W] in [-1, 1], the range the trainer expects.
Random horizontal flips are not done here but on the batch in the training loop, with the
global torch RNG, so that they are part of the RNG state a checkpoint restores.
"""
from __future__ import annotations

import signal
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")

# What PIL raises on a file that is not an image, is truncated or is otherwise broken.
_BROKEN_IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def to_unit_range(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [H, W] or [H, W, C] -> float [C, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.array(pixels, dtype=np.uint8)).float()  # a copy: PIL's buffer is read-only
    if x.dim() == 2:
        x = x.unsqueeze(-1)
    return x.permute(2, 0, 1) / 127.5 - 1.0


# Single-channel integer modes: 16-bit PNGs open as "I;16" (or as "I" in older Pillow), whose
# values PIL's convert("RGB") clips at 255 instead of scaling.
_WIDE_GRAY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit grayscale scaled from 0..65535, every other mode as PIL converts it."""
    if img.mode in _WIDE_GRAY_MODES:
        pixels = np.asarray(img, dtype=np.float64) * (255.0 / 65535.0)
        img = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
    return img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Scale the short side to ``size`` (antialiased), then cut the centred square."""
    w, h = img.size
    scale = size / min(w, h)
    # max(size, ...) guards against rounding the short side to size - 1.
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def find_images(root: str | Path) -> list[Path]:
    """Image files under ``root``, searched recursively, in a stable (sorted) order."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"--data: folder {root} does not exist")
    if not root.is_dir():
        raise ValueError(f"--data: {root} is not a folder")
    files = sorted(
        p for p in root.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith(".")
    )
    if not files:
        raise ValueError(
            f"--data: no images in {root} (searched recursively for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return files


def _check_image(path: Path, size: int) -> str | None:
    """None if PIL can read ``path`` as an image, else a short reason.

    verify() checks the file structure (PNG chunk CRCs included) but not the pixel data, so the
    image is decoded too: a truncated JPEG passes verify() and only fails there. JPEGs decode
    at a reduced scale (draft), which keeps the scan of a large folder cheap.
    """
    try:
        with Image.open(path) as img:
            img.verify()
        with Image.open(path) as img:
            img.draft("RGB", (size, size))
            img.load()
    except UnidentifiedImageError:
        return "not an image PIL can read"
    except _BROKEN_IMAGE_ERRORS as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@dataclass
class ScanReport:
    found: int
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def usable(self) -> int:
        return self.found - len(self.skipped)


class ImageFolder(torch.utils.data.Dataset):
    """Every png/jpg/webp under a folder, resized and centre-cropped to ``image_size``, as RGB.

    Files PIL cannot read are skipped and counted (``report``) by a scan that decodes every
    file once. A file that breaks after the scan (``load_failures``) is skipped from then on, and
    the loader serves the next readable image instead: one bad file never stops a long run.
    """

    channels = 3

    def __init__(self, root: str | Path, image_size: int, progress: bool = False):
        from tqdm import tqdm

        self.root = Path(root)
        self.image_size = int(image_size)
        files = find_images(self.root)
        self.report = ScanReport(found=len(files))
        self.files = []
        scan = tqdm(files, desc="checking images", unit="file", disable=not progress or len(files) < 1000)
        for path in scan:
            reason = _check_image(path, self.image_size)
            if reason is None:
                self.files.append(path)
            else:
                self.report.skipped.append((path, reason))
        if not self.files:
            raise ValueError(
                f"--data: none of the {len(files)} image files in {self.root} could be read "
                f"(first: {files[0]}: {self.report.skipped[0][1]})"
            )
        self.load_failures: dict[int, str] = {}  # index -> reason, in this process

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> torch.Tensor:
        path = self.files[index]
        with Image.open(path) as img:
            img.draft("RGB", (self.image_size, self.image_size))  # JPEG: decode at reduced size
            img = to_rgb(ImageOps.exif_transpose(img))  # a phone photo the way it is displayed
        return to_unit_range(np.asarray(resize_center_crop(img, self.image_size)))

    def __getitem__(self, index: int) -> torch.Tensor:
        for offset in range(len(self.files)):
            i = (index + offset) % len(self.files)
            if i in self.load_failures:
                continue
            try:
                return self.load(i)
            except _BROKEN_IMAGE_ERRORS as exc:
                self.load_failures[i] = str(exc)
                warnings.warn(f"skipping unreadable image {self.files[i]}: {exc}", RuntimeWarning, stacklevel=2)
        raise ValueError(f"--data: no image in {self.root} could be decoded")


class DigitsDataset(torch.utils.data.Dataset):
    """The 1797 8x8 handwritten digits bundled with scikit-learn, upscaled; no download.

    Pixels are 0..16 in the original; bilinear upscaling gives smooth strokes rather than
    blocks, which makes the generated digits easier to judge by eye.
    """

    channels = 1

    def __init__(self, image_size: int):
        from sklearn.datasets import load_digits  # scikit-learn ships the data in its wheel

        self.image_size = int(image_size)
        digits = torch.from_numpy(load_digits().images).float().unsqueeze(1) / 16.0  # [N, 1, 8, 8]
        up = F.interpolate(digits, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        self.images = (up.clamp(0, 1) * 2 - 1).contiguous()
        self.report = ScanReport(found=len(self.images))
        self.root = None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index]

    def __getitems__(self, indices: list[int]) -> torch.Tensor:
        # Batched fetch: one gather instead of a Python call and a collate per image.
        return self.images[torch.as_tensor(indices)]


def ignore_interrupts(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a terminal's Ctrl-C reaches the workers too, and one that
    quits on it leaves the training loop a "worker exited unexpectedly" error instead of the
    stop after the step it asked for. The main process shuts the workers down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def random_hflip(images: torch.Tensor) -> torch.Tensor:
    """Flip each image of a batch left-right with probability 1/2 (global torch RNG)."""
    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


class ResumableBatches(torch.utils.data.Sampler):
    """Endless batches of indices, epoch after epoch, that can start at any point of an epoch.

    The order of epoch ``e`` comes from ``DistributedSampler`` (seed + e), so each rank of a
    torchrun job sees its own shard and a resumed run sees the images it would have seen. The
    position, ``(epoch, offset)`` with offset the images of that epoch already served (each
    rank the same count of its own shard), is a function of the start and the batches served:
    :meth:`position_after`, which a checkpoint keeps. A run resumed with another batch size
    goes on from the same image; an epoch's last images that fill no batch are left out.
    """

    def __init__(self, dataset, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, start: tuple[int, int] = (0, 0)):
        self.sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.batch_size = batch_size
        self.images_per_epoch = len(self.sampler)
        if self.images_per_epoch // batch_size == 0:
            raise ValueError(
                f"--batch-size {batch_size} is larger than the {self.images_per_epoch} images each of "
                f"{world_size} process(es) gets; use a smaller batch"
            )
        epoch, offset = start
        # An offset that leaves no batch in this epoch (a resume with more processes, so fewer
        # images each, or a smaller batch before) starts the next: as iterating would.
        self.start = (epoch + 1, 0) if offset + batch_size > self.images_per_epoch else (epoch, offset)

    def position_after(self, batches: int) -> tuple[int, int]:
        """(epoch, offset) once ``batches`` batches have been served from the start."""
        epoch, offset = self.start
        left_in_epoch = (self.images_per_epoch - offset) // self.batch_size
        if batches < left_in_epoch:
            return epoch, offset + batches * self.batch_size
        full_epochs, into = divmod(batches - left_in_epoch, self.images_per_epoch // self.batch_size)
        return epoch + 1 + full_epochs, into * self.batch_size

    def __iter__(self):
        epoch, offset = self.start
        while True:
            self.sampler.set_epoch(epoch)
            order = list(self.sampler)
            while offset + self.batch_size <= len(order):
                yield order[offset:offset + self.batch_size]
                offset += self.batch_size
            epoch, offset = epoch + 1, 0
