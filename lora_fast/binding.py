"""Binding an adapter to a target: map its layers to the target's modules, validate them (shapes, components, one
library per pipeline, hotswap rank caps), then register them with their live hooks. Nothing changes on error."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from .adapter import LoraAdapter, LoraLayer, split_component
from .errors import LoraFormatError
from .fusing import drop_fuse_cache
from .live import ModuleHook, make_slot
from .state import (BoundLayer, check_no_peft_root, check_one_library, component_state, install_encode_prompt_scale,
                    layer_label, loaded_adapter_names, peft_layer_type, refuse_peft)
from .targets import is_fan_in_fan_out, resolve_components, resolve_module


def check_shape(layer: LoraLayer, module: nn.Module, key: str) -> None:
    """LoraFormatError unless ``layer`` adapts ``module``'s weight (kind and shape).
    Internal: for lora_fast's own modules, not public API."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise LoraFormatError(f"{key}: target module {type(module).__name__} has no weight tensor to adapt")
    w = weight.shape
    # an embedding LoRA only on an nn.Embedding, a linear/conv one never on an embedding
    ok = (isinstance(module, nn.Embedding) == (layer.kind == "embedding")
          and layer.fits_weight(w, is_fan_in_fan_out(module)))
    if not ok:
        raise LoraFormatError(
            f"{key}: LoRA factors imply a weight of shape {layer.weight_shape} but the target "
            f"{type(module).__name__} has weight shape {tuple(w)}"
        )


def assign_layers(adapter: LoraAdapter, comps: dict, components: Optional[Sequence[str]]):
    """Map every adapter layer to (component, path) of the target. Raises before anything changes.
    Internal: for lora_fast's own modules, not public API."""
    present = adapter.components()
    has_plain = any(split_component(k)[0] is None for k in adapter.layers)
    plain_target = list(comps) == [None]
    if components is not None:
        components = list(components)
    out: dict[Optional[str], dict[str, LoraLayer]] = {}
    for key, layer in adapter.layers.items():
        comp, path = split_component(key)
        if plain_target:
            if comp is None:
                dest = None
            elif components is not None:
                if comp not in components:
                    continue
                if len(components) > 1:
                    raise LoraFormatError(
                        f"{adapter.source or 'adapter'}: a single module cannot take several components {components}"
                    )
                dest = None
            elif len(present) == 1 and not has_plain:
                dest = None  # a one-component file applied to that component's module
            else:
                raise LoraFormatError(
                    f"{adapter.source or 'adapter'}: holds components {present}; pass components=[...] to choose "
                    "which one this module is"
                )
        else:
            if comp is None:
                if components is not None and len(components) == 1:
                    comp = components[0]
                else:
                    raise LoraFormatError(
                        f"{adapter.source or 'adapter'}: key {key!r} names no component; pass components=[name] "
                        "to say which component of the target it is for"
                    )
            elif components is not None and comp not in components:
                continue
            if comp not in comps:
                raise LoraFormatError(
                    f"{adapter.source or 'adapter'}: key {key!r} is for component {comp!r}, which the target "
                    f"does not have (it has {sorted(c for c in comps if c)})"
                )
            dest = comp
        out.setdefault(dest, {})[path] = layer
    if not out:
        raise LoraFormatError(f"{adapter.source or 'adapter'}: no LoRA layer matches the requested components {components}")
    return out


def bind(target, adapter: LoraAdapter, adapter_name: Optional[str], components=None, max_rank: Optional[int] = None) -> str:
    """Validate every layer against the target, then register the adapter and its live hooks (nothing changes on error)."""
    adapter_name, comps, bound = plan_bind(target, adapter, adapter_name, components, max_rank)
    register_bound(target, comps, bound, adapter_name, max_rank)
    return adapter_name


