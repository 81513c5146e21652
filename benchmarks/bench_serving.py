"""Serving mixed-adapter traffic: per-sample batching vs fuse-per-adapter vs diffusers' set_adapters per request.

    python benchmarks/bench_serving.py                                  # tiny random SD1.5 pipeline, CPU, fp32
    python benchmarks/bench_serving.py --requests 16 --steps 2          # quick check of the script
    python benchmarks/bench_serving.py --device cuda --dtype fp16 --size 64 --requests 128 --json out.json

Traffic: ``--requests`` single-adapter requests over ``--adapters`` random LoRA files (lora_fast.serve.demo), each
request's adapter drawn with uniform or Zipf(``--zipf``) popularity (adapter k with probability ~ 1/k^s), a prompt
from a small set and its own seed. ``--clients`` closed-loop clients: each has one request outstanding and sends
its next one when the previous completes; latency is completion minus submission (queueing included), throughput
is requests over the wall time of the run. Modes, all in this process on pipelines with the same weights:

  per_sample  lora_fast.serve.BatchRunner(mode="per_sample"): up to ``--batch`` queued requests, one pipeline call,
              each sample with its own adapter (lora_fast.per_sample_adapters)
  fuse        BatchRunner(mode="fuse"): up to ``--batch`` queued requests, grouped by adapter, one call per group
              with that adapter fused into the weights (exact unfuse before the next)
  diffusers   diffusers alone (PEFT backend): every adapter loaded with pipe.load_lora_weights(path,
              adapter_name=...) once before the run, then per request pipe.set_adapters([id], [1.0]) and one
              batch-1 pipeline call, one request at a time

The BatchRunner is what one Ray Serve replica (lora_fast.serve.LoraDiffusionServer) runs per ``@serve.batch``;
Ray itself is left out so the figures measure the batching, not Ray's overhead on a small machine. The adapters
are resident before timing in every mode (device budget: all of them). Outputs are latents (no VAE decode / PNG).
One request's latents are compared across the three modes as a correctness check.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lora_fast  # noqa: E402
from lora_fast.bench import _cpu_name  # noqa: E402
from lora_fast.cache import adapter_nbytes  # noqa: E402
from lora_fast.serve.demo import tiny_pipeline, write_adapters  # noqa: E402
from lora_fast.serve.runner import BatchRunner, GenerationRequest, decode_npy  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PROMPTS = ("a red cat", "a blue dog on the grass", "a house by the sea", "an old oak tree in winter")
MODES = ("per_sample", "fuse", "diffusers")


def traffic(dist: str, n: int, names, zipf_s: float, seed: int, args) -> list[GenerationRequest]:
    rng = np.random.default_rng(seed)
    k = np.arange(1, len(names) + 1, dtype=np.float64)
    p = np.full(len(names), 1.0 / len(names)) if dist == "uniform" else (1.0 / k ** zipf_s) / (1.0 / k ** zipf_s).sum()
    picks = rng.choice(len(names), size=n, p=p)
    return [GenerationRequest(prompt=PROMPTS[int(rng.integers(len(PROMPTS)))], adapter=names[int(a)],
                              seed=int(rng.integers(1 << 31)), steps=args.steps, height=args.size, width=args.size,
                              guidance_scale=args.guidance, output="latent") for a in picks]


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def closed_loop(serve_batch, reqs, clients: int, batch: int, device) -> dict:
    """``clients`` clients, one request outstanding each; the server takes up to ``batch`` queued requests at once."""
    queue = collections.deque()
    lat, outs, calls = [], {}, 0
    t0 = time.perf_counter()
    issued = 0
    for _ in range(min(clients, len(reqs))):
        queue.append((issued, t0))
        issued += 1
    while queue:
        take = [queue.popleft() for _ in range(min(batch, len(queue)))]
        results = serve_batch([reqs[i] for i, _ in take])
        sync(device)
        calls += 1
        now = time.perf_counter()
        for (i, ts), r in zip(take, results):
            if isinstance(r, BaseException):
                raise r
            outs[i] = r
            lat.append(now - ts)
            if issued < len(reqs):
                queue.append((issued, now))
                issued += 1
    wall = time.perf_counter() - t0
    lat_ms = np.array(lat) * 1e3
    return {"requests": len(reqs), "wall_s": wall, "throughput_rps": len(reqs) / wall,
            "p50_ms": float(np.percentile(lat_ms, 50)), "p95_ms": float(np.percentile(lat_ms, 95)),
            "server_batches": calls, "outputs": outs}


def lora_fast_mode(mode, args, paths, names):
    pipe = tiny_pipeline(device=args.device, dtype=DTYPES[args.dtype])
    one = adapter_nbytes(lora_fast.read_lora(paths[0]))
    cache = lora_fast.AdapterCache(pipe, device_budget_bytes=len(names) * one, host_budget_bytes=len(names) * one,
                                   source=dict(zip(names, paths)))
    with cache.use(list(names)):  # resident before timing
        pass
    runner = BatchRunner(pipe, cache, mode)

    def serve_batch(reqs):
        return [decode_npy(r) if isinstance(r, bytes) else r for r in runner.run(reqs)]

    return serve_batch, runner, args.batch


def diffusers_mode(args, paths, names):
    pipe = tiny_pipeline(device=args.device, dtype=DTYPES[args.dtype])
    t = time.perf_counter()
    for name, path in zip(names, paths):
        pipe.load_lora_weights(path, adapter_name=name)
    load_s = time.perf_counter() - t
    gen_device = "cpu" if torch.device(args.device).type == "mps" else args.device

    def serve_batch(reqs):
        assert len(reqs) == 1
        r = reqs[0]
        pipe.set_adapters([r.adapter], [r.lora_scale])
        with torch.inference_mode():
            out = pipe(prompt=[r.prompt], num_inference_steps=r.steps, height=r.height, width=r.width,
                       guidance_scale=r.guidance_scale, output_type="latent",
                       generator=[torch.Generator(gen_device).manual_seed(r.seed)]).images
        return [out[0].float().cpu().numpy()]

    return serve_batch, load_s


def git_commit() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32, help="requests per (distribution, mode) run")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8, help="most requests per server batch (per_sample, fuse)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", type=int, default=32, help="image height and width in pixels")
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent s of the skewed distribution")
    ap.add_argument("--dists", default="uniform,zipf")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    modes = args.modes.split(",")
    dists = args.dists.split(",")
    names = [f"style{i}" for i in range(args.adapters)]
    adir = tempfile.mkdtemp(prefix="bench_serving_")
    paths = write_adapters(adir, names)

    machine = dict(platform=platform.platform(), processor=_cpu_name(), cpu_count=os.cpu_count(),
                   torch=torch.__version__, torch_threads=torch.get_num_threads(), device=args.device,
                   gpu=torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else None,
                   commit=git_commit())
    print(json.dumps(machine))
    print(f"{args.adapters} adapters, {args.requests} requests per run, {args.clients} clients, batch {args.batch}, "
          f"{args.steps} steps, {args.size}x{args.size}, {args.dtype}")

    servers = {}
    for mode in modes:
        if mode == "diffusers":
            fn, load_s = diffusers_mode(args, paths, names)
            servers[mode] = (fn, None, 1)
            print(f"diffusers: load_lora_weights of {len(names)} adapters took {load_s:.2f} s (not timed below)")
        else:
            servers[mode] = lora_fast_mode(mode, args, paths, names)
        warm = traffic("uniform", 2, names, args.zipf, 999, args)  # first calls (allocations) untimed
        servers[mode][0](warm[:servers[mode][2]])
        sync(args.device)

    rows = []
    print(f"{'dist':8} {'mode':11} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'batches':>7} {'switches':>8} "
          f"{'load avg':>8}")
    for dist in dists:
        reqs = traffic(dist, args.requests, names, args.zipf, args.seed, args)
        counts = collections.Counter(r.adapter for r in reqs)
        outs = {}
        for mode in modes:
            fn, runner, batch = servers[mode]
            switches0 = runner.stats.switches if runner is not None else 0
            res = closed_loop(fn, reqs, args.clients, batch, args.device)
            outs[mode] = res.pop("outputs")
            res.update(dist=dist, mode=mode, load_avg=os.getloadavg()[0],
                       switches=(runner.stats.switches - switches0) if runner is not None else None,
                       adapter_counts=dict(sorted(counts.items())))
            rows.append(res)
            print(f"{dist:8} {mode:11} {res['throughput_rps']:7.2f} {res['p50_ms']:8.0f} {res['p95_ms']:8.0f} "
                  f"{res['server_batches']:7d} {str(res['switches'] if res['switches'] is not None else '-'):>8} "
                  f"{res['load_avg']:8.2f}", flush=True)
        # correctness: every mode's output for every request against the first mode's
        ref_mode = modes[0]
        for mode in modes[1:]:
            worst = max(float(np.abs(outs[mode][i] - outs[ref_mode][i]).max() / np.abs(outs[ref_mode][i]).max())
                        for i in range(len(reqs)))
            print(f"  {dist}: max |{mode} - {ref_mode}| / max |{ref_mode}| over all requests = {worst:.1e}")
            rows[-1 - (len(modes) - 1 - modes.index(mode))]["rel_diff_vs_" + ref_mode] = worst
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
