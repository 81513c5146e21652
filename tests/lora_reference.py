"""The LoRA delta in float64, written from the layer's raw tensors: the oracle the engine tests compare against.

Deliberately independent of ``LoraLayer.factors()`` / ``LoraLayer.delta()`` (the engine's own math), so a mistake
there (scale, Tucker folding, transposes) cannot cancel out of a comparison.
"""

from __future__ import annotations

import math

import torch


def scale_of(layer) -> float:
    """alpha / r, or alpha / √r for rsLoRA; r = rows of ``down``."""
    r = layer.down.shape[0]
    return layer.alpha / (math.sqrt(r) if layer.use_rslora else r)


def delta64(layer) -> torch.Tensor:
    """scale · ΔW in float64, shaped like the target weight, from down/up/mid/alpha/kind/flags only.

    scale = alpha / r (alpha / √r for rsLoRA), r = rows of ``down``. Linear/conv: ΔW[o, i…] = Σ_p up[o, p]·down[p, i…];
    with a Tucker core ΔW[o, i, y, x] = Σ_p,q up[o, p]·mid[p, q, y, x]·down[q, i]; embedding: ΔW = (up·down)ᵀ;
    fan_in_fan_out (GPT-2 Conv1D): the weight is stored (in, out), so ΔW is transposed.
    """
    down, up = layer.down.double(), layer.up.double()
    r, scale = down.shape[0], scale_of(layer)
    up2 = up.reshape(up.shape[0], -1)
    if layer.mid is not None:
        d = torch.einsum("op,pqyx,qi->oiyx", up2, layer.mid.double(), down.reshape(r, -1))
        return d * scale
    d = up2 @ down.reshape(r, -1)
    if layer.kind == "embedding" or layer.fan_in_fan_out:
        d = d.t()
    if layer.kind == "conv":
        d = d.reshape(up.shape[0], *down.shape[1:]) if down.dim() == 4 else d
    return d * scale
