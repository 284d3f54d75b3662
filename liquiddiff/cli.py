"""The ``liquiddiff`` command: ``train``, ``sample`` and ``info``.

User mistakes (a missing folder, a bad option, a checkpoint for another model) end with one
line ``liquiddiff: error: ...`` on stderr and exit code 2, argparse's convention, never a
traceback. Set LIQUIDDIFF_DEBUG=1 to get the traceback anyway.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

from . import __version__, checkpoint, distributed
from .model import PRESETS, LiquidDiffusion, build
from .sampling import SAMPLERS
from .training import AUTOCAST_DTYPES, TIME_SAMPLINGS, RectifiedFlowTrainer, autocast_dtype

CKPT_NAME = "last.safetensors"

# The training defaults are the demo's (no --data): micro at 16 px, batch 64, lr 3e-3,
# logit-normal t, 1000 steps gave recognisable digits in about 4 minutes on 2 CPU cores (uniform t
# or lr 2e-3 needed about 1500 steps for the same). A folder of photos wants a bigger
# --image-size and preset, and a GPU.
DIGITS_IMAGE_SIZE = 16
FOLDER_IMAGE_SIZE = 64


# -- option types: out-of-range values are refused by argparse, with the usage line -------------
def _checked(parse, ok, expected: str):
    """An argparse type: ``parse`` the text, then refuse values for which ``ok`` is false."""

    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    return convert


_positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
_nonnegative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _checked(float, lambda v: v > 0 and math.isfinite(v), "a positive number")
_decay = _checked(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")


def _device(text: str) -> str:
    """``--device``: auto, or what torch.device takes (cpu, cuda, cuda:N), checked before anything runs."""
    if text != "auto":
        try:
            if torch.device(text).type == "meta":
                raise ValueError
        except (RuntimeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}") from None
    return text


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 32,64, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated non-negative integers like 32,64, got {text!r}")
    return values


def _run_name(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", text):
        raise argparse.ArgumentTypeError(f"expected letters, digits, '.', '_' or '-', got {text!r}")
    return text


# -- the parser ------------------------------------------------------------------------------
class _Formatter(argparse.HelpFormatter):
    """Adds "(default: X)" to an option's help, unless the help already says what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or any(action.default is v for v in (None, False, argparse.SUPPRESS)) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


# torch.compile's modes; "default" is its default.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _compile_argument(help_text: str) -> dict:
    """add_argument's keywords for --compile [MODE]: the bare flag is torch.compile's default mode."""
    return dict(nargs="?", const="default", default=None, choices=COMPILE_MODES, metavar="MODE",
                help=f"{help_text}. MODE: one of {', '.join(COMPILE_MODES)} (torch.compile's mode; bare --compile: "
                     "default). reduce-overhead replays inductor's CUDA graphs: on an H100 it sampled the tiny "
                     "preset fastest of the ways measured (benchmarks/RESULTS.md)")


def _compile_note(mode: str | None) -> str:
    return "torch.compile" if mode in (None, "default") else f"torch.compile ({mode})"


def _compile_option(mode: str | None):
    """The trainer's ``compile`` argument for a --compile choice (None: not given)."""
    return False if mode is None else True if mode == "default" else {"mode": mode}


