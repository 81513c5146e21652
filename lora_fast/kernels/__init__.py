"""Compute kernels: fused merge (CPU C++ and Triton). Kernels know tensors, not models or formats."""
