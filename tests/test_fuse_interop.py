"""End-to-end fuse/unfuse interop with diffusers on real tiny pipelines (SD1.5, SDXL, SD3).

For each file format a pipeline can take (diffusers files written by diffusers itself, PEFT
directories, kohya files, the old attention-processor names), lora_fast's load + fuse is compared
weight by weight with diffusers' load + fuse on an identical pipeline, and with a float64
first-principles reference W + λ·s·B·A built from the live PEFT layers the file was saved from.
Unfuse must restore every bit; diffusers' subtract-to-unfuse is measured for contrast.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
import diffusers  # noqa: E402
from diffusers.utils import convert_state_dict_to_diffusers  # noqa: E402
from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora import LoraLayer as PeftLoraLayer  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors.torch import load_file as st_load, save_file as st_save  # noqa: E402

import lora_fast  # noqa: E402
from lora_fast import LoraAdapter, LoraFormatError, LoraLayer  # noqa: E402
from lora_fast.engine import component_state  # noqa: E402
from lora_fast.formats.peft import normalize_text_encoder_path  # noqa: E402
from lora_fast.models import build_pipeline  # noqa: E402
from lora_reference import delta64  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

LORA_SCALE = 0.8
EPS32 = 2.0 ** -24  # float32 unit roundoff

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv_shortcut", "time_emb_proj"]
SD3_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
               "ff.net.0.proj", "ff.net.2", "ff_context.net.2", "pos_embed.proj", "context_embedder"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]

# alpha != rank everywhere, per-module ranks and alphas through rank_pattern / alpha_pattern
MODEL_CFG = dict(r=4, lora_alpha=8, rank_pattern={"to_q": 2, "conv1": 3, "pos_embed.proj": 3},
                 alpha_pattern={"proj_in": 2.5, "to_k": 16, "add_k_proj": 1})
TE_CFG = dict(r=4, lora_alpha=2, rank_pattern={"fc1": 2}, alpha_pattern={"v_proj": 6})

MODEL_COMPONENT = {"sd15": "unet", "sdxl": "unet", "sd3": "transformer"}
TEXT_ENCODERS = {"sd15": ["text_encoder"], "sdxl": ["text_encoder", "text_encoder_2"],
                 "sd3": ["text_encoder", "text_encoder_2"]}
DTYPES = [torch.float32, torch.float16]


# ---------------------------------------------------------------------------------------------
# pipelines and the LoRA files made from them


_PIPELINES: dict = {}


def _base(family: str, dtype=torch.float32):
    """The shared, never modified, tiny pipeline of a family in a dtype."""
    key = (family, dtype)
    if key not in _PIPELINES:
        _PIPELINES[key] = build_pipeline(family, "tiny", seed=0, dtype=dtype)
    return _PIPELINES[key]


def _pipeline(family: str, dtype=torch.float32):
    """A fresh tiny pipeline, bit-identical to _base(family, dtype)."""
    return copy.deepcopy(_base(family, dtype))


def _components(family: str) -> list[str]:
    return [MODEL_COMPONENT[family], *TEXT_ENCODERS[family]]


def _targets(component: str) -> list[str]:
    if component.startswith("text_encoder"):
        return TE_TARGETS
    return SD3_TARGETS if component == "transformer" else UNET_TARGETS


def _config(component: str, **override) -> LoraConfig:
    cfg = dict(TE_CFG if component.startswith("text_encoder") else MODEL_CFG)
    cfg.update(override)
    return LoraConfig(init_lora_weights=False, target_modules=_targets(component), **cfg)


def _randomize(model, seed: int) -> None:
    """Random LoRA factors with values exact in float16, so a float16 pipeline holds them unrounded
    (diffusers casts LoRA factors to the model dtype; we must compare the same factors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.1).half().float())


@dataclass
class Truth:
    """One adapted module from first principles: ΔW = scale · up @ down (float64, 2-D)."""

    scale: float
    down: torch.Tensor
    up: torch.Tensor
    kind: str = "linear"
    down_shape: tuple = ()  # the factors' shapes as stored (4-D for a conv)
    up_shape: tuple = ()

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


def _live_truth(component: str, model, adapter: str = "default") -> dict:
    out = {}
    for path, module in model.named_modules():
        if isinstance(module, PeftLoraLayer) and adapter in module.lora_A:
            a = module.lora_A[adapter].weight.detach().double()
            b = module.lora_B[adapter].weight.detach().double()
            out[(component, path)] = Truth(float(module.scaling[adapter]), a.reshape(a.shape[0], -1),
                                           b.reshape(b.shape[0], -1), "conv" if a.dim() == 4 else "linear",
                                           tuple(a.shape), tuple(b.shape))
    return out


def _with_scale(truth: dict, scale_of) -> dict:
    return {k: Truth(scale_of(k, t), t.down, t.up, t.kind, t.down_shape, t.up_shape) for k, t in truth.items()}


