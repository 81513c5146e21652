"""Per-component adapter state and fused weight updates.

State lives beside the model, never in it: one removable pre-hook on each component root holds it
(see component_state); the module tree, its attributes and its state_dict keys stay exactly as the
user built them.

Live (unfused) adapters: every adapted module carries one removable forward hook (lora_fast.live)
that reads this state lazily; state changes bump ``version`` and hooks rebuild their plan at their
next forward, so set_adapters & co cost O(adapters), never O(modules).

Fusing builds one merge job per touched weight: all adapters fused together on that weight become
one concatenated-rank product (up = [λ·w_i·s_i·B_i], down = [A_i]) so each weight is read and
written once, and the whole call goes to the kernels as one grouped job list. Every fuse keeps the
kernels' sparse exact-unfuse record, so ``unfuse_lora`` restores weights bit for bit and a
``safe_fusing`` failure rolls back exactly without cloning weights first.
"""

from __future__ import annotations

import collections
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from .adapter import COMPONENTS, LoraAdapter, LoraLayer, split_component
from .errors import LoraFormatError, LoraFusionError
from .kernels import merge as merge_kernels
from .live import CallScaleHooks, EncodePromptScale, ModuleHook, dora_weight, make_slot, sync_state
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
    records: merge_kernels.RecordSet = field(default_factory=merge_kernels.RecordSet)  # parallel to jobs
    staged: list = field(default_factory=list)  # (parameter tensor, staging 2-D copy) for non-viewable weights
    backups: list = field(default_factory=list)  # (tensor, full copy): DoRA weights and LoRA biases

    def nbytes(self) -> int:
        return self.records.nbytes() + sum(b.numel() * b.element_size() for _, b in self.backups)


@dataclass(eq=False)
class ComponentState:
    adapters: dict[str, dict[str, BoundLayer]] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    fused: list[_FusedStep] = field(default_factory=list)
    # live path
    weight_t: dict[str, torch.Tensor] = field(default_factory=dict)  # adapter -> 0-d float32 (w of set_adapters)
    hooks: dict[int, ModuleHook] = field(default_factory=dict)  # id(module) -> its forward hook
    slot_hooks: dict[str, dict[str, ModuleHook]] = field(default_factory=dict)  # adapter -> path -> hook
    scale_hooks: Optional[CallScaleHooks] = None
    enabled: bool = True
    version: int = 0  # bumped on any change of what runs live; hooks compare it lazily
    epoch: int = 0  # bumped whenever base weights change (fuse/unfuse): DoRA norm caches depend on them
    call_scale: float = 1.0
    scale_stack: list = field(default_factory=list)
    max_rank: Optional[int] = None
    per_sample: Optional[object] = None  # lora_fast.per_sample.PerSampleSpec while per_sample_adapters is active
    per_sample_on: bool = False  # per_sample is not None; a plain bool so torch.compile guards on two values only
    per_sample_rows: collections.OrderedDict = field(default_factory=collections.OrderedDict)  # row-map LRU
    swaps: int = 0  # bumped by hotswap: tensors may have been replaced (per-sample kernel tables hold addresses)
    slot_epoch: int = 0  # bumped with version except for selection-only changes (see bump)
    gates: dict = field(default_factory=dict)  # adapter -> live.AdapterGate: what the traced forward runs
    # repeat fuses (see _FuseMemo): cached fuse calls this component takes part in, bumped/dropped whenever its
    # adapters change; pending checks of fuses made at cached record positions
    fuse_gen: int = 0
    fuse_memo: collections.OrderedDict = field(default_factory=collections.OrderedDict)
    fuse_checks: list = field(default_factory=list)

    def fused_names(self) -> set[str]:
        return {n for step in self.fused for n in step.names}

    def bump(self, slots: bool = True) -> None:
        """A change of what runs live; ``slots=False`` when only the selection changed (set_adapters, enable/disable),
        not the adapters' tensors: per-sample plans (keyed on ``slot_epoch``) then stay valid. Call it after the
        change is complete: it writes the traced forward's gates (and DoRA caches) from the state at once."""
        self.version += 1
        if slots:
            self.slot_epoch += 1
        sync_state(self, slots)


