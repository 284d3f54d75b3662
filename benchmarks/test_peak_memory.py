"""The peak-memory estimate (benchmarks/peak_memory.py) on a CPU-sized model."""
import gc

from benchmarks import peak_memory, traffic
from liquiddiff import build


def test_a_train_step_frees_every_tensor_it_makes_without_the_cycle_collector():
    """A reference cycle through a saved tensor (a hooks object keeping its recipes) keeps a
    block's activations alive until Python's cycle collector runs: on a GPU, through backward
    and into the next step."""
    model = build("micro", channels=(8, 16))
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        for fused in (False, True):
            record = peak_memory.step_peak(model.set_fused(fused), batch=2, size=16, channels_last=True)
            assert record.live == {}, fused
            assert record.current == record.persistent, fused
    finally:
        if was_enabled:
            gc.enable()


def test_fused_step_peaks_lower_and_says_where():
    model = build("micro", channels=(8, 16))
    ref = peak_memory.step_peak(model.set_fused(False), batch=2, size=16, channels_last=True)
    fused = peak_memory.step_peak(model.set_fused(True), batch=2, size=16, channels_last=True)
    checkpointed = peak_memory.step_peak(model.set_gradient_checkpointing(True), batch=2, size=16, channels_last=True)
    model.set_gradient_checkpointing(False)
    assert fused.persistent == ref.persistent == checkpointed.persistent > 0
    assert ref.persistent < checkpointed.peak < fused.peak < ref.peak
    # What was alive at the peak adds up to it, and the forward made most of it.
    for rec in (ref, fused):
        assert sum(rec.at_peak.values()) + rec.persistent == rec.peak
        assert rec.peak_op[2] in ("forward", "backward")
        assert sum(b for (phase, _), b in rec.at_peak.items() if phase == "forward") > rec.peak / 2 - rec.persistent


def test_report_lists_every_variant():
    text = peak_memory.report("micro", size=8, batch=1)
    for variant in traffic.VARIANTS:
        assert f"| {variant.label} |" in text
