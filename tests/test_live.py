"""Live (unfused) adapters: forward vs a float64 first-principles reference, adapter control, exact unload."""

import copy

import pytest
import torch
from torch import nn

import lora_fast
from lora_fast import LoraAdapter, LoraFormatError, LoraFusionError, LoraLayer
from lora_fast.engine import component_state
from lora_reference import delta64, scale_of


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(24, 40)
        self.k = nn.Linear(24, 17, bias=False)
        self.conv = nn.Conv2d(6, 10, 3, stride=2, padding=1, dilation=1)
        self.dil = nn.Conv2d(6, 8, 3, padding=2, dilation=2, padding_mode="reflect")
        self.pw = nn.Conv2d(10, 12, 1)
        self.emb = nn.Embedding(11, 9, padding_idx=0)

    def forward(self, x, img, idx, cross_attention_kwargs=None):
        return (self.q(x), self.k(x), self.pw(self.conv(img)), self.dil(img), self.emb(idx))


SHAPES = {
    "q": ("linear", lambda r: (r, 24), (40,)),
    "k": ("linear", lambda r: (r, 24), (17,)),
    "conv": ("conv", lambda r: (r, 6, 3, 3), (10,)),
    "dil": ("conv", lambda r: (r, 6, 3, 3), (8,)),
    "pw": ("conv", lambda r: (r, 10, 1, 1), (12,)),
    "emb": ("embedding", lambda r: (r, 11), (9,)),
}
ALL = tuple(SHAPES)


