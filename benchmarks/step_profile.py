"""Where a train (or sampling) step's time goes: torch.profiler over a few steps, kernels grouped by kind.

The GPU report's train and sampling workers for the variants in ``PROFILED`` add this to their result, so the
one GPU command also answers "what should be made faster next" and "is the step host-bound"
(device busy = kernel time / wall time; well under 100 % means the GPU waits for Python).
On the CPU (a dry run) the top rows are aten ops by self CPU time instead of kernels.

Two more tables say who owns the time. On a GPU: the aten ops (with their input shapes) whose
own launches take the most device time, and the autograd nodes whose backward does (a kernel
name such as ``reduce_kernel`` does not say which op launched it). Everywhere: one more step
under cProfile, its host time by where the Python runs (this package, Triton's launcher, torch)
and the functions that take the most of it (the first H100 report found the fused eager step
host-bound: 255 ms a step, 114 ms replayed from a CUDA graph).

    python -m benchmarks.step_profile [--fused] [--layout channels_last] [--compile] [--steps 3]
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import re
import sys
import time
from typing import Callable

import torch

from benchmarks import cases

# Variants of the GPU report whose train step is profiled: the fused model, eager and replayed
# from CUDA graphs (its busy share is what the graph leaves between and around its kernels), the
# baseline it must beat (whose profile is the starting point), and torch.compile of the
# fused model (264.6 ms at faaee43 against its eager 209-331 and graphed 89: host-bound where,
# no report has said).
PROFILED = ("fused_cl", "fused_graph_cl", "ref_compile_cl", "fused_compile_cl")

# (kind, pattern searched in the lower-cased kernel name); the first match wins. Our kernels are
# the @triton.jit functions of liquiddiff/kernels (the depthwise one counts as a depthwise conv,
# beside cuDNN's). cuDNN names its NHWC depthwise kernels conv2d/dgrad2d/wgrad2d_c1_k1_nhwc (one
# channel per group); cuBLAS's Hopper GEMMs are nvjet_*. The multi-tensor kernels are AdamW's
# and clip_grad_norm_'s (foreach norms).
KINDS = (
    ("Triton CfC, AdaLN, modulated SiLU (ours)", r"^_(cfc_|adaln_|modulated_silu_|context_shift_|merge_)"),
    ("Triton SiLU -> 1x1 conv (ours)", r"^_(silu_conv1x1|feedforward)"),
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


# Where host time runs (cProfile): the first pattern matched in a function's file wins; "~" is
# cProfile's file for calls into C (torch ops, which launch kernels, and waits for the GPU).
HOST_ORIGINS = (
    ("waiting for the GPU (item, synchronize)", r"^~$", r"'item'|synchronize"),
    ("C++ calls (torch ops, kernel launches)", r"^~$", r""),
    ("liquiddiff (Python)", r"/liquiddiff/", r""),
    ("Triton launcher (Python)", r"/triton/", r""),
    ("torch (Python: autograd, modules, optimizer)", r"/torch/", r""),
    ("other Python", r"", r""),
)


def host_origin(filename: str, function: str) -> str:
    return next(origin for origin, file_pattern, name_pattern in HOST_ORIGINS
                if re.search(file_pattern, filename) and re.search(name_pattern, function))


def host_profile(step: Callable[[], object], steps: int = 1, top: int = 12) -> dict:
    """Run ``step`` under cProfile: host ms per step by origin (``HOST_ORIGINS``), and the
    functions with the most time of their own."""
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.runcall(lambda: [step() for _ in range(steps)])
    wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    stats = pstats.Stats(profiler).stats
    origins: dict[str, float] = {}
    rows = []
    for (filename, line, function), (_, calls, own_s, total_s, _) in stats.items():
        origin = host_origin(filename, function)
        origins[origin] = origins.get(origin, 0.0) + own_s * 1e3 / steps
        where = function if filename == "~" else f"{os.path.basename(filename)}:{line}({function})"
        rows.append([where[:110], calls // steps, own_s * 1e3 / steps, total_s * 1e3 / steps])
    return {
        "steps": steps,
        "wall_ms": wall_ms,
        "origins": sorted(([k, ms] for k, ms in origins.items()), key=lambda r: -r[1]),
        "top": sorted(rows, key=lambda r: -r[2])[:top],
    }


def _owners(prof, steps: int, top: int) -> dict:
    """On a GPU: the aten ops (by input shapes) whose own launches take the most device time, and
    the autograd nodes whose backward (all it calls) does."""
    from torch.autograd import DeviceType

    node_prefix = "autograd::engine::evaluate_function: "
    ops = [(f"{e.key} {e.input_shapes}"[:110], e.count // steps, e.self_device_time_total / 1e3 / steps)
           for e in prof.key_averages(group_by_input_shape=True)
           if e.device_type == DeviceType.CPU and e.key.startswith("aten::") and e.self_device_time_total > 0]
    nodes = [(e.key[len(node_prefix):][:110], e.count // steps, e.device_time_total / 1e3 / steps)
             for e in prof.key_averages() if e.key.startswith(node_prefix) and e.device_time_total > 0]
    by_time = lambda rows: [list(r) for r in sorted(rows, key=lambda r: -r[2])[:top]]  # noqa: E731
    return {"ops": by_time(ops), "nodes": by_time(nodes)}


def profile_steps(step: Callable[[], object], device, steps: int = 2, top: int = 15) -> dict:
    """Run ``step`` ``steps`` times under torch.profiler, then once under cProfile; per-step times
    in ms and shares, and who owns them (``_owners``, ``host_profile``)."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    cases.sync(device)
    with profile(activities=activities, record_shapes=on_gpu) as prof:
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
        **(_owners(prof, steps, top) if on_gpu else {}),
        "host": host_profile(lambda: (step(), cases.sync(device))),
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
    for key, head in (("ops", "aten op and input shapes, by its own launches' device time"),
                      ("nodes", "autograd node, by its backward's device time")):
        if prof.get(key):
            lines += ["", f"| {head} | calls per step | ms per step |", "|---|---|---|"]
            lines += [f"| `{name}` | {calls} | {ms:.2f} |" for name, calls, ms in prof[key]]
    host = prof.get("host")
    if host:
        lines += ["", f"Host time under cProfile ({host['wall_ms']:.1f} ms per step, {host['steps']} step; "
                      "cProfile's own cost stretches the Python parts):", "",
                  "| where the host time runs | ms per step |", "|---|---|"]
        lines += [f"| {origin} | {ms:.2f} |" for origin, ms in host["origins"]]
        lines += ["", "| function | calls per step | own ms | with callees ms |", "|---|---|---|---|"]
        lines += [f"| `{name}` | {calls} | {own:.2f} | {total:.2f} |" for name, calls, own, total in host["top"]]
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
    # Back to back, as the report times them: each step queued while the GPU runs the last.
    print("\n".join(render(label, profile_steps(lambda: trainer.train_step(images, sync=False), device, args.steps))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
