"""Wan 2.x LoRAs on a real (tiny, random) WanPipeline: musubi-tuner kohya names, original Wan names
(``diffusion_model.blocks.0.self_attn.q``) and diffusers/PEFT keys. Wan is one table (``formats/wan.py``).

Oracles: diffusers' own ``WanPipeline.load_lora_weights(...); fuse_lora()`` on the same file (it converts both
non-diffusers layouts), and a float64 W + λ·s·B·A built from the factors the file was written from.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
import diffusers  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.tuners.lora import LoraLayer as PeftLoraLayer  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors.torch import save_file as st_save  # noqa: E402

import lora_fast  # noqa: E402
from lora_fast import LoraFormatError  # noqa: E402
from lora_fast.formats.wan import WAN_MODULES  # noqa: E402
from lora_fast.models import build_pipeline, build_wan_transformer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

LORA_SCALE = 0.8
_BASE: dict = {}


def _base(variant: str = "t2v"):
    if variant not in _BASE:
        pipe = build_pipeline("wan", "tiny", seed=0)
        if variant == "i2v":
            pipe.register_modules(transformer=build_wan_transformer("tiny", variant="i2v", seed=0))
        _BASE[variant] = pipe
    return _BASE[variant]


def _pipe(variant: str = "t2v"):
    return copy.deepcopy(_base(variant))


def _plain(model) -> dict:
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}


def _snapshot(pipe):
    return {k: v.clone() for k, v in pipe.transformer.state_dict().items()}


def _assert_snapshot(pipe, snap):
    now = pipe.transformer.state_dict()
    assert list(now) == list(snap)
    bad = [k for k in snap if not torch.equal(now[k], snap[k])]
    assert not bad, f"{len(bad)} tensors changed, e.g. {bad[:3]}"


def _check_fused(ours, base, truth: dict, theirs=None):
    """truth: {diffusers module path: float64 ΔW}; targeted weights equal base + λ·ΔW (and diffusers' fuse), every
    other tensor is bit-identical to base."""
    b_sd, o_sd = base.transformer.state_dict(), ours.transformer.state_dict()
    t_sd = _plain(theirs.transformer) if theirs is not None else None
    targeted = {f"{p}.weight": p for p in truth}
    for name, w0 in b_sd.items():
        if name not in targeted:
            assert torch.equal(o_sd[name], w0), f"{name}: changed an untargeted tensor"
            continue
        ref = w0.double() + LORA_SCALE * truth[targeted[name]]
        tol = 1e-6 * float(ref.abs().max())
        err = float((o_sd[name].double() - ref).abs().max())
        assert err <= tol, f"{name}: off the float64 reference by {err:.3g}"
        if t_sd is not None:
            gap = float((o_sd[name].double() - t_sd[name].double()).abs().max())
            assert gap <= 1e-5 * float(ref.abs().max()), f"{name}: differs from diffusers' fuse by {gap:.3g}"
    assert truth


def _make(variant, names, *, alphas=(2.0, 8.0, 4.0), rank=4, seed=0):
    """{original Wan name: (down, up, alpha)} (factors exact in float16) and {diffusers path: float64 ΔW}."""
    t = _base(variant).transformer
    mods = dict(t.named_modules())
    g = torch.Generator().manual_seed(seed)
    lora, truth = {}, {}
    for j, (orig, path) in enumerate(names):
        mod = mods[path]
        down = (torch.randn(rank, mod.in_features, generator=g) * 0.1).half().float()
        up = (torch.randn(mod.out_features, rank, generator=g) * 0.1).half().float()
        alpha = alphas[j % len(alphas)] if alphas else None
        lora[orig] = (down, up, alpha)
        truth[path] = (alpha or rank) / rank * (up.double() @ down.double())
    return lora, truth


def _block_names(n_blocks=2, i2v=False):
    out = []
    for i in range(n_blocks):
        for o, d in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0")):
            out.append((f"blocks.{i}.self_attn.{o}", f"blocks.{i}.attn1.{d}"))
            out.append((f"blocks.{i}.cross_attn.{o}", f"blocks.{i}.attn2.{d}"))
        if i2v:
            out += [(f"blocks.{i}.cross_attn.k_img", f"blocks.{i}.attn2.add_k_proj"),
                    (f"blocks.{i}.cross_attn.v_img", f"blocks.{i}.attn2.add_v_proj")]
        out += [(f"blocks.{i}.ffn.0", f"blocks.{i}.ffn.net.0.proj"), (f"blocks.{i}.ffn.2", f"blocks.{i}.ffn.net.2")]
    return out


_TOP = [("head.head", "proj_out"), ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
        ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
        ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
        ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
        ("time_projection.1", "condition_embedder.time_proj"),
        ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
        ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2")]


def _musubi_sd(lora) -> dict:
    sd = {}
    for name, (down, up, alpha) in lora.items():
        k = "lora_unet_" + name.replace(".", "_")
        sd[f"{k}.lora_down.weight"], sd[f"{k}.lora_up.weight"] = down, up
        if alpha is not None:
            sd[f"{k}.alpha"] = torch.tensor(float(alpha))
    return sd


def _native_sd(lora, spelling="AB") -> dict:
    a, b = ("lora_A", "lora_B") if spelling == "AB" else ("lora_down", "lora_up")
    sd = {}
    for name, (down, up, alpha) in lora.items():
        sd[f"diffusion_model.{name}.{a}.weight"], sd[f"diffusion_model.{name}.{b}.weight"] = down, up
        if alpha is not None:
            sd[f"diffusion_model.{name}.alpha"] = torch.tensor(float(alpha))
    return sd


def _fuse_ours(variant, source):
    pipe = _pipe(variant)
    snap = _snapshot(pipe)
    lora_fast.load_lora_weights(pipe, source)
    lora_fast.fuse_lora(pipe, lora_scale=LORA_SCALE)
    return pipe, snap


def _fuse_theirs(variant, path):
    pipe = _pipe(variant)
    pipe.load_lora_weights(path)
    pipe.fuse_lora(components=["transformer"], lora_scale=LORA_SCALE)
    return pipe


# ---------------------------------------------------------------------------------------------


def test_table_targets_every_linear_of_the_i2v_transformer():
    t = _base("i2v").transformer
    linears = {k for k, m in t.named_modules() if isinstance(m, torch.nn.Linear)}
    n = len(t.blocks)
    targets = {path.format(i=i) for m in WAN_MODULES for path, _ in m.targets for i in range(n)}
    assert linears <= targets, sorted(linears - targets)


def test_wan_builders():
    pipe = _base()
    assert isinstance(pipe, diffusers.WanPipeline) and type(pipe.transformer).__name__ == "WanTransformer3DModel"
    assert len(pipe.transformer.blocks) == 2
    i2v = _base("i2v").transformer
    assert i2v.blocks[0].attn2.add_k_proj is not None and i2v.condition_embedder.image_embedder is not None
    full = build_wan_transformer("full", device="meta")
    assert len(full.blocks) == 40 and full.blocks[0].attn1.to_q.weight.shape == (5120, 5120)


def test_musubi_wan_fuses_like_diffusers_and_float64(tmp_path):
    lora, truth = _make("t2v", _block_names())
    path = tmp_path / "musubi_wan.safetensors"
    st_save(_musubi_sd(lora), str(path))
    adapter = lora_fast.read_lora(path)
    assert (adapter.format, adapter.family) == ("kohya", "wan")
    assert sorted(k.split(".", 1)[1] for k in adapter.layers) == sorted(truth)
    ours, snap = _fuse_ours("t2v", path)
    _check_fused(ours, _base(), truth, theirs=_fuse_theirs("t2v", path))
    lora_fast.unfuse_lora(ours)
    _assert_snapshot(ours, snap)


@pytest.mark.parametrize("spelling", ["AB", "down_up"])
def test_native_wan_i2v_fuses_like_diffusers_and_float64(tmp_path, spelling):
    # diffusers reads alpha for block modules only: the top-level ones carry none here (scale 1)
    lora, truth = _make("i2v", _block_names(i2v=True))
    top, top_truth = _make("i2v", _TOP, alphas=(), seed=1)
    lora.update(top)
    truth.update(top_truth)
    path = tmp_path / "native_wan.safetensors"
    st_save(_native_sd(lora, spelling), str(path))
    adapter = lora_fast.read_lora(path)
    assert (adapter.format, adapter.family) == ("native", "wan")
    ours, snap = _fuse_ours("i2v", path)
    _check_fused(ours, _base("i2v"), truth, theirs=_fuse_theirs("i2v", path))
    lora_fast.unfuse_lora(ours)
    _assert_snapshot(ours, snap)


def test_diffusers_wan_file_is_detected_and_fuses_like_diffusers(tmp_path):
    src = _pipe()
    src.transformer.add_adapter(LoraConfig(init_lora_weights=False, r=4, lora_alpha=8,
                                           target_modules=["to_q", "to_v", "add_k_proj", "net.0.proj", "proj_out"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in src.transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    truth = {path: float(m.scaling["default"]) * (m.lora_B["default"].weight.double() @ m.lora_A["default"].weight.double())
             for path, m in src.transformer.named_modules() if isinstance(m, PeftLoraLayer)}
    diffusers.WanPipeline.save_lora_weights(
        tmp_path, transformer_lora_layers=get_peft_model_state_dict(src.transformer),
        transformer_lora_adapter_metadata=src.transformer.peft_config["default"].to_dict())
    adapter = lora_fast.read_lora(tmp_path)
    assert adapter.format == "diffusers"
    from lora_fast.formats.families import adapter_family

    assert adapter_family(adapter) == "wan"
    ours, snap = _fuse_ours("t2v", tmp_path)
    _check_fused(ours, _base(), {k: v.detach() for k, v in truth.items()}, theirs=_fuse_theirs("t2v", tmp_path))
    lora_fast.unfuse_lora(ours)
    _assert_snapshot(ours, snap)


def test_wan_live_output_matches_fused():
    lora, _ = _make("t2v", _block_names())
    sd = _musubi_sd(lora)
    live, fused = _pipe(), _pipe()
    lora_fast.load_lora_weights(live, sd)
    lora_fast.load_lora_weights(fused, sd, fuse=True, lora_scale=0.5)
    cfg = live.transformer.config
    g = torch.Generator().manual_seed(0)
    kwargs = dict(hidden_states=torch.randn(1, cfg.in_channels, 2, 4, 4, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 5, cfg.text_dim, generator=g), return_dict=False)
    with torch.no_grad():
        (o,) = live.transformer(**kwargs, attention_kwargs={"scale": 0.5})
        (f,) = fused.transformer(**kwargs)
        (plain,) = _base().transformer(**kwargs)
    torch.testing.assert_close(o, f, rtol=1e-4, atol=1e-4 * float(f.abs().max()))
    assert not torch.allclose(o, plain, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("case", ["wan-on-flux", "flux-on-wan"])
def test_other_family_raises_names_both_and_changes_nothing(case):
    from lora_fast.formats.families import family_mismatch

    if case == "wan-on-flux":
        lora, _ = _make("t2v", _block_names(1))
        source, pipe, want = _musubi_sd(lora), build_pipeline("flux", "tiny", seed=0), ("Wan 2.x", "Flux.1 FluxPipeline")
    else:
        g = torch.Generator().manual_seed(0)
        name = "lora_unet_single_blocks_0_linear2"
        source = {f"{name}.lora_down.weight": torch.randn(2, 160, generator=g),
                  f"{name}.lora_up.weight": torch.randn(32, 2, generator=g)}
        pipe, want = _pipe(), ("Flux.1", "Wan 2.x WanPipeline")
    adapter = lora_fast.read_lora(source)
    assert f"looks like a {want[0]} LoRA" in family_mismatch(adapter, pipe)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    with pytest.raises(LoraFormatError, match=f"looks like a {want[0]} LoRA .*{want[1]}"):
        lora_fast.load_lora_weights(pipe, source)
    assert all(torch.equal(v, before[k]) for k, v in pipe.transformer.state_dict().items())


def test_wan_kohya_round_trip_and_cli(tmp_path, capsys):
    from lora_fast.cli import main

    lora, _ = _make("i2v", _block_names(i2v=True) + _TOP)
    sd = _musubi_sd(lora)
    src = tmp_path / "wan.safetensors"
    st_save(sd, str(src))
    assert main(["inspect", str(src)]) == 0
    assert "kohya (wan layout)" in capsys.readouterr().out
    out = tmp_path / "again.safetensors"
    lora_fast.read_lora(src).save(out, format="kohya")
    again = lora_fast.load_file(str(out))
    assert sorted(again) == sorted(sd) and all(torch.equal(again[k], sd[k]) for k in sd)
    native = tmp_path / "native.safetensors"
    st_save(_native_sd(lora), str(native))
    dst = tmp_path / "native_to_kohya.safetensors"
    assert main(["convert", str(native), str(dst), "--to", "kohya"]) == 0
    conv = lora_fast.load_file(str(dst))
    assert sorted(conv) == sorted(sd)


def test_unknown_wan_module_names_the_key():
    lora, _ = _make("t2v", _block_names(1))
    sd = _musubi_sd(lora)
    sd["lora_unet_blocks_0_self_attn_qq.lora_down.weight"] = torch.zeros(4, 16)
    with pytest.raises(LoraFormatError, match="self_attn_qq"):
        lora_fast.read_lora(sd)
