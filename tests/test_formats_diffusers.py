"""diffusers format: files diffusers writes read back to the exact live deltas, and files lora_fast
writes (save_lora_weights, LoraAdapter.save) load in diffusers' load_lora_weights with the same effect."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin  # noqa: E402
from diffusers.utils import convert_state_dict_to_diffusers  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file as st_load, save_file as st_save  # noqa: E402

from lora_fast import LoraAdapter, LoraFormatError, LoraLayer, read_lora, save_lora_weights  # noqa: E402
from lora_fast.adapter import split_component  # noqa: E402

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.0.proj", "ff.net.2", "conv1", "time_emb_proj"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def _inject(components, helpers, unet_cfg=None, te_cfg=None, seed=0):
    if unet_cfg is not None:
        components["unet"].add_adapter(LoraConfig(init_lora_weights=False, **unet_cfg))
    if te_cfg is not None:
        components["text_encoder"].add_adapter(LoraConfig(init_lora_weights=False, **te_cfg))
    for i, m in enumerate(components.values()):
        helpers.randomize_lora(m, seed=seed + i)


UNET_CFG = dict(r=4, lora_alpha=8, target_modules=UNET_TARGETS, rank_pattern={"to_q": 2, "conv1": 3},
                alpha_pattern={"proj_in": 2.5, "to_k": 16})
TE_CFG = dict(r=4, lora_alpha=2, target_modules=TE_TARGETS, rank_pattern={"fc1": 2})


def _close(delta, ref):
    """fp32 delta vs float64 reference: a few fp32 ulps of the delta's scale."""
    ref = ref.double()
    torch.testing.assert_close(delta.double(), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


def _assert_adapter_matches_live(adapter, components, helpers, key_of, *, unit_scale=False):
    """Every live PEFT layer appears in the adapter with the same delta (scale·B·A), and nothing else."""
    seen = set()
    for comp, model in components.items():
        for name, module in helpers.lora_modules(model).items():
            (adapter_name,) = set(module.lora_A) | set(module.lora_embedding_A)
            key = key_of(comp, name)
            assert key in adapter.layers, key
            seen.add(key)
            ref = helpers.reference_delta(module, adapter_name)
            if unit_scale:
                ref = ref / module.scaling[adapter_name]
            _close(adapter.layers[key].delta(), ref)
    assert seen == set(adapter.layers)


def _assert_diffusers_loaded(pipe, adapter, helpers):
    """What diffusers injected equals the adapter module by module (deltas, scales, DoRA magnitudes)."""
    count = 0
    for comp in ("unet", "text_encoder"):
        model = getattr(pipe, comp)
        live = helpers.lora_modules(model)
        count += len(live)
        for key, layer in adapter.select(comp).items():
            path = key
            if comp.startswith("text_encoder") and not hasattr(model, "text_model"):
                path = path.removeprefix("text_model.")
            module = model.get_submodule(path)
            assert path in live, f"diffusers did not wrap {comp}.{path}"
            (name,) = set(module.lora_A) | set(module.lora_embedding_A)
            assert module.scaling[name] == pytest.approx(layer.scale, rel=1e-12), key
            _close(layer.delta(), helpers.reference_delta(module, name))
            if layer.magnitude is not None:
                assert module.use_dora[name]
                torch.testing.assert_close(module.lora_magnitude_vector[name].weight.detach().reshape(-1),
                                           layer.magnitude.reshape(-1).float())
            if layer.bias is not None:
                torch.testing.assert_close(module.lora_B[name].bias.detach(), layer.bias.float())
    assert count == len(adapter.layers), "diffusers wrapped modules the adapter does not have"


# ---------------------------------------------------------------------------------------------
# reading what diffusers writes


@pytest.mark.parametrize("with_metadata", [True, False])
def test_diffusers_save_lora_weights_reads_back_exact(sd15, peft_helpers, key_of, tmp_path, with_metadata):
    _inject(sd15, peft_helpers, UNET_CFG, TE_CFG)
    kwargs = {}
    if with_metadata:
        kwargs = dict(unet_lora_adapter_metadata=sd15["unet"].peft_config["default"].to_dict(),
                      text_encoder_lora_adapter_metadata=sd15["text_encoder"].peft_config["default"].to_dict())
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(sd15["unet"]),
        text_encoder_lora_layers=get_peft_model_state_dict(sd15["text_encoder"]), **kwargs)
    adapter = read_lora(tmp_path)
    assert adapter.format == "diffusers" and adapter.components() == ["unet", "text_encoder"]
    assert adapter.source == str(tmp_path / "pytorch_lora_weights.safetensors")
    assert ("lora_adapter_metadata" in adapter.metadata) == with_metadata
    # transformers 5's CLIPTextModel has no text_model level; the adapter keys get it back.
    assert any(k.startswith("text_encoder.text_model.encoder.layers.") for k in adapter.layers)
    _assert_adapter_matches_live(adapter, sd15, peft_helpers, key_of, unit_scale=not with_metadata)
    conv1 = [l for k, l in adapter.layers.items() if k.endswith("resnets.0.conv1")]
    assert conv1 and all(l.kind == "conv" and l.rank == 3 and tuple(l.down.shape[2:]) == (3, 3) for l in conv1)
    proj_in = [l for k, l in adapter.layers.items() if k.endswith("proj_in")]
    assert proj_in and all(l.kind == "conv" and l.alpha == (2.5 if with_metadata else l.rank) for l in proj_in)


