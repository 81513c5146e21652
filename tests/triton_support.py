"""What the installed Triton can be trusted with in tests."""

import pytest


def _triton_version():
    try:
        import triton
    except ImportError:
        return None
    return tuple(int(p) for p in triton.__version__.split(".")[:2])


# Triton's interpreter rounds tl.fma twice (a multiply, then an add) before Triton 3.9; compiled kernels use one
# fused rounding (fma.rn.f32). Tests that compare interpreted merge kernels with the C++ kernel bit for bit need 3.9.
exact_fma_interpreter = pytest.mark.skipif(
    (_triton_version() or (0, 0)) < (3, 9), reason="Triton < 3.9 interprets tl.fma with two roundings")
