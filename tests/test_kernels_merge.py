"""Fused merge kernels: accuracy against a float64 reference, bit-exact fuse/unfuse, records, non-finite flags,
CPU ISA agreement, and the Triton kernel (interpreted on the CPU, in a subprocess) against the C++ kernel."""

import os
import subprocess
import sys
import textwrap

import pytest
from triton_support import exact_fma_interpreter
import torch

from lora_fast.kernels import merge as M

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(BITS[t.dtype])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def ulp(v: torch.Tensor) -> torch.Tensor:
    """Spacing above |v| in v's dtype, as float64 (v finite)."""
    a = v.abs().contiguous()
    nxt = (a.view(BITS[v.dtype]) + 1).view(v.dtype)
    return nxt.double() - a.double()


def make(rows, cols, rank, dtype, *, w_scale=0.05, d_scale=0.1, gen=None):
    w = (torch.randn(rows, cols, generator=gen) * w_scale).to(dtype)
    up = torch.randn(rows, rank, generator=gen) * d_scale
    down = torch.randn(rank, cols, generator=gen) * d_scale
    return w, up, down


def check_against_reference(w_new, w_old, up, down):
    """|W' - (W + up@down)| <= half a dtype ulp at W' (the final rounding) + the fp32 add's rounding
    + the fp32 FMA chain's accumulation error, bounded by (R+1)·2^-24·Σ_k |up_ik·down_kj|."""
    u = 2.0**-24
    r = up.shape[1]
    exact_delta = up.double() @ down.double()
    exact = w_old.double() + exact_delta
    abs_terms = up.double().abs() @ down.double().abs()
    bound = (0.5 * ulp(w_new) + u * (w_old.double().abs() + exact_delta.abs() + abs_terms)
             + (r + 1) * u * abs_terms * 1.01)
    err = (w_new.double() - exact).abs()
    assert torch.isfinite(w_new.double()).all()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error exceeds the bound by {worst:.3f}x"


def fuse_unfuse_exact(jobs, **kw):
    originals = [j.weight.clone() for j in jobs]
    records, _ = M.fuse(jobs, **kw)
    M.unfuse(jobs, records, **{k: v for k, v in kw.items() if k in ("backend", "num_threads")})
    for j, o in zip(jobs, originals):
        assert same_bits(j.weight, o)
    return records


# ------------------------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rank", [1, 4, 33])
@pytest.mark.parametrize("shape", [(1, 97), (97, 1), (97, 131), (64, 320), (7, 1000)])
def test_fuse_matches_float64_reference(dtype, rank, shape):
    g = torch.Generator().manual_seed(hash((str(dtype), rank, shape)) % 2**31)
    w, up, down = make(*shape, rank, dtype, gen=g)
    old = w.clone()
    records, flags = M.fuse([M.MergeJob(w, up, down)])
    check_against_reference(w, old, up, down)
    assert flags == [False]
    assert not same_bits(w, old)  # the delta did something
    check_record_is_exactly_the_unrecoverable_elements(w, old, up, down, records[0])


def check_record_is_exactly_the_unrecoverable_elements(fused, original, up, down, rec):
    """The record lists, ascending, exactly the elements where rn(W' - delta) is not W, with W's bits."""
    back = fused.clone()
    M.unfuse([M.MergeJob(back, up, down)], [None])
    expected = (bits(back) != bits(original)).reshape(-1).nonzero().reshape(-1)
    idx = rec.flat_index()
    assert torch.equal(idx, expected)
    assert same_bits(rec.value, original.reshape(-1)[idx])
    assert rec.offsets.dtype == torch.int32 and rec.cols.dtype == torch.int16


@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_views_transposed_sliced_and_conv(dtype):
    g = torch.Generator().manual_seed(1)
    # fan_in_fan_out style: the job weight is the transpose of the stored tensor
    store = (torch.randn(53, 29, generator=g) * 0.05).to(dtype)
    up, down = torch.randn(29, 5, generator=g) * 0.1, torch.randn(5, 53, generator=g) * 0.1
    old = store.clone()
    rec = fuse_unfuse_exact([M.MergeJob(store.t(), up, down)])
    assert len(rec[0]) > 0
    M.fuse([M.MergeJob(store.t(), up, down)])
    check_against_reference(store.t(), old.t(), up, down)

    # every other column of a larger tensor: the columns in between must not move
    big = (torch.randn(31, 90, generator=g) * 0.05).to(dtype)
    before = big.clone()
    view = big[:, ::2]
    up, down = torch.randn(31, 3, generator=g) * 0.1, torch.randn(3, 45, generator=g) * 0.1
    M.fuse([M.MergeJob(view, up, down)])
    check_against_reference(view, before[:, ::2], up, down)
    assert same_bits(big[:, 1::2], before[:, 1::2])

    # conv k x k weight merged through its (out, in*k*k) reshape
    conv = (torch.randn(16, 8, 3, 3, generator=g) * 0.05).to(dtype)
    cold = conv.clone()
    up, down = torch.randn(16, 4, generator=g) * 0.1, torch.randn(4, 72, generator=g) * 0.1
    M.fuse([M.MergeJob(conv.view(16, 72), up, down)])
    check_against_reference(conv.view(16, 72), cold.view(16, 72), up, down)


