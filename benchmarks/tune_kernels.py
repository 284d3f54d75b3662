"""Tile sweeps for the kernels whose tiles were chosen without a GPU timing them: one command on
a GPU machine times each candidate setting against the baseline it must beat, in one process.

    python -m benchmarks.tune_kernels            # a GPU: bf16, [8, 64, 256, 256], channels_last
    python -m benchmarks.tune_kernels --quick    # any machine: tiny sizes, proves it runs
    python -m benchmarks.tune_kernels --max-seconds 150   # what a GPU call has left: no setting timed after

Sections (each setting is a set of the launcher's module constants, restored afterwards):

- depthwise 7x7 and 3x3 forward of the fp32 input, as the model's backbone conv calls it (its
  launcher casts it; kernels/depthwise.py: tile rows, tile columns, channel block, warps),
  against cuDNN on the bf16 copy autocast would make (cast included, and without it);
- depthwise weight gradient (elements per tile, warps, minimum programs) against
  ``aten.convolution_backward`` for the weight alone;
- the CfC backward in channels_last (kernels/cfc_relax.py: tile elements, elements per thread),
  against the same op in NCHW;
- the SiLU -> 1x1 conv kernels (kernels/pointwise_conv.py, opt-in) at the FeedForward's last
  conv (2C -> C): forward with the block's residual (pixel block, channel blocks, warps) against
  SiLU, cuDNN and the add, and
  backward of its fp32 upstream gradient (pixel block, weight-gradient tile, programs, warps)
  against its cast, SiLU remade, cuDNN's input and weight gradients and SiLU's backward;
- the CfC heads + gate kernels (kernels/cfc_heads.py, with the pointwise kernels): forward (pixel
  block, channel blocks, warps) and backward (pixel block, tiles per program, warps), against the
  launches they replace (cuDNN's f conv, the g and h pointwise kernels, the CfC kernel's forward
  or backward).

The first setting of each grid is the launcher's current one. The winner of each section is what
the launcher's constants should say; the report (gpu_report.py) then measures the op and the
model with it. About 130 settings: two or three minutes on an H100/H200, Triton compiles included.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import itertools
import math
import sys
import time

import torch

from benchmarks import cases

DEPTHWISE = importlib.import_module("liquiddiff.kernels.depthwise")
QUICK_SHAPE = (1, 4, 8, 8)  # the interpreter: seconds, not minutes
CFC = importlib.import_module("liquiddiff.kernels.cfc_relax")
POINTWISE = importlib.import_module("liquiddiff.kernels.pointwise_conv")
HEADS = importlib.import_module("liquiddiff.kernels.cfc_heads")


@contextlib.contextmanager
def configured(module, **values):
    saved = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


class Sweep:
    """Which settings of a grid get timed: all of them, the first (the launcher's own) in quick
    mode, and none past the deadline (``--max-seconds``: what a GPU call has left), so that a
    sweep cut short still prints every table, and says how many settings it left out."""

    def __init__(self, quick: bool, max_seconds: float = math.inf):
        self.quick, self.deadline, self.skipped = quick, time.monotonic() + max_seconds, 0

    def settings(self, grid: dict):
        combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
        combos = combos[:1] if self.quick else combos
        for i, combo in enumerate(combos):
            if time.monotonic() > self.deadline:
                self.skipped += len(combos) - i
                return
            yield combo


def _row(label: str, ms: float, base_ms: float, floor_ms: float | None) -> str:
    floor = f"{ms / floor_ms:.2f}" if floor_ms else "-"
    return f"| {label} | {ms:.4f} | {base_ms / ms:.2f} | {floor} |"


def _table(title: str, rows: list[str]) -> list[str]:
    return ["", f"### {title}", "", "| setting | ms | x faster than baseline | x floor |", "|---|---|---|---|", *rows]


def depthwise_forward(shape, device, gbps, sweep: Sweep) -> list[str]:
    out = []
    B, C, H, W = shape
    x = torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last)
    conv_dtype = cases.default_dtype(device)
    for k in (7, 3):
        w, b = torch.randn(C, 1, k, k, device=device), torch.randn(C, device=device)
        x16, w16, b16 = x.to(conv_dtype), w.to(conv_dtype), b.to(conv_dtype)
        conv = lambda: torch.nn.functional.conv2d(x16, w16, b16, padding=k // 2, groups=C)  # noqa: E731
        cast_conv = lambda: torch.nn.functional.conv2d(x.to(conv_dtype), w16, b16, padding=k // 2, groups=C)  # noqa: E731
        base = cases.time_ms(cast_conv, device)
        floor = (x.numel() * (x.element_size() + torch.finfo(conv_dtype).bits // 8)) / (gbps * 1e6) if gbps else None
        rows = [_row("aten (cuDNN) on autocast's cast copy, cast included (baseline)", base, base, floor),
                _row("aten (cuDNN) on a bf16 input, no cast", cases.time_ms(conv, device), base, floor)]
        grid = {"_FWD_TILE_H": (8, 4, 16), "_FWD_TILE_W": (16, 8), "_MAX_BLOCK_C": (32, 64), "_FWD_WARPS": (8, 4)}
        for setting in sweep.settings(grid):
            with configured(DEPTHWISE, **setting):
                run = lambda: DEPTHWISE.forward(x, [w], [b], conv_dtype)  # noqa: E731
                rows.append(_row(str(setting), cases.time_ms(run, device), base, floor))
        out += _table(f"depthwise {k}x{k} forward, fp32 input -> {conv_dtype}, {list(shape)} channels_last", rows)
    return out


def depthwise_weight_grad(shape, device, gbps, sweep: Sweep) -> list[str]:
    out = []
    B, C, H, W = shape
    conv_dtype = cases.default_dtype(device)
    x = torch.randn(shape, device=device).to(conv_dtype).contiguous(memory_format=torch.channels_last)
    go = torch.randn_like(x)
    for k in (7, 3):
        w = torch.randn(C, 1, k, k, device=device)
        w16 = w.to(conv_dtype)
        aten = lambda: torch.ops.aten.convolution_backward(  # noqa: E731
            go, x, w16, [C], [1, 1], [k // 2] * 2, [1, 1], False, [0, 0], C, [False, True, True])
        base = cases.time_ms(aten, device)
        floor = 2 * x.numel() * x.element_size() / (gbps * 1e6) if gbps else None
        rows = [_row("aten (cuDNN) weight + bias grad (baseline)", base, base, floor)]
        grid = {"_WGRAD_ELEMENTS": (2048, 4096, 8192), "_WGRAD_WARPS": (8, 4), "_WGRAD_MIN_PROGRAMS": (1024, 4096)}
        for setting in sweep.settings(grid):
            with configured(DEPTHWISE, **setting):
                run = lambda: DEPTHWISE.backward([go], x, [w], conv_dtype, [False, True, True])  # noqa: E731
                rows.append(_row(str(setting), cases.time_ms(run, device), base, floor))
        out += _table(f"depthwise {k}x{k} weight + bias gradient, {list(shape)} channels_last", rows)
    return out


def cfc_backward_channels_last(shape, device, gbps, sweep: Sweep) -> list[str]:
    dtype = cases.default_dtype(device)
    timed = {}
    for layout in ("nchw", "channels_last"):
        case = cases.make_op_case("cfc_relax", shape, dtype, device, layout)
        grad = case.upstream[0]
        ins = [case.inputs[n] for n in ("f", "g", "h", "x", "a", "b", "rho", "t")]
        timed[layout] = lambda grad=grad, ins=ins: CFC._backward_kernels(grad, *ins, [True] * 8)
    nchw = cases.time_ms(timed["nchw"], device)
    rows = [_row("NCHW, current tiles (baseline)", nchw, nchw, None)]
    grid = {"_BWD_TILE_CHANNELS_LAST": (512, 256, 1024), "_BWD_PER_THREAD_CHANNELS_LAST": (4, 2, 8)}
    for setting in sweep.settings(grid):
        with configured(CFC, **setting):
            rows.append(_row(str(setting), cases.time_ms(timed["channels_last"], device), nchw, None))
    return _table(f"CfC backward kernel, {dtype}, {list(shape)}: channels_last tiles against NCHW", rows)


def pointwise_conv(shape, device, gbps, sweep: Sweep) -> list[str]:
    B, C, H, W = shape
    dtype = cases.default_dtype(device)
    F = torch.nn.functional
    z = torch.randn(B, 2 * C, H, W, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(C, 2 * C, 1, 1, device=device) / (2 * C) ** 0.5).to(dtype)
    b = torch.randn(C, device=device, dtype=dtype)
    # The block's fp32 residual stream, which the FeedForward's last conv adds (in its epilogue);
    # so its upstream gradient is fp32 too.
    res, go = (torch.randn(B, C, H, W, device=device).contiguous(memory_format=torch.channels_last) for _ in range(2))

    def floor(channels_moved: int):
        return channels_moved * B * H * W * dtype.itemsize / (gbps * 1e6) if gbps else None

    def cudnn_backward():
        a = F.silu(z)
        d_a, d_w, d_b = torch.ops.aten.convolution_backward(
            go.to(dtype), a, w, [C], [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, True])
        return torch.ops.aten.silu_backward(d_a, z), d_w, d_b

    out = []
    for title, base_fn, run, grid, moved in (
        ("forward + residual", lambda: res + F.conv2d(F.silu(z), w, b),
         lambda: POINTWISE.forward(z, w, b, None, None, dtype, res),
         {"_BLOCK_P": (64, 128), "_MAX_BLOCK_N": (128, 64), "_MAX_BLOCK_K": (32, 64), "_WARPS": (4, 8)},
         6 * C),  # read z (2C) and the fp32 residual (2C in bf16 units), write out in fp32 (2C)
        ("backward (input, weight and bias gradients)", cudnn_backward,
         lambda: POINTWISE.backward(go, z, w, None, None, dtype, (True, True, True, False, False)),
         {"_BLOCK_P": (64, 128), "_MAX_WGRAD_BLOCK": (64, 32), "_BWD_WARPS": (8, 4)},
         6 * C),  # read the fp32 grad_out (2C in bf16 units) and z (2C), write d_z (2C)
    ):
        base = cases.time_ms(base_fn, device)
        rows = [_row("SiLU, then aten (cuDNN) (baseline)", base, base, floor(moved))]
        for setting in sweep.settings(grid):
            with configured(POINTWISE, **setting):
                rows.append(_row(str(setting), cases.time_ms(run, device), base, floor(moved)))
        out += _table(f"SiLU -> 1x1 conv {2 * C} -> {C} {title}, {dtype}, {list(shape)} channels_last", rows)
    return out


def cfc_heads(shape, device, gbps, sweep: Sweep) -> list[str]:
    B, C, H, W = shape
    dtype = cases.default_dtype(device)

    def activation(dt=dtype):
        return torch.randn(shape, device=device, dtype=dt).contiguous(memory_format=torch.channels_last)

    # As the model calls it under autocast: bf16 heads' inputs and weights, the fp32 residual stream.
    bb, gh, hh, x, res = activation(), activation(), activation(), activation(torch.float32), activation(torch.float32)
    heads = [((torch.randn(C, C, 1, 1, device=device) / C ** 0.5).to(dtype), torch.randn(C, device=device, dtype=dtype))
             for _ in range(3)]
    gate = (torch.randn(B, C, device=device, dtype=dtype), torch.randn(B, C, device=device, dtype=dtype),
            torch.randn(C, device=device), torch.rand(B, device=device))
    (wf, bf), (wg, bg), (wh, bh) = heads

    def heads_then(cfc):
        f = torch.nn.functional.conv2d(bb, wf, bf)
        g, h = POINTWISE.forward(gh, wg, bg, None, None, dtype), POINTWISE.forward(hh, wh, bh, None, None, dtype)
        return cfc(f, g, h)

    go = activation(torch.float32)
    elements = B * C * H * W
    out = []
    for title, base_fn, run, grid, moved in (
        ("forward", lambda: heads_then(lambda f, g, h: CFC.forward(f, g, h, x, *gate, res)),
         lambda: HEADS.forward(bb, gh, hh, heads, x, *gate, res, dtype),
         {"_BLOCK_P": (32, 64), "_MAX_BLOCK_N": (64, 32), "_MAX_BLOCK_K": (32, 64), "_WARPS": (8, 4)},
         3 * dtype.itemsize + 12),  # read the heads' inputs, x and the residual; write out
        ("backward", lambda: heads_then(lambda f, g, h: CFC.backward(go, f, g, h, x, *gate, [True] * 8)),
         lambda: HEADS.backward(go, bb, gh, hh, heads, x, *gate, dtype, [True] * 8),
         {"_BWD_BLOCK_P": (16, 32), "_BWD_MAX_TILES": (1, 4, 16), "_BWD_WARPS": (8, 4)},
         6 * dtype.itemsize + 12),  # read the upstream, the heads' inputs and x; write d f, d g, d h, d x
    ):
        floor = moved * elements / (gbps * 1e6) if gbps else None
        base = cases.time_ms(base_fn, device)
        rows = [_row("cuDNN f, Triton g and h, then the CfC kernel (baseline)", base, base, floor)]
        for setting in sweep.settings(grid):
            with configured(HEADS, **setting):
                rows.append(_row(str(setting), cases.time_ms(run, device), base, floor))
        out += _table(f"CfC heads + gate {title}, {dtype}, {list(shape)} channels_last", rows)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tune_kernels", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and one setting per section (any machine)")
    p.add_argument("--max-seconds", type=float, default=math.inf,
                   help="time no setting after this many seconds (baselines still run): a sweep that fits the call")
    args = p.parse_args(argv)
    device = cases.default_device()
    quick = args.quick or device.type != "cuda"
    shape = QUICK_SHAPE if quick else cases.OP_SHAPE
    gbps = cases.copy_bandwidth_GBps(device) if device.type == "cuda" else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    lines = [f"## Kernel tile sweeps: {name}, torch {torch.__version__}, "
             f"`python -m benchmarks.tune_kernels{' --quick' if args.quick else ''}`"]
    if gbps:
        lines.append(f"\ncopy bandwidth {gbps:.0f} GB/s; floor = the bytes the op must move / that bandwidth")
    sweep = Sweep(quick, args.max_seconds)
    for section in (depthwise_forward, depthwise_weight_grad, cfc_backward_channels_last, pointwise_conv,
                    cfc_heads):
        lines += section(shape, device, gbps, sweep)
        print("\n".join(lines), flush=True)
        lines = []
    if sweep.skipped:
        print(f"\n**Stopped at --max-seconds {args.max_seconds:g}: {sweep.skipped} settings not timed.**", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
