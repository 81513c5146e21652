"""diffusers LoRA files: ``<component>.<path>.lora_A.weight`` keys + ``lora_adapter_metadata``.

``pytorch_lora_weights.safetensors`` holds PEFT-named tensors behind a component prefix (``unet.``,
``text_encoder.``, ``text_encoder_2.``, ``text_encoder_3.``, ``transformer.``). Ranks and alphas live in
the header entry ``lora_adapter_metadata``: the JSON of each component's LoraConfig with every key
prefixed by the component (``"unet.r"``, ``"unet.alpha_pattern"``...). Without it, alpha = rank.
A model-level file (``ModelMixin.save_lora_adapter``) has no prefixes on keys or metadata.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

import torch

from ..adapter import LoraAdapter, split_component
from ..errors import LoraFormatError
from .diffusers_legacy import parse_legacy_tail
from .peft import (
    PEFT_PREFIX, TEXT_COMPONENTS, AdapterConfig, ModuleCollector, ParsedKey, build_layers, export_component, parse_config_json,
    parse_peft_tail, prepare_for_save,
)

LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"
LORA_WEIGHT_NAME = "pytorch_lora_weights.bin"
LORA_WEIGHT_NAME_SAFE = "pytorch_lora_weights.safetensors"


def parse_diffusers_key(key: str) -> tuple[Optional[str], Optional[ParsedKey]]:
    """(component prefix or None, parsed tail or None if the key is not a diffusers LoRA key)."""
    comp, tail = split_component(key)
    parsed = parse_peft_tail(tail) or parse_legacy_tail(tail)
    return comp, parsed


def split_adapter_metadata(header: Optional[dict], where: str) -> Optional[dict]:
    """``lora_adapter_metadata`` JSON -> {component or None: config dict}; None when absent."""
    raw = (header or {}).get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return None
    meta = parse_config_json(raw, f"{where}: header {LORA_ADAPTER_METADATA_KEY!r}")
    groups: dict = {}
    for key, value in meta.items():
        comp, field_name = split_component(key)
        groups.setdefault(comp, {})[field_name] = value
    return groups


def read_diffusers(state_dict: dict, *, metadata: Optional[dict] = None, component: Optional[str] = None,
                   source: str = "<state dict>") -> LoraAdapter:
    """diffusers-named (incl. older attention-processor names) tensors -> LoraAdapter(format="diffusers").

    ``metadata`` is the file's header metadata. Un-prefixed keys get ``component`` as prefix (or none).
    """
    collector = ModuleCollector(source)
    prefixed = unprefixed = None
    for key, tensor in state_dict.items():
        comp, parsed = parse_diffusers_key(key)
        if parsed is None:
            raise LoraFormatError(f"{source}: {key!r} is not a diffusers LoRA key")
        if comp is None:
            unprefixed = unprefixed or key
        else:
            prefixed = prefixed or key
            if component is not None and comp != component:
                raise LoraFormatError(f"{source}: {key!r} belongs to {comp!r}, but component={component!r} was given")
        if prefixed and unprefixed:
            raise LoraFormatError(
                f"{source}: {unprefixed!r} has no component prefix while {prefixed!r} has one"
            )
        collector.add(key, tensor, comp or component, parsed, group=comp)

    groups = split_adapter_metadata(metadata, source)
    configs: dict = {}

    def config_for(mod) -> Optional[AdapterConfig]:
        if groups is None or not groups.get(mod.group):
            return None
        if mod.group not in configs:
            label = f"{mod.group}." if mod.group else ""
            configs[mod.group] = AdapterConfig.from_dict(
                groups[mod.group], f"{source}: {LORA_ADAPTER_METADATA_KEY} ({label}*)"
            )
        return configs[mod.group]

    layers = build_layers(collector, config_for, source)
    return LoraAdapter(layers=layers, format="diffusers", metadata=dict(metadata or {}), source=source)


# ----------------------------------------------------------------------------------------------
# writing


def diffusers_tensors_and_metadata(adapter: LoraAdapter) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The adapter as diffusers-named tensors and the header metadata that makes every scale exact."""
    where = adapter.source or "<adapter>"
    groups: dict = {}
    for key, layer in adapter.layers.items():
        comp, path = split_component(key)
        groups.setdefault(comp, {})[path] = layer
    if None in groups and len(groups) > 1:
        bare = next(iter(groups[None]))
        raise LoraFormatError(f"{where}: layer {bare!r} has no component prefix while others do")
    tensors, meta = {}, {}
    for comp, layers in groups.items():
        # transformers' load_adapter (diffusers' text-encoder path) maps only the live spelling
        # ``lora_magnitude_vector.weight``; the bare PEFT spelling would leave DoRA magnitudes unloaded.
        magnitude_suffix = "lora_magnitude_vector.weight" if comp in TEXT_COMPONENTS else "lora_magnitude_vector"
        part, config = export_component(layers, f"{where} ({comp or 'model'})", "diffusers",
                                        magnitude_suffix=magnitude_suffix)
        prefix = f"{comp}." if comp else ""
        tensors.update({prefix + k: v for k, v in part.items()})
        meta.update({prefix + k: v for k, v in config.items()})
    header = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True)}
    return prepare_for_save(tensors), header


def write_diffusers(adapter: LoraAdapter, path) -> None:
    """One diffusers ``.safetensors`` file; a directory gets ``pytorch_lora_weights.safetensors`` inside."""
    from .. import io

    tensors, header = diffusers_tensors_and_metadata(adapter)
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, LORA_WEIGHT_NAME_SAFE)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    io.save_file(tensors, path, metadata=header)


# ----------------------------------------------------------------------------------------------
# save_lora_weights (diffusers' StableDiffusionLoraLoaderMixin.save_lora_weights semantics)