def toy(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return Toy().to(dtype)


def inputs(seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(3, 5, 24, generator=g).to(dtype), torch.randn(2, 6, 9, 9, generator=g).to(dtype),
            torch.randint(0, 11, (4, 3), generator=g))


def random_adapter(seed, rank=4, modules=ALL, alpha=None, scale=0.3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for m in modules:
        kind, down_shape, out = SHAPES[m]
        down = torch.randn(*down_shape(rank), generator=g) * scale
        up_shape = (out[0], rank, 1, 1) if kind == "conv" else (out[0], rank)
        up = torch.randn(*up_shape, generator=g) * scale
        layers[m] = LoraLayer(down=down.to(dtype), up=up.to(dtype), kind=kind,
                              alpha=alpha if alpha is not None else 1.5 * rank)
    return LoraAdapter(layers, "diffusers")


def reference(clean, terms, *args):
    """Forward of a float64 copy of a clean (adapter-free) model with weights W + Σ f·ΔW (ΔW in float64, lora_reference)."""
    ref = copy.deepcopy(clean).double()
    with torch.no_grad():
        for adapter, factor in terms:
            for path, layer in adapter.layers.items():
                mod = ref.get_submodule(path)
                mod.weight += factor * delta64(layer).reshape(mod.weight.shape)
                if layer.bias is not None:
                    mod.bias += factor * scale_of(layer) * layer.bias.double()
    x, img, idx = args
    return ref(x.double(), img.double(), idx)


def assert_close(outs, refs, tol=1e-5):
    for o, r in zip(outs, refs):
        scale = r.abs().max().item() + 1e-12
        assert (o.double() - r).abs().max().item() <= tol * max(1.0, scale), (o.double() - r).abs().max()


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def hook_dicts(model):
    out = {}
    for name, m in model.named_modules():
        out[name] = {k: dict(v) for k, v in vars(m).items() if k.startswith("_") and "hook" in k and isinstance(v, dict)}
        out[name]["__keys__"] = sorted(vars(m))
    return out


def test_live_forward_every_kind_matches_float64_reference():
    model = toy()
    args = inputs()
    base = model(*args)
    a = random_adapter(1)
    lora_fast.load_lora_weights(model, a, adapter_name="a")
    out = model(*args)
    assert_close(out, reference(toy(), [(a, 1.0)], *args))
    assert all((o - b).abs().max() > 1e-3 for o, b in zip(out, base))  # every module really changed


def test_loading_activates_only_the_new_adapter_and_set_adapters_mixes():
    model = toy()
    args = inputs()
    a, b = random_adapter(1), random_adapter(2, rank=3, modules=("q", "conv", "emb"))
    lora_fast.load_lora_weights(model, a, adapter_name="a")
    lora_fast.load_lora_weights(model, b, adapter_name="b")
    assert lora_fast.get_active_adapters(model) == ["b"]
    assert lora_fast.get_list_adapters(model) == {None: ["a", "b"]}
    assert_close(model(*args), reference(toy(), [(b, 1.0)], *args))
    lora_fast.set_adapters(model, ["a", "b"], [0.7, -1.3])
    assert lora_fast.get_active_adapters(model) == ["a", "b"]
    assert_close(model(*args), reference(toy(), [(a, 0.7), (b, -1.3)], *args))
    lora_fast.set_adapters(model, "a")
    assert_close(model(*args), reference(toy(), [(a, 1.0)], *args))
    with pytest.raises(LoraFormatError, match="nope"):
        lora_fast.set_adapters(model, ["a", "nope"])
    with pytest.raises(LoraFormatError, match="weights"):
        lora_fast.set_adapters(model, ["a", "b"], [1.0])


def test_per_call_scale_multiplies_and_zero_turns_off():
    model = toy()
    args = inputs()
    base = model(*args)
    a = random_adapter(1)
    lora_fast.load_lora_weights(model, a, adapter_name="a")
    lora_fast.set_adapters(model, "a", 0.5)
    scaled = model(*args, cross_attention_kwargs={"scale": 0.4})
    assert_close(scaled, reference(toy(), [(a, 0.2)], *args))
    # positional too, and the set_adapters weight survives the call
    assert_close(model(*args, {"scale": 0.4}), reference(toy(), [(a, 0.2)], *args))
    assert_close(model(*args), reference(toy(), [(a, 0.5)], *args))
    zero = model(*args, cross_attention_kwargs={"scale": 0.0})
    for z, b in zip(zero, base):
        assert torch.equal(z, b)


def test_enable_disable_delete_and_unload_leave_no_trace():
    model = toy(torch.bfloat16)
    before, hooks_before = snapshot(model), hook_dicts(model)
    args = inputs(dtype=torch.bfloat16)
    base = model(*args)
    lora_fast.load_lora_weights(model, random_adapter(1, dtype=torch.bfloat16), adapter_name="a")
    lora_fast.load_lora_weights(model, random_adapter(2), adapter_name="b")  # float32 file on a bf16 model
    lora_fast.set_adapters(model, ["a", "b"])
    assert not torch.equal(model(*args)[0], base[0])
    lora_fast.disable_lora(model)
    assert all(torch.equal(o, b) for o, b in zip(model(*args), base))
    lora_fast.enable_lora(model)
    assert not torch.equal(model(*args)[0], base[0])
    lora_fast.delete_adapters(model, ["a"])
    assert lora_fast.get_list_adapters(model) == {None: ["b"]}
    lora_fast.delete_adapters(model, "b")
    assert component_state(model) is None
    assert hook_dicts(model) == hooks_before
    lora_fast.load_lora_weights(model, random_adapter(3), adapter_name="c")
    lora_fast.unload_lora_weights(model)
    assert hook_dicts(model) == hooks_before
    assert set(model.state_dict()) == set(before)
    for k, v in model.state_dict().items():
        assert torch.equal(v.view(torch.uint8) if v.dtype != torch.int64 else v, before[k].view(torch.uint8) if v.dtype != torch.int64 else before[k])
    assert all(torch.equal(o, b) for o, b in zip(model(*args), base))


def test_fuse_on_top_of_live_adapters_is_not_applied_twice():
    model = toy()
    args = inputs()
    a, b = random_adapter(1), random_adapter(2, modules=("q", "pw"))
    lora_fast.load_lora_weights(model, a, adapter_name="a")
    lora_fast.load_lora_weights(model, b, adapter_name="b")
    lora_fast.set_adapters(model, ["a", "b"], [0.5, 2.0])
    live = model(*args)
    lora_fast.fuse_lora(model, adapter_names=["a"])  # fused at its set_adapters weight, b stays live
    assert_close(model(*args), reference(toy(), [(a, 0.5), (b, 2.0)], *args), tol=2e-5)
    assert_close(model(*args), [o.double() for o in live], tol=2e-5)
    with pytest.raises(LoraFusionError):
        lora_fast.delete_adapters(model, ["a"])
    with pytest.raises(LoraFusionError):
        lora_fast.set_lora_device(model, ["a"], "meta")
    with pytest.raises(LoraFusionError):
        lora_fast.load_lora_weights(model, random_adapter(5), adapter_name="a", hotswap=True)
    lora_fast.unfuse_lora(model)
    for o, l in zip(model(*args), live):
        assert torch.equal(o, l)  # exact unfuse + same live path: identical outputs
    lora_fast.fuse_lora(model)
    fused = model(*args)
    lora_fast.unload_lora_weights(model)  # fused weights stay baked in, the live terms are gone
    for o, f in zip(model(*args), fused):
        assert torch.equal(o, f)


def test_lora_bias_tucker_and_fan_in_fan_out():
    from transformers.pytorch_utils import Conv1D

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 6)
            self.conv = nn.Conv2d(4, 5, 3, padding=1)
            self.c1d = Conv1D(7, 8)  # weight (in=8, out=7)

        def forward(self, x, img):
            return self.lin(x), self.conv(img), self.c1d(x)

    torch.manual_seed(0)
    model = M()
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g) * 0.4  # noqa: E731
    layers = {
        "lin": LoraLayer(down=r(3, 8), up=r(6, 3), alpha=2.0, bias=r(6)),
        "conv": LoraLayer(down=r(2, 4, 1, 1), up=r(5, 3, 1, 1), mid=r(3, 2, 3, 3), alpha=1.0, kind="conv"),
        "c1d": LoraLayer(down=r(2, 8), up=r(7, 2), alpha=4.0, fan_in_fan_out=True),
    }
    adapter = LoraAdapter(layers, "diffusers")
    x, img = r(2, 8), r(1, 4, 6, 6)
    lora_fast.load_lora_weights(model, adapter)
    lora_fast.set_adapters(model, "default_0", 0.6)
    out = model(x, img)
    ref = copy.deepcopy(model).double()
    lora_fast.unload_lora_weights(ref)
    with torch.no_grad():
        for p, layer in layers.items():
            mod = ref.get_submodule(p)
            mod.weight += 0.6 * delta64(layer).reshape(mod.weight.shape)
            if layer.bias is not None:
                mod.bias += 0.6 * scale_of(layer) * layer.bias.double()
    for o, rr in zip(out, ref(x.double(), img.double())):
        assert torch.allclose(o.double(), rr, atol=1e-5)
    lora_fast.fuse_lora(model)
    for o, f in zip(out, model(x, img)):
        assert torch.allclose(o, f, atol=1e-5)


