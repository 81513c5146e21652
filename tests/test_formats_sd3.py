"""SD3 / SD3.5 LoRA files in kohya sd-scripts names on a real (tiny, random) StableDiffusion3Pipeline.

Oracle for the names: diffusers' single-file converter for SD3 checkpoints
(``convert_sd3_transformer_checkpoint_to_diffusers``) reads the same MMDiT module names sd-scripts writes LoRAs
for. Each LoRA's fused ΔW (float64) is put into an MMDiT-named checkpoint at the module it names, the converter
maps that checkpoint to diffusers names (splitting qkv, swapping the last context adaLN and final adaLN halves),
and every diffusers module's converted ΔW must equal the delta lora_fast's adapter puts on that module.
diffusers' SD3 LoRA loader does no kohya conversion, so it is no oracle for the file itself.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers  # noqa: E402
from safetensors.torch import save_file as st_save  # noqa: E402

import lora_fast  # noqa: E402
from lora_fast import LoraFormatError  # noqa: E402
from lora_fast.formats.sd3 import SD3_MODULES  # noqa: E402
from lora_fast.models import build_pipeline, build_sd3_transformer  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

LORA_SCALE = 0.8
_BASE: dict = {}


def _base(variant: str = "sd3"):
    if variant not in _BASE:
        pipe = build_pipeline("sd3", "tiny", seed=0, t5=True)
        if variant == "sd3.5":
            pipe.register_modules(transformer=build_sd3_transformer("tiny", variant="sd3.5", seed=0))
        _BASE[variant] = pipe
    return _BASE[variant]


def _pipe(variant: str = "sd3"):
    return copy.deepcopy(_base(variant))


_COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def _snapshot(pipe):
    return {(c, k): v.clone() for c in _COMPONENTS for k, v in getattr(pipe, c).state_dict().items()}


def _assert_snapshot(pipe, snap):
    now = _snapshot(pipe)
    assert list(now) == list(snap)
    bad = [k for k in snap if not torch.equal(now[k], snap[k])]
    assert not bad, f"{len(bad)} tensors changed, e.g. {bad[:3]}"


# ---------------------------------------------------------------------------------------------
# MMDiT (sd-scripts / original SD3) module names and shapes, written from the SD3 reference model


def _mmdit_modules(t) -> dict[str, tuple]:
    """{MMDiT module name: weight shape} of a diffusers SD3 transformer, from its config (not from lora_fast's
    table): what sd-scripts' MMDiT holds."""
    cfg = t.config
    d = cfg.num_attention_heads * cfg.attention_head_dim
    p, n = cfg.patch_size, cfg.num_layers
    out = {"x_embedder.proj": (d, cfg.in_channels, p, p), "t_embedder.mlp.0": (d, 256), "t_embedder.mlp.2": (d, d),
           "y_embedder.mlp.0": (d, cfg.pooled_projection_dim), "y_embedder.mlp.2": (d, d),
           "context_embedder": (cfg.caption_projection_dim, cfg.joint_attention_dim),
           "final_layer.linear": (p * p * cfg.out_channels, d), "final_layer.adaLN_modulation.1": (2 * d, d)}
    for i in range(n):
        last = i == n - 1
        dual = i in tuple(cfg.dual_attention_layers)
        b = f"joint_blocks.{i}."
        out.update({b + "x_block.attn.qkv": (3 * d, d), b + "x_block.attn.proj": (d, d),
                    b + "x_block.mlp.fc1": (4 * d, d), b + "x_block.mlp.fc2": (d, 4 * d),
                    b + "x_block.adaLN_modulation.1": ((9 if dual else 6) * d, d),
                    b + "context_block.attn.qkv": (3 * d, d),
                    b + "context_block.adaLN_modulation.1": ((2 if last else 6) * d, d)})
        if not last:
            out.update({b + "context_block.attn.proj": (d, d), b + "context_block.mlp.fc1": (4 * d, d),
                        b + "context_block.mlp.fc2": (d, 4 * d)})
        if dual:
            out.update({b + "x_block.attn2.qkv": (3 * d, d), b + "x_block.attn2.proj": (d, d)})
    return out


