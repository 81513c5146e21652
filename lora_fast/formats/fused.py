"""Transformer-family LoRA layouts that name modules of the model's original (non-diffusers) code: one
generic reader and writer, driven by per-family tables.

A family (:class:`FusedFamily`) is data: a tuple of :class:`FusedModule` entries (an original module name,
how its output rows split into parts, and which diffusers module takes which parts), the layouts that spell
those names (kohya sd-scripts ``lora_unet_<name with '.' -> '_'>``, BFL/ComfyUI ``[diffusion_model.]<name>``,
XLabs processor names, OneTrainer's diffusers names...), and how its kohya text-encoder roots map to
components. Flux.1 (``formats/flux.py``), SD3/SD3.5 (``formats/sd3.py``) and Wan 2.x (``formats/wan.py``) are
such tables; adding a family or a layout is a table entry, not code.

A LoRA on a fused projection becomes one LoRA per diffusers module: every split module gets the same down
(A) matrix (the same tensor, not a copy) and its rows of the up (B) matrix, so ΔW_part = s·B_part·A is
exactly the part's rows of s·B·A. The scale is that of the fused module (alpha / rank of the file's module,
alpha = rank when missing or 0, as sd-scripts trains it) for every part. LyCORIS LoHa/LoKr/full modules in the
kohya-style layouts split by rows too (see "LyCORIS modules" below and docs/formats.md).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..adapter import LoraAdapter, LoraLayer, split_component
from ..errors import LoraFormatError


@dataclass(frozen=True)
class FusedModule:
    """One original module (``{i}`` = block index) and where its rows go in diffusers.

    bfl: the module's name in the original code (BFL names for Flux, MMDiT names for SD3, ...).
    parts: relative sizes of the output-row parts (rows = sum(parts) · unit).
    targets: (diffusers module path under the component, indices of the parts it takes, in order).
    kind: ``"linear"``, or ``"conv"`` for a k×k Conv2d (one target, no split; e.g. SD3's patch embedding).
    rows_per_in: when set, the entry applies only to a module with rows == rows_per_in · in features (the same
      original name can mean different splits by shape, e.g. SD3's last context block, whose adaLN has 2 parts).
    """

    bfl: str
    parts: tuple
    targets: tuple
    component: str = "transformer"
    kind: str = "linear"
    rows_per_in: Optional[int] = None

    def fits(self, rows: int, inp: int) -> bool:
        return self.rows_per_in is None or rows == self.rows_per_in * inp


def one(bfl: str, target: str, **kw) -> FusedModule:
    """An original module that is one diffusers module."""
    return FusedModule(bfl, (1,), ((target, (0,)),), **kw)


def compile_template(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$")


def kohya_name(bfl: str) -> str:
    return "lora_unet_" + bfl.replace(".", "_")


#: Tensor suffixes per layout -> role.
SUFFIXES = {
    "kohya": {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"},
    "onetrainer": {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"},
    "bfl": {"lora_A.weight": "down", "lora_B.weight": "up", "lora_down.weight": "down", "lora_up.weight": "up",
            "alpha": "alpha"},
    "xlabs": {"down.weight": "down", "up.weight": "up"},
}
#: Layouts whose module names may carry ComfyUI's ``diffusion_model.`` prefix.
_PREFIXED = ("bfl", "xlabs", "native")
_PREFIX = "diffusion_model."


@dataclass(frozen=True)
class FusedFamily:
    """One model family's table.

    family: ``adapter.family`` (``"flux"``, ``"sd3"``, ``"wan"``).
    modules: every original module a trainer targets.
    layouts: layout name -> ((file module name template, FusedModule), ...). ``"kohya"`` is derived from
      ``modules`` when not given.
    kohya_markers: kohya name prefixes that mark the family even when one module is unknown (so the error names
      the odd key instead of calling the file an SD1.x/SDXL one).
    clip_roots: kohya text-encoder root -> name table of lora_fast's kohya tables that spells it (``"sdxl"``:
      ``lora_te1_`` is CLIP-L / ``text_encoder``, ``lora_te2_`` is CLIP-G / ``text_encoder_2``).
    t5: (regex on the kohya name, component, path template) for the T5 text encoder (``lora_te3_``), or None.
    writes: the component each CLIP kohya root is written from (``lora_te1_`` for ``text_encoder``...).
    """

    family: str
    modules: tuple
    layouts: dict = field(default_factory=dict)
    kohya_markers: tuple = ()
    clip_roots: dict = field(default_factory=dict)
    t5: Optional[tuple] = None
    writes: dict = field(default_factory=dict)

    def patterns(self, layout: str):
        return _patterns(self, layout)


_PATTERN_CACHE: dict = {}


def _patterns(fam: FusedFamily, layout: str):
    key = (fam.family, layout)
    if key not in _PATTERN_CACHE:
        if layout == "kohya" and "kohya" not in fam.layouts:
            entries = [(kohya_name(m.bfl), m) for m in fam.modules]
        else:
            entries = list(fam.layouts.get(layout, ()))
        _PATTERN_CACHE[key] = [(compile_template(t), m) for t, m in entries]
    return _PATTERN_CACHE[key]


def family_layouts(fam: FusedFamily) -> tuple[str, ...]:
    return tuple(dict.fromkeys(("kohya", *fam.layouts)))


#: Registered families, in detection order (see :func:`detect_fused_layout`).
_FAMILIES: list[FusedFamily] = []


def register_family(fam: FusedFamily) -> FusedFamily:
    if all(f.family != fam.family for f in _FAMILIES):
        _FAMILIES.append(fam)
    return fam


def families() -> tuple[FusedFamily, ...]:
    # importing the table modules registers them (flux first: its layouts were detected first historically)
    from . import flux, sd3, wan  # noqa: F401

    return tuple(_FAMILIES)


def family_table(name: str) -> Optional[FusedFamily]:
    return next((f for f in families() if f.family == name), None)


# ----------------------------------------------------------------------------------------------
# detection


#: Layouts whose files may hold LyCORIS LoHa/LoKr/full modules (``<module>.hada_w1_a``..., formats/lycoris.py).
_LYCORIS_LAYOUTS = ("kohya", "onetrainer")


def _split_key(key: str, layout: str) -> Optional[tuple[str, str]]:
    """(module name, role) of a key in a layout, or None. A LyCORIS tensor's role is its suffix."""
    for suffix, role in SUFFIXES[layout].items():
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], role
    if layout in _LYCORIS_LAYOUTS:
        from .lycoris import is_lycoris_suffix

        name, dot, suffix = key.rpartition(".")
        if dot and name and (is_lycoris_suffix(suffix) or suffix == "dora_scale"):
            return name, suffix
    return None


