"""Rectified-flow trainer: overfitting, sampling, checkpoints, input errors, the seed's Quick Start."""
import copy
import json
import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from liquiddiff import checkpoint, liquid_diffusion_micro, liquid_diffusion_tiny
from liquiddiff.kernels import runtime
from liquiddiff.training import EMA, RectifiedFlowTrainer, rectified_flow_pair, sample_times

from training_helpers import graph_like_call


def _trainer(**kw):
    torch.manual_seed(0)
    model = liquid_diffusion_micro(channels=(16, 32))
    return RectifiedFlowTrainer(model, lr=kw.pop("lr", 3e-3), device="cpu", **kw)


def _images(n=4, size=16, seed=1):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_overfits_one_fixed_batch():
    trainer, x = _trainer(), _images()
    losses = []
    for _ in range(60):
        torch.manual_seed(1)  # the same noise and t every step: the loss can go to zero
        losses.append(trainer.train_step(x)["loss"])
    assert losses[-1] < losses[0] / 20, losses[::10]


def test_train_step_metrics():
    trainer = _trainer(warmup_steps=4)
    m = trainer.train_step(_images())
    assert set(m) >= {"loss", "grad_norm", "lr", "step"}
    assert m["step"] == 1 and m["lr"] == pytest.approx(3e-3 / 4) and m["grad_norm"] > 0


def test_rectified_flow_path():
    x, noise, t = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4), torch.tensor([0.0, 0.5, 1.0])
    x_t, v = rectified_flow_pair(x, noise, t)
    torch.testing.assert_close(x_t[0], x[0])
    torch.testing.assert_close(x_t[2], noise[2])
    torch.testing.assert_close(x_t[1], (x[1] + noise[1]) / 2)
    torch.testing.assert_close(v, noise - x)


def test_time_sampling():
    for method in ("uniform", "logit_normal"):
        t = sample_times(1000, method, "cpu")
        assert t.shape == (1000,) and (t >= 0).all() and (t <= 1).all()
    assert sample_times(4000, "logit_normal", "cpu").std() < sample_times(4000, "uniform", "cpu").std()
    with pytest.raises(ValueError, match="time_sampling"):
        sample_times(2, "cosine", "cpu")


def test_ema_warmup_and_average():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.999)
    assert ema.current_decay() == pytest.approx(0.1)
    with torch.no_grad():
        model.weight.add_(1.0)
    before = ema.model.weight.clone()
    ema.update(model)
    torch.testing.assert_close(ema.model.weight, before + 0.9)


def test_a_step_without_sync_reads_nothing_back(monkeypatch):
    """train_step(sync=False) gives the step's loss and gradient norm as device tensors, the
    values a synchronised step gives, and calls no .item() of its own (each a wait for the GPU
    there) but the range check's two, which a batch on the host still gets. (The CPU's AdamW
    reads its step counts back; CUDA's fused AdamW does not.)"""
    images = _images()
    trainer = _trainer()
    torch.manual_seed(3)
    expected = trainer.train_step(images)
    trainer = _trainer()
    reads, item = [], torch.Tensor.item

    def read(tensor):
        reads.append(sys._getframe(1).f_code.co_filename)
        return item(tensor)

    monkeypatch.setattr(torch.Tensor, "item", read)
    torch.manual_seed(3)
    got = trainer.train_step(images, sync=False)
    assert [Path(f).name for f in reads if "liquiddiff" in Path(f).parts] == ["training.py"] * 2  # min, max
    assert all(isinstance(got[k], torch.Tensor) and got[k].dim() == 0 for k in ("loss", "grad_norm"))
    assert (float(got["loss"]), float(got["grad_norm"])) == (expected["loss"], expected["grad_norm"])
    with pytest.raises(ValueError, match=r"images: expected values in \[-1, 1\]"):
        trainer.train_step(images * 3, sync=False)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_sample_shape_and_range(sampler):
    trainer = _trainer()
    trainer.train_step(_images())
    out = trainer.sample(3, 8, num_steps=3, sampler=sampler)
    assert out.shape == (3, 3, 8, 8)
    assert out.min() >= -1 and out.max() <= 1 and torch.isfinite(out).all()
    assert out.std() > 0


