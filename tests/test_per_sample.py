"""per_sample_adapters: every sample of one batch runs its own adapter (or mix), as if run alone."""

import os
import subprocess
import sys
import textwrap

import pytest
from triton_support import interpretable_segmented_kernels
import torch
from torch import nn

import lora_fast
from lora_fast import LoraAdapter, LoraFormatError, LoraFusionError, LoraLayer
from lora_fast.engine import component_state

from test_hotswap import CountingBackend
from lora_reference import scale_of
from test_live import random_adapter, toy

ENTRIES = ["a", None, {"b": 0.5, "c": 1.5}, "c", {"a": -1.0}]


def toy_inputs(batch, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 5, 24, generator=g).to(dtype), torch.randn(batch, 6, 9, 9, generator=g).to(dtype),
            torch.randint(0, 11, (batch, 3), generator=g))


def toy_with_adapters(dtype=torch.float32, **kw):
    m = toy(dtype)
    for i, name in enumerate("abc"):
        adapter = random_adapter(10 + i, rank=2 + 3 * i, dtype=dtype, scale=0.1, **kw)
        lora_fast.load_lora_weights(m, adapter, name)
    return m


def select(target, entry, components=None):
    """Make ``entry`` the live adapter selection, as a user running that sample alone would."""
    if entry is None:
        lora_fast.disable_lora(target)
        return
    lora_fast.enable_lora(target)
    if isinstance(entry, str):
        lora_fast.set_adapters(target, [entry])
    else:
        lora_fast.set_adapters(target, list(entry), list(entry.values()))


def alone(model, entries, args, *, row_dim=0):
    """Sample j run by itself with entry j mod n selected: the per-sample loop reference."""
    batch = args[0].shape[0]
    outs = []
    for j in range(batch):
        select(model, entries[j % len(entries)])
        outs.append(model(*(a[j:j + 1] for a in args)))
    lora_fast.enable_lora(model)
    return [torch.cat(parts) for parts in zip(*outs)]


def rel_max(out, ref):
    """Per row (sample): max abs error / max abs reference; the worst row."""
    o, r = out.double().flatten(1), ref.double().flatten(1)
    return ((o - r).abs().amax(1) / r.abs().amax(1).clamp_min(1e-30)).max().item()


