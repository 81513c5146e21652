"""Segmented LoRA shrink/expand: a different adapter for each group of rows, all adapters in one launch.

For one LoRA layer with base output ``out = base(x)`` (x: ``(M, K)``, out: ``(M, N)``, rows = tokens of all
samples, flattened), G adapter groups ``g`` with factors ``A_g`` (down, ``(r_g, K)``) and ``B_g`` (up,
``(N, r_g)``), and a :class:`RowMap` listing which rows use which group with which weight, the two operations are

* shrink:  ``h[e, :r_g] = x[row_e] · A_g^T``                              (fp32, one row of h per map entry)
* expand:  ``out[row_e] = rn(out[row_e] + λ · scale_g · coef_e · h[e] · B_g^T)``   (fp32 sum, one rounding)

where entry ``e`` of segment ``s`` has group ``g = seg_group[s]``. Ranks may differ between groups (the launch
pads to the largest rank, in registers only). A group whose factors are absent for this layer (``None``: the
adapter does not touch this module) has rank 0 and contributes nothing. Rows that no entry names (samples that
use the base model only) are left untouched.

Segments are grouped into *passes*: the segments of one pass never name the same row, so one expand launch can
update them all without races. A sample that mixes k adapters has its rows in k passes (pass p holds the p-th
adapter of its mixture); with one adapter per sample there is exactly one pass, i.e. one shrink and one expand
launch per layer whatever the number of adapters.

Backends: ``"triton"`` (the default for CUDA tensors; runs on CPU tensors under ``TRITON_INTERPRET=1``) and
``"torch"`` (the default elsewhere): the same semantics as a loop over the runs of consecutive rows of each
segment (views, no gathers), fp32 products, and one rounding per pass. ``LORA_FAST_SEGMENTED_BACKEND`` overrides
the default. The first use of the Triton kernels on a (device, dtype) checks them against the torch backend on a
small case (probe.py). If they fail that check, or fail to compile or launch (they raise before running), the
default choice warns once and the torch backend takes over for that device and dtype for the rest of the process
(``LORA_FAST_TRITON_FALLBACK=0``: raise).
"""

from __future__ import annotations

import collections
import os
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .. import kernels as _kernels_pkg
from . import probe as _probe

__all__ = ["RowMap", "AdapterGroups", "Shrunk", "build_row_map", "lora_shrink", "lora_expand", "segmented_lora",
           "segmented_shrink", "segmented_expand", "channels_first_lora"]

_BACKENDS = ("triton", "torch")
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@dataclass(eq=False)
class RowMap:
    """Which rows of a flattened activation use which adapter group, with which weight.

    rows:       int64 ``(E,)``: the activation row of each entry; the entries of segment ``s`` are
                ``rows[seg_start[s]:seg_start[s + 1]]`` (ascending inside a segment).
    coef:       float32 ``(E,)``: the entry's weight (the sample's weight for that adapter; 1.0 for a plain name).
    seg_start:  int32 ``(S + 1,)``: entry offsets of the segments.
    seg_group:  int32 ``(S,)``: the adapter group of each segment.
    passes:     host list of ``(first_segment, end_segment)``: segments of one pass name disjoint rows.
    Host copies (``seg_start_host``, ``seg_group_host``, ``pass_max_rows``) size the launch grids without
    a device sync. ``samples``/``sample_coef``: per segment, the batch samples (host ints) and their weights,
    for callers that work per sample rather than per row. ``runs``: per segment, ``(first entry, first row,
    rows, weight)`` of each run of consecutive samples with one weight: contiguous in both the activation and h,
    so the torch backend works on views instead of gathered rows.
    """

    rows: torch.Tensor
    coef: torch.Tensor
    seg_start: torch.Tensor
    seg_group: torch.Tensor
    passes: list
    seg_start_host: list
    seg_group_host: list
    pass_max_rows: list
    samples: list = field(default_factory=list)
    sample_coef: list = field(default_factory=list)
    runs: list = field(default_factory=list)
    batch: int = 0
    rows_per_sample: int = 0
    pass_groups: list = field(default_factory=list)  # per pass: each sample's group (-1: none in this pass)
    pass_weights: list = field(default_factory=list)  # per pass: each sample's weight (0.0 where none)

    @property
    def num_entries(self) -> int:
        return self.seg_start_host[-1]

    @property
    def max_rows(self) -> int:
        return max(self.pass_max_rows, default=0)