def component_state(module: nn.Module, create: bool = False) -> Optional[ComponentState]:
    """The state of a component, found through the call-scale pre-hook on its root.

    There is no global table: the state is reachable only from the hooks lora_fast put on the
    component, so removing the hooks forgets it, it dies with the model, and ``copy.deepcopy`` of a
    model with adapters gives an independent model with independent adapters (like PEFT layers would).
    """
    for hook in module._forward_pre_hooks.values():
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, CallScaleHooks):
            return owner.state
    if not create:
        return None
    state = ComponentState()
    state.scale_hooks = CallScaleHooks(state, module)
    return state


def _states(target, components: Optional[Iterable[str]] = None,
            check: bool = True) -> list[tuple[Optional[str], nn.Module, ComponentState]]:
    """(component, root, state) of every component holding lora_fast state (within ``components`` if given).

    ``check`` (every call that acts on the target; only the read-only queries pass False) first refuses a target
    on which diffusers/PEFT LoRA layers were loaded after lora_fast's (:func:`check_one_library`)."""
    comps = resolve_components(target)
    if check:
        check_one_library(comps)
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
    # an embedding LoRA only on an nn.Embedding, a linear/conv one never on an embedding
    ok = (isinstance(module, nn.Embedding) == (layer.kind == "embedding")
          and layer.fits_weight(w, is_fan_in_fan_out(module)))
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
    for _, _, state in _states(target, check=False):
        names.update(state.adapters)
    return names


def _peft_layer_type():
    """PEFT's BaseTunerLayer if peft is already imported (no PEFT import: if it is not, no PEFT layer exists)."""
    if "peft" not in sys.modules:
        return None
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except Exception:  # a broken or partial peft install holds no layers we could see
        return None
    return BaseTunerLayer


def _refuse_peft(where: str, what: str) -> None:
    raise LoraFormatError(
        f"{where}: the target already holds diffusers/PEFT LoRA layers ({what}); lora_fast would apply its adapters "
        "on top of them. Remove them first (diffusers: pipe.unload_lora_weights(); PEFT: model.unload()) or fuse "
        "them into the weights"
    )


def _peft_marker(root: nn.Module) -> Optional[str]:
    """Why ``root`` holds diffusers/PEFT LoRA layers, or None. Cheap: diffusers, transformers and PEFT's
    ``inject_adapter_in_model`` all set ``peft_config`` on the model they inject into (and diffusers'
    ``unload_lora_weights`` / ``delete_adapters`` of the last adapter remove it again)."""
    if getattr(root, "_hf_peft_config_loaded", False) or getattr(root, "peft_config", None):
        return "peft_config is set"
    peft_layer = _peft_layer_type()
    if peft_layer is not None and isinstance(root, peft_layer):
        return type(root).__name__
    return None


def check_no_peft_root(comp: Optional[str], root: nn.Module) -> None:
    """Cheap per-component check: diffusers and transformers mark a model that holds PEFT adapters. Layers injected
    by other means are caught per targeted module in bind (every module a LoRA touches is checked)."""
    why = _peft_marker(root)
    if why is not None:
        _refuse_peft(comp or type(root).__name__, why)


