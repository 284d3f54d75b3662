"""The benchmark machinery itself: memory-floor accounting, the report's rendering, and (slow)
the GPU report end to end in quick mode. Nothing here asserts anything about time."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import cases, gpu_report

ROOT = Path(__file__).resolve().parent.parent


def test_floor_bytes_count_each_tensor_once():
    shape = (2, 8, 4, 4)
    n = 2 * 8 * 4 * 4 * 4  # one fp32 activation, in bytes
    small = (2 * (2 * 8) + 8 + 2) * 4  # a, b [B, C]; rho [C]; t [B]
    case = cases.make_op_case("cfc_relax", shape, torch.float32, "cpu", "nchw")
    # forward: f, g, h, x read, out written; backward: grad_out, f, g, h, x read, 4 grads written
    assert case.floor_bytes("fwd") == 5 * n + small
    assert case.floor_bytes("fwdbwd") == (5 + 5 + 4) * n + 3 * small
    ada = cases.make_op_case("adaln_residual", shape, torch.float32, "cpu", "channels_last")
    vec = 2 * (2 * 8) * 4  # scale, shift
    # forward: x, residual read, out and s written; backward: grad_out, grad_s, s read, ds written once
    assert ada.floor_bytes("fwd") == 4 * n + vec
    assert ada.floor_bytes("fwdbwd") == 4 * n + vec + 3 * n + vec // 2 + n + vec


@pytest.mark.parametrize("layout", cases.LAYOUTS + cases.SLICE_LAYOUTS)
def test_op_case_layouts_and_fresh_values(layout):
    case = cases.make_op_case("adaln", (2, 5, 3, 4), torch.float32, "cpu", layout)
    x = case.inputs["x"]
    assert x.shape == (2, 5, 3, 4) and (x != 0).all()
    if layout == "channels_last":
        assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    if layout.endswith("slice"):
        assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    leaves = case.leaves()
    assert leaves["x"].stride() == x.stride() and torch.equal(leaves["x"], x) and leaves["x"].requires_grad


def test_parity_flags_a_wrong_op():
    case = cases.make_op_case("cfc_relax", (1, 3, 2, 2), torch.float32, "cpu", "nchw")
    good = cases.parity(case, case.spec.reference)
    assert cases.max_error(good) < 1e-6

    def wrong(**kw):
        return case.spec.reference(**kw) * 1.1

    assert cases.max_error(cases.parity(case, wrong)) > 0.05


def test_saved_tensor_hook_counts_storages():
    case = cases.make_op_case("adaln", (1, 4, 2, 2), torch.float32, "cpu", "nchw")
    mem = cases.saved_tensor_bytes(case.spec.reference, case)
    assert mem["saved_tensors"] >= 1 and mem["saved_MB"] >= mem["saved_new_MB"] > 0


def _fake_report():
    op = {"op": "cfc_relax", "title": "CfC gate+relax", "layout": "nchw", "pass": "fwd", "eager_ms": 1.0,
          "compile_ms": 0.2, "fused_ms": None, "floor_ms": 0.1, "eager_over_floor": 10.0, "compile_over_floor": 2.0,
          "fused_over_floor": None, "compile_over_fused": None, "eager_over_fused": None, "parity": "ERROR",
          "parity_err": None, "eager_bf16_err": None}
    mem = {"op": "cfc_relax", "title": "CfC gate+relax", "layout": "nchw"}
    mem.update({f"{i}_{k}": None for i in cases.IMPLS for k in ("saved_MB", "saved_new_MB", "retained_MB")})
    meta = {"date": "d", "device": "dev", "torch": "t", "triton": "tr", "cuda": None, "python": "p", "command": "c",
            "kernel_backends": {}, "quick": True, "budget_s": 1.0, "op_shape": [1, 2, 3, 4], "op_dtype": "float32"}
    return {"meta": meta, "ops": [op, dict(op, **{"pass": "fwdbwd"})], "op_memory": [mem], "e2e": {}, "notes": ["n"]}


def test_render_and_plot_a_partial_report(tmp_path):
    report = _fake_report()
    report["headline"] = gpu_report.headline(report)
    md = gpu_report.render_markdown(report)
    assert "| CfC gate+relax | nchw | fwd | 1.000 | 0.200 | - | 0.100 |" in md
    assert "## Notes" in md and "- n" in md
    gpu_report.plot_ratios(report, tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000


@pytest.mark.slow
def test_gpu_report_quick_end_to_end(tmp_path):
    """The one command, quick mode, one model variant (two workers): files and rows exist."""
    cmd = [sys.executable, "-m", "benchmarks.gpu_report", "--out", str(tmp_path), "--quick", "--no-compile",
           "--variants", "ref_eager_cl", "--profile-variants", "ref_eager_cl", "--budget", "240"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode in (0, 1), proc.stdout[-3000:] + proc.stderr[-3000:]  # 1: a parity FAIL
    report = json.loads((tmp_path / "report.json").read_text())
    assert {(r["op"], r["layout"], r["pass"]) for r in report["ops"]} == {
        (o, lay, m) for o in cases.OP_NAMES for lay in cases.OPS[o].layouts for m in cases.MODES}
    assert all(r["eager_ms"] is not None and r["floor_ms"] > 0 for r in report["ops"])
    rows = report["e2e"]["train"] + report["e2e"]["sample"]
    assert [r["status"] for r in rows] == ["ok", "ok"], report["notes"]
    assert rows[0]["train_ms"] > 0 and rows[1]["images_per_s"] > 0
    assert rows[0]["profile"]["top"], rows[0].get("profile_error")
    assert "## Where a train step's time goes" in proc.stdout
    for name in ("report.md", "ratios.png", "workers.log"):
        assert (tmp_path / name).exists()
    assert "# liquiddiff GPU report" in proc.stdout


def test_train_warmups_take_one_of_the_slots_and_sampling_none(tmp_path, monkeypatch):
    """At most TRAIN_WARMUP_SLOTS train warm-ups at once (lock files in the parent's folder):
    one more waits until a slot is given back; a sampling warm-up never waits."""
    import contextlib
    import threading

    monkeypatch.setenv(gpu_report.WARM_SLOTS_ENV, str(tmp_path))
    compiled = gpu_report.VARIANTS["ref_compile_cl"]  # compiled: no head-start pause
    entered = threading.Event()

    def another():
        with gpu_report._warm_slot("train", compiled):
            entered.set()

    with contextlib.ExitStack() as slots:
        for _ in range(gpu_report.TRAIN_WARMUP_SLOTS):
            slots.enter_context(gpu_report._warm_slot("train", compiled))
        with gpu_report._warm_slot("sample", compiled):
            pass
        waiting = threading.Thread(target=another)
        waiting.start()
        assert not entered.wait(0.6)  # every slot is held
    assert entered.wait(5)  # given back: it gets one
    waiting.join()


def test_rows_without_reserved_time_are_the_last_ones_timed():
    """The compile deadline holds no time back for NOT_RESERVED: they must be the tail of their
    order, so that running short of time skips them and nothing before them."""
    for task, order in (("train", gpu_report.TRAIN_ORDER), ("sample", gpu_report.SAMPLE_ORDER)):
        tail = [name for name in order if (task, name) in gpu_report.NOT_RESERVED]
        assert tail == list(order[len(order) - len(tail):]), (task, tail)
    assert ("train", "ref_compile_cl") not in gpu_report.NOT_RESERVED
    assert len(gpu_report.NOT_RESERVED) == 4