def test_many_jobs_mixed_dtypes_in_one_call_and_thread_count_does_not_matter():
    g = torch.Generator().manual_seed(2)
    specs = [(40, 70, 4, torch.float16), (3, 5, 1, torch.float32), (130, 33, 9, torch.bfloat16),
             (64, 64, 32, torch.float32), (1, 1, 2, torch.float16)]
    base = [make(r, c, k, d, gen=g) for r, c, k, d in specs]
    results = []
    for nt in (1, 2, 3):
        jobs = [M.MergeJob(w.clone(), up, down) for w, up, down in base]
        recs, _ = M.fuse(jobs, num_threads=nt)
        results.append((jobs, recs))
    for jobs, recs in results[1:]:
        for a, b, ra, rb in zip(jobs, results[0][0], recs, results[0][1]):
            assert same_bits(a.weight, b.weight)
            assert torch.equal(ra.offsets, rb.offsets) and torch.equal(ra.cols, rb.cols)
            assert same_bits(ra.value, rb.value)
    for (w, up, down), job in zip(base, results[0][0]):
        check_against_reference(job.weight, w, up, down)


# ------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("dtype", DTYPES)
def test_200_cycles_with_different_adapters_restore_every_bit(dtype):
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(23, 37, generator=g) * 0.05).to(dtype)
    pristine = w.clone()
    total = 0
    for cycle in range(200):
        rank = 1 + cycle % 7
        scale = [0.003, 0.03, 0.3][cycle % 3]
        up = torch.randn(23, rank, generator=g) * scale
        down = torch.randn(rank, 37, generator=g) * scale
        records, _ = M.fuse([M.MergeJob(w, up, down)])
        total += len(records[0])
        M.unfuse([M.MergeJob(w, up, down)], records)
        assert same_bits(w, pristine), f"cycle {cycle}"
    assert total > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_stacked_fuses_unfuse_in_reverse_order(dtype):
    g = torch.Generator().manual_seed(4)
    w = (torch.randn(40, 50, generator=g) * 0.05).to(dtype)
    pristine = w.clone()
    stack = []
    for _ in range(5):
        job = M.MergeJob(w, torch.randn(40, 4, generator=g) * 0.2, torch.randn(4, 50, generator=g) * 0.2)
        stack.append((job, M.fuse([job])[0]))
    for job, recs in reversed(stack):
        M.unfuse([job], recs)
    assert same_bits(w, pristine)


def special_values(dtype, n, gen):
    """Random weights with NaNs (several payloads and signs), infinities, subnormals, -0.0, +0.0, extremes."""
    w = (torch.randn(n, generator=gen) * 0.05).to(dtype)
    b = w.view(BITS[dtype])
    info = torch.finfo(dtype)
    if dtype == torch.float32:
        raw = [0x7FC00000, 0x7F800001, 0xFFC00123, 0x7FBFFFFF, 0x7F800000, 0xFF800000, 0x00000001, 0x807FFFFF,
               0x80000000, 0x00000000, 0x7F7FFFFF, 0xFF7FFFFF, 0x00800000]
        vals = torch.tensor([x - (1 << 32) if x >= 1 << 31 else x for x in raw], dtype=torch.int32)
    else:
        if dtype == torch.float16:
            raw = [0x7E00, 0x7C01, 0xFE12, 0x7DFF, 0x7C00, 0xFC00, 0x0001, 0x83FF, 0x8000, 0x0000, 0x7BFF, 0xFBFF, 0x0400]
        else:
            raw = [0x7FC0, 0x7F81, 0xFFC1, 0x7FBF, 0x7F80, 0xFF80, 0x0001, 0x807F, 0x8000, 0x0000, 0x7F7F, 0xFF7F, 0x0080]
        vals = torch.tensor([x - (1 << 16) if x >= 1 << 15 else x for x in raw], dtype=torch.int16)
    pos = torch.randperm(n, generator=gen)[: len(vals)]
    b[pos] = vals
    assert info.max > 0
    return w


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d_scale", [0.05, 30.0])  # small deltas, and deltas >> W (most elements recorded)
def test_special_values_and_huge_deltas_restore_bit_exactly(dtype, d_scale):
    g = torch.Generator().manual_seed(5)
    w = special_values(dtype, 48 * 70, g).view(48, 70)
    up, down = torch.randn(48, 6, generator=g) * d_scale, torch.randn(6, 70, generator=g) * d_scale
    recs = fuse_unfuse_exact([M.MergeJob(w, up, down)])
    frac = len(recs[0]) / w.numel()
    if d_scale > 1:
        assert frac > 0.5
    # nbytes is what the record holds: 4-byte offset per row (+1), 2-byte column and the original per record
    assert recs[0].nbytes() == 4 * (48 + 1) + len(recs[0]) * (2 + w.element_size())


