"""Training data without torchvision: an image folder, a Hugging Face dataset's image column, and
the digits scikit-learn ships.

Each dataset returns float tensors [C, H, W] in [-1, 1], the range the trainer expects.
Random horizontal flips are not done here but on the batch in the training loop, with the
global torch RNG, so that they are part of the RNG state a checkpoint restores.
"""
from __future__ import annotations

import io
import re
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


def load_image(source, size: int) -> torch.Tensor:
    """An image file (a path or a binary file object) as float [3, size, size] in [-1, 1]: RGB,
    turned the way its EXIF orientation says it is displayed, resized and centre-cropped."""
    with Image.open(source) as img:
        img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale, not at full size
        img = to_rgb(ImageOps.exif_transpose(img))
    return to_unit_range(np.asarray(resize_center_crop(img, size)))


@dataclass
class ScanReport:
    found: int
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def usable(self) -> int:
        return self.found - len(self.skipped)


class _SkipsBrokenImages(torch.utils.data.Dataset):
    """Images decoded on demand, where one that fails to decode (``load_failures``) is skipped from
    then on and the next readable one served instead: one bad file never stops a long run.

    Subclasses give ``__len__``, ``load(index)``, ``name_of(index)`` and ``description``.
    """

    channels = 3

    def __init__(self, image_size: int):
        self.image_size = int(image_size)
        self.load_failures: dict[int, str] = {}  # index -> reason, in this process

    def __getitem__(self, index: int) -> torch.Tensor:
        for offset in range(len(self)):
            i = (index + offset) % len(self)
            if i in self.load_failures:
                continue
            try:
                return self.load(i)
            except _BROKEN_IMAGE_ERRORS as exc:
                self.load_failures[i] = str(exc)
                warnings.warn(f"skipping unreadable image {self.name_of(i)}: {exc}", RuntimeWarning, stacklevel=2)
        raise ValueError(f"--data: no image in {self.description} could be decoded")


class ImageFolder(_SkipsBrokenImages):
    """Every png/jpg/webp under a folder, resized and centre-cropped to ``image_size``, as RGB.

    Files PIL cannot read are skipped and counted (``report``) by a scan that decodes every
    file once; one that breaks after the scan is skipped when it is loaded.
    """

    def __init__(self, root: str | Path, image_size: int, progress: bool = False):
        from tqdm import tqdm

        super().__init__(image_size)
        self.root = Path(root)
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

    @property
    def description(self) -> str:
        return str(self.root)

    def __len__(self) -> int:
        return len(self.files)

    def name_of(self, index: int) -> str:
        return str(self.files[index])

    def load(self, index: int) -> torch.Tensor:
        return load_image(self.files[index], self.image_size)


# -- Hugging Face datasets (the seed's recommended ones: huggan/CelebA-HQ, huggan/flowers-102-categories)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(data: str) -> bool:
    """True for ``owner/name`` that is no path here, nor inside a folder here named ``owner``
    (``photos/cats`` mistyped): a dataset on the Hugging Face Hub."""
    return _HUB_ID.fullmatch(data) is not None and not Path(data).exists() and not Path(data).parent.is_dir()


def is_saved_dataset(folder: Path) -> bool:
    """True for a folder that ``datasets``' ``save_to_disk`` wrote (a Dataset or a DatasetDict)."""
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def _datasets_module(data: str):
    try:
        import datasets
    except ImportError as exc:
        raise ValueError(
            f"--data {data}: {'no such folder here; as a Hub id, it' if is_hub_id(data) else 'a Hugging Face dataset'} "
            f"needs the datasets package (pip install 'liquiddiff[hf]'): {exc}"
        ) from exc
    return datasets


def image_column(dataset, column: str | None = None) -> str:
    """The column of ``dataset`` that holds its images: ``column``, checked, or the only one whose
    feature is ``datasets.Image``."""
    from datasets import Image as ImageFeature

    images = [name for name, feature in dataset.features.items() if isinstance(feature, ImageFeature)]
    if column is not None:
        if column not in dataset.features:
            raise ValueError(f"--data-column: no column {column!r} (columns: {', '.join(dataset.features)})")
        if column not in images:
            raise ValueError(f"--data-column: column {column!r} holds {dataset.features[column]}, not images")
        return column
    if len(images) != 1:
        found = f"several image columns ({', '.join(images)})" if images else "no image column"
        raise ValueError(f"--data: the dataset has {found}; columns: {', '.join(dataset.features)}. "
                         "Name one with --data-column")
    return images[0]


