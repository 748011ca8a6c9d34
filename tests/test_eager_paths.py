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


def test_bad_input_raises_the_same_error_with_and_without_a_state():
    """The eager path is taken only for arguments the general checks would pass: a bad call raises
    the general path's exception whether or not the caller passes rng_state."""
    x, w, b = _problem()
    bad = {
        "1-d weight": dict(x=x, weight=w[0]),
        "width mismatch": dict(x=x, weight=w[:, :5]),
        "num_samples 0": dict(x=x, weight=w, num_samples=0),
    }
    for what, kwargs in bad.items():
        kwargs = {"bias": None, "p": 0.5, "num_samples": 2, **kwargs}
        errors = []
        for state in ({}, {"rng_state": bdlkern.ops.new_rng_state()}):
            try:
                bdlkern.ops.mc_dropout_linear(**kwargs, **state)
            except Exception as e:  # noqa: BLE001 - the type is what is compared
                errors.append((type(e), str(e)))
            else:
                errors.append(None)
        assert errors[0] is not None and errors[0] == errors[1], (what, errors)


def test_non_contiguous_input_matches_its_contiguous_copy():
    x, w, b = _problem()
    x_t = x.t().contiguous().t()  # same values, column-major strides
    assert not x_t.is_contiguous()
    torch.manual_seed(2)
    got = bdlkern.ops.mc_dropout_linear(x_t, w, b, 0.4, 2)
    torch.manual_seed(2)
    want = bdlkern.ops.mc_dropout_linear(x, w, b, 0.4, 2)
    assert torch.equal(got, want)


class _ConvNet(torch.nn.Module):
    """A model the library did not write: conv, pooling, a custom forward with a residual sum, and
    MC-dropout heads on the flattened features."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.head = bdlkern.nn.MCDropoutLinear(4 * 4 * 4, 6, p=0.3)
        self.out = bdlkern.nn.MCDropoutLinear(6, 2, p=0.3)

    def forward(self, img):
        h = torch.relu(self.conv(img)) + img.mean(1, keepdim=True)
        h = torch.nn.functional.max_pool2d(h, 2).flatten(1)
        return self.out(torch.relu(self.head(h)))


def test_training_step_of_a_custom_conv_model_equals_the_general_path():
    """One training step through the eager path, and the same step with every MC layer forced onto
    the general path (a torch-function mode does that, and records that the op ran): same loss and
    gradients to the bit."""
    torch.manual_seed(0)
    model = _ConvNet().train()
    img = torch.randn(5, 3, 8, 8)

    class Through(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if "bdlkern.mc_dropout_linear" in str(func):
                Through.calls += 1
            return func(*args, **(kwargs or {}))

    results = []
    for mode in (None, Through()):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        if mode is None:
            loss = model(img).square().sum()
        else:
            with mode:
                loss = model(img).square().sum()
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    assert Through.calls == 2
    for a, c in zip(*results):
        assert torch.equal(a, c)
