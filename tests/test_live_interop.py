"""Live (unfused) adapters vs diffusers on real tiny pipelines (SD1.5, SDXL, SD3).

Two identical pipelines from one seed; the same diffusers-written LoRA files go into one through
lora_fast and into the other through diffusers' own ``load_lora_weights``. Model forwards must agree
within fp32 tolerance: unfused, with a per-call scale, with two weighted adapters, after fusing and
after unfusing. Where diffusers is known wrong (kohya per-module alphas) a float64-built reference
model is the oracle instead.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402
from peft.utils import get_peft_model_state_dict  # noqa: E402

import lora_fast  # noqa: E402
from lora_fast import LoraFormatError  # noqa: E402
from lora_fast.engine import component_state  # noqa: E402
from lora_fast.models import build_pipeline  # noqa: E402
from lora_reference import delta64  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

DENOISER = {"sd15": "unet", "sdxl": "unet", "sd3": "transformer"}
TEXT_ENCODERS = {"sd15": ["text_encoder"], "sdxl": ["text_encoder", "text_encoder_2"],
                 "sd3": ["text_encoder", "text_encoder_2"]}
SCALE_KWARG = {"sd15": "cross_attention_kwargs", "sdxl": "cross_attention_kwargs", "sd3": "joint_attention_kwargs"}
TARGETS = {
    "unet": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.0.proj", "ff.net.2", "conv1", "conv_shortcut",
             "time_emb_proj"],
    "transformer": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_v_proj", "to_add_out", "ff.net.0.proj",
                    "ff_context.net.2", "pos_embed.proj", "context_embedder"],
    "text_encoder": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
}

_BASES: dict = {}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny convolutions on a shared 2-core machine run ~10x faster on one thread (no OpenMP contention)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _base(family):
    if family not in _BASES:
        _BASES[family] = build_pipeline(family, "tiny", seed=0)
    return _BASES[family]


def _fresh(family):
    return copy.deepcopy(_base(family))


def _components(family):
    return [DENOISER[family], *TEXT_ENCODERS[family]]


def _save_lora(family, directory, seed, use_dora=False) -> str:
    """A diffusers LoRA file (every component, alpha != rank, per-module rank/alpha patterns) from PEFT layers."""
    src = _fresh(family)
    kwargs = {}
    g = torch.Generator().manual_seed(seed)
    for comp in _components(family):
        model = getattr(src, comp)
        is_te = comp.startswith("text_encoder")
        cfg = LoraConfig(init_lora_weights=False, target_modules=TARGETS["text_encoder" if is_te else comp],
                         r=4, lora_alpha=2 if is_te else 8, rank_pattern={"fc1": 2, "to_q": 2, "conv1": 3},
                         alpha_pattern={"v_proj": 6, "to_k": 16}, use_dora=use_dora and not is_te)
        model.add_adapter(cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_magnitude" in name:
                    p.copy_(p.abs() * (1 + 0.3 * torch.rand(p.shape, generator=g)))
                elif "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.15)
        kwargs[f"{comp}_lora_layers"] = get_peft_model_state_dict(model)
        kwargs[f"{comp}_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
    type(src).save_lora_weights(str(directory), **kwargs)
    return str(directory)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    cache = {}

    def get(family, seed, use_dora=False):
        key = (family, seed, use_dora)
        if key not in cache:
            cache[key] = _save_lora(family, tmp_path_factory.mktemp(f"{family}_{seed}_{use_dora}"), seed, use_dora)
        return cache[key]

    return get


def _inputs(family):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 1000, (1, 7), generator=g)
    if family == "sd3":
        den = dict(hidden_states=torch.randn(1, 16, 8, 8, generator=g), encoder_hidden_states=torch.randn(1, 7, 32, generator=g),
                   pooled_projections=torch.randn(1, 64, generator=g), timestep=torch.tensor([500]))
    else:
        ctx = 64 if family == "sdxl" else 32
        den = dict(sample=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([500]),
                   encoder_hidden_states=torch.randn(1, 7, ctx, generator=g))
        if family == "sdxl":
            den["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.randn(1, 6, generator=g)}
    return den, ids


def _forward(pipe, family, scale=None):
    """Denoiser output and every text encoder's last hidden state."""
    den, ids = _inputs(family)
    if scale is not None:
        den[SCALE_KWARG[family]] = {"scale": scale}
    with torch.no_grad():
        outs = [getattr(pipe, DENOISER[family])(**den).sample]
        outs += [getattr(pipe, te)(ids).last_hidden_state for te in TEXT_ENCODERS[family]]
    return outs


def _close(ours, theirs, what, rtol=1e-4, atol=2e-5):
    for i, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what} [output {i}]: {m}")


