"""Wan 2.x LoRA files in the original Wan module names, as a table.

The Wan reference code names its DiT modules ``blocks.N.self_attn.q``, ``cross_attn.k_img``, ``ffn.0``...; diffusers'
``WanTransformer3DModel`` has ``blocks.N.attn1.to_q``, ``attn2.add_k_proj``, ``ffn.net.0.proj``. Two layouts spell
the original names (the same ones diffusers' ``_convert_non_diffusers_wan_lora_to_diffusers`` and
``_convert_musubi_wan_lora_to_diffusers`` read):

* ``"kohya"`` / ``"wan"``: musubi-tuner ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` + ``.alpha``;
* ``"native"`` / ``"wan"``: ``diffusion_model.blocks.0.self_attn.q.lora_A.weight`` (or ``lora_down``/``lora_up``,
  optional ``.alpha``), as ComfyUI and several Wan trainers write them.

No module is fused: every entry is one to one. diffusers-format Wan files (``transformer.blocks.0.attn1.to_q…``)
need no table and go through the generic diffusers reader.
"""

from __future__ import annotations

from .fused import SUFFIXES, FusedFamily, FusedModule, kohya_name, one as _one, register_family

_B = "blocks.{i}."

#: Wan 2.x (T2V, and I2V's image cross-attention and image embedder): original module -> diffusers module.
WAN_MODULES: tuple[FusedModule, ...] = (
    *(_one(_B + f"self_attn.{o}", _B + f"attn1.{d}") for o, d in
      (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"))),
    *(_one(_B + f"cross_attn.{o}", _B + f"attn2.{d}") for o, d in
      (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("o", "to_out.0"), ("k_img", "add_k_proj"),
       ("v_img", "add_v_proj"))),
    _one(_B + "ffn.0", _B + "ffn.net.0.proj"),
    _one(_B + "ffn.2", _B + "ffn.net.2"),
    _one("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    _one("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    _one("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    _one("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    _one("time_projection.1", "condition_embedder.time_proj"),
    _one("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    _one("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    _one("head.head", "proj_out"),
)

SUFFIXES.setdefault("native", SUFFIXES["bfl"])

WAN = register_family(FusedFamily(
    family="wan",
    modules=WAN_MODULES,
    layouts={"kohya": tuple((kohya_name(m.bfl), m) for m in WAN_MODULES),
             "native": tuple((m.bfl, m) for m in WAN_MODULES)},
    kohya_markers=("lora_unet_blocks_",),
))

__all__ = ["WAN", "WAN_MODULES"]
