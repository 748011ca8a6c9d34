"""Build bdlkern's two extensions with torch's BuildExtension (ninja).

* ``bdlkern._C``: the operator library. C++ CPU kernels always; the CUDA kernels (every
  ``csrc/kernels/cuda/*.cu``) when torch was built with CUDA and a toolkit of the same major version is
  found. ``BDLKERN_CUDA=0`` forces a CPU-only build, ``BDLKERN_CUDA=1`` makes a missing toolkit an
  error. ``TORCH_CUDA_ARCH_LIST`` is honoured (default ``8.0;8.6;8.9;9.0+PTX``).
* ``bdlkern._C_simt``: the same ``.cu`` kernel sources compiled by the host compiler against the
  SIMT emulation header (``csrc/include/bdlkern/common/simt.h``), registered as ``torch.ops.bdlkern_simt``
  on CPU tensors. It only needs CUDA's host-compilable headers (``cuda_fp16.h``, ...), taken from
  the toolkit or from the ``nvidia`` wheel that a CUDA build of torch installs. Built only with
  ``BDLKERN_SIMT=1`` (the Makefile's development build sets it): a release build or wheel leaves
  this test-only extension out.

Release builds carry no debug information (``-g0``, no ``-lineinfo``): ``BDLKERN_DEBUG=1`` gives
``-O0 -g``, ``BDLKERN_LINEINFO=1`` keeps CUDA line tables for profilers. The build also writes
``bdlkern/_build.py`` with the torch version it compiled against, so that importing bdlkern with a
torch of another major.minor raises a clear ImportError instead of an undefined-symbol error.

Other knobs: ``MAX_JOBS`` (ninja parallelism), ``BDLKERN_DEBUG=1`` (-O0 -g),
``BDLKERN_SANITIZE=address,undefined`` or ``thread`` (sanitizer flags for the host-compiled code, at
-O1; objects go to their own ``build/temp-<sanitizers>`` so the normal build is kept),
``BDLKERN_MAIN=0`` (skip ``bdlkern._C``: the ThreadSanitizer build instruments only the SIMT
extension, see ``tools/sanitize.sh``).
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(ROOT, "bdlkern", "_version.py")) as _f:
    VERSION = re.search(r'^__version__ = "([^"]+)"$', _f.read(), re.M).group(1)
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def _env_flag(name):
    """None when unset, else True/False from 1/0 (also on/off, true/false)."""
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    value = value.strip().lower()
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    raise SystemExit(f"setup.py: {name} must be 0 or 1, got {value!r}")


def _toolkit_major(root):
    """CUDA major version of the toolkit at `root`, or None if it is not a usable toolkit."""
    nvcc = os.path.join(root, "bin", "nvcc")
    if not (os.path.isfile(nvcc) and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h"))):
        return None
    if not os.path.isdir(os.path.join(root, "lib64")) and not os.path.isdir(os.path.join(root, "lib")):
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return int(match.group(1)) if match else None


def _toolkit_candidates():
    """Places a CUDA toolkit root may be, most explicit first."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            yield os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        # `nvcc` on PATH may be a wrapper script outside the toolkit; ask nvcc where it lives.
        try:
            dry = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True, timeout=60)
            match = re.search(r"TOP=(\S+)", dry.stdout + dry.stderr)
            if match:
                yield os.path.normpath(match.group(1))
        except (OSError, subprocess.SubprocessError):
            pass
        yield os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    yield "/usr/local/cuda"
    yield from sorted(glob.glob("/usr/local/cuda-*"), reverse=True)


def find_cuda_home(torch_cuda):
    """Toolkit root whose major version matches torch's CUDA, or None."""
    if not torch_cuda:
        return None
    want = int(torch_cuda.split(".")[0])
    seen = set()
    for root in _toolkit_candidates():
        root = os.path.realpath(root)
        if root in seen:
            continue
        seen.add(root)
        if _toolkit_major(root) == want:
            return root
    return None