def _differs(ours, base, what):
    for i, (a, b) in enumerate(zip(ours, base)):
        assert (a - b).abs().max() > 1e-2, f"{what} [output {i}]: the LoRA did not change the output"


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3"])
def test_live_adapters_compute_what_diffusers_computes(family, files):
    base, ours, theirs = _base(family), _fresh(family), _fresh(family)
    base_out = _forward(base, family)
    first, second = files(family, 0), files(family, 100)

    lora_fast.load_lora_weights(ours, first, adapter_name="a")
    theirs.load_lora_weights(first, adapter_name="a")
    live = _forward(ours, family)
    _close(live, _forward(theirs, family), "one adapter, unfused")
    _differs(live, base_out, "one adapter")

    # the per-call scale reaches the denoiser (diffusers pops it; only PEFT layers would see it)
    _close(_forward(ours, family, 0.5)[:1], _forward(theirs, family, 0.5)[:1], "per-call scale 0.5")
    assert torch.equal(_forward(ours, family, 0.0)[0], base_out[0])  # λ = 0 is off (diffusers: resets to 1)
    _close(_forward(ours, family), live, "scale restored after the call", rtol=0, atol=0)

    # a second adapter becomes the only active one, then both with weights
    lora_fast.load_lora_weights(ours, second, adapter_name="b")
    theirs.load_lora_weights(second, adapter_name="b")
    assert lora_fast.get_active_adapters(ours) == ["b"]
    _close(_forward(ours, family), _forward(theirs, family), "second adapter alone")
    weights = [0.7, -0.4]
    lora_fast.set_adapters(ours, ["a", "b"], weights)
    theirs.set_adapters(["a", "b"], weights)
    assert lora_fast.get_list_adapters(ours) == {c: ["a", "b"] for c in _components(family)}
    mixed = _forward(ours, family)
    _close(mixed, _forward(theirs, family), "two weighted adapters")
    _close(_forward(ours, family, 0.3)[:1], _forward(theirs, family, 0.3)[:1], "two adapters, per-call scale")
    lora_fast.set_adapters(ours, ["a", "b"], [{DENOISER[family]: 0.5}, 1.0])
    theirs.set_adapters(["a", "b"], [{DENOISER[family]: 0.5}, 1.0])
    _close(_forward(ours, family), _forward(theirs, family), "per-component weight dict")
    lora_fast.set_adapters(ours, ["a", "b"], weights)
    theirs.set_adapters(["a", "b"], weights)

    # fusing the active adapters: same outputs as diffusers' fused model, and as our live model
    lora_fast.fuse_lora(ours, lora_scale=0.8)
    theirs.fuse_lora(lora_scale=0.8)
    fused = _forward(ours, family)
    _close(fused, _forward(theirs, family), "fused (lora_scale 0.8)")
    lora_fast.disable_lora(ours)  # nothing live is left to disable: the fused weights carry it all
    _close(_forward(ours, family), fused, "fused, live terms disabled", rtol=0, atol=0)
    lora_fast.enable_lora(ours)
    lora_fast.unfuse_lora(ours)
    _close(_forward(ours, family), mixed, "after unfuse: live again, exactly", rtol=0, atol=0)

    lora_fast.unload_lora_weights(ours)
    _close(_forward(ours, family), base_out, "after unload: the base model", rtol=0, atol=0)
    for comp in _components(family):
        assert component_state(getattr(ours, comp)) is None
        for name, m in getattr(ours, comp).named_modules():
            assert not (m._forward_hooks or m._forward_pre_hooks), f"{comp}.{name} kept a hook"
    assert "encode_prompt" not in vars(ours)


def test_dora_live_matches_diffusers(files):
    family = "sd15"
    path = files(family, 7, use_dora=True)
    base, ours, theirs = _base(family), _fresh(family), _fresh(family)
    lora_fast.load_lora_weights(ours, path, adapter_name="d")
    theirs.load_lora_weights(path, adapter_name="d")
    live = _forward(ours, family)
    _close(live, _forward(theirs, family), "DoRA, unfused")
    _differs(live[:1], _forward(base, family)[:1], "DoRA")
    lora_fast.set_adapters(ours, "d", 0.6)
    theirs.set_adapters("d", 0.6)
    _close(_forward(ours, family, 0.5), _forward(theirs, family, 0.5), "DoRA, weight 0.6, per-call scale 0.5")
    lora_fast.fuse_lora(ours)
    theirs.fuse_lora()
    _close(_forward(ours, family), _forward(theirs, family), "DoRA fused")


