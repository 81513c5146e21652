"""Which LoRA format a set of keys is in.

* ``"kohya"``: ``lora_unet_*`` / ``lora_te*_`` module names (decided by ``kohya.is_kohya``);
* ``"peft"``: every key starts with ``base_model.model.``;
* ``"diffusers"``: ``[<component>.]<path>.lora_A.weight`` and friends, including the older
  attention-processor names (``to_q_lora.down.weight``, ``.lora.down.weight``, ``lora_linear_layer``).

Anything else, or a mix of these families, raises LoraFormatError naming an offending key.
"""

from __future__ import annotations

from typing import Iterable

from ..errors import LoraFormatError
from .diffusers import parse_diffusers_key
from .peft import PEFT_PREFIX, parse_peft_tail

FORMATS = ("diffusers", "peft", "kohya")

# Roots of kohya / A1111 module names; only used to word the error for a kohya/other mix.
_KOHYA_ROOTS = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_transformer_")


def _is_kohya(keys: list[str]) -> bool:
    try:
        from .kohya import is_kohya
    except ImportError:  # the kohya reader is optional at import time
        return bool(keys) and all(k.startswith(_KOHYA_ROOTS) for k in keys)
    return bool(is_kohya(keys))


def _family(key: str) -> str:
    if key.startswith(PEFT_PREFIX):
        return "peft" if parse_peft_tail(key[len(PEFT_PREFIX):]) is not None else "unknown"
    if key.startswith(_KOHYA_ROOTS):
        return "kohya"
    _, parsed = parse_diffusers_key(key)
    return "diffusers" if parsed is not None else "unknown"


def detect_format(keys: Iterable[str], *, source: str = "<state dict>") -> str:
    """"diffusers", "peft" or "kohya"; LoraFormatError for unknown or mixed key sets."""
    keys = list(keys)
    if not keys:
        raise LoraFormatError(f"{source}: no tensors (empty state dict)")
    bad = next((k for k in keys if not isinstance(k, str)), None)
    if bad is not None:
        raise LoraFormatError(f"{source}: key {bad!r} is not a string")
    if _is_kohya(keys):
        return "kohya"
    first: dict[str, str] = {}
    for key in keys:
        fam = _family(key)
        if fam == "unknown":
            raise LoraFormatError(f"{source}: {key!r} is not a LoRA key of any known format (diffusers, PEFT, kohya)")
        first.setdefault(fam, key)
    if len(first) > 1:
        desc = " and ".join(f"{fam} key {key!r}" for fam, key in first.items())
        raise LoraFormatError(f"{source}: mixed LoRA formats: {desc}")
    # All-kohya-looking names that is_kohya rejected still go to the kohya reader, whose error names the key.
    return next(iter(first))
