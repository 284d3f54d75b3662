"""Memory traffic of one eager train step (and of one sampling step), op by op, without a GPU:
the bytes each kernel launch must read and write, and how many launches there are.

The step (forward under bf16 autocast, the loss, backward) runs under ``FakeTensorMode`` (no data),
and a dispatch mode sees every op that reaches a kernel: an aten op, or one of our custom ops
(each a Triton launch or two). An op reads its tensor inputs and writes its outputs once; views
and allocations move nothing; an expanded input counts its storage, not its numel. These are the
bytes an ideal kernel for that op moves: cuDNN's depthwise kernels, for one, move more. Divided
by the measured copy bandwidth, the total is the time an eager step cannot beat however fast
each kernel is: the bound for the fused model's train step, and a list of where it goes. A
convolution with a bias counts the two passes aten makes for the bias on a GPU besides cuDNN's
launch (a broadcast add forward, a reduction for its gradient: ``_bias_passes``). A
custom op counts as one launch: the torch reductions of per-program partial sums inside some of
ours (the CfC, AdaLN and modulated-SiLU backward ops) are not seen.

    python -m benchmarks.traffic [--preset tiny --image-size 256 --batch 8 --top 20]

The optimizer step is not included (it moves the parameters and their AdamW state, a few MB for
the presets), nor is torch.compile: inductor fuses elementwise chains, so its traffic is not the
sum of the ops'.
"""
from __future__ import annotations

import collections
import contextlib
import os
import sys
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

if not torch.cuda.is_available():
    # The fused ops dispatch to their custom ops (whose fake kernels run here) only when Triton
    # could run: on the CPU that means the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from benchmarks import cases  # noqa: E402
from benchmarks.saved_memory import KINDS, step_parser  # noqa: E402
from liquiddiff import build  # noqa: E402

GB = 1e9
# H200 copy bandwidth, measured by the anchors' run (shared/anchors): the default divisor.
H200_COPY_GBPS = 4179
# Ops that allocate or fill without reading (counted as writes only when they write).
_NO_TRAFFIC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_to_copy_meta"}


def _bytes(t: torch.Tensor) -> int:
    """Bytes a kernel touches reading or writing ``t``: its elements, or its storage when that is
    smaller (an expanded tensor, stride 0, reads one value per broadcast run)."""
    elements = t.numel() * t.element_size()
    try:
        return min(elements, t.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):
        return elements


_OWNER = "liquiddiff_owner"  # autograd-node metadata key: the module kind whose forward made it


@dataclass
class Ledger:
    """(module kind, op, phase) -> [launches, bytes read, bytes written]."""

    rows: dict = field(default_factory=lambda: collections.defaultdict(lambda: [0, 0, 0]))

    def add(self, key: tuple[str, str, str], read: int, written: int) -> None:
        row = self.rows[key]
        row[0] += 1
        row[1] += read
        row[2] += written

    def grouped(self, by) -> dict:
        """[launches, read, written] summed over the rows with the same ``by(kind, op, phase)``."""
        out = collections.defaultdict(lambda: [0, 0, 0])
        for key, row in self.rows.items():
            acc = out[by(*key)]
            for i, v in enumerate(row):
                acc[i] += v
        return dict(out)

    def total(self, phase: str | None = None) -> tuple[int, int]:
        """(launches, bytes) over all ops, or one phase's."""
        rows = [r for (_, _, ph), r in self.rows.items() if phase in (None, ph)]
        return sum(r[0] for r in rows), sum(r[1] + r[2] for r in rows)


class _Recorder(TorchDispatchMode):
    """Adds each op to the ledger, under the module kind that runs it: in forward the innermost
    block module on the stack, in backward the kind that made the autograd node being run
    (``_tag_nodes``); recomputation inside a node's backward counts for that node."""

    def __init__(self, ledger: Ledger):
        super().__init__()
        self.ledger, self.owners, self.phase, self.paused = ledger, ["other"], "forward", False

    def owner(self) -> str:
        if self.phase == "forward":
            return self.owners[-1]
        node = torch._C._current_autograd_node()
        return "other" if node is None else node.metadata.get(_OWNER, "other")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.paused or getattr(func, "is_view", False):
            return out
        namespace = "" if func.namespace == "aten" else f"{func.namespace}::"
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        owner, name = self.owner(), namespace + func.overloadpacket.__name__
        self.record((owner, name, self.phase), ins, outs)
        for op, reads, writes in _bias_passes(name, args, out):
            self.record((owner, op, self.phase), reads, writes)
        return out

    def record(self, key: tuple[str, str, str], ins: list, outs: list) -> None:
        """An op that is not a view, ``key`` = (module kind, op, phase), with its tensors: a launch
        unless it only allocates, or moves nothing."""
        op = key[1]
        if op in _NO_TRAFFIC or op.startswith("prim::") or not (outs or any(t.numel() for t in ins)):
            return
        self.ledger.add(key, sum(_bytes(t) for t in ins), sum(_bytes(t) for t in outs))


