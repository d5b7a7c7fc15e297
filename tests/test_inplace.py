"""``adaptlr._inplace``: arithmetic written into a step's own temporaries never changes a number.

Where the standard allows the in-place operator (same dtype, ``a``'s shape), the helper writes into
``a`` (on a mutable library the result is ``a`` itself); elsewhere (another dtype, a broadcast that
grows ``a``) it computes out of place, with the dtype and shape of the plain operator. Either way
the numbers are bitwise those of ``a ∘ b``.
"""

from __future__ import annotations

import operator

import numpy as np
import pytest

from adaptlr._inplace import add_, mul_, sub_

HELPERS = {"add_": (add_, operator.add), "sub_": (sub_, operator.sub), "mul_": (mul_, operator.mul)}
MUTABLE = ("numpy", "torch", "cupy", "array_api_strict")


def _cases(backend):
    rng = np.random.default_rng(7)
    a = rng.standard_normal((3, 4))
    b = rng.standard_normal((3, 4))
    f32 = backend.asarray
    return [  # (a, b, written in place)
        ("same dtype and shape", lambda: f32(a, "float32"), lambda: f32(b, "float32"), True),
        ("python float", lambda: f32(a, "float32"), lambda: 0.3, True),
        ("0-D of a's dtype", lambda: f32(a, "float32"), lambda: f32(np.asarray(1.7), "float32"), True),
        ("0-D of a wider dtype", lambda: f32(a, "float32"), lambda: f32(np.asarray(1.7), "float64"), False),
        ("wider array", lambda: f32(a, "float32"), lambda: f32(b, "float64"), False),
        ("a broadcast up", lambda: f32(a[:, :1], "float32"), lambda: f32(b, "float32"), False),
        ("a 0-D", lambda: f32(np.asarray(0.5), "float32"), lambda: f32(b, "float32"), False),
    ]


@pytest.mark.parametrize("helper", HELPERS)
def test_a_helper_computes_the_operator_and_writes_into_a_only_where_the_standard_allows(helper, backend):
    inplace, plain = HELPERS[helper]
    for name, make_a, make_b, in_place in _cases(backend):
        expected = plain(make_a(), make_b())
        a = make_a()
        result = inplace(a, make_b())
        assert result.dtype == expected.dtype and tuple(result.shape) == tuple(expected.shape), name
        np.testing.assert_array_equal(backend.to_numpy(result), backend.to_numpy(expected), err_msg=name)
        if backend.library in MUTABLE:
            assert (result is a) == in_place, name


def test_a_foreach_array_is_written_in_place_by_one_op_per_operation():
    """The foreach path's list arrays (``adaptlr.backends.foreach``): ``+=``, ``-=``, ``*=`` with a
    list, a number or a 0-D tensor of their dtype are one in-place ``_foreach`` op on the same
    tensors; with a 0-D tensor of another dtype, the out-of-place operator."""
    torch = pytest.importorskip("torch")
    from adaptlr.backends.foreach import ForeachArray
    from tests.conftest import aten_ops_by_name

    def make(seed: int) -> ForeachArray:
        g = torch.Generator().manual_seed(seed)
        return ForeachArray([torch.randn(s, generator=g) for s in [(3, 2), (4,), ()]])

    others = {"list": lambda: make(1), "number": lambda: 0.3, "0-D": lambda: torch.tensor(1.5)}
    for helper, (inplace, plain) in HELPERS.items():
        for name, other in others.items():
            expected = plain(make(0), other())
            a, b = make(0), other()
            kept = list(a.tensors)
            ops = aten_ops_by_name(lambda a=a, b=b, f=inplace: f(a, b))
            assert sum(ops.values()) == 1 and all(n.endswith("_") for n in ops), (helper, name, ops)
            assert all(x is y for x, y in zip(a.tensors, kept)), (helper, name)
            for x, y in zip(a.tensors, expected.tensors):
                torch.testing.assert_close(x, y, rtol=0, atol=0)
        wider = torch.tensor(1.5, dtype=torch.float64)
        a = make(0)
        result = inplace(a, wider)
        assert result is not a and result.dtype == torch.float32, helper
        for x, y in zip(result.tensors, plain(make(0), wider).tensors):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("make", ["adamw", "eg", "adabelief"])
def test_a_step_differentiated_by_torch_autograd_is_the_out_of_place_one(make, monkeypatch):
    """Under torch's autograd (params that require grad, no ``no_grad``), the helpers leave the
    recorded temporaries alone: ``backward`` through two functional steps works and gives the
    gradient of the out-of-place steps (``sqrt`` and ``exp`` keep their results for it)."""
    torch = pytest.importorskip("torch")
    import adaptlr
    import adaptlr._inplace

    build = {"adamw": lambda: adaptlr.adamw(1e-2, weight_decay=0.1),
             "eg": lambda: adaptlr.eg_step_size(adaptlr.adamw(1e-2), 1e-2, 1e-2),
             "adabelief": lambda: adaptlr.adabelief(1e-2, weight_decay=0.1)}[make]

    def gradient() -> torch.Tensor:
        start = torch.linspace(-1.0, 2.0, 12, dtype=torch.float64).reshape(3, 4).requires_grad_()
        opt, params = build(), [start]
        state = opt.init([start.detach()])
        for _ in range(2):
            grads = [2.0 * params[0] + 0.5]  # f = Σ θ² + θ/2: the gradient depends on θ
            updates, state = opt.update(grads, state, params)
            params = adaptlr.apply_updates(params, updates)
        (params[0] ** 2).sum().backward()
        return start.grad

    in_place = gradient()
    monkeypatch.setattr(adaptlr._inplace, "_fits", lambda a, b: False)
    torch.testing.assert_close(in_place, gradient(), rtol=0, atol=0)
