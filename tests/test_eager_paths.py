"""The eager entry of ``bdlkern.ops.mc_dropout_linear`` (``_C._mc_dropout_linear_eager``): for a plain
``[B, in]`` CPU input with a fresh state the wrapper calls the op unboxed instead of through
``torch.ops``. It must be the same op: same bits and gradients as the general path with the same
seed, and it must step aside whenever something has to see ``torch.ops`` (torch.compile, a
``__torch_function__`` mode or tensor subclass)."""

import torch
from torch.overrides import TorchFunctionMode

import bdlkern


def _problem():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 7, generator=g)
    w = torch.randn(4, 7, generator=g)
    b = torch.randn(4, generator=g)
    return x, w, b


def test_same_bits_and_gradients_as_the_general_path():
    x, w, b = _problem()
    outs = []
    for explicit in (False, True):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        torch.manual_seed(11)
        state = {"rng_state": bdlkern.ops.new_rng_state()} if explicit else {}
        y = bdlkern.ops.mc_dropout_linear(xs, ws, bs, 0.3, 3, **state)
        y.backward(torch.ones_like(y))
        outs.append((y.detach(), xs.grad, ws.grad, bs.grad))
    for a, c in zip(*outs):
        assert torch.equal(a, c)


def test_a_torch_function_mode_sees_the_op():
    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    x, w, b = _problem()
    with Record():
        y = bdlkern.ops.mc_dropout_linear(x, w, b, 0.5, 2)
    assert y.shape == (2, 5, 4)
    assert "bdlkern.mc_dropout_linear.default" in seen


def test_a_tensor_subclass_keeps_its_torch_function():
    calls = []

    class Tagged(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            calls.append(str(func))
            return super().__torch_function__(func, types, args, kwargs or {})

    x, w, b = _problem()
    bdlkern.ops.mc_dropout_linear(x.as_subclass(Tagged), w, b, 0.5, 2)
    assert "bdlkern.mc_dropout_linear.default" in calls


def test_compile_fullgraph_without_a_state_takes_the_traceable_path():
    x, w, b = _problem()

    @torch.compile(fullgraph=True, backend="eager")
    def f(x):
        return bdlkern.ops.mc_dropout_linear(x, w, b, 0.5, 2)

    torch.manual_seed(5)
    compiled = f(x)
    torch.manual_seed(5)
    eager = bdlkern.ops.mc_dropout_linear(x, w, b, 0.5, 2)
    # The traced draw (torch.randint) and the eager one consume the generator alike: same masks.
    assert torch.equal(compiled, eager)
