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
* step (``--step``, alone with ``--step-only``): one UNet step at batch B (default 16, CFG-shaped: 8 adapters x 2)
  with rank-16 adapters on every attention projection: base, one live adapter for the whole batch through the
  per-slot products and through the segmented kernels (lora_fast.live.KERNEL_ROUTE), and per_sample_adapters with
  8 different adapters; ratios to the base step. ``--device cuda --dtype fp16`` for the GPU figure.
Times are medians of repeats (time.perf_counter).

    python benchmarks/bench_live.py --step-only --size full --batch 8 --latent 16 --dtype bf16
    python benchmarks/bench_live.py --step-only --device cuda --dtype fp16          # SD1.5, batch 16, latent 64
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


def bench_step(size: str, batch: int, latent: int, dtype_name: str, device: str, rank: int, repeats: int,
               warmup: int) -> dict:
    """base vs one live adapter (per-slot products, segmented kernels) vs per-sample with 8 adapters, one UNet step."""
    from lora_fast import live
    from lora_fast.bench import DTYPES

    dtype = DTYPES[dtype_name]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if size == "full":
        unet = materialize(build_unet("sd15", "full", device="meta", seed=None), dtype=dtype, device=device)
    else:
        unet = build_unet("sd15", "tiny", dtype=dtype, device=device, seed=0)
    names = [f"a{i}" for i in range(8)]
    for i, name in enumerate(names):
        lora_fast.load_lora_weights(unet, attention_adapter(unet, i, rank=rank, dtype=dtype, device=device),
                                    adapter_name=name)
    g = torch.Generator().manual_seed(0)
    cfg = unet.config
    latents = torch.randn(batch, cfg.in_channels, latent, latent, generator=g).to(device, dtype)
    text = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g).to(device, dtype)
    timestep = torch.tensor([500], device=device)
    outs = {}

    def step(key):
        with torch.inference_mode():
            outs[key] = unet(latents, timestep, text).sample
        sync()

    def case(key, select, route=None):
        def run():
            select()
            saved = live.KERNEL_ROUTE
            live.KERNEL_ROUTE = route
            try:
                step(key)
            finally:
                live.KERNEL_ROUTE = saved
        return run

    def per_sample():
        lora_fast.enable_lora(unet)
        with lora_fast.per_sample_adapters(unet, names):  # sample j uses adapter j mod 8 (CFG: both halves)
            step("per_sample")

    cases = {
        "base": case("base", lambda: lora_fast.disable_lora(unet)),
        "live_per_slot": case("live_per_slot", lambda: (lora_fast.enable_lora(unet), lora_fast.set_adapters(unet, ["a0"])),
                              False),
        "live_kernels": case("live_kernels", lambda: (lora_fast.enable_lora(unet), lora_fast.set_adapters(unet, ["a0"])),
                             True),
        "per_sample_8": per_sample,
    }
    rounds = {k: [] for k in cases}
    for r in range(warmup + repeats):  # interleaved rounds: load changes on a shared machine hit every case alike
        for key, fn in cases.items():
            t = median_time(fn, 1, warmup=0)
            if r >= warmup:
                rounds[key].append(t)
    times = {k: statistics.median(v) for k, v in rounds.items()}
    ref = outs["live_per_slot"].double()
    diff = ((outs["live_kernels"].double() - ref).abs().max() / ref.abs().max()).item()
    res = {"size": size, "device": device, "dtype": dtype_name, "batch": batch, "latent": latent, "rank": rank,
           "repeats": repeats, "segmented_backend": os.environ.get("LORA_FAST_SEGMENTED_BACKEND") or
           ("triton" if device.startswith("cuda") else "torch"),
           "times_ms": {k: v * 1e3 for k, v in times.items()},
           "ratios_to_base": {k: v / times["base"] for k, v in times.items()},
           "live_kernels_vs_per_slot_rel_max_diff": diff}
    print(f"step {size} SD1.5 UNet {dtype_name} {device}, batch {batch}, latent {latent}, rank {rank}: "
          + ", ".join(f"{k} {v * 1e3:.1f} ms ({v / times['base']:.2f}x)" for k, v in times.items())
          + f"; kernels vs per-slot max rel diff {diff:.1e}", file=sys.stderr)
    return res


