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


# The segmented shrink/expand kernels read scalars out of loaded blocks in a way Triton's interpreter only supports
# from 3.9 on (earlier: "only 0-dimensional arrays can be converted to Python scalars"); they compile for sm_80/sm_90
# on every declared version (test_triton_compile), so only the interpreted runs need the newer interpreter.
interpretable_segmented_kernels = pytest.mark.skipif(
    (_triton_version() or (0, 0)) < (3, 9), reason="Triton < 3.9's interpreter cannot run the segmented kernels")
