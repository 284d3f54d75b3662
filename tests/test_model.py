"""The U-Net: presets, shapes, input errors, the fused switch and torch.compile."""
import collections
import contextlib
import copy

import numpy as np
import pytest
import torch

from liquiddiff import functional, kernels
from liquiddiff.kernels import _tensors
from liquiddiff.model import PRESETS, LiquidDiffusion, build, liquid_diffusion_tiny
from tests import parity, strict_interpreter
from tests.parity import rel_err


def _randomise(model: torch.nn.Module, seed: int = 0, fan_in_scaled: bool = False) -> torch.nn.Module:
    """Random weights everywhere: zero-initialised layers would hide paths from the parity checks.
    With ``fan_in_scaled`` a weight's standard deviation is 1 / sqrt(its fan-in) instead of 0.2,
    which keeps activations of order one: at 32 and 64 channels the 0.2 weights grow them past
    1e5, beyond fp16's range, where the reference overflows as well (an H100 run saw NaN from both)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = p[0].numel() ** -0.5 if fan_in_scaled and p.dim() > 1 else 0.2
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_maps_images_to_their_shape(preset):
    model = build(preset, in_channels=2)
    k = model.config.downsample_factor
    x, t = torch.randn(1, 2, 2 * k, 2 * k), torch.rand(1)
    with torch.no_grad():
        assert model(x, t).shape == x.shape


def test_preset_overrides_and_config():
    model = liquid_diffusion_tiny(in_channels=1, channels=(8, 16, 32))
    assert model.config.in_channels == 1 and model.config.channels == (8, 16, 32)
    assert model.config.blocks == PRESETS["tiny"].blocks
    with pytest.raises(ValueError, match="unknown preset"):
        build("huge")
    with pytest.raises(ValueError, match="equal length"):
        LiquidDiffusion(channels=(8, 16), blocks=(1,))


def test_fresh_block_adds_only_its_normalised_input_at_t0():
    """Zero-initialised modulations and last projections: at t = 0 (alpha = 1) only the CfC's
    relaxation term n reaches the residual stream."""
    from liquiddiff.modules import LiquidDiffusionBlock

    block = LiquidDiffusionBlock(8, 32)
    u = torch.randn(2, 8, 6, 6)
    out = block(u, torch.randn(2, 32), torch.zeros(2))  # t = 0: alpha = 1, CfC returns n
    n = torch.nn.functional.layer_norm(u.permute(0, 2, 3, 1), (8,), eps=1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(out, u + n, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "shape, message",
    [((3, 32, 32), "expected images"), ((1, 4, 32, 32), "expected 3 channels"), ((1, 3, 31, 32), "multiple of 2")],
)
def test_bad_input_is_named(shape, message):
    model = build("micro")
    with pytest.raises(ValueError, match=message):
        model(torch.randn(*shape), torch.rand(shape[0]))
    with pytest.raises(ValueError, match=r"t: expected shape \[3\] or one time for the batch, got \(2,\)"):
        model(torch.randn(3, 3, 32, 32), torch.rand(2))


@pytest.mark.parametrize("fused", [False, True])
def test_one_time_for_the_batch_in_any_form_and_float_dtype(fused):
    """The seed's Euler loop calls ``model(z, i / N)`` with a Python float. A number, a 0-d or
    one-element tensor, and a float64 t (from numpy) all give what a float32 [B] t gives, in
    the activations' dtype; the fused kernels read the batch's one time as they read [B]."""
    model = build("micro", channels=(8, 16), fused=fused).eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        expected = model(x, torch.full((3,), 0.375))
        for t in (0.375, np.float64(0.375), torch.tensor(0.375), torch.tensor([0.375]),
                  torch.full((3,), 0.375, dtype=torch.float64), np.full(3, 0.375), [0.375] * 3):
            out = model(x, t)
            assert out.dtype == torch.float32, type(t)
            torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_model_cast_to_half_precision_runs_in_it(dtype):
    """``model.to(torch.bfloat16)`` for inference: the time embedding's frequencies stay fp32
    (phases of up to 1000 radians), its MLP and every block compute in the model's dtype."""
    model = build("micro", channels=(16, 32)).eval()
    half = copy.deepcopy(model).to(dtype)
    assert half.time_embed.freqs.dtype == torch.float32 and torch.equal(half.time_embed.freqs, model.time_embed.freqs)
    for module in model.modules():  # a trained-looking model: the zero-initialised projections too
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=0.02)
    half = copy.deepcopy(model).to(dtype)
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    with torch.no_grad():
        out = half(x.to(dtype), t)
        assert out.dtype == dtype
        assert rel_err(out.float(), model(x, t)) < 0.03


def test_a_float64_model_embeds_time_in_float64():
    """``model.double()`` (gradcheck, reference runs): the sinusoid too is fp64, so times that
    fp32 cannot tell apart give different embeddings; ``.float()`` brings fp32 back."""
    model = _randomise(build("micro", channels=(8, 16)))
    t = torch.tensor([0.3, 0.7, 0.9], dtype=torch.float64)
    nearby = t + 1e-12  # the same fp32 numbers
    assert torch.equal(nearby.float(), t.float())
    with torch.no_grad():
        single = model.time_embed(t.float())
        model.double()
        assert model.time_embed.freqs.dtype == torch.float64
        embedded = model.time_embed(t)
        assert not torch.equal(model.time_embed(nearby), embedded)
        assert rel_err(embedded.float(), single) < 1e-4
    assert model.float().time_embed.freqs.dtype == torch.float32


def test_a_model_built_on_another_default_device_keeps_everything_there():
    """Built under ``with torch.device("meta")`` (or a default CUDA device), the embedding's
    frequencies live with the weights; ``to_empty`` remakes them (they are no parameter)."""
    with torch.device("meta"):
        model = build("micro", channels=(8, 16))
    assert model.time_embed.freqs.device.type == "meta"
    assert model(torch.randn(2, 3, 8, 8, device="meta"), torch.rand(2, device="meta")).device.type == "meta"
    model = model.to_empty(device="cpu")
    torch.testing.assert_close(model.time_embed.freqs, build("micro", channels=(8, 16)).time_embed.freqs)
    assert model.time_embed.half().mlp[0].weight.dtype == torch.float16  # Module.half, not shadowed


