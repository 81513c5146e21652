"""Segmented LoRA shrink/expand (lora_fast.kernels.shrink_expand): row maps, group validation, and both backends
against a per-sample float64 loop. The torch backend runs in-process; the Triton kernels run interpreted on the
CPU in one subprocess (TRITON_INTERPRET must be set before triton is imported)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from dataclasses import dataclass

import pytest
from triton_support import interpretable_segmented_kernels
import torch

from lora_fast.kernels import shrink_expand as S

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
# Dyadic weights and scales: exact in float32, so the reference sees the same multipliers as the kernels.
WEIGHTS = [1.0, 0.5, -0.75, 1.25, 0.0, 2.0, -0.25]
SCALES = [1.0, 0.5, 0.25, 2.0, 0.125]
RANKS = [1, 2, 3, 4, 8, 16, 17, 31, 32, 33, 64, 100, 128]


# --------------------------------------------------------------------------------------------- helpers


@dataclass
class Case:
    """One layer call: groups (rank None = factors absent for the layer), per-sample entries, batch layout."""

    k: int
    n: int
    ranks: list
    scales: list
    entries: list
    reps: int = 1  # batch = reps * len(entries) (reps 2 = the CFG layout)
    rows_per_sample: int = 1
    lam: float = 1.0

    @property
    def batch(self) -> int:
        return self.reps * len(self.entries)

    @property
    def m(self) -> int:
        return self.batch * self.rows_per_sample


def make_tensors(case: Case, dtype, gen):
    """x, base out and the factors in `dtype`; the LoRA terms are about as large as the base output."""
    downs, ups = [], []
    for r in case.ranks:
        if r is None:
            downs.append(None)
            ups.append(None)
            continue
        downs.append((torch.randn(r, case.k, generator=gen) / case.k**0.5).to(dtype))
        ups.append((torch.randn(case.n, r, generator=gen) / r**0.5).to(dtype))
    x = torch.randn(case.m, case.k, generator=gen).to(dtype)
    out = torch.randn(case.m, case.n, generator=gen).to(dtype)
    return x, out, downs, ups


def reference(case: Case, x, out, downs, ups):
    """float64, one sample at a time: sample j uses entries[j % n] and gains lam*scale_g*w*(x_j A_g^T) B_g^T."""
    ref = out.double().clone()
    t = case.rows_per_sample
    for j in range(case.batch):
        rows = slice(j * t, (j + 1) * t)
        xj = x[rows].double()
        for g, w in case.entries[j % len(case.entries)]:
            if downs[g] is None:
                continue
            ref[rows] += case.lam * case.scales[g] * w * ((xj @ downs[g].double().t()) @ ups[g].double().t())
    return ref


def untouched_rows(case: Case, downs) -> torch.Tensor:
    """Rows with no LoRA term at all: empty entries, only weight-0 pairs, or only groups absent for the layer."""
    t = case.rows_per_sample
    keep = []
    for j in range(case.batch):
        pairs = case.entries[j % len(case.entries)]
        if all(w == 0.0 or downs[g] is None for g, w in pairs):
            keep.extend(range(j * t, (j + 1) * t))
    return torch.tensor(keep, dtype=torch.int64)


def assert_matches_reference(got, ref, dtype, what=""):
    err = got.double() - ref
    if dtype == torch.float32:
        # per row: max abs error / max abs reference <= 1e-5
        worst = (err.abs().amax(1) / ref.abs().amax(1).clamp_min(1e-300)).max().item()
        assert worst <= 1e-5, f"{what}: fp32 row-relative error {worst:.3g}"
    else:
        rel = (err.norm() / ref.norm()).item()
        assert rel <= 5e-3, f"{what}: {dtype} L2-relative error {rel:.3g}"


def same_bits(a, b) -> bool:
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(BITS[a.dtype]), b.contiguous().view(BITS[b.dtype]))


def ulp(v: torch.Tensor) -> torch.Tensor:
    """Spacing above |v| in v's dtype, as float64 (v finite)."""
    a = v.abs().contiguous()
    return (a.view(BITS[v.dtype]) + 1).view(v.dtype).double() - a.double()


def run_case(case: Case, dtype, seed: int, backend: str):
    """Runs segmented_lora on one case and checks: in place, float64 reference, untouched rows bit-identical."""
    gen = torch.Generator().manual_seed(seed)
    x, out, downs, ups = make_tensors(case, dtype, gen)
    ref = reference(case, x, out, downs, ups)
    groups = S.make_groups(downs, ups, case.scales)
    rows = S.build_row_map(case.entries, case.batch, case.rows_per_sample)
    got = out.clone()
    res = S.segmented_lora(x, got, groups, rows, lam=case.lam, backend=backend)
    assert res is got, "segmented_lora must update `out` in place and return it"
    what = f"{backend} {dtype} seed={seed} {case}"
    assert_matches_reference(got, ref, dtype, what)
    keep = untouched_rows(case, downs)
    assert torch.equal(got[keep], out[keep]), f"{what}: base-only rows changed"
    return x, out, got, groups, rows


