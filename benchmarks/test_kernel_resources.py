"""Every Triton kernel, compiled as its launcher launches it at the model's size (no GPU needed).
For sm_90 (H100, H200): none spills more than ptxas's own occupancy trade (a kernel held to 64
registers, four blocks of 8 warps per SM, for a few bytes of stack), and none needs more than
128 registers a thread (at least two blocks of up to 8 warps per SM). For sm_75 (a T4): every kernel compiles. Run as its own
process: the kernels must be compiled for the GPU, not for the interpreter this test session
uses."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _command(sm: int, *options: str) -> subprocess.CompletedProcess:
    """``python -m benchmarks.kernel_resources --sm sm *options``, compiling for the GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kernel_resources", "--sm", str(sm), *options], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and ("cuobjdump" in proc.stderr or "No such file" in proc.stderr):
        pytest.skip(f"no sm_{sm} toolchain in this Triton: {proc.stderr[-300:]}")
    return proc


def _resources(sm: int, *options: str) -> tuple[str, list[tuple[str, int, int]]]:
    """(first line, [(label, registers, stack)]) of ``python -m benchmarks.kernel_resources``."""
    proc = _command(sm, *options)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = re.findall(r"^(\S.*?)\s+\d+ warps:\s+(\d+) registers, stack (\d+)", proc.stdout, re.M)
    assert len(rows) == 51, proc.stdout  # every launch of kernel_resources.launches()
    return proc.stdout.splitlines()[0], [(label, int(registers), int(stack)) for label, registers, stack in rows]


@pytest.mark.parametrize("options", [(), ("--wide",), ("--split-batch",)],
                         ids=["32-bit offsets", "64-bit offsets", "batch in parts"])
def test_kernels_do_not_spill(options):
    # --wide: the variants for a batch item past 2**30 elements; --split-batch: for a batch past
    # 65535 items. No CPU test compiles either for a GPU.
    _, rows = _resources(90, *options)
    for label, registers, stack in rows:
        assert registers <= 128 and (stack == 0 or (registers == 64 and stack <= 8)), (label, registers, stack)


def test_default_kernels_compile_for_the_t4_without_spilling():
    """sm_75 (a T4, the seed's Colab GPU, trains in fp16): every launch compiles. The kernels the
    fused model runs by default do not spill; the pointwise_conv op's kernels (tl.dot: the SiLU ->
    1x1 conv kernels and their variants, the plain 1x1 conv, the CfC heads, the FeedForward) do
    (Triton's tl.dot has no tensor-core path before sm_80), which runtime.MIN_CAPABILITY keeps
    off there."""
    header, rows = _resources(75)
    assert "in fp16" in header
    for label, registers, stack in rows:
        if not label.startswith(("SiLU -> 1x1", "modulated SiLU -> 1x1", "CfC heads", "1x1 conv",
                                 "depthwise 3x3 -> SiLU -> 1x1", "FeedForward")):
            assert stack == 0, (label, registers, stack)


def test_loops_of_the_depthwise_forward_have_no_barrier():
    """--loops counts a launch's SASS loops: the depthwise 7x7 forward's tap loops multiply-add
    (a pair's loop 32 FMAs a thread) with no barrier (the strip design before them: 30 a row)."""
    proc = _command(90, "--loops", "depthwise 7x7 forward")
    assert proc.returncode == 0, proc.stderr[-2000:]
    loops = [tuple(map(int, row)) for row in re.findall(r"(\d+) instructions, (\d+) FFMA, (\d+) LDG, (\d+) BAR",
                                                         proc.stdout)]
    assert loops and max(ffma for _, ffma, _, _ in loops) == 32, proc.stdout
    assert all(bar == 0 for *_, bar in loops), proc.stdout
    unknown = _command(90, "--loops", "no such launch")
    assert unknown.returncode == 2 and "no launch labelled 'no such launch'" in unknown.stderr


@pytest.mark.parametrize("size", [(2, 64, 2048, 2048), (70000, 64, 8, 8)], ids=["2048 px", "batch of 70000"])
def test_launch_grids_fit_cuda_limits(size):
    """Every launch at ``size`` (meta tensors): grid axis 0 below 2**31, axes 1 and 2 at most
    65535, which the CUDA launch would refuse (the CfC heads kernels put their pixel tiles on
    axis 1 until they passed it at 1024 x 1024; every kernel put a batch past 65535 on axis 1 or 2
    in one launch before it was launched in parts)."""
    code = ("import json; from benchmarks import kernel_resources as kr; "
            f"print(json.dumps(kr.launch_grids({size})))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grids = json.loads(proc.stdout.splitlines()[-1])
    assert len({label for label, _ in grids}) == 51  # every launch of kernel_resources.launches()
    for label, grid in grids:
        assert grid[0] < 2**31 and all(n <= 65535 for n in grid[1:]), (label, grid)