def check_one_library(comps: dict) -> None:
    """Refuse a target that holds lora_fast adapters and, since they were loaded, got diffusers/PEFT LoRA layers too
    (diffusers' ``pipe.load_lora_weights`` does not look for lora_fast's hooks). Both would apply to the same
    layers, and fusing, unfusing or unloading either library's adapters would leave the other's in an unknown state,
    so nothing is changed until the diffusers/PEFT adapters are removed. Costs one attribute look-up per component."""
    ours = {}
    for comp, root in comps.items():
        state = component_state(root)
        if state is not None:
            ours[comp] = state
    if not ours:
        return
    theirs = [(comp, why) for comp, root in comps.items() if (why := _peft_marker(root)) is not None]
    if not theirs:
        return
    names = sorted({n for s in ours.values() for n in s.adapters} | {n for s in ours.values() for n in s.fused_names()})
    where = ", ".join(f"{c or type(comps[c]).__name__} ({why})" for c, why in theirs)
    raise LoraFormatError(
        f"diffusers/PEFT LoRA layers were loaded into {where} after lora_fast loaded adapters {names} (e.g. by "
        "diffusers' pipe.load_lora_weights); both would apply to the same layers, so lora_fast changed nothing. Use "
        "one library per pipeline: remove the diffusers/PEFT adapters (diffusers: pipe.unload_lora_weights() or "
        "pipe.delete_adapters([...]); PEFT: model.unload()) and lora_fast's adapters work again as before. To move "
        "to diffusers instead, remove them, call lora_fast.unload_lora_weights(pipe), then load with diffusers"
    )


def bind(target, adapter: LoraAdapter, adapter_name: Optional[str], components=None, max_rank: Optional[int] = None) -> str:
    """Validate every layer against the target, then register the adapter and its live hooks (nothing changes on error)."""
    adapter_name, comps, bound = plan_bind(target, adapter, adapter_name, components, max_rank)
    register_bound(target, comps, bound, adapter_name, max_rank)
    return adapter_name


def plan_bind(target, adapter: LoraAdapter, adapter_name: Optional[str], components=None,
              max_rank: Optional[int] = None, move: bool = True):
    """Validate every layer and pick the adapter name, changing nothing: (name, components, bound layers).

    ``move=False`` keeps each layer's tensors where they are (fuse-on-load streams them to the device itself).
    A file for another model family (an SDXL LoRA on a Flux pipeline) gets that said in the error."""
    try:
        return _plan_bind(target, adapter, adapter_name, components, max_rank, move)
    except LoraFormatError as e:
        from .formats.families import family_mismatch

        hint = family_mismatch(adapter, target)
        if hint is None:
            raise
        raise LoraFormatError(f"{e}; {hint}") from e


def _plan_bind(target, adapter: LoraAdapter, adapter_name: Optional[str], components, max_rank, move):
    comps = resolve_components(target)
    check_one_library(comps)
    plan = _assign(adapter, comps, components)
    for comp in comps:  # one library per pipeline: any component holding PEFT layers refuses the load
        check_no_peft_root(comp, comps[comp])
    peft_layer = _peft_layer_type()
    existing = _adapter_names(target)
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
            key = _label(comp, path)
            module = resolve_module(root, path)
            if module is None:
                raise LoraFormatError(f"{adapter.source or 'adapter'}: {key}: no such module in the target")
            if peft_layer is not None and isinstance(module, peft_layer):
                _refuse_peft(key, type(module).__name__)
            _check_shape(layer, module, f"{adapter.source or 'adapter'}: {key}")
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
        _install_encode_prompt_scale(target)


# --------------------------------------------------------------------------------------------- pipelines


def _text_encoder_states(pipe) -> list[ComponentState]:
    out = []
    for name, module in resolve_components(pipe).items():
        if name and name.startswith("text_encoder"):
            state = component_state(module)
            if state is not None:
                out.append(state)
    return out


def _install_encode_prompt_scale(target) -> None:
    """diffusers pipelines hand the text-encoder LoRA scale to ``encode_prompt(lora_scale=...)``: observe it."""
    if isinstance(target, (nn.Module, dict)):
        return
    method = getattr(type(target), "encode_prompt", None)
    if method is None or isinstance(target.__dict__.get("encode_prompt"), EncodePromptScale):
        return
    try:
        import inspect

        if "lora_scale" not in inspect.signature(method).parameters:
            return
    except (TypeError, ValueError):
        return
    target.__dict__["encode_prompt"] = EncodePromptScale(target, _text_encoder_states)


