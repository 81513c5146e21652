"""PEFT-style LoRA keys and LoraConfig semantics, shared by the PEFT and diffusers formats.

A PEFT adapter is ``adapter_model.safetensors`` (keys ``base_model.model.<path>.lora_A.weight``) plus
``adapter_config.json``. diffusers files use the same key grammar behind a component prefix, with the
config in the header (see diffusers.py), so the grammar, the config resolution and the layer builder
live here.

Key grammar after the ``base_model.model.`` / component prefix (``<adapter>`` is an optional
adapter name that live-model state dicts carry and saved files do not)::

    <path>.lora_A[.<adapter>].weight           down, (r, in) or (r, in, kh, kw)
    <path>.lora_B[.<adapter>].weight           up, (out, r) or (out, r, 1, 1)
    <path>.lora_B[.<adapter>].bias             lora_bias, (out,)
    <path>.lora_embedding_A[.<adapter>]        embedding down, (r, num_embeddings)
    <path>.lora_embedding_B[.<adapter>]        embedding up, (dim, r)
    <path>.lora_magnitude_vector[.<adapter>][.weight]   DoRA magnitude, (out,) or (1, out, 1, 1)
"""

from __future__ import annotations

import collections
import functools
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch

from ..adapter import LoraAdapter, LoraLayer, split_component
from ..errors import LoraFormatError

PEFT_PREFIX = "base_model.model."
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PICKLE_NAME = "adapter_model.bin"
PEFT_CONFIG_NAME = "adapter_config.json"

# LoraConfig defaults PEFT applies to fields a config leaves out.
_PEFT_DEFAULT_R = 8
_PEFT_DEFAULT_ALPHA = 8

_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3")
# Paths inside a CLIP text model; transformers 5's CLIPTextModel drops the ``text_model.`` level above them.
_CLIP_INNER_HEADS = ("encoder.layers.", "embeddings.", "final_layer_norm")


# ----------------------------------------------------------------------------------------------
# key grammar


@dataclass
class ParsedKey:
    path: str
    role: str  # "down" | "up" | "bias" | "magnitude"
    embedding: bool = False
    adapter: Optional[str] = None


def parse_peft_tail(key: str) -> Optional[ParsedKey]:
    """Parse ``<path>.<lora part>[...]`` (no prefix); None when the key is not of this grammar."""
    tokens = key.split(".")
    idx = None
    for i in range(len(tokens) - 1, 0, -1):
        if tokens[i] in _PARTS:
            idx = i
            break
    if idx is None:
        return None
    path = ".".join(tokens[:idx])
    part, rest = tokens[idx], tokens[idx + 1:]
    if not path or any(t == "" for t in tokens[:idx]):
        return None
    adapter = None
    if part in ("lora_A", "lora_B"):
        if len(rest) == 2:
            adapter, rest = rest[0], rest[1:]
        if rest == ["weight"]:
            role = "down" if part == "lora_A" else "up"
        elif rest == ["bias"] and part == "lora_B":
            role = "bias"
        else:
            return None
        return ParsedKey(path, role, False, adapter)
    if part in ("lora_embedding_A", "lora_embedding_B"):
        if len(rest) > 1:
            return None
        adapter = rest[0] if rest else None
        return ParsedKey(path, "down" if part == "lora_embedding_A" else "up", True, adapter)
    # lora_magnitude_vector: saved files drop ``.weight``; live state dicts keep it and the adapter name.
    if rest and rest[-1] == "weight":
        rest = rest[:-1]
    if len(rest) > 1:
        return None
    adapter = rest[0] if rest else None
    return ParsedKey(path, "magnitude", False, adapter)


def normalize_text_encoder_path(component: Optional[str], path: str) -> str:
    """Give CLIP text-encoder paths their ``text_model.`` level back (transformers 5 drops it)."""
    if component in TEXT_COMPONENTS and path.startswith(_CLIP_INNER_HEADS):
        return "text_model." + path
    return path


# ----------------------------------------------------------------------------------------------
# collecting tensors per module


@dataclass
class ModuleTensors:
    """The tensors found for one module, with the key each came from (for error messages)."""

    down: Optional[torch.Tensor] = None
    up: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    magnitude: Optional[torch.Tensor] = None
    embedding: Optional[bool] = None
    keys: dict = field(default_factory=dict)  # role -> original key
    raw_path: str = ""  # the path as the file spells it (what config patterns match against)
    component: Optional[str] = None
    group: Optional[str] = None  # which config applies: the key's own component prefix, None if it had none


