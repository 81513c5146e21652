"""lora_fast: fast, exact LoRA loading, saving, fusing and serving for diffusion models and any torch model.

Public API (diffusers names where diffusers has the function; ``target`` is a diffusers pipeline,
an ``nn.Module``, or a dict ``{component_name: nn.Module}``):

* I/O: :func:`load_file`, :func:`save_file`, :func:`read_metadata`
* formats: :func:`read_lora` -> :class:`LoraAdapter`, :func:`save_lora_weights`, ``LoraAdapter.save``
* model: :func:`load_lora_weights`, :func:`fuse_lora`, :func:`unfuse_lora`, :func:`unload_lora_weights`
* live (unfused) adapters: :func:`set_adapters`, :func:`get_active_adapters`, :func:`get_list_adapters`,
  :func:`enable_lora`, :func:`disable_lora`, :func:`delete_adapters`, :func:`set_lora_device`,
  :func:`prepare_hotswap`
* serving: :func:`per_sample_adapters` (a different adapter, or mix, for each sample of one batch),
  :class:`AdapterCache` (adapters by id, loaded on demand, device and host tiers bounded by bytes, LRU;
  see docs/serving.md; the Ray Serve deployment is ``lora_fast.serve``, extra ``lora_fast[serve]``)
* errors: :class:`LoraFormatError`, :class:`LoraFusionError` (both ValueError subclasses)
"""

import contextlib
import numbers
import os

from .errors import LoraError, LoraFormatError, LoraFusionError
from .adapter import LoraAdapter, LoraLayer
from .io import load_file, read_metadata, save_file
from .formats import read_lora, save_lora_weights
from . import engine as _engine
from . import fuse_on_load as _fuse_on_load
from . import per_sample as _per_sample
from .cache import AdapterCache

__version__ = "0.1.0"


