"""torch.compile over many state changes: a fixed set of loaded adapters compiles one graph, whatever is switched.

The traced forward runs every loaded adapter's branch behind a 0-d bool gate (lora_fast.live), so set_adapters
(names and weights), enable/disable, fuse/unfuse and hotswap change tensor data, not the graph. These tests drive a
compiled model and an uncompiled copy through the same random sequence of such changes and check, after every step:
no new graph (dynamo raises on any recompile: ``error_on_recompile``), the compiled graph really ran (no silent
fallback to eager: the backend counts runs), outputs within fp32 tolerance of the eager copy (bit-equal where no
adapter runs live), and every parameter (fused weights included) bit-identical to the eager copy's.
"""

import copy
import random

import pytest
import torch
from torch import nn

import lora_fast
from lora_fast import LoraAdapter, LoraLayer
from test_live import inputs, random_adapter, toy, with_dora_magnitudes


class RecordingBackend:
    """Counts the graphs dynamo compiles and the times compiled code runs (eager fallback runs none). ``model_*``
    count only graphs that take a module parameter (the model's forward, not e.g. the call-scale hook's frame)."""

    def __init__(self):
        self.graphs = self.runs = self.model_graphs = self.model_runs = 0

    def __call__(self, gm, example_inputs):
        model = any(n.op == "placeholder" and "_parameters_" in n.name for n in gm.graph.nodes)
        self.graphs += 1
        self.model_graphs += model

        def run(*args):
            self.runs += 1
            self.model_runs += model
            return gm.forward(*args)

        return run


def _outputs(out):
    if isinstance(out, torch.Tensor):
        return (out,)
    if hasattr(out, "sample"):
        return (out.sample,)
    return tuple(out)


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


KINDS = ("select", "weights", "toggle", "fuse", "unfuse", "hotswap")


def _kinds(rng: random.Random, steps: int) -> list:
    """Every kind of change twice, the rest drawn at random, in random order."""
    kinds = list(KINDS) * 2 + rng.choices(KINDS, k=max(0, steps - 2 * len(KINDS)))
    rng.shuffle(kinds)
    return kinds[:steps]


def _random_step(rng: random.Random, kind: str, names, state):
    """One random change of the given kind, as (description, fn(model)). ``state`` tracks what is active and fused
    (hotswap refuses a fused adapter) so every step is valid on both models."""
    if kind == "select":
        chosen = rng.sample(names, rng.randint(1, len(names)))
        weights = [round(rng.uniform(-1.0, 1.5), 3) for _ in chosen]
        state["active"] = chosen
        return f"set_adapters({chosen}, {weights})", lambda m: lora_fast.set_adapters(m, chosen, weights)
    if kind == "weights":  # same names, new weights
        chosen = state["active"]
        weights = [round(rng.uniform(0.1, 2.0), 3) for _ in chosen]
        return f"weights {weights}", lambda m: lora_fast.set_adapters(m, chosen, weights)
    if kind == "toggle":
        state["enabled"] = not state["enabled"]
        on = state["enabled"]
        return ("enable" if on else "disable"), (lora_fast.enable_lora if on else lora_fast.disable_lora)
    if kind == "fuse":
        todo = [n for n in state["active"] if n not in state["fused"]]
        if not todo:
            return "no-op call", lambda m: None
        scale = round(rng.uniform(0.3, 1.2), 3)
        state["fused"] |= set(todo)
        return f"fuse_lora({todo}, {scale})", lambda m: lora_fast.fuse_lora(m, lora_scale=scale, adapter_names=todo)
    if kind == "unfuse":
        state["fused"] = set()
        return "unfuse_lora", lora_fast.unfuse_lora
    free = [n for n in names if n not in state["fused"]]
    if not free:
        return "no-op call", lambda m: None
    name = rng.choice(free)
    seed, rank = rng.randint(100, 10_000), rng.randint(1, 8)
    new = state["make"](seed, rank)  # one adapter object for both models
    return f"hotswap {name} <- seed {seed} rank {rank}", lambda m: lora_fast.load_lora_weights(
        m, new, adapter_name=name, hotswap=True)


def _live_anything(state) -> bool:
    return state["enabled"] and any(n not in state["fused"] for n in state["active"])


