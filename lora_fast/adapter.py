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
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    kind: str = "linear"
    use_rslora: bool = False
    magnitude: Optional[torch.Tensor] = None
    magnitude_axis: Optional[str] = None
    fan_in_fan_out: bool = False
    bias: Optional[torch.Tensor] = None
    mid: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LoraFormatError(f"unknown LoRA layer kind {self.kind!r} (expected one of {KINDS})")
        self.alpha = float(self.alpha)
        if self.magnitude is not None and self.magnitude_axis is None:
            self.magnitude_axis = "out"

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        """alpha / r, or alpha / sqrt(r) for rsLoRA."""
        r = self.rank
        return self.alpha / math.sqrt(r) if self.use_rslora else self.alpha / r

    @property
    def in_features(self) -> int:
        """Flattened input size of the target weight (in·kh·kw for a conv)."""
        if self.kind == "embedding":
            return int(self.down.shape[1])
        if self.mid is not None:
            return int(self.down.shape[1]) * int(self.mid.shape[2]) * int(self.mid.shape[3])
        return int(self.down[0].numel())

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the target module's weight as this layer implies it."""
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
        caller transposes. A Tucker core is folded into A.
        """
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

    def delta(self) -> torch.Tensor:
        """scale · B·A in float32, shaped like the target weight (DoRA: the low-rank part only)."""
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
            bias=mv(self.bias), mid=mv(self.mid),
        )


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

    def save(self, path, format: str = "diffusers") -> None:
        """Write this adapter as a diffusers or kohya ``.safetensors`` file, or a PEFT directory.

        Every module's delta is preserved exactly; what the target format cannot express raises
        LoraFormatError before anything is written.
        """
        if _adapter_writer is None:
            raise RuntimeError("no LoRA writer registered: import lora_fast (its formats package registers one)")
        _adapter_writer(self, path, format)

    def __repr__(self) -> str:
        ranks = sorted({l.rank for l in self.layers.values()})
        return f"LoraAdapter(format={self.format!r}, layers={len(self.layers)}, components={self.components()}, ranks={ranks})"
