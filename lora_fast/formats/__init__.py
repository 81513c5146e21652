"""Reading and writing LoRA files: diffusers, PEFT and kohya formats <-> LoraAdapter.

* :func:`read_lora` reads a file, a directory or an in-memory state dict in any supported format;
* :func:`write_adapter` (``LoraAdapter.save``) writes one as diffusers, kohya or PEFT;
* :func:`save_lora_weights` is diffusers' ``save_lora_weights`` for layer state dicts.

See docs/formats.md.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Optional

import torch

from ..adapter import LoraAdapter, register_adapter_writer
from ..errors import LoraFormatError
from .detect import FORMATS, detect_format
from .diffusers import LORA_WEIGHT_NAME, LORA_WEIGHT_NAME_SAFE, read_diffusers, save_lora_weights, write_diffusers
from .peft import (
    PEFT_CONFIG_NAME, PEFT_PICKLE_NAME, PEFT_WEIGHTS_NAME, iter_component_dirs, parse_config_json, prepare_for_save,
    read_peft, write_peft,
)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _pickle_refused(path: str) -> LoraFormatError:
    return LoraFormatError(
        f"{path}: refusing to read a pickle checkpoint: unpickling can execute arbitrary code. If you trust the "
        "file, pass allow_pickle=True (it is then read with torch.load(weights_only=True)), or convert it to "
        ".safetensors."
    )


def load_tensors(path: str, allow_pickle: bool, device=None) -> tuple[dict, dict]:
    """(state dict, header metadata) of one file; tensors land on ``device`` (streamed for accelerators).
    Internal (read_lora and the fuse-on-load path)."""
    from .. import io

    if path.lower().endswith(PICKLE_SUFFIXES):
        if not allow_pickle:
            raise _pickle_refused(path)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError, RuntimeError (not a zip/pickle), ...
            raise LoraFormatError(f"{path}: cannot read as a torch checkpoint with weights_only=True ({exc})") from None
        if not isinstance(obj, Mapping):
            raise LoraFormatError(f"{path}: the checkpoint holds a {type(obj).__name__}, not a state dict")
        out = dict(obj)
        if device is not None:
            out = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in out.items()}
        return out, {}
    try:
        tensors = io.load_file(path, device=device if device is not None else "cpu")
        header = io.read_metadata(path) or {}
    except (FileNotFoundError, IsADirectoryError, PermissionError, LoraFormatError):
        raise
    except Exception as exc:  # safetensors' own errors are not ValueErrors with the path in them
        raise LoraFormatError(f"{path}: cannot read as safetensors ({exc})") from None
    return tensors, dict(header)


def read_peft_config(directory: str, where: str) -> Optional[dict]:
    """The adapter_config.json beside a PEFT file, parsed, or None. Internal (read_lora, fuse-on-load)."""
    cfg_path = os.path.join(directory, PEFT_CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        return None
    with open(cfg_path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise LoraFormatError(f"{cfg_path}: not UTF-8 text") from None
    return parse_config_json(text, cfg_path)


def adapter_from_state_dict(state_dict: dict, *, header: dict, config: Optional[dict], component: Optional[str],
                            where: str) -> LoraAdapter:
    """The adapter in a loaded state dict, its layout detected. Internal (read_lora, fuse-on-load)."""
    from .fused import detect_fused_layout, read_fused

    found = detect_fused_layout(state_dict.keys())  # Flux.1 / SD3 / Wan original-module layouts (tables)
    if found is not None:
        return read_fused(state_dict, found[0], found[1], source=where, metadata=header)
    fmt = detect_format(state_dict.keys(), source=where)
    if fmt == "kohya":
        from .kohya import read_kohya

        adapter = read_kohya(state_dict, source=where)
        if header and not adapter.metadata:
            adapter.metadata = dict(header)
        return adapter
    if fmt == "peft":
        return read_peft(state_dict, config=config, component=component, source=where, metadata=header)
    return read_diffusers(state_dict, metadata=header, component=component, source=where)


def _read_file(path: str, *, allow_pickle: bool, component: Optional[str], device=None) -> LoraAdapter:
    tensors, header = load_tensors(path, allow_pickle, device)
    config = None
    if os.path.basename(path).startswith("adapter_model"):
        config = read_peft_config(os.path.dirname(path) or ".", path)
    return adapter_from_state_dict(tensors, header=header, config=config, component=component, where=path)


def _read_directory(directory: str, *, weight_name, allow_pickle: bool, component: Optional[str], device=None) -> LoraAdapter:
    if weight_name is not None:
        path = os.path.join(directory, weight_name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such file (weight_name={weight_name!r} in {directory})")
        return _read_file(path, allow_pickle=allow_pickle, component=component, device=device)
    for name in (LORA_WEIGHT_NAME_SAFE, PEFT_WEIGHTS_NAME):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return _read_file(path, allow_pickle=allow_pickle, component=component, device=device)
    subdirs = list(iter_component_dirs(directory))
    if subdirs:
        # A multi-component PEFT directory, as write_peft lays it out: one adapter per component.
        layers, metadata = {}, {}
        for comp, sub in subdirs:
            if component is not None and comp != component:
                continue
            name = PEFT_WEIGHTS_NAME if os.path.isfile(os.path.join(sub, PEFT_WEIGHTS_NAME)) else PEFT_PICKLE_NAME
            path = os.path.join(sub, name)
            tensors, header = load_tensors(path, allow_pickle, device)
            part = read_peft(tensors, config=read_peft_config(sub, path), component=comp, source=path, metadata=header)
            layers.update(part.layers)
            metadata.update(part.metadata)
        if not layers:
            raise LoraFormatError(f"{directory}: no adapter for component={component!r} (has {[c for c, _ in subdirs]})")
        return LoraAdapter(layers=layers, format="peft", metadata=metadata, source=directory)
    for name in (LORA_WEIGHT_NAME, PEFT_PICKLE_NAME):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            if not allow_pickle:
                raise _pickle_refused(path)
            return _read_file(path, allow_pickle=True, component=component, device=device)
    candidates = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if len(candidates) == 1:
        return _read_file(os.path.join(directory, candidates[0]), allow_pickle=allow_pickle, component=component, device=device)
    # PEFT's save_pretrained puts an adapter not named "default" in a subfolder named after it.
    named = sorted(d for d in os.listdir(directory)
                   if os.path.isfile(os.path.join(directory, d, PEFT_WEIGHTS_NAME))
                   and os.path.isfile(os.path.join(directory, d, PEFT_CONFIG_NAME)))
    if len(named) == 1 and not candidates:
        return _read_file(os.path.join(directory, named[0], PEFT_WEIGHTS_NAME), allow_pickle=allow_pickle,
                          component=component, device=device)
    if named:
        raise LoraFormatError(
            f"{directory}: holds several PEFT adapters in subfolders {named}; pass one subfolder "
            f"(e.g. {os.path.join(directory, named[0])!r}) or weight_name='{named[0]}/{PEFT_WEIGHTS_NAME}'")
    raise LoraFormatError(
        f"{directory}: no LoRA weights found (looked for {LORA_WEIGHT_NAME_SAFE}, {PEFT_WEIGHTS_NAME} + "
        f"{PEFT_CONFIG_NAME}, per-component PEFT subfolders, or a single .safetensors file"
        + (f"; found several: {candidates}, pass weight_name" if candidates else "")
        + ")"
    )


def read_lora(source, *, weight_name=None, allow_pickle=False, component=None, device=None) -> LoraAdapter:
    """Read a LoRA adapter in any supported format into a normalized :class:`LoraAdapter`.

    source: a ``.safetensors`` file, a directory (diffusers ``pytorch_lora_weights.safetensors``, PEFT
    ``adapter_model.safetensors`` + ``adapter_config.json``, or per-component PEFT subfolders), or an
    in-memory state dict (not modified). ``weight_name`` picks the file inside a directory. Pickle
    files (``.bin``, ``.pt``, ``.ckpt``) are refused unless ``allow_pickle=True``. ``component`` prefixes
    keys that carry no component (PEFT files, a single module's state dict). ``device`` (e.g. ``"cuda"``)
    streams the file's tensors straight to that device (see :func:`lora_fast.io.load_file`); None keeps
    them as zero-copy CPU views.
    """
    if component is not None and (not isinstance(component, str) or not component or "." in component):
        raise LoraFormatError(f"component must be a name such as 'unet' or 'text_encoder', got {component!r}")
    if isinstance(source, Mapping):
        sd = dict(source)
        if device is not None:
            sd = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in sd.items()}
        return adapter_from_state_dict(sd, header={}, config=None, component=component, where="<state dict>")
    try:
        path = os.fspath(source)
    except TypeError:
        raise LoraFormatError(
            f"read_lora: source must be a path or a state dict, got {type(source).__name__}"
        ) from None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if os.path.isdir(path):
        return _read_directory(path, weight_name=weight_name, allow_pickle=allow_pickle, component=component,
                               device=device)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    return _read_file(path, allow_pickle=allow_pickle, component=component, device=device)


def write_adapter(adapter: LoraAdapter, path, format: str = "diffusers", *, block_diagonal: bool = False) -> None:
    """Write ``adapter``: "diffusers" -> one .safetensors file (a directory gets
    pytorch_lora_weights.safetensors), "kohya" -> one .safetensors file, "peft" -> a directory.
    ``block_diagonal``: kohya only (see ``formats.fused.write_fused_kohya``).

    What the target cannot express raises LoraFormatError before anything is written.
    """
    from .. import io

    if format not in FORMATS:
        raise LoraFormatError(f"unknown LoRA format {format!r} (expected one of {FORMATS})")
    if not isinstance(adapter, LoraAdapter):
        raise LoraFormatError(f"write_adapter needs a LoraAdapter, got {type(adapter).__name__}")
    if not adapter.layers:
        raise LoraFormatError(f"{adapter.source or '<adapter>'}: the adapter has no layers")
    if block_diagonal and format != "kohya":
        raise LoraFormatError(f"block_diagonal is for kohya output (sd-scripts' fused Flux/SD3 modules), not {format!r}")
    if format != "kohya":  # LoHa/LoKr/full layers exist only in kohya/LyCORIS files (or as an explicit approximation)
        from .lycoris import refuse_low_rank_format

        refuse_low_rank_format(adapter, format)
    if format == "diffusers":
        write_diffusers(adapter, path)
    elif format == "peft":
        write_peft(adapter, path)
    else:
        from .kohya import write_kohya

        tensors = write_kohya(adapter, source=adapter.source or "<adapter>", block_diagonal=block_diagonal)
        path = os.fspath(path)
        if os.path.isdir(path):
            raise LoraFormatError(f"{path}: a kohya LoRA is one .safetensors file; give a file path, not a directory")
        parent = os.path.dirname(path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        io.save_file(prepare_for_save(tensors), path, metadata={"format": "pt"})


register_adapter_writer(write_adapter)  # LoraAdapter.save delegates here; adapter.py never imports formats


__all__ = ["read_lora", "write_adapter", "save_lora_weights", "detect_format", "FORMATS"]
