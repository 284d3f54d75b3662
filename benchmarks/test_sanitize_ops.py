"""The memcheck program (benchmarks/sanitize_ops.py) on the CPU: its checks outside the timed op
list run and pass under the interpreter, so that a broken check shows here, not in a GPU
session's compute-sanitizer stage."""
import torch

from benchmarks import sanitize_ops


def test_fp32_input_and_small_op_checks_run_and_pass():
    cpu = torch.device("cpu")
    checks = sanitize_ops.fp32_input_checks(cpu) + sanitize_ops.small_op_checks(3, cpu)
    failed = [(op, what) for op, what, ok in checks if not ok]
    assert checks and not failed, failed
    # The norm1 + CfC node's kernel variants are among them (remade x, two upstream gradients),
    # the bias-gradient sums and the 1x1 conv with both outputs.
    whats = " ".join(what for _, what, _ in checks)
    for variant in ("x remade from the residual", "two upstream gradients", "cast with channel sum",
                    "SiLU backward with the bias gradient", "its output and SiLU both"):
        assert variant in whats, variant
