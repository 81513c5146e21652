"""Safetensors I/O on lora_fast's C++ core: strict validation, zero-copy loading, atomic saving.

The format and every rule enforced are in docs/safetensors.md. In short:

* :func:`load_file` maps the file (``MAP_PRIVATE``) and validates its whole header in C++ before any tensor exists.
  On the CPU the tensors are zero-copy views of the mapping. :func:`load` does the same for bytes in memory.
* :func:`read_header` / :func:`read_metadata` read only the header (names, dtypes, shapes, offsets, metadata).
* :func:`save_file` writes the same bytes as ``safetensors.torch.save_file`` (metadata in dict order), atomically.
* :func:`stream_tensors` (and :func:`load_file` to a CUDA device) stream the data through a small ring of host
  buffers filled by C++ reader threads, copying each chunk to one destination allocation as the next is read
  (docs/streaming.md). The streaming loader lives in :mod:`lora_fast.io_stream`; this module re-exports it.

Every malformed file raises :class:`~lora_fast.errors.LoraFormatError` naming the file and the problem; invalid
arguments to :func:`save_file` raise it too. Operating-system failures raise ``OSError``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional, Union

import torch

from . import _C
from .errors import LoraFormatError

__all__ = [
    "load_file",
    "stream_tensors",
    "TensorStream",
    "load",
    "save_file",
    "read_metadata",
    "read_header",
    "SafetensorsHeader",
    "TensorHeader",
]

PathLike = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]

#: The one dtype table, from the C++ core: safetensors dtype string -> bits per element, in the format's enum order
#: (the writer sorts data by it, descending).
DTYPE_BITS: dict[str, int] = dict(_C.safetensors_dtypes())


def tensor_nbytes(dtype: str, shape) -> int:
    """Bytes of a tensor of safetensors ``dtype`` and ``shape`` (as the file counts it)."""
    return math.prod(shape) * DTYPE_BITS[dtype] // 8

# safetensors dtype string -> torch dtype, for the dtypes this torch has (F6_E2M3/F6_E3M2 have none).
_TORCH_DTYPES: dict[str, torch.dtype] = {
    name: dt
    for name, dt in {
        "BOOL": torch.bool,
        "U8": torch.uint8,
        "I8": torch.int8,
        "F8_E5M2": getattr(torch, "float8_e5m2", None),
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
        "F8_E8M0": getattr(torch, "float8_e8m0fnu", None),
        "F8_E4M3FNUZ": getattr(torch, "float8_e4m3fnuz", None),
        "F8_E5M2FNUZ": getattr(torch, "float8_e5m2fnuz", None),
        "F4": getattr(torch, "float4_e2m1fn_x2", None),
        "I16": torch.int16,
        "U16": getattr(torch, "uint16", None),
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I32": torch.int32,
        "U32": getattr(torch, "uint32", None),
        "F32": torch.float32,
        "C64": torch.complex64,
        "F64": torch.float64,
        "I64": torch.int64,
        "U64": getattr(torch, "uint64", None),
    }.items()
    if dt is not None
}
assert set(_TORCH_DTYPES) <= set(DTYPE_BITS), "a torch mapping for a dtype the core does not know"
_SAFETENSORS_DTYPES: dict[torch.dtype, str] = {dt: name for name, dt in _TORCH_DTYPES.items()}
# torch packs two F4 values per element along the last dimension; the file's shape counts single values.
PACKED_F4 = _TORCH_DTYPES.get("F4")


@dataclass(frozen=True)
class TensorHeader:
    """One tensor's header entry."""

    name: str
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]  # as stored in the file (for F4 it counts 4-bit values)
    data_offsets: tuple[int, int]  # [begin, end) relative to the start of the data buffer
    file_offset: int  # absolute offset of the first byte in the file

    @property
    def nbytes(self) -> int:
        return self.data_offsets[1] - self.data_offsets[0]

    @property
    def torch_dtype(self) -> Optional[torch.dtype]:
        """The torch dtype, or None where torch has none (F6_*)."""
        return _TORCH_DTYPES.get(self.dtype)


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: tensors in data order (as safetensors' load_file orders them), metadata, layout."""

    tensors: dict[str, TensorHeader]
    metadata: dict[str, str]  # empty when absent or null
    data_start: int  # 8 + header size
    file_size: int


def fspath_of(path: PathLike) -> tuple[bytes, str]:
    """(path for the C++ side, path for messages). Internal (io and io_stream)."""
    raw = os.fsencode(os.fspath(path))
    return raw, os.fsdecode(raw)


def _header_from_tuple(header: tuple) -> SafetensorsHeader:
    entries, metadata, data_start, file_size = header
    tensors = {
        name: TensorHeader(name, dtype, shape, (begin, end), data_start + begin)
        for name, dtype, shape, begin, end in entries
    }
    return SafetensorsHeader(tensors, dict(metadata or {}), data_start, file_size)


def torch_dtype_and_shape(entry: tuple, source: str) -> tuple[torch.dtype, tuple[int, ...]]:
    """(torch dtype, shape) of one header entry, or LoraFormatError naming the tensor. Internal (io and io_stream)."""
    name, st_dtype, shape, _, _ = entry
    dtype = _TORCH_DTYPES.get(st_dtype)
    if dtype is None:
        raise LoraFormatError(
            f"{source}: tensor {name!r} has dtype {st_dtype}, which torch {torch.__version__} cannot represent"
        )
    if dtype is PACKED_F4:
        if not shape or shape[-1] % 2:
            raise LoraFormatError(
                f"{source}: tensor {name!r}: F4 needs an even last dimension to load as torch.float4_e2m1fn_x2, "
                f"got shape {list(shape)}"
            )
        shape = (*shape[:-1], shape[-1] // 2)
    return dtype, shape


def _tensors_from_buffer(buffer, header: tuple, source: str, device, dtype) -> dict[str, torch.Tensor]:
    """Tensors viewing `buffer` (a whole file) at the offsets of a validated header, in data order."""
    entries, _, data_start, _ = header
    target = torch.device(device)
    out: dict[str, torch.Tensor] = {}
    for entry in entries:
        name, _, _, begin, end = entry
        tdtype, shape = torch_dtype_and_shape(entry, source)
        nbytes = end - begin
        offset = data_start + begin
        if nbytes == 0:  # frombuffer rejects empty ranges
            tensor = torch.empty(shape, dtype=tdtype)
        elif offset % tdtype.itemsize == 0:
            # frombuffer keeps `buffer` (the owner of the mapping) alive for as long as the tensor lives.
            tensor = torch.frombuffer(buffer, dtype=tdtype, count=nbytes // tdtype.itemsize, offset=offset)
            tensor = tensor.view(shape)
        else:
            # Misaligned for its dtype (legal in the format, not written by safetensors): copy to aligned memory.
            raw = torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes, offset=offset).clone()
            tensor = raw.view(tdtype).view(shape)
        cast = dtype if (dtype is not None and tensor.is_floating_point() and tdtype is not PACKED_F4) else None
        if target.type != "cpu" or (cast is not None and cast != tdtype):
            tensor = tensor.to(device=target, dtype=cast)
        out[name] = tensor
    return out


def load_file(
    path: PathLike,
    device: Union[str, int, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = None,
    *,
    ring_bytes: Optional[int] = None,
    chunk_bytes: Optional[int] = None,
    threads: Optional[int] = None,
):
    """Load every tensor of a safetensors file, in data order (the order safetensors.torch.load_file returns).

    ``device="cpu"`` without ``ring_bytes``: the file is mapped copy-on-write (``MAP_PRIVATE``) and its header fully
    validated before any tensor is made. Each tensor is a zero-copy view of the mapping: pages are read lazily,
    writing to a tensor changes only this process's copy, never the file. The views stay valid only while the file
    is unchanged on disk: truncating or rewriting it in place while they live is undefined (replacing it by rename,
    as :func:`save_file` does, is safe). A tensor whose offset is not aligned for its dtype is copied instead.
    ``chunk_bytes`` and ``threads`` are ignored on this path.

    A CUDA device, or the CPU with ``ring_bytes`` given: the file is streamed through a ring of host buffers into one
    destination allocation (see :func:`stream_tensors`; pinned buffers and a dedicated copy stream for CUDA), and
    every copy has completed when this returns. Other devices: the mapped tensors are copied with ``.to(device)``.

    ``dtype`` casts floating-point tensors only (not packed F4). Raises LoraFormatError (naming the file) for any
    malformed file, and for a file truncated, changed or unreadable while it is streamed.
    """
    target = torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    if target.type == "cuda" or (target.type == "cpu" and ring_bytes is not None):
        out: dict[str, torch.Tensor] = {}
        with TensorStream(path, target, dtype, ring_bytes, chunk_bytes, threads) as stream:
            for name, tensor in stream:
                out[name] = tensor
        if target.type == "cuda":
            torch.cuda.current_stream(target).synchronize()
        return out
    raw, shown = fspath_of(path)
    mapping = _C.safetensors_mmap(raw)
    return _tensors_from_buffer(mapping, mapping.header, shown, device, dtype)


def load(data) -> dict[str, torch.Tensor]:
    """Load tensors from a complete safetensors file held in memory (bytes or any buffer), validated like a file.

    The tensors view one private copy of ``data`` (writable, independent of it).
    """
    header = _C.safetensors_parse(data)
    return _tensors_from_buffer(bytearray(data), header, "<bytes>", "cpu", None)


def read_header(path: PathLike) -> SafetensorsHeader:
    """Validate and return a file's header (names, dtypes, shapes, offsets, metadata) without reading its data."""
    raw, _ = fspath_of(path)
    return _header_from_tuple(_C.safetensors_read_header(raw))


def read_metadata(path: PathLike) -> dict[str, str]:
    """The ``__metadata__`` map of a safetensors file; empty when it has none (or null). Reads only the header."""
    return read_header(path).metadata


def memory_span(tensor: torch.Tensor) -> tuple[int, int]:
    """[first byte, one past the last byte) that a strided tensor's elements occupy (the one span helper)."""
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    start = tensor.data_ptr()
    return start, start + (last + 1) * tensor.element_size()


def _check_no_aliasing(tensors: Mapping, shown: str) -> None:
    """Tensors whose memory overlaps would be saved twice and come back untied: refuse them, as safetensors does."""
    spans = []
    for name, t in tensors.items():
        if t.numel() == 0 or t.device.type == "meta":
            continue
        start, end = memory_span(t)
        spans.append((str(t.device), start, end, name))
    spans.sort()
    prev = None
    for span in spans:
        if prev is not None and span[0] == prev[0] and span[1] < prev[2]:
            raise LoraFormatError(
                f"{shown}: tensors {prev[3]!r} and {span[3]!r} share memory; save one of them, or .clone() the other"
            )
        if prev is None or span[0] != prev[0] or span[2] > prev[2]:
            prev = span


def _check_utf8(text: str, what: str, shown: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise LoraFormatError(f"{shown}: {what} {text!r} is not encodable as UTF-8 ({e.reason})") from None


def _prepare_for_save(tensors, metadata, shown: str):
    """Validate save_file's arguments; return the C++ entries and the CPU tensors they point into."""
    if not isinstance(tensors, Mapping):
        raise LoraFormatError(f"{shown}: expected a dict of str -> torch.Tensor, got {type(tensors).__name__}")
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            raise LoraFormatError(f"{shown}: metadata must be a dict of str -> str, got {type(metadata).__name__}")
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise LoraFormatError(
                    f"{shown}: metadata must map str -> str, got {type(key).__name__} {key!r} -> "
                    f"{type(value).__name__}"
                )
            _check_utf8(key, "metadata key", shown)
            _check_utf8(value, f"metadata value of {key!r}:", shown)
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise LoraFormatError(f"{shown}: tensor names must be str, got {type(name).__name__} {name!r}")
        if not name:
            raise LoraFormatError(f"{shown}: empty tensor name")
        if name == "__metadata__":
            raise LoraFormatError(f"{shown}: a tensor may not be named '__metadata__' (the file would be unreadable)")
        if "\0" in name:
            raise LoraFormatError(f"{shown}: tensor name {name!r} contains a NUL character")
        _check_utf8(name, "tensor name", shown)
        if not isinstance(t, torch.Tensor):
            raise LoraFormatError(f"{shown}: {name!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.layout != torch.strided:
            raise LoraFormatError(f"{shown}: {name!r} is a {t.layout} tensor; convert it with .to_dense() first")
        if t.device.type == "meta":
            raise LoraFormatError(f"{shown}: {name!r} is on the meta device and has no data")
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise LoraFormatError(f"{shown}: {name!r} has dtype {t.dtype}, which safetensors cannot store")
        if t.dtype is PACKED_F4 and t.dim() == 0:
            raise LoraFormatError(f"{shown}: {name!r} is a 0-d float4_e2m1fn_x2 tensor, which safetensors cannot store")
    _check_no_aliasing(tensors, shown)

    entries, keep_alive = [], []
    for name, t in tensors.items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.to("cpu")
        # Lazy conjugate/negative views would otherwise be written unresolved; non-contiguous tensors are copied.
        t = t.resolve_conj().resolve_neg().contiguous()
        shape = list(t.shape)
        if t.dtype is PACKED_F4:
            shape[-1] *= 2
        nbytes = t.numel() * t.element_size()
        entries.append((name, _SAFETENSORS_DTYPES[t.dtype], shape, t.data_ptr() if nbytes else 0, nbytes))
        keep_alive.append(t)
    md = None if metadata is None else list(metadata.items())
    return entries, md, keep_alive


def _save_file(tensors, path: PathLike, metadata=None, *, _fail_after_bytes: int = -1) -> None:
    raw, shown = fspath_of(path)
    entries, md, keep_alive = _prepare_for_save(tensors, metadata, shown)
    _C.safetensors_save(raw, entries, md, _fail_after_bytes)
    del keep_alive  # the C++ writer read from these tensors' memory


def save_file(tensors: Mapping[str, torch.Tensor], path: PathLike, metadata: Optional[Mapping[str, str]] = None):
    """Save tensors to a safetensors file, byte-identical to ``safetensors.torch.save_file``.

    Layout: the header lists ``__metadata__`` first (in dict order; safetensors itself writes several metadata keys
    in random order), then tensors in data order: dtype descending (safetensors' enum order), then name.
    The write is atomic: a temporary file in the same directory, fsync, rename over ``path``, fsync of the
    directory. On any error the temporary file is removed and an existing ``path`` is left as it was.

    Friendlier than safetensors: non-contiguous tensors are saved as contiguous copies, conjugate/negative views are
    resolved, tensors on other devices are copied to the CPU. Tensors that overlap in memory, non-tensor values,
    non-str metadata and a tensor named ``__metadata__`` raise LoraFormatError.
    """
    _save_file(tensors, path, metadata)


# The streaming loader lives in io_stream (it imports this module's helpers, so it comes last); its two names stay
# part of this module's API.
from .io_stream import TensorStream, stream_tensors  # noqa: E402
