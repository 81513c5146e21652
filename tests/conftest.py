"""Shared fixtures: tiny diffusion models, PEFT-injected models, and reference deltas from live PEFT layers.

The models are built once per session from configs (lora_fast.models, random weights) and deep-copied
per test, because injecting adapters mutates them.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lora_fast.models import build_components


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.cuda`` is the one way a test says it needs a GPU: it is skipped without one, and
    ``pytest -m cuda`` on a GPU machine selects every such test (the GPU suite runs exactly that)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked cuda)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def _sd15_template():
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    return build_components("sd15", "tiny", seed=0)


@pytest.fixture(scope="session")
def _sdxl_template():
    pytest.importorskip("diffusers")
    return build_components("sdxl", "tiny", seed=0)


@pytest.fixture
def sd15(_sd15_template):
    """Fresh tiny SD1.5 components: {"unet": UNet2DConditionModel, "text_encoder": CLIPTextModel}."""
    return copy.deepcopy(_sd15_template)


@pytest.fixture
def sd15_pair(_sd15_template):
    """Two independent copies with identical weights (one to train/save from, one to load into)."""
    return copy.deepcopy(_sd15_template), copy.deepcopy(_sd15_template)


@pytest.fixture
def sdxl(_sdxl_template):
    return copy.deepcopy(_sdxl_template)


class TinyMixed(torch.nn.Module):
    """One module of each kind PEFT wraps: Linear, k×k Conv2d, 1×1 Conv2d, Embedding."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(11, 6)
        self.lin = torch.nn.Linear(6, 5)
        self.block = torch.nn.Module()
        self.block.lin = torch.nn.Linear(5, 7)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.pw = torch.nn.Conv2d(4, 4, 1)


@pytest.fixture
def tiny_mixed():
    torch.manual_seed(0)
    return TinyMixed()


def lora_modules(model, adapter=None):
    """{module name: PEFT LoraLayer} for every module holding ``adapter`` (any adapter if None)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            names = set(module.lora_A) | set(module.lora_embedding_A)
            if adapter is None or adapter in names:
                out[name] = module
    return out


def reference_delta(module, adapter: str) -> torch.Tensor:
    """scale·B·A of one live PEFT layer, from first principles, in float64, shaped like the base weight."""
    scaling = module.scaling[adapter]
    base = module.get_base_layer().weight
    if adapter in module.lora_embedding_A:
        a = module.lora_embedding_A[adapter].double()  # (r, num_embeddings)
        b = module.lora_embedding_B[adapter].double()  # (dim, r)
        return (b @ a).t() * scaling
    a = module.lora_A[adapter].weight.double()
    b = module.lora_B[adapter].weight.double()
    d = b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)
    if getattr(module, "fan_in_fan_out", False):
        d = d.t()
    return (d * scaling).reshape(base.shape)


def randomize_lora(model, seed=0):
    """Give every LoRA parameter (incl. DoRA magnitudes, lora_B biases) non-trivial random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if "magnitude" in name else 0.0))


class TinySDPipeline:
    """Just enough of a pipeline for diffusers' StableDiffusionLoraLoaderMixin.load_lora_weights."""

    def __init__(self, unet, text_encoder):
        self.unet = unet
        self.text_encoder = text_encoder
        self.hf_device_map = None

    @property
    def components(self):
        return {"unet": self.unet, "text_encoder": self.text_encoder}


@pytest.fixture(scope="session")
def tiny_pipeline_cls():
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    return type("TinySDLoraPipeline", (TinySDPipeline, StableDiffusionLoraLoaderMixin), {})


@pytest.fixture(scope="session")
def peft_helpers():
    """The helper functions above, for test modules (conftest is not importable as a module)."""

    class H:
        pass

    h = H()
    h.lora_modules = staticmethod(lora_modules)
    h.reference_delta = staticmethod(reference_delta)
    h.randomize_lora = staticmethod(randomize_lora)
    h.TinyMixed = TinyMixed
    return h


def our_key(component, module_name: str) -> str:
    """The LoraAdapter key of a live module: CLIP paths keep ``text_model.`` (transformers 5 drops it)."""
    from lora_fast.formats.peft import normalize_text_encoder_path

    path = normalize_text_encoder_path(component, module_name)
    return f"{component}.{path}" if component else path


@pytest.fixture(scope="session")
def key_of():
    return our_key
