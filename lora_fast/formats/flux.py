"""Flux.1 LoRA layouts that do not use diffusers module names: kohya sd-scripts, BFL/ComfyUI and XLabs.

All three name modules of the original BFL Flux code (``double_blocks.N.img_attn.qkv``,
``single_blocks.N.linear1``...), where diffusers' ``FluxTransformer2DModel`` has separate modules
(``attn.to_q/to_k/to_v``, ``proj_mlp``...). The mapping is data: :data:`FLUX_MODULES` lists each BFL
module, how its output rows split into parts, and which diffusers module takes which parts. Every
layout is a spelling of those BFL names (the ``layouts`` of :data:`FLUX`), read and written by the generic
table code in ``formats/fused.py``, so a new layout or family is a table entry.

A LoRA on a fused projection becomes one LoRA per diffusers module: every split module gets the
same down (A) matrix (the same tensor, not a copy) and its rows of the up (B) matrix, so
ΔW_part = s·B_part·A is exactly the part's rows of s·B·A. The scale is that of the fused module
(alpha / rank of the file's module, alpha = rank when missing, as sd-scripts trains it) for every part.

Layouts (``adapter.format`` / ``adapter.family``):

* ``"kohya"`` / ``"flux"``: sd-scripts ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` +
  ``.alpha``; ``lora_te1_`` keys are CLIP-L (``text_encoder``), named as in the SDXL tables; ``lora_te3_`` keys are
  T5-XXL (``text_encoder_2``, :data:`KOHYA_TEXT_ENCODER_NAMES`).
* ``"bfl"`` / ``"flux"``: ``[diffusion_model.]double_blocks.0.img_attn.qkv.{lora_A,lora_B}.weight`` or
  ``.lora_down/.lora_up.weight`` (ComfyUI), optional ``.alpha``.
* ``"onetrainer"`` / ``"flux"``: ``lora_transformer_single_transformer_blocks_0_attn_to_q.lora_down.weight``
  (diffusers module paths, '.' -> '_'; :data:`ONETRAINER_MODULES`), kohya tensors and alpha.
* ``"xlabs"`` / ``"flux"``: ``[diffusion_model.]double_blocks.0.processor.qkv_lora1.{down,up}.weight``
  (no alpha: scale 1).
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from ..adapter import LoraAdapter
from .fused import FusedFamily, FusedModule, detect_fused_layout, kohya_name, one as _one, read_fused, \
    register_family, write_fused_kohya

_D = "transformer_blocks.{i}."
_S = "single_transformer_blocks.{i}."

#: Flux.1: every BFL module a LoRA trainer targets, and its diffusers module(s).
FLUX_MODULES: tuple[FusedModule, ...] = (
    FusedModule("double_blocks.{i}.img_attn.qkv", (1, 1, 1),
                ((_D + "attn.to_q", (0,)), (_D + "attn.to_k", (1,)), (_D + "attn.to_v", (2,)))),
    _one("double_blocks.{i}.img_attn.proj", _D + "attn.to_out.0"),
    _one("double_blocks.{i}.img_mlp.0", _D + "ff.net.0.proj"),
    _one("double_blocks.{i}.img_mlp.2", _D + "ff.net.2"),
    _one("double_blocks.{i}.img_mod.lin", _D + "norm1.linear"),
    FusedModule("double_blocks.{i}.txt_attn.qkv", (1, 1, 1),
                ((_D + "attn.add_q_proj", (0,)), (_D + "attn.add_k_proj", (1,)), (_D + "attn.add_v_proj", (2,)))),
    _one("double_blocks.{i}.txt_attn.proj", _D + "attn.to_add_out"),
    _one("double_blocks.{i}.txt_mlp.0", _D + "ff_context.net.0.proj"),
    _one("double_blocks.{i}.txt_mlp.2", _D + "ff_context.net.2"),
    _one("double_blocks.{i}.txt_mod.lin", _D + "norm1_context.linear"),
    # linear1 = q, k, v (inner dim each) and the MLP input (mlp_ratio 4 · inner dim)
    FusedModule("single_blocks.{i}.linear1", (1, 1, 1, 4),
                ((_S + "attn.to_q", (0,)), (_S + "attn.to_k", (1,)), (_S + "attn.to_v", (2,)), (_S + "proj_mlp", (3,)))),
    _one("single_blocks.{i}.linear2", _S + "proj_out"),
    _one("single_blocks.{i}.modulation.lin", _S + "norm.linear"),
    _one("img_in", "x_embedder"),
    _one("txt_in", "context_embedder"),
    _one("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    _one("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    _one("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    _one("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    _one("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    _one("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    _one("final_layer.linear", "proj_out"),
    # BFL's adaLN output is (shift, scale); diffusers' AdaLayerNormContinuous is (scale, shift)
    FusedModule("final_layer.adaLN_modulation.1", (1, 1), (("norm_out.linear", (1, 0)),)),
)

#: XLabs' processor LoRAs, as BFL names with the same meaning (XLabs stores no alpha).
XLABS_NAMES = {
    "double_blocks.{i}.processor.qkv_lora1": "double_blocks.{i}.img_attn.qkv",
    "double_blocks.{i}.processor.proj_lora1": "double_blocks.{i}.img_attn.proj",
    "double_blocks.{i}.processor.qkv_lora2": "double_blocks.{i}.txt_attn.qkv",
    "double_blocks.{i}.processor.proj_lora2": "double_blocks.{i}.txt_attn.proj",
    # the single-block processor adapts q, k, v (the first three parts of linear1) and linear2
    "single_blocks.{i}.processor.qkv_lora": "single_blocks.{i}.linear1[:3]",
    "single_blocks.{i}.processor.proj_lora": "single_blocks.{i}.linear2",
}

_XLABS_SINGLE_QKV = FusedModule("single_blocks.{i}.linear1[:3]", (1, 1, 1),
                                ((_S + "attn.to_q", (0,)), (_S + "attn.to_k", (1,)), (_S + "attn.to_v", (2,))))

#: kohya text-encoder names of Flux pipelines that no SD name table holds: (regex, component, path template).
#: sd-scripts names T5-XXL modules ``lora_te3_`` + the T5EncoderModel path with '.' -> '_'.
T5_KOHYA_NAME = re.compile(
    r"^lora_te3_encoder_block_(\d+)_layer_(\d+)_(SelfAttention|DenseReluDense)_(q|k|v|o|wi_0|wi_1|wi|wo)$")
T5_PATH = "encoder.block.{0}.layer.{1}.{2}.{3}"
KOHYA_TEXT_ENCODER_NAMES = ((T5_KOHYA_NAME, "text_encoder_2", T5_PATH),)

#: OneTrainer names diffusers modules kohya-style: ``lora_transformer_`` + the diffusers path with '.' -> '_'.
#: Every diffusers module of the table above, one to one (no splits).
ONETRAINER_MODULES: tuple[FusedModule, ...] = tuple(
    FusedModule(path, (1,), ((path, (0,)),))
    for path in dict.fromkeys(path for m in FLUX_MODULES for path, _ in m.targets))

_BY_BFL = {m.bfl: m for m in FLUX_MODULES + (_XLABS_SINGLE_QKV,)}

#: The Flux.1 family: the table above and the four layouts that spell it.
FLUX = register_family(FusedFamily(
    family="flux",
    modules=FLUX_MODULES,
    layouts={
        "kohya": tuple((kohya_name(m.bfl), m) for m in FLUX_MODULES),
        "onetrainer": tuple(("lora_transformer_" + m.bfl.replace(".", "_"), m) for m in ONETRAINER_MODULES),
        "xlabs": tuple((x, _BY_BFL[b]) for x, b in XLABS_NAMES.items()),
        "bfl": tuple((m.bfl, m) for m in FLUX_MODULES),
    },
    kohya_markers=("lora_unet_double_blocks_", "lora_unet_single_blocks_"),
    clip_roots={"lora_te1_": "sdxl", "lora_te_": "sd15"},
    t5=KOHYA_TEXT_ENCODER_NAMES[0],
    writes={"text_encoder": "lora_te1_", "text_encoder_2": "lora_te3_"},
))


def detect_flux_layout(keys) -> Optional[str]:
    """``"kohya"``, ``"onetrainer"``, ``"bfl"`` or ``"xlabs"`` when every key is a Flux key of that layout
    (kohya and OneTrainer files may also hold ``lora_te1_`` CLIP / ``lora_te3_`` T5 keys), else None."""
    found = detect_fused_layout(keys)
    return found[1] if found is not None and found[0].family == "flux" else None


def read_flux(state_dict: dict, layout: str, *, source: str = "<state dict>",
              metadata: Optional[dict] = None) -> LoraAdapter:
    """A Flux.1 kohya / BFL / XLabs / OneTrainer state dict as a LoraAdapter with diffusers module keys."""
    return read_fused(state_dict, FLUX, layout, source=source, metadata=metadata)


def write_flux_kohya(adapter: LoraAdapter, *, source: str = "<adapter>",
                     block_diagonal: bool = False) -> dict[str, torch.Tensor]:
    """A Flux adapter as an sd-scripts state dict (see ``fused.write_fused_kohya``): split modules re-fused,
    CLIP-L modules ``lora_te1_``, T5 modules ``lora_te3_``; a kohya file read and written again is bit-identical.
    ``block_diagonal``: parts that do not share their down matrix in the exact block-diagonal form."""
    return write_fused_kohya(adapter, FLUX, source=source, block_diagonal=block_diagonal)


__all__ = ["FLUX", "FLUX_MODULES", "XLABS_NAMES", "FusedModule", "detect_flux_layout", "read_flux", "write_flux_kohya"]
