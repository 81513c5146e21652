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


# ------------------------------------------------------------------ LyCORIS (LoHa, LoKr, full), from the file's tensors


def lycoris_scale(layer) -> float:
    """LyCORIS' forward-pass scale: LoHa alpha / r (r = rows of hada_w1_b); LoKr alpha / r (r = rows of the decomposed
    half's lokr_w?_b, W2's first), 1 when lokr_w1 and lokr_w2 are both whole; full 1."""
    t = layer.lycoris
    if layer.algorithm == "full":
        return 1.0
    if layer.algorithm == "loha":
        return layer.alpha / t["hada_w1_b"].shape[0]
    if "lokr_w1" in t and "lokr_w2" in t:
        return 1.0
    r = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0]
    return layer.alpha / r


def lycoris_delta64(layer) -> torch.Tensor:
    """scale · ΔW in float64 shaped like the target weight, from ``layer.lycoris`` / ``alpha`` / ``shape`` only:
    LoHa (w1_a w1_b) ⊙ (w2_a w2_b), Tucker halves ``einsum("i j k l, j r, i p -> p r k l", t, w_b, w_a)``; LoKr
    kron(W1, W2) with W1 = lokr_w1 or w1_a w1_b, W2 = lokr_w2, w2_a w2_b or ``einsum("i j k l, i p, j r -> p r k l",
    t2, w2_a, w2_b)``, W1 broadcast over W2's kernel dims; full: diff."""
    t = {k: v.double() for k, v in layer.lycoris.items()}
    shape = tuple(layer.shape)
    if layer.algorithm == "loha":
        halves = []
        for n in "12":
            a, b = t[f"hada_w{n}_a"], t[f"hada_w{n}_b"]
            if f"hada_t{n}" in t:
                halves.append(torch.einsum("ijkl,jr,ip->prkl", t[f"hada_t{n}"], b, a))
            else:
                halves.append((a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1)).reshape(shape))
        d = halves[0] * halves[1]
    elif layer.algorithm == "lokr":
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = torch.einsum("ijkl,ip,jr->prkl", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:
            b = t["lokr_w2_b"]
            w2 = t["lokr_w2_a"] @ b.reshape(b.shape[0], -1)
            if len(shape) == 4:
                w2 = w2.reshape(w2.shape[0], shape[1] // w1.shape[1], *shape[2:])
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        d = torch.kron(w1, w2.contiguous())
    else:
        d = t["diff"]
    return d.reshape(shape) * lycoris_scale(layer)
