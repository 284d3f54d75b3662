"""The GPU report: one command that times the fused ops and the model against their baselines.

    python -m benchmarks.gpu_report --out DIR          # on a machine with one CUDA GPU
    python -m benchmarks.gpu_report --out DIR --quick  # tiny sizes, CPU or GPU: proves it runs

Writes DIR/report.json (every number, with device, versions, date and command), DIR/report.md
(the tables, with the issues' targets met or missed, ``targets.py``; printed last) and
DIR/ratios.png (per-op time over the memory floor).

Ops (bf16, [8, 64, 256, 256], NCHW and channels_last): forward and forward+backward times of the
eager reference, ``torch.compile`` of the reference and the fused op; the memory floor (bytes
that must move over the measured copy bandwidth); ratios; the fused op's bf16 output and
gradients against the reference on fp64 upcasts of the same inputs; what each keeps saved for
backward.

End to end (tiny preset, 256 px, batch 8, bf16 autocast, RectifiedFlowTrainer): train-step time
and peak memory, and sampling throughput (50 Euler steps), for the reference (eager NCHW, eager
channels_last, torch.compile channels_last) and the fused model (eager, torch.compile).

Time budget (``--budget``, seconds): each model variant runs in its own worker process. All
workers start at once, so the full-model compiles overlap each other and the op checks; when
they are ready (or their compile deadline passes: later for the rows the issues' targets read),
everything is timed one worker at a time on a quiet machine, the targets' rows first. A variant
that would overrun the budget is skipped with a note; the report is always written, also when
the outer timeout's SIGTERM cuts the run short. On a GPU at most ``TRAIN_WARMUP_SLOTS`` train warm-ups run at once, the compiled
ones first: a dozen train steps at once (up to ~17 GiB each) could pass an H100's memory.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import gc
import json
import math
import os
import platform
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks import cases  # sets TRITON_INTERPRET before liquiddiff.kernels is imported
from benchmarks import step_profile, targets
from liquiddiff import kernels
from liquiddiff.kernels import runtime

ROOT = Path(__file__).resolve().parent.parent
MARK = "@@ldbench "
TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-10}


@dataclass(frozen=True)
class Variant:
    label: str
    fused: bool
    layout: str
    compiled: bool
    kernels: str = ""  # per-op LIQUIDDIFF_KERNELS settings for its worker
    cuda_graph: bool = False  # the model call captured once, replayed each train or sampling step
    checkpointing: bool = False  # LiquidDiffusion.set_gradient_checkpointing (train rows only)
    compile_mode: str = ""  # torch.compile's mode for a compiled variant ("": its default)

    @property
    def compile_option(self):
        """The trainer's ``compile`` argument: False, True, or torch.compile's options."""
        return {"mode": self.compile_mode} if self.compiled and self.compile_mode else self.compiled


TRITON_DW = "depthwise_conv=triton"

VARIANTS = {
    "ref_eager_nchw": Variant("reference eager", False, "nchw", False),
    "ref_eager_cl": Variant("reference eager", False, "channels_last", False),
    "ref_compile_cl": Variant("torch.compile(reference)", False, "channels_last", True),
    "fused_nchw": Variant("fused", True, "nchw", False),
    "fused_cl": Variant("fused", True, "channels_last", False),
    "fused_compile_cl": Variant("torch.compile(fused)", True, "channels_last", True),
    # Whether the eager fused step's launches bound it by the host: the same step replayed.
    "fused_graph_cl": Variant("fused + CUDA graph", True, "channels_last", False, cuda_graph=True),
    # The same with aten's reductions for the cuDNN convs' bias gradients (conv_bias_grad=torch),
    # replayed so that the GPU time shows: what the Triton channel_sum saves, in the same run.
    "fused_atenbias_graph_cl": Variant("fused + CUDA graph, aten bias gradients", True, "channels_last", False,
                                       kernels="conv_bias_grad=torch", cuda_graph=True),
    # The default runs the Triton SiLU -> 1x1 conv forward (runtime.FORWARD_ONLY; in sampling its
    # variants too): the same replayed step with SiLU + cuDNN instead, what that choice gains or
    # costs, train and sampling, in the same run.
    "fused_cudnn1x1_graph_cl": Variant("fused + CUDA graph, SiLU + cuDNN 1x1 convs", True, "channels_last", False,
                                       kernels="pointwise_conv=torch", cuda_graph=True),
    # The opt-in Triton depthwise convs (runtime.OPT_IN), beside the op rows dwconv7 / dwconv3 /
    # cfc_heads. The opt-in rows are replayed: eager, the fused step is bound by the host's
    # launches, which hides what a kernel set does to the GPU time that decides the opt-in.
    "fused_dw_graph_cl": Variant("fused + CUDA graph + Triton depthwise", True, "channels_last", False,
                                 kernels=TRITON_DW, cuda_graph=True),
    # The opt-in Triton SiLU -> 1x1 conv kernels (runtime.OPT_IN), beside the op row silu_conv1x1.
    "fused_pw_graph_cl": Variant("fused + CUDA graph + Triton pointwise", True, "channels_last", False,
                                 kernels="pointwise_conv=triton", cuda_graph=True),
    # Both opt-in kernel sets: what the fused step is with every Triton kernel this package has.
    "fused_all_graph_cl": Variant("fused + CUDA graph + Triton depthwise + pointwise", True, "channels_last", False,
                                  kernels=f"{TRITON_DW},pointwise_conv=triton", cuda_graph=True),
    # What the memory lever costs in time, and the peak it reaches.
    "fused_ckpt_cl": Variant("fused + gradient checkpointing", True, "channels_last", False, checkpointing=True),
    # torch.compile with inductor's CUDA graphs (OPT_IN_VARIANTS): the compiled reference without
    # its host-bound launches, and the fused model's custom ops inside inductor's graphs.
    "ref_compile_ro_cl": Variant("torch.compile(reference, reduce-overhead)", False, "channels_last", True,
                                 compile_mode="reduce-overhead"),
    "fused_compile_ro_cl": Variant("torch.compile(fused, reduce-overhead)", True, "channels_last", True,
                                   compile_mode="reduce-overhead"),
}
# Run only where --variants names them: each compiles for minutes, more than a default report's
# budget holds beside the rest.
OPT_IN_VARIANTS = ("ref_compile_ro_cl", "fused_compile_ro_cl")
# Shown in this order. Timed with the rows the issues' targets need first (targets.MEASURED_TASKS),
# then in this order; when time runs short the last ones are skipped (fused NCHW first: the fused
# model is meant to run channels_last).
# The opt-in kernel sets' graph rows come before the rest: they decide runtime.OPT_IN, and no
# report has timed the pointwise set's graphed train step yet (the aten-bias row, which decided
# conv_bias_grad, after them).
TRAIN_ORDER = ("ref_eager_nchw", "ref_eager_cl", "ref_compile_cl", "fused_cl", "fused_graph_cl",
               "fused_cudnn1x1_graph_cl", "fused_dw_graph_cl", "fused_pw_graph_cl", "fused_all_graph_cl",
               "fused_compile_cl", "fused_atenbias_graph_cl", "fused_ckpt_cl", "fused_nchw",
               *OPT_IN_VARIANTS)
# (No fused NCHW sampling row: the train row says what NCHW costs the fused model.) The Triton
# depthwise row early: the depthwise convs are the largest share of a sampling step left to
# cuDNN, and that kernel's tile design is untimed.
SAMPLE_ORDER = ("ref_compile_cl", "fused_cl", "fused_graph_cl", "fused_cudnn1x1_graph_cl", "fused_dw_graph_cl",
                "fused_pw_graph_cl", "fused_compile_cl", "fused_all_graph_cl", "ref_eager_cl", "ref_eager_nchw",
                *OPT_IN_VARIANTS)
# Rows are shown in this order, train and sampling alike.
ROW_ORDER = TRAIN_ORDER
# Seconds one timed task takes once its worker is ready (compilation excluded): eager train 2 +
# 10 steps of <= 0.3 s, eager sampling 52 forwards of <= 0.08 s; compiled ones less; the ops 96
# do_bench calls; a profiled train or sampling task (step_profile) 3 steps more and the trace's
# processing. The first H100 report (2026-11-27) took 5-11 s a train row, 3-8 s a sampling row,
# 9 s for the ops (before their CUDA-graph timings, about 0.2 s each more), and about 10 s more
# for each profile (the fused step: 20 s with it). They set the compile deadlines (the budget
# minus all of them for the other rows; minus the ops' and the targets' rows' for those) and
# decide, task by task, whether what is left of the budget still fits.
ESTIMATE_S = {
    False: {("train", False): 9, ("train", True): 7, ("sample", False): 7, ("sample", True): 4, "ops": 30, "profile": 10},
    True: {("train", False): 15, ("train", True): 11, ("sample", False): 8, ("sample", True): 8, "ops": 23, "profile": 5},
}
WRITE_MARGIN_S = 10
# Train warm-ups (before 'ready') that run at once on a GPU. Each holds a train step's peak (7.7
# GiB fused, ~17 GiB for the compiled reference, twice a step while CUDA graphs are captured);
# sampling warm-ups are small and run freely. Three at worst, beside the sampling warm-ups and
# twenty CUDA contexts, stay within an H100's 80 GB.
TRAIN_WARMUP_SLOTS = 3
WARM_SLOTS_ENV = "LIQUIDDIFF_BENCH_WARM_SLOTS"  # the folder of the slots' lock files


# ============================================================================ worker side
def _worker_main(args) -> int:
    """One model variant, one task (train or sample), in its own process.

    Protocol on the original stdout (everything else printed goes to stderr, the log): a
    ``ready`` line once built (and compiled and warmed up, for compiled variants); then it waits
    for ``go`` on stdin, times, and sends ``result`` (or ``error``) and exits.
    """
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # stray prints (Python or C) go to the log, not into the protocol
    sys.stdout = sys.stderr

    def send(**msg):
        proto.write(MARK + json.dumps(msg) + "\n")
        proto.flush()

    variant = VARIANTS[args.worker]
    task = args.task
    cfg = cases.e2e_config(args.quick)
    device = cases.default_device()
    if device.type == "cpu":
        torch.set_num_threads(1)  # several workers share the cores; spinning OpenMP threads would stall
    try:
        trainer = cases.build_trainer(cfg, fused=variant.fused, layout=variant.layout, device=device,
                                      cuda_graph=variant.cuda_graph and task == "train",
                                      compile=variant.compile_option)
        trainer.model.set_gradient_checkpointing(variant.checkpointing)
        images = cases.make_images(cfg, variant.layout, device)
        compile_s = None
        # Its first steps compile (torch.compile, or Triton kernels no other variant uses): warm
        # up before 'ready', while the others compile, not inside its timed turn.
        compiles = variant.compiled or bool(variant.kernels) or variant.cuda_graph  # graphs: their capture
        capture_peak = None
        if compiles:
            # A graph's activations live in its private pool, allocated while it is captured:
            # replays allocate nothing, so the row's peak is the capturing step's.
            _memory_start(device)
            with _warm_slot(task, variant):
                t0 = time.perf_counter()
                _warm_up(trainer, task, cfg, images, variant)
                cases.sync(device)
                compile_s = time.perf_counter() - t0
            if device.type == "cuda":
                capture_peak = torch.cuda.max_memory_allocated() if variant.cuda_graph else None
                torch.cuda.empty_cache()  # hold no more than the model while others run
        send(event="ready", compile_s=compile_s, free_GiB=_free_GiB(device), **cases.dynamo_counts())
        if sys.stdin.readline().strip() != "go":
            return 0
        if not compiles:
            _warm_up(trainer, task, cfg, images, variant)
        result = _measure_train(trainer, images, cfg, device) if task == "train" else _measure_sample(trainer, cfg, device, variant)
        result.update(cases.dynamo_counts())  # the timed steps' (a graph more than at 'ready': a recompile)
        if capture_peak is not None and "peak_GiB" in result:
            result["peak_GiB"] = max(result["peak_GiB"], capture_peak / 2**30)
            result["transient_GiB"] = result["peak_GiB"] - result["base_GiB"]
        if args.profile:
            try:  # after the timing, so the profiler's overhead touches no number above
                if task == "train":
                    result["profile"] = step_profile.profile_steps(lambda: trainer.train_step(images, sync=False),
                                                                     device)
                    result["profile"]["timed_ms"] = result["train_ms"]
                else:  # one Euler step a call: the model's forward without grad, and the update
                    result["profile"] = step_profile.profile_steps(
                        lambda: trainer.sample(cfg.batch, cfg.image, num_steps=1, use_ema=False,
                                               cuda_graph=variant.cuda_graph), device)
                    result["profile"]["timed_ms"] = 1e3 * result["sample_s"] / cfg.sample_steps
            except Exception as exc:  # noqa: BLE001 - the timing stands without it
                result["profile_error"] = f"{type(exc).__name__}: {exc}"[:300]
        send(event="result", **result)
        return 0
    except BaseException:  # noqa: BLE001 - reported to the parent, which notes it
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        send(event="error", error=tb[-3000:])
        return 1


@contextlib.contextmanager
def _warm_slot(task: str, variant: Variant):
    """One of ``TRAIN_WARMUP_SLOTS`` for a train warm-up (a lock file in the folder the parent
    names in ``WARM_SLOTS_ENV``; the lock goes with the process, killed or not); sampling
    warm-ups, and workers given no folder, go straight in. Compiled variants, the slowest to warm
    up, try first."""
    folder = os.environ.get(WARM_SLOTS_ENV)
    if task != "train" or not folder:
        yield
        return
    if not variant.compiled:
        time.sleep(2.0)
    while True:
        for i in range(TRAIN_WARMUP_SLOTS):
            with open(os.path.join(folder, f"train_warmup_{i}.lock"), "w") as slot:
                try:
                    fcntl.flock(slot, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue
                yield
                return
        time.sleep(0.2)


def _warm_up(trainer, task, cfg, images, variant):
    if task == "train":
        for _ in range(max(1, cfg.train_warmup)):
            trainer.train_step(images)
    else:
        trainer.sample(cfg.batch, cfg.image, num_steps=2, use_ema=False, cuda_graph=variant.cuda_graph)


def _free_GiB(device):
    """The device's free memory (every process's use counts), for the log of a run that ran out."""
    return torch.cuda.mem_get_info(device)[0] / 2**30 if device.type == "cuda" else None


def _memory_start(device):
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _memory_report(device, base):
    if device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated()
    return {"peak_GiB": peak / 2**30, "base_GiB": base / 2**30, "transient_GiB": (peak - base) / 2**30}


def _measure_train(trainer, images, cfg, device) -> dict:
    """The mean time of back-to-back train steps, as a training loop runs them: each queued
    without waiting for the last (``train_step(sync=False)``, the CLI's way), one wait at the end."""
    base = _memory_start(device)
    metrics = None
    cases.sync(device)
    t0 = time.perf_counter()
    for _ in range(cfg.train_steps):
        metrics = trainer.train_step(images, sync=False)
    cases.sync(device)
    out = {
        "train_ms": (time.perf_counter() - t0) / cfg.train_steps * 1e3,
        "loss": float(metrics["loss"]),
        "grad_norm": float(metrics["grad_norm"]),
    }
    out.update(_memory_report(device, base))
    return out


def _measure_sample(trainer, cfg, device, variant) -> dict:
    """Images per second of whole sample() calls (with ``cuda_graph``, replays of the graph the
    warm-up call captured and the trainer kept: its capture is in the compile column)."""
    base = _memory_start(device)
    times, images = [], None
    for _ in range(max(1, cfg.sample_runs)):
        cases.sync(device)
        t0 = time.perf_counter()
        images = trainer.sample(cfg.batch, cfg.image, num_steps=cfg.sample_steps, use_ema=False,
                                cuda_graph=variant.cuda_graph)
        cases.sync(device)
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    out = {
        "sample_s": seconds,
        "sample_s_all": times,
        "images_per_s": cfg.batch / seconds,
        "steps": cfg.sample_steps,
        "finite": bool(torch.isfinite(images).all()),
    }
    out.update(_memory_report(device, base))
    return out


# ============================================================================ parent side
class Clock:
    def __init__(self, budget_s: float):
        self.t0 = time.monotonic()
        self.end = self.t0 + budget_s

    def left(self) -> float:
        return self.end - time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0


class Worker:
    """A worker process for one (task, variant), and what it reported."""

    def __init__(self, task: str, name: str, quick: bool, env: dict, log_path: Path, clock: Clock, profile: bool):
        self.task, self.name, self.variant = task, name, VARIANTS[name]
        self.clock = clock
        self.log_path = log_path
        self.log = open(log_path, "w")
        cmd = [sys.executable, "-m", "benchmarks.gpu_report", "--worker", name, "--task", task]
        if quick:
            cmd.append("--quick")
        if profile:
            cmd.append("--profile")
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
            text=True, bufsize=1,
        )
        self.events: queue.Queue = queue.Queue()
        self.state = "starting"  # -> ready -> done | error | killed | skipped
        self.compile_s = None
        self.ready_at = None
        self.ready_graphs = None
        self.result: dict | None = None
        self.error: str | None = None
        threading.Thread(target=self._read, daemon=True).start()

    @property
    def key(self) -> str:
        return f"{self.task}:{self.name}"

    def _read(self):
        for line in self.proc.stdout:
            if line.startswith(MARK):
                try:
                    self.events.put(json.loads(line[len(MARK):]))
                except ValueError:
                    pass
        self.events.put({"event": "exit"})

    def drain(self, timeout: float = 0.0) -> None:
        try:
            ev = self.events.get(timeout=timeout) if timeout > 0 else self.events.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(ev)
            try:
                ev = self.events.get_nowait()
            except queue.Empty:
                return

    def _apply(self, ev: dict) -> None:
        kind = ev.get("event")
        if kind == "ready" and self.state == "starting":
            self.state, self.compile_s, self.ready_at = "ready", ev.get("compile_s"), self.clock.elapsed()
            self.ready_graphs = ev.get("graphs")
            if ev.get("free_GiB") is not None:
                print(f"[{self.clock.elapsed():6.1f}s] {self.key} ready, {ev['free_GiB']:.1f} GiB free on the device",
                      flush=True)
        elif kind == "result":
            self.state, self.result = "done", ev
        elif kind == "error":
            self.state, self.error = "error", ev.get("error", "unknown error")
        elif kind == "exit" and self.state in ("starting", "ready", "running"):
            self.proc.wait()
            self.state = "error"
            code = self.proc.returncode
            self.error = self.error or ("stopped by the outer timeout's SIGTERM" if code == -signal.SIGTERM else
                                        f"worker exited with code {code} before reporting (see its log)")

    def go(self) -> None:
        self.state = "running"
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def wait_done(self, timeout: float) -> None:
        end = time.monotonic() + max(0.0, timeout)
        while self.state == "running" and time.monotonic() < end:
            self.drain(timeout=min(0.5, max(0.01, end - time.monotonic())))

    def kill(self, state: str, reason: str) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.state, self.error = state, reason

    def close(self) -> None:
        if self.proc.poll() is None and self.state == "starting":
            self.proc.kill()  # still building or compiling: it reads no "quit" until it is ready
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=5)
            except Exception:  # noqa: BLE001 - a stuck or dead worker is killed below
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _estimate(quick: bool, task: str, name: str, profiled=()) -> float:
    """Seconds the ``task`` of variant ``name`` takes to time once ready (its profile's too, if
    ``name`` is in ``profiled``)."""
    est = ESTIMATE_S[quick]
    return est[(task, VARIANTS[name].compiled)] + (est["profile"] if name in profiled else 0)