@pytest.mark.parametrize("channels, groups", [((48, 96), 24), ((40, 80), 20), ((64, 128), 32), ((16, 32), 16)])
def test_any_channel_count_builds_with_the_most_output_groups_up_to_32(channels, groups):
    model = build("micro", channels=channels)
    assert model.head_norm.num_groups == groups
    assert model(torch.randn(1, 3, 8, 8), torch.rand(1)).shape == (1, 3, 8, 8)


def _param_grads(model, x, t, up):
    """The output and the gradients of every parameter, and of x and t where they require it."""
    model.zero_grad(set_to_none=True)
    inputs = {name: v.detach().requires_grad_() for name, v in (("x", x), ("t", t)) if v.requires_grad}
    out = model(inputs.get("x", x), inputs.get("t", t))
    out.backward(up)
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    return out.detach(), {**grads, **{name: v.grad for name, v in inputs.items()}}


@pytest.mark.parametrize("memory_format, setting, frozen", [
    (torch.contiguous_format, "auto", False), (torch.channels_last, "auto", False),
    (torch.channels_last, "auto,depthwise_conv=triton", False),  # the opt-in Triton depthwise convs too
    (torch.contiguous_format, "auto,pointwise_conv=triton", False),  # and the opt-in SiLU -> 1x1 conv forward
    # Fine-tuning a part: every other parameter frozen (each op then gets a mix of inputs that
    # need a gradient and inputs that do not), with and without the opt-in kernels.
    (torch.channels_last, "auto", True),
    (torch.channels_last, "auto,depthwise_conv=triton,pointwise_conv=triton", True),
])
def test_fused_model_matches_reference(monkeypatch, memory_format, setting, frozen):
    """Same weights, fused=True vs fused=False: the output and the gradient of every parameter,
    and of x and t (what a likelihood's divergence or a guidance term asks of the model), agree;
    a frozen parameter gets no gradient either way."""
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", setting)
    check_fused_matches_reference(memory_format, frozen)


@pytest.mark.parametrize("setting, per_block", [
    # FORWARD_ONLY: the spatial mix's and the FeedForward's last convs, the CfC's g and h 1x1 heads
    # on the SiLU -> 1x1 conv forward, the backbone's 1x1 with SiLU in its epilogue
    ("auto", {"forward": 4, "conv1x1_silu_forward": 1}),
    # and the g and h heads' 3x3s in that forward's prologue
    ("auto,depthwise_conv=triton", {"forward": 2, "depthwise_forward": 2, "conv1x1_silu_forward": 1}),
    # the CfC heads kernel (f, g, h and the gate), the FeedForward in one pass
    ("auto,pointwise_conv=triton", {"forward": 1, "conv1x1_silu_forward": 1, "feedforward_forward": 1,
                                    "heads": 1}),
])
def test_fused_model_without_gradient_runs_the_pointwise_forward_kernels(monkeypatch, setting, per_block):
    """A forward without grad (a sampling step) runs the Triton pointwise forwards ``per_block``
    (the opt-in ones with their setting); under auto a forward with grad runs the SiLU -> 1x1
    conv forward alone (the spatial mix's and the FeedForward's last convs, the CfC's g and h
    1x1s). The outputs agree."""
    from liquiddiff.kernels import cfc_heads, pointwise_conv

    monkeypatch.setenv("LIQUIDDIFF_KERNELS", setting)
    calls = collections.Counter()
    launchers = [(pointwise_conv, name) for name in ("forward", "depthwise_forward", "conv1x1_silu_forward",
                                                     "feedforward_forward")] + [(cfc_heads, "forward")]
    for module, name in launchers:
        label = "heads" if module is cfc_heads else name

        def counted(*args, _fn=getattr(module, name), _label=label):
            calls[_label] += 1
            return _fn(*args)

        monkeypatch.setattr(module, name, counted)
    model = _randomise(build("micro", channels=(8, 12), blocks=(1, 1), bottleneck_blocks=1), fan_in_scaled=True)
    model = model.set_fused(True).to(memory_format=torch.channels_last)
    x, t = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last), torch.rand(2)
    trained = model(x, t)
    if setting != "auto,pointwise_conv=triton":  # which trains on those kernels
        assert calls == {"forward": 4 * len(model.blocks())}
    calls.clear()
    with torch.no_grad():
        sampled = model(x, t)
    assert calls == {name: n * len(model.blocks()) for name, n in per_block.items()}
    assert rel_err(sampled, trained) < 1e-5


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_fused_model_matches_reference_with_its_batch_launched_in_parts(monkeypatch, memory_format):
    """A batch past the 65535 programs a GPU grid holds along axes 1 and 2 (where every kernel
    puts it) is launched in parts, each kernel adding its part's first item: here a batch of 3
    in parts of 2 and 1, through every kernel (the opt-in ones too), whose grids the strict
    interpreter refuses past 2 along those axes."""
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", "triton")
    monkeypatch.setattr(_tensors, "MAX_GRID_BATCH", 2)
    monkeypatch.setattr(strict_interpreter, "GPU_GRID_LIMITS", (2**31 - 1, 2, 2))
    check_fused_matches_reference(memory_format, frozen=False, batch=3)


@pytest.mark.gpu
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_gpu_fused_model_matches_reference_on_a_batch_past_65535(monkeypatch, memory_format):
    """The same on CUDA, every kernel launched in two parts for real: a batch of 65537 images of
    4 x 4 px, in fp32 (TF32 off: the reference's convolutions in full precision too)."""
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", "triton")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    # Bias gradients sum over 65537 images in fp32: the reference's are up to 4e-5 from fp64's
    # (on the CPU), and the two sum in different orders.
    check_fused_matches_reference(memory_format, frozen=False, batch=65537, size=4, device="cuda", tol=3e-4)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_fused_model_matches_reference_on_an_empty_batch(monkeypatch, memory_format):
    """A batch of no images (an empty micro-batch, a sampler asked for none): an empty output and
    zero gradients, as the reference gives, through every kernel (the pointwise weight gradient's
    launcher divided by the batch size)."""
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", "triton")
    check_fused_matches_reference(memory_format, frozen=False, batch=0)


