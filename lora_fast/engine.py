"""The engine's internal interface: what the public API (lora_fast/__init__.py), the fast paths (fuse_on_load,
per_sample) and the tools (bench, checkpoint) use of it. Not public API: names may change between releases.

The engine lives in one module per responsibility, along the life of an adapter on a model:

* ``lora_fast.state``: per-component adapter state beside the model (ComponentState, component_state), the
  one-library-per-pipeline guard, the pipelines' ``encode_prompt`` scale observer;
* ``lora_fast.binding``: mapping an adapter's layers to the target's modules, validation, registration;
* ``lora_fast.merge_jobs``: one weight's adapters as one merge-kernel job (factors, LyCORIS terms, 2-D views);
* ``lora_fast.fusing``: fuse_lora / unfuse_lora with exact-unfuse records, the cache of repeated fuse calls;
* ``lora_fast.control``: set_adapters, enable/disable, set_lora_device, delete, unload, hotswap, the queries.
"""

from __future__ import annotations

from .binding import bind, plan_bind, register_bound
from .control import (delete, get_active_adapters, get_list_adapters, hotswap, prepare_hotswap, set_adapters,
                      set_device, set_enabled, unload)
from .fusing import (_FusedStep, _undo, attach_records, component_scales, fuse, fused_record_bytes,
                     refuse_during_per_sample, unfuse)
from .merge_jobs import _merge_job
from .state import BoundLayer, ComponentState, _adapter_names, _label, _states, component_state
from .targets import resolve_components

__all__ = [
    "BoundLayer", "ComponentState", "attach_records", "bind", "component_scales", "component_state", "delete", "fuse",
    "fused_record_bytes", "get_active_adapters", "get_list_adapters", "hotswap", "plan_bind", "prepare_hotswap",
    "refuse_during_per_sample", "register_bound", "resolve_components", "set_adapters", "set_device", "set_enabled",
    "unfuse", "unload",
    # used by fuse_on_load / per_sample until they get names of their own
    "_FusedStep", "_adapter_names", "_label", "_merge_job", "_states", "_undo",
]