def _timing_s(quick: bool, tasks, profiled=()) -> float:
    """Seconds ``tasks`` ((task, variant) pairs) take to time once their workers are ready."""
    return sum(_estimate(quick, task, name, profiled) for task, name in tasks)


def model_tasks(compile: bool, variants, cuda: bool) -> list[tuple[str, str]]:
    """The (task, variant) pairs a report times, in display order: ``variants`` alone where given,
    else all but OPT_IN_VARIANTS; compiled ones only with ``compile``, CUDA-graph ones only on a
    GPU."""
    tasks = [("train", n) for n in TRAIN_ORDER] + [("sample", n) for n in SAMPLE_ORDER]
    return [(t, n) for t, n in tasks
            if (n in variants if variants else n not in OPT_IN_VARIANTS)
            and (compile or not VARIANTS[n].compiled) and (cuda or not VARIANTS[n].cuda_graph)]


def _worker_env(quick: bool, variant: Variant, device, slots_dir: Path) -> dict:
    env = dict(os.environ)
    if device.type == "cuda":
        env[WARM_SLOTS_ENV] = str(slots_dir)
    if variant.kernels:
        env[runtime.ENV_VAR] = runtime.setting_with(variant.kernels)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONUNBUFFERED"] = "1"
    if variant.compiled and device.type == "cuda":
        # Several processes compile at once: share the cores instead of 16 compile workers each.
        env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "4")
    return env


