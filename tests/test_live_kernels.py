"""The eager live forward through the segmented shrink/expand kernels, and shared down factors computed once.

Part A: with ``lora_fast.live.KERNEL_ROUTE = True`` the ordinary live forward (set_adapters, no per-sample block) of
plain factored slots runs the per-sample machinery (one entry, every row; a mixture of k adapters is k passes).
Checked against the previous route (per-slot torch products) and a float64 reference written from the raw factors
(tests/lora_reference.py), for fp32/fp16/bf16, linear and conv layers, one adapter and a weighted mixture, λ through
``cross_attention_kwargs``; with the torch backend here and the Triton kernels under TRITON_INTERPRET=1 in a
subprocess. Counters (a TorchDispatchMode and the launchers) show the route is taken and costs no more torch ops
and launches per layer than per_sample_adapters with 8 adapters. Caches must follow set_adapters, hotswap,
fuse/unfuse and enable/disable.

Part B: a kohya Flux LoRA on fused projections (qkv, linear1) is split over diffusers modules that share one down
matrix; the live and per-sample paths shrink once per group and input. Counted on a tiny Flux transformer, outputs
compared with the unshared computation (``lora_fast.live.SHARE_DOWNS = False``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lora_fast
from lora_fast import LoraAdapter, LoraLayer
from lora_fast import live as L
from lora_fast.kernels import shrink_expand as SE
from lora_reference import delta64
from triton_support import interpretable_segmented_kernels

pytestmark = pytest.mark.filterwarnings("ignore")

# --------------------------------------------------------------------------------------------- helpers


class Toy(nn.Module):
    """Linear (biased and not), 1x1 conv and 3x3 conv, each applied to its own input."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(24, 40)
        self.k = nn.Linear(24, 40, bias=False)
        self.c1 = nn.Conv2d(6, 10, 1)
        self.c3 = nn.Conv2d(6, 10, 3, padding=1)

    def forward(self, x, img, cross_attention_kwargs=None):
        return self.q(x), self.k(x), self.c1(img), self.c3(img)


def toy(dtype=torch.float32):
    torch.manual_seed(0)
    return Toy().to(dtype)


def toy_inputs(dtype=torch.float32, batch=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 5, 24, generator=g).to(dtype), torch.randn(batch, 6, 7, 7, generator=g).to(dtype))


def toy_adapter(seed, dtype=torch.float32, rank=4, alpha=3.0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) * scale).to(dtype)  # noqa: E731
    return LoraAdapter({
        "q": LoraLayer(down=r(rank, 24), up=r(40, rank), alpha=alpha, kind="linear"),
        "k": LoraLayer(down=r(rank + 2, 24), up=r(40, rank + 2), alpha=alpha, kind="linear"),
        "c1": LoraLayer(down=r(rank, 6, 1, 1), up=r(10, rank, 1, 1), alpha=alpha, kind="conv"),
        "c3": LoraLayer(down=r(rank, 6, 3, 3), up=r(10, rank, 1, 1), alpha=alpha, kind="conv"),
    }, "diffusers")


def reference64(model, terms, x, img, lam):
    """Every output in float64 from the (rounded) weights: W + λ Σ w·ΔW, ΔW from the raw factors."""
    out = []
    for name in ("q", "k", "c1", "c3"):
        m = getattr(model, name)
        w = m.weight.double()
        for adapter, weight in terms:
            w = w + lam * weight * delta64(adapter.layers[name]).reshape(w.shape)
        b = None if m.bias is None else m.bias.double()
        if name in ("q", "k"):
            out.append(F.linear(x.double(), w, b))
        else:
            out.append(F.conv2d(img.double(), w, b, padding=m.padding))
    return out


def rel_max(out, ref):
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


class Route:
    """Set lora_fast.live.KERNEL_ROUTE for a block."""

    def __init__(self, on):
        self.on = on

    def __enter__(self):
        self.saved = L.KERNEL_ROUTE
        L.KERNEL_ROUTE = self.on

    def __exit__(self, *exc):
        L.KERNEL_ROUTE = self.saved


class Count(TorchDispatchMode):
    """Torch operations by name (paused inside kernel launches: the interpreter's own copies are not ours)."""

    def __init__(self):
        super().__init__()
        self.ops: dict = {}
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            name = func.overloadpacket.__name__
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self):
        return sum(self.ops.values())


@pytest.fixture
def torch_backend(monkeypatch):
    monkeypatch.setenv("LORA_FAST_SEGMENTED_BACKEND", "torch")


