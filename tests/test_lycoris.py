"""LyCORIS LoHa, LoKr (whole, decomposed, Tucker) and full diffs: reading kohya-style files, the delta against the
``lycoris-lora`` package's own weight computation, PEFT's LoHa/LoKr where the conventions agree, and float64 first
principles (tests/lora_reference.py); the merge kernels' terms (C++ every ISA, torch, Triton interpreted) bit for
bit, exact unfuse, several adapters mixed in one pass."""

from __future__ import annotations

import math
import os
from fractions import Fraction

import numpy as np

import pytest
import torch
import torch.nn as nn

from lora_fast.adapter import LoraLayer
from lora_fast.errors import LoraFormatError
from lora_fast.formats.kohya import read_kohya
from lora_fast.kernels import merge as mk

from lora_reference import lycoris_delta64, lycoris_scale

lycoris = pytest.importorskip("lycoris", reason="the lycoris-lora package (dev extra) is the oracle")
from lycoris.modules.full import FullModule  # noqa: E402
from lycoris.modules.loha import LohaModule  # noqa: E402
from lycoris.modules.lokr import LokrModule  # noqa: E402

# SD1.5 kohya module names and their weights' shapes
Q = ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", (320, 320))
CONV = ("lora_unet_down_blocks_0_resnets_0_conv1", (320, 320, 3, 3))
PROJ = ("lora_unet_down_blocks_0_attentions_0_proj_in", (320, 320, 1, 1))
TE = ("lora_te_text_model_encoder_layers_0_mlp_fc1", (3072, 768))
KEYS = {Q[0]: "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        CONV[0]: "unet.down_blocks.0.resnets.0.conv1",
        PROJ[0]: "unet.down_blocks.0.attentions.0.proj_in",
        TE[0]: "text_encoder.text_model.encoder.layers.0.mlp.fc1"}


def _module(shape):
    if len(shape) == 4:
        return nn.Conv2d(shape[1], shape[0], shape[2:], bias=True)
    return nn.Linear(shape[1], shape[0], bias=True)


def lyco(cls, target, seed=0, std=0.2, dtype=torch.float32, **kw):
    """(state dict under the kohya name, LyCORIS' own ΔW (its forward pass: scale once), the module)."""
    name, shape = target
    torch.manual_seed(seed)
    m = cls(name, _module(shape), 1.0, **kw)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 0:
                p.normal_(0.0, std)
    oracle = None if cls is FullModule else m.get_weight(m.shape).detach().reshape(shape)
    sd = {f"{name}.{k}": v.detach().clone().to(dtype) if v.is_floating_point() and v.dim() else v.detach().clone()
          for k, v in m.state_dict().items()}
    if oracle is None:  # full: LyCORIS writes diff = trained weight - original weight, and adds it at strength 1
        oracle = sd[f"{name}.diff"].clone()
    return sd, oracle, m


CASES = {
    "loha_linear": (LohaModule, Q, dict(lora_dim=4, alpha=2.0)),
    "loha_conv": (LohaModule, CONV, dict(lora_dim=4, alpha=8.0)),
    "loha_tucker": (LohaModule, CONV, dict(lora_dim=4, alpha=3.0, use_tucker=True)),
    "loha_1x1": (LohaModule, PROJ, dict(lora_dim=8, alpha=4.0)),
    "lokr_w2_lowrank": (LokrModule, Q, dict(lora_dim=4, alpha=2.0)),
    "lokr_both_lowrank": (LokrModule, TE, dict(lora_dim=4, alpha=3.0, decompose_both=True)),
    "lokr_whole": (LokrModule, Q, dict(lora_dim=64, alpha=7.0, full_matrix=True)),
    "lokr_conv": (LokrModule, CONV, dict(lora_dim=4, alpha=2.0)),
    "lokr_tucker": (LokrModule, CONV, dict(lora_dim=4, alpha=2.0, use_tucker=True)),
    "lokr_factor8": (LokrModule, TE, dict(lora_dim=4, alpha=1.0, factor=8)),
    "full": (FullModule, Q, dict()),
    "full_conv": (FullModule, CONV, dict()),
}


def _read(sd) -> dict:
    return read_kohya(sd, source="t.safetensors").layers


