"""Streaming loader (io_stream.stream_tensors, io.load_file with a ring): the CPU ring path in CI, CUDA when present.

The CPU ring runs the same C++ readers, slots, in-order delivery and slot recycling as the CUDA path; only the copy
differs (memcpy instead of an asynchronous copy on a stream). Results are compared bit for bit with the mmap path.
"""

import gc
import json
import os
import struct
import threading

import pytest
import torch

from lora_fast import _C, io, io_stream
from tensor_bits import EVERY_DTYPE, F4, as_bytes, random_bits
from lora_fast.errors import LoraFormatError

CUDA = torch.cuda.is_available()
cuda_only = pytest.mark.cuda  # skipped without a GPU (conftest)

def assert_same(got: dict, want: dict):
    assert list(got) == list(want)
    for name in want:
        a, b = got[name], want[name]
        assert (a.dtype, a.shape) == (b.dtype, b.shape), name
        assert torch.equal(as_bytes(a), as_bytes(b)), name


def counters_are_zero():
    return all(v == 0 for v in _C.stream_counters().values())


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def every_dtype_tensors(seed=0, rows=37):
    out = {}
    for i, dtype in enumerate(EVERY_DTYPE):
        name = str(dtype).split(".")[-1]
        out[f"{name}.big"] = random_bits(dtype, (rows, 10), seed + i)  # larger than the tiny chunks below
        out[f"{name}.scalar"] = random_bits(dtype, (1,) if dtype == F4 else (), seed + 50 + i)
        out[f"{name}.empty"] = random_bits(dtype, (0, 3), seed)
    return out


def raw_file(path, header: dict, data: bytes):
    text = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


@pytest.fixture
def mixed_file(tmp_path):
    path = tmp_path / "mixed.safetensors"
    io.save_file(every_dtype_tensors(), path)
    return path


@pytest.fixture(autouse=True)
def _no_leaks():
    assert counters_are_zero()
    yield
    gc.collect()
    assert counters_are_zero(), _C.stream_counters()


# ------------------------------------------------------------------------------------------------- correctness


@pytest.mark.parametrize(
    "ring_bytes, chunk_bytes, threads",
    [(128, 64, 1), (128, 64, 4), (192, 64, 2), (4096, 1000, 3), (1 << 20, None, None), (300, 7, 2), (10, None, 1)],
)
def test_ring_path_is_bit_identical_to_mmap_for_every_dtype(mixed_file, ring_bytes, chunk_bytes, threads):
    want = io.load_file(mixed_file)
    got = io.load_file(mixed_file, ring_bytes=ring_bytes, chunk_bytes=chunk_bytes, threads=threads)
    assert_same(got, want)
    streamed = dict(io_stream.stream_tensors(mixed_file, "cpu", ring_bytes=ring_bytes, chunk_bytes=chunk_bytes,
                                             threads=threads))
    assert_same(streamed, want)


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_tiny_ring_wraps_around_with_tensors_split_across_chunks(tmp_path, threads):
    # 2 slots of 64 bytes; every tensor spans several chunks and chunk boundaries fall mid-element.
    tensors = {f"w{i}": random_bits(torch.float32, (5 + i, 7), i) for i in range(12)}
    tensors["odd"] = random_bits(torch.float16, (333,), 99)
    path = tmp_path / "f.safetensors"
    io.save_file(tensors, path)
    reader = _C.StreamReader(os.fsencode(path))
    reader.start(64, [], 2, threads)
    assert reader.slot_count == 2 and reader.chunk_count > 40
    reader.close()
    got = io.load_file(path, ring_bytes=128, chunk_bytes=64, threads=threads)
    assert_same(got, io.load_file(path))


def test_many_small_tensors(tmp_path):
    tensors = {f"layer.{i:05d}.bias": random_bits(torch.bfloat16, (1 + i % 5,), i) for i in range(3000)}
    path = tmp_path / "small.safetensors"
    io.save_file(tensors, path)
    want = io.load_file(path)
    for ring, chunk in [(4096, 256), (1 << 16, None)]:
        assert_same(io.load_file(path, ring_bytes=ring, chunk_bytes=chunk, threads=2), want)