# ---------------------------------------------------------------------------- ops
def prepare_ops(args, clock, device, dtype, shape, notes, reserve_s, entries: list) -> list[dict]:
    """Inputs, parity, saved-for-backward memory and the op compiles (not timed), appended to
    ``entries`` as they are made (an interrupted run still reports what was done)."""
    for op in cases.OP_NAMES:  # the issues' target ops first
        for layout in cases.OPS[op].layouts:
            label = f"{op} {layout}"
            entry = {"op": op, "title": cases.OPS[op].title, "layout": layout, "fns": {}, "compile_s": {}}
            entries.append(entry)
            if clock.left() < reserve_s:
                notes.append(f"{label}: not run (time budget)")
                continue
            try:
                case = cases.make_op_case(op, shape, dtype, device, layout, seed=len(entries))
            except Exception as exc:  # noqa: BLE001
                notes.append(f"{label}: could not build the inputs: {exc!r}")
                continue
            entry["case"] = case
            spec = case.spec
            tol = TOL.get(dtype, 1e-2)
            for who, fn in (("fused", spec.fused), ("eager", spec.reference)):
                try:
                    errs = cases.parity(case, fn)
                    entry[f"parity_{who}"] = errs
                except Exception as exc:  # noqa: BLE001
                    entry[f"parity_{who}"] = None
                    notes.append(f"{label}: parity of {who} failed to run: {exc!r}")
            errs = entry.get("parity_fused")
            if errs:
                worst = cases.max_error(errs)
                entry["parity_max_err"] = worst
                entry["parity_tol"] = tol
                entry["parity"] = "PASS" if worst == worst and worst <= tol else "FAIL"
                if entry["parity"] == "FAIL":
                    bad = {k: f"{v:.2e}" for k, v in errs.items() if not (v <= tol)}
                    notes.append(f"{label}: PARITY FAIL (tol {tol:.0e}): {bad}")
            else:
                entry["parity"] = "ERROR"
            for impl in ("eager", "fused"):
                entry["fns"][impl] = cases.implementation(spec, impl)
            if args.compile:
                if clock.left() < reserve_s:
                    notes.append(f"{label}: torch.compile skipped (time budget)")
                else:
                    entry["fns"]["compile"] = cases.implementation(spec, "compile")
            entry["callables"] = {}
            for impl, fn in list(entry["fns"].items()):
                for mode in spec.modes:
                    try:
                        call = cases.op_callable(case, impl, mode, fn)
                        t0 = time.perf_counter()
                        call()  # compiles (torch.compile, Triton jit) outside the timed region
                        cases.sync(device)
                        if impl == "compile":
                            entry["compile_s"][mode] = time.perf_counter() - t0
                        entry["callables"][(impl, mode)] = call
                    except Exception as exc:  # noqa: BLE001
                        notes.append(f"{label} {impl} {mode}: failed: {type(exc).__name__}: {str(exc)[:300]}")
            mem = {}
            for impl, fn in entry["fns"].items():
                if (impl, "fwdbwd") not in entry["callables"]:
                    continue
                try:
                    mem[impl] = cases.saved_tensor_bytes(fn, case)
                    mem[impl]["retained_MB"] = cases.retained_after_forward(fn, case)
                except Exception as exc:  # noqa: BLE001
                    notes.append(f"{label} {impl}: saved-tensor measurement failed: {exc!r}")
            entry["memory"] = mem
    return entries


