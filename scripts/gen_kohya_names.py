#!/usr/bin/env python
"""Generate the kohya module-name tables in lora_fast/formats/names/ (run once; the output is committed).

kohya names replace every '.' of a module path with '_', which cannot be undone by string rules
(``down_blocks``, ``to_q``, ``time_emb_proj``). So we enumerate the real module trees of the
full-size SD1.5, SD2 and SDXL models (built on the meta device from their configs) and record, for
every Linear/Conv2d, the adapter key it has in lora_fast (diffusers naming) and every kohya name
that refers to it. The reader then looks names up exactly.

UNet names come in two spellings: diffusers module paths (what kohya writes for SD1.x/SD2) and the
LDM/SGM layout (what kohya writes for SDXL, and what some SD1.x tools write). The LDM path of each
diffusers module is computed here from the UNet config (layers_per_block, which blocks have
attention); see docs in ``ldm_unet_path``.

Text encoders: the adapter key always keeps ``text_model.`` (transformers 5's CLIPTextModel has no
such level in its module tree; CLIPTextModelWithProjection does). Kohya names are the root plus that
path; the same name without ``text_model_`` is kept as an alias because diffusers' own exporter
writes it for transformers-5 CLIPTextModel adapters.

Usage: python scripts/gen_kohya_names.py [--out lora_fast/formats/names]
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
from pathlib import Path

import torch

from lora_fast.models import build_text_encoder, build_unet, unet_config

# Tables produced, and the text encoders of each family: (component, which, preferred root, alias roots).
FAMILY_TEXT_ENCODERS = {
    "sd15": [("text_encoder", 1, "lora_te", ("lora_te1",))],
    "sd2": [("text_encoder", 1, "lora_te", ("lora_te1",))],
    "sdxl": [("text_encoder", 1, "lora_te1", ("lora_te",)), ("text_encoder_2", 2, "lora_te2", ())],
}
# kohya itself writes diffusers paths for SD1.x/SD2 UNets and LDM paths for SDXL.
UNET_PREFERS_LDM = {"sd15": False, "sd2": False, "sdxl": True}

_RESNET_LDM = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}
_TOP_LEVEL_LDM = {"conv_in": "input_blocks.0.0", "conv_out": "out.2",
                  "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
                  "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def _has_attention(block_type: str) -> bool:
    return "Attn" in block_type


def ldm_unet_path(path: str, cfg: dict) -> str:
    """The LDM/SGM module path of a diffusers UNet2DConditionModel module path.

    With L = layers_per_block, a down block b holds L resnets (+ L attentions) and one downsampler,
    i.e. L+1 LDM input blocks; input block 0 is conv_in. An up block holds L+1 resnets (+ attentions)
    and its upsampler sits in the last of its L+1 output blocks, after the attention if there is one.
    Names inside a resnet are renamed; names inside a Transformer2DModel are unchanged.
    """
    if path in _TOP_LEVEL_LDM:
        return _TOP_LEVEL_LDM[path]
    L = cfg["layers_per_block"]
    parts = path.split(".")

    def resnet_rest(rest: list[str]) -> str:
        if len(rest) != 1 or rest[0] not in _RESNET_LDM:
            raise ValueError(f"unexpected resnet module {path!r}")
        return _RESNET_LDM[rest[0]]

    if parts[0] in ("down_blocks", "up_blocks"):
        b, sub = int(parts[1]), parts[2]
        if parts[0] == "down_blocks":
            if sub == "downsamplers":
                if parts[3:] != ["0", "conv"]:
                    raise ValueError(f"unexpected downsampler module {path!r}")
                return f"input_blocks.{(L + 1) * b + L + 1}.0.op"
            j = int(parts[3])
            block = f"input_blocks.{(L + 1) * b + j + 1}"
        else:
            if sub == "upsamplers":
                if parts[3:] != ["0", "conv"]:
                    raise ValueError(f"unexpected upsampler module {path!r}")
                slot = 2 if _has_attention(cfg["up_block_types"][b]) else 1
                return f"output_blocks.{(L + 1) * b + L}.{slot}.conv"
            j = int(parts[3])
            block = f"output_blocks.{(L + 1) * b + j}"
        if sub == "resnets":
            return f"{block}.0.{resnet_rest(parts[4:])}"
        if sub == "attentions":
            return f"{block}.1." + ".".join(parts[4:])
        raise ValueError(f"unexpected block member {path!r}")
    if parts[0] == "mid_block":
        sub, j = parts[1], int(parts[2])
        if sub == "resnets" and j in (0, 1):
            return f"middle_block.{2 * j}.{resnet_rest(parts[3:])}"
        if sub == "attentions" and j == 0:
            return "middle_block.1." + ".".join(parts[3:])
        raise ValueError(f"unexpected mid-block module {path!r}")
    raise ValueError(f"no LDM name for UNet module {path!r}")


def _kind_and_shape(module: torch.nn.Module) -> tuple[str, list[int]]:
    kind = "conv2d" if isinstance(module, torch.nn.Conv2d) else "linear"
    return kind, [int(d) for d in module.weight.shape]


def _targets(model: torch.nn.Module):
    for path, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            yield path, module


def _underscored(root: str, path: str) -> str:
    return f"{root}_{path.replace('.', '_')}"


def family_table(family: str) -> dict:
    modules: dict[str, dict] = {}
    unet = build_unet(family, "full", device="meta")
    cfg = unet_config(family, "full")
    for path, module in _targets(unet):
        kind, shape = _kind_and_shape(module)
        diffusers_name = _underscored("lora_unet", path)
        ldm_name = _underscored("lora_unet", ldm_unet_path(path, cfg))
        names = [ldm_name, diffusers_name] if UNET_PREFERS_LDM[family] else [diffusers_name, ldm_name]
        modules[f"unet.{path}"] = {"kind": kind, "shape": shape, "names": names}
    del unet
    for component, which, root, alias_roots in FAMILY_TEXT_ENCODERS[family]:
        encoder = build_text_encoder(family, which, "full", device="meta")
        # CLIPTextModel (transformers 5) lacks the text_model level; the adapter key always has it.
        lacks_text_model = not hasattr(encoder, "text_model") or not any(
            p.startswith("text_model.") for p, _ in encoder.named_modules())
        for path, module in _targets(encoder):
            if lacks_text_model:
                path = f"text_model.{path}"
            kind, shape = _kind_and_shape(module)
            names = [_underscored(root, path)] + [_underscored(r, path) for r in alias_roots]
            if path.startswith("text_model."):
                short = path[len("text_model."):]
                names += [_underscored(r, short) for r in (root, *alias_roots)]
            modules[f"{component}.{path}"] = {"kind": kind, "shape": shape, "names": names}
        del encoder
    seen: dict[str, str] = {}
    for key, entry in modules.items():
        for name in entry["names"]:
            if name in seen:
                raise RuntimeError(f"{family}: kohya name {name} names both {seen[name]} and {key}")
            seen[name] = key
    return {"family": family, "generated_by": "scripts/gen_kohya_names.py", "modules": modules}


def write_gz_json(obj: dict, path: Path) -> None:
    raw = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    buf = io.BytesIO()
    # mtime=0 and no file name: the output is byte-identical between runs.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(raw)
    path.write_bytes(buf.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "lora_fast/formats/names")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tables = {family: family_table(family) for family in FAMILY_TEXT_ENCODERS}
    # A kohya name must mean the same module in every family that has it, so that the family
    # choice on read only affects layer kinds and shape checks, never where a LoRA lands.
    owner: dict[str, str] = {}
    for family, table in tables.items():
        for key, entry in table["modules"].items():
            for name in entry["names"]:
                if owner.setdefault(name, key) != key:
                    raise RuntimeError(f"kohya name {name} means {owner[name]} in one family and {key} in {family}")
    for family, table in tables.items():
        out = args.out / f"{family}.json.gz"
        write_gz_json(table, out)
        print(f"{out}: {len(table['modules'])} modules")


if __name__ == "__main__":
    main()