def _precision_help(training: bool) -> str:
    scaling = "; training scales the loss" if training else ""
    return ("auto: bf16 autocast on a GPU that computes in bf16 (A100, H100, RTX 30xx and newer), fp16 "
            f"autocast on older ones (T4, V100{scaling}); fp32 on the CPU, where bf16 autocast pays only on "
            "CPUs with bf16 units (AMX, AVX512-BF16)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="liquiddiff",
        description="Train LiquidDiffusion (an attention-free U-Net of Parallel CfC blocks, rectified flow) "
        "on a folder of images or on built-in handwritten digits, and generate new images.",
        epilog="Quick start (no download, a few minutes on a laptop CPU):\n"
        "  liquiddiff train                              # digits -> runs/digits/samples.png\n"
        "  liquiddiff sample --ckpt runs/digits/last.safetensors --n 64\n"
        "Several GPUs or nodes: the same command under torchrun, e.g.\n"
        "  torchrun --nproc_per_node 4 -m liquiddiff train --data photos/ --preset tiny --image-size 64",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"liquiddiff {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train(sub)
    _add_sample(sub)
    info = sub.add_parser(
        "info", help="device, versions, and which backend each fused op would use and why",
        description="Print the device, the versions of Python, torch and triton, the presets, and for each "
        "fused op the backend (Triton kernel or PyTorch reference) it would run on here, and why.",
        formatter_class=_Formatter, allow_abbrev=False,
    )
    info.add_argument("--device", type=_device, default="auto", help="device to report on: auto, cpu, cuda, cuda:N")
    info.set_defaults(func=cmd_info)
    return parser


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="train a model (built-in digits, --data DIR, or a Hugging Face dataset)",
        description="Train a LiquidDiffusion model with rectified flow. Without --data it trains on the "
        "1797 handwritten digits bundled with scikit-learn (no download). Everything the run writes goes to "
        "RUNS_DIR/NAME/: metrics.jsonl, sample grids from the EMA weights (samples/step_*.png, the latest as "
        "samples.png), loss.png at the end, and the checkpoint last.safetensors (written atomically). "
        "Run it under torchrun for several GPUs or nodes; the batch size is per process.",
        formatter_class=_Formatter, allow_abbrev=False,
    )
    g = p.add_argument_group("data")
    g.add_argument("--data", metavar="DIR|OWNER/NAME", default=None,
                   help="folder of images (png/jpg/webp, searched recursively; unreadable files are skipped "
                        "and counted), or a Hugging Face dataset: its Hub id (e.g. huggan/CelebA-HQ, downloaded "
                        "to the Hugging Face cache) or a folder save_to_disk wrote (needs pip install "
                        "'liquiddiff[hf]'); default: the built-in digits")
    g.add_argument("--data-split", metavar="SPLIT", default=None,
                   help="a Hugging Face dataset's split (default: train)")
    g.add_argument("--data-column", metavar="COLUMN", default=None,
                   help="a Hugging Face dataset's image column (default: its only one)")
    g.add_argument("--image-size", type=_positive_int, default=None,
                   help=f"train at this size: images are resized and centre-cropped (default: {DIGITS_IMAGE_SIZE} "
                        f"for the digits, {FOLDER_IMAGE_SIZE} for a folder); must be a multiple of the "
                        "preset's downsampling factor")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips (default: on for a folder, off for digits, which flips would turn "
                        "into non-digits)")
    g.add_argument("--workers", type=_nonnegative_int, default=None,
                   help="data-loading processes per training process (default: 0 on the CPU or for the digits, "
                        "else 4)")
    g = p.add_argument_group("model")
    g.add_argument("--preset", choices=list(PRESETS), default="micro", help="model size")
    g.add_argument("--channels", type=_int_list, default=None, metavar="C1,C2,..",
                   help="override the preset's channels per stage, e.g. 16,32")
    g.add_argument("--blocks", type=_int_list, default=None, metavar="N1,N2,..",
                   help="override the preset's blocks per stage, e.g. 1,1")
    # --no-...: a resumed run keeps these unless told otherwise, so they must be able to say no.
    g.add_argument("--fused", action=argparse.BooleanOptionalAction, default=False,
                   help="run the fused ops on their Triton kernels (which ones and why: `liquiddiff info`); "
                        "the same weights either way")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                   help="keep activations in channels_last (NHWC) memory format: faster convolutions on GPUs")
    g.add_argument("--compile", **_compile_argument(
                   "torch.compile the model (the fused ops stay opaque custom ops): the first steps and "
                   "the first sample grid compile (minutes on a GPU), later ones run faster (not "
                   "remembered by --resume)"))
    g.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="replay each step's model forward and backward from CUDA graphs captured at the "
                        "first step: no per-kernel launch overhead (CUDA; under torchrun the gradients are "
                        "averaged by one all-reduce after the backward, without DDP; not with --compile; not "
                        "remembered by --resume). Default: on for --fused on one CUDA GPU without --compile or "
                        "--gradient-checkpointing (the eager fused step waits for the host's launches)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="keep only each block's input for backward and rerun the block there: about half the "
                        "peak memory of a fused step for one more forward pass of the blocks; same values "
                        "(not remembered by --resume)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=_positive_int, default=1000, help="total optimizer steps (a resumed run counts on)")
    g.add_argument("--batch-size", type=_positive_int, default=64, help="images per step and process")
    g.add_argument("--micro-batch-size", type=_positive_int, default=None, metavar="N",
                   help="accumulate each step's gradient over micro-batches of N images: the step of the "
                        "whole batch with the activation memory of N images")
    g.add_argument("--lr", type=_positive_float, default=3e-3, help="AdamW learning rate")
    g.add_argument("--warmup-steps", type=_nonnegative_int, default=50, help="linear learning-rate warm-up")
    g.add_argument("--ema-decay", type=_decay, default=0.999,
                   help="EMA of the weights used for samples (with warm-up: min(decay, (1+k)/(10+k)))")
    g.add_argument("--time-sampling", choices=TIME_SAMPLINGS, default="logit_normal",
                   help="how training draws t: logit_normal (SD3; it gave cleaner digits for the same steps) "
                        "or uniform (the seed)")
    g.add_argument("--precision", choices=("auto", *AUTOCAST_DTYPES, "fp32"), default="auto",
                   help=_precision_help(training=True))
    g.add_argument("--device", type=_device, default="auto", help="auto (cuda:LOCAL_RANK if there is a GPU, else cpu), cpu, cuda, cuda:N")
    g.add_argument("--seed", type=int, default=0,
                   help="seed for the initial weights and the data order, and (plus the rank r under torchrun) "
                        "for the noise, t and flips; a resumed run continues the checkpoint's random state instead")
    g = p.add_argument_group("run folder, logging, checkpoints")
    g.add_argument("--name", type=_run_name, default=None,
                   help="run name (default: 'digits' or the data folder's name, with -2, -3.. added when taken)")
    g.add_argument("--runs-dir", default="runs", help="parent folder of the run folders")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                   help="continue a run (step, optimizer, EMA, RNG): from RUNS_DIR/NAME/last.safetensors, from "
                        "the latest matching run when --name is not given, or from PATH. Options not given on "
                        "the command line are taken from the checkpoint")
    g.add_argument("--log-every", type=_positive_int, default=10, help="steps between lines of metrics.jsonl")
    g.add_argument("--sample-every", type=_positive_int, default=250, help="steps between sample grids")
    g.add_argument("--sample-n", type=_positive_int, default=64, help="images in each sample grid")
    g.add_argument("--sample-steps", type=_positive_int, default=20, help="Euler steps for the sample grids")
    g.add_argument("--ckpt-every", type=_positive_int, default=250, help="steps between checkpoints")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def _add_sample(sub) -> None:
    p = sub.add_parser(
        "sample", help="generate images from a checkpoint",
        description="Generate images from a checkpoint's EMA weights by integrating the learned ODE from noise. "
        "Writes one grid PNG (and, with --separate, one PNG per image).",
        formatter_class=_Formatter, allow_abbrev=False,
    )
    p.add_argument("--ckpt", default=None, metavar="PATH",
                   help="checkpoint (a .safetensors file or a run folder); default: the newest "
                        f"RUNS_DIR/*/{CKPT_NAME}")
    p.add_argument("--runs-dir", default="runs", help="where to look for the newest checkpoint without --ckpt")
    p.add_argument("--n", type=_positive_int, default=64, help="number of images")
    p.add_argument("--steps", type=_positive_int, default=50, help="ODE steps (Heun evaluates the model twice a step)")
    p.add_argument("--sampler", choices=SAMPLERS, default="euler", help="ODE integrator")
    p.add_argument("--seed", type=int, default=0,
                   help="noise seed: the same seed gives the same starting noise on any device and at any "
                        "--batch-size (drawn on the CPU, image by image), so the same images up to the device's "
                        "arithmetic")
    p.add_argument("--out", default=None, metavar="PNG",
                   help="grid picture to write, a PNG (.png is added to a name without a suffix, a folder's too: "
                        "--out gen writes gen.png beside gen/; default: "
                        "generated.png next to the checkpoint)")
    p.add_argument("--separate", action="store_true",
                   help="also write one PNG per image, into a folder named after --out without its suffix")
    p.add_argument("--image-size", type=_positive_int, default=None,
                   help="size to generate at (default: the size the model was trained at)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images generated at once")
    p.add_argument("--cuda-graph", action=argparse.BooleanOptionalAction, default=None,
                   help="capture the model call as a CUDA graph and replay it every step (CUDA only, not with "
                        "--compile): no per-kernel launch overhead, for three model calls of capture (once for "
                        "batches of one size). Default: on for a CUDA device without --compile")
    p.add_argument("--compile", **_compile_argument(
                   "torch.compile the model: the first batch compiles (minutes on a GPU), the rest "
                   "run faster"))
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="activations in channels_last (NHWC) memory format, faster convolutions on GPUs "
                        "(default: as the checkpoint's run trained)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--fused", action="store_true", help="use the fused Triton kernels")
    p.add_argument("--precision", choices=("auto", *AUTOCAST_DTYPES, "fp32"), default="auto",
                   help=_precision_help(training=False))
    p.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sample)


