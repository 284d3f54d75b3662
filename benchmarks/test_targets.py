"""The issues' targets (benchmarks/targets.py) checked on a made-up report: each verdict follows
its limit and direction, issue 7's fused targets are the default fused row's (the opt-in rows
information), a missing number reads 'not measured', and a number from a row that did not run
as it should (parity failed, non-finite, not compiled) reads 'invalid'."""
from benchmarks import gpu_report, targets


def _op(op, layout, mode, over_floor, speedup):
    return {"op": op, "title": op, "layout": layout, "pass": mode, "fused_over_floor": over_floor,
            "compile_over_fused": speedup}


def _report():
    ops = [_op("cfc_relax", "nchw", "fwd", 1.1, 1.3), _op("cfc_relax", "nchw", "fwdbwd", 1.3, 2.0),
           _op("adaln", "channels_last", "fwdbwd", 1.4, 2.9)]
    train = [{"name": "ref_compile_cl", "label": "torch.compile(reference)", "train_ms": 80.0, "peak_GiB": 16.0},
             {"name": "fused_cl", "label": "fused", "train_ms": 70.0, "peak_GiB": 9.0},
             {"name": "fused_pw_graph_cl", "label": "fused + CUDA graph + Triton pointwise", "train_ms": 50.0,
              "peak_GiB": 9.5},
             {"name": "fused_graph_cl", "label": "fused + CUDA graph", "train_ms": 60.0, "peak_GiB": 9.0},
             {"name": "fused_compile_cl", "label": "torch.compile(fused)", "train_ms": None}]
    sample = [{"name": "ref_compile_cl", "label": "torch.compile(reference)", "images_per_s": 10.0},
              {"name": "fused_cl", "label": "fused", "images_per_s": 14.0},
              {"name": "fused_graph_cl", "label": "fused + CUDA graph", "images_per_s": 16.0}]
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


def test_issue_7_reads_the_default_fused_rows_eager_and_graphed_and_the_opt_in_rows_as_information():
    rows = [r for r in targets.evaluate(_report()) if r["issue"] == 7]
    train, compiled, peak, sampling, graph_train, graph_peak, graph_sampling, *opt_in = rows
    assert train["verdict"] == "missed" and train["measured"] == "1.14 (fused)"
    assert compiled["verdict"] == "not measured"
    assert peak["verdict"] == "met" and peak["measured"] == "0.56 (fused)"
    assert sampling["verdict"] == "missed" and sampling["value"] == 1.4
    # The same targets for the trainer's cuda_graph=True, each with its own verdict.
    assert [(r["target"], r["verdict"], r["measured"]) for r in (graph_train, graph_peak, graph_sampling)] == [
        ("train step: compile(reference) ms / fused ms >= 1.3 (CUDA graph)", "met", "1.33 (fused + CUDA graph)"),
        ("train step: fused peak / compile(reference) peak <= 0.6 (CUDA graph)", "met", "0.56 (fused + CUDA graph)"),
        ("sampling: fused images/s / compile(reference) images/s >= 1.5 (CUDA graph)", "met",
         "1.60 (fused + CUDA graph)")]
    # fused_pw_graph_cl has train numbers, no sampling row: its two train checks, marked as information
    assert [(r["target"].endswith("(opt-in kernels, information)"), r["verdict"], r["measured"]) for r in opt_in] == [
        (True, "met", "1.60 (fused + CUDA graph + Triton pointwise)"), (True, "met", "0.59 (fused + CUDA graph + Triton pointwise)")]


def test_a_number_from_a_row_that_did_not_run_right_is_invalid():
    report = _report()
    report["ops"][0]["parity"] = "FAIL"
    train = {r["name"]: r for r in report["e2e"]["train"]}
    train["ref_compile_cl"]["status"] = "NOT COMPILED"
    train["fused_cl"]["status"] = "ok"
    report["e2e"]["sample"][1]["status"] = "RECOMPILED (2 more graphs while timed)"
    rows = _by_target(targets.evaluate(report))
    assert rows["cfc_relax (nchw): forward time / floor <= 1.25"]["verdict"] == "invalid: parity FAIL"
    step = rows["train step: compile(reference) ms / fused ms >= 1.3"]
    assert step["verdict"] == "invalid: torch.compile(reference): NOT COMPILED" and step["value"] is None
    sampling = rows["sampling: fused images/s / compile(reference) images/s >= 1.5"]
    assert sampling["verdict"] == "invalid: fused: RECOMPILED (2 more graphs while timed)"


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
    assert "| 7 | train step: compile(reference) ms / fused ms >= 1.3 | 1.14 (fused) | missed |" in md


