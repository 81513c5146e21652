"""Loading safetensors files: lora_fast.io.load_file against safetensors and fastsafetensors, with a measured floor.

    python benchmarks/bench_io.py                       # all sizes, warm page cache (+ cold where caches can drop)
    python benchmarks/bench_io.py --sizes lora-3M,lora-400M --repeats 5 --json out.json
    python benchmarks/bench_io.py --tune                # measure the CPU ring defaults (ring/chunk/threads)

A CPU load counts until every byte of every tensor has been read (mmap-based loaders only map lazily): each loader's
tensors are summed as int64 words. The floor, measured in the same run, is a plain sequential read of the file into a
reused 8 MiB buffer. "Cold" runs drop the page cache first (echo 3 > /proc/sys/vm/drop_caches; skipped when refused).
With CUDA, a GPU section measures pinned host-to-device bandwidth in the same run and loads each file to the device.
Files are synthesized once into --dir (LoRA-like rank-32 pairs, or UNet-like weight shapes; fp16, random bytes).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from lora_fast import io, io_stream  # noqa: E402

MB = 1 << 20
SIZES = {"lora-3M": 3 * MB, "lora-50M": 50 * MB, "lora-400M": 400 * MB, "model-2G": 2048 * MB, "model-5G": 5 * 1024 * MB}


# ------------------------------------------------------------------------------------------------- files


def _lora_shapes(total: int):
    """Rank-32 down/up pairs over SDXL-like widths until `total` bytes of fp16."""
    widths = [(640, 640), (1280, 1280), (640, 2048), (1280, 2048), (5120, 1280), (1280, 5120), (10240, 1280)]
    i, size = 0, 0
    while size < total:
        out_f, in_f = widths[i % len(widths)]
        for name, shape in ((f"lora_unet_block_{i}.lora_down.weight", (32, in_f)),
                            (f"lora_unet_block_{i}.lora_up.weight", (out_f, 32))):  # fmt: skip
            yield name, shape
            size += shape[0] * shape[1] * 2
        yield f"lora_unet_block_{i}.alpha", ()
        i += 1


def _model_shapes(total: int):
    """UNet-like weights (attention/feed-forward matrices, 3x3 convs, norms and biases) until `total` bytes of fp16."""
    block = [((1280, 1280), 4), ((5120, 1280), 1), ((1280, 5120), 1), ((1280, 1280, 3, 3), 1), ((1280,), 6),
             ((640, 640), 4), ((640, 640, 3, 3), 1), ((2560, 640), 1), ((640,), 4)]  # fmt: skip
    size, i = 0, 0
    while size < total:
        for kind, (shape, count) in enumerate(block):
            for j in range(count):
                n = 1
                for d in shape:
                    n *= d
                yield f"block_{i}.param_{kind}_{j}", shape
                size += 2 * n
                if size >= total:
                    return
        i += 1


def make_file(path: str, kind: str, total: int) -> None:
    """Writes the file in pieces (a 5 GB file never sits in memory): padded header as safetensors writes it, then
    random fp16 bit patterns. Tensors are laid out in name order, all F16, so the layout is the writer's."""
    shapes = sorted((_lora_shapes if kind.startswith("lora") else _model_shapes)(total))
    header, offset = {}, 0
    for name, shape in shapes:
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    pool = torch.randint(0, 256, (16 * MB,), dtype=torch.uint8).numpy().tobytes()
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        left = offset
        while left:
            piece = pool[: min(left, len(pool))]
            f.write(piece)
            left -= len(piece)
    io.read_header(tmp)  # valid by our own strict reader
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------- measuring


def touch(tensors) -> int:
    """Read every byte of every tensor (as int64 words, plus unaligned head/tail bytes); returns a checksum.

    numpy, single-threaded: torch's OpenMP reductions on small tensors cost more than the bytes on 2 busy cores."""
    acc = 0
    for t in tensors:
        n = t.numel() * t.element_size()
        if n == 0:
            continue
        raw = (t.reshape(-1) if t.dim() else t.reshape(1)).view(torch.uint8).numpy()
        head = min((-t.data_ptr()) % 8, n)
        words = (n - head) // 8
        acc += int(raw[:head].sum()) + int(raw[head + 8 * words :].sum())
        if words:
            acc += int(np.frombuffer(raw, dtype=np.int64, count=words, offset=head).sum())
    return acc


def sequential_read(path: str) -> int:
    buf = bytearray(8 * MB)
    view = memoryview(buf)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            got = f.readinto(view)
            if not got:
                return total
            total += got


