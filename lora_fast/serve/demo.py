"""A tiny random SD1.5-shaped pipeline that takes text prompts, and random LoRA files for it (demo and tests).

:func:`lora_fast.models.build_pipeline` has no tokenizer (there is no model hub here); this module gives it a
byte-level one built in memory (each byte of the prompt is one token), so ``pipe(prompt=...)`` runs the whole
diffusers text-to-image path on a laptop CPU in well under a second per image. Images are noise-like: the weights
are random.
"""

from __future__ import annotations

import os

import torch

UNET_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
TE_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")


def byte_tokenizer(max_length: int = 77):
    """A CLIP-like tokenizer without files: ``<s>`` (0), ``<pad>`` (1), ``</s>`` (2), then one token per byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   model_max_length=max_length)


def tiny_pipeline(seed: int = 0, device="cpu", dtype=torch.float32):
    """A tiny random StableDiffusionPipeline (lora_fast.models) with the byte tokenizer; progress bar off."""
    from ..models import build_pipeline

    import warnings

    import diffusers

    with warnings.catch_warnings():  # the tiny pipeline's scheduler config is replaced below
        warnings.simplefilter("ignore", FutureWarning)
        pipe = build_pipeline("sd15", "tiny", seed=seed, device=device, dtype=dtype)
    pipe.scheduler = diffusers.DDIMScheduler(clip_sample=False, steps_offset=1)
    pipe.tokenizer = byte_tokenizer(pipe.text_encoder.config.max_position_embeddings)
    pipe.register_modules(tokenizer=pipe.tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_adapter(pipe, seed: int, rank: int = 4, std: float = 0.2):
    """A random LoRA on the UNet attention projections and the text encoder's self-attention (diffusers keys)."""
    from .. import LoraAdapter, LoraLayer

    g = torch.Generator().manual_seed(seed)
    layers = {}

    def linear(key, m):
        layers[key] = LoraLayer(down=torch.randn(rank, m.in_features, generator=g) * std,
                                up=torch.randn(m.out_features, rank, generator=g) * std, alpha=float(rank))

    for name, m in pipe.unet.named_modules():
        if name.endswith(UNET_ATTN) and isinstance(m, torch.nn.Linear):
            linear(f"unet.{name}", m)
    for name, m in pipe.text_encoder.named_modules():
        if name.endswith(TE_ATTN) and isinstance(m, torch.nn.Linear):
            path = name if name.startswith("text_model.") else f"text_model.{name}"
            linear(f"text_encoder.{path}", m)
    return LoraAdapter(layers, "diffusers")


def write_adapters(directory, names=("ink", "pixel", "clay", "neon"), seed: int = 0) -> list[str]:
    """Write one random adapter file per name (``<directory>/<name>.safetensors``), for the tiny pipeline of
    ``seed``; returns the paths. Also writes ``broken.safetensors`` (not a safetensors file) to show a failure."""
    os.makedirs(directory, exist_ok=True)
    pipe = tiny_pipeline(seed)
    paths = []
    for i, name in enumerate(names):
        path = os.path.join(os.fspath(directory), f"{name}.safetensors")
        random_adapter(pipe, seed=100 + 17 * seed + i).save(path)
        paths.append(path)
    with open(os.path.join(os.fspath(directory), "broken.safetensors"), "wb") as f:
        f.write(b"\xff" * 64)
    return paths