def _adapter_key(component: str, path: str) -> str:
    return f"{component}.{normalize_text_encoder_path(component, path)}"


def _adapter_from_truth(truth: dict, alpha_of) -> LoraAdapter:
    layers = {}
    for (comp, path), t in truth.items():
        layers[_adapter_key(comp, path)] = LoraLayer(
            down=t.down.float().reshape(t.down_shape), up=t.up.float().reshape(t.up_shape), alpha=alpha_of((comp, path)),
            kind=t.kind)
    return LoraAdapter(layers, "diffusers")


@dataclass
class LoraCase:
    """A LoRA written to disk, what it means, and how each library loads it."""

    family: str
    path: str
    truth: dict  # (component, module path) -> Truth
    ours_load: object  # fn(pipe) -> None
    theirs_load: object  # fn(pipe) -> None (diffusers or PEFT loader; fusing happens separately)
    theirs_fuse: object  # fn(pipe) -> None


def _diffusers_fuse(pipe):
    pipe.fuse_lora(lora_scale=LORA_SCALE)


def _peft_fuse(component):
    # exactly what diffusers' fuse_lora does to every PEFT layer (PeftAdapterMixin._fuse_lora_apply)
    def fuse(pipe):
        for module in getattr(pipe, component).modules():
            if isinstance(module, PeftLoraLayer):
                module.scale_layer(LORA_SCALE)
                module.merge()
    return fuse


def _inject_all(family: str, seed: int = 0, **cfg_override):
    """A source pipeline with a random adapter on every LoRA component, and its first-principles truth."""
    src = _pipeline(family)
    truth, state_dicts, configs = {}, {}, {}
    for i, comp in enumerate(_components(family)):
        model = getattr(src, comp)
        model.add_adapter(_config(comp, **cfg_override))
        _randomize(model, seed + i)
        state_dicts[comp] = get_peft_model_state_dict(model)
        configs[comp] = model.peft_config["default"].to_dict()
        truth.update(_live_truth(comp, model))
    return src, truth, state_dicts, configs


def _diffusers_loader(path):
    def load(pipe):
        pipe.load_lora_weights(path)
    return load


def make_diffusers_file(family: str, directory, seed: int = 0) -> LoraCase:
    """diffusers' own save_lora_weights, with lora_adapter_metadata (alpha != rank, rank/alpha patterns)."""
    src, truth, sds, cfgs = _inject_all(family, seed)
    kwargs = {}
    for comp in sds:
        kwargs[f"{comp}_lora_layers"] = sds[comp]
        kwargs[f"{comp}_lora_adapter_metadata"] = cfgs[comp]
    type(src).save_lora_weights(str(directory), **kwargs)
    return LoraCase(family, str(directory), truth, lambda pipe: lora_fast.load_lora_weights(pipe, str(directory)),
                    _diffusers_loader(str(directory)), _diffusers_fuse)


def make_peft_dir(family: str, component: str, directory) -> LoraCase:
    """PeftModel.save_pretrained of one PEFT-injected component (un-prefixed keys + adapter_config.json).

    Model components load into lora_fast with components=[...]; text encoders through a dict target.
    The oracle is PEFT's own PeftModel.from_pretrained plus diffusers' fuse recipe (scale_layer, merge):
    diffusers' pipeline loader does not read PEFT directories."""
    model = copy.deepcopy(getattr(_base(family), component))
    peft_model = get_peft_model(model, _config(component))
    _randomize(peft_model, 7)
    peft_model.save_pretrained(str(directory))
    truth = _live_truth(component, model)
    path = str(directory)

    def ours(pipe):
        if component.startswith("text_encoder"):
            lora_fast.load_lora_weights({component: getattr(pipe, component)}, path, components=[component])
        else:
            lora_fast.load_lora_weights(pipe, path, components=[component])

    def theirs(pipe):
        PeftModel.from_pretrained(getattr(pipe, component), path)

    return LoraCase(family, path, truth, ours, theirs, _peft_fuse(component))


def _kohya_alpha(kind: str):
    """alpha per module: uniform (but != rank), or varying per module (exact in float16/bfloat16)."""
    if kind == "uniform":
        return lambda key, index: 2.0
    return lambda key, index: (4.0, 16.0, 4.0, 1.5)[index % 4]