def _matches(fam: FusedFamily, name: str, layout: str) -> list[tuple[FusedModule, Optional[str]]]:
    if layout in _PREFIXED and name.startswith(_PREFIX):
        name = name[len(_PREFIX):]
    out = []
    for pattern, module in fam.patterns(layout):
        m = pattern.match(name)
        if m:
            out.append((module, m.group(1) if m.groups() else None))
    return out


def _is_text_encoder_key(fam: FusedFamily, key: str) -> bool:
    roots = tuple(fam.clip_roots) + (("lora_te3_",) if fam.t5 is not None else ())
    return bool(roots) and key.startswith(roots)


def detect_fused_layout(keys) -> Optional[tuple[FusedFamily, str]]:
    """(family table, layout) when every key is a key of one registered family in one layout (kohya-style
    layouts may also hold that family's text-encoder keys), else None."""
    keys = [k for k in keys if isinstance(k, str)]
    if not keys:
        return None
    for fam in families():
        for layout in family_layouts(fam):
            found = 0
            for key in keys:
                if layout in ("kohya", "onetrainer") and _is_text_encoder_key(fam, key):
                    continue
                split = _split_key(key, layout)
                if split is None or not _matches(fam, split[0], layout):
                    break
                found += 1
            else:
                if found:
                    return fam, layout
    # A kohya file naming a family's blocks but also something the table lacks: that family's reader names the key.
    for fam in families():
        if fam.kohya_markers and any(k.startswith(fam.kohya_markers) for k in keys):
            return fam, "kohya"
    return None


# ----------------------------------------------------------------------------------------------
# reading


def _fail(source: str, key: str, problem: str) -> LoraFormatError:
    return LoraFormatError(f"{source}: key {key!r}: {problem}")


def _split_layers(source: str, candidates, group: dict, alpha: Optional[float], family: str):
    """{diffusers key: LoraLayer} for one file module."""
    from .kohya import _factor

    down_key, down = group["down"]
    up_key, up = group["up"]
    down, up = _factor(source, down_key, down), _factor(source, up_key, up)
    rows, inp = int(up.shape[0]), int(down.shape[1])
    fitting = [(m, i) for m, i in candidates if m.fits(rows, inp)]
    if not fitting:
        m, i = candidates[0]
        raise _fail(source, up_key, f"{rows} output rows do not fit {m.bfl.format(i=i)}")
    fused, index = fitting[0]
    if up.dim() == 4:
        if tuple(up.shape[2:]) != (1, 1):
            raise _fail(source, up_key, f"lora_up must be (out, r[, 1, 1]), got {tuple(up.shape)}")
        up = up.reshape(up.shape[0], up.shape[1])
    if fused.kind == "conv":
        if down.dim() != 4:
            raise _fail(source, down_key, f"{fused.bfl.format(i=index)} is a Conv2d; expected 4-D (r, in, kh, kw) "
                                          f"factors, got {tuple(down.shape)}")
    elif down.dim() == 4:
        if tuple(down.shape[2:]) != (1, 1):
            raise _fail(source, down_key, f"a {FAMILY_LABELS.get(family, family)} module here is a Linear; got conv "
                                          f"factors {tuple(down.shape)}")
        down = down.reshape(down.shape[0], down.shape[1])
    rank = int(down.shape[0])
    if int(up.shape[1]) != rank:
        raise _fail(source, down_key, f"rank mismatch: down is {tuple(down.shape)} but up is {tuple(up.shape)}")
    if alpha is None or alpha == 0:  # sd-scripts: a missing or zero alpha means alpha = rank (scale 1)
        alpha = float(rank)
    total = sum(fused.parts)
    if rows % total:
        raise _fail(source, up_key, f"{rows} output rows do not split into parts {fused.parts} of "
                                    f"{fused.bfl.format(i=index)}")
    unit = rows // total
    bounds, start = [], 0
    for p in fused.parts:
        bounds.append((start, start + p * unit))
        start += p * unit
    out = {}
    for path, take in fused.targets:
        pieces = [up[a:b] for a, b in (bounds[t] for t in take)]
        part_up = pieces[0] if len(pieces) == 1 else torch.cat(pieces, 0)
        key = f"{fused.component}.{path.format(i=index)}"
        if fused.kind == "conv":
            out[key] = LoraLayer(down=down, up=part_up.reshape(*part_up.shape, 1, 1), alpha=alpha, kind="conv")
        else:
            out[key] = LoraLayer(down=down, up=part_up, alpha=alpha, kind="linear")
    return out


