"""First-use check of the Triton kernels against their CPU/torch twins, and what happens when one fails.

The first time a Triton kernel is about to run on a given ``(device, dtype)``, a small probe runs it on a few jobs
of awkward shapes (odd sizes, rank 1, strided and transposed views, denormal and huge values, -0.0/Inf/NaN, NaN
under the non-finite check, LyCORIS LoHa/LoKr/full terms) and compares the results with the kernel's twin:

* ``"merge"`` (:mod:`.merge`): every fused element must have the same bits as the CPU kernel (NaN positions must
  match; NaN payloads may differ), and so must the records and the non-finite flags, for each launch the library
  makes (fuse with records with and without the non-finite check, the repeated fuse at cached record positions
  with the check, fuse without records, both unfuses); the
  exact-unfuse round trip must give back the original weights bit for bit. Two launch groups: the awkward jobs
  (the kernel's general variant) and aligned plain LoRA jobs (the specialized variant most fuses run).
* ``"segmented"`` (:mod:`.shrink_expand`): ``h`` and the expanded output must agree with the torch backend within
  the kernels' documented precision (see :func:`_probe_segmented`), NaN positions must match, and rows no entry
  names must stay bit-identical.

The verdict is cached per ``(kernel, device, dtype)`` for the rest of the process. When the probe fails, or the
kernel cannot be compiled or launched, the default (automatic) backend choice warns once per key (naming the
kernel, device, dtype and what differed) and uses the torch backend for that device and dtype from then on. A
backend asked for by name (``backend="triton"`` or the backend environment variables) and
``LORA_FAST_TRITON_FALLBACK=0`` raise :class:`KernelProbeError` instead. After a passing probe, a launch error of the
merge kernel is raised rather than answered by switching backends (records made by the kernel can only be undone by
it); shrink/expand keep nothing between calls, so there a later launch error falls back the same way.

The probe is a few tiny launches plus small copies and host syncs: a few milliseconds once per process and key
(estimated from its operation count; not yet timed on a GPU). On a cold Triton cache the merge kernel variants it
exercises are compiled before it, several at once (merge._precompile; the first real calls would compile most of them
anyway).

Test hooks (private): :func:`_set_fault` makes a kernel's launcher raise or compute a wrong result, :func:`_reset`
forgets every verdict.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import LoraError

__all__ = ["KernelProbeError", "usable", "launch_failed", "fallback_allowed"]

_NAMES = {"merge": "merge (fuse/unfuse)", "segmented": "segmented shrink/expand"}


class KernelProbeError(LoraError, RuntimeError):
    """A Triton kernel failed its first-use check (or could not be compiled/launched) and falling back to the torch
    backend was not allowed (``backend="triton"`` asked for by name, or ``LORA_FAST_TRITON_FALLBACK=0``)."""


@dataclass
class _Verdict:
    reason: Optional[str]  # None: the kernel passed
    error: Optional[BaseException] = None  # the exception behind a failure, if any
    warned: bool = False


_cache: dict = {}  # (kernel, torch.device, dtype) -> _Verdict
_lock = threading.RLock()
_faults: dict = {}  # test hook: kernel -> "raise" | "wrong"


def fallback_allowed() -> bool:
    return os.environ.get("LORA_FAST_TRITON_FALLBACK", "1") != "0"


def _key(kernel: str, device, dtype: torch.dtype) -> tuple:
    return (kernel, torch.device(device), dtype)


def usable(kernel: str, device, dtype: torch.dtype, *, strict: bool) -> bool:
    """Whether the Triton ``kernel`` may run on ``(device, dtype)``; runs the probe on first use.

    False (after one warning per key) when the probe failed and falling back is allowed; raises
    :class:`KernelProbeError` when ``strict`` or ``LORA_FAST_TRITON_FALLBACK=0``."""
    key = (kernel, device, dtype)
    v = _cache.get(key)  # a tensor's device: no normalisation on the hot path
    if v is None:
        key = _key(kernel, device, dtype)
        with _lock:
            v = _cache.get(key)
            if v is None:
                v = _cache[key] = _run(kernel, torch.device(device), dtype)
    if v.reason is None:
        return True
    return _refuse(key, v, strict)


def launch_failed(kernel: str, device, dtype: torch.dtype, error: BaseException, *, strict: bool) -> bool:
    """A launch after a passing probe raised before running (a variant the probe did not compile). Re-raises when
    ``strict`` or fallback is off; otherwise marks the key failed, warns once and returns False."""
    if strict or not fallback_allowed():
        raise error
    key = _key(kernel, device, dtype)
    with _lock:
        # the message only: the traceback would keep the caller's tensors alive for the rest of the process
        v = _cache[key] = _Verdict(_describe(error))
    return _refuse(key, v, False)


def _refuse(key: tuple, v: _Verdict, strict: bool) -> bool:
    kernel, dev, dtype = key
    what = f"the {_NAMES[kernel]} Triton kernel on {dev} for {str(dtype).replace('torch.', '')}"
    if strict or not fallback_allowed():
        why = "it was asked for by name" if strict else "LORA_FAST_TRITON_FALLBACK=0"
        raise KernelProbeError(f"lora_fast: {what} failed its first-use check against the torch backend: {v.reason} "
                               f"(no fallback: {why})") from v.error
    if not v.warned:
        v.warned = True
        warnings.warn(f"lora_fast: {what} failed its first-use check against the torch backend: {v.reason}; "
                      f"using the torch backend for {dev} {str(dtype).replace('torch.', '')} from now on "
                      "(LORA_FAST_TRITON_FALLBACK=0 raises instead)", RuntimeWarning, stacklevel=4)
    return False


def _describe(e: BaseException) -> str:
    s = f"{type(e).__name__}: {e}"
    return s if len(s) <= 400 else s[:400] + "..."


def _run(kernel: str, device: torch.device, dtype: torch.dtype) -> _Verdict:
    probe = {"merge": _probe_merge, "segmented": _probe_segmented}[kernel]
    try:
        with torch.no_grad(), _on(device), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the interpreter's numpy overflow warnings on the probe's huge values
            reason = probe(device, dtype)
    except Exception as e:  # noqa: BLE001 - a compile/launch error is a failed probe
        return _Verdict(_describe(e), e)
    return _Verdict(reason)


@contextlib.contextmanager
def _on(device: torch.device):
    """Launch on ``device``, with exact fp32 matmuls in the torch twin (TF32 would differ from the kernels)."""
    if device.type != "cuda":
        yield
        return
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.cuda.device(device):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev


# ------------------------------------------------------------------------------------------------ test hooks


def _set_fault(kernel: str, fault: Optional[str]) -> None:
    """Test hook: make ``kernel``'s Triton launcher raise (``"raise"``) or compute a wrong result (``"wrong"``);
    None removes the fault. Does not touch cached verdicts (see :func:`_reset`)."""
    if kernel not in _NAMES or fault not in (None, "raise", "wrong"):
        raise ValueError(f"bad fault {kernel!r}/{fault!r}")
    if fault is None:
        _faults.pop(kernel, None)
    else:
        _faults[kernel] = fault


def _reset() -> None:
    """Test hook: forget every verdict (the next use of each kernel probes again)."""
    with _lock:
        _cache.clear()


def _fault(kernel: str) -> Optional[str]:
    """Called at the launchers' entry: raises for a forced launch failure, returns "wrong" for a forced wrong result."""
    f = _faults.get(kernel)
    if f == "raise":
        raise RuntimeError(f"lora_fast test hook: forced {kernel} launch failure")
    return f