def drive(model, make_adapter, args, kwargs=None, steps=20, seed=0, max_rank=8, tol=1e-5):
    """Load three adapters into ``model``, compile it, and drive it and an uncompiled copy through ``steps`` random
    changes; returns (backend, base output, first compiled output, [(step, outputs)], state) after checking every
    step."""
    kwargs = kwargs or {}
    names = ["a", "b", "c"]
    torch._dynamo.reset()
    with torch.no_grad():
        base = _outputs(model(*args, **kwargs))
    for i, n in enumerate(names):
        lora_fast.load_lora_weights(model, make_adapter(i + 1, rank=2 + 2 * i), adapter_name=n, max_rank=max_rank)
    ref = copy.deepcopy(model)
    backend = RecordingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    rng = random.Random(seed)
    state = {"active": ["c"], "enabled": True, "fused": set(), "make": lambda s, r: make_adapter(s, rank=r)}
    outs = []
    with torch.no_grad():
        first = _outputs(compiled(*args, **kwargs))
        assert backend.graphs >= 1 and backend.runs == 1
        graphs = backend.graphs
        with torch._dynamo.config.patch(error_on_recompile=True):  # any recompile from here raises
            for step, kind in enumerate(_kinds(rng, steps)):
                what, fn = _random_step(rng, kind, names, state)
                fn(model)
                fn(ref)
                runs = backend.runs
                got = _outputs(compiled(*args, **kwargs))
                want = _outputs(ref(*args, **kwargs))
                assert backend.runs == runs + 1, f"step {step} ({what}): the compiled graph did not run"
                for g, w in zip(got, want):
                    if _live_anything(state):
                        torch.testing.assert_close(g, w, rtol=tol, atol=tol, msg=lambda m: f"step {step} ({what}): {m}")
                    else:  # no adapter runs live: the gated-off branches contribute exactly nothing
                        assert torch.equal(g, w), f"step {step} ({what}): not bit-equal with no adapter live"
                mine, theirs = _params(model), _params(ref)
                assert all(torch.equal(mine[k], theirs[k]) for k in theirs), f"step {step} ({what}): weights differ"
                outs.append((what, got))
    assert backend.graphs == graphs, f"compiled {backend.graphs - graphs} more graphs after the first call"
    torch._dynamo.reset()
    return backend, base, first, outs, state


def _differs(a, b) -> bool:
    return any((x - y).abs().max() > 1e-4 for x, y in zip(a, b))


@pytest.mark.parametrize("seed", [0, 1])
def test_toy_model_compiles_once_across_random_switches_toggles_fuses_and_hotswaps(seed):
    """Linear (with and without bias), strided and reflect-padded 3x3 convs, a 1x1 conv and an embedding."""
    model = toy()
    args = inputs()
    backend, base, first, outs, state = drive(model, lambda s, rank: random_adapter(s, rank=rank), args, seed=seed)
    assert backend.runs == 21
    whats = [w for w, _ in outs]
    assert any(w.startswith("fuse_lora") for w in whats) and "unfuse_lora" in whats
    assert any(w.startswith("hotswap") for w in whats) and any(w.startswith("set_adapters") for w in whats)
    # the adapters really act: most steps' outputs differ from the adapter-free model's
    assert _differs(first, base) and sum(_differs(o, base) for _, o in outs) >= 10


class Guarded(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x)