def check_fused_matches_reference(memory_format, frozen: bool, batch: int = 2, size: int = 8, device: str = "cpu",
                                  tol: float = 1e-5):
    model = _randomise(build("micro", channels=(8, 12), blocks=(1, 1), bottleneck_blocks=1)).to(device)
    model = model.to(memory_format=memory_format)
    frozen_names = [name for name, _ in model.named_parameters()][::2] if frozen else []
    for name in frozen_names:
        model.get_parameter(name).requires_grad_(False)
    x = torch.randn(batch, 3, size, size, device=device).to(memory_format=memory_format).requires_grad_()
    t = torch.rand(batch, device=device).requires_grad_()
    up = torch.randn_like(x)
    ref_out, ref_grads = _param_grads(model.set_fused(False), x, t, up)
    out, grads = _param_grads(model.set_fused(True), x, t, up)
    assert kernels.select_backend("cfc_relax", device).is_triton, "the kernels should run here"
    assert rel_err(out, ref_out) < tol
    assert grads.keys() == ref_grads.keys() and {"x", "t"} <= grads.keys()
    assert [n for n, g in grads.items() if g is None] == [n for n, g in ref_grads.items() if g is None] == frozen_names
    # Some gradients are zero in exact arithmetic (a bias that a per-channel GroupNorm removes):
    # those are held to the rounding noise of the whole gradient instead of their own norm.
    noise = tol / 100 * torch.cat([g.flatten() for g in ref_grads.values() if g is not None]).norm()
    for name, g in grads.items():
        ref = ref_grads[name]
        if ref is not None:
            assert (g - ref).norm() <= tol * ref.norm() + noise, (name, rel_err(g, ref))


def _autocast_errors(model, x, t, dtype=torch.bfloat16):
    """(``dtype`` reference, ``dtype`` fused) errors against the fp32 reference, of the output and of all
    parameter gradients (one upstream), channels_last, backward outside autocast (on CUDA: the
    engine's device thread, where recomputed tensors must get the forward's autocast back)."""
    model = model.to(memory_format=torch.channels_last)
    x = x.to(memory_format=torch.channels_last)
    up = torch.randn_like(x)

    def run(fused, autocast):
        model.set_fused(fused)
        model.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=dtype, enabled=autocast):
            out = model(x, t)
        out.float().backward(up)
        return out.detach().float(), torch.cat([p.grad.flatten().float() for p in model.parameters()])

    truth, ref, fused = run(False, False), run(False, True), run(True, True)
    assert all(v.isfinite().all() for v in ref), f"the reference overflows under {dtype} autocast: the weights are too large"
    assert kernels.select_backend("cfc_relax", x.device.type).is_triton
    return [(what, rel_err(ref[i], truth[i]), rel_err(fused[i], truth[i]))
            for i, what in enumerate(("output", "gradients"))]


@pytest.mark.parametrize("setting, dtype", [
    ("auto", torch.bfloat16), ("auto,depthwise_conv=triton", torch.bfloat16),
    ("auto,pointwise_conv=triton", torch.bfloat16), ("auto", torch.float16), ("auto,pointwise_conv=triton", torch.float16),
])
def test_fused_model_under_cpu_autocast_is_as_close_to_fp32_as_the_reference(monkeypatch, setting, dtype):
    """bf16 (or fp16, as a T4 trains) autocast on the CPU (the interpreter runs the kernels): the
    fused model, whose blocks cast their parameters together, is no further from the fp32
    reference than the reference under the same autocast is (twice its error at most). A single parameter's gradient can be rounding noise
    (the last block's output bias, summed over a GroupNorm's zero-mean gradient), so all of them
    are compared as one vector."""
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", setting)
    model = _randomise(build("micro", channels=(8, 12), blocks=(1, 1), bottleneck_blocks=1))
    for what, ref_err, fused_err in _autocast_errors(model, torch.randn(2, 3, 8, 8), torch.rand(2), dtype):
        assert fused_err <= 2 * ref_err + 1e-3, (what, fused_err, ref_err)


@pytest.mark.gpu
@pytest.mark.parametrize("setting, dtype", [
    ("auto", torch.bfloat16), ("auto,depthwise_conv=triton", torch.bfloat16),
    ("auto,pointwise_conv=triton", torch.bfloat16), ("auto", torch.float16),
])
def test_gpu_fused_model_under_autocast_is_as_close_to_fp32_as_the_reference(monkeypatch, setting, dtype):
    """The same on CUDA, at a size where bf16 and fp16 kernels (not the interpreter) run; fp16
    with weights scaled to their fan-in, so that the fp32 model's activations fit fp16's range."""
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", setting)
    model = build("micro", channels=(32, 64), blocks=(1, 1), bottleneck_blocks=1)
    model = _randomise(model, fan_in_scaled=dtype == torch.float16).cuda()
    x, t = torch.randn(4, 3, 32, 32, device="cuda"), torch.rand(4, device="cuda")
    for what, ref_err, fused_err in _autocast_errors(model, x, t, dtype):
        assert fused_err <= 2 * ref_err + 1e-3, (what, fused_err, ref_err)


@pytest.mark.gpu
@pytest.mark.parametrize("setting", ["auto", "auto,depthwise_conv=triton,pointwise_conv=triton"])
def test_gpu_fused_train_step_is_deterministic(monkeypatch, setting):
    """The kernels reduce their weight gradients from per-program partials, never atomics (the
    README says deterministic): two backward passes of one batch give the same bits, with cuDNN
    held to its deterministic algorithms so that only this package's kernels are on trial."""
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", setting)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    model = _randomise(build("micro", channels=(32, 64), blocks=(1, 1), bottleneck_blocks=1, fused=True))
    model = model.cuda().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    t, up = torch.rand(4, device="cuda"), torch.randn_like(x)
    runs = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, t)
        out.float().backward(up)
        runs.append([out.detach()] + [p.grad for p in model.parameters()])
    names = ["output"] + [name for name, _ in model.named_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(*runs)), [n for n, a, b in zip(names, *runs) if not torch.equal(a, b)]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_gpu_fused_model_on_a_device_that_is_not_current():
    """Triton launches on the current device: the fused ops switch to their inputs' (a model on
    cuda:1 while cuda:0 is current gives the reference's output and gradients)."""
    torch.cuda.set_device(0)
    model = _randomise(build("micro", channels=(32, 64), blocks=(1, 1), bottleneck_blocks=1)).to("cuda:1")
    x, t = torch.randn(4, 3, 32, 32, device="cuda:1"), torch.rand(4, device="cuda:1")
    results = []
    for fused in (True, False):
        model.set_fused(fused).zero_grad(set_to_none=True)
        out = model(x, t)
        out.square().mean().backward()
        results.append((out, [p.grad for p in model.parameters()]))
    (out, grads), (ref, ref_grads) = results
    assert rel_err(out, ref) < 1e-4
    for g, r in zip(grads, ref_grads):
        assert (g - r).norm() <= 1e-4 * r.norm() + 1e-8