def cuda_header_dir(cuda_home):
    """A directory with cuda_fp16.h / cuda_bf16.h / vector_types.h for the SIMT build."""
    candidates = []
    if cuda_home:
        candidates.append(os.path.join(cuda_home, "include"))
    try:
        import nvidia  # the CUDA runtime wheel a CUDA build of torch depends on

        for base in nvidia.__path__:
            candidates += sorted(glob.glob(os.path.join(base, "cu*", "include")), reverse=True)
            candidates.append(os.path.join(base, "cuda_runtime", "include"))
    except ImportError:
        pass
    candidates += ["/usr/local/cuda/include"]
    # crt/host_defines.h too: the nvidia/cu13 wheel ships vector_types.h, which includes it, without
    # the crt/ directory, so checking only the top-level headers picks a folder that cannot compile.
    needed = ("cuda_fp16.h", "cuda_bf16.h", "vector_types.h", os.path.join("crt", "host_defines.h"))
    for inc in candidates:
        if all(os.path.isfile(os.path.join(inc, h)) for h in needed):
            return inc
    return None


# ---- decide what to build (before torch.utils.cpp_extension reads CUDA_HOME at import) -------------
import torch  # noqa: E402

want_cuda = _env_flag("BDLKERN_CUDA")
want_simt = _env_flag("BDLKERN_SIMT")
want_main = _env_flag("BDLKERN_MAIN") is not False
cuda_home = None
if want_cuda is not False:
    cuda_home = find_cuda_home(torch.version.cuda)
    if cuda_home is None and want_cuda:
        raise SystemExit(
            "setup.py: BDLKERN_CUDA=1 but no CUDA toolkit matching torch's CUDA "
            f"{torch.version.cuda!r} was found (set CUDA_HOME to the root holding bin/nvcc)"
        )
with_cuda = cuda_home is not None
if with_cuda:
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)

from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

debug = _env_flag("BDLKERN_DEBUG")
lineinfo = _env_flag("BDLKERN_LINEINFO") or debug
sanitize = os.environ.get("BDLKERN_SANITIZE", "").strip()
if sanitize and not re.fullmatch(r"[a-z]+(,[a-z]+)*", sanitize):
    raise SystemExit(f"setup.py: BDLKERN_SANITIZE must be a comma-separated list like 'address,undefined', got {sanitize!r}")
# Sanitizer builds at -O1: fast enough to run the op tests, precise enough for the reports.
# Python's CFLAGS carry -g; a release build overrides it (debug info made _C 17x larger).
opt = ["-O0", "-g"] if debug else ["-O1"] if sanitize else ["-O3", "-g0"]
cxx_flags = ["-std=c++20", *opt, "-Wall", "-Wextra", "-Wno-unused-parameter", "-fvisibility=hidden"]
link_flags = []
# at::parallel_for is a header template: with torch's OpenMP backend it is an `omp parallel`
# region compiled into *our* objects, which without -fopenmp silently runs on one thread.
if torch.backends.openmp.is_available():
    cxx_flags.append("-fopenmp")
    link_flags.append("-fopenmp")
if sanitize:
    cxx_flags += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-g"]
    if "undefined" in sanitize.split(","):
        # The first UBSan report aborts the run, so no report can go unnoticed in a passing log.
        cxx_flags.append("-fno-sanitize-recover=undefined")
    link_flags += [f"-fsanitize={sanitize}"]

include_dirs = [os.path.join(ROOT, "csrc", "include")]


def rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


cu_sources = rel("csrc/kernels/cuda/*.cu")
# Every CUDA source must have its SIMT twin, or the emulator tests would silently skip it.
for cu in cu_sources:
    twin = os.path.join("csrc", "testing", "simt", os.path.basename(cu)[: -len(".cu")] + ".cpp")
    if not os.path.isfile(os.path.join(ROOT, twin)):
        raise SystemExit(f"setup.py: {cu} has no SIMT twin {twin} (#include it under simt.h)")

main_sources = [
    "csrc/torch/module.cpp", "csrc/torch/schemas.cpp", "csrc/torch/register_cpu.cpp", "csrc/torch/autograd.cpp",
    "csrc/torch/mc_dropout_cpu.cpp", *rel("csrc/kernels/cpu/*.cpp")
]
arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""
defines = [
    ("BDLKERN_VERSION", f'"{VERSION}"'),
    ("BDLKERN_CUDA_ARCHS", f'"{arch_list}"'),
    # reported by build_info(): debug and sanitizer builds compile with -g, release builds with -g0
    ("BDLKERN_DEBUG_INFO", "1" if debug or sanitize else "0"),
]