# --------------------------------------------------------------------------------------------- A: results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mix", [False, True])
@torch.no_grad()
def test_kernel_route_matches_previous_route_and_float64(dtype, mix, torch_backend):
    m = toy(dtype)
    a, b = toy_adapter(1, dtype), toy_adapter(2, dtype, rank=3, alpha=5.0)
    lora_fast.load_lora_weights(m, a, "a")
    lora_fast.load_lora_weights(m, b, "b")
    if mix:
        lora_fast.set_adapters(m, ["a", "b"], [0.7, -0.4])
        terms = [(a, 0.7), (b, -0.4)]
    else:
        lora_fast.set_adapters(m, ["a"])
        terms = [(a, 1.0)]
    x, img = toy_inputs(dtype)
    lam = 0.6
    kw = {"cross_attention_kwargs": {"scale": lam}}
    with Route(True):
        new = m(x, img, **kw)
    with Route(False):
        old = m(x, img, **kw)
    refs = reference64(m, terms, x, img, lam)
    plain = reference64(m, [], x, img, lam)
    for name, n, o, r, p in zip("q k c1 c3".split(), new, old, refs, plain):
        assert rel_max(r, p) > 0.05, name  # the adapters visibly change every output
        if dtype == torch.float32:
            assert rel_max(n, r) <= 1e-5, (name, rel_max(n, r))
            assert rel_max(n, o) <= 1e-5, (name, rel_max(n, o))
        else:
            # both round the output; the kernel route sums the LoRA terms in fp32 and rounds once per adapter
            ulp = 2.0 ** -10 if dtype == torch.float16 else 2.0 ** -7
            assert rel_max(n, r) <= 2 * ulp, (name, rel_max(n, r))
            assert rel_max(n, r) <= 1.5 * rel_max(o, r) + ulp / 4, (name, rel_max(n, r), rel_max(o, r))


@torch.no_grad()
def test_kernel_route_is_taken_and_builds_nothing_in_a_steady_loop(torch_backend, monkeypatch):
    m = toy()
    lora_fast.load_lora_weights(m, toy_adapter(1), "a")
    lora_fast.load_lora_weights(m, toy_adapter(2), "b")
    lora_fast.set_adapters(m, ["a", "b"], [0.5, 1.0])
    args = toy_inputs()
    calls = {"expand": 0, "conv": 0, "groups": 0, "rows": 0}

    def counting(key, fn):
        def wrapped(*a, **k):
            calls[key] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(L, "segmented_expand", counting("expand", L.segmented_expand))
    monkeypatch.setattr(L, "channels_first_lora", counting("conv", L.channels_first_lora))
    monkeypatch.setattr(L, "make_groups", counting("groups", L.make_groups))
    monkeypatch.setattr(L, "build_row_map", counting("rows", L.build_row_map))
    with Route(True):
        m(*args)
        assert calls == {"expand": 2, "conv": 2, "groups": 4, "rows": 2}  # one row map per (batch, rows) shape
        with Count() as c:
            for _ in range(3):
                m(*args)
        assert calls["groups"] == 4 and calls["rows"] == 2, calls  # nothing built per call
        assert calls["expand"] == 2 + 6 and calls["conv"] == 2 + 6
        # batched products, not the per-slot route's in-place addmm_ (the biased base Linear itself runs addmm)
        assert c.ops.get("baddbmm_", 0) > 0 and c.ops.get("addmm_", 0) == 0, c.ops
    with Route(False), Count() as c:
        m(*args)
    assert c.ops.get("addmm_", 0) > 0 and c.ops.get("baddbmm_", 0) == 0 and calls["expand"] == 8


@torch.no_grad()
def test_kernel_route_is_skipped_for_autograd_dora_and_dtype_mismatch(torch_backend):
    m = toy()
    lora_fast.load_lora_weights(m, toy_adapter(1), "a")
    x, img = toy_inputs()
    with Route(True):
        ref = m(x, img)
        with torch.enable_grad():
            xg = x.clone().requires_grad_()
            out = m(xg, img)
            out[0].sum().backward()  # the per-slot route keeps autograd working
        assert xg.grad is not None and torch.allclose(out[0], ref[0], rtol=1e-5, atol=1e-6)
        # an input in another dtype than the layer's: the per-slot route (which casts) runs
        hook = lora_fast.engine.component_state(m).hooks[id(m.q)]
        assert hook._kernel_forward(m.q, x.double(), m.q(x), 1.0) is None


