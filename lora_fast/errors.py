"""lora_fast's exception hierarchy.

Both classes derive from ValueError so that callers who already catch ValueError
around diffusers/PEFT loading keep working.
"""


class LoraError(Exception):
    """Base class of every error lora_fast raises on purpose."""


class LoraFormatError(LoraError, ValueError):
    """A file, state dict or adapter is malformed, or does not fit the target.

    The message names the file and/or key and the problem.
    """


class LoraFusionError(LoraError, ValueError):
    """Fusing or unfusing cannot be done (non-finite result under safe_fusing, state conflict)."""
