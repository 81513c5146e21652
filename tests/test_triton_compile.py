"""The Triton kernels compile for real NVIDIA targets, ahead of time, without a GPU.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute but not that they compile: it runs the Python
of the kernel on numpy and accepts code the compiler rejects (types, dot shapes, pointer casts, control flow).
Here every launch configuration the launchers use goes through Triton's real pipeline (TTIR -> TTGIR -> LLVM ->
PTX -> ptxas cubin) for Ampere (sm_80) and Hopper (sm_90), so a kernel that would not build on a GPU fails in CI.
"""

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lora_fast.kernels import merge as M  # noqa: E402
from lora_fast.kernels import shrink_expand as S  # noqa: E402

TARGETS = [GPUTarget("cuda", 80, 32), GPUTarget("cuda", 90, 32)]
ELEM = {0: "*fp32", 1: "*fp16", 2: "*bf16"}
BITS = {0: "*i32", 1: "*i16", 2: "*i16"}


def compile_for(fn, signature: dict, constexprs: dict, target, **options):
    for name in constexprs:
        signature[name] = "constexpr"
    assert set(signature) == set(fn.arg_names), sorted(set(fn.arg_names) ^ set(signature))
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=target,
                            options=options or None)
    assert kernel.asm.get("cubin"), "no machine code"
    return kernel


def contractible_fp32_ops(ptx: str) -> list:
    """fp32 mul/add/sub without a rounding modifier: ptxas may fuse such a pair into one fma (two roundings
    become one), so the bits would differ from the C++ kernel's."""
    return sorted({line.split()[0] for line in ptx.splitlines()
                   if line.strip().split(" ")[0] in ("mul.f32", "add.f32", "sub.f32")})


