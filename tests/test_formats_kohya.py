"""kohya / A1111 / LoCon reading and writing: name tables, interop with diffusers/PEFT, edge cases."""

from __future__ import annotations

import functools
import importlib.util
import math
import warnings
from pathlib import Path

import pytest
import torch

from lora_fast.adapter import LoraAdapter, LoraLayer
from lora_fast.errors import LoraFormatError
from lora_fast.formats.kohya import (
    is_kohya,
    kohya_module_name,
    kohya_name_table,
    read_kohya,
    write_kohya,
)
from lora_fast.models import build_components, unet_config

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from diffusers.loaders.lora_pipeline import (  # noqa: E402
    StableDiffusionLoraLoaderMixin,
    StableDiffusionXLLoraLoaderMixin,
)
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.tuners.lora import LoraLayer as PeftLoraLayer  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TE_COMPONENTS = ("text_encoder", "text_encoder_2")


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_kohya_names", ROOT / "scripts" / "gen_kohya_names.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _targets(model):
    for path, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            yield path, module


def _adapter_key(component: str, model, path: str) -> str:
    """lora_fast adapter key of a module: text encoders always spell the text_model. level."""
    if component in TE_COMPONENTS and not path.startswith("text_model.") and path != "text_projection":
        return f"{component}.text_model.{path}"
    return f"{component}.{path}"


@functools.lru_cache(maxsize=None)
def _components(family: str, size: str):
    device = "meta" if size == "full" else "cpu"
    return build_components(family, size, device=device)


def _pair(name, down, up, alpha=None, **extra):
    sd = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
    if alpha is not None:
        sd[f"{name}.alpha"] = alpha
    for suffix, value in extra.items():
        sd[f"{name}.{suffix}"] = value
    return sd


def _ref_delta(up, down, scale, mid=None):
    """float64 ΔW from first principles, flattened to (out, in·kh·kw)."""
    u = up.double().reshape(up.shape[0], -1)
    if mid is not None:
        a = torch.einsum("pqyx,qi->piyx", mid.double(), down.double().reshape(down.shape[0], -1))
        return scale * u @ a.reshape(a.shape[0], -1)
    return scale * u @ down.double().reshape(down.shape[0], -1)