def test_zero_size_and_scalar_tensors_and_empty_files(tmp_path):
    cases = {
        "no_tensors": {},
        "only_empty": {"a": torch.empty(0), "b": torch.empty(3, 0, dtype=torch.float16)},
        "empty_between": {"a": torch.ones(3), "e": torch.empty(0, 2), "z": torch.zeros(())},
    }
    for name, tensors in cases.items():
        path = tmp_path / f"{name}.safetensors"
        io.save_file(tensors, path)
        want = io.load_file(path)
        assert_same(io.load_file(path, ring_bytes=64, chunk_bytes=4, threads=2), want)
        assert [n for n, _ in io_stream.stream_tensors(path, "cpu", ring_bytes=64)] == list(want)


def test_misaligned_tensors_are_placed_aligned_in_the_destination(tmp_path):
    # Legal but never written by safetensors: an F32 and an F64 at odd data offsets.
    data = bytes(range(1, 1 + 1 + 8 + 3 + 16))
    header = {
        "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]},
        "c": {"dtype": "U8", "shape": [3], "data_offsets": [9, 12]},
        "d": {"dtype": "F64", "shape": [2], "data_offsets": [12, 28]},
    }
    path = raw_file(tmp_path / "misaligned.safetensors", header, data)
    reader = _C.StreamReader(os.fsencode(path))
    offsets = reader.dest_offsets
    reader.close()
    assert offsets[1] % 4 == 0 and offsets[3] % 8 == 0 and offsets[2] == offsets[1] + 8
    got = io.load_file(path, ring_bytes=16, chunk_bytes=5, threads=2)
    assert_same(got, io.load_file(path))
    assert got["b"].data_ptr() % 4 == 0 and got["d"].data_ptr() % 8 == 0


def test_aligned_file_keeps_its_layout_in_one_allocation(mixed_file):
    header = io.read_header(mixed_file)
    reader = _C.StreamReader(os.fsencode(mixed_file))
    assert reader.dest_offsets == [t.data_offsets[0] for t in header.tensors.values()]
    assert reader.dest_size == header.file_size - header.data_start
    reader.close()
    got = io.load_file(mixed_file, ring_bytes=256)
    storages = {t.untyped_storage().data_ptr() for t in got.values() if t.numel()}
    assert len(storages) == 1


def test_dtype_casts_floating_tensors_only(mixed_file):
    want = io.load_file(mixed_file, dtype=torch.float64)
    got = io.load_file(mixed_file, dtype=torch.float64, ring_bytes=512, chunk_bytes=100)
    assert_same(got, want)
    assert got["float16.big"].dtype == torch.float64 and got["int32.big"].dtype == torch.int32
    assert F4 is None or got["float4_e2m1fn_x2.big"].dtype == F4


def test_tensors_arrive_in_file_order_and_stay_valid_after_the_stream_moves_on(tmp_path):
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(20)}
    path = tmp_path / "f.safetensors"
    io.save_file(tensors, path)
    seen = []
    with io_stream.stream_tensors(path, "cpu", ring_bytes=256, chunk_bytes=128, threads=3) as stream:
        for name, tensor in stream:
            seen.append((name, tensor))
    assert [n for n, _ in seen] == list(io.read_header(path).tensors)
    for name, tensor in seen:  # the ring has been refilled many times over and freed: the views must not care
        assert torch.equal(tensor, tensors[name])


