"""``adaptlr._inplace``: arithmetic written into a step's own temporaries never changes a number.

Where the standard allows the in-place operator (same dtype, ``a``'s shape), the helper writes into
``a`` (on a mutable library the result is ``a`` itself); elsewhere (another dtype, a broadcast that
grows ``a``) it computes out of place, with the dtype and shape of the plain operator. Either way
the numbers are bitwise those of ``a ∘ b``.
"""

from __future__ import annotations

import operator
import types

import numpy as np
import pytest

from adaptlr._inplace import add_, add_product_, add_scaled_, div_, mul_, sub_

HELPERS = {"add_": (add_, operator.add), "sub_": (sub_, operator.sub), "mul_": (mul_, operator.mul),
           "div_": (div_, operator.truediv)}
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


FUSED = {  # helper: (call, the unfused expression it stands for)
    "add_scaled_": (lambda a, x, y, c: add_scaled_(a, y, c), lambda a, x, y, c: a + c * y),
    "add_product_": (lambda a, x, y, c: add_product_(a, x, y, c), lambda a, x, y, c: a + (x * y) * c),
}


def _fused_cases(backend, dtype: str):
    rng = np.random.default_rng(11)
    a, x, y = (rng.standard_normal((5, 7)) for _ in range(3))

    def arr(values, dtype):  # a copy: torch.asarray may share a float64 array's memory
        return backend.asarray(np.array(values), dtype)

    return [  # (name, a, x, y, c, written into a)
        ("float c", lambda: arr(a, dtype), arr(x, dtype), arr(y, dtype), 0.1, True),
        ("0-D c of a's dtype", lambda: arr(a, dtype), arr(x, dtype), arr(y, dtype), arr(np.asarray(0.37), dtype), True),
        ("0-D c of a wider dtype", lambda: arr(a, "float32"), arr(x, "float32"), arr(y, "float32"),
         arr(np.asarray(0.37), "float64"), False),
        ("y wider", lambda: arr(a, "float32"), arr(x, "float32"), arr(y, "float64"), 0.1, False),
    ]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("helper", FUSED)
def test_a_fused_helper_is_its_expression_to_an_ulp_and_bitwise_where_unfused(helper, dtype, backend):
    """``a + c·y`` and ``a + (x·y)·c``: the dtype and shape of the plain expression; the numbers
    bitwise those of the expression on every backend without a fused operation, and on torch, whose
    plain tensors take ``add_(alpha=)``/``addcmul_``, within the roundings the two forms may differ
    by (a fused multiply-add rounds once, and ``addcmul_`` multiplies ``c·x`` first):
    ``4ε·(|a| + |c·x·y|)``. Written into ``a`` where the standard
    allows it, as :func:`add_`."""
    fused, plain = FUSED[helper]
    for name, make_a, x, y, c, in_place in _fused_cases(backend, dtype):
        expected = plain(make_a(), x, y, c)
        a = make_a()
        result = fused(a, x, y, c)
        assert result.dtype == expected.dtype and tuple(result.shape) == tuple(expected.shape), name
        got, want = backend.to_numpy(result), backend.to_numpy(expected)
        if backend.library == "torch" and in_place:
            start = backend.to_numpy(make_a())
            bound = 4 * np.finfo(got.dtype).eps * (np.abs(start) + np.abs(want - start))
            assert np.all(np.abs(got - want) <= bound), name
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)
        if backend.library in MUTABLE:
            assert (result is a) == in_place, name


@pytest.mark.parametrize("helper", FUSED)
def test_torch_takes_the_fused_operation_only_for_plain_tensors_without_autograd(helper):
    """On plain tensors: one in-place op (``add_``/``addcmul_``) for a float ``c``; for a 0-D tensor
    ``c`` one ``addcmul_`` (``a + c·y``) or ``x·c`` then ``addcmul_``. A tensor subclass (DTensor's
    case), or operands an autograd tape records, keep the standard operations: ``c·y`` (or ``x·y``,
    ``·c``) into a temporary, then ``+=``."""
    torch = pytest.importorskip("torch")
    from tests.conftest import aten_ops_by_name

    fused, _ = FUSED[helper]
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    fused_ops = {("add_scaled_", "float"): {"add_": 1}, ("add_scaled_", "0-D"): {"addcmul_": 1},
                 ("add_product_", "float"): {"addcmul_": 1}, ("add_product_", "0-D"): {"mul": 1, "addcmul_": 1}}
    for kind, c in (("float", 0.25), ("0-D", torch.tensor(0.25))):
        a = torch.randn(6, 4, generator=g)
        ops = aten_ops_by_name(lambda a=a, c=c: fused(a, x, y, c))
        assert ops == fused_ops[helper, kind], (kind, ops)

    class Subclass(torch.Tensor):
        pass

    unfused = {"add_scaled_": 2, "add_product_": 3}[helper]  # full-size operations, each its own pass
    sub = torch.randn(6, 4, generator=g).as_subclass(Subclass)
    ops = aten_ops_by_name(lambda: fused(sub, x, y, 0.25))
    assert sum(n for name, n in ops.items() if name not in ("detach", "alias")) == unfused, ops
    recorded = torch.randn(6, 4, generator=g).requires_grad_()
    a = torch.randn(6, 4, generator=g)
    ops = aten_ops_by_name(lambda: fused(a, recorded, recorded, 0.25))
    assert "addcmul_" not in ops and ops.get("add_") == 1, ops
    fresh = torch.randn(6, 4, generator=g)
    with torch.no_grad():  # nothing is recorded: fused again
        ops = aten_ops_by_name(lambda: fused(fresh, recorded, recorded, 0.25))
    assert ops == fused_ops[helper, "float"], ops


