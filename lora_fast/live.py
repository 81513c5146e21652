"""Unfused ("live") LoRA forward without PEFT: forward hooks that add the LoRA terms to a module's output.

Each adapted module gets one removable forward hook (a :class:`ModuleHook`); the hook holds one
:class:`LiveSlot` per adapter on that module. The module tree, its attributes and its state_dict
never change. After the base forward the hook adds, for every live adapter i,

    y += λ · w_i · s_i · B_i(A_i(x))

as two small products (shrink to rank r, expand back): B·A is never materialized. λ is the
per-call scale (diffusers' ``cross_attention_kwargs={"scale": λ}``), w_i the ``set_adapters``
weight, s_i = alpha/r. w_i and s_i live in 0-d tensors so that changing them (``set_adapters``,
hotswap) changes data, not code: a ``torch.compile``d model does not recompile.

Eager calls: which adapters are live is decided lazily: the component state carries a version number that
``set_adapters``/``enable``/``fuse``/... bump, and a hook rebuilds its plan (the tuple of slots to
run) at its next forward when the number changed. So switching adapters costs O(adapters), never
O(modules).

Traced calls (torch.compile): which adapters run is data, not code. Every state change ends in
``ComponentState.bump``, which calls :func:`sync_state`: it writes one 0-d bool *gate* per adapter of the
component (enabled, active and not fused) and refreshes the DoRA norm caches of live adapters against the current
base weights. A traced hook reads no plan, version or cache of its own: it runs every slot it holds and keeps each
one's result with ``torch.where(gate, out + term, out)``, so a gated-off adapter contributes exactly nothing
(NaN/Inf and the sign of zero included) and the graph guards only on what stays put while one fixed set of
adapters is loaded. (A module holding a DoRA adapter is the exception: DoRA terms are not additive, so there the
traced hook follows the active list's order and guards on it.) After the first compiled call, set_adapters (names
and weights), enable/disable, fuse/unfuse and hotswap compile nothing new; the per-call scale λ costs at most two
more graphs (the first value other than the first call's, then λ = 0). Loading or deleting an adapter,
set_lora_device, prepare_hotswap or moving the model changes what the graph holds and compiles once more
(docs/compile.md). The price: a compiled model computes the branch of every loaded adapter of a module, active or
not. Slots follow a model moved to another device/dtype after the load at its next forward; under torch.compile
that move happens during the trace and costs one more compile, so move the model before loading adapters.

DoRA: magnitude axis "out" (PEFT) uses PEFT's forward formula
``y = m/‖W + cΔ‖_row · (W x + c·B A x) + b``; the row norms come from three cached vectors
(‖W_i‖², W_i·(BA)_i, ‖(BA)_i‖²) so a new scale c costs a few vector ops. Axis "in" (kohya
``dora_scale``) follows the fuse formula W' = W + f·(W_d − W), W_d = V·diag(m/‖V‖_col), V = W + sΔ,
computed as W(g⊙x) + s·B A(g⊙x) with g = m/‖V‖_col. Rare cases (DoRA on an Embedding or a
fan_in_fan_out Conv1D, grouped convolutions) fall back to a dense per-forward delta
(:class:`DenseSlot`), which does materialize the delta.
"""

from __future__ import annotations

import inspect
import os
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import LoraLayer
from .kernels.shrink_expand import (AdapterGroups, RowMap, build_row_map, channels_first_lora, make_groups,
                                    segmented_expand, segmented_shrink)
from .targets import is_fan_in_fan_out

#: keyword arguments through which diffusers models receive the per-call LoRA scale
SCALE_KWARGS = ("cross_attention_kwargs", "joint_attention_kwargs", "attention_kwargs")


FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def live_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a module's live LoRA branch runs in: its weight's, except for a weight stored in fp8, whose module
    computes in another dtype: diffusers' layerwise casting upcasts the weight to its ``compute_dtype`` for the
    forward and back to fp8 after it (before forward hooks run), so the factors are kept and multiplied in that
    compute dtype (never in fp8); an fp8 weight without that hook (ComfyUI/Forge-style casting layers) uses bf16."""
    dtype = module.weight.dtype
    if dtype not in FP8_DTYPES:
        return dtype
    registry = getattr(module, "_diffusers_hook", None)
    hook = registry.get_hook("layerwise_casting") if registry is not None else None
    compute = getattr(hook, "compute_dtype", None)
    return compute if isinstance(compute, torch.dtype) and compute not in FP8_DTYPES else torch.bfloat16


def module_kind(module: nn.Module) -> str:
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Conv2d):
        return "conv"
    return "linear"


def needs_dense(module: nn.Module, layer: LoraLayer) -> bool:
    """Cases the factored forward does not cover: the delta is applied as a dense weight instead."""
    kind = module_kind(module)
    if layer.algorithm != "lora":  # LoHa / LoKr / full diff: no factored form; delta() from the factors per forward
        return True
    if kind == "conv" and module.groups != 1:
        return True
    if layer.magnitude is not None and (kind == "embedding" or is_fan_in_fan_out(module)):
        return True
    return False


def dora_weight(weight: torch.Tensor, layer: LoraLayer, factor: float) -> torch.Tensor:
    """The DoRA-merged weight in float32 (rounded to weight's dtype). ``weight`` is (out, in, ...).

    PEFT axis ("out"): m/‖W+fΔ‖_row·(W+fΔ). kohya axis ("in"): per input column, blended by the
    strength as A1111/ComfyUI do: W + f·(W_d − W) with W_d = V·m/‖V‖_col, V = W + Δ (Δ includes s).
    """
    w32 = weight.float()
    delta = layer.delta().reshape(weight.shape).to(w32.device)
    mag = layer.magnitude.float().to(w32.device)
    if layer.magnitude_axis == "out":
        v = w32 + factor * delta
        rows = v.reshape(v.shape[0], -1)
        norm = rows.norm(dim=1, keepdim=True)
        out = rows * (mag.reshape(-1, 1) / norm)
        return out.reshape(weight.shape).to(weight.dtype)
    v = w32 + delta
    dims = [d for d in range(v.dim()) if d != 1]
    norm = torch.linalg.vector_norm(v, dim=dims, keepdim=True) if dims else v.abs()
    wd = v * (mag.reshape(norm.shape) / norm)
    return (w32 + factor * (wd - w32)).to(weight.dtype)


def _conv_input(module: nn.Conv2d, x: torch.Tensor):
    """(input, padding) as the base conv sees them (non-zero padding modes pad explicitly)."""
    if module.padding_mode != "zeros":
        return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode), 0
    return x, module.padding


def _base_no_bias(module: nn.Module, kind: str, x: torch.Tensor) -> torch.Tensor:
    """W x with the module's own weight and geometry, without bias (DoRA "in" axis)."""
    if kind == "conv":
        xin, pad = _conv_input(module, x)
        return F.conv2d(xin, module.weight, None, module.stride, pad, module.dilation, module.groups)
    return F.linear(x, module.weight)


def _channel_view(v: torch.Tensor, kind: str) -> torch.Tensor:
    """A per-channel vector shaped to broadcast over the channel dim of an activation."""
    return v.view(1, -1, 1, 1) if kind == "conv" else v


class LiveSlot:
    """One adapter's factored branch on one module, in the module's dtype and on its device.

    down: linear (R, in) · conv (R, in, kh, kw) · embedding (num, R) (i.e. Aᵀ, ready for F.embedding).
    up: linear/embedding (out, R) · conv (out, R, 1, 1). R is the capacity (rank padded for hotswap;
    the padding holds zeros). ``scale`` (s) and ``weight`` (w, shared by the adapter's slots in one
    component) are 0-d float32 CPU tensors.
    """

    dense = False

    def __init__(self, module: nn.Module, layer: LoraLayer, weight: torch.Tensor, capacity: Optional[int] = None):
        self.kind = module_kind(module)
        self.weight = weight
        self.scale = torch.tensor(layer.scale, dtype=torch.float32)
        self.pinned = False  # set_lora_device parked it: it no longer follows the module's device/dtype
        self.cache_key = None  # what the DoRA caches were computed for
        w = module.weight
        down, up = self._live_factors(module, layer, w.device, live_dtype(module))
        rank = self._rank_of(down)
        cap = max(rank, capacity or 0)
        if cap == rank:  # no padding: keep the factors as they are (views of the file's tensors when possible)
            self.down, self.up, self.owned = down, up, False
        else:
            self.down = torch.zeros(self._padded_shape(down, cap), dtype=down.dtype, device=down.device)
            self.up = torch.zeros(self._padded_shape(up, cap, up_side=True), dtype=up.dtype, device=up.device)
            self.owned = True
            self._write(down, up)
        self.capacity = cap
        self.bias = None if layer.bias is None else layer.bias.to(device=w.device, dtype=live_dtype(module))
        self.magnitude_axis = layer.magnitude_axis if layer.magnitude is not None else None
        self.magnitude = None if layer.magnitude is None else layer.magnitude.float().reshape(-1).to(w.device)
        self._caches = None

    # ---------------------------------------------------------------- layout helpers

    def _rank_of(self, down: torch.Tensor) -> int:
        return int(down.shape[1] if self.kind == "embedding" else down.shape[0])

    def _padded_shape(self, t: torch.Tensor, cap: int, up_side: bool = False) -> tuple:
        shape = list(t.shape)
        if up_side or self.kind == "embedding":
            shape[1] = cap
        else:
            shape[0] = cap
        return tuple(shape)

    def _live_factors(self, module: nn.Module, layer: LoraLayer, device, dtype):
        """(down, up) of ``layer`` in this slot's layout, unpadded."""
        if self.kind == "embedding":
            down = layer.down.t()
            up = layer.up.reshape(layer.up.shape[0], -1)
        elif self.kind == "conv":
            out_ch, in_ch, kh, kw = module.weight.shape
            if layer.mid is not None:
                up2, a = layer.factors()  # Tucker core folded into A (float32)
                down = a.reshape(a.shape[0], in_ch, kh, kw)
                up = up2.reshape(out_ch, -1, 1, 1)
            else:
                down = layer.down.reshape(layer.down.shape[0], in_ch, kh, kw)
                up = layer.up.reshape(out_ch, -1, 1, 1)
        else:
            down = layer.down.reshape(layer.down.shape[0], -1)
            up = layer.up.reshape(layer.up.shape[0], -1)
        return down.to(device=device, dtype=dtype), up.to(device=device, dtype=dtype)

    def _write(self, down: torch.Tensor, up: torch.Tensor) -> None:
        """Copy unpadded factors into the (owned, padded) buffers; the rest becomes zero."""
        r = self._rank_of(down)
        if self.kind == "embedding":
            self.down[:, :r].copy_(down)
            self.down[:, r:].zero_()
        else:
            self.down[:r].copy_(down)
            self.down[r:].zero_()
        self.up[:, :r].copy_(up)
        self.up[:, r:].zero_()

    # ---------------------------------------------------------------- state changes

    @property
    def device(self) -> torch.device:
        return self.down.device

    @property
    def dtype(self) -> torch.dtype:
        return self.down.dtype

    def rank_fits(self, module: nn.Module, layer: LoraLayer) -> Optional[str]:
        """None if ``layer`` can be written into this slot in place, else why not."""
        if layer.algorithm != "lora":
            return _algorithm_change("LoRA", _ALGORITHM_LABELS[layer.algorithm] + " (computed densely)")
        if needs_dense(module, layer):
            return "needs the dense fallback path"
        if (layer.magnitude is None) != (self.magnitude is None):
            return "DoRA magnitudes present in one adapter and not the other"
        if layer.magnitude is not None and layer.magnitude_axis != self.magnitude_axis:
            return "DoRA magnitude axis differs"
        if layer.bias is not None and self.bias is None:
            return "the new adapter has a LoRA bias the first did not"
        r = int(layer.mid.shape[0]) if (layer.mid is not None and self.kind == "conv") else layer.rank
        if r > self.capacity:
            return f"rank {r} exceeds the slot's rank {self.capacity} (load the first adapter with max_rank= or call prepare_hotswap)"
        return None

    def load(self, module: nn.Module, layer: LoraLayer) -> None:
        """Hotswap: write ``layer`` into the existing buffers (same tensors, new values)."""
        down, up = self._live_factors(module, layer, self.device, self.dtype)
        if not self.owned:  # the buffers are the first file's tensors: never write into those
            self.down = torch.zeros_like(self.down)
            self.up = torch.zeros_like(self.up)
            self.owned = True
        self._write(down, up)
        self.scale.fill_(layer.scale)
        if self.bias is not None:
            if layer.bias is None:
                self.bias.zero_()
            else:
                self.bias.copy_(layer.bias)
        if self.magnitude is not None:
            self.magnitude.copy_(layer.magnitude.float().reshape(-1))
            self.refresh_caches(module, self.cache_key)

    def clear(self) -> None:
        """Hotswap to an adapter that does not touch this module: contribute exactly zero."""
        if not self.owned:
            self.down = torch.zeros_like(self.down)
            self.up = torch.zeros_like(self.up)
            self.owned = True
        else:
            self.down.zero_()
            self.up.zero_()
        if self.bias is not None:
            self.bias.zero_()

    def to(self, device=None, dtype=None) -> None:
        def mv(t, float_dtype=dtype):
            return None if t is None else t.to(device=device, dtype=float_dtype)

        old = self.down
        self.down, self.up, self.bias = mv(self.down), mv(self.up), mv(self.bias)
        self.magnitude = mv(self.magnitude, None)
        self.owned = self.owned or self.down is not old  # a no-op move still holds the file's tensors
        self.cache_key = None
        self._caches = None

    # ---------------------------------------------------------------- DoRA caches

    def refresh_caches(self, module: nn.Module, key) -> None:
        """Norm ingredients from W and the factors, without forming B·A (float32)."""
        if self.magnitude is None:
            return
        w = module.weight.detach()
        w2 = w.reshape(w.shape[0], -1).float()
        if self.kind == "embedding":  # not reached: DoRA embeddings use the dense path
            raise AssertionError("DoRA on an embedding uses DenseSlot")
        a = self.down.reshape(self.down.shape[0], -1).float()  # (R, in_flat)
        b = self.up.reshape(self.up.shape[0], -1).float()  # (out, R)
        if self.magnitude_axis == "out":
            p = (w2 * w2).sum(dim=1)
            q = (b * (w2 @ a.t())).sum(dim=1)  # W_i · (BA)_i
            t = ((b @ (a @ a.t())) * b).sum(dim=1)  # ‖(BA)_i‖²
            self._caches = (p, q, t)
        else:
            s = float(self.scale)
            p = (w2 * w2).sum(dim=0)
            q = (a * (b.t() @ w2)).sum(dim=0)  # W_:j · (BA)_:j
            t = (a * ((b.t() @ b) @ a)).sum(dim=0)  # ‖(BA)_:j‖²
            col = p + (2.0 * s) * q + (s * s) * t
            if self.kind == "conv":
                col = col.reshape(w.shape[1], -1).sum(dim=1)  # norm over out, kh, kw per input channel
            gain = self.magnitude / col.sqrt()
            self._caches = (gain.to(self.dtype),)
        self.cache_key = key

    # ---------------------------------------------------------------- forward

    def _lora(self, module: nn.Module, x: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """coef · (B(A x) + bias), in the slot dtype."""
        kind = self.kind
        if kind == "conv":
            xin, pad = _conv_input(module, x)
            h = F.conv2d(xin, self.down, None, module.stride, pad, module.dilation)
            d = F.conv2d(h * coef, self.up)
            if self.bias is not None:
                d = d + (self.bias * coef).view(1, -1, 1, 1)
            return d
        if kind == "embedding":
            h = F.embedding(x, self.down)
        else:
            h = F.linear(x, self.down)
        return F.linear(h * coef, self.up, None if self.bias is None else self.bias * coef)

    def _in_place(self, out: torch.Tensor) -> bool:
        """A plain linear LoRA may accumulate into the layer's fresh output when autograd does not need it."""
        return (self.kind == "linear" and self.bias is None and out.dtype == self.down.dtype and out.dim() >= 1
                and out.is_contiguous() and not (torch.is_grad_enabled() and out.requires_grad))

    def apply(self, module: nn.Module, x: torch.Tensor, out: torch.Tensor, lam: float, weight=None,
              in_place: bool = True) -> torch.Tensor:
        """out + this adapter's terms; ``weight`` (a float) replaces the set_adapters weight (per-sample use).
        ``in_place=False``: never write into ``out`` (the traced path keeps ``out`` for its gate)."""
        if weight is None:
            weight = self.weight
        if x.dtype != self.down.dtype and self.kind != "embedding":
            x = x.to(self.down.dtype)
        if self.magnitude is None:
            coef = self.scale * weight
            if lam != 1.0 or torch.compiler.is_compiling():  # traced: no guard on λ == 1
                coef = coef * lam
            if in_place and self._in_place(out):
                # out += coef·(A x) Bᵀ as one accumulating matmul into the output: no output-sized temporaries, and
                # coef (a host scalar) enters as the matmul's alpha, in fp32, instead of one more pass over A x
                h = F.linear(x, self.down)
                out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), self.up.t(), alpha=float(coef))
                return out
            return out + self._lora(module, x, coef).to(out.dtype)
        bias = getattr(module, "bias", None)
        base = out if bias is None else out - _channel_view(bias, self.kind)
        if self.magnitude_axis == "out":
            c = self.scale * weight
            if lam != 1.0 or torch.compiler.is_compiling():
                c = c * lam
            p, q, t = self._caches
            gain = self.magnitude / (p + 2.0 * c * q + c * c * t).sqrt()
            g = _channel_view(gain.to(out.dtype), self.kind)
            lora = self._lora(module, x, c.to(x.dtype)).to(out.dtype)
            return out + (g - 1.0) * base + g * lora
        (gain,) = self._caches
        outer = weight if lam == 1.0 and not torch.compiler.is_compiling() else weight * lam
        xg = x * _channel_view(gain, self.kind)
        dora = _base_no_bias(module, self.kind, xg) + self._lora(module, xg, self.scale)
        return out + (outer * (dora.to(out.dtype) - base))


