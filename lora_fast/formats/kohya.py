"""kohya / A1111 / LyCORIS-LoCon LoRA files (``lora_unet_*``, ``lora_te_*``, ``lora_te1_*``, ``lora_te2_*``).

Keys are ``<module name>.<tensor>``; the module name is split off at the first '.'. Tensors per module:
``lora_down.weight`` (A), ``lora_up.weight`` (B), optional ``alpha`` (0-d), A1111 ``scale`` (overrides
alpha/r), ``dora_scale`` (DoRA magnitude) and ``lora_mid.weight`` (Tucker/CP LoCon core).

Module names are not invertible by string rules, so they are looked up in tables generated once from
the real SD1.5 / SD2 / SDXL module trees (``scripts/gen_kohya_names.py``, stored in ``names/``). Each
table maps every kohya spelling of a module (diffusers-style and LDM/SGM UNet names, ``lora_te_`` /
``lora_te1_`` / ``lora_te2_``, with or without ``text_model_``) to its adapter key, and records the
module's kind (Linear/Conv2d) and full-size weight shape.

Family choice on read: the candidates are the families whose table contains every name of the file
(``lora_te2_`` exists only in SDXL). Among them, the one whose full-size shapes match the most modules
wins, then SDXL if the file uses ``lora_te1_``/``lora_te2_`` or LDM UNet names, then the one whose module
kinds fit the factor shapes most directly (SD1.x's 1×1-conv proj_in saved 4-D vs SD2's Linear proj_in
saved 2-D), then SD1.5, SD2, SDXL in that order. A kohya name means the same module in every
family that has it (the generator checks this), so the choice never changes where a LoRA lands; it
only decides layer kinds and the shape check.

The chosen family is ``adapter.family`` (``"sdxl"``, or ``"sd"`` for SD1.x/SD2). Names that both SD1.x and SDXL
tables hold (LDM/SGM block names such as ``lora_unet_input_blocks_4_1_proj_in`` mean the same module in both, with
layers_per_block 2) leave the choice open: read alone, such a file is taken as SDXL (the default above); a target
decides (``formats.families.resolve_family``), and either target loads it.

Shape check on read: if at least one module's implied weight shape equals the chosen family's full-size
shape, the file is taken to be for that full-size model and every module must match (a mismatch names
the key). If none matches, the file is for a model with the same layout but other widths (the
project's tiny test models, custom-width fine-tunes) and only internal consistency is checked: rank
agreement, kernel sizes, kinds. The live model is checked again when the adapter is applied.
"""

from __future__ import annotations

import functools
import gzip
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..adapter import LoraAdapter, LoraLayer, split_component
from ..errors import LoraFormatError
from . import lycoris

KOHYA_ROOTS = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
# Textual-inversion embeddings some kohya trainers bundle into the same file. They make the file
# kohya-shaped, but read_kohya refuses them by name (they are not LoRA layers; never dropped silently).
_KOHYA_EXTRA_PREFIXES = ("bundle_emb.",)

FAMILIES = ("sd15", "sd2", "sdxl")
_NAMES_DIR = Path(__file__).resolve().parent / "names"

_SUFFIXES = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora_mid.weight": "mid",
    "alpha": "alpha",
    "scale": "scale",
    "dora_scale": "dora_scale",
}
# LyCORIS algorithms other than LoRA/LoCon; recognised only to give a precise error.
_LYCORIS_PREFIXES = {"hada_": "LoHa", "lokr_": "LoKr", "oft_": "OFT", "boft_": "BOFT"}
_LYCORIS_SUFFIXES = {"diff": "full-weight diff", "diff_b": "bias diff", "on_input": "IA3", "weight": "IA3 / full weight",
                     "w_norm": "norm weight", "b_norm": "norm bias", "bias": "bias"}
_LDM_UNET_NAME = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks|time_embed|label_emb|out)_")


# ----------------------------------------------------------------------------------------------
# name tables


