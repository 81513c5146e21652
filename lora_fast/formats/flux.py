"""Flux.1 LoRA layouts that do not use diffusers module names: kohya sd-scripts, BFL/ComfyUI and XLabs.

All three name modules of the original BFL Flux code (``double_blocks.N.img_attn.qkv``,
``single_blocks.N.linear1``...), where diffusers' ``FluxTransformer2DModel`` has separate modules
(``attn.to_q/to_k/to_v``, ``proj_mlp``...). The mapping is data: :data:`FLUX_MODULES` lists each BFL
module, how its output rows split into parts, and which diffusers module takes which parts. Every
layout is a spelling of those BFL names (:data:`LAYOUTS`), so a new layout or family is a table entry.

A LoRA on a fused projection becomes one LoRA per diffusers module: every split module gets the
same down (A) matrix (the same tensor, not a copy) and its rows of the up (B) matrix, so
ΔW_part = s·B_part·A is exactly the part's rows of s·B·A. The scale is that of the fused module
(alpha / rank of the file's module, alpha = rank when missing, as sd-scripts trains it) for every part.

Layouts (``adapter.format`` / ``adapter.family``):

* ``"kohya"`` / ``"flux"``: sd-scripts ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` +
  ``.alpha``; ``lora_te1_`` keys are CLIP-L (``text_encoder``), named as in the SDXL tables; ``lora_te3_`` keys are
  T5-XXL (``text_encoder_2``, :data:`KOHYA_TEXT_ENCODER_NAMES`).
* ``"bfl"`` / ``"flux"``: ``[diffusion_model.]double_blocks.0.img_attn.qkv.{lora_A,lora_B}.weight`` or
  ``.lora_down/.lora_up.weight`` (ComfyUI), optional ``.alpha``.
* ``"onetrainer"`` / ``"flux"``: ``lora_transformer_single_transformer_blocks_0_attn_to_q.lora_down.weight``
  (diffusers module paths, '.' -> '_'; :data:`ONETRAINER_MODULES`), kohya tensors and alpha.
* ``"xlabs"`` / ``"flux"``: ``[diffusion_model.]double_blocks.0.processor.qkv_lora1.{down,up}.weight``
  (no alpha: scale 1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from ..adapter import LoraAdapter, LoraLayer, split_component
from ..errors import LoraFormatError


@dataclass(frozen=True)
class FusedModule:
    """One BFL module (``{i}`` = block index) and where its rows go in diffusers.

    parts: relative sizes of the output-row parts (rows = sum(parts) · unit).
    targets: (diffusers module path under the component, indices of the parts it takes, in order).
    """

    bfl: str
    parts: tuple
    targets: tuple
    component: str = "transformer"


def _one(bfl: str, target: str) -> FusedModule:
    return FusedModule(bfl, (1,), ((target, (0,)),))


_D = "transformer_blocks.{i}."
_S = "single_transformer_blocks.{i}."

#: Flux.1: every BFL module a LoRA trainer targets, and its diffusers module(s).
FLUX_MODULES: tuple[FusedModule, ...] = (
    FusedModule("double_blocks.{i}.img_attn.qkv", (1, 1, 1),
                ((_D + "attn.to_q", (0,)), (_D + "attn.to_k", (1,)), (_D + "attn.to_v", (2,)))),
    _one("double_blocks.{i}.img_attn.proj", _D + "attn.to_out.0"),
    _one("double_blocks.{i}.img_mlp.0", _D + "ff.net.0.proj"),
    _one("double_blocks.{i}.img_mlp.2", _D + "ff.net.2"),
    _one("double_blocks.{i}.img_mod.lin", _D + "norm1.linear"),
    FusedModule("double_blocks.{i}.txt_attn.qkv", (1, 1, 1),
                ((_D + "attn.add_q_proj", (0,)), (_D + "attn.add_k_proj", (1,)), (_D + "attn.add_v_proj", (2,)))),
    _one("double_blocks.{i}.txt_attn.proj", _D + "attn.to_add_out"),
    _one("double_blocks.{i}.txt_mlp.0", _D + "ff_context.net.0.proj"),
    _one("double_blocks.{i}.txt_mlp.2", _D + "ff_context.net.2"),
    _one("double_blocks.{i}.txt_mod.lin", _D + "norm1_context.linear"),
    # linear1 = q, k, v (inner dim each) and the MLP input (mlp_ratio 4 · inner dim)
    FusedModule("single_blocks.{i}.linear1", (1, 1, 1, 4),
                ((_S + "attn.to_q", (0,)), (_S + "attn.to_k", (1,)), (_S + "attn.to_v", (2,)), (_S + "proj_mlp", (3,)))),
    _one("single_blocks.{i}.linear2", _S + "proj_out"),
    _one("single_blocks.{i}.modulation.lin", _S + "norm.linear"),
    _one("img_in", "x_embedder"),
    _one("txt_in", "context_embedder"),
    _one("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    _one("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    _one("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    _one("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    _one("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    _one("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    _one("final_layer.linear", "proj_out"),
    # BFL's adaLN output is (shift, scale); diffusers' AdaLayerNormContinuous is (scale, shift)
    FusedModule("final_layer.adaLN_modulation.1", (1, 1), (("norm_out.linear", (1, 0)),)),
)

#: XLabs' processor LoRAs, as BFL names with the same meaning (XLabs stores no alpha).
XLABS_NAMES = {
    "double_blocks.{i}.processor.qkv_lora1": "double_blocks.{i}.img_attn.qkv",
    "double_blocks.{i}.processor.proj_lora1": "double_blocks.{i}.img_attn.proj",
    "double_blocks.{i}.processor.qkv_lora2": "double_blocks.{i}.txt_attn.qkv",
    "double_blocks.{i}.processor.proj_lora2": "double_blocks.{i}.txt_attn.proj",
    # the single-block processor adapts q, k, v (the first three parts of linear1) and linear2
    "single_blocks.{i}.processor.qkv_lora": "single_blocks.{i}.linear1[:3]",
    "single_blocks.{i}.processor.proj_lora": "single_blocks.{i}.linear2",
}

_XLABS_SINGLE_QKV = FusedModule("single_blocks.{i}.linear1[:3]", (1, 1, 1),
                                ((_S + "attn.to_q", (0,)), (_S + "attn.to_k", (1,)), (_S + "attn.to_v", (2,))))

#: kohya text-encoder names of Flux pipelines that no SD name table holds: (regex, component, path template).
#: sd-scripts names T5-XXL modules ``lora_te3_`` + the T5EncoderModel path with '.' -> '_'.
KOHYA_TEXT_ENCODER_NAMES = (
    (re.compile(r"^lora_te3_encoder_block_(\d+)_layer_(\d+)_(SelfAttention|DenseReluDense)_(q|k|v|o|wi_0|wi_1|wi|wo)$"),
     "text_encoder_2", "encoder.block.{0}.layer.{1}.{2}.{3}"),
)

#: OneTrainer names diffusers modules kohya-style: ``lora_transformer_`` + the diffusers path with '.' -> '_'.
#: Every diffusers module of the table above, one to one (no splits).
ONETRAINER_MODULES: tuple[FusedModule, ...] = tuple(
    FusedModule(path, (1,), ((path, (0,)),))
    for path in dict.fromkeys(path for m in FLUX_MODULES for path, _ in m.targets))

#: Tensor suffixes per layout -> role.
_SUFFIXES = {
    "kohya": {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"},
    "onetrainer": {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"},
    "bfl": {"lora_A.weight": "down", "lora_B.weight": "up", "lora_down.weight": "down", "lora_up.weight": "up",
            "alpha": "alpha"},
    "xlabs": {"down.weight": "down", "up.weight": "up"},
}


def _compile(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(\d+)") + "$")


def _kohya_name(bfl: str) -> str:
    return "lora_unet_" + bfl.replace(".", "_")


_BY_BFL = {m.bfl: m for m in FLUX_MODULES + (_XLABS_SINGLE_QKV,)}
_BFL_PATTERNS = [(_compile(m.bfl), m) for m in FLUX_MODULES]
_KOHYA_PATTERNS = [(_compile(_kohya_name(m.bfl)), m) for m in FLUX_MODULES]
_XLABS_PATTERNS = [(_compile(x), _BY_BFL[b]) for x, b in XLABS_NAMES.items()]
_ONETRAINER_PATTERNS = [(_compile("lora_transformer_" + m.bfl.replace(".", "_")), m) for m in ONETRAINER_MODULES]
_PREFIX = "diffusion_model."


def _match(patterns, name: str) -> Optional[tuple[FusedModule, Optional[str]]]:
    for pattern, module in patterns:
        m = pattern.match(name)
        if m:
            return module, (m.group(1) if m.groups() else None)
    return None


def _split_key(key: str, layout: str) -> Optional[tuple[str, str]]:
    """(module name, role) of a key in a layout, or None."""
    for suffix, role in _SUFFIXES[layout].items():
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], role
    return None


def _module_of(name: str, layout: str):
    if layout == "kohya":
        return _match(_KOHYA_PATTERNS, name)
    if layout == "onetrainer":
        return _match(_ONETRAINER_PATTERNS, name)
    if name.startswith(_PREFIX):
        name = name[len(_PREFIX):]
    return _match(_BFL_PATTERNS if layout == "bfl" else _XLABS_PATTERNS, name)


def _is_text_encoder_key(key: str) -> bool:
    return key.startswith(("lora_te1_", "lora_te_", "lora_te3_"))


def _kohya_text_encoder_key(name: str) -> Optional[str]:
    for pattern, component, template in KOHYA_TEXT_ENCODER_NAMES:
        m = pattern.match(name)
        if m:
            return f"{component}.{template.format(*m.groups())}"
    return None


def detect_flux_layout(keys) -> Optional[str]:
    """``"kohya"``, ``"onetrainer"``, ``"bfl"`` or ``"xlabs"`` when every key is a Flux key of that layout
    (kohya and OneTrainer files may also hold ``lora_te1_`` CLIP / ``lora_te3_`` T5 keys), else None."""
    keys = [k for k in keys if isinstance(k, str)]
    if not keys:
        return None
    for layout in ("kohya", "onetrainer", "xlabs", "bfl"):
        flux_keys = 0
        for key in keys:
            if layout in ("kohya", "onetrainer") and _is_text_encoder_key(key):
                continue
            split = _split_key(key, layout)
            if split is None or _module_of(split[0], layout) is None:
                break
            flux_keys += 1
        else:
            if flux_keys:
                return layout
    # A kohya file naming Flux blocks but also something the table lacks: the Flux reader names the odd key.
    if any(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for k in keys):
        return "kohya"
    return None


def _fail(source: str, key: str, problem: str) -> LoraFormatError:
    return LoraFormatError(f"{source}: key {key!r}: {problem}")


def _split_layers(source: str, fused: FusedModule, index: Optional[str], group: dict, alpha: Optional[float]):
    """{diffusers key: LoraLayer} for one file module."""
    from .kohya import _factor

    down_key, down = group["down"]
    up_key, up = group["up"]
    down, up = _factor(source, down_key, down), _factor(source, up_key, up)
    if down.dim() == 4:
        if tuple(down.shape[2:]) != (1, 1):
            raise _fail(source, down_key, f"a Flux module is a Linear; got conv factors {tuple(down.shape)}")
        down = down.reshape(down.shape[0], down.shape[1])
    if up.dim() == 4:
        if tuple(up.shape[2:]) != (1, 1):
            raise _fail(source, up_key, f"a Flux module is a Linear; got conv factors {tuple(up.shape)}")
        up = up.reshape(up.shape[0], up.shape[1])
    rank = int(down.shape[0])
    if int(up.shape[1]) != rank:
        raise _fail(source, down_key, f"rank mismatch: down is {tuple(down.shape)} but up is {tuple(up.shape)}")
    if alpha is None or alpha == 0:  # sd-scripts: a missing or zero alpha means alpha = rank (scale 1)
        alpha = float(rank)
    rows, total = int(up.shape[0]), sum(fused.parts)
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
        out[key] = LoraLayer(down=down, up=part_up, alpha=alpha, kind="linear")
    return out


def read_flux(state_dict: dict, layout: str, *, source: str = "<state dict>",
              metadata: Optional[dict] = None) -> LoraAdapter:
    """A Flux.1 kohya / BFL / XLabs state dict as a LoraAdapter with diffusers module keys."""
    from .kohya import _Module, _build_layer, _classify_suffix, _parse_module, _scalar, _table

    te_keys = {k: v for k, v in state_dict.items() if layout in ("kohya", "onetrainer") and _is_text_encoder_key(k)}
    groups: dict[str, dict] = {}
    for key, value in state_dict.items():
        if key in te_keys:
            continue
        split = _split_key(key, layout)
        if split is None:
            raise _fail(source, key, f"not a Flux {layout} LoRA key")
        name, role = split
        if role in groups.setdefault(name, {}):
            raise _fail(source, key, f"module {name!r} has two {role} tensors ({groups[name][role][0]!r})")
        groups[name][role] = (key, value)
    layers: dict[str, LoraLayer] = {}
    origin: dict[str, str] = {}
    for name, group in groups.items():
        found = _module_of(name, layout)
        if found is None:
            raise _fail(source, next(iter(group.values()))[0], f"unknown Flux module {name!r}")
        for role in ("down", "up"):
            if role not in group:
                raise LoraFormatError(f"{source}: Flux module {name!r} has no {role} tensor "
                                      f"(found {[k for k, _ in group.values()]})")
        alpha = _scalar(source, group["alpha"][0], group["alpha"][1]) if "alpha" in group else None
        for key, layer in _split_layers(source, found[0], found[1], group, alpha).items():
            if key in layers:
                raise LoraFormatError(f"{source}: {name!r} and {origin[key]!r} both target {key}")
            layers[key], origin[key] = layer, name
    if te_keys:
        # CLIP-L: kohya's lora_te1_ (or lora_te_) names, as the SDXL / SD1.x tables spell them; T5: lora_te3_.
        te_groups: dict[str, dict] = {}
        for key, value in te_keys.items():
            name, dot, suffix = key.partition(".")
            if not dot or not suffix:
                raise _fail(source, key, "has no '.<tensor>' part after the module name")
            te_groups.setdefault(name, {})[_classify_suffix(source, key, suffix)] = (key, value)
        sdxl, sd15 = _table("sdxl"), _table("sd15")
        for name, group in te_groups.items():
            p = _parse_module(source, name, group)
            t5_key = _kohya_text_encoder_key(name)
            if t5_key is not None:
                module = _Module(t5_key, "linear", (int(p.up.shape[0]), int(p.down.shape[1])), (name,))
            else:
                module = sdxl.by_name.get(name) if name.startswith("lora_te1_") else sd15.by_name.get(name)
            if module is None or not module.key.startswith(("text_encoder.", "text_encoder_2.")):
                raise _fail(source, p.keys["down"], f"unknown kohya Flux text-encoder module {name!r} (lora_te1_: "
                                                    "CLIP-L, lora_te3_: T5)")
            layers[module.key] = _build_layer(source, p, module, strict_shapes=False)
    return LoraAdapter(layers=layers, format=layout, metadata=dict(metadata or {}),
                       source=None if source == "<state dict>" else source, family="flux")


# ----------------------------------------------------------------------------------------------
# writing kohya (sd-scripts) Flux files


def _fused_of(path: str):
    """(FusedModule, block index, target position) of a diffusers transformer module path, or None."""
    for fused in FLUX_MODULES:
        for pos, (template, _) in enumerate(fused.targets):
            m = _compile(template).match(path)
            if m:
                return fused, (m.group(1) if m.groups() else None), pos
    return None


def write_flux_kohya(adapter: LoraAdapter, *, source: str = "<adapter>") -> dict[str, torch.Tensor]:
    """A Flux adapter as an sd-scripts state dict: split modules re-fused into the BFL module they came from.

    The split modules of one BFL module must share their down matrix (equal values), rank and alpha, as
    ``read_flux`` produces them; a split module the adapter lacks gets zero rows in the fused up matrix
    (the same delta). Split modules with different down matrices have no exact sd-scripts form and raise
    LoraFormatError. CLIP-L modules are written ``lora_te1_``, T5 modules ``lora_te3_``. Reading the result
    back gives every module's delta unchanged; a kohya file read and written again is bit-identical.
    """
    from .kohya import _lookup_key, _stored_alpha, _table

    groups: dict = {}  # (bfl, index) -> (fused, {target position: (key, layer)})
    out: dict[str, torch.Tensor] = {}
    for key, layer in adapter.layers.items():
        component, path = split_component(key)
        if layer.kind != "linear" or layer.mid is not None or layer.magnitude is not None or layer.bias is not None \
                or layer.fan_in_fan_out:
            raise LoraFormatError(f"{source}: {key}: only plain Linear LoRA layers have an sd-scripts Flux form")
        if component == "transformer":
            found = _fused_of(path)
            if found is None:
                raise LoraFormatError(f"{source}: module {key!r} has no sd-scripts Flux name")
            fused, index, pos = found
            groups.setdefault((fused.bfl, index), (fused, {}))[1][pos] = (key, layer)
            continue
        if component == "text_encoder":
            module = _lookup_key(_table("sdxl"), key)
            name = next((n for n in module.names if n.startswith("lora_te1_")), None) if module else None
        elif component == "text_encoder_2" and re.match(r"^encoder\.block\.\d+\.layer\.\d+\.", path):
            name = "lora_te3_" + path.replace(".", "_")
            if _kohya_text_encoder_key(name) != key:
                name = None
        else:
            name = None
        if name is None:
            raise LoraFormatError(f"{source}: module {key!r} has no sd-scripts Flux name")
        out[f"{name}.lora_down.weight"] = layer.down.contiguous()
        out[f"{name}.lora_up.weight"] = layer.up.contiguous()
        out[f"{name}.alpha"] = _stored_alpha(layer, source, key)
    for (bfl, index), (fused, members) in groups.items():
        (first_key, first), *rest = members.values()
        for key, layer in rest:
            if (layer.rank != first.rank or layer.alpha != first.alpha or layer.use_rslora != first.use_rslora
                    or layer.down.dtype != first.down.dtype or layer.up.dtype != first.up.dtype
                    or not torch.equal(layer.down, first.down)):
                raise LoraFormatError(
                    f"{source}: {key} and {first_key} are parts of {bfl.format(i=index)} but do not share their down "
                    "matrix, rank and alpha: an sd-scripts file cannot hold them exactly (write diffusers or PEFT)")
        # rows per part unit, from any member: its rows = unit * (sizes of the parts it takes)
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
            start = 0
            for t in take:
                parts[t] = layer.up[start:start + fused.parts[t] * unit]
                start += fused.parts[t] * unit
        parts = [p if p is not None else first.up.new_zeros(fused.parts[t] * unit, first.rank)
                 for t, p in enumerate(parts)]
        name = _kohya_name(bfl.format(i=index))
        out[f"{name}.lora_down.weight"] = first.down.contiguous()
        out[f"{name}.lora_up.weight"] = torch.cat(parts, 0) if len(parts) > 1 else parts[0].contiguous()
        out[f"{name}.alpha"] = _stored_alpha(first, source, first_key)
    return out


__all__ = ["FLUX_MODULES", "XLABS_NAMES", "FusedModule", "detect_flux_layout", "read_flux", "write_flux_kohya"]
