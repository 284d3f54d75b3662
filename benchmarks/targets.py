"""The issues' performance targets, checked against a GPU report (``gpu_report.py``'s
report.json): each target, the number the report measured for it, and whether it was met.

Issue 3 (CfC gate + relaxation, bf16 [8, 64, 256, 256], each layout): forward and
forward+backward within 1.25x of the memory floor; forward+backward at least 1.8x faster than
``torch.compile`` of the reference.
Issue 4 (AdaLN, with and without the residual, each layout): forward+backward within 1.5x of the
floor and at least 3x faster than ``torch.compile``.
Issue 7 (tiny preset, 256 px, batch 8, bf16, against ``torch.compile`` of the reference in
channels_last): the fused train step at least 1.3x faster, fused + ``torch.compile`` at least
1.5x; the fused step's peak memory at most 0.6x; sampling throughput at least 1.5x. The fused
rows are the eager ones (the default kernels, and each opt-in set): the best counts, named.

Quick-mode reports (tiny sizes, CPU) are checked the same way; their verdicts mean nothing,
which the report header says.
"""
from __future__ import annotations

from dataclasses import dataclass

# The eager fused variants of the report (gpu_report.VARIANTS), any of which meets issue 7's
# "fused" targets: the default kernels and each opt-in set.
FUSED_EAGER = ("fused_cl", "fused_dw_cl", "fused_pw_cl", "fused_all_cl")
COMPILED_REFERENCE = "ref_compile_cl"


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


def _verdict(value, limit: float, at_most: bool) -> str:
    if value is None:
        return "not measured"
    return "met" if (value <= limit if at_most else value >= limit) else "missed"


def _row(issue: int, target: str, measured: str, value, limit: float, at_most: bool) -> dict:
    return {"issue": issue, "target": target, "measured": measured, "value": value,
            "verdict": _verdict(value, limit, at_most)}


def _op_rows(report: dict) -> list[dict]:
    rows = []
    for t in OP_TARGETS:
        found = [r for r in report.get("ops", []) if r["op"] == t.op and r["pass"] == t.mode]
        limit = f"{t.what} {'<=' if t.at_most else '>='} {t.limit}"
        if not found:
            rows.append(_row(t.issue, f"{t.op}: {limit}", "-", None, t.limit, t.at_most))
        for r in found:
            value = r.get(t.key)
            rows.append(_row(t.issue, f"{r['title']} ({r['layout']}): {limit}",
                             "-" if value is None else f"{value:.2f}", value, t.limit, t.at_most))
    return rows


def _best(rows: dict, names, key: str, lowest: bool) -> dict:
    """The measured row among ``names`` with the best ``key`` (empty when none was measured)."""
    measured = [rows[n] for n in names if rows.get(n, {}).get(key) is not None]
    if not measured:
        return {}
    return (min if lowest else max)(measured, key=lambda r: r[key])


def _against(row: dict, base: dict, key: str, per_time: bool):
    """(ratio, text) of ``row`` against the compiled reference's ``base`` row: base / row for a
    time (a speed-up), row / base otherwise; (None, "-") when either is missing."""
    value, reference = row.get(key), base.get(key)
    if value is None or not reference:
        return None, "-"
    ratio = reference / value if per_time else value / reference
    return ratio, f"{ratio:.2f} ({row['label']})"


def _e2e_rows(report: dict) -> list[dict]:
    e2e = report.get("e2e") or {}
    train = {r["name"]: r for r in e2e.get("train", [])}
    sample = {r["name"]: r for r in e2e.get("sample", [])}
    base_train, base_sample = train.get(COMPILED_REFERENCE, {}), sample.get(COMPILED_REFERENCE, {})
    checks = (
        ("train step: compile(reference) ms / fused ms >= 1.3", 1.3, False,
         _against(_best(train, FUSED_EAGER, "train_ms", lowest=True), base_train, "train_ms", True)),
        ("train step: compile(reference) ms / compile(fused) ms >= 1.5", 1.5, False,
         _against(train.get("fused_compile_cl", {}), base_train, "train_ms", True)),
        ("train step: fused peak / compile(reference) peak <= 0.6", 0.6, True,
         _against(_best(train, FUSED_EAGER, "peak_GiB", lowest=True), base_train, "peak_GiB", False)),
        ("sampling: fused images/s / compile(reference) images/s >= 1.5", 1.5, False,
         _against(_best(sample, FUSED_EAGER, "images_per_s", lowest=False), base_sample, "images_per_s", False)),
    )
    return [_row(7, target, text, value, limit, at_most) for target, limit, at_most, (value, text) in checks]


def evaluate(report: dict) -> list[dict]:
    """One row per target: issue, target, measured (text), value, verdict (met, missed, not measured)."""
    return _op_rows(report) + _e2e_rows(report)