@pytest.mark.parametrize("dtype", DTYPES)
def test_check_finite_flags_only_the_bad_job_and_unfuse_still_restores(dtype):
    g = torch.Generator().manual_seed(6)
    jobs = [M.MergeJob(*make(20, 30, 3, dtype, gen=g)) for _ in range(4)]
    jobs[1].up[3, 1] = float("nan")
    jobs[2].down[0, 7] = float("inf")
    originals = [j.weight.clone() for j in jobs]
    recs, flags = M.fuse(jobs, check_finite=True)
    assert flags == [False, True, True, False]
    assert torch.isnan(jobs[1].weight[3]).any()
    M.unfuse(jobs, recs)
    for j, o in zip(jobs, originals):
        assert same_bits(j.weight, o)
    _, flags = M.fuse([M.MergeJob(*make(5, 5, 1, dtype, gen=g))], check_finite=False)
    assert flags == [False]


def test_overflow_to_inf_is_flagged_and_restored():
    w = torch.full((4, 20), 60000.0, dtype=torch.float16)
    pristine = w.clone()
    up, down = torch.full((4, 1), 100.0), torch.full((1, 20), 100.0)
    recs, flags = M.fuse([M.MergeJob(w, up, down)], check_finite=True)
    assert flags == [True] and torch.isinf(w).all()
    M.unfuse([M.MergeJob(w, up, down)], recs)
    assert same_bits(w, pristine)


@pytest.mark.parametrize("dtype", DTYPES)
def test_record_false_returns_none_and_unfuse_without_record_subtracts(dtype):
    g = torch.Generator().manual_seed(7)
    w, up, down = make(10, 12, 2, dtype, gen=g)
    old = w.clone()
    recs, flags = M.fuse([M.MergeJob(w, up, down)], record=False)
    assert recs == [None] and flags == [False]
    fused = w.clone()
    M.unfuse([M.MergeJob(w, up, down)], [None])
    # two roundings, each at most half an ulp of the larger neighbour (plus fp32 noise far below that)
    assert ((w.double() - old.double()).abs() <= ulp(fused) + ulp(old)).all()


def test_isa_paths_agree_bit_for_bit(monkeypatch):
    """The scalar fallback, AVX2 and AVX-512 kernels use the same FMA chain and rounding: identical results."""
    from lora_fast import _C

    levels = {"scalar": [1], "avx2": [1, 2], "avx512": [1, 2, 3]}[_C.merge_cpu_isa()]
    g = torch.Generator().manual_seed(8)
    for dtype in DTYPES:
        w0 = special_values(dtype, 37 * 83, g).view(37, 83)
        up, down = torch.randn(37, 5, generator=g) * 0.2, torch.randn(5, 83, generator=g) * 0.2
        outs = []
        for isa in levels:
            monkeypatch.setenv("LORA_FAST_MERGE_ISA", str(isa))
            w = w0.clone()
            recs, flags = M.fuse([M.MergeJob(w, up, down)], check_finite=True)
            outs.append((w.clone(), recs[0], flags))
            M.unfuse([M.MergeJob(w, up, down)], recs)
            assert same_bits(w, w0), (dtype, isa)
        for w, rec, flags in outs[1:]:
            assert flags == outs[0][2]
            nan = torch.isnan(w.float())
            assert torch.equal(nan, torch.isnan(outs[0][0].float()))
            assert same_bits(w[~nan], outs[0][0][~nan]), dtype