@dataclass(frozen=True)
class _Module:
    key: str  # adapter key, e.g. "unet.down_blocks.0.resnets.0.conv1"
    kind: str  # "linear" | "conv2d"
    shape: tuple[int, ...]  # full-size weight shape
    names: tuple[str, ...]  # kohya names, preferred (what kohya writes) first


@dataclass(frozen=True)
class _Table:
    family: str
    by_key: dict  # adapter key -> _Module
    by_name: dict  # every kohya spelling -> _Module


@functools.lru_cache(maxsize=None)
def _table(family: str) -> _Table:
    path = _NAMES_DIR / f"{family}.json.gz"
    try:
        raw = json.loads(gzip.decompress(path.read_bytes()))
    except OSError as exc:  # a broken install, not a bad user file
        raise RuntimeError(f"lora_fast: kohya name table {path} is missing or unreadable ({exc}); "
                           "regenerate it with scripts/gen_kohya_names.py") from exc
    by_key, by_name = {}, {}
    for key, entry in raw["modules"].items():
        module = _Module(key, entry["kind"], tuple(entry["shape"]), tuple(entry["names"]))
        by_key[key] = module
        for name in module.names:
            by_name[name] = module
    return _Table(family, by_key, by_name)


def kohya_name_table(family: str) -> dict[str, str]:
    """Every kohya module name of a family (``"sd15"``, ``"sd2"``, ``"sdxl"``) -> its adapter key."""
    return {name: module.key for name, module in _table(family).by_name.items()}


def kohya_module_name(key: str, family: str) -> str:
    """The name kohya itself writes for an adapter key in a family (LDM UNet names for SDXL)."""
    module = _lookup_key(_table(family), key)
    if module is None:
        raise LoraFormatError(f"module {key!r} has no kohya name in the {family} tables")
    return module.names[0]


def _lookup_key(table: _Table, key: str) -> Optional[_Module]:
    module = table.by_key.get(key)
    if module is None:
        # Text-encoder keys taken from a transformers-5 CLIPTextModel tree lack "text_model.".
        component, path = split_component(key)
        if component in ("text_encoder", "text_encoder_2") and not path.startswith("text_model."):
            module = table.by_key.get(f"{component}.text_model.{path}")
    return module


# ----------------------------------------------------------------------------------------------
# detection


def is_kohya(keys: Iterable[str]) -> bool:
    """True when every key starts with a kohya root (``lora_unet_``, ``lora_te_``, ``lora_te1_``,
    ``lora_te2_``), allowing bundled textual-inversion entries (``bundle_emb.*``) besides."""
    found = False
    for key in keys:
        if not isinstance(key, str):
            return False
        if key.startswith(KOHYA_ROOTS):
            found = True
        elif not key.startswith(_KOHYA_EXTRA_PREFIXES):
            return False
    return found


# ----------------------------------------------------------------------------------------------
# reading


def _fail(source: str, key: str, problem: str) -> LoraFormatError:
    return LoraFormatError(f"{source}: key {key!r}: {problem}")


def _scalar(source: str, key: str, value) -> float:
    """A 0-d (or one-element) numeric tensor as a Python float, exactly (no rounding, no cleaning)."""
    if not isinstance(value, torch.Tensor):
        raise _fail(source, key, f"expected a numeric tensor, got {type(value).__name__}")
    if value.dtype == torch.bool or value.is_complex() or not (value.is_floating_point() or _is_integer(value)):
        raise _fail(source, key, f"expected a real number, got a {value.dtype} tensor")
    if value.numel() != 1:
        raise _fail(source, key, f"expected a single number, got shape {tuple(value.shape)}")
    if value.device.type == "meta":
        raise _fail(source, key, "is on the meta device (no value to read)")
    number = float(value.detach().reshape(()).cpu().double().item())
    if not math.isfinite(number):
        raise _fail(source, key, f"value is {number}")
    return number


def _is_integer(t: torch.Tensor) -> bool:
    return t.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                       getattr(torch, "uint16", torch.int16), getattr(torch, "uint32", torch.int32),
                       getattr(torch, "uint64", torch.int64))


