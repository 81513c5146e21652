"""Denoise a batch of 4 images, each with its own LoRA, in one pipeline call (lora_fast.per_sample_adapters).

    python examples/per_sample_denoise.py            # exits 0 when every image matches its single-adapter run

A tiny SD1.5-shaped pipeline with random weights (lora_fast.models.build_pipeline: no tokenizer, so the prompt
embeddings come from the pipeline's text encoder run on fixed token ids) holds 4 random adapters on the UNet
attention projections and the text encoder's self-attention; "clay" also adapts one UNet convolution, which
takes the per-adapter fallback path. The batch uses

    image 0: "ink"   image 1: "pixel"   image 2: None (base model)   image 3: {"clay": 0.6, "neon": 0.4}

inside one ``with lora_fast.per_sample_adapters(pipe, entries):`` block (text encoder and UNet; the UNet sees
the classifier-free-guidance batch of 8 = uncond block + cond block, entry j mod 4). Then each image is
generated alone after ``set_adapters`` with its entry (``disable_lora`` for None), with the same seed, and
compared: max |batched - alone| / max |alone| must be <= 1e-5 (fp32).
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch

import lora_fast
from lora_fast import LoraAdapter, LoraLayer
from lora_fast.models import build_pipeline

UNET_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
TE_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")
ENTRIES = ["ink", "pixel", None, {"clay": 0.6, "neon": 0.4}]
TOLERANCE = 1e-5  # max |difference| / max |value| in fp32, as tests/test_per_sample.py checks per-sample outputs
TOKENS = 77


def random_adapter(pipe, seed: int, rank: int = 4, conv: bool = False) -> LoraAdapter:
    """Random factors (std 0.2, alpha = rank) on UNet attention and text-encoder self-attention, diffusers keys."""
    g = torch.Generator().manual_seed(seed)
    layers = {}

    def linear(key, m):
        down = torch.randn(rank, m.in_features, generator=g) * 0.2
        up = torch.randn(m.out_features, rank, generator=g) * 0.2
        layers[key] = LoraLayer(down=down, up=up, alpha=float(rank))

    for name, m in pipe.unet.named_modules():
        if name.endswith(UNET_ATTN) and isinstance(m, torch.nn.Linear):
            linear(f"unet.{name}", m)
    for name, m in pipe.text_encoder.named_modules():
        if name.endswith(TE_ATTN) and isinstance(m, torch.nn.Linear):
            # adapter files name text-encoder layers from text_model (see lora_fast.adapter)
            path = name if name.startswith("text_model.") else f"text_model.{name}"
            linear(f"text_encoder.{path}", m)
    if conv:  # a conv LoRA runs through the per-adapter fallback, not the segmented kernels
        m = pipe.unet.get_submodule("down_blocks.0.resnets.0.conv1")
        down = torch.randn(rank, m.in_channels, *m.kernel_size, generator=g) * 0.2
        up = torch.randn(m.out_channels, rank, 1, 1, generator=g) * 0.2
        layers["unet.down_blocks.0.resnets.0.conv1"] = LoraLayer(down=down, up=up, alpha=float(rank), kind="conv")
    return LoraAdapter(layers, "diffusers")


def encode(pipe, n: int, seed: int) -> torch.Tensor:
    """Text-encoder states of n fixed random token sequences (this pipeline has no tokenizer)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, pipe.text_encoder.config.vocab_size, (n, TOKENS), generator=g)
    return pipe.text_encoder(ids)[0]


def generate(pipe, indices: list[int], steps: int) -> torch.Tensor:
    """Final latents of the images ``indices`` (prompt i and seed i for image i), CFG on."""
    cond = encode(pipe, len(ENTRIES), seed=1)[indices]
    uncond = encode(pipe, len(ENTRIES), seed=2)[indices]
    out = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=steps, guidance_scale=5.0,
               generator=[torch.Generator().manual_seed(i) for i in indices], output_type="latent")
    return out.images


def select(pipe, entry) -> None:
    """What running one image alone with this entry means in the ordinary API."""
    if entry is None:
        lora_fast.disable_lora(pipe)
        return
    lora_fast.enable_lora(pipe)
    if isinstance(entry, str):
        lora_fast.set_adapters(pipe, [entry])
    else:
        lora_fast.set_adapters(pipe, list(entry), list(entry.values()))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)

    pipe = build_pipeline("sd15", "tiny", seed=0)
    pipe.set_progress_bar_config(disable=True)
    for i, name in enumerate(["ink", "pixel", "clay", "neon"]):
        lora_fast.load_lora_weights(pipe, random_adapter(pipe, seed=10 + i, conv=name == "clay"), adapter_name=name)

    all_images = list(range(len(ENTRIES)))
    with torch.no_grad():
        with lora_fast.per_sample_adapters(pipe, ENTRIES):
            batched = generate(pipe, all_images, args.steps)
        alone = []
        for i, entry in enumerate(ENTRIES):
            select(pipe, entry)
            alone.append(generate(pipe, [i], args.steps))
        lora_fast.enable_lora(pipe)

    worst = 0.0
    for i, entry in enumerate(ENTRIES):
        ref = alone[i][0]
        err = ((batched[i] - ref).abs().max() / ref.abs().max()).item()
        worst = max(worst, err)
        print(f"image {i} ({entry!r}): max |batched - alone| / max |alone| = {err:.2e}")
    # The check means something only if the entries really give different images.
    base = alone[2][0]
    spread = min(((alone[i][0] - base).abs().max() / base.abs().max()).item() for i in (0, 1, 3))
    print(f"adapters vs base: images differ by >= {spread:.2e} (relative max)")
    ok = worst <= TOLERANCE and spread > 100 * TOLERANCE
    print(f"{'OK' if ok else 'MISMATCH'}: worst {worst:.2e}, tolerance {TOLERANCE:.0e}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
