"""Rectified-flow training (the seed's objective) with the trimmings users of DiT/SiT expect.

x_t = (1 - t) * x + t * noise, target velocity = noise - x, loss = MSE(model(x_t, t), target).
"""
from __future__ import annotations

import copy
import math
import os
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checkpoint
from .distributed import average_gradients, broadcast_from_rank0
from .model import LiquidDiffusion, LiquidDiffusionConfig
from .kernels import runtime
from .sampling import KeptGraph, integrate

TIME_SAMPLINGS = ("uniform", "logit_normal")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# The optimizer's param-group keys that say how it runs, not what it computes.
_OPTIMIZER_IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")


def autocast_dtype(device: torch.device, mixed_precision: bool | str | None) -> torch.dtype | None:
    """The dtype a trainer autocasts to, None for fp32.

    None (the default) means mixed precision on CUDA only; True (or None on CUDA) picks bf16 on
    GPUs that compute in it (compute capability 8.0 and newer: A100, H100, RTX 30xx and on) and
    fp16 before them (V100, T4, RTX 20xx: no bf16 arithmetic, an emulated bf16 is slow); "bf16"
    or "fp16" chooses; False is fp32.
    """
    if mixed_precision is None:
        mixed_precision = device.type == "cuda"
    if mixed_precision is False:
        return None
    if mixed_precision is True:
        old_gpu = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 8
        return torch.float16 if old_gpu else torch.bfloat16
    if mixed_precision not in AUTOCAST_DTYPES:
        raise ValueError(f"mixed_precision: expected None, True, False, 'bf16' or 'fp16', got {mixed_precision!r}")
    return AUTOCAST_DTYPES[mixed_precision]


def sample_times(batch: int, method: str, device, generator=None) -> torch.Tensor:
    """t in [0, 1]: uniform (the seed), or logit-normal (SD3), which favours the middle of the path."""
    if method == "uniform":
        return torch.rand(batch, device=device, generator=generator)
    if method == "logit_normal":
        return torch.sigmoid(torch.randn(batch, device=device, generator=generator))
    raise ValueError(f"time_sampling: expected one of {', '.join(TIME_SAMPLINGS)}, got {method!r}")