def test_gated_off_adapter_contributes_exactly_nothing_even_when_its_branch_is_not_finite():
    """An inactive adapter's branch still runs in the compiled graph; torch.where drops it, so an Inf in its factors
    (or activations that overflow) cannot turn the output into NaN, and -0.0 stays -0.0."""
    torch.manual_seed(0)
    model = Guarded()
    with torch.no_grad():
        model.lin.bias.zero_()
    x = torch.randn(4, 8)
    x[0] = 0.0
    x[0, 0] = -0.0  # row 0 gives 0 * w + 0 = +0.0 or -0.0 outputs
    bad = LoraLayer(down=torch.full((2, 8), float("inf")), up=torch.ones(8, 2), alpha=2.0, kind="linear")
    good = LoraLayer(down=torch.randn(2, 8), up=torch.randn(8, 2), alpha=2.0, kind="linear")
    lora_fast.load_lora_weights(model, LoraAdapter({"lin": bad}, "diffusers"), adapter_name="bad")
    lora_fast.load_lora_weights(model, LoraAdapter({"lin": good}, "diffusers"), adapter_name="good")
    lora_fast.set_adapters(model, "good")
    backend = RecordingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-6)
        with torch._dynamo.config.patch(error_on_recompile=True):
            lora_fast.disable_lora(model)
            off = compiled(x)
            assert torch.equal(off, model(x)) and torch.isfinite(off).all()
            assert torch.equal(torch.signbit(off), torch.signbit(model.lin(x)))
            lora_fast.enable_lora(model)
            lora_fast.set_adapters(model, "bad")
            assert torch.isnan(compiled(x)).any()  # the branch is really there when its gate is on
    assert backend.graphs == 1 and backend.runs == 3
    torch._dynamo.reset()


def test_per_call_scale_costs_at_most_two_graphs():
    """λ (cross_attention_kwargs={"scale": λ}) is a Python float: the first value other than the first call's makes
    it dynamic (one model graph), λ = 0 skips the terms (one model graph); the root's call-scale hook is a frame of
    its own, which gets one small graph once λ is dynamic. Nothing else, and never an eager fallback."""
    model = toy()
    args = inputs()
    for i, n in enumerate("ab"):
        lora_fast.load_lora_weights(model, random_adapter(i + 1), adapter_name=n)
    lora_fast.set_adapters(model, ["a", "b"], [0.7, 0.4])
    backend = RecordingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled(*args)
        first = backend.model_graphs
        lams = (0.5, 0.7, 1.0, 0.0, 0.25, 1.0, 0.0, 2.0, -1.0, 0.0, 1.0)
        for k, lam in enumerate(lams):
            lora_fast.set_adapters(model, ["a", "b"][: 1 + k % 2], [0.7, 0.4][: 1 + k % 2])
            got = compiled(*args, cross_attention_kwargs={"scale": lam})
            want = model(*args, cross_attention_kwargs={"scale": lam})
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert backend.model_graphs <= first + 2 and backend.graphs <= first + 3
    assert backend.model_runs == 1 + len(lams)
    torch._dynamo.reset()


def test_dora_under_compile_one_graph_per_active_list_and_none_for_fuse_unfuse():
    """DoRA norms depend on the base weights, which fusing another adapter changes: the caches are refreshed when the
    state changes (not lazily in the traced forward), so fuse/unfuse compile nothing new. DoRA terms are not additive
    (PEFT's formula rescales the output accumulated so far), so on modules holding one the traced forward follows the
    active list's order: one graph per distinct active list, reused when a list comes back."""
    model = toy()
    args = inputs()
    g = torch.Generator().manual_seed(9)
    for axis, name, seed in (("out", "d_out", 1), ("in", "d_in", 2)):
        a = with_dora_magnitudes(model, random_adapter(seed, modules=("q", "conv", "pw", "k")), axis, g)
        lora_fast.load_lora_weights(model, a, adapter_name=name)
    lora_fast.load_lora_weights(model, random_adapter(3), adapter_name="plain")
    lora_fast.set_adapters(model, ["d_out", "d_in"], [0.8, 0.6])
    ref = copy.deepcopy(model)
    backend = RecordingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    torch._dynamo.reset()
    steps = [  # (change, whether it may compile: a new active list)
        (lambda m: lora_fast.fuse_lora(m, adapter_names=["plain"], lora_scale=0.7), False),  # W changes under DoRA
        (lambda m: lora_fast.set_adapters(m, ["d_out"], [1.2]), True),
        (lambda m: lora_fast.fuse_lora(m, adapter_names=["d_out"]), False),
        (lambda m: lora_fast.set_adapters(m, ["d_in", "plain", "d_out"], [0.5, 1.0, 1.0]), True),
        (lambda m: lora_fast.unfuse_lora(m), False),
        (lambda m: lora_fast.disable_lora(m), False),
        (lambda m: lora_fast.enable_lora(m), False),
        (lambda m: lora_fast.set_adapters(m, ["d_out", "d_in"], [1.0, 0.3]), False),  # the first list again
        (lambda m: lora_fast.fuse_lora(m), False),
        (lambda m: lora_fast.set_adapters(m, ["d_in", "plain", "d_out"], [0.2, 0.4, 0.9]), False),  # seen before
        (lambda m: lora_fast.unfuse_lora(m), False),
    ]
    with torch.no_grad():
        compiled(*args)
        for k, (step, may_compile) in enumerate(steps):
            step(model)
            step(ref)
            graphs = backend.graphs
            for o, r in zip(compiled(*args), ref(*args)):
                torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {k}: {m}")
            assert backend.graphs == graphs or may_compile, f"step {k} compiled a new graph"
            mine, theirs = _params(model), _params(ref)
            assert all(torch.equal(mine[key], theirs[key]) for key in theirs)
    assert backend.graphs == 3 and backend.runs == 1 + len(steps)
    torch._dynamo.reset()


