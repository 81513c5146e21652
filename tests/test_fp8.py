"""fp8 base weights (torch.float8_e4m3fn, torch.float8_e5m2): the merge kernels round the exact sum once and encode
as torch's cast does, unfuse restores every byte, safe_fusing refuses a result beyond fp8's range, per-tensor scaled
checkpoints fuse in the dequantized domain, and live adapters on a diffusers layerwise-casted model run in its
compute dtype (docs/fuse.md, "fp8 weights").

Reference for the fuse: ``rn_fp8(W + delta)`` computed in float64 on the fp8 grid (nearest, ties to the even code;
e4m3fn beyond +-464 saturates to +-448 as torch 2.13's cast does, e5m2 from 61440 overflows to Inf), where ``delta``
is the kernels' fp32 FMA chain (checked elsewhere)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import lora_fast
from lora_fast import LoraAdapter, LoraFusionError, LoraLayer
from lora_fast import _C
from lora_fast.kernels import merge as M
import test_cpu_dispatch as D  # its forced-CPU-level launcher, profiles and random inputs serve the fp8 worker
from test_cpu_dispatch import PROFILES
from triton_support import exact_fma_interpreter

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8 = (E4M3, E5M2)
LAST = {E4M3: 0x7E, E5M2: 0x7B}  # largest finite code


def u8(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def _isas() -> list[int]:
    best = _C.merge_cpu_isa()
    return [1, 2, 3][: ["scalar", "avx2", "avx512"].index(best) + 1]


def rn_fp8(x: torch.Tensor, dtype: torch.dtype, nan_sign: torch.Tensor | None = None) -> torch.Tensor:
    """float64 -> fp8 codes (uint8), rounded once on the fp8 grid (see the module docstring)."""
    last = LAST[dtype]
    grid = torch.arange(last + 1, dtype=torch.int32).to(torch.uint8).view(dtype).double()
    a = x.abs()
    i = torch.searchsorted(grid, a.clamp(max=float(grid[-1])))
    hi = i.clamp(max=last)
    lo = (i - 1).clamp(min=0)
    dlo, dhi = a - grid[lo], grid[hi] - a
    code = torch.where((dhi < dlo) | ((dhi == dlo) & (hi % 2 == 0)), hi, lo)
    code = torch.where(a > grid[-1], last, code)  # between the largest value and the overflow threshold
    if dtype == E4M3:
        code = torch.where(a > 464.0, 0x7E, code)
    else:
        code = torch.where(a >= 61440.0, 0x7C, code)
    sign = torch.signbit(x) if nan_sign is None else torch.where(torch.isnan(x), nan_sign, torch.signbit(x))
    code = torch.where(torch.isnan(x), 0x7F, code)
    return (code | (sign.to(torch.int64) << 7)).to(torch.uint8)


def all_codes(rows: int, cols: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A weight holding every byte value (NaN and, for e5m2, Inf included) in a shuffled order."""
    g = torch.Generator().manual_seed(seed)
    n = rows * cols
    codes = torch.arange(n) % 256
    return codes[torch.randperm(n, generator=g)].to(torch.uint8).view(dtype).reshape(rows, cols).clone()


def factors(rows: int, cols: int, rank: int, seed: int, lo: float = -3.0, hi: float = 2.5):
    """up (rows, rank), down (rank, cols); row i's delta is scaled by 10^(lo + (hi - lo) i / rows): small moves,
    binade crossings and, at the end, overflow."""
    g = torch.Generator().manual_seed(seed)
    rowscale = 10.0 ** torch.linspace(lo, hi, rows)
    return (torch.randn(rows, rank, generator=g) * rowscale[:, None]).contiguous(), torch.randn(rank, cols, generator=g)


# ------------------------------------------------------------------------------------------- encoding = torch's cast