def l2_rel(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@torch.no_grad()
def test_every_sample_matches_its_single_adapter_run_fp32():
    m = toy_with_adapters()
    args = toy_inputs(10)  # two blocks of the 5 entries (the classifier-free-guidance layout)
    with lora_fast.per_sample_adapters(m, ENTRIES):
        outs = m(*args)
    refs = alone(m, ENTRIES, args)
    for o, r in zip(outs, refs):  # q/k: kernel path, convs and embedding: per-adapter path
        assert rel_max(o, r) <= 1e-5
    # rows of base-only samples (entry 1) are the base output bit for bit
    lora_fast.disable_lora(m)
    base = m(*args)
    for o, b in zip(outs, base):
        assert torch.equal(o[1], b[1]) and torch.equal(o[6], b[6])
        assert not torch.equal(o[0], b[0])


@torch.no_grad()
def test_every_sample_covered_takes_the_batched_paths_and_matches():
    """No base-only sample: linear layers and the 1x1 conv run one batched product over the samples per pass."""
    m = toy_with_adapters()
    entries = ["c", "a", "b"]
    args = toy_inputs(6)
    with lora_fast.per_sample_adapters(m, entries):
        outs = m(*args)
    for o, r in zip(outs, alone(m, entries, args)):
        assert rel_max(o, r) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@torch.no_grad()
def test_16bit_layers_within_punica_tolerance_of_fp32_lora_terms(dtype):
    """Per LoRA layer: L2-relative error <= 5e-3 vs the base output plus the LoRA terms computed in fp32."""
    m = toy_with_adapters(dtype, modules=("q", "k"))
    args = toy_inputs(10, dtype=dtype)
    x = args[0]
    with lora_fast.per_sample_adapters(m, ENTRIES):
        q, k = m(*args)[:2]
    lora_fast.disable_lora(m)
    base_q, base_k = m(*args)[:2]
    lora_fast.enable_lora(m)
    state = component_state(m)
    for out, base, path in ((q, base_q, "q"), (k, base_k, "k")):
        ref = base.double().clone()
        for j in range(x.shape[0]):
            entry = ENTRIES[j % len(ENTRIES)]
            mix = {} if entry is None else ({entry: 1.0} if isinstance(entry, str) else entry)
            for name, w in mix.items():
                layer = state.adapters[name][path].layer
                ref[j] += w * scale_of(layer) * (x[j].double() @ layer.down.double().t()) @ layer.up.double().t()
        assert l2_rel(out, ref) <= 5e-3, path


@torch.no_grad()
def test_per_call_scale_and_disable_apply_inside_the_block():
    m = toy_with_adapters()
    args = toy_inputs(5)
    with lora_fast.per_sample_adapters(m, ENTRIES):
        full = m(*args)
        half = m(*args, cross_attention_kwargs={"scale": 0.5})
        lora_fast.disable_lora(m)
        off = m(*args)
        lora_fast.enable_lora(m)
    lora_fast.disable_lora(m)
    base = m(*args)
    lora_fast.enable_lora(m)
    for f, h, o, b in zip(full[:2], half[:2], off[:2], base[:2]):
        assert torch.equal(o, b)
        assert (h.double() - (b.double() + 0.5 * (f.double() - b.double()))).abs().max() <= 1e-5


@torch.no_grad()
def test_leaving_the_block_restores_the_previous_selection_exactly():
    m = toy_with_adapters()
    lora_fast.set_adapters(m, ["a", "b"], [0.3, 0.7])
    args = toy_inputs(4)
    before = m(*args)
    weights = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"):
        with lora_fast.per_sample_adapters(m, ENTRIES):
            raise RuntimeError("boom")
    with lora_fast.per_sample_adapters(m, ["c"]):
        with lora_fast.per_sample_adapters(m, ["a", "b"]):  # nested: the inner block wins, then the outer returns
            inner = m(*args)
        outer = m(*args)
    after = m(*args)
    for x, y in zip(before, after):
        assert torch.equal(x, y)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in weights.items())
    assert lora_fast.get_active_adapters(m) == ["a", "b"] and component_state(m).per_sample is None
    lora_fast.set_adapters(m, ["c"])
    for x, y in zip(outer, m(*args)):  # the outer block was back in force for its last forward
        assert rel_max(x, y) <= 1e-5
    refs = alone(m, ["a", "b"], args)
    assert rel_max(inner[0], refs[0]) <= 1e-5


def test_batch_not_a_multiple_of_the_entries_names_the_layer():
    m = toy_with_adapters()
    args = toy_inputs(4)
    with lora_fast.per_sample_adapters(m, ["a", "b", "c"]):
        with pytest.raises(ValueError, match=r"q .*batch of 4.*3 per-sample entries"):
            m(*args)
    sd = {"unet": m}
    with lora_fast.per_sample_adapters(sd, ["a", "b", "c"]):
        with pytest.raises(LoraFormatError, match=r"unet\.q .*component unet"):
            m(*args)


def test_bad_entries_unknown_names_and_components_are_refused():
    m = toy_with_adapters()
    for bad in ("a", {"a": 1.0}, [], [3], [{"a": "x"}], [{"a": float("nan")}], [{1: 1.0}]):
        with pytest.raises(LoraFormatError):
            with lora_fast.per_sample_adapters(m, bad):
                pass
    with pytest.raises(LoraFormatError, match="nope"):
        with lora_fast.per_sample_adapters(m, ["a", "nope"]):
            pass
    with pytest.raises(LoraFormatError, match="text_encoder"):
        with lora_fast.per_sample_adapters({"unet": m}, ["a"], components=["text_encoder"]):
            pass
    assert component_state(m).per_sample is None


def test_fused_adapters_are_refused_and_fuse_inside_the_block_too():
    m = toy_with_adapters()
    lora_fast.fuse_lora(m, adapter_names=["a"])
    with pytest.raises(LoraFusionError, match="unfuse_lora"):
        with lora_fast.per_sample_adapters(m, ["b", "c"]):
            pass
    lora_fast.unfuse_lora(m)
    w = m.q.weight.clone()
    with lora_fast.per_sample_adapters(m, ["b", "c"]):
        with pytest.raises(LoraFusionError, match="per_sample_adapters"):
            lora_fast.fuse_lora(m, adapter_names=["a"])
        assert torch.equal(m.q.weight, w)
    lora_fast.fuse_lora(m, adapter_names=["a"])  # fine again after the block
    lora_fast.unfuse_lora(m)
    assert torch.equal(m.q.weight, w)