class DenseSlot:
    """Fallback for what the factored path does not cover: the delta is formed per forward and applied
    with the module's own functional form (grouped convs, DoRA on embeddings / fan_in_fan_out)."""

    dense = True

    def __init__(self, module: nn.Module, layer: LoraLayer, weight: torch.Tensor, capacity: Optional[int] = None):
        self.kind = module_kind(module)
        self.layer = layer.to(device=module.weight.device)
        self.weight = weight
        self.pinned = False
        self.owned = False  # the layer's tensors may be the adapter's own: a hotswap copies them first (load)
        self.capacity = layer.rank
        self.magnitude = layer.magnitude
        self.cache_key = None

    @property
    def device(self) -> torch.device:
        return self.layer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.layer.dtype

    def rank_fits(self, module, layer) -> Optional[str]:
        """None if ``layer`` can be written into this slot's tensors in place (same algorithm, the same tensors with
        the same shapes and dtypes, DoRA and bias alike), else why not."""
        old = self.layer
        if layer.algorithm != old.algorithm or not needs_dense(module, layer):
            new = _ALGORITHM_LABELS[layer.algorithm] + ("" if needs_dense(module, layer) else " (factored live path)")
            return _algorithm_change(_ALGORITHM_LABELS[old.algorithm] + " (computed densely)", new)
        a, b = _dense_tensors(old), _dense_tensors(layer)
        if set(a) != set(b):
            return (f"the new adapter's {_ALGORITHM_LABELS[layer.algorithm]} layer has tensors {sorted(b)}, the loaded "
                    f"one {sorted(a)} (another factor form): load it as a new adapter")
        for name, t in a.items():
            if tuple(t.shape) != tuple(b[name].shape) or t.dtype != b[name].dtype:
                return (f"{name} is {tuple(b[name].shape)} {b[name].dtype} in the new adapter, "
                        f"{tuple(t.shape)} {t.dtype} in the loaded one")
        if layer.magnitude is not None and layer.magnitude_axis != old.magnitude_axis:
            return "DoRA magnitude axis differs"
        return None

    def load(self, module: nn.Module, layer: LoraLayer) -> None:
        """Hotswap (after :meth:`rank_fits`): the new values written into this slot's tensors. The first swap gives
        the slot its own copies (the loaded tensors are the first file's), later ones write in place."""
        if not self.owned:
            old = self.layer
            self.layer = LoraLayer(
                down=_clone(old.down), up=_clone(old.up), alpha=old.alpha, kind=old.kind, use_rslora=old.use_rslora,
                magnitude=_clone(old.magnitude), magnitude_axis=old.magnitude_axis,
                fan_in_fan_out=old.fan_in_fan_out, bias=_clone(old.bias), mid=_clone(old.mid),
                algorithm=old.algorithm, lycoris={k: v.clone() for k, v in old.lycoris.items()}, shape=old.shape)
            self.owned = True
        new = _dense_tensors(layer)
        with torch.no_grad():
            for name, t in _dense_tensors(self.layer).items():
                t.copy_(new[name])
        self.layer.alpha, self.layer.use_rslora = layer.alpha, layer.use_rslora
        self.layer.__dict__.pop("_kron_halves", None)  # LoKr: rebuilt from the new values
        self.magnitude = self.layer.magnitude

    def to(self, device=None, dtype=None) -> None:
        self.layer = self.layer.to(device=device)

    def refresh_caches(self, module, key) -> None:
        pass

    def apply(self, module: nn.Module, x: torch.Tensor, out: torch.Tensor, lam: float, weight=None,
              in_place: bool = True) -> torch.Tensor:
        if torch.compiler.is_compiling():  # float() of a tensor would break the graph: keep the factor a tensor
            factor = (self.weight if weight is None else weight) * lam
        else:
            factor = float(self.weight if weight is None else weight) * lam
        w = module.weight
        if self.layer.magnitude is not None:
            w_oi = w.t() if is_fan_in_fan_out(module) else w
            delta = dora_weight(w_oi, self.layer, factor).float() - w_oi.float()
            if is_fan_in_fan_out(module):
                delta = delta.t()
        else:
            delta = self.layer.delta().to(w.device) * factor
        cdt = live_dtype(module)
        delta = delta.reshape(w.shape).to(cdt)
        if self.kind == "embedding":
            d = F.embedding(x, delta)
        elif self.kind == "conv":
            xin, pad = _conv_input(module, x)
            d = F.conv2d(xin, delta, None, module.stride, pad, module.dilation, module.groups)
        elif is_fan_in_fan_out(module):
            d = x.to(cdt) @ delta
        else:
            d = F.linear(x.to(cdt), delta)
        if self.layer.bias is not None and self.layer.magnitude is None:
            b = self.layer.bias.to(device=w.device, dtype=cdt) * (self.layer.scale * factor)
            d = d + _channel_view(b, self.kind)
        return out + d.to(out.dtype)


