"""Shared fixtures: the backends every kernel is tested on.

* ``cpu``  - the C++ CPU kernels (torch.ops.bdlkern on CPU tensors);
* ``simt`` - the CUDA kernel sources run by the SIMT emulator (torch.ops.bdlkern_simt);
* ``cuda`` - the real CUDA kernels, only where a GPU is present (the only allowed skip).
"""

import os

import pytest
import torch

import bdlkern
from bdlkern.testing import simt as _simt

if bdlkern.has_simt():
    _simt.load()  # torch.ops.bdlkern_simt: import bdlkern leaves the test namespace out

BACKENDS = ["cpu", "simt", "cuda"]


class Backend:
    """Op namespace plus the device its tensors live on."""

    def __init__(self, name: str):
        self.name = name
        self.device = torch.device("cuda" if name == "cuda" else "cpu")
        self.ops = torch.ops.bdlkern_simt if name == "simt" else torch.ops.bdlkern

    def tensor(self, *args, **kwargs) -> torch.Tensor:
        return torch.tensor(*args, **kwargs).to(self.device)

    def __repr__(self) -> str:
        return f"Backend({self.name})"


def require_backend(name: str) -> Backend:
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if name == "simt":
        assert bdlkern.has_simt(), "the SIMT test extension bdlkern._C_simt was not built"
    return Backend(name)


@pytest.fixture(params=BACKENDS)
def backend(request) -> Backend:
    return require_backend(request.param)


@pytest.fixture(params=["simt", "cuda"])
def device_backend(request) -> Backend:
    """Backends that run the CUDA kernel source (emulated or real)."""
    return require_backend(request.param)


@pytest.fixture
def threads():
    """Restores torch's intra-op thread count after a test changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ---- hypothesis: the profile of the property-based tests (tests/test_properties_*.py) ------------
# Derandomized (the same examples every run), no deadline (the SIMT emulator is slow and its speed
# varies with the machine's load), no example database, and few examples: each test sets its own
# max_examples to keep the property files together near a minute and a half on two cores. The
# function-scoped `threads` fixture is safe to share between examples (it only restores the thread
# count at the end). HYPOTHESIS_PROFILE picks another registered profile.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "bdlkern",
    derandomize=True,
    deadline=None,
    database=None,
    print_blob=True,
    max_examples=25,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "bdlkern"))
