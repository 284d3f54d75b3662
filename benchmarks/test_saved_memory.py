"""The saved-for-backward accounting (benchmarks/saved_memory.py) on a CPU-sized model."""
from benchmarks.saved_memory import report, saved_by_module
from liquiddiff import build


def test_fused_ops_keep_less_for_backward():
    model = build("micro", channels=(8, 16))
    ref = saved_by_module(model.set_fused(False), batch=2, size=16, channels_last=False)
    fused = saved_by_module(model.set_fused(True), batch=2, size=16, channels_last=False)
    # The AdaLN keeps s, its statistics and scale instead of the reference's intermediates, the
    # CfC op its inputs instead of gate and y, each SiLU -> 1x1 conv its pre-activation alone.
    assert fused["AdaLN"] < ref["AdaLN"] / 2
    # The CfC keeps only its convolutions' inputs (dw, z, g_dw, h_dw): its own input n and its
    # f, g, h are recomputed in backward, n from u and norm1's statistics, which the one node of
    # norm1 and the CfC keeps (kernels.normalized_parallel_cfc: norm1's share counts as the CfC's).
    assert fused["ParallelCfC"] + fused["AdaLN"] < (ref["ParallelCfC"] + ref["AdaLN"]) / 3
    # The FFN keeps its input alone (bf16) and remakes its hidden tensor.
    assert fused["FeedForward"] < ref["FeedForward"] / 2
    for kind in ("ParallelCfC", "FeedForward", "MultiScaleSpatialMix"):
        assert fused[kind] < ref[kind], kind
    assert fused["DownSample"] == ref["DownSample"]  # untouched by the fused switch
    assert sum(fused.values()) < sum(ref.values())


def test_report_lists_every_variant():
    text = report("micro", size=8, batch=1)
    for row in ("| reference | NCHW |", "| reference | channels_last |", "| fused | NCHW |", "| fused | channels_last |"):
        assert row in text
