"""``python -m lora_fast demo``: the built-in demo (the full ``lora-fast`` command line is a later issue)."""

import argparse
import sys


def _demo(args) -> int:
    from . import bench

    try:
        import diffusers  # noqa: F401
    except ImportError:
        print("the demo builds diffusers-shaped models: pip install 'lora_fast[diffusers]'", file=sys.stderr)
        return 2
    report = bench.run(cases=tuple(args.case), dtypes=tuple(args.dtype), repeats=args.repeats,
                       compare_diffusers=not args.no_diffusers, size=args.size)
    print()
    print(f"{'case':18} {'dtype':5} {'fuse ms':>9} {'unfuse ms':>9} {'floor ms':>9} {'x floor':>7} "
          f"{'diffusers fuse ms':>17} {'speedup':>7} {'our changed bits':>16} {'diffusers changed':>17}")
    for r in report["results"]:
        lf, df = r["lora_fast"], r["diffusers"]
        d_fuse = df.get("fuse_s")
        print(f"{r['case']:18} {r['dtype']:5} {lf['fuse_s'] * 1e3:9.1f} {lf['unfuse_s'] * 1e3:9.1f} "
              f"{r['floor_s'] * 1e3:9.1f} {lf['fuse_s'] / r['floor_s']:7.2f} "
              f"{(d_fuse or float('nan')) * 1e3:17.1f} {(d_fuse or float('nan')) / lf['fuse_s']:7.1f} "
              f"{lf['changed_elements_after_cycles']:16d} "
              f"{df.get('changed_elements_after_one_cycle', -1):17d}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lora_fast")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="fuse/unfuse a random LoRA on a built-in model, vs diffusers and the floor")
    demo.add_argument("--case", action="append", choices=sorted(__import__("lora_fast.bench").bench.CASES),
                      help="benchmark case (repeatable; default sd15-attn-r4)")
    demo.add_argument("--dtype", action="append", choices=["fp32", "fp16", "bf16"], help="repeatable; default fp16")
    demo.add_argument("--size", choices=["full", "tiny"], default="full")
    demo.add_argument("--repeats", type=int, default=3)
    demo.add_argument("--no-diffusers", action="store_true", help="skip the diffusers comparison")
    args = parser.parse_args(argv)
    args.case = args.case or ["sd15-attn-r4"]
    args.dtype = args.dtype or ["fp16"]
    return _demo(args)


if __name__ == "__main__":
    sys.exit(main())
