"""Runtime backend selection: the env policy, the report, the fallback warning and the error."""
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from liquiddiff import build, kernels
from liquiddiff.kernels import runtime


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(runtime, "_warned", set())


def test_interpreter_runs_triton_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(runtime.ENV_VAR, "auto")
    report = kernels.backend_report("cpu")
    assert set(report) == set(kernels.OPS)
    for op, b in report.items():
        if op in runtime.OPT_IN:  # not measured faster yet: PyTorch unless asked for
            assert not b.is_triton and b.reason == runtime.OPT_IN[op]
        else:
            assert b.is_triton and "interpreter" in b.reason


@pytest.mark.parametrize("setting, expected", [
    ("auto,depthwise_conv=triton", {"cfc_relax": "triton", "depthwise_conv": "triton"}),
    ("torch, cfc_relax=auto", {"cfc_relax": "triton", "adaln_modulate": "torch", "depthwise_conv": "torch"}),
    ("triton", {"cfc_relax": "triton", "depthwise_conv": "triton"}),
    ("adaln_modulate=torch", {"adaln_modulate": "torch", "cfc_relax": "triton"}),
])
def test_per_op_settings(monkeypatch, setting, expected):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv(runtime.ENV_VAR, setting)
    for op, name in expected.items():
        assert kernels.select_backend(op, "cpu").name == name, op


def test_setting_with_appends_per_op_items(monkeypatch):
    monkeypatch.setenv(runtime.ENV_VAR, "torch")
    monkeypatch.setenv(runtime.ENV_VAR, runtime.setting_with("cfc_relax=triton"))
    assert runtime.policy("cfc_relax") == "triton" and runtime.policy("adaln_modulate") == "torch"
    monkeypatch.delenv(runtime.ENV_VAR)
    assert runtime.setting_with("depthwise_conv=triton") == "auto,depthwise_conv=triton"


@pytest.mark.parametrize("setting", ["fast", "auto,depthwise_conv=fast", "auto,=triton"])
def test_bad_setting_is_named(monkeypatch, setting):
    monkeypatch.setenv(runtime.ENV_VAR, setting)
    with pytest.raises(ValueError, match="LIQUIDDIFF_KERNELS=.*expected a policy"):
        kernels.select_backend("cfc_relax", "cpu")


@pytest.mark.parametrize("setting", ["auto,adaln=torch", "triton,cfc_heads=torch"])
def test_an_unknown_op_is_named_with_the_ops_there_are(monkeypatch, setting):
    """A typo in an op's name must not leave that op on its default without a word."""
    monkeypatch.setenv(runtime.ENV_VAR, setting)
    with pytest.raises(ValueError, match=r"no op '(adaln|cfc_heads)'; the ops are cfc_relax, adaln_modulate, "):
        kernels.select_backend("cfc_relax", "cpu")


def test_torch_policy_forces_the_reference(monkeypatch):
    monkeypatch.setenv(runtime.ENV_VAR, "torch")
    backend = kernels.select_backend("cfc_relax", "cpu")
    assert backend.name == "torch" and "LIQUIDDIFF_KERNELS=torch" in backend.reason