def _assert_delta(layer: LoraLayer, up, down, scale, mid=None):
    got = layer.delta().double().reshape(layer.out_features, -1)
    # float32 vs float64 accumulation over ≤ in·kh·kw terms of O(1) values
    torch.testing.assert_close(got, _ref_delta(up, down, scale, mid), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# name tables


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_tables_cover_every_module_of_the_full_models(family):
    table = kohya_name_table(family)
    count = 0
    for component, model in _components(family, "full").items():
        for path, module in _targets(model):
            key = _adapter_key(component, model, path)
            name = kohya_module_name(key, family)
            assert table[name] == key
            count += 1
    # and nothing else: every table entry is a module of these models
    assert len(set(table.values())) == count


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_tables_cover_every_module_of_the_tiny_models(family):
    table = kohya_name_table(family)
    for component, model in _components(family, "tiny").items():
        for path, _ in _targets(model):
            key = _adapter_key(component, model, path)
            assert table[kohya_module_name(key, family)] == key


def test_sdxl_writes_ldm_names_and_sd_writes_diffusers_names():
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert kohya_module_name(key, "sdxl") == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert kohya_module_name(key, "sd15") == "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    te = "text_encoder.text_model.encoder.layers.0.mlp.fc1"
    assert kohya_module_name(te, "sd15") == "lora_te_text_model_encoder_layers_0_mlp_fc1"
    assert kohya_module_name(te, "sdxl") == "lora_te1_text_model_encoder_layers_0_mlp_fc1"


WORKED_EXAMPLES = [
    # reference §2.7 (every row was produced by diffusers' own converters)
    ("sd15", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
     "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("sd15", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0",
     "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0"),
    ("sd15", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
     "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"),
    ("sd15", "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k",
     "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"),
    ("sd15", "lora_unet_down_blocks_0_attentions_0_proj_in", "unet.down_blocks.0.attentions.0.proj_in"),
    ("sd15", "lora_unet_down_blocks_0_resnets_0_time_emb_proj", "unet.down_blocks.0.resnets.0.time_emb_proj"),
    ("sd15", "lora_unet_down_blocks_2_resnets_0_conv_shortcut", "unet.down_blocks.2.resnets.0.conv_shortcut"),
    ("sd15", "lora_unet_up_blocks_0_upsamplers_0_conv", "unet.up_blocks.0.upsamplers.0.conv"),
    ("sd15", "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
     "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"),
    ("sd15", "lora_te_text_model_encoder_layers_0_mlp_fc1", "text_encoder.text_model.encoder.layers.0.mlp.fc1"),
    ("sdxl", "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
     "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("sdxl", "lora_unet_input_blocks_8_1_transformer_blocks_1_attn1_to_k",
     "unet.down_blocks.2.attentions.1.transformer_blocks.1.attn1.to_k"),
    ("sdxl", "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_q",
     "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("sdxl", "lora_unet_output_blocks_0_1_transformer_blocks_1_attn2_to_v",
     "unet.up_blocks.0.attentions.0.transformer_blocks.1.attn2.to_v"),
    ("sdxl", "lora_unet_output_blocks_5_1_proj_out", "unet.up_blocks.1.attentions.2.proj_out"),
    ("sdxl", "lora_unet_input_blocks_1_0_in_layers_2", "unet.down_blocks.0.resnets.0.conv1"),
    ("sdxl", "lora_unet_input_blocks_1_0_emb_layers_1", "unet.down_blocks.0.resnets.0.time_emb_proj"),
    ("sdxl", "lora_unet_input_blocks_1_0_out_layers_3", "unet.down_blocks.0.resnets.0.conv2"),
    ("sdxl", "lora_unet_input_blocks_3_0_op", "unet.down_blocks.0.downsamplers.0.conv"),
    ("sdxl", "lora_unet_output_blocks_5_2_conv", "unet.up_blocks.1.upsamplers.0.conv"),
    ("sdxl", "lora_unet_output_blocks_8_0_skip_connection", "unet.up_blocks.2.resnets.2.conv_shortcut"),
    ("sdxl", "lora_unet_middle_block_2_out_layers_3", "unet.mid_block.resnets.1.conv2"),
    ("sdxl", "lora_unet_input_blocks_0_0", "unet.conv_in"),
    ("sdxl", "lora_unet_out_2", "unet.conv_out"),
    ("sdxl", "lora_unet_time_embed_0", "unet.time_embedding.linear_1"),
    ("sdxl", "lora_unet_label_emb_0_0", "unet.add_embedding.linear_1"),
    ("sdxl", "lora_te1_text_model_encoder_layers_1_self_attn_v_proj",
     "text_encoder.text_model.encoder.layers.1.self_attn.v_proj"),
    ("sdxl", "lora_te2_text_model_encoder_layers_1_self_attn_v_proj",
     "text_encoder_2.text_model.encoder.layers.1.self_attn.v_proj"),
    # SD1.x files with LDM names (diffusers mis-maps these, §2.11); blocks >= 10 must not be confused with 1
    ("sd15", "lora_unet_input_blocks_1_1_proj_in", "unet.down_blocks.0.attentions.0.proj_in"),
    ("sd15", "lora_unet_input_blocks_10_0_in_layers_2", "unet.down_blocks.3.resnets.0.conv1"),
    ("sd15", "lora_unet_input_blocks_11_0_emb_layers_1", "unet.down_blocks.3.resnets.1.time_emb_proj"),
    ("sd15", "lora_unet_input_blocks_9_0_op", "unet.down_blocks.2.downsamplers.0.conv"),
    ("sd15", "lora_unet_output_blocks_2_1_conv", "unet.up_blocks.0.upsamplers.0.conv"),
    ("sd15", "lora_unet_output_blocks_8_2_conv", "unet.up_blocks.2.upsamplers.0.conv"),
    ("sd15", "lora_unet_output_blocks_10_1_transformer_blocks_0_attn1_to_q",
     "unet.up_blocks.3.attentions.1.transformer_blocks.0.attn1.to_q"),
    ("sd15", "lora_unet_output_blocks_11_1_proj_out", "unet.up_blocks.3.attentions.2.proj_out"),
    ("sd15", "lora_unet_output_blocks_11_0_skip_connection", "unet.up_blocks.3.resnets.2.conv_shortcut"),
    ("sd2", "lora_te_text_model_encoder_layers_22_mlp_fc2", "text_encoder.text_model.encoder.layers.22.mlp.fc2"),
    ("sdxl", "lora_te2_text_model_encoder_layers_31_mlp_fc2", "text_encoder_2.text_model.encoder.layers.31.mlp.fc2"),
    ("sdxl", "lora_te2_text_projection", "text_encoder_2.text_projection"),
]


@pytest.mark.parametrize("family,name,key", WORKED_EXAMPLES)
def test_worked_examples(family, name, key):
    assert kohya_name_table(family)[name] == key


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_ldm_names_agree_with_diffusers_single_file_converter(family):
    """The LDM names in the tables equal what diffusers' full-checkpoint LDM converter maps to each module."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    gen = _load_generator()
    cfg = unet_config(family, "full")
    unet = _components(family, "full")["unet"]
    checkpoint, expected = {}, {}
    for i, (path, _) in enumerate(_targets(unet)):
        ldm = gen.ldm_unet_path(path, cfg)
        weight, bias = torch.tensor([float(i)]), torch.tensor([-float(i)])
        checkpoint[f"model.diffusion_model.{ldm}.weight"] = weight
        checkpoint[f"model.diffusion_model.{ldm}.bias"] = bias
        expected[f"{path}.weight"] = weight
        assert kohya_name_table(family)["lora_unet_" + ldm.replace(".", "_")] == f"unet.{path}"
    converted = convert_ldm_unet_checkpoint(checkpoint, cfg)
    for key, weight in expected.items():
        assert converted[key] is weight, key


# ---------------------------------------------------------------------------------------------
# interop with diffusers / PEFT

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                "conv1", "conv2", "time_emb_proj", "conv_shortcut"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@functools.lru_cache(maxsize=None)
def _peft_export(family: str):
    """(kohya dict from diffusers' exporter, {adapter key: (lora_A, lora_B)}) for a PEFT-adapted tiny model."""
    torch.manual_seed(0)
    peft_sd, factors = {}, {}
    for component, model in build_components(family, "tiny").items():
        targets = UNET_TARGETS if component == "unet" else TE_TARGETS
        model.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
        for key, value in get_peft_model_state_dict(model).items():
            peft_sd[f"{component}.{key}"] = value
        for path, module in model.named_modules():
            if isinstance(module, PeftLoraLayer):
                factors[_adapter_key(component, model, path)] = (
                    module.lora_A["default"].weight.detach(), module.lora_B["default"].weight.detach())
    return convert_state_dict_to_kohya(dict(peft_sd)), factors


def test_reads_the_diffusers_exporter_output_exactly():
    kohya, factors = _peft_export("sd15")
    assert is_kohya(kohya)
    adapter = read_kohya(dict(kohya))
    assert adapter.format == "kohya"
    assert set(adapter.layers) == set(factors)
    for key, (a, b) in factors.items():
        layer = adapter.layers[key]
        assert torch.equal(layer.down, a) and torch.equal(layer.up, b)
        # the exporter writes alpha = rank, dropping lora_alpha=8 (reference §2.11): the file says scale 1
        assert layer.alpha == 4.0 and layer.scale == 1.0
        assert layer.kind == ("conv" if a.dim() == 4 else "linear")
        _assert_delta(layer, b, a, 1.0)
    # SD1.5 proj_in is a 1x1 Conv2d: kept as a conv layer with 4-D factors
    assert adapter.layers["unet.down_blocks.0.attentions.0.proj_in"].kind == "conv"


def _diffusers_scales(kohya: dict, family: str):
    """Load a kohya dict with diffusers' own machinery into fresh tiny models; {adapter key: (scaling, A, B)}."""
    mixin = StableDiffusionXLLoraLoaderMixin if family == "sdxl" else StableDiffusionLoraLoaderMixin
    models = build_components(family, "tiny")
    kwargs = {"unet_config": models["unet"].config} if family == "sdxl" else {}
    state_dict, alphas = mixin.lora_state_dict(dict(kohya), **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mixin.load_lora_into_unet(state_dict, alphas, unet=models["unet"], adapter_name="k")
        for component in TE_COMPONENTS:
            if component in models:
                mixin.load_lora_into_text_encoder(state_dict, alphas, text_encoder=models[component],
                                                  prefix=component, adapter_name="k")
    out = {}
    for component, model in models.items():
        for path, module in model.named_modules():
            if isinstance(module, PeftLoraLayer) and "k" in module.lora_A:
                out[_adapter_key(component, model, path)] = (
                    module.scaling["k"], module.lora_A["k"].weight, module.lora_B["k"].weight)
    return out


def _with_alphas(kohya: dict, alpha_of) -> dict:
    out = dict(kohya)
    names = sorted({k.split(".")[0] for k in kohya})
    for i, name in enumerate(names):
        out[f"{name}.alpha"] = torch.tensor(alpha_of(i, name))
    return out


def _standard_te_names(kohya: dict) -> dict:
    # diffusers' exporter names transformers-5 CLIPTextModel modules without text_model_ and uses lora_te1_;
    # kohya itself writes lora_te_text_model_... for SD1.x
    return {k.replace("lora_te1_encoder_", "lora_te_text_model_encoder_"): v for k, v in kohya.items()}


def test_uniform_alpha_matches_diffusers_loader():
    kohya, _ = _peft_export("sd15")
    kohya = _standard_te_names(_with_alphas(kohya, lambda i, n: 2.0))
    ours = read_kohya(dict(kohya))
    theirs = _diffusers_scales(kohya, "sd15")
    assert set(theirs) == set(ours.layers)
    for key, (scaling, a, b) in theirs.items():
        layer = ours.layers[key]
        assert scaling == layer.scale == 0.5, key
        assert torch.equal(a, layer.down.reshape(a.shape)) and torch.equal(b, layer.up.reshape(b.shape))


def test_per_module_alphas_where_diffusers_is_wrong():
    """diffusers 0.42 drops per-module alphas of attention projections (reference §3); we keep each one."""
    kohya, _ = _peft_export("sd15")
    kohya = _standard_te_names(_with_alphas(kohya, lambda i, n: (4.0, 16.0, 4.0)[i % 3]))
    ours = read_kohya(dict(kohya))
    name_of = {kohya_name_table("sd15")[n]: n for n in {k.split(".")[0] for k in kohya} if n.startswith("lora_")}
    for key, layer in ours.layers.items():
        assert layer.scale == float(kohya[f"{name_of[key]}.alpha"]) / 4
    theirs = _diffusers_scales(kohya, "sd15")
    wrong = [k for k, (scaling, _, _) in theirs.items() if scaling != ours.layers[k].scale]
    assert wrong, "expected diffusers 0.42.1 to mis-scale some modules with per-module alphas"
    projections = (".to_q", ".to_k", ".to_v", ".to_out.0", "_proj", ".fc1", ".fc2")
    assert all(k.endswith(projections) for k in wrong)
    assert any(k.startswith("unet.") for k in wrong) and any(k.startswith("text_encoder.") for k in wrong)


def test_sdxl_ldm_names_load_identically_in_diffusers():
    """write_kohya's SDXL file (LDM UNet names, te1/te2) lands on the same modules in diffusers' SDXL loader."""
    kohya, factors = _peft_export("sdxl")
    adapter = read_kohya(_with_alphas(kohya, lambda i, n: 2.0))
    assert set(adapter.layers) == set(factors)
    written = write_kohya(adapter)
    names = {k.split(".")[0] for k in written}
    assert any(n.startswith("lora_unet_input_blocks_") for n in names)
    assert any(n.startswith("lora_unet_output_blocks_") for n in names)
    assert any(n.startswith("lora_unet_middle_block_") for n in names)
    assert not any(n.startswith(("lora_unet_down_blocks", "lora_unet_up_blocks", "lora_te_")) for n in names)
    assert any(n.startswith("lora_te1_text_model_") for n in names)
    assert any(n.startswith("lora_te2_text_model_") for n in names)
    theirs = _diffusers_scales(written, "sdxl")
    assert set(theirs) == set(adapter.layers)
    for key, (scaling, a, b) in theirs.items():
        layer = adapter.layers[key]
        assert scaling == layer.scale == 0.5, key
        assert torch.equal(a, layer.down.reshape(a.shape)) and torch.equal(b, layer.up.reshape(b.shape))


# ---------------------------------------------------------------------------------------------
# tensor forms, scales and alphas

SD15_CONV1 = "lora_unet_down_blocks_0_resnets_0_conv1"  # tiny SD1.5: Conv2d(32, 32, 3)
SD15_PROJ_IN = "lora_unet_down_blocks_0_attentions_0_proj_in"  # 1x1 Conv2d in SD1.x
SDXL_PROJ_IN = "lora_unet_input_blocks_4_1_proj_in"  # Linear in SDXL
# a module only SDXL has (SD1.x's up_blocks.0 has no attention), so single-layer adapters write SDXL names
SDXL_ONLY_KEY, SDXL_ONLY_NAME = "unet.up_blocks.0.attentions.0.proj_in", "lora_unet_output_blocks_0_1_proj_in"


def test_locon_kxk_conv():
    down, up = torch.randn(4, 32, 3, 3), torch.randn(32, 4, 1, 1)
    layer = read_kohya(_pair(SD15_CONV1, down, up, torch.tensor(2.0)))
    layer = layer.layers["unet.down_blocks.0.resnets.0.conv1"]
    assert layer.kind == "conv" and layer.weight_shape == (32, 32, 3, 3)
    _assert_delta(layer, up, down, 0.5)
    # kohya's own conv formulation: conv2d(downᵀ, up)ᵀ
    ref = torch.nn.functional.conv2d(down.double().permute(1, 0, 2, 3), up.double()).permute(1, 0, 2, 3) * 0.5
    torch.testing.assert_close(layer.delta().double(), ref, rtol=1e-6, atol=1e-7)


def test_tucker_mid():
    down, mid, up = torch.randn(4, 32, 1, 1), torch.randn(4, 4, 3, 3), torch.randn(32, 4, 1, 1)
    adapter = read_kohya(_pair(SD15_CONV1, down, up, torch.tensor(8.0), **{"lora_mid.weight": mid}))
    layer = adapter.layers["unet.down_blocks.0.resnets.0.conv1"]
    assert layer.kind == "conv" and layer.mid is mid and layer.weight_shape == (32, 32, 3, 3)
    _assert_delta(layer, up, down, 2.0, mid=mid)


def test_one_by_one_conv_vs_linear_proj_in():
    sd1 = read_kohya(_pair(SD15_PROJ_IN, torch.randn(4, 32, 1, 1), torch.randn(32, 4, 1, 1)))
    assert sd1.layers["unet.down_blocks.0.attentions.0.proj_in"].kind == "conv"
    # SDXL proj_in is Linear; some tools save its factors 4-D 1x1: squeezed to a linear layer
    down, up = torch.randn(4, 64, 1, 1), torch.randn(64, 4, 1, 1)
    sdxl = read_kohya(_pair(SDXL_PROJ_IN, down, up))
    layer = sdxl.layers["unet.down_blocks.1.attentions.0.proj_in"]
    assert layer.kind == "linear" and layer.down.shape == (4, 64) and layer.up.shape == (64, 4)
    _assert_delta(layer, up, down, 1.0)
    # same diffusers-style name with 2-D factors on a tiny SD2 (Linear proj_in) reads as linear
    sd2 = read_kohya(_pair(SD15_PROJ_IN, torch.randn(4, 32), torch.randn(32, 4)))
    assert sd2.layers["unet.down_blocks.0.attentions.0.proj_in"].kind == "linear"


def test_full_size_shapes_pick_the_family_and_are_enforced():
    to_k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    sd15 = _pair(to_k, torch.randn(4, 768), torch.randn(320, 4))
    sd15.update(_pair(SD15_PROJ_IN, torch.randn(4, 320, 1, 1), torch.randn(320, 4, 1, 1)))
    assert read_kohya(sd15).layers["unet.down_blocks.0.attentions.0.proj_in"].kind == "conv"
    sd2 = _pair(to_k, torch.randn(4, 1024), torch.randn(320, 4))
    sd2.update(_pair(SD15_PROJ_IN, torch.randn(4, 320), torch.randn(320, 4)))
    assert read_kohya(sd2).layers["unet.down_blocks.0.attentions.0.proj_in"].kind == "linear"
    bad = dict(sd15)
    bad.update(_pair("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                     torch.randn(4, 320), torch.randn(321, 4)))
    with pytest.raises(LoraFormatError, match="attn1_to_q.lora_down.weight.*321"):
        read_kohya(bad)


@pytest.mark.parametrize("dtype,value", [(torch.float16, 0.300048828125), (torch.bfloat16, 0.30078125),
                                         (torch.float32, 0.30000001192092896), (torch.int64, 3.0)])
def test_alpha_dtypes_are_used_as_stored(dtype, value):
    sd = _pair(SD15_CONV1, torch.randn(4, 32, 3, 3), torch.randn(32, 4, 1, 1), torch.tensor(0.3 if dtype.is_floating_point else 3, dtype=dtype))
    layer = read_kohya(sd).layers["unet.down_blocks.0.resnets.0.conv1"]
    assert layer.alpha == value and layer.scale == value / 4


@pytest.mark.parametrize("alpha", [None, torch.tensor(0.0), torch.tensor(0, dtype=torch.int64)])
def test_missing_or_zero_alpha_means_scale_one(alpha):
    layer = read_kohya(_pair(SDXL_PROJ_IN, torch.randn(8, 64), torch.randn(64, 8), alpha))
    layer = layer.layers["unet.down_blocks.1.attentions.0.proj_in"]
    assert layer.alpha == 8.0 and layer.scale == 1.0


def test_a1111_scale_overrides_alpha():
    scale = torch.tensor(0.3, dtype=torch.float16)
    sd = _pair(SDXL_PROJ_IN, torch.randn(8, 64), torch.randn(64, 8), torch.tensor(4.0), scale=scale)
    layer = read_kohya(sd).layers["unet.down_blocks.1.attentions.0.proj_in"]
    assert layer.scale == float(scale) == 0.300048828125
    assert layer.alpha == float(scale) * 8


def test_per_module_alpha_and_rank():
    sd = _pair(SD15_CONV1, torch.randn(4, 32, 3, 3), torch.randn(32, 4, 1, 1), torch.tensor(1.0))
    sd.update(_pair(SD15_PROJ_IN, torch.randn(16, 32, 1, 1), torch.randn(32, 16, 1, 1), torch.tensor(64.0)))
    a = read_kohya(sd)
    assert a.layers["unet.down_blocks.0.resnets.0.conv1"].scale == 0.25
    assert a.layers["unet.down_blocks.0.attentions.0.proj_in"].scale == 4.0


# ---------------------------------------------------------------------------------------------
# DoRA


@pytest.mark.parametrize("shape,axis", [((1, 48), "in"), ((48,), "in"), ((64, 1), "out"), ((64,), "out")])
def test_dora_scale_axis_on_linear(shape, axis):
    name = "lora_te_text_model_encoder_layers_0_mlp_fc1"  # tiny CLIP: Linear(32 -> 37), not square
    inp, out = 32, 37
    shape = tuple(inp if d == 48 else out if d == 64 else d for d in shape)  # 48 stands for in, 64 for out
    mag = torch.rand(shape) + 0.5
    layer = read_kohya(_pair(name, torch.randn(4, inp), torch.randn(out, 4), dora_scale=mag))
    layer = layer.layers["text_encoder.text_model.encoder.layers.0.mlp.fc1"]
    assert layer.magnitude is mag and layer.magnitude_axis == axis


def test_dora_scale_on_conv_and_round_trip():
    mag_in = torch.rand(1, 32, 1, 1)
    sd = _pair(SD15_CONV1, torch.randn(4, 32, 3, 3), torch.randn(32, 4, 1, 1), dora_scale=mag_in)
    layer = read_kohya(sd).layers["unet.down_blocks.0.resnets.0.conv1"]
    assert layer.magnitude_axis == "in"
    back = write_kohya(read_kohya(sd))
    assert torch.equal(back[f"{SD15_CONV1}.dora_scale"], mag_in)
    mag_out = torch.rand(32, 1, 1, 1)  # square conv but 4-D shape says output rows
    sd[f"{SD15_CONV1}.dora_scale"] = mag_out
    layer = read_kohya(sd).layers["unet.down_blocks.0.resnets.0.conv1"]
    assert layer.magnitude_axis == "out"
    assert torch.equal(write_kohya(read_kohya(sd))[f"{SD15_CONV1}.dora_scale"], mag_out)


def test_dora_scale_ambiguous_or_misshaped():
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # tiny CLIP: Linear(32 -> 32), square
    with pytest.raises(LoraFormatError, match=r"q_proj\.dora_scale.*ambiguous"):
        read_kohya(_pair(name, torch.randn(4, 32), torch.randn(32, 4), dora_scale=torch.rand(32)))
    with pytest.raises(LoraFormatError, match=r"q_proj\.dora_scale"):
        read_kohya(_pair(name, torch.randn(4, 32), torch.randn(32, 4), dora_scale=torch.rand(1, 31)))


# ---------------------------------------------------------------------------------------------
# malformed input


@pytest.mark.parametrize("sd,match", [
    (_pair("lora_unet_down_blocks_0_attentions_0_proj_inn", torch.randn(4, 32), torch.randn(32, 4)),
     "proj_inn.lora_down.weight.*unknown kohya module name"),
    ({f"{SD15_CONV1}.lora_down.weight": torch.randn(4, 32, 3, 3), f"{SD15_CONV1}.alpha": torch.tensor(4.0)},
     f"{SD15_CONV1}.*lora_up.weight"),
    ({f"{SD15_CONV1}.lora_up.weight": torch.randn(32, 4, 1, 1)}, f"{SD15_CONV1}.*lora_down.weight"),
    (_pair(SD15_CONV1, torch.randn(4, 32, 3, 3), torch.randn(32, 5, 1, 1)), f"{SD15_CONV1}.lora_down.weight.*rank"),
    (_pair(SD15_CONV1, torch.randn(4, 32, 3, 3), torch.randn(32, 4, 1, 1), torch.tensor(True)),
     f"{SD15_CONV1}.alpha.*real number"),
    (_pair(SD15_CONV1, torch.randn(4, 32, 3, 3), torch.randn(32, 4, 1, 1), "4"), f"{SD15_CONV1}.alpha"),
    (_pair(SD15_CONV1, torch.randn(4, 32, 3, 3), torch.randn(32, 4, 1, 1), torch.tensor([4.0, 4.0])),
     f"{SD15_CONV1}.alpha.*single number"),
    (_pair(SD15_CONV1, torch.randn(4, 32, 3, 3), torch.randn(32, 4, 1, 1), torch.tensor(float("nan"))),
     f"{SD15_CONV1}.alpha.*nan"),
    ({f"{SD15_CONV1}.hada_w1_a": torch.randn(4, 32)}, f"{SD15_CONV1}.hada_w1_a.*LoHa"),
    ({f"{SD15_CONV1}.lokr_w1": torch.randn(4, 4)}, f"{SD15_CONV1}.lokr_w1.*LoKr"),
    ({f"{SD15_CONV1}.lora_down": torch.randn(4, 4)}, f"{SD15_CONV1}.lora_down.*unknown kohya tensor"),
    (_pair(SD15_CONV1, torch.randn(4, 32), torch.randn(32, 4)), f"{SD15_CONV1}.lora_down.weight.*3×3"),
    (_pair(SDXL_PROJ_IN, torch.randn(4, 64, 3, 3), torch.randn(64, 4, 1, 1)), f"{SDXL_PROJ_IN}.*Linear"),
    (_pair(SD15_CONV1, torch.randint(0, 3, (4, 32, 3, 3)), torch.randn(32, 4, 1, 1)), "lora_down.weight.*floating"),
    ({**_pair(SD15_PROJ_IN, torch.randn(4, 32, 1, 1), torch.randn(32, 4, 1, 1)),
      **_pair("lora_unet_input_blocks_1_1_proj_in", torch.randn(4, 32, 1, 1), torch.randn(32, 4, 1, 1))},
     "input_blocks_1_1_proj_in.*already targeted"),
    ({**_pair("lora_unet_down_blocks_0_attentions_0_proj_in", torch.randn(4, 32, 1, 1), torch.randn(32, 4, 1, 1)),
      **_pair("lora_te2_text_projection", torch.randn(4, 32), torch.randn(32, 4))}, "mix model families"),
    ({"bundle_emb.foo.string_to_param.*": torch.randn(2, 32)}, "bundle_emb.*textual-inversion"),
    ({"lora_unet_conv_in": torch.randn(2)}, "lora_unet_conv_in.*no '.<tensor>'"),
])
def test_malformed_inputs_name_the_key(sd, match):
    with pytest.raises(LoraFormatError, match=match):
        read_kohya(sd, source="bad.safetensors")
    with pytest.raises(LoraFormatError, match="bad.safetensors"):
        read_kohya(sd, source="bad.safetensors")


def test_is_kohya():
    assert is_kohya(["lora_unet_x.lora_down.weight", "lora_te_y.alpha", "lora_te1_z.alpha", "lora_te2_w.alpha"])
    assert is_kohya(["lora_unet_x.lora_down.weight", "bundle_emb.tok.string_to_param.*"])
    assert not is_kohya([])
    assert not is_kohya(["bundle_emb.tok.string_to_param.*"])
    assert not is_kohya(["unet.down_blocks.0.lora_A.weight", "lora_unet_x.alpha"])
    assert not is_kohya(["base_model.model.x.lora_A.weight"])


def test_reading_does_not_modify_or_copy():
    down, up = torch.randn(4, 32, 3, 3), torch.randn(32, 4, 1, 1)
    sd = _pair(SD15_CONV1, down, up, torch.tensor(2.0))
    before = dict(sd)
    layer = read_kohya(sd).layers["unet.down_blocks.0.resnets.0.conv1"]
    assert sd == before
    assert layer.down is down and layer.up is up


# ---------------------------------------------------------------------------------------------
# writing and round trips


def _random_adapter(family: str, seed: int = 0) -> LoraAdapter:
    """A layer on every Linear/Conv2d of the tiny models, with varied ranks, alphas and extras."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    i = 0
    for component, model in _components(family, "tiny").items():
        for path, module in _targets(model):
            i += 1
            r = 1 + i % 7
            w = module.weight
            alpha = float(torch.tensor(0.1 * (i % 13) + 0.3, dtype=torch.float16)) if i % 5 else float(r)
            dtype = (torch.float32, torch.float16, torch.bfloat16)[i % 3]
            if isinstance(module, torch.nn.Conv2d):
                kh, kw = w.shape[2:]
                up = torch.randn(w.shape[0], r, 1, 1, generator=g).to(dtype)
                if kh > 1 and i % 4 == 0:
                    layer = LoraLayer(down=torch.randn(r, w.shape[1], 1, 1, generator=g).to(dtype), up=up,
                                      alpha=alpha, kind="conv", mid=torch.randn(r, r, kh, kw, generator=g).to(dtype))
                else:
                    layer = LoraLayer(down=torch.randn(r, w.shape[1], kh, kw, generator=g).to(dtype), up=up,
                                      alpha=alpha, kind="conv")
            else:
                layer = LoraLayer(down=torch.randn(r, w.shape[1], generator=g).to(dtype),
                                  up=torch.randn(w.shape[0], r, generator=g).to(dtype), alpha=alpha,
                                  use_rslora=(i % 6 == 0))
                if i % 9 == 0:
                    layer.magnitude, layer.magnitude_axis = torch.rand(1, w.shape[1], generator=g) + 0.5, "in"
            layers[_adapter_key(component, model, path)] = layer
    return LoraAdapter(layers=layers, format="diffusers")


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_round_trip_keeps_every_delta(family):
    adapter = _random_adapter(family)
    assert any(l.use_rslora for l in adapter.layers.values()) and any(l.mid is not None for l in adapter.layers.values())
    written = write_kohya(adapter)
    assert all(v.is_contiguous() for v in written.values())
    names = {k.split(".")[0] for k in written}
    if family == "sdxl":
        assert "lora_unet_input_blocks_0_0" in names and not any(n.startswith("lora_te_") for n in names)
        assert any(n.startswith("lora_te2_") for n in names)
    else:
        assert "lora_unet_conv_in" in names and not any(n.startswith(("lora_te1_", "lora_te2_")) for n in names)
    for name in names:
        assert written[f"{name}.alpha"].dim() == 0
    back = read_kohya(written)
    assert set(back.layers) == set(adapter.layers)
    for key, layer in adapter.layers.items():
        got = back.layers[key]
        if layer.use_rslora:  # folded into alpha: exact or the nearest double (see test_rslora_fold_*)
            assert abs(got.scale - layer.scale) <= math.ulp(layer.scale), key
        else:
            assert got.scale == layer.scale and got.alpha == layer.alpha, key
        assert torch.equal(got.delta(), layer.delta()), key
        assert (got.magnitude is None) == (layer.magnitude is None)
        if layer.magnitude is not None:
            assert torch.equal(got.magnitude, layer.magnitude) and got.magnitude_axis == "in"
        assert (got.mid is None) == (layer.mid is None)
    # a second trip is the identity on the file
    again = write_kohya(back)
    assert set(again) == set(written)
    assert all(torch.equal(again[k], written[k]) and again[k].dtype == written[k].dtype for k in written)


def test_round_trip_of_the_peft_export_with_per_module_alphas():
    kohya, _ = _peft_export("sd15")
    kohya = _standard_te_names(_with_alphas(kohya, lambda i, n: torch.tensor(0.1 * i + 1, dtype=torch.bfloat16).item()))
    adapter = read_kohya(kohya)
    written = write_kohya(adapter)
    assert set(written) == set(kohya)  # kohya's own SD1.5 names come back
    back = read_kohya(written)
    for key, layer in adapter.layers.items():
        assert back.layers[key].alpha == layer.alpha and torch.equal(back.layers[key].delta(), layer.delta())


@pytest.mark.parametrize("alpha,rank", [(8.0, 4), (16.0, 8), (1.0, 3), (0.3, 7), (32.0, 128), (4.0, 5), (1e-3, 17)])
def test_rslora_fold_is_exact(alpha, rank):
    layer = LoraLayer(down=torch.randn(rank, 64), up=torch.randn(64, rank), alpha=alpha, use_rslora=True)
    written = write_kohya(LoraAdapter({SDXL_ONLY_KEY: layer}, "peft"))
    stored = written[f"{SDXL_ONLY_NAME}.alpha"]
    assert stored.dim() == 0 and stored.dtype in (torch.float32, torch.float64)
    back = read_kohya(written).layers[SDXL_ONLY_KEY]
    target = alpha / math.sqrt(rank)
    assert not back.use_rslora
    # exact where a double divides back exactly; otherwise the nearest double (≤ 1 ulp) with the same float32
    assert abs(back.scale - target) <= math.ulp(target)
    assert torch.tensor(back.scale, dtype=torch.float32) == torch.tensor(target, dtype=torch.float32)
    assert torch.equal(back.delta(), layer.delta())


def test_rslora_fold_is_exact_for_most_alphas():
    exact = total = 0
    for rank in range(1, 65):
        for alpha in (1.0, 2.0, 4.0, 8.0, 16.0, 0.5, 3.0):
            layer = LoraLayer(down=torch.ones(rank, 2), up=torch.ones(2, rank), alpha=alpha, use_rslora=True)
            back = read_kohya(write_kohya(LoraAdapter({SDXL_ONLY_KEY: layer}, "peft"))).layers[SDXL_ONLY_KEY]
            exact += back.scale == layer.scale
            total += 1
    assert exact / total > 0.9


def test_alpha_not_representable_in_float32_is_stored_as_float64():
    layer = LoraLayer(down=torch.randn(4, 64), up=torch.randn(64, 4), alpha=0.3)
    written = write_kohya(LoraAdapter({SDXL_ONLY_KEY: layer}, "diffusers"))
    assert written[f"{SDXL_ONLY_NAME}.alpha"].dtype == torch.float64
    assert read_kohya(written).layers[SDXL_ONLY_KEY].alpha == 0.3
    layer.alpha = 8.0
    written = write_kohya(LoraAdapter({SDXL_ONLY_KEY: layer}, "diffusers"))
    assert written[f"{SDXL_ONLY_NAME}.alpha"].dtype == torch.float32


def test_writer_family_rule():
    lin = lambda i, o: LoraLayer(down=torch.randn(2, i), up=torch.randn(o, 2), alpha=2)  # noqa: E731
    # modules that exist in SD1.x and SDXL alike, tiny widths: SD naming
    shared = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert set(write_kohya(LoraAdapter({shared: lin(64, 64)}, "x"))) >= {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha"}
    # ... at full SDXL width: SDXL naming
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha" in write_kohya(
        LoraAdapter({shared: lin(640, 640)}, "x"))
    # an SDXL-only module, or text_encoder_2, decides SDXL
    only_sdxl = "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q"
    out = write_kohya(LoraAdapter({shared: lin(64, 64), only_sdxl: lin(64, 64)}, "x"))
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.alpha" in out
    te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    te2 = "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj"
    out = write_kohya(LoraAdapter({te: lin(32, 32), te2: lin(32, 32)}, "x"))
    assert set(k.split(".")[0] for k in out) == {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                                                 "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"}
    # text encoder alone: lora_te_; a key without text_model. (live CLIPTextModel path) is accepted
    out = write_kohya(LoraAdapter({"text_encoder.encoder.layers.0.self_attn.q_proj": lin(32, 32)}, "x"))
    assert set(out) >= {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"}
    # SD1-only and SDXL-only modules together: no naming fits
    with pytest.raises(LoraFormatError, match="mix"):
        write_kohya(LoraAdapter({"unet.down_blocks.0.attentions.0.proj_in": lin(32, 32), only_sdxl: lin(64, 64)}, "x"))


def test_writer_rejects_what_kohya_cannot_express():
    key = SDXL_ONLY_KEY

    def adapter(**kw):
        base = dict(down=torch.randn(4, 64), up=torch.randn(64, 4), alpha=4.0)
        base.update(kw)
        return LoraAdapter({key: LoraLayer(**base)}, "peft")

    cases = [
        (adapter(magnitude=torch.rand(64), magnitude_axis="out"), "PEFT-style DoRA"),
        (adapter(magnitude=torch.rand(1, 64, 1, 1), magnitude_axis="out"), "PEFT-style DoRA"),
        (adapter(fan_in_fan_out=True), "fan_in_fan_out"),
        (adapter(bias=torch.randn(64)), "bias"),
        (adapter(alpha=0.0), "alpha 0"),
        (LoraAdapter({"text_encoder.text_model.embeddings.token_embedding": LoraLayer(
            down=torch.randn(4, 100), up=torch.randn(32, 4), alpha=4, kind="embedding")}, "peft"), "embedding"),
        (LoraAdapter({"transformer.transformer_blocks.0.attn.to_q": LoraLayer(
            down=torch.randn(4, 32), up=torch.randn(32, 4), alpha=4)}, "peft"), "transformer.transformer_blocks"),
        (LoraAdapter({"down_blocks.1.attentions.0.proj_in": LoraLayer(
            down=torch.randn(4, 64), up=torch.randn(64, 4), alpha=4)}, "peft"), "'down_blocks.1.attentions.0.proj_in'"),
        (LoraAdapter({"unet.down_blocks.1.attentions.0.proj_inn": LoraLayer(
            down=torch.randn(4, 64), up=torch.randn(64, 4), alpha=4)}, "peft"), "proj_inn"),
        (LoraAdapter({}, "peft"), "no layers"),
    ]
    for bad, match in cases:
        with pytest.raises(LoraFormatError, match=match):
            write_kohya(bad)


@pytest.mark.parametrize("family", ["sd15", "sd2", "sdxl"])
def test_committed_tables_match_the_generator(family):
    import gzip
    import json

    stored = json.loads(gzip.decompress((ROOT / "lora_fast/formats/names" / f"{family}.json.gz").read_bytes()))
    assert stored == _load_generator().family_table(family)


def test_sd1_file_with_ldm_names():
    """SD1.x LDM names, including blocks 10 and 11 that substring grouping confuses with block 1 (§2.11)."""
    sd = _pair("lora_unet_input_blocks_1_1_proj_in", torch.randn(4, 32, 1, 1), torch.randn(32, 4, 1, 1),
               torch.tensor(2.0))
    sd.update(_pair("lora_unet_input_blocks_10_0_in_layers_2", torch.randn(2, 64, 3, 3), torch.randn(64, 2, 1, 1)))
    sd.update(_pair("lora_unet_input_blocks_11_0_in_layers_2", torch.randn(3, 64, 3, 3), torch.randn(64, 3, 1, 1),
                    torch.tensor(6.0)))
    sd.update(_pair("lora_unet_output_blocks_11_1_transformer_blocks_0_attn1_to_q", torch.randn(4, 32),
                    torch.randn(32, 4), torch.tensor(1.0)))
    adapter = read_kohya(sd)
    assert {k: (l.kind, l.scale) for k, l in adapter.layers.items()} == {
        "unet.down_blocks.0.attentions.0.proj_in": ("conv", 0.5),
        "unet.down_blocks.3.resnets.0.conv1": ("conv", 1.0),
        "unet.down_blocks.3.resnets.1.conv1": ("conv", 2.0),
        "unet.up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_q": ("linear", 0.25),
    }
    # written back with kohya's own SD1.x (diffusers-style) names
    assert "lora_unet_down_blocks_3_resnets_1_conv1.alpha" in write_kohya(adapter)