def _save_training_script_style(src, tmp_path, unet_targets, te_targets, helpers):
    # diffusers' training scripts save convert_state_dict_to_diffusers(get_peft_model_state_dict(...)):
    # `to_q.lora.down.weight`, `q_proj.lora_linear_layer.up.weight`, other modules keep `lora_A` names.
    _inject(src, helpers, dict(r=3, lora_alpha=3, target_modules=unet_targets),
            dict(r=2, lora_alpha=2, target_modules=te_targets))
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        tmp_path, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(src["unet"])),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(src["text_encoder"])))
    return list(st_load(str(tmp_path / "pytorch_lora_weights.safetensors")))


def test_training_script_names_match_diffusers_own_loader(sd15_pair, peft_helpers, key_of, tiny_pipeline_cls,
                                                          tmp_path):
    src, dst = sd15_pair
    keys = _save_training_script_style(src, tmp_path, ["to_q", "to_k", "to_v", "to_out.0"], TE_TARGETS, peft_helpers)
    assert any(".to_out.0.lora.down.weight" in k for k in keys) and any("lora_linear_layer" in k for k in keys)
    assert any(".fc1.lora_A.weight" in k for k in keys)
    adapter = read_lora(tmp_path)
    assert adapter.format == "diffusers"
    _assert_adapter_matches_live(adapter, src, peft_helpers, key_of)
    pipe = tiny_pipeline_cls(dst["unet"], dst["text_encoder"])
    pipe.load_lora_weights(str(tmp_path))
    _assert_diffusers_loaded(pipe, adapter, peft_helpers)


def test_training_script_mixed_unet_names_all_read(sd15, peft_helpers, key_of, tmp_path):
    # With proj_in/ff targets too, one UNet holds `to_q.lora.down` and `proj_in.lora_A` names. diffusers
    # 0.42.1 converts the UNet names only when its *first* key lacks "lora_A", so it silently drops the
    # attention LoRAs of such a file; lora_fast reads every module.
    keys = _save_training_script_style(sd15, tmp_path, UNET_TARGETS, ["q_proj"], peft_helpers)
    assert any(".to_q.lora.down.weight" in k for k in keys) and any(".proj_in.lora_A.weight" in k for k in keys)
    adapter = read_lora(tmp_path)
    _assert_adapter_matches_live(adapter, sd15, peft_helpers, key_of)