def explicit_options(parser: argparse.ArgumentParser, argv: list[str], command: str) -> set[str]:
    """The dests of the options typed on the command line (so a resumed run keeps the rest).

    allow_abbrev=False makes this exact: an option is only ever spelled one of its own ways.
    """
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    given = set()
    for action in sub._actions:
        for opt in action.option_strings:
            if any(tok == opt or tok.startswith(opt + "=") for tok in argv):
                given.add(action.dest)
    return given


# -- helpers ---------------------------------------------------------------------------------
def _say(*parts) -> None:
    """Messages for the user: rank 0 only, and above the progress bar when there is one."""
    if distributed.from_env().is_main:
        from tqdm import tqdm

        tqdm.write(" ".join(str(p) for p in parts), file=sys.stdout)
        sys.stdout.flush()


def _counted(n: int, noun: str) -> str:
    """'1 step', '2 steps'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


def _autocast_name(dtype: torch.dtype | None) -> str:
    """'bf16' or 'fp16' for an autocast dtype, 'fp32' for none."""
    return next((name for name, d in AUTOCAST_DTYPES.items() if d == dtype), "fp32")


def _autocast_note(trainer) -> str:
    return f", {_autocast_name(trainer.autocast_dtype)} autocast" if trainer.mixed_precision else ""


def _mixed_precision(choice: str) -> bool | str | None:
    """The trainer's ``mixed_precision`` for a --precision choice (bf16 and fp16 on any device, as in the API)."""
    return {"auto": None, "fp32": False}.get(choice, choice)


def _check_runnable(args, device: torch.device) -> None:
    """Options that cannot run on ``device``, refused before a run folder, a model or data."""
    if args.cuda_graph and args.compile:
        raise ValueError("--cuda-graph: not with --compile (--compile reduce-overhead replays inductor's CUDA graphs)")
    if args.cuda_graph and device.type != "cuda":
        raise ValueError(f"--cuda-graph: needs a CUDA GPU (device: {device})")
    if args.fused:
        from . import kernels

        try:  # LIQUIDDIFF_KERNELS: a bad value, or =triton where Triton cannot run
            kernels.backend_report(device)
        except RuntimeError as exc:
            raise ValueError(str(exc)) from None


def _cuda_graph_by_default(args, device: torch.device, training: bool, processes: int = 1) -> bool:
    """--cuda-graph when not given: on where graphs run and were measured to help. Sampling: a
    CUDA device without --compile. Training: also one process (graphs under torchrun have not
    run on GPUs yet: --cuda-graph asks for them), the fused model (on an H100 its eager step,
    bound by the host's launches, took 0.38x the compiled reference's speed, its graphed step
    1.31x: benchmarks/RESULTS.md) and no --gradient-checkpointing (not tested with graphs)."""
    if device.type != "cuda" or args.compile:
        return False
    return not training or (processes == 1 and args.fused and not args.gradient_checkpointing)


def _ops_note(fused: bool, device: torch.device) -> str:
    """What runs the model's ops: the fused model says how many fall back to PyTorch here."""
    if not fused:
        return "PyTorch reference ops"
    from . import kernels

    fallbacks = [op for op, b in kernels.backend_report(device).items() if not (b.is_triton or b.deliberate)]
    if not fallbacks:
        return "fused kernels"
    return f"fused model; {len(fallbacks)} of its ops on the PyTorch reference here, see the warnings"