def test_fused_block_under_autocast_casts_its_parameters_together():
    """Under autocast the fused block casts its parameters by one concatenation and one cast (and
    their gradients back the same way): no op reads a parameter to cast it alone, the values
    each consumer would have cast, and every parameter still gets its fp32 gradient."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from liquiddiff.modules import LiquidDiffusionBlock

    block = LiquidDiffusionBlock(6, 16)
    for p in block.parameters():
        torch.nn.init.normal_(p)
    storages = {p.untyped_storage().data_ptr() for p in block.parameters()}
    casts = []

    class Casts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].untyped_storage().data_ptr() in storages:
                casts.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    for m in block.modules():
        if hasattr(m, "fused"):
            m.fused = True
    u, temb = torch.randn(2, 6, 5, 5, requires_grad=True), torch.randn(2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16), Casts():
        params = block.fused_parameters("cpu")
        out = block(u, temb, torch.rand(2))
    out.float().sum().backward()
    assert casts == []  # the merged depthwise kernel is made in fp32, then cast with the rest
    assert torch.equal(params.cfc[0][0], block.cfc.backbone_dw.weight.to(torch.bfloat16))
    assert torch.equal(params.ffn[1][1], block.ffn.out.bias.to(torch.bfloat16))
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and p.grad.shape == p.shape, name


def test_fused_block_under_autocast_casts_no_activation_for_the_cfc_backbone(monkeypatch):
    """Under autocast norm1 also writes n in bf16 (AdaLN's copy_dtype), which the CfC's 7x7 conv
    reads, and the CfC kernel writes its output in bf16 with its pixel sum, which the spatial
    mix reads: the block's forward casts no fp32 activation to bf16 (the conv cast n by a pass of
    its own before, and the mix its input with cast_with_pixel_sum); its backward casts one, the
    FeedForward's fp32 upstream gradient for cuDNN, by the pass that also sums it for the bias
    gradient (cast_with_channel_sum; n's copy for the 7x7's weight gradient is remade with n by
    one AdaLN pass, where backward cast n); and the output and every gradient are those of the
    block that casts."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from liquiddiff.kernels import recompute
    from liquiddiff.modules import LiquidDiffusionBlock

    casts = []

    def counted_cast(x, dtype, _cast=recompute.cast_with_pixel_sum):
        casts.append(("cast_with_pixel_sum", tuple(x.shape)))
        return _cast(x, dtype)

    monkeypatch.setattr(recompute, "cast_with_pixel_sum", counted_cast)

    def counted_bias_cast(x, dtype, _cast=recompute.cast_with_channel_sum):
        casts.append(("cast_with_channel_sum", tuple(x.shape)))
        return _cast(x, dtype)

    monkeypatch.setattr(recompute, "cast_with_channel_sum", counted_bias_cast)

    class Casts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if (func is torch.ops.aten._to_copy.default and args[0].dim() == 4 and args[0].dtype == torch.float32
                    and (kwargs or {}).get("dtype") == torch.bfloat16):
                casts.append(tuple(args[0].shape))
            return func(*args, **(kwargs or {}))

    def run(block, copy: bool, probe, backward_probe):
        if not copy:  # the block before norm1 wrote the copy: the conv casts n
            monkeypatch.setattr(block, "_cfc_conv_dtype", lambda u: None)
        u = raw_u.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16), probe:
            out = block(u, temb, t)
        with backward_probe:
            grads = torch.autograd.grad(out, [u, *block.parameters()], up.to(out.dtype))
        return out, grads

    block = _randomise(LiquidDiffusionBlock(6, 16))
    for m in block.modules():
        if hasattr(m, "fused"):
            m.fused = True
    raw_u = torch.randn(2, 6, 5, 5).to(memory_format=torch.channels_last)
    temb, t, up = torch.randn(2, 16), torch.rand(2), torch.randn(2, 6, 5, 5)
    out, grads = run(block, True, Casts(), contextlib.nullcontext())
    assert casts == [("cast_with_channel_sum", tuple(raw_u.shape))]  # backward's: no aten cast forward
    casts.clear()
    run(copy.deepcopy(block), True, contextlib.nullcontext(), Casts())
    assert casts == [("cast_with_channel_sum", tuple(raw_u.shape))]  # and none in backward
    casts.clear()
    ref, ref_grads = run(copy.deepcopy(block), False, contextlib.nullcontext(), contextlib.nullcontext())
    # The mix's, where the CfC wrote no copy; the FFN's upstream in backward.
    assert casts == [("cast_with_pixel_sum", tuple(raw_u.shape)), ("cast_with_channel_sum", tuple(raw_u.shape))]
    assert torch.equal(out, ref)
    for g, r in zip(grads, ref_grads):
        assert torch.equal(g, r)


def _fused_block(seed: int = 0):
    from liquiddiff.modules import LiquidDiffusionBlock

    block = _randomise(LiquidDiffusionBlock(6, 16), seed).to(memory_format=torch.channels_last)
    for m in block.modules():
        if hasattr(m, "fused"):
            m.fused = True
    return block


