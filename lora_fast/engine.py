"""Per-component adapter state and fused weight updates.

State lives in a side table keyed (weakly) by each component module, never on the model: the
module tree, its attributes and its state_dict keys stay exactly as the user built them.

Fusing builds one merge job per touched weight: all adapters fused together on that weight become
one concatenated-rank product (up = [λ·w_i·s_i·B_i], down = [A_i]) so each weight is read and
written once, and the whole call goes to the kernels as one grouped job list. Every fuse keeps the
kernels' sparse exact-unfuse record, so ``unfuse_lora`` restores weights bit for bit and a
``safe_fusing`` failure rolls back exactly without cloning weights first.
"""

from __future__ import annotations

import math
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

from .adapter import LoraAdapter, LoraLayer, split_component
from .errors import LoraFormatError, LoraFusionError
from .kernels import merge as merge_kernels
from .targets import is_fan_in_fan_out, resolve_components, resolve_module, weight_matrix


@dataclass(eq=False)
class BoundLayer:
    """A LoRA layer attached to one module of a component (factors on the module's device)."""

    path: str
    module: nn.Module
    layer: LoraLayer


@dataclass(eq=False)
class _FusedStep:
    """What one fuse call did to one component, enough to undo it exactly."""

    names: list[str]
    jobs: list = field(default_factory=list)  # merge_kernels.MergeJob
    records: list = field(default_factory=list)  # merge_kernels.MergeRecord
    staged: list = field(default_factory=list)  # (parameter tensor, staging 2-D copy) for non-viewable weights
    backups: list = field(default_factory=list)  # (tensor, full copy): DoRA weights and LoRA biases

    def nbytes(self) -> int:
        rec = sum(r.nbytes() for r in self.records if r is not None)
        return rec + sum(b.numel() * b.element_size() for _, b in self.backups)


@dataclass(eq=False)
class ComponentState:
    adapters: dict[str, dict[str, BoundLayer]] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    fused: list[_FusedStep] = field(default_factory=list)

    def fused_names(self) -> set[str]:
        return {n for step in self.fused for n in step.names}


_STATES: "weakref.WeakKeyDictionary[nn.Module, ComponentState]" = weakref.WeakKeyDictionary()


def component_state(module: nn.Module, create: bool = False) -> Optional[ComponentState]:
    state = _STATES.get(module)
    if state is None and create:
        state = _STATES[module] = ComponentState()
    return state


def _states(target, components: Optional[Iterable[str]] = None) -> list[tuple[Optional[str], nn.Module, ComponentState]]:
    comps = resolve_components(target)
    wanted = None if components is None else set(components)
    out = []
    for name, module in comps.items():
        if wanted is not None and name is not None and name not in wanted:
            continue
        state = component_state(module)
        if state is not None:
            out.append((name, module, state))
    return out


def _label(component: Optional[str], path: str) -> str:
    return f"{component}.{path}" if component else path


# --------------------------------------------------------------------------------------------- binding


def _check_shape(layer: LoraLayer, module: nn.Module, key: str) -> None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise LoraFormatError(f"{key}: target module {type(module).__name__} has no weight tensor to adapt")
    w = weight.shape
    if layer.kind == "embedding":
        ok = isinstance(module, nn.Embedding) and tuple(w) == layer.weight_shape
    elif layer.kind == "conv" and layer.weight_shape[2:] != (1, 1):
        ok = tuple(w) == layer.weight_shape
    else:  # linear or 1×1 conv: factors may be 2-D or 4-D with 1×1 dims
        if is_fan_in_fan_out(module):
            rows, cols = w[1], w[0]
        else:
            rows, cols = w[0], (math.prod(w[1:]) if len(w) > 1 else 0)
        spatial_ok = len(w) == 2 or (len(w) == 4 and tuple(w[2:]) == (1, 1))
        ok = spatial_ok and (rows, cols) == (layer.out_features, layer.in_features) and not isinstance(module, nn.Embedding)
    if not ok:
        raise LoraFormatError(
            f"{key}: LoRA factors imply a weight of shape {layer.weight_shape} but the target "
            f"{type(module).__name__} has weight shape {tuple(w)}"
        )


def _assign(adapter: LoraAdapter, comps: dict, components: Optional[Sequence[str]]):
    """Map every adapter layer to (component, path) of the target. Raises before anything changes."""
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


def _adapter_names(target) -> set[str]:
    names = set()
    for _, _, state in _states(target):
        names.update(state.adapters)
    return names