def build_row_map(entries: Sequence[Sequence[tuple]], batch: int, rows_per_sample: int,
                  device: torch.device | str = "cpu") -> RowMap:
    """The row map of a batch of ``batch`` samples, each ``rows_per_sample`` contiguous rows of the activation.

    ``entries[i]`` is the list of ``(group, weight)`` pairs of per-sample entry ``i`` (empty: base model only);
    sample ``j`` uses ``entries[j % len(entries)]`` (the classifier-free-guidance layout: a batch of k·n samples
    is k blocks of the n entries). Pairs with weight 0 are dropped. ``batch`` must be a multiple of
    ``len(entries)`` (checked by the caller, which knows which layer to name).
    """
    n = len(entries)
    if n == 0 or batch % n:
        raise ValueError(f"batch {batch} is not a multiple of the {n} per-sample entries")
    t = int(rows_per_sample)
    n_pass = max((len(e) for e in entries), default=0)
    seg_group, samples, weights, passes = [], [], [], []
    for p in range(n_pass):
        by_group: dict[int, tuple[list, list]] = {}
        for j in range(batch):
            e = entries[j % n]
            if p < len(e):
                g, w = e[p]
                if w == 0.0:
                    continue
                s, ws = by_group.setdefault(int(g), ([], []))
                s.append(j)
                ws.append(float(w))
        first = len(seg_group)
        for g in sorted(by_group):
            seg_group.append(g)
            samples.append(by_group[g][0])
            weights.append(by_group[g][1])
        if len(seg_group) > first:
            passes.append((first, len(seg_group)))
    starts = [0]
    for s in samples:
        starts.append(starts[-1] + len(s) * t)
    pass_max = [max((starts[i + 1] - starts[i] for i in range(a, b)), default=0) for a, b in passes]
    pass_groups, pass_weights = [], []
    for first, end in passes:
        gs, ws_ = [-1] * batch, [0.0] * batch
        for seg in range(first, end):
            for j, w in zip(samples[seg], weights[seg]):
                gs[j], ws_[j] = seg_group[seg], w
        pass_groups.append(gs)
        pass_weights.append(ws_)
    runs = []
    for seg, (s, ws) in enumerate(zip(samples, weights)):
        seg_runs, e = [], starts[seg]
        for j, w in zip(s, ws):
            last = seg_runs[-1] if seg_runs else None
            if last is not None and last[3] == w and last[1] + last[2] == j * t:
                seg_runs[-1] = (last[0], last[1], last[2] + t, w)
            else:
                seg_runs.append((e, j * t, t, w))
            e += t
        runs.append(seg_runs)
    if samples:
        samp = torch.tensor([j for s in samples for j in s], dtype=torch.int64)
        w = torch.tensor([x for ws in weights for x in ws], dtype=torch.float32)
        rows = (samp[:, None] * t + torch.arange(t, dtype=torch.int64)[None, :]).reshape(-1)
        coef = w.repeat_interleave(t)
    else:
        rows = torch.empty(0, dtype=torch.int64)
        coef = torch.empty(0, dtype=torch.float32)
    return RowMap(
        rows=rows.to(device), coef=coef.to(device),
        seg_start=torch.tensor(starts, dtype=torch.int32, device=device),
        seg_group=torch.tensor(seg_group, dtype=torch.int32, device=device),
        passes=passes, seg_start_host=starts, seg_group_host=seg_group, pass_max_rows=pass_max,
        samples=samples, sample_coef=weights, runs=runs, batch=batch, rows_per_sample=t,
        pass_groups=pass_groups, pass_weights=pass_weights,
    )


@dataclass(eq=False)
class AdapterGroups:
    """The factors of the adapter groups of one layer, in the activation's dtype and on its device.

    downs[g]: ``(r_g, K)`` contiguous (A_g) or None; ups[g]: ``(N, r_g)`` contiguous (B_g) or None.
    scale: float32 ``(G,)`` on the device: the per-group multiplier (alpha/r, and any set_adapters weight).
    table: int64 ``(G, 3)`` on the device: (A_g address, B_g address, r_g) for the Triton kernels, 0 rank for
    absent groups. The tensors above are kept referenced here, so the addresses stay valid.
    """

    downs: list
    ups: list
    scale: torch.Tensor
    ranks: list
    table: torch.Tensor
    in_features: int
    out_features: int
    dtype: torch.dtype
    _f32: dict = field(default_factory=dict)  # group -> fp32 factors for the torch backend (made on first use)
    _per_sample: "collections.OrderedDict" = field(default_factory=lambda: collections.OrderedDict())  # torch batched path

    @property
    def max_rank(self) -> int:
        return max(self.ranks, default=0)

    def per_sample_factors(self, rows: "RowMap", p: int):
        """For pass ``p`` of ``rows`` (every sample has a group): fp32 ``(B, K, R)`` A_gᵀ and ``(B, R, N)`` B_gᵀ per
        sample, zero-padded to the pass's largest rank, and ``(B, 1, 1)`` weight · scale. Cached per row map and
        pass (the few most recent)."""
        key = (id(rows), p)
        hit = self._per_sample.get(key)
        if hit is not None and hit[0] is rows:
            self._per_sample.move_to_end(key)
            return hit[1:]
        gs = rows.pass_groups[p]
        dev, b = self.scale.device, len(gs)
        r = max(self.ranks[g] for g in set(gs))
        downs_t = torch.zeros((b, self.in_features, r), dtype=torch.float32, device=dev)
        ups_t = torch.zeros((b, r, self.out_features), dtype=torch.float32, device=dev)
        for g in sorted(set(gs)):
            d, u = self.fp32_factors(g)
            idx = torch.tensor([j for j, x in enumerate(gs) if x == g], dtype=torch.int64, device=dev)
            downs_t[idx, :, :d.shape[0]] = d.t()
            ups_t[idx, :u.shape[1], :] = u.t()
        idx = torch.tensor(gs, dtype=torch.int64, device=dev)
        coef = torch.tensor(rows.pass_weights[p], dtype=torch.float32, device=dev) * self.scale[idx]
        out = (downs_t, ups_t, coef.view(-1, 1, 1))
        self._per_sample[key] = (rows,) + out
        while len(self._per_sample) > 8:
            self._per_sample.popitem(last=False)
        return out

    def fp32_factors(self, g: int):
        """(A_g, B_g) in fp32 (the factors themselves when they are fp32; copies made once otherwise)."""
        hit = self._f32.get(g)
        if hit is None:
            hit = self._f32[g] = (_canonical32(self.downs[g].float()), _canonical32(self.ups[g].float()))
        return hit