def with_dora_magnitudes(model, adapter, axis, gen):
    """Give every layer of ``adapter`` a random DoRA magnitude along ``axis`` ("out" or "in") of its target weight."""
    for path, layer in adapter.layers.items():
        w = model.get_submodule(path).weight
        n = w.shape[0] if axis == "out" else w.shape[1]
        shape = (n,) if axis == "out" else ((1, n) if w.dim() == 2 else (1, n, 1, 1))
        layer.magnitude = (torch.rand(n, generator=gen) + 0.5).reshape(shape)
        layer.magnitude_axis = axis
    return adapter


@pytest.mark.parametrize("axis", ["out", "in"])
def test_dora_live_matches_the_fused_formula(axis):
    model = toy()
    args = inputs()
    a = with_dora_magnitudes(model, random_adapter(1, modules=("q", "conv", "pw", "k")), axis,
                             torch.Generator().manual_seed(9))
    lora_fast.load_lora_weights(model, a, adapter_name="d")
    for weight, lam in ((1.0, 1.0), (0.6, 1.0), (0.6, 0.3)):
        lora_fast.set_adapters(model, "d", weight)
        live = model(*args, cross_attention_kwargs={"scale": lam})
        lora_fast.fuse_lora(model, lora_scale=lam)  # lora_fast's fuse formula, itself tested against PEFT
        fused = model(*args)
        lora_fast.unfuse_lora(model)
        assert_close(live, [f.double() for f in fused], tol=1e-5)
    # the delta is really there (not an identity)
    lora_fast.disable_lora(model)
    off = model(*args)
    assert (off[0] - live[0]).abs().max() > 1e-3