def test_old_attention_processor_names_match_diffusers_own_loader(sd15, peft_helpers, tiny_pipeline_cls):
    g = torch.Generator().manual_seed(7)
    blk = "down_blocks.0.attentions.0"
    tb = f"{blk}.transformer_blocks.0"
    shapes = {  # old name -> (in, out)
        f"unet.{tb}.attn1.processor.to_q_lora": (32, 32),
        f"unet.{tb}.attn1.processor.to_out_lora": (32, 32),
        f"unet.{tb}.attn2.processor.to_k_lora": (32, 32),
        f"unet.{blk}.proj_in.lora": (32, 32),
        "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora": (32, 32),
        "text_encoder.text_model.encoder.layers.1.self_attn.to_out_lora": (32, 32),
        "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer": (32, 37),
    }
    sd = {}
    for name, (inp, out) in shapes.items():
        four_d = name.endswith("proj_in.lora")
        down, up = torch.randn(2, inp, generator=g), torch.randn(out, 2, generator=g)
        sd[f"{name}.down.weight"] = down[..., None, None] if four_d else down
        sd[f"{name}.up.weight"] = up[..., None, None] if four_d else up
    adapter = read_lora(sd)
    assert adapter.format == "diffusers"
    assert set(adapter.layers) == {
        f"unet.{tb}.attn1.to_q", f"unet.{tb}.attn1.to_out.0", f"unet.{tb}.attn2.to_k", f"unet.{blk}.proj_in",
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        "text_encoder.text_model.encoder.layers.1.self_attn.out_proj",
        "text_encoder.text_model.encoder.layers.0.mlp.fc1",
    }
    assert all(l.alpha == l.rank for l in adapter.layers.values())  # no alpha: scale 1
    pipe = tiny_pipeline_cls(sd15["unet"], sd15["text_encoder"])
    pipe.load_lora_weights(dict(sd))
    _assert_diffusers_loaded(pipe, adapter, peft_helpers)


def test_model_level_save_lora_adapter_unprefixed(sd15, peft_helpers, key_of, tmp_path):
    _inject(sd15, peft_helpers, UNET_CFG)
    sd15["unet"].save_lora_adapter(str(tmp_path))
    adapter = read_lora(tmp_path, component="unet")
    _assert_adapter_matches_live(adapter, {"unet": sd15["unet"]}, peft_helpers, key_of)
    bare = read_lora(tmp_path)
    assert set(bare.layers) == {k.removeprefix("unet.") for k in adapter.layers}


def test_sdxl_text_encoder_2_reads_back(sdxl, peft_helpers, key_of, tmp_path):
    te2 = sdxl["text_encoder_2"]
    te2.add_adapter(LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "fc2"], init_lora_weights=False))
    peft_helpers.randomize_lora(te2, seed=5)
    StableDiffusionXLLoraLoaderMixin.save_lora_weights(
        tmp_path, text_encoder_2_lora_layers=get_peft_model_state_dict(te2),
        text_encoder_2_lora_adapter_metadata=te2.peft_config["default"].to_dict())
    adapter = read_lora(tmp_path)
    assert adapter.components() == ["text_encoder_2"]
    _assert_adapter_matches_live(adapter, {"text_encoder_2": te2}, peft_helpers, key_of)


# ---------------------------------------------------------------------------------------------
# save_lora_weights: same file as diffusers, loads in diffusers


def test_save_lora_weights_writes_what_diffusers_writes(sd15, peft_helpers, tmp_path):
    _inject(sd15, peft_helpers, UNET_CFG, TE_CFG)
    unet_sd = get_peft_model_state_dict(sd15["unet"])
    te_sd = get_peft_model_state_dict(sd15["text_encoder"])
    metas = dict(unet_lora_adapter_metadata=sd15["unet"].peft_config["default"].to_dict(),
                 text_encoder_lora_adapter_metadata=sd15["text_encoder"].peft_config["default"].to_dict())
    for m in metas.values():  # sets are written as lists in undefined order; make both writers see lists
        m["target_modules"] = sorted(m["target_modules"])
    StableDiffusionLoraLoaderMixin.save_lora_weights(tmp_path / "ref", unet_lora_layers=unet_sd,
                                                     text_encoder_lora_layers=te_sd, **metas)
    save_lora_weights(tmp_path / "ours", unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd, **metas)
    ref_file = tmp_path / "ref" / "pytorch_lora_weights.safetensors"
    our_file = tmp_path / "ours" / "pytorch_lora_weights.safetensors"
    with safe_open(str(ref_file), "pt") as a, safe_open(str(our_file), "pt") as b:
        assert a.metadata() == b.metadata()
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k


