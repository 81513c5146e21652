"""Live-adapter benchmark: set_adapters with many adapters, load cost vs file read, forward overhead.

    python benchmarks/bench_live.py                    # everything, writes bench-out/live.json
    python benchmarks/bench_live.py --no-diffusers     # skip the diffusers comparison
    python benchmarks/bench_live.py --adapters 35 --threads 2

Cases:
* set_adapters(25 names, weights) on an SD1.5-shaped UNet: tiny (real weights) and full size (meta
  device: the structure is what matters, the call touches no weight), to show the cost does not
  depend on the parameter count.
* load_lora_weights of N adapter files (SD1.5 attention q/k/v/out, rank 4, fp16) into a full-size fp16
  SD1.5 UNet on the CPU: each load's time beside reading the same file alone (lora_fast.read_lora),
  first vs last load.
* forward of the tiny SD1.5 UNet (and optionally the full one): base vs one live adapter vs fused.
* diffusers (optional): the same set_adapters and loads on the tiny UNet pipeline.
Times are medians of repeats (time.perf_counter).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch

import lora_fast
from lora_fast import LoraAdapter, LoraLayer
from lora_fast.bench import median_time
from lora_fast.models import build_pipeline, build_unet, materialize

ATTN = ("to_q", "to_k", "to_v", "to_out.0")


def _timed(fn, repeats: int) -> float:
    """Median of cold-to-warm repeats: set_adapters/load costs are measured from the first call on."""
    return median_time(fn, repeats, warmup=0)


def attention_adapter(unet, seed: int, rank: int = 4, dtype=torch.float16, device="cpu", prefix="") -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, m in unet.named_modules():
        if name.endswith(ATTN) and isinstance(m, torch.nn.Linear):
            if device == "meta":
                down = torch.empty(rank, m.in_features, device="meta", dtype=dtype)
                up = torch.empty(m.out_features, rank, device="meta", dtype=dtype)
            else:
                down = (torch.randn(rank, m.in_features, generator=g) * 0.05).to(dtype)
                up = (torch.randn(m.out_features, rank, generator=g) * 0.05).to(dtype)
            layers[prefix + name] = LoraLayer(down=down, up=up, alpha=float(rank))
    return LoraAdapter(layers, "diffusers")


def bench_set_adapters(n_adapters: int, repeats: int) -> dict:
    out = {}
    for label, device in (("tiny", "cpu"), ("full-meta", "meta")):
        unet = build_unet("sd15", "tiny" if label == "tiny" else "full", device=device, seed=None if device == "meta" else 0)
        params = sum(p.numel() for p in unet.parameters())
        for i in range(n_adapters):
            lora_fast.load_lora_weights(unet, attention_adapter(unet, i, device=device, dtype=torch.float32),
                                        adapter_name=f"a{i}")
        names = [f"a{i}" for i in range(n_adapters)]
        weights = [0.5 + 0.01 * i for i in range(n_adapters)]
        lora_fast.set_adapters(unet, names, weights)
        t_all = _timed(lambda: lora_fast.set_adapters(unet, names, weights), repeats)
        flip = [names[:1], names]
        k = [0]

        def switch():
            k[0] ^= 1
            lora_fast.set_adapters(unet, flip[k[0]])

        t_switch = _timed(switch, repeats)
        modules = len(lora_fast.engine.component_state(unet).hooks)
        out[label] = {"params": params, "adapted_modules": modules, "adapters": n_adapters,
                      "set_adapters_all_ms": t_all * 1e3, "set_adapters_switch_ms": t_switch * 1e3}
        print(f"set_adapters {label:9s} params={params / 1e6:7.1f}M modules={modules} adapters={n_adapters}: "
              f"all {t_all * 1e3:.3f} ms, switch {t_switch * 1e3:.3f} ms", file=sys.stderr)
    return out


def bench_loads(n_adapters: int, repeats: int, full: bool) -> dict:
    size = "full" if full else "tiny"
    unet = build_unet("sd15", size, device="meta", seed=None) if full else build_unet("sd15", "tiny", seed=0)
    if full:
        unet = materialize(unet, dtype=torch.float16)
    else:
        unet = unet.half()
    tmp = tempfile.mkdtemp(prefix="bench_live_")
    paths = []
    for i in range(n_adapters):
        path = os.path.join(tmp, f"a{i}.safetensors")
        attention_adapter(unet, i, prefix="unet.").save(path, format="diffusers")
        paths.append(path)
    file_mb = os.path.getsize(paths[0]) / 1e6
    reads, loads = [], []
    for i, path in enumerate(paths):
        reads.append(_timed(lambda: lora_fast.read_lora(path), repeats))
        t = time.perf_counter()
        lora_fast.load_lora_weights(unet, path, adapter_name=f"a{i}", components=["unet"])
        loads.append(time.perf_counter() - t)
    res = {"unet": size, "dtype": "fp16", "file_mb": file_mb, "adapters": n_adapters,
           "read_ms": [r * 1e3 for r in reads], "load_ms": [l * 1e3 for l in loads],
           "first_load_ms": loads[0] * 1e3, "last_load_ms": loads[-1] * 1e3,
           "median_load_ms": statistics.median(loads) * 1e3, "median_read_ms": statistics.median(reads) * 1e3}
    print(f"load {size} fp16 UNet, {file_mb:.2f} MB files: read {res['median_read_ms']:.2f} ms, load "
          f"{res['median_load_ms']:.2f} ms (first {res['first_load_ms']:.2f}, #{n_adapters} {res['last_load_ms']:.2f})",
          file=sys.stderr)
    return res


def _unet_inputs(unet, batch=1):
    g = torch.Generator().manual_seed(0)
    cfg = unet.config
    s = cfg.sample_size
    dtype = next(unet.parameters()).dtype
    return (torch.randn(batch, cfg.in_channels, s, s, generator=g).to(dtype), torch.tensor([500]),
            torch.randn(batch, 77 if s > 8 else 7, cfg.cross_attention_dim, generator=g).to(dtype))


def bench_forward(repeats: int, full: bool) -> dict:
    res = {}
    sizes = ["tiny"] + (["full"] if full else [])
    for size in sizes:
        unet = build_unet("sd15", "tiny", seed=0) if size == "tiny" else materialize(build_unet("sd15", "full", device="meta", seed=None))
        args = _unet_inputs(unet)
        reps = repeats if size == "tiny" else max(3, repeats // 10)

        def run():
            with torch.no_grad():
                unet(*args)

        run()
        t_base = _timed(run, reps)
        lora_fast.load_lora_weights(unet, attention_adapter(unet, 0, rank=4, dtype=torch.float32), adapter_name="a")
        run()
        t_live = _timed(run, reps)
        lora_fast.fuse_lora(unet)
        run()
        t_fused = _timed(run, reps)
        lora_fast.unfuse_lora(unet)
        lora_fast.unload_lora_weights(unet)
        res[size] = {"base_ms": t_base * 1e3, "live_ms": t_live * 1e3, "fused_ms": t_fused * 1e3,
                     "live_overhead": t_live / t_base - 1, "fused_overhead": t_fused / t_base - 1}
        print(f"forward {size} SD1.5 UNet fp32, attention r4: base {t_base * 1e3:.2f} ms, live {t_live * 1e3:.2f} ms "
              f"(+{(t_live / t_base - 1) * 100:.1f}%), fused {t_fused * 1e3:.2f} ms", file=sys.stderr)
    return res


def bench_diffusers(n_adapters: int, repeats: int) -> dict:
    """diffusers on the tiny SD1.5 pipeline: load_lora_weights per adapter and set_adapters with all of them."""
    pipe = build_pipeline("sd15", "tiny", seed=0)
    ours = copy.deepcopy(pipe)
    clean = copy.deepcopy(pipe.unet)  # PEFT replaces pipe's Linear modules as adapters load
    tmp = tempfile.mkdtemp(prefix="bench_live_diffusers_")
    loads_theirs, loads_ours = [], []
    for i in range(n_adapters):
        path = os.path.join(tmp, f"a{i}.safetensors")
        attention_adapter(clean, i, prefix="unet.", dtype=torch.float32).save(path, format="diffusers")
        t = time.perf_counter()
        pipe.load_lora_weights(path, adapter_name=f"a{i}")
        loads_theirs.append(time.perf_counter() - t)
        t = time.perf_counter()
        lora_fast.load_lora_weights(ours, path, adapter_name=f"a{i}")
        loads_ours.append(time.perf_counter() - t)
    names = [f"a{i}" for i in range(n_adapters)]
    weights = [0.5] * n_adapters
    t_theirs = _timed(lambda: pipe.set_adapters(names, weights), max(3, repeats // 10))
    t_ours = _timed(lambda: lora_fast.set_adapters(ours, names, weights), repeats)
    res = {"adapters": n_adapters, "diffusers_set_adapters_ms": t_theirs * 1e3, "ours_set_adapters_ms": t_ours * 1e3,
           "diffusers_first_load_ms": loads_theirs[0] * 1e3, "diffusers_last_load_ms": loads_theirs[-1] * 1e3,
           "ours_first_load_ms": loads_ours[0] * 1e3, "ours_last_load_ms": loads_ours[-1] * 1e3}
    print(f"diffusers tiny SD1.5 pipeline, {n_adapters} adapters: set_adapters {t_theirs * 1e3:.2f} ms (ours "
          f"{t_ours * 1e3:.3f} ms); load first/last {loads_theirs[0] * 1e3:.1f}/{loads_theirs[-1] * 1e3:.1f} ms "
          f"(ours {loads_ours[0] * 1e3:.2f}/{loads_ours[-1] * 1e3:.2f} ms)", file=sys.stderr)
    return res


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--adapters", type=int, default=25, help="adapters loaded for set_adapters")
    parser.add_argument("--loads", type=int, default=35, help="adapter files loaded one after another")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-full", action="store_true", help="skip the full-size fp16 UNet load and forward")
    parser.add_argument("--full-forward", action="store_true", help="also time a full-size UNet forward (slow)")
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--out", default="bench-out/live.json")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "threads": torch.get_num_threads(), "torch": torch.__version__}}
    try:
        report["commit"] = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        report["commit"] = None
    try:
        report["load_average"] = os.getloadavg()
    except OSError:
        pass
    report["set_adapters"] = bench_set_adapters(args.adapters, args.repeats)
    report["loads"] = bench_loads(args.loads, 3, full=not args.no_full)
    report["forward"] = bench_forward(args.repeats // 2 or 1, full=args.full_forward)
    if not args.no_diffusers:
        report["diffusers"] = bench_diffusers(args.adapters, args.repeats)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
