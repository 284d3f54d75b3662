"""The benchmark machinery itself: memory-floor accounting, the report's rendering, and (slow)
the GPU report end to end in quick mode. Nothing here asserts anything about time."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import cases, gpu_report, targets

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
        (o, lay, m) for o in cases.OP_NAMES for lay in cases.OPS[o].layouts for m in cases.OPS[o].modes}
    assert all(r["eager_ms"] is not None and r["floor_ms"] > 0 for r in report["ops"])
    rows = report["e2e"]["train"] + report["e2e"]["sample"]
    assert [r["status"] for r in rows] == ["ok", "ok"], report["notes"]
    assert rows[0]["train_ms"] > 0 and rows[1]["images_per_s"] > 0
    assert rows[0]["profile"]["top"], rows[0].get("profile_error")
    assert rows[1]["profile"]["top"] and rows[1]["profile"]["timed_ms"] > 0, rows[1].get("profile_error")
    assert "## Where a train step's time goes" in proc.stdout
    assert "## Where a sampling step (one Euler step: a forward without grad)'s time goes" in proc.stdout
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


def test_every_variant_has_its_place_in_the_tables():
    assert sorted(gpu_report.ROW_ORDER) == sorted(gpu_report.VARIANTS)
    assert gpu_report.ROW_ORDER.index("fused_cudnn1x1_graph_cl") == gpu_report.ROW_ORDER.index("fused_graph_cl") + 1


def test_the_rows_the_targets_read_are_timed_first():
    tasks = [("train", n) for n in gpu_report.TRAIN_ORDER] + [("sample", n) for n in gpu_report.SAMPLE_ORDER]
    ordered = gpu_report.timing_order(tasks)
    assert ordered[:len(targets.MEASURED_TASKS)] == list(targets.MEASURED_TASKS)
    assert sorted(ordered) == sorted(tasks)
    assert gpu_report.timing_order([("train", "fused_nchw"), ("sample", "fused_cl")]) == [
        ("sample", "fused_cl"), ("train", "fused_nchw")]


class _FakeWorker:
    """What wait_for_workers and e2e_section read of a Worker; ready after ``ready_after`` s."""

    def __init__(self, task, name, ready_after=None, result=None, ready_graphs=None):
        self.task, self.name, self.key = task, name, f"{task}:{name}"
        self.state, self.error, self.compile_s = "starting", None, None
        self.ready_after, self.t0 = ready_after, time.monotonic()
        self.result, self.ready_graphs = result, ready_graphs

    def drain(self):
        if self.state == "starting" and self.ready_after is not None and time.monotonic() - self.t0 >= self.ready_after:
            self.state = "ready"

    def kill(self, state, reason):
        self.state, self.error = state, reason


def test_still_compiling_the_other_rows_are_given_up_before_the_targets_rows():
    clock = gpu_report.Clock(60)
    late_target = _FakeWorker("train", "ref_compile_cl", ready_after=0.5)
    extra = _FakeWorker("train", "fused_dw_graph_cl", ready_after=30)
    ready_extra = _FakeWorker("sample", "ref_eager_cl", ready_after=0)
    workers = {(w.task, w.name): w for w in (late_target, extra, ready_extra)}
    now = time.monotonic()
    gpu_report.wait_for_workers(workers, clock, others_by=now, targets_by=now + 5, budget=60)
    assert (late_target.state, extra.state, ready_extra.state) == ("ready", "skipped", "ready")
    assert "compile deadline" in extra.error
    never = _FakeWorker("sample", "fused_cl")
    gpu_report.wait_for_workers({("sample", "fused_cl"): never}, clock, now, time.monotonic() + 0.3, 60)
    assert never.state == "skipped"


def test_an_interrupt_is_not_taken_for_a_failed_timing(monkeypatch):
    """The outer timeout's SIGTERM must end the run (and write the report), not become one op
    row's "timing failed" note while the run goes on past its budget."""
    case = cases.make_op_case("cfc_relax", (1, 3, 2, 2), torch.float32, "cpu", "nchw")
    entry = {"op": "cfc_relax", "layout": "nchw", "case": case, "callables": {("fused", "fwd"): lambda: None}}

    def interrupted(*args):
        raise gpu_report._Interrupted("signal 15")

    monkeypatch.setattr(cases, "time_ms", interrupted)
    notes = []
    with pytest.raises(gpu_report._Interrupted):
        gpu_report.time_ops([entry], torch.device("cpu"), 100.0, True, notes, gpu_report.Clock(60), keep_s=0)
    assert notes == []


