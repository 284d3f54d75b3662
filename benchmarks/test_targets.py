"""The issues' targets (benchmarks/targets.py) checked on a made-up report: each verdict follows
its limit and direction, the best eager fused row counts for issue 7, and a missing number
reads 'not measured'."""
from benchmarks import gpu_report, targets


def _op(op, layout, mode, over_floor, speedup):
    return {"op": op, "title": op, "layout": layout, "pass": mode, "fused_over_floor": over_floor,
            "compile_over_fused": speedup}


def _report():
    ops = [_op("cfc_relax", "nchw", "fwd", 1.1, 1.3), _op("cfc_relax", "nchw", "fwdbwd", 1.3, 2.0),
           _op("adaln", "channels_last", "fwdbwd", 1.4, 2.9)]
    train = [{"name": "ref_compile_cl", "label": "torch.compile(reference)", "train_ms": 80.0, "peak_GiB": 16.0},
             {"name": "fused_cl", "label": "fused", "train_ms": 70.0, "peak_GiB": 9.0},
             {"name": "fused_pw_cl", "label": "fused + Triton pointwise", "train_ms": 50.0, "peak_GiB": 9.5},
             {"name": "fused_compile_cl", "label": "torch.compile(fused)", "train_ms": None}]
    sample = [{"name": "ref_compile_cl", "label": "torch.compile(reference)", "images_per_s": 10.0},
              {"name": "fused_cl", "label": "fused", "images_per_s": 14.0}]
    return {"ops": ops, "e2e": {"train": train, "sample": sample}}


def _by_target(rows):
    return {r["target"]: r for r in rows}


def test_op_targets_follow_their_limits():
    rows = _by_target(targets.evaluate(_report()))
    assert rows["cfc_relax (nchw): forward time / floor <= 1.25"]["verdict"] == "met"
    assert rows["cfc_relax (nchw): forward+backward time / floor <= 1.25"]["verdict"] == "missed"
    assert rows["cfc_relax (nchw): forward+backward speed-up over compile >= 1.8"]["verdict"] == "met"
    assert rows["adaln (channels_last): forward+backward time / floor <= 1.5"]["verdict"] == "met"
    assert rows["adaln (channels_last): forward+backward speed-up over compile >= 3.0"]["verdict"] == "missed"
    assert rows["adaln_residual: forward+backward time / floor <= 1.5"]["verdict"] == "not measured"


def test_issue_7_takes_the_best_fused_row():
    rows = [r for r in targets.evaluate(_report()) if r["issue"] == 7]
    train, compiled, peak, sampling = rows
    assert train["verdict"] == "met" and train["measured"] == "1.60 (fused + Triton pointwise)"
    assert compiled["verdict"] == "not measured"
    assert peak["verdict"] == "met" and peak["measured"] == "0.56 (fused)"
    assert sampling["verdict"] == "missed" and sampling["value"] == 1.4


def test_the_report_renders_them():
    report = _report()
    report.update(meta={"date": "d", "device": "dev", "torch": "t", "triton": "tr", "cuda": None, "python": "p",
                        "command": "c", "kernel_backends": {}, "quick": True, "budget_s": 1.0,
                        "op_shape": [1, 2, 3, 4], "op_dtype": "bfloat16"},
                  op_memory=[], targets=targets.evaluate(report))
    for r in report["ops"]:
        r.update({k: None for k in ("eager_ms", "compile_ms", "fused_ms", "floor_ms", "eager_over_floor",
                                    "compile_over_floor", "eager_over_fused", "parity", "parity_err", "eager_bf16_err")})
    for r in report["e2e"]["train"] + report["e2e"]["sample"]:
        r["layout"] = "channels_last"
    md = gpu_report.render_markdown(report)
    assert "## The issues' targets" in md
    assert "| 7 | train step: compile(reference) ms / fused ms >= 1.3 | 1.60 (fused + Triton pointwise) | met |" in md
