"""Activation memory a train step keeps for backward, per module kind, without a GPU.

The forward runs under ``FakeTensorMode`` (shapes, dtypes and layouts, no data and no
arithmetic), with bf16 autocast as the trainer uses it, and a saved-tensor hook records every
unique storage autograd keeps, attributed to the innermost block module that saved it first.
Parameters and their cast copies (a tensor of a parameter's shape: autocast's, or the fused
block's, which are views of one buffer per block) are not activations and are left out. The byte counts do not depend on the device: they are what the same step saves on a GPU (the
allocator's peak adds parameters, optimizer state, gradients and transient buffers on top).

    python -m benchmarks.saved_memory [--preset tiny --image-size 256 --batch 8]
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

import torch

if not torch.cuda.is_available():
    # The fused ops dispatch to their custom ops (whose fake kernels run here) only when Triton
    # could run: on the CPU that means the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from liquiddiff import build  # noqa: E402
from liquiddiff import modules as M  # noqa: E402

# Attribution goes to the innermost of these: a block's own ops (its residual adds) to the block.
KINDS = (M.AdaLN, M.ParallelCfC, M.MultiScaleSpatialMix, M.FeedForward, M.LiquidDiffusionBlock, M.DownSample,
         M.UpSample, M.SkipFusion)
GiB = 2**30


def saved_by_module(model: torch.nn.Module, batch: int, size: int, channels_last: bool) -> dict[str, int]:
    """Bytes saved for backward by one forward, keyed by module kind ("other": stem, head, time embedding)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    device = next(model.parameters()).device
    owner = ["other"]

    def enter(module, args):
        owner.append(type(module).__name__)

    def leave(module, args, out):
        owner.pop()

    hooks = [h for m in model.modules() if isinstance(m, KINDS)
             for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    saved: dict[int, tuple[str, int]] = {}
    parameter_shapes = {p.shape for p in model.parameters()}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter) and t.shape not in parameter_shapes:
            storage = t.untyped_storage()
            saved.setdefault(storage._cdata, (owner[-1], storage.nbytes()))
        return t

    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            x = torch.randn(batch, model.config.in_channels, size, size, device=device).contiguous(memory_format=fmt)
            t = torch.rand(batch, device=device)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    model(x, t)
    finally:
        for h in hooks:
            h.remove()
    totals: collections.Counter = collections.Counter()
    for kind, nbytes in saved.values():
        totals[kind] += nbytes
    return dict(totals)


def report(preset: str, size: int, batch: int) -> str:
    model = build(preset)
    rows = {}
    for fused in (False, True):
        model.set_fused(fused)
        for cl in (False, True):
            rows[("fused" if fused else "reference", "channels_last" if cl else "NCHW")] = saved_by_module(
                model, batch, size, cl
            )
    kinds = sorted({k for r in rows.values() for k in r}, key=lambda k: -rows[("reference", "NCHW")].get(k, 0))
    lines = [
        f"Saved for backward by one train-step forward: `{preset}`, {size} px, batch {batch}, bf16 autocast "
        f"(GiB; torch {torch.__version__}; `python -m benchmarks.saved_memory --preset {preset} "
        f"--image-size {size} --batch {batch}`)",
        "",
        "| model | layout | total | vs reference | " + " | ".join(kinds) + " |",
        "|---|---|---|---|" + "---|" * len(kinds),
    ]
    for (impl, layout), r in rows.items():
        total = sum(r.values())
        base = sum(rows[("reference", layout)].values())
        cells = " | ".join(f"{r.get(k, 0) / GiB:.2f}" for k in kinds)
        lines.append(f"| {impl} | {layout} | {total / GiB:.2f} | {total / base:.2f}x | {cells} |")
    return "\n".join(lines)


def step_parser(doc: str) -> argparse.ArgumentParser:
    """The command line of the tools that count one step of a preset on fake tensors."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    return parser


def step_main(doc: str, report_fn, argv=None) -> int:
    """The command of a tool whose report takes (preset, image size, batch) alone."""
    args = step_parser(doc).parse_args(argv)
    print(report_fn(args.preset, args.image_size, args.batch))
    return 0


def main(argv=None) -> int:
    return step_main(__doc__, report, argv)


if __name__ == "__main__":
    sys.exit(main())