def test_first_tensors_are_yielded_before_the_end_of_the_file_is_read(tmp_path):
    # A 2-slot ring lets the readers run at most 2 chunks ahead of the consumer, so a fault on the last chunk
    # cannot fire before the first tensors are out: they are yielded as they arrive, and the error comes later.
    tensors = {f"t{i:02d}": torch.full((16,), float(i)) for i in range(40)}
    path = tmp_path / "f.safetensors"
    io.save_file(tensors, path)
    stream = io_stream.TensorStream(path, "cpu", None, 128, 64, 2, _fault=("io_error", 39, 0))
    first = [next(stream) for _ in range(5)]
    assert [n for n, _ in first] == [f"t{i:02d}" for i in range(5)]
    with pytest.raises(LoraFormatError, match="I/O error"):
        list(stream)
    assert torch.equal(first[4][1], tensors["t04"])


# ------------------------------------------------------------------------------------------------- failures


@pytest.mark.parametrize("fault", ["truncate", "io_error", "modify"])
@pytest.mark.parametrize("at", ["first", "middle", "after_last"])
@pytest.mark.parametrize("threads", [1, 4])
def test_failure_during_the_read_raises_format_error_naming_the_file(tmp_path, fault, at, threads):
    tensors = {f"t{i}": random_bits(torch.float32, (64,), i) for i in range(16)}  # 16 x 256 bytes
    path = tmp_path / "victim.safetensors"
    io.save_file(tensors, path)
    os.utime(path, (1_000_000_000, 1_000_000_000))  # a modification must move mtime even on a coarse clock
    chunks = 4096 // 128
    index = {"first": 0, "middle": chunks // 2, "after_last": chunks}[at]
    expected = {"truncate": "truncated|changed", "io_error": "I/O error", "modify": "changed while being read"}
    with pytest.raises(LoraFormatError, match=expected[fault]) as info:
        list(io_stream.TensorStream(path, "cpu", None, 512, 128, threads, _fault=(fault, index, 0)))
    assert str(path) in str(info.value)


def test_repeated_failures_leak_nothing(tmp_path):
    tensors = {f"t{i}": random_bits(torch.float16, (1000,), i) for i in range(32)}  # 64 KB
    path = tmp_path / "victim.safetensors"
    io.save_file(tensors, path)
    good = path.read_bytes()

    def fail_once(i):
        kind = ("truncate", "io_error", "modify")[i % 3]
        os.utime(path, (1_000_000_000, 1_000_000_000))
        with pytest.raises(LoraFormatError):
            list(io_stream.TensorStream(path, "cpu", None, 8192, 1024, 1 + i % 4, _fault=(kind, i % 70, 0)))
        path.write_bytes(good)

    for i in range(10):  # warm up allocator caches
        fail_once(i)
    gc.collect()
    before = rss_bytes()
    for i in range(50):
        fail_once(i)
        assert counters_are_zero(), _C.stream_counters()
    gc.collect()
    assert rss_bytes() - before < 4 << 20


def test_header_that_lies_about_sizes_fails_before_any_thread_starts(tmp_path):
    # The header promises 1000 bytes of data, the file has 100: rejected at open, nothing started.
    header = {"w": {"dtype": "F32", "shape": [250], "data_offsets": [0, 1000]}}
    path = raw_file(tmp_path / "liar.safetensors", header, b"\0" * 100)
    for _ in range(20):
        with pytest.raises(LoraFormatError, match="liar.safetensors"):
            io_stream.stream_tensors(path, "cpu", ring_bytes=256)
        with pytest.raises(LoraFormatError, match="liar.safetensors"):
            io.load_file(path, ring_bytes=256)
        assert counters_are_zero()


def test_unsupported_dtype_fails_before_any_thread_starts(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
              "x": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [4, 7]}}  # fmt: skip
    path = raw_file(tmp_path / "f6.safetensors", header, b"\0" * 7)
    with pytest.raises(LoraFormatError, match="F6_E2M3"):
        io.load_file(path, ring_bytes=64)
    assert counters_are_zero()