def test_dora_on_embedding_uses_the_dense_fallback():
    model = toy()
    args = inputs()
    a = random_adapter(1, modules=("emb",))
    layer = a.layers["emb"]
    layer.magnitude = torch.rand(11) + 0.5  # one per row of the (num, dim) weight
    lora_fast.load_lora_weights(model, a)
    live = model(*args)[4]
    lora_fast.fuse_lora(model)
    assert torch.allclose(live, model(*args)[4], atol=1e-5)


def test_adapters_follow_the_model_dtype_and_park_on_another_device():
    model = toy()
    args = inputs()
    a = random_adapter(1)
    lora_fast.load_lora_weights(model, a, adapter_name="a")
    lora_fast.load_lora_weights(model, random_adapter(2), adapter_name="b")
    lora_fast.set_adapters(model, ["a", "b"], [1.0, 0.0])
    model.double()  # the model changes dtype after loading: unparked adapters follow it
    out = model(*[t.double() if t.is_floating_point() else t for t in args])
    assert out[0].dtype == torch.float64
    ref = reference(toy(), [(a, 1.0)], *args)
    assert_close(out, ref, tol=1e-9)
    model.float()
    before = snapshot(model)
    lora_fast.set_lora_device(model, ["a"], "meta")  # parked off the model's device: unused, nothing else moved
    out = model(*args)
    assert_close(out, [o.double() for o in toy()(*args)], tol=1e-6)
    for k, v in model.state_dict().items():
        assert v.device.type == "cpu" and torch.equal(v, before[k])


@pytest.mark.cuda
def test_set_lora_device_round_trip_on_gpu():
    model = toy().cuda()
    args = [t.cuda() for t in inputs()]
    a = random_adapter(1)
    lora_fast.load_lora_weights(model, a, adapter_name="a")
    live = model(*args)
    lora_fast.set_lora_device(model, ["a"], "cpu")
    base = toy().cuda()(*args)
    for o, b in zip(model(*args), base):
        assert torch.equal(o, b)
    lora_fast.set_lora_device(model, ["a"], "cuda")
    for o, l in zip(model(*args), live):
        assert torch.equal(o, l)


def test_dict_weights_per_component():
    comps = {"unet": toy(seed=0), "text_encoder": toy(seed=1)}
    args = inputs()
    a = random_adapter(1)
    layers = {f"unet.{k}": v for k, v in a.layers.items()}
    layers.update({f"text_encoder.{k}": v for k, v in a.layers.items()})
    lora_fast.load_lora_weights(comps, LoraAdapter(layers, "diffusers"), adapter_name="a")
    assert lora_fast.get_list_adapters(comps) == {"unet": ["a"], "text_encoder": ["a"]}
    lora_fast.set_adapters(comps, ["a"], [{"unet": 0.5}])  # text_encoder not named: 1.0, as in diffusers
    assert_close(comps["unet"](*args), reference(toy(seed=0), [(a, 0.5)], *args))
    assert_close(comps["text_encoder"](*args), reference(toy(seed=1), [(a, 1.0)], *args))
    lora_fast.set_adapters(comps, "a", {"unet": 0.25, "text_encoder": -1.0})
    assert_close(comps["unet"](*args), reference(toy(seed=0), [(a, 0.25)], *args))
    assert_close(comps["text_encoder"](*args), reference(toy(seed=1), [(a, -1.0)], *args))
    with pytest.raises(LoraFormatError, match="per-block"):
        lora_fast.set_adapters(comps, "a", {"unet": {"down": 1.0}})


