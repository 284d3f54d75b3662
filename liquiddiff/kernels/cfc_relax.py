"""Placeholder until the fused CfC kernel lands: delegates to the reference."""
from liquiddiff import functional


def cfc_relax(f, g, h, x, a, b, rho, t, residual=None):
    return functional.cfc_relax(f, g, h, x, a, b, rho, t, residual=residual)
