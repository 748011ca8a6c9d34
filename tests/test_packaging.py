"""What a release build ships and how it loads: no debug information, exactly one OpenMP runtime
(torch's) once bdlkern's OpenMP kernels have run, and a clear ImportError for a torch of another
major.minor than the build's."""

import os
import re
import struct
import subprocess
import sys
import textwrap

import pytest
import torch

import bdlkern

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
        cwd=ROOT,
    )


OPENMP_RUNTIMES = r"/(libgomp|libiomp5|libomp)[^/]*\.so[^/]*$"

LOADED_OPENMP = textwrap.dedent(f"""
    import re
    def openmp_runtimes():
        return sorted({{line.split()[-1] for line in open("/proc/self/maps")
                        if re.search({OPENMP_RUNTIMES!r}, line.split()[-1])}})
""")


def test_one_openmp_runtime_torchs_own():
    """bdlkern's .so files name libgomp.so.1 by soname; torch (imported first by bdlkern) loads its
    own copy, and the loader reuses it. After every OpenMP kernel family has run, the process holds
    exactly the runtimes a torch-only process holds after an OpenMP op: one, torch's."""
    torch_only = run_python(
        LOADED_OPENMP
        + textwrap.dedent("""
        import torch
        torch.randn(256, 256) @ torch.randn(256, 256)
        torch.randn(1 << 20).exp()
        print(openmp_runtimes())
        """)
    )
    assert torch_only.returncode == 0, torch_only.stderr
    with_bdlkern = run_python(
        LOADED_OPENMP
        + textwrap.dedent("""
        import torch, bdlkern
        from bdlkern import ops
        torch.set_num_threads(2)
        x, w = torch.randn(64, 256), torch.randn(128, 256)
        ops.dropout_mask([1 << 22], 0.5)
        ops.normal([1 << 20])
        ops.mc_dropout_linear(x, w, None, 0.5, 4, shared_mask=True).sum()
        ops.concrete_dropout(torch.randn(512, 1024), torch.tensor(0.0))
        ops.sparse_vd_kl(torch.randn(512, 512), torch.randn(512, 512))
        ops.ard_kl(torch.randn(512, 512), torch.randn(512, 512))
        ops.lrt_linear(x, w, torch.randn(128, 256), num_samples=4)
        m = bdlkern.nn.SparseLinear.from_dense(w * (torch.rand_like(w) < 0.03))
        m(torch.randn(256, 256))
        print(openmp_runtimes())
        """)
    )
    assert with_bdlkern.returncode == 0, with_bdlkern.stderr
    runtimes = eval(with_bdlkern.stdout.strip().splitlines()[-1])
    assert runtimes == eval(torch_only.stdout.strip().splitlines()[-1])
    assert len(runtimes) == 1, runtimes
    if torch.backends.openmp.is_available():
        torch_lib = os.path.realpath(os.path.join(os.path.dirname(torch.__file__), "lib"))
        assert os.path.realpath(runtimes[0]).startswith(torch_lib), runtimes


def test_import_with_another_torch_major_minor_names_both_versions():
    built = bdlkern._build.TORCH_VERSION
    major, minor = (int(v) for v in built.split(".")[:2])
    other = f"{major}.{minor + 1}.0"
    proc = run_python(
        f"""
        import torch
        torch.__version__ = {other!r}
        import bdlkern
        """
    )
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr
    assert f"built against torch {built}" in proc.stderr and f"torch {other} is installed" in proc.stderr
    # A patch release of the same major.minor loads.
    same = run_python(f"import torch; torch.__version__ = '{major}.{minor}.99'; import bdlkern; print('ok')")
    assert same.returncode == 0 and same.stdout.strip() == "ok", same.stderr