def _special_f32() -> torch.Tensor:
    """Bit patterns around every fp8 tie and boundary: each sign/exponent/top-mantissa prefix with the rounding
    bits just below, at and above half, random patterns, and the range and subnormal edges."""
    pre = torch.arange(1 << 12, dtype=torch.int64)  # sign, 8 exponent bits, top 3 mantissa bits (e4m3 position)
    tails = torch.tensor([0, 1, 0x7FFFF, 0x80000, 0x80001, 0xFFFFF], dtype=torch.int64)
    b43 = ((pre[:, None] << 20) | tails[None, :]).reshape(-1)
    pre2 = torch.arange(1 << 11, dtype=torch.int64)  # e5m2: 2 mantissa bits
    tails2 = torch.tensor([0, 1, 0xFFFFF, 0x100000, 0x100001, 0x1FFFFF], dtype=torch.int64)
    b52 = ((pre2[:, None] << 21) | tails2[None, :]).reshape(-1)
    g = torch.Generator().manual_seed(5)
    rnd = torch.randint(0, 1 << 32, (1 << 18,), generator=g, dtype=torch.int64)
    bits = torch.cat([b43, b52, rnd]) & 0xFFFFFFFF
    vals = torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32).view(torch.float32)
    edges = torch.tensor([448, 456, 464, 464.0001, 479.9, 480, 1e30, float("inf"), 57344, 61439.9, 61440, 65536,
                          2.0 ** -10, 2.0 ** -10 * 1.0001, 3 * 2.0 ** -11, 2.0 ** -17, 3 * 2.0 ** -18, 1e-45, float("nan")])
    return torch.cat([vals, edges, -edges])


@pytest.mark.parametrize("dtype", FP8, ids=["e4m3fn", "e5m2"])
def test_encoding_is_torchs_cast(dtype, monkeypatch):
    """The C++ kernel (every ISA) and the torch backend encode an fp32 value exactly as torch's ``.to(dtype)``:
    a zero fp8 weight plus a rank-1 delta ``1 · v`` is ``rn(v)`` (the sum is exact)."""
    v = _special_f32()
    v = torch.where(v == 0, torch.zeros_like(v), v)  # fma(1, -0, +0) is +0
    want = u8(v.to(dtype))
    assert torch.equal(u8(M._fp8_encode(v, dtype)), want)
    for isa in _isas():
        monkeypatch.setenv("LORA_FAST_MERGE_ISA", str(isa))
        w = torch.zeros(1, v.numel(), dtype=dtype)
        M.fuse([M.MergeJob(w, torch.ones(1, 1), v.reshape(1, -1).contiguous())], record=False, backend="cpu")
        bad = (u8(w).reshape(-1) != want).nonzero().reshape(-1)
        assert bad.numel() == 0, (isa, [(v[i].item(), int(u8(w).reshape(-1)[i]), int(want[i])) for i in bad[:5]])


def test_torch_cast_saturates_e4m3fn_and_overflows_e5m2():
    """What torch (2.13) does with values beyond fp8's range, which the kernels reproduce (documented)."""
    x = torch.tensor([465.0, 1e6, float("inf"), -float("inf"), float("nan"), 464.0])
    assert u8(x.to(E4M3)).tolist() == [0x7E, 0x7E, 0x7E, 0xFE, 0x7F, 0x7E]
    y = torch.tensor([61440.0, 1e6, float("inf"), float("nan"), 61439.0])
    assert u8(y.to(E5M2)).tolist() == [0x7C, 0x7C, 0x7C, 0x7F, 0x7B]


# ----------------------------------------------------------------------------------- fuse: exact, one rounding


