"""Fuse-on-load: stream a LoRA file's factors to the weights' device and fuse each layer as its factors arrive.

The adapter is normalized first from zero-copy CPU views of the file (format detection, validation and binding all
happen before any weight changes and before a byte of tensor data is needed). Each layer factor that is a view of one
file tensor is then remapped to the streamed copy of that tensor (same strides, same offset), so the fused values are
those a plain load + fuse would use, bit for bit. Layers are fused in batches as soon as all their tensors have
arrived, into ONE exact-unfuse step per component, so reading the rest of the file overlaps the merges and one
``unfuse_lora`` undoes everything. Any failure (a stream error, a non-finite result under ``safe_fusing``) undoes every
batch already fused, exactly, and leaves nothing registered.

Used for CUDA weights, and on the CPU when ``LORA_FAST_STREAM_FUSE=1`` or a ring size is given (that is how CI
exercises the logic; the plain CPU load is already lazy through the mmap).
"""

from __future__ import annotations

import bisect
import collections
import os
from typing import Optional

import torch

from . import engine, io, io_stream
from .adapter import LoraAdapter, LoraLayer
from .errors import LoraFusionError
from .kernels import merge as merge_kernels

#: Fuse a batch once the weights waiting in it reach this many bytes. Each batch is one fuse call (on the GPU two
#: launches per launch group and one host read, whatever its layer count), so batches are few and large; the file's
#: reading still overlaps the merges (the reader threads keep filling the ring while a batch is fused).
BATCH_WEIGHT_BYTES = 256 << 20

_FACTOR_FIELDS = ("down", "up", "mid")


def wants_stream(source) -> bool:
    """Whether ``source`` is a single safetensors file the streaming fuse can read."""
    if isinstance(source, LoraAdapter):
        return False
    try:
        path = os.fsdecode(os.fspath(source))
    except TypeError:
        return False
    from .formats import PICKLE_SUFFIXES

    return os.path.isfile(path) and not path.lower().endswith(PICKLE_SUFFIXES)


def _read_with_views(path: str):
    """(adapter, file tensor headers, mapping base address): the adapter built from zero-copy views of the file."""
    from . import formats

    tensors, header_meta = formats.load_tensors(path, False)
    config = None
    if os.path.basename(path).startswith("adapter_model"):
        config = formats.read_peft_config(os.path.dirname(path) or ".", path)
    header = io.read_header(path)
    # Every aligned, non-empty view sits at base + its file offset (misaligned ones were copied: they vote elsewhere).
    votes = collections.Counter(
        t.data_ptr() - header.tensors[n].file_offset for n, t in tensors.items() if t.numel() and n in header.tensors
    )
    base = votes.most_common(1)[0][0] if votes else None
    adapter = formats.adapter_from_state_dict(tensors, header=header_meta, config=config, component=None, where=path)
    return adapter, header, base, tensors


class _FileIndex:
    """Maps a CPU view of the mapped file to (tensor name, element offset) inside one file tensor."""

    def __init__(self, header, base: Optional[int]):
        self.base = base
        entries = sorted(header.tensors.values(), key=lambda h: h.file_offset)
        self.starts = [h.file_offset for h in entries]
        self.entries = entries

    def locate(self, t: torch.Tensor):
        if self.base is None or t.device.type != "cpu" or t.numel() == 0 or any(s < 0 for s in t.stride()):
            return None
        pos = t.data_ptr() - self.base
        i = bisect.bisect_right(self.starts, pos) - 1
        if i < 0:
            return None
        h = self.entries[i]
        start, end = io.memory_span(t)
        if h.torch_dtype != t.dtype or pos + (end - start) > h.file_offset + h.nbytes:
            return None
        byte_off = pos - h.file_offset
        if byte_off % t.element_size():
            return None
        return h.name, byte_off // t.element_size()


class _Pending:
    """One layer waiting for its file tensors."""

    __slots__ = ("comp", "path", "bound", "where", "missing")

    def __init__(self, comp, path, bound, where, missing):
        self.comp, self.path, self.bound, self.where, self.missing = comp, path, bound, where, missing


def _device_layer(layer: LoraLayer, where: dict, arrived: dict, device: torch.device) -> LoraLayer:
    def get(field):
        t = getattr(layer, field)
        if t is None:
            return None
        loc = where.get(field)
        if loc is None:
            return t.to(device)
        name, elem_off = loc
        src = arrived[name]
        if src.device != device:
            src = src.to(device)
        return torch.as_strided(src, t.shape, t.stride(), src.storage_offset() + elem_off)

    return LoraLayer(down=get("down"), up=get("up"), alpha=layer.alpha, kind=layer.kind, use_rslora=layer.use_rslora,
                     magnitude=None, magnitude_axis=None, fan_in_fan_out=layer.fan_in_fan_out, bias=None,
                     mid=get("mid"))


