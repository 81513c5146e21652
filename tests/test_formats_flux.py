"""Flux.1 LoRA files on a real (tiny, random) FluxPipeline: diffusers/PEFT keys, kohya sd-scripts,
BFL/ComfyUI and XLabs layouts.

Oracles: diffusers' own ``pipe.load_lora_weights(...); pipe.fuse_lora()`` on the same file, and a float64
first-principles W + λ·s·B·A built from the factors the file was written from. diffusers' kohya converter
hard-codes Flux.1-dev widths for ``single_blocks_N_linear1`` (3072/3072/3072/12288), so that split is compared
with diffusers on a full-width transformer with one single block (and no double blocks).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
import diffusers  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.tuners.lora import LoraLayer as PeftLoraLayer  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402
from safetensors.torch import save_file as st_save  # noqa: E402

import lora_fast  # noqa: E402
from lora_fast import LoraFormatError  # noqa: E402
from lora_fast.formats.flux import FLUX_MODULES, detect_flux_layout  # noqa: E402
from lora_fast.models import build_flux_transformer, build_pipeline, flux_transformer_config, materialize  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

LORA_SCALE = 0.8
_BASE: dict = {}


def _base(kind: str = "tiny"):
    if kind not in _BASE:
        if kind == "tiny":
            _BASE[kind] = build_pipeline("flux", "tiny", seed=0)
        elif kind == "wide":
            # full Flux.1 width (3072 inner, 12288 MLP), one single block and no double block
            t = build_flux_transformer("full", device="meta", num_layers=0, num_single_layers=1,
                                       joint_attention_dim=32, pooled_projection_dim=32)
            materialize(t, seed=0)
            _BASE[kind] = _bare_pipeline(t)
        else:
            _BASE[kind] = build_pipeline(kind, "tiny", seed=0)
    return _BASE[kind]


def _bare_pipeline(transformer):
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), latent_channels=16, norm_num_groups=8)
    return diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                                  tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)


def _pipe(kind: str = "tiny"):
    return copy.deepcopy(_base(kind))


def _components(pipe):
    return [c for c in ("transformer", "text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None]


def _plain(model) -> dict:
    return {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}


def _bits_equal(a, b) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.reshape(-1), b.reshape(-1)  # 0-d tensors (alphas) cannot be viewed as bytes
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def _check_fused(ours, base, truth: dict, *, theirs=None, factor=LORA_SCALE, skip_theirs=frozenset()):
    """truth: {(component, module path): [(scale, up64, down64), ...]}. Every targeted weight equals the
    float64 reference (and diffusers' fuse, rel 1e-5); every other tensor is bit-identical to base."""
    for comp in _components(base):
        b_sd, o_sd = getattr(base, comp).state_dict(), getattr(ours, comp).state_dict()
        t_sd = _plain(getattr(theirs, comp)) if theirs is not None else None
        assert list(o_sd) == list(b_sd)
        targeted = {f"{p}.weight": (c, p) for c, p in truth if c == comp}
        for name, w0 in b_sd.items():
            if name not in targeted:
                assert _bits_equal(o_sd[name], w0), f"{comp}.{name}: changed an untargeted tensor"
                continue
            ref = w0.double()
            for scale, up, down in truth[targeted[name]]:
                ref = ref + factor * scale * (up @ down)
            tol = 1e-5 * float(ref.abs().max())
            err = float((o_sd[name].double() - ref).abs().max())
            assert err <= tol, f"{comp}.{name}: off the float64 reference by {err:.3g} (tol {tol:.3g})"
            if t_sd is not None and targeted[name] not in skip_theirs:
                gap = float((o_sd[name].double() - t_sd[name].double()).abs().max())
                assert gap <= tol, f"{comp}.{name}: differs from diffusers' fuse by {gap:.3g} (tol {tol:.3g})"
    assert truth


def _diffusers_fuse(pipe):
    # FluxPipeline.fuse_lora fuses only the transformer unless told otherwise (lora_fast fuses every component)
    pipe.fuse_lora(components=[c for c in ("transformer", "text_encoder") if getattr(pipe, c, None) is not None],
                   lora_scale=LORA_SCALE)


def _snapshot(pipe):
    return {(c, k): v.clone() for c in _components(pipe) for k, v in getattr(pipe, c).state_dict().items()}


def _assert_snapshot(pipe, snap):
    now = _snapshot(pipe)
    assert list(now) == list(snap)
    bad = [k for k in snap if not _bits_equal(now[k], snap[k])]
    assert not bad, f"{len(bad)} tensors changed, e.g. {bad[:3]}"


def _inputs(transformer, seed=0, batch=2):
    cfg = transformer.config
    g = torch.Generator().manual_seed(seed)
    seq, txt = 6, 5
    return dict(
        hidden_states=torch.randn(batch, seq, cfg.in_channels, generator=g),
        encoder_hidden_states=torch.randn(batch, txt, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        timestep=torch.linspace(0.3, 0.7, batch), img_ids=torch.randn(seq, 3, generator=g),
        txt_ids=torch.zeros(txt, 3), guidance=torch.full((batch,), 3.5) if cfg.guidance_embeds else None,
        return_dict=False)


# ---------------------------------------------------------------------------------------------
# builders


def test_flux_builders():
    pipe = _base("tiny")
    assert isinstance(pipe, diffusers.FluxPipeline)
    assert type(pipe.transformer).__name__ == "FluxTransformer2DModel"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.text_encoder_2).__name__ == "T5EncoderModel"
    assert len(pipe.transformer.transformer_blocks) == 2 and len(pipe.transformer.single_transformer_blocks) == 2
    # same weights for the same seed; the tiny transformer runs
    again = build_pipeline("flux", "tiny", seed=0)
    assert all(torch.equal(a, b) for a, b in zip(pipe.transformer.parameters(), again.transformer.parameters()))
    with torch.no_grad():
        (out,) = pipe.transformer(**_inputs(pipe.transformer))
    assert out.shape == (2, 6, 8) and torch.isfinite(out).all()
    full = build_flux_transformer("full", device="meta")
    assert (len(full.transformer_blocks), len(full.single_transformer_blocks)) == (19, 38)
    assert full.transformer_blocks[0].attn.to_q.weight.shape == (3072, 3072)
    assert full.single_transformer_blocks[0].proj_mlp.weight.shape == (12288, 3072)
    assert flux_transformer_config("full", num_layers=1)["num_layers"] == 1


# ---------------------------------------------------------------------------------------------
# diffusers / PEFT keys

_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_mlp",
            "proj_out", "norm1.linear", "norm1_context.linear", "norm.linear", "ff.net.0.proj", "ff.net.2",
            "ff_context.net.0.proj", "ff_context.net.2", "x_embedder", "context_embedder"]
_TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def _peft_truth(comp, model) -> dict:
    out = {}
    for path, m in model.named_modules():
        if isinstance(m, PeftLoraLayer) and "default" in m.lora_A:
            out[(comp, path.replace("text_model.", "") if comp == "text_encoder" else path)] = [
                (float(m.scaling["default"]), m.lora_B["default"].weight.detach().double(),
                 m.lora_A["default"].weight.detach().double())]
    return out


def _write_diffusers_file(directory, with_metadata: bool):
    src = _pipe()
    truth, kwargs = {}, {}
    for i, (comp, targets, cfg) in enumerate((
            ("transformer", _TARGETS, dict(r=4, lora_alpha=8, rank_pattern={"to_k": 2}, alpha_pattern={"proj_mlp": 3})),
            ("text_encoder", _TE_TARGETS, dict(r=4, lora_alpha=2)))):
        if not with_metadata:
            cfg = dict(r=4, lora_alpha=4)  # without metadata diffusers and we read alpha = rank
        model = getattr(src, comp)
        model.add_adapter(LoraConfig(init_lora_weights=False, target_modules=targets, **cfg))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        kwargs[f"{comp}_lora_layers"] = get_peft_model_state_dict(model)
        if with_metadata:
            kwargs[f"{comp}_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
        truth.update(_peft_truth(comp, model))
    diffusers.FluxPipeline.save_lora_weights(directory, **kwargs)
    return truth


@pytest.mark.parametrize("with_metadata", [True, False], ids=["metadata", "no-metadata"])
def test_diffusers_flux_file_fuses_like_diffusers_and_unfuses_exactly(tmp_path, with_metadata):
    truth = _write_diffusers_file(tmp_path, with_metadata)
    adapter = lora_fast.read_lora(tmp_path)
    assert adapter.format == "diffusers" and adapter.components() == ["transformer", "text_encoder"]
    base, ours, theirs = _base(), _pipe(), _pipe()
    snap = _snapshot(ours)
    lora_fast.load_lora_weights(ours, tmp_path)
    lora_fast.fuse_lora(ours, lora_scale=LORA_SCALE)
    theirs.load_lora_weights(tmp_path)
    _diffusers_fuse(theirs)
    _check_fused(ours, base, truth, theirs=theirs)
    lora_fast.unfuse_lora(ours)
    _assert_snapshot(ours, snap)


@pytest.mark.parametrize("call_scale", [None, 0.6])
def test_diffusers_flux_file_live_output_equals_diffusers_unfused(tmp_path, call_scale):
    _write_diffusers_file(tmp_path, True)
    ours, theirs = _pipe(), _pipe()
    lora_fast.load_lora_weights(ours, tmp_path)
    theirs.load_lora_weights(tmp_path)
    kwargs = _inputs(ours.transformer)
    if call_scale is not None:
        kwargs["joint_attention_kwargs"] = {"scale": call_scale}
    with torch.no_grad():
        (o,) = ours.transformer(**kwargs)
        (t,) = theirs.transformer(**kwargs)
        (plain,) = _base().transformer(**{k: v for k, v in kwargs.items() if k != "joint_attention_kwargs"})
    assert not torch.allclose(o, plain, rtol=1e-3, atol=1e-4), "the adapter changed nothing"
    torch.testing.assert_close(o, t, rtol=1e-5, atol=1e-5 * float(t.abs().max()))


# ---------------------------------------------------------------------------------------------
# kohya sd-scripts / BFL / XLabs: one table


def _bfl_module_rows(bfl: str, transformer) -> tuple[int, int]:
    """(out rows, in features) of a BFL module on a diffusers Flux transformer, from the table."""
    fused = next(m for m in FLUX_MODULES if m.bfl == bfl.split(".", 2)[0] + ".{i}." + bfl.split(".", 2)[2]) \
        if bfl.startswith(("double_blocks.", "single_blocks.")) else next(m for m in FLUX_MODULES if m.bfl == bfl)
    index = bfl.split(".")[1] if bfl.startswith(("double_blocks.", "single_blocks.")) else None
    mods = dict(transformer.named_modules())
    rows = sum(mods[p.format(i=index)].out_features for p, _ in fused.targets)
    return rows, mods[fused.targets[0][0].format(i=index)].in_features, fused, index


def _make_flux_lora(transformer, bfl_names, *, rank=4, alphas=None, seed=0):
    """{bfl name: (down, up, alpha or None)} with random factors exact in float16, and the float64 truth."""
    g = torch.Generator().manual_seed(seed)
    modules, truth = {}, {}
    for j, bfl in enumerate(bfl_names):
        rows, inp, fused, index = _bfl_module_rows(bfl, transformer)
        down = (torch.randn(rank, inp, generator=g) * 0.1).half().float()
        up = (torch.randn(rows, rank, generator=g) * 0.1).half().float()
        alpha = None if alphas is None else alphas[j % len(alphas)]
        modules[bfl] = (down, up, alpha)
        scale = (alpha if alpha else rank) / rank
        unit = rows // sum(fused.parts)
        starts = [sum(fused.parts[:k]) * unit for k in range(len(fused.parts))]
        for path, take in fused.targets:
            part = torch.cat([up[starts[t]:starts[t] + fused.parts[t] * unit] for t in take])
            truth[("transformer", path.format(i=index))] = [(scale, part.double(), down.double())]
    return modules, truth


def _kohya_sd(modules) -> dict:
    sd = {}
    for bfl, (down, up, alpha) in modules.items():
        name = "lora_unet_" + bfl.replace(".", "_")
        sd[f"{name}.lora_down.weight"] = down
        sd[f"{name}.lora_up.weight"] = up
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(float(alpha))
    return sd


def _bfl_sd(modules, prefix: str, spelling: str) -> dict:
    a, b = ("lora_A", "lora_B") if spelling == "AB" else ("lora_down", "lora_up")
    sd = {}
    for bfl, (down, up, alpha) in modules.items():
        sd[f"{prefix}{bfl}.{a}.weight"] = down
        sd[f"{prefix}{bfl}.{b}.weight"] = up
        if alpha is not None:
            sd[f"{prefix}{bfl}.alpha"] = torch.tensor(float(alpha))
    return sd


_DOUBLE = ["img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2", "img_mod.lin",
           "txt_attn.qkv", "txt_attn.proj", "txt_mlp.0", "txt_mlp.2", "txt_mod.lin"]
_SINGLE = ["linear1", "linear2", "modulation.lin"]
_TINY_NAMES = ([f"double_blocks.{i}.{n}" for i in (0, 1) for n in _DOUBLE]
               + [f"single_blocks.{i}.{n}" for i in (0, 1) for n in _SINGLE]
               + ["img_in", "txt_in", "time_in.in_layer", "vector_in.out_layer", "guidance_in.in_layer",
                  "final_layer.linear", "final_layer.adaLN_modulation.1"])


def _te1_module(seed=5, rank=2, alpha=3.0):
    """A kohya lora_te1_ CLIP-L module (self_attn.q_proj of layer 0) and its truth."""
    te = _base().text_encoder
    q = te.text_model.encoder.layers[0].self_attn.q_proj if hasattr(te, "text_model") else \
        te.encoder.layers[0].self_attn.q_proj
    g = torch.Generator().manual_seed(seed)
    down = torch.randn(rank, q.in_features, generator=g) * 0.1
    up = torch.randn(q.out_features, rank, generator=g) * 0.1
    name = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    sd = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha)}
    path = "text_model.encoder.layers.0.self_attn.q_proj" if hasattr(te, "text_model") else \
        "encoder.layers.0.self_attn.q_proj"
    return sd, {("text_encoder", path): [(alpha / rank, up.double(), down.double())]}


