"""The train-step profile (benchmarks/step_profile.py): kernel kinds and the shares it reports."""
import pytest
import torch

from benchmarks import step_profile


@pytest.mark.parametrize("name, kind", [
    ("dgrad2d_c1_k1_nhwc_specialized", "depthwise conv"),
    ("wgrad2d_c1_k1_nhwc", "depthwise conv"),
    ("_cfc_relax_bwd_kernel", "Triton CfC, AdaLN, modulated SiLU (ours)"),
    ("_cfc_heads_relax_kernel", "Triton CfC, AdaLN, modulated SiLU (ours)"),
    ("_modulated_silu_bwd_kernel", "Triton CfC, AdaLN, modulated SiLU (ours)"),
    ("_context_shift_fwd_kernel", "Triton CfC, AdaLN, modulated SiLU (ours)"),
    ("_merge_bwd_kernel", "Triton CfC, AdaLN, modulated SiLU (ours)"),
    ("_silu_conv1x1_weight_grad_kernel", "Triton SiLU -> 1x1 conv (ours)"),
    ("_dwconv_wgrad_kernel", "depthwise conv"),
    ("void at::native::multi_tensor_apply_kernel<LpNormFunctor>", "optimizer, gradient clipping"),
    ("triton_red_fused__to_copy_add_div", "inductor Triton"),
    ("nvjet_sm90_tst_64x64_64x13_1x2_h_bz_splitK_NTT", "GEMM, 1x1 and dense conv"),
    ("sm90_xmma_dgrad_implicit_gemm_bf16bf16", "GEMM, 1x1 and dense conv"),
    ("void at::native::elementwise_kernel<128, 4>", "elementwise, copies, other"),
])
def test_kernel_kinds(name, kind):
    assert step_profile.kind_of(name) == kind


def test_profile_of_a_cpu_step_adds_up():
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(32, 64)

    def step():
        torch.nn.functional.silu(x @ w).sum().backward()

    prof = step_profile.profile_steps(step, "cpu", steps=2, top=5)
    assert prof["steps"] == 2 and prof["wall_ms"] > 0 and 0 < prof["busy_ms"]
    assert sum(share for _, _, share in prof["kinds"]) == pytest.approx(1.0)
    assert any(name == "aten::mm" for name, _, _ in prof["top"]) and len(prof["top"]) <= 5
    text = "\n".join(step_profile.render("step", prof))
    assert "| GEMM, 1x1 and dense conv |" in text and "`aten::mm`" in text
    assert "| C++ calls (torch ops, kernel launches) |" in text and "ops" not in prof  # the owners: GPU only


def test_gpu_time_counts_each_kernel_once():
    """On a GPU only kernels count: the CPU op that launched a kernel, and a range annotation
    over kernels, report the same device time again."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def event(device_type, annotation=False):
        return SimpleNamespace(device_type=device_type, is_user_annotation=annotation,
                               self_device_time_total=7.0, self_cpu_time_total=3.0)

    kernel, launcher, annotation = event(DeviceType.CUDA), event(DeviceType.CPU), event(DeviceType.CUDA, True)
    assert [step_profile._self_time_us(e, True) for e in (kernel, launcher, annotation)] == [7.0, 0.0, 0.0]
    assert step_profile._self_time_us(launcher, False) == 3.0


def test_every_kernel_of_ours_is_counted_as_ours():
    """Each launched @triton.jit kernel in liquiddiff/kernels (named *_kernel) gets one of our
    kinds, or the depthwise conv's: a new kernel must not vanish into "elementwise, other"."""
    import pathlib
    import re

    source = "".join(p.read_text() for p in (pathlib.Path(__file__).parent.parent / "liquiddiff" / "kernels").glob("*.py"))
    names = re.findall(r"@triton\.jit\s+def (_\w+_kernel)\(", source)
    assert len(names) >= 15
    ours = {kind for kind, _ in step_profile.KINDS if "(ours)" in kind} | {"depthwise conv"}
    assert {name: step_profile.kind_of(name) for name in names if step_profile.kind_of(name) not in ours} == {}


@pytest.mark.parametrize("filename, function, origin", [
    ("~", "<method 'item' of 'torch._C.TensorBase' objects>", "waiting for the GPU (item, synchronize)"),
    ("~", "<built-in method torch.conv2d>", "C++ calls (torch ops, kernel launches)"),
    ("/repo/liquiddiff/kernels/adaln.py", "adaln_modulate", "liquiddiff (Python)"),
    ("/venv/site-packages/triton/runtime/jit.py", "run", "Triton launcher (Python)"),
    ("/venv/site-packages/torch/autograd/function.py", "apply", "torch (Python: autograd, modules, optimizer)"),
    ("/usr/lib/python3.12/inspect.py", "getmembers", "other Python"),
])
def test_host_time_origins(filename, function, origin):
    assert step_profile.host_origin(filename, function) == origin


def test_host_profile_of_a_step_adds_up():
    x = torch.randn(64, 64)

    def step():
        for _ in range(3):
            torch.nn.functional.silu(x @ x)

    host = step_profile.host_profile(step, steps=2, top=4)
    origins = dict(host["origins"])
    assert host["steps"] == 2 and host["wall_ms"] > 0
    assert origins["C++ calls (torch ops, kernel launches)"] > 0 and sum(origins.values()) <= host["wall_ms"] * 1.5
    assert len(host["top"]) == 4 and [r[2] for r in host["top"]] == sorted((r[2] for r in host["top"]), reverse=True)
    calls = {name: n for name, n, _, _ in step_profile.host_profile(step, steps=2, top=50)["top"]}
    assert calls["<built-in method torch._C._nn.silu>"] == 3  # per step, not per run


def test_owners_name_the_ops_and_nodes_that_launch_the_device_time():
    """The aten ops' own launches (shapes kept apart) and the backward nodes' whole device time,
    per step, largest first; CUDA-side events and ops that launch nothing are left out."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    def event(key, self_us, total_us=0.0, shapes=(), device=DeviceType.CPU, count=2):
        return SimpleNamespace(key=key, input_shapes=list(shapes), count=count, device_type=device,
                               self_device_time_total=self_us, device_time_total=total_us)

    by_shape = [event("aten::sum", 3000.0, shapes=[[8, 64, 32, 32], [3]]), event("aten::sum", 1000.0, shapes=[[8, 64]]),
                event("aten::add_", 5000.0), event("aten::empty", 0.0), event("_adaln_bwd_kernel", 9000.0, device=DeviceType.CUDA)]
    nodes = [event("autograd::engine::evaluate_function: ConvolutionBackward0", 0.0, 8000.0),
             event("autograd::engine::evaluate_function: AddBackward0", 0.0, 0.0), event("aten::add_", 5000.0, 5000.0)]
    prof = SimpleNamespace(key_averages=lambda group_by_input_shape=False: by_shape if group_by_input_shape else nodes)
    owners = step_profile._owners(prof, steps=2, top=5)
    assert owners["ops"] == [["aten::add_ []", 1, 2.5], ["aten::sum [[8, 64, 32, 32], [3]]", 1, 1.5], ["aten::sum [[8, 64]]", 1, 0.5]]
    assert owners["nodes"] == [["ConvolutionBackward0", 1, 4.0]]
    text = "\n".join(step_profile.render("step", {"steps": 2, "what": "kernels", "wall_ms": 10.0, "busy_ms": 5.0,
                                                  "busy_share": 0.5, "kinds": [], "top": [], **owners}))
    assert "| `ConvolutionBackward0` | 1 | 4.00 |" in text and "| `aten::add_ []` | 1 | 2.50 |" in text