def _remove_encode_prompt_scale(target, force: bool = False) -> None:
    if isinstance(target, (nn.Module, dict)):
        return
    d = getattr(target, "__dict__", {})
    if isinstance(d.get("encode_prompt"), EncodePromptScale) and (force or not _text_encoder_states(target)):
        del d["encode_prompt"]


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


# --------------------------------------------------------------------------------------------- fusing


def _dora_view(weight_param: torch.Tensor, module: nn.Module) -> torch.Tensor:
    return weight_param.t() if is_fan_in_fan_out(module) else weight_param


def refuse_during_per_sample(states, what: str) -> None:
    busy = [comp or "module" for comp, _, s in states if s.per_sample is not None]
    if busy:
        raise LoraFusionError(f"{what}: per_sample_adapters is active on {busy}; fuse after leaving it")


def _real(value, what: str) -> float:
    """float(value) for a number (numpy and 1-element tensors included); LoraFusionError for anything else."""
    if not isinstance(value, (bool, str, bytes)):
        try:
            return float(value)
        except (TypeError, ValueError, RuntimeError):
            pass
    raise LoraFusionError(f"{what} must be a number, got {value!r}")


def component_scales(lora_scale, comps) -> dict:
    """{component: float} from ``lora_scale``: one number for every component, or a dict ``{component: number}``
    (a component left out gets 1.0, as with set_adapters' per-component weights). Raises LoraFusionError on anything
    else, or on a dict naming a component the target does not have."""
    if isinstance(lora_scale, dict):
        unknown = sorted(str(k) for k in lora_scale if k not in comps)
        if unknown:
            raise LoraFusionError(f"lora_scale names components {unknown} that the target does not have "
                                  f"(it has {sorted(str(c) for c in comps)})")
        values = {k: _real(v, f"lora_scale[{k!r}]") for k, v in lora_scale.items()}
        return {c: values.get(c, 1.0) for c in comps}
    value = _real(lora_scale, "lora_scale")
    return {c: value for c in comps}


# ----------------------------------------------------------------------------------------- repeat fuses


def _cache_entries() -> int:
    try:
        return max(0, int(os.environ.get("LORA_FAST_FUSE_CACHE", "4")))
    except ValueError:
        return 4


@dataclass(eq=False)
class _Part:
    """One component's share of one fuse call."""

    comp: Optional[str]
    root: nn.Module
    state: ComponentState
    step: _FusedStep
    idxs: list  # its jobs in the call's job list
    biased: list  # (label, module, [(layer, factor)]) of the modules with a LoRA bias to fuse
    dora: list  # (label, module, layer, factor)


@dataclass(eq=False)
class _FuseMemo:
    """A fuse call kept for repeating it (docs/fuse.md, "On the GPU: data flow"): the merge jobs (the same objects
    each time, so the kernels' FuseCache keyed on them hits), each job's label, the per-component bookkeeping, and
    what the jobs were built from that the merge key cannot see: each weight's module (the parameter must still be
    ``module.weight``) and the adapter tensors of factors that are converted copies (their ``_version``). Keyed by
    the components' identity and ``fuse_gen``, the adapters fused, their weights and the scale; stored in every
    component it touches (at most LORA_FAST_FUSE_CACHE per component, least recently used dropped first) and dropped
    with any change of their adapters (load, delete, hotswap, set_lora_device, unload) or a failed check."""

    key: tuple
    states: tuple
    parts: list  # (idxs, biased, dora) per component, in call order
    jobs: list
    labels: list
    weights: list  # (module, weight parameter) per job
    sources: list  # (adapter tensor, _version) behind converted factors
    cache: merge_kernels.FuseCache

    def current(self) -> bool:
        for m, w in self.weights:
            if m._parameters.get("weight") is not w:
                return False
        for t, v in self.sources:
            if t._version != v:
                return False
        return self.cache.matches(self.jobs)


def _forget(memo: _FuseMemo) -> None:
    for s in memo.states:
        if s.fuse_memo.get(memo.key) is memo:
            del s.fuse_memo[memo.key]
    memo.cache.clear()