def test_record_paths_and_native_bf16_rounding_agree_bit_for_bit(monkeypatch):
    """Records written in final order per job (direct) or gathered after parallel tiles, and bf16 rounded by the
    native instruction or by integer ops: the same weights, records and flags, for one and two threads."""
    g = torch.Generator().manual_seed(12)
    for dtype in DTYPES:
        shapes = [(37, 83, 5), (300, 70, 3), (1, 129, 2), (64, 64, 7)]
        originals, factors = [], []
        for rows, cols, rank in shapes:
            originals.append(special_values(dtype, rows * cols, g).view(rows, cols))
            factors.append((torch.randn(rows, rank, generator=g) * 0.2, torch.randn(rank, cols, generator=g) * 0.2))
        outs = []
        for records in ("direct", "gather"):
            for no_bf16 in (False, True):
                for threads in (1, 2):
                    monkeypatch.setenv("LORA_FAST_MERGE_RECORDS", records)
                    if no_bf16:
                        monkeypatch.setenv("LORA_FAST_MERGE_NO_BF16", "1")
                    else:
                        monkeypatch.delenv("LORA_FAST_MERGE_NO_BF16", raising=False)
                    ws = [w.clone() for w in originals]
                    jobs = [M.MergeJob(w, up, down) for w, (up, down) in zip(ws, factors)]
                    recs, flags = M.fuse(jobs, check_finite=True, num_threads=threads)
                    outs.append(([w.clone() for w in ws], recs, flags))
                    M.unfuse(jobs, recs, num_threads=threads)
                    assert all(same_bits(w, o) for w, o in zip(ws, originals)), (dtype, records, no_bf16, threads)
        ref_ws, ref_recs, ref_flags = outs[0]
        for ws, recs, flags in outs[1:]:
            assert flags == ref_flags
            for w, rw, r, rr in zip(ws, ref_ws, recs, ref_recs):
                assert same_bits(w, rw), dtype
                assert torch.equal(r.offsets, rr.offsets) and torch.equal(r.cols, rr.cols), dtype
                assert same_bits(r.value, rr.value), dtype


def test_torch_backend_is_exact_too():
    g = torch.Generator().manual_seed(9)
    for dtype in DTYPES:
        fuse_unfuse_exact([M.MergeJob(*make(17, 19, 3, dtype, gen=g))], backend="torch")


def test_torch_backend_reproduces_the_fma_chain_where_a_float64_sum_would_round_twice():
    """delta = fma(a, b, 1 + 2^-23) with a·b = 2^-24 (1 - 2^-46): the exact sum lies just below the fp32 midpoint
    1 + 2^-23 + 2^-24, so one rounding gives 1 + 2^-23; a float64 sum rounds onto the midpoint first and then to
    even (1 + 2^-22). Both backends must give the single rounding, and the mirrored case above the midpoint."""
    one_ulp, a = 1 + 2.0**-23, 1 + 2.0**-23
    for b, want in ((2.0**-24 * (1 - 2.0**-23), one_ulp), (2.0**-24 * (1 + 2.0**-23), 1 + 2.0**-22)):
        up = torch.tensor([[one_ulp, a], [-one_ulp, -a]])
        down = torch.tensor([[1.0], [b]])
        for backend in ("cpu", "torch"):
            w = torch.zeros(2, 1)
            M.fuse([M.MergeJob(w, up, down)], backend=backend)
            assert w[:, 0].tolist() == [want, -want], (backend, b)


def test_bad_jobs_raise_value_error():
    w = torch.zeros(4, 5)
    with pytest.raises(ValueError):
        M.fuse([M.MergeJob(w, torch.zeros(4, 2), torch.zeros(3, 5))])
    with pytest.raises(ValueError):
        M.fuse([M.MergeJob(w.to(torch.float64), torch.zeros(4, 2), torch.zeros(2, 5))])
    with pytest.raises(ValueError):
        M.fuse([M.MergeJob(torch.zeros(1, 5).expand(4, 5), torch.zeros(4, 2), torch.zeros(2, 5))])
    with pytest.raises(ValueError):
        M.fuse([M.MergeJob(w, torch.zeros(4, 2), torch.zeros(2, 5))], backend="nope")
    with pytest.raises(ValueError):
        M.unfuse([M.MergeJob(w, torch.zeros(4, 2), torch.zeros(2, 5))], [])
    recs, flags = M.fuse([])
    assert len(recs) == 0 and flags == []


def test_non_float32_factors_are_converted():
    g = torch.Generator().manual_seed(10)
    w, up, down = make(9, 11, 2, torch.float16, gen=g)
    a, b = w.clone(), w.clone()
    M.fuse([M.MergeJob(a, up.half(), down.half())])
    M.fuse([M.MergeJob(b, up.half().float(), down.half().float())])
    assert same_bits(a, b)