def _fuse_ours(sd_or_path, kind="tiny"):
    pipe = _pipe(kind)
    snap = _snapshot(pipe)
    lora_fast.load_lora_weights(pipe, sd_or_path)
    lora_fast.fuse_lora(pipe, lora_scale=LORA_SCALE)
    return pipe, snap


def test_kohya_flux_read_splits_fused_projections_sharing_down():
    modules, _ = _make_flux_lora(_base().transformer, _TINY_NAMES, alphas=[2.0, None, 8.0])
    sd = _kohya_sd(modules)
    assert detect_flux_layout(sd) == "kohya"
    adapter = lora_fast.read_lora(sd)
    assert (adapter.format, adapter.family) == ("kohya", "flux")
    q = adapter.layers["transformer.transformer_blocks.0.attn.to_q"]
    k = adapter.layers["transformer.transformer_blocks.0.attn.to_k"]
    mlp = adapter.layers["transformer.single_transformer_blocks.1.proj_mlp"]
    v1 = adapter.layers["transformer.single_transformer_blocks.1.attn.to_v"]
    assert q.down is k.down, "split modules must share the file's down matrix"
    assert q.up.data_ptr() != k.up.data_ptr() and q.alpha == k.alpha == 2.0
    inner = _base().transformer.inner_dim
    assert mlp.up.shape == (4 * inner, 4) and v1.up.shape == (inner, 4) and mlp.down is v1.down
    # final_layer.adaLN_modulation.1: (shift, scale) rows become diffusers' (scale, shift)
    ada = modules["final_layer.adaLN_modulation.1"][1]
    half = ada.shape[0] // 2
    assert torch.equal(adapter.layers["transformer.norm_out.linear"].up, torch.cat([ada[half:], ada[:half]]))


def test_kohya_flux_fuses_like_diffusers_and_float64(tmp_path):
    # diffusers' converter cannot split linear1 at tiny width (hard-coded dims): linear1 is checked on the wide model
    names = [n for n in _TINY_NAMES if not n.endswith("linear1") and not n.startswith("final_layer")]
    modules, truth = _make_flux_lora(_base().transformer, names, alphas=[2.0, None, 8.0, 4.0])
    path = tmp_path / "kohya_flux.safetensors"
    st_save(_kohya_sd(modules), str(path))
    ours, snap = _fuse_ours(path)
    theirs = _pipe()
    theirs.load_lora_weights(path)
    _diffusers_fuse(theirs)
    # diffusers 0.42.1 converts img_in/txt_in/time_in/vector_in/guidance_in without the "transformer." prefix and
    # then silently drops them (the weights stay unchanged); sd-scripts trains them, so we apply them
    embedders = {k for k in truth if "embed" in k[1]}
    assert len(embedders) == 5
    t_sd, b_sd = _plain(theirs.transformer), _base().transformer.state_dict()
    assert all(_bits_equal(t_sd[f"{p}.weight"], b_sd[f"{p}.weight"]) for _, p in embedders)
    _check_fused(ours, _base(), truth, theirs=theirs, skip_theirs=embedders)
    lora_fast.unfuse_lora(ours)
    _assert_snapshot(ours, snap)


