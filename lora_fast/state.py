"""Per-component adapter state, beside the model, never in it.

One removable pre-hook on each component root holds it (see component_state); the module tree, its attributes and
its state_dict keys stay exactly as the user built them.

Live (unfused) adapters: every adapted module carries one removable forward hook (lora_fast.live) that reads this
state lazily; state changes bump ``version`` and hooks rebuild their plan at their next forward, so set_adapters & co
cost O(adapters), never O(modules).

Also here: the one-library-per-pipeline guard (a target that holds diffusers/PEFT LoRA layers is refused) and the
``encode_prompt(lora_scale=...)`` observer of diffusers pipelines.
"""

from __future__ import annotations

import collections
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Optional

import torch
from torch import nn

from .adapter import LoraLayer
from .errors import LoraFormatError
from .live import CallScaleHooks, EncodePromptScale, ModuleHook, sync_state
from .targets import resolve_components

if TYPE_CHECKING:
    from .fusing import FusedStep


@dataclass(eq=False)
class BoundLayer:
    """A LoRA layer attached to one module of a component (factors on the module's device)."""

    path: str
    module: nn.Module
    layer: LoraLayer


@dataclass(eq=False)
class ComponentState:
    adapters: dict[str, dict[str, BoundLayer]] = field(default_factory=dict)
    weights: dict[str, float] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    fused: list[FusedStep] = field(default_factory=list)
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


def component_states(target, components: Optional[Iterable[str]] = None,
                     check: bool = True) -> list[tuple[Optional[str], nn.Module, ComponentState]]:
    """(component, root, state) of every component holding lora_fast state (within ``components`` if given).

    ``check`` (every call that acts on the target; only the read-only queries pass False) first refuses a target
    on which diffusers/PEFT LoRA layers were loaded after lora_fast's (:func:`check_one_library`).
    Internal: for lora_fast's own modules, not public API."""
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


def layer_label(component: Optional[str], path: str) -> str:
    """``component.path`` (just ``path`` for a plain module): how errors and records name a layer.
    Internal: for lora_fast's own modules, not public API."""
    return f"{component}.{path}" if component else path


def loaded_adapter_names(target) -> set[str]:
    """The names of every adapter loaded in any component of ``target``.
    Internal: for lora_fast's own modules, not public API."""
    names = set()
    for _, _, state in component_states(target, check=False):
        names.update(state.adapters)
    return names


def peft_layer_type():
    """PEFT's BaseTunerLayer if peft is already imported (no PEFT import: if it is not, no PEFT layer exists).
    Internal: for lora_fast's own modules, not public API."""
    if "peft" not in sys.modules:
        return None
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except Exception:  # a broken or partial peft install holds no layers we could see
        return None
    return BaseTunerLayer


def refuse_peft(where: str, what: str) -> None:
    """Raise the error for a target that already holds diffusers/PEFT LoRA layers.
    Internal: for lora_fast's own modules, not public API."""
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
    peft_layer = peft_layer_type()
    if peft_layer is not None and isinstance(root, peft_layer):
        return type(root).__name__
    return None


def check_no_peft_root(comp: Optional[str], root: nn.Module) -> None:
    """Cheap per-component check: diffusers and transformers mark a model that holds PEFT adapters. Layers injected
    by other means are caught per targeted module in bind (every module a LoRA touches is checked)."""
    why = _peft_marker(root)
    if why is not None:
        refuse_peft(comp or type(root).__name__, why)


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


# --------------------------------------------------------------------------------------------- pipelines


def _text_encoder_states(pipe) -> list[ComponentState]:
    out = []
    for name, module in resolve_components(pipe).items():
        if name and name.startswith("text_encoder"):
            state = component_state(module)
            if state is not None:
                out.append(state)
    return out


def install_encode_prompt_scale(target) -> None:
    """diffusers pipelines hand the text-encoder LoRA scale to ``encode_prompt(lora_scale=...)``: observe it.
    Internal: for lora_fast's own modules, not public API."""
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


def remove_encode_prompt_scale(target, force: bool = False) -> None:
    """Undo install_encode_prompt_scale once no text encoder holds adapters (or at once with ``force``).
    Internal: for lora_fast's own modules, not public API."""
    if isinstance(target, (nn.Module, dict)):
        return
    d = getattr(target, "__dict__", {})
    if isinstance(d.get("encode_prompt"), EncodePromptScale) and (force or not _text_encoder_states(target)):
        del d["encode_prompt"]