def drop_fuse_cache(state: ComponentState) -> None:
    """Forget every cached fuse call this component takes part in (its adapters or weights changed)."""
    state.fuse_gen += 1
    for memo in list(state.fuse_memo.values()):
        _forget(memo)


def _remember(memo: _FuseMemo, limit: int) -> None:
    for s in memo.states:
        s.fuse_memo[memo.key] = memo
        while len(s.fuse_memo) > limit:
            _forget(next(iter(s.fuse_memo.values())))


class _Check:
    """The FuseGuards of one fuse at cached record positions, with the labels of its jobs."""

    __slots__ = ("guards", "labels", "done")

    def __init__(self, guards, labels):
        self.guards, self.labels, self.done = guards, labels, False

    def poll(self, wait: bool):
        bad = []
        for g in self.guards:
            r = g.poll(wait)
            if r is None:
                return None
            bad.extend(self.labels[i] for i in r)
        self.done = True
        return bad


def check_fuses(states, wait: bool, where: str) -> None:
    """Read the pending checks of fuses made at cached record positions (without waiting for the device unless
    ``wait``); LoraFusionError naming the layers whose weights had changed behind torch's back. ``where`` says what
    state the model is in."""
    bad: list = []
    hit = []
    for _, _, st in states:
        keep = []
        for c in st.fuse_checks:
            if c.done:
                continue
            r = c.poll(wait)
            if r is None:
                keep.append(c)
            elif r:
                bad.extend(x for x in r if x not in bad)
        st.fuse_checks = keep
        hit.append(st)
    if not bad:
        return
    for st in hit:
        drop_fuse_cache(st)
    shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
    raise LoraFusionError(
        f"the weights of {shown} changed without torch seeing it (a write through .data, a raw pointer or another "
        "library's kernel) after lora_fast cached their fuse; the repeated fuse found record counts that no longer "
        "matched and left those parts of the weights unfused (outputs computed while fused lacked the adapters "
        f"there), so that unfusing stays exact. {where} The fuse cache was dropped: the next fuse_lora is a full one. "
        "Change weights through the parameters themselves (param.copy_(...), load_state_dict), which torch tracks"
    )