def random_case(gen, max_batch=64, max_rps=9, max_groups=16, max_kn=200) -> Case:
    """Random groups (some absent), ranks 1..128, entries with 0-3 pairs (weight 0 included), CFG repeats."""

    def pick(seq):
        return seq[int(torch.randint(len(seq), (1,), generator=gen))]

    def randint(lo, hi):  # inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    n_groups = randint(1, max_groups)
    ranks = [None if torch.rand(1, generator=gen).item() < 0.15 else pick(RANKS) for _ in range(n_groups)]
    if all(r is None for r in ranks):
        ranks[randint(0, n_groups - 1)] = pick(RANKS)
    n_entries = randint(1, min(16, max_batch))
    reps = randint(1, max(1, min(3, max_batch // n_entries)))
    entries = []
    for _ in range(n_entries):
        n_pairs = pick([0, 1, 1, 1, 2, 3])
        entries.append([(randint(0, n_groups - 1), pick(WEIGHTS)) for _ in range(n_pairs)])
    return Case(k=randint(1, max_kn), n=randint(1, max_kn), ranks=ranks, scales=[pick(SCALES) for _ in ranks],
                entries=entries, reps=reps, rows_per_sample=pick([1, 1, 2, 3, max_rps]), lam=pick([1.0, 0.5, -2.0]))


def named_cases() -> dict:
    """Hand-written cases covering the required corners (also run by the Triton subprocess)."""
    mixed = [1, 3, 16, 17, 64, 128]
    return {
        "one_adapter_rank1_batch1": Case(33, 65, [1], [1.0], [[(0, 1.0)]]),
        "ranks_1_to_128_mixed_in_one_call_batch7": Case(
            97, 131, mixed, [0.5, 1.0, 0.25, 2.0, 0.125, 0.5], [[(j % 6, 1.0)] for j in range(7)], rows_per_sample=3),
        "sixteen_adapters_batch64_one_row_each": Case(
            70, 45, [RANKS[g % len(RANKS)] for g in range(16)], [0.5] * 16, [[(j % 16, 1.25)] for j in range(64)]),
        "five_adapters_absent_groups_base_only_weight0_and_mixtures": Case(
            40, 72, [4, None, 17, 8, None], [1.0, 1.0, 0.5, 2.0, 1.0],
            [[], [(1, 1.0)], [(0, 0.0)], [(2, 0.5)], [(0, 0.25), (3, -0.75), (2, 1.5)], [(4, 1.0), (3, 1.0)],
             [(0, 0.0), (2, 1.0)]],
            rows_per_sample=2),
        "cfg_layout_batch_is_twice_the_entries": Case(
            50, 30, [8, 16], [1.0, 0.5], [[(0, 1.0)], [], [(1, 0.5), (0, 0.5)], [(1, 2.0)]], reps=2, rows_per_sample=5),
        "mixtures_of_two_and_three_including_a_repeated_group": Case(
            65, 129, [3, 5, 33], [0.25, 1.0, 0.5],
            [[(0, 1.0), (1, 0.5)], [(2, 1.0), (2, -0.5), (0, 0.25)], [(1, 1.0), (0, 1.0), (2, 1.0)]], reps=3,
            rows_per_sample=4, lam=0.5),
        "tiny_k_and_n_one_and_three": Case(1, 3, [2, 1], [1.0, 1.0], [[(0, 1.0)], [(1, -1.0), (0, 0.5)]]),
        "all_entries_base_only": Case(20, 20, [4], [1.0], [[], []], reps=2, rows_per_sample=3),
        "rank_128_batch64_long_segments": Case(
            96, 64, [128, 64], [0.125, 0.25], [[(0, 1.0)], [(1, 1.0)]], reps=32, rows_per_sample=3),
    }


# --------------------------------------------------------------------------------------------- torch backend


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(named_cases()))
def test_torch_backend_named_cases_match_float64_per_sample_loop(name, dtype):
    run_case(named_cases()[name], dtype, seed=hash(name) % 2**31, backend="torch")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(40))
def test_torch_backend_random_sweep_matches_float64_per_sample_loop(seed, dtype):
    gen = torch.Generator().manual_seed(1000 + seed)
    run_case(random_case(gen), dtype, seed=seed, backend="torch")


@pytest.mark.parametrize("dtype", DTYPES)
def test_shrink_rows_hold_x_times_down_in_the_first_rank_columns(dtype):
    case = named_cases()["ranks_1_to_128_mixed_in_one_call_batch7"]
    gen = torch.Generator().manual_seed(3)
    x, _, downs, ups = make_tensors(case, dtype, gen)
    groups = S.make_groups(downs, ups, case.scales)
    rows = S.build_row_map(case.entries, case.batch, case.rows_per_sample)
    h = S.lora_shrink(x, groups, rows, backend="torch")
    assert h.dtype == torch.float32 and h.shape == (rows.num_entries, 128)
    for s, g in enumerate(rows.seg_group_host):
        a, b = rows.seg_start_host[s], rows.seg_start_host[s + 1]
        r = case.ranks[g]
        exact = x[rows.rows[a:b]].double() @ downs[g].double().t()
        err = (h[a:b, :r].double() - exact).abs().max() / exact.abs().max()
        assert err <= 1e-5, (s, g, err.item())


def test_shrink_width_is_at_least_16_and_a_power_of_two():
    gen = torch.Generator().manual_seed(4)
    for ranks, width in [([1], 16), ([3, None], 16), ([17], 32), ([5, 33], 64), ([100], 128), ([128], 128)]:
        case = Case(10, 6, ranks, [1.0] * len(ranks), [[(0, 1.0)]], reps=3)
        x, _, downs, ups = make_tensors(case, torch.float32, gen)
        h = S.lora_shrink(x, S.make_groups(downs, ups, case.scales), S.build_row_map(case.entries, 3, 1))
        assert h.shape == (3, width), ranks


def test_expanding_pass_by_pass_equals_expanding_all_passes():
    case = named_cases()["mixtures_of_two_and_three_including_a_repeated_group"]
    gen = torch.Generator().manual_seed(5)
    x, out, downs, ups = make_tensors(case, torch.float16, gen)
    groups = S.make_groups(downs, ups, case.scales)
    rows = S.build_row_map(case.entries, case.batch, case.rows_per_sample)
    assert len(rows.passes) == 3
    h = S.lora_shrink(x, groups, rows, backend="torch")
    whole = S.lora_expand(out.clone(), h, groups, rows, lam=case.lam, backend="torch")
    stepwise = out.clone()
    for p in range(len(rows.passes)):
        S.lora_expand(stepwise, h, groups, rows, lam=case.lam, backend="torch", passes=[p])
    assert same_bits(whole, stepwise)
    only_first = S.lora_expand(out.clone(), h, groups, rows, lam=case.lam, backend="torch", passes=[0])
    assert not same_bits(only_first, whole)  # the later passes do contribute


def test_layer_whose_groups_are_all_absent_for_some_samples_leaves_out_untouched():
    # group 0 is absent for this layer, every sample uses it: no row changes, in-place identity
    gen = torch.Generator().manual_seed(6)
    case = Case(12, 9, [None, 4], [1.0, 1.0], [[(0, 1.0)], [(0, 0.5)]], reps=2, rows_per_sample=2)
    x, out, downs, ups = make_tensors(case, torch.bfloat16, gen)
    got = out.clone()
    S.segmented_lora(x, got, S.make_groups(downs, ups, case.scales), S.build_row_map(case.entries, 4, 2))
    assert same_bits(got, out)


# --------------------------------------------------------------------------------------------- strides


@pytest.mark.parametrize("dtype", DTYPES)
def test_column_sliced_and_transposed_x_and_sliced_out_give_the_contiguous_result(dtype):
    case = named_cases()["five_adapters_absent_groups_base_only_weight0_and_mixtures"]
    gen = torch.Generator().manual_seed(7)
    x, out, downs, ups = make_tensors(case, dtype, gen)
    groups = S.make_groups(downs, ups, case.scales)
    rows = S.build_row_map(case.entries, case.batch, case.rows_per_sample)
    expected = S.segmented_lora(x, out.clone(), groups, rows, backend="torch")
    assert_matches_reference(expected, reference(case, x, out, downs, ups), dtype)

    wide = torch.randn(case.m, case.k + 7, generator=gen).to(dtype)
    wide[:, 3:3 + case.k] = x
    sliced = wide[:, 3:3 + case.k]  # unit column stride, row stride k + 7, offset start
    assert sliced.stride() == (case.k + 7, 1)
    transposed = x.t().contiguous().t()  # stride(1) != 1
    assert transposed.stride(1) != 1
    for xv in (sliced, transposed):
        assert same_bits(S.segmented_lora(xv, out.clone(), groups, rows, backend="torch"), expected)

    out_wide = torch.randn(case.m, case.n + 5, generator=gen).to(dtype)
    out_wide[:, 2:2 + case.n] = out
    before = out_wide.clone()
    S.segmented_lora(x, out_wide[:, 2:2 + case.n], groups, rows, backend="torch")
    assert same_bits(out_wide[:, 2:2 + case.n], expected)
    assert same_bits(out_wide[:, :2], before[:, :2]) and same_bits(out_wide[:, 2 + case.n:], before[:, 2 + case.n:])


# --------------------------------------------------------------------------------------------- build_row_map


def decode(rm: S.RowMap, rows_per_sample: int):
    """{(pass, row): (group, coef)}, checking on the way that no pass names a row twice."""
    seen = {}
    for p, (first, end) in enumerate(rm.passes):
        in_pass = []
        for s in range(first, end):
            a, b = rm.seg_start_host[s], rm.seg_start_host[s + 1]
            seg_rows = rm.rows[a:b].tolist()
            in_pass += seg_rows
            for row, c in zip(seg_rows, rm.coef[a:b].tolist()):
                seen[(p, row)] = (rm.seg_group_host[s], c)
        assert len(in_pass) == len(set(in_pass)), f"pass {p} names a row twice"
    return seen


def test_row_map_passes_never_share_a_row_and_pass_p_holds_each_samples_pth_pair():
    entries = [[(2, 1.0)], [], [(0, 0.5), (2, 0.25)], [(1, 1.0), (1, 2.0), (0, 3.0)], [(0, 0.0), (1, -1.5)]]
    t = 3
    rm = S.build_row_map(entries, batch=10, rows_per_sample=t)
    expected = {}
    for j in range(10):
        for p, (g, w) in enumerate(entries[j % 5]):
            if w != 0.0:
                for r in range(t):
                    expected[(p, j * t + r)] = (g, w)
    assert decode(rm, t) == expected
    assert len(rm.passes) == 3


def test_row_map_rows_ascend_inside_each_segment_and_one_segment_per_group_per_pass():
    gen = torch.Generator().manual_seed(8)
    for _ in range(20):
        case = random_case(gen, max_groups=6)
        rm = S.build_row_map(case.entries, case.batch, case.rows_per_sample)
        for s in range(len(rm.seg_group_host)):
            seg = rm.rows[rm.seg_start_host[s]:rm.seg_start_host[s + 1]]
            assert seg.numel() > 0 and bool((seg[1:] > seg[:-1]).all())
        for first, end in rm.passes:
            groups = rm.seg_group_host[first:end]
            assert groups == sorted(set(groups))
        decode(rm, case.rows_per_sample)


def test_row_map_tensors_host_copies_and_per_sample_lists_agree():
    entries = [[(1, 0.5)], [(0, 1.0), (1, 2.0)], [(1, 1.25)]]
    rm = S.build_row_map(entries, batch=6, rows_per_sample=2)
    assert rm.rows.dtype == torch.int64 and rm.coef.dtype == torch.float32
    assert rm.seg_start.dtype == torch.int32 and rm.seg_group.dtype == torch.int32
    assert rm.seg_start.tolist() == rm.seg_start_host and rm.seg_group.tolist() == rm.seg_group_host
    # pass 0: group 0 = sample 1, 4; group 1 = samples 0, 2, 3, 5; pass 1: group 1 = samples 1, 4
    assert rm.passes == [(0, 2), (2, 3)]
    assert rm.seg_group_host == [0, 1, 1]
    assert rm.samples == [[1, 4], [0, 2, 3, 5], [1, 4]]
    assert rm.sample_coef == [[1.0, 1.0], [0.5, 1.25, 0.5, 1.25], [2.0, 2.0]]
    assert rm.seg_start_host == [0, 4, 12, 16] and rm.num_entries == 16
    assert rm.rows.tolist() == [2, 3, 8, 9, 0, 1, 4, 5, 6, 7, 10, 11, 2, 3, 8, 9]
    assert rm.coef.tolist() == [1.0] * 4 + [0.5, 0.5, 1.25, 1.25, 0.5, 0.5, 1.25, 1.25] + [2.0] * 4
    assert rm.pass_max_rows == [8, 4] and rm.max_rows == 8


def test_row_map_cfg_layout_maps_sample_j_to_entry_j_mod_n():
    entries = [[(0, 1.0)], [(1, 0.5)], [], [(2, 2.0), (0, 0.25)]]
    t = 2
    rm = S.build_row_map(entries, batch=12, rows_per_sample=t)  # 3 blocks of the 4 entries
    dec = decode(rm, t)
    for (p, row), (g, c) in dec.items():
        assert entries[(row // t) % 4][p] == (g, c)
    for j in range(12):
        for p in range(2):
            assert ((p, j * t) in dec) == ((p, (j % 4) * t) in dec)
            if (p, j * t) in dec:
                assert dec[(p, j * t)] == dec[(p, (j % 4) * t)]
    assert not any((p, r) in dec for p in range(2) for r in (4, 5, 12, 13, 20, 21))  # entry 2: base only


def test_row_map_one_adapter_per_sample_is_one_pass_whatever_the_adapter_count():
    entries = [[(j, 1.0)] for j in range(16)]
    rm = S.build_row_map(entries, batch=64, rows_per_sample=1)
    assert len(rm.passes) == 1 and len(rm.seg_group_host) == 16 and rm.pass_max_rows == [4]


def test_row_map_drops_weight_zero_pairs_and_base_only_batch_has_no_entries():
    rm = S.build_row_map([[(0, 0.0)], [], [(3, 0.0), (1, 0.0)]], batch=6, rows_per_sample=4)
    assert rm.passes == [] and rm.num_entries == 0 and rm.rows.numel() == 0 and rm.max_rows == 0
    rm = S.build_row_map([[(0, 0.0), (1, 1.0)]], batch=1, rows_per_sample=1)
    assert rm.passes == [(0, 1)] and rm.seg_group_host == [1] and rm.rows.tolist() == [0]


def test_row_map_rejects_batch_not_a_multiple_of_the_entries():
    with pytest.raises(ValueError):
        S.build_row_map([[(0, 1.0)], []], batch=5, rows_per_sample=1)
    with pytest.raises(ValueError):
        S.build_row_map([[(0, 1.0)]] * 3, batch=2, rows_per_sample=4)
    with pytest.raises(ValueError):
        S.build_row_map([], batch=4, rows_per_sample=1)


# --------------------------------------------------------------------------------------------- validation


def test_make_groups_packs_ranks_scales_and_the_pointer_table():
    d0, u0 = torch.randn(3, 10), torch.randn(7, 3)
    d2, u2 = torch.randn(5, 10).t().contiguous().t(), torch.randn(7, 5)  # non-contiguous down gets copied
    grp = S.make_groups([d0, None, d2], [u0, None, u2], [0.5, 1.0, 2.0])
    assert grp.ranks == [3, 0, 5] and grp.max_rank == 5
    assert grp.in_features == 10 and grp.out_features == 7 and grp.dtype == torch.float32
    assert grp.scale.dtype == torch.float32 and grp.scale.tolist() == [0.5, 1.0, 2.0]
    assert grp.downs[1] is None and grp.ups[1] is None and grp.downs[2].is_contiguous()
    assert grp.table.dtype == torch.int64 and grp.table.shape == (3, 3)
    assert grp.table[:, 2].tolist() == [3, 0, 5]
    assert grp.table[2, 0].item() == grp.downs[2].data_ptr() and grp.table[0, 1].item() == grp.ups[0].data_ptr()


def test_make_groups_rejects_mismatched_shapes_dtypes_devices_and_missing_factors():
    d, u = torch.randn(4, 10), torch.randn(6, 4)
    bad = {
        "length mismatch": ([d], [u, u], [1.0]),
        "scales length mismatch": ([d], [u], [1.0, 2.0]),
        "all None": ([None, None], [None, None], [1.0, 1.0]),
        "no groups": ([], [], []),
        "down K mismatch": ([d, torch.randn(4, 11)], [u, u], [1.0, 1.0]),
        "up N mismatch": ([d, d], [u, torch.randn(5, 4)], [1.0, 1.0]),
        "up rank mismatch": ([d, d], [u, torch.randn(6, 3)], [1.0, 1.0]),
        "up rank mismatch first group": ([d], [torch.randn(6, 5)], [1.0]),
        "3-d up": ([d, d], [u, u[None]], [1.0, 1.0]),
        "dtype mismatch": ([d, d.half()], [u, u.half()], [1.0, 1.0]),
        "down and up dtypes differ": ([d], [u.half()], [1.0]),
        "device mismatch": ([d, d.to("meta")], [u, u.to("meta")], [1.0, 1.0]),
        "later group down without up": ([d, d], [u, None], [1.0, 1.0]),
        "later group up without down": ([d, None], [u, u], [1.0, 1.0]),
    }
    for what, args in bad.items():
        with pytest.raises(ValueError):
            S.make_groups(*args)
            pytest.fail(what)
    with pytest.raises(ValueError):
        S.make_groups([d], [u], [1.0], device="meta")  # factors not on the requested device


def test_make_groups_rejects_down_without_up_in_the_first_group():
    # The first group's factors size the layer; a missing up there must be the same ValueError as elsewhere.
    with pytest.raises(ValueError):
        S.make_groups([torch.randn(4, 10)], [None], [1.0])
    with pytest.raises(ValueError):
        S.make_groups([None, torch.randn(4, 10)], [None, None], [1.0, 1.0])


def test_make_groups_rejects_a_one_dimensional_first_down():
    with pytest.raises(ValueError):
        S.make_groups([torch.randn(10)], [torch.randn(6, 1)], [1.0])


def test_shrink_rejects_x_of_wrong_width_dtype_or_rank_and_unknown_groups():
    grp = S.make_groups([torch.randn(4, 10)], [torch.randn(6, 4)], [1.0])
    rm = S.build_row_map([[(0, 1.0)]], batch=2, rows_per_sample=1)
    for x in (torch.randn(2, 11), torch.randn(2, 10, dtype=torch.float16), torch.randn(20), torch.randn(2, 10, 1)):
        with pytest.raises(ValueError):
            S.lora_shrink(x, grp, rm)
    with pytest.raises(ValueError):
        S.lora_shrink(torch.randn(2, 10), grp, S.build_row_map([[(1, 1.0)]], batch=2, rows_per_sample=1))


def test_expand_rejects_out_of_wrong_shape_or_column_stride():
    grp = S.make_groups([torch.randn(4, 10)], [torch.randn(6, 4)], [1.0])
    rm = S.build_row_map([[(0, 1.0)]], batch=2, rows_per_sample=1)
    h = S.lora_shrink(torch.randn(2, 10), grp, rm)
    for out in (torch.zeros(2, 7), torch.zeros(12), torch.zeros(2, 6, 1), torch.zeros(6, 2).t()):
        with pytest.raises(ValueError):
            S.lora_expand(out, h, grp, rm)


def test_unknown_backend_is_rejected_by_argument_and_by_environment(monkeypatch):
    grp = S.make_groups([torch.randn(4, 10)], [torch.randn(6, 4)], [1.0])
    rm = S.build_row_map([[(0, 1.0)]], batch=2, rows_per_sample=1)
    with pytest.raises(ValueError):
        S.segmented_lora(torch.randn(2, 10), torch.zeros(2, 6), grp, rm, backend="cuda")
    monkeypatch.setenv("LORA_FAST_SEGMENTED_BACKEND", "bogus")
    with pytest.raises(ValueError):
        S.segmented_lora(torch.randn(2, 10), torch.zeros(2, 6), grp, rm)


def test_cpu_tensors_default_to_the_torch_backend(monkeypatch):
    monkeypatch.delenv("LORA_FAST_SEGMENTED_BACKEND", raising=False)

    def no_triton(*a, **k):
        raise AssertionError("the Triton kernels ran for CPU tensors without being asked")

    monkeypatch.setattr(S, "_triton_shrink", no_triton)
    monkeypatch.setattr(S, "_triton_expand", no_triton)
    case = named_cases()["cfg_layout_batch_is_twice_the_entries"]
    gen = torch.Generator().manual_seed(9)
    x, out, downs, ups = make_tensors(case, torch.float32, gen)
    got = S.segmented_lora(x, out.clone(), S.make_groups(downs, ups, case.scales),
                           S.build_row_map(case.entries, case.batch, case.rows_per_sample))
    assert_matches_reference(got, reference(case, x, out, downs, ups), torch.float32)


# --------------------------------------------------------------------------------------------- Triton


TRITON_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, {tests_dir!r})
    import torch
    import test_kernels_shrink_expand as T
    from lora_fast.kernels import shrink_expand as S

    def backends_agree(tri, tor, out, dtype, n_passes, what):
        if dtype == torch.float32:
            worst = ((tri.double() - tor.double()).abs().amax(1) / tor.double().abs().amax(1).clamp_min(1e-300)).max()
            assert worst <= 2e-6, (what, worst.item())
        else:
            # each pass rounds once, so at most one ulp per pass apart, plus what the two fp32 sums (summed in
            # different orders) may differ by where the LoRA term cancels the base value: a few fp32 ulps of |out|
            bound = n_passes * torch.maximum(T.ulp(tri), T.ulp(tor)).double() + 2.0 ** -20 * out.double().abs()
            assert bool(((tri.double() - tor.double()).abs() <= bound).all()), what

    gen = torch.Generator().manual_seed(77)
    cases = list(T.named_cases().items())
    cases += [("random%d" % i, T.random_case(gen, max_batch=64, max_rps=2, max_kn=150)) for i in range(12)]
    checked = 0
    for dtype in T.DTYPES:
        for i, (name, case) in enumerate(cases):
            seed = 500 + i
            # run_case: reference tolerance + base-only rows bit-identical, for each backend
            x, out, tri, groups, rows = T.run_case(case, dtype, seed, "triton")
            _, _, tor, _, _ = T.run_case(case, dtype, seed, "torch")
            backends_agree(tri, tor, out, dtype, len(rows.passes), (name, dtype))
            if rows.num_entries and groups.max_rank:
                ht = S.lora_shrink(x, groups, rows, backend="triton")
                hc = S.lora_shrink(x, groups, rows, backend="torch")
                for s, g in enumerate(rows.seg_group_host):
                    a, b = rows.seg_start_host[s], rows.seg_start_host[s + 1]
                    r = groups.ranks[g]
                    if r == 0:
                        continue  # absent group: h is unspecified there
                    d = (ht[a:b, :r].double() - hc[a:b, :r].double()).abs().max()
                    assert d <= 1e-5 * max(1.0, hc[a:b, :r].abs().max().item()), (name, dtype, s, d.item())
            checked += 1

        # strided x (row stride != K, and stride(1) != 1) and a column-sliced out give the contiguous result
        case = T.named_cases()["five_adapters_absent_groups_base_only_weight0_and_mixtures"]
        x, out, downs, ups = T.make_tensors(case, dtype, gen)
        groups = S.make_groups(downs, ups, case.scales)
        rows = S.build_row_map(case.entries, case.batch, case.rows_per_sample)
        expected = S.segmented_lora(x, out.clone(), groups, rows, backend="triton")
        wide = torch.zeros(case.m, case.k + 7, dtype=dtype)
        wide[:, 3:3 + case.k] = x
        for xv in (wide[:, 3:3 + case.k], x.t().contiguous().t()):
            assert T.same_bits(S.segmented_lora(xv, out.clone(), groups, rows, backend="triton"), expected), dtype
        out_wide = torch.randn(case.m, case.n + 5, generator=gen).to(dtype)
        out_wide[:, 2:2 + case.n] = out
        before = out_wide.clone()
        S.segmented_lora(x, out_wide[:, 2:2 + case.n], groups, rows, backend="triton")
        assert T.same_bits(out_wide[:, 2:2 + case.n], expected), dtype
        assert T.same_bits(out_wide[:, :2], before[:, :2]) and T.same_bits(out_wide[:, 2 + case.n:], before[:, 2 + case.n:])
    print("TRITON-OK", checked)
    """
)


@interpretable_segmented_kernels
def test_triton_kernels_interpreted_match_reference_and_torch_backend_for_all_dtypes():
    pytest.importorskip("triton")
    script = TRITON_SCRIPT.format(tests_dir=os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("LORA_FAST_SEGMENTED_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "TRITON-OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_default_triton_choice_falls_back_to_torch_once_when_kernels_cannot_compile(monkeypatch):
    """Compile/launch errors happen before a kernel runs: the default choice warns once and the torch backend takes
    over with the same result; a backend asked for by name, or LORA_FAST_TRITON_FALLBACK=0, raises instead."""

    def broken(*args):
        raise RuntimeError("no compiler for this GPU")

    monkeypatch.setattr(S, "_triton_shrink", broken)
    monkeypatch.setattr(S, "_triton_expand", broken)
    from lora_fast.kernels import probe as P

    monkeypatch.setattr(P, "_cache", {})  # no verdict yet (restored afterwards)
    real_backend = S._backend
    monkeypatch.setattr(S, "_backend", lambda t, b: "triton" if b is None else real_backend(t, b))
    monkeypatch.delenv("LORA_FAST_SEGMENTED_BACKEND", raising=False)
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(6, 8, generator=g), torch.randn(6, 5, generator=g)
    groups = S.make_groups([torch.randn(2, 8, generator=g)], [torch.randn(5, 2, generator=g)], [0.5])
    rows = S.build_row_map([[(0, 1.0)], []], 6, 1)
    monkeypatch.setenv("LORA_FAST_TRITON_FALLBACK", "0")
    with pytest.raises(RuntimeError, match="no compiler"):
        S.segmented_lora(x, out.clone(), groups, rows)
    monkeypatch.delenv("LORA_FAST_TRITON_FALLBACK")
    with pytest.warns(RuntimeWarning, match="no compiler"):
        got = S.segmented_lora(x, out.clone(), groups, rows)
    assert torch.equal(got, S.segmented_lora(x, out.clone(), groups, rows, backend="torch"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        S.segmented_lora(x, out.clone(), groups, rows)
    with pytest.raises(RuntimeError, match="no compiler"):
        S.segmented_lora(x, out.clone(), groups, rows, backend="triton")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_channels_first_lora_matches_the_per_sample_reference(dtype):
    """1x1 convolutions: the same terms on (B, K, P) activations, pixels as the rows of each sample; batched passes
    (every sample has a term) and runs (base-only samples, partial mixes) both, untouched samples bit-identical."""
    gen = torch.Generator().manual_seed(31)
    cases = list(named_cases().values()) + [random_case(gen, max_batch=24, max_rps=5, max_kn=60) for _ in range(15)]
    cases.append(Case(k=12, n=9, ranks=[3, 16, 5], scales=[0.5, 1.0, 2.0], entries=[[(0, 1.0)], [(1, 0.5)], [(2, 1.0)]],
                      reps=2, rows_per_sample=7, lam=0.5))  # every sample covered: the batched pass
    for i, case in enumerate(cases):
        x, out, downs, ups = make_tensors(case, dtype, torch.Generator().manual_seed(900 + i))
        ref = reference(case, x, out, downs, ups)
        b, t = case.batch, case.rows_per_sample
        groups = S.make_groups(downs, ups, case.scales)
        rows = S.build_row_map(case.entries, b, 1)
        x_cf = x.view(b, t, case.k).transpose(1, 2).contiguous()
        out_cf = out.view(b, t, case.n).transpose(1, 2).contiguous()
        got_cf = out_cf.clone()
        assert S.channels_first_lora(x_cf, got_cf, groups, rows, lam=case.lam) is got_cf
        got = got_cf.transpose(1, 2).reshape(case.m, case.n)
        assert_matches_reference(got, ref, dtype, f"channels-first {dtype} {case}")
        keep = untouched_rows(case, downs)
        if keep.numel():
            assert same_bits(got[keep], out[keep]), case


def test_channels_first_lora_rejects_mismatched_shapes():
    g = torch.Generator().manual_seed(1)
    groups = S.make_groups([torch.randn(2, 6, generator=g)], [torch.randn(5, 2, generator=g)], [1.0])
    rows = S.build_row_map([[(0, 1.0)]], 3, 1)
    with pytest.raises(ValueError, match="do not fit"):
        S.channels_first_lora(torch.randn(3, 7, 4), torch.randn(3, 5, 4), groups, rows)
    with pytest.raises(ValueError, match="do not fit"):  # C·kh·kw = 2·1·2 = 4, the factors take 6
        S.channels_first_lora(torch.randn(3, 2, 4, 4), torch.randn(3, 5, 4, 3), groups, rows,
                              conv={"kernel_size": (1, 2), "stride": 1, "padding": 0, "dilation": 1})
    with pytest.raises(ValueError, match="rows_per_sample=1"):
        S.channels_first_lora(torch.randn(3, 6, 4), torch.randn(3, 5, 4), groups, S.build_row_map([[(0, 1.0)]], 3, 4))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geometry", [((3, 3), 1, 1, 1), ((3, 3), 2, 1, 1), ((3, 1), 1, (2, 0), 2)],
                         ids=["3x3", "3x3-stride2", "3x1-dilated"])
def test_channels_first_lora_convolution_matches_per_sample_conv2d(dtype, geometry):
    kernel_size, stride, padding, dilation = geometry
    kh, kw = kernel_size
    gen = torch.Generator().manual_seed(41)
    c, n, ranks = 5, 7, [2, 4, 3]
    downs = [(torch.randn(r, c, kh, kw, generator=gen) / (c * kh * kw) ** 0.5).to(dtype) for r in ranks]
    ups = [(torch.randn(n, r, generator=gen) / r ** 0.5).to(dtype) for r in ranks]
    scales = [0.5, 1.0, 2.0]
    conv = {"kernel_size": kernel_size, "stride": stride, "padding": padding, "dilation": dilation}
    groups = S.make_groups([d.reshape(d.shape[0], -1) for d in downs], ups, scales)
    for entries in ([[(0, 1.0)], [(1, 0.5)], [(2, 1.0)]],  # every sample covered: the batched pass
                    [[(0, 1.0), (2, -0.5)], [], [(1, 2.0)]]):  # a base-only sample and a partial mix: runs
        b = 2 * len(entries)
        x = torch.randn(b, c, 9, 8, generator=gen).to(dtype)
        h_out, w_out = torch.nn.functional.conv2d(x[:1].float(), downs[0].float(), None, stride, padding, dilation).shape[2:]
        out = torch.randn(b, n, h_out, w_out, generator=gen).to(dtype)
        ref = out.double().clone()
        for j in range(b):
            for g, w in entries[j % len(entries)]:
                h = torch.nn.functional.conv2d(x[j:j + 1].double(), downs[g].double(), None, stride, padding, dilation)
                ref[j] += scales[g] * w * 0.75 * torch.einsum("nr,rhw->nhw", ups[g].double(), h[0])
        got = out.clone()
        S.channels_first_lora(x, got, groups, S.build_row_map(entries, b, 1), lam=0.75, conv=conv)
        assert_matches_reference(got.reshape(b, -1), ref.reshape(b, -1), dtype, f"{geometry} {entries}")
        base_only = [j for j in range(b) if not entries[j % len(entries)]]
        for j in base_only:
            assert same_bits(got[j], out[j])