def _classify_suffix(source: str, key: str, suffix: str) -> str:
    role = _SUFFIXES.get(suffix)
    if role is not None:
        return role
    if lycoris.is_lycoris_suffix(suffix):  # LoHa / LoKr / full diff: the role is the suffix (formats/lycoris.py)
        return suffix
    for prefix, algo in _LYCORIS_PREFIXES.items():
        if suffix.startswith(prefix):
            raise _fail(source, key, f"LyCORIS {algo} tensors are not supported (only LoRA/LoCon)")
    head = suffix.split(".")[0]
    if head in _LYCORIS_SUFFIXES:
        raise _fail(source, key, f"LyCORIS {_LYCORIS_SUFFIXES[head]} tensors are not supported (only LoRA/LoCon)")
    raise _fail(source, key, f"unknown kohya tensor {suffix!r} (expected one of {sorted(_SUFFIXES)})")


def _group(state_dict: dict, source: str) -> dict[str, dict[str, tuple[str, object]]]:
    """{module name: {role: (key, value)}} in file order."""
    groups: dict[str, dict[str, tuple[str, object]]] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise LoraFormatError(f"{source}: key {key!r} is not a string")
        if key.startswith(_KOHYA_EXTRA_PREFIXES):
            raise _fail(source, key, "bundled textual-inversion embeddings are not supported")
        if not key.startswith(KOHYA_ROOTS):
            raise _fail(source, key, f"not a kohya key (expected a prefix among {KOHYA_ROOTS})")
        name, dot, suffix = key.partition(".")
        if not dot or not suffix:
            raise _fail(source, key, "has no '.<tensor>' part after the module name")
        role = _classify_suffix(source, key, suffix)
        groups.setdefault(name, {})[role] = (key, value)
    return groups


