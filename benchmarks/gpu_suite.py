"""Everything that needs a GPU, in one command (for the device tool: few, full calls).

    python benchmarks/gpu_suite.py --out "$OUT" [--budget 540] [--quick]

Steps run in priority order inside a time budget (seconds, default 540: a device call may run 600); a step gets at
most what is left of it and is skipped, with the reason, once too little is left, so one call always ends with the
most important figures written. Each step is logged to <out>/gpu_suite.log.
1. environment: GPU name, driver, torch/triton versions, the commit; build the C++ extension in place if it is not
   importable (needs pybind11 on that machine);
2. the merge kernel alone for each tile configuration (benchmarks/bench_merge_tiles.py, fp16, SDXL's linear shapes:
   cached, uncached, safe and plain fuse and unfuse against the copy floor; the same bits for every configuration);
3. ``lora-fast bench --device cuda --model sdxl --dtype fp16``: the whole-model fuse/unfuse, safe_fusing, uncached
   fuse and fuse-on-load figures (against diffusers when it is importable) with the floor measured in the same run;
4. the live step (benchmarks/bench_live.py --step-only: SD1.5 UNet fp16, batch 16, latent 64; base / one adapter
   live / per-sample adapters), when diffusers is importable;
   then the first fuse of a fresh process on a cold Triton cache, with the kernel variants compiled ahead in
   parallel and one at a time (benchmarks/bench_first_fuse.py);
5. the CUDA tests (``pytest -m cuda``) and the whole-model checks (benchmarks/gpu_checks.py: exact unfuse, fused
   values against float64, the same bits as the CPU kernel, ``load_file(device="cuda")``);
6. the rest: Triton kernel tests, segmented shrink/expand at SD1.5 layer shapes (and per tile configuration), the
   per-sample UNet step, the fuse benchmark on CUDA.
Every step runs with LORA_FAST_TRITON_FALLBACK=0: a kernel that fails its first-use probe, or to compile, fails the
step instead of falling back. JSON results land in <out>; copy the figures, device and commit into
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def steps(out: str, py: str, quick: bool, have_diffusers: bool) -> list:
    """(title, command, longest useful run in seconds, shortest worth starting) in priority order."""
    j = lambda name: os.path.join(out, name)  # noqa: E731
    todo = [
        ("environment", [py, "-c", "import torch, subprocess; print(torch.__version__, torch.version.cuda, "
                         "torch.cuda.get_device_name()); import triton; print('triton', triton.__version__); "
                         "print(subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, "
                         "text=True).stdout)"], 60, 5),
        ("nvidia-smi", ["nvidia-smi"], 30, 5),
    ]
    if importlib.util.find_spec("lora_fast._C") is None:
        todo.append(("build the extension", [py, "setup.py", "build_ext", "--inplace"], 300, 60))
    todo.append(("merge kernel per tile configuration (fp16, SDXL linear shapes)",
                 [py, "benchmarks/bench_merge_tiles.py", "--device", "cuda", "--out", j("merge_tiles.json")], 240, 60))
    if not quick:
        todo.append(("SDXL fuse/unfuse, safe, uncached, fuse-on-load (lora-fast bench)",
                     [py, "-m", "lora_fast", "bench", "--device", "cuda", "--model", "sdxl", "--dtype", "fp16",
                      "--repeats", "5", "--warmup", "1", "--compare", "diffusers" if have_diffusers else "none",
                      "--out", j("bench_sdxl")], 300, 90))
        if have_diffusers:
            todo.append(("live step: SD1.5 UNet fp16, batch 16, latent 64",
                         [py, "benchmarks/bench_live.py", "--step-only", "--device", "cuda", "--dtype", "fp16",
                          "--size", "full", "--batch", "16", "--latent", "64", "--step-repeats", "5",
                          "--out", j("live_step.json")], 180, 45))
        todo.append(("first fuse on a cold Triton cache: variants compiled ahead in parallel vs one at a time",
                     [py, "benchmarks/bench_first_fuse.py", "--device", "cuda", "--out", j("first_fuse.json")],
                     150, 40))
    todo += [
        ("CUDA tests", [py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-rs",
                        "--junitxml", j("cuda_tests.xml"), "tests"], 300, 60),
        ("whole-model checks", [py, "benchmarks/gpu_checks.py", "--out", out], 300, 60),
        ("kernel tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels_shrink_expand.py",
                          "tests/test_kernels_merge.py"], 300, 60),
    ]
    for dt in ("fp16", "bf16", "fp32"):
        todo.append((f"shrink/expand {dt}", [py, "benchmarks/bench_kernels_shrink_expand.py", "--device", "cuda",
                                             "--dtype", dt, "--repeats", "20", "--json", j(f"shrink_expand_{dt}.json")],
                     120, 20))
    todo.append(("shrink/expand fp16 per tile configuration",
                 [py, "benchmarks/bench_kernels_shrink_expand.py", "--device", "cuda", "--dtype", "fp16", "--repeats",
                  "20", "--tiles", "32x32x32x64x4,64x32x64x64x4,128x32x64x128x4,64x64x128x128x8,128x64x128x64x8",
                  "--json", j("shrink_expand_tiles_fp16.json")], 180, 60))
    if not quick and have_diffusers:
        todo.append(("per-sample UNet step fp16", [py, "benchmarks/bench_per_sample.py", "--device", "cuda", "--dtype",
                                                   "fp16", "--json", j("per_sample_fp16.json")], 180, 45))
        todo.append(("fuse on CUDA", [py, "benchmarks/bench_fuse.py", "--device", "cuda", "--no-diffusers",
                                      "--out", j("fuse_cuda.json")], 300, 60))
    return todo


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT", "gpu-out"))
    p.add_argument("--quick", action="store_true", help="kernel steps only, no whole-model benchmarks")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for all steps together")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    deadline = time.monotonic() + args.budget
    log = open(os.path.join(args.out, "gpu_suite.log"), "w")
    failures = 0
    os.environ["LORA_FAST_TRITON_FALLBACK"] = "0"  # a kernel that fails to compile must fail the suite, not fall back
    have_diffusers = importlib.util.find_spec("diffusers") is not None
    for title, cmd, longest, shortest in steps(args.out, sys.executable, args.quick, have_diffusers):
        left = deadline - time.monotonic()
        print(f"\n## {title}\n$ {' '.join(cmd)}", file=log, flush=True)
        if left < shortest:
            print(f"[skipped: {left:.0f} s of the budget left, the step needs at least {shortest} s]", file=log,
                  flush=True)
            continue
        timeout = min(longest, left)
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
            print(proc.stdout[-20000:] + proc.stderr[-8000:], f"\n[exit {proc.returncode}, "
                  f"{time.monotonic() - t0:.0f} s]", file=log, flush=True)
            failures += proc.returncode != 0
        except subprocess.TimeoutExpired:
            print(f"[timed out after {timeout:.0f} s]", file=log, flush=True)
            failures += 1
    log.close()
    print(open(os.path.join(args.out, "gpu_suite.log")).read()[-12000:])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