# ----------------------------------------------------------------------------------------------- comparisons

_BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
         torch.float8_e4m3fn: torch.int8, torch.float8_e5m2: torch.int8}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(_BITS[t.dtype])


def _where(mask: torch.Tensor) -> str:
    idx = mask.nonzero()[0].tolist()
    return f"{int(mask.sum())} element(s), first at {tuple(idx)}"


def _same_bits(got: torch.Tensor, ref: torch.Tensor, what: str) -> Optional[str]:
    """None when got and ref (same shape and dtype) have the same bits, NaN payloads aside."""
    got = got.detach().cpu()
    gn, rn = torch.isnan(got), torch.isnan(ref)
    if not torch.equal(gn, rn):
        return f"{what}: NaN where the reference has none or the other way round ({_where(gn != rn)})"
    bad = (_bits(got) != _bits(ref)) & ~gn
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        return (f"{what}: {_where(bad)} differ (got {got[i].item()!r}, expected {ref[i].item()!r})")
    return None


# ------------------------------------------------------------------------------------------------ merge probe


def _merge_cases(dtype: torch.dtype):
    """(storage, view, up, down) on the CPU: each job's weight is ``view(storage)``, and the whole storage is
    compared so elements outside the view must stay untouched. ``up`` may instead be a list of
    ``(B, A, scale)`` factors (``down`` then the job's (rows, cols, row stride, col stride) view of the storage), or
    a dict of such ``"factors"`` and LyCORIS ``"terms"`` ``(kind, u, v, ub, vb, scale)`` (merge.Term)."""
    g = torch.Generator().manual_seed(20261204)
    fi = torch.finfo(dtype)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    cases = []
    # every other column of a row-sliced block (strides (72, 2)), rank 1, deltas as large as the weights: many
    # records
    cases.append((rnd(35, 72, scale=0.05).to(dtype), lambda t: t[1:, ::2], rnd(34, 1, scale=0.3),
                  rnd(1, 36, scale=0.3)))
    # a transposed view (column stride 67), odd sizes, rank 5; its first 8 rows hold denormal weights and deltas
    st = rnd(21, 67, scale=0.05)
    st[:, :8] = fi.tiny * torch.rand(21, 8, generator=g) * 0.5
    up, down = rnd(67, 5, scale=0.1), rnd(5, 21, scale=0.1)
    up[:8] *= fi.tiny * 10  # deltas around a tenth of the smallest normal: denormal fp32 products for fp32 weights
    cases.append((st.to(dtype), lambda t: t.t(), up, down))
    # huge weights, deltas that push some past the largest finite value; -0.0, +-Inf and NaN weights
    big = fi.max * (0.5 + 0.45 * torch.rand(9, 33, generator=g)) * torch.sign(rnd(9, 33))
    big[0, :4] = torch.tensor([-0.0, float("inf"), float("nan"), float("-inf")])
    cases.append((big.to(dtype), lambda t: t, rnd(9, 2), rnd(2, 33, scale=fi.max * 0.2)))
    # one row, rank 1, a NaN factor (the non-finite check must flag it)
    up = rnd(1, 1)
    up[0, 0] = float("nan")
    cases.append((rnd(1, 65, scale=0.05).to(dtype), lambda t: t, up, rnd(1, 65, scale=0.1)))
    # one column, rank 2, plain values (flag must stay clear)
    cases.append((rnd(3, 1, scale=0.05).to(dtype), lambda t: t, rnd(3, 2, scale=0.1), rnd(2, 1, scale=0.1)))
    # what fuse_lora sends: a 4-D (conv) weight given by its 2-D geometry, two adapters' factors in fp16 (4-D, 1x1)
    # and bf16 (a transposed A), scales folded in by the kernel, one of them small enough for denormal products
    # (a 3x3 conv over 3 channels: 27-column rows, which keep this job in the general variant's launch group)
    b1 = rnd(6, 3, 1, 1, scale=0.3).half()
    a1 = rnd(3, 3, 3, 3, scale=0.3).half()
    b2 = rnd(6, 2, scale=0.3).bfloat16()
    a2 = rnd(27, 2, scale=0.3).bfloat16().t()
    factors = [(b1, a1, 0.7 * 0.123), (b2, a2, 3e-38)]
    cases.append((rnd(6, 3, 3, 3, scale=0.05).to(dtype), lambda t: t, factors, (6, 27, 27, 1)))
    # LyCORIS terms after a bf16 LoRA factor on a transposed view (50 x 30): a LoHa term (u = A·B with an fp16,
    # transposed B; v = C·D with a bf16 C), a LoKr term (a bf16 W2 of 10 x 5 blocks, which straddle the tiles) and a
    # full diff in fp16; deltas about as large as the weights (many records)
    terms = [("hada", rnd(50, 2, scale=0.5), rnd(50, 3, scale=0.5).bfloat16(), rnd(30, 2, scale=0.5).half().t(),
              rnd(3, 30, scale=0.5), 0.3),
             ("kron", rnd(5, 6, scale=0.3), rnd(10, 5, scale=0.3).bfloat16(), None, None, 1.3),
             ("kron", torch.ones(1, 1), rnd(50, 30, scale=0.05).half(), None, None, 0.6)]
    cases.append((rnd(30, 50, scale=0.05).to(dtype), lambda t: t.t(),
                  {"factors": [(rnd(50, 2, scale=0.1).bfloat16(), rnd(2, 30, scale=0.1), 0.4)], "terms": terms}, None))
    return cases


