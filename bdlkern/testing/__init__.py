"""Test support: ``bdlkern.testing.reference``, the pure-PyTorch oracle of every op.

The oracle is written from the definitions in docs/design.md, independently of the C++/CUDA
kernels, and the tests compare every kernel with it. Production code never imports this package
(``import bdlkern`` and the ``nn`` modules leave it out of ``sys.modules``; a test holds that), so
a library user's process carries no test code. ``bdlkern.reference`` still reaches it, on first
access.
"""
