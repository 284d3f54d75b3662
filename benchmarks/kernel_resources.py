"""Registers and spills of every Triton kernel as its launcher would launch it on an H100/H200
(sm_90), without a GPU: Triton compiles to a cubin on any machine, and its bundled cuobjdump
reads the resource usage. A kernel that spills (stack > 0) or needs so many registers that one
block fills an SM is slow whatever its memory access; this catches that before a GPU is at hand.

    python -m benchmarks.kernel_resources            # sm_90: H100, H200
    python -m benchmarks.kernel_resources --sm 75    # sm_75: the T4 (fp16 training)
    python -m benchmarks.kernel_resources --wide     # the 64-bit-offset variants (items past 2**30)
    python -m benchmarks.kernel_resources --split-batch  # the variants of a batch launched in parts
    python -m benchmarks.kernel_resources --loops "depthwise 7x7 forward"  # its loops' instruction counts

Each launcher runs on meta tensors of the model's sizes ([8, C, 256, 256], bf16-autocast dtypes;
fp16 below sm_80, where Triton's tl.dot has no tensor-core path and the opt-in pointwise kernels spill)
with its kernel replaced by a recorder; the recorded launch is compiled with the specialisation
Triton's launcher would give it (integer arguments equal to 1 become constants, pointers and
multiples of 16 get the divisibility hint), so strides, tiles and warps are the real ones.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not for the interpreter

import torch  # noqa: E402
import triton  # noqa: E402

from liquiddiff.kernels import _tensors  # noqa: E402

SM = 90  # the H100 and H200; warp size 32
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
SHAPE = (8, 64, 256, 256)
_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


class _Recorder:
    """Stands in for a @triton.jit kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


def _module(name: str):
    return importlib.import_module(f"liquiddiff.kernels.{name}")


def record(module_name: str, kernel_name: str, launch) -> list[tuple]:
    """(kernel, args, kwargs, grid) of each launch of ``kernel_name`` that ``launch()`` makes."""
    module = _module(module_name)
    recorder = _Recorder(getattr(module, kernel_name))
    setattr(module, kernel_name, recorder)
    try:
        launch()
    finally:
        setattr(module, kernel_name, recorder.kernel)
    return [(recorder.kernel, args, kwargs, grid) for grid, args, kwargs in recorder.calls]


def _specialise(kernel, args, kwargs):
    """Triton's launcher specialisation of one call: (signature, constexprs, attrs, options)."""
    params = [p for p in kernel.params if not p.is_constexpr]
    signature, constexprs, attrs = {}, {}, {}
    for index, (param, value) in enumerate(zip(params, args)):
        if isinstance(value, torch.Tensor):
            signature[param.name] = "*" + _DTYPES[value.dtype]
            attrs[(kernel.arg_names.index(param.name),)] = [["tt.divisibility", 16]]  # meta: data_ptr 0
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            if value == 1:
                signature[param.name], constexprs[param.name] = "constexpr", 1
                continue
            signature[param.name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(kernel.arg_names.index(param.name),)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: argument {param.name} = {value!r}")
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "enable_fp_fusion") if k in kwargs}
    for name, value in kwargs.items():
        signature[name], constexprs[name] = "constexpr", value
    return signature, constexprs, attrs, options