def test_dora_loaded_while_disabled_then_enabled_under_compile():
    """A DoRA adapter that was never live has no norm caches yet: the traced forward leaves it out while its gate is
    off, and enabling it fills the caches (in ``bump``) before the next compiled call uses them."""
    model = toy()
    args = inputs()
    a = random_adapter(1, modules=("q", "conv"))
    g = torch.Generator().manual_seed(4)
    for path, layer in a.layers.items():
        n = model.get_submodule(path).weight.shape[0]
        layer.magnitude = torch.rand(n, generator=g) + 0.5
    lora_fast.disable_lora(model)
    lora_fast.load_lora_weights(model, a, adapter_name="d")
    backend = RecordingBackend()
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    torch._dynamo.reset()
    with torch.no_grad():
        for o, r in zip(compiled(*args), model(*args)):
            assert torch.equal(o, r)
        lora_fast.enable_lora(model)
        on = compiled(*args)
        for o, r in zip(on, model(*args)):
            torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
        lora_fast.disable_lora(model)
        for o, r in zip(compiled(*args), model(*args)):
            assert torch.equal(o, r)
    assert (on[0] - model(*args)[0]).abs().max() > 1e-3  # the DoRA terms really ran when enabled
    assert backend.model_runs == 3 and backend.model_graphs <= 2
    torch._dynamo.reset()


# ------------------------------------------------------------------ a tiny diffusers UNet2DConditionModel


def _unet_adapter(unet, seed, rank):
    """Rank-``rank`` layers on the attention projections, resnet convs and time projections (un-prefixed keys)."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for path, m in unet.named_modules():
        if not path.endswith(("to_q", "to_k", "to_v", "to_out.0", "conv1", "time_emb_proj", "proj_in")):
            continue
        if isinstance(m, nn.Linear):
            down, up, kind = (rank, m.in_features), (m.out_features, rank), "linear"
        else:
            down, up, kind = (rank, m.in_channels, *m.kernel_size), (m.out_channels, rank, 1, 1), "conv"
        layers[path] = LoraLayer(down=torch.randn(*down, generator=g) * 0.1, up=torch.randn(*up, generator=g) * 0.1,
                                 alpha=float(rank + seed % 3), kind=kind)
    return LoraAdapter(layers, "diffusers")


@pytest.mark.slow  # ~25 s alone on one core (compiles a tiny UNet); CI runs it in its `-m slow` pass
def test_tiny_unet_compiles_once_across_random_switches_toggles_fuses_and_hotswaps():
    pytest.importorskip("diffusers")
    from lora_fast.models import build_unet

    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        unet = build_unet("sd15", "tiny", seed=0)
        g = torch.Generator().manual_seed(0)
        args = (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([10]),
                torch.randn(1, 5, unet.config.cross_attention_dim, generator=g))
        backend, base, first, outs, state = drive(unet, lambda s, rank: _unet_adapter(unet, s, rank), args,
                                                  seed=3, max_rank=8, tol=1e-4)
        assert backend.runs == 21
        whats = [w for w, _ in outs]
        assert any(w.startswith("fuse_lora") for w in whats) and "unfuse_lora" in whats
        assert _differs(first, base) and sum(_differs(o, base) for _, o in outs) >= 10
    finally:
        torch.set_num_threads(n_threads)