def test_a_row_that_compiled_while_timed_or_trained_another_model_is_flagged():
    cfg = cases.e2e_config(True)
    done = {"event": "result", "train_ms": 5.0, "peak_GiB": 1.0}
    workers = {
        ("train", "ref_eager_cl"): _FakeWorker("train", "ref_eager_cl", result=dict(done, loss=1.00)),
        ("train", "fused_cl"): _FakeWorker("train", "fused_cl", result=dict(done, loss=1.005)),
        ("train", "fused_pw_graph_cl"): _FakeWorker("train", "fused_pw_graph_cl", result=dict(done, loss=1.2)),
        ("train", "ref_compile_cl"): _FakeWorker("train", "ref_compile_cl", ready_graphs=3,
                                                 result=dict(done, loss=1.5, graphs=5, graph_breaks=0)),
        ("train", "fused_compile_cl"): _FakeWorker("train", "fused_compile_cl", ready_graphs=2,
                                                   result=dict(done, loss=1.0, graphs=2, graph_breaks=0)),
    }
    for w in workers.values():
        w.state = "done"
    notes = []
    rows = {r["name"]: r for r in gpu_report.e2e_section(workers, cfg, notes)["train"]}
    assert rows["ref_compile_cl"]["status"] == "RECOMPILED (2 more graph(s) while timed)"
    assert rows["fused_compile_cl"]["status"] == "ok (2 graph(s), 0 break(s))"
    assert rows["fused_cl"]["loss_vs_reference"] == pytest.approx(0.005)
    assert "loss_vs_reference" not in rows["ref_compile_cl"]  # compiled rows: not compared
    flagged = [n for n in notes if "check it computes the same model" in n]
    assert len(flagged) == 1 and flagged[0].startswith("train fused_pw_graph_cl: last loss 1.2000")
    # ... and its numbers count for no target; a loss within the tolerance leaves the row as it was.
    assert rows["fused_pw_graph_cl"]["status"] == "LOSS OFF (+20.0% vs the eager reference)"
    assert rows["fused_cl"]["status"] == "ok"
    verdicts = [r["verdict"] for r in targets.evaluate({"e2e": {"train": list(rows.values())}})]
    assert any(v.startswith("invalid") and "LOSS OFF" in v for v in verdicts), verdicts


def test_op_rows_ratios_and_per_pass_parity():
    """Each op row's ratios are numerator over denominator as their names say (fused / floor,
    compile / fused, eager / fused), and its parity error is the outputs' in the forward row and
    the gradients' in the forward+backward row, each against the tolerance."""
    ms = {("eager", "fwd"): 4.0, ("compile", "fwd"): 3.0, ("fused", "fwd"): 2.0,
          ("eager", "fwdbwd"): 12.0, ("compile", "fwdbwd"): 9.0, ("fused", "fwdbwd"): 6.0}
    entry = {"op": "adaln", "title": "AdaLN", "layout": "channels_last", "ms": ms,
             "floor_ms": {"fwd": 1.0, "fwdbwd": 4.0}, "floor_bytes": {"fwd": 10, "fwdbwd": 40}, "parity": "PASS",
             "parity_fused": {"out": 1e-3, "dx": 5e-2, "dscale": 1e-4}, "parity_tol": 1e-2,
             "parity_eager": {"out": 2e-3, "dx": 3e-3}}
    fwd, bwd = gpu_report.op_rows([entry])
    assert (fwd["pass"], fwd["fused_over_floor"], fwd["compile_over_fused"], fwd["eager_over_fused"]) == (
        "fwd", 2.0, 1.5, 2.0)
    assert (fwd["compile_over_floor"], fwd["eager_over_floor"]) == (3.0, 4.0)
    assert (bwd["pass"], bwd["fused_over_floor"], bwd["compile_over_fused"]) == ("fwdbwd", 1.5, 1.5)
    assert (fwd["parity_err"], fwd["parity"], fwd["eager_bf16_err"]) == (1e-3, "PASS", 2e-3)
    assert (bwd["parity_err"], bwd["parity"], bwd["eager_bf16_err"]) == (5e-2, "FAIL", 3e-3)


