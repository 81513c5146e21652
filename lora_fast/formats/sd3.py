"""SD3 / SD3.5 LoRA files in kohya sd-scripts names (``networks/lora_sd3.py``), as a table.

sd-scripts trains its own MMDiT, whose modules differ from diffusers' ``SD3Transformer2DModel``: one fused
``attn.qkv`` per stream (diffusers: ``to_q/to_k/to_v`` and ``add_q_proj/add_k_proj/add_v_proj``), ``mlp.fc1/fc2``
(``ff.net.0.proj`` / ``ff.net.2``), ``adaLN_modulation.1`` (``norm1.linear``)... Its LoRA names are
``lora_unet_`` + the MMDiT module path with '.' -> '_' (``lora_unet_joint_blocks_0_x_block_attn_qkv``); text
encoders are ``lora_te1_`` (CLIP-L, ``text_encoder``), ``lora_te2_`` (CLIP-G, ``text_encoder_2``) and
``lora_te3_`` (T5-XXL, ``text_encoder_3``), named like the SDXL / Flux tables name them.

:data:`SD3_MODULES` is checked against diffusers' own single-file conversion of SD3 checkpoints
(``convert_sd3_transformer_checkpoint_to_diffusers``), which maps the same MMDiT names to diffusers modules:
the qkv row split, the last joint block (context stream ``context_pre_only``: no attention output, no MLP, and an
adaLN of 2 parts whose (shift, scale) halves diffusers stores as (scale, shift)), and ``final_layer``.
"""

from __future__ import annotations

from .flux import KOHYA_TEXT_ENCODER_NAMES
from .fused import FusedFamily, FusedModule, one as _one, register_family

_J = "joint_blocks.{i}."
_T = "transformer_blocks.{i}."

#: SD3/SD3.5: every MMDiT module sd-scripts' LoRA network targets (SingleDiTBlock Linears, and with
#: ``emb_dims`` the embedders and final layer), and its diffusers module(s).
SD3_MODULES: tuple[FusedModule, ...] = (
    FusedModule(_J + "x_block.attn.qkv", (1, 1, 1),
                ((_T + "attn.to_q", (0,)), (_T + "attn.to_k", (1,)), (_T + "attn.to_v", (2,)))),
    _one(_J + "x_block.attn.proj", _T + "attn.to_out.0"),
    _one(_J + "x_block.mlp.fc1", _T + "ff.net.0.proj"),
    _one(_J + "x_block.mlp.fc2", _T + "ff.net.2"),
    _one(_J + "x_block.adaLN_modulation.1", _T + "norm1.linear"),
    # SD3.5 (MMDiT-X): a second self-attention on the image stream in the first blocks
    FusedModule(_J + "x_block.attn2.qkv", (1, 1, 1),
                ((_T + "attn2.to_q", (0,)), (_T + "attn2.to_k", (1,)), (_T + "attn2.to_v", (2,)))),
    _one(_J + "x_block.attn2.proj", _T + "attn2.to_out.0"),
    FusedModule(_J + "context_block.attn.qkv", (1, 1, 1),
                ((_T + "attn.add_q_proj", (0,)), (_T + "attn.add_k_proj", (1,)), (_T + "attn.add_v_proj", (2,)))),
    _one(_J + "context_block.attn.proj", _T + "attn.to_add_out"),
    _one(_J + "context_block.mlp.fc1", _T + "ff_context.net.0.proj"),
    _one(_J + "context_block.mlp.fc2", _T + "ff_context.net.2"),
    # the last block's context stream (context_pre_only) has a 2-part adaLN, (shift, scale) -> diffusers'
    # AdaLayerNormContinuous (scale, shift); every other block's is 6 parts in the same order as diffusers'
    FusedModule(_J + "context_block.adaLN_modulation.1", (1, 1), ((_T + "norm1_context.linear", (1, 0)),),
                rows_per_in=2),
    _one(_J + "context_block.adaLN_modulation.1", _T + "norm1_context.linear"),
    _one("context_embedder", "context_embedder"),
    _one("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    _one("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    _one("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
    _one("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
    _one("x_embedder.proj", "pos_embed.proj", kind="conv"),  # the patch embedding: a k×k Conv2d (k = patch size)
    _one("final_layer.linear", "proj_out"),
    FusedModule("final_layer.adaLN_modulation.1", (1, 1), (("norm_out.linear", (1, 0)),)),
)

#: sd-scripts' T5-XXL names (as for Flux), here on the pipeline's third text encoder.
SD3_T5 = (KOHYA_TEXT_ENCODER_NAMES[0][0], "text_encoder_3", KOHYA_TEXT_ENCODER_NAMES[0][2])

SD3 = register_family(FusedFamily(
    family="sd3",
    modules=SD3_MODULES,
    kohya_markers=("lora_unet_joint_blocks_",),
    clip_roots={"lora_te1_": "sdxl", "lora_te2_": "sdxl"},
    t5=SD3_T5,
    writes={"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"},
))

__all__ = ["SD3", "SD3_MODULES"]