@torch.no_grad()
def test_caches_follow_set_adapters_hotswap_fuse_and_enable(torch_backend):
    m = toy()
    lora_fast.load_lora_weights(m, toy_adapter(1), "a")
    lora_fast.load_lora_weights(m, toy_adapter(2), "b")
    lora_fast.set_adapters(m, ["a"])
    args = toy_inputs()
    steps = [
        ("only b", lambda: lora_fast.set_adapters(m, ["b"])),
        ("a and b", lambda: lora_fast.set_adapters(m, ["a", "b"], [0.5, 1.0])),
        ("new weights", lambda: lora_fast.set_adapters(m, ["a", "b"], [-1.0, 0.25])),
        ("weight 0", lambda: lora_fast.set_adapters(m, ["a", "b"], [0.0, 0.25])),
        ("hotswap a", lambda: (lora_fast.set_adapters(m, ["a", "b"], [1.0, 0.25]),
                               lora_fast.load_lora_weights(m, toy_adapter(7), "a", hotswap=True))),
        ("fuse a", lambda: lora_fast.fuse_lora(m, adapter_names=["a"])),
        ("unfuse", lambda: lora_fast.unfuse_lora(m)),
        ("disable", lambda: lora_fast.disable_lora(m)),
        ("enable", lambda: lora_fast.enable_lora(m)),
    ]
    with Route(True):
        before = m(*args)
    for label, change in steps:
        change()
        with Route(True):
            new = m(*args)
        with Route(False):
            old = m(*args)
        for n, o in zip(new, old):
            assert rel_max(n, o) <= 1e-5, label
        if label not in ("fuse a", "unfuse"):  # fusing moves a into the weights: same function, other route
            assert any(rel_max(n, b) > 1e-3 for n, b in zip(new, before)), f"{label} changed nothing"
        before = new


@torch.no_grad()
def test_compiled_model_keeps_the_traced_path_with_the_route_on(torch_backend):
    m = toy()
    lora_fast.load_lora_weights(m, toy_adapter(1), "a")
    args = toy_inputs()
    with Route(False):
        ref = m(*args)
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    with Route(True):
        out = compiled(*args)
    for o, r in zip(out, ref):
        assert rel_max(o, r) <= 1e-5


# --------------------------------------------------------------------------------------------- A: cost per layer


class Stack(nn.Module):
    def __init__(self, n, width=32):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def stack_adapter(model, seed, rank=4):
    g = torch.Generator().manual_seed(seed)
    return LoraAdapter({f"layers.{i}": LoraLayer(down=torch.randn(rank, 32, generator=g) * 0.1,
                                                 up=torch.randn(32, rank, generator=g) * 0.1, alpha=float(rank))
                        for i in range(len(model.layers))}, "diffusers")


def ops_per_layer(run_cost, n_layers=12):
    """(torch ops, launches) per adapted layer: the difference between two stack depths, steady state."""
    per = []
    for n in (n_layers, 2 * n_layers):
        per.append(run_cost(n))
    return tuple((b - a) / n_layers for a, b in zip(*per))


def live_and_per_sample_cost(launches):
    def cost(n, per_sample):
        torch.manual_seed(0)
        m = Stack(n)
        names = [f"a{i}" for i in range(8)]
        for i, name in enumerate(names):
            lora_fast.load_lora_weights(m, stack_adapter(m, i), name)
        x = torch.randn(8, 3, 32)
        if per_sample:
            lora_fast.enable_lora(m)
            run = lambda: _in_block(m, names, x)  # noqa: E731
        else:
            lora_fast.set_adapters(m, ["a0"])
            run = lambda: m(x)  # noqa: E731
        run()  # tables and row maps are built once
        launches[0] = 0
        counter = Count()
        launches.append(counter)
        with counter:
            run()
        launches.pop()
        return counter.total, launches[0]

    with torch.no_grad(), Route(True):
        live = ops_per_layer(lambda n: cost(n, False))
        per_sample = ops_per_layer(lambda n: cost(n, True))
    return live, per_sample


def _in_block(m, names, x):
    with lora_fast.per_sample_adapters(m, names):
        return m(x)


def test_live_single_adapter_costs_no_more_ops_per_layer_than_per_sample_with_8(torch_backend):
    live, per_sample = live_and_per_sample_cost([0])
    assert live[0] <= per_sample[0], (live, per_sample)
    assert live[0] > 0


