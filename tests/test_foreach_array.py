"""``adaptlr.backends.foreach.ForeachArray`` behaves as the concatenation of its tensors."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from adaptlr._inplace import div_  # noqa: E402
from adaptlr.backends.foreach import ForeachArray  # noqa: E402
from adaptlr.backends.foreach import namespace as xf  # noqa: E402


def _pair(seed: int = 0) -> tuple[ForeachArray, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(s, generator=g, dtype=torch.float64) for s in [(3, 2), (4,), ()]]
    return ForeachArray(tensors), torch.cat([t.reshape(-1) for t in tensors])


def _flat(x: ForeachArray) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in x.tensors])


EXPRESSIONS = {
    "affine": lambda a, b, c, xp: 0.9 * a + (1.0 - 0.9) * b,
    "adam": lambda a, b, c, xp: (a * c) / (xp.sqrt(b * b) * c + 1e-8),
    "scalar tensor": lambda a, b, c, xp: a - c + c * b - b / c,
    "reflected": lambda a, b, c, xp: 1.0 - a + 2.0 / (xp.abs(b) + 1.0) - c,
    "where": lambda a, b, c, xp: xp.where(xp.logical_and(a * b > 0, xp.isfinite(a)), a + 0.5, 0.5 * b),
    "max min": lambda a, b, c, xp: xp.maximum(xp.minimum(a, b), -a) ** 2 + xp.sign(b) * xp.exp(-xp.abs(a)),
    "clip": lambda a, b, c, xp: (xp.clip(a, -0.5, 0.7) + xp.clip(b, min=-0.2) - xp.clip(a, max=0.1)
                                 + xp.clip(b, c - 1.0, c)),  # number bounds; 0-D tensor bounds
    "sums": lambda a, b, c, xp: xp.sum(a * b) + xp.max(xp.abs(a)) * xp.sum(b, dtype=torch.float64),
    "in-place division": lambda a, b, c, xp: div_(a * c, xp.abs(b) + 1.0) + div_(a * 2.0, c),
}


@pytest.mark.parametrize("name", list(EXPRESSIONS))
def test_operations_equal_those_on_the_concatenation(name):
    a, a_flat = _pair(0)
    b, b_flat = _pair(1)
    c = torch.tensor(0.3, dtype=torch.float64)
    got = EXPRESSIONS[name](a, b, c, xf)
    expected = EXPRESSIONS[name](a_flat, b_flat, c, xf)
    if isinstance(got, ForeachArray):
        assert [t.shape for t in got.tensors] == [t.shape for t in a.tensors]
        got = _flat(got)
    torch.testing.assert_close(got, expected, rtol=1e-15, atol=0)


def test_reductions_over_an_axis_and_unknown_functions_are_refused():
    a, _ = _pair()
    with pytest.raises(NotImplementedError):
        xf.sum(a, axis=0)
    with pytest.raises(NotImplementedError):
        xf.reshape(a, (-1,))
    with pytest.raises(TypeError):
        bool(a > 0)


def test_clip_with_number_bounds_is_two_calls_for_the_whole_list():
    from adaptlr.backends.bench import count_aten_ops

    a = ForeachArray([torch.randn(5) for _ in range(7)])
    assert count_aten_ops(lambda: xf.clip(a, -0.5, 0.5)) == 2  # _foreach_clamp_min, _foreach_clamp_max


def test_division_writes_into_a_temporary_list():
    """``div_`` on a list the step made: one ``_foreach_div_`` into it (Adam's direction, round 23)."""
    a, _ = _pair(0)
    b, _ = _pair(1)
    for divisor in (b, torch.tensor(0.3, dtype=torch.float64), 0.3):
        temporary = a * 2.0
        expected = _flat(temporary) / (_flat(divisor) if isinstance(divisor, ForeachArray) else divisor)
        result = div_(temporary, divisor)
        assert result is temporary
        torch.testing.assert_close(_flat(result), expected, rtol=0, atol=0)
