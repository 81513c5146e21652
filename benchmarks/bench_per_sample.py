"""Per-sample adapters: one UNet step where every sample of the batch runs its own LoRA.

    python benchmarks/bench_per_sample.py                               # full SD1.5 UNet, CPU, fp32, latent 64
    python benchmarks/bench_per_sample.py --size tiny --repeats 5       # quick check of the script
    python benchmarks/bench_per_sample.py --latent 32 --json bench-out/per_sample.json
    python benchmarks/bench_per_sample.py --device cuda --dtype fp16

An SD1.5-shaped UNet with random weights holds ``--batch`` different random adapters (rank ``--rank`` on
to_q/to_k/to_v/to_out.0 of every attention, loaded unfused with lora_fast.load_lora_weights). One UNet step
(latents ``(B, 4, latent, latent)``, text states ``(B, 77, cross_attention_dim)``, under inference_mode) is timed as

  (a) base:        the base model alone at batch B (disable_lora)
  (b) per-sample:  batch B, sample i with adapter i (lora_fast.per_sample_adapters)
  (c) sequential:  B steps at batch 1, set_adapters([adapter i]) before step i (what (b) replaces)
  (d) one adapter: batch B, one adapter for every sample (set_adapters, the plain live path), for context

The targets (stated for a GPU): (b) <= 1.3x (a) and (c) / (b) >= 4x. Correctness is checked once:
sample i of (b) against the batch-1 run of (c) with adapter i, as max |diff| / max |ref| over the whole output
(fp32: <= 1e-4; on CUDA at most twice the base model's own batch-B vs batch-1 difference if that is larger).
fp16/bf16 runs also keep an fp32 copy of the model (same rounded weights and factors): per-sample's error against
it must be within 1.5x of the plain single-adapter live path's error.
Times are medians over ``--repeats`` rounds after ``--warmup`` untimed rounds; each round runs every case once,
interleaved, so load changes on a shared machine hit all cases alike.
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
import time
import warnings

import torch

import lora_fast
from lora_fast import LoraAdapter, LoraLayer
from lora_fast.bench import DTYPES, _cpu_name, median_time
from lora_fast.models import build_unet, materialize

ATTN = ("to_q", "to_k", "to_v", "to_out.0")
#: fp32: max |per-sample - alone| / max |alone| accepted (the acceptance bound). 16-bit layers are checked against an
#: fp32 copy of the model instead (see run()): per-sample may be at most this factor less accurate than the plain
#: single-adapter live path of the same dtype.
FP32_TOLERANCE = 1e-4
LOW_PRECISION_FACTOR = 1.5


def attention_adapter(unet, seed: int, rank: int, dtype, device) -> LoraAdapter:
    """Random factors on every attention projection (std 0.05, alpha = rank: a clearly visible change)."""
    g = torch.Generator().manual_seed(1000 + seed)
    layers = {}
    for name, m in unet.named_modules():
        if name.endswith(ATTN) and isinstance(m, torch.nn.Linear):
            down = torch.randn(rank, m.in_features, generator=g) * 0.05
            up = torch.randn(m.out_features, rank, generator=g) * 0.05
            layers[name] = LoraLayer(down=down.to(device, dtype), up=up.to(device, dtype), alpha=float(rank))
    return LoraAdapter(layers, "diffusers")


def build(size: str, dtype, device):
    if size == "full":
        # nn.init of the full UNet takes minutes on a small CPU; random windows of one normal pool are enough here.
        return materialize(build_unet("sd15", "full", device="meta", seed=None), dtype=dtype, device=device)
    return build_unet("sd15", "tiny", dtype=dtype, device=device, seed=0)


def inputs(unet, batch: int, latent: int, dtype, device):
    g = torch.Generator().manual_seed(0)
    cfg = unet.config
    latents = torch.randn(batch, cfg.in_channels, latent, latent, generator=g).to(device, dtype)
    text = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g).to(device, dtype)
    return latents, torch.tensor([500], device=device), text


def machine_info(device: str) -> dict:
    info = {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["commit"] = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                                 stderr=subprocess.DEVNULL).strip()
    except Exception:
        info["commit"] = None
    return info


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def run(args) -> dict:
    dtype = DTYPES[args.dtype]
    device = args.device
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    t0 = time.perf_counter()
    unet = build(args.size, dtype, device)
    # 16-bit runs are checked against an fp32 copy with the same (rounded) weights and adapter factors.
    ref_unet = copy.deepcopy(unet).float() if dtype != torch.float32 else None
    names = [f"a{i}" for i in range(args.batch)]
    for i, name in enumerate(names):
        adapter = attention_adapter(unet, i, args.rank, dtype, device)
        lora_fast.load_lora_weights(unet, adapter, adapter_name=name)
        if ref_unet is not None:
            lora_fast.load_lora_weights(ref_unet, adapter.to(dtype=torch.float32), adapter_name=name)
    n_modules = sum(1 for n, m in unet.named_modules() if n.endswith(ATTN) and isinstance(m, torch.nn.Linear))
    latents, timestep, text = inputs(unet, args.batch, args.latent, dtype, device)
    print(f"built {args.size} SD1.5 UNet ({sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M params) and "
          f"{len(names)} adapters (rank {args.rank}, {n_modules} modules) in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)

    outs = {}

    def step(key, lat, txt):
        def fn():
            with torch.inference_mode():
                outs[key] = unet(lat, timestep, txt).sample
            sync()
        return fn

    def per_sample():
        with lora_fast.per_sample_adapters(unet, names):
            step("per_sample", latents, text)()

    def sequential():
        for i, name in enumerate(names):
            lora_fast.set_adapters(unet, [name])
            step(("alone", i), latents[i:i + 1], text[i:i + 1])()

    def with_selection(fn, select):
        def run():
            select()
            fn()
        return run

    cases = {
        "base": with_selection(step("base", latents, text), lambda: lora_fast.disable_lora(unet)),
        "per_sample": with_selection(per_sample, lambda: lora_fast.enable_lora(unet)),
        "sequential": with_selection(sequential, lambda: lora_fast.enable_lora(unet)),
        "one_adapter": with_selection(step("one", latents, text), lambda: lora_fast.set_adapters(unet, [names[0]])),
    }
    # Rounds interleave the cases (one timed call each per round), so a load change on a shared machine hits
    # every case alike instead of whichever case happened to run then; the figure is the median over rounds.
    rounds = {k: [] for k in cases}
    for r in range(args.warmup + args.repeats):
        for key, fn in cases.items():
            elapsed = median_time(fn, 1, warmup=0)
            if r >= args.warmup:
                rounds[key].append(elapsed)
        print(f"  round {r}{' (warmup)' if r < args.warmup else ''}: "
              + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" if r >= args.warmup else k for k, v in rounds.items()),
              file=sys.stderr)
    lora_fast.enable_lora(unet)
    times = {k: statistics.median(v) for k, v in rounds.items()}

    # Sample i of (b) against sample i run alone with adapter i (the last run of (c)); how far apart the adapters
    # put the outputs says the check is not vacuous.
    errs = [rel_err(outs["per_sample"][i:i + 1], outs[("alone", i)]) for i in range(args.batch)]
    spread = min(rel_err(outs["base"][i:i + 1], outs[("alone", i)]) for i in range(args.batch))
    check = {"max_rel_err": max(errs), "per_sample_rel_err": errs, "min_rel_diff_adapter_vs_base": spread}
    if ref_unet is None:
        bound = FP32_TOLERANCE
        if not device.startswith("cpu"):
            # On CUDA (TF32 convolutions, algorithms chosen per batch size) a batch-B and a batch-1 run of the base
            # model differ already; per-sample cannot be closer to "alone" than that, so allow twice that noise.
            lora_fast.disable_lora(unet)
            for i in range(args.batch):
                step(("base_alone", i), latents[i:i + 1], text[i:i + 1])()
            lora_fast.enable_lora(unet)
            check["base_batch_noise"] = max(rel_err(outs["base"][i:i + 1], outs[("base_alone", i)])
                                            for i in range(args.batch))
            bound = max(bound, 2 * check["base_batch_noise"])
        check.update(kind="per-sample vs alone", bound=bound, ok=check["max_rel_err"] <= bound)
    else:
        # Both 16-bit paths against the fp32 model run alone with adapter i: per-sample (fp32 LoRA terms, one
        # rounding) must be about as accurate as the plain live path.
        ref = []
        with torch.inference_mode():
            for i, name in enumerate(names):
                lora_fast.set_adapters(ref_unet, [name])
                ref.append(ref_unet(latents[i:i + 1].float(), timestep, text[i:i + 1].float()).sample)
        err_ps = max(rel_err(outs["per_sample"][i:i + 1], ref[i]) for i in range(args.batch))
        err_alone = max(rel_err(outs[("alone", i)], ref[i]) for i in range(args.batch))
        bound = LOW_PRECISION_FACTOR * err_alone
        check.update(kind=f"vs fp32 model: per-sample {err_ps:.2e}, single-adapter live path {err_alone:.2e}",
                     per_sample_vs_fp32=err_ps, alone_vs_fp32=err_alone, bound=bound, ok=err_ps <= bound)
    return {
        "machine": machine_info(device), "device": device, "size": args.size, "dtype": args.dtype,
        "batch": args.batch, "latent": args.latent, "rank": args.rank, "adapted_modules": n_modules,
        "repeats": args.repeats, "warmup": args.warmup,
        "times_ms": {k: v * 1e3 for k, v in times.items()},
        "rounds_ms": {k: [t * 1e3 for t in v] for k, v in rounds.items()},
        "ratios": {"per_sample_over_base": times["per_sample"] / times["base"],
                   "sequential_over_per_sample": times["sequential"] / times["per_sample"],
                   "one_adapter_over_base": times["one_adapter"] / times["base"]},
        "check": check,
    }


def markdown(r: dict) -> str:
    m, tm, ra, c = r["machine"], r["times_ms"], r["ratios"], r["check"]
    b = r["batch"]
    where = m.get("gpu") or f"{m['cpu']}, {m['torch_threads']} torch threads"
    lines = [
        f"SD1.5 UNet ({r['size']}), {r['dtype']}, {r['device']} ({where}), batch {b}, latent {r['latent']}, "
        f"{b} adapters of rank {r['rank']} on {r['adapted_modules']} attention projections; commit {m['commit']}, "
        f"load average {r.get('load_average_start')} -> {r.get('load_average_end')}",
        "",
        "| case | one UNet step (ms) | vs (a) |",
        "|---|---|---|",
        f"| (a) base, batch {b} | {tm['base']:.1f} | 1.00x |",
        f"| (b) per-sample, batch {b}, {b} adapters | {tm['per_sample']:.1f} | {tm['per_sample'] / tm['base']:.2f}x |",
        f"| (c) {b} x batch 1, set_adapters each | {tm['sequential']:.1f} | {tm['sequential'] / tm['base']:.2f}x |",
        f"| (d) one adapter, batch {b} (set_adapters) | {tm['one_adapter']:.1f} | {tm['one_adapter'] / tm['base']:.2f}x |",
        "",
        f"(b)/(a) = {ra['per_sample_over_base']:.2f}x (GPU target <= 1.3x); "
        f"(c)/(b) = {ra['sequential_over_per_sample']:.2f}x (GPU target >= 4x)",
        f"check: max over samples of max|(b)_i - alone_i| / max|alone_i| = {c['max_rel_err']:.2e}; "
        f"{c['kind']} (bound {c['bound']:.1e}: {'ok' if c['ok'] else 'FAILED'}"
        + (f"; base model batch {b} vs batch 1 differ by {c['base_batch_noise']:.2e}" if "base_batch_noise" in c else "")
        + f"); adapters move the output by >= {c['min_rel_diff_adapter_vs_base']:.2e} of its max vs the base model",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=("full", "tiny"), default="full")
    p.add_argument("--latent", type=int, default=None, help="latent side (default 64 full, 8 tiny)")
    p.add_argument("--batch", type=int, default=8, help="batch size = number of different adapters")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per case (default 3 full, 10 tiny)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.latent is None:
        args.latent = 64 if args.size == "full" else 8
    if args.repeats is None:
        args.repeats = 3 if args.size == "full" else 10
    load_start = load_average()
    report = run(args)
    report["load_average_start"], report["load_average_end"] = load_start, load_average()
    report["command"] = "python benchmarks/bench_per_sample.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(markdown(report))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0 if report["check"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
