"""LyCORIS LoHa / LoKr / full-diff modules in kohya files of the table-driven transformer families (Flux.1, SD3):
one-to-one modules, fused projections split by output rows (qkv, linear1, the swapped adaLN), reading against a
float64 reference of the unsplit module's delta, fusing on tiny models, writing back to kohya, and the refusals."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

import lora_fast  # noqa: E402
from lora_fast.errors import LoraFormatError  # noqa: E402
from lora_fast.formats.flux import read_flux, write_flux_kohya  # noqa: E402
from lora_fast.formats.fused import read_fused, write_fused_kohya  # noqa: E402
from lora_fast.formats.sd3 import SD3  # noqa: E402
from lora_fast.models import build_flux_transformer, build_sd3_transformer  # noqa: E402

from lora_reference import lycoris_delta64  # noqa: E402


def _g(seed):
    return torch.Generator().manual_seed(seed)


def loha(name, out, inp, r=3, alpha=2.0, seed=0, dtype=torch.float32):
    g = _g(seed)
    r_ = lambda *s: (torch.randn(*s, generator=g) * 0.3).to(dtype)  # noqa: E731
    return {f"{name}.hada_w1_a": r_(out, r), f"{name}.hada_w1_b": r_(r, inp), f"{name}.hada_w2_a": r_(out, r),
            f"{name}.hada_w2_b": r_(r, inp), f"{name}.alpha": torch.tensor(alpha)}


def lokr(name, out, inp, a, b, r=2, alpha=1.0, seed=0, dtype=torch.float32):
    """W1 (a, b) whole, W2 (out / a, inp / b) as a rank-r product."""
    g = _g(seed)
    r_ = lambda *s: (torch.randn(*s, generator=g) * 0.3).to(dtype)  # noqa: E731
    return {f"{name}.lokr_w1": r_(a, b), f"{name}.lokr_w2_a": r_(out // a, r), f"{name}.lokr_w2_b": r_(r, inp // b),
            f"{name}.alpha": torch.tensor(alpha)}


def full(name, out, inp, seed=0, dtype=torch.float32, bias=False):
    g = _g(seed)
    sd = {f"{name}.diff": (torch.randn(out, inp, generator=g) * 0.05).to(dtype)}
    if bias:
        sd[f"{name}.diff_b"] = (torch.randn(out, generator=g) * 0.05).to(dtype)
    return sd


def whole_delta64(sd, name, algorithm, shape):
    """float64 scale · ΔW of the unsplit module, from the file's tensors alone."""
    from lora_fast.adapter import LoraLayer

    t = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
    alpha = float(t.pop("alpha")) if "alpha" in t else None
    t.pop("diff_b", None)
    return lycoris_delta64(LoraLayer(alpha=alpha, algorithm=algorithm, lycoris=t, shape=shape))


@pytest.fixture(scope="module")
def flux_dims():
    t = build_flux_transformer("tiny", seed=0)
    inner = t.transformer_blocks[0].attn.to_q.weight.shape[0]
    mlp = t.single_transformer_blocks[0].proj_mlp.weight.shape[0]
    return inner, mlp


QKV = "lora_unet_double_blocks_0_img_attn_qkv"
LIN1 = "lora_unet_single_blocks_0_linear1"
ADALN = "lora_unet_final_layer_adaLN_modulation_1"
PROJ = "lora_unet_double_blocks_0_img_attn_proj"
D = "transformer.transformer_blocks.0."
S = "transformer.single_transformer_blocks.0."