def _factor(source: str, key: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise _fail(source, key, f"expected a tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise _fail(source, key, f"expected a floating-point tensor, got {value.dtype}")
    if value.dim() not in (2, 4) or value.numel() == 0:
        raise _fail(source, key, f"expected a non-empty 2-D or 4-D tensor, got shape {tuple(value.shape)}")
    return value


@dataclass
class _Parsed:
    """One module's tensors after the family-independent checks."""

    name: str
    keys: dict  # role -> key
    down: torch.Tensor
    up: torch.Tensor
    mid: Optional[torch.Tensor]
    alpha: Optional[float]
    scale: Optional[float]
    dora_scale: Optional[torch.Tensor]

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def kernel(self) -> tuple[int, int]:
        t = self.mid if self.mid is not None else self.down
        return (int(t.shape[2]), int(t.shape[3])) if t.dim() == 4 else (1, 1)

    def implied_shape(self, module_kind: str) -> tuple[int, ...]:
        out, inp = int(self.up.shape[0]), int(self.down.shape[1])
        return (out, inp, *self.kernel()) if module_kind == "conv2d" else (out, inp)


def _parse_module(source: str, name: str, group: dict) -> _Parsed:
    if lycoris.is_lycoris_group(group):
        return lycoris.parse_module(source, name, group)
    present = ", ".join(repr(k) for k, _ in group.values())
    for role, partner in (("down", "lora_down.weight"), ("up", "lora_up.weight")):
        if role not in group:
            raise LoraFormatError(f"{source}: module {name!r} has no {name}.{partner} (found {present})")
    down_key, up_key = group["down"][0], group["up"][0]
    down = _factor(source, down_key, group["down"][1])
    up = _factor(source, up_key, group["up"][1])
    if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        raise _fail(source, up_key, f"lora_up of a conv must be (out, r, 1, 1), got {tuple(up.shape)}")
    mid = None
    if "mid" in group:
        mid_key = group["mid"][0]
        mid = _factor(source, mid_key, group["mid"][1])
        if mid.dim() != 4:
            raise _fail(source, mid_key, f"a Tucker core must be 4-D (r, r, kh, kw), got {tuple(mid.shape)}")
        if down.dim() == 4 and tuple(down.shape[2:]) != (1, 1):
            raise _fail(source, down_key, f"with lora_mid, lora_down must be (r, in, 1, 1), got {tuple(down.shape)}")
        if int(mid.shape[1]) != int(down.shape[0]) or int(mid.shape[0]) != int(up.shape[1]):
            raise _fail(source, mid_key, f"Tucker core {tuple(mid.shape)} does not fit lora_down "
                                         f"{tuple(down.shape)} and lora_up {tuple(up.shape)}")
    elif int(down.shape[0]) != int(up.shape[1]):
        raise _fail(source, down_key, f"rank mismatch: lora_down is {tuple(down.shape)} (rank {down.shape[0]}) "
                                      f"but lora_up is {tuple(up.shape)} (rank {up.shape[1]})")
    alpha = _scalar(source, group["alpha"][0], group["alpha"][1]) if "alpha" in group else None
    scale = _scalar(source, group["scale"][0], group["scale"][1]) if "scale" in group else None
    dora = None
    if "dora_scale" in group:
        dora_key, dora = group["dora_scale"]
        if not isinstance(dora, torch.Tensor) or not dora.is_floating_point():
            raise _fail(source, dora_key, "dora_scale must be a floating-point tensor")
    keys = {role: key for role, (key, _) in group.items()}
    return _Parsed(name, keys, down, up, mid, alpha, scale, dora)


def _form_fit(parsed: _Parsed, module: _Module) -> int:
    """2 when the factors have the natural form for the module kind, 1 when they need a reshape,
    0 when they cannot belong to it."""
    if isinstance(parsed, lycoris.LycorisParsed):
        return parsed.form_fit(module.kind, module.shape)
    down = parsed.down
    if module.kind == "linear":
        if parsed.mid is not None:
            return 0
        if down.dim() == 2:
            return 2
        return 1 if tuple(down.shape[2:]) == (1, 1) else 0
    if parsed.kernel() != tuple(module.shape[2:]):
        return 0
    return 2 if (down.dim() == 4 or parsed.mid is not None) else 1


def _choose_family(source: str, parsed: list[_Parsed]) -> _Table:
    names = [p.name for p in parsed]
    candidates = [_table(f) for f in FAMILIES if all(n in _table(f).by_name for n in names)]
    if not candidates:
        for p in parsed:
            if not any(p.name in _table(f).by_name for f in FAMILIES):
                raise _fail(source, p.keys["down"], f"unknown kohya module name {p.name!r} "
                                                    "(not an SD1.x, SD2 or SDXL UNet/text-encoder module)")
        per_family = {f: [n for n in names if n not in _table(f).by_name][:1] for f in FAMILIES}
        raise LoraFormatError(f"{source}: the module names mix model families (no single SD1.x/SD2/SDXL table "
                              f"has them all; first missing per family: {per_family})")
    sdxl_first = any(n.startswith(("lora_te1_", "lora_te2_")) or _LDM_UNET_NAME.match(n) for n in names)
    order = ("sdxl", "sd15", "sd2") if sdxl_first else FAMILIES

    def score(table: _Table):
        shapes = forms = 0
        for p in parsed:
            module = table.by_name[p.name]
            shapes += p.implied_shape(module.kind) == module.shape
            forms += _form_fit(p, module)
        # LDM / te1 / te2 names mean SDXL unless the shapes say otherwise: a 4-D 1×1 SDXL proj_in is
        # not an SD1.x 1×1 conv just because its factors look like one.
        prefer_sdxl = sdxl_first and table.family == "sdxl"
        return (shapes, prefer_sdxl, forms, -order.index(table.family))

    return max(candidates, key=score)


def _dora_axis(source: str, key: str, magnitude: torch.Tensor, out: int, inp: int) -> str:
    """Which axis of V = W + ΔW a kohya dora_scale normalizes, from its shape (as ComfyUI decides)."""
    shape = tuple(int(d) for d in magnitude.shape)
    if magnitude.dim() >= 2 and all(d == 1 for d in shape[2:]):
        if shape[:2] == (1, inp):
            return "in"
        if shape[:2] == (out, 1) and out != 1:
            return "out"
    elif magnitude.dim() == 1:
        if shape[0] == inp and shape[0] != out:
            return "in"
        if shape[0] == out and shape[0] != inp:
            return "out"
        if shape[0] == inp == out:
            raise _fail(source, key, f"dora_scale {shape} is ambiguous for a square ({out}×{inp}) module: "
                                     "it could normalize input columns or output rows")
    raise _fail(source, key, f"dora_scale shape {shape} fits neither (1, {inp}[, 1, 1]) (per input column) "
                             f"nor ({out}, 1[, 1, 1]) (per output row)")


def _build_layer(source: str, p: _Parsed, module: _Module, strict_shapes: bool) -> LoraLayer:
    if isinstance(p, lycoris.LycorisParsed):
        return p.build(module.key, module.kind, module.shape, strict_shapes)
    down_key = p.keys["down"]
    fit = _form_fit(p, module)
    if fit == 0:
        if module.kind == "linear":
            want = "2-D factors (or 4-D with 1×1 kernels)" + (", and no lora_mid" if p.mid is not None else "")
        else:
            want = f"a {module.shape[2]}×{module.shape[3]} kernel"
        raise _fail(source, down_key, f"factors {tuple(p.down.shape)} do not fit {module.key} "
                                      f"({'Conv2d' if module.kind == 'conv2d' else 'Linear'}: needs {want})")
    implied = p.implied_shape(module.kind)
    if strict_shapes and implied != module.shape:
        raise _fail(source, down_key, f"factors imply a weight of shape {implied} but {module.key} is {module.shape}")
    down, up, r = p.down, p.up, p.rank
    if module.kind == "linear":
        kind = "linear"
        down = down.reshape(down.shape[0], down.shape[1])  # kohya may save 1×1-kernel factors 4-D
        up = up.reshape(up.shape[0], up.shape[1])
    else:
        kind = "conv"
        if down.dim() == 2:
            down = down.reshape(*down.shape, 1, 1)
        if up.dim() == 2:
            up = up.reshape(*up.shape, 1, 1)
    if p.scale is not None:  # A1111: an explicit scale overrides alpha / r
        alpha = p.scale * r
    elif p.alpha is None or p.alpha == 0:  # kohya: missing or zero alpha means alpha = r
        alpha = float(r)
    else:
        alpha = p.alpha
    magnitude = axis = None
    if p.dora_scale is not None:
        magnitude = p.dora_scale
        axis = _dora_axis(source, p.keys["dora_scale"], magnitude, int(up.shape[0]), int(p.down.shape[1]))
    return LoraLayer(down=down, up=up, alpha=alpha, kind=kind, magnitude=magnitude, magnitude_axis=axis, mid=p.mid)


def read_kohya(state_dict: dict[str, torch.Tensor], *, source: str = "<state dict>") -> LoraAdapter:
    """A kohya / A1111 / LoCon state dict as a LoraAdapter (format ``"kohya"``, diffusers-named keys).

    The state dict is not modified; factors are kept in their file dtype (views, no copies).
    """
    if not isinstance(state_dict, dict) or not state_dict:
        raise LoraFormatError(f"{source}: expected a non-empty dict of kohya tensors")
    groups = _group(state_dict, source)
    parsed = [_parse_module(source, name, group) for name, group in groups.items()]
    table = _choose_family(source, parsed)
    modules = [table.by_name[p.name] for p in parsed]
    strict = any(p.implied_shape(m.kind) == m.shape for p, m in zip(parsed, modules))
    layers: dict[str, LoraLayer] = {}
    first_name: dict[str, str] = {}
    for p, module in zip(parsed, modules):
        if module.key in layers:
            raise _fail(source, p.keys["down"], f"module {module.key} is already targeted by {first_name[module.key]!r}")
        layers[module.key] = _build_layer(source, p, module, strict)
        first_name[module.key] = p.name
    # adapter.family: "sdxl" or "sd" (SD1.x/SD2) as chosen above; formats.families.kohya_candidates lists every
    # family whose table also holds all the names, and a target of one of those decides (resolve_family).
    return LoraAdapter(layers=layers, format="kohya", source=None if source == "<state dict>" else source,
                       family="sdxl" if table.family == "sdxl" else "sd")


# ----------------------------------------------------------------------------------------------
# writing


def _float32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32).item())


