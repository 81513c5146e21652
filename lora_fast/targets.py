"""What a LoRA is applied to: a pipeline, a module, or a {component: module} dict, as data.

A target becomes a mapping {component name or None: nn.Module}; None is a plain module that takes
un-prefixed keys. Module paths are diffusers paths; text-encoder paths resolve with and without
the ``text_model.`` level, because transformers 5 dropped it from CLIPTextModel's module tree.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .adapter import COMPONENTS
from .errors import LoraFormatError


def unwrap_module(module: nn.Module) -> nn.Module:
    """The module a wrapper runs: ``torch.compile``'s OptimizedModule (and wrappers built like it) keeps it in
    ``_orig_mod``, DataParallel / DistributedDataParallel in ``module``. Adapters live on that module (the
    wrapper shares its parameters and calls its hooks), so every target is resolved through the wrappers."""
    for _ in range(16):  # wrappers of wrappers (a compiled DDP model): a few levels at most
        inner = getattr(module, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = module.module if isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else None
        if not isinstance(inner, nn.Module) or inner is module:
            return module
        module = inner
    return module


def resolve_components(target) -> dict[Optional[str], nn.Module]:
    """{component: module} for a diffusers pipeline, a dict of modules, or a plain module (key None).

    Compiled and similarly wrapped modules (``pipe.unet = torch.compile(pipe.unet)``) resolve to the module they
    wrap (:func:`unwrap_module`)."""
    if isinstance(target, nn.Module):
        return {None: unwrap_module(target)}
    if isinstance(target, dict):
        items = target.items()
    else:
        comps = getattr(target, "components", None)
        if isinstance(comps, dict):
            items = comps.items()
        else:  # a pipeline-like object without .components: look for the usual attribute names
            items = ((name, getattr(target, name, None)) for name in COMPONENTS)
    out = {name: unwrap_module(mod) for name, mod in items if isinstance(mod, nn.Module)}
    if not out:
        raise LoraFormatError(f"target {type(target).__name__} holds no torch modules to apply a LoRA to")
    return out


def alternative_paths(path: str) -> list[str]:
    """A diffusers module path with and without the CLIP ``text_model.`` level (transformers 4 vs 5 trees), the
    given spelling first: the one resolver for live modules (:func:`resolve_module`) and checkpoint names."""
    if path.startswith("text_model."):
        return [path, path[len("text_model."):]]
    return [path, "text_model." + path]


def resolve_module(root: nn.Module, path: str) -> Optional[nn.Module]:
    """The submodule at a diffusers path, trying the path with and without ``text_model.``; None if absent."""
    for candidate in alternative_paths(path):
        try:
            return root.get_submodule(candidate)
        except AttributeError:
            continue
    return None


def is_fan_in_fan_out(module: nn.Module) -> bool:
    """transformers' GPT-2 style Conv1D stores its weight as (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The module weight as a 2-D (out, in_flat) view that aliases the parameter's storage.

    Linear: (out, in). Conv: (out, in·kh·kw). Embedding: (num, dim) (the LoRA delta is (B A)ᵀ).
    fan_in_fan_out Conv1D: the transposed (out, in) view. Raises if no aliasing view exists.
    """
    w = module.weight.data
    if is_fan_in_fan_out(module):
        return w.t()
    if w.dim() == 2:
        return w
    return w.view(w.shape[0], -1)