def _converted_deltas(t, lora: dict) -> dict[str, torch.Tensor]:
    """diffusers' single-file SD3 conversion of an MMDiT checkpoint whose weights are the LoRAs' float64 ΔW
    (zero where no LoRA): {diffusers weight key: ΔW}."""
    cfg = t.config
    d = cfg.num_attention_heads * cfg.attention_head_dim
    ckpt = {"pos_embed": torch.zeros(1, 4, d, dtype=torch.float64)}
    for name, shape in _mmdit_modules(t).items():
        if name in lora:
            down, up, alpha = lora[name]
            r = down.shape[0]
            delta = (alpha or r) / r * (up.double().reshape(up.shape[0], r) @ down.double().reshape(r, -1))
            ckpt[f"{name}.weight"] = delta.reshape(shape)
        else:
            ckpt[f"{name}.weight"] = torch.zeros(shape, dtype=torch.float64)
        ckpt[f"{name}.bias"] = torch.zeros(shape[0], dtype=torch.float64)
    if cfg.qk_norm:
        for i in range(cfg.num_layers):
            for s in ("x_block.attn", "context_block.attn") + (
                    ("x_block.attn2",) if i in tuple(cfg.dual_attention_layers) else ()):
                for q in ("ln_q", "ln_k"):
                    ckpt[f"joint_blocks.{i}.{s}.{q}.weight"] = torch.ones(cfg.attention_head_dim)
    conv = convert_sd3_transformer_checkpoint_to_diffusers(ckpt)
    return {k[: -len(".weight")]: v for k, v in conv.items() if k.endswith(".weight") and v.dim() >= 2}


def _make_lora(t, names, *, rank=4, alphas=(2.0, None, 8.0), seed=0) -> dict:
    """{MMDiT name: (down, up, alpha)}; factors exact in float16 (so file dtypes do not matter)."""
    shapes = _mmdit_modules(t)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for j, name in enumerate(names):
        shape = shapes[name]
        down_shape = (rank, *shape[1:])
        up_shape = (shape[0], rank) + ((1, 1) if len(shape) == 4 else ())
        down = (torch.randn(down_shape, generator=g) * 0.1).half().float()
        up = (torch.randn(up_shape, generator=g) * 0.1).half().float()
        out[name] = (down, up, alphas[j % len(alphas)])
    return out


def _kohya_sd(lora: dict) -> dict:
    sd = {}
    for name, (down, up, alpha) in lora.items():
        k = "lora_unet_" + name.replace(".", "_")
        sd[f"{k}.lora_down.weight"], sd[f"{k}.lora_up.weight"] = down, up
        if alpha is not None:
            sd[f"{k}.alpha"] = torch.tensor(float(alpha))
    return sd


def _all_names(t):
    return list(_mmdit_modules(t))


def _te_modules(pipe, seed=7):
    """kohya lora_te1_ (CLIP-L), lora_te2_ (CLIP-G) and lora_te3_ (T5) modules and their float64 truth."""
    g = torch.Generator().manual_seed(seed)
    sd, truth = {}, {}
    picks = (("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "text_encoder",
              "text_model.encoder.layers.0.self_attn.q_proj", 1.0),
             ("lora_te2_text_model_encoder_layers_1_mlp_fc2", "text_encoder_2", "text_model.encoder.layers.1.mlp.fc2",
              None),
             ("lora_te3_encoder_block_1_layer_1_DenseReluDense_wo", "text_encoder_3",
              "encoder.block.1.layer.1.DenseReluDense.wo", 4.0))
    for name, comp, path, alpha in picks:
        mods = dict(getattr(pipe, comp).named_modules())
        mod = mods.get(path) or mods[path.replace("text_model.", "", 1)]
        down = torch.randn(2, mod.in_features, generator=g) * 0.1
        up = torch.randn(mod.out_features, 2, generator=g) * 0.1
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(alpha)
        truth[(comp, path)] = (alpha or 2) / 2 * (up.double() @ down.double())
    return sd, truth