def load_and_fuse(target, path, adapter_name=None, *, components=None, max_rank=None, safe_fusing=False,
                  ring_bytes=None, chunk_bytes=None, threads=None, batch_bytes: int = BATCH_WEIGHT_BYTES,
                  lora_scale=1.0) -> str:
    """Read the LoRA file at ``path``, register it as ``adapter_name`` and fuse it, streaming its factors to the
    weights' device and fusing layer batches as they arrive. Same result, bit for bit, as
    ``load_lora_weights(target, path, adapter_name)`` followed by ``fuse_lora(target, lora_scale=lora_scale,
    adapter_names=[name])`` (``lora_scale``: a number, or ``{component: number}`` with 1.0 for the others).
    On any error every weight is left bit-identical and no adapter is registered."""
    path = os.fsdecode(os.fspath(path))
    engine.refuse_during_per_sample(engine.component_states(target, components), "load_lora_weights(fuse=True)")
    adapter, header, base, _views = _read_with_views(path)
    name, comps, bound = engine.plan_bind(target, adapter, adapter_name, components, max_rank, move=False)
    scales = engine.component_scales(lora_scale, comps)  # each layer's factor, as fuse_lora forms it (x 1.0 weight)
    if any(b.layer.magnitude is not None or b.layer.bias is not None for layers in bound.values() for b in layers.values()):
        # DoRA or LoRA biases: not streamed (they need the whole weight or a backup); the plain path is exact.
        engine.register_bound(target, comps, {c: {p: engine.BoundLayer(p, b.module, b.layer.to(device=b.module.weight.device))
                                                  for p, b in ls.items()} for c, ls in bound.items()}, name, max_rank)
        try:
            engine.fuse(target, lora_scale=lora_scale, safe_fusing=safe_fusing, adapter_names=[name])
        except BaseException:
            engine.delete(target, [name])
            raise
        return name

    devices = collections.Counter(b.module.weight.device for layers in bound.values() for b in layers.values())
    stream_device = devices.most_common(1)[0][0]
    index = _FileIndex(header, base)
    waiting: dict[str, list[_Pending]] = collections.defaultdict(list)
    ready: list[_Pending] = []
    for comp, layers in bound.items():
        for p, b in layers.items():
            where, missing = {}, set()
            for field in _FACTOR_FIELDS:
                t = getattr(b.layer, field)
                loc = index.locate(t) if t is not None else None
                if loc is not None:
                    where[field] = loc
                    missing.add(loc[0])
            item = _Pending(comp, p, b, where, missing)
            if missing:
                for n in missing:
                    waiting[n].append(item)
            else:
                ready.append(item)  # nothing to wait for in the file (a derived tensor): copied up front

    steps = {comp: engine.FusedStep(names=[name]) for comp in bound}
    arrived: dict[str, torch.Tensor] = {}
    device_layers: dict = {}

    def flush(batch: list[_Pending]) -> None:
        jobs, owners, labels = [], [], []
        staged: list = []  # this batch's staging copies: each copied back once (earlier batches' are done)
        for item in batch:
            module = item.bound.module
            dev = device_layers[(item.comp, item.path)]
            step = steps[item.comp]
            jobs.append(engine.merge_job(module, [(dev, scales[item.comp] * 1.0)], step, staged))
            owners.append(step)
            labels.append(engine.layer_label(item.comp, item.path))
        # the same batched path as fuse_lora; under safe_fusing a non-finite batch writes nothing
        records, nonfinite = merge_kernels.fuse(jobs, record=True, check_finite=safe_fusing,
                                                abort_nonfinite=safe_fusing)
        if not any(nonfinite):
            engine.attach_records(owners, jobs, records)
            for param, staging in staged:
                param.copy_(staging.reshape(param.shape))
        if safe_fusing and any(nonfinite):
            bad = labels[nonfinite.index(True)]
            raise LoraFusionError(f"{path}: {bad}: fusing gives non-finite weights (NaN/Inf); every weight was left "
                                  "unchanged and the adapter was not loaded")

    batch: list[_Pending] = []
    batch_weight = 0

    def admit(item: _Pending) -> None:
        nonlocal batch_weight
        module = item.bound.module
        device_layers[(item.comp, item.path)] = _device_layer(item.bound.layer, item.where, arrived,
                                                              module.weight.device)
        batch.append(item)
        w = module.weight
        batch_weight += w.numel() * w.element_size()

    try:
        for item in ready:
            admit(item)
        with io_stream.stream_tensors(path, stream_device, ring_bytes=ring_bytes, chunk_bytes=chunk_bytes,
                               threads=threads) as stream:
            for tname, tensor in stream:
                if tname not in waiting:
                    continue
                arrived[tname] = tensor
                for item in waiting.pop(tname):
                    item.missing.discard(tname)
                    if not item.missing:
                        admit(item)
                if batch_weight >= batch_bytes:
                    flush(batch)
                    batch, batch_weight = [], 0
        if waiting:  # every view came from the file, so the stream must have delivered it
            raise LoraFusionError(f"{path}: tensors {sorted(waiting)[:5]} never arrived from the stream")
        if batch:
            flush(batch)
            batch, batch_weight = [], 0
        for comp, layers in bound.items():
            for p, b in layers.items():
                # a CPU layer keeps the file's own views, the tensors load_lora_weights registers: the live matmuls
                # then get the same operands at the same addresses (a BLAS may sum in another order at another
                # alignment: MKL does on AMD CPUs), and the stream's copy is freed
                if device_layers[(comp, p)].down.device.type != "cpu":
                    b.layer = device_layers[(comp, p)]
        engine.register_bound(target, comps, bound, name, max_rank)
    except BaseException:
        for step in reversed(list(steps.values())):
            engine.undo_step(step)
        if name in engine.loaded_adapter_names(target):  # registration itself failed part way
            engine.delete(target, [name])
        raise
    for comp, step in steps.items():
        state = engine.component_state(comps[comp])
        state.fused.append(step)
        state.epoch += 1
        state.bump()
    return name


def stream_selected(target) -> bool:
    """Stream when the target holds CUDA weights, or on the CPU when ``LORA_FAST_STREAM_FUSE=1`` (for tests)."""
    if os.environ.get("LORA_FAST_STREAM_FUSE", "") == "1":
        return True
    from .targets import resolve_components

    try:
        comps = resolve_components(target)
    except Exception:
        return False  # the plain path raises the proper error
    for module in comps.values():
        for p in module.parameters():
            return p.device.type == "cuda"
    return False
