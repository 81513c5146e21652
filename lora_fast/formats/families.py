"""Which model family an adapter's modules name, and which family a target is: to word the error when
a LoRA for one family is loaded into another (an SDXL LoRA on a Flux pipeline, a Flux LoRA on SD3).

Both answers come from tables (module-path markers per family, class names per family), not code per family.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from ..adapter import LoraAdapter, split_component
from ..errors import LoraFormatError

#: Display names.
FAMILY_NAMES = {"flux": "Flux.1", "sd3": "SD3/SD3.5", "wan": "Wan 2.x", "sdxl": "SDXL", "sd": "SD1.x/SD2"}

#: (family, component, regex on the module path): a match means the adapter names a module only that family has.
_MARKERS = (
    ("flux", "transformer", r"^single_transformer_blocks\.|^x_embedder$|^time_text_embed\.guidance_embedder\."),
    ("sd3", "transformer", r"^pos_embed\.|^transformer_blocks\.\d+\.attn2\."),
    ("wan", "transformer", r"^blocks\.\d+\.(attn1|attn2|ffn)\.|^condition_embedder\."),
    ("sdxl", "unet", r"^add_embedding\.|^down_blocks\.[12]\.attentions\.\d+\.transformer_blocks\.[1-9]\."
                     r"|^up_blocks\.0\.attentions\.|^mid_block\.attentions\.0\.transformer_blocks\.[1-9]\."),
    ("sd", "unet", r"^down_blocks\.0\.attentions\.|^down_blocks\.3\.|^up_blocks\.3\.attentions\."),
)

#: Target class names -> family (a pipeline, or the denoiser module itself).
_TARGET_CLASSES = {
    "FluxPipeline": "flux", "FluxTransformer2DModel": "flux", "FluxImg2ImgPipeline": "flux",
    "FluxInpaintPipeline": "flux", "FluxControlPipeline": "flux", "FluxKontextPipeline": "flux",
    "StableDiffusion3Pipeline": "sd3", "SD3Transformer2DModel": "sd3", "StableDiffusion3Img2ImgPipeline": "sd3",
    "WanPipeline": "wan", "WanImageToVideoPipeline": "wan", "WanTransformer3DModel": "wan",
    "StableDiffusionXLPipeline": "sdxl", "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "StableDiffusionPipeline": "sd", "StableDiffusionImg2ImgPipeline": "sd",
}


def adapter_family(adapter: LoraAdapter) -> Optional[str]:
    """"flux", "sd3", "wan", "sdxl" or "sd" when the adapter's layout or modules say so, else None.

    A reader that knows the family (Flux BFL/kohya/XLabs names) has set ``adapter.family``. Otherwise the
    module paths decide: the first family in _MARKERS one of whose markers matches a module wins; a UNet
    adapter with both SDXL-only and SD-only modules, or only shared ones, is None. Flux double blocks share
    most names with SD3's joint blocks, so only Flux's own modules (single blocks, x_embedder, guidance
    embedder) or SD3's (pos_embed, attn2) decide between them.
    """
    if adapter.family:
        return adapter.family
    found = set()
    for key in adapter.layers:
        component, path = split_component(key)
        for family, comp, pattern in _MARKERS:
            if comp == component and re.search(pattern, path):
                found.add(family)
    for family in ("flux", "sd3", "wan"):
        if family in found:
            return family
    if "sdxl" in found and "sd" not in found:
        return "sdxl"
    if "sd" in found and "sdxl" not in found:
        return "sd"
    return None


def target_family(target) -> Optional[str]:
    """The family of a diffusers pipeline or denoiser module by class name (subclasses count), or of the
    denoiser in a {component: module} dict, else None."""
    if isinstance(target, dict):
        for comp in ("transformer", "unet", *target):
            module = target.get(comp)
            family = None if module is None or isinstance(module, dict) else target_family(module)
            if family:
                return family
        return None
    from ..targets import unwrap_module

    if isinstance(target, torch.nn.Module):
        target = unwrap_module(target)
    for cls in type(target).__mro__:
        family = _TARGET_CLASSES.get(cls.__name__)
        if family:
            return family
    return None


_KOHYA_TABLE_FAMILY = {"sd15": "sd", "sd2": "sd", "sdxl": "sdxl"}


def kohya_candidates(adapter: LoraAdapter) -> tuple[str, ...]:
    """For an adapter read from a kohya SD1.x/SD2/SDXL file: every family ("sd", "sdxl") whose kohya name table
    holds all its modules (in lora_fast's normalized keys), else ()."""
    if adapter.format != "kohya" or adapter.family not in ("sd", "sdxl"):
        return ()
    from .kohya import _lookup_key, _table

    out = []
    for table, family in _KOHYA_TABLE_FAMILY.items():
        if family not in out and all(_lookup_key(_table(table), key) is not None for key in adapter.layers):
            out.append(family)
    return tuple(out)


def resolve_family(adapter: LoraAdapter, target=None) -> Optional[str]:
    """The adapter's family, decided by the target where the file's names fit several families (a kohya file
    whose names both the SD1.x and the SDXL tables hold): the target's family if it is one of them, else the
    reader's choice (``adapter_family``)."""
    have = adapter_family(adapter)
    if target is not None:
        want = target_family(target)
        if want is not None and want in kohya_candidates(adapter):
            return want
    return have


def family_mismatch(adapter: LoraAdapter, target) -> Optional[str]:
    """A sentence naming the family the adapter looks like and the target's, when they differ; else None.

    Meant to be appended to the "no such module / component" LoraFormatError the loader raises."""
    have, want = resolve_family(adapter, target), target_family(target)
    if have is None or want is None or have == want:
        return None
    return (f"the file looks like a {FAMILY_NAMES[have]} LoRA"
            + (f" ({adapter.format} layout)" if adapter.format else "")
            + f", but the target is a {FAMILY_NAMES[want]} {type(target).__name__}")


def check_family(adapter: LoraAdapter, target) -> None:
    """Raise LoraFormatError when the adapter's reader knows its family from the file's own names
    (``adapter.family``: Flux/SD3/Wan original-module layouts, kohya SD names) and the target is known to be another
    family. Unlike :func:`family_mismatch` this refuses even where every module happens to fit (tiny test models
    with equal widths); a loader calls it before changing anything."""
    if not adapter.family:
        return
    hint = family_mismatch(adapter, target)
    if hint is not None:
        raise LoraFormatError(f"{adapter.source or '<adapter>'}: {hint}; nothing was loaded")


__all__ = ["adapter_family", "target_family", "family_mismatch", "check_family", "kohya_candidates",
           "resolve_family", "FAMILY_NAMES"]
