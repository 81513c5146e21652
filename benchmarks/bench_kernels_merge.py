"""CPU fused-merge kernel vs the machine floor, measured in the same run.

floor = max(bytes moved / copy bandwidth, 2·rows·cols·R / fp32 matmul FLOP rate)
  bytes moved = read + write of W, plus up and down; copy bandwidth from torch copy_ over a working set as large
  as the benchmark's (so both see the same cache level); FLOP rate from a 2048³ torch fp32 matmul.

Run standalone (``python benchmarks/bench_kernels_merge.py [--mb 256] [--threads N]``) for the table, or under
pytest-benchmark (``pytest benchmarks/bench_kernels_merge.py --benchmark-only``; the module is outside testpaths).
Each weight is fused with records (and the NaN/Inf check), then unfused, so it is left unchanged.
``records`` is the fraction of elements recorded and ``rec %`` the record's bytes as a share of the fused weights'
bytes. ``--records`` prints only the record-memory table (deltas of 1%, 3%, 10% of mean |W|).

With one thread (the default) every time is the calling thread's CPU time (``time.thread_time``): the kernel, the
matmul and the copy all run inline on that thread, and CPU time is not inflated when other processes share the
machine. With ``--threads N > 1`` wall-clock time is used for all three.
"""

from __future__ import annotations

import argparse
import gc
import time

import torch

from lora_fast.kernels import merge as M

SHAPES = [(320, 320), (640, 640), (1280, 1280), (1280, 5120), (5120, 1280)]  # SD1.5-like
RANKS = [4, 32]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


CLOCK = time.thread_time


def best_of(fn, reps=5):
    fn()
    best = float("inf")
    for _ in range(reps):
        t = CLOCK()
        fn()
        best = min(best, CLOCK() - t)
    return best


def machine_floor(working_set_bytes: int):
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    flops = 2 * 2048**3 / best_of(lambda: a @ b)
    x = torch.empty(working_set_bytes // 8)  # read + write = the working set
    y = torch.empty_like(x)
    bw = 2 * x.numel() * 4 / best_of(lambda: y.copy_(x))
    return flops, bw


def typical_jobs(rows, cols, rank, dtype, total_bytes, rel_delta=0.03, gen=None):
    """Enough copies of one shape to fill total_bytes; delta scaled to rel_delta of mean |W| (a typical LoRA)."""
    n = max(1, total_bytes // (rows * cols * dtype.itemsize))
    jobs = []
    for _ in range(n):
        w = (torch.randn(rows, cols, generator=gen) * 0.02).to(dtype)
        up = torch.randn(rows, rank, generator=gen)
        down = torch.randn(rank, cols, generator=gen)
        scale = rel_delta * 0.02 * 0.8 / (rank**0.5)  # E|W| ≈ 0.8σ; |up@down| ≈ sqrt(R) per unit factors
        jobs.append(M.MergeJob(w, up * scale, down.contiguous()))
    return jobs


def run(mb: int = 256, threads: int = 1):
    global CLOCK
    torch.set_num_threads(threads)
    CLOCK = time.thread_time if threads == 1 else time.perf_counter
    nt = torch.get_num_threads()
    flops, bw = machine_floor(mb << 20)
    from lora_fast import _C

    print(f"threads {nt}, ISA {_C.merge_cpu_isa()}, fp32 matmul {flops / 1e9:.0f} GFLOP/s, "
          f"copy {bw / 1e9:.1f} GB/s (read+write, {mb} MiB working set); "
          f"{'thread CPU time' if threads == 1 else 'wall time'}")
    print(f"{'shape':>11} {'R':>3} {'dtype':>8} {'fuse ms':>8} {'floor ms':>8} {'ratio':>6} {'unfuse':>6} {'records':>8} "
          f"{'rec %':>6}")
    g = torch.Generator().manual_seed(0)
    rows_out = []
    for rows, cols in SHAPES:
        for rank in RANKS:
            for dtype in DTYPES:
                jobs = typical_jobs(rows, cols, rank, dtype, mb << 20, gen=g)
                elems = sum(j.weight.numel() for j in jobs)
                moved = sum(2 * j.weight.numel() * dtype.itemsize + 4 * rank * (rows + cols) for j in jobs)
                floor = max(moved / bw, 2 * elems * rank / flops)
                t_fuse = float("inf")
                t_unfuse = float("inf")
                frac = 0.0
                rec_bytes = 0
                gc.collect()
                gc.disable()  # a collection walking torch's object graph mid-call is not kernel time
                for _ in range(3):
                    t = CLOCK()
                    recs, _ = M.fuse(jobs, record=True, check_finite=True, num_threads=nt)
                    t_fuse = min(t_fuse, CLOCK() - t)
                    frac = sum(len(r) for r in recs) / elems
                    rec_bytes = sum(r.nbytes() for r in recs)
                    t = CLOCK()
                    M.unfuse(jobs, recs, num_threads=nt)
                    t_unfuse = min(t_unfuse, CLOCK() - t)
                gc.enable()
                name = str(dtype).replace("torch.", "")
                print(f"{rows:>5}x{cols:<5} {rank:>3} {name:>8} {t_fuse * 1e3:8.2f} {floor * 1e3:8.2f} "
                      f"{t_fuse / floor:6.2f} {t_unfuse / floor:6.2f} {frac:8.4f} "
                      f"{100 * rec_bytes / (elems * dtype.itemsize):6.2f}")
                rows_out.append((rows, cols, rank, name, t_fuse, floor, t_unfuse, frac))
    return rows_out


def record_memory(shapes=((320, 320), (1280, 1280), (1280, 5120)), rank=8, rels=(0.01, 0.03, 0.1)):
    """Exact-unfuse record size for typical deltas: fraction recorded, bytes per record (row offsets included) and
    the record's bytes as a share of the fused weights' bytes, per dtype and delta size (shapes pooled)."""
    g = torch.Generator().manual_seed(1)
    print(f"record memory, rank {rank}, shapes {list(shapes)} pooled")
    print(f"{'dtype':>8} {'delta':>6} {'recorded':>9} {'B/record':>9} {'% of W bytes':>13}")
    out = []
    for dtype in DTYPES:
        for rel in rels:
            n_rec = n_bytes = n_elems = 0
            for rows, cols in shapes:
                (job,) = typical_jobs(rows, cols, rank, dtype, 1, rel_delta=rel, gen=g)
                (rec,), _ = M.fuse([job])
                n_rec += len(rec)
                n_bytes += rec.nbytes()
                n_elems += job.weight.numel()
            name = str(dtype).replace("torch.", "")
            pct = 100 * n_bytes / (n_elems * dtype.itemsize)
            print(f"{name:>8} {rel:6.0%} {n_rec / n_elems:9.4f} {n_bytes / max(n_rec, 1):9.2f} {pct:13.2f}")
            out.append((name, rel, n_rec / n_elems, n_bytes / max(n_rec, 1), pct))
    return out


def test_bench_fuse_sd15_like(benchmark):
    """pytest-benchmark entry: fuse+unfuse of a 1280x5120 fp16 weight set at rank 32."""
    jobs = typical_jobs(1280, 5120, 32, torch.float16, 64 << 20)

    def cycle():
        recs, _ = M.fuse(jobs, record=True)
        M.unfuse(jobs, recs)

    benchmark(cycle)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=256, help="working set per case in MiB")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--records", action="store_true", help="only the record-memory table")
    args = ap.parse_args()
    if args.records:
        record_memory()
    else:
        run(args.mb, args.threads)