def time_ops(entries, device, copy_GBps, quick, notes, clock: Clock, keep_s: float) -> None:
    """Times each prepared entry while the budget, less ``keep_s`` (the targets' model rows),
    has room for its share of ``ESTIMATE_S``'s ops."""
    warmup, rep = (5, 20) if quick else (25, 100)
    share = ESTIMATE_S[quick]["ops"] / max(1, len(entries))
    for entry in entries:
        case = entry.get("case")
        if case is None:
            continue
        if clock.left() < keep_s + share:
            notes.append(f"{entry['op']} {entry['layout']}: not timed (time budget)")
            continue
        entry["ms"], entry["graph_ms"], entry["floor_ms"], entry["floor_bytes"] = {}, {}, {}, {}
        for mode in case.spec.modes:
            entry["floor_bytes"][mode] = case.floor_bytes(mode)
            if copy_GBps:
                entry["floor_ms"][mode] = case.floor_bytes(mode) / (copy_GBps * 1e9) * 1e3
            for impl in cases.IMPLS:
                call = entry["callables"].get((impl, mode))
                if call is None:
                    continue
                try:
                    entry["ms"][(impl, mode)] = cases.time_ms(call, device, warmup, rep)
                except Exception as exc:  # noqa: BLE001
                    notes.append(f"{entry['op']} {entry['layout']} {impl} {mode}: timing failed: {exc!r}")
                    continue
                try:  # the kernels alone: the H100 report's per-call times carried the host's costs
                    graph_ms = cases.time_graph_ms(call, device)
                except Exception as exc:  # noqa: BLE001
                    notes.append(f"{entry['op']} {entry['layout']} {impl} {mode}: CUDA-graph timing failed: {exc!r}")
                    continue
                if graph_ms is not None:
                    entry["graph_ms"][(impl, mode)] = graph_ms


# Timings of each op call: per call ("eager_ms", ...) and replayed from CUDA graphs, GPU time
# only ("eager_graph_ms", ...), each with the same ratios.
TIMINGS = (("", "ms"), ("_graph", "graph_ms"))


def _timing_fields(times: dict, mode: str, floor, suffix: str) -> dict:
    eager, comp, fused = (times.get((i, mode)) for i in cases.IMPLS)
    return {
        f"eager{suffix}_ms": eager, f"compile{suffix}_ms": comp, f"fused{suffix}_ms": fused,
        f"fused{suffix}_over_floor": _ratio(fused, floor), f"compile{suffix}_over_floor": _ratio(comp, floor),
        f"eager{suffix}_over_floor": _ratio(eager, floor),
        f"compile{suffix}_over_fused": _ratio(comp, fused), f"eager{suffix}_over_fused": _ratio(eager, fused),
    }


def op_rows(entries) -> list[dict]:
    rows = []
    for entry in entries:
        for mode in cases.OPS[entry["op"]].modes:
            floor = entry.get("floor_ms", {}).get(mode)
            row = {
                "op": entry["op"], "title": entry["title"], "layout": entry["layout"], "pass": mode,
                "floor_ms": floor, "floor_bytes": entry.get("floor_bytes", {}).get(mode),
                "compile_s": entry.get("compile_s", {}).get(mode),
                "parity": entry.get("parity"),
            }
            for suffix, key in TIMINGS:
                row.update(_timing_fields(entry.get(key, {}), mode, floor, suffix))
            errs = entry.get("parity_fused") or {}
            outs = [k for k in errs if not k.startswith("d")]
            picked = {k: v for k, v in errs.items() if (k in outs) == (mode == "fwd")}
            row["parity_err"] = cases.max_error(picked) if picked else None
            tol = entry.get("parity_tol")
            if row["parity_err"] is not None and tol is not None:
                err = row["parity_err"]
                row["parity"] = "PASS" if err == err and err <= tol else "FAIL"
            ref_errs = entry.get("parity_eager") or {}
            ref_picked = {k: v for k, v in ref_errs.items() if (k in outs) == (mode == "fwd")}
            row["eager_bf16_err"] = cases.max_error(ref_picked) if ref_picked else None
            rows.append(row)
    return rows


