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
from .fusing import (FusedStep, attach_records, component_scales, fuse, fused_record_bytes, refuse_during_per_sample,
                     undo_step, unfuse)
from .merge_jobs import merge_job
from .state import BoundLayer, ComponentState, component_state, component_states, layer_label, loaded_adapter_names
from .targets import resolve_components

__all__ = [
    # the public API's engine (lora_fast/__init__.py)
    "bind", "component_scales", "delete", "fuse", "get_active_adapters", "get_list_adapters", "hotswap",
    "prepare_hotswap", "resolve_components", "set_adapters", "set_device", "set_enabled", "unfuse", "unload",
    # state and diagnostics (tests, bench, gpu_checks)
    "BoundLayer", "ComponentState", "component_state", "component_states", "fused_record_bytes", "layer_label",
    "loaded_adapter_names",
    # the fast paths: fuse-on-load binds, builds merge jobs and keeps fuse steps itself; per_sample reads the state
    "FusedStep", "attach_records", "merge_job", "plan_bind", "refuse_during_per_sample", "register_bound", "undo_step",
]