def test_a_foreach_array_takes_the_fused_forms_with_each_tensors_numbers():
    """The foreach path's lists (``ForeachArray``) take the ``torch._foreach_*`` forms of the fused
    helpers: each tensor's numbers bitwise those of the helper on that tensor alone (so the foreach
    and list paths agree, tests/test_foreach_chunks.py), written into ``a``'s own tensors, and a
    ``lerp`` only for a Python float weight (a 0-D weight: the two-pass form, on every path)."""
    torch = pytest.importorskip("torch")
    from adaptlr._inplace import ema_donated
    from adaptlr.backends.foreach import ForeachArray
    from tests.conftest import aten_ops_by_name

    shapes = [(3, 2), (5,), ()]

    def lists(seed: int) -> list:
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]

    c0 = torch.tensor(0.37, dtype=torch.float64)
    step = types.SimpleNamespace(donated=set())  # the step's Scalars, as far as ema_donated reads them
    calls = {
        "add_scaled_ float": lambda a, x, y: add_scaled_(a, y, 0.3),
        "add_scaled_ 0-D": lambda a, x, y: add_scaled_(a, y, c0),
        "add_product_ float": lambda a, x, y: add_product_(a, x, y, 0.3),
        "add_product_ 0-D": lambda a, x, y: add_product_(a, x, y, c0),
        "ema float": lambda a, x, y: ema_donated(step, x, y, 0.9),
        "ema 0-D": lambda a, x, y: ema_donated(step, x, y, c0, 1.0 - c0),
    }
    for name, call in calls.items():
        a, x, y = ForeachArray(lists(0)), ForeachArray(lists(1)), ForeachArray(lists(2))
        kept = list(a.tensors)
        result: list = []
        ops = aten_ops_by_name(lambda call=call, a=a, x=x, y=y, out=result: out.append(call(a, x, y)))
        if name.startswith("add"):
            assert result[0] is a and all(t is k for t, k in zip(a.tensors, kept)), name
        for i, got in enumerate(result[0].tensors):
            alone = call(lists(0)[i], lists(1)[i], lists(2)[i])
            assert torch.equal(got, alone), (name, i)
        assert ("lerp" in str(ops)) == (name == "ema float"), (name, ops)


def test_a_foreach_array_keeps_a_zero_d_coefficient_in_two_multi_tensor_ops_off_the_cpu():
    """``a + c·y`` with a 0-D tensor ``c`` on the foreach path: on the CPU one ``_foreach_addcmul_``
    (per tensor there, the list path's numbers); on another device (``meta`` stands for a GPU, where
    that form would be one launch per tensor) the standard two multi-tensor ops, ``c·y`` and
    ``+=``; a float ``c`` one ``_foreach_add_`` everywhere."""
    torch = pytest.importorskip("torch")
    from adaptlr.backends.foreach import ForeachArray
    from tests.conftest import aten_ops_by_name

    shapes = [(3, 2), (5,), ()]
    for device, expected in (("cpu", {"_foreach_addcmul_": 1}), ("meta", {"_foreach_mul": 1, "_foreach_add_": 1})):
        a = ForeachArray([torch.zeros(s, device=device) for s in shapes])
        y = ForeachArray([torch.ones(s, device=device) for s in shapes])
        c = torch.zeros((), device=device)
        assert aten_ops_by_name(lambda a=a, y=y, c=c: add_scaled_(a, y, c)) == expected, device
        assert aten_ops_by_name(lambda a=a, y=y: add_scaled_(a, y, 0.5)) == {"_foreach_add_": 1}, device


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