def _cuobjdump(kernel, args, kwargs, sm: int, flag: str) -> tuple[str, dict]:
    """(``cuobjdump flag`` of the sm_``sm`` cubin of one recorded launch, its compile options)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = _specialise(kernel, args, dict(kwargs))
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", sm, 32), options=options)
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([CUOBJDUMP, flag, f.name], capture_output=True, text=True, check=True).stdout, options


def resources(kernel, args, kwargs, sm: int = SM) -> dict[str, int]:
    """{'registers', 'stack', 'shared', 'num_warps'} of the sm_``sm`` cubin of one recorded launch."""
    text, options = _cuobjdump(kernel, args, kwargs, sm, "--dump-resource-usage")
    found = dict(re.findall(r"(REG|STACK|SHARED):(\d+)", text))
    return {"registers": int(found["REG"]), "stack": int(found["STACK"]), "shared": int(found["SHARED"]),
            "num_warps": options.get("num_warps", 4)}


_SASS_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def loops(sass: str) -> list[dict]:
    """Every loop of a kernel's SASS (a branch back to a lower address), innermost first: its
    address range, instructions, and the FFMA (fp32 multiply-adds), LDG (global loads) and BAR
    (barriers) among them. Per iteration and thread, their ratio is what an issue-bound loop
    costs per multiply-add."""
    code = [(int(m[1], 16), m[2], m[3]) for m in map(_SASS_LINE.match, sass.splitlines()) if m]
    found = []
    for address, opcode, operands in code:
        target = re.match(r"\s*(0x[0-9a-f]+)", operands)
        if opcode.startswith("BRA") and target and int(target[1], 16) < address:
            body = [op.split(".")[0] for a, op, _ in code if int(target[1], 16) <= a <= address]
            found.append({"start": int(target[1], 16), "end": address, "instructions": len(body),
                          **{op: body.count(op) for op in ("FFMA", "LDG", "BAR")}})
    return sorted(found, key=lambda loop: loop["instructions"])


def _meta(shape, dtype, layout="channels_last"):
    t = torch.empty(shape, dtype=dtype, device="meta")
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t


def launches(half: torch.dtype = torch.bfloat16, size: tuple = SHAPE) -> list[tuple[str, str, str, callable]]:
    """(label, module, kernel, launch) for the model's calls at ``size``, with ``half`` as the
    autocast dtype."""
    B, C, H, W = size
    dw, cfc, adaln = _module("depthwise"), _module("cfc_relax"), _module("adaln")
    out = []
    w7, w3 = (torch.empty(C, 1, k, k, device="meta") for k in (7, 3))
    bias = torch.empty(C, device="meta")
    x32, d32 = _meta(size, torch.float32), _meta(size, torch.float32)
    g16, a16 = _meta(size, half), _meta(size, half)
    out += [  # the CfC backbone's 7x7 (its fp32 input cast by the launcher), then its g/h pair
        ("depthwise 7x7 forward", "depthwise", "_dwconv_kernel",
         lambda: dw.forward(x32, [w7], [bias], half)),
        ("depthwise 7x7 input grad + CfC's dx", "depthwise", "_dwconv_kernel",
         lambda: dw.backward([g16], x32, [w7], half, [True, False, False], addend=d32)),
        ("depthwise 7x7 spatial-mix input grad + residual, pixel-sum grads", "depthwise", "_dwconv_kernel",
         lambda: dw.backward([g16], a16, [w7], half, [True, False, False], addend=d32,
                             channel_addend=torch.empty(B, C, device="meta"))),
        ("depthwise 7x7 weight grad", "depthwise", "_dwconv_wgrad_kernel",
         lambda: dw.backward([g16], x32, [w7], half, [False, True, True])),
        ("depthwise 3x3 g/h pair forward", "depthwise", "_dwconv_kernel",
         lambda: dw.forward(a16, [w3, w3], [bias, bias], half)),
        ("depthwise 3x3 g/h input grad+SiLU'", "depthwise", "_dwconv_kernel",
         lambda: dw.backward([g16, g16], a16, [w3, w3], half, [True, False, False], silu_input=g16, addend=d32)),
        ("depthwise 3x3 g/h weight grad", "depthwise", "_dwconv_wgrad_kernel",
         lambda: dw.backward([g16, g16], a16, [w3, w3], half, [False, True, True])),
    ]
    for layout in ("channels_last", "nchw"):
        acts = [_meta(size, half, layout) for _ in range(3)] + [_meta(size, torch.float32, layout)]
        params = [torch.empty(B, C, dtype=half, device="meta")] * 2 + [
            torch.empty(C, device="meta"), torch.empty(B, device="meta")]
        go = _meta(size, torch.float32, layout)
        out += [
            (f"CfC forward ({layout})", "cfc_relax", "_cfc_relax_fwd_kernel",
             lambda acts=acts, params=params, r=go: cfc._forward_kernels(*acts, *params, r)),
            (f"CfC forward + the spatial mix's bf16 copy and pixel sums ({layout})", "cfc_relax",
             "_cfc_relax_fwd_kernel",
             lambda acts=acts, params=params, r=go: cfc._forward_with_copy_kernels(*acts, *params, r, half)),
            (f"CfC forward, n remade from u, + the bf16 copy and pixel sums ({layout})", "cfc_relax",
             "_cfc_relax_fwd_kernel",
             lambda acts=acts, params=params, r=go: cfc._forward_normalized_kernels(
                 *acts[:3], *params, r, *[torch.empty(B, H * W, device="meta")] * 2, *params[:2], half)),
            (f"CfC backward ({layout})", "cfc_relax", "_cfc_relax_bwd_kernel",
             lambda acts=acts, params=params, go=go: cfc._backward_kernels(go, *acts, *params, [True] * 8)),
            (f"CfC backward, n remade from u ({layout})", "cfc_relax", "_cfc_relax_bwd_kernel",
             lambda acts=acts, params=params, go=go: cfc._backward_normalized_kernels(
                 go, *acts[:3], *params, go, *[torch.empty(B, H * W, device="meta")] * 2, *params[:2], [True] * 8)),
        ]
    ms = _module("modulated_silu")
    for layout in ("channels_last", "nchw"):
        z, scale = _meta(size, half, layout), torch.empty(B, C, dtype=half, device="meta")
        out += [
            (f"modulated SiLU forward ({layout})", "modulated_silu", "_modulated_silu_fwd_kernel",
             lambda z=z, scale=scale: ms.forward(z, scale, scale, half)),
            (f"modulated SiLU backward ({layout})", "modulated_silu", "_modulated_silu_bwd_kernel",
             lambda z=z, scale=scale: ms.backward(z, z, scale, scale, [True, True, True])),
        ]
    out.append(("SiLU backward, 3 gradients summed", "modulated_silu", "_modulated_silu_bwd_kernel",
                lambda: ms.silu_backward([g16, g16, g16], g16)))
    per_channel = torch.empty(B, C, device="meta")[:, :, None, None].expand(size)
    out.append(("gradient sum (spatial-mix input, after cuDNN)", "modulated_silu", "_modulated_silu_bwd_kernel",
                lambda: ms.sum_gradients([x32, g16, per_channel], torch.float32)))
    out.append(("channel sum (a cuDNN conv's bias gradient)", "modulated_silu", "_modulated_silu_bwd_kernel",
                lambda: ms.channel_sum(g16, half)))
    out.append(("SiLU backward + the bias gradient of its input's conv", "modulated_silu", "_modulated_silu_bwd_kernel",
                lambda: ms.silu_backward_bias_grad([g16], g16)))
    out.append(("cast + channel sum (a cuDNN conv's fp32 upstream, its bias gradient)", "modulated_silu",
                "_modulated_silu_bwd_kernel", lambda: ms.cast_with_channel_sum(x32, half)))
    for channels in (64, 256):
        shape = (B, channels, H // (channels // 64), W // (channels // 64))
        x, r = _meta(shape, half), _meta(shape, torch.float32)
        scale = torch.empty(B, channels, dtype=half, device="meta")
        s, stats = _meta(shape, torch.float32), torch.empty(B, shape[2] * shape[3], device="meta")
        out += [
            (f"AdaLN forward C={channels}", "adaln", "_adaln_fwd_kernel",
             lambda x=x, r=r, scale=scale: adaln._forward_kernels(x, scale, scale, 1e-6, r, None, None)),
            (f"AdaLN forward C={channels} + a copy in the conv dtype (norm1)", "adaln", "_adaln_fwd_kernel",
             lambda r=r, scale=scale: adaln._forward_kernels(r, scale, scale, 1e-6, None, None, half)),
            (f"AdaLN backward C={channels}", "adaln", "_adaln_bwd_kernel",
             lambda s=s, scale=scale, stats=stats: adaln._backward_kernels(
                 s, s, s, scale, stats, stats, torch.float32, half, True, True)),
            (f"AdaLN backward C={channels}, n's two gradients (norm1 in the CfC node)", "adaln", "_adaln_bwd_kernel",
             lambda s=s, x=x, scale=scale, stats=stats: adaln._backward_kernels(
                 s, s, s, scale, stats, stats, torch.float32, None, True, True, x)),
        ]
    merge = _module("merged_depthwise")
    branches = [torch.empty(256, 1, k, k, device="meta") for k in (3, 5, 7)]
    biases = [torch.empty(256, device="meta")] * 3
    out += [
        ("merged 3x3+5x5+7x7 kernel, C=256", "merged_depthwise", "_merge_fwd_kernel",
         lambda: merge._forward_kernels(branches, biases)),
        ("merged kernel's branch grads, C=256", "merged_depthwise", "_merge_bwd_kernel",
         lambda: merge._backward_kernels(torch.empty(256, 1, 7, 7, device="meta"), biases[0], branches, biases)),
    ]
    shift_op = _module("context_shift")
    vec, vec16 = torch.empty(B, 256, device="meta"), torch.empty(B, 256, dtype=half, device="meta")
    w16, b16 = torch.empty(256, 256, 1, 1, dtype=half, device="meta"), torch.empty(256, dtype=half, device="meta")
    out += [
        ("context shift forward, C=256", "context_shift", "_context_shift_fwd_kernel",
         lambda: shift_op._forward_kernels(vec, w16, b16, vec16, vec16, H * W, half)),
        ("context shift backward, C=256", "context_shift", "_context_shift_bwd_kernel",
         lambda: shift_op._backward_kernels(vec16, vec, w16, vec16, vec, H * W, half, half)),
    ]
    pw = _module("pointwise_conv")
    hidden, w_ffn = _meta((B, 2 * C, H, W), half), torch.empty(C, 2 * C, 1, 1, dtype=half, device="meta")
    w_mix, b16 = torch.empty(C, C, 1, 1, dtype=half, device="meta"), torch.empty(C, dtype=half, device="meta")
    mod = torch.empty(B, C, dtype=half, device="meta")
    w_inner = torch.empty(2 * C, C, 1, 1, dtype=half, device="meta")
    b_inner = torch.empty(2 * C, dtype=half, device="meta")
    out += [  # opt-in: the FeedForward's last conv (with the block's residual), the spatial mix's (modulated, NCHW)
        ("SiLU -> 1x1 conv forward + residual, 128 -> 64", "pointwise_conv", "_silu_conv1x1_kernel",
         lambda: pw._forward_kernels(hidden, w_ffn, b16, None, None, half, x32)),
        ("modulated SiLU -> 1x1 conv forward (nchw)", "pointwise_conv", "_silu_conv1x1_kernel",
         lambda: pw._forward_kernels(_meta(size, half, "nchw"), w_mix, b16, mod, mod, half)),
        ("SiLU -> 1x1 conv input grad, 128 -> 64", "pointwise_conv", "_silu_conv1x1_input_grad_kernel",
         lambda: pw._backward_kernels(g16, hidden, w_ffn, None, None, half, [True, False, False, False, False])),
        ("SiLU -> 1x1 conv weight grad, 128 -> 64", "pointwise_conv", "_silu_conv1x1_weight_grad_kernel",
         lambda: pw._backward_kernels(g16, hidden, w_ffn, None, None, half, [False, True, True, False, False])),
        ("modulated SiLU -> 1x1 conv input grad", "pointwise_conv", "_silu_conv1x1_input_grad_kernel",
         lambda: pw._backward_kernels(g16, a16, w_mix, mod, mod, half, [True, False, False, True, True])),
        # without gradient: the CfC backbone's 1x1, SiLU in the epilogue (auto); the g or h
        # head, its 3x3 in the prologue (opt-in, with the Triton depthwise kernels)
        ("1x1 conv -> SiLU forward", "pointwise_conv", "_silu_conv1x1_kernel",
         lambda: pw._conv1x1_kernels(a16, w_mix, b16, half, True)),
        # with gradient: the same writing the conv's output too (the backbone's z; the
        # FeedForward's hidden tensor remade in backward), and the FeedForward's first conv
        ("1x1 conv forward, 64 -> 128", "pointwise_conv", "_silu_conv1x1_kernel",
         lambda: pw._conv1x1_kernels(a16, w_inner, b_inner, half, False)),
        ("1x1 conv -> its output and SiLU forward, 64 -> 128", "pointwise_conv", "_silu_conv1x1_kernel",
         lambda: pw._conv1x1_and_silu_kernels(a16, w_inner, b_inner, half)),
        # opt-in, without gradient: the FeedForward's two convs in one pass, at the first and
        # (the widest it takes) the second level
        ("FeedForward forward + residual, 64 -> 128 -> 64", "pointwise_conv", "_feedforward_kernel",
         lambda: pw._feedforward_kernels(a16, w_inner, b_inner, w_ffn, b16, half, x32)),
        ("FeedForward forward + residual, 128 -> 256 -> 128", "pointwise_conv", "_feedforward_kernel",
         lambda: pw._feedforward_kernels(_meta((B, 128, H // 2, W // 2), half),
                                         torch.empty(256, 128, 1, 1, dtype=half, device="meta"),
                                         torch.empty(256, dtype=half, device="meta"),
                                         torch.empty(128, 256, 1, 1, dtype=half, device="meta"),
                                         torch.empty(128, dtype=half, device="meta"), half,
                                         _meta((B, 128, H // 2, W // 2), torch.float32))),
        ("depthwise 3x3 -> SiLU -> 1x1 conv forward", "pointwise_conv", "_silu_conv1x1_kernel",
         lambda: pw._depthwise_forward_kernels(a16, torch.empty(C, 1, 3, 3, dtype=half, device="meta"), b16, w_mix,
                                               b16, half)),
    ]
    heads = _module("cfc_heads")
    gate = [torch.empty(B, C, dtype=half, device="meta")] * 2 + [torch.empty(C, device="meta"),
                                                                 torch.empty(B, device="meta")]
    head_args = (a16, a16, a16, w_mix, b16, w_mix, b16, w_mix, b16, x32, *gate)
    out += [  # opt-in, with the pointwise kernels: the CfC's f, g, h heads and its gate in one kernel
        ("CfC heads + gate forward, C=64", "cfc_heads", "_cfc_heads_relax_kernel",
         lambda: heads._forward_kernels(*head_args, x32, half)),
        ("CfC heads + gate backward, C=64", "cfc_heads", "_cfc_heads_relax_bwd_kernel",
         lambda: heads._backward_kernels(d32, *head_args, half, [True] * 8)),
    ]
    return out


def report(sm: int = SM) -> list[tuple[str, dict]]:
    """Every launch compiled for sm_``sm``, in bf16, or in fp16 below sm_80 (no bf16 arithmetic:
    GPUs before the A100 train in fp16)."""
    rows = []
    for label, module, kernel, launch in launches(torch.bfloat16 if sm >= 80 else torch.float16):
        # One launch per label; a batch launched in parts (--split-batch) compiles one variant for
        # every part: the last one's, whose first item, like a real part's, is no multiple of 16.
        kernel_fn, args, kwargs, _ = record(module, kernel, launch)[-1]
        rows.append((label, resources(kernel_fn, args, kwargs, sm)))
    return rows


def launch_grids(size: tuple) -> list[tuple[str, tuple]]:
    """(label, grid) of every launch at ``size`` (meta tensors: any size, no memory)."""
    return [(label, tuple(grid)) for label, module, kernel, launch in launches(size=size)
            for _, _, _, grid in record(module, kernel, launch)]


def print_loops(label: str, sm: int, variants: str) -> int:
    chosen = [(module, kernel, launch) for name, module, kernel, launch in launches(torch.bfloat16 if sm >= 80
                                                                                     else torch.float16)
              if name == label]
    if not chosen:
        print(f"--loops: no launch labelled {label!r} (the first column of the table)", file=sys.stderr)
        return 2
    module, kernel, launch = chosen[0]
    kernel_fn, args, kwargs, _ = record(module, kernel, launch)[-1]
    sass, _ = _cuobjdump(kernel_fn, args, kwargs, sm, "-sass")
    print(f"{label}: loops of its sm_{sm} SASS, Triton {triton.__version__}{variants}, innermost first")
    for loop in loops(sass):
        print(f"0x{loop['start']:04x}-0x{loop['end']:04x}: {loop['instructions']} instructions, {loop['FFMA']} FFMA, "
              f"{loop['LDG']} LDG, {loop['BAR']} BAR")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernel_resources", description=__doc__.split("\n")[0])
    p.add_argument("--sm", type=int, default=SM, help="compute capability to compile for, e.g. 90 or 75")
    p.add_argument("--wide", action="store_true",
                   help="compile the variants with 64-bit offsets inside a batch item (items past 2**30 elements)")
    p.add_argument("--split-batch", action="store_true",
                   help="compile the variants that a batch past 65535 items is launched with, in parts")
    p.add_argument("--loops", metavar="LABEL",
                   help="instead: the loops of that launch's SASS (a label of the table, e.g. 'depthwise 7x7 "
                        "forward'), with their instructions, FMAs, global loads and barriers")
    args = p.parse_args(argv)
    if args.wide:  # what the launchers choose for an item that large, at the model's size
        _tensors.wide_offsets = lambda *tensors: True
    if args.split_batch:  # two parts, of 7 items and 1
        _tensors.MAX_GRID_BATCH = SHAPE[0] - 1
    variants = "".join(note for on, note in ((args.wide, ", 64-bit offsets"), (args.split_batch, ", batch in parts"))
                       if on)
    if args.loops:
        return print_loops(args.loops, args.sm, variants)
    print(f"sm_{args.sm}, Triton {triton.__version__}, launches at {list(SHAPE)} in "
          f"{'bf16' if args.sm >= 80 else 'fp16'}{variants}: registers per thread, spill stack bytes, shared bytes")
    for label, r in report(args.sm):
        blocks = 65536 // (r["registers"] * 32 * r["num_warps"])
        print(f"{label:<40} {r['num_warps']:>2} warps: {r['registers']:>3} registers, stack {r['stack']}, "
              f"shared {r['shared']}, {blocks} block(s) per SM by registers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
