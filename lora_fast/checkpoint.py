"""Baking LoRA adapters into base checkpoints, streaming tensor by tensor (``lora-fast merge``).

A base checkpoint is a single ``.safetensors`` file, a sharded one (``*.safetensors.index.json`` + shards), a
diffusers/transformers model folder (``config.json`` + weights) or a pipeline folder (``model_index.json`` and one
subfolder per component). Every weight file is rewritten one tensor at a time: the output header is computed first
from the input header (names, dtypes, shapes are known), then each tensor is read with ``pread`` into a buffer of
its own size, fused with the LoRA layers that target it (fp32 accumulation, one rounding, the same merge kernel
``lora_fast.fuse_lora`` uses) and written out. Memory is therefore about the largest tensor plus the adapters,
whatever the checkpoint size (the input is not memory-mapped, so its pages never count against this process).

Outputs are atomic: files go to a temporary name in the destination directory and are renamed into place after
fsync; folders are assembled in a temporary folder that is renamed at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch

from . import _C
from .adapter import COMPONENTS, LoraAdapter, split_component
from .errors import LoraFormatError, LoraFusionError
from .formats import PICKLE_SUFFIXES
from .io import SafetensorsHeader, TensorHeader, read_header, tensor_nbytes
from .targets import alternative_paths

#: --dtype names -> safetensors dtype strings
OUTPUT_DTYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}


def _torch_of(st_dtype: str) -> torch.dtype:
    dt = TensorHeader("", st_dtype, (), (0, 0), 0).torch_dtype
    if dt is None:
        raise LoraFormatError(f"dtype {st_dtype} has no torch equivalent")
    return dt

_CASTABLE = ("F32", "F16", "BF16", "F64")  # floating dtypes --dtype converts; everything else is copied as is
_MERGEABLE = ("F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")  # weight dtypes the merge kernel rounds to
_FP8 = ("F8_E4M3", "F8_E5M2")

_COPY_CHUNK = 8 << 20


# ----------------------------------------------------------------------------------------------- streaming writer


class StreamingSafetensorsWriter:
    """Write a safetensors file whose header is known up front, one tensor's bytes at a time.

    A thin wrapper over the C++ core's ``StreamingWriter`` (``_C.SafetensorsStreamingWriter``): the same
    ``build_header``, temporary file, fsync and rename as ``io.save_file``, so the output is byte-identical to
    ``io.save_file`` and safetensors. The merge produces one tensor at a time and must never hold a whole checkpoint,
    which the core's one-call ``save_file`` would need; hence a writer that takes the data in pieces.

    ``entries`` are ``(name, dtype string, shape)``; the header is validated here. Call :meth:`write` with each
    tensor's bytes in :attr:`order`, then leave the ``with`` block; the file appears at ``path`` only then. On an
    exception inside the block the temporary file is removed and ``path`` is left untouched.
    """

    def __init__(self, path: str, entries, metadata: Optional[dict] = None):
        self.path = os.fspath(path)
        layout = []
        for n, d, shape in entries:
            shape = [int(x) for x in shape]
            layout.append((n, d, shape, tensor_nbytes(d, shape)))
        try:
            self._writer = _C.SafetensorsStreamingWriter(os.fsencode(self.path), layout,
                                                         list(metadata.items()) if metadata else None)
        except LoraFormatError as e:
            raise LoraFormatError(f"{self.path}: {e}") from None
        self.order: list[tuple[str, int]] = self._writer.order
        self.data_bytes = sum(n for _, n in self.order)
        self._next = 0

    def __enter__(self):
        return self

    def write(self, name: str, data) -> None:
        """Append the bytes of tensor ``name`` (a bytes-like object or a CPU tensor, written raw)."""
        if self._next >= len(self.order):
            raise LoraFormatError(f"{self.path}: more tensors written than declared ({name!r})")
        want, n = self.order[self._next]
        if name != want:
            raise LoraFormatError(f"{self.path}: tensor {name!r} written out of order (expected {want!r})")
        view = _bytes_view(data)
        if view.nbytes != n:
            raise LoraFormatError(f"{self.path}: tensor {name!r} has {view.nbytes} bytes, the header says {n}")
        self._writer.write(view)
        self._next += 1

    def write_stream(self, name: str, n: int, chunks: Iterable) -> None:
        """Append tensor ``name`` from a sequence of byte chunks (for copies that never hold the whole tensor)."""
        want, expected = self.order[self._next] if self._next < len(self.order) else (None, None)
        if name != want or n != expected:
            raise LoraFormatError(f"{self.path}: tensor {name!r} ({n} bytes) does not match the header order")
        total = 0
        for chunk in chunks:
            view = _bytes_view(chunk)
            if total + view.nbytes > n:
                raise LoraFormatError(f"{self.path}: tensor {name!r}: more than the {n} bytes expected")
            self._writer.write(view)
            total += view.nbytes
        if total != n:
            raise LoraFormatError(f"{self.path}: tensor {name!r}: copied {total} bytes, expected {n}")
        self._next += 1

    def __exit__(self, exc_type, exc, tb):
        writer, self._writer = self._writer, None
        if exc_type is None:
            if self._next != len(self.order):
                raise LoraFormatError(f"{self.path}: only {self._next} of {len(self.order)} tensors were written")
            writer.commit()
        # an uncommitted writer removes its temporary file when dropped
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _bytes_view(data) -> memoryview:
    if isinstance(data, torch.Tensor):
        t = data.detach().contiguous()
        if t.device.type != "cpu":
            t = t.cpu()
        if t.numel() == 0:
            return memoryview(b"")
        return memoryview(t.reshape(-1).view(torch.uint8).numpy())
    return memoryview(data).cast("B")


# ----------------------------------------------------------------------------------------------- reading tensors


def _read_exact(fd: int, offset: int, out: memoryview, where: str) -> None:
    done = 0
    while done < out.nbytes:
        n = os.preadv(fd, [out[done:]], offset + done)
        if n <= 0:
            raise LoraFormatError(f"{where}: file ended early (truncated while being read?)")
        done += n


def read_tensor(fd: int, th: TensorHeader, where: str) -> torch.Tensor:
    """One tensor read with pread into memory of its own (not a mapping of the file)."""
    dtype = th.torch_dtype
    if dtype is None:
        raise LoraFormatError(f"{where}: tensor {th.name!r} has dtype {th.dtype}, which torch cannot represent")
    buf = torch.empty(th.nbytes, dtype=torch.uint8)
    if th.nbytes:
        _read_exact(fd, th.file_offset, memoryview(buf.numpy()), where)
    return buf.view(dtype).view(th.shape)


def _copy_chunks(fd: int, th: TensorHeader, buf: memoryview, where: str):
    done = 0
    while done < th.nbytes:
        n = min(buf.nbytes, th.nbytes - done)
        _read_exact(fd, th.file_offset + done, buf[:n], where)
        yield buf[:n]
        done += n


# ----------------------------------------------------------------------------------------------- base discovery

WEIGHT_SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
# Single-file LDM/SGM checkpoints (A1111/ComfyUI layout) and OpenCLIP's fused attention weights.
_LDM_PREFIXES = ("model.diffusion_model.", "cond_stage_model.", "conditioner.embedders.", "first_stage_model.")
_CLASS_COMPONENT = {"UNet2DConditionModel": "unet", "CLIPTextModel": "text_encoder",
                    "CLIPTextModelWithProjection": "text_encoder_2"}


@dataclass
class WeightGroup:
    """One weight file, or one sharded checkpoint (index + shards), of one component."""

    component_hint: Optional[str]  # from the folder name / config, None if unknown
    files: list[str]  # absolute paths of the .safetensors files
    index: Optional[str] = None  # the *.safetensors.index.json, for a sharded group
    headers: dict = field(default_factory=dict)  # file -> SafetensorsHeader
    component: Optional[str] = None  # chosen adapter component
    _places: Optional[dict] = field(default=None, repr=False)  # see _original_places

    def names(self) -> dict[str, tuple[str, TensorHeader]]:
        out = {}
        for f in self.files:
            for name, th in self.headers[f].tensors.items():
                out[name] = (f, th)
        return out


@dataclass
class BaseCheckpoint:
    kind: str  # "file", "sharded", "model", "pipeline"
    path: str
    groups: list[WeightGroup]
    skipped_pickles: list[str] = field(default_factory=list)


def _component_from_config(folder: str) -> Optional[str]:
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return None
    cls = cfg.get("_class_name") or (cfg.get("architectures") or [None])[0]
    if isinstance(cls, str):
        if cls in _CLASS_COMPONENT:
            return _CLASS_COMPONENT[cls]
        if "Transformer" in cls and cls.endswith("Model"):
            return "transformer"
    return None


def _folder_groups(folder: str, hint: Optional[str]) -> tuple[list[WeightGroup], list[str]]:
    """Weight groups of one model folder: each index (sharded) and each standalone .safetensors (variants too)."""
    entries = sorted(os.listdir(folder))
    groups, in_index = [], set()
    for name in entries:
        if name.endswith(INDEX_SUFFIX):
            index = os.path.join(folder, name)
            shards = _index_shards(index)
            in_index.update(shards)
            groups.append(WeightGroup(hint, [os.path.join(folder, s) for s in shards], index=index))
    for name in entries:
        if name.endswith(WEIGHT_SUFFIX) and name not in in_index and os.path.isfile(os.path.join(folder, name)):
            groups.append(WeightGroup(hint, [os.path.join(folder, name)]))
    pickles = [os.path.join(folder, n) for n in entries if n.endswith(PICKLE_SUFFIXES)]
    return groups, pickles


def _index_shards(index: str) -> list[str]:
    try:
        with open(index, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as e:
        raise LoraFormatError(f"{index}: not valid JSON ({e})") from None
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
        raise LoraFormatError(f"{index}: no weight_map (name -> shard file) in the index")
    shards = sorted(set(wm.values()))
    folder = os.path.dirname(index)
    for s in shards:
        if os.path.basename(s) != s or not os.path.isfile(os.path.join(folder, s)):
            raise LoraFormatError(f"{index}: shard {s!r} is missing next to the index")
    return shards


def open_base(path: str) -> BaseCheckpoint:
    """Classify a base checkpoint and read every weight file's header (no tensor data)."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or directory")
    parent_hint = os.path.basename(os.path.dirname(path))
    parent_hint = parent_hint if parent_hint in COMPONENTS else None
    skipped: list[str] = []
    if os.path.isfile(path):
        if path.endswith(INDEX_SUFFIX):
            kind = "sharded"
            groups = [WeightGroup(parent_hint or _component_from_config(os.path.dirname(path)),
                                  [os.path.join(os.path.dirname(path), s) for s in _index_shards(path)], index=path)]
        elif path.endswith(WEIGHT_SUFFIX):
            kind = "file"
            groups = [WeightGroup(parent_hint, [path])]
        elif path.lower().endswith(PICKLE_SUFFIXES):
            raise LoraFormatError(f"{path}: merge reads safetensors checkpoints only (pickle files can run code and "
                                  "cannot be streamed); convert it to .safetensors first")
        else:
            raise LoraFormatError(f"{path}: not a .safetensors file, a *.safetensors.index.json or a model folder")
    elif os.path.isfile(os.path.join(path, "model_index.json")):
        kind = "pipeline"
        groups = []
        for sub in sorted(os.listdir(path)):
            folder = os.path.join(path, sub)
            if not os.path.isdir(folder):
                continue
            sub_groups, pickles = _folder_groups(folder, sub)
            groups.extend(sub_groups)
            if sub in COMPONENTS:
                skipped.extend(pickles)
    else:
        kind = "model"
        name = os.path.basename(path.rstrip(os.sep))
        hint = name if name in COMPONENTS else _component_from_config(path)
        groups, skipped = _folder_groups(path, hint)
        if not groups:
            raise LoraFormatError(f"{path}: no .safetensors weights in this folder"
                                  + (f" (found {[os.path.basename(p) for p in skipped]}: pickle weights are not "
                                     "merged; convert them to .safetensors)" if skipped else ""))
    for g in groups:
        for f in g.files:
            g.headers[f] = read_header(f)
    base = BaseCheckpoint(kind, path, groups, skipped)
    _refuse_ldm(base)
    return base


