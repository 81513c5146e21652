"""Format detection, read_lora's source handling (files, directories, dicts, pickle policy) and
conversion round trips between the diffusers, PEFT and kohya formats."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file as st_save

from lora_fast import LoraAdapter, LoraFormatError, LoraLayer, read_lora
from lora_fast.formats import detect_format, write_adapter


def _ab(prefix, r=2, inp=4, out=3):
    return {f"{prefix}.lora_A.weight": torch.randn(r, inp), f"{prefix}.lora_B.weight": torch.randn(out, r)}


KOHYA = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.randn(2, 32),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.randn(32, 2),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(1.0),
}


@pytest.mark.parametrize(
    "keys, fmt",
    [
        (list(_ab("unet.a.b")), "diffusers"),
        (list(_ab("transformer.blocks.0.attn.to_q")) + list(_ab("text_encoder_3.encoder.block.0.x")), "diffusers"),
        (list(_ab("a.b")), "diffusers"),  # a single module's state dict: no prefix
        (["unet.x.attn1.processor.to_q_lora.down.weight", "unet.x.attn1.processor.to_q_lora.up.weight"], "diffusers"),
        (["text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer.down.weight"], "diffusers"),
        (["unet.x.proj_in.lora.up.weight"], "diffusers"),
        (["base_model.model.lin.lora_A.weight", "base_model.model.emb.lora_embedding_B",
          "base_model.model.lin.lora_magnitude_vector", "base_model.model.lin.lora_B.default.bias"], "peft"),
        (list(KOHYA), "kohya"),
    ],
)
def test_detect_format(keys, fmt):
    assert detect_format(keys) == fmt


@pytest.mark.parametrize(
    "keys, match",
    [
        ([], "empty"),
        (["unet.a.weight"], r"'unet\.a\.weight' is not a LoRA key"),
        (list(_ab("unet.a")) + list(KOHYA)[:1], "mixed LoRA formats: diffusers key .* and kohya key"),
        (list(_ab("unet.a")) + ["base_model.model.b.lora_A.weight"], r"mixed.*'base_model\.model\.b\.lora_A\.weight'"),
        (["base_model.model.b.weight"], r"'base_model\.model\.b\.weight'"),
        ([0], "not a string"),
    ],
)
def test_detect_format_rejects(keys, match):
    with pytest.raises(LoraFormatError, match=match):
        detect_format(keys)


def test_read_lora_state_dict_untouched_and_copied():
    sd = _ab("unet.a")
    snapshot = {k: v.clone() for k, v in sd.items()}
    keys = list(sd)
    adapter = read_lora(sd)
    assert list(sd) == keys and all(torch.equal(sd[k], snapshot[k]) for k in keys)
    assert adapter.source == "<state dict>" and adapter.format == "diffusers"
    adapter.layers["unet.a"].alpha = 5.0
    assert read_lora(sd).layers["unet.a"].alpha == 2.0


def test_read_lora_bad_sources(tmp_path):
    with pytest.raises(LoraFormatError, match="path or a state dict"):
        read_lora(42)
    with pytest.raises(FileNotFoundError):
        read_lora(tmp_path / "missing.safetensors")
    with pytest.raises(LoraFormatError, match="component"):
        read_lora(_ab("a"), component="unet.sub")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(LoraFormatError, match="bad.safetensors"):
        read_lora(bad)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(LoraFormatError, match="no LoRA weights found"):
        read_lora(tmp_path / "empty_dir")


class _Boom:
    """Unpickling this would create a file: proof that the pickle path never runs foreign code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt"])
def test_pickle_refused_by_default_allowed_with_weights_only(tmp_path, suffix):
    sd = _ab("unet.a")
    path = tmp_path / f"lora{suffix}"
    torch.save(sd, path)
    with pytest.raises(LoraFormatError, match="arbitrary code.*allow_pickle=True"):
        read_lora(path)
    adapter = read_lora(path, allow_pickle=True)
    assert torch.equal(adapter.layers["unet.a"].down, sd["unet.a.lora_A.weight"])

    marker = tmp_path / "pwned"
    evil = tmp_path / f"evil{suffix}"
    with open(evil, "wb") as f:
        pickle.dump({"unet.a.lora_A.weight": _Boom(str(marker))}, f)
    with pytest.raises(LoraFormatError, match="weights_only"):
        read_lora(evil, allow_pickle=True)
    assert not marker.exists()
    torch.save([1, 2], tmp_path / f"list{suffix}")
    with pytest.raises(LoraFormatError, match="not a state dict"):
        read_lora(tmp_path / f"list{suffix}", allow_pickle=True)