def _ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def memory_rows(entries) -> list[dict]:
    rows = []
    for entry in entries:
        mem = entry.get("memory") or {}
        row = {"op": entry["op"], "title": entry["title"], "layout": entry["layout"]}
        for impl in cases.IMPLS:
            m = mem.get(impl) or {}
            row[f"{impl}_saved_MB"] = m.get("saved_MB")
            row[f"{impl}_saved_new_MB"] = m.get("saved_new_MB")
            row[f"{impl}_saved_tensors"] = m.get("saved_tensors")
            row[f"{impl}_retained_MB"] = m.get("retained_MB")
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- report
def _fmt(v, spec=".3f", none="-"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec)


def _op_timing_cells(row: dict, suffix: str) -> list[str]:
    """An op row's name, times and ratios (``TIMINGS``' ``suffix``) as table cells."""
    return [row["title"], row["layout"], cases.MODE_TITLES[row["pass"]]] + [
        _fmt(row.get(f"{impl}{suffix}_ms")) for impl in cases.IMPLS] + [_fmt(row.get("floor_ms"))] + [
        _fmt(row.get(f"{name}{suffix}_{ratio}"), ".2f")
        for name, ratio in (("fused", "over_floor"), ("compile", "over_fused"), ("eager", "over_fused"))]


def _fmt_mb(v):
    if v is None:
        return "-"
    return format(v, ".0f") if v >= 10 else format(v, ".3g")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    meta = report["meta"]
    out = ["# liquiddiff GPU report", ""]
    out.append(f"- date: {meta['date']}")
    out.append(f"- device: {meta['device']} ({meta.get('device_detail', '')})")
    out.append(f"- torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, python {meta['python']}")
    out.append(f"- command: `{meta['command']}`" + (f" (git {meta['git_commit']})" if meta.get("git_commit") else ""))
    out.append(f"- fused backends: {meta['kernel_backends']}")
    out.append(f"- copy bandwidth: {_fmt(meta.get('copy_GBps'), '.0f')} GB/s (one device-to-device copy, read + write)")
    out.append(f"- cuDNN benchmark mode {'on' if meta.get('cudnn_benchmark') else 'off'} in every process; the compiled "
               "rows' first-launch tuning (inductor) ran beside other workers' warm-ups")
    out.append(f"- wall time: {_fmt(meta.get('elapsed_s'), '.0f')} s of a {meta['budget_s']:.0f} s budget"
               + (" (QUICK MODE: tiny sizes, numbers only prove the code runs)" if meta["quick"] else ""))
    hl = report.get("headline") or []
    if hl:
        out += ["", "## Headline", ""] + [f"- {line}" for line in hl]
    if report.get("targets"):
        out += ["", "## The issues' targets (benchmarks/targets.py)", "",
                _table(["issue", "target", "measured", "verdict"],
                       [[str(t["issue"]), t["target"], t["measured"], t["verdict"]] for t in report["targets"]])]

    shape, dtype = meta["op_shape"], meta["op_dtype"]
    out += ["", f"## Fused ops ({dtype}, {shape}): median ms", ""]
    rows = []
    for r in report["ops"]:
        par = "-"
        if r.get("parity_err") is not None:
            par = f"{r['parity']} {r['parity_err']:.1e}" + (
                f" (ref {r['eager_bf16_err']:.1e})" if r.get("eager_bf16_err") is not None else "")
        elif r.get("parity"):
            par = r["parity"]
        rows.append(_op_timing_cells(r, "") + [par])
    times_header = ["op", "layout", "pass", "eager", "compile", "fused", "floor", "fused/floor", "compile/fused",
                    "eager/fused"]
    out.append(_table(times_header + ["parity vs fp64 (max rel err)"], rows))
    graph_rows = [r for r in report["ops"] if r.get("fused_graph_ms") is not None]
    if graph_rows:
        out += ["", "The same calls replayed from CUDA graphs (`cases.time_graph_ms`): GPU time only, median ms. "
                    "Above, each call's time also holds whatever of the host's Python, dispatch and launches the "
                    "kernels do not hide.", ""]
        out.append(_table(times_header, [_op_timing_cells(r, "_graph") for r in graph_rows]))
    out += ["", "Saved for backward (MB, unique storages seen by the saved-tensor hook; new = not an input) "
            "and retained after a forward with grad (MB, new allocations incl. outputs):", ""]
    rows = []
    for r in report["op_memory"]:
        rows.append([r["title"], r["layout"]] + [
            f"{_fmt_mb(r[f'{i}_saved_MB'])} / {_fmt_mb(r[f'{i}_saved_new_MB'])}" for i in cases.IMPLS
        ] + [_fmt_mb(r[f"{i}_retained_MB"]) for i in cases.IMPLS])
    out.append(_table(["op", "layout", "saved eager (all/new)", "saved compile", "saved fused",
                       "retained eager", "retained compile", "retained fused"], rows))

    e2e = report.get("e2e") or {}
    out += ["", f"## End to end ({e2e.get('config', '-')}): train step (RectifiedFlowTrainer.train_step)", ""]
    rows = []
    for r in e2e.get("train", []):
        rows.append([r["label"], r["layout"], _fmt(r.get("train_ms"), ".1f"), _fmt(r.get("speedup_vs_ref_eager_nchw"), ".2f"),
                     _fmt(r.get("speedup_vs_ref_compile_cl"), ".2f"), _fmt(r.get("peak_GiB"), ".2f"),
                     _fmt(r.get("transient_GiB"), ".2f"), _fmt(r.get("compile_s"), ".0f"),
                     _fmt(r.get("loss_vs_reference"), "+.2%"), r.get("status", "-")])
    out.append(_table(["variant", "layout", "step ms", "x vs eager NCHW", "x vs compile ref CL", "peak GiB",
                       "step GiB", "compile s", "loss vs ref", "status"], rows))
    out += ["", f"Sampling ({e2e.get('sample_steps', '-')} Euler steps, batch {e2e.get('batch', '-')}, "
            "RectifiedFlowTrainer.sample):", ""]
    rows = []
    for r in e2e.get("sample", []):
        rows.append([r["label"], r["layout"], _fmt(r.get("images_per_s"), ".1f"), _fmt(r.get("sample_s"), ".2f"),
                     _fmt(r.get("peak_GiB"), ".2f"), _fmt(r.get("compile_s"), ".0f"), r.get("status", "-")])
    out.append(_table(["variant", "layout", "images/s", "s per batch", "peak GiB", "compile s", "status"], rows))
    for task, what in (("train", "a train step"), ("sample", "a sampling step (one Euler step: a forward without grad)")):
        profiled = [r for r in e2e.get(task, []) if r.get("profile") or r.get("profile_error")]
        if profiled:
            out += ["", f"## Where {what}'s time goes (torch.profiler, benchmarks/step_profile.py)", ""]
        for r in profiled:
            label = f"{r['label']} {r['layout']}"
            out += (step_profile.render(label, r["profile"]) if r.get("profile")
                    else [f"**{label}**: profile failed: {r['profile_error']}"]) + [""]
    if report.get("notes"):
        out += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    out += ["", "Columns: see benchmarks/README.md. floor = bytes that must move / copy bandwidth.", ""]
    return "\n".join(out)


