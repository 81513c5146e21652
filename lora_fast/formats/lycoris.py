"""LyCORIS LoHa, LoKr and full-diff modules in kohya-style files (LyCORIS trainer, kohya sd-scripts).

One module's tensors (grouped by the kohya reader, ``formats/kohya.py``) become one :class:`LoraLayer` with
``algorithm`` ``"loha"``, ``"lokr"`` or ``"full"``; the tensors are kept as the file has them (dtype, shape: views, no
copies) under their suffix, so writing the layer back gives the same bytes.

Suffixes (``<module>.<suffix>``):

* LoHa: ``hada_w1_a`` (out, r), ``hada_w1_b`` (r, in·kh·kw), ``hada_w2_a``, ``hada_w2_b``; Tucker (k×k convs):
  ``hada_t1``/``hada_t2`` (r, r, kh, kw) with ``hada_w?_a`` (r, out) and ``hada_w?_b`` (r, in).
* LoKr: ``lokr_w1`` (a, b) or ``lokr_w1_a`` (a, r) / ``lokr_w1_b`` (r, b); ``lokr_w2`` (c, d[, kh, kw]) or
  ``lokr_w2_a`` (c, r) / ``lokr_w2_b`` (r, d·kh·kw), or Tucker ``lokr_t2`` (r, r, kh, kw) with ``lokr_w2_a`` (r, c) /
  ``lokr_w2_b`` (r, d); out = a·c, in = b·d.
* full: ``diff`` (the weight's shape) and optional ``diff_b`` (the bias').
* all but full: ``alpha`` (0-d) and ``dora_scale``.

Scales, as LyCORIS' forward pass (and ComfyUI, Forge) apply them: LoHa alpha / r (r = rows of ``hada_w1_b``); LoKr
alpha / r with r the rank of the decomposed half (``lokr_w2_b``'s rows, else ``lokr_w1_b``'s), and 1 when both
halves are stored whole; a missing or zero alpha means alpha = r (scale 1); full: 1.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..adapter import LYCORIS_TENSORS, LoraLayer
from ..errors import LoraFormatError

#: Every LyCORIS tensor suffix this module reads, with the algorithm it belongs to.
SUFFIXES = {name: algo for algo, names in LYCORIS_TENSORS.items() for name in names}
SUFFIXES["diff_b"] = "full"
ALGORITHM_NAMES = {"loha": "LoHa", "lokr": "LoKr", "full": "full diff"}


def is_lycoris_suffix(suffix: str) -> bool:
    return suffix in SUFFIXES


def is_lycoris_group(group: dict) -> bool:
    """Whether a kohya module group (role -> (key, value)) holds LyCORIS LoHa/LoKr/full tensors."""
    return any(role in SUFFIXES for role in group)


def _fail(source: str, key: str, problem: str) -> LoraFormatError:
    return LoraFormatError(f"{source}: key {key!r}: {problem}")


class _FlatShape(tuple):
    """(out, in·kh·kw) of a layer whose tensors do not say the kernel size: equal to any weight shape that flattens to
    it (the kohya reader compares implied shapes with its table's)."""

    def __eq__(self, other):
        other = tuple(other)
        return len(other) >= 2 and (other[0], math.prod(other[1:])) == tuple(self)

    def __ne__(self, other):
        return not self.__eq__(other)

    __hash__ = tuple.__hash__


class LycorisParsed:
    """One LyCORIS module's tensors after the checks that need no target module."""

    def __init__(self, source: str, name: str, group: dict):
        self.name = name
        self.source = source
        self.keys = {role: key for role, (key, _) in group.items()}
        algos = {SUFFIXES[r] for r in group if r in SUFFIXES}
        first_key = next(iter(group.values()))[0]
        self.keys.setdefault("down", first_key)  # the kohya reader names a module's errors by this key
        if len(algos) > 1:
            raise _fail(source, first_key, f"module {name!r} mixes LyCORIS algorithms "
                                           f"{sorted(ALGORITHM_NAMES[a] for a in algos)}")
        self.algorithm = algos.pop()
        label = ALGORITHM_NAMES[self.algorithm]
        mixed = [r for r in group if r in ("down", "up", "mid", "scale")]
        if mixed:
            raise _fail(source, group[mixed[0]][0], f"module {name!r} mixes LoRA tensors with LyCORIS {label} tensors")
        self.tensors: dict[str, torch.Tensor] = {}
        for role, (key, value) in group.items():
            if role not in SUFFIXES:
                continue
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise _fail(source, key, f"expected a floating-point tensor, got "
                                         f"{value.dtype if isinstance(value, torch.Tensor) else type(value).__name__}")
            if value.numel() == 0:
                raise _fail(source, key, "is empty")
            self.tensors[role] = value
        self.alpha: Optional[float] = None
        if "alpha" in group:
            from .kohya import _scalar

            self.alpha = _scalar(source, group["alpha"][0], group["alpha"][1])
        self.dora_scale = group["dora_scale"][1] if "dora_scale" in group else None
        if self.dora_scale is not None and (not isinstance(self.dora_scale, torch.Tensor)
                                            or not self.dora_scale.is_floating_point()):
            raise _fail(source, group["dora_scale"][0], "dora_scale must be a floating-point tensor")
        self.diff_b = self.tensors.pop("diff_b", None)
        if self.algorithm == "full":
            if "diff" not in self.tensors:
                raise LoraFormatError(f"{source}: module {name!r} has {label} tensors but no {name}.diff")
            if self.alpha is not None or self.dora_scale is not None:
                bad = "alpha" if self.alpha is not None else "dora_scale"
                raise _fail(source, self.keys[bad], f"a full diff has no {bad} (LyCORIS applies it at strength 1)")
        self.out, self.in_flat, self.kernel_shape = self._geometry()

    # ------------------------------------------------------------------ shapes

    def _need(self, *roles) -> list:
        missing = [r for r in roles if r not in self.tensors]
        if missing:
            raise self._bad("down", f"LyCORIS {ALGORITHM_NAMES[self.algorithm]} module {self.name!r} has no "
                                    f"{', '.join(self.name + '.' + m for m in missing)} (found {sorted(self.tensors)})")
        return [self.tensors[r] for r in roles]

    def _bad(self, role: str, problem: str) -> LoraFormatError:
        return _fail(self.source, self.keys[role], problem)

    def _dims(self, role: str, *ndims) -> torch.Tensor:
        t = self.tensors[role]
        if t.dim() not in ndims:
            raise self._bad(role, f"expected a {' or '.join(f'{n}-D' for n in ndims)} tensor, got {tuple(t.shape)}")
        return t

    def _geometry(self):
        """(out, in·kh·kw, (kh, kw) or None when the tensors do not say) with every factor checked against the others."""
        t = self.tensors
        if self.algorithm == "loha":
            self._need("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
            tucker = [n for n in ("hada_t1", "hada_t2") if n in t]
            if len(tucker) == 1:
                raise self._bad(tucker[0], "a LoHa Tucker layer needs both hada_t1 and hada_t2")
            halves = []
            for n in "12":
                a, b = self._dims(f"hada_w{n}_a", 2, 4), self._dims(f"hada_w{n}_b", 2, 4)
                if tucker:
                    core = self._dims(f"hada_t{n}", 4)
                    a, b = self._dims(f"hada_w{n}_a", 2), self._dims(f"hada_w{n}_b", 2)
                    r = int(core.shape[0])
                    if int(core.shape[1]) != int(b.shape[0]) or int(a.shape[0]) != r:
                        raise self._bad(f"hada_t{n}", f"Tucker core {tuple(core.shape)} does not fit hada_w{n}_a "
                                                      f"{tuple(a.shape)} (r, out) and hada_w{n}_b {tuple(b.shape)} (r, in)")
                    halves.append((int(a.shape[1]), int(b.shape[1]) * int(core.shape[2]) * int(core.shape[3]),
                                   (int(core.shape[2]), int(core.shape[3]))))
                else:
                    if int(a.shape[1]) != int(b.shape[0]) or a[0].numel() != int(a.shape[1]):
                        raise self._bad(f"hada_w{n}_a", f"rank mismatch: hada_w{n}_a {tuple(a.shape)} (out, r) and "
                                                        f"hada_w{n}_b {tuple(b.shape)} (r, in)")
                    halves.append((int(a.shape[0]), b[0].numel(), None))
            if halves[0] != halves[1]:
                raise self._bad("hada_w2_a", f"the two LoHa halves give different weights: {halves[0][:2]} and "
                                             f"{halves[1][:2]}")
            return halves[0]
        if self.algorithm == "lokr":
            if "lokr_w1" in t:
                a, b = (int(d) for d in self._dims("lokr_w1", 2).shape)
                if any(n in t for n in ("lokr_w1_a", "lokr_w1_b")):
                    raise self._bad("lokr_w1", "a LoKr layer has lokr_w1 and lokr_w1_a/b")
            else:
                w1a, w1b = self._need("lokr_w1_a", "lokr_w1_b")
                self._dims("lokr_w1_a", 2), self._dims("lokr_w1_b", 2)
                if int(w1a.shape[1]) != int(w1b.shape[0]):
                    raise self._bad("lokr_w1_a", f"rank mismatch: lokr_w1_a {tuple(w1a.shape)} and lokr_w1_b "
                                                 f"{tuple(w1b.shape)}")
                a, b = int(w1a.shape[0]), int(w1b.shape[1])
            kernel = None
            if "lokr_w2" in t:
                w2 = self._dims("lokr_w2", 2, 4)
                if any(n in t for n in ("lokr_w2_a", "lokr_w2_b", "lokr_t2")):
                    raise self._bad("lokr_w2", "a LoKr layer has lokr_w2 and lokr_w2_a/b")
                c, dk = int(w2.shape[0]), w2[0].numel()
                if w2.dim() == 4:
                    kernel = (int(w2.shape[2]), int(w2.shape[3]))
            elif "lokr_t2" in t:
                core = self._dims("lokr_t2", 4)
                w2a, w2b = self._need("lokr_w2_a", "lokr_w2_b")
                self._dims("lokr_w2_a", 2), self._dims("lokr_w2_b", 2)
                r = int(core.shape[0])
                if int(w2a.shape[0]) != r or int(w2b.shape[0]) != int(core.shape[1]):
                    raise self._bad("lokr_t2", f"Tucker core {tuple(core.shape)} does not fit lokr_w2_a "
                                               f"{tuple(w2a.shape)} (r, c) and lokr_w2_b {tuple(w2b.shape)} (r, d)")
                kernel = (int(core.shape[2]), int(core.shape[3]))
                c, dk = int(w2a.shape[1]), int(w2b.shape[1]) * kernel[0] * kernel[1]
            else:
                w2a, w2b = self._need("lokr_w2_a", "lokr_w2_b")
                self._dims("lokr_w2_a", 2), self._dims("lokr_w2_b", 2, 4)
                if int(w2a.shape[1]) != int(w2b.shape[0]):
                    raise self._bad("lokr_w2_a", f"rank mismatch: lokr_w2_a {tuple(w2a.shape)} and lokr_w2_b "
                                                 f"{tuple(w2b.shape)}")
                c, dk = int(w2a.shape[0]), w2b[0].numel()
                if w2b.dim() == 4:
                    kernel = (int(w2b.shape[2]), int(w2b.shape[3]))
            return a * c, b * dk, kernel
        diff = self._dims("diff", 2, 4)
        return int(diff.shape[0]), diff[0].numel(), (tuple(int(d) for d in diff.shape[2:]) if diff.dim() == 4 else None)

    def kernel(self) -> tuple[int, int]:
        return self.kernel_shape or (1, 1)

    def implied_shape(self, module_kind: str):
        if self.kernel_shape is not None and module_kind == "conv2d":
            kh, kw = self.kernel_shape
            inp, rem = divmod(self.in_flat, kh * kw)
            if not rem:
                return (self.out, inp, kh, kw)
        if module_kind == "linear":
            return (self.out, self.in_flat)
        return _FlatShape((self.out, self.in_flat))

    def form_fit(self, kind: str, shape: tuple) -> int:
        """2 when the tensors can belong to a module of this kind and shape, else 0 (kohya's _form_fit)."""
        if self.kernel_shape is not None and tuple(self.kernel_shape) != (tuple(shape[2:]) if kind == "conv2d" else (1, 1)):
            return 0
        return 2

    # ------------------------------------------------------------------ the layer

    def build(self, key: str, kind: str, shape: tuple, strict: bool = True) -> LoraLayer:
        """The layer for a target module (kind ``"linear"``/``"conv2d"``, its full-size weight shape). ``strict``:
        the tensors must give that shape; otherwise (a file for a model of the same layout but other widths, as the
        kohya reader decides) only the kind and kernel size must fit, and the shape is the tensors' own."""
        shape = tuple(int(d) for d in shape)
        label = ALGORITHM_NAMES[self.algorithm]
        if not strict and self.form_fit(kind, shape):
            if kind == "linear":
                shape = (self.out, self.in_flat)
            else:
                kh, kw = self.kernel_shape or shape[2:]
                if self.in_flat % (kh * kw) == 0:
                    shape = (self.out, self.in_flat // (kh * kw), kh, kw)
        if (self.out, self.in_flat) != (shape[0], math.prod(shape[1:])) or self.form_fit(kind, shape) == 0:
            implied = self.implied_shape(kind)
            raise _fail(self.source, self.keys["down"], f"LyCORIS {label} tensors imply a weight of shape "
                                                        f"{tuple(implied)} but {key} is {shape}")
        magnitude = axis = None
        if self.dora_scale is not None:
            from .kohya import _dora_axis

            magnitude = self.dora_scale
            axis = _dora_axis(self.source, self.keys["dora_scale"], magnitude, shape[0], shape[1])
        alpha = self.alpha
        if alpha is not None and alpha == 0:
            alpha = None  # LyCORIS: alpha 0 means alpha = r
        bias = None
        if self.diff_b is not None:
            if tuple(self.diff_b.shape) != (shape[0],):
                raise _fail(self.source, self.keys["diff_b"], f"diff_b {tuple(self.diff_b.shape)} does not fit {key} "
                                                              f"(expected ({shape[0]},))")
            bias = self.diff_b
        return LoraLayer(alpha=alpha, kind="conv" if kind == "conv2d" else "linear", magnitude=magnitude,
                         magnitude_axis=axis, bias=bias, algorithm=self.algorithm, lycoris=dict(self.tensors),
                         shape=shape)


def parse_module(source: str, name: str, group: dict) -> LycorisParsed:
    return LycorisParsed(source, name, group)


def write_tensors(layer: LoraLayer, name: str) -> dict[str, torch.Tensor]:
    """The kohya/LyCORIS tensors of a LoHa/LoKr/full layer under module name ``name``: the tensors as read (same
    dtype, shape and values), ``alpha`` as stored, ``dora_scale``, ``diff_b``."""
    out = {f"{name}.{suffix}": t.contiguous() for suffix, t in layer.lycoris.items()}
    if layer.algorithm != "full":
        out[f"{name}.alpha"] = torch.tensor(layer.alpha, dtype=torch.float32
                                            if float(torch.tensor(layer.alpha, dtype=torch.float32)) == layer.alpha
                                            else torch.float64)
    if layer.magnitude is not None:
        out[f"{name}.dora_scale"] = layer.magnitude.contiguous()
    if layer.bias is not None:
        out[f"{name}.diff_b"] = layer.bias.contiguous()
    return out


def refuse_low_rank_format(adapter, format: str) -> None:
    """LoraFormatError when ``adapter`` has LoHa/LoKr/full layers: diffusers and PEFT LoRA files hold one low-rank
    product per module, which these are not (``approximate_lora`` makes one, with an explicit rank)."""
    other = [(k, l.algorithm) for k, l in adapter.layers.items() if l.algorithm != "lora"]
    if other:
        algos = sorted({ALGORITHM_NAMES[a] for _, a in other})
        raise LoraFormatError(
            f"{adapter.source or '<adapter>'}: {len(other)} modules are LyCORIS {', '.join(algos)} layers "
            f"(first: {other[0][0]}), which a {format} LoRA file cannot hold exactly (it stores one low-rank product "
            "per module); keep the kohya/LyCORIS format, or ask for a low-rank approximation with an explicit rank "
            "(lora-fast convert --approx-rank N, or lora_fast.formats.lycoris.approximate_lora)")


def approximate_lora(adapter, rank: int):
    """(adapter with every LoHa/LoKr/full layer replaced by its best rank-``rank`` LoRA approximation, {module key:
    relative error}) where the error is ‖ΔW − ΔW_r‖_F / ‖ΔW‖_F of the flattened (out, in·kh·kw) delta (truncated SVD
    in float64; alpha = rank, so the scale is 1). LoRA layers are kept as they are; LyCORIS layers with a DoRA
    ``dora_scale`` are refused; a full diff's bias becomes a lora_B bias."""
    from ..adapter import LoraAdapter

    if not isinstance(rank, int) or rank < 1:
        raise LoraFormatError(f"the approximation rank must be a positive integer, got {rank!r}")
    layers, errors = {}, {}
    for key, layer in adapter.layers.items():
        if layer.algorithm == "lora":
            layers[key] = layer
            continue
        if layer.magnitude is not None:
            raise LoraFormatError(f"{adapter.source or '<adapter>'}: {key}: a LyCORIS layer with dora_scale has no "
                                  "low-rank approximation here (the DoRA normalization is not a delta)")
        d = layer.delta().double().reshape(layer.shape[0], -1)
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        r = min(rank, int(s.shape[0]))
        root = s[:r].sqrt()
        dtype = layer.dtype
        up = (u[:, :r] * root).to(dtype)
        down = (root[:, None] * vh[:r]).to(dtype)
        approx = up.double() @ down.double()
        norm = d.norm().item()
        errors[key] = (d - approx).norm().item() / norm if norm > 0 else 0.0
        if layer.kind == "conv":
            down = down.reshape(r, *layer.shape[1:])
            up = up.reshape(up.shape[0], r, 1, 1)
        layers[key] = LoraLayer(down=down, up=up, alpha=float(r), kind=layer.kind, bias=layer.bias)
    return (LoraAdapter(layers, adapter.format, dict(adapter.metadata), adapter.source, adapter.family), errors)