def test_kohya_per_module_alphas_follow_first_principles(files, tmp_path):
    """Per-module alphas (diffusers misreads some of them): the oracle is a model built from W + s·B·A in float64."""
    family = "sd15"
    adapter = lora_fast.read_lora(files(family, 3))
    for i, layer in enumerate(adapter.layers.values()):
        layer.alpha = (4.0, 16.0, 1.5, 3.0)[i % 4]
    path = tmp_path / "kohya.safetensors"
    adapter.save(str(path), format="kohya")
    ours, ref = _fresh(family), _fresh(family)
    lora_fast.load_lora_weights(ours, str(path))
    with torch.no_grad():
        for key, layer in lora_fast.read_lora(str(path)).layers.items():
            comp, _, mod_path = key.partition(".")
            module = lora_fast.targets.resolve_module(getattr(ref, comp), mod_path)
            delta = delta64(layer)
            module.weight.copy_((module.weight.double() + delta.reshape(module.weight.shape)).float())
    _close(_forward(ours, family), _forward(ref, family), "kohya per-module alphas vs first principles")


def test_text_encoder_lora_scale_of_encode_prompt_is_honoured(files):
    """Pipelines pass the text-encoder scale to encode_prompt(lora_scale=...); diffusers scales PEFT layers only."""
    family = "sd15"
    path = files(family, 0)
    ours, theirs = _fresh(family), _fresh(family)

    class FakeTokenizer:
        model_max_length = 7
        added_tokens_encoder: dict = {}

        def tokenize(self, text):
            return text.split()

        def __call__(self, prompt, **kwargs):
            class Out:
                input_ids = torch.tensor([[0, 5, 9, 33, 2, 1, 1]] * len(prompt))
                attention_mask = torch.ones(len(prompt), 7, dtype=torch.long)
            return Out()

    for p in (ours, theirs):
        p.tokenizer = FakeTokenizer()
    lora_fast.load_lora_weights(ours, path)
    theirs.load_lora_weights(path)

    def embeds(pipe, lora_scale):
        with torch.no_grad():
            return pipe.encode_prompt(["a photo"], "cpu", 1, False, lora_scale=lora_scale)[0]

    full = embeds(ours, None)
    _close([full], [embeds(theirs, None)], "encode_prompt, no scale")
    _close([embeds(ours, 0.3)], [embeds(theirs, 0.3)], "encode_prompt, lora_scale 0.3")
    assert (embeds(ours, 0.3) - full).abs().max() > 1e-3
    assert torch.equal(embeds(ours, None), full)  # the scale does not stick
    lora_fast.unload_lora_weights(ours)
    assert "encode_prompt" not in vars(ours)


def test_pipeline_with_peft_layers_is_refused(files):
    family = "sd15"
    path = files(family, 0)
    pipe = _fresh(family)
    pipe.load_lora_weights(path, adapter_name="theirs")
    before = _forward(pipe, family)
    with pytest.raises(LoraFormatError, match="PEFT"):
        lora_fast.load_lora_weights(pipe, path)
    for comp in _components(family):
        assert component_state(getattr(pipe, comp)) is None
    _close(_forward(pipe, family), before, "refused load changes nothing", rtol=0, atol=0)


def _lora_fast_state(pipe, family):
    """What lora_fast holds on each component, and every parameter's bits (base weights and PEFT's alike)."""
    out = {}
    for comp in _components(family):
        root = getattr(pipe, comp)
        s = component_state(root)
        hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in root.modules())
        out[comp] = (None if s is None else (sorted(s.adapters), list(s.active), dict(s.weights), len(s.fused),
                                             s.version, s.max_rank, s.enabled), hooks,
                     {k: p.detach().clone() for k, p in root.named_parameters()})
    return out


def _same_state(a, b) -> bool:
    return all(a[c][:2] == b[c][:2] and a[c][2].keys() == b[c][2].keys()
               and all(torch.equal(a[c][2][k], b[c][2][k]) for k in a[c][2]) for c in a)


