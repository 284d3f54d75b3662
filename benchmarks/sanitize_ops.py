"""The fused ops at small awkward shapes: the program compute-sanitizer's memcheck runs.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 9 \\
        python -m benchmarks.sanitize_ops

Forward and backward of the fused ops (CfC and AdaLN with and without a residual, the modulated
SiLU, the Triton depthwise convs 7x7 and 3x3, the CfC heads' g/h pair, the CfC branch on the
pointwise kernels with its heads + gate kernels; the forward alone of the CfC's g/h head with
its 3x3 in the 1x1 conv's prologue; first the spatial mix's fp32 input (its bf16
copy and pixel sums in one Triton pass or by the CfC kernel that writes it, its Triton depthwise
conv, cast by the launcher; the CfC kernels remaking their x from it as AdaLN's output, the
AdaLN backward with two upstream gradients, the bias-gradient sums, the 1x1 conv writing its
output and SiLU both), its
merged depthwise kernel and context shift) at shapes whose channel and pixel counts are not multiples of any block size (C = 3, 65,
130; H*W = 35, 117, 1320), in NCHW,
channels_last and channel slices of a wider tensor, in bf16, fp32 and the autocast mix (bf16
activations, fp32 rho / t / residual). Launcher output buffers start as NaN, so an element no
program writes shows up as a mismatch. Each output and gradient is compared with the reference
on fp64 upcasts of the same inputs, computed on the CPU (the GPU runs little besides the fused
kernels). ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` gives every tensor its own allocation, so memcheck
sees an access past the end of a tensor instead of inside the caching allocator's pool.

Exit codes: 0 all cases ran and matched; 1 a mismatch or an error; 2 the fused ops do not run
Triton here (nothing of ours to check). Under compute-sanitizer ``--error-exitcode 9``, 9 means
memcheck found bad accesses. Without CUDA it runs fp32 under the Triton interpreter (a check of
this script, not of memory safety).
"""
from __future__ import annotations

import argparse
import importlib
import sys
import time

import torch

from benchmarks import cases
from liquiddiff import functional, kernels
from liquiddiff.kernels import depthwise, pointwise_conv, runtime

# The modules (the package's attributes of those names are the ops).
modulated_silu = importlib.import_module("liquiddiff.kernels.modulated_silu")
cfc_relax = importlib.import_module("liquiddiff.kernels.cfc_relax")
adaln = importlib.import_module("liquiddiff.kernels.adaln")

SHAPES = ((2, 130, 33, 40), (2, 65, 9, 13), (1, 3, 5, 7))
# Looser than the parity tests' (bf16 1e-2, fp32 1e-5): tiny C makes LayerNorm ill-conditioned,
# and this program looks for wrong or missing writes (errors of order 1, or NaN), not precision.
TOL = {"bf16": 2e-2, "fp32": 1e-4, "mixed": 2e-2}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "mixed": torch.bfloat16}
MIXED_CAST = {"rho": torch.float32, "t": torch.float32, "residual": torch.float32}


def case_list(on_gpu: bool) -> list[tuple]:
    """(op, shape, layout, dtype name), most telling first (a time limit cuts the tail)."""
    ops = cases.ALL_OP_NAMES
    out = []
    if on_gpu:
        for shape in SHAPES:
            for layout in cases.LAYOUTS:
                out += [(op, shape, layout, "bf16") for op in ops]
        mid = SHAPES[1]
        out += [(op, mid, layout, "bf16") for layout in cases.SLICE_LAYOUTS for op in ops]
        # The ops with an input autocast leaves in fp32 (MIXED_CAST: CfC's rho and t, residuals).
        mixed = [op for op in ops if cases.OPS[op].residual or cases.OPS[op].reference is functional.cfc_relax]
        out += [(op, mid, layout, "mixed") for layout in cases.LAYOUTS for op in mixed]
        out += [(op, mid, layout, "fp32") for layout in cases.LAYOUTS for op in ops]
    else:  # the interpreter: fp32 only, small shapes
        for shape in SHAPES[1:]:
            for layout in cases.LAYOUTS:
                out += [(op, shape, layout, "fp32") for op in ops]
        out += [(op, SHAPES[2], layout, "fp32") for layout in cases.SLICE_LAYOUTS for op in ops]
    return out