def test_directory_resolution(tmp_path):
    d = tmp_path / "diffusers_dir"
    d.mkdir()
    st_save(_ab("unet.a"), str(d / "pytorch_lora_weights.safetensors"))
    st_save(_ab("unet.other"), str(d / "second.safetensors"))
    assert list(read_lora(d).layers) == ["unet.a"]
    assert list(read_lora(d, weight_name="second.safetensors").layers) == ["unet.other"]
    with pytest.raises(FileNotFoundError):
        read_lora(d, weight_name="nope.safetensors")

    single = tmp_path / "single"
    single.mkdir()
    st_save(_ab("unet.s"), str(single / "my_lora.safetensors"))
    assert list(read_lora(single).layers) == ["unet.s"]
    st_save(_ab("unet.t"), str(single / "another.safetensors"))
    with pytest.raises(LoraFormatError, match="pass weight_name"):
        read_lora(single)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(_ab("unet.p"), pickled / "pytorch_lora_weights.bin")
    with pytest.raises(LoraFormatError, match="allow_pickle"):
        read_lora(pickled)
    assert list(read_lora(pickled, allow_pickle=True).layers) == ["unet.p"]

    peft_bin = tmp_path / "peft_bin"
    peft_bin.mkdir()
    torch.save({"base_model.model.x.lora_A.weight": torch.randn(2, 4),
                "base_model.model.x.lora_B.weight": torch.randn(3, 2)}, peft_bin / "adapter_model.bin")
    (peft_bin / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 6}))
    with pytest.raises(LoraFormatError, match="allow_pickle"):
        read_lora(peft_bin)
    adapter = read_lora(peft_bin, allow_pickle=True, component="unet")
    assert adapter.format == "peft" and adapter.layers["unet.x"].scale == 3.0


def test_peft_file_path_uses_sibling_config(tmp_path):
    st_save({"base_model.model.x.lora_A.weight": torch.randn(2, 4),
             "base_model.model.x.lora_B.weight": torch.randn(3, 2)}, str(tmp_path / "adapter_model.safetensors"))
    assert read_lora(tmp_path / "adapter_model.safetensors").layers["x"].alpha == 2.0  # no config: alpha = r
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 16}))
    assert read_lora(tmp_path / "adapter_model.safetensors").layers["x"].alpha == 16.0
    (tmp_path / "adapter_config.json").write_text("{broken")
    with pytest.raises(LoraFormatError, match="adapter_config.json.*not valid JSON"):
        read_lora(tmp_path)


def test_write_adapter_rejects_unknown_format_and_empty(tmp_path):
    layer = LoraLayer(torch.randn(2, 4), torch.randn(3, 2), 2.0)
    with pytest.raises(LoraFormatError, match="unknown LoRA format 'onnx'"):
        write_adapter(LoraAdapter({"unet.a": layer}, "diffusers"), tmp_path / "x", "onnx")
    with pytest.raises(LoraFormatError, match="no layers"):
        LoraAdapter({}, "diffusers").save(tmp_path / "y.safetensors")
    mixed = LoraAdapter({"unet.a": layer, "b": layer}, "diffusers")
    with pytest.raises(LoraFormatError, match="'b' has no component prefix"):
        mixed.save(tmp_path / "z.safetensors")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# round trips between formats


def _sd15_adapter(seed=0):
    """Real SD1.5 module paths (kohya's tables know them) with per-module ranks and alphas."""
    g = torch.Generator().manual_seed(seed)
    tb = "down_blocks.1.attentions.0.transformer_blocks.0"
    spec = [
        (f"unet.{tb}.attn1.to_q", "linear", (4, 64), (64, 4), 8.0),
        (f"unet.{tb}.attn2.to_out.0", "linear", (2, 64), (64, 2), 0.30078125),
        (f"unet.{tb}.ff.net.2", "linear", (3, 256), (64, 3), 3.0),
        ("unet.down_blocks.1.attentions.0.proj_in", "conv", (2, 64, 1, 1), (64, 2, 1, 1), 1.0),
        ("unet.up_blocks.0.resnets.0.conv1", "conv", (4, 128, 3, 3), (64, 4, 1, 1), 2.5),
        ("text_encoder.text_model.encoder.layers.0.self_attn.k_proj", "linear", (2, 32), (32, 2), 4.0),
        ("text_encoder.text_model.encoder.layers.1.mlp.fc2", "linear", (3, 37), (32, 3), 1.5),
    ]
    layers = {k: LoraLayer(torch.randn(*d, generator=g), torch.randn(*u, generator=g), a, kind=kind)
              for k, kind, d, u, a in spec}
    return LoraAdapter(layers, "diffusers")