def elf_section_names(path: str) -> list[str]:
    """The section names of a 64-bit little-endian ELF file (enough of the format to list them)."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "not a 64-bit little-endian ELF"
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab_off = headers[shstrndx][4]
    names = []
    for h in headers:
        start = strtab_off + h[0]
        names.append(data[start : data.index(b"\0", start)].decode())
    return names


def test_release_build_carries_no_debug_information():
    """setup.py compiles with -g0 unless BDLKERN_DEBUG=1 or a sanitizer build asks for -g (debug
    info made _C 17x larger); build_info() says which, and the ELF sections must agree. The
    Makefile's build (what the test suite runs on) is a release build."""
    sections = elf_section_names(bdlkern._C.__file__)
    assert ".text" in sections and ".dynsym" in sections  # the parser read a real table
    debug_sections = [s for s in sections if s.startswith((".debug_", ".zdebug"))]
    assert bool(debug_sections) == bdlkern.build_info()["debug_info"], debug_sections
    if os.environ.get("BDLKERN_DEBUG") != "1":
        assert not debug_sections, debug_sections


def test_the_test_extension_is_a_separate_opt_in_library():
    """_C_simt is its own extension (BDLKERN_SIMT=1, which the Makefile's build sets) that only
    bdlkern.testing.simt.load() loads: _C holds no bdlkern_simt op (not even the self-tests' CUDA
    kernels, which live in _C_simt_cuda), and import bdlkern registers none."""
    out = run_python(
        """
        import torch, bdlkern
        def simt_ops():
            return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("bdlkern_simt::"))
        print(bdlkern.has_simt(), len(simt_ops()))
        import bdlkern.testing.simt
        bdlkern.testing.simt.load()
        print(len(simt_ops()) > 0, hasattr(torch.ops.bdlkern_simt, "mc_dropout_linear"))
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "0", "True", "True"], out.stdout


def test_metadata_requires_only_torch_of_the_build_and_numpy():
    """A library user's `pip install` must not pull in the demo's or the tests' dependencies."""
    from importlib import metadata

    requires = metadata.requires("bdlkern") or []
    core = sorted(r for r in requires if "extra ==" not in r)
    major_minor = ".".join(bdlkern._build.TORCH_VERSION.split(".")[:2])
    assert core == sorted([f"torch=={major_minor}.*", "numpy"]), requires
    extras = set(metadata.metadata("bdlkern").get_all("Provides-Extra") or [])
    assert {"demo", "bench", "onnx", "test"} <= extras


def test_version_is_single_sourced():
    from importlib import metadata

    assert bdlkern.__version__ == bdlkern._C.build_info()["version"] == metadata.version("bdlkern")


def test_production_never_imports_the_test_oracle():
    """import bdlkern and a use of every nn module (train, eval, sampling, pruning) leave
    bdlkern.testing out of sys.modules; bdlkern.reference still reaches the oracle on access."""
    proc = run_python(
        """
        import sys, torch, bdlkern
        from torch import nn
        x = torch.randn(4, 6)
        vd = bdlkern.nn.SparseVDLinear(6, 3)
        mods = [bdlkern.nn.MCDropoutLinear(6, 3), bdlkern.nn.ConcreteDropoutLinear(6, 3),
                bdlkern.nn.ConcreteDropout(nn.Linear(6, 3)), vd, vd.to_sparse()]
        for m in mods:
            for train in (True, False):
                m.train(train)
                m(x).sum()
            with bdlkern.sampling(2, seed=0):
                m(x)
        mods[-1].to_dense()
        conv = bdlkern.nn.ConcreteDropout2d(nn.Conv2d(3, 2, 3))
        conv(torch.randn(1, 3, 5, 5))
        bdlkern.uncertainty.mc_predict(nn.Sequential(mods[0]), x, num_samples=2, seed=0)
        simt_ops = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("bdlkern_simt::")]
        print("bdlkern.testing" in sys.modules, "bdlkern.testing.reference" in sys.modules,
              "bdlkern._C_simt" in sys.modules, len(simt_ops))
        print(bdlkern.reference.__name__)
        """
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("\n")
    assert lines[0].split() == ["False", "False", "False", "0"], proc.stdout
    assert lines[1] == "bdlkern.testing.reference"
