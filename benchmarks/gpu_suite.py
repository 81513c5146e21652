"""Everything that needs a GPU, in one command (for the device tool: few, full calls).

    python benchmarks/gpu_suite.py --out "$OUT"

Steps, each logged to <out>/gpu_suite.log and skipped (with the reason) when its requirements are missing:
1. environment: GPU name, driver, torch/triton versions, the commit;
2. build the C++ extension in place if it is not importable (needs pybind11 on that machine);
3. the CUDA tests (``pytest -m cuda``: every test marked ``cuda``, see tests/conftest.py) and the Triton kernel tests;
4. whole-model checks (benchmarks/gpu_checks.py): an SDXL-shaped UNet fused and unfused on the GPU in fp16 and bf16
   (rank 32 on every transformer linear): exact unfuse, fused values against float64, the same bits as the CPU
   kernel; ``load_file(device="cuda")`` against safetensors' on a 2 GB file;
5. benchmarks: segmented shrink/expand at SD1.5 layer shapes (fp16, bf16, fp32), the merge kernel alone for each
   tile configuration (benchmarks/bench_merge_tiles.py: cached fuse, unfuse, safe and plain fuse against the copy
   floor, the same bits for every configuration), then, if diffusers is importable, the per-sample UNet step (fp16)
   and the fuse benchmark on CUDA.
JSON results land in <out>; copy the figures, device and commit into benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "gpu-out"))
    p.add_argument("--quick", action="store_true", help="kernel benchmarks only, no UNet/fuse benchmarks")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    log = open(os.path.join(args.out, "gpu_suite.log"), "w")
    failures = 0

    def step(title, cmd, timeout=900):
        nonlocal failures
        print(f"\n## {title}\n$ {' '.join(cmd)}", file=log, flush=True)
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
            print(proc.stdout[-20000:] + proc.stderr[-8000:], f"\n[exit {proc.returncode}]", file=log, flush=True)
            failures += proc.returncode != 0
        except subprocess.TimeoutExpired:
            print(f"[timed out after {timeout} s]", file=log, flush=True)
            failures += 1

    py = sys.executable
    os.environ["LORA_FAST_TRITON_FALLBACK"] = "0"  # a kernel that fails to compile must fail the suite, not fall back
    step("environment", [py, "-c", "import torch, subprocess; print(torch.__version__, torch.version.cuda, "
                         "torch.cuda.get_device_name()); import triton; print('triton', triton.__version__); "
                         "print(subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, "
                         "text=True).stdout)"])
    step("nvidia-smi", ["nvidia-smi"])
    if importlib.util.find_spec("lora_fast._C") is None:
        step("build the extension", [py, "setup.py", "build_ext", "--inplace"])
    step("CUDA tests", [py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-rs",
                        "--junitxml", os.path.join(args.out, "cuda_tests.xml"), "tests"], timeout=300)
    step("whole-model checks", [py, "benchmarks/gpu_checks.py", "--out", args.out], timeout=300)
    step("kernel tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels_shrink_expand.py",
                          "tests/test_kernels_merge.py"])
    for dt in ("fp16", "bf16", "fp32"):
        step(f"shrink/expand {dt}", [py, "benchmarks/bench_kernels_shrink_expand.py", "--device", "cuda", "--dtype", dt,
                                     "--repeats", "20", "--json", os.path.join(args.out, f"shrink_expand_{dt}.json")])
    step("merge kernel per tile configuration (fp16, SDXL linear shapes)",
         [py, "benchmarks/bench_merge_tiles.py", "--device", "cuda", "--out", os.path.join(args.out, "merge_tiles.json")],
         timeout=600)
    if not args.quick and importlib.util.find_spec("diffusers") is not None:
        step("per-sample UNet step fp16", [py, "benchmarks/bench_per_sample.py", "--device", "cuda", "--dtype", "fp16",
                                           "--json", os.path.join(args.out, "per_sample_fp16.json")])
        step("fuse on CUDA", [py, "benchmarks/bench_fuse.py", "--device", "cuda", "--no-diffusers",
                              "--out", os.path.join(args.out, "fuse_cuda.json")])
    elif not args.quick:
        print("\n## UNet/fuse benchmarks skipped: diffusers is not importable here", file=log, flush=True)
    log.close()
    print(open(os.path.join(args.out, "gpu_suite.log")).read()[-12000:])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
