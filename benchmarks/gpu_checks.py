"""Whole-model correctness checks on a device, with figures: the part of the GPU suite that is not a unit test.

    python benchmarks/gpu_checks.py --out DIR                          # on a GPU: SDXL-shaped UNet, fp16 + bf16
    python benchmarks/gpu_checks.py --device cpu --size tiny --out DIR # the same code on a tiny model (CI runs this)

1. Fuse / unfuse of a whole model: an SDXL-shaped UNet (random weights, built from its config), a diffusers-format
   rank-32 LoRA on every linear of its transformer blocks, fp16 and bf16, on ``--device``:
   - every fused weight is compared with float64 math written here (W + s·B·A), in units in the last place of
     the weight's dtype (one rounding of an fp32 sum: at most about half an ulp);
   - the same layers fused on the CPU (the C++ kernel) give the same bits as the device's fuse;
   - unfuse restores every bit (torch.equal on every targeted weight), after several fuse/unfuse cycles and
     after a fuse with ``safe_fusing``;
   - timings (warm medians) of fuse, unfuse and safe fuse, and the record's size.
2. ``lora_fast.load_file(path, device)`` against ``safetensors.torch.load_file(path, device=...)`` on a file of
   ``--file-gb`` GB: the same tensors (torch.equal), and both times.

Exits non-zero when a check fails; ``<out>/gpu_checks.json`` has every figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import torch

import lora_fast
from lora_fast import engine
from lora_fast.bench import make_adapter
from lora_fast.models import build_unet, materialize

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# (mantissa bits incl. the implicit one, smallest normal exponent) for ulp arithmetic in float64
_FORMAT = {torch.float16: (11, -14), torch.bfloat16: (8, -126), torch.float32: (24, -126)}


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def _timed(fn, device, repeats=3):
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def ulp_at(ref64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` values at each float64 reference value (subnormals included)."""
    bits, emin = _FORMAT[dtype]
    _, exp = torch.frexp(ref64)  # ref = m·2^exp with 0.5 <= |m| < 1 (exp = 0 for zero)
    exp = torch.where(ref64 == 0, emin, exp.to(torch.float64) - 1).clamp(min=emin)
    return torch.exp2(exp - (bits - 1))


def _transformer_linears(unet: torch.nn.Module) -> list[str]:
    return [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and ".transformer_blocks." in n]


def check_fuse(size: str, dtype_name: str, device: str, rank: int, log) -> dict:
    dtype = DTYPES[dtype_name]
    if size == "full":
        cpu_unet = materialize(build_unet("sdxl", "full", dtype=dtype, device="meta"), dtype=dtype, device="cpu")
    else:
        cpu_unet = build_unet("sdxl", "tiny", dtype=dtype, device="cpu")
    dev_unet = copy.deepcopy(cpu_unet).to(device)
    names = set(_transformer_linears(cpu_unet))
    adapter = make_adapter({"unet": cpu_unet}, "linear", rank, dtype=dtype)
    adapter.layers = {k: v for k, v in adapter.layers.items() if k[len("unet."):] in names}
    mods = dict(dev_unet.named_modules())
    weights = {k: mods[k[len("unet."):]].weight for k in adapter.layers}
    pristine = {k: w.detach().clone() for k, w in weights.items()}
    n_params = sum(w.numel() for w in weights.values())
    log(f"[fuse {dtype_name}] {len(weights)} transformer linears, {n_params / 1e6:.0f} M weights, rank {rank}")
    out = {"dtype": dtype_name, "modules": len(weights), "weights": n_params, "rank": rank, "failures": []}

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pytorch_lora_weights.safetensors")
        adapter.save(path, format="diffusers")
        target = {"unet": dev_unet}
        lora_fast.load_lora_weights(target, path, adapter_name="check")
        lora_fast.fuse_lora(target)  # warm-up: kernel compile, probe
        lora_fast.unfuse_lora(target)
        f_times, u_times = [], []
        for _ in range(3):
            _sync(device)
            t0 = time.perf_counter()
            lora_fast.fuse_lora(target)
            _sync(device)
            f_times.append(time.perf_counter() - t0)
            record = engine.fused_record_bytes(target)
            t0 = time.perf_counter()
            lora_fast.unfuse_lora(target)
            _sync(device)
            u_times.append(time.perf_counter() - t0)
        safe_s, _ = _timed(lambda: (lora_fast.fuse_lora(target, safe_fusing=True), lora_fast.unfuse_lora(target)),
                           device, repeats=1)
        changed = sum(int((weights[k] != pristine[k]).sum()) for k in weights)
        out["changed_after_cycles"] = changed
        if changed:
            out["failures"].append(f"{changed} weight elements changed after fuse/unfuse cycles")

        # the fused values against float64, and against the CPU kernel on the same layers
        lora_fast.fuse_lora(target)
        worst_ulp, over_half, over_bound = 0.0, 0, 0
        with torch.no_grad():
            for key, layer in adapter.layers.items():
                w0 = pristine[key].to(torch.float64)
                up, down = layer.up.to(device, torch.float64), layer.down.to(device, torch.float64)
                ref = w0 + layer.scale * (up @ down)
                absolute = (weights[key].to(torch.float64) - ref).abs()
                ulp = ulp_at(ref, weights[key].dtype)
                err = absolute / ulp
                worst_ulp = max(worst_ulp, float(err.max()))
                over_half += int((err > 0.5 + 1e-3).sum())
                # one rounding of an fp32 sum: half an ulp of the result, plus the fp32 accumulation error of a
                # rank-r dot product and the add (it dominates where W and the delta cancel)
                slack = (layer.rank + 2) * 2.0**-24 * (w0.abs() + abs(layer.scale) * (up.abs() @ down.abs()))
                over_bound += int((absolute > 0.5 * ulp + slack).sum())
        out["max_ulp_vs_float64"] = worst_ulp
        out["elements_over_half_ulp"] = over_half
        out["elements_over_error_bound"] = over_bound
        if over_bound:
            out["failures"].append(f"{over_bound} fused values are farther from the float64 result than half an ulp "
                                   "plus the fp32 accumulation bound")

        cpu_target = {"unet": cpu_unet}
        lora_fast.load_lora_weights(cpu_target, path, adapter_name="check")
        lora_fast.fuse_lora(cpu_target)
        cpu_mods = dict(cpu_unet.named_modules())
        differ = [k for k in adapter.layers
                  if not torch.equal(cpu_mods[k[len("unet."):]].weight, weights[k].cpu())]
        out["layers_differing_from_cpu_kernel"] = len(differ)
        if differ:
            out["failures"].append(f"{len(differ)} layers differ from the CPU kernel's bits, e.g. {differ[0]}")
        lora_fast.unfuse_lora(target)
        changed = sum(int((weights[k] != pristine[k]).sum()) for k in weights)
        if changed:
            out["failures"].append(f"{changed} weight elements changed after the final unfuse")
        lora_fast.unload_lora_weights(target)

    elt = torch.finfo(dtype).bits // 8
    out.update(fuse_ms=statistics.median(f_times) * 1e3, unfuse_ms=statistics.median(u_times) * 1e3,
               safe_fuse_unfuse_cycle_ms=safe_s * 1e3,
               fuse_ms_all=[t * 1e3 for t in f_times], unfuse_ms_all=[t * 1e3 for t in u_times],
               record_bytes=record, record_fraction=record / (n_params * elt))
    log(f"  fuse {out['fuse_ms']:.1f} ms  unfuse {out['unfuse_ms']:.1f} ms  record {out['record_fraction']:.1%}  "
        f"max {worst_ulp:.3f} ulp vs float64  {len(differ)} layers differ from the CPU kernel  "
        f"failures: {out['failures'] or 'none'}")
    return out