def test_save_lora_weights_accepts_peft_names_and_loads_in_diffusers(sd15_pair, peft_helpers, key_of,
                                                                     tiny_pipeline_cls, tmp_path):
    src, dst = sd15_pair
    _inject(src, peft_helpers, UNET_CFG, TE_CFG)
    # A PeftModel-style state dict: base_model.model. prefix and the adapter name in every key.
    unet_live = {f"base_model.model.{k}": v for k, v in src["unet"].state_dict().items() if "lora_" in k}
    assert any(".lora_A.default.weight" in k for k in unet_live)
    save_lora_weights(tmp_path, unet_lora_layers=unet_live,
                      text_encoder_lora_layers=get_peft_model_state_dict(src["text_encoder"]),
                      unet_lora_adapter_metadata=src["unet"].peft_config["default"].to_dict(),
                      text_encoder_lora_adapter_metadata=src["text_encoder"].peft_config["default"].to_dict())
    keys = list(st_load(str(tmp_path / "pytorch_lora_weights.safetensors")))
    assert all(k.startswith(("unet.", "text_encoder.")) and "default" not in k for k in keys)
    adapter = read_lora(tmp_path)
    _assert_adapter_matches_live(adapter, src, peft_helpers, key_of)
    pipe = tiny_pipeline_cls(dst["unet"], dst["text_encoder"])
    pipe.load_lora_weights(str(tmp_path))
    _assert_diffusers_loaded(pipe, adapter, peft_helpers)


def test_save_lora_weights_semantics(tmp_path):
    unet = {"a.lora_A.weight": torch.randn(2, 4), "a.lora_B.weight": torch.randn(3, 2)}
    with pytest.raises(ValueError, match="at least one"):
        save_lora_weights(tmp_path)
    with pytest.raises(ValueError, match="safe_serialization"):
        save_lora_weights(tmp_path, unet_lora_layers=unet, safe_serialization=False,
                          unet_lora_adapter_metadata={"r": 2})
    with pytest.raises(TypeError):
        save_lora_weights(tmp_path, unet_lora_layers=unet, unet_lora_adapter_metadata=[("r", 2)])

    save_lora_weights(tmp_path / "none", unet_lora_layers=unet, is_main_process=False)
    assert not (tmp_path / "none").exists()

    save_lora_weights(tmp_path / "new" / "dir", unet_lora_layers=unet)  # created if missing
    path = tmp_path / "new" / "dir" / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == {"unet.a.lora_A.weight", "unet.a.lora_B.weight"}

    save_lora_weights(tmp_path / "bin", unet_lora_layers=unet, safe_serialization=False)
    loaded = torch.load(tmp_path / "bin" / "pytorch_lora_weights.bin", weights_only=True)
    assert torch.equal(loaded["unet.a.lora_A.weight"], unet["a.lora_A.weight"])

    calls = []
    save_lora_weights(tmp_path / "fn", unet_lora_layers=unet, weight_name="x.safetensors",
                      save_function=lambda sd, p: calls.append((sorted(sd), p)))
    assert calls == [(["unet.a.lora_A.weight", "unet.a.lora_B.weight"], os.path.join(tmp_path / "fn", "x.safetensors"))]

    module = torch.nn.Module()
    module.register_buffer("a_lora_A", torch.randn(2, 4))
    with pytest.raises(LoraFormatError, match="a_lora_A"):  # an nn.Module's state dict is validated too
        save_lora_weights(tmp_path / "m", unet_lora_layers=module)
    with pytest.raises(LoraFormatError, match=r"unet\.a\.lora_A\.weight.*rank 2.*says 3"):
        save_lora_weights(tmp_path / "bad", unet_lora_layers=unet, unet_lora_adapter_metadata={"r": 3})
    assert not (tmp_path / "bad").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(LoraFormatError, match="not a file"):
        save_lora_weights(tmp_path / "file", unet_lora_layers=unet)