def test_the_floor_time_is_the_floor_bytes_over_the_copy_bandwidth_in_ms(monkeypatch):
    """floor_ms = floor bytes / (GB/s * 1e9) * 1e3: milliseconds, like the timings beside it."""
    case = cases.make_op_case("cfc_relax", (1, 3, 2, 2), torch.float32, "cpu", "nchw")
    entry = {"op": "cfc_relax", "layout": "nchw", "case": case, "callables": {("fused", "fwd"): lambda: None}}
    monkeypatch.setattr(cases, "time_ms", lambda *args: 0.5)
    gpu_report.time_ops([entry], torch.device("cpu"), 100.0, True, [], gpu_report.Clock(60), keep_s=0)
    for mode in cases.MODES:
        assert entry["floor_bytes"][mode] == case.floor_bytes(mode)
        assert entry["floor_ms"][mode] == pytest.approx(case.floor_bytes(mode) / 100e9 * 1e3)
    assert entry["ms"] == {("fused", "fwd"): 0.5}


def test_cuda_graph_times_get_their_own_ratios_table_and_headline(monkeypatch):
    """Where a call replays from a CUDA graph, its GPU time is kept beside the per-call time,
    with ratios of its own, a table of its own and a headline clause; a capture that fails
    leaves a note and the per-call time."""
    case = cases.make_op_case("cfc_relax", (1, 3, 2, 2), torch.float32, "cpu", "channels_last")
    calls = {("fused", "fwd"): lambda: None, ("compile", "fwd"): lambda: None, ("eager", "fwdbwd"): lambda: None}
    entry = {"op": "cfc_relax", "title": "CfC", "layout": "channels_last", "case": case, "callables": calls}
    graph = {calls[("fused", "fwd")]: 0.2, calls[("compile", "fwd")]: 0.3}

    def time_graph_ms(fn, device):
        if fn not in graph:
            raise RuntimeError("capture failed")
        return graph[fn]

    monkeypatch.setattr(cases, "time_ms", lambda *args: 0.5)
    monkeypatch.setattr(cases, "time_graph_ms", time_graph_ms)
    notes = []
    gpu_report.time_ops([entry], torch.device("cpu"), 100.0, True, notes, gpu_report.Clock(60), keep_s=0)
    assert entry["ms"] == {key: 0.5 for key in calls}
    assert entry["graph_ms"] == {("fused", "fwd"): 0.2, ("compile", "fwd"): 0.3}
    assert notes == ["cfc_relax channels_last eager fwdbwd: CUDA-graph timing failed: RuntimeError('capture failed')"]
    fwd = gpu_report.op_rows([entry])[0]
    floor = entry["floor_ms"]["fwd"]
    assert (fwd["fused_graph_ms"], fwd["compile_graph_over_fused"]) == (0.2, pytest.approx(1.5))
    assert fwd["fused_graph_over_floor"] == pytest.approx(0.2 / floor) and fwd["fused_over_floor"] == pytest.approx(0.5 / floor)
    report = _fake_report()
    report["ops"] = [dict(fwd, parity="PASS")]
    md = gpu_report.render_markdown(report)
    assert f"| CfC | channels_last | fwd | - | 0.300 | 0.200 | {floor:.3f} | {0.2 / floor:.2f} | 1.50 | - |" in md
    assert gpu_report.headline(report)[0].endswith(
        f"; CUDA graph: fused 0.200 ms = {0.2 / floor:.2f}x floor, torch.compile 0.300 ms (1.50x fused)")


