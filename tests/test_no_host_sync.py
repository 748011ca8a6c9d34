"""No op waits for the device (issue 18, section 2): on CUDA a host read in an op's hot path (an
``.item()``, a data-dependent output size, a copy of device data to the host) stalls the stream on
every call and makes CUDA-graph capture and ``torch.compile(mode="reduce-overhead")`` fail.

There is no GPU here, so the tests run the CUDA sources through the SIMT emulator (the
``bdlkern_simt`` namespace, whose bindings are the CUDA ones) under the profiler, which records every
ATen call the C++ bindings make, and fail on those that read device data on the host:
``_local_scalar_dense`` (``.item()``, ``bool(t)``), ``nonzero``, ``repeat_interleave`` without an
output size, ``bincount``, ``unique``, ``masked_select``, ``equal``... A first test shows the
detector catches such a read made inside a C++ op (the CPU kernel's finiteness check of a
Concrete-dropout rate, which the CPU keeps on purpose). Every op then runs forward and backward
(through its autograd) with no such call; the CSR ops with ``validate=False``, as the modules call
them after validating their structure once (``validate=True`` reads it on the host by design).
Where a GPU is present, the CUDA tests also run the ops under
``torch.cuda.set_sync_debug_mode("error")`` and CUDA-graph capture (below).
"""

from __future__ import annotations

import pytest
import torch
import bdlkern

#: ATen ops that read device data on the host (a sync on CUDA).
HOST_READS = {
    "_local_scalar_dense", "item", "is_nonzero", "nonzero", "bincount", "unique", "_unique", "_unique2",
    "unique_consecutive", "unique_dim", "masked_select", "equal", "allclose", "_assert_tensor_metadata_sync",
}


def _run(fn) -> list[str]:
    """The host-reading ATen calls (HOST_READS) made while ``fn`` runs, nested ones included: the
    profiler records every dispatcher call, those the C++ bindings make inside an op too (a
    ``TorchDispatchMode`` would see only the outermost call, the custom op itself)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    reads = []
    for event in prof.events():
        name = event.name.removeprefix("aten::")
        if name in HOST_READS:
            reads.append(name)
        elif name == "repeat_interleave" and len(event.input_shapes or []) < 4:
            reads.append(name)
    return reads


def test_the_detector_catches_a_host_read_made_inside_a_cpp_op():
    """The CPU Concrete-dropout binding checks that the rates are finite with ``.all().item()`` (a
    host read the CPU can afford): the detector sees it from inside the C++ op; the CUDA binding
    (run by SIMT) leaves it out."""
    x, p_logit, state = torch.randn(3, 4), torch.zeros(4), torch.tensor([1, 2])
    assert "_local_scalar_dense" in _run(lambda: torch.ops.bdlkern.concrete_dropout(x, p_logit, state, 0.1, -1))
    assert _run(lambda: torch.ops.bdlkern_simt.concrete_dropout(x, p_logit, state, 0.1, -1)) == []
    # and a CSR op's variance check when asked to validate
    crow, col = torch.tensor([0, 2, 3]), torch.tensor([0, 2, 1])
    values = torch.rand(3, 2)
    reads = _run(lambda: torch.ops.bdlkern_simt.sparse_linear_lrt(torch.randn(2, 3), crow, col, values, None, None,
                                                                   state, 2, True))
    assert reads, "validate=True reads the structure on the host"


def _leaf(*shape, positive=False):
    t = torch.rand(*shape) + 0.1 if positive else torch.randn(*shape)
    return t.requires_grad_()


def _backward(outputs):
    """Backward through the op's C++ autograd (the backward ops run inside)."""
    outs = [o for o in (outputs if isinstance(outputs, tuple) else (outputs,)) if o.requires_grad]
    torch.autograd.backward(outs[0], torch.ones_like(outs[0]))


