"""torchrun support: find the job's layout in the environment, set up and tear down the group.

torchrun (and ``python -m torch.distributed.run``) starts one process per GPU and tells each its
place through RANK, LOCAL_RANK and WORLD_SIZE; MASTER_ADDR/MASTER_PORT say where to meet. A
plain ``liquiddiff train`` has none of these and runs as a world of one, with no process group.
"""
from __future__ import annotations

import collections
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, draws pictures and writes checkpoints."""
        return self.rank == 0


def from_env() -> DistInfo:
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise ValueError(f"torchrun environment: RANK/LOCAL_RANK/WORLD_SIZE must be integers ({exc})") from None
    return DistInfo(rank=rank, local_rank=local, world_size=world)


def device_for(info: DistInfo, requested: str) -> torch.device:
    """``auto``: this process's GPU (cuda:LOCAL_RANK) if there is one, else the CPU."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", info.local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {requested}: no CUDA GPU is available (torch {torch.__version__})")
        if device.index is None:
            device = torch.device("cuda", info.local_rank % torch.cuda.device_count())
    return device


COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


def init(info: DistInfo, device: torch.device) -> None:
    """Join the process group: NCCL between GPUs, gloo on the CPU (how CI tests it)."""
    if not info.enabled or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    # The other ranks wait in the next step's all-reduce while rank 0 draws a sample grid, and
    # with --compile the first grid compiles the EMA copy (minutes): more than NCCL's default
    # 10 minutes must pass before a wait counts as a hang.
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size,
                            device_id=device if device.type == "cuda" else None, timeout=COLLECTIVE_TIMEOUT)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def mean_over_ranks(value: float, device: torch.device) -> float:
    """The mean of a scalar over all ranks (the value itself in a world of one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def gather_objects(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in a world of one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank (``obj`` itself in a world of one)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _flat_views(flat: torch.Tensor, tensors: list) -> list:
    """Views of consecutive runs of ``flat`` shaped like ``tensors``, with their strides where
    those are a dense layout (NCHW or channels_last: the copies in and out are then plain
    element-for-element copies), else contiguous."""
    views, offset = [], 0
    for t in tensors:
        run = flat[offset:offset + t.numel()]
        dense = t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
        views.append(run.as_strided(t.shape, t.stride()) if dense else run.view(t.shape))
        offset += t.numel()
    return views


def _coalesced(tensors, collective) -> None:
    """``collective(flat)`` (in place) over the tensors as if over each one: the tensors copied
    into one flat buffer a (dtype, device), one collective call on it, copied back. Hundreds of
    small parameters make one message, not hundreds."""
    groups = collections.defaultdict(list)
    for t in tensors:
        groups[(t.dtype, t.device)].append(t)
    for (dtype, device), group in groups.items():
        flat = torch.empty(sum(t.numel() for t in group), dtype=dtype, device=device)
        views = _flat_views(flat, group)
        torch._foreach_copy_(views, group)
        collective(flat)
        torch._foreach_copy_(group, views)


@torch.no_grad()
def broadcast_from_rank0(tensors) -> None:
    """Rank 0's values of ``tensors`` (parameters, buffers) on every rank, in place: what
    DistributedDataParallel does when it wraps a model, for a trainer that runs without it."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        _coalesced([t.detach() for t in tensors], lambda flat: dist.broadcast(flat, src=0))


@torch.no_grad()
def average_gradients(parameters) -> None:
    """Each parameter's ``.grad`` replaced, in place, by its mean over the ranks: one all-reduce
    a dtype after the whole backward, where DistributedDataParallel's hooks reduce buckets during
    it. For a train step replayed from CUDA graphs, whose backward runs no host code a
    parameter. Parameters without a gradient are left out (the same ones on every rank: the
    ranks run the same model)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    grads = [p.grad for p in parameters if p.grad is not None]
    if world > 1 and grads:
        _coalesced(grads, lambda flat: (dist.all_reduce(flat), flat.div_(world)))