_ALGORITHM_LABELS = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "full": "full diff"}


def _algorithm_change(loaded: str, new: str) -> str:
    return (f"the loaded adapter is a {loaded} layer here and the new one a {new} layer: a hotswap writes new "
            "values into the loaded tensors and keeps the forward's code path, so it cannot change the algorithm "
            "(LoRA, LoHa, LoKr, full diff) or the path; load it as a new adapter (load_lora_weights with another "
            "adapter_name, then delete the old one)")


def _dense_tensors(layer: LoraLayer) -> dict:
    """Every tensor a DenseSlot's forward reads from its layer, by name."""
    out = {f"lycoris.{k}": v for k, v in layer.lycoris.items()}
    for name in ("down", "up", "mid", "magnitude", "bias"):
        t = getattr(layer, name)
        if t is not None:
            out[name] = t
    return out


def _clone(t):
    return None if t is None else t.clone()


def make_slot(module: nn.Module, layer: LoraLayer, weight: torch.Tensor, capacity: Optional[int] = None):
    cls = DenseSlot if needs_dense(module, layer) else LiveSlot
    return cls(module, layer, weight, capacity)


class ModuleHook:
    """The forward hook of one adapted module: runs the live slots of its component's current plan."""

    def __init__(self, state, path: str):
        self.state = state  # engine.ComponentState (version, active, enabled, call_scale, ...)
        self.path = path
        self.slots: dict = {}  # adapter name -> LiveSlot | DenseSlot
        self.plan: tuple = ()
        self.version = -1
        self.device = None
        self.dtype = None
        self.handle = None
        self.per_sample_cache = None  # lora_fast.per_sample: (key, plan)
        self.plan_names: tuple = ()  # adapter names of ``plan``, in order
        self.kernel_ok = False  # every slot of the plan is a plain factored LoRA the segmented kernels take
        self.kernels = None  # eager kernel route: (key, AdapterGroups of the plan's slots)
        self.last_rows = None  # eager kernel route: (key, RowMap) of the last call

    def attach(self, module: nn.Module) -> None:
        self.handle = module.register_forward_hook(self, with_kwargs=True)

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def build_plan(self, module: nn.Module) -> tuple:
        """The slots to run eagerly, from the component state (enabled, active, not fused, on this device)."""
        state = self.state
        plan = []
        if state.enabled:
            not_live = state.fused_names()
            for name in state.active:
                slot = self.slots.get(name)
                if slot is None or name in not_live:
                    continue
                if self.ready(slot, module):
                    plan.append(slot)
        return tuple(plan)

    def refresh(self, module: nn.Module) -> None:
        """Rebuild the cached plan (eager calls, lazily after any state change)."""
        w = module.weight
        self.plan = self.build_plan(module)
        name_of = {id(s): n for n, s in self.slots.items()}
        self.plan_names = tuple(name_of[id(s)] for s in self.plan)
        self.kernel_ok = bool(self.plan) and all(kernel_slot(s, module) for s in self.plan)
        self.device, self.dtype = w.device, live_dtype(module)
        self.version = self.state.version

    def ready(self, slot, module: nn.Module) -> bool:
        """Bring a slot to the module's device/dtype and its DoRA caches up to date; False if it is parked."""
        w = module.weight
        device, dtype = w.device, live_dtype(module)
        if slot.device != device or (slot.dtype != dtype and not slot.dense):
            if slot.pinned:
                if slot.device != device:
                    return False  # parked elsewhere by set_lora_device: unused until moved back
            else:  # adapters follow the model (as PEFT layers, which are submodules, do)
                slot.to(device=device, dtype=dtype)
        key = (self.state.epoch, device, dtype)
        if slot.magnitude is not None and slot.cache_key != key:
            slot.refresh_caches(module, key)
        return True

    def __call__(self, module: nn.Module, args, kwargs, output):
        state = self.state
        if state.per_sample_on:  # inside lora_fast.per_sample_adapters: one adapter mix per sample
            return _per_sample_forward(self, module, args, kwargs, output)
        if torch.compiler.is_compiling():
            return self._traced(module, args, kwargs, output)
        w = module.weight
        if self.version != state.version or w.device != self.device or live_dtype(module) != self.dtype:
            self.refresh(module)
        plan = self.plan
        if not plan:
            return None
        lam = state.call_scale
        if lam == 0.0:
            return None
        x = args[0] if args else next(iter(kwargs.values()))
        if self.kernel_ok and kernel_route_on(w.device):
            done = self._kernel_forward(module, x, output, lam)
            if done is not None:
                return done
        shared = _sharing(state)
        for slot in plan:
            if shared is not None and slot.kind == "linear" and not slot.dense and slot.magnitude is None:
                done = _shared_linear(shared, state, slot, x, output, lam)
                if done is not None:
                    output = done
                    continue
            output = slot.apply(module, x, output, lam)
        return output

    def _kernel_forward(self, module: nn.Module, x: torch.Tensor, out: torch.Tensor, lam: float):
        """The eager forward through the segmented shrink/expand kernels (per_sample's machinery): the plan's slots
        are the groups, and one per-sample entry holding every active adapter with its set_adapters weight covers
        every row (a mixture of k adapters: k passes, as per_sample_adapters runs a mixed entry). None when this
        call does not fit (autograd, dtypes, shapes): the caller then runs the slots one by one."""
        if torch.is_grad_enabled() and (x.requires_grad or out.requires_grad):
            return None
        state = self.state
        w = module.weight
        key = (state.slot_epoch, state.swaps, w.device, w.dtype, self.plan_names)
        cached = self.kernels
        if cached is None or cached[0] != key:
            cached = self.kernels = (key, slot_groups(list(self.plan)))
        groups = cached[1]
        if x.dtype != groups.dtype or out.dtype != groups.dtype:
            return None
        weights = state.weights
        entry = (tuple((g, weights.get(n, 1.0)) for g, n in enumerate(self.plan_names)),)
        conv = isinstance(module, nn.Conv2d)
        if conv:
            if x.dim() != 4 or out.dim() != 4:
                return None
            batch, rows_per_sample = x.shape[0], 1
        else:
            if x.shape[-1] != groups.in_features or out.shape[-1] != groups.out_features:
                return None
            batch, rows_per_sample = 1, x.numel() // groups.in_features  # one "sample": every row of the activation
        rm_key = (None, entry, batch, rows_per_sample, x.device)  # names None: never a per-sample spec's key
        last = self.last_rows
        if last is not None and last[0] == rm_key:
            rm = last[1]
        else:
            rm = cached_row_map(state.per_sample_rows, rm_key, lambda: build_row_map(entry, batch, rows_per_sample,
                                                                                     x.device))
            self.last_rows = (rm_key, rm)
        if not rm.passes:  # every weight is 0: nothing to add
            return out
        if not out.is_contiguous():
            out = out.contiguous()
        if conv:
            conv_terms(module, x, out, groups, rm, lam)
            return out
        x2 = x.reshape(-1, groups.in_features)
        shrunk = shared_shrink(_sharing(state), state, self.plan, ("segmented", rm_key), x,
                               lambda: segmented_shrink(x2, groups, rm))
        segmented_expand(out.view(-1, groups.out_features), shrunk, groups, rm, lam)
        return out

    def _traced(self, module: nn.Module, args, kwargs, output):
        """The forward dynamo traces: every slot of this module runs, each kept or dropped by its adapter's gate
        (a 0-d bool tensor that :func:`sync_state` writes). Nothing here reads or writes a plan, a version or a
        cache key, so the graph guards only on the slots this hook holds, their tensors' shapes/devices/dtypes and
        the module's: set_adapters, enable/disable, fuse/unfuse and hotswap change data, not the graph. Exception:
        a module holding a factored DoRA slot runs its active adapters in their active order (one graph per
        distinct active list)."""
        state = self.state
        lam = state.call_scale
        if lam == 0.0:
            return None
        gates = state.gates
        w = module.weight
        x = args[0] if args else next(iter(kwargs.values()))
        slots = self.slots
        if any(not s.dense and s.magnitude is not None for s in slots.values()):
            # A factored DoRA term is not additive (as in PEFT it rescales the output accumulated so far), so the
            # order of the active adapters matters here: follow it (the graph guards on the active list).
            names = [n for n in state.active if n in slots]
        else:  # plain terms add up: every slot runs, in a fixed order, its gate deciding whether it counts
            names = list(slots)
        for name in names:
            slot = slots[name]
            gate = gates.get(name)
            if gate is None:  # not registered yet (cannot happen after a load): nothing runs
                continue
            gate = gate.on
            if slot.device != w.device or (slot.dtype != live_dtype(module) and not slot.dense):
                # parked by set_lora_device, or the model moved after the load: as eagerly (moving the slot here
                # is a side effect of the trace: one more compile)
                if not self.ready(slot, module):
                    continue
            if not slot.dense and slot.magnitude is not None and slot._caches is None:
                continue  # DoRA never live since its load or a move: gated off (sync_state fills it when it goes live)
            term = slot.apply(module, x, output, lam, in_place=False)
            output = torch.where(gate, term, output)
        return output