def test_the_plot_draws_each_op_its_own_floor_limit():
    assert targets.floor_limit("cfc_relax", "fwd") == 1.25 and targets.floor_limit("adaln", "fwdbwd") == 1.5
    assert targets.floor_limit("adaln", "fwd") is None and targets.floor_limit("dwconv7", "fwdbwd") is None


def test_a_ratio_exactly_at_its_limit_meets_it():
    """'Within 1.25x' and 'at least 1.8x' include the limit itself: <= and >=, not < and >."""
    report = _report()
    report["ops"][0]["fused_over_floor"] = 1.25
    report["ops"][1]["compile_over_fused"] = 1.8
    rows = _by_target(targets.evaluate(report))
    assert rows["cfc_relax (nchw): forward time / floor <= 1.25"]["verdict"] == "met"
    assert rows["cfc_relax (nchw): forward+backward speed-up over compile >= 1.8"]["verdict"] == "met"


def test_a_compiled_row_that_ran_right_counts_and_a_parity_error_does_not():
    """A compiled row's good status reads 'ok (n graph(s), m break(s))' (gpu_report.e2e_section):
    it counts like 'ok'. An op row whose parity check could not run ('ERROR') did not pass: invalid."""
    report = _report()
    train = {r["name"]: r for r in report["e2e"]["train"]}
    train["ref_compile_cl"]["status"] = "ok (3 graph(s), 0 break(s))"
    train["fused_compile_cl"].update(train_ms=50.0, status="ok (2 graph(s), 0 break(s))")
    report["ops"][2]["parity"] = "ERROR"
    rows = _by_target(targets.evaluate(report))
    compiled = rows["train step: compile(reference) ms / compile(fused) ms >= 1.5"]
    assert compiled["verdict"] == "met" and compiled["value"] == 1.6
    assert rows["adaln (channels_last): forward+backward time / floor <= 1.5"]["verdict"] == "invalid: parity ERROR"


def test_a_skipped_row_is_not_measured_and_a_bad_opt_in_row_is_still_shown():
    """A row with no number (skipped before timing) reads 'not measured', and a skipped opt-in
    row adds no information row; an opt-in row that has a number from a bad run is listed as
    invalid even when the reference it is compared with has no number."""
    report = _report()
    report["e2e"]["train"].append({"name": "fused_dw_graph_cl", "label": "fused + CUDA graph + Triton depthwise",
                                   "status": "skipped"})
    ref_sample = report["e2e"]["sample"][0]
    ref_sample.update(status="skipped", images_per_s=None)
    report["e2e"]["sample"].append({"name": "fused_pw_graph_cl", "label": "fused + CUDA graph + Triton pointwise",
                                    "images_per_s": 20.0, "status": "NON-FINITE"})
    rows = targets.evaluate(report)
    by = _by_target(rows)
    assert by["sampling: fused images/s / compile(reference) images/s >= 1.5"]["verdict"] == "not measured"
    info = [(r["target"], r["verdict"]) for r in rows if r["target"].endswith("information)")]
    assert ("sampling: fused images/s / compile(reference) images/s >= 1.5 (opt-in kernels, information)",
            "invalid: fused + CUDA graph + Triton pointwise: NON-FINITE") in info
    assert len(info) == 3  # fused_pw_graph_cl's two train checks and its sampling check


def test_an_op_target_reads_the_cuda_graph_time_where_the_report_has_it():
    """The kernels' GPU time decides (the per-call time also holds the host's costs), and the
    measured column says so; without a graph time, the per-call ratio as before."""
    report = _report()
    cfc = next(r for r in report["ops"] if (r["op"], r["pass"]) == ("cfc_relax", "fwdbwd"))
    cfc.update(fused_graph_over_floor=1.1, compile_graph_over_fused=1.2)
    rows = _by_target(targets.evaluate(report))
    floor_row = rows["cfc_relax (nchw): forward+backward time / floor <= 1.25"]
    assert (floor_row["verdict"], floor_row["measured"], floor_row["value"]) == ("met", "1.10 (CUDA graph)", 1.1)
    assert rows["cfc_relax (nchw): forward+backward speed-up over compile >= 1.8"]["verdict"] == "missed"
    assert rows["cfc_relax (nchw): forward time / floor <= 1.25"]["measured"] == "1.10"