def test_auto_falls_back_and_warns_once(monkeypatch, fresh_warnings):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(runtime.ENV_VAR, "auto")
    backend = kernels.select_backend("cfc_relax", "cpu")
    assert backend.name == "torch" and "TRITON_INTERPRET=1" in backend.reason
    model = build("micro", channels=(8, 16), fused=True)
    x, t = torch.randn(1, 3, 8, 8), torch.rand(1)
    with pytest.warns(RuntimeWarning, match="PyTorch reference"):
        with torch.no_grad():
            model(x, t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model(x, t)  # the second call stays quiet


@pytest.mark.parametrize("setting, capability, expected", [
    ("auto", (9, 0), "triton"),
    ("auto,pointwise_conv=torch", (9, 0), "torch"),  # named: PyTorch for every call
    ("auto", (7, 5), "torch"),  # below MIN_CAPABILITY: no call runs the spilling kernels
])
def test_forward_only_ops_run_triton_in_calls_without_gradient_under_auto(monkeypatch, setting, capability, expected):
    """runtime.FORWARD_ONLY: an opt-in op whose forward measured faster runs Triton under auto
    where no gradient is recorded (grad=False: sampling), and stays opt-in for training."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setenv(runtime.ENV_VAR, setting)
    assert set(runtime.FORWARD_ONLY) <= set(runtime.OPT_IN)
    for op in runtime.FORWARD_ONLY:
        assert not kernels.select_backend(op, "cuda").is_triton
        backend = kernels.select_backend(op, "cuda", grad=False)
        assert backend.name == expected and backend.deliberate == (expected == "torch")
        if expected == "triton":
            assert backend.reason == runtime.FORWARD_ONLY[op]
    assert not kernels.select_backend("depthwise_conv", "cuda", grad=False).is_triton  # opt-in, not in it


@pytest.mark.parametrize("capability, setting, expected", [
    ((7, 5), "auto", "torch"),  # a T4: the kernels spill there
    ((8, 0), "auto", "triton"),
    ((9, 0), "auto", "triton"),
    ((7, 5), "auto,pointwise_conv=triton", "triton"),  # asked for by name: runs anyway
])
def test_auto_keeps_pytorch_below_an_ops_compute_capability(monkeypatch, fresh_warnings, capability, setting, expected):
    # As if the GPU report had made the pointwise kernels a default (out of OPT_IN).
    monkeypatch.setattr(runtime, "OPT_IN", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setenv(runtime.ENV_VAR, setting)
    backend = kernels.select_backend("pointwise_conv", "cuda")
    assert backend.name == expected
    if expected == "torch":
        assert "7.5" in backend.reason and "pointwise_conv=triton" in backend.reason and backend.deliberate
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a choice, not a fallback: no warning
            runtime.warn_fallback_once("pointwise_conv", backend)
    assert kernels.select_backend("cfc_relax", "cuda").is_triton  # other ops: any capability


def test_triton_policy_raises_when_triton_cannot_run(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv(runtime.ENV_VAR, "triton")
    with pytest.raises(RuntimeError, match="LIQUIDDIFF_KERNELS=triton, but .*interpreter is off"):
        kernels.select_backend("adaln_modulate", "cpu")
    model = build("micro", channels=(8, 16), fused=True)
    with pytest.raises(RuntimeError, match="LIQUIDDIFF_KERNELS=triton"):
        model(torch.randn(1, 3, 8, 8), torch.rand(1))


def test_triton_missing_is_reported(monkeypatch):
    monkeypatch.setattr(runtime, "triton_import_error", lambda: "triton does not import (ImportError: x)")
    monkeypatch.setenv(runtime.ENV_VAR, "auto")
    assert "does not import" in kernels.select_backend("cfc_relax", "cpu").reason


def test_bad_policy_is_named(monkeypatch):
    monkeypatch.setenv(runtime.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="LIQUIDDIFF_KERNELS='cuda'"):
        kernels.select_backend("cfc_relax", "cpu")


def test_reference_model_never_consults_the_runtime(monkeypatch):
    monkeypatch.setenv(runtime.ENV_VAR, "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with torch.no_grad():
        build("micro", channels=(8, 16), fused=False)(torch.randn(1, 3, 8, 8), torch.rand(1))


def test_package_works_without_triton():
    """On a machine where Triton does not import, a fused model runs the reference and says so."""
    import subprocess
    import sys

    code = (
        "import sys, warnings, torch; sys.modules['triton'] = None\n"
        "import liquiddiff\n"
        "m = liquiddiff.build('micro', channels=(8, 16), fused=True)\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    m(torch.randn(1, 3, 8, 8), torch.rand(1))\n"
        "print(sorted({str(x.message).split(':')[1].strip().split()[0] for x in w}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    # One warning per default-on op, the pointwise conv's forward kernel among them
    # (runtime.FORWARD_ONLY; the opt-in depthwise conv falls back without one).
    expected = ("['adaln_modulate', 'cfc_relax', 'context_shift', 'merged_depthwise_weight', 'modulated_silu', "
                "'pointwise_conv']")
    assert out.stdout.strip() == expected, out.stdout + out.stderr


def test_grid_arithmetic_matches_triton():
    import triton

    from liquiddiff.kernels import _tensors

    for n in range(1, 3000):
        assert _tensors.next_power_of_2(n) == triton.next_power_of_2(n)
        for block in (1, 3, 64, 1024):
            assert _tensors.cdiv(n, block) == triton.cdiv(n, block)


def _registered_ops():
    """Every custom op the kernel modules define (torch.library's CustomOpDef objects)."""
    import importlib
    import pkgutil

    from torch._library.custom_ops import CustomOpDef

    ops = {}
    for info in pkgutil.iter_modules(kernels.__path__):
        module = importlib.import_module(f"liquiddiff.kernels.{info.name}")
        ops.update({op._qualname: op for op in vars(module).values() if isinstance(op, CustomOpDef)})
    return ops


def test_every_custom_op_launches_on_its_inputs_device():
    """Triton launches on the current device: each op's launcher (the custom op's and, being the
    same function, the eager path's) must switch to its inputs' device first."""
    from liquiddiff.kernels import _tensors

    guard = _tensors.launches_on_input_device(lambda first: first).__code__
    ops = _registered_ops()
    assert len(ops) >= 20, sorted(ops)
    for name, op in ops.items():
        assert op._init_fn.__code__ is guard, name


def test_launcher_switches_to_the_device_of_its_first_input(monkeypatch):
    from liquiddiff.kernels import _tensors

    events = []

    class Device:  # records torch.cuda.device(...) around the launch
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            events.append(("enter", self.device))

        def __exit__(self, *exc):
            events.append(("exit", self.device))

    class OnGpu:  # stands in for a CUDA tensor: no GPU here
        is_cuda = True

        def __init__(self, index):
            self.index, self.device = index, f"cuda:{index}"

        def get_device(self):
            return self.index

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", Device)

    @_tensors.launches_on_input_device
    def launcher(first, scale=1):
        events.append("launch")
        return scale

    assert launcher(OnGpu(1), scale=3) == 3
    assert events == [("enter", "cuda:1"), "launch", ("exit", "cuda:1")]
    events.clear()
    launcher([OnGpu(1), OnGpu(1)])
    assert events == [("enter", "cuda:1"), "launch", ("exit", "cuda:1")]
    events.clear()
    launcher(OnGpu(0))
    launcher([torch.ones(2)])
    assert events == ["launch", "launch"]


def test_a_setting_changed_after_a_compile_reaches_code_compiled_before(monkeypatch):
    """use_triton is a constant to dynamo, but the environment it depends on is read outside
    that constant: dynamo guards on it, and a new LIQUIDDIFF_KERNELS recompiles instead of
    reusing the graph made under the old one."""
    torch._dynamo.reset()
    monkeypatch.setenv("TRITON_INTERPRET", "1")

    def f(x):
        return x * 2 if runtime.use_triton("cfc_relax", x.device.type) else x * 3

    compiled = torch.compile(f, backend="eager", fullgraph=True)
    x = torch.ones(3)
    monkeypatch.setenv(runtime.ENV_VAR, "auto")
    assert torch.equal(compiled(x), x * 2)
    monkeypatch.setenv(runtime.ENV_VAR, "torch")
    assert torch.equal(compiled(x), x * 3)
    torch._dynamo.reset()


def test_a_torch_older_than_the_floor_is_named_at_import():
    code = "import torch; torch.__version__ = '2.7.1+cu126'; import liquiddiff"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert run.returncode == 1
    assert "ImportError: liquiddiff needs torch >= 2.8, this environment has torch 2.7.1+cu126" in run.stderr
