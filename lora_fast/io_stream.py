"""Streaming a safetensors file to a device: C++ reader threads fill a small ring of host buffers (pinned for CUDA)
and each chunk is copied to one destination allocation while the next ones are read (docs/streaming.md).

:func:`stream_tensors` / :class:`TensorStream` yield each tensor as soon as it is complete; ``lora_fast.io.load_file``
uses them for a CUDA device (or the CPU with ``ring_bytes``), and fuse-on-load fuses layers as their tensors arrive.
``lora_fast.io`` re-exports both names (the file reader/writer is there).
"""

from __future__ import annotations

import collections
from typing import Optional, Union

import torch

from . import _C
from .io import PACKED_F4, PathLike, fspath_of, torch_dtype_and_shape

__all__ = ["stream_tensors", "TensorStream"]


# Ring defaults. CPU (only used when ring_bytes is given): measured with `python benchmarks/bench_io.py --tune` on the
# development machine (2-core Xeon, 4 MiB L2, warm page cache, 400 MB file): rings of 1-16 MiB, chunks of
# 128 KiB-1 MiB and 1-3 threads all landed within the run-to-run noise of a shared machine (about +-20%), with
# 16 MiB / 1 MiB / 2 threads among the fastest; threads = cores. CUDA: NOT measured on a GPU; chosen from the
# published anchors (lora-formats.md §5: pinned H2D ~50 GB/s on PCIe Gen5; fastsafetensors, Run:ai's streamer and
# InstantTensor use MB-sized pinned bounce buffers with several reader threads): 8 MiB chunks keep per-copy launch
# overhead (~10 us) under 2% at 50 GB/s, and 8 slots let 4 reads and 4 copies be in flight.
_CPU_RING = {"ring_bytes": 16 << 20, "chunk_bytes": 1 << 20, "threads": 2}
_CUDA_RING = {"ring_bytes": 64 << 20, "chunk_bytes": 8 << 20, "threads": 4}