def can_drop_caches() -> bool:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def timed(fn, repeats: int, cold: bool) -> list[float]:
    times = []
    for _ in range(repeats):
        gc.collect()
        if cold:
            drop_caches()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def cpu_loaders(ring: bool, fast: bool):
    from safetensors import safe_open
    from safetensors.torch import load_file as st_load_file

    def lora_fast_mmap(path):
        touch(io.load_file(path).values())

    def lora_fast_ring(path):
        touch(io.load_file(path, ring_bytes=io_stream._CPU_RING["ring_bytes"]).values())

    def safetensors_load_file(path):
        touch(st_load_file(path).values())

    def safetensors_safe_open(path):
        with safe_open(path, framework="pt") as f:
            touch(f.get_tensor(k) for k in f.keys())

    loaders = {
        "lora_fast.load_file": lora_fast_mmap,
        "safetensors.torch.load_file": safetensors_load_file,
        "safetensors.safe_open": safetensors_safe_open,
    }
    if ring:
        loaders["lora_fast.load_file(ring_bytes=default)"] = lora_fast_ring
    if fast:
        try:
            from fastsafetensors import fastsafe_open

            def fastsafetensors_open(path):
                with fastsafe_open(path, nogds=True, device="cpu") as f:
                    touch(f.get_tensor(k) for k in f.keys())

            loaders["fastsafetensors(nogds)"] = fastsafetensors_open
        except Exception as e:  # not installed or not loadable here
            print(f"fastsafetensors unavailable: {e}", file=sys.stderr)
    return loaders


def bench_cpu(files: dict, repeats: int, cold_ok: bool, cold_max: int, ring: bool, fast: bool) -> list[dict]:
    """Per file and cache mode: the floor and every loader, interleaved within each repeat (so that drift in a shared
    machine's load hits all alike); the median per method is reported."""
    rows = []
    loaders = cpu_loaders(ring, fast)
    for label, path in files.items():
        size = os.path.getsize(path)
        modes = ["warm"] + (["cold"] if cold_ok and size <= cold_max else [])
        for mode in modes:
            cold = mode == "cold"
            methods = {"sequential read (floor)": lambda p: sequential_read(p), **loaders}
            sequential_read(path)  # warm the page cache
            for name, fn in list(methods.items()):
                try:
                    fn(path)  # warm-up run (also proves it works)
                except Exception as e:
                    print(f"{name} failed on {label}: {e}", file=sys.stderr)
                    del methods[name]
            times = {name: [] for name in methods}
            for _ in range(repeats * (5 if size < 64 * MB else 1)):  # small files: more samples, same cost
                for name, fn in methods.items():
                    times[name] += timed(lambda: fn(path), 1, cold)
            floor = statistics.median(times["sequential read (floor)"])
            for name, ts in times.items():
                t = statistics.median(ts)
                rows.append(dict(file=label, bytes=size, cache=mode, method=name, seconds=t, vs_floor=t / floor,
                                 all_seconds=ts))  # fmt: skip
    return rows


def bench_gpu(files: dict, repeats: int) -> dict:
    from safetensors.torch import load_file as st_load_file

    dev = torch.device("cuda")
    n = 1 << 30
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    devbuf = torch.empty(n, dtype=torch.uint8, device=dev)

    def h2d():
        devbuf.copy_(host, non_blocking=True)
        torch.cuda.synchronize()

    h2d()
    h2d_s = statistics.median(timed(h2d, 5, False))
    del host, devbuf
    out = {"device": torch.cuda.get_device_name(), "pinned_h2d_GBps": n / h2d_s / 1e9, "rows": []}

    def ours(path):
        io.load_file(path, "cuda")
        torch.cuda.synchronize()

    def theirs(path):
        st_load_file(path, device="cuda")
        torch.cuda.synchronize()

    loaders = {"lora_fast.load_file(cuda)": ours, "safetensors.torch.load_file(cuda)": theirs}
    try:
        from fastsafetensors import fastsafe_open

        def fst(path):
            with fastsafe_open(path, nogds=True, device="cuda:0") as f:
                for k in f.keys():
                    f.get_tensor(k)
            torch.cuda.synchronize()

        loaders["fastsafetensors(nogds, cuda)"] = fst
    except Exception:
        pass
    for label, path in files.items():
        size = os.path.getsize(path)
        sequential_read(path)
        for name, fn in loaders.items():
            try:
                fn(path)
                t = statistics.median(timed(lambda: fn(path), repeats, False))
            except Exception as e:
                print(f"{name} failed on {label}: {e}", file=sys.stderr)
                continue
            gc.collect()
            torch.cuda.empty_cache()
            out["rows"].append(dict(file=label, bytes=size, method=name, seconds=t, GBps=size / t / 1e9,
                                    of_pinned_h2d=size / t / 1e9 / out["pinned_h2d_GBps"]))  # fmt: skip
    return out


