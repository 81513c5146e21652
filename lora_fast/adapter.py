"""The normalized adapter: the one shape every file format is read into and written from.

Keys of ``LoraAdapter.layers`` are ``<component>.<module path>`` in diffusers naming, e.g.
``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` or
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj`` (text encoders always keep the
``text_model.`` level, as diffusers files do). Adapters read from a PEFT file with no component
given have un-prefixed keys.

Factors keep the dtype they had in the file; ``delta()`` computes in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .errors import LoraFormatError

#: Component prefixes a key may start with, in the order diffusers pipelines name them.
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "prior", "decoder")

KINDS = ("linear", "conv", "embedding")

#: Delta algorithms: LoRA/LoCon (one low-rank product) and the LyCORIS LoHa, LoKr and full diff.
ALGORITHMS = ("lora", "loha", "lokr", "full")

#: The tensors each LyCORIS algorithm may carry in ``LoraLayer.lycoris``, by their file suffix (``.weight`` dropped).
LYCORIS_TENSORS = {
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "full": ("diff",),
}


def _fold64(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``einsum("i j ..., i p, j r -> p r ...", t, a, b)`` (a LyCORIS Tucker rebuild) in float64, rounded once to
    float32: the product ``Σ_i a[i, p] (Σ_j t[i, j, ...] b[j, r])`` a Tucker layer's factor stands for."""
    return torch.einsum("ij...,ip,jr->pr...", t.double(), a.double(), b.double()).float()


