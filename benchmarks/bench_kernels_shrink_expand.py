"""Segmented shrink/expand at SD1.5 attention-layer shapes: what per-sample LoRA adds to one base linear layer.

    python benchmarks/bench_kernels_shrink_expand.py                      # CPU, fp32, torch backend
    python benchmarks/bench_kernels_shrink_expand.py --device cuda --dtype fp16   # compiled Triton kernels

For each layer shape of an SD1.5 UNet at a 64x64 latent with classifier-free guidance (batch 2·B samples, B
different adapters of rank r, one per image), the table gives the median time of

* base: the layer's own matmul (``F.linear``, cuBLAS/oneDNN),
* per-sample: ``segmented_lora`` (one shrink + one expand for all B adapters) on top of the base output,
* one adapter (naive): base + B(A x) for one adapter on the whole batch in plain torch (three ``F.linear``),

and per-sample / base, the overhead a per-sample step pays on that layer. No diffusers needed.

``--tiles 32x32x32x64x4,64x64x64x128x8`` runs the Triton kernels once per tile configuration (shrink rows x k-step x
expand rows x columns x warps, LORA_FAST_SEGMENTED_TILE; each in its own process, the tile sizes are read at import)
and prints per-sample / base per layer and configuration side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F

from lora_fast.bench import median_time
from lora_fast.kernels import shrink_expand as SE

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

#: (name, tokens per sample, in features, out features): SD1.5 attention projections at a 64x64 latent
SHAPES = [
    ("down0 self q/k/v/out", 4096, 320, 320),
    ("down0 cross k/v", 77, 768, 320),
    ("down1 self", 1024, 640, 640),
    ("down2 self", 256, 1280, 1280),
    ("mid self", 64, 1280, 1280),
]


def bench_shape(tokens, k, n, *, batch, rank, dtype, device, repeats, backend):
    g = torch.Generator().manual_seed(0)
    rows = 2 * batch * tokens
    x = torch.randn(rows, k, generator=g).to(device=device, dtype=dtype)
    w = (torch.randn(n, k, generator=g) * k ** -0.5).to(device=device, dtype=dtype)
    downs = [(torch.randn(rank, k, generator=g) * 0.05).to(device=device, dtype=dtype) for _ in range(batch)]
    ups = [(torch.randn(n, rank, generator=g) * 0.05).to(device=device, dtype=dtype) for _ in range(batch)]
    groups = SE.make_groups(downs, ups, [1.0] * batch)
    rmap = SE.build_row_map([[(i, 1.0)] for i in range(batch)], 2 * batch, tokens, device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def timed(fn):
        def run():
            fn()
            sync()
        return median_time(run, repeats, warmup=2)

    t_base = timed(lambda: F.linear(x, w))
    t_ps = timed(lambda: SE.segmented_lora(x, F.linear(x, w), groups, rmap, backend=backend))
    t_one = timed(lambda: F.linear(x, w) + F.linear(F.linear(x, downs[0]), ups[0]))
    # correctness once: per-sample vs a float64 per-sample loop
    out = SE.segmented_lora(x, F.linear(x, w), groups, rmap, backend=backend)
    x64 = x.double().view(2 * batch, tokens, k)
    ref = F.linear(x64, w.double())
    for j in range(2 * batch):
        i = j % batch
        ref[j] += (x64[j] @ downs[i].double().t()) @ ups[i].double().t()
    err = ((out.double().view_as(ref) - ref).norm() / ref.norm()).item()
    return {"rows": rows, "k": k, "n": n, "base_ms": t_base * 1e3, "per_sample_ms": t_ps * 1e3,
            "one_adapter_ms": t_one * 1e3, "per_sample_over_base": t_ps / t_base,
            "one_adapter_over_base": t_one / t_base, "l2_rel_err": err}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--batch", type=int, default=8, help="images = different adapters (the layer sees 2x with CFG)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--backend", choices=("triton", "torch"), default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--tiles", default=None, help="comma-separated SMxSKxEMxENxW tile configurations to compare")
    args = p.parse_args(argv)
    if args.tiles:
        return sweep_tiles(args, argv if argv is not None else sys.argv[1:])
    dtype = DTYPES[args.dtype]
    backend = args.backend or ("triton" if args.device.startswith("cuda") else "torch")
    machine = (torch.cuda.get_device_name() if args.device.startswith("cuda")
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"# segmented shrink/expand: {args.device} ({machine}), {args.dtype}, backend {backend}, "
          f"{args.batch} adapters r{args.rank}, batch {2 * args.batch} (CFG)")
    print("| layer | rows x K -> N | base | per-sample (base + LoRA) | x base | one adapter, naive torch | x base | L2 err |")
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for name, tokens, k, n in SHAPES:
        r = bench_shape(tokens, k, n, batch=args.batch, rank=args.rank, dtype=dtype, device=args.device,
                        repeats=args.repeats, backend=backend)
        r["layer"] = name
        results.append(r)
        print(f"| {name} | {r['rows']}x{k} -> {n} | {r['base_ms']:.3f} ms | {r['per_sample_ms']:.3f} ms | "
              f"{r['per_sample_over_base']:.2f} | {r['one_adapter_ms']:.3f} ms | {r['one_adapter_over_base']:.2f} | "
              f"{r['l2_rel_err']:.1e} |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "machine": machine, "dtype": args.dtype, "backend": backend,
                       "batch": args.batch, "rank": args.rank, "results": results}, f, indent=1)
    return 0


def sweep_tiles(args, argv) -> int:
    """Each tile configuration in a subprocess (the kernels read their tile sizes at import); one table of
    per-sample / base per layer (rows) and configuration (columns)."""
    rest, skip = [], False
    for a in argv:  # this call's arguments without --tiles / --json
        if skip:
            skip = False
            continue
        if a in ("--tiles", "--json"):
            skip = True
            continue
        if not a.startswith(("--tiles=", "--json=")):
            rest.append(a)
    configs = args.tiles.split(",")
    table, failed = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in configs:
            out = os.path.join(tmp, cfg + ".json")
            env = dict(os.environ, LORA_FAST_SEGMENTED_TILE=cfg)
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), *rest, "--json", out], env=env,
                                  capture_output=True, text=True)
            if proc.returncode != 0 or not os.path.exists(out):
                failed.append(cfg)
                print(f"# {cfg}: failed\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
                continue
            with open(out) as f:
                table[cfg] = json.load(f)
    done = [c for c in configs if c in table]
    if done:
        first = table[done[0]]
        print(f"# per-sample / base by tile configuration: {first['device']} ({first['machine']}), {first['dtype']}, "
              f"backend {first['backend']}, {first['batch']} adapters r{first['rank']}")
        print("| layer | " + " | ".join(done) + " |")
        print("|---|" + "---|" * len(done))
        for i, r in enumerate(first["results"]):
            cells = [f"{table[c]['results'][i]['per_sample_over_base']:.2f}" for c in done]
            print(f"| {r['layer']} | " + " | ".join(cells) + " |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"configs": table, "failed": failed}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