# -- mul_for_sum: a float32 product stored in float64 as it is made (torch, CPU) -------------------


def test_a_product_for_a_wide_sum_is_the_product_stored_wide_on_torch_cpu_and_the_product_elsewhere(backend):
    from adaptlr._inplace import mul_for_sum

    rng = np.random.default_rng(11)
    x, y = (backend.asarray(rng.standard_normal(4096), "float32") for _ in range(2))
    xp = backend.xp
    product = mul_for_sum(x, y, xp.float64)
    expected = backend.to_numpy(x) * backend.to_numpy(y)  # rounded in float32
    widened = backend.library == "torch" and backend.device_name == "cpu"
    assert product.dtype == (xp.float64 if widened else xp.float32)
    np.testing.assert_array_equal(backend.to_numpy(product), expected.astype(np.float64 if widened else np.float32))
    assert float(xp.sum(product, dtype=xp.float64)) == float(xp.sum(x * y, dtype=xp.float64))
    # a temporary x takes the product where it stays narrow (mul_), a float64 x is not widened
    same = mul_for_sum(backend.asarray(expected, "float64"), backend.asarray(expected, "float64"), xp.float64)
    assert same.dtype == xp.float64


def test_the_wide_products_change_no_step_of_the_algorithms_that_sum_them(monkeypatch):
    """HD, EG, Prodigy, D-Adaptation, DoG and DoWG on the torch adapter's blocked path: bitwise the
    steps with float32 products converted by the sums (``torch_fused.mul_widened`` off)."""
    torch = pytest.importorskip("torch")
    import adaptlr
    from adaptlr.backends import torch_fused
    from adaptlr.backends.torch import Optimizer

    makers = {
        "hd": lambda: adaptlr.hypergradient(adaptlr.adamw(1e-2), hyper_lr=1e-3),
        "hd multiplicative": lambda: adaptlr.hypergradient(adaptlr.adam(1e-2), hyper_lr=1e-2, mode="multiplicative"),
        "eg": lambda: adaptlr.eg_step_size(adaptlr.adamw(1e-2), scale_lr=0.1, gain_lr=0.1),
        "prodigy": lambda: adaptlr.prodigy(weight_decay=0.1),
        "dadapt_adam": lambda: adaptlr.dadapt_adam(),
        "dadapt_sgd": lambda: adaptlr.dadapt_sgd(momentum=0.5, weight_decay=0.1),
        "dog": lambda: adaptlr.dog(),
        "dowg": lambda: adaptlr.dowg(),
    }
    widened = []
    original = torch_fused.mul_widened

    def counted(*args):
        product = original(*args)
        widened.append(product is not None)
        return product

    for name, make in makers.items():
        runs = []
        for wide in (False, True):
            monkeypatch.setattr(torch_fused, "mul_widened", counted if wide else (lambda *args: None))
            widened.clear()
            gen = torch.Generator().manual_seed(5)
            params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((5000,), (300,), (2, 3500))]
            opt = Optimizer(params, make(), fast={"block_size": 1024})
            for _ in range(6):
                for p in params:
                    p.grad = torch.randn(p.shape, generator=gen)
                opt.step()
            assert opt.fast_path == "blocked", name
            assert not wide or (widened and all(widened)), name
            runs.append([p.detach().clone() for p in params])
        for a, b in zip(*runs, strict=True):
            assert torch.equal(a, b), name


def test_clip_and_exp_of_a_temporary_are_the_standard_ones_written_into_it_on_torch(backend):
    from adaptlr._inplace import clip_, exp_

    rng = np.random.default_rng(13)
    values = rng.standard_normal(257) * 3
    xp = backend.xp  # (copies: torch.asarray may share a float64 array's memory)
    for dtype in ("float32", "float64"):
        expected_clip = backend.to_numpy(xp.clip(backend.asarray(np.array(values), dtype), -1.0, 1.0))
        expected_exp = backend.to_numpy(xp.exp(backend.asarray(np.array(values), dtype)))
        a = backend.asarray(np.array(values), dtype)
        clipped = clip_(xp, a, -1.0, 1.0)
        np.testing.assert_array_equal(backend.to_numpy(clipped), expected_clip)
        b = backend.asarray(np.array(values), dtype)
        exponentiated = exp_(xp, b)
        np.testing.assert_array_equal(backend.to_numpy(exponentiated), expected_exp)
        assert clipped.dtype == a.dtype and exponentiated.dtype == b.dtype
        if backend.library == "torch":
            assert clipped is a and exponentiated is b
