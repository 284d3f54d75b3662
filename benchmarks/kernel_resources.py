"""Registers and spills of Triton kernels (the depthwise convs, AdaLN) as compiled for an
H100/H200 (sm_90), without a GPU: Triton compiles to a cubin on any machine, and its bundled cuobjdump reads the
resource usage. A kernel that spills (STACK > 0) or needs so many registers that one block fills
an SM is slow whatever its memory access; this catches that before a GPU is at hand.

    python -m benchmarks.kernel_resources

The configurations are the launchers' (kernels/depthwise.py, kernels/adaln.py) at the model's
channel counts, in the dtypes of a bf16-autocast train step.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not for the interpreter

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from liquiddiff.kernels import adaln, depthwise  # noqa: E402

TARGET = ("cuda", 90, 32)  # sm_90, warp size 32
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _signature(pointers: dict[str, str], ints: list[str], consts: dict) -> dict[str, str]:
    sig = dict(pointers)
    sig.update({name: "i32" for name in ints})
    sig.update({name: "constexpr" for name in consts})
    return sig


def configurations(channels: int = 64) -> list[tuple[str, object, dict, dict, int]]:
    """(label, kernel, signature, constexprs, num_warps) as the launchers pick them."""
    out = []
    block_c = depthwise._channel_block(channels)
    for k in (3, 7):
        consts = {"K": k, "FLIP": False, "HAS_BIAS": True, "CONV": tl.bfloat16, "ACC": tl.float32,
                  "ROWS": depthwise._FWD_ROWS, "SLOTS": 1 << (k - 1).bit_length(),
                  "BLOCK_W": depthwise._FWD_BLOCK_W, "BLOCK_C": block_c}
        strides = ["sx_b", "sx_c", "sx_h", "sx_w", "so_b", "so_c", "so_h", "so_w", "sw_c", "sw_h", "sw_w"]
        sig = _signature({"x_ptr": "*fp32", "w_ptr": "*fp32", "bias_ptr": "*fp32", "out_ptr": "*bf16"},
                         ["C", "H", "W", *strides], consts)
        out.append((f"forward {k}x{k} (fp32 input, bf16 conv)", depthwise._dwconv_kernel, sig, consts,
                    depthwise._FWD_WARPS))
        taps = 1 << (k * k - 1).bit_length()
        block_w = max(1, depthwise._WGRAD_ELEMENTS // (taps * block_c))
        consts = {"ROWS": 64, "K": k, "TAPS": taps, "NEED_BIAS": True, "CONV": tl.bfloat16, "ACC": tl.float32,
                  "BLOCK_W": block_w, "BLOCK_C": block_c}
        strides = ["sx_b", "sx_c", "sx_h", "sx_w", "sg_b", "sg_c", "sg_h", "sg_w"]
        sig = _signature({"x_ptr": "*bf16", "go_ptr": "*bf16", "part_ptr": "*fp32"}, ["B", "C", "H", "W", *strides], consts)
        out.append((f"weight grad {k}x{k} (W run {block_w})", depthwise._dwconv_wgrad_kernel, sig, consts,
                    depthwise._WGRAD_WARPS))
    return out


def adaln_configurations(pixels: int = 256 * 256) -> list[tuple[str, object, dict, dict, int]]:
    """The AdaLN with a residual, as the block's second norm calls it: bf16 x and scale/shift,
    the fp32 residual stream, fp32 out, s and statistics."""
    out = []
    for channels in (64, 256):
        block_c, block_p, warps = adaln.launch_config(channels, pixels)
        consts = {"HAS_RESIDUAL": True, "COMPUTE": tl.float32, "BLOCK_C": block_c, "BLOCK_P": block_p}
        strides = [f"s{t}_{a}" for t in ("x", "r", "o", "s") for a in "bcp"] + ["sscale_b", "sscale_c", "sshift_b", "sshift_c"]
        sig = _signature({"x_ptr": "*bf16", "res_ptr": "*fp32", "scale_ptr": "*bf16", "shift_ptr": "*bf16",
                          "out_ptr": "*fp32", "s_ptr": "*fp32", "mean_ptr": "*fp32", "rstd_ptr": "*fp32"},
                         ["C", "P"], {})
        sig["eps"] = "fp32"
        sig.update(_signature({}, strides, consts))
        out.append((f"AdaLN forward C={channels} ({block_c}x{block_p})", adaln._adaln_fwd_kernel, sig, consts, warps))
        consts = {"HAS_GRAD_S": True, "WRITE_DS": True, "WRITE_DS2": True, "PARAM_GRADS": True,
                  "COMPUTE": tl.float32, "BLOCK_C": block_c, "BLOCK_P": block_p}
        strides = [f"s{t}_{a}" for t in ("g", "gs", "s", "d", "d2") for a in "bcp"] + ["sscale_b", "sscale_c"]
        sig = _signature({"g_ptr": "*fp32", "gs_ptr": "*fp32", "s_ptr": "*fp32", "scale_ptr": "*bf16",
                          "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "ds_ptr": "*fp32", "ds2_ptr": "*bf16",
                          "dscale_part_ptr": "*fp32", "dshift_part_ptr": "*fp32"}, ["B", "C", "P", *strides], consts)
        out.append((f"AdaLN backward C={channels} ({block_c}x{block_p})", adaln._adaln_bwd_kernel, sig, consts, warps))
    return out


def resources(kernel, signature: dict, constexprs: dict, num_warps: int) -> dict[str, int]:
    """{'registers', 'stack', 'shared'} of the sm_90 cubin."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget(*TARGET), options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    found = dict(re.findall(r"(REG|STACK|SHARED):(\d+)", text))
    return {"registers": int(found["REG"]), "stack": int(found["STACK"]), "shared": int(found["SHARED"])}


def main() -> int:
    print(f"sm_{TARGET[1]}, Triton {triton.__version__}: registers per thread, spill stack bytes, shared bytes")
    for label, kernel, sig, consts, warps in configurations() + adaln_configurations():
        r = resources(kernel, sig, consts, warps)
        blocks = 65536 // (r["registers"] * 32 * warps)
        print(f"{label:<40} {warps} warps: {r['registers']:>3} registers, stack {r['stack']}, "
              f"shared {r['shared']}, {blocks} block(s) per SM by registers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
