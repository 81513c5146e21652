"""The merge kernel's launch variants compiled ahead, in parallel, at first use (merge._precompile).

No GPU here, so the two halves are checked apart. Interpreted (TRITON_INTERPRET=1, in a subprocess as the other
kernel tests): the variants a launch group lists (_Plan.variants) are exactly the launches its fuses and unfuses make,
by buffer dtype, alignment and compile-time constant, so what is compiled ahead is what runs. Compiled (Triton's real
pipeline for sm_90, a stand-in driver that names the target): compiling those variants in threads fills the kernel's
own cache under the keys the launch sites' real buffers look up, and a variant that fails to compile leaves the
others compiled and Triton's compile mode off.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from triton_support import exact_fma_interpreter

from lora_fast.kernels import merge as M

TESTS = os.path.dirname(os.path.abspath(__file__))


def run_script(script: str, marker: str, **env) -> None:
    pytest.importorskip("triton")
    full = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, os.path.dirname(TESTS)]), **env)
    full.pop("LORA_FAST_MERGE_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, env=full,
                          timeout=600)
    assert proc.returncode == 0 and marker in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


VARIANTS_SCRIPT = """
    import torch
    from lora_fast.kernels import merge as M, probe as P

    M._DEFAULT["cpu"] = "triton"  # as for CUDA tensors on a GPU machine
    launched, plans = set(), []

    def signature(args, kw):
        return (tuple((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else (a, True) for a in args),
                tuple(sorted(kw.items())))

    real_launch = M._launch

    def launch(kernel, grid, *args, **kw):
        launched.add(signature(args, kw))
        real_launch(kernel, grid, *args, **kw)

    M._launch = launch
    M._precompile = plans.extend  # every launcher call hands its launch groups here first

    def bits(t):
        return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)

    g = torch.Generator().manual_seed(4)
    for dtype in (torch.float16,):  # (fp32 and bf16 only change the constants and the record value's dtype)
        assert P._run("merge", torch.device("cpu"), dtype).reason is None  # the probe's two groups, every launch
        # a model's aligned rank-8 LoRA (a third specialization) through every launch the engine makes
        jobs = [M.MergeJob((torch.randn(48, 64, generator=g) * 0.05).to(dtype), torch.randn(48, 8, generator=g),
                           torch.randn(8, 64, generator=g) * 0.2) for _ in range(3)]
        originals = [j.weight.clone() for j in jobs]
        cache = M.FuseCache()
        recs, _ = M.fuse(jobs, check_finite=True, abort_nonfinite=True, cache=cache)  # safe_fusing, first
        M.unfuse(jobs, recs)  # with the fuse's own table
        recs, _ = M.fuse(jobs, check_finite=True, abort_nonfinite=True, cache=cache)  # safe_fusing, cached
        M.unfuse(jobs, recs)
        recs, _ = M.fuse(jobs)  # plain fuse_lora
        M.unfuse([M.MergeJob(j.weight, j.up, j.down) for j in jobs], list(recs))  # records named per job
        for j, o in zip(jobs, originals):
            assert torch.equal(bits(j.weight), bits(o))
        M.fuse(jobs, record=False)  # lora-fast merge
    listed = {signature(a, k) for pl in plans for a, k in pl.variants()}
    assert launched == listed, (sorted(launched - listed, key=str)[:3], sorted(listed - launched, key=str)[:3])
    specs = {(pl.dtype, tuple(sorted(pl.spec.items()))) for pl in plans}
    assert len(specs) == 3, specs  # the probe's general and vector groups; the model's fp32 factors make a third
    print("VARIANTS-OK", len(listed))
"""


@exact_fma_interpreter
def test_the_variants_a_group_lists_are_the_launches_its_fuses_and_unfuses_make():
    run_script(VARIANTS_SCRIPT, "VARIANTS-OK", TRITON_INTERPRET="1")


COMPILE_SCRIPT = """
    import os, tempfile
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver, _async_compile as ac
    from lora_fast.kernels import merge as M

    class StandInDriver:  # what Triton's launcher asks a driver in warmup mode: the device, its stream, its target
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    driver.set_active(StandInDriver())
    kernel = M._triton_kernel()
    g = torch.Generator().manual_seed(0)
    jobs = [M.MergeJob(torch.randn(40, 64, generator=g).half(), torch.randn(40, 4, generator=g),
                       torch.randn(4, 64, generator=g))]
    launches = [v for pl in M._plans(jobs) for v in pl.variants()]
    assert len(launches) == 7
    args, kw = launches[0]
    broken = (args, dict(kw, BM=3))  # tl.arange over 3 elements: does not compile
    M._compile_ahead(ac, kernel, torch.device("cpu"), [broken] + launches, 2)
    assert ac.active_mode.get() is None
    cache = kernel.device_caches[0][0]
    assert len(cache) == 7, len(cache)
    assert all(type(k).__name__ == "CompiledKernel" and k.asm.get("cubin") for k in cache.values())
    for args, kw in launches:  # the launch sites' buffers (real tensors) find those compiles: nothing new
        real = [torch.empty(64, dtype=a) if isinstance(a, torch.dtype) else a for a in args]
        kernel.warmup(*real, grid=(1,), **M._COMPILE_OPTIONS, **kw)
    assert len(cache) == 7, len(cache)
    print("COMPILE-AHEAD-OK")
"""


def test_variants_compiled_ahead_in_threads_are_the_ones_the_launches_look_up():
    pytest.importorskip("triton.runtime._async_compile")
    run_script(COMPILE_SCRIPT, "COMPILE-AHEAD-OK", TRITON_INTERPRET="0")


def test_a_launch_groups_variants_are_compiled_ahead_once_per_process_and_the_switch_turns_it_off(monkeypatch):
    pytest.importorskip("triton.runtime._async_compile")
    calls = []
    monkeypatch.setattr(M, "_compile_ahead", lambda ac, kernel, device, launches, workers:
                        calls.append((device, len(launches), workers)))
    monkeypatch.setattr(M, "_precompiled", set())
    monkeypatch.setattr(M, "_triton_kernel", lambda: None)
    monkeypatch.setattr(M.os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    monkeypatch.delenv("LORA_FAST_PARALLEL_COMPILE", raising=False)

    def plans(factor_dtype):
        jobs = [M.MergeJob(torch.zeros(32, 64, dtype=torch.float16), torch.zeros(32, 4, dtype=factor_dtype),
                           torch.zeros(4, 64, dtype=factor_dtype))]
        pls = M._plans(jobs)
        for pl in pls:
            pl.device = torch.device("cuda", 1)  # as a GPU machine's plan (only CUDA launches are compiled ahead)
        return pls

    M._precompile(M._plans([M.MergeJob(torch.zeros(8, 8), torch.zeros(8, 1), torch.zeros(1, 8))]))
    assert calls == []  # CPU plans: nothing to compile
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    M._precompile(plans(f32))
    assert calls == [(torch.device("cuda", 1), 7, 7)]
    M._precompile(plans(f32) + plans(f32))
    assert len(calls) == 1  # compiled ahead already
    M._precompile(plans(f32) + plans(f16))  # other factor dtypes: another specialization, 7 more variants
    assert calls[1:] == [(torch.device("cuda", 1), 7, 7)]
    monkeypatch.setenv("LORA_FAST_PARALLEL_COMPILE", "0")
    M._precompile(plans(bf16))
    assert len(calls) == 2