FAMILY_LABELS = {"flux": "Flux.1", "sd3": "SD3/SD3.5", "wan": "Wan 2.x"}


# ---------------------------------------------------------------------------------------------- LyCORIS modules
#
# A LoHa, LoKr or full-diff module of the original model becomes one layer per diffusers module it maps to. One to
# one: the layer as the kohya reader builds it (its tensors as read). Split by output rows (qkv, linear1, a swapped
# adaLN): each part's delta is exactly the rows of the whole module's delta,
#
# * LoHa ΔW = s·(w1_a w1_b) ⊙ (w2_a w2_b): the rows of w1_a and w2_a (w?_b shared, the same tensors), scale unchanged;
# * full: the rows of diff (and of diff_b);
# * LoKr ΔW = s·kron(W1, W2), W2 (c, d): row i is W1's row i // c times W2's row i % c, so a part whose row bounds are
#   multiples of c is kron(W1[rows / c], W2): the rows of lokr_w1 (or lokr_w1_a), W2 shared, scale unchanged. A part
#   whose bounds are not multiples of c is no Kronecker product: it becomes a full-diff slice in float32, the rows of
#   rn32(rn32(W1·rn32(s)) · W2), which is what the merge kernels add for the unsplit module at strength 1 (same bits
#   when fused alone at weight 1; at another weight the diff is scaled after that rounding). That costs 4 bytes per
#   element of the part (Flux's linear1 with the LyCORIS default factorization, W2 of 168 rows: 264 MB per block).
#
# Row tensors per algorithm: (suffixes, rows of the weight per tensor row) -> see _row_tensors.