def load_lora_weights(target, source, adapter_name=None, *, components=None, fuse=False, hotswap=False,
                      max_rank=None, safe_fusing=False, weight_name=None, lora_scale=1.0):
    """Read a LoRA (any supported format, a path, a directory, a state dict or a LoraAdapter) and make it live.

    Every LoRA module is first checked to exist in the target with a matching shape; otherwise
    LoraFormatError is raised and nothing changes. Component prefixes (``unet``, ``transformer``,
    ``text_encoder``, ``text_encoder_2``) map to the pipeline's components; a plain module takes
    un-prefixed keys, or the part of the file named by ``components=`` (e.g. ``["unet"]``).
    As in diffusers, the new adapter becomes the only active one. ``adapter_name`` defaults to
    ``default_0``, ``default_1``, ... ``fuse=True`` also fuses it (as ``fuse_lora(target, lora_scale=lora_scale,
    adapter_names=[name])``, with ``safe_fusing``), bit for bit, on every path. Returns the adapter name.

    ``lora_scale`` (only with ``fuse=True``) is the strength the adapter is baked in with: a number, or a dict
    ``{component: number}`` (``{"unet": 0.8, "text_encoder": 0.5}``; a component left out gets 1.0). As with
    :func:`fuse_lora` it is not sticky: after :func:`unfuse_lora` the adapter runs live at weight 1.0. Without
    ``fuse=True`` any value other than 1.0 raises LoraFusionError before anything is read (diffusers has no load-time
    scale; for a live adapter use ``set_adapters(target, name, weight)`` or the per-call
    ``cross_attention_kwargs={"scale": ...}``).

    Fuse-on-load: with ``fuse=True``, a single safetensors file and weights on a CUDA device (or on the CPU with
    ``LORA_FAST_STREAM_FUSE=1``), the file is streamed to the device and each batch of layers is fused as its
    factors arrive, so reading overlaps fusing. The result is bit-identical to loading then fusing; any error
    (a file truncated mid-read, a non-finite result under ``safe_fusing``) leaves every weight bit-identical
    and no adapter registered.

    Live (unfused) use: afterwards the target computes y = base(x) + Σ_i w_i·s_i·B_i(A_i(x)) through
    removable forward hooks (no module is replaced, no state_dict key changes, no PEFT). A target that
    already holds diffusers/PEFT LoRA layers raises LoraFormatError.

    Hotswap: ``hotswap=True`` with the name of a loaded adapter writes the new weights into that
    adapter's tensors in place (a torch.compile'd model does not recompile). Choose ``max_rank`` at the
    first load (or call :func:`prepare_hotswap`) so that later adapters of higher rank fit; an adapter
    whose rank exceeds it, or that targets modules the loaded one does not, raises LoraFormatError and
    changes nothing. A fused adapter cannot be hotswapped (LoraFusionError).

    ``weight_name`` (as in diffusers) picks a file inside a directory ``source``.
    """
    if not fuse and not (isinstance(lora_scale, numbers.Real) and not isinstance(lora_scale, bool)
                         and lora_scale == 1.0):
        raise LoraFusionError(
            f"load_lora_weights: lora_scale={lora_scale!r} is the strength of a fused load and needs fuse=True "
            "(a hotswap never fuses); nothing was loaded. For a live adapter use lora_fast.set_adapters(target, name, weight) or pass "
            "cross_attention_kwargs={'scale': ...} per call"
        )
    if weight_name is not None and not isinstance(source, (LoraAdapter, dict)):
        source = os.path.join(os.fspath(source), weight_name)
    if fuse and not hotswap and _fuse_on_load.wants_stream(source) and _fuse_on_load.stream_selected(target):
        return _fuse_on_load.load_and_fuse(target, source, adapter_name, components=components, max_rank=max_rank,
                                           safe_fusing=safe_fusing, lora_scale=lora_scale)
    adapter = source if isinstance(source, LoraAdapter) else read_lora(source)
    if hotswap:
        if adapter_name is None:
            raise LoraFormatError("hotswap=True needs the adapter_name of the loaded adapter to replace")
        if fuse:
            raise LoraFormatError("hotswap=True and fuse=True cannot be combined")
        return _engine.hotswap(target, adapter, adapter_name, components=components)
    if fuse:  # a bad lora_scale raises before the adapter is registered
        _engine.component_scales(lora_scale, _engine.resolve_components(target))
    name = _engine.bind(target, adapter, adapter_name, components=components, max_rank=max_rank)
    if fuse:
        try:
            _engine.fuse(target, lora_scale=lora_scale, adapter_names=[name], safe_fusing=safe_fusing)
        except BaseException:
            _engine.delete(target, [name])
            raise
    return name


def fuse_lora(target, lora_scale=1.0, safe_fusing=False, adapter_names=None, components=None, adapter_weights=None):
    """Fuse adapters into the base weights: W <- round(W + lora_scale · Σ_i w_i · s_i · B_i A_i).

    ``lora_scale`` is a number, or a dict ``{component: number}`` (a component left out gets 1.0).

    fp32 accumulation, one rounding to W's dtype, each weight read and written once. ``adapter_names``
    None means the active adapters; ``adapter_weights`` is a list parallel to ``adapter_names`` (None:
    each adapter's current weight, 1.0 unless set). ``lora_scale`` and ``adapter_weights`` are not
    sticky. With ``safe_fusing=True`` a non-finite result raises LoraFusionError naming the module and
    leaves every weight bit-identical. A second fuse composes; one :func:`unfuse_lora` undoes all.
    """
    _engine.fuse(target, lora_scale=lora_scale, safe_fusing=safe_fusing, adapter_names=adapter_names,
                 components=components, adapter_weights=adapter_weights)


def unfuse_lora(target, components=None):
    """Restore every fused weight bit for bit (any number of cycles, scales, adapter sets and dtypes)."""
    _engine.unfuse(target, components=components)


def unload_lora_weights(target):
    """Drop every adapter and remove every hook. Fused weights stay baked in (and can no longer be unfused),
    as in diffusers; with nothing fused the model is left bit-identical to before the first load."""
    _engine.unload(target)


def set_adapters(target, adapter_names, adapter_weights=None):
    """Make ``adapter_names`` the active live adapters, with weights (diffusers semantics).

    ``adapter_weights``: None (1.0 each), one float for all, a list parallel to the names, where each
    entry may be a float or a dict per component (``{"unet": 0.5, "text_encoder": 0.2}``; a component
    left out gets 1.0). Takes O(adapters) time whatever the model size.
    """
    _engine.set_adapters(target, adapter_names, adapter_weights)


