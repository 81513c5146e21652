"""Safetensors I/O.  TEMPORARY: delegates to the safetensors package until the C++ reader lands."""
from safetensors.torch import load_file as _load, save_file as _save
from safetensors import safe_open


def load_file(path, device="cpu", dtype=None):
    out = _load(str(path), device=str(device))
    if dtype is not None:
        out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in out.items()}
    return out


def read_metadata(path):
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def save_file(tensors, path, metadata=None):
    _save(tensors, str(path), metadata=metadata)
