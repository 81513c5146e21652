"""PEFT format: files written by PEFT's save_pretrained read back to the exact live deltas; files
lora_fast writes load in PEFT with the same effect; malformed inputs raise LoraFormatError."""

from __future__ import annotations

import json
import os

import pytest
import torch

import lora_fast

pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file as st_load, save_file as st_save  # noqa: E402

from lora_fast import LoraAdapter, LoraFormatError, LoraLayer, read_lora  # noqa: E402

TARGETS = ["emb", "lin", "block.lin", "conv", "pw"]


def _peft_model(tiny_mixed, helpers, **cfg):
    model = get_peft_model(tiny_mixed, LoraConfig(target_modules=cfg.pop("target_modules", TARGETS), **cfg))
    helpers.randomize_lora(model, seed=1)
    return model


CONFIGS = {
    "patterns": dict(r=4, lora_alpha=8, rank_pattern={"conv": 2, "^block.lin": 3}, alpha_pattern={"lin": 3, "pw": 5.5}),
    "rslora": dict(r=4, lora_alpha=6, use_rslora=True, rank_pattern={"emb": 2}),
    "dora": dict(r=3, lora_alpha=5, use_dora=True, target_modules=["lin", "block.lin", "conv", "pw", "emb"]),
    "lora_bias": dict(r=2, lora_alpha=3, lora_bias=True, target_modules=["lin", "block.lin", "conv", "pw"]),
}