def test_heun_keeps_its_velocity_when_the_model_overwrites_its_last_output():
    """A model compiled with mode="reduce-overhead" returns its CUDA graph's output buffer, which
    the next call overwrites: Heun, which holds one velocity while asking for the next, must
    give the images it gives with a model that returns fresh tensors (here in fp32, where the
    sampler's cast to fp32 would otherwise return the buffer itself)."""
    trainer = _trainer()
    trainer.train_step(_images())
    expected = trainer.sample(2, 8, num_steps=3, sampler="heun", generator=torch.Generator().manual_seed(1))
    ema = trainer.ema.model
    forward, buffer = ema.forward, torch.empty(2, 3, 8, 8)
    ema.forward = lambda x, t: buffer.copy_(forward(x, t))
    got = trainer.sample(2, 8, num_steps=3, sampler="heun", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_cuda_graph_needs_a_cuda_device():
    with pytest.raises(ValueError, match="cuda_graph: needs a CUDA device"):
        _trainer().sample(2, 8, num_steps=2, cuda_graph=True)


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_cuda_graph_sampling_matches_eager(fused, sampler):
    """Replayed from a CUDA graph, the sampler gives the images of the eager loop (the same
    kernels on the same inputs; Heun keeps one velocity while asking for the next)."""
    torch.manual_seed(0)
    model = liquid_diffusion_micro(channels=(16, 32), fused=fused)
    trainer = RectifiedFlowTrainer(model, device="cuda", channels_last=True)
    trainer.train_step(_images().cuda())
    runs = [trainer.sample(3, 16, num_steps=4, sampler=sampler, generator=torch.Generator("cuda").manual_seed(5),
                           cuda_graph=graph) for graph in (False, True)]
    torch.testing.assert_close(runs[1], runs[0], atol=2e-3, rtol=0)


@pytest.mark.gpu
def test_cuda_graph_sampling_keeps_its_graph(monkeypatch):
    """A second sample() call like the first replays the graph the first captured (the same
    images for the same noise), another batch size captures its own, and after
    release_cuda_graphs the next call captures again."""
    from liquiddiff import sampling

    captures = []
    real = sampling.cuda_graphed
    monkeypatch.setattr(sampling, "cuda_graphed", lambda velocity, z: captures.append(z.shape) or real(velocity, z))
    torch.manual_seed(0)
    trainer = RectifiedFlowTrainer(liquid_diffusion_micro(channels=(16, 32), fused=True), device="cuda",
                                   channels_last=True)
    noise = torch.randn(3, 3, 16, 16)
    runs = [trainer.sample(3, 16, num_steps=3, noise=noise, cuda_graph=True) for _ in range(2)]
    assert len(captures) == 1
    torch.testing.assert_close(runs[1], runs[0], atol=1e-5, rtol=0)
    trainer.sample(2, 16, num_steps=3, cuda_graph=True)
    trainer.release_cuda_graphs()
    trainer.sample(2, 16, num_steps=3, cuda_graph=True)
    assert len(captures) == 3


def test_a_sampling_graph_is_kept_for_the_same_model_path_shape_and_parameters(monkeypatch):
    """The kept sampling graph's key changes with what a replay would get wrong: another model,
    path (fused or not), kernel setting, batch shape or layout, or parameters moved to new
    memory (loaded with assign=True); values updated in place (the EMA's) keep it."""
    from liquiddiff import training

    trainer = _trainer()
    model, z = trainer.ema.model, torch.randn(2, 3, 16, 16)
    key = training._sampling_graph_key(model, z)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert training._sampling_graph_key(model, z) == key
    changed = [training._sampling_graph_key(trainer.model, z),
               training._sampling_graph_key(model, torch.randn(3, 3, 16, 16)),
               training._sampling_graph_key(model, z.contiguous(memory_format=torch.channels_last))]
    with monkeypatch.context() as env:
        env.setenv(runtime.ENV_VAR, "torch" if os.environ.get(runtime.ENV_VAR) != "torch" else "auto")
        changed.append(training._sampling_graph_key(model, z))
    model.set_fused(not model.fused)
    changed.append(training._sampling_graph_key(model, z))
    model.set_fused(not model.fused)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    changed.append(training._sampling_graph_key(model, z))
    assert all(k != key for k in changed)


def test_cuda_graph_training_needs_a_cuda_device():
    with pytest.raises(ValueError, match="cuda_graph: needs a CUDA device"):
        RectifiedFlowTrainer(liquid_diffusion_micro(channels=(16, 32)), device="cpu", cuda_graph=True)


@pytest.mark.gpu
@pytest.mark.parametrize("fused, micro", [(False, None), (True, None), (True, 2)])
def test_cuda_graph_train_steps_match_eager(fused, micro):
    """Train steps whose model call replays CUDA graphs follow the eager steps: the same losses
    and weights after a few steps (same kernels; the optimizer, EMA and the loss stay eager), and
    a batch of another shape runs eager beside them; with micro-batches, two replays a step.
    Graphed, the steps run as the CLI runs them: each queued without waiting (sync=False)."""
    def run(graph):
        torch.manual_seed(0)
        model = liquid_diffusion_micro(channels=(16, 32), fused=fused)
        trainer = RectifiedFlowTrainer(model, device="cuda", channels_last=True, cuda_graph=graph,
                                       micro_batch_size=micro)
        torch.manual_seed(1)
        batches = [_images().cuda() for _ in range(3)] + [_images()[:2].cuda()]  # another shape: eager
        metrics = [trainer.train_step(images, sync=not graph) for images in batches]
        return [float(m["loss"]) for m in metrics], torch.cat([p.detach().flatten() for p in model.parameters()])

    (eager_losses, eager_weights), (graph_losses, graph_weights) = run(False), run(True)
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(graph_weights, eager_weights, rtol=1e-2, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("micro", [1, 2])
def test_gpu_graphed_model_call_in_a_loop_of_ones_own(micro):
    """The README's loop of one's own around graphed_model_call (autocast without its weight
    cache, AdamW): the losses and weights of the same loop eager, one call a step, or two
    micro-batches a step added up in zeroed gradients, as the README says."""
    from liquiddiff.training import graphed_model_call

    def amp():
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)

    def run(graph):
        torch.manual_seed(0)
        model = liquid_diffusion_micro(channels=(16, 32), fused=True).cuda().to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        torch.manual_seed(1)
        steps = [[(_images(2, seed=s).cuda().contiguous(memory_format=torch.channels_last), torch.rand(2, device="cuda"),
                   torch.randn(2, 3, 16, 16, device="cuda")) for s in range(micro)] for _ in range(3)]
        call = model
        if graph:
            with amp():
                call = graphed_model_call(model, *steps[0][0][:2])
        losses = []
        for batches in steps:
            if micro == 1:
                optimizer.zero_grad(set_to_none=True)
            else:
                for p in model.parameters():
                    p.grad = torch.zeros_like(p) if p.grad is None else p.grad.zero_()
            for x_t, t, target in batches:
                with amp():
                    v = call(x_t, t)
                loss = torch.nn.functional.mse_loss(v.float(), target)
                loss.backward()
                losses.append(loss.item())
            optimizer.step()
        return losses, torch.cat([p.detach().flatten() for p in model.parameters()])

    (eager_losses, eager_weights), (graph_losses, graph_weights) = run(False), run(True)
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(graph_weights, eager_weights, rtol=1e-2, atol=1e-4)


def test_euler_sampler_integrates_a_known_field():
    """v = z - x_data is the exact rectified-flow field of a point mass: Euler lands on it."""
    from liquiddiff.sampling import integrate

    target = torch.randn(2, 3)
    z = target + torch.randn(2, 3)
    # dz/dt = (z - target) / t along the straight line; Euler is exact on it.
    out = integrate(lambda z_t, t: (z_t - target) / t[:, None], z, num_steps=7)
    torch.testing.assert_close(out, target)


@pytest.mark.parametrize("precision", [False, "fp16"])
def test_checkpoint_round_trip_reproduces_next_step(tmp_path, precision):
    """fp16 too: its loss scale (grown over the steps) comes back with the checkpoint."""
    a = _trainer(mixed_precision=precision)
    for _ in range(3):
        a.train_step(_images())
    if precision:
        a.scaler.update(a.scaler.get_scale() * 2)  # a scale no fresh trainer has
    path = a.save_checkpoint(tmp_path / "ckpt.safetensors")
    expected = a.train_step(_images())
    b = _trainer(mixed_precision=precision)
    b.load_checkpoint(path)
    got = b.train_step(_images())
    assert got == expected
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), n
    for p, q in zip(a.ema.model.parameters(), b.ema.model.parameters()):
        assert torch.equal(p, q)