def _layer_delta64(layer) -> torch.Tensor:
    r = layer.rank
    return layer.scale * (layer.up.double().reshape(layer.up.shape[0], r) @ layer.down.double().reshape(r, -1))


# ---------------------------------------------------------------------------------------------


def test_table_covers_every_module_the_converter_maps():
    """Every weight diffusers' SD3 single-file conversion produces from an MMDiT checkpoint is a target of
    SD3_MODULES, on SD3 and SD3.5 (attn2) models: the table misses no module sd-scripts could train."""
    for variant in ("sd3", "sd3.5"):
        t = _base(variant).transformer
        converted = set(_converted_deltas(t, {}))
        n = t.config.num_layers
        targets = {path.format(i=i) for m in SD3_MODULES for path, _ in m.targets for i in range(n)}
        assert converted <= targets, sorted(converted - targets)
        mods = {k for k, m in t.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
        assert converted == mods, sorted(converted ^ mods)


@pytest.mark.parametrize("variant", ["sd3", "sd3.5"])
def test_kohya_sd3_deltas_equal_diffusers_single_file_conversion(variant):
    t = _base(variant).transformer
    lora = _make_lora(t, _all_names(t))
    adapter = lora_fast.read_lora(_kohya_sd(lora))
    assert (adapter.format, adapter.family) == ("kohya", "sd3")
    expected = _converted_deltas(t, lora)
    got = {k.split(".", 1)[1]: _layer_delta64(layer) for k, layer in adapter.layers.items()}
    assert sorted(got) == sorted(expected)
    for path, want in expected.items():
        have = got[path].reshape(want.shape)
        assert float((have - want).abs().max()) <= 1e-12 * max(1.0, float(want.abs().max())), path
    # split projections share the file's down matrix; the scale is alpha / rank of the fused module
    q, k = adapter.layers["transformer.transformer_blocks.0.attn.to_q"], adapter.layers[
        "transformer.transformer_blocks.0.attn.to_k"]
    alpha = lora["joint_blocks.0.x_block.attn.qkv"][2] or 4
    assert q.down is k.down and q.alpha == k.alpha == alpha and q.scale == alpha / 4
    assert adapter.layers["transformer.pos_embed.proj"].kind == "conv"
    if variant == "sd3.5":
        assert adapter.layers["transformer.transformer_blocks.0.attn2.to_v"].down is \
            adapter.layers["transformer.transformer_blocks.0.attn2.to_q"].down


@pytest.mark.parametrize("variant", ["sd3", "sd3.5"])
def test_kohya_sd3_loads_fuses_to_float64_and_unfuses_exactly(tmp_path, variant):
    base = _base(variant)
    t = base.transformer
    lora = _make_lora(t, _all_names(t), seed=1)
    sd = _kohya_sd(lora)
    te_sd, te_truth = _te_modules(base)
    sd.update(te_sd)
    path = tmp_path / "sd3_kohya.safetensors"
    st_save(sd, str(path))
    adapter = lora_fast.read_lora(path)
    assert adapter.components() == ["transformer", "text_encoder", "text_encoder_2", "text_encoder_3"]
    truth = {("transformer", p): v for p, v in _converted_deltas(t, lora).items()}
    truth.update(te_truth)
    pipe = _pipe(variant)
    snap = _snapshot(pipe)
    lora_fast.load_lora_weights(pipe, path)
    lora_fast.fuse_lora(pipe, lora_scale=LORA_SCALE)
    checked = 0
    for comp in _COMPONENTS:
        b_sd, o_sd = getattr(base, comp).state_dict(), getattr(pipe, comp).state_dict()
        want = {f"{p}.weight" if f"{p}.weight" in b_sd else f"{p.replace('text_model.', '', 1)}.weight": d
                for (c, p), d in truth.items() if c == comp}
        for name, w0 in b_sd.items():
            if name not in want:
                assert torch.equal(o_sd[name], w0), f"{comp}.{name}: changed an untargeted tensor"
                continue
            ref = w0.double() + LORA_SCALE * want[name].reshape(w0.shape)
            err = float((o_sd[name].double() - ref).abs().max())
            assert err <= 1e-6 * float(ref.abs().max()), f"{comp}.{name}: off float64 by {err:.3g}"
            checked += 1
    assert checked == len(truth)
    lora_fast.unfuse_lora(pipe)
    _assert_snapshot(pipe, snap)


def test_kohya_sd3_live_output_matches_fused():
    t = _base().transformer
    sd = _kohya_sd(_make_lora(t, _all_names(t), seed=2))
    live, fused = _pipe(), _pipe()
    lora_fast.load_lora_weights(live, sd)
    lora_fast.load_lora_weights(fused, sd, fuse=True, lora_scale=0.5)
    g = torch.Generator().manual_seed(0)
    cfg = t.config
    kwargs = dict(hidden_states=torch.randn(2, cfg.in_channels, 8, 8, generator=g),
                  encoder_hidden_states=torch.randn(2, 5, cfg.joint_attention_dim, generator=g),
                  pooled_projections=torch.randn(2, cfg.pooled_projection_dim, generator=g),
                  timestep=torch.tensor([0.3, 0.7]), return_dict=False)
    with torch.no_grad():
        (o,) = live.transformer(**kwargs, joint_attention_kwargs={"scale": 0.5})
        (f,) = fused.transformer(**kwargs)
        (plain,) = _base().transformer(**kwargs)
    torch.testing.assert_close(o, f, rtol=1e-4, atol=1e-4 * float(f.abs().max()))
    assert not torch.allclose(o, plain, rtol=1e-3, atol=1e-4)


def test_kohya_sd3_round_trips_bit_exact_and_through_diffusers(tmp_path):
    base = _base("sd3.5")
    t = base.transformer
    sd = _kohya_sd(_make_lora(t, _all_names(t), alphas=(2.0, 0.5, 8.0), seed=3))
    sd.update(_te_modules(base)[0])
    # sd-scripts always writes alpha; give the modules without one alpha = rank so the re-written file is identical
    for name in {k.split(".")[0] for k in sd}:
        sd.setdefault(f"{name}.alpha", torch.tensor(float(sd[f"{name}.lora_down.weight"].shape[0])))
    adapter = lora_fast.read_lora(sd)
    out = tmp_path / "again.safetensors"
    adapter.save(out, format="kohya")
    again = lora_fast.load_file(str(out))
    assert sorted(again) == sorted(sd)
    bad = [k for k in sd if not torch.equal(again[k].contiguous(), sd[k].contiguous()) or again[k].dtype != sd[k].dtype]
    assert not bad, bad[:3]
    # diffusers format (one down matrix per split module) and back: re-fused into the same sd-scripts file
    diff = tmp_path / "diffusers.safetensors"
    adapter.save(diff, format="diffusers")
    via = lora_fast.read_lora(diff)
    assert via.format == "diffusers" and lora_fast.formats.families.adapter_family(via) == "sd3"
    out2 = tmp_path / "again2.safetensors"
    via.save(out2, format="kohya")
    again2 = lora_fast.load_file(str(out2))
    assert sorted(again2) == sorted(sd)
    assert all(torch.equal(again2[k], sd[k].to(again2[k].dtype)) for k in sd)


def test_kohya_sd3_writer_refuses_split_modules_with_different_downs(tmp_path):
    t = _base().transformer
    adapter = lora_fast.read_lora(_kohya_sd(_make_lora(t, ["joint_blocks.0.x_block.attn.qkv"])))
    layer = adapter.layers["transformer.transformer_blocks.0.attn.to_k"]
    layer.down = layer.down.clone() * 2
    with pytest.raises(LoraFormatError, match="do not share their down"):
        adapter.save(tmp_path / "x.safetensors", format="kohya")
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_inspect_and_convert_sd3(tmp_path, capsys):
    from lora_fast.cli import main

    t = _base().transformer
    src = tmp_path / "sd3.safetensors"
    st_save(_kohya_sd(_make_lora(t, _all_names(t), alphas=(4.0,))), str(src))
    assert main(["inspect", str(src)]) == 0
    text = capsys.readouterr().out
    assert "kohya (sd3 layout)" in text
    dst = tmp_path / "sd3_diffusers.safetensors"
    assert main(["convert", str(src), str(dst), "--to", "diffusers"]) == 0
    back = tmp_path / "sd3_back.safetensors"
    assert main(["convert", str(dst), str(back), "--to", "kohya"]) == 0
    a, b = lora_fast.load_file(str(src)), lora_fast.load_file(str(back))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("defect", ["rows", "unknown", "conv"])
def test_bad_sd3_files_raise_and_change_nothing(defect):
    t = _base().transformer
    sd = _kohya_sd(_make_lora(t, ["joint_blocks.0.x_block.attn.qkv", "x_embedder.proj"]))
    if defect == "rows":
        sd["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"] = torch.zeros(7, 4)
        match = "do not split"
    elif defect == "unknown":
        sd["lora_unet_joint_blocks_0_x_block_attn_qkvz.lora_down.weight"] = torch.zeros(4, 32)
        match = "qkvz"
    else:
        sd["lora_unet_x_embedder_proj.lora_down.weight"] = torch.zeros(4, 16)
        match = "Conv2d"
    pipe = _pipe()
    snap = _snapshot(pipe)
    with pytest.raises(LoraFormatError, match=match):
        lora_fast.load_lora_weights(pipe, sd)
    _assert_snapshot(pipe, snap)


def test_sd3_lora_on_flux_names_both_families():
    from lora_fast.formats.families import family_mismatch

    t = _base().transformer
    # pos_embed.proj (x_embedder) has no Flux module; on these tiny models the joint-block modules alone would fit
    # Flux's double blocks (same names and widths), see check_family below
    sd = _kohya_sd(_make_lora(t, ["joint_blocks.0.x_block.attn.qkv", "joint_blocks.1.x_block.mlp.fc1",
                                  "x_embedder.proj"]))
    flux = build_pipeline("flux", "tiny", seed=0)
    adapter = lora_fast.read_lora(sd)
    assert "looks like a SD3/SD3.5 LoRA" in family_mismatch(adapter, flux)
    before = {k: v.clone() for k, v in flux.transformer.state_dict().items()}
    with pytest.raises(LoraFormatError, match="looks like a SD3/SD3.5 LoRA .*Flux.1 FluxPipeline"):
        lora_fast.load_lora_weights(flux, sd)
    assert all(torch.equal(v, before[k]) for k, v in flux.transformer.state_dict().items())


def test_diffusers_sd3_loader_does_not_read_kohya_sd3_files():
    """Recorded for the docs: diffusers 0.42.1's SD3 loader has no kohya conversion; lora_fast reads them."""
    t = _base().transformer
    sd = _kohya_sd(_make_lora(t, ["joint_blocks.0.x_block.attn.qkv"]))
    pipe = _pipe()
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    try:
        pipe.load_lora_weights(sd)
    except Exception:  # noqa: BLE001 - any refusal is fine; what matters is that nothing was applied
        pass
    pipe.transformer.fuse_lora() if getattr(pipe.transformer, "peft_config", None) else None
    after = {k.replace(".base_layer.", "."): v for k, v in pipe.transformer.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_check_family_refuses_a_known_family_on_another_target():
    """check_family (the strict form of family_mismatch) refuses an adapter whose reader knows its family when the
    target is another family, even where every module name and shape happens to fit (tiny models)."""
    from lora_fast.formats.families import check_family

    t = _base().transformer
    adapter = lora_fast.read_lora(_kohya_sd(_make_lora(t, ["joint_blocks.0.x_block.attn.qkv"])))
    flux = build_pipeline("flux", "tiny", seed=0)
    with pytest.raises(LoraFormatError, match="looks like a SD3/SD3.5 LoRA .*Flux.1 FluxPipeline"):
        check_family(adapter, flux)
    check_family(adapter, _base())  # same family: fine
    check_family(adapter, torch.nn.Linear(2, 2))  # unknown target family: nothing to say


@pytest.mark.parametrize("fuse", [False, True])
def test_load_refuses_an_sd3_lora_on_flux_even_where_every_module_fits(fuse, monkeypatch, tmp_path):
    """The bind path calls check_family before planning: an SD3 kohya LoRA of joint-block modules only (which the
    tiny Flux pipeline's double blocks would take, same names and widths) is refused with both families named, and the
    pipeline is left unchanged (the plain load and the streaming fuse-on-load of the file alike)."""
    t = _base().transformer
    sd = _kohya_sd(_make_lora(t, ["joint_blocks.0.x_block.attn.qkv", "joint_blocks.1.x_block.mlp.fc1"]))
    if fuse:
        monkeypatch.setenv("LORA_FAST_STREAM_FUSE", "1")
        st_save(sd, str(tmp_path / "sd3.safetensors"))
        sd = str(tmp_path / "sd3.safetensors")
    flux = build_pipeline("flux", "tiny", seed=0)
    before = {(c, k): v.clone() for c in ("transformer", "text_encoder", "text_encoder_2")
              for k, v in getattr(flux, c).state_dict().items()}
    with pytest.raises(LoraFormatError, match="looks like a SD3/SD3.5 LoRA .*Flux.1 FluxPipeline"):
        lora_fast.load_lora_weights(flux, sd, fuse=fuse)
    after = {(c, k): v for c in ("transformer", "text_encoder", "text_encoder_2")
             for k, v in getattr(flux, c).state_dict().items()}
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert lora_fast.get_list_adapters(flux) == {}
    assert lora_fast.engine.component_state(flux.transformer) is None


def test_block_diagonal_kohya_sd3_from_independent_parts_equals_diffusers_conversion(tmp_path):
    """Independent to_q/to_k/to_v LoRAs (ranks 2, 3, 4; scales 1, 4, 0.5) and a lone add_k_proj: refused for kohya
    without the flag (module and reason named); with block_diagonal=True the written sd-scripts modules, read back and
    put through diffusers' single-file SD3 conversion as float64 ΔW, give every part's float64 delta exactly."""
    t = _base().transformer
    mods = dict(t.named_modules())
    g = torch.Generator().manual_seed(11)
    spec = {"transformer_blocks.0.attn.to_q": (2, 2.0), "transformer_blocks.0.attn.to_k": (3, 12.0),
            "transformer_blocks.0.attn.to_v": (4, 2.0), "transformer_blocks.1.attn.add_k_proj": (2, 2.0)}
    layers = {}
    for path, (r, alpha) in spec.items():
        m = mods[path]
        layers[f"transformer.{path}"] = lora_fast.LoraLayer(
            down=(torch.randn(r, m.in_features, generator=g) * 0.1).half().float(),
            up=(torch.randn(m.out_features, r, generator=g) * 0.1).half().float(), alpha=alpha)
    adapter = lora_fast.LoraAdapter(layers, "diffusers", family="sd3")
    path = tmp_path / "sd3.safetensors"
    with pytest.raises(LoraFormatError, match=r"joint_blocks\.0\.x_block\.attn\.qkv: its parts .*ranks 2 and 3"):
        adapter.save(path, format="kohya")
    assert not path.exists()
    adapter.save(path, format="kohya", block_diagonal=True)
    sd = lora_fast.load_file(str(path))
    qkv = "lora_unet_joint_blocks_0_x_block_attn_qkv"
    assert sd[f"{qkv}.lora_down.weight"].shape[0] == 9 and sd[f"{qkv}.alpha"].item() == 0.5 * 9
    back = lora_fast.read_lora(str(path))
    for key, layer in layers.items():
        assert torch.equal(_layer_delta64(back.layers[key]), _layer_delta64(layer)), key
    lora = {}
    for k in sd:
        if k.endswith(".lora_down.weight"):
            name = k[: -len(".lora_down.weight")]
            mm = next(n for n in _mmdit_modules(t) if "lora_unet_" + n.replace(".", "_") == name)
            lora[mm] = (sd[k], sd[f"{name}.lora_up.weight"], float(sd[f"{name}.alpha"]))
    conv = _converted_deltas(t, lora)
    for key, layer in layers.items():
        assert torch.equal(conv[key[len("transformer."):]], _layer_delta64(layer)), key


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_merge_kohya_sd3_into_mmdit_named_file_equals_fuse_lora_through_diffusers_conversion(tmp_path, prefix):
    """`lora-fast merge` into a transformer file in sd-scripts'/SAI's MMDiT names (joint_blocks.N.x_block.attn.qkv.
    weight..., optionally ComfyUI-prefixed): every module placed by the table into its rows (the last block's 2-part
    context adaLN swapped, the patch-embedding conv whole). Oracle: diffusers' single-file SD3 conversion of the base
    is the model fused in memory; its conversion of the merged file equals that model after fuse_lora, bit for bit."""
    from lora_fast import checkpoint, io

    t = copy.deepcopy(_base().transformer).to(torch.bfloat16)
    cfg = t.config
    g = torch.Generator().manual_seed(5)
    mmdit = {"pos_embed": t.pos_embed.pos_embed.detach().clone()}
    for name, shape in _mmdit_modules(t).items():
        mmdit[f"{name}.weight"] = (torch.randn(shape, generator=g) * 0.1).bfloat16()
        mmdit[f"{name}.bias"] = (torch.randn(shape[0], generator=g) * 0.1).bfloat16()
    for i in range(cfg.num_layers):
        if cfg.qk_norm:
            for s in ("x_block.attn", "context_block.attn") + (
                    ("x_block.attn2",) if i in tuple(cfg.dual_attention_layers) else ()):
                for q in ("ln_q", "ln_k"):
                    mmdit[f"joint_blocks.{i}.{s}.{q}.weight"] = torch.ones(cfg.attention_head_dim, dtype=torch.bfloat16)
    t.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(dict(mmdit)), strict=True)
    base = tmp_path / "sd3.safetensors"
    io.save_file({prefix + k: v for k, v in mmdit.items()}, str(base))
    lora_path = tmp_path / "lora.safetensors"
    st_save(_kohya_sd(_make_lora(t, _all_names(t), seed=4)), str(lora_path))
    out = tmp_path / "merged.safetensors"
    checkpoint.merge(str(base), [checkpoint.LoraSpec(lora_fast.read_lora(str(lora_path)), 0.75, "lora")], str(out))
    merged = {k[len(prefix):]: v for k, v in io.load_file(str(out)).items()}
    got = convert_sd3_transformer_checkpoint_to_diffusers(merged)
    lora_fast.load_lora_weights({"transformer": t}, str(lora_path), fuse=True, lora_scale=0.75)
    want = t.state_dict()
    assert sorted(got) == sorted(want)
    changed = [k for k in want if not torch.equal(want[k], convert_sd3_transformer_checkpoint_to_diffusers(
        {k2: v for k2, v in mmdit.items()})[k])]
    assert len(changed) > 20
    bad = [k for k in want if not torch.equal(got[k].contiguous().view(torch.int16), want[k].view(torch.int16))]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]}"
