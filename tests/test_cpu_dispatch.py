"""Same bits on every x86-64 CPU: each check runs in a subprocess with the merge kernel's ISA forced (scalar, AVX2,
AVX-512, AVX-512 with the native bf16 rounding) and torch's own dispatch forced to what another CPU would get
(ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS; they must be set before torch is imported).

* Merge (fuse, records, flags, unfuse), C++ kernel and torch backend: the inputs come from an integer generator
  (no float math that could itself depend on the CPU) and the outputs must hash to one digest, the same at every
  level and for both backends, and the digest recorded here (so a CPU that rounds differently fails, wherever the
  suite runs). NaN payloads are not compared (see docs/fuse.md); NaN positions are.
* Segmented shrink/expand (torch backend, fp32) and the live path after fuse-on-load: their products go through
  torch's BLAS, whose summation order is the CPU's own, so no digest is promised; what is checked at every level is
  that strided, sliced or misaligned operands give the bits of contiguous, aligned ones, and that a streamed
  fuse-on-load + unfuse runs live exactly as a plain load.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from lora_fast import _C

# The digest of the merge worker's outputs (weights, flags, records) and of its inputs. Recorded on an Intel Xeon
# (AVX-512, avx512_fp16, avx512_bf16) at every forced level below; any CPU must reproduce it.
MERGE_DIGEST = "a297006f42ec033feeba18777376d5f8175c6d0859dd058d8469df461ae07ee1"
INPUT_DIGEST = "b67ae12878dd6ea7a7fbee156c698cba64dae83e9ec92ab62198145239ce24b0"

_TORCH_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
_TORCH_AVX512 = {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "MKL_ENABLE_INSTRUCTIONS": "AVX512"}
_TORCH_AVX512_BF16 = {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16",
                      "MKL_ENABLE_INSTRUCTIONS": "AVX512"}
_ISA_LEVEL = {"scalar": 1, "avx2": 2, "avx512": 3}

# (name, merge ISA, native bf16 rounding allowed, torch dispatch): an AVX2-only CPU (Haswell .. Zen 3), AVX-512
# without bf16 (Skylake-X), AVX-512 with bf16 but no fp16 (Zen 4), and this machine as it is.
PROFILES = [
    ("scalar", "scalar", False, _TORCH_AVX2),
    ("avx2", "avx2", False, _TORCH_AVX2),
    ("avx512", "avx512", False, _TORCH_AVX512),
    ("avx512_bf16", "avx512", True, _TORCH_AVX512_BF16),
    ("native", None, True, {}),
]

# what the worker scripts share (test_fp8's worker too): machine-independent random inputs, a fuse/unfuse digest
WORKER_COMMON = textwrap.dedent(
    r'''
    import json
    import numpy as np
    import torch
    from lora_fast.kernels import merge as M

    def rand_u64(n, seed):
        """splitmix64: n uint64 values, the same on every machine."""
        x = (np.arange(1, n + 1, dtype=np.uint64) + np.uint64(seed * 1000003)) * np.uint64(0x9E3779B97F4A7C15)
        z = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))

    def rand_f32(shape, seed, lo, hi):
        """fp32 values with random sign and mantissa and exponent fields in [lo, hi] (127 is 1.0)."""
        n = int(np.prod(shape))
        u = rand_u64(n, seed)
        exp = np.uint64(lo) + (u >> np.uint64(32)) % np.uint64(hi - lo + 1)
        b = ((u >> np.uint64(63)) << np.uint64(31)) | (exp << np.uint64(23)) | (u & np.uint64(0x7FFFFF))
        return torch.from_numpy(b.astype(np.uint32).view(np.int32)).view(torch.float32).reshape(shape).clone()

    def fuse_hash_unfuse(h, specs, backend, threads, canon):
        """Fuse [weight, up, down] specs (non-finite check on), hash the flags, fused bits and records (records of NaN
        weights depend on payloads: left out) into h, unfuse, and check every bit came back."""
        bases = [w.clone() for w, _, _ in specs]
        jobs = [M.MergeJob(w, up, down) for w, up, down in specs]
        recs, flags = M.fuse(jobs, check_finite=True, backend=backend, num_threads=threads)
        h.update(json.dumps(flags).encode())
        for job, rec, base in zip(jobs, recs, bases):
            h.update(canon(job.weight).numpy().tobytes())
            idx = rec.flat_index()
            keep = ~torch.isnan(base.reshape(-1)[idx].float())
            h.update(idx[keep].numpy().tobytes())
            h.update(canon(rec.value[keep]).numpy().tobytes())
        M.unfuse(jobs, recs, backend=backend, num_threads=threads)
        for job, base in zip(jobs, bases):
            assert torch.equal(job.weight.contiguous().view(torch.uint8), base.contiguous().view(torch.uint8)), \
                (backend, base.dtype, "unfuse did not restore every bit")
    '''
)

WORKER = WORKER_COMMON + textwrap.dedent(
    r'''
    import hashlib, os, sys
    from lora_fast.kernels import shrink_expand as S

    BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    out = {"capability": torch.backends.cpu.get_cpu_capability()}

    def weight(shape, dtype, seed):
        w = rand_f32(shape, seed, 117, 127).to(dtype)  # exact conversions: the fp32 values are rounded once
        flat = w.view(-1).view(BITS[dtype])
        info = torch.finfo(dtype)
        special = [float("inf"), float("-inf"), 0.0, -0.0, info.max, -info.max, info.tiny / 4, -info.tiny / 8]
        n = flat.numel()
        for i, v in enumerate(special):
            if 7 * i + 3 < n:
                w.view(-1)[7 * i + 3] = v
        if n > 40:  # NaNs of several payloads and signs
            nan = {torch.float32: [0x7FC00001, -0x003FFFFF, 0x7F800123], torch.float16: [0x7E01, -0x01FF, 0x7C33],
                   torch.bfloat16: [0x7FC1, -0x003F, 0x7F85]}[dtype]
            for i, v in enumerate(nan):
                flat[40 - 5 * i] = v
        return w

    def jobs_for(dtype, seed):
        """(weight view, up, down) triples: odd shapes, ranks 1..33, transposed and sliced views, a row wider than a
        record segment, factors whose products overflow or are subnormal, and a NaN factor."""
        specs = []
        for k, (rows, cols, r, lo, hi) in enumerate([(37, 83, 5, 112, 124), (64, 300, 1, 115, 125),
                                                      (5, 129, 33, 110, 122), (3, 65536 + 77, 2, 114, 124),
                                                      (9, 20, 3, 200, 254), (11, 17, 4, 1, 60)]):
            s = seed * 100 + 10 * k
            specs.append((weight((rows, cols), dtype, s), rand_f32((rows, r), s + 1, lo, hi),
                          rand_f32((r, cols), s + 2, lo, hi)))
        store = weight((53, 29), dtype, seed * 100 + 70)  # fan_in_fan_out: the job is the transpose
        specs.append((store.t(), rand_f32((29, 3), seed * 100 + 71, 112, 124), rand_f32((3, 53), seed * 100 + 72, 112, 124)))
        big = weight((31, 90), dtype, seed * 100 + 80)  # every other column of a larger tensor
        specs.append((big[:, ::2], rand_f32((31, 2), seed * 100 + 81, 112, 124), rand_f32((2, 45), seed * 100 + 82, 112, 124)))
        nan_up = rand_f32((13, 6), seed * 100 + 91, 112, 124)
        nan_up[4, 2] = float("nan")
        specs.append((weight((13, 21), dtype, seed * 100 + 90), nan_up, rand_f32((6, 21), seed * 100 + 92, 112, 124)))
        return specs

    def canon(t):
        """bits with every NaN written as one pattern (payloads are not compared)."""
        b = t.contiguous().view(BITS[t.dtype]).clone()
        b[torch.isnan(t.float())] = -1
        return b

    def merge_digest(backend, threads):
        h, h_in = hashlib.sha256(), hashlib.sha256()
        for seed, dtype in enumerate((torch.float32, torch.float16, torch.bfloat16)):
            specs = jobs_for(dtype, seed + 1)
            for w, up, down in specs:
                for t in (w, up, down):
                    h_in.update(canon(t).numpy().tobytes())
            fuse_hash_unfuse(h, specs, backend, threads, canon)
        return h.hexdigest(), h_in.hexdigest()

    digests = {}
    for backend, threads in (("cpu", 1), ("cpu", 2), ("cpu", 3), ("torch", None)):
        d, d_in = merge_digest(backend, threads)
        digests[f"{backend}-{threads}"] = d
        out["input_digest"] = d_in
    out["merge"] = digests

    # ------------------------------------------------------------------ shrink/expand: layout does not matter
    def same(a, b):
        return torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))

    def variants(t, seed):
        """t, then the same values as a column slice of a wider tensor, a column-major tensor and a tensor starting
        4 bytes past an aligned address."""
        rows, cols = t.shape
        wide = rand_f32((rows, cols + 7), seed, 120, 126)
        wide[:, 3:3 + cols] = t
        flat = torch.empty(t.numel() + 16)
        mis = flat[1:1 + t.numel()].view(rows, cols)
        mis.copy_(t)
        return [t.clone(), wide[:, 3:3 + cols], t.t().contiguous().t(), mis]

    k, n, t_rows = 40, 72, 2
    entries = [[], [(1, 1.0)], [(0, 0.0)], [(2, 0.5)], [(0, 0.25), (3, -0.75), (2, 1.5)], [(4, 1.0), (3, 1.0)],
               [(0, 0.0), (2, 1.0)]]
    ranks = [4, None, 17, 8, None]
    downs = [None if r is None else rand_f32((r, k), 300 + g, 118, 123) for g, r in enumerate(ranks)]
    ups = [None if r is None else rand_f32((n, r), 310 + g, 118, 123) for g, r in enumerate(ranks)]
    groups = S.make_groups(downs, ups, [1.0, 1.0, 0.5, 2.0, 1.0])
    rows = S.build_row_map(entries, len(entries), t_rows)
    m = len(entries) * t_rows
    x, base = rand_f32((m, k), 320, 118, 127), rand_f32((m, n), 321, 118, 127)
    expected = S.segmented_lora(x, base.clone(), groups, rows, backend="torch")
    bad = []
    for i, xv in enumerate(variants(x, 330)):
        for j, ov in enumerate(variants(base, 331)):
            got = S.segmented_lora(xv, ov, groups, rows, backend="torch")
            if not same(got, expected):
                bad.append(("segmented", i, j))
            if i == 0 and j != 2:  # lora_shrink + lora_expand one pass at a time (out: unit column stride)
                o2 = variants(base, 331)[j]
                h = S.lora_shrink(x, groups, rows, backend="torch")
                for p in range(len(rows.passes)):
                    S.lora_expand(o2, h, groups, rows, backend="torch", passes=[p])
                if not same(o2, expected):
                    bad.append(("shrink_expand", i, j))
    # factors that are views at odd addresses give the bits of fresh ones
    flat = torch.empty(sum(d.numel() for d in downs if d is not None) + 3)
    odd_downs, at = [], 1
    for d in downs:
        if d is None:
            odd_downs.append(None)
            continue
        v = flat[at:at + d.numel()].view(d.shape)
        v.copy_(d)
        odd_downs.append(v)
        at += d.numel()
    got = S.segmented_lora(x, base.clone(), S.make_groups(odd_downs, ups, [1.0, 1.0, 0.5, 2.0, 1.0]), rows, backend="torch")
    if not same(got, expected):
        bad.append(("factors", 0, 0))
    # channels-first (1x1 convolution layout)
    cf_rows = S.build_row_map([[(0, 1.0)], [(2, 0.5), (3, 1.0)], []], 3, 1)
    xc, oc = rand_f32((3, k, 10), 340, 118, 127), rand_f32((3, n, 10), 341, 118, 127)
    exp_c = S.channels_first_lora(xc, oc.clone(), groups, cf_rows)
    flat = torch.empty(oc.numel() + 8)
    oc_mis = flat[2:2 + oc.numel()].view(oc.shape)
    oc_mis.copy_(oc)
    xc_wide = rand_f32((3, k + 5, 10), 342, 118, 127)
    xc_wide[:, 2:2 + k] = xc
    got_c = S.channels_first_lora(xc_wide[:, 2:2 + k], oc_mis, groups, cf_rows)
    if not same(got_c, exp_c):
        bad.append(("channels_first", 0, 0))
    out["shrink_expand_bad"] = bad

    # ------------------------------------------------------------------ live after a streamed fuse-on-load + unfuse
    import tempfile
    from torch import nn
    import lora_fast
    from lora_fast import LoraAdapter, LoraLayer, fuse_on_load
    from lora_fast.engine import component_state

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(48, 40)
            self.b = nn.Linear(40, 33, bias=False)
            self.c = nn.Conv2d(3, 8, 3, padding=1)

        def forward(self, x, img):
            return self.b(self.a(x)), self.c(img)

    def net():
        model = Net()
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                p.copy_(rand_f32(p.shape, 400 + i, 118, 124))
        return model

    layers = {"a": LoraLayer(down=rand_f32((3, 48), 410, 118, 124), up=rand_f32((40, 3), 411, 118, 124), alpha=3.0),
              "b": LoraLayer(down=rand_f32((5, 40), 412, 118, 124), up=rand_f32((33, 5), 413, 118, 124), alpha=2.0),
              "c": LoraLayer(down=rand_f32((2, 3, 3, 3), 414, 118, 124), up=rand_f32((8, 2, 1, 1), 415, 118, 124),
                             alpha=2.0, kind="conv")}
    path = os.path.join(tempfile.mkdtemp(), "lora.safetensors")
    LoraAdapter(layers, "diffusers").save(path, format="diffusers")
    plain, streamed = net(), net()
    lora_fast.load_lora_weights(plain, path, "x")
    lora_fast.fuse_lora(plain, adapter_names=["x"])
    lora_fast.unfuse_lora(plain)
    fuse_on_load.load_and_fuse(streamed, path, "x", ring_bytes=4096, chunk_bytes=1024, threads=2)
    lora_fast.unfuse_lora(streamed)
    args = (rand_f32((4, 48), 420, 118, 127), rand_f32((2, 3, 6, 6), 421, 118, 127))
    with torch.no_grad():
        ya, yb = plain(*args), streamed(*args)
    out["live_equal"] = all(torch.equal(p, q) for p, q in zip(ya, yb))
    sp, ss = component_state(plain), component_state(streamed)
    out["live_layouts_equal"] = all(
        getattr(sp.slot_hooks["x"][p].slots["x"], f).data_ptr() % 64
        == getattr(ss.slot_hooks["x"][p].slots["x"], f).data_ptr() % 64
        for p in ("a", "b", "c") for f in ("down", "up"))
    print("RESULT " + json.dumps(out))
    '''
)


def _cpu_levels() -> list[str]:
    best = _C.merge_cpu_isa()
    return ["scalar", "avx2", "avx512"][: ["scalar", "avx2", "avx512"].index(best) + 1]


def _run(profile) -> dict:
    name, isa, bf16, torch_env = profile
    if isa is not None and isa not in _cpu_levels():
        pytest.skip(f"this CPU has no {isa}")
    env = {k: v for k, v in os.environ.items()
           if k not in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "LORA_FAST_MERGE_ISA",
                        "LORA_FAST_MERGE_NO_BF16", "LORA_FAST_MERGE_BACKEND", "LORA_FAST_SEGMENTED_BACKEND")}
    env.update(torch_env)
    if isa is not None:
        env["LORA_FAST_MERGE_ISA"] = str(_ISA_LEVEL[isa])
    if not bf16:
        env["LORA_FAST_MERGE_NO_BF16"] = "1"
    proc = subprocess.run([sys.executable, "-c", WORKER], capture_output=True, text=True, env=env, timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.parametrize("profile", PROFILES, ids=[p[0] for p in PROFILES])
def test_same_bits_at_every_forced_cpu_level(profile):
    out = _run(profile)
    want_cap = profile[3].get("ATEN_CPU_CAPABILITY")
    if want_cap:
        assert out["capability"].lower() == want_cap, out["capability"]  # torch honoured the forced level
    assert out["input_digest"] == INPUT_DIGEST, ("the generated inputs changed", out["input_digest"])
    for key, digest in out["merge"].items():
        assert digest == MERGE_DIGEST, (key, digest)
    assert out["shrink_expand_bad"] == [], out["shrink_expand_bad"]
    assert out["live_layouts_equal"] and out["live_equal"]