def test_resume_restores_the_moments_layout_and_keeps_this_devices_optimizer(tmp_path, monkeypatch):
    """On a GPU AdamW is fused: it walks a weight and its moments as flat memory. The checkpoint
    stores them contiguous, so channels_last weights must get channels_last moments back; and a
    trainer on another device keeps its own AdamW implementation, not the saving run's."""
    adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *args, **kw: adamw(*args, **{**kw, "fused": True}))  # as on a GPU
    a = _trainer(channels_last=True)
    for _ in range(2):
        a.train_step(_images())
    path = a.save_checkpoint(tmp_path / "ckpt.safetensors")
    expected = a.train_step(_images())
    b = _trainer(channels_last=True)
    b.load_checkpoint(path)
    for p in b.model.parameters():
        assert all(v.stride() == p.stride() for v in b.optimizer.state[p].values() if v.shape == p.shape)
    assert b.train_step(_images()) == expected
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), n
    monkeypatch.setattr(torch.optim, "AdamW", adamw)
    cpu = _trainer(channels_last=True)
    cpu.load_checkpoint(path)
    assert not any(group["fused"] for group in cpu.optimizer.param_groups)


def test_a_cpu_checkpoint_gives_a_fused_adamw_its_step_counts_on_the_parameters_device():
    """Fused AdamW (a GPU trainer's) needs its step counts on the parameters' device; a CPU run's
    checkpoint has them on the CPU. The meta device stands in for the GPU."""
    p = torch.nn.Parameter(torch.randn(4, 3))
    cpu_run = torch.optim.AdamW([p])
    p.grad = torch.randn(4, 3)
    cpu_run.step()
    q = torch.nn.Parameter(torch.randn(4, 3, device="meta"))
    gpu_like = torch.optim.AdamW([q])
    gpu_like.param_groups[0]["fused"] = True  # what RectifiedFlowTrainer builds on CUDA
    RectifiedFlowTrainer._load_optimizer(SimpleNamespace(optimizer=gpu_like), cpu_run.state_dict())
    state = gpu_like.state[q]
    assert gpu_like.param_groups[0]["fused"] and state["step"].device == q.device == state["exp_avg"].device


def test_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    trainer = _trainer()
    path = trainer.save_checkpoint(tmp_path / "ckpt.safetensors")
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "serialize", crash)
    trainer.train_step(_images())
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]