def compile_segmented(target, dt: int, block_r: int, sm=S.SHRINK_BLOCK_M, sk=S.SHRINK_BLOCK_K, em=S.EXPAND_BLOCK_M,
                      en=S.EXPAND_BLOCK_N, warps=None):
    """The segmented shrink and expand kernels with the launchers' signatures, for these tiles."""
    shrink, expand = S._kernels()
    opts = {} if warps is None else {"num_warps": warps}
    compile_for(shrink, {
        "x_ptr": ELEM[dt], "h_ptr": "*fp32", "table_ptr": "*i64", "rows_ptr": "*i64", "seg_start_ptr": "*i32",
        "seg_group_ptr": "*i32", "K": "i32", "stride_xm": "i32", "stride_hm": "i32",
    }, {"DT": dt, "DOT16": True, "BLOCK_M": sm, "BLOCK_K": sk, "BLOCK_R": block_r}, target, **opts)
    compile_for(expand, {
        "h_ptr": "*fp32", "out_ptr": "*i16" if dt == 2 else ELEM[dt], "table_ptr": "*i64", "scale_ptr": "*fp32",
        "coef_ptr": "*fp32", "rows_ptr": "*i64", "seg_start_ptr": "*i32", "seg_group_ptr": "*i32", "seg_base": "i32",
        "N": "i32", "stride_hm": "i32", "stride_om": "i32", "lam": "fp32",
    }, {"DT": dt, "BLOCK_M": em, "BLOCK_N": en, "BLOCK_R": block_r}, target, **opts)


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"sm{t.arch}")
@pytest.mark.parametrize("dt", [0, 1, 2], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("block_r", [16, 128])
def test_segmented_shrink_and_expand_compile(target, dt, block_r):
    compile_segmented(target, dt, block_r)


@pytest.mark.parametrize("tile", ["64x32x64x64x4", "128x64x128x128x8"])
def test_segmented_kernels_compile_with_other_tiles(tile):
    """The tile configurations benchmarks/bench_kernels_shrink_expand.py --tiles compares compile for sm_90."""
    compile_segmented(GPUTarget("cuda", 90, 32), 1, 16, *S._tile_config(tile))


def test_segmented_tile_configuration_is_checked():
    assert S._tile_config("32x32x32x64x4") == (32, 32, 32, 64, 4)
    for bad in ("32x32x32x64", "32x32x32x8x4", "32x32x48x64x4", "axbxcxdxe"):
        with pytest.raises(ValueError, match="LORA_FAST_SEGMENTED_TILE"):
            S._tile_config(bad)


# (mode, negate, check, pointer types of counts/incl/rec_col/rec_val/nonfinite) for each launch the merge
# launcher makes; unused pointers get the table (int64)
MERGE_VARIANTS = {
    "fuse-no-record": (M.MODE_PLAIN, False, False, "i64 i64 i64 i64 i64"),
    "fuse-no-record-check": (M.MODE_PLAIN, False, True, "i64 i64 i64 i64 i32"),
    "unfuse-no-record": (M.MODE_PLAIN, True, False, "i64 i64 i64 i64 i64"),
    "count": (M.MODE_COUNT, False, False, "i32 i64 i64 i64 i64"),
    "count-check": (M.MODE_COUNT, False, True, "i32 i64 i64 i64 i32"),
    "write-incl32": (M.MODE_WRITE, False, False, "i32 i32 i8 VAL i64"),
    "write-incl64": (M.MODE_WRITE, False, False, "i32 i64 i8 VAL i64"),
    "write-check": (M.MODE_WRITE, False, True, "i32 i64 i8 VAL i64"),
    "unfuse-restore": (M.MODE_RESTORE, True, False, "i64 i64 i64 i64 i64"),
    "unfuse-restore-own": (M.MODE_RESTORE_OWN, True, False, "i64 i64 i8 VAL i64"),
}

# the specializations a launch group gets (_Plan.spec): the general one (any rank at run time, factor dtypes per
# factor, LyCORIS terms, 64-bit offsets, no vector access) and the one of a plain LoRA fuse (one factor dtype,
# 32-bit offsets, 16-byte vector accesses), with an unrolled rank loop padded to the largest rank
SPECS = {
    "general": dict(RK=0, EXACT=False, UDT=-1, DDT=-1, TERMS=True, I64=True, WV=0, DV=0),
    "lora": dict(RK=0, EXACT=True, UDT=2, DDT=1, TERMS=False, I64=False, WV=-1, DV=8),
    "unrolled": dict(RK=8, EXACT=False, UDT=0, DDT=2, TERMS=False, I64=False, WV=-1, DV=8),
}


# the general specialization on sm_80, the LoRA one on sm_90, in every dtype and mode; fp8 weights and the unrolled
# rank loop on sm_90 only
MERGE_CASES = ([(TARGETS[0], dt, "general", v) for dt in (0, 1, 2) for v in MERGE_VARIANTS]
               + [(TARGETS[1], dt, "lora", v) for dt in (0, 1, 2, 3) for v in MERGE_VARIANTS]
               + [(TARGETS[1], 1, "unrolled", v) for v in ("write-incl64", "unfuse-restore-own")])


@pytest.mark.parametrize("target, dt, spec, variant", MERGE_CASES,
                         ids=[f"sm{t.arch}-{['fp32', 'fp16', 'bf16', 'fp8e4m3'][d]}-{s}-{v}" for t, d, s, v in MERGE_CASES])
def test_merge_kernel_compiles(target, dt, spec, variant):
    mode, negate, check, ptrs = MERGE_VARIANTS[variant]
    kernel = M._triton_kernel()
    names = ["counts", "incl", "rec_col", "rec_val", "nonfinite"]
    sig = {"table": "*i64", "tile_job": "*i64"}
    bits = {**BITS, 3: "*i8"}
    for name, p in zip(names, ptrs.split()):
        sig[name] = bits[dt] if p == "VAL" else "*" + p
    sp = dict(SPECS[spec])
    if sp["WV"] < 0:
        sp["WV"] = 16 // {0: 4, 1: 2, 2: 2, 3: 1}[dt]
    compiled = compile_for(kernel, sig, {"NJ": M._NJ, "NP": M._NP, "DT": dt, "MODE": mode, "NEGATE": negate,
                                         "CHECK": check, "BM": M.BLOCK_M, "BN": M.BLOCK_N, **sp}, target,
                           enable_fp_fusion=False, num_warps=M.NUM_WARPS)  # as launched
    ptx = compiled.asm["ptx"]
    assert not contractible_fp32_ops(ptx), contractible_fp32_ops(ptx)
    assert "fma.rn.f32" in ptx  # the explicit tl.fma chain stays one rounding per step (every mode computes it)
    if sp["WV"]:  # the weight tile is read (and written) with vector accesses
        assert "ld.global.v" in ptx
        assert "st.global.v" in ptx or mode == M.MODE_COUNT
    if sp["WV"] and mode in (M.MODE_RESTORE, M.MODE_RESTORE_OWN):
        # the restore stores the tile, then the recorded elements over it: a block barrier must separate the two
        # (the interpreter runs stores in program order and cannot show this)
        lines = ptx.splitlines()
        vec = [i for i, ln in enumerate(lines) if "st.global.v" in ln]
        scatter = [i for i, ln in enumerate(lines) if "st.global.b" in ln]
        bars = [i for i, ln in enumerate(lines) if "bar.sync" in ln or "barrier.sync" in ln]
        assert vec and scatter and max(vec) < min(scatter), (vec, scatter)
        assert any(max(vec) < b < min(scatter) for b in bars), (vec, bars, scatter)
