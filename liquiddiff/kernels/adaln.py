"""Placeholder until the fused AdaLN kernel lands: delegates to the reference."""
from liquiddiff import functional


def adaln_modulate(x, scale, shift, eps=1e-6, residual=None):
    return functional.adaln_modulate(x, scale, shift, eps=eps, residual=residual)