def bind(target, adapter: LoraAdapter, adapter_name: Optional[str], components=None) -> str:
    """Validate every layer against the target, then register the adapter (nothing changes on error)."""
    comps = resolve_components(target)
    plan = _assign(adapter, comps, components)
    existing = _adapter_names(target)
    if adapter_name is None:
        k = len(existing)
        while f"default_{k}" in existing:
            k += 1
        adapter_name = f"default_{k}"
    elif adapter_name in existing:
        raise LoraFormatError(f"adapter name {adapter_name!r} is already in use; delete it first or pick another name")

    bound: dict[Optional[str], dict[str, BoundLayer]] = {}
    for comp, layers in plan.items():
        root = comps[comp]
        for path, layer in layers.items():
            key = _label(comp, path)
            module = resolve_module(root, path)
            if module is None:
                raise LoraFormatError(f"{adapter.source or 'adapter'}: {key}: no such module in the target")
            _check_shape(layer, module, key)
            w = module.weight
            dev_layer = layer.to(device=w.device)
            bound.setdefault(comp, {})[path] = BoundLayer(path, module, dev_layer)

    for comp, layers in bound.items():
        state = component_state(comps[comp], create=True)
        state.adapters[adapter_name] = layers
        state.weights[adapter_name] = 1.0
        state.active = [adapter_name]  # as in diffusers: a newly loaded adapter is the only active one
    return adapter_name


# --------------------------------------------------------------------------------------------- fusing


def _dora_fuse(weight: torch.Tensor, layer: LoraLayer, factor: float) -> torch.Tensor:
    """DoRA merge in float32 with one rounding. PEFT axis: m/‖W+fΔ‖_row·(W+fΔ); kohya axis: per input column,
    blended by the strength as A1111/ComfyUI do: W + f·(W_d − W) with W_d = V·m/‖V‖_col."""
    w32 = weight.float()
    delta = layer.delta().reshape(weight.shape).to(w32.device)
    mag = layer.magnitude.float().to(w32.device)
    if layer.magnitude_axis == "out":
        v = w32 + factor * delta
        rows = v.reshape(v.shape[0], -1)
        norm = rows.norm(dim=1, keepdim=True)
        out = rows * (mag.reshape(-1, 1) / norm)
        return out.reshape(weight.shape).to(weight.dtype)
    v = w32 + delta
    dims = [d for d in range(v.dim()) if d != 1]
    norm = v.norm(dim=dims, keepdim=True) if dims else v.abs()
    wd = v * (mag.reshape(norm.shape) / norm)
    return (w32 + factor * (wd - w32)).to(weight.dtype)


def _dora_view(weight_param: torch.Tensor, module: nn.Module) -> torch.Tensor:
    return weight_param.t() if is_fan_in_fan_out(module) else weight_param


def fuse(target, lora_scale: float = 1.0, safe_fusing: bool = False, adapter_names=None, components=None,
         adapter_weights=None) -> None:
    states = _states(target, components)
    if adapter_names is not None and isinstance(adapter_names, str):
        adapter_names = [adapter_names]
    if adapter_weights is not None:
        if adapter_names is None:
            raise LoraFusionError("adapter_weights needs adapter_names (a list parallel to it)")
        if isinstance(adapter_weights, (int, float)):
            adapter_weights = [float(adapter_weights)] * len(adapter_names)
        if len(adapter_weights) != len(adapter_names):
            raise LoraFusionError(
                f"adapter_weights has {len(adapter_weights)} entries for {len(adapter_names)} adapter_names"
            )
    if adapter_names is not None:
        known = set().union(*(s.adapters for _, _, s in states)) if states else set()
        missing = [n for n in adapter_names if n not in known]
        if missing:
            raise LoraFusionError(f"no adapter named {missing} is loaded in the selected components")

    plans = []  # (component, module, state, step, [(label, module, [(layer, factor)])])
    for comp, root, state in states:
        names = list(adapter_names) if adapter_names is not None else list(state.active)
        weights = {}
        for i, n in enumerate(names):
            if adapter_weights is not None:
                weights[n] = float(adapter_weights[i])
            else:
                weights[n] = state.weights.get(n, 1.0)
        already = state.fused_names()
        todo = [n for n in names if n in state.adapters and n not in already]
        skipped = [n for n in names if n in already]
        if skipped:
            warnings.warn(f"{comp or 'module'}: adapters {skipped} are already fused; not fusing them again")
        if not todo:
            continue
        per_module: dict[int, tuple[str, nn.Module, list]] = {}
        for n in todo:
            for path, b in state.adapters[n].items():
                entry = per_module.setdefault(id(b.module), (_label(comp, path), b.module, []))
                entry[2].append((b.layer, float(lora_scale) * weights[n]))
        plans.append((comp, root, state, _FusedStep(names=todo), list(per_module.values())))
    if not plans:
        return

    # Additive parts of every touched weight of every component: one grouped kernel call.
    jobs, labels, owners = [], [], []
    dora_work = []
    for comp, root, state, step, modules in plans:
        for label, module, items in modules:
            additive = [(l, f) for l, f in items if l.magnitude is None]
            dora_work.extend((step, label, module, l, f) for l, f in items if l.magnitude is not None)
            for l, f in additive:
                if l.bias is not None:
                    if getattr(module, "bias", None) is None:
                        raise LoraFusionError(f"{label}: the adapter has a LoRA bias but the module has no bias")
            if not additive:
                continue
            job = _merge_job(module, additive, step)
            jobs.append(job)
            labels.append(label)
            owners.append(step)

    records, nonfinite = merge_kernels.fuse(jobs, record=True, check_finite=safe_fusing) if jobs else ([], [])
    for step, job, rec in zip(owners, jobs, records):
        step.jobs.append(job)
        step.records.append(rec)

    def rollback():
        for _, _, _, step, _ in reversed(plans):
            _undo(step)

    try:
        if safe_fusing and any(nonfinite):
            bad = labels[nonfinite.index(True)]
            raise LoraFusionError(f"{bad}: fusing gives non-finite weights (NaN/Inf); every weight was left unchanged")
        for step in owners:
            for param, staging in step.staged:
                param.copy_(staging.view(param.shape) if staging.is_contiguous() else staging.reshape(param.shape))
        _fuse_biases(plans, safe_fusing)
        for step, label, module, layer, factor in dora_work:
            w = module.weight.data
            step.backups.append((w, w.clone()))
            new = _dora_fuse(_dora_view(w, module), layer, factor)
            if safe_fusing and not torch.isfinite(new).all():
                raise LoraFusionError(f"{label}: fusing gives non-finite weights (NaN/Inf); every weight was left unchanged")
            _dora_view(w, module).copy_(new)
    except BaseException:
        rollback()
        raise
    for comp, root, state, step, _ in plans:
        state.fused.append(step)