def _positive(name: str, value, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class _CpuCopier:
    """Copies each chunk into a CPU destination with memcpy (in C++, GIL released); done at once."""

    def __init__(self, reader, dest: torch.Tensor):
        self._reader = reader
        self._address = dest.data_ptr()

    def submit(self, slot: int):
        self._reader.copy_chunk(slot, self._address)
        return None

    def done(self, token) -> bool:
        return True

    def wait(self, token) -> None:
        pass

    def publish(self, token) -> None:
        pass

    def finish(self, token, *, block: bool) -> None:
        pass


class _CudaCopier:
    """Asynchronous copies from pinned slots into the device destination on a dedicated stream, one event per chunk.

    A slot goes back to the readers only once its chunk's event has completed. Tensors are published by making the
    consumer's current stream wait on the event (no host block).
    """

    def __init__(self, reader, dest: torch.Tensor, slots: list):
        self._reader = reader
        self._dest = dest
        self._slots = slots
        self._stream = torch.cuda.Stream(device=dest.device)
        # dest was allocated on the current stream: the copies must not start before that allocation is usable,
        # and the allocator must not hand dest's memory out again while copies into it may still run.
        self._stream.wait_stream(torch.cuda.current_stream(dest.device))
        dest.record_stream(self._stream)

    def submit(self, slot: int):
        src = self._slots[slot]
        with torch.cuda.stream(self._stream):
            for slot_offset, dest_offset, nbytes in self._reader.segments(slot):
                self._dest[dest_offset : dest_offset + nbytes].copy_(
                    src[slot_offset : slot_offset + nbytes], non_blocking=True
                )
            event = torch.cuda.Event()
            event.record(self._stream)
        return event

    def done(self, token) -> bool:
        return token.query()

    def wait(self, token) -> None:
        token.synchronize()

    def publish(self, token) -> None:
        torch.cuda.current_stream(self._dest.device).wait_event(token)

    def finish(self, token, *, block: bool) -> None:
        if block:
            self._stream.synchronize()
        elif token is not None:
            self.publish(token)


class TensorStream:
    """Iterator over ``(name, tensor)`` of one safetensors file, each yielded once all its bytes are at the device.

    Made by :func:`stream_tensors`. Also a context manager; :meth:`close` (or leaving the ``with`` block, or an
    exception, or dropping the iterator) stops and joins the reader threads and frees the ring. Tensors already
    yielded stay valid: they are views into one destination allocation that lives as long as any of them.
    """

    def __init__(self, path: PathLike, device, dtype, ring_bytes, chunk_bytes, threads, _fault=None):
        raw, self.path = fspath_of(path)
        self._reader = None
        self._closed = False
        self._ready: collections.deque = collections.deque()
        self._pending: collections.deque = collections.deque()  # (token, slot) in submission order
        self._last_token = None
        self._slot_tensors: list = []
        self._dest = None
        fault, fault_chunk, delay_us = _fault or ("", 0, 0)
        target = torch.device(device)
        if target.type == "cuda" and target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())
        defaults = _CUDA_RING if target.type == "cuda" else _CPU_RING
        ring = _positive("ring_bytes", ring_bytes, defaults["ring_bytes"])
        chunk = _positive("chunk_bytes", chunk_bytes, min(defaults["chunk_bytes"], max(1, ring // 2)))
        nthreads = _positive("threads", threads, defaults["threads"])
        if target.type not in ("cpu", "cuda"):
            raise ValueError(f"stream_tensors streams to 'cpu' or 'cuda' devices, got {target}")
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype or None, got {dtype!r}")

        self._reader = _C.StreamReader(raw, fault, fault_chunk, delay_us)
        try:
            header = self._reader.header
            entries, _, _, _ = header
            offsets = self._reader.dest_offsets
            # Every tensor's torch dtype is checked before a byte is read: a bad one fails the whole load up front.
            self._plan = [
                (entry[0], *torch_dtype_and_shape(entry, self.path), offset, entry[4] - entry[3])
                for entry, offset in zip(entries, offsets)
            ]
            self._cast = dtype
            self._device = target
            data_size = header[3] - header[2]
            chunk = min(chunk, ring)
            if data_size:
                chunk = min(chunk, data_size)
            nslots = max(1, ring // chunk)
            nslots = max(1, min(nslots, -(-data_size // chunk)))
            self._dest = torch.empty(self._reader.dest_size, dtype=torch.uint8, device=target)
            if target.type == "cuda":
                self._slot_tensors = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(nslots)]
                self._copier = _CudaCopier(self._reader, self._dest, self._slot_tensors)
                self._reader.start(chunk, [t.data_ptr() for t in self._slot_tensors], 0, nthreads)
            else:
                self._copier = _CpuCopier(self._reader, self._dest)
                self._reader.start(chunk, [], nslots, nthreads)
            self._nslots = self._reader.slot_count
            self._yielded = 0
        except BaseException:
            self.close()
            raise

    def __iter__(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _tensor(self, index: int) -> tuple[str, torch.Tensor]:
        name, tdtype, shape, offset, nbytes = self._plan[index]
        if nbytes == 0:
            tensor = torch.empty(shape, dtype=tdtype, device=self._device)
        else:
            tensor = self._dest[offset : offset + nbytes].view(tdtype).view(shape)
        if self._cast is not None and tensor.is_floating_point() and tdtype is not PACKED_F4 and self._cast != tdtype:
            tensor = tensor.to(self._cast)
        return name, tensor

    def _publish(self, upto: int, token) -> None:
        if upto > self._yielded:
            self._copier.publish(token)
            for i in range(self._yielded, upto):
                self._ready.append(self._tensor(i))
            self._yielded = upto

    def _advance(self) -> bool:
        """Read and copy chunks until some tensors are ready; False when the file is done."""
        reader, copier, pending = self._reader, self._copier, self._pending
        while not self._ready:
            while pending and copier.done(pending[0][0]):
                reader.release(pending.popleft()[1])
            if len(pending) >= self._nslots:  # every slot waits on a copy: the readers cannot go on until one ends
                token, slot = pending.popleft()
                copier.wait(token)
                reader.release(slot)
            item = reader.next()
            if item is None:
                self._publish(len(self._plan), self._last_token)  # zero-size tensors of a data-less file
                return bool(self._ready)
            slot, _, tensors_done = item
            token = copier.submit(slot)
            pending.append((token, slot))
            self._last_token = token
            self._publish(tensors_done, token)
        return True

    def __next__(self) -> tuple[str, torch.Tensor]:
        if not self._ready and not self._closed:
            try:
                more = self._advance()
            except BaseException:
                self.close(_failed=True)
                raise
            if not more:
                self.close(_drained=True)
        if self._ready:
            return self._ready.popleft()
        raise StopIteration

    def close(self, *, _failed: bool = False, _drained: bool = False) -> None:
        """Stop the reader threads, wait for copies in flight and free the ring. Idempotent.

        Tensors not yet yielded are dropped. Every tensor of a stream is a view into one destination allocation
        on the device, so a tensor the caller still holds keeps that whole allocation alive (clone it to keep
        one tensor alone).
        """
        if self._closed:
            if not _drained:
                self._ready.clear()
            return
        self._closed = True
        try:
            if self._reader is not None:
                self._reader.close()  # joins the threads; GIL released while waiting
        finally:
            copier = getattr(self, "_copier", None)
            if copier is not None:
                # Early close or failure: wait for every copy so the slots and dest are idle when freed.
                # Normal end: the consumer's stream waits for the last copy; nothing blocks the host.
                copier.finish(self._last_token, block=_failed or self._yielded < len(self._plan))
            self._pending.clear()
            self._slot_tensors = []
            self._copier = None
            self._dest = None
            self._reader = None
            if not _drained:  # the end of the data keeps its last tensors for the iterator to hand out
                self._ready.clear()


def stream_tensors(
    path: PathLike,
    device: Union[str, int, torch.device],
    *,
    dtype: Optional[torch.dtype] = None,
    ring_bytes: Optional[int] = None,
    chunk_bytes: Optional[int] = None,
    threads: Optional[int] = None,
) -> TensorStream:
    """Stream a safetensors file's tensors to ``device``, yielding ``(name, tensor)`` in file (data) order as soon
    as each one is completely copied, so that work on early tensors overlaps reading the rest.

    C++ reader threads (``threads``) pread the data in chunks (``chunk_bytes``) into a ring of host buffers
    (``ring_bytes`` in all: pinned for CUDA, ordinary memory for the CPU); each filled chunk is copied into one
    destination allocation on ``device`` (asynchronously on a dedicated CUDA stream for a GPU) while the next ones
    are read. Host memory beyond the destination stays within the ring whatever the file size.

    On CUDA a yielded tensor is ready for work on the stream that is current when it is yielded (that stream is
    made to wait for its copy); synchronize before using it on another stream. ``dtype`` casts floating tensors
    after the copy, on the device. The file's size and modification time are checked before and after the read;
    a file truncated or changed while read, an I/O error or a malformed header raises LoraFormatError naming the
    file, after which the threads are joined and the ring freed. Use as an iterator or a context manager.
    """
    return TensorStream(path, device, dtype, ring_bytes, chunk_bytes, threads)