def make_kohya_file(family: str, writer: str, alphas: str, path) -> LoraCase:
    """A kohya file: diffusers' own exporter (convert_state_dict_to_kohya, SD1.x names) or lora_fast's
    writer (SDXL: LDM UNet names, lora_te1_/lora_te2_), with a 0-d ``.alpha`` per module."""
    src, truth, sds, _ = _inject_all(family, seed=3, rank_pattern={"conv1": 2, "fc1": 2}, alpha_pattern={})
    order = {key: i for i, key in enumerate(sorted(truth))}
    alpha_of = _kohya_alpha(alphas)
    alpha = {key: alpha_of(key, order[key]) for key in truth}
    if writer == "diffusers":
        assert family == "sd15"
        peft_sd = {f"{comp}.{k}": v for comp, sd in sds.items() for k, v in sd.items()}
        kohya = convert_state_dict_to_kohya(peft_sd)
        # the exporter names transformers-5 CLIP modules lora_te1_encoder_...; kohya's SD1.x name is lora_te_text_model_...
        kohya = {k.replace("lora_te1_encoder_", "lora_te_text_model_encoder_"): v for k, v in kohya.items()}
        names = {}
        for comp, p in truth:
            prefix = "lora_unet_" if comp == "unet" else "lora_te_text_model_"
            names[prefix + p.replace(".", "_")] = (comp, p)
        modules_in_file = {k.split(".")[0] for k in kohya}
        assert modules_in_file == set(names), modules_in_file ^ set(names)
        for name, key in names.items():
            kohya[f"{name}.alpha"] = torch.tensor(alpha[key])
        st_save(kohya, str(path))
    else:
        _adapter_from_truth(truth, alpha.__getitem__).save(str(path), format="kohya")
    truth = _with_scale(truth, lambda key, t: alpha[key] / t.rank)
    return LoraCase(family, str(path), truth, lambda pipe: lora_fast.load_lora_weights(pipe, str(path)),
                    _diffusers_loader(str(path)), _diffusers_fuse)


_PROCESSOR_NAMES = {"to_q": "to_q_lora", "to_k": "to_k_lora", "to_v": "to_v_lora", "to_out.0": "to_out_lora"}


def _legacy_unet_key(key: str) -> str:
    """PEFT name -> the attention-processor / LoRACompatible name diffusers saved before the PEFT backend."""
    path, _, tail = key.rpartition(".lora_")
    role = {"A.weight": "down", "B.weight": "up"}[tail]
    for module, processor in _PROCESSOR_NAMES.items():
        if path.endswith(f".{module}") and (".attn1." in path or ".attn2." in path):
            parent = path[: -len(module) - 1]
            return f"{parent}.processor.{processor}.{role}.weight"
    return f"{path}.lora.{role}.weight"


def make_legacy_file(family: str, directory) -> LoraCase:
    """Old diffusers names: ``attn1.processor.to_q_lora.down.weight`` / ``proj_in.lora.down.weight`` in the UNet,
    ``lora_linear_layer`` in text encoders (convert_state_dict_to_diffusers). No alphas: scale 1."""
    src, truth, sds, _ = _inject_all(family, seed=5, alpha_pattern={}, lora_alpha=4)
    kwargs = {"unet_lora_layers": {_legacy_unet_key(k): v for k, v in sds["unet"].items()}}
    assert any(".processor.to_out_lora.up.weight" in k for k in kwargs["unet_lora_layers"])
    for comp in TEXT_ENCODERS[family]:
        kwargs[f"{comp}_lora_layers"] = convert_state_dict_to_diffusers(sds[comp])
        assert any("lora_linear_layer" in k for k in kwargs[f"{comp}_lora_layers"])
    type(src).save_lora_weights(str(directory), **kwargs)
    truth = _with_scale(truth, lambda key, t: 1.0)
    return LoraCase(family, str(directory), truth, lambda pipe: lora_fast.load_lora_weights(pipe, str(directory)),
                    _diffusers_loader(str(directory)), _diffusers_fuse)


_CASES: dict = {}


def _case(tmp_path_factory, kind: str, *args) -> LoraCase:
    key = (kind, *args)
    if key not in _CASES:
        where = tmp_path_factory.mktemp("_".join(str(a) for a in key))
        if kind == "diffusers":
            _CASES[key] = make_diffusers_file(*args[:1], where, *args[1:])
        elif kind == "peft":
            _CASES[key] = make_peft_dir(*args, where)
        elif kind == "kohya":
            _CASES[key] = make_kohya_file(*args, where / "lora.safetensors")
        else:
            _CASES[key] = make_legacy_file(*args, where)
    return _CASES[key]


# ---------------------------------------------------------------------------------------------
# comparisons


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.uint8)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _plain_state_dict(model) -> dict:
    """A (possibly PEFT-wrapped) model's base tensors under their unwrapped names."""
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}


def _reference(w0: torch.Tensor, t: Truth, factor: float):
    """(float64 W + factor·s·B·A, the delta, a bound on fp32 accumulation error of computing it)."""
    return _reference_sum(w0, [(t, factor)])