def _alpha_candidates(scale: float, rank: int) -> list:
    """scale · rank and the 4 doubles on either side of it, nearest first."""
    guess = scale * rank
    candidates = [guess]
    up = down = guess
    for _ in range(4):
        up, down = math.nextafter(up, math.inf), math.nextafter(down, -math.inf)
        candidates += [up, down]
    return candidates


def alpha_for_scale(scale: float, rank: int) -> Optional[torch.Tensor]:
    """The 0-d alpha tensor with alpha / rank == scale exactly in float64 (as the readers divide): float32 when a
    float32 value does it, else float64; None when no double near scale · rank does."""
    candidates = _alpha_candidates(scale, rank)
    for c in candidates:
        c32 = _float32(c)
        if c32 != 0 and c32 / rank == scale:
            return torch.tensor(c32, dtype=torch.float32)
    exact = [c for c in candidates if c != 0 and c / rank == scale]
    return torch.tensor(exact[0], dtype=torch.float64) if exact else None


def _stored_alpha(layer: LoraLayer, source: str, key: str) -> torch.Tensor:
    """The 0-d ``.alpha`` tensor whose alpha / r reproduces ``layer.scale``.

    Plain layers: alpha itself, as float32 when float32 holds it exactly, else as float64 (e.g. 0.3
    from a diffusers metadata JSON), so the scale is exact. rsLoRA layers (kohya has no rsLoRA flag)
    are folded: alpha' with alpha' / r == alpha / sqrt(r). An exact float32 alpha' is preferred, then an
    exact float64 one; when no double divides back exactly (r not a power of two can skip values), the
    double whose alpha' / r is nearest is used: the scale is then off by at most one float64 ulp and
    its float32 rounding, which the delta uses, is checked to be unchanged.
    """
    r = layer.rank
    target = layer.scale
    if layer.alpha == 0 or target == 0:
        raise LoraFormatError(f"{source}: {key}: alpha 0 has no kohya form (kohya reads alpha 0 as alpha = rank)")
    if not math.isfinite(target) or not math.isfinite(layer.alpha):
        raise LoraFormatError(f"{source}: {key}: alpha {layer.alpha} is not finite")
    if not layer.use_rslora:
        alpha = layer.alpha
        dtype = torch.float32 if _float32(alpha) == alpha else torch.float64
        return torch.tensor(alpha, dtype=dtype)
    exact = alpha_for_scale(target, r)
    if exact is not None:
        return exact
    best = min(_alpha_candidates(target, r), key=lambda c: abs(c / r - target))
    if _float32(best / r) != _float32(target):
        raise LoraFormatError(f"{source}: {key}: cannot fold the rsLoRA scale {target!r} into a kohya alpha at rank {r}")
    return torch.tensor(best, dtype=torch.float64)


