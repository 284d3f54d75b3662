"""Peak memory of one train step, without a GPU: the most bytes alive at once, and what they are.

The step of ``benchmarks.traffic`` (forward under bf16 autocast, the loss, backward) runs under
``FakeTensorMode``; every storage an op creates is followed from that op until it is freed (a
weak reference to it), rounded up to the CUDA caching allocator's 512-byte blocks. The peak is
the largest sum of those, plus what a trainer keeps between steps: parameters, EMA weights and
AdamW's two moments (four copies of the parameters in fp32). That is the figure
``torch.cuda.max_memory_allocated`` reports, less what no op shows here: the workspaces of
cuDNN and cuBLAS, the per-program partial sums inside our custom ops, and the optimizer step's
temporaries (small for these presets).

At the peak, the live bytes are listed by the phase and module kind that made them: the
activations a forward kept for backward, and the gradients and recomputed tensors backward
holds at that moment.

    python -m benchmarks.peak_memory [--preset tiny --image-size 256 --batch 8]
"""
from __future__ import annotations

import collections
import sys
import weakref

import torch

from benchmarks import traffic
from benchmarks.saved_memory import GiB, step_main
from liquiddiff import build

# The caching allocator hands out blocks in multiples of 512 bytes.
BLOCK = 512
# Copies of the parameters a trainer keeps between steps: weights, EMA, AdamW's two moments.
PERSISTENT_COPIES = 4


def _rounded(nbytes: int) -> int:
    return -(-nbytes // BLOCK) * BLOCK


class _LiveBytes(traffic._Recorder):
    """The traffic recorder that also follows each storage an op creates until it is freed, and
    remembers what was alive when the total was largest."""

    def __init__(self, persistent: int):
        super().__init__(traffic.Ledger())
        self.persistent = persistent
        self.live: dict[int, tuple[int, tuple[str, str]]] = {}  # storage -> (bytes, (phase, kind))
        self.refs: dict[int, weakref.ref] = {}
        self.current = persistent
        self.peak = persistent
        self.at_peak: dict[tuple[str, str], int] = {}
        self.peak_op = ("", "", "")
        self.phase_peaks: dict[str, int] = {}  # the most alive at once during each phase

    def _freed(self, key: int) -> None:
        nbytes, _ = self.live.pop(key)
        del self.refs[key]
        self.current -= nbytes

    def record(self, key, ins, outs):
        super().record(key, ins, outs)
        owner, _, phase = key
        for t in outs:
            storage = t.untyped_storage()
            ident, nbytes = storage._cdata, _rounded(storage.nbytes())
            if ident in self.live:
                # An op with out= may have resized a storage made empty.
                before, tag = self.live[ident]
                self.live[ident] = (nbytes, tag)
                self.current += nbytes - before
                continue
            self.live[ident] = (nbytes, (phase, owner))
            self.refs[ident] = weakref.ref(storage, lambda _, ident=ident: self._freed(ident))
            self.current += nbytes
        self.phase_peaks[phase] = max(self.phase_peaks.get(phase, 0), self.current)
        if self.current > self.peak:
            self.peak, self.peak_op = self.current, key
            at_peak: collections.Counter = collections.Counter()
            for nbytes, tag in self.live.values():
                at_peak[tag] += nbytes
            self.at_peak = dict(at_peak)


def step_peak(model: torch.nn.Module, batch: int, size: int, channels_last: bool) -> _LiveBytes:
    """The live-bytes record of one train step of ``model`` (see the module's docstring)."""
    persistent = PERSISTENT_COPIES * sum(_rounded(p.numel() * p.element_size()) for p in model.parameters())
    recorder = _LiveBytes(persistent)
    traffic.step_traffic(model, batch, size, channels_last, recorder=recorder)
    return recorder


def report(preset: str, size: int, batch: int) -> str:
    model = build(preset)
    records = {}
    for variant in traffic.VARIANTS:
        with traffic.configured(model, variant):
            records[variant.label] = step_peak(model, batch, size, channels_last=True)
    reference = records[traffic.VARIANTS[0].label].peak
    lines = [
        f"Peak memory of one eager train step, channels_last: `{preset}`, {size} px, batch {batch}, bf16 "
        f"autocast (GiB of live tensors, 512-byte blocks; torch {torch.__version__}; `python -m "
        f"benchmarks.peak_memory --preset {preset} --image-size {size} --batch {batch}`)",
        "",
        "| model | peak | vs reference | at (module, op, phase) | peak in forward / backward | persistent "
        "(weights, EMA, AdamW) | at the peak: made by forward / backward |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, rec in records.items():
        made = [sum(b for (phase, _), b in rec.at_peak.items() if phase == p) / GiB for p in ("forward", "backward")]
        phases = [rec.phase_peaks.get(p, 0) / GiB for p in ("forward", "backward")]
        lines.append(f"| {label} | {rec.peak / GiB:.2f} | {rec.peak / reference:.2f}x | {', '.join(rec.peak_op)} | "
                     f"{phases[0]:.2f} / {phases[1]:.2f} | {rec.persistent / GiB:.2f} | {made[0]:.2f} / {made[1]:.2f} |")
    kinds = sorted({tag for rec in records.values() for tag in rec.at_peak},
                   key=lambda tag: -max(rec.at_peak.get(tag, 0) for rec in records.values()))
    lines += ["", "Live at the peak, by the phase and module kind that made it (GiB):", "",
              "| phase | module | " + " | ".join(records) + " |", "|---|---|" + "---|" * len(records)]
    for phase, kind in kinds:
        cells = " | ".join(f"{rec.at_peak.get((phase, kind), 0) / GiB:.2f}" for rec in records.values())
        lines.append(f"| {phase} | {kind} | {cells} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    return step_main(__doc__, report, argv)


if __name__ == "__main__":
    sys.exit(main())
