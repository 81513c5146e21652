"""Compute kernels: fused merge (CPU C++ and Triton). Kernels know tensors, not models or formats."""

import contextlib


def device_guard(device):
    """The context every Triton launch runs in: Triton launches on the *current* CUDA device, whatever device its
    tensors are on, so each launch group (one device) makes its device current for the launch and for the tables it
    allocates (a pipeline may hold its UNet on cuda:0 and its text encoder on cuda:1). A no-op for other devices."""
    import torch

    if getattr(device, "type", None) == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
