"""Older diffusers LoRA names (attention processors, LoRACompatible layers, PatchedLoraProjection).

diffusers before the PEFT backend saved, and its training scripts still save after
``convert_state_dict_to_diffusers``, names such as::

    <path>.attn1.processor.to_q_lora.down.weight        -> <path>.attn1.to_q
    <path>.attn1.processor.to_out_lora.up.weight        -> <path>.attn1.to_out.0
    <path>.self_attn.to_q_lora.down.weight (CLIP)       -> <path>.self_attn.q_proj
    <path>.proj_in.lora.down.weight                     -> <path>.proj_in
    <path>.mlp.fc1.lora_linear_layer.up.weight          -> <path>.mlp.fc1

These files carry no alpha: scale 1, i.e. alpha = rank. One file may mix these names with
``lora_A``/``lora_B`` names (the training scripts rename only some modules), so names are parsed key
by key and all count as the diffusers format.
"""

from __future__ import annotations

from typing import Optional

from .peft import ParsedKey

# old processor attribute -> (UNet/Transformer module name, CLIP self_attn module name)
_ATTENTION_PROCESSOR_NAMES = {
    "to_q_lora": ("to_q", "q_proj"),
    "to_k_lora": ("to_k", "k_proj"),
    "to_v_lora": ("to_v", "v_proj"),
    "to_out_lora": ("to_out.0", "out_proj"),
}
_LAYER_WRAPPERS = ("lora", "lora_linear_layer")


def parse_legacy_tail(key: str) -> Optional[ParsedKey]:
    """``<path>.<old lora name>.{down,up}.weight`` (no component prefix) -> ParsedKey, else None."""
    tokens = key.split(".")
    if len(tokens) < 4 or tokens[-1] != "weight" or tokens[-2] not in ("down", "up"):
        return None
    role = "down" if tokens[-2] == "down" else "up"
    holder, parent = tokens[-3], tokens[:-3]
    # ``.processor.`` is a level of the old attention-processor tree, not of the module tree.
    parent = [t for t in parent if t != "processor"]
    if not parent or any(t == "" for t in parent):
        return None
    if holder in _LAYER_WRAPPERS:
        path = parent
    elif holder in _ATTENTION_PROCESSOR_NAMES:
        unet_name, clip_name = _ATTENTION_PROCESSOR_NAMES[holder]
        path = parent + (clip_name if parent[-1] == "self_attn" else unet_name).split(".")
    else:
        return None
    return ParsedKey(".".join(path), role)