def test_kohya_flux_te1_clip_keys_fuse_to_float64(tmp_path):
    """lora_te1_ keys are CLIP-L (text_encoder). diffusers 0.42.1 cannot load a kohya Flux file holding them
    ("Could not automatically infer state dict type"), so the oracle here is float64 only."""
    modules, truth = _make_flux_lora(_base().transformer, ["double_blocks.1.img_attn.qkv"], alphas=[8.0])
    sd = _kohya_sd(modules)
    te_sd, te_truth = _te1_module()
    sd.update(te_sd)
    truth.update(te_truth)
    path = tmp_path / "kohya_flux_te.safetensors"
    st_save(sd, str(path))
    adapter = lora_fast.read_lora(path)
    assert adapter.components() == ["transformer", "text_encoder"] and adapter.format == "kohya"
    ours, snap = _fuse_ours(path)
    _check_fused(ours, _base(), truth)
    lora_fast.unfuse_lora(ours)
    _assert_snapshot(ours, snap)


@pytest.mark.slow  # ~20 s: a 0.8 GB full-width transformer, three copies (linear1 vs float64 runs by default below)
def test_kohya_flux_linear1_split_equals_diffusers_at_full_width(tmp_path):
    base = _base("wide")
    modules, truth = _make_flux_lora(base.transformer, ["single_blocks.0.linear1", "single_blocks.0.linear2"],
                                     rank=4, alphas=[2.0, 8.0])
    path = tmp_path / "wide.safetensors"
    st_save(_kohya_sd(modules), str(path))
    ours, snap = _fuse_ours(path, "wide")
    theirs = _pipe("wide")
    theirs.load_lora_weights(path)
    _diffusers_fuse(theirs)
    _check_fused(ours, base, truth, theirs=theirs)
    lora_fast.unfuse_lora(ours)
    _assert_snapshot(ours, snap)


def test_kohya_flux_final_layer_applies_where_diffusers_drops_it(tmp_path):
    """sd-scripts trains final_layer.linear and final_layer.adaLN_modulation.1 at alpha/rank like every module;
    diffusers 0.42.1 converts them without the "transformer." prefix (and without alpha) and then silently
    drops them. We apply them, adaLN rows swapped from BFL's (shift, scale) to diffusers' (scale, shift)."""
    modules, truth = _make_flux_lora(_base().transformer, ["final_layer.linear", "final_layer.adaLN_modulation.1"],
                                     rank=4, alphas=[2.0])
    assert {s for v in truth.values() for s, _, _ in v} == {0.5}
    path = tmp_path / "final.safetensors"
    st_save(_kohya_sd(modules), str(path))
    ours, snap = _fuse_ours(path)
    _check_fused(ours, _base(), truth)
    lora_fast.unfuse_lora(ours)
    _assert_snapshot(ours, snap)
    theirs = _pipe()
    theirs.load_lora_weights(path)
    _diffusers_fuse(theirs)
    t_sd, b_sd = _plain(theirs.transformer), _base().transformer.state_dict()
    assert all(_bits_equal(t_sd[f"{p}.weight"], b_sd[f"{p}.weight"]) for _, p in truth)


@pytest.mark.parametrize("prefix", ["diffusion_model.", ""], ids=["comfyui", "bare"])
@pytest.mark.parametrize("spelling", ["AB", "down_up"])
def test_bfl_names_fuse_like_kohya_and_float64(prefix, spelling):
    modules, truth = _make_flux_lora(_base().transformer, _TINY_NAMES, alphas=[2.0, None, 8.0])
    sd = _bfl_sd(modules, prefix, spelling)
    adapter = lora_fast.read_lora(sd)
    assert (adapter.format, adapter.family) == ("bfl", "flux")
    kohya = lora_fast.read_lora(_kohya_sd(modules))
    assert sorted(adapter.layers) == sorted(kohya.layers)
    for key, layer in adapter.layers.items():
        assert torch.equal(layer.delta(), kohya.layers[key].delta()), key
    ours, snap = _fuse_ours(sd)
    _check_fused(ours, _base(), truth)
    lora_fast.unfuse_lora(ours)
    _assert_snapshot(ours, snap)


def test_bfl_comfyui_file_fuses_like_diffusers(tmp_path):
    # diffusers routes lora_down/lora_up files with a diffusion_model. prefix through its kohya converter (which
    # drops the embedders and final_layer, and cannot split linear1 at tiny width: see the kohya tests above)
    names = [n for n in _TINY_NAMES if n.startswith(("double_blocks.", "single_blocks.")) and not n.endswith("linear1")]
    modules, truth = _make_flux_lora(_base().transformer, names, alphas=[2.0, 8.0])
    path = tmp_path / "comfy.safetensors"
    st_save(_bfl_sd(modules, "diffusion_model.", "down_up"), str(path))
    ours, _ = _fuse_ours(path)
    theirs = _pipe()
    theirs.load_lora_weights(path)
    _diffusers_fuse(theirs)
    _check_fused(ours, _base(), truth, theirs=theirs)


def _xlabs_sd(transformer, seed=3, rank=4):
    """XLabs processor LoRAs for double block 0 and single block 1 (no alpha: scale 1), and the truth."""
    bfl_for = {"double_blocks.0.processor.qkv_lora1": "double_blocks.0.img_attn.qkv",
               "double_blocks.0.processor.proj_lora1": "double_blocks.0.img_attn.proj",
               "double_blocks.0.processor.qkv_lora2": "double_blocks.0.txt_attn.qkv",
               "double_blocks.0.processor.proj_lora2": "double_blocks.0.txt_attn.proj",
               "single_blocks.1.processor.proj_lora": "single_blocks.1.linear2"}
    modules, truth = _make_flux_lora(transformer, list(bfl_for.values()), rank=rank, seed=seed)
    sd = {}
    for xl, bfl in bfl_for.items():
        down, up, _ = modules[bfl]
        sd[f"{xl}.down.weight"], sd[f"{xl}.up.weight"] = down, up
    # the single-block qkv_lora: q, k, v only (3 · inner rows)
    g = torch.Generator().manual_seed(seed + 1)
    inner = transformer.inner_dim
    down = (torch.randn(rank, inner, generator=g) * 0.1).half().float()
    up = (torch.randn(3 * inner, rank, generator=g) * 0.1).half().float()
    sd["single_blocks.1.processor.qkv_lora.down.weight"] = down
    sd["single_blocks.1.processor.qkv_lora.up.weight"] = up
    for j, name in enumerate(("to_q", "to_k", "to_v")):
        truth[("transformer", f"single_transformer_blocks.1.attn.{name}")] = [
            (1.0, up[j * inner:(j + 1) * inner].double(), down.double())]
    return sd, truth