def fuse(target, lora_scale: float = 1.0, safe_fusing: bool = False, adapter_names=None, components=None,
         adapter_weights=None) -> None:
    states = _states(target, components)
    refuse_during_per_sample(states, "fuse_lora")
    scales = component_scales(lora_scale, resolve_components(target))
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
    check_fuses(states, False, "Nothing was changed by this fuse_lora call.")

    calls = []  # (component, root, state, adapters to fuse, their weights)
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
        if todo:
            calls.append((comp, root, state, todo, tuple(weights[n] for n in todo)))
    if not calls:
        return

    limit = _cache_entries()
    key = tuple((id(st), st.fuse_gen, scales[comp], tuple(todo), ws) for comp, _, st, todo, ws in calls)
    memo = calls[0][2].fuse_memo.get(key) if limit else None
    if memo is not None:
        if memo.current():
            calls[0][2].fuse_memo.move_to_end(key)
        else:  # the model changed under the cached call (moved, reloaded, a parameter replaced): forget them all
            for _, _, st, _, _ in calls:
                drop_fuse_cache(st)
            memo = None
            key = tuple((id(st), st.fuse_gen, scales[comp], tuple(todo), ws) for comp, _, st, todo, ws in calls)
    staged: list = []  # (parameter, staging copy) of this call's non-viewable weights, each once
    if memo is not None:
        jobs, labels = memo.jobs, memo.labels
        parts = [_Part(comp, root, st, _FusedStep(names=list(todo)), idxs, biased, dora)
                 for (comp, root, st, todo, _), (idxs, biased, dora) in zip(calls, memo.parts)]
    else:
        jobs, labels, parts, wmods, sources = _build_jobs(calls, scales, staged)
        if limit and not staged and all(m is not None for m, _ in wmods):
            memo = _FuseMemo(key, tuple(c[2] for c in calls), [(p.idxs, p.biased, p.dora) for p in parts], jobs,
                             labels, wmods, sources, merge_kernels.FuseCache())

    # safe_fusing: a non-finite result leaves every weight of the call untouched (nothing to attach, nothing to undo)
    records, nonfinite = (merge_kernels.fuse(jobs, record=True, check_finite=safe_fusing, abort_nonfinite=safe_fusing,
                                             cache=memo.cache if memo is not None else None)
                          if jobs else (merge_kernels.RecordSet(), []))
    if not any(nonfinite):
        for p in parts:
            p.step.jobs.extend(jobs[i] for i in p.idxs)
            p.step.records.extend(records.subset(p.idxs))

    def rollback():
        for p in reversed(parts):
            _undo(p.step)

    try:
        if safe_fusing and any(nonfinite):
            bad = labels[nonfinite.index(True)]
            raise LoraFusionError(f"{bad}: fusing gives non-finite weights (NaN/Inf); every weight was left unchanged")
        for param, staging in staged:
            param.copy_(staging.view(param.shape) if staging.is_contiguous() else staging.reshape(param.shape))
        _fuse_biases(parts, safe_fusing)
        for p in parts:
            for label, module, layer, factor in p.dora:
                w = module.weight.data
                p.step.backups.append((w, w.clone()))
                new = dora_weight(_dora_view(w, module), layer, factor)
                if safe_fusing and not torch.isfinite(new).all():
                    raise LoraFusionError(f"{label}: fusing gives non-finite weights (NaN/Inf); every weight was left "
                                          "unchanged")
                _dora_view(w, module).copy_(new)
    except BaseException:
        rollback()
        raise
    if memo is not None:
        _remember(memo, limit)
        if memo.cache.guards:
            check = _Check(memo.cache.guards, labels)
            for p in parts:
                p.state.fuse_checks.append(check)
    for p in parts:
        p.state.fused.append(p.step)
        p.state.epoch += 1
        p.state.bump()  # fused adapters stop running live


def _build_jobs(calls, scales, staged):
    """The merge jobs of a fuse call (additive adapters of every touched weight of every component, one grouped
    kernel call), their labels, the per-component parts, and what a _FuseMemo checks besides the merge key."""
    jobs, labels, parts, wmods, sources = [], [], [], [], []
    for comp, root, state, todo, ws in calls:
        per_module: dict[int, tuple[str, nn.Module, list]] = {}
        for n, w in zip(todo, ws):
            for path, b in state.adapters[n].items():
                entry = per_module.setdefault(id(b.module), (_label(comp, path), b.module, []))
                entry[2].append((b.layer, scales[comp] * w))
        part = _Part(comp, root, state, _FusedStep(names=list(todo)), [], [], [])
        for label, module, items in per_module.values():
            additive = [(l, f) for l, f in items if l.magnitude is None]
            part.dora.extend((label, module, l, f) for l, f in items if l.magnitude is not None)
            biased = [(l, f) for l, f in additive if l.bias is not None]
            if biased:
                if getattr(module, "bias", None) is None:
                    raise LoraFusionError(f"{label}: the adapter has a LoRA bias but the module has no bias")
                part.biased.append((label, module, biased))
            if not additive:
                continue
            job = _merge_job(module, additive, part.step, staged)
            part.idxs.append(len(jobs))
            jobs.append(job)
            labels.append(label)
            # LoHa/LoKr/full layers (terms built from copies of their tensors, torch backend): not kept for repeats
            wmods.append((None, None) if job.terms else (module, job.weight))
            for (layer, _), f in zip([x for x in additive if x[0].algorithm == "lora"], job.factors or ()):
                if f.up is not layer.up and f.up is not layer.down:  # a converted copy: watch its sources
                    sources.extend((t, t._version) for t in (layer.up, layer.down, layer.mid) if t is not None)
        parts.append(part)
    return jobs, labels, parts, wmods, sources


