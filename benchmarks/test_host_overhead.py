"""The host-overhead benchmark runs, and leaves the real launchers and eager path in place."""
from benchmarks import host_overhead as ho


def test_report_runs_and_restores_the_kernels():
    before = {(m, n): getattr(m, n) for m, names in ho.KERNELS.items() for n in names}
    eager = (ho.CFC._EagerCfcRelax.apply, ho.ADALN._EagerAdaLN.apply)
    text = ho.report()
    assert text.count("| cfc_relax |") == 2 and text.count("| adaln_modulate (+residual) |") == 2
    assert all(getattr(m, n) is k for (m, n), k in before.items())
    assert (ho.CFC._EagerCfcRelax.apply, ho.ADALN._EagerAdaLN.apply) == eager