def _refuse_ldm(base: BaseCheckpoint) -> None:
    for g in base.groups:
        for f in g.files:
            tensors = g.headers[f].tensors
            original = None  # whether the file names a table family's modules (decided once, when first needed)
            for name in tensors:
                if name.startswith(_LDM_PREFIXES) or name.endswith("in_proj_weight"):
                    if name.startswith("model.diffusion_model."):
                        if original is None:
                            original = _original_family(tensors) is not None
                        if original:
                            continue  # ComfyUI's prefix on a table family's original names (flux1-dev.safetensors)
                    raise LoraFormatError(
                        f"{f}: this is a single-file LDM/SGM checkpoint ({name!r}); merge handles diffusers-named "
                        "checkpoints only for now. Convert it first (diffusers: Pipeline.from_single_file(...)"
                        ".save_pretrained(DIR)) and merge into DIR")


# ----------------------------------------------------------------------------------------------- planning


@dataclass
class LoraSpec:
    adapter: LoraAdapter
    weight: float
    label: str


@dataclass
class _Target:
    """What happens to one tensor: additive (layer, factor) items, DoRA items, LoRA-bias items."""

    additive: list = field(default_factory=list)
    dora: list = field(default_factory=list)
    bias: list = field(default_factory=list)
    label: str = ""
    rows: Optional[tuple] = None  # (start, stop): this target is that row range of its tensor (see ``parts``)
    parts: dict = field(default_factory=dict)  # (start, stop) -> _Target: a fused tensor's rows, each on its view
    scale: Optional[tuple] = None  # (file, TensorHeader, name) of an fp8 weight's per-tensor scale beside it