def attach_records(owners, jobs, records) -> None:
    """Give each step its jobs and its part of one fuse call's records (a RecordSet subset: no tensor operation)."""
    by_step: dict = {}
    for i, step in enumerate(owners):
        by_step.setdefault(id(step), (step, []))[1].append(i)
    for step, idxs in by_step.values():
        step.jobs.extend(jobs[i] for i in idxs)
        step.records.extend(records.subset(idxs))


_FACTOR_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _flat_strides(t: torch.Tensor, start: int):
    """The stride of dims ``start:`` of ``t`` flattened into one, or None when they are not one arithmetic run
    (what ``reshape`` could give without a copy, read from the metadata alone: no torch operation)."""
    stride, expect = None, None
    for size, st in zip(reversed(t.shape[start:]), reversed(t.stride()[start:])):
        if size == 1:
            continue
        if expect is None:
            stride, expect = st, st * size
        elif st != expect:
            return None
        else:
            expect = st * size
    return 1 if stride is None else stride


def _layer_factor(layer: LoraLayer, scale: float) -> merge_kernels.Factor:
    """``scale · B @ A`` of one layer as the merge kernels take it, read from the layer's own tensors (fp32, fp16 or
    bf16, any layout) without a torch operation; ``layer.factors()`` (float32 copies) for Tucker cores, other dtypes
    and layouts no strides describe. The kernels form ``rn32(fp32(B) · rn32(scale))``, which is what
    ``B.float() * scale`` gives, so both routes give the same bits."""
    up, down = layer.up, layer.down
    if layer.mid is None and up.dtype in _FACTOR_DTYPES and down.dtype in _FACTOR_DTYPES:
        if layer.kind == "embedding":  # (B A)^T: B' = A^T (num, r), A' = B^T (r, dim)
            su = _flat_strides(up, 1)
            if down.dim() == 2 and su is not None:
                return merge_kernels.Factor(down, (down.stride(1), down.stride(0)), up, (su, up.stride(0)),
                                            int(down.shape[0]), scale)
        else:
            su, sd = _flat_strides(up, 1), _flat_strides(down, 1)
            r = int(down.shape[0])
            if su is not None and sd is not None and math.prod(up.shape[1:]) == r:
                return merge_kernels.Factor(up, (up.stride(0), su), down, (down.stride(0), sd), r, scale)
    b, a = layer.factors()
    return merge_kernels.Factor.of(b, a, scale)


def _weight_view(module: nn.Module):
    """(weight tensor, (rows, cols, row stride, col stride)) of the 2-D (out, in_flat) matrix the merge works on,
    from the metadata alone (no torch operation: the parameter itself, not ``.data``, which is a detach op; the
    kernels write through its address and MergeJob.matrix() detaches it for the torch operations of the other
    backends), or None when no 2-D alias exists (see targets.weight_matrix)."""
    w = module.weight
    if is_fan_in_fan_out(module):
        return w, (w.shape[1], w.shape[0], w.stride(1), w.stride(0))
    if w.dim() == 2:
        return w, (w.shape[0], w.shape[1], w.stride(0), w.stride(1))
    sc = _flat_strides(w, 1)
    if sc is None:
        return None
    return w, (w.shape[0], math.prod(w.shape[1:]), w.stride(0), sc)


def _merge_job(module: nn.Module, items, step: _FusedStep, staged: Optional[list] = None):
    """The merge job of one weight: its adapters' factors (scales folded in by the kernel) on its 2-D view. A weight
    with no 2-D alias (e.g. a channels_last conv weight) is merged on one staging copy, listed in ``step.staged``
    (for unfuse) and in ``staged`` (the caller copies it back once)."""
    factors = [_layer_factor(layer, layer.scale * factor) for layer, factor in items if layer.algorithm == "lora"]
    terms = [_layer_term(layer, layer.scale * factor) for layer, factor in items if layer.algorithm != "lora"]
    wv = _weight_view(module)
    if wv is not None:
        w, view = wv
        if w.dim() == 2 and view[2:] == tuple(w.stride()) and view[:2] == tuple(w.shape):
            view = None
    else:
        param = module.weight.data
        w, view = param.reshape(param.shape[0], -1).contiguous(), None
        step.staged.append((param, w))
        if staged is not None:
            staged.append((param, w))
    wd = w.device
    for f in factors:
        if f.up.device != wd or f.down.device != wd:
            f.up, f.down = f.up.to(wd), f.down.to(wd)
    for t in terms:
        t.u, t.v, t.ub, t.vb = (None if x is None else x.to(wd) for x in (t.u, t.v, t.ub, t.vb))
    return merge_kernels.MergeJob(weight=w, factors=factors or None, view=view, terms=terms or None)


