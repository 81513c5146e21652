"""Fused LoRA merge kernels: ``W <- rn(W + up @ down)`` for a whole list of weights in a few launches.

Semantics (all backends):

* ``delta[i, j]`` is accumulated in fp32 as one fused-multiply-add chain over ``k = 0 .. R-1`` starting from +0,
  ``acc = fma(up[i, k], down[k, j], acc)``. The CPU kernel, the Triton kernel and the torch backend (float64
  elementwise operations, no BLAS: see ``_fma_chain``) use that same chain, so on the same inputs they give the
  same delta bits, whatever the tiling, thread count or instruction set.
* A job gives ``up``/``down`` directly (float32, every scale folded in), or as a list of :class:`Factor` s (one per
  adapter): then ``up = [rn32(fp32(B_i) · rn32(scale_i))]`` and ``down = [fp32(A_i)]`` concatenated over the
  adapters, which is exactly what ``B.float() * scale`` and ``torch.cat`` give. The Triton kernel forms these
  values itself while it loads the factors (no torch operation per layer); the CPU and torch backends build them
  with torch operations first.
* ``W' = rn_dtype(fp32(W) + delta)``: the add in fp32, then one rounding to the weight dtype (nearest even).
* The exact-unfuse record: wherever ``rn_dtype(fp32(W') - delta)`` differs bitwise from the original ``W``, the
  element's position and original bits are kept (:class:`MergeRecord`). :func:`unfuse` recomputes
  ``rn(W' - delta)`` with the identical kernel and puts the recorded elements back in the same pass (the CPU
  kernel's restore list, the Triton kernel's restore step), which restores every bit (NaN payloads, -0.0, Inf
  included). Records are sparse: an element needs one only when the fuse moved it across a binade or hit a tie.
* The non-finite flag of a job is set when any fused element is NaN or Inf. With ``abort_nonfinite=True`` a call
  in which any job is flagged changes no weight at all (and returns no record).

Jobs must not overlap in memory (two jobs writing the same weight elements race).

Backends: CPU tensors go to the C++ kernel (``lora_fast._C.merge_cpu``), CUDA tensors to the Triton kernel. Pass
``backend="triton"`` (or set ``LORA_FAST_MERGE_BACKEND=triton``) to run the Triton kernel on CPU tensors under
``TRITON_INTERPRET=1``; ``backend="torch"`` is a plain-torch implementation for other devices. The Triton kernel is
checked against the CPU kernel on its first use per (device, dtype) (probe.py); on a failure the default choice
warns once and uses the torch backend for that device and dtype (docs/fuse.md). The Triton launcher's host cost
does not grow with the number of jobs in torch operations or launches: see the Triton section below.
"""

from __future__ import annotations

import array
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .. import kernels as _kernels_pkg
from . import probe as _probe

__all__ = ["Factor", "MergeJob", "MergeRecord", "RecordSet", "Term", "fuse", "unfuse"]

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # weights, factors, term tensors
# weights only: fp8 (e4m3fn, e5m2) as well, rounded exactly and encoded as torch's cast (docs/fuse.md, fp8 weights)
_WEIGHT_CODE = {**_DTYPE_CODE, torch.float8_e4m3fn: 3, torch.float8_e5m2: 4}
_BITS_DTYPE = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
               torch.float8_e4m3fn: torch.int8, torch.float8_e5m2: torch.int8}
_BACKENDS = ("cpu", "triton", "torch")