def _original_family(tensors: dict):
    from .formats.fused import original_places

    return original_places({n: th.shape for n, th in tensors.items()})[0]


def _original_places(group: WeightGroup) -> dict:
    """{component.path: OriginalPlace} of a group whose tensors carry a table family's original names (BFL Flux:
    ``double_blocks.0.img_attn.qkv.weight``...), {} otherwise; computed once per group."""
    if group._places is None:
        from .formats.fused import original_places

        group._places = original_places({n: th.shape for n, (_, th) in group.names().items()})[1]
    return group._places


def _resolve(group: WeightGroup, names: dict, component: Optional[str], path: str):
    """(hit, place) of an adapter module: its diffusers-named weight (place None), or the original-named tensor that
    holds its rows (place: formats.fused.OriginalPlace); (None, None) when the base has neither."""
    for p in alternative_paths(path):
        hit = names.get(p + ".weight")
        if hit is not None:
            return hit, None
    place = _original_places(group).get(f"{component or 'transformer'}.{path}")
    if place is None or place.tensor not in names:
        return None, None
    return names[place.tensor], place


def _layers_by_component(loras: list[LoraSpec], component_override: Optional[str]):
    """{component or None: [(spec index, path, key, layer)]}"""
    out: dict = {}
    for i, spec in enumerate(loras):
        for key, layer in spec.adapter.layers.items():
            comp, path = split_component(key)
            if comp is None and component_override is not None:
                comp = component_override
            out.setdefault(comp, []).append((i, path, key, layer))
    return out