def _merge_job(module: nn.Module, items, step: _FusedStep):
    ups, downs = [], []
    for layer, factor in items:
        b, a = layer.factors()
        ups.append(b * (layer.scale * factor))
        downs.append(a)
    up = torch.cat(ups, dim=1).contiguous() if len(ups) > 1 else ups[0].contiguous()
    down = torch.cat(downs, dim=0).contiguous() if len(downs) > 1 else downs[0].contiguous()
    try:
        w2 = weight_matrix(module)
    except RuntimeError:  # e.g. a channels_last conv weight: no 2-D alias exists, merge on a copy
        param = module.weight.data
        w2 = param.reshape(param.shape[0], -1).contiguous()
        step.staged.append((param, w2))
    return merge_kernels.MergeJob(weight=w2, up=up.to(w2.device), down=down.to(w2.device))


def _fuse_biases(plans, safe_fusing: bool) -> None:
    for comp, root, state, step, modules in plans:
        for label, module, items in modules:
            biased = [(l, f) for l, f in items if l.bias is not None and l.magnitude is None]
            if not biased:
                continue
            b = module.bias.data
            step.backups.append((b, b.clone()))
            acc = b.float()
            for layer, factor in biased:
                acc = acc + layer.bias.float().to(acc.device) * (layer.scale * factor)
            if safe_fusing and not torch.isfinite(acc).all():
                raise LoraFusionError(f"{label}: fusing the LoRA bias gives non-finite values; nothing was changed")
            b.copy_(acc.to(b.dtype))


def _undo(step: _FusedStep) -> None:
    for tensor, backup in reversed(step.backups):
        tensor.copy_(backup)
    step.backups.clear()
    if step.jobs:
        merge_kernels.unfuse(step.jobs, step.records)
        for param, staging in step.staged:
            param.copy_(staging.reshape(param.shape))
    step.jobs.clear()
    step.records.clear()
    step.staged.clear()


def unfuse(target, components=None) -> None:
    for comp, root, state in _states(target, components):
        while state.fused:
            _undo(state.fused.pop())


def fused_record_bytes(target) -> int:
    """Bytes held to make unfuse exact (sparse records plus DoRA/bias backups)."""
    return sum(step.nbytes() for _, _, s in _states(target) for step in s.fused)


def unload(target, components=None) -> None:
    """Drop adapters and exact-unfuse records; fused weights stay baked in."""
    for comp, module, state in _states(target, components):
        _STATES.pop(module, None)


def delete(target, adapter_names: Sequence[str]) -> None:
    """Forget adapters that are not fused."""
    for comp, module, state in _states(target):
        fused = state.fused_names()
        for n in adapter_names:
            if n in fused:
                raise LoraFusionError(f"adapter {n!r} is fused in {comp or 'module'}; unfuse_lora first")
        for n in adapter_names:
            state.adapters.pop(n, None)
            state.weights.pop(n, None)
            if n in state.active:
                state.active.remove(n)
        if not state.adapters and not state.fused:
            _STATES.pop(module, None)