def bench_layer(dtype_name: str, device: str, repeats: int) -> dict:
    """One attention-shaped Linear (SD1.5 mid widths) with one rank-16 adapter: the LoRA terms alone, per-slot
    products vs the segmented kernels, median of many calls (steadier than a whole step on a loaded machine)."""
    from lora_fast import live
    from lora_fast.bench import DTYPES

    dtype = DTYPES[dtype_name]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    res = {}
    for width, rows in ((320, 8 * 1024), (640, 8 * 256), (1280, 8 * 64)):
        lin = torch.nn.Linear(width, width).to(device, dtype)
        g = torch.Generator().manual_seed(0)
        adapter = LoraAdapter({"": LoraLayer(down=(torch.randn(16, width, generator=g) * 0.05).to(dtype),
                                             up=(torch.randn(width, 16, generator=g) * 0.05).to(dtype), alpha=16.0)},
                              "diffusers")
        lora_fast.load_lora_weights(lin, adapter, adapter_name="a")
        x = torch.randn(rows, width, generator=g).to(device, dtype)
        times = {}
        for label, route in (("base", None), ("per_slot", False), ("kernels", True)):
            saved = live.KERNEL_ROUTE
            live.KERNEL_ROUTE = route
            if label == "base":
                lora_fast.disable_lora(lin)
            else:
                lora_fast.enable_lora(lin)

            def run():
                with torch.inference_mode():
                    lin(x)
                sync()

            try:
                times[label] = median_time(run, repeats, warmup=3)
            finally:
                live.KERNEL_ROUTE = saved
        res[f"{width}x{rows}"] = {k: v * 1e3 for k, v in times.items()}
        print(f"layer {dtype_name} Linear({width}) x {rows} rows, rank 16: base {times['base'] * 1e3:.3f} ms, LoRA terms "
              f"per-slot +{(times['per_slot'] - times['base']) * 1e3:.3f} ms, kernels "
              f"+{(times['kernels'] - times['base']) * 1e3:.3f} ms", file=sys.stderr)
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
    parser.add_argument("--step", action="store_true", help="also time the UNet step case (base / live / per-sample)")
    parser.add_argument("--step-only", action="store_true", help="only the UNet step case")
    parser.add_argument("--size", choices=("full", "tiny"), default="full", help="step case: UNet size")
    parser.add_argument("--batch", type=int, default=16, help="step case: batch (a multiple of 8)")
    parser.add_argument("--latent", type=int, default=64, help="step case: latent side")
    parser.add_argument("--rank", type=int, default=16, help="step case: adapter rank")
    parser.add_argument("--dtype", default="fp32", help="step case: fp32, fp16 or bf16")
    parser.add_argument("--device", default="cpu", help="step case: device")
    parser.add_argument("--step-repeats", type=int, default=3)
    parser.add_argument("--layer", action="store_true", help="step case: also time single attention-shaped layers")
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
    if not args.step_only:
        report["set_adapters"] = bench_set_adapters(args.adapters, args.repeats)
        report["loads"] = bench_loads(args.loads, 3, full=not args.no_full)
        report["forward"] = bench_forward(args.repeats // 2 or 1, full=args.full_forward)
        if not args.no_diffusers:
            report["diffusers"] = bench_diffusers(args.adapters, args.repeats)
    if args.step or args.step_only:
        if args.layer:
            report["layer"] = bench_layer(args.dtype, args.device, 41)
        report["step"] = bench_step(args.size, args.batch, args.latent, args.dtype, args.device, args.rank,
                                    args.step_repeats, warmup=1)
        try:
            report["load_average_end"] = os.getloadavg()
        except OSError:
            pass
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