def _row_problem(layer, place, th: TensorHeader) -> Optional[str]:
    """Why ``layer`` cannot be merged into its rows of an original fused tensor, or None."""
    rows = sum(b - a for a, b, _ in place.chunks)
    if len(th.shape) != 2 or not layer.fits_weight((rows, th.shape[1])):
        return (f"LoRA implies weight shape {tuple(layer.weight_shape)}, {th.name} {tuple(th.shape)} has "
                f"{rows} rows for it")
    if th.torch_dtype is None or not th.torch_dtype.is_floating_point or th.dtype == "F4":
        return f"{th.name} has dtype {th.dtype}, which cannot be merged into"
    if layer.magnitude is not None or layer.bias is not None:
        return f"a DoRA/LoRA-bias module on some rows of the fused {th.name} is not supported"
    if len(place.chunks) > 1 and layer.algorithm != "lora":
        return f"a LyCORIS {layer.algorithm} module whose rows are reordered in {th.name} is not supported"
    return None


def _match_count(group: WeightGroup, items) -> int:
    names = group.names()
    n = 0
    for comp, path, _, layer in items:
        hit, place = _resolve(group, names, comp, path)
        if hit is not None:
            n += layer.fits_weight(hit[1].shape, layer.fan_in_fan_out) if place is None or place.whole else 1
    return n