def _micro_batches(batch: int, micro: int | None) -> str:
    """How a step's batch is split: "" for one piece, else " (micro-batches of N[, the last of M])"."""
    if not micro:
        return ""
    return f" (micro-batches of {micro}" + (f", the last of {batch % micro})" if batch % micro else ")")


def _check_image_size(model: LiquidDiffusion, size: int, preset: str) -> None:
    k = model.config.downsample_factor
    if size % k:
        lo, hi = max(k, size - size % k), size - size % k + k
        raise ValueError(
            f"--image-size {size}: the {preset} model has {len(model.config.channels)} U-Net stages and "
            f"needs a multiple of {k} (try {lo} or {hi})"
        )


def _read_metrics(path: Path, up_to_step: int | None = None) -> list[dict]:
    """metrics.jsonl lines, skipping a torn last line (a killed run) and steps past ``up_to_step``."""
    rows = []
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if up_to_step is None or row.get("step", 0) <= up_to_step:
            rows.append(row)
    return rows


# -- train -----------------------------------------------------------------------------------
# Options a resumed run takes from its checkpoint unless they are typed again.
RUN_KEYS = (
    "data", "data_split", "data_column", "image_size", "flip", "workers", "preset", "channels", "blocks", "fused",
    "channels_last", "steps", "batch_size", "micro_batch_size", "lr", "warmup_steps", "ema_decay", "time_sampling",
    "precision", "seed", "log_every", "sample_every", "sample_n", "sample_steps", "ckpt_every",
)


def _base_name(data: str | None) -> str:
    if data is None:
        return "digits"
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(data).resolve().name).strip("-.")
    return name or "images"


def _runs_like(runs_dir: Path, base: str) -> list[Path]:
    """RUNS_DIR/base and RUNS_DIR/base-N that hold a checkpoint, newest first."""
    found = [d for d in [runs_dir / base, *runs_dir.glob(f"{base}-*")] if (d / CKPT_NAME).is_file()]
    return sorted(found, key=lambda d: (d / CKPT_NAME).stat().st_mtime, reverse=True)


def _resolve_run(args) -> tuple[Path, Path | None]:
    """(run folder, checkpoint to resume from or None), refusing to overwrite a run by accident."""
    runs_dir = Path(args.runs_dir)
    if args.resume is not None:
        if args.resume != "auto":
            ckpt = Path(args.resume)
            ckpt = ckpt / CKPT_NAME if ckpt.is_dir() else ckpt
            if not ckpt.is_file():
                raise FileNotFoundError(f"--resume: checkpoint {ckpt} does not exist")
            run_dir = runs_dir / args.name if args.name else ckpt.parent
            own = run_dir / CKPT_NAME
            if args.name and own.is_file() and own.resolve() != ckpt.resolve():
                raise ValueError(
                    f"--resume {args.resume} --name {args.name}: run folder {run_dir} holds a checkpoint of its own, "
                    f"which this run would overwrite; choose another --name"
                )
            return run_dir, ckpt
        if args.name:
            ckpt = runs_dir / args.name / CKPT_NAME
            if not ckpt.is_file():
                raise FileNotFoundError(f"--resume: run {args.name!r} has no checkpoint ({ckpt} does not exist)")
            return ckpt.parent, ckpt
        base = _base_name(args.data)
        runs = _runs_like(runs_dir, base)
        if not runs:
            raise FileNotFoundError(
                f"--resume: no run to continue (no {runs_dir}/{base}*/{CKPT_NAME}); give --name or a checkpoint path"
            )
        return runs[0], runs[0] / CKPT_NAME
    if args.name:
        run_dir = runs_dir / args.name
        if (run_dir / CKPT_NAME).is_file():
            raise ValueError(
                f"run folder {run_dir} already holds a checkpoint; add --resume to continue it, "
                "or choose another --name"
            )
        return run_dir, None
    base = _base_name(args.data)
    run_dir, n = runs_dir / base, 1
    while run_dir.exists():
        n += 1
        run_dir = runs_dir / f"{base}-{n}"
    return run_dir, None


def _apply_saved_run(args, explicit: set[str], saved: dict | None) -> None:
    """A resumed run keeps its options; the ones typed again win (e.g. --steps to train longer)."""
    for key in RUN_KEYS:
        if saved and key in saved and key not in explicit:
            setattr(args, key, saved[key])


def _make_dataset(args, info):
    from .data import DigitsDataset, is_hub_id, open_images

    if args.data is None:
        return DigitsDataset(args.image_size)

    def make():
        return open_images(args.data, args.image_size, split=args.data_split, column=args.data_column,
                           progress=info.is_main)

    if not (info.enabled and is_hub_id(args.data)):
        return make()
    # The main process downloads a Hub dataset; the others wait, then read its cache. An error
    # there is raised on every rank, so none is left waiting.
    made, failed = None, None
    if info.is_main:
        try:
            made = make()
        except (ValueError, OSError) as exc:
            failed = exc
    failed = distributed.broadcast_object(failed)
    if failed is not None:
        raise failed
    return made if info.is_main else make()


def _describe_data(ds, args) -> str:
    if args.data is None:
        return f"built-in digits (scikit-learn, {len(ds)} images, upscaled 8 -> {args.image_size} px)"
    text = f"{ds.description} ({len(ds)} images, {args.image_size} px)"
    if ds.report.skipped:
        shown = "; ".join(f"{p} ({why})" for p, why in ds.report.skipped[:5])
        more = f"; and {len(ds.report.skipped) - 5} more" if len(ds.report.skipped) > 5 else ""
        text += f"\n  skipped {len(ds.report.skipped)} of {ds.report.found} files that are not readable images: {shown}{more}"
    return text


