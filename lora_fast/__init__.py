"""lora_fast: fast, exact LoRA loading, saving, fusing and serving.

Public API (diffusers-named where diffusers has the function):

* I/O: :func:`load_file`, :func:`save_file`, :func:`read_metadata`
* formats: :func:`read_lora` -> :class:`LoraAdapter`, :func:`save_lora_weights`
* errors: :class:`LoraFormatError`, :class:`LoraFusionError` (both ValueError subclasses)
"""

from .errors import LoraError, LoraFormatError, LoraFusionError
from .adapter import LoraAdapter, LoraLayer
from .io import load_file, read_metadata, save_file
from .formats import read_lora, save_lora_weights

__version__ = "0.1.0"

__all__ = [
    "LoraError",
    "LoraFormatError",
    "LoraFusionError",
    "LoraAdapter",
    "LoraLayer",
    "load_file",
    "read_metadata",
    "save_file",
    "read_lora",
    "save_lora_weights",
]