@dataclass
class MergePlan:
    base: BaseCheckpoint
    targets: dict  # (file, tensor name) -> _Target
    merged_modules: int
    unmatched: list[str]  # adapter keys (with spec label) that matched nothing
    mismatched: list[str]


_NO_LAYERS = "\0"  # a group no adapter component applies to


def plan_merge(base: BaseCheckpoint, loras: list[LoraSpec], component: Optional[str] = None) -> MergePlan:
    """Map every adapter layer to a tensor of the base, from headers only. Raises LoraFormatError on ambiguity.

    Each weight group gets the adapter component whose layers apply to it: a pipeline's subfolder name; for a
    single model, ``component`` if given, else the only one the adapter has, else the folder name or config class,
    else the component matching the most weights by name and shape.
    """
    by_comp = _layers_by_component(loras, component)
    if base.kind == "pipeline" and None in by_comp:
        raise LoraFormatError(f"{loras[0].label}: keys carry no component (a PEFT adapter?); pass --component NAME "
                              "to say which pipeline component they are for")
    for g in base.groups:
        if base.kind == "pipeline":
            g.component = g.component_hint if g.component_hint in by_comp else _NO_LAYERS
        elif component is not None:
            g.component = component
        elif len(by_comp) == 1:
            g.component = next(iter(by_comp))
        elif g.component_hint in by_comp:
            g.component = g.component_hint
        else:
            counts = {c: _match_count(g, [(c, *it[1:]) for it in items]) for c, items in by_comp.items()}
            best = max(counts.values(), default=0)
            winners = [c for c, n in counts.items() if n == best and n > 0]
            if len(winners) > 1:
                raise LoraFormatError(
                    f"{base.path}: the adapter's components {winners} all match this checkpoint equally; "
                    "pass --component NAME to say which one it is")
            g.component = winners[0] if winners else _NO_LAYERS

    targets: dict = {}
    matched_keys: set = set()
    mismatched = []
    merged_modules = 0
    for g in base.groups:
        items = by_comp.get(g.component, [])
        names = g.names()
        for spec_i, path, key, layer in items:
            hit, place = _resolve(g, names, g.component, path)
            if hit is None:
                continue
            f, th = hit
            label = f"{loras[spec_i].label}: {key}"
            if place is not None and not place.whole:  # some rows of an original fused tensor (qkv, linear1...)
                problem = _row_problem(layer, place, th)
                if problem:
                    mismatched.append(f"{label}: {problem}")
                    continue
                t = targets.setdefault((f, th.name), _Target(label=f"{g.component or 'model'}.{th.name}"))
                t.scale = _fp8_scale_of(names, th)
                for a, b, at in place.chunks:
                    rows = (at, at + b - a)
                    part = t.parts.setdefault(rows, _Target(label=f"{t.label}[{rows[0]}:{rows[1]}]", rows=rows))
                    part.additive.append((layer if (a, b) == (0, layer.out_features) else
                                          dataclasses.replace(layer, up=layer.up[a:b]), loras[spec_i].weight))
                matched_keys.add((spec_i, key))
                merged_modules += 1
                continue
            if not layer.fits_weight(th.shape, layer.fan_in_fan_out):
                mismatched.append(f"{label}: LoRA implies weight shape {tuple(layer.weight_shape)}, "
                                  f"{os.path.basename(f)} has {th.name} {tuple(th.shape)}")
                continue
            if th.torch_dtype is None or not th.torch_dtype.is_floating_point or th.dtype == "F4":
                mismatched.append(f"{key}: {th.name} has dtype {th.dtype}, which cannot be merged into")
                continue
            factor = loras[spec_i].weight
            t = targets.setdefault((f, th.name), _Target(label=f"{g.component or 'model'}.{th.name[:-len('.weight')]}"))
            t.scale = _fp8_scale_of(names, th)
            if layer.magnitude is not None:
                t.dora.append((layer, factor))
            else:
                t.additive.append((layer, factor))
                if layer.bias is not None:
                    bias_name = th.name[: -len(".weight")] + ".bias"
                    if bias_name not in names:
                        mismatched.append(f"{key}: the adapter has a LoRA bias but the base has no {bias_name}")
                        continue
                    bf, bth = names[bias_name]
                    targets.setdefault((bf, bias_name), _Target(label=bias_name)).bias.append((layer, factor))
            matched_keys.add((spec_i, key))
            merged_modules += 1
    unmatched = [f"{loras[i].label}: {key}" for i, spec in enumerate(loras) for key in spec.adapter.layers
                 if (i, key) not in matched_keys]
    return MergePlan(base, targets, merged_modules, unmatched, mismatched)