class HuggingFaceImages(_SkipsBrokenImages):
    """The images of one column of a Hugging Face ``datasets.Dataset``, resized and centre-cropped
    to ``image_size``, as RGB; the other columns (labels, captions) are not read.

    Images are read as the stored file bytes and decoded here, as an image folder's are (JPEG at a
    reduced scale, EXIF orientation, 16-bit gray scaled); one that fails to decode is skipped.
    There is no scan before training: a Hub dataset can hold hundreds of thousands of images.
    """

    def __init__(self, dataset, image_size: int, column: str | None = None, name: str = "dataset"):
        from datasets import Image as ImageFeature

        super().__init__(image_size)
        self.column = image_column(dataset, column)
        if len(dataset) == 0:
            raise ValueError(f"--data: {name} has no rows")
        # decode=False: the stored bytes, which load_image decodes with a JPEG draft, not full size.
        self.dataset = dataset.select_columns([self.column]).cast_column(self.column, ImageFeature(decode=False))
        self.name = name
        self.report = ScanReport(found=len(dataset))

    @property
    def description(self) -> str:
        return f"{self.name} (Hugging Face dataset, column '{self.column}')"

    def __len__(self) -> int:
        return len(self.dataset)

    def name_of(self, index: int) -> str:
        return f"{self.name}[{index}]"

    def load(self, index: int) -> torch.Tensor:
        stored = self.dataset[index][self.column]
        if stored is None:
            raise ValueError("the row has no image")
        if stored.get("bytes") is not None:
            return load_image(io.BytesIO(stored["bytes"]), self.image_size)
        return load_image(stored["path"], self.image_size)


def open_hugging_face_dataset(data: str, image_size: int, split: str | None = None,
                              column: str | None = None) -> HuggingFaceImages:
    """A Hub dataset id (``owner/name``, downloaded to the Hugging Face cache) or a folder that
    ``save_to_disk`` wrote, as :class:`HuggingFaceImages` of its ``split`` (default ``train``; a
    folder of one dataset without splits takes no split, or the one it was saved from)."""
    datasets = _datasets_module(data)
    if is_hub_id(data):
        split = "train" if split is None else split
        try:
            loaded = datasets.load_dataset(data, split=split)
        except Exception as exc:  # no network, no such dataset or split, a gated one: one line for the user
            raise ValueError(
                f"--data {data}: no such folder here, and loading it from the Hugging Face Hub "
                f"(split {split!r}) failed: {type(exc).__name__}: {exc}"
            ) from exc
        return HuggingFaceImages(loaded, image_size, column=column, name=data)
    loaded = datasets.load_from_disk(data)
    if isinstance(loaded, datasets.DatasetDict):
        split = "train" if split is None else split
        if split not in loaded:
            raise ValueError(f"--data-split: {data} has no split {split!r} (it has: {', '.join(loaded)})")
        loaded = loaded[split]
    elif split is not None and split != str(loaded.split or ""):
        # One dataset: training on all of it while asked for a split would go unnoticed.
        saved = f"saved from split {str(loaded.split)!r}" if loaded.split else "one dataset without splits"
        raise ValueError(f"--data-split {split}: {data} is {saved}; leave --data-split out")
    return HuggingFaceImages(loaded, image_size, column=column, name=data)


def open_images(data: str, image_size: int, *, split: str | None = None, column: str | None = None,
                progress: bool = False) -> ImageFolder | HuggingFaceImages:
    """``--data``: a Hub dataset id or a ``save_to_disk`` folder as :class:`HuggingFaceImages` (split
    ``train`` unless named), any other folder as an :class:`ImageFolder`."""
    if is_hub_id(data) or is_saved_dataset(Path(data)):
        return open_hugging_face_dataset(data, image_size, split, column)
    for flag, value in (("--data-split", split), ("--data-column", column)):
        if value is not None:
            raise ValueError(f"{flag} is for a Hugging Face dataset; {data} is a folder of image files")
    return ImageFolder(data, image_size, progress=progress)


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
