"""Merge jobs: how the layers fused on one weight become one merge-kernel job (their factors or LyCORIS terms, scales
folded in by the kernel, on the weight's 2-D view read from metadata alone). Shared by fuse_lora, fuse-on-load and
``lora-fast merge``."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from .adapter import LoraLayer
from .errors import LoraFusionError
from .kernels import merge as merge_kernels
from .targets import is_fan_in_fan_out

if TYPE_CHECKING:
    from .fusing import FusedStep


_FACTOR_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _flat_strides(t: torch.Tensor, start: int):
    """The stride of dims ``start:`` of ``t`` flattened into one, or None when they are not one arithmetic run
    (what ``reshape`` could give without a copy, read from the metadata alone: no torch operation)."""
    stride, expect = None, None
    for size, st in zip(reversed(t.shape[start:]), reversed(t.stride()[start:])):
        if size == 1:
            continue
        if expect is None:
            stride, expect = st, st * size
        elif st != expect:
            return None
        else:
            expect = st * size
    return 1 if stride is None else stride


def _layer_factor(layer: LoraLayer, scale: float) -> merge_kernels.Factor:
    """``scale · B @ A`` of one layer as the merge kernels take it, read from the layer's own tensors (fp32, fp16 or
    bf16, any layout) without a torch operation; ``layer.factors()`` (float32 copies) for Tucker cores, other dtypes
    and layouts no strides describe. The kernels form ``rn32(fp32(B) · rn32(scale))``, which is what
    ``B.float() * scale`` gives, so both routes give the same bits."""
    up, down = layer.up, layer.down
    if layer.mid is None and up.dtype in _FACTOR_DTYPES and down.dtype in _FACTOR_DTYPES:
        if layer.kind == "embedding":  # (B A)^T: B' = A^T (num, r), A' = B^T (r, dim)
            su = _flat_strides(up, 1)
            if down.dim() == 2 and su is not None:
                return merge_kernels.Factor(down, (down.stride(1), down.stride(0)), up, (su, up.stride(0)),
                                            int(down.shape[0]), scale)
        else:
            su, sd = _flat_strides(up, 1), _flat_strides(down, 1)
            r = int(down.shape[0])
            if su is not None and sd is not None and math.prod(up.shape[1:]) == r:
                return merge_kernels.Factor(up, (up.stride(0), su), down, (down.stride(0), sd), r, scale)
    b, a = layer.factors()
    return merge_kernels.Factor.of(b, a, scale)


def _weight_view(module: nn.Module):
    """(weight tensor, (rows, cols, row stride, col stride)) of the 2-D (out, in_flat) matrix the merge works on,
    from the metadata alone (no torch operation: the parameter itself, not ``.data``, which is a detach op; the
    kernels write through its address and MergeJob.matrix() detaches it for the torch operations of the other
    backends), or None when no 2-D alias exists (see targets.weight_matrix)."""
    w = module.weight
    if is_fan_in_fan_out(module):
        return w, (w.shape[1], w.shape[0], w.stride(1), w.stride(0))
    if w.dim() == 2:
        return w, (w.shape[0], w.shape[1], w.stride(0), w.stride(1))
    sc = _flat_strides(w, 1)
    if sc is None:
        return None
    return w, (w.shape[0], math.prod(w.shape[1:]), w.stride(0), sc)


_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_SCALE_NAMES = ("scale_weight", "weight_scale")  # ComfyUI's scaled fp8 ops; vLLM/compressed-tensors/modelopt


def fp8_scale(module: nn.Module, label: str = "") -> Optional[torch.Tensor]:
    """The per-tensor scale of an fp8 weight stored scaled (``W_real = fp32(W_fp8) · s``): the module's
    ``scale_weight`` (ComfyUI) or ``weight_scale`` tensor, or None (not fp8, or no scale). A scale with more than one
    element (per-channel) or that is zero or not finite is refused (LoraFusionError)."""
    w = getattr(module, "weight", None)
    if w is None or w.dtype not in _FP8:
        return None
    for name in FP8_SCALE_NAMES:
        s = getattr(module, name, None)
        if isinstance(s, torch.Tensor):
            if s.numel() != 1:
                raise LoraFusionError(f"{label}: fp8 weight with a {name} of shape {tuple(s.shape)}: only a per-tensor "
                                      "scale (one element) is supported")
            v = float(s.detach().float().reshape(()).cpu())
            if v == 0.0 or not math.isfinite(v):
                raise LoraFusionError(f"{label}: fp8 weight with {name} = {v}: cannot fuse in its dequantized domain")
            return s
    return None


def merge_job(module: nn.Module, items, step: FusedStep, staged: Optional[list] = None):
    """The merge job of one weight: its adapters' factors (scales folded in by the kernel) on its 2-D view. A weight
    with no 2-D alias (e.g. a channels_last conv weight) is merged on one staging copy, listed in ``step.staged``
    (for unfuse) and in ``staged`` (the caller copies it back once).
    Internal: for lora_fast's own modules, not public API."""
    # A per-tensor scaled fp8 weight (W_real = W·s) fuses in its dequantized domain: W' = rn_fp8(W + delta/s), the
    # 1/s folded into each adapter's scale (the kernel rounds that scale to fp32 once); the scale stays as it is.
    s = fp8_scale(module)
    sv = None if s is None else float(s.detach().float().reshape(()).cpu())

    def scaled(c: float) -> float:  # in float64: λ·w·α/r, divided by the weight's scale
        return c if sv is None else c / sv

    factors = [_layer_factor(layer, scaled(layer.scale * factor))
               for layer, factor in items if layer.algorithm == "lora"]
    terms = [_layer_term(layer, scaled(layer.scale * factor)) for layer, factor in items if layer.algorithm != "lora"]
    wv = _weight_view(module)
    if wv is not None:
        w, view = wv
        if w.dim() == 2 and view[2:] == tuple(w.stride()) and view[:2] == tuple(w.shape):
            view = None
    else:
        param = module.weight.data
        w, view = param.reshape(param.shape[0], -1).contiguous(), None
        step.staged.append((param, w))
        if staged is not None:
            staged.append((param, w))
    wd = w.device
    for f in factors:
        if f.up.device != wd or f.down.device != wd:
            f.up, f.down = f.up.to(wd), f.down.to(wd)
    for t in terms:
        t.u, t.v, t.ub, t.vb = (None if x is None else x.to(wd) for x in (t.u, t.v, t.ub, t.vb))
    return merge_kernels.MergeJob(weight=w, factors=factors or None, view=view, terms=terms or None)


def _layer_term(layer: LoraLayer, scale: float):
    """A LoHa/LoKr/full layer as a merge-kernel Term (``LoraLayer.kernel_parts()``: LoHa factors in float32 with
    Tucker cores folded in, LoKr halves whole, a full diff in its dtype); the kernel applies ``scale``."""
    kind, *parts = layer.kernel_parts()
    if kind == "hada":
        u, ub, v, vb = parts
        return merge_kernels.Term("hada", u, v, ub, vb, scale)
    return merge_kernels.Term("kron", parts[0], parts[1], scale=scale)