def _collate(batch):
    """The digits fetch whole batches at once (a tensor); image files come one by one (a list)."""
    return batch if isinstance(batch, torch.Tensor) else torch.stack(batch)


def _batches(ds, args, info, batch_size: int, start: tuple[int, int] = (0, 0)):
    from .data import ResumableBatches

    return ResumableBatches(ds, batch_size, rank=info.rank, world_size=info.world_size, seed=args.seed, start=start)


def _data_start(ds, args, info, state: dict | None, step: int) -> tuple[int, int]:
    """Where a run's data resumes: the checkpoint's position, or for a checkpoint from before
    positions were kept, where ``step`` batches of its batch size led."""
    if state is None:
        return 0, 0
    if "data_position" in state:
        return tuple(state["data_position"])
    saved_batch = (state.get("run") or {}).get("batch_size", args.batch_size)
    try:
        return _batches(ds, args, info, saved_batch).position_after(step)
    except ValueError:  # that batch fits no more (more processes now): a position as close as can be
        return _batches(ds, args, info, args.batch_size).position_after(step)


def _loader(batches, ds, args, device):
    from .data import ignore_interrupts

    workers = args.workers
    if workers is None:
        workers = 0 if (device.type == "cpu" or args.data is None) else 4
    return torch.utils.data.DataLoader(
        ds, batch_sampler=batches, num_workers=workers, collate_fn=_collate, worker_init_fn=ignore_interrupts,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        # Its own generator: making the iterator must not draw from the global RNG, which a
        # checkpoint restores, or a resumed run would not continue the same random stream.
        generator=torch.Generator().manual_seed(args.seed),
    )


def _rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _restore_rng(state: dict, args, info, device, step: int) -> None:
    """Each rank continues its own random stream; a changed world size starts fresh ones."""
    per_rank = state.get("rng_ranks")
    if per_rank and len(per_rank) == info.world_size:
        mine = per_rank[info.rank]
        torch.set_rng_state(mine["cpu"])
        if device.type == "cuda" and "cuda" in mine:
            torch.cuda.set_rng_state(mine["cuda"], device)
        return
    torch.manual_seed(args.seed * 1_000_003 + step * 1009 + info.rank)
    _say(f"note: the checkpoint was written by {len(per_rank or [])} process(es), this run has "
         f"{info.world_size}: noise continues from fresh seeds")


def _save(trainer, path: Path, run: dict, info, device, data_position: tuple[int, int]) -> None:
    """All ranks hand over their RNG state (a collective), rank 0 writes the file atomically."""
    rngs = distributed.gather_objects(_rng_state(device))
    if info.is_main:
        state = trainer.state_dict()
        state["run"] = run
        state["rng_ranks"] = rngs
        state["data_position"] = list(data_position)
        checkpoint.save(state, path)


def _sample_grid(trainer, args, run_dir: Path) -> Path:
    from .images import display_scale, make_grid, save_png

    # The same noise every time (its own generator): grids show the model change, not the noise.
    gen = torch.Generator().manual_seed(args.seed + 12345)  # on the CPU: the same noise on any device
    images = trainer.sample(args.sample_n, args.image_size, args.sample_steps, generator=gen)
    grid = make_grid(images, scale=display_scale(args.image_size))
    save_png(grid, run_dir / "samples" / f"step_{trainer.step:07d}.png")
    return save_png(grid, run_dir / "samples.png")