def test_xlabs_fuses_like_diffusers_and_float64(tmp_path):
    sd, truth = _xlabs_sd(_base().transformer)
    adapter = lora_fast.read_lora(sd)
    assert (adapter.format, adapter.family) == ("xlabs", "flux")
    assert all(layer.scale == 1.0 for layer in adapter.layers.values())
    path = tmp_path / "xlabs.safetensors"
    st_save(sd, str(path))
    ours, snap = _fuse_ours(path)
    theirs = _pipe()
    theirs.load_lora_weights(path)
    _diffusers_fuse(theirs)
    _check_fused(ours, _base(), truth, theirs=theirs)
    lora_fast.unfuse_lora(ours)
    _assert_snapshot(ours, snap)


def test_kohya_flux_live_output_matches_fused_and_call_scale():
    modules, _ = _make_flux_lora(_base().transformer, _TINY_NAMES, alphas=[2.0, None, 8.0])
    sd = _kohya_sd(modules)
    live, fused = _pipe(), _pipe()
    lora_fast.load_lora_weights(live, sd)
    lora_fast.load_lora_weights(fused, sd, fuse=True, lora_scale=0.5)
    kwargs = _inputs(live.transformer)
    with torch.no_grad():
        (o,) = live.transformer(**kwargs, joint_attention_kwargs={"scale": 0.5})
        (f,) = fused.transformer(**kwargs)
        (full,) = live.transformer(**kwargs)
    torch.testing.assert_close(o, f, rtol=1e-4, atol=1e-4 * float(f.abs().max()))
    assert not torch.allclose(o, full, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("defect", ["rows", "rank", "unknown"])
def test_bad_flux_files_raise(defect):
    modules, _ = _make_flux_lora(_base().transformer, ["double_blocks.0.img_attn.qkv", "single_blocks.0.linear1"])
    sd = _kohya_sd(modules)
    if defect == "rows":
        sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] = torch.zeros(7, 4)
        match = "do not split"
    elif defect == "rank":
        sd["lora_unet_single_blocks_0_linear1.lora_up.weight"] = torch.zeros(7 * 32, 3)
        match = "rank mismatch"
    else:
        sd["lora_unet_single_blocks_0_linear9.lora_down.weight"] = torch.zeros(4, 32)
        match = "linear9"
    pipe = _pipe()
    snap = _snapshot(pipe)
    with pytest.raises(LoraFormatError, match=match):
        lora_fast.load_lora_weights(pipe, sd)
    _assert_snapshot(pipe, snap)


# ---------------------------------------------------------------------------------------------
# a LoRA for another family


def _sdxl_kohya_sd():
    g = torch.Generator().manual_seed(9)
    name = "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q"  # down_blocks.1...transformer_blocks.1: SDXL only
    return {f"{name}.lora_down.weight": torch.randn(2, 64, generator=g),
            f"{name}.lora_up.weight": torch.randn(64, 2, generator=g), f"{name}.alpha": torch.tensor(1.0)}


@pytest.mark.parametrize("case", ["sdxl-on-flux", "flux-kohya-on-sd3", "flux-diffusers-on-sd3"])
def test_other_family_raises_names_both_families_and_changes_nothing(case, tmp_path):
    from lora_fast.formats.families import adapter_family, family_mismatch, target_family

    if case == "sdxl-on-flux":
        source, pipe, want = _sdxl_kohya_sd(), _pipe(), ("SDXL", "Flux.1 FluxPipeline")
    elif case == "flux-kohya-on-sd3":
        modules, _ = _make_flux_lora(_base().transformer, ["double_blocks.0.img_attn.qkv", "single_blocks.0.linear1"])
        source, pipe, want = _kohya_sd(modules), _pipe("sd3"), ("Flux.1", "SD3/SD3.5 StableDiffusion3Pipeline")
    else:
        _write_diffusers_file(tmp_path, True)
        source, pipe, want = tmp_path, _pipe("sd3"), ("Flux.1", "SD3/SD3.5 StableDiffusion3Pipeline")
    adapter = lora_fast.read_lora(source)
    message = family_mismatch(adapter, pipe)
    assert message is not None and f"looks like a {want[0]} LoRA" in message and want[1] in message, message
    assert family_mismatch(adapter, _pipe("sdxl" if want[0] == "SDXL" else "flux")) is None
    assert adapter_family(adapter) in ("sdxl", "flux") and target_family(pipe.transformer) in ("flux", "sd3")
    snap = _snapshot(pipe)
    with pytest.raises(LoraFormatError, match="no such module|does not have|weight shape") as err:
        lora_fast.load_lora_weights(pipe, source)
    assert f"looks like a {want[0]} LoRA" in str(err.value) and want[1] in str(err.value), err.value
    _assert_snapshot(pipe, snap)
    with pytest.raises(LoraFormatError, match=f"looks like a {want[0]} LoRA"):  # a dict of components says it too
        lora_fast.load_lora_weights({"transformer": pipe.transformer}, source)
    assert not lora_fast.get_list_adapters(pipe) or not any(lora_fast.get_list_adapters(pipe).values())


