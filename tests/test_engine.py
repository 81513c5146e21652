"""Engine: load/fuse/unfuse/unload on real modules, exactness over many cycles, safe fusing."""

import math

import pytest
import torch
from torch import nn

import lora_fast
from lora_fast import LoraAdapter, LoraFormatError, LoraFusionError, LoraLayer
from lora_reference import delta64


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(24, 40)
        self.k = nn.Linear(24, 17, bias=False)
        self.conv = nn.Conv2d(6, 10, 3, padding=1)
        self.pw = nn.Conv2d(10, 12, 1)
        self.emb = nn.Embedding(11, 9)


def toy(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return Toy().to(dtype)


def random_adapter(gen, rank=4, scale=0.3, modules=("q", "k", "conv", "pw", "emb"), dtype=torch.float32, alpha=None):
    def r(*shape):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype)

    shapes = {
        "q": ("linear", (rank, 24), (40, rank)),
        "k": ("linear", (rank, 24), (17, rank)),
        "conv": ("conv", (rank, 6, 3, 3), (10, rank, 1, 1)),
        "pw": ("conv", (rank, 10, 1, 1), (12, rank, 1, 1)),
        "emb": ("embedding", (rank, 11), (9, rank)),
    }
    layers = {}
    for m in modules:
        kind, a, b = shapes[m]
        layers[m] = LoraLayer(down=r(*a), up=r(*b), alpha=alpha if alpha is not None else 2.0 * rank, kind=kind)
    return LoraAdapter(layers, "diffusers")


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_bits_equal(model, snap):
    for k, v in model.state_dict().items():
        assert torch.equal(v.view(torch.uint8) if v.dtype != torch.uint8 else v, snap[k].view(torch.uint8)), k