class ModuleCollector:
    """Groups (key, component, path, role) records into ModuleTensors, rejecting duplicates."""

    def __init__(self, where: str):
        self.where = where
        self.modules: dict[str, ModuleTensors] = {}
        self.adapter_name: Optional[str] = None
        self._adapter_key: Optional[str] = None

    def add(self, key: str, tensor, component: Optional[str], parsed: ParsedKey, group: Optional[str] = None) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise LoraFormatError(f"{self.where}: {key!r} is a {type(tensor).__name__}, not a tensor")
        if not tensor.is_floating_point():
            raise LoraFormatError(f"{self.where}: {key!r} has dtype {tensor.dtype}; LoRA tensors must be floating point")
        if parsed.adapter is not None:
            if self.adapter_name is None:
                self.adapter_name, self._adapter_key = parsed.adapter, key
            elif parsed.adapter != self.adapter_name:
                raise LoraFormatError(
                    f"{self.where}: {key!r} belongs to adapter {parsed.adapter!r} but {self._adapter_key!r} to "
                    f"{self.adapter_name!r}; a state dict must hold one adapter"
                )
        path = normalize_text_encoder_path(component, parsed.path)
        full = f"{component}.{path}" if component else path
        mod = self.modules.get(full)
        if mod is None:
            mod = self.modules[full] = ModuleTensors(raw_path=parsed.path, component=component, group=group)
        if parsed.role in mod.keys:
            raise LoraFormatError(
                f"{self.where}: {key!r} and {mod.keys[parsed.role]!r} both give the {parsed.role} tensor of module {full!r}"
            )
        if parsed.role in ("down", "up"):
            if mod.embedding is not None and mod.embedding != parsed.embedding:
                raise LoraFormatError(
                    f"{self.where}: {key!r} mixes lora_embedding_* and lora_A/lora_B names for module {full!r}"
                )
            mod.embedding = parsed.embedding
        mod.keys[parsed.role] = key
        setattr(mod, parsed.role, tensor)


# ----------------------------------------------------------------------------------------------
# LoraConfig semantics


def _pattern_lookup(patterns: dict, path: str, default, what: str, where: str):
    # PEFT's get_pattern_key: the first key K (dict order) for which (.*\.)?(K)$ matches the path.
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", path):
                return patterns[key], key
        except re.error as exc:
            raise LoraFormatError(f"{where}: {what} key {key!r} is not a valid regular expression ({exc})") from None
    return default, None


