"""pytest-benchmark cases (run explicitly: ``pytest benchmarks/ --benchmark-only``). Never asserted in CI."""

import pytest
import torch

import lora_fast
from lora_fast import bench
from lora_fast.models import build_components, materialize


@pytest.fixture(scope="module", params=["fp32", "fp16", "bf16"])
def sd15_unet_with_adapter(request):
    dtype = bench.DTYPES[request.param]
    unet = materialize(build_components("sd15", "full", device="meta", text_encoders=False)["unet"], dtype=dtype)
    adapter = bench.make_adapter({"unet": unet}, "attn", 4, dtype=dtype)
    lora_fast.load_lora_weights({"unet": unet}, adapter)
    yield {"unet": unet}
    lora_fast.unload_lora_weights({"unet": unet})


def test_fuse_unfuse_sd15_attn_r4(benchmark, sd15_unet_with_adapter):
    """Warm fuse+unfuse cycles, as ``lora-fast bench`` times them: bench.WARMUP untimed cycles, then bench.REPEATS
    timed ones (compare the median; the first call after loading carries one-time costs and is left out)."""
    target = sd15_unet_with_adapter

    def cycle():
        lora_fast.fuse_lora(target)
        lora_fast.unfuse_lora(target)

    benchmark.pedantic(cycle, rounds=bench.REPEATS, warmup_rounds=bench.WARMUP)
