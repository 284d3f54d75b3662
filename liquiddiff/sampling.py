"""ODE samplers for rectified flow: integrate dz/dt = v(z, t) from t = 1 (noise) to t = 0."""
from __future__ import annotations

from typing import Callable

import torch

SAMPLERS = ("euler", "heun")

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _times(z: torch.Tensor, value: float) -> torch.Tensor:
    # fp64 for an fp64 model, so that i / N is not rounded through fp32.
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    return torch.full((z.shape[0],), value, device=z.device, dtype=dtype)


@torch.no_grad()
def integrate(velocity: Velocity, z: torch.Tensor, num_steps: int, sampler: str = "euler", progress=None) -> torch.Tensor:
    """N uniform steps from t = 1 to t = 0 (the seed's Euler loop; Heun adds a corrector).

    Euler: z <- z - v(z, t_i) / N. Heun: the average of the slopes at both ends of the step,
    except the last step (t = 0), which stays Euler as in EDM. ``progress`` is called once per
    step (a tqdm ``update`` for example).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if int(num_steps) < 1:
        raise ValueError(f"num_steps: expected a positive integer, got {num_steps}")
    n = int(num_steps)
    dt = 1.0 / n
    for i in range(n, 0, -1):
        t_now, t_next = i / n, (i - 1) / n
        v = velocity(z, _times(z, t_now))
        z_next = z - dt * v
        if sampler == "heun" and t_next > 0:
            z_next = z - dt * 0.5 * (v + velocity(z_next, _times(z, t_next)))
        z = z_next
        if progress is not None:
            progress()
    return z


def cuda_graphed(velocity: Velocity, z: torch.Tensor, warmup: int = 2) -> Velocity:
    """``velocity`` for inputs like ``z`` (shape, dtype, layout, device), replayed from a CUDA
    graph captured once: each of the sampler's model calls is then one graph launch instead of
    the model's hundreds of kernel launches and their Python, which at small batches can take
    longer on the host than the kernels take on the GPU.

    ``velocity`` must not synchronise with the host (the model's forward does not) and must use
    autocast without its weight cache (captured casts would be freed after capture). The
    capture costs ``warmup`` + 1 calls. Each call copies its inputs into the graph's and returns
    a copy of its output, so a sampler may keep one result while asking for the next (Heun).
    """
    if z.device.type != "cuda":
        raise ValueError(f"cuda_graph: needs tensors on a CUDA device, got {z.device}")
    static_z, static_t = z.clone(), _times(z, 1.0)
    side = torch.cuda.Stream(z.device)
    side.wait_stream(torch.cuda.current_stream(z.device))
    with torch.cuda.stream(side):  # warm-up off the capture: Triton JIT, cuDNN plans, allocations
        for _ in range(warmup):
            velocity(static_z, static_t)
    torch.cuda.current_stream(z.device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_v = velocity(static_z, static_t)

    def replay(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        static_z.copy_(z_t)
        static_t.copy_(t)
        graph.replay()
        return static_v.clone()

    return replay


class KeptGraph:
    """A CUDA-graphed velocity (:func:`cuda_graphed`) kept between sampler runs: captured at the
    first call for a ``key`` and replayed by every later call with an equal key, so that a batch
    after the first costs its replays only (the capture is three model calls). A new key drops
    the old graph and its memory (about a forward's activations) before capturing its own;
    :meth:`clear` drops it."""

    def __init__(self):
        self._entry = None  # (key, replaying velocity)

    def __call__(self, key, velocity: Velocity, z: torch.Tensor) -> Velocity:
        if self._entry is None or self._entry[0] != key:
            self._entry = None
            self._entry = key, cuda_graphed(velocity, z)
        return self._entry[1]

    def clear(self) -> None:
        self._entry = None