TRITON_SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["LORA_FAST_SEGMENTED_BACKEND"] = "triton"
    sys.path.insert(0, {tests!r})
    import torch, lora_fast
    import test_live_kernels as T
    from lora_fast.kernels import shrink_expand as SE

    launches = [0]
    for name in ("_triton_shrink", "_triton_expand"):
        real = getattr(SE, name)
        def wrapped(*a, _real=real, **k):
            launches[0] += 1
            counters = launches[1:]
            for c in counters:
                c.paused = True
            try:
                return _real(*a, **k)
            finally:
                for c in counters:
                    c.paused = False
        setattr(SE, name, wrapped)

    # results: kernels vs previous route vs float64 (linear layers run the kernels, convs the batched torch ops)
    with torch.no_grad():
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for mix in (False, True):
                T.test_kernel_route_matches_previous_route_and_float64(dtype, mix, None)
    # taken: 1 shrink + 1 expand launch per linear layer for one adapter, 1 + 2 for a mixture of two
    m = T.toy()
    lora_fast.load_lora_weights(m, T.toy_adapter(1), "a")
    lora_fast.load_lora_weights(m, T.toy_adapter(2), "b")
    args = T.toy_inputs()
    with torch.no_grad(), T.Route(True):
        lora_fast.set_adapters(m, ["a"])
        m(*args); launches[0] = 0; m(*args)
        assert launches[0] == 2 * 2, launches
        lora_fast.set_adapters(m, ["a", "b"], [0.5, 2.0])
        m(*args); launches[0] = 0; m(*args)
        assert launches[0] == 2 * 3, launches
    live, per_sample = T.live_and_per_sample_cost(launches)
    assert live[1] == 2 and live[1] <= per_sample[1] and live[0] <= per_sample[0], (live, per_sample)
    print("TRITON-OK", live, per_sample)
    """
)


@interpretable_segmented_kernels
def test_triton_kernels_drive_the_live_forward_under_the_interpreter():
    pytest.importorskip("triton")
    script = TRITON_SCRIPT.format(tests=os.path.dirname(__file__))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, TRITON_INTERPRET="1"))
    assert proc.returncode == 0 and "TRITON-OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


# --------------------------------------------------------------------------------------------- B: shared downs


def flux_kohya(transformer, seed, rank=4, same_qkv_down=False, dtype=torch.float32):
    """A kohya Flux file: img/txt qkv and img proj of double block 0, linear1 of single block 0."""
    g = torch.Generator().manual_seed(seed)
    inner = transformer.transformer_blocks[0].attn.to_q.in_features
    mlp = transformer.single_transformer_blocks[0].proj_mlp.out_features
    r = lambda *s: (torch.randn(*s, generator=g) * 0.2).to(dtype)  # noqa: E731
    qkv_down = r(rank, inner)
    sd = {}
    for name, down, rows in (("double_blocks_0_img_attn_qkv", qkv_down, 3 * inner),
                             ("double_blocks_0_txt_attn_qkv", qkv_down if same_qkv_down else r(rank, inner), 3 * inner),
                             ("double_blocks_0_img_attn_proj", r(rank, inner), inner),
                             ("single_blocks_0_linear1", r(rank, inner), 3 * inner + mlp)):
        sd[f"lora_unet_{name}.lora_down.weight"] = down.clone()
        sd[f"lora_unet_{name}.lora_up.weight"] = r(rows, rank)
        sd[f"lora_unet_{name}.alpha"] = torch.tensor(float(rank) * 0.75)
    return sd


def flux_inputs(transformer, batch=2, seed=0):
    cfg = transformer.config
    g = torch.Generator().manual_seed(seed)
    seq, txt = 6, 5
    return dict(hidden_states=torch.randn(batch, seq, cfg.in_channels, generator=g),
                encoder_hidden_states=torch.randn(batch, txt, cfg.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g),
                timestep=torch.linspace(0.3, 0.7, batch), img_ids=torch.randn(seq, 3, generator=g),
                txt_ids=torch.zeros(txt, 3), guidance=torch.full((batch,), 3.5), return_dict=False,
                joint_attention_kwargs={"scale": 0.7})


class ShrinkCounter:
    """Counts the shrink products of adapted modules: F.linear by a slot's down (per-slot route), segmented_shrink
    (live kernel route and per-sample)."""

    def __init__(self, monkeypatch, model):
        import lora_fast.per_sample as P

        self.n = 0
        self.model = model
        real_linear = F.linear

        def linear(x, w, *a, **k):
            if w.data_ptr() in self.downs:
                self.n += 1
            return real_linear(x, w, *a, **k)

        monkeypatch.setattr(F, "linear", linear)
        for mod in (L, P):
            real = mod.segmented_shrink
            monkeypatch.setattr(mod, "segmented_shrink", lambda *a, _real=real, **k: self.bump(_real(*a, **k)))
        self.refresh()

    def bump(self, value):
        self.n += 1
        return value

    def refresh(self):
        state = lora_fast.engine.component_state(self.model)
        self.downs = {s.down.data_ptr() for h in state.hooks.values() for s in h.slots.values()}

    def run(self, fn):
        self.refresh()
        self.n = 0
        out = fn()
        return out, self.n


def shared_and_unshared(counter, fn):
    L.SHARE_DOWNS = False
    try:
        unshared, n_unshared = counter.run(fn)
    finally:
        L.SHARE_DOWNS = True
    shared, n_shared = counter.run(fn)
    return shared, n_shared, unshared, n_unshared


@pytest.fixture(scope="module")
def flux_base():
    pytest.importorskip("diffusers")
    from lora_fast.models import build_flux_transformer

    return build_flux_transformer("tiny", seed=0)


@pytest.mark.parametrize("route", ["per-slot", "kernels"])
@pytest.mark.parametrize("factors", ["same tensor", "cast copies"])
@torch.no_grad()
def test_flux_split_projections_shrink_once_per_group_live(flux_base, route, factors, monkeypatch):
    import copy

    t = copy.deepcopy(flux_base)
    # fp16 factors in an fp32 model: every module casts its own copy, so the equal downs are found by value
    sd = flux_kohya(t, 1, dtype=torch.float16 if factors == "cast copies" else torch.float32)
    lora_fast.load_lora_weights(t, sd, "a")
    state = lora_fast.engine.component_state(t)
    attn = t.transformer_blocks[0].attn
    q, k = state.hooks[id(attn.to_q)].slots["a"], state.hooks[id(attn.to_k)].slots["a"]
    assert (q.down.data_ptr() == k.down.data_ptr()) == (factors == "same tensor")
    counter = ShrinkCounter(monkeypatch, t)
    kwargs = flux_inputs(t)
    if route == "kernels":
        monkeypatch.setenv("LORA_FAST_SEGMENTED_BACKEND", "torch")
    with Route(route == "kernels"):
        shared, n_shared, unshared, n_unshared = shared_and_unshared(counter, lambda: t(**kwargs)[0])
    # img qkv (to_q/k/v), txt qkv (add_q/k/v), img proj (to_out.0), linear1 (to_q/k/v + proj_mlp)
    assert (n_unshared, n_shared) == (3 + 3 + 1 + 4, 1 + 1 + 1 + 1)
    assert torch.equal(shared, unshared)
    lora_fast.disable_lora(t)
    base = t(**kwargs)[0]
    assert rel_max(shared, base) > 1e-3


@torch.no_grad()
def test_flux_equal_downs_on_different_inputs_are_not_shared(flux_base, monkeypatch):
    """img and txt qkv with one down matrix: to_q/k/v see the image tokens, add_q/k/v the text tokens, so the
    six modules form two products, not one."""
    import copy

    t = copy.deepcopy(flux_base)
    lora_fast.load_lora_weights(t, flux_kohya(t, 2, same_qkv_down=True), "a")
    counter = ShrinkCounter(monkeypatch, t)
    kwargs = flux_inputs(t)
    shared, n_shared, unshared, n_unshared = shared_and_unshared(counter, lambda: t(**kwargs)[0])
    assert (n_unshared, n_shared) == (11, 4)
    assert torch.equal(shared, unshared)


@torch.no_grad()
def test_flux_split_projections_shrink_once_per_group_per_sample(flux_base, monkeypatch):
    import copy

    t = copy.deepcopy(flux_base)
    lora_fast.load_lora_weights(t, flux_kohya(t, 1), "a")
    lora_fast.load_lora_weights(t, flux_kohya(t, 2), "b")
    counter = ShrinkCounter(monkeypatch, t)
    kwargs = flux_inputs(t, batch=4)

    def run():
        with lora_fast.per_sample_adapters(t, ["a", {"a": 0.5, "b": -1.0}]):
            return t(**kwargs)[0]

    shared, n_shared, unshared, n_unshared = shared_and_unshared(counter, run)
    assert (n_unshared, n_shared) == (11, 4)
    assert torch.equal(shared, unshared)
    # and it is what each sample gets alone
    for j, entry in enumerate([["a"], ["a", "b"]]):
        lora_fast.set_adapters(t, entry, [1.0] if len(entry) == 1 else [0.5, -1.0])
        one = {k: (v[j::2] if torch.is_tensor(v) and v.shape[:1] == (4,) else v) for k, v in kwargs.items()}
        alone = t(**one)[0]
        assert rel_max(shared[j::2], alone) <= 1e-5, j