def _cases():
    """(name, a function running one op forward and backward in the simt namespace)."""
    o = torch.ops.bdlkern_simt
    st = torch.tensor([5, 7])
    crow, col = torch.tensor([0, 2, 2, 5, 6]), torch.tensor([0, 3, 1, 2, 5, 4])
    values1, values2 = torch.randn(6), torch.rand(6, 2)
    row_order = torch.tensor([2, 0, 3, 1])
    conv_crow, conv_col = torch.tensor([0, 3, 5]), torch.tensor([0, 4, 17, 2, 8])
    conv_values = torch.rand(5, 2)
    geo = ([3, 3], [1, 1], [1, 1], [1, 1], 1)
    return {
        "philox_bits": lambda: o.philox_bits(st, [9], 0),
        "dropout_mask": lambda: o.dropout_mask(st, [9], 0.3, 1),
        "uniform": lambda: o.uniform(st, [9], 0, None),
        "normal": lambda: o.normal(st, [9], 3, None),
        "mc_dropout_linear": lambda: _backward(o.mc_dropout_linear(_leaf(4, 6), _leaf(5, 6), _leaf(5), st, 0.3, 3, False)),
        "mc_dropout_linear shared mask": lambda: _backward(
            o.mc_dropout_linear(_leaf(4, 6), _leaf(5, 6), None, st, 0.3, 3, True)),
        "mc_dropout_linear materialise": lambda: _backward(
            o.mc_dropout_linear(_leaf(4, 6), _leaf(5, 6), _leaf(5), st, 0.3, 3, False, False)),
        "mc_dropout_linear materialise samples": lambda: _backward(
            o.mc_dropout_linear(_leaf(3, 4, 6), _leaf(5, 6), None, st, 0.3, 3, True, False)),
        "mc_dropout_conv": lambda: _backward(o.mc_dropout_conv(
            _leaf(2, 3, 5, 5), _leaf(4, 3, 3, 3), _leaf(4), st, 0.3, 2, True, [1, 1], [1, 1], [1, 1], 1, False, False)),
        "concrete_dropout": lambda: _backward(o.concrete_dropout(_leaf(4, 6), _leaf(6), st, 0.1, -1)),
        "concrete_dropout channels": lambda: _backward(o.concrete_dropout(_leaf(2, 3, 4), _leaf(3), st, 0.1, 1)),
        "gaussian_dropout": lambda: _backward(o.gaussian_dropout(_leaf(4, 6), _leaf(6), st, -1)),
        "gaussian_dropout channels": lambda: _backward(o.gaussian_dropout(_leaf(2, 3, 4), _leaf(3), st, 1)),
        "ard_kl_with_grad": lambda: _backward(o.ard_kl_with_grad(_leaf(5, 6), _leaf(5, 6))),
        "lrt_linear": lambda: _backward(o.lrt_linear(_leaf(4, 6), _leaf(5, 6), _leaf(5, 6), _leaf(5), st, 3)),
        "lrt_conv": lambda: _backward(o.lrt_conv(
            _leaf(2, 3, 5, 5), _leaf(4, 3, 3, 3), _leaf(4, 3, 3, 3), _leaf(4), st, 2, True, [1, 1], [1, 1], [1, 1], 1)),
        "variance_linear": lambda: _backward(o.variance_linear(_leaf(4, 6), _leaf(5, 6), _leaf(5), st, 3)),
        "variance_conv": lambda: _backward(o.variance_conv(
            _leaf(2, 3, 5, 5), _leaf(4, 3, 3, 3), _leaf(4), st, 2, True, [1, 1], [1, 1], [1, 1], 1)),
        "sparse_vd_kl": lambda: _backward(o.sparse_vd_kl(_leaf(5, 6), _leaf(5, 6))),
        "sparse_vd_kl_with_grad": lambda: _backward(o.sparse_vd_kl_with_grad(_leaf(5, 6), _leaf(5, 6))),
        "sparse_linear": lambda: _backward(o.sparse_linear(_leaf(3, 6), crow, col, values1, None, row_order, False)),
        "sparse_linear_lrt": lambda: _backward(
            o.sparse_linear_lrt(_leaf(3, 6), crow, col, values2, None, row_order, st, 2, False)),
        "sparse_conv": lambda: _backward(o.sparse_conv(_leaf(2, 2, 5, 5), conv_crow, conv_col, conv_values[:, 0].contiguous(),
                                                       None, *geo, False)),
        "sparse_conv_lrt": lambda: _backward(o.sparse_conv_lrt(_leaf(2, 2, 5, 5), conv_crow, conv_col, conv_values, None,
                                                               st, 2, True, *geo, False)),
    }


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_no_op_reads_device_data_on_the_host(name):
    reads = _run(CASES[name])
    assert reads == [], f"{name} reads device data on the host (a CUDA sync): {reads}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("name", ["mc_dropout_linear", "mc_dropout_linear materialise", "lrt_linear", "concrete_dropout", "sparse_linear", "variance_linear"])