def _small_op_results(op, reference, tensors: list, ups: list, device: torch.device, **kwargs) -> list:
    """[(op's, reference's) output or gradient], the op on ``device``, the reference on the CPU."""
    results = []
    for dev, fn in ((device, op), (torch.device("cpu"), reference)):
        ins = [t.to(dev).requires_grad_(True) for t in tensors]
        out = fn(*ins, **kwargs)
        outs = out if isinstance(out, tuple) else (out,)
        grads = torch.autograd.grad(outs, ins, [u.to(dev) for u in ups])
        results.append([t.detach().cpu() for t in (*outs, *grads)])
    cases.sync(device)
    return list(zip(*results))


def small_op_checks(channels: int, device: torch.device) -> list[tuple[str, str, bool]]:
    """The kernels of [C]- and [B, C]-sized tensors at ``channels`` (fp32): the merged depthwise
    kernel of the spatial mix (3x3, 5x5 and 7x7 branches, channels_last weights), bitwise, and
    its context shift (strided scale and shift, as a projection's chunks), to 1e-5: (op, what, ok)."""
    gen = torch.Generator().manual_seed(channels)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    weights = [randn(channels, 1, k, k).contiguous(memory_format=torch.channels_last) for k in (3, 5, 7)]
    merged = _small_op_results(lambda *t: kernels.merged_depthwise_weight(t[:3], t[3:]),
                               lambda *t: functional.merged_depthwise_weight(t[:3], t[3:]),
                               weights + [randn(channels) for _ in weights],
                               [randn(channels, 1, 7, 7), randn(channels)], device)
    scale, shift = randn(2, 2 * channels).chunk(2, dim=1)
    shifted = _small_op_results(kernels.context_shift, functional.context_shift,
                                [400 * randn(2, channels), randn(channels, channels, 1, 1), randn(channels), scale,
                                 shift], [randn(2, channels)], device, pixels=400)
    return [("merged_depthwise_weight", f"C={channels} bitwise", all(torch.equal(a, b) for a, b in merged)),
            ("context_shift", f"C={channels}", all(cases.rel_err(a, b) <= 1e-5 for a, b in shifted))]


def _cfc_operands(x: torch.Tensor, dtype: torch.dtype, gen: torch.Generator) -> tuple:
    """Random (f, g, h), (a, b), rho and t for a CfC kernel call on ``x``-shaped activations: the
    heads and the gate parameters in ``dtype``, the heads in x's layout."""
    B, C = x.shape[:2]
    fmt = torch.channels_last if x.stride(1) == 1 and C > 1 else torch.contiguous_format
    heads = [torch.randn(x.shape, generator=gen).to(x.device, dtype).contiguous(memory_format=fmt) for _ in range(3)]
    gate = [torch.randn(B, C, generator=gen).to(x.device, dtype) for _ in range(2)]
    return heads, gate, torch.randn(C, generator=gen).to(x.device), torch.rand(B, generator=gen).to(x.device)


def _cfc_copy_check(x: torch.Tensor, dtype: torch.dtype, gen: torch.Generator) -> tuple[str, str, bool]:
    """The CfC kernel writing the spatial mix's input ``x``-shaped (its fp32 output, the copy in
    ``dtype`` and the pixel sums, ``cfc_relax.forward(copy_dtype=)``): the output as without the
    copy, the copy exactly its cast, the sums against fp64's."""
    heads, gate, rho, t = _cfc_operands(x, dtype, gen)
    residual = torch.randn(x.shape, generator=gen).to(x.device)
    args = (*heads, x, *gate, rho, t, residual)
    out, copy, pixel_sum = cfc_relax.forward(*args, copy_dtype=dtype)
    plain = cfc_relax.forward(*args)
    cases.sync(x.device)
    ok = (torch.equal(out, plain) and torch.equal(copy, out.to(dtype))
          and cases.rel_err(pixel_sum.cpu(), out.cpu().double().sum((2, 3))) <= TOL["fp32"])
    return "cfc_relax", f"forward with the spatial mix's copy and pixel sums {list(x.shape)}", ok