ext_modules = []
if not want_main:
    pass
elif with_cuda:
    ext_modules.append(
        CUDAExtension(
            "bdlkern._C",
            main_sources + ["csrc/torch/register_cuda.cpp", *cu_sources],
            include_dirs=include_dirs,
            define_macros=defines + [("BDLKERN_WITH_CUDA", "1")],
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-std=c++20", "-O3" if not debug else "-O0", "--expt-relaxed-constexpr"]
                + (["-lineinfo"] if lineinfo else []),
            },
            extra_link_args=link_flags,
        )
    )
else:
    ext_modules.append(
        CppExtension(
            "bdlkern._C",
            main_sources,
            include_dirs=include_dirs,
            define_macros=defines,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    )

simt_headers = cuda_header_dir(cuda_home) if want_simt else None
if want_simt and simt_headers is None:
    raise SystemExit("setup.py: BDLKERN_SIMT=1 but no cuda_fp16.h/cuda_bf16.h headers were found")
if simt_headers is not None:
    ext_modules.append(
        CppExtension(
            "bdlkern._C_simt",
            # + the host-side helpers the bindings of every backend share (CSR validation, with the
            # run-time SIMD choice it uses)
            [*rel("csrc/testing/simt/*.cpp"), "csrc/testing/register_simt.cpp", "csrc/testing/autograd_simt.cpp",
             "csrc/testing/module_simt.cpp", "csrc/kernels/cpu/sparse_linear_check.cpp",
             "csrc/kernels/cpu/philox_simd.cpp"],
            include_dirs=include_dirs + [simt_headers],
            define_macros=[("BDLKERN_SIMT", "1")],
            extra_compile_args={"cxx": cxx_flags + ["-pthread"]},
            extra_link_args=link_flags + ["-pthread"],
        )
    )

if simt_headers is not None and with_cuda and want_main:
    # The emulator's self-test kernels on real hardware (tests/test_simt.py's cuda backend).
    ext_modules.append(
        CUDAExtension(
            "bdlkern._C_simt_cuda",
            ["csrc/testing/register_selftest_cuda.cpp", "csrc/testing/selftest.cu"],
            include_dirs=include_dirs,
            define_macros=[("BDLKERN_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-std=c++20", "-O3", "--expt-relaxed-constexpr"]},
            extra_link_args=link_flags,
        )
    )

print(
    f"bdlkern: cuda={'yes (' + cuda_home + ', archs ' + arch_list + ')' if with_cuda else 'no'}, "
    f"simt={'yes (' + simt_headers + ')' if simt_headers else 'no'}",
    file=sys.stderr,
)

# The torch this build compiles against, read by bdlkern/__init__.py before it loads _C.
with open(os.path.join(ROOT, "bdlkern", "_build.py"), "w") as _f:
    _f.write(
        '"""Written by setup.py: what this copy of bdlkern was compiled against."""\n\n'
        f"TORCH_VERSION = {torch.__version__.split('+')[0]!r}\n"
    )

class build_ext(BuildExtension):
    """BuildExtension with a fixed build/temp dir, so ninja rebuilds only what changed even for
    editable installs (which otherwise compile everything in a fresh temporary directory)."""

    def finalize_options(self):
        super().finalize_options()
        temp = "temp-" + sanitize.replace(",", "-") if sanitize else "temp"
        self.build_temp = os.path.join(ROOT, "build", temp)


# The extension links torch's C++ API, whose ABI holds within a major.minor release only: the wheel
# requires the torch it was built against (bdlkern/__init__.py checks the same at import).
_torch_major_minor = ".".join(torch.__version__.split("+")[0].split(".")[:2])

setup(
    version=VERSION,
    install_requires=[f"torch=={_torch_major_minor}.*", "numpy"],
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext.with_options(use_ninja=True)},
)