def headline(report: dict) -> list[str]:
    lines = []
    for r in report["ops"]:
        if r["layout"] != "channels_last" or r["fused_ms"] is None:
            continue
        graph = "" if r.get("fused_graph_ms") is None else (
            f"; CUDA graph: fused {_fmt(r['fused_graph_ms'])} ms = {_fmt(r.get('fused_graph_over_floor'), '.2f')}x floor, "
            f"torch.compile {_fmt(r.get('compile_graph_ms'))} ms ({_fmt(r.get('compile_graph_over_fused'), '.2f')}x fused)")
        lines.append(
            f"{r['title']} {cases.MODE_TITLES[r['pass']]} (channels_last): fused {_fmt(r['fused_ms'])} ms = "
            f"{_fmt(r['fused_over_floor'], '.2f')}x floor; torch.compile {_fmt(r['compile_ms'])} ms "
            f"({_fmt(r['compile_over_fused'], '.2f')}x fused); parity {r.get('parity')}{graph}"
        )
    train = {r["name"]: r for r in (report.get("e2e") or {}).get("train", [])}
    base = train.get("ref_compile_cl", {})
    for name in ("fused_cl", "fused_graph_cl", "fused_compile_cl", "fused_dw_graph_cl", "fused_pw_graph_cl",
                 "fused_all_graph_cl", "fused_ckpt_cl"):
        r = train.get(name)
        if r and r.get("train_ms") is not None:
            lines.append(
                f"train step, {r['label']} channels_last: {_fmt(r['train_ms'], '.1f')} ms, peak {_fmt(r.get('peak_GiB'), '.1f')} GiB "
                f"vs torch.compile(reference) channels_last {_fmt(base.get('train_ms'), '.1f')} ms, "
                f"{_fmt(base.get('peak_GiB'), '.1f')} GiB"
            )
    for r in (report.get("e2e") or {}).get("sample", []):
        if r.get("images_per_s") is not None:
            lines.append(f"sampling, {r['label']} {r['layout']}: {_fmt(r['images_per_s'], '.1f')} images/s")
    return lines