# --------------------------------------------------------------------------------------------- eager kernel route

#: Whether eager forwards of plain factored LoRA slots go through the segmented shrink/expand kernels
#: (lora_fast.kernels.shrink_expand, the per-sample machinery) instead of per-slot torch products.
#: None: only while LORA_FAST_SEGMENTED_BACKEND names a backend; True / False: always / never. The per-slot
#: products are the faster route on the CPU and, measured once on an H200 (SD1.5 UNet fp16, batch 16, latent 64),
#: on CUDA too: 1.23x the base step against 1.29x through the kernels (benchmarks/RESULTS.md, "Live single adapter
#: through the segmented kernels" and "First GPU run of this session").
KERNEL_ROUTE: Optional[bool] = None


def kernel_route_on(device: torch.device) -> bool:
    if KERNEL_ROUTE is not None:
        return KERNEL_ROUTE
    return bool(os.environ.get("LORA_FAST_SEGMENTED_BACKEND"))


def kernel_slot(slot, module: nn.Module) -> bool:
    """Slots the batched paths take: a plain factored LoRA on a linear layer (Conv1D included; the segmented
    kernels) or on a convolution with one group (channels-first batched products)."""
    if slot.dense or slot.magnitude is not None or slot.bias is not None:
        return False
    return slot.kind == "linear" or (slot.kind == "conv" and module.groups == 1)