# ----------------------------------------------------------------------------------------------- merging


def _fp8_scale_of(names: dict, th: TensorHeader) -> Optional[tuple]:
    """(file, header, attribute name) of the per-tensor scale stored beside an fp8 weight (``<module>.scale_weight``,
    ComfyUI; ``<module>.weight_scale``, vLLM and others), None when the weight is not fp8 or has none."""
    from .merge_jobs import FP8_SCALE_NAMES

    if th.dtype not in _FP8 or not th.name.endswith(".weight"):
        return None
    for attr in FP8_SCALE_NAMES:
        hit = names.get(th.name[: -len("weight")] + attr)
        if hit is not None:
            return hit[0], hit[1], attr
    return None


# the scales of an fp8 module: its weight's (FP8_SCALE_NAMES) and its input's (ComfyUI, vLLM)
_FP8_MODULE_SCALES = (".scale_weight", ".weight_scale", ".scale_input", ".input_scale")


def _fp8_scale_names(header: SafetensorsHeader) -> set:
    """Names of the fp8 modules' scale tensors in one file: copied as they are, whatever --dtype says."""
    return {n for n in header.tensors if n.endswith(_FP8_MODULE_SCALES)
            and getattr(header.tensors.get(n[: n.rindex(".")] + ".weight"), "dtype", None) in _FP8}


class _Weight:
    """A checkpoint tensor as :func:`lora_fast.merge_jobs.merge_job` reads a module: its ``weight`` (what the merge
    works on: a Conv1D tensor transposed to (out, in)) and, for a scaled fp8 weight, its per-tensor scale under the
    name the file gives it (``scale_weight`` or ``weight_scale``)."""

    def __init__(self, weight: torch.Tensor, scale: Optional[tuple] = None):
        self.weight = weight
        if scale is not None:
            setattr(self, scale[0], scale[1])


def _read_scale(target: _Target) -> Optional[tuple]:
    """(attribute name, tensor) of the target's fp8 scale, read from its file; None when it has none."""
    if target.scale is None:
        return None
    f, th, attr = target.scale
    fd = os.open(f, os.O_RDONLY)
    try:
        return attr, read_tensor(fd, th, f)
    finally:
        os.close(fd)


def _finite(w: torch.Tensor) -> bool:
    if w.dtype == torch.float8_e4m3fn:  # no torch.isfinite for fp8: read the codes (NaN: all exponent and mantissa
        return not bool(((w.view(torch.uint8) & 0x7F) == 0x7F).any())  # bits set; e4m3fn has no Inf)
    if w.dtype == torch.float8_e5m2:  # Inf and NaN: all exponent bits set
        return not bool(((w.view(torch.uint8) & 0x7C) == 0x7C).any())
    return bool(torch.isfinite(w).all())


