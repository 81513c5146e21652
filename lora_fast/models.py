"""SD1.5-, SD2-, SDXL-, SD3/SD3.5-, Flux.1- and Wan-shaped models built from their configs with random weights.

There is no model hub here, so tests and benchmarks build the real diffusers/transformers module
trees from the published configs: ``size="full"`` for benchmarks and name tables, ``size="tiny"``
(same block structure, small widths and depths) for unit tests. Needs the ``diffusers`` extra.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

FAMILIES = ("sd15", "sd2", "sdxl", "sd3", "flux", "wan")

_SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
_SD2_UNET = dict(_SD15_UNET, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
_SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
_SD3_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192,
)
# CLIP text encoders: SD1.x / SDXL text_encoder (ViT-L), SD2 (OpenCLIP ViT-H), SDXL text_encoder_2 (OpenCLIP ViT-bigG).
_CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               hidden_act="quick_gelu", projection_dim=768)
_CLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
               hidden_act="gelu", projection_dim=512)
_CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
               hidden_act="gelu", projection_dim=1280)

_TINY_UNET = dict(block_out_channels=(32, 64, 64, 64), cross_attention_dim=32, attention_head_dim=8,
                  norm_num_groups=8, sample_size=8)
_TINY_SDXL_UNET = dict(block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 2, 2),
                       attention_head_dim=(4, 8, 8), cross_attention_dim=64, addition_time_embed_dim=8,
                       projection_class_embeddings_input_dim=8 * 6 + 32, norm_num_groups=8, sample_size=8)
_TINY_SD3 = dict(sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=4, joint_attention_dim=32,
                 caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16)
# SD3.5 Medium (stabilityai/stable-diffusion-3.5-medium transformer/config.json): MMDiT-X with attn2 in blocks 0-12
_SD35_TRANSFORMER = dict(num_layers=24, caption_projection_dim=1536, pos_embed_max_size=384,
                         dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
_TINY_SD35 = dict(dual_attention_layers=(0,), qk_norm="rms_norm")
# Flux.1-dev transformer (black-forest-labs/FLUX.1-dev transformer/config.json) and its T5-XXL text_encoder_2.
_FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
_TINY_FLUX = dict(in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                  joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8))
# Wan 2.1 T2V 14B transformer (Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json); I2V adds the image
# cross-attention (added_kv_proj_dim) and the CLIP image embedder (image_dim).
_WAN_TRANSFORMER = dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                        out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
                        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
_WAN_I2V = dict(in_channels=36, image_dim=1280, added_kv_proj_dim=5120)
_TINY_WAN = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, text_dim=16, freq_dim=16,
                 ffn_dim=32, num_layers=2, rope_max_seq_len=32)
_TINY_WAN_I2V = dict(in_channels=4, image_dim=12, added_kv_proj_dim=16)
_T5_XXL = dict(vocab_size=32128, d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64,
               feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
_TINY_T5 = dict(vocab_size=1000, d_model=32, d_ff=37, num_layers=2, num_heads=4, d_kv=8)
_TINY_CLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)


def unet_config(family: str, size: str = "full") -> dict:
    base = {"sd15": _SD15_UNET, "sd2": _SD2_UNET, "sdxl": _SDXL_UNET}[family]
    if size == "full":
        return dict(base)
    if family == "sdxl":
        return dict(base, **_TINY_SDXL_UNET)
    cfg = dict(base, **_TINY_UNET)
    if family == "sd2":
        cfg["attention_head_dim"] = (2, 4, 4, 4)
    return cfg


def text_encoder_config(family: str, which: int = 1, size: str = "full") -> dict:
    """which=1 is ``text_encoder``, 2 is ``text_encoder_2`` (SDXL, SD3)."""
    base = {("sd15", 1): _CLIP_L, ("sd2", 1): _CLIP_H, ("sdxl", 1): _CLIP_L, ("sdxl", 2): _CLIP_G,
            ("sd3", 1): _CLIP_L, ("sd3", 2): _CLIP_G, ("flux", 1): _CLIP_L}[(family, which)]
    cfg = dict(base, vocab_size=49408, max_position_embeddings=77)
    if size != "full":
        cfg.update(_TINY_CLIP, vocab_size=1000, bos_token_id=0, eos_token_id=2, pad_token_id=1)
        if family == "sdxl" and which == 1:
            cfg.update(hidden_size=32, projection_dim=32)
    return cfg


@contextlib.contextmanager
def _seeded(seed: Optional[int]):
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _cast(module, dtype):
    # diffusers warns on any .to(dtype) of a model; skip the no-op cast for float32.
    return (module if dtype == torch.float32 else module.to(dtype)).eval()


def build_unet(family: str, size: str = "tiny", *, dtype=torch.float32, device="cpu", seed: Optional[int] = 0):
    from diffusers import UNet2DConditionModel

    with _seeded(seed), torch.device(device):
        return _cast(UNet2DConditionModel(**unet_config(family, size)), dtype)


def sd3_transformer_config(size: str = "tiny", variant: str = "sd3", **override) -> dict:
    """SD3Transformer2DModel kwargs. ``variant="sd3"`` is SD3 Medium; ``"sd3.5"`` adds SD3.5 Medium's MMDiT-X
    second image-stream attention (``attn2``, ``dual_attention_layers``) and RMS q/k norms (tiny: attn2 in the first
    block only). ``override`` replaces any entry."""
    cfg = dict(_SD3_TRANSFORMER, **(_TINY_SD3 if size != "full" else {}))
    if variant == "sd3.5":
        cfg.update(_SD35_TRANSFORMER if size == "full" else _TINY_SD35)
    elif variant != "sd3":
        raise ValueError(f"unknown SD3 variant {variant!r} (expected 'sd3' or 'sd3.5')")
    cfg.update(override)
    return cfg


def build_sd3_transformer(size: str = "tiny", *, dtype=torch.float32, device="cpu", seed: Optional[int] = 0,
                          variant: str = "sd3", **override):
    from diffusers import SD3Transformer2DModel

    cfg = sd3_transformer_config(size, variant, **override)
    with _seeded(seed), torch.device(device):
        return _cast(SD3Transformer2DModel(**cfg), dtype)


def flux_transformer_config(size: str = "tiny", **override) -> dict:
    """FluxTransformer2DModel kwargs: ``"full"`` is Flux.1-dev, ``"tiny"`` has the same block structure with
    small widths; ``override`` replaces any entry (e.g. ``num_layers=1, num_single_layers=1`` for a full-width
    model with one block of each kind)."""
    cfg = dict(_FLUX_TRANSFORMER, **(_TINY_FLUX if size != "full" else {}))
    cfg.update(override)
    return cfg


def build_flux_transformer(size: str = "tiny", *, dtype=torch.float32, device="cpu", seed: Optional[int] = 0,
                           **override):
    """A FluxTransformer2DModel with random weights (see flux_transformer_config for ``size``/``override``).

    ``device="meta"`` builds the tree without memory; give it weights with :func:`materialize`."""
    from diffusers import FluxTransformer2DModel

    with _seeded(seed), torch.device(device):
        return _cast(FluxTransformer2DModel(**flux_transformer_config(size, **override)), dtype)


def wan_transformer_config(size: str = "tiny", variant: str = "t2v", **override) -> dict:
    """WanTransformer3DModel kwargs: ``"full"`` is Wan 2.1 14B, ``"tiny"`` the same block structure with small widths;
    ``variant="i2v"`` adds the image cross-attention (``attn2.add_k_proj/add_v_proj``) and image embedder."""
    cfg = dict(_WAN_TRANSFORMER, **(_TINY_WAN if size != "full" else {}))
    if variant == "i2v":
        cfg.update(_WAN_I2V if size == "full" else _TINY_WAN_I2V)
    elif variant != "t2v":
        raise ValueError(f"unknown Wan variant {variant!r} (expected 't2v' or 'i2v')")
    cfg.update(override)
    return cfg


def build_wan_transformer(size: str = "tiny", *, dtype=torch.float32, device="cpu", seed: Optional[int] = 0,
                          variant: str = "t2v", **override):
    """A WanTransformer3DModel with random weights (see wan_transformer_config)."""
    from diffusers import WanTransformer3DModel

    with _seeded(seed), torch.device(device):
        return _cast(WanTransformer3DModel(**wan_transformer_config(size, variant, **override)), dtype)


def build_t5_encoder(size: str = "tiny", *, dtype=torch.float32, device="cpu", seed: Optional[int] = 0):
    """Flux's ``text_encoder_2``: a T5EncoderModel (T5-XXL at ``"full"``, 2 small layers at ``"tiny"``)."""
    from transformers import T5Config, T5EncoderModel

    cfg = dict(_T5_XXL, **(_TINY_T5 if size != "full" else {}))
    with _seeded(seed), torch.device(device):
        return _cast(T5EncoderModel(T5Config(**cfg)), dtype)


