"""The issues' performance targets, checked against a GPU report (``gpu_report.py``'s
report.json): each target, the number the report measured for it, and whether it was met.

Issue 3 (CfC gate + relaxation, bf16 [8, 64, 256, 256], each layout): forward and
forward+backward within 1.25x of the memory floor; forward+backward at least 1.8x faster than
``torch.compile`` of the reference.
Issue 4 (AdaLN, with and without the residual, each layout): forward+backward within 1.5x of the
floor and at least 3x faster than ``torch.compile``.
Issue 7 (tiny preset, 256 px, batch 8, bf16, against ``torch.compile`` of the reference in
channels_last): the fused train step at least 1.3x faster, fused + ``torch.compile`` at least
1.5x; the fused step's peak memory at most 0.6x; sampling throughput at least 1.5x. "Fused" is
the fused model as a user gets it, with the default kernels: eager (``FUSED``) and replayed from
CUDA graphs (``FUSED_GRAPH``, the trainer's ``cuda_graph=True``), each checked against all three
targets; each opt-in kernel set's row is checked too, as information for ``runtime.OPT_IN``.

An op target reads the op's time replayed from a CUDA graph (GPU time: the kernels the issue
asked for) where the report has it, else the per-call time, which also holds the host's costs;
its "measured" column says which.
A number counts only from a row that ran as it should: an op row whose parity passed, a model
row whose status is "ok" (not "NON-FINITE", "NOT COMPILED", "RECOMPILED", or "LOSS OFF": an
eager row whose last loss is not the eager reference's); otherwise the verdict is "invalid" and
says why. A row that was killed or skipped has no number: "not measured".

Quick-mode reports (tiny sizes, CPU) are checked the same way; their verdicts mean nothing,
which the report header says.
"""
from __future__ import annotations

from dataclasses import dataclass

# The report's model variants (gpu_report.VARIANTS) the targets read.
COMPILED_REFERENCE = "ref_compile_cl"
FUSED = "fused_cl"  # the default kernels: what "the fused step" is for a user
FUSED_GRAPH = "fused_graph_cl"  # the same, replayed from CUDA graphs (cuda_graph=True)
FUSED_COMPILED = "fused_compile_cl"
OPT_IN_FUSED = ("fused_dw_graph_cl", "fused_pw_graph_cl", "fused_all_graph_cl")  # information only
# (task, variant) rows the verdicts need: the report times them first.
MEASURED_TASKS = (("train", COMPILED_REFERENCE), ("train", FUSED), ("train", FUSED_GRAPH), ("train", FUSED_COMPILED),
                  ("sample", COMPILED_REFERENCE), ("sample", FUSED), ("sample", FUSED_GRAPH))


@dataclass(frozen=True)
class OpTarget:
    issue: int
    op: str  # cases.OPS name
    mode: str  # "fwd" or "fwdbwd"
    key: str  # the op row's ratio
    limit: float
    at_most: bool  # the ratio must be <= limit (else >=)
    what: str


OP_TARGETS = (
    OpTarget(3, "cfc_relax", "fwd", "fused_over_floor", 1.25, True, "forward time / floor"),
    OpTarget(3, "cfc_relax", "fwdbwd", "fused_over_floor", 1.25, True, "forward+backward time / floor"),
    OpTarget(3, "cfc_relax", "fwdbwd", "compile_over_fused", 1.8, False, "forward+backward speed-up over compile"),
    *(OpTarget(4, op, "fwdbwd", key, limit, at_most, what)
      for op in ("adaln", "adaln_residual")
      for key, limit, at_most, what in (("fused_over_floor", 1.5, True, "forward+backward time / floor"),
                                         ("compile_over_fused", 3.0, False, "forward+backward speed-up over compile"))),
)


def floor_limit(op: str, mode: str) -> float | None:
    """The issues' limit on the fused op's time over its floor in ``mode``, or None."""
    return next((t.limit for t in OP_TARGETS if (t.op, t.mode, t.key) == (op, mode, "fused_over_floor")), None)


def _verdict(value, limit: float, at_most: bool, invalid: str | None = None) -> str:
    if invalid:
        return f"invalid: {invalid}"
    if value is None:
        return "not measured"
    return "met" if (value <= limit if at_most else value >= limit) else "missed"