def _fuse_tensor(tensor: torch.Tensor, target: _Target, in_dtype: str, out_dtype: str,
                 scale: Optional[tuple] = None) -> torch.Tensor:
    """The merged tensor in ``out_dtype``: same dtype -> the kernel rounds once into it (fp8 included; a scaled fp8
    weight in its dequantized domain, as fuse_lora does, the scale unchanged); otherwise the sum is formed in fp32 (the
    input upcast exactly when it is narrower) and rounded to the output dtype."""
    from .fusing import FusedStep
    from .kernels import merge as merge_kernels
    from .live import dora_weight  # the DoRA merge fuse_lora uses: merged files match it bit for bit
    from .merge_jobs import merge_job

    work_dtype = in_dtype if (in_dtype == out_dtype and in_dtype in _MERGEABLE) else "F32"
    if work_dtype not in _FP8:
        scale = None  # an fp8 weight converted (not possible with --dtype today) would not be scaled any more
    w = tensor.to(_torch_of(work_dtype)) if tensor.dtype != _torch_of(work_dtype) else tensor
    for (a, b), part in target.parts.items():  # disjoint row ranges of a fused tensor: each fused in place on its view
        _fuse_tensor(w[a:b], part, work_dtype, work_dtype, scale)
    if target.additive:
        # fuse_lora's own merge job (same factors, scales folded in by the kernel, same bits); the kernel flags a
        # NaN/Inf result, or one beyond fp8's range (which its cast would saturate or overflow)
        fan_in_fan_out = target.additive[0][0].fan_in_fan_out
        try:
            job = merge_job(_Weight(w.t() if fan_in_fan_out else w, scale), target.additive, FusedStep(names=[]))
        except LoraFusionError as e:  # a per-channel, zero or non-finite fp8 scale
            raise LoraFormatError(f"{target.label}: {str(e).lstrip(': ')}") from None
        _, flags = merge_kernels.fuse([job], record=False, check_finite=True)
        if any(flags):
            raise LoraFormatError(f"{target.label}: merging gives non-finite weights (NaN/Inf, or beyond fp8's range); "
                                  "nothing was written")
    if target.dora and scale is not None:
        raise LoraFormatError(f"{target.label}: DoRA on a scaled fp8 weight is not supported; nothing was written")
    for layer, factor in target.dora:
        view = w.t() if layer.fan_in_fan_out else w
        view.copy_(dora_weight(view, layer, factor))
    if target.bias:
        acc = w.float()
        for layer, factor in target.bias:
            acc = acc + layer.bias.float() * (layer.scale * factor)
        w = acc.to(w.dtype)
    if w.dtype != _torch_of(out_dtype):
        w = w.to(_torch_of(out_dtype))
    if not _finite(w):
        raise LoraFormatError(f"{target.label}: merging gives non-finite weights (NaN/Inf); nothing was written")
    return w


def _out_dtype(st_dtype: str, dtype: Optional[str], keep: bool = False) -> str:
    return dtype if (dtype is not None and st_dtype in _CASTABLE and not keep) else st_dtype


def _merge_file(src: str, header: SafetensorsHeader, dst: str, plan: MergePlan, dtype: Optional[str],
                progress: Callable[[int], None]) -> int:
    """Rewrite one weight file; returns the output's tensor data bytes."""
    keep = _fp8_scale_names(header) if dtype is not None else set()
    entries = [(n, _out_dtype(th.dtype, dtype, n in keep), th.shape) for n, th in header.tensors.items()]
    fd = os.open(src, os.O_RDONLY)
    try:
        copy_buf = None
        with StreamingSafetensorsWriter(dst, entries, header.metadata) as writer:
            for name, _ in writer.order:
                th = header.tensors[name]
                out_dt = _out_dtype(th.dtype, dtype, name in keep)
                target = plan.targets.get((src, name))
                if target is None and out_dt == th.dtype:
                    if copy_buf is None:
                        copy_buf = memoryview(bytearray(min(_COPY_CHUNK, max(1, header.file_size))))
                    writer.write_stream(name, th.nbytes, _copy_chunks(fd, th, copy_buf, src))
                else:
                    t = read_tensor(fd, th, src)
                    if target is not None:
                        t = _fuse_tensor(t, target, th.dtype, out_dt, _read_scale(target))
                    else:
                        t = t.to(_torch_of(out_dt))
                    writer.write(name, t)
                    del t
                progress(th.nbytes)
            return writer.data_bytes
    finally:
        os.close(fd)


def _rewrite_index(src_index: str, dst_index: str, total_size: Optional[int]) -> None:
    if total_size is None:
        shutil.copy2(src_index, dst_index)
        return
    with open(src_index, encoding="utf-8") as f:
        data = json.load(f)
    meta = data.setdefault("metadata", {})
    if isinstance(meta, dict):
        meta["total_size"] = total_size
    tmp = dst_index + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, dst_index)


@dataclass
class MergeResult:
    output: str
    merged_modules: int
    merged_tensors: int
    files_written: int
    unmatched: list[str]
    skipped_pickles: list[str]


def _total_bytes(base: BaseCheckpoint) -> int:
    return sum(th.nbytes for g in base.groups for f in g.files for th in g.headers[f].tensors.values())


