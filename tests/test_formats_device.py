"""read_lora(device=...): tensors land on the device; CUDA goes through the streaming loader."""

import pytest
import torch

import lora_fast
from lora_fast import LoraAdapter, LoraLayer


def _adapter():
    g = torch.Generator().manual_seed(0)
    return LoraAdapter({"unet.a.to_q": LoraLayer(torch.randn(4, 8, generator=g), torch.randn(6, 4, generator=g), 2.0),
                        "unet.a.to_k": LoraLayer(torch.randn(2, 8, generator=g).half(), torch.randn(6, 2, generator=g).half(), 3.0)},
                       "diffusers")


def _check_same(a, b, device):
    assert set(a.layers) == set(b.layers)
    for k in a.layers:
        assert b.layers[k].down.device.type == torch.device(device).type
        assert torch.equal(a.layers[k].down, b.layers[k].down.cpu())
        if torch.device(device).type == "cpu":
            assert torch.equal(a.layers[k].delta(), b.layers[k].delta())
        else:  # another BLAS (cuBLAS) sums the rank-r products in its own order: equal up to fp32 rounding
            torch.testing.assert_close(b.layers[k].delta().cpu(), a.layers[k].delta(), rtol=1e-6, atol=1e-7)
        assert a.layers[k].alpha == b.layers[k].alpha


def test_read_lora_device_cpu_file_and_state_dict(tmp_path):
    ad = _adapter()
    path = tmp_path / "pytorch_lora_weights.safetensors"
    ad.save(path)
    _check_same(ad, lora_fast.read_lora(path, device="cpu"), "cpu")
    _check_same(ad, lora_fast.read_lora(tmp_path, device="cpu"), "cpu")
    sd = lora_fast.load_file(path)  # no header metadata: alpha = rank, so compare the factors only
    from_sd = lora_fast.read_lora(sd, device="cpu")
    for k, layer in ad.layers.items():
        assert torch.equal(layer.up, from_sd.layers[k].up) and from_sd.layers[k].alpha == layer.rank


@pytest.mark.cuda
def test_read_lora_device_cuda(tmp_path):
    ad = _adapter()
    path = tmp_path / "pytorch_lora_weights.safetensors"
    ad.save(path)
    _check_same(ad, lora_fast.read_lora(path, device="cuda"), "cuda")