@pytest.mark.parametrize("recover", ["unload_lora_weights", "delete_adapters"])
def test_diffusers_loading_on_top_of_lora_fast_is_refused_by_every_next_call(files, monkeypatch, recover):
    """diffusers' pipe.load_lora_weights cannot see lora_fast's hooks; lora_fast's next call refuses the pipeline
    (naming the way back), changes nothing, and works exactly as before once diffusers' adapters are gone."""
    family = "sd15"
    path, other = files(family, 0), files(family, 100)
    base, pipe = _base(family), _fresh(family)
    base_out = _forward(base, family)
    lora_fast.load_lora_weights(pipe, path, adapter_name="a")
    lora_fast.load_lora_weights(pipe, other, adapter_name="b")
    lora_fast.set_adapters(pipe, ["a", "b"], [0.7, 1.0])
    lora_fast.fuse_lora(pipe, adapter_names=["b"])  # one adapter fused, one live
    ours = _forward(pipe, family)

    pipe.load_lora_weights(path, adapter_name="theirs")  # diffusers injects PEFT layers around our hooked modules
    assert getattr(pipe.unet, "peft_config", None)
    before = _lora_fast_state(pipe, family)

    def per_sample():
        with lora_fast.per_sample_adapters(pipe, ["a"]):
            pass

    def streamed_fuse_on_load():
        monkeypatch.setenv("LORA_FAST_STREAM_FUSE", "1")
        try:
            lora_fast.load_lora_weights(pipe, other, adapter_name="c", fuse=True)
        finally:
            monkeypatch.delenv("LORA_FAST_STREAM_FUSE")

    calls = {
        "fuse_lora": lambda: lora_fast.fuse_lora(pipe),
        "unfuse_lora": lambda: lora_fast.unfuse_lora(pipe),
        "unfuse_lora(components)": lambda: lora_fast.unfuse_lora(pipe, components=["unet"]),
        "unload_lora_weights": lambda: lora_fast.unload_lora_weights(pipe),
        "load_lora_weights": lambda: lora_fast.load_lora_weights(pipe, other, adapter_name="c"),
        "load_lora_weights(fuse)": lambda: lora_fast.load_lora_weights(pipe, other, adapter_name="c", fuse=True),
        "streamed fuse-on-load": streamed_fuse_on_load,
        "hotswap": lambda: lora_fast.load_lora_weights(pipe, other, adapter_name="a", hotswap=True),
        "set_adapters": lambda: lora_fast.set_adapters(pipe, "a", 0.2),
        "disable_lora": lambda: lora_fast.disable_lora(pipe),
        "enable_lora": lambda: lora_fast.enable_lora(pipe),
        "delete_adapters": lambda: lora_fast.delete_adapters(pipe, "a"),
        "set_lora_device": lambda: lora_fast.set_lora_device(pipe, ["a"], "cpu"),
        "prepare_hotswap": lambda: lora_fast.prepare_hotswap(pipe, 8),
        "per_sample_adapters": per_sample,
    }
    for what, call in calls.items():
        with pytest.raises(LoraFormatError, match=r"diffusers/PEFT LoRA layers were loaded into .*unet") as info:
            call()
        message = str(info.value)
        assert "lora_fast changed nothing" in message and "pipe.unload_lora_weights()" in message, what
        assert _same_state(_lora_fast_state(pipe, family), before), f"{what} changed something"
    # read-only queries still answer
    assert lora_fast.get_list_adapters(pipe) == {c: ["a", "b"] for c in _components(family)}
    assert lora_fast.get_active_adapters(pipe) == ["a", "b"]

    if recover == "unload_lora_weights":
        pipe.unload_lora_weights()
    else:
        pipe.delete_adapters("theirs")
    _close(_forward(pipe, family), ours, "after diffusers' adapters are removed: as before", rtol=0, atol=0)
    lora_fast.unfuse_lora(pipe)
    for comp in _components(family):  # (diffusers' delete_adapters may leave empty PEFT wrappers: base_layer keys)
        got = {k.replace(".base_layer.", "."): v for k, v in getattr(pipe, comp).state_dict().items()}
        for k, v in getattr(base, comp).state_dict().items():
            assert torch.equal(got[k], v), f"{comp}.{k} not restored exactly"
    lora_fast.unload_lora_weights(pipe)
    _close(_forward(pipe, family), base_out, "after unload: the base model", rtol=0, atol=0)


def test_peft_on_another_component_is_one_library_per_pipeline_too(files):
    family = "sd15"
    path = files(family, 0)
    pipe = _fresh(family)
    lora_fast.load_lora_weights(pipe, path, adapter_name="a", components=["unet"])
    pipe.text_encoder.add_adapter(LoraConfig(target_modules=["q_proj"], r=2))
    with pytest.raises(LoraFormatError, match="text_encoder"):
        lora_fast.fuse_lora(pipe)
    with pytest.raises(LoraFormatError, match="text_encoder"):
        lora_fast.load_lora_weights(pipe, path, adapter_name="b", components=["unet"])
    assert component_state(pipe.unet).fused == [] and list(component_state(pipe.unet).adapters) == ["a"]
    # the UNet alone (a target without the text encoder) is lora_fast's only: it works
    lora_fast.fuse_lora(pipe.unet)
    lora_fast.unfuse_lora(pipe.unet)
    # a fresh pipeline whose text encoder holds PEFT layers refuses a UNet-only load as well
    fresh = _fresh(family)
    fresh.text_encoder.add_adapter(LoraConfig(target_modules=["q_proj"], r=2))
    with pytest.raises(LoraFormatError, match="PEFT"):
        lora_fast.load_lora_weights(fresh, path, components=["unet"])
    with pytest.raises(LoraFormatError, match="PEFT"):
        lora_fast.prepare_hotswap(fresh, 8)
    assert component_state(fresh.unet) is None
