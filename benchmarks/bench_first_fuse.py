"""The first fuse of a process on a cold Triton cache: probe, kernel compiles and the fuse, with and without the
variants compiled ahead in parallel.

    python benchmarks/bench_first_fuse.py --device cuda --out first_fuse.json
    python benchmarks/bench_first_fuse.py --device cpu --scale 0.02   # interpreted, a smoke run

Each case runs in a fresh process with its own Triton cache directory, so nothing is compiled before it starts:
``parallel`` (the default: the probe's variants and the new launch group's compiled several at once before their
launches), ``serial`` (``LORA_FAST_PARALLEL_COMPILE=0``: each compiled at its first launch) and ``warm disk cache``
(``parallel`` again on the cache the first case filled: what a later process on the same machine pays). Per case:
the first recording fuse (probe + compiles + fuse) and the first unfuse of rank-32 LoRA factors on every linear of
``--blocks`` SDXL transformer blocks per width, then a repeated fuse (one launch: nothing left to compile). Wall
clock after a device synchronization; nothing is asserted about the times. The figures mean something on CUDA only
(on the CPU the kernels are interpreted and nothing is compiled).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def one_process(args) -> dict:
    import torch

    sys.path.insert(0, HERE)
    from bench_merge_tiles import sdxl_block_shapes

    from lora_fast.kernels import merge as M

    dev = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    jobs = []
    for c in (640, 1280):
        for r, k in sdxl_block_shapes(c) * args.blocks:
            r, k = max(1, int(r * args.scale)), max(1, int(k * args.scale))
            w = (torch.randn(r, k, generator=gen) * 0.02).half().to(dev)
            b = (torch.randn(r, 32, generator=gen) * 0.02).half().to(dev)
            a = (torch.randn(32, k, generator=gen) * 0.02).half().to(dev)
            jobs.append(M.MergeJob(w, factors=[M.Factor.of(b, a, 1.0)]))
    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    sync()

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - t, out

    cache = M.FuseCache()
    res = {"layers": len(jobs)}
    res["first_fuse_s"], (recs, _) = timed(lambda: M.fuse(jobs, backend="triton", cache=cache))
    res["first_unfuse_s"], _ = timed(lambda: M.unfuse(jobs, recs))
    res["repeat_fuse_s"], (recs, _) = timed(lambda: M.fuse(jobs, backend="triton", cache=cache))
    M.unfuse(jobs, recs)
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--blocks", type=int, default=1)
    p.add_argument("--scale", type=float, default=1.0, help="shrink every layer's shape (a smoke run)")
    p.add_argument("--out", default="first_fuse.json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(one_process(args)))
        return 0
    import torch
    import triton

    cuda = args.device.startswith("cuda")
    results = {"device": torch.cuda.get_device_name(args.device) if cuda else "cpu (interpreted)", "torch": torch.__version__,
               "triton": triton.__version__, "cpus": len(os.sched_getaffinity(0)), "cases": {}}
    with tempfile.TemporaryDirectory() as par_dir, tempfile.TemporaryDirectory() as ser_dir:
        for name, cache_dir, parallel in (("parallel", par_dir, "1"), ("serial", ser_dir, "0"),
                                          ("warm disk cache", par_dir, "1")):
            env = dict(os.environ, TRITON_CACHE_DIR=cache_dir, LORA_FAST_PARALLEL_COMPILE=parallel)
            if not cuda:
                env["TRITON_INTERPRET"] = "1"
            proc = subprocess.run([sys.executable, __file__, "--child", "--device", args.device, "--blocks",
                                   str(args.blocks), "--scale", str(args.scale)], capture_output=True, text=True,
                                  env=env, timeout=600)
            if proc.returncode != 0:
                print(proc.stdout[-3000:], proc.stderr[-3000:])
                return 1
            res = results["cases"][name] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{name:>16}: first fuse {res['first_fuse_s']:.2f} s, first unfuse {res['first_unfuse_s']:.3f} s, "
                  f"repeat fuse {res['repeat_fuse_s'] * 1e3:.1f} ms ({res['layers']} layers)", flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