def plan_bind(target, adapter: LoraAdapter, adapter_name: Optional[str], components=None,
              max_rank: Optional[int] = None, move: bool = True):
    """Validate every layer and pick the adapter name, changing nothing: (name, components, bound layers).

    ``move=False`` keeps each layer's tensors where they are (fuse-on-load streams them to the device itself).
    A file for another model family (an SDXL LoRA on a Flux pipeline) gets that said in the error; where the reader
    knows the file's family from its own names it is refused up front, even if every module happens to fit
    (:func:`lora_fast.formats.families.check_family`)."""
    from .formats.families import check_family, family_mismatch

    try:
        check_family(adapter, target)
    except LoraFormatError as refused:
        # refused before planning (nothing moved to the device); where a module does not fit, that is said first,
        # as when the planning below fails
        try:
            _plan_bind(target, adapter, adapter_name, components, max_rank, False)
        except LoraFormatError as e:
            raise LoraFormatError(f"{e}; {family_mismatch(adapter, target)}") from refused
        raise
    try:
        return _plan_bind(target, adapter, adapter_name, components, max_rank, move)
    except LoraFormatError as e:
        hint = family_mismatch(adapter, target)
        if hint is None:
            raise
        raise LoraFormatError(f"{e}; {hint}") from e


def _plan_bind(target, adapter: LoraAdapter, adapter_name: Optional[str], components, max_rank, move):
    comps = resolve_components(target)
    check_one_library(comps)
    plan = assign_layers(adapter, comps, components)
    for comp in comps:  # one library per pipeline: any component holding PEFT layers refuses the load
        check_no_peft_root(comp, comps[comp])
    peft_layer = peft_layer_type()
    existing = loaded_adapter_names(target)
    if adapter_name is None:
        k = len(existing)
        while f"default_{k}" in existing:
            k += 1
        adapter_name = f"default_{k}"
    elif adapter_name in existing:
        raise LoraFormatError(f"adapter name {adapter_name!r} is already in use; delete it first or pick another name")
    if max_rank is not None and (not isinstance(max_rank, int) or max_rank < 1):
        raise LoraFormatError(f"max_rank must be a positive integer, got {max_rank!r}")

    bound: dict[Optional[str], dict[str, BoundLayer]] = {}
    for comp, layers in plan.items():
        root = comps[comp]
        state = component_state(root)
        cap = max_rank if max_rank is not None else (state.max_rank if state is not None else None)
        for path, layer in layers.items():
            key = layer_label(comp, path)
            module = resolve_module(root, path)
            if module is None:
                raise LoraFormatError(f"{adapter.source or 'adapter'}: {key}: no such module in the target")
            if peft_layer is not None and isinstance(module, peft_layer):
                refuse_peft(key, type(module).__name__)
            check_shape(layer, module, f"{adapter.source or 'adapter'}: {key}")
            live_rank = int(layer.mid.shape[0]) if layer.mid is not None else layer.rank
            if cap is not None and live_rank > cap:
                raise LoraFormatError(
                    f"{adapter.source or 'adapter'}: {key}: rank {live_rank} exceeds max_rank {cap} chosen for hotswap"
                )
            w = module.weight
            dev_layer = layer.to(device=w.device) if move else layer
            bound.setdefault(comp, {})[path] = BoundLayer(path, module, dev_layer)
    return adapter_name, comps, bound


def register_bound(target, comps: dict, bound: dict, adapter_name: str, max_rank: Optional[int] = None) -> None:
    """Register planned layers (on their modules' devices) with their live hooks; the new adapter becomes active."""
    for comp, layers in bound.items():
        root = comps[comp]
        state = component_state(root, create=True)
        drop_fuse_cache(state)
        if max_rank is not None:
            state.max_rank = max(max_rank, state.max_rank or 0)
        weight = torch.ones((), dtype=torch.float32)
        state.weight_t[adapter_name] = weight
        by_path = state.slot_hooks[adapter_name] = {}
        for path, b in layers.items():
            hook = state.hooks.get(id(b.module))
            if hook is None:
                hook = state.hooks[id(b.module)] = ModuleHook(state, path)
                hook.attach(b.module)
            hook.slots[adapter_name] = make_slot(b.module, b.layer, weight, state.max_rank)
            by_path[path] = hook
        state.adapters[adapter_name] = layers
        state.weights[adapter_name] = 1.0
        state.active = [adapter_name]  # as in diffusers: a newly loaded adapter is the only active one
        state.bump()
    if any(c and c.startswith("text_encoder") for c in bound):
        install_encode_prompt_scale(target)