def _normalized_cfc_checks(u: torch.Tensor, dtype: torch.dtype, gen: torch.Generator) -> list[tuple[str, str, bool]]:
    """The fused block's norm1 + CfC node on the fp32 residual ``u``: the CfC kernels remaking
    x = AdaLN(u) from AdaLN's statistics (``normalization=``; x itself NaN, never read) against
    the same kernels reading x as the AdaLN kernel wrote it, forward (with the copy in ``dtype``)
    and backward; then the AdaLN backward adding a second upstream gradient (in ``dtype``) as it
    loads the first, against the sum made first."""
    B, C = u.shape[:2]
    heads, gate, rho, t = _cfc_operands(u, dtype, gen)
    scale, shift = (torch.randn(B, C, generator=gen).to(u.device, dtype) for _ in range(2))
    x, mean, rstd = adaln.normalize(u, scale, shift, 1e-6)
    unread = torch.full_like(x, float("nan"))
    normalization = (mean, rstd, scale, shift)
    grad_out = torch.empty_like(u).copy_(torch.randn(u.shape, generator=gen))  # in u's layout
    forward = [cfc_relax.forward(*heads, x_in, *gate, rho, t, u, copy_dtype=dtype, normalization=norm)
               for x_in, norm in ((x, None), (unread, normalization))]
    backward = [cfc_relax.backward(grad_out, *heads, x_in, *gate, rho, t, [True] * 8, normalization=norm)
                for x_in, norm in ((x, None), (unread, (u, *normalization)))]
    second = grad_out.to(dtype)
    summed = [adaln.normalize_backward(grads, None, u, mean, rstd, scale, shift.dtype, (True, True, True))
              for grads in ([grad_out, second], [grad_out + second.float()])]
    cases.sync(u.device)

    def close(pairs):
        return all(a is b or cases.rel_err(a.cpu(), b.cpu()) <= TOL["fp32"] for a, b in pairs)

    return [("cfc_relax", f"forward, x remade from the residual {list(u.shape)}", close(zip(*forward))),
            ("cfc_relax", f"backward, x remade from the residual {list(u.shape)}", close(zip(*backward))),
            ("adaln_modulate", f"backward, two upstream gradients {list(u.shape)}", close(zip(*summed)))]