def get_active_adapters(target):
    """Names of the active adapters (union over components, in load/activation order)."""
    return _engine.get_active_adapters(target)


def get_list_adapters(target):
    """{component: [adapter names]} for every component holding adapters (key None for a plain module)."""
    return _engine.get_list_adapters(target)


def enable_lora(target):
    """Turn the live (unfused) LoRA terms back on. Fused adapters are unaffected."""
    _engine.set_enabled(target, True)


def disable_lora(target):
    """Turn the live (unfused) LoRA terms off, keeping adapters loaded. Fused adapters stay fused."""
    _engine.set_enabled(target, False)


def delete_adapters(target, adapter_names):
    """Forget adapters and their hooks. A fused adapter raises LoraFusionError until unfused."""
    _engine.delete(target, adapter_names)


def set_lora_device(target, adapter_names, device):
    """Move these adapters' tensors (nothing else) to ``device``. An adapter not on its module's device is
    unused until moved back; a fused adapter raises LoraFusionError."""
    _engine.set_device(target, adapter_names, device)


def prepare_hotswap(target, max_rank):
    """Pad every loaded adapter, and every later load, to rank ``max_rank`` so that hotswapping any adapter
    of rank <= max_rank keeps tensor shapes (no torch.compile recompilation). Call before compiling."""
    _engine.prepare_hotswap(target, max_rank)


@contextlib.contextmanager
def per_sample_adapters(target, adapters, *, components=None):
    """Run each sample of a batch with its own adapter (or mix of adapters) in one forward pass.

    ``adapters`` has one entry per sample (per image): an adapter name, a dict ``{adapter name: weight}`` to mix
    adapters for that sample, or None for the base model alone. Inside the ``with`` block, an adapted layer whose
    batch is k times ``len(adapters)`` uses entry ``j mod len(adapters)`` for sample j: with classifier-free
    guidance (uncond samples, then cond samples) both halves of image i use entry i. A layer batch that is not a
    multiple raises LoraFormatError (a ValueError) naming the component and layer. ``components`` (e.g.
    ``["unet"]``) limits per-sample adapters to those components; the others keep their ``set_adapters``
    selection. The per-call scale (``cross_attention_kwargs={"scale": s}``) still applies; ``set_adapters``
    weights do not (each entry carries its own weights, 1.0 for a plain name).

    Each sample's output matches running that sample alone after ``set_adapters`` with its entry. Linear layers use
    the segmented shrink/expand kernels (Triton on CUDA: one launch each for all adapters of the batch, rows
    grouped by adapter), convolutions batched products over the samples; other layers (grouped convs,
    embeddings, DoRA, LoRA biases) and autograd run each adapter's live forward on its samples. Adapters must be loaded unfused: a fused adapter in a selected component raises
    LoraFusionError, and so does ``fuse_lora`` inside the block. Unknown adapter names raise LoraFormatError.
    Leaving the block restores the previous adapter selection exactly.

    Example::

        with lora_fast.per_sample_adapters(pipe, ["pixel", "ink", None, {"pixel": 0.5, "ink": 0.5}]):
            images = pipe(["a cat"] * 4, generator=[torch.Generator().manual_seed(i) for i in range(4)]).images
    """
    installed = _per_sample.activate(target, adapters, components)
    try:
        yield
    finally:
        _per_sample.deactivate(installed)


__all__ = [
    "LoraError", "LoraFormatError", "LoraFusionError", "LoraAdapter", "LoraLayer",
    "load_file", "read_metadata", "save_file", "read_lora", "save_lora_weights",
    "load_lora_weights", "fuse_lora", "unfuse_lora", "unload_lora_weights",
    "set_adapters", "get_active_adapters", "get_list_adapters", "enable_lora", "disable_lora", "delete_adapters",
    "set_lora_device", "prepare_hotswap", "per_sample_adapters", "AdapterCache",
]