def _row(issue: int, target: str, measured: str, value, limit: float, at_most: bool, invalid: str | None = None) -> dict:
    return {"issue": issue, "target": target, "measured": measured, "value": None if invalid else value,
            "verdict": _verdict(value, limit, at_most, invalid)}


def _op_invalid(row: dict) -> str | None:
    """Why an op row's numbers can't count (its parity did not pass), or None."""
    parity = row.get("parity")
    return None if parity in (None, "PASS") else f"parity {parity}"


def _model_invalid(row: dict) -> str | None:
    """Why a model row's numbers can't count (its status is not "ok ..."), or None."""
    status = row.get("status")
    return None if status is None or str(status).startswith("ok") else f"{row.get('label', row.get('name'))}: {status}"


def _op_rows(report: dict) -> list[dict]:
    rows = []
    for t in OP_TARGETS:
        found = [r for r in report.get("ops", []) if r["op"] == t.op and r["pass"] == t.mode]
        limit = f"{t.what} {'<=' if t.at_most else '>='} {t.limit}"
        if not found:
            rows.append(_row(t.issue, f"{t.op}: {limit}", "-", None, t.limit, t.at_most))
        for r in found:
            graph = r.get(t.key.replace("_over_", "_graph_over_"))
            value = r.get(t.key) if graph is None else graph
            text = "-" if value is None else f"{value:.2f}" + ("" if graph is None else " (CUDA graph)")
            rows.append(_row(t.issue, f"{r['title']} ({r['layout']}): {limit}", text, value, t.limit, t.at_most,
                             _op_invalid(r)))
    return rows


def _against(row: dict, base: dict, key: str, per_time: bool):
    """(ratio, text, why invalid) of ``row`` against the compiled reference's ``base`` row:
    base / row for a time (a speed-up), row / base otherwise; (None, "-", ...) when either is
    missing."""
    invalid = "; ".join(filter(None, (_model_invalid(r) for r in (row, base) if r.get(key) is not None))) or None
    value, reference = row.get(key), base.get(key)
    if value is None or not reference:
        return None, "-", invalid
    ratio = reference / value if per_time else value / reference
    return ratio, f"{ratio:.2f} ({row['label']})", invalid


def _fused_checks(train: dict, sample: dict, name: str) -> list[tuple]:
    """Issue 7's three targets of one fused variant: (target, limit, at most, against)."""
    base_train, base_sample = train.get(COMPILED_REFERENCE, {}), sample.get(COMPILED_REFERENCE, {})
    return [
        ("train step: compile(reference) ms / fused ms >= 1.3", 1.3, False,
         _against(train.get(name, {}), base_train, "train_ms", True)),
        ("train step: fused peak / compile(reference) peak <= 0.6", 0.6, True,
         _against(train.get(name, {}), base_train, "peak_GiB", False)),
        ("sampling: fused images/s / compile(reference) images/s >= 1.5", 1.5, False,
         _against(sample.get(name, {}), base_sample, "images_per_s", False)),
    ]


def _e2e_rows(report: dict) -> list[dict]:
    e2e = report.get("e2e") or {}
    train = {r["name"]: r for r in e2e.get("train", [])}
    sample = {r["name"]: r for r in e2e.get("sample", [])}
    checks = _fused_checks(train, sample, FUSED)
    checks.insert(1, ("train step: compile(reference) ms / compile(fused) ms >= 1.5", 1.5, False,
                      _against(train.get(FUSED_COMPILED, {}), train.get(COMPILED_REFERENCE, {}), "train_ms", True)))
    rows = [_row(7, target, text, value, limit, at_most, invalid)
            for target, limit, at_most, (value, text, invalid) in checks]
    rows += [_row(7, f"{target} (CUDA graph)", text, value, limit, at_most, invalid)
             for target, limit, at_most, (value, text, invalid) in _fused_checks(train, sample, FUSED_GRAPH)]
    for name in OPT_IN_FUSED:  # measured rows only: the opt-in sets are skipped first when time runs short
        rows += [_row(7, f"{target} (opt-in kernels, information)", text, value, limit, at_most, invalid)
                 for target, limit, at_most, (value, text, invalid) in _fused_checks(train, sample, name)
                 if value is not None or invalid]
    return rows


def evaluate(report: dict) -> list[dict]:
    """One row per target: issue, target, measured (text), value, verdict (met, missed, not measured)."""
    return _op_rows(report) + _e2e_rows(report)