def cmd_train(args, explicit: set[str]) -> int:
    from tqdm import tqdm

    from .images import plot_loss

    info = distributed.from_env()
    device = distributed.device_for(info, args.device)
    distributed.init(info, device)

    # Rank 0 decides the folder for all: another rank could see it created, or, on another
    # node, not see it at all. An error there is raised on every rank, so none is left waiting.
    resolved = None
    if info.is_main:
        try:
            resolved = _resolve_run(args)
        except (ValueError, OSError) as exc:
            resolved = exc
    resolved = distributed.broadcast_object(resolved)
    if isinstance(resolved, Exception):
        raise resolved
    run_dir, resume_from = resolved
    state = None
    if resume_from is not None:
        state = checkpoint.load(resume_from)
        _apply_saved_run(args, explicit, state.get("run"))
    _check_runnable(args, device)
    if args.cuda_graph is None:
        args.cuda_graph = _cuda_graph_by_default(args, device, training=True, processes=info.world_size)
    if args.micro_batch_size is not None and args.micro_batch_size > args.batch_size:
        raise ValueError(f"--micro-batch-size {args.micro_batch_size}: more than the batch (--batch-size "
                         f"{args.batch_size}); leave it out, or give at most {args.batch_size}")
    if args.data is None and (args.data_split is not None or args.data_column is not None):
        raise ValueError("--data-split and --data-column choose from a Hugging Face dataset: give it with --data")
    if args.image_size is None:
        args.image_size = DIGITS_IMAGE_SIZE if args.data is None else FOLDER_IMAGE_SIZE
    if args.flip is None:
        args.flip = args.data is not None
    if args.data is not None:
        from .data import is_hub_id

        if not is_hub_id(args.data):
            args.data = str(Path(args.data).resolve())
    mixed = _mixed_precision(args.precision)

    # Model first (cheap), so a bad --image-size or --channels is refused before data loading.
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    overrides = {"in_channels": 1 if args.data is None else 3}
    if args.channels is not None:
        overrides["channels"] = tuple(args.channels)
    if args.blocks is not None:
        overrides["blocks"] = tuple(args.blocks)
    model = build(args.preset, fused=args.fused, **overrides).set_gradient_checkpointing(args.gradient_checkpointing)
    _check_image_size(model, args.image_size, args.preset)

    ds = _make_dataset(args, info)
    trainer = RectifiedFlowTrainer(
        model, lr=args.lr, device=device, ema_decay=args.ema_decay, time_sampling=args.time_sampling,
        warmup_steps=args.warmup_steps, mixed_precision=mixed, distributed=info.enabled,
        channels_last=args.channels_last, cuda_graph=args.cuda_graph, compile=_compile_option(args.compile),
        micro_batch_size=args.micro_batch_size,
    )
    if state is not None:
        trainer.load_state_dict(state)  # refuses a checkpoint of another preset, with the difference
        _restore_rng(state, args, info, device, trainer.step)
    else:
        torch.manual_seed(args.seed + info.rank)  # each rank draws its own noise and flips

    start = trainer.step
    # Before anything is written: a batch larger than the data is refused here.
    batches = _batches(ds, args, info, args.batch_size, _data_start(ds, args, info, state, start))
    del state
    loader = _loader(batches, ds, args, device) if start < args.steps else None

    run = {key: getattr(args, key) for key in RUN_KEYS}
    run["name"] = run_dir.name
    metrics_path = run_dir / "metrics.jsonl"
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        # Temporary files of a killed run (a checkpoint or picture it was writing): never read.
        for stale in [*run_dir.glob(".*.tmp"), *run_dir.glob("samples/.*.tmp")]:
            stale.unlink(missing_ok=True)
        (run_dir / "run.json").write_text(json.dumps(
            {**run, "world_size": info.world_size, "device": str(device), "liquiddiff": __version__,
             "torch": torch.__version__}, indent=2) + "\n")
        # A killed run may have logged steps past its last checkpoint: those are redone.
        kept = _read_metrics(metrics_path, up_to_step=start) if resume_from is not None else []
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    n_params = sum(p.numel() for p in model.parameters())
    _say(f"run folder: {run_dir}" + (f" (resuming from {resume_from} at step {start})" if resume_from else ""))
    _say(f"data: {_describe_data(ds, args)}")
    options = [name for on, name in ((args.channels_last, "channels_last"), (args.gradient_checkpointing,
               "gradient checkpointing"), (args.compile, _compile_note(args.compile)),
               (args.cuda_graph, "CUDA graphs")) if on]
    _say(f"model: {args.preset} {list(model.config.channels)} ({n_params / 1e6:.2f} M parameters, "
         f"{_ops_note(args.fused, device)}) on {device}{_autocast_note(trainer)}"
         f"{''.join(f', {o}' for o in options)}; batch {args.batch_size}"
         f"{_micro_batches(args.batch_size, args.micro_batch_size)}"
         f"{f' x {info.world_size} processes' if info.enabled else ''}, lr {args.lr:g}, {_counted(args.steps, 'step')}")
    if args.compile and start < args.steps:
        _say("torch.compile: the first step compiles the model, and the first sample grid its EMA copy (minutes each)")
    if start >= args.steps:
        _say(f"the run is already at step {start} of {args.steps}; pass a larger --steps to train on")
        return 0

    loader = iter(loader)
    bar = tqdm(total=args.steps, initial=start, unit="step", dynamic_ncols=True,
               disable=not info.is_main or args.no_progress, file=sys.stderr)
    t0 = time.perf_counter()
    window_loss, window_n, window_t = 0.0, 0, t0
    images_per_step = args.batch_size * info.world_size
    last_grid = None

    def save() -> int:
        """The run folder's checkpoint, now; returns the step it holds."""
        _save(trainer, run_dir / CKPT_NAME, run, info, device, batches.position_after(trainer.step - start))
        return trainer.step

    # The step the run folder's checkpoint holds.
    last_ckpt = start if resume_from is not None and Path(resume_from).resolve() == (run_dir / CKPT_NAME).resolve() else None
    # Under torchrun every rank must stop after the same step, which one rank's Ctrl-C can't
    # promise: there a Ctrl-C stops at once, and the run resumes from its last checkpoint.
    stop = _StopAfterStep(enabled=not info.enabled)
    mid_step = False
    with open(metrics_path, "a", buffering=1) if info.is_main else open(os.devnull, "w") as log, stop:
        try:
            while trainer.step < args.steps and not stop.requested:
                mid_step = True
                batch = next(loader)
                # Checked on the host: on the GPU the range check would wait for the steps queued
                # before it, and the steps run without waiting (sync=False: the loss is read
                # back at log steps only).
                trainer.check_images(batch)
                images = batch.to(device, non_blocking=True)
                if args.flip:
                    from .data import random_hflip

                    images = random_hflip(images)
                m = trainer.train_step(images, sync=False)
                mid_step = False
                window_loss, window_n = window_loss + m["loss"], window_n + 1
                step = trainer.step
                if step % args.log_every == 0 or step == args.steps:
                    loss = distributed.mean_over_ranks(float(window_loss) / window_n, device)
                    now = time.perf_counter()  # after the read above, which waits for the GPU
                    speed = images_per_step * window_n / max(now - window_t, 1e-9)
                    # An fp16 step whose gradients overflowed (and was skipped) has no norm: null,
                    # not the NaN or Infinity that strict JSON readers refuse.
                    grad_norm = float(m["grad_norm"])
                    grad_norm = grad_norm if math.isfinite(grad_norm) else None
                    log.write(json.dumps({
                        "step": step, "loss": loss, "grad_norm": grad_norm, "lr": m["lr"],
                        "images_per_s": round(speed, 1), "elapsed_s": round(now - t0, 2),
                    }) + "\n")
                    bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{speed:.0f}", refresh=False)
                    window_loss, window_n, window_t = 0.0, 0, now
                bar.update(1)
                if step % args.sample_every == 0 and info.is_main:
                    last_grid = _sample_grid(trainer, args, run_dir)
                if step % args.ckpt_every == 0:
                    last_ckpt = save()
        except KeyboardInterrupt:
            bar.close()
            if mid_step:
                where = f"during step {trainer.step + 1}: not saved (the weights may hold part of its update)"
            else:  # in a sample grid or a checkpoint's write
                where = f"after step {trainer.step}" + ("" if last_ckpt == trainer.step else ": not saved")
            _say(f"interrupted {where}; {_resume_hint(run_dir, args, last_ckpt)}")
            raise
    bar.close()
    if stop.requested and trainer.step < args.steps:  # a stop in the last step: the run finishes
        if last_ckpt != trainer.step:
            last_ckpt = save()
        _say(f"stopped after step {trainer.step}; {_resume_hint(run_dir, args, last_ckpt)}")
        raise _Stopped
    elapsed = time.perf_counter() - t0

    if last_ckpt != trainer.step:
        save()
    if info.is_main:
        if last_grid is None or trainer.step % args.sample_every:
            last_grid = _sample_grid(trainer, args, run_dir)
        rows = _read_metrics(metrics_path)
        curve = plot_loss([r["step"] for r in rows], [r["loss"] for r in rows], run_dir / "loss.png",
                          title=f"{run_dir.name}: {args.preset}, batch {images_per_step}, lr {args.lr:g}")
        _say(f"\ndone: steps {start} -> {trainer.step} in {_duration(elapsed)} "
             f"({(trainer.step - start) / max(elapsed, 1e-9):.1f} steps/s)")
        _say(f"  sample grid: {last_grid}")
        _say(f"  loss curve:  {curve}")
        _say(f"  checkpoint:  {run_dir / CKPT_NAME}")
        _say(f"  metrics:     {metrics_path}")
        _say(f"generate more: liquiddiff sample --ckpt {run_dir / CKPT_NAME} --n 64")
    distributed.barrier()
    return 0