def tune(path: str, repeats: int) -> list[dict]:
    """Grid over the CPU ring knobs on one warm file (load + touch). Configurations are interleaved within each
    repeat so that drift in the machine's load hits all of them alike; the median per configuration is kept."""
    sequential_read(path)
    grid = [(ring, chunk, threads)
            for ring, chunk, threads in itertools.product([1 * MB, 2 * MB, 4 * MB, 16 * MB], [128 << 10, 256 << 10, 1 * MB], [1, 2, 3])
            if chunk * 2 <= ring]  # fmt: skip
    times = {cfg: [] for cfg in grid}
    for _ in range(repeats + 1):  # the first round is a warm-up
        for ring, chunk, threads in grid:
            gc.collect()
            t0 = time.perf_counter()
            touch(io.load_file(path, ring_bytes=ring, chunk_bytes=chunk, threads=threads).values())
            times[(ring, chunk, threads)].append(time.perf_counter() - t0)
    rows = []
    for (ring, chunk, threads), ts in sorted(times.items(), key=lambda kv: statistics.median(kv[1][1:])):
        t = statistics.median(ts[1:])
        rows.append(dict(ring_bytes=ring, chunk_bytes=chunk, threads=threads, seconds=t))
        print(f"ring {ring >> 20:3d} MiB  chunk {chunk >> 10:5d} KiB  threads {threads}  {t * 1e3:8.1f} ms")
    return rows


def machine() -> dict:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import safetensors

    return dict(cpu=cpu, cores=os.cpu_count(), mem_GB=round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
                kernel=platform.release(), torch=torch.__version__, safetensors=safetensors.__version__,
                torch_threads=torch.get_num_threads(), cuda=torch.cuda.is_available())  # fmt: skip


def print_table(rows: list[dict]) -> None:
    print(f"{'file':10} {'cache':5} {'method':42} {'time':>10} {'GB/s':>7} {'vs floor':>8} {'vs st':>6}")
    ref = {(r["file"], r["cache"]): r["seconds"] for r in rows if r["method"] == "safetensors.torch.load_file"}
    for r in rows:
        vs_st = r["seconds"] / ref[(r["file"], r["cache"])] if (r["file"], r["cache"]) in ref else float("nan")
        print(f"{r['file']:10} {r['cache']:5} {r['method']:42} {r['seconds'] * 1e3:8.1f}ms "
              f"{r['bytes'] / r['seconds'] / 1e9:7.2f} {r.get('vs_floor', 1.0):8.2f} {vs_st:6.2f}")  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated subset of {list(SIZES)}")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "lora_fast_bench_io"))
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--no-cold", action="store_true", help="skip cold-cache runs")
    p.add_argument("--cold-max-bytes", type=int, default=2048 * MB, help="largest file to time cold")
    p.add_argument("--no-ring", action="store_true", help="skip the CPU ring loader")
    p.add_argument("--no-fastsafetensors", action="store_true")
    p.add_argument("--tune", action="store_true", help="grid-search the CPU ring knobs on the lora-400M file")
    p.add_argument("--delete", action="store_true", help="delete the synthesized files afterwards")
    args = p.parse_args(argv)

    os.makedirs(args.dir, exist_ok=True)
    labels = [s for s in args.sizes.split(",") if s]
    if args.tune:
        labels = ["lora-400M"]
    files = {}
    for label in labels:
        path = os.path.join(args.dir, f"{label}.safetensors")
        if not os.path.exists(path):
            print(f"writing {path} ...", flush=True)
            make_file(path, label, SIZES[label])
        files[label] = path

    result = {"machine": machine()}
    if args.tune:
        result["tune"] = tune(files["lora-400M"], args.repeats)
    else:
        cold_ok = not args.no_cold and can_drop_caches()
        result["cold_cache_runs"] = cold_ok
        result["cpu"] = bench_cpu(files, args.repeats, cold_ok, args.cold_max_bytes, not args.no_ring,
                                  not args.no_fastsafetensors)  # fmt: skip
        print(json.dumps(result["machine"]))
        print_table(result["cpu"])
        if torch.cuda.is_available():
            result["gpu"] = bench_gpu(files, args.repeats)
            g = result["gpu"]
            print(f"GPU {g['device']}: pinned H2D {g['pinned_h2d_GBps']:.1f} GB/s")
            for r in g["rows"]:
                print(f"{r['file']:10} {r['method']:36} {r['seconds'] * 1e3:8.1f}ms {r['GBps']:6.2f} GB/s "
                      f"{100 * r['of_pinned_h2d']:5.1f}% of pinned H2D")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.delete:
        for path in files.values():
            os.remove(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
