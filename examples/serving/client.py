"""Start the serving example in-process, send concurrent requests with different LoRAs, print what happened.

    python -m examples.serving.client [--requests 8] [--out serving-out] [--mode per_sample|fuse]

Starts a local Ray instance, runs examples/serving/app.py's app, sends the requests at once through the Python
handle (routed by adapter id with multiplexing) and one over HTTP, one of them for the broken adapter file, writes
the PNGs to --out and prints the batch sizes and the adapter cache's counters. Exits 0 when every good request
returned a PNG, the broken one failed with LoraFormatError, and (per_sample mode) at least one pipeline call served
more than one request.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import time
import urllib.request


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--out", default="serving-out")
    p.add_argument("--mode", default="per_sample", choices=["per_sample", "fuse"])
    p.add_argument("--port", type=int, default=8000)
    args = p.parse_args(argv)

    import ray
    from ray import serve
    from PIL import Image

    import lora_fast
    from examples.serving.app import ADAPTERS, make_app

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    try:
        t0 = time.perf_counter()
        handle = serve.run(make_app(args.mode, ray_actor_options={"num_cpus": 1}), name="loras", route_prefix="/")
        print(f"app up in {time.perf_counter() - t0:.1f} s")
        choices = list(ADAPTERS) + [None, {"clay": 0.5, "neon": 0.5}]
        bodies = [{"prompt": f"picture {i}", "adapter": choices[i % len(choices)], "seed": i}
                  for i in range(args.requests)]
        bodies.append({"prompt": "broken one", "adapter": "broken", "seed": 0})

        async def send():
            calls = []
            for b in bodies:
                a = b["adapter"]
                h = handle.options(multiplexed_model_id=a) if isinstance(a, str) else handle
                calls.append(h.generate.remote(b))
            return await asyncio.gather(*calls, return_exceptions=True)

        t0 = time.perf_counter()
        results = asyncio.run(send())
        print(f"{len(bodies)} requests in {time.perf_counter() - t0:.2f} s")
        os.makedirs(args.out, exist_ok=True)
        ok = True
        for i, (b, r) in enumerate(zip(bodies, results)):
            if b["adapter"] == "broken":
                good = isinstance(r, lora_fast.LoraFormatError)
                print(f"request {i} adapter=broken -> {type(r).__name__}: {str(r)[:90]}")
            else:
                good = isinstance(r, bytes) and Image.open(io.BytesIO(r)).format == "PNG"
                if good:
                    with open(os.path.join(args.out, f"{i:02d}.png"), "wb") as f:
                        f.write(r)
                print(f"request {i} adapter={b['adapter']!r} -> {'PNG' if good else repr(r)[:90]}")
            ok &= good
        req = urllib.request.Request(f"http://127.0.0.1:{args.port}/", data=json.dumps(
            {"prompt": "over http", "seed": 3}).encode(), headers={"serve_multiplexed_model_id": "ink"})
        with urllib.request.urlopen(req, timeout=300) as resp:
            http_ok = resp.status == 200 and resp.headers.get("content-type") == "image/png"
        print(f"HTTP request with serve_multiplexed_model_id=ink -> {'PNG' if http_ok else 'FAILED'}")
        stats = handle.stats.remote().result()
        print("pipeline calls (requests each):", stats["batch_sizes"])
        print("cache:", json.dumps({k: stats["cache"][k] for k in ("device", "host", "loads", "load_failures")}))
        batched = args.mode == "fuse" or max(stats["batch_sizes"]) > 1
        ok = ok and http_ok and batched
        print("OK" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
