"""LoHa / LoKr / full-diff fuse vs LoRA fuse of the same weights on the CPU (C++ merge kernel), and the copy floor.

The weights are the 2-D views of SD1.5's attention projections and a few 3x3 convs (fp16), one fuse call per
algorithm over all of them (with records, as fuse_lora makes them); the time is the median of ``--repeats`` fuses
(each followed by an untimed unfuse). The floor is the same fuse with a rank-1 LoRA: the kernel's pass over the
weights (read, round, record, write) with almost no delta arithmetic.
Usage: python benchmarks/bench_lycoris.py [--rank 8] [--repeats 5] [--threads N]"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from lora_fast.kernels import merge as mk

SHAPES = [(320, 320)] * 8 + [(320, 768)] * 4 + [(640, 640)] * 8 + [(640, 768)] * 4 + [(1280, 1280)] * 8 + \
    [(1280, 768)] * 4 + [(320, 2880)] * 2 + [(640, 5760)] * 2 + [(1280, 11520)] * 2  # last three: 3x3 convs


def factor_pair(n: int):
    """(small, large) with small·large = n, small the largest divisor <= sqrt(n) (LyCORIS' factorization, -1)."""
    s = int(n ** 0.5)
    while n % s:
        s -= 1
    return s, n // s


def jobs_for(algo: str, weights, rank: int, g):
    out = []
    for w in weights:
        rows, cols = w.shape
        r = lambda *s: (torch.randn(*s, generator=g) * 0.05).half()  # noqa: E731
        if algo == "lora":
            out.append(mk.MergeJob(w, factors=[mk.Factor.of(r(rows, rank), r(rank, cols), 0.5)]))
        elif algo == "loha":
            out.append(mk.MergeJob(w, terms=[mk.Term("hada", r(rows, rank).float(), r(rows, rank).float(),
                                                     r(rank, cols).float(), r(rank, cols).float(), 0.5)]))
        elif algo == "lokr":
            a, c = factor_pair(rows)
            b, d = factor_pair(cols)
            out.append(mk.MergeJob(w, terms=[mk.Term("kron", r(a, b).float(), r(c, d).float(), scale=0.5)]))
        else:  # full diff, fp16 as LyCORIS saves it
            out.append(mk.MergeJob(w, terms=[mk.Term("kron", torch.ones(1, 1), r(rows, cols), scale=1.0)]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(s, generator=g).half() for s in SHAPES]
    nbytes = sum(w.numel() * 2 for w in weights)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, threads {args.threads}, "
          f"load average {os.getloadavg()[0]:.2f}; {len(weights)} fp16 weights, {nbytes / 2**20:.1f} MiB; rank {args.rank}")
    def timed(jobs):
        times = []
        for i in range(args.repeats + 1):
            t = time.perf_counter()
            recs, _ = mk.fuse(jobs, backend="cpu", num_threads=args.threads)
            dt = time.perf_counter() - t
            mk.unfuse(jobs, recs, backend="cpu", num_threads=args.threads)
            if i:
                times.append(dt)
        return statistics.median(times)

    # the floor: the same pass over the weights (read, round, record, write) with a rank-1 LoRA's arithmetic
    floor = timed(jobs_for("lora", weights, 1, g))
    print(f"{'floor (r1)':<10} {floor * 1e3:8.1f} ms")
    base = None
    for algo in ("lora", "loha", "lokr", "full"):
        med = timed(jobs_for(algo, weights, args.rank, g))
        base = base or med
        print(f"{algo:<10} {med * 1e3:8.1f} ms   {med / base:5.2f}x LoRA   {med / floor:5.2f}x floor")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
