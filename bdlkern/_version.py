"""The version of bdlkern: the one place it is written (setup.py reads it for the package metadata
and compiles it into the extension, whose ``build_info()`` reports it)."""

__version__ = "0.1.0"