def _lokr_w1_rows(t: dict) -> int:
    return int((t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"]).shape[0])


def _row_tensors(algorithm: str, t: dict, out: int) -> tuple[tuple, int]:
    """(the suffixes whose rows are the weight's rows, weight rows per tensor row) of a LyCORIS module."""
    if algorithm == "loha":
        return ("hada_w1_a", "hada_w2_a"), 1
    if algorithm == "full":
        return ("diff",), 1
    return ("lokr_w1" if "lokr_w1" in t else "lokr_w1_a",), out // _lokr_w1_rows(t)


def _take_rows(x: torch.Tensor, spans) -> torch.Tensor:
    pieces = [x[a:b] for a, b in spans]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, 0)


def _lycoris_layers(source: str, candidates, name: str, group: dict, family: str) -> dict:
    """{diffusers key: LoraLayer} for one LyCORIS module of a table family (see the section comment)."""
    from . import lycoris

    p = lycoris.parse_module(source, name, group)
    algo = lycoris.ALGORITHM_NAMES[p.algorithm]
    first_key = p.keys["down"]
    fitting = [(m, i) for m, i in candidates if m.fits(p.out, p.in_flat)]
    if not fitting:
        m, i = candidates[0]
        raise _fail(source, first_key, f"{p.out} output rows do not fit {m.bfl.format(i=i)}")
    fused, index = fitting[0]
    where = fused.bfl.format(i=index)
    if fused.kind == "conv":
        if p.kernel_shape is None:
            raise _fail(source, first_key, f"{where} is a Conv2d, but these LyCORIS {algo} tensors do not say its "
                                           "kernel size (a flattened (r, in·kh·kw) factor)")
        kind, shape = "conv2d", tuple(p.implied_shape("conv2d"))
    else:
        if p.kernel_shape not in (None, (1, 1)):
            raise _fail(source, first_key, f"a {FAMILY_LABELS.get(family, family)} module here is a Linear; got "
                                           f"LyCORIS {algo} conv tensors (kernel {p.kernel_shape})")
        kind, shape = "linear", (p.out, p.in_flat)
    total = sum(fused.parts)
    if p.out % total:
        raise _fail(source, first_key, f"{p.out} output rows do not split into parts {fused.parts} of {where}")
    if len(fused.targets) == 1 and tuple(fused.targets[0][1]) == tuple(range(len(fused.parts))):  # one to one
        key = f"{fused.component}.{fused.targets[0][0].format(i=index)}"
        return {key: p.build(key, kind, shape)}
    unit = p.out // total
    bounds, start = [], 0
    for part in fused.parts:
        bounds.append((start, start + part * unit))
        start += part * unit
    if p.dora_scale is not None:
        raise _fail(source, p.keys["dora_scale"], f"{where} is split into {len(fused.targets)} diffusers modules, "
                                                  f"and a DoRA {algo} module's column norms cover all of its rows: "
                                                  "no split form is exact")
    if any(n in p.tensors for n in ("hada_t1", "hada_t2")):
        raise _fail(source, first_key, f"a Tucker LoHa module on {where}, a Linear, is not supported")
    whole = p.build(f"{fused.component}.{where}", kind, shape)  # checks and the layer's own alpha/scale rules
    rows_of, per = _row_tensors(p.algorithm, p.tensors, p.out)
    out = {}
    for path, take in fused.targets:
        key = f"{fused.component}.{path.format(i=index)}"
        spans = [bounds[t] for t in take]
        n = sum(b - a for a, b in spans)
        if any(a % per or b % per for a, b in spans):  # LoKr rows not on W2's row blocks: a full-diff slice
            w1, w2 = whole.halves()
            s32 = torch.tensor(whole.scale, dtype=torch.float32)
            pieces = []
            for a, b in spans:
                k0, k1 = a // per, -(-b // per)
                block = torch.kron(w1[k0:k1] * s32, w2)  # rn32(rn32(u·s)·v) per element
                pieces.append(block[a - k0 * per:b - k0 * per])
            diff = pieces[0] if len(pieces) == 1 else torch.cat(pieces, 0)
            out[key] = LoraLayer(kind="linear", algorithm="full", lycoris={"diff": diff.contiguous()}, shape=(n, p.in_flat))
            continue
        tensors = dict(p.tensors)
        for suffix in rows_of:
            tensors[suffix] = _take_rows(tensors[suffix], [(a // per, b // per) for a, b in spans])
        bias = None if p.diff_b is None else _take_rows(p.diff_b, spans)
        out[key] = LoraLayer(alpha=whole.alpha, kind="linear", bias=bias, algorithm=p.algorithm, lycoris=tensors,
                             shape=(n, p.in_flat))
    return out


def _t5_key(fam: FusedFamily, name: str) -> Optional[str]:
    if fam.t5 is None:
        return None
    pattern, component, template = fam.t5
    m = pattern.match(name)
    return f"{component}.{template.format(*m.groups())}" if m else None


def read_fused(state_dict: dict, fam: FusedFamily, layout: str, *, source: str = "<state dict>",
               metadata: Optional[dict] = None) -> LoraAdapter:
    """A state dict in one of a family's layouts as a LoraAdapter with diffusers module keys."""
    from .kohya import _Module, _build_layer, _classify_suffix, _parse_module, _scalar, _table

    from .lycoris import is_lycoris_group

    label = FAMILY_LABELS.get(fam.family, fam.family)
    te_keys = {k: v for k, v in state_dict.items()
               if layout in ("kohya", "onetrainer") and _is_text_encoder_key(fam, k)}
    groups: dict[str, dict] = {}
    for key, value in state_dict.items():
        if key in te_keys:
            continue
        split = _split_key(key, layout)
        if split is None:
            raise _fail(source, key, f"not a {label} {layout} LoRA key")
        name, role = split
        if role in groups.setdefault(name, {}):
            raise _fail(source, key, f"module {name!r} has two {role} tensors ({groups[name][role][0]!r})")
        groups[name][role] = (key, value)
    layers: dict[str, LoraLayer] = {}
    origin: dict[str, str] = {}
    for name, group in groups.items():
        found = _matches(fam, name, layout)
        if not found:
            raise _fail(source, next(iter(group.values()))[0], f"unknown {label} module {name!r}")
        for role in ("down", "up"):
            if role not in group and not is_lycoris_group(group):
                raise LoraFormatError(f"{source}: {label} module {name!r} has no {role} tensor "
                                      f"(found {[k for k, _ in group.values()]})")
        from .lycoris import is_lycoris_group

        if is_lycoris_group(group):
            split = _lycoris_layers(source, found, name, group, fam.family)
        else:
            if "dora_scale" in group:
                raise _fail(source, group["dora_scale"][0], f"a DoRA {label} LoRA module in this layout is not "
                                                            "supported (dora_scale)")
            alpha = _scalar(source, group["alpha"][0], group["alpha"][1]) if "alpha" in group else None
            split = _split_layers(source, found, group, alpha, fam.family)
        for key, layer in split.items():
            if key in layers:
                raise LoraFormatError(f"{source}: {name!r} and {origin[key]!r} both target {key}")
            layers[key], origin[key] = layer, name
    if te_keys:
        # CLIP: kohya's lora_te1_ / lora_te2_ (or lora_te_) names, as the SDXL / SD1.x tables spell them; T5: lora_te3_.
        te_groups: dict[str, dict] = {}
        for key, value in te_keys.items():
            name, dot, suffix = key.partition(".")
            if not dot or not suffix:
                raise _fail(source, key, "has no '.<tensor>' part after the module name")
            te_groups.setdefault(name, {})[_classify_suffix(source, key, suffix)] = (key, value)
        for name, group in te_groups.items():
            p = _parse_module(source, name, group)
            t5_key = _t5_key(fam, name)
            module = None
            if t5_key is not None:
                module = _Module(t5_key, "linear", (int(p.up.shape[0]), int(p.down.shape[1])), (name,))
            else:
                root = next((r for r in fam.clip_roots if name.startswith(r)), None)
                if root is not None:
                    module = _table(fam.clip_roots[root]).by_name.get(name)
            if module is None or not module.key.startswith(("text_encoder.", "text_encoder_2.", "text_encoder_3.")):
                roots = ", ".join(f"{r}: {c}" for r, c in fam.writes.items())
                raise _fail(source, p.keys["down"], f"unknown kohya {label} text-encoder module {name!r} ({roots})")
            layers[module.key] = _build_layer(source, p, module, strict_shapes=False)
    return LoraAdapter(layers=layers, format=layout, metadata=dict(metadata or {}),
                       source=None if source == "<state dict>" else source, family=fam.family)


# ----------------------------------------------------------------------------------------------
# checkpoints in original names (lora-fast merge into flux1-dev.safetensors...)

#: Prefixes a single-file checkpoint may put before a family's original names (ComfyUI's full-model files).
CHECKPOINT_PREFIXES = ("model.diffusion_model.", "diffusion_model.")


@dataclass(frozen=True)
class OriginalPlace:
    """Where one diffusers module lives in a checkpoint of original names.

    tensor: the checkpoint's weight name (its prefix included), e.g. ``double_blocks.0.img_attn.qkv.weight``.
    chunks: ((module row start, module row stop, tensor row start), ...): the module's output rows, chunk by chunk,
      and where each chunk starts in the tensor (a swapped adaLN has two chunks in the other order).
    whole: the module is the whole tensor, rows in order (a plain rename).
    """

    tensor: str
    chunks: tuple
    whole: bool


def _strip_checkpoint_prefix(name: str) -> str:
    for prefix in CHECKPOINT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def original_places(shapes: dict) -> tuple[Optional[FusedFamily], dict]:
    """(family, {``component.diffusers path``: OriginalPlace}) for a checkpoint whose tensors (``shapes``: name ->
    shape) name a table family's modules by their original names (BFL ``double_blocks.0.img_attn.qkv.weight``, SD3
    ``joint_blocks.0.x_block.attn.qkv.weight``..., optionally with ComfyUI's ``model.diffusion_model.`` prefix);
    (None, {}) when no family's fused (split) module is named there. The reverse of the reader: the row bounds come
    from the family table and the tensor's rows, so a family or a layout is still a table entry."""
    weights = {}
    for name, shape in shapes.items():
        if name.endswith(".weight") and len(shape) >= 2:
            weights.setdefault(_strip_checkpoint_prefix(name)[: -len(".weight")], (name, tuple(shape)))
    best, best_count = None, 0
    for fam in families():  # the family naming the most of the tensors (Flux and SD3 share final_layer.*)
        compiled = [(compile_template(m.bfl), m) for m in fam.modules]
        if not any(len(m.targets) > 1 and p.match(stem) for p, m in compiled for stem in weights):
            continue
        count = sum(any(p.match(stem) for p, _ in compiled) for stem in weights)
        if count > best_count:
            best, best_count = (fam, compiled), count
    if best is not None:
        fam, compiled = best
        places: dict = {}
        for stem, (name, shape) in weights.items():
            rows, inp = shape[0], math.prod(shape[1:])
            for pattern, fused in compiled:
                m = pattern.match(stem)
                if not m or not fused.fits(rows, inp) or rows % sum(fused.parts):
                    continue
                index = m.group(1) if m.groups() else None
                unit = rows // sum(fused.parts)
                starts = [unit * sum(fused.parts[:t]) for t in range(len(fused.parts))]
                for path, take in fused.targets:
                    chunks, at = [], 0
                    for t in take:
                        chunks.append((at, at + fused.parts[t] * unit, starts[t]))
                        at += fused.parts[t] * unit
                    whole = tuple(take) == tuple(range(len(fused.parts)))
                    places[f"{fused.component}.{path.format(i=index)}"] = OriginalPlace(name, tuple(chunks), whole)
                break
        return fam, places
    return None, {}


# ----------------------------------------------------------------------------------------------
# writing kohya (sd-scripts) files


def _fused_of(fam: FusedFamily, path: str, layer: LoraLayer):
    """(FusedModule, block index, target position) of a diffusers module path, or None.

    A module with ``rows_per_in`` is checked against the whole original module's rows implied by this part."""
    for fused in fam.modules:
        for pos, (template, take) in enumerate(fused.targets):
            m = compile_template(template).match(path)
            if not m:
                continue
            if fused.rows_per_in is not None:
                taken = sum(fused.parts[t] for t in take)
                unit, rem = divmod(layer.out_features, taken)
                inp = int(layer.down.shape[1]) if layer.algorithm == "lora" else layer.in_features
                if rem or not fused.fits(unit * sum(fused.parts), inp):
                    continue
            return fused, (m.group(1) if m.groups() else None), pos
    return None


def write_fused_kohya(adapter: LoraAdapter, fam: FusedFamily, *, source: str = "<adapter>",
                      block_diagonal: bool = False) -> dict[str, torch.Tensor]:
    """An adapter of a table family as an sd-scripts state dict: split modules re-fused into the original module
    they came from.

    The split modules of one original module share their down matrix (equal values), rank and alpha when
    ``read_fused`` produced them: one sd-scripts module, the parts' up rows stacked; a split module the adapter lacks
    gets zero rows in the fused up matrix (the same delta). Split modules that do not share them (independent
    ``to_q``/``to_k``/``to_v`` LoRAs trained in diffusers names) raise LoraFormatError naming the module and what
    differs, unless ``block_diagonal``: then the exact block-diagonal form is written (see :func:`_block_diagonal`:
    rank the sum of the parts' ranks). CLIP modules are written with the family's ``lora_te1_`` / ``lora_te2_`` roots, T5 modules
    ``lora_te3_``. Reading the result back gives every module's delta unchanged; a kohya file read and written
    again is bit-identical.
    """
    from .kohya import _lookup_key, _stored_alpha, _table

    label = FAMILY_LABELS.get(fam.family, fam.family)
    groups: dict = {}  # (bfl, index) -> (fused, {target position: (key, layer)})
    out: dict[str, torch.Tensor] = {}
    for key, layer in adapter.layers.items():
        component, path = split_component(key)
        if layer.algorithm != "lora":  # LyCORIS LoHa/LoKr/full: written as read, split parts re-fused below
            pass
        elif layer.kind not in ("linear", "conv") or layer.mid is not None or layer.magnitude is not None \
                or layer.bias is not None or layer.fan_in_fan_out:
            raise LoraFormatError(f"{source}: {key}: only plain LoRA layers have an sd-scripts {label} form")
        if component == "transformer":
            found = _fused_of(fam, path, layer)
            if found is None or (layer.kind == "conv") != (found[0].kind == "conv"):
                raise LoraFormatError(f"{source}: module {key!r} has no sd-scripts {label} name")
            fused, index, pos = found
            groups.setdefault((fused.bfl, index), (fused, {}))[1][pos] = (key, layer)
            continue
        name = None
        if layer.kind == "linear":
            root = fam.writes.get(component)
            if root == "lora_te3_" and fam.t5 is not None:
                name = "lora_te3_" + path.replace(".", "_")
                if _t5_key(fam, name) != key:
                    name = None
            elif root is not None:
                module = _lookup_key(_table(fam.clip_roots[root]), key)
                name = next((n for n in module.names if n.startswith(root)), None) if module else None
        if name is None:
            raise LoraFormatError(f"{source}: module {key!r} has no sd-scripts {label} name")
        if layer.algorithm != "lora":
            from .lycoris import write_tensors

            out.update(write_tensors(layer, name))
            continue
        out[f"{name}.lora_down.weight"] = layer.down.contiguous()
        out[f"{name}.lora_up.weight"] = layer.up.contiguous()
        out[f"{name}.alpha"] = _stored_alpha(layer, source, key)
    for (bfl, index), (fused, members) in groups.items():
        (first_key, first), *rest = members.values()
        if any(layer.algorithm != "lora" for _, layer in members.values()):
            out.update(_write_lycoris_group(fused, bfl.format(i=index), members, source))
            continue
        why = next((w for w in (_unshared(first, layer) for _, layer in rest) if w), None)
        if why is not None:
            where = bfl.format(i=index)
            if fused.kind != "linear" or not block_diagonal:
                keys = ", ".join(k for k, _ in members.values())
                raise LoraFormatError(
                    f"{source}: {where}: its parts ({keys}) do not share their down matrix, rank and alpha ({why}); an "
                    f"sd-scripts module has one down matrix, so the file cannot hold them as they are. Pass "
                    f"block_diagonal=True (lora-fast convert --block-diagonal) for the exact block-diagonal form "
                    f"(rank {sum(layer.rank for _, layer in members.values())}), or write diffusers or PEFT")
            out.update(_block_diagonal(fused, index, members, source))
            continue
        pos0 = next(iter(members))
        taken = sum(fused.parts[t] for t in fused.targets[pos0][1])
        unit, rem = divmod(first.out_features, taken)
        if rem:
            raise LoraFormatError(f"{source}: {first_key}: {first.out_features} rows do not fit {bfl.format(i=index)}")
        parts: list = [None] * len(fused.parts)
        for pos, (key, layer) in members.items():
            take = fused.targets[pos][1]
            if layer.out_features != unit * sum(fused.parts[t] for t in take):
                raise LoraFormatError(f"{source}: {key}: {layer.out_features} rows do not fit {bfl.format(i=index)} "
                                      f"next to {first_key}")
            up = layer.up.reshape(layer.up.shape[0], layer.up.shape[1])
            start = 0
            for t in take:
                parts[t] = up[start:start + fused.parts[t] * unit]
                start += fused.parts[t] * unit
        parts = [p if p is not None else first.up.new_zeros(fused.parts[t] * unit, first.rank)
                 for t, p in enumerate(parts)]
        up = torch.cat(parts, 0) if len(parts) > 1 else parts[0].contiguous()
        if fused.kind == "conv":
            up = up.reshape(*up.shape, 1, 1)
        name = kohya_name(bfl.format(i=index))
        out[f"{name}.lora_down.weight"] = first.down.contiguous()
        out[f"{name}.lora_up.weight"] = up
        out[f"{name}.alpha"] = _stored_alpha(first, source, first_key)
    return out


def _unshared(first: LoraLayer, layer: LoraLayer) -> Optional[str]:
    """What two parts of one original module do not share (None: one sd-scripts module holds both)."""
    if layer.rank != first.rank:
        return f"ranks {first.rank} and {layer.rank}"
    if layer.alpha != first.alpha or layer.use_rslora != first.use_rslora:
        return f"scales {first.scale:g} and {layer.scale:g}" if layer.scale != first.scale else "alphas differ"
    if layer.down.dtype != first.down.dtype or layer.up.dtype != first.up.dtype:
        return f"dtypes {first.down.dtype}/{first.up.dtype} and {layer.down.dtype}/{layer.up.dtype}"
    if layer.down.shape != first.down.shape or not torch.equal(layer.down, first.down):
        return "different down matrices"
    return None


def _power_of_two(f) -> bool:
    n, d = abs(f.numerator), f.denominator
    return n > 0 and n & (n - 1) == 0 and d & (d - 1) == 0


def _block_diagonal(fused: FusedModule, index, members: dict, source: str) -> dict:
    """The exact block-diagonal sd-scripts module of split parts that do not share their down matrix.

    down = the parts' downs stacked (rank R = Σ r_i, in the original module's part order); up = block-diagonal: each
    part's up in its own rows and its own r_i columns, zeros elsewhere (a part the adapter lacks: zero rows). Reading it
    back gives part i the rows [0 … B_i … 0] and the whole down, so ΔW_i = S·B_i·A_i exactly. Scales: the file has one,
    S = alpha / R with S the smallest part scale and alpha chosen so that alpha / R == S in float64 (stored as float32
    when float32 holds it, else float64). A part whose scale s_i is 2^k·S gets 2^k folded into its up block: scaling by
    a power of two is exact in every float dtype (checked: no overflow or underflow in the file's dtype), and commutes
    with the rounding of every product, so the delta and the merge kernels' rn32(B·rn32(s)) keep their bits. A ratio
    that is not a power of two would change the rounding (the kernels round B·s, not B·s_i) and is refused, as are
    rsLoRA/plain mixes that give such ratios. Factor dtypes that differ are widened (fp16 + bf16 -> fp32: exact)."""
    from fractions import Fraction

    where = fused.bfl.format(i=index)
    order = sorted(members)  # target positions: the original module's part order
    layers = [members[p][1] for p in order]
    for p in order:
        key, layer = members[p]
        if layer.kind != "linear" or layer.down.dim() != 2:
            raise LoraFormatError(f"{source}: {key}: only Linear parts have a block-diagonal sd-scripts form")
        if not bool(torch.isfinite(layer.down).all()):  # 0 · Inf in the other parts' rows would be NaN
            raise LoraFormatError(f"{source}: {key}: its down matrix holds Inf/NaN: no exact block-diagonal form")
    down_dtype = layers[0].down.dtype
    up_dtype = layers[0].up.dtype
    for layer in layers[1:]:
        down_dtype = torch.promote_types(down_dtype, layer.down.dtype)
        up_dtype = torch.promote_types(up_dtype, layer.up.dtype)
    scales = [layer.scale for layer in layers]
    if any(not math.isfinite(s) or s == 0 for s in scales):
        raise LoraFormatError(f"{source}: {where}: a part has scale {scales} (alpha 0 or not finite): no kohya form")
    base = min(scales, key=abs)
    ratios = []
    for p, s in zip(order, scales):
        f = Fraction(s) / Fraction(base)
        if not _power_of_two(f):
            raise LoraFormatError(
                f"{source}: {where}: the scales of its parts ({', '.join(f'{members[q][0]}: {v:g}' for q, v in zip(order, scales))}) "
                f"differ by {float(f):g}, not a power of two: folding that into {members[p][0]}'s up matrix would round "
                "(one scale per sd-scripts module); write diffusers or PEFT")
        ratios.append(float(f))
    first_key, first = members[order[0]]
    taken = sum(fused.parts[t] for t in fused.targets[order[0]][1])
    unit, rem = divmod(first.out_features, taken)
    if rem:
        raise LoraFormatError(f"{source}: {first_key}: {first.out_features} rows do not fit {where}")
    starts = [unit * sum(fused.parts[:t]) for t in range(len(fused.parts))]
    rank = sum(layer.rank for layer in layers)
    up = torch.zeros(unit * sum(fused.parts), rank, dtype=up_dtype)
    col = 0
    for p, layer, ratio in zip(order, layers, ratios):
        key = members[p][0]
        take = fused.targets[p][1]
        if layer.out_features != unit * sum(fused.parts[t] for t in take) or layer.in_features != first.in_features:
            raise LoraFormatError(f"{source}: {key}: a {tuple(layer.weight_shape)} module does not fit {where} next to "
                                  f"{first_key} {tuple(first.weight_shape)}")
        u = layer.up.reshape(layer.up.shape[0], -1).to(up_dtype)
        if ratio != 1.0:
            scaled = u * ratio
            if not torch.equal(scaled.double(), u.double() * ratio):
                raise LoraFormatError(f"{source}: {key}: folding its scale ratio {ratio:g} into its up matrix "
                                      f"overflows or underflows in {up_dtype}: no exact block-diagonal form")
            u = scaled
        at = 0
        for t in take:
            n = fused.parts[t] * unit
            up[starts[t]:starts[t] + n, col:col + layer.rank] = u[at:at + n]
            at += n
        col += layer.rank
    down = torch.cat([layer.down.to(down_dtype) for layer in layers], 0).contiguous()
    from .kohya import alpha_for_scale

    alpha = alpha_for_scale(base, rank)
    if alpha is None:
        raise LoraFormatError(f"{source}: {where}: no alpha gives scale {base!r} at rank {rank} exactly")
    name = kohya_name(where)
    return {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": alpha}


def _write_lycoris_group(fused: FusedModule, where: str, members: dict, source: str) -> dict:
    """The sd-scripts tensors of one original module whose diffusers parts are LyCORIS layers: one to one as read;
    split parts re-fused by rows (the inverse of _lycoris_layers: the row tensors of the parts concatenated in the
    original order, a part the adapter lacks as zero rows, every other tensor and alpha shared)."""
    from .lycoris import ALGORITHM_NAMES, write_tensors

    name = kohya_name(where)
    (first_key, first), *rest = members.values()
    algos = {layer.algorithm for _, layer in members.values()}
    if len(algos) > 1:
        found = ", ".join(sorted(f"{k} ({layer.algorithm})" for k, layer in members.values()))
        raise LoraFormatError(
            f"{source}: the parts of {where} are of different algorithms ({found}); an sd-scripts file holds one "
            "module there. (A LoKr module whose W2 row blocks do not line up with the split is read as full-diff "
            "slices for those parts: write diffusers/PEFT with an approximation, or keep the original file.)")
    if len(fused.targets) == 1 and tuple(fused.targets[0][1]) == tuple(range(len(fused.parts))):
        return write_tensors(first, name)
    label = ALGORITHM_NAMES[first.algorithm]
    t0 = first.lycoris
    total_rows = None
    pos0 = next(iter(members))
    taken = sum(fused.parts[t] for t in fused.targets[pos0][1])
    unit, rem = divmod(first.out_features, taken)
    if rem:
        raise LoraFormatError(f"{source}: {first_key}: {first.out_features} rows do not fit {where}")
    total_rows = unit * sum(fused.parts)
    rows_of, per = _row_tensors(first.algorithm, t0, first.out_features)
    if first.algorithm == "lokr":  # rows of W2 (the weight rows per W1 row): the same in every part and the whole
        per = first.out_features // _lokr_w1_rows(t0)
    for key, layer in rest:
        shared = [n for n in set(t0) | set(layer.lycoris) if n not in rows_of]
        same = (set(t0) == set(layer.lycoris) and layer.alpha == first.alpha and layer.in_features == first.in_features
                and layer.magnitude is None and first.magnitude is None
                and all(t0[n].dtype == layer.lycoris[n].dtype and t0[n].shape == layer.lycoris[n].shape
                        and torch.equal(t0[n], layer.lycoris[n]) for n in shared)
                and all(t0[n].dtype == layer.lycoris[n].dtype for n in rows_of))
        if not same:
            raise LoraFormatError(
                f"{source}: {key} and {first_key} are {label} parts of {where} but do not share their "
                f"{', '.join(sorted(shared)) or 'tensors'} and alpha: an sd-scripts file cannot hold them exactly")
    if first.magnitude is not None:
        raise LoraFormatError(f"{source}: {first_key}: a DoRA {label} part of {where} has no sd-scripts form")
    if any(layer.bias is not None for _, layer in members.values()) and first.algorithm != "full":
        raise LoraFormatError(f"{source}: {first_key}: only a full diff carries a bias (diff_b)")
    pieces: dict = {n: [None] * len(fused.parts) for n in rows_of}
    bias_parts: list = [None] * len(fused.parts)
    for pos, (key, layer) in members.items():
        take = fused.targets[pos][1]
        if layer.out_features != unit * sum(fused.parts[t] for t in take):
            raise LoraFormatError(f"{source}: {key}: {layer.out_features} rows do not fit {where} next to {first_key}")
        start = 0
        for t in take:
            n_rows = fused.parts[t] * unit
            if n_rows % per or start % per:
                raise LoraFormatError(f"{source}: {key}: its LoKr rows do not line up with {where}'s parts")
            for n in rows_of:
                pieces[n][t] = layer.lycoris[n][start // per:(start + n_rows) // per]
            if layer.bias is not None:
                bias_parts[t] = layer.bias[start:start + n_rows]
            start += n_rows
    tensors = dict(t0)
    for n in rows_of:
        ref = t0[n]
        full = [p if p is not None else ref.new_zeros((fused.parts[t] * unit // per, *ref.shape[1:]))
                for t, p in enumerate(pieces[n])]
        tensors[n] = torch.cat(full, 0)
    shape = (total_rows, *first.shape[1:])
    bias = None
    if any(b is not None for b in bias_parts):
        ref = next(b for b in bias_parts if b is not None)
        bias = torch.cat([b if b is not None else ref.new_zeros(fused.parts[t] * unit)
                          for t, b in enumerate(bias_parts)], 0)
    whole = LoraLayer(alpha=first.alpha, kind=first.kind, bias=bias, algorithm=first.algorithm, lycoris=tensors,
                      shape=shape)
    return write_tensors(whole, name)


__all__ = ["FusedModule", "FusedFamily", "one", "register_family", "families", "family_table",
           "detect_fused_layout", "read_fused", "write_fused_kohya"]