def rectified_flow_pair(images: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    """(x_t, target velocity) on the straight line from data (t = 0) to noise (t = 1)."""
    t4 = t.view(-1, 1, 1, 1).to(images.dtype)
    return (1 - t4) * images + t4 * noise, noise - images


class EMA:
    """Exponential moving average of a model's weights, with the usual warm-up.

    decay_k = min(decay, (1 + k) / (10 + k)): early averages forget the random init quickly.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema_decay: expected a value in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        ema_params = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - d)
        for eb, b in zip(self.model.buffers(), model.buffers()):
            eb.copy_(b)
        self.updates += 1


class _ModelCall(nn.Module):
    """The model as a callable of its own: ``make_graphed_callables`` replaces the forward of the
    module it captures, and the model's own forward must stay eager (sampling, other shapes)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.model(x, t)


def graphed_model_call(model: nn.Module, x: torch.Tensor, t: torch.Tensor):
    """``model(x, t)`` and its backward (into the parameters' gradients) as two CUDA graphs,
    captured for inputs like ``x`` and ``t`` after a few warm-up calls (Triton's JIT, cuDNN's
    plans): each train step then launches two graphs instead of the model's thousands of kernels,
    whose host-side cost an eager step pays every time. Call it, and the result, under the
    autocast state of the train step, without autocast's weight cache (a cached cast would be
    freed after capture). The model's forward and backward must not synchronise with the host
    (the fused model's do not). CI has no GPU: the tests that capture are marked gpu."""
    return torch.cuda.make_graphed_callables(_ModelCall(model), (x.detach().clone(), t.detach().clone()))


def check_graph_device(device: torch.device) -> None:
    """CUDA graphs capture CUDA work: ``cuda_graph=True`` needs a CUDA device."""
    if device.type != "cuda":
        raise ValueError(f"cuda_graph: needs a CUDA device, the trainer runs on {device}")


def _sampling_graph_key(model: nn.Module, z: torch.Tensor) -> tuple:
    """What a captured sampling graph depends on: the model, its path and kernels, the input's
    shape, layout and device, and where its parameters live (``.to()`` or loading with
    ``assign=True`` moves them; values updated in place, as the EMA's, are read by the replays)."""
    return (id(model), model.fused, os.environ.get(runtime.ENV_VAR), tuple(z.shape), z.stride(), z.dtype,
            z.device, tuple(p.data_ptr() for p in model.parameters()))


class RectifiedFlowTrainer:
    """Trains a LiquidDiffusion model with rectified flow and samples from its EMA weights.

    ``train_step(images)`` takes a batch in [-1, 1] and returns ``{"loss", "grad_norm", "lr",
    "step"}``; ``sample(batch_size, image_size, num_steps)`` returns images in [-1, 1].
    ``distributed=True`` (under torchrun, once the process group is up) averages gradients
    across ranks with DistributedDataParallel; each rank passes its own batch.
    ``cuda_graph=True`` (CUDA) replays each train step's model forward and backward from CUDA
    graphs captured at the first step (:func:`graphed_model_call`): the host no longer launches
    the model's kernels one by one. Batches of another shape run eager. With ``distributed=True``
    the gradients are then averaged by one all-reduce after the backward, without DDP.
    ``mixed_precision`` (:func:`autocast_dtype`): None autocasts on CUDA, to bf16 on GPUs that
    compute in it and to fp16 with loss scaling on older ones (a T4); "bf16", "fp16", False.
    ``micro_batch_size=n`` accumulates each step's gradient over micro-batches of n images: the
    step and its loss are the whole batch's, the activation memory a micro-batch's.
    ``compile=True`` runs the model through ``torch.compile`` (the fused ops stay opaque custom
    ops): the first steps at each shape compile, later ones run the compiled code. A dict is
    passed to ``torch.compile`` as its options (``{"mode": "max-autotune"}``).
    """

    def __init__(
        self,
        model: LiquidDiffusion,
        lr: float = 1e-4,
        device: str | torch.device | None = None,
        *,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        ema_decay: float = 0.9999,
        time_sampling: str = "uniform",
        grad_clip: float | None = 1.0,
        warmup_steps: int = 0,
        mixed_precision: bool | str | None = None,
        distributed: bool = False,
        channels_last: bool | None = None,
        cuda_graph: bool = False,
        compile: bool | dict = False,
        micro_batch_size: int | None = None,
    ):
        if lr <= 0:
            raise ValueError(f"lr: expected a positive learning rate, got {lr}")
        if micro_batch_size is not None and not (
                isinstance(micro_batch_size, int) and not isinstance(micro_batch_size, bool) and micro_batch_size > 0):
            raise ValueError(f"micro_batch_size: expected a positive integer or None, got {micro_batch_size!r}")
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"time_sampling: expected one of {', '.join(TIME_SAMPLINGS)}, got {time_sampling!r}")
        if grad_clip is not None and grad_clip <= 0:
            raise ValueError(f"grad_clip: expected a positive value or None, got {grad_clip}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps: expected >= 0, got {warmup_steps}")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        # Autocast on CUDA by default (:func:`autocast_dtype`).
        self.autocast_dtype = autocast_dtype(self.device, mixed_precision)
        self.compiled = compile is not False and compile is not None  # {} too: torch.compile's defaults
        if cuda_graph and self.compiled:
            raise ValueError("compile: not with cuda_graph=True (torch.compile(mode='reduce-overhead') "
                             "captures CUDA graphs of its own)")
        if cuda_graph:
            check_graph_device(self.device)
        # channels_last=True runs every conv in NHWC (cuDNN's fast depthwise path), and the fused
        # kernels read that layout directly: weights are converted once here, batches once per
        # step. False converts to NCHW; None (default) keeps the layouts the caller gave.
        self.memory_format = {True: torch.channels_last, False: torch.contiguous_format}.get(channels_last)
        self.model = model.to(self.device)
        if self.memory_format is not None:
            self.model = self.model.to(memory_format=self.memory_format)
        # Under torchrun, rank 0's weights are copied to every rank now and gradients averaged
        # across ranks each step. Eager, the forward/backward pass goes through
        # DistributedDataParallel, whose hooks all-reduce buckets of gradients during backward;
        # self.model stays the plain module, so EMA, state_dict and sample never see the wrapper.
        # With cuda_graph=True a replayed backward runs no host code until it ends (DDP's hooks
        # could only fire then): the trainer averages the gradients itself, one all-reduce after
        # the backward (average_gradients), and no DDP wrapper is made.
        self._ddp = None
        self._average_gradients = distributed and cuda_graph
        if distributed:
            self._check_process_group()
            if cuda_graph:
                broadcast_from_rank0([*self.model.parameters(), *self.model.buffers()])
            else:
                self._ddp = self._wrap_ddp(self.model)
        self.base_lr = lr
        self.time_sampling = time_sampling
        self.grad_clip = grad_clip
        self.warmup_steps = warmup_steps
        self.micro_batch_size = micro_batch_size
        self.mixed_precision = self.autocast_dtype is not None
        # fp16 needs its loss scaled (its gradients would underflow): a GradScaler, which does
        # nothing when disabled.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay,
            fused=self.device.type == "cuda",
        )
        self.ema = EMA(self.model, ema_decay)
        # compile=True: the module train steps call (under torchrun the DDP wrapper, so that
        # dynamo splits the graph at DDP's gradient buckets and the all-reduce still overlaps the
        # backward) and the EMA copy that samples are drawn from, compiled in place
        # (nn.Module.compile: parameters and state_dict keys unchanged). Compiling is lazy.
        if self.compiled:
            options = compile if isinstance(compile, dict) else {}
            self.forward_model.compile(**options)
            self.ema.model.compile(**options)
        self.step = 0
        # cuda_graph=True: the train steps' model call (forward and backward) replays CUDA graphs
        # captured at the first step; (input shape, graphed call) once captured.
        self.cuda_graph = cuda_graph
        self._graphed = None
        self._sampling_graph = KeptGraph()  # sample(cuda_graph=True)'s, kept for the next call like it

    @property
    def forward_model(self) -> nn.Module:
        """What train steps call: the DDP wrapper under torchrun, else the model itself."""
        return self._ddp if self._ddp is not None else self.model

    @staticmethod
    def _check_process_group() -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("distributed=True needs an initialised process group (run under torchrun)")

    def _wrap_ddp(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    @property
    def config(self) -> LiquidDiffusionConfig:
        return self.model.config

    def _autocast(self, cache: bool = True):
        if not self.mixed_precision:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=cache)

    def _in_layout(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.memory_format is None else x.contiguous(memory_format=self.memory_format)

    def current_lr(self) -> float:
        if self.warmup_steps and self.step < self.warmup_steps:
            return self.base_lr * (self.step + 1) / self.warmup_steps
        return self.base_lr

    def check_images(self, images: torch.Tensor, value_range: bool = True) -> None:
        """Rank, channels, size and (``value_range``) range checks, with messages that say what
        is wrong. The range check reads the batch's minimum and maximum back: on a GPU it waits
        for the work queued before it."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images: expected a torch.Tensor, got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"images: expected a floating-point tensor in [-1, 1], got dtype {images.dtype}")
        self.model.check_input(images)
        if not value_range:
            return
        lo, hi = torch.aminmax(images.detach())
        lo, hi = lo.item(), hi.item()
        if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1.001 or hi > 1.001:
            raise ValueError(
                f"images: expected values in [-1, 1], got range [{lo:.3g}, {hi:.3g}] "
                "(scale uint8 images with x / 127.5 - 1)"
            )

    def loss(self, images: torch.Tensor, generator=None) -> torch.Tensor:
        """The rectified-flow loss of one batch (no optimizer step)."""
        return self._velocity_loss(images, *self._draw(images, generator))

    def _draw(self, images: torch.Tensor, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(noise, t) for a batch of images."""
        noise = torch.randn(images.shape, device=images.device, dtype=images.dtype, generator=generator)
        return noise, sample_times(images.shape[0], self.time_sampling, images.device, generator)

    def _velocity_loss(self, images: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_t, target = rectified_flow_pair(images, noise, t)
        with self._autocast(cache=not self.cuda_graph):
            v = self._model_call(x_t, t)
        return F.mse_loss(v.float(), target.float())

    def _zero_grads(self, batch: int) -> None:
        """Gradients to None; with CUDA graphs and several micro-batches a step, zeroed in place
        instead. A graphed backward hands autograd its static gradient buffers, which become the
        .grad of a parameter that has none, without a copy: with one micro-batch that is what
        the step wants (no add per parameter, hundreds of small launches), but the step's next
        micro-batch would overwrite that gradient instead of adding to it. Gradients the
        trainer owns are added into."""
        if not self.cuda_graph or (self.micro_batch_size or batch) >= batch:
            self.optimizer.zero_grad(set_to_none=True)
            return
        for p in self.model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        self.optimizer.zero_grad(set_to_none=False)

    def _backward(self, images: torch.Tensor) -> torch.Tensor:
        """Backward of the batch's mean loss, one micro-batch at a time; returns the loss.

        Each micro-batch's loss is weighted by its share of the batch, so the gradients add up to
        the whole batch's. Noise and times are drawn for the whole batch first: the split changes
        no random draw. Under torchrun, gradients are averaged across ranks once: by DDP in the
        last micro-batch's backward (no_sync before it), or with CUDA graphs after the last one.
        """
        noise, t = self._draw(images)
        batch = images.shape[0]
        size = self.micro_batch_size or batch
        total = None
        for start in range(0, batch, size):
            part = slice(start, start + size)
            last = start + size >= batch
            with self._ddp.no_sync() if self._ddp is not None and not last else nullcontext():
                loss = self._velocity_loss(images[part], noise[part], t[part]) * (images[part].shape[0] / batch)
                self.scaler.scale(loss).backward()
            total = loss.detach() if total is None else total + loss.detach()
        if self._average_gradients:
            average_gradients(self.model.parameters())
        return total

    def _model_call(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The model on a training batch: eager, or (``cuda_graph=True``) its forward and backward
        replayed from the CUDA graphs captured at the first call, for batches of that shape and
        layout (others, a last partial batch, run eager)."""
        if not (self.cuda_graph and torch.is_grad_enabled()):
            return self.forward_model(x_t, t)
        key = (tuple(x_t.shape), x_t.stride(), x_t.dtype)
        if self._graphed is None:
            self._graphed = key, graphed_model_call(self.model, x_t, t)
        captured, call = self._graphed
        return call(x_t, t) if key == captured else self.model(x_t, t)

    def train_step(self, images: torch.Tensor, *, sync: bool = True) -> dict:
        """One optimizer step on ``images`` ([B, C, H, W] in [-1, 1]); returns {"loss",
        "grad_norm", "lr", "step"}, the loss and the gradient norm (before clipping) as floats.

        ``sync=False`` waits for nothing: "loss" and "grad_norm" are 0-dim fp32 tensors on the
        device (``float()`` them when needed, which waits for that step), and a batch already on a
        GPU gets no value-range check (check it on the host first: :meth:`check_images`). The host
        then queues the next step while the GPU runs this one; reading both back at every step
        left the GPU idle while the host prepared the next (a few ms of an H100 CUDA-graph step).
        """
        self.check_images(images, value_range=sync or images.device.type == "cpu")
        images = self._in_layout(images.to(self.device, non_blocking=True))
        # The DDP wrapper too, when there is one; once, not a walk over every module each step.
        if not (self.forward_model.training and self.model.training):
            self.forward_model.train()
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._zero_grads(images.shape[0])
        loss = self._backward(images)
        self.scaler.unscale_(self.optimizer)  # clipping and the reported norm see true gradients
        max_norm = self.grad_clip if self.grad_clip is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.scaler.step(self.optimizer)  # fp16: skipped when a gradient overflowed
        self.scaler.update()
        self.ema.update(self.model)
        self.step += 1
        if sync:
            loss, grad_norm = loss.item(), grad_norm.item()
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "step": self.step}

    @torch.no_grad()
    def sample(
        self,
        batch_size: int,
        image_size: int | tuple[int, int],
        num_steps: int = 50,
        *,
        sampler: str = "euler",
        use_ema: bool = True,
        generator: torch.Generator | None = None,
        progress=None,
        cuda_graph: bool = False,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Generate ``batch_size`` images by integrating the learned ODE from noise; in [-1, 1].

        The starting noise is drawn from ``generator`` on its device (then moved), or given as
        ``noise`` ([batch_size, C, H, W], on any device: to interpolate between seeds, or to make
        each image's noise its own). ``cuda_graph=True`` (CUDA only) captures the model call once
        and replays it for every step (:func:`liquiddiff.sampling.cuda_graphed`): the host's
        launch overhead goes, for the price of three model calls of capture. The graph is kept
        for later calls with the same model, batch shape and kernels (its memory too, about a
        forward's activations, until :meth:`release_cuda_graphs`)."""
        if int(batch_size) < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size}")
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        model = self.ema.model if use_ema else self.model
        shape = (int(batch_size), self.config.in_channels, *hw)
        model.check_input(torch.empty(shape, device="meta"))
        if noise is not None and (tuple(noise.shape) != shape or not noise.is_floating_point()):
            raise ValueError(f"noise: expected a float tensor of shape {list(shape)}, got {noise.dtype} "
                             f"{list(noise.shape)}")
        if cuda_graph:
            check_graph_device(self.device)
        if cuda_graph and self.compiled:
            raise ValueError("cuda_graph: not with a trainer made with compile=True "
                             "(torch.compile(mode='reduce-overhead') captures CUDA graphs of its own)")
        if use_ema and model.fused != self.model.fused:  # set_fused on the model after the trainer was made
            model.set_fused(self.model.fused)
        was_training = model.training
        model.eval()
        if noise is None:
            # Drawn where the generator lives, then moved: a CPU generator's seed gives the same
            # noise on any device.
            noise_device = self.device if generator is None else generator.device
            noise = torch.randn(shape, device=noise_device, generator=generator)
        z = self._in_layout(noise.to(self.device))

        def velocity(z_t, t):
            # A copy even in fp32: a model compiled with mode="reduce-overhead" hands back its
            # CUDA graph's output buffer, which its next call overwrites while Heun keeps this
            # velocity.
            with self._autocast(cache=not cuda_graph):
                return model(z_t, t).to(torch.float32, copy=True)

        try:
            if cuda_graph:
                velocity = self._sampling_graph(_sampling_graph_key(model, z), velocity, z)
            out = integrate(velocity, z, num_steps, sampler, progress)
        finally:
            model.train(was_training)
        return out.clamp(-1, 1)

    def release_cuda_graphs(self) -> None:
        """Drops the CUDA graphs captured for train steps and sampling, and the memory they hold;
        the next call with ``cuda_graph`` captures again."""
        self._graphed = None
        self._sampling_graph.clear()

    # -- state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "config": self.config.to_dict(),
            "model": self.model.state_dict(),
            "ema": self.ema.model.state_dict(),
            "ema_updates": self.ema.updates,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),  # empty unless fp16
            "step": self.step,
            "rng": rng,
        }

    def load_state_dict(self, state: dict) -> None:
        self.check_config(state.get("config"))
        self.model.load_state_dict(state["model"])
        self.ema.model.load_state_dict(state["ema"])
        self.ema.updates = int(state["ema_updates"])
        self._load_optimizer(state["optimizer"])
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        torch.set_rng_state(state["rng"]["cpu"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)

    def _load_optimizer(self, saved: dict) -> None:
        """AdamW's state from a checkpoint, on this trainer's terms: its implementation (fused on
        a GPU) is chosen for this device, not taken from the run that saved it; and each moment
        takes its parameter's layout, which the checkpoint (contiguous tensors) lost: fused AdamW
        walks a parameter and its moments as flat memory, so a channels_last weight met NCHW
        moments, element for wrong element (on a GPU it refuses the mix)."""
        mine = [{k: group[k] for k in _OPTIMIZER_IMPLEMENTATION if k in group} for group in self.optimizer.param_groups]
        # Before loading: torch places each step count by the loaded groups' flags (on the
        # parameter's device for fused AdamW, which requires it there).
        groups = [{**group, **implementation} for group, implementation in zip(saved["param_groups"], mine)]
        self.optimizer.load_state_dict({**saved, "param_groups": groups})
        for param, moments in self.optimizer.state.items():
            for key, value in moments.items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    moments[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)

    def check_config(self, saved: dict | None) -> None:
        mine = self.config.to_dict()
        if saved is None:
            raise ValueError("checkpoint has no model config; it was not written by RectifiedFlowTrainer")
        diff = {k: (saved.get(k), v) for k, v in mine.items() if k != "name" and saved.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: checkpoint {a} vs model {b}" for k, (a, b) in diff.items())
            theirs, ours = saved.get("name"), mine["name"]
            presets = f"both from preset {ours!r}" if theirs == ours else f"presets {theirs!r} and {ours!r}"
            raise ValueError(f"checkpoint holds another model than this one: {detail} ({presets})")

    def save_checkpoint(self, path: str | Path) -> Path:
        """One safetensors file, written atomically (see liquiddiff.checkpoint)."""
        return checkpoint.save(self.state_dict(), path)

    def load_checkpoint(self, path: str | Path) -> None:
        self.load_state_dict(checkpoint.load(path))