def fp32_input_checks(device: torch.device) -> list[tuple[str, str, bool]]:
    """The spatial mix's fp32 input in one pass, as the model runs it under autocast (which the
    op cases do not): copy and pixel sums (``cast_with_pixel_sum``, or the CfC kernel that writes
    it, ``_cfc_copy_check``), then the Triton depthwise conv of the fp32 input (cast by its
    launcher); and its sum per channel (``channel_sum``, the kernel of every cuDNN conv's bias
    gradient), with the cast of a wider upstream (``cast_with_channel_sum``) and after SiLU's
    backward (``silu_backward_bias_grad``). At each shape and layout: the copy exactly x.to, the
    conv and the sums against fp64 references: (op, what, ok)."""
    on_gpu = device.type == "cuda"
    dtype = cases.default_dtype(device) if on_gpu else torch.float64
    sum_tol = TOL["fp32"] if dtype == torch.float64 else TOL["bf16"]  # sums returned in ``dtype``
    out = []
    for shape in SHAPES if on_gpu else SHAPES[1:]:  # the interpreter: small shapes, as case_list
        gen = torch.Generator().manual_seed(shape[1])
        x = torch.randn(shape, generator=gen)
        w, b = 0.2 * torch.randn(shape[1], 1, 7, 7, generator=gen), torch.randn(shape[1], generator=gen)
        want_sum, want_copy = x.double().sum((2, 3)), x.to(dtype)
        want_conv = functional.depthwise_conv(want_copy.double(), w.to(dtype).double(), b.to(dtype).double())
        for layout in cases.LAYOUTS:
            xd = (x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x).to(device)
            local, = depthwise.forward(xd, [w.to(device, dtype)], [b.to(device, dtype)], dtype)
            cast, cast_sum = modulated_silu.cast_with_pixel_sum(xd, dtype)
            bias_grad = modulated_silu.channel_sum(xd, torch.float32)
            rounded, rounded_sum = modulated_silu.cast_with_channel_sum(xd, dtype)
            d_z, d_z_sum = modulated_silu.silu_backward_bias_grad([xd], rounded)
            cases.sync(device)
            what = f"{list(shape)} {layout} fp32 -> {str(dtype)[6:]}"
            out += [("depthwise_conv", f"fp32 input {what}", cases.rel_err(local.cpu(), want_conv) <= TOL["bf16"]),
                    ("modulated_silu", f"cast with pixel sums {what}",
                     torch.equal(cast.cpu(), want_copy) and cases.rel_err(cast_sum.cpu(), want_sum) <= TOL["fp32"]),
                    ("conv_bias_grad", f"channel sum {what}",
                     cases.rel_err(bias_grad.cpu(), want_sum.sum(0)) <= TOL["fp32"]),
                    ("conv_bias_grad", f"cast with channel sum {what}",
                     torch.equal(rounded.cpu(), want_copy)
                     and cases.rel_err(rounded_sum.cpu().double(), want_copy.double().sum((0, 2, 3))) <= sum_tol),
                    ("conv_bias_grad", f"SiLU backward with the bias gradient {what}",
                     cases.rel_err(d_z_sum.cpu().double(), d_z.cpu().double().sum((0, 2, 3))) <= sum_tol)]
            op, check, ok = _cfc_copy_check(xd, dtype, gen)
            out.append((op, f"{check} {layout}", ok))
            out.append(_conv_outputs_check(xd.to(dtype), gen, what))
            out += [(op, f"{check} {layout}", ok) for op, check, ok in _normalized_cfc_checks(xd, dtype, gen)]
    return out


