"""The ODE samplers as integrators: where they step, and how fast their error falls."""
import math
import weakref

import pytest
import torch

from liquiddiff.sampling import integrate


def _linear_field(z, t):
    """dz/dt = t z: from z(1) the exact z(0) is z(1) exp(-1/2)."""
    return t[:, None] * z


@pytest.mark.parametrize("sampler, order", [("euler", 1), ("heun", 2)])
def test_error_falls_with_the_samplers_order(sampler, order):
    z1 = torch.randn(3, 4, dtype=torch.float64)
    exact = z1 * math.exp(-0.5)
    errors = [(integrate(_linear_field, z1, n, sampler) - exact).abs().max().item() for n in (16, 32, 64)]
    for coarse, fine in zip(errors, errors[1:]):
        assert coarse / fine == pytest.approx(2 ** order, rel=0.1), errors


def test_the_model_is_asked_at_the_seeds_times_in_the_models_precision():
    """Euler at t = i / N for i = N..1 (the seed's loop); an fp64 z gets fp64 times, an fp32 z fp32."""
    for dtype in (torch.float64, torch.float32):
        asked = []

        def velocity(z, t):
            asked.append(t)
            return torch.ones_like(z)

        out = integrate(velocity, torch.zeros(2, 1, dtype=dtype), 3)
        assert [t.dtype for t in asked] == [dtype] * 3
        for t, i in zip(asked, (3, 2, 1), strict=True):
            assert torch.equal(t, torch.full((2,), i / 3, dtype=dtype))
        torch.testing.assert_close(out, torch.full((2, 1), -1.0, dtype=dtype))  # three steps of -1/3


@pytest.mark.parametrize("sampler, times", [("euler", [3, 2, 1]), ("heun", [3, 2, 2, 1, 1])])
def test_heun_corrects_at_the_steps_end_but_the_last_step_stays_euler(sampler, times):
    """Heun asks each step's slope at its start and (corrector) at its end, i / N then (i - 1) / N,
    but never at t = 0: the last step is Euler's, as in EDM (2N - 1 model calls); ``progress``
    is called once per step either way."""
    asked, steps = [], []

    def velocity(z, t):
        asked.append(t[0].item())
        return torch.ones_like(z)

    out = integrate(velocity, torch.zeros(2, 1, dtype=torch.float64), 3, sampler, progress=lambda: steps.append(1))
    assert asked == pytest.approx([i / 3 for i in times])
    assert len(steps) == 3
    torch.testing.assert_close(out, torch.full((2, 1), -1.0, dtype=torch.float64))


def test_a_kept_graph_is_captured_once_per_key(monkeypatch):
    """KeptGraph captures at the first call for a key, replays the same capture for an equal key,
    and drops the old capture before taking a new one for another key (or on clear)."""
    from liquiddiff import sampling

    captures, alive = [], []

    def capture(velocity, z):
        assert not alive, "the old graph must be dropped before the next capture"
        captures.append(z.shape)
        alive.append(True)
        replay = lambda z_t, t: velocity(z_t, t)  # noqa: E731
        weakref.finalize(replay, alive.pop)
        return replay

    monkeypatch.setattr(sampling, "cuda_graphed", capture)
    kept, velocity, z = sampling.KeptGraph(), (lambda z_t, t: z_t * 2), torch.randn(2, 3)
    first = kept("a", velocity, z)
    assert kept("a", velocity, z) is first and len(captures) == 1
    del first
    assert torch.equal(kept("b", velocity, z)(z, None), z * 2) and len(captures) == 2
    kept.clear()
    assert not alive
    kept("b", velocity, z)
    assert len(captures) == 3
