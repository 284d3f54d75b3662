"""`--data` as a Hugging Face dataset: a Hub id or a folder `save_to_disk` wrote.

The Hub itself is out of reach here (no network in CI): `datasets.load_dataset` is replaced by a
stand-in that checks what it was asked for and returns an in-memory dataset.
"""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from liquiddiff import cli
from liquiddiff.data import HuggingFaceImages, ImageFolder, is_hub_id, open_images

datasets = pytest.importorskip("datasets")  # in the test extras; missing only where they were not installed


def _image_files(folder, n=6):
    """Assorted formats and modes: RGB and RGBA PNG, JPEG, gray, 16-bit gray, an EXIF-rotated JPEG."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8))
        path = folder / f"img{i}.{'jpg' if i in (1, 5) else 'png'}"
        if i == 2:
            img = img.convert("RGBA")
        elif i == 3:
            img = img.convert("L")
        elif i == 4:
            img = Image.fromarray(rng.integers(0, 65536, (12, 20), dtype=np.uint16))
        extra = {}
        if i == 5:
            exif = Image.Exif()
            exif[0x0112] = 6
            extra["exif"] = exif
        img.save(path, **extra)
        paths.append(path)
    return paths


def _dataset(cells, **columns):
    """A dataset whose "image" column holds ``cells`` ({"bytes", "path"}), with int columns besides."""
    features = {"image": datasets.Image(), **{name: datasets.Value("int64") for name in columns}}
    return datasets.Dataset.from_dict({"image": cells, **columns}, features=datasets.Features(features))


def _rows(paths, stored_as="bytes", **columns):
    """A dataset whose image column holds ``paths`` as file bytes or as file paths."""
    cells = [{"bytes": p.read_bytes(), "path": None} if stored_as == "bytes" else {"bytes": None, "path": str(p)}
             for p in paths]
    return _dataset(cells, **columns)


@pytest.mark.parametrize("stored_as", ["bytes", "path"])
def test_rows_decode_exactly_as_the_same_files_in_a_folder(tmp_path, stored_as):
    paths = _image_files(tmp_path / "files")
    ours = HuggingFaceImages(_rows(paths, stored_as, label=list(range(len(paths)))), 8)
    folder = ImageFolder(tmp_path / "files", 8)
    assert len(ours) == len(folder) == len(paths) and ours.column == "image" and ours.channels == 3
    for i in range(len(paths)):
        x = ours[i]
        assert x.shape == (3, 8, 8) and x.dtype == torch.float32
        assert torch.equal(x, folder.load(folder.files.index(paths[i]))), paths[i].name


def test_the_image_column_is_found_or_must_be_named(tmp_path):
    paths = _image_files(tmp_path, 2)
    assert HuggingFaceImages(_rows(paths, label=[0, 1]), 8).column == "image"
    two = _rows(paths).add_column("mask", [{"bytes": p.read_bytes(), "path": None} for p in paths],
                                 feature=datasets.Image())
    with pytest.raises(ValueError, match=r"several image columns \(image, mask\).*--data-column"):
        HuggingFaceImages(two, 8)
    assert HuggingFaceImages(two, 8, column="mask").column == "mask"
    with pytest.raises(ValueError, match="--data-column: no column 'photo'"):
        HuggingFaceImages(two, 8, column="photo")
    labels_only = datasets.Dataset.from_dict({"label": [0, 1]})
    with pytest.raises(ValueError, match="no image column; columns: label"):
        HuggingFaceImages(labels_only, 8)
    with pytest.raises(ValueError, match="column 'label' holds .*not images"):
        HuggingFaceImages(_rows(paths, label=[0, 1]), 8, column="label")


def test_a_row_that_fails_to_decode_is_skipped_for_the_next(tmp_path):
    paths = _image_files(tmp_path, 3)
    cells = [{"bytes": b"not an image", "path": None}] + [{"bytes": p.read_bytes(), "path": None} for p in paths[1:]]
    broken = HuggingFaceImages(_dataset(cells), 8)
    with pytest.warns(RuntimeWarning, match=r"skipping unreadable image dataset\[0\]"):
        x = broken[0]
    assert torch.equal(x, HuggingFaceImages(_rows(paths), 8)[1]) and list(broken.load_failures) == [0]


def test_a_saved_dataset_folder_opens_with_its_split(tmp_path):
    rows = _rows(_image_files(tmp_path / "files", 3))
    rows.save_to_disk(tmp_path / "one")
    datasets.DatasetDict({"train": rows, "test": rows.select([2])}).save_to_disk(tmp_path / "dict")
    one = open_images(str(tmp_path / "one"), 8)
    assert isinstance(one, HuggingFaceImages) and len(one) == 3
    test = open_images(str(tmp_path / "dict"), 8, split="test")
    assert len(test) == 1 and torch.equal(test[0], one[2])
    with pytest.raises(ValueError, match=r"--data-split: .* has no split 'val' \(it has: train, test\)"):
        open_images(str(tmp_path / "dict"), 8, split="val")
    with pytest.raises(ValueError, match="--data-column is for a Hugging Face dataset"):
        open_images(str(tmp_path / "files"), 8, column="image")
    # One dataset without splits: a split asked for is refused, not ignored
    with pytest.raises(ValueError, match=r"--data-split test: .* is one dataset without splits; leave --data-split out"):
        open_images(str(tmp_path / "one"), 8, split="test")
    # One dataset saved from a split (a load_dataset(..., split=) result): that split only
    paths = _image_files(tmp_path / "files", 3)
    cells = [{"bytes": p.read_bytes(), "path": None} for p in paths]
    datasets.Dataset.from_dict({"image": cells}, features=datasets.Features({"image": datasets.Image()}),
                               split="test").save_to_disk(tmp_path / "test_only")
    assert len(open_images(str(tmp_path / "test_only"), 8, split="test")) == 3
    with pytest.raises(ValueError, match=r"--data-split train: .* is saved from split 'test'"):
        open_images(str(tmp_path / "test_only"), 8, split="train")


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """``datasets.load_dataset`` answering for one id, recording what it was asked."""
    rows = _rows(_image_files(tmp_path / "hub_files", 6))
    asked = []

    def load_dataset(path, split=None, **kwargs):
        asked.append((path, split))
        if path != "someone/faces":
            raise FileNotFoundError(f"Dataset '{path}' doesn't exist on the Hub")
        return rows
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return asked


def test_a_hub_id_loads_its_split_and_a_failure_names_the_hub(fake_hub, tmp_path, monkeypatch):
    assert len(open_images("someone/faces", 8)) == 6 and fake_hub == [("someone/faces", "train")]
    with pytest.raises(ValueError, match=r"--data someone/else: no such folder here, and loading it from the "
                                         r"Hugging Face Hub \(split 'train'\) failed: FileNotFoundError"):
        open_images("someone/else", 8)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "someone" / "faces").mkdir(parents=True)
    assert not is_hub_id("someone/faces")  # a folder of that name here wins
    assert not is_hub_id("someone/else")  # ... and a mistyped one in a folder here is no Hub id
    with pytest.raises(FileNotFoundError, match="folder someone/else does not exist"):
        open_images("someone/else", 8)
    assert is_hub_id("other/name") and not is_hub_id("/abs/path") and not is_hub_id("plain")


def test_without_the_datasets_package_the_message_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)
    with pytest.raises(ValueError, match=r"--data someone/faces: no such folder here; as a Hub id, it needs the "
                                         r"datasets package .*liquiddiff\[hf\]"):
        open_images("someone/faces", 8)


def test_under_torchrun_the_main_process_downloads_first(fake_hub, monkeypatch):
    said = []
    monkeypatch.setattr(cli.distributed, "broadcast_object", lambda obj: said.append(len(fake_hub)) or obj)
    args = SimpleNamespace(data="someone/faces", image_size=8, data_split=None, data_column=None)
    assert len(cli._make_dataset(args, SimpleNamespace(enabled=True, is_main=True))) == 6
    assert said == [1]  # loaded, then told the others
    assert len(cli._make_dataset(args, SimpleNamespace(enabled=True, is_main=False))) == 6
    assert said == [1, 1] and len(fake_hub) == 2  # told, then loaded (from the cache)
    monkeypatch.setattr(cli.distributed, "broadcast_object", lambda obj: ValueError("the main process failed"))
    with pytest.raises(ValueError, match="the main process failed"):
        cli._make_dataset(args, SimpleNamespace(enabled=True, is_main=False))
    assert len(fake_hub) == 2  # a failure on the main process is raised without loading again


@pytest.mark.slow
def test_train_on_a_hub_dataset_and_resume_it_by_its_id(fake_hub, tmp_path, capsys):
    runs = tmp_path / "runs"
    tiny = ["--channels", "8,16", "--image-size", "8", "--batch-size", "2", "--sample-n", "2", "--sample-steps", "2",
            "--warmup-steps", "0", "--no-progress", "--runs-dir", str(runs)]
    assert cli.main(["train", "--data", "someone/faces", "--steps", "2", *tiny]) == 0
    out = capsys.readouterr().out
    assert "data: someone/faces (Hugging Face dataset, column 'image') (6 images, 8 px)" in out
    run = json.loads((runs / "faces" / "run.json").read_text())
    assert (run["data"], run["data_split"], run["data_column"]) == ("someone/faces", None, None)
    assert cli.main(["train", "--data", "someone/faces", "--resume", "--steps", "3", *tiny]) == 0
    assert "resuming from" in capsys.readouterr().out and fake_hub == [("someone/faces", "train")] * 2