def _conv_outputs_check(x: torch.Tensor, gen: torch.Generator, what: str) -> tuple[str, str, bool]:
    """The 1x1 conv of ``x`` to twice its channels with its output and SiLU both written
    (``pointwise_conv.conv1x1_and_silu_forward``, the FeedForward's hidden tensor remade in
    backward; the CfC backbone's z in training), and alone (``conv1x1_forward``, its forward):
    the two conv outputs equal, both against fp64."""
    channels = x.shape[1]
    w = (torch.randn(2 * channels, channels, 1, 1, generator=gen) / channels ** 0.5).to(x.device, x.dtype)
    b = torch.randn(2 * channels, generator=gen).to(x.device, x.dtype)
    plain = pointwise_conv.conv1x1_forward(x, w, b, x.dtype)
    pre, activated = pointwise_conv.conv1x1_and_silu_forward(x, w, b, x.dtype)
    cases.sync(x.device)
    exact = [t.cpu().double() for t in (x, w, b)]
    tol = TOL["fp32"] if x.dtype == torch.float64 else TOL["bf16"]
    ok = (torch.equal(pre, plain) and cases.rel_err(plain.cpu(), functional.conv1x1(*exact)) <= tol
          and cases.rel_err(activated.cpu(), functional.conv1x1_silu(*exact)) <= tol)
    return "pointwise_conv", f"1x1 conv, its output and SiLU both {what}", ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sanitize_ops", description=__doc__.split("\n")[0])
    p.add_argument("--max-seconds", type=float, default=0, help="start no new case after this (0: no limit)")
    args = p.parse_args(argv)
    t0 = time.monotonic()
    device = cases.default_device()
    on_gpu = device.type == "cuda"
    cases.ieee_fp32_convolutions()  # the fp32 cases' cuDNN convs (the cfc_heads f head), held to 1e-4
    backends = kernels.backend_report(device)
    name = torch.cuda.get_device_name(device) if on_gpu else "CPU (Triton interpreter)"
    print(f"sanitize_ops: {name}, torch {torch.__version__}; backends: "
          + ", ".join(f"{op}={b.name}" for op, b in backends.items()), flush=True)
    # An opt-in op's cases force its kernels (cases.triton_depthwise_conv): its default is not asked.
    # An op set to torch on purpose (gpu_check.sh does it for a kernel whose gpu tests failed)
    # is left out: the others are still checked.
    off = [op for op in backends if runtime.policy(op) == "torch"]
    if off:
        print(f"sanitize_ops: {', '.join(off)} set to torch ({runtime.ENV_VAR}): not checked", flush=True)
    if not all(b.is_triton for op, b in backends.items() if op not in runtime.OPT_IN and op not in off):
        print("sanitize_ops: WARNING: a fused op runs the PyTorch reference here, not Triton: "
              + "; ".join(f"{op}: {b.reason}" for op, b in backends.items()), flush=True)
        return 2
    try:
        from liquiddiff.kernels import _tensors

        _tensors.poison_outputs = True  # launcher buffers start as NaN
    except (ImportError, AttributeError):
        print("sanitize_ops: note: output poisoning unavailable", flush=True)

    todo = case_list(on_gpu)
    ran = mismatches = errors = 0
    stopped = None
    # The [C]- and [B, C]-sized kernels first: milliseconds, outside the time-limited list.
    small = [check for channels in sorted({shape[1] for shape in SHAPES}) for check in small_op_checks(channels, device)
             if check[0] not in off]
    small += [check for check in fp32_input_checks(device) if check[0] not in off]
    for op, what, ok in small:
        ran += 1
        mismatches += not ok
        print(f"{'ok      ' if ok else 'MISMATCH'} {op} {what}", flush=True)
    for i, (op, shape, layout, dname) in enumerate(todo):
        if args.max_seconds and time.monotonic() - t0 > args.max_seconds:
            stopped = i
            break
        label = f"{op:<19} {str(shape):<17} {layout:<13} {dname:<5}"
        try:
            case = cases.make_op_case(op, shape, DTYPES[dname], device, layout, seed=i,
                                      cast=MIXED_CAST if dname == "mixed" else None)
            errs = cases.parity(case, case.spec.fused, ref_device="cpu")
            cases.sync(device)
        except Exception as exc:  # noqa: BLE001 - reported, counted, and fatal if CUDA is broken
            errors += 1
            ran += 1
            print(f"ERROR    {label} {type(exc).__name__}: {str(exc)[:400]}", flush=True)
            if on_gpu and ("CUDA" in str(exc) or "cuda" in type(exc).__name__.lower()):
                print("sanitize_ops: CUDA error: the context is unusable, stopping", flush=True)
                stopped = i + 1
                break
            continue
        ran += 1
        worst = cases.max_error(errs)
        ok = worst == worst and worst <= TOL[dname]
        if not ok:
            mismatches += 1
            bad = ", ".join(f"{k} {v:.1e}" for k, v in errs.items() if not v <= TOL[dname])
            print(f"MISMATCH {label} max rel err {worst:.1e} (tol {TOL[dname]:.0e}): {bad}", flush=True)
        else:
            print(f"ok       {label} max rel err {worst:.1e}", flush=True)
    elapsed = time.monotonic() - t0
    incomplete = (f", INCOMPLETE: stopped after {stopped} of the {len(todo)} op cases (time limit or CUDA error)"
                  if stopped is not None else "")
    print(f"sanitize_ops: {ran}/{len(todo) + len(small)} cases run, {mismatches} mismatches, {errors} errors "
          f"in {elapsed:.0f} s{incomplete}", flush=True)
    return 1 if (mismatches or errors) else 0


if __name__ == "__main__":
    sys.exit(main())