def plot_ratios(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    colors = {"eager": "#999999", "compile": "#4477aa", "fused": "#ee6677"}
    # GPU times from CUDA-graph replays where the report has them (what the kernels cost).
    graph = any(r.get("fused_graph_ms") is not None for r in report["ops"])
    ratio = "_graph_over_floor" if graph else "_over_floor"
    for ax, mode in zip(axes, cases.MODES):
        rows = [r for r in report["ops"] if r["pass"] == mode]
        xs = range(len(rows))
        width = 0.27
        for k, impl in enumerate(cases.IMPLS):
            vals = [r.get(f"{impl}{ratio}") or 0.0 for r in rows]
            bars = ax.bar([x + (k - 1) * width for x in xs], vals, width, label=cases.IMPL_TITLES[impl], color=colors[impl])
            for b, v in zip(bars, vals):
                if v:
                    ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="black", lw=1)
        for x, r in zip(xs, rows):  # the issue's limit on fused / floor, over its op's bars
            limit = targets.floor_limit(r["op"], mode)
            if limit is not None:
                ax.hlines(limit, x - 1.5 * width, x + 1.5 * width, colors="black", lw=1, linestyles="--")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([f"{r['title']}\n{'NCHW' if r['layout'] == 'nchw' else 'channels_last'}" for r in rows],
                           fontsize=7)
        ax.set_yscale("log")
        ax.set_title(f"{cases.MODE_TITLES[mode]}: {'CUDA-graph ' if graph else ''}time / memory floor "
                     "(1 = floor, dashed = the issue's target)", fontsize=9)
        ax.grid(axis="y", alpha=0.3, which="both")
    axes[0].set_ylabel("time / floor (log)")
    axes[0].legend(fontsize=8)
    meta = report["meta"]
    fig.suptitle(f"{meta['device']}, {meta['op_dtype']} {meta['op_shape']}, torch {meta['torch']}, triton {meta['triton']}, "
                 f"{meta['date']}" + (" (QUICK)" if meta["quick"] else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment(args, device, argv) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.gpu_report", *argv]),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "quick": bool(args.quick),
        "budget_s": float(args.budget),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "env": {k: os.environ.get(k) for k in ("LIQUIDDIFF_KERNELS", "TRITON_INTERPRET", "TORCHINDUCTOR_COMPILE_THREADS")},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta["device"] = torch.cuda.get_device_name(device)
        meta["device_detail"] = f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB, sm_{props.major}{props.minor}"
    else:
        meta["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        meta["device_detail"] = "no CUDA: fused ops under the Triton interpreter"
    try:
        meta["kernel_backends"] = {op: f"{b.name} ({b.reason})" for op, b in kernels.backend_report(device).items()}
    except Exception as exc:  # noqa: BLE001 - e.g. LIQUIDDIFF_KERNELS=triton where Triton cannot run
        meta["kernel_backends"] = {"error": f"{type(exc).__name__}: {exc}"}
    try:
        meta["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5
        ).stdout.strip() or None
    except Exception:  # noqa: BLE001
        meta["git_commit"] = None
    return meta


class _Interrupted(BaseException):
    """The outer timeout's SIGTERM: a BaseException, so no ``except Exception`` on the way
    (around an op's parity or timing, in Triton's interpreter) takes it for that step's failure."""


def _on_sigterm(signum, frame):
    raise _Interrupted(f"signal {signum}")


def _share_compile_threads() -> None:
    """The op baselines compile here while four compiled workers compile with 4 threads each
    (``_worker_env``): this process takes 4 too, not one per core."""
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = min(inductor_config.compile_threads, 4)


def timing_order(tasks: list) -> list:
    """The rows the issues' targets read first (targets.MEASURED_TASKS), then the others as given."""
    first = [task for task in targets.MEASURED_TASKS if task in tasks]
    return first + [task for task in tasks if task not in first]


def wait_for_workers(workers: dict, clock: Clock, others_by: float, targets_by: float, budget: float) -> None:
    """Wait until every worker is ready (built, compiled, warmed up). At ``others_by`` (monotonic
    time) the workers of rows no target reads are given up if still compiling, which frees the
    machine for the rest; at ``targets_by`` the targets' rows too."""
    last_print = 0.0
    while True:
        for w in workers.values():
            w.drain()
        now = time.monotonic()
        pending = [w for w in workers.values() if w.state == "starting"]
        for w in pending:
            if now >= (targets_by if (w.task, w.name) in targets.MEASURED_TASKS else others_by):
                w.kill("skipped", f"not ready (compiling) by its compile deadline, {clock.elapsed():.0f} s into "
                                  f"a {budget:.0f} s budget")
        pending = [w for w in pending if w.state == "starting"]
        if not pending:
            break
        if now - last_print > 30:
            last_print = now
            print(f"[{clock.elapsed():6.1f}s] waiting for {', '.join(w.key for w in pending)}", flush=True)
        time.sleep(0.25)
    for w in workers.values():
        if w.state == "ready" and w.compile_s is not None:
            print(f"[{clock.elapsed():6.1f}s] {w.key} compiled and warmed up in {w.compile_s:.0f} s", flush=True)


def run_report(args, argv) -> int:
    clock = Clock(args.budget)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Worker logs live in a scratch folder and are joined into OUT/workers.log at the end (the
    # output folder stays a handful of files).
    log_dir = Path(tempfile.mkdtemp(prefix="ldbench_workers_"))
    device = cases.default_device()
    dtype = cases.default_dtype(device)
    shape = cases.QUICK_OP_SHAPE if args.quick else cases.OP_SHAPE
    quick = bool(args.quick)
    est = ESTIMATE_S[quick]
    notes: list[str] = []
    report = {"meta": environment(args, device, argv), "ops": [], "op_memory": [], "e2e": {}, "notes": notes}
    report["meta"].update(op_shape=list(shape), op_dtype=str(dtype).replace("torch.", ""))
    cfg = cases.e2e_config(quick)
    workers: dict[tuple[str, str], Worker] = {}
    status = 0
    entries: list[dict] = []
    signal.signal(signal.SIGTERM, _on_sigterm)
    print(f"[{clock.elapsed():6.1f}s] {report['meta']['device']}, torch {torch.__version__}, "
          f"triton {report['meta']['triton']}; budget {args.budget:.0f} s; out {out_dir}", flush=True)
    for op, b in report["meta"]["kernel_backends"].items():
        print(f"          {op}: {b}", flush=True)
        if device.type == "cuda" and not str(b).startswith("triton") and op not in runtime.OPT_IN:
            notes.append(f"{op}: the fused op runs the PyTorch reference here ({b}): 'fused' = reference")
    try:
        if device.type == "cuda":
            cases.set_compile_limits()
            _share_compile_threads()
        # 1. Start every model worker: their builds and compiles overlap the op checks below.
        tasks = model_tasks(args.compile, args.variants, device.type == "cuda") if args.e2e else []
        if args.e2e:
            if not args.compile:
                notes.append("model torch.compile variants not run (--no-compile)")
            for task, name in tasks:
                workers[(task, name)] = Worker(task, name, quick, _worker_env(quick, VARIANTS[name], device, log_dir),
                                               log_dir / f"{task}_{name}.log", clock, name in args.profile_variants)
            print(f"[{clock.elapsed():6.1f}s] started {len(workers)} model workers ({cfg.describe()})", flush=True)
        tasks = timing_order(tasks)
        targeted = [task for task in tasks if task in targets.MEASURED_TASKS]
        # Seconds the rows the targets need take to time once ready (the ops' included), and all rows.
        e2e_targets_s = WRITE_MARGIN_S + _timing_s(quick, targeted, args.profile_variants)
        reserve_targets = (est["ops"] if args.ops else 0) + e2e_targets_s
        reserve_all = reserve_targets + _timing_s(quick, [task for task in tasks if task not in targeted],
                                                  args.profile_variants)

        # 2. Ops: inputs, parity, saved memory, compiles (nothing timed yet).
        if args.ops:
            prepare_ops(args, clock, device, dtype, shape, notes, reserve_targets, entries)
            print(f"[{clock.elapsed():6.1f}s] ops prepared (parity, memory, compiles)", flush=True)

        # 3. Wait for the workers to be ready (compiled): the other rows up to the budget less every
        # row's timing, the targets' rows up to the budget less theirs.
        wait_for_workers(workers, clock, clock.end - reserve_all, clock.end - reserve_targets, args.budget)

        # 4. Timing, one thing at a time: copy bandwidth, ops, then each worker.
        try:
            copy_GBps = cases.copy_bandwidth_GBps(device)
            print(f"[{clock.elapsed():6.1f}s] copy bandwidth {copy_GBps:.0f} GB/s", flush=True)
        except Exception as exc:  # noqa: BLE001 - no floor then, the rest goes on
            copy_GBps = None
            notes.append(f"copy bandwidth measurement failed: {exc!r}: no floor")
        report["meta"]["copy_GBps"] = copy_GBps
        if entries:
            time_ops(entries, device, copy_GBps, quick, notes, clock, keep_s=e2e_targets_s)
            report["ops"] = op_rows(entries)
            report["op_memory"] = memory_rows(entries)
            print(f"[{clock.elapsed():6.1f}s] ops timed", flush=True)
        entries.clear()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for task, name in tasks:
            w = workers[(task, name)]
            w.drain()
            if w.state != "ready":
                continue
            need = _estimate(quick, task, name, args.profile_variants)
            if clock.left() < need + WRITE_MARGIN_S:
                w.kill("skipped", f"skipped: {clock.left():.0f} s left of the budget, about {need} s needed")
                continue
            w.go()
            w.wait_done(timeout=min(clock.left() - WRITE_MARGIN_S, max(4 * need, 60)))
            if w.state == "running":
                w.kill("killed", f"no result within {max(4 * need, 60)} s (or the budget)")
            w.close()
            r = w.result or {}
            if task == "train" and "train_ms" in r:
                extra = f", peak {r['peak_GiB']:.2f} GiB" if "peak_GiB" in r else ""
                print(f"[{clock.elapsed():6.1f}s] train {name}: {r['train_ms']:.1f} ms{extra}", flush=True)
            elif task == "sample" and "images_per_s" in r:
                print(f"[{clock.elapsed():6.1f}s] sample {name}: {r['images_per_s']:.2f} images/s", flush=True)
    except _Interrupted as exc:
        notes.append(f"interrupted ({exc}) at {clock.elapsed():.0f} s: partial report")
        status = 3
    except Exception:  # noqa: BLE001 - the report is written whatever happened
        notes.append("report error: " + traceback.format_exc()[-1500:])
        status = 2
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish writing the report
        for w in workers.values():
            w.close()
        _join_logs(workers, out_dir / "workers.log", log_dir)
    if entries and not report["ops"]:  # interrupted before the ops were timed: what there is
        report["ops"], report["op_memory"] = op_rows(entries), memory_rows(entries)
    entries.clear()
    report["e2e"] = e2e_section(workers, cfg, notes)
    report["meta"]["elapsed_s"] = clock.elapsed()
    report["headline"] = headline(report)
    report["targets"] = targets.evaluate(report)
    e2e_rows = report["e2e"].get("train", []) + report["e2e"].get("sample", [])
    if any(r.get("parity") in ("FAIL", "ERROR") for r in report["ops"]) or any(
            str(r.get("status")).startswith(("NON-FINITE", "LOSS OFF")) for r in e2e_rows):
        status = status or 1
    report["meta"]["status"] = status
    (out_dir / "report.json").write_text(json.dumps(strict_json(report), indent=1, default=str, allow_nan=False) + "\n")
    md = render_markdown(report)
    (out_dir / "report.md").write_text(md)
    try:
        plot_ratios(report, out_dir / "ratios.png")
    except Exception as exc:  # noqa: BLE001
        print(f"plot failed: {exc!r}", flush=True)
    print(f"[{clock.elapsed():6.1f}s] wrote {out_dir}/report.json, report.md, ratios.png" + (", workers.log" if workers else "") + "\n", flush=True)
    print(md, flush=True)
    return status


def _join_logs(workers, path: Path, log_dir: Path) -> None:
    if workers:
        with open(path, "w") as out:
            for w in workers.values():
                out.write(f"===== {w.key}: {w.state}" + (f" ({w.error.strip().splitlines()[-1]})" if w.error else "") + "\n")
                try:
                    out.write(w.log_path.read_text(errors="replace")[-200_000:])
                except OSError as exc:
                    out.write(f"(no log: {exc})\n")
                out.write("\n")
    shutil.rmtree(log_dir, ignore_errors=True)


def e2e_section(workers, cfg, notes) -> dict:
    section = {"config": cfg.describe(), "batch": cfg.batch, "image": cfg.image, "preset": cfg.preset,
               "train_steps": cfg.train_steps, "train_warmup": cfg.train_warmup, "sample_steps": cfg.sample_steps,
               "autocast": "bf16 (CUDA)" if torch.cuda.is_available() else "none (CPU)", "train": [], "sample": []}
    for (task, name), w in workers.items():
        v = VARIANTS[name]
        row = {"name": name, "label": v.label, "layout": v.layout, "fused": v.fused, "compiled": v.compiled,
               "compile_s": w.compile_s, "status": "ok" if w.state == "done" else w.state}
        row.update({k: val for k, val in (w.result or {}).items() if k != "event"})
        loss = row.get("loss")
        if (loss is not None and not math.isfinite(loss)) or row.get("finite") is False:
            row["status"] = "NON-FINITE"
            notes.append(f"{task} {name}: non-finite {'loss' if task == 'train' else 'samples'}")
        elif v.compiled and w.state == "done" and row.get("graphs") is not None:
            recompiled = row["graphs"] - (w.ready_graphs or 0)
            if row["graphs"] == 0:
                row["status"] = "NOT COMPILED"
                notes.append(f"{task} {name}: dynamo compiled no graph: this row ran eager")
            elif recompiled > 0:
                row["status"] = f"RECOMPILED ({recompiled} more graph(s) while timed)"
                notes.append(f"{task} {name}: dynamo compiled while timed: its time includes compiling")
            else:
                row["status"] = f"ok ({row['graphs']} graph(s), {row.get('graph_breaks', 0)} break(s))"
        if w.state != "done":
            msg = (w.error or "").strip().splitlines()
            notes.append(f"{task} {name}: {w.state}: {msg[-1] if msg else 'no result'}"
                         + (" (see workers.log)" if w.state == "error" else ""))
        section[task].append(row)
    train = {r["name"]: r for r in section["train"]}
    _compare_losses(train, notes)
    for r in section["train"]:
        for base_name, key in (("ref_eager_nchw", "speedup_vs_ref_eager_nchw"), ("ref_compile_cl", "speedup_vs_ref_compile_cl")):
            base = train.get(base_name, {}).get("train_ms")
            r[key] = _ratio(base, r.get("train_ms"))
    order = {n: i for i, n in enumerate(ROW_ORDER)}
    section["train"].sort(key=lambda r: order[r["name"]])
    section["sample"].sort(key=lambda r: order[r["name"]])
    return section


def strict_json(value):
    """``value`` with each non-finite float (a NaN parity error, an inf loss) as the string Python
    prints for it: report.json stays JSON that any parser reads (bare NaN is Python's extension)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


# The eager rows train the same model on the same images and noise (cases.build_trainer's seed):
# their last losses differ by rounding (bf16) over a dozen steps, far less than this. More says a
# row computes another function. (Compiled rows are left out: inductor's fusions round otherwise,
# and nothing here shows that compiling and autotuning leave the CUDA generator's draws alone.)
LOSS_RTOL = 0.02
LOSS_REFERENCE = "ref_eager_cl"


def _compare_losses(train: dict, notes: list) -> None:
    """Each eager train row's last loss against the eager reference's: ``loss_vs_reference``;
    where it is off by more than ``LOSS_RTOL``, a note, and a status that keeps the row's
    numbers out of the targets (a fast step of another function meets nothing)."""
    reference = train.get(LOSS_REFERENCE, {}).get("loss")
    if reference is None or not math.isfinite(reference) or reference == 0:
        return
    for name, r in train.items():
        if r.get("compiled") or r.get("loss") is None or not math.isfinite(r["loss"]):
            continue
        r["loss_vs_reference"] = r["loss"] / reference - 1
        if abs(r["loss_vs_reference"]) > LOSS_RTOL:
            r["status"] = f"LOSS OFF ({r['loss_vs_reference']:+.1%} vs the eager reference)"
            notes.append(f"train {name}: last loss {r['loss']:.4f} against the eager reference's {reference:.4f} "
                         f"({r['loss_vs_reference']:+.1%}) with the same data and noise: check it computes the same model")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_report", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="gpu_report", help="output folder (report.json, report.md, ratios.png)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (CPU or GPU): proves the code runs")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole report (default 330 on a GPU, 200 with --quick)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None, help="include torch.compile baselines")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--no-e2e", dest="e2e", action="store_false", default=True, help="skip the model benchmarks")
    p.add_argument("--no-ops", dest="ops", action="store_false", default=True, help="skip the op benchmarks")
    p.add_argument("--variants", type=lambda v: [x for x in v.split(",") if x], default=None,
                   help=f"only these model variants (comma-separated: {', '.join(VARIANTS)}; "
                        f"{', '.join(OPT_IN_VARIANTS)} run only when named here)")
    p.add_argument("--profile-variants", dest="profile_variants", type=lambda v: [x for x in v.split(",") if x],
                   default=list(step_profile.PROFILED),
                   help=f"profile these variants' train and sampling steps (default: {','.join(step_profile.PROFILED)})")
    p.add_argument("--worker", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--task", choices=("train", "sample"), help=argparse.SUPPRESS)
    p.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker_main(args)
    for flag, names in (("--variants", args.variants), ("--profile-variants", args.profile_variants)):
        unknown = set(names or ()) - set(VARIANTS)
        if unknown:
            p.error(f"{flag}: unknown {sorted(unknown)}; expected some of {', '.join(VARIANTS)}")
    on_gpu = torch.cuda.is_available()
    if args.budget is None:
        args.budget = 200.0 if args.quick else 330.0
    if args.compile is None:
        args.compile = on_gpu  # on the CPU torch.compile costs minutes; --compile forces it
    return run_report(args, argv)


if __name__ == "__main__":
    sys.exit(main())