def _peft_to_diffusers_key(key: str) -> str:
    """Strip ``base_model.model.`` and any adapter name (``.lora_A.default.weight`` -> ``.lora_A.weight``)."""
    tail = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    parsed = parse_peft_tail(tail)
    if parsed is None or parsed.adapter is None:
        return tail
    part = {
        ("down", False): "lora_A.weight", ("up", False): "lora_B.weight", ("bias", False): "lora_B.bias",
        ("down", True): "lora_embedding_A", ("up", True): "lora_embedding_B",
        ("magnitude", False): "lora_magnitude_vector",
    }[(parsed.role, parsed.embedding)]
    return f"{parsed.path}.{part}"


def _layer_state_dict(layers, name: str) -> dict[str, torch.Tensor]:
    if isinstance(layers, torch.nn.Module):
        from ..targets import unwrap_module

        layers = unwrap_module(layers).state_dict()  # a compiled module's keys carry "_orig_mod."; its module's do not
    if not isinstance(layers, dict):
        raise LoraFormatError(f"{name} must be a dict of tensors or a torch.nn.Module, got {type(layers).__name__}")
    out = {}
    for key, value in layers.items():
        if not isinstance(key, str):
            raise LoraFormatError(f"{name}: key {key!r} is not a string")
        new = _peft_to_diffusers_key(key)
        if new in out:
            raise LoraFormatError(f"{name}: {key!r} and another key both become {new!r}")
        out[new] = value
    return out


def _lists_for_sets(value):
    if isinstance(value, (set, frozenset)):
        return sorted(value) if all(isinstance(v, str) for v in value) else list(value)
    if isinstance(value, dict):
        return {k: _lists_for_sets(v) for k, v in value.items()}
    return value


def save_lora_weights(
    save_directory,
    unet_lora_layers=None,
    text_encoder_lora_layers=None,
    text_encoder_2_lora_layers=None,
    transformer_lora_layers=None,
    is_main_process: bool = True,
    weight_name: Optional[str] = None,
    save_function: Optional[Callable] = None,
    safe_serialization: bool = True,
    unet_lora_adapter_metadata=None,
    text_encoder_lora_adapter_metadata=None,
    text_encoder_2_lora_adapter_metadata=None,
    transformer_lora_adapter_metadata=None,
) -> None:
    """Write LoRA layer state dicts as diffusers' ``save_lora_weights`` does (same keys, header, file name).

    Each ``*_lora_layers`` is a state dict (or a module whose state_dict() is one) of one component's
    LoRA tensors, diffusers- or PEFT-named (``base_model.model.`` prefixes and adapter names are
    stripped). ``*_lora_adapter_metadata`` is that component's LoraConfig dict
    (``LoraConfig.to_dict()``); it is stored, component-prefixed, in the header like diffusers does, and
    needs safetensors. The inputs are validated (shapes, ranks against the metadata) before anything
    is written; the write is atomic. Nothing is written when ``is_main_process`` is False.
    """
    from .. import io

    components = (
        ("unet", unet_lora_layers, unet_lora_adapter_metadata),
        ("text_encoder", text_encoder_lora_layers, text_encoder_lora_adapter_metadata),
        ("text_encoder_2", text_encoder_2_lora_layers, text_encoder_2_lora_adapter_metadata),
        ("transformer", transformer_lora_layers, transformer_lora_adapter_metadata),
    )
    state_dict: dict = {}
    adapter_metadata: dict = {}
    for name, layers, meta in components:
        if layers is None or isinstance(layers, dict) and not layers:  # diffusers skips None and empty dicts alike
            continue
        for key, value in _layer_state_dict(layers, f"{name}_lora_layers").items():
            state_dict[f"{name}.{key}"] = value
        if meta:
            if not isinstance(meta, dict):
                raise TypeError("`lora_adapter_metadata` must be of type `dict`.")
            adapter_metadata.update({f"{name}.{k}": _lists_for_sets(v) for k, v in meta.items()})
    if not state_dict:
        raise LoraFormatError(
            "You must pass at least one of `unet_lora_layers`, `text_encoder_lora_layers`, "
            "`text_encoder_2_lora_layers` or `transformer_lora_layers`."
        )
    if adapter_metadata and not safe_serialization:
        raise LoraFormatError("`lora_adapter_metadata` cannot be specified when not using `safe_serialization`.")

    header = {"format": "pt"}
    if adapter_metadata:
        header[LORA_ADAPTER_METADATA_KEY] = json.dumps(adapter_metadata, indent=2, sort_keys=True)
    # Validate exactly what will be written (keys, shapes, ranks vs metadata) before writing it.
    read_diffusers(state_dict, metadata=header, source="save_lora_weights")

    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise LoraFormatError(f"Provided path ({save_directory}) should be a directory, not a file")
    if not is_main_process:
        return
    os.makedirs(save_directory, exist_ok=True)
    if weight_name is None:
        weight_name = LORA_WEIGHT_NAME_SAFE if safe_serialization else LORA_WEIGHT_NAME
    save_path = os.path.join(save_directory, weight_name)

    if save_function is not None:
        save_function(state_dict, save_path)  # diffusers passes the raw dict; no header metadata on this path
    elif safe_serialization:
        io.save_file(prepare_for_save(state_dict), save_path, metadata=header)
    else:
        tmp = f"{save_path}.tmp{os.getpid()}"
        try:
            torch.save(state_dict, tmp)
            os.replace(tmp, save_path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


__all__ = [
    "LORA_ADAPTER_METADATA_KEY", "LORA_WEIGHT_NAME", "LORA_WEIGHT_NAME_SAFE", "read_diffusers", "write_diffusers",
    "save_lora_weights", "diffusers_tensors_and_metadata", "parse_diffusers_key",
]
