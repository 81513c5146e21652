"""Hotswap: new adapter weights in place, zero torch.compile recompilations, clear errors."""

import pytest
import torch
from torch import nn

import lora_fast
from lora_fast import LoraAdapter, LoraFormatError, LoraFusionError, LoraLayer
from lora_fast.engine import component_state


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.b = nn.Linear(32, 8)

    def forward(self, x, img, cross_attention_kwargs=None):
        return self.b(torch.relu(self.a(x))), self.conv(img)


SHAPES = {"a": ((16,), 32, "linear"), "b": ((32,), 8, "linear"), "conv": ((4, 3, 3), 6, "conv")}


def adapter(seed, rank, modules=("a", "b", "conv"), alpha=None):
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for m in modules:
        inner, out, kind = SHAPES[m]
        up = (out, rank, 1, 1) if kind == "conv" else (out, rank)
        layers[m] = LoraLayer(down=torch.randn(rank, *inner, generator=g) * 0.3, up=torch.randn(*up, generator=g) * 0.3,
                              alpha=alpha if alpha is not None else rank * (1 + seed % 3), kind=kind)
    return LoraAdapter(layers, "diffusers")


def net(seed=0):
    torch.manual_seed(seed)
    return Net()


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 16, generator=g), torch.randn(2, 4, 5, 5, generator=g)


def eager_output(ad, weight=1.0):
    m = net()
    lora_fast.load_lora_weights(m, ad, adapter_name="x")
    lora_fast.set_adapters(m, "x", weight)
    with torch.no_grad():
        return m(*data())


class CountingBackend:
    """A torch.compile backend that counts the graphs it is asked to compile (each recompilation is one more)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def test_hotswap_under_compile_runs_new_weights_without_recompiling():
    torch._dynamo.reset()
    model = net()
    lora_fast.load_lora_weights(model, adapter(1, rank=2), adapter_name="x", max_rank=8)
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    x, img = data()
    with torch.no_grad():
        compiled(x, img)
        warm = backend.graphs  # counted from the first call: the second call must not compile again
        compiled(x, img)
        for seed, rank in ((2, 8), (3, 5), (4, 1)):
            lora_fast.load_lora_weights(model, adapter(seed, rank=rank), adapter_name="x", hotswap=True)
            out = compiled(x, img)
            for o, e in zip(out, eager_output(adapter(seed, rank))):
                assert torch.allclose(o, e, atol=1e-5)
        # a hotswapped adapter that leaves a module out contributes nothing there
        lora_fast.load_lora_weights(model, adapter(5, rank=3, modules=("a",)), adapter_name="x", hotswap=True)
        out = compiled(x, img)
        for o, e in zip(out, eager_output(adapter(5, rank=3, modules=("a",)))):
            assert torch.allclose(o, e, atol=1e-5)
        # set_adapters weights are tensors too
        lora_fast.set_adapters(model, "x", 0.25)
        lora_fast.load_lora_weights(model, adapter(6, rank=4), adapter_name="x", hotswap=True)
        out = compiled(x, img)
        for o, e in zip(out, eager_output(adapter(6, rank=4), 0.25)):
            assert torch.allclose(o, e, atol=1e-5)
    assert warm >= 1
    assert backend.graphs == warm, f"recompiled {backend.graphs - warm} times"
    torch._dynamo.reset()


def test_prepare_hotswap_after_loading_pads_existing_adapters():
    model = net()
    lora_fast.load_lora_weights(model, adapter(1, rank=2), adapter_name="x")
    with pytest.raises(LoraFormatError, match="rank 6 exceeds"):
        lora_fast.load_lora_weights(model, adapter(2, rank=6), adapter_name="x", hotswap=True)
    lora_fast.prepare_hotswap(model, max_rank=6)
    lora_fast.load_lora_weights(model, adapter(2, rank=6), adapter_name="x", hotswap=True)
    with torch.no_grad():
        for o, e in zip(model(*data()), eager_output(adapter(2, rank=6))):
            assert torch.allclose(o, e, atol=1e-5)
    # later loads are padded to max_rank as well
    lora_fast.load_lora_weights(model, adapter(3, rank=1), adapter_name="y")
    slot = component_state(model).slot_hooks["y"]["a"].slots["y"]
    assert slot.capacity == 6 and slot.down.shape == (6, 16)


def test_hotswap_errors_change_nothing():
    model = net()
    first = adapter(1, rank=2, modules=("a", "conv"))
    lora_fast.load_lora_weights(model, first, adapter_name="x", max_rank=4)
    with torch.no_grad():
        before = model(*data())
    with pytest.raises(LoraFormatError, match="targets modules the loaded one does not.*b"):
        lora_fast.load_lora_weights(model, adapter(2, rank=2), adapter_name="x", hotswap=True)
    with pytest.raises(LoraFormatError, match="rank 5 exceeds"):
        lora_fast.load_lora_weights(model, adapter(2, rank=5, modules=("a",)), adapter_name="x", hotswap=True)
    with pytest.raises(LoraFormatError, match="no adapter named 'zz'"):
        lora_fast.load_lora_weights(model, adapter(2, rank=2, modules=("a",)), adapter_name="zz", hotswap=True)
    with pytest.raises(LoraFormatError, match="exceeds max_rank"):
        lora_fast.load_lora_weights(model, adapter(2, rank=9, modules=("a",)), adapter_name="big")
    with torch.no_grad():
        for o, b in zip(model(*data()), before):
            assert torch.equal(o, b)
    assert component_state(model).adapters["x"]["a"].layer.down.shape[0] == 2
    lora_fast.fuse_lora(model)
    with pytest.raises(LoraFusionError):
        lora_fast.load_lora_weights(model, adapter(2, rank=2, modules=("a",)), adapter_name="x", hotswap=True)
    lora_fast.unfuse_lora(model)
    # fuse after hotswap fuses the new weights
    second = adapter(7, rank=3, modules=("a", "conv"))
    lora_fast.load_lora_weights(model, second, adapter_name="x", hotswap=True)
    with torch.no_grad():
        live = model(*data())
        lora_fast.fuse_lora(model)
        lora_fast.disable_lora(model)
        fused = model(*data())
    for l, f in zip(live, fused):
        assert torch.allclose(l, f, atol=1e-5)


def test_hotswap_never_writes_into_the_callers_tensors():
    model = net()
    first = adapter(1, rank=3)
    saved = {k: (l.down.clone(), l.up.clone()) for k, l in first.layers.items()}
    lora_fast.load_lora_weights(model, first, adapter_name="x")  # no max_rank: slots alias the caller's tensors
    lora_fast.load_lora_weights(model, adapter(2, rank=3), adapter_name="x", hotswap=True)
    for k, l in first.layers.items():
        assert torch.equal(l.down, saved[k][0]) and torch.equal(l.up, saved[k][1])


# ------------------------------------------------------------------ diffusers: pipe.unet = torch.compile(pipe.unet)


def _pipeline_adapter(pipe, seed, rank, alpha) -> LoraAdapter:
    """Rank-``rank`` layers on the UNet's attention projections, resnet convs and time projections, and on the text
    encoder's attention and MLP (one alpha for all)."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for comp, root, ends in (("unet", pipe.unet, ("to_q", "to_k", "to_v", "to_out.0", "conv1", "time_emb_proj")),
                             ("text_encoder", pipe.text_encoder, ("q_proj", "v_proj", "out_proj", "fc1"))):
        for path, m in root.named_modules():
            if not path.endswith(ends):
                continue
            if isinstance(m, nn.Linear):
                down, up, kind = (rank, m.in_features), (m.out_features, rank), "linear"
            else:
                down, up, kind = (rank, m.in_channels, *m.kernel_size), (m.out_channels, rank, 1, 1), "conv"
            layers[f"{comp}.{path}"] = LoraLayer(down=torch.randn(*down, generator=g) * 0.1,
                                                 up=torch.randn(*up, generator=g) * 0.1, alpha=alpha, kind=kind)
    return LoraAdapter(layers, "diffusers")