def build_text_encoder(family: str, which: int = 1, size: str = "tiny", *, dtype=torch.float32, device="cpu",
                       seed: Optional[int] = 0):
    """SD1.x/SD2 and SDXL text_encoder are CLIPTextModel; text_encoder_2 is CLIPTextModelWithProjection."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if family == "flux" and which == 2:
        return build_t5_encoder(size, dtype=dtype, device=device, seed=seed)
    cls = CLIPTextModelWithProjection if (which == 2 or family == "sd3") else CLIPTextModel
    with _seeded(seed), torch.device(device):
        return _cast(cls(CLIPTextConfig(**text_encoder_config(family, which, size))), dtype)


def build_components(family: str, size: str = "tiny", *, dtype=torch.float32, device="cpu", seed: Optional[int] = 0,
                     text_encoders: bool = True) -> dict[str, torch.nn.Module]:
    """{component name: module} as a diffusers pipeline of that family holds them (no VAE; no T5 except for
    Flux, whose text_encoder_2 is a T5EncoderModel)."""
    seed2 = None if seed is None else seed + 1
    seed3 = None if seed is None else seed + 2
    if family == "wan":  # the UMT5 text encoder is not built (no LoRA trainer targets it)
        return {"transformer": build_wan_transformer(size, dtype=dtype, device=device, seed=seed)}
    if family == "sd3":
        out = {"transformer": build_sd3_transformer(size, dtype=dtype, device=device, seed=seed)}
    elif family == "flux":
        out = {"transformer": build_flux_transformer(size, dtype=dtype, device=device, seed=seed)}
    else:
        out = {"unet": build_unet(family, size, dtype=dtype, device=device, seed=seed)}
    if text_encoders:
        out["text_encoder"] = build_text_encoder(family, 1, size, dtype=dtype, device=device, seed=seed2)
        if family in ("sdxl", "sd3", "flux"):
            out["text_encoder_2"] = build_text_encoder(family, 2, size, dtype=dtype, device=device, seed=seed3)
    return out


def _tiny_vae(latent_channels: int, *, dtype, device, seed):
    """The smallest AutoencoderKL a pipeline accepts (one 8-channel block): pipelines need one; LoRAs never target it."""
    import diffusers

    with _seeded(seed), torch.device(device):
        return _cast(diffusers.AutoencoderKL(
            block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
            latent_channels=latent_channels, norm_num_groups=8), dtype)


def build_pipeline(family: str, size: str = "tiny", *, dtype=torch.float32, device="cpu", seed: Optional[int] = 0,
                   t5: bool = False):
    """A real diffusers pipeline object around build_components (tiny VAE, no tokenizers; T5 for Flux, and for
    SD3 as ``text_encoder_3`` when ``t5=True``).

    Enough for diffusers' own LoRA loading/fusing (the interop oracle) and for lora_fast's
    pipeline targets; not for generating images from text.
    """
    import diffusers

    comps = build_components(family, size, dtype=dtype, device=device, seed=seed)
    if family == "wan":  # transformer only: no VAE, text encoder or tokenizer
        return diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None,
                                     scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
                                     transformer=comps["transformer"])
    vae = _tiny_vae(16 if family in ("sd3", "flux") else 4, dtype=dtype, device=device, seed=seed)
    if family == "flux":
        return diffusers.FluxPipeline(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=comps.get("text_encoder"),
            tokenizer=None, text_encoder_2=comps.get("text_encoder_2"), tokenizer_2=None,
            transformer=comps["transformer"])
    if family == "sd3":
        return diffusers.StableDiffusion3Pipeline(
            transformer=comps["transformer"], scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae,
            text_encoder=comps.get("text_encoder"), tokenizer=None, text_encoder_2=comps.get("text_encoder_2"),
            tokenizer_2=None, tokenizer_3=None, text_encoder_3=build_t5_encoder(
                size, dtype=dtype, device=device, seed=None if seed is None else seed + 3) if t5 else None)
    scheduler = diffusers.DDIMScheduler(clip_sample=False)
    if family == "sdxl":
        return diffusers.StableDiffusionXLPipeline(
            vae=vae, text_encoder=comps.get("text_encoder"), text_encoder_2=comps.get("text_encoder_2"), tokenizer=None,
            tokenizer_2=None, unet=comps["unet"], scheduler=scheduler)
    return diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=comps.get("text_encoder"), tokenizer=None, unet=comps["unet"], scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def build_flux_pipeline_around(transformer, *, dtype=torch.float32, device="cpu", seed: Optional[int] = 0):
    """A FluxPipeline holding ``transformer`` (e.g. a full-width one with few blocks), a tiny VAE and no text
    encoders or tokenizers: enough for diffusers' Flux LoRA loading and fusing of transformer LoRAs, and for
    lora_fast's pipeline targets; not for generating images."""
    import diffusers

    vae = _tiny_vae(16, dtype=dtype, device=device, seed=seed)
    return diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                  tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)


def materialize(module: torch.nn.Module, *, dtype=torch.float32, device="cpu", seed: int = 0, std: float = 0.02):
    """Give a meta-device model real random weights quickly.

    Full-size models built with nn.init take minutes on 2 cores; benchmarks only need realistic
    magnitudes. One 16M-element normal pool is drawn once and each tensor copies a window of it
    starting at a random offset (so tensors differ), cast straight to ``dtype``.
    """
    module = module.to(dtype) if dtype != torch.float32 else module
    module.to_empty(device=device)
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(1 << 24, generator=gen) * std
    pool = torch.cat([pool, pool]).to(device)  # a window may wrap past the end
    n_pool = 1 << 24
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if not t.is_floating_point():
                continue
            flat = t.view(-1)
            done = 0
            while done < flat.numel():
                start = int(torch.randint(0, n_pool, (1,), generator=gen))
                n = min(n_pool, flat.numel() - done)
                flat[done:done + n].copy_(pool[start:start + n])
                done += n
    return module.eval()
