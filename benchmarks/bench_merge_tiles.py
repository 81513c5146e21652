"""The Triton merge kernel alone, at SDXL's transformer-linear shapes, for each tile configuration in one run.

    python benchmarks/bench_merge_tiles.py --device cuda --out merge_tiles.json
    python benchmarks/bench_merge_tiles.py --device cpu --blocks 1 --scale 0.02   # interpreted, a smoke run

Each configuration (``LORA_FAST_MERGE_TILE`` rows x columns x warps, ``LORA_FAST_MERGE_UNROLL``) runs in its own
process, because the tile shape is read at import. Per configuration, on the same jobs (rank-32 LoRA factors in the
weights' dtype on every linear of ``--blocks`` SDXL transformer blocks at widths 640 and 1280, deltas about 3% of
|W|): the first recording fuse (table, counting pass, scan, host read, writing pass), the repeated fuse at cached
record positions (one writing launch, what ``fuse_lora`` does when a server switches among adapters), the unfuse
(one launch that restores the records), a fuse without records (``lora-fast merge``), and the device's copy floor
for the same bytes (read + write of the weights, measured with ``copy_`` in the same process). A digest of the fused
weights and of the records must be the same for every configuration (the bits do not depend on the tiling), and
the unfuse must give back the original weights. Timings are CUDA-event medians; nothing is asserted about them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = ["32x128x16", "32x128x8", "16x128x8", "32x64x8", "64x128x16", "32x128x16/unroll64"]
# SDXL transformer linears per block at width C (attention q/k/v/out, cross-attention q/out, k/v from 2048-d text,
# GEGLU proj 2*4C x C, ff out C x 4C, proj_in/out), rank 32
def sdxl_block_shapes(c: int) -> list:
    return [(c, c)] * 4 + [(c, c)] * 2 + [(c, 2048)] * 2 + [(8 * c, c), (c, 4 * c), (c, c), (c, c)]


def one_config(args) -> dict:
    import torch

    from lora_fast.kernels import merge as M

    dev = torch.device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    gen = torch.Generator().manual_seed(0)
    shapes = []
    for c in (640, 1280):
        for _ in range(args.blocks):
            shapes += sdxl_block_shapes(c)
    shapes = [(max(1, int(r * args.scale)), max(1, int(c * args.scale))) for r, c in shapes]
    weights, originals, jobs = [], [], []
    for r, c in shapes:
        w = (torch.randn(r, c, generator=gen) * 0.02).to(dtype)
        b = (torch.randn(r, 32, generator=gen) * 0.02).to(dtype)
        a = (torch.randn(32, c, generator=gen) * 0.02).to(dtype)
        w, b, a = w.to(dev), b.to(dev), a.to(dev)
        weights.append(w)
        originals.append(w.clone())
        jobs.append(M.MergeJob(w, factors=[M.Factor.of(b, a, 1.0)]))
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    cuda = dev.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(fn, reps):
        out = []
        for _ in range(reps):
            sync()
            if cuda:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                fn()
                e1.record()
                e1.synchronize()
                out.append(e0.elapsed_time(e1) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t)
        return statistics.median(out)

    res = {"config": os.environ.get("LORA_FAST_MERGE_TILE", "default") + "/unroll" + str(M.RANK_UNROLL_MAX),
           "tile": [M.BLOCK_M, M.BLOCK_N, M.NUM_WARPS], "layers": len(jobs), "weight_bytes": nbytes}
    t = time.perf_counter()
    cache = M.FuseCache()
    recs, _ = M.fuse(jobs, backend="triton", cache=cache)
    sync()
    res["first_fuse_s_with_compile"] = time.perf_counter() - t
    plan = cache.scans[0].plan
    res["spec"] = plan.spec
    h = hashlib.sha256()
    for w in weights:
        h.update(w.view(torch.uint8 if dtype != torch.float32 else torch.int32).cpu().numpy().tobytes())
    res["fused_digest"] = h.hexdigest()[:16]
    res["record_elements"] = recs.count()
    res["record_bytes"] = recs.nbytes()
    res["record_share"] = recs.nbytes() / nbytes
    rh = hashlib.sha256()
    for r in recs:
        rh.update(r.flat_index().cpu().numpy().tobytes())
    res["record_digest"] = rh.hexdigest()[:16]
    M.unfuse(jobs, recs)
    sync()
    res["exact_unfuse"] = all(torch.equal(w.view(torch.int8) if w.element_size() == 1 else w, o)
                              for w, o in zip(weights, originals))

    state = {}

    def fuse_first():
        cache.clear()
        state["r"], _ = M.fuse(jobs, backend="triton", cache=cache)

    def fuse_cached():
        state["r"], _ = M.fuse(jobs, backend="triton", cache=cache)

    def unfuse():
        M.unfuse(jobs, state["r"])

    def fuse_plain():
        M.fuse(jobs, backend="triton", record=False)

    def fuse_safe():
        state["r"], _ = M.fuse(jobs, backend="triton", cache=cache, check_finite=True, abort_nonfinite=True)

    reps = args.reps
    firsts, cached, unfuses, safes = [], [], [], []
    for _ in range(reps):
        firsts.append(timed(fuse_first, 1))
        unfuses.append(timed(unfuse, 1))
        cached.append(timed(fuse_cached, 1))
        unfuses.append(timed(unfuse, 1))
        safes.append(timed(fuse_safe, 1))
        unfuses.append(timed(unfuse, 1))
    res["first_fuse_s"] = statistics.median(firsts)
    res["cached_fuse_s"] = statistics.median(cached)
    res["unfuse_s"] = statistics.median(unfuses)
    res["safe_fuse_s"] = statistics.median(safes)
    plain = timed(fuse_plain, 1)  # not undone: last
    res["plain_fuse_s"] = plain
    x = torch.empty(nbytes // 4, dtype=torch.int32, device=dev)
    y = torch.empty_like(x)
    res["copy_floor_s"] = timed(lambda: y.copy_(x), max(3, reps))
    res["cached_fuse_x_floor"] = res["cached_fuse_s"] / res["copy_floor_s"]
    res["unfuse_x_floor"] = res["unfuse_s"] / res["copy_floor_s"]
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    p.add_argument("--blocks", type=int, default=10, help="transformer blocks per width (SDXL: 10 at 1280, 2 at 640)")
    p.add_argument("--scale", type=float, default=1.0, help="shrink every shape (CPU smoke runs)")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--out", default=None)
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(one_config(args)), flush=True)
        return 0
    results = []
    for cfg in args.configs.split(","):
        tile, _, unroll = cfg.partition("/unroll")
        env = dict(os.environ, LORA_FAST_MERGE_TILE=tile, LORA_FAST_MERGE_UNROLL=unroll or "0")
        cmd = [sys.executable, os.path.abspath(__file__), "--one", "--device", args.device, "--dtype", args.dtype,
               "--blocks", str(args.blocks), "--scale", str(args.scale), "--reps", str(args.reps)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            results.append({"config": cfg, "error": (proc.stdout + proc.stderr)[-3000:]})
            print(f"{cfg}: FAILED\n{results[-1]['error']}", flush=True)
            continue
        r = json.loads(line[0][7:])
        r["config"] = cfg
        results.append(r)
        print(f"{cfg:>22}: first {r['first_fuse_s'] * 1e3:8.2f} ms  cached {r['cached_fuse_s'] * 1e3:8.2f} ms "
              f"({r['cached_fuse_x_floor']:.1f}x floor)  unfuse {r['unfuse_s'] * 1e3:8.2f} ms "
              f"({r['unfuse_x_floor']:.1f}x)  safe {r['safe_fuse_s'] * 1e3:8.2f} ms  plain "
              f"{r['plain_fuse_s'] * 1e3:8.2f} ms  floor {r['copy_floor_s'] * 1e3:6.2f} ms  record "
              f"{100 * r['record_share']:.1f}%  exact {r['exact_unfuse']}  digest {r['fused_digest']}/"
              f"{r['record_digest']}", flush=True)
    ok = [r for r in results if "error" not in r]
    same = len({(r["fused_digest"], r["record_digest"]) for r in ok}) <= 1
    print(f"same fused bits and records for every configuration: {same}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": args.device, "dtype": args.dtype, "results": results, "same_bits": same}, f, indent=1)
    return 0 if ok and same and all(r["exact_unfuse"] for r in ok) and len(ok) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
