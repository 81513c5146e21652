"""The first-use probe of the Triton kernels (lora_fast/kernels/probe.py) and its fallback policy.

Launch failures are forced through the test hook in this process (the kernel never runs, so no interpreter is
needed). Wrong results and the silent pass of correct kernels need the kernels to run: those checks run under
TRITON_INTERPRET=1 in a subprocess, as the other kernel tests do. Triton is made the default backend for CPU tensors
(on a GPU machine it is the default for CUDA tensors), so the probe and the fallback act as they would on a GPU."""

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
from triton_support import exact_fma_interpreter, interpretable_segmented_kernels
import torch

from lora_fast.kernels import merge as M
from lora_fast.kernels import probe as P
from lora_fast.kernels import shrink_expand as S

BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def bits(t):
    return t.contiguous().view(BITS[t.dtype])


@pytest.fixture
def triton_default(monkeypatch):
    """Fresh verdicts, no faults, and Triton as the default choice for CPU tensors (restored afterwards)."""
    monkeypatch.setattr(P, "_cache", {})
    monkeypatch.setattr(P, "_faults", {})
    monkeypatch.setitem(M._DEFAULT, "cpu", "triton")
    real = S._backend
    monkeypatch.setattr(S, "_backend", lambda t, b: "triton" if b is None else real(t, b))
    for var in ("LORA_FAST_TRITON_FALLBACK", "LORA_FAST_MERGE_BACKEND", "LORA_FAST_SEGMENTED_BACKEND"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def merge_jobs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    st = (torch.randn(30, 20, generator=g) * 0.05).to(dtype)
    return [
        M.MergeJob((torch.randn(37, 70, generator=g) * 0.05).to(dtype), torch.randn(37, 1, generator=g) * 0.1,
                   torch.randn(1, 70, generator=g) * 0.1),
        M.MergeJob(st.t(), torch.randn(20, 3, generator=g) * 0.1, torch.randn(3, 30, generator=g) * 0.1),
    ]


def clone_jobs(jobs):
    return [M.MergeJob(j.weight.clone(), j.up, j.down) for j in jobs]


def only_lora_warnings(rec):
    return [w for w in rec if "lora_fast" in str(w.message)]


def test_merge_launch_failure_warns_once_falls_back_to_torch_and_unfuse_is_exact(triton_default):
    P._set_fault("merge", "raise")
    jobs = merge_jobs(torch.float16)
    originals = [j.weight.clone() for j in jobs]
    expected = clone_jobs(jobs)
    M.fuse(expected, backend="torch")

    triton_default.setenv("LORA_FAST_TRITON_FALLBACK", "0")
    with pytest.raises(P.KernelProbeError, match=r"merge .*cpu for float16.*forced merge launch failure"):
        M.fuse(jobs)
    assert all(torch.equal(bits(j.weight), bits(o)) for j, o in zip(jobs, originals))  # nothing written
    triton_default.delenv("LORA_FAST_TRITON_FALLBACK")

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        records, _ = M.fuse(jobs)
    msgs = [str(w.message) for w in only_lora_warnings(rec)]
    assert len(msgs) == 1 and all(s in msgs[0] for s in ("merge", "on cpu for float16", "forced merge launch",
                                                         "torch backend")), msgs
    for j, e in zip(jobs, expected):
        assert torch.equal(bits(j.weight), bits(e.weight))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per (kernel, device, dtype)
        M.unfuse(jobs, records)
        for j, o in zip(jobs, originals):
            assert torch.equal(bits(j.weight), bits(o))
        records, _ = M.fuse(jobs)
        M.unfuse(jobs, records)
    with pytest.raises(P.KernelProbeError, match="asked for by name"):
        M.fuse(jobs, backend="triton")
    triton_default.setenv("LORA_FAST_MERGE_BACKEND", "triton")
    with pytest.raises(P.KernelProbeError):
        M.fuse(jobs)
    triton_default.delenv("LORA_FAST_MERGE_BACKEND")
    # another dtype is another key: its own probe, its own warning; _reset forgets every verdict
    with pytest.warns(RuntimeWarning, match="on cpu for float32"):
        M.fuse(merge_jobs(torch.float32))
    P._reset()
    with pytest.warns(RuntimeWarning, match="on cpu for float16"):
        M.fuse(merge_jobs(torch.float16))


def test_merge_launch_failure_after_a_passing_probe_raises_instead_of_switching(triton_default):
    """Records made by the kernel can only be undone by the kernel, so a (device, dtype) that passed its probe
    never switches to the torch backend: a later launch error propagates, before anything is written."""
    P._cache[P._key("merge", "cpu", torch.float32)] = P._Verdict(None)
    P._set_fault("merge", "raise")
    jobs = merge_jobs(torch.float32)
    originals = [j.weight.clone() for j in jobs]
    with pytest.raises(RuntimeError, match="forced merge launch failure"):
        M.fuse(jobs)
    assert all(torch.equal(bits(j.weight), bits(o)) for j, o in zip(jobs, originals))
    assert P._cache[P._key("merge", "cpu", torch.float32)].reason is None


def segmented_case(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 9, generator=g).to(dtype)
    out = torch.randn(12, 7, generator=g).to(dtype)
    groups = S.make_groups([torch.randn(1, 9, generator=g).to(dtype), torch.randn(3, 9, generator=g).to(dtype)],
                           [torch.randn(7, 1, generator=g).to(dtype), torch.randn(7, 3, generator=g).to(dtype)],
                           [0.5, 2.0])
    rows = S.build_row_map([[(0, 1.0)], [(1, 0.5), (0, 0.25)], []], 6, 2)
    return x, out, groups, rows


def test_segmented_launch_failure_in_the_probe_warns_once_and_falls_back(triton_default):
    P._set_fault("segmented", "raise")
    x, out, groups, rows = segmented_case(torch.bfloat16)
    expected = S.segmented_lora(x, out.clone(), groups, rows, backend="torch")
    triton_default.setenv("LORA_FAST_TRITON_FALLBACK", "0")
    with pytest.raises(P.KernelProbeError, match=r"segmented .*cpu for bfloat16.*forced segmented launch failure"):
        S.segmented_lora(x, out.clone(), groups, rows)
    triton_default.delenv("LORA_FAST_TRITON_FALLBACK")
    with pytest.warns(RuntimeWarning, match=r"segmented shrink/expand Triton kernel on cpu for bfloat16"):
        got = S.segmented_lora(x, out.clone(), groups, rows)
    assert torch.equal(got, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(S.segmented_lora(x, out.clone(), groups, rows), expected)
    with pytest.raises(P.KernelProbeError):
        S.segmented_lora(x, out.clone(), groups, rows, backend="triton")


def test_segmented_launch_failure_after_a_passing_probe_falls_back_for_that_key(triton_default):
    """Shrink/expand keep no state between calls, so a launch error after a passing probe (a block width the probe
    did not compile) can still fall back: one warning, then the torch backend for that device and dtype."""
    key = P._key("segmented", "cpu", torch.float32)
    P._cache[key] = P._Verdict(None)

    def broken(*args):
        raise RuntimeError("ptxas died")

    triton_default.setattr(S, "_triton_shrink", broken)
    x, out, groups, rows = segmented_case(torch.float32)
    expected = S.segmented_lora(x, out.clone(), groups, rows, backend="torch")
    triton_default.setenv("LORA_FAST_TRITON_FALLBACK", "0")
    with pytest.raises(RuntimeError, match="ptxas died"):
        S.segmented_lora(x, out.clone(), groups, rows)
    triton_default.delenv("LORA_FAST_TRITON_FALLBACK")
    with pytest.warns(RuntimeWarning, match="ptxas died"):
        assert torch.equal(S.segmented_lora(x, out.clone(), groups, rows), expected)
    assert "ptxas died" in P._cache[key].reason
    with pytest.raises(RuntimeError, match="ptxas died"):
        S.segmented_lora(x, out.clone(), groups, rows, backend="triton")


def test_fault_hook_rejects_unknown_names():
    with pytest.raises(ValueError):
        P._set_fault("merge", "slow")
    with pytest.raises(ValueError):
        P._set_fault("gemm", "raise")


# ------------------------------------------------------------------------------------- interpreted kernels

PRELUDE = textwrap.dedent(
    """
    import os, sys, warnings
    os.environ["TRITON_INTERPRET"] = "1"
    for v in ("LORA_FAST_TRITON_FALLBACK", "LORA_FAST_MERGE_BACKEND", "LORA_FAST_SEGMENTED_BACKEND"):
        os.environ.pop(v, None)
    sys.path.insert(0, {tests_dir!r})
    import torch
    from test_kernels_probe import bits, merge_jobs, clone_jobs, segmented_case, only_lora_warnings
    from lora_fast.kernels import merge as M, probe as P, shrink_expand as S

    M._DEFAULT["cpu"] = "triton"  # as for CUDA tensors on a GPU machine
    _real_backend = S._backend
    S._backend = lambda t, b: "triton" if b is None else _real_backend(t, b)
    calls = {{"merge": 0, "expand": 0}}
    _run, _own, _expand = M._triton_run, M._triton_restore_own, S._triton_expand
    def counted_run(*a, **k):
        calls["merge"] += 1
        return _run(*a, **k)
    def counted_own(*a, **k):  # unfuse with the fuse's own table
        calls["merge"] += 1
        return _own(*a, **k)
    M._triton_restore_own = counted_own
    def counted_expand(*a, **k):
        calls["expand"] += 1
        return _expand(*a, **k)
    M._triton_run, S._triton_expand = counted_run, counted_expand
    DTYPES = (torch.float32, torch.float16, torch.bfloat16)
    """
)

PASS_SCRIPT = PRELUDE + textwrap.dedent(
    """
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for dtype in DTYPES:
            name = str(dtype).replace("torch.", "")
            jobs = merge_jobs(dtype, seed=3)
            originals = [j.weight.clone() for j in jobs]
            cpu = clone_jobs(jobs)
            rc, _ = M.fuse(cpu, backend="cpu")
            n0 = calls["merge"]
            rt, _ = M.fuse(jobs)
            verdict = P._cache[P._key("merge", "cpu", dtype)]
            assert verdict.reason is None, verdict.reason
            n = calls["merge"]
            assert n - n0 >= 2, n - n0  # the probe's launches and the real call
            for a, b, x, y in zip(jobs, cpu, rt, rc):
                assert torch.equal(bits(a.weight), bits(b.weight)), name
                assert torch.equal(x.offsets, y.offsets) and torch.equal(bits(x.value), bits(y.value)), name
            M.unfuse(jobs, rt)
            assert calls["merge"] == n + 1  # the kernel again, no second probe
            for j, o in zip(jobs, originals):
                assert torch.equal(bits(j.weight), bits(o)), name

            x, out, groups, rows = segmented_case(dtype, seed=5)
            e0 = calls["expand"]
            got = S.segmented_lora(x, out.clone(), groups, rows)
            assert P._cache[P._key("segmented", "cpu", dtype)].reason is None
            e = calls["expand"]
            assert e - e0 > len(rows.passes), e - e0  # the probe's passes and the real ones
            assert torch.equal(bits(got), bits(S.segmented_lora(x, out.clone(), groups, rows, backend="triton")))
            assert calls["expand"] == e + len(rows.passes)
    assert not only_lora_warnings(rec), [str(w.message) for w in only_lora_warnings(rec)]
    print("PROBE-PASS-OK")
    """
)

WRONG_SCRIPT = PRELUDE + textwrap.dedent(
    """
    P._set_fault("merge", "wrong")
    P._set_fault("segmented", "wrong")
    for dtype in DTYPES:
        name = str(dtype).replace("torch.", "")
        jobs = merge_jobs(dtype, seed=7)
        originals = [j.weight.clone() for j in jobs]
        expected = clone_jobs(jobs)
        M.fuse(expected, backend="torch")
        wrong = clone_jobs(jobs)
        os.environ["LORA_FAST_TRITON_FALLBACK"] = "0"
        try:
            M.fuse(jobs)
            raise AssertionError("LORA_FAST_TRITON_FALLBACK=0 did not raise")
        except P.KernelProbeError as e:
            assert "merge" in str(e) and "on cpu for " + name in str(e) and "differ" in str(e), str(e)
        for j, o in zip(jobs, originals):
            assert torch.equal(bits(j.weight), bits(o)), "the failed probe wrote into the weights"
        del os.environ["LORA_FAST_TRITON_FALLBACK"]

        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            records, _ = M.fuse(jobs)
            w = only_lora_warnings(rec)
            assert len(w) == 1 and isinstance(w[0].message, RuntimeWarning), [str(x.message) for x in w]
            msg = str(w[0].message)
            assert "merge" in msg and "on cpu for " + name in msg and "fused weights vs the CPU kernel" in msg, msg
            for j, e in zip(jobs, expected):
                assert torch.equal(bits(j.weight), bits(e.weight)), name  # the torch backend's bits
            M.unfuse(jobs, records)
            for j, o in zip(jobs, originals):
                assert torch.equal(bits(j.weight), bits(o)), name
            records, _ = M.fuse(jobs)
            M.unfuse(jobs, records)
            assert not only_lora_warnings(rec)[1:], "warned twice"
        try:
            M.fuse(jobs, backend="triton")
            raise AssertionError("backend='triton' fell back")
        except P.KernelProbeError:
            pass

        x, out, groups, rows = segmented_case(dtype, seed=9)
        expected = S.segmented_lora(x, out.clone(), groups, rows, backend="torch")
        os.environ["LORA_FAST_TRITON_FALLBACK"] = "0"
        try:
            S.segmented_lora(x, out.clone(), groups, rows)
            raise AssertionError("LORA_FAST_TRITON_FALLBACK=0 did not raise")
        except P.KernelProbeError as e:
            assert "segmented" in str(e) and "expand output" in str(e), str(e)
        del os.environ["LORA_FAST_TRITON_FALLBACK"]
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            got = S.segmented_lora(x, out.clone(), groups, rows)
            again = S.segmented_lora(x, out.clone(), groups, rows)
        w = only_lora_warnings(rec)
        assert len(w) == 1 and "on cpu for " + name in str(w[0].message), [str(x.message) for x in w]
        assert torch.equal(bits(got), bits(expected)) and torch.equal(bits(again), bits(expected)), name
    print("PROBE-WRONG-OK")
    """
)


def run_interpreted(script, marker):
    pytest.importorskip("triton")
    src = script.format(tests_dir=os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", src], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and marker in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


@exact_fma_interpreter
def test_correct_kernels_pass_the_probe_silently_and_serve_the_calls():
    """Interpreted: for every dtype the probe passes without a warning, the kernels then serve the default calls
    (same bits and records as the CPU kernel, exact unfuse), and the probe runs once per (kernel, device, dtype)."""
    run_interpreted(PASS_SCRIPT, "PROBE-PASS-OK")


@interpretable_segmented_kernels
def test_a_wrong_kernel_result_is_caught_warned_once_and_the_torch_backend_takes_over():
    """Interpreted, with the test hook making each kernel compute a wrong result: LORA_FAST_TRITON_FALLBACK=0 raises
    (nothing written); otherwise one warning naming the kernel, device, dtype and what differed, then the torch
    backend's exact bits, an exact unfuse, and backend='triton' still raises."""
    run_interpreted(WRONG_SCRIPT, "PROBE-WRONG-OK")


SPECIALIZED_SCRIPT = PRELUDE + textwrap.dedent(
    """
    launched = []
    _launch = M._Plan.launch
    def spying(self, kernel, mode, **kw):
        launched.append((dict(self.spec), mode))
        if BREAK and self.spec["WV"] and mode in (M.MODE_WRITE, M.MODE_PLAIN):
            kw["negate"] = not kw.get("negate", False)  # a fault only the specialized (vector) variant has
        return _launch(self, kernel, mode, **kw)
    M._Plan.launch = spying
    for dtype in DTYPES:
        vec = 16 // dtype.itemsize
        code = {{torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}}[dtype]
        BREAK = False
        launched.clear()
        assert P._probe_merge(torch.device("cpu"), dtype) is None, dtype
        lora = dict(RK=0, EXACT=True, UDT=code, DDT=code, TERMS=False, I64=False, WV=vec, DV=vec)
        modes = {{m for s, m in launched if s == lora}}
        # the variant an aligned model's fuse and unfuse run, in every mode they use
        assert modes == {{M.MODE_COUNT, M.MODE_WRITE, M.MODE_PLAIN, M.MODE_RESTORE_OWN, M.MODE_RESTORE}}, (dtype, modes)
        assert any(s["TERMS"] and not s["WV"] for s, _ in launched), dtype  # and the general variant
        BREAK = True
        reason = P._probe_merge(torch.device("cpu"), dtype)
        assert reason is not None and reason.startswith("plain LoRA group: ") and "differ" in reason, reason
    print("PROBE-SPECIALIZED-OK")
    """
)


@exact_fma_interpreter
def test_the_probe_runs_the_specialized_variant_that_aligned_models_fuse_with():
    """Interpreted: besides its awkward cases (the kernel's general variant), the merge probe runs a group of aligned
    plain LoRA jobs through the variant specialized for them (vector accesses, the factors' dtype known) in every
    launch mode a fuse and an unfuse use, so a fault of that variant alone is caught at first use."""
    run_interpreted(SPECIALIZED_SCRIPT, "PROBE-SPECIALIZED-OK")