def pointwise(module: nn.Module) -> bool:
    """A 1x1 convolution that is a per-pixel linear map (stride 1, no padding, one group)."""
    return (isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1) and tuple(module.stride) == (1, 1)
            and module.padding in ((0, 0), "valid") and module.groups == 1)


def conv_terms(module: nn.Conv2d, x: torch.Tensor, out: torch.Tensor, groups: AdapterGroups, rm: RowMap,
               lam: float) -> None:
    """The row map's terms of a convolution's LoRA into ``out`` (contiguous, in place)."""
    b = x.shape[0]
    if pointwise(module):
        channels_first_lora(x.reshape(b, x.shape[1], -1), out.view(b, out.shape[1], -1), groups, rm, lam)
        return
    xin, pad = _conv_input(module, x)  # non-zero padding modes pad explicitly, as the base conv does
    geometry = {"kernel_size": tuple(module.kernel_size), "stride": module.stride, "padding": pad,
                "dilation": module.dilation}
    channels_first_lora(xin, out, groups, rm, lam, conv=geometry)


def slot_groups(slots: list) -> Optional[AdapterGroups]:
    """The kernel groups of kernel slots (None: an absent group), from 2-D views of their factors (a conv's
    ``(R, C, kh, kw)`` down becomes ``(R, C·kh·kw)``); each group's scale is its slot's alpha/r (weights come from
    the row map). None if every entry is None."""
    if all(s is None for s in slots):
        return None
    return make_groups([None if s is None else s.down.reshape(s.down.shape[0], -1) for s in slots],
                       [None if s is None else s.up.reshape(s.up.shape[0], -1) for s in slots],
                       [0.0 if s is None else float(s.scale) for s in slots])


ROW_MAPS_KEPT = 16  # row maps kept per component (per entries x batch shape x device), least recent dropped