# ------------------------------------------------------------------------------------------- records


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_wider_than_a_segment_and_all_backends_give_one_record(dtype):
    """Columns past 65535 live in a second 16-bit segment; the CPU and torch backends agree on the record."""
    g = torch.Generator().manual_seed(12)
    rows, cols = 3, M.SEG_COLS + 4321
    w, up, down = make(rows, cols, 2, dtype, d_scale=0.3, gen=g)
    old = w.clone()
    a, b = w.clone(), w.clone()
    rec_cpu = M.fuse([M.MergeJob(a, up, down)])[0][0]
    rec_torch = M.fuse([M.MergeJob(b, up, down)], backend="torch")[0][0]
    assert same_bits(a, b)
    assert rec_cpu.offsets.numel() == rows * 2 + 1
    assert torch.equal(rec_cpu.offsets, rec_torch.offsets) and torch.equal(rec_cpu.cols, rec_torch.cols)
    assert same_bits(rec_cpu.value, rec_torch.value)
    idx = rec_cpu.flat_index()
    assert bool((idx % cols >= M.SEG_COLS).any()) and bool((idx % cols < M.SEG_COLS).any())
    check_record_is_exactly_the_unrecoverable_elements(a, old, up, down, rec_cpu)
    round_trip = M.MergeRecord.from_flat(idx, rec_cpu.value, (rows, cols))
    assert torch.equal(round_trip.offsets, rec_cpu.offsets) and torch.equal(round_trip.cols, rec_cpu.cols)
    M.unfuse([M.MergeJob(a, up, down)], [rec_cpu])
    M.unfuse([M.MergeJob(b, up, down)], [rec_cpu], backend="torch")
    assert same_bits(a, old) and same_bits(b, old)


def test_int64_offsets_are_accepted_and_chosen_for_huge_views():
    g = torch.Generator().manual_seed(13)
    w, up, down = make(50, 70, 3, torch.float16, d_scale=0.3, gen=g)
    old = w.clone()
    rec = M.fuse([M.MergeJob(w, up, down)])[0][0]
    wide = M.MergeRecord(rec.offsets.to(torch.int64), rec.cols, rec.value, rec.shape)
    M.unfuse([M.MergeJob(w, up, down)], [wide])
    assert same_bits(w, old)
    huge = M.MergeRecord.from_flat(torch.tensor([5, 1 << 31]), torch.zeros(2, dtype=torch.float16), (1 << 16, 1 << 16))
    assert huge.offsets.dtype == torch.int64 and huge.flat_index().tolist() == [5, 1 << 31]


@pytest.mark.parametrize("damage", ["other_job", "unsorted", "column_out_of_range", "offsets", "dtype"])
def test_a_record_that_does_not_fit_its_job_raises_before_any_write(damage):
    g = torch.Generator().manual_seed(14)
    w, up, down = make(30, 40, 3, torch.float16, d_scale=0.3, gen=g)
    w2, up2, down2 = make(30, 40, 3, torch.float16, d_scale=0.3, gen=g)
    r = M.fuse([M.MergeJob(w, up, down)])[0][0]
    r2 = M.fuse([M.MergeJob(w2, up2, down2)])[0][0]
    cols, offsets, value = r.cols.clone(), r.offsets.clone(), r.value
    row = int(((offsets[1:] - offsets[:-1]) >= 2).nonzero()[0])  # a row holding two records or more
    lo = int(offsets[row])
    if damage == "other_job":
        offsets, cols, value = r2.offsets, r2.cols, r2.value  # same shape, other positions: unfuse must not care
    elif damage == "unsorted":
        cols[lo], cols[lo + 1] = cols[lo + 1].clone(), cols[lo].clone()
    elif damage == "column_out_of_range":
        cols[lo + 1] = 40
    elif damage == "offsets":
        offsets[row + 1] = offsets[row + 2] + 1
    else:
        value = value.to(torch.bfloat16)
    fused, fused2 = w.clone(), w2.clone()
    job = M.MergeJob(w, up, down)
    bad = M.MergeRecord(offsets, cols, value, r.shape)
    if damage == "other_job":
        M.unfuse([job], [bad])  # well-formed: it runs, it just does not restore this weight
        return
    with pytest.raises(ValueError):
        M.unfuse([M.MergeJob(w2, up2, down2), job], [r2, bad])
    assert same_bits(w, fused) and same_bits(w2, fused2)  # nothing was written, not even the well-formed job
    with pytest.raises(ValueError):
        M.unfuse([M.MergeJob(w[:, :39], up, down[:, :39])], [r])  # shape mismatch


@pytest.mark.parametrize("dtype", DTYPES)
def test_record_memory_for_a_typical_lora_is_a_small_fraction_of_the_weights(dtype):
    """Deltas of 3% of mean |W| (rank 8, 320x640): the record stays under 25% of the fused weights' bytes."""
    g = torch.Generator().manual_seed(15)
    w = (torch.randn(320, 640, generator=g) * 0.02).to(dtype)
    up, down = torch.randn(320, 8, generator=g), torch.randn(8, 640, generator=g)
    up *= 0.03 * 0.02 * 0.8 / 8**0.5
    rec = M.fuse([M.MergeJob(w, up, down)])[0][0]
    frac = len(rec) / w.numel()
    assert 0.005 < frac < 0.1
    weight_bytes = w.numel() * w.element_size()
    assert rec.nbytes() == 4 * 321 + len(rec) * (2 + w.element_size())
    assert rec.nbytes() < 0.25 * weight_bytes