@pytest.mark.parametrize("case", sorted(CASES))
def test_delta_matches_lycoris_and_float64(case):
    cls, target, kw = CASES[case]
    sd, oracle, m = lyco(cls, target, **kw)
    layer = _read(sd)[KEYS[target[0]]]
    assert layer.algorithm == {"LohaModule": "loha", "LokrModule": "lokr", "FullModule": "full"}[cls.__name__]
    assert layer.weight_shape == target[1] and layer.fits_weight(target[1])
    if cls is not FullModule:
        assert lycoris_scale(layer) == pytest.approx(m.scale, rel=1e-7)
        assert layer.scale == lycoris_scale(layer)
    ref = lycoris_delta64(layer)
    tol = 1e-6 * ref.abs().max().item()
    assert (layer.delta().double() - ref).abs().max().item() <= tol
    assert (oracle.double() - ref).abs().max().item() <= 5 * tol  # LyCORIS computes in fp32 its own way
    if case == "lokr_whole":
        assert layer.scale == 1.0 and layer.alpha != layer.rank  # LyCORIS: both halves whole means scale 1


def test_scale_rules():
    sd, _, _ = lyco(LohaModule, Q, lora_dim=4, alpha=2.0)
    sd[f"{Q[0]}.alpha"] = torch.tensor(0.0)  # alpha 0 means alpha = r
    assert _read(sd)[KEYS[Q[0]]].scale == 1.0
    del sd[f"{Q[0]}.alpha"]  # missing alpha too
    assert _read(sd)[KEYS[Q[0]]].scale == 1.0
    sd[f"{Q[0]}.alpha"] = torch.tensor(0.3, dtype=torch.float16)  # stored alpha used as stored
    assert _read(sd)[KEYS[Q[0]]].scale == 0.300048828125 / 4
    sd, _, _ = lyco(LokrModule, Q, lora_dim=4, alpha=6.0)  # W1 whole, W2 low-rank: alpha / r
    layer = _read(sd)[KEYS[Q[0]]]
    assert "lokr_w1" in layer.lycoris and "lokr_w2_a" in layer.lycoris and layer.scale == 6.0 / 4


def test_dora_scale_read_and_delta_unchanged():
    sd, oracle, m = lyco(LohaModule, Q, lora_dim=4, alpha=2.0, weight_decompose=True)
    layer = _read(sd)[KEYS[Q[0]]]
    assert layer.magnitude is not None and layer.magnitude_axis == "out"  # LyCORIS' default wd_on_out
    from lora_fast.live import dora_weight

    w = m.org_weight.detach().clone() if hasattr(m, "org_weight") else None
    if w is not None:  # LyCORIS' merged DoRA weight: W' = (W + ΔW)·dora_scale/‖W + ΔW‖_row
        v = w.double() + lycoris_delta64(layer)
        want = v * (layer.magnitude.double().reshape(-1, 1) / v.norm(dim=1, keepdim=True))
        got = dora_weight(w, layer, 1.0)
        assert (got.double() - want).abs().max().item() < 1e-5


def test_peft_loha_and_lokr_agree_where_conventions_match():
    peft = pytest.importorskip("peft")
    from peft import LoHaConfig, LoKrConfig, get_peft_model

    sd, _, _ = lyco(LohaModule, Q, lora_dim=4, alpha=2.0)
    layer = _read(sd)[KEYS[Q[0]]]
    model = get_peft_model(nn.Sequential(nn.Linear(320, 320)), LoHaConfig(r=4, alpha=2.0, target_modules=["0"]))
    lm = model.base_model.model[0]
    with torch.no_grad():
        for n in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
            getattr(lm, n)["default"].copy_(layer.lycoris[n])
    d = lm.get_delta_weight("default")
    assert (d.double() - lycoris_delta64(layer)).abs().max().item() < 1e-6 * d.abs().max().item() + 1e-12
    # LoKr with a decomposed W2 (both use alpha / r there; with both halves whole PEFT still scales by alpha / r and
    # LyCORIS by 1, so PEFT is no oracle for that case)
    sd, _, _ = lyco(LokrModule, Q, lora_dim=4, alpha=6.0)
    layer = _read(sd)[KEYS[Q[0]]]
    w1, w2a, w2b = (layer.lycoris[n] for n in ("lokr_w1", "lokr_w2_a", "lokr_w2_b"))
    model = get_peft_model(nn.Sequential(nn.Linear(320, 320)), LoKrConfig(r=4, alpha=6.0, target_modules=["0"]))
    lm = model.base_model.model[0]
    if tuple(lm.lokr_w1["default"].shape) != tuple(w1.shape) or "default" not in lm.lokr_w2_a:
        pytest.skip(f"PEFT {peft.__version__} factorizes 320 differently")
    with torch.no_grad():
        lm.lokr_w1["default"].copy_(w1)
        lm.lokr_w2_a["default"].copy_(w2a)
        lm.lokr_w2_b["default"].copy_(w2b)
    d = lm.get_delta_weight("default")
    assert (d.double() - lycoris_delta64(layer)).abs().max().item() < 1e-6 * d.abs().max().item()