def test_peft_layers_in_the_target_are_refused():
    peft = pytest.importorskip("peft")
    model = toy()
    peft.inject_adapter_in_model(peft.LoraConfig(target_modules=["q"]), model)
    with pytest.raises(LoraFormatError, match="PEFT"):
        lora_fast.load_lora_weights(model, random_adapter(1, modules=("k",)))
    assert component_state(model) is None


def test_loading_allocates_nothing_for_matching_dtypes():
    model = toy()
    a = random_adapter(1, modules=("q", "pw"))
    lora_fast.load_lora_weights(model, a)
    state = component_state(model)
    slot_q = state.slot_hooks["default_0"]["q"].slots["default_0"]
    assert slot_q.down.data_ptr() == a.layers["q"].down.data_ptr()
    assert slot_q.up.data_ptr() == a.layers["q"].up.data_ptr()


@pytest.mark.parametrize("wrap", ["compile", "data_parallel", "compile_of_data_parallel"])
def test_wrapped_modules_are_seen_through_by_every_call(wrap):
    """torch.compile's OptimizedModule (``_orig_mod``) and DataParallel (``module``) resolve to the module they wrap:
    as a target, inside a {component: module} dict, for every call. The wrapper itself is never called here."""
    model = toy()
    args = inputs()
    base = model(*args)
    make = {"compile": torch.compile, "data_parallel": nn.DataParallel,
            "compile_of_data_parallel": lambda m: torch.compile(nn.DataParallel(m))}[wrap]
    wrapped = make(model)
    assert wrapped is not model
    a, b, c = random_adapter(1, rank=2), random_adapter(2, rank=3, modules=("q", "pw")), random_adapter(3, rank=4)
    lora_fast.load_lora_weights(wrapped, a, adapter_name="a", max_rank=4)
    lora_fast.load_lora_weights({"unet": wrapped}, b, adapter_name="b", components=["unet"])
    assert component_state(model) is not None and component_state(wrapped) is None
    assert lora_fast.get_list_adapters(wrapped) == {None: ["a", "b"]}
    assert lora_fast.get_list_adapters({"unet": wrapped}) == {"unet": ["a", "b"]}
    lora_fast.set_adapters(wrapped, ["a", "b"], [0.5, 2.0])
    assert lora_fast.get_active_adapters(wrapped) == ["a", "b"]
    assert_close(model(*args), reference(toy(), [(a, 0.5), (b, 2.0)], *args))
    lora_fast.disable_lora(wrapped)
    assert all(torch.equal(o, r) for o, r in zip(model(*args), base))
    lora_fast.enable_lora(wrapped)
    lora_fast.load_lora_weights(wrapped, c, adapter_name="a", hotswap=True)
    assert_close(model(*args), reference(toy(), [(c, 0.5), (b, 2.0)], *args))
    lora_fast.prepare_hotswap({"unet": wrapped}, max_rank=6)
    assert component_state(model).max_rank == 6
    lora_fast.set_lora_device(wrapped, ["b"], "cpu")
    with lora_fast.per_sample_adapters(wrapped, ["b"]):
        assert_close(model(*args), reference(toy(), [(b, 1.0)], *args))
    live = model(*args)
    before = snapshot(model)
    lora_fast.fuse_lora(wrapped, adapter_names=["a"], lora_scale=2.0)  # x its weight 0.5: fused at 1.0
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert_close(model(*args), reference(toy(), [(c, 1.0), (b, 2.0)], *args), tol=2e-5)
    lora_fast.unfuse_lora({"unet": wrapped})
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(o, r) for o, r in zip(model(*args), live))
    lora_fast.delete_adapters(wrapped, "b")
    assert lora_fast.get_list_adapters(wrapped) == {None: ["a"]}
    lora_fast.unload_lora_weights(wrapped)
    assert component_state(model) is None
    assert all(torch.equal(o, r) for o, r in zip(model(*args), base))