def _check_number(value, what: str, where: str, *, integer: bool = False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LoraFormatError(f"{where}: {what} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise LoraFormatError(f"{where}: {what} must be finite, got {value!r}")
    if integer and (float(value) != int(value) or value <= 0):
        raise LoraFormatError(f"{where}: {what} must be a positive integer, got {value!r}")
    return value


@dataclass
class AdapterConfig:
    """The fields of a LoraConfig that decide each module's rank, alpha and variant."""

    r: Optional[int] = None  # None: the config does not state it (PEFT's default applies, not checked)
    lora_alpha: float = _PEFT_DEFAULT_ALPHA
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    lora_bias: bool = False

    @classmethod
    def from_dict(cls, cfg, where: str) -> "AdapterConfig":
        if not isinstance(cfg, dict):
            raise LoraFormatError(f"{where}: adapter config must be a JSON object, got {type(cfg).__name__}")
        peft_type = cfg.get("peft_type", "LORA")
        if peft_type not in (None, "LORA"):
            raise LoraFormatError(f"{where}: peft_type is {peft_type!r}; only LoRA adapters are supported")
        out = cls()
        if cfg.get("r") is not None:
            out.r = int(_check_number(cfg["r"], "r", where, integer=True))
        if cfg.get("lora_alpha") is not None:
            out.lora_alpha = _check_number(cfg["lora_alpha"], "lora_alpha", where)
        for name in ("rank_pattern", "alpha_pattern"):
            pat = cfg.get(name) or {}
            if not isinstance(pat, dict):
                raise LoraFormatError(f"{where}: {name} must be an object, got {pat!r}")
            for k, v in pat.items():
                _check_number(v, f"{name}[{k!r}]", where, integer=(name == "rank_pattern"))
            setattr(out, name, dict(pat))
        for name in ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias"):
            val = cfg.get(name)
            if val is None:
                val = False
            if not isinstance(val, bool):
                raise LoraFormatError(f"{where}: {name} must be true or false, got {val!r}")
            setattr(out, name, val)
        bias = cfg.get("bias", "none")
        if bias not in (None, "none"):
            # bias="all"/"lora_only" trains the base modules' own biases, which a LoRA adapter cannot carry.
            raise LoraFormatError(f"{where}: bias={bias!r} (trained base-module biases) is not supported")
        return out

    def rank_for(self, path: str, where: str) -> tuple[Optional[int], Optional[str]]:
        val, key = _pattern_lookup(self.rank_pattern, path, self.r, "rank_pattern", where)
        return (None if val is None else int(val)), key

    def alpha_for(self, path: str, where: str) -> float:
        val, _ = _pattern_lookup(self.alpha_pattern, path, self.lora_alpha, "alpha_pattern", where)
        return float(val)


def parse_config_json(text, where: str) -> dict:
    try:
        cfg = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise LoraFormatError(f"{where}: adapter config is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise LoraFormatError(f"{where}: adapter config must be a JSON object, got {type(cfg).__name__}")
    return cfg


# ----------------------------------------------------------------------------------------------
# building layers


def build_layer(name: str, mod: ModuleTensors, config: Optional[AdapterConfig], where: str) -> LoraLayer:
    """Validate one module's tensors against each other and the config; return its LoraLayer."""
    some_key = next(iter(mod.keys.values()))
    for role, partner in (("down", "up"), ("up", "down")):
        if getattr(mod, role) is None:
            have = mod.keys.get(partner) or some_key
            missing = {"down": "lora_A (down)", "up": "lora_B (up)"}[role]
            raise LoraFormatError(f"{where}: {have!r} has no matching {missing} tensor for module {name!r}")
    down, up = mod.down, mod.up
    kdown, kup = mod.keys["down"], mod.keys["up"]

    if mod.embedding:
        kind = "embedding"
        if down.dim() != 2 or up.dim() != 2:
            raise LoraFormatError(
                f"{where}: {kdown!r} {tuple(down.shape)} / {kup!r} {tuple(up.shape)}: embedding factors must be 2-D"
            )
    elif down.dim() == 4:
        kind = "conv"
        if up.dim() != 4 or tuple(up.shape[2:]) != (1, 1):
            raise LoraFormatError(
                f"{where}: {kup!r} has shape {tuple(up.shape)} but {kdown!r} is a conv factor {tuple(down.shape)}; "
                "a conv lora_B must be (out, r, 1, 1)"
            )
    elif down.dim() == 2:
        kind = "linear"
        if up.dim() != 2:
            raise LoraFormatError(
                f"{where}: {kup!r} has shape {tuple(up.shape)} but {kdown!r} is 2-D {tuple(down.shape)}"
            )
    else:
        raise LoraFormatError(
            f"{where}: {kdown!r} has shape {tuple(down.shape)}; only 2-D (Linear/Embedding) and 4-D (Conv2d) factors "
            "are supported"
        )
    rank = int(down.shape[0])
    if int(up.shape[1]) != rank:
        raise LoraFormatError(
            f"{where}: rank mismatch for module {name!r}: {kdown!r} has shape {tuple(down.shape)} (rank {rank}) "
            f"but {kup!r} has shape {tuple(up.shape)} (rank {int(up.shape[1])})"
        )
    if rank == 0:
        raise LoraFormatError(f"{where}: {kdown!r} has rank 0")
    out = int(up.shape[0])

    if mod.bias is not None and (mod.bias.dim() != 1 or int(mod.bias.shape[0]) != out):
        raise LoraFormatError(f"{where}: {mod.keys['bias']!r} has shape {tuple(mod.bias.shape)}, expected ({out},)")
    if mod.magnitude is not None and int(mod.magnitude.numel()) != out:
        raise LoraFormatError(
            f"{where}: {mod.keys['magnitude']!r} has shape {tuple(mod.magnitude.shape)} but the module has {out} outputs"
        )

    use_rslora = fan_in_fan_out = False
    if config is None:
        alpha = float(rank)  # no config: alpha = rank, scale 1 (diffusers/PEFT convention)
    else:
        expected, pattern_key = config.rank_for(mod.raw_path, where)
        if expected is not None and expected != rank:
            src = f"rank_pattern[{pattern_key!r}]" if pattern_key is not None else "r"
            raise LoraFormatError(
                f"{where}: {kdown!r} has rank {rank} but the config's {src} says {expected} for module {name!r}"
            )
        alpha = config.alpha_for(mod.raw_path, where)
        use_rslora, fan_in_fan_out = config.use_rslora, config.fan_in_fan_out
        if mod.magnitude is not None and not config.use_dora:
            raise LoraFormatError(
                f"{where}: {mod.keys['magnitude']!r} is a DoRA magnitude but the config has use_dora=false"
            )
        if mod.magnitude is None and config.use_dora:
            raise LoraFormatError(f"{where}: config has use_dora=true but module {name!r} has no lora_magnitude_vector")
        if mod.bias is not None and not config.lora_bias:
            raise LoraFormatError(f"{where}: {mod.keys['bias']!r} is a lora_B bias but the config has lora_bias=false")
    return LoraLayer(
        down=down, up=up, alpha=alpha, kind=kind, use_rslora=use_rslora,
        magnitude=mod.magnitude, magnitude_axis="out" if mod.magnitude is not None else None,
        fan_in_fan_out=fan_in_fan_out, bias=mod.bias,
    )


def build_layers(collector: ModuleCollector, configs: Callable[[ModuleTensors], Optional[AdapterConfig]],
                 where: str) -> dict[str, LoraLayer]:
    if not collector.modules:
        raise LoraFormatError(f"{where}: no LoRA tensors found")
    return {name: build_layer(name, mod, configs(mod), where) for name, mod in collector.modules.items()}


# ----------------------------------------------------------------------------------------------
# reading PEFT


def read_peft(state_dict: dict, *, config: Optional[dict] = None, component: Optional[str] = None,
              source: str = "<state dict>", metadata: Optional[dict] = None) -> LoraAdapter:
    """``base_model.model.`` keys (+ adapter_config.json contents) -> LoraAdapter(format="peft").

    PEFT keys carry no component; layers get ``component`` as prefix, or none.
    """
    cfg = AdapterConfig.from_dict(config, f"{source}: adapter_config.json") if config is not None else None
    collector = ModuleCollector(source)
    for key, tensor in state_dict.items():
        if not key.startswith(PEFT_PREFIX):
            raise LoraFormatError(f"{source}: {key!r} lacks the {PEFT_PREFIX!r} prefix of the other PEFT keys")
        parsed = parse_peft_tail(key[len(PEFT_PREFIX):])
        if parsed is None:
            raise LoraFormatError(f"{source}: {key!r} is not a LoRA key PEFT writes")
        collector.add(key, tensor, component, parsed)
    layers = build_layers(collector, lambda _c: cfg, source)
    return LoraAdapter(layers=layers, format="peft", metadata=dict(metadata or {}), source=source)


# ----------------------------------------------------------------------------------------------
# writing (shared by the PEFT and diffusers writers)


def _pattern_key_for(path: str) -> str:
    # '^' anchors at the module path's start (as diffusers writes rank keys). A CLIP text-model path
    # also has to match transformers 5's CLIPTextModel, which has no text_model level.
    if path.startswith("text_model.") and path[len("text_model."):].startswith(_CLIP_INNER_HEADS):
        return r"^(?:text_model\.)?" + path[len("text_model."):]
    return "^" + path


def _target_regex(paths) -> str:
    """target_modules as one regex that PEFT fullmatches against module names: exactly these modules.

    (A list would also match every module whose name merely ends with ``.<entry>``, e.g. ``lin`` would
    wrap ``block.lin`` too.) CLIP text-model paths also match without the ``text_model.`` level.
    """
    alts = []
    for path in sorted(paths):
        if path.startswith("text_model.") and path[len("text_model."):].startswith(_CLIP_INNER_HEADS):
            alts.append(r"(?:text_model\.)?" + re.escape(path[len("text_model."):]))
        else:
            alts.append(re.escape(path))
    return "|".join(alts) if len(alts) == 1 else "(?:" + "|".join(alts) + ")"


def _json_number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def check_writable_to_peft(adapter_layers: dict[str, LoraLayer], where: str, fmt: str) -> None:
    for name, layer in adapter_layers.items():
        if layer.magnitude is not None and layer.magnitude_axis != "out":
            raise LoraFormatError(
                f"{where}: module {name!r} has a per-input-column DoRA magnitude (kohya dora_scale); the {fmt} "
                "format only stores per-output-row magnitudes (lora_magnitude_vector), so it cannot be written"
            )


def export_component(layers: dict[str, LoraLayer], where: str, fmt: str, *,
                     magnitude_suffix: str = "lora_magnitude_vector") -> tuple[dict[str, torch.Tensor], dict]:
    """One component's layers (un-prefixed module paths) -> (PEFT-named tensors without prefix, config dict).

    The config states every module's rank and alpha exactly (rank_pattern/alpha_pattern with '^' keys);
    raises LoraFormatError for what a single LoraConfig cannot express.
    """
    check_writable_to_peft(layers, where, fmt)
    prepared = {}
    for path, layer in layers.items():
        down, up, alpha = layer.down, layer.up, layer.alpha
        if layer.mid is not None:
            # Fold the Tucker core into down exactly as LoraLayer.factors() does (fp32), so delta() is unchanged.
            r_new = int(layer.mid.shape[0])
            down = torch.einsum("pqyx,qi->piyx", layer.mid.float(), layer.down.reshape(layer.down.shape[0], -1).float())
            down = down.reshape(r_new, int(layer.down.shape[1]), int(layer.mid.shape[2]), int(layer.mid.shape[3]))
            r_old = layer.rank
            if r_new != r_old:
                alpha = alpha * (math.sqrt(r_new / r_old) if layer.use_rslora else r_new / r_old)
        if layer.kind == "conv":
            if down.dim() == 2:
                down = down.reshape(*down.shape, 1, 1)
            if up.dim() == 2:
                up = up.reshape(*up.shape, 1, 1)
        elif layer.kind == "linear":
            down = down.reshape(down.shape[0], -1)
            up = up.reshape(up.shape[0], -1)
        prepared[path] = (layer, down, up, alpha)

    if not prepared:
        raise LoraFormatError(f"{where}: no layers to write")
    flags = {}
    for flag in ("fan_in_fan_out",):
        values = {getattr(l, flag) for l, *_ in prepared.values()}
        if len(values) > 1:
            raise LoraFormatError(f"{where}: some layers have {flag}=True and others not; one {fmt} config cannot say both")
        flags[flag] = values.pop()
    dora = {p for p, (l, *_) in prepared.items() if l.magnitude is not None}
    if dora and len(dora) != len(prepared):
        plain = next(p for p in prepared if p not in dora)
        raise LoraFormatError(
            f"{where}: module {plain!r} has no DoRA magnitude while others do; a {fmt} config applies DoRA to all modules"
        )
    with_bias = {p for p, (l, *_) in prepared.items() if l.bias is not None}
    if with_bias and dora:
        raise LoraFormatError(f"{where}: PEFT does not support lora_bias together with DoRA ({next(iter(with_bias))!r})")
    if with_bias:
        emb = [p for p, (l, *_) in prepared.items() if l.kind == "embedding"]
        if emb:
            raise LoraFormatError(f"{where}: PEFT does not support lora_bias for embedding module {emb[0]!r}")

    # rsLoRA is one flag per config: mixed flags are expressed through alpha (scale = alpha' / r).
    rs = {l.use_rslora for l, *_ in prepared.values()}
    use_rslora = rs == {True}
    ranks, alphas = {}, {}
    for path, (layer, down, up, alpha) in prepared.items():
        r = int(down.shape[0])
        if layer.use_rslora and not use_rslora:
            alpha = alpha * math.sqrt(r)
        ranks[path], alphas[path] = r, float(alpha)
    r_common = collections.Counter(ranks.values()).most_common(1)[0][0]
    a_common = collections.Counter(alphas.values()).most_common(1)[0][0]

    tensors = {}
    for path, (layer, down, up, alpha) in prepared.items():
        if layer.kind == "embedding":
            tensors[f"{path}.lora_embedding_A"] = down
            tensors[f"{path}.lora_embedding_B"] = up
        else:
            tensors[f"{path}.lora_A.weight"] = down
            tensors[f"{path}.lora_B.weight"] = up
        out = int(up.shape[0])
        if layer.magnitude is not None:
            shape = (1, out, 1, 1) if layer.kind == "conv" else (out,)
            tensors[f"{path}.{magnitude_suffix}"] = layer.magnitude.reshape(shape)
        if with_bias:
            # lora_bias is per config: modules without one get an exact zero bias.
            bias = layer.bias if layer.bias is not None else torch.zeros(out, dtype=up.dtype, device=up.device)
            tensors[f"{path}.lora_B.bias"] = bias

    config = {
        "peft_type": "LORA",
        "r": int(r_common),
        "lora_alpha": _json_number(a_common),
        "rank_pattern": {_pattern_key_for(p): r for p, r in ranks.items() if r != r_common},
        "alpha_pattern": {_pattern_key_for(p): _json_number(a) for p, a in alphas.items() if a != a_common},
        "target_modules": _target_regex(prepared),
        "use_rslora": use_rslora,
        "use_dora": bool(dora),
        "lora_bias": bool(with_bias),
        "fan_in_fan_out": flags["fan_in_fan_out"],
        "bias": "none",
        "lora_dropout": 0.0,
        "init_lora_weights": True,
    }
    return tensors, config


def prepare_for_save(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors that share no storage (what a safetensors writer requires)."""
    out, seen = {}, set()
    for key, t in tensors.items():
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[key] = t
    return out


def write_peft(adapter: LoraAdapter, directory) -> None:
    """A PEFT directory: adapter_model.safetensors + adapter_config.json; one subfolder per component
    when the adapter has several (a single component, or un-prefixed layers, go at the top)."""
    from .. import io

    where = adapter.source or "<adapter>"
    groups: dict[Optional[str], dict[str, LoraLayer]] = {}
    for key, layer in adapter.layers.items():
        comp, path = split_component(key)
        groups.setdefault(comp, {})[_peft_module_path(comp, path)] = layer
    if None in groups and len(groups) > 1:
        bare = next(iter(groups[None]))
        raise LoraFormatError(
            f"{where}: layer {bare!r} has no component prefix while others do; cannot lay out a PEFT directory"
        )
    # Build everything before writing anything.
    outputs = []
    for comp, layers in groups.items():
        tensors, config = export_component(layers, f"{where} ({comp or 'model'})", "PEFT")
        config.update(base_model_name_or_path=None, inference_mode=True, task_type=None, modules_to_save=None)
        tensors = prepare_for_save({PEFT_PREFIX + k: v for k, v in tensors.items()})
        sub = comp if len(groups) > 1 else None
        outputs.append((sub, tensors, config))
    directory = os.fspath(directory)
    if os.path.isfile(directory):
        raise LoraFormatError(f"{directory}: a PEFT adapter is a directory, but this path is a file")
    for sub, tensors, config in outputs:
        target = os.path.join(directory, sub) if sub else directory
        os.makedirs(target, exist_ok=True)
        io.save_file(tensors, os.path.join(target, PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
        _write_text_atomic(os.path.join(target, PEFT_CONFIG_NAME), json.dumps(config, indent=2, sort_keys=True))


@functools.lru_cache(maxsize=1)
def clip_text_model_level() -> bool:
    """Whether the installed transformers' CLIPTextModel nests its modules under ``text_model`` (before 5.0).

    PEFT matches saved keys against the live module tree, so a PEFT directory for a text encoder must name modules
    the way the CLIPTextModel it will be loaded into does. Without transformers, keep the long-standing layout."""
    try:
        from transformers import CLIPTextConfig, CLIPTextModel

        config = CLIPTextConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                num_attention_heads=1, max_position_embeddings=4, bos_token_id=0, eos_token_id=1,
                                pad_token_id=1)
        return hasattr(CLIPTextModel(config), "text_model")
    except Exception:
        return True


def _peft_module_path(comp: Optional[str], path: str) -> str:
    """A module path as PEFT names it in this environment (text-encoder paths follow clip_text_model_level)."""
    if (comp in TEXT_COMPONENTS and path.startswith("text_model.")
            and path[len("text_model."):].startswith(_CLIP_INNER_HEADS) and not clip_text_model_level()):
        return path[len("text_model."):]
    return path


def _write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def iter_component_dirs(directory: str) -> Iterable[tuple[str, str]]:
    """(component, subdir) for each component subfolder holding a PEFT adapter."""
    from ..adapter import COMPONENTS

    for comp in COMPONENTS:
        sub = os.path.join(directory, comp)
        if os.path.isfile(os.path.join(sub, PEFT_WEIGHTS_NAME)) or os.path.isfile(os.path.join(sub, PEFT_PICKLE_NAME)):
            yield comp, sub
