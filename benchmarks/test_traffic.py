"""The train-step traffic ledger (benchmarks/traffic.py) on a CPU-sized model."""
from benchmarks import cases, traffic
from liquiddiff import build


def _by_kind(ledger):
    return ledger.grouped(lambda kind, op, phase: (kind, phase))


def _gb(row):
    return row[1] + row[2]


def test_ledger_attributes_forward_and_backward_to_modules():
    model = build("micro", channels=(8, 16))
    ref = traffic.step_traffic(model.set_fused(False), batch=2, size=16, channels_last=True)
    fused = traffic.step_traffic(model.set_fused(True), batch=2, size=16, channels_last=True)
    with cases.kernels_setting("depthwise_conv=triton"):
        paired = traffic.step_traffic(model, batch=2, size=16, channels_last=True)
    for ledger in (ref, fused, paired):
        kinds = _by_kind(ledger)
        for kind in ("AdaLN", "ParallelCfC", "MultiScaleSpatialMix", "FeedForward"):
            assert _gb(kinds[(kind, "forward")]) > 0 and _gb(kinds[(kind, "backward")]) > 0, kind
    assert fused.total()[1] < ref.total()[1]
    # The fused AdaLN is one kernel each way where the reference runs a chain of elementwise ops.
    assert _gb(_by_kind(fused)[("AdaLN", "backward")]) < _gb(_by_kind(ref)[("AdaLN", "backward")]) / 3
    # The g/h pair (one launch each way, SiLU's backward in the epilogue) moves less than the
    # heads one by one on cuDNN.
    cfc = [_gb(_by_kind(ledger)[("ParallelCfC", "backward")]) for ledger in (fused, paired)]
    assert cfc[1] < cfc[0]
    ops = paired.grouped(lambda kind, op, phase: op)
    # Under autocast norm1 and the CfC are one node (kernels.normalized_parallel_cfc).
    assert "liquiddiff::depthwise_conv_backward" in ops and "liquiddiff::cfc_relax_normalized_backward" in ops


def test_sampling_step_is_the_forward_alone():
    model = build("micro", channels=(8, 16)).set_fused(True)
    sample = traffic.step_traffic(model, batch=2, size=16, channels_last=True, train=False)
    train = traffic.step_traffic(model, batch=2, size=16, channels_last=True)
    assert sample.total("backward") == (0, 0)
    # Without grad nothing is recomputed or kept: no more than the train step's forward.
    assert 0 < sample.total()[1] <= train.total("forward")[1]


def test_report_lists_every_variant():
    text = traffic.report("micro", size=8, batch=1, top=5)
    for variant in traffic.VARIANTS:
        assert f"| {variant.label} |" in text