def test_cuda_sync_debug_mode_and_graph_capture(name):
    """On a GPU: the op under ``set_sync_debug_mode("error")``, then captured in a CUDA graph and
    replayed, equal to eager."""
    dev = "cuda"
    st = torch.tensor([5, 7], device=dev)
    x = torch.randn(4, 6, device=dev)
    crow, col = torch.tensor([0, 2, 2, 5, 6], device=dev), torch.tensor([0, 3, 1, 2, 5, 4], device=dev)
    calls = {
        "mc_dropout_linear": lambda: torch.ops.bdlkern.mc_dropout_linear(x, w5, None, st, 0.3, 3, False, True),
        "mc_dropout_linear materialise": lambda: torch.ops.bdlkern.mc_dropout_linear(x, w5, None, st, 0.3, 3, False,
                                                                                     False),
        "lrt_linear": lambda: torch.ops.bdlkern.lrt_linear(x, w5, w5, None, st, 3)[0],
        "concrete_dropout": lambda: torch.ops.bdlkern.concrete_dropout(x, torch.zeros(6, device=dev), st, 0.1, -1),
        "sparse_linear": lambda: torch.ops.bdlkern.sparse_linear(x, crow, col, v6, None, None, False),
        "variance_linear": lambda: torch.ops.bdlkern.variance_linear(x, w5, None, st, 3)[0],
    }
    # Operands made once: the calls compare equal only when they draw nothing themselves.
    w5, v6 = torch.randn(5, 6, device=dev), torch.randn(6, device=dev)
    torch.cuda.set_sync_debug_mode("error")
    try:
        eager = calls[name]()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        calls[name]()  # warm-up on the side stream
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        captured = calls[name]()
    graph.replay()
    torch.cuda.synchronize()
    assert captured.shape == eager.shape
    torch.testing.assert_close(captured, eager)


def test_csr_modules_validate_once_and_after_an_in_place_change():
    """``SparseLinear`` validates its structure at construction and load, then calls the ops with
    ``validate=False`` (no host read per call), and validates again after an in-place change of a
    buffer: a malformed structure never reaches a kernel through the module."""
    layer = bdlkern.nn.SparseLinear.from_dense(torch.randn(4, 6) * (torch.rand(4, 6) < 0.5), torch.randn(4),
                                               variance=torch.rand(4, 6))
    x = torch.randn(3, 6)
    layer(x)
    assert _run(lambda: layer(x)) == []
    with bdlkern.sampling(2, seed=0):
        assert _run(lambda: layer(x)) == []
    with torch.no_grad():
        layer.col[0] = 99  # out of range for in_features = 6
    with pytest.raises(RuntimeError, match=r"col\[0\] = 99 is out of range"):
        layer(x)
    state = bdlkern.nn.SparseLinear.from_dense(torch.randn(4, 6)).state_dict()
    state["col"] = state["col"].clone()
    state["col"][0] = -1
    fresh = bdlkern.nn.SparseLinear.from_dense(torch.randn(4, 6))
    with pytest.raises(RuntimeError, match="out of range"):
        fresh.load_state_dict(state)
    conv = bdlkern.nn.SparseConv2d.from_dense(torch.randn(3, 2, 3, 3) * (torch.rand(3, 2, 3, 3) < 0.3),
                                              variance=torch.rand(3, 2, 3, 3))
    xc = torch.randn(2, 2, 6, 6)
    conv(xc)
    assert _run(lambda: conv(xc)) == []
    with bdlkern.sampling(2, seed=0):
        assert _run(lambda: conv(xc)) == []


def _host_reads(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name == "aten::_local_scalar_dense")


@pytest.mark.parametrize("make", [
    lambda: bdlkern.nn.ConcreteDropoutLinear(6, 3),
    lambda: bdlkern.nn.ConcreteDropout2d(torch.nn.Conv2d(2, 3, 3)),
])
def test_concrete_fused_sampling_reads_the_rate_once_per_version(make):
    """The Concrete modules hand their one learnt rate to the MC-dropout ops as a float: a host
    read (a CUDA sync). It is read once per version of p_logit: not again in later sampling calls,
    again after an in-place change (an optimizer step), and the new rate is the one used."""
    layer = make().eval()
    x = torch.randn(4, 6) if isinstance(layer, bdlkern.nn.ConcreteDropoutLinear) else torch.randn(2, 2, 5, 5)

    def sample():
        with bdlkern.sampling(3, seed=0):
            return layer(x)

    assert _host_reads(sample) == 1
    before = sample()
    assert _host_reads(sample) == 0
    with torch.no_grad():
        layer.p_logit.add_(2.0)  # as an optimizer step would
    assert _host_reads(sample) == 1
    after = sample()
    assert not torch.equal(before, after)  # the masks follow the new rate
    with torch.no_grad():
        layer.p_logit.sub_(2.0)
    torch.testing.assert_close(sample(), before)