def _reference_sum(w0: torch.Tensor, terms):
    """The same for W + Σ factor_i·s_i·B_i·A_i; the 'delta' is the largest magnitude any partial sum reaches."""
    base = w0.detach().double()
    total, acc, reach = base.clone(), EPS32 * base.abs(), base.abs()
    rank = sum(t.rank for t, _ in terms)
    for t, factor in terms:
        delta = factor * t.scale * (t.up @ t.down).reshape(base.shape)
        total = total + delta
        reach = torch.maximum(reach, torch.maximum(delta.abs(), total.abs()))
        # rank products, the scale multiply and the add, each in float32
        acc = acc + (rank + 3) * EPS32 * (abs(factor * t.scale) * (t.up.abs() @ t.down.abs())).reshape(base.shape)
    return total, reach, acc + EPS32 * reach


def _assert_matches_reference(w: torch.Tensor, reference, label: str):
    """w is the float64 reference rounded once to its dtype: within half an ulp + fp32 accumulation error."""
    info = torch.finfo(w.dtype)
    ref, _, acc = reference
    err = (w.detach().double() - ref).abs()
    tol = 0.5 * info.eps * (ref.abs() + info.tiny) + 1.01 * acc
    bad = err > tol
    assert not bad.any(), (f"{label}: {int(bad.sum())} of {w.numel()} elements off the float64 reference by more than "
                           f"1/2 ulp (worst {float((err / tol).max()):.3g}× the bound)")


def _diffusers_gap(ours: torch.Tensor, theirs: torch.Tensor, w0: torch.Tensor, reference) -> torch.Tensor:
    """|ours − theirs| in units of the allowed gap: diffusers rounds the delta, then the sum (we round once),
    so 2 ulps of the largest of |W|, |ΔW|, |W'|, plus both sides' fp32 accumulation error."""
    info = torch.finfo(ours.dtype)
    ref, delta, acc = reference
    mag = torch.maximum(torch.maximum(w0.detach().double().abs(), delta.abs()), ref.abs())
    tol = 2 * info.eps * (mag + info.tiny) + 2.02 * acc
    return (ours.detach().double() - theirs.detach().double()).abs() / tol


def check_fused(ours, theirs, base, truth: dict, *, diffusers_wrong=frozenset(), fused=None):
    """Every weight: untouched tensors bit-identical to base in both; adapted ones within 2 ulp of
    diffusers (except ``diffusers_wrong``, which must differ) and on the float64 reference.
    ``fused``: the components that were fused (default: all the adapter touches)."""
    assert {comp for comp, _ in truth}
    for comp in _components_of(base):
        b_sd = getattr(base, comp).state_dict()
        o_sd = getattr(ours, comp).state_dict()
        t_sd = _plain_state_dict(getattr(theirs, comp))
        assert list(o_sd) == list(b_sd), f"{comp}: lora_fast changed the state_dict keys"
        assert set(t_sd) == set(b_sd)
        wrapped = {(comp, p) for p, m in getattr(theirs, comp).named_modules() if isinstance(m, PeftLoraLayer)}
        expected = {k for k in truth if k[0] == comp}
        assert wrapped == expected, f"{comp}: the oracle adapted other modules than the file holds"
        if fused is not None and comp not in fused:
            expected = set()
        adapted = {f"{p}.weight": (c, p) for c, p in expected}
        for name, w0 in b_sd.items():
            if name not in adapted:
                assert _bits_equal(o_sd[name], w0), f"{comp}.{name}: lora_fast changed an untargeted tensor"
                assert _bits_equal(t_sd[name], w0), f"{comp}.{name}: diffusers changed an untargeted tensor"
                continue
            key = adapted[name]
            t = truth[key]
            label = f"{comp}.{name}"
            reference = _reference(w0, t, LORA_SCALE)
            _assert_matches_reference(o_sd[name], reference, label)
            gap = _diffusers_gap(o_sd[name], t_sd[name], w0, reference)
            if key in diffusers_wrong:
                assert (gap > 1).any(), f"{label}: expected diffusers' mis-scaled fuse to differ from ours"
            else:
                assert (gap <= 1).all(), f"{label}: {int((gap > 1).sum())} elements differ from diffusers by more " \
                                         f"than 2 ulp (worst {float(gap.max()):.3g}× the bound)"