@pytest.mark.filterwarnings("ignore:.*invalid shape.*")  # PEFT's ZeRO-3 warning misfires on 1-D lora_B.bias
@pytest.mark.parametrize("name", list(CONFIGS))
def test_save_pretrained_reads_back_exact_deltas(name, tiny_mixed, peft_helpers, tmp_path):
    model = _peft_model(tiny_mixed, peft_helpers, **dict(CONFIGS[name]))
    model.save_pretrained(tmp_path)
    adapter = read_lora(tmp_path)
    assert adapter.format == "peft"
    live = peft_helpers.lora_modules(model, "default")
    # PEFT names modules relative to the base model: the adapter keys are those, with no component.
    expected_keys = {n.removeprefix("base_model.model.") for n in live}
    assert set(adapter.layers) == expected_keys
    for name_, module in live.items():
        layer = adapter.layers[name_.removeprefix("base_model.model.")]
        ref = peft_helpers.reference_delta(module, "default")
        torch.testing.assert_close(layer.delta().double(), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
        assert layer.scale == pytest.approx(module.scaling["default"], rel=1e-15)
        if not module.use_dora["default"]:
            torch.testing.assert_close(layer.delta(), module.get_delta_weight("default"), rtol=1e-6, atol=1e-7)
        base = module.get_base_layer()
        expected_kind = {torch.nn.Embedding: "embedding", torch.nn.Conv2d: "conv", torch.nn.Linear: "linear"}[type(base)]
        assert layer.kind == expected_kind
        assert tuple(layer.weight_shape) == tuple(base.weight.shape)
        if module.use_dora["default"]:
            mag = module.lora_magnitude_vector["default"].weight
            assert layer.magnitude_axis == "out"
            assert torch.equal(layer.magnitude.reshape(-1), mag.detach().reshape(-1))
        else:
            assert layer.magnitude is None
        if name == "lora_bias":
            assert torch.equal(layer.bias, module.lora_B["default"].bias.detach())
        assert layer.use_rslora == (name == "rslora")


def test_live_state_dict_with_adapter_names_and_no_config(tiny_mixed, peft_helpers):
    model = _peft_model(tiny_mixed, peft_helpers, r=4, lora_alpha=8, use_dora=True, target_modules=["lin", "conv"])
    sd = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert any(k.endswith(".lora_A.default.weight") for k in sd)
    assert any(k.endswith(".lora_magnitude_vector.default.weight") for k in sd)
    before = dict(sd)
    adapter = read_lora(sd)
    assert sd.keys() == before.keys() and all(sd[k] is before[k] for k in sd)  # caller's dict untouched
    assert adapter.format == "peft" and set(adapter.layers) == {"lin", "block.lin", "conv"}
    for name, layer in adapter.layers.items():
        assert layer.alpha == layer.rank  # no config: alpha = rank
        module = peft_helpers.lora_modules(model)["base_model.model." + name]
        torch.testing.assert_close(layer.magnitude, module.lora_magnitude_vector["default"].weight.detach())


def test_two_adapter_names_rejected(tiny_mixed, peft_helpers):
    model = _peft_model(tiny_mixed, peft_helpers, r=2, target_modules=["lin"])
    model.add_adapter("other", LoraConfig(r=2, target_modules=["lin"]))
    sd = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    with pytest.raises(LoraFormatError, match="other|default"):
        read_lora(sd)


def _layers_for_tiny_mixed(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {
        "lin": LoraLayer(r(3, 6), r(5, 3), alpha=7.0),
        "block.lin": LoraLayer(r(2, 5), r(7, 2), alpha=0.30078125),
        "conv": LoraLayer(r(4, 3, 3, 3), r(4, 4, 1, 1), alpha=4.0, kind="conv"),
        "pw": LoraLayer(r(2, 4), r(4, 2), alpha=1.5, kind="conv"),  # 1×1 conv given as 2-D factors
        "emb": LoraLayer(r(3, 11), r(6, 3), alpha=9.0, kind="embedding"),
    }


def test_written_peft_dir_loads_in_peft_with_same_deltas(tiny_mixed, peft_helpers, tmp_path):
    layers = _layers_for_tiny_mixed()
    adapter = LoraAdapter(layers=dict(layers), format="diffusers")
    adapter.save(tmp_path / "out", format="peft")
    assert sorted(os.listdir(tmp_path / "out")) == ["adapter_config.json", "adapter_model.safetensors"]
    keys = set(st_load(str(tmp_path / "out" / "adapter_model.safetensors")))
    assert "base_model.model.lin.lora_A.weight" in keys and "base_model.model.emb.lora_embedding_A" in keys
    model = PeftModel.from_pretrained(tiny_mixed, str(tmp_path / "out"))
    live = peft_helpers.lora_modules(model, "default")
    assert {n.removeprefix("base_model.model.") for n in live} == set(layers)
    for name, module in live.items():
        layer = layers[name.removeprefix("base_model.model.")]
        ref = peft_helpers.reference_delta(module, "default")
        torch.testing.assert_close(layer.delta().double(), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
        assert module.scaling["default"] == pytest.approx(layer.scale, rel=1e-15)
    back = read_lora(tmp_path / "out")
    for name, layer in layers.items():
        assert torch.equal(back.layers[name].delta(), layer.delta())


def test_written_peft_dora_rslora_loads_in_peft(tiny_mixed, peft_helpers, tmp_path):
    g = torch.Generator().manual_seed(3)
    layers = {
        "lin": LoraLayer(torch.randn(4, 6, generator=g), torch.randn(5, 4, generator=g), alpha=8.0, use_rslora=True,
                         magnitude=torch.rand(5, generator=g) + 0.5),
        "conv": LoraLayer(torch.randn(2, 3, 3, 3, generator=g), torch.randn(4, 2, 1, 1, generator=g), alpha=3.0,
                          kind="conv", use_rslora=True, magnitude=torch.rand(4, generator=g) + 0.5),
    }
    LoraAdapter(layers=layers, format="diffusers").save(tmp_path, format="peft")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True and cfg["use_rslora"] is True
    model = PeftModel.from_pretrained(tiny_mixed, str(tmp_path))
    live = peft_helpers.lora_modules(model, "default")
    for name, module in live.items():
        layer = layers[name.removeprefix("base_model.model.")]
        assert module.scaling["default"] == pytest.approx(layer.scale, rel=1e-15)
        torch.testing.assert_close(module.lora_magnitude_vector["default"].weight.detach().reshape(-1),
                                   layer.magnitude)


def test_multi_component_peft_directory_round_trip(tmp_path):
    g = torch.Generator().manual_seed(4)
    layers = {
        "unet.down_blocks.0.attentions.0.proj_in": LoraLayer(torch.randn(2, 8, 1, 1, generator=g),
                                                             torch.randn(8, 2, 1, 1, generator=g), 1.0, kind="conv"),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj": LoraLayer(
            torch.randn(3, 8, generator=g), torch.randn(8, 3, generator=g), 6.0),
    }
    LoraAdapter(layers=layers, format="diffusers").save(tmp_path, format="peft")
    assert sorted(os.listdir(tmp_path)) == ["text_encoder", "unet"]
    back = read_lora(tmp_path)
    assert back.format == "peft" and set(back.layers) == set(layers)
    for k, layer in layers.items():
        assert torch.equal(back.layers[k].delta(), layer.delta())
    only = read_lora(tmp_path, component="unet")
    assert set(only.layers) == {"unet.down_blocks.0.attentions.0.proj_in"}


@torch.no_grad()
def test_written_text_encoder_peft_dir_loads_into_this_transformers_clip(tmp_path):
    """PEFT matches saved keys against the live module tree: the text-encoder subfolder must name modules as the
    installed CLIPTextModel does (transformers 5 has no text_model level), or PEFT silently loads nothing."""
    from lora_fast.models import build_text_encoder

    te, ours = build_text_encoder("sd15"), build_text_encoder("sd15")
    g = torch.Generator().manual_seed(6)
    layers = {}
    for name, m in te.named_modules():
        if name.endswith(("q_proj", "v_proj")):
            key = "text_encoder." + ("" if name.startswith("text_model.") else "text_model.") + name
            layers[key] = LoraLayer(torch.randn(4, m.in_features, generator=g) * 0.1,
                                    torch.randn(m.out_features, 4, generator=g) * 0.1, 4.0)
    layers["unet.down_blocks.0.attentions.0.proj_in"] = LoraLayer(torch.randn(2, 8, 1, 1, generator=g),
                                                                  torch.randn(8, 2, 1, 1, generator=g), 1.0, kind="conv")
    adapter = LoraAdapter(layers=layers, format="diffusers")
    adapter.save(tmp_path, format="peft")
    keys = set(st_load(str(tmp_path / "text_encoder" / "adapter_model.safetensors")))
    level = hasattr(te, "text_model")
    assert all(k.startswith("base_model.model.text_model." if level else "base_model.model.encoder.") for k in keys)
    ids = torch.randint(0, te.config.vocab_size, (2, 7), generator=g)
    base = te(ids)[0]
    peft_out = PeftModel.from_pretrained(te, str(tmp_path / "text_encoder"))(ids)[0]
    lora_fast.load_lora_weights({"text_encoder": ours}, adapter, components=["text_encoder"])
    live = ours(ids)[0]
    assert (peft_out - base).abs().max() > 1e-2  # PEFT really applied the adapter
    assert (peft_out - live).abs().max() <= 1e-5 * live.abs().max()
    back = read_lora(tmp_path)  # and our reader still gives the diffusers paths back
    assert set(back.layers) == set(layers)


def test_component_prefix_and_text_model_normalization(tmp_path):
    # A PEFT file of transformers 5's CLIPTextModel has no text_model level.
    sd = {
        "base_model.model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 4),
        "base_model.model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(4, 2),
    }
    adapter = read_lora(sd, component="text_encoder")
    assert list(adapter.layers) == ["text_encoder.text_model.encoder.layers.0.self_attn.q_proj"]
    assert list(read_lora(sd).layers) == ["encoder.layers.0.self_attn.q_proj"]


def _write_peft_dir(path, tensors, config):
    path.mkdir(parents=True, exist_ok=True)
    st_save(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))


def _ab(path="lin", r=2, out=5, inp=6):
    return {f"base_model.model.{path}.lora_A.weight": torch.randn(r, inp),
            f"base_model.model.{path}.lora_B.weight": torch.randn(out, r)}


@pytest.mark.parametrize(
    "config, tensors, match",
    [
        ("{not json", _ab(), "not valid JSON"),
        ({"r": 2, "lora_alpha": "big"}, _ab(), "lora_alpha"),
        ({"r": 2, "lora_alpha": True}, _ab(), "lora_alpha"),
        ({"r": 4, "lora_alpha": 4}, _ab(), r"lin\.lora_A\.weight.*rank 2.*says 4"),
        ({"r": 2, "rank_pattern": {"lin": 3}}, _ab(), r"rank_pattern\['lin'\]"),
        ({"r": 2, "use_dora": True}, _ab(), "no lora_magnitude_vector"),
        ({"r": 2}, {**_ab(), "base_model.model.lin.lora_magnitude_vector": torch.rand(5)}, "use_dora=false"),
        ({"r": 2, "bias": "all"}, _ab(), "bias='all'"),
        ({"r": 2, "peft_type": "LOHA"}, _ab(), "LOHA"),
        ({"r": 2, "rank_pattern": {"(": 2}}, _ab(), "regular expression"),
    ],
)
def test_bad_config_raises_naming_problem(tmp_path, config, tensors, match):
    _write_peft_dir(tmp_path, tensors, config)
    with pytest.raises(LoraFormatError, match=match):
        read_lora(tmp_path)


@pytest.mark.parametrize(
    "tensors, match",
    [
        ({"base_model.model.lin.lora_A.weight": torch.randn(2, 6)}, r"lin\.lora_A\.weight.*no matching lora_B"),
        ({"base_model.model.lin.lora_B.weight": torch.randn(5, 2)}, r"lin\.lora_B\.weight.*no matching lora_A"),
        ({"base_model.model.lin.lora_A.weight": torch.randn(2, 6),
          "base_model.model.lin.lora_B.weight": torch.randn(5, 3)}, r"rank mismatch.*lin\.lora_A\.weight"),
        ({**_ab(), "base_model.model.lin.base_layer.weight": torch.randn(5, 6)}, r"base_layer\.weight"),
        ({**_ab(), "lin2.lora_A.weight": torch.randn(2, 3)}, r"lin2\.lora_A\.weight"),
        ({"base_model.model.c.lora_A.weight": torch.randn(2, 3, 3, 3),
          "base_model.model.c.lora_B.weight": torch.randn(4, 2)}, r"c\.lora_B\.weight.*conv"),
        ({"base_model.model.c.lora_A.weight": torch.randn(2, 3, 3, 3),
          "base_model.model.c.lora_B.weight": torch.randn(4, 2, 3, 3)}, r"c\.lora_B\.weight"),
        ({**_ab(), "base_model.model.lin.lora_magnitude_vector": torch.rand(4)}, r"lora_magnitude_vector.*5 outputs"),
        ({"base_model.model.lin.lora_A.weight": torch.ones(2, 6, dtype=torch.int32),
          "base_model.model.lin.lora_B.weight": torch.randn(5, 2)}, "floating point"),
    ],
)
def test_malformed_state_dict_names_key(tensors, match):
    with pytest.raises(LoraFormatError, match=match):
        read_lora(tensors)


def test_dora_input_axis_cannot_be_written_as_peft(tmp_path):
    layer = LoraLayer(torch.randn(2, 6), torch.randn(5, 2), 2.0, magnitude=torch.rand(1, 6), magnitude_axis="in")
    with pytest.raises(LoraFormatError, match="input-column"):
        LoraAdapter({"unet.x": layer}, "kohya").save(tmp_path / "p", format="peft")
    assert not (tmp_path / "p").exists()


def test_mixed_dora_cannot_be_written_as_one_config(tmp_path):
    layers = {"a": LoraLayer(torch.randn(2, 6), torch.randn(5, 2), 2.0, magnitude=torch.rand(5)),
              "b": LoraLayer(torch.randn(2, 6), torch.randn(5, 2), 2.0)}
    with pytest.raises(LoraFormatError, match="'b'.*DoRA"):
        LoraAdapter(layers, "kohya").save(tmp_path / "p", format="peft")
    assert not (tmp_path / "p").exists()


def test_peft_adapters_saved_under_their_names_are_found(tiny_mixed, tmp_path):
    """save_pretrained puts an adapter not named "default" in a subfolder named after it."""
    model = get_peft_model(tiny_mixed, LoraConfig(r=2, target_modules=["lin"]), adapter_name="style")
    model.save_pretrained(str(tmp_path))
    assert (tmp_path / "style" / "adapter_model.safetensors").is_file()
    assert sorted(read_lora(tmp_path).layers) == ["block.lin", "lin"]
    model.add_adapter("ink", LoraConfig(r=3, target_modules=["lin"]))
    model.save_pretrained(str(tmp_path))
    with pytest.raises(LoraFormatError, match=r"several PEFT adapters in subfolders \['ink', 'style'\]"):
        read_lora(tmp_path)
    assert read_lora(tmp_path, weight_name="ink/adapter_model.safetensors").layers["lin"].rank == 3
    assert read_lora(tmp_path / "style").layers["lin"].rank == 2