def test_kohya_flux_te3_t5_keys_fuse_to_float64():
    """lora_te3_ keys (sd-scripts' T5-XXL names) go to text_encoder_2; diffusers drops them, so float64 is the oracle."""
    t5 = _base().text_encoder_2
    g = torch.Generator().manual_seed(11)
    sd, truth = {}, {}
    for path, alpha in (("encoder.block.0.layer.0.SelfAttention.q", 1.0), ("encoder.block.1.layer.1.DenseReluDense.wo", None)):
        mod = dict(t5.named_modules())[path]
        down = torch.randn(2, mod.in_features, generator=g) * 0.1
        up = torch.randn(mod.out_features, 2, generator=g) * 0.1
        name = "lora_te3_" + path.replace(".", "_")
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
        if alpha is not None:
            sd[f"{name}.alpha"] = torch.tensor(alpha)
        truth[("text_encoder_2", path)] = [((alpha or 2) / 2, up.double(), down.double())]
    modules, t_truth = _make_flux_lora(_base().transformer, ["single_blocks.1.linear1"], alphas=[2.0])
    sd.update(_kohya_sd(modules))
    truth.update(t_truth)
    adapter = lora_fast.read_lora(sd)
    assert adapter.format == "kohya" and adapter.components() == ["transformer", "text_encoder_2"]
    ours, snap = _fuse_ours(sd)
    _check_fused(ours, _base(), truth)
    lora_fast.unfuse_lora(ours)
    _assert_snapshot(ours, snap)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_kohya_flux_file_fuses_to_float64(tmp_path, dtype):
    """Trainers save Flux LoRAs in bf16/fp16 (alpha too): the stored values are used as they are, rounded once."""
    modules, _ = _make_flux_lora(_base().transformer, ["double_blocks.0.txt_attn.qkv", "single_blocks.0.linear1",
                                                       "final_layer.adaLN_modulation.1"], alphas=[0.3])
    half = {k: (v[0].to(dtype), v[1].to(dtype), v[2]) for k, v in modules.items()}
    sd = {k: v.to(dtype) for k, v in _kohya_sd(half).items()}  # alpha in the save dtype too
    stored_alpha = float(sd["lora_unet_single_blocks_0_linear1.alpha"].double())
    assert stored_alpha != 0.3
    path = tmp_path / "half.safetensors"
    st_save(sd, str(path))
    # the truth from the stored (rounded) factors and alpha
    rounded = {k: (d.float(), u.float(), stored_alpha) for k, (d, u, _) in half.items()}
    g_truth = {}
    for bfl, (down, up, alpha) in rounded.items():
        _, _, fused, index = _bfl_module_rows(bfl, _base().transformer)
        unit = up.shape[0] // sum(fused.parts)
        starts = [sum(fused.parts[:k]) * unit for k in range(len(fused.parts))]
        for p, take in fused.targets:
            part = torch.cat([up[starts[t]:starts[t] + fused.parts[t] * unit] for t in take])
            g_truth[("transformer", p.format(i=index))] = [(alpha / 4, part.double(), down.double())]
    ours, snap = _fuse_ours(path)
    _check_fused(ours, _base(), g_truth)
    lora_fast.unfuse_lora(ours)
    _assert_snapshot(ours, snap)


def _onetrainer_sd(paths, seed=21):
    mods = dict(_base().transformer.named_modules())
    g = torch.Generator().manual_seed(seed)
    sd, truth = {}, {}
    for j, path in enumerate(paths):
        m = mods[path]
        down = torch.randn(4, m.in_features, generator=g) * 0.1
        up = torch.randn(m.out_features, 4, generator=g) * 0.1
        alpha = [2.0, 8.0, 1.0][j % 3]  # OneTrainer always writes alpha (diffusers requires it)
        name = "lora_transformer_" + path.replace(".", "_")
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
        sd[f"{name}.alpha"] = torch.tensor(alpha)
        truth[("transformer", path)] = [(alpha / 4, up.double(), down.double())]
    return sd, truth


def test_onetrainer_flux_names_fuse_like_diffusers_and_float64(tmp_path):
    """OneTrainer: lora_transformer_ + diffusers path with '.' -> '_', kohya tensors and alpha. diffusers 0.42.1's
    OneTrainer converter handles only attention projections and top-level modules (block MLPs, proj_mlp, norms
    raise), so it is the oracle for those; every module is checked against float64."""
    handled = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.add_v_proj",
               "transformer_blocks.1.attn.to_add_out", "single_transformer_blocks.1.attn.to_k", "norm_out.linear",
               "x_embedder", "context_embedder", "time_text_embed.timestep_embedder.linear_1", "proj_out"]
    others = ["transformer_blocks.1.ff_context.net.0.proj", "single_transformer_blocks.0.proj_mlp",
              "single_transformer_blocks.0.norm.linear", "transformer_blocks.0.norm1_context.linear"]
    sd, truth = _onetrainer_sd(handled + others)
    adapter = lora_fast.read_lora(sd)
    assert (adapter.format, adapter.family) == ("onetrainer", "flux")
    assert sorted(adapter.layers) == sorted(f"transformer.{p}" for p in handled + others)
    ours, snap = _fuse_ours(sd)
    _check_fused(ours, _base(), truth)
    lora_fast.unfuse_lora(ours)
    _assert_snapshot(ours, snap)

    sd, truth = _onetrainer_sd(handled)
    path = tmp_path / "onetrainer.safetensors"
    st_save(sd, str(path))
    ours, _ = _fuse_ours(path)
    theirs = _pipe()
    theirs.load_lora_weights(path)
    _diffusers_fuse(theirs)
    _check_fused(ours, _base(), truth, theirs=theirs)