def _lora_group(dtype: torch.dtype):
    """A launch group as fuse_lora sends a model with plain LoRA factors in its own dtype (bf16 for an fp8 model):
    every weight row and down row 16-byte aligned with unit column stride, one rank, no LyCORIS terms, so the kernel
    specialized for that case runs (vector accesses, the factors' dtype known; merge._Plan.spec), not the general one
    the awkward cases above need. Ragged tiles, a row-sliced weight, a transposed up, a padded down, a down at an
    address that is not 16-byte aligned (as a kohya file's packed tensors are: the scalar loads inside the vector
    group), -0.0/Inf/NaN and denormal weights, deltas as large as the weights (many records) and a NaN factor (the
    non-finite check).
    Returns ``build(device) -> (stores, jobs)``: the buffers are made on the device and the views taken there, so the
    alignments are the same on every device."""
    g = torch.Generator().manual_seed(20261205)
    fi = torch.finfo(dtype)
    vec = 16 // dtype.itemsize
    rank = 4
    fdt = dtype if dtype.itemsize > 1 else torch.bfloat16  # an fp8 model's LoRA factors come in a 16-bit dtype

    def rnd(*shape, scale=1.0, dt=fdt):
        return (torch.randn(*shape, generator=g) * scale).to(dt)

    w0 = rnd(40, 17 * vec, scale=0.05, dt=dtype)  # 2 x 2 tiles, the last row and column tiles partial
    w0[0, :4] = torch.tensor([-0.0, float("inf"), float("nan"), float("-inf")])
    w0[1:5] = (fi.tiny * torch.rand(4, w0.shape[1], generator=g) * 0.5).to(dtype)
    w1 = rnd(38, 9 * vec, scale=0.05, dt=dtype)  # viewed as rows 3..36: an aligned row slice
    w2 = rnd(8, 2 * vec, scale=0.05, dt=dtype)
    nan_up = rnd(8, rank)
    nan_up[5, 2] = float("nan")
    parts = [
        (w0, lambda w: w, rnd(rank, 40, scale=0.3), lambda u: u.t(),  # a transposed up
         rnd(rank, w0.shape[1] + vec, scale=0.3), lambda d: d[:, :w0.shape[1]]),  # a padded down (row stride + vec)
        (w1, lambda w: w[3:37], rnd(34, rank, scale=0.3), lambda u: u,
         rnd(rank * w1.shape[1] + 1, scale=0.3), lambda d: d[1:].view(rank, w1.shape[1])),  # packed: misaligned
        (w2, lambda w: w, nan_up, lambda u: u, rnd(rank, w2.shape[1], scale=0.1), lambda d: d),
    ]

    def build(dev):
        from . import merge as M

        stores, jobs = [], []
        for w, wv, u, uv, d, dv in parts:
            s = w.to(dev, copy=True)
            stores.append(s)
            jobs.append(M.MergeJob(wv(s), uv(u.to(dev, copy=True)), dv(d.to(dev, copy=True))))
        return stores, jobs

    return build