def check_load_file(nbytes: int, device: str, log) -> dict:
    from safetensors.torch import load_file as st_load_file

    gen = torch.Generator().manual_seed(0)
    tensors, total, i = {}, 0, 0
    kinds = [(torch.float16, 2), (torch.bfloat16, 2), (torch.float32, 4)]
    while total < nbytes:
        dt, elt = kinds[i % 3]
        n = min(16 << 20, max(1, (nbytes - total) // elt))
        tensors[f"t{i:04d}"] = torch.randn(n, generator=gen).to(dt).reshape(-1, 16) if n % 16 == 0 else \
            torch.randn(n, generator=gen).to(dt)
        total += n * elt
        i += 1
    out = {"file_bytes": total, "tensors": len(tensors), "failures": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "big.safetensors")
        lora_fast.save_file(tensors, path)
        del tensors
        for rnd in range(2):  # the first round reads from a freshly written page cache too; both are reported
            _sync(device)
            t0 = time.perf_counter()
            ref = st_load_file(path, device=str(device))
            _sync(device)
            t_st = time.perf_counter() - t0
            t0 = time.perf_counter()
            got = lora_fast.load_file(path, device=str(device))
            _sync(device)
            t_lf = time.perf_counter() - t0
            out[f"round{rnd}"] = {"safetensors_s": t_st, "lora_fast_s": t_lf,
                                  "safetensors_GBps": total / t_st / 1e9, "lora_fast_GBps": total / t_lf / 1e9}
            bad = [k for k in ref if not torch.equal(ref[k], got[k])] + sorted(set(ref) ^ set(got))
            if bad:
                out["failures"].append(f"round {rnd}: {len(bad)} tensors differ, e.g. {bad[0]}")
            del ref, got
            log(f"[load_file {total / 1e9:.2f} GB -> {device}] round {rnd}: safetensors {t_st:.3f} s, "
                f"lora_fast {t_lf:.3f} s")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "gpu-out"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", choices=["full", "tiny"], default="full")
    p.add_argument("--dtype", action="append", choices=sorted(DTYPES))
    p.add_argument("--rank", type=int, default=32)
    p.add_argument("--file-gb", type=float, default=2.0)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    def log(msg):
        print(msg, flush=True)

    report = {"device": str(args.device), "size": args.size, "torch": torch.__version__}
    if str(args.device).startswith("cuda"):
        report["device_name"] = torch.cuda.get_device_name(args.device)
    report["fuse"] = [check_fuse(args.size, d, args.device, args.rank, log) for d in args.dtype or ["fp16", "bf16"]]
    report["load_file"] = check_load_file(int(args.file_gb * 1e9), args.device, log)
    failures = [f for r in report["fuse"] for f in r["failures"]] + report["load_file"]["failures"]
    report["failures"] = failures
    with open(os.path.join(args.out, "gpu_checks.json"), "w") as f:
        json.dump(report, f, indent=2)
    log(f"gpu_checks: {len(failures)} failures" + "".join(f"\n  {x}" for x in failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