def test_a_write_that_fails_midway_leaves_the_old_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    """The bytes go to a temporary file beside the target, renamed over it once whole: a write that
    fails half-way (a full disk) leaves the old checkpoint as it was, and removes its temporary file.
    (Above, serialising fails before any file is opened.)"""
    trainer = _trainer()
    path = trainer.save_checkpoint(tmp_path / "ckpt.safetensors")
    before = path.read_bytes()
    write_bytes = Path.write_bytes

    def half_then_disk_full(self, data):
        write_bytes(self, data[: len(data) // 2])
        raise OSError("No space left on device")

    trainer.train_step(_images())
    monkeypatch.setattr(Path, "write_bytes", half_then_disk_full)
    with pytest.raises(OSError, match="No space left"):
        trainer.save_checkpoint(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]


def test_a_run_killed_while_saving_leaves_only_what_the_cli_clears(tmp_path):
    """SIGKILL at some moment of back-to-back saves: the folder holds the checkpoint and at most
    a ``.*.tmp`` file (``files.written_atomically``'s, which a resume removes), never one of
    another name (safetensors' save_file used to leave its own ``.tmpXXXXXX``)."""
    script = textwrap.dedent(f"""
        import torch
        from liquiddiff import checkpoint
        state = {{"w": [torch.randn(4 << 20) for _ in range(8)]}}  # 128 MB
        checkpoint.save(state, {str(tmp_path / "ckpt.safetensors")!r})
        print("saved", flush=True)
        while True:
            checkpoint.save(state, {str(tmp_path / "ckpt.safetensors")!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    try:
        assert proc.stdout.readline().strip() == "saved"
        for _ in range(20):  # kill it mid-write: when a temporary file exists
            if len(list(tmp_path.iterdir())) > 1:
                break
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert "ckpt.safetensors" in left
    assert all(name == "ckpt.safetensors" or (name.startswith(".ckpt.safetensors.") and name.endswith(".tmp"))
               for name in left), left


def test_checkpoint_gets_the_permissions_of_any_new_file(tmp_path):
    """Readable by whoever may read the run's other files (the umask decides), not 0600."""
    old = os.umask(0o022)
    try:
        path = _trainer().save_checkpoint(tmp_path / "ckpt.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_checkpoint_file_round_trips_nested_state_and_refuses_other_formats(tmp_path):
    """checkpoint.save/load: nested dicts (int keys stay ints), lists, tensors of any dtype and JSON
    values come back as saved; a safetensors file without liquiddiff's metadata, or of another
    format version, is refused with a message that says which."""
    from safetensors.torch import save_file

    state = {"step": 3, "optimizer": {0: {"m": torch.arange(3.0)}, 1: {"m": torch.ones(2)}},
             "rng_ranks": [{"cpu": torch.tensor([1, 2], dtype=torch.uint8)}],
             "run": {"name": "r", "channels": [8, 16], "flip": None, "lr": 0.01}}
    back = checkpoint.load(checkpoint.save(state, tmp_path / "a.safetensors"))
    assert back["step"] == 3 and back["run"] == state["run"] and list(back["optimizer"]) == [0, 1]
    assert torch.equal(back["optimizer"][1]["m"], torch.ones(2))
    assert torch.equal(back["rng_ranks"][0]["cpu"], state["rng_ranks"][0]["cpu"])
    save_file({"w": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="was not written by liquiddiff"):
        checkpoint.load(tmp_path / "foreign.safetensors")
    save_file({"w": torch.zeros(1)}, str(tmp_path / "future.safetensors"),
              metadata={"liquiddiff": json.dumps({"format": 2, "tree": {}})})
    with pytest.raises(ValueError, match="has format 2, expected 1"):
        checkpoint.load(tmp_path / "future.safetensors")


def test_checkpoint_from_another_preset_is_refused(tmp_path):
    path = _trainer().save_checkpoint(tmp_path / "micro.safetensors")
    other = RectifiedFlowTrainer(liquid_diffusion_micro(channels=(8, 16)), device="cpu")
    with pytest.raises(ValueError, match=r"checkpoint holds another model than this one: channels: checkpoint "
                                         r"\[16, 32\] vs model \[8, 16\] \(both from preset 'micro'\)"):
        other.load_checkpoint(path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable"):
        other.load_checkpoint(tmp_path / "junk.safetensors")


@pytest.mark.parametrize(
    "images, error, message",
    [
        (torch.rand(3, 16, 16), ValueError, "expected images"),
        (torch.rand(2, 1, 16, 16), ValueError, "expected 3 channels"),
        (torch.rand(2, 3, 15, 16), ValueError, "multiple of 2"),
        (torch.rand(2, 3, 16, 16) * 255, ValueError, r"values in \[-1, 1\]"),
        (torch.randint(0, 255, (2, 3, 16, 16)), TypeError, "floating-point"),
    ],
)
def test_bad_images_are_refused_before_work(images, error, message):
    trainer = _trainer()
    with pytest.raises(error, match=message):
        trainer.train_step(images)
    assert trainer.step == 0


def test_trainer_argument_errors():
    model = liquid_diffusion_micro()
    with pytest.raises(ValueError, match="lr"):
        RectifiedFlowTrainer(model, lr=0)
    with pytest.raises(ValueError, match="time_sampling"):
        RectifiedFlowTrainer(model, time_sampling="sigmoid")
    with pytest.raises(ValueError, match="sampler"):
        RectifiedFlowTrainer(model).sample(1, 8, 2, sampler="rk4")


def test_seed_quick_start_runs_as_written():
    """The seed README's Quick Start, with liquiddiff for liquid_diffusion, at a CPU-sized image."""
    from liquiddiff import RectifiedFlowTrainer as Trainer
    from liquiddiff import liquid_diffusion_tiny as tiny

    assert tiny is liquid_diffusion_tiny and Trainer is RectifiedFlowTrainer
    model = tiny(channels=(8, 16, 32), blocks=(1, 1, 1), bottleneck_blocks=1)
    trainer = Trainer(model, lr=1e-4, device="cpu")
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    metrics = trainer.train_step(images)
    print(f"Loss: {metrics['loss']:.4f}")
    samples = trainer.sample(batch_size=4, image_size=16, num_steps=2)
    assert samples.shape == (4, 3, 16, 16)


def test_a_checkpoint_loads_as_a_model_for_inference(tmp_path):
    """LiquidDiffusion.from_checkpoint: the EMA weights (or the raw ones) in eval mode; a file
    without a config, or with weights of another size, is refused with a message."""
    from liquiddiff import LiquidDiffusion

    trainer = _trainer()
    for _ in range(2):
        trainer.train_step(_images())
    path = trainer.save_checkpoint(tmp_path / "ckpt.safetensors")
    x, t = _images(2, 8), torch.rand(2)
    for ema, source in ((True, trainer.ema.model), (False, trainer.model)):
        model = LiquidDiffusion.from_checkpoint(path, ema=ema, fused=True)
        assert not model.training and model.fused and model.config == trainer.config
        with torch.no_grad():
            torch.testing.assert_close(model(x, t), source.eval()(x, t))
    state = checkpoint.load(path)
    checkpoint.save({k: v for k, v in state.items() if k != "config"}, tmp_path / "no_config.safetensors")
    with pytest.raises(ValueError, match="has no model config"):
        LiquidDiffusion.from_checkpoint(tmp_path / "no_config.safetensors")
    checkpoint.save({**state, "config": {**state["config"], "channels": [8, 16]}}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="weights do not match its model config"):
        LiquidDiffusion.from_checkpoint(tmp_path / "other.safetensors")


def test_the_seeds_euler_loop_as_written_is_the_euler_sampler():
    """The seed's loop (``t = i / N``, ``z = z - model(z, t) / N``) from the same noise gives
    ``sample(..., sampler="euler")``'s images, before the final clamp to [-1, 1]."""
    trainer = _trainer()
    trainer.train_step(_images())
    model, N = trainer.model.eval(), 3
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))  # start from noise
    with torch.no_grad():
        for i in range(N, 0, -1):
            t = i / N
            z = z - model(z, t) / N  # Euler step
    ours = trainer.sample(2, 8, num_steps=N, use_ema=False, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(ours, z.clamp(-1, 1))


def test_sampling_from_given_noise():
    trainer = _trainer()
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    drawn = trainer.sample(2, 8, num_steps=2, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(trainer.sample(2, 8, num_steps=2, noise=noise), drawn)
    with pytest.raises(ValueError, match=r"noise: expected a float tensor of shape \[2, 3, 8, 8\]"):
        trainer.sample(2, 8, num_steps=2, noise=noise[:1])


def test_sampling_follows_set_fused_made_after_the_trainer():
    trainer = _trainer()
    trainer.model.set_fused(True)
    assert trainer.sample(1, 8, num_steps=1).shape == (1, 3, 8, 8)
    assert trainer.ema.model.fused  # the EMA copy samples on the fused kernels too


@pytest.mark.gpu
def test_gpu_sampling_from_a_cpu_generator_gives_the_cpu_images():
    """A CPU generator's noise is drawn on the CPU and moved: a seed gives the same images on
    either device (the model's arithmetic aside)."""
    cpu = _trainer()
    gpu = RectifiedFlowTrainer(copy.deepcopy(cpu.model), device="cuda", mixed_precision=False)
    images = [trainer.sample(3, 16, num_steps=2, generator=torch.Generator().manual_seed(5)) for trainer in (cpu, gpu)]
    torch.testing.assert_close(images[1].cpu(), images[0], rtol=0, atol=1e-4)


def test_channels_last_trains_the_same_function():
    images = _images()
    plain, nhwc = _trainer(), _trainer(channels_last=True)
    assert nhwc.model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        t = torch.rand(4)
        torch.testing.assert_close(nhwc.model(images, t), plain.model(images, t), rtol=1e-5, atol=1e-6)
    torch.manual_seed(3)
    a = plain.train_step(images)
    torch.manual_seed(3)
    b = nhwc.train_step(images)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert nhwc.sample(2, 8, num_steps=2).shape == (2, 3, 8, 8)


def test_trainer_keeps_the_callers_layout_by_default():
    model = liquid_diffusion_micro(channels=(16, 32)).to(memory_format=torch.channels_last)
    trainer = RectifiedFlowTrainer(model, device="cpu")
    assert trainer.model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    trainer = RectifiedFlowTrainer(model, device="cpu", channels_last=False)
    assert trainer.model.stem[0].weight.is_contiguous()


def test_compile_passes_its_options_and_an_empty_dict_still_compiles(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **options: calls.append(options))
    assert _trainer(compile={}).compiled and calls == [{}, {}]  # the model and its EMA copy
    assert not _trainer(compile=False).compiled and not _trainer(compile=None).compiled and len(calls) == 2
    _trainer(compile={"mode": "max-autotune"})
    assert calls[2:] == [{"mode": "max-autotune"}] * 2


def test_compile_cannot_be_combined_with_cuda_graphs():
    with pytest.raises(ValueError, match="compile: not with cuda_graph=True"):
        RectifiedFlowTrainer(liquid_diffusion_micro(channels=(16, 32)), device="cpu", compile=True, cuda_graph=True)


@pytest.mark.slow
def test_compiled_trainer_trains_and_samples_as_the_eager_one():
    """compile= runs train steps and sampling through torch.compile (here its autograd tracing
    without inductor's code generation, which takes minutes on a CPU): the eager trainer's
    losses and samples, the same state_dict keys, and graphs that dynamo did compile."""
    from torch._dynamo.utils import counters

    def run(compile):
        torch.manual_seed(0)
        model = liquid_diffusion_micro(channels=(8, 12), blocks=(1, 1), bottleneck_blocks=1, fused=True)
        trainer = RectifiedFlowTrainer(model, lr=3e-3, device="cpu", compile=compile)
        losses = []
        for _ in range(2):
            torch.manual_seed(3)
            losses.append(trainer.train_step(_images(2, 8))["loss"])
        images = trainer.sample(2, 8, num_steps=2, generator=torch.Generator().manual_seed(0))
        return trainer, losses, images

    eager, eager_losses, eager_images = run(False)
    graphs = counters["stats"]["unique_graphs"]
    compiled, losses, images = run({"backend": "aot_eager"})
    assert counters["stats"]["unique_graphs"] - graphs >= 2  # the train step's and the sampler's
    assert losses == pytest.approx(eager_losses, rel=1e-5)
    torch.testing.assert_close(images, eager_images)
    for key in ("model", "ema"):
        assert list(compiled.state_dict()[key]) == list(eager.state_dict()[key])


# Run by torchrun: two ranks train the fused model eagerly and then compiled, under DDP over gloo.
_DDP_COMPILE_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    import torch.distributed as dist
    from torch._dynamo.utils import counters
    from liquiddiff import RectifiedFlowTrainer, distributed, liquid_diffusion_micro
    from training_helpers import three_steps

    info = distributed.from_env()
    distributed.init(info, torch.device("cpu"))

    def run(compile):
        torch.manual_seed(0)
        model = liquid_diffusion_micro(channels=(8, 12), blocks=(1, 1), bottleneck_blocks=1, fused=True)
        trainer = RectifiedFlowTrainer(model, lr=3e-3, device="cpu", distributed=True, compile=compile)
        return three_steps(trainer, info.rank)

    eager_losses, eager_grads, _ = run(False)
    losses, grads, params = run({"backend": "aot_eager"})
    other = torch.empty_like(params)
    dist.broadcast(other.copy_(params), src=0)
    result = {"eager": eager_losses, "compiled": losses, "graphs": counters["stats"]["unique_graphs"],
              "grad_diff": ((grads - eager_grads).norm() / eager_grads.norm()).item(),
              "rank_diff": (params - other).abs().max().item()}
    with open(sys.argv[1] + f".{info.rank}", "w") as f:
        json.dump(result, f)
    distributed.cleanup()
""")


@pytest.mark.slow
def test_ddp_with_compile_trains_as_eager_ddp(tmp_path):
    """compile= under torchrun compiles the DDP wrapper (dynamo's DDP optimizer, gradient hooks
    around the fused custom ops): every rank's losses and first averaged gradient are eager
    DDP's, and the ranks stay in step. Over gloo on the CPU; NCCL is for the GPU report.
    (Weights are not compared with eager's: AdamW's first steps move a weight by about lr
    whatever its gradient's size, and some have a gradient of zero but for rounding, such as a
    bias just before a GroupNorm: torch 2.8's compiled rounding moved one by 1e-3 that way.)"""
    script = tmp_path / "ddp_compile.py"
    script.write_text(_DDP_COMPILE_SCRIPT)
    _torchrun(script, tmp_path / "result")
    for rank in (0, 1):
        result = json.loads((tmp_path / f"result.{rank}").read_text())
        assert result["graphs"] > 0  # dynamo compiled, not fell back to eager
        assert result["compiled"] == pytest.approx(result["eager"], rel=1e-5)
        assert result["grad_diff"] < 1e-5 and result["rank_diff"] == 0.0


# Run by torchrun: the gradient all-reduce and weight broadcast of CUDA-graph training under
# torchrun, then the trainer itself with graphs stood in for, against DDP, over gloo.
_GRAPHED_DDP_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    import torch.distributed as dist
    from liquiddiff import RectifiedFlowTrainer, distributed, liquid_diffusion_micro, training
    from training_helpers import graph_like_call, three_steps

    info = distributed.from_env()
    distributed.init(info, torch.device("cpu"))
    world, result = dist.get_world_size(), {}

    def tensors(rank):  # each rank's own values; channels_last, transposed, fp64 and a 0-dim one
        g = torch.Generator().manual_seed(10 + rank)
        return [torch.randn(2, 3, 4, 5, generator=g).contiguous(memory_format=torch.channels_last),
                torch.randn(7, generator=g), torch.randn(4, 3, generator=g).t(),
                torch.randn(4, 4, generator=g, dtype=torch.float64), torch.randn((), generator=g)]

    params = [torch.nn.Parameter(torch.zeros_like(t)) for t in tensors(0)] + [torch.nn.Parameter(torch.zeros(3))]
    for p, g in zip(params, tensors(info.rank)):
        p.grad = g  # the last parameter keeps no gradient
    strides = [p.grad.stride() for p in params[:-1]]
    distributed.average_gradients(params)
    want = [torch.stack(column).mean(0) for column in zip(*(tensors(r) for r in range(world)))]
    result["average_error"] = max((p.grad - w).abs().max().item() for p, w in zip(params, want))
    result["strides_kept"] = [p.grad.stride() for p in params[:-1]] == strides
    result["no_grad_kept"] = params[-1].grad is None
    mine = tensors(info.rank)
    distributed.broadcast_from_rank0(mine)
    result["broadcast_error"] = max((a - b).abs().max().item() for a, b in zip(mine, tensors(0)))

    def run(graph, micro=None):
        torch.manual_seed(0)
        model = liquid_diffusion_micro(channels=(8, 12), blocks=(1, 1), bottleneck_blocks=1)
        with torch.no_grad():  # rank 1 starts elsewhere: the trainer must copy rank 0's weights
            for p in model.parameters():
                p.add_(info.rank)
        trainer = RectifiedFlowTrainer(model, lr=3e-3, device="cpu", distributed=True, cuda_graph=graph,
                                       micro_batch_size=micro)
        losses, first_grads, params = three_steps(trainer, info.rank)
        other = torch.empty_like(params)
        dist.broadcast(other.copy_(params), src=0)
        return {"losses": losses, "grads": first_grads, "rank_diff": (params - other).abs().max().item(),
                "ddp": trainer._ddp is not None}

    ddp = run(False)
    training.check_graph_device = lambda device: None  # the CPU has no graphs: the stand-in replays
    training.graphed_model_call = graph_like_call
    for name, micro in (("graphed", None), ("graphed_micro", 1)):
        got = run(True, micro)
        result[name] = {"losses": got["losses"], "ddp": got["ddp"], "rank_diff": got["rank_diff"],
                        "grad_diff": ((got["grads"] - ddp["grads"]).norm() / ddp["grads"].norm()).item()}
    result["ddp_losses"] = ddp["losses"]
    with open(sys.argv[1] + f".{info.rank}", "w") as f:
        json.dump(result, f)
    distributed.cleanup()
""")


def _torchrun(script: Path, out: Path, timeout: float = 600) -> None:
    """``script`` run by torchrun as two ranks, with this checkout and tests/ importable; it is given
    ``out``, the stem of the files its ranks write."""
    here = Path(__file__).resolve()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(here.parents[1]), str(here.parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), str(out)], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_graphed_training_under_torchrun_averages_as_ddp(tmp_path):
    """cuda_graph=True under torchrun: no DDP wrapper (a replayed backward runs no host code until
    it ends); rank 0's weights copied to every rank at the start, and after each backward every
    gradient replaced by its mean over the ranks, in place, in its own layout (the graph's static
    buffers, which the next replay refills), by one all-reduce a dtype. Each rank's losses and
    first averaged gradient are eager DDP's, whole batch or micro-batches, and the ranks stay in
    step. Over gloo, with the CPU stand-in for the graphs."""
    script = tmp_path / "graphed_ddp.py"
    script.write_text(_GRAPHED_DDP_SCRIPT)
    _torchrun(script, tmp_path / "result")
    for rank in (0, 1):
        result = json.loads((tmp_path / f"result.{rank}").read_text())
        assert result["average_error"] < 1e-6 and result["broadcast_error"] == 0.0
        assert result["strides_kept"] and result["no_grad_kept"]
        for name in ("graphed", "graphed_micro"):
            got = result[name]
            assert not got["ddp"]
            assert got["losses"] == pytest.approx(result["ddp_losses"], rel=1e-5)
            assert got["grad_diff"] < 1e-5 and got["rank_diff"] == 0.0


# Run by torchrun on one GPU: two ranks share it over gloo (NCCL wants a GPU a rank), and train
# the fused model with DDP, then with CUDA graphs and the trainer's own all-reduce.
_GPU_GRAPHED_DDP_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    import torch.distributed as dist
    from liquiddiff import RectifiedFlowTrainer, liquid_diffusion_micro
    from training_helpers import three_steps

    dist.init_process_group("gloo")
    torch.cuda.set_device(0)
    rank = dist.get_rank()

    def run(graph):
        torch.manual_seed(0)
        model = liquid_diffusion_micro(channels=(16, 32), fused=True)
        trainer = RectifiedFlowTrainer(model, device="cuda", channels_last=True, distributed=True, cuda_graph=graph)
        losses, _, params = three_steps(trainer, rank, batch=4, size=16)
        other = params.clone()
        dist.broadcast(other, src=0)
        return {"losses": losses, "params": params.tolist(), "rank_diff": (params - other).abs().max().item()}

    result = {"ddp": run(False), "graphed": run(True)}
    with open(sys.argv[1] + f".{rank}", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
""")


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_graphed_training_under_torchrun_follows_ddp(tmp_path):
    """CUDA-graph training under torchrun on a real GPU (two ranks on one, over gloo): captured
    graphs, the all-reduce after each replayed backward; each rank's losses and weights after a
    few steps are eager DDP's (same kernels), and the ranks stay in step."""
    script = tmp_path / "gpu_graphed_ddp.py"
    script.write_text(_GPU_GRAPHED_DDP_SCRIPT)
    _torchrun(script, tmp_path / "result", timeout=180)  # a hang fails here, within gpu_check's stage
    for rank in (0, 1):
        result = json.loads((tmp_path / f"result.{rank}").read_text())
        ddp, graphed = result["ddp"], result["graphed"]
        torch.testing.assert_close(torch.tensor(graphed["losses"]), torch.tensor(ddp["losses"]), rtol=1e-2, atol=1e-4)
        torch.testing.assert_close(torch.tensor(graphed["params"]), torch.tensor(ddp["params"]), rtol=1e-2, atol=1e-4)
        assert ddp["rank_diff"] == 0.0 and graphed["rank_diff"] == 0.0


@pytest.mark.parametrize("micro", [1, 3])
def test_micro_batches_take_the_whole_batch_step(micro):
    """Gradient accumulation over micro-batches of 1 or 3 images (3 + 1 of a batch of 4): the
    whole batch's loss and gradient (the same draws of noise and t), and that loss is
    trainer.loss() of the batch."""
    images = _images()

    def step(trainer):
        torch.manual_seed(5)
        m = trainer.train_step(images)
        return m, torch.cat([p.grad.flatten() for p in trainer.model.parameters()])

    whole, whole_grad = step(_trainer())
    split, split_grad = step(_trainer(micro_batch_size=micro))
    assert split["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    assert split["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-5)
    assert (split_grad - whole_grad).norm() <= 1e-5 * whole_grad.norm()
    trainer = _trainer()
    torch.manual_seed(5)
    with torch.no_grad():
        assert trainer.loss(images).item() == pytest.approx(whole["loss"], rel=1e-6)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "4"])
def test_micro_batch_size_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match="micro_batch_size: expected a positive integer"):
        _trainer(micro_batch_size=bad)


def test_autocast_dtype_follows_the_gpu(monkeypatch):
    from liquiddiff.training import autocast_dtype

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert autocast_dtype(cpu, None) is None and autocast_dtype(cpu, False) is None
    assert autocast_dtype(cpu, True) is torch.bfloat16 and autocast_dtype(cpu, "fp16") is torch.float16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4
    assert autocast_dtype(cuda, None) is torch.float16 and autocast_dtype(cuda, "bf16") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100
    assert autocast_dtype(cuda, None) is torch.bfloat16 and autocast_dtype(cuda, False) is None
    with pytest.raises(ValueError, match="mixed_precision: expected None, True, False, 'bf16' or 'fp16'"):
        autocast_dtype(cpu, "fp8")


def test_fp16_scales_the_loss_and_skips_a_step_that_overflows():
    """fp16 autocast trains through a GradScaler: finite steps with the loss scaled; a scale so
    large that the fp16 gradients overflow skips the optimizer step (the weights stay) and is
    lowered for the next one."""
    trainer = _trainer(mixed_precision="fp16")
    assert trainer.autocast_dtype is torch.float16 and trainer.scaler.is_enabled()
    m = trainer.train_step(_images())
    assert torch.isfinite(torch.tensor([m["loss"], m["grad_norm"]])).all()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.scaler.update(3e38)
    trainer.train_step(_images())
    assert all(torch.equal(p, q) for p, q in zip(trainer.model.parameters(), before))
    assert trainer.scaler.get_scale() < 3e38
    assert not _trainer(mixed_precision="bf16").scaler.is_enabled()


@pytest.mark.gpu
@pytest.mark.parametrize("graph", [False, True])
def test_gpu_fp16_training_with_loss_scaling(graph):
    """fp16 autocast (a T4's precision) on the GPU: the fused model trains through the
    GradScaler (finite losses falling on a fixed batch; the first steps may overflow and be
    skipped), eager or replaying CUDA graphs."""
    torch.manual_seed(0)
    model = liquid_diffusion_micro(channels=(32, 64), fused=True)  # test_model's fp16 kernels: compiled once
    trainer = RectifiedFlowTrainer(model, lr=3e-3, device="cuda", channels_last=True, mixed_precision="fp16",
                                   cuda_graph=graph)
    images, losses = _images().cuda(), []
    for _ in range(20):
        torch.manual_seed(1)
        losses.append(trainer.train_step(images)["loss"])
    assert torch.isfinite(torch.tensor(losses)).all() and losses[-1] < losses[0], losses
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() >= 1


def test_graphed_micro_batches_add_up_instead_of_overwriting(monkeypatch):
    """With CUDA graphs, the backward's static gradient buffers must not become the parameters'
    .grad: the next micro-batch's replay would overwrite the first one's gradient. Two
    micro-batches of the captured shape give the whole batch's gradient, as eager does."""
    from liquiddiff import training

    monkeypatch.setattr(training, "graphed_model_call", graph_like_call)
    images = _images()

    def grads(trainer):
        torch.manual_seed(5)
        trainer.train_step(images)
        return torch.cat([p.grad.flatten() for p in trainer.model.parameters()])

    whole = grads(_trainer())
    graphed = _trainer(micro_batch_size=2)
    graphed.cuda_graph = True  # the CPU has no graphs: the stand-in above replays
    for _ in range(2):  # the second step reuses the gradients the first one made
        got = grads(graphed)
        graphed.model.load_state_dict(_trainer().model.state_dict())
    assert (got - whole).norm() <= 1e-5 * whole.norm()


def test_a_graphed_step_of_one_micro_batch_keeps_the_replays_gradients(monkeypatch):
    """With one micro-batch a step, the graphed backward's static gradient buffers become the
    parameters' .grad as they are (no add or copy per parameter), and every step's gradients
    are its own batch's, as eager's: the next step's replay refills the same buffers."""
    from liquiddiff import training

    made = []
    monkeypatch.setattr(training, "graphed_model_call", lambda *a: made.append(graph_like_call(*a)) or made[-1])

    def grads(trainer, seed):
        torch.manual_seed(seed)
        trainer.train_step(_images(seed=seed))
        return torch.cat([p.grad.flatten() for p in trainer.model.parameters()])

    eager, graphed = _trainer(), _trainer()
    graphed.cuda_graph = True  # the CPU has no graphs: the stand-in replays
    for seed in (5, 6):
        want, got = grads(eager, seed), grads(graphed, seed)
        assert (got - want).norm() <= 1e-5 * want.norm()
    assert len(made) == 1
    for p, buffer in zip(graphed.model.parameters(), made[0].buffers):
        assert p.grad.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()


def test_loss_is_the_seeds_mse_on_the_straight_line():
    """The loss of a batch is the seed's ``||model(x_t, t) - (noise - x)||^2``, averaged, with
    x_t = (1 - t) x + t noise and the model asked at that same t (not 1 - t): from what the model
    was called with, noise = (x_t - (1 - t) x) / t and the target (x_t - x) / t; that noise is a
    standard normal draw, t lies in [0, 1]."""
    trainer, images = _trainer(), _images(4, 16)
    for p in trainer.model.parameters():  # nonzero velocities: a zero-initialised last layer would hide t
        torch.nn.init.normal_(p, std=0.1)
    calls = []
    trainer.model.register_forward_hook(lambda module, args, out: calls.append((*args, out)))
    loss = trainer.loss(images, torch.Generator().manual_seed(3)).item()
    (x_t, t, v), = calls
    assert t.shape == (4,) and (t > 0).all() and (t < 1).all()
    t4 = t.view(-1, 1, 1, 1)
    noise = (x_t - (1 - t4) * images) / t4
    assert abs(noise.mean().item()) < 0.1 and abs(noise.std().item() - 1) < 0.1
    expected = (v - (x_t - images) / t4).square().mean().item()
    assert loss == pytest.approx(expected, rel=1e-4)


def test_time_draws_follow_their_distribution_and_generator():
    """logit-normal (SD3): logit(t) is a standard normal, where uniform t's logit has std
    pi / sqrt(3); either is drawn from the generator given (the same seed, the same times)."""
    logit = lambda t: torch.log(t) - torch.log1p(-t)  # noqa: E731
    z = logit(sample_times(8000, "logit_normal", "cpu"))
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05
    u = logit(sample_times(8000, "uniform", "cpu"))
    assert abs(u.std().item() - torch.pi / 3 ** 0.5) < 0.1
    for method in ("uniform", "logit_normal"):
        a, b = (sample_times(5, method, "cpu", torch.Generator().manual_seed(9)) for _ in range(2))
        assert torch.equal(a, b) and not torch.equal(a, sample_times(5, method, "cpu", torch.Generator().manual_seed(8)))


def test_ema_decay_warms_up_over_the_updates_then_holds():
    """Over many updates the EMA follows decay_k = min(decay, (1 + k) / (10 + k)) for the k-th
    update, worked out here step by step on random weights, and counts its updates."""
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.5)  # (1 + k) / (10 + k) passes 0.5 at k = 8: both regimes below
    expected = model.weight.detach().clone()
    for k in range(14):
        with torch.no_grad():
            model.weight.copy_(torch.randn(2, 3))
        d = min(0.5, (1 + k) / (10 + k))
        assert ema.current_decay() == pytest.approx(d)
        ema.update(model)
        expected = d * expected + (1 - d) * model.weight.detach()
        torch.testing.assert_close(ema.model.weight, expected)
    assert ema.updates == 14


def test_ema_averages_the_weights_the_optimizer_step_made():
    """The EMA is updated after the optimizer step: after the first step (decay 0.1) it holds
    0.1 * the initial weights + 0.9 * the stepped ones."""
    trainer = _trainer()
    initial = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train_step(_images())
    for p0, p, e in zip(initial, trainer.model.parameters(), trainer.ema.model.parameters()):
        torch.testing.assert_close(e, 0.1 * p0 + 0.9 * p.detach())
    assert any(not torch.equal(p0, p) for p0, p in zip(initial, trainer.model.parameters()))


def test_lr_warms_up_linearly_then_holds_and_reaches_the_optimizer():
    """warmup_steps=3: steps 1..3 at lr/3, 2lr/3, lr, then lr; the optimizer runs at the lr the
    step reports."""
    trainer = _trainer(warmup_steps=3)
    lrs = []
    for _ in range(5):
        m = trainer.train_step(_images(2, 8))
        lrs.append(m["lr"])
        assert all(group["lr"] == m["lr"] for group in trainer.optimizer.param_groups)
    assert lrs == pytest.approx([1e-3, 2e-3, 3e-3, 3e-3, 3e-3])


def test_gradients_are_clipped_to_grad_clip_and_the_norm_before_is_reported():
    """The step's gradient is clipped to norm ``grad_clip`` before the optimizer reads it (the
    gradients stay in ``.grad`` until the next step); the reported grad_norm is the norm before
    clipping. Without clipping the gradient keeps that norm."""
    def grads_after_step(**kw):
        trainer = _trainer(**kw)
        torch.manual_seed(2)
        m = trainer.train_step(_images(2, 8))
        return m["grad_norm"], torch.cat([p.grad.flatten() for p in trainer.model.parameters()]).norm().item()

    norm, kept = grads_after_step(grad_clip=None)
    assert kept == pytest.approx(norm, rel=1e-5)
    clip = norm / 10
    reported, clipped = grads_after_step(grad_clip=clip)
    assert reported == pytest.approx(norm, rel=1e-5)
    assert clipped == pytest.approx(clip, rel=1e-4)


def test_fp16_clips_and_reports_the_unscaled_gradient():
    """fp16 scales the loss by 2^16: the gradient is unscaled before clipping and before its
    norm is reported, so the fp16 step reports about the fp32 step's norm and clips the true
    gradient."""
    def step(precision):
        trainer = _trainer(mixed_precision=precision, grad_clip=1e-3)
        torch.manual_seed(2)
        m = trainer.train_step(_images(2, 8))
        return m["grad_norm"], torch.cat([p.grad.flatten().float() for p in trainer.model.parameters()]).norm().item()

    (fp32_norm, _), (fp16_norm, fp16_clipped) = step(False), step("fp16")
    assert fp16_norm == pytest.approx(fp32_norm, rel=0.05)
    assert fp16_clipped == pytest.approx(1e-3, rel=1e-3)


def test_under_ddp_only_the_last_micro_batch_synchronises():
    """With micro-batches under DDP, every micro-batch but the last runs inside ``no_sync`` (the
    all-reduce happens once, in the last backward): a stand-in for the DDP wrapper records where
    each forward ran, for a batch that splits evenly and one whose last part is partial."""
    import contextlib

    class FakeDDP(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module, self.syncing, self.calls = module, True, []

        @contextlib.contextmanager
        def no_sync(self):
            self.syncing = False
            try:
                yield
            finally:
                self.syncing = True

        def forward(self, x, t):
            self.calls.append((x.shape[0], self.syncing))
            return self.module(x, t)

    for micro, expected in ((2, [(2, False), (2, True)]), (3, [(3, False), (1, True)]), (4, [(4, True)])):
        trainer = _trainer(micro_batch_size=micro)
        trainer._ddp = FakeDDP(trainer.model)
        trainer.train_step(_images(4, 8))
        assert trainer._ddp.calls == expected, micro