def make_groups(downs: Sequence[Optional[torch.Tensor]], ups: Sequence[Optional[torch.Tensor]],
                scales: Sequence[float], device=None) -> AdapterGroups:
    """Validate and pack the factors of one layer's groups (see :class:`AdapterGroups`)."""
    if not (len(downs) == len(ups) == len(scales)):
        raise ValueError("downs, ups and scales must have one entry per group")
    for g, (d, u) in enumerate(zip(downs, ups)):
        if (d is None) != (u is None):
            raise ValueError(f"group {g}: down and up must both be given or both be None")
        if d is not None and (d.dim() != 2 or u.dim() != 2):
            raise ValueError(f"group {g}: down {tuple(d.shape)} and up {tuple(u.shape)} must be 2-D")
    present = [(d, u) for d, u in zip(downs, ups) if d is not None]
    if not present:
        raise ValueError("no group has factors")
    d0, u0 = present[0]
    k, n, dtype = d0.shape[1], u0.shape[0], d0.dtype
    device = d0.device if device is None else torch.device(device)
    dl, ul, ranks, rows = [], [], [], []
    for g, (d, u) in enumerate(zip(downs, ups)):
        if d is None:
            dl.append(None)
            ul.append(None)
            ranks.append(0)
            rows.append([0, 0, 0])
            continue
        r = d.shape[0]
        if d.shape[1] != k or u.shape != (n, r):
            raise ValueError(f"group {g}: down {tuple(d.shape)} / up {tuple(u.shape)} do not fit ({n}, r)·(r, {k})")
        if d.dtype != dtype or u.dtype != dtype or d.device != device or u.device != device:
            raise ValueError(f"group {g}: factors must share dtype {dtype} and device {device}")
        d, u = d.contiguous(), u.contiguous()
        dl.append(d)
        ul.append(u)
        ranks.append(int(r))
        rows.append([d.data_ptr(), u.data_ptr(), int(r)])
    table = torch.tensor(rows, dtype=torch.int64).to(device)
    scale = torch.tensor([float(s) for s in scales], dtype=torch.float32).to(device)
    return AdapterGroups(dl, ul, scale, ranks, table, int(k), int(n), dtype)


def _explicit(backend: Optional[str]) -> bool:
    return backend is not None or bool(os.environ.get("LORA_FAST_SEGMENTED_BACKEND"))


def _launch(explicit: bool, fn, *args) -> bool:
    """Run a Triton launcher (its first argument is x or out); False if the torch backend must do the work instead.

    The first use on a (device, dtype) runs the probe (probe.py: the kernels against the torch backend on a small
    awkward case). A failed probe, or a compile/launch error here (raised before the kernel runs, so nothing was
    written), gives one warning per (device, dtype) and the torch backend from then on, with the same semantics.
    Only for the default choice: a backend asked for by name (argument or LORA_FAST_SEGMENTED_BACKEND) raises, and
    so does everything with LORA_FAST_TRITON_FALLBACK=0 (GPU tests)."""
    t = args[0]
    if not _probe.usable("segmented", t.device, t.dtype, strict=explicit):
        return False
    try:
        fn(*args)
        return True
    except Exception as e:  # noqa: BLE001 - any compile/launch failure
        return _probe.launch_failed("segmented", t.device, t.dtype, e, strict=explicit)


def _backend(t: torch.Tensor, backend: Optional[str]) -> str:
    be = backend or os.environ.get("LORA_FAST_SEGMENTED_BACKEND") or ("triton" if t.is_cuda else "torch")
    if be not in _BACKENDS:
        raise ValueError(f"unknown segmented LoRA backend {be!r} (one of {_BACKENDS})")
    return be


def _check(x: torch.Tensor, groups: AdapterGroups, rows: RowMap) -> None:
    if x.dim() != 2 or x.shape[1] != groups.in_features:
        raise ValueError(f"x must be (M, {groups.in_features}), got {tuple(x.shape)}")
    if x.dtype != groups.dtype:
        raise ValueError(f"x is {x.dtype}, the factors are {groups.dtype}")
    if rows.seg_group_host and max(rows.seg_group_host) >= len(groups.ranks):
        raise ValueError(f"the row map names group {max(rows.seg_group_host)}, only {len(groups.ranks)} exist")


