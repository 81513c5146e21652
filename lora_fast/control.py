"""Live control of loaded adapters: set_adapters, enable/disable, set_lora_device, delete, unload, hotswap and
prepare_hotswap, and the read-only queries. Each costs O(adapters): hooks pick changes up at their next forward."""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn

from .adapter import COMPONENTS, LoraAdapter
from .binding import assign_layers, check_shape
from .errors import LoraFormatError, LoraFusionError
from .fusing import drop_fuse_cache
from .live import make_slot
from .state import (BoundLayer, ComponentState, check_no_peft_root, check_one_library, component_state, component_states,
                    layer_label, remove_encode_prompt_scale)
from .targets import resolve_components, resolve_module


def _drop_state(module: nn.Module, state: ComponentState) -> None:
    """Remove every hook of a component and forget its state."""
    drop_fuse_cache(state)
    for hook in state.hooks.values():
        hook.detach()
    state.hooks.clear()
    if state.scale_hooks is not None:
        state.scale_hooks.detach()
        state.scale_hooks = None
    state.bump()


def unload(target, components=None) -> None:
    """Drop adapters, hooks and exact-unfuse records; fused weights stay baked in."""
    for comp, module, state in component_states(target, components):
        _drop_state(module, state)
    remove_encode_prompt_scale(target, force=components is None)


def delete(target, adapter_names: Sequence[str]) -> None:
    """Forget adapters that are not fused."""
    if isinstance(adapter_names, str):
        adapter_names = [adapter_names]
    states = component_states(target)
    for comp, module, state in states:
        fused = state.fused_names()
        for n in adapter_names:
            if n in fused:
                raise LoraFusionError(f"adapter {n!r} is fused in {comp or 'module'}; unfuse_lora first")
    for comp, module, state in states:
        drop_fuse_cache(state)
        for n in adapter_names:
            state.adapters.pop(n, None)
            state.weights.pop(n, None)
            state.weight_t.pop(n, None)
            for hook in state.slot_hooks.pop(n, {}).values():
                hook.slots.pop(n, None)
                if not hook.slots:
                    hook.detach()
                    state.hooks = {k: h for k, h in state.hooks.items() if h is not hook}
            if n in state.active:
                state.active.remove(n)
        state.bump()
        if not state.adapters and not state.fused:
            _drop_state(module, state)
    remove_encode_prompt_scale(target)


# --------------------------------------------------------------------------------------------- live control


def _as_names(adapter_names) -> list[str]:
    return [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)


def _require_known(states, names, what: str) -> None:
    known = set()
    for _, _, s in states:
        known.update(s.adapters)
    missing = [n for n in names if n not in known]
    if missing:
        raise LoraFormatError(f"{what}: no adapter named {missing} is loaded (loaded: {sorted(known)})")


def set_adapters(target, adapter_names, adapter_weights=None) -> None:
    """Activate adapters with weights; O(adapters): hooks pick the change up at their next forward."""
    names = _as_names(adapter_names)
    states = component_states(target)
    _require_known(states, names, "set_adapters")
    if isinstance(adapter_weights, dict):
        comps_known = {c for c, _, _ in states}
        unknown = sorted(str(k) for k in adapter_weights if k not in comps_known)
        if unknown:
            warnings.warn(f"set_adapters: adapter_weights names components {unknown} that hold no adapters; ignored")
    if not isinstance(adapter_weights, (list, tuple)):
        adapter_weights = [adapter_weights] * len(names)
    if len(adapter_weights) != len(names):
        raise LoraFormatError(f"set_adapters: {len(adapter_weights)} weights for {len(names)} adapter names")
    for comp, _, state in states:
        active, weights = [], {}
        for n, w in zip(names, adapter_weights):
            if isinstance(w, dict):
                w = w.get(comp)
            if isinstance(w, dict):
                raise LoraFormatError(
                    f"set_adapters: per-block weights for {comp} ({sorted(w)}) are not supported; give one float per component"
                )
            if n in state.adapters:
                weights[n] = 1.0 if w is None else float(w)
                if n not in active:
                    active.append(n)
        for n, w in weights.items():
            state.weights[n] = w
            state.weight_t[n].fill_(w)  # weights are tensor data: new values need no plan change (nor a recompile)
        if active != state.active:
            state.active = active
            state.bump(slots=False)


def get_active_adapters(target) -> list[str]:
    out = []
    for _, _, state in component_states(target, check=False):
        out.extend(n for n in state.active if n not in out)
    return out


def get_list_adapters(target) -> dict:
    return {comp: list(state.adapters) for comp, _, state in component_states(target, check=False) if state.adapters}


def set_enabled(target, enabled: bool) -> None:
    for _, _, state in component_states(target):
        state.enabled = bool(enabled)
        state.bump(slots=False)