def _layer_term(layer: LoraLayer, scale: float):
    """A LoHa/LoKr/full layer as a merge-kernel Term (``LoraLayer.kernel_parts()``: LoHa factors in float32 with
    Tucker cores folded in, LoKr halves whole, a full diff in its dtype); the kernel applies ``scale``."""
    kind, *parts = layer.kernel_parts()
    if kind == "hada":
        u, ub, v, vb = parts
        return merge_kernels.Term("hada", u, v, ub, vb, scale)
    return merge_kernels.Term("kron", parts[0], parts[1], scale=scale)


def _fuse_biases(parts, safe_fusing: bool) -> None:
    for part in parts:
        step = part.step
        for label, module, biased in part.biased:
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
    states = _states(target, components)
    for comp, root, state in states:
        if not state.fused:
            continue
        try:
            while state.fused:
                _undo(state.fused.pop())
        finally:
            state.epoch += 1
            state.bump()  # after the weights are restored: the gates and DoRA caches are written from them
    check_fuses(states, False, "unfuse_lora has restored every weight exactly.")


def fused_record_bytes(target) -> int:
    """Bytes held to make unfuse exact (sparse records plus DoRA/bias backups). Waits for the checks of fuses made
    at cached record positions (see check_fuses) and raises if one failed."""
    states = _states(target, check=False)
    check_fuses(states, True, "Those weights are still fused; unfuse_lora restores them exactly.")
    return sum(step.nbytes() for _, _, s in states for step in s.fused)


def unload(target, components=None) -> None:
    """Drop adapters, hooks and exact-unfuse records; fused weights stay baked in."""
    for comp, module, state in _states(target, components):
        _drop_state(module, state)
    _remove_encode_prompt_scale(target, force=components is None)


def delete(target, adapter_names: Sequence[str]) -> None:
    """Forget adapters that are not fused."""
    if isinstance(adapter_names, str):
        adapter_names = [adapter_names]
    states = _states(target)
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
    _remove_encode_prompt_scale(target)


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
    states = _states(target)
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
    for _, _, state in _states(target, check=False):
        out.extend(n for n in state.active if n not in out)
    return out


def get_list_adapters(target) -> dict:
    return {comp: list(state.adapters) for comp, _, state in _states(target, check=False) if state.adapters}


def set_enabled(target, enabled: bool) -> None:
    for _, _, state in _states(target):
        state.enabled = bool(enabled)
        state.bump(slots=False)


def set_device(target, adapter_names, device) -> None:
    """Move adapters' tensors (only those). A slot not on its module's device is unused until moved back."""
    names = _as_names(adapter_names)
    states = _states(target)
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
                    raise LoraFormatError(f"prepare_hotswap: {_label(comp, path)} of adapter {n!r} has rank "
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
    plan = _assign(adapter, comps, components)
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
        extra = sorted(_label(comp, p) for p in layers if p not in by_path)
        if extra:
            shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
            raise LoraFormatError(f"{src}: hotswap into {adapter_name!r}: the new adapter targets modules the loaded "
                                  f"one does not ({shown}); load it as a new adapter instead")
        for path, layer in layers.items():
            key = _label(comp, path)
            module = resolve_module(root, path)
            _check_shape(layer, module, f"{src}: {key}")
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