def _writer_family(adapter: LoraAdapter, source: str) -> str:
    """``"sdxl"`` or ``"sd"`` (SD1.x/SD2 naming: diffusers-style UNet names, ``lora_te_``).

    SDXL when the adapter has text_encoder_2, or UNet modules that exist only in the SDXL UNet
    (e.g. ``down_blocks.1.attentions.0.transformer_blocks.1``, ``up_blocks.0.attentions``,
    ``add_embedding``). SD when it has UNet modules that exist only in SD1.x/SD2 (e.g.
    ``down_blocks.0.attentions``, ``down_blocks.3``). When every UNet module exists in both, SDXL
    only if every UNet layer's weight shape equals the full-size SDXL one. Text-encoder-only
    adapters get SD naming (``lora_te_``).
    """
    sdxl, sd15, sd2 = _table("sdxl"), _table("sd15"), _table("sd2")
    has_te2 = any(split_component(k)[0] == "text_encoder_2" for k in adapter.layers)
    unet = [(k, l) for k, l in adapter.layers.items() if split_component(k)[0] == "unet"]
    in_sdxl = [k in sdxl.by_key for k, _ in unet]
    in_sd = [k in sd15.by_key or k in sd2.by_key for k, _ in unet]
    for (key, _), x, s in zip(unet, in_sdxl, in_sd):
        if not x and not s:
            raise LoraFormatError(f"{source}: module {key!r} has no kohya name (not an SD1.x/SD2/SDXL UNet module)")
    if has_te2:
        for (key, _), x in zip(unet, in_sdxl):
            if not x:
                raise LoraFormatError(f"{source}: module {key!r} is not an SDXL UNet module, "
                                      "but the adapter has text_encoder_2 (SDXL)")
        return "sdxl"
    if all(in_sdxl) and not all(in_sd):
        return "sdxl"
    if all(in_sd) and not all(in_sdxl):
        return "sd"
    if not unet:
        return "sd"
    if all(in_sdxl) and all(in_sd):
        full_sdxl = all(layer.weight_shape == sdxl.by_key[key].shape for key, layer in unet)
        return "sdxl" if full_sdxl else "sd"
    only_sdxl = next(k for (k, _), x, s in zip(unet, in_sdxl, in_sd) if x and not s)
    only_sd = next(k for (k, _), x, s in zip(unet, in_sdxl, in_sd) if s and not x)
    raise LoraFormatError(f"{source}: the UNet modules mix SDXL-only ({only_sdxl!r}) and SD1.x/SD2-only "
                          f"({only_sd!r}) layouts; no kohya naming fits both")