@torch.no_grad()
def test_components_limit_per_sample_to_the_denoiser():
    unet, te = toy_with_adapters(), toy_with_adapters()
    target = {"unet": unet, "text_encoder": te}
    lora_fast.set_adapters(target, ["b"])
    args = toy_inputs(5)
    te_before = te(*args)
    with lora_fast.per_sample_adapters(target, ENTRIES, components=["unet"]):
        te_inside = te(*args)
        unet_inside = unet(*args)
    for x, y in zip(te_before, te_inside):
        assert torch.equal(x, y)  # the text encoder keeps its set_adapters selection
    refs = alone(unet, ENTRIES, args)
    assert rel_max(unet_inside[0], refs[0]) <= 1e-5


@torch.no_grad()
def test_dora_and_lora_bias_take_the_per_adapter_path_and_match():
    m = toy(torch.float32)
    g = torch.Generator().manual_seed(3)
    for i, name in enumerate(("dora", "bias")):
        layers = {}
        for path, (n_out, n_in) in (("q", (40, 24)), ("k", (17, 24))):
            layer = LoraLayer(down=torch.randn(3, n_in, generator=g) * 0.1, up=torch.randn(n_out, 3, generator=g) * 0.1,
                              kind="linear", alpha=3.0)
            if name == "dora":
                layer.magnitude = torch.rand(n_out, generator=g) + 0.5
                layer.magnitude_axis = "out"
            else:
                layer.bias = torch.randn(n_out, generator=g) * 0.1
            layers[path] = layer
        lora_fast.load_lora_weights(m, LoraAdapter(layers, "diffusers"), name)
    entries = ["dora", {"bias": 0.5, "dora": 2.0}, None]
    args = toy_inputs(6)
    with lora_fast.per_sample_adapters(m, entries):
        outs = m(*args)
    refs = alone(m, entries, args)
    for o, r in zip(outs[:2], refs[:2]):
        assert rel_max(o, r) <= 1e-5


def test_autograd_flows_through_per_sample_terms():
    m = toy_with_adapters()
    args = toy_inputs(5)
    x = args[0].clone().requires_grad_(True)
    with lora_fast.per_sample_adapters(m, ENTRIES):
        q = m(x, *args[1:])[0]
    q.square().sum().backward()
    grad = x.grad.clone()
    ref = torch.zeros_like(grad)
    for j in range(5):
        select(m, ENTRIES[j])
        xj = args[0][j:j + 1].clone().requires_grad_(True)
        m(xj, *(a[j:j + 1] for a in args[1:]))[0].square().sum().backward()
        ref[j] = xj.grad[0]
    lora_fast.enable_lora(m)
    assert rel_max(grad, ref) <= 1e-5


@torch.no_grad()
def test_hotswap_inside_the_block_uses_the_new_weights():
    m = toy_with_adapters()
    args = toy_inputs(5)
    new_a = random_adapter(99, rank=2, scale=0.1)
    with lora_fast.per_sample_adapters(m, ENTRIES):
        m(*args)
        lora_fast.load_lora_weights(m, new_a, "a", hotswap=True)
        outs = m(*args)
    refs = alone(m, ENTRIES, args)
    for o, r in zip(outs, refs):
        assert rel_max(o, r) <= 1e-5


@torch.no_grad()
def test_later_blocks_reuse_the_per_layer_kernel_data(monkeypatch):
    """A server enters a block per request: the per-layer kernel tables are built once, and set_adapters /
    enable / disable between blocks (selection-only changes) do not throw them away; loading an adapter does."""
    import lora_fast.live as L  # per_sample builds its tables with live.slot_groups

    built = []
    real = L.make_groups
    monkeypatch.setattr(L, "make_groups", lambda *a, **k: built.append(1) or real(*a, **k))
    m = toy_with_adapters(modules=("q", "k"))
    args = toy_inputs(6)
    with lora_fast.per_sample_adapters(m, ["a", "b", "c"]):
        first = m(*args)
    assert len(built) == 2  # q and k
    lora_fast.set_adapters(m, ["b"])
    lora_fast.disable_lora(m)
    lora_fast.enable_lora(m)
    with lora_fast.per_sample_adapters(m, ["c", None, {"a": 0.5, "b": 0.5}]):
        m(*args)
    with lora_fast.per_sample_adapters(m, ["a", "b", "c"]):
        again = m(*args)
    assert len(built) == 2
    for x, y in zip(first, again):
        assert torch.equal(x, y)
    lora_fast.load_lora_weights(m, random_adapter(40, rank=3, scale=0.1, modules=("q",)), "d")
    with lora_fast.per_sample_adapters(m, ["a", "d"]):
        out = m(*args)
    assert len(built) == 4
    for o, r in zip(out, alone(m, ["a", "d"], args)):
        assert rel_max(o, r) <= 1e-5


