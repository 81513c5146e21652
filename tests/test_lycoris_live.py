"""LyCORIS layers (LoHa, LoKr, full diff: the dense live slot) with per_sample_adapters and hotswap."""

from __future__ import annotations

import pytest
import torch

import lora_fast
from lora_fast import LoraAdapter, LoraFormatError, LoraLayer

from test_live import inputs, random_adapter, toy
from test_per_sample import alone, rel_max


def _r(g, *shape, scale=0.2):
    return torch.randn(*shape, generator=g) * scale


def loha_adapter(seed, rank=3, alpha=2.0, modules=("q", "k", "conv")):
    """LoHa on q (40x24), k (17x24) and the 3x3 conv (10x6x3x3, flattened (r, 54) factors)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"q": ("linear", (40, 24)), "k": ("linear", (17, 24)), "conv": ("conv", (10, 6, 3, 3))}
    layers = {}
    for m in modules:
        kind, shape = shapes[m]
        out, inp = shape[0], int(torch.tensor(shape[1:]).prod())
        layers[m] = LoraLayer(kind=kind, algorithm="loha", alpha=alpha, shape=shape, lycoris={
            "hada_w1_a": _r(g, out, rank), "hada_w1_b": _r(g, rank, inp),
            "hada_w2_a": _r(g, out, rank), "hada_w2_b": _r(g, rank, inp)})
    return LoraAdapter(layers, "kohya")


def lokr_full_adapter(seed):
    """LoKr on q (W1 (4, 4) x W2 (10, 6)), a full diff on the 1x1 conv pw."""
    g = torch.Generator().manual_seed(seed)
    return LoraAdapter({
        "q": LoraLayer(kind="linear", algorithm="lokr", shape=(40, 24), alpha=1.0,
                       lycoris={"lokr_w1": _r(g, 4, 4), "lokr_w2_a": _r(g, 10, 2), "lokr_w2_b": _r(g, 2, 6)}),
        "pw": LoraLayer(kind="conv", algorithm="full", shape=(12, 10, 1, 1), lycoris={"diff": _r(g, 12, 10, 1, 1)}),
    }, "kohya")


def _model():
    m = toy()
    lora_fast.load_lora_weights(m, random_adapter(10, rank=2, scale=0.1), "a")
    lora_fast.load_lora_weights(m, loha_adapter(11), "h")
    lora_fast.load_lora_weights(m, lokr_full_adapter(12), "kf")
    return m


def _batch(n, seed=1):
    x, img, idx = inputs(seed)
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 5, 24, generator=g), torch.randn(n, 6, 9, 9, generator=g),
            torch.randint(0, 11, (n, 3), generator=g))


@torch.no_grad()
def test_per_sample_with_loha_lokr_and_full_equals_each_sample_alone():
    m = _model()
    entries = ["h", {"a": 0.5, "h": 1.5}, None, "a", {"h": -1.0, "kf": 0.7}, "kf"]
    args = _batch(12)  # two blocks of the entries
    with lora_fast.per_sample_adapters(m, entries):
        outs = m(*args)
    refs = alone(m, entries, args)
    for o, r in zip(outs, refs):
        assert rel_max(o, r) <= 1e-5
    # the LyCORIS adapters did act: sample 0 (LoHa alone) differs from the base output
    lora_fast.disable_lora(m)
    base = m(*args)
    assert not torch.equal(outs[0][0], base[0][0]) and torch.equal(outs[0][2], base[0][2])
    assert not torch.equal(outs[2][5], base[2][5])  # pw's full diff on sample 5


@torch.no_grad()
def test_hotswap_between_lora_and_loha_is_refused_clearly_and_changes_nothing():
    m = toy()
    lora_fast.load_lora_weights(m, random_adapter(1, rank=3, modules=("q", "k", "conv")), "x")
    args = _batch(3)
    before = m(*args)
    with pytest.raises(LoraFormatError, match="cannot change the algorithm") as e:
        lora_fast.load_lora_weights(m, loha_adapter(2), "x", hotswap=True)
    assert "LoHa" in str(e.value) and "load it as a new adapter" in str(e.value)
    after = m(*args)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    # and the other way round
    m = toy()
    lora_fast.load_lora_weights(m, loha_adapter(2), "y")
    before = m(*args)
    with pytest.raises(LoraFormatError, match="LoHa \\(computed densely\\).*LoRA \\(factored live path\\)"):
        lora_fast.load_lora_weights(m, random_adapter(1, rank=3, modules=("q", "k", "conv")), "y", hotswap=True)
    assert all(torch.equal(a, b) for a, b in zip(before, m(*args)))


@torch.no_grad()
def test_hotswap_loha_into_loha_of_the_same_shapes_writes_in_place():
    m = toy()
    first = loha_adapter(3)
    lora_fast.load_lora_weights(m, first, "h")
    kept = {k: v.clone() for k, v in first.layers["q"].lycoris.items()}
    args = _batch(3)
    m(*args)
    second = loha_adapter(4, alpha=5.0)
    lora_fast.load_lora_weights(m, second, "h", hotswap=True)
    got = m(*args)
    fresh = toy()
    lora_fast.load_lora_weights(fresh, second, "h")
    want = fresh(*args)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    # the first file's tensors were not written into
    assert all(torch.equal(first.layers["q"].lycoris[k], v) for k, v in kept.items())
    # a third swap writes into the same (now owned) tensors
    from lora_fast.engine import component_state

    slot = component_state(m).slot_hooks["h"]["q"].slots["h"]
    held = slot.layer.lycoris["hada_w1_a"]
    lora_fast.load_lora_weights(m, loha_adapter(5), "h", hotswap=True)
    assert slot.layer.lycoris["hada_w1_a"] is held
    fresh = toy()
    lora_fast.load_lora_weights(fresh, loha_adapter(5), "h")
    assert all(torch.equal(a, b) for a, b in zip(m(*args), fresh(*args)))
    # another rank (other shapes) is refused, naming the tensor
    with pytest.raises(LoraFormatError, match="hada_w1_a"):
        lora_fast.load_lora_weights(m, loha_adapter(6, rank=4), "h", hotswap=True)
    # fuse/unfuse after a swap uses the swapped values
    lora_fast.fuse_lora(m)
    fused = m(*args)
    lora_fast.unfuse_lora(m)
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(fused, m(*args)))


@torch.no_grad()
def test_lokr_hotswap_drops_the_cached_halves():
    m = toy()
    lora_fast.load_lora_weights(m, lokr_full_adapter(7), "k")
    args = _batch(2)
    m(*args)  # builds and caches LoKr's W2 on the slot's layer
    for seed in (8, 9):  # the second swap writes into the slot's own tensors, whose W2 was cached by a forward
        lora_fast.load_lora_weights(m, lokr_full_adapter(seed), "k", hotswap=True)
        fresh = toy()
        lora_fast.load_lora_weights(fresh, lokr_full_adapter(seed), "k")
        assert all(torch.equal(a, b) for a, b in zip(m(*args), fresh(*args))), seed


def test_loha_hotswap_under_compile_runs_the_new_values_without_recompiling():
    """Same shapes and alpha: the swap writes values only, the compiled graph keeps running (a different alpha is a
    different number in the dense path's graph and compiles once more)."""
    from test_hotswap import CountingBackend

    torch._dynamo.reset()
    m = toy()
    lora_fast.load_lora_weights(m, loha_adapter(3), "h")
    backend = CountingBackend()
    compiled = torch.compile(m, backend=backend)
    args = _batch(2)
    with torch.no_grad():
        compiled(*args)
        compiled(*args)
        warm = backend.graphs
        for seed in (4, 5):
            lora_fast.load_lora_weights(m, loha_adapter(seed), "h", hotswap=True)
            got = compiled(*args)
            fresh = toy()
            lora_fast.load_lora_weights(fresh, loha_adapter(seed), "h")
            assert all(torch.equal(a, b) for a, b in zip(got, fresh(*args))), seed
    assert backend.graphs == warm
    torch._dynamo.reset()