def _flux_file(inner, mlp, lokr_c):
    """LoHa on qkv, LoKr on linear1 with W2 of lokr_c rows, full diff (with bias) on the swapped final adaLN, LoKr
    one to one on the attention output."""
    rows1 = 3 * inner + mlp
    sd = {}
    sd.update(loha(QKV, 3 * inner, inner, seed=1))
    sd.update(lokr(LIN1, rows1, inner, rows1 // lokr_c, 2, seed=2))
    sd.update(full(ADALN, 2 * inner, inner, seed=3, bias=True))
    sd.update(lokr(PROJ, inner, inner, 2, 2, seed=4))
    return sd


def _split_of(inner, mlp):
    return {QKV: ("loha", (3 * inner, inner), [(D + "attn.to_q", [(0, inner)]), (D + "attn.to_k", [(inner, 2 * inner)]),
                                             (D + "attn.to_v", [(2 * inner, 3 * inner)])]),
            LIN1: ("lokr", (3 * inner + mlp, inner),
                   [(S + "attn.to_q", [(0, inner)]), (S + "attn.to_k", [(inner, 2 * inner)]),
                    (S + "attn.to_v", [(2 * inner, 3 * inner)]), (S + "proj_mlp", [(3 * inner, 3 * inner + mlp)])]),
            ADALN: ("full", (2 * inner, inner), [("transformer.norm_out.linear", [(inner, 2 * inner), (0, inner)])]),
            PROJ: ("lokr", (inner, inner), [(D + "attn.to_out.0", [(0, inner)])])}


def _flux_file_for(inner, mlp, aligned):
    """_flux_file with LoKr blocks of ``inner`` rows (aligned with the split of linear1) or of a row count that
    divides linear1 but not ``inner`` (misaligned: the parts become full-diff slices)."""
    rows1 = 3 * inner + mlp
    c = inner if aligned else next(c for c in range(3, rows1) if rows1 % c == 0 and inner % c)
    return _flux_file(inner, mlp, c)


def _rows(d, spans):
    return torch.cat([d[a:b] for a, b in spans], 0)


@pytest.mark.parametrize("aligned", [True, False], ids=["lokr-aligned", "lokr-misaligned"])
def test_flux_split_parts_are_the_rows_of_the_unsplit_delta(flux_dims, aligned):
    inner, mlp = flux_dims
    sd = _flux_file_for(inner, mlp, aligned)
    adapter = read_flux(sd, "kohya", source="lyco.safetensors")
    for name, (algo, shape, targets) in _split_of(inner, mlp).items():
        want = whole_delta64(sd, name, algo, shape)
        for key, spans in targets:
            layer = adapter.layers[key]
            expect = "full" if (name == LIN1 and not aligned) else algo
            assert layer.algorithm == expect, key
            got = lycoris_delta64(layer)
            ref = _rows(want, spans)
            if expect == algo:  # exact: the same factors, sliced
                assert torch.allclose(got, ref, rtol=1e-12, atol=1e-15), key
            else:  # a float32 slice of the delta: within one fp32 rounding of the product
                assert ((got - ref).abs() <= ref.abs() * 2 ** -22 + 1e-30).all(), key
    # shared tensors are not copied: LoHa's right factors are the file's own
    assert adapter.layers[D + "attn.to_k"].lycoris["hada_w1_b"] is sd[QKV + ".hada_w1_b"]
    bias = adapter.layers["transformer.norm_out.linear"].bias
    assert torch.equal(bias, torch.cat([sd[ADALN + ".diff_b"][inner:], sd[ADALN + ".diff_b"][:inner]]))


@pytest.mark.parametrize("aligned", [True, False], ids=["lokr-aligned", "lokr-misaligned"])
def test_flux_lycoris_fuses_to_the_float64_reference_and_unfuses_exactly(flux_dims, aligned):
    inner, mlp = flux_dims
    sd = _flux_file_for(inner, mlp, aligned)
    t = build_flux_transformer("tiny", seed=0)
    before = {n: p.detach().clone() for n, p in t.named_parameters()}
    lora_fast.load_lora_weights({"transformer": t}, read_flux(sd, "kohya"), adapter_name="lyco")
    lora_fast.fuse_lora({"transformer": t}, lora_scale=0.8)
    for name, (algo, shape, targets) in _split_of(inner, mlp).items():
        want = whole_delta64(sd, name, algo, shape) * 0.8
        for key, spans in targets:
            path = key.split(".", 1)[1]
            w0 = before[path + ".weight"].double()
            ref = w0 + _rows(want, spans)
            got = t.get_submodule(path).weight.double()
            err = (got - ref).abs() - ref.abs() * 2 ** -23 - _rows(want, spans).abs() * 2 ** -20 - 1e-7
            assert err.max().item() <= 0, key
    b0 = before["norm_out.linear.bias"].double()
    db = sd[ADALN + ".diff_b"].double() * 0.8
    assert torch.allclose(t.norm_out.linear.bias.double(), b0 + torch.cat([db[inner:], db[:inner]]), atol=1e-6)
    lora_fast.unfuse_lora({"transformer": t})
    for n, p in t.named_parameters():
        assert torch.equal(p.detach().view(torch.int32), before[n].view(torch.int32)), n


def test_flux_kohya_write_refuses_the_parts_round_trip_bit_exact(flux_dims):
    inner, mlp = flux_dims
    sd = _flux_file(inner, mlp, inner)
    back = write_flux_kohya(read_flux(sd, "kohya"))
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    # a part the adapter lacks is zero rows of the re-fused module (the same delta for the others)
    adapter = read_flux(sd, "kohya")
    del adapter.layers[D + "attn.to_k"]
    back = write_flux_kohya(adapter)
    w1a = back[QKV + ".hada_w1_a"]
    assert torch.equal(w1a[inner:2 * inner], torch.zeros(inner, 3))
    assert torch.equal(w1a[:inner], sd[QKV + ".hada_w1_a"][:inner])


def test_misaligned_lokr_is_full_slices_and_writes_back_as_one_full_diff(flux_dims):
    """W2 blocks of 7 rows on linear1 (parts of 32, 32, 32, 128 rows in the tiny model): every part is a full-diff
    slice (with equal-sized q/k/v units, either every part of linear1 lines up with W2's row blocks or none does);
    written back, they re-fuse into one full diff of the module whose delta is the LoKr's within an fp32 rounding."""
    inner, mlp = flux_dims
    rows1 = 3 * inner + mlp
    c = next(c for c in range(3, rows1) if rows1 % c == 0 and inner % c and (3 * inner) % c)
    sd = _flux_file(inner, mlp, c)
    adapter = read_flux(sd, "kohya")
    parts = (S + "attn.to_q", S + "attn.to_k", S + "attn.to_v", S + "proj_mlp")
    assert all(adapter.layers[k].algorithm == "full" for k in parts)
    assert adapter.layers[S + "attn.to_q"].lycoris["diff"].dtype == torch.float32
    back = write_flux_kohya(adapter)
    assert LIN1 + ".diff" in back and not any(k.startswith(LIN1 + ".lokr") for k in back)
    want = whole_delta64(sd, LIN1, "lokr", (rows1, inner))
    got = back[LIN1 + ".diff"].double()
    assert ((got - want).abs() <= want.abs() * 2 ** -22 + 1e-30).all()
    # a module whose parts are of different algorithms has no sd-scripts form
    mixed = read_flux(_flux_file(inner, mlp, inner), "kohya")
    mixed.layers[S + "attn.to_k"] = adapter.layers[S + "attn.to_k"]
    with pytest.raises(LoraFormatError, match="different algorithms"):
        write_flux_kohya(mixed)


def test_split_refusals_are_clear(flux_dims):
    inner, mlp = flux_dims
    sd = loha(QKV, 3 * inner, inner)
    sd[QKV + ".dora_scale"] = torch.ones(1, inner)
    with pytest.raises(LoraFormatError, match="DoRA"):
        read_flux(sd, "kohya", source="d.safetensors")
    bad = loha(QKV, 3 * inner + 1, inner)
    with pytest.raises(LoraFormatError, match="do not (fit|split)"):
        read_flux(bad, "kohya")
    # one-to-one modules keep DoRA (as the kohya reader does)
    sd = loha(PROJ, inner, inner)
    sd[PROJ + ".dora_scale"] = torch.ones(1, inner)
    layer = read_flux(sd, "kohya").layers[D + "attn.to_out.0"]
    assert layer.algorithm == "loha" and layer.magnitude is not None
    # different LoHa right factors on two parts of one module: no sd-scripts form
    adapter = read_flux(loha(QKV, 3 * inner, inner), "kohya")
    adapter.layers[D + "attn.to_k"].lycoris["hada_w1_b"] = adapter.layers[D + "attn.to_k"].lycoris["hada_w1_b"] * 2
    with pytest.raises(LoraFormatError, match="do not share"):
        write_flux_kohya(adapter)


def test_sd3_lycoris_qkv_and_last_context_adaln():
    t = build_sd3_transformer("tiny", seed=0)
    inner = t.transformer_blocks[0].attn.to_q.weight.shape[0]
    last = len(t.transformer_blocks) - 1
    qkv = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    ada = f"lora_unet_joint_blocks_{last}_context_block_adaLN_modulation_1"
    sd = {}
    sd.update(loha(qkv, 3 * inner, inner, seed=5))
    sd.update(lokr(ada, 2 * inner, inner, 2, 2, seed=6))  # W2 rows = inner: the (scale, shift) swap lines up
    adapter = read_fused(sd, SD3, "kohya", source="sd3.safetensors")
    T = "transformer.transformer_blocks."
    want = whole_delta64(sd, qkv, "loha", (3 * inner, inner))
    for n, key in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
        assert torch.allclose(lycoris_delta64(adapter.layers[f"{T}0.{key}"]), want[n * inner:(n + 1) * inner],
                              rtol=1e-12, atol=1e-15)
    layer = adapter.layers[f"{T}{last}.norm1_context.linear"]
    assert layer.algorithm == "lokr"
    want = whole_delta64(sd, ada, "lokr", (2 * inner, inner))
    assert torch.allclose(lycoris_delta64(layer), torch.cat([want[inner:], want[:inner]]), rtol=1e-12, atol=1e-15)
    before = {n: p.detach().clone() for n, p in t.named_parameters()}
    lora_fast.load_lora_weights({"transformer": t}, adapter, adapter_name="lyco")
    lora_fast.fuse_lora({"transformer": t})
    w = t.transformer_blocks[last].norm1_context.linear.weight.double()
    ref = before[f"transformer_blocks.{last}.norm1_context.linear.weight"].double() + torch.cat([want[inner:],
                                                                                                  want[:inner]])
    assert ((w - ref).abs() <= ref.abs() * 2 ** -23 + 1e-6).all()
    lora_fast.unfuse_lora({"transformer": t})
    for n, p in t.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
    back = write_fused_kohya(read_fused(sd, SD3, "kohya"), SD3)
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], v) for k, v in sd.items())