class _Stopped(KeyboardInterrupt):
    """A Ctrl-C honoured after a step and saved: the exit status of an interrupt, no more said."""


class _StopAfterStep:
    """Ctrl-C in a training loop: the first asks the loop to stop after the step in flight, which
    then saves; a second stops at once, unsaved. A checkpoint taken in the middle of a step would
    hold part of its update (AdamW's moments moved, the step count not) or its noise drawn from
    the RNG it saves, and resuming from it would not continue the same run."""

    def __init__(self, enabled: bool):
        # Not where Ctrl-C is ignored (a job started in the background), nor off the main thread.
        self.enabled = (enabled and threading.current_thread() is threading.main_thread()
                        and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN)
        self.requested = False
        self._previous = None

    def __enter__(self):
        if self.enabled:
            self._previous = signal.signal(signal.SIGINT, self._interrupt)
        return self

    def _interrupt(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        _say("\nstopping after this step (Ctrl-C again to stop now, without saving it)")

    def __exit__(self, *exc) -> None:
        if self.enabled:  # None: a handler installed from C, which Python can't put back
            signal.signal(signal.SIGINT, signal.SIG_DFL if self._previous is None else self._previous)


def _resume_hint(run_dir: Path, args, saved_step: int | None) -> str:
    if saved_step is None:
        return "no checkpoint was written"
    return (f"{run_dir / CKPT_NAME} holds step {saved_step}. Continue with: "
            f"liquiddiff train --name {run_dir.name} --runs-dir {args.runs_dir} --resume")


# -- sample ----------------------------------------------------------------------------------
def _find_checkpoint(args) -> Path:
    if args.ckpt is not None:
        path = Path(args.ckpt)
        path = path / CKPT_NAME if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"--ckpt: checkpoint {path} does not exist")
        return path
    found = sorted(Path(args.runs_dir).glob(f"*/{CKPT_NAME}"), key=lambda p: p.stat().st_mtime, reverse=True)
    if not found:
        raise FileNotFoundError(
            f"no checkpoint given and none under {args.runs_dir}/ (run `liquiddiff train` first, or pass --ckpt)"
        )
    return found[0]


