"""Helpers the I/O tests share: every dtype a safetensors file can hold, random bit patterns, byte views."""

import torch

# dtypes newer than the oldest supported torch are left out where that torch lacks them
F4 = getattr(torch, "float4_e2m1fn_x2", None)
EVERY_DTYPE = [d for d in (
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
    torch.float32, torch.float64, torch.complex64, torch.uint16, torch.uint32, torch.uint64,
    torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
    getattr(torch, "float8_e8m0fnu", None), F4,
) if d is not None]  # fmt: skip


def random_bits(dtype, shape, seed):
    """Random bit patterns of `dtype` (NaN payloads included); valid bools."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for d in shape:
        n *= d
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    itemsize = torch.empty((), dtype=dtype).element_size()
    return torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8, generator=g).view(dtype).reshape(shape)


def as_bytes(t):
    """The tensor's bytes (moved to the CPU, contiguous) as a flat uint8 tensor."""
    t = t.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