@pytest.mark.parametrize("u_dtype", [torch.float32, torch.bfloat16])  # bf16: a stage's first block, after a conv
@pytest.mark.parametrize("setting", ["auto", "auto,depthwise_conv=triton"])
def test_fused_block_writes_n_once_in_the_convs_dtype(monkeypatch, u_dtype, setting):
    """Under autocast norm1 and the CfC run as one node (kernels.normalized_parallel_cfc): norm1
    writes n in bf16 alone (and backward remakes that alone, for the 7x7's weight gradient); the
    CfC kernels remake n in fp32 from u. Before, norm1 also wrote n in fp32 for the CfC kernel
    to read (and remade both in backward). The same output and gradients of u and of every
    parameter, bit for bit, with and without gradient; for a bf16 u also where the AdaLN
    backward kernel rounds n's two gradients' sum and u's fp32 residual gradient as it loads
    them, where an in-place add and a cast pass did."""
    from liquiddiff.kernels import adaln

    monkeypatch.setenv("LIQUIDDIFF_KERNELS", setting)
    norms = []  # (out dtype, copy dtype) of norm1's kernel calls (norm2's go through _EagerAdaLN)
    real = adaln._forward_kernels
    monkeypatch.setattr(adaln, "_forward_kernels", lambda *args: norms.append((args[5], args[6])) or real(*args))
    block = _fused_block()
    raw_u = torch.randn(2, 6, 5, 5).to(memory_format=torch.channels_last, dtype=u_dtype)
    temb, t, up = torch.randn(2, 16), torch.rand(2), torch.randn(2, 6, 5, 5)

    def run(grad: bool):
        norms.clear()
        u = raw_u.clone().requires_grad_(grad)
        with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(u, temb, t)
        grads = torch.autograd.grad(out, [u, *block.parameters()], up.to(out.dtype)) if grad else ()
        return out.detach(), grads, list(norms)

    n_alone = (torch.bfloat16, None)
    out, _, sampling_norms = run(False)
    assert sampling_norms == [n_alone]
    trained, grads, train_norms = run(True)
    assert train_norms == [n_alone, n_alone]  # forward, and the remade copy in backward
    monkeypatch.setattr(kernels, "normalized_parallel_cfc_runs", lambda *args: False)
    old_sampled = run(False)[0]
    old, old_grads, old_norms = run(True)
    # fp32 u: n in fp32 and its bf16 copy; bf16 u: n is bf16, its own copy (the forward's call:
    # the backward's remake of both goes through _EagerAdaLN)
    assert old_norms == [(None, torch.bfloat16 if u_dtype == torch.float32 else None)]
    # (Without gradient the forward-only kernels may round differently from the training path.)
    assert torch.equal(out, old_sampled) and torch.equal(trained, old)
    for name, g, r in zip(["u", *dict(block.named_parameters())], grads, old_grads):
        assert torch.equal(g, r), name


def test_parallel_cfc_module_with_norm_takes_its_input_as_the_residual():
    block = _fused_block()
    u, temb, t = torch.randn(2, 6, 5, 5), torch.randn(2, 16), torch.rand(2)
    norm = (*block.norm1.time(temb), block.norm1.eps)
    with pytest.raises(ValueError, match="residual: with norm, the branch's residual is the AdaLN's input n itself"):
        block.cfc(u, temb, t, residual=u.clone(), copy_dtype=torch.float32, norm=norm)


def test_compiled_fused_block_runs_norm1_and_the_cfc_as_one_node():
    """torch.compile(fullgraph=True) traces kernels.normalized_parallel_cfc (its custom ops and
    fake kernels), forward and backward: the eager block's output and gradients."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    block = _fused_block()
    raw_u = torch.randn(2, 6, 5, 5).to(memory_format=torch.channels_last)
    temb, t, up = torch.randn(2, 16), torch.rand(2), torch.randn(2, 6, 5, 5)
    ops = []

    def record(gm, example_inputs):
        ops.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return make_boxed_func(gm.forward)

    compiled = torch.compile(block, fullgraph=True, backend=aot_autograd(fw_compiler=record, bw_compiler=record))
    results = []
    for call in (block, compiled):
        u = raw_u.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = call(u, temb, t)
        results.append((out, torch.autograd.grad(out, [u, *block.parameters()], up)))
    assert "liquiddiff.cfc_relax_normalized.default" in ops
    assert "liquiddiff.cfc_relax_normalized_backward.default" in ops
    (eager, eager_grads), (got, got_grads) = results
    parity.assert_close("out", got, eager, 1e-6)
    for name, g, r in zip(["u", *dict(block.named_parameters())], got_grads, eager_grads):
        parity.assert_close(f"d {name}", g, r, 1e-5)


def test_fused_channels_last_model_makes_no_nchw_activation():
    """channels_last end to end: no forward or backward op of the fused model writes a dense NCHW
    activation (a layout round trip); views and [.., B, C] scratch buffers are not activations."""
    from torch.utils._python_dispatch import TorchDispatchMode

    batch, found = 3, []

    class NchwProbe(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.is_view:  # writes nothing (the [B, H, W, C] view around a 1x1 conv's GEMM)
                return out
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if (isinstance(o, torch.Tensor) and o.dim() == 4 and o.shape[0] == batch and o.shape[1] > 1
                        and o.shape[2] * o.shape[3] > 1 and o.is_contiguous()
                        and not o.is_contiguous(memory_format=torch.channels_last)):
                    found.append((str(func), tuple(o.shape)))
            return out

    model = build("micro", channels=(8, 16), fused=True).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 16, 16).to(memory_format=torch.channels_last)
    with NchwProbe():
        model(x, torch.rand(batch)).backward(torch.randn_like(x))
    assert not found, found


@pytest.mark.parametrize("fused", [False, True])
def test_gradient_checkpointing_and_offloading_change_no_gradient(fused):
    """``set_gradient_checkpointing`` (each block rerun in backward) and a user's CPU offloading
    change no gradient, bit for bit; the fused model's own saved-tensor hooks
    (kernels.recompute_saved) nest inside both."""
    model = _randomise(build("micro", channels=(8, 12), blocks=(1, 1), bottleneck_blocks=1, fused=fused)).double()
    x, t = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    up = torch.randn_like(x)
    want = _param_grads(model, x, t, up)[1]
    checkpointed = _param_grads(model.set_gradient_checkpointing(True), x, t, up)[1]
    model.set_gradient_checkpointing(False)
    with torch.autograd.graph.save_on_cpu():
        offloaded = _param_grads(model, x, t, up)[1]
    for name, g in want.items():
        assert torch.equal(checkpointed[name], g) and torch.equal(offloaded[name], g), name


def test_gradient_checkpointing_is_no_part_of_the_state_dict():
    model = build("micro").set_gradient_checkpointing(True)
    assert model.gradient_checkpointing
    assert list(model.state_dict()) == list(build("micro").state_dict())


def test_state_dict_is_the_same_fused_or_not():
    fused, plain = build("micro", fused=True), build("micro", fused=False)
    assert list(fused.state_dict()) == list(plain.state_dict())
    plain.load_state_dict(_randomise(fused).state_dict())
    x, t = torch.randn(1, 3, 8, 8), torch.rand(1)
    with torch.no_grad():
        assert rel_err(plain(x, t), fused(x, t)) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("setting, checkpointing", [("auto", False), ("auto,depthwise_conv=triton", False),
                                                    ("auto,pointwise_conv=triton", False), ("auto", True)])
def test_compiled_fused_model_matches_the_reference_forward_and_backward(monkeypatch, setting, checkpointing):
    """torch.compile(fullgraph=True) of the fused model (its autograd nodes traced, the Triton
    launches as custom ops; with gradient checkpointing, inside the checkpointed regions): the
    reference's output and parameter gradients."""
    monkeypatch.setenv("LIQUIDDIFF_KERNELS", setting)
    model = _randomise(build("micro", channels=(8, 12), blocks=(1, 1), bottleneck_blocks=1, fused=True))
    model.set_gradient_checkpointing(checkpointing)
    compiled = torch.compile(model, fullgraph=True)
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    out = compiled(x, t)
    out.square().mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    ref = model.set_fused(False)(x, t)
    ref.square().mean().backward()
    assert rel_err(out, ref) < 1e-4
    for (name, p), g in zip(model.named_parameters(), grads):
        assert (g - p.grad).norm() <= 1e-4 * p.grad.norm() + 1e-8, (name, rel_err(g, p.grad))