@dataclass
class Factor:
    """One adapter's part of a job: ``scale · B @ A``, B a ``(rows, r)`` and A an ``(r, cols)`` matrix given as a
    tensor plus the matrix's element strides from that tensor's first element (so a 4-D conv factor or a
    transposed embedding factor needs no view op). fp32, fp16 or bf16; any other dtype is converted first."""

    up: torch.Tensor
    up_strides: tuple  # (row stride, k stride) of B in elements
    down: torch.Tensor
    down_strides: tuple  # (k stride, column stride) of A in elements
    rank: int
    scale: float = 1.0

    @classmethod
    def of(cls, up: torch.Tensor, down: torch.Tensor, scale: float = 1.0) -> "Factor":
        """From 2-D ``up`` (rows, r) and ``down`` (r, cols)."""
        return cls(up, (up.stride(0), up.stride(1)), down, (down.stride(0), down.stride(1)), int(up.shape[1]),
                   float(scale))

    def matrices(self, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) as 2-D views (torch operations: for the CPU/torch backends and tests)."""
        return (_strided(self.up, (rows, self.rank), self.up_strides),
                _strided(self.down, (self.rank, cols), self.down_strides))


@dataclass
class Term:
    """A delta term that is not one low-rank product (LyCORIS LoHa, LoKr, full diff). After the job's LoRA chain,
    every element gets ``acc = fma(rn32(u[i, j] · rn32(scale)), v[i, j], acc)``, terms in order:

    * ``kind="hada"`` (LoHa): u = ``u @ ub``, v = ``v @ vb`` with u ``(rows, ru)``, ub ``(ru, cols)``, v
      ``(rows, rv)``, vb ``(rv, cols)``, each product one fp32 FMA chain over its rank from +0 (as the LoRA delta);
    * ``kind="kron"`` (LoKr; a full diff is u = ``[[1]]``, v = the diff): u ``(um, un)`` and v ``(vm, vn)`` whole,
      ``rows = um·vm``, ``cols = un·vn``; element (i, j) pairs ``u[i // vm, j // vn]`` with ``v[i % vm, j % vn]``.

    2-D tensors of any strides, fp32/fp16/bf16 (other dtypes are converted first). Every backend gives the same
    bits: the C++ kernel (from float32 contiguous copies, :meth:`for_cpu`), the Triton kernel (reads the tensors as
    they are, from the job table) and the torch backend (float64 emulation)."""

    kind: str
    u: torch.Tensor
    v: torch.Tensor
    ub: Optional[torch.Tensor] = None
    vb: Optional[torch.Tensor] = None
    scale: float = 1.0

    def tensors(self) -> tuple:
        return tuple(t for t in (self.u, self.ub, self.v, self.vb) if t is not None)

    def check(self, rows: int, cols: int) -> Optional[str]:
        """None when the term fits a (rows, cols) weight, else what is wrong."""
        if self.kind == "hada":
            if self.ub is None or self.vb is None or any(t.dim() != 2 for t in self.tensors()):
                return "a hada term needs 2-D u, ub, v, vb"
            if (self.u.shape[0] != rows or self.v.shape[0] != rows or self.ub.shape[1] != cols
                    or self.vb.shape[1] != cols or self.u.shape[1] != self.ub.shape[0]
                    or self.v.shape[1] != self.vb.shape[0] or self.u.shape[1] < 1 or self.v.shape[1] < 1):
                return (f"hada term {tuple(self.u.shape)}@{tuple(self.ub.shape)} ⊙ {tuple(self.v.shape)}@"
                        f"{tuple(self.vb.shape)} does not give {(rows, cols)}")
            return None
        if self.kind == "kron":
            if self.u.dim() != 2 or self.v.dim() != 2 or self.ub is not None or self.vb is not None:
                return "a kron term needs 2-D u and v only"
            if (self.u.shape[0] * self.v.shape[0] != rows or self.u.shape[1] * self.v.shape[1] != cols
                    or 0 in self.u.shape or 0 in self.v.shape):
                return f"kron term {tuple(self.u.shape)} ⊗ {tuple(self.v.shape)} does not give {(rows, cols)}"
            return None
        return f"unknown term kind {self.kind!r}"

    def for_cpu(self) -> "Term":
        """fp32 contiguous factors (a kron term's v may stay fp16/bf16): the C++ kernel's layout."""
        f32 = lambda t: t if (t.dtype == torch.float32 and t.is_contiguous()) else t.float().contiguous()  # noqa: E731
        if self.kind == "hada":
            return Term("hada", f32(self.u), f32(self.v), f32(self.ub), f32(self.vb), self.scale)
        v = self.v if (self.v.dtype in _DTYPE_CODE and self.v.is_contiguous()) else f32(self.v)
        return Term("kron", f32(self.u), v, None, None, self.scale)

    def cpu_spec(self) -> tuple:
        """The C++ kernel's term tuple (merge_cpu_bindings.cpp, term_from); for_cpu() layout."""
        if self.kind == "hada":
            return (1, self.scale, self.u.data_ptr(), self.ub.data_ptr(), self.u.shape[1], self.v.data_ptr(),
                    self.vb.data_ptr(), self.v.shape[1], 0, 0, 0, 0, 0, 0, 0)
        return (2, self.scale, 0, 0, 0, 0, 0, 0, self.u.data_ptr(), self.u.shape[0], self.u.shape[1],
                self.v.data_ptr(), _DTYPE_CODE[self.v.dtype], self.v.shape[0], self.v.shape[1])


def _strided(t: torch.Tensor, shape: tuple, strides: tuple) -> torch.Tensor:
    if tuple(t.shape) == tuple(shape) and tuple(t.stride()) == tuple(strides):
        return t
    return torch.as_strided(t, shape, strides, t.storage_offset())


@dataclass
class MergeJob:
    weight: torch.Tensor  # 2-D view (rows, cols) of the real weight, modified in place (or see ``view``)
    up: Optional[torch.Tensor] = None  # (rows, R) float32 contiguous, every scale folded in
    down: Optional[torch.Tensor] = None  # (R, cols) float32 contiguous
    factors: Optional[list] = None  # instead of up/down: [Factor], concatenated along the rank in order
    view: Optional[tuple] = None  # (rows, cols, row stride, col stride) from weight's first element, when
    # ``weight`` is not itself that 2-D view (e.g. a 4-D conv weight): the Triton path then needs no view op
    terms: Optional[list] = None  # [Term] added after the LoRA chain (LoHa/LoKr/full); up/down/factors may be
    # absent when there are terms

    def matrix(self) -> torch.Tensor:
        """The 2-D (rows, cols) view the job modifies (detached from autograd: a parameter may be given)."""
        w = self.weight.detach() if self.weight.requires_grad else self.weight
        if self.view is None:
            return w
        rows, cols, sr, sc = self.view
        return _strided(w, (rows, cols), (sr, sc))

    def shape2d(self) -> tuple:
        return (self.view[0], self.view[1]) if self.view is not None else tuple(self.weight.shape)

    def geometry(self) -> tuple:
        """(rows, columns, row stride, column stride) of the 2-D weight view."""
        if self.view is not None:
            return self.view
        (rows, cols), (sr, sc) = self.weight.shape, self.weight.stride()
        return rows, cols, sr, sc

    def materialized(self) -> "MergeJob":
        """The same job with a 2-D weight view and float32 contiguous up/down (torch operations)."""
        w = self.matrix()
        terms = [t.for_cpu() for t in self.terms] if self.terms else None
        if self.factors is None:
            return MergeJob(w, self.up, self.down, terms=terms)
        rows, cols = w.shape
        ups, downs = [], []
        for f in self.factors:
            b, a = f.matrices(rows, cols)
            ups.append(b.float() * f.scale)
            downs.append(a.float())
        up = torch.cat(ups, dim=1).contiguous() if len(ups) > 1 else ups[0].contiguous()
        down = torch.cat(downs, dim=0).contiguous() if len(downs) > 1 else downs[0].contiguous()
        return MergeJob(w, up, down, terms=terms)


SEG_COLS = 1 << 16  # a record's column is stored as 16 bits inside a segment of this many columns


@dataclass
class MergeRecord:
    """The elements of one job's (rows, cols) view that a rounded subtraction cannot give back.

    Positions are grouped by segment key ``k = row * nseg + col // SEG_COLS`` (``nseg = ceil(cols / SEG_COLS)``,
    1 for every real layer): the records of key ``k`` are ``offsets[k]:offsets[k + 1]``, with ascending 16-bit
    columns inside the segment. That is 2 bytes of position per record instead of an 8-byte flat index, plus 4 bytes
    per row. ``offsets`` is int32 (int64 when the view has 2^31 elements or more) and empty when there is no record.
    """

    offsets: torch.Tensor  # int32/int64, rows * nseg + 1 entries (or 0 when empty)
    cols: torch.Tensor  # int16 holding the uint16 column inside the segment
    value: torch.Tensor  # original elements, in the weight dtype
    shape: tuple  # (rows, cols) of the job's view

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.offsets, self.cols, self.value))

    def __len__(self) -> int:
        return self.value.numel()

    def flat_index(self) -> torch.Tensor:
        """int64 row-major flat indices into the (rows, cols) view, ascending."""
        rows, ncols = self.shape
        dev = self.value.device
        if len(self) == 0:
            return torch.empty(0, dtype=torch.int64, device=dev)
        nseg = max(1, -(-ncols // SEG_COLS))
        counts = (self.offsets[1:] - self.offsets[:-1]).to(torch.int64)
        key = torch.repeat_interleave(torch.arange(rows * nseg, device=dev), counts)
        col = (key % nseg) * SEG_COLS + (self.cols.to(torch.int64) & 0xFFFF)
        return (key // nseg) * ncols + col

    @classmethod
    def from_flat(cls, index: torch.Tensor, value: torch.Tensor, shape) -> "MergeRecord":
        """From ascending int64 flat indices into a (rows, cols) view and the original elements there."""
        rows, ncols = int(shape[0]), int(shape[1])
        dev = value.device
        big = rows * ncols >= 1 << 31
        off_dtype = torch.int64 if big else torch.int32
        if index.numel() == 0:
            return cls(torch.empty(0, dtype=off_dtype, device=dev), torch.empty(0, dtype=torch.int16, device=dev),
                       value, (rows, ncols))
        nseg = max(1, -(-ncols // SEG_COLS))
        index = index.to(torch.int64)
        row = index // ncols
        col = index - row * ncols
        counts = torch.bincount(row * nseg + col // SEG_COLS, minlength=rows * nseg)
        offsets = torch.zeros(rows * nseg + 1, dtype=torch.int64, device=dev)
        offsets[1:] = torch.cumsum(counts, 0)
        c16 = col % SEG_COLS
        c16 = torch.where(c16 >= 1 << 15, c16 - SEG_COLS, c16).to(torch.int16)
        return cls(offsets.to(off_dtype), c16, value, (rows, ncols))


class _GroupRecords:
    """The records of one Triton launch group (one device and dtype of one fuse call), in ONE buffer, already in
    the CPU kernel's order: job after job, row after row, ascending columns.

    Positions come from the fuse's slot scan (:class:`_Scan`: ``incl``, int32/int64 per (row, tile column) slot of
    the plan, inclusive: slot ``s`` holds records ``[incl[s - 1], incl[s])``, and each job's record start and end);
    ``cols`` is each record's column inside its tile (uint8 as int8), ``vals`` the original bits."""

    __slots__ = ("scan", "cols", "vals", "skip", "guard")

    def __init__(self, scan, cols, vals, skip):
        self.scan, self.cols, self.vals = scan, cols, vals
        self.skip = skip  # int64 per tile of the plan: 1 where the writing pass left the tile unfused (FuseCache)
        self.guard = None  # FuseGuard of a fuse at cached record positions

    @property
    def plan(self):  # the fuse's launch plan (its table on the device): unfuse reuses it
        return self.scan.plan

    @property
    def incl(self):
        return self.scan.incl

    @property
    def dtype(self):
        return self.scan.plan.dtype


class _GroupRef:
    """One job's record inside a :class:`_GroupRecords` (no tensor of its own)."""

    __slots__ = ("group", "pos")

    def __init__(self, group: _GroupRecords, pos: int):
        self.group, self.pos = group, pos

    def __len__(self) -> int:
        sc = self.group.scan
        return sc.ends[self.pos] - sc.starts[self.pos]

    def nbytes(self) -> int:
        g = self.group
        tiles = g.plan.tiles[self.pos]
        # its slots of the scan, one byte of column and the original bits per record, the skip entry per tile
        return tiles * BLOCK_M * g.incl.element_size() + len(self) * (1 + g.dtype.itemsize) + 8 * tiles

    def materialize(self) -> MergeRecord:
        """This job's record as a stand-alone :class:`MergeRecord` (the CPU kernel's layout; torch operations)."""
        g, p = self.group, self.pos
        rows, cols = g.plan.shapes[p]
        s, e = g.scan.starts[p], g.scan.ends[p]
        dev = g.cols.device
        if e == s:
            off_dtype = torch.int64 if rows * cols >= 1 << 31 else torch.int32
            return MergeRecord(torch.empty(0, dtype=off_dtype, device=dev), torch.empty(0, dtype=torch.int16, device=dev),
                               torch.empty(0, dtype=g.dtype, device=dev), (rows, cols))
        if g.guard is not None and g.guard.poll(wait=True):
            raise RuntimeError("a record of a fuse that left tiles unfused (FuseCache) cannot be materialized")
        nct = -(-cols // BLOCK_N)
        s0 = g.plan.tile0s[p] * BLOCK_M  # the job's slots: (row, tile column), row-major, rows padded to BLOCK_M
        incl = g.incl[s0:s0 + g.plan.tiles[p] * BLOCK_M].to(torch.int64)
        counts = torch.diff(incl, prepend=incl.new_tensor([s]))
        slot = torch.repeat_interleave(torch.arange(incl.numel(), device=dev), counts, output_size=e - s)
        col = (slot % nct) * BLOCK_N + (g.cols[s:e].to(torch.int64) & 0xFF)
        return MergeRecord.from_flat((slot // nct) * cols + col, g.vals[s:e].view(g.dtype), (rows, cols))


class RecordSet(Sequence):
    """The exact-unfuse records of one or more fuse calls, parallel to their jobs (what :func:`fuse` returns with
    ``record=True``; :func:`unfuse` takes it back). Indexing gives a job's :class:`MergeRecord` (or None); records of
    the Triton kernel live in one buffer per launch group and a job's record is materialized only when indexed
    (torch operations, for checks). :meth:`subset` and :meth:`extend` never touch tensors."""

    __slots__ = ("_items",)

    def __init__(self, items=()):
        self._items = list(items._items) if isinstance(items, RecordSet) else list(items)

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return RecordSet(self._items[i])
        it = self._items[i]
        return it.materialize() if isinstance(it, _GroupRef) else it

    def subset(self, idxs) -> "RecordSet":
        return RecordSet([self._items[i] for i in idxs])

    def extend(self, other) -> None:
        self._items.extend(other._items if isinstance(other, RecordSet) else other)

    def append(self, rec) -> None:
        self._items.append(rec)

    def clear(self) -> None:
        self._items.clear()

    def nbytes(self) -> int:
        return sum(it.nbytes() for it in self._items if it is not None)

    def count(self) -> int:
        """Number of recorded elements (no torch operation)."""
        return sum(len(it) for it in self._items if it is not None)


# --------------------------------------------------------------------------------------------------- public API


def fuse(jobs, *, record: bool = True, check_finite: bool = False, abort_nonfinite: bool = False,
         backend: str | None = None, num_threads: int | None = None, cache: FuseCache | None = None):
    """W <- rn(W + up@down) for every job in few launches.

    Returns ``(records, nonfinite)``: a :class:`RecordSet` parallel to the jobs (a list of ``None`` when
    ``record=False``) and per job whether the fused weight holds a NaN/Inf (computed only with ``check_finite``
    or ``abort_nonfinite``; otherwise all False). With ``abort_nonfinite=True``, when any job is flagged no weight
    of the call is changed (the Triton kernel checks before writing; the CPU and torch backends undo exactly) and
    the records are all ``None``. ``num_threads`` is the CPU thread count (default ``torch.get_num_threads()``).

    ``cache`` (:class:`FuseCache`, Triton backend, ``record=True``): a fuse whose key matches the cached one
    writes at the cached record positions, one launch per launch group and no host read (with ``check_finite`` or
    ``abort_nonfinite``: the same pass also flags non-finite jobs and the call reads the flags, its one host read; a
    refused call then restores every weight from the records in one more pass); otherwise the fuse runs as usual and
    fills the cache when every job went to the Triton kernel."""
    key = None
    if cache is not None:
        if record:
            key = cache._key_for(jobs, backend)
            if key == cache.key:
                return _triton_cached(cache, len(jobs), check=check_finite or abort_nonfinite, abort=abort_nonfinite)
        cache.clear()
    jobs = _prepare(jobs)
    if not jobs:
        return (RecordSet() if record else []), []
    check = check_finite or abort_nonfinite
    out_records: list = [None] * len(jobs)
    out_flags = [False] * len(jobs)
    done = []  # (backend, idxs, prepared jobs, records) for an abort's undo
    by_backend = _by_backend(jobs, backend)
    for be, idxs in by_backend.items():
        if be == "triton":
            sub = [jobs[i] for i in idxs]
            fill = cache if key is not None and len(by_backend) == 1 else None
            recs, flags = _triton_run(sub, negate=False, record=record or abort_nonfinite, check_finite=check,
                                      abort_nonfinite=abort_nonfinite, cache=fill, key=key)
        else:
            sub = [jobs[i].materialized() for i in idxs]
            if be == "cpu":
                recs, flags = _cpu_run(sub, negate=False, record=record or abort_nonfinite, check_finite=check,
                                       num_threads=num_threads)
            else:
                recs, flags = _torch_run(sub, negate=False, record=record or abort_nonfinite, check_finite=check)
        done.append((be, idxs, sub, recs, flags))
        for i, r, f in zip(idxs, _items(recs), flags):
            out_records[i] = r
            out_flags[i] = f
    if abort_nonfinite and any(out_flags):
        for be, idxs, sub, recs, flags in done:
            if be != "triton" or not any(flags):  # the Triton kernel wrote nothing when one of its jobs was flagged
                _unfuse_backend(be, sub, _items(recs), num_threads)
        return (RecordSet([None] * len(jobs)) if record else [None] * len(jobs)), out_flags
    if not record:
        return [None] * len(jobs), out_flags
    return RecordSet(out_records), out_flags


def unfuse(jobs, records, *, backend: str | None = None, num_threads: int | None = None) -> None:
    """Inverse of :func:`fuse` with the same jobs: W <- rn(W - up@down) with the recorded elements put back in the
    same pass, which gives the original weights bit for bit. ``records``: what :func:`fuse` returned (a
    :class:`RecordSet`) or a list parallel to the jobs of :class:`MergeRecord` or ``None`` (fused without a record:
    the result is then only the rounded subtraction)."""
    items = _items(records)
    if (backend or os.environ.get("LORA_FAST_MERGE_BACKEND") or "triton") == "triton" and len(items) == len(jobs):
        runs = _own_runs(jobs, items)
        if runs is not None:  # the fuse's own jobs and records: its table is reused, nothing is rebuilt
            _triton_restore_own(runs)
            return
    jobs = _prepare(jobs)
    if len(items) != len(jobs):
        raise ValueError(f"unfuse: {len(jobs)} jobs but {len(items)} records")
    for job, rec in zip(jobs, items):
        if rec is not None:
            _check_record(job, rec)
    for be, idxs in _by_backend(jobs, backend).items():
        sub = [jobs[i] for i in idxs]
        _unfuse_backend(be, sub, [items[i] for i in idxs], num_threads)


def _own_runs(jobs, items):
    """[(plan, group, first, end)] when each of ``items`` is a record of a Triton fuse group and ``jobs`` the very job
    objects those fuses got (then they were validated and their table is on the device); None otherwise. One run per
    range of consecutive positions inside a group, whatever the order of the list (a fuse's groups interleave in it),
    so a whole fuse's unfuse is one launch per group. Attribute reads only."""
    by_group: dict = {}
    for i, it in enumerate(items):
        if type(it) is not _GroupRef:
            return None
        g = it.group
        if g.plan.jobs[it.pos] is not jobs[i]:
            return None
        hit = by_group.get(id(g))
        if hit is None:
            by_group[id(g)] = (g, [it.pos])
        else:
            hit[1].append(it.pos)
    runs = []
    for g, qs in by_group.values():
        qs.sort()
        q0 = prev = qs[0]
        for q in qs[1:]:
            if q == prev:  # one record twice: not a fuse's own list
                return None
            if q != prev + 1:
                runs.append((g.plan, g, q0, prev + 1))
                q0 = q
            prev = q
        runs.append((g.plan, g, q0, prev + 1))
    return runs


def _items(records) -> list:
    return records._items if isinstance(records, RecordSet) else list(records)


def _unfuse_backend(be, sub, sub_rec, num_threads) -> None:
    if be == "triton":
        _triton_run(sub, negate=True, record=False, check_finite=False, restore=sub_rec)
        return
    sub = [j.materialized() for j in sub]
    sub_rec = [r.materialize() if isinstance(r, _GroupRef) else r for r in sub_rec]
    if be == "cpu":
        _cpu_run(sub, negate=True, record=False, check_finite=False, num_threads=num_threads, restore=sub_rec)
    else:
        _torch_run(sub, negate=True, record=False, check_finite=False)
        for job, rec in zip(sub, sub_rec):
            _scatter(job.weight, rec)


# ----------------------------------------------------------------------------------------------- validation


def _prepare(jobs) -> list[MergeJob]:
    """Checks every job (attribute reads only: no torch operation for a well-formed job)."""
    out = []
    for n, job in enumerate(jobs):
        w = job.weight
        if not isinstance(w, torch.Tensor):
            raise ValueError(f"merge job {n}: weight must be a tensor")
        if job.view is None and w.dim() != 2:
            raise ValueError(f"merge job {n}: weight must be a 2-D tensor view")
        if w.dtype not in _WEIGHT_CODE:
            raise ValueError(f"merge job {n}: weight dtype {w.dtype} is not float32/float16/bfloat16/float8_e4m3fn/"
                             "float8_e5m2")
        if job.view is not None:
            rows, cols, sr, sc = (int(v) for v in job.view)
            strides = (sr, sc)
        else:
            rows, cols = w.shape
            strides = w.stride()
        for d, size in enumerate((rows, cols)):
            if size > 1 and strides[d] <= 0:
                raise ValueError(f"merge job {n}: weight has a zero or negative stride (an expanded view?)")
        if job.terms:
            for t in job.terms:
                problem = t.check(rows, cols)
                if problem is not None:
                    raise ValueError(f"merge job {n}: {problem}")
                if any(x.device != w.device for x in t.tensors()):
                    raise ValueError(f"merge job {n}: weight and term factors must be on one device")
            if any(x.dtype not in _DTYPE_CODE for t in job.terms for x in t.tensors()):
                job = MergeJob(w, job.up, job.down, job.factors, job.view,
                               [Term(t.kind, *(None if x is None else x.float() for x in (t.u, t.v, t.ub, t.vb)),
                                     t.scale) for t in job.terms])
            if job.factors is None and job.up is None and job.down is None:
                out.append(job)
                continue
        if job.factors is not None:
            if not job.factors:
                raise ValueError(f"merge job {n}: no factor")
            wd = w.device
            convert = False
            for f in job.factors:
                if f.rank < 1:
                    raise ValueError(f"merge job {n}: rank must be >= 1")
                if f.up.device != wd or f.down.device != wd:
                    raise ValueError(f"merge job {n}: weight, up and down must be on one device")
                convert = convert or f.up.dtype not in _DTYPE_CODE or f.down.dtype not in _DTYPE_CODE
            if convert:
                fs = []
                for f in job.factors:
                    if f.up.dtype not in _DTYPE_CODE or f.down.dtype not in _DTYPE_CODE:
                        b, a = f.matrices(rows, cols)
                        f = Factor.of(b.float(), a.float(), f.scale)
                    fs.append(f)
                job = MergeJob(w, factors=fs, view=job.view, terms=job.terms)
            out.append(job)
            continue
        up, down = job.up, job.down
        if up is None or down is None:
            raise ValueError(f"merge job {n}: give up and down, or factors")
        if up.dim() != 2 or down.dim() != 2 or up.shape[0] != rows or down.shape[1] != cols or up.shape[1] != down.shape[0]:
            raise ValueError(f"merge job {n}: up {tuple(up.shape)} @ down {tuple(down.shape)} does not give weight "
                             f"shape {(rows, cols)}")
        if up.shape[1] < 1:
            raise ValueError(f"merge job {n}: rank must be >= 1")
        if up.device != w.device or down.device != w.device:
            raise ValueError(f"merge job {n}: weight, up and down must be on one device")
        if up.dtype != torch.float32 or not up.is_contiguous() or down.dtype != torch.float32 or not down.is_contiguous():
            job = MergeJob(w, up.to(torch.float32).contiguous(), down.to(torch.float32).contiguous(), view=job.view,
                           terms=job.terms)
        out.append(job)
    return out


def _check_record(job: MergeJob, rec) -> None:
    # attribute checks only: a torch op per job here would be an OpenMP fork/join per job (see _cpu_run)
    if isinstance(rec, _GroupRef):
        g = rec.group
        if tuple(g.plan.shapes[rec.pos]) != tuple(job.shape2d()) or g.dtype != job.weight.dtype:
            raise ValueError("unfuse: record does not match its job (shape, dtype or length)")
        return
    if (not isinstance(rec, MergeRecord) or tuple(rec.shape) != tuple(job.shape2d())
            or rec.value.dtype != job.weight.dtype or rec.cols.dtype != torch.int16
            or rec.offsets.dtype not in (torch.int32, torch.int64) or rec.cols.numel() != rec.value.numel()):
        raise ValueError("unfuse: record does not match its job (shape, dtype or length)")


def _by_backend(jobs, backend):
    backend = backend or os.environ.get("LORA_FAST_MERGE_BACKEND") or None
    if backend is not None and backend not in _BACKENDS:
        raise ValueError(f"unknown merge backend {backend!r}; expected one of {_BACKENDS}")
    groups: dict[str, list[int]] = {}
    checked: dict = {}
    for i, job in enumerate(jobs):
        dev = job.weight.device.type
        be = backend if backend is not None else _DEFAULT.get(dev, "torch")
        if be == "cpu" and dev != "cpu":
            raise ValueError(f"merge backend 'cpu' cannot run on {dev} tensors")
        if be == "triton":
            # first use on this (device, dtype): the kernel is checked against the CPU kernel (probe.py); a failure
            # means the torch backend for it from then on, or an error for a backend asked for by name
            key = (job.weight.device, job.weight.dtype)
            ok = checked.get(key)
            if ok is None:
                ok = checked[key] = _probe.usable("merge", key[0], key[1], strict=backend is not None)
            if not ok:
                be = "torch"
        groups.setdefault(be, []).append(i)
    return groups


_DEFAULT = {"cpu": "cpu", "cuda": "triton"}  # backend by device type when none is named (others: "torch")


def _scatter(weight: torch.Tensor, rec: MergeRecord | None) -> None:
    if rec is None or len(rec) == 0:
        return
    idx = rec.flat_index().to(weight.device)
    cols = weight.shape[1]
    weight[idx // cols, idx % cols] = rec.value.to(weight.device)


# ------------------------------------------------------------------------------------------------- CPU (C++)


def _cpu_run(jobs, *, negate, record, check_finite, num_threads=None, restore=None):
    from .. import _C

    specs = []
    for j in jobs:
        w = j.weight
        lora = (j.up.data_ptr(), j.down.data_ptr(), j.up.shape[1]) if j.up is not None else (0, 0, 0)
        if j.terms:  # LoHa/LoKr/full terms (materialized: Term.for_cpu layout)
            specs.append((w.data_ptr(), w.shape[0], w.shape[1], w.stride(0), w.stride(1), _WEIGHT_CODE[w.dtype],
                          *lora, [t.cpu_spec() for t in j.terms]))
            continue
        specs.append((w.data_ptr(), w.shape[0], w.shape[1], w.stride(0), w.stride(1), _WEIGHT_CODE[w.dtype], *lora))
    # No torch op runs per job on this path: every ATen op on a record-sized tensor is an OpenMP fork/join, and on
    # a loaded machine each join can wait a scheduler slice for a descheduled peer thread (one such check per job
    # once made unfuse 10x slower than fuse). The C++ side checks the records against their jobs instead.
    keep = []  # holds record tensors alive during the call
    rest = None
    if restore is not None:
        rest = []
        for rec in restore:
            if rec is None or len(rec) == 0:
                rest.append(None)
                continue
            parts = tuple(t if t.is_contiguous() and t.device.type == "cpu" else t.cpu().contiguous()
                          for t in (rec.offsets, rec.cols, rec.value))
            keep.append(parts)
            off, col, val = parts
            rest.append((off.data_ptr(), off.dtype == torch.int64, off.numel(), col.data_ptr(), val.data_ptr(),
                         val.numel()))
    nt = num_threads if num_threads is not None else torch.get_num_threads()
    isa = int(os.environ.get("LORA_FAST_MERGE_ISA", "0"))  # tests: 1 scalar, 2 avx2, 3 avx512
    out = _C.merge_cpu(specs, negate, record and not negate, check_finite, max(1, int(nt)), isa, rest)
    del keep
    records, flags = [], []
    for j, (off, col, val, nf) in zip(jobs, out):
        flags.append(bool(nf))
        if off is None:
            records.append(None)
            continue
        bits = _BITS_DTYPE[j.weight.dtype]
        val_t = torch.from_numpy(val.view({torch.int32: "int32", torch.int16: "int16"}.get(bits, "int8"))).view(
            j.weight.dtype)
        records.append(MergeRecord(torch.from_numpy(off), torch.from_numpy(col.view("int16")), val_t,
                                   tuple(j.weight.shape)))
    return records, flags


# ----------------------------------------------------------------------------------------------- plain torch


_F64_DEVICES = ("cpu", "cuda")  # devices with float64, where the torch backend reproduces the kernels' chain
_CHAIN_ELEMS = 1 << 16  # delta elements per block of the float64 chain (its temporaries stay cache-sized)


def _torch_delta(job: MergeJob) -> torch.Tensor:
    """``up @ down`` as the kernels compute it: per element one fp32 FMA chain over k from +0 (see the module
    docstring), bit for bit on every CPU and GPU. A BLAS matmul is not used: its summation order is its own and
    changes with the CPU (MKL takes other code paths on AMD than on Intel), the library version, the thread count
    and the operands' memory alignment. On a device without float64 (MPS) the delta is a plain matmul, which
    does not reproduce the kernels' bits."""
    up, down = job.up, job.down
    if job.terms:
        return _torch_delta_terms(job)
    if up.device.type not in _F64_DEVICES:
        return up @ down
    rows, cols = up.shape[0], down.shape[1]
    out = torch.empty((rows, cols), dtype=torch.float32, device=up.device)
    step = max(1, _CHAIN_ELEMS // max(1, cols))
    down64 = down.double()
    for r0 in range(0, rows, step):
        out[r0:r0 + step] = _fma_chain(up[r0:r0 + step].double(), down64)
    return out


def _torch_delta_terms(job: MergeJob) -> torch.Tensor:
    """The delta of a job with :class:`Term` s, as the kernels compute it: the LoRA chain (if any), then per term
    ``acc = fma(rn32(u·rn32(scale)), v, acc)``, each step emulated exactly in float64 (``_fma_add``). Row blocks
    keep the temporaries cache-sized. Without float64 (MPS): plain fp32 operations, not the kernels' bits."""
    w = job.weight
    rows, cols = w.shape
    dev = w.device
    exact = dev.type in _F64_DEVICES
    out = torch.empty((rows, cols), dtype=torch.float32, device=dev)
    step = max(1, _CHAIN_ELEMS // max(1, cols))
    down64 = job.down.double() if (job.up is not None and exact) else None
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        if job.up is None:
            acc = torch.zeros((r1 - r0, cols), dtype=torch.float32, device=dev)
        elif exact:
            acc = _fma_chain(job.up[r0:r1].double(), down64)
        else:
            acc = job.up[r0:r1] @ job.down
        for t in job.terms:
            if t.kind == "hada":
                if exact:
                    u = _fma_chain(t.u[r0:r1].double(), t.ub.double())
                    v = _fma_chain(t.v[r0:r1].double(), t.vb.double())
                else:
                    u, v = t.u[r0:r1].float() @ t.ub.float(), t.v[r0:r1].float() @ t.vb.float()
            else:
                vm, vn = t.v.shape
                ri = torch.arange(r0, r1, device=dev)
                cj = torch.arange(cols, device=dev)
                u = t.u.float()[(ri // vm)[:, None], (cj // vn)[None, :]]
                v = t.v.float()[(ri % vm)[:, None], (cj % vn)[None, :]]
            us = u * torch.tensor(t.scale, dtype=torch.float32, device=dev)  # rn32(u · rn32(scale))
            acc = _fma_add(us.double() * v.double(), acc) if exact else acc + us * v
        out[r0:r1] = acc
    return out


def _fma_add(p64: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """fp32 ``rn32(p + acc)`` for an exact float64 product ``p`` of two fp32 values: one step of ``_fma_chain``."""
    s = p64 + acc
    bv = s - p64
    e = (p64 - (s - bv)) + (acc - bv)
    inexact = e.abs() > 0
    towards_zero = (e * s) < 0
    bits = (s.view(torch.int64) - towards_zero.to(torch.int64)) | inexact
    return bits.view(torch.float64).to(torch.float32)


def _fma_chain(up64: torch.Tensor, down64: torch.Tensor) -> torch.Tensor:
    """fp32 ``acc = fma(up[:, k], down[k, :], acc)`` for k = 0..R-1 from +0, each step rounded once, with
    elementwise float64 ops (no FMA instruction needed, none of torch's kernels can change the result):

    * the product of two fp32 values is exact in float64 (48 significant bits, exponents far inside its range);
    * ``s = rn64(p + acc)`` and its exact error ``e`` (TwoSum: ``p + acc = s + e``);
    * ``s`` rounded to odd (truncated towards zero, last bit set when ``e != 0``) and then to fp32 gives the
      correctly rounded ``rn32(p + acc)``: rounding to odd with 29 spare bits makes the second rounding exact,
      including fp32 subnormals and overflow. Non-finite sums are rounded as they are (NaN payloads unspecified).
    """
    acc = torch.zeros((up64.shape[0], down64.shape[1]), dtype=torch.float32, device=up64.device)
    for k in range(up64.shape[1]):
        p = up64[:, k:k + 1] * down64[k:k + 1, :]
        s = p + acc  # float64 (acc is promoted exactly)
        bv = s - p
        e = (p - (s - bv)) + (acc - bv)
        inexact = e.abs() > 0  # False where s is not finite (e is NaN there)
        towards_zero = (e * s) < 0  # |p + acc| < |s|: truncation is one step below |s| (e·s cannot underflow)
        bits = (s.view(torch.int64) - towards_zero.to(torch.int64)) | inexact
        acc = bits.view(torch.float64).to(torch.float32)
    return acc


def _sum_odd(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """fp32 ``x + d`` rounded to odd, as the kernels form an fp8 weight's sum: TwoSum gives ``s + e == x + d``
    exactly; where ``e != 0`` and ``s``'s last bit is even, ``s`` steps one ulp towards ``e``. Rounding that to fp8
    is the one rounding of the exact sum (20 spare bits). Not finite: ``s`` as it is, except a NaN ``x`` is returned
    as it is (with two NaNs the sign, an fp8 NaN's only payload, would otherwise be the hardware's pick)."""
    s = x + d
    bv = s - x
    e = (x - (s - bv)) + (d - bv)
    sb = s.view(torch.int32)
    fix = ((e < 0) | (e > 0)) & ((sb & 1) == 0)
    adj = torch.where((sb ^ e.view(torch.int32)) < 0, -1, 1).to(torch.int32)
    return torch.where(torch.isnan(x), x, torch.where(fix, sb + adj, sb).view(torch.float32))


def _fp8_encode(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 -> float8_e4m3fn / float8_e5m2 with integer operations, as torch's cast (c10's
    fp8e4m3fn_from_fp32_value / fp8e5m2_from_fp32_value in torch 2.13) and the kernels: nearest even; e4m3fn
    saturates finite overflow and +-Inf to +-448, e5m2 overflows to +-Inf; NaN -> 0x7F | sign. Independent of the
    installed torch's own conversion (older releases made e4m3fn overflow NaN)."""
    b = s.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    sign = b & 0x80000000
    a = b ^ sign
    af = a.to(torch.int32).view(torch.float32)
    if dtype == torch.float8_e4m3fn:
        big = torch.where(a > 0x7F800000, 0x7F, 0x7E)
        den = (af + 16384.0).view(torch.int32).to(torch.int64) - (141 << 23)
        nrm = (a - (120 << 23) + 0x7FFFF + ((a >> 20) & 1)) >> 20
        nrm = torch.where(nrm == 0x7F, 0x7E, nrm)
        r = torch.where(a >= (1087 << 20), big, torch.where(a < (121 << 23), den, nrm))
    else:
        big = torch.where(a > 0x7F800000, 0x7F, 0x7C)
        den = (af + 128.0).view(torch.int32).to(torch.int64) - (134 << 23)
        nrm = (a - (112 << 23) + 0xFFFFF + ((a >> 21) & 1)) >> 21
        r = torch.where(a >= (143 << 23), big, torch.where(a < (113 << 23), den, nrm))
    return ((r | (sign >> 24)) & 0xFF).to(torch.uint8).view(dtype)


def _fp8_add_round(x: torch.Tensor, d: torch.Tensor, dtype: torch.dtype) -> tuple:
    """rn_fp8(x + d) exactly (fp32 ``x``, ``d``) and, for e4m3fn, where it saturated (|x + d| > 464)."""
    s = _sum_odd(x, d)
    over = s.abs() > 464.0 if dtype == torch.float8_e4m3fn else None
    return _fp8_encode(s, dtype), over


def _round_to(s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 -> dtype, nearest even, as the kernels round (NaN keeps its sign and top payload bits, quieted;
    torch's own conversion of a NaN differs between its CPU code paths)."""
    if dtype == torch.float32:
        return s
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return _fp8_encode(s, dtype)
    r = s.to(dtype)
    b = s.view(torch.int32)
    if dtype == torch.bfloat16:
        nan_bits = ((b >> 16) & 0xFFFF) | 0x40
    else:
        nan_bits = ((b >> 16) & 0x8000) | 0x7E00 | ((b >> 13) & 0x3FF)
    return torch.where(torch.isnan(s), nan_bits.to(torch.int16).view(dtype), r)


def _torch_run(jobs, *, negate, record, check_finite):
    records, flags = [], []
    for j in jobs:
        w = j.weight
        delta = _torch_delta(j)
        x = w.float()
        over = None
        if w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # the exact sum's one rounding (_sum_odd)
            new, over = _fp8_add_round(x, -delta if negate else delta, w.dtype)
        else:
            new = _round_to(x - delta if negate else x + delta, w.dtype)
        rec = None
        if record:
            if over is not None or w.dtype == torch.float8_e5m2:
                back = _fp8_add_round(new.float(), -delta, w.dtype)[0]
            else:
                back = _round_to(new.float() - delta, w.dtype)
            bits = _BITS_DTYPE[w.dtype]
            diff = (back.view(bits) != w.contiguous().view(bits)).reshape(-1)
            idx = diff.nonzero().reshape(-1)
            rec = MergeRecord.from_flat(idx, w.contiguous().reshape(-1)[idx], w.shape)
        if w.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # NaN/Inf bits, or e4m3fn saturation
            m = 0x7F if w.dtype == torch.float8_e4m3fn else 0x7C
            bad = bool(((new.view(torch.uint8) & m) == m).any()) or (over is not None and bool(over.any()))
        else:
            bad = not torch.isfinite(new).all()
        flags.append(bool(check_finite and bad))
        w.copy_(new)
        records.append(rec)
    return records, flags




# --------------------------------------------------------------------------------------------------- Triton
#
# Host cost independent of the number of jobs (docs/fuse.md, "On the GPU: data flow"). Per (device, dtype) group,
# under that device:
#
# * one int64 table, built from Python lists and uploaded in one copy (pinned, non-blocking on CUDA): per job its
#   weight address, shape and strides, its factors' row in the same table and its first tile; per factor the
#   addresses, strides, dtypes, rank and fp32 scale of B and A. The kernel loads the factors in their own dtype and
#   folds the scale in as it loads them (rn32(fp32(B) * rn32(scale)), exactly what ``B.float() * scale`` gives), so
#   no torch operation runs per job; after a job's factors, its LyCORIS terms (Term, _T_* fields: kind, fp32 scale,
#   the tensors' addresses, strides and dtypes), added in the tile after the LoRA chain exactly as the C++ kernel's
#   apply_terms does (LoHa: both rank chains in the tile; LoKr/full: u and v gathered per element);
# * ``tile_job`` (tile -> job) by one repeat_interleave on the device;
# * the kernel specialized on what the group's table allows (_Plan.spec): 32-bit offsets, the factors' one dtype,
#   16-byte vector accesses to weight tiles and down rows, no LyCORIS code when there is no term. The general
#   variant (any of these unknown) gives the same bits, with more registers and scalar accesses.
#
# Fuse with records (two passes, no sort, no overflow):
#   pass 1 (MODE 1): per tile, delta, rn(W + delta), rn(W' - delta) and the elements needing a record; writes the
#     count of each (row, tile column) "slot" and, with the check, the per-job non-finite flag. W is not written.
#   an inclusive cumsum over the slots (one op, on the device) places every slot's records: slots run job after
#     job, row after row, tile column after tile column, which is the CPU kernel's record order;
#   one host read per device: each job's record end and the non-finite flags (the only synchronization);
#   the record buffers are allocated at their exact size; with ``abort_nonfinite`` and a flag, nothing more runs;
#   pass 2 (MODE 2): the same tile computation, W written, each record (its column inside the tile, one byte, and
#     the original bits) written in its final place. The scan stays with the record: it is the record's index.
# Fuse without records: MODE 0 (one pass). Unfuse: MODE 4 (the fuse's own table) or MODE 3 (records named per job),
# one pass that stores rn(W' - delta) and then, after a block barrier, the tile's recorded elements over it: each
# row's records are [incl[slot - 1], incl[slot]), one gather and one scatter, no search (the CPU kernel's restore
# list does the same per row).

_TRITON = None
# a tile of BLOCK_M rows x BLOCK_N columns per program, NUM_WARPS warps; BLOCK_N <= 256 (a record's column inside its
# tile is one byte). Overridable for tuning runs (LORA_FAST_MERGE_TILE="32x128x4"); records are only valid with the
# configuration that made them, so it is read once, at import.
BLOCK_M, BLOCK_N, NUM_WARPS = (int(v) for v in os.environ.get("LORA_FAST_MERGE_TILE", "32x128x16").split("x"))
if not (BLOCK_N <= 256 and all(v > 0 and v & (v - 1) == 0 for v in (BLOCK_M, BLOCK_N, NUM_WARPS))):
    raise ValueError("LORA_FAST_MERGE_TILE: rows x columns x warps, powers of two, columns at most 256")
RANK_UNROLL_MAX = int(os.environ.get("LORA_FAST_MERGE_UNROLL", "0"))  # unroll the rank loop up to this rank
# job table fields
# (_J_HAS: 0 no record to put back, 1/2 the record's slot scan _J_RO is int32/int64; _J_ST: the job's first tile in
# the plan of the fuse that made the record)
(_J_W, _J_ROWS, _J_COLS, _J_SR, _J_SC, _J_PART, _J_NPART, _J_TILE0, _J_HAS, _J_RO, _J_RC, _J_RV, _J_SK, _J_ST,
 _J_TERM, _J_NTERM) = range(16)
_NJ = 16
# factor table fields
# (_P_DDT: the down factor's dtype code, plus 16 when its address is 16-byte aligned)
_P_UP, _P_USR, _P_USK, _P_UDT, _P_DN, _P_DSK, _P_DSC, _P_DDT, _P_RANK, _P_SCALE = range(10)
_NP = 10
# term table fields (LyCORIS Term, after a job's factor rows): kind (1 hada, 2 kron), fp32 scale bits, then four
# matrices A, B, C, D as (address, stride 0, stride 1, dtype) with two sizes: hada u = A·B over rank N_A, v = C·D over
# rank N_B; kron u = A, v = C with N_A = vm and N_B = vn (B and D unused). The kernel's term loop steps 20 fields.
(_T_KIND, _T_SCALE, _T_A, _T_AS0, _T_AS1, _T_ADT, _T_B, _T_BS0, _T_BS1, _T_BDT, _T_NA, _T_C, _T_CS0, _T_CS1, _T_CDT,
 _T_D, _T_DS0, _T_DS1, _T_DDT, _T_NB) = range(20)
_NT = 20
MODE_PLAIN, MODE_COUNT, MODE_WRITE, MODE_RESTORE, MODE_RESTORE_OWN = 0, 1, 2, 3, 4


class _Stats:
    """Host-side work of the Triton launcher, for tests and benchmarks: kernel launches, host reads of device
    values (synchronizations on a GPU) and table uploads."""

    __slots__ = ("launches", "syncs", "uploads")

    def __init__(self):
        self.launches = self.syncs = self.uploads = 0

    def snapshot(self) -> dict:
        return {"launches": self.launches, "syncs": self.syncs, "uploads": self.uploads}


triton_stats = _Stats()


def _device_guard(device: torch.device):
    """Launch on ``device`` (lora_fast.kernels.device_guard, looked up at each call so tests can watch it)."""
    return _kernels_pkg.device_guard(device)


def _group_jobs(jobs) -> dict:
    """{(device, dtype, vector tiles): [job index]} in first-seen order; one launch group each (tables live on that
    device). Jobs whose weight tiles allow 16-byte vector accesses keep a group of their own, so one misaligned weight
    (a 3x3 conv over 4 input channels) does not turn every other job's launch into scalar code (merge._Plan.spec). At
    most two groups per device and dtype, whatever the job count. (LyCORIS terms do not split a group: their variant
    keeps the vector accesses, and every variant is one more compile at first use.)"""
    groups: dict = {}
    for i, j in enumerate(jobs):
        groups.setdefault((j.weight.device, j.weight.dtype, _vector_tiles(j)), []).append(i)
    return groups


def _vector_tiles(job, geometry=None) -> bool:
    """Whether the job's weight tiles allow 16-byte vector accesses: unit column stride (or one column), a row
    stride and a column count that are multiples of 16 bytes, a 16-byte aligned first element."""
    rows, cols, sr, sc = geometry or job.geometry()
    w = job.weight
    vec = 16 // w.element_size()
    return (sc == 1 or cols == 1) and sr % vec == 0 and cols % vec == 0 and w.data_ptr() % 16 == 0


# No FP contraction: every mul and add rounds on its own (mul.rn/add.rn) and only the kernel's explicit tl.fma
# fuses, as in the C++ kernel, so the bits do not depend on Triton's default (contraction on up to 3.9, off from
# 3.10) or on ptxas turning a plain mul.f32 + add.f32 into an fma.
_COMPILE_OPTIONS = dict(enable_fp_fusion=False)


def _launch(kernel, grid, *args, **kw) -> None:
    triton_stats.launches += 1
    kernel[grid](*args, **_COMPILE_OPTIONS, **kw)


def _plans(jobs, restore=None) -> list:
    """One :class:`_Plan` per launch group of ``jobs`` (tables uploaded to each group's device)."""
    plans = []
    for (device, dtype, _), idxs in _group_jobs(jobs).items():
        with _device_guard(device):
            plans.append(_Plan(jobs, idxs, device, dtype, None if restore is None else [restore[i] for i in idxs]))
    return plans


_precompiled: set = set()  # (device, dtype, scan dtype, spec) of the launch groups compiled ahead in this process
_MAX_COMPILE_THREADS = 8  # each compile holds an LLVM context (100-200 MB) while it runs


def _precompile(plans) -> None:
    """Compiles the launch variants of ``plans`` (:meth:`_Plan.variants`) that no earlier call compiled ahead,
    several at once, before the first of them launches. A variant is one Triton compile (0.2-1.8 s for sm_90 on one
    core), a first use on a cold cache needs up to seven per launch group plus the probe's, and Triton's compile
    releases the GIL for most of its time; in sequence they made the first fuse of a process several seconds long.
    Runs on CUDA devices through Triton's own threaded-compile mode (triton.runtime._async_compile, Triton 3.5 and
    later; not there: nothing is compiled ahead). Only a head start: a variant that does not compile here compiles, or
    fails and says why, at its launch as before. ``LORA_FAST_PARALLEL_COMPILE=0`` turns it off."""
    if not any(pl.device.type == "cuda" for pl in plans) or os.environ.get("LORA_FAST_PARALLEL_COMPILE") == "0":
        return
    try:
        from triton.runtime import _async_compile as ac
    except ImportError:
        return
    todo: dict = {}
    for pl in plans:
        key = (pl.device, pl.dtype, pl.scan_dtype, tuple(sorted(pl.spec.items())))  # what its variants depend on
        if pl.device.type == "cuda" and key not in _precompiled:
            _precompiled.add(key)
            todo.setdefault(pl.device, []).extend(pl.variants())
    if not todo:
        return
    kernel = _triton_kernel()
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    for device, launches in todo.items():
        workers = min(len(launches), cpus, _MAX_COMPILE_THREADS)
        if workers < 2:
            continue
        _compile_ahead(ac, kernel, device, launches, workers)


def _quietly(fn, *args, **kw):
    """``fn(...)``, or None when it raises: a variant that fails to compile ahead compiles (or fails, saying why) at
    its launch."""
    try:
        return fn(*args, **kw)
    except Exception:  # noqa: BLE001
        return None


def _compile_ahead(ac, kernel, device, launches, workers: int) -> None:
    mode = None
    try:
        with _device_guard(device), ThreadPoolExecutor(workers, thread_name_prefix="lora_fast-compile") as ex:
            mode = ac.AsyncCompileMode(ex)  # (no ignore_errors: Triton 3.5 has no such argument)
            with mode:
                pending = []
                for args, kw in launches:  # each warmup returns at once, with a future of its compile
                    pending.append(_quietly(kernel.warmup, *args, grid=(1,), **_COMPILE_OPTIONS, **kw))
                for fut in pending:  # one by one, so that one failed compile does not drop the others
                    if hasattr(fut, "result"):
                        _quietly(fut.result)  # the compiled kernel goes into the kernel's cache
    except Exception:  # noqa: BLE001 - a head start only (see _precompile); the caller's own mode is left alone
        pass
    finally:
        if mode is not None and ac.active_mode.get() is mode:  # Triton 3.5/3.6 leave it set when a compile raised
            ac.active_mode.set(None)


def _to_host(t: torch.Tensor) -> list:
    triton_stats.syncs += 1
    return t.tolist()


def _upload(values: array.array, device: torch.device) -> torch.Tensor:
    triton_stats.uploads += 1
    host = torch.frombuffer(values, dtype=torch.int64) if len(values) else torch.zeros(1, dtype=torch.int64)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host if device.type == "cpu" else host.to(device)  # on the CPU it shares the array (kept by the plan)


def _triton_kernel():
    global _TRITON, triton, tl, _f16_bits_to_f32, _bf16_bits_to_f32, _decode, _encode, _sum_odd_tl, _add_round, \
        _load_factor, _load_down, _rank_chain, _bits_ptr, _ix, _broadcast_mask, _put_back
    if _TRITON is not None:
        return _TRITON
    import triton
    import triton.language as tl

    @triton.jit
    def _f16_bits_to_f32(bits):  # fp16 bits (int16) -> fp32, exact
        return bits.to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _bf16_bits_to_f32(bits):  # bf16 bits (int16) -> fp32, exact: the bits are fp32's upper half
        return ((bits.to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)

    @triton.jit
    def _decode(bits, DT: tl.constexpr):  # weight bits -> fp32, exact
        if DT == 0:
            x = bits.to(tl.float32, bitcast=True)
        elif DT == 3:  # e4m3fn by integer ops (no subnormal fp32 operand): 0x7F|sign is NaN
            v = bits.to(tl.int32) & 0xFF
            mag = v & 0x7F
            e = mag >> 3
            m = mag & 7
            nrm = ((e + 120) << 23) | (m << 20)
            sub = (m.to(tl.float32) * 0.001953125).to(tl.int32, bitcast=True)  # m * 2^-9, exact
            r = tl.where(mag == 0x7F, 0x7FC00000, tl.where(e == 0, sub, nrm))
            x = (r | ((v & 0x80) << 24)).to(tl.float32, bitcast=True)
        elif DT == 4:  # e5m2: the upper byte of an fp16
            x = _f16_bits_to_f32(((bits.to(tl.int32) & 0xFF) << 8).to(tl.int16))
        elif DT == 1:
            x = _f16_bits_to_f32(bits)
        else:
            x = _bf16_bits_to_f32(bits)
        return x

    @triton.jit
    def _encode(s, DT: tl.constexpr):  # fp32 -> weight bits, one rounding to nearest even
        if DT == 0:
            h = s.to(tl.int32, bitcast=True)
        elif DT >= 3:  # fp8 as torch's cast, by integer ops in int64 (C++ f32_to_e4m3 / f32_to_e5m2)
            b = s.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
            sign = b & 0x80000000
            a = b ^ sign
            af = a.to(tl.int32).to(tl.float32, bitcast=True)
            if DT == 3:
                big = tl.where(a > 0x7F800000, 0x7F, 0x7E)
                den = (af + 16384.0).to(tl.int32, bitcast=True).to(tl.int64) - (141 << 23)
                nrm = (a - (120 << 23) + 0x7FFFF + ((a >> 20) & 1)) >> 20
                nrm = tl.where(nrm == 0x7F, 0x7E, nrm)
                r = tl.where(a >= (1087 << 20), big, tl.where(a < (121 << 23), den, nrm))
            else:
                big = tl.where(a > 0x7F800000, 0x7F, 0x7C)
                den = (af + 128.0).to(tl.int32, bitcast=True).to(tl.int64) - (134 << 23)
                nrm = (a - (112 << 23) + 0xFFFFF + ((a >> 21) & 1)) >> 21
                r = tl.where(a >= (143 << 23), big, tl.where(a < (113 << 23), den, nrm))
            r = (r | (sign >> 24)) & 0xFF
            h = tl.where(r > 127, r - 256, r).to(tl.int8)
        elif DT == 1:
            h = s.to(tl.float16, fp_downcast_rounding="rtne").to(tl.int16, bitcast=True)
        else:
            # bf16 by integer ops (in int64 to stay clear of signedness); NaN stays NaN instead of carrying to Inf
            b = s.to(tl.int32, bitcast=True).to(tl.int64) & 0xFFFFFFFF
            hi = b >> 16
            rb = (b + 0x7FFF + (hi & 1)) >> 16
            h = tl.where(s != s, hi | 0x40, rb).to(tl.int16)
        return h

    @triton.jit
    def _sum_odd_tl(x, d):  # fp32 x + d rounded to odd (TwoSum), as the C++ kernel's sum_odd for fp8 weights
        s = x + d
        bv = s - x
        e = (x - (s - bv)) + (d - bv)
        sb = s.to(tl.int32, bitcast=True)
        adj = tl.where((sb ^ e.to(tl.int32, bitcast=True)) < 0, -1, 1)
        fix = (((e < 0) | (e > 0)).to(tl.int32) * ((sb & 1) == 0).to(tl.int32)) != 0
        return tl.where(x != x, x, tl.where(fix, sb + adj, sb).to(tl.float32, bitcast=True))  # a NaN x as it is

    @triton.jit
    def _add_round(x, d, DT: tl.constexpr):  # rn_dtype(x + d): fp8 through the sum rounded to odd (exact)
        if DT >= 3:
            h = _encode(_sum_odd_tl(x, d), DT)
        else:
            # a NaN weight keeps its own bits, as the CPU's x + d does for a quiet NaN; a GPU's add gives the canonical
            # NaN instead, which would cost the record an element the CPU kernel does not write
            h = _encode(tl.where(x != x, x, x + d), DT)
        return h

    @triton.jit
    def _load_factor(addr, off, mask, FDT: tl.constexpr, fdt):
        """A factor's elements in fp32 (exact): FDT its dtype code known at compile time, or -1: ``fdt``'s at run time."""
        if FDT == 0:
            v = tl.load(addr.to(tl.pointer_type(tl.float32)) + off, mask=mask, other=0.0)
        elif FDT == 1:
            v = _f16_bits_to_f32(tl.load(addr.to(tl.pointer_type(tl.int16)) + off, mask=mask, other=0))
        elif FDT == 2:
            v = _bf16_bits_to_f32(tl.load(addr.to(tl.pointer_type(tl.int16)) + off, mask=mask, other=0))
        elif fdt == 0:
            v = tl.load(addr.to(tl.pointer_type(tl.float32)) + off, mask=mask, other=0.0)
        else:
            b = tl.load(addr.to(tl.pointer_type(tl.int16)) + off, mask=mask, other=0)
            if fdt == 1:
                v = _f16_bits_to_f32(b)
            else:
                v = _bf16_bits_to_f32(b)
        return v

    @triton.jit
    def _load_down(dn, dsk, dsc, k, offs_n, mask, DDT: tl.constexpr, ddt, DV: tl.constexpr):
        """Row k of a down factor over the tile's columns, fp32; DV > 0: a 16-byte aligned address, unit column stride and
        rows of a multiple of DV elements (DDT is then known), so each thread's columns come in one vector load."""
        if DV > 0:
            row = k * ((dsk // DV) * DV)  # dsk is a multiple of DV (checked on the host): the compiler sees it so
            if DDT == 0:
                v = tl.load(tl.multiple_of(dn.to(tl.pointer_type(tl.float32)), 16) + row + offs_n, mask=mask, other=0.0)
            elif DDT == 1:
                v = _f16_bits_to_f32(tl.load(tl.multiple_of(dn.to(tl.pointer_type(tl.int16)), 16) + row + offs_n,
                                             mask=mask, other=0))
            else:
                v = _bf16_bits_to_f32(tl.load(tl.multiple_of(dn.to(tl.pointer_type(tl.int16)), 16) + row + offs_n,
                                              mask=mask, other=0))
        else:
            v = _load_factor(dn, k * dsk + offs_n * dsc, mask, DDT, ddt)
        return v

    @triton.jit
    def _rank_chain(acc, up, usr, usk, udt, dn, dsk, dsc, ddt, rank, s, offs_m, offs_n, mm, mn, RK: tl.constexpr,
                    EXACT: tl.constexpr, UDT: tl.constexpr, DDT: tl.constexpr, DV: tl.constexpr):
        """acc = fma(rn32(B[i, k] · s), A[k, j], acc) for k = 0 .. rank-1 in order (one factor of a job)."""
        if RK == 0:
            for k in range(0, rank):
                a = _load_factor(up, offs_m * usr + k * usk, mm, UDT, udt) * s
                b = _load_down(dn, dsk, dsc, k, offs_n, mn, DDT, ddt, DV)
                acc = tl.fma(a[:, None], b[None, :], acc)
        elif EXACT:
            for k in tl.static_range(RK):
                a = _load_factor(up, offs_m * usr + k * usk, mm, UDT, udt) * s
                b = _load_down(dn, dsk, dsc, k, offs_n, mn, DDT, ddt, DV)
                acc = tl.fma(a[:, None], b[None, :], acc)
        else:
            for k in tl.static_range(RK):
                a = _load_factor(up, offs_m * usr + k * usk, _broadcast_mask(mm, k < rank), UDT, udt) * s
                b = _load_down(dn, dsk, dsc, k, offs_n, _broadcast_mask(mn, k < rank), DDT, ddt, DV)
                if k < rank:
                    acc = tl.fma(a[:, None], b[None, :], acc)
        return acc

    @triton.jit
    def _bits_ptr(addr, DT: tl.constexpr):  # a weight-dtype buffer's address as a pointer to its bits
        if DT == 0:
            p = addr.to(tl.pointer_type(tl.int32))
        elif DT >= 3:
            p = addr.to(tl.pointer_type(tl.int8))
        else:
            p = addr.to(tl.pointer_type(tl.int16))
        return p

    @triton.jit
    def _ix(x, I64: tl.constexpr):  # an element offset or count in the index type of the launch
        if I64:
            r = x.to(tl.int64)
        else:
            r = x.to(tl.int32)
        return r

    @triton.jit
    def _broadcast_mask(m, cond):  # m & cond for a scalar cond, by arithmetic (the interpreter mis-types bool & bool)
        return m & ((m.to(tl.int32) * 0 + cond.to(tl.int32)) != 0)

    @triton.jit
    def _put_back(wp, sr, sc, incl, rc, rv, slots, rows_ok, offs_m, tc, ar_n, BN: tl.constexpr):
        """Stores the recorded original elements of this tile's slots (row, tile column) over the tile: slot s holds
        records [incl[s - 1], incl[s]) with the column inside the tile in ``rc`` (uint8) and the bits in ``rv``.
        One gather and one scatter, no search: the record positions are the fuse's slot scan."""
        end = tl.load(incl + slots, mask=rows_ok, other=0)
        start = tl.load(incl + slots - 1, mask=rows_ok & (slots > 0), other=0)
        n = end - start  # at most BN
        v = (ar_n[None, :] < n[:, None]) & rows_ok[:, None]
        pos = start[:, None] + ar_n[None, :]
        col = tc * BN + (tl.load(rc + pos, mask=v, other=0).to(tl.int32) & 0xFF)
        val = tl.load(rv + pos, mask=v, other=0)
        tl.store(wp + offs_m[:, None] * sr + col * sc, val, mask=v)

    @triton.jit
    def _merge_tiles(table, tile_job, counts, incl, rec_col, rec_val, nonfinite,
                     NJ: tl.constexpr, NP: tl.constexpr, DT: tl.constexpr, MODE: tl.constexpr,
                     NEGATE: tl.constexpr, CHECK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     RK: tl.constexpr, EXACT: tl.constexpr, UDT: tl.constexpr, DDT: tl.constexpr,
                     TERMS: tl.constexpr, I64: tl.constexpr, WV: tl.constexpr, DV: tl.constexpr):
        # RK > 0: every factor's rank is at most RK (EXACT: equal to it) and the rank loop is unrolled, so the
        # factor loads of all steps can be issued ahead of the FMA chain (whose order stays k = 0, 1, ...).
        # UDT/DDT: the up/down factors' dtype code when the launch group has one, else -1 (per factor at run time).
        # TERMS: some job has LyCORIS terms. I64: element offsets need 64 bits (else 32: fewer registers).
        # WV > 0: every weight view has unit column stride, 16-byte aligned rows and a column count that is a multiple
        # of 16 bytes (WV elements), so its tiles are read and written with 16-byte vector accesses; DV > 0: the same
        # for the down factors' rows (one vector load per thread and rank step instead of one load per element).
        pid = tl.program_id(0)
        if MODE == 4:  # tile_job starts at a job's first tile (a step's jobs inside the fuse's table)
            t = _ix(tl.load(table + tl.load(tile_job).to(tl.int64) * NJ + 7), I64) + pid
        else:
            t = _ix(pid, I64)
        j = tl.load(tile_job + pid).to(tl.int64)
        jrow = table + j * NJ
        rows = _ix(tl.load(jrow + 1), I64)
        cols = _ix(tl.load(jrow + 2), I64)
        sr = _ix(tl.load(jrow + 3), I64)
        sc = _ix(tl.load(jrow + 4), I64)
        if WV > 0:  # both are multiples of WV (checked on the host); written so, the compiler knows it (a hint on a
            # scalar, tl.multiple_of, is lost on some Triton versions)
            sr = (sr // WV) * WV
            cols = (cols // WV) * WV
        p0 = tl.load(jrow + 5)
        npart = tl.load(jrow + 6)
        tile0 = _ix(tl.load(jrow + 7), I64)
        local = t - tile0
        nct = (cols + BN - 1) // BN
        tr = local // nct
        tc = local - tr * nct
        ar_m = _ix(tl.arange(0, BM), I64)
        ar_n = _ix(tl.arange(0, BN), I64)
        offs_m = tr * BM + ar_m
        offs_n = tc * BN + ar_n
        mm = offs_m < rows
        mn = offs_n < cols
        mask = mm[:, None] & mn[None, :]

        wp = _bits_ptr(tl.load(jrow + 0), DT)
        if WV > 0:
            wptr = tl.multiple_of(wp, 16) + offs_m[:, None] * sr + offs_n[None, :]
        else:
            wptr = wp + offs_m[:, None] * sr + offs_n[None, :] * sc
        wbits = tl.load(wptr, mask=mask, other=0)

        # delta: one fp32 FMA chain over the concatenated rank, factor after factor, from +0. The zeros are made from
        # the weight tile (an expression the compiler cannot fold before it lays out the tensors) so that the chain
        # runs in the weight tile's layout: each thread then holds a run of contiguous columns, and a rank step costs
        # it one up load and one vector load of the down row instead of one load per element and a layout conversion
        acc = ((wbits.to(tl.int32) & 0xFFFF) >> 16).to(tl.float32)
        for p in range(0, npart):
            prow = table + p0 + p * NP
            up = tl.load(prow + 0)
            usr = _ix(tl.load(prow + 1), I64)
            usk = _ix(tl.load(prow + 2), I64)
            udt = tl.load(prow + 3)
            dn = tl.load(prow + 4)
            dsk = _ix(tl.load(prow + 5), I64)
            dsc = _ix(tl.load(prow + 6), I64)
            ddt = tl.load(prow + 7)  # the down factor's dtype code, + 16 when its address is 16-byte aligned
            rank = tl.load(prow + 8)
            s = tl.load(prow + 9).to(tl.int32).to(tl.float32, bitcast=True)
            if DV > 0:
                if ddt >= 16:
                    acc = _rank_chain(acc, up, usr, usk, udt, dn, dsk, dsc, ddt & 15, rank, s, offs_m, offs_n, mm, mn,
                                      RK, EXACT, UDT, DDT, DV)
                else:  # a down factor off 16-byte alignment (a file's tensors are packed): scalar loads
                    acc = _rank_chain(acc, up, usr, usk, udt, dn, dsk, dsc, ddt & 15, rank, s, offs_m, offs_n, mm, mn,
                                      RK, EXACT, UDT, DDT, 0)
            else:
                acc = _rank_chain(acc, up, usr, usk, udt, dn, dsk, dsc, ddt & 15, rank, s, offs_m, offs_n, mm, mn,
                                  RK, EXACT, UDT, DDT, 0)

        if TERMS:
            # LyCORIS terms after the LoRA chain, in order, as the C++ kernel's apply_terms: acc = fma(rn32(u·s), v, acc)
            t0 = tl.load(jrow + 14)
            nterm = tl.load(jrow + 15)
            for q in range(0, nterm):
                trow = table + t0 + q * 20  # _NT fields per term
                kind = tl.load(trow + 0)
                ts = tl.load(trow + 1).to(tl.int32).to(tl.float32, bitcast=True)
                pa = tl.load(trow + 2)
                as0 = _ix(tl.load(trow + 3), I64)
                as1 = _ix(tl.load(trow + 4), I64)
                adt = tl.load(trow + 5)
                na = _ix(tl.load(trow + 10), I64)
                pc = tl.load(trow + 11)
                cs0 = _ix(tl.load(trow + 12), I64)
                cs1 = _ix(tl.load(trow + 13), I64)
                cdt = tl.load(trow + 14)
                nb = _ix(tl.load(trow + 19), I64)
                if kind == 1:  # LoHa: u = A·B and v = C·D, each one fp32 FMA chain over its rank from +0, in the tile
                    pb = tl.load(trow + 6)
                    bs0 = _ix(tl.load(trow + 7), I64)
                    bs1 = _ix(tl.load(trow + 8), I64)
                    bdt = tl.load(trow + 9)
                    pd = tl.load(trow + 15)
                    ds0 = _ix(tl.load(trow + 16), I64)
                    ds1 = _ix(tl.load(trow + 17), I64)
                    ddt2 = tl.load(trow + 18)
                    tu = tl.zeros((BM, BN), dtype=tl.float32)
                    for k in range(0, na):
                        a = _load_factor(pa, offs_m * as0 + k * as1, mm, -1, adt)
                        b = _load_factor(pb, k * bs0 + offs_n * bs1, mn, -1, bdt)
                        tu = tl.fma(a[:, None], b[None, :], tu)
                    tv = tl.zeros((BM, BN), dtype=tl.float32)
                    for k in range(0, nb):
                        a = _load_factor(pc, offs_m * cs0 + k * cs1, mm, -1, cdt)
                        b = _load_factor(pd, k * ds0 + offs_n * ds1, mn, -1, ddt2)
                        tv = tl.fma(a[:, None], b[None, :], tv)
                    acc = tl.fma(tu * ts, tv, acc)
                else:  # LoKr / full diff: u[i // vm, j // vn] paired with v[i % vm, j % vn], v in its own dtype
                    iu = offs_m // na
                    ju = offs_n // nb
                    u = _load_factor(pa, iu[:, None] * as0 + ju[None, :] * as1, mask, -1, adt)
                    v = _load_factor(pc, (offs_m - iu * na)[:, None] * cs0 + (offs_n - ju * nb)[None, :] * cs1, mask,
                                     -1, cdt)
                    acc = tl.fma(u * ts, v, acc)

        x = _decode(wbits, DT)
        if NEGATE:
            h = _add_round(x, -acc, DT)
        else:
            h = _add_round(x, acc, DT)

        slots = tile0 * BM + offs_m * nct + tc  # (row, tile column) slots of this job, row-major
        if MODE == 1 or MODE == 2:
            r = _add_round(_decode(h, DT), -acc, DT)
            d = ((r != wbits) & mask).to(tl.int32)
            if MODE == 1:
                tl.store(counts + slots, tl.sum(d, axis=1))
            else:
                # each slot's records go to [incl[slot - 1], incl[slot]): the scan of this fuse's counting pass, or
                # the one a FuseCache kept. A row whose count differs from its slot's (weights changed since the
                # scan was made, behind torch's back) makes the whole tile write nothing: no weight, no record; the
                # tile is marked in ``nonfinite`` (here the skip array: per tile, 0 or 1) and unfuse leaves it
                # alone, so the round trip stays exact and the mismatch is reported (FuseCache).
                end = tl.load(incl + slots)
                start = tl.load(incl + slots - 1, mask=slots > 0, other=0)
                expect = end - start
                nbad = tl.sum(((tl.sum(d, axis=1) != expect) & mm).to(tl.int32), axis=0)
                dst = start[:, None] + (tl.cumsum(d, axis=1) - d)
                keep = _broadcast_mask(d != 0, nbad == 0)
                tl.store(rec_col + dst, ar_n.to(tl.int8)[None, :] + tl.zeros((BM, BN), dtype=tl.int8), mask=keep)
                tl.store(rec_val + dst, wbits, mask=keep)
                tl.store(nonfinite + t, nbad.to(tl.int64))
                wmask = _broadcast_mask(mask, nbad == 0)

        if MODE == 0:
            wmask = mask
        if MODE == 3 or MODE == 4:
            if MODE == 3:  # records named per job in the table (any number of record buffers)
                skipped = tl.load(jrow + 12) * 0
                has = tl.load(jrow + 8)  # 0: no record, 1/2: the record's slot scan is int32/int64
                if has != 0:
                    sk = tl.load(jrow + 12)
                    if sk != 0:  # the fuse's skip array: a tile it left unfused is left alone
                        skipped = tl.load(sk.to(tl.pointer_type(tl.int64)) + tl.load(jrow + 13) + local)
            else:  # the fuse's own table and record buffer (and its skip array in ``nonfinite``)
                skipped = tl.load(nonfinite + t)
            wmask = _broadcast_mask(mask, skipped == 0)
            tl.store(wptr, h, mask=wmask)
            # the recorded elements overwrite their rounded subtraction: after the barrier every store above is
            # visible to the whole block, so the later store of a recorded element wins
            tl.debug_barrier()
            rows_ok = _broadcast_mask(mm, skipped == 0)
            if MODE == 4:
                _put_back(wp, sr, sc, incl, rec_col, rec_val, slots, rows_ok, offs_m, tc, ar_n, BN)
            elif has != 0:
                rslots = _ix(tl.load(jrow + 13), I64) * BM + offs_m * nct + tc  # slots in the fuse's own plan
                rc = tl.load(jrow + 10).to(tl.pointer_type(tl.int8))
                rv = _bits_ptr(tl.load(jrow + 11), DT)
                if has == 1:
                    _put_back(wp, sr, sc, tl.load(jrow + 9).to(tl.pointer_type(tl.int32)), rc, rv, rslots, rows_ok,
                              offs_m, tc, ar_n, BN)
                else:
                    _put_back(wp, sr, sc, tl.load(jrow + 9).to(tl.pointer_type(tl.int64)), rc, rv, rslots, rows_ok,
                              offs_m, tc, ar_n, BN)
        elif MODE != 1:
            tl.store(wptr, h, mask=wmask)
        if CHECK:
            h32 = h.to(tl.int32)
            if DT == 0:
                bad = (h32 & 0x7F800000) == 0x7F800000
            elif DT == 1:
                bad = (h32 & 0x7C00) == 0x7C00
            elif DT == 3:  # NaN, or the exact sum beyond +-464 (saturated to +-448)
                if NEGATE:
                    sat = tl.abs(_sum_odd_tl(x, -acc)) > 464.0
                else:
                    sat = tl.abs(_sum_odd_tl(x, acc)) > 464.0
                bad = ((h32 & 0x7F) == 0x7F) | sat
            elif DT == 4:
                bad = (h32 & 0x7C) == 0x7C
            else:
                bad = (h32 & 0x7F80) == 0x7F80
            nbad = tl.sum(tl.reshape((bad & mask).to(tl.int32), [BM * BN]), axis=0)
            if MODE == 2:  # ``nonfinite`` is the skip array there: the flags go to ``counts`` (unused otherwise)
                tl.atomic_max(counts + j, 1, mask=nbad > 0)
            else:
                tl.atomic_max(nonfinite + j, 1, mask=nbad > 0)

    _TRITON = _merge_tiles
    return _TRITON


_SCALE_BITS: dict = {}


def _f32_bits(x: float) -> int:
    """The bits of rn32(x) (nearest even, overflow to +-Inf), as torch converts a Python scale for a float32 op."""
    b = _SCALE_BITS.get(x)
    if b is None:
        with np.errstate(over="ignore"):
            b = int(np.array([x], dtype=np.float32).view(np.int32)[0])
        if len(_SCALE_BITS) < 4096:
            _SCALE_BITS[x] = b
    return b


def _term_row(t: Term) -> tuple:
    """A :class:`Term`'s ``_NT`` fields of the Triton table (see _T_*): its tensors as they are (any strides,
    fp32/fp16/bf16), the scale as fp32 bits; attribute reads only."""
    codes = _DTYPE_CODE
    u, v = t.u, t.v
    if t.kind == "hada":
        ub, vb = t.ub, t.vb
        return (1, _f32_bits(t.scale), u.data_ptr(), u.stride(0), u.stride(1), codes[u.dtype], ub.data_ptr(),
                ub.stride(0), ub.stride(1), codes[ub.dtype], u.shape[1], v.data_ptr(), v.stride(0), v.stride(1),
                codes[v.dtype], vb.data_ptr(), vb.stride(0), vb.stride(1), codes[vb.dtype], v.shape[1])
    return (2, _f32_bits(t.scale), u.data_ptr(), u.stride(0), u.stride(1), codes[u.dtype], 0, 0, 0, 0, v.shape[0],
            v.data_ptr(), v.stride(0), v.stride(1), codes[v.dtype], 0, 0, 0, 0, v.shape[1])


class _Plan:
    """One (device, dtype) launch group: its jobs' table on the device, the tile bookkeeping, and the compile-time
    facts the kernel is specialized on (rank bound, factor dtypes, LyCORIS terms, index width)."""

    def __init__(self, jobs, idxs, device, dtype, restore=None):
        self.idxs, self.device, self.dtype = idxs, device, dtype
        n = len(idxs)
        jt: list = []  # job rows, then factor rows, then tiles per job, then last slot per job
        parts: list = []
        tiles: list = []
        end_slot: list = []
        self.shapes, self.legacy = [], []
        tile_acc = 0
        ranks, udts, ddts = set(), set(), set()
        extent = 0  # the largest element offset any load or store of the launch makes
        has_terms = False
        wvec = 16 // dtype.itemsize  # weight elements per 16 bytes
        w_aligned = d_aligned = True  # every weight view / down factor allows 16-byte vector accesses
        part_base = _NJ * n
        codes = _DTYPE_CODE
        for q, i in enumerate(idxs):
            job = jobs[i]
            w = job.weight
            geometry = rows, cols, sr, sc = job.geometry()
            ntiles = -(-rows // BLOCK_M) * -(-cols // BLOCK_N) if rows and cols else 0
            extent = max(extent, _extent(rows + BLOCK_M, cols + BLOCK_N, sr, sc))
            w_aligned = w_aligned and _vector_tiles(job, geometry)
            if job.factors is not None:
                fs = job.factors
            else:
                fs = (Factor.of(job.up, job.down),) if job.up is not None else ()  # a terms-only job: no factor
            p_at = part_base + len(parts)
            for f in fs:
                up, dn = f.up, f.down
                parts += (up.data_ptr(), f.up_strides[0], f.up_strides[1], codes[up.dtype], dn.data_ptr(),
                          f.down_strides[0], f.down_strides[1], codes[dn.dtype] + (16 if dn.data_ptr() % 16 == 0 else 0),
                          f.rank, _f32_bits(f.scale))
                ranks.add(f.rank)
                udts.add(up.dtype)
                ddts.add(dn.dtype)
                extent = max(extent, _extent(rows + BLOCK_M, f.rank, *f.up_strides),
                             _extent(f.rank, cols + BLOCK_N, *f.down_strides))
                dk, dc = f.down_strides
                # the address is checked per factor, in the kernel (a file's packed tensors are often not aligned)
                d_aligned = d_aligned and (dc == 1 or cols == 1) and dk % (16 // dn.element_size()) == 0
            t_at = part_base + len(parts)
            terms = job.terms or ()
            for tm in terms:
                parts += _term_row(tm)
                has_terms = True
                extent = max(extent, *(_span(x) for x in tm.tensors()))
            rec = restore[q] if restore is not None else None
            if isinstance(rec, _GroupRef):
                g = rec.group
                jt += (w.data_ptr(), rows, cols, sr, sc, p_at, len(fs), tile_acc,
                       2 if g.incl.dtype == torch.int64 else 1, g.incl.data_ptr(), g.cols.data_ptr(),
                       g.vals.data_ptr(), g.skip.data_ptr(), g.plan.tile0s[rec.pos], t_at, len(terms))
                extent = max(extent, g.plan.n_tiles * BLOCK_M)
            else:
                if rec is not None and len(rec):
                    self.legacy.append((q, rec))  # a stand-alone MergeRecord: scattered after the pass
                jt += (w.data_ptr(), rows, cols, sr, sc, p_at, len(fs), tile_acc, 0, 0, 0, 0, 0, 0, t_at, len(terms))
            tiles.append(ntiles)
            end_slot.append(max(0, (tile_acc + ntiles) * BLOCK_M - 1))
            self.shapes.append((rows, cols))
            tile_acc += ntiles
        self.n, self.n_tiles = n, tile_acc
        self.jobs = [jobs[i] for i in idxs]
        self.tile0s = [acc - t for acc, t in zip(_running(tiles), tiles)]
        self.tiles = tiles
        self.numel = sum(r * c for r, c in self.shapes)
        self.has_tiles = [t > 0 for t in tiles]
        rk = max(ranks, default=0)
        self.spec = dict(
            RK=rk if 0 < rk <= RANK_UNROLL_MAX else 0, EXACT=len(ranks) == 1,
            UDT=codes[udts.pop()] if len(udts) == 1 else -1, DDT=codes[ddts.pop()] if len(ddts) == 1 else -1,
            TERMS=has_terms, I64=max(extent, tile_acc * BLOCK_M + BLOCK_M) >= 1 << 31,
            WV=wvec if w_aligned else 0)
        self.spec["DV"] = 16 // 4 if self.spec["DDT"] == 0 else 16 // 2
        if not (d_aligned and ranks and self.spec["DDT"] >= 0):
            self.spec["DV"] = 0
        # one upload: [jobs | factors | tiles per job | last slot per job]
        self.tiles_at = len(jt) + len(parts)
        self.end_at = self.tiles_at + n
        blob = array.array("q", jt + parts + tiles + end_slot)
        self._blob = blob  # the CPU table shares its memory
        self.table = _upload(blob, device)
        self.tile_job = None
        if self.n_tiles:
            self.tile_job = torch.repeat_interleave(self.table[self.tiles_at:self.end_at], output_size=self.n_tiles)

    @property
    def scan_dtype(self) -> torch.dtype:
        """The dtype of the group's slot scan (the record positions): int64 from 2^31 elements on."""
        return torch.int64 if self.numel >= 1 << 31 else torch.int32

    def launch(self, kernel, mode, *, grid=None, **buffers) -> None:
        if not self.n_tiles:
            return
        args, kw = self._launch_args(mode, **buffers)
        _launch(kernel, grid or (self.n_tiles,), *args, **kw)

    def _launch_args(self, mode, *, negate=False, check=False, counts=None, incl=None, rec_col=None, rec_val=None,
                     nonfinite=None, tile_job=None) -> tuple:
        """The kernel's arguments and compile-time constants for a launch in ``mode``. A buffer may be a torch dtype
        in place of a tensor (:meth:`variants`): Triton keys a compile on the buffers' dtypes and alignments."""
        dummy = self.table
        args = (self.table, self.tile_job if tile_job is None else tile_job, dummy if counts is None else counts,
                dummy if incl is None else incl, dummy if rec_col is None else rec_col,
                dummy if rec_val is None else rec_val, dummy if nonfinite is None else nonfinite)
        kw = dict(NJ=_NJ, NP=_NP, DT=_WEIGHT_CODE[self.dtype], MODE=mode, NEGATE=bool(negate), CHECK=bool(check),
                  BM=BLOCK_M, BN=BLOCK_N, num_warps=NUM_WARPS, **self.spec)
        return args, kw

    def variants(self) -> list:
        """``(args, kw)`` of the launches a recording fuse of this group makes, with and without the non-finite
        check, first and cached, and its two unfuses, plus the fuse without records: what a first use compiles
        ahead in parallel (:func:`_precompile`). Buffers are given by dtype, as the launch sites allocate them."""
        if not self.n_tiles:
            return []
        i32 = torch.int32
        rec = dict(incl=self.scan_dtype, rec_col=torch.int8, rec_val=_BITS_DTYPE[self.dtype], nonfinite=torch.int64)
        kinds = [dict(mode=MODE_COUNT, counts=i32), dict(mode=MODE_COUNT, check=True, counts=i32, nonfinite=i32),
                 dict(mode=MODE_WRITE, **rec), dict(mode=MODE_WRITE, check=True, counts=i32, **rec),
                 dict(mode=MODE_RESTORE_OWN, negate=True, **rec), dict(mode=MODE_PLAIN),
                 dict(mode=MODE_RESTORE, negate=True)]
        return [self._launch_args(**k) for k in kinds]


def _span(t: torch.Tensor) -> int:
    """One more than the largest element offset of ``t`` from its first element."""
    return 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()) if n > 0)


def _extent(rows: int, cols: int, sr: int, sc: int) -> int:
    """An upper bound of the element offsets of a (rows, cols) block with these strides (tiles overhang included)."""
    return abs(rows * sr) + abs(cols * sc)


def _running(values):
    acc = 0
    for v in values:
        acc += v
        yield acc


def _triton_restore_own(runs) -> None:
    """Unfuse with the fuse's own table and record buffer (MODE 4): per run of consecutive jobs one launch over
    their tiles, no table built, no host read. Tiles the fuse skipped (its skip array) are left as they are."""
    if _probe._faults:
        _probe._fault("merge")  # test hook: a forced launch failure
    kernel = _triton_kernel()
    for pl, g, q0, q1 in runs:
        ta = pl.tile0s[q0]
        tb = pl.tile0s[q1 - 1] + pl.tiles[q1 - 1]
        if tb <= ta:
            continue
        with _device_guard(pl.device):
            tile_job = pl.tile_job if (ta == 0 and tb == pl.n_tiles) else pl.tile_job[ta:tb]
            pl.launch(kernel, MODE_RESTORE_OWN, negate=True, incl=g.incl, rec_col=g.cols, rec_val=g.vals,
                      nonfinite=g.skip, grid=(tb - ta,), tile_job=tile_job)


def _read_per_device(plans, pieces_of) -> dict:
    """One host read per device of the small tensors ``pieces_of(plan)`` gives (the synchronization of a call):
    {id(plan): [host list per piece]}."""
    by_dev: dict = {}
    for pl in plans:
        by_dev.setdefault(pl.device, []).append(pl)
    out = {}
    for device, pls in by_dev.items():
        with _device_guard(device):
            pieces = [(pl, p) for pl in pls for p in pieces_of(pl)]
            host = _to_host(torch.cat([p.to(torch.int64) for _, p in pieces]) if len(pieces) > 1 else pieces[0][1])
        at = 0
        for pl, p in pieces:
            out.setdefault(id(pl), []).append(host[at:at + p.numel()])
            at += p.numel()
    return out


class _Scan:
    """Where one launch group's records go: the inclusive scan of its slot counts (on the device), each job's record
    start and end (host ints) and the total. Made by a counting pass; a :class:`FuseCache` keeps it."""

    __slots__ = ("plan", "incl", "starts", "ends", "total")

    def __init__(self, plan, incl, ends):
        self.plan, self.incl = plan, incl
        ends = [e if t else 0 for e, t in zip(ends, plan.has_tiles)]
        starts, prev = [], 0
        for q in range(plan.n):  # a job without tiles has no slot: its records are empty
            starts.append(prev)
            if plan.has_tiles[q]:
                prev = ends[q]
            else:
                ends[q] = prev
        self.starts, self.ends, self.total = starts, ends, prev

    def nbytes(self) -> int:
        return self.incl.numel() * self.incl.element_size()


class FuseGuard:
    """The check of one launch group's fuse with a cached scan (:class:`FuseCache`): the writing pass compares each
    slot's record count with the cached one and skips (writes nothing in) a tile where one differs. Whether any tile
    was skipped is copied to the host without waiting (pinned memory and an event on CUDA) and read later, at a
    point that can afford it: :meth:`poll`."""

    __slots__ = ("plan", "skip", "host", "event", "result")

    def __init__(self, plan, skip):
        self.plan, self.skip, self.result = plan, skip, None
        anybad = skip[:plan.n_tiles].amax(0, keepdim=True)
        if skip.device.type == "cuda":
            self.host = torch.empty(1, dtype=torch.int64, pin_memory=True)
            self.host.copy_(anybad, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host, self.event = anybad, None  # the launch has finished: the value is there

    def poll(self, wait: bool = False):
        """Indices (into the fuse call's job list) of the jobs with a skipped tile, ``[]`` when none, or ``None``
        when the fuse has not finished on the device yet and ``wait`` is False. A positive answer is rare (weights
        written behind torch's back) and finding which jobs costs a synchronization."""
        if self.result is not None:
            return self.result
        if self.event is not None and not self.event.query():
            if not wait:
                return None
            triton_stats.syncs += 1
            self.event.synchronize()
        if int(self.host.numpy()[0]) == 0:
            self.result = []
        else:
            pl = self.plan
            with _device_guard(pl.device):
                qs = _to_host(torch.unique(pl.tile_job[self.skip[:pl.n_tiles] != 0]))
            self.result = [pl.idxs[q] for q in qs]
        self.host = self.event = None
        return self.result


class FuseCache:
    """What a recording Triton fuse of a job list computed, kept so that fusing the same jobs again costs one launch
    per launch group and no host read (docs/fuse.md, "On the GPU: data flow"): per launch group the job
    table and tile map on the device (:class:`_Plan`), the inclusive scan of its slot counts and each job's record
    start and end, under a key of everything that determines them (:func:`_cache_key`: the weight tensors' identity,
    address, shape, strides, dtype and ``_version``, the factors' identity, address, ``_version``, strides, rank and
    scale, the backend choice). Owned by the caller and given to :func:`fuse` with the same jobs each time; a key
    that differs refills it. The scan (int32, or int64 for a group of 2^31 elements or more) has one entry per row of
    each BLOCK_N-column tile: 1/64 of an fp16 weight's bytes (1/32 with int64), on the weights' device; it is also
    the index of the records of every fuse made from it, so it costs nothing beyond the records while fused.

    A weight changed without torch seeing it (through ``.data``, a raw pointer, another library's kernel) keeps the
    key; the writing pass then finds a slot whose count differs, leaves that tile unfused and marks it, so unfuse
    stays exact. :attr:`guards` holds each group's :class:`FuseGuard` of the last cached fuse."""

    __slots__ = ("key", "scans", "guards", "_probe_key")

    def __init__(self):
        self.key, self.scans, self.guards, self._probe_key = None, [], [], None

    def clear(self) -> None:
        self.key, self.scans, self.guards, self._probe_key = None, [], [], None

    def nbytes(self) -> int:
        """Device bytes the cache keeps (the scans; the tables are kept by the fuse's records anyway, and so are the
        scans while fused)."""
        return sum(sc.nbytes() for sc in self.scans)

    def matches(self, jobs, backend: str | None = None) -> bool:
        """Whether :func:`fuse` of ``jobs`` would repeat the cached fuse (the key is kept for that call)."""
        key = _cache_key(jobs, backend)
        self._probe_key = (jobs, key)
        return key == self.key

    def _key_for(self, jobs, backend):
        pk = self._probe_key
        self._probe_key = None
        if pk is not None and pk[0] is jobs:
            return pk[1]
        return _cache_key(jobs, backend)


def _cache_key(jobs, backend) -> tuple:
    """Everything that determines a recording fuse's table and scan (attribute reads only; the cache keeps the jobs,
    so identities stay unique). ``_version`` changes with every in-place torch operation on a tensor (copy_,
    load_state_dict, optimizer steps); writes that bypass it are caught by the writing pass (FuseCache)."""
    k = [backend, os.environ.get("LORA_FAST_MERGE_BACKEND"), _DEFAULT.get("cpu"), _DEFAULT.get("cuda")]
    add = k.extend
    for j in jobs:
        w = j.weight
        add((id(j), id(w), w.data_ptr(), w._version, w.dtype, w.device, w.shape, w.stride(), j.view))
        for t in j.terms or ():  # LoHa/LoKr/full terms
            add((t.kind, t.scale) + tuple((id(x), x.data_ptr(), x._version, x.dtype, x.shape, x.stride())
                                          for x in t.tensors()))
        if j.factors is None:
            if j.up is not None:
                add((id(j.up), j.up.data_ptr(), j.up._version, id(j.down), j.down.data_ptr(), j.down._version))
            continue
        for f in j.factors:
            u, d = f.up, f.down
            add((id(u), u.data_ptr(), u._version, u.dtype, f.up_strides, id(d), d.data_ptr(), d._version, d.dtype,
                 f.down_strides, f.rank, f.scale))
    return tuple(k)


def _write_records(kernel, pl, scan, *, guard: bool, flags=None):
    """Record buffers at their exact sizes and the writing pass (MODE 2) of one group: its :class:`_GroupRecords`
    (which keeps the scan: unfuse finds each slot's records there). ``flags``: int32 per job, set where a fused
    element is not finite (the non-finite check in the writing pass)."""
    total = scan.total
    dev = pl.device
    rec_col = torch.empty(max(1, total), dtype=torch.int8, device=dev)
    rec_val = torch.empty(max(1, total), dtype=_BITS_DTYPE[pl.dtype], device=dev)
    skip = torch.empty(max(1, pl.n_tiles), dtype=torch.int64, device=dev)  # the kernel writes every tile's entry
    pl.launch(kernel, MODE_WRITE, check=flags is not None, counts=flags, incl=scan.incl, rec_col=rec_col,
              rec_val=rec_val, nonfinite=skip)
    g = _GroupRecords(scan, rec_col, rec_val, skip)
    if guard and pl.n_tiles:
        g.guard = FuseGuard(pl, skip)
    return g


def _record_passes(kernel, plans, n, *, record, check_finite, abort_nonfinite):
    """Counting pass, scan, the one host read, exact buffers and writing pass (or nothing after a flagged
    ``abort_nonfinite``): (record items, flags, scans)."""
    items: list = [None] * n
    flags = [False] * n
    tmp = {}
    for pl in plans:
        with _device_guard(pl.device):
            nonfinite = torch.zeros(pl.n, dtype=torch.int32, device=pl.device) if check_finite else None
            counts = torch.empty(max(1, pl.n_tiles * BLOCK_M), dtype=torch.int32, device=pl.device)
            pl.launch(kernel, MODE_COUNT, check=check_finite, counts=counts, nonfinite=nonfinite)
            incl = torch.cumsum(counts, 0, dtype=pl.scan_dtype)
            tmp[id(pl)] = (incl, nonfinite)
            del counts

    def pieces(pl):
        incl, nonfinite = tmp[id(pl)]
        out = [incl.index_select(0, pl.table[pl.end_at:pl.end_at + pl.n])]
        if check_finite:
            out.append(nonfinite)
        return out

    host = _read_per_device(plans, pieces)  # the one host read per device: record ends and non-finite flags
    scans = []
    for pl in plans:
        got = host[id(pl)]
        if check_finite:
            for q, v in enumerate(got[1]):
                flags[pl.idxs[q]] = bool(v)
        scans.append(_Scan(pl, tmp[id(pl)][0], got[0]))
    if abort_nonfinite and any(flags):
        return items, flags, None  # nothing was written
    for pl, scan in zip(plans, scans):
        with _device_guard(pl.device):
            if record:
                g = _write_records(kernel, pl, scan, guard=False)
                for q, i in enumerate(pl.idxs):
                    items[i] = _GroupRef(g, q)
            else:
                pl.launch(kernel, MODE_PLAIN)
    return items, flags, scans


def _triton_cached(cache: FuseCache, n: int, *, check: bool, abort: bool):
    """A fuse of the jobs ``cache`` was filled with: per group one writing pass at the cached record positions, no
    table built, no host read. ``check`` (safe_fusing): the writing pass also sets the jobs' non-finite flags and the
    call reads them (its one host read); with ``abort`` and a flag, one restoring pass puts every weight back bit for
    bit from the records just written, so the call changes nothing, as a refused first fuse (which checks before it
    writes)."""
    if _probe._faults:
        _probe._fault("merge")  # test hook: a forced launch failure
    kernel = _triton_kernel()
    items = [None] * n
    guards, groups, flag_bufs = [], [], {}
    for scan in cache.scans:
        pl = scan.plan
        with _device_guard(pl.device):
            if check:
                flag_bufs[id(pl)] = torch.zeros(pl.n, dtype=torch.int32, device=pl.device)
            g = _write_records(kernel, pl, scan, guard=True, flags=flag_bufs.get(id(pl)))
        groups.append(g)
        if g.guard is not None:
            guards.append(g.guard)
        for q, i in enumerate(pl.idxs):
            items[i] = _GroupRef(g, q)
    cache.guards = guards
    flags = [False] * n
    if not check:
        return RecordSet(items), flags
    plans = [g.plan for g in groups]
    host = _read_per_device(plans, lambda pl: [flag_bufs[id(pl)]])
    for pl in plans:
        for q, v in enumerate(host[id(pl)][0]):
            flags[pl.idxs[q]] = bool(v)
    if abort and any(flags):
        _triton_restore_own([(g.plan, g, 0, g.plan.n) for g in groups])
        cache.guards = []
        return RecordSet([None] * n), flags
    return RecordSet(items), flags


def _triton_run(jobs, *, negate, record, check_finite, abort_nonfinite=False, restore=None, cache=None, key=None):
    """The Triton launcher: (RecordSet or [None] * n, non-finite flags). ``restore`` (unfuse): per job a record
    (a RecordSet item) or None. ``cache`` (with its ``key``): filled with this fuse's tables and scans. See the
    section comment for the passes and what runs on the host."""
    if _probe._faults and _probe._fault("merge") == "wrong":  # test hook (probe._set_fault)
        jobs = [MergeJob(m.weight, m.up + 0.25, m.down, terms=m.terms) if m.up is not None else
                MergeJob(m.weight, terms=[Term(t.kind, t.u, t.v, t.ub, t.vb, t.scale + 0.25) for t in m.terms])
                for m in (j.materialized() for j in jobs)]
        cache = None
    kernel = _triton_kernel()
    record = record and not negate
    two_pass = record or abort_nonfinite
    n = len(jobs)
    flags = [False] * n
    plans = _plans(jobs, restore)
    _precompile(plans)
    if two_pass:
        items, flags, scans = _record_passes(kernel, plans, n, record=record, check_finite=check_finite,
                                             abort_nonfinite=abort_nonfinite)
        if cache is not None and record and scans is not None:
            cache.key, cache.scans, cache.guards = key, scans, []
        return (RecordSet(items) if record else [None] * n), flags
    nonf = {}
    for pl in plans:
        with _device_guard(pl.device):
            nonf[id(pl)] = torch.zeros(pl.n, dtype=torch.int32, device=pl.device) if check_finite else None
            pl.launch(kernel, MODE_RESTORE if restore is not None else MODE_PLAIN, negate=negate, check=check_finite,
                      nonfinite=nonf[id(pl)])
    if check_finite:  # the one host read per device: the non-finite flags
        host = _read_per_device(plans, lambda pl: [nonf[id(pl)]])
        for pl in plans:
            for q, v in enumerate(host[id(pl)][0]):
                flags[pl.idxs[q]] = bool(v)
    for pl in plans:
        for q, rec in pl.legacy:  # records made elsewhere (not by this kernel's fuse): scattered per job
            job = jobs[pl.idxs[q]]
            _scatter(job.matrix(), rec.materialize() if isinstance(rec, _GroupRef) else rec)
    return [None] * n, flags