def _bias_passes(op: str, args: tuple, out) -> list[tuple[str, list, list]]:
    """The passes aten makes for a convolution's bias on a GPU apart from the convolution's own
    launch: cuDNN takes no bias, so ``aten.convolution`` adds it in a broadcast add of its own
    over the output, and ``convolution_backward`` sums ``grad_out`` over N, H and W (a reduction)
    for its gradient. The first H100 report found both among the fused step's largest kernels
    (bf16 ``reduce_kernel`` 15.1 ms, non-vectorised bf16 ``add`` 12.4 ms); inductor peels the
    bias off the same way and fuses both into its neighbours. (name, reads, writes) each."""
    if op == "convolution" and args[2] is not None:
        return [("convolution bias add", [out, args[2]], [out])]
    if op == "convolution_backward" and args[-1][2]:  # output_mask: (input, weight, bias)
        return [("convolution bias gradient", [args[0]], [out[2]])]
    return []


def _next_sequence_nr(recorder: _Recorder) -> int:
    """The sequence number the next autograd node will get (node numbers grow in creation order)."""
    recorder.paused = True
    try:
        return torch.ones((), requires_grad=True).mul(1).grad_fn._sequence_nr() + 1
    finally:
        recorder.paused = False


def _tag_nodes(outputs, first: int, kind: str) -> None:
    """Tag the autograd nodes a module's forward made (numbered from ``first``) with its kind;
    inner modules run their hooks first and keep their tags."""
    stack = [t.grad_fn for t in tree_flatten(outputs)[0] if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node._sequence_nr() < first or _OWNER in node.metadata:
            continue
        node.metadata[_OWNER] = kind
        stack += [n for n, _ in node.next_functions]


def _attribute(model: torch.nn.Module, recorder: _Recorder) -> list:
    """Forward hooks that keep the recorder's module stack and tag each block's autograd nodes."""
    starts = []

    # In backward, a module called to recompute a tensor (recompute_saved) counts for the node.
    # Without grad (a sampling step) there are no nodes to tag.
    def enter(module, args):
        if recorder.phase == "forward":
            recorder.owners.append(type(module).__name__)
            starts.append(_next_sequence_nr(recorder) if torch.is_grad_enabled() else None)

    def leave(module, args, out):
        if recorder.phase == "forward":
            start, kind = starts.pop(), recorder.owners.pop()
            if start is not None:
                _tag_nodes(out, start, kind)

    return [h for m in model.modules() if isinstance(m, KINDS)
            for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]


def step_traffic(model: torch.nn.Module, batch: int, size: int, channels_last: bool, train: bool = True,
                 recorder: _Recorder | None = None) -> Ledger:
    """The ledger of one train step: the forward (bf16 autocast, as the trainer runs it), its loss
    and its backward, parameters' gradients accumulating as in training; or, ``train=False``, of
    one sampling step: the forward alone, without grad (one of the sampler's model calls).
    ``recorder``: a fresh recorder to see the ops (a subclass that records more)."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt).train(train)
    device = next(model.parameters()).device
    recorder = recorder if recorder is not None else _Recorder(Ledger())
    hooks = _attribute(model, recorder)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), torch.set_grad_enabled(train):
            x = torch.randn(batch, model.config.in_channels, size, size, device=device).contiguous(memory_format=fmt)
            target = torch.randn_like(x)
            t = torch.rand(batch, device=device)
            with recorder:
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    v = model(x, t)
                if train:
                    loss = F.mse_loss(v.float(), target)
                    recorder.phase = "backward"
                    loss.backward()
    finally:
        for h in hooks:
            h.remove()
    model.zero_grad(set_to_none=True)
    return recorder.ledger


def _ms(nbytes: int, gbps: float) -> float:
    return nbytes / (gbps * GB) * 1e3


class Variant(NamedTuple):
    """A way to run the model's step. Layouts move the same bytes: the counts use channels_last."""

    label: str
    fused: bool
    kernels: str = ""  # per-op LIQUIDDIFF_KERNELS settings
    checkpointing: bool = False  # LiquidDiffusion.set_gradient_checkpointing


VARIANTS = (Variant("reference", False), Variant("fused", True),
            Variant("fused + Triton depthwise", True, kernels="depthwise_conv=triton"),
            Variant("fused + Triton pointwise", True, kernels="pointwise_conv=triton"),
            Variant("fused + Triton depthwise + pointwise", True, kernels="depthwise_conv=triton,pointwise_conv=triton"),
            Variant("fused + gradient checkpointing", True, checkpointing=True))


@contextlib.contextmanager
def configured(model: torch.nn.Module, variant: Variant):
    """``model`` set up as ``variant`` says, with its kernel settings in force; the model's own
    settings are restored after."""
    before = model.fused, model.gradient_checkpointing
    model.set_fused(variant.fused).set_gradient_checkpointing(variant.checkpointing)
    try:
        with cases.kernels_setting(variant.kernels) if variant.kernels else contextlib.nullcontext():
            yield model
    finally:
        model.set_fused(before[0]).set_gradient_checkpointing(before[1])


def report(preset: str, size: int, batch: int, gbps: float = H200_COPY_GBPS, top: int = 20) -> str:
    model = build(preset)
    ledgers, sampling = {}, {}
    for variant in VARIANTS:
        with configured(model, variant):
            ledgers[variant.label] = step_traffic(model, batch, size, channels_last=True)
            sampling[variant.label] = step_traffic(model, batch, size, channels_last=True, train=False)
    lines = [
        f"Memory traffic of one eager train step, channels_last: `{preset}`, {size} px, batch {batch}, bf16 "
        f"autocast (torch {torch.__version__}; `python -m benchmarks.traffic --preset {preset} --image-size {size} "
        f"--batch {batch}`); ms = GB / {gbps:.0f} GB/s",
        "",
        "| model | launches fwd / bwd | GB fwd / bwd | GB total | ms | sampling step: launches, GB, ms |",
        "|---|---|---|---|---|---|",
    ]
    for label, ledger in ledgers.items():
        (lf, bf), (lb, bb) = ledger.total("forward"), ledger.total("backward")
        ls, bs = sampling[label].total()
        lines.append(f"| {label} | {lf} / {lb} | {bf / GB:.1f} / {bb / GB:.1f} | {(bf + bb) / GB:.1f} | "
                     f"{_ms(bf + bb, gbps):.1f} | {ls}, {bs / GB:.1f}, {_ms(bs, gbps):.1f} |")
    by_kind = {label: ledger.grouped(lambda kind, op, phase: (kind, phase)) for label, ledger in ledgers.items()}
    kinds = sorted({k for g in by_kind.values() for k, _ in g},
                   key=lambda k: -sum(r[1] + r[2] for (kk, _), r in by_kind["reference"].items() if kk == k))
    lines += ["", "GB fwd / bwd by module kind:", "", "| module | " + " | ".join(ledgers) + " |",
              "|---|" + "---|" * len(ledgers)]
    for kind in kinds:
        cells = []
        for label in ledgers:
            f, b = (sum(by_kind[label].get((kind, ph), [0, 0, 0])[1:]) / GB for ph in ("forward", "backward"))
            cells.append(f"{f:.1f} / {b:.1f}")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    label = VARIANTS[1].label
    _, total = ledgers[label].total()
    lines += ["", f"{label}: the {top} (module, op, phase) that move the most (of {total / GB:.1f} GB)", "",
              "| module | op | phase | launches | GB read | GB written | share | ms |", "|---|---|---|---|---|---|---|---|"]
    ranked = sorted(ledgers[label].rows.items(), key=lambda kv: -(kv[1][1] + kv[1][2]))
    for (kind, op, phase), (n, read, written) in ranked[:top]:
        lines.append(f"| {kind} | {op} | {phase} | {n} | {read / GB:.2f} | {written / GB:.2f} | "
                     f"{(read + written) / total:.1%} | {_ms(read + written, gbps):.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = step_parser(__doc__)
    parser.add_argument("--gbps", type=float, default=H200_COPY_GBPS, help="copy bandwidth for the ms column")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args(argv)
    print(report(args.preset, args.image_size, args.batch, args.gbps, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
