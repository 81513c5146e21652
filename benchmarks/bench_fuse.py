"""Fuse/unfuse benchmark: lora_fast vs diffusers vs the measured floor, all in one run.

    python benchmarks/bench_fuse.py                      # SD1.5 attention r4 + SDXL all-linear r32, fp32/fp16/bf16
    python benchmarks/bench_fuse.py --case sd15-attn-r4 --dtype fp16 --out bench-out/fuse.json
    python benchmarks/bench_fuse.py --device cuda        # on a GPU: the floor is the device's copy/matmul rate
    python benchmarks/bench_fuse.py --memory             # what a warm fuse keeps resident vs its record (SD1.5 UNet)

The table is lora_fast.bench.format_table's (the one ``lora-fast bench`` prints); a PNG chart goes next to the JSON.
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

from lora_fast import bench


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory(dtypes, repeats: int, threads=None) -> dict:
    """Full-size SD1.5 UNet (random weights from the config), rank 4 on the attention projections, CPU: per dtype,
    after two untimed fuse/unfuse cycles, ``repeats`` warm fuses, each measured as the growth of the process's
    resident set across the fuse call (``/proc/self/statm``, garbage collector off) next to the record bytes
    (``fused_record_bytes``) and the fp32 factors the fuse keeps for its unfuse, all as % of the fused weights'
    bytes. The first fuse after loading is reported apart (one-time costs)."""
    import torch

    import lora_fast
    from lora_fast import engine
    from lora_fast.models import build_components, materialize

    if threads:
        torch.set_num_threads(threads)
    out = {"threads": torch.get_num_threads(), "load_average": os.getloadavg(), "cases": []}
    for name in dtypes:
        dtype = bench.DTYPES[name]
        unet = materialize(build_components("sd15", "full", device="meta", text_encoders=False)["unet"], dtype=dtype)
        target = {"unet": unet}
        adapter = bench.make_adapter(target, "attn", 4, dtype=dtype)
        wbytes = sum(w.numel() * w.element_size() for w in bench._targeted(target, adapter))
        lora_fast.load_lora_weights(target, adapter)
        gc.collect()
        gc.disable()
        try:
            before = _rss()
            lora_fast.fuse_lora(target)
            first = _rss() - before
            lora_fast.unfuse_lora(target)
            lora_fast.fuse_lora(target)
            lora_fast.unfuse_lora(target)
            kept, times = [], []
            for _ in range(repeats):
                before = _rss()
                t = time.perf_counter()
                lora_fast.fuse_lora(target)
                times.append(time.perf_counter() - t)
                kept.append(_rss() - before)
                record = engine.fused_record_bytes(target)
                step = engine.component_state(unet).fused[-1]
                factors = sum((j.up.numel() + j.down.numel()) * 4 for j in step.jobs)
                lora_fast.unfuse_lora(target)
        finally:
            gc.enable()
        pct = lambda b: round(100.0 * b / wbytes, 2)  # noqa: E731
        case = {"dtype": name, "modules": len(adapter.layers), "weight_bytes": wbytes, "record_bytes": record,
                "record_pct": pct(record), "kept_bytes_median": statistics.median(kept),
                "kept_pct_median": pct(statistics.median(kept)), "kept_pct_max": pct(max(kept)),
                "first_fuse_kept_pct": pct(first), "job_factor_bytes": factors, "job_factor_pct": pct(factors),
                "fuse_ms_median": round(statistics.median(times) * 1e3, 1)}
        out["cases"].append(case)
        print(f"{name}: weights {wbytes / 2**20:.1f} MiB, record {record / 2**20:.1f} MiB ({case['record_pct']}%), "
              f"kept by a warm fuse {case['kept_bytes_median'] / 2**20:.1f} MiB ({case['kept_pct_median']}%, max "
              f"{case['kept_pct_max']}%), first fuse {case['first_fuse_kept_pct']}%, fp32 factors kept for unfuse "
              f"{case['job_factor_pct']}%, fuse {case['fuse_ms_median']} ms", file=sys.stderr)
        del unet, target, adapter
        gc.collect()
    return out


def _write(report: dict, out: str) -> None:
    """The report as JSON at ``out``, with the commit it was measured at."""
    try:
        report["commit"] = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        report["commit"] = None
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", action="append", choices=sorted(bench.CASES))
    parser.add_argument("--dtype", action="append", choices=sorted(bench.DTYPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", default="bench-out/fuse.json")
    parser.add_argument("--memory", action="store_true", help="only the kept-memory measurement (SD1.5 UNet, CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch/merge thread count (default: torch's)")
    args = parser.parse_args()
    if args.memory:
        report = memory(args.dtype or ["fp32", "bf16"], args.repeats if args.repeats > 3 else 7, args.threads)
        _write(report, args.out)
        print(json.dumps(report, indent=2))
        return
    report = bench.run(cases=args.case or ["sd15-attn-r4", "sdxl-linear-r32"], dtypes=args.dtype or ["fp32", "fp16", "bf16"],
                       repeats=args.repeats, compare_diffusers=not args.no_diffusers, device=args.device)
    _write(report, args.out)
    print(bench.format_table(report))
    chart = os.path.splitext(args.out)[0] + ".png"
    if bench.write_chart(report, chart):
        print(f"wrote {chart}", file=sys.stderr)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