def _module_for_write(key: str, family: str) -> Optional[_Module]:
    tables = (_table("sdxl"),) if family == "sdxl" else (_table("sd15"), _table("sd2"))
    for table in tables:
        module = _lookup_key(table, key)
        if module is not None:
            return module
    return None


def _dora_for_write(layer: LoraLayer, source: str, key: str) -> torch.Tensor:
    m = layer.magnitude
    out, inp = layer.out_features, int(layer.down.shape[1])
    if layer.magnitude_axis == "in":
        return m.contiguous()
    # An output-axis magnitude only has a kohya form in the LyCORIS output-row shape (out, 1[, 1, 1]),
    # i.e. when it came from such a file. PEFT's (out,) / (1, out, 1, 1) magnitudes normalize with
    # other conventions than kohya's per-input-column dora_scale: converting them would be wrong.
    shape = tuple(m.shape)
    if m.dim() >= 2 and shape[:2] == (out, 1) and out != 1 and all(d == 1 for d in shape[2:]):
        return m.contiguous()
    raise LoraFormatError(f"{source}: {key}: a PEFT-style DoRA magnitude (per output row, shape {shape}) has no "
                          f"kohya form; kohya's dora_scale is per input column (1, {inp}[, 1, 1])")


def _factors_for_write(layer: LoraLayer, module: _Module, source: str, key: str):
    """(down, up) in the form kohya readers expect for the module: 4-D for a Conv2d, 2-D for a Linear.

    A flattened (r, in·kh·kw) down on a k×k conv is the same delta as its (r, in, kh, kw) reshape, so it is
    reshaped; factors that cannot belong to the module are refused before anything is written.
    """
    down, up = layer.down, layer.up
    if module.kind == "linear":
        if layer.mid is not None or (down.dim() == 4 and tuple(down.shape[2:]) != (1, 1)):
            raise LoraFormatError(f"{source}: {key}: conv factors {tuple(down.shape)} do not fit a Linear module")
        return down, up
    kernel = tuple(int(d) for d in module.shape[2:])
    if layer.mid is None and down.dim() == 2:
        kh, kw = kernel
        if down.shape[1] % (kh * kw):
            raise LoraFormatError(f"{source}: {key}: factors {tuple(down.shape)} do not fit a {kh}×{kw} Conv2d")
        down = down.reshape(down.shape[0], down.shape[1] // (kh * kw), kh, kw)
    if up.dim() == 2:
        up = up.reshape(*up.shape, 1, 1)
    got = tuple(layer.mid.shape[2:]) if layer.mid is not None else tuple(down.shape[2:])
    if got != kernel:
        raise LoraFormatError(f"{source}: {key}: factors with a {got[0]}×{got[1]} kernel do not fit a "
                              f"{kernel[0]}×{kernel[1]} Conv2d")
    return down, up


def write_kohya(adapter: LoraAdapter, *, source: str = "<adapter>",
                block_diagonal: bool = False) -> dict[str, torch.Tensor]:
    """The adapter as a kohya state dict: kohya's own names, one ``.alpha`` per module.

    SD1.x/SD2 adapters get diffusers-style UNet names and ``lora_te_``; SDXL adapters get LDM UNet
    names and ``lora_te1_`` / ``lora_te2_`` (see ``_writer_family`` for how the family is decided);
    Flux.1 / SD3 adapters get sd-scripts' names from their family table (``formats.fused.write_fused_kohya``;
    ``block_diagonal`` applies there: split modules that do not share their down matrix).
    Every module's delta is unchanged by ``read_kohya(write_kohya(adapter))``. Everything is checked
    before anything is returned; what kohya cannot express raises LoraFormatError naming the module.
    """
    if not adapter.layers:
        raise LoraFormatError(f"{source}: the adapter has no layers")
    if any(split_component(k)[0] == "transformer" for k in adapter.layers):
        from .families import adapter_family
        from .fused import family_table, write_fused_kohya

        table = family_table(adapter_family(adapter) or "")
        if table is not None:  # sd-scripts' Flux / SD3 names (fused projections re-fused)
            return write_fused_kohya(adapter, table, source=source, block_diagonal=block_diagonal)
    for key in adapter.layers:
        component, _ = split_component(key)
        if component not in ("unet", "text_encoder", "text_encoder_2"):
            raise LoraFormatError(f"{source}: module {key!r} has no kohya name (kohya files hold only unet, "
                                  "text_encoder and text_encoder_2 modules of SD1.x/SD2/SDXL)")
    family = _writer_family(adapter, source)
    out: dict[str, torch.Tensor] = {}
    written: dict[str, str] = {}  # kohya name -> adapter key
    for key, layer in adapter.layers.items():
        if layer.kind == "embedding":
            raise LoraFormatError(f"{source}: {key}: embedding LoRA layers have no kohya form")
        if layer.fan_in_fan_out:
            raise LoraFormatError(f"{source}: {key}: fan_in_fan_out layers have no kohya form")
        if layer.bias is not None and layer.algorithm != "full":  # a full diff's bias is its diff_b
            raise LoraFormatError(f"{source}: {key}: a lora_B bias has no kohya form")
        module = _module_for_write(key, family)
        if module is None:
            raise LoraFormatError(f"{source}: module {key!r} has no kohya name in the "
                                  f"{'SDXL' if family == 'sdxl' else 'SD1.x/SD2'} tables")
        name = module.names[0]
        if name in written:
            raise LoraFormatError(f"{source}: {key} and {written[name]} are the same module ({name})")
        written[name] = key
        if layer.algorithm != "lora":  # LoHa / LoKr / full diff: its LyCORIS tensors as read (formats/lycoris.py)
            if tuple(layer.weight_shape[2:]) not in ((), (1, 1), tuple(module.shape[2:])) or (
                    len(layer.weight_shape) == 4 and tuple(layer.weight_shape[2:]) != tuple(module.shape[2:]) or ()):
                raise LoraFormatError(f"{source}: {key}: a {layer.weight_shape} {layer.algorithm} layer does not fit "
                                      f"{name} {module.shape}")
            out.update(lycoris.write_tensors(layer, name))
            continue
        down, up = _factors_for_write(layer, module, source, key)
        out[f"{name}.lora_down.weight"] = down.contiguous()
        out[f"{name}.lora_up.weight"] = up.contiguous()
        if layer.mid is not None:
            out[f"{name}.lora_mid.weight"] = layer.mid.contiguous()
        out[f"{name}.alpha"] = _stored_alpha(layer, source, key)
        if layer.magnitude is not None:
            out[f"{name}.dora_scale"] = _dora_for_write(layer, source, key)
    return out