def reference_fused(weight, layers_and_factors):
    w = weight.double()
    for layer, f in layers_and_factors:
        w = w + f * delta64(layer).reshape(weight.shape)
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fuse_matches_float64_reference_and_unfuse_is_exact(dtype):
    model = toy(dtype)
    before = snapshot(model)
    gen = torch.Generator().manual_seed(1)
    adapter = random_adapter(gen)
    name = lora_fast.load_lora_weights(model, adapter)
    assert name == "default_0"
    assert_bits_equal(model, before)  # loading alone changes no weight
    lora_fast.fuse_lora(model, lora_scale=0.7)
    for m in ("q", "k", "conv", "pw", "emb"):
        w = getattr(model, m).weight
        ref = reference_fused(before[f"{m}.weight"], [(adapter.layers[m], 0.7)])
        eps = torch.finfo(dtype).eps
        tol = ref.abs() * eps + 1e-6 * (1 + before[f"{m}.weight"].double().abs())
        assert ((w.double() - ref).abs() <= tol).all(), m
    lora_fast.unfuse_lora(model)
    assert_bits_equal(model, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_many_random_cycles_leave_zero_changed_bits(dtype):
    model = toy(dtype, seed=3)
    before = snapshot(model)
    gen = torch.Generator().manual_seed(5)
    for i in range(4):
        lora_fast.load_lora_weights(model, random_adapter(gen, rank=1 + i * 3, dtype=dtype), adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(4)]
    for cycle in range(1000):
        k = int(torch.randint(1, 5, (1,), generator=gen))
        chosen = [names[j] for j in torch.randperm(4, generator=gen)[:k].tolist()]
        weights = (torch.rand(k, generator=gen) * 4 - 2).tolist()
        scale = float(torch.rand(1, generator=gen) * 3)
        lora_fast.fuse_lora(model, lora_scale=scale, adapter_names=chosen, adapter_weights=weights)
        if cycle % 3 == 0:  # a second fuse while fused composes
            rest = [n for n in names if n not in chosen]
            if rest:
                lora_fast.fuse_lora(model, adapter_names=rest[:1])
        lora_fast.unfuse_lora(model)
    assert_bits_equal(model, before)


def test_safe_fusing_rolls_back_everything_on_nan():
    comps = {"unet": toy(torch.float16, 1), "text_encoder": toy(torch.float16, 2)}
    before = {k: snapshot(m) for k, m in comps.items()}
    gen = torch.Generator().manual_seed(0)
    good = random_adapter(gen)
    bad = random_adapter(gen)
    bad.layers["pw"].up[0, 0] = float("nan")
    layers = {f"unet.{k}": v for k, v in good.layers.items()}
    layers.update({f"text_encoder.{k}": v for k, v in bad.layers.items()})
    lora_fast.load_lora_weights(comps, LoraAdapter(layers, "diffusers"))
    with pytest.raises(LoraFusionError, match="text_encoder.pw"):
        lora_fast.fuse_lora(comps, safe_fusing=True)
    for k, m in comps.items():
        assert_bits_equal(m, before[k])
    # unsafe mode fuses (non-finite weights result) and unfuse still restores exactly
    lora_fast.fuse_lora(comps)
    assert not torch.isfinite(comps["text_encoder"].pw.weight).all()
    lora_fast.unfuse_lora(comps)
    for k, m in comps.items():
        assert_bits_equal(m, before[k])


def test_overflow_to_inf_is_caught_by_safe_fusing():
    model = toy(torch.float16)
    before = snapshot(model)
    gen = torch.Generator().manual_seed(0)
    adapter = random_adapter(gen, scale=1000.0, modules=("q",))
    lora_fast.load_lora_weights(model, adapter)
    with pytest.raises(LoraFusionError, match="q"):
        lora_fast.fuse_lora(model, safe_fusing=True)
    assert_bits_equal(model, before)


def test_lora_scale_is_not_sticky():
    model = toy()
    gen = torch.Generator().manual_seed(0)
    lora_fast.load_lora_weights(model, random_adapter(gen, modules=("q",)))
    lora_fast.fuse_lora(model, lora_scale=0.5)
    lora_fast.unfuse_lora(model)
    lora_fast.fuse_lora(model)
    once = model.q.weight.clone()
    lora_fast.unfuse_lora(model)
    model2 = toy()
    gen = torch.Generator().manual_seed(0)
    lora_fast.load_lora_weights(model2, random_adapter(gen, modules=("q",)))
    lora_fast.fuse_lora(model2)
    assert torch.equal(once, model2.q.weight)


def test_unload_after_fuse_keeps_weights_and_without_fuse_is_identity():
    model = toy(torch.bfloat16)
    before = snapshot(model)
    gen = torch.Generator().manual_seed(0)
    lora_fast.load_lora_weights(model, random_adapter(gen, dtype=torch.bfloat16))
    lora_fast.unload_lora_weights(model)
    assert_bits_equal(model, before)
    assert lora_fast.engine.component_state(model) is None
    assert set(model.state_dict()) == set(before)

    lora_fast.load_lora_weights(model, random_adapter(gen, dtype=torch.bfloat16))
    lora_fast.fuse_lora(model)
    fused = snapshot(model)
    lora_fast.unload_lora_weights(model)
    assert_bits_equal(model, fused)
    lora_fast.unfuse_lora(model)  # nothing left to unfuse: a no-op
    assert_bits_equal(model, fused)


def test_validation_failure_changes_nothing():
    model = toy()
    gen = torch.Generator().manual_seed(0)
    adapter = random_adapter(gen)
    adapter.layers["nope"] = adapter.layers["q"]
    with pytest.raises(LoraFormatError, match="nope"):
        lora_fast.load_lora_weights(model, adapter)
    assert lora_fast.engine.component_state(model) is None
    bad_shape = random_adapter(gen, modules=("q",))
    bad_shape.layers["k"] = bad_shape.layers["q"]  # (40, 24) factors on a (17, 24) weight
    with pytest.raises(LoraFormatError, match="k"):
        lora_fast.load_lora_weights(model, bad_shape)
    assert lora_fast.engine.component_state(model) is None


def test_components_select_part_of_a_multi_component_adapter():
    model = toy()
    before = snapshot(model)
    gen = torch.Generator().manual_seed(0)
    a = random_adapter(gen, modules=("q",))
    b = random_adapter(gen, modules=("k",))
    layers = {"unet.q": a.layers["q"], "text_encoder.k": b.layers["k"]}
    with pytest.raises(LoraFormatError, match="components"):
        lora_fast.load_lora_weights(model, LoraAdapter(dict(layers), "diffusers"))
    lora_fast.load_lora_weights(model, LoraAdapter(dict(layers), "diffusers"), components=["unet"], fuse=True)
    assert not torch.equal(model.q.weight, before["q.weight"])
    assert torch.equal(model.k.weight, before["k.weight"])
    lora_fast.unfuse_lora(model)
    assert_bits_equal(model, before)


def test_dora_fuse_matches_peft_formula_and_unfuses_exactly():
    model = toy(torch.float16)
    before = snapshot(model)
    gen = torch.Generator().manual_seed(0)
    adapter = random_adapter(gen, modules=("q",), dtype=torch.float16)
    layer = adapter.layers["q"]
    w = before["q.weight"].float()
    layer.magnitude = (w.double() + delta64(layer)).norm(dim=1).float() * 1.1
    layer.magnitude_axis = "out"
    lora_fast.load_lora_weights(model, adapter)
    lora_fast.fuse_lora(model)
    v = w.double() + delta64(layer)
    ref = v * (layer.magnitude.double() / v.norm(dim=1)).reshape(-1, 1)
    assert torch.allclose(model.q.weight.double(), ref, rtol=2e-3, atol=1e-4)
    lora_fast.unfuse_lora(model)
    assert_bits_equal(model, before)


def test_adapter_name_collision_is_an_error():
    model = toy()
    gen = torch.Generator().manual_seed(0)
    lora_fast.load_lora_weights(model, random_adapter(gen), adapter_name="x")
    with pytest.raises(LoraFormatError, match="already in use"):
        lora_fast.load_lora_weights(model, random_adapter(gen), adapter_name="x")
    assert lora_fast.load_lora_weights(model, random_adapter(gen)) == "default_1"


def test_load_lora_weights_takes_diffusers_weight_name(tmp_path):
    m = torch.nn.Sequential(torch.nn.Linear(6, 5))
    g = torch.Generator().manual_seed(2)
    for name in ("a", "b"):
        LoraAdapter({"0": LoraLayer(torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g), 2.0)},
                    "diffusers").save(tmp_path / f"{name}.safetensors")
    with pytest.raises(LoraFormatError, match="pass weight_name"):
        lora_fast.load_lora_weights(m, tmp_path, "x")
    x = torch.randn(3, 6, generator=g)
    lora_fast.load_lora_weights(m, tmp_path, "b", weight_name="b.safetensors")
    layer = lora_fast.read_lora(tmp_path / "b.safetensors").layers["0"]
    expected = torch.nn.functional.linear(x.double(), m[0].weight.double() + delta64(layer), m[0].bias.double())
    assert torch.allclose(m(x).double(), expected, atol=1e-5)