def test_save_lora_weights_sees_through_a_compiled_module(tmp_path):
    """``unet_lora_layers=torch.compile(m)`` writes the module's own keys, not ``_orig_mod.``-prefixed ones."""
    module = torch.nn.Module()
    module.a = torch.nn.Module()
    module.a.lora_A = torch.nn.Linear(4, 2, bias=False)
    module.a.lora_B = torch.nn.Linear(2, 3, bias=False)
    save_lora_weights(tmp_path, unet_lora_layers=torch.compile(module))
    with safe_open(str(tmp_path / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert set(f.keys()) == {"unet.a.lora_A.weight", "unet.a.lora_B.weight"}
        assert torch.equal(f.get_tensor("unet.a.lora_B.weight"), module.a.lora_B.weight.detach())


# ---------------------------------------------------------------------------------------------
# LoraAdapter.save(format="diffusers") loads in diffusers with exact per-module scales


def _adapter_for_sd15(sd15, variant, seed=0):
    """Layers on real SD1.5 module paths with per-module ranks and alphas (and the variant's extras)."""
    g = torch.Generator().manual_seed(seed)
    unet, te = sd15["unet"], sd15["text_encoder"]
    picks = [
        ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
        ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0"),
        ("unet", "mid_block.attentions.0.transformer_blocks.0.ff.net.2"),
        ("unet", "down_blocks.0.attentions.0.proj_in"),  # 1×1 Conv2d
        ("unet", "up_blocks.1.resnets.0.conv1"),  # 3×3 Conv2d
        ("unet", "down_blocks.1.resnets.0.time_emb_proj"),
        ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj"),
        ("text_encoder", "text_model.encoder.layers.1.mlp.fc1"),
    ]
    layers = {}
    for i, (comp, path) in enumerate(picks):
        model = unet if comp == "unet" else te
        mod = model.get_submodule(path if hasattr(model, "text_model") or comp == "unet"
                                  else path.removeprefix("text_model."))
        r = [2, 3, 4][i % 3]
        alpha = [8.0, 0.30078125, 3.0, 5.5][i % 4]
        w = mod.weight
        if isinstance(mod, torch.nn.Conv2d):
            down = torch.randn(r, *w.shape[1:], generator=g)
            if i % 2:  # a 1×1 conv may arrive as 2-D factors (kohya squeezes them)
                down = down.reshape(r, -1) if w.shape[2:] == (1, 1) else down
            up = torch.randn(w.shape[0], r, 1, 1, generator=g)
            if down.dim() == 2:
                up = up.reshape(w.shape[0], r)
            kind = "conv"
        else:
            down, up, kind = torch.randn(r, w.shape[1], generator=g), torch.randn(w.shape[0], r, generator=g), "linear"
        layer = LoraLayer(down=down, up=up, alpha=alpha, kind=kind, use_rslora=(variant == "rslora"))
        if variant == "dora":
            layer.magnitude = torch.rand(w.shape[0], generator=g) + 0.5
            layer.magnitude_axis = "out"
        if variant == "bias" and i % 2 == 0:  # modules without a bias get an exact zero one
            layer.bias = torch.randn(w.shape[0], generator=g)
        layers[f"{comp}.{path}"] = layer
    return LoraAdapter(layers=layers, format="kohya")


@pytest.mark.parametrize("variant", ["plain", "rslora", "dora", "bias"])
def test_adapter_save_diffusers_loads_in_diffusers(sd15_pair, peft_helpers, tiny_pipeline_cls, tmp_path, variant):
    src, dst = sd15_pair
    adapter = _adapter_for_sd15(src, variant)
    out = tmp_path / "lora.safetensors"
    adapter.save(out, format="diffusers")
    with safe_open(str(out), "pt") as f:
        header = f.metadata()
        keys = set(f.keys())
    assert header["format"] == "pt"
    meta = json.loads(header["lora_adapter_metadata"])
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in keys
    assert meta["unet.use_rslora"] == (variant == "rslora") and meta["unet.use_dora"] == (variant == "dora")
    assert all(k.startswith("^") for k in meta["unet.rank_pattern"])
    pipe = tiny_pipeline_cls(dst["unet"], dst["text_encoder"])
    pipe.load_lora_weights(str(out))
    _assert_diffusers_loaded(pipe, adapter, peft_helpers)
    back = read_lora(out)
    for key, layer in adapter.layers.items():
        assert torch.equal(back.layers[key].delta(), layer.delta()), key


def test_adapter_save_into_directory_uses_default_name(tmp_path):
    layer = LoraLayer(torch.randn(2, 4), torch.randn(3, 2), 1.0)
    LoraAdapter({"unet.a": layer}, "diffusers").save(tmp_path, format="diffusers")
    assert os.listdir(tmp_path) == ["pytorch_lora_weights.safetensors"]


# ---------------------------------------------------------------------------------------------
# malformed diffusers inputs


def _write(path, tensors, metadata=None):
    st_save(tensors, str(path), metadata=metadata)
    return path


def _ab(prefix="unet.a", r=2):
    return {f"{prefix}.lora_A.weight": torch.randn(r, 4), f"{prefix}.lora_B.weight": torch.randn(3, r)}


@pytest.mark.parametrize(
    "tensors, meta, match",
    [
        (_ab(), "{oops", "not valid JSON"),
        (_ab(), json.dumps([1, 2]), "JSON object"),
        (_ab(), json.dumps({"unet.r": 2, "unet.lora_alpha": "x"}), "lora_alpha"),
        (_ab(), json.dumps({"unet.r": 2, "unet.rank_pattern": {"^a": 5}}), r"unet\.a\.lora_A\.weight.*'\^a'"),
        (_ab(), json.dumps({"unet.r": 2, "unet.use_rslora": "yes"}), "use_rslora"),
        ({**_ab(), "unet.a.lora_magnitude_vector": torch.rand(3)}, json.dumps({"unet.r": 2}), "use_dora=false"),
    ],
)
def test_bad_metadata_raises(tmp_path, tensors, meta, match):
    path = _write(tmp_path / "f.safetensors", tensors, {"format": "pt", "lora_adapter_metadata": meta})
    with pytest.raises(LoraFormatError, match=match) as info:
        read_lora(path)
    assert str(path) in str(info.value)


def test_metadata_for_one_component_only_leaves_others_at_scale_one(tmp_path):
    tensors = {**_ab("unet.a", 2), **_ab("text_encoder.b", 2)}
    path = _write(tmp_path / "f.safetensors", tensors,
                  {"format": "pt", "lora_adapter_metadata": json.dumps({"unet.r": 2, "unet.lora_alpha": 6})})
    adapter = read_lora(path)
    assert adapter.layers["unet.a"].scale == 3.0 and adapter.layers["text_encoder.b"].scale == 1.0


@pytest.mark.parametrize(
    "tensors, match",
    [
        ({"unet.a.lora_A.weight": torch.randn(2, 4)}, r"unet\.a\.lora_A\.weight.*no matching lora_B"),
        ({"unet.a.lora_A.weight": torch.randn(2, 4), "unet.a.lora_B.weight": torch.randn(3, 4)},
         r"rank mismatch.*unet\.a\.lora_A\.weight"),
        ({**_ab(), "a.lora_A.weight": torch.randn(2, 4), "a.lora_B.weight": torch.randn(3, 2)},
         r"'a\.lora_A\.weight' has no component prefix"),
        ({**_ab(), "unet.a.lora_down.weight": torch.randn(2, 4)}, r"unet\.a\.lora_down\.weight"),
        ({**_ab(), "unet.a.lora_B.bias": torch.randn(4)}, r"unet\.a\.lora_B\.bias.*expected \(3,\)"),
        ({**_ab(), "unet.a.to_q_lora.down.weight": torch.randn(2, 4)}, "no matching"),
        ({"unet.c.lora_A.weight": torch.randn(2, 4, 3), "unet.c.lora_B.weight": torch.randn(3, 2, 1)},
         r"unet\.c\.lora_A\.weight.*2-D.*4-D"),
    ],
)
def test_malformed_diffusers_state_dict_names_key(tensors, match):
    with pytest.raises(LoraFormatError, match=match):
        read_lora(tensors)


def test_same_module_under_two_spellings_rejected():
    sd = {**_ab("unet.x.attn1.to_q"),
          "unet.x.attn1.processor.to_q_lora.down.weight": torch.randn(2, 4),
          "unet.x.attn1.processor.to_q_lora.up.weight": torch.randn(3, 2)}
    with pytest.raises(LoraFormatError, match="to_q_lora.down.weight.*both give|both give"):
        read_lora(sd)


def test_component_argument_must_agree_with_prefixes():
    with pytest.raises(LoraFormatError, match="component='text_encoder'"):
        read_lora(_ab("unet.a"), component="text_encoder")
    assert list(read_lora(_ab("unet.a"), component="unet").layers) == ["unet.a"]
    assert list(read_lora({k.removeprefix("unet."): v for k, v in _ab().items()}, component="unet").layers) == [
        "unet.a"]
    assert split_component("unet.a") == ("unet", "a")