def merge(base_path: str, loras: list[LoraSpec], out: str, *, dtype: Optional[str] = None,
          component: Optional[str] = None, allow_unmatched: bool = False, overwrite: bool = False,
          progress_factory: Optional[Callable[[int], Callable[[int], None]]] = None,
          log: Callable[[str], None] = lambda s: None) -> MergeResult:
    """Bake ``loras`` into the checkpoint at ``base_path`` and write it to ``out`` (see the module docstring).

    ``dtype``: "F32"/"F16"/"BF16" to convert floating tensors, None to keep each tensor's dtype. Raises
    LoraFormatError for mismatched shapes, unmatched adapter keys (unless ``allow_unmatched``), an existing
    ``out`` (unless ``overwrite``), and bases it cannot handle.
    """
    base = open_base(base_path)
    plan = plan_merge(base, loras, component)
    if plan.mismatched:
        more = f" (and {len(plan.mismatched) - 1} more)" if len(plan.mismatched) > 1 else ""
        raise LoraFormatError(f"{base.path}: the adapter does not fit this base model: {plan.mismatched[0]}{more}")
    if plan.merged_modules == 0:
        raise LoraFormatError(f"{base.path}: no adapter module matches any weight of this checkpoint "
                              f"(first adapter key: {plan.unmatched[0] if plan.unmatched else '-'})")
    if plan.unmatched and not allow_unmatched:
        more = f" (and {len(plan.unmatched) - 1} more)" if len(plan.unmatched) > 1 else ""
        raise LoraFormatError(f"{len(plan.unmatched)} adapter modules match nothing in {base.path}: "
                              f"{plan.unmatched[0]}{more}; pass --allow-unmatched to merge the rest anyway")
    out = os.path.abspath(out)
    if os.path.exists(out) and not overwrite:
        raise LoraFormatError(f"{out}: already exists; choose another -o or pass --overwrite")
    progress = (progress_factory or (lambda total: (lambda n: None)))(_total_bytes(base))
    merged_tensors = len(plan.targets)

    if base.kind == "file":
        if os.path.isdir(out):
            raise LoraFormatError(f"{out}: is a directory; a single-file base is written to a file")
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        f = base.groups[0].files[0]
        _merge_file(f, base.groups[0].headers[f], out, plan, dtype, progress)
        return MergeResult(out, plan.merged_modules, merged_tensors, 1, plan.unmatched, [])

    if os.path.exists(out) and not os.path.isdir(out):
        raise LoraFormatError(f"{out}: is a file; a {base.kind} base is written to a directory")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp.", dir=parent)
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it 0700; the result should look like any new folder
    files_written = 0
    try:
        weight_files = {f: g for g in base.groups for f in g.files}
        index_files = {g.index: g for g in base.groups if g.index}
        src_root = os.path.dirname(base.path) if base.kind == "sharded" else base.path
        if base.kind == "sharded":
            copy_list = [base.path] + list(weight_files)
        else:
            copy_list = []
            for root, dirs, files in os.walk(src_root):
                dirs.sort()
                for name in sorted(files):
                    copy_list.append(os.path.join(root, name))
        sizes: dict = {}
        for src in copy_list:
            rel = os.path.relpath(src, src_root)
            dst = os.path.join(staging, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            if src in weight_files:
                g = weight_files[src]
                sizes[src] = _merge_file(src, g.headers[src], dst, plan, dtype, progress)
                files_written += 1
            elif src in index_files:
                continue  # written after its shards (total_size)
            elif src in base.skipped_pickles:
                log(f"skipped {rel}: pickle weights are not merged (the .safetensors weights are)")
            else:
                shutil.copy2(src, dst)
        for index, g in index_files.items():
            total = sum(sizes[f] for f in g.files) if dtype is not None else None
            _rewrite_index(index, os.path.join(staging, os.path.relpath(index, src_root)), total)
        _fsync_dir(staging)
        if os.path.exists(out):
            trash = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old.", dir=parent)
            os.rename(out, os.path.join(trash, "old"))
            os.rename(staging, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(staging, out)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return MergeResult(out, plan.merged_modules, merged_tensors, files_written, plan.unmatched,
                       [os.path.relpath(p, src_root) for p in base.skipped_pickles])