def _probe_merge(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """The awkward cases (one launch group, the kernel's general variant), then a group of aligned plain LoRA jobs
    (the variant most fuses run); each through every launch the library makes."""
    from . import merge as M

    cases = _merge_cases(dtype)

    def job(s, case, dev):
        _, view, up, down = case
        if isinstance(up, dict):  # LoRA factors and LyCORIS terms
            fs = [M.Factor.of(b.to(dev), a.to(dev), scale) for b, a, scale in up["factors"]]
            ts = [M.Term(kind, u.to(dev), v.to(dev), None if ub is None else ub.to(dev),
                         None if vb is None else vb.to(dev), scale) for kind, u, v, ub, vb, scale in up["terms"]]
            return M.MergeJob(view(s), factors=fs, terms=ts, view=down)
        if isinstance(up, list):
            fs = []
            for b, a, scale in up:
                b, a = b.to(dev), a.to(dev)
                fs.append(M.Factor(b, (b.stride(0), b.stride(1)), a, (a.stride(0), a.stride(-1)), b.shape[1], scale))
            return M.MergeJob(view(s), factors=fs, view=down)
        return M.MergeJob(view(s), up.to(dev), down.to(dev))

    def awkward(dev):
        stores = [st.to(dev, copy=True) for st, _, _, _ in cases]
        return stores, [job(s, c, dev) for s, c in zip(stores, cases)]

    lora = _lora_group(dtype)
    if device.type == "cuda":  # every variant below, compiled several at once before the first launch
        M._precompile([pl for build in (awkward, lora) for pl in M._plans(build(device)[1])])
    return _probe_merge_group(device, awkward, "") or _probe_merge_group(device, lora, "plain LoRA group: ")


def _probe_merge_group(device: torch.device, build, label: str) -> Optional[str]:
    """One launch group (``build(device) -> (stores, jobs)``) through every merge launch, against the CPU kernel."""
    from . import merge as M

    ref_st, ref_jobs = build("cpu")
    ref_recs, ref_flags = M.fuse(ref_jobs, record=True, check_finite=True, backend="cpu")
    ref_recs = list(ref_recs)

    def compare(stores, recs, flags, what, want_flags):
        what = label + what
        for n, (s, r) in enumerate(zip(stores, ref_st)):
            d = _same_bits(s, r, f"{what}, job {n} {tuple(r.shape)}: fused weights vs the CPU kernel")
            if d:
                return d
        if flags != want_flags:
            return f"{what}: non-finite flags {flags}, the CPU kernel gives {want_flags}"
        for n, b in enumerate(ref_recs):
            try:  # records a faulty kernel wrote may not even convert (counts that disagree with the scan)
                a = recs[n]
            except Exception as e:  # noqa: BLE001
                return f"{what}, job {n}: exact-unfuse record unreadable ({_describe(e)})"
            if a is None:
                continue
            if not (torch.equal(a.offsets.cpu(), b.offsets) and torch.equal(a.cols.cpu(), b.cols)
                    and torch.equal(_bits(a.value.cpu()), _bits(b.value))):
                return f"{what}, job {n}: exact-unfuse record differs from the CPU kernel's ({len(a)} vs {len(b)})"
        return None

    # safe_fusing: the counting pass flags the NaN job and nothing at all is written
    stores, jobs = build(device)
    originals = [s.clone() for s in stores]
    recs, flags = M._triton_run(jobs, negate=False, record=True, check_finite=True, abort_nonfinite=True)
    if flags != ref_flags:
        return f"{label}fuse (safe_fusing): non-finite flags {flags}, the CPU kernel gives {ref_flags}"
    for n, (s, o) in enumerate(zip(stores, originals)):
        if not torch.equal(_bits(s), _bits(o)):
            return f"{label}fuse (safe_fusing) with a non-finite job, job {n}: weights were changed"
    # fuse with records and the non-finite check (both passes), keeping its scan as a repeated fuse does
    cache = M.FuseCache()
    recs, flags = M._triton_run(jobs, negate=False, record=True, check_finite=True, cache=cache)
    d = compare(stores, recs, flags, "fuse (records, non-finite check)", ref_flags)
    if d:
        return d

    def round_trip(stores, originals, what):
        for n, (s, o) in enumerate(zip(stores, originals)):
            if not torch.equal(_bits(s), _bits(o)):
                bad = (_bits(s) != _bits(o)).cpu()
                return f"{label}{what}, job {n}: {_where(bad)} not restored bit for bit"
        return None

    # the exact unfuse as unfuse_lora runs it: the fuse's own table, rn(W' - delta) and the recorded elements put
    # back in the same pass
    runs = M._own_runs(jobs, M._items(recs))
    if runs is None:
        return f"{label}unfuse: the fuse's own records were not recognized"
    M._triton_restore_own(runs)
    d = round_trip(stores, originals, "unfuse round trip (the fuse's table)")
    if d:
        return d
    # safe_fusing's repeated fuse: the writing pass at the cached record positions, flagging as it writes (the
    # refusal that may follow is the restoring launch above)
    recs, flags = M._triton_cached(cache, len(jobs), check=True, abort=False)
    d = compare(stores, recs, flags, "repeated fuse (cached positions, non-finite check)", ref_flags)
    if d:
        return d
    # fuse with records, no check (fuse_lora's default), and fuse without records (lora-fast merge)
    for record in (True, False):
        stores, jobs = build(device)
        recs, flags = M._triton_run(jobs, negate=False, record=record, check_finite=False)
        if not record and any(r is not None for r in recs):
            return f"{label}fuse (no records): records were returned"
        d = compare(stores, recs, flags, f"fuse ({'records' if record else 'no records'})", [False] * len(jobs))
        if d:
            return d
        if record:  # the unfuse of records named per job in a table (records of several fuse calls)
            M._triton_run(jobs, negate=True, record=False, check_finite=False, restore=M._items(recs))
            d = round_trip(stores, originals, "unfuse round trip (records per job)")
            if d:
                return d
    return None


# ------------------------------------------------------------------------------------------- segmented probe


def _probe_segmented(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Shrink and every expand pass on a 5-sample batch (3 rows each) with ranks 1 and 5, an absent group, a mix of
    two adapters (two passes), a base-only sample, a row-strided x, a column-sliced out, a row of large values, a
    row of denormals and a NaN. Tolerance per output element: ``n_passes`` ulps of the dtype (each pass rounds
    once), plus ``2^-22 ·|base value|``, plus ``rel · m`` with ``m`` the float64 sum of the absolute values of every
    LoRA product ``|lam · scale · coef · x_k · A_gk · B_g|`` of that element: ``rel = 2^-16`` for fp32 layers
    (exact fp32 dots, another summation order), ``2^-10`` for fp16/bf16 layers (the compiled expand multiplies h as
    TF32, 2^-11 relative). h: ``2^-16 · |x|·|A|ᵀ`` plus ``(K + 1)`` smallest
    normal fp32 values (denormal products may be flushed to zero)."""
    from . import shrink_expand as S

    g = torch.Generator().manual_seed(4099)
    fi = torch.finfo(dtype)
    k, n, t, batch = 37, 70, 3, 5
    lam = 0.8

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    downs = [rnd(1, k, scale=0.3), rnd(5, k, scale=0.3), None]
    ups = [rnd(n, 1, scale=0.3), rnd(n, 5, scale=0.3), None]
    scales = [0.5, 1.25, 0.7]
    entries = [[(0, 1.0)], [(1, 0.75), (0, 0.5)], [], [(2, 1.0)], [(1, 1.0)]]
    m = batch * t
    x = rnd(m, k)
    x[3] *= 256.0  # large values (sample 1)
    x[4] = fi.tiny * torch.rand(k, generator=g) * 0.5  # denormals in the layer's dtype
    x[12, 5] = float("nan")  # sample 4: a NaN row
    xw = torch.zeros(m, k + 5)
    xw[:, 2:2 + k] = x
    out0 = rnd(m, n)
    out0[6:9, :4] = torch.tensor([fi.tiny * 0.25, -0.0, float("inf"), float("nan")])  # base-only rows
    ow = rnd(m, n + 3)
    ow[:, 1:1 + n] = out0
    xw, ow = xw.to(dtype), ow.to(dtype)

    groups = S.make_groups([None if d is None else d.to(device, dtype) for d in downs],
                           [None if u is None else u.to(device, dtype) for u in ups], scales)
    rows = S.build_row_map(entries, batch, t, device)
    width = max(16, S._next_pow2(groups.max_rank))

    xd = xw.to(device, copy=True)[:, 2:2 + k]  # row stride k + 5
    tri_w = ow.to(device, copy=True)
    tri = tri_w[:, 1:1 + n]  # row stride n + 3
    h_tri = torch.empty((rows.num_entries, width), dtype=torch.float32, device=device)
    S._triton_shrink(xd, h_tri, groups, rows)
    for p in range(len(rows.passes)):
        S._triton_expand(tri, h_tri, groups, rows, p, lam)

    tor_w = ow.to(device, copy=True)
    h_tor = S.lora_shrink(xd, groups, rows, backend="torch")
    S.lora_expand(tor_w[:, 1:1 + n], h_tor, groups, rows, lam, backend="torch")

    # float64 magnitudes of the terms, on the CPU
    xa = xw[:, 2:2 + k].double().abs().nan_to_num(nan=0.0)
    cst = [(abs(float(s))) for s in scales]
    mag_out = torch.zeros(m, n, dtype=torch.float64)  # sum of |LoRA products| per output element
    h_cpu, h_ref = h_tri.cpu(), h_tor.cpu()
    for s, grp in enumerate(rows.seg_group_host):
        r = groups.ranks[grp]
        if r == 0:
            continue
        a, b = rows.seg_start_host[s], rows.seg_start_host[s + 1]
        idx = rows.rows[a:b].cpu()
        mh = xa[idx] @ downs[grp].to(dtype).double().abs().t()  # (entries, r)
        # fp32 denormal products may be flushed (they are far below any rounding of the output)
        tol_h = 2.0 ** -16 * mh + (k + 1) * torch.finfo(torch.float32).tiny
        d = _close(h_cpu[a:b, :r], h_ref[a:b, :r], tol_h, 0, f"shrink h, segment {s}")
        if d:
            return d
        coef = rows.coef[a:b].cpu().double().abs() * abs(lam) * cst[grp]
        mag_out[idx] += coef[:, None] * (mh @ ups[grp].to(dtype).double().abs().t())

    got, ref = tri_w.cpu(), tor_w.cpu()
    touched = torch.zeros(m, n + 3, dtype=torch.bool)
    touched[rows.rows.cpu(), 1:1 + n] = True
    if not torch.equal(_bits(got)[~touched], _bits(ref)[~touched]):
        return "expand: rows or columns that no entry names were modified"
    rel = 2.0 ** -16 if dtype == torch.float32 else 2.0 ** -10
    base = ow.double().abs().nan_to_num(nan=0.0, posinf=0.0)[:, 1:1 + n]
    sel = rows.rows.cpu().unique()
    bound = rel * mag_out[sel] + 2.0 ** -22 * base[sel]
    return _close(got[sel, 1:1 + n], ref[sel, 1:1 + n], bound, len(rows.passes), "expand output")


def _close(got: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor, ulps: int, what: str) -> Optional[str]:
    gn, rn = torch.isnan(got), torch.isnan(ref)
    if not torch.equal(gn, rn):
        return f"{what}: NaN where the torch backend has none or the other way round ({_where(gn != rn)})"
    g64, r64 = got.double(), ref.double()
    inf = torch.isinf(g64) | torch.isinf(r64)
    if not torch.equal(g64[inf], r64[inf]):
        return f"{what}: infinities differ from the torch backend"
    fin = ~(gn | inf)
    fi = torch.finfo(got.dtype)
    tol = bound + ulps * fi.eps * torch.maximum(torch.maximum(g64.abs(), r64.abs()), torch.tensor(fi.tiny))
    bad = ((g64 - r64).abs() > tol) & fin
    if bad.any():
        i = tuple(bad.nonzero()[0].tolist())
        return (f"{what}: {_where(bad)} outside the tolerance (got {got[i].item()!r}, the torch backend gives "
                f"{ref[i].item()!r}, tolerance {tol[i].item():.3g})")
    return None