def lora_shrink(x: torch.Tensor, groups: AdapterGroups, rows: RowMap, backend: Optional[str] = None) -> torch.Tensor:
    """``h`` (float32, ``(E, max(16, max rank))``): row e holds ``x[rows[e]] · A_g^T`` in its first r_g columns.

    Columns past a group's rank, and the rows of absent groups, are unspecified (expand never reads them).
    x: ``(M, K)`` with unit column stride, in the factors' dtype.
    """
    _check(x, groups, rows)
    if x.stride(1) != 1:
        x = x.contiguous()
    width = max(16, _next_pow2(groups.max_rank))
    h = torch.empty((rows.num_entries, width), dtype=torch.float32, device=x.device)
    if rows.num_entries == 0 or groups.max_rank == 0:
        return h
    if _backend(x, backend) == "triton" and _launch(_explicit(backend), _triton_shrink, x, h, groups, rows):
        pass
    else:
        x = _canonical32(x)
        for s, g in enumerate(rows.seg_group_host):
            r = groups.ranks[g]
            if r == 0:
                continue
            down, _ = groups.fp32_factors(g)
            for e, row, n, _ in rows.runs[s]:
                torch.mm(x[row:row + n].float(), down.t(), out=h[e:e + n, :r])
    return h


def lora_expand(out: torch.Tensor, h: torch.Tensor, groups: AdapterGroups, rows: RowMap, lam: float = 1.0,
                backend: Optional[str] = None, passes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """In place: ``out[row_e] = rn(out[row_e] + lam · scale_g · coef_e · h[e, :r_g] · B_g^T)`` for every entry.

    out: ``(M, N)`` with unit column stride (modified in place and returned); h: from :func:`lora_shrink`;
    ``passes``: indices into ``rows.passes`` to run (default all, in order; one launch each).
    """
    if out.dim() != 2 or out.shape[1] != groups.out_features or out.stride(1) != 1:
        raise ValueError(f"out must be (M, {groups.out_features}) with unit column stride, got {tuple(out.shape)}")
    if out.dtype != groups.dtype:
        raise ValueError(f"out is {out.dtype}, the factors are {groups.dtype}")
    todo = range(len(rows.passes)) if passes is None else passes
    if groups.max_rank == 0:
        return out
    if _backend(out, backend) == "triton":
        todo = list(todo)
        if not todo or _launch(_explicit(backend), _triton_expand, out, h, groups, rows, todo[0], float(lam)):
            for p in todo[1:]:
                _triton_expand(out, h, groups, rows, p, float(lam))
            return out
        # the first launch failed before running: the torch backend below does every pass
    if not _is_canonical32(out):
        return _staged(out, lambda o: lora_expand(o, h, groups, rows, lam, "torch", passes=todo))
    scale = groups.scale.tolist()
    for p in todo:
        first, end = rows.passes[p]
        for s in range(first, end):
            g = rows.seg_group_host[s]
            r = groups.ranks[g]
            if r == 0:
                continue
            _, up = groups.fp32_factors(g)
            for e, row, n, w in rows.runs[s]:
                dst = out[row:row + n]
                c = lam * scale[g] * w
                if dst.dtype == torch.float32:
                    dst.addmm_(h[e:e + n, :r], up.t(), alpha=c)
                else:  # fp32 sum, one rounding
                    dst.copy_(torch.addmm(dst.float(), h[e:e + n, :r], up.t(), alpha=c))
    return out


@dataclass(eq=False)
class Shrunk:
    """What :func:`segmented_shrink` computed for one activation, for :func:`segmented_expand` (possibly several
    times: modules whose groups hold equal down factors and that see the same input expand one shrink).

    batched: per pass, the torch backend's ``(B, T, R)`` fp32 product ``x · A_gᵀ`` of each sample (zero-padded to the
    pass's largest rank) where that pass runs batched over the samples, else None.
    h: the row-form ``h`` of :func:`lora_shrink`, when some pass needs it (always on the Triton backend).
    """

    batched: list
    h: Optional[torch.Tensor]
    backend: str


def segmented_shrink(x: torch.Tensor, groups: AdapterGroups, rows: RowMap, backend: Optional[str] = None) -> Shrunk:
    """The shrink half of :func:`segmented_lora`: ``x · A_gᵀ`` for every pass, without weights or scales (those
    enter in :func:`segmented_expand`), so one result serves every module with equal down factors and input."""
    be = _backend(x, backend)
    if be == "triton":
        return Shrunk([None] * len(rows.passes), lora_shrink(x, groups, rows, backend), be)
    _check(x, groups, rows)
    x = _canonical32(x)
    batched = [_batched_shrink(x, groups, rows, p) for p in range(len(rows.passes))]
    h = lora_shrink(x, groups, rows, "torch") if any(b is None for b in batched) else None
    return Shrunk(batched, h, be)


def segmented_expand(out: torch.Tensor, shrunk: Shrunk, groups: AdapterGroups, rows: RowMap, lam: float = 1.0,
                     backend: Optional[str] = None) -> torch.Tensor:
    """The expand half of :func:`segmented_lora`: ``out`` (modified in place) gains each row's terms from ``shrunk``
    (made by :func:`segmented_shrink` with the same ``rows`` and groups whose down factors equal these)."""
    if shrunk.backend == "triton":
        return lora_expand(out, shrunk.h, groups, rows, lam, backend)
    if out.dim() != 2 or out.shape[1] != groups.out_features or out.dtype != groups.dtype:
        raise ValueError(f"out must be (M, {groups.out_features}) in {groups.dtype}, got {tuple(out.shape)} {out.dtype}")
    if out.shape[0] != rows.batch * rows.rows_per_sample:
        raise ValueError(f"out has {out.shape[0]} rows, the row map {rows.batch} x {rows.rows_per_sample}")
    if not _is_canonical32(out) or out.stride(1) != 1:  # the batched expand writes rows of unit column stride
        return _staged(out, lambda o: segmented_expand(o, shrunk, groups, rows, lam, backend))
    for p, hb in enumerate(shrunk.batched):
        if hb is not None:
            _batched_expand(out, hb, groups, rows, p, lam)
        else:
            lora_expand(out, shrunk.h, groups, rows, lam, "torch", passes=[p])
    return out


def segmented_lora(x: torch.Tensor, out: torch.Tensor, groups: AdapterGroups, rows: RowMap, lam: float = 1.0,
                   backend: Optional[str] = None) -> torch.Tensor:
    """Shrink then expand every pass: ``out`` (modified in place) gains each row's LoRA terms.

    The torch backend takes a pass in which every sample has a group with factors as one batched product over the
    samples (factors gathered per sample from rank-padded stacks: a few ops per layer however many adapters);
    other passes, and the Triton backend, go through :func:`lora_shrink` / :func:`lora_expand`."""
    return segmented_expand(out, segmented_shrink(x, groups, rows, backend), groups, rows, lam, backend)


def _batched_shrink(x: torch.Tensor, groups: AdapterGroups, rows: RowMap, p: int) -> Optional[torch.Tensor]:
    """Pass ``p`` as one ``bmm`` over the samples (fp32 ``(B, T, R)``), or None if some sample has no term in it."""
    gs = rows.pass_groups[p]
    b, t = rows.batch, rows.rows_per_sample
    if not gs or x.shape[0] != b * t or any(g < 0 or groups.ranks[g] == 0 for g in gs):
        return None  # a sample without a term must keep its rows untouched
    downs_t, _, _ = groups.per_sample_factors(rows, p)
    x3 = x.reshape(b, t, -1)
    if x.dtype == torch.float32:
        return torch.bmm(x3, downs_t)
    # fp32 products from 16-bit rows, a few samples at a time so the fp32 copies stay cache-sized
    hb = torch.empty((b, t, downs_t.shape[2]), dtype=torch.float32, device=x.device)
    step = _samples_per_chunk(t * x.shape[1])
    for j in range(0, b, step):
        k = slice(j, j + step)
        torch.bmm(x3[k].float(), downs_t[k], out=hb[k])
    return hb


def _batched_expand(out: torch.Tensor, hb: torch.Tensor, groups: AdapterGroups, rows: RowMap, p: int,
                    lam: float) -> None:
    _, ups_t, coef = groups.per_sample_factors(rows, p)
    if lam != 1.0:
        coef = coef * lam
    b, t = rows.batch, rows.rows_per_sample
    if out.dtype == torch.float32 and out.is_contiguous():  # accumulate in place: no output-sized temporaries
        out.view(b, t, -1).baddbmm_(hb.mul(coef), ups_t)  # hb may serve other modules: not scaled in place
        return
    # fp32 sum, one rounding, a few samples at a time so the fp32 copies stay cache-sized
    step = _samples_per_chunk(t * out.shape[1])
    out3 = out.view(b, t, -1)
    for j in range(0, b, step):
        k = slice(j, j + step)
        out3[k] = torch.baddbmm(out3[k].float(), hb[k].mul(coef[k]), ups_t[k])


_CHUNK_BYTES = 4 << 20  # fp32 temporaries per chunk of samples in the 16-bit batched paths


def _samples_per_chunk(floats_per_sample: int) -> int:
    return max(1, _CHUNK_BYTES // max(1, 4 * floats_per_sample))


def channels_first_lora(x: torch.Tensor, out: torch.Tensor, groups: AdapterGroups, rows: RowMap,
                        lam: float = 1.0, conv: Optional[dict] = None) -> torch.Tensor:
    """The same terms for channels-first activations, sample j using its row-map entries (a map built with
    ``rows_per_sample=1``); ``out`` is modified in place. Torch ops on any device; fp32 sums, one rounding per pass.

    Without ``conv`` (a 1x1 convolution): x ``(B, K, P)``, out ``(B, N, P)``. With ``conv`` (a k x k convolution,
    ``{"kernel_size", "stride", "padding", "dilation"}`` as ``F.conv2d`` takes them; the groups' down factors are the
    filters flattened to ``(r, C·kh·kw)``): x ``(B, C, H, W)``, out ``(B, N, H', W')``. A pass where every sample has
    a term is one batched shrink over the samples (``bmm``, or one convolution with the samples as groups) and one
    batched expand (``baddbmm_``); other passes loop over runs of samples."""
    b = x.shape[0]
    if conv is None:
        ok = x.dim() == 3 and x.shape[1] == groups.in_features
    else:
        kh, kw = conv["kernel_size"]
        ok = x.dim() == 4 and x.shape[1] * kh * kw == groups.in_features and out.dim() == 4
    if not ok or out.shape[:2] != (b, groups.out_features):
        raise ValueError(f"x {tuple(x.shape)} and out {tuple(out.shape)} do not fit factors "
                         f"({groups.out_features}, r)·(r, {groups.in_features})" + (f" of a {conv} convolution" if conv else ""))
    if b != rows.batch or rows.rows_per_sample != 1:
        raise ValueError("channels_first_lora needs a row map of the batch with rows_per_sample=1")
    if not _is_canonical32(out):
        return _staged(out, lambda o: channels_first_lora(x, o, groups, rows, lam, conv))
    x = _canonical32(x)
    out3 = out.view(b, groups.out_features, -1)

    def shrink(xs, filters):  # xs (n, C, ...) fp32, filters (n·r, K): per-sample filters, in sample order
        n = xs.shape[0]
        if conv is None:
            return torch.bmm(filters.view(n, -1, groups.in_features), xs)
        f = filters.reshape(-1, xs.shape[1], kh, kw)
        h = torch.nn.functional.conv2d(xs.reshape(1, -1, *xs.shape[2:]), f, None, conv["stride"], conv["padding"],
                                       conv["dilation"], groups=n)
        return h.view(n, f.shape[0] // n, -1)

    scale = groups.scale.tolist()
    for p in range(len(rows.passes)):
        gs = rows.pass_groups[p]
        if gs and all(g >= 0 and groups.ranks[g] for g in gs):
            downs_t, ups_t, coef = groups.per_sample_factors(rows, p)
            if lam != 1.0:
                coef = coef * lam
            filters = downs_t.transpose(1, 2)  # (B, R, K): each sample's down factor
            step = b if out.dtype == torch.float32 else _samples_per_chunk(out3.shape[2] * groups.out_features)
            for j in range(0, b, step):  # 16-bit: a few samples at a time, fp32 copies stay cache-sized
                k = slice(j, j + step)
                h = shrink(x[k].float(), filters[k].reshape(-1, groups.in_features)).mul_(coef[k])  # (n, R, P')
                if out.dtype == torch.float32:
                    out3[k].baddbmm_(ups_t[k].transpose(1, 2), h)
                else:
                    out3[k] = torch.baddbmm(out3[k].float(), ups_t[k].transpose(1, 2), h)
            continue
        first, end = rows.passes[p]
        for s in range(first, end):
            g = rows.seg_group_host[s]
            if groups.ranks[g] == 0:
                continue
            down, up = groups.fp32_factors(g)
            for _, j, n, w in rows.runs[s]:  # one row per sample: runs are runs of samples
                delta = torch.matmul(up, shrink(x[j:j + n].float(), down.repeat(n, 1)))
                dst = out3[j:j + n]
                if dst.dtype == torch.float32:
                    dst.add_(delta, alpha=lam * scale[g] * w)
                else:
                    dst.copy_(dst.float().add_(delta, alpha=lam * scale[g] * w))
    return out


# fp32 operands reach torch's BLAS as they are (the 16-bit paths work on fresh fp32 copies), and a BLAS may sum in
# an order that depends on the operands' strides and memory alignment (MKL does on AMD CPUs). So that a view gives
# the bits a fresh tensor gives, the torch backend hands it only contiguous, 64-byte aligned fp32 tensors: views are
# copied (x, factors) or staged (out); a fresh activation or output is used as it is.
_ALIGN = 64


def _is_canonical32(t: torch.Tensor) -> bool:
    return t.dtype != torch.float32 or (t.is_contiguous() and t.data_ptr() % _ALIGN == 0)


def _canonical32(t: torch.Tensor) -> torch.Tensor:
    return t if _is_canonical32(t) else t.clone(memory_format=torch.contiguous_format)


def _staged(out: torch.Tensor, run) -> torch.Tensor:
    staged = out.clone(memory_format=torch.contiguous_format)
    run(staged)
    return out.copy_(staged)


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


# --------------------------------------------------------------------------------------------------- Triton
#
# Grids: shrink (row blocks of the longest segment, segments); expand (row blocks of the longest segment of the
# pass, column blocks, segments of the pass). A program whose row block starts past its segment's end, or whose
# group has rank 0, returns at once. Factor addresses and ranks come from the int64 group table; the row index of
# each entry is gathered, so segments may hold any rows. Products accumulate in fp32: exact fp32 ("ieee") for
# fp32 layers, 16-bit tensor-core inputs with fp32 accumulation in shrink and TF32 in expand (h stays fp32, so
# no fp16 overflow) for fp16/bf16 layers. The expand epilogue adds in fp32 and rounds once to nearest even (bf16
# by integer ops on the bits, which the interpreter and compiled code agree on).

_KERNELS = None


def _tile_config(spec: str) -> tuple:
    """``SMxSKxEMxENxW`` (LORA_FAST_SEGMENTED_TILE, for tuning runs: benchmarks/bench_kernels_shrink_expand.py
    --tiles): shrink rows and k-step, expand rows and columns, warps; powers of two, each block at least 16 (tl.dot)."""
    try:
        vals = tuple(int(v) for v in spec.split("x"))
    except ValueError:
        vals = ()
    if len(vals) != 5 or not all(v > 0 and v & (v - 1) == 0 for v in vals) or min(vals[:4]) < 16:
        raise ValueError(f"LORA_FAST_SEGMENTED_TILE={spec!r}: want SMxSKxEMxENxW, powers of two, blocks >= 16")
    return vals


SHRINK_BLOCK_M, SHRINK_BLOCK_K, EXPAND_BLOCK_M, EXPAND_BLOCK_N, NUM_WARPS = _tile_config(
    os.environ.get("LORA_FAST_SEGMENTED_TILE", "32x32x32x64x4"))


def _kernels():
    global _KERNELS, _ptr, _block  # a jit function calls other jit functions through module globals
    if _KERNELS is not None:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def _ptr(addr, DT: tl.constexpr):
        if DT == 0:
            p = addr.to(tl.pointer_type(tl.float32))
        elif DT == 1:
            p = addr.to(tl.pointer_type(tl.float16))
        else:
            p = addr.to(tl.pointer_type(tl.bfloat16))
        return p

    @triton.jit
    def _block(seg_start_ptr, seg_group_ptr, table_ptr, s, pid_m, BLOCK_M: tl.constexpr):
        # a program's first entry, its segment's end, the segment's group and that group's rank
        end = tl.load(seg_start_ptr + s + 1)
        g = tl.load(seg_group_ptr + s).to(tl.int64)
        rank = tl.load(table_ptr + g * 3 + 2)
        return tl.load(seg_start_ptr + s) + pid_m * BLOCK_M, end, g, rank

    @triton.jit
    def _shrink(x_ptr, h_ptr, table_ptr, rows_ptr, seg_start_ptr, seg_group_ptr, K, stride_xm, stride_hm,
                DT: tl.constexpr, DOT16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_R: tl.constexpr):
        e0, end, g, rank = _block(seg_start_ptr, seg_group_ptr, table_ptr, tl.program_id(1), tl.program_id(0), BLOCK_M)
        if (e0 < end) & (rank > 0):
            a_ptr = _ptr(tl.load(table_ptr + g * 3), DT)
            offs_e = e0 + tl.arange(0, BLOCK_M)
            me = offs_e < end
            rows = tl.load(rows_ptr + offs_e, mask=me, other=0)
            offs_r = tl.arange(0, BLOCK_R)
            mr = offs_r < rank
            offs_k = tl.arange(0, BLOCK_K)
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + offs_k
                mk = kk < K
                xt = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :], mask=me[:, None] & mk[None, :], other=0.0)
                at = tl.load(a_ptr + offs_r[None, :].to(tl.int64) * K + kk[:, None], mask=mk[:, None] & mr[None, :],
                             other=0.0)
                if DT == 0:
                    acc = tl.dot(xt, at, acc, input_precision="ieee")
                elif DOT16:
                    acc = tl.dot(xt, at, acc)
                else:
                    acc = tl.dot(xt.to(tl.float32), at.to(tl.float32), acc, input_precision="ieee")
            hp = h_ptr + offs_e[:, None].to(tl.int64) * stride_hm + offs_r[None, :]
            tl.store(hp, acc, mask=me[:, None] & mr[None, :])

    @triton.jit
    def _expand(h_ptr, out_ptr, table_ptr, scale_ptr, coef_ptr, rows_ptr, seg_start_ptr, seg_group_ptr, seg_base,
                N, stride_hm, stride_om, lam,
                DT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
        pid_n = tl.program_id(1)
        e0, end, g, rank = _block(seg_start_ptr, seg_group_ptr, table_ptr, seg_base + tl.program_id(2), tl.program_id(0),
                                  BLOCK_M)
        if (e0 < end) & (rank > 0):
            b_ptr = _ptr(tl.load(table_ptr + g * 3 + 1), DT)
            offs_e = e0 + tl.arange(0, BLOCK_M)
            me = offs_e < end
            rows = tl.load(rows_ptr + offs_e, mask=me, other=0)
            offs_r = tl.arange(0, BLOCK_R)
            mr = offs_r < rank
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            mn = offs_n < N
            ht = tl.load(h_ptr + offs_e[:, None].to(tl.int64) * stride_hm + offs_r[None, :],
                         mask=me[:, None] & mr[None, :], other=0.0)
            bt = tl.load(b_ptr + offs_n[None, :].to(tl.int64) * rank + offs_r[:, None], mask=mr[:, None] & mn[None, :],
                         other=0.0).to(tl.float32)
            if DT == 0:
                d = tl.dot(ht, bt, input_precision="ieee")
            else:
                d = tl.dot(ht, bt, input_precision="tf32")
            c = tl.load(coef_ptr + offs_e, mask=me, other=0.0) * (tl.load(scale_ptr + g) * lam)
            op = out_ptr + rows[:, None] * stride_om + offs_n[None, :]
            mo = me[:, None] & mn[None, :]
            if DT == 2:  # out is passed as its int16 bits: exact decode, add, round to nearest even by integer ops
                bits = tl.load(op, mask=mo, other=0)
                o = ((bits.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
                y = o + d * c[:, None]
                b = y.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
                hi = b >> 16
                rb = (b + 0x7FFF + (hi & 1)) >> 16
                tl.store(op, tl.where(y != y, hi | 0x40, rb).to(tl.int16), mask=mo)
            else:
                o = tl.load(op, mask=mo, other=0.0).to(tl.float32)
                y = o + d * c[:, None]
                if DT == 1:
                    tl.store(op, y.to(tl.float16, fp_downcast_rounding="rtne"), mask=mo)
                else:
                    tl.store(op, y, mask=mo)

    _KERNELS = (_shrink, _expand)
    return _KERNELS


def _triton_shrink(x: torch.Tensor, h: torch.Tensor, groups: AdapterGroups, rows: RowMap) -> None:
    if _probe._faults:
        _probe._fault("segmented")  # test hook (probe._set_fault): raises for a forced launch failure
    shrink, _ = _kernels()
    _same_device(x, h, groups, rows)
    n_seg = len(rows.seg_group_host)
    grid = (triton_cdiv(rows.max_rows, SHRINK_BLOCK_M), n_seg)
    with _kernels_pkg.device_guard(x.device):  # Triton launches on the current device: make it x's
        shrink[grid](x, h, groups.table, rows.rows, rows.seg_start, rows.seg_group, x.shape[1], x.stride(0),
                     h.stride(0), DT=_DTYPE_CODE[x.dtype], DOT16=x.dtype == torch.float16 or not _interpreted(),
                     BLOCK_M=SHRINK_BLOCK_M, BLOCK_K=SHRINK_BLOCK_K, BLOCK_R=h.shape[1], num_warps=NUM_WARPS)


def _triton_expand(out: torch.Tensor, h: torch.Tensor, groups: AdapterGroups, rows: RowMap, p: int, lam: float) -> None:
    if _probe._faults and _probe._fault("segmented") == "wrong":  # test hook (probe._set_fault)
        lam = lam * 1.5 + 0.25
    _, expand = _kernels()
    _same_device(out, h, groups, rows)
    first, end = rows.passes[p]
    grid = (triton_cdiv(rows.pass_max_rows[p], EXPAND_BLOCK_M), triton_cdiv(out.shape[1], EXPAND_BLOCK_N), end - first)
    target = out.view(torch.int16) if out.dtype == torch.bfloat16 else out
    with _kernels_pkg.device_guard(out.device):  # Triton launches on the current device: make it out's
        expand[grid](h, target, groups.table, groups.scale, rows.coef, rows.rows, rows.seg_start, rows.seg_group,
                     first, out.shape[1], h.stride(0), out.stride(0), lam,
                     DT=_DTYPE_CODE[groups.dtype], BLOCK_M=EXPAND_BLOCK_M, BLOCK_N=EXPAND_BLOCK_N, BLOCK_R=h.shape[1],
                     num_warps=NUM_WARPS)


def _same_device(t: torch.Tensor, h: torch.Tensor, groups: "AdapterGroups", rows: "RowMap") -> None:
    """The kernels read addresses from the tables: every tensor they touch must be on the activation's device."""
    for what, other in (("h", h), ("the adapter table", groups.table), ("the scales", groups.scale),
                        ("the row map", rows.rows), ("the row coefficients", rows.coef),
                        ("the segment starts", rows.seg_start)):
        if other.device != t.device:
            raise ValueError(f"segmented LoRA: {what} is on {other.device}, the activation on {t.device}")


def _interpreted() -> bool:
    # Triton 3.9's interpreter computes tl.dot on bf16 tiles wrongly, so there the bf16 shrink upcasts its tiles to
    # fp32 (the fp16 shrink keeps the 16-bit dot); compiled kernels use the 16-bit tensor-core dot, fp32 accumulation.
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_cdiv(a: int, b: int) -> int:
    return max(1, -(-int(a) // int(b)))