def cached_row_map(cache, key, build) -> RowMap:
    """The row map under ``key`` in a component's LRU (``ComponentState.per_sample_rows``), built on a miss."""
    rm = cache.get(key)
    if rm is not None:
        cache.move_to_end(key)
        return rm
    rm = cache[key] = build()
    while len(cache) > ROW_MAPS_KEPT:
        cache.popitem(last=False)
    return rm


# --------------------------------------------------------------------------------------------- shared down factors
#
# A LoRA on a fused projection (kohya Flux: qkv, single-block linear1) is split over the separate diffusers modules,
# which then hold equal down matrices (the reader gives them one tensor; moving or casting per module makes copies)
# and see the same input (to_q/to_k/to_v take the same hidden states). Their shrink A·x is the same product, so the
# eager paths compute it once: the first module stores it in its component's cache under (which equal downs, which
# input), its siblings take it from there and only expand. The input is recognised by identity (address, shape,
# strides, dtype, device, version counter, and a live weak reference, so the address cannot have been reused), so
# modules that get different inputs (Flux's add_q_proj & co take the encoder states) never share a product.
# Traced (torch.compile) forwards keep computing per module.


#: Compute a shared shrink once per group and input (False: every module shrinks on its own; for comparisons).
SHARE_DOWNS = True


class SharedDowns:
    """Which plain linear slots of a component hold equal down factors: a group id per slot that has a twin,
    recomputed when slots change (load, delete, hotswap: the state's ``(slot_epoch, swaps)``)."""

    __slots__ = ("key", "ids")

    def __init__(self):
        self.key = None
        self.ids: dict = {}  # id(slot) -> (slot, group id); the slot is held so its id is not reused

    def token(self, state, slots) -> Optional[tuple]:
        """What identifies these slots' downs (in order; None entries stay None), or None if one has no twin."""
        key = (state.slot_epoch, state.swaps)
        if self.key != key:
            self.ids = _equal_downs(state)
            self.key = key
        ids = self.ids
        out = []
        for s in slots:
            if s is None:
                out.append(None)
                continue
            hit = ids.get(id(s))
            if hit is None:
                return None
            out.append(hit[1])
        return (key, tuple(out)) if any(i is not None for i in out) else None


def _equal_downs(state) -> dict:
    """Group a component's plain linear slots by equal down factors (same memory, or equal values: fingerprinted,
    then compared exactly). Once per slot change; O(factors)."""
    buckets: dict = {}
    for hook in state.hooks.values():
        for slot in hook.slots.values():
            if slot.dense or slot.kind != "linear" or slot.magnitude is not None or slot.bias is not None:
                continue
            d = slot.down
            if d.device.type == "meta":
                continue
            buckets.setdefault((tuple(d.shape), d.dtype, d.device), []).append(slot)
    ids: dict = {}
    for (shape, _, device), members in buckets.items():
        if len(members) < 2:
            continue
        same_memory: dict = {}
        for s in members:
            same_memory.setdefault((s.down.data_ptr(), s.down.stride()), []).append(s)
        heads = [v[0] for v in same_memory.values()]
        clusters = [[h] for h in heads]
        if len(heads) > 1:
            probe = torch.linspace(-1.0, 1.0, shape[-1], dtype=torch.float32, device=device)
            prints = torch.stack([h.down.float() @ probe for h in heads]).cpu().tolist()
            by_print: dict = {}
            for h, fp in zip(heads, prints):
                by_print.setdefault(tuple(fp), []).append(h)
            clusters = []
            for candidates in by_print.values():
                local: list = []
                for h in candidates:
                    for c in local:
                        if torch.equal(c[0].down, h.down):
                            c.append(h)
                            break
                    else:
                        local.append([h])
                clusters.extend(local)
        for c in clusters:
            slots = [s for h in c for s in same_memory[(h.down.data_ptr(), h.down.stride())]]
            if len(slots) > 1:
                gid = len(ids)
                for s in slots:
                    ids[id(s)] = (s, gid)
    return ids


class ShrinkCache:
    """The last few shrink products of one component's eager forward, keyed by (what was shrunk, the input)."""

    __slots__ = ("entries",)
    KEPT = 4

    def __init__(self):
        self.entries: list = []  # (key, input identity, weak reference to the input, product), most recent last

    @staticmethod
    def identity(x: torch.Tensor) -> tuple:
        try:
            version = x._version
        except RuntimeError:  # inference tensors keep no version counter (and cannot be changed outside inference)
            version = None
        return (x.data_ptr(), x.shape, x.stride(), x.dtype, x.device, version)

    def get(self, key, ident):
        for k, i, ref, value in reversed(self.entries):
            if k == key and i == ident and ref() is not None:
                return value
        return None

    def put(self, key, ident, x: torch.Tensor, value) -> None:
        self.entries.append((key, ident, weakref.ref(x), value))
        if len(self.entries) > self.KEPT:
            del self.entries[0]


def _sharing(state):
    """The component's shared-down bookkeeping (its CallScaleHooks), or None."""
    return state.scale_hooks


def shared_shrink(sharing, state, slots, what, x: torch.Tensor, compute):
    """``compute()`` (a shrink of ``x`` by ``slots``' downs), taken from the component's cache when a module with
    equal downs already shrank this same input in this forward. ``what`` names the product (route, row map)."""
    token = None if sharing is None or not SHARE_DOWNS else sharing.shared.token(state, slots)
    if token is None:
        return compute()
    key = (what, token)
    ident = ShrinkCache.identity(x)
    value = sharing.shrinks.get(key, ident)
    if value is None:
        value = compute()
        sharing.shrinks.put(key, ident, x, value)
    return value