KEPT_SCRIPT = textwrap.dedent(
    """
    import gc, os, sys, torch
    from lora_fast.kernels import merge as M

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    g = torch.Generator().manual_seed(0)
    jobs = [M.MergeJob((torch.randn(1024, 1024, generator=g) * 0.02).to(torch.bfloat16),
                       torch.randn(1024, 4, generator=g) * 0.02, torch.randn(4, 1024, generator=g) * 0.3)
            for _ in range(16)]
    warm = []
    gc.disable()
    for i in range(8):
        before = rss()
        recs, _ = M.fuse(jobs, num_threads=4)
        excess = rss() - before - sum(r.nbytes() for r in recs)
        if i >= 2:
            warm.append(excess)
        M.unfuse(jobs, recs, num_threads=4)
        del recs
    # the median warm fuse: what every fuse keeps, not a one-off allocation elsewhere in the process
    print("EXCESS", sorted(warm)[len(warm) // 2])
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
@pytest.mark.parametrize("path", ["direct", "gather"])
def test_a_warm_fuse_keeps_no_more_resident_memory_than_its_records(path):
    """16 bf16 jobs of 1024², records ~15 MiB, 4 threads: a warm fuse (the median of six) grows the resident set by
    the records and at most 512 KiB more (the huge page each record buffer ends in used to stay resident whole: up
    to 2 MiB per thread)."""
    env = dict(os.environ, LORA_FAST_MERGE_RECORDS=path)
    proc = subprocess.run([sys.executable, "-c", KEPT_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("EXCESS ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert int(lines[-1].split()[1]) <= 512 << 10, lines[-1]


# ------------------------------------------------------------------------------------------- Triton

# what both interpreted scripts start with (the interpreter must be on before Triton is imported)
SCRIPT_PRELUDE = textwrap.dedent(
    """
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from lora_fast.kernels import merge as M, probe as P

    BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    def same(a, b):
        return torch.equal(a.contiguous().view(BITS[a.dtype]), b.contiguous().view(BITS[b.dtype]))
    """
)

TRITON_SCRIPT = SCRIPT_PRELUDE + textwrap.dedent(
    """
    g = torch.Generator().manual_seed(11)
    shapes = [(37, 70, 3), (1, 65, 1), (66, 1, 4), (40, 33, 33)]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        tri, cpu = [], []
        for r, c, k in shapes:
            w = (torch.randn(r, c, generator=g) * 0.05).to(dtype)
            up, down = torch.randn(r, k, generator=g) * 0.1, torch.randn(k, c, generator=g) * 0.1
            tri.append(M.MergeJob(w, up, down))
            cpu.append(M.MergeJob(w.clone(), up, down))
        # a transposed view in the same launch
        st = (torch.randn(30, 20, generator=g) * 0.05).to(dtype)
        tri.append(M.MergeJob(st.t(), torch.randn(20, 2, generator=g), torch.randn(2, 30, generator=g)))
        cpu.append(M.MergeJob(st.t().clone(), tri[-1].up, tri[-1].down))
        tri[1].up[0, 0] = float("nan")
        cpu[1].up[0, 0] = float("nan")
        # what fuse_lora sends: a 4-D weight given by its 2-D geometry, two adapters' fp16/bf16 factors (one 4-D, one
        # transposed) with their scales, folded in by the kernel
        w4 = (torch.randn(8, 3, 3, 3, generator=g) * 0.05).to(dtype)
        b1, a1 = (torch.randn(8, 2, 1, 1, generator=g) * 0.3).half(), (torch.randn(2, 3, 3, 3, generator=g) * 0.3).half()
        b2, a2 = torch.randn(8, 1, generator=g).bfloat16(), torch.randn(27, 1, generator=g).bfloat16().t()
        fs = [M.Factor(b1, (2, 1), a1, (27, 1), 2, 0.7 * 0.123), M.Factor.of(b2, a2, 1.37)]
        tri.append(M.MergeJob(w4, factors=fs, view=(8, 27, 27, 1)))
        cpu.append(M.MergeJob(w4.clone(), factors=fs, view=(8, 27, 27, 1)))
        originals = [j.weight.clone() for j in tri]
        # safe_fusing: the NaN job is flagged by the counting pass and no weight is written
        assert P.usable("merge", torch.device("cpu"), dtype, strict=True)  # the first-use probe runs here, apart
        s0 = M.triton_stats.snapshot()
        ra, fa = M.fuse(tri, backend="triton", check_finite=True, abort_nonfinite=True)
        s1 = M.triton_stats.snapshot()
        assert fa == [False, True, False, False, False, False], fa
        assert all(r is None for r in ra) and all(same(j.weight, o) for j, o in zip(tri, originals))
        assert s1["launches"] - s0["launches"] == 1 and s1["syncs"] - s0["syncs"] == 1, (s0, s1)
        rt, ft = M.fuse(tri, backend="triton", check_finite=True)
        s2 = M.triton_stats.snapshot()
        assert s2["launches"] - s1["launches"] == 2 and s2["syncs"] - s1["syncs"] == 1, (s1, s2)  # count, write
        rc, fc = M.fuse(cpu, backend="cpu", check_finite=True)
        assert ft == fc == fa, (ft, fc)
        for a, b, x, y in zip(tri, cpu, rt, rc):
            nan = torch.isnan(a.weight.float())
            assert torch.equal(nan, torch.isnan(b.weight.float()))
            assert same(a.weight[~nan], b.weight[~nan]), dtype
            assert torch.equal(x.offsets, y.offsets) and torch.equal(x.cols, y.cols), dtype
            assert same(x.value, y.value), dtype
        M.unfuse(tri, rt, backend="triton")
        s3 = M.triton_stats.snapshot()
        assert s3["launches"] - s2["launches"] == 1 and s3["syncs"] == s2["syncs"], (s2, s3)  # one pass, no sync
        for j, o in zip(tri, originals):
            assert same(j.weight, o), dtype
        # unfuse of parts of one fuse (one component of several): the fuse's table over a range of its tiles
        rt, _ = M.fuse(tri, backend="triton")
        u0 = M.triton_stats.snapshot()
        M.unfuse(tri[2:4], rt.subset([2, 3]), backend="triton")
        rest = [0, 1, 4, 5]
        M.unfuse([tri[i] for i in rest], rt.subset(rest), backend="triton")  # two runs: two launches
        u1 = M.triton_stats.snapshot()
        assert u1["launches"] - u0["launches"] == 3 and u1["uploads"] == u0["uploads"], (u0, u1)
        assert all(same(j.weight, o) for j, o in zip(tri, originals)), dtype
        # the CPU kernel's records restore the Triton kernel's fuse too (same layout, same bits)
        M.fuse(tri, backend="triton")
        M.unfuse(tri, rc, backend="triton")
        assert all(same(j.weight, o) for j, o in zip(tri, originals)), dtype
        # without records: one launch, no host read
        s4 = M.triton_stats.snapshot()
        rn, _ = M.fuse(tri, backend="triton", record=False)
        s5 = M.triton_stats.snapshot()
        assert rn == [None] * len(tri) and s5["syncs"] == s4["syncs"] and s5["launches"] - s4["launches"] == 1
        M.unfuse(tri, [None] * len(tri), backend="triton")
    print("TRITON-OK")
    """
)


@exact_fma_interpreter
def test_triton_kernel_interpreted_matches_cpu_kernel_and_restores():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "TRITON-OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


TRITON_SPEC_SCRIPT = SCRIPT_PRELUDE + textwrap.dedent(
    """
    g = torch.Generator().manual_seed(5)

    def lora_jobs(dtype, fdtypes, ranks, *, offset=0, transposed_down=False):
        # weights as fuse_lora sends them (some with a 2-D view of a 4-D conv weight), B and A in their own dtype
        jobs = []
        for n, (rank, fdt) in enumerate(zip(ranks, fdtypes)):
            rows, cols = (48, 136) if n % 2 == 0 else (40, 72)
            store = (torch.randn(rows * cols + offset, generator=g) * 0.05).to(dtype)
            w = store[offset:].view(rows, cols)
            b = (torch.randn(rows, rank, generator=g) * 0.2).to(fdt)
            a = (torch.randn(rank, cols, generator=g) * 0.2).to(fdt)
            if transposed_down:
                a = a.t().contiguous().t()
            jobs.append(M.MergeJob(w, factors=[M.Factor.of(b, a, 0.75)]))
        return jobs

    def spec(jobs):
        return M._Plan(jobs, list(range(len(jobs))), jobs[0].weight.device, jobs[0].weight.dtype).spec

    def check(jobs, what):
        cpu = [M.MergeJob(j.weight.clone(), factors=j.factors) for j in jobs]
        originals = [j.weight.clone() for j in jobs]
        rt, _ = M.fuse(jobs, backend="triton")
        rc, _ = M.fuse(cpu, backend="cpu")
        for a, b, x, y in zip(jobs, cpu, rt, rc):
            assert same(a.weight, b.weight), what
            assert torch.equal(x.offsets, y.offsets) and torch.equal(x.cols, y.cols) and same(x.value, y.value), what
        assert rt.count() > 0, what
        M.unfuse(jobs, rt, backend="triton")
        assert all(same(j.weight, o) for j, o in zip(jobs, originals)), what
        # records named per job (a table of record buffers) restore as well
        rt, _ = M.fuse(jobs, backend="triton")
        M._triton_run(jobs, negate=True, record=False, check_finite=False, restore=M._items(rt))
        assert all(same(j.weight, o) for j, o in zip(jobs, originals)), what

    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        vw = 16 // dtype.itemsize
        # a plain LoRA fuse: 32-bit offsets, the factors' one dtype, vector accesses, no LyCORIS code
        jobs = lora_jobs(dtype, [dtype] * 4, [8] * 4)
        s = spec(jobs)
        code = M._DTYPE_CODE[dtype]
        assert s == dict(RK=0, EXACT=True, UDT=code, DDT=code, TERMS=False, I64=False, WV=vw, DV=vw), s
        check(jobs, f"lora {dtype}")
        # a weight one element off 16-byte alignment, mixed factor dtypes, a down factor with a column stride:
        # scalar accesses, dtypes at run time; same bits
        jobs = lora_jobs(dtype, [torch.float16, torch.bfloat16, torch.float32, torch.float16], [3, 8, 5, 8],
                         offset=1, transposed_down=True)
        s = spec(jobs)
        assert s["WV"] == 0 and s["DV"] == 0 and s["UDT"] == -1 and s["DDT"] == -1 and not s["EXACT"], s
        check(jobs, f"general {dtype}")
        # down factors packed as a file packs them (kohya: an alpha scalar before each down), most off 16-byte
        # alignment: the group keeps its vector specialization, those factors take the scalar loads
        jobs = lora_jobs(dtype, [dtype] * 4, [8] * 4)
        for n, j in enumerate(jobs):
            f = j.factors[0]
            packed = torch.empty(f.down.numel() + 8, dtype=f.down.dtype)[n:n + f.down.numel()].view(f.down.shape)
            packed.copy_(f.down)
            j.factors[0] = M.Factor.of(f.up, packed, f.scale)
        assert sum(j.factors[0].down.data_ptr() % 16 != 0 for j in jobs) >= 3
        assert spec(jobs)["DV"] == vw, spec(jobs)
        check(jobs, f"packed downs {dtype}")
        # 64-bit offsets (chosen for views past 2^31 elements; forced here on small ones)
        extent = M._extent
        M._extent = lambda *a: 1 << 31
        try:
            jobs = lora_jobs(dtype, [dtype] * 3, [8, 3, 8])
            assert spec(jobs)["I64"]
            check(jobs, f"64-bit offsets {dtype}")
        finally:
            M._extent = extent
        # the unrolled rank loop (opt-in): one rank, and several ranks padded to the largest
        M.RANK_UNROLL_MAX = 16
        try:
            jobs = lora_jobs(dtype, [dtype] * 3, [8] * 3)
            assert spec(jobs)["RK"] == 8 and spec(jobs)["EXACT"]
            check(jobs, f"unrolled {dtype}")
            jobs = lora_jobs(dtype, [dtype] * 3, [2, 11, 5])
            assert spec(jobs)["RK"] == 11 and not spec(jobs)["EXACT"]
            check(jobs, f"unrolled, padded {dtype}")
            jobs = lora_jobs(dtype, [dtype] * 2, [8, 17])
            assert spec(jobs)["RK"] == 0  # beyond the bound: the loop at run time
        finally:
            M.RANK_UNROLL_MAX = 0
    # 64-bit offsets where a view reaches past 2^31 elements (meta tensors: the table only)
    w = torch.empty(3, 1 << 30, dtype=torch.float16, device="meta")
    f = M.Factor.of(torch.empty(3, 4, dtype=torch.float16, device="meta"),
                    torch.empty(4, 1 << 30, dtype=torch.float16, device="meta"))
    assert M._Plan([M.MergeJob(w, factors=[f])], [0], w.device, w.dtype).spec["I64"]
    w = torch.empty(3, 1 << 20, dtype=torch.float16, device="meta")
    f = M.Factor.of(f.up, torch.empty(4, 1 << 20, dtype=torch.float16, device="meta"))
    assert not M._Plan([M.MergeJob(w, factors=[f])], [0], w.device, w.dtype).spec["I64"]
    print("SPEC-OK")
    """
)


@exact_fma_interpreter
def test_triton_kernel_specializations_give_the_same_bits():
    """Each compile-time specialization the launcher picks (32-bit offsets, one factor dtype, vector accesses, the
    unrolled and padded rank loops) against the general kernel's contract: the C++ kernel's bits and records, and
    an exact unfuse through both restore modes."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", TRITON_SPEC_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0 and "SPEC-OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