@pytest.mark.parametrize("mutate, message", [
    (lambda sd: sd.pop(f"{Q[0]}.hada_w2_b"), "has no"),
    (lambda sd: sd.__setitem__(f"{Q[0]}.hada_w1_b", torch.zeros(4, 321)), "different weights"),
    (lambda sd: sd.__setitem__(f"{Q[0]}.hada_w2_b", torch.zeros(4, 321)), "different weights"),
    (lambda sd: sd.__setitem__(f"{Q[0]}.hada_w1_a", torch.zeros(320, 5)), "rank mismatch"),
    (lambda sd: sd.__setitem__(f"{Q[0]}.hada_w1_a", torch.zeros(320, 4, dtype=torch.int32)), "floating-point"),
    (lambda sd: sd.__setitem__(f"{Q[0]}.lora_down.weight", torch.zeros(4, 320)), "mixes LoRA tensors"),
    (lambda sd: sd.__setitem__(f"{Q[0]}.lokr_w1", torch.zeros(4, 4)), "mixes LyCORIS algorithms"),
    (lambda sd: sd.__setitem__(f"{Q[0]}.hada_t1", torch.zeros(4, 4, 3, 3)), "both hada_t1 and hada_t2"),
])
def test_malformed_loha_is_refused_naming_file_and_key(mutate, message):
    sd, _, _ = lyco(LohaModule, Q, lora_dim=4, alpha=2.0)
    mutate(sd)
    with pytest.raises(LoraFormatError, match=message) as err:
        _read(sd)
    assert "t.safetensors" in str(err.value)


def test_shape_mismatch_with_the_module_is_refused():
    # a full-size SD1.5 file (to_q fits) whose attn1.to_k (320x320) carries a 320x768 LoKr
    sd, _, _ = lyco(LohaModule, Q, lora_dim=4, alpha=2.0)
    bad, _, _ = lyco(LokrModule, (Q[0].replace("to_q", "to_k"), (320, 768)), lora_dim=4, alpha=2.0)
    with pytest.raises(LoraFormatError, match="imply a weight of shape"):
        _read({**sd, **bad})


# ---------------------------------------------------------------------------------------------- merge kernels


