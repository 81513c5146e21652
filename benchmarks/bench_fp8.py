"""fp8 (float8_e4m3fn / float8_e5m2) LoRA fuse and unfuse beside fp16 / bf16 on the CPU (C++ merge kernel), and the
exact-unfuse record size.

Weights: the 2-D views of SD1.5's attention projections and a few 3x3 convs (42 weights, 31.4 M elements), drawn
N(0, 1) * 0.05 (fp16/bf16 as they are; fp8 per-tensor scaled as fp8 checkpoints are: ``W_fp8 = rn(W / s)`` with
``s = max|W| / 448`` for e4m3fn, ``/ 57344`` for e5m2, so the kernel sees payloads spread over fp8's range and a
delta divided by ``s``). One ``merge.fuse`` call over all of them with records (as ``fuse_lora`` makes them), then
one ``merge.unfuse``; medians of ``--repeats``. The floor is the same fuse with a rank-1 LoRA (the pass over the
weights with almost no delta arithmetic).

Record size (``--records``): a random rank-8 delta scaled to 1%, 3%, 10% and 30% of mean |W| (in the dequantized
domain); the fraction of elements recorded and the record's bytes (row offsets, 16-bit columns, original bytes) as
a share of the fused weights' bytes.

Usage: python benchmarks/bench_fp8.py [--rank 4,32] [--repeats 5] [--threads N] [--records]"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from lora_fast.kernels import merge as mk

SHAPES = [(320, 320)] * 8 + [(320, 768)] * 4 + [(640, 640)] * 8 + [(640, 768)] * 4 + [(1280, 1280)] * 8 + \
    [(1280, 768)] * 4 + [(320, 2880)] * 2 + [(640, 5760)] * 2 + [(1280, 11520)] * 2
DTYPES = [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float8_e4m3fn: "fp8 e4m3fn", torch.float8_e5m2: "fp8 e5m2"}


def weights(dtype, seed=0):
    """[(stored weight, scale)]: fp16/bf16 with scale 1; fp8 per-tensor scaled."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for r, c in SHAPES:
        w = torch.randn(r, c, generator=g) * 0.05
        if dtype in FP8_MAX:
            s = float(w.abs().max()) / FP8_MAX[dtype]
            out.append(((w / s).to(dtype), s))
        else:
            out.append((w.to(dtype), 1.0))
    return out


def jobs_for(ws, rank, rel, seed=1):
    """A rank-``rank`` delta per weight of size ``rel`` · mean |W| (dequantized), the 1/scale folded into up."""
    g = torch.Generator().manual_seed(seed)
    jobs = []
    for w, s in ws:
        r, c = w.shape
        up, down = torch.randn(r, rank, generator=g), torch.randn(rank, c, generator=g)
        size = float((up[:64] @ down[:, :64]).abs().mean())
        target = rel * float(w[:64, :64].float().abs().mean()) * s
        jobs.append(mk.MergeJob(w, (up * (target / size / s)).contiguous(), down))
    return jobs


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_speed(args):
    print(f"{'dtype':<12} {'rank':>4} {'floor ms':>9} {'fuse ms':>9} {'unfuse ms':>10} {'fuse/floor':>10} "
          f"{'MiB':>6} {'rec %':>6}")
    for dtype in DTYPES:
        ws = weights(dtype)
        nbytes = sum(w.numel() * w.element_size() for w, _ in ws)
        floor_jobs = jobs_for(ws, 1, 0.1)
        for rank in args.rank:
            jobs = jobs_for(ws, rank, 0.1)
            fl, fu, un, rec = [], [], [], 0
            for _ in range(args.repeats):
                holder = {}
                fl.append(timed(lambda: holder.setdefault("r", mk.fuse(floor_jobs, record=True, check_finite=True,
                                                                       num_threads=args.threads))))
                mk.unfuse(floor_jobs, holder["r"][0], num_threads=args.threads)
                holder = {}
                fu.append(timed(lambda: holder.setdefault("r", mk.fuse(jobs, record=True, check_finite=True,
                                                                       num_threads=args.threads))))
                rec = holder["r"][0].nbytes()
                un.append(timed(lambda: mk.unfuse(jobs, holder["r"][0], num_threads=args.threads)))
            f, u, p = (statistics.median(v) * 1e3 for v in (fu, un, fl))
            print(f"{NAMES[dtype]:<12} {rank:>4} {p:>9.1f} {f:>9.1f} {u:>10.1f} {f / p:>10.2f} "
                  f"{nbytes / 2**20:>6.1f} {100 * rec / nbytes:>6.1f}", flush=True)


def bench_records(args):
    rels = (0.01, 0.03, 0.1, 0.3)
    print(f"{'dtype':<12} " + " ".join(f"{'Δ=' + str(int(r * 100)) + '%':>16}" for r in rels)
          + "   (elements recorded / record bytes as % of fused-weight bytes)")
    for dtype in DTYPES:
        cells = []
        for rel in rels:
            ws = weights(dtype)
            jobs = jobs_for(ws, 8, rel)
            recs, _ = mk.fuse(jobs, record=True, num_threads=args.threads)
            n = sum(w.numel() for w, _ in ws)
            nbytes = sum(w.numel() * w.element_size() for w, _ in ws)
            cells.append(f"{100 * recs.count() / n:6.2f} / {100 * recs.nbytes() / nbytes:6.1f}")
            mk.unfuse(jobs, recs, num_threads=args.threads)
        print(f"{NAMES[dtype]:<12} " + " ".join(f"{c:>16}" for c in cells), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank", type=lambda s: [int(x) for x in s.split(",")], default=[4, 32])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--records", action="store_true", help="only the record-size table")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()}")
    bench_records(args)
    if not args.records:
        bench_speed(args)
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