@torch.no_grad()
def test_blocks_under_torch_compile_run_eagerly_and_never_recompile():
    """The per-sample branch is excluded from tracing and entering a block flips one bool, so once a compiled model
    has run each mode, further blocks (with any entries) and plain calls compile nothing new."""
    torch._dynamo.reset()
    m = toy_with_adapters()
    args = toy_inputs(10)
    other = ["c", "a"]
    expected = {"main": alone(m, ENTRIES, args), "other": alone(m, other, args)}  # eager; changes the selection
    lora_fast.set_adapters(m, ["c"])
    backend = CountingBackend()
    compiled = torch.compile(m, backend=backend)
    plain = compiled(*args)
    compiled(*args)  # the first call's lazy plan build may cost one extra graph
    with lora_fast.per_sample_adapters(m, ENTRIES):
        compiled(*args)
    compiled(*args)  # back in plain mode once: the hook frames compiled standalone get their plain variant
    warm = backend.graphs
    for key, entries in (("main", ENTRIES), ("other", other), ("main", ENTRIES)):
        with lora_fast.per_sample_adapters(m, entries):
            outs = compiled(*args)
        for o, r in zip(outs, expected[key]):
            assert rel_max(o, r) <= 1e-5
        again = compiled(*args)
        for a, b in zip(plain, again):
            assert torch.equal(a, b)
    assert backend.graphs == warm, f"recompiled {backend.graphs - warm} times"
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------- real models


