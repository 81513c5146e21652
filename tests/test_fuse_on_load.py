"""Fuse-on-load (lora_fast.fuse_on_load): streamed load + fuse is bit-identical to load then fuse, unfuses exactly,
and any failure part way (a non-finite layer found late, a truncated file) leaves the model untouched."""

from __future__ import annotations

import copy
import gc
import os
import warnings

import pytest
import torch
from torch import nn

warnings.filterwarnings("ignore")

import lora_fast  # noqa: E402
from lora_fast import LoraAdapter, LoraFormatError, LoraFusionError, LoraLayer, _C, io, io_stream  # noqa: E402
from lora_fast import fuse_on_load  # noqa: E402
from lora_fast.engine import component_state  # noqa: E402
from lora_fast.models import build_pipeline  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")

_BASES: dict = {}


def _base(dtype):
    if dtype not in _BASES:
        _BASES[dtype] = build_pipeline("sd15", "tiny", seed=0, dtype=dtype)
    return _BASES[dtype]


def _pipeline(dtype=torch.float32):
    return copy.deepcopy(_base(dtype))


def _adapter(pipe, dtype, seed=0, nan_last=False) -> LoraAdapter:
    """Random rank-2..4 layers on every Linear / Conv2d of the UNet and the text encoder's attention/MLP."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for comp, root in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        for path, m in root.named_modules():
            if comp == "text_encoder" and not path.endswith(("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")):
                continue
            r = 2 + len(layers) % 3
            if isinstance(m, nn.Linear):
                down = torch.randn(r, m.in_features, generator=g) * 0.1
                up = torch.randn(m.out_features, r, generator=g) * 0.1
                kind = "linear"
            elif isinstance(m, nn.Conv2d) and m.groups == 1:
                kh, kw = m.kernel_size
                down = torch.randn(r, m.in_channels, kh, kw, generator=g) * 0.1
                up = torch.randn(m.out_channels, r, 1, 1, generator=g) * 0.1
                kind = "conv"
            else:
                continue
            layers[f"{comp}.{path}"] = LoraLayer(down=down.to(dtype), up=up.to(dtype), alpha=r * 1.5, kind=kind)
    if nan_last:
        pass  # set by the caller once it knows which layer comes last in the file
    return LoraAdapter(layers, format="diffusers")


def _weights(pipe) -> dict:
    return {f"{c}.{k}": v.clone() for c in ("unet", "text_encoder")
            for k, v in getattr(pipe, c).state_dict().items()}


def _assert_bits_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8))]
    assert not bad, bad[:5]


def _save(adapter, tmp_path, fmt) -> str:
    path = str(tmp_path / f"lora_{fmt}.safetensors")
    adapter.save(path, format=fmt)
    return path


def _streamed(pipe, path, **kw):
    return fuse_on_load.load_and_fuse(pipe, path, "a", ring_bytes=kw.pop("ring_bytes", 4096),
                                      chunk_bytes=kw.pop("chunk_bytes", 1024), threads=kw.pop("threads", 2), **kw)


def _stream_idle() -> bool:
    gc.collect()
    return all(v == 0 for v in _C.stream_counters().values())


# ----------------------------------------------------------------------------------------- bit-exactness


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_streamed_fuse_equals_load_then_fuse_and_unfuses_exactly(tmp_path, dtype, fmt):
    base = _base(dtype)
    path = _save(_adapter(base, dtype, seed=1), tmp_path, fmt)
    original = _weights(base)

    ref = _pipeline(dtype)
    lora_fast.load_lora_weights(ref, path, "a")
    lora_fast.fuse_lora(ref, adapter_names=["a"])
    expected = _weights(ref)

    pipe = _pipeline(dtype)
    # a tiny ring (wrap-around, tensors split across chunks) and tiny batches (many fuse calls)
    assert _streamed(pipe, path, batch_bytes=1 << 14) == "a"
    assert _stream_idle(), _C.stream_counters()
    got = _weights(pipe)
    _assert_bits_equal(got, expected)
    assert any(not torch.equal(got[k], original[k]) for k in got)  # the fuse did something
    assert lora_fast.get_list_adapters(pipe) == {"unet": ["a"], "text_encoder": ["a"]}
    assert len(component_state(pipe.unet).fused) == 1  # one step per component: one unfuse undoes all batches

    lora_fast.unfuse_lora(pipe)
    _assert_bits_equal(_weights(pipe), original)

    if dtype != torch.float32 or fmt != "diffusers":
        return  # a CPU UNet forward in half precision is slow; once is enough
    # after unfuse the adapter runs live, as after a plain load
    lora_fast.unfuse_lora(ref)
    x = torch.randn(1, 4, 8, 8, dtype=dtype)
    t = torch.tensor([10])
    enc = torch.randn(1, 5, base.unet.config.cross_attention_dim, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(pipe.unet(x, t, enc).sample, ref.unet(x, t, enc).sample)


def test_public_api_streams_on_the_cpu_when_asked(tmp_path, monkeypatch):
    base = _base(torch.float32)
    path = _save(_adapter(base, torch.float32, seed=2), tmp_path, "diffusers")
    ref = _pipeline()
    lora_fast.load_lora_weights(ref, path, "x", fuse=True)

    calls = []
    real = fuse_on_load.load_and_fuse
    monkeypatch.setattr(fuse_on_load, "load_and_fuse", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("LORA_FAST_STREAM_FUSE", "1")
    pipe = _pipeline()
    assert lora_fast.load_lora_weights(pipe, path, "x", fuse=True) == "x"
    assert calls == [1]
    _assert_bits_equal(_weights(pipe), _weights(ref))
    lora_fast.unfuse_lora(pipe)
    _assert_bits_equal(_weights(pipe), _weights(base))


def test_default_batches_and_ring(tmp_path):
    base = _base(torch.float16)
    path = _save(_adapter(base, torch.float16, seed=3), tmp_path, "kohya")
    ref = _pipeline(torch.float16)
    lora_fast.load_lora_weights(ref, path, "a", fuse=True)
    pipe = _pipeline(torch.float16)
    fuse_on_load.load_and_fuse(pipe, path, "a", ring_bytes=1 << 20)
    _assert_bits_equal(_weights(pipe), _weights(ref))


# ----------------------------------------------------------------------------------------- lora_scale


def _fused_with(dtype, path, how, scale, monkeypatch):
    """A fresh pipeline with ``path`` loaded as "a" and fused at ``scale``, by one of the routes."""
    pipe = _pipeline(dtype)
    monkeypatch.delenv("LORA_FAST_STREAM_FUSE", raising=False)
    if how == "load_then_fuse":
        lora_fast.load_lora_weights(pipe, path, "a")
        lora_fast.fuse_lora(pipe, lora_scale=scale, adapter_names=["a"])
    elif how == "streamed":  # tiny ring and batches: many fuse calls
        _streamed(pipe, path, batch_bytes=1 << 14, lora_scale=scale)
    elif how == "public_streamed":
        monkeypatch.setenv("LORA_FAST_STREAM_FUSE", "1")
        lora_fast.load_lora_weights(pipe, path, "a", fuse=True, lora_scale=scale)
    else:  # the plain path: read, bind, fuse
        assert not fuse_on_load.stream_selected(pipe)
        lora_fast.load_lora_weights(pipe, path, "a", fuse=True, lora_scale=scale)
    monkeypatch.delenv("LORA_FAST_STREAM_FUSE", raising=False)
    return pipe


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [0.8, -1.7, {"unet": 0.8, "text_encoder": -0.5}, {"text_encoder": 0.3}])
def test_fuse_on_load_lora_scale_equals_load_then_fuse_lora_with_it(tmp_path, monkeypatch, dtype, scale):
    base = _base(dtype)
    path = _save(_adapter(base, dtype, seed=8), tmp_path, "diffusers")
    original = _weights(base)
    expected = _weights(_fused_with(dtype, path, "load_then_fuse", scale, monkeypatch))
    at_one = _weights(_fused_with(dtype, path, "load_then_fuse", 1.0, monkeypatch))
    for comp in ("unet", "text_encoder"):  # the scale really reaches every component it names
        want = scale.get(comp, 1.0) if isinstance(scale, dict) else scale
        differs = any(not torch.equal(expected[k], at_one[k]) for k in expected if k.startswith(comp + "."))
        assert differs == (want != 1.0), comp
    for how in ("streamed", "public_streamed", "plain"):
        pipe = _fused_with(dtype, path, how, scale, monkeypatch)
        _assert_bits_equal(_weights(pipe), expected)
        lora_fast.unfuse_lora(pipe)
        _assert_bits_equal(_weights(pipe), original)
        assert component_state(pipe.unet).weights["a"] == 1.0  # not sticky: the live adapter runs at 1.0
    if isinstance(scale, dict):  # per-component scales are set_adapters' per-component weights, fused
        ref = _pipeline(dtype)
        lora_fast.load_lora_weights(ref, path, "a")
        lora_fast.set_adapters(ref, "a", scale)
        lora_fast.fuse_lora(ref)
        _assert_bits_equal(_weights(ref), expected)


def test_fuse_on_load_lora_scale_with_lora_biases_takes_the_plain_route(tmp_path, monkeypatch):
    """Layers with a LoRA bias make the streaming entry fall back to load + fuse: the scale must go along."""
    base = _base(torch.float32)
    full = _adapter(base, torch.float32, seed=9)
    # a file with one lora_B bias gives every layer one (zeros elsewhere): keep the layers whose modules have a bias
    adapter = LoraAdapter({k: l for k, l in full.layers.items()
                           if getattr(base, k.split(".")[0]).get_submodule(k.split(".", 1)[1]).bias is not None},
                          format="diffusers")
    key = next(k for k, l in adapter.layers.items() if l.kind == "linear" and k.startswith("unet."))
    layer = adapter.layers[key]
    layer.bias = torch.randn(layer.up.shape[0], generator=torch.Generator().manual_seed(0))
    path = _save(adapter, tmp_path, "diffusers")
    expected = _weights(_fused_with(torch.float32, path, "load_then_fuse", 0.6, monkeypatch))
    pipe = _fused_with(torch.float32, path, "streamed", 0.6, monkeypatch)
    _assert_bits_equal(_weights(pipe), expected)
    lora_fast.unfuse_lora(pipe)
    _assert_bits_equal(_weights(pipe), _weights(base))


@pytest.mark.parametrize("stream", ["0", "1"])
def test_lora_scale_needs_fuse_and_a_bad_scale_changes_nothing(tmp_path, monkeypatch, stream):
    base = _base(torch.float32)
    path = _save(_adapter(base, torch.float32, seed=10), tmp_path, "diffusers")
    monkeypatch.setenv("LORA_FAST_STREAM_FUSE", stream)
    pipe = _pipeline()
    before = _weights(pipe)
    for kw in ({"lora_scale": 0.8}, {"lora_scale": {"unet": 0.8}}, {"lora_scale": 0.5, "hotswap": True}):
        with pytest.raises(LoraFusionError, match="needs fuse=True"):
            lora_fast.load_lora_weights(pipe, path, "a", **kw)
    for bad, match in (("0.8", "must be a number"), ({"unet": None}, "must be a number"),
                       ({"unet": 0.5, "unnet": 1.0}, "unnet")):
        with pytest.raises(LoraFusionError, match=match):
            lora_fast.load_lora_weights(pipe, path, "a", fuse=True, lora_scale=bad)
    _assert_bits_equal(_weights(pipe), before)
    assert lora_fast.get_list_adapters(pipe) == {}
    assert _stream_idle(), _C.stream_counters()
    assert lora_fast.load_lora_weights(pipe, path, "a", lora_scale=1.0) == "a"  # the default is fine unfused
    assert lora_fast.get_list_adapters(pipe) == {"unet": ["a"], "text_encoder": ["a"]}
    _assert_bits_equal(_weights(pipe), before)


# ----------------------------------------------------------------------------------------- failures


def _last_factor(path: str) -> tuple[str, str, str]:
    """(adapter key, factor field, file tensor name) of the tensor whose data comes last in the file."""
    adapter, header, _, tensors = fuse_on_load._read_with_views(path)
    last = max(header.tensors.values(), key=lambda h: h.file_offset).name
    for key, layer in adapter.layers.items():
        for field in ("down", "up"):
            if getattr(layer, field).data_ptr() == tensors[last].data_ptr():
                return key, field, last
    raise AssertionError(last)


def test_safe_fusing_nan_in_the_last_layer_leaves_the_model_untouched(tmp_path):
    base = _base(torch.float32)
    adapter = _adapter(base, torch.float32, seed=4)
    path = _save(adapter, tmp_path, "diffusers")
    key, field, last = _last_factor(path)
    getattr(adapter.layers[key], field).view(-1)[0] = float("nan")
    path = _save(adapter, tmp_path, "diffusers")
    assert _last_factor(path)[2] == last and torch.isnan(io.load_file(path)[last]).any()  # found only at the end

    pipe = _pipeline()
    before = _weights(pipe)
    with pytest.raises(LoraFusionError, match="non-finite"):
        _streamed(pipe, path, safe_fusing=True, batch_bytes=1 << 12)
    _assert_bits_equal(_weights(pipe), before)
    assert lora_fast.get_list_adapters(pipe) == {}
    assert _stream_idle(), _C.stream_counters()
    # the name is free again and a clean load works
    with pytest.raises(LoraFusionError):
        lora_fast.load_lora_weights(pipe, path, "a", fuse=True, safe_fusing=True)
    _assert_bits_equal(_weights(pipe), before)
    assert lora_fast.get_list_adapters(pipe) == {}


@pytest.mark.parametrize("fault,at", [("truncate", "first"), ("truncate", "middle"), ("io_error", "late"),
                                      ("modify", "after_last")])
def test_failure_mid_stream_leaves_the_model_untouched(tmp_path, monkeypatch, fault, at):
    base = _base(torch.float32)
    path = _save(_adapter(base, torch.float32, seed=5), tmp_path, "diffusers")
    os.utime(path, (1_000_000_000, 1_000_000_000))  # a modification must move mtime even on a coarse clock
    header = io.read_header(path)
    chunks = -(-(header.file_size - header.data_start) // 1024)
    at = {"first": 0, "middle": chunks // 2, "late": chunks - 2, "after_last": chunks}[at]
    real = io_stream.TensorStream

    def faulty(p, device, dtype, ring_bytes, chunk_bytes, threads):
        return real(p, device, dtype, ring_bytes, chunk_bytes, threads, _fault=(fault, at, 0))

    monkeypatch.setattr(io_stream, "TensorStream", faulty)
    pipe = _pipeline()
    before = _weights(pipe)
    with pytest.raises(LoraFormatError) as info:
        _streamed(pipe, path, batch_bytes=1 << 12)
    assert path in str(info.value)
    _assert_bits_equal(_weights(pipe), before)
    assert lora_fast.get_list_adapters(pipe) == {}
    assert component_state(pipe.unet) is None
    assert _stream_idle(), _C.stream_counters()


def test_validation_errors_change_nothing(tmp_path):
    base = _base(torch.float32)
    path = _save(_adapter(base, torch.float32, seed=6), tmp_path, "diffusers")
    pipe = _pipeline()
    fuse_on_load.load_and_fuse(pipe, path, "a", ring_bytes=8192)
    fused = _weights(pipe)
    with pytest.raises(LoraFormatError, match="already in use"):
        fuse_on_load.load_and_fuse(pipe, path, "a", ring_bytes=8192)
    _assert_bits_equal(_weights(pipe), fused)
    assert lora_fast.get_list_adapters(pipe) == {"unet": ["a"], "text_encoder": ["a"]}


# ----------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_streamed_fuse_equals_load_then_fuse(tmp_path, dtype):
    base = _base(dtype)
    path = _save(_adapter(base, dtype, seed=7), tmp_path, "diffusers")
    ref = _pipeline(dtype).to("cuda")
    original = _weights(ref)
    lora_fast.load_lora_weights(ref, lora_fast.read_lora(path), "a", fuse=True)
    pipe = _pipeline(dtype).to("cuda")
    lora_fast.load_lora_weights(pipe, path, "a", fuse=True)  # CUDA weights: the streaming path
    _assert_bits_equal(_weights(pipe), _weights(ref))
    lora_fast.unfuse_lora(pipe)
    _assert_bits_equal(_weights(pipe), original)