def test_per_sample_adapters_on_flux_rows_equal_each_adapters_own_run():
    """A kohya adapter (split modules sharing one down matrix), an XLabs adapter and the base model in one batch."""
    modules, _ = _make_flux_lora(_base().transformer, _TINY_NAMES, alphas=[2.0, None, 8.0], seed=1)
    xlabs, _ = _xlabs_sd(_base().transformer, seed=4)
    pipe = _pipe()
    lora_fast.load_lora_weights(pipe, _kohya_sd(modules), "k")
    lora_fast.load_lora_weights(pipe, xlabs, "x")
    entries = ["k", "x", None, {"k": 0.5, "x": 0.5}]
    kwargs = _inputs(pipe.transformer, seed=2, batch=len(entries))
    with torch.no_grad():
        with lora_fast.per_sample_adapters(pipe, entries, components=["transformer"]):
            (batched,) = pipe.transformer(**kwargs)
        for j, entry in enumerate(entries):
            one = {k: (v[j:j + 1] if isinstance(v, torch.Tensor) and k not in ("img_ids", "txt_ids") else v)
                   for k, v in kwargs.items()}
            if entry is None:
                lora_fast.disable_lora(pipe)
            else:
                lora_fast.enable_lora(pipe)
                names = [entry] if isinstance(entry, str) else list(entry)
                weights = [1.0] if isinstance(entry, str) else list(entry.values())
                lora_fast.set_adapters(pipe, names, weights)
            (alone,) = pipe.transformer(**one)
            torch.testing.assert_close(batched[j:j + 1], alone, rtol=1e-5, atol=1e-5 * float(alone.abs().max()))
    assert not torch.allclose(batched[0], batched[2], rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# writing sd-scripts Flux files


def test_kohya_flux_round_trips_bit_exact(tmp_path):
    modules, _ = _make_flux_lora(_base().transformer, _TINY_NAMES, alphas=[2.0, 0.5, 8.0])
    sd = _kohya_sd(modules)
    sd.update(_te1_module()[0])
    t5 = "lora_te3_encoder_block_0_layer_0_SelfAttention_q"
    sd[f"{t5}.lora_down.weight"], sd[f"{t5}.lora_up.weight"] = torch.randn(2, 32), torch.randn(32, 2)
    sd[f"{t5}.alpha"] = torch.tensor(1.0)
    adapter = lora_fast.read_lora(sd)
    path = tmp_path / "again.safetensors"
    adapter.save(path, format="kohya")
    again = lora_fast.load_file(str(path))
    assert sorted(again) == sorted(sd)
    bad = [k for k in sd if not _bits_equal(again[k].contiguous(), sd[k].contiguous())]
    assert not bad, bad[:3]


def test_diffusers_flux_adapter_writes_as_kohya_when_splits_share_down(tmp_path):
    """From split modules: q, k, v (and linear1's parts) sharing one down matrix re-fuse; a missing part gets zero
    rows (same delta); different down matrices are refused before anything is written."""
    modules, _ = _make_flux_lora(_base().transformer, ["double_blocks.0.img_attn.qkv", "single_blocks.1.linear1",
                                                       "double_blocks.1.txt_mod.lin"], alphas=[2.0])
    adapter = lora_fast.read_lora(_kohya_sd(modules))
    del adapter.layers["transformer.single_transformer_blocks.1.attn.to_k"]
    adapter = lora_fast.LoraAdapter(adapter.layers, "diffusers")  # no family recorded: found from single blocks
    path = tmp_path / "k.safetensors"
    adapter.save(path, format="kohya")
    back = lora_fast.read_lora(path)
    assert back.format == "kohya"
    for key, layer in back.layers.items():
        want = adapter.layers.get(key)
        if want is None:  # the dropped to_k comes back with zero rows
            assert key.endswith("single_transformer_blocks.1.attn.to_k") and not layer.up.any()
        else:
            assert torch.equal(layer.delta(), want.delta()), key
    q = adapter.layers["transformer.transformer_blocks.0.attn.to_q"]
    adapter.layers["transformer.transformer_blocks.0.attn.to_q"] = lora_fast.LoraLayer(
        down=q.down + 1, up=q.up, alpha=q.alpha)
    bad = tmp_path / "bad.safetensors"
    with pytest.raises(LoraFormatError, match="do not share their down"):
        adapter.save(bad, format="kohya")
    assert not bad.exists()


def test_inspect_names_the_flux_layout_and_counts_a_shared_down_once(tmp_path, capsys):
    from lora_fast.cli import main

    modules, _ = _make_flux_lora(_base().transformer, ["double_blocks.0.img_attn.qkv"], alphas=[2.0])
    down, up, _alpha = modules["double_blocks.0.img_attn.qkv"]
    path = tmp_path / "kohya_flux.safetensors"
    lora_fast.save_file(_kohya_sd(modules), path)
    assert main(["inspect", str(path), "--json"]) == 0
    import json

    info = json.loads(capsys.readouterr().out)
    assert (info["format"], info["family"], info["modules"]) == ("kohya", "flux", 3)  # to_q, to_k, to_v
    assert info["parameters"] == down.numel() + up.numel()  # one down matrix, the up rows split three ways
    assert main(["inspect", str(path)]) == 0
    assert "kohya (flux layout)" in capsys.readouterr().out


# ------------------------------------------------------------------------------ block-diagonal kohya output


def _independent_layer(module, rank, alpha, g, dtype=torch.float32):
    """A LoRA layer of its own (own down) on ``module``, factors exact in bf16."""
    down = (torch.randn(rank, module.in_features, generator=g) / module.in_features ** 0.5).bfloat16().to(dtype)
    up = (torch.randn(module.out_features, rank, generator=g) * 0.1).bfloat16().to(dtype)
    return lora_fast.LoraLayer(down=down, up=up, alpha=alpha)


def _delta64(layer) -> torch.Tensor:
    r = layer.rank
    return layer.scale * (layer.up.double().reshape(layer.up.shape[0], r) @ layer.down.double().reshape(r, -1))


def _diffusers_trained_flux_adapter(seed=0, k_alpha=2.0):
    """Independent to_q/to_k/to_v LoRAs (diffusers training: one down each; ranks 4, 2, 4, scales 2, k_alpha/2, 1),
    linear1's to_q and proj_mlp only (fp16 and bf16 factors), and a swapped final adaLN alone."""
    t = _base().transformer
    g = torch.Generator().manual_seed(seed)
    mods = dict(t.named_modules())
    spec = {"transformer_blocks.0.attn.to_q": (4, 8.0, torch.float32),
            "transformer_blocks.0.attn.to_k": (2, k_alpha, torch.float32),
            "transformer_blocks.0.attn.to_v": (4, 4.0, torch.float32),
            "single_transformer_blocks.1.attn.to_q": (2, 2.0, torch.float16),
            "single_transformer_blocks.1.proj_mlp": (3, 6.0, torch.bfloat16),
            "norm_out.linear": (2, 1.0, torch.float32)}
    layers = {f"transformer.{p}": _independent_layer(mods[p], r, a, g, dt) for p, (r, a, dt) in spec.items()}
    return lora_fast.LoraAdapter(layers, "diffusers", family="flux")


def test_kohya_output_refuses_parts_without_a_shared_down_and_names_the_module(tmp_path):
    adapter = _diffusers_trained_flux_adapter()
    path = tmp_path / "k.safetensors"
    with pytest.raises(LoraFormatError, match=r"double_blocks\.0\.img_attn\.qkv: its parts .*to_q.*to_k.*do not share "
                                              r"their down matrix.*ranks 4 and 2.*block_diagonal=True.*rank 10"):
        adapter.save(path, format="kohya")
    assert not path.exists()


def test_block_diagonal_kohya_output_keeps_every_delta_exactly(tmp_path):
    """down = the parts' downs stacked, up = block-diagonal; the scale ratio 2 of to_q folded into its up block (a
    power of two: exact); read back, every module's float64 delta (and the float32 delta the engine uses) is equal."""
    adapter = _diffusers_trained_flux_adapter()
    path = tmp_path / "k.safetensors"
    adapter.save(path, format="kohya", block_diagonal=True)
    sd = lora_fast.load_file(str(path))
    qkv = "lora_unet_double_blocks_0_img_attn_qkv"
    inner = _base().transformer.inner_dim
    down, up = sd[f"{qkv}.lora_down.weight"], sd[f"{qkv}.lora_up.weight"]
    assert down.shape == (10, inner) and up.shape == (3 * inner, 10)
    assert not up[:inner, 4:].any() and not up[inner:2 * inner, :4].any() and not up[inner:2 * inner, 6:].any()
    assert not up[2 * inner:, :6].any()
    assert sd[f"{qkv}.alpha"].item() / 10 == 1.0  # the smallest scale; q's 2 is in its up block
    l1 = "lora_unet_single_blocks_1_linear1"
    assert sd[f"{l1}.lora_down.weight"].dtype == torch.float32 and sd[f"{l1}.lora_down.weight"].shape[0] == 5
    assert not sd[f"{l1}.lora_up.weight"][inner:3 * inner].any()  # the parts the adapter lacks: zero rows
    back = lora_fast.read_lora(str(path))
    assert back.format == "kohya"
    for key, layer in adapter.layers.items():
        assert torch.equal(_delta64(back.layers[key]), _delta64(layer)), key
        assert torch.equal(back.layers[key].delta(), layer.delta()), key
    extra = set(back.layers) - set(adapter.layers)  # linear1's to_k / to_v: zero rows
    assert extra == {f"transformer.single_transformer_blocks.1.attn.to_{c}" for c in "kv"}
    assert all(not back.layers[k].up.any() for k in extra)
    # a file that needed no block-diagonal form is written as before under the flag (shared downs)
    modules, _ = _make_flux_lora(_base().transformer, _TINY_NAMES, alphas=[2.0, 0.5, 8.0])
    sd0 = _kohya_sd(modules)
    again = tmp_path / "again.safetensors"
    lora_fast.read_lora(sd0).save(again, format="kohya", block_diagonal=True)
    got = lora_fast.load_file(str(again))
    assert sorted(got) == sorted(sd0) and all(_bits_equal(got[k], sd0[k].contiguous()) for k in sd0)


def test_block_diagonal_refuses_a_scale_ratio_that_is_not_a_power_of_two(tmp_path):
    adapter = _diffusers_trained_flux_adapter(k_alpha=3.0)  # scales 2, 1.5, 1
    path = tmp_path / "k.safetensors"
    with pytest.raises(LoraFormatError, match=r"double_blocks\.0\.img_attn\.qkv: the scales .* not a power of two"):
        adapter.save(path, format="kohya", block_diagonal=True)
    assert not path.exists()
    adapter = _diffusers_trained_flux_adapter()
    adapter.layers["transformer.transformer_blocks.0.attn.to_v"].down[0, 0] = float("inf")
    with pytest.raises(LoraFormatError, match=r"attn\.to_v: its down matrix holds Inf/NaN"):
        adapter.save(path, format="kohya", block_diagonal=True)
    assert not path.exists()


def test_cli_convert_block_diagonal(tmp_path, capsys):
    from lora_fast.cli import main

    src = tmp_path / "diffusers.safetensors"
    _diffusers_trained_flux_adapter().save(src, format="diffusers")
    dst = tmp_path / "kohya.safetensors"
    assert main(["convert", str(src), str(dst), "--to", "kohya"]) == 2
    err = capsys.readouterr().err
    assert "img_attn.qkv" in err and "--block-diagonal" in err and not dst.exists()
    assert main(["convert", str(src), str(dst), "--to", "kohya", "--block-diagonal"]) == 0
    assert "identical" in capsys.readouterr().out
    assert main(["convert", str(src), str(tmp_path / "p"), "--to", "peft", "--block-diagonal"]) == 2