def test_the_tables_put_each_number_under_its_column():
    """The op table's compile/fused and eager/fused columns, and the train table's speed-ups
    against eager NCHW and against the compiled reference, are not swapped."""
    report = _fake_report()
    report["ops"][0].update(fused_ms=0.5, fused_over_floor=5.0, compile_over_fused=0.4, eager_over_fused=2.0)
    report["e2e"] = {"train": [{"name": "fused_cl", "label": "fused", "layout": "channels_last", "train_ms": 50.0,
                                "speedup_vs_ref_eager_nchw": 3.0, "speedup_vs_ref_compile_cl": 1.25, "peak_GiB": 8.0,
                                "transient_GiB": 4.0, "compile_s": None, "status": "ok"}],
                     "sample": [{"name": "fused_cl", "label": "fused", "layout": "channels_last", "images_per_s": 12.0,
                                 "sample_s": 0.5, "peak_GiB": 2.0, "status": "ok"}]}
    md = gpu_report.render_markdown(report)
    assert "| CfC gate+relax | nchw | fwd | 1.000 | 0.200 | 0.500 | 0.100 | 5.00 | 0.40 | 2.00 | ERROR |" in md
    assert "| fused | channels_last | 50.0 | 3.00 | 1.25 | 8.00 | 4.00 | - | - | ok |" in md
    assert "| fused | channels_last | 12.0 | 0.50 | 2.00 | - | ok |" in md


def test_the_headline_reads_channels_last_ops_and_the_compiled_reference():
    """The headline's op lines are the channels_last rows only; its train lines compare with
    torch.compile(reference) channels_last, not another reference row."""
    report = _fake_report()
    report["ops"][0].update(fused_ms=0.5)  # an nchw row: not in the headline
    report["ops"].append(dict(report["ops"][0], layout="channels_last", fused_ms=0.3, fused_over_floor=3.0,
                              compile_ms=0.6, compile_over_fused=2.0, parity="PASS"))
    report["e2e"] = {"train": [
        {"name": "ref_eager_cl", "label": "reference eager", "train_ms": 200.0, "peak_GiB": 20.0},
        {"name": "ref_compile_cl", "label": "torch.compile(reference)", "train_ms": 80.0, "peak_GiB": 16.0},
        {"name": "fused_cl", "label": "fused", "train_ms": 50.0, "peak_GiB": 8.0}]}
    assert gpu_report.headline(report) == [
        "CfC gate+relax fwd (channels_last): fused 0.300 ms = 3.00x floor; torch.compile 0.600 ms (2.00x fused); parity PASS",
        "train step, fused channels_last: 50.0 ms, peak 8.0 GiB vs torch.compile(reference) channels_last 80.0 ms, 16.0 GiB"]


def test_e2e_section_speedups_non_finite_samples_and_a_lower_loss():
    """speedup_vs_X = X's step ms / the row's (above 1: faster than X); a sampling row whose
    images are not finite reads NON-FINITE; a loss far below the reference's is flagged as much
    as one far above it."""
    cfg = cases.e2e_config(True)
    workers = {
        ("train", "ref_eager_nchw"): _FakeWorker("train", "ref_eager_nchw", result={"train_ms": 100.0, "loss": 1.0}),
        ("train", "ref_eager_cl"): _FakeWorker("train", "ref_eager_cl", result={"train_ms": 80.0, "loss": 1.0}),
        ("train", "ref_compile_cl"): _FakeWorker("train", "ref_compile_cl", result={"train_ms": 50.0, "loss": 1.0}),
        ("train", "fused_cl"): _FakeWorker("train", "fused_cl", result={"train_ms": 25.0, "loss": 0.9}),
        ("sample", "fused_cl"): _FakeWorker("sample", "fused_cl", result={"images_per_s": 3.0, "finite": False}),
    }
    for w in workers.values():
        w.state = "done"
    notes = []
    section = gpu_report.e2e_section(workers, cfg, notes)
    fused = {r["name"]: r for r in section["train"]}["fused_cl"]
    assert (fused["speedup_vs_ref_eager_nchw"], fused["speedup_vs_ref_compile_cl"]) == (4.0, 2.0)
    assert section["sample"][0]["status"] == "NON-FINITE"
    assert any(n.startswith("train fused_cl: last loss 0.9000") for n in notes)