def _path_for(tmp_path, fmt, tag):
    return tmp_path / (f"{tag}_{fmt}" if fmt == "peft" else f"{tag}_{fmt}.safetensors")


def _assert_same_deltas(a, b):
    assert set(a.layers) == set(b.layers)
    for key in a.layers:
        torch.testing.assert_close(b.layers[key].delta(), a.layers[key].delta(), rtol=1e-6, atol=0, msg=key)


@pytest.mark.parametrize("src", ["diffusers", "peft", "kohya"])
@pytest.mark.parametrize("dst", ["diffusers", "peft", "kohya"])
def test_round_trip_keeps_every_delta(tmp_path, src, dst):
    if "kohya" in (src, dst):
        pytest.importorskip("lora_fast.formats.kohya")
    original = _sd15_adapter()
    p1 = _path_for(tmp_path, src, "a")
    original.save(p1, format=src)
    first = read_lora(p1)
    assert first.format == src
    _assert_same_deltas(original, first)
    p2 = _path_for(tmp_path, dst, "b")
    first.save(p2, format=dst)
    second = read_lora(p2)
    assert second.format == dst
    _assert_same_deltas(original, second)


def test_kohya_input_axis_dora_cannot_go_to_diffusers_or_peft(tmp_path):
    layer = LoraLayer(torch.randn(2, 64), torch.randn(64, 2), 2.0, magnitude=torch.rand(1, 64), magnitude_axis="in")
    adapter = LoraAdapter({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": layer}, "kohya")
    for fmt, path in (("diffusers", tmp_path / "d.safetensors"), ("peft", tmp_path / "p")):
        with pytest.raises(LoraFormatError, match="input-column"):
            adapter.save(path, format=fmt)
        assert not path.exists()


def test_read_kohya_file_through_read_lora(tmp_path):
    pytest.importorskip("lora_fast.formats.kohya")
    path = tmp_path / "k.safetensors"
    st_save(KOHYA, str(path), metadata={"ss_network_dim": "2"})
    adapter = read_lora(path)
    assert adapter.format == "kohya"
    assert list(adapter.layers) == ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert adapter.metadata.get("ss_network_dim") == "2"


@pytest.mark.parametrize("fmt", ["diffusers", "peft"])
def test_mixed_rslora_flags_and_tucker_core_keep_deltas(tmp_path, fmt):
    g = torch.Generator().manual_seed(9)
    layers = {
        "unet.a": LoraLayer(torch.randn(4, 8, generator=g), torch.randn(6, 4, generator=g), 3.0, use_rslora=True),
        "unet.b": LoraLayer(torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g), 5.0),
        # Tucker/CP LoCon: down (r, in, 1, 1), mid (r, r, 3, 3), up (out, r, 1, 1); folded into down on write
        "unet.c": LoraLayer(torch.randn(3, 5, 1, 1, generator=g), torch.randn(7, 3, 1, 1, generator=g), 1.5,
                            kind="conv", mid=torch.randn(3, 3, 3, 3, generator=g)),
    }
    adapter = LoraAdapter(layers, "kohya")
    path = tmp_path / ("p" if fmt == "peft" else "d.safetensors")
    adapter.save(path, format=fmt)
    # A single-component PEFT directory is a plain PEFT adapter: its keys carry no component.
    back = read_lora(path, component="unet" if fmt == "peft" else None)
    _assert_same_deltas(adapter, back)
    assert back.layers["unet.c"].mid is None and tuple(back.layers["unet.c"].down.shape) == (3, 5, 3, 3)
    assert torch.equal(back.layers["unet.c"].delta(), layers["unet.c"].delta())