def test_compiled_fused_model_backward_copies_no_gradient():
    """torch.compile of the channels_last fused model traces every autograd node's backward in
    the layout its gradients come in: no layout query on a tensor the backward made (dynamo
    refuses those, retraces the backward on .contiguous() copies of its gradients and, under
    autocast, left autocast off for the rest of the trace: the H100's compiled fused step went
    from 170 to 292 ms)."""
    model = build("micro", channels=(8, 12), blocks=(1, 1), bottleneck_blocks=1, fused=True)
    model = _randomise(model).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    copies = parity.compiled_backward_copies(model, x, torch.rand(2))
    assert not copies, copies


def test_compiled_with_dynamic_shapes_is_one_graph_and_a_number_t_is_no_constant():
    """``torch.compile(dynamic=True, fullgraph=True)`` traces the fused model whole (AdaLN's eps
    check once broke on the SymFloat eps), at two batch sizes; the seed's Euler loop with a
    Python-float t compiles two graphs for twelve values, not one per value up to the
    recompile limit and eager after it."""
    from torch._dynamo.utils import counters

    model = _randomise(build("micro", channels=(8, 12), blocks=(1, 1), bottleneck_blocks=1, fused=True)).eval()
    torch._dynamo.reset()
    dynamic = torch.compile(model, dynamic=True, fullgraph=True, backend="eager")
    with torch.no_grad():
        for batch in (3, 2):
            x, t = torch.randn(batch, 3, 8, 8), torch.rand(batch)
            torch.testing.assert_close(dynamic(x, t), model(x, t), rtol=1e-5, atol=1e-6)
        torch._dynamo.reset()
        counters.clear()
        compiled, z, eager = torch.compile(model, backend="eager"), torch.randn(2, 3, 8, 8), None
        eager = z.clone()
        for i in range(12, 0, -1):
            z, eager = z - compiled(z, i / 12) / 12, eager - model(eager, i / 12) / 12
    assert counters["stats"]["unique_graphs"] <= 2
    torch.testing.assert_close(z, eager, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_fused_model_projects_time_for_all_blocks_in_one_gemm():
    """Fused, every block's five time projections are one GEMM over all the Linears' weights
    (the blocks share temb): the values each module's own Linear gives, in the blocks' call
    order, and one addmm per forward besides the time embedding's two."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from liquiddiff.modules import project_time

    model = _randomise(build("micro", channels=(6, 8), blocks=(1, 1), bottleneck_blocks=1)).double()
    temb = model.time_embed(torch.rand(3, dtype=torch.float64))
    e = torch.nn.functional.silu(temb)
    expected = [(b.norm1.time.proj(e), (b.cfc.time_a(e), b.cfc.time_b(e)), b.mix.time.proj(e), b.norm2.time.proj(e))
                for b in model.blocks()]
    assert len(expected) == 5 and model.blocks()[2] is model.bottleneck[0]

    class Count(TorchDispatchMode):
        addmm = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.addmm += func is torch.ops.aten.addmm.default
            return func(*args, **(kwargs or {}))

    flat = lambda ps: [q for p in ps for q in (p if isinstance(p, tuple) else (p,))]  # noqa: E731
    for got, want in zip(project_time(temb, model.blocks()), expected):
        for g, w in zip(flat(got), flat(want)):
            assert rel_err(g, w) < 1e-12
    with Count():
        model.set_fused(True)(torch.randn(3, 3, 8, 8, dtype=torch.float64), torch.rand(3, dtype=torch.float64))
    assert Count.addmm == 3


def test_fused_parameter_gradients_keep_their_parameters_strides():
    """channels_last under autocast, the fused block's parameters cast together: every gradient
    has its parameter's strides (DDP warns and copies when a gradient's differ from its bucket's,
    which are the parameter's)."""
    model = build("micro", channels=(8, 16), fused=True).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, torch.rand(2))
    out.float().square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad.stride() == p.stride(), (name, p.stride(), p.grad.stride())