class _FakeTrainer:
    """Each train step or sample() call advances a fake clock by the next of ``durations`` s."""

    def __init__(self, clock, durations):
        self.clock, self.durations = clock, list(durations)

    def _tick(self):
        self.clock.now += self.durations.pop(0)

    def train_step(self, images, sync=True):
        self._tick()
        return {"loss": 1.0, "grad_norm": 1.0} if sync else {"loss": torch.tensor(1.0), "grad_norm": torch.tensor(1.0)}

    def sample(self, batch, image, **kw):
        self._tick()
        return torch.zeros(batch, 3, image, image)


def test_train_ms_is_the_mean_step_and_images_per_s_batch_over_median_seconds(monkeypatch):
    """train_ms: the mean time in ms of steps run back to back (as a training loop runs them,
    each queued while the last runs: per-step times would need a wait after each);
    images_per_s: the batch over the median seconds of a sample() call."""
    import dataclasses
    import types

    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(gpu_report, "time", types.SimpleNamespace(perf_counter=lambda: clock.now))
    cpu = torch.device("cpu")
    cfg = dataclasses.replace(cases.QUICK_E2E, train_steps=3, sample_runs=3, batch=4)
    out = gpu_report._measure_train(_FakeTrainer(clock, [1.0, 2.0, 9.0]), None, cfg, cpu)
    assert out["train_ms"] == 4000.0 and (out["loss"], out["grad_norm"]) == (1.0, 1.0)
    out = gpu_report._measure_sample(_FakeTrainer(clock, [1.0, 2.0, 9.0]), cfg, cpu, gpu_report.VARIANTS["fused_cl"])
    assert (out["sample_s"], out["images_per_s"], out["finite"]) == (2.0, 2.0, True)


def test_the_full_model_config_is_issue_7s():
    """Issue 7's model rows: tiny preset, 256 px, batch 8, 50 Euler sampling steps."""
    cfg = cases.e2e_config(False)
    assert (cfg.preset, cfg.image, cfg.batch, cfg.sample_steps, cfg.overrides) == ("tiny", 256, 8, 50, ())
    assert cfg.describe() == "tiny, 256 px, batch 8"


def test_report_json_is_strict_json_with_non_finite_numbers_as_text():
    """A NaN parity error or an inf loss is written as text, so report.json parses anywhere (bare
    NaN and Infinity are Python's extension of JSON); finite numbers and the structure are kept."""
    report = {"ops": [{"parity_err": float("nan"), "ms": [1.5, float("inf")]}], "e2e": {"loss": -float("inf")}, "n": 3}
    text = json.dumps(gpu_report.strict_json(report), allow_nan=False)

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    assert json.loads(text, parse_constant=refuse) == {"ops": [{"parity_err": "nan", "ms": [1.5, "inf"]}],
                                                       "e2e": {"loss": "-inf"}, "n": 3}


def test_opt_in_variants_run_only_when_named():
    """The reduce-overhead compiles (OPT_IN_VARIANTS) stay out of a default report and run when
    --variants names them; compiled rows need --compile, CUDA-graph rows a GPU."""
    default = gpu_report.model_tasks(True, None, True)
    assert default and not {n for _, n in default} & set(gpu_report.OPT_IN_VARIANTS)
    named = gpu_report.model_tasks(True, ["fused_compile_ro_cl", "fused_cl"], True)
    assert named == [("train", "fused_cl"), ("train", "fused_compile_ro_cl"),
                     ("sample", "fused_cl"), ("sample", "fused_compile_ro_cl")]
    assert gpu_report.model_tasks(False, ["fused_compile_ro_cl"], True) == []
    assert not any(gpu_report.VARIANTS[n].cuda_graph for _, n in gpu_report.model_tasks(True, None, False))
    assert gpu_report.VARIANTS["fused_compile_ro_cl"].compile_option == {"mode": "reduce-overhead"}
    assert gpu_report.VARIANTS["fused_compile_cl"].compile_option is True
    assert gpu_report.VARIANTS["fused_cl"].compile_option is False
