"""SD1.x kohya files with LDM/SGM UNet names (``lora_unet_input_blocks_1_1_proj_in``, ``…_middle_block_1_…``,
``…_output_blocks_…``, resnet ``in_layers_2`` / ``out_layers_3`` / ``emb_layers_1`` / ``skip_connection``, samplers
``input_blocks_3_0_op`` / ``output_blocks_2_1_conv``, ``time_embed_0``...), as some trainers and converters write
them for SD1.5.

Oracle: diffusers' single-file loader converts LDM-named SD1.5 base weights with ``convert_ldm_unet_checkpoint``.
The LDM checkpoint here is written from a tiny-but-structurally-SD1.5 UNet (4 blocks, layers_per_block 2: the real
block indices) with every tensor tagged by a distinct value, so the conversion shows exactly which diffusers
module each LDM module is. lora_fast's kohya name of every LDM module must land on that same module.
diffusers 0.42.1's LoRA loader maps some of these names to wrong modules; that bug is recorded, not copied.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint  # noqa: E402
from safetensors.torch import save_file as st_save  # noqa: E402

import lora_fast  # noqa: E402
from lora_fast.formats.families import check_family, family_mismatch, kohya_candidates, resolve_family  # noqa: E402
from lora_fast.formats.kohya import kohya_name_table  # noqa: E402
from lora_fast.models import build_pipeline  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

_BASE: dict = {}
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _base(family="sd15"):
    if family not in _BASE:
        _BASE[family] = build_pipeline(family, "tiny", seed=0)
    return _BASE[family]


def _ldm_name(unet, path: str) -> str:
    """The LDM (original SD) name of a diffusers UNet parameter path, from the SD1.x layout (L = layers_per_block)."""
    L = unet.config.layers_per_block
    parts = path.split(".")

    def resnet(rest):
        head = ".".join(rest[:-1])
        return f"{_RESNET.get(head, head)}.{rest[-1]}"

    top = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
           "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2"}
    head = ".".join(parts[:-1])
    if head in top:
        return f"{top[head]}.{parts[-1]}"
    if parts[0] == "down_blocks":
        b = int(parts[1])
        if parts[2] == "downsamplers":
            return f"input_blocks.{(L + 1) * b + L + 1}.0.op.{parts[-1]}"
        j = int(parts[3])
        idx = (L + 1) * b + j + 1
        return (f"input_blocks.{idx}.0.{resnet(parts[4:])}" if parts[2] == "resnets"
                else f"input_blocks.{idx}.1.{'.'.join(parts[4:])}")
    if parts[0] == "mid_block":
        j = int(parts[2])
        return (f"middle_block.{2 * j}.{resnet(parts[3:])}" if parts[1] == "resnets"
                else f"middle_block.1.{'.'.join(parts[3:])}")
    if parts[0] == "up_blocks":
        b = int(parts[1])
        if parts[2] == "upsamplers":
            has_attn = hasattr(unet.up_blocks[b], "attentions")
            return f"output_blocks.{(L + 1) * b + L}.{2 if has_attn else 1}.conv.{parts[-1]}"
        j = int(parts[3])
        idx = (L + 1) * b + j
        return (f"output_blocks.{idx}.0.{resnet(parts[4:])}" if parts[2] == "resnets"
                else f"output_blocks.{idx}.1.{'.'.join(parts[4:])}")
    raise AssertionError(f"no LDM name written for {path}")


def _ldm_to_diffusers(unet) -> dict[str, str]:
    """{LDM module name: diffusers module path} for every Linear/Conv2d weight, as convert_ldm_unet_checkpoint
    maps them (checked with one distinct tag value per tensor)."""
    sd = unet.state_dict()
    tags = {k: float(i + 1) for i, k in enumerate(sd)}
    ckpt = {"model.diffusion_model." + _ldm_name(unet, k): torch.full((1,), tags[k]) for k in sd}
    converted = convert_ldm_unet_checkpoint(ckpt, dict(unet.config))
    by_tag = {float(v.reshape(-1)[0]): k for k, v in converted.items()}
    assert sorted(converted) == sorted(sd), "the LDM checkpoint written here does not convert to the whole UNet"
    assert all(by_tag[tags[k]] == k for k in sd), "convert_ldm_unet_checkpoint maps a tensor elsewhere"
    mods = {k for k, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    return {_ldm_name(unet, f"{m}.weight")[: -len(".weight")]: m for m in mods}


def test_tiny_unet_has_the_real_sd15_block_indices():
    unet = _base().unet
    assert unet.config.layers_per_block == 2 and len(unet.down_blocks) == 4 and len(unet.up_blocks) == 4
    assert [type(b).__name__ for b in unet.down_blocks] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]


def test_every_sd15_ldm_module_maps_like_the_single_file_conversion():
    unet = _base().unet
    mapping = _ldm_to_diffusers(unet)
    assert len(mapping) == 281  # every Linear/Conv2d of the SD1.5 UNet (the reference's count)
    table = kohya_name_table("sd15")
    wrong = {}
    for ldm, path in mapping.items():
        name = "lora_unet_" + ldm.replace(".", "_")
        if table.get(name) != f"unet.{path}":
            wrong[name] = (table.get(name), path)
    assert not wrong, list(wrong.items())[:5]
    # spot checks named in the docs (LDM module name -> diffusers module)
    for ldm, path in (("input_blocks.1.1.proj_in", "down_blocks.0.attentions.0.proj_in"),
                      ("input_blocks.3.0.op", "down_blocks.0.downsamplers.0.conv"),
                      ("output_blocks.2.1.conv", "up_blocks.0.upsamplers.0.conv"),
                      ("output_blocks.5.2.conv", "up_blocks.1.upsamplers.0.conv"),
                      ("input_blocks.1.0.in_layers.2", "down_blocks.0.resnets.0.conv1"),
                      ("output_blocks.3.0.skip_connection", "up_blocks.1.resnets.0.conv_shortcut"),
                      ("middle_block.2.emb_layers.1", "mid_block.resnets.1.time_emb_proj"),
                      ("time_embed.2", "time_embedding.linear_2"), ("out.2", "conv_out")):
        assert mapping[ldm] == path and table["lora_unet_" + ldm.replace(".", "_")] == f"unet.{path}", ldm


def _sgm_file(unet, seed=0, rank=4):
    """A kohya file with every SD1.5 UNet module in LDM names; returns (state dict, {diffusers path: float64 ΔW})."""
    mapping = _ldm_to_diffusers(unet)
    mods = dict(unet.named_modules())
    g = torch.Generator().manual_seed(seed)
    sd, truth = {}, {}
    for j, (ldm, path) in enumerate(sorted(mapping.items())):
        w = mods[path].weight
        name = "lora_unet_" + ldm.replace(".", "_")
        if w.dim() == 4:
            down = torch.randn(rank, w.shape[1], *w.shape[2:], generator=g) * 0.1
            up = torch.randn(w.shape[0], rank, 1, 1, generator=g) * 0.1
        else:
            down, up = torch.randn(rank, w.shape[1], generator=g) * 0.1, torch.randn(w.shape[0], rank, generator=g) * 0.1
        alpha = (2.0, 8.0, 4.0)[j % 3]
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
        sd[f"{name}.alpha"] = torch.tensor(alpha)
        truth[path] = (alpha / rank * (up.double().reshape(w.shape[0], rank) @ down.double().reshape(rank, -1))
                       ).reshape(w.shape)
    return sd, truth


def test_sgm_named_sd15_file_fuses_at_the_converted_modules_and_unfuses_exactly(tmp_path):
    base = _base()
    sd, truth = _sgm_file(base.unet)
    path = tmp_path / "sgm_sd15.safetensors"
    st_save(sd, str(path))
    adapter = lora_fast.read_lora(path)
    assert adapter.family == "sd"  # SD1.x-only names (input_blocks_1_1, output_blocks_2_1_conv...) decide
    pipe = copy.deepcopy(base)
    snap = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    lora_fast.load_lora_weights(pipe, path)
    lora_fast.fuse_lora(pipe, lora_scale=0.7)
    b_sd, o_sd = base.unet.state_dict(), pipe.unet.state_dict()
    for name, w0 in b_sd.items():
        path_ = name[: -len(".weight")]
        if not name.endswith(".weight") or path_ not in truth:
            assert torch.equal(o_sd[name], w0), name
            continue
        ref = w0.double() + 0.7 * truth[path_]
        assert float((o_sd[name].double() - ref).abs().max()) <= 1e-6 * float(ref.abs().max()), name
    lora_fast.unfuse_lora(pipe)
    assert all(torch.equal(v, snap[k]) for k, v in pipe.unet.state_dict().items())


def test_diffusers_lora_loader_maps_sd15_sgm_names_to_wrong_modules():
    """Recorded, not copied: diffusers 0.42.1's SD1.x LoRA loader does not remap SGM block indices (only its SDXL
    loader does), so e.g. ``input_blocks_1_1_proj_in`` becomes ``down_blocks.1.1.proj_in``, which is no module."""
    from diffusers import StableDiffusionPipeline

    unet = _base().unet
    sd, truth = _sgm_file(unet)
    converted = StableDiffusionPipeline.lora_state_dict(dict(sd))[0]
    paths = {k[len("unet."):].rsplit(".lora", 1)[0] for k in converted if k.endswith("down.weight")}
    assert len(paths) == len(truth) == 281
    wrong = paths - set(truth)
    # block indices are left in LDM numbering: input_blocks_1_1 -> down_blocks.1.1, input_blocks_3_0_op ->
    # down_blocks.3.0.op, output_blocks_2_1_conv -> up_blocks.2.1.conv, middle_block_1 -> mid_block.1: no such modules
    assert {"down_blocks.1.1.proj_in", "down_blocks.3.0.op", "up_blocks.2.1.conv", "mid_block.1.proj_in"} <= wrong
    assert sorted(paths - wrong) == ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
    ours = lora_fast.read_lora(sd)
    assert sorted(k[len("unet."):] for k in ours.layers) == sorted(truth)


def _shared_names_file(unet):
    """LDM names both the SD1.x and the SDXL tables hold (down_blocks.1 / up_blocks.1 attention and resnets)."""
    sd15, sdxl = kohya_name_table("sd15"), kohya_name_table("sdxl")
    names = ["lora_unet_input_blocks_4_1_proj_in", "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
             "lora_unet_input_blocks_4_0_in_layers_2"]
    assert all(sd15[n] == sdxl[n] for n in names)
    mods = dict(unet.named_modules())
    g = torch.Generator().manual_seed(5)
    sd = {}
    for n in names:
        w = mods[sd15[n][len("unet."):]].weight
        down = torch.randn(2, *w.shape[1:], generator=g) if w.dim() == 4 else torch.randn(2, w.shape[1], generator=g)
        up = torch.randn(w.shape[0], 2, *([1, 1] if w.dim() == 4 else []), generator=g)
        sd[f"{n}.lora_down.weight"], sd[f"{n}.lora_up.weight"] = down, up
    return sd


def test_names_both_families_hold_default_to_sdxl_and_a_target_decides(tmp_path, capsys):
    sd = _shared_names_file(_base().unet)
    adapter = lora_fast.read_lora(sd)
    assert adapter.family == "sdxl" and kohya_candidates(adapter) == ("sd", "sdxl")  # the documented default
    sd15, sdxl = _base("sd15"), _base("sdxl")
    assert resolve_family(adapter, sd15) == "sd" and resolve_family(adapter, sdxl) == "sdxl"
    assert resolve_family(adapter) == "sdxl"
    assert family_mismatch(adapter, sd15) is None and family_mismatch(adapter, sdxl) is None
    check_family(adapter, sd15)
    check_family(adapter, sdxl)
    assert "looks like a SDXL LoRA" in family_mismatch(adapter, build_pipeline("flux", "tiny"))
    # the SD1.5 target loads it: proj_in (a 1×1 conv here) takes the file's factors exactly
    pipe = copy.deepcopy(sd15)
    w0 = pipe.unet.down_blocks[1].attentions[0].proj_in.weight.detach().clone()
    lora_fast.load_lora_weights(pipe, sd, fuse=True)
    up = sd["lora_unet_input_blocks_4_1_proj_in.lora_up.weight"].double().reshape(w0.shape[0], 2)
    down = sd["lora_unet_input_blocks_4_1_proj_in.lora_down.weight"].double().reshape(2, -1)
    ref = w0.double() + (up @ down).reshape(w0.shape)
    got = pipe.unet.down_blocks[1].attentions[0].proj_in.weight.double()
    assert float((got - ref).abs().max()) <= 1e-6 * float(ref.abs().max())
    # inspect says which family was chosen and that the names also fit SD1.x
    from lora_fast.cli import main

    path = tmp_path / "shared.safetensors"
    st_save(sd, str(path))
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "SDXL (the default; the names also fit SD1.x/SD2" in out
    assert main(["inspect", str(path), "--json"]) == 0
    import json

    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "sdxl" and info["family_candidates"] == ["sd", "sdxl"]