def test_cast_together_is_one_concatenation_and_cast_per_direction():
    """modules._cast_together against its definition, [torch.cat(group).to(dtype)]: the same
    values, and every input's gradient (an unused group's inputs get zeros), with the input's
    strides (a channels_last kernel's included)."""
    from liquiddiff.modules import _cast_together

    def make():
        return [[torch.randn(3, 4, dtype=torch.float64, requires_grad=True),
                 torch.randn(2, 4, dtype=torch.float64, requires_grad=True)],
                [torch.randn(5, 1, 3, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
                 .requires_grad_()],
                [torch.randn(6, dtype=torch.float64, requires_grad=True)]]

    groups = make()
    ref_groups = [[t.detach().clone().requires_grad_() for t in g] for g in groups]
    got = _cast_together(groups, torch.float32)
    want = [torch.cat(g).to(torch.float32) for g in ref_groups]
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and torch.equal(g, w)
    ups = [torch.randn_like(w) for w in want]
    flat = [t for g in groups for t in g]
    ref_flat = [t for g in ref_groups for t in g]
    # The last group unused: its input's gradient is zero, as the definition's.
    grads = torch.autograd.grad(got[:2], flat, ups[:2], allow_unused=True)
    ref_grads = torch.autograd.grad(want[:2], ref_flat, ups[:2], allow_unused=True)
    for t, g, w in zip(flat, grads, ref_grads):
        w = torch.zeros_like(t) if w is None else w
        assert g.dtype == t.dtype and g.stride() == t.stride() and torch.equal(g, w)


def test_parameter_counts_are_the_readmes():
    """The README's preset table, measured from the code: micro 529,155 and tiny 15,800,963
    parameters (the widths the seed leaves open: a 4 x C1 time embedding of C1 frequencies, a 2x
    FeedForward, 3x3 g and h heads, the spatial mix's 3x3 + 5x5 + 7x7 branches)."""
    for preset, count in (("micro", 529_155), ("tiny", 15_800_963)):
        assert sum(p.numel() for p in build(preset).parameters()) == count, preset


def test_ffn_mult_reaches_every_block():
    """An ``ffn_mult`` override widens the FeedForward of every block, the bottleneck's too."""
    model = build("micro", channels=(8, 16), ffn_mult=3)
    assert len(model.blocks()) == 5
    for block in model.blocks():
        assert block.ffn.inner.out_channels == 3 * block.ffn.inner.in_channels


def test_time_embedding_feeds_its_mlp_cos_and_sin_of_1000_t():
    """README: the time embedding is C1 sinusoid frequencies of 1000 t, as in ADM: the MLP reads
    cat(cos(1000 t f_k), sin(1000 t f_k)) with f_k = 10000^(-k / K), k < K = C1 / 2; the fastest
    frequency turns a step of 0.001 in t into one radian."""
    emb = build("micro", channels=(8, 16)).time_embed
    seen = []
    emb.mlp[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    t = torch.tensor([0.0, 0.001, 0.25, 0.7, 1.0])
    emb(t)
    f = 10000.0 ** (-torch.arange(4, dtype=torch.float64) / 4)
    phase = 1000 * t.double()[:, None] * f
    torch.testing.assert_close(seen[0].double(), torch.cat([phase.cos(), phase.sin()], dim=1), atol=2e-4, rtol=0)


def test_a_fresh_model_zero_initialises_exactly_the_readmes_parameters():
    """README: the time modulations (both AdaLNs', the CfC gate's time_a and time_b, the spatial
    mix's) and the last projections of the spatial mix and the FeedForward start at zero, as
    adaLN-Zero, and rho starts at 0 (alpha = 2^-|t|); nothing else does but the output
    GroupNorm's bias (PyTorch's default)."""
    model = build("micro", channels=(8, 16))
    designated = (".time.proj.", ".time_a.", ".time_b.", ".mix.out.", ".ffn.out.")
    expected = {n for n, _ in model.named_parameters() if any(k in n for k in designated) or n.endswith(".rho")}
    assert len(expected) == 5 * 15  # per block: 3 time Linears x 2, time_a, time_b x 2, mix.out, ffn.out x 2, rho
    zeros = {n for n, p in model.named_parameters() if not p.detach().any()}
    assert zeros == expected | {"head_norm.bias"}


@pytest.mark.parametrize("fused", [False, True])
def test_adaln_is_a_layer_norm_over_channels_with_eps_1e_6(fused):
    """DESIGN: x_hat = (s - mean_C(s)) / sqrt(var_C(s) + 1e-6): an AdaLN with zero modulation
    (as fresh) is torch's LayerNorm over the channels of each pixel with that eps, which shows on
    pixels whose channels barely vary."""
    from liquiddiff.modules import AdaLN

    norm = AdaLN(8, 16).double()
    norm.fused = fused
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64) * 1e-3
    with torch.no_grad():
        out = norm(x, torch.randn(2, 16, dtype=torch.float64))
    want = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (8,), eps=1e-6).permute(0, 3, 1, 2)
    torch.testing.assert_close(out, want, atol=1e-7, rtol=1e-7)


@pytest.mark.parametrize("fused", [False, True])
def test_spatial_mix_context_is_a_1x1_conv_of_the_pixel_mean(fused):
    """README: the spatial mix adds its global-average-pool context (a 1x1 conv of the pixel
    mean) to the local sum. With the depthwise branches zeroed, identity context and output
    convs and no time modulation, every output pixel is silu(mean of x over its H x W pixels)."""
    from liquiddiff.modules import MultiScaleSpatialMix

    mix = MultiScaleSpatialMix(4, 8)
    with torch.no_grad():
        for conv in mix.branches:
            conv.weight.zero_()
            conv.bias.zero_()
        for conv in (mix.context, mix.out):
            conv.weight.copy_(torch.eye(4)[:, :, None, None])
            conv.bias.zero_()
    mix.fused = fused
    x = torch.randn(2, 4, 5, 3)
    with torch.no_grad():
        out = mix(x, torch.randn(2, 8))
    torch.testing.assert_close(out, torch.nn.functional.silu(x.mean(dim=(2, 3), keepdim=True)).expand_as(x))


@pytest.mark.parametrize("fused", [False, True])
def test_spatial_mix_is_the_seeds_form_with_every_bias(fused):
    """The spatial mix with random parameters (every bias, the time modulation) against the seed's
    literal form: out(silu((branch convs summed + context conv of the pixel mean) * (1 + scale) +
    shift)); the module folds the merged conv's bias into the context's. Values and the
    gradients of x and of every parameter."""
    from liquiddiff.modules import MultiScaleSpatialMix

    torch.manual_seed(0)
    mix = MultiScaleSpatialMix(4, 8).double()
    with torch.no_grad():
        for p in mix.parameters():
            p.normal_(0, 0.5)
    mix.fused = fused
    x = torch.randn(2, 4, 5, 3, dtype=torch.float64, requires_grad=True)
    temb = torch.randn(2, 8, dtype=torch.float64)

    def seeds_form():
        scale, shift = mix.time(temb)
        local = functional.multiscale_depthwise_conv_branches(
            x, [c.weight for c in mix.branches], [c.bias for c in mix.branches])
        context = mix.context(x.mean(dim=(2, 3), keepdim=True))
        y = (local + context) * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
        return mix.out(torch.nn.functional.silu(y))

    inputs = [x, *mix.parameters()]
    out, want = mix(x, temb), seeds_form()
    up = torch.randn_like(want)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)
    for got, ref in zip(torch.autograd.grad(out, inputs, up), torch.autograd.grad(want, inputs, up)):
        torch.testing.assert_close(got, ref, atol=1e-12, rtol=1e-12)