def _components_of(pipe) -> list[str]:
    return [n for n in ("unet", "transformer", "text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None]


def _snapshot(pipe) -> dict:
    return {(c, k): v.clone() for c in _components_of(pipe) for k, v in getattr(pipe, c).state_dict().items()}


def _assert_bits(pipe, snap, what: str):
    now = _snapshot(pipe)
    assert list(now) == list(snap), f"{what}: state_dict keys changed"
    changed = [k for k in snap if not _bits_equal(now[k], snap[k])]
    assert not changed, f"{what}: {len(changed)} tensors differ, e.g. {changed[:3]}"


def _diffusers_scalings(pipe) -> dict:
    out = {}
    for comp in _components_of(pipe):
        for path, m in getattr(pipe, comp).named_modules():
            if isinstance(m, PeftLoraLayer):
                (name,) = list(m.scaling)
                out[(comp, path)] = m.scaling[name]
    return out


def run_interop(case: LoraCase, dtype, *, expect_diffusers_wrong: bool = False):
    base = _base(case.family, dtype)
    ours = _pipeline(case.family, dtype)
    theirs = _pipeline(case.family, dtype)
    case.ours_load(ours)
    lora_fast.fuse_lora(ours, lora_scale=LORA_SCALE)
    case.theirs_load(theirs)
    scalings = _diffusers_scalings(theirs)
    case.theirs_fuse(theirs)
    wrong = {k for k, s in scalings.items() if not math.isclose(s, case.truth[k].scale, rel_tol=1e-12)}
    if expect_diffusers_wrong:
        # reference §3: diffusers 0.42.1 keeps the most common alpha for attention projections (and CLIP q/k/v/out,
        # fc1/fc2 in text_encoder 1) whose own alpha differs
        assert wrong, "expected diffusers to mis-scale some modules with per-module alphas"
        projections = (".to_q", ".to_k", ".to_v", ".to_out.0", "_proj", ".fc1", ".fc2")
        assert all(p.endswith(projections) for _, p in wrong), sorted(wrong)
    else:
        assert not wrong, f"diffusers' scales differ from the file's: {sorted(wrong)[:5]}"
    check_fused(ours, theirs, base, case.truth, diffusers_wrong=wrong)
    return ours, base


# ---------------------------------------------------------------------------------------------
# 1. load + fuse: every format, every family, fp32 and fp16


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3"])
def test_diffusers_file_fuses_like_diffusers(tmp_path_factory, family, dtype):
    case = _case(tmp_path_factory, "diffusers", family)
    assert {c for c, _ in case.truth} == set(_components(family))
    ours, base = run_interop(case, dtype)
    lora_fast.unfuse_lora(ours)
    _assert_bits(ours, _snapshot(base), "unfuse")


# Each format is run in both dtypes on some family; the full family × dtype product would double the run time.
@pytest.mark.parametrize("family,component,dtype", [
    ("sd15", "unet", torch.float32), ("sd15", "text_encoder", torch.float16), ("sdxl", "unet", torch.float16),
    ("sdxl", "text_encoder_2", torch.float32), ("sd3", "transformer", torch.float32),
    ("sd3", "transformer", torch.float16)], ids=str)
def test_peft_directory_fuses_like_peft(tmp_path_factory, family, component, dtype):
    case = _case(tmp_path_factory, "peft", family, component)
    run_interop(case, dtype)


@pytest.mark.parametrize("family,writer,dtype", [("sd15", "diffusers", torch.float16),
                                                ("sdxl", "lora_fast", torch.float32)], ids=str)
def test_kohya_uniform_alpha_fuses_like_diffusers(tmp_path_factory, family, writer, dtype):
    case = _case(tmp_path_factory, "kohya", family, writer, "uniform")
    run_interop(case, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family,writer", [("sd15", "diffusers"), ("sdxl", "lora_fast")])
def test_kohya_per_module_alphas_follow_the_file_where_diffusers_does_not(tmp_path_factory, family, writer, dtype):
    case = _case(tmp_path_factory, "kohya", family, writer, "per_module")
    assert len({t.scale for t in case.truth.values()}) > 2
    run_interop(case, dtype, expect_diffusers_wrong=True)


@pytest.mark.parametrize("family,dtype", [("sd15", torch.float32), ("sdxl", torch.float16)], ids=str)
def test_old_attention_processor_names_fuse_like_diffusers(tmp_path_factory, family, dtype):
    case = _case(tmp_path_factory, "legacy", family)
    run_interop(case, dtype)


# ---------------------------------------------------------------------------------------------
# 2. unfuse is exact; diffusers' subtract-to-unfuse is not


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_unfuse_restores_every_bit_where_diffusers_drifts(tmp_path_factory, dtype):
    case = _case(tmp_path_factory, "diffusers", "sd15")
    ours = _pipeline("sd15", dtype)
    before = _snapshot(ours)
    case.ours_load(ours)
    for scale in (LORA_SCALE, -1.7):
        lora_fast.fuse_lora(ours, lora_scale=scale)
        fused = _snapshot(ours)
        changed = {key for key in before if not _bits_equal(fused[key], before[key])}
        assert changed == {(c, f"{p}.weight") for c, p in case.truth}
        lora_fast.unfuse_lora(ours)
        _assert_bits(ours, before, f"lora_fast unfuse after fuse(lora_scale={scale})")

    theirs = _pipeline("sd15", dtype)
    case.theirs_load(theirs)
    theirs.fuse_lora(lora_scale=LORA_SCALE)
    theirs.unfuse_lora()
    drifted = 0
    for comp in _components_of(theirs):
        for name, w in _plain_state_dict(getattr(theirs, comp)).items():
            drifted += int((_bits(w) != _bits(before[(comp, name)])).reshape(w.numel(), -1).any(dim=1).sum())
    if dtype == torch.float16 and diffusers.__version__ == "0.42.1":
        # reference §4.3: rn(rn(W + rn(Δ)) − rn(Δ)) != W for ~11% of fp16 elements; this is why records exist
        assert drifted > 0, "diffusers 0.42.1 was expected to drift on fp16 unfuse"


# ---------------------------------------------------------------------------------------------
# 3. per-component fuses compose; one unfuse restores everything


def test_component_fuses_compose_and_one_unfuse_restores_all(tmp_path_factory):
    case = _case(tmp_path_factory, "diffusers", "sdxl")
    dtype = torch.float16
    base, ours, theirs = _base("sdxl", dtype), _pipeline("sdxl", dtype), _pipeline("sdxl", dtype)
    before = _snapshot(ours)
    case.ours_load(ours)

    lora_fast.fuse_lora(ours, lora_scale=LORA_SCALE, components=["unet"])
    after_unet = _snapshot(ours)
    changed = {c for (c, k) in before if not _bits_equal(after_unet[(c, k)], before[(c, k)])}
    assert changed == {"unet"}

    lora_fast.fuse_lora(ours, lora_scale=LORA_SCALE, components=["text_encoder"])
    after_te = _snapshot(ours)
    for (c, k), w in after_te.items():
        if c != "text_encoder":
            assert _bits_equal(w, after_unet[(c, k)]), f"{c}.{k} changed by a text_encoder-only fuse"
    assert any(not _bits_equal(after_te[("text_encoder", k)], before[("text_encoder", k)])
               for c, k in before if c == "text_encoder")

    case.theirs_load(theirs)
    theirs.fuse_lora(lora_scale=LORA_SCALE, components=["unet"])
    theirs.fuse_lora(lora_scale=LORA_SCALE, components=["text_encoder"])
    check_fused(ours, theirs, base, case.truth, fused={"unet", "text_encoder"})

    lora_fast.unfuse_lora(ours)
    _assert_bits(ours, before, "one unfuse after two component fuses")


# ---------------------------------------------------------------------------------------------
# 4. fuse=True, unload, and loads that must fail without touching anything


def test_load_with_fuse_equals_load_then_fuse(tmp_path_factory):
    case = _case(tmp_path_factory, "diffusers", "sd15")
    one, two = _pipeline("sd15", torch.float16), _pipeline("sd15", torch.float16)
    before = _snapshot(one)
    lora_fast.load_lora_weights(one, case.path, fuse=True)
    lora_fast.load_lora_weights(two, case.path)
    lora_fast.fuse_lora(two)
    fused = _snapshot(two)
    assert any(not _bits_equal(fused[k], before[k]) for k in before)
    _assert_bits(one, fused, "load(fuse=True) vs load + fuse")
    lora_fast.unfuse_lora(one)
    _assert_bits(one, before, "unfuse after load(fuse=True)")


def test_unload_after_fuse_keeps_fused_weights_and_keys(tmp_path_factory):
    case = _case(tmp_path_factory, "diffusers", "sd15")
    pipe = _pipeline("sd15", torch.float16)
    keys = {c: list(getattr(pipe, c).state_dict()) for c in _components_of(pipe)}
    lora_fast.load_lora_weights(pipe, case.path)
    lora_fast.fuse_lora(pipe, lora_scale=LORA_SCALE)
    fused = _snapshot(pipe)
    lora_fast.unload_lora_weights(pipe)
    _assert_bits(pipe, fused, "unload after fuse")
    for c in _components_of(pipe):
        assert list(getattr(pipe, c).state_dict()) == keys[c]
        assert component_state(getattr(pipe, c)) is None
    lora_fast.unfuse_lora(pipe)  # nothing is left to unfuse
    _assert_bits(pipe, fused, "unfuse after unload")
    assert lora_fast.load_lora_weights(pipe, case.path) == "default_0"


_VICTIM = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"


@pytest.mark.parametrize("defect", ["missing_module", "shape_mismatch"])
def test_bad_lora_raises_and_leaves_the_pipeline_untouched(tmp_path_factory, tmp_path, defect):
    from safetensors import safe_open

    case = _case(tmp_path_factory, "diffusers", "sd15")
    good = f"{case.path}/pytorch_lora_weights.safetensors"
    tensors = st_load(good)
    with safe_open(good, "pt") as f:
        metadata = f.metadata()
    a, b = tensors[f"{_VICTIM}.lora_A.weight"], tensors[f"{_VICTIM}.lora_B.weight"]
    if defect == "missing_module":
        bad_module = _VICTIM.replace(".to_k", ".to_nope")
        tensors[f"{bad_module}.lora_A.weight"], tensors[f"{bad_module}.lora_B.weight"] = a.clone(), b.clone()
    else:
        bad_module = _VICTIM
        tensors[f"{_VICTIM}.lora_B.weight"] = torch.cat([b, b[:1]])  # one output row too many
    bad = str(tmp_path / "bad.safetensors")
    st_save(tensors, bad, metadata=metadata)

    base = _base("sd15", torch.float16)
    pipe = _pipeline("sd15", torch.float16)
    lora_fast.load_lora_weights(pipe, case.path, adapter_name="good")  # a fused adapter the failure must not disturb
    lora_fast.fuse_lora(pipe, lora_scale=LORA_SCALE)
    snap = _snapshot(pipe)
    states = {c: (list(s.adapters), list(s.active), len(s.fused))
              for c in _components_of(pipe) if (s := component_state(getattr(pipe, c))) is not None}
    with pytest.raises(LoraFormatError, match=bad_module.replace(".", r"\.")):
        lora_fast.load_lora_weights(pipe, bad, fuse=True)
    _assert_bits(pipe, snap, f"failed load ({defect})")
    assert states == {c: (list(s.adapters), list(s.active), len(s.fused))
                      for c in _components_of(pipe) if (s := component_state(getattr(pipe, c))) is not None}
    lora_fast.unfuse_lora(pipe)
    _assert_bits(pipe, _snapshot(base), "unfuse after a failed load")


# ---------------------------------------------------------------------------------------------
# 5. the fused model computes what diffusers' fused model computes


def test_fused_forward_matches_diffusers(tmp_path_factory):
    case = _case(tmp_path_factory, "diffusers", "sd15")
    base, ours, theirs = _base("sd15"), _pipeline("sd15"), _pipeline("sd15")
    case.ours_load(ours)
    lora_fast.fuse_lora(ours, lora_scale=LORA_SCALE)
    case.theirs_load(theirs)
    theirs.fuse_lora(lora_scale=LORA_SCALE)

    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 7, 32, generator=g)
    ids = torch.randint(3, 1000, (2, 7), generator=g)
    with torch.no_grad():
        outs = [(p.unet(sample, torch.tensor([10, 500]), context).sample, p.text_encoder(ids).last_hidden_state)
                for p in (base, ours, theirs)]
    (unet_base, te_base), (unet_ours, te_ours), (unet_theirs, te_theirs) = outs
    torch.testing.assert_close(unet_ours, unet_theirs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(te_ours, te_theirs, rtol=1e-4, atol=1e-5)
    # the LoRA changes the outputs far beyond that tolerance, so the comparison above means something
    assert (unet_ours - unet_base).abs().max() > 1e-2 and (te_ours - te_base).abs().max() > 1e-2

    # unfused, the adapter is live again (as in diffusers); unloaded, the model is the base model bit for bit
    lora_fast.unfuse_lora(ours)
    lora_fast.unload_lora_weights(ours)
    with torch.no_grad():
        assert torch.equal(ours.unet(sample, torch.tensor([10, 500]), context).sample, unet_base)


# ---------------------------------------------------------------------------------------------
# beyond the single adapter: weighted composition of two adapters, DoRA


def test_two_weighted_adapters_fuse_like_diffusers_set_adapters(tmp_path_factory):
    """W + λ(w_a s_a B_a A_a + w_b s_b B_b A_b), rounded once; diffusers adds adapter by adapter."""
    first, second = _case(tmp_path_factory, "diffusers", "sd15"), _case(tmp_path_factory, "diffusers", "sd15", 100)
    dtype, weights = torch.float16, [1.0, -0.6]
    base, ours, theirs = _base("sd15", dtype), _pipeline("sd15", dtype), _pipeline("sd15", dtype)
    for name, case in zip("ab", (first, second)):
        lora_fast.load_lora_weights(ours, case.path, adapter_name=name)
        theirs.load_lora_weights(case.path, adapter_name=name)
    lora_fast.fuse_lora(ours, lora_scale=LORA_SCALE, adapter_names=["a", "b"], adapter_weights=weights)
    theirs.set_adapters(["a", "b"], adapter_weights=weights)
    theirs.fuse_lora(lora_scale=LORA_SCALE, adapter_names=["a", "b"])
    assert set(first.truth) == set(second.truth)
    eps = torch.finfo(dtype).eps
    for comp, path in first.truth:
        label = f"{comp}.{path}.weight"
        w0 = getattr(base, comp).get_submodule(path).weight
        w_ours = getattr(ours, comp).get_submodule(path).weight
        w_theirs = getattr(theirs, comp).get_submodule(path).get_base_layer().weight
        terms = [(first.truth[(comp, path)], LORA_SCALE * weights[0]),
                 (second.truth[(comp, path)], LORA_SCALE * weights[1])]
        reference = _reference_sum(w0, terms)
        _assert_matches_reference(w_ours, reference, label)
        # diffusers rounds each delta and each of the two sums
        _, reach, acc = reference
        gap = (w_ours.detach().double() - w_theirs.detach().double()).abs()
        assert (gap <= 3 * eps * (reach + torch.finfo(dtype).tiny) + 2.02 * acc).all(), label
    before = _snapshot(base)
    lora_fast.unfuse_lora(ours)
    _assert_bits(ours, before, "unfuse of two adapters")


def _dora_reference(w0: torch.Tensor, t: Truth, magnitude: torch.Tensor, factor: float) -> torch.Tensor:
    """PEFT's DoRA merge in float64: m / ‖V‖_row · V with V = W + factor·s·B·A."""
    v = w0.detach().double() + factor * t.scale * (t.up @ t.down).reshape(w0.shape)
    rows = v.reshape(v.shape[0], -1)
    return (rows * (magnitude.double().reshape(-1, 1) / rows.norm(dim=1, keepdim=True))).reshape(w0.shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dora_unet_fuses_like_diffusers_and_unfuses_exactly(tmp_path, dtype):
    src = _pipeline("sd15")
    src.unet.add_adapter(_config("unet", use_dora=True))
    _randomize(src.unet, 11)
    magnitudes = {}
    with torch.no_grad():
        for path, module in src.unet.named_modules():
            if isinstance(module, PeftLoraLayer):
                m = module.lora_magnitude_vector["default"].weight
                m.copy_((m.abs() * 3 + 0.5).half().float())
                magnitudes[path] = m.detach().clone()
    truth = _live_truth("unet", src.unet)
    type(src).save_lora_weights(str(tmp_path), unet_lora_layers=get_peft_model_state_dict(src.unet),
                                unet_lora_adapter_metadata=src.unet.peft_config["default"].to_dict())

    base, ours, theirs = _base("sd15", dtype), _pipeline("sd15", dtype), _pipeline("sd15", dtype)
    lora_fast.load_lora_weights(ours, str(tmp_path))
    lora_fast.fuse_lora(ours, lora_scale=LORA_SCALE)
    theirs.load_lora_weights(str(tmp_path))
    theirs.fuse_lora(lora_scale=LORA_SCALE)
    eps = torch.finfo(dtype).eps
    for (_, path), t in truth.items():
        w0 = base.unet.get_submodule(path).weight
        ref = _dora_reference(w0, t, magnitudes[path], LORA_SCALE)
        # a norm and a division in float32 per row, then one rounding to the dtype
        row_scale = ref.reshape(ref.shape[0], -1).abs().amax(dim=1).reshape(-1, *([1] * (ref.dim() - 1)))
        w_ours = ours.unet.get_submodule(path).weight.detach().double()
        w_theirs = theirs.unet.get_submodule(path).get_base_layer().weight.detach().double()
        assert ((w_ours - ref).abs() <= 0.5 * eps * ref.abs() + 64 * EPS32 * row_scale).all(), path
        # PEFT rounds V and computes the row norm and factor in the weight dtype: ulps of the row's scale
        assert ((w_ours - w_theirs).abs() <= 2 * eps * row_scale + 128 * EPS32 * row_scale).all(), path
    lora_fast.unfuse_lora(ours)
    _assert_bits(ours, _snapshot(base), "DoRA unfuse")


# ---------------------------------------------------------------------------------------------
# pinned bugs found while writing these tests


def test_kohya_writer_gives_a_flat_conv_layer_its_kernel_shape_and_the_reader_accepts_it():
    # A flat (kind "linear") LoRA on a 3×3 conv: the writer knows the SD1.5 module and writes LoCon-shaped factors
    # (down 4-D, up 1×1), which the reader takes back as the same conv delta: one behaviour, asserted.
    from lora_fast.formats.kohya import read_kohya, write_kohya

    key = "unet.down_blocks.0.resnets.0.conv1"  # SD1.5: Conv2d(320, 320, 3×3)
    g = torch.Generator().manual_seed(0)
    flat = LoraLayer(down=torch.randn(4, 320 * 9, generator=g), up=torch.randn(320, 4, generator=g), alpha=4.0)
    written = write_kohya(LoraAdapter({key: flat}, "diffusers"))
    stem = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert tuple(written[f"{stem}.lora_down.weight"].shape) == (4, 320, 3, 3)
    assert tuple(written[f"{stem}.lora_up.weight"].shape) == (320, 4, 1, 1)
    (back,) = read_kohya(written).layers.values()
    assert back.kind == "conv" and back.weight_shape == (320, 320, 3, 3)
    want = (flat.up.double() @ flat.down.double()) * (4.0 / 4)
    torch.testing.assert_close(delta64(back).reshape(320, -1), want, rtol=1e-12, atol=0)