def cmd_sample(args, explicit: set[str]) -> int:
    from tqdm import tqdm

    from .images import display_scale, make_grid, save_images, save_png

    device = distributed.device_for(distributed.DistInfo(), args.device)
    _check_runnable(args, device)
    if args.cuda_graph is None:
        args.cuda_graph = _cuda_graph_by_default(args, device, training=False)
    if args.out and Path(args.out).suffix.lower() not in ("", ".png"):
        raise ValueError(f"--out {args.out}: the grid is written as a PNG; give a .png name (or none: .png is added)")
    mixed = _mixed_precision(args.precision)
    path = _find_checkpoint(args)
    state = checkpoint.load(path)
    model = LiquidDiffusion.from_state(state, ema=not args.no_ema, fused=args.fused, source=f"checkpoint {path}")
    run = state.get("run") or {}
    image_size = args.image_size or run.get("image_size")
    if image_size is None:
        raise ValueError(f"checkpoint {path} does not record its image size; pass --image-size")
    _check_image_size(model, image_size, model.config.name)
    channels_last = bool(run.get("channels_last")) if args.channels_last is None else args.channels_last
    # The trainer's EMA copy, which sample() uses, is a copy of these weights.
    trainer = RectifiedFlowTrainer(model, device=device, mixed_precision=mixed, channels_last=channels_last,
                                   compile=_compile_option(args.compile))

    out = Path(args.out) if args.out else path.parent / "generated.png"
    out = out if out.suffix else out.with_suffix(".png")  # and the --separate folder is its stem
    # On the CPU, one image's noise at a time: the same images on any device and at any --batch-size.
    gen = torch.Generator().manual_seed(args.seed)
    channels = model.config.in_channels
    chunks = [min(args.batch_size, args.n - i) for i in range(0, args.n, args.batch_size)]
    print(f"sampling {_counted(args.n, 'image')} of {image_size} px from {path} (step {state.get('step')}, "
          f"{'raw' if args.no_ema else 'EMA'} weights) with {_counted(args.steps, args.sampler + ' step')} on {device}")
    images = []
    with tqdm(total=len(chunks) * args.steps, unit="step", disable=args.no_progress, file=sys.stderr) as bar:
        for n in chunks:
            noise = torch.stack([torch.randn(channels, image_size, image_size, generator=gen) for _ in range(n)])
            images.append(trainer.sample(n, image_size, args.steps, sampler=args.sampler, noise=noise,
                                         progress=bar.update, cuda_graph=args.cuda_graph).cpu())
    images = torch.cat(images)
    save_png(make_grid(images, scale=display_scale(image_size)), out)
    print(f"wrote {out}")
    if args.separate:
        folder = out.with_suffix("")
        save_images(images, folder)
        print(f"wrote {len(images)} images to {folder}/")
    return 0


# -- info ------------------------------------------------------------------------------------
def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return getattr(mod, "__version__", "installed")
    except Exception as exc:  # not installed, or a broken install: say so, do not fail
        return f"not available ({type(exc).__name__})"


def cmd_info(args, explicit: set[str]) -> int:
    from .kernels import OPS, select_backend

    device = distributed.device_for(distributed.DistInfo(), args.device)
    print(f"liquiddiff {__version__}")
    print(f"python     {platform.python_version()} ({sys.executable})")
    print(f"torch      {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    print(f"triton     {_version('triton')}")
    print(f"numpy      {_version('numpy')}, pillow {_version('PIL')}, scikit-learn {_version('sklearn')}")
    hub = _version("datasets")
    print(f"datasets   {hub}" + (" (for --data OWNER/NAME: pip install 'liquiddiff[hf]')" if "not" in hub else ""))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            print(f"gpu {i}      {props.name}, {props.total_memory / 2**30:.0f} GiB, "
                  f"compute capability {props.major}.{props.minor}")
    else:
        print("gpu        none (CUDA not available): training runs on the CPU")
    print(f"cpu        {os.cpu_count()} cores, torch uses {torch.get_num_threads()} threads")
    print(f"device     {device} (what `train` and `sample` use with --device {args.device})")
    print(f"precision  {_precision_note(device)} (--precision auto)")
    print(f"kernels    LIQUIDDIFF_KERNELS={os.environ.get('LIQUIDDIFF_KERNELS', 'auto')}, "
          f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}")
    for op in OPS:
        try:
            backend, forward = select_backend(op, device), select_backend(op, device, grad=False)
            print(f"  {op:<24} {backend.name:<7} {backend.reason}")
            if forward.name != backend.name:  # runtime.FORWARD_ONLY: its forward kernel's choice
                print(f"  {'':<24} {forward.name:<7} {forward.reason}")
        except (RuntimeError, ValueError) as exc:  # LIQUIDDIFF_KERNELS=triton where it cannot run
            print(f"  {op:<24} error   {exc}")
    print("presets    " + ", ".join(f"{name} ({_count_params(name) / 1e6:.1f} M)" for name in PRESETS))
    return 0


def _precision_note(device: torch.device) -> str:
    name = _autocast_name(autocast_dtype(device, None))
    return {"fp32": "fp32", "fp16": "fp16 autocast with loss scaling (this GPU has no bf16 arithmetic)"}.get(
        name, f"{name} autocast")


def _count_params(preset: str) -> int:
    with torch.device("meta"):  # no memory, no time: only the shapes
        return sum(p.numel() for p in build(preset).parameters())


# -- entry point -----------------------------------------------------------------------------
def _warning_line(message, category, filename, lineno, line=None) -> str:
    text = str(message)
    return f"liquiddiff: warning: {text.removeprefix('liquiddiff: ')}\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)  # bad options: usage + message, exit 2
    explicit = explicit_options(parser, argv, args.command)
    debug = os.environ.get("LIQUIDDIFF_DEBUG", "").strip() not in ("", "0")
    formatwarning = warnings.formatwarning
    if not debug:
        warnings.formatwarning = _warning_line  # one line, not the source line that warned
    try:
        return args.func(args, explicit)
    except KeyboardInterrupt as exc:
        if not isinstance(exc, _Stopped):
            print("liquiddiff: interrupted", file=sys.stderr)
        return 130
    except torch.OutOfMemoryError:
        if debug:
            raise
        hint = "a smaller --batch-size or --image-size"
        if args.command == "train":
            hint += ", or --micro-batch-size N (the same steps, N images at a time), --gradient-checkpointing, --fused"
        print(f"liquiddiff: error: out of memory; use {hint}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, OSError) as exc:
        if debug:
            raise
        print(f"liquiddiff: error: {exc}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = formatwarning
        distributed.cleanup()


if __name__ == "__main__":
    sys.exit(main())