def _shared_linear(sharing, state, slot, x: torch.Tensor, out: torch.Tensor, lam: float):
    """LiveSlot.apply's in-place linear branch (the same ops) with A·x shared between modules with equal downs;
    None when it does not apply (then the slot runs as usual)."""
    if (not SHARE_DOWNS or x.dtype != slot.down.dtype or not slot._in_place(out)
            or sharing.shared.token(state, (slot,)) is None):
        return None
    h = shared_shrink(sharing, state, (slot,), ("linear",), x, lambda: F.linear(x, slot.down))
    coef = slot.scale * slot.weight
    if lam != 1.0:
        coef = coef * lam
    out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), slot.up.t(), alpha=float(coef))
    return out


class AdapterGate:
    """What the traced forward knows of one adapter of a component: ``on``, a 0-d bool tensor (enabled, active and not
    fused), written in place; ``dora``, the adapter's factored DoRA slots with their modules (their norm caches are
    brought up to date whenever the adapter is live)."""

    __slots__ = ("on", "dora")

    def __init__(self):
        self.on = torch.zeros((), dtype=torch.bool)
        self.dora: list = []


def sync_state(state, slots: bool = True) -> None:
    """Called by ``ComponentState.bump`` after every change of what runs live: write each adapter's gate (the
    traced forward's only view of enabled/active/fused) and bring the DoRA norm caches of live adapters up to date
    with the current base weights, which a traced forward cannot do lazily without guarding on the fuse epoch (an
    eager forward would compute the same caches at its next call). ``slots=False`` (set_adapters, enable/disable:
    the slots did not change) costs O(adapters) plus any stale DoRA caches of adapters that just became live."""
    gates = state.gates
    live = set()
    if state.enabled:
        fused = state.fused_names()
        live = {n for n in state.active if n not in fused}
    for n in [n for n in gates if n not in state.adapters]:
        del gates[n]
    for n, layers in state.adapters.items():
        gate = gates.get(n)
        rebuild = slots or gate is None
        if gate is None:
            gate = gates[n] = AdapterGate()
        if rebuild:
            by_path = state.slot_hooks.get(n, {})
            gate.dora = []
            for path, b in layers.items():
                hook = by_path.get(path)
                slot = None if hook is None else hook.slots.get(n)
                if slot is not None and not slot.dense and slot.magnitude is not None:
                    gate.dora.append((b.module, slot))
        on = n in live
        gate.on.fill_(on)  # in place: a compiled graph reads the same tensor at its next call
        if on:
            for module, slot in gate.dora:
                w = module.weight
                if slot.device != w.device or slot.dtype != live_dtype(module):
                    continue  # parked or not moved yet: ModuleHook.ready refreshes it when it moves
                key = (state.epoch, w.device, w.dtype)
                if slot.cache_key != key:
                    slot.refresh_caches(module, key)


@torch.compiler.disable
def _per_sample_forward(hook: ModuleHook, module: nn.Module, args, kwargs, output):
    # Run eagerly under torch.compile: the per-sample path keeps row-map caches and launches Triton kernels with
    # address tables, and each block installs a new spec object; tracing it would recompile per block.
    return hook.state.per_sample.forward(hook, module, args, kwargs, output)


def _scale_positions(root: nn.Module) -> dict:
    """Positional index (in ``args``) of each scale-carrying keyword of root.forward, if it has one."""
    try:
        params = list(inspect.signature(root.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    out = {}
    for i, p in enumerate(params):
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            break
        if p.name in SCALE_KWARGS:
            out[p.name] = i
    return out


class CallScaleHooks:
    """Pre/post hooks on a component root: read diffusers' per-call ``{"scale": λ}`` for the duration of the call.

    diffusers' own ``apply_lora_scale`` pops the value and scales PEFT layers only, so nothing else applies it.
    λ = 0 really turns the LoRA terms off (diffusers resets to 1.0 instead, a bug we don't copy).
    """

    def __init__(self, state, root: nn.Module):
        self.state = state
        self.positions = _scale_positions(root)
        self.shared = SharedDowns()  # eager forwards: which slots hold equal down factors
        self.shrinks = ShrinkCache()  # eager forwards: shrink products of this call, for modules with equal downs
        self.handles = [
            root.register_forward_pre_hook(self.pre, with_kwargs=True),
            root.register_forward_hook(self.post, with_kwargs=True, always_call=True),
        ]

    def _scale(self, args, kwargs) -> Optional[float]:
        for name in SCALE_KWARGS:
            value = kwargs.get(name)
            if value is None and name in self.positions and len(args) > self.positions[name]:
                value = args[self.positions[name]]
            if isinstance(value, dict) and "scale" in value:
                return float(value["scale"])
        return None

    def pre(self, module, args, kwargs):
        state = self.state
        state.scale_stack.append(state.call_scale)
        lam = self._scale(args, kwargs)
        if lam is not None:
            state.call_scale = lam
        return None

    def post(self, module, args, kwargs, output):
        state = self.state
        if state.scale_stack:
            state.call_scale = state.scale_stack.pop()
        if not torch.compiler.is_compiling():
            self.shrinks.entries.clear()  # the products of this call are of no use after it: free them
        return None

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class EncodePromptScale:
    """Installed as ``pipe.encode_prompt`` while text encoders hold live adapters: diffusers pipelines pass the
    text-encoder ``lora_scale`` there (and scale PEFT layers only); this applies it to our text-encoder terms."""

    def __init__(self, pipe, states_of):
        self.pipe = pipe
        self.states_of = states_of  # fn(pipe) -> text-encoder ComponentStates
        self.signature = inspect.signature(type(pipe).encode_prompt)

    def __call__(self, *args, **kwargs):
        pipe = self.pipe
        original = type(pipe).encode_prompt
        try:
            bound = self.signature.bind(pipe, *args, **kwargs)
            lam = bound.arguments.get("lora_scale")
        except TypeError:
            lam = None
        if lam is None:
            return original(pipe, *args, **kwargs)
        states = self.states_of(pipe)
        saved = [s.call_scale for s in states]
        for s in states:
            s.call_scale = float(lam)
        try:
            return original(pipe, *args, **kwargs)
        finally:
            for s, v in zip(states, saved):
                s.call_scale = v