def _terms_job(dt, rows=40, cols=66, lora=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    w = r(rows, cols).to(dt)
    terms = [mk.Term("hada", r(rows, 3), r(rows, 5), r(3, cols).half(), r(5, cols), scale=0.3),
             mk.Term("kron", r(rows // 8, cols // 11), r(8, 11).bfloat16(), scale=1.7),
             mk.Term("kron", torch.ones(1, 1), (r(rows, cols) * 0.1).half(), scale=0.25)]
    factors = [mk.Factor.of(r(rows, 4), r(4, cols), 0.5)] if lora else None
    return w, terms, factors


def _bits(t):
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


def _rn32(x: Fraction) -> float:
    """x rounded to the nearest float32 (ties to even), exactly (no double rounding)."""
    c = np.float32(float(x))
    cands = [np.nextafter(c, np.float32(-np.inf)), c, np.nextafter(c, np.float32(np.inf))]
    best = min(cands, key=lambda f: (abs(Fraction(float(f)) - x), int(np.array(f).view(np.int32)) & 1))
    return float(best)


def _fma32(a: float, b: float, c: float) -> float:
    return _rn32(Fraction(a) * Fraction(b) + Fraction(c))


def _chain_reference(w, terms, factors):
    """The kernels' arithmetic written out per element in exact rationals: the LoRA chain, then per term
    fma(rn32(u·rn32(s)), v, acc), one rounding of fp32(W) + acc to the weight dtype."""
    s32 = lambda x: float(torch.tensor(x, dtype=torch.float32))  # noqa: E731
    rows, cols = w.shape
    acc = torch.zeros(rows, cols, dtype=torch.float32)
    ups = []
    for f in factors or []:
        b_, a_ = f.matrices(rows, cols)
        ups.append(((b_.float() * f.scale).tolist(), a_.float().tolist()))
    tl = [(t.kind, t.u.float().tolist(), t.v.float().tolist(), None if t.ub is None else t.ub.float().tolist(),
           None if t.vb is None else t.vb.float().tolist(), s32(t.scale), tuple(t.v.shape)) for t in terms]
    for i in range(rows):
        for j in range(cols):
            a = 0.0
            for b_, a_ in ups:
                for k in range(len(a_)):
                    a = _fma32(b_[i][k], a_[k][j], a)
            for kind, u_, v_, ub_, vb_, sc, (vm, vn) in tl:
                if kind == "hada":
                    u = v = 0.0
                    for k in range(len(ub_)):
                        u = _fma32(u_[i][k], ub_[k][j], u)
                    for k in range(len(vb_)):
                        v = _fma32(v_[i][k], vb_[k][j], v)
                else:
                    u, v = u_[i // vm][j // vn], v_[i % vm][j % vn]
                a = _fma32(_rn32(Fraction(u) * Fraction(sc)), v, a)
            acc[i, j] = a
    return (w.float() + acc).to(w.dtype)


def test_terms_match_the_per_element_reference():
    w, terms, factors = _terms_job(torch.bfloat16, rows=16, cols=22)
    want = _chain_reference(w, terms, factors)
    ww = w.clone()
    mk.fuse([mk.MergeJob(ww, factors=factors, terms=terms)], backend="cpu")
    assert torch.equal(_bits(ww), _bits(want))


@pytest.mark.parametrize("dt", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lora", [True, False])
def test_terms_same_bits_every_isa_and_torch_and_unfuse_exact(dt, lora, monkeypatch):
    w, terms, factors = _terms_job(dt, lora=lora)
    results = {}
    for be, isa in (("cpu", "1"), ("cpu", "2"), ("cpu", "3"), ("cpu", "0"), ("torch", "0")):
        monkeypatch.setenv("LORA_FAST_MERGE_ISA", isa)
        ww = w.clone()
        job = mk.MergeJob(ww, factors=factors, terms=terms)
        recs, flags = mk.fuse([job], backend=be, check_finite=True)
        assert flags == [False]
        results[(be, isa)] = ww.clone()
        mk.unfuse([job], recs, backend=be)
        assert torch.equal(_bits(ww), _bits(w)), (be, isa)
    first = next(iter(results.values()))
    for k, v in results.items():
        assert torch.equal(_bits(v), _bits(first)), k
    # and it is the delta: close to the float64 value of the same terms
    d64 = torch.zeros(w.shape, dtype=torch.float64)
    for t in terms:
        if t.kind == "hada":
            d64 += (t.u.double() @ t.ub.double()) * (t.v.double() @ t.vb.double()) * t.scale
        else:
            d64 += torch.kron(t.u.double(), t.v.double()) * t.scale
    if factors:
        b, a = factors[0].matrices(*w.shape)
        d64 += b.double() @ a.double() * factors[0].scale
    want = (w.double() + d64)
    ulp = {torch.float32: 2 ** -23, torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7}[dt]
    assert ((first.double() - want).abs() <= want.abs() * ulp + d64.abs().max() * 1e-5 + 1e-6).all()


def test_nonfinite_term_is_flagged_and_aborted_untouched():
    w, terms, factors = _terms_job(torch.float16)
    terms[1].v[0, 0] = float("inf")
    ww = w.clone()
    recs, flags = mk.fuse([mk.MergeJob(ww, factors=factors, terms=terms)], backend="cpu", abort_nonfinite=True)
    assert flags == [True] and torch.equal(_bits(ww), _bits(w))


def test_bad_term_shapes_are_refused():
    w = torch.zeros(8, 12)
    with pytest.raises(ValueError, match="does not give"):
        mk.fuse([mk.MergeJob(w, terms=[mk.Term("kron", torch.ones(3, 3), torch.ones(3, 4))])], backend="cpu")
    with pytest.raises(ValueError, match="does not give"):
        mk.fuse([mk.MergeJob(w, terms=[mk.Term("hada", torch.ones(8, 2), torch.ones(8, 2), torch.ones(2, 12),
                                                torch.ones(3, 12))])], backend="cpu")


# ---------------------------------------------------------------------------------------------- end to end


def _tiny_file(comps, seed=0):
    """A kohya-style file on the tiny SD1.5 components: LoHa (to_q), Tucker LoKr (conv1), full diff (to_k), a LoRA
    (to_v) and a LoHa with DoRA on the text encoder; with their module keys."""
    from lora_fast.formats.kohya import kohya_module_name

    unet, te = comps["unet"], comps["text_encoder"]
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
    plan = [
        ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", attn.to_q, LohaModule,
         dict(lora_dim=2, alpha=1.0)),
        ("unet.down_blocks.0.resnets.0.conv1", unet.down_blocks[0].resnets[0].conv1, LokrModule,
         dict(lora_dim=2, alpha=1.0, use_tucker=True, factor=4)),
        ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k", attn.to_k, FullModule, dict()),
        ("text_encoder.text_model.encoder.layers.0.mlp.fc1",
         next(m for n, m in te.named_modules() if n.endswith("encoder.layers.0.mlp.fc1")), LohaModule,
         dict(lora_dim=2, alpha=2.0, weight_decompose=True)),
    ]
    sd = {}
    torch.manual_seed(seed)
    for key, module, cls, kw in plan:
        name = kohya_module_name(key, "sd15")
        m = cls(name, module, 1.0, **kw)
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() > 0:
                    p.normal_(0.0, 0.05)
        sd.update({f"{name}.{k}": v.detach().clone() for k, v in m.state_dict().items()})
        m.restore() if hasattr(m, "restore") else None
    name = kohya_module_name("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v", "sd15")
    w = attn.to_v.weight
    sd[f"{name}.lora_down.weight"] = torch.randn(2, w.shape[1]) * 0.05
    sd[f"{name}.lora_up.weight"] = torch.randn(w.shape[0], 2) * 0.05
    sd[f"{name}.alpha"] = torch.tensor(1.0)
    return sd


def _weights(comps):
    return {f"{c}.{n}": p.detach().clone() for c, m in comps.items() for n, p in m.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_live_fuse_unfuse_end_to_end(sd15, dtype):
    import lora_fast

    sd = _tiny_file(sd15)
    comps = {c: m.to(dtype) for c, m in sd15.items()}
    adapter = read_kohya(sd, source="lyco.safetensors")
    algos = {k: l.algorithm for k, l in adapter.layers.items()}
    assert sorted(algos.values()) == ["full", "lokr", "lora", "loha", "loha"] or sorted(algos.values()) == sorted(
        ["loha", "lokr", "full", "loha", "lora"])
    before = _weights(comps)
    lora_fast.load_lora_weights(comps, adapter, adapter_name="lyco")
    # live: the module's output is the base output plus the layer's delta applied
    q = comps["unet"].down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    x = torch.randn(3, q.in_features).to(dtype)
    layer = adapter.layers["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    want = torch.nn.functional.linear(x.float(), q.weight.float() + lycoris_delta64(layer).float(), None if q.bias is None else q.bias.float())
    got = q(x).float()
    assert (got - want).abs().max().item() < (1e-4 if dtype == torch.float32 else 5e-2)
    # fuse: every weight is rn(W + ΔW) (float64 reference within the fp32 accumulation), unfuse gives the bits back
    lora_fast.fuse_lora(comps, safe_fusing=True)
    for key, l in adapter.layers.items():
        if l.magnitude is not None:  # DoRA: not additive (checked by the live/dora tests)
            continue
        comp, path = key.split(".", 1)
        mod = comps[comp].get_submodule(path)
        w0 = before[f"{comp}.{path}.weight"].double()
        d = lycoris_delta64(l) if l.algorithm != "lora" else (l.up.double() @ l.down.double()) * l.scale
        want = (w0 + d.reshape(w0.shape))
        ulp = {torch.float32: 2 ** -23, torch.bfloat16: 2 ** -7}[dtype]
        err = (mod.weight.double() - want).abs() - want.abs() * ulp - 1e-6
        assert err.max().item() <= 0, key
    lora_fast.unfuse_lora(comps)
    after = _weights(comps)
    for k, v in before.items():
        assert torch.equal(v.view(torch.int16) if v.dtype != torch.float32 else v.view(torch.int32),
                           after[k].view(torch.int16) if v.dtype != torch.float32 else after[k].view(torch.int32)), k


def test_mixed_lora_and_loha_adapters_fuse_in_one_pass(sd15):
    import lora_fast
    from lora_fast.adapter import LoraAdapter

    sd = _tiny_file(sd15)
    lyco_adapter = read_kohya(sd, source="lyco.safetensors")
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    q = sd15["unet"].get_submodule(key.split(".", 1)[1])
    g = torch.Generator().manual_seed(3)
    plain = LoraAdapter({key: LoraLayer(down=torch.randn(3, q.in_features, generator=g) * 0.1,
                                        up=torch.randn(q.out_features, 3, generator=g) * 0.1, alpha=3.0)}, "diffusers")
    w0 = q.weight.detach().clone()
    lora_fast.load_lora_weights(sd15, lyco_adapter, adapter_name="lyco")
    lora_fast.load_lora_weights(sd15, plain, adapter_name="plain")
    calls = []
    orig = mk.fuse

    def spy(jobs, **kw):
        calls.append(len(jobs))
        return orig(jobs, **kw)

    mk.fuse = spy
    try:
        lora_fast.fuse_lora(sd15, adapter_names=["lyco", "plain"], adapter_weights=[0.5, 2.0])
    finally:
        mk.fuse = orig
    assert len(calls) == 1  # one kernel call for every weight of both adapters
    d = 0.5 * lycoris_delta64(lyco_adapter.layers[key]) + 2.0 * (
        plain.layers[key].up.double() @ plain.layers[key].down.double())
    assert (q.weight.double() - (w0.double() + d)).abs().max().item() < 1e-5
    lora_fast.unfuse_lora(sd15)
    assert torch.equal(q.weight.detach().view(torch.int32), w0.view(torch.int32))


def test_convert_kohya_bit_exact_and_diffusers_refused_or_approximated(tmp_path, sd15):
    from safetensors.torch import load_file, save_file

    from lora_fast.cli import main

    sd = _tiny_file(sd15)
    src = tmp_path / "lyco.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(src))
    out = tmp_path / "back.safetensors"
    assert main(["convert", str(src), str(out), "--to", "kohya"]) == 0
    back = load_file(str(out))
    for k, v in sd.items():
        if k.endswith(".alpha"):
            assert float(back[k]) == float(v)
        else:
            assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    with pytest.raises(LoraFormatError, match="cannot hold exactly"):
        read_kohya(sd).save(str(tmp_path / "d.safetensors"), format="diffusers")
    assert main(["convert", str(src), str(tmp_path / "d.safetensors"), "--to", "diffusers"]) != 0
    assert main(["convert", str(src), str(tmp_path / "d.safetensors"), "--to", "diffusers", "--approx-rank", "2"]) != 0
    save_file({k: v.contiguous() for k, v in sd.items() if not k.startswith("lora_te_")}, str(src))  # no DoRA
    assert main(["convert", str(src), str(tmp_path / "d.safetensors"), "--to", "diffusers", "--approx-rank", "2",
                 "--overwrite"]) == 0
    from lora_fast.formats.lycoris import approximate_lora

    full_rank, errors = approximate_lora(read_kohya(load_file(str(src))), 10 ** 6)  # rank >= min(out, in): exact
    assert max(errors.values()) < 1e-6 and all(l.algorithm == "lora" for l in full_rank.layers.values())


def test_inspect_names_the_algorithm_per_module(tmp_path, sd15, capsys):
    from safetensors.torch import save_file

    from lora_fast.cli import inspect_adapter, main

    sd = _tiny_file(sd15)
    src = tmp_path / "lyco.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(src))
    info = inspect_adapter(str(src))
    assert info["module_algorithms"]["unet.down_blocks.0.resnets.0.conv1"] == "lokr"
    assert info["algorithms"] == {"loha": 2, "lokr": 1, "full": 1, "lora": 1} or sum(info["algorithms"].values()) == 5
    assert main(["inspect", str(src)]) == 0
    text = capsys.readouterr().out
    assert "lokr" in text and "unet.down_blocks.0.resnets.0.conv1" in text
