"""The `liquiddiff` command end to end, at a tiny size: train, resume, sample, bad input, torchrun.

In-process runs call cli.main(argv); the SIGKILL and torchrun tests need real processes.
"""
import json
import math
import re
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from liquiddiff import RectifiedFlowTrainer, build, checkpoint, cli, distributed
from liquiddiff.data import (DigitsDataset, ImageFolder, ResumableBatches, find_images, random_hflip,
                             resize_center_crop, to_rgb, to_unit_range)
from liquiddiff.images import make_grid, plot_loss, to_uint8

REPO = Path(__file__).resolve().parents[1]
# Two stages of 8 and 16 channels at 8 px: a few milliseconds a step.
TINY = ["--channels", "8,16", "--image-size", "8", "--batch-size", "4", "--sample-n", "4",
        "--sample-steps", "2", "--log-every", "1", "--warmup-steps", "0", "--no-progress"]


def _run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _subprocess_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"  # several processes on a 2-core runner: no oversubscription
    return env


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _write_images(folder: Path, n: int, size=(20, 12)) -> list[Path]:
    """n small random pictures in assorted formats and modes, some in a sub-folder."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        sub = folder / ("nested/deeper" if i % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        img = Image.fromarray(pixels)
        ext, img = [(".png", img), (".jpg", img), (".webp", img), (".PNG", img.convert("L")),
                    (".jpeg", img.convert("RGB")), (".png", img.convert("RGBA"))][i % 6]
        path = sub / f"img{i}{ext}"
        img.save(path, format={".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(ext, "PNG"))
        paths.append(path)
    return paths


# -- options, help, info -----------------------------------------------------------------------
@pytest.mark.parametrize("command", ["train", "sample", "info"])
def test_help_explains_every_option(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    sub = next(a for a in cli.build_parser()._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    for action in sub.choices[command]._actions:
        assert action.help, f"{command} {action.option_strings} has no help"
        assert action.option_strings[-1] in out


def test_info_names_device_versions_and_backends(capsys):
    code, out, _ = _run(["info"], capsys)
    assert code == 0
    assert torch.__version__ in out and "device" in out and "python" in out
    precision = next(line for line in out.splitlines() if line.startswith("precision"))
    assert precision.endswith("(--precision auto)") and ("fp32" in precision) == (not torch.cuda.is_available())
    lines = out.splitlines()
    for op in ("cfc_relax", "adaln_modulate"):
        line = next(line for line in lines if op in line)
        assert ("triton" in line or "torch" in line) and len(line.split()) > 3  # backend and a reason
    # Where the interpreter runs the kernels: the pointwise conv's forward kernel's choice (every
    # call's, and its variants') follows its line (runtime.FORWARD_ONLY).
    pointwise = next(i for i, line in enumerate(lines) if "pointwise_conv" in line)
    assert lines[pointwise].split()[1] == "torch" and lines[pointwise + 1].split()[:1] == ["triton"]
    assert "forward kernel and its variants" in lines[pointwise + 1]


@pytest.mark.parametrize("command, options, device, expected", [
    ("sample", {}, "cuda", True),
    ("sample", {}, "cpu", False),
    ("sample", {"compile": "default"}, "cuda", False),
    ("train", {"fused": True}, "cuda", True),
    ("train", {"fused": False}, "cuda", False),  # the reference's graphed step: not measured
    ("train", {"fused": True, "processes": 2}, "cuda", False),  # torchrun: graphs not run on GPUs yet
    ("train", {"fused": True, "gradient_checkpointing": True}, "cuda", False),
    ("train", {"fused": True, "compile": "reduce-overhead"}, "cuda", False),
    ("train", {"fused": True}, "cpu", False),
])
def test_cuda_graphs_by_default_where_they_run_and_help(command, options, device, expected):
    """--cuda-graph left out: on for sampling on a CUDA GPU, and for training the fused model on
    one; --cuda-graph / --no-cuda-graph override it."""
    args = cli.build_parser().parse_args([command])
    assert args.cuda_graph is None
    processes = options.pop("processes", 1)
    for key, value in options.items():
        setattr(args, key, value)
    assert cli._cuda_graph_by_default(args, torch.device(device), command == "train", processes) == expected
    assert cli.build_parser().parse_args([command, "--no-cuda-graph"]).cuda_graph is False
    assert cli.build_parser().parse_args([command, "--cuda-graph"]).cuda_graph is True


@pytest.mark.parametrize("argv, message", [
    (["train", "--steps", "0"], "positive integer"),
    (["train", "--lr", "-0.001"], "positive number"),
    (["train", "--lr=-1e-3"], "positive number"),
    (["train", "--ema-decay", "1.5"], r"\[0, 1\)"),
    (["train", "--batch-size", "many"], "positive integer"),
    (["train", "--channels", "8,x"], "comma-separated"),
    (["train", "--preset", "huge"], "invalid choice"),
    (["train", "--name", "../escape"], "letters, digits"),
    (["train", "--ema-decay", "1"], r"\[0, 1\)"),
    (["sample", "--n", "0"], "positive integer"),
    (["sample", "--sampler", "rk4"], "invalid choice"),
    (["sample", "--compile", "fast"], "--compile: invalid choice: 'fast'"),
    (["train", "--device", "foo"], "--device: expected auto, cpu, cuda or cuda:N, got 'foo'"),
    (["sample", "--device", "meta"], "--device: expected auto, cpu, cuda or cuda:N"),
    (["info", "--device", "gpu0"], "--device: expected auto"),
])
def test_out_of_range_options_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err
    assert re.search(message, err), err


@pytest.mark.parametrize("name", ["..", ".", ".hidden"])
def test_a_run_name_is_one_plain_folder_name(name, capsys):
    """--name .. or . would put a run's files into RUNS_DIR's parent or RUNS_DIR itself: refused."""
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["train", "--name", name])
    assert exc.value.code == 2 and "expected letters, digits" in capsys.readouterr().err


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("not an image")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"\x89PNG not really")
    (broken / "b.jpg").write_bytes(b"")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    runs = ["--runs-dir", tmp_path / "runs"]
    cases = [
        (["train", "--data", tmp_path / "missing", *runs], "does not exist"),
        (["train", "--data", empty, *runs], "no images in"),
        (["train", "--data", broken, *runs], "none of the 2 image files"),
        (["train", "--image-size", "15", *runs], "multiple of 2"),
        (["train", "--channels", "8,16,32", *runs], "must be non-empty and of equal length"),
        (["train", "--cuda-graph", "--device", "cpu", *TINY[:4], *runs], "--cuda-graph: needs a CUDA GPU (device: cpu)"),
        (["sample", "--cuda-graph", "--device", "cpu", *runs], "--cuda-graph: needs a CUDA GPU (device: cpu)"),
        (["train", "--compile", "--cuda-graph", *runs], "--cuda-graph: not with --compile"),
        (["sample", "--cuda-graph", "--compile", *runs], "--cuda-graph: not with --compile"),
        (["train", "--batch-size", "4", "--micro-batch-size", "8", *runs], "--micro-batch-size 8: more than the batch"),
        (["sample", "--out", tmp_path / "grid.jpg", *runs], "the grid is written as a PNG"),
        (["train", "--resume", *runs], "no run to continue"),
        (["train", "--batch-size", "5000", *TINY[:4], *runs], "larger than the 1797 images"),
        (["train", "--data-column", "image", *runs], "--data-split and --data-column choose from a Hugging Face"),
        (["sample", "--ckpt", junk], "not a readable safetensors file"),
        (["sample", "--ckpt", tmp_path / "nothing.safetensors"], "does not exist"),
        (["sample", *runs], "no checkpoint given"),
    ]
    for argv, message in cases:
        code, out, err = _run(argv, capsys)
        assert code == 2, (argv, out, err)
        assert err.startswith("liquiddiff: error: ") and message in err, (argv, err)
        assert "Traceback" not in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("*.safetensors"))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_precisions_train_on_the_cpu_as_in_the_api(tmp_path, capsys, precision):
    code, out, err = _run(["train", *TINY, "--steps", "2", "--precision", precision, "--device", "cpu",
                           "--runs-dir", tmp_path / "runs", "--name", "p"], capsys)
    assert code == 0, err
    assert f"{precision} autocast" in out
    losses = [m["loss"] for m in _metrics(tmp_path / "runs" / "p") if "loss" in m]
    assert len(losses) == 2 and all(map(math.isfinite, losses))


@pytest.mark.parametrize("setting, message", [
    ("triton", "LIQUIDDIFF_KERNELS=triton, but tensors are on the CPU and the Triton interpreter is off"),
    ("auto,adaln=torch", "no op 'adaln'; the ops are cfc_relax, adaln_modulate"),
])
def test_a_kernel_setting_that_cannot_run_is_refused_before_the_run_folder(tmp_path, capsys, monkeypatch, setting,
                                                                           message):
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", setting)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for argv in (["train", "--fused", "--device", "cpu", "--runs-dir", tmp_path / "runs"],
                 ["sample", "--fused", "--device", "cpu", "--runs-dir", tmp_path / "runs"]):
        code, out, err = _run(argv, capsys)
        assert code == 2 and err.startswith("liquiddiff: error: ") and message in err, err
        assert "Traceback" not in err and err.count("\n") == 1, err
    assert not (tmp_path / "runs").exists()


def test_the_model_line_says_when_fused_ops_fall_back_and_warnings_have_one_prefix(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert cli._ops_note(True, torch.device("cpu")) == (
        "fused model; 6 of its ops on the PyTorch reference here, see the warnings")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert cli._ops_note(True, torch.device("cpu")) == "fused kernels"  # the opt-in ones are chosen, not fallbacks
    assert cli._ops_note(False, torch.device("cpu")) == "PyTorch reference ops"
    line = cli._warning_line(RuntimeWarning("liquiddiff: cfc_relax runs the PyTorch reference"), RuntimeWarning, "f", 1)
    assert line == "liquiddiff: warning: cfc_relax runs the PyTorch reference\n"


# -- data ------------------------------------------------------------------------------------
def test_image_folder_searches_recursively_and_skips_broken_files(tmp_path):
    good = _write_images(tmp_path, 6)
    (tmp_path / "garbage.png").write_bytes(b"hello")
    jpg = good[1].read_bytes()
    (tmp_path / "nested" / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (tmp_path / "readme.txt").write_text("ignored: not an image extension")
    assert len(find_images(tmp_path)) == 8
    ds = ImageFolder(tmp_path, 8)
    assert len(ds) == 6 and ds.report.found == 8 and len(ds.report.skipped) == 2
    assert {p.name for p, _ in ds.report.skipped} == {"garbage.png", "truncated.jpg"}
    for i in range(len(ds)):
        x = ds[i]
        assert x.shape == (3, 8, 8) and x.min() >= -1 and x.max() <= 1


def test_image_folder_serves_the_next_image_when_a_file_breaks_later(tmp_path):
    paths = _write_images(tmp_path, 3)
    ds = ImageFolder(tmp_path, 8)
    broken = ds.files[0]
    broken.write_bytes(b"broken after the scan")
    with pytest.warns(RuntimeWarning, match="skipping unreadable image"):
        x = ds[0]
    torch.testing.assert_close(x, ds.load(1))
    assert list(ds.load_failures) == [0] and len(paths) == 3


def test_image_folder_scales_16_bit_gray_and_follows_exif_orientation(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (16, 1))  # black to white, left to right
    Image.fromarray(ramp).save(tmp_path / "a_gray16.png")  # PIL mode I;16
    Image.fromarray((ramp >> 8).astype(np.uint8)).save(tmp_path / "b_gray8.png")
    half = np.zeros((16, 32, 3), dtype=np.uint8)
    half[:, :16] = 255  # stored: white left half; EXIF orientation 6 shows it rotated to the top
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(half).save(tmp_path / "c_rotated.jpg", exif=exif, quality=95)
    ds = ImageFolder(tmp_path, 16)
    torch.testing.assert_close(ds.load(0), ds.load(1), atol=1 / 127.5, rtol=0)  # not clipped white
    shown = ds.load(2)[0]
    assert shown[:4].mean() > 0.9 and shown[-4:].mean() < -0.9


def test_resize_center_crop_keeps_the_middle():
    pixels = np.zeros((10, 30, 3), dtype=np.uint8)
    pixels[:, 10:20] = 255  # a white middle third
    out = np.asarray(resize_center_crop(Image.fromarray(pixels), 5))
    assert out.shape == (5, 5, 3) and out.min() > 200


def test_pixel_levels_map_to_minus_one_to_one_and_back_exactly():
    """Training data: 0 -> -1 and 255 -> 1. Pictures: [-1, 1] back to 0..255, rounded (0 -> 128, not
    127), values outside clamped (not wrapped around), and every level comes back as itself."""
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    x = to_unit_range(levels)
    assert x.shape == (1, 16, 16) and x.min() == -1 and x.max() == 1
    assert np.array_equal(to_uint8(x[None])[0, ..., 0], levels)
    out = to_uint8(torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0]).view(1, 1, 1, 6))
    assert out.ravel().tolist() == [0, 0, 128, 255, 255, 255]


def test_16_bit_gray_rounds_to_the_nearest_8_bit_level():
    """65535 -> 255 scaled and rounded: 129 is level 1 (0.502), 65279 level 254 (253.99), not
    the level below, which truncation gives."""
    values = np.array([[0, 128, 129, 32767, 32896, 65279, 65407, 65535]], dtype=np.uint16)
    img = Image.fromarray(values)
    assert img.mode in ("I;16", "I")
    rgb = np.asarray(to_rgb(img))
    assert rgb.shape == (1, 8, 3)
    assert rgb[..., 0].tolist() == [[0, 0, 1, 127, 128, 254, 255, 255]]


def test_downscaling_is_antialiased():
    """Resizing averages the pixels it merges (bicubic, antialiased): one-pixel stripes at 32 px
    become gray at 8 px, not a pick of black and white columns (nearest neighbour)."""
    stripes = np.zeros((32, 32, 3), dtype=np.uint8)
    stripes[:, ::2] = 255
    out = np.asarray(resize_center_crop(Image.fromarray(stripes), 8)).astype(float)
    assert out.shape == (8, 8, 3) and np.abs(out - 127.5).max() < 40


def test_a_truncated_jpeg_that_passes_verify_is_skipped_by_the_scan(tmp_path):
    """verify() accepts a JPEG cut in its scan data (the headers are whole); decoding it in the scan
    finds it, so it is counted as skipped before training, not trained on or found mid-run."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(tmp_path / "whole.jpg")
    data = (tmp_path / "whole.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with Image.open(tmp_path / "cut.jpg") as img:
        img.verify()  # no error: the structure looks whole
    ds = ImageFolder(tmp_path, 8)
    assert [p.name for p in ds.files] == ["whole.jpg"]
    assert ds.report.found == 2 and [p.name for p, _ in ds.report.skipped] == ["cut.jpg"]


def test_hidden_files_are_not_searched(tmp_path):
    """Dot files (a readable hidden picture, macOS's ._name AppleDouble files) are neither trained
    on nor counted as skipped."""
    _write_images(tmp_path, 2)
    Image.new("RGB", (8, 8)).save(tmp_path / ".thumbnail.png")
    (tmp_path / "._img0.png").write_bytes(b"\0\5\26\7 AppleDouble")
    assert [p.name for p in find_images(tmp_path)] == ["img0.png", "img1.jpg"]
    ds = ImageFolder(tmp_path, 8)
    assert len(ds) == 2 and ds.report.found == 2 and not ds.report.skipped


def test_a_file_that_broke_is_skipped_from_then_on_with_one_warning(tmp_path):
    """An image that fails to decode mid-run is not tried (and warned about) again at every epoch."""
    _write_images(tmp_path, 3)
    ds = ImageFolder(tmp_path, 8)
    ds.files[0].write_bytes(b"broken after the scan")
    with pytest.warns(RuntimeWarning, match="skipping unreadable image"):
        ds[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second warning fails the test
        for _ in range(3):
            torch.testing.assert_close(ds[0], ds.load(1))


def test_random_hflip_mirrors_about_half_the_images_left_to_right():
    """Each image comes back as itself or mirrored left-right (not upside down), about half of them
    mirrored."""
    images = torch.arange(64 * 3 * 4 * 5, dtype=torch.float32).view(64, 3, 4, 5)
    out = random_hflip(images)
    mirrored = [torch.equal(o, i.flip(-1)) for o, i in zip(out, images)]
    kept = [torch.equal(o, i) for o, i in zip(out, images)]
    assert all(m != k for m, k in zip(mirrored, kept))
    assert 16 <= sum(mirrored) <= 48


def test_batches_follow_the_seed_and_ranks_never_share_an_image():
    """--seed sets the data order; under torchrun an epoch serves no image twice, on one rank or across
    ranks: 51 images over 2 ranks are 25 each, the odd one left out (not padded with a repeat)."""
    data = list(range(51))

    def epoch(seed, rank=0, world_size=1, batch=13):
        batches = ResumableBatches(data, batch, rank=rank, world_size=world_size, seed=seed)
        served = iter(batches)
        return [i for _ in range(batches.images_per_epoch // batch) for i in next(served)]

    assert epoch(3) == epoch(3) and epoch(3) != epoch(4)
    both = epoch(3, 0, 2) + epoch(3, 1, 2)
    assert len(both) == len(set(both)) and set(both) <= set(data)
    assert ResumableBatches(data, 5, rank=1, world_size=2).images_per_epoch == 25


def test_digits_are_single_channel_in_range():
    ds = DigitsDataset(16)
    assert len(ds) == 1797 and ds.channels == 1
    batch = ds.__getitems__([0, 5, 7])
    assert batch.shape == (3, 1, 16, 16) and batch.min() >= -1 and batch.max() <= 1 and batch.std() > 0.3


def test_batches_resume_mid_epoch_and_shard_across_ranks():
    data = list(range(50))
    fresh = iter(ResumableBatches(data, 8, seed=3))
    first = [next(fresh) for _ in range(14)]  # 6 batches an epoch: crosses two epochs
    at_nine = ResumableBatches(data, 8, seed=3).position_after(9)
    assert at_nine == (1, 24)
    resumed = iter(ResumableBatches(data, 8, seed=3, start=at_nine))
    assert [next(resumed) for _ in range(5)] == first[9:]
    # Resumed with a batch of 5 at that point: the rest of epoch 1 (its last image fills no batch),
    # no image twice, then epoch 2.
    smaller = ResumableBatches(data, 5, seed=3, start=at_nine)
    served = iter(smaller)
    rest_of_epoch = [i for _ in range(5) for i in next(served)]
    assert rest_of_epoch[:24] == [i for batch in first[9:12] for i in batch]
    assert len(set([i for batch in first[6:9] for i in batch] + rest_of_epoch)) == 49
    assert smaller.position_after(5) == (2, 0) and smaller.position_after(6) == (2, 5)
    # Resuming from position_after(n) serves what the n+1-th batch on would have been, from any
    # start: one that leaves no batch in its epoch (a resume with more processes) included.
    for start in [(0, 0), (0, 45), (0, 48), (2, 17), (1, 60)]:
        for size in (5, 8, 50):
            going = iter(ResumableBatches(data, size, seed=3, start=start))
            for n in range(8):
                resumed = ResumableBatches(data, size, seed=3, start=ResumableBatches(data, size, seed=3, start=start)
                                           .position_after(n))
                assert next(iter(resumed)) == next(going), (start, size, n)
    # A checkpoint from before positions were kept: step 9 of its own batch size (8), whatever the new one.
    args, one_process = SimpleNamespace(seed=3, batch_size=5), SimpleNamespace(rank=0, world_size=1)
    assert cli._data_start(data, args, one_process, {"run": {"batch_size": 8}}, 9) == at_nine
    assert cli._data_start(data, args, one_process, {"data_position": [4, 10]}, 9) == (4, 10)
    assert first[0] != first[6]  # a new order each epoch
    ranks = [next(iter(ResumableBatches(data, 5, rank=r, world_size=2, seed=3))) for r in (0, 1)]
    assert not set(ranks[0]) & set(ranks[1])


def test_grid_is_as_square_as_possible_and_fills_row_by_row():
    """5 images: 3 a row in 2 rows, image i at row i // 3 and column i % 3, on white padding."""
    images = torch.linspace(-1, 0.6, 5).view(5, 1, 1, 1).expand(5, 1, 4, 4)  # one gray level each
    grid = np.asarray(make_grid(images, pad=1))
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1)
    levels = to_uint8(images)[:, 0, 0, 0]
    for i in range(5):
        r, c = divmod(i, 3)
        assert (grid[1 + 5 * r:5 + 5 * r, 1 + 5 * c:5 + 5 * c] == levels[i]).all(), i
    assert (grid[0] == 255).all() and (grid[:, 0] == 255).all()


def test_grid_layout():
    grid = make_grid(torch.zeros(5, 1, 4, 4), nrow=3, pad=1, scale=2)
    assert grid.size == (2 * (3 * 5 + 1), 2 * (2 * 5 + 1)) and grid.mode == "L"
    assert make_grid(torch.zeros(4, 3, 4, 4)).mode == "RGB"


@pytest.mark.parametrize("losses,labels", [([0.6, 0.35, 0.22], {"0.3", "0.4", "0.6"}), ([3.0, 0.02], {"1", "0.1"})])
def test_loss_curve_labels_its_log_axis_with_plain_numbers(tmp_path, monkeypatch, losses, labels):
    """Within a decade a log axis has no major tick: its minor ones are labelled, as 0.3, not 3e-01."""
    import matplotlib.pyplot as plt

    shown = []
    monkeypatch.setattr(plt, "close", lambda fig: shown.extend(t.get_text() for t in fig.axes[0].get_yticklabels(which="both")))
    assert plot_loss(list(range(len(losses))), losses, tmp_path / "loss.png").is_file()
    assert labels <= set(shown) and not any("e" in text or "times" in text for text in shown)


# -- end to end ------------------------------------------------------------------------------
def test_compile_flag_compiles_the_trained_model_and_its_ema_copy(tmp_path, capsys, monkeypatch):
    """--compile reaches the trainer, which compiles the model train steps call and the EMA copy
    samples come from (recorded here; compiling for real takes minutes on a CPU)."""
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append((type(self).__name__, kw)))
    runs = tmp_path / "runs"
    code, _, err = _run(["train", "--runs-dir", runs, *TINY, "--steps", "1", "--compile"], capsys)
    assert code == 0, err
    assert compiled == [("LiquidDiffusion", {}), ("LiquidDiffusion", {})]  # bare: torch.compile's defaults
    code, _, err = _run(["sample", "--ckpt", runs / "digits", "--n", "2", "--steps", "1", "--compile",
                         "reduce-overhead", "--out", tmp_path / "grid.png", "--no-progress"], capsys)
    assert code == 0, err
    assert compiled[2:] == [("LiquidDiffusion", {"mode": "reduce-overhead"})] * 2


def test_sample_takes_the_runs_layout_unless_told(tmp_path, capsys, monkeypatch):
    """sample runs channels_last when the checkpoint's run trained so (the layout the GPU report
    measures fastest), NCHW otherwise; --channels-last / --no-channels-last say otherwise."""
    made = []
    init = RectifiedFlowTrainer.__init__

    def record(self, model, **kw):
        made.append(kw.get("channels_last", False))
        init(self, model, **kw)

    runs = tmp_path / "runs"
    assert _run(["train", "--runs-dir", runs, *TINY, "--steps", "1", "--channels-last"], capsys)[0] == 0
    monkeypatch.setattr(RectifiedFlowTrainer, "__init__", record)
    for flags in ([], ["--no-channels-last"]):
        code, _, err = _run(["sample", "--ckpt", runs / "digits", "--n", "2", "--steps", "1", *flags,
                             "--out", tmp_path / "grid.png", "--no-progress"], capsys)
        assert code == 0, err
    assert made == [True, False]


@pytest.mark.slow
def test_train_then_sample(tmp_path, capsys):
    runs = tmp_path / "runs"
    code, out, err = _run(["train", "--runs-dir", runs, *TINY, "--steps", "6", "--sample-every", "3",
                           "--ckpt-every", "4"], capsys)
    assert code == 0, err
    run = runs / "digits"
    assert f"sample grid: {run / 'samples.png'}" in out
    assert [m["step"] for m in _metrics(run)] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(m["loss"]) and m["images_per_s"] > 0 for m in _metrics(run))
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step_0000003.png", "step_0000006.png"]
    assert Image.open(run / "loss.png").size[0] > 300
    grid = Image.open(run / "samples.png")
    assert grid.mode == "L" and grid.size == (8 * (2 * 10 + 2),) * 2  # 2x2 tiles of 8 px + padding, x8
    state = checkpoint.load(run / "last.safetensors")
    assert state["step"] == 6 and state["config"]["in_channels"] == 1 and state["run"]["image_size"] == 8
    assert json.loads((run / "run.json").read_text())["steps"] == 6

    # A second run without --name does not overwrite the first.
    code, out, _ = _run(["train", "--runs-dir", runs, *TINY, "--steps", "1"], capsys)
    assert code == 0 and (runs / "digits-2" / "last.safetensors").is_file()
    # An explicit --name that holds a checkpoint needs --resume.
    code, _, err = _run(["train", "--runs-dir", runs, "--name", "digits", *TINY], capsys)
    assert code == 2 and "add --resume" in err
    # ... and a checkpoint of another model size is refused, with the difference.
    code, _, err = _run(["train", "--runs-dir", runs, "--name", "digits", "--resume", "--channels", "16,32"], capsys)
    assert code == 2 and "checkpoint holds another model than this one: channels: checkpoint" in err, err
    assert "(both from preset 'micro')" in err

    out_png = tmp_path / "gen" / "grid.png"
    code, out, err = _run(["sample", "--ckpt", run / "last.safetensors", "--n", "5", "--steps", "3",
                           "--sampler", "heun", "--seed", "1", "--out", out_png, "--separate", "--batch-size", "2",
                           "--no-progress"], capsys)
    assert code == 0, err
    assert f"wrote {out_png}" in out
    singles = sorted((tmp_path / "gen" / "grid").iterdir())
    assert [p.name for p in singles] == [f"{i:04d}.png" for i in range(5)]
    assert Image.open(singles[0]).size == (8, 8)
    first = np.asarray(Image.open(out_png))
    out_png.unlink()
    code, _, err = _run(["sample", "--ckpt", run, "--n", "5", "--steps", "3", "--sampler", "heun", "--seed", "1",
                         "--out", out_png.with_suffix(""), "--separate", "--batch-size", "3", "--no-progress"], capsys)
    assert code == 0, err  # --out without a suffix: grid.png beside the grid/ folder
    assert np.array_equal(first, np.asarray(Image.open(out_png)))  # the seed fixes the images, however batched
    grids = []
    for batch in ("3", "1"):  # 10 x 10 gray: 100 numbers an image, which no 16-number block of the stream divides
        code, _, err = _run(["sample", "--ckpt", run, "--n", "3", "--steps", "2", "--image-size", "10",
                             "--batch-size", batch, "--out", tmp_path / f"ten_{batch}.png", "--no-progress"], capsys)
        assert code == 0, err
        grids.append(np.asarray(Image.open(tmp_path / f"ten_{batch}.png")))
    assert np.array_equal(*grids)
    code, _, err = _run(["sample", "--ckpt", run, "--image-size", "7"], capsys)
    assert code == 2 and "multiple of 2" in err


@pytest.fixture
def terminal_ctrl_c():
    """Python's own Ctrl-C handler, as a job in a terminal's foreground has it: one started in the
    background (``make test &``) inherits SIGINT ignored, and the CLI then rightly leaves Ctrl-C
    alone, which the tests below would take for a failure."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _ctrl_c_during_the_third_step(monkeypatch, presses: int):
    """The user's Ctrl-C (SIGINT, pressed ``presses`` times) arriving during step 3, after its
    optimizer update and before the step is counted: where a checkpoint would be torn."""
    from liquiddiff.training import EMA

    update, calls = EMA.update, []

    def interrupted_update(self, model):
        calls.append(1)
        if len(calls) == 3:
            for _ in range(presses):
                signal.raise_signal(signal.SIGINT)
        return update(self, model)

    monkeypatch.setattr(EMA, "update", interrupted_update)


@pytest.mark.slow
def test_ctrl_c_stops_after_the_step_and_resume_continues_exactly(tmp_path, capsys, monkeypatch, terminal_ctrl_c):
    """A run stopped by Ctrl-C during step 3, then resumed to 6, logs the same losses as 6 steps in
    one go; the resumed half runs with --gradient-checkpointing, which changes no value."""
    runs = ["--runs-dir", tmp_path]
    assert _run(["train", *runs, "--name", "whole", *TINY, "--steps", "6", "--ckpt-every", "3"], capsys)[0] == 0
    _ctrl_c_during_the_third_step(monkeypatch, presses=1)
    code, out, err = _run(["train", *runs, "--name", "split", *TINY, "--steps", "6"], capsys)
    monkeypatch.undo()
    assert code == 130 and "stopped after step 3" in out and "interrupted" not in err, out + err
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    code, out, err = _run(["train", *runs, "--name", "split", "--resume", "--steps", "6", "--gradient-checkpointing"],
                          capsys)
    assert code == 0, err
    assert "at step 3" in out
    whole, split = _metrics(tmp_path / "whole"), _metrics(tmp_path / "split")
    assert [m["step"] for m in split] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in split] == [m["loss"] for m in whole]
    a = checkpoint.load(tmp_path / "whole" / "last.safetensors")
    b = checkpoint.load(tmp_path / "split" / "last.safetensors")
    for key in a["ema"]:
        assert torch.equal(a["ema"][key], b["ema"][key]), key


def test_ctrl_c_in_the_last_step_lets_the_run_finish(tmp_path, capsys, monkeypatch, terminal_ctrl_c):
    _ctrl_c_during_the_third_step(monkeypatch, presses=1)
    code, out, err = _run(["train", "--runs-dir", tmp_path, "--name", "r", *TINY, "--steps", "3"], capsys)
    assert code == 0 and "done: steps 0 -> 3" in out, out + err
    assert (tmp_path / "r" / "samples.png").is_file() and (tmp_path / "r" / "loss.png").is_file()


def test_a_second_ctrl_c_stops_at_once_without_saving_a_torn_step(tmp_path, capsys, monkeypatch, terminal_ctrl_c):
    _ctrl_c_during_the_third_step(monkeypatch, presses=2)
    code, out, err = _run(["train", "--runs-dir", tmp_path, "--name", "r", *TINY, "--steps", "5",
                           "--ckpt-every", "2"], capsys)
    assert code == 130 and "interrupted during step 3: not saved" in out and "holds step 2" in out, out + err
    assert checkpoint.load(tmp_path / "r" / "last.safetensors")["step"] == 2


def test_resume_can_turn_flags_off_and_never_overwrites_another_run(tmp_path, capsys):
    runs = ["--runs-dir", tmp_path]
    assert _run(["train", *runs, "--name", "a", *TINY, "--steps", "1", "--channels-last"], capsys)[0] == 0
    assert _run(["train", *runs, "--name", "b", *TINY, "--steps", "1"], capsys)[0] == 0
    code, _, err = _run(["train", *runs, "--resume", tmp_path / "a", "--name", "b", "--steps", "2"], capsys)
    assert code == 2 and "holds a checkpoint of its own" in err, err
    assert checkpoint.load(tmp_path / "b" / "last.safetensors")["step"] == 1
    code, _, err = _run(["train", *runs, "--name", "a", "--resume", "--steps", "2", "--no-channels-last"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "a" / "run.json").read_text())["channels_last"] is False


def test_micro_batches_train_the_same_steps_and_resume_with_them(tmp_path, capsys):
    runs = ["--runs-dir", tmp_path]
    assert _run(["train", *runs, "--name", "whole", *TINY, "--steps", "2"], capsys)[0] == 0
    code, out, err = _run(["train", *runs, "--name", "micro", *TINY, "--steps", "2", "--micro-batch-size", "3"],
                          capsys)
    assert code == 0, err
    assert "batch 4 (micro-batches of 3, the last of 1)" in out
    whole, micro = _metrics(tmp_path / "whole"), _metrics(tmp_path / "micro")
    assert [m["loss"] for m in micro] == pytest.approx([m["loss"] for m in whole], rel=1e-5)
    assert _run(["train", *runs, "--name", "micro", "--resume", "--steps", "3"], capsys)[0] == 0
    assert json.loads((tmp_path / "micro" / "run.json").read_text())["micro_batch_size"] == 3


def test_run_folders_are_never_reused_and_resume_and_sample_take_the_newest_run(tmp_path, capsys):
    """A folder that exists without a checkpoint (a run that has not saved yet) is taken: the next
    run goes to -2, then -3. --resume without --name continues the newest matching run, and sample
    without --ckpt reads the newest checkpoint, whatever the folders' names."""
    runs = tmp_path / "runs"
    (runs / "digits").mkdir(parents=True)
    (runs / "digits" / "metrics.jsonl").write_text("not ours\n")
    for _ in range(2):
        assert _run(["train", "--runs-dir", runs, *TINY, "--steps", "1"], capsys)[0] == 0
    assert (runs / "digits" / "metrics.jsonl").read_text() == "not ours\n"
    assert sorted(p.name for p in runs.iterdir()) == ["digits", "digits-2", "digits-3"]
    os.utime(runs / "digits-2" / "last.safetensors", (time.time() - 100, time.time() - 100))
    code, out, err = _run(["train", "--runs-dir", runs, "--resume", "--steps", "2"], capsys)
    assert code == 0, err
    assert f"resuming from {runs / 'digits-3' / 'last.safetensors'} at step 1" in out
    assert checkpoint.load(runs / "digits-2" / "last.safetensors")["step"] == 1
    code, out, err = _run(["sample", "--runs-dir", runs, "--n", "1", "--steps", "1", "--no-progress"], capsys)
    assert code == 0, err
    assert f"from {runs / 'digits-3' / 'last.safetensors'} (step 2," in out
    assert (runs / "digits-3" / "generated.png").is_file() and not (runs / "digits-2" / "generated.png").exists()


def test_resume_takes_every_option_from_the_checkpoint_and_continues_the_data(tmp_path, capsys):
    """Options not typed again (lr, seed, EMA decay, time sampling, sample and log intervals) come
    from the checkpoint; one typed as --opt=value counts as typed. The data position saved after a
    resumed run counts only the batches served since the resume, each of the batch size then."""
    runs = ["--runs-dir", tmp_path, "--name", "r"]
    chosen = ["--lr", "0.01", "--seed", "5", "--ema-decay", "0.5", "--time-sampling", "uniform",
              "--sample-every", "7", "--ckpt-every", "9", "--log-every", "3"]
    assert _run(["train", *runs, *TINY, "--steps", "1", *chosen], capsys)[0] == 0
    code, _, err = _run(["train", *runs, "--resume", "--steps=2", "--batch-size=3"], capsys)
    assert code == 0, err
    saved = json.loads((tmp_path / "r" / "run.json").read_text())
    assert {k: saved[k] for k in ("lr", "seed", "ema_decay", "time_sampling", "sample_every", "ckpt_every",
                                   "log_every", "steps", "batch_size", "image_size", "warmup_steps")} == {
        "lr": 0.01, "seed": 5, "ema_decay": 0.5, "time_sampling": "uniform", "sample_every": 7, "ckpt_every": 9,
        "log_every": 3, "steps": 2, "batch_size": 3, "image_size": 8, "warmup_steps": 0}
    state = checkpoint.load(tmp_path / "r" / "last.safetensors")
    assert state["step"] == 2 and all(state["run"][k] == saved[k] for k in cli.RUN_KEYS)
    # One batch of 4 (seed 5's epoch 0 from its start), then one of 3.
    assert state["data_position"] == [0, 4 + 3]


def test_logging_intervals_average_the_loss_and_the_last_step_is_logged_and_drawn(tmp_path, capsys, monkeypatch):
    """--log-every 2: each metrics line holds the mean loss of the steps since the last line, and the
    run's last step is logged and drawn even when it is off the intervals. The steps run without
    waiting for the GPU (sync=False: their losses are device tensors, read at log steps)."""
    step, calls = RectifiedFlowTrainer.train_step, []

    def train_step(self, images, **kw):
        calls.append(kw)
        return {**step(self, images, **kw), "loss": torch.tensor(float(self.step))}

    monkeypatch.setattr(RectifiedFlowTrainer, "train_step", train_step)
    code, _, err = _run(["train", "--runs-dir", tmp_path, "--name", "r", *TINY, "--steps", "5", "--log-every", "2",
                         "--sample-every", "3"], capsys)
    assert code == 0, err
    assert calls == [{"sync": False}] * 5
    assert [(m["step"], m["loss"]) for m in _metrics(tmp_path / "r")] == [(2, 1.5), (4, 3.5), (5, 5.0)]
    assert sorted(p.name for p in (tmp_path / "r" / "samples").iterdir()) == ["step_0000003.png", "step_0000005.png"]


def test_digits_train_at_16_px_without_flips_unless_asked(tmp_path, capsys, monkeypatch):
    """Digits: 16 px by default, and no flips (a mirrored digit is no digit) unless --flip says so."""
    from liquiddiff import data

    flipped = []
    flip = data.random_hflip
    monkeypatch.setattr(data, "random_hflip", lambda images: flipped.append(len(images)) or flip(images))
    tiny = [a for a in TINY if a not in ("--image-size", "8")]
    assert _run(["train", "--runs-dir", tmp_path, "--name", "plain", *tiny, "--steps", "1"], capsys)[0] == 0
    saved = json.loads((tmp_path / "plain" / "run.json").read_text())
    assert (saved["image_size"], saved["flip"], flipped) == (16, False, [])
    assert _run(["train", "--runs-dir", tmp_path, "--name", "flip", *TINY, "--steps", "1", "--flip"], capsys)[0] == 0
    assert flipped == [4]


def test_sample_follows_its_seed_and_no_ema_reads_the_raw_weights(tmp_path, capsys):
    """sample --seed changes the noise, so the images; --no-ema samples the raw weights, which after a
    few steps differ from the EMA ones."""
    assert _run(["train", "--runs-dir", tmp_path, "--name", "r", *TINY, "--steps", "3", "--lr", "0.05"], capsys)[0] == 0
    grids = {}
    for name, extra in (("a", []), ("again", []), ("seed", ["--seed", "1"]), ("raw", ["--no-ema"])):
        code, _, err = _run(["sample", "--ckpt", tmp_path / "r", "--n", "2", "--steps", "2", "--no-progress",
                             "--out", tmp_path / f"{name}.png", *extra], capsys)
        assert code == 0, err
        grids[name] = np.asarray(Image.open(tmp_path / f"{name}.png"))
    assert np.array_equal(grids["a"], grids["again"])
    assert not np.array_equal(grids["a"], grids["seed"]) and not np.array_equal(grids["a"], grids["raw"])


def test_resume_drops_the_metrics_a_killed_run_logged_past_its_checkpoint(tmp_path, capsys):
    """Lines a killed run logged after its last checkpoint (and a torn last line) are dropped: the
    resumed run logs those steps again, once."""
    runs = ["--runs-dir", tmp_path, "--name", "r"]
    assert _run(["train", *runs, *TINY, "--steps", "2"], capsys)[0] == 0
    with open(tmp_path / "r" / "metrics.jsonl", "a") as log:
        log.write('{"step": 3, "loss": 99.0}\n{"step": 4, "lo')
    assert _run(["train", *runs, "--resume", "--steps", "3"], capsys)[0] == 0
    logged = _metrics(tmp_path / "r")
    assert [m["step"] for m in logged] == [1, 2, 3] and logged[-1]["loss"] != 99.0


def test_out_of_memory_is_one_line_that_says_what_to_change(tmp_path, capsys, monkeypatch):
    def oom(self, images, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(RectifiedFlowTrainer, "train_step", oom)
    code, _, err = _run(["train", "--runs-dir", tmp_path, *TINY, "--steps", "1"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("liquiddiff: error: out of memory") and "--micro-batch-size" in err


def test_metrics_stay_strict_json_when_an_fp16_step_overflows(tmp_path, capsys, monkeypatch):
    """A skipped fp16 step has an infinite or NaN gradient norm: metrics.jsonl says null."""
    step = RectifiedFlowTrainer.train_step
    monkeypatch.setattr(RectifiedFlowTrainer, "train_step", lambda self, images, **kw: {
        **step(self, images, **kw), "grad_norm": torch.tensor(float("nan"))})
    assert _run(["train", "--runs-dir", tmp_path, *TINY, "--steps", "2"], capsys)[0] == 0

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    lines = (tmp_path / "digits" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line, parse_constant=refuse)["grad_norm"] for line in lines] == [None, None]


@pytest.mark.slow
@pytest.mark.gpu
def test_gpu_fused_train_and_sample_replay_cuda_graphs_by_default(tmp_path, capsys):
    """On one CUDA GPU, `train --fused` and `sample` replay CUDA graphs without being asked (the
    in-training sample grid runs eager beside them); the same sample with --no-cuda-graph gives
    the same images to rounding."""
    runs = tmp_path / "runs"
    code, out, err = _run(["train", "--runs-dir", runs, *TINY, "--steps", "3", "--fused", "--channels-last",
                           "--device", "cuda", "--sample-every", "3"], capsys)
    assert code == 0, err
    assert "CUDA graphs" in out and all(np.isfinite(m["loss"]) for m in _metrics(runs / "digits"))
    grids = []
    for flag in ("--cuda-graph", "--no-cuda-graph"):
        out_png = tmp_path / f"{flag}.png"
        code, _, err = _run(["sample", "--ckpt", runs / "digits" / "last.safetensors", "--n", "5", "--steps", "3",
                             "--batch-size", "4", "--fused", "--device", "cuda", "--seed", "1", "--out", out_png,
                             "--no-progress", *([] if flag == "--cuda-graph" else [flag])], capsys)
        assert code == 0, err
        grids.append(np.asarray(Image.open(out_png), dtype=np.int16))
    assert np.abs(grids[0] - grids[1]).max() <= 2


def test_train_on_a_folder_with_corrupt_images(tmp_path, capsys):
    data = tmp_path / "photos"
    _write_images(data, 6)
    (data / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (data / "nested" / "empty.jpg").write_bytes(b"")
    code, out, err = _run(["train", "--data", data, "--runs-dir", tmp_path / "runs", *TINY, "--steps", "2",
                           "--sample-every", "2"], capsys)
    assert code == 0, err
    assert "(6 images, 8 px)" in out and "skipped 2 of 8 files" in out
    assert "corrupt.png" in out and "empty.jpg" in out
    grid = Image.open(tmp_path / "runs" / "photos" / "samples.png")
    assert grid.mode == "RGB"
    assert checkpoint.load(tmp_path / "runs" / "photos" / "last.safetensors")["config"]["in_channels"] == 3


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path):
    steps = 100
    argv = [sys.executable, "-m", "liquiddiff", "train", "--runs-dir", str(tmp_path), "--name", "killed", *TINY,
            "--steps", str(steps), "--ckpt-every", "5", "--sample-every", "1000"]
    ckpt = tmp_path / "killed" / "last.safetensors"
    proc = subprocess.Popen(argv, env=_subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not ckpt.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no checkpoint within the time limit"
            time.sleep(0.02)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    killed_at = checkpoint.load(ckpt)["step"]  # the newest checkpoint is whole, whatever the kill interrupted
    assert 5 <= killed_at < steps and killed_at % 5 == 0

    (tmp_path / "killed" / ".last.safetensors.x1y2.tmp").write_bytes(b"half a checkpoint")  # as a kill mid-save leaves
    done = subprocess.run([*argv[:4], "--runs-dir", str(tmp_path), "--name", "killed", "--resume", "--no-progress"],
                          env=_subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"at step {killed_at}" in done.stdout and "Traceback" not in done.stderr
    state = checkpoint.load(ckpt)
    assert state["step"] == steps and state["run"]["steps"] == steps
    logged = [m["step"] for m in _metrics(tmp_path / "killed")]
    assert logged == list(range(1, steps + 1))  # steps logged after the checkpoint were dropped and redone
    assert not [p for p in (tmp_path / "killed").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path):
    """The same command under torchrun: DDP over gloo on the CPU, rank 0 alone writes; with
    gradient checkpointing, whose reruns must not upset DDP's gradient hooks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "liquiddiff", "train", "--runs-dir", str(tmp_path), "--name", "ddp", *TINY,
           "--steps", "4", "--ckpt-every", "2", "--sample-every", "4", "--gradient-checkpointing"]
    done = subprocess.run(cmd, env=_subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = tmp_path / "ddp"
    assert done.stdout.count("done: steps 0 -> 4") == 1  # rank 0 alone reports
    assert [m["step"] for m in _metrics(run)] == [1, 2, 3, 4]
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    assert [p.name for p in (run / "samples").iterdir()] == ["step_0000004.png"]
    state = checkpoint.load(run / "last.safetensors")
    assert state["step"] == 4
    ranks = state["rng_ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["cpu"], ranks[1]["cpu"])  # each rank its own noise
    trainer = RectifiedFlowTrainer(build("micro", in_channels=1, channels=(8, 16)), device="cpu")
    trainer.load_checkpoint(run / "last.safetensors")
    assert trainer.step == 4


@pytest.mark.slow
def test_torchrun_resume_gives_each_rank_back_its_own_random_stream(tmp_path):
    """A torchrun run resumed by the same number of processes: each rank continues its own noise
    and flips from the checkpoint (not all of them rank 0's, which the trainer's state holds)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "liquiddiff", "train", "--runs-dir", str(tmp_path), "--name", "ddp"]
    for extra in ([*TINY, "--steps", "1"], ["--resume", "--steps", "2", "--no-progress"]):
        done = subprocess.run([*cmd, *extra], env=_subprocess_env(), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "at step 1" in done.stdout and "noise continues from fresh seeds" not in done.stdout
    ranks = checkpoint.load(tmp_path / "ddp" / "last.safetensors")["rng_ranks"]
    assert len(ranks) == 2 and not torch.equal(ranks[0]["cpu"], ranks[1]["cpu"])


def test_only_global_rank_0_is_the_main_process(monkeypatch):
    """On the second node of a torchrun job local rank 0 is not rank 0: it neither logs nor writes."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    info = distributed.from_env()
    assert info == distributed.DistInfo(rank=2, local_rank=0, world_size=4) and info.enabled and not info.is_main
    monkeypatch.delenv("LOCAL_RANK")
    assert distributed.from_env().local_rank == 2


@pytest.mark.slow
def test_collectives_under_torchrun(tmp_path):
    """Two gloo processes: the logged loss is the mean over ranks (not their sum), gather_objects
    gives every rank's object in rank order, broadcast_object rank 0's."""
    script = tmp_path / "collectives.py"
    script.write_text(textwrap.dedent("""
        import json, pathlib, sys
        import torch
        from liquiddiff import distributed
        info = distributed.from_env()
        distributed.init(info, torch.device("cpu"))
        mean = distributed.mean_over_ranks(3.0 * (info.rank + 1), torch.device("cpu"))
        gathered = distributed.gather_objects({"rank": info.rank})
        told = distributed.broadcast_object(f"from {info.rank}")
        said = {"rank": info.rank, "mean": mean, "gathered": gathered, "told": told}
        pathlib.Path(sys.argv[1], f"rank{info.rank}.json").write_text(json.dumps(said))
        distributed.cleanup()
    """))
    # Each rank writes its own file: two processes printing to one pipe can join their lines.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(tmp_path)]
    done = subprocess.run(cmd, env=_subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    said = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert said == [{"rank": r, "mean": 4.5, "gathered": [{"rank": 0}, {"rank": 1}], "told": "from 0"} for r in (0, 1)]