def test_missing_file_and_bad_arguments(tmp_path, mixed_file):
    with pytest.raises(FileNotFoundError):
        io.load_file(tmp_path / "absent.safetensors", ring_bytes=64)
    for kwargs in [{"ring_bytes": 0}, {"ring_bytes": -1}, {"chunk_bytes": 0}, {"threads": 0}, {"threads": 1.5}]:
        with pytest.raises(ValueError):
            io_stream.stream_tensors(mixed_file, "cpu", **{"ring_bytes": 64, **kwargs})
    with pytest.raises(ValueError, match="meta"):
        io_stream.stream_tensors(mixed_file, "meta")


# ------------------------------------------------------------------------------------------------- lifetime


@pytest.mark.parametrize("how", ["close", "context_exit", "drop", "exception"])
def test_abandoning_a_stream_stops_the_threads_and_frees_the_ring(tmp_path, how):
    tensors = {f"t{i}": random_bits(torch.float32, (256,), i) for i in range(64)}
    path = tmp_path / "f.safetensors"
    io.save_file(tensors, path)
    kept = []
    # Slow reads so that reads are in flight (and readers wait for slots) when the stream is abandoned.
    stream = io_stream.TensorStream(path, "cpu", None, 4096, 1024, 3, _fault=("", 0, 2000))
    assert _C.stream_counters()["threads"] == 3
    if how == "close":
        kept.append(next(stream))
        stream.close()
        stream.close()
        assert list(stream) == []
    elif how == "context_exit":
        with stream:
            kept.append(next(stream))
    elif how == "drop":
        kept.append(next(stream))
        del stream
    else:
        with pytest.raises(RuntimeError, match="consumer failed"):
            with stream:
                for item in stream:
                    kept.append(item)
                    raise RuntimeError("consumer failed")
    gc.collect()
    assert counters_are_zero(), _C.stream_counters()
    name, tensor = kept[0]
    assert torch.equal(as_bytes(tensor), as_bytes(tensors[name]))


def test_closing_early_drops_the_unyielded_tensors_and_releases_the_destination(tmp_path):
    """Every tensor is a view into one destination allocation: after an early close() the stream yields nothing
    more and keeps no reference to it, so it lives only as long as the caller's own tensors."""
    import weakref

    tensors = {f"t{i}": random_bits(torch.float16, (256,), i) for i in range(32)}
    path = tmp_path / "f.safetensors"
    io.save_file(tensors, path)
    stream = io_stream.stream_tensors(path, "cpu", ring_bytes=1 << 14, chunk_bytes=1 << 12)
    name, first = next(stream)
    assert torch.equal(as_bytes(first), as_bytes(tensors[name]))
    dest = weakref.ref(first._base)
    stream.close()
    assert list(stream) == []
    assert dest() is not None  # the caller's view still holds it
    del first
    gc.collect()
    assert dest() is None, "the closed stream still holds the destination allocation"


def test_stream_never_holds_more_than_its_ring(tmp_path):
    tensors = {f"t{i}": random_bits(torch.int32, (1000,), i) for i in range(50)}
    path = tmp_path / "f.safetensors"
    io.save_file(tensors, path)
    peak = 0
    with io_stream.stream_tensors(path, "cpu", ring_bytes=3000, chunk_bytes=1000, threads=4) as stream:
        for _ in stream:
            peak = max(peak, _C.stream_counters()["owned_slot_bytes"])
    assert peak == 3000