def attention_adapter(root: nn.Module, seed: int, rank: int = 4, convs: bool = True) -> LoraAdapter:
    """A random adapter on every attention projection (and, with convs, the 1x1 proj_in/out and resnet conv1)."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, mod in root.named_modules():
        leaf = name.rsplit(".", 2)
        if isinstance(mod, nn.Linear) and (name.endswith(("to_q", "to_k", "to_v", "to_out.0"))):
            layers[name] = LoraLayer(down=torch.randn(rank, mod.in_features, generator=g) * 0.05,
                                     up=torch.randn(mod.out_features, rank, generator=g) * 0.05, kind="linear",
                                     alpha=float(rank))
        elif convs and isinstance(mod, nn.Conv2d) and leaf[-1] in ("proj_in", "proj_out", "conv1"):
            o, i, kh, kw = mod.weight.shape
            layers[name] = LoraLayer(down=torch.randn(rank, i, kh, kw, generator=g) * 0.05,
                                     up=torch.randn(o, rank, 1, 1, generator=g) * 0.05, kind="conv", alpha=float(rank))
    return LoraAdapter(layers, "diffusers")


@torch.no_grad()
def test_tiny_sd15_unet_cfg_batch_matches_single_adapter_runs(sd15):
    unet = sd15["unet"]
    names = ["a", "b", "c"]
    for i, n in enumerate(names):
        lora_fast.load_lora_weights(unet, attention_adapter(unet, 20 + i), n)
    entries = ["a", None, "c", {"a": 0.5, "b": 0.5}]
    g = torch.Generator().manual_seed(0)
    cfg = unet.config
    n = len(entries)
    latents = torch.randn(n, cfg.in_channels, 16, 16, generator=g)
    text = torch.randn(2 * n, 7, cfg.cross_attention_dim, generator=g)
    batch = torch.cat([latents, latents])  # uncond half, cond half
    t = torch.tensor(10)
    with lora_fast.per_sample_adapters(unet, entries):
        out = unet(batch, t, text).sample
    for j in range(2 * n):
        select(unet, entries[j % n])
        ref = unet(batch[j:j + 1], t, text[j:j + 1]).sample
        assert rel_max(out[j:j + 1], ref) <= 1e-4, j
    lora_fast.enable_lora(unet)


@torch.no_grad()
def test_tiny_sd3_transformer_joint_attention_with_per_call_scale():
    pytest.importorskip("diffusers")
    from lora_fast.models import build_sd3_transformer

    tr = build_sd3_transformer("tiny")
    g = torch.Generator().manual_seed(5)
    for i, n in enumerate("abc"):  # every Linear of the attention and feed-forward blocks (context branch included)
        layers = {}
        for name, mod in tr.named_modules():
            if isinstance(mod, nn.Linear) and ("attn" in name or ".ff" in name):
                layers[name] = LoraLayer(down=torch.randn(4, mod.in_features, generator=g) * 0.05,
                                         up=torch.randn(mod.out_features, 4, generator=g) * 0.05, kind="linear",
                                         alpha=4.0)
        lora_fast.load_lora_weights(tr, LoraAdapter(layers, "diffusers"), n)
    entries = ["a", {"b": 0.7, "c": 0.3}, None]
    cfg = tr.config
    batch = 2 * len(entries)
    hs = torch.randn(batch, cfg.in_channels, 16, 16, generator=g)
    enc = torch.randn(batch, 7, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=g)
    t = torch.full((batch,), 10.0)
    kwargs = {"joint_attention_kwargs": {"scale": 0.8}}
    with lora_fast.per_sample_adapters(tr, entries):
        out = tr(hs, enc, pooled, t, **kwargs).sample
    for j in range(batch):
        select(tr, entries[j % len(entries)])
        ref = tr(hs[j:j + 1], enc[j:j + 1], pooled[j:j + 1], t[j:j + 1], **kwargs).sample
        assert rel_max(out[j:j + 1], ref) <= 1e-5, j
    lora_fast.enable_lora(tr)


TRITON_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["LORA_FAST_SEGMENTED_BACKEND"] = "triton"
    sys.path.insert(0, {tests!r})
    import torch, lora_fast
    from test_per_sample import ENTRIES, alone, rel_max, toy_inputs, toy_with_adapters, l2_rel
    with torch.no_grad():
        for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 5e-3)):
            m = toy_with_adapters(dtype, modules=("q", "k"))
            args = toy_inputs(10, dtype=dtype)
            with lora_fast.per_sample_adapters(m, ENTRIES):
                outs = m(*args)[:2]
            os.environ["LORA_FAST_SEGMENTED_BACKEND"] = "torch"
            with lora_fast.per_sample_adapters(m, ENTRIES):
                twins = m(*args)[:2]
            os.environ["LORA_FAST_SEGMENTED_BACKEND"] = "triton"
            refs = alone(m, ENTRIES, args)[:2]
            for o, t, r in zip(outs, twins, refs):
                if dtype == torch.float32:
                    assert rel_max(o, r) <= tol, rel_max(o, r)
                else:
                    assert l2_rel(o, r) <= 2 * tol, l2_rel(o, r)
                    assert l2_rel(o, t) <= 1e-3, l2_rel(o, t)
    print("TRITON-OK")
    """
)


@interpretable_segmented_kernels
def test_triton_kernels_drive_per_sample_adapters_under_the_interpreter():
    pytest.importorskip("triton")
    script = TRITON_SCRIPT.format(tests=os.path.dirname(__file__))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TRITON_INTERPRET="1"))
    assert proc.returncode == 0 and "TRITON-OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@torch.no_grad()
def test_compiled_triton_kernels_match_the_per_sample_loop_on_gpu(dtype, monkeypatch):
    monkeypatch.setenv("LORA_FAST_TRITON_FALLBACK", "0")  # the compiled kernels themselves, no torch fallback
    m = toy_with_adapters(dtype).cuda()
    args = [a.cuda() for a in toy_inputs(10, dtype=dtype)]
    with lora_fast.per_sample_adapters(m, ENTRIES):
        outs = m(*args)
    refs = alone(m, ENTRIES, args)
    for o, r in zip(outs[:2], refs[:2]):  # the Linear layers: compiled Triton shrink/expand
        if dtype == torch.float32:
            assert rel_max(o, r) <= 1e-5
        else:
            assert l2_rel(o, r) <= 1e-2