def test_compiled_pipeline_unet_compiles_once_across_calls_and_hotswaps(tmp_path):
    """The usual diffusers idiom: load with max_rank, ``pipe.unet = torch.compile(pipe.unet)``, then hotswap through
    the pipeline. Counted from the first compiled call, nothing compiles again (any rank <= max_rank, any alpha)."""
    pytest.importorskip("diffusers")
    import copy

    from lora_fast.models import build_pipeline

    torch._dynamo.reset()
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = build_pipeline("sd15", "tiny", seed=0)
        files = {}
        for seed, rank, alpha in ((0, 4, 4.0), (1, 16, 3.0), (2, 1, 0.5), (3, 7, 14.0)):
            files[seed] = str(tmp_path / f"lora_{seed}.safetensors")
            _pipeline_adapter(base, seed, rank, alpha).save(files[seed], format="diffusers")
        g = torch.Generator().manual_seed(0)
        inputs = (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([10]),
                  torch.randn(1, 5, base.unet.config.cross_attention_dim, generator=g))
        ids = torch.randint(3, 900, (1, 7), generator=g)

        def eager(seed, weight=1.0):
            ref = copy.deepcopy(base)
            lora_fast.load_lora_weights(ref, files[seed], adapter_name="style")
            lora_fast.set_adapters(ref, "style", weight)
            return ref.unet(*inputs).sample, ref.text_encoder(ids).last_hidden_state

        pipe = copy.deepcopy(base)
        lora_fast.load_lora_weights(pipe, files[0], adapter_name="style", max_rank=16)
        backend = CountingBackend()
        pipe.unet = torch.compile(pipe.unet, backend=backend)
        assert isinstance(pipe.unet, torch._dynamo.eval_frame.OptimizedModule)
        with torch.no_grad():
            base_out = base.unet(*inputs).sample
            out = pipe.unet(*inputs).sample
            first = backend.graphs
            assert first >= 1
            torch.testing.assert_close(out, eager(0)[0], rtol=1e-4, atol=1e-5)
            assert (out - base_out).abs().max() > 1e-3  # the adapter runs inside the compiled model
            assert torch.equal(pipe.unet(*inputs).sample, out)
            assert backend.graphs == first, "the second call compiled again"
            for seed in (1, 2, 3):
                lora_fast.load_lora_weights(pipe, files[seed], adapter_name="style", hotswap=True)
                unet_ref, te_ref = eager(seed)
                torch.testing.assert_close(pipe.unet(*inputs).sample, unet_ref, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(pipe.text_encoder(ids).last_hidden_state, te_ref, rtol=1e-4, atol=1e-5)
            lora_fast.set_adapters(pipe, "style", 0.3)  # weights are tensor data as well
            torch.testing.assert_close(pipe.unet(*inputs).sample, eager(3, 0.3)[0], rtol=1e-4, atol=1e-5)
        assert backend.graphs == first, f"compiled {backend.graphs - first} more graphs after the first call"
        assert lora_fast.get_list_adapters(pipe) == {"unet": ["style"], "text_encoder": ["style"]}
    finally:
        torch.set_num_threads(n_threads)
        torch._dynamo.reset()