def set_device(target, adapter_names, device) -> None:
    """Move adapters' tensors (only those). A slot not on its module's device is unused until moved back."""
    names = _as_names(adapter_names)
    states = component_states(target)
    _require_known(states, names, "set_lora_device")
    for comp, _, state in states:
        fused = state.fused_names()
        bad = [n for n in names if n in fused]
        if bad:
            raise LoraFusionError(f"set_lora_device: adapters {bad} are fused in {comp or 'module'}; unfuse_lora first")
    device = torch.device(device)
    for _, _, state in states:
        drop_fuse_cache(state)
        for n in names:
            if n not in state.adapters:
                continue
            for path, b in state.adapters[n].items():
                b.layer = b.layer.to(device=device)
            for hook in state.slot_hooks.get(n, {}).values():
                slot = hook.slots[n]
                slot.to(device=device)
                slot.pinned = True
        state.bump()


def prepare_hotswap(target, max_rank: int) -> None:
    """Pad every loaded adapter (and every later load) to ``max_rank``, so hotswaps keep tensor shapes."""
    if not isinstance(max_rank, int) or max_rank < 1:
        raise LoraFormatError(f"max_rank must be a positive integer, got {max_rank!r}")
    all_comps = resolve_components(target)
    check_one_library(all_comps)
    for comp, root in all_comps.items():  # it prepares later loads, which a PEFT-holding pipeline refuses
        check_no_peft_root(comp, root)
    comps = {c: m for c, m in all_comps.items() if c is None or c in COMPONENTS}
    for comp, root in comps.items():
        state = component_state(root)
        if state is None:
            continue
        for n, by_path in state.slot_hooks.items():
            for path, hook in by_path.items():
                slot = hook.slots[n]
                if not slot.dense and slot.capacity > max_rank:
                    raise LoraFormatError(f"prepare_hotswap: {layer_label(comp, path)} of adapter {n!r} has rank "
                                          f"{slot.capacity} > max_rank {max_rank}")
    for comp, root in comps.items():
        state = component_state(root, create=True)
        state.max_rank = max_rank
        for n, by_path in state.slot_hooks.items():
            for path, hook in by_path.items():
                slot = hook.slots[n]
                if slot.dense or slot.capacity == max_rank:
                    continue
                b = state.adapters[n].get(path)
                if b is None:
                    continue
                hook.slots[n] = make_slot(b.module, b.layer, state.weight_t[n], max_rank)
        state.bump()


def hotswap(target, adapter: LoraAdapter, adapter_name: str, components=None) -> str:
    """Replace an adapter's weights in place: same tensors, same shapes, so compiled code keeps running."""
    comps = resolve_components(target)
    check_one_library(comps)
    plan = assign_layers(adapter, comps, components)
    holders = {c: component_state(m) for c, m in comps.items()}
    holders = {c: s for c, s in holders.items() if s is not None and adapter_name in s.adapters}
    src = adapter.source or "adapter"
    if not holders:
        raise LoraFormatError(f"hotswap: no adapter named {adapter_name!r} is loaded; load it first (hotswap=False)")
    for comp, state in holders.items():
        if adapter_name in state.fused_names():
            raise LoraFusionError(f"hotswap: adapter {adapter_name!r} is fused in {comp or 'module'}; unfuse_lora first")
    writes = []
    for comp, layers in plan.items():
        state = holders.get(comp)
        if state is None:
            raise LoraFormatError(f"{src}: hotswap into {adapter_name!r}: component {comp!r} is not targeted by the "
                                  "loaded adapter, so it cannot be swapped in place")
        root = comps[comp]
        by_path = state.slot_hooks.get(adapter_name, {})
        extra = sorted(layer_label(comp, p) for p in layers if p not in by_path)
        if extra:
            shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
            raise LoraFormatError(f"{src}: hotswap into {adapter_name!r}: the new adapter targets modules the loaded "
                                  f"one does not ({shown}); load it as a new adapter instead")
        for path, layer in layers.items():
            key = layer_label(comp, path)
            module = resolve_module(root, path)
            check_shape(layer, module, f"{src}: {key}")
            slot = by_path[path].slots[adapter_name]
            why = slot.rank_fits(module, layer)
            if why is not None:
                raise LoraFormatError(f"{src}: hotswap into {adapter_name!r}: {key}: {why}")
            writes.append((comp, path, module, layer, slot))
    new_layers: dict = {c: {} for c in holders}
    for comp, path, module, layer, slot in writes:
        dev_layer = layer.to(device=module.weight.device)
        slot.load(module, dev_layer)
        new_layers[comp][path] = BoundLayer(path, module, dev_layer)
    for comp, state in holders.items():
        written = new_layers[comp]
        for path, hook in state.slot_hooks[adapter_name].items():
            if path not in written:
                hook.slots[adapter_name].clear()
        state.adapters[adapter_name] = written
        # no bump: the plan (which slots run) is unchanged, only tensor values are new
        state.swaps += 1
        drop_fuse_cache(state)
    return adapter_name
