"""Fuse/unfuse benchmark: lora_fast vs diffusers vs the measured floor, all in one run.

    python benchmarks/bench_fuse.py                      # SD1.5 attention r4 + SDXL all-linear r32, fp32/fp16/bf16
    python benchmarks/bench_fuse.py --case sd15-attn-r4 --dtype fp16 --out bench-out/fuse.json
    python benchmarks/bench_fuse.py --device cuda        # on a GPU: the floor is the device's copy/matmul rate

The table is lora_fast.bench.format_table's (the one ``lora-fast bench`` prints); a PNG chart goes next to the JSON.
"""

import argparse
import json
import os
import subprocess
import sys

from lora_fast import bench


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", action="append", choices=sorted(bench.CASES))
    parser.add_argument("--dtype", action="append", choices=sorted(bench.DTYPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", default="bench-out/fuse.json")
    args = parser.parse_args()
    report = bench.run(cases=args.case or ["sd15-attn-r4", "sdxl-linear-r32"], dtypes=args.dtype or ["fp32", "fp16", "bf16"],
                       repeats=args.repeats, compare_diffusers=not args.no_diffusers, device=args.device)
    try:
        report["commit"] = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        report["commit"] = None
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(bench.format_table(report))
    chart = os.path.splitext(args.out)[0] + ".png"
    if bench.write_chart(report, chart):
        print(f"wrote {chart}", file=sys.stderr)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