def test_upsample_is_nearest_neighbour_then_a_conv():
    """README: UpSample is nearest x2 then a 3x3 conv: with that conv the identity, each pixel
    becomes a 2x2 block of itself."""
    from liquiddiff.modules import UpSample

    up = UpSample(3, 3)
    with torch.no_grad():
        torch.nn.init.dirac_(up.conv.weight)
        up.conv.bias.zero_()
    x = torch.randn(2, 3, 4, 5)
    torch.testing.assert_close(up(x), x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))


def _fused_copy(module):
    fused = copy.deepcopy(module)
    fused.fused = True
    return fused


def test_fused_upsample_and_skip_fusion_cast_before_copying_under_autocast(monkeypatch):
    """Fused, under bf16 autocast, UpSample's nearest copy and SkipFusion's concatenation take
    bf16 (the conv's dtype), not the fp32 stream: the reference's values exactly, SkipFusion's
    gradients exactly, UpSample's within one bf16 rounding of the nearest sum. Without
    autocast the fused modules are the reference."""
    from liquiddiff import modules

    torch.manual_seed(0)
    up, fusion = modules.UpSample(4, 3), modules.SkipFusion(3)
    seen = []
    interpolate, cat = modules.F.interpolate, modules.torch.cat
    monkeypatch.setattr(modules.F, "interpolate", lambda x, **kw: seen.append(x.dtype) or interpolate(x, **kw))
    monkeypatch.setattr(modules.torch, "cat", lambda xs, **kw: seen.extend(x.dtype for x in xs) or cat(xs, **kw))
    x = torch.randn(2, 4, 5, 6, requires_grad=True)
    skip = torch.randn(2, 3, 10, 12, requires_grad=True)

    def run(up, fusion):
        out = fusion(up(x), skip)
        grads = torch.autograd.grad(out, (x, skip), torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        return out, grads

    for autocast in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            seen.clear()
            want, (want_dx, want_dskip) = run(up, fusion)
            assert seen == [torch.float32, torch.bfloat16, torch.float32] if autocast else [torch.float32] * 3
            seen.clear()
            got, (dx, dskip) = run(_fused_copy(up), _fused_copy(fusion))
            assert seen == ([torch.bfloat16] * 3 if autocast else [torch.float32] * 3)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        torch.testing.assert_close(dskip, want_dskip, rtol=0, atol=0)
        torch.testing.assert_close(dx, want_dx, rtol=2**-8 if autocast else 0, atol=1e-6 if autocast else 0)


@pytest.mark.parametrize("fused", [False, True])
def test_block_is_the_seeds_composition_of_its_modules(fused):
    """Seed: x -> AdaLN(t) -> ParallelCfC(t) -> +residual -> MultiScaleSpatialMix(t) -> +residual
    -> AdaLN(t) -> FeedForward -> +residual, composed here from the block's own modules (random
    weights everywhere), gives the block's output."""
    from liquiddiff.modules import LiquidDiffusionBlock

    block = _randomise(LiquidDiffusionBlock(6, 16)).double()
    for m in block.modules():
        if hasattr(m, "fused"):
            m.fused = fused
    u, temb, t = torch.randn(2, 6, 5, 5, dtype=torch.float64), torch.randn(2, 16, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    with torch.no_grad():
        u1 = u + block.cfc(block.norm1(u, temb), temb, t, residual=None)
        u2 = u1 + block.mix(u1, temb)
        want = u2 + block.ffn(block.norm2(u2, temb))
        got = block(u, temb, t)
    assert rel_err(got, want) < 1e-10


@pytest.mark.parametrize("fused", [False, True])
def test_unet_wiring_follows_the_seeds_diagram(fused):
    """Every stage takes what the seed's diagram says it takes, followed through forward hooks:
    t into the time embedding and every block; stem = 3x3 conv -> SiLU -> 3x3 conv; each encoder
    stage's blocks in a row, its output kept as the skip, then the stride-2 conv; the
    bottleneck; each decoder stage fuses (UpSample of the deeper stage's output, or the
    bottleneck's output for the deepest) with its encoder twin's skip, then runs its blocks; the
    head is GroupNorm -> SiLU -> 3x3 conv."""
    model = _randomise(build("micro", channels=(8, 12), blocks=(1, 2), bottleneck_blocks=1, fused=fused))
    calls = {}
    for name, module in model.named_modules():
        module.register_forward_hook(lambda m, args, out, name=name: calls.setdefault(name, []).append((args, out)))
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    with torch.no_grad():
        out = model(x, t)

    def follow(name, h):
        (args, result), = calls[name]
        assert torch.equal(args[0], h), name
        return result

    assert torch.equal(calls["time_embed"][0][0][0], t)
    (stem_in, h), = [(a[0], o) for a, o in calls["stem"]]
    assert torch.equal(stem_in, x)
    torch.testing.assert_close(calls["stem.2"][0][0][0], torch.nn.functional.silu(calls["stem.0"][0][1]))
    skips = []
    for i, stage in enumerate(model.encoder):
        for j in range(len(stage)):
            assert torch.equal(calls[f"encoder.{i}.{j}"][0][0][2], t)
            h = follow(f"encoder.{i}.{j}", h)
        skips.append(h)
        if i < len(model.downs):
            h = follow(f"downs.{i}", h)
    for j in range(len(model.bottleneck)):
        h = follow(f"bottleneck.{j}", h)
    for i in reversed(range(len(model.decoder))):
        if i < len(model.ups):
            h = follow(f"ups.{i}", h)
        (args, fused_out), = calls[f"fusions.{i}"]
        assert torch.equal(args[0], h) and torch.equal(args[1], skips[i]), i
        h = fused_out
        for j in range(len(model.decoder[i])):
            assert torch.equal(calls[f"decoder.{i}.{j}"][0][0][2], t)
            h = follow(f"decoder.{i}.{j}", h)
    normed = follow("head_norm", h)
    torch.testing.assert_close(calls["head"][0][0][0], torch.nn.functional.silu(normed))
    assert torch.equal(out, calls["head"][0][1])