def test_detect_and_load_a_flux_lycoris_file(tmp_path, flux_dims):
    from safetensors.torch import save_file

    from lora_fast.formats import read_lora

    inner, mlp = flux_dims
    sd = _flux_file(inner, mlp, inner)
    path = tmp_path / "flux_lyco.safetensors"
    save_file(sd, str(path))
    adapter = read_lora(str(path))
    assert adapter.family == "flux" and adapter.layers[D + "attn.to_q"].algorithm == "loha"


def test_wan_one_to_one_lycoris_modules_read_and_write_back(tmp_path):
    from safetensors.torch import save_file

    from lora_fast.formats import read_lora
    from lora_fast.formats.wan import WAN

    sd = {}
    sd.update(loha("lora_unet_blocks_0_self_attn_q", 24, 24, seed=8, dtype=torch.bfloat16))
    sd.update(lokr("lora_unet_blocks_0_ffn_0", 64, 24, 4, 4, seed=9))
    sd.update(full("lora_unet_blocks_1_cross_attn_k_img", 24, 16, seed=10, dtype=torch.float16))
    path = tmp_path / "wan_lyco.safetensors"
    save_file(sd, str(path))
    adapter = read_lora(str(path))
    assert adapter.family == "wan"
    want = {"transformer.blocks.0.attn1.to_q": "loha", "transformer.blocks.0.ffn.net.0.proj": "lokr",
            "transformer.blocks.1.attn2.add_k_proj": "full"}
    assert {k: l.algorithm for k, l in adapter.layers.items()} == want
    assert adapter.layers["transformer.blocks.0.attn1.to_q"].lycoris["hada_w1_a"].dtype == torch.bfloat16
    back = write_fused_kohya(adapter, WAN)
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], v) for k, v in sd.items())