@pytest.mark.parametrize("dtype", FP8, ids=["e4m3fn", "e5m2"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_fuse_is_the_exact_sum_rounded_once(dtype, backend, monkeypatch):
    """Every byte value as a weight, deltas from 1e-3 to 300: fused bytes == rn_fp8(W + delta) computed in float64,
    with every ISA; torch's own cast of the fp32 sum differs only where that sum landed exactly on an fp8 midpoint
    (the double rounding the kernels avoid); the flag is set exactly when a result is NaN/Inf or saturated."""
    rows, cols = 96, 520
    w0 = all_codes(rows, cols, dtype)
    up, down = factors(rows, cols, 3, seed=1)
    delta = M._torch_delta(M.MergeJob(w0.clone(), up, down))
    x64 = w0.double() + delta.double()
    want = rn_fp8(x64, dtype, nan_sign=torch.where(torch.isnan(w0.float()), torch.signbit(w0.float()), torch.signbit(x64)))
    runs = _isas() if backend == "cpu" else [0]
    for isa in runs:
        if isa:
            monkeypatch.setenv("LORA_FAST_MERGE_ISA", str(isa))
        w = w0.clone()
        recs, flags = M.fuse([M.MergeJob(w, up, down)], record=True, check_finite=True, backend=backend)
        assert torch.equal(u8(w), want), (backend, isa, int((u8(w) != want).sum()))
        bad = ((want & 0x7F) == 0x7F) if dtype == E4M3 else ((want & 0x7C) == 0x7C)
        if dtype == E4M3:
            bad = bad | (x64.abs() > 464)
        assert flags == [bool(bad.any())]
        M.unfuse([M.MergeJob(w, up, down)], recs, backend=backend)
        assert torch.equal(u8(w), u8(w0))
    # torch's cast of the fp32 sum: the same except on exact midpoints of an inexact fp32 add
    s32 = w0.float() + delta
    theirs = u8(s32.to(dtype))
    differ = theirs != want
    grid = torch.arange(LAST[dtype] + 1, dtype=torch.int32).to(torch.uint8).view(dtype).double()
    mids = (grid[1:] + grid[:-1]) / 2
    on_mid = torch.isin(s32.double().abs(), mids) & (s32.double() != x64)
    assert torch.equal(differ & ~torch.isnan(x64), on_mid & differ)


@pytest.mark.parametrize("dtype", FP8, ids=["e4m3fn", "e5m2"])
def test_many_random_cycles_restore_every_byte(dtype):
    """20 fuse/unfuse cycles of random adapters, scales and shapes (strided views too): every byte comes back."""
    g = torch.Generator().manual_seed(3)
    store = (torch.randn(64, 150, generator=g) * 3).to(dtype)
    base = u8(store).clone()
    views = [store[:40, :100], store[40:, :100:3], store[:, 100:].t()]  # disjoint
    for cycle in range(20):
        jobs = []
        for v in views:
            r = int(torch.randint(1, 9, (1,), generator=g))
            s = float(10 ** (torch.rand(1, generator=g) * 3 - 2))
            jobs.append(M.MergeJob(v, torch.randn(v.shape[0], r, generator=g) * s, torch.randn(r, v.shape[1], generator=g)))
        recs, _ = M.fuse(jobs, record=True)
        assert not torch.equal(u8(store), base)
        M.unfuse(jobs, recs)
        assert torch.equal(u8(store), base), cycle


TRITON_SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from lora_fast.kernels import merge as M
    import test_fp8 as T

    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        w0 = T.all_codes(40, 130, dtype, seed=2)
        up, down = T.factors(40, 130, 4, seed=4)
        st = T.all_codes(30, 70, dtype, seed=5)
        tv_up, tv_down = T.factors(35, 30, 2, seed=6)
        out = {}
        for be in ("cpu", "triton", "torch"):
            w, s2 = w0.clone(), st.clone()
            jobs = [M.MergeJob(w, up, down), M.MergeJob(s2[:, ::2].t(), tv_up, tv_down)]
            recs, flags = M.fuse(jobs, record=True, check_finite=True, backend=be)
            fused = (T.u8(w).clone(), T.u8(s2).clone())
            rec = [(r.flat_index(), T.u8(r.value)) for r in recs]
            M.unfuse(jobs, recs, backend=be)
            assert torch.equal(T.u8(w), T.u8(w0)) and torch.equal(T.u8(s2), T.u8(st)), be
            w3, s3 = w0.clone(), st.clone()
            plain, flags3 = M.fuse([M.MergeJob(w3, up, down), M.MergeJob(s3[:, ::2].t(), tv_up, tv_down)],
                                   record=False, backend=be)
            assert torch.equal(T.u8(w3), fused[0]) and torch.equal(T.u8(s3), fused[1]), be
            out[be] = (fused, flags, rec)
        for be in ("triton", "torch"):
            assert all(torch.equal(a, b) for a, b in zip(out[be][0], out["cpu"][0])), (be, dtype)
            assert out[be][1] == out["cpu"][1], (be, out[be][1], out["cpu"][1])
            for (i1, v1), (i2, v2) in zip(out[be][2], out["cpu"][2]):
                assert torch.equal(i1, i2) and torch.equal(v1, v2), (be, dtype)
        # safe_fusing: a job whose sum leaves the range is refused by the counting pass, nothing written
        big = torch.full((8, 64), 0x7E if dtype == torch.float8_e4m3fn else 0x7B, dtype=torch.uint8).view(dtype)
        before = T.u8(big).clone()
        kick = torch.zeros(1, 64)
        kick[0, 5] = 20.0 if dtype == torch.float8_e4m3fn else 8192.0
        recs, flags = M.fuse([M.MergeJob(big, torch.ones(8, 1), kick)], record=True, check_finite=True,
                             abort_nonfinite=True, backend="triton")
        assert flags == [True] and torch.equal(T.u8(big), before)
    print("FP8-TRITON-OK")
    """
)


@exact_fma_interpreter
def test_triton_interpreted_gives_the_cpu_kernels_bits():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", TRITON_SCRIPT], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0 and "FP8-TRITON-OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


# ------------------------------------------------------------------------- same bits at every forced CPU level

# Recorded on the Sapphire Rapids-class development machine at every forced level (C++ kernel, 1 and 2 threads, and
# the torch backend); any CPU must reproduce it.
FP8_DIGEST = "677d131d773b547188e4ad94d2e1e643d2abbcfa50bfc1084b8523d9ce420e82"

FP8_WORKER = D.WORKER_COMMON + textwrap.dedent(
    r'''
    import hashlib

    def weight(shape, dtype, seed):
        b = (rand_u64(int(np.prod(shape)), seed) & np.uint64(0xFF)).astype(np.uint8)
        return torch.from_numpy(b).view(dtype).reshape(shape).clone()

    def canon(t):  # NaN as one pattern (a NaN weight plus a NaN delta keeps either sign)
        b = t.contiguous().view(torch.uint8).clone()
        b[torch.isnan(t.float())] = 0xFF
        return b

    out = {"capability": torch.backends.cpu.get_cpu_capability(), "fp8": {}}
    for backend, threads in (("cpu", 1), ("cpu", 2), ("torch", None)):
        h = hashlib.sha256()
        for seed, dtype in enumerate((torch.float8_e4m3fn, torch.float8_e5m2)):
            specs = []
            for k, (rows, cols, r, lo, hi) in enumerate([(37, 83, 5, 112, 124), (64, 300, 1, 115, 127),
                                                          (5, 129, 33, 110, 122), (9, 20, 3, 125, 135)]):
                s = seed * 100 + 10 * k
                specs.append([weight((rows, cols), dtype, s), rand_f32((rows, r), s + 1, lo, hi),
                              rand_f32((r, cols), s + 2, lo, hi)])
            store = weight((53, 29), dtype, seed * 100 + 70)
            specs.append([store.t(), rand_f32((29, 3), seed * 100 + 71, 112, 124), rand_f32((3, 53), seed * 100 + 72, 112, 124)])
            specs[1][1][4, 0] = float("nan")
            fuse_hash_unfuse(h, specs, backend, threads, canon)
        out["fp8"][f"{backend}-{threads}"] = h.hexdigest()
    print("RESULT " + json.dumps(out))
    '''
)


def _fp8_dispatch_run(profile) -> dict:
    saved = D.WORKER
    D.WORKER = FP8_WORKER  # the same subprocess launcher and forced environment, another worker
    try:
        return D._run(profile)
    finally:
        D.WORKER = saved


@pytest.mark.parametrize("profile", PROFILES, ids=[p[0] for p in PROFILES])
def test_fp8_same_bits_at_every_forced_cpu_level(profile):
    out = _fp8_dispatch_run(profile)
    want_cap = profile[3].get("ATEN_CPU_CAPABILITY")
    if want_cap:
        assert out["capability"].lower() == want_cap, out["capability"]
    digests = set(out["fp8"].values())
    assert len(digests) == 1, out["fp8"]
    assert digests == {FP8_DIGEST}, out["fp8"]


# --------------------------------------------------------------------------------------- engine: fuse_lora


class Net(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(48, 40)
        self.b = nn.Linear(40, 33, bias=False)
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.e = nn.Embedding(11, 9)
        with torch.no_grad():
            for p in self.parameters():
                p.mul_(4.0)
        self.to(dtype)

    def forward(self, x):
        return self.b(self.a(x))


def adapter(seed: int, scale: float = 0.3, rank: int = 4) -> LoraAdapter:
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * scale

    return LoraAdapter({
        "a": LoraLayer(down=r(rank, 48), up=r(40, rank), alpha=2.0 * rank),
        "b": LoraLayer(down=r(rank, 40), up=r(33, rank), alpha=float(rank)),
        "c": LoraLayer(down=r(rank, 3, 3, 3), up=r(8, rank, 1, 1), alpha=float(rank), kind="conv"),
        "e": LoraLayer(down=r(rank, 11), up=r(9, rank), alpha=float(rank), kind="embedding"),
    }, "diffusers")


def state_bytes(model: nn.Module) -> dict:
    return {k: u8(v).clone() if v.dtype in FP8 else v.clone() for k, v in model.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def load(model, ad: LoraAdapter, name: str, tmp_path) -> None:
    path = tmp_path / f"{name}.safetensors"
    ad.save(str(path), format="diffusers")
    lora_fast.load_lora_weights(model, str(path), adapter_name=name)


def fused_weight_bytes(model) -> int:
    return sum(getattr(model, m).weight.numel() for m in "abce")  # one byte per fp8 element


@pytest.mark.parametrize("dtype", FP8, ids=["e4m3fn", "e5m2"])
def test_fuse_lora_cycles_exact_and_equal_to_the_reference(dtype, tmp_path):
    """fuse_lora on an fp8 model (Linear, conv, embedding; two weighted adapters): every fused weight is
    rn_fp8(W + delta) of the kernels' delta, and 10 fuse/unfuse cycles with changing weights restore every byte.
    The record is measured as a fraction of the fused weights' bytes."""
    model = Net(dtype)
    base = state_bytes(model)
    load(model, adapter(1), "x", tmp_path)
    load(model, adapter(2, scale=0.6), "y", tmp_path)
    g = torch.Generator().manual_seed(9)
    fractions = []
    for cycle in range(10):
        wx, wy = (float(v) for v in torch.rand(2, generator=g) * 1.5)
        lora_fast.fuse_lora(model, adapter_names=["x", "y"], adapter_weights=[wx, wy])
        fractions.append(lora_fast.engine.fused_record_bytes(model) / fused_weight_bytes(model))
        if cycle == 0:  # against a direct kernel job with the same factors
            for m in "abce":
                w0 = base[f"{m}.weight"].view(dtype)
                mod = getattr(model, m)
                ref = w0.clone()
                jobs = [lora_fast.engine.merge_job(_Stub(ref), [(lora_fast.engine.component_state(model).adapters[n][m].layer, f)
                                                                  for n, f in (("x", wx), ("y", wy))], _Step())]
                M.fuse(jobs, record=False)
                assert torch.equal(u8(mod.weight), u8(ref)), m
        lora_fast.unfuse_lora(model)
        assert same_state(state_bytes(model), base), cycle
    print(f"fp8 {dtype}: record {min(fractions):.3f}-{max(fractions):.3f} of the fused weights' bytes")
    assert 0 < max(fractions) < 3  # sparse-ish: fp8's coarse spacing makes misses frequent


class _Stub(nn.Module):
    """A module holding just a weight, for merge_job (same 2-D view rules as the real module)."""

    def __init__(self, w):
        super().__init__()
        self.weight = nn.Parameter(w, requires_grad=False)


class _Step:
    def __init__(self):
        self.staged = []


@pytest.mark.parametrize("dtype", FP8, ids=["e4m3fn", "e5m2"])
def test_safe_fusing_refuses_a_result_beyond_fp8s_range(dtype, tmp_path):
    """A weight at the largest finite value pushed further: safe_fusing raises LoraFusionError naming the layer and
    every byte is unchanged; without it e4m3fn saturates to +-448 (torch's cast), e5m2 becomes +-Inf, and unfuse
    restores every byte."""
    model = Net(dtype)
    with torch.no_grad():
        u8(model.b.weight)[3, :] = LAST[dtype]  # 448 / 57344
    base = state_bytes(model)
    ad = adapter(4, scale=0.1)
    ad.layers["b"].up[3] = 50.0 if dtype == E4M3 else 5000.0  # row 3 of b: a delta of 600 / 60000
    ad.layers["b"].down[:] = 3.0
    load(model, ad, "x", tmp_path)
    with pytest.raises(LoraFusionError, match="b"):
        lora_fast.fuse_lora(model, adapter_names=["x"], safe_fusing=True)
    assert same_state(state_bytes(model), base)
    lora_fast.fuse_lora(model, adapter_names=["x"])
    row = u8(model.b.weight)[3]
    assert torch.all(row == (0x7E if dtype == E4M3 else 0x7C))
    lora_fast.unfuse_lora(model)
    assert same_state(state_bytes(model), base)


# ---------------------------------------------------------------- live adapters on a diffusers layerwise-casted model


def _casted(unet):
    u = copy.deepcopy(unet)
    u.enable_layerwise_casting(storage_dtype=E4M3, compute_dtype=torch.bfloat16)
    return u


def _unet_lora_file(unet, directory) -> str:
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    src = copy.deepcopy(unet)
    src.add_adapter(LoraConfig(init_lora_weights=False, r=4, lora_alpha=8,
                               target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "proj_in"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in src.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    StableDiffusionPipeline.save_lora_weights(str(directory), unet_lora_layers=get_peft_model_state_dict(src))
    return os.path.join(str(directory), "pytorch_lora_weights.safetensors")


def test_live_on_layerwise_casted_unet_matches_peft(_sd15_template, tmp_path):
    """A tiny SD1.5 UNet with diffusers' enable_layerwise_casting(float8_e4m3fn storage, bf16 compute): lora_fast's
    live adapter keeps its factors in bf16 and runs its branch in bf16, as the casted layers compute; its output
    matches diffusers/PEFT's own LoRA on the same casted model (factors in bf16 too: PEFT would otherwise store them
    in fp8, and its conv branch then fails on the CPU) within bf16 tolerance, and is no further than PEFT's from an
    fp32 computation on the same fp8-rounded weights. fuse_lora on the casted model fuses into the fp8 storage, and
    unfuse_lora restores every byte."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions on a shared 2-core machine
    try:
        _live_casted(_sd15_template["unet"], tmp_path)
    finally:
        torch.set_num_threads(n)


def _live_casted(unet, tmp_path):
    path = _unet_lora_file(unet, tmp_path)
    g = torch.Generator().manual_seed(1)
    inp = dict(sample=torch.randn(1, 4, 8, 8, generator=g).bfloat16(), timestep=torch.tensor([500]),
               encoder_hidden_states=torch.randn(1, 7, 32, generator=g).bfloat16())

    theirs = _casted(unet)
    theirs.load_lora_adapter(path, adapter_name="a", prefix="unet")
    for name, mod in theirs.named_modules():
        if name.endswith(("lora_A.a", "lora_B.a")):
            mod.to(torch.bfloat16)
    ours = _casted(unet)
    lora_fast.load_lora_weights(ours, path, adapter_name="a")
    base = _casted(unet)
    with torch.no_grad():
        y_theirs, y_ours, y_base = (m(**inp).sample.float() for m in (theirs, ours, base))
    q = ours.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert q.weight.dtype == E4M3
    slot = lora_fast.engine.component_state(ours).slot_hooks["a"]
    slot = next(iter(slot.values())).slots["a"]
    assert slot.down.dtype == torch.bfloat16 and slot.up.dtype == torch.bfloat16

    # fp32 on the same fp8-rounded weights (the casted modules' parameters, upcast), PEFT LoRA in fp32
    ref = copy.deepcopy(unet)
    with torch.no_grad():
        for (_, m32), (_, mc) in zip(ref.named_modules(), base.named_modules()):
            reg = getattr(mc, "_diffusers_hook", None)
            if reg is not None and reg.get_hook("layerwise_casting") is not None:
                for p32, pc in zip(m32.parameters(recurse=False), mc.parameters(recurse=False)):
                    p32.copy_(pc.float())
    ref.load_lora_adapter(path, adapter_name="a", prefix="unet")
    with torch.no_grad():
        y_ref = ref(**{k: (v.float() if v.is_floating_point() else v) for k, v in inp.items()}).sample
    effect = float((y_ref - y_base).abs().max())
    assert effect > 0.1  # the adapter matters
    assert float((y_ours - y_theirs).abs().max()) <= 0.1 * effect
    assert float((y_ours - y_ref).abs().max()) <= float((y_theirs - y_ref).abs().max()) + 0.02 * effect

    before = state_bytes(ours)
    lora_fast.fuse_lora(ours, adapter_names=["a"])
    assert q.weight.dtype == E4M3
    with torch.no_grad():
        y_fused = ours(**inp).sample.float()
    assert float((y_fused - y_ref).abs().max()) <= 0.15 * effect  # fp8 rounding of the fused weights
    lora_fast.unfuse_lora(ours)
    assert same_state(state_bytes(ours), before)


# ---------------------------------------------------------------------------------- per-tensor scaled fp8 weights


class ScaledLinear(nn.Linear):
    """ComfyUI-style scaled fp8 layer: the payload in fp8, ``W_real = fp32(W) · scale_weight``, computed in bf16."""

    def forward(self, x):
        w = self.weight.to(torch.bfloat16) * self.scale_weight.to(torch.bfloat16)
        return nn.functional.linear(x.to(torch.bfloat16), w, None if self.bias is None else self.bias.to(torch.bfloat16))


class ScaledNet(nn.Module):
    def __init__(self, dtype, name="scale_weight", per_channel=False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = ScaledLinear(48, 40)
        self.b = ScaledLinear(40, 33, bias=False)
        with torch.no_grad():
            for m in (self.a, self.b):
                w = torch.randn(m.weight.shape, generator=g) * 0.05
                s = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().max()
                s = s / (448.0 if dtype == E4M3 else 57344.0)
                m.weight = nn.Parameter((w / s).to(dtype), requires_grad=False)
                m.register_parameter(name, nn.Parameter(s.float().reshape(-1) if per_channel else s.float(),
                                                        requires_grad=False))
                if name != "scale_weight":
                    m.scale_weight = getattr(m, name)  # the forward reads scale_weight

    def forward(self, x):
        return self.b(self.a(x).float())


@pytest.mark.parametrize("name", ["scale_weight", "weight_scale"])
@pytest.mark.parametrize("dtype", FP8, ids=["e4m3fn", "e5m2"])
def test_scaled_fp8_fuses_in_the_dequantized_domain(dtype, name, tmp_path):
    """W' = rn_fp8(W + delta / s): the adapter's scale λ·w·α/r is divided by the weight's scale s (float64) and
    rounded to fp32 by the kernel like any adapter scale; the scale tensor is unchanged; W'·s is W·s + Δ to within
    one fp8 rounding; unfuse restores every byte; the live branch (which never sees s) computes the same function."""
    model = ScaledNet(dtype, name)
    base = state_bytes(model)
    ad = adapter(5, scale=0.05)
    ad.layers = {k: ad.layers[k] for k in ("a", "b")}
    x = torch.randn(3, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = model(x)
    load(model, ad, "x", tmp_path)
    with torch.no_grad():
        live = model(x)
    lora_fast.fuse_lora(model, adapter_names=["x"], lora_scale=0.8)
    for m in "ab":
        mod, layer = getattr(model, m), ad.layers[m]
        s = float(getattr(mod, name))
        assert torch.equal(getattr(mod, name), base[f"{m}.{name}"])  # the scale stays
        w0 = base[f"{m}.weight"].view(dtype)
        c = torch.tensor(layer.scale * 0.8 / s, dtype=torch.float32)  # rn32(λ·α/r / s)
        up = (layer.up.float() * c).contiguous()
        delta = M._torch_delta(M.MergeJob(w0.clone(), up, layer.down.float().contiguous()))
        want = rn_fp8(w0.double() + delta.double(), dtype)
        assert torch.equal(u8(mod.weight), want), m
        real = mod.weight.double() * s
        exact = w0.double() * s + 0.8 * layer.scale * (layer.up.double() @ layer.down.double())
        spacing = (w0.double().abs() * s).clamp(min=s * 2.0 ** -6) * (2.0 ** -3 if dtype == E4M3 else 2.0 ** -2)
        assert bool(((real - exact).abs() <= spacing + exact.abs() * 2.0 ** -2).all())
    with torch.no_grad():
        fused = model(x)
    lora_fast.unfuse_lora(model)
    assert same_state(state_bytes(model), base)
    # the fused weights carry one fp8 rounding more than live (comparable to a small adapter's delta: see fuse.md)
    spacing = 2.0 ** -3 if dtype == E4M3 else 2.0 ** -2
    assert float((live.float() - plain.float()).abs().max()) > 0
    assert float((fused.float() - live.float()).abs().max()) <= spacing * float(live.float().abs().max())


def test_scaled_fp8_per_channel_scale_is_refused(tmp_path):
    model = ScaledNet(E4M3, "weight_scale", per_channel=True)
    base = state_bytes(model)
    ad = adapter(6)
    ad.layers = {k: ad.layers[k] for k in ("a", "b")}
    load(model, ad, "x", tmp_path)
    with pytest.raises(LoraFusionError, match="per-tensor"):
        lora_fast.fuse_lora(model, adapter_names=["x"])
    assert same_state(state_bytes(model), base)


def test_scaled_fp8_changed_scale_is_seen_by_a_repeated_fuse(tmp_path):
    """Changing the scale tensor in place between fuses: the next fuse uses the new scale. (A cached repeat, which
    holds 1/s in its jobs, is dropped through the scale's version; on the CPU, where the merge kernels keep no
    cache, every call rebuilds its jobs anyway, so this checks the behaviour, not the watch.)"""
    model, again = ScaledNet(E4M3), ScaledNet(E4M3)
    ad = adapter(7, scale=0.05)
    ad.layers = {k: ad.layers[k] for k in ("a", "b")}
    load(model, ad, "x", tmp_path)
    load(again, ad, "x", tmp_path)
    lora_fast.fuse_lora(model, adapter_names=["x"])
    lora_fast.unfuse_lora(model)
    with torch.no_grad():
        model.a.scale_weight.mul_(2.0)
        again.a.scale_weight.mul_(2.0)
    lora_fast.fuse_lora(model, adapter_names=["x"])
    lora_fast.fuse_lora(again, adapter_names=["x"])  # a first fuse with the new scale
    assert torch.equal(u8(model.a.weight), u8(again.a.weight))
