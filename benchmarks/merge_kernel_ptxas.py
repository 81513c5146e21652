"""What the Triton merge kernel compiles to, without a GPU: registers, spills and global memory instructions.

    python benchmarks/merge_kernel_ptxas.py [--arch 90] [--dtype fp16]

Compiles each launch variant ahead of time for an NVIDIA target (Triton's own pipeline down to PTX) and runs the
ptxas that Triton ships with ``-v`` on it. Registers per thread bound how many warps an SM keeps resident (65,536
registers per SM); the counts of ``ld.global``/``st.global`` instructions by width show whether weight tiles and down
rows are read with vector accesses. These are properties of the code, not timings.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from lora_fast.kernels import merge as M

MODES = {"plain fuse": (M.MODE_PLAIN, False), "count": (M.MODE_COUNT, False), "write": (M.MODE_WRITE, False),
         "unfuse (own)": (M.MODE_RESTORE_OWN, True), "unfuse (per job)": (M.MODE_RESTORE, True)}
CODE = {"fp32": 0, "fp16": 1, "bf16": 2}


def specs(dt: int) -> dict:
    vw = 16 // (4 if dt == 0 else 2)
    return {
        "general": dict(RK=0, EXACT=False, UDT=-1, DDT=-1, TERMS=True, I64=True, WV=0, DV=0),
        "lora": dict(RK=0, EXACT=True, UDT=dt, DDT=dt, TERMS=False, I64=False, WV=vw, DV=vw),
        "lora, unrolled 32": dict(RK=32, EXACT=True, UDT=dt, DDT=dt, TERMS=False, I64=False, WV=vw, DV=vw),
        "lora, misaligned": dict(RK=0, EXACT=True, UDT=dt, DDT=dt, TERMS=False, I64=False, WV=0, DV=0),
        "lycoris terms": dict(RK=0, EXACT=True, UDT=dt, DDT=dt, TERMS=True, I64=False, WV=vw, DV=vw),
    }


def ptxas_binary() -> str:
    base = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):  # the one that reads the PTX version this Triton writes
        found = glob.glob(os.path.join(base, name))
        if found:
            return found[0]
    raise SystemExit("no ptxas in this Triton installation")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--dtype", default="fp16", choices=sorted(CODE))
    args = p.parse_args(argv)
    dt = CODE[args.dtype]
    kernel = M._triton_kernel()
    ptxas = ptxas_binary()
    bits = {0: "*i32", 1: "*i16", 2: "*i16"}[dt]
    print(f"tile {M.BLOCK_M}x{M.BLOCK_N}, {M.NUM_WARPS} warps, {args.dtype} weights, sm_{args.arch}, "
          f"triton {triton.__version__}")
    for spec_name, spec in specs(dt).items():
        for mode_name, (mode, negate) in MODES.items():
            sig = {"table": "*i64", "tile_job": "*i64", "counts": "*i32", "incl": "*i64", "rec_col": "*i8",
                   "rec_val": bits, "nonfinite": "*i64"}
            consts = dict(NJ=M._NJ, NP=M._NP, DT=dt, MODE=mode, NEGATE=negate, CHECK=False, BM=M.BLOCK_M,
                          BN=M.BLOCK_N, **spec)
            sig.update({k: "constexpr" for k in consts})
            compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts),
                                      target=GPUTarget("cuda", args.arch, 32),
                                      options={"enable_fp_fusion": False, "num_warps": M.NUM_WARPS})
            ptx = compiled.asm["ptx"]
            with tempfile.TemporaryDirectory() as tmp:
                src = os.path.join(tmp, "k.ptx")
                with open(src, "w") as f:
                    f.write(ptx)
                out = subprocess.run([ptxas, f"-arch=sm_{args.arch}a" if args.arch >= 90 else f"-arch=sm_{args.arch}",
                                      "-v", src, "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
            regs = re.findall(r"Used (\d+) registers", out.stderr)
            spill = re.findall(r"(\d+) bytes spill stores", out.stderr)
            mem = Counter(t for line in ptx.splitlines() for t in line.split() if re.match(r"(ld|st)\.global", t))
            mem = ", ".join(f"{k.split('.', 2)[0]} {k.split('.', 2)[2]} x{v}" for k, v in sorted(mem.items())
                            if not k.endswith("b64"))
            print(f"{spec_name:>18} | {mode_name:<16} | {regs[0] if regs else '?':>3} registers, "
                  f"{spill[0] if spill else '?'} bytes spilled | {mem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