def test_bounded_host_memory_on_a_file_many_times_the_ring(tmp_path):
    # 256 MB file, 4 MB ring. The destination (the file's size) is the only large allocation: peak RSS growth must
    # stay within destination + ring + slack, i.e. no second (pageable) copy of the file is ever made.
    size = 256 << 20
    tensors = {f"w{i}": torch.full((size // 16 // 4,), float(i)) for i in range(16)}
    path = tmp_path / "big.safetensors"
    io.save_file(tensors, path)
    del tensors
    gc.collect()
    ring = 4 << 20
    baseline = rss_bytes()
    peak = [baseline]
    ring_peak = [0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            ring_peak[0] = max(ring_peak[0], _C.stream_counters()["owned_slot_bytes"])
            done.wait(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        out = io.load_file(path, ring_bytes=ring, chunk_bytes=1 << 20, threads=2)
    finally:
        done.set()
        sampler.join()
    dest = sum(t.numel() * t.element_size() for t in out.values())
    assert dest == size
    assert 0 < ring_peak[0] <= ring
    staging = peak[0] - baseline - dest  # what the load held beyond its destination
    assert staging < ring + (24 << 20), f"staging {staging >> 20} MB"
    assert all(float(t[0]) == float(t[-1]) == int(name[1:]) for name, t in out.items())


# ------------------------------------------------------------------------------------------------- CUDA


@cuda_only
@pytest.mark.parametrize("ring_bytes, chunk_bytes, threads", [(None, None, None), (128, 64, 2), (4096, 1000, 4)])
def test_cuda_load_matches_the_cpu_load(mixed_file, ring_bytes, chunk_bytes, threads):
    want = io.load_file(mixed_file)
    got = io.load_file(mixed_file, "cuda", ring_bytes=ring_bytes, chunk_bytes=chunk_bytes, threads=threads)
    assert all(t.device.type == "cuda" for t in got.values())
    assert_same(got, want)
    storages = {t.untyped_storage().data_ptr() for t in got.values() if t.numel()}
    assert len(storages) == 1  # one device allocation per file


@cuda_only
def test_cuda_stream_and_dtype_cast(mixed_file):
    want = io.load_file(mixed_file, dtype=torch.float32)
    got = {}
    with io_stream.stream_tensors(mixed_file, "cuda:0", dtype=torch.float32, ring_bytes=1024, chunk_bytes=256) as s:
        for name, tensor in s:
            got[name] = tensor.clone()  # work on the current stream, ordered after the copy
    assert list(got) == list(want)
    for name, tensor in got.items():
        assert tensor.dtype == want[name].dtype and tensor.device.type == "cuda", name
        if tensor.is_floating_point():  # NaN payloads may be canonicalized differently by CPU and CUDA casts
            torch.testing.assert_close(tensor.cpu(), want[name], rtol=0, atol=0, equal_nan=True)
        else:
            assert torch.equal(as_bytes(tensor), as_bytes(want[name])), name


@cuda_only
def test_cuda_failures_and_abandonment_leak_neither_pinned_nor_device_memory(tmp_path):
    tensors = {f"t{i}": random_bits(torch.float16, (4096,), i) for i in range(64)}  # 512 KB
    path = tmp_path / "f.safetensors"
    io.save_file(tensors, path)
    good = path.read_bytes()
    io.load_file(path, "cuda", ring_bytes=1 << 16, chunk_bytes=1 << 14)  # warm up allocator caches
    torch.cuda.synchronize()
    device_before = torch.cuda.memory_allocated()
    pinned_before = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    for i in range(20):
        with pytest.raises(LoraFormatError):
            list(io_stream.TensorStream(path, "cuda", None, 1 << 16, 1 << 14, 1 + i % 4,
                                        _fault=("truncate", i % 30, 0)))
        path.write_bytes(good)
        stream = io_stream.stream_tensors(path, "cuda", ring_bytes=1 << 16, chunk_bytes=1 << 14)
        next(stream)
        stream.close()
        assert counters_are_zero()
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == device_before
    # The pinned cache may hold one more ring (slots freed while their last copy was pending), never one per run.
    pinned_after = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    assert pinned_after - pinned_before <= 1 << 16


def test_io_reexports_the_streaming_loader():
    """The streaming loader lives in lora_fast.io_stream; lora_fast.io keeps its two names (the documented API)."""
    from lora_fast.io import TensorStream, stream_tensors

    assert stream_tensors is io_stream.stream_tensors and TensorStream is io_stream.TensorStream
    assert {"stream_tensors", "TensorStream"} <= set(io.__all__)
