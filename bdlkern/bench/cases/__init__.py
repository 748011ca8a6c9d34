"""Benchmark case families, one module each; importing this package registers their cases.

To add a family (MC-dropout linear, Concrete dropout, sparse VD): write ``<family>.py`` defining
its cases with :func:`bdlkern.bench.case`, add the module name to :data:`FAMILIES`, and add a
``bench/test_<family>_bench.py`` marked ``pytest.mark.bench_family("<family>")``.
"""

import importlib

#: Case modules, in the order their cases are listed and run.
FAMILIES = ("rng", "mc_dropout", "concrete", "sparse_vd", "conv", "overhead", "models", "methods")

for _family in FAMILIES:
    importlib.import_module(f"{__name__}.{_family}")
