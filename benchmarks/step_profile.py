"""Where a train step's time goes: torch.profiler over a few steps, kernels grouped by kind.

The GPU report's train workers for the variants in ``PROFILED`` add this to their result, so the
one GPU command also answers "what should be made faster next" and "is the step host-bound"
(device busy = kernel time / wall time; well under 100 % means the GPU waits for Python).
On the CPU (a dry run) the top rows are aten ops by self CPU time instead of kernels.

    python -m benchmarks.step_profile [--fused] [--layout channels_last] [--compile] [--steps 3]
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from typing import Callable

import torch

from benchmarks import cases

# Variants of the GPU report whose train step is profiled: the fused model, and the baseline it
# must beat (whose profile is the starting point).
PROFILED = ("fused_cl", "ref_compile_cl")

# (kind, pattern searched in the lower-cased kernel name); the first match wins. Our kernels are
# the @triton.jit functions of liquiddiff/kernels (the depthwise one counts as a depthwise conv,
# beside cuDNN's). cuDNN names its NHWC depthwise kernels conv2d/dgrad2d/wgrad2d_c1_k1_nhwc (one
# channel per group); cuBLAS's Hopper GEMMs are nvjet_*. The multi-tensor kernels are AdamW's
# and clip_grad_norm_'s (foreach norms).
KINDS = (
    ("Triton CfC, AdaLN, modulated SiLU (ours)", r"^_(cfc_|adaln_|modulated_silu_|context_shift_|merge_)"),
    ("Triton SiLU -> 1x1 conv (ours)", r"^_silu_conv1x1"),
    ("depthwise conv", r"c1_k1|depthwise|^_dwconv"),
    ("inductor Triton", r"^triton_"),
    ("GEMM, 1x1 and dense conv", r"gemm|nvjet|xmma|cutlass|cublas|implicit|conv|aten::(add)?mm$"),
    ("optimizer, gradient clipping", r"multi_tensor_apply"),
    ("reductions, norms", r"reduce|norm"),
    ("elementwise, copies, other", r""),
)


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next(kind for kind, pattern in KINDS if re.search(pattern, lowered))


def _self_time_us(event, on_gpu: bool) -> float:
    if not on_gpu:
        return event.self_cpu_time_total
    # Kernels only: the CPU op that launched a kernel reports the kernel's device time as its
    # own too, and range annotations on the GPU timeline span kernels: counting either would
    # count a kernel twice (torch's own table sums the same events).
    if event.device_type != torch.autograd.DeviceType.CUDA or event.is_user_annotation:
        return 0.0
    return event.self_device_time_total


def profile_steps(step: Callable[[], object], device, steps: int = 2, top: int = 15) -> dict:
    """Run ``step`` ``steps`` times under torch.profiler; per-step times in ms and shares."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    cases.sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        cases.sync(device)
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    # On a GPU, kernels by self device time; on the CPU, aten ops by self CPU time.
    rows = [(e.key, _self_time_us(e, on_gpu) / 1e3 / steps) for e in prof.key_averages()]
    rows = sorted(((n, ms) for n, ms in rows if ms > 0 and (on_gpu or n.startswith("aten::"))), key=lambda r: -r[1])
    total = sum(ms for _, ms in rows) or float("nan")
    kinds: dict[str, float] = {}
    for name, ms in rows:
        kind = kind_of(name)
        kinds[kind] = kinds.get(kind, 0.0) + ms
    return {
        "steps": steps,
        "what": "CUDA kernels, self device time" if on_gpu else "aten ops, self CPU time",
        "wall_ms": wall_ms,
        "busy_ms": total,
        "busy_share": total / wall_ms,
        "kinds": sorted(([k, ms, ms / total] for k, ms in kinds.items()), key=lambda r: -r[1]),
        "top": [[name[:110], ms, ms / total] for name, ms in rows[:top]],
    }


def render(label: str, prof: dict) -> list[str]:
    """Markdown lines for one profiled variant (``timed_ms``, where the caller set it: the step's
    time without the profiler, whose overhead stretches the wall time it sees)."""
    timed = prof.get("timed_ms")
    against_timed = f"; {100 * prof['busy_ms'] / timed:.0f} % of the {timed:.1f} ms timed step" if timed else ""
    lines = [
        f"**{label}**: {prof['wall_ms']:.1f} ms per step wall, {prof['busy_ms']:.1f} ms of {prof['what']} "
        f"(busy {100 * prof['busy_share']:.0f} % of the wall, {prof['steps']} steps under the profiler{against_timed})",
        "",
        "| kind | ms per step | share |",
        "|---|---|---|",
    ]
    lines += [f"| {kind} | {ms:.2f} | {100 * share:.1f} % |" for kind, ms, share in prof["kinds"]]
    lines += ["", "| top entries | ms per step | share |", "|---|---|---|"]
    lines += [f"| `{name}` | {ms:.2f} | {100 * share:.1f} % |" for name, ms, share in prof["top"]]
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_profile", description=__doc__.split("\n")[0])
    p.add_argument("--fused", action="store_true", help="the fused model (default: the reference)")
    p.add_argument("--layout", choices=("nchw", "channels_last"), default="channels_last")
    p.add_argument("--compile", action="store_true", help="torch.compile the model first")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="the report's tiny CPU-sized configuration")
    args = p.parse_args(argv)
    cfg = cases.e2e_config(args.quick)
    device = cases.default_device()
    trainer = cases.build_trainer(cfg, fused=args.fused, layout=args.layout, device=device, compile=args.compile)
    images = cases.make_images(cfg, args.layout, device)
    for _ in range(max(1, cfg.train_warmup)):
        trainer.train_step(images)
    label = f"{'fused' if args.fused else 'reference'} {args.layout}{' compiled' if args.compile else ''}, {cfg.describe()}"
    print("\n".join(render(label, profile_steps(lambda: trainer.train_step(images), device, args.steps))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
