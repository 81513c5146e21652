"""lora_fast: fast, exact LoRA loading, saving, fusing and serving for diffusion models and any torch model.

Public API (diffusers names where diffusers has the function; ``target`` is a diffusers pipeline,
an ``nn.Module``, or a dict ``{component_name: nn.Module}``):

* I/O: :func:`load_file`, :func:`save_file`, :func:`read_metadata`
* formats: :func:`read_lora` -> :class:`LoraAdapter`, :func:`save_lora_weights`, ``LoraAdapter.save``
* model: :func:`load_lora_weights`, :func:`fuse_lora`, :func:`unfuse_lora`, :func:`unload_lora_weights`
* errors: :class:`LoraFormatError`, :class:`LoraFusionError` (both ValueError subclasses)
"""

from .errors import LoraError, LoraFormatError, LoraFusionError
from .adapter import LoraAdapter, LoraLayer
from .io import load_file, read_metadata, save_file
from .formats import read_lora, save_lora_weights
from . import engine as _engine

__version__ = "0.1.0"


def load_lora_weights(target, source, adapter_name=None, *, components=None, fuse=False):
    """Read a LoRA (any supported format, a path, a directory, a state dict or a LoraAdapter) and register it.

    Every LoRA module is first checked to exist in the target with a matching shape; otherwise
    LoraFormatError is raised and nothing changes. Component prefixes (``unet``, ``transformer``,
    ``text_encoder``, ``text_encoder_2``) map to the pipeline's components; a plain module takes
    un-prefixed keys, or the part of the file named by ``components=`` (e.g. ``["unet"]``).
    As in diffusers, the new adapter becomes the only active one. ``adapter_name`` defaults to
    ``default_0``, ``default_1``, ... ``fuse=True`` also fuses it (as ``fuse_lora(target,
    adapter_names=[name])``). Returns the adapter name.
    """
    adapter = source if isinstance(source, LoraAdapter) else read_lora(source)
    name = _engine.bind(target, adapter, adapter_name, components=components)
    if fuse:
        try:
            _engine.fuse(target, adapter_names=[name])
        except BaseException:
            _engine.delete(target, [name])
            raise
    return name


def fuse_lora(target, lora_scale=1.0, safe_fusing=False, adapter_names=None, components=None, adapter_weights=None):
    """Fuse adapters into the base weights: W <- round(W + lora_scale · Σ_i w_i · s_i · B_i A_i).

    fp32 accumulation, one rounding to W's dtype, each weight read and written once. ``adapter_names``
    None means the active adapters; ``adapter_weights`` is a list parallel to ``adapter_names`` (None:
    each adapter's current weight, 1.0 unless set). ``lora_scale`` and ``adapter_weights`` are not
    sticky. With ``safe_fusing=True`` a non-finite result raises LoraFusionError naming the module and
    leaves every weight bit-identical. A second fuse composes; one :func:`unfuse_lora` undoes all.
    """
    _engine.fuse(target, lora_scale=lora_scale, safe_fusing=safe_fusing, adapter_names=adapter_names,
                 components=components, adapter_weights=adapter_weights)


def unfuse_lora(target, components=None):
    """Restore every fused weight bit for bit (any number of cycles, scales, adapter sets and dtypes)."""
    _engine.unfuse(target, components=components)


def unload_lora_weights(target):
    """Drop every adapter. Fused weights stay baked in (and can no longer be unfused), as in diffusers;
    with nothing fused the model is left bit-identical to before the first load."""
    _engine.unload(target)


__all__ = [
    "LoraError", "LoraFormatError", "LoraFusionError", "LoraAdapter", "LoraLayer",
    "load_file", "read_metadata", "save_file", "read_lora", "save_lora_weights",
    "load_lora_weights", "fuse_lora", "unfuse_lora", "unload_lora_weights",
]
