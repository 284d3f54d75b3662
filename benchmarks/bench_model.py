"""pytest-benchmark suite of one training step and one sampling step of a preset.

Reference and fused models, eager (both layouts) and torch.compile (channels_last). On a GPU:
the tiny preset at 256 px, batch 8, bf16 autocast (RectifiedFlowTrainer's default on CUDA); on a
CPU: the micro preset at 16 px, batch 2, fp32, the fused ops under the Triton interpreter. Each
case checks the loss or the samples are finite; no case asserts anything about time.

On the CPU the torch.compile cases are skipped unless ``LIQUIDDIFF_BENCH_COMPILE=1``.
"""
import math
import os

import pytest
import torch

from benchmarks import cases

DEVICE = cases.default_device()
CFG = cases.FULL_E2E if cases.full_sizes() else cases.QUICK_E2E

VARIANTS = {
    # name: (fused, layout, compiled)
    "ref-eager-nchw": (False, "nchw", False),
    "ref-eager-cl": (False, "channels_last", False),
    "ref-compile-cl": (False, "channels_last", True),
    "fused-nchw": (True, "nchw", False),
    "fused-cl": (True, "channels_last", False),
    "fused-compile-cl": (True, "channels_last", True),
}


def _variants():
    for name, (fused, layout, compiled) in VARIANTS.items():
        marks = []
        if compiled and DEVICE.type != "cuda" and os.environ.get("LIQUIDDIFF_BENCH_COMPILE", "0") != "1":
            marks.append(pytest.mark.skip(reason="torch.compile of a model on the CPU is slow "
                                          "(LIQUIDDIFF_BENCH_COMPILE=1 runs it)"))
        if compiled:
            marks.append(pytest.mark.slow)
        yield pytest.param(fused, layout, compiled, marks=marks, id=name)


def _trainer(fused, layout, compiled):
    return cases.build_trainer(CFG, fused=fused, layout=layout, device=DEVICE, compile=compiled)


@pytest.mark.parametrize("fused, layout, compiled", list(_variants()))
def test_train_step(benchmark, fused, layout, compiled):
    trainer = _trainer(fused, layout, compiled)
    images = cases.make_images(CFG, layout, DEVICE)
    trainer.train_step(images)  # warm-up: compilation, Triton jit, AdamW state

    def step():
        metrics = trainer.train_step(images)
        cases.sync(DEVICE)
        return metrics

    benchmark.group = f"train step {CFG.describe()}"
    metrics = benchmark(step)
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]), metrics
    assert metrics["step"] >= 2


@pytest.mark.parametrize("fused, layout, compiled", list(_variants()))
def test_sampling_step(benchmark, fused, layout, compiled):
    trainer = _trainer(fused, layout, compiled)
    trainer.sample(CFG.batch, CFG.image, num_steps=1, use_ema=False)  # warm-up

    def one_euler_step():
        images = trainer.sample(CFG.batch, CFG.image, num_steps=1, use_ema=False)
        cases.sync(DEVICE)
        return images

    benchmark.group = f"sampling step (1 Euler step) {CFG.describe()}"
    images = benchmark(one_euler_step)
    assert images.shape == (CFG.batch, 3, CFG.image, CFG.image)
    assert torch.isfinite(images).all() and images.std() > 0