def _tucker_right(t: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The right factor (r, in·kh·kw) of a LoHa Tucker half: ``Σ_j t[i, j, y, x] · b[j, c]`` in float64, rounded
    once to float32; with the left factor ``aᵀ`` it gives the half's (out, in·kh·kw) matrix as one rank-r chain."""
    r = int(t.shape[0])
    return torch.einsum("ij...,jc->ic...", t.double(), b.double()).reshape(r, -1).float()

def split_component(key: str) -> tuple[Optional[str], str]:
    """``"unet.a.b"`` -> ``("unet", "a.b")``; a key without a known component prefix -> ``(None, key)``."""
    head, _, rest = key.partition(".")
    if rest and head in COMPONENTS:
        return head, rest
    return None, key


@dataclass(eq=False)
class LoraLayer:
    """One adapted module.

    down (A): (r, in) for Linear, (r, in, kh, kw) for Conv2d, (r, num_embeddings) for Embedding.
    up (B): (out, r) for Linear/Embedding, (out, r, 1, 1) or (out, r) for Conv2d.
    alpha: the value the file stores (upcast to float, never "cleaned"); alpha == rank means scale 1.
    magnitude: DoRA magnitude, kept in the file's shape; ``magnitude_axis`` says which axis of
      ``V = W + delta`` it normalizes: ``"out"`` (PEFT/diffusers, per output row) or ``"in"``
      (kohya/LyCORIS ``dora_scale``, per input column: norm over every dim except dim 1).
    fan_in_fan_out: the target weight is stored (in, out) (GPT-2 Conv1D); delta() is transposed.
    bias: ``lora_B.bias`` when the adapter trains one (added to the module bias on fuse).
    mid: Tucker/CP core (r, r, kh, kw) of a LoCon layer (``lora_mid.weight``), else None.
    algorithm: ``"lora"`` (down/up above), or a LyCORIS algorithm whose tensors are in ``lycoris``, keyed by their
      file suffix (``LYCORIS_TENSORS``), in the file's dtype and shape, with ``shape`` the target weight's shape:
      ``"loha"`` ΔW = s·(w1_a w1_b) ⊙ (w2_a w2_b) (Tucker: each half ``einsum("i j ..., j r, i p -> p r ...", t,
      w_b, w_a)``), ``"lokr"`` ΔW = s·kron(W1, W2), each of W1, W2 stored whole or as a low-rank product (W2 also
      Tucker), ``"full"`` ΔW = diff (``bias`` holds ``diff_b``). down/up are None for them.
    """

    down: Optional[torch.Tensor] = None
    up: Optional[torch.Tensor] = None
    alpha: Optional[float] = None
    kind: str = "linear"
    use_rslora: bool = False
    magnitude: Optional[torch.Tensor] = None
    magnitude_axis: Optional[str] = None
    fan_in_fan_out: bool = False
    bias: Optional[torch.Tensor] = None
    mid: Optional[torch.Tensor] = None
    algorithm: str = "lora"
    lycoris: dict = field(default_factory=dict)
    shape: Optional[tuple] = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LoraFormatError(f"unknown LoRA layer kind {self.kind!r} (expected one of {KINDS})")
        if self.algorithm not in ALGORITHMS:
            raise LoraFormatError(f"unknown delta algorithm {self.algorithm!r} (expected one of {ALGORITHMS})")
        if self.algorithm == "lora":
            if self.down is None or self.up is None or self.alpha is None:
                raise LoraFormatError("a LoRA layer needs down, up and alpha")
        else:
            unknown = sorted(set(self.lycoris) - set(LYCORIS_TENSORS[self.algorithm]))
            if unknown or self.shape is None or self.kind == "embedding" or self.fan_in_fan_out or self.use_rslora:
                raise LoraFormatError(f"a {self.algorithm} layer needs its LyCORIS tensors, the target shape and a "
                                      f"linear or conv kind (unknown tensors: {unknown})")
            self.shape = tuple(int(d) for d in self.shape)
            if self.alpha is None:
                self.alpha = float(self.rank)
        self.alpha = float(self.alpha)
        if self.magnitude is not None and self.magnitude_axis is None:
            self.magnitude_axis = "out"

    @property
    def rank(self) -> int:
        """LoRA: rows of down. LoHa: rows of hada_w1_b. LoKr: rank of the decomposed half (W2's when both are), 1
        when both halves are stored whole (LyCORIS' ``lora_dim`` there). Full: 0 (no rank)."""
        if self.algorithm == "lora":
            return int(self.down.shape[0])
        t = self.lycoris
        if self.algorithm == "loha":
            return int(t["hada_w1_b"].shape[0])
        if self.algorithm == "lokr":
            if "lokr_w2_b" in t:
                return int(t["lokr_w2_b"].shape[0])
            if "lokr_w1_b" in t:
                return int(t["lokr_w1_b"].shape[0])
            return 1
        return 0

    @property
    def scale(self) -> float:
        """alpha / r, or alpha / sqrt(r) for rsLoRA. LyCORIS (its forward pass, ComfyUI and Forge): LoHa alpha / r;
        LoKr alpha / r, but 1 when W1 and W2 are both stored whole; full 1."""
        if self.algorithm == "full" or (self.algorithm == "lokr" and "lokr_w1" in self.lycoris
                                        and "lokr_w2" in self.lycoris):
            return 1.0
        r = self.rank
        return self.alpha / math.sqrt(r) if self.use_rslora else self.alpha / r

    @property
    def in_features(self) -> int:
        """Flattened input size of the target weight (in·kh·kw for a conv)."""
        if self.algorithm != "lora":
            return math.prod(self.shape[1:])
        if self.kind == "embedding":
            return int(self.down.shape[1])
        if self.mid is not None:
            return int(self.down.shape[1]) * int(self.mid.shape[2]) * int(self.mid.shape[3])
        return int(self.down[0].numel())

    @property
    def out_features(self) -> int:
        if self.algorithm != "lora":
            return self.shape[0]
        return int(self.up.shape[0])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the target module's weight as this layer implies it."""
        if self.algorithm != "lora":
            return self.shape
        if self.kind == "embedding":
            return (int(self.down.shape[1]), int(self.up.shape[0]))
        if self.kind == "conv":
            if self.mid is not None:
                kh, kw = int(self.mid.shape[2]), int(self.mid.shape[3])
                return (self.out_features, int(self.down.shape[1]), kh, kw)
            if self.down.dim() == 4:
                return (self.out_features, *self.down.shape[1:])
            return (self.out_features, int(self.down.shape[1]), 1, 1)
        shape = (self.out_features, self.in_features)
        return shape[::-1] if self.fan_in_fan_out else shape

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) as float32 matrices with ΔW_flat = scale · B @ A, shape (out, in_flat).

        For an embedding ΔW = scale · (B A)ᵀ, so this returns (Aᵀ, Bᵀ); for fan_in_fan_out the
        caller transposes. A Tucker core is folded into A. LoHa/LoKr/full layers have no single product: see
        ``kernel_parts()``.
        """
        if self.algorithm != "lora":
            raise ValueError(f"a {self.algorithm} layer is not one low-rank product (use delta() or kernel_parts())")
        up = self.up.reshape(self.up.shape[0], -1).float()
        if self.kind == "embedding":
            return self.down.float().t(), up.t()
        if self.mid is not None:
            r_up, r_down = int(self.mid.shape[0]), int(self.mid.shape[1])
            down = self.down.reshape(r_down, -1).float()  # (r, in)
            mid = self.mid.float()  # (r_up, r_down, kh, kw)
            # A'[p, i, y, x] = Σ_q mid[p, q, y, x] · down[q, i]
            a = torch.einsum("pqyx,qi->piyx", mid, down).reshape(r_up, -1)
            return up, a
        return up, self.down.reshape(self.down.shape[0], -1).float()

    def fits_weight(self, shape, fan_in_fan_out: bool = False) -> bool:
        """Whether a target weight of ``shape`` is the one these factors adapt (the one shape check of the loader
        and of ``lora-fast merge``): embeddings and k×k convolutions exactly; linears and 1×1 convolutions by
        (out, in), as 2-D or 4-D with 1×1 kernel dims, or transposed (Conv1D) when ``fan_in_fan_out``."""
        shape = tuple(shape)
        if self.kind == "embedding" or (self.kind == "conv" and tuple(self.weight_shape[2:]) != (1, 1)):
            return shape == tuple(self.weight_shape)
        if fan_in_fan_out:
            return len(shape) == 2 and (shape[1], shape[0]) == (self.out_features, self.in_features)
        if len(shape) not in (2, 4) or (len(shape) == 4 and shape[2:] != (1, 1)):
            return False
        return (shape[0], math.prod(shape[1:])) == (self.out_features, self.in_features)

    def halves(self) -> tuple:
        """LoHa: the two (out, in_flat) halves as (left, right) float32 pairs, Tucker cores folded into the right
        factor (``_tucker_right``). LoKr: (W1 (a, b), W2 (c, d·kh·kw)) as whole float32 matrices, a low-rank or
        Tucker half rebuilt in float64 and rounded once. Full: the diff as (out, in_flat) in its own dtype.
        The LoKr rebuild is cached on the layer (its size is about the square root of the weight's)."""
        t = self.lycoris
        if self.algorithm == "loha":
            out = []
            for n in "12":
                a, b = t[f"hada_w{n}_a"], t[f"hada_w{n}_b"]
                core = t.get(f"hada_t{n}")
                if core is not None:  # w_a (r, out), w_b (r, in), core (r, r, kh, kw)
                    out.append((a.float().t(), _tucker_right(core, b)))
                else:
                    out.append((a.reshape(a.shape[0], -1).float(), b.reshape(b.shape[0], -1).float()))
            return tuple(out)
        if self.algorithm == "lokr":
            # cached with the versions of the tensors it was built from: an in-place change rebuilds it
            stamp = tuple((k, id(v), v._version) for k, v in sorted(t.items()) if isinstance(v, torch.Tensor))
            cached = self.__dict__.get("_kron_halves")
            if cached is not None and cached[0] == stamp:
                return cached[1]
            if "lokr_w1" in t:
                w1 = t["lokr_w1"].float()
            else:
                w1 = (t["lokr_w1_a"].double() @ t["lokr_w1_b"].double()).float()
            if "lokr_w2" in t:
                w2 = t["lokr_w2"].reshape(t["lokr_w2"].shape[0], -1).float()
            elif "lokr_t2" in t:  # lokr_w2_a (r, c), lokr_w2_b (r, d)
                w2 = _fold64(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
                w2 = w2.reshape(w2.shape[0], -1)
            else:
                b = t["lokr_w2_b"]
                w2 = (t["lokr_w2_a"].double() @ b.reshape(b.shape[0], -1).double()).float()
            halves = (w1.contiguous(), w2.contiguous())
            self.__dict__["_kron_halves"] = (stamp, halves)
            return halves
        if self.algorithm == "full":
            d = t["diff"]
            return (d.reshape(d.shape[0], -1),)
        raise ValueError("a LoRA layer has factors(), not halves()")

    def kernel_parts(self) -> tuple:
        """What the merge kernels take for a LyCORIS layer, scale not applied: ``("hada", u, ub, v, vb)`` (LoHa: the
        two halves' factors), ``("kron", W1, W2)`` (LoKr) or ``("kron", [[1]], diff)`` (full), 2-D, shaped against
        the (out, in_flat) weight matrix."""
        h = self.halves()
        if self.algorithm == "loha":
            (u, ub), (v, vb) = h
            return ("hada", u, ub, v, vb)
        if self.algorithm == "lokr":
            return ("kron", h[0], h[1])
        d = h[0]
        return ("kron", torch.ones((1, 1), dtype=torch.float32, device=d.device), d)

    def delta(self) -> torch.Tensor:
        """scale · ΔW in float32, shaped like the target weight (DoRA: the additive part only). LoRA: B·A;
        LoHa: (w1_a w1_b) ⊙ (w2_a w2_b); LoKr: kron(W1, W2); full: diff."""
        if self.algorithm != "lora":
            if self.algorithm == "loha":
                (u, ub), (v, vb) = self.halves()
                d = (u @ ub) * (v @ vb)
            elif self.algorithm == "lokr":
                w1, w2 = self.halves()
                d = torch.kron(w1, w2)
            else:
                d = self.halves()[0].float()
            s = self.scale
            return (d * s if s != 1.0 else d).reshape(self.shape).contiguous()
        b, a = self.factors()
        d = (b @ a) * self.scale
        if self.fan_in_fan_out and self.kind == "linear":
            d = d.t()
        return d.reshape(self.weight_shape).contiguous()

    def to(self, device=None, dtype=None) -> "LoraLayer":
        """A copy with every tensor moved/cast (dtype applies to floating tensors)."""

        def mv(t):
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)

        return LoraLayer(
            down=mv(self.down), up=mv(self.up), alpha=self.alpha, kind=self.kind, use_rslora=self.use_rslora,
            magnitude=mv(self.magnitude), magnitude_axis=self.magnitude_axis, fan_in_fan_out=self.fan_in_fan_out,
            bias=mv(self.bias), mid=mv(self.mid), algorithm=self.algorithm,
            lycoris={k: mv(v) for k, v in self.lycoris.items()}, shape=self.shape,
        )

    @property
    def device(self) -> torch.device:
        """Where the layer's factors are."""
        return (self.down if self.algorithm == "lora" else next(iter(self.lycoris.values()))).device

    @property
    def dtype(self) -> torch.dtype:
        """The factors' dtype (LyCORIS: the dtype of the first stored tensor)."""
        return (self.down if self.algorithm == "lora" else next(iter(self.lycoris.values()))).dtype


# LoraAdapter.save's writer: lora_fast.formats registers its write_adapter here when imported (lora_fast/__init__
# imports it, so it is set whenever the package is). The data model stays below the formats and never imports them.
_adapter_writer: Optional[Callable[["LoraAdapter", object, str], None]] = None


def register_adapter_writer(writer: Callable[["LoraAdapter", object, str], None]) -> None:
    """Set the function behind :meth:`LoraAdapter.save` (``writer(adapter, path, format)``)."""
    global _adapter_writer
    _adapter_writer = writer


@dataclass(eq=False)
class LoraAdapter:
    """A whole adapter: ``layers`` keyed by ``<component>.<module path>`` (diffusers naming).

    format: where it came from: ``"diffusers"``, ``"peft"`` or ``"kohya"``; for Flux.1 files in BFL module
      names also ``"bfl"`` (ComfyUI / BFL names) or ``"xlabs"`` (XLabs processor names).
    metadata: the source file's header metadata (string to string), if any.
    source: the path it was read from, if any (used in error messages).
    family: the model family the file's key layout names, when the reader knows it (``"flux"``), else None.
    """

    layers: dict[str, LoraLayer]
    format: str
    metadata: dict[str, str] = field(default_factory=dict)
    source: Optional[str] = None
    family: Optional[str] = None

    def components(self) -> list[str]:
        """Component prefixes present, in COMPONENTS order; ``[None]``-free (un-prefixed keys are ignored)."""
        seen = {split_component(k)[0] for k in self.layers}
        return [c for c in COMPONENTS if c in seen]

    def select(self, component: Optional[str]) -> dict[str, LoraLayer]:
        """Layers of one component with the prefix stripped; ``None`` -> the un-prefixed layers."""
        out = {}
        for key, layer in self.layers.items():
            comp, path = split_component(key)
            if comp == component:
                out[path] = layer
        return out

    def to(self, device=None, dtype=None) -> "LoraAdapter":
        return LoraAdapter(
            {k: v.to(device, dtype) for k, v in self.layers.items()}, self.format, dict(self.metadata), self.source,
            self.family,
        )

    def save(self, path, format: str = "diffusers", *, block_diagonal: bool = False) -> None:
        """Write this adapter as a diffusers or kohya ``.safetensors`` file, or a PEFT directory.

        Every module's delta is preserved exactly; what the target format cannot express raises
        LoraFormatError before anything is written. ``block_diagonal`` (kohya, Flux/SD3): split modules of one
        fused projection that do not share their down matrix are written in the exact block-diagonal form (rank
        the sum of theirs) instead of being refused.
        """
        if _adapter_writer is None:
            raise RuntimeError("no LoRA writer registered: import lora_fast (its formats package registers one)")
        if block_diagonal:
            _adapter_writer(self, path, format, block_diagonal=True)
        else:
            _adapter_writer(self, path, format)

    def __repr__(self) -> str:
        ranks = sorted({l.rank for l in self.layers.values()})
        algos = sorted({l.algorithm for l in self.layers.values()} - {"lora"})
        extra = f", algorithms={['lora'] * any(l.algorithm == 'lora' for l in self.layers.values()) + algos}" if algos else ""
        return (f"LoraAdapter(format={self.format!r}, layers={len(self.layers)}, components={self.components()}, "
                f"ranks={ranks}{extra})")
